"""Sweep analysis: accuracy against eps_t / alpha from a results folder's victims.json."""

import json

import pytest

from trigact.analysis import plot_sweep, sweep_points, sweep_table
from trigact.analysis.sweep import read_victims
from trigact.common.errors import TrigactError


def record(name, kind, clean, robust, **size):
    return {"name": name, "trigger_kind": kind, "clean_acc": clean, "attacks": ["pgd", "ifgsm"],
            "robust_acc": {"pgd": robust - 0.1, "ifgsm": robust + 0.1}, "mean_robust_acc": robust, **size}


RECORDS = [
    record("standard", "none", 0.9, 0.5),
    record("e8 s0", "fixed", 0.88, 0.6, eps=8 / 255),
    record("e8 s1", "fixed", 0.86, 0.7, eps=8 / 255),
    record("e32", "fixed", 0.8, 0.8, eps=32 / 255),
    record("a4", "learnable", 0.85, 0.75, alpha=4 / 255),
]


def test_points_group_seeds_by_trigger_size_and_keep_references():
    points, refs = sweep_points(RECORDS, "eps")
    assert [p.x for p in points] == [8, 32] and list(refs) == ["standard"]
    assert points[0].robust_mean == pytest.approx(0.65) and points[0].clean_mean == pytest.approx(0.87)
    alpha_points, _ = sweep_points(RECORDS, "alpha")
    assert [(p.x, p.names) for p in alpha_points] == [(4, ["a4"])]


def test_table_and_figure(tmp_path):
    points, refs = sweep_points(RECORDS, "eps")
    table = sweep_table(points, refs, "eps").splitlines()
    assert table[0] == "| eps (/255) | victims | clean acc (%) | mean robust acc (%) | pgd | ifgsm |"
    assert table[2].startswith("| standard (no trigger) | 1 | 90.00 | 50.00 | 40.00 | 60.00 |")
    assert table[3] == "| 8 | 2 | 87.00 | 65.00 ± 5.00 | 55.00 | 75.00 |"
    png = plot_sweep(points, refs, tmp_path / "s.png", "eps")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line(tmp_path):
    with pytest.raises(TrigactError, match="unknown sweep axis x='size'"):
        sweep_points(RECORDS, "size")
    with pytest.raises(TrigactError, match="no victim with a learnable trigger"):
        sweep_points(RECORDS[:2], "alpha")
    with pytest.raises(TrigactError, match="no victims.json in"):
        read_victims(tmp_path)
    (tmp_path / "victims.json").write_text(json.dumps([{"name": "old"}]))
    with pytest.raises(TrigactError, match="has no accuracies"):
        read_victims(tmp_path)


def test_analysis_of_the_demo_pipeline_results(shrunk_demo, tmp_path):
    from hydra import compose, initialize_config_dir

    from trigact.cli.analysis import run_analysis
    from trigact.common.config import CONF_DIR

    root, _ = shrunk_demo
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="analysis", overrides=[
            f"paths.root_dir={tmp_path}", f"results={root}/outputs/pipeline/demo", f"out_dir={tmp_path}", "x=alpha"])
    table, figure = run_analysis(cfg)
    lines = table.read_text().splitlines()
    assert lines[0].endswith("| pgd | mifgsm |")  # the pipeline's attack order
    assert lines[2].startswith("| standard (no trigger) | 1 |") and lines[3].startswith("| 16 | 1 |")
    assert figure.is_file()


def test_the_analysis_command_runs_as_a_user_runs_it(shrunk_demo, tmp_path):
    """``python -m trigact.analysis`` in a fresh process (its launch folder's name needs our resolver)."""
    import subprocess
    import sys

    root, _ = shrunk_demo
    done = subprocess.run([sys.executable, "-m", "trigact.analysis", f"paths.root_dir={tmp_path}",
                           f"results={root}/outputs/pipeline/demo", f"out_dir={tmp_path}", "x=attack_family"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "families.md").read_text()
    assert table.startswith("| family | eps | attacks |") and "| gradient | - | 2 |" in table


def test_a_required_value_left_unset_is_a_one_line_cli_error(capsys):
    # `results: ???` in conf/analysis.yaml: OmegaConf's MissingMandatoryValue, not a traceback.
    from hydra import compose, initialize_config_dir

    from trigact.cli.analysis import run_analysis
    from trigact.cli import user_errors
    from trigact.common.config import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("analysis")
    with pytest.raises(SystemExit) as exit_info, user_errors():
        run_analysis(cfg)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "trigact: error: results is required and was not given; set it on the command line (results=...)")


def test_a_bad_sweep_point_fails_its_job_and_the_sweep_goes_on(tmp_path):
    # sys.exit(2) inside a multirun job would end the whole sweep at its first bad point.
    import subprocess
    import sys

    missing = [tmp_path / "a", tmp_path / "b"]
    done = subprocess.run(
        [sys.executable, "-m", "trigact.analysis", "-m", f"results={missing[0]},{missing[1]}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("trigact: error:")]
    assert len(errors) == 2 and all("no victims.json in" in line for line in errors), done.stderr
