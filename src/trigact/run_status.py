"""Who is training a run folder, and how its earlier attempts ended: ``status.json`` and a lock.

Two launches that name the same run (two sweeps sharing a registry, a requeued job whose old
allocation still runs) must not write into one folder at once. Rank 0 holds an exclusive
``flock`` on ``<run>/.lock`` while it trains: the kernel drops it when the process dies, however it
dies, so a crash never leaves the run locked. (flock works across nodes on NFSv4 and Lustre with
``flock`` mounts; on file systems without it, a second writer is not detected.)

``status.json`` says what happened: ``running`` (with host, pid, attempt, start), ``crashed``
(with the error) or ``finished``. A run whose last attempt crashed or was killed is retried by the
next launch, resuming from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import datetime, timezone
from pathlib import Path

from trigact.errors import TrigactError
from trigact.io import atomic_write_json

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_status(run_dir) -> dict | None:
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return status if isinstance(status, dict) else None


class RunLocked(TrigactError):
    """The run folder is locked by another live process."""


class RunAttempt:
    """``with RunAttempt(run_dir) as attempt:`` around one training attempt (rank 0 only).

    Entering takes the lock (a run being trained elsewhere is a one-line error) and records the
    attempt as running; leaving with an exception records it as crashed; :meth:`finished` records
    success. ``previous`` is the status left by the attempt before, if any.
    """

    def __init__(self, run_dir, launch_dir: str | None = None):
        self.run_dir = Path(run_dir)
        self.launch_dir = launch_dir
        self.previous: dict | None = None
        self.status: dict = {}
        self._lock = None

    def __enter__(self) -> "RunAttempt":
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            holder = read_status(self.run_dir) or {}
            raise RunLocked(
                f"run {self.run_dir} is being trained by another process (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} since {holder.get('started', '?')}); not touching it"
            ) from None
        self.previous = read_status(self.run_dir)
        attempt = int((self.previous or {}).get("attempt", 0)) + 1
        self.status = {"state": "running", "attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": _now(), "launch_dir": self.launch_dir}
        atomic_write_json(self.status, self.run_dir / STATUS_FILE)
        return self

    def retry_note(self) -> str | None:
        """What the last attempt left, when it did not finish (a crash, or a killed process)."""
        prev = self.previous
        if not prev or prev.get("state") == "finished":
            return None
        how = f"crashed ({prev.get('error', 'unknown error')})" if prev.get("state") == "crashed" else \
            "was killed or lost (it never recorded an end)"
        return f"attempt {prev.get('attempt', '?')} of this run {how}; retrying as attempt {self.status['attempt']}"

    def finished(self, metrics: dict) -> None:
        self.status.update(state="finished", ended=_now(), metrics=metrics)
        atomic_write_json(self.status, self.run_dir / STATUS_FILE)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and self.status.get("state") == "running":
                line = (str(exc).strip().splitlines() or [""])[0][:300]
                where = traceback.extract_tb(tb)[-1] if tb else None
                self.status.update(
                    state="crashed", ended=_now(), error=f"{type(exc).__name__}: {line}".rstrip(": "),
                    where=f"{where.filename}:{where.lineno}" if where else None,
                )
                atomic_write_json(self.status, self.run_dir / STATUS_FILE)
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock
