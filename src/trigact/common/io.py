"""Atomic file writes (a crash mid-write never leaves a half-written file under the final name) and
folder locks (one writer at a time)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from trigact.common.errors import TrigactError


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty ``.<name>.<random>.tmp`` beside ``path``, opened for writing.

    Created with mode 0666 so that the kernel applies the umask (and a default ACL) as for any new
    file: ``tempfile.mkstemp`` makes 0600 files, which other users of a shared registry cannot read.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _atomic(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj, path) -> Path:
    return _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> Path:
    return _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj, path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_write_bytes(data: bytes, path) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_save_figure(fig, path, dpi: int = 120) -> Path:
    """A matplotlib Figure saved as PNG, atomically."""
    return _atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


@contextmanager
def folder_lock(folder, name: str = ".lock", *, waiting: str, failing: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<folder>/<name>`` (the folder is made): one writer of the folder,
    the others wait for it (``waiting`` is printed once when they do). ``failing`` starts the one-line
    error when the lock file cannot be made (a read-only output root).

    The kernel drops the lock when its holder dies, however it dies, so a killed writer never leaves the
    folder locked. (flock works across nodes on NFSv4 and Lustre with ``flock`` mounts.)
    """
    import fcntl

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / name, "a+")
    except OSError as err:
        raise TrigactError(f"{failing}: {err.strerror or type(err).__name__} (read-only output root?)") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the flock


def tree_sha256(obj) -> str:
    """sha256 of a nested structure of dicts, lists, tuples, tensors and plain values.

    Tensors count by dtype, shape and bytes; dicts in their order (which saving and loading keep). It
    is a checksum of what a file holds, for data that carries its own digest (bundles, checkpoints).
    """
    digest = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {t.dtype} {tuple(x.shape)}:".encode())
            digest.update(t.view(torch.uint8).numpy())
        elif isinstance(x, Mapping):
            digest.update(f"dict {len(x)}:".encode())
            for key, value in x.items():
                feed(key)
                feed(value)
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__} {len(x)}:".encode())
            for value in x:
                feed(value)
        else:
            digest.update(f"{type(x).__name__} {x!r};".encode())

    feed(obj)
    return digest.hexdigest()
