"""A store's documents go to its HO straight from the capture log (exchange.send.streams).

No delivery rows on the store; each event records the bundle that carried it;
documents keep their status through upload and ack; an event that commits
after a later one (PostgreSQL) is still sent; a store with two HOs routes as
before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from enginehelpers import BASE_DAY, Net, add_item, check_net, make_net, seed_ho, seed_store
from sqlalchemy import func, inspect, select

from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.tables import (MIGRATIONS, make_engine, migrate, xchg_conflict, xchg_delivery, xchg_event,
                                       xchg_meta)
from exchange.demo.run import reconcile
from exchange.node import keys
from exchange.node.home import Node, init_home
from exchange.node.peers import add_peer
from exchange.send import streams
from exchange.send.export import export_all
from exchange.send.pending import export_work
from exchange.service import status
from exchange.wire.bundle import open_bundle
from exchange.wire.formats import EVENTS_TABLE


def _carried(sender: Node, recipient: Node, files: list[str]) -> list[tuple[str, str, int]]:
    """(doc_type, doc_key, version) of every document in these bundles of ``sender``'s outbox."""
    out: list[tuple[str, str, int]] = []
    for name in files:
        with open_bundle(sender.cfg.outbox / name, identities=recipient.identities, trust=recipient.trust,
                         me=recipient.id, workdir=recipient.cfg.work) as b:
            ev = b.table(EVENTS_TABLE).to_pydict()
            out += list(zip(ev["doc_type"], ev["doc_key"], ev["version"], strict=True))
    return out


def _states(node: Node) -> set[str]:
    return {d.status for d in status.documents(node, "ho").values()}


def add_customer(conn: Any, store_id: str, customer_id: str) -> None:
    conn.execute(s.customer.insert().values(store_id=store_id, customer_id=customer_id, name=f"C {customer_id}",
                                            created_at=BASE_DAY))
    record_events(conn, "customer", [(store_id, customer_id)])


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Any:
    """One store on ``db_url`` (SQLite, then PostgreSQL), the HO on SQLite."""
    n = make_net(tmp_path / "net", stores=("s001",), store_dbs={"s001": db_url}, max_rows={"s001": 7})
    yield n
    n.dispose()


def test_store_sends_from_its_log_and_documents_keep_their_status(net: Net) -> None:
    seed_ho(net, items=20)
    net.cycle()  # the store has its items before it sells them
    store = net.store()
    seed_store(net, "s001", sales=20)
    assert streams.direct_peer(store) == "ho"
    assert _states(store) == {"PENDING"}
    pending = len(status.documents(store, "ho"))

    out = export_all(store)
    assert len(out) >= 4 and sum(e.documents for e in out) == pending
    docs = status.documents(store, "ho")
    assert {d.status for d in docs.values()} == {"EXPORTED"}
    assert {d.seq for d in docs.values()} == {e.seq for e in out}  # each names the bundle that carried it
    sent = _carried(store, net.ho, [e.file for e in out])
    assert sorted((t, k, v) for (t, k), d in docs.items() for v in [d.version]) == sorted(sent)
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(xchg_delivery)).scalar() == 0
        assert conn.execute(select(func.count()).where(xchg_event.c.routed == 0)).scalar() == 0

    net.settle()
    assert _states(store) == {"PROCESSED"}
    assert check_net(net).problems == []
    rec = {r["doc_type"]: r for r in reconcile(net.ho, [store])}
    for doc_type in ("customer", "sales_bill", "grc", "grt"):  # what the store sent is what the HO holds
        assert rec[doc_type]["ok"] and rec[doc_type]["sent_docs"] > 0, rec[doc_type]


def test_a_document_changed_again_goes_again_at_its_new_version(net: Net) -> None:
    seed_ho(net, items=20)
    net.cycle()
    store = net.store()
    with store.engine.begin() as conn:
        add_customer(conn, "s001", "C-FIRST")
    seed_store(net, "s001", sales=20)
    with store.engine.begin() as conn:  # changed after everything else: its last event is in a later bundle
        conn.execute(s.customer.update().where(s.customer.c.customer_id == "C-FIRST").values(name="Renamed"))
        record_events(conn, "customer", [("s001", "C-FIRST")])
    out = export_all(store)
    mine = [v for t, k, v in _carried(store, net.ho, [e.file for e in out]) if t == "customer" and "C-FIRST" in k]
    assert len(mine) == 2 and mine[0] < mine[1]  # twice, the second time at the higher version
    net.settle()
    assert check_net(net).problems == []
    with net.ho.engine.connect() as conn:
        assert conn.execute(select(s.customer.c.name).where(s.customer.c.customer_id == "C-FIRST")).scalar() \
            == "Renamed"


