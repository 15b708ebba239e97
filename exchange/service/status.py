"""The Sent and Received views an operator reads, and parked documents.

The ``--json`` form of these records is a stable contract (docs/STATUS_JSON.md).

SQLAlchemy and the table definitions are imported inside the functions that
query through them: on a plain SQLite home ``exchange status sent`` reads its
rows with the standard ``sqlite3`` module (as the no-op sync does, see
:mod:`exchange.send.pending`), and importing SQLAlchemy alone costs more than
the whole command should (docs/PERFORMANCE.md, "Start-up").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from exchange.node.home import Node
from exchange.database.direct import connect_existing, plain_file
from exchange.vocabulary import DocStatus, ReceivedStatus


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


@dataclass(frozen=True)
class Row:
    file: str
    peer: str
    seq: int
    documents: dict[str, int]
    status: str
    created: str | None
    updated: str | None
    reason: str | None
    # sent bundles: the ack's applied counts and totals against what was sealed (exchange.receive.reconcile)
    reconcile: dict[str, Any] | None = None


def _sent_row(r: Mapping[Any, Any]) -> Row:
    return Row(r["file_name"], r["peer"], int(r["seq"]), json.loads(r["summary"]), r["status"],
               _iso(r["created_at"]), _iso(r["processed_at"] or r["uploaded_at"]), r["reason"],
               json.loads(r["reconcile"]) if r["reconcile"] else None)


def sent(node: Node) -> list[Row]:
    path = plain_file(node.cfg.database)
    rows = _sent_sqlite(path) if path is not None else None
    if rows is not None:
        return rows
    from sqlalchemy import select

    from exchange.database.tables import xchg_sent

    with node.engine.connect() as conn:
        found = conn.execute(select(xchg_sent).order_by(xchg_sent.c.peer, xchg_sent.c.seq)).mappings().all()
    return [_sent_row(r) for r in found]


#: Columns of exchange.database.tables.xchg_sent that the Sent view shows; times as SQLAlchemy stores them on SQLite.
_SENT_SQL = ("SELECT file_name, peer, seq, summary, status, created_at, uploaded_at, processed_at, reason, reconcile "
             "FROM xchg_sent ORDER BY peer, seq")
_SENT_TIMES = ("created_at", "uploaded_at", "processed_at")


def _sqlite_time(value: Any) -> datetime | None:
    """A DateTime column as SQLAlchemy's SQLite dialect returns it (naive, from its ISO text)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a stored time: {value!r}")
    return datetime.fromisoformat(value)


def _sent_sqlite(path: str) -> list[Row] | None:
    """The Sent rows read with ``sqlite3``; None when the file cannot be read that way (SQLAlchemy then
    reads it, and reports any error as it always has)."""
    try:
        with closing(connect_existing(path)) as conn:
            conn.row_factory = sqlite3.Row
            found = conn.execute(_SENT_SQL).fetchall()
        return [_sent_row({**dict(r), **{k: _sqlite_time(r[k]) for k in _SENT_TIMES}}) for r in found]
    except (sqlite3.Error, ValueError, TypeError):
        return None


def received(node: Node) -> list[Row]:
    from sqlalchemy import select

    from exchange.database.tables import xchg_received

    with node.engine.connect() as conn:
        rows = conn.execute(select(xchg_received).order_by(
            xchg_received.c.peer, xchg_received.c.seq)).mappings().all()
    out = [Row(r["file_name"], r["peer"], int(r["seq"]), json.loads(r["summary"]), r["status"],
               _iso(r["received_at"]), _iso(r["applied_at"]), r["reason"]) for r in rows]
    for q in quarantined(node):
        out.append(Row(q.file, q.peer, q.seq, {}, ReceivedStatus.QUARANTINED, q.time, None, q.reason))
    return out


@dataclass(frozen=True)
class DocState:
    """Where one document stands on its way to a peer."""

    op: str  # U or D
    version: int
    status: str  # PENDING, or the status of the bundle that carried it
    seq: int | None  # that bundle, when known


