"""The transfer matrix ``R[f_t, f_s, A]`` and its means (the paper's Eq. 5-7), a worst case and 95%
intervals, as tables and a plot.

- ``R[v, s, A]``: accuracy of victim ``v`` on the adversarial images crafted on surrogate ``s`` with
  attack ``A`` (one cell).
- Eq. 6: for each victim and attack, the mean of ``R`` over surrogates.
- Eq. 7: for each victim group (e.g. one per defense) and attack, the mean of Eq. 6 over the victims.
- Worst case: the fraction of images a victim gets right under *every* attack and *every* surrogate
  (an AND over the per-image correctness of all its cells; every bank holds the same clean images in
  the same order, which :func:`evaluate_matrix` checks); a group's worst case is the mean of its
  victims' (as Eq. 7 does).

95% intervals (:class:`Estimate`):

- one victim (a cell, its Clean, Eq. 6, Mean and Worst case): the Wilson score interval at the reported
  accuracy, with ``n`` the distinct images (a cell: its bank; Eq. 6 and Mean, averages of cells on the
  same images: those images once, since cells on one image are not independent draws). It is the
  spread of one run's images, not a bound on run-to-run (seed) variation;
- a group of ``n >= 2`` victims (e.g. seeds): ``mean +- t_{0.975, n-1} * std / sqrt(n)``, ``std`` the
  sample standard deviation (ddof 1) of the victims' values (identical victims give a zero-width
  interval); a group of one victim takes its Wilson interval. Bounds are clipped to [0, 1].

Files (:meth:`RobustnessMatrix.to_csv`, :meth:`RobustnessMatrix.to_table_csv`):

- ``matrix.csv``: one row per cell, columns ``victim, surrogate, attack, accuracy, n, ci_low, ci_high``
  (``accuracy`` and the bounds as fractions in [0, 1], ``n`` the bank's images; Wilson).
- ``table.csv``: the aggregates, columns ``level, name, row, accuracy, ci_low, ci_high, n, std, interval``.
  ``level`` is ``victim`` (``name`` a victim: its Clean, Eq. 6 per attack, Mean and Worst case) or
  ``group`` (``name`` a table column: Eq. 7 and the rest, exactly the values of ``table.md``); ``row`` is
  the table row (``Clean``, an attack, ``Mean``, ``Worst case``); ``interval`` is ``wilson`` (``n``:
  distinct images) or ``t`` (``n``: victims, ``std`` their standard deviation); empty bounds: unknown.

Victims are plain ``nn.Module``s taking [0, 1] pixels (a model with trigger activation is its deployed
unit); nothing here special-cases triggers.
"""

from __future__ import annotations

import csv
import io
import math
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
from trigact.evaluation.bank import stored_images, to_device_pixels
from trigact.common.io import atomic_save_figure, atomic_write_text
from trigact.common.devices import model_device

CSV_FIELDS = ("victim", "surrogate", "attack", "accuracy", "n", "ci_low", "ci_high")
TABLE_CSV_FIELDS = ("level", "name", "row", "accuracy", "ci_low", "ci_high", "n", "std", "interval")
CLEAN_ROW, MEAN_ROW, WORST_ROW = "Clean", "Mean", "Worst case"


def _as_pixels(x: torch.Tensor, device) -> torch.Tensor:
    # Banks are stored as uint8 like real images; accept them as well as floats in [0, 1]. A uint8
    # batch is moved first and dequantized on the device: no float copy of it on the host.
    return to_device_pixels(x, device).float()


def correct_mask(model: nn.Module, batches: Iterable) -> torch.Tensor:
    """Per-image correctness (bool, on the CPU, in batch order) of ``model`` over ``(x, y)`` batches,
    in eval mode, no grad.

    Every module's own train/eval flag is restored afterwards (not just the top one: a model may hold
    deliberately frozen submodules).
    """
    modes = [(m, m.training) for m in model.modules()]
    device = model_device(model)
    masks = []
    model.eval()
    try:
        with torch.inference_mode():
            for x, y in batches:
                pred = model(_as_pixels(x, device)).argmax(dim=1)
                masks.append((pred == y.to(device)).reshape(-1).cpu())
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)


def count_correct(model: nn.Module, batches: Iterable) -> tuple[int, int]:
    """(number correct, number of images) of ``model`` over ``(x, y)`` batches (see :func:`correct_mask`)."""
    mask = correct_mask(model, batches)
    return int(mask.sum()), int(mask.numel())


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


