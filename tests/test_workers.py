"""Several importer workers on one HO: streams in parallel, each in order, kills lose nothing.

Real worker processes (`exchange worker`) on a real database (SQLite and
PostgreSQL): six stores' streams of several bundles each land at once; one
worker is killed with SIGKILL in the middle of an apply; the others finish.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from exchange.database.schema import RETAIL
from exchange.database.tables import xchg_received, xchg_stream_in
from exchange.demo.data import seed_masters, seed_store_activity
from exchange.node import keys
from exchange.node.home import Node, init_home
from exchange.node.peers import add_peer
from exchange.receive.locks import try_lock
from exchange.receive.workers import import_parallel
from exchange.send.export import export_all

STORES = [f"s{i:03d}" for i in range(1, 7)]
ROUNDS = 3


def build(tmp: Path, ho_db: str) -> tuple[Node, list[Node]]:
    """An HO with six stores; each store seals ROUNDS bundles of sales for the HO."""
    ho = Node(init_home(tmp / "ho", "ho", "ho", database=ho_db))
    stores = [Node(init_home(tmp / s, s, "store")) for s in STORES]
    for st in stores:
        add_peer(ho.cfg, st.id, "store", keys.public_signing_line(st.cfg), keys.recipient(st.cfg))
        add_peer(st.cfg, "ho", "ho", keys.public_signing_line(ho.cfg), keys.recipient(ho.cfg))
    ho = Node.open(ho.cfg.home)
    with ho.engine.begin() as conn:
        items = [k[0] for k in seed_masters(conn, 20, STORES, {s: "all" for s in STORES})["item"]]
    for st in stores:
        node = Node.open(st.cfg.home)
        with node.engine.begin() as conn:  # the store needs the items its sales name
            RETAIL.tables["item"].create(conn, checkfirst=True)
        with ho.engine.connect() as src, node.engine.begin() as dst:
            rows = [dict(r._mapping) for r in src.execute(select(RETAIL.tables["item"]))]
            dst.execute(RETAIL.tables["item"].insert(), rows)
        for r in range(ROUNDS):
            with node.engine.begin() as conn:
                seed_store_activity(conn, node.id, items, 5, seed=r)
            export_all(node)
        for f in node.cfg.outbox.glob("*.bundle"):
            shutil.copy(f, ho.cfg.inbox / f.name)
    return ho, [Node.open(s.cfg.home) for s in stores]


def sales_count(node: Node, store: str) -> int:
    t = RETAIL.tables["sales_bill_line"]
    with node.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(t).where(t.c.store_id == store)).scalar() or 0)


def check_all_applied(ho: Node, stores: list[Node]) -> None:
    with ho.engine.connect() as conn:
        status = conn.execute(select(xchg_received.c.peer, xchg_received.c.seq, xchg_received.c.status)).all()
        pos = dict(conn.execute(select(xchg_stream_in.c.peer, xchg_stream_in.c.last_seq)).all())
    assert sorted((p, s) for p, s, _ in status) == sorted((st.id, q) for st in stores for q in range(1, ROUNDS + 1))
    assert {st for _, _, st in status} == {"APPLIED"}
    assert pos == {st.id: ROUNDS for st in stores}
    for st in stores:  # every line once: nothing lost, nothing applied twice
        assert sales_count(ho, st.id) == sales_count(st, st.id) > 0


def wait_applied(ho: Node, n: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with ho.engine.connect() as conn:
            done = conn.execute(select(func.count()).select_from(xchg_received)
                                .where(xchg_received.c.status == "APPLIED")).scalar()
        if done == n:
            return True
        time.sleep(0.2)
    return False


def test_workers_apply_streams_in_parallel_and_survive_a_kill(tmp_path: Path, db_url: str) -> None:
    ho, stores = build(tmp_path, db_url)
    env = dict(os.environ)
    exe = [sys.executable, "-m", "exchange", "worker", "--home", str(ho.cfg.home), "--poll", "0.1"]
    victim = subprocess.Popen(exe, env={**env, "EXCHANGE_CRASH_AT": "import.applied:2"},
                              stderr=subprocess.DEVNULL)
    assert victim.wait(timeout=120) == -signal.SIGKILL  # died in the middle of its second apply
    others = [subprocess.Popen(exe, env=env, stderr=subprocess.DEVNULL) for _ in range(3)]
    try:
        assert wait_applied(ho, len(stores) * ROUNDS, 180)
    finally:
        for p in others:
            p.send_signal(signal.SIGTERM)
        for p in others:
            assert p.wait(timeout=60) == 0
    check_all_applied(ho, stores)
    assert not list(ho.cfg.inbox.glob("*.bundle"))
    acks = sorted(p.name for p in ho.cfg.outbox.glob("*.ack"))
    assert len(acks) == len(stores) * ROUNDS


def test_import_parallel_pool(tmp_path: Path, db_url: str) -> None:
    ho, stores = build(tmp_path, db_url)
    outcomes = import_parallel(ho, 3)
    assert sum(1 for o in outcomes if o["status"] == "APPLIED") == len(stores) * ROUNDS
    check_all_applied(ho, stores)


def test_stream_lock_excludes_a_second_holder(tmp_path: Path, db_url: str) -> None:
    node = Node(init_home(tmp_path / "ho", "ho", "ho", database=db_url))
    other = Node.open(node.cfg.home)
    with try_lock(node, "bundle-s001") as first:
        assert first
        with try_lock(other, "bundle-s001") as second:
            assert not second
        with try_lock(other, "bundle-s002") as third:
            assert third
    with try_lock(other, "bundle-s001") as again:
        assert again
