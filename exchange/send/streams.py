"""A store's documents straight from its capture log to its one HO.

Every store-owned document goes to the HO, and a store has one. Routing those
documents through ``xchg_delivery`` wrote each of them three times (delivery
inserted PENDING, updated EXPORTED, event marked routed), and that bookkeeping
was most of a store's export time. So on a store with one HO peer the unrouted
events *are* the queue:

- a batch is the next unrouted events in id order, coalesced per document (the
  latest event gives the op and the version);
- the bundle's own transaction marks those events routed and records the
  bundle's seq on them (``xchg_event.seq``), so which bundle carried a document
  stays answerable, and its status is that bundle's (:func:`document_states`);
- events are selected by the ``routed`` flag, never by a cursor over ids: on
  PostgreSQL an event can commit after one with a higher id, and it is simply in
  a later batch.

A store with no HO peer or with several keeps routing into deliveries, as the
HO does for the documents it sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection

from exchange.database import lanes, rows
from exchange.node.home import Node
from exchange.vocabulary import DEFAULT_LANE, DocStatus

log = logging.getLogger(__name__)

Doc = tuple[str, str, str, int]  # (doc_type, canonical doc_key, op, version)


def direct_peer(node: Node) -> str | None:
    """The peer that takes every document this node sends from its log, or None (route them)."""
    if node.cfg.role != "store":
        return None
    hos = [p.id for p in node.cfg.peers.values() if p.role == "ho"]
    return hos[0] if len(hos) == 1 else None


@dataclass(frozen=True)
class EventBatch:
    """The next unrouted events: the documents they name, and every event id to mark."""

    docs: list[Doc]
    ids: list[int]
    upserts: dict[str, list[str]] = field(default_factory=dict)  # keys of upserted documents, per type

    @property
    def last_id(self) -> int:
        return self.ids[-1]


#: The ids of the next unrouted events as one text ("1,2,3"): checking a batch read ahead costs
#: one row, not twenty thousand Python ints. A dialect without it compares the ids themselves.
_IDS_TEXT = {
    "sqlite": "SELECT group_concat(id) FROM (SELECT id FROM xchg_event WHERE routed = 0{lane} ORDER BY id LIMIT {n})",
    "postgresql": "SELECT string_agg(id::text, ',' ORDER BY id) FROM "
                  "(SELECT id FROM xchg_event WHERE routed = 0{lane} ORDER BY id LIMIT {n}) AS s",
}


def _still_next(conn: Connection, batch: EventBatch, limit: int, types: lanes.LaneTypes) -> bool:
    """Whether ``batch`` (read ahead) is still exactly the next ``limit`` unrouted events (of the lane)."""
    in_lane, params = lanes.sql_condition("doc_type", types)
    sql = _IDS_TEXT.get(conn.dialect.name)
    if sql is None:
        return [int(i) for (i,) in rows.fetch_tuples(
            conn, f"SELECT id FROM xchg_event WHERE routed = 0{in_lane} ORDER BY id LIMIT {int(limit)}", params)
        ] == batch.ids
    got = rows.fetch_tuples(conn, sql.format(n=int(limit), lane=in_lane), params)
    return bool(got) and got[0][0] == ",".join(map(str, batch.ids))


def pending(conn: Connection, node: Node, limit: int, after: int | None = None,
            known: EventBatch | None = None, types: lanes.LaneTypes | None = None) -> EventBatch:
    """Up to ``limit`` unrouted events (of the lane's ``types``) in id order (after id ``after`` if given),
    coalesced.

    One entry per document, at its latest event, in the order of its first.
    ``known``: a batch read ahead earlier; it is returned as it is if the same
    events are still the next ones (checked on ids alone, from the index).
    Events of a type this node does not own are listed in ``ids`` only: they are
    marked routed and never sent, as routing does with them.
    """
    types = types or lanes.LaneTypes()
    if known is not None and after is None and known.ids and _still_next(conn, known, limit, types):
        return known
    in_lane, lane_params = lanes.sql_condition("doc_type", types)
    sql = ("SELECT id, doc_type, doc_key, op FROM xchg_event WHERE routed = 0" + in_lane
           + (" AND id > ?" if after is not None else "") + f" ORDER BY id LIMIT {int(limit)}")
    events = rows.fetch_tuples(conn, sql, lane_params + (() if after is None else (after,)))
    latest: dict[tuple[str, str], Doc] = {}
    canon, plain, catalog = rows.canonicalize, rows.is_canonical, node.catalog
    owned = {d.name: d.name for d in catalog.owned_by(node.cfg.role)}.get  # the catalog's own str objects
    ops = {"U": "U", "D": "D"}
    foreign = 0
    for eid, doc_type, doc_key, op in events:  # one pass: measured faster than set-based checks in C
        name = owned(doc_type)
        if name is None:
            catalog.get(doc_type)  # an unknown type is a configuration error, as in routing
            foreign += 1
            continue
        # a later event of the same document updates its entry in place: the latest op and version win
        key = doc_key if plain(doc_key) else canon(doc_key)
        latest[(name, key)] = (name, key, ops[op], eid)
    if foreign:
        log.warning("ignoring %d events of document types owned by the other side", foreign)
    docs: list[Doc] = list(latest.values())  # (ids are ints from both drivers)
    upserts: dict[str, list[str]] = {n: [] for n in catalog.names if owned(n)}  # in catalog order
    for t, k, op, _v in docs:
        if op == "U":
            upserts[t].append(k)
    return EventBatch(docs, [int(e[0]) for e in events], {t: ks for t, ks in upserts.items() if ks})


def mark_sealed(conn: Connection, seq: int | None, ids: Sequence[int],
                late: Sequence[tuple[int, int]] = ()) -> None:
    """The batch's events are routed, carried by bundle ``seq`` (None: not sent at all).

    ``late``: (event id, version sent) of documents whose latest event committed
    late and went at a version above its id (:func:`exchange.send.clock.stamp`).
    """
    rows.executemany(conn, "UPDATE xchg_event SET routed = 1, seq = ? WHERE id BETWEEN ? AND ?",
                     [(seq, lo, hi) for lo, hi in _runs(ids)])
    if late:
        rows.executemany(conn, "UPDATE xchg_event SET version = ? WHERE id = ?", [(v, eid) for eid, v in late])


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ids as runs of consecutive ones: a backlog is one run, and each run is exact."""
    if ids and ids[-1] - ids[0] == len(ids) - 1:  # ascending and distinct: consecutive, one run (a backlog)
        return [(ids[0], ids[-1])]
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def document_states(conn: Connection, peer: str, lane_of: Callable[[str], str] | None = None
                    ) -> dict[tuple[str, str], tuple[str, int, str, int | None]]:
    """(doc_type, doc_key) -> (op, version, status, seq) of documents sent from the log to ``peer``.

    A document's latest event decides: unrouted is PENDING; otherwise the status
    of the bundle that carried it (EXPORTED, UPLOADED, PROCESSED, REJECTED).
    Sent events are taken in the order of the versions they went at (an event
    that committed late went last, above its id), unrouted ones after them.
    """
    sql = ("SELECT e.doc_type, e.doc_key, e.op, COALESCE(e.version, e.id), e.routed, e.seq "
           "FROM xchg_event e WHERE (e.routed = 0 OR e.seq IS NOT NULL)")
    # a seq is one lane's: the bundle that carried an event is the one of its type's lane
    sent = {(str(lane), int(seq)): str(status) for lane, seq, status in rows.fetch_tuples(
        conn, "SELECT lane, seq, status FROM xchg_sent WHERE peer = ?", (peer,))}
    lane = lane_of or (lambda _t: DEFAULT_LANE)
    out: dict[tuple[str, str], tuple[str, int, str, int | None]] = {}
    for t, k, op, version, routed, seq in rows.fetch_tuples(
            conn, sql + " ORDER BY e.routed DESC, COALESCE(e.version, e.id)", ()):
        status = sent.get((lane(str(t)), int(seq))) if seq is not None else None
        state = DocStatus.PENDING if not routed else str(status or DocStatus.EXPORTED)
        out[(str(t), rows.canonicalize(str(k)))] = (str(op), int(version), state, None if seq is None else int(seq))
    return out
