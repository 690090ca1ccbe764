"""The threat-model ladder: who the attacker is, recorded with every result (DESIGN.md, Threat models).

A defense claim names its attacker. Levels L0-L3 are transfer attackers (their TAEs are banks crafted
on surrogates); L4-L6 attack the victim itself (:mod:`trigact.threats.adaptive`).
"""

from __future__ import annotations

from torch import nn

from trigact.common.errors import unknown_name

LEVELS: dict[str, tuple[str, str]] = {
    "L0": ("naive transfer", "standard surrogates trained on the same task; nothing about the defense"),
    "L1": ("ensemble transfer", "several standard surrogates, attacked as one fused model"),
    "L2": ("same paradigm", "surrogates trained with trigger activation, each with its own trigger"),
    "L3": ("expectation over triggers", "the paradigm and eps_t, not tau: an ensemble of same-paradigm surrogates"),
    "L4": ("leaked weights, no trigger", "the raw network f and labelled clean images of its own, not tau"),
    "L5": ("query-only black box", "the deployed unit's scores on queried images, within a query budget"),
    "L6": ("white box, tau known", "the deployed unit f_t: its weights, its trigger and its gradients"),
}


def level_meta(level: str) -> dict:
    """``{"level", "name", "knowledge"}`` of a level, for a bank's or a table's metadata."""
    if level not in LEVELS:
        raise unknown_name("threat level", level, list(LEVELS))
    name, knowledge = LEVELS[level]
    return {"level": level, "name": name, "knowledge": knowledge}


def _has_trigger(model: nn.Module) -> bool:
    return getattr(model, "trigger", None) is not None


def transfer_level(surrogate: nn.Module) -> str:
    """The level of a transfer attacker from its surrogate: L0 one standard model, L1 an ensemble of
    standard models, L2 one trigger-activation model (attacked through its own deployed unit), L3 an
    ensemble whose members are all trigger-activation models. An ensemble mixing both is L1: it does
    not model the trigger distribution."""
    members = getattr(surrogate, "members", None)
    if members is None:
        return "L2" if _has_trigger(surrogate) else "L0"
    return "L3" if all(_has_trigger(m) for m in members) else "L1"
