"""Issue 17, fixed cost per bundle: the short paths for small bundles leave what the staged paths left.

On PostgreSQL a bundle of a few documents deletes their rows by ``(a, b) IN (...)``
(``rows.SMALL_PG``) instead of through a temporary key table, and records their
versions in one ``INSERT ... ON CONFLICT`` instead of through a staging table:
five round trips each become one. The same scenario runs on both paths (and on
SQLite, where nothing changed): a bill changed (a line removed, one changed, one
added), a bill deleted, a bill naming an item the HO lacks (parked, then applied
on retry once the item exists); every side is then compared row by row with the
store (``check_net``), versions included.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enginehelpers import Net, add_item, check_net, make_net, seed_ho, seed_store
from sqlalchemy import and_, event, select

from exchange.database import rows
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.tables import xchg_doc_version
from exchange.demo.data import seed_store_activity
from exchange.receive.importer import retry_parked
from exchange.service import status
from exchange.service.sync import sync


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001",))
    yield n
    n.dispose()


@pytest.mark.parametrize("path", ["short", "staged"])
def test_small_bundles_apply_alike_on_the_short_and_the_staged_path(
        net: Net, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "staged":
        monkeypatch.setattr(rows, "SMALL_PG", 0)  # every key through a key table, every version staged
    seed_ho(net)
    net.settle()
    st, ho = net.store("s001"), net.ho
    staged: list[str] = []  # deletes through a key table, versions through a staging table

    @event.listens_for(ho.engine, "before_cursor_execute")
    def _seen(_conn: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if (statement.startswith("DELETE") and ") IN (SELECT" in statement and "xchg_keys_" in statement) \
                or "xchg_stg_xchg_doc_version" in statement:
            staged.append(statement)

    seed_store(net, "s001", sales=4)
    net.settle()
    with st.engine.begin() as conn:  # a bill naming an item the HO never had: parked there
        add_item(conn, "IX0000002")
        seed_store_activity(conn, "s001", ["IX0000002"], 1, seed=5)
    sync(st)
    sync(ho)
    parked = status.parked(ho)
    assert parked and {p.peer for p in parked} == {"s001"}
    with st.engine.connect() as conn:
        bills = [tuple(r) for r in conn.execute(select(s.sales_bill.c.store_id, s.sales_bill.c.bill_no)
                                                .order_by(s.sales_bill.c.bill_no))]
        lines = conn.execute(select(s.sales_bill_line).where(
            s.sales_bill_line.c.bill_no == bills[0][1]).order_by(s.sales_bill_line.c.line_no)).mappings().all()
    assert len(lines) >= 2 and len(bills) >= 2
    changed, gone = bills[0], bills[1]
    with st.engine.begin() as conn:
        line = s.sales_bill_line.c
        conn.execute(s.sales_bill_line.delete().where(and_(line.bill_no == changed[1],
                                                           line.line_no == lines[-1]["line_no"])))
        conn.execute(s.sales_bill_line.update().where(and_(line.bill_no == changed[1],
                                                           line.line_no == lines[0]["line_no"]))
                     .values(qty=lines[0]["qty"] + 1))
        conn.execute(s.sales_bill_line.insert().values({**dict(lines[0]), "line_no": 99}))
        for t in (s.sales_bill_payment, s.sales_bill_line):
            conn.execute(t.delete().where(t.c.bill_no == gone[1]))
        conn.execute(s.sales_bill.delete().where(s.sales_bill.c.bill_no == gone[1]))
        record_events(conn, "sales_bill", [changed])
        record_events(conn, "sales_bill", [gone], op="D")
    net.settle()
    with ho.engine.connect() as conn:
        v = xchg_doc_version.c
        versions = dict(conn.execute(select(v.doc_key, v.version).where(
            and_(v.peer == "s001", v.doc_type == "sales_bill"))).all())
    assert rows.canonical_key(changed) in versions and rows.canonical_key(gone) in versions

    with ho.engine.begin() as conn:
        add_item(conn, "IX0000002")
    assert retry_parked(ho, "s001") == (len(parked), 0)
    net.settle()
    assert status.parked(ho) == []
    assert check_net(net).problems == []  # every document row by row, on both sides
    if ho.engine.dialect.name == "postgresql":  # the path under test was the one taken
        assert bool(staged) == (path == "staged"), staged[:3]


def test_an_import_run_fsyncs_the_outbox_once_after_all_its_acks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ack's content is fsynced before its rename (files.write_file_atomic); the outbox folder, once per run."""
    from exchange.receive import importer
    from exchange.send.export import export_all

    net = make_net(tmp_path / "net", stores=("s001", "s002"))
    try:
        seed_ho(net)
        net.settle()
        for sid in ("s001", "s002"):
            seed_store(net, sid, sales=2)
            for e in export_all(net.store(sid)):
                (net.store(sid).cfg.outbox / e.file).rename(net.ho.cfg.inbox / e.file)
        synced: list[tuple[Path, list[str]]] = []
        real = getattr(importer, "fsync_dir")  # the name the importer calls

        def record(folder: Path) -> None:  # the real fsync, noted with what the folder held then
            synced.append((folder, sorted(p.name for p in folder.iterdir() if p.name.endswith(".ack"))))
            real(folder)

        monkeypatch.setattr(importer, "fsync_dir", record)
        outs = importer.import_inbox(net.ho)
        applied = [o for o in outs if o.status == "APPLIED"]
        assert {o.peer for o in applied} == {"s001", "s002"}, outs
        acks = sorted(p.name for p in net.ho.cfg.outbox.glob("*.ack"))
        assert len(acks) >= len(applied)
        assert synced == [(net.ho.cfg.outbox, acks)]  # once, at the end, with every ack of the run in place
    finally:
        net.dispose()
