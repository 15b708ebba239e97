"""Change capture: ``xchg_event`` rows written in the same transaction as the change.

Two ways in, one result. Applications call :func:`record_event` inside their
own transaction; sites whose POS cannot be changed get database triggers from
:func:`install_triggers`. Both render ``doc_key`` in the database with the same
SQL expression (:func:`key_sql`), so an event from the API and one from a
trigger name a document with the same string and coalesce in the exporter.

Triggers record the state of the document after the change: ``'U'`` while its
header row exists, ``'D'`` once it does not. So a header delete gives ``'D'``
(and so do the cascaded child deletes), a child change gives ``'U'``, and an
UPDATE that changes a key records the old key (``'D'`` if that header is gone)
and the new one. Triggers are installed only for the document types the node
owns, so applying a peer's documents never echoes events back; the importer
additionally wraps its writes in :func:`suppress_capture`.

SQLite gets row triggers. PostgreSQL gets one plpgsql function per table and
statement-level triggers with transition tables: a multi-row statement writes
one event per document, not one per row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import Connection, Engine, Table, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from exchange.database.catalog import Catalog, DocType, Owner
from exchange.database.tables import xchg_event
from exchange.errors import DatabaseError

__all__ = [
    "key_sql", "parse_key", "record_event", "record_events", "install_triggers", "drop_triggers",
    "snapshot_events",
    "triggers_installed", "trigger_names", "suppress_capture", "capture_suppressed",
    "SUPPRESS_TABLE", "PG_SETTING",
]

log = logging.getLogger(__name__)

Op = Literal["U", "D"]

#: SQLite: while this main-schema table has a row, the triggers record nothing. The importer
#: inserts the row inside its own (exclusive) write transaction and deletes it before commit,
#: so no other connection ever sees it. (SQLite triggers cannot look at TEMP tables.)
SUPPRESS_TABLE = "xchg_capture_suppress"
#: PostgreSQL: ``SET LOCAL exchange.capture = 'off'`` silences the triggers for the transaction.
PG_SETTING = "exchange.capture"

_PG_MAX_NAME = 63
_SUPPRESS_DEPTH = "xchg_capture_suppress_depth"


def key_sql(dialect_name: str, exprs: Sequence[str]) -> str:
    """The SQL expression rendering a document key as ``doc_key`` (a JSON array of text).

    ``exprs`` are SQL expressions for the key values: bind parameters for
    :func:`record_event`, ``NEW.col``/``OLD.col``/``k.col`` in triggers. Every
    value is cast to text first, so ``5`` and ``'5'`` give the same key.
    """
    if not exprs:
        raise ValueError("a document key has at least one column")
    casts = ", ".join(f"CAST({e} AS TEXT)" for e in exprs)
    if dialect_name == "sqlite":
        return f"json_array({casts})"
    if dialect_name == "postgresql":
        return f"jsonb_build_array({casts})::text"
    raise DatabaseError(f"change capture supports SQLite and PostgreSQL, not {dialect_name!r}")


def parse_key(doc_key: str) -> list[str]:
    """The key values of a ``doc_key`` (as text), whichever database rendered it."""
    values = json.loads(doc_key)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"not a document key: {doc_key!r}")
    return values


def _insert_event_sql(dialect_name: str, width: int) -> str:
    params = [f":k{i}" for i in range(width)]
    return (f"INSERT INTO {xchg_event.name} (doc_type, doc_key, op) "
            f"VALUES (:doc_type, {key_sql(dialect_name, params)}, :op)")


def record_event(conn: Connection, doc_type: str, key: Sequence[Any], op: Op = "U") -> None:
    """Record that document ``key`` of ``doc_type`` changed (``'U'``) or was deleted (``'D'``).

    Call it inside the transaction that made the change, so the event exists
    exactly when the change does.
    """
    record_events(conn, doc_type, [key], op)


def record_events(conn: Connection, doc_type: str, keys: Iterable[Sequence[Any]], op: Op = "U") -> int:
    """:func:`record_event` for many documents of one type in one executemany; returns the count."""
    if op not in ("U", "D"):
        raise ValueError(f"op must be 'U' or 'D', not {op!r}")
    if not doc_type:
        raise ValueError("doc_type must be a document type name")
    by_width: dict[int, list[dict[str, Any]]] = {}
    for key in keys:
        if isinstance(key, (str, bytes)) or not key:
            raise ValueError(f"a document key is a non-empty sequence of values, not {key!r}")
        params: dict[str, Any] = {"doc_type": doc_type, "op": op}
        for i, value in enumerate(key):
            if value is None:
                raise ValueError(f"document key {list(key)!r} of {doc_type!r} contains NULL")
            params[f"k{i}"] = value
        by_width.setdefault(len(key), []).append(params)
    dialect = conn.dialect.name
    count = 0
    for width, rows in by_width.items():
        conn.execute(text(_insert_event_sql(dialect, width)), rows)
        count += len(rows)
    return count


# --- triggers -----------------------------------------------------------------


def _object_name(table: str, suffix: str) -> str:
    """``xchg_cap_<table>[_suffix]``, shortened with a hash to fit PostgreSQL's 63 bytes."""
    name = f"xchg_cap_{table}" + (f"_{suffix}" if suffix else "")
    if len(name.encode()) <= _PG_MAX_NAME:
        return name
    digest = hashlib.sha1(table.encode()).hexdigest()[:8]
    room = _PG_MAX_NAME - len("xchg_cap__") - len(digest) - (len(suffix) + 1 if suffix else 0)
    short = table.encode()[:room].decode(errors="ignore")
    return f"xchg_cap_{short}_{digest}" + (f"_{suffix}" if suffix else "")


