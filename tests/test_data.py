"""Datamodules: shapes, value ranges, splits (validation carved from train), deterministic shuffling,
sharding, error messages, configs.

Every dataset except digits is written here in its real on-disk format in tmp_path, at a tiny size,
and read back through the production code path.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from urllib.error import URLError

import lightning as L
import numpy as np
import pytest
import torch
from trigact.common.config import instantiate_named
from omegaconf import OmegaConf
from torchvision import transforms

from trigact.data import (
    DATAMODULES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageNetSubsetDataModule,
    TrigactDataModule,
    build_datamodule,
)
from trigact.data.base import validation_indices
from trigact.data.digits import load_digits_split
from trigact.common.errors import TrigactError

from _datasets_on_disk import write_cifar, write_image_folder

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
DEBIAN_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def assert_one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def train_order(dm: TrigactDataModule, epoch: int) -> list[int]:
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(epoch)
    return list(sampler)


def image_keys(images) -> set[bytes]:
    """Each image's bytes, to compare splits by content (the tiny test datasets hold no duplicates)."""
    return {x.numpy().tobytes() for x in images}


def dataset_images(dataset) -> list[torch.Tensor]:
    return [dataset[i][0] for i in range(len(dataset))]


def loader_images(loader) -> list[torch.Tensor]:
    return [x for batch, _ in loader for x in batch]


def assert_val_carved_from_train(dm: TrigactDataModule, n_train_data: int, n_val: int) -> None:
    """The datamodule's val images are `n_val` of its training data's, disjoint from train and test,
    served in order (eval transforms) by `val_dataloader`; train/train-eval hold exactly the rest."""
    assert (len(dm.train_set), len(dm.train_eval_set), len(dm.val_set)) == (n_train_data - n_val,) * 2 + (n_val,)
    val, train = image_keys(dataset_images(dm.val_set)), image_keys(dataset_images(dm.train_eval_set))
    test = image_keys(dataset_images(dm.test_set))
    assert len(val) == n_val and not val & train and not val & test
    if n_val:
        served = loader_images(dm.val_dataloader())
        assert len(served) == n_val and image_keys(served) == val
    else:
        assert list(dm.val_dataloader()) == []


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_and_split_sizes():
    dm = DigitsDataModule(batch_size=32)
    assert (dm.name, dm.num_classes, dm.in_chans, dm.image_size) == ("digits", 10, 1, 16)
    assert len(dm.mean) == len(dm.std) == 1 and 0 < dm.mean[0] < 1 and 0 < dm.std[0] < 1
    dm.setup()
    # 1437 training images: 10% (data.val_size=0.1) carved out for validation.
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set), len(dm.train_eval_set)) == (1293, 144, 360, 1293)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32
    x_test, y_test = next(iter(dm.test_dataloader()))
    assert x_test.shape == (32, 1, 16, 16)  # eval_batch_size defaults to batch_size
    for images, labels in (dm.train_set.tensors, dm.val_set.tensors, dm.test_set.tensors):
        assert images.min() >= 0 and images.max() <= 1
        assert set(labels.tolist()) == set(range(10))  # stratified: every class in every split
    # The stats in __init__ are those of the train images the module serves.
    train_images = dm.train_set.tensors[0]
    assert dm.mean[0] == pytest.approx(train_images.mean().item())
    assert dm.std[0] == pytest.approx(train_images.std().item())


def test_digits_image_size_resizes():
    dm = DigitsDataModule(image_size=8)
    dm.setup()
    x, _ = dm.test_set[0]
    assert x.shape == (1, 8, 8)
    # At the native size, pixels are the raw 0..16 values over 16.
    assert torch.all((x * 16).round() == x * 16)


def test_digits_split_is_deterministic_per_split_seed():
    load_digits_split.cache_clear()  # recompute, so equality is not just the cache handing back one object
    first = load_digits_split(16, 0, 0.2)
    load_digits_split.cache_clear()
    again = load_digits_split(16, 0, 0.2)
    other = load_digits_split(16, 1, 0.2)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[2], other[2])  # another split_seed picks other test images


