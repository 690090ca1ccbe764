"""The standalone ``trigact.attack`` and ``trigact.evaluate`` entry points, and run selection.

They read the runs and banks of one shrunken demo pipeline (the ``shrunk_demo`` session fixture)
and must agree with it cell for cell, and find the same banks instead of crafting them again.
"""

import csv
import json
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import yaml
from hydra import compose, initialize_config_dir

from conftest import DEMO_SHRINK
from trigact.common.errors import TrigactError
from trigact.runs.selection import find_runs, run_label
from trigact.common.config import CONF_DIR

SURROGATES = "[digits/standard/lenet/*/s0,digits/standard/tiny_resnet]"
# The demo's banks: found by the attack settings and n_eval they were crafted with.
COMMON = ["attacks=[pgd,mifgsm]", "attack_overrides.eps=32/255", "attack_overrides.steps=3", "n_eval=60"]


def compose_entry(name, root, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.root_dir={root}", *overrides])


def run_entry(name, root, overrides, fn):
    """Compose and run an entry point's function in-process (sweeps compose train configs)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=[f"paths.root_dir={root}", *overrides])
        return fn(cfg)


def read_matrix(path):
    with open(path) as f:
        return {(r["victim"], r["surrogate"], r["attack"]): float(r["accuracy"]) for r in csv.DictReader(f)}


def registry_copy(shrunk_demo, tmp_path):
    """A private copy of the demo's outputs, for tests that add files to it."""
    root, _ = shrunk_demo
    shutil.copytree(root / "outputs", tmp_path / "outputs")
    return tmp_path


# ----------------------------------------------------------------------------------------- selection


def test_find_runs_by_bundle_folder_glob_and_recursion_without_duplicates(shrunk_demo):
    root, rows = shrunk_demo
    runs_dir = root / "outputs" / "runs"
    bundles = {r["name"]: r["bundle"] for r in rows}
    lenet = find_runs(["digits/standard/lenet/*/s0"], runs_dir)
    assert [str(p) for p in lenet] == [str(bundles["surrogate_lenet"])]
    assert find_runs([bundles["surrogate_lenet"]], runs_dir) == lenet  # a bundle file
    assert find_runs([str(lenet[0].parent)], runs_dir) == lenet  # a run folder
    everything = find_runs(["digits", "digits/standard/lenet"], runs_dir)  # recursion; the dup dropped
    assert len(everything) == 5 and everything[0] != everything[1]
    assert len(find_runs(["digits/trigger_activation/**/bundle.pt"], runs_dir)) == 2


def test_find_runs_errors_name_the_pattern(shrunk_demo, tmp_path):
    root, _ = shrunk_demo
    with pytest.raises(TrigactError, match="no finished run matches 'digits/nothing/\\*'"):
        find_runs(["digits/nothing/*"], root / "outputs" / "runs")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TrigactError, match="is not a bundle"):
        find_runs([str(tmp_path / "notes.txt")], root / "outputs" / "runs")
    with pytest.raises(TrigactError, match="no runs given"):
        find_runs([], root / "outputs" / "runs")


@pytest.mark.parametrize(
    "overrides,expected",
    [({"steps": "abc"}, "attack_overrides.steps='abc' must be an integer >= 1"),
     ({"steps": 2.5}, "attack_overrides.steps=2.5 must be an integer >= 1"),
     ({"steps": 0}, "attack_overrides.steps=0 must be an integer >= 1"),
     ({"eps": "-8/255"}, "attack_overrides.eps='-8/255' must be >= 0"),
     ({"eps": "abc"}, "attack_overrides.eps='abc' is not a number")],
)
def test_attack_overrides_are_checked_before_use(tmp_path, overrides, expected):
    from types import SimpleNamespace

    from trigact.attacks.config import attack_config
    from trigact.evaluation.crafting import load_banks

    surrogate = SimpleNamespace(meta={"path": str(tmp_path / "bundle.pt")})
    for call in (lambda: attack_config(CONF_DIR, "pgd", overrides),
                 lambda: load_banks(tmp_path, "digits", {"s": surrogate}, ["pgd"], CONF_DIR, overrides)):
        with pytest.raises(TrigactError) as err:
            call()
        assert expected in str(err.value) and "\n" not in str(err.value)
    assert attack_config(CONF_DIR, "pgd", {"steps": 3, "eps": "32/255"})["steps"] == 3


def test_run_labels_say_model_and_trigger():
    meta = {"config": {"model": {"name": "small_cnn"}, "trigger": {"kind": "fixed", "eps": "8/255"}, "seed": 3}}
    assert run_label(meta) == "small_cnn fixed eps 8/255 s3"
    meta = {"config": {"model": {"name": "lenet"}, "trigger": {"kind": "none"}, "seed": 0}, "method": "pgd_at"}
    assert run_label(meta) == "lenet pgd_at s0"
    meta = {"config": {"model": {"name": "small_cnn"}, "trigger": {"kind": "sparse_learnable", "k": 0.05, "eps": "64/255",
                                                                   "alpha": "16/255"}, "seed": 0}}
    assert run_label(meta) == "small_cnn sparse learnable k 0.05 eps 64/255 alpha 16/255 s0"
    meta = {"config": {"model": {"name": "small_cnn"}, "trigger": {"kind": "none"}, "seed": 0,
                       "method": {"module": {"backdoor": {"kind": "siba", "target": 3}}}}, "method": "backdoor"}
    assert run_label(meta) == "small_cnn backdoor siba t3 s0"


