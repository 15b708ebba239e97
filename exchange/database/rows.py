"""Documents' rows between the database and Arrow.

Rows move as Arrow tables, one per database table, never as one object per
document. Keys travel as canonical text: a JSON array of the key values as
strings (``["s001","B00042"]``), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import (
    Boolean, Connection, Date, DateTime, Float, Integer, Numeric, Table, delete, select, tuple_,
)

from exchange.database.sqlite_arrow import CONVERTED, Convert, converted, from_stored

if TYPE_CHECKING:
    from exchange.database.sqlite_arrow import SqliteArrowReader, Statement

log = logging.getLogger(__name__)

CHUNK = 500  # keys per IN (...) list
SMALL_PG = 32  # up to this many keys, PostgreSQL deletes by ``(a, b) IN (...)``: one statement, not five of a key table
WRITE_BATCH = 8192  # rows per executemany or COPY write: bounds the Python objects alive at once


def canonical_key(values: Iterable[Any]) -> str:
    return json.dumps([str(v) for v in values], separators=(",", ":"))


def parse_key(doc_key: str) -> list[str]:
    value = json.loads(doc_key)
    if not isinstance(value, list):
        raise ValueError(f"document key {doc_key!r} is not a JSON array")
    return [str(v) for v in value]


#: A canonical key of printable-ASCII text values: nothing to escape, no space after a comma.
_CANONICAL = re.compile(r'\["[ !#-\[\]-~]*"(?:,"[ !#-\[\]-~]*")*\]')


def is_canonical(doc_key: str) -> bool:
    """Whether a key is canonical as it stands (printable ASCII, nothing escaped: the common case)."""
    return _CANONICAL.fullmatch(doc_key) is not None


def canonicalize(doc_key: str) -> str:
    """A key as the database rendered it -> the canonical form.

    SQLite's ``json_array`` of text already writes the canonical form for
    printable ASCII, PostgreSQL's ``jsonb::text`` differs only by a space after
    each comma: those are recognised without parsing (a value holds no bare
    quote, so ``", "`` only ever separates values); anything else goes through
    ``json``.
    """
    if _CANONICAL.fullmatch(doc_key):
        return doc_key
    fast = doc_key.replace('", "', '","')
    if fast is not doc_key and _CANONICAL.fullmatch(fast):
        return fast
    return canonical_key(parse_key(doc_key))


def arrow_type(column: Any) -> pa.DataType:
    """The Arrow type a column travels as; exact decimals stay decimal128."""
    t = column.type
    impl = getattr(t, "impl", t)
    scale = getattr(t, "scale", None)
    if isinstance(t, Float) or isinstance(impl, Float):  # not a Numeric in SQLAlchemy 2.1
        return pa.float64()
    if isinstance(t, Numeric) or isinstance(impl, Numeric) or scale is not None:
        precision = getattr(t, "precision", None) or 18
        return pa.decimal128(precision, scale if scale is not None else 0)
    if isinstance(impl, Boolean):
        return pa.bool_()
    if isinstance(impl, Integer):
        return pa.int64()
    if isinstance(impl, DateTime):
        return pa.timestamp("us", tz="UTC" if getattr(impl, "timezone", False) else None)
    if isinstance(impl, Date):
        return pa.date32()
    return pa.string()


def zone_only(got: pa.DataType, want: pa.DataType) -> bool:
    """Two timestamp types that differ only in being naive or UTC (same unit): the same instants, since a
    naive time exchange stores or sends is UTC. Not a schema change (docs/CATALOG.md, "Business times")."""
    return (pa.types.is_timestamp(got) and pa.types.is_timestamp(want) and got.unit == want.unit
            and got.tz != want.tz and got.tz in (None, "UTC") and want.tz in (None, "UTC"))


def with_zones(data: pa.Table, expected: pa.Schema) -> pa.Table:
    """``data`` with each time column naive or UTC as ``expected`` holds it (:func:`zone_only`).

    Bundles of format 2 (and senders whose column is still declared without a
    zone) carry naive times; their zone was never recorded, so they are taken as
    UTC, the instant exchange has always stored (docs/FORMAT.md, version 3). The
    other way, a zone-aware time for a column this node has not migrated yet is
    written as its UTC wall time, the naive form of the same instant (version 6).
    Any other difference is left for the caller to report.
    """
    for i, f in enumerate(data.schema):
        want = expected.field(f.name).type if f.name in expected.names else None
        if want is not None and zone_only(f.type, want):
            data = data.set_column(i, pa.field(f.name, want, f.nullable), data.column(i).cast(
                pa.timestamp(want.unit)).cast(want))
    return data


def arrow_schema(table: Table) -> pa.Schema:
    return pa.schema([pa.field(c.name, arrow_type(c), nullable=c.nullable is not False)
                      for c in table.columns])


def typed_key(table: Table, key_cols: Sequence[str], key: Sequence[str]) -> tuple[Any, ...]:
    """A parsed key's values in the types of ``table``'s key columns (integers as int)."""
    out = []
    for name, value in zip(key_cols, key, strict=True):
        out.append(int(value) if isinstance(table.c[name].type, Integer) else value)
    return tuple(out)


def _key_chunks(table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> Iterable[list[tuple[Any, ...]]]:
    typed = [typed_key(table, key_cols, parse_key(k)) for k in keys]
    for i in range(0, len(typed), CHUNK):
        yield typed[i:i + CHUNK]


def _where(table: Table, key_cols: Sequence[str], chunk: list[tuple[Any, ...]]) -> Any:
    if len(key_cols) == 1:
        return table.c[key_cols[0]].in_([k[0] for k in chunk])
    return tuple_(*[table.c[c] for c in key_cols]).in_(chunk)


def _q(conn: Connection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


def driver_sql(conn: Connection, sql: str) -> str:
    """``sql`` written with ``?`` placeholders, in the driver's paramstyle."""
    return sql if conn.dialect.paramstyle == "qmark" else sql.replace("?", "%s")