def test_events_of_the_other_sides_documents_are_never_sent(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    store = net.store()
    with store.engine.begin() as conn:  # a store-side trigger on the HO's item table, say
        record_events(conn, "item", [("I0001",), ("I0002",)])
    assert export_work(lambda q: store.engine.connect().exec_driver_sql(q).all(), [])
    with caplog.at_level(logging.WARNING):
        assert export_all(store) == []  # nothing to send: no bundle at all
    assert "not sending 2 changes made here to documents the other side owns (item)" in caplog.text
    with store.engine.connect() as conn:  # never silently dropped: each a conflict the owner (the HO) wins
        assert {(d, k, st) for d, k, st in conn.execute(select(
            xchg_conflict.c.doc_type, xchg_conflict.c.doc_key, xchg_conflict.c.status))} == {
            ("item", '["I0001"]', "DECIDED"), ("item", '["I0002"]', "DECIDED")}
    with store.engine.connect() as conn:
        assert conn.execute(select(xchg_event.c.routed, xchg_event.c.seq)).all() == [(1, None), (1, None)]
        assert not export_work(lambda q: conn.exec_driver_sql(q).all(), [])


@pytest.mark.parametrize("side", ["ho", "store"])
def test_an_event_committed_after_a_later_one_is_still_sent(tmp_path: Path, pg_url: str, side: str) -> None:
    """PostgreSQL hands out ids at insert, not at commit: nothing may skip the slow transaction's event.

    Both ways: the HO's broadcast of an item to every store, and a store's log.
    """
    net = make_net(tmp_path / "net", stores=("s001",), **(
        {"ho_db": pg_url} if side == "ho" else {"store_dbs": {"s001": pg_url}}))
    node, receiver = (net.ho, net.store()) if side == "ho" else (net.store(), net.ho)
    table, name = (s.item, "item_id") if side == "ho" else (s.customer, "customer_id")

    def add(conn: Any, doc_id: str) -> None:
        if side == "ho":
            add_item(conn, doc_id)
            record_events(conn, "item", [(doc_id,)])
        else:
            add_customer(conn, "s001", doc_id)

    with node.engine.connect() as slow:
        tx = slow.begin()
        add(slow, "SLOW")  # takes the lower event id, commits last
        with node.engine.begin() as conn:
            add(conn, "FAST")
        first = export_all(node)
        assert [k for _t, k, _v in _carried(node, receiver, [e.file for e in first]) if "SLOW" in k] == []
        tx.commit()
    net.settle()
    assert check_net(net).problems == []
    with receiver.engine.connect() as conn:
        assert sorted(conn.execute(select(table.c[name])).scalars()) == ["FAST", "SLOW"]
    net.dispose()


def test_a_store_with_two_hos_routes_through_deliveries(tmp_path: Path) -> None:
    net = make_net(tmp_path / "net", stores=("s001",))
    store = net.store()
    other = init_home(tmp_path / "net" / "ho2", "ho2", "ho")
    add_peer(store.cfg, "ho2", "ho", keys.public_signing_line(other), keys.recipient(other), f"dir:{net.transfer}")
    store = Node.open(store.cfg.home)
    assert streams.direct_peer(store) is None
    with store.engine.begin() as conn:
        add_customer(conn, "s001", "C1")
    out = export_all(store)
    assert sorted(e.peer for e in out) == ["ho", "ho2"]
    with store.engine.connect() as conn:
        assert sorted(conn.execute(select(xchg_delivery.c.peer, xchg_delivery.c.status))) == [
            ("ho", "EXPORTED"), ("ho2", "EXPORTED")]
    net.dispose()


def test_a_database_from_before_the_log_stream_gets_its_column(db_url: str) -> None:
    """Schema 3 (the previous release) had no ``xchg_event.seq``: migration 4 adds it, events kept."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        for step in MIGRATIONS[:3]:
            step(conn)
        conn.exec_driver_sql("ALTER TABLE xchg_event DROP COLUMN seq")  # as migration 1 made it then
        conn.exec_driver_sql("ALTER TABLE xchg_event DROP COLUMN version")
        conn.execute(xchg_meta.insert().values(key="schema_version", value="3"))
        conn.execute(xchg_event.insert().values(doc_type="customer", doc_key='["s001","C1"]', op="U"))
    assert "seq" not in {c["name"] for c in inspect(engine).get_columns("xchg_event")}
    assert migrate(engine) == len(MIGRATIONS) - 3
    assert "seq" in {c["name"] for c in inspect(engine).get_columns("xchg_event")}
    with engine.connect() as conn:
        assert conn.execute(select(xchg_event.c.doc_key, xchg_event.c.routed, xchg_event.c.seq)).all() == [
            ('["s001","C1"]', 0, None)]
    assert migrate(engine) == 0
    engine.dispose()
