"""What every trigger-inversion detector shares: its result, the MAD outlier test, argument checks, and
running a model frozen (eval mode, no parameter gradients) without changing it.

The outlier test is Neural Cleanse's (Wang et al., S&P 2019, Sec. IV-C and ``mad_outlier_detection.py``
of its reference code): with ``l1_t`` the L1 norm of class t's reversed mask,
``a_t = |l1_t - median(l1)| / (1.4826 * median(|l1 - median(l1)|))``; a class is flagged when its norm is
on the small side of the median and ``a_t > threshold`` (2.0: a ~95% one-sided bound for a normal
distribution). USB (Xu's dissertation, Ch. 4) uses the same test on its refined masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from trigact.common.errors import TrigactError
from trigact.common.validate import check_int, check_range, check_seed

# The consistency constant that makes the MAD estimate a normal distribution's standard deviation.
MAD_CONSISTENCY = 1.4826
MODES = ("replace", "add")


@dataclass
class DetectionResult:
    """Reversed triggers of the examined classes (one row each, in ``classes`` order) and the outlier test.

    ``mode`` says how a row's mask ``m`` and pattern ``p`` stamp an image: ``replace``,
    ``x' = (1 - m) x + m p`` (Neural Cleanse, and USB's Alg. 4.2 line 4), or ``add``,
    ``x' = clamp(x + m p, 0, 1)``, the same two modes as :class:`trigact.backdoors.Stamp`.
    """

    detector: str                 # "neural_cleanse" | "usb"
    masks: torch.Tensor           # (K, 1, H, W) reversed masks, one per examined class
    patterns: torch.Tensor        # (K, C, H, W)
    l1: torch.Tensor              # (K,) mask L1 norms
    attack_success: torch.Tensor  # (K,) fraction of the non-class-t images the reversed trigger sends to t
    anomaly_index: torch.Tensor   # (K,)
    flagged: list[int]            # class ids flagged (small side, index > threshold), smallest norm first
    model_anomaly_index: float    # the index of the smallest-norm class
    threshold: float
    settings: dict                # every setting used, for the table
    classes: list[int] = field(default_factory=list)  # the class id of each row (all classes: 0..K-1)
    mode: str = "replace"

    def __post_init__(self) -> None:
        if not self.classes:
            self.classes = list(range(len(self.l1)))

    def row(self, t: int) -> int:
        """The row of class ``t``."""
        if t not in self.classes:
            raise TrigactError(f"class {t!r} was not examined; examined classes: {self.classes}")
        return self.classes.index(t)

    def perturbation(self, t: int) -> torch.Tensor:
        """Class ``t``'s effective additive perturbation on a mid-grey image: ``m * (p - 0.5)`` (replace)
        or ``m * p`` (add), as :meth:`trigact.backdoors.Stamp.perturbation`, for comparing with a real trigger."""
        i = self.row(t)
        shift = 0.5 if self.mode == "replace" else 0.0
        return self.masks[i] * (self.patterns[i] - shift)

    def stamp(self, t: int):
        """Class ``t``'s reversed trigger as a :class:`trigact.backdoors.Stamp`."""
        from trigact.backdoors import Stamp

        i = self.row(t)
        return Stamp(self.masks[i], self.patterns[i], self.mode)

    @property
    def is_backdoored(self) -> bool:
        return bool(self.flagged)


def anomaly_index(l1: torch.Tensor, threshold: float = 2.0) -> tuple[torch.Tensor, list[int], float]:
    """NC's MAD test on per-class mask norms: ``(index per class, flagged rows, model index)``.

    The median is the interpolated one (``numpy.median``, what NC's code uses), not torch's lower median.
    ``flagged`` lists rows with ``l1 < median`` and index above ``threshold``, smallest norm first; the
    model index is the index of the smallest-norm row. When MAD is 0 (at least half the norms are equal)
    a norm equal to the median gets index 0 and any other norm an infinite index.
    """
    threshold = check_threshold(threshold)
    l1 = torch.as_tensor(l1, dtype=torch.float64).detach().cpu().flatten()
    if l1.numel() == 0:
        raise TrigactError("anomaly_index needs at least one norm, got an empty tensor")
    if not torch.isfinite(l1).all():
        raise TrigactError(f"anomaly_index: mask norms must be finite, got {l1.tolist()}")
    median = torch.quantile(l1, 0.5)
    deviation = (l1 - median).abs()
    mad = MAD_CONSISTENCY * torch.quantile(deviation, 0.5)
    if mad > 0:
        index = deviation / mad
    else:
        index = torch.where(deviation > 0, torch.full_like(deviation, math.inf), torch.zeros_like(deviation))
    small = l1 < median
    flagged = [int(i) for i in torch.nonzero(small & (index > threshold)).flatten()]
    flagged.sort(key=lambda i: float(l1[i]))
    model_index = float(index[int(torch.argmin(l1))])
    return index.float(), flagged, model_index


