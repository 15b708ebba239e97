"""The sending side of a stream restart (docs/OPERATIONS.md, "A store restored from a backup").

At the HO, the restart bundle: the next seq of its stream to the store, ``prev`` null, the restart
record in its summary (:mod:`exchange.wire.restart`), sealed in one transaction with the full reload
of what routes to the store and the end of the HO's bundles the store never acknowledged.

At a store after it applied a restart, its restored point (``restart_base``) in the summary of the
bundles it sends the HO, until one of them is acknowledged: the HO learns from it which versions of
the store's documents came from the days the store lost (:func:`exchange.receive.restart.keep_lost`).

A restart re-bases every lane: the restart bundle travels in the default lane, and the HO's bundles
the store never acknowledged are ended in every lane (docs/CATALOG.md "Lanes").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, desc, func, or_, select, update

from exchange.database import conflicts as conflict_log
from exchange.database.tables import xchg_broadcast, xchg_delivery, xchg_restart, xchg_sent
from exchange.files import utc_now
from exchange.node.home import Node
from exchange.progress import NullReporter, Reporter
from exchange.send import clock, setaside
from exchange.vocabulary import DEFAULT_LANE, SentStatus
from exchange.wire.restart import BASE_FIELD, RESTART_FIELD

APPLIED = "applied"  # exchange.receive.restart.APPLIED (send/ may not import receive/)


@dataclass(frozen=True)
class RestartHook:
    """What the restart adds to a sealing transaction: the record for the summary (given the seq), and the
    bookkeeping run in the same transaction once the bundle is sealed (given seq and manifest SHA-256)."""

    record: Callable[[Connection, int], dict[str, Any]]
    commit: Callable[[Connection, int, str], None]
    above: int = 0  # the HO went back in time: the restart's seq goes above this (what the store applied)


def summary_fields(conn: Connection, node: Node, peer: str, restart: RestartHook | None, seq: int) -> dict[str, Any]:
    """The summary fields a bundle to ``peer`` carries for a restart: the record itself, or a store's
    restored point while none of its bundles after the restart is acknowledged."""
    if restart is not None:
        return {RESTART_FIELD: restart.record(conn, seq)}
    if node.cfg.role != "store":
        return {}
    r = xchg_restart.c
    row = conn.execute(select(r.id, r.detail).where(and_(r.peer == peer, r.kind == APPLIED, r.resolved_at.is_(None)))
                       .order_by(desc(r.id)).limit(1)).first()
    if row is None:
        return {}
    detail = json.loads(row[1])
    start = {lane: int(m["out_from"]) for lane, m in detail.get("lanes", {}).items()}
    start.setdefault(DEFAULT_LANE, int(detail["received_seq"]))
    s = xchg_sent.c
    tops = conn.execute(select(s.lane, func.max(s.seq)).where(and_(s.peer == peer, s.status == SentStatus.PROCESSED))
                        .group_by(s.lane)).all()
    if any(int(top) > start.get(str(lane), 0) for lane, top in tops):  # the HO has it: no need to carry it further
        conn.execute(update(xchg_restart).where(r.id == row[0]).values(resolved_at=utc_now()))
        return {}
    return {BASE_FIELD: detail["base"]}


def seal_restart(node: Node, peer: str, hook: RestartHook, reporter: Reporter | None = None) -> tuple[int, str]:
    """Seal the restart bundle to ``peer`` (no documents; the reload follows in the next bundles)."""
    from exchange.send.export import _seal_batch  # (export imports this module)

    exp = _seal_batch(node, peer, [], reporter or NullReporter(), restart=hook)
    return exp.seq, exp.file


def supersede_unacknowledged(conn: Connection, peer: str, before: int, note: str) -> list[tuple[int, str]]:
    """The HO's bundles to ``peer`` not acknowledged (or REJECTED), below the restart ``before`` in the default
    lane and all of them in the other lanes: ABANDONED, superseded by it (the reload sends their documents
    again). Returns (seq, file) of each, to move out of the outbox."""
    s = xchg_sent.c
    cond = and_(s.peer == peer, or_(s.lane != DEFAULT_LANE, s.seq < before),
                s.status.in_((SentStatus.EXPORTED, SentStatus.UPLOADED, SentStatus.REJECTED)))
    found = [(int(q), str(f)) for q, f in conn.execute(select(s.seq, s.file_name).where(cond))]
    conn.execute(update(xchg_sent).where(cond).values(status=SentStatus.ABANDONED, processed_at=utc_now(),
                                                      reason=note))
    return found


def requeue_everything(conn: Connection, node: Node, peer: str, own_edits: bool = True) -> tuple[int, int]:
    """A full reload of every document type this node sends, routed as routing stands now, under one new
    version; every delete it ever sent the store again (a restored store may hold what the lost days
    deleted); and (``own_edits``) the HO's own changes of the store's both-sides documents (a customer's new
    phone), which a restored store lost as well. Returns (upserts, deletes) queued."""
    from exchange.send.export import _held, _replace_deliveries, _routed_keys, peer_infos  # (cycle)

    peers = peer_infos(node)
    version = clock.next_version(conn)  # newer than anything sent before, on every route
    upserts = deletes = 0
    for dt in node.catalog.owned_by(node.cfg.role):
        keys = _routed_keys(conn, node, dt, peer, peers, version)
        held = _held(conn, peer, dt.name)
        gone = held - set(keys) - setaside.keys_of(conn, dt.name)
        d = xchg_delivery.c
        gone |= {str(k) for k in conn.execute(select(d.doc_key).where(and_(
            d.peer == peer, d.doc_type == dt.name, d.op == "D"))).scalars()}
        if dt.route.kind == "all":
            b = xchg_broadcast.c
            gone |= {str(k) for k in conn.execute(select(b.doc_key).where(and_(
                b.doc_type == dt.name, b.op == "D"))).scalars()}
        gone -= set(keys)
        _replace_deliveries(conn, [(peer, dt.name, k, "U", version) for k in keys]
                            + [(peer, dt.name, k, "D", version) for k in sorted(gone)])
        upserts, deletes = upserts + len(keys), deletes + len(gone)
    # the HO's own changes of the store's documents (a customer): the store lost them too (``own_edits``; not
    # when the HO itself went back: the store holds them, and newer ones the HO lost)
    if node.cfg.role == "ho" and own_edits:
        for dt in (d for d in node.catalog if d.both_sides):
            d = xchg_delivery.c
            mine = sorted({str(k) for k in conn.execute(select(d.doc_key).where(and_(
                d.peer == peer, d.doc_type == dt.name, d.op == "U"))).scalars()})
            if mine:
                _replace_deliveries(conn, [(peer, dt.name, k, "U", version) for k in mine])
                conflict_log.note_sent(conn, dt.name, {k: version for k in mine})  # a change made now, of that version
                upserts += len(mine)
    return upserts, deletes
