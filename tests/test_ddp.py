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
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_hydra import compose_config
from trigact import load_bundle
from trigact.training.run import train

pytestmark = pytest.mark.slow  # each DDP launch starts 2 processes: about a minute on 2 cores

TESTS_DIR = Path(__file__).resolve().parent
COMMON = ["data=digits", "data.image_size=8", "model=mlp", "trigger=learnable", "trigger.alpha=8/255",
          "trigger.update.update_fraction=1.0", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
          "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=64"]


def run_ddp_train(args, tmp_path, timeout=300) -> subprocess.CompletedProcess:
    """``python -m trigact.train <args>`` in its own process group, with tests/ on PYTHONPATH (for the
    helpers_hydra callbacks, which rank 1 imports too). On a timeout the whole group is killed: a rank
    that Lightning started would otherwise outlive the test, waiting for its peer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb_dir"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    proc = subprocess.Popen([sys.executable, "-m", "trigact.train", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (ranks out of step?):\n{stderr[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any rank left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def uninterrupted_ddp(tmp_path_factory):
    """One uninterrupted 2-process run, shared by the tests below: (its root, the per-rank taus, the process)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    ddp_root, taus = tmp_path / "ddp", tmp_path / "taus"
    proc = run_ddp_train([*COMMON, *DDP, "logger=[csv,wandb]", f"paths.root_dir={ddp_root}",
                          "+callbacks.save_tau._target_=helpers_hydra.SaveTauPerRank",
                          f"+callbacks.save_tau.dirpath={taus}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ddp_root, taus, proc


def test_ddp_on_cpu_keeps_tau_identical_across_ranks_and_equal_to_one_process(uninterrupted_ddp, tmp_path):
    ddp_root, taus, proc = uninterrupted_ddp
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


def test_a_crashed_ddp_run_is_resumed_by_every_rank_exactly(uninterrupted_ddp, tmp_path):
    """Every rank crashes when epoch 1 starts; the relaunch (no ckpt_path) must resume on every rank
    from epoch 0's checkpoint, not only on rank 0 (which alone reads status.json): a rank that starts
    fresh trains a different number of epochs, with another optimizer state and trigger history."""
    root = tmp_path / "root"
    crash = ["+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart", "+callbacks.crash.epoch=1"]
    crashed = run_ddp_train([*COMMON, *DDP, "logger=none", f"paths.root_dir={root}", *crash], tmp_path)
    assert crashed.returncode != 0 and "simulated preemption at epoch 1" in crashed.stderr, crashed.stderr[-3000:]
    assert not list(root.glob("outputs/runs/**/bundle.pt"))

    taus = tmp_path / "taus"
    resumed = run_ddp_train([*COMMON, *DDP, "logger=none", f"paths.root_dir={root}",
                             "+callbacks.save_tau._target_=helpers_hydra.SaveTauPerRank",
                             f"+callbacks.save_tau.dirpath={taus}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "retrying as attempt 2" in resumed.stdout and "resuming from " in resumed.stdout

    (run_dir,) = {p.parent for p in root.glob("outputs/runs/**/bundle.pt")}
    straight_dir = next(p.parent for p in uninterrupted_ddp[0].glob("outputs/runs/**/bundle.pt"))
    assert run_dir.relative_to(root) == straight_dir.relative_to(uninterrupted_ddp[0])  # the same run
    straight, again = load_bundle(straight_dir / "bundle.pt"), load_bundle(run_dir / "bundle.pt")
    assert again.meta["trigger_updates"] == straight.meta["trigger_updates"]
    assert torch.allclose(again.trigger, straight.trigger, rtol=0, atol=1e-6)
    for (key, a), b in zip(straight.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), key
    # Both ranks ended with rank 0's tau and weights (each trained from the same checkpoint).
    rank0, rank1 = (torch.load(taus / f"tau_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0["tau"], rank1["tau"]) and torch.equal(rank0["tau"], again.trigger)
