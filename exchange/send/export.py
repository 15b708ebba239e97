"""Pending events -> sealed bundles in the outbox, per peer, all or nothing.

Crash safety: a bundle is sealed to ``NAME.part`` and fsynced, then one database
transaction allocates its seq, records it as EXPORTED and marks its documents,
and only then is the file renamed into place. A kill before the commit leaves a
stray ``.part`` (removed at the next run) and pending events; after it, the
recorded ``.part`` is published by :func:`recover_outbox`. A seq is never
reused for a different file.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection, and_, func, select, tuple_, update

from exchange.database import conflicts as conflict_log
from exchange.database import lanes, rows, sqlite_arrow
from exchange.database.arrow_memory import system_pool, trim
from exchange.database.catalog import Catalog, DocType, PeerInfo
from exchange.database.sqlite_arrow import SqliteArrowReader
from exchange.database.tables import (begin_write, xchg_broadcast, xchg_decision, xchg_delivery, xchg_event, xchg_sent,
                                      xchg_setaside)
from exchange.errors import ConfigError, ExchangeError
from exchange.faults import crashpoint
from exchange.node import rotation
from exchange.node.home import Node
from exchange.progress import NullReporter, Reporter
from exchange.send import clock, position, setaside, streams
from exchange.send.restart import RestartHook, summary_fields
from exchange.send.streams import EventBatch
from exchange.send.notices import NOTICE, supersede_notices
from exchange.database.batch import EVENTS_SCHEMA, control_totals
from exchange.files import fsync_all, publish, publish_all, sha256_file, utc_now
from exchange.wire import keynotice
from exchange.wire.bundle import ParquetCache, Sealed, seal_bundle
from exchange.wire.formats import BASES_TABLE, EVENTS_TABLE, PART_SUFFIX, SUPERSEDES, bundle_name
from exchange.vocabulary import DEFAULT_LANE, SentStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exported:
    peer: str
    seq: int
    file: str
    documents: int
    lane: str = DEFAULT_LANE


def peer_infos(node: Node) -> list[PeerInfo]:
    """The peers documents are routed to: every one but those removed (a paused store's queue grows)."""
    return [PeerInfo(id=p.id, role=p.role, groups=p.groups) for p in node.cfg.peers.values() if p.routed]


def _header_rows(conn: Connection, catalog: Catalog, dt: DocType, keys: list[str]) -> dict[str, dict[str, Any]]:
    table = catalog.table(dt.header)
    data = rows.read_docs(conn, table, dt.key, keys)
    out = {}
    for k, row in zip(rows.row_keys(data, dt.key), data.to_pylist(), strict=True):
        out[k] = row
    return out


#: Events routed per step: the work of a big backlog (a day of sales) stays in bounded memory.
ROUTE_CHUNK = 20_000


def route_events(conn: Connection, node: Node) -> int:
    """Turn new capture events into per-peer deliveries (coalesced per document).

    The backlog is read in chunks in event order; a document in several chunks
    is upserted again by the later one, so the newest version wins as if the
    backlog had been read at once. A store with one HO routes nothing: its
    events are sent straight from the log (:mod:`exchange.send.streams`).
    """
    if streams.direct_peer(node) is not None:
        return 0
    max_id = conn.execute(select(func.max(xchg_event.c.id)).where(xchg_event.c.routed == 0)).scalar()
    if max_id is None:
        return 0
    catalog, peers = node.catalog, peer_infos(node)
    sql = rows.driver_sql(conn, "SELECT doc_type, doc_key, op, id FROM xchg_event WHERE routed = 0 AND id > ? "
                            f"AND id <= ? ORDER BY id LIMIT {ROUTE_CHUNK}")
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]  # tuples, not Rows
    n, after = 0, 0
    try:
        while events := cur.execute(sql, (after, max_id)).fetchall():
            n += _route_chunk(conn, node, catalog, peers, events)
            after = int(events[-1][3])
    finally:
        cur.close()
    conn.execute(update(xchg_event).where(and_(xchg_event.c.routed == 0, xchg_event.c.id <= max_id))
                 .values(routed=1))
    return n


