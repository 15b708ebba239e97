"""The auditors' tools on real archives: verify, extract, report, prune, key rotation.

One module fixture runs the demo (an HO and two stores), then names an auditor
in every node's exchange.toml and runs more exchange rounds, so the archives
hold bundles sealed before the auditor existed and bundles encrypted to it.
Each test works on a copy holding only what an auditor gets: the archives, the
allowed_signers file and the auditor's key.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select, text

from exchange.audit.prune import prune, read_checkpoint, scan_archive
from exchange.cli import main
from exchange.database import schema
from exchange.demo.data import seed_store_activity
from exchange.demo.run import run_demo
from exchange.node import config, keys
from exchange.node.home import Node
from exchange.send.export import reload
from exchange.database.batch import EVENTS_SCHEMA
from exchange.service.sync import sync
from exchange.wire import bundle
from exchange.files import sha256_file, write_file_atomic
from exchange.wire.bundle import BundleReader, build_ack, seal_bundle
from exchange.wire.crypto import age, sshsig
from exchange.wire.formats import CHECKPOINTS_DIR

NODES = ("ho", "s001", "s002")


@dataclass(frozen=True)
class World:
    demo: Path  # the node homes: demo/ho, demo/s001, demo/s002
    key: Path  # auditor identity
    recipient: str
    sales: dict[str, int]  # sales bills per store (all sealed after the auditor was named)

    def home(self, node: str) -> Path:
        return self.demo / node


def _rounds(nodes: list[Node], n: int = 2) -> None:
    for _ in range(n):
        for node in nodes:
            rep = sync(node)
            assert not rep.errors, rep.errors


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("audit")
    demo = base / "demo"
    assert run_demo(demo, items=20, sales=0, echo=lambda s: None)
    key = base / "auditor.key"
    res = CliRunner().invoke(main, ["audit", "keygen", "--out", str(key)])
    assert res.exit_code == 0, res.output
    recipient = (base / "auditor.key.pub").read_text().strip()
    assert recipient in res.output
    for n in NODES:
        cfg = config.load(demo / n)
        cfg.auditors = (recipient,)
        cfg.save()
    ho, *stores = [Node.open(demo / n) for n in NODES]
    with ho.engine.connect() as conn:
        items = [str(r[0]) for r in conn.execute(select(schema.item.c.item_id))]
    for st in stores:
        reload(ho, st.id, ["item"])
    sales = {"s001": 6, "s002": 4}
    for i, st in enumerate(stores):
        with st.engine.begin() as conn:
            seed_store_activity(conn, st.id, items, sales[st.id], seed=10 + i)
    _rounds([ho, *stores])
    for i, st in enumerate(stores):
        with st.engine.begin() as conn:
            seed_store_activity(conn, st.id, items, 3, seed=20 + i)
        sales[st.id] += 3
    _rounds([ho, *stores])
    return World(demo, key, recipient, sales)


@dataclass(frozen=True)
class Copy:
    """What an auditor has on another machine: archives, allowed_signers, the auditor key."""

    root: Path
    archives: Path
    trust: Path
    key: Path

    def args(self, *more: str, identity: bool = True) -> list[str]:
        out = [*more, "--trust", str(self.trust)]
        return out + ["--identity", str(self.key)] if identity else out


@pytest.fixture
def audit_copy(world: World, tmp_path: Path) -> Copy:
    root = tmp_path / "auditor"
    archives = root / "archives"
    for n in NODES:
        shutil.copytree(world.home(n) / "archive", archives / n)
    shutil.copy(world.home("ho") / "keys" / "allowed_signers", root / "allowed_signers")
    shutil.copy2(world.key, root / "auditor.key")
    return Copy(root, archives, root / "allowed_signers", root / "auditor.key")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def verify_json(c: Copy, *extra: str, root: Path | None = None, identity: bool = True) -> tuple[int, dict[str, Any]]:
    res = run(*c.args("audit", "verify", str(root or c.archives), "--json", *extra, identity=identity))
    return res.exit_code, json.loads(res.stdout)


def findings(report: dict[str, Any], severity: str = "error") -> list[dict[str, Any]]:
    out = [dict(f, stream=s["stream"]) for s in report["streams"] for f in s["findings"]]
    out += report["general"]
    return [f for f in out if f["severity"] == severity]


def stream(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["streams"] if s["stream"] == name)


def files_named(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.rglob(name) if p.is_file())


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def ho_key(world: World) -> Any:
    return keys.load_signing_key(config.load(world.home("ho")))


def small_tables() -> dict[str, Any]:
    return {"_events": pa.Table.from_pydict({"doc_type": [], "doc_key": [], "op": [], "version": []},
                                           schema=EVENTS_SCHEMA)}


# ---------------------------------------------------------------- keygen

def test_keygen_writes_private_identity_and_refuses_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    res = run("audit", "keygen", "--out", str(key))
    assert res.exit_code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ids = age.parse_identity_file(key.read_text())
    recipient = age.recipient_from_identity(ids[0])
    assert recipient in res.output and 'auditors = ["' + recipient in res.output
    assert (tmp_path / "a.key.pub").read_text().strip() == recipient
    before = key.read_bytes()
    again = CliRunner().invoke(main, ["audit", "keygen", "--out", str(key)])
    assert again.exit_code != 0 and key.read_bytes() == before


# ---------------------------------------------------------------- verify

def test_verify_clean_copy_with_only_trust_and_identity(world: World, audit_copy: Copy) -> None:
    """Run the real program elsewhere, with nothing but the copy: no node home, no database."""
    env = {k: v for k, v in os.environ.items() if k != "EXCHANGE_HOME"}
    proc = subprocess.run([sys.executable, "-m", "exchange", "audit", "verify", "archives",
                           "--trust", "allowed_signers", "--identity", "auditor.key", "--json"],
                          cwd=audit_copy.root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["decrypted"]
    assert [s["stream"] for s in report["streams"]] == ["ho->s001", "ho->s002", "s001->ho", "s002->ho"]
    assert findings(report) == []
    for s in report["streams"]:
        assert s["first_seq"] == 1 and s["acked"] == s["bundles"] >= 2
        assert s["files"] == 2 * s["bundles"]  # the sender's and the recipient's copy
        assert s["decrypted"] >= 1  # sealed after the auditor was named
    # the bundles sealed before the auditor existed are said to be unreadable, as warnings
    warned = findings(report, "warning")
    assert warned and all(w["check"] == "decrypt" for w in warned)
    # the human form: a table and OK
    res = run(*audit_copy.args("audit", "verify", str(audit_copy.archives)))
    assert res.exit_code == 0 and "ho->s001" in res.stdout and "OK" in res.stdout


def test_verify_one_node_home_uses_its_trust(world: World) -> None:
    res = run("audit", "verify", "--home", str(world.home("s001")), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["root"].endswith("archive") and {s["stream"] for s in report["streams"]} == {"ho->s001", "s001->ho"}


def test_verify_needs_a_trust_store(audit_copy: Copy) -> None:
    res = CliRunner().invoke(main, ["audit", "verify", str(audit_copy.archives)], env={"EXCHANGE_HOME": ""})
    assert res.exit_code == 3 and "--trust" in res.output


def test_tampered_bundle_is_a_finding(audit_copy: Copy) -> None:
    victim = files_named(audit_copy.archives, "s001.ho.0000000002.bundle")[0]
    flip(victim, victim.stat().st_size - 2048)  # inside the encrypted payload
    rc, report = verify_json(audit_copy)
    assert rc == 1 and not report["ok"]
    rel = victim.relative_to(audit_copy.archives).as_posix()
    bad = [f for f in findings(report) if f["file"] == rel]
    assert bad and bad[0]["check"] in ("payload", "inner") and bad[0]["seq"] == 2
    # the intact copy at the other node still carries the stream: no gap, no fork
    assert {f["check"] for f in findings(report)} <= {"payload", "inner"}


def test_tampered_manifest_fails_the_signature(audit_copy: Copy) -> None:
    for victim in files_named(audit_copy.archives, "ho.s002.0000000002.bundle"):
        data = victim.read_bytes()
        i = data.index(b'"seq": 2')
        victim.write_bytes(data[:i] + b'"seq": 3' + data[i + 8:])  # same length, well-formed JSON
    rc, report = verify_json(audit_copy, identity=False)
    assert rc == 1
    checks = {(f["check"], f["seq"]) for f in findings(report) if f["stream"] == "ho->s002"}
    assert ("signature", 3) in checks  # a forged "seq 3" is not what ho signed
    assert ("gap", 2) in checks  # and seq 2, which s002 acknowledged, is missing
    assert checks == {("signature", 3), ("gap", 2)}


def test_removed_bundle_is_a_gap(audit_copy: Copy) -> None:
    for p in files_named(audit_copy.archives, "s001.ho.0000000002.bundle"):
        p.unlink()
    rc, report = verify_json(audit_copy)
    assert rc == 1
    s = stream(report, "s001->ho")
    gaps = [f for f in s["findings"] if f["check"] == "gap"]
    assert len(gaps) == 1 and gaps[0]["seq"] == 2 and gaps[0]["message"].startswith("missing")
    assert "acknowledged in the archive: 2" in gaps[0]["message"]
    assert [f["check"] for f in s["findings"] if f["severity"] == "error"] == ["gap"]


def test_removed_first_bundles_are_missing_beginning(audit_copy: Copy) -> None:
    for p in files_named(audit_copy.archives, "ho.s001.0000000001.*"):
        p.unlink()
    rc, report = verify_json(audit_copy)
    assert rc == 1
    gaps = [f for f in stream(report, "ho->s001")["findings"] if f["check"] == "gap"]
    assert gaps and "beginning" in gaps[0]["message"]


def test_forked_seq_is_detected(world: World, audit_copy: Copy) -> None:
    seq1 = files_named(audit_copy.archives, "ho.s001.0000000001.bundle")[0]
    with BundleReader(seq1) as r:
        prev = r.manifest.sha256
    extra = audit_copy.archives / "found-on-a-usb-stick"
    extra.mkdir()
    s001 = config.load(world.home("s001"))
    forged = seal_bundle(extra / "ho.s001.0000000002.bundle", key=ho_key(world), sender="ho", recipient="s001",
                         seq=2, prev=prev, recipients=[keys.recipient(s001), world.recipient],
                         tables=small_tables())
    rc, report = verify_json(audit_copy)
    assert rc == 1
    s = stream(report, "ho->s001")
    forks = [f for f in s["findings"] if f["check"] == "fork"]
    assert len(forks) == 1 and forks[0]["seq"] == 2 and forged.manifest.sha256[:12] in forks[0]["message"]
    # the forged file is authentic and intact; nothing acknowledges it
    assert not any(f["check"] in ("signature", "payload", "chain") for f in s["findings"])


def test_missing_ack_is_a_finding_but_the_newest_only_a_warning(audit_copy: Copy) -> None:
    for p in files_named(audit_copy.archives, "s001.ho.0000000001.ack"):
        p.unlink()  # s001's receipt for ho's seq 1; seq 2 is acknowledged
    rc, report = verify_json(audit_copy)
    assert rc == 1
    errs = [f for f in findings(report) if f["stream"] == "ho->s001"]
    assert [(f["check"], f["seq"]) for f in errs] == [("ack", 1)] and "no ack" in errs[0]["message"]


def test_newest_bundle_without_ack_is_a_warning(audit_copy: Copy) -> None:
    s = json.loads(run(*audit_copy.args("audit", "verify", str(audit_copy.archives), "--json")).stdout)
    last = stream(s, "s002->ho")["last_seq"]
    for p in files_named(audit_copy.archives, f"ho.s002.{last:010d}.ack"):
        p.unlink()
    rc, report = verify_json(audit_copy)
    assert rc == 0, findings(report)
    st = stream(report, "s002->ho")
    assert st["not_yet_acknowledged"] == [last] and st["acked"] == st["bundles"] - 1
    assert any("not yet acknowledged" in f["message"] for f in findings(report, "warning"))
    rc, report = verify_json(audit_copy, "--strict")
    assert rc == 1 and not report["ok"]


def test_ack_with_wrong_hash_is_a_finding(world: World, audit_copy: Copy) -> None:
    s001_key = keys.load_signing_key(config.load(world.home("s001")))
    fake = build_ack(key=s001_key, acker="s001", sender="ho", seq=1, bundle_sha256="ab" * 32,
                     manifest_sha256=None, result="APPLIED", recipients=[world.recipient])
    for p in files_named(audit_copy.archives, "s001.ho.0000000001.ack"):
        write_file_atomic(p, fake)
    rc, report = verify_json(audit_copy)
    assert rc == 1
    errs = [f for f in findings(report) if f["stream"] == "ho->s001"]
    assert errs and all(f["check"] == "ack" and f["seq"] == 1 for f in errs)
    assert "different file" in errs[0]["message"]


def test_rejected_ack_is_a_finding(world: World, audit_copy: Copy) -> None:
    bundle_file = files_named(audit_copy.archives, "ho.s001.0000000001.bundle")[0]
    s001_key = keys.load_signing_key(config.load(world.home("s001")))
    with BundleReader(bundle_file) as r:
        msha = r.manifest.sha256
    rejected = build_ack(key=s001_key, acker="s001", sender="ho", seq=1,
                         bundle_sha256=sha256_file(bundle_file), manifest_sha256=msha,
                         result="REJECTED", reason="constraint violated", recipients=[world.recipient])
    for p in files_named(audit_copy.archives, "s001.ho.0000000001.ack"):
        write_file_atomic(p, rejected)
    rc, report = verify_json(audit_copy)
    assert rc == 1
    errs = findings(report)
    assert [(f["check"], f["seq"]) for f in errs] == [("rejected", 1)] and "constraint violated" in errs[0]["message"]
    # a REJECTED ack followed by an APPLIED one (after `exchange retry`) is only a warning
    shutil.copy(files_named(world.demo, "s001.ho.0000000001.ack")[0], audit_copy.archives / "s001.ho.0000000001.ack")
    rc, report = verify_json(audit_copy)
    assert rc == 0 and any(f["check"] == "rejected" for f in findings(report, "warning"))


def test_untrusted_signer_is_a_finding(world: World, audit_copy: Copy) -> None:
    seq2 = files_named(audit_copy.archives, "ho.s001.0000000002.bundle")[0]
    with BundleReader(seq2) as r:
        prev = r.manifest.sha256
    pem, _pub = sshsig.generate_key("mallory")
    s001 = config.load(world.home("s001"))
    seal_bundle(audit_copy.archives / "ho.s001.0000000003.bundle", key=sshsig.load_private_key(pem), sender="ho",
                recipient="s001", seq=3, prev=prev, recipients=[keys.recipient(s001)], tables=small_tables())
    rc, report = verify_json(audit_copy)
    assert rc == 1
    errs = findings(report)
    assert [(f["check"], f["seq"]) for f in errs] == [("signature", 3)]
    assert "not trusted" in errs[0]["message"]


def test_trust_file_without_a_node_fails_its_files(audit_copy: Copy) -> None:
    lines = [ln for ln in audit_copy.trust.read_text().splitlines() if not ln.startswith("s002 ")]
    audit_copy.trust.write_text("\n".join(lines) + "\n")
    rc, report = verify_json(audit_copy, identity=False)
    assert rc == 1
    assert {f["stream"] for f in findings(report)} == {"ho->s002", "s002->ho"}
    assert stream(report, "ho->s001")["errors"] == 0


def test_other_files_are_ignored(audit_copy: Copy) -> None:
    (audit_copy.archives / "notes.txt").write_text("hello")
    (audit_copy.archives / "ho.s001.0000000009.bundle.part").write_bytes(b"partial")
    rc, _report = verify_json(audit_copy)
    assert rc == 0


def test_copies_under_other_names(audit_copy: Copy) -> None:
    """The importer's stamped second copies count; a renamed file is checked by content, with a warning."""
    ack = files_named(audit_copy.archives, "s001.ho.0000000001.ack")[0]
    shutil.copy(ack, ack.with_name(ack.name + ".20261125120000"))
    b = files_named(audit_copy.archives, "ho.s001.0000000002.bundle")[0]
    shutil.copy(b, audit_copy.archives / "copy of a bundle.bundle")
    rc, report = verify_json(audit_copy)
    assert rc == 0
    assert report["files"]["acks"] == 1 + sum(1 for _ in audit_copy.archives.rglob("*.ack"))
    warned = [f for f in findings(report, "warning") if f["check"] == "name"]
    assert len(warned) == 1 and warned[0]["file"] == "copy of a bundle.bundle"


