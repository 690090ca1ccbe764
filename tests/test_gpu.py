"""On a GPU (skipped without one; benchmarks/gpu_check.sh runs them): the trainer=gpu profile trains,
compiled and eager, with the trigger in fp32, and a GPU run resumes exactly."""

import pytest
import torch

from helpers_hydra import QUIET, SimulatedPreemption, compose_config
from trigact import load_bundle
from trigact.training.run import train

pytestmark = pytest.mark.requires_gpu

DIGITS = ["data=digits", "model=small_cnn", "trainer=gpu", "trainer.max_epochs=6"] + QUIET


def test_bf16_gpu_profile_trains_a_trigger_model_with_an_fp32_trigger(tmp_path):
    summary = train(compose_config("train", DIGITS + ["method=trigger_activation", "trigger=learnable",
                                                      "trigger.alpha=16/255"], tmp_path))
    bundle = load_bundle(summary["bundle"])
    assert bundle.meta["config"]["trainer"]["precision"] == "bf16-mixed"
    assert bundle.trigger.dtype == torch.float32 and bundle.meta["trigger_updates"]
    assert summary["test_acc_trigger"] >= 0.8  # digits: ~0.97 in fp32 on the CPU at 6+ epochs


def test_compiled_gpu_training_keeps_checkpoint_keys_and_learns(tmp_path):
    over = DIGITS + ["method=trigger_activation", "trigger=fixed", "trigger.eps=32/255", "model.compile=true"]
    summary = train(compose_config("train", over, tmp_path))
    bundle = load_bundle(summary["bundle"])
    assert not any(k.startswith("_orig_mod") for k in bundle.net.state_dict())
    assert summary["test_acc_trigger"] >= 0.8


def test_a_deterministic_gpu_run_resumes_exactly(tmp_path):
    over = ["data=digits", "data.image_size=8", "model=small_cnn", "trigger=learnable", "trigger.alpha=8/255",
            "trainer=gpu", "trainer.deterministic=true", "trainer.max_epochs=4", "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=1"] + QUIET
    straight = load_bundle(train(compose_config("train", over, tmp_path / "a"))["bundle"])
    crash = ["+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart", "+callbacks.crash.epoch=2"]
    with pytest.raises(SimulatedPreemption):
        train(compose_config("train", over + crash, tmp_path / "b"))
    resumed = load_bundle(train(compose_config("train", over + ["ckpt_path=last"], tmp_path / "b"))["bundle"])
    assert torch.equal(resumed.trigger, straight.trigger)
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