def test_val_dataloader_serves_training_images_never_test_images():
    dm = DigitsDataModule(image_size=8)  # at 8x8 the 1797 digits are pairwise distinct images
    dm.setup()
    served = image_keys(loader_images(dm.val_dataloader()))
    x_train_data, _, x_test, _ = load_digits_split(8, 0, 0.2)
    assert served and not served & image_keys(x_test)
    assert served <= image_keys(x_train_data) and len(served) == len(dm.val_set)


@pytest.mark.parametrize(("val_size", "n_val"), [(0.1, 144), (100, 100), (0, 0)])
def test_digits_val_split_is_carved_from_train(val_size, n_val):
    dm = DigitsDataModule(image_size=8, val_size=val_size)
    dm.setup()
    assert_val_carved_from_train(dm, 1437, n_val)
    x_train_data = load_digits_split(8, 0, 0.2)[0]
    assert image_keys(dm.train_set.tensors[0]) | image_keys(dm.val_set.tensors[0]) == image_keys(x_train_data)
    # The model's normalization statistics are those of the images it trains on.
    assert dm.mean[0] == pytest.approx(dm.train_set.tensors[0].mean().item())
    if n_val:  # stratified: each class gives its share, to within one image
        shares = torch.bincount(dm.val_set.tensors[1], minlength=10).double()
        expected = torch.bincount(load_digits_split(8, 0, 0.2)[1], minlength=10).double() * n_val / 1437
        assert (shares - expected).abs().max() < 1


def test_val_split_is_fixed_by_split_seed_not_by_the_training_seed():
    def val_images(**kwargs):
        dm = DigitsDataModule(image_size=8, **kwargs)
        dm.setup()
        return dm.val_set.tensors[0]

    assert torch.equal(val_images(seed=0), val_images(seed=3))
    assert not torch.equal(val_images(split_seed=0), val_images(split_seed=1))


def test_validation_indices_partition_and_stratify():
    labels = np.repeat(np.arange(4), [30, 10, 5, 55])
    train, val = validation_indices(labels, 0.2, seed=0)
    assert len(val) == 20 and sorted([*train, *val]) == list(range(100))
    assert np.bincount(labels[val], minlength=4).tolist() == [6, 2, 1, 11]
    again_train, again_val = validation_indices(labels, 0.2, seed=0)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, validation_indices(labels, 0.2, seed=1)[1])
    assert len(validation_indices(labels, 0.001, seed=0)[1]) == 1  # a fraction > 0 carves at least one
    for too_many in (100, 0.999):
        with pytest.raises(TrigactError) as excinfo:
            validation_indices(labels, too_many, seed=0)
        assert_one_line_error(excinfo, f"data.val_size={too_many!r}", "only 100")


def test_digits_setup_is_idempotent():
    dm = DigitsDataModule()
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("test")
    assert dm.train_set is train_set


def test_train_order_changes_per_epoch_and_is_reproducible():
    dm = DigitsDataModule(seed=7)
    dm.setup()
    epoch0, epoch1 = train_order(dm, 0), train_order(dm, 1)
    assert sorted(epoch0) == list(range(len(dm.train_set)))
    assert epoch0 != epoch1
    fresh = DigitsDataModule(seed=7)  # e.g. a run resumed at epoch 1
    fresh.setup()
    assert train_order(fresh, 1) == epoch1
    other_seed = DigitsDataModule(seed=8)
    other_seed.setup()
    assert train_order(other_seed, 1) != epoch1


