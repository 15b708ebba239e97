"""Stores added, moved and reloaded: group- and column-routed documents follow the routing as it stands now.

Through the CLI (``exchange init``, ``peer add``, ``peer set-group``, ``reload``)
on real node homes, the HO on SQLite and PostgreSQL, bundles through a real
``dir:`` folder. Promotions are routed by group (P00001 to every store, P00002
to "north"), transfer orders by their ``dest_store`` column.
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal

from click.testing import CliRunner, Result
from enginehelpers import Net, check_net, deliveries
from sqlalchemy import insert, select, update

from exchange.cli.main import main
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.rows import canonical_key
from exchange.node import keys
from exchange.node.home import Node



def cli(*args: str) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def promos(node: Node) -> set[str]:
    with node.engine.connect() as conn:
        return set(conn.execute(select(s.promotion.c.promo_id)).scalars())


def orders(node: Node) -> dict[str, str]:
    with node.engine.connect() as conn:
        return {str(r[0]): str(r[1]) for r in conn.execute(select(s.transfer_order.c.to_id,
                                                                  s.transfer_order.c.dest_store))}


def add_promotion(net: Net, promo_id: str, group: str | None) -> None:
    """A promotion for ``group`` made at the HO the way an application does (with its event)."""
    item = net.masters["item"][0][0]
    with net.ho.engine.begin() as conn:
        conn.execute(insert(s.promotion).values(promo_id=promo_id, name="Regional deal", store_group=group,
                                                starts_on=date(2024, 3, 1), ends_on=date(2024, 3, 8),
                                                discount_pct=Decimal("10.00")))
        conn.execute(insert(s.promotion_item).values(promo_id=promo_id, line_no=1, item_id=item,
                                                     promo_price=Decimal("1.50")))
        record_events(conn, "promotion", [(promo_id,)])


def add_order(net: Net, to_id: str, dest: str) -> None:
    """A transfer order to ``dest`` made at the HO with its event."""
    item = net.masters["item"][0][0]
    with net.ho.engine.begin() as conn:
        conn.execute(insert(s.transfer_order).values(to_id=to_id, dest_store=dest, order_date=date(2024, 3, 2),
                                                     status="OPEN", total_value=Decimal("12.00")))
        conn.execute(insert(s.transfer_order_line).values(to_id=to_id, line_no=1, item_id=item,
                                                          qty=Decimal("4"), unit_cost=Decimal("3.00")))
        record_events(conn, "transfer_order", [(to_id,)])


def open_store(net: Net, sid: str, group: str) -> Node:
    """A new store made and paired through the CLI: ``exchange init`` there, ``peer add`` on both sides."""
    home, ho = net.root / sid, net.ho.cfg
    cli("init", "--home", str(home), "--node", sid, "--role", "store")
    store = Node.open(home)
    added = cli("peer", "add", "--home", str(ho.home), "--id", sid, "--role", "store",
                "--signing-key", keys.public_signing_line(store.cfg), "--recipient", keys.recipient(store.cfg),
                "--transport", f"dir:{net.transfer}", "--group", group)
    cli("peer", "add", "--home", str(home), "--id", "ho", "--role", "ho", "--signing-key",
        keys.public_signing_line(ho), "--recipient", keys.recipient(ho), "--transport", f"dir:{net.transfer}")
    net.stores[sid] = store
    net.reopen()
    assert re.search(rf"\b\d+ documents? queued for {sid}\b", added.output), added.output
    return net.store(sid)


def test_a_new_store_in_a_group_gets_its_groups_promotions_and_its_orders_on_its_first_sync(net: Net) -> None:
    add_order(net, "TNEW0001", "s003")  # made before the store exists: routed to nobody then
    net.settle()
    assert "TNEW0001" not in orders(net.store("s001")) and "TNEW0001" not in orders(net.store("s002"))

    s3 = open_store(net, "s003", "north")
    net.settle()
    assert promos(s3) == {"P00001", "P00002"}  # every store's and north's, not south's
    assert set(orders(s3)) == {"TNEW0001"} and orders(s3)["TNEW0001"] == "s003"
    with s3.engine.connect() as conn:  # the broadcast masters arrived as before
        assert len(conn.execute(select(s.item.c.item_id)).all()) == len(net.masters["item"])
    assert promos(net.store("s002")) == {"P00001"}
    assert {k for (t, k), d in deliveries(net.ho, "s003").items() if d[0] == "D"} == set()
    assert check_net(net, reloads=True).problems == []


def test_peer_add_again_queues_nothing_new_unless_the_groups_change(net: Net) -> None:
    s1, ho = net.store("s001"), net.ho.cfg
    again = cli("peer", "add", "--home", str(ho.home), "--id", "s001", "--role", "store",
                "--signing-key", keys.public_signing_line(s1.cfg), "--recipient", keys.recipient(s1.cfg))
    assert "queued" not in again.output
    net.reopen()
    assert net.ho.cfg.peer("s001").groups == ("north",)
    # with other groups it is a move, as with set-group: north's promotion leaves
    moved = cli("peer", "add", "--home", str(ho.home), "--id", "s001", "--role", "store", "--group", "south",
                "--signing-key", keys.public_signing_line(s1.cfg), "--recipient", keys.recipient(s1.cfg))
    assert "0 documents queued for s001 and 1 delete of" in moved.output
    net.reopen()
    net.settle()
    assert promos(net.store("s001")) == {"P00001"}


def test_moving_a_store_to_another_group_sends_the_new_groups_promotions_and_removes_the_old(net: Net) -> None:
    add_promotion(net, "PSOUTH01", "south")
    net.settle()
    s1, s2 = net.store("s001"), net.store("s002")
    assert promos(s1) == {"P00001", "P00002"} and promos(s2) == {"P00001", "PSOUTH01"}

    moved = cli("peer", "set-group", "--home", str(net.ho.cfg.home), "--id", "s001", "--group", "south")
    assert "s001: groups south (were north)" in moved.output
    assert "1 document queued for s001 and 1 delete of" in moved.output
    net.reopen()
    assert net.ho.cfg.peer("s001").groups == ("south",)
    net.settle()
    s1, s2 = net.store("s001"), net.store("s002")
    assert promos(s1) == {"P00001", "PSOUTH01"}
    with s1.engine.connect() as conn:  # the old group's promotion left with its lines
        assert set(conn.execute(select(s.promotion_item.c.promo_id)).scalars()) == {"P00001", "PSOUTH01"}
    assert promos(s2) == {"P00001", "PSOUTH01"}  # the other store is untouched
    assert check_net(net, reloads=True).problems == []

    # a promotion for north made after the move goes to no one; one for south reaches both
    add_promotion(net, "PNORTH02", "north")
    add_promotion(net, "PSOUTH02", "south")
    net.settle()
    assert promos(net.store("s001")) == promos(net.store("s002")) == {"P00001", "PSOUTH01", "PSOUTH02"}


def test_set_group_refuses_what_is_not_a_store_of_this_ho(net: Net) -> None:
    res = CliRunner().invoke(main, ["peer", "set-group", "--home", str(net.ho.cfg.home), "--id", "s999",
                                    "--group", "south"])
    assert res.exit_code != 0 and "no peer 's999'" in res.output
    res = CliRunner().invoke(main, ["peer", "set-group", "--home", str(net.store("s001").cfg.home), "--id", "ho",
                                    "--group", "south"])
    assert res.exit_code != 0 and "not a store of this head office" in res.output
    net.reopen()
    assert net.ho.cfg.peer("s001").groups == ("north",)


def test_a_reload_removes_a_transfer_order_re_addressed_away(net: Net) -> None:
    s1 = net.store("s001")
    (mine,) = [k for k, dest in orders(s1).items() if dest == "s001"]
    # re-addressed at the HO by something that records no event (a repair in SQL): routing never saw it
    with net.ho.engine.begin() as conn:
        conn.execute(update(s.transfer_order).where(s.transfer_order.c.to_id == mine).values(dest_store="s002"))
    net.settle()
    assert mine in orders(s1)  # left behind until a reload

    res = cli("reload", "--home", str(net.ho.cfg.home), "--peer", "s001", "--doc", "transfer_order",
              "--doc", "promotion")
    assert "2 documents queued for s001, and 1 delete of documents no longer routed to it" in res.output
    cli("reload", "--home", str(net.ho.cfg.home), "--peer", "s002", "--doc", "transfer_order")
    net.settle()
    assert mine not in orders(net.store("s001"))
    assert orders(net.store("s002"))[mine] == "s002"
    assert promos(net.store("s001")) == {"P00001", "P00002"}  # what still routes there stays
    dlv = deliveries(net.ho, "s001")
    assert dlv[("transfer_order", canonical_key((mine,)))][:3][0::2] == ("D", "PROCESSED")
    assert check_net(net, reloads=True).problems == []
