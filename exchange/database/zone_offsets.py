"""Local offsets of business times a peer sends, checked before they are written.

Why: a zone-aware business time keeps the offset it was made at beside it
(``sales_bill.bill_date_offset``, minutes east of UTC; docs/CATALOG.md). The
database takes any small integer, but no zone is more than 18 hours from UTC,
and neither :func:`exchange.database.schema.local_time` nor the business day of
``exchange audit report`` can use one that is. Such a value is a till's bug or a
forgery: the document is refused the way a database's own check refuses a
value (it parks, the column and the value named, and stays parked until the
sender corrects it), not stored to break every reader later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.exc import StatementError

from exchange.database import rows
from exchange.timefmt import MAX_OFFSET, OFFSET_SUFFIX


class OffsetBeyondAnyZone(ValueError):
    """The error a refused offset reads as (what ``exchange parked list`` shows)."""


class OffsetRefused(StatementError):
    """Raised where a write's database error would be: the importer parks the document, a retry keeps it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, None, None, OffsetBeyondAnyZone(message))


def offset_columns(schema: pa.Schema) -> list[str]:
    """The offset columns of a table's Arrow schema: an integer ``C_offset`` beside a timestamp ``C``."""
    names = set(schema.names)
    return [f.name + OFFSET_SUFFIX for f in schema
            if pa.types.is_timestamp(f.type) and f.name + OFFSET_SUFFIX in names
            and pa.types.is_integer(schema.field(f.name + OFFSET_SUFFIX).type)]


def check(table: str, data: pa.Table) -> None:
    """Raise :class:`OffsetRefused` naming the first offset of ``data`` beyond any zone (nulls pass)."""
    for column in offset_columns(data.schema):
        values = data.column(column)
        bounds = pc.min_max(values)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low is None or -MAX_OFFSET <= low <= high <= MAX_OFFSET:
            continue
        bad = low if low < -MAX_OFFSET else high
        raise OffsetRefused(f"{table}.{column} = {bad} minutes east of UTC is beyond any zone (at most "
                            f"+-{MAX_OFFSET}): the sender must correct the document's time")


def _outside(values: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.fill_null(pc.or_(pc.less(values, -MAX_OFFSET), pc.greater(values, MAX_OFFSET)), False)


def refused_documents(data: Mapping[str, pa.Table], key: Sequence[str]) -> set[str]:
    """The documents of ``data`` (tables by name) with an offset beyond any zone, found on whole columns,
    so the rest is written in bulk and only these go one by one (where :func:`check` parks them)."""
    out: set[str] = set()
    for table in data.values():
        if not all(k in table.column_names for k in key):
            continue
        for column in offset_columns(table.schema):
            hit = _outside(table.column(column))
            if pc.any(hit).as_py():
                out.update(rows.row_keys(table.filter(hit), key))
    return out
