"""The bulk write of the import on SQLite (issue 17): staged rows, documents replaced in place.

From :data:`exchange.database.rows.SQLITE_STAGE_MIN` rows, SQLite rows go
through a constraint-free temporary table (many rows per statement) and one
``INSERT ... SELECT``; documents the node held before are updated in place
(unchanged rows not rewritten) and only the rows a document no longer has are
deleted, as on PostgreSQL. These tests hold the new path to what the old one
did: the same stored values, a line naming an unknown item parks its document
alone with the database's words, a hostile line sent twice parks its document
(the upsert must not fold it into one), and an import killed after the write
and before the commit leaves nothing half-done. The HO runs on SQLite and on
PostgreSQL; the imports go through the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from enginehelpers import Net, add_item, doc_hashes, forge_bundle, item_ids, make_net, seed_ho
from sqlalchemy import select, text
from test_references import dangling

from exchange.database import rows
from exchange.database.batch import control_totals
from exchange.database.schema import RETAIL
from exchange.database.tables import make_engine
from exchange.demo.data import seed_store_activity
from exchange.service import status

N = 23  # with WRITE_BATCH = _FILL_BATCH = 8 and _FILL_ROWS = 3: slices of 8, 8, 7; groups of 3 and a remainder


def _items(bump: int = 0) -> pa.Table:
    item = RETAIL.tables["item"]
    return pa.Table.from_pylist([{
        "item_id": f"I{i:03d}", "name": f"item {i} 'quoted' \"x\"", "category": "C",
        "uom": "EA", "price": Decimal(f"{i + bump}.{i:02d}"), "tax_rate": Decimal("5.25"),
        "active": i % 2 == 0, "updated_at": datetime(2025, 1, 1, 12, i),
        "brand": None if i % 5 == 0 else f"B{i}",
    } for i in range(N)], schema=rows.arrow_schema(item))


def _stored(engine: Any) -> list[dict[str, Any]]:
    item = RETAIL.tables["item"]
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(item).order_by(item.c.item_id)).mappings()]


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "row-by-row"])
def test_staged_and_row_by_row_writes_store_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     staged: bool) -> None:
    """Inserts and upserts through the stage store exactly what one statement per row stores."""
    monkeypatch.setattr(rows, "WRITE_BATCH", 8)
    monkeypatch.setattr(rows, "_FILL_ROWS", 3)
    monkeypatch.setattr(rows, "_FILL_BATCH", 8)
    monkeypatch.setattr(rows, "SQLITE_STAGE_MIN", 1 if staged else 10**9)
    engine = make_engine(f"sqlite:///{tmp_path / 'n.db'}")
    item = RETAIL.tables["item"]
    RETAIL.create_all(engine, tables=[item])
    try:
        with engine.begin() as conn:
            assert rows.insert_rows(conn, item, _items()) == N
        assert _stored(engine) == _items().to_pylist()
        with engine.begin() as conn:  # every other row changed, the rest sent again as they are
            again = pa.concat_tables([_items(bump=100).filter(pc.equal(pc.bit_wise_and(
                pa.array(range(N)), 1), 1)), _items().filter(pc.equal(pc.bit_wise_and(pa.array(range(N)), 1), 0))])
            assert rows.upsert_rows(conn, item, again) == N
        want = sorted(again.to_pylist(), key=lambda r: r["item_id"])
        assert _stored(engine) == want
        with engine.connect() as conn:  # the stages are empty afterwards
            stages = [n for (n,) in conn.exec_driver_sql(
                "SELECT name FROM sqlite_temp_master WHERE type = 'table' AND name LIKE 'xchg_stg_%'")]
            assert all(conn.exec_driver_sql(f"SELECT count(*) FROM temp.{s}").scalar() == 0 for s in stages)
    finally:
        engine.dispose()


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """An HO (SQLite, then PostgreSQL) holding 120 bills (several hundred lines) of s001."""
    n = make_net(tmp_path / "net", ho_db=None if db_url.startswith("sqlite") else db_url, stores=("s001",))
    seed_ho(n)
    n.settle()
    with n.store("s001").engine.begin() as conn:
        seed_store_activity(conn, "s001", item_ids(n)[:6], 120, seed=3)
    n.settle()
    assert status.parked(n.ho) == []
    with n.ho.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sales_bill_line")).scalar() >= rows.SQLITE_STAGE_MIN
    yield n
    n.dispose()


def _import(home: Path, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EXCHANGE_HOME", "EXCHANGE_CRASH_AT")}
    if crash_at:
        env["EXCHANGE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "exchange", "import", "--home", str(home)],
                          capture_output=True, text=True, env=env, timeout=300)


def _bills(net: Net) -> list[str]:
    with net.store("s001").engine.connect() as conn:
        return [f'["s001","{no}"]' for (no,) in conn.execute(text("SELECT bill_no FROM sales_bill ORDER BY bill_no"))]


def _resend(net: Net, tables_hook: Any = None) -> Path:
    """Every bill of s001 again, as the store holds it now, sealed into the HO's inbox."""
    st, dt = net.store("s001"), net.store("s001").catalog.get("sales_bill")
    docs = [("sales_bill", k, "U", 10**9) for k in _bills(net)]
    held: dict[str, Any] = {}

    def hook(tables: dict[str, Any]) -> None:
        tables_hook(tables)
        per = {t: tables[t] for t in dt.tables() if t in tables}
        held["s"]["documents"]["sales_bill"].update(control_totals(dt, per, len(docs)))

    return forge_bundle(st, "ho", docs, out_dir=net.ho.cfg.inbox, summary_hook=lambda s: held.update(s=s),
                        tables_hook=hook if tables_hook else None)


