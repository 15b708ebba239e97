"""The demo: an HO and two stores exchanging through a shared folder, end to end.

Everything here goes through the same library calls an operator's commands
use (init, peer add, sync, status); only the business data is generated.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from exchange.database import rows
from exchange.database import schema as s
from exchange.demo.data import seed_masters, seed_store_activity
from exchange.errors import ExchangeError
from exchange.node import keys
from exchange.node.home import Node, init_home
from exchange.node.peers import add_peer
from exchange.database.batch import control_totals
from exchange.service import status
from exchange.service.status_text import status_lines
from exchange.service.sync import sync
from exchange.vocabulary import ReceivedStatus, SentStatus

STORES = {"s001": "north", "s002": "south"}
#: Each store's zone: a chain that spans zones (docs/CATALOG.md, "Business times"); the HO's is its own.
ZONES = {"s001": timezone(timedelta(hours=5, minutes=30)), "s002": timezone(timedelta(hours=-5))}


def _pair(ho: Node, store: Node, transfer: Path, group: str) -> None:
    add_peer(ho.cfg, store.id, "store", keys.public_signing_line(store.cfg), keys.recipient(store.cfg),
             f"dir:{transfer}", (group,))
    add_peer(store.cfg, ho.id, "ho", keys.public_signing_line(ho.cfg), keys.recipient(ho.cfg),
             f"dir:{transfer}")


def reconcile(ho: Node, stores: list[Node]) -> list[dict[str, Any]]:
    """Per store and document type: documents and control totals on both sides.

    The documents compared are the ones the owning side sent the other
    (:func:`exchange.service.status.documents`), read back from each database and totalled alike.
    """
    out = []
    sent: dict[tuple[str, str], dict[tuple[str, str], status.DocState]] = {}
    for st in stores:
        for doc in ho.catalog:
            sender, receiver, peer = (ho, st, st.id) if doc.owner == "ho" else (st, ho, ho.id)
            if (sender.id, peer) not in sent:
                sent[(sender.id, peer)] = status.documents(sender, peer)
            keys_sent = sorted(k for (t, k), d in sent[(sender.id, peer)].items() if t == doc.name and d.op == "U")
            side = []
            for node in (sender, receiver):
                with node.engine.connect() as conn:
                    tables = rows.read_doc_tables(conn, [node.catalog.table(t) for t in doc.tables()],
                                                  doc.key, keys_sent)
                n = len(set(rows.row_keys(tables[doc.header], doc.key)))
                side.append((n, control_totals(doc, tables, n)["totals"]))
            out.append({"store": st.id, "doc_type": doc.name, "sent_docs": side[0][0],
                        "received_docs": side[1][0], "totals": side[0][1],
                        "ok": side[0] == side[1] and side[0][0] == len(keys_sent)})
    return out


def run_demo(home: Path, *, items: int = 200, sales: int = 50, fresh: bool = True,
             echo: Callable[[str], None] = print) -> bool:
    home = Path(home).resolve()
    if fresh and home.exists():
        if not (home / "ho" / "exchange.toml").exists() and any(home.iterdir()):
            raise ExchangeError(f"{home} exists and is not a demo folder; refusing to empty it",
                                hint="Pass --home with a new or empty folder.")
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    transfer = home / "transfer"
    transfer.mkdir(exist_ok=True)
    echo(f"== creating HO and stores {', '.join(STORES)} under {home}")
    ho = Node(init_home(home / "ho", "ho", "ho"))
    stores = [Node(init_home(home / s, s, "store")) for s in STORES]
    for st in stores:
        _pair(ho, st, transfer, STORES[st.id])
    ho, stores = Node.open(ho.cfg.home), [Node.open(s.cfg.home) for s in stores]

    echo(f"== HO records {items} items with barcodes, promotions, transfer orders, audit plans, sales orders")
    with ho.engine.begin() as conn:
        master_keys = seed_masters(conn, items, list(STORES), STORES)
    item_ids = [k[0] if isinstance(k, (list, tuple)) else k for k in master_keys["item"]]

    def cycle(label: str) -> None:
        echo(f"== {label}")
        for node in [ho, *stores, ho, *stores]:
            rep = sync(node)
            echo(f"   sync {node.id:<5} {rep.line()}")
            for e in rep.errors:
                echo(f"   ! {e}")

    cycle("sync round 1: HO sends, stores receive and acknowledge")
    zones = ", ".join(f"{sid} at UTC{_zone(z)}" for sid, z in ZONES.items())
    echo(f"== stores record {sales} sales bills each, customers, a GRC and a GRT ({zones})")
    for i, st in enumerate(stores):
        with st.engine.begin() as conn:
            seed_store_activity(conn, st.id, [str(x) for x in item_ids], sales, seed=i, zone=ZONES.get(st.id))
    cycle("sync round 2: stores send, HO receives and acknowledges")

    ok = True
    for node in [ho, *stores]:
        for view, rows in (("sent", status.sent(node)), ("received", status.received(node))):
            echo("")
            for line in status_lines(node.id, view, rows, None):  # the tables of `exchange status`
                echo(line)
            for r in rows:
                if view == "sent" and r.status != SentStatus.PROCESSED:
                    ok = False
                if view == "received" and r.status != ReceivedStatus.APPLIED:
                    ok = False
    echo("\n== reconciliation (documents and control totals, HO vs store)")
    for row in reconcile(ho, stores):
        mark = "ok" if row["ok"] else "MISMATCH"
        totals = ", ".join(f"{k}={v}" for k, v in row["totals"].items())
        echo(f"  {row['store']} {row['doc_type']:<15} sent {row['sent_docs']:>4} "
             f"received {row['received_docs']:>4}  {mark:<8} {totals}")
        ok = ok and row["ok"]
    echo("\n== sales at the HO per store and local business day (each bill at its till's own offset)")
    for line in sales_by_local_day(ho):
        echo(line)
    echo("\n" + ("every bundle PROCESSED, totals reconciled" if ok else "DEMO FOUND A PROBLEM (see above)"))
    return ok


def _zone(z: timezone) -> str:
    off = z.utcoffset(None)
    minutes = int(off.total_seconds() // 60)
    return f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def sales_by_local_day(ho: Node) -> list[str]:
    """The bills the HO holds, summed per store and the day they were rung up there
    (``local_time(bill_date, bill_date_offset)``): what ``exchange audit report`` gives an auditor."""
    sb = s.sales_bill
    days: dict[tuple[str, str, str], list[Decimal]] = defaultdict(list)
    with ho.engine.connect() as conn:
        for store, at, offset, total in conn.execute(sb.select().with_only_columns(
                sb.c.store_id, sb.c.bill_date, sb.c.bill_date_offset, sb.c.total)):
            local = s.local_time(at, offset)
            days[(store, local.date().isoformat(), local.strftime("%z"))].append(total)
    out = []
    for (store, day, zone), totals in sorted(days.items()):
        zone_text = f"UTC{zone[:3]}:{zone[3:]}" if zone else "UTC"
        out.append(f"  {store} {day} ({zone_text:<9}) {len(totals):>4} bills  total {sum(totals, Decimal(0)):>10}")
    return out or ["  (no bills)"]


def _shown(path: Path, cwd: Path) -> str:
    """``path`` as the reader types it from ``cwd``: relative when inside, else absolute."""
    try:
        return str(path.resolve().relative_to(cwd.resolve())) or "."
    except ValueError:
        return str(path.resolve())


def next_steps(home: Path, *, venv: Path | None, on_path: bool, cwd: Path) -> list[str]:
    """The demo's last lines: how to run ``exchange`` from here, and what to try on the demo's homes.

    ``venv`` is the virtual environment the demo ran from (None outside one); ``on_path``
    whether the ``exchange`` found on PATH is this one. Each line can be pasted into a shell
    as it is (the explanations are ``#`` comments).
    """
    h = _shown(home, cwd)
    store = next(iter(STORES))
    steps: list[tuple[str, str]] = []
    if not on_path and venv is not None:
        steps.append((f". {_shown(venv / 'bin' / 'activate', cwd)}",
                      "puts exchange on your PATH"))
    elif not on_path:
        steps.append(("alias exchange='python3 -m exchange'", "exchange is not on your PATH"))
    steps += [
        (f"exchange status sent --home {h}/ho", "what the HO sent, all PROCESSED"),
        (f"exchange status received --home {h}/{store}", f"what store {store} applied"),
        (f"exchange ui --home {h}/ho --port 8080", "the page: http://127.0.0.1:8080"),
        ("exchange --help", "every command, with examples"),
    ]
    width = max(len(cmd) for cmd, _ in steps)
    return ["", f"== next: try exchange on the demo's homes in {h}/ (ho, {', '.join(STORES)})",
            *(f"   {cmd:<{width}}  # {why}" for cmd, why in steps),
            "   (a real HO and store: README.md, \"Using it\"; HO runbook: docs/OPERATIONS.md)"]
