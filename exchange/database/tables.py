"""Database engines and exchange's own ``xchg_*`` tables, with migrations.

SQLAlchemy holds the schema, migrations and transactions; bulk rows take the
driver's own paths (see ``exchange.database.rows``). Migrations are a short ordered list
of functions recorded in ``xchg_meta``: simpler than Alembic for a dozen
tables that ship with the package, and they run on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger, Column, Connection, DateTime, Engine, Index, Integer, LargeBinary, MetaData,
    String, Table, Text, create_engine, event, func, inspect, select, text,
)
from sqlalchemy.exc import SQLAlchemyError

from exchange.errors import DatabaseError
from exchange.vocabulary import DocStatus

log = logging.getLogger(__name__)

XCHG = MetaData()

#: Capture log: one row per change of a document, written in the changer's transaction.
#: ``doc_key`` is a JSON array of the key values as text, as the database renders it
#: (SQLite ``json_array``, PostgreSQL ``jsonb_build_array(...)::text``).
xchg_event = Table(
    "xchg_event", XCHG,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("doc_type", String(64), nullable=False),
    Column("doc_key", String(512), nullable=False),
    Column("op", String(1), nullable=False),  # U upsert, D delete
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.current_timestamp()),
    Column("routed", Integer, nullable=False, server_default=text("0")),
    # the bundle that carried the event, when it went straight from the log (exchange.send.streams)
    Column("seq", BigInteger, nullable=True),
    # the version the document was sent at, when not this event's id: it committed late (exchange.send.clock)
    Column("version", BigInteger, nullable=True),
)

#: Per peer and document: what still has to go, and in which bundle it went.
xchg_delivery = Table(
    "xchg_delivery", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("doc_type", String(64), primary_key=True),
    Column("doc_key", String(512), primary_key=True),
    Column("op", String(1), nullable=False),
    Column("version", BigInteger, nullable=False),  # highest event id seen for the document
    Column("status", String(16), nullable=False),  # PENDING EXPORTED UPLOADED PROCESSED REJECTED
    Column("seq", BigInteger, nullable=True),
)

# Indexes of the two busiest tables (migration 3). Every document passes through an event and a
# delivery row that are written three to four times, so each index must earn its keep; low-
# cardinality indexes on a status column doubled the cost of every status change (measured on
# 222,000 deliveries: 1.62 s of updates with one, 0.80 s without).
#: Unrouted events only: routing removes the entry, and the index stays the size of the backlog.
ix_event_unrouted = Index("ix_xchg_event_unrouted", xchg_event.c.id,
                          sqlite_where=xchg_event.c.routed == 0, postgresql_where=xchg_event.c.routed == 0)
#: "A peer's next pending documents in version order", from PENDING rows only.
ix_delivery_pending = Index(
    "ix_xchg_delivery_pending", xchg_delivery.c.peer, xchg_delivery.c.version,
    sqlite_where=xchg_delivery.c.status == DocStatus.PENDING.value,
    postgresql_where=xchg_delivery.c.status == DocStatus.PENDING.value)
#: Uploads and acks move a whole bundle's documents: by (peer, seq), appended in seq order.
ix_delivery_seq = Index("ix_xchg_delivery_seq", xchg_delivery.c.peer, xchg_delivery.c.seq)
#: The indexes migration 3 replaced.
_M3_DROPPED = ("ix_xchg_event_routed", "ix_xchg_delivery_status")

#: Bundles and acks this node sealed, per peer stream.
xchg_sent = Table(
    "xchg_sent", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("lane", String(16), primary_key=True, server_default=text("'main'")),  # the stream's lane (migration 14)
    Column("seq", BigInteger, primary_key=True),
    Column("file_name", String(128), nullable=False),
    Column("file_sha256", String(64), nullable=False),
    Column("manifest_sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("summary", Text, nullable=False),  # JSON: document types and counts
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("uploaded_at", DateTime(timezone=True)),
    Column("processed_at", DateTime(timezone=True)),
    Column("reason", Text),
    # JSON: the sealed control totals per document type (count, deletes, rows, totals), to reconcile the ack
    Column("sent_totals", Text),
    # JSON: what the ack's applied counts and totals say against sent_totals (exchange.receive.reconcile)
    Column("reconcile", Text),
)

#: Per peer and lane (a stream): the next seq to seal and the hash of the last sealed manifest.
xchg_stream_out = Table(
    "xchg_stream_out", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("lane", String(16), primary_key=True, server_default=text("'main'")),  # the stream's lane (migration 14)
    Column("next_seq", BigInteger, nullable=False),
    Column("last_manifest_sha256", String(64)),
    # cursor over xchg_broadcast: (version, doc_type, doc_key) of the last document sealed
    Column("bc_version", BigInteger, nullable=False, server_default=text("0")),
    Column("bc_type", String(64), nullable=False, server_default=text("''")),
    Column("bc_key", String(512), nullable=False, server_default=text("''")),
)

#: Per peer and lane (a stream): the last seq applied and its manifest hash (replay/rollback guard).
xchg_stream_in = Table(
    "xchg_stream_in", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("lane", String(16), primary_key=True, server_default=text("'main'")),  # the stream's lane (migration 14)
    Column("last_seq", BigInteger, nullable=False),
    Column("last_manifest_sha256", String(64)),
)

#: Bundles received, with their status and the ack we answered.
xchg_received = Table(
    "xchg_received", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("lane", String(16), primary_key=True, server_default=text("'main'")),  # the stream's lane (migration 14)
    Column("seq", BigInteger, primary_key=True),
    Column("file_name", String(128), nullable=False),
    Column("file_sha256", String(64), nullable=False),
    Column("manifest_sha256", String(64)),
    Column("status", String(16), nullable=False, index=True),
    Column("summary", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("applied_at", DateTime(timezone=True)),
    Column("reason", Text),
    Column("ack", LargeBinary),  # the signed ack file, kept so it can be rewritten
)

#: Documents that failed to apply, with their rows, retried after later imports.
xchg_parked = Table(
    "xchg_parked", XCHG,
    Column("doc_type", String(64), primary_key=True),
    Column("doc_key", String(512), primary_key=True),
    Column("peer", String(32), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("op", String(1), nullable=False),
    Column("data", LargeBinary, nullable=False),  # Arrow IPC stream of the document's rows
    Column("error", Text, nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("1")),
    Column("state", String(16), nullable=False, server_default=text("'RETRYING'")),  # vocabulary.ParkedState
)

#: Per-document version guard: the version last applied, per sender (each sender's versions are its own
#: clock, so one store's versions never make another's look stale). ``peer`` '' holds rows recorded
#: before migration 5, when versions were kept per document only. ``deleted_*`` (migration 15): when, and by
#: which bundle of which lane, a delete from the peer was last applied (the retention, exchange.service.retention).
xchg_doc_version = Table(
    "xchg_doc_version", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("doc_type", String(64), primary_key=True),
    Column("doc_key", String(512), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("deleted_at", DateTime(timezone=True)),
    Column("deleted_lane", String(16)),
    Column("deleted_seq", BigInteger),
)
#: The tombstones only (migration 15): the retention reads them without a scan of every version.
ix_doc_version_deleted = Index("ix_xchg_doc_version_deleted", xchg_doc_version.c.deleted_at,
                               sqlite_where=xchg_doc_version.c.deleted_at.is_not(None),
                               postgresql_where=xchg_doc_version.c.deleted_at.is_not(None))

#: What operators did to the exchange itself (pause, resume, remove a peer, ...): who, when, why.
#: Append-only: an auditor reads it with `exchange journal`.
xchg_journal = Table(
    "xchg_journal", XCHG,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(128), nullable=False),  # the OS account that ran the command
    Column("action", String(32), nullable=False),
    Column("peer", String(32)),
    Column("detail", Text, nullable=False),  # JSON object: reason and what the action did
)

xchg_meta = Table(
    "xchg_meta", XCHG,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


#: Documents routed to every store: one row per document, not one per store.
#: Each peer's stream keeps a cursor (``xchg_stream_out.bc_*``) over this table,
#: so an item master change to a thousand stores costs a thousand cursors, not
#: a hundred million delivery rows.
xchg_broadcast = Table(
    "xchg_broadcast", XCHG,
    Column("doc_type", String(64), primary_key=True),
    Column("doc_key", String(512), primary_key=True),
    Column("op", String(1), nullable=False),
    Column("version", BigInteger, nullable=False, index=True),
)

#: Operators' decisions about bundles that could not be applied: a FAILED bundle skipped at the
#: receiver, or superseded by its sender. ``side`` says whose stream: ``received`` (the peer sent it
#: here) or ``sent`` (this node sent it and the peer's signed ack carried the decision).
xchg_decision = Table(
    "xchg_decision", XCHG,
    Column("side", String(8), primary_key=True),
    Column("peer", String(32), primary_key=True),
    Column("lane", String(16), primary_key=True, server_default=text("'main'")),  # the stream's lane (migration 14)
    Column("seq", BigInteger, primary_key=True),
    Column("kind", String(16), nullable=False),  # skipped, superseded
    Column("decided_by", String(128), nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    Column("reason", Text, nullable=False),
    Column("file_sha256", String(64), nullable=False),
    Column("manifest_sha256", String(64)),
)


#: Documents the exporter could not encode (a value its column's type cannot hold): set aside on the
#: sender with what failed, so the rest of its exports go on; ``exchange set-aside retry`` sends them
#: again once the row is fixed (exchange.send.setaside).
xchg_setaside = Table(
    "xchg_setaside", XCHG,
    Column("doc_type", String(64), primary_key=True),
    Column("doc_key", String(512), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("column_name", String(128), nullable=True),  # NULL: the failure could not be pinned to a column
    Column("value", Text, nullable=True),
    Column("error", Text, nullable=False),
    Column("set_at", DateTime(timezone=True), nullable=False),
)


#: Values a peer sent for columns this node's tables do not have yet (schema evolution): one row per
#: bundle, table and column, the rows' primary keys and values as Arrow IPC. Applied, then deleted,
#: once the column exists here with the sender's type (``exchange.receive.evolution``).
xchg_kept = Table(
    "xchg_kept", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("table_name", String(128), primary_key=True),
    Column("column_name", String(128), primary_key=True),
    Column("doc_type", String(64), nullable=False),
    Column("arrow_type", String(128), nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("kept_at", DateTime(timezone=True), nullable=False),
    Column("reason", Text),  # why kept documents still cannot be applied once their type exists here
)

#: Per peer: the catalog (document types, tables, columns and types) its last applied bundle carried.
xchg_peer_catalog = Table(
    "xchg_peer_catalog", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("catalog", Text, nullable=False),  # JSON, as in the inner manifest (docs/FORMAT.md v3)
    Column("seq", BigInteger, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

#: Per peer: the newest heartbeat it sent (docs/FORMAT.md section 12): when, its version, its health.
xchg_heartbeat = Table(
    "xchg_heartbeat", XCHG,
    Column("peer", String(32), primary_key=True),
    Column("created", DateTime(timezone=True), nullable=False),  # signed by the peer
    Column("received_at", DateTime(timezone=True), nullable=False),  # this node's clock
    Column("app_version", String(64), nullable=False),
    Column("health", Text, nullable=False),  # JSON: exchange.wire.formats.HEALTH_FIELDS
    Column("file", LargeBinary, nullable=False),  # the signed heartbeat, for an auditor
)

_LATER_TABLES = ("xchg_broadcast", "xchg_journal", "xchg_decision", "xchg_setaside", "xchg_kept",
                 "xchg_peer_catalog", "xchg_heartbeat")  # made by their own migrations
_M1_TABLES = [t for t in XCHG.sorted_tables if t.name not in _LATER_TABLES]

#: Concurrent changes of documents editable on both sides: both versions, who, when, the policy applied
#: and what it kept (exchange.receive.conflicts). ``ours``/``theirs``: the document's rows as Arrow IPC
#: (NULL: the version deleted it). Made by its own migration (not migration 1).
xchg_conflict = Table(
    "xchg_conflict", XCHG,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("doc_type", String(64), nullable=False),
    Column("doc_key", String(512), nullable=False),
    Column("peer", String(32), nullable=False),  # the other side of the conflict
    Column("seq", BigInteger, nullable=False),  # the bundle of the peer's version
    Column("policy", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),  # OPEN DECIDED RESOLVED
    Column("kept", String(8)),  # ours | theirs (NULL while OPEN)
    Column("our_version", BigInteger, nullable=False),
    Column("our_at", DateTime(timezone=True)),
    Column("their_version", BigInteger, nullable=False),
    Column("their_base", BigInteger, nullable=False),
    Column("their_at", DateTime(timezone=True)),
    Column("ours", LargeBinary),
    Column("theirs", LargeBinary),
    Column("detected_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
    Column("resolved_by", String(128)),
    Column("note", Text),
)

#: Documents editable on both sides: this node's latest change sent (or queued) of each, the version it
#: went at and when it was made, so the conflict check never scans the capture log (which has no key index).
xchg_doc_local = Table(
    "xchg_doc_local", XCHG,
    Column("doc_type", String(64), primary_key=True),
    Column("doc_key", String(512), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("changed_at", DateTime(timezone=True), nullable=False),
)

#: Streams re-based after a peer went back in time (a store restored from a backup, or one whose disk
#: died): ``kind`` ``detected`` (evidence that the peer's positions regressed or forked; ``resolved_at`` once a
#: restart ended it), ``sent`` (the HO's signed restart record, bundle ``seq`` of its stream to the store) or
#: ``applied`` (a store applied the HO's restart at ``seq``). ``detail``: JSON (exchange.receive.restart).
#: Made by its own migration (not migration 1).
xchg_restart = Table(
    "xchg_restart", XCHG,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("peer", String(32), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("seq", BigInteger),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("detail", Text, nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
)


def _m1_initial(conn: Connection) -> None:
    XCHG.create_all(conn, tables=_M1_TABLES)  # create_all makes every index, migration 3's too


def _m2_broadcast(conn: Connection) -> None:
    XCHG.create_all(conn, tables=[xchg_broadcast])
    have = {c["name"] for c in inspect(conn).get_columns("xchg_stream_out")}
    for col, typ, default in (("bc_version", "BIGINT", "0"), ("bc_type", "VARCHAR(64)", "''"),
                              ("bc_key", "VARCHAR(512)", "''")):
        if col not in have:  # databases made by migration 1 before these columns existed
            conn.exec_driver_sql(
                f"ALTER TABLE xchg_stream_out ADD COLUMN {col} {typ} NOT NULL DEFAULT {default}")


def _m3_indexes(conn: Connection) -> None:
    for name in _M3_DROPPED:
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
    for ix in (ix_event_unrouted, ix_delivery_pending, ix_delivery_seq):
        ix.create(conn, checkfirst=True)


def _m4_event_seq(conn: Connection) -> None:
    if "seq" not in {c["name"] for c in inspect(conn).get_columns("xchg_event")}:  # made before it existed
        conn.exec_driver_sql("ALTER TABLE xchg_event ADD COLUMN seq BIGINT")


def _m5_versions(conn: Connection) -> None:
    """The version each late event was sent at; document versions kept per sender."""
    if "version" not in {c["name"] for c in inspect(conn).get_columns("xchg_event")}:
        conn.exec_driver_sql("ALTER TABLE xchg_event ADD COLUMN version BIGINT")
    if "peer" not in {c["name"] for c in inspect(conn).get_columns("xchg_doc_version")}:
        # a primary key cannot be altered on SQLite: the table is made anew, its rows kept under peer ''
        conn.exec_driver_sql("ALTER TABLE xchg_doc_version RENAME TO xchg_doc_version_m4")
        if conn.dialect.name == "postgresql":  # the old primary key's name goes with the old table
            conn.exec_driver_sql("ALTER TABLE xchg_doc_version_m4 DROP CONSTRAINT IF EXISTS xchg_doc_version_pkey")
        xchg_doc_version.create(conn)
        conn.exec_driver_sql("INSERT INTO xchg_doc_version (peer, doc_type, doc_key, version) "
                             "SELECT '', doc_type, doc_key, version FROM xchg_doc_version_m4")
        conn.exec_driver_sql("DROP TABLE xchg_doc_version_m4")


def _m6_journal(conn: Connection) -> None:
    """The operators' journal (peer pause, resume, remove)."""
    xchg_journal.create(conn, checkfirst=True)


