"""Robust accuracy against the attack budget (``attack_protocol=budget_sweep``), one curve per column.

Input: a results folder whose attacks carry their budget in their name, ``<attack>@<k>/255`` (what
the budget sweep writes). For each table column (victim group) and each eps: the mean over its
victims of their accuracy averaged over surrogates (Eq. 6-7), for each attack and averaged over the
attacks at that eps; the spread is over the group's victims (e.g. seeds).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from trigact.attacks.config import split_label
from trigact.common.errors import TrigactError
from trigact.common.io import atomic_save_figure
from trigact.common.validate import parse_eps


def budget_curves(records: list[dict]) -> tuple[list[float], dict[str, dict[float, list[float]]], list[str]]:
    """``(eps values in 255ths, column -> eps -> [mean over attacks, one per victim], attack names)``."""
    curves: dict[str, dict[float, list[float]]] = {}
    attacks: dict[str, None] = {}
    for record in records:
        per_eps: dict[float, list[float]] = {}
        for label, acc in (record.get("robust_acc") or {}).items():
            name, eps = split_label(label)
            if eps is None or acc is None:
                continue
            attacks[name] = None
            per_eps.setdefault(round(parse_eps(eps) * 255, 4), []).append(acc)
        column = curves.setdefault(record.get("group") or record["name"], {})
        for eps, values in per_eps.items():
            column.setdefault(eps, []).append(statistics.fmean(values))
    xs = sorted({eps for column in curves.values() for eps in column})
    if not xs:
        raise TrigactError("no attack with a budget in its name (<attack>@<k>/255) in these results: "
                           "run them with attack_protocol=budget_sweep")
    return xs, curves, list(attacks)


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{100 * statistics.fmean(values):.2f}{spread}"


def budget_table(records: list[dict]) -> str:
    """Markdown: one row per eps, one column per victim group (mean over attacks; ± std over victims)."""
    xs, curves, attacks = budget_curves(records)
    columns = list(curves)
    lines = ["| eps (/255) | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    for eps in xs:
        lines.append(f"| {eps:g} | " + " | ".join(_cell(curves[c].get(eps)) for c in columns) + " |")
    note = (f"\nRobust accuracy (%) averaged over the attacks ({', '.join(attacks)}) and surrogates at each eps;"
            " ± is the standard deviation over a column's victims.\n")
    return "\n".join(lines) + "\n" + note


def plot_budget(records: list[dict], path, title: str = "") -> Path:
    """Robust accuracy against eps (log2 axis), one line per column, error bars over its victims."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs, curves, _ = budget_curves(records)
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for column, points in curves.items():
        these = [x for x in xs if x in points]
        means = [100 * statistics.fmean(points[x]) for x in these]
        errs = [100 * statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in these]
        ax.errorbar(these, means, yerr=errs if any(errs) else None, marker="o", capsize=3, label=column)
    if len(xs) > 1 and min(xs) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel("attack eps (/255)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or "Robust accuracy against the attack budget")
    return atomic_save_figure(fig, path)
