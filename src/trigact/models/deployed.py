"""The deployed unit of a model with trigger activation: ``f_t(x) = f(clamp(x + tau, 0, 1))``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
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
            tau = self._tau
            if tau.shape[-2:] != x.shape[-2:]:
                # A resized input (an attack's input diversity: DI-FGSM, L2T, ... on a trigger-activation
                # surrogate) gets the trigger resampled to its size, nearest-neighbour so that a fixed
                # trigger keeps its +-eps_t values; at the trained size nothing changes.
                tau = F.interpolate(tau.unsqueeze(0) if tau.ndim == 3 else tau, size=x.shape[-2:], mode="nearest")
            x = (x + tau).clamp(0.0, 1.0)
        return self.net(x)


def run_id(meta: dict) -> str:
    """A name unique to a run, from its bundle metadata: its registry path below the dataset, flattened
    (``standard__lenet__none-15b738de__s0``); for a bundle from elsewhere (no registry path) its file
    path, flattened and shortened. TAE banks are named by it, so every entry point finds the same banks."""
    config = meta.get("config") or {}
    run_dir = meta.get("run_name")
    runs_dir = (config.get("paths") or {}).get("runs_dir")
    try:
        rel = Path(run_dir).relative_to(runs_dir)
        return "__".join(rel.parts[1:])  # the dataset is already a level of the bank tree
    except (TypeError, ValueError):
        path = Path(meta.get("path") or "bundle")
        return "__".join(path.with_suffix("").parts[-4:]).replace(":", "_")