def _route_chunk(conn: Connection, node: Node, catalog: Catalog, peers: list[PeerInfo],
                 events: Sequence[tuple[str, str, str, int]]) -> int:
    latest: dict[tuple[str, str], tuple[str, int]] = {}
    canon = rows.canonicalize
    for doc_type, doc_key, op, eid in events:
        latest[(doc_type, canon(doc_key))] = (op, eid)
    # versions above everything routed before: an event that committed late is not stale (exchange.send.clock)
    latest = {(t, k): (op, v) for t, k, op, v in clock.stamp(conn, [(t, k, op, eid) for (t, k), (op, eid)
                                                                     in latest.items()])}
    by_type: dict[str, list[str]] = defaultdict(list)
    for doc_type, key in latest:
        by_type[doc_type].append(key)
    deliveries: list[tuple[str, str, str, str, int]] = []
    broadcast: list[tuple[str, str, str, int]] = []
    for doc_type, keys in by_type.items():
        dt = catalog.get(doc_type)
        if dt.both_sides and node.cfg.role == "ho":  # the HO's change of a store's document goes to that store
            deliveries.extend(_to_owner(conn, catalog, dt, keys, latest, peers))
            continue
        if dt.owner != node.cfg.role:
            log.warning("ignoring %d events for %s: owned by the %s side", len(keys), doc_type, dt.owner)
            continue
        if dt.route.kind == "all":  # every store: one broadcast row, each stream's cursor follows
            broadcast.extend((doc_type, key, *latest[(doc_type, key)]) for key in keys)
            continue
        if dt.route.kind == "ho":  # no column to read: the event's op says whether it exists
            fixed = dt.route.targets({}, peers)
            # only a delete must also reach peers that had the document before
            prior = _prior_peers(conn, doc_type, [k for k in keys if latest[(doc_type, k)][0] == "D"])
            for key in keys:
                op, version = latest[(doc_type, key)]
                targets = sorted(set(fixed) | prior.get(key, set())) if op == "D" else fixed
                deliveries.extend((p, doc_type, key, op, version) for p in targets)
            continue
        prior = _prior_peers(conn, doc_type, keys)
        try:
            headers = _header_rows(conn, catalog, dt, keys)
        except rows.ENCODE_ERRORS as exc:  # a header its route cannot be read from: set aside, route the rest
            keys = _set_aside_in_routing(conn, node, catalog, setaside.EncodeFailed(doc_type, keys, str(exc)),
                                         {(doc_type, k): latest[(doc_type, k)][1] for k in keys})
            headers = _header_rows(conn, catalog, dt, keys)
        for key in keys:
            op, version = latest[(doc_type, key)]
            header = headers.get(key)
            if header is None:  # deleted (or never committed): tell whoever had it
                op, targets = "D", sorted(prior.get(key, set()))
            else:  # a document that moved (new destination) is deleted where it was
                targets = dt.route.targets(header, peers)
                for gone in sorted(prior.get(key, set()) - set(targets)):
                    deliveries.append((gone, doc_type, key, "D", version))
            deliveries.extend((p, doc_type, key, op, version) for p in targets)
    live = {p.id for p in peers}  # a removed peer had documents before: it is sent nothing more, deletes neither
    deliveries = [d for d in deliveries if d[0] in live]
    _replace_deliveries(conn, deliveries)
    _replace_broadcast(conn, broadcast)
    return len(deliveries) + len(broadcast)


def _set_aside_in_routing(conn: Connection, node: Node, catalog: Catalog, failed: setaside.EncodeFailed,
                          versions: dict[tuple[str, str], int]) -> list[str]:
    """Set aside the documents behind ``failed`` (in the routing transaction); the keys left to route."""
    problems = setaside.find(conn, catalog, failed)
    if not problems:
        raise ExchangeError(f"{failed.doc_type}: headers could not be read for routing, yet no document "
                            f"fails alone: {failed.error}", hint="Run `exchange doctor`; report it with the log.")
    setaside.take_out(conn, node, problems, versions)
    for p in problems:
        log.warning("set aside: %s", p.reason)
    bad = {p.doc_key for p in problems}
    return [k for k in failed.keys if k not in bad]


def _to_owner(conn: Connection, catalog: Catalog, dt: DocType, keys: list[str],
              latest: dict[tuple[str, str], tuple[str, int]], peers: list[PeerInfo]
              ) -> list[tuple[str, str, str, str, int]]:
    """Deliveries of the HO's changes of a type editable on both sides: to the store in its owner column."""
    column = dt.owner_columns[0]
    stores = {p.id for p in peers if p.role == "store"}
    headers = {} if column in dt.key else _header_rows(conn, catalog, dt, keys)
    out = []
    for key in keys:
        op, version = latest[(dt.name, key)]
        owner = (rows.parse_key(key)[dt.key.index(column)] if column in dt.key
                 else (headers.get(key) or {}).get(column))
        if owner is None or str(owner) not in stores:
            log.warning("%s %s: owner %r is not a store peer of this node; the change is not sent", dt.name, key, owner)
            continue
        out.append((str(owner), dt.name, key, op, version))
    conflict_log.note_sent(conn, dt.name, {d[2]: d[4] for d in out})  # the versions and times a conflict compares
    return out


def _replace_broadcast(conn: Connection, docs: list[tuple[str, str, str, int]]) -> None:
    """Record the latest op and version of documents that go to every store.

    Stores follow this table with a cursor, so a document must land after every
    cursor: its version comes from :func:`exchange.send.clock.stamp`, above every
    version given out before, even for an event that committed late. Upserted
    set-based (PostgreSQL: COPY into a stage, one upsert): deleting in ``IN (...)``
    chunks first cost PostgreSQL a scan of the table per chunk (91 of 100 s
    routing 100,000 item changes).
    """
    if docs:
        rows.upsert_rows(conn, xchg_broadcast, pa.table({
            "doc_type": [d[0] for d in docs], "doc_key": [d[1] for d in docs], "op": [d[2] for d in docs],
            "version": pa.array([d[3] for d in docs], pa.int64())}))


def _prior_peers(conn: Connection, doc_type: str, keys: list[str]) -> dict[str, set[str]]:
    """Peers that were sent each document before (a delete must reach them)."""
    prior: dict[str, set[str]] = defaultdict(set)
    for i in range(0, len(keys), rows.CHUNK):
        chunk = keys[i:i + rows.CHUNK]
        for peer, k in conn.execute(select(xchg_delivery.c.peer, xchg_delivery.c.doc_key).where(and_(
                xchg_delivery.c.doc_type == doc_type, xchg_delivery.c.doc_key.in_(chunk)))):
            prior[k].add(peer)
    return prior


