"""One exception type for bad user input.

Entry points catch :class:`TrigactError` and print its message as a single line (no traceback),
so every message must name the bad value and what is allowed.
"""

from __future__ import annotations

import math


class TrigactError(ValueError):
    """Bad input from the user: config value, path, file. The message is shown as one line."""


def unknown_name(kind: str, name: str, known) -> TrigactError:
    """The error for a registry miss: names the bad value and lists the allowed ones."""
    return TrigactError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


def check_steps(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrigactError(f"{name}={value!r} must be an integer >= 1")
    return value


def check_range(value, name: str, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """A finite real number in [low, high] (or (low, high] with ``low_open``); NaN and inf are refused."""
    left = "(" if low_open else "["
    right = "]" if math.isfinite(high) else ")"
    allowed = f"{left}{low:g}, {high:g}{right}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TrigactError(f"{name}={value!r} is not a number; expected one in {allowed}")
    value = float(value)
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        raise TrigactError(f"{name}={value!r} must be in {allowed}")
    return value
