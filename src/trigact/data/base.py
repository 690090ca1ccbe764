"""The contract every trigact datamodule fulfils, and the loaders built from it.

Subclasses only say how to build their three datasets; this class owns batching, seeding and the
sharding rules, so that every dataset family is shuffled, resumed and split across ranks the same way.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from trigact.errors import TrigactError


class DatasetSplits(NamedTuple):
    """The three views a datamodule serves.

    `train_eval` holds the train images with eval transforms: the trigger update and the
    train-accuracy pass must see the images as they are, not augmented.
    """

    train: Dataset
    train_eval: Dataset
    test: Dataset


def check_positive_int(key: str, value) -> int:
    """Return `value` if it is an int > 0, else a one-line TrigactError naming the config key."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TrigactError(f"{key} must be a positive integer, got {value!r}")
    return value


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


class TrigactDataModule(L.LightningDataModule):
    """Base LightningDataModule: images are float tensors in [0, 1], shape (C, H, W), unnormalized.

    Subclasses set `name`, `num_classes`, `in_chans`, `image_size`, `mean` and `std` by the end of
    `__init__` without touching the dataset files, because the model (whose first layer normalizes
    with `mean`/`std`) is built before `setup` runs. They implement `build_splits`.

    Hyperparameters are plain attributes, not `save_hyperparameters()`, to keep checkpoints lean;
    the Hydra config is the record of how a run was built.
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        *,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = check_positive_int("data.batch_size", batch_size)
        self.eval_batch_size = (
            batch_size if eval_batch_size is None else check_positive_int("data.eval_batch_size", eval_batch_size)
        )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise TrigactError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TrigactError(f"data.seed must be an integer, got {seed!r}")
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = bool(pin_memory)
        self.train_set: Dataset | None = None
        self.train_eval_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def build_splits(self) -> DatasetSplits:
        """Load the data and return its train / train-eval / test views. Called once, by `setup`."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_splits()")

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once; later calls (fit, then test) reuse them."""
        if self.train_set is not None:
            return
        splits = self.build_splits()
        self.train_set, self.train_eval_set, self.test_set = splits.train, splits.train_eval, splits.test

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

    def train_dataloader(self) -> DataLoader:
        """Shuffled train split.

        The order is a function of (seed, epoch) only: Lightning calls `set_epoch` on the
        DistributedSampler (and never replaces one), so each epoch differs, and a run resumed from a
        checkpoint sees the same order as an uninterrupted one. Used even on one process for that reason.

        So are the worker processes' random streams (augmentation with `num_workers > 0`): the
        sampler reseeds the loader's generator, from which each epoch's workers are seeded, from
        (seed, epoch), and the workers are started afresh each epoch (not persistent) so that
        epoch e's augmentation does not depend on how many epochs this process ran before it.
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
        return self._loader(self.train_set, self.batch_size, generator=generator, persistent_workers=False,
                            sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """The test split: the paper reports test accuracy and has no separate validation split."""
        return self.test_dataloader()

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def trigger_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """This rank's shard of the un-augmented train set, for the learnable-trigger update pass.

        Strided indices `range(rank, N, world_size)` instead of a DistributedSampler: no padding
        duplicates, so gradients summed over ranks equal the single-process sum exactly.
        """
        self._require_setup()
        check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise TrigactError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        shard = Subset(self.train_eval_set, range(rank, len(self.train_eval_set), world_size))
        return self._loader(shard, self.eval_batch_size, shuffle=False)
