"""Lanes: a stream per sender, recipient and lane (docs/CATALOG.md "Lanes", FORMAT.md version 5).

Real node homes exchanging through a folder, the HO on SQLite and PostgreSQL (the #15 scenario: every
node on each), every command through the CLI where an operator would type it. A stuck or FAILED bundle in
one lane holds only that lane; a document of one lane that refers to one still stuck in another parks and
applies when it arrives; a bundle that claims a lane its types do not travel in, or a lane this node does
not have, is quarantined with its reason; files of format 3 (the default lane's names) stay valid.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import _fresh_pg_database
from enginehelpers import (
    Net, add_item, check_net, docs_of, forge_bundle, item_ids, make_net, reprice, seed_ho,
)
from sqlalchemy import select, text

from exchange.cli import main
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.catalog import REFERENCE_LANES, catalog_from_config
from exchange.database.tables import xchg_stream_in, xchg_stream_out
from exchange.errors import ConfigError, FormatError
from exchange.node.home import Node
from exchange.receive.importer import import_inbox
from exchange.send.export import export_all
from exchange.wire.formats import bundle_name, is_exchange_file, parse_name

STORES = ("s001", "s002")


def cli(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, f"exchange {' '.join(args)} -> {res.exit_code}: {res.output}"
    return res.output


def with_catalog(net: Net, catalog: dict[str, Any]) -> None:
    """``[catalog]`` of every node's exchange.toml, as an operator writes it; fresh Node objects."""
    for node in net.nodes:
        node.cfg.catalog = catalog
        node.cfg.save()
    net.reopen()


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """HO on ``db_url`` (SQLite, then PostgreSQL), two SQLite stores, the reference catalog's lanes."""
    n = make_net(tmp_path / "net", ho_db=db_url, stores=STORES)
    with_catalog(n, {"lanes": "reference"})
    yield n
    n.dispose()


def sync_all(net: Net, rounds: int = 2, held: tuple[str, ...] = (), failed: tuple[str, ...] = (),
             rejected: bool = False) -> None:
    """``exchange sync`` of every node, HO first; a node in ``held`` exits 15, one in ``failed`` 21 (the
    one that holds a FAILED bundle, and the HO when that bundle's REJECTED ack arrives: docs/SERVICE.md)."""
    for _ in range(rounds):
        for node in net.nodes:
            res = CliRunner().invoke(main, ["sync", "--home", str(node.cfg.home)], catch_exceptions=False)
            allowed = {15} if node.id in held else {21} if node.id in failed else {0}
            if (failed or rejected) and node.id == net.ho.id:
                allowed |= {21}
            assert res.exit_code in allowed, f"sync {node.id} -> {res.exit_code}: {res.output}"


def bundles(node: Node, view: str) -> list[dict[str, Any]]:
    return list(json.loads(cli("status", view, "--home", str(node.cfg.home), "--json"))["bundles"])


def by_lane(node: Node, view: str, peer: str) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for b in bundles(node, view):
        if b["peer"] == peer:
            out.setdefault(b["lane"], []).append((b["seq"], b["status"]))
    return out


def new_transfer(node: Node, to_id: str, store: str, item: str) -> None:
    """A transfer order for ``store`` naming ``item``, and its event (as the HO's application writes it)."""
    with node.engine.begin() as conn:
        conn.execute(s.transfer_order.insert().values(to_id=to_id, dest_store=store, order_date=date(2024, 3, 2),
                                                      status="OPEN", total_value=Decimal("12.00")))
        conn.execute(s.transfer_order_line.insert().values(to_id=to_id, line_no=1, item_id=item,
                                                           qty=Decimal("3.000"), unit_cost=Decimal("4.00")))
        record_events(conn, "transfer_order", [(to_id,)])


def lane_metrics(node: Node, name: str) -> dict[tuple[str, str], float]:
    """(peer, lane) -> value of a per-lane metric, from the text a scrape of /metrics returns."""
    from prometheus_client.parser import text_string_to_metric_families

    from exchange.service.metrics import make_registry, render

    fresh = Node.open(node.cfg.home)
    try:
        text_ = render(make_registry(fresh)).decode()
    finally:
        fresh.engine.dispose()
    return {(x.labels["peer"], x.labels["lane"]): x.value for f in text_string_to_metric_families(text_)
            for x in f.samples if x.name == name}


def has_row(node: Node, table: str, column: str, value: str) -> bool:
    with node.engine.connect() as conn:
        return conn.execute(text(f"SELECT 1 FROM {table} WHERE {column} = :v"), {"v": value}).first() is not None


# ---------------------------------------------------------------- the catalog's lanes

