"""The business day of the documents in a bundle: each document's own time at its own offset.

Why: a bill rung up at 23:30 in India and one at 23:30 in New York belong to
the same local trading day (1 March), though one is 18:00 UTC on the 1st and
the other 04:30 UTC on the 2nd, and both may travel in a bundle sealed on the
3rd. The auditor's report sums documents per the day they belong to
(docs/AUDIT.md, "exchange audit report").

A document type has a business time when its header table, as the bundle
carries it, has a timestamp column ``C`` and an integer column ``C_offset``
(minutes east of UTC: the reference ``sales_bill.bill_date`` and
``bill_date_offset``, ``customer.created_at`` and ``created_at_offset``). Its
key columns come from the catalog the bundle carries (FORMAT.md version 3);
a bundle without one, or a type without such a pair, is reported by the
bundle's day. Everything read here is a peer's data: decoded within the
bundle's budget, and an offset beyond any real zone is refused
(:class:`~exchange.errors.FormatError`, the caller reports the bundle's day
and says why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from exchange.errors import FormatError
from exchange.timefmt import MAX_OFFSET, OFFSET_SUFFIX

__all__ = ["DayShare", "DayKind", "MAX_OFFSET", "business_time", "shares"]

#: ``local``: the documents' own local day; ``utc``: the UTC day of their time; ``bundle``: the bundle's day.
DayKind = Literal["local", "utc", "bundle"]

Reader = Callable[[Path, list[str]], Any]


@dataclass
class DayShare:
    """What of one document type in one bundle falls on one business day."""

    documents: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    totals: dict[str, Decimal] = field(default_factory=dict)


def business_time(schema: Any) -> tuple[str, str] | None:
    """The (time, offset) columns of a header table's Arrow schema, or None (no business time)."""
    import pyarrow as pa

    for f in schema:
        off = f.name + OFFSET_SUFFIX
        if pa.types.is_timestamp(f.type) and off in schema.names and pa.types.is_integer(schema.field(off).type):
            return f.name, off
    return None


def _day(t: datetime | None, offset: int | None, kind: DayKind, what: str) -> str:
    if t is None:
        raise FormatError(f"{what}: a document without its time")
    if offset is not None and not -MAX_OFFSET <= offset <= MAX_OFFSET:
        raise FormatError(f"{what}: offset {offset} minutes is beyond any zone (at most {MAX_OFFSET})")
    instant = t if t.tzinfo is not None else t.replace(tzinfo=UTC)  # naive: UTC (FORMAT.md version 3)
    local = instant.astimezone(UTC) + timedelta(minutes=(offset or 0) if kind == "local" else 0)
    return local.date().isoformat()


def shares(doc_type: str, spec: Mapping[str, Any] | None, totals: Mapping[str, Any], tables: Mapping[str, Path],
           read: Reader, schema_of: Callable[[Path], Any], kind: DayKind) -> dict[str, DayShare] | None:
    """The documents of ``doc_type`` in a bundle split by business day, or None when it has no business
    time (``spec``: the type in the bundle's catalog, None without one; ``totals``: its control totals).

    Rows of a child table are given their header's day through the type's key. A FormatError
    (a time missing, an offset out of range, a child row whose header is not in the bundle) is the
    caller's to report.
    """
    if kind == "bundle" or not isinstance(spec, Mapping):
        return None
    names, key = spec.get("tables"), spec.get("key")
    if not isinstance(names, list) or not names or not isinstance(key, list) or not key:
        return None
    header = str(names[0])
    if header not in tables:
        return None
    pair = business_time(schema_of(tables[header]))
    if pair is None:
        return None
    col, off = pair
    what = f"{doc_type}: {header}.{col}"
    head = read(tables[header], [*key, col, off]).to_pydict()
    day_of: dict[tuple[Any, ...], str] = {}
    out: dict[str, DayShare] = {}
    for i, t in enumerate(head[col]):
        day = _day(t, head[off][i], kind, what)
        k = tuple(head[c][i] for c in key)
        day_of[k] = day
        share = out.setdefault(day, DayShare())
        share.documents += 1
    for table in names:
        name = str(table)
        if name not in tables:
            continue
        refs = [str(r).partition(".")[2] for r in totals if str(r).partition(".")[0] == name]
        got = read(tables[name], [*key, *refs]).to_pydict()
        n = len(got[key[0]]) if key[0] in got else 0
        for i in range(n):
            k = tuple(got[c][i] for c in key)
            if k not in day_of:
                raise FormatError(f"{doc_type}: a row of {name} whose document has no {header} row")
            share = out[day_of[k]]
            share.rows[name] = share.rows.get(name, 0) + 1
            for c in refs:
                v = got[c][i]
                ref = f"{name}.{c}"
                share.totals[ref] = share.totals.get(ref, Decimal(0)) + (Decimal(str(v)) if v is not None else 0)
    for share in out.values():  # every control total named, as the bundle's day rows have them
        for ref in totals:
            share.totals.setdefault(str(ref), Decimal(0))
    return out
