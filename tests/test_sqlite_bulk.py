"""The SQLite bulk write's helpers of issue 17 (2026-12-03, later): the delete probe and the bulk page cache.

``rows.delete_docs`` on SQLite first asks one index range probe whether any row
can belong to the keys (``rows._sqlite_may_hold``), and skips the key table and
the delete when none can: an empty HO's first load built a key table of every
bill twice per bundle to delete nothing. These tests hold the probe to what the
plain delete does, row for row, including the cases it must leave to the plain
delete (a ``COLLATE NOCASE`` key, an integer key, keys with quotes or non-ASCII
text), and through a whole import: a stray line the HO holds of a bill it never
received (no version) is still replaced. ``rows.bulk_cache`` gives one bulk
statement a larger page cache and must give the connection its cache back,
after an error too.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from enginehelpers import Net, item_ids, make_net, seed_ho
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, text
from sqlalchemy.exc import IntegrityError

from exchange.database import rows
from exchange.database.capture import suppress_capture
from exchange.database.schema import RETAIL
from exchange.database.tables import make_engine
from exchange.demo.data import seed_store_activity
from exchange.service import status


def _table(collation: str | None = None, int_key: bool = False) -> Table:
    key_b = Column("b", Integer, primary_key=True) if int_key else Column("b", String(16, collation=collation),
                                                                           primary_key=True)
    return Table("t", MetaData(), Column("a", String(16, collation=collation), primary_key=True), key_b,
                 Column("n", Integer, primary_key=True), Column("v", String(16)))


def _key(a: str, b: Any) -> str:
    return rows.canonical_key([a, b])


def _stored(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT a, b, n, v FROM t ORDER BY a, b, n")]


STORED = [("s001", "B010", 1), ("s001", "B010", 2), ("s001", "B020", 1), ("s002", "B015", 1), ("S001", "B030", 1)]

#: (name, keys to delete, whether the probe alone must answer "nothing to delete")
CASES: list[tuple[str, list[str], bool]] = [
    ("bounds empty", [_key("s001", f"B{i:03d}") for i in range(100, 140)], True),
    ("another store's rows inside the bills' bounds", [_key("s003", f"B{i:03d}") for i in range(0, 40)], True),
    ("rows inside the bounds, none of the keys", [_key("s001", f"B{i:03d}") for i in range(5, 26, 2)], False),
    ("some keys stored", [_key("s001", f"B{i:03d}") for i in range(5, 25)], False),
    ("several stores", [_key(s, "B015") for s in ("s001", "s002", "s009")], False),
    ("a key stored in another case", [_key("s001", "B030"), _key("s001", "B031")], True),
    ("a quote or non-ASCII text", [_key("s001", 'B0"10'), _key("s001", "B010"), _key("s001", "Bé")], False),
]


@pytest.mark.parametrize("collation", [None, "NOCASE"])
@pytest.mark.parametrize(("name", "keys", "skipped"), CASES, ids=[c[0] for c in CASES])
def test_the_probe_deletes_what_the_plain_delete_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         collation: str | None, name: str, keys: list[str],
                                                         skipped: bool) -> None:
    """Same rows left and same count, with the probe and without it; the probe answers alone only when exact."""
    table = _table(collation)
    results = []
    for probe in (True, False):
        monkeypatch.setattr(rows, "SQLITE_STAGE_MIN", 1 if probe else 10**9)
        engine = make_engine(f"sqlite:///{tmp_path / f'{probe}.db'}")
        table.metadata.create_all(engine)
        try:
            with engine.begin() as conn:
                conn.execute(table.insert(), [{"a": a, "b": b, "n": n, "v": "x"} for a, b, n in STORED])
                if probe:
                    may = rows._sqlite_may_hold(conn, table, ("a", "b"), keys)
                    assert may is not (skipped and collation is None), name  # NOCASE: never answered by the probe
                n = rows.delete_docs(conn, table, ("a", "b"), keys)
            results.append((n, _stored(engine)))
        finally:
            engine.dispose()
    assert results[0] == results[1]
    if name == "a key stored in another case":  # NOCASE reaches S001's row: the probe must not hide it
        assert results[0][0] == (1 if collation else 0)


def test_an_integer_key_column_is_left_to_the_plain_delete(tmp_path: Path) -> None:
    """SQLite converts text to an INTEGER column's numbers: the probe does not judge such keys."""
    table = _table(int_key=True)
    engine = make_engine(f"sqlite:///{tmp_path / 'i.db'}")
    table.metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"a": "s001", "b": 7, "n": 1, "v": "x"}])
            assert rows._sqlite_may_hold(conn, table, ("a", "b"), [_key("s001", "8"), _key("s001", "9")])
            assert rows.delete_docs(conn, table, ("a", "b"), [_key("s001", "07"), _key("s001", "9")]) == 1
    finally:
        engine.dispose()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = make_net(tmp_path / "net", stores=("s001",))
    seed_ho(n)
    n.settle()
    yield n
    n.dispose()


