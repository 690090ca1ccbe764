"""A dataset seen through a transform.

Train and train-eval share one underlying dataset (one copy of the images in memory, one folder
scan) and differ only in the transform applied on access.
"""

from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset


class TransformedDataset(Dataset):
    """Yields `(transform(image), label)` for each `(image, label)` of `base`."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label
