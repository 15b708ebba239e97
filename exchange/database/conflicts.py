"""Documents editable on both sides: each side's latest change, the bases, and the conflict log.

A document type declared editable on both sides (``DocType.both_sides``, the
reference schema's ``customer``) is changed at its owner store and at the HO.
Each change travels with its *base*: the version of the document the sender
last applied from the recipient (``xchg_doc_version``, 0: none), in the
bundle's ``_bases`` table (docs/FORMAT.md v3). The receiver compares that base
with its own latest change of the document (:func:`local_changes`): a change of
its own newer than the base is one the sender never saw, so the two changes are
concurrent, a conflict (decided in :mod:`exchange.receive.conflicts`).

Both sides need this (the sender writes bases, the receiver reads them), so it
lives below both.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection, and_, func, select, update

from exchange.timefmt import aware
from exchange.database import rows
from exchange.database.batch import BASES_SCHEMA
from exchange.database.catalog import Catalog
from exchange.database.tables import xchg_conflict, xchg_delivery, xchg_doc_local, xchg_doc_version
from exchange.files import utc_now
from exchange.vocabulary import ConflictStatus

__all__ = ["PENDING", "Local", "local_changes", "note_sent", "sent_versions", "bases", "bases_table", "pack",
           "unpack", "Conflict", "record", "settle", "conflicts", "conflict", "open_count", "counts", "as_utc",
           "report_foreign_edits", "open_per_peer", "Foreign", "peer_counts", "standing_foreign", "value_digest",
           "row_digests"]

#: The version of a local change not sent yet: newer than any version given out.
PENDING = 1 << 62

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Local:
    """This node's latest change of a document: its version (in this node's clock) and when."""

    version: int
    at: datetime | None


def as_utc(value: Any) -> datetime | None:
    """A timestamp as the database returns it (SQLite text, naive or aware datetime) -> aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return None
    return aware(value).astimezone(UTC)


def _pending(conn: Connection, doc_type: str) -> dict[str, datetime | None]:
    """Documents of ``doc_type`` with a change not sent yet, and when it was last made.

    Reads the unrouted backlog only (its partial index): the capture log has no
    index on keys, and scanning it whole cost 127 ms per 500,000 events.
    """
    out: dict[str, datetime | None] = {}
    for raw, last in rows.fetch_tuples(
            conn, "SELECT doc_key, MAX(created_at) FROM xchg_event WHERE routed = 0 AND doc_type = ? "
                  "GROUP BY doc_key", (doc_type,)):
        k, t = rows.canonicalize(str(raw)), as_utc(last)
        old = out.get(k)
        out[k] = t if old is None or (t is not None and t > old) else old
    return out


def _noted(conn: Connection, doc_type: str, keys: Sequence[str]) -> dict[str, tuple[int, datetime | None]]:
    c = xchg_doc_local.c
    out: dict[str, tuple[int, datetime | None]] = {}
    for i in range(0, len(keys), rows.CHUNK):
        for k, v, at in conn.execute(select(c.doc_key, c.version, c.changed_at).where(and_(
                c.doc_type == doc_type, c.doc_key.in_(keys[i:i + rows.CHUNK])))):
            out[str(k)] = (int(v), as_utc(at))
    return out


def note_sent(conn: Connection, doc_type: str, versions: Mapping[str, int]) -> dict[str, datetime]:
    """Record the versions this node gives its own changes of ``doc_type`` (routed or sealed now).

    Called while their events are still unrouted, so the time of each change is
    read from them. Returns each document's change time.
    """
    pending = _pending(conn, doc_type)
    noted = _noted(conn, doc_type, list(versions))
    now = utc_now()
    out: dict[str, datetime] = {}
    for k, v in versions.items():
        at = pending.get(k) or (noted[k][1] if k in noted else None) or now
        out[k] = at
        if k in noted:
            conn.execute(update(xchg_doc_local).where(and_(
                xchg_doc_local.c.doc_type == doc_type, xchg_doc_local.c.doc_key == k)).values(
                    version=max(v, noted[k][0]), changed_at=at))
        else:
            conn.execute(xchg_doc_local.insert().values(doc_type=doc_type, doc_key=k, version=v, changed_at=at))
    return out


