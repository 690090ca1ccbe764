"""Atomic writes: files come out with the mode any other new file gets, and a failed write leaves none."""

import os
import stat

import pytest

from trigact.common.io import (
    _atomic,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    written = [
        atomic_write_text("x", tmp_path / "table.md"),
        atomic_write_json({"a": 1}, tmp_path / "meta.json"),
        atomic_write_bytes(b"\0", tmp_path / "bank.bin"),
        atomic_torch_save({"w": 1}, tmp_path / "bundle.pt"),
    ]
    for path in written:
        assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(mode), path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = atomic_write_text("old", tmp_path / "table.md")

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
