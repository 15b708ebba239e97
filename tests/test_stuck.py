"""Bad bundles never hold a stream for ever (issue 18): through the CLI, on SQLite and PostgreSQL.

- a bundle the receiver's database refuses as a whole (a trigger that rolls the
  transaction back) is FAILED with the database's reason, shown by ``status
  received`` and ``doctor`` with the command that resolves it, and ``retry``
  exits 21 while it is FAILED;
- ``exchange bundle skip`` moves the stream past it with a signed decision that
  reaches the sender in a REJECTED ack (version 3); the sender shows it, resends
  the documents once fixed, and an auditor sees the skip, not a gap.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).parent))
from enginehelpers import Net, add_item, item_ids, make_net, prices, reprice, seed_ho, seed_store  # noqa: E402

from exchange.cli.main import main  # noqa: E402
from exchange.database import schema  # noqa: E402
from exchange.database.tables import xchg_decision  # noqa: E402
from exchange.node import config  # noqa: E402
from exchange.node.home import Node  # noqa: E402
from exchange.vocabulary import DEFAULT_LANE  # noqa: E402
from exchange.wire.formats import ack_name  # noqa: E402


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def refuse_writes(node: Node, table: str, message: str) -> None:
    """A rule of the node's own database that rolls back the whole transaction writing ``table``.

    SQLite: a trigger's RAISE(ROLLBACK) ends the transaction at once; PostgreSQL: a
    deferred constraint trigger raises at COMMIT, which no savepoint can catch.
    """
    with node.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            # SQLite checks a CREATE's name against the schema this connection last read: a pooled
            # connection that has not read since another one dropped the trigger would still see it
            conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").all()
            for event in ("INSERT", "UPDATE"):
                conn.exec_driver_sql(f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON {table} "
                                     f"BEGIN SELECT RAISE(ROLLBACK, '{message}'); END")
        else:
            conn.exec_driver_sql(f"CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                                 f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$")
            conn.exec_driver_sql(f"CREATE CONSTRAINT TRIGGER refuse AFTER INSERT OR UPDATE ON {table} "
                                 "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()")


def allow_writes(node: Node, table: str) -> None:
    with node.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER refuse_insert")
            conn.exec_driver_sql("DROP TRIGGER refuse_update")
        else:
            conn.exec_driver_sql(f"DROP TRIGGER refuse ON {table}")
            conn.exec_driver_sql("DROP FUNCTION refuse()")


def received(node: Node) -> dict[int, dict[str, Any]]:
    res = cli("status", "received", "--home", str(node.cfg.home), "--json")
    assert res.exit_code == 0, res.output
    return {r["seq"]: r for r in json.loads(res.stdout)["bundles"]}


def sent(node: Node) -> dict[int, dict[str, Any]]:
    res = cli("status", "sent", "--home", str(node.cfg.home), "--json")
    assert res.exit_code == 0, res.output
    return {r["seq"]: r for r in json.loads(res.stdout)["bundles"]}


def doctor_streams(node: Node) -> tuple[int, dict[str, Any]]:
    res = cli("doctor", "--home", str(node.cfg.home), "--json")
    return res.exit_code, next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "streams")


def count(node: Node, table: Any) -> int:
    with node.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


# ---------------------------------------------------------------- refused by the database: FAILED, visible

def test_bundle_refused_by_a_store_trigger_is_failed_visible_and_retried(tmp_path: Path, db_url: str) -> None:
    net = make_net(tmp_path / "net", stores=("s001",), store_dbs={"s001": db_url})
    seed_ho(net, 6)
    net.settle()
    st = net.store()
    assert doctor_streams(st)[1]["ok"]
    refuse_writes(st, "item", "store rule: no price changes")
    ids = item_ids(net)[:2]
    reprice(net.ho, ids)
    net.cycle()  # the HO exports, the store receives: recorded FAILED, not an import error (no exit 40)

    row = received(st)[2]
    assert row["status"] == "FAILED"
    assert "store rule: no price changes" in row["reason"]  # the database's own reason
    assert "exchange bundle skip ho 2" in row["reason"] and "exchange retry" in row["reason"]
    code, check = doctor_streams(st)
    assert code == 1 and not check["ok"]
    assert "bundle 2 of ho FAILED" in check["detail"] and "exchange bundle skip ho 2" in check["fix"]
    from exchange.service.ui.data import received_bundles

    page = {b.seq: b for b in received_bundles(st)[0]}  # what the page lists
    assert page[2].status == "FAILED" and "exchange bundle skip ho 2" in (page[2].reason or "")
    res = cli("retry", "--home", str(st.cfg.home))
    assert res.exit_code == 21, res.output  # ApplyError: still FAILED
    assert "exchange bundle skip ho 2" in res.output and "free disk" not in res.output.lower()
    assert prices(st, ids) != prices(net.ho, ids)  # nothing of it applied
    net.cycle()  # the REJECTED ack reached the HO; the store's archive holds it, not the bundle
    res = cli("audit", "verify", "--home", str(st.cfg.home), "--json")
    stream = next(s for s in json.loads(res.stdout)["streams"] if s["stream"] == "ho->s001")
    assert stream["failed"] == [2] and stream["errors"] == 0, stream["findings"]  # FAILED is not a gap
    assert not any(f["check"] == "gap" for f in stream["findings"])

    allow_writes(st, "item")
    res = cli("retry", "--home", str(st.cfg.home))
    assert res.exit_code == 0, res.output
    assert received(st)[2]["status"] == "APPLIED"
    assert prices(st, ids) == prices(net.ho, ids)
    net.settle()
    assert sent(net.ho)[2]["status"] == "PROCESSED"
    assert doctor_streams(st)[1]["ok"]


def test_trigger_naming_a_missing_table_parks_and_doctor_says_so(tmp_path: Path, db_url: str) -> None:
    net = make_net(tmp_path / "net", stores=("s001",), store_dbs={"s001": db_url})
    seed_ho(net, 4)
    net.settle()
    st = net.store()
    with st.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("CREATE TRIGGER log_price AFTER UPDATE ON item "
                                 "BEGIN INSERT INTO price_log_missing VALUES (1); END")
        else:
            conn.exec_driver_sql("CREATE FUNCTION log_price() RETURNS trigger LANGUAGE plpgsql AS "
                                 "$$ BEGIN INSERT INTO price_log_missing VALUES (1); RETURN NEW; END $$")
            conn.exec_driver_sql("CREATE TRIGGER log_price AFTER UPDATE ON item FOR EACH ROW "
                                 "EXECUTE FUNCTION log_price()")
    reprice(net.ho, item_ids(net)[:1])
    net.cycle()
    assert received(st)[2]["status"] == "APPLIED"  # the rest of the bundle applied; the document parked
    code, check = doctor_streams(st)
    assert code == 1 and "1 documents parked" in check["detail"] and "exchange status parked" in check["fix"]
    res = cli("status", "parked", "--home", str(st.cfg.home), "--json")
    assert "price_log_missing" in res.stdout


# ---------------------------------------------------------------- skip, the sender sees the decision, resend

def _with_auditor(net: Net, tmp_path: Path) -> Path:
    key = tmp_path / "auditor.key"
    assert cli("audit", "keygen", "--out", str(key)).exit_code == 0
    recipient = (tmp_path / "auditor.key.pub").read_text().strip()
    for node in net.nodes:
        cfg = config.load(node.cfg.home)
        cfg.auditors = (recipient,)
        cfg.save()
    net.reopen()
    return key


def _a_sales_bundle_failed_at_the_ho(tmp_path: Path, db_url: str) -> tuple[Net, Path, int]:
    """A pair with an auditor whose HO refused the store's sales bundle (FAILED): (net, auditor key, its seq)."""
    net = make_net(tmp_path / "net", stores=("s001",), ho_db=db_url)
    key = _with_auditor(net, tmp_path)
    seed_ho(net, 6)
    net.settle()
    refuse_writes(net.ho, "sales_bill", "ho rule: sales closed for audit")
    seed_store(net, "s001", sales=3, seed=1)
    net.cycle(["s001", "ho"])
    bad = max(received(net.ho))
    assert received(net.ho)[bad]["status"] == "FAILED"
    return net, key, bad