def sent_versions(conn: Connection, peer: str, doc_type: str, keys: Sequence[str]) -> dict[str, int]:
    """The highest version of each document this node gave ``peer`` (a base above it was never seen there)."""
    noted = _noted(conn, doc_type, keys)
    d = xchg_delivery.c
    out = {k: v for k, (v, _at) in noted.items()}
    for i in range(0, len(keys), rows.CHUNK):
        for k, v in conn.execute(select(d.doc_key, d.version).where(and_(
                d.peer == peer, d.doc_type == doc_type, d.doc_key.in_(keys[i:i + rows.CHUNK])))):
            out[str(k)] = max(int(v), out.get(str(k), 0))
    return out


def local_changes(conn: Connection, peer: str, doc_type: str, keys: Sequence[str]) -> dict[str, Local]:
    """This node's latest change of each of ``keys`` (canonical) that ``peer`` gets, if it made one.

    A change not sent yet counts as :data:`PENDING`; a sent one by the version it
    went at (``xchg_doc_local``, and the delivery to ``peer`` on a node that routes).
    """
    if not keys:
        return {}
    pending = _pending(conn, doc_type)
    noted = _noted(conn, doc_type, keys)
    d = xchg_delivery.c
    delivered = {str(k): int(v) for i in range(0, len(keys), rows.CHUNK) for k, v in conn.execute(
        select(d.doc_key, d.version).where(and_(d.peer == peer, d.doc_type == doc_type,
                                                d.doc_key.in_(keys[i:i + rows.CHUNK]))))}
    out: dict[str, Local] = {}
    for k in keys:
        if k in pending:
            at = pending[k]
            out[k] = Local(PENDING, at if at is not None else (noted[k][1] if k in noted else None))
        elif k in noted:
            out[k] = Local(max(noted[k][0], delivered.get(k, 0)), noted[k][1])
    return out


def bases(conn: Connection, peer: str, doc_type: str, keys: Sequence[str]) -> dict[str, int]:
    """The version of each document last applied from ``peer`` (absent: none)."""
    v = xchg_doc_version.c
    out: dict[str, int] = {}
    for i in range(0, len(keys), rows.CHUNK):
        for k, version in conn.execute(select(v.doc_key, v.version).where(and_(
                v.peer == peer, v.doc_type == doc_type, v.doc_key.in_(keys[i:i + rows.CHUNK])))):
            out[str(k)] = int(version)
    return out


def bases_table(conn: Connection, catalog: Catalog, peer: str, docs: Sequence[tuple[str, str, str, int]],
                from_log: bool = False) -> pa.Table | None:
    """The ``_bases`` table of a batch for ``peer``: None when it holds no type editable on both sides.

    ``from_log``: the batch comes straight from the capture log (a store), so this is where its changes
    get their versions; routed documents were noted when routed (:func:`note_sent`).
    """
    both = {n for n in catalog.names if catalog.get(n).both_sides}
    by_type: dict[str, dict[str, int]] = defaultdict(dict)
    for doc_type, key, _op, v in docs if both else ():  # (most catalogs' batches: no loop at all)
        if doc_type in both:
            by_type[doc_type][key] = v
    if not by_type:
        return None
    now = utc_now()
    changed: dict[tuple[str, str], datetime] = {}
    if from_log:  # a store's own changes, sealed now: their versions and times are noted here
        for doc_type, versions in by_type.items():
            changed.update({(doc_type, k): at for k, at in note_sent(conn, doc_type, versions).items()})
    out: dict[str, list[Any]] = {"doc_type": [], "doc_key": [], "base": [], "changed_at": []}
    for doc_type, given in by_type.items():
        keys = list(given)
        have = bases(conn, peer, doc_type, keys)
        noted = _noted(conn, doc_type, keys)
        for k in keys:
            out["doc_type"].append(doc_type)
            out["doc_key"].append(k)
            out["base"].append(have.get(k, 0))
            out["changed_at"].append(changed.get((doc_type, k)) or (noted[k][1] if k in noted else None) or now)
    return pa.Table.from_pydict(out, schema=BASES_SCHEMA)


def pack(data: Mapping[str, pa.Table] | None) -> bytes | None:
    """A document's rows for the log (:func:`exchange.database.rows.pack_tables`); None stays None (deleted)."""
    return None if data is None else rows.pack_tables(data)


def unpack(blob: bytes | None) -> dict[str, pa.Table] | None:
    return None if blob is None else rows.unpack_tables(blob)


