"""Every check of a user-given value: one line naming the key, the bad value and what is allowed.

The entry points call these before they load anything, so a typo fails in seconds, not after
training; the libraries call them again where a value enters (a datamodule, an attack).
"""

from __future__ import annotations

import math

from trigact.common.errors import TrigactError


def check_steps(value, name: str) -> int:
    """An integer >= 1 (bools refused): steps, batch sizes, image counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrigactError(f"{name}={value!r} must be an integer >= 1")
    return value


def check_positive_int(key: str, value) -> int:
    """Return `value` if it is an int > 0, else a one-line TrigactError naming the config key."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TrigactError(f"{key} must be a positive integer, got {value!r}")
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
