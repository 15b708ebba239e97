"""The SFTP transport: paramiko to the HO's OpenSSH server, one chrooted account per store.

Address: ``sftp://user@host:port/PATH``, where PATH is the folder holding one
store's ``up/`` (store to HO) and ``down/`` (HO to store). A store's chrooted
account sees its own folder as ``/`` (``sftp://xs001@ho.example:2222/``); the
HO reaching the same folder without a chroot names it in full
(``sftp://xchg@ho.example:2222/srv/xchg/s001``). The node's role decides the
direction: a store pushes to ``up/`` and pulls from ``down/``, the HO the reverse.

Promises, as for every transport:

- Upload to ``name.part``, ask the server to fsync it (``fsync@openssh.com``),
  then ``posix-rename@openssh.com`` into place: the peer never sees a partial
  file under a complete name.
- Download to a local ``.part``, fsync, rename, and only then remove the remote file.
- An interrupted upload resumes from the server's ``.part`` only when that is
  a regular file (``lstat``, then ``fstat`` of the open handle agrees) whose
  whole existing prefix hashes like the local file's; otherwise the upload
  starts over in a ``.part`` created fresh (``O_CREAT | O_EXCL``: never opened
  through a link or over a FIFO someone left at that name). An interrupted
  download resumes once the last MiB of the local partial copy matches.
- Nothing but a regular file is opened on the server: each remote file is
  ``lstat``-ed in the same flight as its open (no extra round trip), and links,
  FIFOs, sockets, devices and folders named like exchange files are refused,
  left where they are and reported (``refused``).
- Login with the node's Ed25519 key; the server's host key must be pinned in
  ``<home>/known_hosts`` (``exchange peer trust-host``). Unknown or changed
  keys are refused, never learnt silently.
- A broken link (refused, reset, timeout, EOF) is a TransientTransportError,
  retried with exponential backoff; refusals (host key, login, permission,
  missing folder) are TransportErrors with a hint and are not retried.

Throughput: paramiko's stock SFTP file objects are far slower than OpenSSH.
Measured on loopback (tools/bench/sftp_throughput.py, docs/SFTP.md) the fixes
are: AES-GCM first in the cipher list; the server's own read/write limits
(``limits@openssh.com``: 255 KiB instead of 32 KiB per request); a pipeline of
requests kept in flight on this thread; SFTP packet I/O that does not copy
the unsent rest of a request after every channel send; and a channel receive
buffer that does not copy the whole buffer on every read (paramiko's does,
which is why a large window made downloads collapse).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.sftp import (
    CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_FSTAT, CMD_HANDLE, CMD_LSTAT,
    CMD_OPEN, CMD_READ, CMD_STATUS, CMD_WRITE, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_READ,
    SFTP_FLAG_WRITE, int64,
)
from paramiko.sftp_attr import SFTPAttributes

from exchange.errors import ConfigError, ExchangeError, NotRegularFileError, TransientTransportError, TransportError
from exchange.faults import crashpoint
from exchange.files import create_fresh, fsync_dir, is_regular_entry, kind_of, open_regular
from exchange.node.config import Role
from exchange.node.perms import check_not_writable_by_others, write_private_atomic
from exchange.transport.drop import INFO_PREFIX, addressed_to, incoming, node_info, outgoing, resolve_side
from exchange.wire.formats import PART_SUFFIX

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 22
KNOWN_HOSTS = "known_hosts"
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
WINDOW = 8 << 20                # our receive window; safe only with _ChunkPipe below
MAX_PACKET = 128 << 10          # largest SSH packet the server may send us: 4x fewer for paramiko to decode
FALLBACK_REQUEST = 32 << 10     # per-request size every SFTP server accepts
MAX_REQUEST = 255 << 10         # what OpenSSH advertises; never ask for more than this
INFLIGHT_BYTES = 16 << 20       # data kept in flight per direction
TAIL_CHECK = 1 << 20            # bytes compared before trusting a partial or existing copy
TRUST_COMMAND = "exchange peer trust-host --home {home} --address {address}"

Progress = Callable[[str, int, int], None]
"""``progress(file_name, bytes_done, bytes_total)``, called as data moves."""


class FileChanged(TransientTransportError):
    """A remote file's size is not what the listing said: it was replaced; list again."""


class HostKeyError(TransportError):
    """The server's host key is not the pinned one: refused, never retried."""

    hint = ("Compare the fingerprint with the server's own (on the server: "
            "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) before trusting it.")


# -- addresses and host keys ----------------------------------------------------


