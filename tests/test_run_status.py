"""Multirun hygiene: one writer per run folder, crashed runs visible and retried, sweeps that share
a registry reuse each other's finished runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_hydra import QUIET, SimulatedPreemption, compose_config
from trigact.runs.status import RunAttempt, RunLocked, read_status
from trigact.training.run import train

TINY = ["data=digits", "data.image_size=8", "model=mlp", "trigger=fixed", "trigger.eps=32/255",
        "trainer.max_epochs=3", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", *QUIET]


def test_a_crashed_run_is_marked_crashed_and_the_next_launch_resumes_it(tmp_path, capsys):
    crash = compose_config("train", [*TINY, "+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart",
                                     "+callbacks.crash.epoch=2"], tmp_path)
    run_dir = Path(crash.paths.run_dir)
    with pytest.raises(SimulatedPreemption):
        train(crash)
    status = read_status(run_dir)
    assert status["state"] == "crashed" and status["attempt"] == 1
    assert status["error"] == "SimulatedPreemption: simulated preemption at epoch 2"
    assert status["pid"] == os.getpid() and status["ended"] >= status["started"]

    capsys.readouterr()
    summary = train(compose_config("train", TINY, tmp_path))  # the same run, launched again
    out = capsys.readouterr().out
    assert "attempt 1 of this run crashed (SimulatedPreemption: simulated preemption at epoch 2); " \
           "retrying as attempt 2" in out
    assert "Restoring states from the checkpoint" in out or "Restored all states" in out or summary["skipped"] is False
    status = read_status(run_dir)
    assert status["state"] == "finished" and status["attempt"] == 2 and status["metrics"] == {
        k: v for k, v in summary.items() if k.startswith("test_")}
    history = json.loads((run_dir / "summary.json").read_text())
    assert history["metrics"] == status["metrics"]


def test_the_retry_resumes_from_the_checkpoint_rather_than_starting_over(tmp_path, capsys):
    """Equal to an uninterrupted run (exact resume), which a fresh restart would also be; so check
    the resume itself: the retried attempt trains only the last epoch."""
    crash = compose_config("train", [*TINY, "+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart",
                                     "+callbacks.crash.epoch=2"], tmp_path)
    with pytest.raises(SimulatedPreemption):
        train(crash)
    count = compose_config("train", [*TINY, "+callbacks.count._target_=helpers_hydra.CountEpochs"], tmp_path)
    train(count)
    assert json.loads((Path(count.paths.run_dir) / "epochs_trained.json").read_text()) == [2]


def test_a_killed_attempt_is_reported_as_lost(tmp_path, capsys):
    cfg = compose_config("train", TINY, tmp_path)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "attempt": 3, "pid": 999999}))
    train(cfg)
    assert "attempt 3 of this run was killed or lost (it never recorded an end); retrying as attempt 4" in \
        capsys.readouterr().out
    assert read_status(run_dir)["state"] == "finished"


def test_a_run_being_trained_elsewhere_is_not_touched(tmp_path):
    cfg = compose_config("train", TINY, tmp_path)
    run_dir = Path(cfg.paths.run_dir)
    with RunAttempt(run_dir, launch_dir="elsewhere"):
        status = (run_dir / "status.json").read_text()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on .* not touching it"):
            train(cfg)
        proc = subprocess.run([sys.executable, "-m", "trigact.train", *TINY, f"paths.root_dir={tmp_path}"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "skipped: run " in proc.stdout and "is being trained by another process" in proc.stdout
        # Nothing of the run's was written (Hydra's own launch log folder aside).
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "launches", "status.json"]
        assert (run_dir / "status.json").read_text() == status
    assert not (run_dir / "bundle.pt").exists()


def test_an_unreadable_status_is_kept_aside_and_the_crashed_run_still_resumed(tmp_path, capsys):
    """A damaged status.json used to count as no status: attempt 1 again, and a fresh start over the
    crashed attempt's checkpoints."""
    crash = compose_config("train", [*TINY, "+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart",
                                     "+callbacks.crash.epoch=2"], tmp_path)
    run_dir = Path(crash.paths.run_dir)
    with pytest.raises(SimulatedPreemption):
        train(crash)
    damaged = (run_dir / "status.json").read_bytes()[:40]  # cut mid-way, as by a full disk
    assert b'"attempt": 1' in damaged
    (run_dir / "status.json").write_bytes(damaged)

    capsys.readouterr()
    count = compose_config("train", [*TINY, "+callbacks.count._target_=helpers_hydra.CountEpochs"], tmp_path)
    train(count)
    (kept,) = run_dir.glob("status.json.corrupt-*")
    assert kept.read_bytes() == damaged
    assert f"status.json of this run was unreadable (kept as {kept.name}); taking its last attempt as crashed; " \
           "retrying as attempt 2" in capsys.readouterr().out
    assert json.loads((run_dir / "epochs_trained.json").read_text()) == [2]  # resumed, not restarted
    status = read_status(run_dir)
    assert status["state"] == "finished" and status["attempt"] == 2