def test_reference_lanes_and_their_checks() -> None:
    cat = catalog_from_config({"catalog": {"lanes": "reference"}})
    assert cat.lanes() == ["main", "masters", "orders", "sales"]
    assert {t: cat.lane_of(t) for t in cat.names if cat.lane_of(t) != "main"} == REFERENCE_LANES
    assert cat.lane_types("orders") == ["transfer_order", "sales_order", "sales_invoice"]
    assert cat.description["docs"]["item"]["lane"] == "masters" and "lane" not in cat.description["docs"]["grc"]
    # a catalog of one lane describes itself as before lanes existed (its fingerprint does not move)
    plain = catalog_from_config({})
    assert plain.lanes() == ["main"] and all("lane" not in d for d in plain.description["docs"].values())
    moved = catalog_from_config({"catalog": {"lanes": {"promotion": "orders"}}})
    assert moved.lane_of("promotion") == "orders" and moved.lane_of("item") == "main"
    for bad, words in (({"promotion": "Orders"}, "not a lane name"), ({"nope": "x"}, "unknown document type"),
                       ("everything", "must be"), ({"promotion": "a" * 17}, "not a lane name")):
        with pytest.raises(ConfigError, match=words):
            catalog_from_config({"catalog": {"lanes": bad}})


def test_lane_names_in_file_names() -> None:
    """The default lane keeps format 3's names; any other lane stands before the seq; "main" is never
    spelled out (one file, one name)."""
    assert bundle_name("ho", "s001", 42) == "ho.s001.0000000042.bundle"
    assert bundle_name("ho", "s001", 7, "masters") == "ho.s001.masters.0000000007.bundle"
    assert parse_name("s001.ho.masters.0000000007.ack").lane == "masters"
    assert parse_name("s001.ho.0000000007.ack").lane == "main"
    for bad in ("ho.s001.main.0000000001.bundle", "ho.s001.Masters.0000000001.bundle",
                "ho.s001.7x.0000000001.bundle", "ho.s001.a.b.0000000001.bundle"):
        assert not is_exchange_file(bad)
        with pytest.raises(FormatError):
            parse_name(bad)


# ---------------------------------------------------------------- one lane stuck, the others flow

def test_a_failed_masters_bundle_holds_only_its_lane(net: Net) -> None:
    """Store s001 cannot apply the HO's item changes (its database refuses them as a whole: FAILED); the
    transfer orders for s001 in lane orders apply meanwhile, and the masters lane waits for `exchange
    retry`. Every lane is a stream: its own seqs, chain, positions, acks."""
    ho, st = net.ho, net.store("s001")
    seed_ho(net, items=12)
    sync_all(net)
    names = sorted(p.name for p in (st.cfg.archive_received).iterdir() if p.name.endswith(".bundle"))
    assert "ho.s001.masters.0000000001.bundle" in names and "ho.s001.orders.0000000001.bundle" in names
    assert "ho.s001.0000000001.bundle" in names  # promotions and audit plans: the default lane, format 3 names
    assert check_net(net).problems == []

    with st.engine.begin() as conn:  # the store's database refuses the masters lane's bundles as a whole
        conn.exec_driver_sql("CREATE TRIGGER no_masters BEFORE UPDATE ON xchg_stream_in WHEN NEW.lane = 'masters' "
                             "BEGIN SELECT RAISE(ABORT, 'masters refused here'); END")
    ids = item_ids(net)
    reprice(ho, ids[:3])
    new_transfer(ho, "TO-LANE-1", "s001", ids[0])
    sync_all(net, rounds=1, failed=("s001",))
    reprice(ho, ids[3:5])  # queued behind the FAILED one, in its lane only
    new_transfer(ho, "TO-LANE-2", "s001", ids[1])
    sync_all(net, rounds=2, failed=("s001",))

    got = by_lane(st, "received", "ho")
    assert got["masters"][-2:] == [(2, "FAILED"), (3, "WAITING")]
    assert got["orders"][-2:] == [(2, "APPLIED"), (3, "APPLIED")]
    assert has_row(st, "transfer_order", "to_id", "TO-LANE-2")
    sent = by_lane(ho, "sent", "s001")
    assert sent["masters"][-1] == (3, "UPLOADED") and sent["masters"][-2] == (2, "REJECTED")
    assert sent["orders"][-1] == (3, "PROCESSED")
    reason = next(b["reason"] for b in bundles(st, "received") if (b["lane"], b["seq"]) == ("masters", 2))
    assert "masters refused here" in reason and "exchange bundle skip ho 2 --lane masters" in reason
    with st.engine.connect() as conn:
        pos = dict(conn.execute(select(xchg_stream_in.c.lane, xchg_stream_in.c.last_seq)
                                .where(xchg_stream_in.c.peer == "ho")).all())
    assert pos["masters"] == 1 and pos["orders"] == 3
    doctor = CliRunner().invoke(main, ["doctor", "--home", str(st.cfg.home)])
    assert doctor.exit_code != 0 and "bundle 2 of ho (lane masters) FAILED: " in doctor.output, doctor.output
    assert "exchange bundle skip ho 2 --lane masters" in doctor.output

    from exchange.service.ui.data import peer_stats, troubles

    said = troubles(peer_stats(st)["ho"], 60, datetime.now(UTC))  # what the page and the alerts say
    assert "waiting for bundle 2 of lane masters" in said and "FAILED stream" in said
    assert not any(t.startswith("waiting for bundle 2") and "lane" not in t for t in said)
    lag = lane_metrics(st, "exchange_lane_received_lag_bundles")
    assert lag[("ho", "masters")] == 2 and lag[("ho", "orders")] == 0  # the FAILED one and the one behind it
    assert lane_metrics(ho, "exchange_lane_sent_last_seq")[("s001", "masters")] == 3

    with st.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_masters")
    out = cli("retry", "--home", str(st.cfg.home))
    assert "ho.s001.masters.0000000002.bundle: APPLIED" in out and "ho.s001.masters.0000000003.bundle: APPLIED" in out
    sync_all(net)
    assert {b["status"] for b in bundles(ho, "sent")} == {"PROCESSED"}
    assert check_net(net).problems == []


