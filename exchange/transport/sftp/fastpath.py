"""The SFTP fast path: paramiko internals, used only when they are all there.

paramiko's stock SFTP file objects are far slower than OpenSSH. Measured on
loopback (tools/bench/sftp_throughput.py, docs/SFTP.md) the fixes are: the
server's own read/write limits (``limits@openssh.com``: 255 KiB instead of
32 KiB per request); a pipeline of requests kept in flight on this thread;
SFTP packet I/O that does not copy the unsent rest of a request after every
channel send; and a channel receive buffer that does not copy the whole
buffer on every read (paramiko's does, which is why a large window made
downloads collapse). It also opens a file in the same flight as its ``lstat``.

All of that leans on paramiko's private names. :func:`missing_internals`
lists those this paramiko lacks; the transport checks it at first use and
otherwise runs on :class:`~exchange.transport.sftp.session.StockSession`.
"""

from __future__ import annotations

import collections
import logging
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, cast

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.sftp import (
    CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_FSTAT, CMD_HANDLE, CMD_LSTAT,
    CMD_OPEN, CMD_READ, CMD_STATUS, CMD_WRITE, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_READ,
    SFTP_FLAG_WRITE, int64,
)
from paramiko.sftp_attr import SFTPAttributes

from exchange.errors import TransportError
from exchange.transport.sftp.session import FileChanged, Handle, Session, not_regular

log = logging.getLogger(__name__)

WINDOW = 8 << 20                # our receive window; safe only with ChunkPipe below
MAX_PACKET = 128 << 10          # largest SSH packet the server may send us: 4x fewer for paramiko to decode
FALLBACK_REQUEST = 32 << 10     # per-request size every SFTP server accepts
MAX_REQUEST = 255 << 10         # what OpenSSH advertises; never ask for more than this
INFLIGHT_BYTES = 16 << 20       # data kept in flight per direction

REQUIRED: tuple[tuple[type, str], ...] = (
    (paramiko.SFTPClient, "_request"),
    (paramiko.SFTPClient, "_async_request"),
    (paramiko.SFTPClient, "_read_response"),
    (paramiko.SFTPClient, "_convert_status"),
    (paramiko.SFTPClient, "_write_all"),
    (paramiko.SFTPClient, "_read_all"),
    (SFTPAttributes, "_from_msg"),
)
"""The private callables the fast path uses, as (owner, name)."""


def missing_internals() -> list[str]:
    """What of the paramiko internals the fast path relies on this paramiko lacks (empty: all there)."""
    missing = [f"{owner.__name__}.{name}" for owner, name in REQUIRED if not callable(getattr(owner, name, None))]
    if "in_buffer" not in paramiko.Channel.__init__.__code__.co_names:
        missing.append("Channel.in_buffer")  # where ChunkPipe replaces the channel's receive buffer
    read_response = getattr(paramiko.SFTPClient, "_read_response", None)
    if read_response is None or "_async_response" not in read_response.__code__.co_names:
        missing.append("SFTPClient._read_response calling _async_response")  # how replies reach _Replies
    pipe_api = {n for n, v in vars(BufferedPipe).items() if callable(v) and (not n.startswith("_") or n == "__len__")}
    missing += [f"BufferedPipe.{n} (not replaced by ChunkPipe)" for n in sorted(pipe_api - set(vars(ChunkPipe)))]
    return missing