def test_status_without_a_readable_attempt_counts_as_one_unknown_attempt(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_bytes(b"\x00garbage")
    with RunAttempt(run_dir) as attempt:
        assert attempt.previous["state"] == "unreadable" and attempt.status["attempt"] == 2
        assert attempt.retry_note().startswith("status.json of this run was unreadable (kept as status.json.corrupt-")
    assert read_status(run_dir)["attempt"] == 2


def test_a_rejected_first_attempt_leaves_no_folder_and_a_later_one_takes_a_fresh_lock(tmp_path, monkeypatch):
    """Bad input before training: no "crashed" run is left. The lock file is unlinked while held, so
    a launch whose flock landed on the unlinked file must not count it as the run's lock."""
    import fcntl

    from trigact.common.errors import TrigactError

    run_dir = tmp_path / "run"
    with pytest.raises(TrigactError):
        with RunAttempt(run_dir):
            raise TrigactError("trigger.eps=-1 must be > 0")
    assert list(run_dir.iterdir()) == []

    # The race: this launch opened .lock, the rejected attempt unlinked it, then this flock succeeded.
    real_flock, unlinked = fcntl.flock, []

    def flock_then_unlink(fd, op):
        real_flock(fd, op)
        if not unlinked:
            unlinked.append(fd)
            (run_dir / ".lock").unlink()

    monkeypatch.setattr(fcntl, "flock", flock_then_unlink)
    with RunAttempt(run_dir) as attempt:
        assert unlinked and os.fstat(attempt._lock.fileno()).st_ino == os.stat(run_dir / ".lock").st_ino

    # A first attempt that fails otherwise (not bad input) is kept, as crashed.
    other = tmp_path / "other"
    with pytest.raises(SimulatedPreemption):
        with RunAttempt(other):
            raise SimulatedPreemption("simulated preemption at epoch 0")
    assert read_status(other)["state"] == "crashed"


@pytest.mark.slow
def test_two_sweeps_sharing_a_registry_reuse_the_shared_point(tmp_path):
    def sweep(points):
        return subprocess.run([sys.executable, "-m", "trigact.train", "-m", *TINY, f"paths.root_dir={tmp_path}",
                               f"trigger.eps={points}"], capture_output=True, text=True, cwd=tmp_path, timeout=600)

    first, second = sweep("16/255,32/255"), sweep("32/255,64/255")
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("already finished, not retrained") == 1
    runs = sorted(p.parent.parent.name for p in (tmp_path / "outputs" / "runs").rglob("bundle.pt"))
    assert [r.split("-")[1] for r in runs] == ["eps16", "eps32", "eps64"]
    assert all(read_status(p.parent)["attempt"] == 1 for p in (tmp_path / "outputs" / "runs").rglob("bundle.pt"))