def _replace_deliveries(conn: Connection, deliveries: list[tuple[str, str, str, str, int]]) -> None:
    """Set each (peer, document) to PENDING with its new op and version: one upsert per row, in bulk."""
    rows.executemany(conn, "INSERT INTO xchg_delivery (peer, doc_type, doc_key, op, version, status) "
                           "VALUES (?, ?, ?, ?, ?, 'PENDING') ON CONFLICT (peer, doc_type, doc_key) "
                           "DO UPDATE SET op = excluded.op, version = excluded.version, status = 'PENDING', "
                           "seq = NULL", deliveries)


def _upserts_by_type(catalog: Catalog, docs: Sequence[tuple[str, str, str, int]]) -> dict[str, list[str]]:
    """The keys of the upserted documents of a batch, per type, in catalog order."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for doc_type, key, op, _v in docs:
        if op == "U":
            by_type[doc_type].append(key)
    return {n: by_type[n] for n in catalog.names if n in by_type}


def build_tables(conn: Connection, catalog: Catalog, docs: Sequence[tuple[str, str, str, int]],
                 reader: SqliteArrowReader | None = None, upserts: dict[str, list[str]] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Arrow tables (``_events`` first) and the per-type summary for a batch of documents.

    ``reader``: an ADBC helper for a SQLite database, used for batches big
    enough to pay for starting it (see :mod:`exchange.database.sqlite_arrow`).
    ``upserts``: :func:`_upserts_by_type` of ``docs``, when the caller has it.
    """
    events = pa.Table.from_pydict({
        "doc_type": [d[0] for d in docs], "doc_key": [d[1] for d in docs],
        "op": [d[2] for d in docs], "version": [d[3] for d in docs]}, schema=EVENTS_SCHEMA)
    tables: dict[str, Any] = {EVENTS_TABLE: events}
    documents: dict[str, Any] = {}
    by_type = _upserts_by_type(catalog, docs) if upserts is None else upserts
    deletes: dict[str, int] = defaultdict(int)
    for doc_type, _key, op, _v in docs:
        if op != "U":
            deletes[doc_type] += 1
    for doc_type in [n for n in catalog.names if n in by_type or n in deletes]:
        dt = catalog.get(doc_type)
        keys = by_type.get(doc_type, [])
        try:
            per = rows.read_doc_tables(conn, [catalog.table(t) for t in dt.tables()], dt.key, keys,
                                       reader=reader if reader is not None and sqlite_arrow.wanted(len(keys)) else None)
        except rows.ENCODE_ERRORS as exc:  # a value its column's type cannot hold (exchange.send.setaside)
            raise setaside.EncodeFailed(doc_type, keys, f"{type(exc).__name__}: {exc}") from exc
        tables.update(per)
        documents[doc_type] = control_totals(dt, per, len(by_type.get(doc_type, [])))
        documents[doc_type]["deletes"] = deletes.get(doc_type, 0)
    return tables, {"documents": documents}


def recover_outbox(node: Node) -> int:
    """Publish sealed-and-recorded ``.part`` files; remove unrecorded ones."""
    outbox = node.cfg.outbox
    recorded = {}
    with node.engine.connect() as conn:
        for name, sha in conn.execute(select(xchg_sent.c.file_name, xchg_sent.c.file_sha256)
                                      .where(xchg_sent.c.status == SentStatus.EXPORTED.value)):
            recorded[name] = sha
    fixed = 0
    for part in outbox.glob("*" + PART_SUFFIX):
        final = part.with_name(part.name[: -len(PART_SUFFIX)])
        if final.name in recorded and not final.exists() and sha256_file(part) == recorded[final.name]:
            publish(part, final)
            log.info("recovered %s after an interrupted export", final.name)
            fixed += 1
        elif final.suffix == ".bundle":
            part.unlink()
    return fixed


def _pending_broadcast(conn: Connection, peer: str, limit: int, shared: _Shared | None = None,
                       lane: str = DEFAULT_LANE, types: lanes.LaneTypes | None = None, group: _Group | None = None
                       ) -> list[tuple[str, str, str, int]]:
    """Broadcast documents of ``lane`` after the cursor of ``peer``'s stream in that lane, in cursor
    order (shared by peers at one cursor)."""
    taken = group.streams.get(peer) if group is not None else None  # (read with the group's other streams)
    cursor = taken.cursor if taken is not None else position.broadcast_cursor(conn, peer, lane)
    types = types or lanes.LaneTypes()
    if shared is not None:
        memo = shared.broadcast.get((cursor, limit, lane))
        if memo is None:
            memo = shared.broadcast[(cursor, limit, lane)] = _fetch_broadcast(conn, cursor, limit, types)
        return memo
    return _fetch_broadcast(conn, cursor, limit, types)


def _fetch_broadcast(conn: Connection, cursor: tuple[int, str, str], limit: int,
                     types: lanes.LaneTypes | None = None) -> list[tuple[str, str, str, int]]:
    b = xchg_broadcast.c
    q = select(b.doc_type, b.doc_key, b.op, b.version).where(tuple_(b.version, b.doc_type, b.doc_key) > tuple_(*cursor))
    in_lane = lanes.condition(b.doc_type, types) if types is not None else None
    if in_lane is not None:
        q = q.where(in_lane)
    found = conn.execute(q.order_by(b.version, b.doc_type, b.doc_key).limit(limit)).all()
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in found]


