"""PGD adversarial training (Madry et al., ICLR 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks"): minimise ``CE(f(x_adv), y)`` where ``x_adv`` is an L_inf PGD attack on ``x``.

Inner maximisation: ``steps`` signed-gradient ascent steps of size ``step_size`` on the summed
cross-entropy, from a uniform random start in the eps-ball, each iterate projected onto the ball and
clamped to [0, 1]. CIFAR-10 settings (Madry et al.; Rice et al. 2020, locuslab/robust_overfitting):
eps 8/255, step 2/255, 10 steps. The outer step trains on the adversarial examples only.

Batch norm: the attack runs with the network in **eval mode** (running statistics read, not updated),
as in TRADES' and MART's reference code; Rice et al. attack in train mode, which also feeds the 10
intermediate iterates into the running statistics. With eval mode the running statistics are updated
exactly once per step, by the training forward on ``x_adv`` -- the inputs the model is trained on.
One training forward per step: no clean forward is spent, so only ``train/acc_adv`` is logged in
training (validation and test still log clean accuracy).
"""

from __future__ import annotations

import torch.nn.functional as F

from trigact.methods.adversarial import (
    AdversarialTrainingModule,
    check_eps,
    check_steps,
    eval_mode,
    linf_pgd,
    uniform_start,
)


class PGDATModule(AdversarialTrainingModule):
    method_name = "pgd_at"

    def __init__(self, *args, eps="8/255", step_size="2/255", steps: int = 10, random_start: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = check_eps(eps, "method.module.eps")
        self.step_size = check_eps(step_size, "method.module.step_size")
        self.steps = check_steps(steps, "method.module.steps")
        self.random_start = bool(random_start)

    def perturb(self, x, y):
        """The training adversarial examples: PGD on the cross-entropy, network in eval mode."""
        start = uniform_start(x, self.eps) if self.random_start else x
        with eval_mode(self.net):
            return linf_pgd(
                self.net, x, lambda logits: F.cross_entropy(logits, y, reduction="sum"),
                eps=self.eps, step_size=self.step_size, steps=self.steps, start=start,
            )

    def training_step(self, batch, batch_idx):
        x, y = batch
        x_adv = self.perturb(x, y)
        logits_adv = self.net(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        self._log_losses(loss=loss)
        self._log_accuracy("train", "adv", logits_adv, y)
        return loss
