"""A customer edited at the HO and at its store: a conflict, never a silently lost edit.

Each scenario runs through the real command line (``exchange triggers install``,
``exchange sync``, ``exchange status conflicts``, ``exchange conflicts ...``) on
real homes exchanging through a folder, with the HO on SQLite and on
PostgreSQL. The edits are plain SQL UPDATEs caught by the capture triggers, as
a POS that cannot be changed makes them. The oracles: what each end holds
afterwards (both ends the same), the conflict log of each end (both versions,
the policy, what it kept) and the metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import CliRunner
from enginehelpers import Net, docs_of, forge_bundle, make_net, seed_ho
from sqlalchemy import select, update

from exchange.cli import main
from exchange.errors import ConflictError
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.tables import xchg_stream_in
from exchange.service.metrics import make_registry, render
from exchange.wire.formats import BASES_TABLE

KEY = ("s001", "C1")


def cli(*args: str, code: int = 0) -> Any:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def sync(net: Net, *order: str) -> None:
    for nid in order:
        cli("sync", "--home", str(net.node(nid).cfg.home))


def customer(node: Any, key: tuple[str, str] = KEY) -> dict[str, Any] | None:
    with node.engine.connect() as conn:
        row = conn.execute(select(s.customer.c.name, s.customer.c.phone, s.customer.c.email).where(
            s.customer.c.store_id == key[0], s.customer.c.customer_id == key[1])).mappings().first()
    return dict(row) if row else None


def edit(node: Any, **values: Any) -> None:
    """A plain UPDATE, as a POS writes it: the capture triggers record the change."""
    with node.engine.begin() as conn:
        n = conn.execute(update(s.customer).where(s.customer.c.store_id == KEY[0],
                                                  s.customer.c.customer_id == KEY[1]).values(**values)).rowcount
    assert n == 1


def conflicts_json(node: Any) -> dict[str, Any]:
    return json.loads(cli("status", "conflicts", "--json", "--home", str(node.cfg.home)).output)


def open_metric(node: Any) -> float:
    text = render(make_registry(node)).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("exchange_conflicts_open{") and 'doc_type="customer"' in ln]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """An HO (SQLite, then PostgreSQL) and two stores; s001's customer C1 at both ends; triggers on."""
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001", "s002"))
    seed_ho(n, items=3)
    with n.store("s001").engine.begin() as conn:
        conn.execute(s.customer.insert().values(store_id="s001", customer_id="C1", name="Asha", phone="555",
                                                created_at=date(2024, 3, 1)))
        record_events(conn, "customer", [KEY])
    for node in n.nodes:
        cli("triggers", "install", "--home", str(node.cfg.home))
    n.settle()
    assert customer(n.ho) == customer(n.store("s001")) == {"name": "Asha", "phone": "555", "email": None}
    yield n
    n.dispose()


def set_policy(net: Net, policy: str) -> None:
    for node in net.nodes:
        node.cfg.catalog = {"conflicts": {"customer": policy}}
        node.cfg.save()
    net.reopen()


def test_an_ho_edit_reaches_the_owner_store_only(net: Net) -> None:
    """The HO's change of a store's customer goes to that store (it was dropped: "ignoring 1 events")."""
    edit(net.ho, email="asha@example.com")
    sync(net, "ho", "s001", "s002", "ho")
    want = {"name": "Asha", "phone": "555", "email": "asha@example.com"}
    assert customer(net.store("s001")) == customer(net.ho) == want
    assert customer(net.store("s002")) is None
    assert conflicts_json(net.ho)["conflicts"] == conflicts_json(net.store("s001"))["conflicts"] == []
    # and the store's next edit, made on top of the HO's, is no conflict either
    edit(net.store("s001"), phone="556")
    sync(net, "s001", "ho")
    assert customer(net.ho) == customer(net.store("s001")) == {**want, "phone": "556"}
    assert conflicts_json(net.ho)["conflicts"] == []