def _m7_decisions(conn: Connection) -> None:
    """Operators' decisions (skipped, superseded bundles) and the parked documents' state (ORPHANED):
    whatever order the migrations run in."""
    xchg_decision.create(conn, checkfirst=True)
    if "state" not in {c["name"] for c in inspect(conn).get_columns("xchg_parked")}:
        conn.exec_driver_sql("ALTER TABLE xchg_parked ADD COLUMN state VARCHAR(16) NOT NULL DEFAULT 'RETRYING'")


def _m8_setaside(conn: Connection) -> None:
    """Documents the exporter set aside (exchange.send.setaside)."""
    xchg_setaside.create(conn, checkfirst=True)


def _m9_schema_evolution(conn: Connection) -> None:
    """Kept values of columns not here yet, and each peer's last catalog (schema evolution)."""
    XCHG.create_all(conn, tables=[xchg_kept, xchg_peer_catalog], checkfirst=True)


def _m10_conflicts(conn: Connection) -> None:
    """The conflict log of documents editable on both sides."""
    xchg_conflict.create(conn, checkfirst=True)  # its index with it
    xchg_doc_local.create(conn, checkfirst=True)


def _m11_heartbeat(conn: Connection) -> None:
    """The newest heartbeat of each peer (made only if missing: the order of migrations may vary)."""
    xchg_heartbeat.create(conn, checkfirst=True)


