"""Fashion-MNIST from its four IDX files, read where Debian's `dataset-fashion-mnist` puts them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchvision import transforms
from torchvision.datasets import FashionMNIST

from trigact.data.base import DatasetSplits, TrigactDataModule, download_error
from trigact.data.device import CropFlip, DeviceRecipe
from trigact.common.validate import check_int
from trigact.data.idx import read_idx_ubyte
from trigact.data.views import TransformedDataset
from trigact.common.errors import TrigactError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
NATIVE_SIZE = 28
IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


class FashionMNISTDataModule(TrigactDataModule):
    """Grey 28x28 clothing images, 10 classes, held in memory as uint8 and scaled to [0, 1] on access.

    The IDX files are looked up, each raw or gzipped, in `root` (Debian's flat layout) and in
    `root/FashionMNIST/raw` (where torchvision's downloader puts them). Only with `download=True`,
    and only when they are missing, torchvision downloads them.

    With placement=device the uint8 images go to the device; the resize to `image_size` (when not
    28) and the augmentation run there, batched, with the same parameters.
    """

    name = "fashion_mnist"
    num_classes = 10
    in_chans = 1
    mean = (0.2860,)
    std = (0.3530,)
    in_memory = True

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        download: bool = False,
        augment: bool = False,
        image_size: int = NATIVE_SIZE,
        **loader_kwargs,
    ) -> None:
        """`loader_kwargs`: batch_size, eval_batch_size, num_workers, seed, pin_memory, val_size, split_seed,
        placement (base)."""
        super().__init__(**loader_kwargs)
        self.root = Path(root)
        self.download = bool(download)
        self.augment = bool(augment)
        self.image_size = check_int(image_size, "data.image_size")
        self._bases: tuple[TensorDataset, TensorDataset] | None = None

    def _find_files(self) -> dict[str, Path] | None:
        """File name -> path for all four files from the first directory that has them all, else None."""
        names = [*IMAGE_FILES.values(), *LABEL_FILES.values()]
        for directory in (self.root, self.root / "FashionMNIST" / "raw"):
            found = {}
            for name in names:
                candidates = [directory / name, directory / f"{name}.gz"]
                existing = [path for path in candidates if path.is_file()]
                if existing:
                    found[name] = existing[0]
            if len(found) == len(names):
                return found
        return None

    def prepare_data(self) -> None:
        """Download through torchvision, only if asked to and the files are missing (rank 0 only)."""
        if self.download and self._find_files() is None:
            try:
                FashionMNIST(str(self.root), train=True, download=True)
            except (RuntimeError, OSError) as err:  # all mirrors failed; URLError, PermissionError, ...
                names = ", ".join(f"{name}[.gz]" for name in [*IMAGE_FILES.values(), *LABEL_FILES.values()])
                raise download_error("Fashion-MNIST", self.root, f"the IDX files {names}", err) from err

    def _missing_error(self) -> TrigactError:
        if self.root.is_dir():
            names = ", ".join([*IMAGE_FILES.values(), *LABEL_FILES.values()])
            where = f"{str(self.root)!r} lacks some of {names} (raw or .gz)"
        else:
            where = f"directory {str(self.root)!r} does not exist"
        return TrigactError(
            f"Fashion-MNIST not found: {where}; install it with `apt-get install dataset-fashion-mnist`, "
            "or set data.download=true, or point data.root=... at a directory holding the IDX files"
        )

    def _load_split(self, files: dict[str, Path], split: str) -> TensorDataset:
        images_path, labels_path = files[IMAGE_FILES[split]], files[LABEL_FILES[split]]
        images = read_idx_ubyte(images_path, ndim=3)
        labels = read_idx_ubyte(labels_path, ndim=1)
        if len(images) != len(labels):
            raise TrigactError(
                f"{str(images_path)!r} holds {len(images)} images but {str(labels_path)!r} holds {len(labels)} labels"
            )
        if images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
            raise TrigactError(f"{str(images_path)!r} holds images of size {images.shape[1:]}, expected 28x28")
        if labels.size and labels.max() >= self.num_classes:
            raise TrigactError(f"{str(labels_path)!r} holds label {labels.max()}, expected 0..{self.num_classes - 1}")
        return TensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())

    # The host transforms and `device_recipe` must agree: padding 2 and a flip, after the resize.
    PADDING = 2

    def _transforms(self) -> tuple[transforms.Compose, transforms.Compose]:
        """(train, eval) transforms on uint8 (1, 28, 28) tensors; augmentation only when asked for."""
        eval_steps = [transforms.ConvertImageDtype(torch.float32)]
        if self.image_size != NATIVE_SIZE:
            eval_steps.append(transforms.Resize((self.image_size, self.image_size), antialias=True))
        train_steps = list(eval_steps)
        if self.augment:
            train_steps += [transforms.RandomCrop(self.image_size, padding=self.PADDING),
                            transforms.RandomHorizontalFlip()]
        return transforms.Compose(train_steps), transforms.Compose(eval_steps)

    def build_splits(self) -> DatasetSplits:
        files = self._find_files()
        if files is None and self.download:
            self.prepare_data()
            files = self._find_files()
        if files is None:
            raise self._missing_error()
        train_base, test_base = self._load_split(files, "train"), self._load_split(files, "test")
        self._bases = (train_base, test_base)
        train_tf, eval_tf = self._transforms()
        train, train_eval, val = self.carve_validation(train_base, train_base.tensors[1], train_tf, eval_tf)
        return DatasetSplits(train=train, train_eval=train_eval, val=val, test=TransformedDataset(test_base, eval_tf))

    def device_recipe(self) -> DeviceRecipe:
        return self.recipe_from_bases(resize=None if self.image_size == NATIVE_SIZE else self.image_size,
                                      augment=CropFlip(self.PADDING) if self.augment else None)
