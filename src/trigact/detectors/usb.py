"""USB, "Universal Soldier for Backdoor detection" (Xu, Ersoy, Tajalli, Picek, DSN-W 2024; Chapter 4 of
Xu's dissertation, ``../shared/seeds/002_132b18050dbd3a8b.txt``): a targeted universal adversarial
perturbation (UAP) per class (Alg. 4.1), refined into a mask and a pattern (Alg. 4.2), then NC's MAD
test on the refined masks' L1 norms (Sec. 4.3.4, "Detection").

Alg. 4.1 (targeted UAP), for each class t: ``v = 0``; while the targeted fooling rate of ``X + v`` (the
fraction of X's images not of class t that ``f`` sends to t) is below ``e``, go through X in order and,
for each ``x_i`` with ``f(x_i + v) != t``, find the minimal L2 ``r`` with ``f(x_i + v + r) = t`` by
targeted DeepFool (line 6) and set ``v = P(v + r)``, the projection onto ``||v||_p <= delta`` (line 7,
as in Moosavi-Dezfooli et al.'s UAP [229]). The printed loop condition reads ``Error(X + v) >= e``; the
text of Sec. 4.3.3 wants the rate to *reach* e, which is what runs here. The loop has no bound in the
dissertation; ``uap_max_passes`` (ours, 5) caps it.

Alg. 4.2 (refinement), for each class t: mask ``m = 1`` and pattern ``p = v`` (line 1, "trigger =
pattern x mask = v"), then ``iterations`` Adam steps (lr 0.1, betas (0.5, 0.9)) on
``CE(f(x'), t) - SSIM(x, x') + l1_weight * ||m||_1`` (Eq. 4.1), each on the next batch of X in order,
mask and pattern clipped back to their ranges after each step.

Where the dissertation is silent or inconsistent, what runs here and why:

- ``delta`` is 10 (Sec. 4.4.1) with ``uap_norm="2"`` in the model's own pixel units ([0, 1]): the norm
  is not named; L2 is the norm Alg. 4.1 line 6 minimises. [229] pairs 10 with L-inf on [0, 255]
  pixels (10/255 here: ``uap_norm="inf", uap_delta=10/255``); on 16x16 digits that UAP fools almost
  no image in 5 passes, so Alg. 4.1 never ends and the refinement starts from nearly nothing.
- ``composition="add"``, ``x' = clamp(x + m p, 0, 1)``: the reading under which the chapter's own
  statements hold (line 1 "pattern x mask = v", Sec. 4.3.4 "the first x' equals x + v", the output
  "updated UAP v' = pattern x mask"). Line 4 prints ``x' = x (1 - m) + p m`` (``composition="replace"``),
  under which the first ``x'`` is ``p`` itself, not ``x + v``; ``p`` then starts at ``clamp(v, 0, 1)``.
  On digits the replace reading also flagged a class of a clean model in 2 of 4 runs (LeNet and
  the small CNN, 100 and 300 steps of 32 images) where add flagged none.
- ``l1_weight`` is 1e-3: Eq. 4.1 prints the L1 term without a weight, but with weight 1 the gradient
  of ``||m||_1`` (1 per pixel) outweighs the cross-entropy's: on digits most classes' refined triggers
  then fool under a third of the images (under 5% on the small CNN), so the norms no longer compare
  working triggers, and the BadNets target was not flagged (index 1.9). Sec. 4.4.1 defers unmentioned
  hyperparameters to TrojanZoo, whose Neural Cleanse weights the mask norm by ``init_cost = 1e-3``;
  that weight is used, fixed (no schedule). ``l1_weight=1.0`` gives Eq. 4.1 as printed.
- ``batch_size`` 16 (not given): 500 steps of 16 images keep the stated iteration count within ~20 s
  for ten classes of 16x16 digits on one CPU core.

SSIM is torchmetrics' (Gaussian 11x11 window, sigma 1.5, data range 1). Targeted DeepFool is
hand-written: torchattacks' ``DeepFool`` and torchattack's only push an image off its own class
(untargeted); Alg. 4.1 needs the minimal step onto a given class's side of the boundary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from trigact.common.devices import model_device
from trigact.common.errors import TrigactError
from trigact.detectors.common import (
    DetectionResult,
    anomaly_index,
    check_classes,
    check_count,
    check_data,
    check_fraction,
    check_mode,
    check_nonnegative,
    check_positive,
    check_seed_value,
    check_threshold,
    frozen,
    generator,
)


def targeted_deepfool(model: nn.Module, x: torch.Tensor, targets, *, max_iter: int = 50,
                      overshoot: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepFool (Moosavi-Dezfooli et al., CVPR 2016) towards given classes: for each image, linearise the
    gap ``z_k - z_t`` between its current class k and its target t and step by the minimal L2 solution,
    ``r = (|z_k - z_t| + 1e-4) / ||grad(z_t - z_k)||^2 * grad(z_t - z_k)``, until the model says t or
    ``max_iter`` steps; the total is scaled by ``1 + overshoot`` (DeepFool's 50 steps and 0.02). The
    model sees ``clamp(x + r, 0, 1)``. Returns the perturbations (on ``x``'s device) and which images
    reached their target. The model runs frozen (eval mode, no parameter gradients), then is restored."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=x.device).expand(len(x))
    check_count(max_iter, "deepfool_steps")
    overshoot = check_nonnegative(overshoot, "overshoot")
    with frozen(model):
        return _deepfool(model, x, targets, max_iter, overshoot)


def _deepfool(model, x, targets, max_iter, overshoot):
    total = torch.zeros_like(x)
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    rows = torch.arange(len(x), device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for step in range(max_iter + 1):
        point = (x + (1 + overshoot) * total).requires_grad_(True)
        logits = model(point.clamp(0.0, 1.0))  # the clamp passes no gradient to saturated pixels
        pred = logits.argmax(1)
        done = done | (pred == targets)
        if bool(done.all()) or step == max_iter:
            break
        gap = logits[rows, pred] - logits[rows, targets]  # >= 0 where not done
        (grad,) = torch.autograd.grad((-gap).sum(), point)  # d(z_t - z_k)/dx, image by image
        norm2 = grad.flatten(1).pow(2).sum(1).clamp_min(1e-12)
        r = ((gap.detach().abs() + 1e-4) / norm2).view(shape) * grad
        total = total + r * (~done).view(shape)
    return ((1 + overshoot) * total).detach(), done


def _project(v: torch.Tensor, norm: str, delta: float) -> torch.Tensor:
    """Onto ``||v||_p <= delta`` per row: clip (L-inf) or rescale (L2), as UAP's ``proj_lp``."""
    if norm == "inf":
        return v.clamp(-delta, delta)
    length = v.flatten(1).norm(dim=1).clamp_min(1e-12)
    return v * (delta / length).clamp(max=1.0).view(-1, *[1] * (v.dim() - 1))


