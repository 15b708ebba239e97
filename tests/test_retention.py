"""``exchange archive prune`` also purges the database's bookkeeping (exchange.service.retention),
through the CLI on SQLite and PostgreSQL: only what is older than the retention, delivered and
acknowledged; the newest event of every document, the stream heads and anything in flight stay;
the exchange goes on as before."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, add_item, item_ids, make_net, prices, reprice, seed_ho, seed_store, snapshot
from sqlalchemy import delete, func, select, update

from exchange.cli import main
from exchange.database import rows
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.errors import BundleError
from exchange.database.tables import (
    XCHG, xchg_doc_local, xchg_doc_version, xchg_event, xchg_parked, xchg_received, xchg_sent,
    xchg_stream_in,
)
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
            "xchg_received": ("received_at", "applied_at"), "xchg_doc_version": ("deleted_at",),
            "xchg_conflict": ("detected_at", "resolved_at"), "xchg_doc_local": ("changed_at",)}
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
    assert prune(ho)["database"] == {"events": 0, "received": 0, "deliveries": 0, "sent": 0, "conflicts": 0,
                                     "versions": 0}
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


# ---------------------------------------------------------------- versions of deleted documents (#18)

def bill_nos(node: Node) -> set[str]:
    with node.engine.connect() as conn:
        return set(conn.execute(select(s.sales_bill.c.bill_no).where(s.sales_bill.c.store_id == "s001")).scalars())


def versions(node: Node) -> dict[tuple[str, str, str], int]:
    v = xchg_doc_version.c
    with node.engine.connect() as conn:
        return {(p, t, k): int(n) for p, t, k, n in conn.execute(select(v.peer, v.doc_type, v.doc_key, v.version))}


def tombstone(node: Node, key: str) -> Any:
    v = xchg_doc_version.c
    with node.engine.connect() as conn:
        return conn.execute(select(xchg_doc_version).where(v.doc_type == "sales_bill", v.doc_key == key)).first()


def delete_bill(store: Node, bill_no: str) -> None:
    """The store deletes a bill (lines and payments with it) and records the delete, as its POS would."""
    with store.engine.begin() as conn:
        for t in (s.sales_bill_payment, s.sales_bill_line, s.sales_bill):
            conn.execute(delete(t).where(t.c.store_id == "s001", t.c.bill_no == bill_no))
        record_events(conn, "sales_bill", [("s001", bill_no)], op="D")


def touch_grc(store: Node) -> None:
    """Another change of the store's (a GRC sent again), after the delete: the store's clock moves on."""
    with store.engine.begin() as conn:
        grc = conn.execute(select(s.grc.c.store_id, s.grc.c.grc_no).limit(1)).one()
        record_events(conn, "grc", [tuple(grc)])


def test_a_deleted_documents_version_goes_only_beyond_the_retention_and_once_its_stream_moved_on(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    gone, *_others = sorted(bill_nos(ho))
    key = rows.canonical_key(["s001", gone])
    old_copies = sorted(p.name for p in st.cfg.archive_sent.glob("s001.ho.*.bundle"))  # the bill came in one
    delete_bill(st, gone)
    touch_grc(st)  # a later version in the same bundle: the delete is not the store's newest version
    net.dispose()
    settle(net)
    assert gone not in bill_nos(ho)
    stone = tombstone(ho, key)
    assert stone is not None and stone.deleted_at is not None and stone.deleted_lane == "main"
    with ho.engine.connect() as conn:  # the delete came in the stream's last bundle, with the GRC after it
        assert conn.execute(select(xchg_stream_in.c.last_seq).where(
            xchg_stream_in.c.peer == "s001", xchg_stream_in.c.lane == "main")).scalar() == stone.deleted_seq
    assert prune(ho)["database"]["versions"] == 0, "within the retention"
    age(ho, 40)
    assert prune(ho)["database"]["versions"] == 0, "beyond it, but the stream stopped at the delete's bundle"
    assert tombstone(ho, key) is not None

    touch_grc(st)  # the stream moves on: a later bundle
    net.dispose()
    settle(net)
    before = versions(ho)
    assert prune(ho, "--dry-run")["database"]["versions"] == 1
    assert tombstone(ho, key) is not None, "a dry run changes nothing"
    assert prune(ho)["database"]["versions"] == 1
    assert tombstone(ho, key) is None
    after = versions(ho)
    assert {k: n for k, n in before.items() if k[2] != key} == {k: after[k] for k in before if k[2] != key}, \
        "the versions of live documents are untouched"
    assert prune(ho)["database"]["versions"] == 0

    # an older copy of the bill arrives again (every bundle the store sent before the delete, as a peer or a
    # transport might deliver it twice): behind the stream's position, it is never applied; the bill stays deleted
    for name in old_copies:
        shutil.copy2(st.cfg.archive_sent / name, ho.cfg.inbox / name)
    res = CliRunner().invoke(main, ["import", "--home", str(ho.cfg.home), "--json"], catch_exceptions=False)
    ho.engine.dispose()
    assert res.exit_code == BundleError.exit_code, res.output
    assert {f["status"] for f in json.loads(res.stdout)} == {"QUARANTINED"}
    assert gone not in bill_nos(ho) and tombstone(ho, key) is None
    # and the exchange goes on
    reprice(ho, item_ids(net)[:1], "0.05")
    touch_grc(st)
    net.dispose()
    settle(net)
    assert bill_nos(ho) == bill_nos(st) and prices(st, item_ids(net)) == prices(ho, item_ids(net))


def test_a_deleted_documents_version_stays_while_a_bundle_from_its_peer_waits(net: Net, tmp_path: Path) -> None:
    """A bundle of the peer's held here unapplied (WAITING for an earlier one) keeps every tombstone of that
    peer: what it and its predecessor carry is not known yet."""
    ho, st = net.ho, net.store("s001")
    gone = sorted(bill_nos(ho))[0]
    key = rows.canonical_key(["s001", gone])
    delete_bill(st, gone)
    net.dispose()
    settle(net)
    touch_grc(st)  # the stream moves past the delete
    net.dispose()
    settle(net)
    touch_grc(st)
    cli_sync(st)
    late = [p for p in net.transfer.rglob("s001.ho.*.bundle")]
    assert len(late) == 1
    aside = tmp_path / late[0].name
    shutil.move(late[0], aside)  # held up on its way
    touch_grc(st)
    cli_sync(st)
    cli_sync(ho)
    net.dispose()
    age(ho, 40)
    assert [r["status"] for r in json.loads(run("status", "received", "--home", str(ho.cfg.home), "--json").output)
            ["bundles"] if r["peer"] == "s001" and r["status"] != "APPLIED"] == ["WAITING"]
    assert prune(ho)["database"]["versions"] == 0 and tombstone(ho, key) is not None

    shutil.move(aside, late[0])  # it arrives: both apply
    settle(net)
    age(ho, 40)
    assert prune(ho)["database"]["versions"] == 1 and tombstone(ho, key) is None
    assert gone not in bill_nos(ho) and bill_nos(ho) == bill_nos(st)

def parked_count(node: Node) -> int:
    with node.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(xchg_parked)).scalar() or 0)


def test_a_deleted_documents_version_stays_while_a_document_of_its_type_is_parked(net: Net) -> None:
    """A bill parked at the HO (its line names an item the HO does not have) keeps the tombstones of its type:
    a parked copy older than a delete is kept out by the tombstone alone when it is retried. Once the store
    deletes that bill too, the automatic retry drops the parked copy as stale, and both tombstones go."""
    ho, st = net.ho, net.store("s001")
    with st.engine.begin() as conn:
        add_item(conn, "IZ")  # made at the store alone: never sent (items are the HO's)
        bill = dict(conn.execute(select(s.sales_bill).limit(1)).mappings().one())
        line = dict(conn.execute(select(s.sales_bill_line).limit(1)).mappings().one())
        conn.execute(s.sales_bill.insert().values({**bill, "bill_no": "BZ00000001"}))
        conn.execute(s.sales_bill_line.insert().values({**line, "bill_no": "BZ00000001", "item_id": "IZ"}))
        record_events(conn, "sales_bill", [("s001", "BZ00000001")])
    net.dispose()
    settle(net)
    assert parked_count(ho) == 1 and "BZ00000001" not in bill_nos(ho)
    gone = sorted(bill_nos(ho))[0]
    delete_bill(st, gone)
    net.dispose()
    settle(net)
    touch_grc(st)  # the stream moves past the delete
    net.dispose()
    settle(net)
    key = rows.canonical_key(["s001", gone])
    assert tombstone(ho, key) is not None and parked_count(ho) == 1
    age(ho, 40)
    assert prune(ho)["database"]["versions"] == 0 and tombstone(ho, key) is not None

    delete_bill(st, "BZ00000001")  # the parked copy is older than this delete: the retry after import drops it
    net.dispose()
    settle(net)
    touch_grc(st)
    net.dispose()
    settle(net)
    assert parked_count(ho) == 0
    age(ho, 40)
    assert prune(ho)["database"]["versions"] == 2 and tombstone(ho, key) is None
    run("retry", "--home", str(ho.cfg.home))
    ho.engine.dispose()
    assert "BZ00000001" not in bill_nos(ho) and gone not in bill_nos(ho)

def test_a_version_recorded_before_schema_15_stays_and_one_after_it_goes(net: Net) -> None:
    """`exchange migrate` from schema 14 adds the delete's time and bundle; a tombstone written before it has
    neither and stays (no one can say when it was applied), a delete applied after it is purged as usual."""
    ho, st = net.ho, net.store("s001")
    first, second = sorted(bill_nos(ho))[:2]
    delete_bill(st, first)
    net.dispose()
    settle(net)
    with ho.engine.begin() as conn:  # the version table as schema 14 had it
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_xchg_doc_version_deleted")
        for col in ("deleted_at", "deleted_lane", "deleted_seq"):
            conn.exec_driver_sql(f"ALTER TABLE xchg_doc_version DROP COLUMN {col}")
        conn.exec_driver_sql("UPDATE xchg_meta SET value = '14' WHERE key = 'schema_version'")
    ho.engine.dispose()
    assert "migrat" in run("migrate", "--home", str(ho.cfg.home)).output.lower()
    old = rows.canonical_key(["s001", first])
    assert tombstone(ho, old) is not None and tombstone(ho, old).deleted_at is None

    delete_bill(st, second)
    net.dispose()
    settle(net)
    touch_grc(st)
    net.dispose()
    settle(net)
    age(ho, 40)
    assert prune(ho)["database"]["versions"] == 1
    assert tombstone(ho, old) is not None and tombstone(ho, rows.canonical_key(["s001", second])) is None

# ---------------------------------------------------------------- the conflict log and local changes (#15)

C1 = ("s001", "C1")


@pytest.fixture
def both(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """An HO (SQLite, then PostgreSQL) and s001, whose customer C1 both ends edit; triggers on."""
    n = make_net(tmp_path / "both", ho_db=db_url, stores=("s001",))
    seed_ho(n, items=3)
    with n.store("s001").engine.begin() as conn:
        conn.execute(s.customer.insert().values(store_id="s001", customer_id="C1", name="Asha", phone="555",
                                                created_at=date(2024, 3, 1)))
        record_events(conn, "customer", [C1])
    for node in n.nodes:
        run("triggers", "install", "--home", str(node.cfg.home))
    n.dispose()
    settle(n)
    yield n
    n.dispose()


def edit_customer(node: Node, **values: Any) -> None:
    """A plain UPDATE, as a POS writes it: the capture triggers record the change."""
    with node.engine.begin() as conn:
        assert conn.execute(update(s.customer).where(s.customer.c.store_id == C1[0], s.customer.c.customer_id == C1[1])
                            .values(**values)).rowcount == 1
    node.engine.dispose()


def name_of(node: Node) -> Any:
    with node.engine.connect() as conn:
        return conn.execute(select(s.customer.c.name, s.customer.c.phone).where(
            s.customer.c.customer_id == C1[1])).one()


def set_policy(net: Net, policy: str) -> None:
    for node in net.nodes:
        node.cfg.catalog = {"conflicts": {"customer": policy}}
        node.cfg.save()
    net.reopen()


def logged(node: Node) -> list[tuple[str, str]]:
    out = json.loads(run("conflicts", "list", "--json", "--home", str(node.cfg.home)).output)["conflicts"]
    node.engine.dispose()
    return sorted((c["status"], c["policy"]) for c in out)


def local_rows(node: Node) -> int:
    with node.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(xchg_doc_local)).scalar() or 0)


def cli_cycle(net: Net, *order: str) -> None:
    for nid in order:
        cli_sync(net.node(nid))
    net.dispose()


def test_settled_conflicts_go_beyond_the_retention_an_open_one_and_the_local_changes_stay(both: Net) -> None:
    """A DECIDED conflict goes, an OPEN one stays; a RESOLVED one stays until its resolution is acknowledged.
    The local changes always stay: a store's is its only record of the version it gave the HO, which the HO's
    next change claims as its base (without it that change would be refused)."""
    ho, st = both.ho, both.store("s001")
    set_policy(both, "ho-wins")  # two concurrent edits, decided at both ends by the policy
    edit_customer(ho, name="Asha (HO)")
    time.sleep(1.1)
    edit_customer(st, name="Asha (store)")
    cli_cycle(both, "s001", "ho", "s001", "ho", "s001", "ho")
    decided = {n.id: logged(n) for n in (ho, st)}  # the end that saw the two changes meet logs it
    assert [("DECIDED", "ho-wins")] in decided.values() and set(map(len, decided.values())) <= {0, 1}
    set_policy(both, "manual")  # two more, held for a person at both ends
    ho, st = both.ho, both.store("s001")
    edit_customer(ho, phone="556")
    edit_customer(st, phone="557")
    cli_cycle(both, "s001", "ho", "s001", "ho")
    for node in (ho, st):
        assert logged(node) == sorted([*decided[node.id], ("OPEN", "manual")])
    assert local_rows(ho) == 1 and local_rows(st) == 1

    assert prune(ho)["database"]["conflicts"] == 0, "within the retention"
    for node in (ho, st):
        age(node, 40)
        assert prune(node)["database"]["conflicts"] == len(decided[node.id]), "the decided one goes"
        assert logged(node) == [("OPEN", "manual")]
        assert local_rows(node) == 1

    # resolved at the HO: the resolution is a change on its way to the store, so the log keeps it until the
    # store has acknowledged it
    cid = json.loads(run("conflicts", "list", "--open", "--json", "--home", str(ho.cfg.home)).output)["conflicts"][0]["id"]
    run("conflicts", "resolve", str(cid), "--keep", "theirs", "--by", "maria", "--home", str(ho.cfg.home))
    ho.engine.dispose()
    age(ho, 40)
    assert prune(ho)["database"]["conflicts"] == 0 and logged(ho) == [("RESOLVED", "manual")]
    cli_sync(ho)  # sent, not acknowledged yet
    age(ho, 40)
    assert prune(ho)["database"]["conflicts"] == 0 and logged(ho) == [("RESOLVED", "manual")]
    cli_cycle(both, "s001", "ho", "s001")
    assert logged(st) == [("RESOLVED", "manual")], "the resolution settled the store's held conflict"
    for node in (ho, st):
        age(node, 40)
        assert prune(node)["database"]["conflicts"] == 1, node.id
        assert logged(node) == [] and local_rows(node) == 1
    assert name_of(ho) == name_of(st) == ("Asha (HO)", "557")

    # the exchange goes on: edits both ways apply without a conflict (the HO's first: its base is the store's
    # version, which the store's local change vouches for), concurrent ones are still caught
    edit_customer(ho, phone="558")
    cli_cycle(both, "ho", "s001", "ho")
    edit_customer(st, name="Asha S.")
    cli_cycle(both, "s001", "ho", "s001")
    assert name_of(ho) == name_of(st) == ("Asha S.", "558")
    assert logged(ho) == logged(st) == []
    edit_customer(ho, name="Asha (HO again)")
    edit_customer(st, name="Asha (store again)")
    cli_cycle(both, "s001", "ho", "s001", "ho")
    assert logged(ho) == logged(st) == [("OPEN", "manual")]


def test_a_removed_peers_deleted_documents_versions_go_beyond_the_retention(net: Net) -> None:
    """A store removed from the HO sends nothing more: its last delete (the stream stops at it, and it is its
    newest version) goes beyond the retention all the same; its live documents' versions stay."""
    ho, st = net.ho, net.store("s001")
    gone = sorted(bill_nos(ho))[0]
    key = rows.canonical_key(["s001", gone])
    delete_bill(st, gone)
    net.dispose()
    settle(net)
    age(ho, 40)
    assert prune(ho)["database"]["versions"] == 0, "the stream stopped at the delete: it stays"
    run("peer", "remove", "--peer", "s001", "--reason", "store closed", "--home", str(ho.cfg.home))
    ho.engine.dispose()
    before = versions(ho)
    assert prune(ho)["database"]["versions"] == 1 and tombstone(ho, key) is None
    assert versions(ho) == {k: n for k, n in before.items() if k[2] != key}
    assert gone not in bill_nos(ho)


