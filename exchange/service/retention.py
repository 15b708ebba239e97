"""Retention of the database: the bookkeeping rows ``exchange archive prune`` also removes.

The archive prune (exchange.audit.prune) removes old files; the tables that
recorded them would otherwise grow for ever. Beyond the retention cutoff, and
never anything not yet delivered and acknowledged, it removes:

- events (``xchg_event``) already routed or sent in a PROCESSED bundle, and
  superseded by a newer event of the same document (the newest event of every
  document stays: it is the document's version and, on a store, its queue);
- received bundles (``xchg_received``) APPLIED before the cutoff, except the
  newest of each peer (the stream position itself is ``xchg_stream_in``);
- deliveries (``xchg_delivery``) of deletes whose bundle was PROCESSED before the
  cutoff (the document is gone at the peer; a delivery of a live document is
  the record of what the peer holds and stays);
- sent bundles (``xchg_sent``) PROCESSED before the cutoff, except the newest
  PROCESSED one of each peer (a stream head signed into acks) and any a
  remaining event still names;
- conflicts (``xchg_conflict``) DECIDED or RESOLVED before the cutoff whose
  document has no change of this node still to deliver to, or unacknowledged
  by, the conflict's peer (a resolution is such a change): an OPEN conflict
  always stays, and so does the log of anything not yet settled at both ends;
- versions (``xchg_doc_version``) of documents deleted here by a delete from a
  peer (the row is the tombstone that keeps an older copy out), only when all
  of: the delete was applied before the cutoff (``deleted_at``, migration 15;
  rows from before carry no time and stay); the document is absent here now
  (an upsert does not clear the stamp); the stream that carried the delete has
  applied a later bundle (``deleted_seq`` below its position in
  ``deleted_lane``), and no bundle from the peer waits here unapplied in any
  lane, so every bundle the peer sealed before the delete has been applied or
  skipped (a bundle follows its stream's order; the peer itself never sends an
  older copy after its delete: its database no longer holds it); no document
  of that type is parked here, nor one of a type that refers to it (a retry
  would otherwise write a parked older copy, or stop calling a document that
  names it orphaned), and nothing of that type from the peer is kept aside for
  a column or a document type; no restart with the peer is open (a restored
  store goes back in time); and it is not the peer's highest version (a restart
  record states it). A peer removed from this node (``exchange peer remove``)
  is spared the conditions on its stream (a later bundle applied, none waiting)
  and on its highest version: it sends nothing any more (its keys were retired at removal,
  so only files it signed before can still verify, and any of those lies behind
  the stream's position or was sealed after the delete, without the document),
  and its last delete would otherwise stay for ever. Versions of live documents are the record of what this
  node holds and stay, and so do those of types editable on both sides (the
  base of this node's next change of that key: without it the peer, whose own
  log still holds the delete, would see a re-made document as a conflict).

A bundle "waits unapplied" when it is neither APPLIED nor SKIPPED and lies
beyond its stream's position here. The residual assumption: a bundle the peer
sealed before the delete has not even arrived here within the whole retention.
Its own stream's order rules it out for the lane that carried the delete (the
stream has moved past it); only a type moved to another lane could meet it.

Local changes (``xchg_doc_local``) are kept: one row per document editable on
both sides, updated in place (it does not grow with the history), and on a
store the only record of the highest version it gave the HO. Every base the
peer claims is checked against it (:func:`exchange.database.conflicts.sent_versions`):
without it the HO's next change of the document, based on the store's version,
would be refused as claiming a version never sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, exists, func, or_, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from exchange.database import rows
from exchange.database.catalog import Catalog
from exchange.database.tables import (
    begin_write, xchg_conflict, xchg_delivery, xchg_doc_version, xchg_event, xchg_kept,
    xchg_parked, xchg_received, xchg_restart, xchg_sent, xchg_stream_in,
)
from exchange.errors import DatabaseError
from exchange.files import utc_now
from exchange.node.home import Node
from exchange.receive.restart import DETECTED, SENT
from exchange.vocabulary import ConflictStatus, DocStatus, ReceivedStatus, SentStatus

#: the tables, in the order they are purged (events before the sent bundles they name)
TABLES = ("events", "received", "deliveries", "sent", "conflicts", "versions")
#: ``xchg_restart.kind`` of an open restart: evidence seen, a record sent and not answered yet
_RESTART_OPEN = (DETECTED, SENT)


def _cut(conn: Connection, t: datetime) -> datetime:
    """The cutoff as the database compares it (SQLite keeps naive UTC)."""
    return t if conn.dialect.name == "postgresql" else t.replace(tzinfo=None)


def _conditions(conn: Connection, cutoff: datetime) -> dict[str, Any]:
    cut = _cut(conn, cutoff)
    e, newer_e = xchg_event, xchg_event.alias("newer_event")
    s, newer_s = xchg_sent, xchg_sent.alias("newer_sent")
    r, newer_r = xchg_received, xchg_received.alias("newer_received")
    processed = SentStatus.PROCESSED.value
    events = and_(
        e.c.created_at < cut, e.c.routed == 1,
        or_(e.c.seq.is_(None), exists().where(s.c.seq == e.c.seq, s.c.status == processed)),
        exists().where(newer_e.c.doc_type == e.c.doc_type, newer_e.c.doc_key == e.c.doc_key, newer_e.c.id > e.c.id))
    received = and_(
        r.c.status == ReceivedStatus.APPLIED.value, func.coalesce(r.c.applied_at, r.c.received_at) < cut,
        exists().where(newer_r.c.peer == r.c.peer, newer_r.c.lane == r.c.lane, newer_r.c.seq > r.c.seq))
    d = xchg_delivery
    deliveries = and_(
        d.c.op == "D", d.c.status == processed,
        exists().where(s.c.peer == d.c.peer, s.c.seq == d.c.seq, s.c.status == processed, s.c.processed_at < cut))
    sent = and_(
        s.c.status == processed, s.c.processed_at < cut,
        exists().where(newer_s.c.peer == s.c.peer, newer_s.c.lane == s.c.lane, newer_s.c.seq > s.c.seq,
                       newer_s.c.status == processed),
        ~exists().where(e.c.seq == s.c.seq))
    return {"events": (e, events), "received": (r, received), "deliveries": (d, deliveries), "sent": (s, sent)}


def purge(node: Node, older_than_days: float, *, dry_run: bool = False, now: datetime | None = None) -> dict[str, int]:
    """Remove (or, with ``dry_run``, count) the bookkeeping rows beyond the retention; rows per table.

    One transaction: all or nothing, so an interruption leaves the tables as they were.
    """
    cutoff = (now or utc_now()) - timedelta(days=older_than_days)
    try:
        return _purge(node, cutoff, dry_run)
    except SQLAlchemyError as exc:  # a full disk, a lost connection: nothing was removed (one transaction)
        raise DatabaseError(f"purging the database's bookkeeping failed: {exc.__class__.__name__}: "
                            f"{str(getattr(exc, 'orig', None) or exc).splitlines()[0][:300]}",
                            hint="Nothing was removed from the database; free disk space (or restore the "
                                 "connection) and run the prune again.") from exc


def _purge(node: Node, cutoff: datetime, dry_run: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    with node.engine.connect() as conn:
        trans = conn.begin()
        try:
            begin_write(conn)
            for name in TABLES:  # each condition sees the rows the steps before it left
                if name in _BY_NODE:
                    counts[name] = _BY_NODE[name](conn, node, cutoff)
                    continue
                table, cond = _conditions(conn, cutoff)[name]
                counts[name] = int(conn.execute(delete(table).where(cond)).rowcount or 0)
        except BaseException:
            trans.rollback()
            raise
        if dry_run:  # the same deletes, undone: the counts are exactly what a real run removes
            trans.rollback()
        else:
            trans.commit()
    return counts


# ---------------------------------------------------------------- what is settled, and what waits

Doc = tuple[str, str]  # (document type, canonical key)


def _waiting_peers(conn: Connection) -> set[str]:
    """Peers with a bundle here neither APPLIED nor SKIPPED beyond its stream's position (it waits)."""
    r, si = xchg_received.c, xchg_stream_in.c
    done = (ReceivedStatus.APPLIED.value, ReceivedStatus.SKIPPED.value)
    return {str(p) for p in conn.execute(select(r.peer).where(
        r.status.not_in(done),
        ~exists().where(si.peer == r.peer, si.lane == r.lane, si.last_seq >= r.seq)).distinct()).scalars()}


