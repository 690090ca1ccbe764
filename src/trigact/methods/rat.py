"""Randomized adversarial training, TRADES form -- "TRADES (RAT)" (Jin, Yi, Wu, Mu and Huang, CVPR 2023,
"Randomized Adversarial Training via Taylor Expansion", arXiv:2303.10653).

Followed: the official code, github.com/Alexkael/Randomized-Adversarial-Training,
``TRADES_first_second/trades_first_second.py`` (``trades_loss``) and ``train_first_second.py``
(eps 8/255, step 2/255, 10 steps, beta 6, alpha 0.2); the AWP variant
``AWP_first_second/train_first_second.py`` builds the same loss. The idea: train weights ``w + u`` with
Gaussian ``u``, and replace the expectation over ``u`` of the loss by its Taylor expansion around
``w``, whose first- and second-order terms become extra loss terms. Per training step:

1. **Noised weights for the attack.** A copy of the network whose conv weights (every parameter of a
   conv layer; the reference selects parameters with ``'conv'`` in their name, i.e. the conv
   weights of its WideResNet) get ``u = noise_std * N(0, 1)``, ``noise_std = 1e-4`` (absolute, not
   relative to the weight's scale). ``u`` is drawn once per training step and held fixed through the
   inner steps. We evaluate the noised network with ``torch.func.functional_call`` instead of the
   reference's ``deepcopy`` -- same function, no copy of the module, and no gradient reaches ``w``.
2. **TRADES inner maximisation** on the noised network, in eval mode: ``KL(f(x) || f(x'))`` from
   ``x + 0.001 N(0, 1)``, 10 signed steps of 2/255, projected onto the 8/255 ball and [0, 1].
3. **Taylor terms** (train mode, deterministic weights ``w``). With ``g_nat`` and ``g_adv`` the
   gradients of ``CE(f(x), y)`` and ``CE(f(x'), y)`` w.r.t. the classifier head's weight, summed over
   its input features (one number per class): first-order terms ``|g|``, second-order terms ``g**2``
   (the reference's comment: a Hadamard product in place of the Kronecker product; the code cites the
   paper's Ineq. (8) and Appendix D). Each gap ``t`` (e.g. ``|g_nat| - |g_adv|``) becomes a
   class-to-class target matrix: ``v = t - min(t)``; row ``c`` is ``v`` with ``v[c] := 0``, scaled to
   sum ``1 - m``, and ``m`` on the diagonal, where ``m = true_class_mass`` (the reference: 0.2 for
   10 classes, 0.02 for 100, i.e. ``2 / C``; that is our default). The targets are constants.
4. **Loss** (all KLs ``nn.KLDivLoss`` summed / batch size, i.e. ``batchmean``)::

       (1 - alpha) * CE(f(x), y) + beta * KL(f(x) || f(x'))
       + alpha * 0.5 * [KL(T1[y] || f(x')) + KL(T1'[y] || f(x))]
       + 0.5 * alpha * 0.5 * [KL(T2'[y] || f(x')) + KL(T2'[y] || f(x))]

   with ``T1 = targets(|g_nat| - |g_adv|)``, ``T1' = targets(|g_adv| - |g_nat|)`` and
   ``T2' = targets(g_adv**2 - g_nat**2)``. The reference uses ``T2'`` in *both* second-order terms
   (``yy1 = tl2_gap_[y]``; ``tl2_gap`` is computed but unused) -- probably a slip for ``T2`` in the
   first, but it is the code that produced the published numbers, so we keep it.

Cost: the attack's 10 forward/backward passes (input gradients only), then two training forwards
(the reference does eight, each also updating batch-norm statistics), two head-only gradients
(``torch.autograd.grad``: nothing is left in ``.grad``) and one backward.

Could not determine (the paper's text was not available to us, only its abstract and the code):
whether the paper samples the noise per step or per batch (the code: once per batch, only for the
attack) and whether ``noise_std`` is meant relative to the weights' magnitude (the code: absolute
1e-4); the derivation behind the soft targets of step 3 beyond the code's comments. Under DDP the
Taylor terms come from each rank's own batch (the reference ran on one GPU / ``DataParallel``, i.e.
over the whole batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from trigact.common.errors import TrigactError, unknown_name
from trigact.methods.adversarial import (
    AdversarialTrainingModule,
    check_eps,
    check_range,
    check_steps,
    eval_mode,
    last_linear,
)
from trigact.methods.trades import trades_kl, trades_perturb

NOISE_TARGETS = ("conv", "all")


def noised_parameter_names(net: nn.Module, target: str) -> list[str]:
    """Parameters that get weight noise: those of conv layers (the reference), or all of them."""
    if target == "all":
        return [name for name, _ in net.named_parameters()]
    names = [
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in net.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd)
        for param_name, _ in module.named_parameters(recurse=False)
    ]
    if not names:
        raise TrigactError(
            f"method.module.noise_target='conv' but {type(net).__name__} has no conv layer; "
            "use method.module.noise_target=all (or a conv net)"
        )
    return names


def noised_forward(net: nn.Module, names: list[str], std: float):
    """``x -> f_{w+u}(x)`` with ``u = std * N(0, 1)`` on ``names`` (drawn once, here), others ``w``.

    All weights are detached: the attack built on it never reaches ``w`` or its ``.grad``.
    """
    noised = set(names)
    params = {
        name: p.detach() + std * torch.randn_like(p) if name in noised else p.detach()
        for name, p in net.named_parameters()
    }
    return lambda x: functional_call(net, params, (x,))


def class_gradient_sums(loss: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """``d loss / d W_head`` summed over the head's input features: one value per class, a constant."""
    (grad,) = torch.autograd.grad(loss, [head_weight], retain_graph=True)
    return grad.sum(dim=1).detach()


