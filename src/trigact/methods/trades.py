"""TRADES (Zhang et al., ICML 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy"), as in the reference code (github.com/yaodongyu/TRADES, ``trades.py``):

    loss = CE(f(x), y) + beta * KL(f(x) || f(x'))        (KL summed over classes, mean over the batch)

Inner maximisation of ``KL(f(x) || f(x'))`` over ``x'``: start ``x + 0.001 * N(0, 1)``, ``steps``
signed-gradient steps of ``step_size``, projection onto the eps-ball and [0, 1]. The reference's
CIFAR-10 settings: eps 0.031 (we write 8/255), step 0.007, 10 steps, beta 6. The clean
distribution ``f(x)`` is the attack's fixed target, computed once (the reference recomputes the same
value at every step). Like the reference, the attack runs in eval mode and the loss in train mode,
with separate forwards for ``x`` and ``x'`` (each normalised with its own batch statistics);
the gradient of the KL flows through both ``f(x)`` and ``f(x')``, as in the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from trigact.methods.adversarial import (
    AdversarialTrainingModule,
    check_eps,
    check_range,
    check_steps,
    eval_mode,
    gaussian_start,
    linf_pgd,
)


class TradesLoss(NamedTuple):
    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def trades_kl(logits_nat: torch.Tensor, logits_adv: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """``KL(softmax(logits_nat) || softmax(logits_adv))``: ``nn.KLDivLoss`` on (log p_adv, p_nat)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction=reduction)


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> TradesLoss:
    """TRADES' outer objective ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` (KL: batch mean)."""
    ce = F.cross_entropy(logits_nat, y)
    kl = trades_kl(logits_nat, logits_adv)
    return TradesLoss(ce + beta * kl, ce, kl)


def trades_perturb(forward, x: torch.Tensor, *, eps: float, step_size: float, steps: int) -> torch.Tensor:
    """TRADES' inner maximisation of ``KL(f(x) || f(x'))``; ``forward`` should be in eval mode."""
    with torch.no_grad():
        p_nat = F.softmax(forward(x), dim=1)

    def kl_to_clean(logits: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")

    return linf_pgd(forward, x, kl_to_clean, eps=eps, step_size=step_size, steps=steps,
                    start=gaussian_start(x, eps))


class TradesModule(AdversarialTrainingModule):
    method_name = "trades"

    def __init__(self, *args, eps="8/255", step_size=0.007, steps: int = 10, beta: float = 6.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = check_eps(eps, "method.module.eps")
        self.step_size = check_eps(step_size, "method.module.step_size")
        self.steps = check_steps(steps, "method.module.steps")
        self.beta = check_range(beta, "method.module.beta", 0.0)

    def perturb(self, x, y=None):
        with eval_mode(self.net):
            return trades_perturb(self.net, x, eps=self.eps, step_size=self.step_size, steps=self.steps)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x_adv = self.perturb(x)
        logits_nat = self.net(x)
        logits_adv = self.net(x_adv)
        out = trades_loss(logits_nat, logits_adv, y, self.beta)
        self._log_losses(loss=out.loss, ce=out.ce, kl=out.kl)
        self._log_accuracy("train", "clean", logits_nat, y)
        self._log_accuracy("train", "adv", logits_adv, y)
        return out.loss