def test_lightning_sets_the_epoch_on_our_sampler():
    """The reproducible order relies on Lightning calling set_epoch and keeping our sampler."""

    class FirstBatchRecorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.first_labels: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.first_labels.append(batch[1].tolist())
            return self.layer(batch[0].mean((1, 2, 3)).unsqueeze(1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = DigitsDataModule(batch_size=16, seed=3)
    model = FirstBatchRecorder()
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    labels = dm.train_set.tensors[1]
    expected = [labels[train_order(dm, epoch)[:16]].tolist() for epoch in (0, 1)]
    assert model.first_labels == expected


def test_trigger_shards_cover_every_index_once():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    shards = [dm.trigger_dataloader(rank=rank, world_size=2) for rank in range(2)]
    indices = [i for loader in shards for i in loader.dataset.indices]
    assert sorted(indices) == list(range(len(dm.train_eval_set)))
    # Summed over ranks, the pass sees exactly the single-process data.
    total = sum(x.sum() for loader in shards for x, _ in loader)
    single = sum(x.sum() for x, _ in dm.trigger_dataloader())
    assert total == pytest.approx(single.item(), rel=1e-6)
    with pytest.raises(TrigactError) as excinfo:
        dm.trigger_dataloader(rank=2, world_size=2)
    assert_one_line_error(excinfo, "rank", "2")


def test_worker_processes_give_the_same_batches():
    dm = DigitsDataModule(batch_size=256, num_workers=1, eval_batch_size=512)
    dm.setup()
    loader = dm.test_dataloader()
    assert loader.persistent_workers and loader.batch_size == 512
    in_process = DigitsDataModule(batch_size=256, eval_batch_size=512)
    in_process.setup()
    for (xa, ya), (xb, yb) in zip(loader, in_process.test_dataloader()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"batch_size": 0}, "data.batch_size"),
        ({"eval_batch_size": -1}, "data.eval_batch_size"),
        ({"num_workers": -2}, "data.num_workers"),
        ({"image_size": 0}, "data.image_size"),
        ({"test_fraction": 1.5}, "data.test_fraction"),
        ({"val_size": -1}, "data.val_size"),
        ({"val_size": 1.0}, "data.val_size"),
        ({"val_size": "10%"}, "data.val_size"),
        ({"val_size": True}, "data.val_size"),
        ({"val_size": 1437}, "data.val_size"),  # leaves no training image
        ({"split_seed": "a"}, "data.split_seed"),
    ],
)
def test_bad_arguments_give_one_line_errors(kwargs, key):
    with pytest.raises(TrigactError) as excinfo:
        DigitsDataModule(**kwargs)
    assert_one_line_error(excinfo, key, repr(next(iter(kwargs.values()))))


# ---------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as documented: big-endian magic 0x0000 08 <ndim>, big-endian uint32 dims, uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_fashion(directory: Path, gz: bool, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(directory / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_fashion_round_trips_pixels_and_labels(tmp_path, gz):
    arrays = write_fashion(tmp_path, gz)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=8, val_size=0)  # every train image, in file order
    assert (dm.name, dm.num_classes, dm.in_chans, dm.image_size) == ("fashion_mnist", 10, 1, 28)
    assert dm.mean == (0.2860,) and dm.std == (0.3530,)
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (20, 10)
    for dataset, images, labels in (
        (dm.train_eval_set, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]),
        (dm.train_set, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]),  # augment=False
        (dm.test_set, arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    ):
        for i in range(len(images)):
            x, y = dataset[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            assert torch.equal(x, torch.from_numpy(images[i]).float().unsqueeze(0) / 255)
            assert int(y) == labels[i]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28)


def test_fashion_augment_and_resize(tmp_path):
    write_fashion(tmp_path, gz=True)
    dm = FashionMNISTDataModule(root=str(tmp_path), augment=True, image_size=32, val_size=0)
    dm.setup()
    augmented = torch.stack([dm.train_set[i][0] for i in range(20)])
    plain = torch.stack([dm.train_eval_set[i][0] for i in range(20)])
    assert augmented.shape == plain.shape == (20, 1, 32, 32)
    assert augmented.min() >= 0 and augmented.max() <= 1
    assert not torch.equal(augmented, plain)  # 20 random crops/flips all being identity: ~impossible
    assert dm.test_set[0][0].shape == (1, 32, 32)


