"""Reader for the IDX format of (Fashion-)MNIST, gzipped or not.

Parsed here with numpy rather than through torchvision because the Debian package ships the files
gzipped in a flat read-only directory, a layout torchvision's FashionMNIST does not read. Format:
a big-endian magic 0x00000800 | ndim (0x08 = unsigned byte), then ndim big-endian uint32 sizes,
then the bytes in C order.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from trigact.common.errors import TrigactError

UBYTE_TYPE_CODE = 0x08


def read_idx_ubyte(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array stored in `path`; a corrupt or truncated file gives a TrigactError naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # bad gzip header, truncated gzip stream, unreadable file
        raise TrigactError(f"cannot read IDX file {str(path)!r}: {err}; delete it and get it again") from err

    header_len = 4 + 4 * ndim
    expected_magic = (UBYTE_TYPE_CODE << 8) | ndim
    if len(raw) < header_len:
        raise TrigactError(f"IDX file {str(path)!r} is truncated: {len(raw)} bytes, shorter than its header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise TrigactError(
            f"IDX file {str(path)!r} has magic 0x{magic:08x}, expected 0x{expected_magic:08x}; the file is corrupt"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_len + int(np.prod(shape))
    if len(raw) != expected_len:
        raise TrigactError(
            f"IDX file {str(path)!r} holds {len(raw)} bytes, expected {expected_len} for shape {shape}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()
