"""Batch sizes that follow the device's memory: ``batch_size: auto`` for scoring and crafting.

:func:`eval_batch_size` turns a configured batch size into a number. An integer is kept as it is;
``"auto"`` sizes the batch from what is free on the device:

- on CUDA: one probe forward + input-gradient backward of ``model`` at ``probe_batch`` images, whose
  peak allocation (``torch.cuda.max_memory_allocated`` above what was allocated before) divided by
  ``probe_batch`` is the footprint of one image; the free memory (``torch.cuda.mem_get_info`` plus what
  PyTorch's caching allocator holds unused) times ``headroom``, divided by that footprint, rounded down
  to a power of two and capped at ``cap``, is the batch size;
- anywhere else (the CPU, MPS): ``cpu_default`` (256), since host memory is not the bottleneck there
  and bigger batches do not run faster on a few cores.

The footprint is measured, not guessed from the parameter count: it includes the activations the
backward keeps, cuDNN workspaces and a defense in front of the model. It is an overestimate for pure
scoring (no backward; pass ``backward=False`` to probe the forward only) and for large batches (fixed
workspace cost is counted per image at the small probe batch), which is the safe side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trigact.common.errors import TrigactError

AUTO = "auto"
CPU_DEFAULT = 256
MAX_BATCH = 4096
PROBE_BATCH = 8
HEADROOM = 0.8  # of the free memory: fragmentation, and tensors the caller holds besides the batch


def eval_batch_size(
    model: nn.Module,
    sample_shape: Sequence[int],
    device,
    requested: int | str = AUTO,
    *,
    cap: int = MAX_BATCH,
    cpu_default: int = CPU_DEFAULT,
    probe_batch: int = PROBE_BATCH,
    headroom: float = HEADROOM,
    backward: bool = True,
) -> int:
    """The batch size to use for ``model`` on ``device`` with images of ``sample_shape`` (``(C, H, W)``).

    ``requested``: an integer >= 1 (returned as is, nothing is probed) or ``"auto"``. With ``"auto"``,
    on a CUDA device the batch size is ``2**floor(log2(headroom * free / per_image))``, between 1 and
    ``cap`` (a power of two or ``cap``), where ``per_image`` is measured by one probe at
    ``probe_batch`` images (see the module docstring); elsewhere it is ``cpu_default``.

    The probe runs ``model`` in eval mode (every module's train/eval flag is restored), takes the
    gradient with respect to the input only (no parameter's ``.grad`` changes), restores the CPU and
    CUDA RNG states, and resets the device's peak-memory statistics. ``model`` must live on
    ``device``. Bad values fail in one :class:`TrigactError` line naming them.
    """
    if not isinstance(requested, str):
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise TrigactError(f"batch_size={requested!r} must be an integer >= 1 or 'auto'")
        return requested
    if requested != AUTO:
        raise TrigactError(f"batch_size={requested!r} must be an integer >= 1 or 'auto'")
    for value, name in ((cap, "cap"), (cpu_default, "cpu_default"), (probe_batch, "probe_batch")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrigactError(f"eval_batch_size: {name}={value!r} must be an integer >= 1")
    if not 0 < headroom <= 1:
        raise TrigactError(f"eval_batch_size: headroom={headroom!r} must be in (0, 1]")
    shape = _check_shape(sample_shape)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise TrigactError(f"eval_batch_size: device={device!r} is not a device") from None
    if device.type != "cuda":
        return cpu_default
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    per_image = probe_bytes_per_image(model, shape, device, probe_batch, backward)
    return batch_from_memory(free_cuda_bytes(device), per_image, cap=cap, headroom=headroom)


def batch_from_memory(free_bytes: int, per_image_bytes: float, *, cap: int = MAX_BATCH,
                      headroom: float = HEADROOM) -> int:
    """``headroom * free_bytes / per_image_bytes`` images, rounded down to a power of two, in
    ``[1, cap]`` (``cap`` itself when it is smaller than that power of two, or nothing was measured)."""
    if per_image_bytes <= 0:  # nothing allocated per image (a model with no tensors of its own)
        return cap
    fit = int(headroom * free_bytes // per_image_bytes)
    if fit < 1:
        return 1  # not even one image by this estimate: try one, and let the allocator say
    return min(cap, 1 << (fit.bit_length() - 1))


def free_cuda_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: what the driver reports free plus what
    PyTorch's caching allocator has reserved but not handed out (it reuses that before asking)."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def probe_bytes_per_image(model: nn.Module, sample_shape: Sequence[int], device: torch.device,
                          probe_batch: int = PROBE_BATCH, backward: bool = True) -> float:
    """Peak bytes allocated per image by one forward (and input-gradient backward) of ``model`` on
    ``probe_batch`` images of ``sample_shape`` on the CUDA ``device``."""
    _check_model_device(model, device)
    modes = [(m, m.training) for m in model.modules()]
    rng_devices = [device.index] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices):  # the probe must not shift a seeded run's draws
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                # Out of any inference mode the caller is in, so that the backward can run. Constant
                # pixels: the footprint does not depend on them, and no RNG is drawn for them.
                with torch.inference_mode(False), torch.set_grad_enabled(backward):
                    x = torch.full((probe_batch, *sample_shape), 0.5, device=device, requires_grad=backward)
                    out = model(x)
                    # A victim behind a non-differentiable defense (JPEG, DiffPure: no_grad inside) has no
                    # input gradient to take; its forward is then all an attack can cost per call.
                    if backward and out.requires_grad:
                        (grad,) = torch.autograd.grad(out.float().sum(), [x])  # not into any param's .grad
                        del grad
                del out, x
                torch.cuda.synchronize(device)
            except torch.cuda.OutOfMemoryError:
                raise TrigactError(
                    f"eval_batch_size: {probe_batch} images of shape {tuple(sample_shape)} do not fit on {device}; "
                    "give an integer batch_size (or probe_batch) smaller than that"
                ) from None
            peak = torch.cuda.max_memory_allocated(device)
    finally:
        for module, training in modes:
            module.training = training
    return max(0, peak - before) / probe_batch


def _check_shape(sample_shape) -> tuple[int, ...]:
    try:
        shape = tuple(sample_shape)
    except TypeError:
        shape = None
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise TrigactError(f"eval_batch_size: sample_shape={sample_shape!r} must be a shape like (C, H, W)")
    return shape


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device != device:
            raise TrigactError(f"eval_batch_size: the model is on {tensor.device}, not on {device}; move it first")
        return


def batch_size_for(models, sample_shape: Sequence[int], requested, *, backward: bool = True,
                   what: str = "batch_size") -> int:
    """One batch size for every model of ``models`` (``requested`` an integer, or ``"auto"``: the
    smallest :func:`eval_batch_size` over them, each probed on its own device)."""
    from trigact.common.devices import model_device

    if requested != AUTO:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise TrigactError(f"{what}={requested!r} must be an integer >= 1 or 'auto'")
        return requested
    sizes = [eval_batch_size(m, sample_shape, model_device(m), AUTO, backward=backward) for m in models]
    return min(sizes) if sizes else CPU_DEFAULT
