"""A dataset seen through a transform, optionally at some of its indices only.

Train, train-eval and val share one underlying dataset (one copy of the images in memory, one
folder scan) and differ only in the transform applied on access and in which indices they hold.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1], divided by 255: the very values of ``ToTensor`` and
    ``ConvertImageDtype``. (``v2.ToDtype(torch.float32, scale=True)`` multiplies by 1/255 instead,
    which differs from them in the last bit for about half of the 256 values.) Float images are
    returned as float32 unchanged."""
    images = images.as_subclass(torch.Tensor)  # a plain tensor, not a tv_tensors.Image
    return images.to(torch.float32).div_(255) if images.dtype == torch.uint8 else images.to(torch.float32)


class ToUnitFloat(v2.Transform):
    """The v2 transform of :func:`to_unit_float`: the last step of the tensor pipelines."""

    def transform(self, inpt, params):
        return to_unit_float(inpt)


class TransformedDataset(Dataset):
    """Yields `(transform(image), label)` for each `(image, label)` of `base`, or of `base` at `indices`."""

    def __init__(self, base: Dataset, transform: Callable, indices: Sequence[int] | None = None) -> None:
        self.base = base
        self.transform = transform
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.base[index if self.indices is None else self.indices[index]]
        return self.transform(image), label


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The labels of ``dataset`` in its index order, read without loading (or transforming) images
    where the dataset says them: a TensorDataset's second tensor, ``.targets`` (torchvision), through
    TransformedDataset and Subset views; anything else is iterated once."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return torch.as_tensor(dataset.tensors[1]).long()
    if isinstance(dataset, (TransformedDataset, Subset)):
        labels = dataset_labels(dataset.dataset if isinstance(dataset, Subset) else dataset.base)
        indices = getattr(dataset, "indices", None)
        return labels if indices is None else labels[torch.as_tensor(list(indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).long()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)
