"""Attacker levels beyond naive transfer: the threat-model ladder (DESIGN.md, Threat models)."""

from trigact.threats.adaptive import ADAPTIVE_KINDS, build_adaptive
from trigact.threats.estimate import estimate_quality, estimate_trigger
from trigact.threats.levels import LEVELS, level_meta, transfer_level
from trigact.threats.sanity import sanity_flags

__all__ = ["ADAPTIVE_KINDS", "LEVELS", "build_adaptive", "estimate_quality", "estimate_trigger", "level_meta",
           "sanity_flags", "transfer_level"]
