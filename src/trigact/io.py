"""Atomic file writes: a crash mid-write never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def _atomic(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