@dataclass(frozen=True)
class Conflict:
    """One row of the conflict log, as status, the page and ``exchange conflicts`` show it."""

    id: int
    doc_type: str
    doc_key: str
    peer: str
    seq: int
    policy: str
    status: str
    kept: str | None
    our_version: int
    our_at: datetime | None
    their_version: int
    their_base: int
    their_at: datetime | None
    detected_at: datetime | None
    resolved_at: datetime | None
    resolved_by: str | None
    note: str | None
    ours: dict[str, pa.Table] | None = None
    theirs: dict[str, pa.Table] | None = None

    def as_json(self, with_rows: bool = False) -> dict[str, Any]:
        """RFC 3339 times with their offset (docs/STATUS_JSON.md)."""
        out: dict[str, Any] = {
            "id": self.id, "doc_type": self.doc_type, "doc_key": rows.parse_key(self.doc_key), "peer": self.peer,
            "seq": self.seq, "policy": self.policy, "status": self.status, "kept": self.kept,
            "ours": {"version": self.our_version, "changed_at": _iso(self.our_at)},
            "theirs": {"version": self.their_version, "base": self.their_base, "changed_at": _iso(self.their_at)},
            "detected_at": _iso(self.detected_at), "resolved_at": _iso(self.resolved_at),
            "resolved_by": self.resolved_by, "note": self.note}
        if with_rows:
            out["ours"]["rows"] = _plain(self.ours)
            out["theirs"]["rows"] = _plain(self.theirs)
        return out


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _plain(data: dict[str, pa.Table] | None) -> dict[str, list[dict[str, Any]]] | None:
    """Rows as JSON-safe values (decimals and dates as text): the document is deleted when None."""
    if data is None:
        return None
    return {name: [{c: (v if v is None or isinstance(v, (str, int, bool)) else str(v)) for c, v in r.items()}
                   for r in t.to_pylist()] for name, t in data.items()}


def _conflict(r: Mapping[Any, Any], with_rows: bool) -> Conflict:
    return Conflict(
        id=int(r["id"]), doc_type=r["doc_type"], doc_key=r["doc_key"], peer=r["peer"], seq=int(r["seq"]),
        policy=r["policy"], status=r["status"], kept=r["kept"], our_version=int(r["our_version"]),
        our_at=as_utc(r["our_at"]), their_version=int(r["their_version"]), their_base=int(r["their_base"]),
        their_at=as_utc(r["their_at"]), detected_at=as_utc(r["detected_at"]),
        resolved_at=as_utc(r["resolved_at"]), resolved_by=r["resolved_by"], note=r["note"],
        ours=unpack(r["ours"]) if with_rows else None, theirs=unpack(r["theirs"]) if with_rows else None)


def record(conn: Connection, *, doc_type: str, doc_key: str, peer: str, seq: int, policy: str,
           status: ConflictStatus, kept: str | None, ours: Local, our_rows: Mapping[str, pa.Table] | None,
           their_version: int, their_base: int, their_at: datetime | None,
           their_rows: Mapping[str, pa.Table] | None, note: str) -> None:
    """Log one conflict with both versions (in the importer's transaction)."""
    conn.execute(xchg_conflict.insert().values(
        doc_type=doc_type, doc_key=doc_key, peer=peer, seq=seq, policy=policy, status=status.value, kept=kept,
        our_version=ours.version, our_at=ours.at, their_version=their_version, their_base=their_base,
        their_at=their_at, ours=pack(our_rows), theirs=pack(their_rows), detected_at=utc_now(), note=note))


def settle(conn: Connection, peer: str, doc_type: str, keys: Sequence[str], note: str, *,
           by: str | None = None, kept: str | None = None) -> int:
    """Close the OPEN conflicts of ``keys`` with ``peer``: resolved (here, or by a change that settled them)."""
    c = xchg_conflict.c
    n = 0
    for i in range(0, len(keys), rows.CHUNK):
        n += conn.execute(update(xchg_conflict).where(and_(
            c.peer == peer, c.doc_type == doc_type, c.doc_key.in_(keys[i:i + rows.CHUNK]),
            c.status == ConflictStatus.OPEN)).values(
                status=ConflictStatus.RESOLVED.value, resolved_at=utc_now(), resolved_by=by, note=note,
                **({"kept": kept} if kept else {}))).rowcount
    return n


