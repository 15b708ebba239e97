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
from exchange.service.words import parked_reason, rfc3339
from exchange.vocabulary import DEFAULT_LANE, LANE_RE, DocStatus, ReceivedStatus
from exchange.receive.stuck import reason_with_resolution, sent_reason_with_resolution


def _iso(t: datetime | None) -> str | None:
    return rfc3339(t)  # RFC 3339 with the offset (a naive time, as SQLite returns it, is UTC)


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
    lane: str = DEFAULT_LANE  # the stream's lane (docs/CATALOG.md "Lanes"): a seq counts within it


def _sent_row(r: Mapping[Any, Any]) -> Row:
    return Row(r["file_name"], r["peer"], int(r["seq"]), json.loads(r["summary"]), r["status"],
               _iso(r["created_at"]), _iso(r["processed_at"] or r["uploaded_at"]),
               sent_reason_with_resolution(r["status"], r["peer"], int(r["seq"]), r["reason"], r["lane"]),
               json.loads(r["reconcile"]) if r["reconcile"] else None, r["lane"])


def sent(node: Node) -> list[Row]:
    path = plain_file(node.cfg.database)
    rows = _sent_sqlite(path) if path is not None else None
    if rows is not None:
        return rows
    from sqlalchemy import select

    from exchange.database.tables import xchg_sent

    with node.engine.connect() as conn:
        found = conn.execute(select(xchg_sent).order_by(xchg_sent.c.peer, xchg_sent.c.lane, xchg_sent.c.seq)
                             ).mappings().all()
    return [_sent_row(r) for r in found]


#: Columns of exchange.database.tables.xchg_sent that the Sent view shows; times as SQLAlchemy stores them on SQLite.
_SENT_SQL = ("SELECT file_name, peer, seq, summary, status, created_at, uploaded_at, processed_at, reason, reconcile, "
             "lane FROM xchg_sent ORDER BY peer, lane, seq")
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
            xchg_received.c.peer, xchg_received.c.lane, xchg_received.c.seq)).mappings().all()
    out = [Row(r["file_name"], r["peer"], int(r["seq"]), json.loads(r["summary"]), r["status"],
               _iso(r["received_at"]), _iso(r["applied_at"]),
               reason_with_resolution(r["status"], r["peer"], int(r["seq"]), r["reason"], r["lane"]),
               lane=r["lane"]) for r in rows]
    for q in quarantined(node):
        out.append(Row(q.file, q.peer, q.seq, {}, ReceivedStatus.QUARANTINED, rfc3339(q.time), None, q.reason,
                       lane=q.lane))
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

    lane_of = node.catalog.lane_of
    with node.engine.connect() as conn:
        for r in conn.execute(select(xchg_delivery).where(xchg_delivery.c.peer == peer)):
            out[(r.doc_type, r.doc_key)] = DocState(r.op, int(r.version), r.status, r.seq)
        if node.cfg.peer(peer).role != "store":
            for doc, (op, version, state, seq) in streams.document_states(conn, peer, lane_of).items():
                newer(doc, DocState(op, version, state, seq))
            return out
        cursors = {str(lane): (int(v), str(t), str(k)) for lane, v, t, k in conn.execute(
            select(xchg_stream_out.c.lane, xchg_stream_out.c.bc_version, xchg_stream_out.c.bc_type,
                   xchg_stream_out.c.bc_key).where(xchg_stream_out.c.peer == peer))}  # one per lane
        for r in conn.execute(select(xchg_broadcast)):
            cursor = cursors.get(lane_of(r.doc_type), (0, "", ""))
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
    lane: str = DEFAULT_LANE  # the lane the file name claims


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
        lane = parts[2] if len(parts) >= 5 and LANE_RE.fullmatch(parts[2]) else DEFAULT_LANE
        at = 3 if lane != DEFAULT_LANE else 2  # the seq, after the lane when the name has one
        seq = int(parts[at]) if len(parts) >= 4 and parts[at].isascii() and parts[at].isdigit() else 0
        out.append(Quarantined(name, peer, seq, info.get("time"), info.get("reason"), mtime, lane))
    return out


@dataclass(frozen=True)
class Parked:
    doc_type: str
    doc_key: str
    peer: str
    seq: int
    error: str  # the database's words: the technical detail
    attempts: int
    parked_at: str | None
    reason: str = ""  # the same in business words (service.words.parked_reason)
    state: str = "RETRYING"  # vocabulary.ParkedState: ORPHANED can never apply (its dependency was deleted)
    lane: str = DEFAULT_LANE  # the lane of its type: ``seq`` is that lane's bundle


def parked(node: Node) -> list[Parked]:
    from sqlalchemy import select

    from exchange.database.tables import xchg_parked

    with node.engine.connect() as conn:
        rows = conn.execute(select(xchg_parked).order_by(xchg_parked.c.parked_at)).mappings().all()
    reasons = parked_reasons(node, [(r["doc_type"], r["doc_key"]) for r in rows])
    lane_of = node.catalog.lane_of
    return [Parked(r["doc_type"], r["doc_key"], r["peer"], int(r["seq"]), r["error"],
                   int(r["attempts"]), _iso(r["parked_at"]), reasons[(r["doc_type"], r["doc_key"])], r["state"],
                   lane_of(r["doc_type"]))
            for r in rows]


def parked_reasons(node: Node, docs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(doc_type, doc_key) of parked documents -> why, in business words (for the CLI and the page)."""
    from exchange.receive.missing import parked_missing

    missing = parked_missing(node, docs)
    return {d: parked_reason(node.cfg.role, d[0], d[1], missing[d]) for d in docs}


def as_json(rows: list[Row], parked_docs: list[Parked] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"version": 1, "bundles": [asdict(r) for r in rows]}
    if parked_docs is not None:
        out["parked"] = [asdict(p) for p in parked_docs]
    return out


def set_aside(node: Node) -> list[dict[str, Any]]:
    """Documents this node could not encode and did not send (exchange.send.setaside), as JSON records.

    A plain SQLite home older than the table has none (read without SQLAlchemy, as the Sent view is).
    """
    path = plain_file(node.cfg.database)
    if path is not None:
        try:
            with closing(connect_existing(path)) as conn:
                if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'xchg_setaside'"
                                ).fetchone() is None or not conn.execute(
                                    "SELECT count(*) FROM xchg_setaside").fetchone()[0]:
                    return []  # the usual case, answered without importing SQLAlchemy
        except sqlite3.Error:
            pass
    from exchange.send.setaside import listing

    return [{**asdict(d), "reason": d.reason} for d in listing(node)]


def conflicts(node: Node) -> dict[str, Any]:
    """``status conflicts --json``: the open conflicts per type and the conflict log (docs/STATUS_JSON.md)."""
    from exchange.database.conflicts import conflicts as log
    from exchange.database.conflicts import open_count

    with node.engine.connect() as conn:
        return {"version": 1, "node": node.id, "open": open_count(conn),
                "conflicts": [c.as_json() for c in log(conn)], "peers": reported_conflicts(node)}


def reported_conflicts(node: Node) -> dict[str, dict[str, Any]]:
    """What each peer's newest heartbeat (version 2) says of its conflicts with this node: held for a
    person there, decided there, and its standing changes to documents this node owns (some named)."""
    from exchange.service.ui.data import peer_stats

    out: dict[str, dict[str, Any]] = {}
    for peer, st in sorted(peer_stats(node).items()):
        h = st.remote_health
        if "conflicts_held" not in h:  # no heartbeat, or a version 1 one: it says nothing of conflicts
            continue
        out[peer] = {"conflicts_held": h["conflicts_held"], "conflicts_decided": h.get("conflicts_decided", 0),
                     "foreign_edits": h.get("foreign_edits", 0), "foreign": st.remote_foreign,
                     "heartbeat": _iso(st.last_heartbeat)}
    return out


def _peer_lines(peers: dict[str, dict[str, Any]]) -> list[str]:
    """One line per peer whose heartbeat reports conflicts (and a line per change it names)."""
    from exchange.service.ui.data import foreign_text

    out = []
    for peer, r in peers.items():
        if not (r["conflicts_held"] or r["foreign_edits"]):
            continue
        out.append(f"  {peer} reports {r['conflicts_held']} held for a person, {r['conflicts_decided']} decided, "
                   f"{r['foreign_edits']} local changes to documents this node owns "
                   f"(at {peer}: exchange conflicts list{' --open' if r['conflicts_held'] else ''})")
        out += [f"    {peer} changed {foreign_text(f)} at {f.get('at') or '?'}" for f in r["foreign"]]
    return out


def conflicts_text(node: Node) -> str:
    """The conflicts view as lines: the open ones first, each with what to run."""
    data = conflicts(node)
    items = data["conflicts"]
    peers = _peer_lines(data["peers"])
    if not items:
        return "\n".join([f"{node.id}: no conflicts", *peers])
    held = [c for c in items if c["status"] == "OPEN"]
    out = [f"{node.id}: {len(held)} conflicts held for a person, {len(items)} in the log", *peers]
    for c in held + [c for c in items if c["status"] != "OPEN"]:
        what = f"kept {c['kept']}" if c["kept"] else "held: exchange conflicts resolve " + str(c["id"]) + \
            " --keep ours|theirs"
        out.append(f"  #{c['id']} {c['status']:8} {c['doc_type']} {'/'.join(c['doc_key'])} with {c['peer']} "
                   f"({c['policy']}): {what}")
    return "\n".join(out)
