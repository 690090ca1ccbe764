"""Exact resume (``ckpt_path=last``) beyond tests/test_train.py's digits case: with data augmentation,
in the main process and in worker processes, whose random streams must continue as if never
interrupted; the RNG state in the checkpoint; and resuming a run that already finished.

Each case trains 4 epochs straight, and separately 2 epochs, a simulated preemption when epoch 3
starts, and ``ckpt_path=last`` up to 4. The learnable trigger updates after epochs 1 and 2
(floor(0.6 * 4)), one on each side of the interruption.
"""

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_hydra import QUIET, SimulatedPreemption, compose_config
from trigact import load_bundle
from trigact.callbacks.rng_state import collect_rng_state, restore_rng_state
from trigact.common.errors import TrigactError
from trigact.runs.status import read_status
from trigact.training.checkpoints import CHECKPOINT_DIGEST, load_checkpoint
from trigact.training.run import train

CRASH = ["+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart", "+callbacks.crash.epoch=2"]


def write_idx(path, array: np.ndarray) -> None:
    """An IDX ubyte file (gzipped): magic 0x0000 08 <ndim>, big-endian uint32 sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_mnist(tmp_path):
    """320 train / 80 test 28x28 images: a bright square whose place depends on the class, plus noise."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for split, n in (("train", 320), ("t10k", 80)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            r, col = 2 + 5 * (c // 4), 2 + 6 * (c % 4)
            images[i, r:r + 6, col:col + 6] = 220
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def augmented(root, num_workers: int) -> list[str]:
    return ["data=fashion_mnist", f"data.root={root}", "data.augment=true", "data.image_size=14", "data.batch_size=64",
            f"data.num_workers={num_workers}", "model=small_cnn", "trigger=learnable", "trigger.alpha=8/255",
            "trainer.max_epochs=4", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1"] + QUIET


def straight_and_resumed(over, tmp_path):
    straight = load_bundle(train(compose_config("train", over, tmp_path / "straight"))["bundle"])
    with pytest.raises(SimulatedPreemption):
        train(compose_config("train", over + CRASH, tmp_path / "resumed"))
    assert not list((tmp_path / "resumed").glob("outputs/runs/**/bundle.pt"))
    resumed = load_bundle(train(compose_config("train", over + ["ckpt_path=last"], tmp_path / "resumed"))["bundle"])
    return straight, resumed


def max_weight_difference(a, b) -> float:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in-process-augmentation", "worker-augmentation"])
def test_resume_with_augmentation_equals_an_uninterrupted_run(tmp_path, tiny_fashion_mnist, num_workers):
    """num_workers=0: the augmentation draws from the global torch RNG, which RNGStateCallback
    carries in the checkpoint. num_workers=1: the workers are seeded per (seed, epoch) by the
    datamodule's sampler, so the resumed run's epoch 3 workers draw what the straight run's did."""
    straight, resumed = straight_and_resumed(augmented(tiny_fashion_mnist, num_workers), tmp_path)
    assert [u["epoch"] for u in resumed.meta["trigger_updates"]] == [1, 2]
    assert resumed.meta["trigger_updates"] == straight.meta["trigger_updates"]
    assert torch.allclose(resumed.trigger, straight.trigger, rtol=0, atol=1e-6)
    assert max_weight_difference(resumed, straight) <= 1e-6
    assert resumed.meta["metrics"] == straight.meta["metrics"]


def test_without_the_rng_state_the_augmented_resume_drifts(tmp_path, tiny_fashion_mnist):
    """The control for the test above: Lightning 2.6 itself saves no RNG state, so without
    RNGStateCallback the resumed run augments epochs 3-4 differently and ends elsewhere."""
    over = augmented(tiny_fashion_mnist, 0) + ["~callbacks.rng_state"]
    straight, resumed = straight_and_resumed(over, tmp_path)
    assert max_weight_difference(resumed, straight) > 1e-4


def test_checkpoints_carry_the_rng_state_and_load_weights_only(tmp_path, tiny_fashion_mnist):
    over = augmented(tiny_fashion_mnist, 0) + ["trainer.max_epochs=1"]
    summary = train(compose_config("train", over, tmp_path))
    (last,) = (tmp_path / "outputs").glob("runs/**/checkpoints/last.ckpt")
    # What Lightning does on resume with torch >= 2.6 (torch.load's default): a weights-only load.
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("RNGStateCallback")]
    assert set(state) == {"torch", "cuda", "numpy", "python"}
    assert summary["skipped"] is False

    # Restoring a collected state replays the same numbers from every generator.
    saved = collect_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_resuming_a_finished_run_does_nothing_and_says_so(tmp_path, capsys):
    over = ["data=digits", "data.image_size=8", "model=mlp", "trigger=learnable", "trigger.alpha=8/255",
            "debug=limit"] + QUIET
    summary = train(compose_config("train", over, tmp_path))
    run_dir = summary["run_dir"]
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "outputs").rglob("*") if p.is_file()}
    capsys.readouterr()

    again = train(compose_config("train", over + ["ckpt_path=last"], tmp_path))
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [f"already finished, not retrained; nothing to resume: {run_dir}/bundle.pt"]
    assert again["skipped"] and again["test_acc_trigger"] == summary["test_acc_trigger"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "outputs").rglob("*") if p.is_file()} == files