def conflicts(conn: Connection, *, open_only: bool = False, limit: int = 500) -> list[Conflict]:
    """The conflict log, newest first (only OPEN ones with ``open_only``)."""
    q = select(xchg_conflict)
    if open_only:
        q = q.where(xchg_conflict.c.status == ConflictStatus.OPEN)
    q = q.order_by(xchg_conflict.c.id.desc()).limit(limit)
    return [_conflict(r, False) for r in conn.execute(q).mappings()]


def conflict(conn: Connection, conflict_id: int) -> Conflict | None:
    """One conflict with both versions' rows."""
    r = conn.execute(select(xchg_conflict).where(xchg_conflict.c.id == conflict_id)).mappings().first()
    return _conflict(r, True) if r is not None else None


def counts(conn: Connection) -> dict[tuple[str, str], int]:
    """The conflict log per (document type, status): the metrics."""
    c = xchg_conflict.c
    return {(str(t), str(s)): int(n) for t, s, n in conn.execute(
        select(c.doc_type, c.status, func.count()).group_by(c.doc_type, c.status))}


def open_count(conn: Connection) -> dict[str, int]:
    """OPEN conflicts per document type (the metrics and the overview)."""
    c = xchg_conflict.c
    return {str(t): int(n) for t, n in conn.execute(
        select(c.doc_type, func.count()).where(c.status == ConflictStatus.OPEN).group_by(c.doc_type))}


def open_per_peer(conn: Connection) -> dict[str, int]:
    """OPEN conflicts per peer (the alerts and ``doctor``)."""
    c = xchg_conflict.c
    return {str(p): int(n) for p, n in conn.execute(
        select(c.peer, func.count()).where(c.status == ConflictStatus.OPEN).group_by(c.peer))}


def report_foreign_edits(conn: Connection, catalog: Catalog, role: str, peers: Mapping[str, str]) -> int:
    """Changes made here to documents the other side owns: never sent, never silently dropped either.

    A store that edits an item price (an HO master), or an HO that edits a
    store's bill, changed a document only its owner writes. The change is not
    sent (the owner wins: its next version replaces it), and each such document
    is logged as a DECIDED conflict, kept ``theirs``, with this side's rows, so
    it shows in status, the page and the log. ``peers``: peer id -> role. The
    events are marked routed (never sent) in the caller's transaction.
    """
    foreign = [d.name for d in catalog if not (d.owner == role or (d.both_sides and role == "ho"))]
    if not foreign:
        return 0
    marks = ", ".join("?" for _ in foreign)  # only these types' events are read: a big backlog is not
    found = rows.fetch_tuples(conn, "SELECT id, doc_type, doc_key, created_at FROM xchg_event WHERE routed = 0 "
                                    f"AND doc_type IN ({marks}) ORDER BY id", tuple(foreign))
    latest: dict[tuple[str, str], tuple[int, Any]] = {}
    ids: list[int] = []
    for eid, doc_type, raw, at in found:
        dt = catalog.get(doc_type)
        ids.append(int(eid))
        latest[(dt.name, rows.canonicalize(str(raw)))] = (int(eid), at)
    if not ids:
        return 0
    hos = sorted(p for p, r in peers.items() if r == "ho")
    for (doc_type, key), (eid, at) in latest.items():
        dt = catalog.get(doc_type)
        if dt.owner == "ho":
            peer = hos[0] if hos else "ho"
        else:  # the store named in the owner column of the key
            col = dt.owner_columns[0] if dt.owner_columns else None
            peer = rows.parse_key(key)[dt.key.index(col)] if col in dt.key else ""
        held = bases(conn, peer, doc_type, [key]).get(key, 0)
        got = rows.read_doc_tables(conn, [catalog.table(t) for t in dt.tables()], dt.key, [key])
        record(conn, doc_type=doc_type, doc_key=key, peer=peer, seq=0, policy=f"{dt.owner}-wins",
               status=ConflictStatus.DECIDED, kept="theirs", ours=Local(eid, as_utc(at)),
               our_rows=got if got[dt.header].num_rows else None, their_version=held, their_base=0,
               their_at=None, their_rows=None,
               note=f"{doc_type} is owned by the {dt.owner} side: this side's change is not sent; the owner's "
                    f"version {held} stands and its next change replaces this one here")
    rows.executemany(conn, "UPDATE xchg_event SET routed = 1 WHERE id = ?", [(i,) for i in ids])
    log.warning("not sending %d changes made here to documents the other side owns (%s): logged as conflicts "
                "the owner wins (exchange status conflicts)", len(latest),
                ", ".join(sorted({t for t, _k in latest})))
    return len(latest)