def _unsettled(conn: Connection, doc_types: Iterable[str]) -> tuple[set[Doc], set[tuple[str, str, str]]]:
    """This node's changes of ``doc_types`` not yet delivered and acknowledged: (documents with a change
    not routed, or sent in a bundle not PROCESSED (a store sends from its log), and (peer, type, key) of
    each delivery not PROCESSED (the HO routes). Event keys are as the database rendered them: made canonical."""
    types = sorted(set(doc_types))
    docs: set[Doc] = set()
    by_peer: set[tuple[str, str, str]] = set()
    if not types:
        return docs, by_peer
    e, s, d = xchg_event.c, xchg_sent.c, xchg_delivery.c
    processed = SentStatus.PROCESSED.value
    unacked = or_(e.routed == 0, and_(e.seq.is_not(None), or_(
        exists().where(s.seq == e.seq, s.status != processed),
        ~exists().where(s.seq == e.seq, s.status == processed))))
    for t, k in conn.execute(select(e.doc_type, e.doc_key).where(e.doc_type.in_(types), unacked).distinct()):
        docs.add((str(t), rows.canonicalize(str(k))))
    for p, t, k in conn.execute(select(d.peer, d.doc_type, d.doc_key).where(
            d.doc_type.in_(types), d.status != DocStatus.PROCESSED.value)):
        by_peer.add((str(p), str(t), str(k)))
    return docs, by_peer