def test_transfer_orders_apply_while_a_masters_reload_is_in_flight(net: Net) -> None:
    """A reload of the item master to s001 is many bundles; the exporter gives each lane a bundle in
    turn, so the transfer orders queued with it are sealed in the first round, and s001 applies them while
    the reload's later bundles are still on their way (here: not delivered yet). The one naming a new
    item, still in flight in the masters lane, parks with that reason and applies once the item arrives."""
    ho, st = net.ho, net.store("s001")
    seed_ho(net, items=30)
    sync_all(net)
    ho.cfg.max_bundle_rows = 4
    ho.cfg.save()
    net.reopen()
    ho, st = net.ho, net.store("s001")
    out = cli("reload", "--home", str(ho.cfg.home), "--peer", "s001", "--doc", "item")
    new_transfer(ho, "TO-URGENT", "s001", item_ids(net)[0])
    with ho.engine.begin() as conn:
        add_item(conn, "INEW0001")
        record_events(conn, "item", [("INEW0001",)])
    new_transfer(ho, "TO-NEW-ITEM", "s001", "INEW0001")
    made = [e.file for e in export_all(ho) if e.peer == "s001"]
    masters = [f for f in made if parse_name(f).lane == "masters"]
    assert len(masters) >= 8, (out, made)  # 30 items, 4 per bundle
    urgent = bundle_name("ho", "s001", 2, "orders")
    assert made.index(urgent) < made.index(masters[1])  # sealed in the first round, not after the reload
    # s001 gets the orders bundle and the reload's first bundle only: the rest is still in flight
    for name in (masters[0], urgent):
        shutil.copyfile(ho.cfg.outbox / name, st.cfg.inbox / name)
    got = {o.file: o.status for o in import_inbox(st)}
    assert got == {masters[0]: "APPLIED", urgent: "APPLIED"}
    assert has_row(st, "transfer_order", "to_id", "TO-URGENT")
    parked = json.loads(cli("status", "parked", "--home", str(st.cfg.home), "--json"))["parked"]
    assert [(p["doc_key"], p["lane"], p["seq"]) for p in parked] == [('["TO-NEW-ITEM"]', "orders", 2)]
    assert "INEW0001" in parked[0]["reason"] and "not received yet" in parked[0]["reason"]
    text_ = " ".join(cli("status", "parked", "--home", str(st.cfg.home)).split())
    assert "TO-NEW-ITEM from ho (bundle 2 of lane orders)" in text_, text_
    info = json.loads(cli("inspect", str(st.cfg.archive_received / urgent), "--home", str(st.cfg.home), "--json"))
    assert (info["lane"], info["seq"], info["name_matches"]) == ("orders", 2, True)
    sync_all(net, rounds=3)  # the rest of the reload arrives, the new item with it: the order applies by itself
    assert json.loads(cli("status", "parked", "--home", str(st.cfg.home), "--json"))["parked"] == []
    assert has_row(st, "transfer_order", "to_id", "TO-NEW-ITEM")
    assert {b["status"] for b in bundles(ho, "sent")} == {"PROCESSED"}
    assert check_net(net, reloads=True).problems == []


