"""A change that commits late is never lost: versions only grow in the order a sender sends them.

On PostgreSQL an event id is taken at insert, so a transaction A can commit
after a transaction B that took a higher id, and after B's version of the same
document has already been sent. The sender must then send A's change with a
version above everything it already sent of that document; with the event id
as version the receiver keeps B's version and drops A's as stale, silently
(issue "An HO on PostgreSQL never loses a change that committed late").

The sequence of the issue is played with two real concurrent database
sessions, for every way a document is routed: to every store (item), to a
store group (promotion), to the store named in a column (transfer order), and
from a store to its HO (a goods receipt, from the store's capture log). A SQLite
store, where a second writer waits for the first, gives the same end state.
A property test plays random interleavings of concurrent commits and exports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from enginehelpers import Net, add_item, check_net, doc_hashes, make_net
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, func, select, update

from exchange.database import rows
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.node.home import Node
from exchange.send.export import export_all


@dataclass(frozen=True)
class Kind:
    """One routing kind: its document type and two edits of one document by two sessions."""

    doc_type: str
    side: str  # the sender: "ho" or "store"
    create: Callable[[Connection, str], None]
    edit_a: Callable[[Connection, str], None]  # session A: edits the header, commits late
    edit_b: Callable[[Connection, str], None]  # session B: changes the document, commits first


def _item(conn: Connection, key: str) -> None:
    add_item(conn, key)
    conn.execute(s.item_barcode.insert().values(item_id=key, line_no=1, barcode=f"{key}-1"))
    record_events(conn, "item", [(key,)])


def _item_a(conn: Connection, key: str) -> None:
    conn.execute(update(s.item).where(s.item.c.item_id == key).values(name="renamed by A"))
    record_events(conn, "item", [(key,)])


def _item_b(conn: Connection, key: str) -> None:
    conn.execute(s.item_barcode.insert().values(item_id=key, line_no=2, barcode=f"{key}-2"))
    record_events(conn, "item", [(key,)])


def _promotion(conn: Connection, key: str) -> None:
    add_item(conn, f"I-{key}")
    conn.execute(s.promotion.insert().values(promo_id=key, name="promo", store_group="north",
                                             starts_on=date(2024, 3, 1), ends_on=date(2024, 3, 31),
                                             discount_pct=Decimal("10.00")))
    conn.execute(s.promotion_item.insert().values(promo_id=key, line_no=1, item_id=f"I-{key}",
                                                  promo_price=Decimal("8.00")))
    record_events(conn, "item", [(f"I-{key}",)])
    record_events(conn, "promotion", [(key,)])


def _promotion_a(conn: Connection, key: str) -> None:
    conn.execute(update(s.promotion).where(s.promotion.c.promo_id == key).values(name="renamed by A"))
    record_events(conn, "promotion", [(key,)])


def _promotion_b(conn: Connection, key: str) -> None:
    conn.execute(s.promotion_item.insert().values(promo_id=key, line_no=2, item_id=f"I-{key}",
                                                  promo_price=Decimal("7.00")))
    record_events(conn, "promotion", [(key,)])


def _transfer_order(conn: Connection, key: str) -> None:
    add_item(conn, f"I-{key}")
    conn.execute(s.transfer_order.insert().values(to_id=key, dest_store="s001", order_date=date(2024, 3, 1),
                                                  status="RELEASED", total_value=Decimal("10.00")))
    conn.execute(s.transfer_order_line.insert().values(to_id=key, line_no=1, item_id=f"I-{key}",
                                                       qty=Decimal("1"), unit_cost=Decimal("10.00")))
    record_events(conn, "item", [(f"I-{key}",)])
    record_events(conn, "transfer_order", [(key,)])


def _transfer_order_a(conn: Connection, key: str) -> None:
    conn.execute(update(s.transfer_order).where(s.transfer_order.c.to_id == key).values(status="ON_HOLD"))
    record_events(conn, "transfer_order", [(key,)])


def _transfer_order_b(conn: Connection, key: str) -> None:
    conn.execute(s.transfer_order_line.insert().values(to_id=key, line_no=2, item_id=f"I-{key}",
                                                       qty=Decimal("2"), unit_cost=Decimal("10.00")))
    record_events(conn, "transfer_order", [(key,)])


def _grc(conn: Connection, key: str) -> None:
    conn.execute(s.grc.insert().values(store_id="s001", grc_no=key, to_id=None, received_on=date(2024, 3, 1)))
    conn.execute(s.grc_line.insert().values(store_id="s001", grc_no=key, line_no=1, item_id="I0",
                                            qty=Decimal("1"), unit_cost=Decimal("2.00")))
    record_events(conn, "grc", [("s001", key)])


def _grc_a(conn: Connection, key: str) -> None:
    conn.execute(update(s.grc).where(s.grc.c.grc_no == key).values(received_on=date(2024, 3, 2)))
    record_events(conn, "grc", [("s001", key)])


def _grc_b(conn: Connection, key: str) -> None:
    conn.execute(s.grc_line.insert().values(store_id="s001", grc_no=key, line_no=2, item_id="I0",
                                            qty=Decimal("3"), unit_cost=Decimal("2.00")))
    record_events(conn, "grc", [("s001", key)])


def _customer(conn: Connection, key: str) -> None:
    conn.execute(s.customer.insert().values(store_id="s001", customer_id=key, name="C", phone="1",
                                            created_at=date(2024, 3, 1)))
    record_events(conn, "customer", [("s001", key)])


def _customer_a(conn: Connection, key: str) -> None:
    conn.execute(update(s.customer).where(s.customer.c.customer_id == key).values(name="renamed by A"))
    record_events(conn, "customer", [("s001", key)])


def _customer_b(conn: Connection, key: str) -> None:
    conn.execute(update(s.customer).where(s.customer.c.customer_id == key).values(phone="2"))
    record_events(conn, "customer", [("s001", key)])


KINDS = {
    "all": Kind("item", "ho", _item, _item_a, _item_b),
    "group": Kind("promotion", "ho", _promotion, _promotion_a, _promotion_b),
    "column": Kind("transfer_order", "ho", _transfer_order, _transfer_order_a, _transfer_order_b),
    "store-log": Kind("grc", "store", _grc, _grc_a, _grc_b),
}
#: The edits of two sessions waiting on each other's lock on SQLite (one writer at a time).
CUSTOMER = Kind("customer", "store", _customer, _customer_a, _customer_b)


def _net(tmp_path: Path, kind: Kind, url: str) -> tuple[Net, Node, Node]:
    net = make_net(tmp_path / "net", stores=("s001",), **(
        {"ho_db": url} if kind.side == "ho" else {"store_dbs": {"s001": url}}))
    sender, receiver = (net.ho, net.store()) if kind.side == "ho" else (net.store(), net.ho)
    if kind.side == "store":  # the item the store's goods receipts name
        with net.ho.engine.begin() as conn:
            _item(conn, "I0")
        net.settle()
    return net, sender, receiver


def _key(kind: Kind, key: str) -> str:
    return rows.canonical_key(("s001", key) if kind.side == "store" else (key,))


def _same(kind: Kind, sender: Node, receiver: Node, keys: list[str]) -> None:
    dt = sender.catalog.get(kind.doc_type)
    canon = [_key(kind, k) for k in keys]
    want = doc_hashes(sender, dt, canon)
    assert want, "the sender holds the documents"
    assert doc_hashes(receiver, dt, canon) == want, "the receiver holds every document as the sender does"


@pytest.mark.parametrize("route", list(KINDS))
def test_a_change_committed_after_a_later_one_was_sent_is_applied(tmp_path: Path, pg_url: str,
                                                                  route: str) -> None:
    """The issue's reproduction, with two real PostgreSQL sessions, for every routing kind."""
    kind = KINDS[route]
    net, sender, receiver = _net(tmp_path, kind, pg_url)
    with sender.engine.begin() as conn:
        kind.create(conn, "D1")
    net.settle()
    with sender.engine.connect() as slow:
        tx = slow.begin()
        kind.edit_a(slow, "D1")  # session A: the lower event id, left open
        with sender.engine.begin() as conn:
            kind.edit_b(conn, "D1")  # session B: commits first
        assert export_all(sender), "B's version goes out while A is still open"
        tx.commit()  # A commits after B's version was sent
    net.settle()
    assert check_net(net).problems == []
    _same(kind, sender, receiver, ["D1"])
    net.dispose()