def test_classify_names() -> None:
    from exchange.audit.prune import classify

    assert classify("ho.s001.0000000001.bundle") == ("bundle", "ho.s001.0000000001.bundle")
    assert classify("s001.ho.0000000001.ack.20261125120000") == ("ack", "s001.ho.0000000001.ack")
    assert classify("ho.s001.ho.0000000001.checkpoint") == ("checkpoint", "ho.s001.ho.0000000001.checkpoint")
    for name in ("x.bundle.part", "notes.txt", "ho.s001.0000000001.ack.part", "bundle", "x.txt.20261125120000"):
        assert classify(name) is None


# ---------------------------------------------------------------- extract

def _readable_bundle(c: Copy, name: str = "s001.ho.0000000002.bundle") -> Path:
    return files_named(c.archives, name)[0]


def test_extract_writes_plain_parquet(world: World, audit_copy: Copy, tmp_path: Path) -> None:
    src = _readable_bundle(audit_copy)
    out = tmp_path / "out"
    res = run(*audit_copy.args("audit", "extract", str(src), "--out", str(out)))
    assert res.exit_code == 0, res.output
    folder = out / src.name
    inner = json.loads((folder / "inner.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seq"] == inner["seq"] == 2 and manifest["sender"] == "s001"
    assert (folder / "manifest.json.sig").exists() and not (folder / "VERIFICATION_FAILED.txt").exists()
    for t in inner["tables"]:
        table = pq.read_table(folder / f"{t['table']}.parquet")
        assert table.num_rows == t["rows"]
    assert {"_events", "sales_bill", "sales_bill_line"} <= {t["table"] for t in inner["tables"]}
    assert pq.read_table(folder / "sales_bill.parquet").num_rows == 6  # the first batch of sales at s001
    bills = pq.read_table(folder / "sales_bill.parquet").to_pydict()
    s001 = Node.open(world.home("s001"))
    with s001.engine.connect() as conn:
        db = dict(conn.execute(select(schema.sales_bill.c.bill_no, schema.sales_bill.c.total)).all())
    assert all(db[b] == t for b, t in zip(bills["bill_no"], bills["total"], strict=True))
    # the folder's inner files match the signed hashes, as an auditor checks with sha256sum
    signed = {e["name"]: e["sha256"] for e in manifest["inner"]}
    assert sha256_file(folder / "inner.json") == signed["inner.json"]
    # a second extraction into the same folder is refused, the first left alone
    again = CliRunner().invoke(main, audit_copy.args("audit", "extract", str(src), "--out", str(out)))
    assert again.exit_code != 0 and "already exists" in again.output


def test_extract_refuses_unverified_unless_forced(world: World, audit_copy: Copy, tmp_path: Path) -> None:
    src = _readable_bundle(audit_copy)
    only_ho = tmp_path / "only_ho"  # s001 is not trusted: the bundle does not verify
    only_ho.write_text("".join(ln + "\n" for ln in audit_copy.trust.read_text().splitlines() if ln.startswith("ho ")))
    out = tmp_path / "out"
    base = ["audit", "extract", str(src), "--out", str(out), "--identity", str(audit_copy.key),
            "--trust", str(only_ho)]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 1 and "REFUSED" in res.output and "not trusted" in res.output
    assert not (out / src.name).exists()
    res = CliRunner().invoke(main, [*base, "--force"])
    assert res.exit_code == 1  # still says it failed verification
    assert "FAILED VERIFICATION" in res.stdout and "FAILED VERIFICATION" in res.stderr
    folder = out / src.name
    marker = (folder / "VERIFICATION_FAILED.txt").read_text()
    assert "not trusted" in marker and "--force" in marker
    assert pq.read_table(folder / "sales_bill.parquet").num_rows == 6


def test_extract_forced_on_a_damaged_payload_says_what_failed(audit_copy: Copy, tmp_path: Path) -> None:
    src = _readable_bundle(audit_copy)
    damaged = tmp_path / src.name
    shutil.copy(src, damaged)
    flip(damaged, damaged.stat().st_size - 2048)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, audit_copy.args("audit", "extract", str(damaged), "--out", str(out)))
    assert res.exit_code == 1 and not (out / src.name).exists()
    res = CliRunner().invoke(main, audit_copy.args("audit", "extract", str(damaged), "--out", str(out), "--force"))
    assert res.exit_code == 1
    marker = (out / src.name / "VERIFICATION_FAILED.txt").read_text()
    assert "payload" in marker


