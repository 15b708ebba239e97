"""Helpers for tools/bench/run.py: machine facts, PostgreSQL scratch databases,
fast vectorized data generation and bulk loading, node homes made cheaply.

Nothing here is timed; run.py times. Data generation follows the rules of
exchange/demo/data.py (``amount = qty * price``, ``tax = amount * rate / 100``,
half-up to cents per line; a bill's total is its lines' amount plus tax and its
payments add up to it) but builds Arrow arrays with numpy instead of one
SQLAlchemy row per line, so a million sales lines take seconds.
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
EXCHANGE = str(Path(PY).with_name("exchange"))

# ---------------------------------------------------------------- machine


def machine_info(pg_url: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    import pyarrow
    import sqlalchemy

    info["pyarrow"] = pyarrow.__version__
    info["sqlalchemy"] = sqlalchemy.__version__
    info["sqlite"] = sqlite3.sqlite_version
    try:
        import adbc_driver_sqlite

        info["adbc"] = adbc_driver_sqlite.__version__
    except Exception:  # noqa: BLE001
        pass
    if pg_url:
        try:
            import psycopg

            with psycopg.connect(libpq_url(pg_url), connect_timeout=10) as c:
                info["postgresql"] = c.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        except Exception as exc:  # noqa: BLE001
            info["postgresql"] = f"unavailable: {exc}"
    return info


# ---------------------------------------------------------------- PostgreSQL


def libpq_url(sa_url: str, database: str | None = None) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a libpq URI for psycopg and ADBC."""
    from sqlalchemy import make_url

    u = make_url(sa_url).set(drivername="postgresql")
    if database:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


def sa_url(base: str, database: str) -> str:
    from sqlalchemy import make_url

    return make_url(base).set(database=database).render_as_string(hide_password=False)


