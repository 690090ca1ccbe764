"""Robust and clean accuracy against the trigger size: eps_t for fixed triggers, alpha for learnable.

Input: a results folder of ``trigact.evaluate`` or ``trigact.pipeline`` (its ``victims.json`` holds,
per victim, the trigger kind and size, clean accuracy and mean robust accuracy per attack). Victims
with the same trigger size (e.g. seeds) are averaged and their spread shown; victims without a
trigger (standard training, or adversarial training) are drawn as horizontal reference lines.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from trigact.common.errors import TrigactError
from trigact.common.io import atomic_save_figure

AXES = {"eps": "fixed", "alpha": "learnable"}


@dataclass
class SweepPoint:
    """One trigger size (x in 255ths) with the victims that share it."""

    x: float
    clean: list[float] = field(default_factory=list)
    robust: list[float] = field(default_factory=list)
    per_attack: dict[str, list[float]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # attacks in table order

    @staticmethod
    def _stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0

    @property
    def clean_mean(self) -> float:
        return self._stats(self.clean)[0]

    @property
    def robust_mean(self) -> float:
        return self._stats(self.robust)[0]


def read_victims(results_dir) -> list[dict]:
    path = Path(results_dir) / "victims.json"
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrigactError(f"no victims.json in {results_dir}: give the results folder of trigact.evaluate or trigact.pipeline") from None
    except json.JSONDecodeError as err:
        raise TrigactError(f"corrupt {path}: {err.msg}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "mean_robust_acc" in r for r in records):
        raise TrigactError(f"{path} has no accuracies; evaluate again with this version of trigact")
    return records


def sweep_points(records: list[dict], x: str = "eps") -> tuple[list[SweepPoint], dict[str, dict]]:
    """``(points sorted by trigger size, references)``; references: victims without that trigger
    kind and without any trigger, by name (e.g. the standard model)."""
    if x not in AXES:
        raise TrigactError(f"unknown sweep axis x={x!r}; known: {', '.join([*AXES, 'attack_eps', 'attack_family'])}")
    points: dict[float, SweepPoint] = {}
    references = {}
    for record in records:
        if record.get("trigger_kind") == AXES[x] and record.get(x) is not None:
            value = round(float(record[x]) * 255, 4)
            point = points.setdefault(value, SweepPoint(value))
            point.clean.append(record["clean_acc"])
            point.robust.append(record["mean_robust_acc"])
            point.names.append(record["name"])
            point.order = point.order or list(record.get("attacks") or [])
            for attack, acc in (record.get("robust_acc") or {}).items():
                point.per_attack.setdefault(attack, []).append(acc)
        elif record.get("trigger_kind", "none") == "none":
            references[record["name"]] = record
    if not points:
        raise TrigactError(f"no victim with a {AXES[x]} trigger among {len(records)}: nothing to draw against {x}")
    return [points[k] for k in sorted(points)], references


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def sweep_table(points: list[SweepPoint], references: dict[str, dict], x: str = "eps") -> str:
    """Markdown: one row per trigger size (and per reference victim), clean, mean robust, per attack."""
    attacks = list(dict.fromkeys(a for p in points for a in p.order + list(p.per_attack)))
    header = f"| {x} (/255) | victims | clean acc (%) | mean robust acc (%) | " + " | ".join(attacks) + " |"
    lines = [header, "|" + "---:|" * (4 + len(attacks))]
    for name, record in references.items():
        per = record.get("robust_acc") or {}
        lines.append(f"| {name} (no trigger) | 1 | {_pct(record['clean_acc'])} | {_pct(record['mean_robust_acc'])} | "
                     + " | ".join(_pct(per.get(a)) for a in attacks) + " |")
    for p in points:
        spread = f" ± {100 * SweepPoint._stats(p.robust)[1]:.2f}" if len(p.robust) > 1 else ""
        lines.append(f"| {p.x:g} | {len(p.names)} | {_pct(p.clean_mean)} | {_pct(p.robust_mean)}{spread} | "
                     + " | ".join(_pct(statistics.fmean(p.per_attack[a])) if a in p.per_attack else "-" for a in attacks)
                     + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(points: list[SweepPoint], references: dict[str, dict], path, x: str = "eps", title: str = "") -> Path:
    """Robust and clean accuracy against the trigger size (log2 axis), references as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p.x for p in points]
    for label, values, color in (("robust (mean over attacks, surrogates)", [p.robust for p in points], "tab:red"),
                                 ("clean (deployed)", [p.clean for p in points], "tab:blue")):
        means = [100 * statistics.fmean(v) for v in values]
        errs = [100 * SweepPoint._stats(v)[1] for v in values]
        ax.errorbar(xs, means, yerr=errs if any(errs) else None, marker="o", color=color, label=label, capsize=3)
    for i, (name, record) in enumerate(references.items()):
        ax.axhline(100 * record["mean_robust_acc"], color="tab:red", linestyle="--", alpha=0.6,
                   label=f"robust, {name}" if i < 3 else None)
        if record.get("clean_acc") is not None:
            ax.axhline(100 * record["clean_acc"], color="tab:blue", linestyle=":", alpha=0.6,
                       label=f"clean, {name}" if i < 3 else None)
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel(f"{'eps_t' if x == 'eps' else 'alpha'} (/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or f"Accuracy against trigger size ({AXES[x]} trigger)")

    return atomic_save_figure(fig, path)