def test_resuming_from_a_checkpoint_of_another_model_is_a_one_line_error(tmp_path):
    """A readable checkpoint whose weights do not fit the module is refused before Trainer.fit,
    instead of failing deep inside Lightning's load_state_dict."""
    tiny = ["data=digits", "data.image_size=8", "method=standard", "debug=limit", "trainer.max_epochs=1"] + QUIET
    train(compose_config("train", tiny + ["model=mlp"], tmp_path / "mlp"))
    (checkpoint,) = (tmp_path / "mlp" / "outputs").glob("runs/**/checkpoints/last.ckpt")

    with pytest.raises(TrigactError) as err:
        train(compose_config("train", tiny + ["model=small_cnn", f"ckpt_path={checkpoint}"], tmp_path / "cnn"))
    message = str(err.value)
    assert f"checkpoint {checkpoint} was saved from a different model/config" in message and "\n" not in message


# ------------------------------------------------------------------ checkpoints are opened safely and checked
TINY_TA = ["data=digits", "data.image_size=8", "model=mlp", "trigger=learnable", "trigger.alpha=8/255",
           "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
           "trainer.limit_test_batches=1"] + QUIET


class RunsCode:
    """Pickles as a call of ``open(marker, "w")``: unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_planted_checkpoint_is_refused_without_running_its_code(tmp_path, monkeypatch):
    """A crashed attempt makes the next launch open last.ckpt by itself: one that another user of a
    shared registry planted there must not run anything."""
    cfg = compose_config("train", TINY_TA, tmp_path)
    run_dir = Path(cfg.paths.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "crashed", "attempt": 1, "error": "RuntimeError: x"}))
    marker = tmp_path / "code-ran"
    planted = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "payload": RunsCode(marker)}, planted)
    # The control: a plain torch.load of such a file does run the code.
    control = tmp_path / "control"
    torch.save({"payload": RunsCode(control)}, tmp_path / "control.ckpt")
    torch.load(tmp_path / "control.ckpt", weights_only=False)["payload"].close()
    assert control.exists()

    with pytest.raises(TrigactError) as err:
        train(cfg)
    assert not marker.exists()
    assert str(err.value) == (f"checkpoint {planted} holds pickled objects that are not plain data (io.open); "
                              "refusing to load it, as it could run code; pass another ckpt_path")
    assert read_status(run_dir)["state"] == "crashed" and read_status(run_dir)["attempt"] == 2

    # Lightning's own load in Trainer.fit(ckpt_path=...) is as safe, even where torch is told to
    # default to unsafe loads: shown by skipping our check before fit.
    import trigact.training.run

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(trigact.training.run, "resolve_checkpoint", lambda request, run_dir, module: str(planted))
    with pytest.raises(TrigactError, match=r"\(io.open\); refusing to load it"):
        train(cfg)
    assert not marker.exists()


@pytest.fixture(scope="module")
def crashed_tiny_run(tmp_path_factory):
    """A run whose first attempt crashed when epoch 1 started: last.ckpt holds epoch 0."""
    root = tmp_path_factory.mktemp("crashed")
    with pytest.raises(SimulatedPreemption):
        train(compose_config("train", TINY_TA + ["+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart",
                                                 "+callbacks.crash.epoch=1"], root))
    return root


def copy_of(crashed_root, tmp_path):
    """A copy of the crashed run (same run folder name under tmp_path): its config and last.ckpt."""
    root = tmp_path / "root"
    shutil.copytree(crashed_root, root)
    cfg = compose_config("train", TINY_TA, root)
    return cfg, Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"


def garble_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))


def with_nan_weight(path):
    """Resaved as Lightning alone would (no digest), with one weight NaN: the digest cannot catch it."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.pop(CHECKPOINT_DIGEST, None)
    next(v for k, v in checkpoint["state_dict"].items() if k.endswith("weight")).view(-1)[0] = float("nan")
    torch.save(checkpoint, path)


