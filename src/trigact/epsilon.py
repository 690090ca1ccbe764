"""Epsilons as the papers write them: ``8/255``, ``0.031``, ``0``."""

from __future__ import annotations

from fractions import Fraction

from trigact.errors import TrigactError


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
