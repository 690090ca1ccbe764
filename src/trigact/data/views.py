"""A dataset seen through a transform, optionally at some of its indices only.

Train, train-eval and val share one underlying dataset (one copy of the images in memory, one
folder scan) and differ only in the transform applied on access and in which indices they hold.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch.utils.data import Dataset


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