class ChunkPipe(BufferedPipe):  # type: ignore[type-arg]  # generic in the stubs only
    """A channel receive buffer that keeps received packets as a queue of chunks.

    paramiko's BufferedPipe stores everything in one array and deletes the
    consumed bytes from its front, so every read moves the rest of the buffer:
    the cost grows with the window and downloads crawl when the window is
    large. Here a read only touches the chunks it returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self._q_lock = threading.Lock()
        self._q_cv = threading.Condition(self._q_lock)
        self._q: collections.deque[bytes] = collections.deque()
        self._q_size = 0
        self._q_closed = False
        self._q_event: threading.Event | None = None

    def set_event(self, event: threading.Event) -> None:
        with self._q_lock:
            self._q_event = event
            if self._q_closed or self._q_size:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes) -> None:
        with self._q_lock:
            if self._q_event is not None:
                self._q_event.set()
            self._q.append(bytes(data))
            self._q_size += len(data)
            self._q_cv.notify_all()

    def read_ready(self) -> bool:
        with self._q_lock:
            return self._q_size > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        with self._q_lock:
            if self._q_size == 0:
                if self._q_closed:
                    return b""
                if timeout == 0.0:
                    raise PipeTimeout()
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._q_size == 0 and not self._q_closed:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise PipeTimeout()
                    self._q_cv.wait(left)
            out: list[bytes] = []
            want = nbytes
            while self._q and want > 0:
                head = self._q[0]
                if len(head) <= want:
                    out.append(self._q.popleft())
                    want -= len(head)
                else:
                    out.append(head[:want])
                    self._q[0] = head[want:]
                    want = 0
            got = nbytes - want
            self._q_size -= got
            if self._q_size == 0 and self._q_event is not None and not self._q_closed:
                self._q_event.clear()
            return out[0] if len(out) == 1 else b"".join(out)

    def empty(self) -> bytes:
        with self._q_lock:
            out = b"".join(self._q)
            self._q.clear()
            self._q_size = 0
            if self._q_event is not None and not self._q_closed:
                self._q_event.clear()
            return out

    def close(self) -> None:
        with self._q_lock:
            self._q_closed = True
            self._q_cv.notify_all()
            if self._q_event is not None:
                self._q_event.set()

    def __len__(self) -> int:
        with self._q_lock:
            return self._q_size


class FastSFTPClient(paramiko.SFTPClient):
    """paramiko's SFTP client with linear-time packet I/O on its channel.

    The stock ``_write_all`` re-slices the unsent rest of a packet after each
    channel send (at most 32 KiB): a 255 KiB write request is copied about
    four times over. The stock ``_read_all`` grows its result with ``+=``.
    Measured: uploads nearly twice as fast with these two.
    """

    def _write_all(self, out: bytes) -> None:
        view = memoryview(out)
        while view:
            n = self.sock.send(view)  # type: ignore[arg-type]  # a memoryview: no copy
            if n <= 0:
                raise EOFError()
            view = view[n:]

    def _read_all(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            x = self.sock.recv(n)
            if not x:
                raise EOFError()
            parts.append(x)
            n -= len(x)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _Raw:
    """Collects whole replies (type, message) to a few pipelined requests."""

    def __init__(self) -> None:
        self.replies: dict[int, tuple[int, paramiko.Message]] = {}

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self.replies[num] = (t, msg)


class _Replies:
    """Collects replies to pipelined requests; paramiko calls ``_async_response``."""

    def __init__(self, sftp: Any) -> None:
        self.sftp = sftp
        self.pending = 0
        self.got: list[tuple[int, bytes | None, BaseException | None]] = []

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self.pending -= 1
        if t == CMD_DATA:
            self.got.append((num, msg.get_binary(), None))
        elif t == CMD_STATUS:
            try:
                self.sftp._convert_status(msg)
                self.got.append((num, None, None))
            except EOFError:
                self.got.append((num, b"", None))  # end of file: an empty read
            except OSError as exc:
                self.got.append((num, None, exc))
        else:
            self.got.append((num, None, OSError(f"unexpected SFTP reply type {t}")))

    def take(self) -> list[tuple[int, bytes | None, BaseException | None]]:
        got, self.got = self.got, []
        return got




@dataclass
class RawHandle(Handle):
    """A remote file as the server's handle bytes, for requests sent directly."""

    handle: bytes = b""


def _raw(h: Handle) -> bytes:
    assert isinstance(h, RawHandle)
    return h.handle


