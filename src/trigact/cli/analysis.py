"""``python -m trigact.analysis results=<folder> x=eps``: accuracy against eps_t (or alpha) from a sweep;
``x=attack_eps``: robust accuracy against the attack budget from ``attack_protocol=budget_sweep`` results;
``x=attack_family``: robust accuracy per attack family (and budget) and the strongest attacks per column
(``families.md``, no figure).

``results`` is a results folder of ``trigact.evaluate`` or ``trigact.pipeline``. Writes
``sweep_<x>.png`` and ``sweep_<x>.md`` (``budget.png``, ``budget.md`` for ``x=attack_eps``) beside its table and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from trigact.analysis.budget import budget_table, plot_budget
from trigact.analysis.sweep import plot_sweep, read_victims, sweep_points, sweep_table
from trigact.cli import quiet_libraries, user_errors
from trigact.common.config import CONF_DIR
from trigact.common.io import atomic_write_text
from trigact.runs import register_resolvers

register_resolvers()  # ${trigact_launch:...} in the launch folder's name


def run_analysis(cfg: DictConfig) -> tuple[Path, Path]:
    results = Path(cfg.results)
    out = Path(cfg.out_dir) if cfg.get("out_dir") else results
    if cfg.x == "attack_family":  # which attack families hurt each column most
        from trigact.analysis.families import family_table

        table = atomic_write_text(family_table(read_victims(results)), out / "families.md")
        return table, table
    if cfg.x == "attack_eps":  # a budget sweep: accuracy against the attack's eps, per column
        records = read_victims(results)
        table = atomic_write_text(budget_table(records), out / "budget.md")
        return table, plot_budget(records, out / "budget.png", cfg.get("title") or "")
    points, references = sweep_points(read_victims(results), cfg.x)
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
