"""scikit-learn's embedded 8x8 digits: small enough that the whole pipeline runs in minutes on a CPU."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from trigact.data.base import DatasetSplits, TrigactDataModule, check_positive_int
from trigact.errors import TrigactError


@lru_cache(maxsize=4)
def load_digits_split(
    image_size: int, split_seed: int, test_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images (N, 1, S, S) in [0, 1], stratified split.

    Cached because the datamodule needs the train statistics in `__init__` and the tensors again in
    `setup`; the returned tensors are shared, so treat them as read-only.
    """
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    # Bilinear weights are convex, so this clamp only removes float rounding past [0, 1].
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=split_seed,
        stratify=digits.target,
    )
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


class DigitsDataModule(TrigactDataModule):
    """1797 grey 8x8 digits (values 0..16 scaled to [0, 1]), resized once to `image_size`, kept in memory.

    No augmentation. `mean`/`std` are computed in `__init__` from the train split at the chosen
    `image_size` (resizing changes the std). That is cheap: the data ships inside scikit-learn and
    loads in milliseconds, and the cached tensors are reused by `setup`.
    """

    name = "digits"
    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        image_size: int = 16,
        split_seed: int = 0,
        test_fraction: float = 0.2,
        **loader_kwargs,
    ) -> None:
        """`loader_kwargs`: batch_size, eval_batch_size, num_workers, seed, pin_memory (see base)."""
        super().__init__(**loader_kwargs)
        self.image_size = check_positive_int("data.image_size", image_size)
        if isinstance(split_seed, bool) or not isinstance(split_seed, int):
            raise TrigactError(f"data.split_seed must be an integer, got {split_seed!r}")
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise TrigactError(f"data.test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
        self.split_seed = split_seed
        self.test_fraction = float(test_fraction)
        x_train = load_digits_split(self.image_size, self.split_seed, self.test_fraction)[0]
        self.mean = (x_train.mean().item(),)
        self.std = (x_train.std().item(),)

    def build_splits(self) -> DatasetSplits:
        x_train, y_train, x_test, y_test = load_digits_split(self.image_size, self.split_seed, self.test_fraction)
        train = TensorDataset(x_train, y_train)
        # Without augmentation the train view and the train-eval view are the same data.
        return DatasetSplits(train=train, train_eval=train, test=TensorDataset(x_test, y_test))
