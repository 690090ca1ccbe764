"""``jpeg``: JPEG compression (Dziugaite et al. 2016; Guo et al. 2018) with torchvision's libjpeg codec.

Pixels are quantized to uint8 as a saved image would be, encoded at ``quality`` and decoded. Colour
images get libjpeg's default 4:2:0 chroma subsampling (as PIL's default save), so even quality 100
loses fine colour detail; grayscale images have no chroma. The codec runs on the CPU for every input device (torchvision's GPU JPEG path does not cover grayscale
everywhere); the result goes back to the input's device and dtype.

Not differentiable: the output carries no gradient. That is fine for transfer evaluation, where the
attacker crafts on an undefended surrogate; a white-box attack through JPEG would need BPDA, which is
not our concern here.
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from trigact.defenses.base import Defense, check_images, check_int
from trigact.defenses.registry import register_defense


@register_defense("jpeg")
class JPEGCompression(Defense):
    """JPEG compression at quality 1..100 (100: nearly lossless; low: strong smoothing)."""

    def __init__(self, quality: int = 75):
        check_int("jpeg", "quality", quality, 1, 100)
        super().__init__(quality=quality)
        self.quality = quality

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images("jpeg", x, channels=(1, 3))
        if x.shape[0] == 0:
            return x.detach().clone()
        pixels = (x.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()
        # Lists keep the batch in one call each; UNCHANGED decodes grayscale to 1 channel, RGB to 3.
        encoded = encode_jpeg(list(pixels), quality=self.quality)
        decoded = decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED)
        return torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255.0
