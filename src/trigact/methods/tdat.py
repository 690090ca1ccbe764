"""Taxonomy driven fast adversarial training, TDAT (Tong, Jiang, Gui and Cao, AAAI 2024,
"Taxonomy Driven Fast Adversarial Training", arXiv:2408.03944v1).

Followed: the official code, github.com/bookman233/TDAT, ``TDAT.py`` (eps 8/255, step 8/255, batch
momentum 0.75, relaxation beta 0.6, gamma floors 0.15 / 0.15, and lambda 0.6: the argparse default is
0.65, but the README's CIFAR-10 command and the published CIFAR-10 training log,
``TDAT/CIFAR10/train_log.txt``, use 0.6), and the paper's abstract. Single-step (FGSM-like)
adversarial training with three changes against catastrophic overfitting. Per training step, all in train mode (as the reference: the attack's
forward is reused by the loss):

1. **Batch-momentum initialisation.** The attack starts from a perturbation ``m`` carried across
   batches (one per position in the batch), initialised to ``clamp(step * sign(U(-eps, eps)), -eps, eps)``
   and updated after each step as ``m <- clamp(mu * m + (1 - mu) * delta, -eps, eps)`` with
   ``mu = batch_momentum`` and ``delta`` this batch's final perturbation. (The reference code then
   overwrites ``m`` with ``delta``, which makes ``mu`` a no-op; we follow the method as its name and
   hyperparameter describe it.) The start ``x + m`` is clamped to [0, 1] (the reference feeds it
   unclamped).
2. **Dynamic label relaxation.** ``gamma = tan(1 - epoch / epochs) * relax_beta``, floored at
   ``inner_gamma_min`` (when it falls below, the outer gamma becomes ``outer_gamma_min``).
   Inner loss: cross-entropy against the relaxed label (``gamma`` on the true class, ``(1 - gamma) /
   (C - 1)`` on each other); one signed step of ``step_size`` from ``x + m``, projected onto the
   eps-ball and [0, 1]. Outer loss: ``CE(f(x_adv), y)`` with ``label_smoothing = 1 - gamma``.
3. **Taxonomy-driven regulariser**::

       loss = CE_ls(f(x_adv), y) + lambda * mean_i ||f(x_i + m_i) - f(x_adv_i)||^2 * tanh(1 - p_y(x_i + m_i))

   logits distance between the attack's start and end points, weighted by how badly the start
   point is classified (gradients flow through both forwards and the weight, as in the reference).

Cost: two forwards (the start point's is reused by the regulariser), one input-only gradient and
one backward: the same as FGSM-RS training plus nothing.

Also differs from the reference: incomplete batches (the last of an epoch) are trained on, using the
first rows of ``m`` (the reference skips them); the relaxation factor is capped at 1 (the reference
defaults never exceed tan(1) * 0.6 = 0.93); ``m`` is saved in Lightning checkpoints (resume-exact on
one device; under DDP each rank carries its own ``m`` and only rank 0's is saved, so after a resume
every rank restarts from rank 0's).
Could not determine (only the abstract of the paper was available to us, not its equations): whether
the paper's regulariser compares the start point or the clean input (the code: the start point).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trigact.common.errors import TrigactError
from trigact.methods.adversarial import (
    AdversarialTrainingModule,
    check_eps,
    check_range,
    project_linf,
)

CHECKPOINT_KEY = "tdat_batch_momentum"


def relaxed_labels(y: torch.Tensor, gamma: float, num_classes: int) -> torch.Tensor:
    """``gamma`` on the true class and ``(1 - gamma) / (C - 1)`` on every other class."""
    one_hot = F.one_hot(y, num_classes).to(torch.float32)
    return one_hot * gamma + (1.0 - one_hot) * (1.0 - gamma) / (num_classes - 1)


def relaxation_factors(epoch: int, epochs: int, beta: float, inner_min: float, outer_min: float) -> tuple[float, float]:
    """(inner, outer) gamma at 0-based ``epoch`` of ``epochs``: ``tan(1 - epoch / epochs) * beta``, floored."""
    gamma = min(1.0, math.tan(1.0 - epoch / epochs) * beta)
    if gamma < inner_min:
        return inner_min, outer_min
    return gamma, gamma


def taxonomy_regulariser(logits_start: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean_i ||z_start - z_adv||^2 * tanh(1 - p_y(start))`` (the reference's 1.0000001 keeps tanh > 0)."""
    p_true = F.softmax(logits_start, dim=1).gather(1, y[:, None]).squeeze(1)
    distance = (logits_start - logits_adv).square().sum(dim=1)
    return (distance * torch.tanh(1.0000001 - p_true)).mean()