def _merge(*sources: list[tuple[str, str, str, int]]) -> list[tuple[str, str, str, int]]:
    """Deliveries, documents from the log and broadcast documents, one entry per document (newest wins)."""
    given = [s for s in sources if s]
    if len(given) <= 1:
        return given[0] if given else []
    best: dict[tuple[str, str], tuple[str, str, str, int]] = {}
    for d in [x for s in given for x in s]:
        old = best.get((d[0], d[1]))
        if old is None or old[3] < d[3]:
            best[(d[0], d[1])] = d
    return list(best.values())


class _Shared:
    """Per export run: batches already built, so identical batches to many peers share tables."""

    def __init__(self, node: Node) -> None:
        self.tables: dict[tuple[tuple[str, str, str, int], ...], tuple[dict[str, Any], dict[str, Any]]] = {}
        self.parquet = ParquetCache(node.cfg.work)
        self.broadcast: dict[tuple[tuple[int, str, str], int, str], list[tuple[str, str, str, int]]] = {}
        self.recent: list[tuple[list[tuple[str, str, str, int]], tuple[dict[str, Any], dict[str, Any]]]] = []
        self.ahead_events: EventBatch | None = None  # the store's next events, read while one was sealed
        self.ahead_lane = DEFAULT_LANE  # the lane whose events those are
        url = node.engine.url
        self.reader = (sqlite_arrow.SqliteArrowReader(url.database)
                       if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
                       and sqlite_arrow.mode() != "off" and sqlite_arrow.available() else None)

    def prefetch(self, conn: Connection, catalog: Catalog, upserts: dict[str, list[str]]) -> None:
        """Have the helper read ahead the first big document type of a coming batch."""
        if self.reader is None:
            return
        for doc_type, keys in upserts.items():
            if sqlite_arrow.wanted(len(keys)):
                dt = catalog.get(doc_type)
                rows.prefetch_doc_tables(conn, [catalog.table(t) for t in dt.tables()], dt.key, keys, self.reader)
                return

    def close(self) -> None:
        self.parquet.close()
        if self.reader is not None:
            self.reader.close()

    KEEP = 2  # distinct batches kept: memory stays bounded on an HO with many different streams

    def build(self, conn: Connection, catalog: Catalog, docs: list[tuple[str, str, str, int]]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        # the same list object for every peer at one broadcast cursor: found by identity, without
        # making and hashing a key of 20,000 documents per peer
        for seen, built in self.recent:
            if seen is docs and any(built is kept for kept in self.tables.values()):
                return built
        key = tuple(docs)
        if key not in self.tables:
            while len(self.tables) >= self.KEEP:
                old = self.tables.pop(next(iter(self.tables)))
                for source in old[0].values():
                    self.parquet.drop(source)
            self.tables[key] = build_tables(conn, catalog, docs, self.reader)
        self.recent = [*self.recent[-(self.KEEP - 1):], (docs, self.tables[key])]
        return self.tables[key]


def _pending_direct(conn: Connection, peer: str, limit: int,
                    after: tuple[str, str, str, int] | None = None,
                    types: lanes.LaneTypes | None = None) -> list[tuple[str, str, str, int]]:
    """``peer``'s next pending deliveries (of the lane's ``types``) in (version, type, key) order, after
    ``after`` if given.

    Ties in version (a reload gives every document one) are ordered by type and
    key. Read as plain tuples: a batch is 20,000 rows, twice per bundle.
    """
    in_lane, lane_params = lanes.sql_condition("doc_type", types or lanes.LaneTypes())
    sql = ("SELECT doc_type, doc_key, op, version FROM xchg_delivery WHERE peer = ? AND status = 'PENDING'"
           + in_lane)
    params: tuple[Any, ...] = (peer, *lane_params)
    if after is not None:
        sql += " AND (version, doc_type, doc_key) > (?, ?, ?)"
        params += (after[3], after[0], after[1])
    found = rows.fetch_tuples(conn, sql + f" ORDER BY version, doc_type, doc_key LIMIT {int(limit)}", params)
    return [(str(t), str(k), str(o), int(v)) for t, k, o, v in found]


def _mark_exported(conn: Connection, peer: str, seq: int, docs: Sequence[tuple[str, str, str, int]]) -> None:
    """The batch's deliveries (at the version sealed) are EXPORTED in bundle ``seq``.

    One UPDATE per row on the driver's executemany path: a single statement
    joining the batch as a JSON parameter measured the same here (1.3-1.7 s
    either way for 222,000 rows); the b-tree work per row is the cost.
    """
    rows.executemany(conn, "UPDATE xchg_delivery SET status = 'EXPORTED', seq = ? WHERE peer = ? "
                           "AND doc_type = ? AND doc_key = ? AND version = ? AND status = 'PENDING'",
                     [(seq, peer, t, k, v) for t, k, _op, v in docs])


def _export_next(node: Node, peer: str, rep: Reporter, max_docs: int | None, shared: _Shared | None,
                 look_ahead: bool, group: _Group | None = None, lane: str = DEFAULT_LANE) -> Exported | None:
    """Seal the next bundle of ``peer``'s stream in ``lane``, or return None when nothing is pending there.

    ``group``: seal it in the group's transaction (:func:`_export_group`, all in the group's lane), not in
    one of its own.
    """
    limit = max_docs or node.cfg.max_bundle_rows
    broadcast_to = node.cfg.peer(peer).role == "store"
    from_log = peer == streams.direct_peer(node)
    types = lanes.lane_types(node.catalog, lane)
    # a lane with no type that goes to every store reads nothing of the broadcast queue
    broadcast_to = broadcast_to and any(d.route.kind == "all" and d.name in types for d in node.catalog)
    while True:
        with nullcontext(group.conn) if group is not None else node.engine.connect() as conn:
            direct = _pending_direct(conn, peer, limit, types=types)
            events = (streams.pending(conn, node, limit - len(direct),
                                      known=shared.ahead_events if shared is not None and shared.ahead_lane == lane
                                      else None, types=types)
                      if from_log and len(direct) < limit else EventBatch([], []))
            room = limit - len(direct) - len(events.ids)
            bc = (_pending_broadcast(conn, peer, room, shared, lane, types, group) if broadcast_to and room > 0
                  else [])
            docs = _merge(direct, events.docs, bc)
            upserts = events.upserts if docs is events.docs else None  # (computed where needed: once per batch)
            # a full batch: the next one is known now, and the helper process reads it (after this
            # one) while this one is sealed; it is checked again after the commit
            if look_ahead and shared is not None and shared.reader is not None and room <= 0:
                shared.prefetch(conn, node.catalog, _upserts_by_type(node.catalog, docs) if upserts is None
                                else upserts)  # (asked already when it was the batch ahead)
                shared.prefetch(conn, node.catalog, _look_ahead(conn, node, peer, limit, direct, events, shared,
                                                                lane, types))
        if docs:
            try:
                return _seal_batch(node, peer, docs, rep, shared, bc[-1] if bc else None, direct, events, upserts,
                                   group, lane=lane)
            except setaside.EncodeFailed as failed:  # (rolled back) those documents out of every queue, then on
                if group is not None:  # the group's transaction is rolled back first (it holds the write lock)
                    raise _GroupFailed(failed, {(t, k): v for t, k, _op, v in docs}) from failed
                setaside.record(node, failed, {(t, k): v for t, k, _op, v in docs})
                if shared is not None:  # what it read ahead or remembered may hold them
                    shared.ahead_events = None
                    shared.broadcast.clear()
                continue
        if not events.ids:  # nothing to send, but a key notice must travel (in the default lane)
            due = lane == DEFAULT_LANE and rotation.control_bundle_due(node, peer)
            if not due and node.cfg.peer(peer).role == "store" and not types.everything:
                if group is not None:  # (in the group's transaction, which holds the write lock)
                    _pass_broadcast(group.conn, node, peer, lane)
                else:
                    with node.engine.begin() as conn:
                        begin_write(conn)
                        _pass_broadcast(conn, node, peer, lane)
            return _seal_batch(node, peer, [], rep, group=group, lane=lane) if due else None
        if group is not None:  # only events of types this node does not send
            streams.mark_sealed(group.conn, None, events.ids)
            continue
        with node.engine.begin() as conn:  # only events of types this node does not send
            begin_write(conn)
            streams.mark_sealed(conn, None, events.ids)


def _pass_broadcast(conn: Connection, node: Node, peer: str, lane: str) -> None:
    """A lane with nothing of the broadcast queue left moves its cursor to the queue's end: what comes
    after it is still read, and "is a store's cursor behind?" (exchange.send.pending) stays one
    comparison per stream, without the catalog."""
    b = xchg_broadcast.c
    row = conn.execute(select(b.version, b.doc_type, b.doc_key)
                       .order_by(b.version.desc(), b.doc_type.desc(), b.doc_key.desc()).limit(1)).first()
    if row is None:
        return
    end = (int(row[0]), str(row[1]), str(row[2]))
    have = position.lanes_of(conn, peer)
    if lane == DEFAULT_LANE:  # the lanes without a stream yet keep the cursor they start from (the default's)
        start = position.broadcast_cursor(conn, peer, lane)
        for other in node.catalog.lanes():
            if other not in have and other != lane:
                position.move_cursor(conn, peer, other, start)
    if lane not in have or position.broadcast_cursor(conn, peer, lane) < end:
        position.move_cursor(conn, peer, lane, end)


def _look_ahead(conn: Connection, node: Node, peer: str, limit: int, direct: list[tuple[str, str, str, int]],
                events: EventBatch, shared: _Shared, lane: str = DEFAULT_LANE,
                types: lanes.LaneTypes | None = None) -> dict[str, list[str]]:
    """The upserts of the batch after a full one, as far as they can be known before this one commits."""
    if len(direct) == limit:
        return _upserts_by_type(node.catalog, _pending_direct(conn, peer, limit, after=direct[-1], types=types))
    shared.ahead_lane = lane
    shared.ahead_events = streams.pending(conn, node, limit, after=events.last_id, types=types)
    return shared.ahead_events.upserts


def _seal_batch(node: Node, peer: str, docs: list[tuple[str, str, str, int]], rep: Reporter,
                shared: _Shared | None = None, cursor: tuple[str, str, str, int] | None = None,
                direct: list[tuple[str, str, str, int]] | None = None,
                events: EventBatch | None = None, upserts: dict[str, list[str]] | None = None,
                group: _Group | None = None, lane: str = DEFAULT_LANE, restart: RestartHook | None = None) -> Exported:
    with nullcontext(group.conn) if group is not None else node.engine.begin() as conn:
        if group is None:
            begin_write(conn)  # SQLite: the seq is read inside the transaction that records it
        late: list[tuple[int, int]] = []  # (event id, version sent) of log documents that committed late
        if events is not None and events.docs:  # documents straight from the capture log carry event ids:
            stamped = clock.stamp(conn, events.docs)  # versions given in the bundle's transaction (exchange.send.clock)
            moved = {d: s for d, s in zip(events.docs, stamped, strict=True) if s is not d}  # (a new tuple if moved)
            late = [(d[3], s[3]) for d, s in moved.items()]
            if moved:
                docs = [moved.get(d, d) for d in docs]
        taken = group.streams.get(peer) if group is not None else None  # (the group took it already)
        # (send/position.py: every stream's place)
        seq, prev = (taken.seq, taken.prev) if taken is not None else position.next_position(conn, peer, lane)
        if restart is not None and seq <= restart.above:  # the HO went back: above what the store applied
            seq = restart.above + 1
        rep.start(f"export to {peer} #{seq}" + ("" if lane == DEFAULT_LANE else f" [{lane}]"), len(docs))
        # only a batch with broadcast documents can be another peer's batch too: the rest is not
        # kept (a store's backlog would hold the previous batch's tables while reading the next)
        cache = shared if shared is not None and cursor is not None else None
        tables, summary = (cache.build(conn, node.catalog, docs) if cache is not None
                           else build_tables(conn, node.catalog, docs, shared.reader if shared else None, upserts))
        # exchange.send.resend: "seq N is superseded", to skip it there (a group asked once who has any)
        notices = supersede_notices(conn, peer, lane) if group is None or peer in group.noticed else []
        if notices:
            summary = {**summary, SUPERSEDES: notices}
        # FORMAT.md v3: types edited on both sides (the summary lists every type of the batch)
        both = any(node.catalog.get(t).both_sides for t in summary.get("documents", {}))
        based = conflict_log.bases_table(conn, node.catalog, peer, docs,
                                         from_log=events is not None and bool(events.docs)) if both else None
        if based is not None:
            tables = {**tables, BASES_TABLE: based}
        name = bundle_name(node.id, peer, seq, lane)
        part = node.cfg.outbox / (name + PART_SUFFIX)
        # a key rotation not yet known to the peer travels along (in the default lane, whose acks end it)
        notice = rotation.notice_for(node, peer, conn) if lane == DEFAULT_LANE else None
        if notice is not None:
            summary = {**summary, keynotice.SUMMARY_FIELD: notice}
        summary = {**summary, **summary_fields(conn, node, peer, restart, seq)}  # exchange.send.restart
        if restart is not None:  # an operator's stream restart: the chain starts again here (FORMAT.md 4.2)
            prev = None
        sealed: Sealed = seal_bundle(
            part, key=rotation.signing_key_for(node, peer, conn), sender=node.id, recipient=peer, seq=seq, prev=prev,
            recipients=node.recipients_for(peer), tables=tables, summary=summary,
            parquet_cache=cache.parquet if cache is not None else None, catalog=node.catalog.description, lane=lane,
            sync=group is None)  # (a group fsyncs its bundles together, before its commit)
        crashpoint("export.sealed")
        now = utc_now()
        conn.execute(xchg_sent.insert().values(
            peer=peer, lane=lane, seq=seq, file_name=name, file_sha256=sealed.sha256,
            manifest_sha256=sealed.manifest.sha256, size=sealed.size, status=SentStatus.EXPORTED.value,
            summary=json.dumps(_counts(summary)), created_at=now,
            sent_totals=json.dumps(summary.get("documents", {}), sort_keys=True)))
        # the stream's broadcast cursor moves with the bundle, atomically
        position.advance(conn, peer, lane, seq, sealed.manifest.sha256,
                         (cursor[3], cursor[0], cursor[1]) if cursor is not None else None)
        _mark_exported(conn, peer, seq, docs if direct is None else direct)
        if group is None or group.set_aside:  # (a group looked once whether anything is set aside)
            setaside.sent_again(conn, docs)
        streams.mark_sealed(conn, seq, events.ids if events is not None else (), late)
        if restart is not None:
            restart.commit(conn, seq, sealed.manifest.sha256)
        rep.advance(len(docs))
    if group is not None:  # published with the group, after its commit
        rep.finish()
        group.sealed.append((part, node.cfg.outbox / name, len(docs)))
        return Exported(peer, seq, name, len(docs), lane)
    crashpoint("export.committed")
    publish(part, node.cfg.outbox / name)
    rep.finish()
    rep.state(name, SentStatus.EXPORTED, f"{len(docs)} documents")
    return Exported(peer, seq, name, len(docs), lane)


def _counts(summary: dict[str, Any]) -> dict[str, int]:
    return {t: int(v.get("count", 0)) + int(v.get("deletes", 0))
            for t, v in summary.get("documents", {}).items()}


def export_all(node: Node, *, reporter: Reporter | None = None) -> list[Exported]:
    """Route new events, then seal bundles for every peer with pending documents."""
    node.cfg.work.mkdir(parents=True, exist_ok=True)
    shared = _Shared(node)
    try:
        # a store routes nothing, so its backlog is known now: its reader starts first and imports
        # pyarrow and the driver (about 0.1 s) while this process recovers the outbox and routes
        early = (shared.reader is not None and streams.direct_peer(node) is not None
                 and sqlite_arrow.wanted(_backlog(node)))
        if early and shared.reader is not None:
            shared.reader.start()
        recover_outbox(node)
        with node.engine.begin() as conn:
            begin_write(conn)
            # a change made here to a document the other side owns: logged as a conflict the owner wins
            conflict_log.report_foreign_edits(conn, node.catalog, node.cfg.role,
                                              {p.id: p.role for p in node.cfg.peers.values()})
            routed = route_events(conn, node)
        if early:  # the Parquet writer loads (30-40 ms) while the reader starts, not at the first seal
            import pyarrow.parquet  # noqa: F401
        out: list[Exported] = []
        if shared.reader is not None and not early and sqlite_arrow.wanted(routed or _backlog(node)):
            shared.reader.start()  # its start-up overlaps the first pending query
        # One bundle per peer in turn, not every bundle of one peer first: stores at the same broadcast
        # cursor then ask for the same batch one after the other, and it is read and encoded once
        # (the cache keeps two batches; peer by peer, a change of five batches was re-read per store).
        rep = reporter or NullReporter()
        # a paused peer's documents wait; every stream (peer and lane) of the others takes its turn
        active = [(p, lane) for p in sorted(p.id for p in node.cfg.peers.values() if p.exchanging)
                  for lane in node.catalog.lanes()]
        with system_pool():
            _export_round_robin(node, active, rep, shared, out)
    finally:
        shared.close()
    return out


def _backlog(node: Node) -> int:
    """Unrouted events, counted up to what starting the reader needs (a store sends from its log)."""
    if streams.direct_peer(node) is None:
        return 0
    with node.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(
            select(xchg_event.c.id).where(xchg_event.c.routed == 0).limit(sqlite_arrow.MIN_DOCS).subquery())
        ).scalar() or 0)


