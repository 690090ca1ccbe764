"""Shared by the training benchmarks: wall time per epoch of a Lightning fit, warm-up epoch dropped.

Not a benchmark itself; ``train_cost.py`` and ``defense_cost.py`` import it (``python benchmarks/x.py``
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import lightning as L
import torch


class EpochTimer(L.Callback):
    """Time per epoch, from epoch start to the end of every on_train_epoch_end hook before it."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        sync(pl_module.device)
        self._start = self.clock()

    def on_train_epoch_end(self, trainer, pl_module):
        sync(pl_module.device)  # CUDA runs asynchronously: the epoch ends when its kernels have
        self.times.append(self.clock() - self._start)


def sync(device) -> None:
    """Wait for ``device``'s queued kernels (a no-op on the CPU), so a clock reading means work done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fit_epoch_times(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    epochs: int,
    callbacks: Sequence[L.Callback] = (),
    clock: Callable[[], float] = time.perf_counter,
    limit_train_batches: float | None = None,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> list[float]:
    """Fit ``module`` for ``epochs`` epochs (no validation, logging or checkpoints) and return the time of
    every epoch but the first, a warm-up. ``limit_train_batches``: as Lightning's (None: every batch);
    ``accelerator`` / ``precision``: as Lightning's (``gpu``, ``bf16-mixed``)."""
    timer = EpochTimer(clock)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        limit_train_batches=limit_train_batches,
        callbacks=[*callbacks, timer],  # the timer's epoch end runs after e.g. the trigger update
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.times[1:]  # drop the warm-up epoch
