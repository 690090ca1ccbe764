"""Finished adaptive results (L4-L6) on disk, so that a relaunch never redoes them.

An adaptive level attacks each victim itself: there is no bank to reuse, and on 2 CPU cores L4-L6 of
one ladder take hours. A pipeline or ``trigact.evaluate threat=...`` relaunched after a crash, or with
one victim more, reuses every (victim, level) result it finished. One folder per (victim, level):

    <output_dir>/threat/<dataset>/<victim run>/<level>[-<defense>]-<hash of key>/
        result.safetensors   uint8 per-image masks (1 = right): ``clean`` and ``attack/<name>``
        meta.json            written last: the key, the data file's sha256, the cells and the report
        .lock                the flock held while the result is checked and computed

The key holds everything that makes the result: the level's config and eps; the victim (its run, its
bundle file's sha256, its defense's config); the sha256 of the evaluation images (their float32 bytes,
as they are attacked: already quantized to 255ths) and labels, and of L4's attacker images; the seed; the batch size (random
starts are drawn per batch); whether the sanity checks ran; and :data:`FORMAT`, bumped whenever the
code that computes a result changes what it computes. A victim not loaded from a bundle file has no
identity and is never stored. A result without ``meta.json`` (an interrupted write) or whose data file
does not match its recorded hash is computed again, and said so; one recorded for another key (a
hand-edited file) fails in one line and is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from trigact.common.errors import TrigactError
from trigact.common.io import atomic_write_bytes, atomic_write_json, folder_lock
from trigact.common.validate import check_name
from trigact.evaluation.bank import _jsonable, file_sha256, key_hash
from trigact.models.deployed import run_id

FORMAT = 1
DATA_FILE = "result.safetensors"
META_FILE = "meta.json"
LOCK_FILE = ".lock"


@dataclass
class StoredResult:
    """One victim's result at one level: per-image masks (bool) and the victim's report."""

    clean: torch.Tensor
    masks: dict[str, torch.Tensor]  # attack -> mask, in the level's order (inapplicable attacks absent)
    report: dict
    path: Path | None = None  # where it is stored (None: not stored)
    reused: bool = False  # loaded from ``path``, not computed by this launch


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process: every level of a ladder
    asks for each victim's bundle and weight files, which can be hundreds of MB (a DiffPure UNet)."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = file_sha256(path)
    return _DIGESTS[memo]


def _content(value):
    """A defense parameter as the key holds it: a path to a file or folder (a purifier's weights) by the
    sha256 of what it holds, not by where it is, so replaced weights are not reused and moved ones are."""
    if isinstance(value, str) and value and Path(value).exists():
        path = Path(value)
        if path.is_file():
            return {"sha256": _file_digest(path)}
        digest = hashlib.sha256()
        for f in sorted(q for q in path.rglob("*") if q.is_file()):
            digest.update(f"{f.relative_to(path).as_posix()}:{_file_digest(f)}\n".encode())
        return {"tree_sha256": digest.hexdigest()}
    return value


def victim_identity(model: nn.Module) -> dict | None:
    """``{run, sha256, defense}`` of a victim loaded from a bundle file (a defended one: the defense's
    config too, weight files by content); None for a model built in memory, which is never stored."""
    meta = getattr(model, "meta", None) or {}
    path = meta.get("path")
    if not path or not Path(path).is_file():
        return None
    defense = meta.get("defense")
    if isinstance(defense, Mapping):
        defense = {k: _content(v) for k, v in defense.items()}
    return {"run": run_id(meta), "sha256": _file_digest(Path(path)), "defense": _jsonable(defense)}


def images_digest(x: torch.Tensor, y: torch.Tensor) -> dict:
    """sha256 of images (their float32 bytes, as attacked) and of their labels, with their count."""
    q = x.detach().cpu().float().contiguous()
    digest = hashlib.sha256(f"{tuple(q.shape)}:".encode())
    digest.update(q.numpy().tobytes())
    labels = hashlib.sha256(y.detach().cpu().long().contiguous().numpy().tobytes()).hexdigest()
    return {"n": len(y), "x_sha256": digest.hexdigest(), "y_sha256": labels}


def store_root(output_dir, dataset: str) -> Path:
    """``<output_dir>/threat/<dataset>``: where a dataset's adaptive results are kept."""
    return Path(output_dir) / "threat" / check_name(dataset, "data.name")


def result_key(level: str, eps: float, level_cfg: Mapping, identity: Mapping, images: Mapping,
               attacker: Mapping | None, *, seed: int, batch_size: int, sanity: bool) -> dict:
    """Everything that makes one (victim, level) result, as ``meta.json["key"]`` stores it."""
    return _jsonable({
        "format": FORMAT, "level": level, "eps": float(eps), "level_config": dict(level_cfg),
        "victim": dict(identity), "images": dict(images), "attacker": None if attacker is None else dict(attacker),
        "seed": seed, "batch_size": batch_size, "sanity": bool(sanity),
    })


def result_dir(root, key: Mapping) -> Path:
    """``<root>/<victim run>/<level>[-<defense>]-<hash of key>``."""
    defense = (key["victim"].get("defense") or {}).get("name")
    tag = f"{key['level']}-{defense}" if defense else key["level"]
    run = re.sub(r"[/\\:]", "_", str(key["victim"]["run"])).strip(".") or "_"  # one folder below root, never out
    return Path(root) / run / re.sub(r"[/\\:]", "_", f"{tag}-{key_hash(key)}")


def load_result(path: Path, key: Mapping) -> StoredResult | None:
    """The complete result in ``path`` for ``key``, or None (absent or stale: said)."""
    meta_path = path / META_FILE
    if not meta_path.exists():
        if (path / DATA_FILE).exists():
            print(f"stale adaptive result, computing again: {path / DATA_FILE} has no {META_FILE} (interrupted write)")
        return None
    try:
        meta = json.loads(meta_path.read_text())
        data = (path / DATA_FILE).read_bytes()
    except (OSError, ValueError) as err:
        print(f"stale adaptive result, computing again: {path} unreadable ({type(err).__name__}: {err})")
        return None
    if not isinstance(meta, dict):
        print(f"stale adaptive result, computing again: {meta_path} is not a JSON object")
        return None
    if meta.get("key") != key:
        stored = meta.get("key") if isinstance(meta.get("key"), dict) else {}
        diffs = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        raise TrigactError(f"adaptive result {path} was made by a different request (differs in: "
                           f"{', '.join(diffs) or 'its key'}); delete it or use another output root, it is never overwritten")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        print(f"stale adaptive result, computing again: {path / DATA_FILE} does not match its sha256 (corrupt)")
        return None
    try:
        tensors = safetensors.torch.load(data)
        masks = {attack: tensors[f"attack/{attack}"].bool() for attack in meta["attacks"]}
        return StoredResult(tensors["clean"].bool(), masks, dict(meta.get("report") or {}), path, reused=True)
    except (KeyError, TypeError, ValueError, safetensors.SafetensorError) as err:
        print(f"stale adaptive result, computing again: {path} is malformed ({type(err).__name__}: {err})")
        return None


def save_result(path: Path, key: Mapping, result: StoredResult) -> Path:
    """Write a result atomically, data first and ``meta.json`` last (the caller holds the lock)."""
    tensors = {"clean": result.clean.to(torch.uint8).contiguous()}
    tensors.update({f"attack/{a}": m.to(torch.uint8).contiguous() for a, m in result.masks.items()})
    data = safetensors.torch.save(tensors)
    stale = path / META_FILE  # a stale or corrupt result is replaced whole: its meta goes first
    stale.unlink(missing_ok=True)
    atomic_write_bytes(data, path / DATA_FILE)
    n = len(result.clean)
    atomic_write_json({
        "key": dict(key), "sha256": hashlib.sha256(data).hexdigest(), "attacks": list(result.masks),
        "clean_acc": result.clean.float().mean().item() if n else 0.0,
        "accuracy": {a: m.float().mean().item() for a, m in result.masks.items()},
        "report": _jsonable(result.report), "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, path / META_FILE)
    result.path = path
    return path


def stored(root, key: Mapping | None, compute) -> StoredResult:
    """The result for ``key`` from ``root`` if one is complete, else ``compute()`` (a :class:`StoredResult`),
    written there. No ``root`` or no ``key`` (a victim without identity): ``compute()``, not stored.
    Concurrent launches asking for one result: the first computes, the others wait and reuse it."""
    if root is None or key is None:
        return compute()
    path = result_dir(root, key)
    with folder_lock(path, LOCK_FILE, waiting=f"waiting for adaptive result {path}: another process is computing it",
                     failing=f"cannot store adaptive result {path}"):
        result = load_result(path, key)
        if result is not None:
            print(f"reusing adaptive result: {path}")
            return result
        result = compute()
        save_result(path, key, result)
        return result