def _m12_reconcile(conn: Connection) -> None:
    """What each bundle sent (control totals) and what its ack says was applied (added only if missing)."""
    have = {c["name"] for c in inspect(conn).get_columns("xchg_sent")}
    for col in ("sent_totals", "reconcile"):
        if col not in have:
            conn.exec_driver_sql(f"ALTER TABLE xchg_sent ADD COLUMN {col} TEXT")


#: The tables whose rows are per stream, keyed by (peer, lane) since migration 14.
LANE_TABLES = (xchg_stream_out, xchg_stream_in, xchg_sent, xchg_received, xchg_decision)


def _m14_lanes(conn: Connection) -> None:
    """Streams per lane: ``lane`` joins the keys of the stream, sent, received and decision tables;
    every existing row is in the default lane ('main'), so its stream goes on unchanged. A primary key
    cannot be altered on SQLite: each table is made anew (only where ``lane`` is missing) and its rows copied."""
    for table in LANE_TABLES:
        insp = inspect(conn)
        if not insp.has_table(table.name):
            continue
        have = [c["name"] for c in insp.get_columns(table.name)]
        if "lane" in have:
            continue
        for ix in insp.get_indexes(table.name):  # index names are global: the new table makes its own
            if ix.get("name"):
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {ix['name']}")
        old = f"{table.name}_before_lanes"
        conn.exec_driver_sql(f"ALTER TABLE {table.name} RENAME TO {old}")
        if conn.dialect.name == "postgresql":  # the old primary key's name goes with the old table
            conn.exec_driver_sql(f"ALTER TABLE {old} DROP CONSTRAINT IF EXISTS {table.name}_pkey")
        table.create(conn)
        cols = ", ".join(c.name for c in table.columns if c.name in have)
        conn.exec_driver_sql(f"INSERT INTO {table.name} ({cols}, lane) SELECT {cols}, 'main' FROM {old}")
        conn.exec_driver_sql(f"DROP TABLE {old}")