@pytest.mark.parametrize("policy, first, winner", [
    ("ho-wins", "ho", "ho"),
    ("store-wins", "s001", "s001"),
    ("newest-wins", "ho", "s001"),  # the store's edit is the later one
])
def test_concurrent_edits_decided_by_policy(net: Net, policy: str, first: str, winner: str) -> None:
    set_policy(net, policy)
    names = {"ho": "Asha (HO)", "s001": "Asha (store)"}
    second = "s001" if first == "ho" else "ho"
    edit(net.node(first), name=names[first])
    time.sleep(1.1)  # SQLite's CURRENT_TIMESTAMP counts seconds: the two changes' own times differ
    edit(net.node(second), name=names[second])
    sync(net, "s001", "ho", "s001", "ho", "s001")

    both = [customer(net.ho), customer(net.store("s001"))]
    assert both[0] == both[1], "both ends converge"
    assert both[0] is not None and both[0]["name"] == names[winner]
    logged = [(nid, c) for nid in ("ho", "s001") for c in conflicts_json(net.node(nid))["conflicts"]]
    assert logged, "the conflict is logged, not silent"
    for nid, c in logged:
        assert c["status"] == "DECIDED" and c["policy"] == policy and c["doc_key"] == list(KEY)
        assert c["kept"] == ("ours" if nid == winner else "theirs")
        assert c["ours"]["changed_at"] and c["theirs"]["changed_at"]
    nid, c = logged[0]
    shown = json.loads(cli("conflicts", "show", str(c["id"]), "--json", "--home",
                           str(net.node(nid).cfg.home)).output)
    other = "s001" if nid == "ho" else "ho"
    assert shown["ours"]["rows"]["customer"][0]["name"] == names[nid]
    assert shown["theirs"]["rows"]["customer"][0]["name"] == names[other], "the loser is kept"
    res = cli("conflicts", "resolve", str(c["id"]), "--keep", "ours", "--home", str(net.node(nid).cfg.home),
              code=ConflictError.exit_code)
    assert "not OPEN" in res.output


def test_manual_conflict_held_then_resolved_and_converges(net: Net) -> None:
    """The reference policy (manual): both ends keep their own edit until a person resolves it at one end."""
    edit(net.ho, name="Asha (HO)")
    edit(net.store("s001"), name="Asha (store)", phone="777")
    sync(net, "s001", "ho", "s001", "ho")

    assert customer(net.ho)["name"] == "Asha (HO)"  # type: ignore[index]
    assert customer(net.store("s001")) == {"name": "Asha (store)", "phone": "777", "email": None}
    ho_open = json.loads(cli("conflicts", "list", "--open", "--json", "--home", str(net.ho.cfg.home)).output)
    st_open = json.loads(cli("conflicts", "list", "--open", "--json", "--home",
                             str(net.store("s001").cfg.home)).output)
    assert [c["status"] for c in ho_open["conflicts"]] == ["OPEN"]
    assert [c["status"] for c in st_open["conflicts"]] == ["OPEN"]
    assert conflicts_json(net.ho)["open"] == {"customer": 1}
    assert open_metric(net.ho) == 1 and open_metric(net.store("s001")) == 1
    text = cli("status", "conflicts", "--home", str(net.ho.cfg.home)).output
    assert "held: exchange conflicts resolve" in text

    cid = ho_open["conflicts"][0]["id"]
    shown = json.loads(cli("conflicts", "show", str(cid), "--json", "--home", str(net.ho.cfg.home)).output)
    assert shown["ours"]["rows"]["customer"][0]["name"] == "Asha (HO)"
    assert shown["theirs"]["rows"]["customer"][0]["name"] == "Asha (store)"
    cli("conflicts", "resolve", str(cid), "--keep", "theirs", "--by", "maria", "--home", str(net.ho.cfg.home))
    sync(net, "ho", "s001", "ho", "s001")

    want = {"name": "Asha (store)", "phone": "777", "email": None}
    assert customer(net.ho) == customer(net.store("s001")) == want
    ho_log = conflicts_json(net.ho)["conflicts"]
    st_log = conflicts_json(net.store("s001"))["conflicts"]
    assert [(c["status"], c["kept"], c["resolved_by"]) for c in ho_log] == [("RESOLVED", "theirs", "maria")]
    assert [c["status"] for c in st_log] == ["RESOLVED"], "the store's held conflict is settled by the resolution"
    assert open_metric(net.ho) == 0 and open_metric(net.store("s001")) == 0
    # afterwards edits flow again without conflicts, both ways
    edit(net.store("s001"), email="a@example.com")
    sync(net, "s001", "ho")
    assert customer(net.ho) == {**want, "email": "a@example.com"}
    edit(net.ho, phone="778")
    sync(net, "ho", "s001")
    assert customer(net.store("s001")) == {**want, "email": "a@example.com", "phone": "778"}
    assert conflicts_json(net.ho)["open"] == {} and conflicts_json(net.store("s001"))["open"] == {}


