"""Acks and prune checkpoints against a hostile holder: real nodes, real archives, the real CLI.

- Secrets at rest: the clear part of an ack (ack.json, its signature, and every
  byte of the file) names no document type, key, count, total or reason; the
  figures travel age-encrypted to the bundle's sender (and the auditors), who
  still sees PROCESSED with the parked count and REJECTED with its reason.
  Version 1 acks (the old clear format, built here by the old code kept as a
  helper) are still read.
- An archive cannot be shortened unseen: the stream heads each ack (v2) signs
  let ``exchange audit verify`` name the seqs of a stream whose newest bundles
  and acks were deleted, or of a stream deleted entirely, and the signed file
  that shows they existed.
- Prune checkpoints: only the archive's own node, in its configured role; a
  checkpoint never turns the receiver's REJECTED ack into an applied bundle.
- Bounds: a seq of 10**30 or a count of 10**12 in an ack or checkpoint is
  refused before anything is built from it.

Each attack comes from a node holding its own genuine keys (or from someone with
write access to the archive) and checks: refused with an error naming the file
and the problem, nothing applied, nothing deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, add_item, add_promotion, docs_of, forge_bundle, item_ids, make_net, reprice, seed_ho, seed_store
from helpers_bundle import assemble
from sqlalchemy import select

from exchange import __version__
from exchange.audit.prune import PrunedAck, PrunedBundle, build_checkpoint, checkpoint_name, read_checkpoint
from exchange.cli import main
from exchange.database import schema as s
from exchange.database.tables import xchg_sent
from exchange.errors import ExchangeError, LimitError
from exchange.node.home import Node
from exchange.receive.importer import import_inbox
from exchange.send.export import reload
from exchange.service.sync import pull, sync
from exchange.wire import tarfmt
from exchange.files import sha256_file, utc_now, write_file_atomic
from exchange.wire.bundle import BundleReader, Head, Heads, build_ack, read_ack
from exchange.wire.signed import dump_json, format_time, pack_signed
from exchange.wire.crypto import age, sshsig
from exchange.wire.formats import (
    ACK_DETAILS_MEMBER, ACK_FORMAT, ACK_MEMBERS, CHECKPOINT_MEMBERS, CHECKPOINTS_DIR, MAX_COUNT, MAX_SEQ,
    SIG_NAMESPACE, ack_name,
)

HUGE_SEQ = 10**30
HUGE_COUNT = 10**12


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def members(data: bytes) -> dict[str, bytes]:
    src, out = io.BytesIO(data), {}
    while (m := tarfmt.read_header(src)) is not None:
        out[m.name] = src.read(m.size)
        tarfmt.skip_padding(src, m.size)
    return out


def assert_not_readable(data: bytes, needles: list[str]) -> None:
    """No needle in the file's clear bytes (ack.json, the tar headers); none of 6 characters or more in
    any byte of the file. (A shorter one can turn up by chance in the random signature or ciphertext.)"""
    parts = members(data)
    clear = data.replace(parts["ack.json.sig"], b"").replace(parts[ACK_DETAILS_MEMBER], b"")
    for needle in needles:
        assert needle.encode() not in clear, f"{needle!r} is readable in the ack's clear part"
        if len(needle) >= 6:
            assert needle.encode() not in data, f"{needle!r} is readable in the ack file"


def sent_rows(node: Node, peer: str) -> dict[int, tuple[str, str | None]]:
    with node.engine.connect() as conn:
        return {int(r.seq): (r.status, r.reason) for r in conn.execute(
            select(xchg_sent.c.seq, xchg_sent.c.status, xchg_sent.c.reason).where(xchg_sent.c.peer == peer))}


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def build_ack_v1(*, key: Any, acker: str, sender: str, seq: int, bundle_sha256: str, manifest_sha256: str | None,
                 result: str, reason: str | None = None, applied: dict[str, Any] | None = None,
                 parked: list[Any] | None = None, created: datetime | None = None) -> bytes:
    """The version 1 writer, as it was (docs/FORMAT.md version 1): every figure in the clear ack.json."""
    created = created or utc_now()
    raw = dump_json({
        "format": ACK_FORMAT, "version": 1, "app_version": __version__,
        "acker": acker, "sender": sender, "seq": seq, "bundle_sha256": bundle_sha256,
        "manifest_sha256": manifest_sha256, "result": result, "reason": reason,
        "created": format_time(created), "applied": dict(applied or {}), "parked": list(parked or []),
    })
    return pack_signed(ACK_MEMBERS, raw, key, created)


def forge_ack(key: Any, fields: dict[str, Any], details: dict[str, Any] | None, recipients: list[str]) -> bytes:
    """An ack v2 as a rogue acker could sign it: any clear fields, any details plaintext."""
    created = datetime(2026, 12, 1, tzinfo=UTC)
    plain = dump_json(details or {})
    sealed = io.BytesIO()
    age.encrypt(io.BytesIO(plain), sealed, recipients)
    obj = {"format": ACK_FORMAT, "version": 2, "app_version": __version__, "created": format_time(created),
           "details": {"name": ACK_DETAILS_MEMBER, "size": len(sealed.getvalue()),
                       "sha256": hashlib.sha256(sealed.getvalue()).hexdigest()},
           "details_plain_sha256": hashlib.sha256(plain).hexdigest(), **fields}
    raw = dump_json(obj)
    return assemble([(ACK_MEMBERS[0], raw), (ACK_MEMBERS[1], sshsig.sign(key, raw, SIG_NAMESPACE)),
                     (ACK_DETAILS_MEMBER, sealed.getvalue())], int(created.timestamp()))


def quarantined_reason(node: Node, name: str) -> str:
    return str(json.loads((node.cfg.quarantine / f"{name}.reason").read_text())["reason"])


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = make_net(tmp_path / "net", stores=("s001",))
    yield n
    n.dispose()


# ---------------------------------------------------------------- secrets at rest

def test_clear_ack_holds_no_business_figures_and_the_sender_still_sees_them(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000001")  # recorded without an event: never sent, so the promotion parks
        add_promotion(conn, "P00009", ["IX0000001", ids[0]])
    reload(ho, "s001", ["promotion"])
    reprice(ho, ids[1:3], "1.37")
    sync(ho)
    outs = [o for o in sync(st).imported if o.status == "APPLIED"]
    assert len(outs) == 1 and outs[0].parked == 1
    seq = outs[0].seq
    data = (st.cfg.archive_sent / ack_name("s001", "ho", seq)).read_bytes()
    parts = members(data)
    assert list(parts) == ["ack.json", "ack.json.sig", ACK_DETAILS_MEMBER]
    clear = json.loads(parts["ack.json"])
    assert set(clear) == {"format", "version", "app_version", "acker", "sender", "seq", "bundle_sha256",
                          "manifest_sha256", "result", "created", "heads", "details", "details_plain_sha256"}
    assert (clear["version"], clear["result"]) == (2, "APPLIED")
    # nothing of the business in any byte of the file: document types, tables, keys, figures, words
    needles = [*ho.catalog.names, *(t for n in ho.catalog.names for t in ho.catalog.get(n).tables()),
               "P00009", "IX0000001", ids[1], ids[2], "foreign key", "FOREIGN KEY", "parked", "applied",
               "totals", "stale", "reason"]
    assert_not_readable(data, needles)
    # the HO (the bundle's sender) decrypts: PROCESSED, with the parked count
    sync(ho)
    assert sent_rows(ho, "s001")[seq] == ("PROCESSED", "1 document parked at s001")
    res = run("status", "sent", "--home", str(ho.cfg.home), "--json")
    assert res.exit_code == 0
    assert "1 document parked at s001" in res.stdout
    ack = read_ack(ho.cfg.archive_received / ack_name("s001", "ho", seq), ho.trust, me="ho",
                   identities=ho.identities)
    assert ack.details == "decrypted" and ack.parked_total == 1 and ack.applied["item"]["applied"] == 2
    # another holder (the store's own identity, a thief of the file) cannot read the figures
    other = read_ack(ho.cfg.archive_received / ack_name("s001", "ho", seq), ho.trust, me="ho",
                     identities=st.identities)
    assert other.details == "sealed" and other.applied == {} and other.reason is None
    res = run("inspect", str(ho.cfg.archive_received / ack_name("s001", "ho", seq)), "--trust",
              str(ho.cfg.keys_dir / "allowed_signers"), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["details"] == "sealed" and "parked" not in res.stdout
    res = run("inspect", str(ho.cfg.archive_received / ack_name("s001", "ho", seq)), "--home", str(ho.cfg.home),
              "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["parked_total"] == 1

    # REJECTED: the reason is encrypted too, and reaches the sender
    def lie(summary: dict[str, Any]) -> None:
        summary["documents"]["item"]["totals"]["item.price"] = "0.01"

    forge_bundle(ho, "s001", docs_of(ho, "item", [(i,) for i in ids[:3]]), summary_hook=lie)
    sync(ho)
    outs = sync(st).imported
    bad = [o for o in outs if o.status == "FAILED"]
    assert len(bad) == 1 and "control totals" in bad[0].reason
    data = (st.cfg.archive_sent / ack_name("s001", "ho", bad[0].seq)).read_bytes()
    assert json.loads(members(data)["ack.json"])["result"] == "REJECTED"
    assert_not_readable(data, ["control totals", "item.price", "0.01", "manifest says", "item", ids[0]])
    sync(ho)
    status, reason = sent_rows(ho, "s001")[bad[0].seq]
    assert status == "REJECTED" and "control totals of item do not match" in (reason or "")


def test_details_size_does_not_tell_how_much_they_list(net: Net) -> None:
    st = net.store("s001")
    sizes = set()
    for n in (0, 1, 5):
        data = build_ack(key=st.signing_key, acker="s001", sender="ho", seq=1, bundle_sha256="a" * 64,
                         manifest_sha256="b" * 64, result="APPLIED", recipients=[st.cfg.peer("ho").recipient],
                         applied={"item": {"applied": 3 - min(n, 3), "parked": n, "stale": 0, "totals": {}}},
                         parked=[{"doc_type": "item", "doc_key": f'["I{i:07d}"]', "error": "x"} for i in range(n)])
        sizes.add(len(members(data)[ACK_DETAILS_MEMBER]))
    assert len(sizes) == 1, sizes


def _first_ack(net: Net) -> tuple[Any, str, Any]:
    """s001 applies the HO's first bundle: (its outcome, its ack's name, the ack read with the HO's identity)."""
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    sync(ho)
    pull(st)
    [out] = [o for o in import_inbox(st) if o.status == "APPLIED"]
    name = ack_name("s001", "ho", out.seq)
    return out, name, read_ack(st.cfg.outbox / name, st.trust, me=None, identities=ho.identities)