def test_skip_round_trip_decision_reaches_the_sender_and_resend_applies(tmp_path: Path, db_url: str) -> None:
    net, key, bad = _a_sales_bundle_failed_at_the_ho(tmp_path, db_url)
    st, ho = net.store(), net.ho
    assert "ho rule: sales closed for audit" in received(ho)[bad]["reason"]

    seed_store(net, "s001", sales=2, seed=2)  # a later bundle waits behind the FAILED one
    allow_writes(ho, "sales_bill")
    refuse_writes(ho, "sales_bill", "ho rule: sales closed for audit")
    net.cycle(["s001", "ho"])
    assert received(ho)[bad + 1]["status"] == "WAITING"

    res = cli("bundle", "skip", "s001", str(bad), "--reason", "period closed; store to resend after audit",
              "--by", "alice", "--home", str(ho.cfg.home))
    assert res.exit_code == 0, res.output
    assert "SKIPPED" in res.output and "alice" in res.output
    assert (ho.cfg.archive_received / "skipped" / received(ho)[bad]["file"]).is_file()  # archived, not deleted
    assert received(ho)[bad]["status"] == "SKIPPED"
    # a crash after the skip's commit: the bundle still in the inbox, the ack not written yet
    name = received(ho)[bad]["file"]
    shutil.copy(ho.cfg.archive_received / "skipped" / name, ho.cfg.inbox / name)
    (ho.cfg.outbox / ack_name("ho", "s001", bad)).unlink()
    res = cli("bundle", "skip", "s001", str(bad), "--reason", "again", "--home", str(ho.cfg.home))
    assert res.exit_code == 20 and "only a FAILED bundle can be skipped" in res.output

    allow_writes(ho, "sales_bill")
    net.cycle(["ho", "s001", "ho", "s001"])
    assert received(ho)[bad + 1]["status"] == "APPLIED"  # the stream moved past the skipped bundle
    assert not (ho.cfg.inbox / name).exists() and received(ho)[bad]["status"] == "SKIPPED"  # re-acked, archived
    row = sent(st)[bad]
    assert row["status"] == "REJECTED"
    assert "skipped by alice" in row["reason"] and "period closed; store to resend after audit" in row["reason"]
    assert f"exchange resend --peer ho --bundle {bad}" in row["reason"]  # the command that resolves it
    assert count(ho, xchg_decision) == 1 and count(st, xchg_decision) == 1
    with st.engine.connect() as conn:
        d = conn.execute(select(xchg_decision)).mappings().one()
    assert (d["side"], d["peer"], d["seq"], d["kind"], d["decided_by"]) == ("sent", "ho", bad, "skipped", "alice")

    assert count(ho, schema.sales_bill) < count(st, schema.sales_bill)  # the skipped bills never arrived
    res = cli("resend", "--peer", "ho", "--bundle", str(bad), "--home", str(st.cfg.home))
    assert res.exit_code == 0, res.output
    assert "documents" in res.output and not res.output.startswith("0 ")
    net.cycle(["s001", "ho", "s001"])
    assert sent(st)[max(sent(st))]["status"] == "PROCESSED" and max(sent(st)) > bad + 1
    assert count(ho, schema.sales_bill) == count(st, schema.sales_bill)
    assert count(ho, schema.sales_bill_line) == count(st, schema.sales_bill_line)

    res = cli("audit", "verify", str(ho.cfg.home / "archive"), "--home", str(ho.cfg.home),
              "--identity", str(key), "--json")
    report = json.loads(res.stdout)
    stream = next(s for s in report["streams"] if s["stream"] == "s001->ho")
    assert stream["skipped"] == [bad] and stream["errors"] == 0, stream["findings"]
    assert any(f["check"] == "skipped" and "alice" in f["message"] for f in stream["findings"])
    assert not any(f["check"] == "gap" for f in stream["findings"])


