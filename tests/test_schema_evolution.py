"""Schema evolution without stopping the estate (issue #15), through the CLI, on SQLite and PostgreSQL.

An HO and two stores map their item tables (``[catalog] schema = "database"``: the
catalog is read from each node's own database). The HO adds a column to its item
table; s001 is upgraded the same day, s002 weeks later. Before this change s002
refused the whole bundle ("unknown column") and every later bundle waited behind it.
Now s002 applies what it can, keeps the new column's values aside and writes them
once its table has the column; a column whose type differs is HELD before anything
is applied, with a reason naming the column and both catalog versions, while the
other stores' streams flow.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import _fresh_pg_database
from enginehelpers import Net, add_item, docs_of, forge_bundle, make_net
from test_ui import request, ui_server
from sqlalchemy import text

from exchange.cli import main
from exchange.database.capture import record_events
from exchange.node.home import Node

STORES = ("s001", "s002")

#: The item document mapped from each node's own tables (what a site with its own POS writes).
ITEM_CATALOG = {"schema": "database", "doc": [{
    "name": "item", "header": "item", "children": ["item_barcode"], "key": ["item_id"], "owner": "ho",
    "route": "all", "totals": ["item.price"]}, {
    "name": "customer", "header": "customer", "key": ["store_id", "customer_id"], "owner": "store",
    "owner_columns": ["store_id"]}]}


def cli(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, f"exchange {' '.join(args)} -> {res.exit_code}: {res.output}"
    return res.output


@contextlib.contextmanager
def _net(kind: str, root: Path, catalog: dict[str, Any] | None) -> Iterator[Net]:
    """An HO and two stores, every node on its own database of ``kind``, with ``catalog`` (else the reference)."""
    with contextlib.ExitStack() as stack:
        dbs: dict[str, str] = {}
        if kind == "postgresql":
            dbs = {nid: stack.enter_context(_fresh_pg_database()) for nid in ("ho", *STORES)}
        n = make_net(root, ho_db=dbs.get("ho"), stores=STORES, store_dbs=dbs)
        if catalog is not None:
            for node in n.nodes:
                node.cfg.catalog = catalog
                node.cfg.save()
            n.reopen()
        try:
            yield n
        finally:
            n.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    """Items and customers mapped from each node's own tables (``schema = "database"``)."""
    with _net(request.param, tmp_path / "net", ITEM_CATALOG) as n:
        yield n


@pytest.fixture(params=["sqlite", "postgresql"])
def ref_net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    """Every node on the reference schema (the default catalog)."""
    with _net(request.param, tmp_path / "net", None) as n:
        yield n


def sync_all(net: Net, rounds: int = 3, held: tuple[str, ...] = ()) -> None:
    """``exchange sync`` of every node, HO first, ``rounds`` times (bundles out, acks back).

    A node in ``held`` holds a bundle: its sync exits 15 (docs/SERVICE.md, "Exit codes"), the others 0.
    """
    for _ in range(rounds):
        for node in net.nodes:
            cli("sync", "--home", str(node.cfg.home), code=15 if node.id in held else 0)


def sql(node: Node, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    with node.engine.begin() as conn:
        res = conn.execute(text(statement), params)
        return [tuple(r) for r in res] if res.returns_rows else []


def add_column(node: Node, ddl: str) -> None:
    """A site's schema change: ALTER TABLE item ADD COLUMN ..."""
    sql(node, f"ALTER TABLE item ADD COLUMN {ddl}")


def new_item(net: Net, item_id: str, price: str = "9.99", **extra: str) -> None:
    """An item written at the HO (with values for columns the HO has added) and its event."""
    with net.ho.engine.begin() as conn:
        add_item(conn, item_id, price)
        for col, value in extra.items():
            conn.execute(text(f"UPDATE item SET {col} = :v WHERE item_id = :i"), {"v": value, "i": item_id})
        record_events(conn, "item", [(item_id,)])


def received(node: Node) -> list[tuple[str, str, str]]:
    out = json.loads(cli("status", "received", "--home", str(node.cfg.home), "--json"))
    return [(r["file"], r["status"], r["reason"] or "") for r in out["bundles"]]


def statuses(node: Node) -> list[str]:
    return [s for _f, s, _r in received(node)]


def columns(node: Node) -> set[str]:
    from sqlalchemy import inspect

    with node.engine.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("item")}


def fingerprint(node: Node) -> str:
    """The node's catalog version as a fresh process reads it from its database."""
    fresh = Node.open(node.cfg.home)
    try:
        return fresh.catalog.fingerprint
    finally:
        fresh.engine.dispose()


def reopen(net: Net) -> None:
    """Fresh Node objects: a catalog read from the database is read again (after a schema change)."""
    net.reopen()


