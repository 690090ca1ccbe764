"""Moved to trigact.common.tracking (temporary shim during the restructure)."""
from trigact.common.tracking import *  # noqa: F401,F403