class PgScratch:
    """Throwaway databases on the server of ``base`` (a SQLAlchemy URL), all dropped at close."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.prefix = f"xbench_{secrets.token_hex(4)}"
        self.names: list[str] = []

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(libpq_url(self.base), autocommit=True, connect_timeout=10)

    def create(self, tag: str, template: str | None = None) -> str:
        """A new database; from ``template`` if given (its sessions are ended first: a backend
        of a child that just closed its connection can linger for a moment)."""
        import time

        import psycopg

        name = f"{self.prefix}_{tag}"
        with self._admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            for attempt in range(10):
                if template:
                    c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = %s AND pid <> pg_backend_pid()", (template,))
                try:
                    c.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
                    break
                except psycopg.errors.ObjectInUse:
                    if attempt == 9:
                        raise
                    time.sleep(0.5)
        self.names.append(name)
        return sa_url(self.base, name)

    def drop(self, url: str) -> None:
        from sqlalchemy import make_url

        name = make_url(url).database
        with self._admin() as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        if name in self.names:
            self.names.remove(name)

    def close(self) -> None:
        for name in list(self.names):
            try:
                self.drop(sa_url(self.base, name))
            except Exception as exc:  # noqa: BLE001
                print(f"warning: could not drop {name}: {exc}", file=sys.stderr)


def is_pg(url: str) -> bool:
    return url.startswith("postgresql")


def sqlite_path(url: str) -> str:
    return url.split("sqlite:///", 1)[1]


def adbc_connect(url: str) -> Any:
    """An ADBC DB-API connection to a node database URL (SQLite file or PostgreSQL)."""
    if is_pg(url):
        import adbc_driver_postgresql.dbapi as pgdb

        return pgdb.connect(libpq_url(url))
    import adbc_driver_sqlite.dbapi as sqdb

    return sqdb.connect(sqlite_path(url))


def plain_connect(url: str) -> Any:
    """A plain DB-API connection (sqlite3 / psycopg), as a cron-job script would use."""
    if is_pg(url):
        import psycopg

        return psycopg.connect(libpq_url(url))
    return sqlite3.connect(sqlite_path(url))


# ---------------------------------------------------------------- Arrow data
# Vectorized with pyarrow.compute only: numpy is not a dependency of the project.


def decimal_from_minor(minor: Any, precision: int, scale: int) -> pa.Array:
    """int64 minor units -> decimal128(precision, scale), exactly (125 -> 1.25 at scale 2).

    Casts to decimal128(19, 0) (unscaled value = the integer) and reinterprets
    the same 16-byte values with the wanted scale: no Python object per value.
    """
    arr = pa.array(minor, pa.int64()) if not isinstance(minor, pa.Array) else minor
    wide = arr.cast(pa.decimal128(19, 0))
    return pa.Array.from_buffers(pa.decimal128(precision, scale), len(wide), wide.buffers(), wide.null_count,
                                 wide.offset)


def minor_from_decimal(arr: pa.Array) -> pa.Array:
    """decimal128(p, s) -> int64 unscaled value (the minor units SQLite stores)."""
    view = pa.Array.from_buffers(pa.decimal128(38, 0), len(arr), arr.buffers(), arr.null_count, arr.offset)
    return view.cast(pa.int64())


def _rand_int(n: int, lo: int, hi: int, seed: int) -> pa.Array:
    """n uniform integers in [lo, hi), int64."""
    r = pc.random(n, initializer=seed)
    return pc.add(pc.cast(pc.floor(pc.multiply(r, hi - lo)), pa.int64()), lo)


def _round_div(num: pa.Array, den: int) -> pa.Array:
    """Half-up integer division for non-negative int64 ``num``."""
    return pc.divide(pc.add(pc.multiply(num, 2), den), 2 * den)  # int64 division truncates


def sqlite_stamp(ts: pa.Array) -> pa.Array:
    """timestamp[us] -> the text SQLAlchemy stores on SQLite ('YYYY-MM-DD HH:MM:SS.ffffff')."""
    return pc.strftime(ts, format="%Y-%m-%d %H:%M:%S")


@dataclass
class Items:
    ids: pa.Array        # string
    price: pa.Array      # int64 cents
    rate: pa.Array       # int64 hundredths of a percent
    uom_kg: pa.Array     # bool
    tables: dict[str, pa.Table] = field(default_factory=dict)  # logical (as they travel)


_CATS = ["GROCERY", "DAIRY", "BAKERY", "PRODUCE", "BEVERAGE", "HOUSEHOLD", "PERSONAL_CARE", "FROZEN"]


def gen_items(n: int, seed: int = 0, price_bump: int = 0) -> Items:
    import random
    from datetime import datetime, timedelta

    rng = random.Random(seed)
    ids = pa.array([f"I{i:07d}" for i in range(1, n + 1)], pa.string())
    cat = [rng.randrange(len(_CATS)) for _ in range(n)]
    kg = [_CATS[c] == "PRODUCE" for c in cat]
    price = pa.array([rng.randint(25, 99999) + price_bump for _ in range(n)], pa.int64())
    rate = pa.array([rng.choice((0, 500, 1200, 1800)) for _ in range(n)], pa.int64())
    base = datetime(2024, 1, 1)
    item = pa.table({
        "item_id": ids,
        "name": pa.array([f"Item {i} {_CATS[c].title()}" for i, c in zip(range(1, n + 1), cat, strict=True)]),
        "category": pa.array([_CATS[c] for c in cat]),
        "uom": pa.array(["KG" if k else "EA" for k in kg]),
        "price": decimal_from_minor(price, 14, 2),
        "tax_rate": decimal_from_minor(rate, 5, 2),
        "active": pa.array([rng.random() > 0.05 for _ in range(n)]),
        "updated_at": pa.array([base + timedelta(minutes=i) for i in range(n)], pa.timestamp("us")),
    })
    barcode = pa.table({
        "item_id": ids,
        "line_no": pa.array([1] * n, pa.int64()),
        "barcode": pa.array([f"2{i:09d}01X" for i in range(1, n + 1)]),
    })
    return Items(ids, price, rate, pa.array(kg), conform({"item": item, "item_barcode": barcode}))


def gen_sales(store_id: str, n_lines: int, items: Items, seed: int = 0, first_bill: int = 1
              ) -> dict[str, pa.Table]:
    """``n_lines`` sales lines in bills of 3-6 lines, with payments; logical Arrow tables.

    Column order and types are those of :func:`exchange.database.rows.arrow_schema`
    (decimal128 money and quantities, timestamp bill dates).
    """
    import random
    from datetime import datetime, timedelta

    rng = random.Random(f"{seed}:{store_id}")
    per: list[int] = []
    left = n_lines
    while left > 0:
        k = min(left, rng.randint(3, 6))
        per.append(k)
        left -= k
    n_bills = len(per)
    bill_idx = pa.array([b for b, k in enumerate(per) for _ in range(k)], pa.int64())
    line_no = pa.array([i for k in per for i in range(1, k + 1)], pa.int64())
    bill_nos = pa.array([f"B{first_bill + i:09d}" for i in range(n_bills)], pa.string())
    s = zlib.crc32(f"{seed}:{store_id}".encode()) % (1 << 30)
    it = _rand_int(n_lines, 0, len(items.ids), s)
    price = pc.take(items.price, it)
    rate = pc.take(items.rate, it)
    qty = pc.if_else(pc.take(items.uom_kg, it), _rand_int(n_lines, 100, 2500, s + 1),
                     pc.multiply(_rand_int(n_lines, 1, 4, s + 2), 1000))
    amount = _round_div(pc.multiply(qty, price), 1000)   # cents
    tax = _round_div(pc.multiply(amount, rate), 10000)   # cents
    # per-bill sums from running sums at each bill's last line (lines are contiguous per bill)
    ends = pa.array([e - 1 for e in _accumulate(per)], pa.int64())
    def per_bill(x: pa.Array) -> pa.Array:
        cs = pc.take(pc.cumulative_sum(x), ends)
        prev = pa.concat_arrays([pa.array([0], pa.int64()), cs.slice(0, n_bills - 1)])
        return pc.subtract(cs, prev)
    bill_tax = per_bill(tax)
    bill_total = per_bill(pc.add(amount, tax))
    clock, stamps = datetime(2024, 1, 1, 9), []
    for _ in range(n_bills):
        clock += timedelta(seconds=rng.randint(20, 600))
        stamps.append(clock)
    header = pa.table({
        "store_id": pa.array([store_id] * n_bills, pa.string()),
        "bill_no": bill_nos,
        "bill_date": pa.array(stamps, pa.timestamp("us")),
        "customer_id": pa.array([f"C{rng.randint(1, 5000):07d}" if rng.random() < 0.3 else None
                                 for _ in range(n_bills)], pa.string()),
        "total": decimal_from_minor(bill_total, 14, 2),
        "tax": decimal_from_minor(bill_tax, 14, 2),
    })
    lines = pa.table({
        "store_id": pa.array([store_id] * n_lines, pa.string()),
        "bill_no": pc.take(bill_nos, bill_idx),
        "line_no": line_no,
        "item_id": pc.take(items.ids, it),
        "qty": decimal_from_minor(qty, 14, 3),
        "price": decimal_from_minor(price, 14, 2),
        "amount": decimal_from_minor(amount, 14, 2),
        "tax": decimal_from_minor(tax, 14, 2),
    })
    p_bill: list[str] = []
    p_line: list[int] = []
    p_method: list[str] = []
    p_amount: list[int] = []
    for b, total in enumerate(bill_total.to_pylist()):
        if total > 100 and rng.random() < 0.2:
            cash = total * rng.randint(1, 9) // 10
            p_bill += [b, b]
            p_line += [1, 2]
            p_method += ["CASH", "CARD"]
            p_amount += [cash, total - cash]
        else:
            p_bill.append(b)
            p_line.append(1)
            p_method.append(rng.choice(("CASH", "CARD", "CARD", "UPI")))
            p_amount.append(total)
    payments = pa.table({
        "store_id": pa.array([store_id] * len(p_bill), pa.string()),
        "bill_no": pc.take(bill_nos, pa.array(p_bill, pa.int64())),
        "line_no": pa.array(p_line, pa.int64()),
        "method": pa.array(p_method, pa.string()),
        "amount": decimal_from_minor(pa.array(p_amount, pa.int64()), 14, 2),
    })
    return conform({"sales_bill": header, "sales_bill_line": lines, "sales_bill_payment": payments})


def conform(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Give each table exactly the schema the exporter reads it with (names, types, nullability)."""
    from exchange.database import rows
    from exchange.database.schema import RETAIL

    out = {}
    for name, t in tables.items():
        schema = rows.arrow_schema(RETAIL.tables[name])
        # Columns the catalog gained after the generator was written (item.brand,
        # sales_bill.bill_date_offset) are nullable: they travel as nulls here.
        cols = [t.column(f.name).cast(f.type) if f.name in t.column_names
                else pa.nulls(t.num_rows, f.type) for f in schema]
        out[name] = pa.Table.from_arrays(cols, schema=schema)
    return out