def test_version_1_acks_are_still_read(net: Net) -> None:
    """A peer not yet upgraded (or an old archive) sends version 1 acks: read, and the figures kept."""
    ho, st = net.ho, net.store("s001")
    out, name, v2 = _first_ack(net)
    parked = [{"doc_type": "promotion", "doc_key": '["P1"]', "error": "foreign key"}]
    old = build_ack_v1(key=st.signing_key, acker="s001", sender="ho", seq=out.seq, bundle_sha256=v2.bundle_sha256,
                       manifest_sha256=v2.manifest_sha256, result="APPLIED", applied=v2.applied, parked=parked)
    write_file_atomic(st.cfg.outbox / name, old)
    ack = read_ack(st.cfg.outbox / name, st.trust, me="ho")
    assert (ack.version, ack.details, ack.heads, ack.parked, ack.applied) == (1, "clear", None, parked, v2.applied)
    sync(st)
    sync(ho)
    assert sent_rows(ho, "s001")[out.seq] == ("PROCESSED", "1 document parked at s001")
    assert (ho.cfg.archive_received / name).read_bytes() == old
    res = run("verify", str(ho.cfg.archive_received / name), "--home", str(ho.cfg.home))
    assert res.exit_code == 0 and res.stdout.startswith("OK")


def test_duplicate_is_re_acked_with_the_stored_bytes(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    sync(ho)
    pull(st)
    bundle_files = sorted(st.cfg.inbox.glob("*.bundle"))
    kept = {p.name: p.read_bytes() for p in bundle_files}
    [out] = [o for o in import_inbox(st) if o.status == "APPLIED"]
    name = ack_name("s001", "ho", out.seq)
    first = (st.cfg.outbox / name).read_bytes()
    (st.cfg.outbox / name).unlink()
    for n, b in kept.items():
        (st.cfg.inbox / n).write_bytes(b)
    assert [o.status for o in import_inbox(st)] == ["DUPLICATE"]
    assert (st.cfg.outbox / name).read_bytes() == first  # not re-signed: same heads, same details


# ---------------------------------------------------------------- stream heads in audit verify

@dataclass(frozen=True)
class Archives:
    ho: Path  # the HO's archive after several rounds both ways
    s001: Path
    trust: Path
    home: Path  # the HO's home (template)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archives]:
    root = tmp_path_factory.mktemp("heads")
    net = make_net(root / "net", stores=("s001",))
    seed_ho(net)
    net.settle()
    ids = item_ids(net)
    for n in range(5):  # both streams move every round
        reprice(net.ho, ids[n:n + 2])
        seed_store(net, "s001", sales=2, seed=n)
        net.cycle()
    net.settle()
    net.dispose()
    yield Archives(net.ho.cfg.home / "archive", net.store("s001").cfg.home / "archive",
                   net.ho.cfg.keys_dir / "allowed_signers", net.ho.cfg.home)


def verify(root: Path, trust: Path, *more: str) -> tuple[int, dict[str, Any]]:
    res = run("audit", "verify", str(root), "--trust", str(trust), "--json", *more)
    return res.exit_code, json.loads(res.stdout)


def errors(report: dict[str, Any], stream: str | None = None) -> list[dict[str, Any]]:
    return [dict(f, stream=s["stream"]) for s in report["streams"] for f in s["findings"]
            if f["severity"] == "error" and (stream is None or s["stream"] == stream)]


def acks_in(archive: Path, trust: Path, acker: str, sender: str) -> list[Any]:
    from exchange.wire.crypto.sshsig import AllowedSigners

    t = AllowedSigners.load(trust)
    return [read_ack(p, t, me=None) for p in sorted(archive.rglob(f"{acker}.{sender}.*.ack"))]


def cut(archive: Path, sender: str, recipient: str, from_seq: int) -> list[str]:
    """Delete the stream's bundles from ``from_seq`` on and their acks: the attack."""
    gone = []
    for p in sorted(archive.rglob("*")):
        parts = p.name.split(".")
        if p.is_file() and len(parts) >= 4 and int(parts[2]) >= from_seq and (
                (parts[3] == "bundle" and parts[:2] == [sender, recipient])
                or (parts[3] == "ack" and parts[:2] == [recipient, sender])):
            p.unlink()
            gone.append(p.name)
    return gone


def test_intact_archives_verify(archives: Archives, tmp_path: Path) -> None:
    for a in (archives.ho, archives.s001):
        rc, report = verify(a, archives.trust)
        assert rc == 0, errors(report)
    merged = tmp_path / "merged"
    shutil.copytree(archives.ho, merged / "ho")
    shutil.copytree(archives.s001, merged / "s001")
    rc, report = verify(merged, archives.trust)
    assert rc == 0, errors(report)


def test_newest_bundles_and_acks_deleted_are_named(archives: Archives, tmp_path: Path) -> None:
    """The HO's archive loses the newest s001->ho bundles and its acks for them; s001's acks (signed by
    s001, kept by the HO) say the HO acknowledged them."""
    evidence = max(acks_in(archives.ho, archives.trust, "s001", "ho"),
                   key=lambda a: a.heads.sent_to_you.acknowledged)
    last = evidence.heads.sent_to_you.acknowledged
    assert last >= 3, "the fixture must leave several s001->ho bundles acknowledged"
    copy = tmp_path / "ho"
    shutil.copytree(archives.ho, copy)
    gone = cut(copy, "s001", "ho", last - 1)
    assert f"s001.ho.{last:010d}.bundle" in gone and f"ho.s001.{last:010d}.ack" in gone
    rc, report = verify(copy, archives.trust)
    assert rc == 1
    [head] = [f for f in errors(report, "s001->ho") if f["check"] == "head"]
    assert head["seq"] == last - 1
    assert f"seq {last - 1}..{last} missing" in head["message"]
    assert "signed by s001" in head["message"] and "newest bundles and acks deleted" in head["message"]
    named = re.search(r"s001\.ho\.\d{10}\.ack", head["message"])
    assert named is not None and head["file"].endswith(named.group(0))
    proof = read_ack(copy / head["file"], sshsig.AllowedSigners.load(archives.trust), me=None)
    assert proof.heads is not None and proof.heads.sent_to_you.acknowledged == last


def test_newest_sent_bundles_deleted_are_named(archives: Archives, tmp_path: Path) -> None:
    """The HO's own stream ho->s001 cut short in the HO's archive: the HO's acks to s001 name its head."""
    evidence = max(acks_in(archives.ho, archives.trust, "ho", "s001"), key=lambda a: a.heads.sent_to_you.acknowledged)
    last = evidence.heads.sent_to_you.acknowledged
    copy = tmp_path / "ho"
    shutil.copytree(archives.ho, copy)
    cut(copy, "ho", "s001", last - 1)
    rc, report = verify(copy, archives.trust)
    assert rc == 1
    [head] = [f for f in errors(report, "ho->s001") if f["check"] == "head"]
    assert f"seq {last - 1}..{last} missing" in head["message"]
    # in the store's archive the same evidence is the HO's signature, kept by s001
    copy = tmp_path / "s001"
    shutil.copytree(archives.s001, copy)
    cut(copy, "ho", "s001", last - 1)
    rc, report = verify(copy, archives.trust)
    assert rc == 1 and [f["check"] for f in errors(report, "ho->s001")] == ["head"]


def test_a_whole_deleted_stream_is_named(archives: Archives, tmp_path: Path) -> None:
    copy = tmp_path / "ho"
    shutil.copytree(archives.ho, copy)
    cut(copy, "s001", "ho", 1)
    assert not list(copy.rglob("s001.ho.*.bundle")) and not list(copy.rglob("ho.s001.*.ack"))
    rc, report = verify(copy, archives.trust)
    assert rc == 1
    [head] = [f for f in errors(report, "s001->ho") if f["check"] == "head"]
    assert head["seq"] == 1 and "the whole stream is missing" in head["message"]
    assert "signed by s001" in head["message"]


# ---------------------------------------------------------------- prune checkpoints

def _home_copy(archives: Archives, tmp_path: Path) -> Node:
    home = tmp_path / "ho-home"
    shutil.copytree(archives.home, home)
    return Node.open(home)


def _pruned_bundles(archive: Path, sender: str, recipient: str, seqs: range) -> list[PrunedBundle]:
    out = []
    for seq in seqs:
        [p] = [q for q in archive.rglob(f"{sender}.{recipient}.{seq:010d}.bundle") if "duplicates" not in q.parts]
        with BundleReader(p) as r:
            m = r.manifest
        out.append(PrunedBundle(seq, p.name, format_time(m.created), sha256_file(p), m.sha256, m.prev))
    return out


def _plant(node: Node, key: Any, signer: str, role: str, sender: str, recipient: str,
           acks: list[PrunedAck] | None = None, seqs: range = range(1, 3)) -> Path:
    archive = node.cfg.home / "archive"
    bundles = _pruned_bundles(archive, sender, recipient, seqs)
    data = build_checkpoint(key=key, node=signer, role=role, sender=sender, recipient=recipient,
                            cutoff=utc_now(), bundles=bundles, acks=acks or [], removed=[])
    target = archive / CHECKPOINTS_DIR / checkpoint_name(signer, sender, recipient, bundles[-1].seq)
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data)
    return target


