"""References a batch of documents makes to rows outside it, checked set-based before the write.

A sales line names an item; a promotion line names an item. Each foreign key
of each table a document type writes is checked with one query per referenced
table against the distinct values the batch uses (thousands of lines name a
few hundred items), instead of the database's per-row trigger finding the
first missing one and failing the whole bulk write. The documents that name a
row the database lacks are returned, so the importer writes the rest in bulk
and only those one by one, where the database's own check parks them with its
own words, exactly as before.

``[import] reference_check`` (docs/OPERATIONS.md, "Faster first loads on
PostgreSQL") decides who checks the rows that are written in bulk:

- ``database`` (the default): the database's foreign-key triggers, as always;
  this check only keeps a missing reference from sending the whole batch down
  the one-by-one path.
- ``exchange``: this check is the only one for the inserts and upserts of a
  table that allows it (:func:`unchecked_tables`); they run with
  ``session_replication_role = replica`` (the database's per-row foreign-key
  triggers off) for those statements only. The referenced rows found are
  locked ``FOR KEY SHARE`` (what the trigger would do), so no other
  transaction can delete one or change its key before this one commits: the
  database never ends with a dangling reference. Deletes always run with the
  triggers on (cascades, and the rows that still refer to a deleted one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Connection, Table

from exchange.database import rows
from exchange.database.capture import _pg_in_error
from exchange.errors import ConfigError

log = logging.getLogger(__name__)

#: ``[import] reference_check`` values.
BY_DATABASE = "database"
BY_EXCHANGE = "exchange"
CHOICES = (BY_DATABASE, BY_EXCHANGE)
DEFAULT = BY_DATABASE

#: A separator no key value holds (keys are printable text): joins a multi-column value into one.
_SEP = "\x1f"


def setting(section: Any) -> str:
    """``[import] reference_check`` from its section (a mapping, or anything else when absent)."""
    value = section.get("reference_check", DEFAULT) if isinstance(section, Mapping) else DEFAULT
    if value not in CHOICES:
        raise ConfigError(f"[import] reference_check = {value!r}: expected one of {', '.join(CHOICES)}",
                          hint="Set it to \"database\" (the default) or \"exchange\" in exchange.toml.")
    return str(value)


def _text(arr: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return arr if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) else pc.cast(arr, pa.string())


def _joined(data: pa.Table, cols: Sequence[str]) -> pa.ChunkedArray | pa.Array:
    """One text value per row: the values of ``cols`` (null where any is null: MATCH SIMPLE)."""
    parts = [_text(data.column(c)) for c in cols]
    return parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, _SEP)


def _quote(conn: Connection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


def _sql_type(conn: Connection, table: Table, column: str) -> str:
    return str(table.c[column].type.compile(dialect=conn.dialect))


def _found(conn: Connection, ref: Table, ref_cols: Sequence[str], values: list[str], lock: bool) -> set[str]:
    """Which of ``values`` (joined text of ``ref_cols``) are rows of ``ref``; locked FOR KEY SHARE if asked.

    Compared as PostgreSQL's text of the row found: a value whose text differs from Arrow's (a
    timestamp's format) counts as missing, which only sends its document to the database's own check.
    """
    q = rows.driver_sql
    arrays = [[v.split(_SEP)[i] for v in values] for i in range(len(ref_cols))] if len(ref_cols) > 1 \
        else [values]
    names = [f"v{i}" for i in range(len(ref_cols))]
    unnest = ", ".join("?::text[]" for _ in ref_cols)
    on = " AND ".join(f"r.{_quote(conn, c)} = v.{n}::{_sql_type(conn, ref, c)}"
                      for c, n in zip(ref_cols, names, strict=True))
    out = ", ".join(f"r.{_quote(conn, c)}::text" for c in ref_cols)
    sql = (f"SELECT {out} FROM {conn.dialect.identifier_preparer.format_table(ref)} r JOIN unnest({unnest}) AS v({', '.join(names)}) "
           f"ON {on}" + (" FOR KEY SHARE OF r" if lock else ""))
    found = conn.exec_driver_sql(q(conn, sql), tuple(arrays)).all()
    return {_SEP.join(str(x) for x in r) for r in found}


def missing(conn: Connection, tables: Mapping[str, Table], doc_tables: Sequence[str], key_cols: Sequence[str],
            data: Mapping[str, pa.Table], lock: bool = False) -> set[str]:
    """Canonical keys of the documents in ``data`` whose rows name a row the database lacks.

    ``tables``: the tables by name (the catalog's); ``doc_tables``: the document type's own tables,
    whose references are checked against ``data`` itself (a line's header travels with it), less the
    documents found missing (until none is added: a document naming one that will not be written is
    missing too), and a value not there counts as missing (the database's own check then decides, one
    by one). Every other foreign key is one query per referenced table over its distinct values;
    ``lock`` keeps the rows found FOR KEY SHARE until the transaction ends.
    """
    bad: set[str] = set()
    own = set(doc_tables)
    inside: list[tuple[pa.Table, list[str], pa.Array, str, list[str]]] = []
    for tname, tab in data.items():
        if not tab.num_rows or tname not in tables:
            continue
        for fk in tables[tname].foreign_key_constraints:
            cols = [e.parent.name for e in fk.elements]
            ref_cols = [e.column.name for e in fk.elements]
            if not cols or any(c not in tab.column_names for c in cols):
                continue
            used = _joined(tab, cols)
            distinct = pc.unique(pc.drop_null(used))
            if not len(distinct):
                continue
            ref = fk.referred_table
            if ref.name in own:  # (its values made again below only if some are absent: a bundle's
                inside.append((tab, cols, distinct, ref.name, ref_cols))  # lines held here were the peak)
                continue
            values = distinct.to_pylist()
            found = _found(conn, ref, ref_cols, values, lock)
            absent = pa.array([v for v in values if v not in found], pa.string())
            if len(absent):
                hit = tab.filter(pc.fill_null(pc.is_in(used, value_set=absent), False))
                bad.update(rows.row_keys(hit, key_cols))
    for _round in range(len(bad) + sum(t.num_rows for t in data.values()) + 1):  # each round adds one or stops
        before = len(bad)
        for tab, cols, distinct, ref_name, ref_cols in inside:
            known = _written(data.get(ref_name), ref_cols, key_cols, bad)
            absent = pc.filter(distinct, pc.invert(pc.is_in(distinct, value_set=known)))
            if len(absent):
                hit = tab.filter(pc.fill_null(pc.is_in(_joined(tab, cols), value_set=absent), False))
                bad.update(rows.row_keys(hit, key_cols))
        if len(bad) == before:
            break
    return bad


def _written(have: pa.Table | None, ref_cols: Sequence[str], key_cols: Sequence[str], bad: set[str]) -> pa.Array:
    """The values of ``ref_cols`` in ``have`` (a table of the batch), less the rows of documents ``bad``."""
    if have is None or not have.num_rows or any(c not in have.column_names for c in [*ref_cols, *key_cols]):
        return pa.array([], pa.string())
    if bad:
        doc = _joined(have, key_cols)
        text = pa.array(sorted(_SEP.join(rows.parse_key(k)) for k in bad), pa.string())
        have = have.filter(pc.invert(pc.fill_null(pc.is_in(doc, value_set=text), False)))
    return pc.unique(pc.drop_null(_joined(have, ref_cols)))


def unchecked_tables(conn: Connection, tables: Sequence[Table]) -> set[str]:
    """Which of ``tables`` may be written with the foreign-key triggers off (``reference_check = "exchange"``).

    Only where nothing else depends on the triggers: the table has no trigger but the database's own
    and exchange's capture triggers (which the importer suppresses anyway), no rule (replica skips
    rules too), and every foreign key that
    refers to it names primary-key columns (which an upsert by primary key never changes); and only if
    this database role may set ``session_replication_role`` (a superuser, or granted SET on it).
    """
    if conn.dialect.name != "postgresql" or not tables:
        return set()
    allowed = conn.exec_driver_sql(
        "SELECT current_setting('is_superuser') = 'on' OR (current_setting('server_version_num')::int >= 150000 "
        "AND has_parameter_privilege('session_replication_role', 'SET'))").scalar()
    if not allowed:
        log.warning("[import] reference_check = \"exchange\" needs a role that may set session_replication_role "
                    "(a superuser, or GRANT SET ON PARAMETER session_replication_role): the database checks")
        return set()
    out: set[str] = set()
    for table in tables:
        name = str(conn.dialect.identifier_preparer.format_table(table))
        triggers = conn.exec_driver_sql(rows.driver_sql(conn, (
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(?) AND NOT tgisinternal "
            "AND tgname NOT LIKE ?")), (name, "xchg\\_cap\\_%")).scalar()
        loose = conn.exec_driver_sql(rows.driver_sql(conn, (
            "SELECT count(*) FROM pg_constraint c JOIN pg_index i ON i.indrelid = c.confrelid AND i.indisprimary "
            "WHERE c.contype = 'f' AND c.confrelid = to_regclass(?) AND NOT (c.confkey <@ i.indkey::int2[])")),
            (name,)).scalar()
        rules = conn.exec_driver_sql(rows.driver_sql(conn, (  # a rule is skipped under replica too
            "SELECT count(*) FROM pg_rewrite WHERE ev_class = to_regclass(?) AND rulename <> '_RETURN'")),
            (name,)).scalar()
        if triggers == 0 and loose == 0 and rules == 0:
            out.add(table.name)
    return out


@contextmanager
def triggers_off(conn: Connection, on: bool) -> Iterator[None]:
    """Within the block (if ``on``), this transaction's writes fire no foreign-key trigger (PostgreSQL)."""
    if not on:
        yield
        return
    conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    try:
        yield
    finally:
        if conn.in_transaction() and not _pg_in_error(conn):  # else rolled back (to a savepoint), or about
            conn.exec_driver_sql("SET LOCAL session_replication_role = origin")  # to be: the setting goes too