def _accumulate(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


def doc_keys(header: pa.Table, key_cols: tuple[str, ...]) -> list[str]:
    cols = [header.column(c).to_pylist() for c in key_cols]
    return ['["' + '","'.join(v) + '"]' for v in zip(*cols, strict=True)]


def physical(table: pa.Table, dialect: str, name: str | None = None) -> pa.Table:
    """Logical Arrow -> what the database stores: SQLite gets minor units, text stamps, 0/1;
    PostgreSQL gets int4 for INTEGER columns (binary COPY does not widen or narrow)."""
    if dialect != "sqlite":
        from sqlalchemy import BigInteger, Integer

        from exchange.database.schema import RETAIL

        t = RETAIL.tables.get(name or "")
        if t is None:
            return table
        cols = []
        for f, col in zip(table.schema, table.columns, strict=True):
            typ = t.c[f.name].type if f.name in t.c else None
            small = isinstance(typ, Integer) and not isinstance(typ, BigInteger)
            cols.append(pc.cast(col, pa.int32()) if small and pa.types.is_int64(f.type) else col)
        return pa.table(cols, names=table.column_names)
    cols = []
    for f, col in zip(table.schema, table.columns, strict=True):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_decimal(f.type):
            cols.append(minor_from_decimal(arr))
        elif pa.types.is_timestamp(f.type):
            cols.append(sqlite_stamp(arr))
        elif pa.types.is_boolean(f.type):
            cols.append(pc.cast(arr, pa.int64()))
        else:
            cols.append(arr)
    return pa.table(cols, names=table.column_names)


def ingest(url: str, tables: dict[str, pa.Table], events: dict[str, list[str]] | None = None) -> None:
    """Bulk-load tables (logical Arrow) and, optionally, PENDING capture events, in one transaction."""
    dialect = "postgresql" if is_pg(url) else "sqlite"
    conn = adbc_connect(url)
    try:
        with conn.cursor() as cur:
            for name, t in tables.items():
                cur.adbc_ingest(name, physical(t, dialect, name), mode="append")
            for doc_type, keys in (events or {}).items():
                if keys:
                    ev = pa.table({"doc_type": pa.array([doc_type] * len(keys), pa.string()),
                                   "doc_key": pa.array(keys, pa.string()),
                                   "op": pa.array(["U"] * len(keys), pa.string())})
                    cur.adbc_ingest("xchg_event", ev, mode="append")
        conn.commit()
    finally:
        conn.close()


# ---------------------------------------------------------------- node homes


def make_node(home: Path, node_id: str, role: str, database: str | None = None) -> Any:
    from exchange.node.home import Node, init_home

    return Node(init_home(home, node_id, "ho" if role == "ho" else "store", database))


def pair(ho: Any, store: Any, transfer: Path | None, group: str = "g1") -> None:
    from exchange.node import keys
    from exchange.node.peers import add_peer

    t = f"dir:{transfer}" if transfer else None
    add_peer(ho.cfg, store.id, "store", keys.public_signing_line(store.cfg), keys.recipient(store.cfg),
             t, (group,))
    add_peer(store.cfg, ho.id, "ho", keys.public_signing_line(ho.cfg), keys.recipient(ho.cfg), t)


@dataclass
class FakeStore:
    """A store that exists only as keys: enough to seal bundles to the HO and be trusted by it."""

    id: str
    key: Any            # Ed25519 private key
    pub_line: str
    recipient: str


def fake_stores(ids: list[str]) -> list[FakeStore]:
    from exchange.wire.crypto import age, sshsig

    out = []
    for sid in ids:
        pem, pub = sshsig.generate_key(comment=f"exchange:{sid}")
        _ident, rcpt = age.generate_identity()
        out.append(FakeStore(sid, sshsig.load_private_key(pem), pub, rcpt))
    return out


def add_many_peers(ho: Any, stores: list[FakeStore], group: str = "g1") -> None:
    """Pair many stores with the HO at once (one config write, one trust-store write).

    Equivalent to ``add_peer`` per store, which rewrites both files each time.
    """
    from exchange.node import keys
    from exchange.node.config import Peer
    from exchange.wire.crypto import sshsig

    lines = []
    for s in stores:
        ho.cfg.peers[s.id] = Peer(id=s.id, role="store", recipient=s.recipient, transport=None,
                                  groups=(group,))
        lines.append(sshsig.format_signer_line(s.id, " ".join(s.pub_line.split()[:2])))
    path = keys.trust_path(ho.cfg)
    path.write_text(path.read_text() + "".join(line + "\n" for line in lines))
    ho.cfg.save()


def seal_store_bundle(store: FakeStore, ho_id: str, ho_recipient: str, tables: dict[str, pa.Table],
                      path: Path, seq: int = 1, prev: str | None = None) -> Any:
    """Seal what ``export_all`` on the store would seal for these sales bills (one bundle)."""
    from exchange.database.catalog import reference_catalog
    from exchange.database.batch import EVENTS_SCHEMA, control_totals
    from exchange.wire.bundle import seal_bundle
    from exchange.wire.formats import EVENTS_TABLE

    cat = reference_catalog()
    dt = cat.get("sales_bill")
    keys = doc_keys(tables["sales_bill"], dt.key)
    events = pa.Table.from_pydict({"doc_type": ["sales_bill"] * len(keys), "doc_key": keys,
                                   "op": ["U"] * len(keys), "version": list(range(1, len(keys) + 1))},
                                  schema=EVENTS_SCHEMA)
    per = {t: tables[t] for t in dt.tables()}
    summary = {"documents": {"sales_bill": {**control_totals(dt, per, len(keys)), "deletes": 0}}}
    return seal_bundle(path, key=store.key, sender=store.id, recipient=ho_id, seq=seq, prev=prev,
                       recipients=[ho_recipient], tables={EVENTS_TABLE: events, **per}, summary=summary)


def copy_files(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dest / f.name)


def run_quiet(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def sql_ident(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(name)
    return name