# ---------------------------------------------------------------- what this node tells a peer (heartbeat v2)

#: ``seq`` of a conflict logged by :func:`report_foreign_edits`: no bundle, a change made here
FOREIGN_SEQ = 0


@dataclass(frozen=True)
class Foreign:
    """A standing change made here to a document ``peer`` owns (the latest per document)."""

    doc_type: str
    doc_key: str
    at: datetime | None
    conflict_id: int


def peer_counts(conn: Connection, foreign: Mapping[str, list[Foreign]] | None = None) -> dict[str, dict[str, int]]:
    """This node's conflicts with each peer, as a heartbeat v2 tells it (docs/FORMAT.md section 12):
    held for a person (OPEN), decided by a policy (DECIDED), and its standing changes to documents
    that peer owns (:func:`standing_foreign`). Read once for every peer (a sync's heartbeats to all of
    them), so an HO's hundreds of stores cost two queries, not two per store. A peer without any: absent.
    ``foreign``: :func:`standing_foreign`, when the caller read it already."""
    c = xchg_conflict.c
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"conflicts_held": 0, "conflicts_decided": 0,
                                                          "foreign_edits": 0})
    for peer, st, n in conn.execute(select(c.peer, c.status, func.count()).where(
            c.seq != FOREIGN_SEQ, c.status != ConflictStatus.RESOLVED).group_by(c.peer, c.status)):
        out[str(peer)]["conflicts_held" if st == ConflictStatus.OPEN else "conflicts_decided"] += int(n)
    for peer, found in (standing_foreign(conn) if foreign is None else foreign).items():
        out[peer]["foreign_edits"] = len(found)
    return dict(out)


def standing_foreign(conn: Connection) -> dict[str, list[Foreign]]:
    """Per peer, changes made here to documents that peer owns that still stand: logged by
    :func:`report_foreign_edits` and not replaced since by a newer version of the owner's (its version
    applied here is still the one the change was made on). Newest first, one per document."""
    c = xchg_conflict.c
    latest: dict[tuple[str, str, str], tuple[int, int, datetime | None]] = {}
    for cid, peer, doc_type, key, held, at in conn.execute(
            select(c.id, c.peer, c.doc_type, c.doc_key, c.their_version, c.our_at).where(
                c.seq == FOREIGN_SEQ, c.status == ConflictStatus.DECIDED).order_by(c.id)):
        latest[(str(peer), str(doc_type), str(key))] = (int(cid), int(held), as_utc(at))
    by_type: dict[tuple[str, str], list[str]] = defaultdict(list)
    for peer, doc_type, key in latest:
        by_type[(peer, doc_type)].append(key)
    out: dict[str, list[Foreign]] = defaultdict(list)
    for (peer, doc_type), keys in by_type.items():
        now = bases(conn, peer, doc_type, keys)
        for k in keys:
            cid, held, at = latest[(peer, doc_type, k)]
            if now.get(k, 0) <= held:  # the owner's newer version has not replaced it yet
                out[peer].append(Foreign(doc_type, k, at, cid))
    return {p: sorted(found, key=lambda f: -f.conflict_id) for p, found in out.items()}


def value_digest(value: Any) -> str:
    """16 hex digits that stand for a column's value, the same on SQLite and PostgreSQL for the same
    value (a number by its value, a time in UTC), so two nodes compare rows without sending them."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, datetime):
        text = aware(value).astimezone(UTC).isoformat()
    elif isinstance(value, date):
        text = value.isoformat()
    elif isinstance(value, (Decimal, int, float)):
        text = format(Decimal(str(value)).normalize(), "f")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).hex()
    else:
        text = str(value)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_digests(conn: Connection, catalog: Catalog, doc_type: str, doc_key: str) -> dict[str, str] | None:
    """A digest of each column of the document's header row here (None: no such document here)."""
    dt = catalog.get(doc_type)
    got = rows.read_doc_tables(conn, [catalog.table(dt.header)], dt.key, [doc_key])[dt.header].to_pylist()
    return {col: value_digest(v) for col, v in got[0].items()} if got else None