def _export_round_robin(node: Node, active: list[tuple[str, str]], rep: Reporter, shared: _Shared,
                        out: list[Exported]) -> None:
    """One bundle per stream (peer and lane) in turn until no stream has anything pending: a lane with a
    long backlog (a masters reload) takes one bundle per round, the others go on beside it.

    A lane with several peers (an HO's fan-out) takes them up to :data:`GROUP` at a time, their bundles
    sealed in one transaction (:func:`_export_group`): a commit and a folder fsync per group, not per
    bundle. A lane with one peer (a store's lanes to its HO) seals in a transaction of its own, which
    holds the write lock only while the bundle is recorded.
    """
    while active:
        still = []
        for lane in dict.fromkeys(lane for _peer, lane in active):  # lane by lane: one lane's peers share batches
            peers = [peer for peer, in_lane in active if in_lane == lane]
            if len(peers) == 1:
                exp = _export_next(node, peers[0], rep, None, shared, look_ahead=len(active) == 1, lane=lane)
                trim()
                if exp is not None:
                    out.append(exp)
                    still.append((peers[0], lane))
                continue
            for i in range(0, len(peers), GROUP):
                for peer, exp in _export_group(node, peers[i:i + GROUP], rep, shared, lane):
                    if exp is not None:
                        out.append(exp)
                        still.append((peer, lane))
                trim()
        active = still