def test_a_store_on_sqlite_with_two_writers_ends_equal(tmp_path: Path) -> None:
    """SQLite lets one writer at a time: B waits for A, and the HO ends with both edits."""
    kind = CUSTOMER
    net, sender, receiver = _net(tmp_path, kind, f"sqlite:///{tmp_path / 'store.db'}")
    with sender.engine.begin() as conn:
        kind.create(conn, "D1")
    net.settle()
    b_done = threading.Event()

    def session_b() -> None:
        with sender.engine.begin() as conn:
            kind.edit_b(conn, "D1")
        b_done.set()

    with sender.engine.connect() as slow:
        tx = slow.begin()
        kind.edit_a(slow, "D1")  # holds SQLite's write lock
        writer = threading.Thread(target=session_b)
        writer.start()
        assert not b_done.wait(0.5), "a second SQLite writer waits for the first"
        tx.commit()
    writer.join(timeout=30)
    assert b_done.is_set()
    net.settle()
    assert check_net(net).problems == []
    _same(kind, sender, receiver, ["D1"])
    with sender.engine.connect() as conn:
        row = conn.execute(select(s.customer.c.name, s.customer.c.phone)).one()
    assert tuple(row) == ("renamed by A", "2")
    net.dispose()


# ---------------------------------------------------------------- random interleavings

SESSIONS = 3

ACTION = st.one_of(
    st.tuples(st.just("edit"), st.integers(0, SESSIONS - 1), st.integers(0, 1)),  # session, document
    st.tuples(st.just("commit"), st.integers(0, SESSIONS - 1), st.just(0)),
    st.tuples(st.just("export"), st.just(0), st.just(0)),
)



