"""Every pipeline experiment config composes, and each of its runs composes into a train config;
its surrogates and victims name its runs, its attacks and defenses exist (no training here)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trigact.cli.pipeline import check_evaluation_plan, run_overrides, train_configs, victim_groups
from trigact.common.config import CONF_DIR

PIPELINE_EXPERIMENTS = sorted(
    p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml") if "pipeline:" in p.read_text()
)


def test_the_fashion_mnist_experiments_are_there():
    assert {"demo", "fmnist_eps_sweep", "fmnist_preprocessing", "fmnist_defenses", "fmnist_seeds"} <= set(PIPELINE_EXPERIMENTS)


@pytest.mark.parametrize("name", PIPELINE_EXPERIMENTS)
def test_experiment_composes_with_all_its_runs(name, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        # allow_cpu: the paper_* experiments refuse to plan their runs on a machine without a GPU
        cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={tmp_path}", f"experiment={name}", "allow_cpu=true"])
        runs = train_configs(cfg)
    assert len({c.paths.run_dir for c in runs.values()}) == len(runs)  # no two runs share a folder
    if not cfg.pipeline.get("attacks"):  # training only (Table XI: trigger sizes over three data sets)
        return
    check_evaluation_plan(cfg)  # surrogates and victims are runs; attacks and defenses exist and build
    data = {OmegaConf.select(c, "data.name") for c in runs.values()}
    assert len(data) == 1  # one data set per experiment: the banks are shared


def test_the_fashion_mnist_experiments_share_runs(tmp_path):
    """Run folders are keyed by config, so the Table II experiments reuse the Table I runs (and banks)."""
    def run_dirs(name):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={tmp_path}", f"experiment={name}"])
            return {r: compose(config_name="train", overrides=run_overrides(cfg, r)).paths.run_dir for r in cfg.pipeline.runs}

    sweep, preprocessing, defenses, seeds = (
        run_dirs(n) for n in ("fmnist_eps_sweep", "fmnist_preprocessing", "fmnist_defenses", "fmnist_seeds"))
    for name, run_dir in preprocessing.items():
        assert sweep[name] == run_dir and defenses[name] == run_dir
    for name, run_dir in seeds.items():  # its seed-0 runs and surrogates are fmnist_defenses' own
        assert defenses.get(name, run_dir) == run_dir
    assert {n for n in seeds if n in defenses} == set(preprocessing)


def test_the_attack_suites_reuse_the_runs_of_the_demo_and_the_eps_sweep(tmp_path):
    def run_dirs(name):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={tmp_path}", f"experiment={name}"])
            return {r: compose(config_name="train", overrides=run_overrides(cfg, r)).paths.run_dir for r in cfg.pipeline.runs}

    for suite, base, shared in [
        ("digits_attack_suite", "demo", {"surrogate_lenet", "standard", "fixed_eps32", "learnable_alpha16"}),
        ("fmnist_attack_suite", "fmnist_eps_sweep", {"surrogate_small_cnn", "surrogate_lenet", "surrogate_tiny_resnet",
                                                      "standard", "fixed_eps32", "learnable_alpha4"}),
    ]:
        mine, theirs = run_dirs(suite), run_dirs(base)
        assert {n for n in mine if theirs.get(n) == mine[n]} == shared, suite


@pytest.mark.parametrize("overrides, message", [
    (["pipeline.attacks=[pgd,pgdd]"], "unknown attack 'pgdd'"),
    (["pipeline.surrogates=[]"], "pipeline.surrogates is empty"),
    (["+pipeline.victims.A=[standard,nope]"], "unknown pipeline run 'nope'"),
    (["pipeline.attack_overrides.steps=2.5"], "attack_overrides.steps=2.5"),
    (["defense=nrp"], "needs weights="),
    (["pipeline.skip_inapplicable=false", "pipeline.attacks=[pgd,fia]",
      "pipeline.surrogates=[{ensemble:[surrogate_lenet,surrogate_tiny_resnet]}]"],
     "attack 'fia' is feature-level"),
])
def test_a_bad_evaluation_plan_fails_before_any_training(overrides, message, tmp_path):
    from trigact.common.errors import TrigactError
    from trigact.cli.pipeline import run_pipeline

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={tmp_path}", "experiment=demo", *overrides])
        with pytest.raises(TrigactError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
            run_pipeline(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "outputs" / "runs").exists()  # nothing was trained


def test_a_plain_list_of_victims_gives_one_column_per_run(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={tmp_path}", "experiment=demo"])
    OmegaConf.update(cfg, "pipeline.victims", ["standard", "fixed_eps32"], merge=False)  # e.g. in a user's file
    assert victim_groups(cfg) == {"standard": {"runs": ["standard"], "defense": None, "surrogates": None},
                                  "fixed_eps32": {"runs": ["fixed_eps32"], "defense": None, "surrogates": None}}
