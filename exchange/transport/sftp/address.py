"""SFTP addresses and host keys: parsing ``sftp://`` addresses, pinning the server's key.

Split from the transport so that `exchange peer trust-host` and doctor reach
the pinning without the transfer machinery. The server's host key must be
pinned in ``<home>/known_hosts``; unknown or changed keys are refused, never
learnt silently.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paramiko
from paramiko.buffered_pipe import PipeTimeout

from exchange.errors import ConfigError, TransientTransportError, TransportError
from exchange.node.config import KNOWN_HOSTS as KNOWN_HOSTS  # re-exported
from exchange.node.perms import write_private_atomic

log = logging.getLogger(__name__)

DEFAULT_PORT = 22
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
TRUST_COMMAND = "exchange peer trust-host --home {home} --address {address}"


class HostKeyError(TransportError):
    """The server's host key is not the pinned one: refused, never retried."""

    hint = ("Compare the fingerprint with the server's own (on the server: "
            "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) before trusting it.")




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
        raise TransientTransportError(f"cannot connect to {host}:{port}: {reason(exc)}") from exc
    transport = new_transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise TransientTransportError(f"no SSH key exchange with {host}:{port}: {reason(exc)}") from exc
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


class RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
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




def new_transport(sock: Any, /, **kwargs: Any) -> paramiko.Transport:
    """A paramiko Transport preferring AES-GCM (much faster here than CTR + HMAC)."""
    transport = paramiko.Transport(sock, **kwargs)
    opts = transport.get_security_options()
    have = list(opts.ciphers)
    opts.ciphers = [c for c in FAST_CIPHERS if c in have] + [c for c in have if c not in FAST_CIPHERS]
    return transport


def reason(exc: BaseException) -> str:
    """A short operator-readable cause for a failed connection or request."""
    if isinstance(exc, (socket.timeout, PipeTimeout)):
        return "timed out"
    if isinstance(exc, EOFError):
        return "the connection was closed"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)
