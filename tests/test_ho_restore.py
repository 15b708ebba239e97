"""The HO restored from its own backup: its home and database put back as they were some days ago.

After the backup the HO sent bundles the stores applied and applied bundles the stores sent (PROCESSED
acks); the restore forgets both. Real homes (the HO on SQLite and PostgreSQL, two stores on SQLite)
paired through a real ``dir:`` folder; every operator step is an ``exchange`` command.

How the HO is backed up and restored, honestly for each database: SQLite, a ``cp -a`` of the home and
of the database file with nothing open on them (a nightly job); PostgreSQL, the home by ``cp -a`` and
the database copied with ``CREATE DATABASE backup TEMPLATE node`` while no one is connected, put back
by dropping the node's database and creating it again from the copy (what a restore from a dump gives:
every table of the node as it stood, sequences included).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from enginehelpers import Net, item_ids, make_net, prices, reprice, seed_ho, seed_store
from sqlalchemy import create_engine, make_url, select, text, update
from test_restore import HO_TYPES, lane_rows, STORE_TYPES, docs, doctor, keys_of, received_rows, run, sent_rows, settle, store_docs_of

from click.testing import CliRunner

from exchange.cli.main import main
from exchange.database import schema as sc
from exchange.database.capture import record_events
from exchange.database.tables import xchg_received
from exchange.node.home import Node
from exchange.service import status


SQLITE_FILES = ("", "-wal", "-shm", "-journal")



def _admin(url: str) -> Any:
    return create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")


def _copy_pg(url: str, src: str, dest: str) -> None:
    """``dest`` := a copy of database ``src`` (no one may be connected to ``src``)."""
    admin = _admin(url)
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname IN (:a, :b) AND pid <> pg_backend_pid()"), {"a": src, "b": dest})
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{dest}"')
            conn.exec_driver_sql(f'CREATE DATABASE "{dest}" TEMPLATE "{src}"')
    finally:
        admin.dispose()


def ho_backup(net: Net, dest: Path) -> None:
    """The HO's nightly backup: its home, and its database, with nothing open on them."""
    net.dispose()
    subprocess.run(["cp", "-a", str(net.ho.cfg.home), str(dest / "home")], check=True)
    url = make_url(net.ho.cfg.database)
    if url.get_backend_name() == "sqlite":  # the file and its journal, if a crash left one
        for suffix in SQLITE_FILES:
            if Path(f"{url.database}{suffix}").exists():
                subprocess.run(["cp", "-a", f"{url.database}{suffix}", str(dest / f"node.db{suffix}")], check=True)
    else:
        _copy_pg(str(url), str(url.database), f"{url.database}_bak")
    net.reopen()


def ho_restore(net: Net, src: Path) -> None:
    """The HO put back from :func:`ho_backup`: home and database as they were then."""
    net.dispose()
    home = net.ho.cfg.home
    url = make_url(net.ho.cfg.database)
    shutil.rmtree(home)
    subprocess.run(["cp", "-a", str(src / "home"), str(home)], check=True)
    if url.get_backend_name() == "sqlite":  # every file of the database replaced (a WAL left would replay)
        for suffix in SQLITE_FILES:
            Path(f"{url.database}{suffix}").unlink(missing_ok=True)
            if (src / f"node.db{suffix}").exists():
                subprocess.run(["cp", "-a", str(src / f"node.db{suffix}"), f"{url.database}{suffix}"], check=True)
    else:
        _copy_pg(str(url), f"{url.database}_bak", str(url.database))
    net.reopen()


def _drop_backup(net: Net) -> None:
    url = make_url(net.ho.cfg.database)
    if url.get_backend_name() != "sqlite":
        admin = _admin(str(url))
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}_bak"')
        finally:
            admin.dispose()


def edit_customer(node: Node, sid: str, phone: str) -> None:
    """A new phone for ``sid``'s first customer, captured as an application would."""
    with node.engine.begin() as conn:
        cid = conn.execute(select(sc.customer.c.customer_id).where(sc.customer.c.store_id == sid)
                           .order_by(sc.customer.c.customer_id).limit(1)).scalar_one()
        conn.execute(update(sc.customer).where(sc.customer.c.store_id == sid, sc.customer.c.customer_id == cid)
                     .values(phone=phone))
        record_events(conn, "customer", [(sid, cid)])


def phones(node: Node, sid: str) -> dict[str, Any]:
    with node.engine.connect() as conn:
        return {r[0]: r[1] for r in conn.execute(select(sc.customer.c.customer_id, sc.customer.c.phone)
                                                 .where(sc.customer.c.store_id == sid))}