def test_a_sweep_folder_selects_its_jobs_runs_and_names_a_crashed_job(shrunk_demo, tmp_path):
    """A sweep folder as Hydra writes it: multirun.yaml and <job>/.hydra/overrides.yaml."""
    root, _ = shrunk_demo
    sweep = tmp_path / "multirun" / "2026-01-01_00-00-00"
    job_overrides = [
        [f"paths.root_dir={root}", *DEMO_SHRINK, "method=standard", "model=small_cnn"],
        [f"paths.root_dir={root}", *DEMO_SHRINK, "method=trigger_activation", "model=small_cnn",
         "trigger=fixed", "trigger.eps=32/255"],
    ]
    for i, overrides in enumerate(job_overrides):
        (sweep / str(i) / ".hydra").mkdir(parents=True)
        (sweep / str(i) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")

    from trigact.runs.selection import compose_train

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        found = find_runs([str(sweep)], root / "outputs" / "runs", compose_train)
        assert [p.parts[-6:-3] for p in found] == [
            ("digits", "standard", "small_cnn"), ("digits", "trigger_activation", "small_cnn")]
        # A job whose run never finished (crashed, or still running) is named, not skipped.
        (sweep / "2" / ".hydra").mkdir(parents=True)
        (sweep / "2" / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"paths.root_dir={root}", *DEMO_SHRINK, "model=lenet", "trigger.eps=99/255"]))
        with pytest.raises(TrigactError, match="1 job\\(s\\) have no finished run .*job 2"):
            find_runs([str(sweep)], root / "outputs" / "runs", compose_train)


# --------------------------------------------------------------------------------------- entry points


def test_attack_reuses_the_pipelines_banks(shrunk_demo, tmp_path, capsys):
    from trigact.cli.attack import run_attack

    root = registry_copy(shrunk_demo, tmp_path)
    rows = run_entry("attack", root, [f"surrogates={SURROGATES}", *COMMON], run_attack)
    assert capsys.readouterr().out.count("reusing TAE bank") == 4
    assert [(r["surrogate"], r["attack"]) for r in rows] == [
        ("lenet standard s0", "pgd"), ("lenet standard s0", "mifgsm"),
        ("tiny_resnet standard s0", "pgd"), ("tiny_resnet standard s0", "mifgsm")]
    assert all(r["n"] == 60 and 0 <= r["white-box success"] <= 1 for r in rows)


def test_attack_crafts_a_missing_bank_and_another_for_another_n_eval(shrunk_demo, tmp_path, capsys):
    from trigact.cli.attack import run_attack

    root = registry_copy(shrunk_demo, tmp_path)
    over = [f"surrogates={SURROGATES}", "attacks=[ifgsm]", "attack_overrides.eps=32/255",
            "attack_overrides.steps=2", "n_eval=60", "progress=false"]
    rows = run_entry("attack", root, over, run_attack)
    assert capsys.readouterr().out.count("TAE bank written") == 2 and len(rows) == 2
    over[-2] = "n_eval=40"  # banks are keyed by n_eval: another one is another bank, the first stays
    rows = run_entry("attack", root, over, run_attack)
    assert capsys.readouterr().out.count("TAE bank written") == 2 and all(r["n"] == 40 for r in rows)
    over[-2] = "n_eval=60"
    run_entry("attack", root, over, run_attack)
    assert capsys.readouterr().out.count("reusing TAE bank") == 2


def test_evaluate_agrees_with_the_pipeline_cell_for_cell(shrunk_demo, tmp_path):
    from trigact.cli.evaluate import run_evaluate

    root = registry_copy(shrunk_demo, tmp_path)
    victims = "[digits/standard/small_cnn,digits/trigger_activation/small_cnn/fixed-*/s0]"
    matrix, groups, out = run_entry(
        "evaluate", root, [f"surrogates={SURROGATES}", f"victims={victims}", "name=check", *COMMON], run_evaluate)
    assert list(groups) == ["small_cnn standard s0", "small_cnn fixed eps 32/255 s0"]
    assert out == root / "outputs" / "evaluate" / "check"
    ours = read_matrix(out / "matrix.csv")
    theirs = read_matrix(shrunk_demo[0] / "outputs" / "pipeline" / "demo" / "matrix.csv")
    pipeline_names = {"small_cnn standard s0": "standard", "small_cnn fixed eps 32/255 s0": "fixed_eps32",
                      "lenet standard s0": "surrogate_lenet", "tiny_resnet standard s0": "surrogate_tiny_resnet"}
    assert len(ours) == 2 * 2 * 2
    for (v, s, a), acc in ours.items():
        assert acc == theirs[(pipeline_names[v], pipeline_names[s], a)]
    table = (out / "table.md").read_text()
    assert table.startswith("| | small_cnn standard s0 | small_cnn fixed eps 32/255 s0 |")


