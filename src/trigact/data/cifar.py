"""CIFAR-10 and CIFAR-100 through torchvision, with the paper's crop-and-flip augmentation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.transforms import v2

from trigact.data.base import DatasetSplits, TrigactDataModule, download_error
from trigact.data.device import CropFlip, DeviceRecipe
from trigact.data.views import ToUnitFloat, TransformedDataset
from trigact.common.errors import TrigactError


class CIFARDataModule(TrigactDataModule):
    """Shared body of the two CIFAR datamodules: 3x32x32 images read by a torchvision dataset class.

    The images stay in memory once, as the uint8 (N, 3, 32, 32) tensor of the archive's bytes; train,
    train-eval and val (carved from the 50k training images) are transform views of it. The
    transforms are torchvision's v2 on those uint8 tensors (no PIL image per access): crop with
    zero padding 4 and a flip for training, then the division by 255 of `ToTensor`, so the eval
    images are exactly `ToTensor()`'s. With placement=device the same uint8 tensor goes to the
    device, and the same crop and flip run there, batched.
    """

    dataset_cls: type[CIFAR10]
    title: str
    in_chans = 3
    image_size = 32
    PADDING = 4  # RandomCrop(32, padding=4), on the host and on the device

    def __init__(self, root: str, download: bool = False, **loader_kwargs) -> None:
        """`loader_kwargs`: batch_size, eval_batch_size, num_workers, seed, pin_memory, val_size, split_seed,
        placement (base)."""
        super().__init__(**loader_kwargs)
        self.root = Path(root)
        self.download = bool(download)
        self._bases: tuple[TensorDataset, TensorDataset] | None = None

    def prepare_data(self) -> None:
        """Fetch the archive on rank 0 if asked to; torchvision skips it when the files check out."""
        if self.download:
            self._open(train=False)

    def _open(self, train: bool) -> CIFAR10:
        folder = self.dataset_cls.base_folder
        try:
            return self.dataset_cls(str(self.root), train=train, download=self.download)
        except (RuntimeError, OSError) as err:
            if self.download:  # no network (URLError), a read-only root (PermissionError), a bad checksum
                expected = f"{self.dataset_cls.filename} or its extracted folder {folder}/"
                raise download_error(self.title, self.root, expected, err) from err
            if not isinstance(err, RuntimeError):
                raise
            # torchvision's "Dataset not found or corrupted" (md5 mismatch included)
            raise TrigactError(
                f"{self.title} not found or corrupted: no valid {str(self.root / folder)!r}; "
                f"set data.download=true to fetch it, or data.root=... to the directory that holds {folder}"
            ) from err

    def _tensors(self, train: bool) -> TensorDataset:
        """The split as (uint8 (N, 3, 32, 32) images, int64 labels), from torchvision's parsed arrays."""
        split = self._open(train=train)
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # stored (N, H, W, C)
        return TensorDataset(images, torch.as_tensor(split.targets, dtype=torch.long))

    def build_splits(self) -> DatasetSplits:
        train_base, test_base = self._tensors(train=True), self._tensors(train=False)
        self._bases = (train_base, test_base)
        to_float = v2.Compose([v2.ToImage(), ToUnitFloat()])
        augment = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=self.PADDING), v2.RandomHorizontalFlip(),
                              ToUnitFloat()])
        train, train_eval, val = self.carve_validation(train_base, train_base.tensors[1], augment, to_float)
        return DatasetSplits(train=train, train_eval=train_eval, val=val, test=TransformedDataset(test_base, to_float))

    def device_recipe(self) -> DeviceRecipe:
        return self.recipe_from_bases(augment=CropFlip(self.PADDING))


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 50k train (of which val_size for validation) / 10k test, 10 classes."""

    dataset_cls = CIFAR10
    title = "CIFAR-10"
    name = "cifar10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 50k train (of which val_size for validation) / 10k test, 100 fine classes."""

    dataset_cls = CIFAR100
    title = "CIFAR-100"
    name = "cifar100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