def test_manual_resolved_at_the_store_keeping_ours(net: Net) -> None:
    edit(net.ho, name="Asha (HO)")
    edit(net.store("s001"), name="Asha (store)")
    sync(net, "s001", "ho", "s001", "ho")
    st = net.store("s001")
    cid = conflicts_json(st)["conflicts"][0]["id"]
    cli("conflicts", "resolve", str(cid), "--keep", "ours", "--home", str(st.cfg.home))
    sync(net, "s001", "ho", "s001")
    assert customer(net.ho) == customer(st) == {"name": "Asha (store)", "phone": "555", "email": None}
    assert conflicts_json(net.ho)["open"] == {} and conflicts_json(st)["open"] == {}


def test_a_bases_row_for_a_document_not_in_the_bundle_is_refused(net: Net) -> None:
    """The ``_bases`` table is read as hostile: a row for a document the events do not announce."""
    st = net.store("s001")
    edit(st, phone="600")

    def add_bases(tables: dict[str, Any]) -> None:
        tables[BASES_TABLE] = pa.table({
            "doc_type": ["customer"], "doc_key": ['["s001","C9"]'], "base": pa.array([0], pa.int64()),
            "changed_at": pa.array([0], pa.timestamp("us", tz="UTC"))})

    with net.ho.engine.connect() as conn:
        pos = conn.execute(select(xchg_stream_in.c.last_seq, xchg_stream_in.c.last_manifest_sha256).where(
            xchg_stream_in.c.peer == "s001")).one()
    forged = forge_bundle(st, "ho", docs_of(st, "customer", [KEY]), tables_hook=add_bases,
                          out_dir=net.ho.cfg.inbox, record=False, at=(int(pos[0]) + 1, pos[1]))
    res = json.loads(cli("import", "--json", "--home", str(net.ho.cfg.home), code=10).stdout)
    mine = [r for r in res if r["file"] == forged.name]
    assert mine and mine[0]["status"] == "QUARANTINED"
    assert "_bases table: customer" in mine[0]["reason"] and "C9" in mine[0]["reason"]
    assert customer(net.ho)["phone"] == "555"  # type: ignore[index]


def test_the_page_lists_conflicts_at_both_ends_and_resolves_one(net: Net) -> None:
    from test_ui import csrf_of, request, ui_server

    edit(net.ho, name="Asha (HO)")
    edit(net.store("s001"), name="Asha (store)")
    sync(net, "s001", "ho", "s001", "ho")
    st = net.store("s001")
    net.dispose()
    with ui_server(st.cfg.home) as ui:
        status, _h, html = request(ui.url, "/conflicts")
        assert status == 200 and 'data-status="OPEN"' in html
        assert "name=Asha (HO)" in html and "name=Asha (store)" in html
    with ui_server(net.ho.cfg.home) as ui:
        status, _h, html = request(ui.url, "/")
        assert 'href="/conflicts"' in html
        status, _h, html = request(ui.url, "/conflicts")
        cid = conflicts_json(net.ho)["conflicts"][0]["id"]
        assert f'id="keep-theirs-{cid}"' in html
        token = csrf_of(html)
        assert request(ui.url, "/conflicts/resolve", "POST", {"id": str(cid), "keep": "theirs"})[0] == 403
        status, headers, _ = request(ui.url, "/conflicts/resolve", "POST",
                                     {"csrf": token, "id": str(cid), "keep": "theirs"})
        assert status == 303 and headers["location"] == "/conflicts?notice=resolved"
        status, _h, html = request(ui.url, "/conflicts/resolve", "POST",
                                   {"csrf": token, "id": str(cid), "keep": "ours"})
        assert status == 409 and "not OPEN" in html
    sync(net, "ho", "s001")
    assert customer(net.ho) == customer(st) == {"name": "Asha (store)", "phone": "555", "email": None}
    with ui_server(st.cfg.home) as ui:
        html = request(ui.url, "/conflicts")[2]
        assert 'data-status="RESOLVED"' in html and 'data-status="OPEN"' not in html


