"""Per-channel normalization as a network's first layer, so pixels stay in [0, 1] outside networks."""

from __future__ import annotations

import math

import torch
from torch import nn

from trigact.common.errors import TrigactError


def check_stats(mean, std, in_chans: int | None) -> tuple[list[float] | None, list[float] | None]:
    """Validate per-channel ``mean``/``std`` and return them as plain float lists.

    Both None means no normalization. With ``in_chans=None`` the channel count is taken from ``mean``.
    Plain lists keep a model's spec loadable with ``torch.load(weights_only=True)``.
    """
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise TrigactError(f"mean={mean!r}, std={std!r}: give both per-channel lists or neither")
    mean, std = _floats("mean", mean), _floats("std", std)
    channels = len(mean) if in_chans is None else in_chans
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise TrigactError(
                f"{name}={values} has {len(values)} values; expected {channels}, one per input channel"
            )
    if any(s <= 0 for s in std):
        raise TrigactError(f"std={std} must be > 0 in every channel")
    return mean, std


def _floats(name: str, values) -> list[float]:
    """Finite per-channel numbers as floats, from a list, tuple, OmegaConf ListConfig or 1-d tensor."""
    message = f"{name}={values!r} must be a list of per-channel numbers, e.g. [0.5, 0.5]"
    if isinstance(values, (str, bytes)):
        raise TrigactError(message)
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TrigactError(message) from None
    if not all(math.isfinite(v) for v in floats):
        raise TrigactError(f"{name}={floats} must be finite")
    return floats


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the identity when mean and std are None.

    mean/std are buffers of shape (C, 1, 1) so they ride in every state_dict and follow ``.to(device)``.
    """

    def __init__(self, mean=None, std=None, in_chans: int | None = None):
        super().__init__()
        mean, std = check_stats(mean, std, in_chans)
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", None if std is None else torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if self.mean is None:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
