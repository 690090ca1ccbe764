"""Moved to trigact.common.config (temporary shim during the restructure)."""
from trigact.common.config import *  # noqa: F401,F403