def lost_days(net: Net, tmp_path: Path) -> dict[str, Any]:
    """Back up the HO, run three synced days (prices at the HO, sales and customers at both stores),
    restore the HO. Returns what the HO held of the stores' documents before the restore."""
    for sid in net.stores:
        seed_store(net, sid, sales=3)
    net.settle()
    edit_customer(net.ho, "s002", "700")  # an HO edit from before the backup: the backup keeps it
    net.settle()
    (tmp_path / "bak").mkdir()
    ho_backup(net, tmp_path / "bak")
    ids = item_ids(net)
    for day in range(3):
        for n, sid in enumerate(net.stores):
            seed_store(net, sid, sales=2, seed=10 * (day + 1) + n)
        reprice(net.ho, ids[day * 2:day * 2 + 2])
        if day == 1:  # customers (editable at both ends): one changed at the HO, one at its store
            edit_customer(net.ho, "s001", "900")
            edit_customer(net.store("s002"), "s002", "800")
        net.settle()
    assert phones(net.store("s001"), "s001") == phones(net.ho, "s001")  # the HO's edit reached s001
    assert "900" in phones(net.ho, "s001").values() and "800" in phones(net.ho, "s002").values()
    held = {sid: store_docs_of(net.ho, sid) for sid in net.stores}
    before = {sid: docs(net.ho, STORE_TYPES, held[sid]) for sid in net.stores}
    ho_restore(net, tmp_path / "bak")
    _drop_backup(net)
    return {"held": held, "docs": before, "ids": ids,
            "store_prices": {sid: prices(net.store(sid), ids[:6]) for sid in net.stores}}


def test_the_ho_restored_from_a_backup_is_stuck_until_repaired(net: Net, tmp_path: Path) -> None:
    """Before the repair: the streams are stuck both ways, nothing is lost silently, and both ends say so.

    - the HO's next bundle to a store reuses a seq the store applied in the lost days: the store
      quarantines it (``already applied from a different file``); its doctor fails ``streams went back``
      with the repair to run at the HO and the seq it must go above (before this repair existed, the
      store's doctor was all green);
    - a store's next bundle is ahead of the HO's restored position: it WAITs at the HO for seqs the HO
      applied before the restore and lost;
    - the HO's new price does not reach the stores; the stores' documents of the lost days are missing
      at the HO (they stay at the stores, nothing deleted).
    """
    seen = lost_days(net, tmp_path)
    ids = seen["ids"]
    reprice(net.ho, ids[:1], delta="5.00")
    for sid in net.stores:
        seed_store(net, sid, sales=1, seed=90)
    for _ in range(3):
        net.cycle()
    for sid in net.stores:
        store = net.store(sid)
        q = [r for r in status.received(store) if r.peer == "ho" and r.status == "QUARANTINED"]
        assert q and "already applied from a different file" in (q[0].reason or ""), net.describe()
        w = [r for r in status.received(net.ho) if r.peer == sid and r.status == "WAITING"]
        assert w, net.describe()
        # the lost days' documents of the store are missing at the HO, still at the store
        lost = {t: sorted(set(seen["held"][sid][t]) - set(store_docs_of(net.ho, sid)[t])) for t in STORE_TYPES}
        assert lost["sales_bill"] and all(k in store_docs_of(store, sid)["sales_bill"] for k in lost["sales_bill"])
        # the HO's new price never arrives
        assert prices(store, ids[:1]) == {ids[0]: seen["store_prices"][sid][ids[0]]}
        assert prices(store, ids[:1]) != prices(net.ho, ids[:1])
    # the HO sees its stores WAITING (its doctor hints at a restore); each store names the repair, with the
    # seq the HO's restart must go above: the last of the HO's stream it applied
    check = doctor(net, net.ho)["streams"]
    assert not check["ok"] and "WAITING" in check["detail"] and "--above N" in check["fix"], check
    assert [r.seq for r in sent_rows(net.ho, "s001")] == [1, 2]  # the HO numbers again from its backup
    assert [r.seq for r in received_rows(net.ho, "s001") if r.status == "APPLIED"] == [1]
    for sid in net.stores:
        applied = [r.seq for r in received_rows(net.store(sid), "ho") if r.status == "APPLIED"]
        assert above_named(net, sid) == max(applied) >= 4


