"""Standard training: cross-entropy on clean inputs. The surrogate set S and the 'no defense' victim."""

from __future__ import annotations

import torch.nn.functional as F

from trigact.common.errors import TrigactError
from trigact.methods.base import ClassifierModule


class StandardModule(ClassifierModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.trigger is not None:
            raise TrigactError(
                f"method=standard trains without a trigger, but trigger={self.trigger.kind!r}; use trigger=none"
            )

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self._log_accuracy("train", "clean", logits, y)
        return loss
