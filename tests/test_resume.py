"""Exact resume (``ckpt_path=last``) beyond tests/test_train.py's digits case: with data augmentation,
in the main process and in worker processes, whose random streams must continue as if never
interrupted; the RNG state in the checkpoint; and resuming a run that already finished.

Each case trains 4 epochs straight, and separately 2 epochs, a simulated preemption when epoch 3
starts, and ``ckpt_path=last`` up to 4. The learnable trigger updates after epochs 1 and 2
(floor(0.6 * 4)), one on each side of the interruption.
"""

import gzip
import random

import numpy as np
import pytest
import torch

from helpers_hydra import QUIET, SimulatedPreemption, compose_config
from trigact import load_bundle
from trigact.callbacks.rng_state import collect_rng_state, restore_rng_state
from trigact.errors import TrigactError
from trigact.train import train

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
