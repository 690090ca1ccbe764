"""``python -m trigact.pipeline experiment=<name>``: the main job.

It trains every run an experiment names (skipping runs whose bundle already exists, so re-running
resumes where it stopped) and prints and saves a table of each deployed model's accuracy on clean
test inputs with and without its trigger. The transfer-attack stages (attack, evaluate) plug in
after training.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from trigact.cli import quiet_libraries, user_errors
from trigact.errors import TrigactError
from trigact.io import atomic_write_json, atomic_write_text
from trigact.runs import register_resolvers
from trigact.report import markdown_table, print_table
from trigact.train import CONF_DIR, train

register_resolvers()


def run_overrides(cfg: DictConfig, name: str) -> list[str]:
    """The train-config overrides for one run: the experiment's common ones, then the run's own."""
    own = cfg.pipeline.runs[name]
    if own is None or isinstance(own, str) or not OmegaConf.is_list(own):
        raise TrigactError(f"pipeline.runs.{name} must be a list of train overrides, e.g. [method=standard]")
    # The pipeline's own path settings apply to its training runs too (quoted: paths may hold , = [).
    shared = [f"paths.{key}={quote(cfg.paths[key])}" for key in FORWARDED_PATHS] + [f"seed={cfg.seed}"]
    return shared + list(cfg.pipeline.train_overrides) + list(own)


FORWARDED_PATHS = ("root_dir", "data_dir", "output_dir", "runs_dir")


def quote(value) -> str:
    """A Hydra override value that is taken literally."""
    return "'" + str(value).replace("'", "\\'") + "'"


def run_pipeline(cfg: DictConfig) -> list[dict]:
    if not cfg.get("pipeline") or not cfg.pipeline.get("runs"):
        raise TrigactError("no runs to do: choose an experiment, e.g. experiment=demo (see conf/experiment/)")
    rows = []
    for name in cfg.pipeline.runs:
        train_cfg = compose(config_name="train", overrides=run_overrides(cfg, name))
        print(f"== run {name}: {train_cfg.paths.run_dir}")
        rows.append({"name": name, **train(train_cfg)})
    out = Path(cfg.paths.results_dir)
    atomic_write_text(markdown_table(rows), out / "table.md")
    atomic_write_json(rows, out / "runs.json")
    return rows


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        rows = run_pipeline(cfg)
        print_table(rows, f"trigact.pipeline experiment={cfg.pipeline.name}")
        print(f"results: {Path(cfg.paths.results_dir).resolve()}")


if __name__ == "__main__":
    main()
