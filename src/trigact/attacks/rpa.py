"""RPA (Zhang et al., IJCAI 2022, "Enhancing the Transferability of Adversarial Examples with Random Patch").

RPA is FIA (Wang et al., ICCV 2021) with a different transformation for the aggregate gradient:

1. Feature importance. For N copies of x, each multiplied by a random patch-wise mask M_l,
   ``Delta = sum_l d softmax(f(x * M_l))[y] / d A(x * M_l)``, the gradient of the true class's
   probability with respect to the feature map A at the chosen layer; then ``Delta / ||Delta||_2``
   per image.
2. Attack. Minimise ``L(x') = sum(A(x') * Delta)`` with MI-FGSM updates (decay 1.0, L1-normalised
   gradients, step ``alpha = eps / steps``), projected to the eps-ball and [0, 1].

The mask M_l (our reading of the paper and its released TensorFlow code): the image is cut into
n x n patches, n cycling over (1, 3, 5, 7) across the N copies (copy l uses ``patch_sizes[l % 4]``).
Each patch, independently per channel, is modified with probability ``p_m = 0.3`` (kept, mask 1, with
probability 0.7); a modified patch's pixels are multiplied by independent U(0, 1) values ("random
patch" rather than FIA's zeroing, which ``fill='zero'`` gives). N = 60 in the paper.

Details we chose where the paper leaves room (documented so they can be revisited):
- The released code picks exactly ``round(0.3 * #patches)`` patches per copy, shared across the
  batch; we draw an independent Bernoulli(p_m) per image, channel and patch (same expectation,
  and images in a batch do not share masks, as they would not if attacked one at a time).
- Border patches that do not fit (H not a multiple of n) are partial patches here; the released
  code leaves that border unmasked.
- Gradients are of the softmax probability of the true class, as in FIA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchattack.attack import Attack, register_attack

from trigact.common.errors import TrigactError

FILLS = ("uniform", "zero")


def expand_patches(
    grid: torch.Tensor, patch_size: int, height: int, width: int
) -> torch.Tensor:
    """Blow a per-patch grid ``(..., ceil(H/n), ceil(W/n))`` up to pixels ``(..., H, W)``."""
    pixels = grid.repeat_interleave(patch_size, dim=-2).repeat_interleave(
        patch_size, dim=-1
    )
    return pixels[..., :height, :width]


def random_patch_mask(
    shape: Sequence[int],
    patch_size: int,
    p_modify: float = 0.3,
    fill: str = "uniform",
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A multiplicative RPA mask of ``shape`` ``(B, C, H, W)``.

    Each ``patch_size`` x ``patch_size`` patch of each image and channel is modified with
    probability ``p_modify``: its mask values are U(0, 1), drawn per pixel (``fill='uniform'``), or 0
    (``fill='zero'``). Unmodified patches have mask 1. Random draws, in order: the patch grid
    ``rand(B, C, ceil(H/n), ceil(W/n))`` (modified where ``< p_modify``), then for 'uniform' the pixel
    values ``rand(B, C, H, W)``.
    """
    if fill not in FILLS:
        raise TrigactError(f"fill={fill!r}; allowed: {', '.join(FILLS)}")
    if patch_size < 1:
        raise TrigactError(f"patch_size={patch_size} must be >= 1")
    batch, chans, height, width = shape
    grid_shape = (
        batch,
        chans,
        math.ceil(height / patch_size),
        math.ceil(width / patch_size),
    )
    modified = torch.rand(grid_shape, generator=generator, device=device) < p_modify
    modified = expand_patches(modified, patch_size, height, width)
    if fill == "zero":
        values = torch.zeros(shape, device=device, dtype=dtype)
    else:
        values = torch.rand(
            tuple(shape), generator=generator, device=device, dtype=dtype
        )
    return torch.where(modified, values, torch.ones((), device=device, dtype=dtype))


def aggregate_gradient(
    model: nn.Module,
    feature_module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask_chunks: Iterable[torch.Tensor],
    normalize: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    unit_norm: bool = True,
) -> torch.Tensor:
    """FIA's feature importance over masked copies: ``sum_l d p_y(x * M_l) / d A`` (then L2-normalised).

    ``mask_chunks`` yields masks of shape ``(n, B, C, H, W)``: n copies of the batch, evaluated in one
    forward pass (so chunk size trades memory for speed). Returns a tensor shaped like the feature
    map of ``x``; with ``unit_norm`` each image's importance has L2 norm 1.
    """
    captured = {}
    hook = feature_module.register_forward_hook(
        lambda m, i, o: captured.__setitem__("features", o)
    )
    total = None
    try:
        for masks in mask_chunks:
            copies = masks.shape[0]
            x_masked = (
                (masks * x.unsqueeze(0)).flatten(0, 1).detach().requires_grad_(True)
            )
            probs = F.softmax(model(normalize(x_masked)), dim=1)
            true_prob = probs.gather(1, y.repeat(copies).unsqueeze(1)).sum()
            features = captured["features"]
            grad = torch.autograd.grad(true_prob, features)[0].detach()
            grad = grad.unflatten(0, (copies, x.shape[0])).sum(0)
            total = grad if total is None else total + grad
    finally:
        hook.remove()
    if total is None:
        raise ValueError("aggregate_gradient needs at least one mask chunk")
    if unit_norm:
        norms = total.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        total = total / norms.view(-1, *([1] * (total.ndim - 1)))
    return total


