"""The reference retail schema, exact money, the document catalog and the demo data."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import (
    Column, Engine, ForeignKeyConstraint, Integer, MetaData, Numeric, String, Table, create_engine,
    func, insert, select, text,
)

from exchange.database import schema as s
from exchange.database.catalog import (
    Catalog, DocType, PeerInfo, Route, catalog_from_config, reference_catalog,
)
from exchange.database.tables import make_engine, migrate, xchg_event
from exchange.demo.data import ean13, seed_masters, seed_store_activity
from exchange.errors import ConfigError

ITEM = dict(name="Rice 1 kg", category="GROCERY", uom="EA", tax_rate=Decimal("5"),
            updated_at=dt.datetime(2024, 1, 1, 9, 0))


@pytest.fixture
def retail_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    migrate(engine)
    with engine.begin() as conn:
        s.RETAIL.create_all(conn)
    yield engine
    engine.dispose()


# --- schema ------------------------------------------------------------------------------


def test_every_child_carries_header_key_line_no_and_cascading_fk() -> None:
    catalog = reference_catalog()
    for doc in catalog:
        header = catalog.table(doc.header)
        assert [c.name for c in header.primary_key.columns] == list(doc.key)
        for child_name in doc.children:
            child = catalog.table(child_name)
            assert [c.name for c in child.primary_key.columns] == [*doc.key, "line_no"]
            to_header = [fk for fk in child.constraints if isinstance(fk, ForeignKeyConstraint)
                         and fk.referred_table is header]
            assert len(to_header) == 1, child_name
            assert to_header[0].ondelete == "CASCADE"
            assert [c.name for c in to_header[0].columns] == list(doc.key)
        for table in doc.tables():
            for key in doc.key:
                key_type = catalog.table(table).c[key].type
                assert isinstance(key_type, String) and key_type.length == 32


def test_scale_of() -> None:
    assert s.scale_of(s.item.c.price) == 2
    assert s.scale_of(s.sales_bill_line.c.qty) == 3
    assert s.scale_of(s.item.c.tax_rate) == 2
    assert s.scale_of(s.item.c.name) is None
    assert s.scale_of(s.item.c.updated_at) is None
    assert s.scale_of(Column("x", Numeric(10, 2))) is None


def test_minor_unit_conversion_is_exact_and_rounds_like_postgresql() -> None:
    assert s.to_minor(Decimal("1.25"), 2) == 125
    assert s.to_minor(0.1, 2) == 10            # a float means its repr, not its binary expansion
    assert s.to_minor("-0.005", 2) == -1       # half away from zero, as NUMERIC does
    assert s.to_minor(Decimal("0.0005"), 3) == 1
    assert s.from_minor(10, 2) == Decimal("0.10") and str(s.from_minor(10, 2)) == "0.10"
    assert str(s.from_minor(-1500, 3)) == "-1.500"
    for bad in (True, float("nan"), Decimal("Infinity"), "abc", object()):
        with pytest.raises(ValueError):
            s.to_minor(bad, 2)
    with pytest.raises(ValueError, match="does not fit"):
        s.to_minor(Decimal("1000000000000"), 2, 14)
    assert s.to_minor(Decimal("999999999999.99"), 2, 14) == 99999999999999


@given(st.decimals(min_value=Decimal("-999999999999.99"), max_value=Decimal("999999999999.99"), places=2))
def test_minor_units_round_trip(value: Decimal) -> None:
    assert s.from_minor(s.to_minor(value, 2, 14), 2) == value


def test_money_round_trips_exactly(retail_engine: Engine) -> None:
    dime = Decimal("0.10")
    with retail_engine.begin() as conn:
        conn.execute(insert(s.item), [dict(ITEM, item_id=f"I{i}", price=dime) for i in range(3)])
        total = conn.execute(select(func.sum(s.item.c.price))).scalar_one()
        assert total == dime * 3 == Decimal("0.30")
        assert str(total) == "0.30"
        prices = conn.execute(select(s.item.c.price, s.item.c.tax_rate)).all()
        assert all(p == (Decimal("0.10"), Decimal("5.00")) and str(p[0]) == "0.10" for p in prices)
        # Comparisons bind through the type too.
        assert conn.execute(select(func.count()).where(s.item.c.price == Decimal("0.1"))).scalar() == 3
        # Large values and quantities keep every digit.
        conn.execute(insert(s.transfer_order).values(
            to_id="T1", dest_store="s1", order_date=dt.date(2024, 1, 1), status="NEW",
            total_value=Decimal("999999999999.99")))
        conn.execute(insert(s.transfer_order_line), [
            dict(to_id="T1", line_no=n, item_id="I0", qty=Decimal("0.001"), unit_cost=Decimal("0.01"))
            for n in range(1, 11)])
        assert conn.execute(select(s.transfer_order.c.total_value)).scalar() == Decimal("999999999999.99")
        assert conn.execute(select(func.sum(s.transfer_order_line.c.qty))).scalar() == Decimal("0.010")
        if retail_engine.dialect.name == "sqlite":
            # SQLite never holds a float: minor units, as integers.
            kinds = conn.execute(text("SELECT DISTINCT typeof(price), typeof(tax_rate) FROM item")).all()
            assert kinds == [("integer", "integer")]
            assert conn.execute(text("SELECT price FROM item LIMIT 1")).scalar() == 10
            assert conn.execute(text("SELECT qty FROM transfer_order_line LIMIT 1")).scalar() == 1


def test_money_rejects_what_numeric_would_reject(retail_engine: Engine) -> None:
    with retail_engine.connect() as conn:
        with pytest.raises(Exception, match="does not fit"):
            conn.execute(insert(s.item).values(dict(ITEM, item_id="X", price=Decimal("1e13"))))


# --- routes and catalog ------------------------------------------------------------------

PEERS = [
    PeerInfo("ho", "ho"),
    PeerInfo("s1", "store", ("north",)),
    PeerInfo("s2", "store", ("north", "mall")),
    PeerInfo("s3", "store", ()),
]


def test_route_targets_each_kind() -> None:
    assert Route("all").targets({}, PEERS) == ["s1", "s2", "s3"]
    assert Route("ho").targets({"store_id": "s1"}, PEERS) == ["ho"]
    group = Route("group", "store_group")
    assert group.targets({"store_group": "north"}, PEERS) == ["s1", "s2"]
    assert group.targets({"store_group": "mall"}, PEERS) == ["s2"]
    assert group.targets({"store_group": None}, PEERS) == ["s1", "s2", "s3"]  # NULL: every store
    assert group.targets({"store_group": "nobody"}, PEERS) == []
    column = Route("column", "dest_store")
    assert column.targets({"dest_store": "s3"}, PEERS) == ["s3"]
    assert column.targets({"dest_store": "ho"}, PEERS) == []   # only stores receive routed documents
    assert column.targets({"dest_store": "s9"}, PEERS) == []
    assert column.targets({"dest_store": None}, PEERS) == []
    with pytest.raises(ConfigError, match="dest_store"):
        column.targets({"store_id": "s1"}, PEERS)


def test_reference_catalog_routes() -> None:
    catalog = reference_catalog()
    routes = {d.name: str(d.route) for d in catalog}
    assert routes == {
        "item": "all", "promotion": "group:store_group", "transfer_order": "column:dest_store",
        "sales_order": "column:store_id", "sales_invoice": "column:store_id", "audit_plan": "column:store_id",
        "customer": "ho", "sales_bill": "ho", "grc": "ho", "grt": "ho"}
    assert catalog.get("item").route.targets({"item_id": "I1"}, PEERS) == ["s1", "s2", "s3"]
    assert catalog.get("promotion").route.targets({"store_group": "mall"}, PEERS) == ["s2"]
    assert catalog.get("transfer_order").route.targets({"dest_store": "s1"}, PEERS) == ["s1"]
    assert catalog.get("audit_plan").route.targets({"store_id": "s2"}, PEERS) == ["s2"]
    assert catalog.get("sales_bill").route.targets({"store_id": "s2"}, PEERS) == ["ho"]


def test_reference_catalog_shape() -> None:
    catalog = reference_catalog()
    assert catalog.names[0] == "item"      # masters first: later documents reference items
    assert [d.name for d in catalog.owned_by("ho")] == [
        "item", "promotion", "transfer_order", "sales_order", "sales_invoice", "audit_plan"]
    assert [d.name for d in catalog.owned_by("store")] == ["customer", "sales_bill", "grc", "grt"]
    bill = catalog.get("sales_bill")
    assert bill.tables() == ("sales_bill", "sales_bill_line", "sales_bill_payment")
    assert bill.key == ("store_id", "bill_no")
    assert "sales_bill_payment.amount" in bill.totals
    assert catalog.table("grc_line") is s.grc_line
    assert catalog.doc_for_table("grc_line") is catalog.get("grc")
    assert catalog.doc_for_table("xchg_event") is None
    covered = {t for d in catalog for t in d.tables()}
    assert covered == set(s.RETAIL.tables)


def test_unknown_document_type_lists_known() -> None:
    with pytest.raises(ConfigError, match=r"unknown document type 'items' \(known: item, promotion, "):
        reference_catalog().get("items")


def _meta() -> MetaData:
    md = MetaData()
    Table("h", md, Column("k", String(32), primary_key=True), Column("store", String(32)),
          Column("amt", Numeric(14, 2)))
    Table("c", md, Column("k", String(32), primary_key=True), Column("line_no", Integer, primary_key=True),
          Column("qty", Numeric(14, 3)))
    Table("c2", md, Column("other", String(32)), Column("line_no", Integer))
    return md


def _doc(**kw: object) -> DocType:
    base: dict[str, object] = dict(name="d", header="h", children=("c",), key=("k",), owner="ho",
                                   route=Route("all"), totals=("h.amt", "c.qty"))
    base.update(kw)
    return DocType(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "message"), [
    (dict(header="nope"), "document type 'd': table 'nope' does not exist (tables: c, c2, h)"),
    (dict(children=("c", "zz")), "table 'zz' does not exist"),
    (dict(children=("c2",)), "key column(s) k missing from table 'c2'"),
    (dict(key=("k", "x")), "key column(s) x missing from table 'h'"),
    (dict(key=()), "key must name at least one column"),
    (dict(totals=("c.nope",)), "total 'c.nope': table 'c' has no column 'nope'"),
    (dict(totals=("amt",)), "must be written \"table.column\""),
    (dict(totals=("c2.other",)), "names table 'c2', not one of the document's tables"),
    (dict(route=Route("column", "dest")), "route column:dest names column 'dest', absent from header"),
    (dict(owner="store"), "a store-owned document goes to the HO"),
    (dict(route=Route("ho")), "an HO-owned document cannot be routed to the HO"),
    (dict(owner="hq"), "owner must be"),
    (dict(children=("c", "c")), "listed twice"),
])
def test_catalog_validation_errors_are_clear(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Catalog(_meta(), [_doc(**kw)])
    assert message in str(info.value), str(info.value)


def test_catalog_rejects_duplicates() -> None:
    md = _meta()
    with pytest.raises(ConfigError, match="'d' is defined twice"):
        Catalog(md, [_doc(), _doc(children=(), totals=())])
    with pytest.raises(ConfigError, match="table 'h' belongs to document types 'd' and 'e'"):
        Catalog(md, [_doc(), _doc(name="e", children=(), totals=())])
    assert Catalog(md, [_doc()]).names == ["d"]


def test_route_parse_and_errors() -> None:
    assert Route.parse("all") == Route("all")
    assert Route.parse("group:store_group") == Route("group", "store_group")
    assert Route.parse(" column:dest_store ") == Route("column", "dest_store")
    assert str(Route.parse("column:dest_store")) == "column:dest_store"
    with pytest.raises(ConfigError, match="unknown route 'stores'"):
        Route.parse("stores")
    with pytest.raises(ConfigError, match="needs a column"):
        Route.parse("column")
    with pytest.raises(ConfigError, match="takes no column"):
        Route.parse("all:x")
    with pytest.raises(ConfigError, match="unknown route kind"):
        Route("everyone")  # type: ignore[arg-type]


# --- catalog from exchange.toml ----------------------------------------------------------

POS_DOCS = {"catalog": {"doc": [
    {"name": "article", "header": "pos_article", "children": ["pos_article_ean"], "key": ["art_no"],
     "owner": "ho", "totals": ["pos_article.price"]},
    {"name": "receipt", "header": "pos_receipt", "children": ["pos_receipt_line"], "key": ["till", "rcpt_no"],
     "owner": "store", "owner_columns": ["store_id"], "totals": ["pos_receipt_line.amount"]},
    {"name": "delivery", "header": "pos_delivery", "key": ["dlv_no"], "owner": "ho", "route": "column:shop"},
]}}


def _pos_engine(path: str) -> Engine:
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        for ddl in (
            "CREATE TABLE pos_article (art_no TEXT PRIMARY KEY, price NUMERIC(10,2))",
            "CREATE TABLE pos_article_ean (art_no TEXT REFERENCES pos_article ON DELETE CASCADE, "
            "line_no INT, ean TEXT, PRIMARY KEY (art_no, line_no))",
            "CREATE TABLE pos_receipt (till TEXT, rcpt_no TEXT, store_id TEXT, PRIMARY KEY (till, rcpt_no))",
            "CREATE TABLE pos_receipt_line (till TEXT, rcpt_no TEXT, line_no INT, amount NUMERIC(10,2))",
            "CREATE TABLE pos_delivery (dlv_no TEXT PRIMARY KEY, shop TEXT)",
        ):
            conn.exec_driver_sql(ddl)
    return engine


def test_catalog_from_config_defaults_to_reference() -> None:
    assert catalog_from_config({}).names == reference_catalog().names
    assert catalog_from_config({"catalog": {"schema": "reference"}}).metadata is s.RETAIL


def test_catalog_from_config_reflects_site_tables(tmp_path: object) -> None:
    engine = _pos_engine(f"{tmp_path}/pos.db")
    catalog = catalog_from_config(POS_DOCS, reflect_from=engine)
    assert catalog.names == ["article", "receipt", "delivery"]
    receipt = catalog.get("receipt")
    assert receipt.route == Route("ho") and receipt.key == ("till", "rcpt_no")
    assert catalog.get("article").route == Route("all")
    assert catalog.get("delivery").route.targets({"shop": "s3"}, PEERS) == ["s3"]
    assert set(catalog.table("pos_receipt_line").c.keys()) == {"till", "rcpt_no", "line_no", "amount"}
    # The [catalog] table itself is accepted as well as a whole config.
    assert catalog_from_config(POS_DOCS["catalog"], reflect_from=engine).names == catalog.names


def test_catalog_from_config_subset_of_reference() -> None:
    cfg = {"schema": "reference", "doc": [
        {"name": "item", "children": ["item_barcode"], "key": ["item_id"], "owner": "ho"}]}
    catalog = catalog_from_config(cfg)
    assert catalog.names == ["item"] and catalog.get("item").header == "item"


@pytest.mark.parametrize(("cfg", "message"), [
    ({"catalog": {"schema": "custom"}}, "schema must be \"reference\" or \"database\""),
    ({"catalog": {"tables": []}}, "unknown setting(s) tables"),
    ({"catalog": {"doc": {"name": "x"}}}, "write [[catalog.doc]]"),
    ({"catalog": {"schema": "database"}}, "needs at least one [[catalog.doc]]"),
    ({"catalog": {"doc": [{"key": ["a"], "owner": "ho"}]}}, "#1 needs name"),
    ({"catalog": {"doc": [{"name": "x", "owner": "ho"}]}}, "'x' needs key"),
    ({"catalog": {"doc": [{"name": "x", "key": ["a"]}]}}, "owner must be \"ho\" or \"store\""),
    ({"catalog": {"doc": [{"name": "x", "key": "a", "owner": "ho", "rout": "all"}]}}, "unknown setting(s) rout"),
    ({"catalog": {"doc": [{"name": "x", "key": ["a"], "owner": "ho", "route": "shop"}]}}, "unknown route 'shop'"),
    ({"catalog": {"doc": [{"name": "x", "key": [1], "owner": "ho"}]}}, "key must be a list of names"),
])
def test_catalog_from_config_errors(cfg: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        catalog_from_config(cfg)
    assert message in str(info.value), str(info.value)


def test_catalog_from_config_needs_database_and_tables(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="no database was given"):
        catalog_from_config(POS_DOCS)
    engine = create_engine(f"sqlite:///{tmp_path}/empty.db")
    with pytest.raises(ConfigError, match="pos_article"):
        catalog_from_config(POS_DOCS, reflect_from=engine)


# --- demo data ---------------------------------------------------------------------------


def test_ean13_check_digit() -> None:
    assert ean13("400638133393") == "4006381333931"
    assert ean13("501234567890") == "5012345678900"


def test_demo_data_is_fk_consistent_and_balanced(retail_engine: Engine) -> None:
    stores = ["s1", "s2", "s3"]
    with retail_engine.begin() as conn:
        masters = seed_masters(conn, 40, stores, {"s1": "north", "s2": "north"}, seed=7)
        items = [k[0] for k in masters["item"]]
        activity = seed_store_activity(conn, "s1", items, 200, seed=7)
        more = seed_store_activity(conn, "s1", items, 10, seed=8)   # numbering continues
        other = seed_store_activity(conn, "s2", items[:5], 10, seed=7)

    assert len(masters["item"]) == 40 and len(masters["promotion"]) == 2
    for doc in ("transfer_order", "audit_plan", "sales_order", "sales_invoice"):
        assert len(masters[doc]) == 3
    assert len(activity["sales_bill"]) == 200 and len(activity["customer"]) == 10
    assert not set(activity["sales_bill"]) & set(more["sales_bill"])
    assert activity["grc"] != more["grc"]
    assert all(k[0] == "s2" for k in other["sales_bill"])

    with retail_engine.connect() as conn:
        def one(sql: str) -> object:
            return conn.execute(text(sql)).scalar()

        # Every document's rows exist, and nothing dangles (PostgreSQL and SQLite both enforce the FKs;
        # these queries prove it independently of the pragma).
        for child, parent, cols in [
            ("sales_bill_line", "sales_bill", ("store_id", "bill_no")),
            ("sales_bill_payment", "sales_bill", ("store_id", "bill_no")),
            ("grc_line", "grc", ("store_id", "grc_no")), ("grt_line", "grt", ("store_id", "grt_no")),
            ("transfer_order_line", "transfer_order", ("to_id",)), ("item_barcode", "item", ("item_id",)),
            ("promotion_item", "promotion", ("promo_id",)), ("audit_plan_line", "audit_plan", ("plan_id",)),
            ("sales_order_line", "sales_order", ("so_id",)),
            ("sales_invoice_line", "sales_invoice", ("invoice_id",)),
        ]:
            on = " AND ".join(f"p.{c} = c.{c}" for c in cols)
            assert one(f"SELECT count(*) FROM {child} c LEFT JOIN {parent} p ON {on} "
                       f"WHERE p.{cols[0]} IS NULL") == 0, child
            assert one(f"SELECT count(*) FROM {parent} p WHERE NOT EXISTS "
                       f"(SELECT 1 FROM {child} c WHERE {on})") == 0, parent
            if "item_id" in s.RETAIL.tables[child].c and child != "item_barcode":
                assert one(f"SELECT count(*) FROM {child} c LEFT JOIN item i ON i.item_id = c.item_id "
                           "WHERE i.item_id IS NULL") == 0, child
        # The GRC receives the store's transfer order, line for line.
        grc = conn.execute(select(s.grc.c.grc_no, s.grc.c.to_id).where(s.grc.c.store_id == "s1")
                           .order_by(s.grc.c.grc_no)).all()
        assert [g.to_id for g in grc] == ["TO0000001", "TO0000001"]
        grc_qty = conn.execute(select(func.sum(s.grc_line.c.qty)).where(
            s.grc_line.c.store_id == "s1", s.grc_line.c.grc_no == grc[0].grc_no)).scalar()
        to_qty = conn.execute(select(func.sum(s.transfer_order_line.c.qty))
                              .where(s.transfer_order_line.c.to_id == "TO0000001")).scalar()
        assert grc_qty == to_qty
        assert one("SELECT count(*) FROM transfer_order WHERE dest_store NOT IN ('s1','s2','s3')") == 0
        groups = conn.execute(select(s.promotion.c.store_group).order_by(s.promotion.c.promo_id)).scalars().all()
        assert groups == [None, "north"]
        # Bill customers exist at their store.
        assert one("SELECT count(*) FROM sales_bill b WHERE b.customer_id IS NOT NULL AND NOT EXISTS "
                   "(SELECT 1 FROM customer c WHERE c.store_id = b.store_id AND c.customer_id = b.customer_id)") == 0
        # Totals balance exactly: header = sum(lines), payments = total.
        bills = {(b.store_id, b.bill_no): (b.total, b.tax) for b in conn.execute(select(s.sales_bill))}
        lines: dict[tuple[str, str], list[Decimal]] = {}
        for ln in conn.execute(select(s.sales_bill_line)):
            acc = lines.setdefault((ln.store_id, ln.bill_no), [Decimal(0), Decimal(0)])
            assert ln.amount == (ln.qty * ln.price).quantize(Decimal("0.01"), rounding="ROUND_HALF_UP")
            acc[0] += ln.amount + ln.tax
            acc[1] += ln.tax
        paid: dict[tuple[str, str], Decimal] = {}
        for p in conn.execute(select(s.sales_bill_payment)):
            paid[(p.store_id, p.bill_no)] = paid.get((p.store_id, p.bill_no), Decimal(0)) + p.amount
        assert len(bills) == 220
        for key, (total, tax) in bills.items():
            assert lines[key] == [total, tax]
            assert paid[key] == total
        to_total = conn.execute(select(s.transfer_order.c.total_value).where(
            s.transfer_order.c.to_id == "TO0000001")).scalar()
        to_lines = sum(((r.qty * r.unit_cost).quantize(Decimal("0.01"), rounding="ROUND_HALF_UP") for r in
                        conn.execute(select(s.transfer_order_line).where(
                            s.transfer_order_line.c.to_id == "TO0000001"))), Decimal(0))
        assert to_total == to_lines
        # One event per document, recorded in the same transaction.
        n_docs = sum(len(v) for d in (masters, activity, more, other) for v in d.values())
        assert conn.execute(select(func.count()).select_from(xchg_event)).scalar() == n_docs
        assert one("SELECT count(DISTINCT doc_type) FROM xchg_event") == 10


def test_demo_data_is_deterministic(tmp_path: object) -> None:
    dumps = []
    for name in ("a", "b"):
        engine = make_engine(f"sqlite:///{tmp_path}/{name}.db")
        migrate(engine)
        with engine.begin() as conn:
            s.RETAIL.create_all(conn)
            keys = seed_masters(conn, 20, ["s1", "s2"], {"s1": "g"}, seed=3)
            seed_store_activity(conn, "s1", [k[0] for k in keys["item"]], 30, seed=3)
        with engine.connect() as conn:
            dumps.append({t.name: conn.execute(select(t).order_by(*t.primary_key.columns)).all()
                          for t in s.RETAIL.sorted_tables})
        engine.dispose()
    assert dumps[0] == dumps[1]
    assert len(dumps[0]["sales_bill"]) == 30


def test_demo_sale_of_unknown_item_fails_on_fk(retail_engine: Engine) -> None:
    """The sales-bill -> item FK is what makes such a document fail to apply (and be parked)."""
    with retail_engine.connect() as conn:
        seed_masters(conn, 3, ["s1"], {})
        with pytest.raises(Exception, match="(?i)foreign key"):
            seed_store_activity(conn, "s1", ["NOT-RECEIVED"], 1)
