"""Bundles in the inbox -> the database, strictly in stream order; then the ack.

``import_file`` is the core (the watcher only debounces and calls it). Per
bundle: verify the outer layer, place it in its stream (duplicate, waiting,
held, next), decrypt and check every hash, then apply in one transaction that
also moves the stream position and stores the signed ack. The ack file is
written after the commit and the bundle archived after that, so a crash at any
point is repaired by the next run (a bundle already applied is re-acked, never
re-applied).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection, and_, delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError, StatementError

from exchange.database import lanes, references, rows, tombstones, zone_offsets
from exchange.database.arrow_memory import system_pool
from exchange.database.capture import suppress_capture
from exchange.database.catalog import DocType
from exchange.database.failures import database_unusable, root_error, transaction_lost
from exchange.database.tables import (
    begin_write,
    xchg_delivery,
    xchg_doc_version,
    xchg_kept,
    xchg_parked,
    xchg_received,
    xchg_sent,
)
from exchange.errors import (
    ApplyError, BundleError, DatabaseError, ExchangeError, FormatError, OwnershipError, SchemaChangeError,
)
from exchange.faults import crashpoint
from exchange.files import fsync_dir, sha256_file, utc_now, write_file_atomic
from exchange.node import keys, rotation
from exchange.node.home import Node
from exchange.progress import NullReporter, Reporter
from exchange.vocabulary import (
    DEFAULT_LANE, AckResult, DocKey, DocStatus, Outcome, ParkedState, ReceivedStatus, SentStatus, counted,
)
from exchange.receive import admission, children, conflicts, evolution
from exchange.receive import restart
from exchange.receive.heartbeat import import_heartbeat
from exchange.receive.position import set_stream_pos, stream_pos
from exchange.receive.locks import try_lock
from exchange.receive.orphans import deleted_dependency
from exchange.receive.reconcile import reconcile
from exchange.receive.setaside import archive, quarantine
from exchange.database.batch import EVENTS_SCHEMA, control_totals
from exchange.wire.bundle import (
    Ack,
    BundleReader,
    Head,
    Heads,
    HeldError,
    Opened,
    build_ack,
    read_ack,
)
from exchange.wire.crypto import sshsig
from exchange.wire.signed import unpack_signed
from exchange.wire.formats import (
    ACK_DETAILS_MEMBER,
    ACK_MEMBERS,
    MAX_ACK_DETAILS_FILE,
    MAX_MANIFEST_BYTES,
    SIG_NAMESPACE,
    EVENTS_TABLE,
    INNER_MANIFEST,
    ack_name,
    bundle_name,
    is_exchange_file,
    parse_name,
    stream_label,
)

log = logging.getLogger(__name__)


@dataclass
class FileOutcome:
    """What one import or ack step did with one file (``status``), and why."""

    file: str
    status: Outcome
    reason: str = ""
    peer: str = ""
    seq: int = 0
    parked: int = 0
    applied: dict[str, Any] = field(default_factory=dict)

    @property
    def lane(self) -> str:
        """The lane of the file's stream, from its name (which the signed manifest was checked against)."""
        try:
            return parse_name(self.file).lane
        except FormatError:
            return DEFAULT_LANE


#: Outcomes after which an ack waits in the outbox to go back to the sender.
ACKED = frozenset({Outcome.APPLIED, Outcome.DUPLICATE, Outcome.FAILED})


def wrote_acks(outcomes: Iterable[FileOutcome]) -> bool:
    """Whether any of ``outcomes`` left an ack in the outbox (push it back now)."""
    return any(o.status in ACKED for o in outcomes)


# ---------------------------------------------------------------- received rows

def _received(peer: str, lane: str, seq: int) -> Any:
    """The ``xchg_received`` row of bundle ``seq`` of ``peer``'s stream in ``lane``."""
    r = xchg_received.c
    return and_(r.peer == peer, r.lane == lane, r.seq == seq)


def _set_received(conn: Connection, peer: str, seq: int, lane: str = DEFAULT_LANE, **values: Any) -> None:
    if not conn.execute(update(xchg_received).where(_received(peer, lane, seq)).values(**values)).rowcount:
        values.setdefault("summary", "{}")
        values.setdefault("received_at", utc_now())
        conn.execute(xchg_received.insert().values(peer=peer, lane=lane, seq=seq, **values))


def _upsert_received(conn: Connection, peer: str, seq: int, lane: str = DEFAULT_LANE, **values: Any) -> None:
    """:func:`_set_received` with every required column given, as one statement on SQLite and PostgreSQL
    (a bundle's fixed cost: most arrive with no row yet, which took an UPDATE and then an INSERT)."""
    name = conn.dialect.name
    if name not in ("sqlite", "postgresql"):
        _set_received(conn, peer, seq, lane, **values)
        return
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as upsert
    else:
        from sqlalchemy.dialects.postgresql import insert as upsert  # type: ignore[assignment]
    ins = upsert(xchg_received).values(peer=peer, lane=lane, seq=seq, received_at=utc_now(), **values)
    conn.execute(ins.on_conflict_do_update(index_elements=["peer", "lane", "seq"], set_=values))


def _heads(conn: Connection, peer: str, received: tuple[int, str | None], lane: str = DEFAULT_LANE) -> Heads:
    """This node's position in both streams with ``peer`` in ``lane``, signed into the ack as evidence
    ``exchange audit verify`` checks the peer's archive against (docs/AUDIT.md)."""
    mine = and_(xchg_sent.c.peer == peer, xchg_sent.c.lane == lane)
    acked = select(func.max(xchg_sent.c.seq)).where(and_(
        mine, xchg_sent.c.status == SentStatus.PROCESSED)).scalar_subquery()
    last = conn.execute(select(xchg_sent.c.seq, xchg_sent.c.manifest_sha256, acked).where(mine)
                        .order_by(xchg_sent.c.seq.desc()).limit(1)).first()  # one statement per ack signed
    sent = Head(int(last[0]), last[1], int(last[2] or 0)) if last else Head(0, None, 0)
    return Heads(Head(received[0], received[1] if received[0] else None), sent)


#: Folders whose fsync an ``import_inbox`` run does once at its end, for all the acks it wrote (None: at once).
_dir_syncs: ContextVar[set[Path] | None] = ContextVar("exchange_ack_dir_syncs", default=None)


@contextmanager
def _ack_dirs_synced_at_end() -> Iterator[None]:
    """Acks written inside are renamed into the outbox without a folder fsync each; the folder is fsynced once
    at the end (also on an error). The ack's content is fsynced before its rename, and the bundle moves
    to the archive only after the ack is in place; if a power cut loses an ack's name, the signed ack is
    still in ``xchg_received``: the sender's resend (``resend_after``) is re-acknowledged from it."""
    if _dir_syncs.get() is not None:  # nested: the outer run syncs
        yield
        return
    token = _dir_syncs.set(set())
    try:
        yield
    finally:
        folders = _dir_syncs.get() or set()
        _dir_syncs.reset(token)
        for folder in sorted(folders):
            fsync_dir(folder)


