"""Documents the exporter cannot encode, set aside so the rest of a node's exports go on.

Why: one row whose value its column's type cannot hold (an ``updated_at`` with
an offset in a column declared without one, text where a date belongs) made
the whole batch fail, and every later change to every peer waited behind it.
Such a document is found (the batch is split until the failing documents are
alone), recorded in ``xchg_setaside`` with the table, column, key and value,
and taken out of every queue it was in: its deliveries go to SETASIDE, its
broadcast row is removed (no store's cursor waits for it), its unsent log
events are marked routed. Sequence numbers never skip: the bundles sealed
after it simply do not carry it.

``exchange set-aside retry`` checks each document again; one that encodes now
gets a fresh capture event, so it travels like any change (a new version, to
every peer routing sends it to). A document the application changes and that
is then sealed leaves the list by itself.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, and_, delete, select, update

from exchange.database import rows
from exchange.database.capture import record_event
from exchange.database.catalog import Catalog, DocType
from exchange.database.tables import begin_write, xchg_broadcast, xchg_delivery, xchg_setaside
from exchange.errors import ExchangeError
from exchange.files import utc_now
from exchange.node.home import Node
from exchange.timefmt import rfc3339
from exchange.vocabulary import DocStatus

log = logging.getLogger(__name__)

#: Longest value kept and shown: the point is to find the row, not to copy it.
VALUE_CHARS = 200


class EncodeFailed(Exception):
    """Reading ``keys`` of ``doc_type`` into Arrow failed: some of them hold a value their type cannot."""

    def __init__(self, doc_type: str, keys: Sequence[str], error: str) -> None:
        super().__init__(f"{doc_type}: {error}")
        self.doc_type, self.keys, self.error = doc_type, list(keys), error


@dataclass(frozen=True)
class Problem:
    """Why one document cannot be encoded."""

    doc_type: str
    doc_key: str
    table: str
    column: str | None
    value: str | None
    error: str

    @property
    def reason(self) -> str:
        where = f"table {self.table}" + (f", column {self.column}" if self.column else "")
        value = f", value {self.value!r}" if self.value is not None else ""
        return f"{self.doc_type} {self.doc_key}: {where}{value} cannot be encoded: {self.error}"


@dataclass(frozen=True)
class SetAside:
    """A row of ``xchg_setaside``: a document this node could not send, and why."""

    doc_type: str
    doc_key: str
    version: int
    table: str
    column: str | None
    value: str | None
    error: str
    set_at: str | None

    @property
    def reason(self) -> str:
        return Problem(self.doc_type, self.doc_key, self.table, self.column, self.value, self.error).reason


def _encodes(conn: Connection, catalog: Catalog, dt: DocType, keys: Sequence[str]) -> bool:
    try:
        rows.read_doc_tables(conn, [catalog.table(t) for t in dt.tables()], dt.key, keys)
    except rows.ENCODE_ERRORS:
        return False
    return True


def _explain(conn: Connection, catalog: Catalog, dt: DocType, key: str, error: str) -> Problem:
    for name in dt.tables():
        found = rows.unencodable(conn, catalog.table(name), dt.key, key)
        if found:
            column, value, why = found[0]
            return Problem(dt.name, key, name, column, value[:VALUE_CHARS], why[:VALUE_CHARS * 2])
    return Problem(dt.name, key, dt.header, None, None, error[:VALUE_CHARS * 2])


def find(conn: Connection, catalog: Catalog, failed: EncodeFailed) -> list[Problem]:
    """The documents of a failed read that cannot be encoded, each with its table, column and value.

    The keys are split in halves until each failing document stands alone:
    a few reads of the batch, paid only when a batch failed.
    """
    dt = catalog.get(failed.doc_type)
    out: list[Problem] = []
    todo = [list(failed.keys)]
    while todo:
        keys = todo.pop()
        if not keys or _encodes(conn, catalog, dt, keys):
            continue
        if len(keys) == 1:
            out.append(_explain(conn, catalog, dt, keys[0], failed.error))
        else:
            half = len(keys) // 2
            todo += [keys[half:], keys[:half]]
    return sorted(out, key=lambda p: p.doc_key)


def record(node: Node, failed: EncodeFailed, versions: dict[tuple[str, str], int]) -> list[Problem]:
    """Find and set aside the documents behind ``failed``, in a transaction of its own.

    ``versions``: (doc_type, key) -> the version that was to be sent. Raises
    :class:`~exchange.errors.ExchangeError` when no single document fails on its own (nothing can be
    set aside: the batch would fail again).
    """
    with node.engine.begin() as conn:
        begin_write(conn)
        problems = find(conn, node.catalog, failed)
        if not problems:
            raise ExchangeError(f"{failed.doc_type}: a batch could not be encoded, yet no document of it fails "
                              f"alone: {failed.error}",
                              hint="Run `exchange doctor`, and report this with the log (`exchange sync -v`).")
        take_out(conn, node, problems, versions)
    for p in problems:
        log.warning("set aside: %s", p.reason)
    return problems


def take_out(conn: Connection, node: Node, problems: Sequence[Problem], versions: dict[tuple[str, str], int]) -> None:
    """Record ``problems`` and remove their documents from every queue (see the module's doc)."""
    now = utc_now()
    s = xchg_setaside.c
    by_type: dict[str, list[str]] = defaultdict(list)
    for p in problems:
        conn.execute(delete(xchg_setaside).where(and_(s.doc_type == p.doc_type, s.doc_key == p.doc_key)))
        conn.execute(xchg_setaside.insert().values(
            doc_type=p.doc_type, doc_key=p.doc_key, version=versions.get((p.doc_type, p.doc_key), 0),
            table_name=p.table, column_name=p.column, value=p.value, error=p.error, set_at=now))
        by_type[p.doc_type].append(p.doc_key)
    d = xchg_delivery.c
    for doc_type, keys in by_type.items():
        conn.execute(update(xchg_delivery).where(and_(
            d.doc_type == doc_type, d.doc_key.in_(keys), d.status == DocStatus.PENDING.value))
            .values(status=DocStatus.SETASIDE.value))
        conn.execute(delete(xchg_broadcast).where(and_(
            xchg_broadcast.c.doc_type == doc_type, xchg_broadcast.c.doc_key.in_(keys))))
        # a store's unsent log events for them (the key as the database rendered it: compared canonical)
        wanted = set(keys)
        ids = [int(i) for i, k in rows.fetch_tuples(
            conn, "SELECT id, doc_key FROM xchg_event WHERE routed = 0 AND doc_type = ?", (doc_type,))
            if rows.canonicalize(str(k)) in wanted]
        rows.executemany(conn, "UPDATE xchg_event SET routed = 1 WHERE id = ?", [(i,) for i in ids])


def sent_again(conn: Connection, docs: Sequence[tuple[str, str, str, int]]) -> None:
    """Documents of a sealed batch leave the list (the application fixed and changed them)."""
    if conn.execute(select(xchg_setaside.c.doc_type).limit(1)).first() is None:
        return  # the usual case: one indexed probe
    listed = {(str(t), str(k)) for t, k in conn.execute(select(xchg_setaside.c.doc_type, xchg_setaside.c.doc_key))}
    gone = [(t, k) for t, k, _op, _v in docs if (t, k) in listed]
    for t, k in gone:
        conn.execute(delete(xchg_setaside).where(and_(xchg_setaside.c.doc_type == t, xchg_setaside.c.doc_key == k)))


def keys_of(conn: Connection, doc_type: str) -> set[str]:
    """The keys of ``doc_type``'s documents set aside (a reload must not take them for deleted)."""
    return {str(k) for k in conn.execute(select(xchg_setaside.c.doc_key).where(
        xchg_setaside.c.doc_type == doc_type)).scalars()}


def listing(node: Node) -> list[SetAside]:
    """Every document set aside, oldest first."""
    s = xchg_setaside.c
    with node.engine.connect() as conn:
        found = conn.execute(select(xchg_setaside).order_by(s.set_at, s.doc_type, s.doc_key)).mappings().all()
    return [SetAside(r["doc_type"], r["doc_key"], int(r["version"]), r["table_name"], r["column_name"],
                     r["value"], r["error"], rfc3339(r["set_at"])) for r in found]


@dataclass(frozen=True)
class Retried:
    """What :func:`retry` did: documents queued again, and those that still fail (with why)."""

    queued: list[tuple[str, str]]
    still: list[Problem]


def retry(node: Node, doc_type: str | None = None, doc_key: str | None = None) -> Retried:
    """Check set-aside documents again (all, one type, or one document); queue those that encode now.

    A document deleted meanwhile is queued too: its fresh event routes it as a delete.
    """
    s = xchg_setaside.c
    queued: list[tuple[str, str]] = []
    still: list[Problem] = []
    with node.engine.begin() as conn:
        begin_write(conn)
        q = select(s.doc_type, s.doc_key).order_by(s.doc_type, s.doc_key)
        if doc_type is not None:
            q = q.where(s.doc_type == doc_type)
        if doc_key is not None:
            q = q.where(s.doc_key == rows.canonicalize(doc_key))
        for t, k in [(str(t), str(k)) for t, k in conn.execute(q)]:
            dt = node.catalog.get(t)
            if _encodes(conn, node.catalog, dt, [k]):
                conn.execute(delete(xchg_setaside).where(and_(s.doc_type == t, s.doc_key == k)))
                record_event(conn, t, rows.parse_key(k))
                queued.append((t, k))
                continue
            problem = _explain(conn, node.catalog, dt, k, "still cannot be encoded")
            conn.execute(update(xchg_setaside).where(and_(s.doc_type == t, s.doc_key == k)).values(
                table_name=problem.table, column_name=problem.column, value=problem.value, error=problem.error))
            still.append(problem)
    for t, k in queued:  # the audit trail: when a set-aside document went back on its way
        log.info("set-aside document queued again: %s %s", t, k)
    for p in still:
        log.warning("still set aside: %s", p.reason)
    return Retried(queued, still)