def test_evaluate_with_a_defense_names_it_in_every_column_and_applies_it(shrunk_demo, tmp_path):
    from trigact.cli.evaluate import run_evaluate

    root = registry_copy(shrunk_demo, tmp_path)
    victims = "[digits/standard/small_cnn]"
    base = [f"surrogates={SURROGATES}", f"victims={victims}", *COMMON]
    bare, _, _ = run_entry("evaluate", root, [*base, "name=bare"], run_evaluate)
    matrix, groups, out = run_entry("evaluate", root, [*base, "name=bdr", "defense=bdr_d2",
                                                       "defense.bits=1"], run_evaluate)
    column = "small_cnn standard s0 + BDR (d=2)"
    assert list(groups) == [column]
    assert (out / "table.md").read_text().startswith(f"| | {column} |")
    assert matrix.clean[column] != bare.clean["small_cnn standard s0"]  # the defense did run (1 bit)
    records = json.loads((out / "victims.json").read_text())
    assert records[0]["defense"] == "BDR (d=2)"


def test_evaluate_groups_average_their_runs(shrunk_demo, tmp_path):
    from trigact.cli.evaluate import run_evaluate

    root = registry_copy(shrunk_demo, tmp_path)
    victims = "{Triggers:[digits/trigger_activation],None:[digits/standard/small_cnn]}"
    matrix, groups, out = run_entry(
        "evaluate", root, [f"surrogates={SURROGATES}", f"victims={victims}", "name=g", *COMMON], run_evaluate)
    assert list(groups) == ["Triggers", "None"] and len(groups["Triggers"]) == 2
    cells = read_matrix(out / "matrix.csv")
    means = matrix.mean_over_victims(groups)
    for attack in ("pgd", "mifgsm"):
        per_victim = [sum(cells[(v, s, attack)] for s in ("lenet standard s0", "tiny_resnet standard s0")) / 2
                      for v in groups["Triggers"]]
        assert means[("Triggers", attack)] == pytest.approx(sum(per_victim) / 2)


def cli(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_evaluate_cli_errors_are_one_line(shrunk_demo, tmp_path):
    root, _ = shrunk_demo
    base = [f"paths.root_dir={root}", f"surrogates={SURROGATES}", "attack_overrides.eps=32/255"]
    missing_bank = cli("trigact.evaluate", *base, "victims=[digits/standard/small_cnn]", "attacks=[ifgsm]",
                       "attack_overrides.steps=7", cwd=tmp_path)
    whitebox = cli("trigact.evaluate", *base, "victims=[digits/standard/lenet]", "attacks=[pgd]",
                   "attack_overrides.steps=3", "n_eval=60", cwd=tmp_path)
    for proc, expected in ((missing_bank, "no TAE bank for surrogate lenet standard s0 and attack ifgsm"),
                           (whitebox, "is surrogate lenet standard s0: that is a white-box attack")):
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_pipeline_and_evaluate_write_the_same_table_clean_row_included(shrunk_demo, tmp_path):
    """One definition of clean accuracy: the banks' own (quantized) clean images, in both entry points.

    Digits pixels are k/16, not multiples of 1/255, so the unquantized test images differ from them.
    """
    from omegaconf import OmegaConf

    from trigact.cli.evaluate import run_evaluate
    from trigact.data import DigitsDataModule
    from trigact.evaluation.bank import dequantize, quantize

    root, _ = shrunk_demo
    bank = next((root / "outputs" / "advbank").rglob("bank.safetensors"))
    clean = safetensors.torch.load_file(bank)["x_clean"]
    dm = DigitsDataModule(image_size=16)  # the demo's data
    dm.setup()
    test_images = torch.stack([dm.test_set[i][0] for i in range(len(clean))])
    assert torch.equal(quantize(test_images), clean) and not torch.equal(dequantize(clean), test_images)
    victims = {"No defense": ["digits/standard/small_cnn"],
               "Fixed trigger (eps 32/255)": ["digits/trigger_activation/small_cnn/fixed-*/s0"],
               "Learnable trigger (alpha 16/255)": ["digits/trigger_activation/small_cnn/learnable-*/s0"]}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"paths.root_dir={root}", f"surrogates={SURROGATES}", "victims=[x]", *COMMON,
            f"results_dir={tmp_path / 'evaluate'}"])
        OmegaConf.update(cfg, "victims", victims, merge=False)
        _, _, out = run_evaluate(cfg)
    assert (out / "table.md").read_text() == (root / "outputs" / "pipeline" / "demo" / "table.md").read_text()
