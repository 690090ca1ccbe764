"""Moved: trigact.attacks.config, trigact.evaluation.crafting / victims / tables (temporary shim)."""
from trigact.attacks.config import attack_config  # noqa: F401
