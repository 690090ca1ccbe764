"""The trigger as an image: logged every epoch through the loggers that take images, saved as
``trigger.png`` in the run folder when training ends.

Rendering: ``tau`` (C, H, W) is mapped linearly from ``[-m, +m]`` to ``[0, 1]`` with
``m = max|tau|`` over all channels, i.e. ``0.5 + tau / (2m)``. Symmetric on purpose: a pixel the
trigger leaves alone is mid-grey, brighter means ``+`` and darker ``-``, and equal magnitudes of
opposite sign are equally far from grey, which a min-max stretch would not keep. Dividing by the
trigger's own ``max|tau|`` rather than by ``eps``/``alpha`` uses the whole range as a learnable
trigger grows past ``alpha`` (a fixed trigger, ``+-eps`` everywhere, renders as black and white).
One ``m`` for all channels keeps the colours of an RGB trigger comparable. Small triggers are
enlarged by an integer factor with nearest-neighbour so that each pixel stays one flat square.
"""

from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from trigact.common.io import atomic_write_bytes
from trigact.callbacks.trigger_update import TriggerUpdateCallback
from trigact.common.errors import TrigactError

IMAGE_NAME = "trigger.png"


def trigger_to_image(tau: torch.Tensor, min_size: int = 0) -> torch.Tensor:
    """``tau`` (C, H, W) as a float image in [0, 1] (see the module docstring), enlarged by the
    smallest integer factor that makes its shorter side at least ``min_size`` pixels."""
    tau = tau.detach().float().cpu()
    if tau.dim() != 3:
        raise TrigactError(f"trigger tau must have shape (C, H, W); got {tuple(tau.shape)}")
    peak = tau.abs().max()
    image = torch.full_like(tau, 0.5) if peak == 0 else (0.5 + tau / (2 * peak)).clamp(0.0, 1.0)
    factor = max(1, math.ceil(min_size / min(tau.shape[1:]))) if min_size else 1
    if factor > 1:
        image = image.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return image


def image_to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """A [0, 1] float (C, H, W) image as uint8 (H, W) for one channel, (H, W, C) otherwise."""
    array = (image * 255).round().to(torch.uint8).numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def save_png_atomically(array: np.ndarray, path) -> Path:
    """Write ``array`` as a PNG via a temporary file and a rename: never a half-written image."""
    from PIL import Image

    path = Path(path)
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return atomic_write_bytes(buffer.getvalue(), path)


class TriggerImageCallback(L.Callback):
    """Logs ``tau`` as an image at the end of every training epoch, after that epoch's learnable
    update, and writes ``<dirpath>/trigger.png`` when fit ends. A no-op for a model without a trigger.

    Loggers: ``WandbLogger.log_image``; any logger whose experiment has ``add_image`` (TensorBoard);
    others (CSV) are skipped. Only global rank 0 logs and writes (tau is the same on every rank).
    It must come after :class:`TriggerUpdateCallback` in ``trainer.callbacks`` (``train.build_callbacks``
    puts the update first); ``setup`` refuses the other order rather than log stale triggers.
    """

    def __init__(self, dirpath: str | None = None, key: str = "trigger/image", min_size: int = 64):
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.key = key
        self.min_size = int(min_size)

    @staticmethod
    def _tau(pl_module) -> torch.Tensor | None:
        trigger = getattr(pl_module, "trigger", None)
        return None if trigger is None else trigger.tau

    def setup(self, trainer, pl_module, stage):
        if self._tau(pl_module) is None:
            return
        order = [type(c) for c in trainer.callbacks]
        if TriggerUpdateCallback in order and order.index(TriggerUpdateCallback) > order.index(type(self)):
            raise TrigactError("TriggerImageCallback must come after TriggerUpdateCallback in trainer.callbacks, "
                               "or it logs each epoch's trigger before its update")

    def on_train_epoch_end(self, trainer, pl_module):
        tau = self._tau(pl_module)
        if tau is None or not trainer.is_global_zero:
            return
        image = trigger_to_image(tau, self.min_size)
        epoch = trainer.current_epoch + 1
        # The step Lightning logs this epoch's metrics at (it steps back one for epoch-end logging),
        # so the image lines up with val/acc_* of the same epoch.
        step = max(trainer.global_step - 1, 0)
        caption = f"epoch {epoch}, max|tau| = {tau.abs().max().item() * 255:.2f}/255"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(self.key, [image_to_uint8_hwc(image)], step=step, caption=[caption])
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image(self.key, image, global_step=step, dataformats="CHW")

    def on_fit_end(self, trainer, pl_module):
        tau = self._tau(pl_module)
        if tau is None or self.dirpath is None or not trainer.is_global_zero:
            return
        save_png_atomically(image_to_uint8_hwc(trigger_to_image(tau, self.min_size)), self.dirpath / IMAGE_NAME)