def _lines(kind: Kind) -> tuple[Any, Any, Callable[[str], tuple[str, ...]]]:
    """The line table of ``kind``'s document, its key column, and the document's event key."""
    if kind.doc_type == "grc":
        return s.grc_line, s.grc_line.c.grc_no, lambda key: ("s001", key)
    return s.transfer_order_line, s.transfer_order_line.c.to_id, lambda key: (key,)


@pytest.mark.parametrize("route", ["column", "store-log"])
def test_random_interleavings_end_with_the_receiver_equal(tmp_path_factory: pytest.TempPathFactory,
                                                         pg_url_module: str, route: str) -> None:
    """Any interleaving of three sessions' edits, commits and exports ends with receiver == sender.

    Each session edits its own line of a shared document (so no session waits
    for another's row lock, as in the issue's reproduction: A the header, B a line).
    """
    kind = KINDS[route]
    root = tmp_path_factory.mktemp(f"interleave-{route}")
    net, sender, receiver = _net(root, kind, pg_url_module)
    docs = [f"P{i}" for i in range(2)]
    table, key_col, event_key = _lines(kind)
    with sender.engine.begin() as conn:
        for d in docs:
            kind.create(conn, d)
            for line in range(2, SESSIONS + 1):  # one line per session
                row = conn.execute(select(table).where(key_col == d, table.c.line_no == 1)).mappings().one()
                conn.execute(table.insert().values({**row, "line_no": line}))
            record_events(conn, kind.doc_type, [event_key(d)])
    net.settle()
    counter = iter(range(100, 10**6))  # every edit a new quantity (the lines start at 1 to 3)

    def edit(conn: Connection, key: str, who: int) -> None:
        conn.execute(update(table).where(key_col == key, table.c.line_no == who + 1)
                     .values(qty=Decimal(next(counter))))
        record_events(conn, kind.doc_type, [event_key(key)])

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.lists(ACTION, min_size=2, max_size=12))
    @example([("edit", 0, 0), ("edit", 1, 0), ("commit", 1, 0), ("export", 0, 0), ("commit", 0, 0)])  # the issue's
    def play(actions: list[tuple[str, int, int]]) -> None:
        sessions: dict[int, Any] = {}
        try:
            for what, who, doc in actions:
                if what == "edit":
                    if who not in sessions:
                        conn = sender.engine.connect()
                        sessions[who] = (conn, conn.begin())
                    edit(sessions[who][0], docs[doc], who)
                elif what == "commit" and who in sessions:
                    conn, tx = sessions.pop(who)
                    tx.commit()
                    conn.close()
                elif what == "export":
                    export_all(sender)
        finally:
            for conn, tx in sessions.values():
                tx.commit()
                conn.close()
        net.settle()
        _same(kind, sender, receiver, docs)

    try:
        play()
    finally:
        net.dispose()


def test_a_schema_4_database_keeps_its_versions(db_url: str) -> None:
    """Migration 5: versions recorded per document are kept (peer ''), still guard, and events get a column."""
    from sqlalchemy import inspect

    from exchange.database.tables import MIGRATIONS, make_engine, migrate, xchg_doc_version, xchg_meta
    from exchange.receive.importer import _stored_versions

    engine = make_engine(db_url)
    with engine.begin() as conn:
        for step in MIGRATIONS[:4]:
            step(conn)
        conn.exec_driver_sql("ALTER TABLE xchg_event DROP COLUMN version")  # as migration 1 made it then
        conn.exec_driver_sql("DROP TABLE xchg_doc_version")
        conn.exec_driver_sql("CREATE TABLE xchg_doc_version (doc_type VARCHAR(64) NOT NULL, doc_key VARCHAR(512) "
                             "NOT NULL, version BIGINT NOT NULL, PRIMARY KEY (doc_type, doc_key))")
        conn.exec_driver_sql("INSERT INTO xchg_doc_version VALUES ('item', '[\"I1\"]', 7)")
        conn.execute(xchg_meta.insert().values(key="schema_version", value="4"))
    assert migrate(engine) == len(MIGRATIONS) - 4
    assert "version" in {c["name"] for c in inspect(engine).get_columns("xchg_event")}
    with engine.begin() as conn:
        v = xchg_doc_version.c  # (and no time of a delete: migration 15's columns stay empty)
        assert conn.execute(select(v.peer, v.doc_type, v.doc_key, v.version, v.deleted_at)).all() == [
            ("", "item", '["I1"]', 7, None)]
        assert _stored_versions(conn, "ho", "item", ['["I1"]', '["I2"]']) == {'["I1"]': 7}
        conn.execute(xchg_doc_version.insert().values(peer="ho", doc_type="item", doc_key='["I1"]', version=9))
        assert _stored_versions(conn, "ho", "item", ['["I1"]']) == {'["I1"]': 9}
        assert _stored_versions(conn, "s002", "item", ['["I1"]']) == {'["I1"]': 7}
    assert migrate(engine) == 0
    engine.dispose()
