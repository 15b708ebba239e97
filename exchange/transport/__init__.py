"""Transports: one narrow interface, one module per kind (``dir``, ``sftp``).

A transport moves complete files between this node's spool and a place the
peer reads: ``push`` delivers files addressed to a peer, ``pull`` fetches the
files addressed to this node. Both copy to ``.part``, make the copy durable,
then rename; a source file is removed only after its copy is durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from exchange.errors import ConfigError


class Transport(Protocol):
    address: str

    def push(self, files: Sequence[Path], peer: str) -> list[Path]:
        """Deliver ``files`` to ``peer``; returns those now durable at the far side."""
        ...

    def pull(self, me: str, dest: Path) -> list[Path]:
        """Fetch every complete file addressed to ``me`` into ``dest``."""
        ...

    def close(self) -> None: ...


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
