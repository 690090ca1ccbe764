"""The entry points' bodies (``trigact.cli.train``, ``attack``, ``evaluate``, ``pipeline``, ``analysis``;
``python -m trigact.<name>`` runs them) and what they share: one-line errors for bad input, and quiet
third-party logging.

:class:`HydraCallback` (``hydra.callbacks.trigact`` in every entry config) carries the same rule into
what Hydra does around our code: a sweep point that failed on bad input ends in its one line, and an
output root that cannot be written gives one line, not Hydra's traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue

from trigact.common.errors import TrigactError

# An output folder we may not write: the user's setup, not a bug, so one line rather than a traceback.
UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


@contextlib.contextmanager
def user_errors():
    """Turn a :class:`TrigactError` (or a mandatory ``???`` config value left unset, or a folder that
    cannot be written) into ``trigact: error: <message>`` and exit status 2; in a multirun job, into
    that line and a failed job, so the sweep goes on with its other points."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- re-raised unless a TrigactError is behind it
        # Hydra's instantiate wraps a constructor's exception in InstantiationException.
        cause = err
        while cause is not None and not isinstance(cause, (TrigactError, MissingMandatoryValue, OSError)):
            cause = cause.__cause__
        if isinstance(cause, OSError) and cause.errno not in UNWRITABLE:
            cause = None
        if cause is None:
            raise
        if isinstance(cause, MissingMandatoryValue):  # a `???` in conf/ nobody set on the command line
            key = cause.full_key or str(cause).splitlines()[0]
            cause = f"{key} is required and was not given; set it on the command line ({key}=...)"
        elif isinstance(cause, OSError):
            cause = inaccessible(cause.filename, cause.strerror)
        print(f"trigact: error: {cause}", file=sys.stderr)
        if in_multirun():
            # Hydra runs the other jobs of a sweep (and Optuna the other trials) only when a job fails
            # with an Exception; SystemExit would end the whole sweep at the first bad point.
            raise SweepJobError(str(cause)) from None
        sys.exit(2)


def inaccessible(path, reason: str) -> str:
    """The one line for an output folder or file this user cannot use."""
    return f"{path}: {reason}; paths.root_dir (or paths.output_dir) must be a folder you can read and write"


class SweepJobError(TrigactError):
    """One job of a Hydra multirun failed on bad input (its one-line message is already printed)."""


def in_multirun() -> bool:
    """Whether this process is running a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def quiet_libraries() -> None:
    """Hide advice that does not apply to this project so the output a user reads is ours. (Lightning's
    "does not have many workers" advice is not hidden here: it is right for host loaders of image
    files; the in-memory datamodules silence it themselves, see TrigactDataModule._few_workers_advice.)"""
    for pattern in (
        ".*GPU available but not used.*",
        ".*is an invalid version and will not be supported.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------ Hydra's side
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _first_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def unwritable_folder(folder) -> str | None:
    """Why ``folder`` (existing or not) cannot be created and written, or None when it can.

    Asks the nearest existing folder above it (``access(2)`` sees read-only mounts and, for non-root
    users, permissions) without creating anything.
    """
    existing = _first_existing(Path(folder).absolute())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return os.strerror(errno.EROFS if _read_only_mount(existing) else errno.EACCES)
    return None


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class HydraCallback(Callback):
    """Hydra's work around our entry points, held to the one-line rule.

    - A single run whose ``hydra.run.dir`` cannot be written (a read-only registry, someone else's
      folder) keeps no Hydra log or ``.hydra/`` for this launch instead of failing before our code runs:
      looking up a finished run works, and a command that has to write ends in one line (see
      :func:`user_errors`).
    - A multirun whose ``hydra.sweep.dir`` cannot be written ends in one line: Hydra's launcher has to
      write ``multirun.yaml`` there.
    - A multirun job that failed on bad input (:class:`SweepJobError`, its line already printed) does
      not end in Hydra's traceback: the sweep runs its other points and then exits with status 2.
    """

    def __init__(self) -> None:
        self.failed_points = 0
        self.sweep_pid: int | None = None

    def on_run_start(self, config, **kwargs) -> None:
        reason = unwritable_folder(config.hydra.run.dir)
        if reason is None:
            return
        existing = _first_existing(Path(str(config.hydra.run.dir)).absolute())
        if not existing.is_dir():
            _exit_inaccessible(config.hydra.run.dir, reason)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = str(existing)  # exists already: Hydra's mkdir has nothing to do
            config.hydra.output_subdir = None  # no .hydra/
            handlers = (config.hydra.job_logging or {}).get("handlers") or {}
            for handler in handlers.values():
                if "filename" in handler:  # no log file
                    handler.filename = os.devnull

    def on_multirun_start(self, config, **kwargs) -> None:
        reason = unwritable_folder(config.hydra.sweep.dir)
        if reason is not None:
            _exit_inaccessible(config.hydra.sweep.dir, reason)
        self.sweep_pid = os.getpid()

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        # The dataclass field: the `return_value` property raises the job's exception.
        if job_return.status != JobStatus.FAILED or not isinstance(job_return._return_value, SweepJobError):
            return
        if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
            return  # e.g. Optuna counts failed trials against its own max_failure_rate: leave it
        if os.getpid() == self.sweep_pid:
            # Done: the sweeper sees a finished job and goes on; the count decides the exit status.
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = None
            self.failed_points += 1
        else:
            # A job launched in another process (a cluster launcher): the count would stay there, so
            # the sweeper, raising this where it reads the result, ends with status 2 and no traceback
            # (Hydra still names that job's overrides in one line first).
            job_return.return_value = SystemExit(2)

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.failed_points:
            sys.exit(2)


def _exit_inaccessible(folder, reason: str) -> None:
    print(f"trigact: error: {inaccessible(folder, reason)}", file=sys.stderr)
    sys.exit(2)
