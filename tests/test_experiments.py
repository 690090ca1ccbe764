"""Every pipeline experiment config composes, and each of its runs composes into a train config;
its surrogates and victims name its runs, its attacks and defenses exist (no training here)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trigact.pipeline import run_overrides, victim_groups
from trigact.train import CONF_DIR

PIPELINE_EXPERIMENTS = sorted(
    p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml") if "pipeline:" in p.read_text()
)


def test_the_fashion_mnist_experiments_are_there():
    assert {"demo", "fmnist_eps_sweep", "fmnist_preprocessing", "fmnist_defenses"} <= set(PIPELINE_EXPERIMENTS)


@pytest.mark.parametrize("name", PIPELINE_EXPERIMENTS)
def test_experiment_composes_with_all_its_runs(name, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={tmp_path}", f"experiment={name}"])
        runs = {r: compose(config_name="train", overrides=run_overrides(cfg, r)) for r in cfg.pipeline.runs}
    assert len({c.paths.run_dir for c in runs.values()}) == len(runs)  # no two runs share a folder
    named = list(cfg.pipeline.surrogates) + [r for g in victim_groups(cfg).values() for r in g["runs"]]
    assert set(named) <= set(runs)
    for attack in cfg.pipeline.attacks:
        assert (Path(CONF_DIR) / "attack" / f"{attack}.yaml").is_file()
    for group in victim_groups(cfg).values():
        if group["defense"]:
            assert (Path(CONF_DIR) / "defense" / f"{group['defense']}.yaml").is_file()
    data = {OmegaConf.select(c, "data.name") for c in runs.values()}
    assert len(data) == 1  # one data set per experiment: the banks are shared


def test_the_fashion_mnist_experiments_share_runs(tmp_path):
    """Run folders are keyed by config, so the Table II experiments reuse the Table I runs (and banks)."""
    def run_dirs(name):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={tmp_path}", f"experiment={name}"])
            return {r: compose(config_name="train", overrides=run_overrides(cfg, r)).paths.run_dir for r in cfg.pipeline.runs}

    sweep, preprocessing, defenses = (run_dirs(n) for n in ("fmnist_eps_sweep", "fmnist_preprocessing", "fmnist_defenses"))
    for name, run_dir in preprocessing.items():
        assert sweep[name] == run_dir and defenses[name] == run_dir
