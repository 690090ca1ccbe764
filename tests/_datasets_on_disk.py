"""Tiny datasets written in the real on-disk formats (CIFAR's pickled batches, ImageNet-style
ImageFolder JPEGs), for the data tests and the paper-experiment smoke tests: CIFAR and ImageNet cannot
be downloaded on the development machines."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from trigact.data import CIFAR10DataModule, CIFAR100DataModule

CIFAR_LAYOUTS = {
    # class: (folder, train files, test file, meta file, label key, meta key)
    CIFAR10DataModule: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                        "batches.meta", "labels", "label_names"),
    CIFAR100DataModule: ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def write_cifar(root: Path, module: type, per_file: int = 3) -> tuple[np.ndarray, list, np.ndarray, list]:
    """Pickled dicts with uint8 (N, 3072) rows in CHW order, like the real archives.

    The real files are Python 2 pickles whose str keys ('data', 'labels'; b'data' when read with
    encoding='bytes') load as str under torchvision's encoding='latin1'; Python 3 str keys load the same.
    """
    folder, train_files, test_file, meta_file, label_key, meta_key = CIFAR_LAYOUTS[module]
    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    splits = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        data = rng.integers(0, 256, (per_file * len(files), 3072), dtype=np.uint8)
        labels = rng.integers(0, module.num_classes, len(data)).tolist()
        for i, name in enumerate(files):
            rows = slice(i * per_file, (i + 1) * per_file)
            entry = {"data": data[rows], label_key: labels[rows], "batch_label": f"{split} batch {i}"}
            if module is CIFAR100DataModule:
                entry["coarse_labels"] = [label // 5 for label in labels[rows]]
            (base / name).write_bytes(pickle.dumps(entry))
        splits[split] = (data, labels)
    (base / meta_file).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(module.num_classes)]}))
    return (*splits["train"], *splits["test"])


def write_image_folder(root: Path, classes: list[str], per_class: int = 2) -> None:
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"img{i}.JPEG")


def accept_tiny_cifar_checksums(monkeypatch) -> None:
    """Our tiny CIFAR files cannot match the md5 sums of the real archives that torchvision checks:
    replace only the checksum (the files must still exist), in the calling test only."""
    import os

    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX ubyte file (gzipped when the name ends in .gz): big-endian magic 0x0000 08 <ndim>,
    big-endian uint32 sizes, then the bytes in C order."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 3) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST IDX files (gzipped, Debian's flat layout) with random 28x28 images;
    returns the arrays by file name."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(root / f"{name}.gz", array)
    return arrays