def fetch_tuples(conn: Connection, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """All rows of ``sql`` (``?`` placeholders) as the driver's plain tuples: no SQLAlchemy Row per row."""
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(driver_sql(conn, sql), params)
        return list(cur.fetchall())
    finally:
        cur.close()


def executemany(conn: Connection, sql: str, params: Sequence[tuple[Any, ...]]) -> None:
    """Run ``sql`` (written with ``?`` placeholders) once per tuple, on the driver's fast path."""
    if not params:
        return
    conn.exec_driver_sql(driver_sql(conn, sql), list(params))


def _pg_cursor(conn: Connection) -> Any:
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def _scale(column: Any) -> int | None:
    from exchange.database.schema import scale_of

    return scale_of(column)


def _to_minor(arr: pa.Array) -> pa.Array:
    """decimal128(p, s) -> int64 minor units (reinterpret the 128-bit integers)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    raw = pa.Array.from_buffers(pa.decimal128(38, 0), len(arr), arr.buffers(), offset=arr.offset)
    return pc.cast(raw, pa.int64())


def _sqlite_column(column: Any, field: pa.Field, values: list[Any]) -> pa.Array | pa.ChunkedArray:
    """One column of Python values as sqlite3 returned them -> the column's Arrow type."""
    phys = _physical(column, field)
    if pa.types.is_decimal(field.type) and _scale(column) is None:
        phys = field.type  # an unscaled decimal: whatever sqlite3 gave, converted by Arrow
    return _from_physical(column, field, pa.array(values, phys))


def _sqlite_values(column: Any, arr: Any) -> list[Any]:
    """An Arrow column as the Python values SQLAlchemy would store on SQLite."""
    t = arr.type
    if pa.types.is_decimal(t) and _scale(column) is not None:
        arr = _to_minor(arr)
    elif pa.types.is_date32(t) or pa.types.is_timestamp(t):
        arr = arr.cast(pa.string())
    elif pa.types.is_boolean(t):
        arr = arr.cast(pa.int8())
    elif pa.types.is_decimal(t):
        return [None if v is None else str(v) for v in arr.to_pylist()]
    values: list[Any] = arr.to_pylist()
    return values


@contextmanager
def _key_table(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> Iterator[str]:
    """A temporary table holding ``keys``, typed like ``table``'s key columns, to join on."""
    name = f"xchg_keys_{table.name}"[:60]
    qn, cols = _q(conn, name), ", ".join(_q(conn, c) for c in key_cols)
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {qn} AS SELECT {cols} FROM {_q(conn, table.name)} WITH NO DATA")
        conn.exec_driver_sql(f"TRUNCATE {qn}")  # temporary tables are never vacuumed: no dead rows
        with _pg_cursor(conn).copy(f"COPY {qn} ({cols}) FROM STDIN") as copy:
            for k in keys:
                copy.write_row(typed_key(table, key_cols, parse_key(k)))
    else:  # one statement: the keys as one JSON parameter, split by SQLite (typed by column affinity)
        conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {qn} AS SELECT {cols} FROM {_q(conn, table.name)} WHERE 0")
        conn.exec_driver_sql(f"DELETE FROM {qn}")
        conn.exec_driver_sql(f"INSERT INTO {qn} ({cols}) {_json_keys_select(len(key_cols))}", (_keys_param(keys),))
    try:
        yield qn
    finally:
        conn.exec_driver_sql(f"{'TRUNCATE' if conn.dialect.name == 'postgresql' else 'DELETE FROM'} {qn}")


@contextmanager
def text_key_table(conn: Connection, keys: Sequence[str]) -> Iterator[str]:
    """A temporary one-column table ``k`` of text keys (canonical document keys), to join on."""
    name = _q(conn, "xchg_text_keys")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {name} (k text)")
        conn.exec_driver_sql(f"TRUNCATE {name}")
        with _pg_cursor(conn).copy(f"COPY {name} (k) FROM STDIN") as copy:
            for k in keys:
                copy.write_row((k,))
    else:
        conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {name} (k TEXT)")
        conn.exec_driver_sql(f"DELETE FROM {name}")
        executemany(conn, f"INSERT INTO {name} (k) VALUES (?)", [(k,) for k in keys])
    try:
        yield name
    finally:
        conn.exec_driver_sql(f"{'TRUNCATE' if conn.dialect.name == 'postgresql' else 'DELETE FROM'} {name}")


def read_docs(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> pa.Table:
    """The current rows of the documents ``keys`` in ``table``, as one Arrow table."""
    return read_doc_tables(conn, [table], key_cols, keys)[table.name]


def read_doc_tables(conn: Connection, tables: Sequence[Table], key_cols: Sequence[str],
                    keys: Sequence[str], reader: SqliteArrowReader | None = None) -> dict[str, pa.Table]:
    """The rows of the documents ``keys`` in each of ``tables`` (a header and its children).

    Rows come in key order (on SQLite, of the keys' canonical text), a
    document's rows in the table's primary-key order,
    never one Python object per row where it can be helped: PostgreSQL joins a
    temporary key table and sends CSV through COPY, parsed by Arrow; SQLite
    joins the keys as one JSON parameter and is read by ADBC in a helper process
    (``reader``, see :mod:`exchange.database.sqlite_arrow`) or, for small batches and
    whenever the helper cannot answer, through ``sqlite3`` tuples.
    """
    if not keys:
        return {t.name: arrow_schema(t).empty_table() for t in tables}
    if conn.dialect.name == "sqlite":
        ordered = _sorted_keys(keys)
        if reader is not None:
            from exchange.database.sqlite_arrow import ReaderUnavailable

            try:
                return _read_sqlite_arrow(conn, reader, tables, key_cols, ordered)
            except (ReaderUnavailable, pa.ArrowException) as exc:
                log.info("reading %s through sqlite3: %s", tables[0].name, exc)
        return _read_sqlite(conn, tables, key_cols, ordered)
    if conn.dialect.name != "postgresql":
        return {t.name: _read_docs_portable(conn, t, key_cols, keys, arrow_schema(t)) for t in tables}
    out: dict[str, pa.Table] = {}
    with _key_table(conn, tables[0], key_cols, keys) as kt:
        for table in tables:
            schema = arrow_schema(table)
            order = [f"t.{_q(conn, c)}" for c in key_cols] + (["t.line_no"] if "line_no" in table.c else [])
            cols = ", ".join(f"t.{_q(conn, c.name)}" for c in table.columns)
            on = " AND ".join(f"t.{_q(conn, c)} = k.{_q(conn, c)}" for c in key_cols)
            sql = f"SELECT {cols} FROM {_q(conn, table.name)} t JOIN {kt} k ON {on} ORDER BY {', '.join(order)}"
            out[table.name] = _pg_copy_out(conn, sql, schema)
    return out


def _sorted_keys(keys: Sequence[str]) -> list[str]:
    """``keys`` in the order of their canonical text: the same batch gives the same tables.

    For text keys this is ``ORDER BY`` the key columns; numeric key values sort as text.
    """
    return sorted(keys)


def _keys_param(keys: Sequence[str]) -> str:
    """Canonical keys (each a JSON array) as one JSON array of arrays, for ``json_each(?)``."""
    return "[" + ",".join(keys) + "]"


def _json_keys_select(width: int) -> str:
    """The key values of the ``json_each(?)`` parameter (:func:`_keys_param`) as columns, in its order."""
    values = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(width))
    return f"SELECT {values} FROM json_each(?) ORDER BY key"


def _sqlite_join_sql(conn: Connection, table: Table, key_cols: Sequence[str]) -> str:
    """Rows of ``table`` whose key is in the ``json_each(?)`` parameter, in the parameter's order.

    ``CROSS JOIN`` keeps the parameter as the outer loop, so each key is one
    primary-key index seek and rows come out in key order without a sort.
    """
    cols = ", ".join(f"t.{_q(conn, c.name)}" for c in table.columns)
    on = " AND ".join(f"t.{_q(conn, c)} = json_extract(k.value, '$[{i}]')" for i, c in enumerate(key_cols))
    return f"SELECT {cols} FROM json_each(?) AS k CROSS JOIN {_q(conn, table.name)} AS t ON {on}"


def _physical(column: Any, field: pa.Field) -> pa.DataType:
    """The Arrow type of the values SQLite stores for ``column`` (what a driver reads back)."""
    t = field.type
    if (pa.types.is_decimal(t) and _scale(column) is not None) or pa.types.is_boolean(t):
        return pa.int64()
    if pa.types.is_date32(t) or pa.types.is_timestamp(t) or pa.types.is_decimal(t):
        return pa.string()
    return t


def _sentinel(phys: pa.DataType) -> str:
    if pa.types.is_integer(phys):
        return "0"
    if pa.types.is_floating(phys):
        return "0.0"
    if pa.types.is_binary(phys):
        return "X''"
    return "''"


def _from_physical(column: Any, field: pa.Field, arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """SQLite's stored values (int64 minor units, text dates, 0/1) -> the column's Arrow type."""
    return from_stored(arr, field, _minor_units(column, field))


def _convert(table: Table, schema: pa.Schema) -> Convert:
    """How the reader's rows of ``table`` become ``schema`` (:class:`~exchange.database.sqlite_arrow.Convert`)."""
    return Convert(schema, tuple(_minor_units(c, f) for c, f in zip(table.columns, schema, strict=True)))


def _minor_units(column: Any, field: pa.Field) -> bool:
    """Whether SQLite holds ``column`` (a decimal with a scale) as integer minor units."""
    return pa.types.is_decimal(field.type) and _scale(column) is not None


#: The helper's key table: made, filled and dropped in each request's read transaction.
_READER_KEYS = "xchg_batch_keys"


def _arrow_queries(conn: Connection, tables: Sequence[Table], key_cols: Sequence[str],
                   keys: Sequence[str]) -> list[Statement]:
    """The helper's request for a batch: its keys into a temporary table, then one query per table.

    The keys are parsed out of their JSON once, not once per table: 14% of the
    helper's time for a header and two child tables (measured here).
    """
    cols = [f"k{i}" for i in range(len(key_cols))]  # no declared type: compared as json_extract's text
    kt = f"{_READER_KEYS}{len(cols)}"
    queries: list[Statement] = [  # made in the transaction, gone with its rollback; emptied should one remain
        (f"CREATE TEMP TABLE IF NOT EXISTS {kt} ({', '.join(cols)})", [], False),
        (f"DELETE FROM temp.{kt}", [], False),
        (f"INSERT INTO temp.{kt} {_json_keys_select(len(cols))}", [_keys_param(keys)], False)]
    on = " AND ".join(f"t.{_q(conn, c)} = k.{k}" for c, k in zip(key_cols, cols, strict=True))
    for table in tables:
        schema = arrow_schema(table)
        phys = [_physical(c, f) for c, f in zip(table.columns, schema, strict=True)]
        # a first row of the right storage classes: the driver types columns from its first rows,
        # and a column NULL there (a walk-in customer) would come back int64 and then fail
        first = ", ".join(f"{_sentinel(p)} AS {_q(conn, c.name)}" for p, c in zip(phys, table.columns, strict=True))
        select = ", ".join(f"t.{_q(conn, c.name)}" for c in table.columns)
        # CROSS JOIN: the key table is the outer loop, in the keys' order: one index seek per key
        queries.append((f"SELECT {first} UNION ALL SELECT {select} FROM temp.{kt} AS k "
                        f"CROSS JOIN {_q(conn, table.name)} AS t ON {on}", [], True,
                        _convert(table, schema)))
    return queries


def prefetch_doc_tables(conn: Connection, tables: Sequence[Table], key_cols: Sequence[str],
                        keys: Sequence[str], reader: SqliteArrowReader) -> None:
    """Ask ``reader`` ahead for what :func:`read_doc_tables` will read next (SQLite only)."""
    if keys and conn.dialect.name == "sqlite":
        reader.send(_arrow_queries(conn, tables, key_cols, _sorted_keys(keys)))


def _read_sqlite_arrow(conn: Connection, reader: SqliteArrowReader, tables: Sequence[Table],
                       key_cols: Sequence[str], keys: Sequence[str]) -> dict[str, pa.Table]:
    out: dict[str, pa.Table] = {}
    for table, got in zip(tables, reader.query(_arrow_queries(conn, tables, key_cols, keys)), strict=True):
        schema = arrow_schema(table)
        if got.schema.metadata and CONVERTED in got.schema.metadata:  # the reader process converted it
            out[table.name] = pa.Table.from_arrays(got.columns, schema=schema)
            continue
        out[table.name] = converted(got, _convert(table, schema))  # (its first answer, sent before it was warm)
    return out


def _read_sqlite(conn: Connection, tables: Sequence[Table], key_cols: Sequence[str],
                 keys: Sequence[str]) -> dict[str, pa.Table]:
    """The sqlite3 path: tuples straight into one Arrow struct array per table."""
    param = _keys_param(keys)
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    out: dict[str, pa.Table] = {}
    try:
        for table in tables:
            schema = arrow_schema(table)
            rows = cur.execute(_sqlite_join_sql(conn, table, key_cols), (param,)).fetchall()
            try:
                phys = pa.struct([pa.field(c.name, _physical(c, f)) for c, f in zip(table.columns, schema, strict=True)])
                got = pa.Table.from_struct_array(pa.array(rows, type=phys))
                arrays = [_from_physical(c, f, got.column(i))
                          for i, (c, f) in enumerate(zip(table.columns, schema, strict=True))]
            except (pa.ArrowException, TypeError, ValueError):  # odd storage classes: value by value
                columns = list(zip(*rows, strict=True)) if rows else [() for _ in table.columns]
                arrays = [_sqlite_column(c, f, list(v)) for c, f, v in zip(table.columns, schema, columns, strict=True)]
            out[table.name] = pa.Table.from_arrays(arrays, schema=schema)
    finally:
        cur.close()
    return out


def _pg_copy_out(conn: Connection, sql: str, schema: pa.Schema) -> pa.Table:
    import io

    buf = io.BytesIO()
    with _pg_cursor(conn).copy(f"COPY ({sql}) TO STDOUT (FORMAT csv, HEADER true)") as copy:
        for chunk in copy:
            buf.write(chunk)
    if buf.tell() == 0:
        return schema.empty_table()
    buf.seek(0)
    return _pg_csv_read(buf, schema)


#: What a failed encoding may raise: Arrow's conversions, and Python's for values of the wrong kind.
ENCODE_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


def unencodable(conn: Connection, table: Table, key_cols: Sequence[str], key: str) -> list[tuple[str, str, str]]:
    """(column, value as text, error) of each value of document ``key``'s rows in ``table`` that its
    column's Arrow type cannot hold: what made :func:`read_doc_tables` fail, named for an operator.

    Each value goes through the conversion a batch takes (SQLite: the stored value; PostgreSQL: its
    COPY text through the same CSV options), so a value named here is one that fails there.
    """
    schema = arrow_schema(table)
    where = " AND ".join(f"{_q(conn, c)} = ?" for c in key_cols)
    params = typed_key(table, key_cols, parse_key(key))
    pg = conn.dialect.name == "postgresql"
    out: list[tuple[str, str, str]] = []
    for column, fld in zip(table.columns, schema, strict=True):
        qc = _q(conn, column.name)
        got = fetch_tuples(conn, f"SELECT {qc}{'::text' if pg else ''} FROM {_q(conn, table.name)} WHERE {where}",
                           params)
        for (value,) in got:
            try:
                if pg:
                    _pg_csv_values([value], fld)
                else:
                    _sqlite_column(column, fld, [value])
            except ENCODE_ERRORS as exc:
                out.append((column.name, str(value), f"{type(exc).__name__}: {exc}"))
                break  # one value per column says enough
    return out


def _pg_csv_values(texts: list[str | None], fld: pa.Field) -> pa.Table:
    """PostgreSQL text values of one column through the CSV conversion :func:`_pg_copy_out` uses."""
    import csv
    import io

    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow([fld.name])
    for t in texts:
        w.writerow(["" if t is None else t])
    return _pg_csv_read(io.BytesIO(text.getvalue().encode()), pa.schema([fld]))


def _pg_csv_read(buf: Any, schema: pa.Schema) -> pa.Table:
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(buf, convert_options=pacsv.ConvertOptions(
        column_types={f.name: f.type for f in schema}, strings_can_be_null=True,
        quoted_strings_can_be_null=False, true_values=["t", "true"], false_values=["f", "false"]))
    return table.cast(schema)


def _read_docs_portable(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str],
                        schema: pa.Schema) -> pa.Table:
    columns: list[list[Any]] = [[] for _ in table.columns]
    for chunk in _key_chunks(table, key_cols, keys):
        for row in conn.execute(select(table).where(_where(table, key_cols, chunk))):
            for i, v in enumerate(row):
                columns[i].append(v)
    return pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)],
                                schema=schema)