@dataclass(frozen=True)
class SftpAddress:
    user: str
    host: str
    port: int
    path: str  # remote folder holding up/ and down/; "." is the login folder

    @classmethod
    def parse(cls, address: str) -> SftpAddress:
        """Parse ``sftp://user@host[:port]/path``; ConfigError with an example if malformed."""
        example = "Use sftp://user@host:port/path, e.g. sftp://xs001@ho.example.com:2222/"
        parts = urlsplit(address)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"bad port in SFTP address {address!r}", hint=example) from None
        if parts.scheme != "sftp" or not parts.hostname or not parts.username:
            raise ConfigError(f"not an SFTP address with a user and host: {address!r}", hint=example)
        if parts.password is not None:
            raise ConfigError(f"SFTP address {address!r} carries a password; exchange logs in with "
                              "the node's key only", hint=example)
        return cls(unquote(parts.username), parts.hostname, port, unquote(parts.path) or ".")

    @property
    def host_id(self) -> str:
        """The host's name in known_hosts: ``[host]:port`` unless the port is 22."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        path = "" if self.path == "." else self.path if self.path.startswith("/") else f"/{self.path}"
        return f"sftp://{self.user}@{self.host}:{self.port}{path}"


def known_hosts_path(home: Path) -> Path:
    return Path(home) / KNOWN_HOSTS


def fetch_host_key(host: str, port: int = DEFAULT_PORT, timeout: float = 15.0) -> paramiko.PKey:
    """Ask the server for its host key (key exchange only, no login)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TransientTransportError(f"cannot connect to {host}:{port}: {_reason(exc)}") from exc
    transport = _new_transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise TransientTransportError(f"no SSH key exchange with {host}:{port}: {_reason(exc)}") from exc
    finally:
        transport.close()


