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


# ---------------------------------------------------------------- USB-style universal estimate


@dataclass
class UniversalEstimate:
    tau: torch.Tensor       # the universal perturbation, shaped like one image, inside the L_inf box
    loss: float             # its mean cross-entropy on the attacker's images
    accuracy: float         # the share of the attacker's images f(clamp(x + tau')) gets right
    passes: int             # passes over the attacker's images (Alg. 4.1's outer loop)


def estimate_universal(net: nn.Module, x: torch.Tensor, y: torch.Tensor, bound, target_accuracy: float = 0.9,
                       max_passes: int = 5, deepfool_steps: int = 50, overshoot: float = 0.02,
                       batch_size: int = 256, seed: int = 0) -> UniversalEstimate:
    """A USB-style estimate of the trigger (Xu's dissertation, ``../shared/seeds/002_...``, Ch. 4, Alg. 4.1;
    the universal adversarial perturbation of Moosavi-Dezfooli et al. 2017 it builds on): one
    perturbation ``v`` for all images, grown image by image until ``f(clamp(x + v))`` is right on a share
    ``target_accuracy`` of the attacker's images, or ``max_passes`` passes.

    USB looks for a perturbation that sends every image to a *target* class; here each image's target is
    its own label (the trigger makes f right): in each pass, in a seeded random order, every image
    ``x_i`` that ``f(x_i + v)`` gets wrong adds the minimal L2 step ``r`` that makes it right (targeted
    DeepFool, :func:`trigact.detectors.usb.targeted_deepfool`, the step USB's line 6 takes), and
    ``v = clip(v + r, -bound, bound)`` (line 7's projection, in the L_inf box an attacker who knows the
    paradigm guesses from eps_t). USB's refinement into a mask and pattern (Alg. 4.2) serves detection
    (small masks); the attacker needs the additive perturbation, so it stops here.

    Unlike :func:`estimate_trigger` (signed steps on the loss summed over all images) it is driven by
    the images f still gets wrong, one at a time, and by minimal L2 steps: a different search of the
    same box. The loop over images is sequential by construction (each step sees the ``v`` the previous
    ones left)."""
    from trigact.detectors.common import check_count, check_fraction, check_nonnegative, frozen
    from trigact.detectors.usb import targeted_deepfool

    bound = parse_eps(bound, "universal.bound", allow_zero=False)
    target_accuracy = check_fraction(target_accuracy, "universal.target_accuracy")
    max_passes = check_count(max_passes, "universal.max_passes")
    deepfool_steps = check_count(deepfool_steps, "universal.deepfool_steps")
    overshoot = check_nonnegative(overshoot, "universal.overshoot")
    if len(x) == 0:
        raise TrigactError("trigger estimation needs labelled images; got none")

    def measure(v):
        with torch.no_grad():
            right, loss = 0, 0.0
            for xb, yb in _batches(x, y, batch_size):
                logits = net((xb + v).clamp(0, 1))
                right += int((logits.argmax(1) == yb).sum())
                loss += F.cross_entropy(logits, yb, reduction="sum").item()
        return right / len(x), loss / len(x)

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).tolist()
    v = torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device)
    with frozen(net):
        accuracy, loss = measure(v)
        passes = 0
        while accuracy < target_accuracy and passes < max_passes:
            passes += 1
            for i in order:
                r, _ = targeted_deepfool(net, x[i : i + 1] + v, y[i : i + 1], max_iter=deepfool_steps,
                                         overshoot=overshoot)
                v = (v + r[0]).clamp(-bound, bound)  # r is 0 where f(x_i + v) is already right
            accuracy, loss = measure(v)
    return UniversalEstimate(v.detach(), loss, accuracy, passes)