_EVENTS = (("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE"))


def trigger_names(catalog: Catalog, role: Owner) -> list[str]:
    """The names of the triggers :func:`install_triggers` creates for ``role``."""
    return [name for _table, name, _ev in _triggers_for(catalog.edited_by(role))]


def _triggers_for(docs: Iterable[DocType]) -> Iterator[tuple[str, str, str]]:
    for doc in docs:
        for table in doc.tables():
            for suffix, event in _EVENTS:
                yield table, _object_name(table, suffix), event


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class _Sql:
    """Quoting helpers bound to a connection's dialect."""

    def __init__(self, conn: Connection, catalog: Catalog) -> None:
        self.conn = conn
        self.catalog = catalog
        self.dialect = conn.dialect.name
        self.prep = conn.dialect.identifier_preparer

    def ident(self, name: str) -> str:
        return str(self.prep.quote(name))

    def table(self, name: str) -> Table:
        return self.catalog.table(name)

    def table_sql(self, name: str) -> str:
        """The table as the trigger must name it: schema-qualified on PostgreSQL."""
        table = self.table(name)
        if self.dialect != "postgresql":
            return self.ident(table.name)
        return self.pg_resolve(str(self.prep.format_table(table)))

    def pg_resolve(self, formatted: str) -> str:
        row = self.conn.execute(text(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass(:name)"), {"name": formatted}).first()
        if row is None:
            raise DatabaseError(f"table {formatted} does not exist in the database",
                                hint="Create the business tables before installing capture triggers.")
        return str(row[0])

    def schema_of(self, qualified: str) -> str:
        """The quoted schema part of a name returned by :meth:`pg_resolve`."""
        row = self.conn.execute(text(
            "SELECT quote_ident(n.nspname) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.oid = to_regclass(:name)"), {"name": qualified}).first()
        assert row is not None
        return str(row[0])

    def op_sql(self, doc: DocType, alias: str) -> str:
        """'U' while the document's header row exists, else 'D'."""
        cond = " AND ".join(f"h.{self.ident(k)} = {alias}.{self.ident(k)}" for k in doc.key)
        return (f"CASE WHEN EXISTS (SELECT 1 FROM {self.table_sql(doc.header)} AS h WHERE {cond}) "
                "THEN 'U' ELSE 'D' END")

    def key_of(self, doc: DocType, alias: str) -> str:
        return key_sql(self.dialect, [f"{alias}.{self.ident(k)}" for k in doc.key])


def _sqlite_trigger(sql: _Sql, doc: DocType, table: str, name: str, event: str) -> str:
    def insert(alias: str, where: str = "") -> str:
        return (f"INSERT INTO {xchg_event.name} (doc_type, doc_key, op) "
                f"SELECT {_lit(doc.name)}, {sql.key_of(doc, alias)}, {sql.op_sql(doc, alias)}{where};")

    if event == "INSERT":
        body = insert("NEW")
    elif event == "DELETE":
        body = insert("OLD")
    else:
        changed = " OR ".join(f"OLD.{sql.ident(k)} IS NOT NEW.{sql.ident(k)}" for k in doc.key)
        body = insert("OLD", f" WHERE {changed}") + "\n  " + insert("NEW")
    return (f"CREATE TRIGGER {sql.ident(name)} AFTER {event} ON {sql.table_sql(table)}\n"
            f"WHEN NOT EXISTS (SELECT 1 FROM {SUPPRESS_TABLE})\n"
            f"BEGIN\n  {body}\nEND")


def _pg_function(sql: _Sql, doc: DocType, table: str, function: str, event_table: str) -> str:
    cols = ", ".join(f"r.{sql.ident(k)}" for k in doc.key)
    order = ", ".join(f"k.{sql.ident(k)}" for k in doc.key)

    def insert(source: str) -> str:
        return (f"INSERT INTO {event_table} (doc_type, doc_key, op)\n"
                f"    SELECT {_lit(doc.name)}, {sql.key_of(doc, 'k')}, {sql.op_sql(doc, 'k')}\n"
                f"    FROM ({source}) AS k ORDER BY {order};")

    return (
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $xchg$\n"
        f"-- exchange change capture for table {table} (document type {doc.name})\n"
        "BEGIN\n"
        f"  IF current_setting({_lit(PG_SETTING)}, true) = 'off' THEN RETURN NULL; END IF;\n"
        "  IF TG_OP = 'INSERT' THEN\n"
        f"    {insert(f'SELECT DISTINCT {cols} FROM xchg_new AS r')}\n"
        "  ELSIF TG_OP = 'UPDATE' THEN\n"
        f"    {insert(f'SELECT {cols} FROM xchg_old AS r UNION SELECT {cols} FROM xchg_new AS r')}\n"
        "  ELSE\n"
        f"    {insert(f'SELECT DISTINCT {cols} FROM xchg_old AS r')}\n"
        "  END IF;\n"
        "  RETURN NULL;\n"
        "END\n$xchg$")


_PG_REFERENCING = {
    "INSERT": "REFERENCING NEW TABLE AS xchg_new",
    "UPDATE": "REFERENCING OLD TABLE AS xchg_old NEW TABLE AS xchg_new",
    "DELETE": "REFERENCING OLD TABLE AS xchg_old",
}


@contextmanager
def _connect(engine_or_conn: Engine | Connection) -> Iterator[Connection]:
    """A connection in a transaction: a new one committed on success, or the caller's own."""
    if isinstance(engine_or_conn, Engine):
        with engine_or_conn.begin() as conn:
            yield conn
    else:
        yield engine_or_conn


def _check_dialect(conn: Connection) -> None:
    if conn.dialect.name not in ("sqlite", "postgresql"):
        raise DatabaseError(f"change capture supports SQLite and PostgreSQL, not {conn.dialect.name!r}")


def _begin_ddl(conn: Connection) -> None:
    """Make the trigger DDL atomic on SQLite.

    Python's sqlite3 opens a transaction only before DML, so DROP and CREATE
    TRIGGER would each commit on their own, leaving a moment where writes from
    the POS are not captured. An explicit BEGIN IMMEDIATE closes that gap.
    """
    if conn.dialect.name != "sqlite":
        return
    dbapi = conn.connection.dbapi_connection
    if dbapi is not None and getattr(dbapi, "in_transaction", True) is False:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _check_role(role: str) -> None:
    if role not in ("ho", "store"):
        raise ValueError(f"role must be 'ho' or 'store', not {role!r}")


def _existing(conn: Connection, sql: _Sql, tables: Iterable[str]) -> set[tuple[str, str]]:
    """(table, trigger name) pairs present in the database among ``tables``."""
    wanted = set(tables)
    found: set[tuple[str, str]] = set()
    if not wanted:
        return found
    if sql.dialect == "sqlite":
        rows = conn.execute(text("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'"))
        return {(t, n) for t, n in rows if t in wanted}
    for table in wanted:
        rows = conn.execute(text(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgrelid = to_regclass(:t)"),
            {"t": str(sql.prep.format_table(sql.table(table)))})
        found.update((table, str(r[0])) for r in rows)
    return found


def _drop(conn: Connection, sql: _Sql, docs: Sequence[DocType]) -> list[str]:
    triggers = list(_triggers_for(docs))
    present = _existing(conn, sql, {t for t, _n, _e in triggers})
    dropped: list[str] = []
    for table, name, _event in triggers:
        if (table, name) not in present:
            continue
        if sql.dialect == "sqlite":
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {sql.ident(name)}")
        else:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {sql.ident(name)} ON {sql.table_sql(table)}")
        dropped.append(name)
    if sql.dialect == "postgresql":
        for doc in docs:
            for table in doc.tables():
                if inspect(conn).has_table(sql.table(table).name, schema=sql.table(table).schema):
                    qualified = sql.table_sql(table)
                    function = f"{sql.schema_of(qualified)}.{sql.ident(_object_name(table, ''))}"
                    conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {function}()")
    return dropped


def install_triggers(engine_or_conn: Engine | Connection, catalog: Catalog, role: Owner) -> list[str]:
    """Install capture triggers on every table of the document types ``role`` owns (or edits on both sides).

    Idempotent: existing capture triggers are dropped and recreated, and those on
    document types the node does not own (left from an earlier role) are removed.
    With a Connection, runs in the caller's transaction; with an Engine, in its own.
    Returns the names of the triggers created.
    """
    _check_role(role)
    with _connect(engine_or_conn) as conn:
        _check_dialect(conn)
        _begin_ddl(conn)
        if not inspect(conn).has_table(xchg_event.name):
            raise DatabaseError(f"table {xchg_event.name} does not exist",
                                hint="Run the exchange migrations (exchange.database.tables.migrate) first.")
        sql = _Sql(conn, catalog)
        owned = catalog.edited_by(role)
        others = [d for d in catalog if d not in owned]
        _drop(conn, sql, others)
        _drop(conn, sql, owned)
        created: list[str] = []
        if sql.dialect == "sqlite":
            conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {SUPPRESS_TABLE} (id INTEGER PRIMARY KEY)")
            for doc in owned:
                for table in doc.tables():
                    for suffix, event in _EVENTS:
                        name = _object_name(table, suffix)
                        conn.exec_driver_sql(_sqlite_trigger(sql, doc, table, name, event))
                        created.append(name)
            return created
        event_table = sql.pg_resolve(xchg_event.name)
        for doc in owned:
            for table in doc.tables():
                qualified = sql.table_sql(table)
                function = f"{sql.schema_of(qualified)}.{sql.ident(_object_name(table, ''))}"
                conn.exec_driver_sql(_pg_function(sql, doc, table, function, event_table))
                for suffix, event in _EVENTS:
                    name = _object_name(table, suffix)
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER {sql.ident(name)} AFTER {event} ON {qualified} "
                        f"{_PG_REFERENCING[event]} FOR EACH STATEMENT EXECUTE FUNCTION {function}()")
                    created.append(name)
        log.info("installed %d capture triggers for %s-owned documents", len(created), role)
        return created


def snapshot_events(conn: Connection, catalog: Catalog, role: Owner) -> dict[str, int]:
    """Record a ``'U'`` event for every document ``role`` owns that is already in the database.

    Triggers capture changes from their installation on; the rows a POS holds
    from before would otherwise never be sent. Run it in the transaction that
    installs the triggers (after them): no change is missed in between and none
    counted twice (events of one document coalesce in the exporter). Types the
    HO may edit but a store owns are left out: those rows came from the stores.
    One INSERT ... SELECT per type; returns the count per document type.
    """
    _check_role(role)
    _check_dialect(conn)
    sql = _Sql(conn, catalog)
    event_table = sql.pg_resolve(xchg_event.name) if sql.dialect == "postgresql" else xchg_event.name
    counts: dict[str, int] = {}
    for doc in catalog:
        if doc.owner != role:
            continue
        result = conn.execute(text(
            f"INSERT INTO {event_table} (doc_type, doc_key, op) "
            f"SELECT {_lit(doc.name)}, {sql.key_of(doc, 'h')}, 'U' FROM {sql.table_sql(doc.header)} AS h "
            "ORDER BY " + ", ".join(f"h.{sql.ident(k)}" for k in doc.key)))
        counts[doc.name] = max(int(result.rowcount or 0), 0)
    log.info("snapshot of %s-owned documents: %s", role, counts)
    return counts


def drop_triggers(engine_or_conn: Engine | Connection, catalog: Catalog, role: Owner) -> list[str]:
    """Remove the capture triggers of the document types ``role`` owns; returns those removed."""
    _check_role(role)
    with _connect(engine_or_conn) as conn:
        _check_dialect(conn)
        _begin_ddl(conn)
        return _drop(conn, _Sql(conn, catalog), catalog.edited_by(role))


def triggers_installed(conn: Engine | Connection, catalog: Catalog, role: Owner) -> bool:
    """Whether every capture trigger for ``role``'s document types is in place."""
    _check_role(role)
    with _connect(conn) as c:
        _check_dialect(c)
        expected = {(t, n) for t, n, _e in _triggers_for(catalog.edited_by(role))}
        return expected <= _existing(c, _Sql(c, catalog), {t for t, _n in expected})


# --- suppression ----------------------------------------------------------------


def _pg_in_error(conn: Connection) -> bool:
    """Whether the PostgreSQL transaction is aborted (every statement would fail)."""
    try:
        dbapi = conn.connection.dbapi_connection
    except SQLAlchemyError:
        return True
    status = getattr(getattr(dbapi, "info", None), "transaction_status", None)
    return getattr(status, "name", "") == "INERROR"


@contextmanager
def suppress_capture(conn: Connection) -> Iterator[None]:
    """Within the block, capture triggers record nothing for writes made on ``conn``.

    For the importer: applying a peer's documents must never produce events,
    even where triggers were installed on the tables it writes. The switch
    lives in the current transaction: PostgreSQL ``SET LOCAL``, SQLite a row of
    :data:`SUPPRESS_TABLE` that only this (exclusive) write transaction can
    see. Do not commit inside the block: on SQLite the row would become visible
    to every connection until the block ends. Nests.
    """
    dialect = conn.dialect.name
    if dialect == "postgresql":
        prev = conn.execute(text("SELECT current_setting(:s, true)"), {"s": PG_SETTING}).scalar()
        conn.execute(text("SELECT set_config(:s, 'off', true)"), {"s": PG_SETTING})
        ok = False
        try:
            yield
            ok = True
        finally:
            if conn.in_transaction() and not _pg_in_error(conn):
                restore = text("SELECT set_config(:s, :v, true)")
                if ok:
                    conn.execute(restore, {"s": PG_SETTING, "v": prev or ""})
                else:
                    try:
                        conn.execute(restore, {"s": PG_SETTING, "v": prev or ""})
                    except SQLAlchemyError:  # do not hide the original error
                        log.debug("could not restore %s", PG_SETTING, exc_info=True)
        return
    if dialect != "sqlite":
        raise DatabaseError(f"change capture supports SQLite and PostgreSQL, not {dialect!r}")
    conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {SUPPRESS_TABLE} (id INTEGER PRIMARY KEY)")
    depth = int(conn.info.get(_SUPPRESS_DEPTH, 0))
    if depth == 0:
        stale = conn.exec_driver_sql(f"DELETE FROM {SUPPRESS_TABLE}").rowcount
        if stale:
            log.warning("removed %d stale capture-suppression row(s) left committed by an earlier run; "
                        "changes made since then may not have been captured", stale)
    row_id = conn.exec_driver_sql(f"INSERT INTO {SUPPRESS_TABLE} DEFAULT VALUES").lastrowid
    conn.info[_SUPPRESS_DEPTH] = depth + 1
    ok = False
    try:
        yield
        ok = True
    finally:
        conn.info[_SUPPRESS_DEPTH] = depth
        if conn.in_transaction():
            delete = text(f"DELETE FROM {SUPPRESS_TABLE} WHERE id = :id")
            if ok:
                conn.execute(delete, {"id": row_id})
            else:
                try:
                    conn.execute(delete, {"id": row_id})
                except SQLAlchemyError:  # do not hide the original error
                    log.debug("could not remove capture-suppression row", exc_info=True)


def capture_suppressed(conn: Connection) -> bool:
    """Whether capture triggers are silenced for this connection right now."""
    if conn.dialect.name == "postgresql":
        value = conn.execute(text("SELECT current_setting(:s, true)"), {"s": PG_SETTING}).scalar()
        return value == "off"
    if not inspect(conn).has_table(SUPPRESS_TABLE):
        return False
    return conn.exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM {SUPPRESS_TABLE})").scalar() == 1