def _write_ack(node: Node, ack: bytes, peer: str, seq: int, lane: str = DEFAULT_LANE) -> None:
    name = ack_name(node.id, peer, seq, lane)
    batch = _dir_syncs.get()
    try:
        write_file_atomic(node.cfg.outbox / name, ack, sync_dir=batch is None)
        if batch is not None:
            batch.add(node.cfg.outbox)
    except OSError as exc:  # a full disk: the ack is in the database, the next run writes it again
        raise ExchangeError(f"cannot write ack {name} in {node.cfg.outbox}: {exc.strerror or exc}",
                            hint="Free disk space there, then sync again: the bundle stays in the inbox "
                                 "and is acknowledged then (it is not applied twice).") from exc


# ---------------------------------------------------------------- import

def import_inbox(node: Node, *, retry: bool = False, reporter: Reporter | None = None,
                 rotate: int = 0, parked: bool = True, peer: str | None = None,
                 workers: int = 1) -> list[FileOutcome]:
    """Process every complete file in the inbox: acks, then bundles in stream order.

    ``retry`` tries FAILED bundles again; after a bundle applied, the parked
    documents are tried again unless ``parked`` is false (``exchange.receive.retry``
    does that itself, once). ``peer`` limits the run to that peer's files (a store's Retry).

    Each stream is taken under its lock (:func:`exchange.receive.locks.try_lock`); a
    stream another worker holds is skipped, so several workers can run this
    at once. ``rotate`` staggers where each worker starts (worker ``rotate`` of ``workers`` starts
    that share of the way through the streams). A database that
    cannot be used (full disk, unreachable) stops the run with a DatabaseError;
    the files stay in the inbox for the next run.
    """
    try:
        with system_pool(), _ack_dirs_synced_at_end():
            return _import_inbox(node, retry=retry, reporter=reporter, rotate=rotate, parked=parked,
                                 peer=peer, workers=workers)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"import stopped: {_error_text(exc)}",
                            hint="Free disk space for the database (or restore its connection), then sync "
                                 "again; the files wait in the inbox.") from exc


