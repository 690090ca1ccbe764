"""Results as files and tables: ``matrix.csv``, ``table.csv``, ``table.md``, ``robustness.png``,
``victims.json``, and the same tables for W&B. (The CSV formats: :mod:`trigact.evaluation.matrix`.)"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from trigact.evaluation.bank import Bank
from trigact.evaluation.matrix import RobustnessMatrix
from trigact.common.io import atomic_write_json, atomic_write_text


def write_results(matrix: RobustnessMatrix, groups: Mapping[str, list[str]], records: list[dict], out,
                  intervals: bool = False) -> Path:
    """``matrix.csv`` (every cell, with its 95% interval), ``table.csv`` (every victim's and every group's
    row of the table, with intervals), ``table.md`` (paper layout, Worst case row included; each cell's
    interval shown when ``intervals``), ``robustness.png`` and ``victims.json``."""
    out = Path(out)
    eq6 = matrix.mean_over_surrogates()
    worst = matrix.worst_case()
    for record in records:  # what analysis plots need, beside the cells in matrix.csv (in place)
        name = record["name"]
        record["clean_acc"] = matrix.clean.get(name)
        per_attack = {a: eq6[(name, a)] for a in matrix.attacks if (name, a) in eq6}
        record["robust_acc"] = per_attack
        record["attacks"] = list(per_attack)  # the table's row order (JSON keys get sorted)
        record["mean_robust_acc"] = sum(per_attack.values()) / len(per_attack) if per_attack else None
        record["worst_case_acc"] = worst.get(name)
    matrix.to_csv(out / "matrix.csv")
    matrix.to_table_csv(out / "table.csv", groups)
    atomic_write_text(matrix.to_markdown(groups, intervals=intervals), out / "table.md")
    matrix.plot_mean_robustness(groups, out / "robustness.png")
    atomic_write_json(records, out / "victims.json")
    return out


def robustness_tables(matrix: RobustnessMatrix, groups: Mapping[str, list[str]], records: list[dict]) -> dict:
    """The results as tables for W&B: every cell (with its interval), the paper-layout table (Clean, one
    row per attack, Mean, Worst case) and one row per victim."""
    estimates = matrix.group_estimates(groups)
    paper = [{"row": row, **{g: getattr(estimates.get((g, row)), "value", None) for g in groups}}
             for row in matrix.rows]
    victims = [{k: r.get(k) for k in ("name", "group", "method", "model", "seed", "trigger_kind", "eps", "alpha",
                                      "defense", "clean_acc", "mean_robust_acc", "worst_case_acc")} for r in records]
    return {"robustness/cells": matrix.cell_rows(), "robustness/table": paper, "robustness/victims": victims}


def bank_rows(banks: Mapping[tuple[str, str], Bank]) -> list[dict]:
    """One summary row per bank: its surrogate's clean accuracy and white-box success, cost, path."""
    return [
        {"surrogate": s, "attack": a, "n": len(b), "clean acc": b.meta["surrogate_clean_acc"],
         "white-box success": b.meta["whitebox_success_rate"], "wall time (s)": b.meta.get("wall_time_s"),
         "bank": str(b.path)}
        for (s, a), b in banks.items()
    ]