def weights_only_checkpoint(path):
    checkpoint = torch.load(path, weights_only=True)
    for key in (CHECKPOINT_DIGEST, "optimizer_states", "lr_schedulers", "callbacks"):
        checkpoint.pop(key, None)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("damage,expected", [
    (garble_middle, "is corrupt: its contents do not match the sha256 saved in it"),
    (with_nan_weight, "holds non-finite (NaN or inf) weights in net."),
    (weights_only_checkpoint, "cannot resume training: it has no optimizer_states, lr_schedulers, callbacks"),
], ids=["garbled", "nan-weight", "weights-only"])
def test_a_damaged_last_checkpoint_is_not_resumed(crashed_tiny_run, tmp_path, damage, expected):
    """Each of these used to be resumed silently (garbled and NaN weights) or fail inside Lightning."""
    cfg, last = copy_of(crashed_tiny_run, tmp_path)
    size = last.stat().st_size
    damage(last)
    assert damage is not garble_middle or last.stat().st_size == size
    with pytest.raises(TrigactError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"checkpoint {last} ") and expected in message and "\n" not in message
    assert not (Path(cfg.paths.run_dir) / "bundle.pt").exists()


def test_the_intact_copy_resumes(crashed_tiny_run, tmp_path, capsys):
    """The control for the test above: the undamaged checkpoint passes the checks and is resumed."""
    cfg, last = copy_of(crashed_tiny_run, tmp_path)
    summary = train(cfg)
    assert f"resuming from {last}, left by an earlier attempt of this run" in capsys.readouterr().out
    assert [u["epoch"] for u in load_bundle(summary["bundle"]).meta["trigger_updates"]] == [1]


METHODS = {
    "standard": ["method=standard"],
    "fixed-trigger": ["trigger=fixed"],
    "learnable-train-step": ["trigger=learnable", "trigger.update.source=train_step"],
    "pgd_at": ["method=pgd_at", "method.module.steps=1"],
    "trades": ["method=trades", "method.module.steps=1"],
    "rat": ["method=rat", "method.module.steps=1", "model=small_cnn"],
    "tdat": ["method=tdat"],
}


@pytest.mark.parametrize("over", METHODS.values(), ids=METHODS.keys())
def test_every_methods_checkpoint_opens_weights_only_and_verified(tmp_path, over):
    """What the weights-only load would have to allow-list: nothing. Every method's, trigger's and
    callback's state is tensors and plain values (tdat's batch momentum included), and the digest
    covers all of it."""
    cfg = compose_config("train", ["data=digits", "data.image_size=8", "model=mlp", "trainer.max_epochs=1",
                                   "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                                   "trainer.limit_test_batches=1", *over] + QUIET, tmp_path)
    train(cfg)
    last = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    assert CHECKPOINT_DIGEST in torch.load(last, map_location="cpu", weights_only=True)
    checkpoint = load_checkpoint(last)
    assert CHECKPOINT_DIGEST not in checkpoint and checkpoint["epoch"] == 0


@pytest.mark.parametrize("over", [[], ["~callbacks.rng_state"]], ids=["default-callbacks", "without-rng-state"])
def test_resume_with_device_placement_equals_an_uninterrupted_run(tmp_path, tiny_fashion_mnist, over):
    """data.placement=device: the images live on the trainer's device (the CPU here) and the crop and
    flip are drawn there per (seed, epoch, batch) from the loader's own generator, so the resumed
    run augments epochs 3-4 as the uninterrupted run does; even without the RNG state in the
    checkpoint, which the host path needs (the control above drifts without it)."""
    cfg = augmented(tiny_fashion_mnist, 0) + ["data.placement=device"] + over
    straight, resumed = straight_and_resumed(cfg, tmp_path)
    assert [u["epoch"] for u in resumed.meta["trigger_updates"]] == [1, 2]
    assert resumed.meta["trigger_updates"] == straight.meta["trigger_updates"]
    assert torch.allclose(resumed.trigger, straight.trigger, rtol=0, atol=1e-6)
    assert max_weight_difference(resumed, straight) <= 1e-6
    assert resumed.meta["metrics"] == straight.meta["metrics"]
