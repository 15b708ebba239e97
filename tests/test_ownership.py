"""A store holding its own genuine keys can write nothing but its own documents at the HO.

Each attack is a bundle that store s001 seals and signs itself, with its real
key, from whatever it put in its own database: another store's customer, a
change or a delete of s002's bill, lines smuggled under s002's bill inside one
of its own, a table its events never announce, an HO master. It travels the
real way (``exchange sync`` of s001 pushes it to the transfer folder, ``exchange
sync`` of the HO pulls and imports it), and the oracle is the same for every
case: the HO's business tables are exactly as before, the bundle is FAILED at
the HO with a reason naming the document, the claimed owner and the sender, and
s001 sees it REJECTED with that reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import CliRunner
from enginehelpers import Net, docs_of, forge_bundle, make_net, seed_ho, seed_store, snapshot
from sqlalchemy import Column, MetaData, String, Table, create_engine, select, update

from exchange.cli import main
from exchange.database import rows
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.catalog import Catalog, DocType, Route, catalog_from_config
from exchange.database.tables import xchg_doc_version
from exchange.errors import ConfigError, OwnershipError
from exchange.receive import admission

BUSINESS = sorted(s.RETAIL.tables)


def business(node: Any) -> dict[str, Any]:
    snap = snapshot(node)
    return {t: snap[t] for t in BUSINESS}


def cli(*args: str) -> Any:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HO with both stores' documents applied (s002's customer C1 and its bills), built once."""
    root = tmp_path_factory.mktemp("own") / "net"
    net = make_net(root, stores=("s001", "s002"))
    seed_ho(net, items=5)
    net.settle()
    seed_store(net, "s002", sales=3, seed=2)
    seed_store(net, "s001", sales=2, seed=1)
    with net.store("s002").engine.begin() as conn:
        conn.execute(s.customer.insert().values(store_id="s002", customer_id="C1", name="Asha",
                                                phone="555", created_at=date(2024, 3, 1)))
        record_events(conn, "customer", [("s002", "C1")])
    net.settle()
    net.dispose()
    return root


@pytest.fixture
def net(template: Path, tmp_path: Path) -> Iterator[Net]:
    """A private copy of the template net (homes hold absolute paths: rewritten)."""
    import shutil

    from exchange.node.home import Node

    root = tmp_path / "net"
    shutil.copytree(template, root, symlinks=True)
    for toml in root.glob("*/exchange.toml"):
        toml.write_text(toml.read_text().replace(str(template), str(root)))
    homes = {p.parent.name: Node.open(p.parent) for p in root.glob("*/exchange.toml")}
    n = Net(root, root / "transfer", homes["ho"], {k: v for k, v in homes.items() if k != "ho"})
    yield n
    n.dispose()


def _bill_of(node: Any, store: str) -> str:
    with node.engine.connect() as conn:
        return str(conn.execute(select(s.sales_bill.c.bill_no).where(s.sales_bill.c.store_id == store)
                                .order_by(s.sales_bill.c.bill_no)).scalars().first())


def _copy_rows(src: Any, dst: Any, table: Table, **where: str) -> None:
    """Put rows of the HO's database into the rogue store's own database (it can write anything there)."""
    with src.engine.connect() as conn:
        cond = [table.c[k] == v for k, v in where.items()]
        found = [dict(r) for r in conn.execute(select(table).where(*cond)).mappings()]
    with dst.engine.begin() as conn:
        for r in found:
            conn.execute(table.insert().values(**r))


# ---------------------------------------------------------------- the attacks: each returns the forged file


def another_stores_new_customer(net: Net) -> tuple[Path, str]:
    rogue = net.store("s001")
    with rogue.engine.begin() as conn:
        conn.execute(s.customer.insert().values(store_id="s002", customer_id="C9", name="planted",
                                                created_at=date(2024, 3, 1)))
    return forge_bundle(rogue, "ho", docs_of(rogue, "customer", [("s002", "C9")]) + _own(rogue)), \
        "customer s002/C9 belongs to s002 (store_id), but the bundle was signed by s001"


def another_stores_customer_changed(net: Net) -> tuple[Path, str]:
    rogue = net.store("s001")
    with rogue.engine.begin() as conn:
        conn.execute(s.customer.insert().values(store_id="s002", customer_id="C1", name="overwritten",
                                                phone="000", created_at=date(2024, 3, 1)))
    docs = docs_of(rogue, "customer", [("s002", "C1")])
    return forge_bundle(rogue, "ho", [(t, k, op, 10**9) for t, k, op, _v in docs]), \
        "customer s002/C1 belongs to s002 (store_id), but the bundle was signed by s001"


