"""A peer that went back in time, and the receiving side of the restart that repairs it.

A store restored from a backup (``cp -a`` of its home, a database dump) or re-made after its disk
died has forgotten bundles both ways: the HO holds store bundles the store no longer knows it sent
(its next bundle reuses a seq: "already applied from a different file"), and the store waits for HO
bundles the HO archived long ago. Nothing in the two streams can resolve that; an operator's restart
does (``exchange peer restart``, :mod:`exchange.service.restart`).

This module holds what the receiving side does, and every read and write of the stream positions
for it. A peer has a stream each way in every lane (docs/CATALOG.md "Lanes"); the restart bundle
travels in the default lane and its record lists every other lane's positions, so a restart re-bases
every lane at once:

- detection: evidence that a peer's positions regressed or forked, kept in ``xchg_restart``
  (kind ``detected``) until a restart ends it; ``status``, ``doctor`` and the page name the command;
- a store applying the HO's restart record (:func:`apply_restart`), in the bundle's transaction;
- the HO reading a store's restored point (``restart_base``) and keeping both versions of a document
  the restored store made again under a key the lost days had already used (:func:`keep_lost`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection, and_, delete, desc, func, select, update

from exchange.database import conflicts as conflict_log
from exchange.database import lanes, rows
from exchange.database.capture import record_events
from exchange.database.catalog import DocType
from exchange.database.tables import (
    xchg_delivery, xchg_doc_version, xchg_event, xchg_meta, xchg_received, xchg_restart, xchg_sent,
    xchg_stream_in, xchg_stream_out,
)
from exchange.errors import FormatError
from exchange.files import free_name, is_regular_entry, move_entry, sha256_file, utc_now
from exchange.node.home import Node
from exchange.receive.position import lanes_of as received_lanes
from exchange.receive.position import set_stream_pos, stream_pos
from exchange.vocabulary import DEFAULT_LANE, ConflictStatus, DocStatus, ReceivedStatus, SentStatus
from exchange.wire.restart import (
    BASE_FIELD, RESTART_FIELD, Base, LanePos, Restart, parse_base, parse_restart,
)

log = logging.getLogger(__name__)

#: ``xchg_meta`` key of the version clock (exchange.send.clock.CLOCK_KEY; receive/ may not import send/).
CLOCK_KEY = "version_high"
#: Where a store keeps its own bundles the restart found forked (the HO never applied them): out of the
#: archive, whose streams they would fork, and never deleted.
FORKED_DIR = "forked"
#: ``xchg_conflict.policy`` of a document a restored store made again under a key already used.
RESTORED_POLICY = "restored"

DETECTED, SENT, APPLIED = "detected", "sent", "applied"


def repair_command(node: Node, peer: str, above: int = 0) -> str:
    """The one command that repairs a peer gone back in time, as this node's operator should read it
    (``above``: at a store, the HO went back: the last seq of the HO's stream this store applied)."""
    if above:
        return (f"at the HO ({peer}), restored from a backup: `exchange peer restart --peer {node.id} --above "
                f"{above} --reason TEXT` (docs/OPERATIONS.md, \"The HO restored from a backup\")")
    if node.cfg.role == "ho":
        return (f"`exchange peer restart --peer {peer} --reason TEXT` here (docs/OPERATIONS.md, "
                "\"A store restored from a backup\")")
    return (f"at the HO ({peer}): `exchange peer restart --peer {node.id} --reason TEXT` "
            "(docs/OPERATIONS.md, \"A store restored from a backup\")")


# ---------------------------------------------------------------- detection

def note_regress(conn: Connection, node: Node, peer: str, what: str, above: int = 0) -> None:
    """Record that the streams with ``peer`` went back in time (one open entry per peer, the latest evidence;
    ``above``: the HO did, and this store had applied its stream up to that seq)."""
    r = xchg_restart.c
    if conn.execute(select(r.id).where(and_(r.peer == peer, r.kind == SENT, r.resolved_at.is_(None)))).first():
        return  # a restart is on its way: what the peer sealed before it applies it is expected
    detail = json.dumps({"what": what, "repair": repair_command(node, peer, above),
                         **({"above": above} if above else {})}, sort_keys=True)
    open_row = conn.execute(select(r.id).where(and_(r.peer == peer, r.kind == DETECTED, r.resolved_at.is_(None)))
                            ).first()
    if open_row is None:
        conn.execute(xchg_restart.insert().values(peer=peer, kind=DETECTED, at=utc_now(), detail=detail))
    else:
        conn.execute(update(xchg_restart).where(r.id == open_row[0]).values(at=utc_now(), detail=detail))
    log.warning("%s went back in time: %s; to repair: %s", peer, what, repair_command(node, peer),
                extra={"peer": peer})


def note_regress_now(node: Node, peer: str, what: str) -> None:
    """:func:`note_regress` in a transaction of its own (the importer's quarantine paths)."""
    with node.engine.begin() as conn:
        note_regress(conn, node, peer, what)


def before_retained(conn: Connection, peer: str, lane: str, seq: int) -> bool:
    """Is ``seq`` below every bundle of ``peer``'s stream in ``lane`` this node still has a record of (the
    retention purged the rest)? A copy of such a bundle arriving again cannot be told from a replay of an
    old file, so it is no evidence that the peer went back in time."""
    r = xchg_received.c
    rows_of = and_(r.peer == peer, r.lane == lane)
    if conn.execute(select(r.seq).where(rows_of, r.seq == seq)).first() is not None:
        return False
    low = conn.execute(select(func.min(r.seq)).where(rows_of)).scalar()
    return low is not None and seq < int(low)


def note_ho_went_back(conn: Connection, node: Node, peer: str, seq: int, lane: str) -> bool:
    """At a store: the HO sealed ``seq`` of its stream to this store again with another file, or chained to
    another manifest, than the one applied here. An HO restored from its own backup does this (its stream
    restarts from where the backup stood): recorded as evidence, with the seq the restart must go above.
    Returns whether it was recorded."""
    if node.cfg.role != "store" or peer not in node.cfg.peers or node.cfg.peer(peer).role != "ho":
        return False
    # the restart travels in the default lane: its position there is the one to go above (at least 1, so the
    # record says the HO went back even when that lane carried nothing yet)
    last, _manifest = stream_pos(conn, peer, DEFAULT_LANE)
    where = "" if lane == DEFAULT_LANE else f" in lane {lane}"
    note_regress(conn, node, peer, f"{peer} sealed seq {seq} of its stream to this node{where} with another file "
                                   f"or chain than the one applied here: {peer} went back in time (restored from "
                                   f"a backup?); this node applied its default lane up to seq {last}",
                 above=max(last, 1))
    return True


def fork_reason(node: Node, peer: str, reason: str) -> str:
    """A quarantine reason for a bundle whose seq was applied from another file, with the repair named."""
    if node.cfg.role == "ho" and peer in node.cfg.peers and node.cfg.peer(peer).role == "store":
        return f"{reason}; if {peer} was restored from a backup, repair with {repair_command(node, peer)}"
    if node.cfg.role == "store" and peer in node.cfg.peers and node.cfg.peer(peer).role == "ho":
        return f"{reason}; if {peer} was restored from a backup, see `exchange doctor` here for the repair"
    return reason


def superseding_restart(conn: Connection, node: Node, peer: str, seq: int, lane: str = DEFAULT_LANE) -> int | None:
    """The restart that explains a bundle ``seq`` (of ``lane``) from ``peer`` forking its stream, if one does.

    At the HO: a restart sent to the store and not answered yet (the store sealed the bundle before it
    applied the restart). At a store: a restart from the HO that re-based the lane at or above ``seq``
    (the HO superseded it): above ``seq`` in the default lane, where the restart bundle itself travels.
    """
    r = xchg_restart.c
    if node.cfg.role == "ho":
        row = conn.execute(select(r.seq).where(and_(r.peer == peer, r.kind == SENT, r.resolved_at.is_(None)))
                           .order_by(desc(r.id)).limit(1)).first()
        return None if row is None else int(row[0])
    for at, detail in conn.execute(select(r.seq, r.detail).where(and_(r.peer == peer, r.kind == APPLIED))
                                   .order_by(desc(r.id))):
        if lane == DEFAULT_LANE:
            if int(at) > seq:
                return int(at)
        elif seq <= int(json.loads(detail).get("lanes", {}).get(lane, {}).get("in", 0)):
            return int(at)
    return None


def check_heads(conn: Connection, node: Node, peer: str, received: tuple[int, str | None] | None,
                sent: tuple[int, str | None, int] | None, lane: str = DEFAULT_LANE) -> None:
    """A peer's signed ack heads against this node's own record (in the ack's transaction).

    ``received``: (seq, manifest) of this node's stream the peer applied; ``sent``: (seq, manifest,
    acknowledged) of the peer's stream to this node as the peer sealed it. Only what cannot happen
    in order counts (a late ack is never evidence): the peer applied a seq this node never sealed, or
    sealed one differently; or it sealed a seq of its stream with another manifest than the one
    applied here. Both heads are of the ack's ``lane``.
    """
    if received is not None and received[0] > 0:
        mine = conn.execute(select(xchg_sent.c.manifest_sha256).where(and_(
            xchg_sent.c.peer == peer, xchg_sent.c.lane == lane, xchg_sent.c.seq == received[0]))).first()
        top = conn.execute(select(func.max(xchg_sent.c.seq)).where(xchg_sent.c.peer == peer,
                                                                   xchg_sent.c.lane == lane)).scalar()
        never = mine is None and received[0] > int(top or 0)  # beyond all it sealed (a pruned row is not)
        if never or (mine is not None and received[1] is not None and mine[0] != received[1]):
            note_regress(conn, node, peer,
                         f"{peer} applied seq {received[0]} of this node's stream to it, which this node "
                         f"{'never sealed' if never else 'sealed with another manifest'}: this node "
                         "went back in time (restored from a backup?)")
            return
    if sent is not None and sent[0] > 0 and sent[1] is not None:
        applied = conn.execute(select(xchg_received.c.manifest_sha256).where(and_(
            xchg_received.c.peer == peer, xchg_received.c.lane == lane, xchg_received.c.seq == sent[0],
            xchg_received.c.status == ReceivedStatus.APPLIED))).first()
        if applied is not None and applied[0] != sent[1]:
            note_regress(conn, node, peer, f"{peer} sealed seq {sent[0]} of its stream with another manifest "
                                           "than the one applied here: it went back in time (restored from a "
                                           "backup?)")


def resolve_detected(conn: Connection, peer: str) -> None:
    r = xchg_restart.c
    conn.execute(update(xchg_restart).where(and_(r.peer == peer, r.kind == DETECTED, r.resolved_at.is_(None)))
                 .values(resolved_at=utc_now()))


# ---------------------------------------------------------------- a restart bundle arriving

def is_restart(prev: str | None, seq: int) -> bool:
    """A bundle that restarts its stream: ``prev`` null after seq 1 (docs/FORMAT.md section 3)."""
    return prev is None and seq > 1


def refusal(node: Node, peer: str, lane: str = DEFAULT_LANE) -> str | None:
    """Why a restart bundle from ``peer`` is refused here (None: it may be applied)."""
    if node.cfg.role != "store" or node.cfg.peer(peer).role != "ho":
        return (f"a stream restart (prev null after seq 1) from {peer}: only a store's HO may restart its "
                "streams; refused")
    if lane != DEFAULT_LANE:
        return (f"a stream restart (prev null after seq 1) from {peer} in lane {lane}: a restart travels in "
                f"the default lane ({DEFAULT_LANE}) and re-bases every lane; refused")
    return None


@dataclass
class Moves:
    """Files the restart moves once its transaction committed (a crash before: the next restart run moves them)."""

    forked: list[tuple[Path, str]] = field(default_factory=list)  # this store's forked bundles (and their
    # SHA-256): to forked/
    superseded: list[Path] = field(default_factory=list)  # HO bundles the restart superseded: archived

    def run(self, node: Node) -> None:
        for src, sha in self.forked:
            _set_aside_forked(node, src, sha)
        for src in self.superseded:
            dest = node.cfg.archive_received / "superseded"
            dest.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(src):
                move_entry(src, free_name(dest, src.name))


def _set_aside_forked(node: Node, src: Path, sha: str) -> None:
    """Move a forked bundle of this store's to ``forked/``: only the very file (a new bundle may reuse its name)."""
    if not (is_regular_entry(src) and sha256_file(src) == sha):
        return
    dest = node.cfg.home / FORKED_DIR
    dest.mkdir(parents=True, exist_ok=True)
    move_entry(src, free_name(dest, src.name))
    log.info("%s: sealed before the stream restart, never applied by the HO: kept in %s", src.name, dest)


def tidy(node: Node) -> None:
    """Forked bundles a restart found that a crash left in the outbox or archive (after its commit, before
    it moved them): set aside now, before they are pushed again or a new bundle of that name is archived."""
    if node.cfg.role != "store":
        return
    r = xchg_restart.c
    with node.engine.connect() as conn:
        found = conn.execute(select(r.detail).where(and_(r.kind == APPLIED, r.resolved_at.is_(None)))).scalars().all()
    for detail in found:
        for f in json.loads(detail).get("forked", []):
            for folder in (node.cfg.outbox, node.cfg.archive_sent):
                if os.path.lexists(folder / f["file"]):
                    _set_aside_forked(node, folder / f["file"], f["sha256"])


def on_apply(conn: Connection, node: Node, peer: str, seq: int, prev: str | None, summary: dict[str, Any],
             lane: str = DEFAULT_LANE) -> Moves:
    """In a bundle's apply transaction: a store applies the HO's restart record; the HO reads a store's
    restored point. Anything malformed is a FormatError: the transaction rolls back, the bundle is
    quarantined."""
    if is_restart(prev, seq):
        why = refusal(node, peer, lane)
        if why is not None:
            raise FormatError(why)
        if RESTART_FIELD not in summary:
            raise FormatError(f"a stream restart (prev null after seq 1) from {peer} without a restart record")
        return apply_restart(conn, node, peer, seq, parse_restart(summary[RESTART_FIELD]))
    if RESTART_FIELD in summary:
        raise FormatError("a restart record in a bundle that does not restart its stream (prev is not null)")
    if node.cfg.role != "ho":
        return Moves()
    base = parse_base(summary[BASE_FIELD]) if BASE_FIELD in summary else None
    pending = superseding_restart(conn, node, peer, seq)
    if pending is not None and (base is None or base.restart < pending):
        # sealed before the store applied this HO's restart: the store takes it out of its stream and sends
        # its documents again after the restart, so applying it here would fork the stream
        raise FormatError(f"sealed by {peer} before it applied the stream restart at seq {pending}: superseded "
                          "by it (the store sends its documents again)")
    if base is not None:
        note_base(conn, peer, base)
    return Moves()


def apply_restart(conn: Connection, node: Node, ho: str, seq: int, rec: Restart) -> Moves:
    """Re-base both streams with ``ho`` in every lane on its restart record (seq ``seq``), in the bundle's
    transaction.

    - this store's stream to the HO in each lane continues where the HO stands: next seq one after the
      last the HO applied in that lane, chained to its manifest;
    - its own bundles the HO holds as sealed, not acknowledged here (the ack was lost with the restore), are
      PROCESSED; every other one it sealed (a fork the HO never applied) has its documents queued again and
      its file moved to ``forked/``;
    - the version clock jumps above every version the HO applied from it (else the HO would drop the
      documents it sends now as older than those of the lost days);
    - the HO's streams continue at the restart (default lane) and at the HO's last sealed bundle (every
      other lane); its bundles that waited here below those are superseded (the restart's reload replaces them).
    """
    moves = Moves()
    now = utc_now()
    forked: list[dict[str, Any]] = []
    lost_all: list[list[Any]] = []
    superseded: list[list[Any]] = []
    base_seq = sent_version = 0
    marks: dict[str, dict[str, int]] = {}
    for lane in _lanes_with(conn, ho, rec):
        got_seq, got_manifest = rec.received_in(lane)
        held, lane_forked, lane_version = _rebase_out(conn, node, ho, lane, rec, moves)
        forked += lane_forked
        lost_all += [[lane, q] for q, st in held if st != SentStatus.PROCESSED]
        if lane == DEFAULT_LANE:
            base_seq = max((q for q, _st in held), default=0)
        sent_version = max(sent_version, lane_version)
        if lane == DEFAULT_LANE:
            below = seq  # the restart bundle itself moves the default lane (the importer, after this)
        else:
            pos: LanePos = rec.lane(lane)
            _set_in(conn, ho, lane, pos)
            below = pos.sent_seq + 1
        marks[lane] = {"in": below - 1, "out_from": got_seq}
        r = xchg_received.c
        waiting = conn.execute(select(r.seq, r.file_name).where(and_(
            r.peer == ho, r.lane == lane, r.seq < below,
            r.status.in_((ReceivedStatus.WAITING, ReceivedStatus.HELD, ReceivedStatus.FAILED))))).all()
        if waiting:
            conn.execute(delete(xchg_received).where(and_(r.peer == ho, r.lane == lane,
                                                          r.seq.in_([int(w[0]) for w in waiting]))))
            moves.superseded += [node.cfg.inbox / str(w[1]) for w in waiting]
            superseded += [[lane, int(w[0])] for w in waiting]
    _clock_at_least(conn, rec.version_high)
    forgotten = _forget_ho_versions(conn, node, ho) if rec.went_back else 0
    sent_back = _send_back_ho_edits(conn, node, ho) if rec.went_back else 0
    resolve_detected(conn, ho)
    base = Base(seq, base_seq, sent_version)
    detail = {"by": rec.by, "at": rec.at.isoformat(), "reason": rec.reason, "received_seq": rec.received_seq,
              "version_high": rec.version_high, "base": base.as_json(),
              "acknowledged": [q for ln, q in lost_all if ln == DEFAULT_LANE], "forked": forked,
              "superseded": sorted(q for ln, q in superseded if ln == DEFAULT_LANE)}
    if rec.went_back:  # the HO restored from its own backup (FORMAT.md 4.2, format 7)
        detail.update(ho_went_back=rec.went_back, versions_forgotten=forgotten, ho_edits_sent_back=sent_back)
    if set(marks) != {DEFAULT_LANE}:  # where each lane was re-based (exchange.send.restart reads "out_from")
        detail.update(lanes=marks, lanes_acknowledged=lost_all, lanes_superseded=superseded)
    conn.execute(xchg_restart.insert().values(peer=ho, kind=APPLIED, seq=seq, at=now,
                                              detail=json.dumps(detail, sort_keys=True)))
    log.warning("stream restart from %s at seq %d (%s): this node's stream continues at seq %d; %d bundles of "
                "this node forked (documents queued again), %d acknowledged", ho, seq, rec.reason,
                rec.received_seq + 1, len(forked), len(lost_all), extra={"peer": ho, "seq": seq})
    return moves


def _lanes_with(conn: Connection, ho: str, rec: Restart) -> list[str]:
    """Every lane of either stream with ``ho``, this node's and the record's, the default lane first."""
    found = {DEFAULT_LANE, *(x.lane for x in rec.lanes), *received_lanes(conn, ho)}
    found |= {str(x) for x in conn.execute(select(xchg_stream_out.c.lane).where(xchg_stream_out.c.peer == ho))
              .scalars()}
    found |= {str(x) for x in conn.execute(select(xchg_sent.c.lane).where(xchg_sent.c.peer == ho).distinct())
              .scalars()}
    return sorted(found, key=lambda x: (x != DEFAULT_LANE, x))


def _rebase_out(conn: Connection, node: Node, ho: str, lane: str, rec: Restart,
                moves: Moves) -> tuple[list[tuple[int, str]], list[dict[str, Any]], int]:
    """This store's stream to ``ho`` in ``lane`` re-based on the record: returns the bundles the HO holds
    ((seq, status) each), the forked ones (their documents queued again, their files to ``forked/``), and
    the highest document version the held ones carried."""
    got_seq, got_manifest = rec.received_in(lane)
    s = xchg_sent.c
    mine = conn.execute(select(s.seq, s.manifest_sha256, s.status, s.file_name, s.file_sha256).where(
        s.peer == ho, s.lane == lane).order_by(s.seq)).all()
    held: list[tuple[int, str]] = []
    forked: list[dict[str, Any]] = []
    for q, manifest, status, name, sha in mine:
        theirs = rec.manifest_at(int(q), lane)
        if int(q) <= got_seq and (theirs == manifest or (theirs is None and status == SentStatus.PROCESSED)):
            held.append((int(q), str(status)))
        else:
            forked.append({"seq": int(q), "file": str(name), "sha256": str(sha), "status": str(status),
                           **({} if lane == DEFAULT_LANE else {"lane": lane})})
    types = lanes.lane_types(node.catalog, lane)  # a seq is one lane's: the queues are split by type
    ev_lane = lanes.condition(xchg_event.c.doc_type, types)
    dv_lane = lanes.condition(xchg_delivery.c.doc_type, types)

    def _in(cond: Any, extra: Any) -> Any:
        return cond if extra is None else and_(cond, extra)

    lost = [q for q, st in held if st != SentStatus.PROCESSED]
    if lost:
        conn.execute(update(xchg_sent).where(and_(s.peer == ho, s.lane == lane, s.seq.in_(lost))).values(
            status=SentStatus.PROCESSED, processed_at=utc_now(),
            reason=f"applied at {ho} (its stream restart lists it; the ack was lost)"))
        conn.execute(update(xchg_delivery).where(_in(and_(xchg_delivery.c.peer == ho,
                                                          xchg_delivery.c.seq.in_(lost)), dv_lane))
                     .values(status=DocStatus.PROCESSED))
    fseqs = [f["seq"] for f in forked]
    for i in range(0, len(fseqs), rows.CHUNK):
        chunk = fseqs[i:i + rows.CHUNK]
        conn.execute(update(xchg_event).where(_in(xchg_event.c.seq.in_(chunk), ev_lane)).values(routed=0, seq=None))
        conn.execute(update(xchg_delivery).where(_in(and_(xchg_delivery.c.peer == ho,
                                                          xchg_delivery.c.seq.in_(chunk)), dv_lane))
                     .values(status=DocStatus.PENDING, seq=None))
        conn.execute(delete(xchg_sent).where(and_(s.peer == ho, s.lane == lane, s.seq.in_(chunk))))
    for f in forked:
        moves.forked += [(node.cfg.outbox / str(f["file"]), str(f["sha256"])),
                         (node.cfg.archive_sent / str(f["file"]), str(f["sha256"]))]
    top = max((q for q, _st in held), default=0)
    version = conn.execute(select(func.max(func.coalesce(xchg_event.c.version, xchg_event.c.id))).where(_in(and_(
        xchg_event.c.routed == 1, xchg_event.c.seq.is_not(None), xchg_event.c.seq <= top), ev_lane))).scalar()
    o = xchg_stream_out.c
    if conn.execute(update(xchg_stream_out).where(o.peer == ho, o.lane == lane).values(
            next_seq=got_seq + 1, last_manifest_sha256=got_manifest)).rowcount == 0:
        conn.execute(xchg_stream_out.insert().values(peer=ho, lane=lane, next_seq=got_seq + 1,
                                                     last_manifest_sha256=got_manifest))
    return held, forked, int(version or 0)


def _set_in(conn: Connection, ho: str, lane: str, pos: LanePos) -> None:
    """The HO's stream to this store in ``lane`` (not the default one) continues after the HO's last sealed
    bundle there: its unacknowledged bundles the HO ended with the restart (the reload sends them again)."""
    if pos.sent_seq and pos.sent_manifest:
        set_stream_pos(conn, ho, lane, pos.sent_seq, pos.sent_manifest)
    else:
        conn.execute(delete(xchg_stream_in).where(and_(xchg_stream_in.c.peer == ho, xchg_stream_in.c.lane == lane)))


def _forget_ho_versions(conn: Connection, node: Node, ho: str) -> int:
    """The HO went back in time: the versions this store holds of the HO's own documents (its tombstones
    too) may be above the HO's restored clock, and would drop the reload that follows as stale. They are
    forgotten: the HO is the source of truth of its masters, and everything it sends after the restart is
    that truth. Both-sides documents (owned by the stores) keep theirs. Returns how many were forgotten."""
    types = [d.name for d in node.catalog if d.owner == "ho"]
    if not types:
        return 0
    v = xchg_doc_version.c
    return int(conn.execute(delete(xchg_doc_version).where(and_(v.peer == ho, v.doc_type.in_(types)))).rowcount or 0)


def _send_back_ho_edits(conn: Connection, node: Node, ho: str) -> int:
    """The HO went back in time: the changes it made to this store's both-sides documents (a customer's new
    phone) in the days it lost are here, applied, and nowhere at the HO any more. Every such document whose
    last version here came from the HO is queued to the HO again (a new event: this store's row as it stands,
    newer than anything the HO holds), on the base it holds (the HO reads a base from its lost days as the
    newest it still knows: exchange.receive.conflicts.decide). Returns how many."""
    types = [d.name for d in node.catalog if d.both_sides]
    if not types:
        return 0
    v = xchg_doc_version.c
    found = conn.execute(select(v.doc_type, v.doc_key).where(and_(
        v.peer == ho, v.doc_type.in_(types), v.deleted_at.is_(None))).order_by(v.doc_type, v.doc_key)).all()
    by_type: dict[str, list[list[Any]]] = {}
    for doc_type, doc_key in found:
        key = json.loads(doc_key)
        if isinstance(key, list) and key:
            by_type.setdefault(str(doc_type), []).append(key)
    return sum(record_events(conn, t, keys) for t, keys in by_type.items())


def _clock_at_least(conn: Connection, version: int) -> None:
    """The version clock (``xchg_meta``) moves up to ``version`` (never down)."""
    row = conn.execute(select(xchg_meta.c.value).where(xchg_meta.c.key == CLOCK_KEY)).first()
    if row is None:
        conn.execute(xchg_meta.insert().values(key=CLOCK_KEY, value=str(version)))
    elif int(row[0]) < version:
        conn.execute(update(xchg_meta).where(xchg_meta.c.key == CLOCK_KEY).values(value=str(version)))


# ---------------------------------------------------------------- the HO: a restored store's documents

def note_base(conn: Connection, peer: str, base: Base) -> None:
    """A store's restored point after this HO's restart ``base.restart``: recorded once; it confirms the
    restart. A point naming a restart this HO never sent to it is refused (FormatError)."""
    r = xchg_restart.c
    row = conn.execute(select(r.id, r.detail, r.resolved_at).where(and_(
        r.peer == peer, r.kind == SENT, r.seq == base.restart))).first()
    if row is None:
        raise FormatError(f"restart_base names restart seq {base.restart}, which this node never sent to {peer}")
    detail = json.loads(row[1])
    if row[2] is not None:
        return
    if base.seq > int(detail["received_seq"]) or base.version > int(detail["version_high"]):
        raise FormatError(f"restart_base (seq {base.seq}, version {base.version}) lies beyond the restart record "
                          f"(seq {detail['received_seq']}, version {detail['version_high']})")
    detail["base"] = base.as_json()
    conn.execute(update(xchg_restart).where(r.id == row[0]).values(detail=json.dumps(detail, sort_keys=True),
                                                                   resolved_at=utc_now()))
    conn.execute(update(xchg_restart).where(and_(  # earlier restarts it never answered: this one replaced them
        r.peer == peer, r.kind == SENT, r.seq < base.restart, r.resolved_at.is_(None))).values(resolved_at=utc_now()))


def _lost_window(conn: Connection, peer: str) -> tuple[int, int] | None:
    """(base version, version high) of the newest restart the store answered: the versions of the lost days."""
    r = xchg_restart.c
    row = conn.execute(select(r.detail).where(and_(r.peer == peer, r.kind == SENT, r.resolved_at.is_not(None)))
                       .order_by(desc(r.id)).limit(1)).first()
    if row is None:
        return None
    d = json.loads(row[0])
    return int(d["base"]["version"]), int(d["version_high"])


def keep_lost(conn: Connection, node: Node, peer: str, seq: int, dt: DocType, fresh: Sequence[tuple[str, str, int]],
              stored: dict[str, int], data: dict[str, pa.Table]) -> int:
    """Documents a restored store sends under a key whose version here is from the days it lost.

    The store no longer has that version (it was restored to before it), so what it sends now is either a
    new document under a reused number (a POS numbering bills again) or a change made without it: either
    way both are real. The store's version is applied (it owns the document); the one applied here before
    is kept in the conflict log (``exchange conflicts``), both versions with their rows. Returns how many.
    """
    window = _lost_window(conn, peer)
    if window is None:
        return 0
    lo, hi = window
    hits = [(k, op, v) for k, op, v in fresh if lo < stored.get(k, -1) <= hi < v]
    if not hits:
        return 0
    keys = [k for k, _o, _v in hits]
    ours = {t: rows.read_docs(conn, node.catalog.table(t), dt.key, keys) for t in dt.tables()}
    ours_by = {t: _by_key(tab, dt.key) for t, tab in ours.items()}
    theirs_by = {t: _by_key(tab, dt.key) for t, tab in data.items()}
    for k, op, v in hits:
        conflict_log.record(
            conn, doc_type=dt.name, doc_key=k, peer=peer, seq=seq, policy=RESTORED_POLICY,
            status=ConflictStatus.DECIDED, kept="theirs",
            ours=conflict_log.Local(stored[k], None),
            our_rows={t: tab.take(pa.array(ours_by[t].get(k, []), pa.int64())) for t, tab in ours.items()},
            their_version=v, their_base=lo, their_at=None,
            their_rows=None if op == "D" else {t: tab.take(pa.array(theirs_by[t].get(k, []), pa.int64()))
                                               for t, tab in data.items()},
            note=f"{peer} was restored from a backup and sent this key again: the version applied here from "
                 f"the days it lost (version {stored[k]}) is kept in this log, its new one applied")
    log.warning("%d %s documents from %s reuse keys of the days it lost: both versions kept in the conflict log",
                len(hits), dt.name, peer, extra={"peer": peer, "seq": seq})
    return len(hits)


def _by_key(data: pa.Table, key: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, k in enumerate(rows.row_keys(data, key)):
        out.setdefault(k, []).append(i)
    return out


# ---------------------------------------------------------------- the HO: what a restart record says

def restart_record(conn: Connection, peer: str, by: str, reason: str, at: Any, went_back: int = 0) -> Restart:
    """This HO's restart record for ``peer``: how far it applied the store's stream in each lane and what
    from it, and where its own streams to the store stand in every lane other than the default one
    (``went_back``: this HO was restored from its backup; the store had applied its stream up to it)."""
    seq, manifest = stream_pos(conn, peer, DEFAULT_LANE)
    r = xchg_received.c
    found = conn.execute(select(r.seq, r.manifest_sha256).where(and_(
        r.peer == peer, r.lane == DEFAULT_LANE, r.seq <= seq,
        r.status.in_((ReceivedStatus.APPLIED, ReceivedStatus.SKIPPED)),
        r.manifest_sha256.is_not(None))).order_by(desc(r.seq)).limit(1000)).all()
    applied = sorted((int(q), str(h)) for q, h in found if int(q) < seq)[-999:]
    if seq:
        applied.append((seq, str(manifest)))
    high = conn.execute(select(func.max(xchg_doc_version.c.version)).where(
        xchg_doc_version.c.peer == peer)).scalar()
    o = xchg_stream_out.c
    out = {str(ln): (int(n) - 1, m) for ln, n, m in conn.execute(
        select(o.lane, o.next_seq, o.last_manifest_sha256).where(o.peer == peer))}
    others: list[LanePos] = []
    for lane in sorted((set(received_lanes(conn, peer)) | set(out)) - {DEFAULT_LANE}):
        r_seq, r_man = stream_pos(conn, peer, lane)
        s_seq, s_man = out.get(lane, (0, None))
        others.append(LanePos(lane, r_seq, r_man if r_seq else None, s_seq if s_man else 0, s_man))
    return Restart(by, at, reason, seq, manifest if seq else None, int(high or 0), tuple(applied), tuple(others),
                   went_back)


def forked_received(conn: Connection, peer: str, rec: Restart) -> list[tuple[int, str]]:
    """Bundles from ``peer`` beyond the record's position in their lane held here (WAITING, HELD, FAILED):
    sealed by the store before it went back, never applied; removed from the stream (the caller quarantines
    their files)."""
    r = xchg_received.c
    found: list[tuple[int, str]] = []
    for lane in sorted({str(x) for x in conn.execute(select(r.lane).where(r.peer == peer).distinct()).scalars()}):
        cond = and_(r.peer == peer, r.lane == lane, r.seq > rec.received_in(lane)[0],
                    r.status.in_((ReceivedStatus.WAITING, ReceivedStatus.HELD, ReceivedStatus.FAILED)))
        found += [(int(q), str(n)) for q, n in conn.execute(select(r.seq, r.file_name).where(cond))]
        conn.execute(delete(xchg_received).where(cond))
    return found


def record_sent(conn: Connection, peer: str, seq: int, rec: Restart, detail: dict[str, Any]) -> None:
    """The HO's restart ``seq`` to ``peer``: on record until the store answers with its restored point."""
    resolve_detected(conn, peer)
    conn.execute(xchg_restart.insert().values(peer=peer, kind=SENT, seq=seq, at=utc_now(), detail=json.dumps(
        {**detail, "by": rec.by, "reason": rec.reason, "received_seq": rec.received_seq,
         "version_high": rec.version_high}, sort_keys=True, default=str)))


def history(conn: Connection, peer: str | None = None) -> list[dict[str, Any]]:
    """Every restart entry (of ``peer``), newest first, for ``exchange peer restarts`` and ``--json``."""
    r = xchg_restart.c
    q = select(xchg_restart).order_by(desc(r.id))
    if peer is not None:
        q = q.where(r.peer == peer)
    return [{"peer": x.peer, "kind": x.kind, "seq": x.seq, "at": x.at, "resolved_at": x.resolved_at,
             "detail": json.loads(x.detail)} for x in conn.execute(q)]
