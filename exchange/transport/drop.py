"""The drop transport: one store's ``up/`` and ``down/`` folders on a local disk.

The HO's SFTP server keeps, per store, a folder holding ``up/`` (store to HO)
and ``down/`` (HO to store). An HO running on that same machine reads and
writes those folders directly (``drop:/srv/xchg/s001``) instead of logging in
to its own server. Same promises as the folder transport: copy to ``.part``,
fsync, rename; a source is removed only after its copy is durable.

Which folder is whose follows the node's role, so one address works for both
ends: a store pushes to ``up/`` and pulls from ``down/``; the HO the reverse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exchange.errors import ConfigError, NotRegularFileError, TransportError
from exchange.files import fsync_dir, write_file_atomic
from exchange.node.config import Role
from exchange.transport import Transport, info_name, node_info
from exchange.transport.dir import durable_copy, probe_folders, real_folder, same_file_there, take_file
from exchange.wire.formats import is_exchange_file, parse_name

log = logging.getLogger(__name__)

UP = "up"      # store -> HO
DOWN = "down"  # HO -> store


def resolve_side(home: Path | None, side: str | None) -> Role:
    """The node's role (``ho`` or ``store``): decides which of up/down it writes."""
    if side is None:
        if home is None:
            raise ConfigError("cannot tell whether this node is the HO or a store",
                              hint="Open the transport with the node's home (its exchange.toml names the role).")
        from exchange.node.config import load

        side = load(home).role
    if side not in ("ho", "store"):
        raise ConfigError(f"side must be 'ho' or 'store', not {side!r}")
    return "ho" if side == "ho" else "store"


def outgoing(side: Role) -> str:
    return DOWN if side == "ho" else UP


def incoming(side: Role) -> str:
    return UP if side == "ho" else DOWN


def addressed_to(name: str, me: str) -> bool:
    """A complete bundle or ack for ``me`` (``.part`` and foreign files are left alone)."""
    return is_exchange_file(name) and parse_name(name).b == me


class DropTransport:
    """A store's folder pair on this machine; see the module docstring."""

    def __init__(self, root: Path, *, side: Role, me: str | None = None) -> None:
        self.root = root
        self.side = side
        self.me = me
        self.address = f"drop:{root}"
        self.refused: list[str] = []  # what the last pull left alone: links, FIFOs, folders named like files

    @classmethod
    def from_address(cls, address: str, *, home: Path | None = None, me: str | None = None,
                     peer: str | None = None, side: str | None = None) -> DropTransport:
        path = address[len("drop:"):] if address.startswith("drop:") else address
        if not path:
            raise ConfigError(f"drop address {address!r} names no folder",
                              hint="Use drop:/srv/xchg/<store> (the folder holding up/ and down/).")
        return cls(Path(path).expanduser(), side=resolve_side(home, side), me=me)

    def _folder(self, sub: str) -> Path:
        return real_folder(self.root / sub, "folder",
                           "Create up/ and down/ in the store's folder, owned by the store's "
                           "account (docs/SFTP.md).")

    def push(self, files: Sequence[Path], peer: str) -> list[Path]:
        box = self._folder(outgoing(self.side))
        done = []
        for f in files:
            target = box / f.name
            try:
                if same_file_there(target, f):
                    done.append(f)  # already delivered (a re-push after a crash)
                    continue
                durable_copy(f, target)
            except OSError as exc:
                raise TransportError(f"copying {f.name} to {box} failed: {exc.strerror or exc}",
                                     hint="Check free space and the folder's owner and mode (docs/SFTP.md).") from exc
            done.append(f)
        if self.me and done:
            self.publish_info(self.me, peer, node_info(self.me))
        return done

    def pull(self, me: str, dest: Path) -> list[Path]:
        box = self._folder(incoming(self.side))
        self.refused = []
        got = []
        for src in sorted(box.iterdir()):
            if not addressed_to(src.name, me):
                continue
            target = dest / src.name
            try:
                if not take_file(src, target, box):
                    continue
                fsync_dir(box)
            except FileNotFoundError:
                continue  # taken meanwhile by another puller of the same folder
            except NotRegularFileError as exc:  # a link, FIFO or folder the store planted: left alone
                self.refused.append(str(exc))
                log.warning("%s", exc)
                continue
            except OSError as exc:
                raise TransportError(f"taking {src.name} from {box} failed: {exc.strerror or exc}") from exc
            got.append(target)
        return got

    def publish_info(self, me: str, peer: str, info: dict[str, Any]) -> None:
        """Leave ``node-<me>.json`` where ``peer`` pulls from, for its doctor (best effort)."""
        target = self.root / outgoing(self.side) / info_name(me)
        try:
            write_file_atomic(self._folder(outgoing(self.side)) / target.name, json.dumps(info).encode())
        except (OSError, TransportError, NotRegularFileError) as exc:
            log.debug("could not publish %s: %s", target, exc)

    def probe(self, me: str, peer: str) -> dict[str, Any]:
        """Both folders writable; the folder's clock; the peer's published info."""
        boxes = [self._folder(sub) for sub in (outgoing(self.side), incoming(self.side))]
        return probe_folders(boxes, me, self.root / incoming(self.side) / info_name(peer))

    def close(self) -> None:
        pass


_: type[Transport] = DropTransport  # mypy checks the class against the Transport protocol