class TDATModule(AdversarialTrainingModule):
    method_name = "tdat"

    def __init__(
        self,
        *args,
        eps="8/255",
        step_size="8/255",
        batch_momentum: float = 0.75,
        relax_beta: float = 0.6,
        inner_gamma_min: float = 0.15,
        outer_gamma_min: float = 0.15,
        reg_weight: float = 0.6,
        epochs: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.eps = check_eps(eps, "method.module.eps")
        self.step_size = check_eps(step_size, "method.module.step_size")
        self.batch_momentum = check_range(batch_momentum, "method.module.batch_momentum", 0.0, 1.0)
        self.relax_beta = check_range(relax_beta, "method.module.relax_beta", 0.0)
        self.inner_gamma_min = check_range(inner_gamma_min, "method.module.inner_gamma_min", 0.0, 1.0)
        self.outer_gamma_min = check_range(outer_gamma_min, "method.module.outer_gamma_min", 0.0, 1.0)
        self.reg_weight = check_range(reg_weight, "method.module.reg_weight", 0.0)
        if self.num_classes < 2:
            raise TrigactError(f"method=tdat needs at least 2 classes, got num_classes={self.num_classes}")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise TrigactError(f"method.module.epochs={epochs!r} must be an integer >= 1 (or null: trainer.max_epochs)")
        self.epochs = epochs
        # The batch-momentum perturbation m, (batch, C, H, W); created at the first step.
        self.momentum: torch.Tensor | None = None

    # --- state --------------------------------------------------------------------------------------

    def total_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        max_epochs = self._trainer.max_epochs if self._trainer is not None else None
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise TrigactError(
                f"method=tdat schedules label relaxation over the run, but trainer.max_epochs={max_epochs!r}; "
                "set trainer.max_epochs or method.module.epochs to an integer >= 1"
            )
        return max_epochs

    def momentum_for(self, x: torch.Tensor) -> torch.Tensor:
        """The first ``len(x)`` rows of m, (re)initialised as the reference does where missing."""
        m = self.momentum
        if m is None or m.shape[1:] != x.shape[1:]:
            m = x.new_empty((0, *x.shape[1:]))
        m = m.to(device=x.device, dtype=x.dtype)  # e.g. restored from a checkpoint on the CPU
        if m.shape[0] < x.shape[0]:
            fresh = torch.empty((x.shape[0] - m.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            fresh = (self.step_size * fresh.uniform_(-self.eps, self.eps).sign()).clamp(-self.eps, self.eps)
            m = torch.cat([m, fresh])
        self.momentum = m
        return m[: x.shape[0]]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = None if self.momentum is None else self.momentum.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.momentum = checkpoint.get(CHECKPOINT_KEY)

    # --- training -----------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        x, y = batch
        b = x.shape[0]
        inner_gamma, outer_gamma = relaxation_factors(
            self.current_epoch, self.total_epochs(), self.relax_beta, self.inner_gamma_min, self.outer_gamma_min
        )
        m = self.momentum_for(x)
        x_start = (x + m).clamp(0.0, 1.0).requires_grad_(True)
        logits_start = self.net(x_start)
        inner = F.cross_entropy(logits_start, relaxed_labels(y, inner_gamma, self.num_classes))
        # Input gradient only; the graph is kept because the regulariser reuses logits_start.
        (grad,) = torch.autograd.grad(inner, [x_start], retain_graph=True)
        x_adv = project_linf(x_start.detach() + self.step_size * grad.sign(), x, self.eps)
        with torch.no_grad():
            delta = x_adv - x
            self.momentum[:b] = (self.batch_momentum * m + (1.0 - self.batch_momentum) * delta).clamp(-self.eps, self.eps)

        logits_adv = self.net(x_adv)
        ce = F.cross_entropy(logits_adv, y, label_smoothing=1.0 - outer_gamma)
        reg = taxonomy_regulariser(logits_start, logits_adv, y)
        loss = ce + self.reg_weight * reg
        self._log_losses(loss=loss, ce=ce, reg=reg, inner=inner)
        self.log("train/gamma", inner_gamma, on_step=False, on_epoch=True, sync_dist=True)
        self._log_accuracy("train", "adv", logits_adv, y)
        return loss