def _import_inbox(node: Node, *, retry: bool, reporter: Reporter | None, rotate: int,
                  parked: bool, peer: str | None = None, workers: int = 1) -> list[FileOutcome]:
    rep = reporter or NullReporter()
    restart.tidy(node)  # a store's forked bundles a crash left behind after a stream restart
    files = [p for p in node.cfg.inbox.iterdir() if is_exchange_file(p.name)
             and (peer is None or parse_name(p.name).a == peer)]
    streams: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
    for p in files:
        fn = parse_name(p.name)
        streams[(fn.kind, fn.a, fn.lane)].append(p)  # each lane is a stream of its own
    order = sorted(streams)
    if order and rotate:  # workers of import_parallel start evenly apart, not on neighbouring streams
        k = (rotate * len(order) // workers if 0 < rotate < workers else rotate) % len(order)
        order = order[k:] + order[:k]
    out: list[FileOutcome] = []
    total = sum(len(v) for v in streams.values())
    if total:
        rep.start("import", total)
    # heartbeats, then acks, then bundles
    for kind, peer, lane in sorted(order, key=lambda s: (s[0] != "heartbeat", s[0] != "ack")):
        if not any(os.path.lexists(p) for p in streams[(kind, peer, lane)]):  # another worker took them all meanwhile
            rep.advance(len(streams[(kind, peer, lane)]))
            continue
        with try_lock(node, f"{kind}-{peer}" + ("" if lane == DEFAULT_LANE else f"-{lane}")) as got:
            if not got:
                continue
            for p in sorted(streams[(kind, peer, lane)], key=lambda p: parse_name(p.name).seq):
                if kind == "heartbeat":
                    if os.path.lexists(p):
                        status, why = import_heartbeat(node, p, rep)
                        if status is not None:  # quarantined: reported like any file set aside
                            out.append(FileOutcome(p.name, status, why, peer))
                elif os.path.lexists(p):  # a dangling link too: set aside as what it is
                    out.append(handle_ack(node, p, reporter=rep) if kind == "ack"
                               else import_file(node, p, retry=retry, reporter=rep))
                rep.advance()
    if total:
        rep.finish()
    if any(o.status == Outcome.FAILED for o in out):  # a sender's notice that a FAILED bundle is superseded
        from exchange.receive.decisions import follow_supersede_notices  # (it imports this module)

        for s in follow_supersede_notices(node, out, rep):
            out += _import_inbox(node, retry=retry, reporter=reporter, rotate=0, parked=False, peer=s.peer)
    if parked and any(o.status == Outcome.APPLIED for o in out):
        with try_lock(node, "parked") as got:
            if got:
                retry_parked(node, orphaned=False)
    return out


def import_file(node: Node, path: Path, *, retry: bool = False, dry_run: bool = False,
                reporter: Reporter | None = None) -> FileOutcome:
    """Verify, place and (if next in its stream) apply one bundle."""
    with system_pool():
        return _import_file(node, path, retry=retry, dry_run=dry_run, reporter=reporter)


def _import_file(node: Node, path: Path, *, retry: bool, dry_run: bool, reporter: Reporter | None) -> FileOutcome:
    rep = reporter or NullReporter()
    try:
        fn = parse_name(path.name)
        if fn.kind != "bundle":
            raise FormatError(f"{path.name}: not a bundle")
        reader = BundleReader(path)
    except BundleError as exc:
        if not dry_run:
            quarantine(node, path, exc, rep)
        return FileOutcome(path.name, Outcome.QUARANTINED, str(exc))
    with reader:
        try:
            signer = reader.verify_signature(node.trust)
            reader.check_recipient(node.id)
            m = reader.manifest
            keys.check_current(node.trust, m.sender, signer.key)  # retired or revoked: refused whatever `created` says
            if (fn.a, fn.b, fn.seq, fn.lane) != (m.sender, m.recipient, m.seq, m.lane):
                raise FormatError(f"{path.name}: file name disagrees with the signed manifest "
                                  f"({bundle_name(m.sender, m.recipient, m.seq, m.lane)})")
            if m.sender not in node.cfg.peers:
                raise FormatError(f"{path.name}: sender {m.sender!r} is not a peer of this node")
            if m.lane not in node.catalog.lanes():  # never a stream of its own: it would wait for ever
                raise FormatError(f"{path.name}: lane {m.lane!r} is not a lane of this node's catalog "
                                  f"(lanes: {', '.join(node.catalog.lanes())})")
        except BundleError as exc:
            if not dry_run:
                quarantine(node, path, exc, rep)
            return FileOutcome(path.name, Outcome.QUARANTINED, str(exc))
        return _place(node, path, reader, retry=retry, dry_run=dry_run, rep=rep)


def _reack_other_copy(node: Node, path: Path, manifest_sha: str, file_sha: str, peer: str, seq: int, *,
                      dry_run: bool, rep: Reporter, lane: str = DEFAULT_LANE) -> FileOutcome:
    """A verified copy of a bundle applied from a copy with other unsigned bytes: acknowledge this copy.

    Since readers accept only the exact bytes the writer produces, two verified copies of one signed
    manifest are the same file. A store that applied an altered copy before that rule holds an ack naming
    the altered file's hash, which its sender refuses; the sender then resends the genuine file, which was
    quarantined as a replay for ever. The signed manifest is the same, so this is the bundle already
    applied: nothing is applied again, and a fresh ack names this copy, so the sender reaches PROCESSED.
    """
    note = "already applied from another copy of this signed bundle; this copy acknowledged"
    if dry_run:
        return FileOutcome(path.name, Outcome.DUPLICATE, "already applied from another copy of this signed "
                           "bundle; an import would acknowledge this copy", peer, seq)
    with node.engine.begin() as conn:
        begin_write(conn)
        ack = build_ack(key=rotation.signing_key_for(node, peer, conn), acker=node.id, sender=peer, seq=seq,
                        bundle_sha256=file_sha, lane=lane,
                        manifest_sha256=manifest_sha, result=AckResult.APPLIED, created=utc_now(),
                        recipients=node.recipients_for(peer),
                        heads=_heads(conn, peer, stream_pos(conn, peer, lane), lane))
        conn.execute(update(xchg_received).where(_received(peer, lane, seq))
                     .values(file_sha256=file_sha, ack=ack, reason=note))
    _write_ack(node, ack, peer, seq, lane)
    archive(node, path, "duplicates")
    rep.state(path.name, Outcome.DUPLICATE, note)
    return FileOutcome(path.name, Outcome.DUPLICATE, note, peer, seq)


def _reading(node: Node) -> Any:
    """A connection for reads that need no transaction of their own: on PostgreSQL in autocommit (no BEGIN
    and COMMIT round trips per bundle); elsewhere a transaction, as before."""
    if node.engine.dialect.name == "postgresql":
        return node.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    return node.engine.begin()


def _place(node: Node, path: Path, reader: BundleReader, *, retry: bool, dry_run: bool,
           rep: Reporter) -> FileOutcome:
    m = reader.manifest
    peer, seq, lane = m.sender, m.seq, m.lane
    stream = stream_label(peer, node.id, lane)
    file_sha = sha256_file(path)
    with _reading(node) as conn:
        last_seq, last_manifest = stream_pos(conn, peer, lane)
        known = conn.execute(select(xchg_received).where(_received(peer, lane, seq))).mappings().first()
    if seq <= last_seq:
        if known and known["file_sha256"] == file_sha and known["status"] == ReceivedStatus.APPLIED:
            if not dry_run:
                if known["ack"]:
                    _write_ack(node, known["ack"], peer, seq, lane)
                archive(node, path, "duplicates")
                rep.state(path.name, Outcome.DUPLICATE, "already applied; re-acknowledged")
            note = ("already applied; an import would acknowledge it again" if dry_run
                    else "already applied; re-acknowledged")
            return FileOutcome(path.name, Outcome.DUPLICATE, note, peer, seq)
        if known and known["file_sha256"] == file_sha and known["status"] == ReceivedStatus.SKIPPED:
            note = ("skipped by an operator's decision; " +  # exchange.receive.decisions
                    ("an import would send the decision again" if dry_run else "the decision re-sent"))
            if not dry_run:
                if known["ack"]:
                    _write_ack(node, known["ack"], peer, seq, lane)
                archive(node, path, "skipped")
                rep.state(path.name, Outcome.DUPLICATE, note)
            return FileOutcome(path.name, Outcome.DUPLICATE, note, peer, seq)
        if known and known["status"] == ReceivedStatus.APPLIED and known["manifest_sha256"] == m.sha256:
            return _reack_other_copy(node, path, m.sha256, file_sha, peer, seq, dry_run=dry_run, rep=rep, lane=lane)
        reason = (f"seq {seq} of stream {stream} was already applied from a different file "
                  f"(replay, rollback or fork); last applied seq is {last_seq}")
        if not dry_run:
            reason = _forked(node, peer, seq, reason, lane)
            quarantine(node, path, reason, rep)
        return FileOutcome(path.name, Outcome.QUARANTINED, reason, peer, seq)
    summary = "{}"
    try:
        reader.check_major()
    except HeldError as exc:
        if not dry_run:
            _record(node, peer, seq, path.name, file_sha, m.sha256, ReceivedStatus.HELD, str(exc), rep, lane=lane)
        return FileOutcome(path.name, Outcome.HELD, str(exc), peer, seq)
    restarts = restart.is_restart(m.prev, seq)  # a stream restarted by an operator (exchange.receive.restart)
    refused = restart.refusal(node, peer, lane) if restarts else None
    if refused is not None:
        if not dry_run:
            quarantine(node, path, refused, rep)
        return FileOutcome(path.name, Outcome.QUARANTINED, refused, peer, seq)
    if seq > last_seq + 1 and not restarts:
        reason = f"waiting for seq {last_seq + 1} of stream {stream}"
        if not dry_run:
            _record(node, peer, seq, path.name, file_sha, m.sha256, ReceivedStatus.WAITING, reason, rep, lane=lane)
        return FileOutcome(path.name, Outcome.WAITING, reason, peer, seq)
    if known and known["status"] == ReceivedStatus.FAILED and not retry and not dry_run:
        return FileOutcome(path.name, Outcome.FAILED, known["reason"] or "", peer, seq)
    if m.prev != last_manifest and not restarts:
        reason = (f"hash chain broken: bundle's previous-manifest hash {m.prev} is not the last "
                  f"applied manifest {last_manifest} of stream {stream}")
        if not dry_run:
            reason = _forked(node, peer, seq, reason, lane)
            quarantine(node, path, reason, rep)
        return FileOutcome(path.name, Outcome.QUARANTINED, reason, peer, seq)
    node.cfg.work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".open-", dir=node.cfg.work))
    try:
        try:
            opened = reader.decrypt(node.identities, tmp)
            crashpoint("import.decrypted")
            documents = _documents(opened)
        except OSError as exc:  # the local disk (full, unwritable): not the bundle's fault; next run retries
            raise ExchangeError(f"{path.name}: cannot decrypt into {node.cfg.work}: {exc.strerror or exc}",
                                hint="Free disk space on the node, then sync again.") from exc
        except ExchangeError as exc:
            if not dry_run:
                quarantine(node, path, exc, rep)
            return FileOutcome(path.name, Outcome.QUARANTINED, str(exc), peer, seq)
        summary = json.dumps({t: v.get("count", 0) + v.get("deletes", 0) for t, v in documents.items()})
        return _apply_bundle(node, path, opened, summary, dry_run=dry_run, rep=rep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _forked(node: Node, peer: str, seq: int, reason: str, lane: str) -> str:
    """A bundle that forks its stream: the evidence recorded (a peer gone back in time), the repair named."""
    with node.engine.begin() as conn:
        superseded = restart.superseding_restart(conn, node, peer, seq, lane)
        if superseded is not None:  # sealed before the restart at seq `superseded` re-based the streams
            return f"{reason}; superseded by the stream restart at seq {superseded}"
        if restart.before_retained(conn, peer, lane, seq):  # its record went with `archive prune`: no evidence
            return (f"{reason}; this node's record of seq {seq} was purged by `archive prune` (older than the "
                    "retention): most likely an old bundle delivered again")
        if node.cfg.role == "ho" and node.cfg.peer(peer).role == "store":  # a store gone back in time
            restart.note_regress(conn, node, peer, f"its bundle seq {seq} differs from the one applied here")
        restart.note_ho_went_back(conn, node, peer, seq, lane)  # at a store: its HO restored from a backup
    return restart.fork_reason(node, peer, reason)


def _record(node: Node, peer: str, seq: int, name: str, file_sha: str, manifest_sha: str,
            status: ReceivedStatus, reason: str, rep: Reporter, summary: str | None = None,
            ack: bytes | None = None, lane: str = DEFAULT_LANE) -> None:
    values: dict[str, Any] = dict(file_name=name, file_sha256=file_sha, manifest_sha256=manifest_sha,
                                  status=status, reason=reason)
    if summary is not None:
        values["summary"] = summary
    if ack is not None:
        values["ack"] = ack
    with node.engine.begin() as conn:
        old = conn.execute(select(xchg_received.c.status, xchg_received.c.reason).where(
            _received(peer, lane, seq))).first()
        _set_received(conn, peer, seq, lane, **values)
    if old is None or tuple(old) != (status, reason):
        rep.state(name, status, reason)


def _apply_bundle(node: Node, path: Path, opened: Opened, summary: str, *, dry_run: bool,
                  rep: Reporter) -> FileOutcome:
    m = opened.manifest
    peer, seq, lane = m.sender, m.seq, m.lane
    try:
        with node.engine.begin() as conn:
            begin_write(conn)
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                     (f"xchg:{peer}" + ("" if lane == DEFAULT_LANE else f":{lane}"),))
            last_seq, _ = stream_pos(conn, peer, lane, lock=True)
            if last_seq >= seq:  # applied meanwhile by another worker
                return FileOutcome(path.name, Outcome.DUPLICATE, "applied by another worker", peer, seq)
            notice = rotation.carried_notice(opened.summary, peer, opened.signer.key)  # the sender's new keys
            moves = restart.on_apply(conn, node, peer, seq, m.prev, opened.summary, lane)  # a restart; a restored point
            with suppress_capture(conn):
                applied, parked = apply_documents(conn, node, peer, seq, opened, lane=lane)
            crashpoint("import.applied")
            if dry_run:
                conn.rollback()
                return FileOutcome(path.name, Outcome.APPLIED, "dry run: nothing changed", peer, seq,
                               len(parked), applied)
            if notice is not None:  # trusted before the commit: a crash after it re-applies nothing
                rotation.accept(node, notice)
            now = utc_now()
            ack = build_ack(key=rotation.signing_key_for(node, peer, conn), acker=node.id, sender=peer, seq=seq,
                            bundle_sha256=opened.file_sha256, manifest_sha256=m.sha256, lane=lane,
                            result=AckResult.APPLIED, applied=applied, parked=parked, created=now,
                            recipients=node.recipients_for(peer), heads=_heads(conn, peer, (seq, m.sha256), lane))
            set_stream_pos(conn, peer, lane, seq, m.sha256)  # (an UPDATE; the stream's first bundle: an INSERT)
            reason = f"{counted(len(parked), 'document')} parked" if parked else None
            _upsert_received(conn, peer, seq, lane, file_name=path.name, file_sha256=opened.file_sha256,
                             manifest_sha256=m.sha256, status=ReceivedStatus.APPLIED, summary=summary,
                             applied_at=now, reason=reason, ack=ack)
    except BundleError as exc:  # malformed content found while applying (rolled back): set aside
        if not dry_run:
            quarantine(node, path, exc, rep)
        return FileOutcome(path.name, Outcome.QUARANTINED, str(exc), peer, seq)
    except SchemaChangeError as exc:  # not additive (exchange.receive.evolution): rolled back, HELD, no ack;
        # applied at a later import once this node's schema has the sender's (exchange retry)
        if not dry_run:
            _record(node, peer, seq, path.name, opened.file_sha256, m.sha256, ReceivedStatus.HELD, exc.message,
                    rep, summary, lane=lane)
            with node.engine.begin() as conn:  # `exchange catalog diff` shows what the held bundle needs
                evolution.record_peer_catalog(conn, peer, seq, evolution.parse_catalog(opened.catalog))
        return FileOutcome(path.name, Outcome.HELD, exc.message, peer, seq)
    except (ApplyError, SQLAlchemyError) as exc:
        if isinstance(exc, SQLAlchemyError) and database_unusable(exc):  # the database itself (disk full,
            # I/O error, connection lost), not the bundle: no FAILED, no REJECTED ack; the next run applies it
            raise DatabaseError(f"{path.name} not applied: {_error_text(exc)}",
                                hint="Free disk space for the database (or restore its connection), then sync "
                                     "again; the bundle waits in the inbox.") from exc
        reason = exc.message if isinstance(exc, ApplyError) else \
            f"the database refused the bundle: {_error_text(root_error(exc))}"
        if dry_run:
            return FileOutcome(path.name, Outcome.FAILED, reason, peer, seq)
        try:
            with node.engine.connect() as conn:
                heads: Heads | None = _heads(conn, peer, stream_pos(conn, peer, lane), lane)
        except SQLAlchemyError:  # the database failed: an ack without heads claims nothing, still signed
            heads = None
        ack = build_ack(key=rotation.signing_key_for(node, peer), acker=node.id, sender=peer, seq=seq,
                        bundle_sha256=opened.file_sha256, manifest_sha256=m.sha256, lane=lane,
                        result=AckResult.REJECTED, reason=reason, recipients=node.recipients_for(peer), heads=heads)
        try:
            _record(node, peer, seq, path.name, opened.file_sha256, m.sha256, ReceivedStatus.FAILED, reason,
                    rep, summary, ack, lane=lane)
        except SQLAlchemyError as db_exc:
            raise DatabaseError(f"cannot record failure of {path.name}: {db_exc}") from db_exc
        _write_ack(node, ack, peer, seq, lane)
        return FileOutcome(path.name, Outcome.FAILED, reason, peer, seq)
    crashpoint("import.committed")
    _write_ack(node, ack, peer, seq, lane)
    crashpoint("import.acked")
    archive(node, path)
    moves.run(node)
    rep.state(path.name, Outcome.APPLIED, reason or "")
    return FileOutcome(path.name, Outcome.APPLIED, reason or "", peer, seq, len(parked), applied)