def delete_docs(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> int:
    """Delete the rows of documents ``keys`` from ``table``, by index.

    Keys of several columns always go through a key table: SQLite plans
    ``(a, b) IN ((?, ?), ...)`` as a scan of the whole table, which made an
    HO's fan-in quadratic (each store's bundle scanned every sales line
    received before it: 200 bundles of 2,000 lines, 19 of 38 s).
    """
    if not keys:
        return 0
    if conn.dialect.name == "sqlite" and len(keys) >= SQLITE_STAGE_MIN and not _sqlite_may_hold(conn, table, key_cols, keys):
        return 0  # no row within the keys' bounds: the key table and the delete would find nothing
    small_pg = conn.dialect.name == "postgresql" and len(keys) <= SMALL_PG  # PostgreSQL seeks a short row IN
    if conn.dialect.name in ("sqlite", "postgresql") and (len(keys) > CHUNK or len(key_cols) > 1) and not small_pg:
        cols = ", ".join(_q(conn, c) for c in key_cols)
        with _key_table(conn, table, key_cols, keys) as kt:
            res = conn.exec_driver_sql(
                f"DELETE FROM {_q(conn, table.name)} WHERE ({cols}) IN (SELECT {cols} FROM {kt})")
            return int(res.rowcount or 0)
    n = 0
    for chunk in _key_chunks(table, key_cols, keys):
        n += conn.execute(delete(table).where(_where(table, key_cols, chunk))).rowcount or 0
    return n


def _sqlite_may_hold(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> bool:
    """Whether ``table`` may hold a row of documents ``keys``: false only when no row lies within their bounds.

    An empty HO's first load deleted each batch's child rows through a key table of every key
    built from JSON, and found none (docs/PERFORMANCE.md "Import into SQLite, 2026-12-03, later").
    One index range probe answers the same question when it can be answered exactly: every key
    value plain ASCII text (:func:`split_keys`), every key column of TEXT affinity, and no
    ``COLLATE`` in the table's definition (BINARY: equal values are the same bytes, so a row
    equal to a key lies between the keys' smallest and largest value of each column). Anything
    else answers true: the delete runs as before.
    """
    values = split_keys(pa.array(keys, pa.string()), len(key_cols))
    if values is None:
        return True
    qt = _q(conn, table.name)
    sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table.name,)).scalar()
    if not isinstance(sql, str) or "COLLATE" in sql.upper():
        return True
    declared: dict[str, str] = {str(n): str(t) for n, t in conn.exec_driver_sql(
        "SELECT name, upper(type) FROM pragma_table_info(?)", (table.name,))}
    for c in key_cols:  # SQLite's affinity rules: INT first, then CHAR, CLOB or TEXT
        t = str(declared.get(c, "INT"))
        if "INT" in t or not any(w in t for w in ("CHAR", "CLOB", "TEXT")):
            return True
    where: list[str] = []
    params: list[Any] = []
    ranged = False
    for c, col in zip(key_cols, values, strict=True):
        bounds = pc.min_max(col)
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if lo == hi and not ranged:  # equal leading columns first: the index seeks to the range of the next
            where.append(f"{_q(conn, c)} = ?")
            params.append(lo)
        else:
            ranged = True
            where.append(f"{_q(conn, c)} BETWEEN ? AND ?")
            params += [lo, hi]
    found = conn.exec_driver_sql(f"SELECT 1 FROM {qt} WHERE {' AND '.join(where)} LIMIT 1", tuple(params)).first()
    return found is not None