@torch.no_grad()
def _fooling_rates(model, images, valid, targets, v, batch_size=512) -> torch.Tensor:
    """(K,) fraction of each class's valid images that ``clamp(x + v_k)`` sends to ``t_k``."""
    device = model_device(model)
    rates = []
    for k in range(len(v)):
        hits = 0
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            pred = model((x + v[k]).clamp(0.0, 1.0)).argmax(1).cpu()
            hits += int(((pred == targets[k]) & valid[k, start:start + batch_size]).sum())
        rates.append(hits / max(int(valid[k].sum()), 1))
    return torch.tensor(rates)


def targeted_uap(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], *,
                 error_rate: float = 0.6, norm: str = "2", delta: float = 10.0, max_passes: int = 5,
                 deepfool_steps: int = 50, overshoot: float = 0.02) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Alg. 4.1 for every class of ``classes`` at once (each class keeps its own ``v`` and loop; they
    only share the forward passes). Returns ``v`` (K, C, H, W), the final fooling rates (K,) and the
    passes run. ``model`` frozen by the caller."""
    device = model_device(model)
    targets = torch.tensor(list(classes), dtype=torch.long)
    valid = labels[None, :] != targets[:, None]  # class t is measured and built on images not of class t
    v = torch.zeros(len(targets), *images.shape[1:], device=device)
    rates = _fooling_rates(model, images, valid, targets, v)
    passes = 0
    while passes < max_passes and bool((rates < error_rate).any()):
        passes += 1
        open_ = rates < error_rate
        for i in range(len(images)):
            ks = torch.nonzero(open_ & valid[:, i]).flatten()
            if len(ks) == 0:
                continue
            x = images[i:i + 1].to(device) + v[ks]
            r, _ = _deepfool(model, x, targets[ks].to(device), deepfool_steps, overshoot)
            # r is 0 where f(x_i + v) is already t: Alg. 4.1 line 4 skips those images.
            v[ks] = _project(v[ks] + r, norm, delta)
        rates = _fooling_rates(model, images, valid, targets, v)
    return v.cpu(), rates, passes


def _ssim_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torchmetrics' SSIM of each pair of images (B,), computed as one image of B*C channels.

    The same numbers as ``reduction="none"`` on (B, C, H, W): torchmetrics filters each channel on its
    own and an image's SSIM is the mean of its map. The layout matters for speed only: with few channels
    and many images, torch's CPU backward of the Gaussian filter is a slow dense path (0.4 s for 320
    one-channel 16x16 images, against 0.01 s as a depthwise filter over 320 channels)."""
    _, full = ssim(a.reshape(1, -1, *a.shape[2:]), b.reshape(1, -1, *b.shape[2:]), data_range=1.0,
                   return_full_image=True)
    return full.reshape(a.shape[0], -1).mean(1)


