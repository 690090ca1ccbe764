"""Bad settings of the attack, evaluate and pipeline entry points end in one line naming the value,
before anything is loaded, trained or crafted; and model selection never sees a test image."""

import subprocess
import sys

import pytest
import safetensors.torch
import torch
from hydra import compose, initialize_config_dir

from conftest import DEMO_OVERRIDES, DEMO_SHRINK
from trigact.common.errors import TrigactError
from trigact.common.config import CONF_DIR

# No run matches this: a setting that is checked first fails on its own line, not on this one.
NO_RUNS = "surrogates=[digits/no_such_run]"


def run_entry(name, root, overrides, fn):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=[f"paths.root_dir={root}", *overrides])
        return fn(cfg)


def one_line_error(call, expected):
    with pytest.raises(TrigactError) as error:
        call()
    message = str(error.value)
    assert expected in message and "\n" not in message, message


@pytest.mark.parametrize("override, expected", [
    ("batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("batch_size=abc", "batch_size='abc' must be an integer >= 1"),
    ("n_eval=abc", "n_eval='abc' must be an integer >= 1"),
    ("n_eval=10.7", "n_eval=10.7 must be an integer >= 1"),
    ("n_eval=0", "n_eval=0 must be an integer >= 1"),
    ("seed=abc", "seed='abc' must be an integer in [0, 4294967295]"),
    ("seed=-1", "seed=-1 must be an integer in [0, 4294967295]"),
    ("split=train", "split='train' is not a split banks are crafted on; allowed: test, val"),
    ("attacks=[pgd,pgdd]", "unknown attack 'pgdd'"),
    ("attack_overrides.steps=2.5", "attack_overrides.steps=2.5 must be an integer >= 1"),
])
def test_attack_refuses_bad_settings_in_one_line_before_loading_anything(override, expected, tmp_path):
    from trigact.cli.attack import run_attack

    one_line_error(lambda: run_entry("attack", tmp_path, [NO_RUNS, override], run_attack), expected)


def test_attack_refuses_an_eps_above_one(tmp_path):
    from trigact.cli.attack import run_attack

    one_line_error(lambda: run_entry("attack", tmp_path, [NO_RUNS, "attack_overrides.eps=1e9/255"], run_attack),
                   "attack_overrides.eps='1e9/255'")


@pytest.mark.parametrize("override, expected", [
    ("batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("batch_size=abc", "batch_size='abc' must be an integer >= 1"),
    ("name=../../x", "name='../../x' must be a non-empty name without path separators"),
    ("name=..", "name='..' must be a non-empty name without path separators"),
    ("split=train", "split='train' is not a split banks are crafted on; allowed: test, val"),
])
def test_evaluate_refuses_bad_settings_in_one_line_before_loading_anything(override, expected, tmp_path):
    from trigact.cli.evaluate import run_evaluate

    one_line_error(lambda: run_entry("evaluate", tmp_path, [NO_RUNS, "victims=[x]", override], run_evaluate),
                   expected)


@pytest.mark.parametrize("module, args, expected", [
    ("trigact.attack", [NO_RUNS, "batch_size=0"], "trigact: error: batch_size=0 must be an integer >= 1"),
    ("trigact.evaluate", [NO_RUNS, "victims=[x]", "name=../../x"], "trigact: error: name='../../x' must be"),
])
def test_the_command_line_gets_one_line_and_writes_nothing_outside(module, args, expected, tmp_path):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", module, *args, f"paths.root_dir={cwd}"],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert expected in proc.stderr
    assert not (cwd / "outputs" / "x").exists()  # where name=../../x pointed


# A shrunken demo: if a check were to come after training, the test would still end in seconds.
PIPELINE = ["experiment=demo", "pipeline.train_overrides=[" + ",".join(f"'{o}'" for o in DEMO_SHRINK) + "]"]


@pytest.mark.parametrize("overrides, expected", [
    (["pipeline.n_eval=0"], "pipeline.n_eval=0 must be an integer >= 1"),
    (["pipeline.n_eval=abc"], "pipeline.n_eval='abc' must be an integer >= 1"),
    (["pipeline.n_eval=10.7"], "pipeline.n_eval=10.7 must be an integer >= 1"),
    (["pipeline.split=train"], "pipeline.split='train' is not a split banks are crafted on; allowed: test, val"),
    (["seed=abc"], "seed='abc' must be an integer in [0, 4294967295]"),
    (["+pipeline.victims.W=[surrogate_lenet]"], "pipeline.victims.W: run surrogate_lenet is surrogate surrogate_lenet"),
    # Another name for the same run (same overrides, so the same run folder) is still the surrogate.
    (["+pipeline.runs.lenet_again=['method=standard','model=lenet','optimizer.lr=0.05']", "+pipeline.victims.W=[lenet_again]"],
     "run lenet_again is surrogate surrogate_lenet: that is a white-box attack"),
    # An ensemble surrogate: its members are surrogates too; it names runs of the experiment.
    (["pipeline.surrogates=[{ensemble:[surrogate_lenet,standard]}]"],
     "run standard is a member of surrogate ensemble(surrogate_lenet + standard): that is a white-box attack"),
    (["pipeline.surrogates=[{ensemble:[surrogate_lenet,nope]}]"], "unknown pipeline run 'nope'"),
    (["pipeline.surrogates=[{ensemble:[surrogate_lenet]}]"], "with at least 2 distinct runs"),
    (["pipeline.surrogates=[{ensemble:[surrogate_lenet,surrogate_tiny_resnet],fusion:max}]"], "fusion"),
])
def test_the_pipeline_refuses_a_bad_plan_before_training(overrides, expected, tmp_path):
    from trigact.cli.pipeline import run_pipeline

    one_line_error(lambda: run_entry("pipeline", tmp_path, [*PIPELINE, *overrides], run_pipeline), expected)
    assert not list(tmp_path.rglob("bundle.pt")) and not (tmp_path / "outputs" / "runs").exists()


def test_the_pipeline_plan_allows_a_whitebox_victim_when_asked(tmp_path):
    from trigact.cli.pipeline import check_evaluation_plan

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[
            f"paths.root_dir={tmp_path}", *PIPELINE, "+pipeline.victims.W=[surrogate_lenet]",
            "pipeline.allow_whitebox=true"])
    check_evaluation_plan(cfg)


def test_the_search_objectives_banks_hold_no_test_image(shrunk_demo, tmp_path):
    """hparams_search=trigger_optuna crafts its banks on validation images (one trial, in-process)."""
    import shutil

    from trigact.data import DigitsDataModule
    from trigact.evaluation.bank import quantize
    from trigact.cli.pipeline import run_pipeline, search_objective

    root, _ = shrunk_demo
    shutil.copytree(root / "outputs" / "runs", tmp_path / "outputs" / "runs")  # only "searched" trains
    results = tmp_path / "trial"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[
            f"paths.root_dir={tmp_path}", *DEMO_OVERRIDES, "hparams_search=trigger_optuna", "pipeline.n_eval=30",
            "pipeline.attacks=[pgd]", "pipeline.attack_overrides.steps=1", f"paths.results_dir={results}"])
        assert cfg.pipeline.split == "val"
        run_pipeline(cfg)
    search_objective(cfg, results)
    dm = DigitsDataModule(image_size=16)  # the demo's data
    dm.setup()
    test = quantize(torch.stack([x for x, _ in dm.test_set])).flatten(1)
    val = quantize(torch.stack([dm.val_set[i][0] for i in range(30)]))
    banks = list((tmp_path / "outputs" / "advbank").rglob("bank.safetensors"))
    assert len(banks) == 2  # one per surrogate
    for path in banks:
        clean = safetensors.torch.load_file(path)["x_clean"]
        assert not (clean.flatten(1)[:, None] == test[None]).all(-1).any()  # none is a test image
        assert torch.equal(clean, val)  # the first n_eval validation images