def test_new_column_at_the_ho_reaches_upgraded_and_older_stores(net: Net) -> None:
    new_item(net, "I1")
    sync_all(net)
    assert all(statuses(s) == ["APPLIED"] for s in net.stores.values())

    # the HO adds a column and fills it; s001 is upgraded at once, s002 is not
    add_column(net.ho, "supplier VARCHAR(40)")
    add_column(net.store("s001"), "supplier VARCHAR(40)")
    reopen(net)
    new_item(net, "I2", supplier="Acme")
    sync_all(net)
    new_item(net, "I3", supplier="Zenith")  # a later bundle: must not wait behind the first
    sync_all(net)

    for sid in STORES:
        assert statuses(net.store(sid)) == ["APPLIED", "APPLIED", "APPLIED"], received(net.store(sid))
        assert sql(net.store(sid), "SELECT item_id FROM item ORDER BY item_id") == [("I1",), ("I2",), ("I3",)]
    assert sql(net.store("s001"), "SELECT item_id, supplier FROM item ORDER BY item_id") == [
        ("I1", None), ("I2", "Acme"), ("I3", "Zenith")]
    # s002 has no such column: the values are kept aside and reported, not lost
    assert "supplier" not in columns(net.store("s002"))
    kept = json.loads(cli("catalog", "kept", "--home", str(net.store("s002").cfg.home), "--json"))
    assert kept == [{"peer": "ho", "table": "item", "column": "supplier", "type": "string", "bundles": 2, "rows": 2,
                     "waiting": "no column item.supplier here yet"}]
    assert "no column item.supplier here yet" in cli("catalog", "kept", "--home", str(net.store("s002").cfg.home))
    assert "kept aside: 2 values or documents of item.supplier (string)" in cli("status", "received", "--home",
                                                           str(net.store("s002").cfg.home))
    with ui_server(net.store("s002").cfg.home) as ui:
        _status, _h, store_page = request(ui.url, "/")
    assert re.search(r'id="card-kept".*?<div class="n">2</div>.*?item\.supplier', store_page, re.S)
    # every bundle is PROCESSED at the HO: nothing was rejected
    sent = json.loads(cli("status", "sent", "--home", str(net.ho.cfg.home), "--json"))
    assert {r["status"] for r in sent["bundles"]} == {"PROCESSED"}

    # the HO's overview shows which catalog version each store runs (from each store's last bundle)
    for sid in STORES:
        with net.store(sid).engine.begin() as conn:
            conn.execute(text("INSERT INTO customer (store_id, customer_id, name, created_at) "
                              "VALUES (:s, 'C1', 'Asha', '2024-03-01 10:00:00')"), {"s": sid})
            record_events(conn, "customer", [(sid, "C1")])
    sync_all(net)
    with ui_server(net.ho.cfg.home) as ui:
        _status, _h, page = request(ui.url, "/?sort=catalog")
    cells = dict(re.findall(r'data-store="(s\d+)".*?<td data-col="catalog" title="([0-9a-f]{64})"', page, re.S))
    assert cells == {"s001": fingerprint(net.store("s001")), "s002": fingerprint(net.store("s002"))}
    assert cells["s001"] == net.ho.catalog.fingerprint != cells["s002"]
    assert page.count("differs from the HO") == 1
    diff = json.loads(cli("catalog", "diff", "--peer", "s002", "--home", str(net.ho.cfg.home), "--json"))
    assert diff["peer_catalog"] == cells["s002"]
    assert diff["differences"] == [{"what": "column", "name": "item.supplier", "here": "string", "peer": "-",
                                    "effect": "values kept aside at the peer until it has the column"}]
    diff = json.loads(cli("catalog", "diff", "--peer", "s001", "--home", str(net.ho.cfg.home), "--json"))
    assert diff["peer_catalog"] == diff["here"] and diff["differences"] == []

    # s002 is upgraded weeks later: its catalog change brings the kept values in
    add_column(net.store("s002"), "supplier VARCHAR(40)")
    out = cli("catalog", "apply-kept", "--home", str(net.store("s002").cfg.home))
    assert "2 kept values applied" in out
    assert sql(net.store("s002"), "SELECT item_id, supplier FROM item ORDER BY item_id") == [
        ("I1", None), ("I2", "Acme"), ("I3", "Zenith")]
    assert json.loads(cli("catalog", "kept", "--home", str(net.store("s002").cfg.home), "--json")) == []
    assert "kept aside" not in cli("status", "received", "--home", str(net.store("s002").cfg.home))
    with net.store("s002").engine.begin() as conn:  # its next bundle tells the HO it runs the HO's catalog now
        conn.execute(text("UPDATE customer SET name = 'Asha K' WHERE customer_id = 'C1'"))
        record_events(conn, "customer", [("s002", "C1")])
    sync_all(net)
    with ui_server(net.ho.cfg.home) as ui:
        _status, _h, page = request(ui.url, "/")
    assert "differs from the HO" not in page
    assert page.count(f'<td data-col="catalog" title="{fingerprint(net.ho)}"') == 2


