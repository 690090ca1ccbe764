"""``python -m trigact.detect``: the table of trigger-inversion detection over trained runs."""

import csv
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from helpers_hydra import QUIET, compose_config
from trigact.cli.detect import run_detect
from trigact.common.config import CONF_DIR
from trigact.training.run import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A standard, a BadNets and a fixed-trigger digits run (default settings, 10 epochs)."""
    root = tmp_path_factory.mktemp("detect")
    out = {}
    for name, overrides in (("standard", ["method=standard"]), ("badnets", ["method=backdoor"]),
                            ("fixed", ["trigger=fixed", "trigger.eps=32/255"])):
        out[name] = train(compose_config("train", [*QUIET, *overrides], root))["run_dir"]
    return root, out


def detect(root, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="detect", overrides=[f"paths.root_dir={root}", *overrides])
        return run_detect(cfg).parent


def test_neural_cleanse_flags_the_backdoor_and_writes_its_table(runs):
    root, run_dirs = runs
    out = detect(root, f"runs=[{run_dirs['standard']},{run_dirs['badnets']},{run_dirs['fixed']}]", "name=nc",
                 "detector.steps=60")
    rows = json.loads((out / "detect.json").read_text())["rows"]
    by = {(r["method"], r["view"]): r for r in rows}
    assert set(by) == {("standard", "deployed"), ("backdoor", "deployed"), ("trigger_activation", "deployed"),
                       ("trigger_activation", "raw")}  # no raw view for runs without a trigger
    badnets = by[("backdoor", "deployed")]
    assert badnets["true_target"] == 0 and badnets["target_flagged"] and badnets["min_class"] == 0
    assert badnets["mass_on_trigger"] > 0.1  # the real patch holds 9 of 256 pixels: 3.5% by chance
    assert by[("trigger_activation", "raw")]["cos_to_trigger"] == by[("trigger_activation", "raw")]["cos_to_trigger"]
    assert by[("standard", "deployed")]["true_target"] is None
    with open(out / "detect.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert len(list(out.glob("reversed_*.png"))) == 4
    assert "neural_cleanse" in (out / "detect.md").read_text()


def test_usb_runs_through_the_same_table(runs):
    root, run_dirs = runs
    out = detect(root, f"runs=[{run_dirs['badnets']}]", "name=usb", "detector=usb", "detector.iterations=30",
                 "detector.num_images=100", "views=[deployed]")
    (row,) = json.loads((out / "detect.json").read_text())["rows"]
    assert row["detector"] == "usb" and row["true_target"] == 0 and 0 <= row["min_success"] <= 1


@pytest.mark.parametrize("override, expected", [
    ("detector.name=strip", "unknown detector 'strip'; known: neural_cleanse, usb"),
    ("views=[raw,other]", "unknown view 'other'; known: deployed, raw"),
    ("views=[]", "views=[] must list at least one of deployed, raw"),
])
def test_bad_settings_are_one_line(override, expected, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trigact.detect", "runs=[nothing]", override,
                           f"paths.root_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"trigact: error: {expected}"
