"""One SSH connection with its SFTP channel: the file operations the transport needs.

:class:`Session` is the contract and :class:`StockSession` its plain form,
built on paramiko's public API only: slower, never wrong. The fast path
(:mod:`exchange.transport.sftp.fastpath`) implements the same contract with
paramiko internals (pipelined requests, a faster receive buffer); the
transport uses it only when a check at first use finds every internal it needs.
"""

from __future__ import annotations

import io
import logging
import secrets
import socket
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import paramiko
from paramiko.buffered_pipe import PipeTimeout
from paramiko.sftp_attr import SFTPAttributes

from exchange.errors import NotRegularFileError, TransientTransportError, TransportError
from exchange.files import kind_of
from exchange.wire.formats import PART_SUFFIX

log = logging.getLogger(__name__)

STOCK_CHUNK = 1 << 20  # bytes handed to paramiko's file object per call on the stock path


class FileChanged(TransientTransportError):
    """A remote file's size is not what the listing said: it was replaced; list again."""


@dataclass
class Handle:
    """An open remote file; ``closed`` once its close request is on its way."""

    closed: bool = False


def not_regular(path: str, mode: int) -> NotRegularFileError:
    return NotRegularFileError(f"{path} on the server is {kind_of(mode)}, not a regular file: "
                               "refused, not read or followed")


class Session(ABC):
    """One SSH connection with its SFTP channel; what the transport asks of the server."""

    fast = False

    def __init__(self, client: paramiko.SSHClient, channel: paramiko.Channel,
                 sftp: paramiko.SFTPClient) -> None:
        self.client = client
        self.channel = channel
        self.sftp = sftp

    @classmethod
    def open_channel(cls, transport: paramiko.Transport, timeout: float) -> paramiko.Channel:
        """The session channel the SFTP subsystem will run on (paramiko's defaults)."""
        return transport.open_session(timeout=timeout)

    @classmethod
    def start(cls, client: paramiko.SSHClient, channel: paramiko.Channel) -> Session:
        """A session on ``channel`` once the ``sftp`` subsystem runs there."""
        return cls(client, channel, paramiko.SFTPClient(channel))

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return bool(transport and transport.is_active() and not self.channel.closed)

    def close(self) -> None:
        try:
            self.sftp.close()
        finally:
            self.client.close()

    def stat(self, path: str) -> SFTPAttributes | None:
        try:
            return self.sftp.stat(path)
        except FileNotFoundError:
            return None

    def lstat(self, path: str) -> SFTPAttributes | None:
        """The entry itself (a link is not followed); None when there is none."""
        try:
            return self.sftp.lstat(path)
        except FileNotFoundError:
            return None

    # -- what each implementation provides ----------------------------------------

    @abstractmethod
    def open_rw(self, path: str) -> Handle:
        """Open an existing file for reading and writing (PermissionError if not ours)."""

    @abstractmethod
    def fstat(self, h: Handle) -> SFTPAttributes:
        """The open file's attributes (a rename over its name cannot change them)."""

    @abstractmethod
    def open_regular(self, path: str) -> Handle:
        """Open ``path`` for reading only if it is a regular file; NotRegularFileError otherwise."""

    @abstractmethod
    def _create_excl(self, path: str) -> Handle:
        """Open ``path`` for writing with ``O_CREAT | O_EXCL``."""

    @abstractmethod
    def _close(self, h: Handle, wait: bool) -> None:
        """Send the close; with ``wait``, await and check its status."""

    @abstractmethod
    def _abandon(self, h: Handle) -> None:
        """Close ``h`` after a failure, without waiting or raising."""

    @abstractmethod
    def write_durably(self, h: Handle, local: IO[bytes], start: int, end: int,
                      step: Callable[[int], None]) -> None:
        """Write ``local[start:end]`` at the same offsets, ask the server to fsync, close ``h``."""

    @abstractmethod
    def read_into(self, h: Handle, start: int, end: int, sink: Callable[[bytes], None], *,
                  whole: bool = False) -> None:
        """Read ``[start, end)`` in order into ``sink``.

        ``end`` comes from a listing; with ``whole`` the file must also end
        there. A file that turns out longer or shorter was replaced meanwhile:
        FileChanged, and the caller lists again.
        """

    # -- built on those ---------------------------------------------------------------

    def size_of(self, h: Handle) -> int:
        """The size of the open file itself: a rename over its name cannot change it under us."""
        return self.fstat(h).st_size or 0

    def create_new(self, path: str) -> Handle | None:
        """A new empty file (``O_CREAT | O_EXCL``, never through a link); None if the name is taken."""
        try:
            return self._create_excl(path)
        except OSError as exc:
            if exc.errno is not None or isinstance(exc, (PipeTimeout, socket.timeout)) or not self.alive():
                raise  # missing folder, permission, a broken link: not "the name is taken"
            return None

    def create_fresh(self, path: str) -> tuple[str, Handle]:
        """A ``.part`` created fresh at ``path``: what sat there is removed (the entry, never what a
        link points to); if the name cannot be freed (a folder), a new unique temporary name."""
        h = self.create_new(path)
        if h is None:
            try:
                self.sftp.remove(path)
            except OSError as exc:
                log.debug("cannot remove %s: %s", path, exc)
            h = self.create_new(path)
        if h is None:
            taken, path = path, f"{path[:-len(PART_SUFFIX)]}.{secrets.token_hex(6)}{PART_SUFFIX}"
            log.warning("%s is taken on the server by something that cannot be removed; writing %s instead",
                        taken, path)
            h = self.create_new(path)
            if h is None:
                raise TransportError(f"cannot create a temporary file {path} on the server")
        return path, h

    @contextmanager
    def closing(self, h: Handle, wait: bool = True) -> Iterator[Handle]:
        """Close ``h``; with ``wait``, check the status.

        Without ``wait`` (a file only read), the reply need not be awaited: one round trip less.
        """
        try:
            yield h
        except BaseException:
            if not h.closed and self.alive():
                h.closed = True
                self._abandon(h)
            raise
        if not h.closed:
            h.closed = True
            self._close(h, wait)

    def read_bytes(self, h: Handle, start: int, end: int) -> bytes:
        parts: list[bytes] = []
        self.read_into(h, start, end, parts.append)
        return b"".join(parts)

    def put_bytes(self, path: str, data: bytes) -> str:
        """A small file, created fresh, written and synced; returns the name written
        (``path`` unless a folder holds it). No rename: callers do it."""
        path, h = self.create_fresh(path)
        with self.closing(h):
            self.write_durably(h, io.BytesIO(data), 0, len(data), lambda n: None)
        return path