def _check_columns(table: Table, data: pa.Table) -> list[str]:
    unknown = set(data.column_names) - set(table.c.keys())
    if unknown:
        raise ValueError(f"table {table.name}: unknown columns {sorted(unknown)}")
    return list(data.column_names)


def _slices(data: pa.Table) -> Iterator[pa.Table]:
    """``data`` in zero-copy slices of WRITE_BATCH rows."""
    for i in range(0, data.num_rows, WRITE_BATCH):
        yield data.slice(i, WRITE_BATCH)


def _pg_copy_in(conn: Connection, target: str, cols: list[str], data: pa.Table) -> None:
    """COPY as CSV, a slice at a time: the whole table as one CSV text (and its bytes copy) is not held."""
    import pyarrow.csv as pacsv

    from sqlalchemy.exc import DBAPIError

    collist = ", ".join(_q(conn, c) for c in cols)
    options = pacsv.WriteOptions(include_header=False)
    statement = f"COPY {target} ({collist}) FROM STDIN (FORMAT csv)"
    driver_error = conn.dialect.loaded_dbapi.Error
    try:
        with _pg_cursor(conn).copy(statement) as copy:
            for part in _slices(data):
                sink = pa.BufferOutputStream()
                pacsv.write_csv(part, sink, options)
                copy.write(sink.getvalue().to_pybytes())
    except driver_error as exc:  # the driver's own error, wrapped as SQLAlchemy wraps an execute's: a foreign
        # key a parked document breaks is an IntegrityError (parked), a lost disk an OperationalError (raised)
        raise DBAPIError.instance(statement, None, exc, driver_error) from exc