def above_named(net: Net, sid: str) -> int:
    """The repair the store's doctor names for its HO gone back: ``--above N``."""
    check = doctor(net, net.store(sid))["streams went back"]
    assert not check["ok"] and "ho went back in time" in check["detail"], check
    m = re.search(r"exchange peer restart --peer (\w+) --above (\d+) --reason TEXT", check["fix"])
    assert m and m.group(1) == sid, check
    return int(m.group(2))


def test_the_ho_restored_from_a_backup_is_repaired_per_store(net: Net, tmp_path: Path) -> None:
    """docs/OPERATIONS.md "The HO restored from a backup", followed literally: each store's doctor names
    `exchange peer restart --peer STORE --above N`; run at the HO, then sync. Every store document the HO
    had in the lost days is back at the HO row for row, the HO's edits after the repair reach every store
    and win, no stream is stuck, and the HO's archive verifies."""
    repaired(net, tmp_path)


def test_the_ho_restored_from_a_backup_is_repaired_in_every_lane(tmp_path: Path, db_url: str) -> None:
    """The same with the reference lanes (masters, orders, sales, main): the restart in the default lane
    re-bases every lane of both directions."""
    from test_lanes import with_catalog

    n = make_net(tmp_path / "net", ho_db=db_url)
    try:
        with_catalog(n, {"lanes": "reference"})
        seed_ho(n)
        n.settle()
        repaired(n, tmp_path, gap=False)
    finally:
        n.dispose()


