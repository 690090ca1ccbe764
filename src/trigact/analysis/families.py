"""Which attack families hurt each defense most: robust accuracy per (family, budget) and the
strongest attacks per column, from a results folder whose rows are attacks of the suite (optionally
at several budgets, ``<attack>@<k>/255``).

A family's value is the mean over its attacks of the column's accuracy (each attack already averaged
over surrogates and the column's victims, Eq. 6-7); families come from each attack's config
(``conf/attack/<name>.yaml``, ``family:``).
"""

from __future__ import annotations

import statistics

from trigact.attacks import attack_spec
from trigact.attacks.config import split_label
from trigact.common.errors import TrigactError
from trigact.common.validate import parse_eps


def _by_column(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """column -> attack label -> [accuracy, one per victim of the column]."""
    out: dict[str, dict[str, list[float]]] = {}
    for record in records:
        column = out.setdefault(record.get("group") or record["name"], {})
        accs = record.get("robust_acc") or {}
        for label in record.get("attacks") or list(accs):  # the table's row order (JSON sorts keys)
            if accs.get(label) is not None:
                column.setdefault(label, []).append(accs[label])
    return out


def family_table(records: list[dict], top: int = 3) -> str:
    """Markdown: one row per (family, eps), one column per group (mean over the family's attacks), then
    the ``top`` strongest attacks (lowest robust accuracy) of each column at each eps."""
    columns = _by_column(records)
    labels = list(dict.fromkeys(label for c in columns.values() for label in c))
    if not labels:
        raise TrigactError("no attack rows in these results")
    family_of, eps_of = {}, {}
    for label in labels:
        name, eps = split_label(label)
        family_of[label], eps_of[label] = attack_spec(name).family, eps or "-"
    budgets = sorted(dict.fromkeys(eps_of[label] for label in labels),
                     key=lambda e: parse_eps(e) if e != "-" else -1.0)
    families = list(dict.fromkeys(family_of[label] for label in labels))
    names = list(columns)
    lines = ["| family | eps | attacks | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for family in families:
        for eps in budgets:
            these = [lb for lb in labels if family_of[lb] == family and eps_of[lb] == eps]
            if not these:
                continue
            cells = []
            for column in names:
                values = [statistics.fmean(columns[column][lb]) for lb in these if lb in columns[column]]
                cells.append(f"{100 * statistics.fmean(values):.2f}" if values else "-")
            lines.append(f"| {family} | {eps} | {len(these)} | " + " | ".join(cells) + " |")
    lines += ["", f"Strongest {top} attacks per column (lowest robust accuracy, %):", "",
              "| eps | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for eps in budgets:
        cells = []
        for column in names:
            ranked = sorted((statistics.fmean(v), split_label(lb)[0]) for lb, v in columns[column].items()
                            if eps_of.get(lb) == eps)
            cells.append(", ".join(f"{name} {100 * acc:.1f}" for acc, name in ranked[:top]) or "-")
        lines.append(f"| {eps} | " + " | ".join(cells) + " |")
    lines += ["", "Robust accuracy (%) averaged over surrogates and a column's victims (Eq. 6-7); a family's "
              "value is the mean over its attacks at that eps."]
    return "\n".join(lines) + "\n"
