"""A peer's heartbeat in the inbox -> ``xchg_heartbeat`` (its newest only).

A heartbeat proves the peer was alive at its signed ``created`` time and what it
said about its own health; it never touches a stream. One older than the
one kept (its signed ``created``), or the very file kept, is a replay or a late
copy: dropped. One that
fails verification, or whose clock is more than an hour ahead of ours (it
would hide every later heartbeat), is quarantined with its reason.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from exchange.timefmt import aware
from exchange.database.conflicts import row_digests
from exchange.database.rows import canonical_key
from exchange.database.tables import begin_write, xchg_heartbeat
from exchange.errors import BundleError, FormatError
from exchange.files import move_entry, utc_now
from exchange.node.home import Node
from exchange.progress import Reporter
from exchange.receive.setaside import quarantine
from exchange.vocabulary import Outcome
from exchange.wire.formats import MAX_CLOCK_AHEAD, parse_name
from exchange.wire.heartbeat import ForeignEdit, read_heartbeat

log = logging.getLogger(__name__)


def import_heartbeat(node: Node, path: Path, rep: Reporter) -> tuple[Outcome | None, str]:
    """Record (or drop, or quarantine) one heartbeat; returns (QUARANTINED or None, why)."""
    now = utc_now()
    try:
        fn = parse_name(path.name)
        hb = read_heartbeat(path, node.trust, me=node.id, identities=node.identities)
        if (fn.a, fn.b) != (hb.node, hb.peer):
            raise FormatError(f"{path.name}: file name disagrees with the signed heartbeat")
        if hb.created > now + timedelta(seconds=MAX_CLOCK_AHEAD):
            raise FormatError(f"{path.name}: created {hb.created:%Y-%m-%d %H:%M:%S} UTC is ahead of this node's "
                              f"clock by more than {MAX_CLOCK_AHEAD} s (fix the clock at {hb.node})")
    except BundleError as exc:
        quarantine(node, path, exc, rep)
        return Outcome.QUARANTINED, str(exc)
    with node.engine.begin() as conn:
        begin_write(conn)
        kept = conn.execute(select(xchg_heartbeat.c.created, xchg_heartbeat.c.file).where(
            xchg_heartbeat.c.peer == hb.node)).first()
        # older, or the very file kept (a copy): dropped; another one of the same second replaces it
        stale = kept is not None and (aware(kept[0]) > hb.created
                                      or (aware(kept[0]) == hb.created and bytes(kept[1]) == hb.file))
        if not stale:
            shown: dict[str, Any] = dict(hb.health)
            if hb.foreign:
                shown["foreign"] = [_compared(conn, node, f) for f in hb.foreign]
            values = dict(created=hb.created, received_at=now, app_version=hb.app_version,
                          health=json.dumps(shown, sort_keys=True), file=hb.file)
            if kept is None:
                conn.execute(xchg_heartbeat.insert().values(peer=hb.node, **values))
            else:
                conn.execute(xchg_heartbeat.update().where(xchg_heartbeat.c.peer == hb.node).values(**values))
    if stale:
        os.unlink(path)
        log.info("%s: not newer than the heartbeat kept from %s: dropped", path.name, hb.node)
        return None, "stale"
    node.cfg.archive_received.mkdir(parents=True, exist_ok=True)
    move_entry(path, node.cfg.archive_received / path.name)  # the newest replaces the one before
    log.info("heartbeat from %s (%s): %s", hb.node, hb.app_version, hb.health)
    return None, ""


def _compared(conn: Connection, node: Node, f: ForeignEdit) -> dict[str, Any]:
    """A change the peer made to a document this node owns, as status and the page show it: its type,
    key and time, and the columns that differ from this node's row (``columns`` None: not comparable,
    a type or key this node does not know; ``missing``: no such document here)."""
    out: dict[str, Any] = {"doc_type": f.doc_type, "key": list(f.key),
                           "at": f.at.isoformat() if f.at else None, "columns": None, "missing": False}
    if f.doc_type not in node.catalog.names or len(f.key) != len(node.catalog.get(f.doc_type).key):
        return out
    try:
        ours = row_digests(conn, node.catalog, f.doc_type, canonical_key(f.key))
    except ValueError:  # a key part not of its column's type (an integer): no document of ours
        ours = None
    if ours is None:
        out["missing"] = True
        return out
    out["columns"] = sorted(c for c, d in f.columns.items() if c in ours and ours[c] != d)
    return out