def _m13_restart(conn: Connection) -> None:
    """Stream restarts and the evidence of a peer gone back in time (made only if missing)."""
    xchg_restart.create(conn, checkfirst=True)


def _m15_deleted_versions(conn: Connection) -> None:
    """When and by which bundle a delete was applied, beside its version (added only if missing): what the
    retention needs to purge a deleted document's version. Rows from before carry none and are kept."""
    have = {c["name"] for c in inspect(conn).get_columns("xchg_doc_version")}
    stamp = "TIMESTAMP WITH TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
    for col, typ in (("deleted_at", stamp), ("deleted_lane", "VARCHAR(16)"), ("deleted_seq", "BIGINT")):
        if col not in have:
            conn.exec_driver_sql(f"ALTER TABLE xchg_doc_version ADD COLUMN {col} {typ}")
    ix_doc_version_deleted.create(conn, checkfirst=True)


#: Ordered migrations; the schema version is the length of the list applied.
MIGRATIONS: list[Callable[[Connection], None]] = [_m1_initial, _m2_broadcast, _m3_indexes, _m4_event_seq,
                                                  _m5_versions, _m6_journal, _m7_decisions, _m8_setaside,
                                                  _m9_schema_evolution, _m10_conflicts, _m11_heartbeat, _m12_reconcile,
                                                  _m13_restart, _m14_lanes, _m15_deleted_versions]
