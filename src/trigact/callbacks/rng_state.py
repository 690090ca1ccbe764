"""Carry the global random state (torch, CUDA, numpy, Python) in checkpoints, for exact resume.

Lightning 2.x does not save it: a run resumed with ``ckpt_path`` starts from whatever
``seed_everything`` and model construction left, so dropout masks and in-process data augmentation
(``num_workers=0``) after the resume differ from an uninterrupted run's. This callback's
``state_dict`` is taken when a checkpoint is written (at the end of an epoch, with our
ModelCheckpoint settings) and restored in ``on_train_start`` of the resumed run: after the
sanity check (which Lightning already runs under ``isolate_rng``) and before the first batch, the
same point at which the uninterrupted run continues from that state.

Worker processes (``num_workers > 0``) seed their own generators from the train loader's
generator; :class:`trigact.data.base.TrigactDataModule` reseeds that from ``(seed, epoch)``.

Under DDP only rank 0's checkpoint is written, so every rank resumes with rank 0's state. That is
what they had anyway: ``seed_everything`` gives every rank the same seed, and every rank draws the
same number of random numbers per epoch (the DistributedSampler pads shards to equal length).
The states are stored as tensors and plain lists so that the checkpoint still loads with
``torch.load(weights_only=True)``, the only way trigact opens a checkpoint (``trigact.training.checkpoints.load_checkpoint``).
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def collect_rng_state() -> dict:
    """The global generators' states, in types a weights-only ``torch.load`` accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss"]))


class RNGStateCallback(L.Callback):
    """Saves the global RNG states in every checkpoint and restores them when training resumes."""

    def __init__(self):
        self.pending: dict | None = None  # loaded from a checkpoint, applied at on_train_start

    def state_dict(self) -> dict:
        return collect_rng_state()

    def load_state_dict(self, state_dict: dict) -> None:
        self.pending = state_dict

    def on_train_start(self, trainer, pl_module):
        if self.pending is not None:
            restore_rng_state(self.pending)
            self.pending = None