def store_edits_a_price(net: Net) -> tuple[str, Any]:
    """s001's POS changes an item's price and records the change; both sync. Returns the item and the
    HO's price, which stands (never applied at the HO)."""
    from decimal import Decimal

    from enginehelpers import item_ids, prices

    item = item_ids(net)[0]
    ho_price = prices(net.ho, [item])[item]
    with net.store("s001").engine.begin() as conn:
        conn.execute(update(s.item).where(s.item.c.item_id == item).values(price=Decimal("0.01")))
        record_events(conn, "item", [(item,)])
    sync(net, "s001", "ho")
    assert prices(net.ho, [item])[item] == ho_price, "never applied at the HO"
    return item, ho_price


def test_a_price_edited_at_a_store_is_a_conflict_the_ho_wins(net: Net) -> None:
    """An item (HO master) changed at the store: not sent, not silently dropped; the HO's next price stands."""
    from decimal import Decimal

    from enginehelpers import prices, reprice

    st = net.store("s001")
    item, ho_price = store_edits_a_price(net)
    logged = conflicts_json(st)["conflicts"]
    assert [(c["doc_type"], c["doc_key"], c["peer"], c["policy"], c["status"], c["kept"]) for c in logged] == [
        ("item", [item], "ho", "ho-wins", "DECIDED", "theirs")]
    shown = json.loads(cli("conflicts", "show", str(logged[0]["id"]), "--json", "--home", str(st.cfg.home)).output)
    assert shown["ours"]["rows"]["item"][0]["price"] == "0.01", "the store's change is kept in the log"
    assert "owned by the ho side" in shown["note"]
    reprice(net.ho, [item], "1.00")  # the HO's next change replaces the store's
    sync(net, "ho", "s001")
    assert prices(st, [item])[item] == prices(net.ho, [item])[item] == ho_price + Decimal("1.00")
    assert len(conflicts_json(st)["conflicts"]) == 1 and conflicts_json(net.ho)["conflicts"] == []
    assert 'exchange_conflicts{doc_type="item",status="DECIDED"} 1.0' in render(make_registry(st)).decode()


def test_a_store_bundle_without_bases_is_held_not_applied(net: Net) -> None:
    """A format 2 sender (no ``_bases`` table): its change counts as based on nothing.

    The store had the HO's edit and changed the customer on top of it; with its
    base (format 3) that applies, without it the HO cannot tell, so it holds a
    conflict rather than overwrite its own edit.
    """
    st = net.store("s001")
    edit(net.ho, name="Asha (HO)")
    sync(net, "ho", "s001", "ho")
    assert customer(st)["name"] == "Asha (HO)"  # type: ignore[index]
    edit(st, phone="999")
    with net.ho.engine.connect() as conn:
        pos = conn.execute(select(xchg_stream_in.c.last_seq, xchg_stream_in.c.last_manifest_sha256).where(
            xchg_stream_in.c.peer == "s001")).one()
    forged = forge_bundle(st, "ho", docs_of(st, "customer", [KEY]), out_dir=net.ho.cfg.inbox, record=False,
                          at=(int(pos[0]) + 1, pos[1]))
    res = json.loads(cli("import", "--json", "--home", str(net.ho.cfg.home)).stdout)
    assert [r["status"] for r in res if r["file"] == forged.name] == ["APPLIED"]
    assert customer(net.ho)["phone"] == "555"  # type: ignore[index]
    held = conflicts_json(net.ho)["conflicts"]
    assert [(c["status"], c["theirs"]["base"]) for c in held] == [("OPEN", 0)]