def test_a_stray_line_of_a_bill_never_received_is_replaced_by_the_first_load(net: Net,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An HO row without a version (written here, not by the store) is deleted as before: the probe finds it."""
    monkeypatch.setattr(rows, "SQLITE_STAGE_MIN", 4)  # the store's 30 bills go through the stage and the probe
    with net.store("s001").engine.begin() as conn:
        seed_store_activity(conn, "s001", item_ids(net)[:6], 30, seed=5)
    with net.store("s001").engine.connect() as conn:
        bill_no, line_no = conn.execute(text("SELECT bill_no, max(line_no) FROM sales_bill_line "
                                             "GROUP BY bill_no ORDER BY bill_no LIMIT 1 OFFSET 7")).one()
        bill = RETAIL.tables["sales_bill"]
        header = dict(conn.execute(bill.select().where(bill.c.bill_no == bill_no)).mappings().one(),
                      customer_id=None)  # the customer travels in the same sync: not here yet
        store_lines = [tuple(r) for r in conn.execute(text(
            "SELECT * FROM sales_bill_line ORDER BY bill_no, line_no"))]
    with net.ho.engine.begin() as conn, suppress_capture(conn):  # the bill's header, a line the store never had
        conn.execute(RETAIL.tables["sales_bill"].insert(), [header])
        conn.execute(text("INSERT INTO sales_bill_line (store_id, bill_no, line_no, item_id, qty, price, amount, tax) "
                          "VALUES ('s001', :b, :n, :i, 1, 100, 100, 0)"), {"b": bill_no, "n": line_no + 5,
                                                                            "i": item_ids(net)[0]})
    net.settle()
    assert status.parked(net.ho) == []
    with net.ho.engine.connect() as conn:
        ho_lines = [tuple(r) for r in conn.execute(text(
            "SELECT * FROM sales_bill_line WHERE store_id = 's001' ORDER BY bill_no, line_no"))]
    assert ho_lines == store_lines


def test_the_bulk_cache_is_given_back_after_the_statement_and_after_an_error(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The larger page cache lasts one statement: an import's memory between statements is as before."""
    monkeypatch.setattr(rows, "SQLITE_STAGE_MIN", 2)
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    RETAIL.create_all(engine, tables=[RETAIL.tables["sales_bill"], RETAIL.tables["sales_bill_payment"]])
    table = RETAIL.tables["sales_bill_payment"]

    def cache(conn: Any) -> int:
        return int(conn.exec_driver_sql("PRAGMA main.cache_size").scalar_one())

    try:
        with engine.begin() as conn:
            before = cache(conn)
            with rows.bulk_cache(conn, 2):
                assert cache(conn) == -rows.BULK_CACHE_KIB != before
            assert cache(conn) == before
            with rows.bulk_cache(conn, 1):  # below SQLITE_STAGE_MIN: untouched
                assert cache(conn) == before
            orphans = pa.Table.from_pylist([{"store_id": "s001", "bill_no": "B1", "line_no": i, "method": "cash",
                                             "amount": Decimal("1.00")} for i in range(3)], schema=rows.arrow_schema(table))
            with pytest.raises(IntegrityError, match="FOREIGN KEY"):  # no bill B1: the staged write is refused
                with conn.begin_nested():
                    rows.insert_rows(conn, table, orphans)
            assert cache(conn) == before
    finally:
        engine.dispose()