def taylor_targets(gap: torch.Tensor, true_class_mass: float) -> torch.Tensor:
    """The reference's ``reg_gap``: a (C, C) matrix whose row ``c`` is the soft target for label ``c``.

    Off the diagonal, row ``c`` is ``gap - min(gap)`` (with entry ``c`` removed) scaled to sum
    ``1 - true_class_mass``; the diagonal is ``true_class_mass``. A row with nothing left off the
    diagonal (where the reference would divide by zero) spreads ``1 - true_class_mass`` uniformly.
    """
    num_classes = gap.numel()
    v = (gap - gap.min()).expand(num_classes, num_classes).clone()
    v.fill_diagonal_(0.0)
    sums = v.sum(dim=1, keepdim=True)
    uniform = torch.full_like(v, 1.0 / max(num_classes - 1, 1)).fill_diagonal_(0.0)
    rows = torch.where(sums > 0, v / sums.clamp_min(torch.finfo(v.dtype).tiny), uniform)
    return (rows * (1.0 - true_class_mass)).fill_diagonal_(true_class_mass)


def soft_kl(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``KL(targets || p)`` summed over classes, mean over the batch (``nn.KLDivLoss`` sum / B)."""
    return F.kl_div(log_probs, targets, reduction="batchmean")


class RATModule(AdversarialTrainingModule):
    method_name = "rat"

    def __init__(
        self,
        *args,
        eps="8/255",
        step_size="2/255",
        steps: int = 10,
        beta: float = 6.0,
        alpha: float = 0.2,
        noise_std: float = 1e-4,
        noise_target: str = "conv",
        true_class_mass: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.eps = check_eps(eps, "method.module.eps")
        self.step_size = check_eps(step_size, "method.module.step_size")
        self.steps = check_steps(steps, "method.module.steps")
        self.beta = check_range(beta, "method.module.beta", 0.0)
        self.alpha = check_range(alpha, "method.module.alpha", 0.0, 1.0)
        self.noise_std = check_range(noise_std, "method.module.noise_std", 0.0)
        if noise_target not in NOISE_TARGETS:
            raise unknown_name("method.module.noise_target", noise_target, NOISE_TARGETS)
        self.noise_target = noise_target
        self.noised_names = noised_parameter_names(self.net, noise_target)
        self.true_class_mass = (
            min(1.0, 2.0 / self.num_classes) if true_class_mass is None
            else check_range(true_class_mass, "method.module.true_class_mass", 0.0, 1.0)
        )
        last_linear(self.net)  # fail now, not at the first step, for a net without a linear head

    def perturb(self, x, y=None):
        """TRADES' attack on the network with noised conv weights (eval mode)."""
        with eval_mode(self.net):
            forward = noised_forward(self.net, self.noised_names, self.noise_std)
            return trades_perturb(forward, x, eps=self.eps, step_size=self.step_size, steps=self.steps)

    def rat_loss(self, logits_nat, logits_adv, y) -> dict[str, torch.Tensor]:
        """The reference's loss from the two training forwards (see the module docstring)."""
        ce_nat = F.cross_entropy(logits_nat, y)
        ce_adv = F.cross_entropy(logits_adv, y)
        head_weight = last_linear(self.net).weight
        g_nat = class_gradient_sums(ce_nat, head_weight)
        g_adv = class_gradient_sums(ce_adv, head_weight)
        m = self.true_class_mass
        t1 = taylor_targets(g_nat.abs() - g_adv.abs(), m)
        t1_rev = taylor_targets(g_adv.abs() - g_nat.abs(), m)
        t2_rev = taylor_targets(g_adv.square() - g_nat.square(), m)

        logp_nat = F.log_softmax(logits_nat, dim=1)
        logp_adv = F.log_softmax(logits_adv, dim=1)
        kl = trades_kl(logits_nat, logits_adv)
        first = 0.5 * (soft_kl(logp_adv, t1[y]) + soft_kl(logp_nat, t1_rev[y]))
        second = 0.5 * (soft_kl(logp_adv, t2_rev[y]) + soft_kl(logp_nat, t2_rev[y]))
        loss = (1 - self.alpha) * ce_nat + self.beta * kl + self.alpha * first + 0.5 * self.alpha * second
        return {"loss": loss, "ce": ce_nat, "kl": kl, "taylor1": first, "taylor2": second}

    def training_step(self, batch, batch_idx):
        x, y = batch
        x_adv = self.perturb(x)
        logits_nat = self.net(x)
        logits_adv = self.net(x_adv)
        out = self.rat_loss(logits_nat, logits_adv, y)
        self._log_losses(**out)
        self._log_accuracy("train", "clean", logits_nat, y)
        self._log_accuracy("train", "adv", logits_adv, y)
        return out["loss"]
