"""Diff-PGD (Xue et al., NeurIPS 2023, arXiv:2305.16494, "Diffusion-Based Adversarial Sample Generation
for Improved Stealthiness and Controllability"): L_inf PGD whose loss is the classifier's on the
SDEdit-purified image, and whose output is that purified image.

With ``R(x)`` the SDEdit purification below and ``l`` the cross-entropy:

1. ``x_0 = x + U(-eps, eps)`` (``random_start``), clipped to the pixel box.
2. For ``n = 0 .. steps-1``: ``x_{n+1} = Pi[x_n + alpha sign(grad_{x_n} l(f(R(x_n)), y))]``, ``Pi`` the
   projection onto the eps-ball around ``x`` and the box. ``gradient='full'`` back-propagates through
   the whole SDEdit chain (every UNet call); ``gradient='skip'`` uses ``grad_{R(x_n)} l`` in its place
   (the Jacobian of ``R`` taken as the identity).
3. Output ``R(x_N)`` (``output='purified'``, the paper's Diff-PGD sample ``x_0^n``), **then projected
   by us** onto the eps-ball around ``x`` and the box: the reference code keeps ``R(x_N)`` as it
   comes out, which can leave the budget, and every attack in trigact must stay in it.
   ``output='iterate'`` returns ``x_N`` (the PGD iterate, which the reference code also keeps).

SDEdit ``R`` (as the reference code's ``Denoised_Classifier.sdedit``): pixels to [-1, 1]; diffuse with
the forward process to timestep ``s = round(t_star T)``, ``x_s = sqrt(abar_s) x + sqrt(1 - abar_s) eps``;
then ``denoise_steps`` deterministic DDIM steps (eta 0) over ``linspace(s, 0, denoise_steps)``, each
predicting x_0, clipping it to [-1, 1] (guided-diffusion's ``clip_denoised``) and re-deriving the noise
from it; the last step lands on the clipped x_0 prediction. Noise is fresh at every purification
(every PGD iteration and the final one), as in the reference.

Settings pinned (read in the authors' released code, github.com/xavihart/Diff-PGD, ``code/attack_global.py``
and ``code/load_dm.py`` at commit 25e8b96; the paper's own text could not be consulted here):

- the diffusion model is guided-diffusion's ImageNet 256x256 unconditional one (1000 steps, linear
  betas) respaced to DDIM-50 (stride 20), SDEdit from respaced step ``t = 3``: timesteps 60, 40, 20,
  0, i.e. ``t_star = 0.06`` and ``denoise_steps = 4`` here (the run line of ``attack_global.py``:
  ``'ddim50', t=3, eps=16, iter=10, alpha=2``);
- PGD: eps 16/255, 10 iterations, step 2/255, cross-entropy (summed over the batch). In
  trigact eps, steps and alpha are the attack protocol's (``conf/attack_protocol``), not the attack's;
  ``attack_protocol=transferattack`` (16/255, 10 steps, 1.6/255) is the nearest;
- ``gradient='full'`` and ``random_start=True``: the code's default ``version='v1'`` (advertorch's
  ``LinfPGDAttack`` on ``classifier(sdedit(x))`` with ``rand_init=True``: autograd through the whole
  chain). Its ``'v2'`` ("accelerated", README news of 2023-09-21, and the run line's choice) is
  ``gradient='skip'`` with ``random_start=False``;
- labels: the reference attacks the classifier's prediction on ``x``; here ``y`` is whatever the
  caller passes (trigact passes the true labels, as for every attack);
- output: ``Attack_Global`` stores both ``x_adv`` and ``x_adv_diff = sdedit(x_adv)`` (``x_0^n``, this
  attack's default output).

The diffusion model is a diffusers ``UNet2DModel`` with a DDPM schedule, loaded exactly as by the
``diffpure`` defense (:func:`trigact.defenses.diffpure.load_unet` / ``load_scheduler``): ``weights`` is a
local diffusers folder or a state-dict file with ``unet_config``. guided-diffusion's checkpoint is not a
diffusers model: it needs converting, or another diffusers DDPM (e.g. CIFAR-10 32x32) is used; a UNet predicting ``2C`` channels (learned variance) is
read on its first ``C``. Inputs whose size or channels differ from the UNet's are resized / repeated to
it and back, as DiffPure does; the resize is differentiable and part of ``R``.

Random draws (start, noise) come from this attack's own CPU ``torch.Generator``, re-seeded with ``seed``
at every call: a call is a function of ``(x, y, seed)``, with the same draws on CPU and CUDA, and the global RNGs
are untouched (a random UNet for tests is initialised under a forked, seeded global RNG).

**Strength not verified here**: no pretrained diffusion model can be downloaded on this machine; the
tests check the flow, budget, seeding and that the gradient really goes through the purifier, on a tiny
random UNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchattack.attack import Attack
from torchattack.attack import register_attack as register_torchattack

from trigact.common.errors import TrigactError
from trigact.common.validate import check_int, check_range, parse_eps
from trigact.defenses.base import from_net_channels, to_net_channels
from trigact.defenses.diffpure import load_scheduler, load_unet

NAME = "diff_pgd"
GRADIENTS = ("full", "skip")
OUTPUTS = ("purified", "iterate")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_MISSING = (None, "", "???")  # "???": OmegaConf's unset mandatory value


def _where(key: str) -> str:
    return f"attack {NAME!r}: {key}"


def _check_choice(key: str, value, choices) -> str:
    if value not in choices:
        raise TrigactError(f"{_where(key)}={value!r} is not allowed; allowed: {', '.join(choices)}")
    return value


def _check_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise TrigactError(f"{_where(key)}={value!r} must be true or false")
    return value


def _as_attack_error(err: TrigactError) -> TrigactError:
    # diffpure's loaders name the defense in their messages; here the user configured an attack.
    return TrigactError(str(err).replace("defense 'diffpure'", f"attack {NAME!r}"))


@register_torchattack("TrigactDiffPGD")
class DiffPGD(Attack):
    """Diff-PGD (Xue et al., NeurIPS 2023): PGD through an SDEdit purification (see the module docstring).

    Args:
        model: The classifier to attack (pixels in [0, 1] unless ``normalize`` is given).
        normalize: A transform to normalize images before ``model``.
        device: Device to use for tensors.
        eps: The L_inf budget. Defaults to 8/255 (the paper: 16/255).
        steps: PGD iterations. Defaults to 20 (the paper: 10).
        alpha: Step size, ``eps / steps`` if None (the paper: 2/255).
        t_star: SDEdit's noise level as a fraction of the schedule: the input is diffused to timestep
            ``round(t_star T)``. Defaults to 0.06 (timestep 60 of 1000, the reference code's).
        denoise_steps: DDIM steps back to 0, over ``linspace(round(t_star T), 0, denoise_steps)``.
            Defaults to 4 (the reference code's 60, 40, 20, 0).
        gradient: 'full' (through every UNet call of the chain, the reference code's default 'v1') or
            'skip' (the gradient at the purified image, its accelerated 'v2').
        random_start: Start from a uniform point of the eps-ball (the reference code's default).
        output: 'purified' (``R(x_N)``, the paper's ``x_0^n``, projected by us into the budget) or
            'iterate' (``x_N``).
        weights: A local diffusers UNet folder or a state-dict file (with ``unet_config``), as DiffPure's.
        unet_config: ``UNet2DModel`` arguments, for a state-dict file or a random UNet.
        scheduler_config: ``DDPMScheduler`` arguments; None: from the weights folder, else DDPM's defaults.
        allow_random_init: Build an untrained UNet from ``unet_config`` without weights (tests only).
        seed: Seed of the attack's generator (random start, diffusion noise). Defaults to 0.
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
        t_star: float = 0.06,
        denoise_steps: int = 4,
        gradient: str = "full",
        random_start: bool = True,
        output: str = "purified",
        weights: str | None = None,
        unet_config: dict | None = None,
        scheduler_config: dict | None = None,
        allow_random_init: bool = False,
        seed: int = 0,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
    ) -> None:
        super().__init__(model, normalize, device)
        # Every value is checked before the (possibly large) UNet is loaded.
        self.eps = parse_eps(eps, _where("eps"), allow_zero=False)
        self.steps = check_int(steps, _where("steps"), 1)
        self.alpha = None if alpha is None else parse_eps(alpha, _where("alpha"), allow_zero=False)
        self.t_star = check_range(t_star, _where("t_star"), 0.0, 1.0, low_open=True)
        self.denoise_steps = check_int(denoise_steps, _where("denoise_steps"), 1)
        self.gradient = _check_choice("gradient", gradient, GRADIENTS)
        self.random_start = _check_bool("random_start", random_start)
        self.output = _check_choice("output", output, OUTPUTS)
        allow_random_init = _check_bool("allow_random_init", allow_random_init)
        self.seed = check_int(seed, _where("seed"), 0, 2**63 - 1)
        self.clip_min = check_range(clip_min, _where("clip_min"), -math.inf, math.inf)
        self.clip_max = check_range(clip_max, _where("clip_max"), self.clip_min, math.inf)
        if weights in _MISSING:
            if not allow_random_init:
                raise TrigactError(
                    f"attack {NAME!r} needs a pretrained diffusion model: weights=<a local diffusers UNet folder "
                    "(e.g. a DDPM pipeline saved with save_pretrained) or a state-dict file with unet_config>; "
                    "it cannot be downloaded here (allow_random_init=true builds an untrained UNet, for tests only)"
                )
            if unet_config is None:
                raise TrigactError(f"attack {NAME!r}: without weights, unet_config={{...}} must give the random UNet2DModel")
            weights = None
        elif not isinstance(weights, (str, Path)):
            raise TrigactError(f"{_where('weights')}={weights!r} must be a path")
        else:
            weights = str(weights)
        self.weights = weights

        try:
            # A random UNet is a function of the seed, and building it leaves the global RNG as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                unet = load_unet(weights, unet_config)
            scheduler = load_scheduler(weights, scheduler_config)
        except TrigactError as err:
            raise _as_attack_error(err) from None
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.generator = torch.Generator()

        num_train = int(scheduler.config.num_train_timesteps)
        start = min(round(self.t_star * num_train), num_train - 1)
        if start < 1:
            raise TrigactError(
                f"{_where('t_star')}={t_star} is below one step of {num_train}; allowed: t_star >= {0.5 / num_train:g}"
            )
        check_int(self.denoise_steps, _where("denoise_steps"), 1, start + 1)
        self.prediction_type = _check_choice(
            "scheduler prediction_type", scheduler.config.prediction_type, PREDICTION_TYPES)
        self.clip_denoised = bool(getattr(scheduler.config, "clip_sample", True))
        self.timesteps = (
            torch.linspace(start, 0, self.denoise_steps).round().long().unique_consecutive().tolist()
        )
        abar = scheduler.alphas_cumprod.double()
        self._abar = {t: float(abar[t]) for t in self.timesteps}

    # --- the purifier R ---------------------------------------------------------------------------------

    @property
    def sample_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _net_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] to the UNet's channels, size and [-1, 1] range (differentiably)."""
        param = next(self.unet.parameters())
        z = to_net_channels(NAME, x, self.unet.config.in_channels).to(param.dtype)
        if tuple(z.shape[-2:]) != self.sample_size:
            z = F.interpolate(z, size=self.sample_size, mode="bilinear", align_corners=False, antialias=True)
        return z * 2.0 - 1.0

    def draw_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise for one purification of ``x``, from the attack's generator."""
        param = next(self.unet.parameters())
        shape = (x.shape[0], self.unet.config.in_channels, *self.sample_size)
        noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        return noise.to(device=x.device, dtype=param.dtype)

    def _x0_and_eps(self, prediction: torch.Tensor, z: torch.Tensor, abar: float):
        a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
        if prediction.shape[1] == 2 * z.shape[1]:  # learned variance: mean part first (guided-diffusion)
            prediction = prediction[:, : z.shape[1]]
        if self.prediction_type == "epsilon":
            x0 = (z - s * prediction) / a
        elif self.prediction_type == "sample":
            x0 = prediction
        else:  # v_prediction
            x0 = a * z - s * prediction
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return x0, (z - a * x0) / s

    def purify(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """SDEdit ``R(x)``: diffuse ``x`` (pixels in [0, 1]) to ``t_star``, then DDIM back to 0.

        Differentiable in ``x`` (autograd records the whole chain when ``x`` requires grad). ``noise``
        (shaped like :meth:`draw_noise`'s) defaults to a fresh draw from the attack's generator.
        """
        height, width = x.shape[-2:]
        z0 = self._net_input(x)
        noise = self.draw_noise(x) if noise is None else noise.to(device=z0.device, dtype=z0.dtype)
        abar = self._abar[self.timesteps[0]]
        z = math.sqrt(abar) * z0 + math.sqrt(1.0 - abar) * noise
        for i, t in enumerate(self.timesteps):
            abar = self._abar[t]
            t_batch = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
            x0, eps = self._x0_and_eps(self.unet(z, t_batch).sample, z, abar)
            if i + 1 < len(self.timesteps):
                abar_prev = self._abar[self.timesteps[i + 1]]
                z = math.sqrt(abar_prev) * x0 + math.sqrt(1.0 - abar_prev) * eps  # DDIM, eta = 0
            else:
                z = x0  # the last step lands on the x_0 prediction (abar_prev = 1)
        out = (z + 1.0) / 2.0
        if tuple(out.shape[-2:]) != (height, width):
            out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        return from_net_channels(out, x.shape[1]).to(x.dtype)

    # --- the attack -------------------------------------------------------------------------------------

    def loss(self, x_purified: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the classifier on purified images, summed over the batch (the reference's)."""
        return F.cross_entropy(self.model(self.normalize(x_purified)), y, reduction="sum")

    def input_gradient(self, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The ascent direction at ``x``: ``grad_x l(f(R(x)), y)`` ('full') or ``grad_{R(x)} l`` ('skip')."""
        with torch.enable_grad():
            if self.gradient == "full":
                x = x.detach().requires_grad_(True)
                return torch.autograd.grad(self.loss(self.purify(x, noise), y), x)[0]
            with torch.no_grad():
                purified = self.purify(x.detach(), noise)
            purified.requires_grad_(True)
            return torch.autograd.grad(self.loss(purified, y), purified)[0]

    def _project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps)
        return x_adv.clamp(self.clip_min, self.clip_max)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Diff-PGD on a batch ``(B, C, H, W)`` in [0, 1] with labels ``(B,)``; returns ``x_adv`` in the budget."""
        if x.ndim != 4 or not x.is_floating_point():
            raise TrigactError(f"attack {NAME!r} expects float images of shape (B, C, H, W), got {tuple(x.shape)}")
        self.generator.manual_seed(self.seed)
        self.unet.eval()
        x = x.detach()
        alpha = self.eps / self.steps if self.alpha is None else self.alpha
        if self.random_start:
            start = torch.rand(x.shape, generator=self.generator, dtype=torch.float32)
            x_adv = self._project(x + (start.to(x) * 2.0 - 1.0) * self.eps, x)
        else:
            x_adv = x.clone()
        for _ in range(self.steps):
            grad = self.input_gradient(x_adv, y)
            x_adv = self._project(x_adv + alpha * grad.sign(), x).detach()
        if self.output == "iterate":
            return x_adv
        with torch.no_grad():
            return self._project(self.purify(x_adv), x)  # the projection is ours, not the paper's
