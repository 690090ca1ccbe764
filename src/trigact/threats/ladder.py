"""The threat-model ladder as one table: a row pair (Mean, Worst case) per attacker level, a column per
defense, each cell with its 95% interval (``ladder.md``, ``ladder.csv``, ``ladder.png``), plus the
clamp statistic and the cross-level sanity flag.

Each level's results are a :class:`~trigact.evaluation.matrix.RobustnessMatrix` of its own (banks for
L0-L3, attacks on the victim for L4-L6, :mod:`trigact.threats.evaluate`); the ladder reads their
Mean and Worst case rows. A white-box attacker (L6) can run every weaker attack, so its worst case
above a weaker level's is flagged: the white-box figure is then broken, not the defense strong. The
last row, "all levels / Worst case", is the images a victim gets right under every attack of every
level: the floor an attacker who may run them all reaches, whatever any one level's figure says
(:func:`envelope`; left out, with a note, when the levels did not score the same images).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path

import torch

from trigact.common.io import atomic_write_bytes, atomic_write_text
from trigact.evaluation.matrix import CLEAN_ROW, MEAN_ROW, WORST_ROW, RobustnessMatrix
from trigact.threats.levels import LEVELS

FIELDS = ("level", "attacker", "row", "group", "accuracy", "ci_low", "ci_high", "n", "interval")
ENVELOPE_LEVEL, ENVELOPE_ATTACKER = "all", "every attacker above"


def envelope(levels: Mapping[str, RobustnessMatrix]) -> tuple[RobustnessMatrix | None, str | None]:
    """``(matrix, None)``: every level's cells in one matrix (surrogates named ``"<level> <surrogate>"``),
    whose Worst case is the AND over the levels; ``(None, why)`` when the levels did not score the same
    images (other victims, image counts or clean counts: per-image masks cannot be combined) or a cell
    has no per-image mask. (Within one pipeline run every level scores the same ``images``; the
    counts are the check that survives matrices put together by hand.)"""
    if len(levels) < 2:
        return None, None
    (first_level, first), *rest = levels.items()
    for level, matrix in rest:
        same = set(matrix.clean) == set(first.clean) and matrix.clean_n == first.clean_n and all(
            round(matrix.clean[v] * n) == round(first.clean[v] * n) for v, n in first.clean_n.items())
        if not same:
            return None, (f"no all-levels worst case: {level} and {first_level} did not score the same victims on "
                          "the same images (clean accuracy or image count differ)")
    merged = RobustnessMatrix(clean=dict(first.clean), clean_n=dict(first.clean_n))
    for level, matrix in levels.items():
        for cell in matrix.cells:
            name, key = f"{level} {cell['surrogate']}", (cell["victim"], cell["surrogate"], cell["attack"])
            mask = matrix.per_image.get(key)
            if mask is None or len(mask) != first.clean_n.get(cell["victim"]):
                # a victim left out of the AND would bias a group's mean: no row rather than a wrong floor
                got = "no per-image result" if mask is None else f"{len(mask)} images"
                return None, (f"no all-levels worst case: {level}'s {cell['attack']} has {got} for {cell['victim']} "
                              f"(clean: {first.clean_n.get(cell['victim'])} images)")
            merged.cells.append({**cell, "surrogate": name})
            merged.per_image[(cell["victim"], name, cell["attack"])] = mask.cpu()
    return merged, None


def ladder_rows(levels: Mapping[str, RobustnessMatrix], groups: Mapping[str, list[str]]) -> list[dict]:
    """One dict per (level, row, group): Clean (from the first level), then each level's Mean and Worst case,
    then the Worst case over all levels (:func:`envelope`, where the levels scored the same images)."""
    rows = []
    for i, (level, matrix) in enumerate(levels.items()):
        estimates = matrix.group_estimates(groups)
        for row in ([CLEAN_ROW] if i == 0 else []) + [MEAN_ROW, WORST_ROW]:
            for group in groups:
                e = estimates.get((group, row))
                if e is None:
                    continue
                rows.append({"level": "-" if row == CLEAN_ROW else level,
                             "attacker": "no attack" if row == CLEAN_ROW else LEVELS[level][0], "row": row,
                             "group": group, "accuracy": e.value, "ci_low": e.low, "ci_high": e.high, "n": e.n,
                             "interval": e.method, "_estimate": e})
    merged, _ = envelope(levels)
    if merged is not None:
        estimates = merged.group_estimates(groups)
        for group in groups:
            e = estimates.get((group, WORST_ROW))
            if e is not None:
                rows.append({"level": ENVELOPE_LEVEL, "attacker": ENVELOPE_ATTACKER, "row": WORST_ROW, "group": group,
                             "accuracy": e.value, "ci_low": e.low, "ci_high": e.high, "n": e.n,
                             "interval": e.method, "_estimate": e})
    return rows


def ladder_flags(levels: Mapping[str, RobustnessMatrix], groups: Mapping[str, list[str]]) -> list[str]:
    """The white box must be at least as strong as every weaker attacker: one line per group where L6's
    worst case is above another level's worst case."""
    if "L6" not in levels:
        return []
    worst = {level: m.worst_case_by_group(groups) for level, m in levels.items()}
    flags = []
    for group in groups:
        top = worst["L6"].get(group)
        for level, values in worst.items():
            if level != "L6" and top is not None and group in values and top > values[group]:
                flags.append(f"{group}: L6 worst case {top:.1%} above {level}'s {values[group]:.1%}: the white-box "
                             "attack is weaker than a weaker attacker's; its figure is not a floor")
    return flags