def test_extract_says_when_not_encrypted_to_the_auditor(audit_copy: Copy, tmp_path: Path) -> None:
    old = files_named(audit_copy.archives, "ho.s001.0000000001.bundle")[0]  # sealed before the auditor
    res = CliRunner().invoke(main, audit_copy.args("audit", "extract", str(old), "--out", str(tmp_path / "o"),
                                                   "--force"))
    assert res.exit_code == 1 and "not encrypted to this identity" in res.output


def test_extract_json(audit_copy: Copy, tmp_path: Path) -> None:
    src = _readable_bundle(audit_copy)
    res = run(*audit_copy.args("audit", "extract", str(src), "--out", str(tmp_path / "o"), "--json"))
    got = json.loads(res.stdout)["extracted"][0]
    assert got["verified"] and got["tables"]["sales_bill.parquet"] == 6


# ---------------------------------------------------------------- report

def test_report_totals_equal_the_databases(world: World, audit_copy: Copy, tmp_path: Path) -> None:
    csv_file = tmp_path / "totals.csv"
    res = run(*audit_copy.args("audit", "report", str(audit_copy.archives), "--csv", str(csv_file), "--json"))
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["skipped"] == [] and rep["not_readable"]  # the pre-auditor bundles
    ho = Node.open(world.home("ho"))
    sb, sbl, sbp = schema.sales_bill, schema.sales_bill_line, schema.sales_bill_payment
    for store in ("s001", "s002"):
        rows = [r for r in rep["rows"] if r["stream"] == f"{store}->ho" and r["doc_type"] == "sales_bill"]
        assert rows
        got = {k: sum((Decimal(r["totals"][k]) for r in rows), Decimal(0)) for k in rows[0]["totals"]}
        docs = sum(r["documents"] for r in rows)
        for node in (Node.open(world.home(store)), ho):  # the store's own figures and what the HO holds
            with node.engine.connect() as conn:
                def db_sum(table: Any, col: str) -> Any:
                    return conn.execute(select(func.sum(table.c[col])).where(table.c.store_id == store)).scalar()

                n = conn.execute(select(func.count()).select_from(sb).where(sb.c.store_id == store)).scalar()
                assert docs == n
                assert got["sales_bill.total"] == db_sum(sb, "total")
                assert got["sales_bill.tax"] == db_sum(sb, "tax")
                assert got["sales_bill_line.amount"] == db_sum(sbl, "amount")
                assert got["sales_bill_line.qty"] == db_sum(sbl, "qty")
                assert got["sales_bill_line.tax"] == db_sum(sbl, "tax")
                assert got["sales_bill_payment.amount"] == db_sum(sbp, "amount")
        assert docs == world.sales[store]
    lines = csv_file.read_text().splitlines()
    assert lines[0].startswith("sender,recipient,day,doc_type,bundles,documents,deletes,")
    assert "sales_bill.total" in lines[0] and any(",sales_bill," in ln for ln in lines[1:])
    # each bundle counts once although every one is in two archives
    assert rep["bundles"] == sum(1 for _ in set(p.name for p in audit_copy.archives.rglob("*.bundle"))) \
        - len(set(Path(p).name for p in rep["not_readable"]))
    screen = run(*audit_copy.args("audit", "report", str(audit_copy.archives)))
    assert screen.exit_code == 0 and "sales_bill.total" in screen.stdout