def test_a_column_the_bundle_lacks_keeps_its_value_or_default(net: Net) -> None:
    new_item(net, "I1", price="1.00")
    sync_all(net)
    store = net.store("s001")
    add_column(store, "shelf VARCHAR(8) DEFAULT 'A1'")  # the store's own column: the HO never heard of it
    sql(store, "UPDATE item SET shelf = 'Z9' WHERE item_id = 'I1'")
    reopen(net)
    with net.ho.engine.begin() as conn:
        conn.execute(text("UPDATE item SET name = 'Renamed' WHERE item_id = 'I1'"))
        record_events(conn, "item", [("I1",)])
    new_item(net, "I2")
    sync_all(net)
    assert statuses(store) == ["APPLIED", "APPLIED"], received(store)
    assert sql(store, "SELECT item_id, name, shelf FROM item ORDER BY item_id") == [
        ("I1", "Renamed", "Z9"), ("I2", "Item I2", "A1")]
    out = cli("catalog", "diff", "--peer", "ho", "--home", str(store.cfg.home))
    assert "item.shelf" in out and "keeps its value here on update, its default on insert" in out
    diff = json.loads(cli("catalog", "diff", "--peer", "ho", "--home", str(store.cfg.home), "--json"))
    assert diff["here"] == store.catalog.fingerprint != diff["peer_catalog"] == net.ho.catalog.fingerprint
    assert diff["differences"] == [{"what": "column", "name": "item.shelf", "here": "string", "peer": "-",
                                    "effect": "keeps its value here on update, its default on insert"}]


def test_a_type_change_is_held_with_its_reason_while_other_stores_flow(net: Net) -> None:
    new_item(net, "I1")
    sync_all(net)
    add_column(net.ho, "brand_code INTEGER")
    add_column(net.store("s001"), "brand_code VARCHAR(8)")  # s001 made the column as text: not the same
    reopen(net)
    s001, s002 = net.store("s001"), net.store("s002")
    before = sql(s001, "SELECT * FROM item ORDER BY item_id")
    new_item(net, "I2", brand_code="7")
    sync_all(net, held=("s001",))
    new_item(net, "I3", brand_code="8")
    sync_all(net, held=("s001",))

    got = received(s001)
    assert [s for _f, s, _r in got] == ["APPLIED", "HELD", "WAITING"], got
    reason = got[1][2]
    assert "table item: column brand_code is int64 in the bundle and string here" in reason
    assert f"sender runs catalog {net.ho.catalog.fingerprint[:12]}" in reason
    assert f"this node runs catalog {s001.catalog.fingerprint[:12]}" in reason
    assert sql(s001, "SELECT * FROM item ORDER BY item_id") == before  # nothing of it was applied
    # the other store's stream flows; the HO waits for s001's ack, it has no REJECTED
    assert statuses(s002) == ["APPLIED", "APPLIED", "APPLIED"]
    sent = json.loads(cli("status", "sent", "--home", str(net.ho.cfg.home), "--json"))["bundles"]
    assert {r["status"] for r in sent if r["peer"] == "s001"} == {"PROCESSED", "UPLOADED"}
    diff = cli("catalog", "diff", "--peer", "ho", "--home", str(s001.cfg.home))
    assert "item.brand_code" in diff and "not additive" in diff

    # s001 migrates its column to the HO's type; `exchange retry` applies the held bundle and the one behind it
    sql(s001, "ALTER TABLE item DROP COLUMN brand_code")
    add_column(s001, "brand_code INTEGER")
    out = cli("retry", "--home", str(s001.cfg.home))
    assert "ho.s001.0000000002.bundle: APPLIED" in out and "ho.s001.0000000003.bundle: APPLIED" in out
    assert sql(s001, "SELECT item_id, brand_code FROM item ORDER BY item_id") == [
        ("I1", None), ("I2", 7), ("I3", 8)]
    sync_all(net)
    sent = json.loads(cli("status", "sent", "--home", str(net.ho.cfg.home), "--json"))["bundles"]
    assert {r["status"] for r in sent} == {"PROCESSED"}


#: The reference schema's columns added after the first release (exchange.database.schema).
ADDED = {"item": "brand", "customer": "loyalty_id"}


def previous_release(node: Node) -> None:
    """The node's database as the previous release made it: without the columns added since."""
    for table, column in ADDED.items():
        sql(node, f"ALTER TABLE {table} DROP COLUMN {column}")


def has_added_columns(node: Node) -> bool:
    from sqlalchemy import inspect

    with node.engine.connect() as conn:
        insp = inspect(conn)
        return all(c in {x["name"] for x in insp.get_columns(t)} for t, c in ADDED.items())


