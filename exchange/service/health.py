"""This node's heartbeats: its own health towards each peer, written to the outbox on each sync.

A heartbeat is due for a peer when the last one pushed to it (kept as
``archive/sent/<me>.<peer>.heartbeat``, replaced each time) is older than
``[health] heartbeat_every`` seconds (default 60; 0: every sync). The check is
one ``stat`` per peer, so a no-op sync stays cheap; the service syncs every
``sync_interval`` (900 s by default) and so sends one on every cycle.

The version written is the newest the peer reads, judged from the app version
its own newest heartbeat signed (``xchg_heartbeat``): version 2, with this node's
conflicts with the peer, once the peer is known to read it; version 1 before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from exchange.files import write_file_atomic
from exchange.node.home import Node
from exchange.wire.formats import (
    FOREIGN_NAME_RE, HEALTH_FIELDS, MAX_FOREIGN, MAX_FOREIGN_COLUMNS, MAX_FOREIGN_KEY_CHARS, MAX_FOREIGN_KEY_PARTS,
    heartbeat_name,
)

if TYPE_CHECKING:
    from exchange.database.conflicts import Foreign
    from exchange.wire.heartbeat import ForeignEdit

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


def local_health(node: Node, peer: str, conflicts: Mapping[str, int] | None = None) -> dict[str, int]:
    """This node's health towards ``peer``: its stream from the peer (WAITING, HELD, FAILED),
    documents of the peer parked here, files claiming the peer quarantined here,
    bundles to the peer not acknowledged yet, and its conflicts with the peer (version 2:
    ``conflicts``, this peer's of :func:`exchange.database.conflicts.peer_counts`; read here when None)."""
    from sqlalchemy import func, select

    from exchange.database.conflicts import peer_counts
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
        if conflicts is None:
            conflicts = peer_counts(conn).get(peer, {})
        out.update(conflicts)
    out["quarantined"] = sum(1 for q in quarantined(node) if q.peer == peer)
    return out


def peer_versions(node: Node) -> dict[str, str]:
    """The app version each peer signed into its newest heartbeat here (a peer never heard from: absent)."""
    from sqlalchemy import select

    from exchange.database.tables import xchg_heartbeat

    with node.engine.connect() as conn:
        h = xchg_heartbeat.c
        return {str(p): str(v) for p, v in conn.execute(select(h.peer, h.app_version))}


def foreign_named(node: Node, found: Sequence[Foreign]) -> list[ForeignEdit]:
    """This node's standing changes to documents a peer owns (``found``, newest first), each with a
    digest of each column as it stands here (at most MAX_FOREIGN; columns a heartbeat cannot name are
    left out)."""
    from exchange.database.conflicts import row_digests
    from exchange.database.rows import parse_key
    from exchange.wire.heartbeat import ForeignEdit

    out: list[ForeignEdit] = []
    if not found:
        return out
    with node.engine.connect() as conn:
        for f in found[:MAX_FOREIGN]:
            key = tuple(parse_key(f.doc_key))
            if f.doc_type not in node.catalog.names or len(key) > MAX_FOREIGN_KEY_PARTS \
                    or any(len(k) > MAX_FOREIGN_KEY_CHARS for k in key):
                continue  # counted in foreign_edits, not named
            digests = row_digests(conn, node.catalog, f.doc_type, f.doc_key) or {}
            columns = {c: d for c, d in digests.items() if FOREIGN_NAME_RE.fullmatch(c)}
            out.append(ForeignEdit(f.doc_type, key, f.at, dict(list(columns.items())[:MAX_FOREIGN_COLUMNS])))
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
    from exchange.wire.heartbeat import build_heartbeat, version_for

    written = []
    try:
        from exchange.database.conflicts import peer_counts, standing_foreign

        versions = peer_versions(node)
        with node.engine.connect() as conn:  # once for every peer: an HO's fan-out reads the log twice
            foreign = standing_foreign(conn)
            conflicts = peer_counts(conn, foreign)
    except SQLAlchemyError as exc:  # see the docstring: version 1, which every peer reads
        log.warning("peers' versions and conflicts not read: %s", exc)
        versions, conflicts, foreign = {}, {}, {}
    for peer in todo:
        name = heartbeat_name(node.id, peer)
        try:
            version = version_for(versions.get(peer))
            data = build_heartbeat(key=node.signing_key, node=node.id, peer=peer, version=version,
                                   health=local_health(node, peer, conflicts.get(peer, {})),
                                   recipients=node.recipients_for(peer),
                                   foreign=foreign_named(node, foreign.get(peer, [])) if version >= 2 else ())
            write_file_atomic(node.cfg.outbox / name, data)
        except (ExchangeError, OSError, SQLAlchemyError) as exc:  # see the docstring
            log.warning("heartbeat to %s not written: %s", peer, exc)
            continue
        written.append(name)
    return written
