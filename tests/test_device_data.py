"""data.placement=device: the same images, labels and order as the host path; the batched crop + flip;
augmentation seeded by (seed, epoch, batch) only, so resuming (at an epoch's end or in its middle)
is exact; and the host loaders' num_workers / pin_memory `auto`, and the one-line errors.

Tiny data only (digits, and Fashion-MNIST / CIFAR written in their real formats): the loaders run on
the CPU here, which is the "device" when there is no trainer or the trainer runs on the CPU.
"""

from __future__ import annotations

import os
import signal
import warnings

import lightning as L
import pytest
import torch
from torchvision import transforms as v1
from torchvision.transforms import v2

from trigact.common.errors import TrigactError
from trigact.data import CIFAR10DataModule, DigitsDataModule, FashionMNISTDataModule, ImageNetSubsetDataModule
from trigact.data.base import FEW_WORKERS_ADVICE, MAX_AUTO_WORKERS, NOT_RESUMABLE_WARNING, auto_num_workers
from trigact.data.device import CropFlip, DeviceLoader, augment_seed, crop_flip

from _datasets_on_disk import accept_tiny_cifar_checksums, write_cifar, write_fashion_mnist


def one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) and a, (len(a), len(b))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32 and ya.dtype == yb.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.fixture
def fashion_root(tmp_path):
    write_fashion_mnist(tmp_path / "fm")
    return tmp_path / "fm"


def make(kind, root, **kwargs):
    """A set-up pair (host, device) of datamodules of `kind` with `kwargs`."""
    pair = []
    for placement in ("host", "device"):
        if kind == "digits":
            dm = DigitsDataModule(image_size=8, batch_size=64, eval_batch_size=50, placement=placement, **kwargs)
        elif kind == "fashion":
            dm = FashionMNISTDataModule(root=str(root), batch_size=8, eval_batch_size=6, val_size=6,
                                        placement=placement, **kwargs)
        else:
            dm = CIFAR10DataModule(root=str(root), batch_size=4, eval_batch_size=3, val_size=3, placement=placement,
                                   **kwargs)
        dm.setup()
        pair.append(dm)
    return pair


CASES = {
    "digits": ("digits", {}),
    "fashion": ("fashion", {}),
    "fashion-augment": ("fashion", {"augment": True}),
    "cifar10": ("cifar", {}),
}


@pytest.mark.parametrize("world", [(1, 0), (2, 1)], ids=["one-process", "rank-1-of-2"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_eval_loaders_serve_the_host_images_in_the_host_order(tmp_path, monkeypatch, case, world):
    kind, kwargs = case
    root = tmp_path / "fm" if kind == "fashion" else tmp_path
    if kind == "fashion":
        write_fashion_mnist(root)
    if kind == "cifar":
        accept_tiny_cifar_checksums(monkeypatch)
        write_cifar(tmp_path, CIFAR10DataModule, per_file=3)  # 15 train / 3 test images
    host, device = make(kind, root, **kwargs)
    for dm in (host, device):
        monkeypatch.setattr(dm, "_world", lambda: world)  # the shard rules of a DDP rank
    assert isinstance(device.test_dataloader(), DeviceLoader)
    for name in ("val_dataloader", "test_dataloader"):
        assert_same_batches(batches(getattr(host, name)()), batches(getattr(device, name)()))
    world_size, rank = world
    assert_same_batches(batches(host.trigger_dataloader(rank, world_size)),
                        batches(device.trigger_dataloader(rank, world_size)))
    if not kwargs.get("augment") and kind != "cifar":  # without augmentation the train batches are equal too
        for epoch in (0, 1):
            loaders = host.train_dataloader(), device.train_dataloader()
            for loader in loaders:
                loader.sampler.set_epoch(epoch)
            assert_same_batches(batches(loaders[0]), batches(loaders[1]))


@pytest.mark.parametrize("size", [20, 33])
def test_fashion_resize_on_the_device_matches_the_host_resize(fashion_root, size):
    host, device = make("fashion", fashion_root, image_size=size)
    a, b = batches(host.test_dataloader()), batches(device.test_dataloader())
    assert a[0][0].shape[-2:] == b[0][0].shape[-2:] == (size, size)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xb, xa, rtol=0, atol=1e-6)


def test_augmentation_parameters_match_the_host_transforms(fashion_root, tmp_path, monkeypatch):
    (host, device) = make("fashion", fashion_root, augment=True)
    (crop,) = [t for t in host.train_set.transform.transforms if isinstance(t, v1.RandomCrop)]
    assert any(isinstance(t, v1.RandomHorizontalFlip) for t in host.train_set.transform.transforms)
    assert device.device_recipe().augment == CropFlip(crop.padding, flip=True) == CropFlip(2)
    assert make("fashion", fashion_root)[1].device_recipe().augment is None  # augment=false
    assert device.device_recipe().train_images.dtype == torch.uint8  # the IDX file's bytes
    digits = DigitsDataModule(placement="device").device_recipe()
    assert digits.augment is None and digits.train_images.dtype == torch.float32  # k/16 pixels are no bytes

    accept_tiny_cifar_checksums(monkeypatch)
    write_cifar(tmp_path / "c", CIFAR10DataModule)
    host, device = make("cifar", tmp_path / "c")
    (crop,) = [t for t in host.train_set.transform.transforms if isinstance(t, v2.RandomCrop)]
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in host.train_set.transform.transforms)
    assert crop.padding == [4, 4, 4, 4] and device.device_recipe().augment == CropFlip(4, flip=True)
    assert device.device_recipe().train_images.dtype == torch.uint8  # stored as the archive's bytes


