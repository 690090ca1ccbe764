"""L2T (Zhu et al., CVPR 2024, "Learning to Transform Dynamically for Better Adversarial Transferability").

Why a subclass: torchattack 1.7.2's L2T fails on any machine without CUDA ("Found no NVIDIA driver").
The cause is not the attack loop but two of its 100 candidate augmentations in
``torchattack.l2t.AUG_OPS``:

- ``SSM.__call__`` (ops 71-79, spectrum simulation) calls ``.cuda()`` unconditionally on its noise,
  DCT and mask, and draws the noise with a hard-coded ImageNet shape ``(B, 3, 224, 224)``. So it
  fails on the CPU, and on any other image shape even on a GPU.
- ``Crop.__call__`` (ops 81-89) resizes its crops to a hard-coded ``(224, 224)``: any other input
  size comes out 224x224, which fixed-size networks reject (and which is 200x the work on 16x16 digits).
- ``BlockShuffle.get_length`` (ops 31-40, up to 12 strips) rounds random strip lengths and pushes the
  rounding error onto the longest strip, which goes negative when the side is short relative to the
  strip count (e.g. 12 strips over 16 pixels): ``split_with_sizes`` then raises at random.

The op is drawn at random each step, so the failure is intermittent-looking but certain over 20 steps.
Rather than patching torchattack's module globals (shared by everyone importing it), this subclass
keeps its own copy of the op list with those two ops replaced by shape- and device-agnostic versions,
and repeats ``L2T.forward`` with that list (``RWAugSearch`` reads the global list, so the loop itself
must be ours). Everything else (the 100 ops in the same order, the REINFORCE-style update of the op
logits, momentum) is torchattack's. ``ops_num`` (2) and ``aug_lr`` (0.01), hard-coded there, are
parameters here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.functional as tvf
from torchattack.attack import register_attack
from torchattack.l2t import AUG_OPS, L2T, SSM, BlockShuffle, Crop, select_op, trace_prob


class DeviceAgnosticSSM(SSM):
    """SSM on the input's own device and shape (torchattack's calls ``.cuda()`` and assumes 3x224x224)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        copies = []
        for _ in range(self.num_spectrum):
            gauss = torch.randn_like(x) * self.epsilon
            x_dct = self.dct_2d(x + gauss)
            mask = torch.rand_like(x) * 2 * self.rho + 1 - self.rho
            copies.append(self.idct_2d(x_dct * mask))
        return torch.cat(copies)


class InputSizeCrop(Crop):
    """Centre crops resized back to the input's size (torchattack's resize to 224x224)."""

    def crop(self, x: torch.Tensor, ratio: float) -> torch.Tensor:
        height, width = x.shape[-2:]
        crop_h, crop_w = max(1, int(height * ratio)), max(1, int(width * ratio))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return tvf.resized_crop(
            x, top, left, crop_h, crop_w, [height, width], antialias=False
        )


class NonNegativeBlockShuffle(BlockShuffle):
    """Strip lengths that are never negative: floor, then hand the remainder to the largest fractions."""

    def get_length(self, length: int) -> tuple[int, ...]:
        rand = np.random.uniform(size=self.num_block)
        share = rand / rand.sum() * length
        lengths = np.floor(share).astype(np.int64)
        remainder = length - int(lengths.sum())
        lengths[np.argsort(share - lengths)[::-1][:remainder]] += 1
        return tuple(int(n) for n in lengths)


def _portable(op):
    if isinstance(op, SSM):
        return DeviceAgnosticSSM(op.rho, op.num_spectrum)
    if isinstance(op, Crop):
        return InputSizeCrop(op.ratio, op.num_scale)
    if isinstance(op, BlockShuffle):
        return NonNegativeBlockShuffle(op.num_block, op.num_scale)
    return op


# Same 100 ops, same indices: the learnt op logits mean the same thing as in torchattack.
PORTABLE_AUG_OPS = [_portable(op) for op in AUG_OPS]


@register_attack("TrigactL2T")
class PortableL2T(L2T):
    """torchattack's L2T with CPU- and shape-safe augmentations (see the module docstring)."""

    def __init__(self, *args, ops_num: int = 2, aug_lr: float = 0.01, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ops_num = ops_num
        self.aug_lr = aug_lr
        self.aug_ops = PORTABLE_AUG_OPS

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = torch.zeros_like(x)
        delta = torch.zeros_like(x, requires_grad=True)
        aug_params = torch.zeros(len(self.aug_ops), requires_grad=True, device=x.device)
        alpha = self.eps / self.steps if self.alpha is None else self.alpha

        for _ in range(self.steps):
            aug_probs, losses = [], []
            for _ in range(self.num_scale):
                ops_indices = select_op(aug_params, self.ops_num)
                aug_probs.append(trace_prob(aug_params, ops_indices))
                x_aug = x + delta
                for idx in ops_indices:
                    x_aug = self.aug_ops[idx](x_aug)
                outs = self.model(self.normalize(x_aug))
                # Ops return stacked copies of the batch (rotations, scales, ...): repeat labels to match.
                num_copies = math.floor((len(outs) + 0.01) / len(y))
                loss = self.lossfn(outs, y.repeat(num_copies))
                losses.append(-loss if self.targeted else loss)

            loss = torch.stack(losses).mean()
            grad = torch.autograd.grad(loss, delta)[0]

            # Gradient ascent on the op logits, weighted by the loss each sampled op pair reached.
            aug_loss = (torch.stack(aug_probs) * torch.stack(losses)).mean()
            aug_grad = torch.autograd.grad(aug_loss, aug_params)[0]
            with torch.no_grad():
                aug_params += self.aug_lr * aug_grad
                g = self.decay * g + grad / torch.mean(
                    torch.abs(grad), dim=(1, 2, 3), keepdim=True
                ).clamp_min(1e-12)
                delta += alpha * g.sign()
                delta.clamp_(-self.eps, self.eps)
                delta.copy_(torch.clamp(x + delta, self.clip_min, self.clip_max) - x)

        return (x + delta).detach()
