"""The Worst case row and the 95% intervals of the transfer matrix, against hand-computed values."""

import csv
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from trigact.common.config import CONF_DIR
from trigact.evaluation.matrix import (
    RobustnessMatrix,
    evaluate_matrix,
    t_quantile_975,
    wilson_interval,
)
from trigact.evaluation.tables import robustness_tables, write_results


# ------------------------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("k, n, low, high", [
    (8, 10, 0.4902, 0.9433),   # p = 0.8: center 0.7167, half 0.2266
    (0, 10, 0.0, 0.2775),      # upper bound z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),
    (500, 1000, 0.4691, 0.5309),
])  # fmt: skip
def test_wilson_interval_matches_hand_computation(k, n, low, high):
    lo, hi = wilson_interval(k / n, n)
    assert (lo, hi) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_wilson_interval_is_exact_at_the_ends():
    assert wilson_interval(0.0, 7)[0] == 0.0 and wilson_interval(1.0, 7)[1] == 1.0


@pytest.mark.parametrize("df, t", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423), (31, 2.0395),
                                   (40, 2.0211), (100, 1.9840)])
def test_t_quantile(df, t):
    assert t_quantile_975(df) == pytest.approx(t, abs=1e-4)


# ------------------------------------------------------------------------------------- the worst case
N = 4
# Per-image correctness of each cell, image 0 first. Each of v's cells gets 3 of 4 right, but a different
# image wrong each time, so only image 0 survives the AND; w fails image 0 under (s2, a2) only.
MASKS = {
    "v": {("s1", "a1"): "1110", ("s2", "a1"): "1101", ("s1", "a2"): "1011", ("s2", "a2"): "1110"},
    "w": {("s1", "a1"): "1111", ("s2", "a1"): "1111", ("s1", "a2"): "1111", ("s2", "a2"): "0111"},
}


class MaskVictim(nn.Module):
    """Right on image j of bank b exactly when masks[b][j] is "1"; the bank and image are read from the
    pixel [0, 0, 0], where the toy writes (b * N + j) / 255."""

    def __init__(self, masks: list[str], labels: torch.Tensor):
        super().__init__()
        right = torch.tensor([[c == "1" for c in m] for m in masks])
        preds = torch.where(right, labels, (labels + 1) % 3)  # (banks, N)
        self.register_buffer("preds", preds.flatten())

    def forward(self, x):
        ids = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(self.preds[ids], 3).float()


@pytest.fixture
def toy():
    keys = list(MASKS["v"])
    y = torch.tensor([0, 1, 2, 0])
    banks = {}
    for b, key in enumerate(keys):
        x = torch.rand(N, 1, 2, 2)
        x[:, 0, 0, 0] = (b * N + torch.arange(N)) / 255
        banks[key] = SimpleNamespace(x_adv=x, y=y)
    victims = {name: MaskVictim([MASKS[name][k] for k in keys], y) for name in MASKS}
    return evaluate_matrix(victims, banks, batch_size=3)


def test_worst_case_ands_every_image_over_surrogates_and_attacks(toy):
    m = toy
    assert {(c["victim"], c["surrogate"], c["attack"]): c["accuracy"] for c in m.cells if c["victim"] == "v"} == {
        k: 0.75 for k in [("v", "s1", "a1"), ("v", "s2", "a1"), ("v", "s1", "a2"), ("v", "s2", "a2")]}
    # v: 1110 & 1101 & 1011 & 1110 = 1000. Below every cell (0.75) and every Eq. 6 value (0.75); an OR
    # would give 1.0, an AND over attacks only (per surrogate) or over surrogates only (per attack) 0.5.
    assert m.worst_case() == {"v": 0.25, "w": 0.75}
    assert m.robust_everywhere()["v"].tolist() == [True, False, False, False]
    assert m.worst_case_by_group({"both": ["v", "w"], "v": ["v"]}) == {"both": 0.5, "v": 0.25}