def test_a_skipped_bundle_is_named_by_its_lane_and_resent(net: Net) -> None:
    """`exchange bundle skip` takes the file name (or --lane); the decision ends that lane's bundle only,
    and `exchange resend --lane` queues its documents again into the same lane."""
    ho, st = net.ho, net.store("s001")
    seed_ho(net, items=6)
    sync_all(net)
    with st.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TRIGGER no_masters BEFORE UPDATE ON xchg_stream_in WHEN NEW.lane = 'masters' "
                             "BEGIN SELECT RAISE(ABORT, 'masters refused here'); END")
    ids = item_ids(net)
    reprice(ho, ids[:2])
    sync_all(net, rounds=1, failed=("s001",))
    res = CliRunner().invoke(main, ["bundle", "skip", "--home", str(st.cfg.home), "ho", "2", "--reason", "wrong lane"])
    assert res.exit_code != 0 and "not received" in res.output  # seq 2 of the default lane does not exist
    with st.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_masters")
    out = cli("bundle", "skip", "--home", str(st.cfg.home), "ho.s001.masters.0000000002.bundle",
              "--reason", "prices reloaded instead")
    assert "ho.s001.masters.0000000002.bundle: SKIPPED" in out
    sync_all(net, rounds=2, rejected=True)  # the REJECTED acks: the failure, then the decision
    sent = by_lane(ho, "sent", "s001")
    assert sent["masters"][-1] == (2, "REJECTED")
    # items go to every store (no delivery row per bundle): resend says to reload them, in their lane
    out = cli("resend", "--home", str(ho.cfg.home), "--peer", "s001", "--bundle", "ho.s001.masters.0000000002.bundle")
    assert "exchange reload --peer s001 --doc item" in out
    cli("reload", "--home", str(ho.cfg.home), "--peer", "s001", "--doc", "item")
    sync_all(net)
    assert by_lane(ho, "sent", "s001")["masters"][-1] == (3, "PROCESSED")
    with ho.engine.connect() as conn:
        assert conn.execute(select(xchg_stream_out.c.next_seq).where(
            xchg_stream_out.c.peer == "s001", xchg_stream_out.c.lane == "masters")).scalar() == 4


def test_a_superseded_orders_bundle_is_skipped_in_its_lane_only(net: Net) -> None:
    """`exchange supersede --lane orders`: the notice travels in the next bundle of lane orders, and s001
    skips the FAILED orders bundle on its own; the masters lane, with a bundle of the same seq, is untouched."""
    ho, st = net.ho, net.store("s001")
    seed_ho(net, items=6)
    sync_all(net)
    with st.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TRIGGER no_orders BEFORE UPDATE ON xchg_stream_in WHEN NEW.lane = 'orders' "
                             "BEGIN SELECT RAISE(ABORT, 'orders refused here'); END")
    ids = item_ids(net)
    new_transfer(ho, "TO-S1", "s001", ids[0])
    reprice(ho, ids[:1])  # masters bundle 2: applies
    sync_all(net, rounds=2, failed=("s001",))
    assert by_lane(st, "received", "ho")["orders"][-1] == (2, "FAILED")
    assert by_lane(st, "received", "ho")["masters"][-1] == (2, "APPLIED")
    with st.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_orders")
    out = cli("supersede", "--home", str(ho.cfg.home), "--peer", "s001", "--bundle", "2", "--lane", "orders",
              "--reason", "order corrected", "--by", "alice")
    assert "of bundle 2 queued for s001" in out
    sync_all(net, rounds=1, failed=("s001",))  # s001 skips it on the notice (the sync reports the FAILED one)
    sync_all(net, rounds=2, rejected=True)
    got = by_lane(st, "received", "ho")
    assert got["orders"][-2:] == [(2, "SKIPPED"), (3, "APPLIED")] and got["masters"][-1] == (2, "APPLIED")
    assert has_row(st, "transfer_order", "to_id", "TO-S1")
    sent = by_lane(ho, "sent", "s001")
    assert sent["orders"][-2:] == [(2, "REJECTED"), (3, "PROCESSED")] and sent["masters"][-1] == (2, "PROCESSED")
    reason = next(b["reason"] for b in bundles(ho, "sent") if (b["lane"], b["seq"]) == ("orders", 2))
    assert "superseded by alice" in reason


# ---------------------------------------------------------------- hostile lanes

