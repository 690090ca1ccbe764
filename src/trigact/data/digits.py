"""scikit-learn's embedded 8x8 digits: small enough that the whole pipeline runs in minutes on a CPU."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from trigact.data.base import DatasetSplits, TrigactDataModule, validation_indices
from trigact.data.device import DeviceRecipe
from trigact.common.validate import check_int
from trigact.common.errors import TrigactError


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

    No augmentation. With placement=device the images are held on the device as float32, not
    uint8 like the other datasets': their pixels are k/16 (and bilinearly resized), which bytes
    scaled by 1/255 cannot hold. The test split is a fixed stratified `test_fraction` (`split_seed`); the
    validation split (`val_size`, see the base class) is carved out of the rest with the same seed.
    `mean`/`std` are computed in `__init__` from the images left for training, at the chosen
    `image_size` (resizing changes the std). That is cheap: the data ships inside scikit-learn and
    loads in milliseconds, and the cached tensors are reused by `setup`.
    """

    name = "digits"
    num_classes = 10
    in_chans = 1
    in_memory = True

    def __init__(
        self,
        image_size: int = 16,
        test_fraction: float = 0.2,
        **loader_kwargs,
    ) -> None:
        """`loader_kwargs`: batch_size, eval_batch_size, num_workers, seed, pin_memory, val_size, split_seed,
        placement (base)."""
        super().__init__(**loader_kwargs)
        self.image_size = check_int(image_size, "data.image_size")
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise TrigactError(f"data.test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
        self.test_fraction = float(test_fraction)
        x_train, y_train, _, _ = load_digits_split(self.image_size, self.split_seed, self.test_fraction)
        self._train_idx, self._val_idx = (
            torch.from_numpy(i) for i in validation_indices(y_train.numpy(), self.val_size, self.split_seed)
        )
        self.mean = (x_train[self._train_idx].mean().item(),)
        self.std = (x_train[self._train_idx].std().item(),)

    def build_splits(self) -> DatasetSplits:
        x_train, y_train, x_test, y_test = load_digits_split(self.image_size, self.split_seed, self.test_fraction)
        train = TensorDataset(x_train[self._train_idx], y_train[self._train_idx])
        val = TensorDataset(x_train[self._val_idx], y_train[self._val_idx])
        # Without augmentation the train view and the train-eval view are the same data.
        return DatasetSplits(train=train, train_eval=train, val=val, test=TensorDataset(x_test, y_test))

    def device_recipe(self) -> DeviceRecipe:
        x_train, y_train, x_test, y_test = load_digits_split(self.image_size, self.split_seed, self.test_fraction)
        return DeviceRecipe(train_images=x_train, train_labels=y_train, test_images=x_test, test_labels=y_test,
                            train_positions=self._train_idx, val_positions=self._val_idx)