#: Peers whose next bundles are sealed in one transaction: one commit, one folder fsync, their
#: files fsynced together. It holds the write lock meanwhile (on SQLite, the whole database):
#: 32 bundles of a fan-out take a few hundred milliseconds.
GROUP = 32


@dataclass
class _Group:
    """Bundles sealed for several peers' streams in one lane in one transaction, published after its commit."""

    conn: Connection
    lane: str = DEFAULT_LANE
    sealed: list[tuple[Path, Path, int]] = field(default_factory=list)  # (.part, final name, documents)
    noticed: set[str] = field(default_factory=set)  # peers with a superseded notice in the lane (asked once)
    set_aside: bool = True  # anything set aside (else no peer's batch can take a document off the list)
    #: each peer's stream in the lane (next seq, last manifest, broadcast cursor), read and taken for the
    #: group at once; a peer seals one bundle per group, so they hold until its own
    streams: dict[str, position.Position] = field(default_factory=dict)

    @classmethod
    def open(cls, conn: Connection, peers: list[str], lane: str) -> _Group:
        d = xchg_decision.c
        noticed = {str(p) for p in conn.execute(select(d.peer).distinct().where(and_(
            d.side == NOTICE, d.kind == "superseded", d.lane == lane))).scalars()}
        listed = conn.execute(select(xchg_setaside.c.doc_type).limit(1)).first() is not None
        return cls(conn, lane, noticed=noticed, set_aside=listed, streams=position.take_positions(conn, peers, lane))


