"""What every preprocessing defense shares: the base class, parameter checks, seeding, weight files.

A defense maps pixels in [0, 1] of shape (N, C, H, W) to pixels in [0, 1] of the same shape, so it can
sit in front of any victim. Bad parameters fail at construction with a one-line :class:`TrigactError`
naming the defense, the value and what is allowed, as everywhere else in trigact.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from trigact.common import validate
from trigact.common.errors import TrigactError

# OmegaConf's marker for a mandatory value nobody set (``weights: ???`` read without resolving).
MISSING = "???"


class Defense(nn.Module):
    """Base of the registered defenses: records its parameters and stays in eval mode.

    ``name`` is set by :func:`~trigact.defenses.registry.register_defense`. ``config`` (name plus
    parameters) is what :func:`~trigact.defenses.registry.build_defense_from_config` takes back, so a
    defense can be recorded beside results and rebuilt.
    """

    name: str = ""

    def __init__(self, **params):
        super().__init__()
        self.params = dict(params)
        super().train(False)

    @property
    def config(self) -> dict:
        return {"name": self.name, **self.params}

    def train(self, mode: bool = True):
        # Defenses are never trained here; a victim switched to train mode must not turn on dropout or
        # batch statistics inside a purifier network placed in front of it.
        return super().train(False)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.items())


class SeededDefense(Defense):
    """A randomized defense owning a seedable :class:`torch.Generator` (on the CPU).

    Random draws come from the CPU generator and are moved to the input's device, so a seed gives the
    same result on CPU and CUDA and an evaluation is reproducible. Successive calls continue the stream
    (a fresh draw per batch, as a deployed randomized defense would); :meth:`reseed` restarts it.
    """

    def __init__(self, seed: int = 0, **params):
        check_int(self.name or type(self).__name__, "seed", seed, 0)
        super().__init__(**params, seed=seed)
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, seed: int | None = None) -> None:
        """Restart the random stream from ``seed`` (default: the constructor's)."""
        self.generator.manual_seed(self.params["seed"] if seed is None else int(seed))

    def randint(self, low: int, high: int) -> int:
        """A uniform integer in [low, high], both inclusive."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator).item())

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``like``, drawn on the CPU generator, on ``like``'s device."""
        noise = torch.randn(like.shape, generator=self.generator, dtype=torch.float32)
        return noise.to(device=like.device, dtype=like.dtype)


def check_int(defense: str, name: str, value, minimum: int, maximum: int | None = None) -> int:
    """A defense's integer parameter in [minimum, maximum]; the error names the defense."""
    return validate.check_int(value, f"defense {defense!r}: {name}", minimum, maximum)


def check_float(
    defense: str, name: str, value, minimum: float, maximum: float | None = None, *, open_min: bool = False
) -> float:
    """A defense's finite real parameter >= minimum (> with ``open_min``) and <= maximum."""
    high = math.inf if maximum is None else maximum
    return validate.check_range(value, f"defense {defense!r}: {name}", minimum, high, low_open=open_min)


def check_choice(defense: str, name: str, value, choices) -> str:
    if value not in choices:
        raise TrigactError(f"defense {defense!r}: {name}={value!r} is not allowed; allowed: {', '.join(choices)}")
    return value


def check_images(defense: str, x: torch.Tensor, channels=None) -> None:
    """Fail with one line unless ``x`` is a floating (N, C, H, W) batch (with C in ``channels``)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise TrigactError(f"defense {defense!r} expects float images of shape (N, C, H, W) in [0, 1], got {got}")
    if channels is not None and x.shape[1] not in channels:
        raise TrigactError(
            f"defense {defense!r} handles images with {' or '.join(map(str, channels))} channels, got {x.shape[1]}"
        )


def to_net_channels(defense: str, x: torch.Tensor, net_channels: int) -> torch.Tensor:
    """Feed grayscale images to an RGB network by repeating the channel (the usual convention)."""
    if x.shape[1] == net_channels:
        return x
    if x.shape[1] == 1 and net_channels == 3:
        return x.expand(-1, 3, -1, -1)
    raise TrigactError(
        f"defense {defense!r}: its network takes {net_channels}-channel images, got {x.shape[1]} channels"
    )


def from_net_channels(y: torch.Tensor, channels: int) -> torch.Tensor:
    """Back to the input's channels: an RGB output for a grayscale input is averaged to one channel."""
    if y.shape[1] == channels:
        return y
    if channels == 1:
        return y.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot map a {y.shape[1]}-channel output to {channels} channels")


def weights_given(defense: str, weights, allow_random_init: bool, what: str) -> bool:
    """Whether a weights path was given; without one, only an explicit ``allow_random_init`` is accepted.

    A randomly initialised purifier is no defense at all (it scrambles every image), so it must be asked
    for by name, which only tests do.
    """
    if not isinstance(allow_random_init, bool):
        raise TrigactError(f"defense {defense!r}: allow_random_init={allow_random_init!r} must be true or false")
    if weights in (None, "", MISSING):
        if not allow_random_init:
            raise TrigactError(
                f"defense {defense!r} needs weights=<{what}>; pretrained weights cannot be downloaded here "
                "(allow_random_init=true builds an untrained network, for tests only)"
            )
        return False
    if not isinstance(weights, (str, Path)):
        raise TrigactError(f"defense {defense!r}: weights={weights!r} must be a path")
    return True


def load_state_dict_file(defense: str, path) -> dict:
    """A state dict from a ``.pt``/``.pth``/``.bin`` file (``torch.load(weights_only=True)``: no pickled
    code runs) or a ``.safetensors`` file, with one-line errors for missing or corrupt files.

    A checkpoint wrapping its weights under ``state_dict`` is unwrapped, and a ``module.`` prefix left by
    ``nn.DataParallel`` is dropped, as both are common in released purifier weights.
    """
    path = Path(path)
    if not path.is_file():
        raise TrigactError(f"defense {defense!r}: weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise TrigactError(f"defense {defense!r}: {path} is not a readable weights file ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrigactError(f"defense {defense!r}: {path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(defense: str, net: nn.Module, state: dict, path) -> None:
    """``net.load_state_dict(state)`` (strict), a mismatch reported on one line."""
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:240]
        raise TrigactError(f"defense {defense!r}: weights {path} do not match the network ({detail})") from None
