"""References checked set-based before the bulk write (exchange.database.references), on PostgreSQL.

A store's bundle of many bills, one of which names an item the HO does not have: that bill (and
every other document naming the item) parks with the database's own words, the rest applies, and
no row ever names an item that is not there, whichever ``[import] reference_check`` the HO uses.
With ``exchange`` the bulk write runs without the foreign-key triggers: the rows checked are
locked until the commit, and a table with a trigger of its own keeps its triggers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from enginehelpers import Net, add_item, doc_hashes, item_ids, make_net, seed_ho
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from exchange.database import references
from exchange.database.schema import RETAIL
from exchange.demo.data import seed_store_activity
from exchange.receive.importer import retry_parked
from exchange.service import status
from exchange.service.sync import sync

MODES = (references.BY_DATABASE, references.BY_EXCHANGE)


def set_mode(net: Net, mode: str) -> None:
    path = net.ho.cfg.home / "exchange.toml"
    path.write_text(path.read_text() + f'\n[import]\nreference_check = "{mode}"\n')
    net.reopen()


@pytest.fixture
def pg_net(tmp_path: Path, pg_url: str) -> Iterator[Net]:
    """HO on PostgreSQL, stores s001 and s002 on SQLite."""
    n = make_net(tmp_path / "net", ho_db=pg_url)
    yield n
    n.dispose()


def dangling(net: Net) -> list[tuple[str, int]]:
    """(table, rows) of every foreign key of the reference schema whose referenced row is missing."""
    out = []
    with net.ho.engine.connect() as conn:
        for table in RETAIL.sorted_tables:
            for fk in table.foreign_key_constraints:
                on = " AND ".join(f"r.{e.column.name} = t.{e.parent.name}" for e in fk.elements)
                not_null = " AND ".join(f"t.{e.parent.name} IS NOT NULL" for e in fk.elements)
                n = conn.execute(text(f"SELECT count(*) FROM {table.name} t WHERE {not_null} AND NOT EXISTS "
                                      f"(SELECT 1 FROM {fk.referred_table.name} r WHERE {on})")).scalar()
                if n:
                    out.append((table.name, int(n)))
    return out


def naming(net: Net, item: str) -> set[tuple[str, str]]:
    """(doc_type, doc_key) of the store's documents whose lines name ``item``."""
    out = set()
    with net.store("s001").engine.connect() as conn:
        for doc, line in (("sales_bill", "sales_bill_line"), ("grc", "grc_line"), ("grt", "grt_line")):
            key = "bill_no" if doc == "sales_bill" else f"{doc}_no"
            for sid, no in conn.execute(text(f"SELECT DISTINCT store_id, {key} FROM {line} WHERE item_id = :i"),
                                        {"i": item}):
                out.add((doc, f'["{sid}","{no}"]'))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_a_bill_naming_an_unknown_item_parks_alone_and_applies_once_the_item_is_there(pg_net: Net, mode: str
                                                                                       ) -> None:
    set_mode(pg_net, mode)
    net = pg_net
    ho, st = net.ho, net.store("s001")
    assert references.setting(ho.cfg.extra.get("import")) == mode
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    with st.engine.begin() as conn:
        seed_store_activity(conn, "s001", ids[:6], 40, seed=1)
        add_item(conn, "IX0000002")  # the store's own, recorded without an event: the HO never had it
        seed_store_activity(conn, "s001", ["IX0000002"], 1, seed=5)
        seed_store_activity(conn, "s001", ids[:6], 20, seed=9)
    sync(st)
    sync(ho)
    want = naming(net, "IX0000002")
    assert want and ("sales_bill" in {d for d, _k in want})
    parked = status.parked(ho)
    assert {(p.doc_type, p.doc_key) for p in parked} == want  # exactly those, the rest applied in bulk
    assert all("foreign key" in p.error.lower() for p in parked)  # the database's own words, as before
    assert dangling(net) == []
    bills = [k for d, k in want if d == "sales_bill"]
    dt = ho.catalog.get("sales_bill")
    with st.engine.connect() as conn:
        every = [f'["s001","{no}"]' for (no,) in conn.execute(text("SELECT bill_no FROM sales_bill"))]
    applied = [k for k in every if k not in bills]
    assert len(applied) == 60 and doc_hashes(ho, dt, applied) == doc_hashes(st, dt, applied)
    assert doc_hashes(ho, dt, bills) == {}

    with ho.engine.begin() as conn:
        add_item(conn, "IX0000002")
    assert retry_parked(ho, "s001") == (len(want), 0)
    assert status.parked(ho) == [] and dangling(net) == []
    assert doc_hashes(ho, dt, every) == doc_hashes(st, dt, every)