# ---------------------------------------------------------------- the decision in an ack, read as hostile

def _decision_ack(tmp_path: Path, net: Net, decision: Any, result: str = "REJECTED") -> Path:
    """An ack signed by the store's real key, for a bundle of the HO, carrying ``decision``."""
    from exchange.files import utc_now
    from exchange.wire.bundle import build_ack
    from exchange.wire.formats import ack_name

    st = net.store()
    raw = build_ack(key=st.signing_key, acker="s001", sender="ho", seq=1, bundle_sha256="ab" * 32,
                    manifest_sha256="cd" * 32, result=result, recipients=st.recipients_for("ho"),
                    reason="why", created=utc_now(), decision=decision)
    path = tmp_path / ack_name("s001", "ho", 1)
    path.write_bytes(raw)
    return path


def test_decision_ack_is_version_3_and_every_field_is_checked(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from exchange.wire.bundle import read_ack
    from exchange.wire.decision import Decision

    net = make_net(tmp_path / "net", stores=("s001",))
    ho = net.ho
    at = datetime(2026, 12, 2, 17, 0, tzinfo=UTC)
    good = read_ack(_decision_ack(tmp_path, net, Decision("skipped", "alice", at, "closed period")), ho.trust,
                    me="ho", identities=ho.identities)
    assert good.version == 3 and good.details == "decrypted"
    assert good.decision == Decision("skipped", "alice", at, "closed period")
    plain = read_ack(_decision_ack(tmp_path, net, None), ho.trust, me="ho", identities=ho.identities)
    assert plain.version == 2 and plain.decision is None  # no decision: the version every reader reads
    sealed = read_ack(_decision_ack(tmp_path, net, Decision("skipped", "alice", at, "x")), ho.trust, me="ho")
    assert sealed.details == "sealed" and sealed.decision is None  # without an identity: verified, sealed

    for bad, result, problem in [
        (Decision("ignored", "alice", at, "x"), "REJECTED", "decision kind"),
        (Decision("skipped", "al\x1bice", at, "x"), "REJECTED", "decision by"),
        (Decision("skipped", "a" * 129, at, "x"), "REJECTED", "decision by"),
        (Decision("skipped", "alice", at, ""), "REJECTED", "decision reason"),
        (Decision("skipped", "alice", at, "fine"), "APPLIED", "ends a bundle unapplied"),
    ]:
        ack = read_ack(_decision_ack(tmp_path, net, bad, result), ho.trust, me="ho", identities=ho.identities)
        assert ack.details == "unreadable" and ack.decision is None, bad
        assert problem in ack.details_error, (bad, ack.details_error)


# ---------------------------------------------------------------- parked documents: a timer, and ORPHANED

def _parked(node: Node) -> list[dict[str, Any]]:
    res = cli("status", "parked", "--home", str(node.cfg.home), "--json")
    assert res.exit_code == 0, res.output
    return list(json.loads(res.stdout)["parked"])


def test_parked_documents_are_retried_on_the_service_timer(tmp_path: Path, db_url: str) -> None:
    import signal
    import subprocess
    import time

    net = make_net(tmp_path / "net", stores=("s001",), store_dbs={"s001": db_url})
    seed_ho(net, 4)
    net.settle()
    st = net.store()
    with st.engine.begin() as conn:  # a store rule that refuses one document at a time (it is parked)
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("CREATE TRIGGER hold BEFORE UPDATE ON item BEGIN "
                                 "SELECT RAISE(ABORT, 'store rule: prices frozen'); END")
        else:
            conn.exec_driver_sql("CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS "
                                 "$$ BEGIN RAISE EXCEPTION 'store rule: prices frozen'; END $$")
            conn.exec_driver_sql("CREATE TRIGGER hold BEFORE UPDATE ON item FOR EACH ROW EXECUTE FUNCTION hold()")
    ids = item_ids(net)[:2]
    reprice(net.ho, ids)
    net.cycle()
    assert [p["state"] for p in _parked(st)] == ["RETRYING", "RETRYING"]
    with st.engine.begin() as conn:  # the rule is lifted; no bundle arrives to trigger a retry
        conn.exec_driver_sql("DROP TRIGGER hold" if conn.dialect.name == "sqlite" else "DROP TRIGGER hold ON item")
    cfg = config.load(st.cfg.home)
    cfg.parked_retry_interval = 1
    cfg.save()
    st.engine.dispose()
    log = tmp_path / "run.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "exchange", "-v", "run", "--home", str(st.cfg.home),
                                 "--interval", "3600"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and _parked(st):
            time.sleep(0.2)
        assert not _parked(st), log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    assert "applied on the timer" in log.read_text()
    assert prices(st, ids) == prices(net.ho, ids)


def test_a_parked_document_whose_dependency_was_deleted_is_orphaned(tmp_path: Path, db_url: str) -> None:
    from exchange.database.capture import record_events
    from exchange.demo.data import seed_store_activity

    net = make_net(tmp_path / "net", stores=("s001",), ho_db=db_url)
    seed_ho(net, 6)
    net.settle()
    st, ho = net.store(), net.ho
    sold = "IZ00001"
    with ho.engine.begin() as conn:
        add_item(conn, sold)
        record_events(conn, "item", [(sold,)])
    net.settle()
    with st.engine.begin() as conn:  # the store sells it
        seed_store_activity(conn, "s001", [sold], 2, seed=3)
    with ho.engine.begin() as conn:  # the HO withdraws the item before the store's sale of it arrives
        conn.execute(schema.item.delete().where(schema.item.c.item_id == sold))
        record_events(conn, "item", [(sold,)], "D")
    net.cycle(["s001", "ho"])
    orphaned = [p for p in _parked(ho) if p["state"] == "ORPHANED"]
    assert orphaned and all(f'the item ["{sold}"] it refers to was deleted here' in p["error"] for p in orphaned)
    assert all(p["attempts"] == 1 for p in orphaned)
    code, check = doctor_streams(ho)
    assert code == 1 and "can never apply (ORPHANED" in check["detail"]

    from exchange.receive.importer import retry_parked

    assert retry_parked(ho, orphaned=False) == (0, 0)  # the automatic retries leave them out
    assert all(p["attempts"] == 1 for p in _parked(ho) if p["state"] == "ORPHANED")
    res = cli("retry", "--home", str(ho.cfg.home))  # the operator's retry tries them: still ORPHANED
    assert res.exit_code == 0, res.output
    assert all(p["attempts"] == 2 and p["state"] == "ORPHANED" for p in _parked(ho)
               if p["doc_key"] in {o["doc_key"] for o in orphaned})


# ---------------------------------------------------------------- supersede: no operator at the receiver

def test_supersede_the_receiver_skips_on_the_senders_notice(tmp_path: Path, db_url: str) -> None:
    net = make_net(tmp_path / "net", stores=("s001",), ho_db=db_url)
    seed_ho(net, 6)
    net.settle()
    st, ho = net.store(), net.ho
    refuse_writes(ho, "sales_bill", "ho rule: sales closed")
    seed_store(net, "s001", sales=3, seed=5)
    net.cycle(["s001", "ho", "s001"])
    bad = max(sent(st))
    assert received(ho)[bad]["status"] == "FAILED" and sent(st)[bad]["status"] == "REJECTED"
    res = cli("supersede", "--peer", "ho", "--bundle", str(bad), "--reason", "re-sent after the HO fix",
              "--by", "bob", "--home", str(st.cfg.home))
    assert res.exit_code == 0, res.output
    assert "superseded" in res.output and not res.output.startswith("0 documents and 0")
    allow_writes(ho, "sales_bill")  # fixed at the HO, but nobody there runs retry or skip
    net.cycle(["s001", "ho", "s001"])

    row = received(ho)[bad]
    assert row["status"] == "SKIPPED" and "superseded by bob" in row["reason"]
    assert (ho.cfg.archive_received / "skipped" / row["file"]).is_file()
    assert received(ho)[bad + 1]["status"] == "APPLIED"
    assert "superseded by bob" in sent(st)[bad]["reason"] and sent(st)[bad + 1]["status"] == "PROCESSED"
    assert count(ho, schema.sales_bill) == count(st, schema.sales_bill)
    res = cli("supersede", "--peer", "ho", "--bundle", str(bad), "--reason", "again", "--home", str(st.cfg.home))
    assert res.exit_code == 20 and "already ended" in res.output
    seed_store(net, "s001", sales=1, seed=6)  # the notice is no longer carried once the decision came back
    net.cycle(["s001", "ho", "s001"])
    assert sent(st)[bad + 2]["status"] == "PROCESSED"
    from exchange.send.notices import supersede_notices

    with st.engine.connect() as conn:
        assert supersede_notices(conn, "ho") == []


def test_supersede_notices_are_checked_as_hostile_input() -> None:
    from exchange.errors import BundleError
    from exchange.receive.decisions import read_notices

    ok = {"seq": 4, "kind": "superseded", "by": "bob", "at": "2026-12-02T17:00:00Z", "reason": "fixed"}
    assert read_notices({"supersedes": [ok]}, "b")[4].by == "bob"
    assert read_notices({}, "b") == {}
    for bad in ({"supersedes": "x"}, {"supersedes": [ok] * 101}, {"supersedes": [1]},
                {"supersedes": [{**ok, "seq": 0}]}, {"supersedes": [{**ok, "seq": True}]},
                {"supersedes": [{**ok, "kind": "skipped"}]}, {"supersedes": [{**ok, "extra": 1}]},
                {"supersedes": [{**ok, "at": "yesterday"}]}, {"supersedes": [{**ok, "reason": "x" * 20000}]}):
        with pytest.raises(BundleError):  # FormatError or LimitError: the bundle's notices are ignored
            read_notices(bad, "b")


def test_a_skipped_bundle_does_not_stop_archive_prune_and_verify_shows_it_from_the_checkpoint(
        tmp_path: Path, db_url: str) -> None:
    """The skipped seq ends with a signed decision, not an APPLIED ack: prune takes it (recording the
    decision in its checkpoint) instead of stopping the stream there for ever, at both ends."""
    import time

    net, key, bad = _a_sales_bundle_failed_at_the_ho(tmp_path, db_url)
    st, ho = net.store(), net.ho
    res = cli("bundle", "skip", "s001", str(bad), "--reason", "period closed", "--by", "alice",
              "--home", str(ho.cfg.home))
    assert res.exit_code == 0, res.output
    allow_writes(ho, "sales_bill")
    for k in (2, 3):  # two later bundles, applied and acknowledged
        seed_store(net, "s001", sales=1, seed=k)
        net.cycle(["s001", "ho", "s001"])
    assert received(ho)[bad]["status"] == "SKIPPED" and sent(st)[bad]["status"] == "REJECTED"
    newest = max(received(ho))
    assert received(ho)[newest]["status"] == "APPLIED" and newest >= bad + 2
    net.dispose()
    time.sleep(1.1)  # --older-than 0 takes what was created before this second

    for node, stream in ((ho, "s001->ho"), (st, "s001->ho")):
        res = CliRunner().invoke(main, ["archive", "prune", "--home", str(node.cfg.home), "--older-than", "0",
                                        "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        got = next(s for s in json.loads(res.stdout)["streams"] if s["stream"] == stream)
        assert (got["pruned_first_seq"], got["pruned_last_seq"]) == (1, newest - 1), got["stopped"]  # past the skip
        from exchange.audit.prune import read_checkpoint

        trust = Node.open(node.cfg.home).trust
        cps = [read_checkpoint(p, trust) for p in (node.cfg.home / "archive" / "checkpoints").iterdir()]
        recorded = {(a.seq, a.result, a.decided) for cp in cps if cp.stream == ("s001", "ho", DEFAULT_LANE)
                    for a in cp.acks}
        assert (bad, "REJECTED", True) in recorded, recorded  # the decision's ack, marked as such
        res = cli("audit", "verify", str(node.cfg.home / "archive"), "--home", str(node.cfg.home),
                  "--identity", str(key), "--json")
        report = json.loads(res.stdout)
        s = next(x for x in report["streams"] if x["stream"] == stream)
        assert s["errors"] == 0, s["findings"]
        assert s["skipped"] == [bad], s
        assert not any(f["check"] == "gap" for f in s["findings"])
        net.dispose()


def test_a_checkpoint_marks_only_a_rejected_ack_as_decided() -> None:
    """``decided`` (checkpoint version 3) is read as hostile: only ``true``, only on a REJECTED ack."""
    from exchange.audit.prune import Checkpoint
    from exchange.errors import FormatError

    base = {"format": "exchange-checkpoint", "version": 3, "app_version": "1", "node": "ho", "role": "ho",
            "sender": "s001", "recipient": "ho", "first_seq": 1, "last_seq": 1, "prev": None,
            "last_manifest_sha256": "ab" * 32, "created": "2026-12-02T10:00:00Z",
            "cutoff": "2026-12-02T10:00:00Z", "removed": [],
            "bundles": [{"seq": 1, "name": "s001.ho.0000000001.bundle", "created": "2026-12-02T09:00:00Z",
                         "sha256": "cd" * 32, "manifest_sha256": "ab" * 32, "prev": None}]}
    ack = {"seq": 1, "name": "ho.s001.0000000001.ack", "acker": "ho", "created": "2026-12-02T09:00:01Z",
           "sha256": "ef" * 32, "bundle_sha256": "cd" * 32}
    ok = Checkpoint.parse(json.dumps(base | {"acks": [ack | {"result": "REJECTED", "decided": True}]}).encode())
    assert ok.acks[0].decided
    for bad in ({"result": "APPLIED", "decided": True}, {"result": "REJECTED", "decided": "yes"},
                {"result": "REJECTED", "decided": False}):
        with pytest.raises(FormatError, match="decided"):
            Checkpoint.parse(json.dumps(base | {"acks": [ack | bad]}).encode())
    v2 = Checkpoint.parse(json.dumps(base | {"version": 2, "acks": [ack | {"result": "REJECTED", "decided": True}]}
                                     ).encode())
    assert not v2.acks[0].decided  # a version 2 checkpoint cannot mark one
