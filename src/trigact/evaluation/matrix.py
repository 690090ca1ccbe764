"""The transfer matrix ``R[f_t, f_s, A]`` and its means (the paper's Eq. 5-7), as tables and a plot.

- ``R[v, s, A]``: accuracy of victim ``v`` on the adversarial images crafted on surrogate ``s`` with
  attack ``A`` (one cell).
- Eq. 6: for each victim and attack, the mean of ``R`` over surrogates.
- Eq. 7: for each victim group (e.g. one per defense) and attack, the mean of Eq. 6 over the victims.

Victims are plain ``nn.Module``s taking [0, 1] pixels (a model with trigger activation is its deployed
unit); nothing here special-cases triggers.
"""

from __future__ import annotations

import csv
import io
import os
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trigact.defenses.base import SeededDefense
from trigact.common.errors import TrigactError
from trigact.common.io import atomic_save_figure, atomic_write_text
from trigact.common.devices import model_device

CSV_FIELDS = ("victim", "surrogate", "attack", "accuracy", "n")


def _as_pixels(x: torch.Tensor) -> torch.Tensor:
    # Banks are stored as uint8 like real images; accept them as well as floats in [0, 1].
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def count_correct(model: nn.Module, batches: Iterable) -> tuple[int, int]:
    """(number correct, number of images) of ``model`` over ``(x, y)`` batches, in eval mode, no grad.

    Every module's own train/eval flag is restored afterwards (not just the top one: a model may hold
    deliberately frozen submodules).
    """
    modes = [(m, m.training) for m in model.modules()]
    device = model_device(model)
    correct = total = 0
    model.eval()
    try:
        with torch.inference_mode():
            for x, y in batches:
                pred = model(_as_pixels(x).to(device)).argmax(dim=1)
                correct += int((pred == y.to(device)).sum())
                total += int(y.numel())
    finally:
        for module, training in modes:
            module.training = training
    return correct, total


def accuracy(model: nn.Module, batches: Iterable) -> float:
    """Top-1 accuracy of ``model`` over an iterable of ``(x, y)`` batches; the model's mode is restored."""
    correct, total = count_correct(model, batches)
    if total == 0:
        raise TrigactError("accuracy of an empty set of images: the batches held no (x, y) pairs")
    return correct / total


def restart_randomness(model: nn.Module) -> None:
    """Restart the random stream of every randomized defense (R&P, DiffPure, dynamic NRP) in ``model``.

    Called before each set of images, so every cell of the matrix sees the same draws whatever else is
    evaluated before it: a cell does not change when an attack is added or the banks are reordered, and
    the cells of one victim are paired across attacks.
    """
    for module in model.modules():
        if isinstance(module, SeededDefense):
            module.reseed()