def _delete_keys(conn: Connection, table: Any, cols: tuple[str, ...], keys: list[tuple[Any, ...]]) -> int:
    """Delete the rows of ``table`` whose ``cols`` are one of ``keys``, in chunks."""
    n = 0
    step = max(1, rows.CHUNK // len(cols))
    for i in range(0, len(keys), step):
        chunk = keys[i:i + step]
        where = (table.c[cols[0]].in_([k[0] for k in chunk]) if len(cols) == 1
                 else tuple_(*[table.c[c] for c in cols]).in_(chunk))
        n += int(conn.execute(delete(table).where(where)).rowcount or 0)
    return n


# ---------------------------------------------------------------- the conflict log

def _purge_conflicts(conn: Connection, _node: Node, cutoff: datetime) -> int:
    """Conflicts DECIDED or RESOLVED before the cutoff whose document this node has nothing of its own
    still on its way to the conflict's peer (a resolution travels as a change of the document)."""
    c = xchg_conflict.c
    cut = _cut(conn, cutoff)
    found = conn.execute(select(c.id, c.peer, c.doc_type, c.doc_key).where(
        c.status.in_((ConflictStatus.DECIDED.value, ConflictStatus.RESOLVED.value)),
        func.coalesce(c.resolved_at, c.detected_at) < cut)).all()
    if not found:
        return 0
    docs, by_peer = _unsettled(conn, {str(r.doc_type) for r in found})
    ids = [(int(r.id),) for r in found
           if (r.doc_type, r.doc_key) not in docs and (r.peer, r.doc_type, r.doc_key) not in by_peer]
    return _delete_keys(conn, xchg_conflict, ("id",), ids)


# ---------------------------------------------------------------- the versions of deleted documents

def _referring(catalog: Catalog, doc_type: str) -> set[str]:
    """``doc_type`` and the document types with a table naming its header by foreign key."""
    header = catalog.get(doc_type).header
    out = {doc_type}
    for dt in catalog:
        for name in dt.tables():
            if any(fk.referred_table.name == header for fk in catalog.table(name).foreign_key_constraints):
                out.add(dt.name)
    return out


def _purge_versions(conn: Connection, node: Node, cutoff: datetime) -> int:
    """The tombstones of documents deleted here by a peer's delete, once no older copy can come (module
    docstring: each condition and why)."""
    catalog = node.catalog
    removed = sorted(p.id for p in node.cfg.peers.values() if p.state == "removed")
    v, si = xchg_doc_version.c, xchg_stream_in.c
    found = conn.execute(select(v.peer, v.doc_type, v.doc_key, v.version).where(
        v.deleted_at < _cut(conn, cutoff), or_(v.peer.in_(removed), v.deleted_seq < select(si.last_seq).where(
            si.peer == v.peer, si.lane == v.deleted_lane).scalar_subquery()))).all()
    if not found:
        return 0
    waiting = _waiting_peers(conn)
    rs = xchg_restart.c
    restarting = {str(p) for p in conn.execute(select(rs.peer).where(
        rs.kind.in_(_RESTART_OPEN), rs.resolved_at.is_(None)).distinct()).scalars()}
    parked = {str(t) for t in conn.execute(select(xchg_parked.c.doc_type).distinct()).scalars()}
    kept = {(str(p), str(t)) for p, t in conn.execute(select(xchg_kept.c.peer, xchg_kept.c.doc_type).distinct())}
    by_type: dict[str, list[tuple[str, str, int]]] = {}
    for peer, doc_type, key, version in found:
        if (peer in waiting and peer not in removed) or peer in restarting or (peer, doc_type) in kept \
                or doc_type not in catalog:
            continue
        by_type.setdefault(str(doc_type), []).append((str(peer), str(key), int(version)))
    highest: dict[str, int] = {}
    gone: list[tuple[str, str, str]] = []
    for doc_type, cands in sorted(by_type.items()):
        dt = catalog.get(doc_type)
        if dt.both_sides or _referring(catalog, doc_type) & parked:
            continue
        keys = sorted({k for _p, k, _v in cands})
        present = set(rows.row_keys(rows.read_docs(conn, catalog.table(dt.header), dt.key, keys), dt.key))
        for peer, key, version in cands:
            if peer not in highest:
                highest[peer] = int(conn.execute(select(func.max(v.version)).where(v.peer == peer)).scalar() or 0)
            if key not in present and (peer in removed or version < highest[peer]):
                gone.append((peer, doc_type, key))
    return _delete_keys(conn, xchg_doc_version, ("peer", "doc_type", "doc_key"), gone)


#: the purges that read more than the tables: the catalog, the peers (the others are one DELETE each)
_BY_NODE = {"conflicts": _purge_conflicts, "versions": _purge_versions}
