"""The first N ImageNet classes from an ImageFolder tree, for the paper's ImageNet-subset experiments."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import pil_loader
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from trigact.data.base import DatasetSplits, TrigactDataModule
from trigact.common.validate import check_int
from trigact.data.views import ToUnitFloat, TransformedDataset
from trigact.common.errors import TrigactError


def read_rgb(path: str) -> torch.Tensor:
    """The image file at `path` as a uint8 (3, H, W) tensor, grey and CMYK converted to RGB.

    torchvision.io decodes JPEG, PNG, WebP and GIF straight into a tensor; the other formats
    ImageFolder accepts (BMP, PPM, TIFF) go through PIL.
    """
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):  # a format torchvision.io does not decode
        return read_rgb_pil(path)


def read_rgb_pil(path: str) -> torch.Tensor:
    """The image file at `path` decoded by PIL (torchvision ImageFolder's default loader), as uint8 RGB."""
    return v2.functional.pil_to_tensor(pil_loader(path))


# JPEG decoders may differ (the libjpeg build each links, its IDCT method and chroma upsampling), so
# the same file can give other pixels under torchvision.io and PIL. (With torchvision 0.29.1 and this
# machine's Pillow they gave identical pixels on a test JPEG; other builds need not.) `data.decoder` is
# therefore an image-defining key: it is in every bank's key and run hash, so images decoded one way
# never reuse banks of images decoded the other way.
DECODERS = {"torchvision": read_rgb, "pil": read_rgb_pil}


class FirstClassesImageFolder(ImageFolder):
    """ImageFolder over only the first `num_classes` class folders in sorted order.

    Choosing by sorted folder name (not by what a split happens to contain) gives train and val
    the same classes with the same label indices 0..N-1.
    """

    def __init__(self, root: str | Path, num_classes: int, decoder: str = "torchvision") -> None:
        self.num_classes = num_classes  # read by find_classes, which ImageFolder.__init__ calls
        super().__init__(str(root), loader=DECODERS[decoder])

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(directory)
        if len(classes) < self.num_classes:
            raise TrigactError(
                f"data.num_classes={self.num_classes} but {str(directory)!r} has only {len(classes)} class "
                "folders; lower data.num_classes or point data.root=... at a fuller copy"
            )
        chosen = classes[: self.num_classes]
        return chosen, {name: index for index, name in enumerate(chosen)}


class ImageNetSubsetDataModule(TrigactDataModule):
    """`<root>/train/<class>/*.JPEG` and `<root>/val/<class>/*.JPEG`, first `num_classes` classes.

    Standard ImageNet preprocessing: RandomResizedCrop + flip for training; resize to 256/224 of
    `image_size` and center-crop for evaluation. The `val/` folder serves as the test split; the
    validation split is carved out of `train/` (`val_size`, stratified per class). Files are decoded
    to uint8 tensors and transformed by torchvision's v2 on them (antialiased resizes).

    placement=device is refused: the decoded images do not fit in device memory.
    """

    name = "imagenet_subset"
    in_chans = 3
    placements = ("host",)
    placement_note = " is not available for imagenet_subset (its decoded images do not fit in device memory)"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, root: str, num_classes: int = 100, image_size: int = 224, decoder: str = "torchvision",
                 **loader_kwargs) -> None:
        """`decoder`: `torchvision` (torchvision.io, PIL for the formats it lacks) or `pil` (PIL for every
        file, as torchvision's ImageFolder and most reference pipelines decode). `loader_kwargs`:
        batch_size, eval_batch_size, num_workers, seed, pin_memory, val_size, split_seed, placement (base)."""
        if decoder not in DECODERS:
            raise TrigactError(f"data.decoder={decoder!r}; allowed: {', '.join(DECODERS)}")
        super().__init__(**loader_kwargs)
        self.root = Path(root)
        self.num_classes = check_int(num_classes, "data.num_classes")
        self.image_size = check_int(image_size, "data.image_size")
        self.decoder = decoder

    def _folder(self, split: str) -> FirstClassesImageFolder:
        directory = self.root / split
        if not directory.is_dir():
            raise TrigactError(
                f"ImageNet subset: {str(directory)!r} is not a directory; point data.root=... at a folder "
                "with train/<class>/ and val/<class>/ image folders"
            )
        try:
            return FirstClassesImageFolder(directory, self.num_classes, self.decoder)
        except FileNotFoundError as err:  # torchvision: no class folder, or a chosen class without images
            if not any(entry.is_dir() for entry in directory.iterdir()):
                problem = f"{str(directory)!r} has no class folders"
            else:
                problem = f"class folders in {str(directory)!r} hold no images ({str(err).split('. Supported')[0]})"
            raise TrigactError(
                f"ImageNet subset under data.root={str(self.root)!r}: {problem}; expected "
                "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG (.jpg, .png, ... images)"
            ) from None

    def build_splits(self) -> DatasetSplits:
        train_base, val_base = self._folder("train"), self._folder("val")
        size = self.image_size
        augment = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                              ToUnitFloat()])
        evaluate = v2.Compose([v2.ToImage(), v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size),
                               ToUnitFloat()])
        # ImageNet's own "val" folder is this datamodule's test split; validation is carved from train/.
        train, train_eval, val = self.carve_validation(train_base, train_base.targets, augment, evaluate)
        return DatasetSplits(train=train, train_eval=train_eval, val=val, test=TransformedDataset(val_base, evaluate))