def _stamp(x, mask, pattern, composition):
    """x (B, C, H, W), mask (K, 1, H, W), pattern (K, C, H, W) -> (K, B, C, H, W)."""
    m, p = mask[:, None], pattern[:, None]
    if composition == "replace":
        return (1 - m) * x[None] + m * p
    return (x[None] + m * p).clamp(0.0, 1.0)


def refine_uap(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], v: torch.Tensor,
               *, iterations: int = 500, lr: float = 0.1, batch_size: int = 16, composition: str = "add",
               l1_weight: float = 1e-3, ssim_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 4.2 for every class at once: per class ``CE(f(x'), t) - SSIM(x, x') + ||m||_1`` over the
    batch's images not of class t; one Adam over all classes' masks and patterns is one Adam per class
    (Adam is elementwise and the classes' losses share no variable). Returns masks (K, 1, H, W) and
    patterns (K, C, H, W) on the CPU. ``model`` frozen by the caller."""
    device = model_device(model)
    k, (h, w) = len(classes), images.shape[2:]
    targets = torch.tensor(list(classes), dtype=torch.long, device=device)
    low = 0.0 if composition == "replace" else -1.0
    mask = torch.ones(k, 1, h, w, device=device).requires_grad_(True)
    pattern = v.to(device).clamp(low, 1.0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mask, pattern], lr=lr, betas=(0.5, 0.9))
    n, start = len(images), 0
    for _ in range(iterations):
        idx = torch.arange(start, start + min(batch_size, n)) % n  # the next images of X, in order
        start = int(idx[-1]) + 1
        x, y = images[idx].to(device), labels[idx].to(device)
        valid = (y[None, :] != targets[:, None]).float()  # (K, B)
        stamped = _stamp(x, mask, pattern, composition)  # (K, B, C, H, W)
        logits = model(stamped.flatten(0, 1))
        ce = F.cross_entropy(logits, targets.repeat_interleave(len(x)), reduction="none").view(k, -1)
        sim = _ssim_per_image(stamped.flatten(0, 1), x.repeat(k, 1, 1, 1)).view(k, -1)
        count = valid.sum(1).clamp_min(1.0)
        loss = ((ce - ssim_weight * sim) * valid).sum(1) / count + l1_weight * mask.abs().flatten(1).sum(1)
        mask.grad, pattern.grad = torch.autograd.grad(loss.sum(), [mask, pattern])
        optimizer.step()
        with torch.no_grad():
            mask.clamp_(0.0, 1.0)
            pattern.clamp_(low, 1.0)
    return mask.detach().cpu(), pattern.detach().cpu()


@torch.no_grad()
def _stamped_success(model, images, labels, classes, masks, patterns, composition, batch_size=256) -> torch.Tensor:
    device = model_device(model)
    rates = []
    for row, t in enumerate(classes):
        keep = labels != t
        x_all, hits = images[keep], 0
        m, p = masks[row:row + 1].to(device), patterns[row:row + 1].to(device)
        for start in range(0, len(x_all), batch_size):
            x = x_all[start:start + batch_size].to(device)
            hits += int((model(_stamp(x, m, p, composition)[0]).argmax(1) == t).sum())
        rates.append(hits / max(len(x_all), 1))
    return torch.tensor(rates)


def _check_norm(norm) -> str:
    value = str(norm).lower().replace("l", "") if norm is not None else ""
    if value in ("inf", "infinity") or norm == math.inf:
        return "inf"
    if value == "2":
        return "2"
    raise TrigactError(f"uap_norm={norm!r} is not a supported norm; allowed: inf, 2")


def usb(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
        classes: Sequence[int] | None = None, num_images: int = 300, error_rate: float = 0.6, uap_norm="2",
        uap_delta: float = 10.0, uap_max_passes: int = 5, deepfool_steps: int = 50, overshoot: float = 0.02,
        iterations: int = 500, lr: float = 0.1, batch_size: int = 16, composition: str = "add",
        l1_weight: float = 1e-3, threshold: float = 2.0, seed: int = 0) -> DetectionResult:
    """USB on ``model`` (any module mapping [0, 1] images (N, C, H, W) to logits) with the defender's
    clean ``images`` and ``labels``: X is ``num_images`` of them (all if fewer), drawn with ``seed``;
    targeted UAPs (Alg. 4.1: ``error_rate`` e, ``uap_norm``/``uap_delta``, at most ``uap_max_passes``
    passes of targeted DeepFool with ``deepfool_steps`` and ``overshoot``), refined for ``iterations``
    steps (Alg. 4.2: Adam ``lr``, batches of ``batch_size``, ``composition``); then the MAD test with
    ``threshold`` on the refined masks' L1 norms. Class t is built and scored on X's images not of class t.

    Defaults are the dissertation's (Sec. 4.4.1): e 0.6, |X| 300, delta 10, m 500 iterations, lr 0.1,
    Adam betas (0.5, 0.9); DeepFool's own 50 steps and 0.02 overshoot. Chosen here where it is silent or
    inconsistent (reasons in the module docstring): ``uap_norm`` "2", ``composition`` "add",
    ``l1_weight`` 1e-3, ``batch_size`` 16, ``uap_max_passes`` 5. About 20 s for ten classes of 16x16
    digits with 200 images on one CPU core.
    """
    images, labels, num_classes = check_data(images, labels, num_classes)
    picked = check_classes(classes, num_classes)
    settings = dict(
        num_images=check_count(num_images, "num_images"),
        error_rate=check_fraction(error_rate, "error_rate"),
        uap_norm=_check_norm(uap_norm),
        uap_delta=check_positive(uap_delta, "uap_delta"),
        uap_max_passes=check_count(uap_max_passes, "uap_max_passes", 0),
        deepfool_steps=check_count(deepfool_steps, "deepfool_steps"),
        overshoot=check_nonnegative(overshoot, "overshoot"),
        iterations=check_count(iterations, "iterations", 0),
        lr=check_positive(lr, "lr"),
        batch_size=check_count(batch_size, "batch_size"),
        composition=check_mode(composition),
        l1_weight=check_positive(l1_weight, "l1_weight"),
    )
    threshold = check_threshold(threshold)
    seed = check_seed_value(seed)
    pick = torch.randperm(len(images), generator=generator(seed))[:settings["num_images"]]
    x, y = images[pick], labels[pick]
    for t in picked:
        if not bool((y != t).any()):
            raise TrigactError(f"class {t}: every image of X is of class {t}; USB needs images of other classes")
    started = time.perf_counter()
    with frozen(model):
        v, uap_rates, passes = targeted_uap(model, x, y, picked, error_rate=settings["error_rate"],
                                            norm=settings["uap_norm"], delta=settings["uap_delta"],
                                            max_passes=settings["uap_max_passes"],
                                            deepfool_steps=settings["deepfool_steps"], overshoot=settings["overshoot"])
        uap_seconds = time.perf_counter() - started
        masks, patterns = refine_uap(model, x, y, picked, v, iterations=settings["iterations"], lr=settings["lr"],
                                     batch_size=settings["batch_size"], composition=settings["composition"],
                                     l1_weight=settings["l1_weight"])
        success = _stamped_success(model, x, y, picked, masks, patterns, settings["composition"])
    l1 = masks.flatten(1).sum(1)
    index, flagged_rows, model_index = anomaly_index(l1, threshold)
    return DetectionResult(
        detector="usb",
        masks=masks,
        patterns=patterns,
        l1=l1,
        attack_success=success,
        anomaly_index=index,
        flagged=[picked[i] for i in flagged_rows],
        model_anomaly_index=model_index,
        threshold=threshold,
        settings=dict(settings, threshold=threshold, seed=seed, classes=picked, images_used=len(x),
                      adam_betas=(0.5, 0.9), uap_passes=passes, uap_fooling_rate=[round(float(r), 4) for r in uap_rates],
                      uap_l2=[round(float(n), 4) for n in v.flatten(1).norm(dim=1)],
                      uap_seconds=round(uap_seconds, 2), seconds=round(time.perf_counter() - started, 2)),
        classes=picked,
        mode=settings["composition"],
    )
