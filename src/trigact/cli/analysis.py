"""``python -m trigact.analysis results=<folder> x=eps``: accuracy against eps_t (or alpha) from a sweep.

``results`` is a results folder of ``trigact.evaluate`` or ``trigact.pipeline``. Writes
``sweep_<x>.png`` and ``sweep_<x>.md`` beside its table and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from trigact.analysis.sweep import plot_sweep, read_victims, sweep_points, sweep_table
from trigact.cli import quiet_libraries, user_errors
from trigact.common.config import CONF_DIR
from trigact.common.io import atomic_write_text


def run_analysis(cfg: DictConfig) -> tuple[Path, Path]:
    results = Path(cfg.results)
    points, references = sweep_points(read_victims(results), cfg.x)
    out = Path(cfg.out_dir) if cfg.get("out_dir") else results
    table = atomic_write_text(sweep_table(points, references, cfg.x), out / f"sweep_{cfg.x}.md")
    figure = plot_sweep(points, references, out / f"sweep_{cfg.x}.png", cfg.x, cfg.get("title") or "")
    return table, figure


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="analysis")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        table, figure = run_analysis(cfg)
        print(table.read_text())
        print(f"figure: {figure.resolve()}\ntable: {table.resolve()}")


if __name__ == "__main__":
    main()
