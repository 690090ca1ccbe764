"""``gaussian``: Gaussian filtering at standard deviation ``sigma`` (pixels), a classic input smoother.

Uses torchvision's batched ``gaussian_blur`` (reflect padding, so a constant image stays constant and
the total mass is nearly kept). Differentiable.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.functional import gaussian_blur

from trigact.defenses.base import Defense, check_float, check_images, check_int
from trigact.defenses.registry import register_defense
from trigact.common.errors import TrigactError


def kernel_size_for(sigma: float, height: int, width: int) -> int:
    """``2 * ceil(3 * sigma) + 1``, at most the largest odd size that fits the image.

    Three sigmas each side hold 99.7% of the Gaussian's mass, so a larger kernel changes nothing that
    matters. The kernel must be odd (centred) and its half-width smaller than the image, which reflect
    padding requires; on tiny images the kernel is truncated rather than failing.
    """
    size = 2 * math.ceil(3 * sigma) + 1
    fits = min(height, width)
    fits -= 1 - fits % 2  # largest odd number <= min(height, width)
    return max(1, min(size, fits))


@register_defense("gaussian")
class GaussianFilter(Defense):
    """Gaussian filter at sigma >= 0 (0: identity); kernel 2*ceil(3*sigma)+1 unless kernel_size is set."""

    def __init__(self, sigma: float = 1.0, kernel_size: int | None = None):
        sigma = check_float("gaussian", "sigma", sigma, 0.0)
        if kernel_size is not None:
            check_int("gaussian", "kernel_size", kernel_size, 1)
            if kernel_size % 2 == 0:
                raise TrigactError(f"defense 'gaussian': kernel_size={kernel_size} is even; allowed: odd integers >= 1")
        super().__init__(sigma=sigma, kernel_size=kernel_size)
        self.sigma = sigma
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images("gaussian", x)
        if self.sigma == 0:
            return x
        height, width = x.shape[-2:]
        size = kernel_size_for(self.sigma, height, width)
        if self.kernel_size is not None:
            size = min(self.kernel_size, size)
        if size == 1:
            return x
        return gaussian_blur(x, kernel_size=[size, size], sigma=[self.sigma, self.sigma])