# ---------------------------------------------------------------- apply

def _index(data: pa.Table, key_cols: tuple[str, ...]) -> dict[str, list[int]]:
    idx: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(rows.row_keys(data, key_cols)):
        idx[k].append(i)
    return idx


def _take(data: pa.Table, indices: list[int]) -> pa.Table:
    """Rows by position; typed indices, so an empty selection (deletes only, all stale) works."""
    return data.take(pa.array(indices, type=pa.int64()))


def _stored_versions(conn: Connection, peer: str, doc_type: str, keys: list[str]) -> dict[str, int]:
    """The versions last applied from ``peer`` (or recorded before versions were kept per sender)."""
    out: dict[str, int] = {}
    peers = (peer, LEGACY_PEER)
    if len(keys) > rows.CHUNK and conn.dialect.name == "sqlite":
        # the keys as one JSON parameter, the outer loop (CROSS JOIN): one index seek per key and peer.
        # A join with a key table let SQLite scan that table once per stored version: quadratic, 11 s
        # of a 22,000-bill bundle into a full HO
        found = conn.exec_driver_sql(
            "SELECT v.doc_key, v.version FROM json_each(?) AS t CROSS JOIN xchg_doc_version AS v "
            "ON v.peer IN (?, ?) AND v.doc_type = ? AND v.doc_key = t.value",
            (json.dumps(keys), *peers, doc_type)).all()
    elif len(keys) > rows.CHUNK and conn.dialect.name == "postgresql":
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        with rows.text_key_table(conn, keys) as kt:
            found = conn.exec_driver_sql(
                f"SELECT v.doc_key, v.version FROM xchg_doc_version v JOIN {kt} t ON v.doc_key = t.k "
                f"WHERE v.doc_type = {mark} AND v.peer IN ({mark}, {mark})", (doc_type, *peers)).all()
    else:
        v = xchg_doc_version.c
        found = [r for i in range(0, len(keys), rows.CHUNK) for r in conn.execute(
            select(v.doc_key, v.version).where(and_(v.doc_type == doc_type, v.peer.in_(peers),
                                                    v.doc_key.in_(keys[i:i + rows.CHUNK]))))]
    for k, version in found:
        out[k] = max(int(version), out.get(k, -1))
    return out