def bank_batches(bank: Any, batch_size: int, clean: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x_adv, y)`` slices of a bank (``(x_clean, y)`` with ``clean``), as the bank holds them: a
    :class:`~trigact.evaluation.bank.Bank`'s uint8 ``q_adv`` (memory-mapped; :func:`correct_mask`
    dequantizes each batch on the victim's device, so no float copy of a bank is made), or the ``.x_adv``
    (float in [0, 1] or uint8, N,C,H,W) of any other object with ``.y`` (N)."""
    x, y = stored_images(bank, clean), bank.y
    if len(x) != len(y):
        raise TrigactError(f"bank has {len(x)} images but {len(y)} labels; they must match")
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def _clean_images(bank: Any) -> torch.Tensor | None:
    # The stored ones (a Bank's uint8 q_clean: compared without a float copy), or None.
    try:
        return stored_images(bank, clean=True)
    except AttributeError:
        return None


def _same_images(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:  # a uint8 bank beside a float one built by hand: compare pixel values
        return torch.equal(_as_pixels(a, a.device), _as_pixels(b, a.device))
    return torch.equal(a, b)


def check_aligned_banks(banks: Mapping[tuple[str, str], Any]) -> None:
    """Every bank must hold the same clean images in the same order (same labels, and the same
    ``x_clean`` where the banks carry it; a Bank's uint8 ``q_clean`` is compared as stored), or the
    worst case could not AND one image across banks."""
    items = list(banks.items())
    if not items:
        return
    (first_key, first), rest = items[0], items[1:]
    first_clean = _clean_images(first)
    for key, bank in rest:
        same = len(bank.y) == len(first.y) and torch.equal(torch.as_tensor(bank.y), torch.as_tensor(first.y))
        clean = _clean_images(bank)
        if same and clean is not None and first_clean is not None:
            same = _same_images(clean, first_clean)
        if not same:
            raise TrigactError(
                f"TAE banks {first_key} and {key} hold different clean images ({len(first.y)} vs {len(bank.y)}): "
                "the worst case compares each image across banks, so craft every bank with one n_eval, split and data"
            )


# ---------------------------------------------------------------------------------------- intervals
Z_975 = 1.959963984540054  # standard normal 0.975 quantile: two-sided 95%
# Student t 0.975 quantiles for 1..30 degrees of freedom; beyond, the Cornish-Fisher expansion below
# (within 3e-8 there; no scipy needed).
_T_975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise TrigactError(f"t quantile: degrees of freedom must be an integer >= 1, got {df!r}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def wilson_interval(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` (= k / n) observed on ``n`` trials."""
    if n <= 0:
        raise TrigactError(f"Wilson interval of {n} trials: needs at least one")
    if not 0.0 <= p <= 1.0:
        raise TrigactError(f"Wilson interval of a proportion {p!r} outside [0, 1]")
    z2 = Z_975 * Z_975
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = Z_975 / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Exact at the ends (0 or all correct), where rounding would leave 1 - 1e-16.
    return (0.0 if p == 0 else max(0.0, center - half)), (1.0 if p == 1 else min(1.0, center + half))


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


@dataclass(frozen=True)
class Estimate:
    """A reported accuracy and its 95% interval [``low``, ``high``] (None: no interval known).

    ``method``: ``"wilson"`` (``n`` images) or ``"t"`` (``n`` victims, ``std`` their sample std).
    """

    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None
    std: float | None = None
    method: str | None = None

    @classmethod
    def wilson(cls, value: float, n: int | None) -> Estimate:
        if not n:
            return cls(value)
        low, high = wilson_interval(value, n)
        return cls(value, low, high, n, None, "wilson")

    @classmethod
    def over_victims(cls, value: float, values: list[float]) -> Estimate:
        """``value`` (the mean of ``values``, one per victim) +- t * std / sqrt(n); needs n >= 2."""
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        return cls(value, _clip01(value - half), _clip01(value + half), n, std, "t")

    @property
    def half_width(self) -> float | None:
        """The t interval's half-width before clipping (None for Wilson and for no interval)."""
        if self.method != "t":
            return None
        return t_quantile_975(self.n - 1) * self.std / math.sqrt(self.n)

    def interval_text(self) -> str:
        """`` [68.9, 74.4]`` (Wilson) or `` ± 1.7`` (t), in %, or ``""`` when no interval is known."""
        if self.method == "t":
            return f" ± {100 * self.half_width:.1f}"
        if self.low is None:
            return ""
        return f" [{100 * self.low:.1f}, {100 * self.high:.1f}]"


# ---------------------------------------------------------------------------------------------- the matrix
def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _write_csv(rows: list[dict], fields: tuple[str, ...], path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in fields})  # None -> empty
    return atomic_write_text(buf.getvalue(), path)


