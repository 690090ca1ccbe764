"""benchmarks/gpu_check.py and gpu_check.sh keep working on machines without a GPU: the smoke run
(`make test-full`: about a minute) drives the same code (Hydra configs, the trainer profiles,
device-resident synthetic CIFAR-10, the profiler) at toy sizes on the CPU. The figures it prints mean
nothing; that it runs, does. The scripts' syntax is checked in every run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_variant_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'benchmarks'}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_train.json").read_text())
    failed = [r for r in rows if "error" in r]
    assert not failed, failed
    methods = {(r["method"], r["profile"]) for r in rows}
    assert {("standard", "fp32"), ("standard", "bf16+cl"), ("fixed", "bf16+cl"), ("learnable train_step", "bf16+cl"),
            ("learnable epoch", "bf16+cl")} <= methods
    assert all(r["images_per_s"] > 0 for r in rows)
    report = (tmp_path / "gpu_check.md").read_text()
    assert "Training throughput" in report and "Where a step's time goes" in report and "profile failed" not in report


def test_gpu_check_sh_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_wheels.sh")]).returncode == 0
