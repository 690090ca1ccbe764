"""``trainer=ddp`` on the CPU (gloo, 2 processes) with a learnable trigger (Algorithm 2).

The product command line is run as a subprocess: Lightning's ``ddp`` strategy starts rank 1 by
re-running ``python -m trigact.train <same overrides>`` with the parent's environment, so a
test-only callback (``helpers_hydra.SaveTauPerRank``, importable because ``tests/`` is put on
PYTHONPATH) runs on both ranks and writes each rank's final tau and weights.

Why tau matches the single-process run exactly, not only up to a tolerance:
- Same data per step: the training order is a DistributedSampler seeded by (seed, epoch); with 2
  ranks of 64 images, global batch k is the same 128 images as batch k of one process with
  batch size 128 (rank r takes every other index). Only full batches are used
  (``limit_train_batches``), so DDP's padding of the last, uneven batch never enters.
- Same math per step up to float rounding: mean over 128 = average of the two ranks' means over
  64; the MLP has no batch norm (whose batch statistics would be per rank) and no dropout.
- The trigger update sums the gradient over the same train images (strided shards, all-reduced)
  and keeps only its sign. The weights differ from the single process by rounding (measured
  <= 6e-8), far too little to flip the sign of a summed gradient component that is not exactly 0;
  and a component that is exactly 0 (pixels where the clamp is active for every image) is 0 in both.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers_hydra import compose_config
from trigact import load_bundle
from trigact.train import train

TESTS_DIR = Path(__file__).resolve().parent
COMMON = ["data=digits", "data.image_size=8", "model=mlp", "trigger=learnable", "trigger.alpha=8/255",
          "trigger.update.update_fraction=1.0", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
          "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false"]


def test_ddp_on_cpu_keeps_tau_identical_across_ranks_and_equal_to_one_process(tmp_path):
    ddp_root, taus = tmp_path / "ddp", tmp_path / "taus"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb_dir"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    proc = subprocess.run(
        [sys.executable, "-m", "trigact.train", *COMMON, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "data.batch_size=64", "logger=[csv,wandb]", f"paths.root_dir={ddp_root}",
         "+callbacks.save_tau._target_=helpers_hydra.SaveTauPerRank", f"+callbacks.save_tau.dirpath={taus}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout

    # (a) Every rank ends with the same tau (and weights), bitwise.
    rank0, rank1 = (torch.load(taus / f"tau_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert torch.equal(rank0["tau"], rank1["tau"])
    for key, value in rank0["state_dict"].items():
        assert torch.equal(value, rank1["state_dict"][key]), key

    # Only rank 0 wrote the run's outputs: one bundle, summary, trigger image, CSV log and W&B run.
    (run_dir,) = {p.parent for p in ddp_root.glob("outputs/runs/**/bundle.pt")}
    ddp = load_bundle(run_dir / "bundle.pt")
    assert torch.equal(ddp.trigger, rank0["tau"])
    assert [u["epoch"] for u in ddp.meta["trigger_updates"]] == [1, 2]
    assert len(list(ddp_root.rglob("summary.json"))) == 1 and len(list(ddp_root.rglob("trigger.png"))) == 1
    assert [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("metrics.csv")] == ["csv/version_0/metrics.csv"]
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    # Hydra's own job log: rank 1 re-runs the entry point with hydra.job.name=train_ddp_process_1
    # (Lightning's doing) in the same launch folder; nothing is logged into it.
    for log in run_dir.glob("launches/*/train_ddp_process_*.log"):
        assert log.stat().st_size == 0, log.read_text()[:500]
    assert proc.stdout.count("bundle:") == 1  # only rank 0 reports
    assert proc.stdout.count("wandb: logging offline") == 1  # only rank 0 starts a W&B run

    # (b) The same global batch (2 x 64) on one process (1 x 128) gives the same tau, bitwise.
    single_cfg = compose_config("train", COMMON + ["data.batch_size=128", "logger=none"], tmp_path / "single")
    single = load_bundle(train(single_cfg)["bundle"])
    assert [u["epoch"] for u in single.meta["trigger_updates"]] == [1, 2]
    assert torch.equal(ddp.trigger, single.trigger)
    assert not torch.equal(single.trigger, torch.zeros_like(single.trigger))
    for (key, a), b in zip(ddp.net.state_dict().items(), single.net.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), key  # rounding only (all-reduce vs one batch)