SCHEMA_VERSION = len(MIGRATIONS)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


#: URL schemes that mean PostgreSQL through psycopg 3, the driver exchange installs.
_POSTGRES_SCHEMES = ("postgres://", "postgresql://", "postgres+psycopg://")


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` (what libpq and most hosting panels print) -> psycopg 3.

    SQLAlchemy reads a bare ``postgresql://`` as psycopg2, which exchange does
    not install, and does not know ``postgres://`` at all.
    """
    for scheme in _POSTGRES_SCHEMES:
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def check_reachable(url: str) -> None:
    """Connect once to a server database, with an error that says what to do when that fails."""
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        engine.dispose()
        return
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        name = engine.url.database or "?"
        if "does not exist" in first:
            raise DatabaseError(f"database {name!r} does not exist on the server ({first})",
                                hint=f"Create it first (createdb {name}, or CREATE DATABASE {name}; as a user "
                                     "that may create tables in it), then run the command again.") from exc
        raise DatabaseError(f"cannot connect to the database at {engine.url.render_as_string()}: {first}",
                            hint="Check that the server runs and accepts this user (host, port, password, "
                                 "pg_hba.conf), then run the command again.") from exc
    finally:
        engine.dispose()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, full sync and foreign keys."""
    url = normalize_url(url)
    try:
        engine = create_engine(url, future=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise DatabaseError(f"cannot use database URL {url!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def begin_write(conn: Connection) -> None:
    """SQLite: open the write transaction now, before the first statement.

    Python's sqlite3 begins a transaction only before INSERT/UPDATE/DELETE, so
    without this the stream position is read outside the transaction, a
    ``CREATE TABLE`` commits on its own, and a SAVEPOINT issued first would
    start (and its RELEASE commit) the transaction: a bundle would no longer
    apply all or nothing, and a dry run would not roll back.
    """
    if conn.dialect.name != "sqlite":
        return
    dbapi = conn.connection.dbapi_connection
    if dbapi is not None and getattr(dbapi, "in_transaction", True) is False:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def schema_version(conn: Connection) -> int:
    if not inspect(conn).has_table("xchg_meta"):
        return 0
    row = conn.execute(select(xchg_meta.c.value).where(xchg_meta.c.key == "schema_version")).first()
    return int(row[0]) if row else 0


def migrate(engine: Engine) -> int:
    """Bring the xchg tables to ``SCHEMA_VERSION``; returns the number of steps run."""
    try:
        with engine.begin() as conn:
            current = schema_version(conn)
            if current > SCHEMA_VERSION:
                raise DatabaseError(
                    f"database schema version {current} is newer than this exchange ({SCHEMA_VERSION})",
                    hint="Upgrade exchange on this node; do not downgrade a node's software.")
            for step in MIGRATIONS[current:]:
                log.info("migrating xchg schema: %s", step.__name__)
                step(conn)
            if current != SCHEMA_VERSION:
                conn.execute(xchg_meta.delete().where(xchg_meta.c.key == "schema_version"))
                conn.execute(xchg_meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            return SCHEMA_VERSION - current
    except SQLAlchemyError as exc:
        raise DatabaseError(f"database migration failed: {exc}") from exc