def test_reference_migration_on_either_side_in_any_order(ref_net: Net) -> None:
    """s001 migrates first and sends the new column to an HO not migrated; then the HO migrates and
    sends it to s002, not migrated; s002 migrates last. No stream stops, no value is lost."""
    net = ref_net
    ho, s001, s002 = net.ho, net.store("s001"), net.store("s002")
    for node in net.nodes:
        previous_release(node)
    out = cli("migrate", "--home", str(s001.cfg.home))
    assert "2 migration steps run" in out and has_added_columns(s001)
    assert not has_added_columns(ho) and not has_added_columns(s002)

    # HO (not migrated) -> s001 (migrated): the bundle lacks item.brand, s001 takes its default
    new_item(net, "I1")
    # s001 (migrated) -> HO (not migrated): the customer's loyalty_id is kept aside at the HO
    with s001.engine.begin() as conn:
        conn.execute(text("INSERT INTO customer (store_id, customer_id, name, created_at, loyalty_id) "
                          "VALUES ('s001', 'C1', 'Asha', '2024-03-01 10:00:00', 'L-77')"))
        record_events(conn, "customer", [("s001", "C1")])
    sync_all(net)
    assert statuses(ho) == ["APPLIED"] and statuses(s001) == ["APPLIED"] and statuses(s002) == ["APPLIED"]
    assert sql(s001, "SELECT item_id, brand FROM item") == [("I1", None)]
    kept = json.loads(cli("catalog", "kept", "--home", str(ho.cfg.home), "--json"))
    assert [(k["peer"], k["table"], k["column"], k["rows"]) for k in kept] == [("s001", "customer", "loyalty_id", 1)]

    # the HO migrates: the column is added and the kept value written
    out = cli("migrate", "--home", str(ho.cfg.home))
    assert "2 migration steps run" in out and "1 kept values applied" in out
    assert sql(ho, "SELECT customer_id, loyalty_id FROM customer") == [("C1", "L-77")]
    assert json.loads(cli("catalog", "kept", "--home", str(ho.cfg.home), "--json")) == []

    # HO (migrated) -> s002 (not migrated) and s001 (migrated)
    with ho.engine.begin() as conn:
        conn.execute(text("UPDATE item SET brand = 'Acme', name = 'Tea' WHERE item_id = 'I1'"))
        record_events(conn, "item", [("I1",)])
    sync_all(net)
    for store in (s001, s002):
        assert statuses(store) == ["APPLIED", "APPLIED"], received(store)
    assert sql(s001, "SELECT item_id, name, brand FROM item") == [("I1", "Tea", "Acme")]
    assert sql(s002, "SELECT item_id, name FROM item") == [("I1", "Tea")]
    sent = json.loads(cli("status", "sent", "--home", str(ho.cfg.home), "--json"))["bundles"]
    assert {r["status"] for r in sent} == {"PROCESSED"}

    # s002 migrates weeks later: nothing was lost
    out = cli("migrate", "--home", str(s002.cfg.home))
    assert "1 kept values applied" in out
    assert sql(s002, "SELECT item_id, name, brand FROM item") == [("I1", "Tea", "Acme")]
    diff = json.loads(cli("catalog", "diff", "--peer", "ho", "--home", str(s002.cfg.home), "--json"))
    assert diff["differences"] == [] and diff["here"] == diff["peer_catalog"]


def _tampered(catalog: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(catalog))
    out["tables"]["item"]["price"] = ["string", True]  # claims another type, fingerprint left as it was
    return out


def _long_name(catalog: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(catalog))
    out["tables"]["item"]["x" * 200] = ["string", True]
    return out


@pytest.mark.parametrize("forge, reason", [
    (_tampered, "does not match its content"),
    (_long_name, "must be a name of 1 to 128 characters"),
    (lambda c: {**c, "docs": "everything"}, "docs must be an object"),
    (lambda c: "1.0", "must be an object of format, docs, tables and fingerprint"),
])
def test_a_hostile_catalog_is_quarantined_with_its_reason(tmp_path: Path, forge: Any, reason: str) -> None:
    """The catalog comes from the peer: checked (shape, sizes, fingerprint) before anything uses it."""
    with _net("sqlite", tmp_path / "net", None) as net:
        with net.ho.engine.begin() as conn:
            add_item(conn, "I1")
        store = net.store("s001")
        before = sql(store, "SELECT * FROM item")
        path = forge_bundle(net.ho, "s001", docs_of(net.ho, "item", [("I1",)]),
                            catalog=forge(net.ho.catalog.description))
        path.replace(store.cfg.inbox / path.name)
        out = cli("import", "--home", str(store.cfg.home), code=10)  # quarantined: exit 10
        assert f"{path.name}: QUARANTINED - inner.json: catalog" in out
        got = received(store)
        assert [(f, s) for f, s, _r in got] == [(path.name, "QUARANTINED")]
        assert reason in got[0][2]
        assert sql(store, "SELECT * FROM item") == before


BRAND = {"name": "brand", "header": "brand", "key": ["brand_id"], "owner": "ho", "route": "all"}


def add_brand_type(node: Node) -> None:
    """A new document type: its table, and its place in the catalog (masters first)."""
    sql(node, "CREATE TABLE brand (brand_id VARCHAR(32) NOT NULL PRIMARY KEY, name VARCHAR(64) NOT NULL)")
    node.cfg.catalog = {**ITEM_CATALOG, "doc": [BRAND, *ITEM_CATALOG["doc"]]}
    node.cfg.save()


def brand(net: Net, brand_id: str, name: str) -> None:
    with net.ho.engine.begin() as conn:
        conn.execute(text("DELETE FROM brand WHERE brand_id = :b"), {"b": brand_id})
        conn.execute(text("INSERT INTO brand (brand_id, name) VALUES (:b, :n)"), {"b": brand_id, "n": name})
        record_events(conn, "brand", [(brand_id,)])


