"""The contract every trigact datamodule fulfils, and the loaders built from it.

Subclasses only say how to build their four datasets; this class owns batching, seeding, the
validation carve and the sharding rules, so that every dataset family is split, shuffled, resumed
and spread across ranks the same way.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Callable, NamedTuple, Sequence

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from trigact.data.device import DeviceLoader, DeviceRecipe
from trigact.data.views import TransformedDataset
from trigact.common.errors import TrigactError
from trigact.common.validate import check_int

PLACEMENTS = ("host", "device")
# num_workers=auto never starts more worker processes than this per rank: past it, a DataLoader of
# CIFAR- or ImageNet-sized images gains little and each worker costs memory.
MAX_AUTO_WORKERS = 8
# Lightning's advice to give a DataLoader more workers (its `_worker_check`, a PossibleUserWarning).
FEW_WORKERS_ADVICE = r"The '\w+' does not have many workers"
NOT_RESUMABLE_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


class DatasetSplits(NamedTuple):
    """The four views a datamodule serves.

    `train_eval` holds the train images with eval transforms: the trigger update and the
    train-accuracy pass must see the images as they are, not augmented. `val` is carved out of the
    training data (see `validation_indices`), disjoint from `train`/`train_eval`, with eval
    transforms; model selection uses it, so that the test split is left for the final tables.
    """

    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset


def check_val_size(value) -> int | float:
    """`value` if it is an image count (int >= 0) or a fraction in [0, 1), else a one-line TrigactError."""
    count = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    fraction = isinstance(value, float) and 0 <= value < 1  # NaN fails the comparison too
    if not (count or fraction):
        raise TrigactError(
            f"data.val_size={value!r}: expected a number of training images (integer >= 0) or a fraction "
            "of the training split in [0, 1); 0 means no validation split"
        )
    return value


def validation_indices(labels: Sequence[int], val_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, val_indices) into a training split with these `labels`, both sorted.

    `val_size` is a count, or a fraction of `len(labels)` rounded to the nearest count (at least
    one). Stratified: after a seeded shuffle, the indices are grouped by class and the validation
    images are taken at evenly spaced places, so each class gives its share to within one image.
    Depends only on (labels, val_size, seed): a fixed split, not drawn from the training seed.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_val = val_size if isinstance(val_size, int) else (max(1, round(val_size * n)) if val_size > 0 else 0)
    if n_val > 0 and n_val >= n:
        raise TrigactError(
            f"data.val_size={val_size!r} asks for {n_val} validation images but the training split has only "
            f"{n}; lower data.val_size (0 means no validation split)"
        )
    if n_val == 0:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]  # class blocks, shuffled within each
    picks = order[((2 * np.arange(n_val) + 1) * n) // (2 * n_val)]  # evenly spaced, centred
    val = np.sort(picks)
    return np.setdiff1d(np.arange(n), val), val


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s strided shard of `n` items: every item on exactly one rank, none repeated."""
    return range(rank, n, world_size)


def check_placement(value, allowed: Sequence[str] = PLACEMENTS, why: str = "") -> str:
    """`value` if it is one of `allowed` data placements, else a one-line TrigactError naming them."""
    if value not in allowed:
        raise TrigactError(f"data.placement={value!r}{why}: expected {' or '.join(map(repr, allowed))}")
    return value


def local_world_size(trainer=None) -> int:
    """How many training processes share this machine: ``LOCAL_WORLD_SIZE`` (set by torchrun), else
    the attached trainer's devices (Lightning's own launcher starts one process per device), else 1."""
    raw = os.environ.get("LOCAL_WORLD_SIZE")
    if raw is None:
        return max(1, int(getattr(trainer, "num_devices", 1) or 1)) if trainer is not None else 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise TrigactError(f"LOCAL_WORLD_SIZE={raw!r} must be an integer >= 1 (the training processes on this machine)")
    return value