FOOTNOTE = (
    "Bold: the best of its row, its 95% interval clear of every other column's; *: the best, its 95% interval "
    "overlapping another column's. Worst case: the images the victim gets right under every attack and surrogate."
)
FOOTNOTE_INTERVALS = (
    " [low, high]: 95% Wilson interval over the images pooled; ± h: 95% t interval over the column's victims."
)


@dataclass
class RobustnessMatrix:
    """Every cell ``R[victim, surrogate, attack]`` plus clean accuracy per victim.

    ``cells``: dicts ``{victim, surrogate, attack, accuracy, n}``; ``clean``: victim -> accuracy;
    ``clean_n``: victim -> number of clean images; ``per_image``: ``(victim, surrogate, attack)`` -> bool
    tensor, which images the victim got right (the worst case needs it; a matrix built by hand may
    leave it and ``clean_n`` out, and then has no worst case and no Clean interval).
    """

    cells: list[dict] = field(default_factory=list)
    clean: dict[str, float] = field(default_factory=dict)
    clean_n: dict[str, int] = field(default_factory=dict)
    per_image: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict, repr=False)

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

    @property
    def rows(self) -> list[str]:
        """The tables' rows, in order: Clean, one per attack, Mean, Worst case."""
        return [CLEAN_ROW, *self.attacks, MEAN_ROW, WORST_ROW]

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

    # ---- worst case
    def robust_everywhere(self) -> dict[str, torch.Tensor]:
        """``victim -> bool tensor``: the images it gets right under every attack and every surrogate
        (the AND of its cells' per-image correctness). Victims with a cell lacking it are left out."""
        per: dict[str, list[tuple[tuple[str, str, str], torch.Tensor]]] = {}
        missing = set()
        for c in self.cells:
            key = (c["victim"], c["surrogate"], c["attack"])
            if key in self.per_image:
                per.setdefault(c["victim"], []).append((key, self.per_image[key]))
            else:
                missing.add(c["victim"])
        out = {}
        for v, masks in per.items():
            if v in missing:
                continue
            (key0, first), rest = masks[0], masks[1:]
            robust = first.clone()
            for key, mask in rest:
                if mask.shape != first.shape:
                    raise TrigactError(
                        f"per-image results of {key0} and {key} cover {first.numel()} and {mask.numel()} images: "
                        "the worst case needs every bank to hold the same images in the same order"
                    )
                robust &= mask
            out[v] = robust
        return out

    def worst_case(self) -> dict[str, float]:
        """``victim -> fraction of images right under every attack and surrogate`` (<= every cell)."""
        robust = self.robust_everywhere()
        return {v: int(right.sum()) / right.numel() for v, right in robust.items() if right.numel()}

    def worst_case_by_group(self, groups: Mapping[str, list[str]] | None = None) -> dict[str, float]:
        """``group -> mean over its victims of their worst case`` (as Eq. 7 averages Eq. 6)."""
        worst = self.worst_case()
        out = {}
        for name, members in self._groups(groups).items():
            values = [worst[v] for v in members if v in worst]
            if values:
                out[name] = _mean(values)
        return out

    # ---- intervals
    def cell_rows(self) -> list[dict]:
        """Every cell with its 95% Wilson interval (``ci_low``, ``ci_high``): the rows of ``matrix.csv``."""
        rows = []
        for c in self.cells:
            low, high = wilson_interval(c["accuracy"], c["n"])
            rows.append({**c, "ci_low": low, "ci_high": high})
        return rows

    def victim_estimates(self) -> dict[tuple[str, str], Estimate]:
        """``(victim, row) -> Estimate``: each victim's Clean, Eq. 6 per attack, Mean and Worst case, with
        Wilson intervals over the distinct images. An average over surrogates (or attacks) is of cells on
        the same images, which are not independent draws, so n is the number of images, not the number
        of cells times it (which would give an interval too narrow by up to the square root of that)."""
        eq6 = self.mean_over_surrogates()
        pooled: dict[tuple[str, str], int] = {}
        for c in self.cells:
            pooled[(c["victim"], c["attack"])] = max(pooled.get((c["victim"], c["attack"]), 0), c["n"])
        robust = self.robust_everywhere()
        out: dict[tuple[str, str], Estimate] = {}
        for v in self.victims:
            if v in self.clean:
                out[(v, CLEAN_ROW)] = Estimate.wilson(self.clean[v], self.clean_n.get(v))
            attacks = [a for a in self.attacks if (v, a) in eq6]
            for a in attacks:
                out[(v, a)] = Estimate.wilson(eq6[(v, a)], pooled[(v, a)])
            if attacks:
                out[(v, MEAN_ROW)] = Estimate.wilson(
                    _mean([eq6[(v, a)] for a in attacks]), max(pooled[(v, a)] for a in attacks)
                )
            if v in robust and robust[v].numel():
                out[(v, WORST_ROW)] = Estimate.wilson(int(robust[v].sum()) / robust[v].numel(), robust[v].numel())
        return out

    def group_estimates(self, groups: Mapping[str, list[str]] | None = None) -> dict[tuple[str, str], Estimate]:
        """``(group, row) -> Estimate``: the values of the table (Eq. 7 and the rest) with their intervals:
        a victim's own Wilson interval for a group of one, a t interval over the victims otherwise."""
        groups = self._groups(groups)
        eq7 = self.mean_over_victims(groups)
        values: dict[str, dict[str, float]] = {
            CLEAN_ROW: self.clean_by_group(groups),
            **{a: {g: eq7[(g, a)] for g in groups if (g, a) in eq7} for a in self.attacks},
            MEAN_ROW: self.mean_over_attacks(groups),
            WORST_ROW: self.worst_case_by_group(groups),
        }
        per_victim = self.victim_estimates()
        out: dict[tuple[str, str], Estimate] = {}
        for name, members in groups.items():
            for row in self.rows:
                if name not in values[row]:
                    continue
                members_est = [per_victim[(v, row)] for v in members if (v, row) in per_victim]
                if len(members_est) == 1:
                    out[(name, row)] = members_est[0]
                else:
                    out[(name, row)] = Estimate.over_victims(values[row][name], [e.value for e in members_est])
        return out

    def table_rows(self, groups: Mapping[str, list[str]] | None = None) -> list[dict]:
        """The rows of ``table.csv``: every victim's estimates (level ``victim``), then every group's
        (level ``group``, the values of ``table.md``), each row in table order."""
        levels = (("victim", self.victims, self.victim_estimates()),
                  ("group", list(self._groups(groups)), self.group_estimates(groups)))
        rows = []
        for level, names, estimates in levels:
            for name in names:
                for row in self.rows:
                    e = estimates.get((name, row))
                    if e is not None:
                        rows.append({"level": level, "name": name, "row": row, "accuracy": e.value,
                                     "ci_low": e.low, "ci_high": e.high, "n": e.n, "std": e.std,
                                     "interval": e.method})
        return rows

    # ---- outputs
    def to_csv(self, path) -> Path:
        """``matrix.csv``: every cell with its interval, one row each, with a header (written atomically)."""
        return _write_csv(self.cell_rows(), CSV_FIELDS, path)

    def to_table_csv(self, path, groups: Mapping[str, list[str]] | None = None) -> Path:
        """``table.csv``: :meth:`table_rows` with a header (written atomically)."""
        return _write_csv(self.table_rows(groups), TABLE_CSV_FIELDS, path)

    def to_markdown(self, groups: Mapping[str, list[str]] | None = None, intervals: bool = False) -> str:
        """The paper's layout: rows Clean, one per attack, Mean, Worst case; columns = groups; values in %;
        a footnote line below the table says what the marks mean.

        In each row but Clean the highest robust accuracy (compared as displayed) is marked: bold when
        its 95% interval lies clear of every other column's, ``*`` after it when an interval overlaps
        (a tie always does; a column without an interval cannot be told apart). ``intervals``: each
        cell also shows its interval, `` [low, high]`` (Wilson) or `` ± h`` (t over a group's victims).
        """
        names = list(self._groups(groups))
        estimates = self.group_estimates(groups)

        def row(label: str, marked: bool) -> str:
            present = {n: estimates[(n, label)] for n in names if (n, label) in estimates}
            shown = {n: _pct(e.value) for n, e in present.items()}
            best = max((float(s) for s in shown.values()), default=None)
            tops = [n for n, s in shown.items() if float(s) == best]
            cells = []
            for n in names:
                if n not in present:
                    cells.append("-")
                    continue
                text, e = shown[n], present[n]
                if marked and n in tops:
                    clear = len(tops) == 1 and all(
                        e.low is not None and o.high is not None and e.low > o.high
                        for m, o in present.items() if m != n
                    )
                    text = f"**{text}**" if clear else f"{text}*"
                cells.append(text + (e.interval_text() if intervals else ""))
            return f"| {label} | " + " | ".join(cells) + " |"

        lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [row(label, marked=label != CLEAN_ROW) for label in self.rows]
        lines += ["", FOOTNOTE + (FOOTNOTE_INTERVALS if intervals else "") + self._missing_note()]
        return "\n".join(lines) + "\n"

    def missing_pairs(self) -> dict[str, list[str]]:
        """``attack -> surrogates it has no cell for`` (e.g. a feature-level attack on an ensemble), only
        for attacks that miss one: their rows average fewer surrogates, and no image was tested there."""
        have: dict[str, set] = {}
        for c in self.cells:
            have.setdefault(c["attack"], set()).add(c["surrogate"])
        return {a: [s for s in self.surrogates if s not in have[a]] for a in self.attacks
                if len(have[a]) < len(self.surrogates)}

    def _missing_note(self) -> str:
        missing = self.missing_pairs()
        if not missing:
            return ""
        by_surrogates: dict[tuple[str, ...], list[str]] = {}
        for attack, surrogates in missing.items():
            by_surrogates.setdefault(tuple(surrogates), []).append(attack)
        parts = [f"{', '.join(attacks)} not on {' or '.join(s)}" for s, attacks in by_surrogates.items()]
        return (" Not run (the attack cannot run on that surrogate): " + "; ".join(parts)
                + "; those rows average the other surrogates, and the Worst case has no cell there.")

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
    """Refuse a victim that is the very run a surrogate came from, or a member of an ensemble surrogate
    (a white-box attack, not a transfer). ``surrogate_runs``: surrogate -> its run, or its members' runs."""
    if allow_whitebox or not victim_runs or not surrogate_runs:
        return

    def keys(runs) -> set:
        return {_run_key(r) for r in ([runs] if isinstance(runs, (str, os.PathLike)) or runs is None else runs)}

    surrogate_keys = {s: keys(surrogate_runs[s]) for s in surrogates if s in surrogate_runs}
    for v in victims:
        if v not in victim_runs:
            continue
        key = _run_key(victim_runs[v])
        for s, s_key in surrogate_keys.items():
            if key in s_key:
                raise TrigactError(
                    f"victim {v} is {'a member of ' if len(s_key) > 1 else ''}surrogate {s}: that is a white-box attack, not a transfer; "
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

    - ``banks`` values: a :class:`~trigact.evaluation.bank.Bank` (its uint8 images are dequantized one
      batch at a time, on each victim's device) or any object with ``.x_adv`` (float in [0, 1] or uint8,
      N,C,H,W) and ``.y``; every bank must hold the same clean images in the same order (same ``y``, and
      same ``x_clean`` where given), or a one-line :class:`TrigactError` says so: the worst case ANDs
      each image across banks.
    - ``clean_batches``: a list / re-iterable of ``(x, y)``, or a zero-argument factory returning one
      (e.g. ``dm.test_dataloader``); None skips clean accuracy.
    - ``victim_runs`` / ``surrogate_runs``: name -> run identity (e.g. bundle path). A victim whose run is
      a surrogate's run raises :class:`TrigactError` unless ``allow_whitebox``.

    Records each cell's accuracy and ``n``, each victim's clean accuracy and ``clean_n``, and each cell's
    per-image correctness (``per_image``), from which the worst case is computed.
    """
    if batch_size < 1:
        raise TrigactError(f"batch_size must be a positive integer, got {batch_size}")
    if not victims:
        raise TrigactError("no victims to evaluate; give at least one")
    surrogates = list(dict.fromkeys(s for s, _ in banks))
    check_transfer(victims, surrogates, victim_runs, surrogate_runs, allow_whitebox)
    check_aligned_banks(banks)

    result = RobustnessMatrix()
    clean = _clean_source(clean_batches)
    for v_name, model in victims.items():
        if clean is not None:
            restart_randomness(model)
            mask = correct_mask(model, clean())
            if mask.numel() == 0:
                raise TrigactError("accuracy of an empty set of images: the batches held no (x, y) pairs")
            result.clean[v_name], result.clean_n[v_name] = int(mask.sum()) / mask.numel(), mask.numel()
        for (s_name, attack), bank in banks.items():
            restart_randomness(model)
            mask = correct_mask(model, bank_batches(bank, batch_size))
            n = mask.numel()
            if n == 0:
                raise TrigactError(f"bank ({s_name}, {attack}) holds no images")
            result.cells.append(
                {"victim": v_name, "surrogate": s_name, "attack": attack, "accuracy": int(mask.sum()) / n, "n": n}
            )
            result.per_image[(v_name, s_name, attack)] = mask
    return result