def another_stores_bill_deleted(net: Net) -> tuple[Path, str]:
    rogue = net.store("s001")
    bill = _bill_of(net.ho, "s002")
    return forge_bundle(rogue, "ho", [("sales_bill", rows.canonical_key(("s002", bill)), "D", 10**9)]), \
        f"sales_bill s002/{bill} belongs to s002 (store_id), but the bundle was signed by s001"


def lines_smuggled_under_another_stores_bill(net: Net) -> tuple[Path, str]:
    """s001 announces its own bill; the line table also carries a line of s002's bill."""
    rogue = net.store("s001")
    own = _bill_of(rogue, "s001")
    victim = _bill_of(net.ho, "s002")

    def smuggle(tables: dict[str, Any]) -> None:
        lines = tables["sales_bill_line"]
        extra = lines.slice(0, 1).to_pylist()[0] | {"bill_no": victim, "store_id": "s002", "line_no": 99}
        tables["sales_bill_line"] = pa.concat_tables([lines, pa.Table.from_pylist([extra], lines.schema)])

    return forge_bundle(rogue, "ho", docs_of(rogue, "sales_bill", [("s001", own)]), tables_hook=smuggle,
                        summary_hook=_recount), \
        f"table sales_bill_line holds rows of sales_bill s002/{victim}, which the bundle's events do not announce"


def a_table_no_event_announces(net: Net) -> tuple[Path, str]:
    """s001 announces one of its bills and adds a customer table carrying s002's customer."""
    rogue = net.store("s001")
    own = _bill_of(rogue, "s001")

    def add_table(tables: dict[str, Any]) -> None:
        tables["customer"] = pa.Table.from_pylist(
            [{"store_id": "s002", "customer_id": "C1", "name": "overwritten", "phone": None, "email": None,
              "created_at": datetime(2024, 3, 1)}], rows.arrow_schema(s.customer))

    return forge_bundle(rogue, "ho", docs_of(rogue, "sales_bill", [("s001", own)]), tables_hook=add_table), \
        "the bundle carries table customer, but its events announce no customer documents"


def an_ho_master(net: Net) -> tuple[Path, str]:
    rogue = net.store("s001")
    with rogue.engine.connect() as conn:
        item = str(conn.execute(select(s.item.c.item_id)).scalars().first())
    return forge_bundle(rogue, "ho", docs_of(rogue, "item", [(item,)])), \
        "item documents are owned by the ho side; s001 (store) may not send them"


def _own(rogue: Any) -> list[tuple[str, str, str, int]]:
    """One genuine document of the rogue store, so the forged bundle also carries something legitimate."""
    return docs_of(rogue, "sales_bill", [("s001", _bill_of(rogue, "s001"))])


def _recount(summary: dict[str, Any]) -> None:
    summary["documents"]["sales_bill"]["rows"]["sales_bill_line"] += 1


ATTACKS: dict[str, Callable[[Net], tuple[Path, str]]] = {f.__name__: f for f in (
    another_stores_new_customer, another_stores_customer_changed, another_stores_bill_deleted,
    lines_smuggled_under_another_stores_bill, a_table_no_event_announces, an_ho_master)}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_store_cannot_write_what_it_does_not_own(net: Net, attack: str) -> None:
    ho_home, rogue_home = str(net.ho.cfg.home), str(net.store("s001").cfg.home)
    before = business(net.ho)
    forged, reason = ATTACKS[attack](net)
    assert cli("sync", "--home", rogue_home).exit_code == 0  # s001 pushes its bundle the usual way
    assert cli("sync", "--home", ho_home).exit_code == 21  # FAILED, a REJECTED ack: cron sees it
    net.reopen()
    assert business(net.ho) == before, "nothing of the bundle was applied at the HO"
    got = json.loads(cli("status", "received", "--home", ho_home, "--json").output)
    row = next(r for r in got["bundles"] if r["file"] == forged.name)
    assert row["status"] == "FAILED"
    assert reason in row["reason"], row["reason"]
    assert cli("sync", "--home", rogue_home).exit_code == 21  # the REJECTED ack comes back: exit 21
    sent = json.loads(cli("status", "sent", "--home", rogue_home, "--json").output)
    mine = next(r for r in sent["bundles"] if r["file"] == forged.name)
    assert mine["status"] == "REJECTED" and reason in mine["reason"]
    # the victim's stream is untouched: s002's next genuine change still applies
    victim = net.store("s002")
    with victim.engine.begin() as conn:
        conn.execute(update(s.customer).where(s.customer.c.customer_id == "C1").values(name="Asha K"))
        record_events(conn, "customer", [("s002", "C1")])
    assert cli("sync", "--home", str(victim.cfg.home)).exit_code == 0
    # s002's change applies; s001's FAILED bundle still blocks its stream: every sync says so (21)
    assert cli("sync", "--home", ho_home).exit_code == 21
    with net.ho.engine.connect() as conn:
        assert conn.execute(select(s.customer.c.name).where(s.customer.c.store_id == "s002",
                                                            s.customer.c.customer_id == "C1")).scalar() == "Asha K"