def _sqlite_write(conn: Connection, sql: str, table: Table, data: pa.Table, cols: list[str]) -> None:
    """``sql`` (``?`` placeholders) once per row of ``data``, on the driver's cursor, a slice at a time.

    The rows go to ``executemany`` as an iterator: one parameter tuple alive at a
    time, beside one slice's column values (a list of a slice's tuples was the
    import's peak). A driver error is raised as SQLAlchemy raises an execute's
    (an IntegrityError parks the document, a full disk stops the import).
    """
    from sqlalchemy.exc import DBAPIError

    driver_error = conn.dialect.loaded_dbapi.Error
    cur: Any = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]  # sqlite3's takes an iterator
    try:
        for part in _slices(data):
            cur.executemany(sql, zip(*[_sqlite_values(table.c[c], part.column(c)) for c in cols], strict=True))
    except driver_error as exc:
        raise DBAPIError.instance(sql, None, exc, driver_error) from exc
    finally:
        cur.close()


#: From this many rows, SQLite writes go through a staging table (:func:`_sqlite_stage`).
SQLITE_STAGE_MIN = 256


def _sqlite_stage(conn: Connection, table: Table, data: pa.Table, cols: list[str]) -> str:
    """``data`` in an empty temporary table of ``cols`` typed like ``table``'s (no key, index or foreign key).

    Rows bound one by one into a table without indexes or constraints, then
    written by one ``INSERT ... SELECT``, cost less than the same rows bound one
    by one into the real table: SQLite runs one statement for all of them
    instead of a statement per row (docs/PERFORMANCE.md "Import into SQLite,
    2026-12-03"). The stage's name carries its columns and their types, so a
    table that ``exchange migrate`` changed gets a stage of its own, and no
    statement recreates one (a schema change makes SQLite prepare every
    statement of the connection again). Whoever reads the stage empties it
    (:func:`_sqlite_staged`); this empties it first too, in case an error
    left rows in it.
    """
    shape = ",".join(f"{c}:{table.c[c].type}" for c in cols)
    stage = _q(conn, f"xchg_stg_{table.name}"[:50] + f"_{zlib.crc32(shape.encode()):08x}")
    collist = ", ".join(_q(conn, c) for c in cols)
    conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {stage} AS SELECT {collist} FROM {_q(conn, table.name)} WHERE 0")
    conn.exec_driver_sql(f"DELETE FROM temp.{stage}")
    _sqlite_fill(conn, f"temp.{stage}", table, data, cols)
    return f"temp.{stage}"