class FastSession(Session):
    """The session tuned for bulk transfers: the server's request sizes, many requests in flight."""

    fast = True

    def __init__(self, client: paramiko.SSHClient, channel: paramiko.Channel,
                 sftp: paramiko.SFTPClient) -> None:
        super().__init__(client, channel, sftp)
        self._raw: Any = sftp  # paramiko's request pipeline (private, untyped)
        self.read_len, self.write_len = self._limits()
        self.can_fsync = True

    @classmethod
    def open_channel(cls, transport: paramiko.Transport, timeout: float) -> paramiko.Channel:
        """A channel with a large window, whose receive buffer is a ChunkPipe before any data arrives."""
        channel = transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET, timeout=timeout)
        channel.in_buffer = ChunkPipe()
        return channel

    @classmethod
    def start(cls, client: paramiko.SSHClient, channel: paramiko.Channel) -> Session:
        return cls(client, channel, FastSFTPClient(channel))

    def _limits(self) -> tuple[int, int]:
        """Per-request read/write sizes from ``limits@openssh.com`` (32 KiB if unknown)."""
        try:
            t, msg = self._raw._request(CMD_EXTENDED, "limits@openssh.com")
        except OSError:
            return FALLBACK_REQUEST, FALLBACK_REQUEST
        if t != CMD_EXTENDED_REPLY:
            return FALLBACK_REQUEST, FALLBACK_REQUEST
        msg.get_int64()  # max packet length
        read_len, write_len = msg.get_int64(), msg.get_int64()

        def pick(n: int) -> int:
            return min(MAX_REQUEST, n) if n >= FALLBACK_REQUEST else FALLBACK_REQUEST
        return pick(read_len), pick(write_len)

    # -- files ------------------------------------------------------------------

    def _open(self, path: str, flags: int) -> Handle:
        t, msg = self._raw._request(CMD_OPEN, path, flags, SFTPAttributes())
        if t != CMD_HANDLE:
            raise OSError(f"opening {path}: unexpected SFTP reply type {t}")
        return RawHandle(handle=msg.get_binary())

    def open_rw(self, path: str) -> Handle:
        return self._open(path, SFTP_FLAG_READ | SFTP_FLAG_WRITE)

    def _create_excl(self, path: str) -> Handle:
        return self._open(path, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL)

    def fstat(self, h: Handle) -> SFTPAttributes:
        t, msg = self._raw._request(CMD_FSTAT, _raw(h))
        if t != CMD_ATTRS:
            raise OSError(f"fstat: unexpected SFTP reply type {t}")
        attrs: SFTPAttributes = cast(Any, SFTPAttributes)._from_msg(msg)
        return attrs

    def open_regular(self, path: str) -> Handle:
        """Open ``path`` only if it is a regular file: ``lstat`` and open in one flight.

        SFTP has no ``O_NOFOLLOW``: the ``lstat`` answered just before the open
        (the server handles requests in order) is what tells a link, FIFO or
        folder apart, at no extra round trip. NotRegularFileError then, and a
        handle the open got anyway is closed unread.
        """
        raw, got = self._raw, _Raw()
        n_stat = raw._async_request(got, CMD_LSTAT, path)
        n_open = raw._async_request(got, CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes())
        while len(got.replies) < 2:
            raw._read_response()
        t_open, m_open = got.replies[n_open]
        handle = RawHandle(handle=m_open.get_binary()) if t_open == CMD_HANDLE else None
        try:
            t_stat, m_stat = got.replies[n_stat]
            if t_stat != CMD_ATTRS:
                raw._convert_status(m_stat)  # raises (FileNotFoundError...)
                raise OSError(f"lstat {path}: unexpected SFTP reply type {t_stat}")
            mode = cast(Any, SFTPAttributes)._from_msg(m_stat).st_mode or 0
            if not stat.S_ISREG(mode):
                raise not_regular(path, mode)
            if handle is None:
                raw._convert_status(m_open)
                raise OSError(f"opening {path}: unexpected SFTP reply type {t_open}")
        except BaseException:
            if handle is not None:
                raw._async_request(type(None), CMD_CLOSE, handle.handle)
            raise
        return handle

    def _close(self, h: Handle, wait: bool) -> None:
        if wait:  # paramiko's own close hides errors
            self._raw._request(CMD_CLOSE, _raw(h))
        else:
            self._raw._async_request(type(None), CMD_CLOSE, _raw(h))

    def _abandon(self, h: Handle) -> None:
        self._raw._async_request(type(None), CMD_CLOSE, _raw(h))

    def write_durably(self, h: Handle, local: IO[bytes], start: int, end: int,
                      step: Callable[[int], None]) -> None:
        self.sync_and_close(h, self.write_from(h, local, start, end, step))

    def sync_and_close(self, h: Handle, replies: _Replies) -> None:
        """``fsync@openssh.com`` and close behind the last writes: one round trip for all three.

        The fsync makes the data durable on the server before the rename that
        makes the name visible; servers without the extension just close.
        The server handles requests in order, so the fsync follows every write.
        """
        raw = self._raw
        fsync_num = None
        if self.can_fsync:
            fsync_num = raw._async_request(replies, CMD_EXTENDED, "fsync@openssh.com", _raw(h))
            replies.pending += 1
        raw._async_request(replies, CMD_CLOSE, _raw(h))
        replies.pending += 1
        h.closed = True
        while replies.pending:
            raw._read_response()
        for num, _data, exc in replies.take():
            if exc is None:
                continue
            if num == fsync_num and getattr(exc, "errno", None) is None:
                self.can_fsync = False  # "Operation unsupported": not an OpenSSH server
                log.debug("server does not support fsync@openssh.com: %s", exc)
                continue
            raise exc

    def write_from(self, h: Handle, local: IO[bytes], start: int, end: int,
                   step: Callable[[int], None]) -> _Replies:
        """Write ``local[start:end]`` at the same offsets, keeping many requests in flight.

        The last replies are left in flight: ``sync_and_close`` collects them.
        """
        raw, replies = self._raw, _Replies(self._raw)
        limit = max(4, INFLIGHT_BYTES // self.write_len)
        local.seek(start)
        offset = start
        while offset < end:
            data = local.read(min(self.write_len, end - offset))
            if not data:
                raise TransportError(f"{getattr(local, 'name', 'the local file')} shrank while being sent")
            raw._async_request(replies, CMD_WRITE, _raw(h), int64(offset), data)
            replies.pending += 1
            offset += len(data)
            # Collect replies already here without waiting; wait only when the pipeline is full.
            while replies.pending >= limit or (replies.pending and self.channel.recv_ready()):
                raw._read_response()
            self._check(replies)
            step(offset)
        return replies

    @staticmethod
    def _check(replies: _Replies) -> None:
        for _num, _data, exc in replies.take():
            if exc is not None:
                raise exc

    def read_into(self, h: Handle, start: int, end: int, sink: Callable[[bytes], None], *,
                  whole: bool = False) -> None:
        """Read ``[start, end)`` in order into ``sink``, keeping many requests in flight.

        With ``whole`` a read at ``end`` must also find the end of the file, in
        the same flight: the file's exact size is confirmed without a round
        trip of its own.
        """
        raw, replies = self._raw, _Replies(self._raw)
        limit = max(4, INFLIGHT_BYTES // self.read_len)
        asked: dict[int, tuple[int, int]] = {}
        gaps: collections.deque[tuple[int, int]] = collections.deque()
        ready: dict[int, bytes] = {}
        next_ask = next_out = start
        probe = None
        if whole:
            probe = raw._async_request(replies, CMD_READ, _raw(h), int64(end), 1)
            replies.pending += 1
        while next_out < end or probe is not None:
            while len(asked) < limit and (gaps or next_ask < end):
                if gaps:
                    off, n = gaps.popleft()
                else:
                    off, n = next_ask, min(self.read_len, end - next_ask)
                    next_ask += n
                num = raw._async_request(replies, CMD_READ, _raw(h), int64(off), n)
                replies.pending += 1
                asked[num] = (off, n)
            raw._read_response()
            for num, data, exc in replies.take():
                if num == probe:
                    probe = None
                    if exc is not None:
                        raise exc
                    if data:
                        raise FileChanged(f"the remote file is longer than the {end} bytes listed")
                    continue
                off, n = asked.pop(num)
                if exc is not None:
                    raise exc
                if not data:
                    raise FileChanged(f"the remote file ended at byte {off}, before the {end} bytes listed")
                if len(data) < n:  # a short read: ask for the rest
                    gaps.append((off + len(data), n - len(data)))
                ready[off] = data
            while next_out in ready:
                data = ready.pop(next_out)
                sink(data)
                next_out += len(data)
