"""A store restored from a backup, or re-made after its disk died, and the restart that repairs its streams.

Real homes (the HO on SQLite and PostgreSQL, stores on SQLite) paired through a real ``dir:`` folder;
the backup is a ``cp -a`` of the store's home taken between syncs and put back after three more; every
operator step is an ``exchange`` command. The checks read rows at both ends, not just statuses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, doc_hashes, forge_bundle, item_ids, make_net, reprice, seed_ho, seed_store, transfer_files
from sqlalchemy import select

from exchange.cli.main import main
from exchange.database import conflicts as conflict_log
from exchange.database import rows
from exchange.database.tables import xchg_conflict, xchg_received, xchg_sent, xchg_stream_in, xchg_stream_out
from exchange.node import keys
from exchange.node.home import Node
from exchange.receive import restart as received
from exchange.service import alerts, status
from exchange.wire.bundle import open_bundle
from test_metrics import scrape, value
from test_ui import request, ui_server

STORE_TYPES = ("customer", "sales_bill", "grc", "grt")
HO_TYPES = ("item", "promotion", "transfer_order")



def cli(*args: str, code: int = 0) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def run(net: Net, node: Node, *args: str, code: int = 0) -> Result:
    """``exchange ARGS --home HOME`` (a group's subcommand gets --home after it)."""
    head = list(args[:2]) if args[0] in ("peer", "keys", "audit") else [args[0]]
    out = cli(*head, "--home", str(node.cfg.home), *args[len(head):], code=code)
    net.reopen()
    return out


def keys_of(node: Node, doc_type: str) -> list[str]:
    dt = node.catalog.get(doc_type)
    with node.engine.connect() as conn:
        table = node.catalog.table(dt.header)
        return sorted(rows.canonical_key(r) for r in conn.execute(select(*[table.c[c] for c in dt.key])))


def docs(node: Node, types: tuple[str, ...], keys: dict[str, list[str]] | None = None) -> dict[str, dict[str, str]]:
    """Per type: key -> hash of every row of the document (header and children)."""
    return {t: doc_hashes(node, node.catalog.get(t), keys[t] if keys else keys_of(node, t)) for t in types}


def store_docs_of(node: Node, sid: str) -> dict[str, list[str]]:
    return {t: [k for k in keys_of(node, t) if json.loads(k)[0] == sid] for t in STORE_TYPES}


def settle(net: Net, rounds: int = 8) -> None:
    """Sync every node until nothing is on its way (bundles a restart superseded stay ABANDONED)."""
    for _ in range(rounds):
        net.cycle()
        nodes_quiet = all(r.status in ("PROCESSED", "ABANDONED") for n in net.nodes for r in status.sent(n))
        spools = any(p.is_file() for n in net.nodes for d in (n.cfg.inbox, n.cfg.outbox) for p in d.iterdir())
        pending = any(d.status not in ("PROCESSED",) for n in net.nodes for peer in n.cfg.peers
                      for d in status.documents(n, peer).values())
        if nodes_quiet and not spools and not pending and not transfer_files(net.transfer):
            return
    raise AssertionError(f"not settled after {rounds} rounds: {net.describe()}")


def cycles(net: Net, n: int, order: list[str] | None = None) -> None:
    for _ in range(n):
        net.cycle(order)


def backup(net: Net, sid: str, dest: Path) -> None:
    """``cp -a`` of the store's home with nothing open on it (between syncs, as a nightly job)."""
    net.dispose()
    subprocess.run(["cp", "-a", str(net.store(sid).cfg.home), str(dest)], check=True)
    net.reopen()


def restore(net: Net, sid: str, src: Path) -> None:
    net.dispose()
    home = net.store(sid).cfg.home
    shutil.rmtree(home)
    subprocess.run(["cp", "-a", str(src), str(home)], check=True)
    net.reopen()


def doctor(net: Net, node: Node) -> dict[str, Any]:
    res = CliRunner().invoke(main, ["doctor", "--home", str(node.cfg.home), "--json"], catch_exceptions=False)
    net.reopen()
    return {c["name"]: c for c in json.loads(res.output)["checks"]}


def sent_rows(node: Node, peer: str) -> list[Any]:
    with node.engine.connect() as conn:
        return list(conn.execute(select(xchg_sent).where(xchg_sent.c.peer == peer).order_by(xchg_sent.c.seq)))


def received_rows(node: Node, peer: str) -> list[Any]:
    with node.engine.connect() as conn:
        return list(conn.execute(select(xchg_received).where(xchg_received.c.peer == peer)
                                 .order_by(xchg_received.c.seq)))


def events_in_archive(node: Node, peer: str, me: Node) -> list[tuple[str, str, int]]:
    """(type, key, version) of every document in the bundles ``me`` applied from ``peer``, from its archive."""
    out = []
    for r in received_rows(me, peer):
        if r.status != "APPLIED":
            continue
        path = me.cfg.archive_received / r.file_name
        with open_bundle(path, trust=me.trust, identities=me.identities, me=me.id, workdir=me.cfg.work) as opened:
            ev = opened.table("_events").to_pydict()
            out += list(zip(ev["doc_type"], ev["doc_key"], ev["version"], strict=True))
    return out


def test_a_store_restored_from_a_backup_is_repaired_with_one_command(net: Net, tmp_path: Path) -> None:
    ho, sid = net.ho, "s001"
    seed_store(net, sid, sales=6)
    net.settle()
    backup(net, sid, tmp_path / "backup")
    backed_bills = set(keys_of(net.store(sid), "sales_bill"))
    # three more days of trading on both sides, each synced
    ids = item_ids(net)
    for day in range(3):
        seed_store(net, sid, sales=3, seed=day + 1)
        reprice(net.ho, ids[day * 3:day * 3 + 3])
        net.settle()
    lost_bills = sorted(set(store_docs_of(ho, sid)["sales_bill"]) - backed_bills)
    assert len(lost_bills) == 9
    lost_at_ho = docs(ho, ("sales_bill",), {"sales_bill": lost_bills})["sales_bill"]
    m = max(r.seq for r in received_rows(ho, sid))

    restore(net, sid, tmp_path / "backup")
    new = seed_store(net, sid, sales=4, seed=9)  # the POS numbers bills again from its restored state
    reused = sorted(set(rows.canonical_key(k) for k in new["sales_bill"]) & set(lost_bills))
    assert len(reused) == 4
    reprice(net.ho, ids[:2])
    cycles(net, 2)

    # both sides see it: the HO's copy of the restored stream forks, the store waits for what the HO archived
    rec = [r for r in status.received(net.ho) if r.peer == sid and r.status == "QUARANTINED"]
    assert rec and "already applied from a different file" in (rec[0].reason or "")
    assert f"exchange peer restart --peer {sid}" in (rec[0].reason or "")
    check = doctor(net, net.ho)["streams went back"]
    assert not check["ok"] and "differs from the one applied here" in check["detail"]
    assert f"exchange peer restart --peer {sid}" in check["fix"]
    waiting = [r for r in status.received(net.store(sid)) if r.status == "WAITING"]
    assert waiting and "exchange peer restart" in (waiting[0].reason or "")
    at_store = doctor(net, net.store(sid))["streams"]
    assert not at_store["ok"] and "WAITING" in at_store["detail"] and "exchange peer restart" in at_store["fix"]
    with ui_server(net.ho.cfg.home) as ui:  # the HO's page: the overview row and the sync bar's problems
        code, _h, html = request(ui.url, "/")
        assert value(scrape(ui.url), "exchange_peer_went_back", peer=sid) == 1
        assert value(scrape(ui.url), "exchange_peer_went_back", peer="s002") == 0
    assert code == 200 and f"went back in time: `exchange peer restart --peer {sid}" in html
    assert 'data-problem="went-back"' in html
    alert = alerts.states(net.ho, 60.0)[f"stream_stuck:{sid}"]  # what wakes someone: the same command
    assert "went back in time" in alert["detail"] and f"exchange peer restart --peer {sid}" in alert["detail"]

    out = run(net, net.ho, "peer", "restart", "--peer", sid, "--reason", "restored from Sunday's backup")
    assert "restart sealed for s001" in out.output and f"continues after seq {m}" in out.output
    assert doctor(net, net.ho)["streams went back"]["ok"]
    settle(net)
    with ui_server(net.ho.cfg.home) as ui:
        assert "went back in time" not in request(ui.url, "/")[2]
        assert value(scrape(ui.url), "exchange_peer_went_back", peer=sid) == 0

    ho, store = net.ho, net.store(sid)
    # the HO's documents: the store holds exactly what the HO holds (prices of the lost days and after)
    assert docs(store, HO_TYPES) == docs(ho, HO_TYPES, {t: keys_of(store, t) for t in HO_TYPES})
    assert set(keys_of(store, "item")) == set(keys_of(ho, "item"))
    # the store's documents: every one the store holds is at the HO, row for row
    mine = store_docs_of(store, sid)
    assert docs(ho, STORE_TYPES, mine) == docs(store, STORE_TYPES, mine)
    # the lost days' bills stay at the HO: those not reused unchanged, the reused ones kept in the conflict log
    kept = docs(ho, ("sales_bill",), {"sales_bill": lost_bills})["sales_bill"]
    assert {k: v for k, v in kept.items() if k not in reused} == {k: v for k, v in lost_at_ho.items()
                                                                   if k not in reused}
    with ho.engine.connect() as conn:
        logged = list(conn.execute(select(xchg_conflict).where(xchg_conflict.c.policy == "restored")))
    assert sorted(c.doc_key for c in logged if c.doc_type == "sales_bill") == reused
    for c in [c for c in logged if c.doc_type == "sales_bill"]:
        ours = conflict_log.unpack(c.ours)
        assert ours is not None and ours["sales_bill"].num_rows == 1
        assert ours["sales_bill"].column("bill_no").to_pylist() == [json.loads(c.doc_key)[1]]
        assert c.kept == "theirs" and c.peer == sid
    # none applied twice: the store's stream continues after m, chained, every bundle APPLIED once
    got = received_rows(ho, sid)
    assert [r.seq for r in got] == list(range(1, len(got) + 1)) and all(r.status == "APPLIED" for r in got)
    assert len(got) > m
    with store.engine.connect() as conn:
        out_pos = conn.execute(select(xchg_stream_out).where(xchg_stream_out.c.peer == "ho")).one()
        in_pos = conn.execute(select(xchg_stream_in).where(xchg_stream_in.c.peer == "ho")).one()
    with ho.engine.connect() as conn:
        ho_in = conn.execute(select(xchg_stream_in).where(xchg_stream_in.c.peer == sid)).one()
        ho_out = conn.execute(select(xchg_stream_out).where(xchg_stream_out.c.peer == sid)).one()
    assert (out_pos.next_seq - 1, out_pos.last_manifest_sha256) == (ho_in.last_seq, ho_in.last_manifest_sha256)
    assert (in_pos.last_seq, in_pos.last_manifest_sha256) == (ho_out.next_seq - 1, ho_out.last_manifest_sha256)
    versions = events_in_archive(store, "ho", ho)
    assert len(versions) == len(set(versions))  # no document version applied twice
    assert all(r.status == "PROCESSED" for r in sent_rows(store, "ho"))
    assert all(r.status in ("PROCESSED", "ABANDONED") for r in sent_rows(ho, sid))
    # the restart's state at both ends: answered at the HO (the evidence repaired), applied at the store
    at_ho = json.loads(run(net, net.ho, "peer", "restarts", "--peer", sid, "--json").output)["restarts"]
    assert [(e["kind"], e["resolved_at"] is not None) for e in at_ho] == [("sent", True), ("detected", True)]
    assert at_ho[0]["detail"]["base"]["seq"] == 1 and at_ho[0]["detail"]["received_seq"] == m
    at_store = json.loads(run(net, net.store(sid), "peer", "restarts", "--json").output)["restarts"]
    assert [e["kind"] for e in at_store] == ["applied"] and at_store[0]["seq"] == at_ho[0]["seq"]
    assert [f["seq"] for f in at_store[0]["detail"]["forked"]] == [2]  # sealed after the restore, re-sent
    assert "answered" in run(net, net.ho, "peer", "restarts").output
    # the operator's action is on record, and the auditor sees the restart
    entries = json.loads(run(net, net.ho, "journal", "--peer", sid, "--json").output)
    assert entries[0]["action"] == "peer restart" and entries[0]["detail"]["reason"] == "restored from Sunday's backup"
    res = CliRunner().invoke(main, ["audit", "verify", "--home", str(net.ho.cfg.home), "--json"],
                             catch_exceptions=False)
    report = json.loads(res.output)
    assert res.exit_code == 0, res.output
    assert any(f["check"] == "restart" for s in report["streams"] for f in s["findings"])
    assert doctor(net, net.ho)["streams"]["ok"] and doctor(net, store)["streams"]["ok"]


def identity(home: Path) -> dict[str, Any]:
    return dict(json.loads(cli("identity", "--home", str(home), "--json").output))


def test_a_store_whose_disk_died_is_re_onboarded_in_a_few_commands(net: Net, tmp_path: Path) -> None:
    sid = "s001"
    seed_store(net, sid, sales=5)
    net.settle()
    seed_store(net, sid, sales=3, seed=1)
    reprice(net.ho, item_ids(net)[:4])
    net.settle()
    ho = net.ho
    before = store_docs_of(ho, sid)
    at_ho = docs(ho, STORE_TYPES, before)
    m = max(r.seq for r in received_rows(ho, sid))
    old_key = keys.public_signing_line(net.store(sid).cfg)

    # the disk dies: the home is gone; a new PC, new keys, an empty database
    net.dispose()
    home = net.store(sid).cfg.home
    shutil.rmtree(home)
    cli("init", "--home", str(home), "--node", sid, "--role", "store")
    mine, hos = identity(home), identity(ho.cfg.home)
    cli("peer", "add", "--home", str(home), "--peer", "ho", "--role", "ho", "--signing-key", hos["signing_key"],
        "--recipient", hos["recipient"], "--transport", f"dir:{net.transfer}")
    run(net, ho, "peer", "add", "--peer", sid, "--role", "store", "--signing-key", mine["signing_key"],
        "--recipient", mine["recipient"], "--transport", f"dir:{net.transfer}", "--group", "north", "--replace")
    out = run(net, ho, "peer", "restart", "--peer", sid, "--reason", "disk died, new PC", "--json")
    done = json.loads(out.output)
    assert done["received_seq"] == m and done["upserts"] > 0
    settle(net)

    ho, store = net.ho, net.store(sid)
    # fully loaded again: every HO document that routes to it, row for row
    assert set(keys_of(store, "item")) == set(keys_of(ho, "item"))
    assert docs(store, HO_TYPES) == docs(ho, HO_TYPES, {t: keys_of(store, t) for t in HO_TYPES})
    assert keys_of(store, "promotion") and keys_of(store, "transfer_order")
    # it trades again: numbering starts over, so its bills reuse the old disk's numbers
    new = seed_store(net, sid, sales=4, seed=7)
    settle(net)
    ho, store = net.ho, net.store(sid)
    now = store_docs_of(store, sid)
    assert docs(ho, STORE_TYPES, now) == docs(store, STORE_TYPES, now)
    reused = {(t, rows.canonical_key(k)) for t, ks in new.items() for k in ks}
    assert {t for t, _k in reused} == set(STORE_TYPES) and all(k in before[t] for t, k in reused)
    with ho.engine.connect() as conn:
        logged = {(c.doc_type, c.doc_key) for c in conn.execute(select(xchg_conflict).where(
            xchg_conflict.c.policy == "restored"))}
    assert logged == reused  # each old document whose key came back: kept, with its rows, in the log
    # its history at the HO intact: every old document not reused unchanged, the stream continued after m
    still = docs(ho, STORE_TYPES, before)
    assert {t: {k: v for k, v in d.items() if (t, k) not in reused} for t, d in still.items()} == \
        {t: {k: v for k, v in d.items() if (t, k) not in reused} for t, d in at_ho.items()}
    got = received_rows(ho, sid)
    assert [r.seq for r in got] == list(range(1, len(got) + 1)) and len(got) > m
    assert all(r.status == "APPLIED" for r in got)
    # the old key retired, not deleted: the archive verifies, old bundles under the old key, new under the new
    states = json.loads(run(net, ho, "keys", "list", "--json").output)["keys"]
    old = [k for k in states if k["principal"] == sid and old_key.split()[1] in json.dumps(k)] or \
        [k for k in states if k["principal"] == sid and k["state"] == "retired"]
    assert old and old[0]["state"] == "retired"
    res = CliRunner().invoke(main, ["audit", "verify", "--home", str(ho.cfg.home), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert doctor(net, ho)["streams went back"]["ok"] and doctor(net, store)["streams"]["ok"]


def test_a_restart_from_a_store_or_replayed_is_refused(net: Net, tmp_path: Path) -> None:
    """Only a store's HO restarts its streams, once: a store's bundle with a null prev after seq 1 is
    quarantined at the HO, and a restart bundle delivered again after it applied is a replay."""
    sid = "s001"
    seed_store(net, sid, sales=3)
    net.settle()
    seed_store(net, sid, sales=2, seed=1)
    net.settle()
    store, ho = net.store(sid), net.ho
    # a store signing a "restart" of its own stream to the HO: its role may not
    with store.engine.connect() as conn:
        nxt = conn.execute(select(xchg_stream_out.c.next_seq).where(xchg_stream_out.c.peer == "ho")).scalar_one()
    forged = forge_bundle(store, "ho", [], record=False, out_dir=tmp_path, at=(int(nxt), None))
    before = received_rows(ho, sid)
    shutil.copyfile(forged, ho.cfg.inbox / forged.name)
    net.cycle([ho.id])
    q = [r for r in status.received(net.ho) if r.status == "QUARANTINED" and r.file == forged.name]
    assert q and "only a store's HO may restart its streams" in (q[0].reason or "")
    assert received_rows(net.ho, sid) == before

    # an HO bundle with a null prev but no restart record; a store's restored point naming no restart
    with net.ho.engine.connect() as conn:
        nxt = conn.execute(select(xchg_stream_out.c.next_seq).where(xchg_stream_out.c.peer == sid)).scalar_one()
    bare = forge_bundle(net.ho, sid, [], record=False, out_dir=tmp_path, at=(int(nxt), None))
    shutil.copyfile(bare, store.cfg.inbox / bare.name)
    net.cycle([sid])
    q = [r for r in status.received(net.store(sid)) if r.status == "QUARANTINED" and r.file == bare.name]
    assert q and "without a restart record" in (q[0].reason or "")
    with net.store(sid).engine.connect() as conn:
        nxt, last = conn.execute(select(xchg_stream_out.c.next_seq, xchg_stream_out.c.last_manifest_sha256)
                                 .where(xchg_stream_out.c.peer == "ho")).one()
    (tmp_path / "claim").mkdir()
    claim = forge_bundle(net.store(sid), "ho", [], record=False, out_dir=tmp_path / "claim", at=(int(nxt), last),
                         summary_hook=lambda s: s.update({"restart_base": {"restart": 99, "seq": 1, "version": 1}}))
    shutil.copyfile(claim, net.ho.cfg.inbox / claim.name)
    net.cycle(["ho"])
    q = [r for r in status.received(net.ho) if r.status == "QUARANTINED" and r.seq == int(nxt)]
    assert any("restart_base names restart seq 99, which this node never sent to s001" in (r.reason or "") for r in q)
    assert received_rows(net.ho, sid) == before

    # the HO's genuine restart, applied; then the very file delivered again: a duplicate, never re-applied
    out = run(net, net.ho, "peer", "restart", "--peer", sid, "--reason", "test", "--json")
    restart_file = net.ho.cfg.outbox / json.loads(out.output)["file"]
    copy = tmp_path / restart_file.name
    shutil.copyfile(restart_file, copy)
    settle(net)
    store = net.store(sid)
    with store.engine.connect() as conn:
        pos = tuple(conn.execute(select(xchg_stream_out.c.next_seq, xchg_stream_out.c.last_manifest_sha256)
                                 .where(xchg_stream_out.c.peer == "ho")).one())
        applied = received.history(conn, "ho")
    assert [a["kind"] for a in applied] == ["applied"]
    shutil.copyfile(copy, store.cfg.inbox / copy.name)
    net.cycle([sid])
    store = net.store(sid)
    with store.engine.connect() as conn:
        assert tuple(conn.execute(select(xchg_stream_out.c.next_seq, xchg_stream_out.c.last_manifest_sha256)
                                  .where(xchg_stream_out.c.peer == "ho")).one()) == pos
        assert [a["kind"] for a in received.history(conn, "ho")] == ["applied"]
    assert not (store.cfg.inbox / copy.name).exists()

    # at a store, `peer restart` is refused with the command to run at the HO
    res = CliRunner().invoke(main, ["peer", "restart", "--home", str(store.cfg.home), "--peer", "ho",
                                    "--reason", "x"])
    assert res.exit_code != 0 and "exchange peer restart --peer s001" in res.output


def test_a_store_killed_right_after_it_applied_the_restart_recovers(net: Net, tmp_path: Path) -> None:
    """Killed after the restart's commit, before its forked bundles were set aside: the next run sets them
    aside (only those very files: its new bundles reuse their names) and the streams settle."""
    import os
    import sys

    sid = "s001"
    seed_store(net, sid, sales=3)
    net.settle()
    backup(net, sid, tmp_path / "backup")
    seed_store(net, sid, sales=2, seed=1)
    net.settle()
    restore(net, sid, tmp_path / "backup")
    for n in range(2):  # the restored store seals two bundles of its own: seq 2 forks, seq 3 breaks the chain
        seed_store(net, sid, sales=1, seed=10 + n)
        cycles(net, 1, [sid, "ho"])
    forked = {r.file_name: r.file_sha256 for r in sent_rows(net.store(sid), "ho") if r.seq > 1}
    assert len(forked) == 2
    run(net, net.ho, "peer", "restart", "--peer", sid, "--reason", "restored")
    net.cycle(["ho"])
    env = {**os.environ, "EXCHANGE_CRASH_AT": "import.committed"}
    env.pop("EXCHANGE_HOME", None)
    proc = subprocess.run([sys.executable, "-m", "exchange", "sync", "--home", str(net.store(sid).cfg.home)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    net.reopen()
    store = net.store(sid)
    assert any((store.cfg.archive_sent / f).exists() for f in forked)  # killed before it set them aside
    settle(net)
    store, ho = net.store(sid), net.ho
    kept = {p.name: p for p in (store.cfg.home / received.FORKED_DIR).iterdir()}
    assert sorted(kept) == sorted(forked)
    assert {n: hashlib_sha(p) for n, p in kept.items()} == forked
    for name in forked:  # a new bundle may carry the name; never the forked file
        for folder in (store.cfg.outbox, store.cfg.archive_sent):
            assert not (folder / name).exists() or hashlib_sha(folder / name) != forked[name]
    mine = store_docs_of(store, sid)
    assert docs(ho, STORE_TYPES, mine) == docs(store, STORE_TYPES, mine)
    assert set(keys_of(store, "item")) == set(keys_of(ho, "item"))
    got = received_rows(ho, sid)
    assert [r.seq for r in got] == list(range(1, len(got) + 1)) and all(r.status == "APPLIED" for r in got)


def hashlib_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_ack_whose_signed_heads_fork_the_stream_is_evidence(net: Net) -> None:
    """A store's ack names, in its signed heads, the manifest it sealed at a seq the HO applied from
    another file: the HO records that the store went back in time and names the repair; a genuine ack
    (heads in order, even a late one) records nothing."""
    from exchange.node import rotation
    from exchange.vocabulary import AckResult
    from exchange.wire.bundle import Head, Heads, build_ack
    from exchange.wire.formats import ack_name

    sid = "s001"
    seed_store(net, sid, sales=2)
    net.settle()
    seed_store(net, sid, sales=2, seed=1)
    net.settle()
    ho, store = net.ho, net.store(sid)
    [first] = [r for r in sent_rows(ho, sid) if r.seq == 1]
    applied = {r.seq: r.manifest_sha256 for r in received_rows(ho, sid)}

    def ack(sealed: str) -> None:
        data = build_ack(key=rotation.signing_key_for(store, "ho"), acker=sid, sender="ho", seq=1,
                         bundle_sha256=first.file_sha256, manifest_sha256=first.manifest_sha256,
                         result=AckResult.APPLIED, recipients=store.recipients_for("ho"),
                         heads=Heads(Head(1, first.manifest_sha256), Head(2, sealed, 1)))
        (ho.cfg.inbox / ack_name(sid, "ho", 1)).write_bytes(data)
        net.cycle(["ho"])

    ack(applied[2])  # late, but in order: nothing to say
    assert doctor(net, net.ho)["streams went back"]["ok"]
    ack("ab" * 32)  # seq 2 sealed with another manifest than the one applied
    check = doctor(net, net.ho)["streams went back"]
    assert not check["ok"] and "sealed seq 2 of its stream with another manifest" in check["detail"]
    assert f"exchange peer restart --peer {sid}" in check["fix"]


def test_a_restart_while_the_stores_bundles_are_in_flight_loses_nothing(net: Net) -> None:
    """A restart run for a store that is fine (or whose newest bundles are still on their way): what it
    sealed before it applied the restart is set aside at the HO and sent again by the store, once."""
    sid = "s001"
    seed_store(net, sid, sales=3)
    net.settle()
    seed_store(net, sid, sales=3, seed=1)
    net.cycle([sid])  # sealed and pushed; the HO has not pulled it yet
    in_flight = [r for r in sent_rows(net.store(sid), "ho") if r.status == "UPLOADED"]
    assert in_flight
    run(net, net.ho, "peer", "restart", "--peer", sid, "--reason", "ran by mistake")
    net.cycle(["ho"])
    q = [r for r in status.received(net.ho) if r.status == "QUARANTINED"]
    assert q and all("before it applied the stream restart" in (r.reason or "") for r in q)
    settle(net)
    ho, store = net.ho, net.store(sid)
    mine = store_docs_of(store, sid)
    assert docs(ho, STORE_TYPES, mine) == docs(store, STORE_TYPES, mine)
    got = received_rows(ho, sid)
    assert [r.seq for r in got] == list(range(1, len(got) + 1)) and all(r.status == "APPLIED" for r in got)
    versions = events_in_archive(store, "ho", ho)
    assert len(versions) == len(set(versions))
    with ho.engine.connect() as conn:
        assert not [c for c in conflict_log.conflicts(conn) if c.policy == "restored"]
    assert doctor(net, ho)["streams went back"]["ok"] and doctor(net, store)["streams"]["ok"]


def test_the_words_both_sides_share_are_the_same() -> None:
    """receive/ and send/ may not import each other: the clock's key and the restart's kind are spelled in
    both; the store's jumped clock is the one its exporter reads, and what it announces is what it wrote."""
    from exchange.send import clock
    from exchange.send import restart as sending

    assert received.CLOCK_KEY == clock.CLOCK_KEY
    assert received.APPLIED == sending.APPLIED


def lane_rows(node: Node, table: Any, peer: str) -> dict[str, list[Any]]:
    """The rows of a per-stream table (``xchg_sent``, ``xchg_received``) with ``peer``, by lane, in seq order."""
    with node.engine.connect() as conn:
        found = conn.execute(select(table).where(table.c.peer == peer).order_by(table.c.lane, table.c.seq)).all()
    out: dict[str, list[Any]] = {}
    for r in found:
        out.setdefault(r.lane, []).append(r)
    return out


def positions(node: Node, table: Any, peer: str) -> dict[str, tuple[int, str | None]]:
    """lane -> (last seq, manifest) of each stream with ``peer`` (``xchg_stream_out``: the last sealed)."""
    with node.engine.connect() as conn:
        found = conn.execute(select(table).where(table.c.peer == peer)).all()
    if table is xchg_stream_out:
        return {r.lane: (r.next_seq - 1, r.last_manifest_sha256) for r in found if r.next_seq > 1}
    return {r.lane: (r.last_seq, r.last_manifest_sha256) for r in found}


def test_a_restored_store_with_lanes_is_repaired_in_every_lane(tmp_path: Path, db_url: str) -> None:
    """The reference lanes (masters, orders, sales, main): a store restored from a backup forks its streams
    in several lanes at once; one restart (sealed in the default lane, its record listing every other lane)
    re-bases them all: each lane of both directions continues where the HO stands, nothing lost or applied
    twice, and the HO's archive verifies lane by lane."""
    from test_lanes import new_transfer, with_catalog

    net = make_net(tmp_path / "net", ho_db=db_url)
    try:
        with_catalog(net, {"lanes": "reference"})
        seed_ho(net)
        net.settle()
        sid = "s001"
        seed_store(net, sid, sales=4)
        net.settle()
        backup(net, sid, tmp_path / "backup")
        backed_bills = set(keys_of(net.store(sid), "sales_bill"))
        ids = item_ids(net)
        for day in range(2):  # two more days: sales (sales lane), prices (masters), transfer orders (orders)
            seed_store(net, sid, sales=3, seed=day + 1)
            reprice(net.ho, ids[day * 2:day * 2 + 2])
            new_transfer(net.ho, f"TO-R{day}", sid, ids[day])
            net.settle()
        ho = net.ho
        before = {lane: rs[-1].seq for lane, rs in lane_rows(ho, xchg_sent, sid).items()}
        assert {"masters", "orders", "sales"} <= set(before) | set(lane_rows(ho, xchg_received, sid))
        lost_bills = sorted(set(store_docs_of(ho, sid)["sales_bill"]) - backed_bills)
        assert len(lost_bills) == 6

        restore(net, sid, tmp_path / "backup")
        seed_store(net, sid, sales=2, seed=9)  # new bills after the restore, in the sales lane
        reprice(net.ho, ids[:1])
        new_transfer(net.ho, "TO-R9", sid, ids[2])
        cycles(net, 2)
        assert not doctor(net, net.ho)["streams went back"]["ok"]

        out = run(net, net.ho, "peer", "restart", "--peer", sid, "--reason", "restored with lanes")
        assert "restart sealed for s001" in out.output
        restart_seq = json.loads(run(net, net.ho, "peer", "restarts", "--peer", sid, "--json").output
                                 )["restarts"][0]["seq"]
        settle(net, rounds=10)
        ho, store = net.ho, net.store(sid)

        # the restart travels in the default lane and lists every other lane's positions
        sent = lane_rows(ho, xchg_sent, sid)
        assert restart_seq in [r.seq for r in sent["main"]]
        applied = json.loads(run(net, store, "peer", "restarts", "--json").output)["restarts"][0]
        assert applied["kind"] == "applied" and applied["seq"] == restart_seq
        assert set(applied["detail"]["lanes"]) == {"main", "masters", "orders", "sales"}
        ended = {ln for ln, rs in sent.items() for r in rs if r.status == "ABANDONED"}
        assert {"masters", "orders"} <= ended  # sealed after the restore, never acknowledged: ended by the restart
        # every lane of both directions continues where the other side stands
        assert positions(store, xchg_stream_out, "ho") == {
            k: v for k, v in positions(ho, xchg_stream_in, sid).items() if v[0] > 0}
        assert positions(store, xchg_stream_in, "ho") == positions(ho, xchg_stream_out, sid)
        # the HO's documents at the store, and the store's at the HO, row for row
        assert docs(store, HO_TYPES) == docs(ho, HO_TYPES, {t: keys_of(store, t) for t in HO_TYPES})
        assert {"[\"TO-R0\"]", "[\"TO-R1\"]", "[\"TO-R9\"]"} <= set(keys_of(store, "transfer_order"))
        mine = store_docs_of(store, sid)
        assert docs(ho, STORE_TYPES, mine) == docs(store, STORE_TYPES, mine)
        # none applied twice: each lane of the store's stream is contiguous and APPLIED once
        for lane, rs in lane_rows(ho, xchg_received, sid).items():
            assert [r.seq for r in rs] == list(range(1, len(rs) + 1)), lane
            assert all(r.status == "APPLIED" for r in rs), (lane, [(r.seq, r.status) for r in rs])
        for lane, rs in lane_rows(store, xchg_sent, "ho").items():
            assert all(r.status == "PROCESSED" for r in rs), (lane, [(r.seq, r.status) for r in rs])
        assert all(r.status in ("PROCESSED", "ABANDONED") for rs in sent.values() for r in rs)
        versions = events_in_archive(store, "ho", ho)
        assert len(versions) == len(set(versions))
        assert doctor(net, ho)["streams"]["ok"] and doctor(net, store)["streams"]["ok"]
        assert doctor(net, ho)["streams went back"]["ok"]
        res = CliRunner().invoke(main, ["audit", "verify", "--home", str(ho.cfg.home), "--json"],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        report = json.loads(res.output)
        assert {s["lane"] for s in report["streams"] if s["recipient"] == sid} >= {"main", "masters", "orders"}
        masters = next(s for s in report["streams"] if s["stream"] == f"ho->{sid} [masters]")
        assert any(f["check"] == "restart" and "default lane" in f["message"] for f in masters["findings"])
    finally:
        net.dispose()


def test_a_restart_records_lanes_are_parsed_strictly() -> None:
    """The record's optional ``lanes`` (FORMAT.md 4.2) as a hostile HO could write it: each malformed shape
    is a FormatError naming the problem; a well-formed one reads back equal, and a record without it is
    format 4's."""
    from datetime import UTC, datetime

    from exchange.errors import FormatError
    from exchange.wire.restart import LanePos, Restart, parse_restart

    sha = "ab" * 32
    rec = Restart("admin", datetime(2026, 12, 3, tzinfo=UTC), "restored", 3, sha, 40, ((3, sha),),
                  (LanePos("masters", 2, sha, 5, sha), LanePos("orders", 0, None, 0, None)))
    good = rec.as_json()
    assert parse_restart(json.loads(json.dumps(good))) == rec
    assert "lanes" not in Restart("a", rec.at, "r", 0, None, 0, ()).as_json()
    assert rec.received_in("masters") == (2, sha) and rec.received_in("sales") == (0, None)
    assert rec.manifest_at(2, "masters") == sha and rec.manifest_at(1, "masters") is None

    def bad(lanes: Any, words: str) -> None:
        with pytest.raises(FormatError, match=words):
            parse_restart({**good, "lanes": lanes})

    entry = good["lanes"][0]
    bad([], "1 to 64")
    bad([entry] * 65, "1 to 64")
    bad("masters", "1 to 64")
    bad([entry, entry], "listed twice")
    bad([{**entry, "lane": "main"}], "not a lane other than the default")
    bad([{**entry, "lane": "Masters!"}], "not a lane other than the default")
    bad([{**entry, "extra": 1}], "exactly")
    bad([{**entry, "sent": {"seq": 0, "manifest_sha256": sha}}], "must be null for seq 0")
    bad([{**entry, "sent": {"seq": 2, "manifest_sha256": None}}], "manifest_sha256")
    bad([{**entry, "received": {"seq": -1, "manifest_sha256": None}}], "seq")
    with pytest.raises(FormatError, match="expected exactly the fields"):
        parse_restart({**good, "lanez": []})


def test_the_hos_edit_of_a_store_customer_in_the_lost_days_reaches_the_restored_store(net: Net,
                                                                                      tmp_path: Path) -> None:
    """A customer (editable on both sides) the HO changed after the store's backup was taken: the store,
    restored, lost that change with the rest; the restart's reload sends it again, and it is applied
    there (the store had not changed it since), not held as a conflict."""
    from datetime import date

    from sqlalchemy import update

    from exchange.database import schema as s

    from exchange.database.capture import record_events

    sid = "s001"
    with net.store(sid).engine.begin() as conn:
        for cid in ("C8", "C9"):
            conn.execute(s.customer.insert().values(store_id=sid, customer_id=cid, name="Ravi", phone="111",
                                                    created_at=date(2024, 3, 1)))
        record_events(conn, "customer", [(sid, "C8"), (sid, "C9")])
    for node in net.nodes:
        cli("triggers", "install", "--home", str(node.cfg.home))
    net.settle()
    backup(net, sid, tmp_path / "backup")
    with net.ho.engine.begin() as conn:  # the HO's change, captured by its triggers, sent and applied
        conn.execute(update(s.customer).where(s.customer.c.store_id == sid).values(phone="999"))
    net.settle()

    def phone(node: Node, cid: str = "C9") -> Any:
        with node.engine.connect() as conn:
            return conn.execute(select(s.customer.c.phone).where(s.customer.c.store_id == sid,
                                                                 s.customer.c.customer_id == cid)).scalar()

    assert phone(net.store(sid)) == "999"
    restore(net, sid, tmp_path / "backup")
    assert phone(net.store(sid)) == "111"
    with net.store(sid).engine.begin() as conn:  # C8 changed at the restored store too: a real conflict
        conn.execute(update(s.customer).where(s.customer.c.store_id == sid, s.customer.c.customer_id == "C8")
                     .values(phone="555"))
    cycles(net, 2)
    run(net, net.ho, "peer", "restart", "--peer", sid, "--reason", "restored")
    settle(net)
    assert phone(net.store(sid)) == phone(net.ho) == "999"  # C9: the HO's change, applied
    found = json.loads(cli("status", "conflicts", "--json", "--home", str(net.store(sid).cfg.home)).output)
    held = [(c["doc_key"], c["status"]) for c in found["conflicts"]]
    assert held == [(["s001", "C8"], "OPEN")], found  # C8: changed at both ends: held for a person (manual)
