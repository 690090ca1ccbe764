"""On a GPU (skipped without one; benchmarks/gpu_check.sh runs them): the trainer=gpu profile trains,
compiled and eager, with the trigger in fp32, and a GPU run resumes exactly."""

from pathlib import Path

import pytest
import torch

from helpers_hydra import QUIET, SimulatedPreemption, compose_config
from test_resume import tiny_fashion_mnist  # noqa: F401  (a fixture: a tiny Fashion-MNIST on disk)
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


def test_compiled_gpu_training_keeps_checkpoint_keys_and_learns(tmp_path, monkeypatch):
    calls = []
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: (calls.append(k), real_compile(self, *a, **k))[1])
    over = DIGITS + ["method=trigger_activation", "trigger=fixed", "trigger.eps=32/255", "model.compile=true"]
    summary = train(compose_config("train", over, tmp_path))
    assert calls == [{}]  # the network really was compiled
    payload = torch.load(summary["bundle"], weights_only=True)
    ckpt = torch.load(next(Path(summary["run_dir"]).glob("checkpoints/last.ckpt")), weights_only=True)
    for keys in (payload["state_dict"], ckpt["state_dict"]):  # the raw files, not a rebuilt network
        assert keys and not any("_orig_mod" in k for k in keys)
    assert summary["test_acc_trigger"] >= 0.8


def test_device_resident_data_on_the_gpu_resumes_exactly(tmp_path, tiny_fashion_mnist):  # noqa: F811
    """data.placement=device on CUDA (pinned, non-blocking copies of the order and the crop offsets):
    the same weights and trigger after a crash and ckpt_path=last as straight through."""
    from test_resume import augmented, max_weight_difference, straight_and_resumed

    cfg = augmented(tiny_fashion_mnist, 0) + ["data.placement=device", "trainer=gpu", "trainer.deterministic=true"]
    straight, resumed = straight_and_resumed(cfg, tmp_path)
    assert torch.allclose(resumed.trigger, straight.trigger, rtol=0, atol=1e-6)
    assert max_weight_difference(resumed, straight) <= 1e-6


def test_bf16_attack_on_the_gpu_stays_in_the_box_and_near_fp32():
    from trigact.attacks import attack_from_config
    from trigact.attacks.config import attack_config
    from trigact.common.config import CONF_DIR
    from trigact.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", 10, 3, 32, (0.5,) * 3, (0.25,) * 3).cuda().eval()
    x, y = torch.rand(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    out = {}
    for precision in (None, "bf16"):
        attack = attack_from_config(attack_config(CONF_DIR, "pgd", {"steps": 10, "precision": precision}), net)
        torch.manual_seed(1)  # the same random start for both
        out[precision] = attack(x, y)
        assert (out[precision] - x).abs().max() <= 8 / 255 + 1e-6
    # The same signed steps almost everywhere: bf16 flips the sign of a few small gradient entries.
    assert ((out[None] - out["bf16"]).abs() < 1e-6).float().mean() > 0.5


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
