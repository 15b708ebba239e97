"""Documents' rows between the database and Arrow.

Rows move as Arrow tables, one per database table, never as one object per
document. Keys travel as canonical text: a JSON array of the key values as
strings (``["s001","B00042"]``), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
from sqlalchemy import (
    Boolean, Connection, Date, DateTime, Float, Integer, Numeric, Table, delete, select, tuple_,
)

CHUNK = 500  # keys per IN (...) list


def canonical_key(values: Iterable[Any]) -> str:
    return json.dumps([str(v) for v in values], separators=(",", ":"))


def parse_key(doc_key: str) -> list[str]:
    value = json.loads(doc_key)
    if not isinstance(value, list):
        raise ValueError(f"document key {doc_key!r} is not a JSON array")
    return [str(v) for v in value]


def canonicalize(doc_key: str) -> str:
    """A key as the database rendered it -> the canonical form."""
    return canonical_key(parse_key(doc_key))


def arrow_type(column: Any) -> pa.DataType:
    """The Arrow type a column travels as; exact decimals stay decimal128."""
    t = column.type
    impl = getattr(t, "impl", t)
    scale = getattr(t, "scale", None)
    if isinstance(t, Numeric) or isinstance(impl, Numeric) or scale is not None:
        if isinstance(t, Float) or isinstance(impl, Float):
            return pa.float64()
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


def arrow_schema(table: Table) -> pa.Schema:
    return pa.schema([pa.field(c.name, arrow_type(c), nullable=c.nullable is not False)
                      for c in table.columns])


def _typed_key(table: Table, key_cols: Sequence[str], key: Sequence[str]) -> tuple[Any, ...]:
    out = []
    for name, value in zip(key_cols, key, strict=True):
        out.append(int(value) if isinstance(table.c[name].type, Integer) else value)
    return tuple(out)


def _key_chunks(table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> Iterable[list[tuple[Any, ...]]]:
    typed = [_typed_key(table, key_cols, parse_key(k)) for k in keys]
    for i in range(0, len(typed), CHUNK):
        yield typed[i:i + CHUNK]


def _where(table: Table, key_cols: Sequence[str], chunk: list[tuple[Any, ...]]) -> Any:
    if len(key_cols) == 1:
        return table.c[key_cols[0]].in_([k[0] for k in chunk])
    return tuple_(*[table.c[c] for c in key_cols]).in_(chunk)


def read_docs(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> pa.Table:
    """The current rows of the documents ``keys`` in ``table``, as one Arrow table."""
    schema = arrow_schema(table)
    columns: list[list[Any]] = [[] for _ in table.columns]
    order = [table.c[c] for c in key_cols]
    if "line_no" in table.c:
        order.append(table.c.line_no)
    for chunk in _key_chunks(table, key_cols, keys):
        for row in conn.execute(select(table).where(_where(table, key_cols, chunk)).order_by(*order)):
            for i, v in enumerate(row):
                columns[i].append(v)
    return pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)],
                                schema=schema)


def delete_docs(conn: Connection, table: Table, key_cols: Sequence[str], keys: Sequence[str]) -> int:
    n = 0
    for chunk in _key_chunks(table, key_cols, keys):
        n += conn.execute(delete(table).where(_where(table, key_cols, chunk))).rowcount or 0
    return n


def insert_rows(conn: Connection, table: Table, data: pa.Table) -> int:
    """Insert an Arrow table's rows (columns matched by name; extra columns refused)."""
    if data.num_rows == 0:
        return 0
    unknown = set(data.column_names) - set(table.c.keys())
    if unknown:
        raise ValueError(f"table {table.name}: unknown columns {sorted(unknown)}")
    rows = data.to_pylist()
    conn.execute(table.insert(), rows)
    return len(rows)


def upsert_rows(conn: Connection, table: Table, data: pa.Table) -> int:
    """Insert or update rows by primary key, so rows other tables reference keep existing."""
    if data.num_rows == 0:
        return 0
    name = conn.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
    else:  # portable fallback: delete then insert
        pk = [c.name for c in table.primary_key.columns]
        delete_docs(conn, table, pk, row_keys(data, pk))
        return insert_rows(conn, table, data)
    rows = data.to_pylist()
    stmt = dialect_insert(table)
    pk_names = [c.name for c in table.primary_key.columns]
    update = {c: stmt.excluded[c] for c in data.column_names if c not in pk_names}
    stmt = stmt.on_conflict_do_update(index_elements=pk_names, set_=update) if update \
        else stmt.on_conflict_do_nothing(index_elements=pk_names)
    conn.execute(stmt, rows)
    return len(rows)


def row_keys(data: pa.Table, key_cols: Sequence[str]) -> list[str]:
    """The canonical document key of every row."""
    cols = [data.column(c).to_pylist() for c in key_cols]
    return [canonical_key(vals) for vals in zip(*cols, strict=True)] if cols else []
