"""The paper's numbers shipped as data (experiments/paper_reference/) against the seed text itself:
a typo in a CSV, a shifted column or a swapped defense key fails here."""

from pathlib import Path

import pytest

from trigact.analysis.paper import reference_records, reference_value

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "001_fad2cf078b1dd0a3.txt"

# (table, dataset, defense, attack, victim, metric, value, a line of the paper's table that holds it)
CELLS = [
    ("I", "cifar10", "none", "pgd", "", "accuracy", 11.29, "PGD\t11.29\t82.19\t15.38"),
    ("I", "cifar10", "fixed_eps64", "difgsm", "", "accuracy", 63.15, "DI-FGSM\t11.29\t81.61\t14.68"),
    ("II", "cifar10", "learnable_alpha4", "mean", "", "accuracy", 83.91, "Mean\t-\t15.16\t61.55 52.08"),
    ("II", "cifar10", "tdat", "pgd", "", "accuracy", 84.74, "PGD\t11.29\t64.12 56.24"),
    ("III", "cifar100", "none", "clean", "", "accuracy", 74.29, "Clean\t-\t74.29\t46.36 55.03"),
    ("VII", "cifar10", "learnable_alpha0.5", "pgd", "", "accuracy", 85.53, "PGD\t85.53\t84.50"),
    ("VIII", "cifar10", "pgd_at", "pgd", "", "accuracy", 61.88, "PGD\t13.89\t<u>61.88</u>\t65.01"),
    ("X", "imagenet100", "learnable_alpha4", "difgsm", "", "accuracy", 50.31, "DI-FGSM\t38.68\t47.07"),
    ("XI", "cifar10", "learnable_alpha4", "none", "resnet18", "mse_1e-2", 2.31, "CIFAR-10\t\t6.30\t2.31"),
    ("XI", "imagenet100", "learnable_alpha4", "none", "inception_v4", "mse_1e-2", 3.70, "ImageNet-subset\t\t6.30"),
]


@pytest.mark.parametrize("table,dataset,defense,attack,victim,metric,value,line", CELLS)
def test_reference_cells_match_the_seed_text(table, dataset, defense, attack, victim, metric, value, line):
    assert reference_value(table, dataset, defense, attack, victim=victim, metric=metric) == pytest.approx(value)
    if not SEED.exists():
        pytest.skip(f"seed text not found at {SEED}")
    rows = [row for row in SEED.read_text().splitlines() if row.startswith(line)]
    assert rows, f"no line of the seed starts with {line!r}"
    assert f"{value:.2f}" in rows[0]


def test_every_table_is_shipped_with_unique_cells():
    records = reference_records()
    assert {r["table"] for r in records} == {"I", "II", "III", "IV", "VII", "VIII", "IX", "X", "XI"}
    keys = [(r["table"], r["dataset"], r["victim"], r["defense"], r["attack"], r["metric"]) for r in records]
    assert len(keys) == len(set(keys))


def test_setting_differences_flags_what_differs_from_the_paper_and_nothing_else():
    from trigact.analysis.paper import setting_differences

    paper = {"data": {"name": "cifar10", "batch_size": 128, "val_size": 0},
             "trainer": {"max_epochs": 60, "limit_train_batches": 1.0},
             "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1},
             "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR"}}
    assert setting_differences("cifar10", {"a": paper, "b": paper}, {"eps": "8/255", "steps": 20}) == []
    short = {**paper, "trainer": {"max_epochs": 1}, "data": {**paper["data"], "val_size": 0.1}}
    lines = setting_differences("cifar10", {"a": short, "b": short, "c": paper}, {"eps": 0.1, "steps": 20}, n_eval=64)
    assert any("trainer.max_epochs" in line and "= 1 " in line and "paper: 60" in line and "in a, b" in line
               for line in lines)
    assert any("data.val_size" in line for line in lines)
    assert any("attack `eps` = 0.1" in line for line in lines) and not any("steps" in line for line in lines)
    assert any("n_eval" in line and "64" in line for line in lines)
    assert len(lines) == 4
    # CIFAR-100 trains for 100 epochs in the paper: 60 is a difference there
    assert any("paper: 100" in line for line in setting_differences("cifar100", {"a": {**paper, "data": {**paper["data"], "name": "cifar100"}}}))


def test_table_xi_runs_are_matched_to_the_papers_cells_by_name():
    from trigact.analysis.paper import table11_cell

    assert table11_cell("cifar10_fixed_eps64") == ("cifar10", "fixed_eps64", "")
    assert table11_cell("cifar100_learnable_alpha4_vgg19_bn") == ("cifar100", "learnable_alpha4", "vgg19_bn")
    assert table11_cell("imagenet100_learnable_alpha4_tv_resnet18") == ("imagenet100", "learnable_alpha4", "resnet18")
    assert table11_cell("imagenet100_learnable_alpha4_inception_v4")[2] == "inception_v4"
    for name in ("fmnist_fixed_eps64", "cifar10", "my_run"):  # no paper dataset: no cell (said in paper.md)
        assert table11_cell(name) is None
    # Every run the shipped config names has a paper cell.
    import yaml

    from trigact.common.config import CONF_DIR

    runs = yaml.safe_load((Path(CONF_DIR) / "experiment" / "paper_table11_trigger_mse.yaml").read_text())["pipeline"]["runs"]
    for name in runs:
        dataset, defense, victim = table11_cell(name)
        assert reference_value("XI", dataset, defense, "none", victim=victim, metric="mse_1e-2") is not None, name