def crops_of(image, padding):
    """Every (top, left, flipped) -> the crop of `image` (C, H, W) zero-padded by `padding`."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    out = {}
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top:top + h, left:left + w]
            out[(top, left, False)] = crop
            out[(top, left, True)] = crop.flip(-1)
    return out


def draws(images, output, padding):
    """For each sample, the (top, left, flipped) its output is a crop of; fails if it is none."""
    found = []
    for image, out in zip(images, output):
        matches = [key for key, crop in crops_of(image, padding).items() if torch.equal(crop, out)]
        assert matches, "an output sample is no crop (or flipped crop) of its zero-padded input"
        found.append(matches[0])
    return found


def test_crop_flip_cuts_each_sample_from_its_padded_self_at_its_own_offset():
    images = torch.rand(200, 3, 7, 9) + 0.01  # no zero pixel: padding is told apart from the image
    out = crop_flip(images, CropFlip(2), torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    found = draws(images, out, 2)
    tops, lefts, flips = zip(*found)
    assert set(tops) == set(lefts) == set(range(5))  # RandomCrop's range [0, 2 * padding], ends included
    assert 0.35 < sum(flips) / len(flips) < 0.65  # a flip with probability 1/2
    assert len(set(found)) > 25  # per sample: not one crop for the whole batch
    again = crop_flip(images, CropFlip(2), torch.Generator().manual_seed(0))
    other = crop_flip(images, CropFlip(2), torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    unflipped = crop_flip(images, CropFlip(2, flip=False), torch.Generator().manual_seed(0))
    assert not any(flipped for _, _, flipped in draws(images, unflipped, 2))


def augmented_loader(root, seed=0, batch_size=64):
    dm = FashionMNISTDataModule(root=str(root), augment=True, val_size=0, batch_size=batch_size, seed=seed,
                                placement="device")
    dm.setup()
    return dm, dm.train_dataloader()


def epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return batches(loader)


def test_augmented_batches_depend_only_on_seed_epoch_and_batch(fashion_root):
    dm, loader = augmented_loader(fashion_root, batch_size=16)  # 40 images: 3 batches
    clean = torch.stack([dm.train_eval_set[i][0] for i in range(len(dm.train_eval_set))])
    epoch0, epoch1 = epoch_batches(loader, 0), epoch_batches(loader, 1)
    # Each sample is a crop (padding 2) of its own clean image, possibly flipped; crops vary.
    for epoch, served in ((0, epoch0), (1, epoch1)):
        loader.sampler.set_epoch(epoch)
        order = list(loader.sampler)
        x = torch.cat([b[0] for b in served])
        assert torch.equal(torch.cat([b[1] for b in served]), dm.train_eval_set.base.tensors[1][order])
        assert len(set(draws(clean[order], x, 2))) > 5
    # A fresh loader that starts at epoch 1 (a run resumed there) serves the same batches.
    _, fresh = augmented_loader(fashion_root, batch_size=16)
    assert_same_batches(epoch_batches(fresh, 1), epoch1)
    # The same image is augmented differently in another epoch, or with another seed.
    by_image = {}
    for epoch, served in ((0, epoch0), (1, epoch1)):
        loader.sampler.set_epoch(epoch)
        x = torch.cat([b[0] for b in served])
        by_image[epoch] = x[torch.argsort(torch.as_tensor(list(loader.sampler)))]
    assert not torch.equal(by_image[0], by_image[1])
    _, other_seed = augmented_loader(fashion_root, seed=1, batch_size=16)
    assert not torch.equal(epoch_batches(other_seed, 1)[0][0], epoch1[0][0])
    assert augment_seed(0, 1, 0, 2) == augment_seed(0, 1, 0, 2) != augment_seed(0, 2, 0, 1)


def test_a_loader_resumed_mid_epoch_serves_the_rest_of_that_epoch(fashion_root):
    _, loader = augmented_loader(fashion_root, batch_size=8)  # 5 batches
    straight = epoch_batches(loader, 1)
    assert loader.progress == {"epoch": 1, "batches": 5}
    _, resumed = augmented_loader(fashion_root, batch_size=8)
    resumed.resume({"epoch": 1, "batches": 2})
    assert_same_batches(epoch_batches(resumed, 1), straight[2:])
    assert_same_batches(epoch_batches(resumed, 1), straight)  # only the first epoch after the resume skips
    resumed.resume({"epoch": 0, "batches": 2})  # a checkpoint of an earlier epoch: nothing to skip
    assert_same_batches(epoch_batches(resumed, 1), straight)


class BatchRecorder(L.LightningModule):
    """A linear classifier that records what each training step saw."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(28 * 28, 10)
        self.seen: list[tuple[int, float, list[int]]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, float(x.double().sum()), y.tolist()))
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Preempted(RuntimeError):
    pass


