"""``diffpure``: diffusion purification (Nie et al., ICML 2022, "Diffusion Models for Adversarial
Purification").

Diffuse the input to time t* with the forward process, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``,
so the small adversarial perturbation drowns in Gaussian noise, then run the reverse (denoising)
process back to 0 with a pretrained diffusion model. This is the discrete DDPM form DiffPure uses with
guided-diffusion models (``q_sample`` at ``t* T - 1``, then ``t* T`` ancestral steps); the continuous
VP-SDE solver of its CIFAR-10 setting is not reproduced. Built on ``diffusers``: a ``UNet2DModel``
predicts the noise and ``DDPMScheduler.step`` takes each reverse step. ``steps`` below ``t* T`` strides
the reverse chain (DDPM with skipped timesteps): cheaper, an approximation.

- Pixels [0, 1] are mapped to the model's [-1, 1] and back, clamped.
- An input whose size differs from the UNet's ``sample_size`` is resized to it and back (as DiffPure
  does for ImageNet 224 -> 256); grayscale is repeated to an RGB model's 3 channels and averaged back.
- Noise comes from the module's own seedable CPU generator: reproducible, and the same on CPU and CUDA.
- Runs without autograd: many UNet calls per image; a white-box attack through it (adjoint method) is
  not our concern.

Weights: ``weights`` is a local diffusers folder (``config.json`` + weights, or a ``unet/`` subfolder
as in a saved pipeline; a ``scheduler_config.json`` or ``scheduler/`` beside it is used too), or a
state-dict file with ``unet_config`` giving the ``UNet2DModel`` arguments. Without a scheduler config
the DDPM default is used: 1000 steps, linear betas 1e-4..0.02, as DDPM and DiffPure's models.

**Accuracy not verified here**: no pretrained diffusion model can be downloaded on this machine, so
only the flow (shapes, range, seeding, weight loading) is tested, on a tiny random UNet.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from trigact.defenses.base import (
    SeededDefense,
    check_float,
    check_images,
    check_int,
    from_net_channels,
    load_into,
    load_state_dict_file,
    to_net_channels,
    weights_given,
)
from trigact.defenses.registry import register_defense
from trigact.common.errors import TrigactError

DIFFUSERS_REQUIREMENT = "diffusers==0.42.1"


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise TrigactError(f"defense 'diffpure' needs diffusers: pip install {DIFFUSERS_REQUIREMENT}") from None
    return diffusers


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:240] or type(err).__name__


def load_unet(weights, unet_config: dict | None):
    """A ``UNet2DModel`` from a diffusers folder, a state-dict file (with ``unet_config``) or, with no
    weights, randomly initialised from ``unet_config``."""
    UNet2DModel = _diffusers().UNet2DModel
    if weights is not None and Path(weights).is_dir():
        folder = Path(weights)
        subfolder = "unet" if (folder / "unet" / "config.json").is_file() else None
        if subfolder is None and not (folder / "config.json").is_file():
            raise TrigactError(f"defense 'diffpure': {folder} holds no diffusers UNet (no config.json or unet/config.json)")
        try:
            return UNet2DModel.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
            raise TrigactError(f"defense 'diffpure': cannot load a UNet2DModel from {folder} ({_one_line(err)})") from None
    if weights is not None and unet_config is None:
        raise TrigactError(
            f"defense 'diffpure': weights={str(weights)!r} is not a diffusers folder; a state-dict file needs "
            "unet_config={...} (the UNet2DModel arguments)"
        )
    if not isinstance(unet_config, dict):
        raise TrigactError(f"defense 'diffpure': unet_config={unet_config!r} must be a mapping of UNet2DModel arguments")
    try:
        unet = UNet2DModel(**unet_config)
    except (TypeError, ValueError) as err:
        raise TrigactError(f"defense 'diffpure': bad unet_config ({_one_line(err)})") from None
    if weights is not None:
        load_into("diffpure", unet, load_state_dict_file("diffpure", weights), weights)
    return unet


def load_scheduler(weights, scheduler_config: dict | None):
    """A ``DDPMScheduler``: from ``scheduler_config``, else beside the weights, else DDPM's defaults."""
    DDPMScheduler = _diffusers().DDPMScheduler
    try:
        if scheduler_config is not None:
            if not isinstance(scheduler_config, dict):
                raise TypeError(f"scheduler_config={scheduler_config!r} must be a mapping of DDPMScheduler arguments")
            return DDPMScheduler(**scheduler_config)
        folder = Path(weights) if weights is not None and Path(weights).is_dir() else None
        if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
            return DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
        if folder is not None and (folder / "scheduler_config.json").is_file():
            return DDPMScheduler.from_pretrained(str(folder), local_files_only=True)
        return DDPMScheduler()
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise TrigactError(f"defense 'diffpure': bad scheduler config ({_one_line(err)})") from None


@register_defense("diffpure")
class DiffPure(SeededDefense):
    """DiffPure (Nie et al. 2022): diffuse to t*, denoise back with a diffusers UNet2DModel (DDPM)."""

    def __init__(
        self,
        weights: str | None = None,
        t_star: float = 0.1,
        steps: int | None = None,
        seed: int = 0,
        unet_config: dict | None = None,
        scheduler_config: dict | None = None,
        allow_random_init: bool = False,
    ):
        t_star = check_float("diffpure", "t_star", t_star, 0.0, 1.0, open_min=True)
        has_weights = weights_given("diffpure", weights, allow_random_init, "diffusers UNet folder or state-dict file")
        if not has_weights and unet_config is None:
            raise TrigactError("defense 'diffpure': without weights, unet_config={...} must give the random UNet2DModel")
        weights = str(weights) if has_weights else None
        super().__init__(
            seed=seed, weights=weights, t_star=t_star, steps=steps, unet_config=unet_config,
            scheduler_config=scheduler_config, allow_random_init=allow_random_init,
        )
        self.unet = load_unet(weights, unet_config)
        self.scheduler = load_scheduler(weights, scheduler_config)
        num_train = int(self.scheduler.config.num_train_timesteps)
        # DiffPure: q_sample at index t* T - 1, then t* T reverse steps down to index 0.
        chain = round(t_star * num_train)
        if chain < 1:
            raise TrigactError(
                f"defense 'diffpure': t_star={t_star} is below one step of {num_train}; allowed: t_star >= {1 / num_train}"
            )
        if steps is not None:
            check_int("diffpure", "steps", steps, 1, chain)
        count = chain if steps is None else steps
        timesteps = torch.linspace(chain - 1, 0, count).round().long().unique_consecutive().tolist()
        self.scheduler.set_timesteps(timesteps=timesteps)
        self.timesteps = timesteps
        self.eval()

    @property
    def sample_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images("diffpure", x)
        height, width = x.shape[-2:]
        param = next(self.unet.parameters())
        z = to_net_channels("diffpure", x, self.unet.config.in_channels).to(param.dtype)
        resized = (height, width) != self.sample_size
        if resized:
            z = F.interpolate(z, size=self.sample_size, mode="bilinear", align_corners=False, antialias=True)
        z = z * 2.0 - 1.0
        start = torch.full((z.shape[0],), self.timesteps[0], dtype=torch.long)
        z = self.scheduler.add_noise(z, self.randn(z), start)
        for t in self.timesteps:
            prediction = self.unet(z, t).sample
            z = self.scheduler.step(prediction, t, z, generator=self.generator).prev_sample
        z = ((z + 1.0) / 2.0).clamp(0.0, 1.0)
        if resized:
            z = F.interpolate(z, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        return from_net_channels(z, x.shape[1]).clamp(0.0, 1.0).to(x.dtype)