def test_a_bundle_claiming_another_lane_is_quarantined(net: Net) -> None:
    """A genuine signature does not let a sender slip documents past their own lane: a transfer order in
    a bundle of lane masters, an item in lane orders, or a lane the store does not have, is quarantined
    with its reason before anything is applied, and the lane's stream does not move."""
    ho, st = net.ho, net.store("s001")
    seed_ho(net, items=4)
    sync_all(net)
    ids = item_ids(net)
    new_transfer(ho, "TO-SMUGGLED", "s001", ids[0])
    cases = [("masters", docs_of(ho, "transfer_order", [("TO-SMUGGLED",)]),
              "transfer_order documents travel in lane 'orders', but this bundle is of lane 'masters'"),
             ("orders", docs_of(ho, "item", [(ids[1],)]),
              "item documents travel in lane 'masters', but this bundle is of lane 'orders'"),
             ("main", docs_of(ho, "item", [(ids[1],)]),
              "item documents travel in lane 'masters', but this bundle is of lane 'main'"),
             ("express", docs_of(ho, "item", [(ids[1],)]), "lane 'express' is not a lane of this node's catalog")]
    for lane, docs, words in cases:
        before = _next(st, lane)
        path = forge_bundle(ho, "s001", docs, record=False, lane=lane, out_dir=st.cfg.inbox, at=before)
        out = cli("import", "--home", str(st.cfg.home), code=10)  # 10: quarantined (docs/SERVICE.md)
        assert f"{path.name}: QUARANTINED" in out and words in out, out
        assert (st.cfg.quarantine / path.name).exists() and not (st.cfg.inbox / path.name).exists()
        assert _next(st, lane) == before  # the lane's stream did not move
    assert not has_row(st, "transfer_order", "to_id", "TO-SMUGGLED")
    q = {b["file"]: b["lane"] for b in bundles(st, "received") if b["status"] == "QUARANTINED"}
    assert q["ho.s001.express.0000000001.bundle"] == "express" and q["ho.s001.0000000002.bundle"] == "main"


def _next(node: Node, lane: str) -> tuple[int, str | None]:
    """(next seq, prev) of the stream ho -> ``node`` in ``lane`` as the store stands."""
    with node.engine.connect() as conn:
        row = conn.execute(select(xchg_stream_in.c.last_seq, xchg_stream_in.c.last_manifest_sha256).where(
            xchg_stream_in.c.peer == "ho", xchg_stream_in.c.lane == lane)).first()
    return (int(row[0]) + 1, row[1]) if row else (1, None)


# ---------------------------------------------------------------- #15: HELD in one lane, the others flow