class SaveAndCrash(L.Callback):
    """Writes a checkpoint after batch `batch` of epoch `epoch`, then stops the run as a preemption would."""

    def __init__(self, path, epoch, batch):
        self.path, self.epoch, self.batch = path, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            trainer.save_checkpoint(self.path)
            raise Preempted


def fit(root, tmp_path, ckpt_path=None, callbacks=(), model=None, plugins=()):
    dm = FashionMNISTDataModule(root=str(root), augment=True, val_size=0, batch_size=8, seed=4, placement="device")
    model = BatchRecorder() if model is None else model
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=list(callbacks), deterministic=True, plugins=list(plugins))
    with warnings.catch_warnings():
        # Lightning doubts a mid-epoch resume of a loader it cannot fast-forward; this one fast-forwards
        # itself, and the datamodule silences that doubt for it alone.
        warnings.filterwarnings("error", message=NOT_RESUMABLE_WARNING)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        assert not [f for f in warnings.filters if f[0] == "ignore" and getattr(f[1], "pattern", None) ==
                    NOT_RESUMABLE_WARNING]  # the silencing ended with the fit
    return model


def test_a_run_resumed_from_a_mid_epoch_checkpoint_trains_as_an_uninterrupted_one(fashion_root, tmp_path):
    torch.manual_seed(0)
    straight = fit(fashion_root, tmp_path / "a")
    checkpoint = tmp_path / "mid.ckpt"
    torch.manual_seed(0)
    crashed = BatchRecorder()
    with pytest.raises(Preempted):
        fit(fashion_root, tmp_path / "b", callbacks=[SaveAndCrash(checkpoint, epoch=1, batch=1)], model=crashed)
    assert len(crashed.seen) == 5 + 2  # epoch 0, then batches 0 and 1 of epoch 1
    assert torch.load(checkpoint, weights_only=True)["FashionMNISTDataModule"] == {
        "device_train_progress": {"epoch": 1, "batches": 2}}
    torch.manual_seed(1)  # the initial weights come from the checkpoint, not from this
    resumed = fit(fashion_root, tmp_path / "b", ckpt_path=str(checkpoint))
    assert resumed.seen == straight.seen[7:]  # batches 2, 3, 4 of epoch 1, augmented as in the straight run
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


