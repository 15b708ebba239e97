"""Durable file operations: never a partial file under a final name.

Write ``NAME.part``, fsync, rename, fsync the folder. Light on imports, so
transports and the sync cycle can use it without loading the crypto stack.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

COPY_CHUNK = 1 << 20


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(part: Path, final: Path) -> None:
    """Rename a complete, fsynced ``.part`` file into place, durably."""
    os.replace(part, final)
    fsync_dir(final.parent)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` via ``path.part``, fsync, rename: never a partial visible file."""
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        part.unlink(missing_ok=True)  # a partial .part holds space (a full disk) and serves no one
        raise
    publish(part, path)
