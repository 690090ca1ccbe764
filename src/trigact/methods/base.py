"""Shared LightningModule base: optimizer and scheduler from Hydra partials, accuracy metrics."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from trigact.triggers import Trigger


class ClassifierModule(L.LightningModule):
    """Owns the network (and, in subclasses, the trigger); subclasses define the training loss.

    ``optimizer`` and ``scheduler`` are factories (Hydra ``_partial_: true`` configs):
    ``optimizer(params)`` and ``scheduler(optimizer)``.
    """

    #: Whether this paradigm trains with a trigger; checked against the trigger config.
    uses_trigger = False

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., object] | None = None,
        num_classes: int | None = None,
        trigger: Trigger | None = None,
    ):
        super().__init__()
        self.net = net
        self.trigger = trigger
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_classes = int(num_classes if num_classes is not None else net.spec["num_classes"])
        # One metric object per (stage, input kind). Their states are counts (and sums, for the mean
        # below) that torchmetrics sums over the DDP ranks when Lightning computes them at epoch end,
        # so ranks may run different numbers of batches, and, since the eval loaders shard without
        # padding (trigact.data.base.EvalShardSampler), val/test accuracy equals one process's exactly.
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{kind}": MulticlassAccuracy(self.num_classes, average="micro")
                for stage in ("train", "val", "test")
                for kind in self.input_kinds()
            }
        )
        # Mean softmax probability of the true class on clean inputs: the accuracy of a guess
        # *drawn* from the model's output distribution. For a model with trigger activation it
        # should be ~1/C ("random guessing"), even where the argmax of a near-uniform output still
        # carries some label information (acc_clean above 1/C).
        self.clean_guess = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def input_kinds(self) -> tuple[str, ...]:
        """The inputs whose accuracy is tracked: clean only, or clean and triggered."""
        return ("clean",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deployed unit: ``f(clamp(x + tau, 0, 1))`` with a trigger, ``f(x)`` without."""
        return self.net(self.trigger(x) if self.trigger is not None else x)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _log_accuracy(self, stage: str, kind: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        metric = self.metrics[f"{stage}_{kind}"]
        metric(logits.detach(), y)
        self.log(f"{stage}/acc_{kind}", metric, on_step=False, on_epoch=True, prog_bar=stage != "train")

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        logits = self.net(x)
        self._log_accuracy(stage, "clean", logits, y)
        if self.trigger is not None:
            p_true = logits.softmax(dim=1).gather(1, y[:, None]).squeeze(1)
            self.clean_guess[stage].update(p_true)
            self.log(f"{stage}/guess_acc_clean", self.clean_guess[stage], on_step=False, on_epoch=True)
            self._log_accuracy(stage, "trigger", self.net(self.trigger(x)), y)

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)