@pytest.mark.parametrize("mode", MODES)
def test_a_line_of_a_missing_item_never_stays_whatever_the_setting(pg_net: Net, mode: str) -> None:
    """Every line of a bundle names an item the HO lacks: every bill parks, nothing dangles."""
    set_mode(pg_net, mode)
    net = pg_net
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    with st.engine.begin() as conn:
        add_item(conn, "IX0000003")
        add_item(conn, "IX0000004")
        seed_store_activity(conn, "s001", ["IX0000003", "IX0000004"], 12, seed=2)
    sync(st)
    sync(ho)
    want = naming(net, "IX0000003") | naming(net, "IX0000004")
    assert {(p.doc_type, p.doc_key) for p in status.parked(ho)} == want
    assert dangling(net) == []
    with ho.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sales_bill_line WHERE store_id = 's001'")).scalar() == 0


def test_missing_finds_the_documents_and_locks_what_it_found(pg_net: Net) -> None:
    """One query per referenced table; with ``lock`` the items found cannot be deleted until the commit."""
    net = pg_net
    ho = net.ho
    seed_ho(net)
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000009")
    cat = ho.catalog
    dt = cat.get("sales_bill")
    lines = pa.table({"store_id": ["s001"] * 3, "bill_no": ["B1", "B1", "B2"], "line_no": [1, 2, 1],
                      "item_id": ["IX0000009", "NOPE", "IX0000009"]})
    header = pa.table({"store_id": ["s001", "s001"], "bill_no": ["B1", "B3"]})
    data = {"sales_bill": header, "sales_bill_line": lines}
    tables = {t: cat.table(t) for t in data}
    other = create_engine(ho.cfg.database)
    try:
        with ho.engine.connect() as conn:
            with conn.begin():
                # B1 names an item not there; B2's lines have no header in the batch
                assert references.missing(conn, tables, dt.tables(), dt.key, data, lock=True) == {
                    '["s001","B1"]', '["s001","B2"]'}
                with other.connect() as c2:
                    c2.exec_driver_sql("SET lock_timeout = '300ms'")
                    with pytest.raises(OperationalError, match="lock timeout"):
                        c2.exec_driver_sql("DELETE FROM item WHERE item_id = 'IX0000009'")
                    c2.rollback()
            with conn.begin():  # without the lock, the same question leaves the item free
                references.missing(conn, tables, dt.tables(), dt.key, data, lock=False)
                with other.connect() as c2:
                    c2.exec_driver_sql("SET lock_timeout = '300ms'")
                    assert c2.exec_driver_sql("DELETE FROM item WHERE item_id = 'IX0000009'").rowcount == 1
                    c2.rollback()
    finally:
        other.dispose()


def test_only_tables_nothing_else_depends_on_are_written_without_triggers(pg_net: Net) -> None:
    """A table with its own trigger, or referred to by a column that is not its key, keeps its triggers;
    and that trigger fires when the HO applies a bundle with ``reference_check = "exchange"``."""
    set_mode(pg_net, references.BY_EXCHANGE)
    net = pg_net
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    cat = ho.catalog
    names = ["sales_bill", "sales_bill_line", "sales_bill_payment", "item", "item_barcode"]
    with ho.engine.begin() as conn:
        assert references.unchecked_tables(conn, [cat.table(t) for t in names]) == set(names)
        conn.exec_driver_sql("CREATE TABLE seen_lines (n int)")
        conn.exec_driver_sql("CREATE FUNCTION count_line() RETURNS trigger LANGUAGE plpgsql AS "
                             "$$ BEGIN INSERT INTO seen_lines VALUES (1); RETURN NEW; END $$")
        conn.exec_driver_sql("CREATE TRIGGER count_line AFTER INSERT ON sales_bill_line FOR EACH ROW "
                             "EXECUTE FUNCTION count_line()")
        conn.exec_driver_sql("CREATE TABLE shelf_label (barcode varchar(32) REFERENCES item_barcode (barcode))")
        assert references.unchecked_tables(conn, [cat.table(t) for t in names]) == {
            "sales_bill", "sales_bill_payment", "item"}
        conn.exec_driver_sql("CREATE TABLE paid (n int)")
        conn.exec_driver_sql("CREATE RULE count_payment AS ON INSERT TO sales_bill_payment DO ALSO "
                             "INSERT INTO paid VALUES (1)")  # replica skips rules too: the table keeps its triggers
        assert references.unchecked_tables(conn, [cat.table(t) for t in names]) == {"sales_bill", "item"}
        conn.exec_driver_sql("DROP RULE count_payment ON sales_bill_payment")
    with st.engine.begin() as conn:
        seed_store_activity(conn, "s001", item_ids(net)[:4], 15, seed=3)
    sync(st)
    sync(ho)
    assert status.parked(ho) == []
    with ho.engine.connect() as conn:
        lines = conn.execute(text("SELECT count(*) FROM sales_bill_line")).scalar()
        assert lines and conn.execute(text("SELECT count(*) FROM seen_lines")).scalar() == lines


