"""The deployment unit: a trained network with its trigger, ``f_t(x) = f(clamp(x + tau, 0, 1))``.

A bundle file is a plain dict of tensors and primitive values, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs when a bundle is opened):

    {"format": "trigact-bundle", "version": 1,
     "model": <net.spec: name, num_classes, in_chans, image_size, mean, std, kwargs>,
     "state_dict": <network weights>, "trigger": <tau (C, H, W)> or None,
     "meta": {"config": <resolved Hydra config>, "metrics": {...}, ...}}
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from trigact.errors import TrigactError
from trigact.io import atomic_torch_save

FORMAT = "trigact-bundle"
VERSION = 1


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


def save_bundle(path, net: nn.Module, trigger: torch.Tensor | None, meta: dict) -> Path:
    """Write a bundle atomically (temp file, then rename)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": dict(net.spec),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "trigger": None if trigger is None else trigger.detach().cpu().clone(),
        "meta": meta,
    }
    return atomic_torch_save(payload, path)


def read_bundle(path) -> dict:
    """Load a bundle's raw dict, with one-line errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise TrigactError(f"bundle not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrigactError(f"{path} is not a readable trigact bundle (corrupt or foreign file: {first_line[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrigactError(f"{path} is not a trigact bundle (no 'format': {FORMAT!r} field)")
    if payload.get("version") != VERSION:
        raise TrigactError(f"{path} has bundle version {payload.get('version')!r}; this trigact reads version {VERSION}")
    return payload


def load_bundle(path, map_location="cpu") -> DeployedModel:
    """Rebuild the deployed unit from a bundle; the returned module is in eval mode."""
    from trigact.models import build_model  # models import nothing from here; keeps import light

    payload = read_bundle(path)
    net = build_model(**payload["model"])
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise TrigactError(f"{path}: weights do not match model {payload['model'].get('name')!r} ({str(err).splitlines()[0]})") from None
    meta = dict(payload.get("meta") or {})
    meta.setdefault("model", payload["model"])
    meta["path"] = str(path)
    model = DeployedModel(net, payload["trigger"], meta)
    return model.to(map_location).eval()
