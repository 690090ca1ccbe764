"""Attack protocols and the budget sweep: one (attack, eps) bank and row per budget point, and the
accuracy-against-eps analysis."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trigact.analysis.budget import budget_curves, budget_table, plot_budget
from trigact.attacks.config import attack_config, budget_overrides, budget_points, split_label
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.common.validate import parse_eps


def protocol(name):
    return yaml.safe_load((Path(CONF_DIR) / "attack_protocol" / f"{name}.yaml").read_text())


def test_the_sweep_has_one_point_per_eps_and_keeps_the_rest_of_the_budget():
    budget = budget_overrides(protocol("budget_sweep"), {"steps": 7})
    points = budget_points(budget)
    assert [suffix for suffix, _ in points] == ["@2/255", "@4/255", "@8/255", "@16/255", "@32/255"]
    for suffix, overrides in points:
        cfg = attack_config(CONF_DIR, "pgd", overrides)
        assert cfg["steps"] == 7 and round(parse_eps(cfg["eps"]) * 255) == int(suffix[1:].split("/")[0])
    # an explicit eps override wins over the sweep: one point, no suffix
    assert [s for s, _ in budget_points(budget_overrides(protocol("budget_sweep"), {"eps": "8/255"}))] == [""]
    assert [s for s, _ in budget_points(protocol("paper"))] == [""]
    with pytest.raises(TrigactError, match="empty list"):
        budget_points({"eps": []})
    with pytest.raises(TrigactError, match="attack_protocol.eps"):
        budget_points({"eps": ["8/255", "-1/255"]})


def test_split_label():
    assert split_label("pgd@8/255") == ("pgd", "8/255")
    assert split_label("mifgsm") == ("mifgsm", None)


def records():
    # Two victims in column A (two seeds), one in B; accuracies per attack at two budgets.
    def rec(name, group, acc):
        return {"name": name, "group": group, "robust_acc": acc}

    return [
        rec("a0", "A", {"pgd@2/255": 0.9, "ifgsm@2/255": 0.7, "pgd@8/255": 0.5, "ifgsm@8/255": 0.3}),
        rec("a1", "A", {"pgd@2/255": 0.7, "ifgsm@2/255": 0.5, "pgd@8/255": 0.3, "ifgsm@8/255": 0.1}),
        rec("b0", "B", {"pgd@2/255": 0.6, "ifgsm@2/255": 0.6, "pgd@8/255": 0.2, "ifgsm@8/255": 0.0}),
    ]


def test_budget_curves_average_attacks_then_victims():
    xs, curves, attacks = budget_curves(records())
    assert xs == [2, 8] and attacks == ["pgd", "ifgsm"]
    assert curves["A"][2] == pytest.approx([0.8, 0.6]) and curves["A"][8] == pytest.approx([0.4, 0.2])
    assert curves["B"][8] == pytest.approx([0.1])
    table = budget_table(records())
    assert "| 2 | 70.00 ± 14.14 | 60.00 |" in table and "| 8 | 30.00 ± 14.14 | 10.00 |" in table


def test_budget_analysis_needs_budget_labels(tmp_path):
    with pytest.raises(TrigactError, match="budget_sweep"):
        budget_curves([{"name": "v", "group": "A", "robust_acc": {"pgd": 0.5}}])
    assert plot_budget(records(), tmp_path / "budget.png").is_file()


def test_attack_params_reach_one_attack_only():
    budget = budget_overrides(protocol("paper"), {}, {"pgd": {"random_start": False}})
    assert attack_config(CONF_DIR, "pgd", budget)["params"]["random_start"] is False
    assert attack_config(CONF_DIR, "pgd", budget_overrides(protocol("paper"), {}))["params"]["random_start"] is True
    assert "random_start" not in attack_config(CONF_DIR, "mifgsm", budget)["params"]
    with pytest.raises(TrigactError, match="attack_params.pgd: attack 'pgd' has no parameter.*decay; allowed: alpha, random_start"):
        attack_config(CONF_DIR, "pgd", budget_overrides(protocol("paper"), {}, {"pgd": {"decay": 1.0}}))


def test_a_budget_sweep_crafts_one_bank_per_eps_and_evaluate_finds_them(shrunk_demo, tmp_path, capsys):
    """attack -> evaluate -> analysis with attack_protocol=budget_sweep (two of its epsilons, to stay cheap)."""
    import shutil

    from hydra import compose, initialize_config_dir

    from trigact.cli.analysis import run_analysis
    from trigact.cli.attack import run_attack
    from trigact.cli.evaluate import run_evaluate

    root, _ = shrunk_demo
    shutil.copytree(root / "outputs", tmp_path / "outputs")
    common = [f"paths.root_dir={tmp_path}", "surrogates=[digits/standard/lenet/*/s0]", "attacks=[ifgsm]",
              "attack_protocol=budget_sweep", "attack_protocol.eps=[8/255,32/255]", "attack_protocol.steps=2",
              "n_eval=40"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        rows = run_attack(compose("attack", [*common, "progress=false"]))
        assert [r["attack"] for r in rows] == ["ifgsm@8/255", "ifgsm@32/255"]
        assert capsys.readouterr().out.count("TAE bank written") == 2
        victims = "victims={A:[digits/standard/small_cnn],B:[digits/trigger_activation/small_cnn/fixed-*/s0]}"
        matrix, groups, out = run_evaluate(compose("evaluate", [*common, victims, "name=sweep"]))
        assert matrix.attacks == ["ifgsm@8/255", "ifgsm@32/255"]
        eq7 = matrix.mean_over_victims(groups)
        # the larger budget hurts the undefended model at least as much (same images, same surrogate)
        assert eq7[("A", "ifgsm@32/255")] <= eq7[("A", "ifgsm@8/255")]
        table, figure = run_analysis(compose("analysis", [f"paths.root_dir={tmp_path}", f"results={out}",
                                                          "x=attack_eps"]))
    text = table.read_text()
    assert figure.is_file() and "| 8 |" in text and "| 32 |" in text
    assert f"| 32 | {100 * eq7[('A', 'ifgsm@32/255')]:.2f} |" in text


def test_printed_tables_show_labels_as_written_not_as_rich_markup(capsys):
    from trigact.cli.attack import print_banks
    from trigact.common.report import print_table

    print_banks([{"surrogate": "[bold]run[/bold]", "attack": "pgd@8/255", "n": 3, "clean acc": 0.5,
                  "white-box success": 0.1}])
    print_table([{"name": "[red]run[/red]"}], "title [x]")
    out = capsys.readouterr().out
    assert "[bold]run[/bold]" in out and "[red]run[/red]" in out and "title [x]" in out


def test_the_family_table_averages_each_familys_attacks_per_budget_and_ranks_the_strongest():
    from trigact.analysis.families import family_table

    records = [
        {"name": "a", "group": "G", "robust_acc": {"pgd@8/255": 0.5, "mifgsm@8/255": 0.3, "fia@8/255": 0.9,
                                                    "pgd@16/255": 0.1}},
        {"name": "b", "group": "G", "robust_acc": {"pgd@8/255": 0.7, "mifgsm@8/255": 0.1, "fia@8/255": 0.7,
                                                    "pgd@16/255": 0.3}},
        {"name": "c", "group": "H", "robust_acc": {"pgd@8/255": 0.2, "mifgsm@8/255": 0.2, "fia@8/255": 0.0}},
    ]
    lines = family_table(records, top=2).splitlines()
    assert "| gradient | 8/255 | 2 | 40.00 | 20.00 |" in lines  # G: mean(pgd 0.6, mifgsm 0.2); H: 0.2
    assert "| feature | 8/255 | 1 | 80.00 | 0.00 |" in lines
    assert "| gradient | 16/255 | 1 | 20.00 | - |" in lines
    assert "| 8/255 | mifgsm 20.0, pgd 60.0 | fia 0.0, mifgsm 20.0 |" in lines