def auto_num_workers(trainer=None) -> int:
    """``num_workers=auto``: the CPUs this process may run on (its affinity mask, which SLURM, taskset
    and container limits set, not the machine's core count), shared among the ranks on this machine,
    less one for each rank's own process, capped at MAX_AUTO_WORKERS. 0 when a rank has a single CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cpus // local_world_size(trainer) - 1))


def download_error(title: str, root, expected: str, err: BaseException) -> TrigactError:
    """The one-line error for a failed ``data.download=true`` (no network, read-only root, bad checksum)."""
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return TrigactError(
        f"{title}: download into data.root={str(root)!r} failed ({type(err).__name__}: {reason}); "
        f"place {expected} there manually and set data.download=false, or point data.root=... at a copy"
    )


class EpochSeededSampler(DistributedSampler):
    """A DistributedSampler whose `set_epoch` also reseeds the DataLoader's generator from (seed, epoch).

    The DataLoader draws its workers' base seed from that generator each time an epoch starts; left
    alone, epoch e would get the e-th draw of this process, which a resumed run does not repeat.
    """

    def __init__(self, *args, loader_generator: torch.Generator, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loader_generator = loader_generator
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        # A distinct, fixed stream per (seed, epoch); the same on every rank (workers mix in the rank).
        self.loader_generator.manual_seed((self.seed * 1_000_003 + epoch) % 2**63)


class EvalShardSampler(DistributedSampler):
    """This rank's strided shard `range(rank, N, world_size)` of an evaluation set, without padding.

    Under DDP, Lightning puts torch's DistributedSampler into any loader that has none; it pads the
    last shard with repeated images, so accuracy would count some images twice. A DistributedSampler
    of our own is kept as it is. The shards differ in length by at most one, so ranks may run
    different numbers of batches: the eval metrics are torchmetrics states (counts) that are summed
    over ranks once, at epoch end, so no rank waits for a batch another rank does not have, as long
    as every rank has at least one batch (checked here).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, what: str = "the evaluation split") -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)
        if 0 < n < num_replicas:
            raise TrigactError(
                f"{what} has {n} images for {num_replicas} DDP processes; each process needs at least one"
            )
        self.total_size = n
        self.num_samples = len(shard_indices(n, rank, num_replicas))

    def __iter__(self):
        return iter(shard_indices(self.total_size, self.rank, self.num_replicas))