def trust_host(home: Path, address: str, expected: str | None = None) -> str:
    """Pin the server's current host key in ``<home>/known_hosts``; returns its SHA256 fingerprint.

    Any older key for the same host is replaced: the operator runs this after
    comparing the fingerprint, which is the moment a rotation is accepted.
    ``expected`` (``SHA256:...``) refuses a key whose fingerprint differs.
    """
    addr = SftpAddress.parse(address)
    key = fetch_host_key(addr.host, addr.port)
    fp = key.fingerprint
    if expected is not None and expected.strip() != fp:
        raise HostKeyError(f"{addr.host_id} offers host key {fp}, not the expected {expected.strip()}; "
                           "nothing was trusted")
    path = known_hosts_path(home)
    kept = [line for line in _read_lines(path) if not _names_host(line, addr.host_id)]
    kept.append(f"{addr.host_id} {key.get_name()} {key.get_base64()}")
    write_private_atomic(path, "".join(line + "\n" for line in kept).encode())  # 0600, as ssh keeps it
    log.info("trusted host key %s for %s in %s", fp, addr.host_id, path)
    return fp


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _names_host(line: str, host_id: str) -> bool:
    """Does a known_hosts line pin a key for ``host_id`` (plain or hashed name)?"""
    fields = line.split()
    if len(fields) < 3 or line.lstrip().startswith("#") or fields[0].startswith("@"):
        return False
    for name in fields[0].split(","):
        if name == host_id:
            return True
        if name.startswith("|1|") and paramiko.HostKeys.hash_host(host_id, name) == name:
            return True
    return False


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Refuse a server whose key is not pinned, showing what to check and how to pin it."""

    def __init__(self, home: Path | None, address: str) -> None:
        self.home = home
        self.address = address

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"host {hostname} is not trusted yet: it offers the {key.get_name()} key {key.fingerprint}. "
            f"If that is the server's fingerprint, pin it with: "
            f"{TRUST_COMMAND.format(home=self.home or 'DIR', address=self.address)}")


def load_login_key(home: Path) -> paramiko.PKey:
    """The node's Ed25519 key (``keys/node_ed25519``), refused if others can read it."""
    from exchange.node.keys import SIGNING_KEY, check_private

    path = Path(home) / "keys" / SIGNING_KEY
    check_private(path)
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(path))
    except (paramiko.SSHException, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as an OpenSSH Ed25519 key: {exc}") from exc


# -- connection -----------------------------------------------------------------


class _ChunkPipe(BufferedPipe):  # type: ignore[type-arg]  # generic in the stubs only
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


class _SFTPClient(paramiko.SFTPClient):
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


def _new_transport(sock: Any, /, **kwargs: Any) -> paramiko.Transport:
    """A paramiko Transport preferring AES-GCM (much faster here than CTR + HMAC)."""
    transport = paramiko.Transport(sock, **kwargs)
    opts = transport.get_security_options()
    have = list(opts.ciphers)
    opts.ciphers = [c for c in FAST_CIPHERS if c in have] + [c for c in have if c not in FAST_CIPHERS]
    return transport


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


class _Session:
    """One SSH connection with its SFTP channel, tuned for bulk transfers."""

    def __init__(self, client: paramiko.SSHClient, channel: paramiko.Channel,
                 sftp: paramiko.SFTPClient) -> None:
        self.client = client
        self.channel = channel
        self.sftp = sftp
        self._raw: Any = sftp  # paramiko's request pipeline (private, untyped)
        self.read_len, self.write_len = self._limits()
        self.can_fsync = True

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

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return bool(transport and transport.is_active() and not self.channel.closed)

    def close(self) -> None:
        try:
            self.sftp.close()
        finally:
            self.client.close()

    # -- files ------------------------------------------------------------------

    def stat(self, path: str) -> SFTPAttributes | None:
        try:
            return self.sftp.stat(path)
        except FileNotFoundError:
            return None

    def open(self, path: str, flags: int) -> _Handle:
        t, msg = self._raw._request(CMD_OPEN, path, flags, SFTPAttributes())
        if t != CMD_HANDLE:
            raise OSError(f"opening {path}: unexpected SFTP reply type {t}")
        return _Handle(msg.get_binary())

    def lstat(self, path: str) -> SFTPAttributes | None:
        """The entry itself (a link is not followed); None when there is none."""
        try:
            return self.sftp.lstat(path)
        except FileNotFoundError:
            return None

    def fstat(self, h: _Handle) -> SFTPAttributes:
        t, msg = self._raw._request(CMD_FSTAT, h.handle)
        if t != CMD_ATTRS:
            raise OSError(f"fstat: unexpected SFTP reply type {t}")
        attrs: SFTPAttributes = cast(Any, SFTPAttributes)._from_msg(msg)
        return attrs

    def open_regular(self, path: str, flags: int = SFTP_FLAG_READ) -> _Handle:
        """Open ``path`` only if it is a regular file: ``lstat`` and open in one flight.

        SFTP has no ``O_NOFOLLOW``: the ``lstat`` answered just before the open
        (the server handles requests in order) is what tells a link, FIFO or
        folder apart, at no extra round trip. NotRegularFileError then, and a
        handle the open got anyway is closed unread.
        """
        raw, got = self._raw, _Raw()
        n_stat = raw._async_request(got, CMD_LSTAT, path)
        n_open = raw._async_request(got, CMD_OPEN, path, flags, SFTPAttributes())
        while len(got.replies) < 2:
            raw._read_response()
        t_open, m_open = got.replies[n_open]
        handle = _Handle(m_open.get_binary()) if t_open == CMD_HANDLE else None
        try:
            t_stat, m_stat = got.replies[n_stat]
            if t_stat != CMD_ATTRS:
                raw._convert_status(m_stat)  # raises (FileNotFoundError...)
                raise OSError(f"lstat {path}: unexpected SFTP reply type {t_stat}")
            mode = cast(Any, SFTPAttributes)._from_msg(m_stat).st_mode or 0
            if not stat.S_ISREG(mode):
                raise NotRegularFileError(f"{path} on the server is {kind_of(mode)}, not a regular file: "
                                          "refused, not read or followed")
            if handle is None:
                raw._convert_status(m_open)
                raise OSError(f"opening {path}: unexpected SFTP reply type {t_open}")
        except BaseException:
            if handle is not None:
                raw._async_request(type(None), CMD_CLOSE, handle.handle)
            raise
        return handle

    def create_new(self, path: str) -> _Handle | None:
        """A new empty file (``O_CREAT | O_EXCL``, never through a link); None if the name is taken."""
        try:
            return self.open(path, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL)
        except OSError as exc:
            if exc.errno is not None or isinstance(exc, (PipeTimeout, socket.timeout)) or not self.alive():
                raise  # missing folder, permission, a broken link: not "the name is taken"
            return None

    def create_fresh(self, path: str) -> tuple[str, _Handle]:
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
    def closing(self, h: _Handle, wait: bool = True) -> Iterator[_Handle]:
        """Close ``h``; with ``wait``, check the status (paramiko's own close hides errors).

        Without ``wait`` (a file only read), the reply is not awaited: one round trip less.
        """
        try:
            yield h
        except BaseException:
            if not h.closed and self.alive():
                h.closed = True
                self._raw._async_request(type(None), CMD_CLOSE, h.handle)
            raise
        if not h.closed:
            h.closed = True
            if wait:
                self._raw._request(CMD_CLOSE, h.handle)
            else:
                self._raw._async_request(type(None), CMD_CLOSE, h.handle)

    def opened(self, path: str, flags: int) -> AbstractContextManager[_Handle]:
        return self.closing(self.open(path, flags))

    def size_of(self, h: _Handle) -> int:
        """The size of the open file itself: a rename over its name cannot change it under us."""
        t, msg = self._raw._request(CMD_FSTAT, h.handle)
        if t != CMD_ATTRS:
            raise OSError(f"fstat: unexpected SFTP reply type {t}")
        attrs: SFTPAttributes = cast(Any, SFTPAttributes)._from_msg(msg)
        return attrs.st_size or 0

    def sync_and_close(self, h: _Handle, replies: _Replies) -> None:
        """``fsync@openssh.com`` and close behind the last writes: one round trip for all three.

        The fsync makes the data durable on the server before the rename that
        makes the name visible; servers without the extension just close.
        The server handles requests in order, so the fsync follows every write.
        """
        raw = self._raw
        fsync_num = None
        if self.can_fsync:
            fsync_num = raw._async_request(replies, CMD_EXTENDED, "fsync@openssh.com", h.handle)
            replies.pending += 1
        raw._async_request(replies, CMD_CLOSE, h.handle)
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

    def write_from(self, h: _Handle, local: IO[bytes], start: int, end: int,
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
            raw._async_request(replies, CMD_WRITE, h.handle, int64(offset), data)
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

    def read_into(self, h: _Handle, start: int, end: int, sink: Callable[[bytes], None], *,
                  whole: bool = False) -> None:
        """Read ``[start, end)`` in order into ``sink``, keeping many requests in flight.

        ``end`` comes from a listing; with ``whole`` a read at ``end`` must also
        find the end of the file, in the same flight: the file's exact size is
        confirmed without a round trip of its own. A file that turns out longer
        or shorter was replaced meanwhile: FileChanged, and the caller lists again.
        """
        raw, replies = self._raw, _Replies(self._raw)
        limit = max(4, INFLIGHT_BYTES // self.read_len)
        asked: dict[int, tuple[int, int]] = {}
        gaps: collections.deque[tuple[int, int]] = collections.deque()
        ready: dict[int, bytes] = {}
        next_ask = next_out = start
        probe = None
        if whole:
            probe = raw._async_request(replies, CMD_READ, h.handle, int64(end), 1)
            replies.pending += 1
        while next_out < end or probe is not None:
            while len(asked) < limit and (gaps or next_ask < end):
                if gaps:
                    off, n = gaps.popleft()
                else:
                    off, n = next_ask, min(self.read_len, end - next_ask)
                    next_ask += n
                num = raw._async_request(replies, CMD_READ, h.handle, int64(off), n)
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

    def read_bytes(self, h: _Handle, start: int, end: int) -> bytes:
        parts: list[bytes] = []
        self.read_into(h, start, end, parts.append)
        return b"".join(parts)

    def put_bytes(self, path: str, data: bytes) -> str:
        """A small file, created fresh, written and synced in two round trips; returns the name
        written (``path`` unless a folder holds it). No rename: callers do it."""
        path, h = self.create_fresh(path)
        with self.closing(h):
            self.sync_and_close(h, self.write_from(h, io.BytesIO(data), 0, len(data), lambda n: None))
        return path


@dataclass
class _Handle:
    handle: bytes
    closed: bool = False


# -- the transport ----------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """Bounded exponential backoff for transient failures: base, 2*base, 4*base..."""

    attempts: int = 4
    base: float = 0.5
    max_delay: float = 8.0

    def delays(self) -> Iterator[float]:
        delay = self.base
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_delay)


class SftpTransport:
    """Push to and pull from one store's folder on an SFTP server (see the module docstring)."""

    def __init__(self, address: str | SftpAddress, *, key: paramiko.PKey, known_hosts: Path,
                 side: Role, me: str | None = None, home: Path | None = None,
                 retry: Retry | None = None, timeout: float = 30.0, idle_timeout: float = 120.0,
                 progress: Progress | None = None) -> None:
        """``timeout`` bounds connecting and logging in; ``idle_timeout`` a wait with no byte
        received at all (a 255 KiB request over a 16 kbit/s link takes two minutes)."""
        self.addr = address if isinstance(address, SftpAddress) else SftpAddress.parse(address)
        self.address = address if isinstance(address, str) else str(address)
        self.key = key
        self.known_hosts = known_hosts
        self.side = side
        self.me = me
        self.home = home
        self.retry = retry or Retry()
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.progress = progress
        self._session: _Session | None = None
        self._listings: dict[str, dict[str, int]] = {}  # folder -> name -> size, per connection
        self._modes: dict[str, dict[str, int]] = {}     # folder -> name -> file type and mode (listing)
        self.refused: list[str] = []  # what the last pull left alone: links, FIFOs, folders named like files

    @classmethod
    def from_address(cls, address: str, *, home: Path | None = None, me: str | None = None,
                     peer: str | None = None, side: str | None = None, key: paramiko.PKey | None = None,
                     known_hosts: Path | None = None, retry: Retry | None = None,
                     timeout: float = 30.0, idle_timeout: float = 120.0,
                     progress: Progress | None = None) -> SftpTransport:
        """Open lazily: nothing connects until the first push, pull or probe.

        The role comes from ``side`` or else the home's exchange.toml; the key
        and known_hosts from the home unless given.
        """
        SftpAddress.parse(address)  # a malformed address fails before any key is read
        role = resolve_side(home, side)
        if key is None or known_hosts is None:
            if home is None:
                raise ConfigError("an SFTP transport needs the node home (its key and known_hosts)",
                                  hint="Pass --home DIR or set EXCHANGE_HOME.")
            key = key or load_login_key(home)
            known_hosts = known_hosts or known_hosts_path(home)
        return cls(address, key=key, known_hosts=known_hosts, side=role, me=me, home=home, retry=retry,
                   timeout=timeout, idle_timeout=idle_timeout, progress=progress)

    def __enter__(self) -> SftpTransport:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def folder(self, sub: str) -> str:
        return posixpath.join(self.addr.path, sub)

    # -- public API -----------------------------------------------------------

    def push(self, files: Sequence[Path], peer: str) -> list[Path]:
        """Upload each file into the peer's folder; returns those durable there, in order."""
        folder = self.folder(outgoing(self.side))
        self._listings.clear()  # sizes are trusted within one call only
        done: list[Path] = []
        for f in files:
            self._attempt(f"sending {f.name}", lambda s: self._upload(s, f, folder))
            done.append(f)
        if self.me and done:
            try:
                self.publish_info(self.me, peer, node_info(self.me))
            except ExchangeError as exc:
                log.debug("could not publish node info: %s", exc)
        return done

    def pull(self, me: str, dest: Path) -> list[Path]:
        """Download every complete file addressed to ``me``; remote copies go once ours are durable."""
        folder = self.folder(incoming(self.side))
        self._listings.clear()  # sizes are trusted within one call only
        self.refused = []
        names = self._attempt(f"listing {folder}", lambda s: self._listing(s, folder, me))
        got: list[Path] = []
        for name in names:
            target = self._attempt(f"fetching {name}", lambda s: self._download(s, folder, name, dest))
            if target is not None:
                got.append(target)
        return got

    def probe(self, me: str, peer: str) -> dict[str, Any]:
        """For `exchange doctor`: both folders writable, the server's clock, the peer's info."""
        def run(s: _Session) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for sub in (outgoing(self.side), incoming(self.side)):
                folder = self.folder(sub)
                self._sizes(s, folder)  # exists?
                test = s.put_bytes(posixpath.join(folder, f".probe-{me}{PART_SUFFIX}"), b"probe")
                attrs = s.stat(test)
                out["server_time"] = attrs.st_mtime if attrs else None
                s.sftp.remove(test)
            info = f"{INFO_PREFIX}{peer}.json"
            try:
                with s.closing(self._open_listed(s, self.folder(incoming(self.side)), info)) as h:
                    size = s.size_of(h)
                    if size < 1 << 16:
                        out["peer_info"] = json.loads(s.read_bytes(h, 0, size))
            except (FileNotFoundError, ValueError, NotRegularFileError):
                pass
            return out
        return self._attempt(f"probing {self.address}", run)

    def publish_info(self, me: str, peer: str, info: dict[str, Any]) -> None:
        """Leave ``node-<me>.json`` where ``peer`` pulls from, for its doctor."""
        target = posixpath.join(self.folder(outgoing(self.side)), f"{INFO_PREFIX}{me}.json")
        data = json.dumps(info).encode()

        def run(s: _Session) -> None:
            self._rename(s, s.put_bytes(target + PART_SUFFIX, data), target)
        self._attempt("publishing node info", run)

    def close(self) -> None:
        self._drop()

    # -- connecting and retrying --------------------------------------------------

    def _connect(self) -> _Session:
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            check_not_writable_by_others(self.known_hosts, "known hosts file")
            try:
                client.load_host_keys(str(self.known_hosts))
            except (OSError, ValueError, paramiko.SSHException) as exc:
                raise ConfigError(f"cannot read {self.known_hosts}: {exc}",
                                  hint="Fix or remove the bad line, then run `exchange peer trust-host`.") from exc
        client.set_missing_host_key_policy(_RefuseUnknownHost(self.home, self.address))
        try:
            client.connect(self.addr.host, self.addr.port, username=self.addr.user, pkey=self.key,
                           timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout,
                           channel_timeout=self.timeout, allow_agent=False, look_for_keys=False,
                           transport_factory=_new_transport)
            transport = client.get_transport()
            if transport is None:
                raise paramiko.SSHException("no transport after connect")
            transport.set_keepalive(15)
            channel = transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET,
                                             timeout=self.timeout)
            channel.in_buffer = _ChunkPipe()  # before any data can arrive on the channel
            channel.settimeout(self.idle_timeout)
            channel.invoke_subsystem("sftp")
            session = _Session(client, channel, _SFTPClient(channel))
        except BaseException:
            client.close()
            raise
        log.debug("connected to %s (cipher %s, read %d, write %d bytes per request)", self.address,
                  getattr(transport, "remote_cipher", "?"), session.read_len, session.write_len)
        return session

    def _drop(self) -> None:
        session, self._session = self._session, None
        self._listings.clear()
        self._modes.clear()
        if session is not None:
            try:
                session.close()
            except Exception as exc:  # closing a dead link: nothing to save
                log.debug("closing %s: %s", self.address, exc)

    def _attempt(self, what: str, op: Callable[[_Session], T]) -> T:
        """Run ``op`` on a live session; reconnect and retry transient failures with backoff."""
        delays = self.retry.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._session is None:
                    self._session = self._connect()
                return op(self._session)
            except Exception as exc:
                self._listings.clear()  # whatever happened, list again before trusting sizes
                self._modes.clear()
                err = self._classify(exc, what)
                if err is None:
                    raise
                if not err.transient:
                    if self._session is not None and not self._session.alive():
                        self._drop()
                    if err is exc:
                        raise
                    raise err from exc
                self._drop()
                delay = next(delays, None)
                if delay is None:
                    if attempt > 1:
                        err.message += f" (gave up after {attempt} attempts)"
                    raise err from exc
                log.warning("%s: %s; retrying in %.1fs (attempt %d of %d)", self.address, err, delay,
                            attempt + 1, self.retry.attempts)
                time.sleep(delay)

    def _classify(self, exc: BaseException, what: str) -> ExchangeError | None:
        """Map a failure to a TransportError (transient or terminal); None: a bug, re-raise it."""
        where = f"{what} ({self.address})"
        if isinstance(exc, ExchangeError):
            return exc
        if isinstance(exc, paramiko.BadHostKeyException):
            return HostKeyError(
                f"HOST KEY CHANGED for {exc.hostname}: it offers {exc.key.fingerprint} but known_hosts "
                f"pins {exc.expected_key.fingerprint}. This can be an attack, or the server was "
                f"reinstalled; if the change is expected, pin the new key with: "
                f"{TRUST_COMMAND.format(home=self.home or 'DIR', address=self.address)}")
        if isinstance(exc, paramiko.AuthenticationException):
            return TransportError(
                f"{where}: the server refused the login of {self.addr.user!r} with key {self.key.fingerprint}",
                hint="Put the node's public key (keys/node_ed25519.pub) in that account's authorized "
                     "keys on the server (docs/SFTP.md).")
        if isinstance(exc, paramiko.SSHException) and "ncompatible" in str(exc):
            return TransportError(f"{where}: no common SSH algorithms with the server: {exc}",
                                  hint="The server needs a current OpenSSH (Ed25519, curve25519, AES).")
        alive = self._session is not None and self._session.alive()
        if isinstance(exc, (paramiko.SSHException, EOFError, PipeTimeout, socket.timeout, ConnectionError)) \
                or (isinstance(exc, OSError) and not alive):
            return TransientTransportError(f"{where}: {_reason(exc)}")
        if isinstance(exc, OSError):  # the server answered, and said no
            if exc.errno == errno.ENOENT:
                return TransportError(f"{where}: no such file or folder on the server",
                                      hint="Check the folder in the address: a store's chrooted account "
                                           "sees its own folder as / (docs/SFTP.md).")
            if exc.errno == errno.EACCES:
                return TransportError(f"{where}: permission denied by the server",
                                      hint="up/ and down/ must be writable by the account (docs/SFTP.md).")
            return TransportError(f"{where}: the server refused: {_reason(exc)}",
                                  hint="Check free space and permissions on the server.")
        return None

    # -- the work -------------------------------------------------------------

    def _sizes(self, s: _Session, folder: str) -> dict[str, int]:
        """Names and sizes in ``folder``, listed once per connection rather than two stats a file."""
        sizes = self._listings.get(folder)
        if sizes is None:
            try:
                listed = s.sftp.listdir_attr(folder)
                sizes = {a.filename: a.st_size or 0 for a in listed}
                self._modes[folder] = {a.filename: a.st_mode for a in listed if a.st_mode is not None}
            except FileNotFoundError:
                raise TransportError(
                    f"folder {folder} not found on {self.addr.host} for {self.addr.user!r}",
                    hint="A store's chrooted account sees its own folder as /: its address ends in "
                         "':port/'. The HO names the store's folder in full (docs/SFTP.md).") from None
            self._listings[folder] = sizes
        return sizes

    def _open_listed(self, s: _Session, folder: str, name: str) -> _Handle:
        """Open ``folder/name`` for reading only if it is a regular file.

        What the listing (OpenSSH fills it from ``lstat``) shows as a link, FIFO
        or folder is refused without any request: an open of a FIFO would block
        the server's sftp process. The rest is ``lstat``-ed with its open
        (:meth:`_Session.open_regular`), which catches a link swapped in since.
        """
        path = posixpath.join(folder, name)
        mode = self._modes.get(folder, {}).get(name, stat.S_IFREG)
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{path} on the server is {kind_of(mode)}, not a regular file: "
                                      "refused, not read or followed")
        return s.open_regular(path)

    def _report(self, name: str, total: int) -> Callable[[int], None]:
        progress = self.progress
        if progress is None:
            return lambda done: None
        return lambda done: progress(name, done, total)

    @staticmethod
    def _same_tail(read: Callable[[int, int], bytes], local: IO[bytes], length: int) -> bool:
        """Do the last MiB of the remote ``[:length]`` and ``local[:length]`` agree?"""
        start = max(0, length - TAIL_CHECK)
        local.seek(start)
        mine = local.read(length - start)
        try:
            return len(mine) == length - start and read(start, length) == mine
        except FileNotFoundError:
            return False  # gone meanwhile (the peer took it)

    def _upload(self, s: _Session, src: Path, folder: str) -> None:
        final = posixpath.join(folder, src.name)
        part_name = src.name + PART_SUFFIX
        sizes = self._sizes(s, folder)
        try:
            local = open_regular(src)
            size = os.fstat(local.fileno()).st_size
        except OSError as exc:
            raise TransportError(f"cannot read {src}: {exc.strerror or exc}") from exc

        with local:
            if sizes.get(src.name) == size and self._already_there(s, folder, src.name, local, size):
                log.info("%s is already at %s", src.name, self.address)
                return
            offset, part, h = 0, final + PART_SUFFIX, None
            if part_name in sizes:
                sizes.pop(part_name)
                h, offset = self._resumable(s, part, local, size)
            if h is None:
                part, h = s.create_fresh(part)
            else:
                log.info("resuming upload of %s at byte %d of %d", src.name, offset, size)
            with s.closing(h):
                s.sync_and_close(h, s.write_from(h, local, offset, size, self._report(src.name, size)))
        self._rename(s, part, final)
        sizes[src.name] = size
        log.info("sent %s to %s (%d bytes)", src.name, self.address, size)

    def _already_there(self, s: _Session, folder: str, name: str, local: IO[bytes], size: int) -> bool:
        """Is ``folder/name`` a regular file holding exactly ``local``'s bytes? (a link or FIFO there: no,
        and the rename replaces it as an entry)"""
        try:
            h = self._open_listed(s, folder, name)
        except (FileNotFoundError, NotRegularFileError) as exc:
            log.info("%s: not a usable copy on the server (%s); sending it", name, exc)
            return False
        with s.closing(h, wait=False):
            return self._same_prefix(s, h, local, size)

    def _resumable(self, s: _Session, part: str, local: IO[bytes], size: int) -> tuple[_Handle | None, int]:
        """An open handle on the server's ``part`` and its length, when the upload can continue it.

        Only a regular file (``lstat``; the open handle's ``fstat`` must agree,
        so a link swapped in between is caught) no longer than ours whose whole
        content hashes like our prefix. Otherwise (None, 0): start over.
        """
        name = posixpath.basename(part)
        before = s.lstat(part)
        if before is None:
            return None, 0
        mode = before.st_mode or 0
        if not stat.S_ISREG(mode):
            log.warning("restarting upload: %s on the server is %s, not a partial copy", name, kind_of(mode))
            return None, 0
        length = before.st_size or 0
        if not 0 < length <= size:
            log.info("restarting upload of %s: the partial copy on the server differs", name)
            return None, 0
        try:
            h = s.open(part, SFTP_FLAG_READ | SFTP_FLAG_WRITE)
        except PermissionError:  # not ours to continue (another account's file): start over beside it
            log.info("restarting upload of %s: the partial copy on the server is not writable", name)
            return None, 0
        try:
            after = s.fstat(h)
            same = (after.st_mode, after.st_uid, after.st_gid, after.st_size, after.st_mtime) == \
                (before.st_mode, before.st_uid, before.st_gid, before.st_size, before.st_mtime)
            if same and self._same_prefix(s, h, local, length):
                return h, length
        except BaseException:
            with s.closing(h, wait=False):
                raise
        with s.closing(h, wait=False):
            pass
        log.info("restarting upload of %s: the partial copy on the server differs", name)
        return None, 0

    @staticmethod
    def _same_prefix(s: _Session, h: _Handle, local: IO[bytes], length: int) -> bool:
        """Do the remote file's first ``length`` bytes hash like ``local``'s first ``length``?
        (the remote must also end there)"""
        mine = hashlib.sha256()
        local.seek(0)
        left = length
        while left:
            chunk = local.read(min(left, 1 << 20))
            if not chunk:
                return False
            mine.update(chunk)
            left -= len(chunk)
        theirs = hashlib.sha256()
        try:
            s.read_into(h, 0, length, theirs.update, whole=True)
        except (FileNotFoundError, FileChanged):
            return False  # gone or of another length meanwhile
        return theirs.digest() == mine.digest()

    def _rename(self, s: _Session, part: str, final: str) -> None:
        try:
            s.sftp.posix_rename(part, final)
        except OSError as exc:
            if exc.errno is not None:
                raise
            # posix-rename unsupported (not OpenSSH): the plain SFTP rename refuses to replace
            if s.stat(final) is not None:
                s.sftp.remove(final)
            s.sftp.rename(part, final)

    def _listing(self, s: _Session, folder: str, me: str) -> list[str]:
        return sorted(n for n in self._sizes(s, folder) if addressed_to(n, me))

    def _download(self, s: _Session, folder: str, name: str, dest: Path) -> Path | None:
        remote = posixpath.join(folder, name)
        target = dest / name
        part = dest / (name + PART_SUFFIX)
        size = self._sizes(s, folder).get(name)  # the listing's size; the copy confirms it
        try:
            if size is None:
                raise FileNotFoundError(remote)
            h = self._open_listed(s, folder, name)
        except FileNotFoundError:
            return None  # taken meanwhile (another puller of the same folder)
        except NotRegularFileError as exc:
            self.refused.append(f"{exc} ({self.address})")
            log.warning("%s (%s); left there", exc, self.address)
            return None
        with s.closing(h, wait=False):
            if is_regular_entry(target):
                with open_regular(target) as have:
                    same = (os.fstat(have.fileno()).st_size == size
                            and self._same_tail(lambda a, b: s.read_bytes(h, a, b), have, size))
                if not same:
                    log.warning("%s: a different file of that name waits in %s; left on %s", name, dest,
                                self.address)
                    return None
                log.info("%s was already fetched; removing it from %s", name, self.address)
                fetched = False
            else:
                self._fetch(s, h, name, size, part)
                fetched = True
        if fetched:
            try:
                os.replace(part, target)
            except OSError as exc:
                raise TransportError(f"renaming {part} failed: {exc.strerror or exc}") from exc
            fsync_dir(dest)
            log.info("fetched %s from %s (%d bytes)", name, self.address, size)
        crashpoint("pull.copied")
        try:
            s.sftp.remove(remote)
        except FileNotFoundError:
            pass  # removed meanwhile by another puller: ours is durable all the same
        self._sizes(s, folder).pop(name, None)
        return target

    def _fetch(self, s: _Session, h: _Handle, name: str, size: int, part: Path) -> None:
        """Copy the open remote file into the local ``part``, resuming a partial copy; fsync it."""
        try:
            local = open_regular(part, "r+b") if is_regular_entry(part) else create_fresh(part)
        except OSError as exc:
            raise TransportError(f"cannot write {part}: {exc.strerror or exc}") from exc
        with local:
            offset = os.fstat(local.fileno()).st_size
            if offset:
                if offset <= size and self._same_tail(lambda a, b: s.read_bytes(h, a, b), local, offset):
                    log.info("resuming download of %s at byte %d of %d", name, offset, size)
                else:
                    log.info("restarting download of %s: the partial copy differs", name)
                    offset = 0
            local.seek(offset)
            local.truncate(offset)
            step = self._report(name, size)
            done = offset

            def sink(data: bytes) -> None:
                nonlocal done
                try:
                    local.write(data)
                except OSError as exc:
                    raise TransportError(f"writing {part} failed: {exc.strerror or exc}",
                                         hint="Free disk space on this node, then sync again.") from exc
                done += len(data)
                step(done)

            s.read_into(h, offset, size, sink, whole=True)
            try:
                local.flush()
                os.fsync(local.fileno())
            except OSError as exc:
                raise TransportError(f"writing {part} failed: {exc.strerror or exc}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, PipeTimeout)):
        return "timed out"
    if isinstance(exc, EOFError):
        return "the connection was closed"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)