#: ``xchg_doc_version.peer`` of versions recorded before they were kept per sender (migration 5).
LEGACY_PEER = ""


def _set_versions(conn: Connection, peer: str, doc_type: str, versions: dict[str, int]) -> None:
    """Record the versions applied from ``peer``, in bulk (one upsert; COPY on PostgreSQL)."""
    if versions and conn.dialect.name == "postgresql" and len(versions) <= rows.SMALL_PG:
        # a few versions: one statement, not a staging table's five round trips (fixed cost per bundle)
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        ins = pg_insert(xchg_doc_version).values([
            {"peer": peer, "doc_type": doc_type, "doc_key": k, "version": v} for k, v in versions.items()])
        conn.execute(ins.on_conflict_do_update(index_elements=["peer", "doc_type", "doc_key"],
                                               set_={"version": ins.excluded.version}))
    elif versions:
        rows.upsert_rows(conn, xchg_doc_version, pa.table({
            "peer": pa.array([peer] * len(versions), pa.string()),
            "doc_type": pa.array([doc_type] * len(versions), pa.string()),
            "doc_key": pa.array(list(versions), pa.string()),
            "version": pa.array(list(versions.values()), pa.int64())}))


def _references(conn: Connection, node: Node, dt: DocType, data: dict[str, pa.Table],
                keys: Sequence[DocKey]) -> tuple[set[str], frozenset[str]]:
    """(documents of ``keys`` naming a row the database lacks, tables to write without foreign-key triggers).

    PostgreSQL only (:mod:`exchange.database.references`); ``[import] reference_check = "exchange"``
    locks the rows found and names the tables that allow it.
    """
    if conn.dialect.name != "postgresql" or not keys:
        return set(), frozenset()
    by_exchange = references.setting(node.cfg.extra.get("import")) == references.BY_EXCHANGE
    tables = {t: node.catalog.table(t) for t in dt.tables() if t in data}
    bad = references.missing(conn, tables, dt.tables(), dt.key, data, lock=by_exchange) & set(keys)
    if not by_exchange:
        return bad, frozenset()
    whole = [t for n, t in tables.items()  # a foreign key column the bundle leaves out: the database checks
             if all(e.parent.name in data[n].column_names for fk in t.foreign_key_constraints for e in fk.elements)]
    return bad, frozenset(references.unchecked_tables(conn, whole))


def _write_docs(conn: Connection, node: Node, dt: DocType, keys: Sequence[DocKey],
                data: dict[str, pa.Table], held: bool = True, unchecked: frozenset[str] = frozenset()) -> None:
    """Replace documents as units: children are replaced, the header is upserted.

    The header is updated in place rather than deleted, so rows of other
    documents that reference it (a sale naming an item) stay valid. A document
    absent from ``data``'s header table (a delete) loses its header too. On
    PostgreSQL and SQLite children are updated in place as well, and only the rows a
    document no longer has are deleted (:func:`exchange.database.rows.replaces_in_place`),
    unless ``held`` is false (none of ``keys`` was applied here before): then a
    plain insert is cheaper than staging (an empty HO's first load).
    """
    cat = node.catalog
    for tname, table in data.items():  # before anything is written: an offset no zone has parks the document
        zone_offsets.check(tname, table)
    header = data.get(dt.header)
    present = set(rows.row_keys(header, dt.key)) if header is not None else set()
    gone = [k for k in keys if k not in present]
    kept = [k for k in keys if k in present]
    staged: dict[str, tuple[str, list[str]]] = {}
    for tname in reversed(dt.children):  # children first (they may reference the header)
        table = cat.table(tname)
        if held and tname in data and rows.replaces_in_place(conn, table, dt.key):
            rows.delete_docs(conn, table, dt.key, gone)
            staged[tname] = rows.prune_docs(conn, table, dt.key, kept, data[tname],
                                            None if header is None else header.select(list(dt.key)))
        else:
            rows.delete_docs(conn, table, dt.key, keys)
    if gone:
        rows.delete_docs(conn, cat.table(dt.header), dt.key, gone)
    if header is not None:
        with references.triggers_off(conn, dt.header in unchecked):
            rows.upsert_rows(conn, cat.table(dt.header), header)
    for tname in dt.children:
        with references.triggers_off(conn, tname in unchecked and tname in data):
            if tname in staged:
                rows.upsert_staged(conn, cat.table(tname), staged[tname])
            elif tname in data:
                rows.insert_rows(conn, cat.table(tname), data[tname])


