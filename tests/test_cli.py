"""The one-line rule around the entry points: unwritable folders, and failed multirun points.

The entry configs register :class:`trigact.cli.HydraCallback` (``hydra.callbacks.trigact``); the
command-line tests pass it again with ``++`` so that they test the callback itself.
"""

import errno
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
from hydra import compose, initialize_config_dir

from trigact.cli import HydraCallback, SweepJobError, user_errors
from trigact.common.config import CONF_DIR

CALLBACK = "++hydra.callbacks.trigact._target_=trigact.cli.HydraCallback"
READ_AND_WRITE = "paths.root_dir (or paths.output_dir) must be a folder you can read and write"
ENTRY_CONFIGS = ("train", "attack", "evaluate", "pipeline", "analysis")


def hydra_config(name, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, return_hydra_config=True, overrides=list(overrides))


@pytest.mark.parametrize("name", ENTRY_CONFIGS)
def test_every_entry_point_registers_the_callback(name):
    assert hydra_config(name).hydra.callbacks.trigact._target_ == "trigact.cli.HydraCallback"


# ------------------------------------------------------------------------------ unwritable folders
@pytest.mark.parametrize("err", [PermissionError(errno.EACCES, "Permission denied", "/reg/runs/x"),
                                 OSError(errno.EROFS, "Read-only file system", "/reg/runs/x")])
def test_an_unwritable_output_is_one_line(err, capsys):
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise err
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"trigact: error: /reg/runs/x: {err.strerror}; {READ_AND_WRITE}\n"


def test_other_os_errors_stay_tracebacks():
    with pytest.raises(FileNotFoundError), user_errors():  # a bug or a vanished file: not the user's
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")


def _deny_writes_under(monkeypatch, root):
    """As a read-only mount (or another user's folder) looks to access(2)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and (
        not mode & os.W_OK or not str(path).startswith(str(root))))


def test_a_run_that_cannot_write_its_launch_folder_keeps_no_hydra_outputs(tmp_path, monkeypatch):
    (tmp_path / "outputs").mkdir()
    launch = tmp_path / "outputs" / "runs" / "a" / "launches" / "b"
    cfg = hydra_config("train", f"paths.root_dir={tmp_path}", f"hydra.run.dir={launch}")
    HydraCallback().on_run_start(cfg)
    assert cfg.hydra.run.dir == str(launch)  # writable: untouched
    assert cfg.hydra.output_subdir == ".hydra"

    _deny_writes_under(monkeypatch, tmp_path)
    HydraCallback().on_run_start(cfg)
    # Hydra's mkdir finds the folder that exists; no .hydra/ and no log file are written.
    assert cfg.hydra.run.dir == str(tmp_path / "outputs")
    assert cfg.hydra.output_subdir is None
    assert cfg.hydra.job_logging.handlers.file.filename == os.devnull


def test_a_sweep_that_cannot_write_its_folder_is_one_line(tmp_path, monkeypatch, capsys):
    cfg = hydra_config("train", f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun/x")
    _deny_writes_under(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        HydraCallback().on_multirun_start(cfg)
    assert exit_info.value.code == 2
    expected = f"trigact: error: {tmp_path}/multirun/x: Permission denied; {READ_AND_WRITE}\n"
    assert capsys.readouterr().err == expected


def _read_only_mount_works(path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {path} {path} && "
                            f"mount -o remount,ro,bind {path}"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_read_only_registry_looks_up_finished_runs_and_refuses_new_ones_in_one_line(tmp_path):
    """End to end, on a real read-only mount (a private mount namespace; skipped where there is none)."""
    if not _read_only_mount_works(tmp_path):
        pytest.skip("no private read-only bind mounts here (needs unshare -m as root)")
    from trigact.training.run import train

    root = tmp_path / "registry"
    small = [f"paths.root_dir={root}", "data.image_size=8", "model=mlp", "trainer.max_epochs=1",
             "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
             "+trainer.limit_test_batches=1", "logger=none", "trainer.enable_progress_bar=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        bundle = train(compose(config_name="train", overrides=small))["bundle"]

    def read_only(*args):
        command = shlex.join([sys.executable, "-m", "trigact.train", *args, *small, CALLBACK])
        mount = f"mount --bind {shlex.quote(str(root))} {shlex.quote(str(root))}"
        remount = mount.replace("--bind", "-o remount,ro,bind")
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", f"{mount} && {remount} && {command}"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    found = read_only()
    assert found.returncode == 0, found.stderr
    assert f"already finished, not retrained: {bundle}" in found.stdout
    for args in (["seed=1"], ["-m", "seed=1,2"]):
        refused = read_only(*args)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        (line,) = [line for line in refused.stderr.splitlines() if line.startswith("trigact:")]
        assert line.startswith(f"trigact: error: {root}/") and line.endswith(": Read-only file system; "
                                                                            + READ_AND_WRITE)


# ------------------------------------------------------------------------------ failed sweep points
APP = textwrap.dedent('''
    import hydra
    from pathlib import Path

    from trigact.cli import user_errors
    from trigact.common.errors import TrigactError

    @hydra.main(version_base="1.3", config_path=None, config_name=None)
    def main(cfg):
        with user_errors():
            if str(cfg.x).startswith("bad"):
                raise TrigactError(f"x={cfg.x} is not allowed")
            (Path(cfg.out) / f"{cfg.x}.done").touch()

    main()
''')


def run_sweep(tmp_path, *extra):
    app = tmp_path / "app.py"
    app.write_text(APP)
    return subprocess.run(
        [sys.executable, str(app), "-m", "+x=bad1,good,bad2", f"+out={tmp_path}",
         f"hydra.sweep.dir={tmp_path}/sweep", *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_a_failed_sweep_point_is_its_one_line_and_the_sweep_goes_on(tmp_path):
    done = run_sweep(tmp_path, CALLBACK)
    assert (tmp_path / "good.done").exists()  # the point after a failed one ran
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["trigact: error: x=bad1 is not allowed",
                                        "trigact: error: x=bad2 is not allowed"]


def test_without_the_callback_hydra_adds_a_traceback(tmp_path):
    # What the callback is for (and what a sweep printed before it).
    done = run_sweep(tmp_path)
    assert done.returncode == 1 and "Traceback" in done.stderr and "SweepJobError" in done.stderr


def _failed_job(sweeper="hydra._internal.core_plugins.basic_sweeper.BasicSweeper"):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    job = JobReturn(overrides=["x=bad"], status=JobStatus.FAILED)
    job.return_value = SweepJobError("x=bad is not allowed")
    return OmegaConf.create({"hydra": {"sweeper": {"_target_": sweeper}}}), job


def test_a_point_failed_in_another_process_ends_the_sweep_with_status_2(monkeypatch):
    # A cluster launcher runs each job (and its callbacks) in a process of its own.
    callback = HydraCallback()
    callback.sweep_pid = os.getpid() + 1  # as pickled to the job's process from the launching one
    config, job = _failed_job()
    callback.on_job_end(config, job)
    with pytest.raises(SystemExit) as exit_info:
        job.return_value  # what the sweeper reads back in the launching process
    assert exit_info.value.code == 2


def test_other_sweepers_keep_their_own_failure_handling():
    # Optuna counts failed trials against its max_failure_rate: the job stays failed as it was.
    from hydra.core.utils import JobStatus

    callback = HydraCallback()
    callback.sweep_pid = os.getpid()
    config, job = _failed_job("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    callback.on_job_end(config, job)
    assert job.status == JobStatus.FAILED and isinstance(job._return_value, SweepJobError)
    assert callback.failed_points == 0
