"""Who is training a run folder, and how its earlier attempts ended: ``status.json`` and a lock.

Two launches that name the same run (two sweeps sharing a registry, a requeued job whose old
allocation still runs) must not write into one folder at once. Rank 0 holds an exclusive
``flock`` on ``<run>/.lock`` while it trains: the kernel drops it when the process dies, however it
dies, so a crash never leaves the run locked. (flock works across nodes on NFSv4 and Lustre with
``flock`` mounts; on file systems without it, a second writer is not detected.)

``status.json`` says what happened: ``running`` (with host, pid, attempt, start), ``crashed``
(with the error) or ``finished``. A run whose last attempt crashed or was killed is retried by the
next launch, resuming from its last checkpoint. An unreadable ``status.json`` is kept beside it as
``status.json.corrupt-<time>`` and its attempt taken as crashed, so the retry still resumes and the
attempt count goes on (from the number the damaged file still shows, if any).

A first attempt rejected for bad input before it trained leaves nothing: its ``status.json`` and
lock file are removed, so the registry shows no "crashed" run that never was.
"""

from __future__ import annotations

import json
import os
import re
import socket
import traceback
from datetime import datetime, timezone
from pathlib import Path

from trigact.common.errors import TrigactError
from trigact.common.io import atomic_write_json

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"
UNREADABLE = "unreadable"  # the state given to a status.json that could not be parsed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _parse_status(raw: bytes) -> dict | None:
    """The status in ``raw``, or None when it is not a JSON object with an integer attempt."""
    try:
        status = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    attempt = status.get("attempt") if isinstance(status, dict) else None
    return status if isinstance(attempt, int) and not isinstance(attempt, bool) else None


def read_status(run_dir) -> dict | None:
    """The run's status; None when there is none, or when it is unreadable."""
    try:
        return _parse_status((Path(run_dir) / STATUS_FILE).read_bytes())
    except FileNotFoundError:
        return None


def is_bad_input(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was caused by, bad user input: a :class:`TrigactError` or a mandatory
    ``???`` config value left unset (what the entry points print as one line). Hydra's instantiate
    wraps a constructor's error in its own exception, hence the walk along the causes."""
    from omegaconf.errors import MissingMandatoryValue

    while exc is not None and not isinstance(exc, (TrigactError, MissingMandatoryValue)):
        exc = exc.__cause__
    return exc is not None


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
        self.trained = False  # set by the caller once Trainer.fit returned: a failure after it is kept
        self._lock = None

    def _take_lock(self) -> None:
        import fcntl

        while True:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                lock = open(self.run_dir / LOCK_FILE, "a+")
            except FileNotFoundError:  # a rejected attempt just removed the (empty) run folder
                continue
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                holder = read_status(self.run_dir) or {}
                raise RunLocked(
                    f"run {self.run_dir} is being trained by another process (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} since {holder.get('started', '?')}); not touching it"
                ) from None
            # A rejected attempt unlinks the lock file it holds (see __exit__); a lock taken on the
            # unlinked file would not exclude a process that opens the path later, so take it again.
            try:
                current = os.stat(self.run_dir / LOCK_FILE).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self._lock = lock
                return
            lock.close()

    def _read_previous(self) -> dict | None:
        """The status the last attempt left; an unreadable one is kept aside and taken as a crash."""
        path = self.run_dir / STATUS_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        status = _parse_status(raw)
        if status is not None:
            return status
        kept = path.with_name(f"{STATUS_FILE}.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
        os.replace(path, kept)
        # The attempt number usually survives a partly damaged file; if not, count at least one.
        seen = [int(n) for n in re.findall(rb'"attempt"\s*:\s*(\d+)', raw)]
        return {"state": UNREADABLE, "attempt": max(seen, default=1), "kept_as": kept.name}

    def __enter__(self) -> "RunAttempt":
        self._take_lock()
        try:
            self.previous = self._read_previous()
            attempt = (self.previous or {}).get("attempt", 0) + 1
            self.status = {"state": "running", "attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": _now(), "launch_dir": self.launch_dir}
            atomic_write_json(self.status, self.run_dir / STATUS_FILE)
        except BaseException:
            self._lock.close()  # __exit__ does not run when __enter__ fails
            raise
        return self

    def retry_note(self) -> str | None:
        """What the last attempt left, when it did not finish (a crash, or a killed process)."""
        prev = self.previous
        if not prev or prev.get("state") == "finished":
            return None
        if prev.get("state") == UNREADABLE:
            return (f"status.json of this run was unreadable (kept as {prev['kept_as']}); taking its last attempt "
                    f"as crashed; retrying as attempt {self.status['attempt']}")
        how = f"crashed ({prev.get('error', 'unknown error')})" if prev.get("state") == "crashed" else \
            "was killed or lost (it never recorded an end)"
        return f"attempt {prev.get('attempt', '?')} of this run {how}; retrying as attempt {self.status['attempt']}"

    def finished(self, metrics: dict) -> None:
        self.status.update(state="finished", ended=_now(), metrics=metrics)
        atomic_write_json(self.status, self.run_dir / STATUS_FILE)

    def _rejected_first_attempt(self, exc) -> bool:
        """Bad input ended the run's first attempt before it trained, and it left nothing but bookkeeping."""
        if not is_bad_input(exc) or self.previous is not None or self.trained:
            return False
        return {p.name for p in self.run_dir.iterdir()} <= {LOCK_FILE, STATUS_FILE, "launches"}

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._rejected_first_attempt(exc):
                # Still holding the lock: a process that opened the lock file meanwhile sees it
                # unlinked once it gets the lock, and takes a new one (_take_lock).
                (self.run_dir / STATUS_FILE).unlink(missing_ok=True)
                (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            elif exc is not None and self.status.get("state") == "running":
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