def _sqlite_fill(conn: Connection, stage: str, table: Table, data: pa.Table, cols: list[str]) -> None:
    """``data`` into ``stage`` (a table without constraints), many rows per statement.

    ``INSERT ... VALUES (...), (...), ...`` of :data:`_FILL_ROWS` rows binds the
    same values as one statement per row at about 0.6 of the cost (the driver's
    step and reset once per group, not once per row); fewer than 999 parameters
    a statement, the oldest SQLite's limit.
    """
    import itertools

    from sqlalchemy.exc import DBAPIError

    group = max(1, min(_FILL_ROWS, 998 // max(1, len(cols))))
    one = f"({', '.join('?' for _ in cols)})"
    many = f"INSERT INTO {stage} ({', '.join(_q(conn, c) for c in cols)}) VALUES {', '.join([one] * group)}"
    single = f"INSERT INTO {stage} ({', '.join(_q(conn, c) for c in cols)}) VALUES {one}"
    width = group * len(cols)
    driver_error = conn.dialect.loaded_dbapi.Error
    cur: Any = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        for start in range(0, data.num_rows, _FILL_BATCH):  # a quarter of WRITE_BATCH: fewer objects alive
            part = data.slice(start, _FILL_BATCH)
            values = [_sqlite_values(table.c[c], part.column(c)) for c in cols]
            whole = part.num_rows // group * group
            flat = list(itertools.chain.from_iterable(itertools.islice(zip(*values, strict=True), whole)))
            cur.executemany(many, (flat[i:i + width] for i in range(0, len(flat), width)))
            if whole < part.num_rows:
                cur.executemany(single, zip(*[v[whole:] for v in values], strict=True))
    except driver_error as exc:
        raise DBAPIError.instance(many, None, exc, driver_error) from exc
    finally:
        cur.close()


#: Rows per statement of :func:`_sqlite_fill` (64 and 256 measured alike; 16 a little slower).
_FILL_ROWS = 64
#: Rows whose Python values :func:`_sqlite_fill` holds at once (the values, and the flat list of them).
_FILL_BATCH = 2048


@contextmanager
def _sqlite_staged(conn: Connection, table: Table, data: pa.Table, cols: list[str]) -> Iterator[str]:
    """:func:`_sqlite_stage` for one statement; the stage is emptied after it, also after an error."""
    stage = _sqlite_stage(conn, table, data, cols)
    try:
        with bulk_cache(conn, data.num_rows):
            yield stage
    finally:
        if conn.in_transaction():
            conn.exec_driver_sql(f"DELETE FROM {stage}")


#: Page cache (KiB) of a SQLite bulk write (:func:`bulk_cache`; SQLite's default is 2,000): 12,288 and 16,384
#: measured too (a million lines: import CPU -19% / -21%, peak RSS +5 / +10 MiB; this: -11%, +2 MiB, which
#: keeps a store's import of a million lines under the 150 MiB goal with a margin: docs/PERFORMANCE.md).
BULK_CACHE_KIB = 8192


@contextmanager
def bulk_cache(conn: Connection, rows: int) -> Iterator[None]:
    """SQLite: a larger page cache for one bulk statement of at least :data:`SQLITE_STAGE_MIN` rows.

    Each line written updates b-trees in random order (the ``item_id`` index, the
    parent seeks of its foreign keys); with SQLite's default 2 MiB cache most of
    those pages are read again for every few rows (docs/PERFORMANCE.md "Import
    into SQLite, 2026-12-03, later"). The cache goes back to its size after the
    statement, which frees the pages beyond it for the rest of the import to reuse
    (the process gives them back after each bundle: ``arrow_memory``). The peak RSS
    of an import rises by what the cache adds during its largest statement
    (:data:`BULK_CACHE_KIB`).
    """
    if conn.dialect.name != "sqlite" or rows < SQLITE_STAGE_MIN:
        yield
        return
    before = int(conn.exec_driver_sql("PRAGMA main.cache_size").scalar_one())
    conn.exec_driver_sql(f"PRAGMA main.cache_size = {-BULK_CACHE_KIB}")
    try:
        yield
    finally:
        if not conn.closed and not conn.invalidated:  # a lost connection takes its cache with it
            conn.exec_driver_sql(f"PRAGMA main.cache_size = {before}")


def insert_rows(conn: Connection, table: Table, data: pa.Table) -> int:
    """Insert an Arrow table's rows (columns matched by name; extra columns refused)."""
    if data.num_rows == 0:
        return 0
    cols = _check_columns(table, data)
    qt = _q(conn, table.name)
    if conn.dialect.name == "postgresql":
        _pg_copy_in(conn, qt, cols, data)
    elif conn.dialect.name == "sqlite" and data.num_rows >= SQLITE_STAGE_MIN:
        with _sqlite_staged(conn, table, data, cols) as stage:
            collist = ", ".join(_q(conn, c) for c in cols)
            conn.exec_driver_sql(f"INSERT INTO {qt} ({collist}) SELECT {collist} FROM {stage}")
    elif conn.dialect.name == "sqlite":
        sql = f"INSERT INTO {qt} ({', '.join(_q(conn, c) for c in cols)}) VALUES ({', '.join('?' for _ in cols)})"
        _sqlite_write(conn, sql, table, data, cols)
    else:
        conn.execute(table.insert(), data.to_pylist())
    return int(data.num_rows)


def upsert_rows(conn: Connection, table: Table, data: pa.Table) -> int:
    """Insert or update rows by primary key, so rows other tables reference keep existing."""
    if data.num_rows == 0:
        return 0
    cols = _check_columns(table, data)
    if conn.dialect.name == "postgresql":
        upsert_staged(conn, table, (_pg_stage(conn, table, cols, data), cols))
    elif conn.dialect.name == "sqlite" and data.num_rows >= SQLITE_STAGE_MIN:
        collist = ", ".join(_q(conn, c) for c in cols)
        with _sqlite_staged(conn, table, data, cols) as stage:  # WHERE true: else SQLite reads ON as a join's
            conn.exec_driver_sql(f"INSERT INTO {_q(conn, table.name)} ({collist}) SELECT {collist} FROM {stage} "
                                 f"WHERE true {_on_conflict(conn, table, cols)}")
    elif conn.dialect.name == "sqlite":
        collist = ", ".join(_q(conn, c) for c in cols)
        sql = (f"INSERT INTO {_q(conn, table.name)} ({collist}) VALUES ({', '.join('?' for _ in cols)}) "
               f"{_on_conflict(conn, table, cols)}")
        _sqlite_write(conn, sql, table, data, cols)
    else:
        pk = [c.name for c in table.primary_key.columns]
        delete_docs(conn, table, pk, row_keys(data, pk))
        insert_rows(conn, table, data)
    return int(data.num_rows)


def _on_conflict(conn: Connection, table: Table, cols: list[str]) -> str:
    """``ON CONFLICT (primary key)``: the row's other columns take the new values."""
    pk = [c.name for c in table.primary_key.columns]
    sets = ", ".join(f"{_q(conn, c)} = excluded.{_q(conn, c)}" for c in cols if c not in pk)
    return f"ON CONFLICT ({', '.join(_q(conn, c) for c in pk)}) " + (f"DO UPDATE SET {sets}" if sets else "DO NOTHING")


def _pg_stage(conn: Connection, table: Table, cols: list[str], data: pa.Table) -> str:
    """``data`` COPYed into an empty temporary table shaped like ``table``; its quoted name."""
    stg = _q(conn, f"xchg_stg_{table.name}"[:60])
    conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {stg} (LIKE {_q(conn, table.name)}) ON COMMIT DROP")
    conn.exec_driver_sql(f"TRUNCATE {stg}")
    _pg_copy_in(conn, stg, cols, data)
    return stg


def replaces_in_place(conn: Connection, table: Table, key_cols: Sequence[str]) -> bool:
    """Whether :func:`prune_docs` and :func:`upsert_staged` can replace ``table``'s document rows.

    PostgreSQL and SQLite, with the document key inside the primary key. Deleting every
    row of a document and inserting it again left dead index entries that each
    insert's uniqueness check had to visit: an import into a full HO ran at
    half its baseline's speed. Updating rows in place and deleting only those a
    document no longer has does the same work as the baseline's upsert (on
    SQLite, a reload of unchanged lines: 0.12 s per 100,000 against 0.28 s).
    """
    pk = {c.name for c in table.primary_key.columns}
    return conn.dialect.name in ("postgresql", "sqlite") and bool(pk) and set(key_cols) <= pk


def prune_docs(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str],
               data: pa.Table, key_rows: pa.Table | None = None) -> tuple[str, list[str]]:
    """Stage ``data`` and delete the rows of documents ``keys`` that it no longer has.

    ``key_rows``, if given, holds the same keys as typed columns (the headers' key columns): they
    are COPYed as they are, instead of each key parsed in Python (0.17 s a bundle of 20,000).
    Returns the staging table and its columns, for :func:`upsert_staged` once
    the headers are in place (see :func:`replaces_in_place`).
    """
    cols = _check_columns(table, data) if data.num_rows else [c.name for c in table.columns]
    if conn.dialect.name == "sqlite":
        return _sqlite_prune(conn, table, key_cols, keys, data, cols)
    stg = _pg_stage(conn, table, cols, data)
    if keys:
        on_key = " AND ".join(f"t.{_q(conn, c)} = k.{_q(conn, c)}" for c in key_cols)
        same_row = " AND ".join(f"s.{_q(conn, c.name)} = t.{_q(conn, c.name)}" for c in table.primary_key.columns)
        with _prune_keys(conn, table, key_cols, keys, key_rows) as kt:
            # a temporary table is never analysed: unanalysed, the planner hashed the whole table
            # (a million lines, 16 batches on disk) instead of the keys (392 -> 220 ms a bundle)
            conn.exec_driver_sql(f"ANALYZE {kt}")
            conn.exec_driver_sql(f"DELETE FROM {_q(conn, table.name)} t USING {kt} k WHERE {on_key} "
                                 f"AND NOT EXISTS (SELECT 1 FROM {stg} s WHERE {same_row})")
    return stg, cols


def _sqlite_prune(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str],
                  data: pa.Table, cols: list[str]) -> tuple[str, list[str]]:
    """:func:`prune_docs` on SQLite: the rows staged, those of ``keys`` the stage lacks deleted.

    Rows that repeat a primary key would be folded into one by the upsert, and
    rows without one (a column missing or null) would not meet a stored row:
    those are written as before instead (every row of the documents deleted, the
    rows inserted), so SQLite judges them with its own words (a refused document
    parks, as it does on PostgreSQL).
    """
    pk = [c.name for c in table.primary_key.columns]
    if data.num_rows and (any(c not in data.column_names or data.column(c).null_count for c in pk)
                          or data.select(pk).group_by(pk).aggregate([]).num_rows != data.num_rows):
        delete_docs(conn, table, key_cols, keys)
        insert_rows(conn, table, data)  # SQLite refuses what it refuses (UNIQUE, NOT NULL)
        return _sqlite_stage(conn, table, data.slice(0, 0), cols), cols  # nothing left to upsert
    stage = _sqlite_stage(conn, table, data, cols)
    if keys:
        qk = ", ".join(_q(conn, c) for c in key_cols)
        qpk = ", ".join(_q(conn, c) for c in pk)
        with _key_table(conn, table, key_cols, keys) as kt:
            conn.exec_driver_sql(
                f"DELETE FROM {_q(conn, table.name)} WHERE ({qk}) IN (SELECT {qk} FROM {kt}) "
                f"AND ({qpk}) NOT IN (SELECT {qpk} FROM {stage} WHERE "
                + " AND ".join(f"{_q(conn, c)} IS NOT NULL" for c in pk) + ")")
    return stage, cols