def _error_text(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {orig or exc}".splitlines()[0][:500]


def _park(conn: Connection, dt: DocType, key: DocKey, peer: str, seq: int, version: int, op: str,
          data: dict[str, pa.Table], error: str, state: ParkedState = ParkedState.RETRYING) -> None:
    cond = and_(xchg_parked.c.doc_type == dt.name, xchg_parked.c.doc_key == key)
    conn.execute(delete(xchg_parked).where(cond))
    conn.execute(xchg_parked.insert().values(
        doc_type=dt.name, doc_key=key, peer=peer, seq=seq, version=version, op=op,
        data=rows.pack_tables(data), error=error, parked_at=utc_now(), state=state))


def _documents(opened: evolution.Payload) -> dict[str, dict[str, Any]]:
    """The inner manifest's ``summary.documents``; a malformed one is a FormatError."""
    docs = opened.summary.get("documents", {})
    if not isinstance(docs, dict) or not all(
            isinstance(v, dict) and all(type(v.get(k, 0)) is int for k in ("count", "deletes"))
            for v in docs.values()):
        raise FormatError(f"{INNER_MANIFEST}: summary.documents is not an object of "
                          "{{doc_type: {{count, deletes, rows, totals}}}}")
    return docs


def _events(opened: evolution.Payload) -> dict[str, list[Any]]:
    """The ``_events`` table, checked against docs/FORMAT.md (columns, types, no nulls, ops)."""
    if EVENTS_TABLE not in opened.tables:
        raise FormatError(f"the bundle has no {EVENTS_TABLE} table")
    table = opened.table(EVENTS_TABLE)
    want = {f.name: f.type for f in EVENTS_SCHEMA}
    if len(table.schema) != len(want) or {f.name: f.type for f in table.schema} != want \
            or any(table.column(c).null_count for c in want):
        raise FormatError(f"{EVENTS_TABLE} table: columns {table.schema.names} do not match "
                          f"{list(want)} ({', '.join(str(t) for t in want.values())}, no nulls)")
    events: dict[str, list[Any]] = table.to_pydict()
    if not set(events["op"]) <= {"U", "D"}:
        raise FormatError(f"{EVENTS_TABLE} table: op must be U or D")
    return events


def _check_keys(node: Node, dt: DocType, keys: Sequence[DocKey]) -> None:
    """Every document key is canonical text of the document type's key columns."""
    header = node.catalog.table(dt.header)
    for k in rows.unchecked_keys(header, dt.key, keys):  # the plain ones are checked as whole columns
        try:
            values = rows.parse_key(k)
            rows.typed_key(header, dt.key, values)
            ok = rows.canonical_key(values) == k
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise FormatError(f"{EVENTS_TABLE} table: {dt.name} key {k[:80]!r} is not a key of "
                              f"{dt.header} ({', '.join(dt.key)})")


def _flat(value: Any, prefix: str = "", depth: int = 0) -> dict[str, str]:
    """Nested totals as ``name -> text`` (``rows sales_bill_line``, ``item.price``); a peer's odd shape stays text."""
    if isinstance(value, dict) and depth < 2:
        out: dict[str, str] = {}
        for k, v in list(value.items())[:200]:
            out.update(_flat(v, f"{prefix} {k}" if prefix else str(k), depth + 1))
        return out
    return {prefix: str(value)[:80]}


def total_differences(got: dict[str, Any], want: Any) -> str:
    """What differs between the control totals received and the manifest's, as a readable list
    (``count 3, manifest says 4; rows item_barcode 5, manifest says 6``), at most five."""
    mine = _flat({k: got[k] for k in ("count", "rows", "totals")})
    theirs = _flat({k: want.get(k) for k in ("count", "rows", "totals")} if isinstance(want, dict) else {})
    diffs = [f"{k} {mine.get(k, 'none')}, manifest says {theirs.get(k, 'none')}"
             for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    return "; ".join(diffs[:5]) + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else "")


def apply_documents(conn: Connection, node: Node, peer: str, seq: int, opened: evolution.Payload,
                    replay: bool = True, lane: str | None = None) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Apply a bundle's documents; bad ones are parked. Returns (applied summary, parked).

    ``lane``: the bundle's lane; every document type it carries must travel in that lane
    (:func:`exchange.receive.admission.check_lane`), else nothing is applied (quarantined).

    First (unless ``replay`` is false) what was kept aside for columns and document types this node
    has gained since, so a newer bundle's values always land after them (exchange.receive.evolution).
    """
    cat = node.catalog
    sender_role = node.cfg.peer(peer).role
    events = _events(opened)
    docs: dict[str, list[tuple[DocKey, str, int]]] = defaultdict(list)
    for t, k, op, v in zip(events["doc_type"], events["doc_key"], events["op"], events["version"], strict=True):
        docs[t].append((k, op, v))
    del events  # its columns as Python lists (a type's name per row): 3 MiB of a bundle's peak, held for nothing
    expected = _documents(opened)
    peer_cat = evolution.parse_catalog(opened.catalog)  # FORMAT.md v3; None from older senders
    if lane is not None:  # before anything else: a bundle carries its lane's types only
        admission.check_lane(cat, peer_cat.docs if peer_cat is not None else None, lane, list(docs))
    if replay and conn.execute(select(xchg_kept.c.peer).limit(1)).first():  # one probe when nothing is kept
        evolution.replay_kept(conn, cat)  # values kept for columns this node has since gained: before newer ones
        replay_kept_documents(conn, node)
    unknown = [t for t in docs if t not in cat]
    kept_tables: set[str] = set()
    kept_docs: dict[str, int] = {}
    if unknown:  # a new document type at the sender: kept aside whole until this node's catalog has it
        kept_tables, kept_docs = evolution.keep_doc_types(conn, cat, peer, seq, opened, peer_cat, unknown)
        docs = defaultdict(list, {t: v for t, v in docs.items() if t not in kept_docs})
    for doc_type in docs:  # before anything is read or written: who may write what (exchange.receive.admission)
        dt = cat.get(doc_type)
        if dt.owner != sender_role and not (dt.both_sides and sender_role == "ho"):  # the HO edits both-sides types
            raise OwnershipError(f"{doc_type} documents are owned by the {dt.owner} side; "
                                 f"{peer} ({sender_role}) may not send them: nothing of the bundle was applied")
    rest = [t for t in opened.tables if t not in kept_tables]
    new_children = children.new_tables(cat, peer_cat, rest, docs)  # a child table this node lacks: kept aside
    admission.check_tables_announced(cat, [t for t in rest if t not in new_children], docs)
    evolution.check_schemas(cat, peer_cat, [n for n in cat.names if n in docs], opened)  # HELD if not additive
    evolution.record_peer_catalog(conn, peer, seq, peer_cat)
    bases = conflicts.read_bases(opened, cat, docs)
    applied: dict[str, Any] = {t: {"kept": n} for t, n in kept_docs.items()}
    parked: list[dict[str, str]] = []
    for doc_type in [n for n in cat.names if n in docs]:
        dt = cat.get(doc_type)
        _check_keys(node, dt, [k for k, _o, _v in docs[doc_type]])
        split = {t: evolution.split_table(cat, peer_cat, dt, t, opened.table(t)) for t in dt.tables()
                 if t in opened.tables}  # columns this node does not have yet are kept aside
        data = {t: split[t][0] for t in split}
        extra = children.read(opened, dt, [t for t, d in new_children.items() if d == doc_type])
        admission.check_rows_announced(dt, {**data, **extra}, {k for k, op, _v in docs[doc_type] if op == "U"})
        admission.check_owner(conn, cat, dt, peer, docs[doc_type], data.get(dt.header),
                              owner=node.id if sender_role == "ho" else None)
        upserts = sum(1 for _k, op, _v in docs[doc_type] if op == "U")
        got = control_totals(dt, data, upserts)
        want = expected.get(doc_type, {})
        children.count(got, extra, want)
        if {k: got[k] for k in ("count", "rows", "totals")} != {k: want.get(k) for k in ("count", "rows", "totals")}:
            raise ApplyError(f"control totals of {doc_type} do not match the manifest: "
                             f"{total_differences(got, want)}")
        stored = _stored_versions(conn, peer, doc_type, [k for k, _o, _v in docs[doc_type]])
        fresh = [(k, op, v) for k, op, v in docs[doc_type] if stored.get(k, -1) <= v]
        if sender_role == "store" and dt.owner == "store":  # a restored store reusing keys of its lost days
            restart.keep_lost(conn, node, peer, seq, dt, fresh, stored, data)
        stale = len(docs[doc_type]) - len(fresh)
        seen: dict[str, int] = {}
        n_conflicts = 0
        if dt.both_sides:  # a change concurrent with one made here: decided by policy (exchange.receive.conflicts)
            fresh, seen, n_conflicts = conflicts.decide(conn, cat, dt, peer, sender_role, seq, fresh, data,
                                                        bases.get(doc_type, {}))
            _set_versions(conn, peer, doc_type, seen)
        kept_out = len(docs[doc_type]) - stale - len(fresh)
        keys = [k for k, _o, _v in fresh]
        index: dict[str, dict[str, list[int]]] = {}
        n_parked = 0
        # documents naming a row this database lacks (a bill's unknown item), found set-based: the rest
        # is written in bulk, those one by one below, where the database's own check parks them
        bad, unchecked = _references(conn, node, dt, data, keys)
        bad |= zone_offsets.refused_documents(data, dt.key) & set(keys)  # a local offset no zone has
        one_by_one = [(k, op, v) for k, op, v in fresh if k in bad]
        try:
            with conn.begin_nested():
                sub = data
                if stale or kept_out or bad:  # leave out the rows of documents we hold newer (or keep by policy)
                    index = {t: _index(tab, dt.key) for t, tab in data.items()}
                    wanted = set(keys) - bad
                    sub = {t: _take(tab, [i for k, ids in index[t].items() if k in wanted for i in ids])
                           for t, tab in data.items()}
                bulk = [k for k in keys if k not in bad]
                _write_docs(conn, node, dt, bulk, sub, held=any(k in stored for k in bulk), unchecked=unchecked)
                _set_versions(conn, peer, doc_type, {k: v for k, _o, v in fresh if k not in bad})
                tombstones.mark_deleted(conn, peer, doc_type, [k for k, o, _v in fresh if o == "D" and k not in bad],
                                        lane=lane or dt.lane, seq=seq)
        except StatementError as exc:
            if database_unusable(exc):
                raise  # the database's problem (disk full), not this document's: nothing to park
            _check_alive(conn, exc)
            one_by_one = fresh
        if one_by_one:
            index = index or {t: _index(tab, dt.key) for t, tab in data.items()}
            for k, op, v in one_by_one:  # one by one: park what fails, apply the rest
                one = {t: _take(tab, index[t].get(k, [])) for t, tab in data.items()}
                try:
                    with conn.begin_nested():
                        _write_docs(conn, node, dt, [k], one, held=k in stored)
                        _set_versions(conn, peer, doc_type, {k: v})
                        tombstones.mark_deleted(conn, peer, doc_type, [k] if op == "D" else [], lane=lane or dt.lane,
                                                seq=seq)
                except StatementError as exc:
                    if database_unusable(exc):
                        raise
                    _check_alive(conn, exc)
                    err = _error_text(exc)
                    why = deleted_dependency(conn, node.catalog, one, node.cfg.role)
                    err = f"{why}: {err}" if why else err
                    _park(conn, dt, k, peer, seq, v, op, one, err,
                          ParkedState.ORPHANED if why else ParkedState.RETRYING)
                    parked.append({"doc_type": doc_type, "doc_key": k, "error": err})
                    n_parked += 1
        kept = sum(evolution.keep(conn, peer, seq, dt, t, split[t][1], set(keys)) for t in data if split[t][1])
        if extra:  # a parked document's rows too: written once it applies (children.replay after a retry)
            kept += children.keep(conn, peer, seq, dt, extra, {k: v for k, op, v in fresh if op == "U"})
        done = got["totals"]
        if stale or n_parked or kept_out:  # the ack reports what was applied, not what was sent
            applied_keys = {k for k, _o, _v in fresh} - {p["doc_key"] for p in parked if p["doc_type"] == doc_type}
            index = index or {t: _index(tab, dt.key) for t, tab in data.items()}
            done = control_totals(dt, {t: _take(tab, [i for k, ids in index[t].items() if k in applied_keys
                                                      for i in ids])
                                       for t, tab in data.items()}, 0)["totals"]
            if extra:
                done |= children.totals({t: _take(tab, [i for k, ids in _index(tab, dt.key).items()
                                                         if k in applied_keys for i in ids])
                                         for t, tab in extra.items()}, want)
        applied[doc_type] = {"applied": len(fresh) - n_parked, "parked": n_parked, "stale": stale,
                             "totals": done} | ({"kept": kept} if kept else {}) \
            | ({"conflicts": n_conflicts} if n_conflicts else {})
    return applied, parked


def _check_alive(conn: Connection, exc: StatementError) -> None:
    """A database that ended the whole transaction (a trigger's RAISE(ROLLBACK)) rolled back what was
    applied before: nothing of the bundle may be committed, it is FAILED with the database's reason."""
    if transaction_lost(conn):
        raise ApplyError(f"the database rolled back the whole transaction: {_error_text(root_error(exc))}",
                         hint="A trigger or rule of this database refuses the bundle: fix it, then run "
                              "`exchange retry`; or skip the bundle (`exchange bundle skip`, docs/OPERATIONS.md)."
                         ) from exc


def replay_kept_documents(conn: Connection, node: Node) -> int:
    """Apply the documents kept aside of types this node's catalog has gained since (oldest bundle first),
    each with every check of a bundle; one that still cannot be applied stays kept (and logged)."""
    n = children.replay(conn, node.catalog, _stored_versions)  # rows of child tables this node has gained
    for part in evolution.kept_documents(conn, node.catalog):
        try:
            with conn.begin_nested():
                apply_documents(conn, node, part.peer, part.seq, part, replay=False)
                evolution.forget_documents(conn, part)
            n += 1
        except ApplyError as exc:  # e.g. the type belongs to the other side here: refused, kept, reported
            log.warning("kept %s documents from %s seq %d still not applied: %s", part.doc_type, part.peer,
                        part.seq, exc)
            evolution.refused_documents(conn, part, f"not applied: {exc.message}")
    return n


def retry_parked(node: Node, peer: str | None = None, *, orphaned: bool = True) -> tuple[int, int]:
    """Try every parked document (of ``peer`` only, if given) again; returns (applied, still parked).

    One that fails again because a document it refers to was deleted at its source is
    ORPHANED (:mod:`exchange.receive.orphans`); the automatic retries (after an import, the
    service's timer) leave those out (``orphaned`` false), ``exchange retry`` tries them too.
    """
    ok = still = 0
    cleared: set[tuple[str, str, int]] = set()  # bundles (peer, lane, seq) some of whose parked documents applied now
    only = select(xchg_parked) if peer is None else select(xchg_parked).where(xchg_parked.c.peer == peer)
    if not orphaned:
        only = only.where(xchg_parked.c.state != ParkedState.ORPHANED)
    with node.engine.begin() as conn, suppress_capture(conn):
        todo = conn.execute(only).mappings().all()
        for r in todo:
            dt = node.catalog.get(r["doc_type"])
            key = r["doc_key"]
            cond = and_(xchg_parked.c.doc_type == dt.name, xchg_parked.c.doc_key == key)
            stored = _stored_versions(conn, r["peer"], dt.name, [key]).get(key, -1)
            if stored > r["version"]:
                conn.execute(delete(xchg_parked).where(cond))
                cleared.add((r["peer"], dt.lane, int(r["seq"])))
                continue
            try:
                with conn.begin_nested():
                    parked = rows.unpack_tables(r["data"])  # parked before `exchange migrate`: times as here now
                    parked = {t: rows.with_zones(d, rows.arrow_schema(node.catalog.table(t))) if t in
                              node.catalog.metadata.tables else d for t, d in parked.items()}
                    _write_docs(conn, node, dt, [key], parked)
                    _set_versions(conn, r["peer"], dt.name, {key: r["version"]})
                    tombstones.mark_deleted(conn, r["peer"], dt.name, [key] if r["op"] == "D" else [], lane=dt.lane,
                                            seq=int(r["seq"]))
                    conn.execute(delete(xchg_parked).where(cond))
                ok += 1
                cleared.add((r["peer"], dt.lane, int(r["seq"])))
                log.info("parked %s %s applied on retry", dt.name, key)
            except StatementError as exc:
                if transaction_lost(conn):  # the database rolled everything back: nothing more this pass
                    log.warning("parked retry stopped: %s", _error_text(root_error(exc)))
                    return 0, len(todo)
                data = rows.unpack_tables(r["data"])
                why = deleted_dependency(conn, node.catalog, data, node.cfg.role)
                conn.execute(update(xchg_parked).where(cond).values(
                    attempts=xchg_parked.c.attempts + 1,
                    error=f"{why}: {_error_text(exc)}" if why else _error_text(exc),
                    state=ParkedState.ORPHANED if why else ParkedState.RETRYING))
                if why:
                    log.warning("parked %s %s %s", dt.name, key, why, extra={"peer": r["peer"], "seq": r["seq"]})
                still += 1
        if ok:  # values and child rows this node gained columns and tables for, kept for documents parked till now
            evolution.replay_kept(conn, node.catalog)
            children.replay(conn, node.catalog, _stored_versions)
        _recount_parked(conn, node, cleared)
    return ok, still


def _recount_parked(conn: Connection, node: Node, bundles: set[tuple[str, str, int]]) -> None:
    """The reason of an APPLIED bundle counts its parked documents: once some apply on retry it says how
    many are left, and nothing once none is (a stale "1 documents parked" would send people looking).
    A parked document's bundle is the one of its type's lane with its seq."""
    for peer, lane, seq in sorted(bundles):
        mine = and_(xchg_parked.c.peer == peer, xchg_parked.c.seq == seq)
        in_lane = lanes.condition(xchg_parked.c.doc_type, lanes.lane_types(node.catalog, lane))
        left = int(conn.execute(select(func.count()).select_from(xchg_parked).where(
            mine if in_lane is None else and_(mine, in_lane))).scalar() or 0)
        conn.execute(update(xchg_received).where(
            _received(peer, lane, seq), xchg_received.c.status == ReceivedStatus.APPLIED).values(
            reason=f"{left} documents parked" if left else None))


# ---------------------------------------------------------------- acks (sender side)

def _ack_signer(path: Path) -> Any:
    """The key that signed an ack (:func:`read_ack` checked it was trusted at the ack's ``created``)."""
    u = unpack_signed(path, ACK_MEMBERS, MAX_MANIFEST_BYTES, "ack", (ACK_DETAILS_MEMBER, MAX_ACK_DETAILS_FILE))
    return sshsig.verify(u.sig, u.raw, SIG_NAMESPACE)


def handle_ack(node: Node, path: Path, *, reporter: Reporter | None = None) -> FileOutcome:
    """Move a sent bundle to PROCESSED or REJECTED from a verified ack."""
    rep = reporter or NullReporter()
    try:
        ack = read_ack(path, node.trust, me=node.id, identities=node.identities)
        keys.check_current(node.trust, ack.acker, _ack_signer(path))  # retired or revoked: whatever `created` says
        fn = parse_name(path.name)
        if (fn.a, fn.b, fn.seq, fn.lane) != (ack.acker, ack.sender, ack.seq, ack.lane):
            raise FormatError(f"{path.name}: file name disagrees with the signed ack")
    except BundleError as exc:
        quarantine(node, path, exc, rep)
        return FileOutcome(path.name, Outcome.QUARANTINED, str(exc))
    this = and_(xchg_sent.c.peer == ack.acker, xchg_sent.c.lane == ack.lane, xchg_sent.c.seq == ack.seq)
    with node.engine.begin() as conn:
        sent = conn.execute(select(xchg_sent).where(this)).mappings().first()
        if sent is None:
            reason = (f"ack for bundle {ack.seq} to {ack.acker}"
                      + ("" if ack.lane == DEFAULT_LANE else f" in lane {ack.lane}") + ", which this node never sent")
        elif sent["file_sha256"] != ack.bundle_sha256:
            reason = (f"ack names file SHA-256 {ack.bundle_sha256[:16]}..., but the bundle sent was "
                      f"{sent['file_sha256'][:16]}...: the peer received a different file")
        else:
            reason = ""
        if reason:
            if sent is not None:
                conn.execute(update(xchg_sent).where(this).values(reason=reason))
        else:
            status = SentStatus.PROCESSED if ack.result == AckResult.APPLIED else SentStatus.REJECTED
            note = ack.reason or (f"{counted(ack.parked_total, 'document')} parked at {ack.acker}" if ack.parked_total
                                  else _sealed_note(ack))
            assert sent is not None
            if ack.heads is not None:  # signed positions that cannot happen in order: a node went back in time
                restart.check_heads(conn, node, ack.acker, (ack.heads.received_from_you.seq,
                                    ack.heads.received_from_you.manifest_sha256),
                                    (ack.heads.sent_to_you.seq, ack.heads.sent_to_you.manifest_sha256,
                                     ack.heads.sent_to_you.acknowledged or 0), ack.lane)
            checked = reconcile(sent["sent_totals"], ack)  # what was applied against what was sent
            if checked and checked["unexplained"]:
                note = "; ".join([*([note] if note else []), "the ack differs from what was sent: "
                                  + "; ".join(checked["unexplained"][:3])])
            if sent["status"] != SentStatus.PROCESSED:
                conn.execute(update(xchg_sent).where(this).values(
                        status=status, processed_at=utc_now(), reason=note,
                        reconcile=json.dumps(checked, sort_keys=True) if checked else None))
                docs = and_(xchg_delivery.c.peer == ack.acker, xchg_delivery.c.seq == ack.seq,
                            xchg_delivery.c.status.in_((DocStatus.EXPORTED, DocStatus.UPLOADED, DocStatus.REJECTED)))
                in_lane = lanes.condition(xchg_delivery.c.doc_type, lanes.lane_types(node.catalog, ack.lane))
                conn.execute(update(xchg_delivery).where(docs if in_lane is None else and_(docs, in_lane))
                             .values(status=DocStatus(status)))
            if ack.decision is not None:  # the receiver's operator ended it unapplied: recorded here too
                from exchange.receive.decisions import record_decision

                record_decision(conn, "sent", ack.acker, ack.seq, ack.decision, ack.bundle_sha256,
                                ack.manifest_sha256, lane=ack.lane)
                log.warning("decision: bundle %s to %s %s", ack.seq, ack.acker, ack.decision.text(),
                            extra={"file": path.name, "status": status, "peer": ack.acker, "seq": ack.seq})
    if reason:
        quarantine(node, path, reason, rep)
        return FileOutcome(path.name, Outcome.QUARANTINED, reason, ack.acker, ack.seq)
    crashpoint("ack.committed")
    archive(node, path)
    name = sent["file_name"] if sent else path.name
    rep.state(name, status, note or "")
    return FileOutcome(name, Outcome(status), note or "", ack.acker, ack.seq)


def _sealed_note(ack: Ack) -> str | None:
    """Why an ack's details (v2) could not be read here; None when they were."""
    if ack.details == "sealed":
        return f"the ack's details are not encrypted to this node ({ack.acker} misconfigured?)"
    if ack.details == "unreadable":
        return f"the ack's details cannot be read: {ack.details_error}"
    return None
