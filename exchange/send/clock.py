"""The sender's version clock: a document's version only grows in the order it is sent.

A receiver keeps the version it last applied of each document and drops
anything older (the stale-version guard). So the versions a sender gives a
document must grow in the order it sends them. An event id does not: on
PostgreSQL an id is taken at insert, and a transaction can commit after a
later one whose version of the same document was already sent. Its event then
carries a lower id than what the receiver holds, and the change would be
dropped as stale, silently, while every bundle says PROCESSED.

Every version this node assigns (routing to stores, broadcasts, reloads, a
store's log) goes through :func:`stamp`: the event id, or one more than the
highest version assigned before, whichever is higher. The high-water mark is
kept in ``xchg_meta`` and moves in the transaction that assigns, so a version
once handed out is never handed out lower again.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, func, select, update

from exchange.database.tables import xchg_broadcast, xchg_delivery, xchg_event, xchg_meta

CLOCK_KEY = "version_high"

Doc = tuple[str, str, str, int]  # (doc_type, canonical doc_key, op, version)


def high(conn: Connection, *, lock: bool = False) -> int:
    """The highest version assigned so far; ``lock``: held until this transaction ends (PostgreSQL)."""
    query = select(xchg_meta.c.value).where(xchg_meta.c.key == CLOCK_KEY)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is not None:
        return int(row[0])
    start = initial(conn)
    conn.execute(xchg_meta.insert().values(key=CLOCK_KEY, value=str(start)))
    return start


def initial(conn: Connection) -> int:
    """Where the clock starts on a database that had none: the highest version already given out.

    That is the highest routed or delivered one: an event not routed yet has
    been given no version, and keeps its id when it is routed.
    """
    routed = select(func.coalesce(func.max(xchg_event.c.id), 0)).where(xchg_event.c.routed == 1)
    given = [select(func.coalesce(func.max(c), 0)) for c in (xchg_delivery.c.version, xchg_broadcast.c.version)]
    return max(int(conn.execute(q).scalar() or 0) for q in (routed, *given))


def _set(conn: Connection, value: int) -> None:
    conn.execute(update(xchg_meta).where(xchg_meta.c.key == CLOCK_KEY).values(value=str(value)))


def stamp(conn: Connection, docs: Sequence[Doc]) -> list[Doc]:
    """``docs`` (type, key, op, event id) with versions above everything assigned before them.

    An event that committed in order keeps its id as its version; one that
    committed late gets the clock's next value. The clock moves to the highest
    version returned, in the caller's transaction.
    """
    if not docs:
        return []
    floor = high(conn, lock=True) + 1
    out = [d if d[3] >= floor else (d[0], d[1], d[2], floor) for d in docs]
    _set(conn, max(d[3] for d in out))
    return out


def next_version(conn: Connection) -> int:
    """One version above everything assigned so far, recorded (a reload gives it to every document)."""
    version = high(conn, lock=True) + 1
    _set(conn, version)
    return version
