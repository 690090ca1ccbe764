"""Datasets held on the training device (``data.placement=device``) and the loader that serves them there.

For data that fits in device memory (digits, Fashion-MNIST, CIFAR-10/100) a host DataLoader spends
its time on per-sample Python (indexing, transforms, collation) and copies every batch to the
device. Here the images are moved to the device once, stored as the files store them (uint8 where
the pixels are bytes), and each batch is one gather, one conversion to float, and a batched
crop + flip.

:class:`DeviceLoader` is a plain iterable with ``__len__``, not a torch DataLoader: Lightning
accepts any iterable for train/val/test, injects no sampler into one that is not a DataLoader and
does not check its worker count. Its order comes from the same samplers as the host path's
(``EpochSeededSampler``, ``EvalShardSampler``, ``shard_indices``), exposed as ``.sampler`` so that
Lightning's ``_set_sampler_epoch`` (``lightning.fabric.utilities.data``, called by the fit loop
before each epoch) finds it by ``getattr(loader, "sampler")`` and calls its ``set_epoch``.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trigact.data.views import to_unit_float


class CropFlip(NamedTuple):
    """torchvision's ``RandomCrop(size, padding=padding)`` (zero fill; the output keeps the input's
    size) followed by ``RandomHorizontalFlip()`` (probability 1/2), drawn per sample."""

    padding: int
    flip: bool = True


class DeviceRecipe(NamedTuple):
    """What a datamodule puts on the device, and how its batches are made from it.

    ``train_images`` are the images of the dataset's training file (before the validation carve),
    (N, C, H, W), uint8 or float32 in [0, 1]; ``train_positions`` / ``val_positions`` say which of
    them the train (and train-eval) and validation views hold, in the views' order. ``resize`` is the
    side the images are resized to after the conversion to float (None: as stored); ``augment`` the
    training views' crop + flip (None: none).
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    train_positions: Tensor
    val_positions: Tensor
    resize: int | None = None
    augment: CropFlip | None = None


def augment_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The seed of batch ``batch``'s crop and flip draws in epoch ``epoch`` on rank ``rank``.

    A function of these numbers only, not of how many batches this process drew before: a run
    resumed at an epoch's end or in its middle draws exactly what an uninterrupted one does. The rank
    is mixed in so that the ranks' batches are not all cropped in the same pattern.
    """
    words = [int(seed) % 2**64, int(epoch), int(rank), int(batch)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (CPU) on ``device``; to a GPU through pinned memory, without waiting for the GPU's queue."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def crop_flip(images: Tensor, augment: CropFlip, generator: torch.Generator) -> Tensor:
    """Each image of the (B, C, H, W) batch cut from its own zero-padded copy at a random offset and,
    with probability 1/2, mirrored left-right: ``augment`` drawn independently per sample.

    Hand-written because the library versions draw the wrong randomness for this: torchvision's v2
    transforms draw one crop and one flip per call, i.e. the same for a whole batch, and kornia
    draws from the global torch RNG, which other code consumes and which a resumed run does not
    replay. The offsets and flips are drawn from ``generator`` on the CPU (a handful of integers per
    batch), so the same seed gives the same batch on any device. The batch is padded once; then one
    gather by per-sample row and column indices does the crops and the flips together.
    """
    b, c, h, w = images.shape
    p = augment.padding
    offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator)  # RandomCrop: top, left in [0, 2p]
    flips = torch.rand(b, generator=generator) < 0.5 if augment.flip else torch.zeros(b, dtype=torch.bool)
    device = images.device
    offsets, flips = _to_device(offsets, device), _to_device(flips, device)
    padded = F.pad(images, (p, p, p, p)) if p else images  # zeros, as RandomCrop's fill=0
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # (B, H)
    cols = torch.arange(w, device=device).expand(b, w)
    cols = torch.where(flips[:, None], (w - 1) - cols, cols) + offsets[1, :, None]  # (B, W), mirrored where flipped
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def resize_batch(images: Tensor, size: int) -> Tensor:
    """Float images resized to (size, size) as torchvision's ``Resize((size, size), antialias=True)``
    does on a float tensor (bilinear, antialiased, no clamping), for a whole batch at once."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class DeviceLoader:
    """Batches ``(x float32 in [0, 1], y int64)`` gathered from ``images``/``labels`` on their device.

    ``positions[i]`` is the index into ``images`` of the view's item ``i``; ``sampler`` yields view
    items in the order to serve them (this rank's share), like a DataLoader's sampler; batches are
    consecutive runs of ``batch_size`` of them, the last one possibly shorter. With ``augment``, each
    batch is cropped and flipped (:func:`crop_flip`) with draws seeded by :func:`augment_seed` from
    ``(seed, epoch, rank, batch index)``, the epoch being the sampler's at the time the epoch's first
    batch is made.

    ``batch_sampler = None`` is there for Lightning, which reads it next to ``.sampler`` to ask
    whether an evaluation loader shuffles.
    """

    batch_sampler = None

    def __init__(self, images: Tensor, labels: Tensor, positions: Tensor, sampler: Iterable[int], batch_size: int, *,
                 resize: int | None = None, augment: CropFlip | None = None, seed: int = 0, rank: int = 0) -> None:
        self.images, self.labels = images, labels
        self.positions = torch.as_tensor(positions, dtype=torch.long).cpu()
        self.sampler = sampler
        self.batch_size = batch_size
        self.resize = resize
        self.augment = augment
        self.seed, self.rank = seed, rank
        self.progress = {"epoch": 0, "batches": 0}  # of the epoch being served: what a checkpoint records
        self._resume: dict | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def resume(self, progress: dict | None) -> None:
        """Let the next epoch that starts skip the batches ``progress`` says were served already, if it
        is the same epoch (a checkpoint written in the middle of it); any other epoch starts at batch 0."""
        self._resume = None if progress is None else {"epoch": int(progress["epoch"]), "batches": int(progress["batches"])}

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: nothing, the epoch included, is read until the first batch is asked for.
        epoch = int(getattr(self.sampler, "epoch", 0))
        start, self._resume = (self._resume["batches"] if self._resume and self._resume["epoch"] == epoch else 0), None
        order = self.positions[torch.as_tensor(list(self.sampler), dtype=torch.long)]
        order = _to_device(order, self.images.device)  # once per epoch
        self.progress = {"epoch": epoch, "batches": start}
        for index in range(start, len(self)):
            picks = order[index * self.batch_size:(index + 1) * self.batch_size]
            x = to_unit_float(self.images.index_select(0, picks))
            if self.resize is not None:
                x = resize_batch(x, self.resize)
            if self.augment is not None:
                generator = torch.Generator().manual_seed(augment_seed(self.seed, epoch, self.rank, index))
                x = crop_flip(x, self.augment, generator)
            self.progress = {"epoch": epoch, "batches": index + 1}  # handed out: a checkpoint after it skips it
            yield x.contiguous(), self.labels.index_select(0, picks)
