"""Pause, resume and remove a peer: the store that closes for a refit, and the one that closes for good.

A paused peer keeps its place: documents routed to it queue up (PENDING) and go
with the first sync after ``resume``; nothing is sent to it or fetched from it
meanwhile, and what arrives anyway is still applied. A removed peer is retired:
nothing is routed to it any more, its signing keys are given a ``valid-before``
of the removal (what it signed before stays verifiable in the archive, nothing
it signs later is accepted), and its history stays in the database and the
archive. Removal either waits until everything on the way is delivered and
acknowledged (``drain``) or says, in the journal, that it is given up
(``abandon``). Every step is recorded in the operators' journal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from sqlalchemy import Connection, func, select, update

from exchange.database import journal
from exchange.database.tables import xchg_broadcast, xchg_delivery, xchg_received, xchg_sent, xchg_stream_out
from exchange.errors import ConfigError
from exchange.files import move_entry, utc_now
from exchange.node import keys
from exchange.node.config import Peer, PeerState
from exchange.node.home import Node
from exchange.vocabulary import DocStatus, ReceivedStatus, SentStatus
from exchange.wire.formats import is_exchange_file, parse_name

_OPEN_DOCS = (DocStatus.PENDING, DocStatus.EXPORTED, DocStatus.UPLOADED)
_OPEN_BUNDLES = (SentStatus.EXPORTED, SentStatus.UPLOADED)
_STUCK_IN = (ReceivedStatus.WAITING, ReceivedStatus.HELD, ReceivedStatus.FAILED, ReceivedStatus.RECEIVED)


@dataclass(frozen=True)
class Outstanding:
    """What is still on the way between this node and one peer."""

    documents: int  # routed to the peer, not yet acknowledged
    bundles: int  # sealed for the peer, not yet acknowledged
    broadcast_behind: bool  # documents for every store the peer's stream has not reached
    received: int  # bundles from the peer not applied (waiting, held, failed)
    outbox: int  # files for the peer in the outbox, not yet delivered

    @property
    def empty(self) -> bool:
        return not (self.documents or self.bundles or self.broadcast_behind or self.received or self.outbox)

    def describe(self) -> str:
        parts = [f"{self.documents} document{'s' * (self.documents != 1)} not yet acknowledged"
                 if self.documents else "",
                 f"{self.bundles} bundle{'s' * (self.bundles != 1)} sent but not acknowledged" if self.bundles else "",
                 "documents for every store it has not received yet" if self.broadcast_behind else "",
                 f"{self.received} bundle{'s' * (self.received != 1)} from it not applied" if self.received else "",
                 f"{self.outbox} file{'s' * (self.outbox != 1)} in the outbox for it" if self.outbox else ""]
        return "; ".join(p for p in parts if p) or "nothing"


@dataclass(frozen=True)
class Removed:
    peer: str
    mode: Literal["drain", "abandon"]
    retired_keys: tuple[str, ...]
    abandoned: Outstanding


def outstanding(node: Node, peer_id: str) -> Outstanding:
    peer = node.cfg.peer(peer_id)
    with node.engine.connect() as conn:
        return _outstanding(conn, node, peer)


def _outstanding(conn: Connection, node: Node, peer: Peer) -> Outstanding:
    def count(q: object) -> int:
        return int(conn.execute(q).scalar() or 0)  # type: ignore[call-overload]

    docs = count(select(func.count()).select_from(xchg_delivery).where(
        xchg_delivery.c.peer == peer.id, xchg_delivery.c.status.in_(_OPEN_DOCS)))
    bundles = count(select(func.count()).select_from(xchg_sent).where(
        xchg_sent.c.peer == peer.id, xchg_sent.c.status.in_(_OPEN_BUNDLES)))
    received = count(select(func.count()).select_from(xchg_received).where(
        xchg_received.c.peer == peer.id, xchg_received.c.status.in_(_STUCK_IN)))
    behind = False
    if peer.role == "store" and node.cfg.role == "ho":
        newest = conn.execute(select(func.max(xchg_broadcast.c.version))).scalar()
        cursor = conn.execute(select(func.min(xchg_stream_out.c.bc_version))  # its lanes: the one behind
                              .where(xchg_stream_out.c.peer == peer.id)).scalar()
        behind = newest is not None and (cursor or 0) < newest
    return Outstanding(docs, bundles, behind, received, len(_outbox_files(node, peer.id)))


def _outbox_files(node: Node, peer_id: str) -> list[str]:
    out = node.cfg.outbox
    if not out.is_dir():
        return []
    return sorted(f.name for f in out.iterdir() if is_exchange_file(f.name) and parse_name(f.name).b == peer_id)


def _set_state(node: Node, peer: Peer, state: PeerState, reason: str | None, at: datetime) -> None:
    node.cfg.peers[peer.id] = replace(peer, state=state, state_since=at.isoformat().replace("+00:00", "Z"),
                                      state_reason=reason)
    node.cfg.save()


def pause(node: Node, peer_id: str, reason: str) -> Peer:
    """Stop sending to and fetching from a peer; its documents keep queueing."""
    peer = node.cfg.peer(peer_id)
    if peer.state == "removed":
        raise ConfigError(f"peer {peer_id} was removed on {peer.state_since}: there is nothing to pause",
                          hint="A removed store comes back with `exchange peer add --replace` and its keys.")
    if peer.state == "paused":
        raise ConfigError(f"peer {peer_id} is already paused since {peer.state_since} ({peer.state_reason})",
                          hint=f"Resume it with `exchange peer resume --peer {peer_id}`.")
    now = utc_now()
    with node.engine.begin() as conn:
        journal.record(conn, "peer pause", peer_id, reason=reason)
        _set_state(node, peer, "paused", reason, now)  # config written inside the journal's transaction
    return node.cfg.peer(peer_id)


def resume(node: Node, peer_id: str, reason: str | None = None) -> Outstanding:
    """Exchange with a paused peer again; returns what waits for the next sync."""
    peer = node.cfg.peer(peer_id)
    if peer.state != "paused":
        raise ConfigError(f"peer {peer_id} is {peer.state}, not paused",
                          hint="`exchange peer list` shows each peer's state.")
    with node.engine.begin() as conn:
        journal.record(conn, "peer resume", peer_id, reason=reason, paused_since=peer.state_since,
                       paused_for=peer.state_reason)
        _set_state(node, peer, "active", None, utc_now())
        node.cfg.peers[peer_id] = replace(node.cfg.peers[peer_id], state_since=None)
        node.cfg.save()
        return _outstanding(conn, node, node.cfg.peer(peer_id))


def remove(node: Node, peer_id: str, mode: Literal["drain", "abandon"], reason: str) -> Removed:
    """Retire a peer. ``drain`` refuses while anything is on the way; ``abandon`` gives it up, on record."""
    peer = node.cfg.peer(peer_id)
    if peer.state == "removed":
        raise ConfigError(f"peer {peer_id} was already removed on {peer.state_since}")
    now = utc_now()
    with node.engine.begin() as conn:
        left = _outstanding(conn, node, peer)
        if mode == "drain" and not left.empty:
            raise ConfigError(
                f"peer {peer_id} still has {left.describe()}: removing it now would lose them",
                hint=f"Let syncs finish (`exchange status sent`, `exchange status received`) and run this again, "
                     f"or give them up on record with `exchange peer remove --peer {peer_id} --abandon "
                     f"--reason \"...\"`.")
        if not left.empty:
            conn.execute(update(xchg_delivery).where(xchg_delivery.c.peer == peer_id,
                                                     xchg_delivery.c.status.in_(_OPEN_DOCS))
                         .values(status=DocStatus.ABANDONED))
            conn.execute(update(xchg_sent).where(xchg_sent.c.peer == peer_id, xchg_sent.c.status.in_(_OPEN_BUNDLES))
                         .values(status=SentStatus.ABANDONED, reason=f"peer removed: {reason}"))
        moved = _archive_outbox(node, peer_id)
        retired = tuple(keys.retire_signer(node.cfg, peer_id, now))
        journal.record(conn, "peer remove", peer_id, reason=reason, mode=mode, retired_keys=list(retired),
                       abandoned_documents=left.documents, abandoned_bundles=left.bundles,
                       broadcast_behind=left.broadcast_behind, unapplied_received=left.received,
                       outbox_files_archived=moved)
        _set_state(node, peer, "removed", reason, now)
    return Removed(peer_id, mode, retired, left)


def _archive_outbox(node: Node, peer_id: str) -> list[str]:
    """Files sealed for a removed peer leave the outbox for the sent archive (never deleted), where an
    auditor finds them with the rest of the stream; ``status sent`` says they were ABANDONED."""
    names = _outbox_files(node, peer_id)
    dest = node.cfg.archive_sent
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        move_entry(node.cfg.outbox / name, dest / name)
    return names