def test_report_skips_and_fails_on_unverified(audit_copy: Copy) -> None:
    for i, p in enumerate(files_named(audit_copy.archives, "s002.ho.0000000002.bundle")):
        flip(p, p.stat().st_size - 2048 - i)
    res = CliRunner().invoke(main, audit_copy.args("audit", "report", str(audit_copy.archives), "--json"))
    assert res.exit_code == 1
    rep = json.loads(res.stdout)
    assert len(rep["skipped"]) == 2 and all("s002.ho.0000000002.bundle" in s["file"] for s in rep["skipped"])


def test_links_and_fifos_in_the_archive_are_findings_never_opened(audit_copy: Copy, tmp_path: Path) -> None:
    """Someone who can write an archive plants a FIFO (which would block a reader) and a link to a genuine
    ack elsewhere under exchange names: `audit verify` reports each as a `file` error naming it, opens
    neither (the real program, bounded by a timeout), and leaves both and the link's target as they were."""
    outside = tmp_path / "elsewhere" / "genuine.ack"
    outside.parent.mkdir()
    shutil.copy(files_named(audit_copy.archives, "s001.ho.0000000001.ack")[0], outside)
    before = outside.read_bytes()
    received = audit_copy.archives / "ho" / "received"
    fifo, link = received / "s001.ho.0000000009.bundle", received / "s001.ho.0000000002.ack.20260101000000"
    os.mkfifo(fifo)
    link.symlink_to(outside)
    env = {k: v for k, v in os.environ.items() if k != "EXCHANGE_HOME"}
    proc = subprocess.run([sys.executable, "-m", "exchange", *audit_copy.args("audit", "verify",
                           str(audit_copy.archives), "--json")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    planted = {f["file"]: f for f in findings(report) if f["check"] == "file"}
    assert set(planted) == {f"ho/received/{fifo.name}", f"ho/received/{link.name}"}
    assert "bundle file is a FIFO (named pipe), not a regular file" in planted[f"ho/received/{fifo.name}"]["message"]
    assert "ack file is a symbolic link, not a regular file: refused, not opened or followed" in \
        planted[f"ho/received/{link.name}"]["message"]
    assert [planted[f"ho/received/{p.name}"]["stream"] for p in (fifo, link)] == ["s001->ho", "ho->s001"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and outside.read_bytes() == before


# ---------------------------------------------------------------- prune

@pytest.fixture
def ho_home(world: World, tmp_path: Path) -> Path:
    home = tmp_path / "ho"
    shutil.copytree(world.home("ho"), home)
    return home


def _prune(home: Path, days: float, **kw: Any) -> Any:
    node = Node.open(home)
    return prune(home / "archive", node_id=node.id, role=node.cfg.role, key=node.signing_key, trust=node.trust,
                 older_than_days=days, **kw)


def _newest(archive: Path) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for f in scan_archive(archive):
        if f.kind == "bundle":
            a, b, seq = f.canonical.split(".")[:3]
            out[(a, b)] = max(out.get((a, b), 0), int(seq))
    return out


def test_prune_keeps_anchors_writes_checkpoints_and_verify_passes(world: World, ho_home: Path,
                                                                    audit_copy: Copy) -> None:
    archive = ho_home / "archive"
    newest = _newest(archive)
    assert all(n >= 2 for n in newest.values())
    res = run("archive", "prune", "--home", str(ho_home), "--older-than", "30")
    assert res.exit_code == 0 and "removed 0 files" in res.output
    before = sorted(p.relative_to(archive) for p in archive.rglob("*") if p.is_file())
    res = run("archive", "prune", "--home", str(ho_home), "--older-than", "0", "--dry-run", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["dry_run"]
    assert sorted(p.relative_to(archive) for p in archive.rglob("*") if p.is_file()) == before

    rep = _prune(ho_home, 0, now=datetime.now(UTC) + timedelta(days=1))
    assert rep.removed > 0 and not rep.problems
    cps = sorted((archive / CHECKPOINTS_DIR).iterdir())
    assert len(cps) == 4
    node = Node.open(ho_home)
    for (sender, recipient), last in newest.items():
        # the newest bundle and its ack are kept; everything older is gone
        side = "sent" if sender == "ho" else "received"
        assert (archive / side / f"{sender}.{recipient}.{last:010d}.bundle").exists()
        assert list(archive.rglob(f"{recipient}.{sender}.{last:010d}.ack"))
        assert not list(archive.rglob(f"{sender}.{recipient}.{1:010d}.bundle"))
        cp = read_checkpoint(archive / CHECKPOINTS_DIR / f"ho.{sender}.{recipient}.{last - 1:010d}.checkpoint",
                             node.trust)
        assert (cp.first_seq, cp.last_seq, cp.node) == (1, last - 1, "ho")
        assert [a.result for a in cp.acks] == ["APPLIED"] * (last - 1)
        assert {r["path"] for r in cp.removed} >= {f"{side}/{b.name}" for b in cp.bundles}
    # the auditor: the pruned archive alone, then merged with the stores' full archives
    pruned_copy = audit_copy.root / "pruned"
    shutil.copytree(archive, pruned_copy)
    rc, report = verify_json(audit_copy, root=pruned_copy)
    assert rc == 0, findings(report)
    for s in report["streams"]:
        assert s["pruned"] == [{"first_seq": 1, "last_seq": s["first_seq"] - 1}]
    shutil.rmtree(audit_copy.archives / "ho")
    shutil.copytree(archive, audit_copy.archives / "ho")
    rc, report = verify_json(audit_copy)
    assert rc == 0, findings(report)
    # pruning again removes nothing and verify still passes
    assert _prune(ho_home, 0, now=datetime.now(UTC) + timedelta(days=1)).removed == 0
    res = run("audit", "verify", "--home", str(ho_home))
    assert res.exit_code == 0, res.output


def test_pruned_archive_without_its_checkpoint_or_with_a_forged_one_fails(world: World, ho_home: Path,
                                                                          audit_copy: Copy) -> None:
    archive = ho_home / "archive"
    _prune(ho_home, 0, now=datetime.now(UTC) + timedelta(days=1))
    cp = sorted((archive / CHECKPOINTS_DIR).glob("ho.s001.ho.*.checkpoint"))[0]
    saved = cp.read_bytes()
    cp.unlink()
    rc, report = verify_json(audit_copy, root=archive)
    assert rc == 1 and any(f["check"] == "gap" and f["stream"] == "s001->ho" for f in findings(report))
    data = bytearray(saved)
    i = data.index(b'"first_seq": 1')
    data[i + 13] = ord("0")  # any change breaks the signature
    cp.write_bytes(bytes(data))
    rc, report = verify_json(audit_copy, root=archive)
    assert rc == 1 and any(f["check"] == "checkpoint" for f in findings(report))


def test_prune_keeps_unacknowledged_bundles(world: World, ho_home: Path) -> None:
    archive = ho_home / "archive"
    for p in archive.rglob("s001.ho.0000000001.ack"):
        p.unlink()  # s001's receipt for ho's seq 1
    rep = _prune(ho_home, 0, now=datetime.now(UTC) + timedelta(days=1))
    s = next(s for s in rep.streams if s.stream == "ho->s001")
    assert s.first_seq is None and "no APPLIED ack" in s.stopped
    assert (archive / "sent" / "ho.s001.0000000001.bundle").exists()


def test_prune_reports_links_and_fifos_and_never_follows_them(world: World, ho_home: Path, tmp_path: Path) -> None:
    """The ack that would let seq 1 go is replaced by a link to a genuine copy elsewhere, and a FIFO sits
    under a bundle name: prune reads neither, reports both, keeps seq 1 and deletes nothing through them."""
    archive = ho_home / "archive"
    ack = archive / "received" / "s001.ho.0000000001.ack"
    outside = tmp_path / "elsewhere" / ack.name
    outside.parent.mkdir()
    shutil.move(ack, outside)
    before = outside.read_bytes()
    ack.symlink_to(outside)
    fifo = archive / "received" / "s002.ho.0000000077.bundle"
    os.mkfifo(fifo)
    rep = _prune(ho_home, 0, now=datetime.now(UTC) + timedelta(days=1))
    assert f"received/{ack.name}: ack file is a symbolic link, not a regular file: refused, not opened or " \
        "followed" in rep.problems
    assert f"received/{fifo.name}: bundle file is a FIFO (named pipe), not a regular file: refused, not opened " \
        "or followed" in rep.problems
    s = next(s for s in rep.streams if s.stream == "ho->s001")
    assert s.first_seq is None and "no APPLIED ack" in s.stopped
    assert (archive / "sent" / "ho.s001.0000000001.bundle").exists()
    assert ack.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode) and outside.read_bytes() == before


def test_interrupted_prune_is_finished(world: World, ho_home: Path, audit_copy: Copy, tmp_path: Path) -> None:
    archive = ho_home / "archive"
    saved = tmp_path / "saved"
    shutil.copytree(archive, saved)
    _prune(ho_home, 0, now=datetime.now(UTC) + timedelta(days=1))
    # the crash: checkpoints written, files not yet deleted
    for p in saved.rglob("*"):
        if p.is_file() and not (archive / p.relative_to(saved)).exists():
            shutil.copy(p, archive / p.relative_to(saved))
    rc, report = verify_json(audit_copy, root=archive)
    assert rc == 0, findings(report)
    rep = _prune(ho_home, 0, now=datetime.now(UTC) + timedelta(days=1))
    assert sum(len(s.finished) for s in rep.streams) > 0 and not any(s.checkpoints for s in rep.streams)
    assert not list(archive.rglob("ho.s001.0000000001.bundle"))


def test_prune_on_a_store(world: World, tmp_path: Path, audit_copy: Copy) -> None:
    home = tmp_path / "s002"
    shutil.copytree(world.home("s002"), home)
    rep = _prune(home, 0, now=datetime.now(UTC) + timedelta(days=1))
    assert {s.stream for s in rep.streams} == {"ho->s002", "s002->ho"} and rep.removed > 0
    rc, report = verify_json(audit_copy, root=home / "archive")
    assert rc == 0, findings(report)


# ---------------------------------------------------------------- key rotation

def _signer_file(path: Path, lines: list[str]) -> sshsig.AllowedSigners:
    path.write_text("".join(ln + "\n" for ln in lines))
    return sshsig.AllowedSigners.load(path)


def test_key_rotation_keeps_old_archives_verifiable(tmp_path: Path) -> None:
    """ho's key was rotated on 2026-01-01: old bundles verify with the old key, new ones need the new key."""
    old_pem, old_pub = sshsig.generate_key("ho-2025")
    new_pem, new_pub = sshsig.generate_key("ho-2026")
    st_pem, st_pub = sshsig.generate_key("s001")
    old, new, st = (sshsig.load_private_key(p) for p in (old_pem, new_pem, st_pem))
    rotated = datetime(2026, 1, 1, tzinfo=UTC)
    trust_file = tmp_path / "allowed_signers"
    _signer_file(trust_file, [
        sshsig.format_signer_line("ho", old_pub, valid_before=rotated),
        sshsig.format_signer_line("ho", new_pub, valid_after=rotated - timedelta(days=1)),
        sshsig.format_signer_line("s001", st_pub),
    ])
    ident, rcpt = age.generate_identity()
    key_file = tmp_path / "auditor.key"
    keys.write_private(key_file, (ident + "\n").encode())
    archive = tmp_path / "archive"
    archive.mkdir()

    prev: str | None = None

    def seal(seq: int, key: Any, created: datetime) -> None:
        nonlocal prev
        sealed = seal_bundle(archive / f"ho.s001.{seq:010d}.bundle", key=key, sender="ho", recipient="s001",
                             seq=seq, prev=prev, recipients=[rcpt], tables=small_tables(),
                             summary={"documents": {}}, created=created)
        prev = sealed.manifest.sha256
        write_file_atomic(archive / f"s001.ho.{seq:010d}.ack", build_ack(
            key=st, acker="s001", sender="ho", seq=seq, bundle_sha256=sealed.sha256,
            manifest_sha256=sealed.manifest.sha256, result="APPLIED", created=created + timedelta(minutes=5),
            recipients=[rcpt]))

    seal(1, old, datetime(2025, 3, 1, tzinfo=UTC))
    seal(2, old, datetime(2025, 12, 31, 12, tzinfo=UTC))
    seal(3, new, datetime(2026, 2, 1, tzinfo=UTC))
    args = ["audit", "verify", str(archive), "--trust", str(trust_file), "--identity", str(key_file), "--json"]
    res = run(*args)
    report = json.loads(res.stdout)
    assert res.exit_code == 0, findings(report)
    assert stream(report, "ho->s001")["decrypted"] == 3
    # the old key after its valid-before: refused, although the chain and the ack are right
    seal(4, old, datetime(2026, 3, 1, tzinfo=UTC))
    res = run(*args)
    report = json.loads(res.stdout)
    assert res.exit_code == 1
    errs = findings(report)
    assert errs[0]["check"] == "signature" and errs[0]["seq"] == 4 and "valid-before" in errs[0]["message"]
    # s001's ack shows seq 4 existed: without an authentic seq 4 that is also a gap
    assert [(f["check"], f["seq"]) for f in errs[1:]] == [("gap", 4)]
    # and the new key before its valid-after would be refused too
    trust = sshsig.AllowedSigners.load(trust_file)
    early = tmp_path / "early"
    early.mkdir()
    seal_bundle(early / "ho.s001.0000000001.bundle", key=new, sender="ho", recipient="s001", seq=1, prev=None,
                recipients=[rcpt], tables=small_tables(), created=datetime(2025, 6, 1, tzinfo=UTC))
    from exchange.audit.verify import verify_archive

    r = verify_archive(early, trust=trust)
    assert [f.check for f in r.findings if f.severity == "error"] == ["signature"]


def test_fixture_sales_reached_the_ho(world: World) -> None:
    """Guard: the fixture's databases hold what the archives say (sanity of the setup)."""
    ho = Node.open(world.home("ho"))
    with ho.engine.connect() as conn:
        n = conn.execute(text("select count(*) from sales_bill")).scalar()
    assert n == sum(world.sales.values())
