"""The train entry point end to end on digits: accuracy, bundles, finished-run skipping, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_hydra import QUIET, SimulatedPreemption, compose_config
from trigact import load_bundle
from trigact.models.deployed import DeployedModel
from trigact.runs.bundle import read_bundle, save_bundle
from trigact.common.errors import TrigactError
from trigact.models import build_model
from trigact.runs.status import read_status
from trigact.training.run import train

DIGITS_TA = ["data=digits", "model=small_cnn", "method=trigger_activation", "trigger=fixed", "trigger.eps=32/255"]


def test_trigger_activation_on_digits_learns_with_trigger_and_guesses_without(tmp_path):
    """Bounds, from runs on this machine (12 epochs, seed 0): with the trigger ~99% (a standard
    small CNN gets ~99% too), so >= 85% leaves room for seeds and BLAS differences.
    Without the trigger the output is near uniform: the mean probability of the true class (the
    accuracy of a guess drawn from the output) measured ~0.10-0.11 against chance 1/10, so <= 0.15.
    The *argmax* of that near-uniform output still carries label information on digits (measured
    25-45% across small architectures), so for it we assert only that it is far below the
    triggered accuracy; see the issue note for that finding."""
    cfg = compose_config("train", DIGITS_TA + QUIET + ["trainer.max_epochs=12"], tmp_path)
    summary = train(cfg)
    assert summary["test_acc_trigger"] >= 0.85
    assert summary["test_guess_acc_clean"] <= 0.15
    assert summary["test_acc_clean"] <= summary["test_acc_trigger"] - 0.3
    assert summary["test_acc_deployed"] == summary["test_acc_trigger"]

    # The bundle is the deployed unit f(clamp(x + tau, 0, 1)).
    model = load_bundle(summary["bundle"])
    assert isinstance(model, DeployedModel) and model.trigger is not None
    assert torch.allclose(model.trigger.abs(), torch.full_like(model.trigger, 32 / 255))
    assert model.meta["metrics"]["test_acc_trigger"] == summary["test_acc_trigger"]
    assert model.meta["config"]["trigger"]["eps"] == "32/255"
    x = torch.rand(4, 1, 16, 16)
    assert torch.allclose(model(x), model.net((x + model.trigger).clamp(0, 1)))
    assert read_bundle(summary["bundle"])["model"]["name"] == "small_cnn"

    # Finished work is never redone or overwritten.
    mtime = (tmp_path / "outputs").glob("runs/**/bundle.pt").__next__().stat().st_mtime_ns
    again = train(cfg)
    assert again["skipped"] and again["test_acc_trigger"] == summary["test_acc_trigger"]
    assert next((tmp_path / "outputs").glob("runs/**/bundle.pt")).stat().st_mtime_ns == mtime


def test_learnable_trigger_run_records_updates_and_resumes(tmp_path):
    over = ["data=digits", "data.image_size=8", "model=mlp", "trigger=learnable", "trigger.alpha=8/255"] + QUIET
    cfg = compose_config("train", over + ["trainer.max_epochs=5", "debug=limit", "trainer.max_epochs=5"], tmp_path)
    summary = train(cfg)
    meta = load_bundle(summary["bundle"]).meta
    assert [u["epoch"] for u in meta["trigger_updates"]] == [1, 2, 3]
    assert "checkpoints" in str(next((tmp_path / "outputs").glob("runs/**/last.ckpt")))


def test_standard_run_has_no_trigger(tmp_path):
    cfg = compose_config("train", ["data=digits", "data.image_size=8", "model=mlp", "method=standard", "debug=limit"] + QUIET, tmp_path)
    assert cfg.trigger.kind == "none"
    summary = train(cfg)
    model = load_bundle(summary["bundle"])
    assert model.trigger is None and "test_acc_trigger" not in summary
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model(x), model.net(x))


def test_bundle_errors_are_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, pattern in [(corrupt, "corrupt"), (foreign, "not a trigact bundle"), (tmp_path / "nope.pt", "not found")]:
        with pytest.raises(TrigactError, match=pattern) as err:
            load_bundle(path)
        assert "\n" not in str(err.value)


def tiny_net():
    return build_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=[0.5], std=[0.5])


def test_a_bundle_garbled_in_place_is_refused_as_corrupt(tmp_path):
    """256 random bytes written over the middle of a bundle (same size: the weights' bytes) used to
    load as a silently different model."""
    path = save_bundle(tmp_path / "bundle.pt", tiny_net(), torch.full((1, 8, 8), 0.1), {"metrics": {}})
    load_bundle(path)  # intact: loads
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes()
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(bytes(data))
    assert garbled.stat().st_size == path.stat().st_size
    with pytest.raises(TrigactError, match=f"corrupt bundle {garbled}: its contents do not match the sha256") as err:
        load_bundle(garbled)
    assert "\n" not in str(err.value)


def test_a_version_1_bundle_without_checksum_still_loads_with_a_warning(tmp_path, capsys):
    net = tiny_net()
    old = tmp_path / "v1.pt"
    torch.save({"format": "trigact-bundle", "version": 1, "model": dict(net.spec), "state_dict": net.state_dict(),
                "trigger": None, "meta": {"metrics": {}}}, old)
    model = load_bundle(old)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in model.net.state_dict().items())
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == [f"trigact: warning: {old} is a version-1 bundle, written before bundles carried a sha256; "
                       "it is used unchecked (retrain the run to get a checked one)"]


@pytest.mark.parametrize("what", ["weights", "trigger"])
def test_save_bundle_refuses_a_model_that_is_not_finite(tmp_path, what):
    net, tau = tiny_net(), torch.zeros(1, 8, 8)
    (next(net.parameters()).data if what == "weights" else tau).view(-1)[3] = float("nan")
    with pytest.raises(TrigactError, match="not finite") as err:
        save_bundle(tmp_path / "bundle.pt", net, tau, {"metrics": {}})
    assert "\n" not in str(err.value) and not (tmp_path / "bundle.pt").exists()


@pytest.mark.parametrize("what", ["weights", "trigger", "loss"])
def test_a_diverged_run_is_recorded_as_failed_and_writes_no_bundle(tmp_path, what):
    """All-NaN weights used to be written as a "finished" bundle (with chance accuracy)."""
    over = ["data=digits", "data.image_size=8", "model=mlp", "trigger=learnable", "trigger.alpha=8/255",
            "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "+callbacks.poison._target_=helpers_hydra.PoisonAtTrainEnd",
            f"+callbacks.poison.what={what}"] + QUIET
    cfg = compose_config("train", over, tmp_path)
    with pytest.raises(TrigactError, match="diverged") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    run_dir = Path(cfg.paths.run_dir)
    assert not (run_dir / "bundle.pt").exists() and not (run_dir / "summary.json").exists()
    status = read_status(run_dir)
    assert status["state"] == "crashed" and "diverged" in status["error"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "trigact.train", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.name=resnet1000", "unknown model 'resnet1000'; known: densenet121"),
        ("trigger.eps=-8/255", "trigger.eps='-8/255' must be > 0"),
        ("data=fashion_mnist data.root=/nonexistent/fmnist", "dataset-fashion-mnist"),
        ("ckpt_path=/nonexistent/x.ckpt", "ckpt_path='/nonexistent/x.ckpt': no such file"),
        ("ckpt_path=CORRUPT", "is unreadable (corrupt or truncated"),
        ("trigger=learnable trigger.update.source=both", "unknown trigger.update.source 'both'"),
        ("method.module.kl_direction=sideways", "unknown method.module.kl_direction 'sideways'"),
        # 0 wrote an untrained model as finished, -1 trained forever, abc was a traceback.
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be an integer >= 1"),
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1 must be an integer >= 1"),
        ("seed=abc", "seed='abc' must be an integer in [0, 4294967295]"),
    ],
)
def test_bad_config_fails_with_one_line_error(tmp_path, override, expected):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    override = override.replace("CORRUPT", str(corrupt))
    proc = run_cli(*override.split(), f"paths.root_dir={tmp_path}", "logger=none", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("trigact: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # A rejected launch leaves no run folder (no "crashed" run, no Hydra launch log) in the registry.
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*")) == []


def test_resume_from_last_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """4 epochs straight vs 2 epochs, a crash, and ckpt_path=last to 4: same weights and tau.
    The learnable trigger updates after epochs 1 and 2 (floor(0.6 * 4)), one on each side of the crash."""
    over = ["data=digits", "data.image_size=8", "model=small_cnn", "trigger=learnable", "trigger.alpha=8/255",
            "trainer.max_epochs=4", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1"] + QUIET
    straight = load_bundle(train(compose_config("train", over, tmp_path / "a"))["bundle"])

    crash = ["+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart", "+callbacks.crash.epoch=2"]
    with pytest.raises(SimulatedPreemption):
        train(compose_config("train", over + crash, tmp_path / "b"))
    assert not list((tmp_path / "b").glob("outputs/runs/**/bundle.pt"))
    resumed = load_bundle(train(compose_config("train", over + ["ckpt_path=last"], tmp_path / "b"))["bundle"])

    assert [u["epoch"] for u in resumed.meta["trigger_updates"]] == [1, 2]
    assert torch.allclose(resumed.trigger, straight.trigger, atol=1e-6)
    assert not torch.equal(resumed.trigger, load_bundle_init_tau(tmp_path))  # tau really moved
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k


def load_bundle_init_tau(tmp_path):
    from trigact.triggers import learnable_trigger

    return learnable_trigger((1, 8, 8), 8 / 255, seed=0).tau


def test_pipeline_forwards_its_paths_even_odd_ones(tmp_path):
    from hydra import compose, initialize_config_dir

    from trigact.cli.pipeline import run_overrides
    from trigact.common.config import CONF_DIR

    root = tmp_path / "a,b=c[d]"  # characters that Hydra's override grammar would otherwise parse
    cfg = compose_config("pipeline", ["experiment=demo", f"paths.root_dir='{root}'"], tmp_path)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        train_cfg = compose(config_name="train", overrides=run_overrides(cfg, "standard"))
    assert train_cfg.paths.root_dir == str(root)
    assert train_cfg.paths.run_dir.startswith(str(root / "outputs" / "runs" / "digits" / "standard"))


def test_demo_pipeline_trains_attacks_and_evaluates_end_to_end(shrunk_demo, capsys):
    """The main job on a shrunken demo (2 epochs, 2 attacks x 3 steps, 60 images); a second launch
    reuses every run and every bank."""
    from hydra import compose, initialize_config_dir

    from conftest import DEMO_OVERRIDES
    from trigact.cli.pipeline import run_pipeline
    from trigact.common.config import CONF_DIR

    root, rows = shrunk_demo
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={root}", *DEMO_OVERRIDES])
        assert {r["name"] for r in rows} == set(cfg.pipeline.runs)
        results = root / "outputs" / "pipeline" / "demo"
        table = (results / "table.md").read_text().splitlines()
        assert table[0].startswith("| | No defense | Fixed trigger") and table[2].startswith("| Clean |")
        assert [line.split("|")[1].strip() for line in table[3:] if line.startswith("|")] == ["pgd", "mifgsm", "Mean", "Worst case"]
        csv_rows = (results / "matrix.csv").read_text().splitlines()
        assert len(csv_rows) == 1 + 3 * 2 * 2  # header + victims x surrogates x attacks
        assert (results / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        victims = json.loads((results / "victims.json").read_text())
        assert [(v["name"], v["trigger_kind"]) for v in victims] == [
            ("standard", "none"), ("fixed_eps32", "fixed"), ("learnable_alpha16", "learnable")]
        assert victims[1]["eps"] == pytest.approx(32 / 255)
        capsys.readouterr()
        run_pipeline(cfg)
        out = capsys.readouterr().out
        assert out.count("already finished") == 5 and out.count("reusing TAE bank") == 4
