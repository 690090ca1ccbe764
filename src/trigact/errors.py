"""Moved to trigact.common.errors and trigact.common.validate (temporary shim during the restructure)."""
from trigact.common.errors import TrigactError, unknown_name  # noqa: F401
from trigact.common.validate import check_range, check_steps  # noqa: F401