def test_a_new_document_type_is_kept_aside_then_applied(net: Net) -> None:
    """The HO starts sending a document type the stores do not have: their streams go on, the documents
    wait, and apply once each store's catalog has the type (by command, or before the next bundle)."""
    add_brand_type(net.ho)
    reopen(net)
    brand(net, "B1", "Acme")
    new_item(net, "I1")
    sync_all(net)
    brand(net, "B1", "Acme Foods")  # a later version of the same document, also kept
    sync_all(net)
    for sid in STORES:
        store = net.store(sid)
        assert statuses(store) == ["APPLIED", "APPLIED"], received(store)
        assert sql(store, "SELECT item_id FROM item") == [("I1",)]
        kept = json.loads(cli("catalog", "kept", "--home", str(store.cfg.home), "--json"))
        assert kept == [{"peer": "ho", "table": "brand", "column": "*", "type": "documents", "bundles": 2,
                         "rows": 2, "waiting": "no document type brand here yet"}]
    assert "brand documents" in cli("status", "received", "--home", str(net.store("s001").cfg.home))
    sent = json.loads(cli("status", "sent", "--home", str(net.ho.cfg.home), "--json"))["bundles"]
    assert {r["status"] for r in sent} == {"PROCESSED"}

    # s001 gains the type and applies what it kept at once
    add_brand_type(net.store("s001"))
    out = cli("catalog", "apply-kept", "--home", str(net.store("s001").cfg.home))
    assert "kept documents of 2 bundles applied" in out
    assert sql(net.store("s001"), "SELECT brand_id, name FROM brand") == [("B1", "Acme Foods")]
    # s002 gains it too; its next bundle applies the kept documents first, then the new one
    add_brand_type(net.store("s002"))
    brand(net, "B2", "Zenith")
    sync_all(net)
    for sid in STORES:
        assert sql(net.store(sid), "SELECT brand_id, name FROM brand ORDER BY brand_id") == [
            ("B1", "Acme Foods"), ("B2", "Zenith")]
        assert json.loads(cli("catalog", "kept", "--home", str(net.store(sid).cfg.home), "--json")) == []


LABEL_TABLE = "CREATE TABLE shelf_label (store_id VARCHAR(32) NOT NULL, label_id VARCHAR(32) NOT NULL, " \
              "body VARCHAR(64), PRIMARY KEY (store_id, label_id))"


def test_kept_documents_get_every_check_when_their_type_arrives(net: Net) -> None:
    """A store's documents of a type the HO lacks are kept; when the HO's catalog later has the type as its
    own (HO-owned), applying them would let a store write the HO's documents: refused, kept, reported."""
    s001 = net.store("s001")
    sql(s001, LABEL_TABLE)
    s001.cfg.catalog = {**ITEM_CATALOG, "doc": [*ITEM_CATALOG["doc"], {
        "name": "shelf_label", "header": "shelf_label", "key": ["store_id", "label_id"], "owner": "store",
        "owner_columns": ["store_id"]}]}
    s001.cfg.save()
    reopen(net)
    with net.store("s001").engine.begin() as conn:
        conn.execute(text("INSERT INTO shelf_label VALUES ('s001', 'L1', 'planted')"))
        record_events(conn, "shelf_label", [("s001", "L1")])
    sync_all(net)
    assert statuses(net.ho) == ["APPLIED"]
    kept = json.loads(cli("catalog", "kept", "--home", str(net.ho.cfg.home), "--json"))
    assert [(k["peer"], k["table"], k["waiting"]) for k in kept] == [
        ("s001", "shelf_label", "no document type shelf_label here yet")]

    sql(net.ho, LABEL_TABLE)  # the HO's catalog gains the type as the HO's own
    net.ho.cfg.catalog = {**ITEM_CATALOG, "doc": [*ITEM_CATALOG["doc"], {
        "name": "shelf_label", "header": "shelf_label", "key": ["store_id", "label_id"], "owner": "ho",
        "route": "all"}]}
    net.ho.cfg.save()
    out = cli("catalog", "apply-kept", "--home", str(net.ho.cfg.home))
    assert "kept documents of" not in out
    assert "shelf_label documents are owned by the ho side; s001 (store) may not send them" in out
    assert sql(net.ho, "SELECT * FROM shelf_label") == []
    kept = json.loads(cli("catalog", "kept", "--home", str(net.ho.cfg.home), "--json"))
    assert len(kept) == 1 and kept[0]["waiting"].startswith("not applied: shelf_label documents are owned by the ho")


PHOTO_TABLE = "CREATE TABLE item_photo (item_id VARCHAR(32) NOT NULL, photo_id VARCHAR(32) NOT NULL, " \
              "url VARCHAR(200), size_kb INTEGER, PRIMARY KEY (item_id, photo_id))"


def add_photo_table(node: Node) -> None:
    """A new child table of item at ``node``: the table, and its place among item's children."""
    sql(node, PHOTO_TABLE)
    item, *rest = ITEM_CATALOG["doc"]
    node.cfg.catalog = {**ITEM_CATALOG, "doc": [{**item, "children": ["item_barcode", "item_photo"]}, *rest]}
    node.cfg.save()


def photos(net: Net, item_id: str, *shots: tuple[str, int]) -> None:
    """Item ``item_id``'s photos at the HO replaced by ``shots`` (photo_id, size), and its event."""
    with net.ho.engine.begin() as conn:
        conn.execute(text("DELETE FROM item_photo WHERE item_id = :i"), {"i": item_id})
        for photo_id, size in shots:
            conn.execute(text("INSERT INTO item_photo VALUES (:i, :p, :u, :s)"),
                         {"i": item_id, "p": photo_id, "u": f"https://img/{photo_id}", "s": size})
        record_events(conn, "item", [(item_id,)])


