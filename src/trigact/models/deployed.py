"""The deployed unit of a model with trigger activation: ``f_t(x) = f(clamp(x + tau, 0, 1))``."""

from __future__ import annotations

import torch
from torch import nn


class DeployedModel(nn.Module):
    """``f(clamp(x + tau, 0, 1))``; for a standard model (trigger None) just ``f(x)``.

    Attacks and evaluation see only this plain ``nn.Module``: they never special-case triggers.
    """

    def __init__(self, net: nn.Module, trigger: torch.Tensor | None = None, meta: dict | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("_tau", None if trigger is None else trigger.detach().clone())
        self.meta = dict(meta or {})

    @property
    def trigger(self) -> torch.Tensor | None:
        return self._tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tau is not None:
            x = (x + self._tau).clamp(0.0, 1.0)
        return self.net(x)
