"""Moved to trigact.common.io (temporary shim during the restructure)."""
from trigact.common.io import *  # noqa: F401,F403
