"""Change capture: record_event and triggers agree, and suppression works, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Iterator
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, delete, insert, select, text, update

from exchange.database import schema as s
from exchange.database.capture import (
    SUPPRESS_TABLE, capture_suppressed, drop_triggers, install_triggers, key_sql, parse_key,
    record_event, record_events, suppress_capture, trigger_names, triggers_installed,
)
from exchange.database.catalog import Catalog, reference_catalog
from exchange.database.tables import make_engine, migrate, xchg_event
from exchange.errors import DatabaseError

CATALOG = reference_catalog()
NOW = dt.datetime(2024, 1, 1, 9, 0)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    migrate(eng)
    with eng.begin() as conn:
        s.RETAIL.create_all(conn)
    yield eng
    eng.dispose()


def events(conn: Connection) -> list[tuple[str, str, str]]:
    rows = conn.execute(select(xchg_event.c.doc_type, xchg_event.c.doc_key, xchg_event.c.op)
                        .order_by(xchg_event.c.id))
    return [(r.doc_type, r.doc_key, r.op) for r in rows]


def clear(conn: Connection) -> None:
    conn.execute(delete(xchg_event))


def add_item(conn: Connection, item_id: str, barcodes: int = 0) -> None:
    conn.execute(insert(s.item).values(item_id=item_id, name="Tea", category="BEVERAGE", uom="EA",
                                       price=Decimal("2.50"), tax_rate=Decimal("5"), updated_at=NOW))
    if barcodes:
        conn.execute(insert(s.item_barcode), [
            {"item_id": item_id, "line_no": n, "barcode": f"{item_id}-{n}"} for n in range(1, barcodes + 1)])


def add_bill(conn: Connection, store: str, bill_no: str, lines: int = 2) -> None:
    conn.execute(insert(s.sales_bill).values(store_id=store, bill_no=bill_no, bill_date=NOW,
                                             total=Decimal("5.00"), tax=Decimal("0.25")))
    if lines:
        conn.execute(insert(s.sales_bill_line), [
            {"store_id": store, "bill_no": bill_no, "line_no": n, "item_id": "I1", "qty": Decimal(1),
             "price": Decimal("2.50"), "amount": Decimal("2.50"), "tax": Decimal("0.13")}
            for n in range(1, lines + 1)])


def rendered(conn: Connection, doc_type: str, key: list[object]) -> str:
    """The doc_key record_event writes, read back (and removed)."""
    record_event(conn, doc_type, key)
    row = conn.execute(select(xchg_event.c.id, xchg_event.c.doc_key).order_by(xchg_event.c.id.desc())).first()
    assert row is not None
    conn.execute(delete(xchg_event).where(xchg_event.c.id == row.id))
    return str(row.doc_key)


# --- key rendering ------------------------------------------------------------------------


def test_key_sql_is_the_same_expression_for_api_and_triggers() -> None:
    assert key_sql("sqlite", ["?", "NEW.b"]) == "json_array(CAST(? AS TEXT), CAST(NEW.b AS TEXT))"
    assert key_sql("postgresql", ["%s"]) == "jsonb_build_array(CAST(%s AS TEXT))::text"
    with pytest.raises(DatabaseError, match="SQLite and PostgreSQL, not 'mysql'"):
        key_sql("mysql", ["?"])
    with pytest.raises(ValueError):
        key_sql("sqlite", [])


def test_record_event_rejects_bad_input(engine: Engine) -> None:
    with engine.begin() as conn:
        for bad in ("I1", [], ["s1", None]):
            with pytest.raises(ValueError):
                record_event(conn, "item", bad)
        with pytest.raises(ValueError, match="op must be"):
            record_event(conn, "item", ["I1"], "X")  # type: ignore[arg-type]
        assert events(conn) == []


def test_record_event_renders_in_the_database(engine: Engine) -> None:
    with engine.begin() as conn:
        record_event(conn, "item", ["I1"])
        record_event(conn, "sales_bill", ["s1", "B1"], "D")
        assert record_events(conn, "customer", [("s1", "C1"), ("s1", "C2")]) == 2
        record_event(conn, "item", [5])
        got = events(conn)
    assert [(d, parse_key(k), op) for d, k, op in got] == [
        ("item", ["I1"], "U"), ("sales_bill", ["s1", "B1"], "D"),
        ("customer", ["s1", "C1"], "U"), ("customer", ["s1", "C2"], "U"), ("item", ["5"], "U")]
    # An integer and its text render the same key.
    with engine.begin() as conn:
        assert rendered(conn, "item", [5]) == rendered(conn, "item", ["5"])


def test_events_roll_back_with_the_change(engine: Engine) -> None:
    install_triggers(engine, CATALOG, "ho")
    with engine.connect() as conn:
        add_item(conn, "I1", barcodes=1)
        record_event(conn, "item", ["I1"])
        assert events(conn)
        conn.rollback()
        assert events(conn) == []


# --- triggers ------------------------------------------------------------------------------


def test_trigger_and_api_keys_are_identical_so_they_coalesce(engine: Engine) -> None:
    install_triggers(engine, CATALOG, "ho")
    with engine.begin() as conn:
        add_item(conn, "I1", barcodes=2)
        by_trigger = {k for _d, k, _op in events(conn)}
        assert by_trigger == {rendered(conn, "item", ["I1"])}
        add_item(conn, "I2")
    install_triggers(engine, CATALOG, "store")
    with engine.begin() as conn:
        clear(conn)
        add_bill(conn, "s-01", "B0001")
        record_event(conn, "sales_bill", ["s-01", "B0001"])
        got = events(conn)
        assert {d for d, _k, _op in got} == {"sales_bill"}
        assert len({k for _d, k, _op in got}) == 1, got   # one document, one key string
        assert parse_key(got[0][1]) == ["s-01", "B0001"]


@pytest.fixture
def customer_engine(engine: Engine) -> Engine:
    install_triggers(engine, CATALOG, "store")
    return engine


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(store=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                     min_size=1, max_size=32),
       cust=st.text(min_size=1, max_size=32).filter(lambda t: "\x00" not in t))
def test_any_key_text_renders_identically(customer_engine: Engine, store: str, cust: str) -> None:
    """Quotes, backslashes, control characters, non-ASCII: the database renders both paths alike."""
    with customer_engine.connect() as conn:
        conn.execute(insert(s.customer).values(store_id=store, customer_id=cust, name="n", created_at=NOW))
        (doc_type, by_trigger, op), = events(conn)
        assert (doc_type, op) == ("customer", "U")
        assert by_trigger == rendered(conn, "customer", [store, cust])
        assert parse_key(by_trigger) == [store, cust]
        conn.rollback()


def test_trigger_ops_follow_the_document(engine: Engine) -> None:
    install_triggers(engine, CATALOG, "ho")
    with engine.begin() as conn:
        add_item(conn, "I1", barcodes=3)
        add_item(conn, "I2", barcodes=1)
        k1, k2 = rendered(conn, "item", ["I1"]), rendered(conn, "item", ["I2"])
        assert set(events(conn)) == {("item", k1, "U"), ("item", k2, "U")}

        clear(conn)  # a child change is an update of the document
        conn.execute(delete(s.item_barcode).where(s.item_barcode.c.item_id == "I1",
                                                  s.item_barcode.c.line_no == 3))
        conn.execute(update(s.item_barcode).where(s.item_barcode.c.item_id == "I1").values(barcode=s.item_barcode.c.barcode + "x"))
        assert set(events(conn)) == {("item", k1, "U")}

        clear(conn)  # a line moving to another document touches both
        conn.execute(update(s.item_barcode).where(s.item_barcode.c.item_id == "I1", s.item_barcode.c.line_no == 2)
                     .values(item_id="I2"))
        assert set(events(conn)) == {("item", k1, "U"), ("item", k2, "U")}

        clear(conn)  # header delete: 'D' (the cascaded line deletes say 'D' too)
        conn.execute(delete(s.item).where(s.item.c.item_id == "I1"))
        got = events(conn)
        assert got and set(got) == {("item", k1, "D")}
        assert got[-1][2] == "D"

        clear(conn)  # a key change: the old document is gone, the new one exists (lines follow: ON UPDATE CASCADE)
        conn.execute(update(s.item).where(s.item.c.item_id == "I2").values(item_id="I3"))
        k3 = rendered(conn, "item", ["I3"])
        assert set(events(conn)) == {("item", k2, "D"), ("item", k3, "U")}
        assert conn.execute(select(s.item_barcode.c.item_id).distinct()).scalars().all() == ["I3"]


def test_triggers_only_on_owned_document_types(engine: Engine) -> None:
    names = install_triggers(engine, CATALOG, "store")
    assert names == trigger_names(CATALOG, "store")
    tables = [t for d in CATALOG.owned_by("store") for t in d.tables()]
    assert len(names) == 3 * len(tables) == 24
    assert triggers_installed(engine, CATALOG, "store")
    assert not triggers_installed(engine, CATALOG, "ho")
    with engine.begin() as conn:
        add_item(conn, "I1", barcodes=1)     # HO-owned: applied from the HO, never echoed back
        assert events(conn) == []
        add_bill(conn, "s1", "B1")
        assert {d for d, _k, _op in events(conn)} == {"sales_bill"}


def test_install_is_idempotent_and_switches_roles(engine: Engine) -> None:
    first = install_triggers(engine, CATALOG, "ho")
    assert install_triggers(engine, CATALOG, "ho") == first
    assert len(first) == 39  # 12 HO-owned tables and customer (edited on both sides), 3 triggers each
    with engine.begin() as conn:
        add_item(conn, "I1")
        assert len(events(conn)) == 1      # one trigger per event, not two
    install_triggers(engine, CATALOG, "store")   # a node re-initialised as a store
    assert not triggers_installed(engine, CATALOG, "ho")
    with engine.begin() as conn:
        clear(conn)
        add_item(conn, "I2")
        assert events(conn) == []


def test_drop_triggers(engine: Engine) -> None:
    installed = install_triggers(engine, CATALOG, "ho")
    assert drop_triggers(engine, CATALOG, "ho") == installed
    assert drop_triggers(engine, CATALOG, "ho") == []
    assert not triggers_installed(engine, CATALOG, "ho")
    with engine.begin() as conn:
        add_item(conn, "I1")
        assert events(conn) == []


def test_install_in_callers_transaction(engine: Engine) -> None:
    with engine.connect() as conn:
        install_triggers(conn, CATALOG, "ho")
        assert triggers_installed(conn, CATALOG, "ho")
        add_item(conn, "I1")
        assert len(events(conn)) == 1
        conn.commit()
    assert triggers_installed(engine, CATALOG, "ho")


def test_install_needs_the_event_table(tmp_path: object) -> None:
    eng = make_engine(f"sqlite:///{tmp_path}/bare.db")
    with eng.begin() as conn:
        s.RETAIL.create_all(conn)
    with pytest.raises(DatabaseError, match="xchg_event does not exist"):
        install_triggers(eng, CATALOG, "ho")
    eng.dispose()


def test_custom_catalog_with_awkward_names(engine: Engine) -> None:
    """Quoted identifiers and long names (PostgreSQL's 63-byte limit) still work."""
    from sqlalchemy import Column, ForeignKeyConstraint, Integer, MetaData, String, Table

    from exchange.database.catalog import DocType, Route

    md = MetaData()
    long = "a_really_long_point_of_sale_table_name_that_goes_on_and_on_x"  # 60 characters
    Table("Order Head", md, Column("Order No", String(32), primary_key=True), Column("Store Id", String(32)))
    Table(long, md, Column("Order No", String(32), primary_key=True), Column("line_no", Integer, primary_key=True),
          ForeignKeyConstraint(["Order No"], ['Order Head.Order No'], ondelete="CASCADE"))
    catalog = Catalog(md, [DocType("order", "Order Head", (long,), ("Order No",), "store", Route("ho"),
                                           owner_columns=("Store Id",))])
    md.create_all(engine)
    names = install_triggers(engine, catalog, "store")
    assert all(len(n) <= 63 for n in names) and len(set(names)) == 6
    assert triggers_installed(engine, catalog, "store")
    with engine.begin() as conn:
        conn.execute(insert(md.tables["Order Head"]).values({"Order No": "O'1"}))
        conn.execute(insert(md.tables[long]).values({"Order No": "O'1", "line_no": 1}))
        conn.execute(delete(md.tables["Order Head"]))
        key = rendered(conn, "order", ["O'1"])
        assert {(k, op) for _d, k, op in events(conn)} == {(key, "U"), (key, "D")}
        assert events(conn)[-1][2] == "D"
    assert drop_triggers(engine, catalog, "store") == names


def test_foreign_application_writes_are_captured(engine: Engine) -> None:
    """A POS that knows nothing of exchange writes with its own driver; the triggers still capture."""
    install_triggers(engine, CATALOG, "store")
    with engine.begin() as conn:
        add_item(conn, "I1")
    if engine.dialect.name == "sqlite":
        raw = sqlite3.connect(str(engine.url.database))
        raw.execute("PRAGMA foreign_keys=ON")
        raw.execute("INSERT INTO sales_bill VALUES ('s1', 'B9', '2024-01-01 10:00:00', NULL, 500, 25, NULL)")
        raw.commit()
        raw.close()
    else:
        import psycopg

        url = engine.url
        host = url.query.get("host")
        with psycopg.connect(dbname=url.database, host=str(host) if host else None, user=url.username) as pg:
            pg.execute("INSERT INTO sales_bill VALUES ('s1', 'B9', now(), NULL, 5, 0.25)")
    with engine.begin() as conn:
        assert [(d, parse_key(k), op) for d, k, op in events(conn)] == [("sales_bill", ["s1", "B9"], "U")]


# --- suppression ---------------------------------------------------------------------------


def test_suppress_capture_stops_trigger_events(engine: Engine) -> None:
    install_triggers(engine, CATALOG, "ho")
    with engine.begin() as conn:
        assert not capture_suppressed(conn)
        with suppress_capture(conn):
            assert capture_suppressed(conn)
            add_item(conn, "I1", barcodes=2)
            with suppress_capture(conn):       # nests
                add_item(conn, "I2")
            assert capture_suppressed(conn)
            add_item(conn, "I3")
            record_event(conn, "item", ["I9"])  # the API still records: it is explicit
        assert not capture_suppressed(conn)
        assert [parse_key(k) for _d, k, _op in events(conn)] == [["I9"]]
        add_item(conn, "I4")                    # capture resumes after the block
        assert [parse_key(k) for _d, k, _op in events(conn)] == [["I9"], ["I4"]]
    with engine.begin() as conn:
        assert not capture_suppressed(conn)
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql(f"SELECT count(*) FROM {SUPPRESS_TABLE}").scalar() == 0


def test_suppress_capture_is_restored_after_an_error(engine: Engine) -> None:
    install_triggers(engine, CATALOG, "ho")
    with engine.connect() as conn:
        with pytest.raises(RuntimeError):
            with suppress_capture(conn):
                add_item(conn, "I1")
                raise RuntimeError("apply failed")
        assert not capture_suppressed(conn)
        add_item(conn, "I2")
        assert [parse_key(k) for _d, k, _op in events(conn)] == [["I2"]]
        conn.rollback()
        # A database error inside the block (PostgreSQL aborts the transaction) is not hidden.
        with pytest.raises(Exception, match="(?i)unique|duplicate"):
            with suppress_capture(conn):
                add_item(conn, "I1")
                add_item(conn, "I1")
        conn.rollback()
        assert not capture_suppressed(conn)


def test_suppress_capture_is_local_to_the_connection(engine: Engine) -> None:
    install_triggers(engine, CATALOG, "ho")
    with engine.connect() as importer, engine.connect() as other:
        with suppress_capture(importer):
            add_item(importer, "I1")
            assert not capture_suppressed(other)
            if engine.dialect.name == "postgresql":   # SQLite has one writer at a time
                add_item(other, "I2")
                other.commit()
        importer.commit()
    with engine.connect() as conn:
        expected = [["I2"]] if engine.dialect.name == "postgresql" else []
        assert [parse_key(k) for _d, k, _op in events(conn)] == expected


def test_sqlite_stale_suppression_row_is_cleared(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    """A committed suppression row (a crash mid-block after a stray commit) must not silence capture forever."""
    eng = make_engine(f"sqlite:///{tmp_path}/n.db")
    migrate(eng)
    with eng.begin() as conn:
        s.RETAIL.create_all(conn)
    install_triggers(eng, CATALOG, "ho")
    with eng.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {SUPPRESS_TABLE} DEFAULT VALUES")
    with eng.begin() as conn, caplog.at_level(logging.WARNING):
        with suppress_capture(conn):
            pass
        add_item(conn, "I1")
        assert len(events(conn)) == 1
    assert "stale capture-suppression" in caplog.text
    eng.dispose()
