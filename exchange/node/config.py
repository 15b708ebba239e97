"""The node home and ``exchange.toml``: node id, role, database, peers, schedule.

Peers' signing keys live in ``keys/allowed_signers`` (the OpenSSH trust store),
everything else about a peer in ``exchange.toml``.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from exchange.errors import ConfigError, FormatError, NodeIdError
from exchange.wire.formats import check_node_id

Role = Literal["ho", "store"]
PeerState = Literal["active", "paused", "removed"]
PEER_STATES: tuple[PeerState, ...] = ("active", "paused", "removed")
CONFIG_NAME = "exchange.toml"
KNOWN_HOSTS = "known_hosts"  # pinned SFTP host keys (transport/sftp/address.py), named here for `exchange doctor`
HOME_ENV = "EXCHANGE_HOME"


@dataclass
class Peer:
    id: str
    role: Role
    recipient: str
    transport: str | None = None
    groups: tuple[str, ...] = ()
    #: ``active``; ``paused`` (nothing sent to or fetched from it, its documents still queued for it);
    #: ``removed`` (retired: no routing, no traffic, keys retired, history kept). See docs/OPERATIONS.md.
    state: PeerState = "active"
    state_since: str | None = None  # RFC 3339 UTC, when the state was set
    state_reason: str | None = None

    @property
    def exchanging(self) -> bool:
        """Files go to and come from this peer (it is neither paused nor removed)."""
        return self.state == "active"

    @property
    def routed(self) -> bool:
        """New documents are queued for this peer (a paused store keeps receiving them in its queue)."""
        return self.state != "removed"


@dataclass
class NodeConfig:
    home: Path
    id: str
    role: Role
    database: str
    sync_interval: int = 900
    resend_after: int = 3600
    parked_retry_interval: int = 300  # seconds between the service's retries of parked documents (0: off)
    max_bundle_rows: int = 20_000
    max_clock_skew: int = 300  # seconds a peer's signed times may be off ours before it is reported
    auditors: tuple[str, ...] = ()
    peers: dict[str, Peer] = field(default_factory=dict)
    catalog: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: what :func:`load` read (as :meth:`to_toml` gives it): :meth:`save` writes only what changed since,
    #: so an edit another process made to the file meanwhile (a `peer pause` while the service runs) stays
    loaded: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    # folders (docs/ARCHITECTURE.md "Node home")
    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def outbox(self) -> Path:
        return self.home / "outbox"

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def archive_sent(self) -> Path:
        return self.home / "archive" / "sent"

    @property
    def archive_received(self) -> Path:
        return self.home / "archive" / "received"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def work(self) -> Path:
        """Scratch space on the same filesystem as the spool (renames stay atomic)."""
        return self.home / ".work"

    def folders(self) -> list[Path]:
        return [self.keys_dir, self.outbox, self.inbox, self.archive_sent,
                self.archive_received, self.quarantine, self.work]

    def peer(self, peer_id: str) -> Peer:
        try:
            return self.peers[peer_id]
        except KeyError:
            known = ", ".join(sorted(self.peers)) or "none"
            raise ConfigError(f"unknown peer {peer_id!r} (known peers: {known})",
                              hint="Add it with `exchange peer add`.") from None

    def to_toml(self) -> dict[str, Any]:
        node: dict[str, Any] = {
            "id": self.id, "role": self.role, "database": self.database,
            "sync_interval": self.sync_interval, "resend_after": self.resend_after,
            "parked_retry_interval": self.parked_retry_interval,
            "max_bundle_rows": self.max_bundle_rows, "max_clock_skew": self.max_clock_skew,
            "auditors": list(self.auditors),
        }
        peers: dict[str, Any] = {}
        for p in self.peers.values():
            entry: dict[str, Any] = {"role": p.role, "recipient": p.recipient, "groups": list(p.groups)}
            if p.transport:
                entry["transport"] = p.transport
            if p.state != "active":
                entry["state"] = p.state
                entry.update({k: v for k, v in (("state_since", p.state_since), ("state_reason", p.state_reason))
                              if v})
            peers[p.id] = entry
        out: dict[str, Any] = {"node": node, "peers": peers}
        if self.catalog:
            out["catalog"] = self.catalog
        out.update(self.extra)
        return out

    def save(self) -> None:
        """Write ``exchange.toml`` (0600, atomically), editing the file in place.

        The operator's comments, order and layout stay: only the values that
        changed since :func:`load` are rewritten, new peers are appended. A
        home without the file (``exchange init``) gets the commented template
        of every setting.
        """
        import tomlkit

        from exchange.node import settings
        from exchange.node.perms import write_private_atomic

        path = self.home / CONFIG_NAME
        data = self.to_toml()
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = settings.template(data["node"])
        doc = tomlkit.parse(text)
        written = doc.get("node")
        for s in settings.NODE.settings:  # a default the operator left out stays out
            if isinstance(written, Mapping) and s.key not in written and data["node"].get(s.key) == s.default:
                del data["node"][s.key]
        _merge(doc, data, self.loaded, top=True)
        write_private_atomic(path, tomlkit.dumps(doc).encode())
        self.loaded = copy.deepcopy(self.to_toml())


def _merge(target: MutableMapping[str, Any], new: Mapping[str, Any], old: Mapping[str, Any] | None, *,
           top: bool = False) -> None:
    """Make ``target`` (a tomlkit table) hold ``new``, leaving alone what is equal (and its comments).

    With ``old`` (what was loaded), only what changed from ``old`` to ``new``
    is applied: what this process did not change stays as the file says now.
    A key gone from ``new`` is removed, except a whole section at the top
    (an empty ``[catalog]`` the operator keeps for later stays).
    """
    import tomlkit
    from tomlkit.items import Item

    for key in [k for k in target if k not in new and not top and (old is None or k in old)]:
        del target[key]
    for key, value in new.items():
        current = target.get(key)
        before = old.get(key) if old is not None else None
        if old is not None and key in old and before == value:
            continue  # unchanged here since loaded
        if isinstance(value, Mapping) and isinstance(current, MutableMapping):
            _merge(current, value, before if isinstance(before, Mapping) else None)
            continue
        plain = current.unwrap() if isinstance(current, Item) else current
        if key in target and plain == value:
            continue
        if isinstance(value, Mapping) and not top and key not in target and all(
                not isinstance(v, Mapping) for v in value.values()):
            table = tomlkit.table()
            table.update(value)
            if hasattr(target, "add"):
                target.add(tomlkit.nl())  # a blank line before an appended [peers.<id>]
            target[key] = table
        else:
            target[key] = value


def resolve_home(home: str | Path | None) -> Path:
    if home is None:
        env = os.environ.get(HOME_ENV)
        if not env:
            raise ConfigError("no node home given", hint=f"Pass --home DIR or set {HOME_ENV}.")
        home = env
    return Path(home).expanduser().resolve()


def default_database(home: Path) -> str:
    return f"sqlite:///{home / 'exchange.db'}"


def _role(value: Any, where: str) -> Role:
    if value not in ("ho", "store"):
        raise ConfigError(f"{where}: role must be 'ho' or 'store', not {value!r}")
    return "ho" if value == "ho" else "store"


def _peer_state(value: Any, where: str) -> PeerState:
    if value not in PEER_STATES:
        raise ConfigError(f"{where}: state must be one of {', '.join(PEER_STATES)}, not {value!r}",
                          hint="Change it with `exchange peer pause`, `peer resume` or `peer remove`.")
    return "paused" if value == "paused" else "removed" if value == "removed" else "active"


def _node_id(value: Any, where: str) -> str:
    try:
        return check_node_id(str(value))
    except FormatError as exc:
        raise NodeIdError(f"{where}: {exc}") from exc


def entered_node_id(value: str) -> str:
    """A node id typed by an operator (``init --node``, ``peer add --peer``): NodeIdError, not a bundle's error."""
    try:
        return check_node_id(value)
    except FormatError as exc:
        raise NodeIdError(str(exc)) from exc