class TrigactDataModule(L.LightningDataModule):
    """Base LightningDataModule: images are float tensors in [0, 1], shape (C, H, W), unnormalized.

    Subclasses set `name`, `num_classes`, `in_chans`, `image_size`, `mean` and `std` by the end of
    `__init__` without touching the dataset files, because the model (whose first layer normalizes
    with `mean`/`std`) is built before `setup` runs. They implement `build_splits`.

    `val_size` images (a count, or a fraction of the training split) are carved out of the training
    data with the fixed `split_seed`, stratified (`validation_indices`); train and train-eval keep
    only the rest. `val_size=0` gives an empty `val_set`, and `val_dataloader` then yields no
    loader, so Lightning skips validation.

    `placement="host"` serves batches from torch DataLoaders in host memory (`num_workers` worker
    processes, `auto`: `auto_num_workers`; `pin_memory`, `auto`: when the batches go to a CUDA
    device). `placement="device"` (datasets that implement `device_recipe`) holds the images on the
    trainer's device and serves them with DeviceLoaders: the same order, the same sharding, the same
    eval images; training batches cropped and flipped there, per sample (`trigact.data.device`).

    Hyperparameters are plain attributes, not `save_hyperparameters()`, to keep checkpoints lean;
    the Hydra config is the record of how a run was built.
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    # The placements this dataset allows, and why a missing one is missing (said in its error).
    placements: tuple[str, ...] = PLACEMENTS
    placement_note: str = ""
    # The images are tensors in memory: a DataLoader worker would only copy them, so Lightning's
    # advice to add workers does not apply to the host path (see `_few_workers_advice`).
    in_memory: bool = False

    def __init__(
        self,
        *,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        seed: int = 0,
        pin_memory: bool | str = "auto",
        val_size: int | float = 0.1,
        split_seed: int = 0,
        placement: str = "host",
    ) -> None:
        super().__init__()
        self.batch_size = check_int(batch_size, "data.batch_size")
        self.eval_batch_size = (
            batch_size if eval_batch_size is None else check_int(eval_batch_size, "data.eval_batch_size")
        )
        if num_workers != "auto" and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                      or num_workers < 0):
            raise TrigactError(f"data.num_workers={num_workers!r}: expected an integer >= 0 or 'auto' "
                               f"(the CPUs of this process per local rank, less one, at most {MAX_AUTO_WORKERS})")
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise TrigactError(f"data.pin_memory={pin_memory!r}: expected true, false or 'auto' "
                               "(true when batches go from host memory to a CUDA device)")
        for key, value in (("data.seed", seed), ("data.split_seed", split_seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TrigactError(f"{key} must be an integer, got {value!r}")
        self.placement = check_placement(placement, type(self).placements, type(self).placement_note)
        self.val_size = check_val_size(val_size)
        self.split_seed = split_seed
        self.num_workers_setting = num_workers
        if num_workers == "auto":
            auto_num_workers()  # a bad LOCAL_WORLD_SIZE fails now, in one line, not when training starts
        self.pin_memory_setting = pin_memory
        self.seed = seed
        self.train_set: Dataset | None = None
        self.train_eval_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._built_train_set: Dataset | None = None
        self._recipe: DeviceRecipe | None = None
        self._on_device: dict[str, tuple[torch.Tensor, ...]] = {}
        self._device_train_loader: DeviceLoader | None = None
        self._device_train_resume: dict | None = None
        self._quiet_filters: dict[str, tuple] = {}  # message -> its entry in warnings.filters

    @property
    def num_workers(self) -> int:
        """Worker processes per host DataLoader: `data.num_workers`, with `auto` resolved now (`auto_num_workers`)."""
        setting = self.num_workers_setting
        return auto_num_workers(getattr(self, "trainer", None)) if setting == "auto" else setting

    @property
    def pin_memory(self) -> bool:
        """`data.pin_memory`; `auto`: pinned when host batches go to a CUDA device (the trainer's,
        or any CUDA device without a trainer). Never with placement=device: there is no host batch."""
        if self.placement != "host":
            return False
        if self.pin_memory_setting != "auto":
            return self.pin_memory_setting
        device = self._trainer_device()
        return device.type == "cuda" if device is not None else torch.cuda.is_available()

    def _trainer_device(self) -> torch.device | None:
        """The attached trainer's device (None without a trainer, or with a stand-in that has no
        strategy, as tests use to play a DDP rank)."""
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        return getattr(strategy, "root_device", None)

    def build_splits(self) -> DatasetSplits:
        """Load the data and return its train / train-eval / val / test views. Called once, by `setup`."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_splits()")

    def carve_validation(
        self, base: Dataset, labels: Sequence[int], train_transform: Callable, eval_transform: Callable
    ) -> tuple[Dataset, Dataset, Dataset]:
        """(train, train_eval, val) views of the training data `base` (labels `labels`).

        The validation images are seen with `eval_transform`, like the test images; the other two
        views hold only the remaining images.
        """
        train_idx, val_idx = validation_indices(labels, self.val_size, self.split_seed)
        return (
            TransformedDataset(base, train_transform, train_idx),
            TransformedDataset(base, eval_transform, train_idx),
            TransformedDataset(base, eval_transform, val_idx),
        )

    def device_recipe(self) -> DeviceRecipe:
        """For placement=device: the CPU tensors to move to the device and how batches are made of
        them (see DeviceRecipe). Called once, after `build_splits`, by the datasets that allow it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement device_recipe()")

    def recipe_from_bases(self, **batching) -> DeviceRecipe:
        """The DeviceRecipe of a dataset whose `build_splits` kept its two TensorDatasets as `_bases`
        (train, test) and carved train-eval / val views from the first: those tensors and the views'
        positions; `batching`: DeviceRecipe's resize / augment."""
        (train_images, train_labels), (test_images, test_labels) = (base.tensors for base in self._bases)
        return DeviceRecipe(
            train_images=train_images, train_labels=train_labels, test_images=test_images, test_labels=test_labels,
            train_positions=torch.as_tensor(self.train_eval_set.indices, dtype=torch.long),
            val_positions=torch.as_tensor(self.val_set.indices, dtype=torch.long), **batching,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once; later calls (fit, then test) reuse them."""
        self._few_workers_advice(quiet=True)
        if self.train_set is not None:
            return
        splits = self.build_splits()
        self.train_set, self.train_eval_set = splits.train, splits.train_eval
        self.val_set, self.test_set = splits.val, splits.test
        self._built_train_set = splits.train

    def teardown(self, stage: str | None = None) -> None:
        self._unsilence()

    def on_exception(self, exception: BaseException) -> None:
        self._unsilence()

    def _few_workers_advice(self, quiet: bool) -> None:
        """Silence Lightning's "does not have many workers" advice while a trainer runs this datamodule,
        where it does not apply: host loaders of images already in memory (`in_memory`), which a
        worker process would only copy. Only that one message, only between Lightning's `setup` and
        `teardown` (or `on_exception`) calls: other datamodules, and the placement=device loaders
        (not DataLoaders, which Lightning does not check), are untouched."""
        if quiet and self.in_memory and self.placement == "host" and getattr(self, "trainer", None) is not None:
            self._silence(FEW_WORKERS_ADVICE, PossibleUserWarning)
        elif not quiet:
            self._unsilence()

    def _silence(self, message: str, category: type[Warning]) -> None:
        """Ignore one Lightning message until :meth:`_unsilence` (teardown or an exception)."""
        if message not in self._quiet_filters:
            warnings.filterwarnings("ignore", message=message, category=category)
            self._quiet_filters[message] = warnings.filters[0]

    def _unsilence(self) -> None:
        for entry in self._quiet_filters.values():
            if entry in warnings.filters:
                warnings.filters.remove(entry)  # an "ignore" leaves no registry entry behind
        self._quiet_filters = {}

    # ------------------------------------------------------------------ placement=device
    def _device_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(train images, train labels, test images, test labels) on the trainer's device (the CPU
        without a trainer), moved there once per device."""
        device = self._trainer_device() or torch.device("cpu")
        if self._recipe is None:
            self._recipe = self.device_recipe()
        key = str(device)
        if key not in self._on_device:
            r = self._recipe
            self._on_device[key] = tuple(t.to(device) for t in (r.train_images, r.train_labels.long(),
                                                                 r.test_images, r.test_labels.long()))
        return self._on_device[key]

    def _device_loader(self, split: str, sampler, batch_size: int, rank: int, augment: bool = False) -> DeviceLoader:
        train_images, train_labels, test_images, test_labels = self._device_tensors()
        recipe = self._recipe
        if split == "test":
            images, labels, positions = test_images, test_labels, torch.arange(len(test_labels))
        else:
            positions = recipe.val_positions if split == "val" else recipe.train_positions
            images, labels = train_images, train_labels
        return DeviceLoader(images, labels, positions, sampler, batch_size, resize=recipe.resize,
                            augment=recipe.augment if augment else None, seed=self.seed, rank=rank)

    def state_dict(self) -> dict:
        """With placement=device, how far the train loader got into its epoch: a checkpoint written in
        the middle of an epoch resumes at the next batch (Lightning itself cannot fast-forward a
        loader that is not stateful). Empty otherwise, so host checkpoints hold nothing of ours."""
        loader = self._device_train_loader
        return {} if loader is None else {"device_train_progress": dict(loader.progress)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._device_train_resume = state_dict.get("device_train_progress")

    def _world(self) -> tuple[int, int]:
        """(world_size, global_rank) of the attached trainer, or a single process without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset: Dataset, batch_size: int, generator: torch.Generator | None = None,
                persistent_workers: bool = True, **kwargs) -> DataLoader:
        """A DataLoader whose worker RNGs derive from `seed` (and the rank), so augmentation is reproducible."""
        _, rank = self._world()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent_workers and self.num_workers > 0,
            worker_init_fn=partial(pl_worker_init_function, rank=rank),
            generator=torch.Generator().manual_seed(self.seed) if generator is None else generator,
            **kwargs,
        )

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        """Shuffled train split.

        The order is a function of (seed, epoch) only: Lightning calls `set_epoch` on the
        DistributedSampler (and never replaces one), so each epoch differs, and a run resumed from a
        checkpoint sees the same order as an uninterrupted one. Used even on one process for that reason.

        So are the worker processes' random streams (augmentation with `num_workers > 0`): the
        sampler reseeds the loader's generator, from which each epoch's workers are seeded, from
        (seed, epoch), and the workers are started afresh each epoch (not persistent) so that
        epoch e's augmentation does not depend on how many epochs this process ran before it. That
        trade costs one worker start-up per epoch (fork: well under a second), against making every
        transform draw from a per-sample seed; placement=device, where it matters on a GPU, has no
        workers at all.

        With placement=device the same sampler orders a DeviceLoader, whose augmentation is seeded
        per (seed, epoch, rank, batch), so it needs neither the workers' seeds nor the global RNG.
        """
        self._require_setup()
        world_size, rank = self._world()
        generator = torch.Generator()
        sampler = EpochSeededSampler(
            self.train_set, loader_generator=generator,
            num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed, drop_last=False,
        )
        # Lightning 2.6 creates the first epoch's iterator before it calls set_epoch, and on resume
        # keeps that iterator for the resumed epoch. With workers it prefetches at once, i.e. takes
        # the order and the worker seeds of whatever epoch the sampler holds then, so the sampler
        # must already hold the epoch the loop will run: the one Lightning itself passes to
        # set_epoch (`epoch_progress.current.processed`; `current_epoch` is one behind when the
        # checkpoint was written at an epoch's end).
        trainer = getattr(self, "trainer", None)
        fit_loop = getattr(trainer, "fit_loop", None)
        sampler.set_epoch(fit_loop.epoch_progress.current.processed if fit_loop is not None else 0)
        if self.placement == "device":
            if self.train_set is not self._built_train_set:
                raise TrigactError(
                    f"data.placement='device' serves the images this datamodule put on the device, but its train "
                    f"set was replaced by a {type(self.train_set).__name__} (method=backdoor poisons it); "
                    "use data.placement=host"
                )
            loader = self._device_loader("train", sampler, self.batch_size, rank, augment=True)
            if self._device_train_resume and self._device_train_resume.get("batches"):
                # Lightning warns that a mid-epoch resume "can cause unreliable results" because it
                # cannot fast-forward a loader without its Stateful protocol; this one fast-forwards
                # itself (from the datamodule's state, which a placement=host resume may ignore).
                self._silence(NOT_RESUMABLE_WARNING, UserWarning)
            loader.resume(self._device_train_resume)  # once: only the first epoch after a resume skips
            self._device_train_resume = None
            self._device_train_loader = loader
            return loader
        return self._loader(self.train_set, self.batch_size, generator=generator, persistent_workers=False,
                            sampler=sampler)

    def _eval_loader(self, dataset: Dataset, what: str, split: str) -> DataLoader | DeviceLoader:
        """In order; under DDP this rank's shard, every image counted exactly once (`EvalShardSampler`)."""
        world_size, rank = self._world()
        sampler = EvalShardSampler(dataset, world_size, rank, what)
        if self.placement == "device":
            return self._device_loader(split, sampler, self.eval_batch_size, rank)
        return self._loader(dataset, self.eval_batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader | DeviceLoader | list:
        """The validation split carved from the training data; no loader (validation skipped) when it is empty."""
        self._require_setup()
        if len(self.val_set) == 0:
            return []
        return self._eval_loader(self.val_set, f"the validation split (data.val_size={self.val_size!r})", "val")

    def test_dataloader(self) -> DataLoader | DeviceLoader:
        self._require_setup()
        return self._eval_loader(self.test_set, "the test split", "test")

    def trigger_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader | DeviceLoader:
        """This rank's shard of the un-augmented train set, for the learnable-trigger update pass.

        Strided indices `range(rank, N, world_size)` (`shard_indices`) instead of a padding
        DistributedSampler: no duplicates, so gradients summed over ranks equal the single-process sum exactly.
        """
        self._require_setup()
        check_int(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise TrigactError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        indices = shard_indices(len(self.train_eval_set), rank, world_size)
        if self.placement == "device":
            return self._device_loader("train_eval", indices, self.eval_batch_size, rank)
        return self._loader(Subset(self.train_eval_set, indices), self.eval_batch_size, shuffle=False)
