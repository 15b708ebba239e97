"""Deterministic demo data for the reference retail schema.

Used by the demo, the tests and benchmarks: the same seed gives the same rows,
so a test can compare what the HO sent with what a store holds. Everything is
inserted with SQLAlchemy Core in the caller's transaction, with an
:func:`~exchange.database.capture.record_event` per document, exactly as a well-behaved
application would; lists of dicts go through executemany, so tens of
thousands of sales take seconds.

Amounts follow one rule everywhere: ``amount = qty * price`` and
``tax = amount * tax_rate / 100``, each rounded to cents half-up per line; a
header's ``total`` is the sum of line amounts plus tax, its ``tax`` the sum of
line taxes; a bill's payments add up to its total.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import Connection, func, insert, select

from exchange.database import schema as s
from exchange.database.capture import record_events

__all__ = ["DocKeys", "seed_masters", "seed_store_activity", "ean13"]

#: Document type -> keys of the documents created, in creation order.
DocKeys = dict[str, list[tuple[str, ...]]]

CENT = Decimal("0.01")
_BASE_DAY = date(2024, 1, 1)
_CATEGORIES = ("GROCERY", "DAIRY", "BAKERY", "PRODUCE", "BEVERAGE", "HOUSEHOLD", "PERSONAL_CARE", "FROZEN")
_ADJECTIVES = ("Fresh", "Organic", "Classic", "Premium", "Family", "Crispy", "Golden", "Mild", "Rich", "Lite")
_NOUNS = {
    "GROCERY": ("Rice", "Lentils", "Flour", "Sugar", "Salt", "Pasta", "Oats"),
    "DAIRY": ("Milk", "Butter", "Yogurt", "Cheese", "Paneer", "Cream"),
    "BAKERY": ("Bread", "Buns", "Cookies", "Rusk", "Cake"),
    "PRODUCE": ("Apples", "Bananas", "Tomatoes", "Onions", "Potatoes", "Spinach"),
    "BEVERAGE": ("Tea", "Coffee", "Juice", "Cola", "Water"),
    "HOUSEHOLD": ("Detergent", "Dish Soap", "Tissues", "Bin Bags", "Floor Cleaner"),
    "PERSONAL_CARE": ("Shampoo", "Soap", "Toothpaste", "Lotion", "Deodorant"),
    "FROZEN": ("Peas", "Ice Cream", "Fries", "Nuggets"),
}
_SIZES = ("100 g", "250 g", "500 g", "1 kg", "1 L", "2 L", "6 pack", "12 pack")
_FIRST = ("Asha", "Ravi", "Meera", "John", "Fatima", "Li", "Carlos", "Anna", "Kofi", "Sara", "Arjun", "Nina")
_LAST = ("Sharma", "Iyer", "Smith", "Khan", "Chen", "Garcia", "Rossi", "Mensah", "Novak", "Das")
_TAX_RATES = (Decimal("0.00"), Decimal("5.00"), Decimal("12.00"), Decimal("18.00"))


@dataclass(frozen=True)
class _Item:
    item_id: str
    price: Decimal
    tax_rate: Decimal
    uom: str


def _money(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def _tax(amount: Decimal, rate: Decimal) -> Decimal:
    return _money(amount * rate / 100)


def _qty(rng: random.Random, item: _Item, big: bool = False) -> Decimal:
    """Whole pieces, or a weight in grams for items sold by the kilo."""
    if item.uom == "KG":
        return Decimal(rng.randint(100, 20000 if big else 2500)).scaleb(-3)
    return Decimal(rng.randint(1, 48 if big else 3)).quantize(Decimal("0.001"))


def ean13(body12: str) -> str:
    """An EAN-13 barcode: the 12 digits plus their check digit."""
    if len(body12) != 12 or not body12.isdigit():
        raise ValueError(f"an EAN-13 body is 12 digits, not {body12!r}")
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body12))
    return body12 + str((10 - total % 10) % 10)


def _sample(rng: random.Random, items: Sequence[_Item], lo: int, hi: int) -> list[_Item]:
    return rng.sample(list(items), min(len(items), rng.randint(lo, hi)))


def seed_masters(conn: Connection, n_items: int, stores: Sequence[str], groups: Mapping[str, str],
                 *, seed: int = 0, day: date = _BASE_DAY) -> DocKeys:
    """HO master data and per-store documents.

    ``groups`` maps a store id to its store group. Creates ``n_items`` items
    with one or two barcodes each, two promotions (one for every store, one
    for the first store group), and per store a transfer order, an item audit
    plan, a sales order and its invoice. Returns the keys created per
    document type.
    """
    if n_items < 1:
        raise ValueError("seed_masters needs at least one item")
    rng = random.Random(seed)
    keys: DocKeys = {"item": [], "promotion": [], "transfer_order": [], "audit_plan": [],
                     "sales_order": [], "sales_invoice": []}
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in (
        "item", "item_barcode", "promotion", "promotion_item", "transfer_order", "transfer_order_line",
        "audit_plan", "audit_plan_line", "sales_order", "sales_order_line", "sales_invoice",
        "sales_invoice_line")}
    items: list[_Item] = []
    stamp = datetime.combine(day, datetime.min.time())
    for i in range(1, n_items + 1):
        category = rng.choice(_CATEGORIES)
        uom = "KG" if category == "PRODUCE" else "EA"
        item = _Item(f"I{i:07d}", Decimal(rng.randint(25, 99999)).scaleb(-2), rng.choice(_TAX_RATES), uom)
        items.append(item)
        size = "" if uom == "KG" else " " + rng.choice(_SIZES)
        rows["item"].append({
            "item_id": item.item_id, "name": f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS[category])}{size}",
            "category": category, "uom": uom, "price": item.price, "tax_rate": item.tax_rate,
            "active": rng.random() > 0.05, "updated_at": stamp + timedelta(minutes=i)})
        for line in range(1, rng.choice((1, 1, 1, 2)) + 1):
            rows["item_barcode"].append({"item_id": item.item_id, "line_no": line,
                                         "barcode": ean13(f"2{i:09d}{line:02d}")})
        keys["item"].append((item.item_id,))

    group_names = sorted(set(groups.values()))
    for n, (name, group) in enumerate((("Storewide Savings", None),
                                       ("Group Weekend Deal", group_names[0] if group_names else None)), 1):
        promo_id, discount = f"P{n:05d}", Decimal(rng.choice((5, 10, 15, 20))).quantize(CENT)
        rows["promotion"].append({"promo_id": promo_id, "name": name, "store_group": group,
                                  "starts_on": day, "ends_on": day + timedelta(days=6 + 7 * n),
                                  "discount_pct": discount})
        for line, item in enumerate(_sample(rng, items, 3, 8), 1):
            rows["promotion_item"].append({"promo_id": promo_id, "line_no": line, "item_id": item.item_id,
                                           "promo_price": _money(item.price * (100 - discount) / 100)})
        keys["promotion"].append((promo_id,))

    for n, store in enumerate(stores, 1):
        to_id, total = f"TO{n:07d}", Decimal("0.00")
        for line, item in enumerate(_sample(rng, items, 5, 10), 1):
            qty, cost = _qty(rng, item, big=True), _money(item.price * Decimal("0.7"))
            total += _money(qty * cost)
            rows["transfer_order_line"].append({"to_id": to_id, "line_no": line, "item_id": item.item_id,
                                                "qty": qty, "unit_cost": cost})
        rows["transfer_order"].append({"to_id": to_id, "dest_store": store, "order_date": day,
                                       "status": "RELEASED", "total_value": total})
        keys["transfer_order"].append((to_id,))

        plan_id = f"AP{n:07d}"
        rows["audit_plan"].append({"plan_id": plan_id, "store_id": store, "planned_on": day + timedelta(days=7),
                                   "notes": f"Cycle count for {store}"})
        for line, item in enumerate(_sample(rng, items, 5, 12), 1):
            rows["audit_plan_line"].append({"plan_id": plan_id, "line_no": line, "item_id": item.item_id})
        keys["audit_plan"].append((plan_id,))

        so_id, inv_id = f"SO{n:07d}", f"INV{n:07d}"
        so_total = inv_total = inv_tax = Decimal("0.00")
        for line, item in enumerate(_sample(rng, items, 3, 6), 1):
            qty = _qty(rng, item, big=True)
            amount = _money(qty * item.price)
            tax = _tax(amount, item.tax_rate)
            so_total += amount
            inv_total += amount + tax
            inv_tax += tax
            common = {"line_no": line, "item_id": item.item_id, "qty": qty, "price": item.price,
                      "amount": amount}
            rows["sales_order_line"].append({"so_id": so_id, **common})
            rows["sales_invoice_line"].append({"invoice_id": inv_id, **common, "tax": tax})
        rows["sales_order"].append({"so_id": so_id, "store_id": store, "order_date": day, "total": so_total})
        rows["sales_invoice"].append({"invoice_id": inv_id, "store_id": store, "so_id": so_id,
                                      "invoice_date": day + timedelta(days=1), "total": inv_total,
                                      "tax": inv_tax})
        keys["sales_order"].append((so_id,))
        keys["sales_invoice"].append((inv_id,))

    _insert_all(conn, rows)
    for doc_type, doc_keys in keys.items():
        record_events(conn, doc_type, doc_keys)
    return keys


def _insert_all(conn: Connection, rows: Mapping[str, list[dict[str, Any]]]) -> None:
    """Insert per table in the given order (headers before children) with executemany."""
    for table, batch in rows.items():
        if batch:
            conn.execute(insert(s.RETAIL.tables[table]), batch)


def _next_no(conn: Connection, table: str, store_id: str) -> int:
    t = s.RETAIL.tables[table]
    count = conn.execute(select(func.count()).select_from(t).where(t.c.store_id == store_id)).scalar()
    return int(count or 0) + 1


def _load_items(conn: Connection, item_ids: Sequence[str]) -> list[_Item]:
    """Prices and tax rates of ``item_ids`` from the item table; a stable made-up price for unknown ids.

    Unknown ids are kept on purpose: a bill naming an item the node does not
    have is how tests provoke a parked document (the FK rejects it on apply).
    """
    found: dict[str, _Item] = {}
    ids = list(dict.fromkeys(item_ids))
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for item_id, price, rate, uom in conn.execute(
                select(s.item.c.item_id, s.item.c.price, s.item.c.tax_rate, s.item.c.uom)
                .where(s.item.c.item_id.in_(chunk))):
            found[item_id] = _Item(item_id, price, rate, uom)
    return [found.get(i) or _Item(i, Decimal(100 + zlib.crc32(i.encode()) % 9900).scaleb(-2),
                                  Decimal("0.00"), "EA") for i in ids]


def seed_store_activity(conn: Connection, store_id: str, item_ids: Sequence[str], n_sales: int, *,
                        seed: int = 0, n_customers: int | None = None, start: datetime | None = None,
                        to_id: str | None = None, zone: tzinfo | None = None) -> DocKeys:
    """A store's trading: customers, ``n_sales`` bills (lines and payments), one GRC, one GRT.

    The GRC receives ``to_id`` or, by default, the first transfer order
    addressed to the store in this database (copying its lines); without one it
    receives a few of ``item_ids``. Numbering continues after the store's
    existing documents, so the function can be called again. Returns the keys
    created per document type.

    ``zone``: the store's zone, as a till and a sign-up desk write their times: the
    day starts at 09:00 there, each bill and customer is stamped with its aware local
    time, and the offset is kept beside it (``bill_date_offset``, ``created_at_offset``;
    docs/CATALOG.md, "Business times"). Without one the times are naive (taken as
    UTC) and no offset is recorded, as a POS of an earlier release wrote them.
    """
    if not item_ids:
        raise ValueError("seed_store_activity needs item ids to sell")
    rng = random.Random(f"{seed}:{store_id}")
    items = _load_items(conn, item_ids)
    clock = start or datetime.combine(_BASE_DAY, datetime.min.time()).replace(hour=9, tzinfo=zone)
    offset = s.offset_minutes(clock)  # None for a naive clock
    keys: DocKeys = {"customer": [], "sales_bill": [], "grc": [], "grt": []}
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in (
        "customer", "sales_bill", "sales_bill_line", "sales_bill_payment", "grc", "grc_line", "grt", "grt_line")}

    first_customer = _next_no(conn, "customer", store_id)
    n_customers = max(1, n_sales // 20) if n_customers is None else n_customers
    customer_ids: list[str] = []
    for n in range(first_customer, first_customer + n_customers):
        cid, first, last = f"C{n:07d}", rng.choice(_FIRST), rng.choice(_LAST)
        rows["customer"].append({
            "store_id": store_id, "customer_id": cid, "name": f"{first} {last}",
            "phone": f"+1-555-{rng.randint(0, 9999):04d}",
            "email": f"{first}.{last}{n}@example.com".lower() if rng.random() < 0.6 else None,
            "created_at": clock, "created_at_offset": offset})
        customer_ids.append(cid)
        keys["customer"].append((store_id, cid))

    first_bill = _next_no(conn, "sales_bill", store_id)
    for n in range(first_bill, first_bill + n_sales):
        bill_no = f"B{n:09d}"
        clock += timedelta(seconds=rng.randint(20, 600))
        total = tax_total = Decimal("0.00")
        for line, item in enumerate(_sample(rng, items, 1, 5), 1):
            qty = _qty(rng, item)
            amount = _money(qty * item.price)
            tax = _tax(amount, item.tax_rate)
            total += amount + tax
            tax_total += tax
            rows["sales_bill_line"].append({"store_id": store_id, "bill_no": bill_no, "line_no": line,
                                            "item_id": item.item_id, "qty": qty, "price": item.price,
                                            "amount": amount, "tax": tax})
        if total > 1 and rng.random() < 0.2:
            cash = _money(total * rng.randint(1, 9) / 10)
            payments = [("CASH", cash), ("CARD", total - cash)]
        else:
            payments = [(rng.choice(("CASH", "CARD", "CARD", "UPI")), total)]
        for line, (method, paid) in enumerate(payments, 1):
            rows["sales_bill_payment"].append({"store_id": store_id, "bill_no": bill_no, "line_no": line,
                                               "method": method, "amount": paid})
        rows["sales_bill"].append({
            "store_id": store_id, "bill_no": bill_no, "bill_date": clock, "bill_date_offset": offset,
            "customer_id": rng.choice(customer_ids) if rng.random() < 0.3 else None,
            "total": total, "tax": tax_total})
        keys["sales_bill"].append((store_id, bill_no))

    if to_id is None:
        to_id = conn.execute(select(s.transfer_order.c.to_id)
                             .where(s.transfer_order.c.dest_store == store_id)
                             .order_by(s.transfer_order.c.to_id).limit(1)).scalar()
    grc_no = f"GRC{_next_no(conn, 'grc', store_id):07d}"
    received: list[tuple[str, Decimal, Decimal]] = []
    if to_id is not None:
        tol = s.transfer_order_line
        received = [(r.item_id, r.qty, r.unit_cost) for r in conn.execute(
            select(tol.c.item_id, tol.c.qty, tol.c.unit_cost).where(tol.c.to_id == to_id).order_by(tol.c.line_no))]
    if not received:
        received = [(i.item_id, _qty(rng, i, big=True), _money(i.price * Decimal("0.7")))
                    for i in _sample(rng, items, 1, 3)]
    rows["grc"].append({"store_id": store_id, "grc_no": grc_no, "to_id": to_id,
                        "received_on": clock.date()})
    for line, (item_id, qty, cost) in enumerate(received, 1):
        rows["grc_line"].append({"store_id": store_id, "grc_no": grc_no, "line_no": line,
                                 "item_id": item_id, "qty": qty, "unit_cost": cost})
    keys["grc"].append((store_id, grc_no))

    grt_no = f"GRT{_next_no(conn, 'grt', store_id):07d}"
    rows["grt"].append({"store_id": store_id, "grt_no": grt_no, "returned_on": clock.date(),
                        "reason": rng.choice(("DAMAGED", "EXPIRED", "SHORT_SHELF_LIFE", "RECALL"))})
    for line, item in enumerate(_sample(rng, items, 1, 3), 1):
        qty = _qty(rng, item)
        rows["grt_line"].append({"store_id": store_id, "grt_no": grt_no, "line_no": line,
                                 "item_id": item.item_id, "qty": qty,
                                 "amount": _money(qty * item.price * Decimal("0.7"))})
    keys["grt"].append((store_id, grt_no))

    _insert_all(conn, rows)
    for doc_type, doc_keys in keys.items():
        record_events(conn, doc_type, doc_keys)
    return keys
