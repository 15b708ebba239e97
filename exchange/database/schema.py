"""The reference retail schema (``RETAIL``) used by the demo, the tests and sites
that adopt it as is.

Every document is a header table plus child tables. A child carries the
header's key columns under the same names plus ``line_no``, and a foreign key
to the header with ``ON DELETE CASCADE``: deleting a header deletes the whole
document, and the exporter can read a document with one key filter per table.

Money and quantities are exact. On PostgreSQL they are ``NUMERIC``; on SQLite,
which has no decimal type and would silently keep floats, they are stored as
INTEGER minor units (cents, thousandths). The :class:`ScaledDecimal` types do
the conversion for SQLAlchemy; bulk code that bypasses SQLAlchemy types asks
:func:`scale_of` and converts Arrow ``decimal128`` itself.

On SQLite, SQL arithmetic on these columns works in minor units: comparisons
and ``SUM`` are typed and converted back, other arithmetic (``price * qty``)
is best done in Python.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from sqlalchemy import (
    BigInteger, Boolean, Column, Connection, Date, DateTime, Dialect, ForeignKey, ForeignKeyConstraint,
    Index, Integer, MetaData, Numeric, PrimaryKeyConstraint, SmallInteger, String, Table, Text, inspect, true,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

from exchange.timefmt import aware

__all__ = [
    "RETAIL", "ScaledDecimal", "Money", "Qty", "Rate", "scale_of", "to_minor", "to_decimal", "from_minor",
    "ZonedDateTime", "utc_text", "local_time", "offset_minutes", "upgrade_reference", "ZONED", "naive_times",
]

#: Deterministic constraint names, so PostgreSQL errors and migrations name the same thing everywhere.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(referred_table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}

RETAIL = MetaData(naming_convention=NAMING)

KEY = 32  # every business key is String(32)


def to_minor(value: Any, scale: int, precision: int | None = None) -> int:
    """``value`` as an integer count of minor units (``Decimal('1.25'), 2 -> 125``).

    Rounds half away from zero, as PostgreSQL ``NUMERIC(p, s)`` does, so both
    databases store the same number. Floats go through ``repr`` (``0.1`` means
    ``Decimal('0.1')``, not its binary expansion). Raises ``ValueError`` for
    non-numbers, NaN/infinity and values too large for ``precision`` digits.
    """
    dec = to_decimal(value, scale, precision)
    return int(dec.scaleb(scale))


def to_decimal(value: Any, scale: int, precision: int | None = None) -> Decimal:
    """``value`` as a Decimal with exactly ``scale`` places (see :func:`to_minor`)."""
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    try:
        if isinstance(value, float):
            dec = Decimal(repr(value))
        elif isinstance(value, (Decimal, int, str)):
            dec = Decimal(value)
        else:
            raise ValueError(f"not a number: {value!r}")
        if not dec.is_finite():
            raise ValueError(f"not a finite number: {value!r}")
        dec = dec.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    except InvalidOperation as exc:
        raise ValueError(f"not a number: {value!r}") from exc
    if precision is not None and dec.adjusted() >= precision - scale:
        raise ValueError(f"{value!r} does not fit NUMERIC({precision}, {scale})")
    return dec


def from_minor(units: int, scale: int) -> Decimal:
    """The Decimal for ``units`` minor units, with exactly ``scale`` places (``125, 2 -> 1.25``)."""
    return Decimal(int(units)).scaleb(-scale)


class ScaledDecimal(TypeDecorator[Decimal]):
    """An exact decimal: ``NUMERIC(precision, scale)``, INTEGER minor units on SQLite.

    Values bound to it are rounded to ``scale`` places (half away from zero,
    like PostgreSQL) on every database, so a value reads back the same
    whichever database holds it.
    """

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int, scale: int) -> None:
        super().__init__(precision=precision, scale=scale, asdecimal=True)
        self.precision = precision
        self.scale = scale

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return to_minor(value, self.scale, self.precision)
        return to_decimal(value, self.scale, self.precision)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            if isinstance(value, int):
                return from_minor(value, self.scale)
            # Not written through this type (e.g. a float from raw SQL): normalise, don't guess.
            return to_decimal(value, self.scale)
        if isinstance(value, Decimal):
            return value
        return to_decimal(value, self.scale)

    def __repr__(self) -> str:
        if type(self) is ScaledDecimal:
            return f"ScaledDecimal({self.precision}, {self.scale})"
        return f"{type(self).__name__}()"

    @property
    def python_type(self) -> type[Decimal]:
        return Decimal


class Money(ScaledDecimal):
    """An amount of money: ``NUMERIC(14, 2)``; cents on SQLite."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(14, 2)