def test_checkpoint_from_another_node_is_refused(archives: Archives, tmp_path: Path) -> None:
    """s001, with its own genuine key, plants a checkpoint in the HO's archive 'recording' seq 1..2 of
    s001->ho as pruned: prune must not delete the HO's files, audit verify must not use it."""
    ho = _home_copy(archives, tmp_path)
    store_key = Node.open(archives.home.parent / "s001").signing_key
    planted = _plant(ho, store_key, "s001", "store", "s001", "ho")
    archive = ho.cfg.home / "archive"
    before = files_of(archive)
    res = run("archive", "prune", "--home", str(ho.cfg.home), "--older-than", "30", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["removed"] == 0 and files_of(archive) == before  # nothing deleted, nothing changed
    [problem] = rep["problems"]
    assert planted.name in problem and "signed by s001" in problem and "ignored" in problem
    rc, report = verify(archive, archives.trust)
    assert rc == 1
    [f] = [f for f in errors(report, "s001->ho") if f["check"] == "checkpoint"]
    assert f["file"].endswith(planted.name) and "lies in the archive of ho" in f["message"]


def test_checkpoint_claiming_the_wrong_role_is_refused(archives: Archives, tmp_path: Path) -> None:
    ho = _home_copy(archives, tmp_path)
    planted = _plant(ho, ho.signing_key, "ho", "store", "s001", "ho")  # the HO's key, claiming a store's role
    archive = ho.cfg.home / "archive"
    before = files_of(archive)
    res = run("archive", "prune", "--home", str(ho.cfg.home), "--older-than", "30", "--json")
    rep = json.loads(res.stdout)
    assert rep["removed"] == 0 and files_of(archive) == before
    assert any(planted.name in p and "as store" in p for p in rep["problems"])
    res = run("audit", "verify", "--home", str(ho.cfg.home), "--json")
    assert res.exit_code == 1
    [f] = [f for f in errors(json.loads(res.stdout), "s001->ho") if f["check"] == "checkpoint"]
    assert "claims ho prunes as 'store'" in f["message"] and "'ho' here" in f["message"]


def test_checkpoint_cannot_turn_a_rejected_bundle_into_an_applied_one(archives: Archives, tmp_path: Path) -> None:
    """s001 REJECTED the HO's seq 1 (its signed ack is in the archive); the HO signs a checkpoint recording
    the bundle pruned with an APPLIED ack, and the bundle is gone. The receiver's ack decides."""
    ho = _home_copy(archives, tmp_path)
    archive = ho.cfg.home / "archive"
    store = Node.open(archives.home.parent / "s001")
    [b1] = _pruned_bundles(archive, "ho", "s001", range(1, 2))
    rejected = build_ack(key=store.signing_key, acker="s001", sender="ho", seq=1, bundle_sha256=b1.sha256,
                         manifest_sha256=b1.manifest_sha256, result="REJECTED", reason="constraint violated",
                         recipients=[store.cfg.peer("ho").recipient])
    for p in archive.rglob("s001.ho.0000000001.ack"):
        write_file_atomic(p, rejected)
    lie = PrunedAck(1, "s001.ho.0000000001.ack", "s001", format_time(utc_now()),
                    hashlib.sha256(rejected).hexdigest(), b1.sha256, "APPLIED")
    _plant(ho, ho.signing_key, "ho", "ho", "ho", "s001", acks=[lie], seqs=range(1, 2))
    for p in archive.rglob("ho.s001.0000000001.bundle"):
        p.unlink()
    rc, report = verify(archive, archives.trust)
    assert rc == 1
    found = {(f["check"], f["seq"]) for f in errors(report, "ho->s001")}
    assert found == {("rejected", 1), ("checkpoint", 1)}, errors(report)
    msgs = " ".join(f["message"] for f in errors(report, "ho->s001"))
    assert "cannot make it applied" in msgs and "records s001.ho.0000000001.ack as APPLIED" in msgs
    # the HO (the sender) can read the reason with its identity
    res = run("audit", "verify", str(archive), "--trust", str(archives.trust), "--json", "--identity",
              str(ho.cfg.keys_dir / "node.age"))
    assert "constraint violated" in res.stdout


# ---------------------------------------------------------------- bounds

def _fields(**over: Any) -> dict[str, Any]:
    base = {"acker": "s001", "sender": "ho", "seq": 1, "bundle_sha256": "a" * 64, "manifest_sha256": "b" * 64,
            "result": "APPLIED", "heads": Heads(Head(1, "b" * 64), Head(0, None, 0)).as_json()}
    return {**base, **over}


def _details(**over: Any) -> dict[str, Any]:
    base = {"format": "exchange-ack-details", "version": 2, "acker": "s001", "sender": "ho", "seq": 1,
            "bundle_sha256": "a" * 64, "nonce": "0" * 32, "reason": None, "applied": {}, "parked": [],
            "parked_total": 0}
    return {**base, **over}


@pytest.mark.parametrize("case", ["seq", "heads seq", "acknowledged", "v1 count"])
def test_huge_seq_or_count_in_an_ack_is_quarantined_cheaply(net: Net, case: str) -> None:
    ho, st = net.ho, net.store("s001")
    rcpt = [st.cfg.peer("ho").recipient]
    name = ack_name("s001", "ho", 1)
    if case == "seq":
        data = forge_ack(st.signing_key, _fields(seq=HUGE_SEQ), _details(), rcpt)
    elif case == "heads seq":
        data = forge_ack(st.signing_key, _fields(heads={"received_from_you": {"seq": HUGE_SEQ, "manifest_sha256": "b" * 64},
                                                        "sent_to_you": {"seq": 0, "manifest_sha256": None,
                                                                        "acknowledged": 0}}), _details(), rcpt)
    elif case == "acknowledged":
        data = forge_ack(st.signing_key, _fields(heads={"received_from_you": {"seq": 1, "manifest_sha256": "b" * 64},
                                                        "sent_to_you": {"seq": HUGE_SEQ, "manifest_sha256": "c" * 64,
                                                                        "acknowledged": HUGE_SEQ}}), _details(), rcpt)
    else:
        data = build_ack_v1(key=st.signing_key, acker="s001", sender="ho", seq=1, bundle_sha256="a" * 64,
                            manifest_sha256="b" * 64, result="APPLIED", applied={"item": {"applied": HUGE_COUNT}})
    (ho.cfg.inbox / name).write_bytes(data)
    t0 = time.monotonic()
    outs = import_inbox(ho)
    assert time.monotonic() - t0 < 5
    assert [o.status for o in outs] == ["QUARANTINED"]
    reason = quarantined_reason(ho, name)
    assert reason.startswith(name) and "out of range" in reason, reason
    assert str(MAX_SEQ if case != "v1 count" else MAX_COUNT) in reason
    assert (ho.cfg.quarantine / name).read_bytes() == data and sent_rows(ho, "s001") == {}


def test_huge_counts_in_the_encrypted_details_are_refused(net: Net) -> None:
    """A rogue acker's details claim 10**12 documents: not shown, the result still reaches the sender."""
    ho, st = net.ho, net.store("s001")
    out, name, genuine = _first_ack(net)
    fields = {k: getattr(genuine, k) for k in ("acker", "sender", "seq", "bundle_sha256", "manifest_sha256",
                                                "result")}
    fields["heads"] = genuine.heads.as_json() if genuine.heads else None
    for details in (_details(seq=out.seq, bundle_sha256=genuine.bundle_sha256,
                             applied={"item": {"applied": HUGE_COUNT}}),
                    _details(seq=out.seq, bundle_sha256=genuine.bundle_sha256, parked_total=HUGE_COUNT)):
        data = forge_ack(st.signing_key, fields, details, [st.cfg.peer("ho").recipient])
        (ho.cfg.inbox / name).write_bytes(data)
        t0 = time.monotonic()
        ack = read_ack(ho.cfg.inbox / name, ho.trust, me="ho", identities=ho.identities)
        assert time.monotonic() - t0 < 2
        assert ack.details == "unreadable" and "out of range" in ack.details_error and ack.applied == {}
        (ho.cfg.inbox / name).unlink()
    (ho.cfg.inbox / name).write_bytes(data)
    [o] = import_inbox(ho)
    assert o.status == "PROCESSED" and "cannot be read" in o.reason and "out of range" in o.reason
    with pytest.raises(ExchangeError, match="out of range"):
        from exchange.audit.inspect import describe

        describe(ho.cfg.archive_received / name, trust=ho.trust, identities=ho.identities)


@pytest.mark.parametrize("case", ["last_seq", "range", "bundle seq", "size"])
def test_huge_seq_or_count_in_a_checkpoint_is_refused_cheaply(archives: Archives, tmp_path: Path, case: str) -> None:
    ho = _home_copy(archives, tmp_path)
    archive = ho.cfg.home / "archive"
    bundles = _pruned_bundles(archive, "s001", "ho", range(1, 2))
    obj: dict[str, Any] = {
        "format": "exchange-checkpoint", "version": 2, "app_version": __version__, "node": "ho", "role": "ho",
        "sender": "s001", "recipient": "ho", "first_seq": 1, "last_seq": 1, "prev": None,
        "last_manifest_sha256": bundles[0].manifest_sha256, "created": format_time(utc_now()),
        "cutoff": format_time(utc_now()), "bundles": [b.as_json() for b in bundles], "acks": [], "removed": []}
    if case == "last_seq":
        obj["last_seq"] = HUGE_SEQ
    elif case == "range":
        obj["last_seq"] = 10**9  # a range() of a billion seqs, were it built
    elif case == "bundle seq":
        obj["bundles"][0]["seq"] = HUGE_SEQ
    else:
        obj["removed"] = [{"path": "received/x.bundle", "sha256": "c" * 64, "size": HUGE_COUNT * 100}]
    raw = dump_json(obj)
    data = pack_signed(CHECKPOINT_MEMBERS, raw, ho.signing_key, utc_now())
    target = archive / CHECKPOINTS_DIR / checkpoint_name("ho", "s001", "ho", min(obj["last_seq"], MAX_SEQ))
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data)
    t0 = time.monotonic()
    with pytest.raises(LimitError, match="out of range|at most|1 to") as info:
        read_checkpoint(target, ho.trust)
    assert time.monotonic() - t0 < 2 and str(info.value).startswith(target.name)
    before = files_of(archive)
    res = run("archive", "prune", "--home", str(ho.cfg.home), "--older-than", "30", "--json")
    rep = json.loads(res.stdout)
    assert rep["removed"] == 0 and files_of(archive) == before
    assert any(target.name in p for p in rep["problems"])
    rc, report = verify(archive, archives.trust)
    assert rc == 1 and any(f["check"] == "checkpoint" and f["file"].endswith(target.name)
                           for s in report["streams"] for f in s["findings"])
