"""Adding and listing peers: config entry plus a pinned key in allowed_signers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from exchange.errors import ConfigError, CryptoError, PeerKeyError
from exchange.node import keys
from exchange.node.config import NodeConfig, Peer, Role, entered_node_id
from exchange.wire.crypto import age, sshsig


def _when(text: str | None, what: str) -> datetime | None:
    if not text:
        return None
    t = text.rstrip("Z")
    for fmt in ("%Y%m%d%H%M%S", "%Y%m%d%H%M", "%Y%m%d") if t.isascii() else ():  # strptime takes any digit
        try:
            return datetime.strptime(t, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise ConfigError(f"{what} {text!r}: use YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS (UTC)")


def parse_when(text: str, what: str) -> datetime:
    """A time given on the command line (YYYYMMDD[HHMM[SS]], UTC), as ``peer add`` takes it."""
    when = _when(text, what)
    assert when is not None  # only None for an empty text
    return when


def _peer_role(cfg: NodeConfig, role: str) -> Role:
    """The peer's role, given explicitly; a store may only name its HO."""
    if role not in ("ho", "store"):
        raise ConfigError(f"peer role must be 'ho' or 'store', not {role!r}", hint="Pass --role ho or --role store.")
    if cfg.role == "store" and role == "store":
        raise ConfigError(f"{cfg.id} is a store, and a store cannot add another store as a peer: stores exchange "
                          "data only with their HO, which checks that each store writes only its own documents",
                          hint="Add the head office with --role ho; store data reaches other stores through it.")
    return "ho" if role == "ho" else "store"


@dataclass(frozen=True)
class Added:
    """What ``peer add`` did: the trust line written, and what ``--replace`` retired."""

    line: str
    retired: tuple[str, ...] = ()  # fingerprints given a valid-before of ``at``
    old_recipient: str | None = None  # the recipient replaced
    at: datetime | None = None  # when the replacement took effect
    existed: bool = False


@dataclass(frozen=True)
class _Change:
    """How the offered keys (or role) differ from what is pinned for an existing peer."""

    pinned: tuple[str, ...]  # fingerprints of the keys valid now
    offered: str
    old_recipient: str | None
    new_recipient: str
    old_role: str | None
    new_role: str

    @property
    def key(self) -> bool:
        return self.offered not in self.pinned

    @property
    def recipient(self) -> bool:
        return self.old_recipient != self.new_recipient

    @property
    def role(self) -> bool:
        return self.old_role is not None and self.old_role != self.new_role

    def warning(self, peer_id: str) -> str:
        return (f"peer {peer_id} already exists with a different identity; nothing was changed.\n"
                f"pinned signing key:  {', '.join(self.pinned) or 'none'}\n"
                f"offered signing key: {self.offered}\n"
                f"pinned recipient:    {self.old_recipient or 'none'}\n"
                f"offered recipient:   {self.new_recipient}\n"
                + (f"pinned role:         {self.old_role}\noffered role:        {self.new_role}\n" if self.role else "")
                + "Someone could be impersonating this peer, or it really has new keys (a new PC, a key rotation).")


def _change(cfg: NodeConfig, peer_id: str, new_key: Any, recipient: str, role: Role,
            now: datetime) -> _Change | None:
    """None for a new peer, or one whose pinned keys and role are the offered ones."""
    old = cfg.peers.get(peer_id)
    pinned = [s for s in keys.load_trust(cfg).signers if s.principals == (peer_id,)]
    if old is None and not pinned:
        return None
    current = tuple(sorted({sshsig.fingerprint(s.key) for s in pinned
                            if s.valid_before is None or s.valid_before > now}))
    c = _Change(current, sshsig.fingerprint(new_key), old.recipient if old else None, recipient,
                old.role if old else None, role)
    return c if c.key or c.recipient or c.role else None


