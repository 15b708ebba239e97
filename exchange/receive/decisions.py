"""An operator ends a FAILED bundle without applying it: ``exchange bundle skip``.

A bundle that cannot be applied holds its stream: every later bundle WAITs
behind it. Skipping it is a decision (who, when, why) that:

- moves the stream past it in one transaction: nothing of the bundle is applied,
  its manifest becomes the chain's last link (the next bundle's ``prev`` names it),
  the row becomes SKIPPED and the decision is recorded in ``xchg_decision``;
- answers the sender with a signed REJECTED ack (version 3) whose encrypted
  details carry the decision, so the sender shows it and can send the documents again;
- archives the bundle (never deletes it), so an auditor finds the file, the ack
  and the decision.

A crash after the commit leaves the ack in the database and the bundle in the
inbox: the next import sees a seq at or below the stream position whose row is
SKIPPED with the same file, re-writes the stored ack and archives it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, delete, select, update

from exchange.database.tables import begin_write, xchg_decision, xchg_received
from exchange.errors import ApplyError, BundleError, CryptoError, FormatError, StreamError
from exchange.files import sha256_file, utc_now, write_file_atomic
from exchange.node.home import Node
from exchange.receive.setaside import archive
from exchange.vocabulary import DEFAULT_LANE, AckResult, Outcome, ReceivedStatus
from exchange.progress import Reporter
from exchange.receive.importer import FileOutcome, _heads
from exchange.receive.position import set_stream_pos, stream_pos
from exchange.receive.stuck import STUCK_SQL, Stuck, stuck_bundles
from exchange.wire.bundle import BundleReader, build_ack, open_bundle
from exchange.wire.decision import MAX_DECIDER_CHARS, Decision, check_text
from exchange.wire.formats import MAX_REASON_CHARS, MAX_SUPERSEDES, SUPERSEDES, ack_name, stream_label
from exchange.wire.signed import seq_field

log = logging.getLogger(__name__)

#: Where a skipped bundle is archived, below archive/received/.
SKIPPED_DIR = "skipped"


@dataclass(frozen=True)
class Skipped:
    """What ``exchange bundle skip`` did."""

    peer: str
    seq: int
    file: str
    decision: Decision
    archived: Path
    lane: str = DEFAULT_LANE


def skip_bundle(node: Node, peer: str, seq: int, *, reason: str, by: str,
                superseded: Decision | None = None, lane: str = DEFAULT_LANE) -> Skipped:
    """Skip FAILED bundle ``seq`` of ``peer``'s stream in ``lane``: the stream moves past it, nothing of it
    applied; the peer's other lanes are not touched.

    ``superseded``: the sender's own signed notice (:func:`follow_supersede_notices`) is the decision.
    """
    decision = superseded or Decision("skipped", check_text(by, MAX_DECIDER_CHARS, "--by"),
                                      utc_now().replace(microsecond=0), check_text(reason, MAX_REASON_CHARS,
                                                                                   "--reason"))
    node.cfg.peer(peer)
    with node.engine.connect() as conn:
        row = conn.execute(select(xchg_received).where(and_(
            xchg_received.c.peer == peer, xchg_received.c.lane == lane, xchg_received.c.seq == seq))
        ).mappings().first()
    if row is None or row["status"] != ReceivedStatus.FAILED:
        state = "not received" if row is None else str(row["status"])
        raise StreamError(f"bundle {seq} of {stream_label(peer, node.id, lane)} is {state}: only a FAILED "
                          "bundle can be skipped",
                          hint="See `exchange status received`; a WAITING bundle waits for an earlier one, "
                               "a HELD one for an upgrade.")
    path = node.cfg.inbox / row["file_name"]
    if not path.is_file() or sha256_file(path) != row["file_sha256"]:
        raise StreamError(f"{row['file_name']} is not in {node.cfg.inbox} as it was received",
                          hint="Put the received file back in the inbox (from the sender's archive/sent/), "
                               "then skip it: the skip is checked against the signed file.")
    with BundleReader(path) as reader:  # the chain continues from the signed manifest, checked again
        reader.verify_signature(node.trust)
        reader.check_recipient(node.id)
        m = reader.manifest
    if (m.sender, m.seq, m.lane, m.sha256) != (peer, seq, lane, row["manifest_sha256"]):
        raise StreamError(f"{path.name}: its signed manifest is not the one recorded as FAILED")
    with node.engine.begin() as conn:
        begin_write(conn)
        last_seq, last_sha = stream_pos(conn, peer, lane, lock=True)
        if last_seq != seq - 1 or m.prev != last_sha:
            raise StreamError(f"bundle {seq} of {peer} is not the next of its stream (last applied {last_seq})",
                              hint="Run `exchange retry`, then skip again.")
        ack = build_ack(key=node.signing_key, acker=node.id, sender=peer, seq=seq,
                        bundle_sha256=row["file_sha256"], manifest_sha256=m.sha256, result=AckResult.REJECTED,
                        reason=f"{decision.text()} (it failed: {row['reason'] or 'no reason recorded'})",
                        recipients=node.recipients_for(peer), decision=decision, lane=lane,
                        heads=_heads(conn, peer, (seq, m.sha256), lane))
        set_stream_pos(conn, peer, lane, seq, m.sha256)
        conn.execute(update(xchg_received).where(and_(xchg_received.c.peer == peer, xchg_received.c.lane == lane,
                                                      xchg_received.c.seq == seq))
                     .values(status=ReceivedStatus.SKIPPED, ack=ack, applied_at=None,
                             reason=f"{decision.text()} (failed: {row['reason'] or ''})"[:MAX_REASON_CHARS]))
        record_decision(conn, "received", peer, seq, decision, row["file_sha256"], m.sha256, lane=lane)
    log.warning("decision: bundle %s %s", path.name, decision.text(),
                extra={"file": path.name, "status": ReceivedStatus.SKIPPED, "peer": peer, "seq": seq})
    write_file_atomic(node.cfg.outbox / ack_name(node.id, peer, seq, lane), ack)
    return Skipped(peer, seq, path.name, decision, archive(node, path, SKIPPED_DIR), lane)


def record_decision(conn: Connection, side: str, peer: str, seq: int, decision: Decision, file_sha256: str,
                    manifest_sha256: str | None, lane: str = DEFAULT_LANE) -> None:
    """Record ``decision`` about bundle ``seq`` of ``peer``'s stream in ``lane`` (replacing an earlier record)."""
    d = xchg_decision.c
    conn.execute(delete(xchg_decision).where(and_(d.side == side, d.peer == peer, d.lane == lane, d.seq == seq)))
    conn.execute(xchg_decision.insert().values(
        side=side, peer=peer, lane=lane, seq=seq, kind=decision.kind, decided_by=decision.by, decided_at=decision.at,
        reason=decision.reason, file_sha256=file_sha256, manifest_sha256=manifest_sha256))