def test_the_same_change_with_its_base_applies(net: Net) -> None:
    st = net.store("s001")
    edit(net.ho, name="Asha (HO)")
    sync(net, "ho", "s001", "ho")
    edit(st, phone="999")
    sync(net, "s001", "ho")
    assert customer(net.ho) == {"name": "Asha (HO)", "phone": "999", "email": None}
    assert conflicts_json(net.ho)["conflicts"] == []


def test_column_policies_merge_two_edits_of_different_columns(net: Net) -> None:
    """manual for the rest, but phone decided store-wins and email ho-wins: merged at both ends, none held."""
    for node in net.nodes:
        node.cfg.catalog = {"conflicts": {"customer": {"policy": "manual",
                                                       "columns": {"phone": "store-wins", "email": "ho-wins"}}}}
        node.cfg.save()
    net.reopen()
    edit(net.ho, email="asha@ho.example")
    edit(net.store("s001"), phone="777")
    sync(net, "s001", "ho", "s001", "ho", "s001")
    want = {"name": "Asha", "phone": "777", "email": "asha@ho.example"}
    assert customer(net.ho) == customer(net.store("s001")) == want
    logged = [c for nid in ("ho", "s001") for c in conflicts_json(net.node(nid))["conflicts"]]
    assert logged and all(c["status"] == "DECIDED" and c["kept"] == "merged" for c in logged)
    assert "phone from" in logged[0]["note"] and "email from" in logged[0]["note"]
    # a column without a policy of its own follows the type's (manual): held for a person
    edit(net.ho, name="Asha (HO)")
    edit(net.store("s001"), name="Asha (store)")
    sync(net, "s001", "ho", "s001", "ho")
    assert conflicts_json(net.ho)["open"] == {"customer": 1}
    assert customer(net.ho)["name"] == "Asha (HO)" and customer(net.store("s001"))["name"] == "Asha (store)"  # type: ignore[index]


@pytest.mark.parametrize("section, message", [
    ({"conflicts": {"customer": "coin-toss"}}, "customer must be one of"),
    ({"conflicts": {"item": "store-wins"}}, "edited by its owner only"),
    ({"conflicts": {"nosuch": "manual"}}, "unknown document type"),
    ({"conflicts": {"customer": {"columns": {"customer_id": "ho-wins"}}}}, "non-key column"),
    ({"conflicts": {"customer": {"columns": {"phone": "later"}}}}, "column phone: conflict must be"),
    ({"conflicts": {"customer": {"policy": "manual", "cols": {}}}}, "not cols"),
    ({"schema": "reference", "doc": [{"name": "item", "header": "item", "children": ["item_barcode"],
                                      "key": ["item_id"], "owner": "ho", "edit": "both"}]}, "store-owned"),
    ({"schema": "reference", "doc": [{"name": "customer", "key": ["store_id", "customer_id"], "owner": "store",
                                      "owner_columns": ["store_id"], "edit": "sometimes"}]}, "edit must be"),
])
def test_catalog_refuses_a_policy_it_cannot_apply(section: dict[str, Any], message: str) -> None:
    from exchange.database.catalog import catalog_from_config
    from exchange.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        catalog_from_config({"catalog": section})


def test_catalog_policies_as_written() -> None:
    from exchange.database.catalog import catalog_from_config, reference_catalog

    assert reference_catalog().get("customer").both_sides and reference_catalog().get("customer").conflict == "manual"
    cat = catalog_from_config({"catalog": {"conflicts": {"customer": {"policy": "newest-wins",
                                                                      "columns": {"email": "store-wins"}}}}})
    dt = cat.get("customer")
    assert (dt.conflict, dt.column_conflicts) == ("newest-wins", (("email", "store-wins"),))
    assert [d.name for d in cat.edited_by("ho")] == [*[d.name for d in cat.owned_by("ho")], "customer"]
    assert [d.name for d in cat.edited_by("store")] == [d.name for d in cat.owned_by("store")]


