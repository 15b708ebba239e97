"""The engine end to end: real node homes, real SQLite files (the HO also on PostgreSQL), real folders.

Each test builds an HO and stores the way an operator does (init, peer add),
moves bundles through the ``dir`` transport or by hand (a USB stick delivering
files late, twice, out of order or damaged), and checks both databases, the
Sent/Received views and the files on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from enginehelpers import (
    Net, add_item, add_promotion, check_net, deliver, doc_hashes, doc_versions, docs_of, flip_byte, forge_bundle,
    item_ids, make_net, outbox_bundles, prices, reprice, seed_ho, seed_store, sha, snapshot,
    table_counts,
)
from sqlalchemy import and_, func, insert, select, text, update

from exchange import __version__
from exchange.database import schema as s
from exchange.database.capture import install_triggers, record_events
from exchange.database.rows import canonical_key
from exchange.database.tables import xchg_delivery, xchg_event, xchg_restart, xchg_sent, xchg_stream_in
from exchange.demo.run import reconcile
from exchange.node.home import Node
from exchange.receive.importer import import_file, import_inbox
from exchange.send import export
from exchange.send.export import export_all
from exchange.service import status
from exchange.service.sync import pull, sync
from exchange.service.ui.jobs import Activity, TeeReporter
from exchange.wire import bundle
from exchange.wire.bundle import read_ack
from exchange.wire.crypto import sshsig
from exchange.wire.formats import ack_name, parse_name


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """HO on ``db_url`` (SQLite, then PostgreSQL), stores s001 (group north) and s002 (south) on SQLite."""
    n = make_net(tmp_path / "net", ho_db=db_url)
    yield n
    n.dispose()


def key(*values: str) -> str:
    return canonical_key(values)


def stream_pos(node: Node, peer: str) -> int:
    with node.engine.connect() as conn:
        return int(conn.execute(select(xchg_stream_in.c.last_seq).where(
            xchg_stream_in.c.peer == peer)).scalar() or 0)


def received(node: Node) -> dict[int, tuple[str, str | None]]:
    return {r.seq: (r.status, r.reason) for r in status.received(node) if r.peer == "ho"}


def sent_to(node: Node, peer: str) -> dict[int, Any]:
    return {r.seq: r for r in status.sent(node) if r.peer == peer}


# ---------------------------------------------------------------- full round trip

def test_round_trip_ho_and_two_stores(net: Net) -> None:
    ho, s1, s2 = net.ho, net.store("s001"), net.store("s002")
    seed_ho(net)
    net.settle()
    for i, sid in enumerate(net.stores):
        seed_store(net, sid, sales=10, seed=i)
    reprice(ho, item_ids(net)[:5])
    net.settle()

    for node in net.nodes:
        sent, got = status.sent(node), status.received(node)
        assert sent and {r.status for r in sent} == {"PROCESSED"}, node.id
        assert got and {r.status for r in got} == {"APPLIED"}, node.id
    rec = reconcile(ho, [s1, s2])
    assert len(rec) == 2 * len(ho.catalog) and all(r["ok"] for r in rec), [r for r in rec if not r["ok"]]
    assert check_net(net).problems == []

    # routing: masters everywhere, a store's own documents only to it, sales from both at the HO
    ho_n, n1, n2 = table_counts(ho), table_counts(s1), table_counts(s2)
    for t in ("item", "item_barcode"):
        assert ho_n[t] == n1[t] == n2[t] > 0
    assert (n1["promotion"], n2["promotion"]) == (2, 1)  # the group deal goes to group "north" only
    for t in ("transfer_order", "sales_order", "sales_invoice", "audit_plan"):
        assert (ho_n[t], n1[t], n2[t]) == (2, 1, 1), t
    for t in ("sales_bill", "sales_bill_line", "sales_bill_payment", "customer", "grc", "grt_line"):
        assert ho_n[t] == n1[t] + n2[t] > 0, t
    with s2.engine.connect() as conn:
        assert set(conn.execute(select(s.transfer_order.c.dest_store)).scalars()) == {"s002"}


# ---------------------------------------------------------------- order, gaps, duplicates

def test_shuffled_gap_and_duplicate(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    ids = item_ids(net)
    export_all(ho)
    first = prices(ho, ids)
    for r in range(3):  # three more export rounds, each changing other items
        reprice(ho, ids[3 * r:3 * r + 3], f"{r + 1}.00")
        export_all(ho)
    files = outbox_bundles(ho, "s001")
    assert [parse_name(f.name).seq for f in files] == [1, 2, 3, 4]

    # delivered shuffled (4, 1, 3, then 4 again), seq 2 missing
    outs = []
    for f in (files[3], files[0], files[2], files[3]):
        deliver([f], st)
        outs += import_inbox(st)
    assert outs[0].status == "WAITING"
    view = received(st)
    assert view[1][0] == "APPLIED"
    assert view[3][0] == view[4][0] == "WAITING"
    assert "waiting for seq 2" in (view[3][1] or "") and "waiting for seq 2" in (view[4][1] or "")
    assert 2 not in view
    assert stream_pos(st, "ho") == 1
    assert prices(st, ids) == first  # nothing past the gap applied
    assert (st.cfg.inbox / files[2].name).exists() and (st.cfg.inbox / files[3].name).exists()

    # the missing one arrives: 2, 3, 4 apply in order
    deliver([files[1]], st)
    outs = import_inbox(st)
    assert [(o.seq, o.status) for o in outs] == [(2, "APPLIED"), (3, "APPLIED"), (4, "APPLIED")]
    assert {seq: v[0] for seq, v in received(st).items()} == {1: "APPLIED", 2: "APPLIED", 3: "APPLIED",
                                                              4: "APPLIED"}
    assert prices(st, ids) == prices(ho, ids)
    assert stream_pos(st, "ho") == 4
    assert not any(p.name.endswith(".bundle") for p in st.cfg.inbox.iterdir())

    # a duplicate of an applied bundle: re-acknowledged, not re-applied
    ack = st.cfg.outbox / ack_name("s001", "ho", 3)
    original_ack = ack.read_bytes()
    ack.unlink()
    counts, versions = table_counts(st), doc_versions(st)
    deliver([files[2]], st)
    outs = import_inbox(st)
    assert [(o.seq, o.status) for o in outs] == [(3, "DUPLICATE")]
    assert ack.read_bytes() == original_ack
    assert table_counts(st) == counts and doc_versions(st) == versions
    assert (st.cfg.archive_received / "duplicates" / files[2].name).exists()
    assert received(st)[3][0] == "APPLIED"

    # the HO now sends everything again through the folder: duplicates all round, then all PROCESSED
    net.settle()
    assert check_net(net).problems == []


# ---------------------------------------------------------------- another major version

def test_other_major_version_is_held(net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    counts, versions = table_counts(st), doc_versions(st)

    with ho.engine.begin() as conn:  # the new version's bundle carries new prices
        conn.execute(update(s.item).where(s.item.c.item_id.in_(ids[:2])).values(price=Decimal("77.77")))
    held = forge_bundle(ho, "s001", docs_of(ho, "item", [(i,) for i in ids[:2]]), app_version="2.0.0")
    assert parse_name(held.name).seq == 2
    reprice(ho, ids[5:7])
    sync(ho)  # pushes the held one and seq 3, made by this version
    outs = {o.seq: o for o in sync(st).imported}
    assert outs[2].status == "HELD"
    assert "2.0.0" in outs[2].reason and __version__ in outs[2].reason
    assert outs[3].status == "WAITING"
    view = received(st)
    assert view[2][0] == "HELD" and "2.0.0" in (view[2][1] or "") and __version__ in (view[2][1] or "")
    assert view[3][0] == "WAITING"
    assert (st.cfg.inbox / held.name).exists()
    assert table_counts(st) == {**counts, "xchg_received": counts["xchg_received"] + 2}
    assert doc_versions(st) == versions
    assert stream_pos(st, "ho") == 1
    # still held at the next sync, nothing lost or moved
    assert {o.seq: o.status for o in sync(st).imported} == {2: "HELD", 3: "WAITING"}
    assert not list(st.cfg.quarantine.iterdir())

    # after an upgrade to major 2 the held bundle applies (and this version's seq 3 waits its turn)
    monkeypatch.setattr(bundle, "__version__", "2.1.0")
    outs = {o.seq: o for o in import_inbox(st)}
    assert outs[2].status == "APPLIED"
    assert outs[3].status == "HELD"
    assert prices(st, ids[:2]) == {i: Decimal("77.77") for i in ids[:2]}


# ---------------------------------------------------------------- damaged and forged files

def test_tampered_and_untrusted_files_are_quarantined(net: Net, tmp_path: Path) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    before = prices(st, ids)
    counts = table_counts(st)

    # a bundle claiming to be the HO's seq 2, signed by a key nobody trusts
    pem, _pub = sshsig.generate_key("mallory")
    mallory = sshsig.load_private_key(pem)
    elsewhere = tmp_path / "mallory"
    elsewhere.mkdir()
    forged = forge_bundle(ho, "s001", docs_of(ho, "item", [(i,) for i in ids[:3]]), key=mallory,
                          record=False, out_dir=elsewhere)
    assert parse_name(forged.name).seq == 2
    deliver([forged], st)
    outs = import_inbox(st)
    assert [o.status for o in outs] == ["QUARANTINED"]
    assert "signature" in outs[0].reason.lower() or "trust" in outs[0].reason.lower()

    # the genuine seq 2, with one byte of its payload flipped on the way
    reprice(ho, ids[:3], "3.00")
    export_all(ho)
    genuine = outbox_bundles(ho, "s001")[-1]
    assert parse_name(genuine.name).seq == 2
    flip_byte(deliver([genuine], st)[0])
    outs = import_inbox(st)
    assert [o.status for o in outs] == ["QUARANTINED"]
    assert genuine.name in outs[0].reason

    q = st.cfg.quarantine
    kept = sorted(p.name for p in q.iterdir())
    assert kept == [genuine.name, genuine.name + ".1", genuine.name + ".1.reason", genuine.name + ".reason"]
    assert sha(q / genuine.name) == sha(forged)
    reason = json.loads((q / (genuine.name + ".1.reason")).read_text())
    assert reason["file"] == genuine.name and reason["reason"]
    assert not (st.cfg.inbox / genuine.name).exists()
    assert prices(st, ids) == before and table_counts(st) == counts
    assert stream_pos(st, "ho") == 1
    quarantined = [r for r in status.received(st) if r.status == "QUARANTINED"]
    assert len(quarantined) == 2 and {r.seq for r in quarantined} == {2}

    # the genuine file arrives: the stream continues
    deliver([genuine], st)
    outs = import_inbox(st)
    assert [(o.seq, o.status) for o in outs] == [(2, "APPLIED")]
    assert prices(st, ids) == prices(ho, ids)
    assert len(list(q.iterdir())) == 4  # nothing received is ever deleted


# ---------------------------------------------------------------- parked documents

def test_parked_document_applies_when_the_item_arrives(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000001")  # recorded without an event: never sent
        add_promotion(conn, "P00009", ["IX0000001", ids[0]])
    export.reload(ho, "s001", ["promotion"])
    reprice(ho, ids[1:3])  # travels in the same bundle

    sync(ho)
    outs = [o for o in sync(st).imported if o.status == "APPLIED"]
    assert len(outs) == 1 and outs[0].parked == 1
    assert outs[0].applied["promotion"]["parked"] == 1 and outs[0].applied["item"]["applied"] == 2
    parked = status.parked(st)
    assert [(p.doc_type, p.doc_key) for p in parked] == [("promotion", key("P00009"))]
    assert "foreign key" in parked[0].error.lower()
    assert received(st)[2] == ("APPLIED", "1 document parked")
    assert prices(st, ids[1:3]) == prices(ho, ids[1:3])  # the rest of the bundle applied
    with st.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.promotion)).scalar() == 2

    # the ack lists it; the HO's Sent view says so
    sync(ho)
    row = sent_to(ho, "s001")[2]
    assert row.status == "PROCESSED" and "parked" in (row.reason or "")
    ack = read_ack(ho.cfg.archive_received / ack_name("s001", "ho", 2), ho.trust, me="ho",
                   identities=ho.identities)  # the details are encrypted to the HO (the bundle's sender)
    assert [p["doc_key"] for p in ack.parked] == [key("P00009")]

    # the item is sent; the parked promotion applies by itself
    export.reload(ho, "s001", ["item"])
    sync(ho)
    sync(st)
    assert status.parked(st) == []
    dt = ho.catalog.get("promotion")
    assert doc_hashes(st, dt, [key("P00009")]) == doc_hashes(ho, dt, [key("P00009")])
    net.settle()
    assert check_net(net, reloads=True).problems == []


def test_retry_tries_each_parked_document_once_and_reports_that_pass(net: Net) -> None:
    """`exchange retry` (the same library call as the page's Retry) tries a parked document once per
    run and reports that pass; it tried twice and reported only the second."""
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000001")  # recorded without an event: never sent
        add_promotion(conn, "P00009", ["IX0000001"])
    export.reload(ho, "s001", ["promotion"])
    sync(ho)
    sync(st)
    (parked,) = status.parked(st)
    home = str(st.cfg.home)
    st.engine.dispose()
    out = cli("retry", "--home", home).stdout
    assert out.splitlines() == ["parked documents: 0 applied, 1 still parked"]
    assert [p.attempts for p in status.parked(st)] == [parked.attempts + 1]  # one pass, not two

    export.reload(ho, "s001", ["item"])
    export_all(ho)
    (item_bundle,) = outbox_bundles(ho, "s001")
    deliver([item_bundle], st)
    out = cli("retry", "--home", home).stdout
    assert out.splitlines() == [f"{item_bundle.name}: APPLIED", "parked documents: 1 applied, 0 still parked"]
    assert status.parked(st) == []


def test_retry_clears_the_parked_count_of_the_bundle_it_came_in(net: Net) -> None:
    """HO side (SQLite, then PostgreSQL): a bill naming an item the HO lacks is parked and its bundle's
    reason counts it; once the bill applies on retry the reason goes (it no longer sends anyone to look)."""
    from exchange.demo.data import seed_store_activity
    from exchange.receive.importer import retry_parked

    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    with st.engine.begin() as conn:
        add_item(conn, "IX0000002")  # the store's own, recorded without an event: the HO never had it
        seed_store_activity(conn, "s001", ["IX0000002"], 1, seed=5)
    sync(st)
    sync(ho)
    parked = status.parked(ho)
    assert parked and {p.peer for p in parked} == {"s001"}
    (seq,) = {p.seq for p in parked}

    def reason() -> tuple[str, str | None]:
        (row,) = [r for r in status.received(ho) if r.peer == "s001" and r.seq == seq]
        return row.status, row.reason

    assert reason() == ("APPLIED", f"{len(parked)} documents parked")
    assert retry_parked(ho, "s001") == (0, len(parked))
    assert reason() == ("APPLIED", f"{len(parked)} documents parked")  # nothing applied: unchanged
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000002")
    assert retry_parked(ho, "s001") == (len(parked), 0)
    assert status.parked(ho) == []
    assert reason() == ("APPLIED", None)


# ---------------------------------------------------------------- failed bundles and retry

def test_control_totals_mismatch_fails_and_is_rejected(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    counts = table_counts(st)

    def lie(summary: dict[str, Any]) -> None:
        summary["documents"]["item"]["totals"]["item.price"] = "0.01"

    bad = forge_bundle(ho, "s001", docs_of(ho, "item", [(i,) for i in ids[:3]]), summary_hook=lie)
    sync(ho)
    outs = sync(st).imported
    assert [(o.seq, o.status) for o in outs] == [(2, "FAILED")]
    assert "control totals" in outs[0].reason
    # the difference as a readable list, not two Python dicts
    assert re.search(r"totals item\.price [\d.]+, manifest says 0\.01$", outs[0].reason), outs[0].reason
    assert "{" not in outs[0].reason
    assert received(st)[2][0] == "FAILED"
    assert table_counts(st) == {**counts, "xchg_received": counts["xchg_received"] + 1}
    assert (st.cfg.inbox / bad.name).exists()  # kept for `exchange retry`

    # the REJECTED ack reaches the HO
    sync(ho)
    row = sent_to(ho, "s001")[2]
    assert row.status == "REJECTED" and "control totals" in (row.reason or "")

    # later bundles wait; a plain import does not try the failed one again
    reprice(ho, ids[5:6])
    sync(ho)
    assert {o.seq: o.status for o in sync(st).imported} == {2: "FAILED", 3: "WAITING"}
    ack_file = st.cfg.outbox / ack_name("s001", "ho", 2)
    assert not ack_file.exists()  # already pushed, and not rewritten without a retry
    # `exchange retry` tries again: the bundle is still wrong, rejected again
    outs = import_inbox(st, retry=True)
    assert {o.seq: o.status for o in outs} == {2: "FAILED", 3: "WAITING"}
    ack = read_ack(ack_file, st.trust, me=None)
    assert ack.result == "REJECTED" and ack.reason is None  # the reason is encrypted to the HO
    ack = read_ack(ack_file, st.trust, me=None, identities=ho.identities)
    assert ack.result == "REJECTED" and "control totals" in (ack.reason or "")
    assert stream_pos(st, "ho") == 1


def test_failed_bundle_applies_on_retry_once_the_cause_is_fixed(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    before = prices(st, ids)
    with st.engine.begin() as conn:  # the store refuses the bundle as a whole (an integrity error; a full disk instead retries by itself)
        conn.exec_driver_sql("CREATE TRIGGER no_space BEFORE UPDATE ON xchg_stream_in "
                             "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    reprice(ho, ids[:2])
    sync(ho)
    outs = sync(st).imported
    assert [(o.seq, o.status) for o in outs] == [(2, "FAILED")] and "disk is full" in outs[0].reason
    assert prices(st, ids) == before  # rolled back as a whole
    sync(ho)
    assert sent_to(ho, "s001")[2].status == "REJECTED"

    reprice(ho, ids[2:4])
    sync(ho)
    with st.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_space")
    # fixed, but the stream waits for `exchange retry`
    assert {o.seq: o.status for o in sync(st).imported} == {2: "FAILED", 3: "WAITING"}
    outs = import_inbox(st, retry=True)
    assert [(o.seq, o.status) for o in outs] == [(2, "APPLIED"), (3, "APPLIED")]
    assert prices(st, ids) == prices(ho, ids)
    net.settle()
    assert {r.status for r in status.sent(ho)} == {"PROCESSED"}
    assert check_net(net).problems == []


# ---------------------------------------------------------------- version guard

def test_older_version_never_overwrites_a_newer_one(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    k = key(ids[0])
    old_version = doc_versions(st)[("item", k)]
    reprice(ho, ids[:1], "5.00")
    net.settle()
    new_version = doc_versions(st)[("item", k)]
    assert new_version > old_version
    current = prices(st, ids[:1])

    # a late bundle carrying the item at its old version, with other data
    with ho.engine.begin() as conn:
        real = conn.execute(select(s.item.c.price).where(s.item.c.item_id == ids[0])).scalar_one()
        conn.execute(update(s.item).where(s.item.c.item_id == ids[0]).values(price=Decimal("0.50")))
    forge_bundle(ho, "s001", [("item", k, "U", old_version)])
    with ho.engine.begin() as conn:
        conn.execute(update(s.item).where(s.item.c.item_id == ids[0]).values(price=real))
    sync(ho)
    outs = [o for o in sync(st).imported if o.status == "APPLIED"]
    # the totals are those of what was applied (nothing: the one item was older than held), not of what was sent
    assert len(outs) == 1 and outs[0].applied["item"] == {
        "applied": 0, "parked": 0, "stale": 1, "totals": {"item.price": "0"}}
    assert prices(st, ids[:1]) == current
    assert doc_versions(st)[("item", k)] == new_version

    # a parked old version retried after a newer version applied directly
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000002")  # never sent
        add_promotion(conn, "P00010", ["IX0000002"])
        record_events(conn, "promotion", [("P00010",)])
    sync(ho)
    sync(st)
    assert [p.doc_key for p in status.parked(st)] == [key("P00010")]
    with ho.engine.begin() as conn:
        conn.execute(update(s.promotion_item).where(s.promotion_item.c.promo_id == "P00010")
                     .values(item_id=ids[1]))
        record_events(conn, "promotion", [("P00010",)])
    export.reload(ho, "s001", ["item"])  # the missing item arrives in a later bundle
    sync(ho)
    sync(st)
    sync(ho)
    sync(st)
    assert status.parked(st) == []
    dt = ho.catalog.get("promotion")
    assert doc_hashes(st, dt, [key("P00010")]) == doc_hashes(ho, dt, [key("P00010")])
    with st.engine.connect() as conn:
        assert conn.execute(select(s.promotion_item.c.item_id).where(
            s.promotion_item.c.promo_id == "P00010")).scalars().all() == [ids[1]]


# ---------------------------------------------------------------- export crash safety

class Crash(BaseException):
    """A simulated kill: not an Exception, so nothing in the engine catches it."""


def test_export_crash_never_reuses_a_seq(net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    ho = net.ho
    seed_ho(net)
    at: list[str] = []

    def crashpoint(name: str) -> None:
        if at and name == at[0]:
            raise Crash(name)

    monkeypatch.setattr(export, "crashpoint", crashpoint)
    at[:] = ["export.sealed"]  # sealed to .part, nothing committed
    with pytest.raises(Crash):
        export_all(ho)
    parts = sorted(p.name for p in ho.cfg.outbox.glob("*.part"))
    assert parts == ["ho.s001.0000000001.bundle.part"]
    assert status.sent(ho) == []
    with ho.engine.connect() as conn:
        assert set(conn.execute(select(xchg_delivery.c.status)).scalars()) == {"PENDING"}

    at[:] = ["export.committed"]  # recorded, not yet renamed into place: both stores' bundles, one transaction
    with pytest.raises(Crash):
        export_all(ho)
    parts = sorted(p.name for p in ho.cfg.outbox.iterdir())
    assert parts == ["ho.s001.0000000001.bundle.part", "ho.s002.0000000001.bundle.part"]
    recorded = {r.file: r for r in status.sent(ho)}
    assert sorted(recorded) == ["ho.s001.0000000001.bundle", "ho.s002.0000000001.bundle"]

    at[:] = []
    export_all(ho)
    files = {p.name: sha(p) for p in ho.cfg.outbox.iterdir()}
    assert sorted(files) == ["ho.s001.0000000001.bundle", "ho.s002.0000000001.bundle"]
    with ho.engine.connect() as conn:
        rows = {r.file_name: r.file_sha256 for r in conn.execute(select(xchg_sent))}
    assert rows == files  # the file published for seq 1 is the one recorded
    reprice(ho, item_ids(net)[:2])
    export_all(ho)
    assert sorted(p.name for p in ho.cfg.outbox.iterdir() if p.name.startswith("ho.s001")) == [
        "ho.s001.0000000001.bundle", "ho.s001.0000000002.bundle"]
    net.settle()
    assert check_net(net).problems == []


# ---------------------------------------------------------------- capture by triggers

def test_trigger_capture_reaches_the_other_side(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    install_triggers(st.engine, st.catalog, "store")
    install_triggers(ho.engine, ho.catalog, "ho")
    with st.engine.begin() as conn:  # the POS writes; nobody calls record_event
        conn.execute(insert(s.customer).values(store_id="s001", customer_id="C9000001", name="Ada Lovelace",
                                               phone="+1-555-0100", created_at=datetime(2024, 3, 1, 10, 0)))
        for bill in ("B900000001", "B900000002"):
            conn.execute(insert(s.sales_bill).values(store_id="s001", bill_no=bill,
                                                     bill_date=datetime(2024, 3, 1, 10, 5),
                                                     customer_id="C9000001", total=Decimal("10.50"),
                                                     tax=Decimal("0.50")))
            conn.execute(insert(s.sales_bill_line).values(store_id="s001", bill_no=bill, line_no=1,
                                                          item_id=ids[0], qty=Decimal("2.000"),
                                                          price=Decimal("5.00"), amount=Decimal("10.00"),
                                                          tax=Decimal("0.50")))
            conn.execute(insert(s.sales_bill_payment).values(store_id="s001", bill_no=bill, line_no=1,
                                                             method="CASH", amount=Decimal("10.50")))
    with ho.engine.begin() as conn:
        conn.execute(text("UPDATE item SET name = 'Renamed by the ERP' WHERE item_id = :i"), {"i": ids[0]})
    with st.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(xchg_event)).scalar() > 0
    net.settle()
    with ho.engine.connect() as conn:
        assert conn.execute(select(s.customer.c.name).where(s.customer.c.customer_id == "C9000001")).scalar() \
            == "Ada Lovelace"
        assert conn.execute(select(func.count()).select_from(s.sales_bill_line).where(
            s.sales_bill_line.c.bill_no.in_(["B900000001", "B900000002"]))).scalar() == 2
    with st.engine.connect() as conn:
        assert conn.execute(select(s.item.c.name).where(s.item.c.item_id == ids[0])).scalar() == "Renamed by the ERP"

    # plain SQL update and delete travel too
    with st.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE customer SET phone = '+1-555-0199' WHERE customer_id = 'C9000001'")
        conn.exec_driver_sql("DELETE FROM sales_bill WHERE bill_no = 'B900000002'")
    net.settle()
    with ho.engine.connect() as conn:
        assert conn.execute(select(s.customer.c.phone).where(s.customer.c.customer_id == "C9000001")).scalar() \
            == "+1-555-0199"
        assert conn.execute(select(s.sales_bill.c.bill_no).where(s.sales_bill.c.store_id == "s001")
                            ).scalars().all() == ["B900000001"]
        assert conn.execute(select(func.count()).select_from(s.sales_bill_line)).scalar() == 1
    assert check_net(net).problems == []


# ---------------------------------------------------------------- dry run

def _files(home: Path) -> dict[str, str]:
    return {str(p.relative_to(home)): sha(p) for p in home.rglob("*")
            if p.is_file() and ".work" not in p.parts and not p.name.startswith(".") and p.suffix != ".db"
            and not p.name.endswith((".db-wal", ".db-shm"))}


def test_dry_run_changes_nothing(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    sync(ho)
    pull(st)
    (path,) = [p for p in st.cfg.inbox.iterdir() if p.name.endswith(".bundle")]
    before, files = snapshot(st), _files(st.cfg.home)
    out = import_file(st, path, dry_run=True)
    assert out.status == "APPLIED" and "dry run" in out.reason
    assert out.applied["item"]["applied"] == 20
    assert snapshot(st) == before
    assert _files(st.cfg.home) == files

    # damaged: reported, not moved
    bad = st.cfg.home / "elsewhere" / path.name
    bad.parent.mkdir()
    shutil.copyfile(path, bad)
    flip_byte(bad)
    out = import_file(st, bad, dry_run=True)
    assert out.status == "QUARANTINED" and bad.exists()
    assert snapshot(st) == before and not list(st.cfg.quarantine.iterdir())

    # the real import changes things; a store's bundle dry-run at the HO (PostgreSQL too) changes nothing
    assert import_inbox(st)[0].status == "APPLIED"
    assert snapshot(st) != before
    seed_store(net, "s001", sales=5)
    sync(st)
    pull(ho)
    (path,) = [p for p in ho.cfg.inbox.iterdir() if p.name.endswith(".bundle")]
    before, files = snapshot(ho), _files(ho.cfg.home)
    out = import_file(ho, path, dry_run=True)
    assert out.status == "APPLIED" and out.applied["sales_bill"]["applied"] == 5
    assert snapshot(ho) == before and _files(ho.cfg.home) == files


# ---------------------------------------------------------------- the command line

def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("EXCHANGE_HOME", None)
    env.pop("EXCHANGE_CRASH_AT", None)
    p = subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, env=env,
                       timeout=120)
    if ok:
        assert p.returncode == 0, f"exchange {' '.join(args)}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def test_cli_smoke(tmp_path: Path) -> None:
    ho, st, transfer = tmp_path / "ho", tmp_path / "s001", tmp_path / "transfer"
    transfer.mkdir()
    cli("init", "--home", str(ho), "--node", "ho", "--role", "ho")
    cli("init", "--home", str(st), "--node", "s001", "--role", "store")
    ident = {n: json.loads(cli("identity", "--home", str(h), "--json").stdout) for n, h in (("ho", ho), ("s001", st))}
    for n, i in ident.items():
        assert set(i) == {"id", "role", "signing_key", "recipient"} and i["id"] == n
        assert i["signing_key"].startswith("ssh-ed25519 ") and i["recipient"].startswith("age1")
    cli("peer", "add", "--home", str(ho), "--id", "s001", "--role", "store", "--signing-key",
        ident["s001"]["signing_key"], "--recipient", ident["s001"]["recipient"], "--transport", f"dir:{transfer}",
        "--group", "north")
    cli("peer", "add", "--home", str(st), "--id", "ho", "--role", "ho", "--signing-key", ident["ho"]["signing_key"],
        "--recipient", ident["ho"]["recipient"], "--transport", f"dir:{transfer}")
    node = Node.open(ho)
    with node.engine.begin() as conn:
        from exchange.demo.data import seed_masters
        seed_masters(conn, 5, ["s001"], {"s001": "north"})
    node.engine.dispose()

    for h in (ho, st, ho):
        out = cli("sync", "--home", str(h))
        assert "sync" in out.stdout
    sent = json.loads(cli("status", "sent", "--home", str(ho), "--json").stdout)
    assert sent["version"] == 1 and len(sent["bundles"]) == 1
    b = sent["bundles"][0]
    assert set(b) == {"file", "peer", "seq", "documents", "status", "created", "updated", "reason", "reconcile",
                      "lane"}
    assert (b["file"], b["peer"], b["lane"], b["seq"], b["status"]) == ("ho.s001.0000000001.bundle", "s001", "main",
                                                                        1, "PROCESSED")
    assert b["documents"]["item"] == 5 and isinstance(b["created"], str)
    got = json.loads(cli("status", "received", "--home", str(st), "--json").stdout)
    assert got["parked"] == [] and [x["status"] for x in got["bundles"]] == ["APPLIED"]

    archived = st / "archive" / "received" / "ho.s001.0000000001.bundle"
    info = json.loads(cli("inspect", str(archived), "--home", str(st), "--json").stdout)
    assert (info["kind"], info["sender"], info["recipient"], info["seq"]) == ("bundle", "ho", "s001", 1)
    assert info["signature"].startswith("good")
    assert cli("inspect", str(archived), "--home", str(st)).stdout.strip()
    out = cli("verify", str(archived), "--home", str(st))
    assert out.stdout.startswith("OK ho.s001.0000000001.bundle")

    for member, where in (("payload.tar.age", 0.5), ("manifest.json", 0.3), ("manifest.json.sig", 0.5)):
        copy = tmp_path / member / archived.name
        copy.parent.mkdir()
        shutil.copyfile(archived, copy)
        flip_byte(copy, member, where)
        bad = cli("verify", str(copy), "--home", str(st), ok=False)
        assert bad.returncode not in (0, 1), (member, bad.returncode, bad.stderr)
        assert archived.name in bad.stderr, (member, bad.stderr)
        assert "Traceback" not in bad.stderr, (member, bad.stderr)
    # an ack verifies too
    ack = ho / "archive" / "received" / "s001.ho.0000000001.ack"
    assert cli("verify", str(ack), "--home", str(ho)).stdout.startswith("OK")


# ---------------------------------------------------------------- reload and archives

def test_reload_sends_a_store_only_its_own_documents(net: Net) -> None:
    ho, s1, s2 = net.ho, net.store("s001"), net.store("s002")
    seed_ho(net)
    net.settle()
    before = {n.id: table_counts(n) for n in (s1, s2)}
    # a repaired store: everything of these types again, as routing allows
    n = export.reload(ho, "s002", ["item", "promotion", "transfer_order", "sales_order", "audit_plan"])
    assert n == 20 + 1 + 1 + 1 + 1
    net.settle()
    assert table_counts(s2) == {**before["s002"], **{t: v for t, v in table_counts(s2).items()
                                                      if t.startswith("xchg_")}}
    with s2.engine.connect() as conn:
        assert set(conn.execute(select(s.transfer_order.c.dest_store)).scalars()) == {"s002"}
        assert set(conn.execute(select(s.sales_order.c.store_id)).scalars()) == {"s002"}
        assert set(conn.execute(select(s.promotion.c.promo_id)).scalars()) == {"P00001"}
    assert table_counts(s1) == {**before["s001"], **{t: v for t, v in table_counts(s1).items()
                                                      if t.startswith("xchg_")}}
    assert check_net(net, reloads=True).problems == []


def test_every_copy_of_a_duplicate_is_archived(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    export_all(ho)
    (first,) = outbox_bundles(ho, "s001")
    deliver([first], st)
    assert import_inbox(st)[0].status == "APPLIED"
    for _ in range(3):  # the same stick plugged in three times within a second
        deliver([first], st)
        assert [o.status for o in import_inbox(st)] == ["DUPLICATE"]
    archived = list((st.cfg.archive_received / "duplicates").iterdir())
    assert len(archived) == 3 and {sha(p) for p in archived} == {sha(first)}


def test_replay_fork_and_misaddressed_bundles_are_quarantined(net: Net, tmp_path: Path) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    reprice(ho, ids[:2])
    net.settle()
    with ho.engine.connect() as conn:
        m = {r.seq: r.manifest_sha256 for r in conn.execute(select(xchg_sent).where(xchg_sent.c.peer == "s001"))}
    assert sorted(m) == [1, 2]
    counts = table_counts(st)
    docs = docs_of(ho, "item", [(i,) for i in ids[:3]])
    made = []
    for n, (seq, prev) in enumerate([(1, None), (2, m[1]), (3, "0" * 64)]):  # replay, rollback, fork
        folder = tmp_path / f"f{n}"
        folder.mkdir()
        made.append(forge_bundle(ho, "s001", docs, record=False, out_dir=folder, at=(seq, prev)))
    elsewhere = tmp_path / "s002"
    elsewhere.mkdir()
    with ho.engine.connect() as conn:
        nxt = conn.execute(select(xchg_sent.c.manifest_sha256).where(xchg_sent.c.peer == "s002")
                           .order_by(xchg_sent.c.seq.desc())).scalars().first()
    to_s002 = forge_bundle(ho, "s002", docs, record=False, out_dir=elsewhere, at=(3, nxt))
    outs = []
    for f in made:
        deliver([f], st)
        outs += import_inbox(st)
    (st.cfg.inbox / "ho.s001.0000000004.bundle").write_bytes(to_s002.read_bytes())  # renamed on the way
    shutil.copyfile(to_s002, st.cfg.inbox / to_s002.name)
    outs += import_inbox(st)
    assert [o.status for o in outs] == ["QUARANTINED"] * 5, [(o.file, o.status, o.reason) for o in outs]
    assert "already applied from a different file" in outs[0].reason
    assert "already applied from a different file" in outs[1].reason
    assert "hash chain" in outs[2].reason
    assert any("addressed to 's002'" in o.reason for o in outs[3:])
    # nothing applied; the one trace is the evidence that the HO went back in time (a seq sealed again with
    # another file: an HO restored from its own backup), whose repair the store's doctor names
    after = table_counts(st)
    assert after.pop("xchg_restart") == counts.pop("xchg_restart") + 1
    assert after == counts and stream_pos(st, "ho") == 2
    with st.engine.connect() as conn:
        [detail] = conn.execute(select(xchg_restart.c.detail).where(xchg_restart.c.kind == "detected")).scalars()
    assert "--above 2" in json.loads(detail)["repair"]
    assert len([p for p in st.cfg.quarantine.iterdir() if p.name.endswith(".reason")]) == 5


def test_every_quarantine_appears_in_the_page_activity(net: Net, tmp_path: Path) -> None:
    """A replayed bundle, a broken chain and a renamed ack are set aside through one helper that
    reports each: the page's activity list names every file quarantined (some paths did not)."""
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    with ho.engine.connect() as conn:
        first = conn.execute(select(xchg_sent.c.manifest_sha256).where(and_(
            xchg_sent.c.peer == "s001", xchg_sent.c.seq == 1))).scalar()
    docs = docs_of(ho, "item", [(i,) for i in item_ids(net)[:2]])
    made = []
    for n, at in enumerate([(1, None), (2, "0" * 64)]):  # a replay of seq 1, a fork at seq 2
        folder = tmp_path / f"f{n}"
        folder.mkdir()
        made.append(forge_bundle(ho, "s001", docs, record=False, out_dir=folder, at=at))
    assert first is not None
    activity = Activity()
    outs = []
    for f in made:
        deliver([f], st)
        outs += import_inbox(st, reporter=TeeReporter(activity))
    # a genuine ack renamed on the way: its name disagrees with what it signs
    renamed = ho.cfg.inbox / ack_name("s001", "ho", 7)
    shutil.copyfile(ho.cfg.archive_received / ack_name("s001", "ho", 1), renamed)
    outs += import_inbox(ho, reporter=TeeReporter(activity))
    assert [o.status for o in outs] == ["QUARANTINED"] * 3, [(o.file, o.reason) for o in outs]
    lines = activity.since(0)
    assert [(line.text.split(" ")[0], line.status) for line in lines] == [
        (made[0].name, "QUARANTINED"), (made[1].name, "QUARANTINED"), (renamed.name, "QUARANTINED")]
    assert "already applied from a different file" in lines[0].text and "hash chain" in lines[1].text
    assert "disagrees with the signed ack" in lines[2].text
    assert (ho.cfg.quarantine / (renamed.name + ".reason")).exists() and not renamed.exists()


def test_a_bundle_lost_in_transit_is_sent_again(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    ho.cfg.resend_after = 0
    seed_ho(net)
    sync(ho)
    lost = net.transfer / "s001" / "ho.s001.0000000001.bundle"
    lost.unlink()  # the stick went through the wash
    assert sent_to(ho, "s001")[1].status == "UPLOADED"
    assert sync(st).imported == []
    time.sleep(1.1)  # resend_after = 0: anything uploaded before now without an ack
    rep = sync(ho)
    assert "ho.s001.0000000001.bundle" in rep.resent
    assert [o.status for o in sync(st).imported] == ["APPLIED"]
    net.settle()
    assert check_net(net).problems == []


# ---------------------------------------------------------------- a document replaced as a unit

def test_a_changed_bill_replaces_its_lines_at_the_ho(net: Net) -> None:
    """A line removed, one changed, one added, a bill deleted: the HO holds exactly the store's rows.

    On PostgreSQL the lines are updated in place and only the stale one is deleted
    (rows.replaces_in_place); on SQLite they are deleted and inserted again.
    """
    seed_ho(net)
    net.settle()
    st = net.store("s001")
    seed_store(net, "s001", sales=4)
    net.settle()
    with st.engine.connect() as conn:
        bills = [tuple(r) for r in conn.execute(select(s.sales_bill.c.store_id, s.sales_bill.c.bill_no)
                                                .order_by(s.sales_bill.c.bill_no))]
        lines = conn.execute(select(s.sales_bill_line).where(
            s.sales_bill_line.c.bill_no == bills[0][1]).order_by(s.sales_bill_line.c.line_no)).mappings().all()
    assert len(lines) >= 2
    changed, gone = bills[0], bills[1]
    with st.engine.begin() as conn:
        line = s.sales_bill_line.c
        conn.execute(s.sales_bill_line.delete().where(and_(line.bill_no == changed[1], line.line_no == lines[-1]["line_no"])))
        conn.execute(s.sales_bill_line.update().where(and_(line.bill_no == changed[1], line.line_no == lines[0]["line_no"]))
                     .values(qty=lines[0]["qty"] + 1))
        conn.execute(s.sales_bill_line.insert().values({**dict(lines[0]), "line_no": 99}))
        for t in (s.sales_bill_payment, s.sales_bill_line):
            conn.execute(t.delete().where(t.c.bill_no == gone[1]))
        conn.execute(s.sales_bill.delete().where(s.sales_bill.c.bill_no == gone[1]))
        record_events(conn, "sales_bill", [changed])
        record_events(conn, "sales_bill", [gone], op="D")
    net.settle()
    assert check_net(net).problems == []  # every document row by row, on both sides
    with net.ho.engine.connect() as conn:
        line = s.sales_bill_line.c
        got = sorted(conn.execute(select(line.line_no, line.qty).where(line.bill_no == changed[1])).all())
        assert not conn.execute(select(s.sales_bill_line.c.line_no).where(line.bill_no == gone[1])).first()
        assert not conn.execute(select(s.sales_bill.c.bill_no).where(s.sales_bill.c.bill_no == gone[1])).first()
    want = sorted([(r["line_no"], r["qty"]) for r in lines[:-1]] + [(99, lines[0]["qty"])])
    want = [(n, q + 1 if n == lines[0]["line_no"] else q) for n, q in want]
    assert got == sorted(want)