def photo_rows(node: Node) -> list[tuple[Any, ...]]:
    return sql(node, "SELECT item_id, photo_id, url, size_kb FROM item_photo ORDER BY item_id, photo_id")


def test_a_new_child_table_is_kept_aside_then_applied(net: Net) -> None:
    """The HO's item gains a table item_photo the stores do not have: their streams go on, the rows wait
    (the latest of each item, a photo removed since stays removed), and apply once each store's catalog
    has the table: by command, or before the next bundle, oldest first, so a newer bundle wins."""
    new_item(net, "I1")
    sync_all(net)
    add_photo_table(net.ho)
    reopen(net)
    new_item(net, "I2")
    photos(net, "I1", ("P1", 10), ("P2", 20))
    photos(net, "I2", ("P3", 30))
    sync_all(net)
    photos(net, "I1", ("P2", 21))  # a later version: P1 removed, P2 changed
    sync_all(net)
    for sid in STORES:
        store = net.store(sid)
        assert statuses(store) == ["APPLIED"] * 3, received(store)
        assert sql(store, "SELECT item_id FROM item ORDER BY item_id") == [("I1",), ("I2",)]
        kept = json.loads(cli("catalog", "kept", "--home", str(store.cfg.home), "--json"))
        assert kept == [{"peer": "ho", "table": "item_photo", "column": "*rows", "type": "item rows", "bundles": 2,
                         "rows": 4, "waiting": "no table item_photo in this node's item documents yet"}]
    home = str(net.store("s001").cfg.home)
    assert "ho: item_photo rows of item: 4 rows from 2 bundles - no table item_photo" in cli("catalog", "kept",
                                                                                              "--home", home)
    assert "kept aside: 4 values or documents of item_photo rows of item" in cli("status", "received", "--home", home)
    with ui_server(net.store("s001").cfg.home) as ui:
        _status, _h, store_page = request(ui.url, "/")
    assert re.search(r'id="card-kept".*?<div class="n">4</div>.*?item_photo rows', store_page, re.S)
    sent = json.loads(cli("status", "sent", "--home", str(net.ho.cfg.home), "--json"))["bundles"]
    assert {r["status"] for r in sent} == {"PROCESSED"}  # the acks' figures match what was sent
    diff = json.loads(cli("catalog", "diff", "--peer", "ho", "--home", home, "--json"))
    assert diff["differences"] == [{"what": "table", "name": "item_photo", "here": "-", "peer": "yes",
                                    "effect": "the peer's rows are kept aside here until this node has the table"}]

    # s001 gains the table: the kept rows are written, oldest bundle first (the latest of I1 wins)
    add_photo_table(net.store("s001"))
    out = cli("catalog", "apply-kept", "--home", home)
    assert "kept documents of 2 bundles applied" in out
    want = [("I1", "P2", "https://img/P2", 21), ("I2", "P3", "https://img/P3", 30)]
    assert photo_rows(net.store("s001")) == want
    assert json.loads(cli("catalog", "kept", "--home", home, "--json")) == []
    # s002 gains it too; the HO's next bundle: the kept rows first, then the newer ones
    add_photo_table(net.store("s002"))
    photos(net, "I2", ("P4", 40))
    sync_all(net)
    want = [want[0], ("I2", "P4", "https://img/P4", 40)]
    for sid in STORES:
        assert photo_rows(net.store(sid)) == want, sid
        assert json.loads(cli("catalog", "kept", "--home", str(net.store(sid).cfg.home), "--json")) == []
    sent = json.loads(cli("status", "sent", "--home", str(net.ho.cfg.home), "--json"))["bundles"]
    assert {r["status"] for r in sent} == {"PROCESSED"}


def test_a_parked_documents_kept_child_rows_apply_when_it_does(net: Net) -> None:
    """An item whose bundle brings rows of a child table this store lacks, and which parks here (a store
    trigger refuses it for now): its rows are kept with the others, stay kept while it is parked (the
    table arriving writes only the applied items'), and are written when `exchange retry` applies it."""
    new_item(net, "I1")
    sync_all(net)
    add_photo_table(net.ho)
    reopen(net)
    store = net.store("s001")
    release = hold_item(store, "I2")
    new_item(net, "I2")
    photos(net, "I1", ("P1", 10))
    photos(net, "I2", ("P2", 20), ("P3", 30))
    sync_all(net)
    home = str(store.cfg.home)
    parked = json.loads(cli("status", "received", "--home", home, "--json"))["parked"]
    assert [(p["doc_type"], p["doc_key"]) for p in parked] == [("item", '["I2"]')], parked
    kept = json.loads(cli("catalog", "kept", "--home", home, "--json"))
    assert [(k["table"], k["rows"]) for k in kept] == [("item_photo", 3)], kept  # I2's rows kept too

    add_photo_table(store)  # the table arrives while I2 is still parked: I1's rows written, I2's kept on
    cli("catalog", "apply-kept", "--home", home)
    assert photo_rows(store) == [("I1", "P1", "https://img/P1", 10)]
    kept = json.loads(cli("catalog", "kept", "--home", home, "--json"))
    assert [(k["table"], k["rows"]) for k in kept] == [("item_photo", 2)], kept

    release()
    cli("retry", "--home", home)
    assert sql(store, "SELECT item_id FROM item ORDER BY item_id") == [("I1",), ("I2",)]
    assert photo_rows(store) == [("I1", "P1", "https://img/P1", 10), ("I2", "P2", "https://img/P2", 20),
                                 ("I2", "P3", "https://img/P3", 30)]
    assert json.loads(cli("catalog", "kept", "--home", home, "--json")) == []