def to_markdown(rows: list[dict], groups: Mapping[str, list[str]], flags: list[str], notes: list[str] = ()) -> str:
    names = list(groups)
    table: dict[tuple, dict] = {}
    for r in rows:
        table.setdefault((r["level"], r["attacker"], r["row"]), {})[r["group"]] = r["_estimate"]
    lines = ["| level | attacker | row | " + " | ".join(names) + " |", "|---|---|---|" + "---:|" * len(names)]
    for (level, attacker, row), cells in table.items():
        shown = [f"{100 * cells[g].value:.2f}{cells[g].interval_text()}" if g in cells else "-" for g in names]
        lines.append(f"| {level} | {attacker} | {row} | " + " | ".join(shown) + " |")
    lines += ["", "Robust accuracy in %, with 95% intervals ([low, high]: Wilson over the images; ± h: t over a "
              "column's victims). Mean: over the level's attacks and surrogates (Eq. 5-7); Worst case: the images "
              "right under every attack and surrogate of the level"
              + ("; all levels: the images right under every attack of every level (the floor of an attacker who "
                 "may run them all)." if any(r["level"] == ENVELOPE_LEVEL for r in rows) else ".")]
    lines += [f"- {n}" for n in notes]
    if flags:
        lines += ["", "Sanity flags:"] + [f"- {f}" for f in flags]
    return "\n".join(lines) + "\n"


def write_ladder(levels: Mapping[str, RobustnessMatrix], groups: Mapping[str, list[str]], out,
                 notes: list[str] = ()) -> Path:
    """``ladder.md``, ``ladder.csv`` and ``ladder.png`` in ``out`` (written atomically)."""
    out = Path(out)
    rows = ladder_rows(levels, groups)
    flags = ladder_flags(levels, groups)
    _, why = envelope(levels)
    notes = [*notes, *([why] if why else [])]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in FIELDS})
    atomic_write_text(buf.getvalue(), out / "ladder.csv")
    atomic_write_text(to_markdown(rows, groups, flags, notes), out / "ladder.md")
    _plot(rows, groups, list(levels), out / "ladder.png")
    return out


def _plot(rows: list[dict], groups, levels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ticks = levels + ([ENVELOPE_LEVEL] if any(r["level"] == ENVELOPE_LEVEL for r in rows) else [])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, group in enumerate(groups):
        for row, style in ((MEAN_ROW, "-"), (WORST_ROW, ":")):
            points = [(ticks.index(r["level"]), 100 * r["accuracy"]) for r in rows
                      if r["group"] == group and r["row"] == row and r["level"] in ticks]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{group} ({row.lower()})")
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel("attacker level (L0 naive transfer ... L6 white box; all: every level's attacks)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


@torch.no_grad()
def clamp_share(model, x: torch.Tensor) -> float | None:
    """The share of pixels where the deployed unit's clamp is active, ``x + tau`` outside [0, 1]: there
    the trigger saturates the pixel, and an attacker's push in the same direction is absorbed (on
    Fashion-MNIST's black background, most of tau's negative half). None without a trigger."""
    tau = getattr(model, "trigger", None)
    if tau is None:
        return None
    shifted = x + tau.to(x)
    return ((shifted < 0) | (shifted > 1)).float().mean().item()