def add_peer(cfg: NodeConfig, peer_id: str, role: str, signing_key: str, recipient: str,
             transport: str | None = None, groups: tuple[str, ...] = (),
             valid_after: str | None = None, valid_before: str | None = None,
             replace: bool = False) -> Added:
    """Record a peer and pin its signing key; an existing peer's keys change only with ``replace``.

    ``replace`` retires the old signing key (``valid-before`` now: what it
    signed before stays valid, nothing it signs later is) and pins the new one
    from now (``valid-after``). Re-adding a peer with the keys it already has
    only updates its transport and groups.
    """
    entered_node_id(peer_id)
    if peer_id == cfg.id:
        raise ConfigError(f"{peer_id} is this node itself")
    peer_role = _peer_role(cfg, role)
    try:
        age.parse_recipient(recipient)
    except CryptoError as exc:
        raise PeerKeyError(f"bad age recipient for peer {peer_id}: {exc}") from exc
    try:
        new_key = sshsig.parse_public_line(signing_key)
    except CryptoError as exc:
        raise PeerKeyError(f"bad signing key for peer {peer_id}: {exc}") from exc
    after, before = _when(valid_after, "--valid-after"), _when(valid_before, "--valid-before")
    now = datetime.now(UTC).replace(microsecond=0)  # allowed_signers times have second resolution
    change = _change(cfg, peer_id, new_key, recipient, peer_role, now)
    old = cfg.peers.get(peer_id)
    retired: list[str] = []
    if change is not None and not replace:
        raise ConfigError(change.warning(peer_id),
                          hint="Compare the fingerprints with the peer's own `exchange identity`; if the new keys "
                               "are genuine, run the same command again with --replace.")
    if change is not None and change.key:
        if after or before:
            raise ConfigError("--replace sets the key times itself (the old key ends now, the new one starts now)",
                              hint="Leave out --valid-after and --valid-before.")
        retired = keys.retire_signer(cfg, peer_id, now)
        after = now
    line = keys.add_signer(cfg, peer_id, signing_key, after, before)
    cfg.peers[peer_id] = Peer(id=peer_id, role=peer_role, recipient=recipient,
                              transport=transport or (old.transport if old else None),
                              groups=tuple(groups) or (old.groups if old else ()))
    if old is not None and old.state == "paused":  # a paused store stays paused until `peer resume`
        cfg.peers[peer_id] = dataclasses.replace(cfg.peers[peer_id], state=old.state, state_since=old.state_since,
                                     state_reason=old.state_reason)
    cfg.save()
    return Added(line, tuple(retired), change.old_recipient if change and change.recipient else None,
                 now if change else None, existed=old is not None)


def set_groups(cfg: NodeConfig, peer_id: str, groups: tuple[str, ...]) -> tuple[str, ...]:
    """Move a store to other groups (keys untouched); returns the groups it had.

    Only the HO routes by group, so only the HO's config says where a store
    belongs; the caller re-routes the store's documents afterwards.
    """
    old = cfg.peers.get(peer_id)
    if old is None:
        raise ConfigError(f"no peer {peer_id!r} in {cfg.home / 'exchange.toml'}",
                          hint="`exchange peer list` shows the peers; add a new store with `exchange peer add`.")
    if cfg.role != "ho" or old.role != "store":
        raise ConfigError(f"{peer_id} is not a store of this head office: only the HO routes documents by group",
                          hint="Run `exchange peer set-group` at the head office, naming one of its stores.")
    if not groups or any(not g.strip() for g in groups):
        raise ConfigError("a store needs at least one non-empty --group", hint="For example: --group south")
    cfg.peers[peer_id] = replace(old, groups=tuple(dict.fromkeys(g.strip() for g in groups)))
    cfg.save()
    return old.groups


def list_peers(cfg: NodeConfig) -> list[dict[str, Any]]:
    trust = keys.load_trust(cfg)
    out = []
    for p in sorted(cfg.peers.values(), key=lambda p: p.id):
        fps = [sshsig.fingerprint(s.key) for s in trust.signers if p.id in s.principals]
        out.append({"id": p.id, "role": p.role, "recipient": p.recipient, "transport": p.transport,
                    "groups": list(p.groups), "fingerprints": fps, "state": p.state,
                    "state_since": p.state_since, "state_reason": p.state_reason})
    return out
