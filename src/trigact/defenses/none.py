"""``none``: no preprocessing, so a config can name the undefended setting like any other."""

from __future__ import annotations

import torch

from trigact.defenses.base import Defense
from trigact.defenses.registry import register_defense


@register_defense("none")
class NoDefense(Defense):
    """No defense: the input passes unchanged (``defended`` then returns the victim itself)."""

    is_identity = True

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
