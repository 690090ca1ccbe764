"""Moved to trigact.common.report (temporary shim during the restructure)."""
from trigact.common.report import *  # noqa: F401,F403