def hold_item(node: Node, item_id: str) -> Callable[[], None]:
    """A trigger at ``node`` that refuses item ``item_id`` for now (it parks there); returns its removal."""
    if node.engine.dialect.name == "postgresql":
        sql(node, "CREATE FUNCTION hold_item() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                  f"RAISE EXCEPTION 'item {item_id} is not allowed yet'; END $$")
        sql(node, "CREATE TRIGGER hold_item BEFORE INSERT ON item FOR EACH ROW "
                  f"WHEN (NEW.item_id = '{item_id}') EXECUTE FUNCTION hold_item()")
        return lambda: sql(node, "DROP TRIGGER hold_item ON item")
    sql(node, f"CREATE TRIGGER hold_item BEFORE INSERT ON item WHEN NEW.item_id = '{item_id}' "
              f"BEGIN SELECT RAISE(ABORT, 'item {item_id} is not allowed yet'); END")
    return lambda: sql(node, "DROP TRIGGER hold_item")


def test_a_parked_documents_kept_value_waits_for_it_and_a_newer_version_wins(net: Net) -> None:
    """A value of a column this store lacks, for an item that parks here: the column arriving writes it
    only once the item applies; when a newer version of the item applies first, the older kept value is
    dropped, never written over the newer one."""
    new_item(net, "I1")
    sync_all(net)
    add_column(net.ho, "supplier VARCHAR(40)")
    reopen(net)
    store = net.store("s001")
    home = str(store.cfg.home)
    release = hold_item(store, "I2")
    new_item(net, "I2", supplier="ACME")
    new_item(net, "I3", supplier="BOLT")
    sync_all(net)
    parked = json.loads(cli("status", "received", "--home", home, "--json"))["parked"]
    assert [p["doc_key"] for p in parked] == ['["I2"]'], parked
    add_column(store, "supplier VARCHAR(40)")
    reopen(net)
    cli("catalog", "apply-kept", "--home", home)
    store = net.store("s001")
    assert sql(store, "SELECT item_id, supplier FROM item ORDER BY item_id") == [("I1", None), ("I3", "BOLT")]
    kept = json.loads(cli("catalog", "kept", "--home", home, "--json"))
    assert [(k["column"], k["rows"]) for k in kept] == [("supplier", 1)], kept  # I2's value waits for I2

    release()
    with net.ho.engine.begin() as conn:  # a newer version of I2 applies at the store before any retry
        conn.execute(text("UPDATE item SET supplier = 'NEWCO' WHERE item_id = 'I2'"))
        record_events(conn, "item", [("I2",)])
    sync_all(net)
    cli("catalog", "apply-kept", "--home", home)
    assert sql(store, "SELECT item_id, supplier FROM item ORDER BY item_id") == [
        ("I1", None), ("I2", "NEWCO"), ("I3", "BOLT")]
    assert json.loads(cli("catalog", "kept", "--home", home, "--json")) == []
    assert json.loads(cli("status", "received", "--home", home, "--json"))["parked"] == []


def _refingerprint(catalog: dict[str, Any]) -> dict[str, Any]:
    """A catalog whose fingerprint matches its (changed) content: what a sender's own catalog looks like."""
    import hashlib

    body = {k: catalog[k] for k in ("format", "docs", "tables")}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {**body, "fingerprint": digest}


def _photo_under_customer(catalog: dict[str, Any]) -> dict[str, Any]:
    """item_photo declared under customer (a type the bundle's events do not announce), not under item."""
    out = json.loads(json.dumps(catalog))
    out["docs"]["item"]["tables"].remove("item_photo")
    out["docs"]["customer"]["tables"].append("item_photo")
    return _refingerprint(out)


def _photo_undeclared(catalog: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(catalog))
    out["docs"]["item"]["tables"].remove("item_photo")
    del out["tables"]["item_photo"]
    return _refingerprint(out)


def _photo_of_another_item(tables: dict[str, Any]) -> None:
    """A row under an item the events do not announce, smuggled into the declared child table."""
    import pyarrow as pa

    extra = pa.table({"item_id": ["I9"], "photo_id": ["X"], "url": ["https://evil"], "size_kb": [1]},
                     schema=tables["item_photo"].schema)
    tables["item_photo"] = pa.concat_tables([tables["item_photo"], extra])


@pytest.mark.parametrize("forge_catalog, forge_tables, reason", [
    (_photo_under_customer, None, "the bundle carries table item_photo, but its events announce no document type "
                                  "of that table"),
    (_photo_undeclared, None, "the bundle carries table item_photo, but its events announce no document type"),
    (None, _photo_of_another_item, "table item_photo holds rows of item I9, which the bundle's events do not "
                                   "announce"),
], ids=["under-an-unannounced-type", "undeclared", "rows-of-an-unannounced-item"])
def test_a_smuggled_child_table_refuses_the_bundle(net: Net, forge_catalog: Any, forge_tables: Any,
                                                   reason: str) -> None:
    """The child table must be declared under the announced type in the sender's signed catalog and hold
    only rows of announced upserts: otherwise nothing of the bundle is applied and nothing is kept."""
    add_photo_table(net.ho)
    reopen(net)
    new_item(net, "I1")
    photos(net, "I1", ("P1", 10))
    store = net.store("s001")
    cat = forge_catalog(net.ho.catalog.description) if forge_catalog else None
    path = forge_bundle(net.ho, "s001", docs_of(net.ho, "item", [("I1",)]), catalog=cat, tables_hook=forge_tables)
    path.replace(store.cfg.inbox / path.name)
    out = cli("import", "--home", str(store.cfg.home), code=21)  # refused (FAILED), nothing applied
    assert f"{path.name}: FAILED" in out
    got = received(store)
    assert [(f, s) for f, s, _r in got] == [(path.name, "FAILED")]
    assert reason in got[0][2]
    assert sql(store, "SELECT * FROM item") == []
    assert json.loads(cli("catalog", "kept", "--home", str(store.cfg.home), "--json")) == []
    cli("sync", "--home", str(store.cfg.home), code=21)  # its REJECTED ack goes back to the HO
    cli("sync", "--home", str(net.ho.cfg.home), code=21)
    sent = json.loads(cli("status", "sent", "--home", str(net.ho.cfg.home), "--json"))["bundles"]
    mine = next(r for r in sent if r["file"] == path.name)
    assert mine["status"] == "REJECTED" and reason in mine["reason"], mine


def test_kept_child_rows_get_the_normal_checks_when_their_table_arrives(net: Net) -> None:
    """Kept rows go through the usual checks once the store has the table: a column of another type keeps
    them (with the reason), a column the store lacks is kept in turn, a document deleted since takes nothing."""
    add_photo_table(net.ho)
    reopen(net)
    new_item(net, "I1")
    new_item(net, "I2")
    photos(net, "I1", ("P1", 10))
    photos(net, "I2", ("P2", 20))
    sync_all(net)
    with net.ho.engine.begin() as conn:  # I2 deleted at the HO: its kept photo must not come back
        conn.execute(text("DELETE FROM item_photo WHERE item_id = 'I2'"))
        conn.execute(text("DELETE FROM item WHERE item_id = 'I2'"))
        record_events(conn, "item", [("I2",)])
    sync_all(net)
    s001 = net.store("s001")
    home = str(s001.cfg.home)
    assert statuses(s001) == ["APPLIED", "APPLIED"], received(s001)
    assert sql(s001, "SELECT item_id FROM item") == [("I1",)]

    # the store makes the table with size_kb as text: not the sender's type, the rows stay kept with why
    sql(s001, "CREATE TABLE item_photo (item_id VARCHAR(32) NOT NULL, photo_id VARCHAR(32) NOT NULL, "
              "size_kb VARCHAR(8), PRIMARY KEY (item_id, photo_id))")
    item, *rest = ITEM_CATALOG["doc"]
    s001.cfg.catalog = {**ITEM_CATALOG, "doc": [{**item, "children": ["item_barcode", "item_photo"]}, *rest]}
    s001.cfg.save()
    out = cli("catalog", "apply-kept", "--home", home)
    assert "kept documents of" not in out
    assert re.search(r"still kept: item_photo rows of item from ho \(2\): not applied: table item_photo: column "
                     r"size_kb is int\d+ in the kept rows and string here: kept until this node's column has the "
                     r"sender's type", out), out
    assert sql(s001, "SELECT * FROM item_photo") == []

    # the table as the HO has it, but without url: the rows apply, url's values are kept aside in turn
    sql(s001, "DROP TABLE item_photo")
    sql(s001, "CREATE TABLE item_photo (item_id VARCHAR(32) NOT NULL, photo_id VARCHAR(32) NOT NULL, "
              "size_kb INTEGER, PRIMARY KEY (item_id, photo_id))")
    out = cli("catalog", "apply-kept", "--home", home)
    assert "kept documents of 2 bundles applied" in out  # the second one (I2 deleted) writes nothing
    assert sql(s001, "SELECT item_id, photo_id, size_kb FROM item_photo") == [("I1", "P1", 10)]
    kept = json.loads(cli("catalog", "kept", "--home", home, "--json"))
    assert [(k["table"], k["column"], k["rows"], k["waiting"]) for k in kept] == [
        ("item_photo", "url", 1, "no column item_photo.url here yet")]
    sql(s001, "ALTER TABLE item_photo ADD COLUMN url VARCHAR(200)")
    assert "1 kept values applied" in cli("catalog", "apply-kept", "--home", home)
    assert photo_rows(s001) == [("I1", "P1", "https://img/P1", 10)]
