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

from sqlalchemy import select

from exchange.timefmt import aware
from exchange.database.tables import begin_write, xchg_heartbeat
from exchange.errors import BundleError, FormatError
from exchange.files import move_entry, utc_now
from exchange.node.home import Node
from exchange.progress import Reporter
from exchange.receive.setaside import quarantine
from exchange.vocabulary import Outcome
from exchange.wire.formats import MAX_CLOCK_AHEAD, parse_name
from exchange.wire.heartbeat import read_heartbeat

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
            values = dict(created=hb.created, received_at=now, app_version=hb.app_version,
                          health=json.dumps(hb.health, sort_keys=True), file=hb.file)
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
