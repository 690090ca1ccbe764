"""L4, leaked weights without the trigger: estimate tau from the raw network f and labelled clean
images of the attacker's own (a split of the training data, never test images), and say how good
the estimate is.

The estimator here is the defender's own objective: ``min_tau' CE(f(clamp(x + tau', 0, 1)), y)``
over ``||tau'||_inf <= bound``, by signed gradient steps (as Algorithm 2 updates tau) from ``restarts``
uniform random starts, keeping the start with the lowest final loss. Nothing in a library does this
for an additive trigger (Neural Cleanse and USB invert mask-and-pattern or targeted triggers), so it
is hand-written; it is a few lines of PGD on a universal perturbation.

An estimate far from tau that still activates f (``f(x + tau')`` accurate) means the trigger is not a
secret key: any tau' that works is as good to the attacker as tau.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trigact.common.errors import TrigactError
from trigact.common.validate import check_int, parse_eps


@dataclass
class TriggerEstimate:
    tau: torch.Tensor       # the estimate, shaped like the true trigger
    loss: float             # its final mean cross-entropy on the attacker's images
    restart: int            # which start it came from


def _batches(x, y, batch_size):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def estimate_trigger(net: nn.Module, x: torch.Tensor, y: torch.Tensor, bound, steps: int = 50,
                     restarts: int = 3, step_size=None, batch_size: int = 256, seed: int = 0) -> TriggerEstimate:
    """The defender's-objective estimate of a trigger for the raw network ``net`` (``f``, no trigger).

    ``bound``: the L_inf box searched (e.g. the defender's eps_t, which an attacker who knows the paradigm
    may guess); ``step_size``: per signed step (default ``bound / 10``); each step uses the gradient
    summed over all of ``x`` (one full pass), as Algorithm 2 does."""
    bound = parse_eps(bound, "bound", allow_zero=False)
    steps, restarts = check_int(steps, "steps", 1), check_int(restarts, "restarts", 1)
    step_size = bound / 10 if step_size is None else parse_eps(step_size, "step_size", allow_zero=False)
    if len(x) == 0:
        raise TrigactError("trigger estimation needs labelled images; got none")
    net.eval()
    generator = torch.Generator().manual_seed(seed)
    best = None
    for restart in range(restarts):
        tau = ((torch.rand(x.shape[1:], generator=generator) * 2 - 1) * bound).to(x)
        for _ in range(steps):
            tau.requires_grad_(True)
            grad = torch.zeros_like(tau)
            for xb, yb in _batches(x, y, batch_size):
                loss = F.cross_entropy(net((xb + tau).clamp(0, 1)), yb, reduction="sum")
                grad += torch.autograd.grad(loss, tau)[0]
            tau = (tau.detach() - step_size * grad.sign()).clamp(-bound, bound)
        with torch.no_grad():
            loss = sum(F.cross_entropy(net((xb + tau).clamp(0, 1)), yb, reduction="sum").item()
                       for xb, yb in _batches(x, y, batch_size)) / len(x)
        if best is None or loss < best.loss:
            best = TriggerEstimate(tau.detach(), loss, restart)
    return best


@torch.no_grad()
def estimate_quality(net: nn.Module, tau: torch.Tensor, estimate: torch.Tensor, x: torch.Tensor,
                     y: torch.Tensor, batch_size: int = 256) -> dict:
    """How good an estimate is: sign agreement with tau (over the pixels where tau is not 0), cosine
    similarity, and the accuracy of ``f(clamp(x + estimate))`` next to ``f(clamp(x + tau))`` and ``f(x)``."""
    tau, estimate = tau.to(x), estimate.to(x)
    nonzero = tau != 0

    def acc(delta):
        right = sum(int((net((xb + delta).clamp(0, 1)).argmax(1) == yb).sum()) for xb, yb in _batches(x, y, batch_size))
        return right / len(x)

    return {
        "sign_agreement": (torch.sign(estimate)[nonzero] == torch.sign(tau)[nonzero]).float().mean().item()
        if nonzero.any() else None,
        "cosine": F.cosine_similarity(estimate.flatten(), tau.flatten(), dim=0).item(),
        "acc_estimate": acc(estimate),
        "acc_true_trigger": acc(tau),
        "acc_no_trigger": acc(torch.zeros_like(tau)),
    }


# ---------------------------------------------------------------- Neural Cleanse-style estimate


class StampedNet(nn.Module):
    """``f(stamp(x))``: the raw network behind a reversed mask-and-pattern trigger, the L4 attacker's
    stand-in for ``f_t`` when it estimates the trigger as Neural Cleanse would."""

    def __init__(self, net: nn.Module, stamp: nn.Module):
        super().__init__()
        self.net = net
        self.stamp = stamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.stamp(x))


def estimate_stamp(net: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0, **settings):
    """A Neural Cleanse-style estimate of the trigger: the mask and pattern (replace mode) that send
    each of the attacker's images to its own label, with NC's L1 penalty on the mask
    (:func:`trigact.detectors.invert_mask_pattern` with ``targets=y``). Returns the stamp and the share
    of ``x`` it sends to ``y``."""
    from trigact.backdoors import Stamp
    from trigact.detectors import invert_mask_pattern

    mask, pattern, success = invert_mask_pattern(net, x, y, seed=seed, **settings)
    return Stamp(mask, pattern, "replace"), success


@torch.no_grad()
def stamp_quality(net: nn.Module, tau: torch.Tensor, stamp: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  batch_size: int = 256) -> dict:
    """How good a stamp estimate is: the cosine between its mean perturbation ``mean(x' - x)`` and tau,
    the mask's L1 norm, and the accuracy of ``f(stamp(x))`` next to ``f(clamp(x + tau))`` and ``f(x)``."""
    tau = tau.to(x)
    stamp = stamp.to(x.device)

    def acc(view):
        right = sum(int((net(view(xb)).argmax(1) == yb).sum()) for xb, yb in _batches(x, y, batch_size))
        return right / len(x)

    delta = torch.cat([stamp(xb) - xb for xb, _ in _batches(x, y, batch_size)]).mean(0)
    return {
        "cosine": F.cosine_similarity(delta.flatten(), tau.flatten(), dim=0).item() if bool(tau.any()) else None,
        "mask_l1": float(stamp.mask.sum()),
        "acc_estimate": acc(stamp),
        "acc_true_trigger": acc(lambda xb: (xb + tau).clamp(0, 1)),
        "acc_no_trigger": acc(lambda xb: xb),
    }
