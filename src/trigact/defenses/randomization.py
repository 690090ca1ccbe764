"""``randomization``: random resizing and padding, R&P (Xie et al., ICLR 2018, "Mitigating adversarial
effects through randomization").

For an H x W batch and factor ``scale`` = s, with S_h = floor(s * H) and S_w = floor(s * W):

1. resize (nearest neighbour, as in the original code) to a random size h' in [H, S_h] (width in
   proportion, within [W, S_w]);
2. zero-pad at a random offset to S_h x S_w;
3. resize (bilinear, antialiased) back to H x W.

Step 3 is our choice: the paper feeds the padded S x S image to the network. Our adaptive-pooling
victims would accept that too, but returning the native size keeps every victim (fixed-size heads,
triggers of shape (C, H, W) added after the defense) working unchanged.

Randomness: one draw of (h', top, left) per batch, as in common implementations (the whole batch shares
it), from the module's own seedable generator, so an evaluation is reproducible. ``scale`` 1 is the
identity. Differentiable almost everywhere (resizing and padding are linear).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trigact.defenses.base import SeededDefense, check_float, check_images
from trigact.defenses.registry import register_defense

# floor(s * H) in floating point: 1.15 * 100 is 114.99999999999999; the slack keeps it 115.
_FLOOR_SLACK = 1e-9


@register_defense("randomization")
class RandomResizePad(SeededDefense):
    """R&P: random resize to [H, floor(scale*H)], random zero-pad to floor(scale*H), resize back to H."""

    def __init__(self, scale: float = 1.1, seed: int = 0):
        scale = check_float("randomization", "scale", scale, 1.0, 4.0)
        super().__init__(seed=seed, scale=scale)
        self.scale = scale

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        return (
            math.floor(self.scale * height + _FLOOR_SLACK),
            math.floor(self.scale * width + _FLOOR_SLACK),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images("randomization", x)
        height, width = x.shape[-2:]
        out_h, out_w = self.padded_size(height, width)
        if (out_h, out_w) == (height, width):
            return x
        new_h = self.randint(height, out_h)
        new_w = min(out_w, max(width, round(new_h * width / height)))
        top = self.randint(0, out_h - new_h)
        left = self.randint(0, out_w - new_w)
        resized = F.interpolate(x, size=(new_h, new_w), mode="nearest")
        padded = F.pad(resized, (left, out_w - new_w - left, top, out_h - new_h - top), value=0.0)
        back = F.interpolate(padded, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        return back.clamp(0.0, 1.0)
