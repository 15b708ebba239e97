"""Durable file operations: never a partial file under a final name.

Write ``NAME.part``, fsync, rename, fsync the folder. Light on imports, so
transports and the sync cycle can use it without loading the crypto stack.

Every folder `exchange` works in may hold what someone else planted there (a
store writes the drop folder, the stick and its SFTP account), so nothing here
follows a symbolic link or opens anything but a regular file: a name is
checked with ``lstat`` before it is opened, opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` (a FIFO cannot block the open), and checked again with
``fstat`` on the open descriptor (nothing swapped in between). A ``.part`` is
always created fresh with ``O_CREAT | O_EXCL``, never opened through
whatever sat at its name.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from exchange.errors import NotRegularFileError

COPY_CHUNK = 1 << 20
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the OS has none (Windows: no symlinks planted by peers)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- regular files only

def kind_of(mode: int) -> str:
    """What an entry is, in words an operator reads in an error."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def refuse(path: Path, mode: int) -> NotRegularFileError:
    """The error for ``path`` being a link, folder, FIFO, socket or device (never opened)."""
    return NotRegularFileError(f"{path.name} in {path.parent} is {kind_of(mode)}, not a regular file: "
                               "refused, not opened or followed")


def is_regular_entry(path: Path) -> bool:
    """Is the entry itself (not what a link points to) a regular file? False when missing."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_regular(path: Path) -> os.stat_result:
    """``lstat`` of ``path``; NotRegularFileError unless it is a regular file (OSError if missing)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise refuse(path, st.st_mode)
    return st


def is_real_dir(path: Path) -> bool:
    """A folder itself, not a link to one (False when missing)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _clear_nonblock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: O_NONBLOCK was never set
        return
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~O_NONBLOCK)


def open_regular(path: Path, mode: Literal["rb", "r+b"] = "rb") -> BinaryIO:
    """Open an existing regular file without following a link or blocking on a FIFO.

    ``lstat`` first, so a device or FIFO is never opened at all; then
    ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat`` on the descriptor, so an entry
    swapped in between is refused too. NotRegularFileError for anything but a
    regular file; OSError (FileNotFoundError...) as ``open`` raises it.
    """
    check_regular(path)
    try:  # open() with an opener: the file object keeps its path as its name, for messages
        f: BinaryIO = open(path, mode, opener=lambda p, fl: os.open(p, fl | O_NOFOLLOW | O_NONBLOCK))
    except OSError as exc:
        st = _lstat_or_none(path)
        if st is not None and not stat.S_ISREG(st.st_mode):  # ELOOP: a link swapped in meanwhile
            raise refuse(path, st.st_mode) from exc
        raise
    try:
        st_fd = os.fstat(f.fileno())
        if not stat.S_ISREG(st_fd.st_mode):
            raise refuse(path, st_fd.st_mode)
        _clear_nonblock(f.fileno())
    except BaseException:
        f.close()
        raise
    return f


def read_regular(path: Path, limit: int) -> bytes:
    """The whole of a small regular file; NotRegularFileError, or ValueError when over ``limit`` bytes."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is over {limit} bytes")
    return data


