"""Which device a model lives on: attacks, crafting and scoring move each batch there."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a module with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def accelerator_available() -> bool:
    """A CUDA (or Apple MPS) device Lightning's ``accelerator: gpu`` / ``auto`` would use."""
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def cpu_fallback(require_accelerator: bool, allow_cpu: bool, what: str) -> bool:
    """Whether a job sized for a GPU (``require_accelerator``: the ``paper_*`` experiments) runs on the
    CPU instead: False with an accelerator or when none is required; True with ``allow_cpu`` (smoke
    tests); otherwise one line refusing to start hours of CPU training by mistake."""
    if not require_accelerator or accelerator_available():
        return False
    if not allow_cpu:
        from trigact.common.errors import TrigactError

        raise TrigactError(f"{what} is sized for a GPU (trainer=gpu) and this machine has none (no CUDA device); "
                           "run it where one is, or pass allow_cpu=true to run it on the CPU anyway (slow)")
    return True