def repaired(net: Net, tmp_path: Path, gap: bool = True) -> None:
    seen = lost_days(net, tmp_path)
    ids = seen["ids"]
    reprice(net.ho, ids[:1], delta="5.00")  # an edit made at the restored HO before anyone noticed
    for sid in net.stores:
        seed_store(net, sid, sales=1, seed=90)
    for _ in range(2):
        net.cycle()
    aboves = {sid: above_named(net, sid) for sid in net.stores}
    assert all(a >= 1 for a in aboves.values()), aboves
    for sid, above in aboves.items():
        out = run(net, net.ho, "peer", "restart", "--peer", sid, "--above", str(above),
                  "--reason", "HO restored from Sunday's backup")
        assert f"restart sealed for {sid}" in out.output, out.output
        assert f"the restart goes above seq {above}" in out.output, out.output
    settle(net, rounds=10)
    ho = net.ho
    assert "900" in phones(net.ho, "s001").values() and "800" in phones(net.ho, "s002").values()
    for sid in net.stores:
        store = net.store(sid)
        # every store document the HO had in the lost days is back, row for row
        lost = seen["held"][sid]
        assert docs(ho, STORE_TYPES, lost) == seen["docs"][sid], sid
        mine = store_docs_of(store, sid)
        assert docs(ho, STORE_TYPES, mine) == docs(store, STORE_TYPES, mine), sid
        # the HO's documents at the store are the HO's (its restored masters win, the edit made since too)
        assert docs(store, HO_TYPES) == docs(ho, HO_TYPES, {t: keys_of(store, t) for t in HO_TYPES}), sid
        assert doctor(net, store)["streams went back"]["ok"] and doctor(net, store)["streams"]["ok"]
        for lane, got in lane_rows(ho, xchg_received, sid).items():  # each lane contiguous, APPLIED once
            assert [r.seq for r in got] == list(range(1, len(got) + 1)), (lane, [(r.seq, r.status) for r in got])
            assert all(r.status == "APPLIED" for r in got), lane
        assert all(r.status == "PROCESSED" for r in sent_rows(store, "ho"))
    # the HO's edits after the repair reach every store and win
    reprice(net.ho, ids[:4], delta="0.25")
    settle(net)
    edit_customer(net.ho, "s001", "777")
    settle(net)
    for sid in net.stores:
        assert prices(net.store(sid), ids[:6]) == prices(net.ho, ids[:6]), sid
        assert phones(net.store(sid), sid) == phones(net.ho, sid), sid
    assert "777" in phones(net.store("s001"), "s001").values()
    assert doctor(net, net.ho)["streams"]["ok"] and doctor(net, net.ho)["streams went back"]["ok"]
    for node in net.nodes:  # the customer changed at the HO before the backup, then at its store in the lost
        # days, came back without a conflict (its base, a version of the lost days, is read as the newest kept)
        assert json.loads(cli_out(node))["conflicts"] == [], node.id
    res = CliRunner().invoke(main, ["audit", "verify", "--home", str(net.ho.cfg.home), "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    found = [f for st in json.loads(res.output)["streams"] for f in st["findings"]]
    assert {f["severity"] for f in found} == {"warning"} and {f["check"] for f in found} == {"restart"}
    if gap:  # the HO's bundles of the lost days its archive lacks: before the restart, a warning
        assert any("bundles missing (seq 3..4)" in f["message"] for f in found), found
    for sid, above in aboves.items():  # the restart's state at both ends
        at_store = json.loads(run(net, net.store(sid), "peer", "restarts", "--json").output)["restarts"]
        applied = [e for e in at_store if e["kind"] == "applied"]
        assert len(applied) == 1 and applied[0]["detail"]["ho_went_back"] == above
        assert applied[0]["detail"]["versions_forgotten"] > 0
        assert [e["resolved_at"] is not None for e in at_store if e["kind"] == "detected"] == [True]
        at_ho = json.loads(run(net, net.ho, "peer", "restarts", "--peer", sid, "--json").output)["restarts"]
        assert [(e["kind"], e["seq"], e["resolved_at"] is not None) for e in at_ho] == [("sent", above + 1, True)]
    assert json.loads(run(net, net.store("s001"), "peer", "restarts", "--json").output)["restarts"][0][
        "detail"]["ho_edits_sent_back"] >= 1


def test_the_records_ho_went_back_is_parsed_strictly() -> None:
    """``ho_went_back`` (FORMAT.md 4.2, format 7) as a hostile HO could write it: a seq 1 .. MAX_SEQ or a
    FormatError; written only when set, so a record without it is format 6's."""
    from datetime import UTC, datetime

    from exchange.errors import FormatError
    from exchange.wire.formats import MAX_SEQ
    from exchange.wire.restart import WENT_BACK_FIELD, Restart, parse_restart

    sha = "cd" * 32
    rec = Restart("admin", datetime(2026, 12, 3, tzinfo=UTC), "HO restored", 1, sha, 40, ((1, sha),), (), 4)
    good = rec.as_json()
    assert good[WENT_BACK_FIELD] == 4 and parse_restart(json.loads(json.dumps(good))) == rec
    assert WENT_BACK_FIELD not in Restart("a", rec.at, "r", 0, None, 0, ()).as_json()
    for bad in (0, -1, MAX_SEQ + 1, "4", 4.0, True, None, [4]):
        with pytest.raises(FormatError, match=WENT_BACK_FIELD):
            parse_restart({**good, WENT_BACK_FIELD: bad})


def test_a_restart_without_above_after_the_ho_went_back_is_refused_then_repaired(net: Net, tmp_path: Path) -> None:
    """The operator forgets `--above`: the restart's seq is one the store already applied, so the store
    quarantines it as it would any replay and keeps naming `--above N`; the restart run again with it
    repairs everything (the first one, never answered, is replaced)."""
    seen = lost_days(net, tmp_path)
    reprice(net.ho, seen["ids"][:1], delta="5.00")  # the restored HO sends something: the stores see it
    for _ in range(2):
        net.cycle()
    above = above_named(net, "s001")
    run(net, net.ho, "peer", "restart", "--peer", "s001", "--reason", "HO restored")
    for _ in range(2):
        net.cycle()
    q = [r for r in status.received(net.store("s001")) if r.status == "QUARANTINED"]
    assert len(q) >= 2 and all("already applied from a different file" in (r.reason or "") for r in q)
    assert above_named(net, "s001") == above
    run(net, net.ho, "peer", "restart", "--peer", "s001", "--above", str(above), "--reason", "HO restored")
    run(net, net.ho, "peer", "restart", "--peer", "s002", "--above", str(above_named(net, "s002")),
        "--reason", "HO restored")
    settle(net, rounds=10)
    ho, store = net.ho, net.store("s001")
    assert docs(ho, STORE_TYPES, seen["held"]["s001"]) == seen["docs"]["s001"]
    assert docs(store, HO_TYPES) == docs(ho, HO_TYPES, {t: keys_of(store, t) for t in HO_TYPES})
    at_ho = json.loads(run(net, ho, "peer", "restarts", "--peer", "s001", "--json").output)["restarts"]
    assert [(e["kind"], e["resolved_at"] is not None) for e in at_ho] == [("sent", True), ("sent", True)]
    assert doctor(net, store)["streams went back"]["ok"] and doctor(net, ho)["streams"]["ok"]
    assert "the HO went back (above seq" in run(net, store, "peer", "restarts").output


def cli_out(node: Node) -> str:
    """``exchange status conflicts --json`` of ``node``."""
    return CliRunner().invoke(main, ["status", "conflicts", "--json", "--home", str(node.cfg.home)],
                              catch_exceptions=False).output
