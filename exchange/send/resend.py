"""``exchange resend --peer P --bundle N``: send the documents of a REJECTED bundle again, as they are now.

A bundle the receiver could not apply, and then skipped (or rejected), carried
documents the receiver never got. Once the cause is fixed (the receiver's
trigger, the document itself), the sender queues those documents again in
their current state; they travel in a new bundle under a new version, so
nothing newer at the receiver is overwritten:

- a store's own documents (sent from its capture log): new capture events;
- an HO's deliveries (group- and column-routed documents, reloads): the
  deliveries of that peer only, back to PENDING;
- documents routed to every store reach a store through a cursor that records no
  bundle, so they cannot be listed here: :class:`Resent` names the types to
  ``exchange reload`` instead.

A document deleted since is sent as a delete.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
import json

from sqlalchemy import Connection, and_, delete, select

from exchange.database import rows
from exchange.database.tables import begin_write, xchg_decision, xchg_delivery, xchg_event, xchg_sent
from exchange.errors import StreamError
from exchange.files import utc_now
from exchange.node.home import Node
from exchange.database import lanes
from exchange.send import clock, streams
from exchange.send.export import _replace_deliveries
from exchange.send.notices import NOTICE
from exchange.vocabulary import DEFAULT_LANE, SentStatus
from exchange.wire.decision import MAX_DECIDER_CHARS, Decision, check_text
from exchange.wire.formats import MAX_REASON_CHARS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resent:
    """What :func:`resend_bundle` queued."""

    peer: str
    seq: int
    upserts: int = 0
    deletes: int = 0
    reload_types: list[str] = field(default_factory=list)  # broadcast types it may have carried
    lane: str = DEFAULT_LANE


def _current_ops(conn: Connection, node: Node, doc_type: str, keys: list[str]) -> list[tuple[str, str]]:
    """(key, 'U' if the document exists now else 'D') for ``keys``."""
    dt = node.catalog.get(doc_type)
    present: set[str] = set()
    for i in range(0, len(keys), rows.CHUNK):
        data = rows.read_docs(conn, node.catalog.table(dt.header), dt.key, keys[i:i + rows.CHUNK])
        present.update(rows.row_keys(data, dt.key))
    return [(k, "U" if k in present else "D") for k in keys]


def resend_bundle(node: Node, peer: str, seq: int, lane: str = DEFAULT_LANE) -> Resent:
    """Queue the documents of REJECTED bundle ``seq`` to ``peer`` (in ``lane``) again (see the module docstring)."""
    with node.engine.begin() as conn:
        begin_write(conn)
        return _requeue(conn, node, peer, seq, lane)


def supersede_bundle(node: Node, peer: str, seq: int, *, reason: str, by: str, lane: str = DEFAULT_LANE) -> Resent:
    """Send the documents of REJECTED bundle ``seq`` again and announce that ``seq`` is superseded.

    The notice travels in every bundle sealed for ``peer`` until its ack with the decision
    returns (:mod:`exchange.send.notices`); the receiver then skips ``seq`` on its own.
    """
    decision = Decision("superseded", check_text(by, MAX_DECIDER_CHARS, "--by"),
                        utc_now().replace(microsecond=0), check_text(reason, MAX_REASON_CHARS, "--reason"))
    with node.engine.begin() as conn:
        begin_write(conn)
        d = xchg_decision.c
        if conn.execute(select(d.kind).where(and_(d.side == "sent", d.peer == peer, d.lane == lane,
                                                  d.seq == seq))).first():
            raise StreamError(f"bundle {seq}{_in(lane)} to {peer} was already ended by {peer}'s decision",
                              hint="See `exchange status sent`; `exchange resend` sends its documents again.")
        done = _requeue(conn, node, peer, seq, lane)
        if not done.upserts + done.deletes:
            raise StreamError(f"bundle {seq} to {peer} has no documents to send again: no new bundle "
                              "would carry the notice", hint=f"Ask {peer}'s operator to run `exchange bundle "
                              f"skip {node.id} {seq} --reason TEXT` (docs/OPERATIONS.md).")
        sent = conn.execute(select(xchg_sent.c.file_sha256, xchg_sent.c.manifest_sha256).where(and_(
            xchg_sent.c.peer == peer, xchg_sent.c.lane == lane, xchg_sent.c.seq == seq))).one()
        conn.execute(delete(xchg_decision).where(and_(d.side == NOTICE, d.peer == peer, d.lane == lane,
                                                      d.seq == seq)))
        conn.execute(xchg_decision.insert().values(
            side=NOTICE, peer=peer, lane=lane, seq=seq, kind=decision.kind, decided_by=decision.by,
            decided_at=decision.at, reason=decision.reason, file_sha256=sent[0], manifest_sha256=sent[1]))
    log.warning("decision: bundle %s to %s %s", seq, peer, decision.text(), extra={"peer": peer, "seq": seq})
    return done


def _in(lane: str) -> str:
    return "" if lane == DEFAULT_LANE else f" (lane {lane})"


def _requeue(conn: Connection, node: Node, peer: str, seq: int, lane: str = DEFAULT_LANE) -> Resent:
    """Queue the documents of REJECTED bundle ``seq`` of ``lane`` again, in ``conn``'s transaction."""
    node.cfg.peer(peer)
    sent = conn.execute(select(xchg_sent.c.status, xchg_sent.c.summary).where(and_(
        xchg_sent.c.peer == peer, xchg_sent.c.lane == lane, xchg_sent.c.seq == seq))).first()
    if sent is None or sent[0] != SentStatus.REJECTED:
        state = "never sent" if sent is None else str(sent[0])
        raise StreamError(f"bundle {seq}{_in(lane)} to {peer} is {state}: only a REJECTED bundle is resent",
                          hint="See `exchange status sent`.")
    by_type: dict[str, list[str]] = defaultdict(list)
    types = lanes.lane_types(node.catalog, lane)  # a seq is one lane's: its documents are of that lane's types
    if streams.direct_peer(node) == peer:  # a store: its log names what bundle seq carried
        for t, k in conn.execute(select(xchg_event.c.doc_type, xchg_event.c.doc_key).where(
                xchg_event.c.seq == seq).distinct()):
            if str(t) in types:
                by_type[str(t)].append(str(k))
    else:
        d = xchg_delivery.c
        for t, k in conn.execute(select(d.doc_type, d.doc_key).where(and_(d.peer == peer, d.seq == seq))):
            if str(t) in types:
                by_type[str(t)].append(str(k))
    ups = dels = 0
    queued: list[tuple[str, str, str, str, int]] = []
    version = clock.next_version(conn) if streams.direct_peer(node) != peer else 0
    for doc_type, keys in by_type.items():
        for k, op in _current_ops(conn, node, doc_type, sorted(keys)):
            ups, dels = ups + (op == "U"), dels + (op == "D")
            queued.append((peer, doc_type, k, op, version))
    if streams.direct_peer(node) == peer:
        if queued:
            conn.execute(xchg_event.insert(), [{"doc_type": t, "doc_key": k, "op": op}
                                               for _p, t, k, op, _v in queued])
    else:
        _replace_deliveries(conn, queued)
    summary = json.loads(sent[1] or "{}")
    documents = summary.get("documents", summary) if isinstance(summary, dict) else {}
    reload_types = sorted(t for t in documents if t in node.catalog
                          and node.catalog.get(t).route.kind == "all" and streams.direct_peer(node) != peer)
    return Resent(peer, seq, ups, dels, reload_types, lane)
