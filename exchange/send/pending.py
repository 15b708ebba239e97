"""Is there anything for a sync cycle to do? Decided without SQLAlchemy where it can be.

A cron-driven ``exchange sync`` at an idle store finds nothing to import,
export or push most of the time, and importing SQLAlchemy alone costs about as
much as the Arrow and crypto stack together. So the questions a cycle asks of
the database are plain SQL, one definition used twice:
:func:`exchange.service.sync.export_needed` runs them through a SQLAlchemy connection
(SQLite or PostgreSQL, errors wrapped as everywhere else), and :func:`idle`
runs them through the standard ``sqlite3`` module before SQLAlchemy is loaded.

:func:`idle` answers True only when it can show there is nothing to do; on
anything it cannot read (a PostgreSQL URL, an unusual SQLite URL, a missing
table, a locked or damaged file) it answers False and the full cycle runs,
reporting any error exactly as it did before this shortcut existed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from exchange.database.direct import connect_existing, plain_file
from exchange.files import utc_now
from exchange.node.keys import rotation_announcing
from exchange.wire.formats import PART_SUFFIX, is_exchange_file

if TYPE_CHECKING:
    from exchange.node.config import NodeConfig
    from exchange.node.home import Node


#: Runs one SELECT and returns all its rows (a ``sqlite3`` connection, or SQLAlchemy's ``exec_driver_sql``).
Query = Callable[[str], Sequence[Any]]


# Plain SQL with literals only: the same text runs on SQLite and PostgreSQL whatever
# the driver's parameter style. Column and status names are those of exchange.database.tables.
_UNROUTED_EVENT = "SELECT 1 FROM xchg_event WHERE routed = 0 LIMIT 1"
_PENDING_DELIVERY = "SELECT 1 FROM xchg_delivery WHERE status = 'PENDING' LIMIT 1"
_NEWEST_BROADCAST = "SELECT max(version) FROM xchg_broadcast"
_BROADCAST_CURSORS = "SELECT peer, bc_version FROM xchg_stream_out"
_UPLOADED_AT = "SELECT uploaded_at FROM xchg_sent WHERE status = 'UPLOADED'"


def export_work(query: Query, stores: Iterable[str], paused: Iterable[str] = ()) -> bool:
    """Events to route, deliveries to seal, or a broadcast some store's cursor has not reached.

    ``stores``: the stores exchanged with; ``paused``: peers whose documents wait (paused or removed),
    so their queue alone is no work. Node ids are ``[a-z0-9-]`` (checked on load): safe as literals.
    """
    waiting = sorted(paused)
    pending = _PENDING_DELIVERY if not waiting else _PENDING_DELIVERY.replace(
        " LIMIT 1", " AND peer NOT IN (" + ", ".join(f"'{p}'" for p in waiting) + ") LIMIT 1")
    if query(_UNROUTED_EVENT) or query(pending):
        return True
    newest = query(_NEWEST_BROADCAST)[0][0]
    if newest is None:
        return False
    cursors: dict[str, int] = {}  # a store's streams (one per lane): the one furthest behind
    for peer, version in query(_BROADCAST_CURSORS):
        cursors[peer] = min(cursors.get(peer, version), version)
    return any(cursors.get(s, -1) < newest for s in stores)


def resend_cutoff(cfg: NodeConfig) -> datetime:
    """Bundles uploaded before this and still without an ack are pushed again."""
    return utc_now() - timedelta(seconds=cfg.resend_after)


def resend_due(at: datetime | None, cutoff: datetime) -> bool:
    """The resend rule for one UPLOADED bundle (a naive time is the database's UTC)."""
    if at is None:
        return False
    return (at if at.tzinfo else at.replace(tzinfo=cutoff.tzinfo)) < cutoff


def _resend_work(query: Query, cutoff: datetime) -> bool:
    """Any UPLOADED bundle due again; a time that does not parse counts as due (the full cycle decides)."""
    for (value,) in query(_UPLOADED_AT):
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)  # how SQLAlchemy stores DateTime on SQLite
            except ValueError:
                return True
        if value is not None and not isinstance(value, datetime):
            return True
        if resend_due(value, cutoff):
            return True
    return False


def spool_work(cfg: NodeConfig) -> bool:
    """A file waiting in the inbox to import, or in the outbox to push or to recover (``.part``)."""
    if any(is_exchange_file(p.name) for p in cfg.inbox.iterdir()):
        return True
    return any(p.name.endswith(PART_SUFFIX) or is_exchange_file(p.name) for p in cfg.outbox.iterdir())


def _sqlite_work(path: str, stores: list[str], paused: list[str], cutoff: datetime) -> bool | None:
    """The database questions asked of a SQLite file directly; None when it cannot be read."""
    try:
        conn = connect_existing(path)  # a missing file is not created: the full cycle reports it
    except sqlite3.Error:
        return None
    try:
        with closing(conn):
            def query(sql: str) -> list[Any]:
                return conn.execute(sql).fetchall()

            return export_work(query, stores, paused) or _resend_work(query, cutoff)
    except sqlite3.Error:
        return None


def idle(node: Node) -> bool:
    """True only when a sync cycle provably has nothing to import, export or push.

    Call it under the work lock, after pulling. False means "run the full cycle",
    which also covers every case this function cannot decide (see the module doc).
    """
    cfg = node.cfg
    if spool_work(cfg) or rotation_announcing(cfg):  # a key notice to carry
        return False
    path = plain_file(cfg.database)
    if path is None:
        return False
    stores = [p.id for p in cfg.peers.values() if p.role == "store" and p.exchanging]
    paused = [p.id for p in cfg.peers.values() if not p.exchanging]
    return _sqlite_work(path, stores, paused, resend_cutoff(cfg)) is False
