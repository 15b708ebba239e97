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

from collections import defaultdict
from dataclasses import dataclass, field
import json

from sqlalchemy import Connection, and_, select

from exchange.database import rows
from exchange.database.tables import begin_write, xchg_delivery, xchg_event, xchg_sent
from exchange.errors import StreamError
from exchange.node.home import Node
from exchange.send import clock, streams
from exchange.send.export import _replace_deliveries
from exchange.vocabulary import SentStatus


@dataclass(frozen=True)
class Resent:
    """What :func:`resend_bundle` queued."""

    peer: str
    seq: int
    upserts: int = 0
    deletes: int = 0
    reload_types: list[str] = field(default_factory=list)  # broadcast types it may have carried


def _current_ops(conn: Connection, node: Node, doc_type: str, keys: list[str]) -> list[tuple[str, str]]:
    """(key, 'U' if the document exists now else 'D') for ``keys``."""
    dt = node.catalog.get(doc_type)
    present: set[str] = set()
    for i in range(0, len(keys), rows.CHUNK):
        data = rows.read_docs(conn, node.catalog.table(dt.header), dt.key, keys[i:i + rows.CHUNK])
        present.update(rows.row_keys(data, dt.key))
    return [(k, "U" if k in present else "D") for k in keys]


def resend_bundle(node: Node, peer: str, seq: int) -> Resent:
    """Queue the documents of REJECTED bundle ``seq`` to ``peer`` again (see the module docstring)."""
    node.cfg.peer(peer)
    with node.engine.begin() as conn:
        begin_write(conn)
        sent = conn.execute(select(xchg_sent.c.status, xchg_sent.c.summary).where(and_(
            xchg_sent.c.peer == peer, xchg_sent.c.seq == seq))).first()
        if sent is None or sent[0] != SentStatus.REJECTED:
            state = "never sent" if sent is None else str(sent[0])
            raise StreamError(f"bundle {seq} to {peer} is {state}: only a REJECTED bundle is resent",
                              hint="See `exchange status sent`.")
        by_type: dict[str, list[str]] = defaultdict(list)
        if streams.direct_peer(node) == peer:  # a store: its log names what bundle seq carried
            for t, k in conn.execute(select(xchg_event.c.doc_type, xchg_event.c.doc_key).where(
                    xchg_event.c.seq == seq).distinct()):
                by_type[str(t)].append(str(k))
        else:
            d = xchg_delivery.c
            for t, k in conn.execute(select(d.doc_type, d.doc_key).where(and_(d.peer == peer, d.seq == seq))):
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
    return Resent(peer, seq, ups, dels, reload_types)