class _GroupFailed(Exception):
    """A batch of the group could not be encoded: the group's transaction is rolled back first."""

    def __init__(self, failed: setaside.EncodeFailed, versions: dict[tuple[str, str], int]) -> None:
        super().__init__(str(failed))
        self.failed, self.versions = failed, versions


def _export_group(node: Node, peers: list[str], rep: Reporter, shared: _Shared, lane: str = DEFAULT_LANE
                  ) -> list[tuple[str, Exported | None]]:
    """The next bundle of each of ``peers``' streams in ``lane``, all recorded in one transaction.

    The same steps as one bundle's (:func:`_seal_batch`), for many: each sealed to
    ``NAME.part``; every ``.part`` fsynced; one commit records them all; then the
    renames and one fsync of the outbox. A crash before the commit leaves
    unrecorded ``.part`` files (removed by :func:`recover_outbox`) and every
    document pending; after it, recorded ones, published by it.
    """
    while True:
        group: _Group | None = None
        try:
            with node.engine.begin() as conn:
                begin_write(conn)
                group = _Group.open(conn, peers, lane)
                got = [(peer, _export_next(node, peer, rep, None, shared, False, group, lane)) for peer in peers]
                fsync_all([part for part, _final, _n in group.sealed])
        except _GroupFailed as aborted:  # rolled back: nothing of the group was recorded
            _remove_parts(group)
            setaside.record(node, aborted.failed, aborted.versions)
            shared.ahead_events = None
            shared.broadcast.clear()
            continue
        if group.sealed:  # (a group that found nothing to send recorded nothing)
            crashpoint("export.committed")
        publish_all([(part, final) for part, final, _n in group.sealed])
        for _part, final, n in group.sealed:
            rep.state(final.name, SentStatus.EXPORTED, f"{n} documents")
        return got