def still_failed(node: Node, peer: str | None = None) -> list[Stuck]:
    """The FAILED bundles (of ``peer`` only, if given): ``exchange retry`` exits non-zero while any is left."""
    with node.engine.connect() as conn:
        found = stuck_bundles(conn.exec_driver_sql(STUCK_SQL).all())
    return [s for s in found if s.status == ReceivedStatus.FAILED and (peer is None or s.peer == peer)]


def failed_error(failed: list[Stuck]) -> ApplyError:
    """The error ``exchange retry`` ends with while a bundle is still FAILED (exit code 21)."""
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return ApplyError(f"{first.line()}{more}", hint=first.resolve[:1].upper() + first.resolve[1:] + ".")


def read_notices(summary: Mapping[str, Any], what: str) -> dict[int, Decision]:
    """A bundle's ``summary.supersedes`` (docs/FORMAT.md section 4): seq -> the sender's decision.

    From a peer: bounded and checked field by field; a malformed list is a FormatError naming ``what``.
    """
    raw = summary.get(SUPERSEDES, [])
    if not isinstance(raw, list) or len(raw) > MAX_SUPERSEDES:
        raise FormatError(f"{what}: summary.{SUPERSEDES} is not a list of at most {MAX_SUPERSEDES} notices")
    out: dict[int, Decision] = {}
    for n in raw:
        if not isinstance(n, dict):
            raise FormatError(f"{what}: summary.{SUPERSEDES} holds a {type(n).__name__}, not a notice")
        seq = seq_field(n.get("seq"), what, f"{SUPERSEDES} seq")
        d = Decision.parse({k: v for k, v in n.items() if k != "seq"}, f"{what} {SUPERSEDES}")
        if d.kind != "superseded":
            raise FormatError(f"{what}: a {SUPERSEDES} notice must be of kind superseded, not {d.kind}")
        out[seq] = d
    return out


def follow_supersede_notices(node: Node, outcomes: list[FileOutcome], rep: Reporter) -> list[Stuck]:
    """Skip each FAILED bundle its sender announced superseded in a later bundle waiting behind it.

    Only the bundle at the head of its stream (FAILED) is skipped, and only on the word of a
    bundle of the same stream whose signature verifies; returns what was skipped (the caller
    imports the stream again). A waiting bundle that cannot be opened says nothing here: it is
    checked in full when its turn comes.
    """
    done: list[Stuck] = []
    for head in [o for o in outcomes if o.status == Outcome.FAILED and o.peer]:
        behind = sorted((o for o in outcomes if o.peer == head.peer and o.lane == head.lane and o.seq > head.seq
                         and o.status == Outcome.WAITING), key=lambda o: -o.seq)
        for o in behind:
            path = node.cfg.inbox / o.file
            try:
                with open_bundle(path, trust=node.trust, identities=node.identities, me=node.id,
                                 workdir=node.cfg.work) as opened:
                    if (opened.manifest.sender, opened.manifest.lane) != (head.peer, head.lane):
                        continue
                    notices = read_notices(opened.summary, o.file)
            except (BundleError, CryptoError) as exc:
                log.warning("%s: its notices cannot be read: %s", o.file, exc)
                continue
            decision = notices.get(head.seq)
            if decision is None:
                continue
            skip_bundle(node, head.peer, head.seq, reason=decision.reason, by=decision.by, superseded=decision,
                        lane=head.lane)
            rep.state(head.file, ReceivedStatus.SKIPPED, decision.text())
            done.append(Stuck(head.peer, head.seq, ReceivedStatus.SKIPPED, decision.text(), lane=head.lane))
            break
    return done