def test_an_old_bundle_delivered_again_after_its_record_was_purged_is_no_evidence_of_a_restore(net: Net) -> None:
    """After `archive prune` purged the HO's record of a store's old bundles, a copy of one arriving again
    (a stick or an SFTP folder replayed) is quarantined as what it most likely is, an old bundle, and not
    taken as evidence that the store went back in time (which would send the operator to `peer restart`)."""
    ho, st = net.ho, net.store("s001")
    age(ho, 40)
    prune(ho)
    with ho.engine.connect() as conn:
        low = conn.execute(select(func.min(xchg_received.c.seq)).where(xchg_received.c.peer == "s001")).scalar()
    assert low is not None and low > 1  # the store's first bundles are no longer on record
    old = st.cfg.archive_sent / "s001.ho.0000000001.bundle"
    shutil.copy(old, ho.cfg.inbox / old.name)
    res = CliRunner().invoke(main, ["import", "--home", str(ho.cfg.home)], catch_exceptions=False)
    assert res.exit_code == 10, res.output  # quarantined (docs/SERVICE.md)
    assert "purged by `archive prune`" in res.output and "old bundle delivered again" in res.output
    evidence = json.loads(run("peer", "restarts", "--home", str(ho.cfg.home), "--json").output)["restarts"]
    assert evidence == []
    doctor = json.loads(CliRunner().invoke(main, ["doctor", "--home", str(ho.cfg.home), "--json"]).output)
    assert {c["name"]: c["ok"] for c in doctor["checks"]}["streams went back"]
