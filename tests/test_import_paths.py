"""The importer's whole-column paths leave the database the value-by-value paths left.

Two HO homes with the same keys and the same database contents (the second on a copy of the
first's database) import the same store bundles: one as the importer runs now (keys built and
checked by Arrow, rows streamed to ``executemany``), one with those replaced by the paths they
replaced (a Python key per row, every key checked one by one, a list of parameter tuples per
slice through SQLAlchemy). The bundles hold plain keys and keys Arrow does not build (non-ASCII,
a quote), a sale naming an item the HO does not know (parked), and then every bill again in a
newer version (a full HO). Both databases must hold the same documents, parked documents,
versions and received rows, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import _fresh_pg_database
from enginehelpers import add_item, make_net, seed_ho, seed_store
from sqlalchemy import Connection, Table, inspect

from exchange.database import rows
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.tables import xchg_doc_version, xchg_parked, xchg_received
from exchange.demo.data import seed_masters
from exchange.node import config
from exchange.node.home import Node
from exchange.receive.importer import import_inbox
from exchange.send import export
from exchange.send.export import export_all


def _old_sqlite_write(conn: Connection, sql: str, table: Table, data: Any, cols: list[str]) -> None:
    """The write before: a list of a slice's parameter tuples, through SQLAlchemy's executemany."""
    for part in rows._slices(data):
        params = list(zip(*[rows._sqlite_values(table.c[c], part.column(c)) for c in cols], strict=True))
        rows.executemany(conn, sql, params)


def _old_paths(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(rows, "_plain_key_array", lambda data, key_cols: None)  # keys value by value through json
    mp.setattr(rows, "split_keys", lambda keys, width: None)  # owners key by key
    mp.setattr(rows, "unchecked_keys", lambda table, key_cols, keys: list(keys))  # every key checked alone
    mp.setattr(rows, "_sqlite_write", _old_sqlite_write)


def _contents(node: Node) -> dict[str, Any]:
    """Every business table, parked document, version and received row (times and signatures left out)."""
    out: dict[str, Any] = {}
    with node.engine.connect() as conn:
        for name in sorted(s.RETAIL.tables):
            out[name] = sorted(repr(tuple(r)) for r in conn.exec_driver_sql(f'SELECT * FROM "{name}"'))
        p = xchg_parked.c
        out["parked"] = sorted(repr(tuple(r)) for r in conn.execute(
            xchg_parked.select().with_only_columns(p.doc_type, p.doc_key, p.peer, p.seq, p.version, p.op, p.data,
                                                   p.error, p.state)))
        out["versions"] = sorted(repr(tuple(r)) for r in conn.execute(xchg_doc_version.select()))
        r = xchg_received.c
        out["received"] = sorted(repr(tuple(x)) for x in conn.execute(
            xchg_received.select().with_only_columns(r.peer, r.seq, r.status, r.reason, r.summary)))
        assert "xchg_parked" in inspect(conn).get_table_names()
    return out


def _bill(conn: Connection, bill_no: str, item_id: str) -> None:
    """A bill of one line and one payment, with its event."""
    conn.execute(s.sales_bill.insert().values(store_id="s001", bill_no=bill_no,
                                              bill_date=datetime(2024, 3, 2, 10, tzinfo=UTC),
                                              customer_id=None, total=Decimal("5.25"), tax=Decimal("0.25")))
    conn.execute(s.sales_bill_line.insert().values(store_id="s001", bill_no=bill_no, line_no=1, item_id=item_id,
                                                   qty=Decimal("1.000"), price=Decimal("5.00"),
                                                   amount=Decimal("5.00"), tax=Decimal("0.25")))
    conn.execute(s.sales_bill_payment.insert().values(store_id="s001", bill_no=bill_no, line_no=1, method="CASH",
                                                      amount=Decimal("5.25")))
    record_events(conn, "sales_bill", [("s001", bill_no)])


@pytest.fixture
def twin_urls(db_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two fresh databases of the kind ``db_url`` is."""
    with ExitStack() as stack:
        other = f"sqlite:///{tmp_path / 'twin.db'}" if db_url.startswith("sqlite") \
            else stack.enter_context(_fresh_pg_database())
        yield db_url, other


def test_whole_column_paths_leave_what_the_value_by_value_paths_left(
        tmp_path: Path, twin_urls: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    net = make_net(tmp_path / "net", ho_db=twin_urls[0], stores=("s001",))
    try:
        # the twin HO: the same home (keys, peers), its own database, seeded alike
        twin_home = tmp_path / "twin-ho"
        shutil.copytree(net.ho.cfg.home, twin_home)
        cfg = config.load(twin_home)
        cfg.database = twin_urls[1]
        cfg.save()
        (twin_home / "exchange.db").unlink(missing_ok=True)
        if twin_urls[1].startswith("sqlite"):
            Path(twin_urls[1].removeprefix("sqlite:///")).touch(mode=0o600)
        twin = Node(cfg)
        twin.migrate()
        seed_ho(net)
        with twin.engine.begin() as conn:
            seed_masters(conn, 20, ["s001"], {"s001": "north"})
        net.settle()

        st = net.store("s001")
        items = [k[0] for k in net.masters["item"]]
        seed_store(net, "s001", sales=40)
        with st.engine.begin() as conn:
            add_item(conn, "IX0000099")  # the store's own item, never sent: its sale parks at the HO
            _bill(conn, "BX-1", "IX0000099")
            _bill(conn, "B-\u00fc1", items[0])  # a key Arrow does not build: non-ASCII
            _bill(conn, 'B"q', items[1])  # and one with a quote

        def deliver_and_import() -> None:
            out = export_all(st)
            files = [st.cfg.outbox / e.file for e in out]
            assert files
            for f in files:
                shutil.copyfile(f, net.ho.cfg.inbox / f.name)
                shutil.copyfile(f, twin.cfg.inbox / f.name)
                f.unlink()
            now = import_inbox(net.ho)
            with monkeypatch.context() as mp:
                _old_paths(mp)
                before = import_inbox(twin)
            assert [(o.status, o.parked, o.applied) for o in now] == \
                [(o.status, o.parked, o.applied) for o in before]
            assert {o.status for o in now} == {"APPLIED"}

        deliver_and_import()
        got = _contents(net.ho)
        assert len(got["parked"]) == 1 and "BX-1" in got["parked"][0]
        assert any("B-\u00fc1" in r for r in got["sales_bill"]) and any('B"q' in r for r in got["sales_bill"])
        assert got == _contents(twin)

        export.reload(st, "ho", ["sales_bill"])  # every bill again, a newer version: a full HO
        deliver_and_import()
        assert _contents(net.ho) == _contents(twin)
        twin.engine.dispose()
    finally:
        net.dispose()