class SignalledMidStep(BatchRecorder):
    """Receives SLURM's requeue signal inside training step `batch` of epoch `epoch`, before its
    optimizer step: where Lightning's own handler would write the requeue checkpoint."""

    def __init__(self, signum, epoch, batch):
        super().__init__()
        self.signum, self.at = signum, (epoch, batch)

    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == self.at:
            os.kill(os.getpid(), self.signum)  # the handler runs here, on the main thread
        return super().training_step(batch, batch_idx)


class KilledAfterRequeue(L.Callback):
    """SLURM ends a requeued job: stop at the first batch that starts once a requeue checkpoint exists."""

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if list(self.run_dir.glob("hpc_ckpt_*.ckpt")):
            raise Preempted


@pytest.mark.parametrize(("handler", "deferred"), [("lightning", True), ("lightning", False), ("submitit", True)])
def test_a_run_requeued_by_slurm_mid_step_resumes_as_an_uninterrupted_one(fashion_root, tmp_path, monkeypatch,
                                                                          handler, deferred):
    """Lightning saves the requeue checkpoint inside the signal handler, here in the middle of a step:
    the weights from before the step, the data position after it. DeferredRequeue saves at the step's
    end. (deferred=False shows the test can fail: the plain handler's resume misses a batch.) With
    handler="submitit" a handler was on the signal before the trainer started, as submitit's is under
    hydra-submitit-launcher: Lightning then registers none of its own, and DeferredRequeue saves and
    hands over to that handler, which requeues and exits."""
    from lightning.pytorch.trainer.connectors import signal_connector

    from trigact.callbacks import DeferredRequeue
    from trigact.training.cluster import slurm_environment

    requeued = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(signal_connector, "call", lambda cmd, **kw: requeued.append(cmd) or 0)
    torch.manual_seed(0)
    straight = fit(fashion_root, tmp_path / "a")
    plugin = slurm_environment("SIGUSR2")
    run_dir = tmp_path / "b"

    def submitit_handler(signum, frame):  # submitit's checkpoint_and_try_requeue on rank 0, in short
        requeued.append(["submitit requeue", sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt"))])
        raise SystemExit(-1)

    before = signal.getsignal(plugin.requeue_signal)
    if handler == "submitit":
        signal.signal(plugin.requeue_signal, submitit_handler)
    try:
        torch.manual_seed(0)
        signalled = SignalledMidStep(plugin.requeue_signal, epoch=1, batch=1)
        callbacks = [KilledAfterRequeue(run_dir), *([DeferredRequeue()] if deferred else [])]
        with pytest.raises(SystemExit if handler == "submitit" else Preempted):
            fit(fashion_root, run_dir, callbacks=callbacks, model=signalled, plugins=[plugin])
        assert signal.getsignal(plugin.requeue_signal) == (submitit_handler if handler == "submitit" else before)
    finally:
        signal.signal(plugin.requeue_signal, before)
    if handler == "submitit":
        assert requeued == [["submitit requeue", ["hpc_ckpt_1.ckpt"]]]  # saved first, then handed over
    else:
        assert requeued == [["scontrol", "requeue", "4242"]]
    (checkpoint,) = run_dir.glob("hpc_ckpt_*.ckpt")
    torch.manual_seed(1)
    resumed = fit(fashion_root, tmp_path / "c", ckpt_path=str(checkpoint))
    same = resumed.seen == straight.seen[7:] and all(
        torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    assert same is deferred


# ------------------------------------------------------------------ host loaders: auto settings, errors


@pytest.mark.parametrize(("cpus", "local", "expected"), [
    (16, None, MAX_AUTO_WORKERS), (16, "2", 7), (16, "8", 1), (4, "4", 0), (2, None, 1), (3, "1", 2), (1, None, 0),
])
def test_auto_num_workers_shares_this_process_cpus_among_local_ranks(monkeypatch, cpus, local, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert auto_num_workers() == expected
    dm = DigitsDataModule(num_workers="auto")
    assert dm.num_workers_setting == "auto" and dm.num_workers == expected
    assert DigitsDataModule(num_workers=3).num_workers == 3  # an explicit count is kept


def test_auto_num_workers_without_the_env_counts_the_trainers_devices(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    class FourDevices:
        num_devices = 4

    assert auto_num_workers(FourDevices()) == 3


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_local_world_size_is_one_line(monkeypatch, value):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
    with pytest.raises(TrigactError) as excinfo:
        DigitsDataModule(num_workers="auto")
    one_line(excinfo, f"LOCAL_WORLD_SIZE={value!r}", ">= 1")


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ({"num_workers": "many"}, ["data.num_workers='many'", "'auto'"]),
    ({"num_workers": 1.5}, ["data.num_workers=1.5", "integer >= 0"]),
    ({"num_workers": True}, ["data.num_workers=True"]),
    ({"num_workers": -1}, ["data.num_workers=-1"]),
    ({"pin_memory": "yes"}, ["data.pin_memory='yes'", "true, false or 'auto'"]),
    ({"placement": "gpu"}, ["data.placement='gpu'", "'host' or 'device'"]),
])
def test_bad_loader_settings_are_one_line(kwargs, fragments):
    with pytest.raises(TrigactError) as excinfo:
        DigitsDataModule(**kwargs)
    one_line(excinfo, *fragments)


def test_imagenet_subset_refuses_device_placement(tmp_path):
    with pytest.raises(TrigactError) as excinfo:
        ImageNetSubsetDataModule(root=str(tmp_path), placement="device")
    one_line(excinfo, "data.placement='device'", "imagenet_subset", "expected 'host'")
    assert ImageNetSubsetDataModule(root=str(tmp_path)).placement == "host"


def test_pin_memory_auto_pins_only_host_batches_bound_for_cuda(monkeypatch):
    assert DigitsDataModule().pin_memory_setting == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DigitsDataModule().pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DigitsDataModule().pin_memory is True
    assert DigitsDataModule(placement="device").pin_memory is False
    assert DigitsDataModule(pin_memory=False).pin_memory is False


def test_device_placement_refuses_a_replaced_train_set():
    dm = DigitsDataModule(placement="device")
    dm.setup()
    dm.train_set = torch.utils.data.Subset(dm.train_set, range(10))  # what method=backdoor does, in effect
    with pytest.raises(TrigactError) as excinfo:
        dm.train_dataloader()
    one_line(excinfo, "data.placement='device'", "Subset", "data.placement=host")


# ------------------------------------------------------------------ Lightning's "few workers" advice


class NotInMemory(DigitsDataModule):
    in_memory = False  # the control: a datamodule the advice is meant for


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def few_worker_warnings(dm):
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, limit_test_batches=1,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Tiny(), datamodule=dm)
        trainer.test(Tiny(), datamodule=dm, verbose=False)
        # Lightning's teardown ended the silence: nothing of it is left for other datamodules.
        assert not any(f[1] is not None and f[1].pattern == FEW_WORKERS_ADVICE for f in warnings.filters)
    return [str(w.message) for w in caught if "does not have many workers" in str(w.message)]


@pytest.mark.parametrize("placement", ["host", "device"])
def test_in_memory_data_gets_no_advice_to_add_workers(monkeypatch, placement):
    monkeypatch.setattr("lightning.fabric.utilities.data._num_cpus_available", lambda: 16)  # a GPU node
    assert few_worker_warnings(DigitsDataModule(image_size=8, placement=placement)) == []
    if placement == "host":  # the control: where the advice applies, Lightning still gives it
        advice = few_worker_warnings(NotInMemory(image_size=8))
        assert {m.split("'")[1] for m in advice} == {"train_dataloader", "val_dataloader", "test_dataloader"}
