"""The deployment unit: a trained network with its trigger, ``f_t(x) = f(clamp(x + tau, 0, 1))``.

A bundle file is a plain dict of tensors and primitive values, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs when a bundle is opened):

    {"format": "trigact-bundle", "version": 2,
     "model": <net.spec: name, num_classes, in_chans, image_size, mean, std, kwargs>,
     "state_dict": <network weights>, "trigger": <tau (C, H, W)> or None,
     "meta": {"config": <resolved Hydra config>, "metrics": {...}, ...},
     "sha256": <tree_sha256 of all the entries above>}

The sha256 is taken over the loaded values (tensor bytes, dtypes, shapes and every plain value), not
over the file's bytes, so it lives in the file it checks: bytes garbled on disk or in transfer change
a weight, or make the file unreadable, either way a one-line "corrupt bundle" error instead of a
silently wrong model. Version 1 bundles (written before the checksum) still load, with a warning.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from trigact.common.errors import TrigactError
from trigact.common.io import atomic_torch_save, tree_sha256
from trigact.models.deployed import DeployedModel

FORMAT = "trigact-bundle"
VERSION = 2  # 2: with "sha256"
BUNDLE_NAME = "bundle.pt"  # in every run folder
UNCHECKED_VERSIONS = {1}  # readable, but written before bundles carried a checksum
_warned_unchecked: set[str] = set()


def nonfinite_tensors(tensors: Mapping) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_model(net: nn.Module, trigger: torch.Tensor | None, where) -> None:
    """Refuse a network or trigger with NaN or infinite values (a diverged run), naming them."""
    bad = nonfinite_tensors(net.state_dict())
    if trigger is not None and nonfinite_tensors({"trigger": trigger}):
        bad.append("the trigger tau")
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise TrigactError(f"{where}: not finite (NaN or inf) after training: {', '.join(bad[:3])}{more}; "
                           "the run diverged (try a lower optimizer.lr), no bundle written")


def save_bundle(path, net: nn.Module, trigger: torch.Tensor | None, meta: dict) -> Path:
    """Write a bundle atomically (temp file, then rename), with its sha256; never a diverged model."""
    check_finite_model(net, trigger, f"refusing to write bundle {path}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": dict(net.spec),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "trigger": None if trigger is None else trigger.detach().cpu().clone(),
        "meta": meta,
    }
    payload["sha256"] = tree_sha256(payload)
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
    version = payload.get("version")
    if version in UNCHECKED_VERSIONS:
        if str(path) not in _warned_unchecked:  # once per file and process: a sweep reads bundles often
            _warned_unchecked.add(str(path))
            print(f"trigact: warning: {path} is a version-{version} bundle, written before bundles carried a "
                  "sha256; it is used unchecked (retrain the run to get a checked one)", file=sys.stderr)
        return payload
    if version != VERSION:
        raise TrigactError(f"{path} has bundle version {version!r}; this trigact reads versions "
                           f"{', '.join(map(str, sorted({*UNCHECKED_VERSIONS, VERSION})))}")
    if payload.get("sha256") != tree_sha256({k: v for k, v in payload.items() if k != "sha256"}):
        raise TrigactError(f"corrupt bundle {path}: its contents do not match the sha256 stored when it was "
                           "written (damaged on disk or in a copy); retrain the run or restore the file")
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
