"""The SFTP transport: paramiko to the HO's OpenSSH server, one chrooted account per store.

Address: ``sftp://user@host:port/PATH``, where PATH is the folder holding one
store's ``up/`` (store to HO) and ``down/`` (HO to store). A store's chrooted
account sees its own folder as ``/`` (``sftp://xs001@ho.example:2222/``); the
HO reaching the same folder without a chroot names it in full
(``sftp://xchg@ho.example:2222/srv/xchg/s001``). The node's role decides the
direction: a store pushes to ``up/`` and pulls from ``down/``, the HO the reverse.

Promises, as for every transport:

- Upload to ``name.part``, ask the server to fsync it (``fsync@openssh.com``;
  not on stock paramiko, which has no call for it), then
  ``posix-rename@openssh.com`` into place: the peer never sees a partial
  file under a complete name.
- Download to a local ``.part``, fsync, rename, and only then remove the remote file.
- An interrupted upload resumes from the server's ``.part`` only when that is
  a regular file (``lstat``, then ``fstat`` of the open handle agrees) whose
  whole existing prefix hashes like the local file's; otherwise the upload
  starts over in a ``.part`` created fresh (``O_CREAT | O_EXCL``: never opened
  through a link or over a FIFO someone left at that name). An interrupted
  download resumes once the last MiB of the local partial copy matches.
- Nothing but a regular file is opened on the server: each remote file is
  ``lstat``-ed in the same flight as its open (no extra round trip; on stock
  paramiko before it, and the open handle's ``fstat`` must agree), and links,
  FIFOs, sockets, devices and folders named like exchange files are refused,
  left where they are and reported (``refused``).
- Login with the node's Ed25519 key; the server's host key must be pinned in
  ``<home>/known_hosts`` (``exchange peer trust-host``). Unknown or changed
  keys are refused, never learnt silently.
- A broken link (refused, reset, timeout, EOF) is a TransientTransportError,
  retried with exponential backoff; refusals (host key, login, permission,
  missing folder) are TransportErrors with a hint and are not retried.

The module is split by job: :mod:`.address` parses addresses and pins host
keys; :mod:`.session` is what the transport asks of the server, on
paramiko's public API; :mod:`.fastpath` does the same several times faster
with paramiko internals, and is used only when a check at first use finds
them all; retries go through :func:`exchange.transport.retry.with_retry`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import posixpath
import socket
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import paramiko
from paramiko.buffered_pipe import PipeTimeout
from paramiko.ssh_exception import IncompatiblePeer

from exchange.errors import ConfigError, ExchangeError, NotRegularFileError, TransientTransportError, TransportError
from exchange.faults import crashpoint
from exchange.files import create_fresh, fsync_dir, is_regular_entry, kind_of, open_regular
from exchange.node.config import Role
from exchange.node.perms import check_not_writable_by_others
from exchange.transport import Transport, info_name, node_info
from exchange.transport.drop import addressed_to, incoming, outgoing, resolve_side
from exchange.transport.retry import Retry, with_retry
from exchange.transport.sftp.address import (
    TRUST_COMMAND, HostKeyError, RefuseUnknownHost, SftpAddress, known_hosts_path, load_login_key, new_transport,
    reason,
)
from exchange.transport.sftp.account import UNLOCK, account_problem, is_this_machine
from exchange.transport.sftp.session import FileChanged, Handle, Session, StockSession, not_regular
from exchange.wire.formats import PART_SUFFIX

log = logging.getLogger(__name__)

T = TypeVar("T")

TAIL_CHECK = 1 << 20            # bytes compared before trusting a partial or existing copy

Progress = Callable[[str, int, int], None]
"""``progress(file_name, bytes_done, bytes_total)``, called as data moves."""


@functools.cache
def session_kind() -> type[Session]:
    """The fast path if this paramiko has every internal it uses, else stock paramiko (checked once)."""
    try:
        from exchange.transport.sftp.fastpath import FastSession, missing_internals
    except (ImportError, AttributeError) as exc:
        missing = [f"paramiko.sftp names ({exc})"]
    else:
        missing = missing_internals()
        if not missing:
            return FastSession
    log.warning("paramiko %s lacks what the SFTP fast path uses (%s): using stock paramiko SFTP, "
                "slower but equivalent", paramiko.__version__, ", ".join(missing))
    return StockSession


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
        self._session: Session | None = None
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
        def run(s: Session) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for sub in (outgoing(self.side), incoming(self.side)):
                folder = self.folder(sub)
                self._sizes(s, folder)  # exists?
                test = s.put_bytes(posixpath.join(folder, f".probe-{me}{PART_SUFFIX}"), b"probe")
                attrs = s.stat(test)
                out["server_time"] = attrs.st_mtime if attrs else None
                s.sftp.remove(test)
            info = info_name(peer)
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
        target = posixpath.join(self.folder(outgoing(self.side)), info_name(me))
        data = json.dumps(info).encode()

        def run(s: Session) -> None:
            self._rename(s, s.put_bytes(target + PART_SUFFIX, data), target)
        self._attempt("publishing node info", run)

    def close(self) -> None:
        self._drop()

    # -- connecting and retrying --------------------------------------------------

    def _connect(self) -> Session:
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            check_not_writable_by_others(self.known_hosts, "known hosts file")
            try:
                client.load_host_keys(str(self.known_hosts))
            except (OSError, ValueError, paramiko.SSHException) as exc:
                raise ConfigError(f"cannot read {self.known_hosts}: {exc}",
                                  hint="Fix or remove the bad line, then run `exchange peer trust-host`.") from exc
        client.set_missing_host_key_policy(RefuseUnknownHost(self.home, self.address))
        try:
            client.connect(self.addr.host, self.addr.port, username=self.addr.user, pkey=self.key,
                           timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout,
                           channel_timeout=self.timeout, allow_agent=False, look_for_keys=False,
                           transport_factory=new_transport)
            transport = client.get_transport()
            if transport is None:
                raise paramiko.SSHException("no transport after connect")
            transport.set_keepalive(15)
            kind = session_kind()
            channel = kind.open_channel(transport, self.timeout)
            channel.settimeout(self.idle_timeout)
            channel.invoke_subsystem("sftp")
            session = kind.start(client, channel)
        except BaseException:
            client.close()
            raise
        log.debug("connected to %s (cipher %s, %s path)", self.address,
                  getattr(transport, "remote_cipher", "?"), "fast" if session.fast else "stock paramiko")
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

    def _attempt(self, what: str, op: Callable[[Session], T]) -> T:
        """Run ``op`` on a live session; reconnect and retry transient failures with backoff."""
        return with_retry(lambda: op(self._live()), policy=self.retry,
                          classify=lambda exc: self._failed(exc, what),
                          after_failure=self._after_failure, where=self.address, logger=log)

    def _live(self) -> Session:
        if self._session is None:
            self._session = self._connect()
        return self._session

    def _failed(self, exc: Exception, what: str) -> ExchangeError | None:
        self._listings.clear()  # whatever happened, list again before trusting sizes
        self._modes.clear()
        return self._classify(exc, what)

    def _after_failure(self, err: ExchangeError) -> None:
        """A broken link is dropped (the retry reconnects); a refusal keeps a live one."""
        if err.transient or (self._session is not None and not self._session.alive()):
            self._drop()

    def _login_refused(self, where: str) -> TransportError:
        """A refused login: the account's own problem when this machine can see it, else both causes."""
        user = self.addr.user
        refused = f"{where}: the server refused the login of {user!r} with key {self.key.fingerprint}"
        problem = account_problem(user) if is_this_machine(self.addr.host) else None
        if problem is not None:
            return TransportError(f"{refused}: {problem[0]}", hint=problem[1])
        return TransportError(
            f"{refused}: the key is not in that account's authorized keys, or the account may not log in "
            "(locked, as `useradd --system` leaves it, or missing)",
            hint=f"On the server: put the node's public key (keys/node_ed25519.pub) in the account's "
                 f"authorized keys; `passwd -S {user}` shows L for a locked account: "
                 f"{UNLOCK.format(user=user)} unlocks it for key logins (docs/SFTP.md).")

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
            return self._login_refused(where)
        if isinstance(exc, IncompatiblePeer):
            return TransportError(f"{where}: no common SSH algorithms with the server: {exc}",
                                  hint="The server needs a current OpenSSH (Ed25519, curve25519, AES).")
        alive = self._session is not None and self._session.alive()
        if isinstance(exc, (paramiko.SSHException, EOFError, PipeTimeout, socket.timeout, ConnectionError)) \
                or (isinstance(exc, OSError) and not alive):
            return TransientTransportError(f"{where}: {reason(exc)}")
        if isinstance(exc, OSError):  # the server answered, and said no
            if exc.errno == errno.ENOENT:
                return TransportError(f"{where}: no such file or folder on the server",
                                      hint="Check the folder in the address: a store's chrooted account "
                                           "sees its own folder as / (docs/SFTP.md).")
            if exc.errno == errno.EACCES:
                return TransportError(f"{where}: permission denied by the server",
                                      hint="up/ and down/ must be writable by the account (docs/SFTP.md).")
            return TransportError(f"{where}: the server refused: {reason(exc)}",
                                  hint="Check free space and permissions on the server.")
        return None

    # -- the work -------------------------------------------------------------

    def _sizes(self, s: Session, folder: str) -> dict[str, int]:
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

    def _open_listed(self, s: Session, folder: str, name: str) -> Handle:
        """Open ``folder/name`` for reading only if it is a regular file.

        What the listing (OpenSSH fills it from ``lstat``) shows as a link, FIFO
        or folder is refused without any request: an open of a FIFO would block
        the server's sftp process. The rest is ``lstat``-ed with its open
        (:meth:`Session.open_regular`), which catches a link swapped in since.
        """
        path = posixpath.join(folder, name)
        mode = self._modes.get(folder, {}).get(name, stat.S_IFREG)
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
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

    def _upload(self, s: Session, src: Path, folder: str) -> None:
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
                s.write_durably(h, local, offset, size, self._report(src.name, size))
        self._rename(s, part, final)
        sizes[src.name] = size
        log.info("sent %s to %s (%d bytes)", src.name, self.address, size)

    def _already_there(self, s: Session, folder: str, name: str, local: IO[bytes], size: int) -> bool:
        """Is ``folder/name`` a regular file holding exactly ``local``'s bytes? (a link or FIFO there: no,
        and the rename replaces it as an entry)"""
        try:
            h = self._open_listed(s, folder, name)
        except (FileNotFoundError, NotRegularFileError) as exc:
            log.info("%s: not a usable copy on the server (%s); sending it", name, exc)
            return False
        with s.closing(h, wait=False):
            return self._same_prefix(s, h, local, size)

    def _resumable(self, s: Session, part: str, local: IO[bytes], size: int) -> tuple[Handle | None, int]:
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
            h = s.open_rw(part)
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
    def _same_prefix(s: Session, h: Handle, local: IO[bytes], length: int) -> bool:
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

    def _rename(self, s: Session, part: str, final: str) -> None:
        try:
            s.sftp.posix_rename(part, final)
        except OSError as exc:
            if exc.errno is not None:
                raise
            # posix-rename unsupported (not OpenSSH): the plain SFTP rename refuses to replace
            if s.stat(final) is not None:
                s.sftp.remove(final)
            s.sftp.rename(part, final)

    def _listing(self, s: Session, folder: str, me: str) -> list[str]:
        return sorted(n for n in self._sizes(s, folder) if addressed_to(n, me))

    def _download(self, s: Session, folder: str, name: str, dest: Path) -> Path | None:
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

    def _fetch(self, s: Session, h: Handle, name: str, size: int, part: Path) -> None:
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


_: type[Transport] = SftpTransport  # mypy checks the class against the Transport protocol