def test_worst_case_row_and_table_csv(toy, tmp_path):
    groups = {"both": ["v", "w"], "v alone": ["v"]}
    out = write_results(toy, groups, [{"name": "v"}, {"name": "w"}], tmp_path, intervals=True)
    table = (out / "table.md").read_text().splitlines()
    # v alone: Wilson on 4 images (1 right) -> [4.6, 69.9]; both: t over 2 victims, 0.5 +- 12.706 * 0.3536 / sqrt 2
    assert table[-3] == "| Worst case | 50.00* ± 317.7 | 25.00 [4.6, 69.9] |"
    assert table[-1].endswith("± h: 95% t interval over the column's victims.")
    with open(out / "table.csv", newline="") as f:
        rows = {(r["level"], r["name"], r["row"]): r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == ["level", "name", "row", "accuracy", "ci_low", "ci_high", "n", "std",
                                               "interval"]
    v = rows[("victim", "v", "Worst case")]
    assert (float(v["accuracy"]), v["n"], v["interval"], v["std"]) == (0.25, "4", "wilson", "")
    assert (float(v["ci_low"]), float(v["ci_high"])) == (pytest.approx(0.045587, abs=1e-6),
                                                         pytest.approx(0.699358, abs=1e-6))
    both = rows[("group", "both", "Worst case")]
    assert (float(both["accuracy"]), both["n"], both["interval"]) == (0.5, "2", "t")
    assert float(both["std"]) == pytest.approx(math.sqrt(0.125))
    assert (float(both["ci_low"]), float(both["ci_high"])) == (0.0, 1.0)  # clipped
    # Eq. 6 of one victim pools both surrogates' banks: w on a2 gets 7 of 8 right
    w_a2 = rows[("victim", "w", "a2")]
    assert (float(w_a2["accuracy"]), w_a2["n"]) == (0.875, "4")  # the 4 distinct images, not 2 banks x 4
    assert ("victim", "w", "Mean") in rows and ("group", "v alone", "Clean") not in rows  # no clean data given
    # matrix.csv: the cells only, with their intervals
    with open(out / "matrix.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 8 and {c["attack"] for c in cells} == {"a1", "a2"}


def test_records_and_wandb_tables_carry_the_worst_case(toy, tmp_path):
    records = [{"name": "v"}, {"name": "w"}]
    groups = {"both": ["v", "w"]}
    write_results(toy, groups, records, tmp_path)
    assert [r["worst_case_acc"] for r in records] == [0.25, 0.75]
    tables = robustness_tables(toy, groups, records)
    assert [(r["row"], r["both"]) for r in tables["robustness/table"]] == [
        ("Clean", None), ("a1", 0.875), ("a2", 0.8125), ("Mean", 0.84375), ("Worst case", 0.5)]
    assert {"ci_low", "ci_high"} <= set(tables["robustness/cells"][0])
    assert tables["robustness/victims"][0]["worst_case_acc"] == 0.25


# ------------------------------------------------------------------------------------- intervals, marks
def hand_matrix(acc: dict, n: int = 1000) -> RobustnessMatrix:
    """One surrogate; ``acc[(victim, attack)]`` = the cell's accuracy on ``n`` images."""
    return RobustnessMatrix(cells=[{"victim": v, "surrogate": "s", "attack": a, "accuracy": p, "n": n}
                                   for (v, a), p in acc.items()])


def test_bold_only_when_the_interval_is_clear_of_the_others():
    m = hand_matrix({("A", "far"): 0.80, ("B", "far"): 0.50, ("A", "near"): 0.52, ("B", "near"): 0.50})
    # far: [77.4, 82.4] vs [46.9, 53.1] -> bold; near: [48.9, 55.1] overlaps [46.9, 53.1] -> "*".
    # Mean pools 2000 images: [63.9, 68.0] vs [47.8, 52.2] -> bold.
    assert m.to_markdown().split("\n\n")[0] == (
        "| | A | B |\n"
        "|---|---:|---:|\n"
        "| Clean | - | - |\n"
        "| far | **80.00** | 50.00 |\n"
        "| near | 52.00* | 50.00 |\n"
        "| Mean | **66.00** | 50.00 |\n"
        "| Worst case | - | - |"
    )
    assert m.to_markdown(intervals=True).split("\n")[3:6] == [
        "| far | **80.00** [77.4, 82.4] | 50.00 [46.9, 53.1] |",
        "| near | 52.00* [48.9, 55.1] | 50.00 [46.9, 53.1] |",
        "| Mean | **66.00** [63.0, 68.9] | 50.00 [46.9, 53.1] |",
    ]


def test_seed_group_gets_a_t_interval_and_a_wide_one_blocks_bold():
    m = hand_matrix({("s0", "a"): 0.70, ("s1", "a"): 0.72, ("s2", "a"): 0.74,
                     ("A", "a"): 0.80, ("B", "a"): 0.60, ("C0", "a"): 0.30, ("C1", "a"): 0.90}, n=100)
    groups = {"seeds": ["s0", "s1", "s2"]}
    (e,) = [e for (g, row), e in m.group_estimates(groups).items() if row == "a"]
    # 0.72 +- t(0.975, 2) * 0.02 / sqrt(3) = 0.72 +- 0.049683
    assert (e.value, e.n, e.method) == (pytest.approx(0.72), 3, "t")
    assert e.std == pytest.approx(0.02)
    assert (e.low, e.high) == (pytest.approx(0.670317, abs=1e-6), pytest.approx(0.769683, abs=1e-6))
    # alone in its row, nothing can overlap it: bold
    assert m.to_markdown(groups, intervals=True).split("\n")[3] == "| a | **72.00** ± 5.0 |"
    # A's Wilson interval (n=100: [71.1, 86.7]) is clear of the runner-up B ([50.2, 69.1]), but not of
    # C, whose two victims (30 and 90) give a t interval over everything: A is only "*".
    wide = {"A": ["A"], "B": ["B"], "C": ["C0", "C1"]}
    assert m.to_markdown(wide).split("\n")[3] == "| a | 80.00* | 60.00 | 60.00 |"
    assert m.to_markdown({"A": ["A"], "B": ["B"]}).split("\n")[3] == "| a | **80.00** | 60.00 |"


def test_configs_carry_the_intervals_switch_off_by_default():
    for name in ("evaluate", "pipeline"):
        with open(f"{CONF_DIR}/{name}.yaml") as f:
            assert yaml.safe_load(f)["intervals"] is False