@register_attack("TrigactRPA")
class RPA(Attack):
    """The RPA (Random Patch) attack: FIA with random patch-wise masks (see the module docstring).

    Args:
        model: The model to attack (pixels in [0, 1] unless ``normalize`` is given).
        normalize: A transform to normalize images.
        device: Device to use for tensors.
        eps: The maximum perturbation. Defaults to 8/255.
        steps: Number of steps. Defaults to 20.
        alpha: Step size, ``eps / steps`` if None.
        decay: Momentum decay. Defaults to 1.0.
        num_ens: Number of masked copies N. Defaults to 60 (the paper's).
        patch_sizes: Patch sizes cycled over the copies. Defaults to (1, 3, 5, 7).
        p_modify: Probability that a patch is modified. Defaults to 0.3.
        fill: 'uniform' (modified pixels scaled by U(0, 1), the paper) or 'zero' (FIA-style drop).
        ens_batch: Masked copies per forward pass. Defaults to 10.
        feature_layer_cfg: Dotted path of the feature layer inside ``model``.
        clip_min, clip_max: The pixel box. Defaults to [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | None = None,
        eps: float = 8 / 255,
        steps: int = 20,
        alpha: float | None = None,
        decay: float = 1.0,
        num_ens: int = 60,
        patch_sizes: Sequence[int] = (1, 3, 5, 7),
        p_modify: float = 0.3,
        fill: str = "uniform",
        ens_batch: int = 10,
        feature_layer_cfg: str = "",
        clip_min: float = 0.0,
        clip_max: float = 1.0,
    ) -> None:
        super().__init__(model, normalize, device)
        if fill not in FILLS:
            raise TrigactError(f"fill={fill!r}; allowed: {', '.join(FILLS)}")
        if num_ens < 1 or ens_batch < 1 or not patch_sizes or min(patch_sizes) < 1:
            raise TrigactError(
                "RPA needs num_ens >= 1, ens_batch >= 1 and patch sizes >= 1"
            )
        if not 0.0 <= p_modify <= 1.0:
            raise TrigactError(f"p_modify={p_modify} must be in [0, 1]")
        self.eps = eps
        self.steps = steps
        self.alpha = alpha
        self.decay = decay
        self.num_ens = num_ens
        self.patch_sizes = tuple(int(n) for n in patch_sizes)
        self.p_modify = p_modify
        self.fill = fill
        self.ens_batch = ens_batch
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.feature_layer_cfg = feature_layer_cfg
        self.feature_module = self.model.get_submodule(feature_layer_cfg)

    def mask_chunks(self, x: torch.Tensor):
        """The N masks for ``x``, ``ens_batch`` copies at a time; copy l uses ``patch_sizes[l % len]``."""
        for start in range(0, self.num_ens, self.ens_batch):
            stop = min(start + self.ens_batch, self.num_ens)
            yield torch.stack(
                [
                    random_patch_mask(
                        x.shape,
                        self.patch_sizes[copy % len(self.patch_sizes)],
                        self.p_modify,
                        self.fill,
                        device=x.device,
                        dtype=x.dtype,
                    )
                    for copy in range(start, stop)
                ]
            )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Perform RPA on a batch of images ``(B, C, H, W)`` with labels ``(B,)``."""
        alpha = self.eps / self.steps if self.alpha is None else self.alpha
        importance = aggregate_gradient(
            self.model,
            self.feature_module,
            x,
            y,
            self.mask_chunks(x),
            self.normalize,
            unit_norm=True,
        )

        captured = {}
        hook = self.feature_module.register_forward_hook(
            lambda m, i, o: captured.__setitem__("features", o)
        )
        try:
            g = torch.zeros_like(x)
            delta = torch.zeros_like(x, requires_grad=True)
            for _ in range(self.steps):
                self.model(self.normalize(x + delta))
                loss = (captured["features"] * importance).sum()
                grad = torch.autograd.grad(loss, delta)[0]
                with torch.no_grad():
                    g = self.decay * g + grad / grad.abs().mean(
                        dim=(1, 2, 3), keepdim=True
                    ).clamp_min(1e-12)
                    # FIA/RPA minimise the importance-weighted features: step against the gradient.
                    delta -= alpha * g.sign()
                    delta.clamp_(-self.eps, self.eps)
                    delta.copy_(
                        torch.clamp(x + delta, self.clip_min, self.clip_max) - x
                    )
        finally:
            hook.remove()
        return (x + delta).detach()
