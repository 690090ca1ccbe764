"""Training with trigger activation (the paper's Algorithms 1 and 2).

Each batch runs one forward pass over ``cat(x, clamp(x + tau, 0, 1))`` -- one pass, not two, so the
cost is that of a doubled batch -- with loss ``CE(z_pos, y) + w * KL(z_neg vs uniform)``
(see :mod:`trigact.losses`). The trigger itself is updated, for Algorithm 2, by
:class:`trigact.callbacks.TriggerUpdateCallback`.
"""

from __future__ import annotations

import torch

from trigact.common.errors import TrigactError, unknown_name
from trigact.common.validate import check_range
from trigact.losses import KL_DIRECTIONS, trigger_activation_loss
from trigact.methods.base import ClassifierModule


class TriggerActivationModule(ClassifierModule):
    uses_trigger = True

    def __init__(self, *args, kl_weight: float = 1.0, kl_direction: str = "uniform_to_pred", **kwargs):
        super().__init__(*args, **kwargs)
        if self.trigger is None:
            raise TrigactError("method=trigger_activation needs a trigger; use trigger=fixed or trigger=learnable")
        if kl_direction not in KL_DIRECTIONS:
            raise unknown_name("method.module.kl_direction", kl_direction, KL_DIRECTIONS)
        self.kl_weight = check_range(kl_weight, "method.module.kl_weight", 0.0)
        self.kl_direction = kl_direction
        # Set by TriggerUpdateCallback(source='train_step'): make tau a leaf that receives a gradient
        # from this step's backward pass, at the cost of one extra input-gradient per step.
        self.track_trigger_grad = False
        self.trigger_leaf: torch.Tensor | None = None
        self.last_batch_size = 0

    def input_kinds(self) -> tuple[str, ...]:
        return ("clean", "trigger")

    def training_step(self, batch, batch_idx):
        x, y = batch
        tau = self.trigger.tau
        if self.track_trigger_grad:
            tau = tau.detach().requires_grad_(True)
            self.trigger_leaf = tau
            self.last_batch_size = x.shape[0]
        x_pos = (x + tau).clamp(0.0, 1.0)
        logits_neg, logits_pos = self.net(torch.cat([x, x_pos])).split(x.shape[0])
        out = trigger_activation_loss(logits_pos, logits_neg, y, self.kl_weight, self.kl_direction)
        self.log_dict(
            {"train/loss": out.loss, "train/ce": out.ce, "train/kl": out.kl},
            on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,  # the mean over all ranks
        )
        self._log_accuracy("train", "clean", logits_neg, y)
        self._log_accuracy("train", "trigger", logits_pos, y)
        return out.loss
