"""Transports: one narrow interface, one module per kind (``dir``, ``drop``, ``sftp``).

A transport moves complete files between this node's spool and a place the
peer reads: ``push`` delivers files addressed to a peer, ``pull`` fetches the
files addressed to this node. Both copy to ``.part``, make the copy durable,
then rename; a source file is removed only after its copy is durable.
The USB stick (``usb``) is a visit that syncs through a ``dir`` transport.
The one conformance suite (tests/test_transport_conformance.py) runs the
same checks against each.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from exchange.errors import ConfigError


def info_name(node: str) -> str:
    """The file a node publishes its info in: ``node-<id>.json``, read by the peer's `exchange doctor`."""
    return f"node-{node}.json"


def node_info(me: str) -> dict[str, Any]:
    """What a node publishes for its peer's doctor (``publish_info``): id, version, clock."""
    from exchange import __version__

    return {"node": me, "version": __version__, "time": time.time()}


@runtime_checkable
class Transport(Protocol):
    """What every transport does; each module asserts its class satisfies this (mypy checks it).

    Errors: every method raises only ExchangeError subclasses for failures of
    the medium: ``TransportError`` (with a hint) for a refusal that will recur
    until someone acts (missing folder, permission, login, a stick not
    mounted), ``TransientTransportError`` for a broken link the next sync may
    not meet (SFTP has already retried it with backoff), ``HostKeyError``
    (a TransportError) for an unpinned or changed server key, ``ConfigError``
    for a malformed address or a missing key, ``NotRegularFileError`` when
    a folder holds the name a delivered file must take. Anything else is a bug.
    """

    address: str
    """The address the transport was opened with, for messages."""

    refused: list[str]
    """What the last ``pull`` left where it was, one message each: links, FIFOs, folders named like
    exchange files. Emptied at the start of every pull; never raised, so one planted entry cannot
    block the genuine files beside it."""

    def push(self, files: Sequence[Path], peer: str) -> list[Path]:
        """Deliver ``files`` to ``peer``; returns those now durable at the far side, in order.

        Idempotent: a file already there with the same bytes counts as delivered.
        The source files are never removed. Stops at the first failure (raised);
        files before it are delivered.
        """
        ...

    def pull(self, me: str, dest: Path) -> list[Path]:
        """Fetch every complete file addressed to ``me`` into ``dest``; returns the paths now in ``dest``.

        Idempotent: the far copy is removed only once ours is durable, and a
        file already in ``dest`` with the same bytes is not copied again.
        ``.part`` files and files for other nodes are left alone.
        """
        ...

    def probe(self, me: str, peer: str) -> dict[str, Any]:
        """For `exchange doctor`: check both folders exist and take a write (a probe file, removed).

        Returns ``server_time`` (the folder's clock, epoch seconds, when known)
        and ``peer_info`` (what ``peer`` last published, when readable).
        Leaves nothing behind; safe to repeat. Raises as above when a folder
        is missing, not writable, or the link is down.
        """
        ...

    def publish_info(self, me: str, peer: str, info: dict[str, Any]) -> None:
        """Leave ``node-<me>.json`` (id, version, clock) where ``peer`` reads it, for its doctor.

        Informative only: replaces any older copy; the folder transports log
        a failure and return, SFTP raises it after its retries, and a caller
        never fails a delivery for it.
        """
        ...

    def close(self) -> None:
        """Release connections; safe to call twice and after a failure."""
        ...


#: The forms of a peer's transport address, for the errors that refuse another.
ADDRESS_FORMS = ("dir:/absolute/folder (or the absolute folder alone), drop:/absolute/folder, "
                 "sftp://user@host[:port]/path")


def check_address(address: str) -> str:
    """``address`` if it is a transport address :func:`open_transport` opens; checked without opening it.

    For what an operator enters (``peer add --transport``): refused then, naming the value and the
    accepted forms, rather than at the next sync. A relative folder is refused too: under cron or the
    service it would be relative to another working folder.
    """
    if address.startswith("sftp://"):
        from exchange.transport.sftp.address import SftpAddress

        SftpAddress.parse(address)
        return address
    kind, path = next(((k, address[len(k) + 1:]) for k in ("dir", "drop") if address.startswith(k + ":")),
                      ("dir", address))
    if not path.strip() or "://" in address:
        raise ConfigError(f"unsupported transport address {address!r}", hint=f"Use {ADDRESS_FORMS}.")
    if not Path(path).expanduser().is_absolute():
        example = ("an SFTP server is sftp://user@host[:port]/path" if ":" in path
                   else f"e.g. {kind}:{Path(path).expanduser().absolute()}")
        raise ConfigError(f"transport address {address!r} is not an absolute folder",
                          hint=f"Give the whole path ({example}); the accepted forms are {ADDRESS_FORMS}.")
    return address


def open_transport(address: str, *, home: Path | None = None, me: str | None = None,
                   peer: str | None = None) -> Transport:
    """A transport for a peer's address: ``dir:PATH`` (or a plain path), ``sftp://...``,
    or ``drop:PATH`` (a store's up/ and down/ read directly on the SFTP server's machine)."""
    if address.startswith("sftp://"):
        from exchange.transport.sftp import SftpTransport

        transport: Transport = SftpTransport.from_address(address, home=home, me=me, peer=peer)
        return transport
    if address.startswith("drop:"):
        from exchange.transport.drop import DropTransport

        return DropTransport.from_address(address, home=home, me=me, peer=peer)
    path = address[4:] if address.startswith("dir:") else address
    if not path or "://" in path:
        raise ConfigError(f"unsupported transport address {address!r}",
                          hint="Use dir:/path/to/folder or sftp://user@host:port/root.")
    from exchange.transport.dir import DirTransport

    return DirTransport(Path(path).expanduser(), me=me)