@contextmanager
def _prune_keys(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str],
                key_rows: pa.Table | None) -> Iterator[str]:
    """The keys of :func:`prune_docs` in a temporary table: from ``key_rows`` by COPY when it holds them all."""
    if key_rows is None or key_rows.num_rows != len(keys) or key_rows.column_names != list(key_cols):
        with _key_table(conn, table, key_cols, keys) as kt:
            yield kt
        return
    name = _q(conn, f"xchg_prune_{table.name}"[:60])
    conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {name} AS SELECT "
                         f"{', '.join(_q(conn, c) for c in key_cols)} FROM {_q(conn, table.name)} WITH NO DATA")
    conn.exec_driver_sql(f"TRUNCATE {name}")
    _pg_copy_in(conn, name, list(key_cols), key_rows)
    try:
        yield name
    finally:
        conn.exec_driver_sql(f"TRUNCATE {name}")


def upsert_staged(conn: Connection, table: Table, staged: tuple[str, list[str]]) -> None:
    """Insert or update staged rows (:func:`_pg_stage`, :func:`prune_docs`) by primary key; empty the stage.

    A row whose values are already those stored (compared as text, so ``1.5`` and ``1.50`` of an
    unscaled NUMERIC still differ) is not written again: a document sent again unchanged (a reload,
    a resend) costs a row lock instead of a new row version and its index entries (3-4x faster).
    """
    stg, cols = staged
    collist = ", ".join(_q(conn, c) for c in cols)
    pk = {c.name for c in table.primary_key.columns}
    rest = [_q(conn, c) for c in cols if c not in pk]
    if conn.dialect.name == "sqlite":  # IS NOT: null-safe; BINARY: a column's NOCASE must not hide a change
        qt = _q(conn, table.name)
        unchanged = (" WHERE " + " OR ".join(f"{qt}.{c} IS NOT excluded.{c} COLLATE BINARY" for c in rest)) \
            if rest else ""
        try:  # WHERE true: else SQLite reads ON CONFLICT as a join's ON
            conn.exec_driver_sql(f"INSERT INTO {qt} ({collist}) SELECT {collist} FROM {stg} WHERE true "
                                 f"{_on_conflict(conn, table, cols)}{unchanged}")
        finally:
            if conn.in_transaction():
                conn.exec_driver_sql(f"DELETE FROM {stg}")
        return
    unchanged = (f" WHERE ROW({', '.join(f't.{c}' for c in rest)})::text IS DISTINCT FROM "
                 f"ROW({', '.join(f'excluded.{c}' for c in rest)})::text") if rest else ""
    conn.exec_driver_sql(f"INSERT INTO {_q(conn, table.name)} AS t ({collist}) SELECT {collist} FROM {stg} "
                         f"{_on_conflict(conn, table, cols)}{unchanged}")
    conn.exec_driver_sql(f"TRUNCATE {stg}")