def test_held_documents_are_replaced_in_place_and_a_crash_before_the_commit_leaves_them_whole(net: Net) -> None:
    """A second bundle of every bill: one lost a line, one gained one, one line changed, one names an item
    the HO lacks. After an import killed between the write and the commit, the HO is as before; the next
    import leaves each bill as the store has it, except the one naming the unknown item, which parks
    (the database's words) with its old rows kept; no row refers to a missing one."""
    ho, st = net.ho, net.store("s001")
    dt = ho.catalog.get("sales_bill")
    bills = _bills(net)
    before = doc_hashes(ho, dt, bills)
    assert before == doc_hashes(st, dt, bills)
    nos = [b.split('"')[3] for b in bills]
    with st.engine.begin() as conn:
        last = conn.execute(text("SELECT max(line_no) FROM sales_bill_line WHERE bill_no = :b"), {"b": nos[0]}).scalar()
        conn.execute(text("DELETE FROM sales_bill_line WHERE bill_no = :b AND line_no = :n"), {"b": nos[0], "n": last})
        conn.execute(text("INSERT INTO sales_bill_line (store_id, bill_no, line_no, item_id, qty, price, amount, tax) "
                          "SELECT store_id, bill_no, line_no + 100, item_id, qty, price, amount, tax "
                          "FROM sales_bill_line WHERE bill_no = :b AND line_no = 1"), {"b": nos[1]})
        conn.execute(text("UPDATE sales_bill_line SET qty = qty + 1 WHERE bill_no = :b AND line_no = 1"), {"b": nos[2]})
        add_item(conn, "IX0000077")  # the store's own, never sent: the HO lacks it
        conn.execute(text("UPDATE sales_bill_line SET item_id = 'IX0000077' WHERE bill_no = :b AND line_no = 1"),
                     {"b": nos[3]})
    _resend(net)

    killed = _import(ho.cfg.home, crash_at="import.applied")
    assert killed.returncode == -9, killed.stderr
    assert doc_hashes(ho, dt, bills) == before and status.parked(ho) == []

    done = _import(ho.cfg.home)
    assert done.returncode == 0, done.stderr
    parked = status.parked(ho)
    assert [(p.doc_type, p.doc_key) for p in parked] == [("sales_bill", bills[3])]
    assert "foreign key" in parked[0].error.lower()
    now, want = doc_hashes(ho, dt, bills), doc_hashes(st, dt, bills)
    assert now[bills[3]] == before[bills[3]] != want[bills[3]]
    assert {k: v for k, v in now.items() if k != bills[3]} == {k: v for k, v in want.items() if k != bills[3]}
    assert all(now[b] != before[b] for b in bills[:3])
    assert dangling(net) == []


@pytest.mark.parametrize("damage", ["twice", "no line number"])
def test_a_line_sent_twice_or_without_its_key_in_a_held_document_parks_it(net: Net, damage: str) -> None:
    """A hostile bundle repeats a line of a bill the HO holds, or sends one without its line number: that
    bill parks (the upsert must not fold the two rows into one, nor take a keyless row for a new one), its
    stored rows stay as they were, every other bill applies."""
    ho, st = net.ho, net.store("s001")
    dt = ho.catalog.get("sales_bill")
    bills = _bills(net)
    before = doc_hashes(ho, dt, bills)
    victim = bills[5].split('"')[3]
    with st.engine.begin() as conn:
        conn.execute(text("UPDATE sales_bill_line SET qty = qty + 2"))  # every bill changed

    def twice(tables: dict[str, Any]) -> None:
        lines = tables["sales_bill_line"]
        if damage == "twice":
            one = lines.filter(pc.equal(lines["bill_no"], victim)).slice(0, 1)
            tables["sales_bill_line"] = pa.concat_tables([lines, one])
            return
        hit = pc.and_(pc.equal(lines["bill_no"], victim), pc.equal(lines["line_no"], 1))
        i = lines.column_names.index("line_no")
        tables["sales_bill_line"] = lines.set_column(i, lines.field(i).with_nullable(True),
                                                     pc.if_else(hit, None, lines["line_no"]))

    _resend(net, tables_hook=twice)
    done = _import(ho.cfg.home)
    assert done.returncode == 0, done.stderr
    assert [(p.doc_type, p.doc_key) for p in status.parked(ho)] == [("sales_bill", bills[5])]
    now, want = doc_hashes(ho, dt, bills), doc_hashes(st, dt, bills)
    assert now[bills[5]] == before[bills[5]]
    assert {k: v for k, v in now.items() if k != bills[5]} == {k: v for k, v in want.items() if k != bills[5]}
