"""The transfer matrix (Eq. 5-7) on a toy whose every prediction is set by hand."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trigact.common.errors import TrigactError
from trigact.evaluation.matrix import RobustnessMatrix, accuracy, evaluate_matrix

NUM_CLASSES = 3
PER_BANK = 4  # images per bank and in the clean set; batch_size=3 splits each into 3 + 1


class LookupVictim(nn.Module):
    """Predicts from a table indexed by the image ID written in pixel [0, 0, 0] (as ID/255)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        ids = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(self.table[ids], NUM_CLASSES).float()


def images(first_id: int, n: int = PER_BANK):
    """``n`` images with IDs from ``first_id``; the labels depend only on the position (0, 1, 2, 0, ...), so
    every bank built from it holds the same labels in the same order, as real banks do."""
    x = torch.rand(n, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(first_id, first_id + n) / 255
    y = torch.arange(n) % NUM_CLASSES
    return x, y


# The hand-chosen R[v, s, A] (in quarters, PER_BANK = 4) and clean accuracy.
R = {
    ("vA", "s1", "a1"): 3, ("vA", "s2", "a1"): 1, ("vA", "s1", "a2"): 4, ("vA", "s2", "a2"): 2,
    ("vB", "s1", "a1"): 2, ("vB", "s2", "a1"): 2, ("vB", "s1", "a2"): 0, ("vB", "s2", "a2"): 1,
}  # fmt: skip
CLEAN = {"vA": 4, "vB": 3}
BANK_KEYS = [("s1", "a1"), ("s2", "a1"), ("s1", "a2"), ("s2", "a2")]


@pytest.fixture
def toy():
    """Victims, banks (distinct image IDs per bank) and clean batches realizing R and CLEAN exactly."""
    banks, ids = {}, {}
    for i, key in enumerate(BANK_KEYS):
        x, y = images(i * PER_BANK)
        banks[key] = SimpleNamespace(x_adv=x, y=y)
        ids[key] = (i * PER_BANK, y)
    clean_first = len(BANK_KEYS) * PER_BANK
    clean_x, clean_y = images(clean_first)
    victims = {}
    for v in ("vA", "vB"):
        table = torch.zeros(clean_first + PER_BANK, dtype=torch.long)
        regions = [(ids[k][0], ids[k][1], R[(v, *k)]) for k in BANK_KEYS] + [(clean_first, clean_y, CLEAN[v])]
        for first, y, n_correct in regions:
            wrong = (y + 1) % NUM_CLASSES
            table[first : first + PER_BANK] = torch.where(torch.arange(PER_BANK) < n_correct, y, wrong)
        victims[v] = LookupVictim(table)
    clean = [(clean_x[:3], clean_y[:3]), (clean_x[3:], clean_y[3:])]
    return victims, banks, clean


def test_matrix_means_match_hand_computation(toy):
    victims, banks, clean = toy
    m = evaluate_matrix(victims, banks, clean, batch_size=3)

    assert len(m.cells) == 8
    for c in m.cells:
        assert c["accuracy"] == R[(c["victim"], c["surrogate"], c["attack"])] / 4
        assert c["n"] == PER_BANK
    assert m.clean == {"vA": 1.0, "vB": 0.75}
    assert m.attacks == ["a1", "a2"]

    # Eq. 6: mean over surrogates
    assert m.mean_over_surrogates() == {
        ("vA", "a1"): 0.5, ("vA", "a2"): 0.75, ("vB", "a1"): 0.5, ("vB", "a2"): 0.125,
    }  # fmt: skip
    # Eq. 7: default groups are one per victim, so it equals Eq. 6
    assert m.mean_over_victims() == m.mean_over_surrogates()
    groups = {"both": ["vA", "vB"], "only B": ["vB"]}
    assert m.mean_over_victims(groups) == {
        ("both", "a1"): 0.5, ("both", "a2"): 0.4375, ("only B", "a1"): 0.5, ("only B", "a2"): 0.125,
    }  # fmt: skip
    assert m.clean_by_group(groups) == {"both": 0.875, "only B": 0.75}
    assert m.mean_over_attacks(groups) == {"both": 0.46875, "only B": 0.3125}
    assert m.clean_n == {"vA": 4, "vB": 4}
    # Worst case: each cell's right images are its first R of the 4, so the AND over (surrogate, attack)
    # is the first min-R images (vA: 1 of 4; vB: 0, its (s1, a2) cell gets none right).
    assert m.worst_case() == {"vA": 0.25, "vB": 0.0}
    assert m.worst_case_by_group(groups) == {"both": 0.125, "only B": 0.0}
    assert m.per_image[("vA", "s2", "a1")].tolist() == [True, False, False, False]


FOOTNOTE = (
    "\nBold: the best of its row, its 95% interval clear of every other column's; *: the best, its 95% interval "
    "overlapping another column's. Worst case: the images the victim gets right under every attack and surrogate.\n"
)


def test_markdown_layout_and_marks(toy):
    m = evaluate_matrix(*toy, batch_size=3)
    # On 4 images every interval overlaps: each row's best gets "*", never bold (a1's tie marks both).
    # The Clean row is never marked. (Bold on clear intervals: test_intervals.py.)
    assert m.to_markdown() == (
        "| | vA | vB |\n"
        "|---|---:|---:|\n"
        "| Clean | 100.00 | 75.00 |\n"
        "| a1 | 50.00* | 50.00* |\n"
        "| a2 | 75.00* | 12.50 |\n"
        "| Mean | 62.50* | 31.25 |\n"
        "| Worst case | 25.00* | 0.00 |\n"
    ) + FOOTNOTE
    assert m.to_markdown({"both": ["vA", "vB"], "only B": ["vB"]}) == (
        "| | both | only B |\n"
        "|---|---:|---:|\n"
        "| Clean | 87.50 | 75.00 |\n"
        "| a1 | 50.00* | 50.00* |\n"
        "| a2 | 43.75* | 12.50 |\n"
        "| Mean | 46.88* | 31.25 |\n"
        "| Worst case | 12.50* | 0.00 |\n"
    ) + FOOTNOTE


def test_unknown_victim_in_group_is_refused(toy):
    m = evaluate_matrix(*toy)
    with pytest.raises(TrigactError, match="'vZ'.*known: vA, vB"):
        m.mean_over_victims({"g": ["vZ"]})


def test_whitebox_refused_unless_allowed(toy, tmp_path):
    victims, banks, clean = toy
    bundle = tmp_path / "runs" / "s0" / "bundle.pt"
    victim_runs = {"vA": str(tmp_path / "runs" / "other.pt"), "vB": str(bundle)}
    # the same run spelled differently is still the same run
    surrogate_runs = {"s1": str(tmp_path / "runs" / "x" / ".." / "s0" / "bundle.pt"), "s2": str(tmp_path / "s2.pt")}
    with pytest.raises(TrigactError) as err:
        evaluate_matrix(victims, banks, clean, victim_runs=victim_runs, surrogate_runs=surrogate_runs)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("victim vB is surrogate s1: that is a white-box attack, not a transfer")
    assert "allow_whitebox=true" in msg

    m = evaluate_matrix(
        victims, banks, clean, victim_runs=victim_runs, surrogate_runs=surrogate_runs, allow_whitebox=True
    )
    assert len(m.cells) == 8
    # distinct runs pass without the flag
    evaluate_matrix(victims, banks, clean, victim_runs={"vA": "a", "vB": "b"}, surrogate_runs={"s1": "c"})


def test_csv_and_png(toy, tmp_path):
    import csv

    m = evaluate_matrix(*toy, batch_size=3)
    path = m.to_csv(tmp_path / "out" / "cells.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["victim", "surrogate", "attack", "accuracy", "n", "ci_low", "ci_high"]
    assert len(rows) == len(m.cells) == 8
    assert {(r["victim"], r["surrogate"], r["attack"]): float(r["accuracy"]) for r in rows} == {
        k: v / 4 for k, v in R.items()
    }
    # Wilson on 4 images: 3 right -> [30.06, 95.44]%, none right -> [0, 48.99]%
    by_key = {(r["victim"], r["surrogate"], r["attack"]): r for r in rows}
    assert float(by_key[("vA", "s1", "a1")]["ci_low"]) == pytest.approx(0.300642, abs=1e-6)
    assert float(by_key[("vA", "s1", "a1")]["ci_high"]) == pytest.approx(0.954413, abs=1e-6)
    assert (float(by_key[("vB", "s1", "a2")]["ci_low"]), float(by_key[("vB", "s1", "a2")]["ci_high"])) == (
        0.0, pytest.approx(0.489891, abs=1e-6))

    png = m.plot_mean_robustness({"both": ["vA", "vB"], "only B": ["vB"]}, tmp_path / "plots" / "mean.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["mean.png"]  # no temp file left behind


class ModeProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, self.drop.training, torch.is_grad_enabled()))
        return self.drop(self.lin(x.flatten(1)))


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_accuracy_restores_mode(mode):
    model = ModeProbe().train(mode != "eval")
    with torch.no_grad():  # always class 1 in eval mode; dropout (train mode) would zero it at random
        model.lin.weight.zero_()
        model.lin.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    if mode == "mixed":
        model.drop.eval()
    before = [m.training for m in model.modules()]
    x, y = images(0, n=10)  # labels 0, 1, 2, 0, 1, ...: ids 1, 4, 7 are class 1
    acc = accuracy(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    # 3 of 10 images, not the mean of the batches' accuracies (2/6 and 1/4).
    assert acc == 0.3
    assert model.seen == [(False, False, False)] * 2
    assert [m.training for m in model.modules()] == before


def test_eq6_weighs_surrogates_equally_whatever_their_bank_sizes():
    # s1's cell has 4 images (3 right), s2's has 2 (0 right): Eq. 6 is (3/4 + 0/2) / 2, not 3/6.
    # (evaluate_matrix refuses banks of different images; a matrix built by hand may still hold them.)
    m = RobustnessMatrix(cells=[{"victim": "v", "surrogate": "s1", "attack": "a", "accuracy": 0.75, "n": 4},
                                {"victim": "v", "surrogate": "s2", "attack": "a", "accuracy": 0.0, "n": 2}])
    assert m.mean_over_surrogates() == {("v", "a"): 0.375}
    assert m.mean_over_attacks() == {"v": 0.375}
    assert m.worst_case() == {}  # no per-image results: no worst case
    # Wilson over the distinct images (the largest bank), not the 6 cells pooled: the surrogates'
    # banks hold the same images, so pooling would count each image twice and narrow the interval.
    assert m.victim_estimates()[("v", "a")].n == 4


def test_banks_of_different_images_are_refused_in_one_line():
    x1, y1 = images(0, n=4)
    x2, y2 = images(4, n=2)
    table = torch.zeros(6, dtype=torch.long)
    banks = {("s1", "a"): SimpleNamespace(x_adv=x1, y=y1), ("s2", "a"): SimpleNamespace(x_adv=x2, y=y2)}
    with pytest.raises(TrigactError) as err:
        evaluate_matrix({"v": LookupVictim(table)}, banks)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("TAE banks ('s1', 'a') and ('s2', 'a') hold different clean images (4 vs 2)")
    # the same count but other clean pixels (x_clean, where a bank has it) is refused too
    same_y = {k: SimpleNamespace(x_adv=x1, y=y1, x_clean=x1 + i) for i, k in enumerate([("s1", "a"), ("s2", "a")])}
    with pytest.raises(TrigactError, match=r"hold different clean images \(4 vs 4\)"):
        evaluate_matrix({"v": LookupVictim(table)}, same_y)


def test_uint8_bank_and_generator_clean(toy):
    victims, banks, clean = toy
    u8 = {k: SimpleNamespace(x_adv=(b.x_adv * 255).round().to(torch.uint8), y=b.y) for k, b in banks.items()}
    m = evaluate_matrix(victims, u8, iter(clean))  # a one-shot iterator serves every victim
    assert m.clean == {"vA": 1.0, "vB": 0.75}
    assert m.mean_over_surrogates()[("vB", "a2")] == 0.125


def test_empty_matrix_markdown():
    assert RobustnessMatrix(clean={"v": 0.5}).to_markdown() == (
        "| | v |\n|---|---:|\n| Clean | 50.00 |\n| Mean | - |\n| Worst case | - |\n"
    ) + FOOTNOTE
