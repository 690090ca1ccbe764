"""hparams_search=trigger_optuna: a real 2-trial Optuna search through Hydra's sweeper on digits.

It reuses the shrunken demo's surrogates (copied), so each trial only trains and scores the searched
victim. The search's banks are on validation images, not the demo's test banks: the first trial
crafts them and the second reuses them.
"""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import DEMO_OVERRIDES


@pytest.mark.slow
def test_two_trial_search_returns_the_best_objective(shrunk_demo, tmp_path):
    root, _ = shrunk_demo
    shutil.copytree(root / "outputs", tmp_path / "outputs")
    cmd = [sys.executable, "-m", "trigact.pipeline", "-m", *DEMO_OVERRIDES, "hparams_search=trigger_optuna",
           f"paths.root_dir={tmp_path}", "hydra.sweeper.n_trials=2", "search.clean_floor=0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 surrogates x 2 attacks: crafted on validation images by trial 0, reused by trial 1.
    assert proc.stdout.count("TAE bank written") == 4 and proc.stdout.count("reusing TAE bank") == 4
    (sweep,) = (tmp_path / "outputs" / "multirun" / "pipeline-demo-search").iterdir()
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = []
    for trial in ("0", "1"):
        victims = {v["name"]: v for v in json.loads((sweep / trial / "victims.json").read_text())}
        searched = victims["searched"]
        assert searched["trigger_kind"] == "fixed"
        clean, robust = searched["clean_acc"], searched["mean_robust_acc"]
        values.append(robust if clean >= 0.5 else clean - 0.5)
        assert "| searched |" in (sweep / trial / "table.md").read_text().splitlines()[0] + " |"
    assert result["best_value"] == max(values)
    assert set(result["best_params"]) == {"search.eps", "search.kl_weight"}
