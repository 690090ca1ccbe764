"""``bit_depth``: bit-depth reduction, the first squeezer of feature squeezing (Xu et al., NDSS 2018).

Each pixel is rounded to the nearest of ``2**bits`` evenly spaced levels in [0, 1]:
``round(x * (2**bits - 1)) / (2**bits - 1)``. Small perturbations that do not cross a rounding
boundary vanish. ``round`` has zero gradient almost everywhere, so this is not a useful gradient path.
"""

from __future__ import annotations

import torch

from trigact.defenses.base import Defense, check_images, check_int
from trigact.defenses.registry import register_defense


@register_defense("bit_depth")
class BitDepthReduction(Defense):
    """Bit-depth reduction to 1..8 bits per channel (2**bits grey levels)."""

    def __init__(self, bits: int = 4):
        check_int("bit_depth", "bits", bits, 1, 8)
        super().__init__(bits=bits)
        self.levels = 2**bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images("bit_depth", x)
        return torch.round(x.clamp(0.0, 1.0) * self.levels) / self.levels
