"""Every check of a user-given value: one line naming the key, the bad value and what is allowed.

The entry points call these before they load anything, so a typo fails in seconds, not after
training; the libraries call them again where a value enters (a datamodule, an attack).
"""

from __future__ import annotations

import math
from fractions import Fraction

from trigact.common.errors import TrigactError


def check_int(value, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum] (bools and floats refused): sizes, counts, widths, qualities."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise TrigactError(f"{name}={value!r} must be an integer {allowed}")
    return value


def check_steps(value, name: str) -> int:
    """An integer >= 1: steps, batch sizes, image counts."""
    return check_int(value, name, 1)


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


def check_seed(value, key: str = "seed") -> int:
    """A seed the global RNGs take (Lightning's and numpy's range), refused in one line otherwise."""
    from lightning.fabric.utilities.seed import max_seed_value, min_seed_value

    if isinstance(value, bool) or not isinstance(value, int) or not min_seed_value <= value <= max_seed_value:
        raise TrigactError(f"{key}={value!r} must be an integer in [{min_seed_value}, {max_seed_value}]")
    return value


def check_name(value, key: str = "name") -> str:
    """A folder name (e.g. ``evaluate name=...``): refused when it holds a path separator or is ``..``,
    which would write outside the folder it names a child of."""
    value = str(value)
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise TrigactError(f"{key}={value!r} must be a non-empty name without path separators")
    return value


# The splits evaluation images come from: final tables use the test split, model selection the validation
# split carved out of the training data (so that a search never sees a test image).
SPLITS = ("test", "val")


def check_split(split) -> str:
    if split not in SPLITS:
        raise TrigactError(f"split={split!r} is not a split banks are crafted on; allowed: {', '.join(SPLITS)}")
    return split


def check_n_eval(n) -> int | None:
    """``n_eval``: None (every image of the split) or an integer >= 1."""
    return None if n is None else check_steps(n, "n_eval")


# Epsilons as the papers write them: ``8/255``, ``0.031``, ``0``.
def parse_eps(value, name: str = "eps", allow_zero: bool = True) -> float:
    """Parse an epsilon in [0, 1] (``(0, 1]`` unless ``allow_zero``) given as a number or a string like
    ``'8/255'``.

    Hydra passes ``trigger.eps=8/255`` through as the string ``'8/255'``; this turns it into a float
    and rejects values outside the pixel range with a one-line error naming the value.
    """
    if isinstance(value, bool):
        raise TrigactError(f"{name}={value!r} is not a number; write e.g. 8/255 or 0.03")
    if isinstance(value, (int, float)):
        eps = float(value)
    elif isinstance(value, str):
        try:
            # Numerator and denominator separately: Fraction("0.5/255") is rejected, 0.5/255 is not odd.
            parts = value.replace(" ", "").split("/")
            if len(parts) > 2:
                raise ValueError(value)
            eps = float(Fraction(parts[0]) / Fraction(parts[1] if len(parts) == 2 else 1))
        except (ValueError, ZeroDivisionError):
            raise TrigactError(f"{name}={value!r} is not a number; write e.g. 8/255 or 0.03") from None
    else:
        raise TrigactError(f"{name}={value!r} is not a number; write e.g. 8/255 or 0.03")
    if eps != eps or eps in (float("inf"), float("-inf")):
        raise TrigactError(f"{name}={value!r} must be finite")
    if eps < 0 or (eps == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise TrigactError(f"{name}={value!r} must be {bound} (pixels are in [0, 1]; e.g. 8/255)")
    if eps > 1:  # pixels live in [0, 1]: no perturbation or step beyond 1 means anything
        allowed = "[0, 1]" if allow_zero else "(0, 1]"
        raise TrigactError(f"{name}={value!r} must be in {allowed} (pixels are in [0, 1]; e.g. 8/255)")
    return eps
