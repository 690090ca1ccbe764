"""The network every registry entry builds: normalization in front of a backbone."""

from __future__ import annotations

import copy

import torch
from torch import nn

from trigact.models.normalize import Normalize


class ClassifierNet(nn.Module):
    """``backbone(normalize(x))`` for pixels ``x`` in [0, 1].

    ``spec`` holds the arguments it was built with, as plain Python values, so that a bundle can store
    it next to the weights and rebuild the net with ``build_model(**spec)``.
    """

    def __init__(self, normalize: Normalize, backbone: nn.Module, spec: dict):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self._spec = copy.deepcopy(spec)

    @property
    def spec(self) -> dict:
        """A copy, so that callers cannot make it disagree with the built net."""
        return copy.deepcopy(self._spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))