def _remove_parts(group: _Group | None) -> None:
    for part, _final, _n in group.sealed if group is not None else ():
        part.unlink(missing_ok=True)


def reload(node: Node, peer: str, doc_types: Sequence[str]) -> int:
    """Queue the full current state of ``doc_types`` for ``peer`` (a new or repaired store).

    Routing still applies: a store gets the documents addressed to it (its own
    transfer orders, its group's promotions), never every store's. A true
    snapshot: what it was sent before and is no longer routed to it is deleted
    there. Returns the documents queued (upserts and deletes).
    """
    return requeue(node, peer, doc_types, everything=True).total


@dataclass(frozen=True)
class Queued:
    """What :func:`requeue` queued for one peer."""

    peer: str
    upserts: int = 0
    deletes: int = 0

    @property
    def total(self) -> int:
        return self.upserts + self.deletes


def reroute_peer(node: Node, peer: str) -> Queued:
    """Bring a store up to date with routing after it was added or moved to other groups.

    Broadcast types reach a new store through its cursor (which starts at 0);
    group- and column-routed documents were routed to the stores that existed
    then, so they are queued here: those now routed to ``peer`` that it was
    never sent, and deletes for those it was sent and no longer gets.
    """
    if node.cfg.role != "ho" or node.cfg.peer(peer).role != "store":
        return Queued(peer)
    names = [n for n in node.catalog.names if node.catalog.get(n).owner == node.cfg.role
             and node.catalog.get(n).route.kind in ("group", "column")]
    return requeue(node, peer, names, everything=False)


def requeue(node: Node, peer: str, doc_types: Sequence[str], *, everything: bool) -> Queued:
    """Queue ``doc_types`` for ``peer`` as routing stands now, and deletes for what no longer routes there.

    ``everything``: every routed document again (a reload); otherwise only those
    not sent to ``peer`` before. All under one new version from the clock, so
    nothing the store holds is newer.
    """
    node.cfg.peer(peer)
    peers = peer_infos(node)
    upserts = deletes = 0
    with node.engine.begin() as conn:
        begin_write(conn)
        version = clock.next_version(conn)  # newer than anything sent before, on every route
        for doc_type in doc_types:
            dt = node.catalog.get(doc_type)
            if dt.owner != node.cfg.role:
                raise ConfigError(f"{doc_type} is owned by the {dt.owner} side; this node cannot send it")
            keys = _routed_keys(conn, node, dt, peer, peers, version)
            held = _held(conn, peer, doc_type)
            send = keys if everything else [k for k in keys if k not in held]
            gone = sorted(held - set(keys) - setaside.keys_of(conn, doc_type))  # set aside: not gone
            _replace_deliveries(conn, [(peer, doc_type, k, "U", version) for k in send]
                                + [(peer, doc_type, k, "D", version) for k in gone])
            upserts, deletes = upserts + len(send), deletes + len(gone)
    return Queued(peer, upserts, deletes)


def _routed_keys(conn: Connection, node: Node, dt: DocType, peer: str, peers: list[PeerInfo],
                 version: int) -> list[str]:
    """The keys of the current documents of ``dt`` that routing sends ``peer`` (those whose route
    cannot be read are set aside, as in routing)."""
    catalog = node.catalog
    table = catalog.table(dt.header)
    keys = [rows.canonical_key(r) for r in conn.execute(select(*[table.c[c] for c in dt.key]))]
    if dt.route.kind in ("group", "column"):
        try:
            headers = _header_rows(conn, catalog, dt, keys)
        except rows.ENCODE_ERRORS as exc:
            keys = _set_aside_in_routing(conn, node, catalog, setaside.EncodeFailed(dt.name, keys, str(exc)),
                                         {(dt.name, k): version for k in keys})
            headers = _header_rows(conn, catalog, dt, keys)
        keys = [k for k in keys if peer in dt.route.targets(headers[k], peers)]
    return keys


def _held(conn: Connection, peer: str, doc_type: str) -> set[str]:
    """Documents of ``doc_type`` last sent (or queued) to ``peer`` as an upsert: the store holds them."""
    d = xchg_delivery.c
    return {str(k) for k in conn.execute(select(d.doc_key).where(and_(
        d.peer == peer, d.doc_type == doc_type, d.op == "U"))).scalars()}