@dataclass
class FileHandle(Handle):
    """A remote file opened through paramiko's public ``SFTPFile``."""

    file: paramiko.SFTPFile | None = None

    @property
    def f(self) -> paramiko.SFTPFile:
        assert self.file is not None
        return self.file


class StockSession(Session):
    """The session on paramiko's public API: one request at a time, never a private name.

    What it gives up: paramiko has no public call for ``fsync@openssh.com``,
    so the server is not asked to fsync before the rename (the receiver still
    verifies every bundle end to end); and ``open_regular`` ``lstat``-s, opens,
    then compares the open file's ``fstat``, one round trip each.
    """

    _warned = False

    @staticmethod
    def _fh(h: Handle) -> paramiko.SFTPFile:
        assert isinstance(h, FileHandle)
        return h.f

    def open_rw(self, path: str) -> Handle:
        return FileHandle(file=self.sftp.open(path, "r+b"))

    def fstat(self, h: Handle) -> SFTPAttributes:
        return self._fh(h).stat()

    def open_regular(self, path: str) -> Handle:
        before = self.sftp.lstat(path)  # FileNotFoundError when gone
        mode = before.st_mode or 0
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        h = FileHandle(file=self.sftp.open(path, "rb"))
        try:
            after = self.fstat(h)
        except BaseException:
            self._abandon(h)
            raise
        if (after.st_mode, after.st_uid, after.st_gid, after.st_size, after.st_mtime) != \
                (before.st_mode, before.st_uid, before.st_gid, before.st_size, before.st_mtime):
            self._abandon(h)
            raise NotRegularFileError(f"{path} on the server changed between its lstat and its open: "
                                      "refused, not read")
        return h

    def _create_excl(self, path: str) -> Handle:
        f = self.sftp.open(path, "wxb")
        f.set_pipelined(True)
        return FileHandle(file=f)

    def _close(self, h: Handle, wait: bool) -> None:
        self._fh(h).close()

    def _abandon(self, h: Handle) -> None:
        try:
            self._fh(h).close()
        except Exception as exc:  # after a failure already being raised: nothing to add
            log.debug("closing after a failure: %s", exc)

    def write_durably(self, h: Handle, local: IO[bytes], start: int, end: int,
                      step: Callable[[int], None]) -> None:
        f = self._fh(h)
        f.set_pipelined(True)
        local.seek(start)
        f.seek(start)
        offset = start
        while offset < end:
            data = local.read(min(STOCK_CHUNK, end - offset))
            if not data:
                raise TransportError(f"{getattr(local, 'name', 'the local file')} shrank while being sent")
            f.write(data)
            offset += len(data)
            step(offset)
        if not StockSession._warned:
            StockSession._warned = True
            log.warning("stock paramiko SFTP: the server is not asked to fsync (no public call for it)")
        h.closed = True
        f.close()  # collects the pipelined writes' replies: a failed write raises here

    def read_into(self, h: Handle, start: int, end: int, sink: Callable[[bytes], None], *,
                  whole: bool = False) -> None:
        f = self._fh(h)
        f.seek(start)
        offset = start
        while offset < end:
            data = f.read(min(STOCK_CHUNK, end - offset))
            if not data:
                raise FileChanged(f"the remote file ended at byte {offset}, before the {end} bytes listed")
            sink(data)
            offset += len(data)
        if whole and f.read(1):
            raise FileChanged(f"the remote file is longer than the {end} bytes listed")
