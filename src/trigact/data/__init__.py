"""Datamodules by dataset name: one LightningDataModule per dataset family over `TrigactDataModule`."""

from __future__ import annotations

from trigact.data.base import DatasetSplits, TrigactDataModule
from trigact.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from trigact.data.digits import DigitsDataModule
from trigact.data.fashion_mnist import FashionMNISTDataModule
from trigact.data.imagenet_subset import ImageNetSubsetDataModule
from trigact.common.errors import unknown_name

DATAMODULES: dict[str, type[TrigactDataModule]] = {
    module.name: module
    for module in (
        DigitsDataModule,
        FashionMNISTDataModule,
        CIFAR10DataModule,
        CIFAR100DataModule,
        ImageNetSubsetDataModule,
    )
}


def build_datamodule(name: str, **kwargs) -> TrigactDataModule:
    """The datamodule registered as `name`, built with `kwargs`; an unknown name lists the known ones."""
    if name not in DATAMODULES:
        raise unknown_name("dataset", name, DATAMODULES)
    return DATAMODULES[name](**kwargs)


__all__ = [
    "DATAMODULES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DatasetSplits",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageNetSubsetDataModule",
    "TrigactDataModule",
    "build_datamodule",
]