def test_fashion_val_split_is_carved_from_train_without_augmentation(tmp_path):
    arrays = write_fashion(tmp_path, gz=True)
    dm = FashionMNISTDataModule(root=str(tmp_path), augment=True, val_size=0.25)
    dm.setup()
    assert_val_carved_from_train(dm, 20, 5)
    raw = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().unsqueeze(1) / 255
    # Validation images are the file's training images as they are (eval transforms, no crop/flip).
    assert image_keys(dataset_images(dm.val_set)) <= image_keys(raw)
    assert all(int(dm.val_set[i][1]) == arrays["train-labels-idx1-ubyte"][j] for i, j in enumerate(dm.val_set.indices))


def test_fashion_reads_torchvision_download_layout(tmp_path):
    arrays = write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    dm = FashionMNISTDataModule(root=str(tmp_path))
    dm.setup()
    assert int(dm.test_set[3][1]) == arrays["t10k-labels-idx1-ubyte"][3]


def test_fashion_missing_data_says_how_to_get_it(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path / "nowhere"))  # construction never touches disk
    assert dm.num_classes == 10
    with pytest.raises(TrigactError) as excinfo:
        dm.setup()
    assert_one_line_error(excinfo, "dataset-fashion-mnist", "data.download=true", "data.root", "nowhere")


def _no_network(*args, **kwargs):
    raise URLError("no network")


def _read_only(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "/read-only")


@pytest.mark.parametrize("failure", [_no_network, _read_only], ids=["no-network", "read-only-root"])
def test_fashion_failed_download_says_to_place_the_files(tmp_path, monkeypatch, failure):
    import torchvision.datasets.mnist as tv_mnist

    if failure is _no_network:  # every mirror fails; torchvision then raises a multi-line RuntimeError
        monkeypatch.setattr(tv_mnist, "download_and_extract_archive", failure)
    else:  # os.makedirs of the raw folder fails
        monkeypatch.setattr(tv_mnist.FashionMNIST, "download", failure)
    with pytest.raises(TrigactError) as excinfo:
        FashionMNISTDataModule(root=str(tmp_path / "fm"), download=True).setup()
    assert_one_line_error(excinfo, "Fashion-MNIST", f"data.root={str(tmp_path / 'fm')!r}", "manually",
                          "train-images-idx3-ubyte")


@pytest.mark.parametrize("damage", ["bad_magic", "truncated_raw", "truncated_gzip", "count_mismatch"])
def test_fashion_corrupt_file_is_named(tmp_path, damage):
    gz = damage == "truncated_gzip"
    arrays = write_fashion(tmp_path, gz=gz)
    target = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    data = target.read_bytes()
    if damage == "bad_magic":
        target.write_bytes(b"\x00\x00\x08\x01" + data[4:])
    elif damage == "count_mismatch":
        target = tmp_path / "train-labels-idx1-ubyte"
        write_idx(target, arrays["train-labels-idx1-ubyte"][:5])
    else:
        target.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrigactError) as excinfo:
        FashionMNISTDataModule(root=str(tmp_path)).setup()
    assert_one_line_error(excinfo, str(target))


@pytest.mark.skipif(not DEBIAN_FASHION_ROOT.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_debian_package():
    dm = FashionMNISTDataModule()
    dm.setup()
    # 60000 training images, 10% of them carved out for validation (the default data.val_size=0.1).
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54000, 6000, 10000)
    images = torch.stack([dm.train_eval_set[i][0] for i in range(0, 54000, 54)])
    assert images.mean().item() == pytest.approx(dm.mean[0], abs=0.02)
    assert images.std().item() == pytest.approx(dm.std[0], abs=0.02)


# ---------------------------------------------------------------- cifar