def row_keys(data: pa.Table, key_cols: Sequence[str]) -> list[str]:
    """The canonical document key of every row."""
    if not key_cols:
        return []
    fast = _plain_key_array(data, key_cols)
    if fast is not None:
        keys: list[str] = fast.to_pylist()
        return keys
    cols = [data.column(c).to_pylist() for c in key_cols]
    return [canonical_key(vals) for vals in zip(*cols, strict=True)]


def key_array(data: pa.Table, key_cols: Sequence[str]) -> pa.Array:
    """:func:`row_keys` as one Arrow string array (no Python object per row where the keys are plain)."""
    fast = _plain_key_array(data, key_cols) if key_cols else None
    return fast if fast is not None else pa.array(row_keys(data, key_cols), pa.string())


#: A key value JSON writes as it stands: printable ASCII without ``"`` or ``\`` (see :data:`_CANONICAL`).
_PLAIN = r'[ !#-\[\]-~]*'


def _all(mask: pa.Array | pa.ChunkedArray) -> bool:
    return bool(pc.all(mask).as_py() is not False)


def _plain_key_array(data: pa.Table, key_cols: Sequence[str]) -> pa.Array | None:
    """The canonical keys built by Arrow, when every key value is a text or an integer that JSON writes
    as it stands (the common case); None otherwise (the caller goes value by value through ``json``)."""
    if data.num_rows == 0:
        return pa.array([], pa.string())
    parts: list[Any] = []
    for name in key_cols:
        col = data.column(name)
        if col.null_count:
            return None  # str(None) is "None": the slow path says what it always said
        if pa.types.is_integer(col.type):
            text = pc.cast(col, pa.string())  # str(int): decimal digits, a leading minus
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            if not _all(pc.match_substring_regex(col, f"^{_PLAIN}$")):
                return None
            text = col
        else:
            return None  # dates, decimals, booleans: str() and Arrow write them differently
        parts += [text, '","']
    joined = pc.binary_join_element_wise('["', *parts[:-1], '"]', "")
    out = joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined
    return out.cast(pa.string())


def _plain_shape(width: int) -> str:
    return rf'^\["{_PLAIN}"(?:,"{_PLAIN}"){{{width - 1}}}\]$'


def split_keys(keys: pa.Array, width: int) -> list[pa.Array] | None:
    """The values of canonical keys, position by position, when every key is ``width`` plain text
    values (printable ASCII, nothing escaped: :data:`_CANONICAL`); None when any is not."""
    if width < 1 or keys.null_count:
        return None
    if len(keys) == 0:
        return [pa.array([], pa.string()) for _ in range(width)]
    if not _all(pc.match_substring_regex(keys, _plain_shape(width))):
        return None
    inner = pc.utf8_slice_codeunits(keys, 2, -2)  # ["a","b"] -> a","b: a plain value holds no quote
    lists = pc.split_pattern(inner, '","')
    return [pc.list_element(lists, i) for i in range(width)]


def unchecked_keys(table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Those of ``keys`` (in their order) a check on whole columns cannot vouch for: each of the
    others is a canonical key of ``table``'s ``key_cols`` (plain text values, integers where the
    column is an integer), as :func:`canonical_key` of its :func:`parse_key` would say, key by key."""
    if not key_cols or not keys:
        return list(keys)
    arr = pa.array(keys, pa.string())
    plain = pc.fill_null(pc.match_substring_regex(arr, _plain_shape(len(key_cols))), False)
    at = pc.indices_nonzero(plain)
    values = split_keys(arr.take(at), len(key_cols))
    assert values is not None
    ok = pa.array([True] * len(at), pa.bool_())
    for name, col in zip(key_cols, values, strict=True):
        if isinstance(table.c[name].type, Integer):
            ok = pc.and_(ok, pc.match_substring_regex(col, r"^-?[0-9]+$"))
    if len(at) == len(keys) and _all(ok):
        return []
    good = set(at.filter(ok).to_pylist())
    return [k for i, k in enumerate(keys) if i not in good]


def pack_tables(data: Mapping[str, pa.Table]) -> bytes:
    """A document's rows (table name -> Arrow table) as one JSON of base64 Arrow IPC streams: how parked
    documents and both versions of a conflict are kept in the database."""
    import base64

    out = {}
    for name, t in data.items():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        out[name] = base64.b64encode(sink.getvalue().to_pybytes()).decode()
    return json.dumps(out).encode()


def unpack_tables(blob: bytes) -> dict[str, pa.Table]:
    """:func:`pack_tables` read back."""
    import base64

    return {name: pa.ipc.open_stream(base64.b64decode(b)).read_all() for name, b in json.loads(blob).items()}

