"""Backdoor triggers: a stamp ``x -> x'`` that a poisoned model maps to its target class.

A :class:`Stamp` holds a mask ``m`` (1, H, W) or (C, H, W) in [0, 1] and a pattern ``p`` (C, H, W):

- ``mode='replace'`` (BadNets, AdvTrojan's patch, and what Neural Cleanse inverts):
  ``x' = (1 - m) * x + m * p``;
- ``mode='add'`` (SIBA's sparse additive trigger): ``x' = clamp(x + m * p, 0, 1)``.

Builders:

- :func:`badnets_stamp`: a square patch of ``patch_size`` pixels at a corner (or a given row and
  column), filled with a ``white``, ``black`` or ``checkerboard`` pattern (Gu et al. 2017).
- :func:`siba_stamp`: SIBA's sparse invisible trigger (``../shared/seeds/004_...``): projected
  sign-gradient descent of ``CE(f_b(clamp(x + delta)), target)`` on a pretrained benign surrogate
  ``f_b``, each step followed by the top-k projection onto ``{||delta||_0 <= k, ||delta||_inf <= eps}``
  (:func:`trigact.triggers.project_sparse`, the same projection as ``trigger=sparse_learnable``).

Poisoning (:func:`poison_indices`, :class:`PoisonedDataset`) picks exactly ``round(rate * N)`` of the N
training images, all of a class other than the target, with its own seeded generator, stamps them and
relabels them to the target. Hand-written: BackdoorBench and similar collections are whole training
frameworks, not libraries one can import a poisoning step from, and none supports our datamodules.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trigact.common.errors import TrigactError, unknown_name
from trigact.common.validate import check_range, parse_eps
from trigact.triggers import project_sparse, resolve_k

MODES = ("replace", "add")
PATTERNS = ("white", "black", "checkerboard")
LOCATIONS = ("bottom_right", "bottom_left", "top_right", "top_left")


class Stamp(nn.Module):
    """``x -> (1 - m) x + m p`` (replace) or ``clamp(x + m p, 0, 1)`` (add), batched or not."""

    def __init__(self, mask: torch.Tensor, pattern: torch.Tensor, mode: str = "replace"):
        super().__init__()
        if mode not in MODES:
            raise unknown_name("stamp mode", mode, MODES)
        if pattern.dim() != 3 or mask.dim() != 3 or mask.shape[-2:] != pattern.shape[-2:] \
                or mask.shape[0] not in (1, pattern.shape[0]):
            raise TrigactError(f"stamp mask {tuple(mask.shape)} and pattern {tuple(pattern.shape)} must be "
                               "(1 or C, H, W) and (C, H, W)")
        self.register_buffer("mask", mask.detach().float().clone())
        self.register_buffer("pattern", pattern.detach().float().clone())
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.mask.to(x), self.pattern.to(x)
        if self.mode == "replace":
            return (1 - m) * x + m * p
        return (x + m * p).clamp(0.0, 1.0)

    def perturbation(self) -> torch.Tensor:
        """The stamp's additive part on a mid-grey image (add mode: ``m * p``; replace: ``m * (p - 0.5)``),
        for comparing a reversed trigger with the real one."""
        return self.mask * (self.pattern - (0.5 if self.mode == "replace" else 0.0))

    def to_meta(self) -> dict:
        return {"mode": self.mode, "mask": self.mask.detach().cpu().clone(), "pattern": self.pattern.detach().cpu().clone()}

    @classmethod
    def from_meta(cls, meta: dict) -> "Stamp":
        return cls(torch.as_tensor(meta["mask"]), torch.as_tensor(meta["pattern"]), meta.get("mode", "replace"))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, support={int((self.mask > 0).any(0).sum())} pixels"


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TrigactError(f"{name}={value!r} must be an integer in [{low}, {high}]")
    return value


def badnets_stamp(shape: Sequence[int], patch_size: int = 3, location="bottom_right", pattern: str = "checkerboard",
                  margin: int = 1) -> Stamp:
    """A square patch of ``patch_size`` pixels, ``margin`` pixels from the named corner, or with its
    top-left pixel at ``location=[row, col]``. ``checkerboard`` alternates 1 and 0 starting with 1."""
    c, h, w = (int(s) for s in shape)
    size = _check_int(patch_size, "backdoor.patch_size", 1, min(h, w))
    if pattern not in PATTERNS:
        raise unknown_name("backdoor.pattern", pattern, PATTERNS)
    if isinstance(location, str):
        if location not in LOCATIONS:
            raise unknown_name("backdoor.location", location, list(LOCATIONS) + ["[row, col]"])
        margin = _check_int(margin, "backdoor.margin", 0, min(h, w) - size)
        row = margin if location.startswith("top") else h - size - margin
        col = margin if location.endswith("left") else w - size - margin
    else:
        try:
            row, col = (int(v) for v in location)
        except (TypeError, ValueError):
            raise TrigactError(f"backdoor.location={location!r} must be one of {', '.join(LOCATIONS)} or [row, col]") from None
        if not (0 <= row <= h - size and 0 <= col <= w - size):
            raise TrigactError(f"backdoor.location={list(location)!r}: a {size}-pixel patch must fit in the "
                               f"{h}x{w} image (row in [0, {h - size}], col in [0, {w - size}])")
    mask = torch.zeros(1, h, w)
    mask[:, row:row + size, col:col + size] = 1.0
    if pattern == "white":
        fill = torch.ones(size, size)
    elif pattern == "black":
        fill = torch.zeros(size, size)
    else:
        fill = ((torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 == 0).float()
    pat = torch.zeros(c, h, w)
    pat[:, row:row + size, col:col + size] = fill
    return Stamp(mask, pat, "replace")


def siba_stamp(surrogate: nn.Module, images: torch.Tensor, target: int, k, eps, steps: int = 100,
               step_size=None, batch_size: int = 256, seed: int = 0) -> Stamp:
    """SIBA's trigger: ``steps`` signed steps of ``step_size`` (default ``eps / 10``) descending
    ``CE(f_b(clamp(x + delta, 0, 1)), target)`` summed over ``images`` (the surrogate's eval mode),
    each followed by the top-k projection (ties broken by the gradient). Starts from a seeded
    ``U(-eps, eps)`` draw, projected. Deterministic for a given surrogate, images and seed."""
    eps = parse_eps(eps, "backdoor.eps", allow_zero=False)
    step = eps / 10 if step_size is None else parse_eps(step_size, "backdoor.step_size", allow_zero=False)
    steps = _check_int(steps, "backdoor.steps", 1, 100_000)
    shape = tuple(images.shape[1:])
    k = resolve_k(k, int(np.prod(shape)), "backdoor.k")
    gen = torch.Generator().manual_seed(int(seed))
    device = next(surrogate.parameters()).device
    delta = project_sparse((2 * torch.rand(shape, generator=gen) - 1) * eps, k, eps).to(device)
    was_training = surrogate.training
    surrogate.eval()
    try:
        for _ in range(steps):
            grad = torch.zeros_like(delta)
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(device)
                d = delta.detach().requires_grad_(True)
                logits = surrogate((x + d).clamp(0.0, 1.0))
                loss = F.cross_entropy(logits, torch.full((len(x),), int(target), device=device), reduction="sum")
                grad += torch.autograd.grad(loss, d)[0]
            delta = project_sparse(delta - step * grad.sign(), k, eps, tiebreak=grad)
    finally:
        surrogate.train(was_training)
    delta = delta.cpu()
    mask = (delta != 0).float()
    return Stamp(mask, delta, "add")


def check_target(target, num_classes: int) -> int:
    return _check_int(target, "backdoor.target", 0, num_classes - 1)


def check_poison_rate(rate) -> float:
    return check_range(rate, "backdoor.poison_rate", 0.0, 1.0, low_open=True)


def poison_indices(labels: torch.Tensor, target: int, rate: float, seed: int) -> torch.Tensor:
    """Exactly ``round(rate * N)`` indices of images whose label is not ``target``, drawn without
    replacement by a generator of their own (``seed``), sorted."""
    labels = torch.as_tensor(labels)
    n = round(rate * len(labels))
    candidates = torch.nonzero(labels != target).flatten()
    if n > len(candidates):
        raise TrigactError(f"backdoor.poison_rate={rate} asks for {n} poisoned images, but only {len(candidates)} "
                           f"of the {len(labels)} training images are not of the target class {target}")
    if n == 0:
        raise TrigactError(f"backdoor.poison_rate={rate} poisons no image of the {len(labels)} training images")
    pick = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(int(seed)))[:n]
    return candidates[pick].sort().values


class PoisonedDataset(Dataset):
    """``base`` with the images at ``indices`` stamped (after ``base``'s own transform, so after any
    augmentation: the trigger is never cropped or flipped away) and relabelled to ``target``."""

    def __init__(self, base: Dataset, indices: torch.Tensor, stamp: Stamp, target: int):
        self.base = base
        self.poisoned = set(int(i) for i in indices)
        self.indices = torch.as_tensor(indices)
        self.stamp = stamp
        self.target = int(target)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        if int(index) in self.poisoned:
            target = torch.as_tensor(self.target, dtype=label.dtype) if isinstance(label, torch.Tensor) else self.target
            with torch.no_grad():
                return self.stamp(image), target
        return image, label
