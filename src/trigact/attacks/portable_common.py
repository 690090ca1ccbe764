"""Subclasses of torchattack 1.7.2's common-family attacks that run as their papers describe on any device,
channel count and image size (our surrogates see 1x16x16 digits and 1x28x28 Fashion-MNIST on the CPU).

Each is registered in torchattack's registry as ``Trigact<Name>`` and named by its ``conf/attack/*.yaml``.
What upstream gets wrong, and what each subclass changes (nothing else: the same arguments and defaults):

- **Momentum that is not carried over.** NIFGSM, SINIFGSM and TIFGSM compute ``g = decay * grad + grad /
  mean|grad|`` (the current gradient, not the accumulated momentum ``g``), and SSA and DeCoWA reset ``g``
  every step; after ``sign()`` the step is then just the current gradient's sign, whatever ``decay`` is.
  Here one loop, :class:`MomentumLoop`, runs MI-FGSM's update ``g <- decay * g + grad / ||grad||_1`` for all of
  them (Dong et al., CVPR 2018; TransferAttack's ``MIFGSM.get_momentum``).
- **Gradients that pile up.** SINIFGSM, SSA and DeCoWA call ``backward()`` once per copy without zeroing
  ``delta.grad`` in between and add the running total each time, so copy ``k`` of ``m`` weighs ``m - k + 1``
  times (DeCoWA's total also holds the gradients of its noise-map updates). Here each copy's gradient counts once.
- **MIG ascends the true class.** Its loss is the true class's mean softmax probability and the step goes
  up that loss, so upstream MIG makes the surrogate *more* confident (measured on the tiny digits CNN at
  32/255, 5 steps: white-box accuracy 1.0; 0.0 with its gradient sign flipped). TransferAttack's reference negates it (``-loss``
  untargeted); so do we.
- **ImageNet shapes.** TIFGSM convolves with a 3-channel kernel (``groups=3``: fails on 1 channel); SSA draws
  its noise as ``(B, 3, 224, 224)`` (fails on any other shape); MuMoDIG resizes into a fixed 245x245 canvas
  (for 224x224 inputs, DI's 1.09x; for 16x16 digits, shrinks them to as little as 1/15). Here the kernel has
  the input's channels, the noise the input's shape, and the canvas is ``int(W * 245 / 224)`` wide.
- **MuMoDIG needs kornia** (not our dependency) for one rotation by U(-45, 45) degrees: done here with
  ``affine_grid`` / ``grid_sample`` (bilinear, zero padding, as kornia's ``RandomRotation``). Its ``region_num``
  is now an attribute (upstream keeps it only inside its quantiser), its quantiser sorts the random cut points
  (upstream leaves pixels outside every region when ``region_num > 2``), and its interpolation point ``j`` of
  ``n_interpolate`` uses ``j`` (upstream uses the baseline index: every point is the same one).
- **SSA's gradient** is taken at the spectrum-transformed image, as in the authors' code (yuyang-long/SSA,
  ``x_idct.grad``) and TransferAttack's ``SSM``, not back through the DCT as upstream does.
- **DeCoWA** reads ``n, c, w, h`` off a ``(N, C, H, W)`` batch (a transposed warp grid on non-square images),
  keeps its noise map on the CPU whatever the device, and samples its pixel-centre grid with
  ``align_corners=False``, so even an unmoved mesh shrinks the image by ``(W - 1) / W`` (negligible at 224, 6% at
  16). Here ``h, w`` are the image's, the map is on its device, and an unmoved mesh is the identity.

PGDL2 is refused (:class:`RefusedPGDL2`): an L2 attack has no honest place in tables of L_inf budgets.

Every subclass returns ``x + delta`` within ``eps`` and ``[clip_min, clip_max]``, detached; none changes
``self.alpha`` (upstream overwrites a None alpha with ``eps / steps`` on the first call).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchattack.attack import Attack, register_attack
from torchattack.decowa import TPS, DeCoWA
from torchattack.mig import MIG
from torchattack.mumodig import LBQ, MuMoDIG
from torchattack.nifgsm import NIFGSM
from torchattack.pgdl2 import PGDL2
from torchattack.sinifgsm import SINIFGSM
from torchattack.ssa import SSA
from torchattack.tifgsm import TIFGSM

from trigact.common.errors import TrigactError


class MomentumLoop:
    """MI-FGSM's loop around an attack's own gradient estimate (``_gradient``).

    ``g_t = decay * g_{t-1} + grad_t / mean|grad_t|`` (per image), ``delta <- clip(delta + alpha * sign(g_t))``
    into the eps-ball and the pixel box. Mixed in before a torchattack class, whose ``__init__`` it keeps.
    """

    def _gradient(self, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, momentum: torch.Tensor,
                  alpha: float) -> torch.Tensor:
        """The step's gradient estimate at ``x + delta`` (``momentum``: ``g_{t-1}``, for look-ahead methods)."""
        raise NotImplementedError

    def _loss(self, outs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.lossfn(outs, y)
        return -loss if getattr(self, "targeted", False) else loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha = self.eps / self.steps if self.alpha is None else self.alpha
        x = x.detach()
        delta = torch.zeros_like(x)
        g = torch.zeros_like(x)
        for _ in range(self.steps):
            grad = self._gradient(x, delta, y, g, alpha).detach()
            g = self.decay * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            delta = (delta + alpha * g.sign()).clamp(-self.eps, self.eps)
            delta = (x + delta).clamp(self.clip_min, self.clip_max) - x
        return (x + delta).detach()


def _input_gradient(loss_of, delta: torch.Tensor) -> torch.Tensor:
    """d loss_of(d) / d d at ``d = delta``."""
    leaf = delta.detach().requires_grad_(True)
    return torch.autograd.grad(loss_of(leaf), leaf)[0]


@register_attack("TrigactNIFGSM")
class PortableNIFGSM(MomentumLoop, NIFGSM):
    """NI-FGSM: the gradient at the Nesterov look-ahead ``x + delta + alpha * decay * g`` (Lin et al., ICLR 2020)."""

    def _gradient(self, x, delta, y, momentum, alpha):
        ahead = alpha * self.decay * momentum
        return _input_gradient(lambda d: self._loss(self.model(self.normalize(x + d + ahead)), y), delta)


@register_attack("TrigactSINIFGSM")
class PortableSINIFGSM(MomentumLoop, SINIFGSM):
    """SI-NI-FGSM: NI-FGSM's look-ahead, averaged over ``m`` copies scaled by 1/2^i (i < m), in one batch."""

    def _gradient(self, x, delta, y, momentum, alpha):
        ahead = alpha * self.decay * momentum

        def loss(d):
            x_nes = x + d + ahead
            copies = torch.cat([x_nes / 2**i for i in range(self.m)])
            return self._loss(self.model(self.normalize(copies)), y.repeat(self.m))

        return _input_gradient(loss, delta)


@register_attack("TrigactTIFGSM")
class PortableTIFGSM(MomentumLoop, TIFGSM):
    """TI-FGSM (with momentum, TI-MI-FGSM): the gradient smoothed by a Gaussian kernel, one per input channel."""

    def kernel_for(self, x: torch.Tensor) -> torch.Tensor:
        kernel = torch.from_numpy(self.gkern(self.kern_len, self.n_sig)).to(x.device, x.dtype)
        return kernel.expand(x.shape[1], 1, *kernel.shape).contiguous()

    def _gradient(self, x, delta, y, momentum, alpha):
        grad = _input_gradient(lambda d: self._loss(self.model(self.normalize(x + d)), y), delta)
        return F.conv2d(grad, self.kernel_for(x), stride=1, padding="same", groups=x.shape[1])


@register_attack("TrigactMIG")
class PortableMIG(MomentumLoop, MIG):
    """MIG: integrated gradients of the true class's probability from a black baseline, stepping *down* it."""

    def _gradient(self, x, delta, y, momentum, alpha):
        def loss(d):
            probs = F.softmax(self.model(self.normalize(self._get_scaled_samples(x + d))), dim=1)
            true_prob = probs.gather(1, y.repeat(self.s_factor).view(-1, 1)).mean()
            return true_prob if self.targeted else -true_prob  # untargeted: lower the true class

        grad = _input_gradient(loss, delta)
        return (x + delta) * grad / self.s_factor  # (x - baseline) * mean gradient along the path; baseline 0


@register_attack("TrigactSSA")
class PortableSSA(MomentumLoop, SSA):
    """SSA (S^2I-FGSM on MI-FGSM): gradients at ``num_spectrum`` spectrum-simulated copies, averaged."""

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        gauss = torch.randn_like(x) * self.eps  # sigma = eps, as in the paper (16/255 at eps 16/255)
        x_dct = self._dct_2d(x + gauss)
        mask = torch.rand_like(x) * 2 * self.rho + 1 - self.rho
        return self._idct_2d(x_dct * mask)

    def _gradient(self, x, delta, y, momentum, alpha):
        total = torch.zeros_like(x)
        for _ in range(self.num_spectrum):
            x_idct = self.transform(x + delta).detach().requires_grad_(True)
            loss = self._loss(self.model(self.normalize(x_idct)), y)
            total += torch.autograd.grad(loss, x_idct)[0]
        return total / self.num_spectrum


@register_attack("TrigactDeCoWA")
class PortableDeCoWA(MomentumLoop, DeCoWA):
    """DeCoWA: gradients through ``num_warping`` thin-plate-spline warps, each warp's noise map first moved
    one step of size ``rho`` down the loss (a harder warp), averaged."""

    def _vwt(self, x: torch.Tensor, noise_map: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        source = self._grid_points_2d(self.mesh_width, self.mesh_height, x.device)
        target = self._noisy_grid(self.mesh_width, self.mesh_height, noise_map, x.device)
        grid = TPS(size=(h, w), device=x.device)(source[None, ...], target[None, ...])
        # align_corners=True: the TPS grid is linspace(-1, 1, side), i.e. pixel centres, so an unmoved mesh is
        # the identity (upstream's False shrinks the image by (side - 1) / side: 6% on 16x16 digits).
        return F.grid_sample(x, grid.repeat(n, 1, 1, 1), mode="bilinear", padding_mode="zeros", align_corners=True)

    def _grid_points_2d(self, width: int, height: int, device) -> torch.Tensor:
        grid_x, grid_y = torch.meshgrid(torch.linspace(-1, 1, width, device=device),
                                        torch.linspace(-1, 1, height, device=device), indexing="ij")
        return torch.stack((grid_y, grid_x), dim=-1).view(-1, 2)

    def _noise_map(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        noise = (torch.rand([self.mesh_height - 2, self.mesh_width - 2, 2], device=x_adv.device) - 0.5)
        noise = (noise * self.noise_scale).requires_grad_(True)
        loss = self._loss(self.model(self.normalize(self._vwt(x_adv, noise))), y)
        return (noise - self.rho * torch.autograd.grad(loss, noise)[0]).detach()

    def _gradient(self, x, delta, y, momentum, alpha):
        total = torch.zeros_like(x)
        for _ in range(self.num_warping):
            noise = self._noise_map((x + delta).detach(), y)
            warped = (x + delta).requires_grad_(True)
            loss = self._loss(self.model(self.normalize(self._vwt(warped, noise))), y)
            total += torch.autograd.grad(loss, warped)[0]  # d/d delta = d/d (x + delta)
        return total / self.num_warping


class SortedLBQ(LBQ):
    """Lower-bound quantisation: each pixel snaps to the lower end of its region, the regions cut at
    ``region_num - 1`` uniform random points, sorted, between each image channel's min and max."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b * c, h * w)
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        cuts = torch.rand(b * c, self.region_num - 1, device=x.device).sort(dim=1).values
        lefts = torch.cat([low[:, None], low[:, None] + cuts * (high - low)[:, None]], dim=1)
        region = (flat[:, :, None] >= lefts[:, None, :]).sum(dim=-1) - 1  # the last left end <= pixel
        return lefts.gather(1, region.clamp_min(0)).view(b, c, h, w)


def random_rotation(x: torch.Tensor, degrees: float = 45.0) -> torch.Tensor:
    """Rotate each image about its centre by U(-degrees, degrees): bilinear, zero padding (kornia's
    ``RandomRotation(degrees, p=1)``, which torchattack's MuMoDIG uses)."""
    angle = (torch.rand(x.shape[0], device=x.device, dtype=x.dtype) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], dim=1), torch.stack([sin, cos, zero], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_resize_and_pad(x: torch.Tensor, ratio: float = 245 / 224) -> torch.Tensor:
    """Resize to a random side in [W, int(ratio W)), zero-pad at random to int(ratio W), resize back to W:
    MuMoDIG's 224 -> 245 canvas at the input's own scale."""
    side = x.shape[-1]
    canvas = max(side + 1, int(side * ratio))
    target = int(torch.randint(side, canvas, (1,)).item())
    resized = F.interpolate(x, size=(target, target), mode="bilinear", align_corners=False)
    pad = canvas - target
    top = int(torch.randint(0, pad, (1,)).item())
    left = int(torch.randint(0, pad, (1,)).item())
    padded = F.pad(resized, [left, pad - left, top, pad - top], value=0)
    return F.interpolate(padded, size=(side, side), mode="bilinear", align_corners=False)


def _random_affine(x: torch.Tensor) -> torch.Tensor:
    choice = int(torch.randint(5, (1,)).item())
    if choice == 0:
        return x.roll(shifts=(int(np.random.randint(0, x.shape[2])),), dims=(2,))
    if choice == 1:
        return x.roll(shifts=(int(np.random.randint(0, x.shape[3])),), dims=(3,))
    if choice == 2:
        return x.flip(dims=(2,))
    if choice == 3:
        return x.flip(dims=(3,))
    return random_rotation(x, 45.0)


@register_attack("TrigactMuMoDIG")
class PortableMuMoDIG(MomentumLoop, MuMoDIG):
    """MuMoDIG: integrated gradients from lower-bound-quantised baselines, of the image and of ``n_trans``
    randomly transformed copies, with momentum; kornia-free and scaled to the input's size."""

    def __init__(
        self,
        model: nn.Module,
        normalize=None,
        device: torch.device | None = None,
        eps: float = 8 / 255,
        steps: int = 10,
        alpha: float | None = None,
        decay: float = 1.0,
        n_trans: int = 6,
        n_base: int = 1,
        n_interpolate: int = 1,
        region_num: int = 2,
        lambd: float = 0.65,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
    ) -> None:
        Attack.__init__(self, model, normalize, device)  # MuMoDIG.__init__ refuses to run without kornia
        self.eps = eps
        self.steps = steps
        self.alpha = alpha
        self.decay = decay
        self.n_trans = n_trans
        self.n_base = n_base
        self.n_interpolate = n_interpolate
        self.region_num = region_num
        self.lambd = lambd
        self.lbq = SortedLBQ(region_num)
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.lossfn = nn.CrossEntropyLoss()

    def _integrated_grad(self, xadv: torch.Tensor, y: torch.Tensor, x_anchor: torch.Tensor | None = None):
        anchor = xadv if x_anchor is None else x_anchor
        igrad = torch.zeros_like(xadv)
        for _ in range(self.n_base):
            x_ref = self.lbq(anchor).detach()
            path = xadv - x_ref
            accumulated = torch.zeros_like(xadv)
            for j in range(self.n_interpolate):
                x_inter = (x_ref + (j + self.lambd) * path / self.n_interpolate).detach().requires_grad_(True)
                loss = self.lossfn(self.model(self.normalize(x_inter)), y)
                accumulated += torch.autograd.grad(loss, x_inter)[0]
            igrad += accumulated * path
        return igrad

    def _apply_random_augmentation(self, x: torch.Tensor) -> torch.Tensor:
        if int(torch.randint(2, (1,)).item()) == 0:
            return _random_affine(x)
        return random_resize_and_pad(x)

    def _gradient(self, x, delta, y, momentum, alpha):
        x_adv = (x + delta).detach()
        return self._integrated_grad(x_adv, y) + self._diverse_integrated_grad(x_adv, y)


@register_attack("TrigactPGDL2")
class RefusedPGDL2(PGDL2):
    """PGD under an L2 budget: refused in one line. Our tables compare L_inf budgets, and every attack's output
    is projected into the L_inf ball, so an L2 attack would run as neither (see conf/attack/pgdl2.yaml)."""

    def __init__(self, *args, **kwargs) -> None:  # PGDL2's arguments, pinned in the config
        eps = kwargs.get("eps")
        eps = f"{eps * 255:.3g}/255" if isinstance(eps, (int, float)) else repr(eps)
        raise TrigactError(
            "attack 'pgdl2' (PGD-L2, Madry et al., ICLR 2018) bounds the L2 norm of the perturbation, but "
            f"trigact's budgets are L_inf (eps={eps} would be read as an L2 radius) and every "
            "attack's output is projected into the L_inf ball, so its results would fit neither threat model; "
            "use pgd (L_inf PGD) instead"
        )