# CIFAR_LAYOUTS and write_cifar: tests/_datasets_on_disk.py (the paper-experiment smoke tests use them too)


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """Our tiny files cannot match the md5 sums of the real archives that torchvision checks.

    Replace only the checksum (file existence is still required), in the test only: torchvision's
    parsing and our production code path run unchanged.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("module", [CIFAR10DataModule, CIFAR100DataModule], ids=["cifar10", "cifar100"])
def test_cifar_round_trips_real_format(tmp_path, skip_cifar_md5, module):
    train_data, train_labels, test_data, test_labels = write_cifar(tmp_path, module)
    dm = module(root=str(tmp_path), batch_size=2, val_size=0)  # every train image, in file order
    assert (dm.in_chans, dm.image_size, len(dm.mean), len(dm.std)) == (3, 32, 3, 3)
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (len(train_labels), len(test_labels))
    for train, dataset, data, labels in ((True, dm.train_eval_set, train_data, train_labels),
                                         (False, dm.test_set, test_data, test_labels)):
        archive = module.dataset_cls(str(tmp_path), train=train)  # torchvision's own reading: PIL images
        for i in range(len(labels)):
            x, y = dataset[i]
            assert type(x) is torch.Tensor and x.dtype == torch.float32
            assert torch.equal(x, torch.from_numpy(data[i].reshape(3, 32, 32)).float() / 255)
            assert torch.equal(x, transforms.ToTensor()(archive[i][0]))  # the eval values of the former pipeline
            assert y == labels[i]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_cifar_train_view_is_crop_and_flip_of_the_archive_images(tmp_path, skip_cifar_md5):
    """The v2 train pipeline on uint8 tensors: each image a 32x32 crop of the image zero-padded by 4
    (possibly mirrored), in [0, 1]; over several draws the crops differ."""
    train_data, _, _, _ = write_cifar(tmp_path, CIFAR10DataModule, per_file=1)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=0)
    dm.setup()
    image = torch.from_numpy(train_data[0].reshape(3, 32, 32)).float() / 255
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crops = {(t, l, f): (padded[:, t:t + 32, l:l + 32].flip(-1) if f else padded[:, t:t + 32, l:l + 32])
             for t in range(9) for l in range(9) for f in (False, True)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        x, _ = dm.train_set[0]
        assert type(x) is torch.Tensor and x.shape == (3, 32, 32) and x.dtype == torch.float32
        (match, *_) = [key for key, crop in crops.items() if torch.equal(crop, x)]
        seen.add(match)
    assert len(seen) > 5


@pytest.mark.parametrize("module", [CIFAR10DataModule, CIFAR100DataModule], ids=["cifar10", "cifar100"])
def test_cifar_val_split_is_carved_from_train(tmp_path, skip_cifar_md5, module):
    train_data, train_labels, _, _ = write_cifar(tmp_path, module, per_file=4)
    dm = module(root=str(tmp_path), val_size=2)
    dm.setup()
    assert_val_carved_from_train(dm, len(train_labels), 2)
    for i, j in enumerate(dm.val_set.indices):  # the archive's training image j, un-augmented
        x, y = dm.val_set[i]
        assert torch.equal(x, torch.from_numpy(train_data[j].reshape(3, 32, 32)).float() / 255)
        assert y == train_labels[j]


def test_cifar_registry_stats():
    assert CIFAR10DataModule.num_classes == 10 and CIFAR100DataModule.num_classes == 100
    assert CIFAR10DataModule.mean == (0.4914, 0.4822, 0.4465)
    assert CIFAR100DataModule.std == (0.2673, 0.2564, 0.2762)


@pytest.mark.parametrize("module", [CIFAR10DataModule, CIFAR100DataModule], ids=["cifar10", "cifar100"])
def test_cifar_missing_data_says_how_to_get_it(tmp_path, module):
    dm = module(root=str(tmp_path / "empty"))
    with pytest.raises(TrigactError) as excinfo:
        dm.setup()
    assert_one_line_error(excinfo, str(tmp_path / "empty"), "data.download=true", "data.root")


@pytest.mark.parametrize("failure", [_no_network, _read_only], ids=["no-network", "read-only-root"])
@pytest.mark.parametrize("module", [CIFAR10DataModule, CIFAR100DataModule], ids=["cifar10", "cifar100"])
def test_cifar_failed_download_says_to_place_the_files(tmp_path, monkeypatch, module, failure):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", failure)
    with pytest.raises(TrigactError) as excinfo:
        module(root=str(tmp_path / "c"), download=True).setup()
    assert_one_line_error(excinfo, module.dataset_cls.__name__.replace("CIFAR", "CIFAR-"),
                          f"data.root={str(tmp_path / 'c')!r}", "manually", module.dataset_cls.filename)


# ---------------------------------------------------------------- imagenet subset


# write_image_folder: tests/_datasets_on_disk.py


def test_imagenet_subset_takes_first_sorted_classes(tmp_path):
    classes = ["n05", "n01", "n04", "n02", "n03"]
    write_image_folder(tmp_path, classes)
    dm = ImageNetSubsetDataModule(root=str(tmp_path), num_classes=3, image_size=32, batch_size=6, val_size=0)
    assert (dm.num_classes, dm.image_size, dm.in_chans) == (3, 32, 3)
    dm.setup()
    train_folder, val_folder = dm.train_set.base, dm.test_set.base
    assert train_folder.classes == val_folder.classes == ["n01", "n02", "n03"]
    assert train_folder.class_to_idx == val_folder.class_to_idx == {"n01": 0, "n02": 1, "n03": 2}
    assert (len(dm.train_set), len(dm.test_set)) == (6, 6)
    for folder in (train_folder, val_folder):
        for path, label in folder.samples:
            assert folder.class_to_idx[Path(path).parent.name] == label
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 32, 32) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    x_val, _ = dm.test_set[0]
    assert x_val.shape == (3, 32, 32) and 0 <= x_val.min() and x_val.max() <= 1


def test_imagenet_subset_val_split_is_carved_from_train_folder(tmp_path):
    write_image_folder(tmp_path, ["n01", "n02", "n03"], per_class=4)
    dm = ImageNetSubsetDataModule(root=str(tmp_path), num_classes=3, image_size=32, val_size=0.25)
    dm.setup()
    assert_val_carved_from_train(dm, 12, 3)
    val_paths = {dm.val_set.base.samples[i][0] for i in dm.val_set.indices}
    train_paths = {dm.train_set.base.samples[i][0] for i in dm.train_set.indices}
    assert all(Path(p).parts[-3] == "train" for p in val_paths)  # ImageNet's val/ folder is the test split
    assert not val_paths & train_paths and len(val_paths | train_paths) == 12
    assert sorted(int(dm.val_set[i][1]) for i in range(3)) == [0, 1, 2]  # stratified: one per class


def test_imagenet_files_decode_to_rgb_uint8_tensors(tmp_path):
    """torchvision.io for JPEG/PNG (grey made RGB), PIL for the formats it does not decode (BMP)."""
    from PIL import Image

    from trigact.data.imagenet_subset import read_rgb

    grey = np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8)
    for name in ("grey.png", "grey.bmp"):
        Image.fromarray(grey).save(tmp_path / name)
        x = read_rgb(str(tmp_path / name))
        assert x.dtype == torch.uint8 and x.shape == (3, 6, 5)
        assert all(torch.equal(x[c], torch.from_numpy(grey)) for c in range(3))


def test_imagenet_subset_errors(tmp_path):
    write_image_folder(tmp_path, ["a", "b"])
    with pytest.raises(TrigactError) as excinfo:
        ImageNetSubsetDataModule(root=str(tmp_path), num_classes=3).setup()
    assert_one_line_error(excinfo, "data.num_classes=3", "2")
    with pytest.raises(TrigactError) as excinfo:
        ImageNetSubsetDataModule(root=str(tmp_path / "missing")).setup()
    assert_one_line_error(excinfo, str(tmp_path / "missing" / "train"))
    with pytest.raises(TrigactError) as excinfo:
        ImageNetSubsetDataModule(root=str(tmp_path), num_classes=0)
    assert_one_line_error(excinfo, "data.num_classes")


def test_imagenet_subset_without_class_folders_or_images_names_the_layout(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(TrigactError) as excinfo:
        ImageNetSubsetDataModule(root=str(tmp_path), num_classes=2).setup()
    assert_one_line_error(excinfo, f"data.root={str(tmp_path)!r}", "no class folders", "<root>/train/<class>/")
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(TrigactError) as excinfo:
        ImageNetSubsetDataModule(root=str(tmp_path), num_classes=2).setup()
    assert_one_line_error(excinfo, f"data.root={str(tmp_path)!r}", "hold no images", "a, b", "<root>/val/<class>/")


# ---------------------------------------------------------------- registry and configs


def test_build_datamodule():
    assert set(DATAMODULES) == {"digits", "fashion_mnist", "cifar10", "cifar100", "imagenet_subset"}
    assert isinstance(build_datamodule("digits", batch_size=4), DigitsDataModule)
    with pytest.raises(TrigactError) as excinfo:
        build_datamodule("mnist")
    assert_one_line_error(excinfo, "'mnist'", "digits", "fashion_mnist", "cifar10", "cifar100", "imagenet_subset")


def compose_data_config(name: str, data_dir: Path, **overrides):
    """The data group as the main config sees it: `paths.data_dir` and `seed` come from the root."""
    root = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "seed": 5})
    root.data = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    root.data = OmegaConf.merge(root.data, overrides)
    return root.data


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_configs_instantiate(tmp_path, name):
    overrides = {"root": str(tmp_path)} if name == "fashion_mnist" else {}
    cfg = compose_data_config(name, tmp_path, **overrides)
    dm = instantiate_named(cfg)
    assert isinstance(dm, DATAMODULES[name]) and dm.name == name == cfg.name
    assert (dm.seed, dm.batch_size, dm.eval_batch_size) == (5, 128, 128)
    # Validation is carved from the training images with a fixed seed, never the run's ${seed}.
    assert (dm.val_size, dm.split_seed) == (0.04 if name == "imagenet_subset" else 0.1, 0)
    in_memory = name in ("digits", "fashion_mnist")
    assert dm.num_workers_setting == (0 if in_memory else 4)  # a fixed count: resume stays exact anywhere
    assert (dm.placement, dm.pin_memory_setting) == ("host", "auto")
    if name in ("cifar10", "cifar100"):
        assert dm.root == tmp_path / name and dm.download is False
    if name == "imagenet_subset":
        assert dm.root == tmp_path / "imagenet" and (dm.num_classes, dm.image_size) == (100, 224)


def test_digits_config_sets_up(tmp_path):
    dm = instantiate_named(compose_data_config("digits", tmp_path, batch_size=64))
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 16, 16)
    direct = DigitsDataModule(seed=5)  # the config's ${seed} drives the train order
    direct.setup()
    assert train_order(dm, 2) == train_order(direct, 2)


def test_fashion_config_reads_idx_files(tmp_path):
    write_fashion(tmp_path, gz=True)
    dm = instantiate_named(compose_data_config("fashion_mnist", tmp_path, root=str(tmp_path), batch_size=5))
    dm.setup()
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 1, 28, 28)


def test_imagenet_decoder_is_chosen_checked_and_part_of_the_bank_key(tmp_path):
    """data.decoder picks PIL or torchvision.io for every file; an unknown one is one line; and the two
    decoders' images never share banks (the key is image-defining)."""
    from trigact.evaluation.crafting import data_identity

    write_image_folder(tmp_path, ["a", "b"], per_class=2)
    for decoder in ("torchvision", "pil"):
        dm = ImageNetSubsetDataModule(root=str(tmp_path), num_classes=2, image_size=32, val_size=0, decoder=decoder)
        dm.setup()
        x, _ = dm.test_set[0]
        assert x.shape == (3, 32, 32) and dm.test_set.base.loader.__name__ == (
            "read_rgb" if decoder == "torchvision" else "read_rgb_pil")
    with pytest.raises(TrigactError) as excinfo:
        ImageNetSubsetDataModule(root=str(tmp_path), decoder="cv2")
    assert_one_line_error(excinfo, "data.decoder='cv2'", "torchvision, pil")
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "imagenet_subset.yaml"))
    assert cfg["decoder"] == "torchvision"
    assert data_identity(cfg) != data_identity({**cfg, "decoder": "pil"})