def documents(node: Node, peer: str) -> dict[tuple[str, str], DocState]:
    """(doc_type, doc_key) -> state of every document this node sends ``peer``, three ways:

    - a delivery row (routed to some stores, or a reload), with its own status;
    - a broadcast row (every store), PROCESSED once the peer's cursor is past it;
    - an event in a store's capture log (:mod:`exchange.send.streams`), with the status
      of the bundle that carried it.

    Where a document is in more than one (a reload), the newest version wins.
    """
    from sqlalchemy import select

    from exchange.database.tables import xchg_broadcast, xchg_delivery, xchg_stream_out
    from exchange.send import streams

    out: dict[tuple[str, str], DocState] = {}

    def newer(doc: tuple[str, str], state: DocState) -> None:
        if doc not in out or out[doc].version < state.version:
            out[doc] = state

    with node.engine.connect() as conn:
        for r in conn.execute(select(xchg_delivery).where(xchg_delivery.c.peer == peer)):
            out[(r.doc_type, r.doc_key)] = DocState(r.op, int(r.version), r.status, r.seq)
        if node.cfg.peer(peer).role != "store":
            for doc, (op, version, state, seq) in streams.document_states(conn, peer).items():
                newer(doc, DocState(op, version, state, seq))
            return out
        cur = conn.execute(select(xchg_stream_out.c.bc_version, xchg_stream_out.c.bc_type,
                                  xchg_stream_out.c.bc_key).where(xchg_stream_out.c.peer == peer)).first()
        cursor = (int(cur[0]), str(cur[1]), str(cur[2])) if cur else (0, "", "")
        for r in conn.execute(select(xchg_broadcast)):
            passed = (int(r.version), r.doc_type, r.doc_key) <= cursor
            newer((r.doc_type, r.doc_key), DocState(r.op, int(r.version), DocStatus.PROCESSED if passed else DocStatus.PENDING, None))
    return out


@dataclass(frozen=True)
class Quarantined:
    file: str
    peer: str  # the sender the file name claims (not verified: that is why it is here)
    seq: int
    time: str | None
    reason: str | None
    mtime: float


def quarantined(node: Node) -> list[Quarantined]:
    """Files set aside in quarantine/, from the reason file written beside each."""
    out: list[Quarantined] = []
    q = node.cfg.quarantine
    if not q.is_dir():
        return out
    for reason_file in sorted(q.glob("*.reason")):
        try:
            info = json.loads(reason_file.read_text())
            mtime = reason_file.stat().st_mtime
        except (OSError, ValueError):
            info, mtime = {}, 0.0
        name = reason_file.name[: -len(".reason")]
        parts = name.split(".")
        peer = parts[0] if len(parts) >= 4 or (len(parts) >= 3 and parts[2] == "heartbeat") else ""
        seq = int(parts[2]) if len(parts) >= 4 and parts[2].isascii() and parts[2].isdigit() else 0
        out.append(Quarantined(name, peer, seq, info.get("time"), info.get("reason"), mtime))
    return out


@dataclass(frozen=True)
class Parked:
    doc_type: str
    doc_key: str
    peer: str
    seq: int
    error: str
    attempts: int
    parked_at: str | None


def parked(node: Node) -> list[Parked]:
    from sqlalchemy import select

    from exchange.database.tables import xchg_parked

    with node.engine.connect() as conn:
        rows = conn.execute(select(xchg_parked).order_by(xchg_parked.c.parked_at)).mappings().all()
    return [Parked(r["doc_type"], r["doc_key"], r["peer"], int(r["seq"]), r["error"],
                   int(r["attempts"]), _iso(r["parked_at"])) for r in rows]


def as_json(rows: list[Row], parked_docs: list[Parked] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"version": 1, "bundles": [asdict(r) for r in rows]}
    if parked_docs is not None:
        out["parked"] = [asdict(p) for p in parked_docs]
    return out