def test_a_base_this_node_never_sent_is_refused(net: Net) -> None:
    """A store claiming its change was made on top of an HO version it never got (to win every conflict)."""
    st = net.store("s001")
    edit(net.ho, name="Asha (HO)")
    sync(net, "ho")
    edit(st, name="Asha (store)")

    def claim(tables: dict[str, Any]) -> None:
        tables[BASES_TABLE] = pa.table({
            "doc_type": ["customer"], "doc_key": ['["s001","C1"]'], "base": pa.array([1 << 40], pa.int64()),
            "changed_at": pa.array([0], pa.timestamp("us", tz="UTC"))})

    with net.ho.engine.connect() as conn:
        pos = conn.execute(select(xchg_stream_in.c.last_seq, xchg_stream_in.c.last_manifest_sha256).where(
            xchg_stream_in.c.peer == "s001")).one()
    forged = forge_bundle(st, "ho", docs_of(st, "customer", [KEY]), tables_hook=claim, out_dir=net.ho.cfg.inbox,
                          record=False, at=(int(pos[0]) + 1, pos[1]))
    res = json.loads(cli("import", "--json", "--home", str(net.ho.cfg.home), code=10).stdout)
    mine = [r for r in res if r["file"] == forged.name]
    assert mine and mine[0]["status"] == "QUARANTINED" and "claims base version" in mine[0]["reason"]
    assert customer(net.ho)["name"] == "Asha (HO)"  # type: ignore[index]


def test_the_ho_may_send_a_store_only_its_own_customers(net: Net) -> None:
    st = net.store("s001")
    with net.ho.engine.begin() as conn:
        conn.execute(s.customer.insert().values(store_id="s002", customer_id="C7", name="Ravi",
                                                created_at=date(2024, 3, 2)))
    with st.engine.connect() as conn:
        pos = conn.execute(select(xchg_stream_in.c.last_seq, xchg_stream_in.c.last_manifest_sha256).where(
            xchg_stream_in.c.peer == "ho")).one()
    forged = forge_bundle(net.ho, "s001", docs_of(net.ho, "customer", [("s002", "C7")]), out_dir=st.cfg.inbox,
                          record=False, at=(int(pos[0]) + 1, pos[1]))
    res = json.loads(cli("import", "--json", "--home", str(st.cfg.home), code=21).stdout)
    mine = [r for r in res if r["file"] == forged.name]
    assert mine and mine[0]["status"] == "FAILED"
    assert "belongs to s002 (store_id), but this node is s001" in mine[0]["reason"]
    assert customer(st, ("s002", "C7")) is None


def test_newest_wins_does_not_trust_a_change_time_in_the_future(net: Net) -> None:
    """A store claiming its change was made in 2099 would win every newest-wins conflict: a tie instead."""
    set_policy(net, "newest-wins")
    st = net.store("s001")
    edit(st, name="Asha (store)")
    time.sleep(1.1)
    edit(net.ho, name="Asha (HO)")  # the later change
    sync(net, "ho")

    def future(tables: dict[str, Any]) -> None:
        tables[BASES_TABLE] = pa.table({
            "doc_type": ["customer"], "doc_key": ['["s001","C1"]'], "base": pa.array([0], pa.int64()),
            "changed_at": pa.array([4_070_908_800_000_000], pa.timestamp("us", tz="UTC"))})  # 2099-01-01

    with net.ho.engine.connect() as conn:
        pos = conn.execute(select(xchg_stream_in.c.last_seq, xchg_stream_in.c.last_manifest_sha256).where(
            xchg_stream_in.c.peer == "s001")).one()
    forged = forge_bundle(st, "ho", docs_of(st, "customer", [KEY]), tables_hook=future, out_dir=net.ho.cfg.inbox,
                          record=False, at=(int(pos[0]) + 1, pos[1]))
    res = json.loads(cli("import", "--json", "--home", str(net.ho.cfg.home)).stdout)
    assert [r["status"] for r in res if r["file"] == forged.name] == ["APPLIED"]
    assert customer(net.ho)["name"] == "Asha (HO)"  # type: ignore[index]
    [c] = conflicts_json(net.ho)["conflicts"]
    assert (c["kept"], c["theirs"]["changed_at"][:4]) == ("ours", "2099")
