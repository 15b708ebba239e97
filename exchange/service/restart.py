"""``exchange peer restart``: re-base both streams with a store that went back in time (at the HO).

A store restored from a backup, or re-made with new keys and an empty database after its disk died,
and its HO disagree about both streams: the HO holds bundles of the store's the store no longer
knows, and the store waits for bundles the HO archived as processed. One command at the HO repairs
both, in one transaction with the restart bundle it seals (docs/FORMAT.md section 4.2):

- the restart bundle: the next seq of the HO's stream to the store, ``prev`` null, the signed restart
  record (how far the HO applied the store's stream, the versions it applied, the last manifests);
- a full reload of everything that routes to the store, and every delete it was ever sent, in the
  bundles after it (newer versions than anything the store holds);
- the HO's bundles the store never acknowledged: ABANDONED, superseded by the restart;
- the store's bundles the HO holds beyond its position (WAITING, HELD, FAILED: sealed before it went
  back): out of the stream, their files quarantined;
- the operators' journal (``peer restart``), and ``xchg_restart`` (kind ``sent``) until the store answers.

The store applies the record when it arrives (:mod:`exchange.receive.restart`) and sends again, after
the HO's position, whatever of its own the HO does not hold.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from exchange.database import journal
from exchange.errors import ConfigError
from exchange.files import free_name, move_entry, utc_now
from exchange.node.home import Node
from exchange.progress import NullReporter, Reporter
from exchange.receive import restart as received
from exchange.receive.setaside import quarantine
from exchange.send import restart as sending
from exchange.send.restart import RestartHook
from exchange.wire.formats import MAX_SEQ

log = logging.getLogger(__name__)


@dataclass
class Restarted:
    """What ``exchange peer restart`` did."""

    peer: str
    seq: int = 0
    file: str = ""
    received_seq: int = 0  # the store's stream continues after this seq
    version_high: int = 0
    upserts: int = 0
    deletes: int = 0
    superseded: list[int] = field(default_factory=list)  # the HO's bundles it never acknowledged
    forked: list[int] = field(default_factory=list)  # the store's bundles beyond the HO's position
    above: int = 0  # this HO went back: the store had applied its stream up to this seq

    def as_json(self) -> dict[str, Any]:
        return {"version": 1, "peer": self.peer, "seq": self.seq, "file": self.file,
                "received_seq": self.received_seq, "version_high": self.version_high, "upserts": self.upserts,
                "deletes": self.deletes, "superseded": self.superseded, "forked": self.forked,
                **({"above": self.above} if self.above else {})}


def restart_store(node: Node, peer: str, reason: str, reporter: Reporter | None = None, above: int = 0) -> Restarted:
    """Seal the restart to ``peer`` with the reload and the bookkeeping above (the caller holds the work lock).

    ``above``: this HO was restored from its own backup, and the store had applied its stream up to that
    seq (the store's doctor names it): the restart's seq goes above it, and its record says so, so the store
    forgets the versions of the HO's documents the lost days gave it (docs/OPERATIONS.md, "The HO restored
    from a backup")."""
    if node.cfg.role != "ho":
        raise ConfigError("`exchange peer restart` runs at the HO",
                          hint=f"At a store, ask the HO's operator to run `exchange peer restart --peer {node.id} "
                               "--reason TEXT` (docs/OPERATIONS.md).")
    p = node.cfg.peer(peer)
    if p.role != "store":
        raise ConfigError(f"{peer} is not a store of this HO: only a store's streams are restarted")
    if not 0 <= above < MAX_SEQ:
        raise ConfigError(f"--above {above}: a seq 0 .. {MAX_SEQ - 1}",
                          hint=f"Give the seq {peer}'s `exchange doctor` names (docs/OPERATIONS.md, \"The HO "
                               "restored from a backup\").")
    if not p.exchanging:
        raise ConfigError(f"{peer} is not exchanging (paused or removed): nothing would reach it",
                          hint=f"Resume it first: `exchange peer resume --peer {peer}` (or add it again with "
                               "`exchange peer add ... --replace` after a disk died).")
    by, at = journal.actor(), utc_now().replace(microsecond=0)
    rep = reporter or NullReporter()
    done = Restarted(peer, above=above)
    holder: dict[str, Any] = {}

    def record(conn: Connection, seq: int) -> dict[str, Any]:
        rec = received.restart_record(conn, peer, by, reason, at, above)
        holder["rec"] = rec
        return rec.as_json()

    def commit(conn: Connection, seq: int, manifest: str) -> None:
        rec = holder["rec"]
        note = f"superseded by the stream restart at seq {seq} (`exchange peer restart`)"
        holder["superseded"] = sending.supersede_unacknowledged(conn, peer, seq, note)
        done.upserts, done.deletes = sending.requeue_everything(conn, node, peer, own_edits=not above)
        holder["forked"] = received.forked_received(conn, peer, rec)
        for q, name in holder["forked"]:  # before the commit: left in the inbox they would wait again
            src = node.cfg.inbox / name
            if os.path.lexists(src):
                quarantine(node, src, f"seq {q} of {peer} was sealed before it went back in time and never "
                                      f"applied: superseded by the stream restart at seq {seq}", rep)
        done.superseded = [q for q, _f in holder["superseded"]]
        done.forked = sorted(q for q, _f in holder["forked"])
        done.received_seq, done.version_high = rec.received_seq, rec.version_high
        detail = {"manifest_sha256": manifest, "upserts": done.upserts, "deletes": done.deletes,
                  "superseded": done.superseded, "forked": done.forked}
        if above:  # this HO went back (exchange.receive.conflicts reads it: bases from the days it lost)
            detail["above"] = above
        received.record_sent(conn, peer, seq, rec, detail)
        journal.record(conn, "peer restart", peer, reason=reason, seq=seq, received_seq=rec.received_seq,
                       version_high=rec.version_high, **{k: v for k, v in detail.items() if k != "manifest_sha256"})

    done.seq, done.file = sending.seal_restart(node, peer, RestartHook(record, commit, above), rep)
    for _q, name in holder.get("superseded", []):  # sealed, never acknowledged: kept in the archive, not sent
        src = node.cfg.outbox / name
        if os.path.lexists(src):
            node.cfg.archive_sent.mkdir(parents=True, exist_ok=True)
            move_entry(src, free_name(node.cfg.archive_sent, name))
    log.info("stream restart to %s at seq %d: its stream continues after seq %d; %d documents and %d deletes "
             "queued", peer, done.seq, done.received_seq, done.upserts, done.deletes,
             extra={"peer": peer, "seq": done.seq})
    return done