class Qty(ScaledDecimal):
    """A quantity (pieces or weighed): ``NUMERIC(14, 3)``; thousandths on SQLite."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(14, 3)


class Rate(ScaledDecimal):
    """A percentage such as a tax rate or discount: ``NUMERIC(5, 2)``; hundredths on SQLite."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(5, 2)


def scale_of(column: Any) -> int | None:
    """The decimal scale of a :class:`ScaledDecimal` column (2 for Money and Rate, 3 for Qty),
    else ``None``.

    Bulk code that reads or writes SQLite with the driver directly uses it to
    convert between Arrow ``decimal128`` and the integer minor units stored there.
    """
    col_type = getattr(column, "type", None)
    if isinstance(col_type, ScaledDecimal):
        return col_type.scale
    return None


def utc_text(value: datetime) -> str:
    """How SQLite holds a business time: the UTC instant as fixed-width text with its ``Z``.

    Fixed width and one zone, so text order is time order (``ORDER BY``, ``BETWEEN``
    and the bill-date index work), and it is what Arrow writes for a
    ``timestamp[us, tz=UTC]`` cast to text: bulk and single-row writes agree.
    A naive value is taken as UTC (exchange cannot know its zone).
    """
    return aware(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")


class ZonedDateTime(TypeDecorator[datetime]):
    """A business time that keeps its meaning across zones: an instant, read back in UTC.

    PostgreSQL ``timestamptz``; SQLite text (:func:`utc_text`). SQLAlchemy's own
    ``DateTime`` on SQLite drops the offset of an aware value and stores its
    wall clock, so 23:30 at +05:30 and 23:30 at -05:00 became the same text.
    The local offset a document was made at is kept in a column of its own
    (``sales_bill.bill_date_offset``, minutes east of UTC): see :func:`local_time`.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, date) and not isinstance(value, datetime):  # a date alone: its midnight, UTC
            value = datetime(value.year, value.month, value.day, tzinfo=UTC)
        if not isinstance(value, datetime):
            raise ValueError(f"not a time: {value!r}")
        if dialect.name == "sqlite":
            return utc_text(value)
        return aware(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return aware(t).astimezone(UTC)

    @property
    def python_type(self) -> type[datetime]:
        return datetime


def offset_minutes(value: datetime) -> int | None:
    """The UTC offset of an aware time in minutes east of UTC (``+05:30 -> 330``); None for a naive one."""
    off = value.utcoffset()
    return None if off is None else int(off.total_seconds() // 60)


def local_time(instant: datetime, offset: int | None) -> datetime:
    """A stored business time as it read where it was made: ``instant`` at ``offset`` minutes east of UTC.

    ``offset`` None (a document from a sender that did not record it): the instant in UTC.
    """
    return aware(instant).astimezone(UTC if offset is None else timezone(timedelta(minutes=offset)))


#: Header table -> its key columns, filled as the tables below are declared.
_HEADER_KEYS: dict[str, tuple[str, ...]] = {}


def _header(name: str, key: tuple[str, ...], *columns: Any) -> Table:
    """A document header: string key columns first, then ``columns``."""
    _HEADER_KEYS[name] = key
    return Table(
        name, RETAIL,
        *(Column(k, String(KEY), nullable=False) for k in key),
        *columns,
        PrimaryKeyConstraint(*key),
    )


def _child(name: str, header: Table, *columns: Any) -> Table:
    """A document child: the header's key columns, ``line_no``, ``columns``, cascading FK.

    The FK cascades deletes (deleting the header deletes the document) and key
    updates (renaming a document carries its lines).
    """
    key = _HEADER_KEYS[header.name]
    return Table(
        name, RETAIL,
        *(Column(k, String(KEY), nullable=False) for k in key),
        Column("line_no", Integer, nullable=False),
        *columns,
        PrimaryKeyConstraint(*key, "line_no"),
        ForeignKeyConstraint(list(key), [header.c[k] for k in key], ondelete="CASCADE", onupdate="CASCADE"),
    )


def _item_fk() -> Column[str]:
    return Column("item_id", String(KEY), ForeignKey("item.item_id"), nullable=False, index=True)


# --- HO-owned documents -------------------------------------------------------

item = _header(
    "item", ("item_id",),
    Column("name", String(120), nullable=False),
    Column("category", String(32), nullable=False),
    Column("uom", String(8), nullable=False),  # EA, KG, L ...
    Column("price", Money(), nullable=False),
    Column("tax_rate", Rate(), nullable=False),
    Column("active", Boolean(), nullable=False, server_default=true()),
    # the instant of the HO's last change (UTC); no offset column: the HO's wall clock means nothing to a store
    Column("updated_at", ZonedDateTime(), nullable=False),
    # Added after the first release: `exchange migrate` adds it to older databases (add_missing_columns);
    # nodes not migrated yet keep the values they receive aside (exchange.receive.evolution).
    Column("brand", String(64), nullable=True),
)
item_barcode = _child(
    "item_barcode", item,
    Column("barcode", String(32), nullable=False, unique=True),
)

promotion = _header(
    "promotion", ("promo_id",),
    Column("name", String(120), nullable=False),
    Column("store_group", String(KEY), nullable=True),  # NULL: every store
    Column("starts_on", Date(), nullable=False),
    Column("ends_on", Date(), nullable=False),
    Column("discount_pct", Rate(), nullable=False),
)
promotion_item = _child(
    "promotion_item", promotion,
    _item_fk(),
    Column("promo_price", Money(), nullable=False),
)

transfer_order = _header(
    "transfer_order", ("to_id",),
    Column("dest_store", String(KEY), nullable=False, index=True),
    Column("order_date", Date(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("total_value", Money(), nullable=False),
)
transfer_order_line = _child(
    "transfer_order_line", transfer_order,
    _item_fk(),
    Column("qty", Qty(), nullable=False),
    Column("unit_cost", Money(), nullable=False),
)

sales_order = _header(
    "sales_order", ("so_id",),
    Column("store_id", String(KEY), nullable=False, index=True),
    Column("order_date", Date(), nullable=False),
    Column("total", Money(), nullable=False),
)
sales_order_line = _child(
    "sales_order_line", sales_order,
    _item_fk(),
    Column("qty", Qty(), nullable=False),
    Column("price", Money(), nullable=False),
    Column("amount", Money(), nullable=False),
)

sales_invoice = _header(
    "sales_invoice", ("invoice_id",),
    Column("store_id", String(KEY), nullable=False, index=True),
    Column("so_id", String(KEY), nullable=True),  # no FK: the order may travel in another bundle
    Column("invoice_date", Date(), nullable=False),
    Column("total", Money(), nullable=False),
    Column("tax", Money(), nullable=False),
)
sales_invoice_line = _child(
    "sales_invoice_line", sales_invoice,
    _item_fk(),
    Column("qty", Qty(), nullable=False),
    Column("price", Money(), nullable=False),
    Column("amount", Money(), nullable=False),
    Column("tax", Money(), nullable=False),
)

audit_plan = _header(
    "audit_plan", ("plan_id",),
    Column("store_id", String(KEY), nullable=False, index=True),
    Column("planned_on", Date(), nullable=False),
    Column("notes", Text(), nullable=True),
)
audit_plan_line = _child(
    "audit_plan_line", audit_plan,
    _item_fk(),
)

# --- Store-owned documents: keys start with store_id, so the HO keeps every store's rows in one table.

customer = _header(
    "customer", ("store_id", "customer_id"),
    Column("name", String(120), nullable=False),
    Column("phone", String(32), nullable=True),
    Column("email", String(254), nullable=True),
    Column("created_at", ZonedDateTime(), nullable=False),  # the instant (UTC; created_at_offset: where)
    Column("loyalty_id", String(32), nullable=True),  # added after the first release, as item.brand
    # the store's UTC offset when the customer signed up, minutes east of UTC (NULL: not recorded): a
    # store's day of sign-ups is its local day. Last: `exchange migrate` adds it to an earlier table
    Column("created_at_offset", SmallInteger(), nullable=True),
)

sales_bill = _header(
    "sales_bill", ("store_id", "bill_no"),
    Column("bill_date", ZonedDateTime(), nullable=False),  # the instant (UTC; bill_date_offset: where)
    Column("customer_id", String(KEY), nullable=True),  # no FK: the customer may travel separately
    Column("total", Money(), nullable=False),
    Column("tax", Money(), nullable=False),
    # the till's UTC offset at bill_date, minutes east of UTC (NULL: not recorded); last, where
    # `exchange migrate` adds it to a table made by an earlier release
    Column("bill_date_offset", SmallInteger(), nullable=True),
)
Index("ix_sales_bill_bill_date", sales_bill.c.bill_date)
sales_bill_line = _child(
    "sales_bill_line", sales_bill,
    # This FK is how "a sale naming an item the node does not know yet" fails to apply:
    # the importer parks that one document and retries it after later imports.
    _item_fk(),
    Column("qty", Qty(), nullable=False),
    Column("price", Money(), nullable=False),
    Column("amount", Money(), nullable=False),
    Column("tax", Money(), nullable=False),
)
sales_bill_payment = _child(
    "sales_bill_payment", sales_bill,
    Column("method", String(16), nullable=False),  # CASH, CARD, UPI, VOUCHER ...
    Column("amount", Money(), nullable=False),
)

grc = _header(
    "grc", ("store_id", "grc_no"),
    Column("to_id", String(KEY), nullable=True),  # the transfer order received, if any
    Column("received_on", Date(), nullable=False),
)
grc_line = _child(
    "grc_line", grc,
    _item_fk(),
    Column("qty", Qty(), nullable=False),
    Column("unit_cost", Money(), nullable=False),
)

grt = _header(
    "grt", ("store_id", "grt_no"),
    Column("returned_on", Date(), nullable=False),
    Column("reason", String(120), nullable=False),
)
grt_line = _child(
    "grt_line", grt,
    _item_fk(),
    Column("qty", Qty(), nullable=False),
    Column("amount", Money(), nullable=False),
)


#: Each business time of :data:`RETAIL` (all zone-aware) -> the column keeping its local offset, where the
#: wall time it was made at matters to the business (a bill's or a sign-up's local day); None where only the
#: instant does (an item's last change at the HO). docs/CATALOG.md, "Business times".
ZONED: dict[tuple[str, str], str | None] = {
    ("sales_bill", "bill_date"): "bill_date_offset",
    ("customer", "created_at"): "created_at_offset",
    ("item", "updated_at"): None,
}


def naive_times(conn: Connection) -> list[tuple[str, str]]:
    """The business times of :data:`ZONED` this database still holds naive (made by an earlier release,
    not migrated yet): PostgreSQL ``timestamp`` columns.

    SQLite has one storage for both (text), and this release reads naive text as
    the UTC instant (:class:`ZonedDateTime`), so a SQLite column is never naive here:
    ``exchange migrate`` only rewrites its text (:func:`upgrade_reference`).
    """
    if conn.dialect.name != "postgresql":
        return []
    insp = inspect(conn)
    present = set(insp.get_table_names())
    wanted = sorted({t for t, _c in ZONED} & present)
    if not wanted:
        return []
    have = insp.get_multi_columns(filter_names=wanted)
    out = []
    for (_schema, table), cols in have.items():
        for c in cols:
            if (table, c["name"]) in ZONED and not getattr(c["type"], "timezone", False):
                out.append((table, str(c["name"])))
    return sorted(out)


def upgrade_reference(conn: Connection) -> list[str]:
    """Bring the business times of reference tables made by an earlier release up to these definitions
    (:data:`ZONED`); what was done.

    PostgreSQL converts each naive column to ``timestamptz`` (its values read as
    UTC: exchange never knew their zone); SQLite rewrites its naive text as UTC
    text (:func:`utc_text`: the same instants, so the rewrite records no change to
    send). The offset columns are added by :func:`add_missing_columns`, NULL for
    the rows already there (zone not recorded). Safe to run again: each step checks first.
    """
    from exchange.database.capture import suppress_capture

    done: list[str] = []
    if conn.dialect.name == "postgresql":
        for table, column in naive_times(conn):
            conn.exec_driver_sql(f'ALTER TABLE {table} ALTER COLUMN {column} TYPE timestamptz '
                                 f"USING {column} AT TIME ZONE 'UTC'")
            done.append(f"{table}.{column} is timestamptz")
    elif conn.dialect.name == "sqlite":
        present = set(inspect(conn).get_table_names())
        for table, column in ZONED:
            if table not in present:
                continue
            naive = conn.exec_driver_sql(f"SELECT count(*) FROM {table} WHERE {column} NOT LIKE '%Z' "
                                         f"AND strftime('%s', {column}) IS NOT NULL").scalar()
            if not naive:
                continue
            with suppress_capture(conn):  # SQLAlchemy's naive text, or text with an offset: the same instant
                conn.exec_driver_sql(f"UPDATE {table} SET {column} = strftime('%Y-%m-%d %H:%M:%f', {column}) "
                                     f"|| '000Z' WHERE {column} NOT LIKE '%Z' AND strftime('%s', {column}) "
                                     "IS NOT NULL")
            done.append(f"{naive} {table}.{column} values as UTC text")
    return done


# --- Evolution: the reference schema as a node's database has it, and the migration to the current one.

def missing_columns(conn: Any) -> dict[str, list[str]]:
    """Per reference table present in the database, the columns of :data:`RETAIL` it lacks.

    A database made by an earlier release lacks the columns added since; tables
    missing altogether are left to ``create_all``.
    """
    from sqlalchemy import inspect

    insp = inspect(conn)
    present = set(insp.get_table_names()) & set(RETAIL.tables)
    if not present:
        return {}
    have = insp.get_multi_columns(filter_names=sorted(present))
    out: dict[str, list[str]] = {}
    for (_schema, name), cols in have.items():
        names = {c["name"] for c in cols}
        gone = [c.name for c in RETAIL.tables[name].columns if c.name not in names]
        if gone:
            out[name] = gone
    return out


def as_in_database(conn: Any) -> MetaData:
    """:data:`RETAIL` as this node's database has it: without the columns a later release added
    that ``exchange migrate`` has not added here yet, and with the business times it has not made
    zone-aware yet as naive ``DateTime`` (so the node exports and applies what it has).

    ``RETAIL`` itself when nothing is missing (the common case).
    """
    missing = missing_columns(conn)
    naive = set(naive_times(conn))  # not migrated yet: exported and expected naive (read as UTC by peers)
    if not missing and not naive:
        return RETAIL
    md = MetaData(naming_convention=NAMING)
    for table in RETAIL.sorted_tables:  # masters first: a copied ForeignKey finds its table
        gone = set(missing.get(table.name, ()))
        Table(table.name, md, *(_as_naive(c) if (table.name, c.name) in naive else c._copy()
                                for c in table.columns if c.name not in gone))
    return md


def _as_naive(column: Column[Any]) -> Column[Any]:
    copy = column._copy()
    copy.type = DateTime()
    return copy


def add_missing_columns(conn: Any) -> list[str]:
    """The reference schema's migration: add the columns of :data:`RETAIL` the database lacks.

    Additive only (a nullable column, or one with a server default), so a node
    can migrate while its peers still run the previous release (docs/CATALOG.md,
    "Schema versions"). Returns ``table.column`` for each column added.
    """
    from sqlalchemy.schema import CreateColumn

    from exchange.errors import DatabaseError

    added = []
    for name, columns in missing_columns(conn).items():
        for col_name in columns:
            col = RETAIL.tables[name].c[col_name]
            if col.nullable is False and col.server_default is None:
                raise DatabaseError(f"reference table {name} lacks column {col_name}, which is NOT NULL without "
                                    "a default: it cannot be added to existing rows",
                                    hint="Add it by hand with a value for the existing rows, then run "
                                         "`exchange migrate` again.")
            ddl = CreateColumn(col).compile(dialect=conn.dialect)
            quote = conn.dialect.identifier_preparer.quote
            conn.exec_driver_sql(f"ALTER TABLE {quote(name)} ADD COLUMN {ddl}")
            added.append(f"{name}.{col_name}")
    return added