def _lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def clear_entry(path: Path) -> None:
    """Remove whatever non-folder entry sits at ``path`` (the link itself, never its target).

    NotRegularFileError for a folder: it is left alone.
    """
    st = _lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise refuse(path, st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        log.warning("%s in %s was %s; removed the entry (what it points to is untouched)",
                    path.name, path.parent, kind_of(st.st_mode))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def create_fresh(path: Path, mode: int = 0o666) -> BinaryIO:
    """A new, empty file at ``path`` for writing (``O_CREAT | O_EXCL | O_NOFOLLOW``).

    Whatever already sits at that name (a stale copy, a planted link or FIFO)
    is removed first, never opened or written through; a folder there is
    refused (NotRegularFileError).
    """
    for _ in range(3):  # bounded: someone racing us for the name only costs a refusal
        clear_entry(path)
        try:  # "x": O_CREAT | O_EXCL, which never follows a link at the name
            f: BinaryIO = open(path, "xb", opener=lambda p, fl: os.open(p, fl | O_NOFOLLOW, mode))
        except FileExistsError:
            continue
        return f
    raise FileExistsError(f"{path} keeps reappearing; not written")


def move_entry(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` without opening either (a link moves as a link).

    Across file systems a regular file is copied fresh (``create_fresh``) and
    the source removed; anything else is refused rather than copied.
    """
    try:
        os.replace(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    part = dst.with_name(dst.name + ".part")
    with open_regular(src) as fi, create_fresh(part) as fo:
        while chunk := fi.read(COPY_CHUNK):
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    publish(part, dst)
    os.unlink(src)


def free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``name.1``, ``name.2``... : the first name no entry (not even a dangling link) holds."""
    target, n = folder / name, 1
    while os.path.lexists(target):
        target, n = folder / f"{name}.{n}", n + 1
    return target


# ---------------------------------------------------------------- durable writes


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
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


def publish_all(moves: list[tuple[Path, Path]]) -> None:
    """:func:`publish` for several files of one folder: one fsync of the folder for all of them."""
    for part, final in moves:
        os.replace(part, final)
    for folder in sorted({final.parent for _part, final in moves}):
        fsync_dir(folder)


def fsync_all(paths: list[Path]) -> None:
    """fsync each file, several at once (threads: the waits overlap, and the file system
    can commit them in one journal transaction, where one after another waits for each)."""
    from concurrent.futures import ThreadPoolExecutor

    def sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if len(paths) <= 1:
        for path in paths:
            sync(path)
        return
    with ThreadPoolExecutor(max_workers=min(8, len(paths)), thread_name_prefix="fsync") as pool:
        list(pool.map(sync, paths))  # (an error is raised here, after every fsync has run)


def _exact_mode(f: BinaryIO, mode: int | None) -> None:
    """Give a file just created ``mode`` whatever the umask (POSIX; Windows keeps its ACLs)."""
    if mode is not None and hasattr(os, "fchmod"):
        os.fchmod(f.fileno(), mode)


def _write_durably(f: BinaryIO, path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``f`` at ``path`` and fsync it; a partial file is removed."""
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        if is_regular_entry(path):
            path.unlink(missing_ok=True)  # a partial file holds space (a full disk) and serves no one
        raise


def write_file_atomic(path: Path, data: bytes, *, mode: int | None = None, sync_dir: bool = True) -> None:
    """Write ``path`` via ``path.part``, fsync, rename, fsync the folder: never a partial visible file.

    The one durable write of every file ``exchange`` keeps (bundles' metadata, acks,
    the configuration, the trust store, known hosts, transfer metadata). ``mode``
    (0600 for a private file, exchange.node.perms) is set exactly, whatever the umask.
    ``sync_dir`` false leaves the folder's fsync to the caller, who syncs it once for a
    batch of files (the file's content is fsynced before its rename either way).
    """
    part = path.with_name(path.name + ".part")
    f = create_fresh(part, 0o666 if mode is None else mode)
    _exact_mode(f, mode)
    _write_durably(f, part, data)
    if sync_dir:
        publish(part, path)
    else:
        os.replace(part, path)


def create_file(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Create ``path`` with ``data``, durably, refusing to overwrite anything there (FileExistsError).

    For what must never be replaced by accident (keys, a new database): ``O_EXCL``
    also refuses a link or FIFO planted at the name instead of writing through it.
    """
    f: BinaryIO = open(path, "xb", opener=lambda p, fl: os.open(p, fl | O_NOFOLLOW,
                                                                 0o666 if mode is None else mode))
    try:
        _exact_mode(f, mode)
    except BaseException:
        f.close()
        path.unlink(missing_ok=True)
        raise
    _write_durably(f, path, data)
    fsync_dir(path.parent)