def test_versions_are_kept_per_sender(net: Net) -> None:
    """What the HO records as applied is keyed by the store that sent it."""
    with net.ho.engine.connect() as conn:
        found = conn.execute(select(xchg_doc_version.c.peer, xchg_doc_version.c.doc_key)
                             .where(xchg_doc_version.c.doc_type == "customer")).all()
    assert found and all(json.loads(k)[0] == p for p, k in found)


# ---------------------------------------------------------------- owner columns outside the key

def test_an_owner_column_outside_the_key_is_checked_in_the_rows_held(tmp_path: Path) -> None:
    """A site's catalog whose key does not name the store: the rows sent and the rows held both count."""
    meta = MetaData()
    receipt = Table("receipt", meta, Column("rcpt_no", String(16), primary_key=True),
                    Column("store", String(32), nullable=False))
    dt = DocType("receipt", "receipt", (), ("rcpt_no",), "store", Route("ho"), (), ("store",))
    cat = Catalog(meta, [dt])
    engine = create_engine(f"sqlite:///{tmp_path / 'ho.db'}")
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(receipt.insert().values(rcpt_no="R1", store="s002"))
        key = rows.canonical_key(("R1",))
        mine = pa.table({"rcpt_no": ["R1"], "store": ["s001"]})
        with pytest.raises(OwnershipError, match=r"receipt R1 as held here belongs to s002 \(store\), "
                                                 r"but the bundle was signed by s001"):
            admission.check_owner(conn, cat, dt, "s001", [(key, "U", 5)], mine)
        with pytest.raises(OwnershipError, match="as held here belongs to s002"):
            admission.check_owner(conn, cat, dt, "s001", [(key, "D", 5)], None)
        theirs = pa.table({"rcpt_no": ["R2"], "store": ["s002"]})
        with pytest.raises(OwnershipError, match=r"receipt R2 belongs to s002 \(store\)"):
            admission.check_owner(conn, cat, dt, "s001", [(rows.canonical_key(("R2",)), "U", 5)], theirs)
        admission.check_owner(conn, cat, dt, "s002", [(key, "U", 5)], pa.table({"rcpt_no": ["R1"],
                                                                                "store": ["s002"]}))
    engine.dispose()


def test_a_store_sent_type_without_an_owner_column_is_refused_at_start_up(tmp_path: Path) -> None:
    cfg = {"catalog": {"schema": "reference", "doc": [
        {"name": "customer", "header": "customer", "key": ["store_id", "customer_id"], "owner": "store"}]}}
    with pytest.raises(ConfigError) as err:
        catalog_from_config(cfg)
    assert "must name the column(s) holding its owner's store id" in err.value.message
    assert 'owner_columns = ["store_id"]' in err.value.hint
    cfg["catalog"]["doc"][0]["owner_columns"] = ["store_id"]
    assert catalog_from_config(cfg).get("customer").owner_columns == ("store_id",)
    cfg["catalog"]["doc"][0]["owner_columns"] = ["nope"]
    with pytest.raises(ConfigError, match="owner column\\(s\\) nope missing"):
        catalog_from_config(cfg)


def test_the_reference_catalog_names_every_store_documents_owner() -> None:
    from exchange.database.catalog import reference_catalog

    cat = reference_catalog()
    assert {d.name: d.owner_columns for d in cat.owned_by("store")} == {
        "customer": ("store_id",), "sales_bill": ("store_id",), "grc": ("store_id",), "grt": ("store_id",)}