def bank_batches(bank: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x_adv, y)`` slices of a bank (any object with ``.x_adv`` N,C,H,W and ``.y`` N)."""
    x, y = bank.x_adv, bank.y
    if len(x) != len(y):
        raise TrigactError(f"bank has {len(x)} images but {len(y)} labels; they must match")
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


# ---------------------------------------------------------------------------------------------- the matrix
def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


@dataclass
class RobustnessMatrix:
    """Every cell ``R[victim, surrogate, attack]`` plus clean accuracy per victim.

    ``cells``: dicts ``{victim, surrogate, attack, accuracy, n}``; ``clean``: victim -> accuracy.
    """

    cells: list[dict] = field(default_factory=list)
    clean: dict[str, float] = field(default_factory=dict)

    # ---- orderings (first seen)
    @property
    def attacks(self) -> list[str]:
        return list(dict.fromkeys(c["attack"] for c in self.cells))

    @property
    def surrogates(self) -> list[str]:
        return list(dict.fromkeys(c["surrogate"] for c in self.cells))

    @property
    def victims(self) -> list[str]:
        return list(dict.fromkeys([*self.clean, *(c["victim"] for c in self.cells)]))

    def _groups(self, groups: Mapping[str, list[str]] | None) -> dict[str, list[str]]:
        if groups is None:
            return {v: [v] for v in self.victims}
        known = set(self.victims)
        for name, members in groups.items():
            if not members:
                raise TrigactError(f"victim group {name!r} is empty; give it at least one victim")
            for v in members:
                if v not in known:
                    raise TrigactError(
                        f"victim {v!r} of group {name!r} was not evaluated; known: {', '.join(sorted(known))}"
                    )
        return {name: list(members) for name, members in groups.items()}

    # ---- Eq. 6 and 7
    def mean_over_surrogates(self) -> dict[tuple[str, str], float]:
        """Eq. 6: ``(victim, attack) -> mean over surrogates of R[victim, surrogate, attack]``."""
        per: dict[tuple[str, str], list[float]] = {}
        for c in self.cells:
            per.setdefault((c["victim"], c["attack"]), []).append(c["accuracy"])
        return {key: _mean(values) for key, values in per.items()}

    def mean_over_victims(self, groups: Mapping[str, list[str]] | None = None) -> dict[tuple[str, str], float]:
        """Eq. 7: ``(group, attack) -> mean over the group's victims of Eq. 6``.

        ``groups`` maps a group name to victim names; by default each victim is its own group.
        """
        eq6 = self.mean_over_surrogates()
        out: dict[tuple[str, str], float] = {}
        for name, members in self._groups(groups).items():
            for attack in self.attacks:
                values = [eq6[(v, attack)] for v in members if (v, attack) in eq6]
                if values:
                    out[(name, attack)] = _mean(values)
        return out

    def clean_by_group(self, groups: Mapping[str, list[str]] | None = None) -> dict[str, float]:
        """``group -> mean clean accuracy of its victims`` (groups whose victims lack it are left out)."""
        out = {}
        for name, members in self._groups(groups).items():
            values = [self.clean[v] for v in members if v in self.clean]
            if values:
                out[name] = _mean(values)
        return out

    def mean_over_attacks(self, groups: Mapping[str, list[str]] | None = None) -> dict[str, float]:
        """The tables' "Mean" row: ``group -> mean over attacks of Eq. 7``."""
        eq7 = self.mean_over_victims(groups)
        out = {}
        for name in self._groups(groups):
            values = [eq7[(name, a)] for a in self.attacks if (name, a) in eq7]
            if values:
                out[name] = _mean(values)
        return out

    # ---- outputs
    def to_csv(self, path) -> Path:
        """Every cell, one row each, with a header (written atomically)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for c in self.cells:
            writer.writerow({k: c[k] for k in CSV_FIELDS})
        return atomic_write_text(buf.getvalue(), path)

    def to_markdown(self, groups: Mapping[str, list[str]] | None = None) -> str:
        """The paper's layout: rows Clean, one per attack, Mean; columns = groups; values in %.

        In each attack row and in the Mean row the highest robust accuracy is bold (ties all bold,
        compared as displayed); the Clean row is never bold.
        """
        names = list(self._groups(groups))
        eq7 = self.mean_over_victims(groups)
        clean = self.clean_by_group(groups)
        mean = self.mean_over_attacks(groups)

        def row(label: str, values: dict[str, float], bold: bool) -> str:
            shown = {n: _pct(values.get(n)) for n in names}
            best = max((float(s) for s in shown.values() if s != "-"), default=None)
            cells = [f"**{s}**" if bold and s != "-" and float(s) == best else s for s in shown.values()]
            return f"| {label} | " + " | ".join(cells) + " |"

        lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines.append(row("Clean", clean, bold=False))
        for attack in self.attacks:
            lines.append(row(attack, {n: eq7[(n, attack)] for n in names if (n, attack) in eq7}, bold=True))
        lines.append(row("Mean", mean, bold=True))
        return "\n".join(lines) + "\n"

    def plot_mean_robustness(self, groups: Mapping[str, list[str]] | None, path) -> Path:
        """A bar chart of the Mean row (robust accuracy in %, per group), saved atomically as PNG."""
        # Figure + Agg canvas directly: no pyplot, so no global backend switch and no GUI.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        mean = self.mean_over_attacks(groups)
        names = [n for n in self._groups(groups) if n in mean]
        values = [100 * mean[n] for n in names]
        fig = Figure(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        bars = ax.bar(range(len(names)), values, color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        crowded = len(names) > 4
        labels = [textwrap.fill(n, 18) for n in names]  # long group names would overlap on one line
        ax.set_xticks(range(len(names)), labels, rotation=20 if crowded else 0, ha="right" if crowded else "center")
        ax.set_ylim(0, 105)
        ax.set_ylabel("mean robust accuracy (%)")
        ax.set_title(f"Mean over {len(self.attacks)} attacks and {len(self.surrogates)} surrogates")

        return atomic_save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- evaluate
def _run_key(run) -> str:
    # Two spellings of one path (relative, "..", symlink) are one run.
    return os.path.realpath(os.fspath(run))


def check_transfer(
    victims: Iterable[str],
    surrogates: Iterable[str],
    victim_runs: Mapping[str, Any] | None,
    surrogate_runs: Mapping[str, Any] | None,
    allow_whitebox: bool = False,
) -> None:
    """Refuse a victim that is the very run a surrogate came from (a white-box attack, not a transfer)."""
    if allow_whitebox or not victim_runs or not surrogate_runs:
        return
    surrogate_keys = {s: _run_key(surrogate_runs[s]) for s in surrogates if s in surrogate_runs}
    for v in victims:
        if v not in victim_runs:
            continue
        key = _run_key(victim_runs[v])
        for s, s_key in surrogate_keys.items():
            if key == s_key:
                raise TrigactError(
                    f"victim {v} is surrogate {s}: that is a white-box attack, not a transfer; "
                    "pass allow_whitebox=true to evaluate it anyway"
                )


def _clean_source(clean_batches) -> Callable[[], Iterable] | None:
    """A factory giving a fresh iterable of clean batches per victim."""
    if clean_batches is None:
        return None
    if callable(clean_batches):
        return clean_batches
    if iter(clean_batches) is clean_batches:  # a one-shot iterator/generator: keep it for every victim
        clean_batches = list(clean_batches)
    return lambda: clean_batches


def evaluate_matrix(
    victims: Mapping[str, nn.Module],
    banks: Mapping[tuple[str, str], Any],
    clean_batches=None,
    victim_runs: Mapping[str, Any] | None = None,
    surrogate_runs: Mapping[str, Any] | None = None,
    allow_whitebox: bool = False,
    batch_size: int = 256,
) -> RobustnessMatrix:
    """Evaluate every victim on every bank ``banks[(surrogate, attack)]`` (and on clean data).

    - ``banks`` values: any object with ``.x_adv`` (float in [0, 1] or uint8, N,C,H,W) and ``.y``.
    - ``clean_batches``: a list / re-iterable of ``(x, y)``, or a zero-argument factory returning one
      (e.g. ``dm.test_dataloader``); None skips clean accuracy.
    - ``victim_runs`` / ``surrogate_runs``: name -> run identity (e.g. bundle path). A victim whose run is
      a surrogate's run raises :class:`TrigactError` unless ``allow_whitebox``.
    """
    if batch_size < 1:
        raise TrigactError(f"batch_size must be a positive integer, got {batch_size}")
    if not victims:
        raise TrigactError("no victims to evaluate; give at least one")
    surrogates = list(dict.fromkeys(s for s, _ in banks))
    check_transfer(victims, surrogates, victim_runs, surrogate_runs, allow_whitebox)

    result = RobustnessMatrix()
    clean = _clean_source(clean_batches)
    for v_name, model in victims.items():
        if clean is not None:
            restart_randomness(model)
            result.clean[v_name] = accuracy(model, clean())
        for (s_name, attack), bank in banks.items():
            restart_randomness(model)
            correct, n = count_correct(model, bank_batches(bank, batch_size))
            if n == 0:
                raise TrigactError(f"bank ({s_name}, {attack}) holds no images")
            result.cells.append(
                {"victim": v_name, "surrogate": s_name, "attack": attack, "accuracy": correct / n, "n": n}
            )
    return result
