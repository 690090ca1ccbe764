"""Resuming a run: which checkpoint, opened safely (weights only) and verified (sha256, keys, finite
weights, the same model) before Lightning sees it."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from trigact.common.errors import TrigactError
from trigact.common.io import tree_sha256
from trigact.runs.bundle import nonfinite_tensors


def newest_checkpoint(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` (written at each epoch end), or a SLURM ``hpc_ckpt_N.ckpt``
    that Lightning saved into the run folder on a preemption signal, whichever is newer."""
    last = run_dir / "checkpoints" / "last.ckpt"
    candidates = [p for p in [last, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else last


# What Trainer.fit needs to resume (Lightning's dump_checkpoint writes all of them).
CHECKPOINT_KEYS = ("state_dict", "loops", "optimizer_states", "lr_schedulers", "callbacks", "epoch", "global_step")


CHECKPOINT_DIGEST = "trigact_sha256"  # tree_sha256 of all other entries, added by VerifiedCheckpointIO


def load_checkpoint(path) -> dict:
    """Open a Lightning checkpoint of a trigact run, safely and checked; a one-line error otherwise.

    - ``weights_only=True``: only tensors and plain values are unpickled, so a planted checkpoint
      cannot run code. Our own checkpoints need no allow-list: every method's, trigger's and
      callback's state is tensors, numbers, strings, lists and dicts (tests/test_resume.py loads one
      of each method).
    - Its sha256 (written by :class:`VerifiedCheckpointIO`) must match: a few garbled bytes would
      otherwise resume with silently wrong weights. Checkpoints from before the digest are accepted.
    - It must hold what resuming needs, and only finite weights.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:  # not corruption: the file asks to import and call something
            raise TrigactError(f"checkpoint {path} holds pickled objects that are not plain data ({refused.group(1)}); "
                               "refusing to load it, as it could run code; pass another ckpt_path") from None
        raise _unreadable(path, err) from None
    except Exception as err:  # noqa: BLE001 -- any failure to read it is the same user-facing problem
        raise _unreadable(path, err) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise TrigactError(f"checkpoint {path} holds no state_dict: not a Lightning checkpoint of a trigact run; "
                           "pass another ckpt_path")
    expected = checkpoint.pop(CHECKPOINT_DIGEST, None)
    if expected is not None and expected != tree_sha256(checkpoint):
        raise TrigactError(f"checkpoint {path} is corrupt: its contents do not match the sha256 saved in it; "
                           "pass another ckpt_path (e.g. an epochNNN.ckpt beside it)")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise TrigactError(f"checkpoint {path} cannot resume training: it has no {', '.join(missing)} "
                           "(saved with weights only?); pass another ckpt_path")
    bad = nonfinite_tensors(checkpoint["state_dict"])
    if bad:
        raise TrigactError(f"checkpoint {path} holds non-finite (NaN or inf) weights in {', '.join(bad[:3])}; "
                           "the run had diverged or the file is damaged; pass another ckpt_path")
    return checkpoint


def _unreadable(path, err) -> TrigactError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return TrigactError(f"checkpoint {path} is unreadable (corrupt or truncated: {first}); "
                        "pass another ckpt_path (e.g. an epochNNN.ckpt beside it)")


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files with our sha256 in them, opened only through :func:`load_checkpoint`,
    so that ``Trainer.fit(ckpt_path=...)`` reads a checkpoint as safely as our own check before it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint({**checkpoint, CHECKPOINT_DIGEST: tree_sha256(checkpoint)}, path, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path)


def resume_request(ckpt_path, run_dir: Path):
    """What to resume from: ``ckpt_path`` as given; for null, ``last`` if an earlier attempt of this
    (unfinished) run left a checkpoint in its folder.

    Decided from files that no rank writes before training starts, so every DDP rank decides the
    same: rank 0 rewrites status.json for the new attempt before the other ranks exist (Lightning's
    launcher starts them from Trainer.fit) or while they start (SLURM), so they cannot read the
    previous attempt's status there.
    """
    if ckpt_path is None and newest_checkpoint(run_dir).is_file():
        return "last"
    return ckpt_path


def resolve_checkpoint(ckpt_path, run_dir: Path, module: L.LightningModule | None = None) -> str | None:
    """Check the checkpoint to resume from before Lightning does, for a one-line error.

    ``last`` means the newest of ``<run_dir>/checkpoints/last.ckpt`` and SLURM ``hpc_ckpt_*.ckpt`` and starts from scratch when there is none
    yet (a first launch under a requeueing scheduler); an explicit path must exist. Either must pass
    :func:`load_checkpoint`, and with ``module`` its weights must fit that module (:func:`check_checkpoint_fits`).
    """
    if ckpt_path is None:
        return None
    path = newest_checkpoint(run_dir) if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        if ckpt_path == "last":
            print(f"no checkpoint at {path} yet: starting from scratch")
            return None
        raise TrigactError(f"ckpt_path={ckpt_path!r}: no such file (use a .ckpt path or ckpt_path=last)")
    checkpoint = load_checkpoint(path)
    if module is not None:
        check_checkpoint_fits(checkpoint, module, path)
    return str(path)


def check_checkpoint_fits(checkpoint, module: L.LightningModule, path) -> None:
    """Refuse a checkpoint whose ``state_dict`` keys or shapes differ from ``module``'s.

    Lightning would otherwise fail deep inside ``Trainer.fit`` with a state_dict-mismatch traceback.
    """
    saved = checkpoint["state_dict"]  # present: load_checkpoint checked it
    expected = module.state_dict()
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    resized = sorted(
        key for key in expected.keys() & saved.keys()
        if tuple(getattr(saved[key], "shape", ())) != tuple(expected[key].shape)
    )
    if not (missing or unexpected or resized):
        return
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", resized)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    raise TrigactError(
        f"checkpoint {path} was saved from a different model/config ({'; '.join(problems)}); "
        "resume with the model, data and trigger settings it was trained with, or pass another ckpt_path"
    )