# --- argument checks: one line naming the value and what is allowed -------------------------------------

def check_threshold(threshold) -> float:
    value = check_range(threshold, "threshold", 0.0, low_open=True)
    return value


def check_positive(value, name: str) -> float:
    return check_range(value, name, 0.0, low_open=True)


def check_nonnegative(value, name: str) -> float:
    return check_range(value, name, 0.0)


def check_fraction(value, name: str) -> float:
    """A number in (0, 1]: success thresholds, error rates."""
    return check_range(value, name, 0.0, 1.0, low_open=True)


def check_count(value, name: str, minimum: int = 1) -> int:
    return check_int(value, name, minimum)


def check_data(images, labels, num_classes) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``images`` (N, C, H, W) in [0, 1] with N >= 1, ``labels`` (N,) integers in [0, num_classes)."""
    num_classes = check_int(num_classes, "num_classes", 2)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise TrigactError(f"images must be a tensor of shape (N, C, H, W), got {shape}")
    if images.shape[0] == 0:
        raise TrigactError("images is empty (N=0); the detector needs at least one clean image")
    if not images.is_floating_point():
        raise TrigactError(f"images must be floating point pixels in [0, 1], got dtype {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if not (0.0 <= low and high <= 1.0):
        raise TrigactError(f"images must be pixels in [0, 1], got values in [{low:g}, {high:g}]")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise TrigactError(f"labels must have shape ({images.shape[0]},) to match images {tuple(images.shape)}, "
                           f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TrigactError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise TrigactError(f"labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), got values in "
                           f"[{int(labels.min())}, {int(labels.max())}]")
    return images, labels.long(), num_classes


def check_targets(images, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (N, C, H, W) in [0, 1] and per-image target labels (N,) >= 0."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise TrigactError(f"images must be a non-empty tensor of shape (N, C, H, W), got {shape}")
    targets = torch.as_tensor(targets)
    if targets.dim() == 0:
        targets = targets.expand(images.shape[0])
    if targets.dim() != 1 or targets.shape[0] != images.shape[0]:
        raise TrigactError(f"targets must be one label or shape ({images.shape[0]},) to match images "
                           f"{tuple(images.shape)}, got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.dtype == torch.bool or int(targets.min()) < 0:
        raise TrigactError(f"targets must be non-negative integer class ids, got {targets.dtype} "
                           f"with minimum {targets.min().item()}")
    low, high = float(images.min()), float(images.max())
    if not (0.0 <= low and high <= 1.0):
        raise TrigactError(f"images must be pixels in [0, 1], got values in [{low:g}, {high:g}]")
    return images, targets.long()


def check_classes(classes: Sequence[int] | None, num_classes: int) -> list[int]:
    """``None`` (every class) or distinct class ids in [0, num_classes)."""
    if classes is None:
        return list(range(num_classes))
    try:
        picked = list(classes)
    except TypeError:
        raise TrigactError(f"classes={classes!r} must be None or a list of class ids in [0, {num_classes - 1}]") from None
    if not picked:
        raise TrigactError(f"classes={classes!r} is empty; give None (all) or class ids in [0, {num_classes - 1}]")
    for c in picked:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
            raise TrigactError(f"classes: {c!r} is not a class id in [0, {num_classes - 1}]")
    if len(set(picked)) != len(picked):
        raise TrigactError(f"classes={picked!r} repeats a class id")
    return picked


def check_seed_value(seed) -> int:
    return check_seed(seed, "seed")


def check_mode(mode) -> str:
    if mode not in MODES:
        raise TrigactError(f"mode={mode!r} is not a stamp mode; allowed: {', '.join(MODES)}")
    return mode


# --- running the model without changing it ----------------------------------------------------------------

@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with every parameter's ``requires_grad`` off; both restored, module by
    module and parameter by parameter, on exit (also on error). Gradients then flow only to the tensors
    the detector optimises (masks, patterns, perturbations), never into the model's ``.grad``."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def generator(seed: int) -> torch.Generator:
    """A CPU generator of the detector's own: draws happen on the CPU and are moved to the device, so a
    seed gives the same draws on any device and the global RNGs are left alone."""
    return torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels of ``images`` (on the model's device), on the CPU."""
    from trigact.common.devices import model_device

    device = model_device(model)
    out = [model(images[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)
