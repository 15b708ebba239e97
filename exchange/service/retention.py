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
  remaining event still names.

Document versions (``xchg_doc_version``) are kept: they carry no time, and a
removed version of a deleted document would let an older copy bring it back.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, exists, func, or_
from sqlalchemy.exc import SQLAlchemyError

from exchange.database.tables import begin_write, xchg_delivery, xchg_event, xchg_received, xchg_sent
from exchange.errors import DatabaseError
from exchange.files import utc_now
from exchange.node.home import Node
from exchange.vocabulary import ReceivedStatus, SentStatus

#: the tables, in the order they are purged (events before the sent bundles they name)
TABLES = ("events", "received", "deliveries", "sent")


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
