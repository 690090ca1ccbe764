"""The execution profile (trigact.training.performance): trainer=gpu's settings, channels_last,
bf16-mixed with an fp32 trigger, torch.compile, and that none of them moves a run's hash."""

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from helpers_hydra import QUIET, compose_config
from trigact import load_bundle
from trigact.common.errors import TrigactError
from trigact.runs.naming import run_name
from trigact.training.performance import compile_options, split_trainer_config
from trigact.training.run import train

TINY = ["data=digits", "data.image_size=8", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=2"] + QUIET


def test_gpu_profile_composes_to_a_valid_trainer_with_trigacts_keys_taken_out(tmp_path):
    cfg = compose_config("train", ["trainer=gpu"] + QUIET, tmp_path)
    assert cfg.trainer.precision == "bf16-mixed"
    trainer_cfg, settings = split_trainer_config(cfg.trainer)
    assert settings == {"channels_last": True, "float32_matmul_precision": "high"}
    assert "channels_last" not in trainer_cfg and "float32_matmul_precision" not in trainer_cfg
    assert trainer_cfg.benchmark is True  # auto: not deterministic
    # Every remaining key is a Trainer argument: the Trainer builds (on the CPU here).
    kwargs = {**OmegaConf.to_container(trainer_cfg), "accelerator": "cpu", "logger": False}
    kwargs.pop("_target_")
    assert isinstance(L.Trainer(**kwargs), L.Trainer)
    # The default (CPU) profile keeps exact fp32 and the default layout.
    default_cfg, default_settings = split_trainer_config(compose_config("train", QUIET, tmp_path).trainer)
    assert default_settings == {"channels_last": False, "float32_matmul_precision": "highest"}
    assert default_cfg.get("benchmark") is None


@pytest.mark.parametrize("deterministic,expected", [(True, False), (False, True)])
def test_benchmark_auto_follows_deterministic(tmp_path, deterministic, expected):
    cfg = compose_config("train", ["trainer=gpu", f"trainer.deterministic={deterministic}"] + QUIET, tmp_path)
    assert split_trainer_config(cfg.trainer)[0].benchmark is expected


@pytest.mark.parametrize("override,expected", [
    ("trainer.channels_last=yes", "trainer.channels_last='yes': expected true or false"),
    ("trainer.float32_matmul_precision=tf32", "trainer.float32_matmul_precision='tf32': expected one of highest"),
    ("trainer.benchmark=sometimes", "trainer.benchmark='sometimes': expected true, false, null or auto"),
])
def test_bad_execution_settings_are_one_line_errors(tmp_path, override, expected):
    cfg = compose_config("train", [override] + QUIET, tmp_path)
    with pytest.raises(TrigactError, match=expected.replace("(", r"\(")):
        split_trainer_config(cfg.trainer)


def test_compile_options():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options(OmegaConf.create({"mode": "max-autotune"})) == {"mode": "max-autotune"}
    with pytest.raises(TrigactError, match="unknown option"):
        compile_options({"speed": "fast"})
    with pytest.raises(TrigactError, match="model.compile='yes'"):
        compile_options("yes")


def test_execution_settings_do_not_move_a_run_but_precision_does(tmp_path):
    base = ["method=trigger_activation", "trigger=fixed"] + QUIET
    name = run_name(compose_config("train", base, tmp_path))
    for fast in (["model.compile=true"], ["trainer.channels_last=true"],
                 ["trainer.float32_matmul_precision=high"], ["trainer.benchmark=auto"]):
        assert run_name(compose_config("train", base + fast, tmp_path)) == name, fast
    # bf16 autocast rounds the forward pass: another model, another folder.
    assert run_name(compose_config("train", base + ["trainer.precision=bf16-mixed"], tmp_path)) != name


class RecordTraining(L.Callback):
    """What the profile looks like inside a real fit: layouts and dtypes at the first batch."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and not self.seen:
            # The last conv: the first one's (16, 1, 3, 3) weight and (B, 1, H, W) input are NHWC and
            # NCHW at once on one-channel digits, so they could not show the layout.
            conv = [m for m in pl_module.net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            conv_inputs = []
            handle = conv.register_forward_pre_hook(lambda m, args: conv_inputs.append(args[0]))
            with torch.no_grad():
                pl_module.net(batch[0][:2])
            handle.remove()
            self.seen = {
                "weight_nhwc": conv.weight.is_contiguous(memory_format=torch.channels_last),
                "input_nhwc": conv_inputs[0].is_contiguous(memory_format=torch.channels_last),
                "tau_dtype": pl_module.trigger.tau.dtype,
                "matmul": torch.get_float32_matmul_precision(),
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from trigact.callbacks import TriggerUpdateCallback

        update = next(c for c in trainer.callbacks if isinstance(c, TriggerUpdateCallback))
        if update.grad_sum is not None:  # source=train_step: this epoch's running sum of tau's gradient
            self.seen["grad_sum_dtype"] = update.grad_sum.dtype
            self.seen["grad_sum_l1"] = float(update.grad_sum.abs().sum())


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("source", ["train_step", "epoch"])
def test_bf16_channels_last_training_keeps_the_trigger_fp32(tmp_path, source, restore_matmul_precision, monkeypatch):
    """bf16-mixed on the CPU (Lightning's CPU autocast) with channels_last, a learnable trigger from
    both gradient sources: tau, its gradient and the update's running sum stay float32, the weights and
    batches are NHWC during training, the bundle's weights are back in the default layout, and the
    trigger really moved."""
    recorder = RecordTraining()
    import trigact.training.build as build

    original = build.build_callbacks
    monkeypatch.setattr("trigact.training.run.build_callbacks", lambda cfg: [*original(cfg), recorder])
    over = TINY + ["model=small_cnn", "trigger=learnable", "trigger.alpha=8/255", f"trigger.update.source={source}",
                   "trainer.precision=bf16-mixed", "trainer.channels_last=true",
                   "trainer.float32_matmul_precision=high"]
    before = torch.get_float32_matmul_precision()
    summary = train(compose_config("train", over, tmp_path))
    assert torch.get_float32_matmul_precision() == before  # the process-wide setting is restored
    seen = recorder.seen
    assert seen["weight_nhwc"] and seen["input_nhwc"]
    assert seen["tau_dtype"] == torch.float32 and seen["matmul"] == "high"
    if source == "train_step":
        assert seen["grad_sum_dtype"] == torch.float32 and seen["grad_sum_l1"] > 0
    bundle = load_bundle(summary["bundle"])
    assert bundle.trigger.dtype == torch.float32
    assert bundle.meta["trigger_updates"] and bundle.meta["trigger_updates"][0]["grad_l1"] > 0
    assert all(t.is_contiguous() for t in torch.load(summary["bundle"], weights_only=True)["state_dict"].values())


def test_compiled_training_matches_eager_and_keeps_checkpoint_keys(tmp_path, monkeypatch):
    """torch.compile (backend aot_eager: the compile path without inductor's C++ build, seconds on 2 cores)
    of a learnable-trigger run, epoch-pass update included: the same state-dict keys as eager (no
    ``_orig_mod.``), and weights and trigger within float rounding of the eager run's."""
    over = TINY + ["model=small_cnn", "trigger=learnable", "trigger.alpha=8/255"]
    eager = load_bundle(train(compose_config("train", over, tmp_path / "eager"))["bundle"])
    calls = []
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: (calls.append(k), real_compile(self, *a, **k))[1])
    compiled_summary = train(compose_config("train", over + ["model.compile={backend:aot_eager}"], tmp_path / "c"))
    assert calls == [{"backend": "aot_eager"}]  # it really was compiled, with the options given
    compiled = load_bundle(compiled_summary["bundle"])
    assert list(compiled.net.state_dict()) == list(eager.net.state_dict())
    assert torch.allclose(compiled.trigger, eager.trigger, atol=1e-6)
    for (k, a), b in zip(eager.net.state_dict().items(), compiled.net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), k


def test_channels_last_converts_what_enters_the_network():
    """On 3-channel images (one channel is NHWC and NCHW at once, so digits cannot show it): the
    weights and the first convolution's input are NHWC, and the outputs equal the default layout's."""
    from types import SimpleNamespace

    from trigact.models import build_model
    from trigact.training.performance import contiguous_network, prepare_network

    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 3, 16, (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.rand(4, 3, 16, 16)
    expected = net(x)
    module = SimpleNamespace(net=net)
    prepare_network(module, {"channels_last": True}, None)
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = net(x)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.allclose(out, expected, atol=1e-5)
    contiguous_network(net)
    assert all(p.is_contiguous() for p in net.parameters())