def test_an_unknown_setting_is_refused() -> None:
    from exchange.errors import ConfigError

    assert references.setting(None) == references.BY_DATABASE == references.DEFAULT
    with pytest.raises(ConfigError, match="reference_check"):
        references.setting({"reference_check": "never"})


@pytest.mark.parametrize("mode", MODES)
def test_lines_sent_without_their_bill_never_stay(pg_net: Net, mode: str) -> None:
    """A hostile bundle: a bill's lines without the bill's own row. That bill parks (the database refuses its
    lines), the rest applies, no line is left without its bill, whichever setting."""
    import pyarrow.compute as pc
    from enginehelpers import forge_bundle

    from exchange.database.batch import control_totals

    set_mode(pg_net, mode)
    net = pg_net
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    with st.engine.begin() as conn:
        seed_store_activity(conn, "s001", item_ids(net)[:4], 8, seed=4)
        bills = [no for (no,) in conn.execute(text("SELECT bill_no FROM sales_bill ORDER BY bill_no"))]
    dt = st.catalog.get("sales_bill")
    victim = bills[3]
    held: dict[str, dict] = {}

    def drop_header(tables: dict) -> None:
        h = tables["sales_bill"]
        tables["sales_bill"] = h.filter(pc.invert(pc.equal(h["bill_no"], victim)))
        per = {t: tables[t] for t in dt.tables() if t in tables}
        held["s"]["documents"]["sales_bill"].update(control_totals(dt, per, len(bills)))

    docs = [("sales_bill", f'["s001","{no}"]', "U", 1) for no in bills]
    forge_bundle(st, "ho", docs, summary_hook=lambda s: held.update(s=s), tables_hook=drop_header,
                 out_dir=ho.cfg.inbox, record=False, at=(1, None))
    from exchange.receive.importer import import_inbox

    (out,) = import_inbox(ho)
    assert (out.status, out.parked) == ("APPLIED", 1), out
    assert [(p.doc_type, p.doc_key) for p in status.parked(ho)] == [("sales_bill", f'["s001","{victim}"]')]
    assert dangling(net) == []
    with ho.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sales_bill WHERE store_id = 's001'")).scalar() == \
            len(bills) - 1


def test_a_document_naming_one_that_is_not_written_is_missing_too(pg_url: str) -> None:
    """A part names its parent part (a reference inside the document type) and a thing: B names a thing the
    database lacks, A names B, which will not be written with the rest: both go one by one, C does not."""
    from sqlalchemy import Column, ForeignKey, MetaData, String, Table

    md = MetaData()
    Table("thing", md, Column("id", String(8), primary_key=True))
    part = Table("part", md, Column("id", String(8), primary_key=True),
                 Column("parent", String(8), ForeignKey("part.id")), Column("thing_id", String(8), ForeignKey("thing.id")))
    eng = create_engine(pg_url)
    try:
        md.create_all(eng)
        data = {"part": pa.table({"id": ["A", "B", "C", "D"], "parent": ["B", None, "A", "C"],
                                  "thing_id": ["t1", "t9", "t1", None]})}
        with eng.begin() as conn:
            conn.exec_driver_sql("INSERT INTO thing VALUES ('t1')")
            assert references.missing(conn, {"part": part}, ["part"], ["id"], data) == {
                '["A"]', '["B"]', '["C"]', '["D"]'}  # C names A, D names C: the chain follows
            data["part"] = data["part"].slice(1)  # without A: C names a part not in the batch
            assert references.missing(conn, {"part": part}, ["part"], ["id"], data) == {'["B"]', '["C"]', '["D"]'}
            data["part"] = pa.table({"id": ["C", "D"], "parent": [None, "C"], "thing_id": ["t1", "t1"]})
            assert references.missing(conn, {"part": part}, ["part"], ["id"], data) == set()
    finally:
        eng.dispose()