def load(home: str | Path | None, *, check_modes: bool = True) -> NodeConfig:
    """Read ``<home>/exchange.toml``; ConfigError with the file and problem if bad.

    A home or config another account can write is refused (``check_modes``
    off only for ``exchange doctor``, which reports it among its checks).
    """
    from exchange.node import settings
    from exchange.node.perms import check_not_writable_by_others

    root = resolve_home(home)
    path = root / CONFIG_NAME
    if check_modes:
        check_not_writable_by_others(root, "node home")
        check_not_writable_by_others(path, "config")
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: {root} is not a node home",
                          hint="Create one with `exchange init --home DIR --node ID --role ho|store`.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    settings.check(data, path, text)
    node = data.get("node")
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: missing [node] table")
    where = f"{path} [node]"
    try:
        cfg = NodeConfig(
            home=root,
            id=_node_id(node.get("id"), where),
            role=_role(node.get("role"), where),
            database=str(node.get("database") or default_database(root)),
            sync_interval=int(node.get("sync_interval", 900)),
            resend_after=int(node.get("resend_after", 3600)),
            parked_retry_interval=int(node.get("parked_retry_interval", 300)),
            max_bundle_rows=int(node.get("max_bundle_rows", 20_000)),
            max_clock_skew=int(node.get("max_clock_skew", 300)),
            auditors=tuple(str(a) for a in node.get("auditors", ())),
            catalog=dict(data.get("catalog", {})),
            extra={k: v for k, v in data.items() if k not in ("node", "peers", "catalog")},
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    for pid, p in (data.get("peers") or {}).items():
        pw = f"{path} [peers.{pid}]"
        if not isinstance(p, dict) or "recipient" not in p:
            raise ConfigError(f"{pw}: needs at least role and recipient")
        cfg.peers[pid] = Peer(
            id=_node_id(pid, pw), role=_role(p.get("role"), pw), recipient=str(p["recipient"]),
            transport=p.get("transport"), groups=tuple(str(g) for g in p.get("groups", ())),
            state=_peer_state(p.get("state", "active"), pw),
            state_since=str(p["state_since"]) if p.get("state_since") else None,
            state_reason=str(p["state_reason"]) if p.get("state_reason") else None)
        if cfg.role == "store" and cfg.peers[pid].role == "store":  # as `peer add` refuses it, so does loading
            raise ConfigError(f"{pw}: a store exchanges data only with its HO, not with store {pid}",
                              hint=f"Remove [peers.{pid}] from {path}; stores never trust each other's keys.")
    cfg.loaded = copy.deepcopy(cfg.to_toml())
    return cfg