#: Items and transfer orders mapped from each node's own tables, each type in a lane of its own.
LANE_CATALOG = {"schema": "database", "doc": [
    {"name": "item", "header": "item", "children": ["item_barcode"], "key": ["item_id"], "owner": "ho",
     "route": "all", "totals": ["item.price"], "lane": "masters"},
    {"name": "transfer_order", "header": "transfer_order", "children": ["transfer_order_line"], "key": ["to_id"],
     "owner": "ho", "route": "column:dest_store", "totals": ["transfer_order.total_value"], "lane": "orders"},
    {"name": "customer", "header": "customer", "key": ["store_id", "customer_id"], "owner": "store",
     "owner_columns": ["store_id"]}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    """Every node on its own database of the kind (SQLite, then PostgreSQL), with LANE_CATALOG."""
    with contextlib.ExitStack() as stack:
        dbs: dict[str, str] = {}
        if request.param == "postgresql":
            dbs = {nid: stack.enter_context(_fresh_pg_database()) for nid in ("ho", *STORES)}
        n = make_net(tmp_path / "net", ho_db=dbs.get("ho"), stores=STORES, store_dbs=dbs)
        try:
            with_catalog(n, LANE_CATALOG)
            yield n
        finally:
            n.dispose()


def new_item(net: Net, item_id: str, **extra: str) -> None:
    with net.ho.engine.begin() as conn:
        add_item(conn, item_id)
        for col, value in extra.items():
            conn.execute(text(f"UPDATE item SET {col} = :v WHERE item_id = :i"), {"v": value, "i": item_id})
        record_events(conn, "item", [(item_id,)])


def test_a_type_change_is_held_in_its_lane_while_orders_flow(db_net: Net) -> None:
    """#15 with lanes: the HO's item column changes type; s001 (whose column is text) holds the masters
    bundle with a reason naming the column and both catalog versions, before anything of it is applied.
    Transfer orders keep flowing in lane orders meanwhile; the one naming the held item parks with that
    reason and applies by itself once s001 has migrated and `exchange retry` applied the held bundle."""
    net = db_net
    new_item(net, "I1")
    sync_all(net)
    for node, ddl in ((net.ho, "brand_code INTEGER"), (net.store("s001"), "brand_code VARCHAR(8)"),
                      (net.store("s002"), "brand_code INTEGER")):  # s002 made it as the HO did
        with node.engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE item ADD COLUMN {ddl}")
    net.reopen()
    s001, s002 = net.store("s001"), net.store("s002")
    new_item(net, "I2", brand_code="7")
    new_transfer(net.ho, "TO-HELD-ITEM", "s001", "I2")  # names the item held in the other lane
    new_transfer(net.ho, "TO-S002", "s002", "I2")
    sync_all(net, held=("s001",))
    new_transfer(net.ho, "TO-KNOWN-ITEM", "s001", "I1")
    sync_all(net, held=("s001",))

    got = {(b["lane"], b["seq"]): (b["status"], b["reason"] or "") for b in bundles(s001, "received")}
    assert got[("masters", 2)][0] == "HELD" and got[("orders", 1)][0] == "APPLIED" \
        and got[("orders", 2)][0] == "APPLIED", got
    reason = got[("masters", 2)][1]
    assert "table item: column brand_code is int64 in the bundle and string here" in reason
    assert f"sender runs catalog {net.ho.catalog.fingerprint[:12]}" in reason
    assert f"this node runs catalog {s001.catalog.fingerprint[:12]}" in reason
    assert not has_row(s001, "item", "item_id", "I2")  # nothing of the held bundle applied
    assert has_row(s001, "transfer_order", "to_id", "TO-KNOWN-ITEM")  # the orders lane flows
    parked = json.loads(cli("status", "parked", "--home", str(s001.cfg.home), "--json"))["parked"]
    assert [(p["doc_type"], p["doc_key"]) for p in parked] == [("transfer_order", '["TO-HELD-ITEM"]')]
    assert "I2" in parked[0]["reason"] and "not received yet" in parked[0]["reason"]
    assert has_row(s002, "transfer_order", "to_id", "TO-S002") and has_row(s002, "item", "item_id", "I2")
    sent = {(b["peer"], b["lane"], b["seq"]): b["status"] for b in bundles(net.ho, "sent")}
    assert sent[("s001", "masters", 2)] == "UPLOADED" and sent[("s001", "orders", 2)] == "PROCESSED"

    with s001.engine.begin() as conn:  # s001 migrates its column to the HO's type
        conn.exec_driver_sql("ALTER TABLE item DROP COLUMN brand_code")
        conn.exec_driver_sql("ALTER TABLE item ADD COLUMN brand_code INTEGER")
    net.reopen()
    s001 = net.store("s001")
    out = cli("retry", "--home", str(s001.cfg.home))
    assert "ho.s001.masters.0000000002.bundle: APPLIED" in out
    assert json.loads(cli("status", "parked", "--home", str(s001.cfg.home), "--json"))["parked"] == []
    assert has_row(s001, "transfer_order", "to_id", "TO-HELD-ITEM")
    sync_all(net)
    assert {b["status"] for b in bundles(net.ho, "sent")} == {"PROCESSED"}
    assert check_net(net).problems == []


# ---------------------------------------------------------------- audit: verify and prune per lane

def verify(home: Path, archive: Path | None = None) -> tuple[int, dict[str, Any]]:
    args = ["audit", "verify", "--json", *([str(archive)] if archive else []), "--home", str(home)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    return res.exit_code, json.loads(res.stdout)


def test_verify_and_prune_work_per_lane(net: Net, tmp_path: Path) -> None:
    """`audit verify` checks each lane's chain on its own (a gap in one lane names that lane, the others
    stay clean); `archive prune` keeps each lane's newest bundle and writes one checkpoint per lane, and
    the pruned archive still verifies."""
    from datetime import timedelta

    from exchange.audit.prune import prune

    ho = net.ho
    seed_ho(net, items=6)
    sync_all(net)
    ids = item_ids(net)
    for n in range(3):  # three masters bundles and three orders bundles to s001
        reprice(ho, ids[n:n + 1])
        new_transfer(ho, f"TO-V{n}", "s001", ids[n])
        sync_all(net)
    code, report = verify(ho.cfg.home)
    assert code == 0, report
    lanes = {(s["sender"], s["recipient"], s["lane"]): s["last_seq"] for s in report["streams"]}
    assert lanes[("ho", "s001", "masters")] == 4 and lanes[("ho", "s001", "orders")] == 4
    assert lanes[("ho", "s001", "main")] == 1  # the promotions and audit plans, under format 3 names
    assert {s["stream"] for s in report["streams"] if s["recipient"] == "s001"} == {
        "ho->s001", "ho->s001 [masters]", "ho->s001 [orders]"}

    copy = tmp_path / "copy"
    shutil.copytree(ho.cfg.home / "archive", copy)
    (copy / "sent" / "ho.s001.masters.0000000002.bundle").unlink()
    code, report = verify(ho.cfg.home, copy)
    assert code != 0
    bad = {s["stream"]: [f["message"] for f in s["findings"] if f["severity"] == "error"] for s in report["streams"]}
    assert any("seq 2" in m or "2" in m for m in bad["ho->s001 [masters]"]), bad
    assert bad["ho->s001 [orders]"] == [] and bad["ho->s001"] == []

    rep = prune(ho.cfg.home / "archive", node_id="ho", role="ho", key=ho.signing_key, trust=ho.trust,
                older_than_days=0, now=datetime.now(UTC) + timedelta(days=1))
    assert rep.removed > 0 and not rep.problems
    cps = sorted(p.name for p in (ho.cfg.home / "archive" / "checkpoints").iterdir())
    assert "ho.ho.s001.masters.0000000003.checkpoint" in cps and "ho.ho.s001.orders.0000000003.checkpoint" in cps
    assert (ho.cfg.archive_sent / "ho.s001.masters.0000000004.bundle").exists()  # each lane's anchor stays
    assert not (ho.cfg.archive_sent / "ho.s001.masters.0000000003.bundle").exists()
    code, report = verify(ho.cfg.home)
    assert code == 0, report
    pruned = {s["stream"]: s["pruned"] for s in report["streams"]}
    assert pruned["ho->s001 [masters]"] == [{"first_seq": 1, "last_seq": 3}]


def test_an_archive_of_format_3_names_still_verifies(tmp_path: Path) -> None:
    """Nodes whose catalog has one lane write exactly format 3's files (no lane anywhere); such an
    archive verifies as the default lane's streams, and a node that declares lanes afterwards goes on
    with them: its default lane continues the old stream, the new lanes start at seq 1."""
    n = make_net(tmp_path / "net", stores=("s001",))
    try:
        seed_ho(n, items=4)
        sync_all(n)
        before = sorted(p.name for p in n.ho.cfg.archive_sent.iterdir() if p.name.endswith(".bundle"))
        assert before and all(parse_name(b).lane == "main" and len(b.split(".")) == 4 for b in before)
        code, report = verify(n.ho.cfg.home)
        assert code == 0 and {s["lane"] for s in report["streams"]} == {"main"}
        with_catalog(n, {"lanes": "reference"})
        reprice(n.ho, item_ids(n)[:2])  # only items: the default lane has nothing, and passes the items by
        sync_all(n)
        after = sorted(p.name for p in n.ho.cfg.archive_sent.iterdir() if p.name.endswith(".bundle"))
        assert [a for a in after if a not in before] == ["ho.s001.masters.0000000001.bundle"]  # those two only
        with n.ho.engine.begin() as conn:
            conn.execute(s.promotion.update().values(name="Spring"))
            record_events(conn, "promotion", [(k[0],) for k in n.masters["promotion"]])
        sync_all(n)
        after = sorted(p.name for p in n.ho.cfg.archive_sent.iterdir() if p.name.endswith(".bundle"))
        assert f"ho.s001.{len(before) + 1:010d}.bundle" in after  # the default lane goes on from format 3
        code, report = verify(n.ho.cfg.home)
        assert code == 0, report
        assert check_net(n).problems == []
    finally:
        n.dispose()


# ---------------------------------------------------------------- the migration

def _as_schema_12(node: Node) -> None:
    """The node's stream tables as schema 12 had them: no lane, keyed by peer (and seq)."""
    from exchange.database.tables import LANE_TABLES

    with node.engine.begin() as conn:
        for table in LANE_TABLES:
            cols = ", ".join(c.name for c in table.columns if c.name != "lane")
            keys = ", ".join(c.name for c in table.primary_key.columns if c.name != "lane")
            for ix in table.indexes:
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {ix.name}")
            conn.exec_driver_sql(f"CREATE TABLE {table.name}_v12 AS SELECT {cols} FROM {table.name}")
            conn.exec_driver_sql(f"DROP TABLE {table.name}")
            conn.exec_driver_sql(f"ALTER TABLE {table.name}_v12 RENAME TO {table.name}")
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD PRIMARY KEY ({keys})")
        conn.exec_driver_sql("UPDATE xchg_meta SET value = '12' WHERE key = 'schema_version'")


def test_migration_puts_every_stream_in_the_default_lane(tmp_path: Path, db_url: str) -> None:
    """`exchange migrate` on a database of schema 12 keys the stream tables by lane, every existing row in
    the default lane: the streams go on where they were (the next bundle continues the chain)."""
    from sqlalchemy import inspect

    from exchange.database.tables import LANE_TABLES, xchg_sent

    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001",))
    try:
        seed_ho(n, items=4)
        sync_all(n)
        _as_schema_12(n.ho)
        n.dispose()
        out = cli("migrate", "--home", str(n.ho.cfg.home))
        assert "migrat" in out.lower()
        n.reopen()
        with n.ho.engine.connect() as conn:
            insp = inspect(conn)
            for table in LANE_TABLES:
                assert "lane" in insp.get_pk_constraint(table.name)["constrained_columns"], table.name
            assert set(conn.execute(select(xchg_sent.c.lane)).scalars()) == {"main"}
            assert conn.execute(select(xchg_stream_out.c.next_seq).where(xchg_stream_out.c.peer == "s001")
                                ).scalar() == 2
        reprice(n.ho, item_ids(n)[:1])
        sync_all(n)
        assert (n.ho.cfg.archive_sent / "ho.s001.0000000002.bundle").exists()
        assert check_net(n).problems == []
    finally:
        n.dispose()


# ---------------------------------------------------------------- a kill at any point, with lanes

@pytest.mark.parametrize("spec", ["export.committed:2", "import.applied:2", "import.committed:3", "ack.committed:2"])
def test_kill_and_recover_with_lanes(tmp_path: Path, spec: str) -> None:
    """`exchange sync` killed at a crash point while several lanes move (docs/ARCHITECTURE.md, "Transactions
    and crash points"): the next syncs end with every bundle of every lane PROCESSED, each lane's chain
    whole, nothing lost or applied twice."""
    import os
    import subprocess
    import sys

    n = make_net(tmp_path / "net", stores=("s001",), max_rows={"ho": 4})
    try:
        with_catalog(n, {"lanes": "reference"})
        seed_ho(n, items=10)
        n.settle()
        ids = item_ids(n)
        reprice(n.ho, ids[:9], "0.25")  # three masters bundles
        for k in range(5):  # two orders bundles
            new_transfer(n.ho, f"TO-K{k}", "s001", ids[k])
        env = {**os.environ, "EXCHANGE_CRASH_AT": spec}
        env.pop("EXCHANGE_HOME", None)
        died = False
        for node in (n.ho, n.store("s001"), n.ho):
            p = subprocess.run([sys.executable, "-m", "exchange", "sync", "--home", str(node.cfg.home)],
                               capture_output=True, text=True, env=env, timeout=120)
            if p.returncode == -9:
                died = True
                break
            assert p.returncode == 0, p.stdout + p.stderr
        assert died, f"no sync reached {spec}"
        n.reopen()
        n.settle(max_rounds=6)
        check = check_net(n)
        assert check.problems == [] and check.lost == 0 and check.applied_twice == 0
        lanes = {b["lane"] for b in bundles(n.ho, "sent")}
        assert {"masters", "orders"} <= lanes
    finally:
        n.dispose()


@pytest.mark.parametrize("spec", ["export.sealed:2", "export.committed"])
def test_a_fan_out_killed_inside_a_lane_group_recovers(tmp_path: Path, db_url: str, spec: str) -> None:
    """An HO seals the next bundles of several stores' streams in one lane in one transaction
    (exchange.send.export, ``_export_group``): killed after the second store's masters bundle is sealed,
    before the commit, nothing of the group is recorded; killed after the commit, all of it is. A group
    holds one lane's bundles only, and the next syncs end with every lane of every store whole."""
    import os
    import subprocess
    import sys

    from exchange.database.tables import xchg_sent
    from exchange.wire.formats import PART_SUFFIX

    n = make_net(tmp_path / "net", ho_db=db_url, stores=STORES, max_rows={"ho": 4})
    try:
        with_catalog(n, {"lanes": "reference"})
        seed_ho(n, items=10)
        n.settle()
        ids = item_ids(n)
        reprice(n.ho, ids[:9], "0.25")  # three masters bundles per store
        for k in range(3):  # an orders bundle for s001
            new_transfer(n.ho, f"TO-G{k}", "s001", ids[k])
        env = {**os.environ, "EXCHANGE_CRASH_AT": spec}
        env.pop("EXCHANGE_HOME", None)
        p = subprocess.run([sys.executable, "-m", "exchange", "sync", "--home", str(n.ho.cfg.home)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == -9, p.stdout + p.stderr
        parts = [f.name for f in n.ho.cfg.outbox.iterdir() if f.name.endswith(".bundle" + PART_SUFFIX)]
        names = [parse_name(f[: -len(PART_SUFFIX)]) for f in parts]
        assert {f.b for f in names} == set(STORES) and {f.lane for f in names} == {"masters"}, parts
        with n.ho.engine.connect() as conn:
            sent = {r.file_name for r in conn.execute(select(xchg_sent))}
        recorded = [f for f in parts if f[: -len(PART_SUFFIX)] in sent]
        assert (recorded == parts) if spec == "export.committed" else not recorded
        n.reopen()
        n.settle(max_rounds=8)
        check = check_net(n)
        assert check.problems == [] and check.lost == 0 and check.applied_twice == 0
        got = {(b["peer"], b["lane"]) for b in bundles(n.ho, "sent")}
        assert {("s001", "masters"), ("s002", "masters"), ("s001", "orders")} <= got, got
    finally:
        n.dispose()
