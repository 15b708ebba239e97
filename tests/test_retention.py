"""``exchange archive prune`` also purges the database's bookkeeping (exchange.service.retention),
through the CLI on SQLite and PostgreSQL: only what is older than the retention, delivered and
acknowledged; the newest event of every document, the stream heads and anything in flight stay;
the exchange goes on as before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, item_ids, make_net, prices, reprice, seed_ho, seed_store, snapshot
from sqlalchemy import func, select, update

from exchange.cli import main
from exchange.database.tables import XCHG, xchg_event, xchg_received, xchg_sent
from exchange.node.home import Node
from exchange.service.sync import push


def run(*args: str) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def cli_sync(node: Node) -> None:
    run("sync", "--home", str(node.cfg.home))


def settle(n: Net) -> None:
    for _ in range(3):
        for node in n.nodes:
            cli_sync(node)
    n.dispose()


def age(node: Node, days: int) -> None:
    """Every bookkeeping time of ``node`` moved ``days`` back (a month passed)."""
    back = timedelta(days=days)
    cols = {"xchg_event": ("created_at",), "xchg_sent": ("created_at", "uploaded_at", "processed_at"),
            "xchg_received": ("received_at", "applied_at")}
    with node.engine.begin() as conn:
        for name, names in cols.items():
            t = XCHG.tables[name]
            pk = list(t.primary_key.columns)
            for col in names:
                c = t.c[col]
                for row in conn.execute(select(*pk, c).where(c.is_not(None))).all():  # by key: SQLite's texts vary
                    conn.execute(update(t).where(*[k == v for k, v in zip(pk, row[:-1], strict=True)])
                                 .values({col: row[-1] - back}))
    node.engine.dispose()


def counts(node: Node) -> dict[str, int]:
    with node.engine.connect() as conn:
        return {t: int(conn.execute(select(func.count()).select_from(XCHG.tables[t])).scalar() or 0)
                for t in ("xchg_event", "xchg_received", "xchg_sent", "xchg_delivery")}


def prune(node: Node, *extra: str) -> dict[str, Any]:
    out = json.loads(run("archive", "prune", "--home", str(node.cfg.home), "--older-than", "30", "--json",
                         *extra).output)
    node.engine.dispose()
    return out


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001",))
    seed_ho(n, items=6)
    n.dispose()
    settle(n)
    ids = item_ids(n)
    for k in range(3):  # history: each price changed three times, sales sent three times
        reprice(n.ho, ids, f"0.{k + 1}0")
        seed_store(n, "s001", sales=2, seed=k + 1)
        n.dispose()
        settle(n)
    yield n
    n.dispose()


def test_prune_purges_old_acknowledged_bookkeeping_only(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    ids = item_ids(net)
    # in flight: one more price change sealed and uploaded, never acknowledged (the store is away)
    reprice(ho, ids[:2], "0.90")
    net.dispose()
    cli_sync(ho)
    age(ho, 40)
    age(st, 40)
    before_ho, before_st = counts(ho), counts(st)
    with ho.engine.connect() as conn:
        unacked = conn.execute(select(xchg_sent.c.seq).where(xchg_sent.c.status == "UPLOADED")).scalars().all()
    assert len(unacked) == 1

    dry = prune(ho, "--dry-run")
    assert dry["database"]["events"] > 0 and dry["database"]["sent"] > 0 and dry["database"]["received"] > 0
    assert counts(ho) == before_ho  # a dry run changes nothing
    got = prune(ho)
    assert got["database"] == dry["database"]  # and counts exactly what the real run removes
    after = counts(ho)
    assert after["xchg_event"] == before_ho["xchg_event"] - got["database"]["events"]
    assert after["xchg_sent"] == before_ho["xchg_sent"] - got["database"]["sent"]
    assert after["xchg_received"] == before_ho["xchg_received"] - got["database"]["received"]
    assert prune(ho)["database"] == {"events": 0, "received": 0, "deliveries": 0, "sent": 0}
    with ho.engine.connect() as conn:
        # the newest event of every document stays, and the bundle in flight with its events
        per_doc = conn.execute(select(xchg_event.c.doc_type, xchg_event.c.doc_key, func.count())
                               .group_by(xchg_event.c.doc_type, xchg_event.c.doc_key)).all()
        assert per_doc and all(n >= 1 for _t, _k, n in per_doc)
        assert len(per_doc) == len(set((t, k) for t, k, _n in per_doc))
        assert conn.execute(select(xchg_sent.c.seq).where(xchg_sent.c.status == "UPLOADED")).scalars().all() == unacked
        # the stream heads: the newest PROCESSED bundle to the store, the newest bundle from it
        assert conn.execute(select(func.count()).select_from(xchg_sent).where(
            xchg_sent.c.status == "PROCESSED")).scalar() == 1
        assert conn.execute(select(func.count()).select_from(xchg_received)).scalar() == 1

    # the store: its log events that went in PROCESSED bundles and were superseded, its old received rows
    before = snapshot(st)
    got_st = prune(st)
    assert got_st["database"]["received"] > 0 and counts(st)["xchg_received"] == 1
    kept = snapshot(st)
    for table in ("item", "sales_bill", "sales_bill_line"):
        assert kept[table] == before[table]  # business rows untouched

    # the exchange goes on: the bundle in flight is applied and acknowledged, a new change too
    reprice(ho, ids[2:4], "0.95")
    seed_store(net, "s001", sales=1, seed=9)
    net.dispose()
    settle(net)
    assert prices(st, ids) == prices(ho, ids)
    assert {r["status"] for r in json.loads(run("status", "sent", "--home", str(ho.cfg.home), "--json").output)
            ["bundles"]} == {"PROCESSED"}
    run("audit", "verify", str(ho.cfg.home / "archive"), "--home", str(ho.cfg.home))
