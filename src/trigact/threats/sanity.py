"""Evaluation sanity checks, as AutoAttack's flags and Carlini et al. 2019 ask of a defense claim.

A victim that fails one is flagged in the table, not silently reported:

- **zero gradients**: the input gradient of the cross-entropy on ``f_t`` is exactly zero on a share
  of the images above ``max_zero_share`` (a non-differentiable or saturated front end: gradient
  masking, so every gradient attack is blind there);
- **no convergence to zero**: at an unbounded-looking budget (``large_eps``, default 0.5, where any
  image can be pushed to any gray level) white-box PGD still leaves more than ``max_large_eps_acc``
  right: the attack, not the model, is failing;
- **white box weaker than black box**: the white-box (L6) worst case is above the query-only (L5) or
  transfer robust accuracy: a white-box attacker can always run the weaker attack, so the white-box
  figure is broken.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trigact.threats.adaptive import pgd_restarts


def zero_gradient_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The share of images whose input gradient of CE(model(x), y) is exactly zero."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (grad.flatten(1).abs().amax(1) == 0).float().mean().item()


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def large_eps_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.5, steps: int = 20) -> float:
    """Accuracy under PGD (one start) at a budget large enough to reach any image's class."""
    return _accuracy(model, pgd_restarts(model, eps, steps=steps, restarts=1)(x, y), y)


def sanity_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, whitebox_acc: float | None = None,
                 weaker_accs: Mapping[str, float] | None = None, max_zero_share: float = 0.05,
                 large_eps: float = 0.5, max_large_eps_acc: float = 0.1) -> dict:
    """``{"checks": {...measured...}, "flags": [one line per failed check]}`` for one victim.

    ``whitebox_acc``: its white-box robust accuracy (e.g. the L6 worst case); ``weaker_accs``: the
    robust accuracy under weaker attackers, ``{"L5 square_5000": 0.4, ...}``."""
    model.eval()
    zero = zero_gradient_share(model, x, y)
    large = large_eps_accuracy(model, x, y, eps=large_eps)
    checks = {"zero_gradient_share": zero, "large_eps": large_eps, "large_eps_accuracy": large}
    flags = []
    if zero > max_zero_share:
        flags.append(f"zero input gradient on {zero:.0%} of the images (> {max_zero_share:.0%}): gradient masking")
    if large > max_large_eps_acc:
        flags.append(f"{large:.0%} still right under PGD at eps {large_eps:g} (> {max_large_eps_acc:.0%}): "
                     "robust accuracy does not fall towards 0, the attack is failing")
    if whitebox_acc is not None:
        checks["whitebox_acc"] = whitebox_acc
        for name, acc in (weaker_accs or {}).items():
            if whitebox_acc > acc:
                flags.append(f"white-box accuracy {whitebox_acc:.1%} above {name} {acc:.1%}: the white-box "
                             "attack is weaker than a weaker attacker's")
    return {"checks": checks, "flags": flags}
