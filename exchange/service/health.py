"""This node's heartbeats: its own health towards each peer, written to the outbox on each sync.

A heartbeat is due for a peer when the last one pushed to it (kept as
``archive/sent/<me>.<peer>.heartbeat``, replaced each time) is older than
``[health] heartbeat_every`` seconds (default 60; 0: every sync). The check is
one ``stat`` per peer, so a no-op sync stays cheap; the service syncs every
``sync_interval`` (900 s by default) and so sends one on every cycle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from exchange.files import write_file_atomic
from exchange.node.home import Node
from exchange.wire.formats import HEALTH_FIELDS, heartbeat_name

log = logging.getLogger(__name__)

DEFAULT_EVERY = 60


def heartbeat_every(node: Node) -> int:
    """``[health] heartbeat_every`` in seconds (0: every sync)."""
    section = node.cfg.extra.get("health", {})
    value = section.get("heartbeat_every", DEFAULT_EVERY) if isinstance(section, dict) else DEFAULT_EVERY
    return max(0, int(value))


def due(node: Node, peers: Iterable[str]) -> list[str]:
    """The peers a heartbeat is due for: the one waiting in the outbox, or else the last pushed, is old enough."""
    every = heartbeat_every(node)
    now = time.time()
    out = []
    for peer in peers:
        name = heartbeat_name(node.id, peer)
        age = float("inf")
        for where in (node.cfg.outbox, node.cfg.archive_sent):  # one waiting to go, or the last pushed
            try:
                age = min(age, now - (where / name).stat().st_mtime)
            except OSError:
                pass
        if age >= every:  # a newer one replaces one still waiting: the peer learns the latest health
            out.append(peer)
    return out


def local_health(node: Node, peer: str) -> dict[str, int]:
    """This node's health towards ``peer``: its stream from the peer (WAITING, HELD, FAILED),
    documents of the peer parked here, files claiming the peer quarantined here, and
    bundles to the peer not acknowledged yet."""
    from sqlalchemy import func, select

    from exchange.database.tables import xchg_parked, xchg_received, xchg_sent
    from exchange.service.status import quarantined
    from exchange.vocabulary import ReceivedStatus, SentStatus

    out = dict.fromkeys(HEALTH_FIELDS, 0)
    r = xchg_received
    with node.engine.connect() as conn:
        for status, n in conn.execute(select(r.c.status, func.count()).where(r.c.peer == peer)
                                      .group_by(r.c.status)):
            key = {ReceivedStatus.WAITING: "waiting", ReceivedStatus.HELD: "held",
                   ReceivedStatus.FAILED: "failed"}.get(status)
            if key:
                out[key] += int(n)
        out["parked"] = int(conn.execute(select(func.count()).select_from(xchg_parked)
                                         .where(xchg_parked.c.peer == peer)).scalar() or 0)
        out["unacked"] = int(conn.execute(select(func.count()).select_from(xchg_sent).where(
            xchg_sent.c.peer == peer, xchg_sent.c.status.in_((SentStatus.EXPORTED, SentStatus.UPLOADED))))
            .scalar() or 0)
    out["quarantined"] = sum(1 for q in quarantined(node) if q.peer == peer)
    return out


def write_heartbeats(node: Node, peers: Iterable[str]) -> list[str]:
    """Seal a heartbeat for each of ``peers`` that is due, into the outbox; returns their names.

    A failure (a broken database, a full disk) is logged, never raised: a heartbeat
    must not stop a sync that has real work to do.
    """
    todo = due(node, [p for p in peers if p in node.cfg.peers])
    if not todo:
        return []  # the common case of a no-op sync: nothing heavy is imported
    from sqlalchemy.exc import SQLAlchemyError

    from exchange.errors import ExchangeError
    from exchange.wire.heartbeat import build_heartbeat

    written = []
    for peer in todo:
        name = heartbeat_name(node.id, peer)
        try:
            data = build_heartbeat(key=node.signing_key, node=node.id, peer=peer,
                                   health=local_health(node, peer), recipients=node.recipients_for(peer))
            write_file_atomic(node.cfg.outbox / name, data)
        except (ExchangeError, OSError, SQLAlchemyError) as exc:  # see the docstring
            log.warning("heartbeat to %s not written: %s", peer, exc)
            continue
        written.append(name)
    return written
