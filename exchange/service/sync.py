"""The sync cycle: pull, import, export, push. Receive first, then send.

Every step is safe to interrupt: files move by durable copy and rename, states
change in database transactions, and the next cycle picks up where this one
stopped. Bundles that stay UPLOADED without an ack for ``resend_after``
seconds are pushed again (the receiver re-acks a duplicate, never re-applies).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from exchange.errors import DatabaseError, ExchangeError
from exchange.faults import crashpoint
from exchange.files import is_regular_entry, move_entry, utc_now
from exchange.node import keys
from exchange.node.home import Node
from exchange.node.lock import work_lock
from exchange.progress import NullReporter, Reporter
from exchange.send.pending import export_work, idle, resend_cutoff, resend_due
from exchange.service.health import due as heartbeats_due
from exchange.service.health import write_heartbeats
from exchange.transport import Transport, open_transport
from exchange.vocabulary import DocStatus, Outcome, SentStatus
from exchange.wire.formats import is_exchange_file, parse_name

if TYPE_CHECKING:
    from exchange.receive.importer import FileOutcome
    from exchange.send.export import Exported

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    pulled: list[str] = field(default_factory=list)
    imported: list[FileOutcome] = field(default_factory=list)
    exported: list[Exported] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    heartbeats: list[str] = field(default_factory=list)  # heartbeats delivered (exchange.service.health)
    errors: list[str] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)  # the transport errors behind ``errors``, to judge by class

    def line(self) -> str:
        applied = sum(1 for o in self.imported if o.status == Outcome.APPLIED)
        acked = sum(1 for o in self.imported if o.status in (Outcome.PROCESSED, Outcome.REJECTED))
        text = (f"pulled {len(self.pulled)}, applied {applied}, acks {acked}, "
                f"exported {len(self.exported)}, pushed {len(self.pushed)}")
        if self.resent:
            text += f", resent {len(self.resent)}"
        if self.errors:
            text += f", {len(self.errors)} errors"
        return text


def _transports(node: Node, override: str | None) -> dict[str, str]:
    """Peer id -> transport address (``override`` replaces every peer's address)."""
    out = {}
    for p in node.cfg.peers.values():
        if not p.exchanging:
            continue  # paused or removed: nothing goes to it or comes from it
        addr = override or p.transport
        if addr:
            out[p.id] = addr
    return out


def _open(node: Node, address: str, peer: str) -> Transport:
    return open_transport(address, home=node.cfg.home, me=node.id, peer=peer)


def pull(node: Node, *, source: str | None = None, reporter: Reporter | None = None,
         report: SyncReport | None = None) -> list[str]:
    """Fetch files addressed to this node from every peer's transport into the inbox."""
    rep = report or SyncReport()
    node.cfg.inbox.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for peer, address in sorted(_transports(node, source).items()):
        key = address if address.startswith("dir:") or "://" not in address else f"{address}#{peer}"
        if key in seen:
            continue
        seen.add(key)
        try:
            t = _open(node, address, peer)
            try:
                got = t.pull(node.id, node.cfg.inbox)
            finally:
                t.close()
            rep.pulled.extend(p.name for p in got)
            # links, FIFOs, folders named like files: left where they are, reported each time
            rep.errors.extend(f"pull from {peer}: {why}" for why in t.refused)
        except ExchangeError as exc:
            rep.errors.append(f"pull from {peer}: {exc}")
            rep.failures.append(exc)
            log.warning("pull from %s failed: %s", peer, exc)
    return rep.pulled


def push(node: Node, *, target: str | None = None, reporter: Reporter | None = None,
         report: SyncReport | None = None) -> list[str]:
    """Deliver outbox files to their peers; bundles become UPLOADED and are archived."""
    rep = report or SyncReport()
    r = reporter or NullReporter()
    addresses = _transports(node, target)
    by_peer: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(node.cfg.outbox.iterdir()):
        if is_exchange_file(f.name) and _sendable(f, rep):
            by_peer[parse_name(f.name).b].append(f)
    resend = due_for_resend(node)
    for peer, names in resend.items():
        for name in names:
            src = node.cfg.archive_sent / name
            if os.path.lexists(src) and _sendable(src, rep):
                by_peer[peer].append(src)
    node.cfg.archive_sent.mkdir(parents=True, exist_ok=True)
    for peer, files in sorted(by_peer.items()):
        address = addresses.get(peer)
        if address is None:
            continue  # no transport for this peer: files wait for `exchange push --to`
        try:
            t = _open(node, address, peer)
            try:
                delivered = t.push(files, peer)
            finally:
                t.close()
        except ExchangeError as exc:
            rep.errors.append(f"push to {peer}: {exc}")
            rep.failures.append(exc)
            log.warning("push to %s failed: %s", peer, exc)
            continue
        crashpoint("push.copied")
        _mark_delivered(node, delivered, rep, r)
    return rep.pushed


def _sendable(f: Path, rep: SyncReport) -> bool:
    """Only a regular file is sent: a link or FIFO in the outbox or archive is reported, never read."""
    if is_regular_entry(f):
        return True
    why = f"{f.name} in {f.parent} is not a regular file (a link, folder, FIFO...): not sent"
    rep.errors.append(f"push: {why}")
    log.warning("%s", why)
    return False


def due_for_resend(node: Node) -> dict[str, list[str]]:
    """Per peer, the bundles uploaded before the resend cutoff and still unacknowledged: pushed again."""
    from sqlalchemy import select

    from exchange.database.tables import xchg_sent

    cutoff = resend_cutoff(node.cfg)
    out: dict[str, list[str]] = defaultdict(list)
    with node.engine.connect() as conn:
        for peer, name, at in conn.execute(select(xchg_sent.c.peer, xchg_sent.c.file_name,
                                                  xchg_sent.c.uploaded_at)
                                           .where(xchg_sent.c.status == SentStatus.UPLOADED)):
            if resend_due(at, cutoff):
                out[peer].append(name)
    return out


def _mark_delivered(node: Node, files: list[Path], rep: SyncReport, r: Reporter) -> None:
    from sqlalchemy import and_, select, update

    from exchange.database import lanes
    from exchange.database.tables import xchg_delivery, xchg_sent

    now = utc_now()
    for f in files:
        fn = parse_name(f.name)
        if fn.kind == "bundle":
            with node.engine.begin() as conn:
                cond = and_(xchg_sent.c.peer == fn.b, xchg_sent.c.lane == fn.lane, xchg_sent.c.seq == fn.seq)
                status = conn.execute(select(xchg_sent.c.status).where(cond)).scalar()
                conn.execute(update(xchg_sent).where(and_(cond, xchg_sent.c.status.in_(
                    (SentStatus.EXPORTED, SentStatus.UPLOADED)))).values(status=SentStatus.UPLOADED,
                                                                         uploaded_at=now))
                docs = and_(xchg_delivery.c.peer == fn.b, xchg_delivery.c.seq == fn.seq,
                            xchg_delivery.c.status == DocStatus.EXPORTED)
                in_lane = lanes.condition(xchg_delivery.c.doc_type, lanes.lane_types(node.catalog, fn.lane))
                conn.execute(update(xchg_delivery).where(docs if in_lane is None else and_(docs, in_lane))
                             .values(status=DocStatus.UPLOADED))
            if f.parent == node.cfg.archive_sent:
                rep.resent.append(f.name)
                r.state(f.name, SentStatus.UPLOADED, "resent: no ack yet")
                continue
            if status == SentStatus.EXPORTED:
                r.state(f.name, SentStatus.UPLOADED)
        if f.parent == node.cfg.outbox:
            move_entry(f, node.cfg.archive_sent / f.name)  # a rename: never through a link at either end
            # a heartbeat replaces the one before it there: its time says when the next is due
            (rep.heartbeats if fn.kind == "heartbeat" else rep.pushed).append(f.name)


def _db_error(exc: Exception) -> ExchangeError:
    """A database failure (full disk, connection lost) as the operator sees it."""
    if isinstance(exc, ExchangeError):
        return exc
    orig = getattr(exc, "orig", None) or exc
    return DatabaseError(f"database error: {type(orig).__name__}: {str(orig).splitlines()[0][:300]}")


def export_needed(node: Node) -> bool:
    """Cheap check (no Arrow, no crypto): is there anything export would do?

    The database questions are :func:`exchange.send.pending.export_work`'s, the ones
    :func:`exchange.send.pending.idle` asks before SQLAlchemy is loaded.
    """
    if any(p.name.endswith(".part") for p in node.cfg.outbox.iterdir()):
        return True  # an interrupted export to recover
    if keys.rotation_announcing(node.cfg):
        from exchange.node import rotation

        if rotation.unconfirmed(node):
            return True  # a key notice to carry (in an empty bundle if nothing else goes)
    stores = [p.id for p in node.cfg.peers.values() if p.role == "store" and p.exchanging]
    with node.engine.connect() as conn:
        return export_work(lambda sql: conn.exec_driver_sql(sql).all(), stores,
                           [p.id for p in node.cfg.peers.values() if not p.exchanging])


def sync(node: Node, *, via: str | None = None, reporter: Reporter | None = None) -> SyncReport:
    """One full cycle under the home's work lock: pull, import, export, push."""
    rep = SyncReport()
    r = reporter or NullReporter()
    node.ensure_folders()
    with work_lock(node.cfg.home):
        pull(node, source=via, reporter=r, report=rep)
        peers = list(_transports(node, via))
        beat = heartbeats_due(node, peers)  # a stat per peer: a heartbeat goes even with nothing else to do
        if not beat and idle(node):  # nothing to import, export or push: done without loading SQLAlchemy
            check_alerts(node)
            log.info("sync: %s", rep.line())
            return rep
        from sqlalchemy.exc import SQLAlchemyError

        # each step on its own: a failing import must not stop the store's sales going out;
        # the heavy modules (Arrow, the crypto stack) load only when there is work for them
        try:
            if any(is_exchange_file(p.name) for p in node.cfg.inbox.iterdir()):
                from exchange.receive.importer import import_inbox

                rep.imported = import_inbox(node, reporter=r)
        except (ExchangeError, SQLAlchemyError) as exc:
            rep.errors.append(f"import: {_db_error(exc)}")
            log.warning("import failed: %s", _db_error(exc))
        try:
            if export_needed(node):
                from exchange.send.export import export_all

                rep.exported = export_all(node, reporter=r)
        except (ExchangeError, SQLAlchemyError) as exc:
            rep.errors.append(f"export: {_db_error(exc)}")
            log.warning("export failed: %s", _db_error(exc))
        write_heartbeats(node, beat)  # after import and export: the health they left
        try:
            push(node, target=via, reporter=r, report=rep)
        except SQLAlchemyError as exc:
            rep.errors.append(f"push: {_db_error(exc)}")
            log.warning("push failed: %s", _db_error(exc))
        check_alerts(node)
    log.info("sync: %s", rep.line())
    return rep


def check_alerts(node: Node) -> None:
    """Deliver the alerts whose state changed (exchange.service.alerts), when ``[alerts]`` is configured.

    Never fails the cycle: a delivery that fails is logged and tried again next time.
    """
    from exchange.service import alerts

    try:
        if not alerts.config(node).enabled:
            return
        from sqlalchemy.exc import SQLAlchemyError
    except ExchangeError as exc:
        log.warning("alerts: %s", exc)
        return
    try:
        alerts.check(node)
    except (ExchangeError, OSError, SQLAlchemyError) as exc:
        log.warning("alerts not checked: %s", _db_error(exc))
