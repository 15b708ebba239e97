"""Issue 18, "Keys over time": a replaced key really retires, a stolen key is revoked, doctor warns ahead.

Real node homes (the HO on SQLite, then on PostgreSQL), real bundles signed with
real keys, every operator step through the CLI (click's CliRunner on
``exchange.cli:main``), and ``ssh-keygen -Y verify`` reading the trust store the
commands write. The attacker holds a key that was replaced or stolen: it signs
a genuine bundle and states whatever ``created`` time it likes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, deliver, docs_of, forge_bundle, make_net, seed_ho, seed_store, snapshot
from helpers_bundle import need

from exchange.cli import main
from exchange.node import keys
from exchange.node.home import Node, init_home
from exchange.errors import outcome_exit_code
from exchange.service.status import sent as status_sent
from exchange.wire.crypto import sshsig


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def ok(*args: str) -> Result:
    res = run(*args)
    assert res.exit_code == 0, f"exchange {' '.join(args)}: {res.exit_code}\n{res.output}"
    return res


def identity(home: Path) -> dict[str, str]:
    return json.loads(ok("identity", "--home", str(home), "--json").stdout)  # type: ignore[no-any-return]


def imported(node: Node) -> list[dict[str, Any]]:
    """``exchange import --json`` at ``node``: one outcome per file; the exit status says what happened."""
    res = run("import", "--home", str(node.cfg.home), "--json")
    outcomes: list[dict[str, Any]] = json.loads(res.stdout)
    assert res.exit_code == outcome_exit_code(o["status"] for o in outcomes), res.output
    return outcomes


def stamp(when: datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S")


def wait_past(when: datetime, limit: float = 60) -> None:
    """Sleep (at most ``limit`` seconds) until the clock, at second resolution, is after ``when``."""
    for _ in range(int(limit * 10)):
        if datetime.now(UTC).replace(microsecond=0) > when:
            return
        time.sleep(0.1)
    raise AssertionError(f"clock never passed {when}")


def bills(node: Node) -> list[tuple[str, ...]]:
    with node.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT store_id, bill_no FROM sales_bill ORDER BY 1, 2")]


def install_keys(src: Path, node: Node) -> None:
    """A node's own key files replaced by those made in ``src`` (what the documented rotation asks of it)."""
    for name in (keys.SIGNING_KEY, f"{keys.SIGNING_KEY}.pub", keys.AGE_KEY, f"{keys.AGE_KEY}.pub"):
        (node.cfg.keys_dir / name).unlink()
        shutil.copy2(src / "keys" / name, node.cfg.keys_dir / name)
    keys.add_signer(node.cfg, node.id, keys.public_signing_line(node.cfg))


def key_validity(node: Node, *extra: str) -> dict[str, Any]:
    res = run("doctor", "--home", str(node.cfg.home), "--json", *extra)
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    return checks["key validity"]  # type: ignore[no-any-return]


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """The HO on ``db_url`` and store s001, seeded; s001 has sent two sales bundles, all PROCESSED."""
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001",))
    seed_ho(n, items=6)
    n.settle()
    seed_store(n, "s001", sales=2)
    n.settle()
    yield n
    n.dispose()


def test_a_key_replaced_the_documented_way_is_refused_even_when_it_dates_a_bundle_before_its_end(
        net: Net, tmp_path: Path) -> None:
    ho, s001 = net.ho, net.store("s001")
    archived = sorted(ho.cfg.archive_received.glob("s001.ho.*.bundle"))
    assert archived
    old_key = s001.signing_key
    new_home = init_home(tmp_path / "new-keys", "s001", "store").home
    new = identity(new_home)
    ok("peer", "add", "--home", str(ho.cfg.home), "--id", "s001", "--role", "store",
       "--signing-key", new["signing_key"], "--recipient", new["recipient"], "--replace")
    install_keys(new_home, s001)
    net.reopen()
    ho, s001 = net.ho, net.store("s001")
    end = next(s.valid_before for s in ho.trust.signers
               if s.key.public_bytes_raw() == old_key.public_key().public_bytes_raw())
    assert end is not None
    wait_past(end)

    # whoever still holds the old key signs a genuine bundle and dates it an hour before the key's end
    seed_store(net, "s001", sales=2, seed=7)
    forged = forge_bundle(s001, "ho", docs_of(s001, "sales_bill", bills(s001)), key=old_key, record=False,
                          out_dir=tmp_path, created=end - timedelta(hours=1))
    before = snapshot(ho)
    deliver([forged], ho)
    outs = imported(ho)
    assert [(o["file"], o["status"]) for o in outs] == [(forged.name, "QUARANTINED")], outs
    assert f"key {sshsig.fingerprint(old_key.public_key())} of s001 was retired at" in outs[0]["reason"], outs
    assert "whatever time the file states" in outs[0]["reason"]
    assert snapshot(ho) == before

    # the store goes on with its new key; the archive verifies with each key at its own time
    net.settle()
    assert bills(ho) == bills(s001)
    res = run("audit", "verify", "--home", str(ho.cfg.home), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["errors"] == 0


def test_revoking_a_stolen_store_key_refuses_what_it_signs_after_and_keeps_what_it_signed_before(
        net: Net, tmp_path: Path) -> None:
    ho, s001 = net.ho, net.store("s001")
    old_fp = sshsig.fingerprint(s001.signing_key.public_key())
    archived = sorted(ho.cfg.archive_received.glob("s001.ho.*.bundle"))
    assert archived
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    wait_past(at)
    res = ok("keys", "revoke", "--home", str(ho.cfg.home), "--peer", "s001", "--at", stamp(at),
             "--reason", "PC stolen from the back office")
    assert f"revoked signing key {old_fp} of s001 from {at:%Y-%m-%d %H:%M:%S} UTC" in res.output
    assert "--replace" in res.output
    again = run("keys", "revoke", "--home", str(ho.cfg.home), "--peer", "s001")
    assert again.exit_code == 3 and "nothing revoked" in again.output, again.output
    listed = json.loads(ok("keys", "list", "--home", str(ho.cfg.home), "--json").stdout)["keys"]
    mine = [k for k in listed if k["fingerprint"] == old_fp and k["principal"] == "s001"]
    assert [k["state"] for k in mine] == ["revoked"], listed
    assert mine[0]["note"].startswith("revoked by ho on ") and mine[0]["note"].endswith(
        f"from {at:%Y-%m-%dT%H:%M:%SZ}: PC stolen from the back office")

    # the thief signs after the revocation, once with the true time and once dated before it
    seed_store(net, "s001", sales=2, seed=9)
    docs = docs_of(s001, "sales_bill", bills(s001))
    for d in ("after", "backdated"):
        (tmp_path / d).mkdir()
    after = forge_bundle(s001, "ho", docs, record=False, out_dir=tmp_path / "after")
    backdated = forge_bundle(s001, "ho", docs, record=False, out_dir=tmp_path / "backdated",
                             created=at - timedelta(minutes=10))
    before = snapshot(ho)
    for f in (after, backdated):
        deliver([f], ho)
        outs = imported(ho)
        assert [(o["file"], o["status"]) for o in outs] == [(f.name, "QUARANTINED")], outs
        assert "revoked by ho on" in outs[0]["reason"] and "PC stolen" in outs[0]["reason"], outs
        (ho.cfg.quarantine / f.name).rename(tmp_path / f"{f.parent.name}.quarantined")
    assert snapshot(ho) == before

    # nor does an ack it signs move the HO's status: a bundle the thief claims was applied stays UPLOADED
    from enginehelpers import item_ids, reprice

    from exchange.service.sync import sync as sync_node
    from exchange.wire.bundle import build_ack
    from exchange.wire.formats import ack_name

    reprice(ho, item_ids(net)[:1])
    assert not sync_node(ho).errors
    row = [r for r in status_sent(ho) if r.peer == "s001"][-1]
    assert row.status == "UPLOADED", row
    sent_file = ho.cfg.archive_sent / row.file
    from exchange.wire.bundle import BundleReader

    with BundleReader(sent_file) as r:
        manifest_sha = r.manifest.sha256
    lie = build_ack(key=s001.signing_key, acker="s001", sender="ho", seq=row.seq,
                    bundle_sha256=hashlib.sha256(sent_file.read_bytes()).hexdigest(), manifest_sha256=manifest_sha,
                    result="APPLIED", recipients=[keys.recipient(ho.cfg)],
                    created=at - timedelta(minutes=5))
    (ho.cfg.inbox / ack_name("s001", "ho", row.seq)).write_bytes(lie)
    outs = imported(ho)
    assert [o["status"] for o in outs] == ["QUARANTINED"] and "revoked by ho on" in outs[0]["reason"], outs
    assert [r for r in status_sent(ho) if r.seq == row.seq and r.peer == "s001"][0].status == "UPLOADED"

    # an auditor: what the key signed before the revocation verifies, what it signed after does not
    res = run("audit", "verify", "--home", str(ho.cfg.home), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["errors"] == 0, res.output
    audit = tmp_path / "audit"
    shutil.copytree(ho.cfg.home / "archive", audit)
    shutil.copy2(after, audit / after.name)
    res = run("audit", "verify", str(audit), "--trust", str(keys.trust_path(ho.cfg)), "--json")
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    findings = [(f["check"], f["file"]) for s in report["streams"] for f in s["findings"]
                if f["severity"] == "error"]
    assert findings and all(check == "signature" and after.name in (file or "") for check, file in findings), \
        report

    # doctor names the store left without a key
    check = key_validity(ho)
    assert not check["ok"] and "s001 has no valid key: revoked at" in check["detail"], check


def test_doctor_warns_ahead_of_a_key_s_end_unless_a_newer_key_follows(net: Net, tmp_path: Path) -> None:
    ho = net.ho
    assert key_validity(ho)["ok"]
    s009 = identity(init_home(tmp_path / "s009", "s009", "store").home)
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(days=10, hours=1)
    ok("peer", "add", "--home", str(ho.cfg.home), "--id", "s009", "--role", "store", "--group", "north",
       "--signing-key", s009["signing_key"], "--recipient", s009["recipient"], "--valid-before", stamp(end))
    check = key_validity(ho)
    assert not check["ok"], check
    assert f"s009's key ends at {end:%Y-%m-%d %H:%M:%S} UTC (in 10 days) and no key follows it" in check["detail"]
    assert "exchange keys rotate" in check["fix"]
    assert key_validity(ho, "--key-warn-days", "9")["ok"]
    toml = ho.cfg.home / "exchange.toml"
    toml.write_text(toml.read_text() + "\n[keys]\nwarn_days = 9\n")
    assert key_validity(ho)["ok"]
    toml.write_text(toml.read_text().replace("warn_days = 9", "warn_days = 30"))
    assert not key_validity(ho)["ok"]
    # a newer key that goes on past the warning: no warning, although the old one still ends
    newer = identity(init_home(tmp_path / "s009-new", "s009", "store").home)
    ok("peer", "add", "--home", str(ho.cfg.home), "--id", "s009", "--role", "store",
       "--signing-key", newer["signing_key"], "--recipient", newer["recipient"], "--replace")
    assert key_validity(ho)["ok"]


def test_ssh_keygen_reads_a_revoked_line_and_honours_its_end(tmp_path: Path) -> None:
    """The line `keys revoke` writes (a comment after the key) is one ssh-keygen parses and applies."""
    keygen = need("ssh-keygen")
    cfg = init_home(tmp_path / "ho", "ho", "ho")
    store = init_home(tmp_path / "s001", "s001", "store")
    ok("peer", "add", "--home", str(cfg.home), "--id", "s001", "--role", "store",
       "--signing-key", keys.public_signing_line(store), "--recipient", keys.recipient(store))
    ok("keys", "revoke", "--home", str(cfg.home), "--peer", "s001", "--at", "20260101120000",
       "--reason", "stolen")
    key = keys.load_signing_key(store)
    msg = tmp_path / "msg"
    msg.write_bytes(b"a manifest")
    (tmp_path / "msg.sig").write_bytes(sshsig.sign(key, msg.read_bytes()))

    def verify(at: str) -> subprocess.CompletedProcess[bytes]:
        with msg.open("rb") as data:
            return subprocess.run([keygen, "-Y", "verify", "-f", str(keys.trust_path(cfg)), "-I", "s001",
                                   "-n", sshsig.NAMESPACE, "-s", str(tmp_path / "msg.sig"),
                                   f"-Overify-time={at}"], stdin=data, capture_output=True, timeout=30)

    assert verify("20260101115959").returncode == 0
    refused = verify("20260101120001")
    assert refused.returncode != 0, refused


def signer_of(path: Path, node: Node) -> str:
    """Fingerprint of the key that signed a bundle, checked against ``node``'s trust store."""
    from exchange.wire.bundle import BundleReader

    with BundleReader(path) as r:
        return sshsig.fingerprint(r.verify_signature(node.trust).key)


def keygen_verify(keygen: str, bundle: Path, trust: Path, signer: str, at: datetime, tmp: Path) -> int:
    """``ssh-keygen -Y verify`` of a bundle's signed manifest at time ``at``: its exit code."""
    import tarfile

    with tarfile.open(bundle) as tf:
        manifest = tf.extractfile("manifest.json").read()  # type: ignore[union-attr]
        (tmp / "m.sig").write_bytes(tf.extractfile("manifest.json.sig").read())  # type: ignore[union-attr]
    (tmp / "m.json").write_bytes(manifest)
    with (tmp / "m.json").open("rb") as data:
        return subprocess.run([keygen, "-Y", "verify", "-f", str(trust), "-I", signer, "-n", sshsig.NAMESPACE,
                               "-s", str(tmp / "m.sig"), f"-Overify-time={stamp(at)}"], stdin=data,
                              capture_output=True, timeout=30).returncode


def test_rotation_in_band_peers_trust_the_new_key_and_refuse_the_old_one_after_the_overlap(
        net: Net, tmp_path: Path) -> None:
    from enginehelpers import item_ids, prices, reprice

    keygen = need("ssh-keygen")
    ho, s001 = net.ho, net.store("s001")
    old_key = ho.signing_key
    old_fp = sshsig.fingerprint(old_key.public_key())
    first = sorted(s001.cfg.archive_received.glob("ho.s001.*.bundle"))[0]
    trust_before = keys.trust_path(s001.cfg).read_text()

    res = ok("keys", "rotate", "--home", str(ho.cfg.home), "--overlap", "40s")
    assert f"old signing key {old_fp} accepted by peers until" in res.output and "announced to s001" in res.output
    net.reopen()
    ho, s001 = net.ho, net.store("s001")
    new_fp = sshsig.fingerprint(ho.signing_key.public_key())
    assert new_fp != old_fp
    state = json.loads(ok("keys", "list", "--home", str(ho.cfg.home), "--json").stdout)["rotation"]
    assert state["unconfirmed"] == ["s001"], state
    assert keys.trust_path(s001.cfg).read_text() == trust_before  # nothing edited by hand anywhere

    # nothing is pending for s001: an empty control bundle, signed by the old key, carries the notice
    net.settle()
    s001 = Node.open(s001.cfg.home)
    told = sorted(s001.cfg.archive_received.glob("ho.s001.*.bundle"))[-1]
    assert signer_of(told, s001) == old_fp
    lines = {sshsig.fingerprint(s.key): s for s in s001.trust.signers if s.principals == ("ho",)}
    assert set(lines) == {old_fp, new_fp}
    end = lines[old_fp].valid_before
    assert end is not None and lines[new_fp].valid_after is not None and lines[new_fp].valid_before is None
    assert end - lines[new_fp].valid_after == timedelta(seconds=40)
    assert s001.cfg.peer("ho").recipient == keys.recipient(ho.cfg)
    assert json.loads(ok("keys", "list", "--home", str(ho.cfg.home), "--json").stdout)["rotation"][
        "unconfirmed"] == []

    # from then on the HO signs for s001 with its new key
    ids = item_ids(net)[:3]
    reprice(ho, ids)
    net.settle()
    s001 = Node.open(s001.cfg.home)
    assert prices(s001, ids) == prices(ho, ids)
    newest = sorted(s001.cfg.archive_received.glob("ho.s001.*.bundle"))[-1]
    assert signer_of(newest, s001) == new_fp

    # inside the overlap the old key is still accepted (a bundle it sealed on its way)
    reprice(ho, ids)
    on_its_way = forge_bundle(ho, "s001", docs_of(ho, "item", [(i,) for i in ids]), key=old_key)
    net.settle()
    s001 = Node.open(s001.cfg.home)
    assert prices(s001, ids) == prices(ho, ids)
    assert signer_of(s001.cfg.archive_received / on_its_way.name, s001) == old_fp

    # after it, refused: dated inside the overlap or not
    wait_past(end)
    reprice(ho, ids)
    for created in (end - timedelta(seconds=5), None):
        forged = forge_bundle(ho, "s001", docs_of(ho, "item", [(i,) for i in ids]), key=old_key, record=False,
                              out_dir=tmp_path, created=created)
        deliver([forged], s001)
        outs = imported(s001)
        assert [(o["file"], o["status"]) for o in outs] == [(forged.name, "QUARANTINED")], outs
        assert f"key {old_fp} of ho was retired at" in outs[0]["reason"] or "valid-before" in outs[0]["reason"]
        (s001.cfg.quarantine / forged.name).unlink()
        forged.unlink()
    net.settle()
    assert prices(Node.open(s001.cfg.home), ids) == prices(ho, ids)

    # the archive still verifies: each bundle with the key valid when it was signed; ssh-keygen agrees
    for n in (ho, s001):
        res = run("audit", "verify", "--home", str(n.cfg.home), "--json")
        assert res.exit_code == 0 and json.loads(res.stdout)["errors"] == 0, res.output
    trust = keys.trust_path(s001.cfg)
    from exchange.wire.bundle import BundleReader

    with BundleReader(first) as r:
        signed_at = r.manifest.created
    assert keygen_verify(keygen, first, trust, "ho", signed_at, tmp_path) == 0
    assert keygen_verify(keygen, first, trust, "ho", end + timedelta(seconds=1), tmp_path) != 0
    with BundleReader(newest) as r:
        assert keygen_verify(keygen, newest, trust, "ho", r.manifest.created, tmp_path) == 0


def test_a_store_rotates_and_its_notice_travels_with_its_sales(net: Net) -> None:
    ho, s001 = net.ho, net.store("s001")
    old_fp = sshsig.fingerprint(s001.signing_key.public_key())
    ok("keys", "rotate", "--home", str(s001.cfg.home))
    again = run("keys", "rotate", "--home", str(s001.cfg.home))
    assert again.exit_code == 3 and "s001 is still being announced" not in again.output
    assert "have not confirmed it" in again.output, again.output
    net.reopen()
    s001 = net.store("s001")
    seed_store(net, "s001", sales=3, seed=5)
    net.settle()
    ho = Node.open(ho.cfg.home)
    assert bills(ho) == bills(Node.open(s001.cfg.home))
    mine = {sshsig.fingerprint(s.key): s for s in ho.trust.signers if s.principals == ("s001",)}
    new_fp = sshsig.fingerprint(s001.signing_key.public_key())
    assert set(mine) == {old_fp, new_fp} and mine[old_fp].valid_before is not None
    assert ho.cfg.peer("s001").recipient == keys.recipient(s001.cfg)
    # a newer key follows the old one: no warning, although the old key ends within the warning days
    assert key_validity(s001)["ok"] and key_validity(ho)["ok"]
    seed_store(net, "s001", sales=2, seed=6)
    net.settle()
    assert signer_of(sorted(ho.cfg.archive_received.glob("s001.ho.*.bundle"))[-1], ho) == new_fp
    assert json.loads(ok("keys", "list", "--home", str(s001.cfg.home), "--json").stdout)["rotation"][
        "unconfirmed"] == []


def _notice(node: str, old: Any, new: Any, new_sig_key: Any, recipient: str, after: datetime,
            before: datetime) -> dict[str, str]:
    """A key notice made by hand (what a hostile sender could put in its bundle), signed as given."""
    from exchange.wire.signed import dump_json, format_time

    raw = dump_json({"format": "exchange-key-notice", "version": 1, "node": node, "created": format_time(after),
                     "old_key": sshsig.public_line(old), "new_key": sshsig.public_line(new),
                     "new_recipient": recipient, "new_valid_after": format_time(after),
                     "old_valid_before": format_time(before)})
    return {"notice": raw.decode(), "old_sig": sshsig.sign(old, raw).decode(),
            "new_sig": sshsig.sign(new_sig_key, raw).decode()}


def test_a_hostile_key_notice_is_refused_and_changes_no_trust(net: Net, tmp_path: Path) -> None:
    """A store with its genuine key cannot announce keys for another node, keep its old key for ever,
    announce a key it does not hold, or send a malformed notice: quarantined, nothing trusted, nothing applied."""
    ho, s001 = net.ho, net.store("s001")
    mine = s001.signing_key
    other = sshsig.load_private_key(sshsig.generate_key()[0])
    third = sshsig.load_private_key(sshsig.generate_key()[0])
    recipient = keys.recipient(s001.cfg)
    now = datetime.now(UTC).replace(microsecond=0)
    cases = [
        (_notice("ho", mine, other, other, recipient, now, now + timedelta(days=1)),
         "announces keys of 'ho' in a bundle from 's001'"),
        (_notice("s001", mine, other, other, recipient, now, now + timedelta(days=400)),
         "overlap of at most 90 days"),
        (_notice("s001", mine, other, third, recipient, now, now + timedelta(days=1)),
         "new_sig is not by the new key"),
        (_notice("s001", other, third, third, recipient, now, now + timedelta(days=1)),
         "its old key is not the key that signed the bundle"),
        ({"notice": "x" * 5000, "old_sig": "", "new_sig": ""}, "at most 4096 characters"),
        ("junk", "expected an object with exactly notice, old_sig and new_sig"),
    ]
    seed_store(net, "s001", sales=1, seed=3)
    docs = docs_of(s001, "sales_bill", bills(s001))
    trust, toml, before = keys.trust_path(ho.cfg).read_bytes(), (ho.cfg.home / "exchange.toml").read_bytes(), \
        snapshot(ho)
    for carried, expected in cases:
        def hook(summary: dict[str, Any], carried: Any = carried) -> None:
            summary["key_notice"] = carried

        forged = forge_bundle(s001, "ho", docs, record=False, out_dir=tmp_path, summary_hook=hook)
        deliver([forged], ho)
        outs = imported(Node.open(ho.cfg.home))
        assert [(o["file"], o["status"]) for o in outs] == [(forged.name, "QUARANTINED")], outs
        assert expected in outs[0]["reason"] and "key notice" in outs[0]["reason"], outs
        (ho.cfg.quarantine / forged.name).unlink()
        forged.unlink()
    assert keys.trust_path(ho.cfg).read_bytes() == trust
    assert (ho.cfg.home / "exchange.toml").read_bytes() == toml and snapshot(ho) == before
    net.settle()  # the genuine stream goes on
    assert bills(Node.open(ho.cfg.home)) == bills(s001)


def test_doctor_names_a_peer_that_never_confirmed_a_rotation_and_re_pinning_recovers_it(net: Net) -> None:
    from enginehelpers import item_ids, prices, reprice

    ho, s001 = net.ho, net.store("s001")
    ok("keys", "rotate", "--home", str(ho.cfg.home), "--overlap", "4s")
    net.reopen()
    ho = net.ho
    rot_end = max(s.valid_before for s in ho.trust.signers if s.principals == ("ho",) and s.valid_before)
    wait_past(rot_end - timedelta(seconds=2))  # past half of it; s001 stays offline
    check = key_validity(ho)
    assert not check["ok"] and "s001 never confirmed the key rotation of ho" in check["detail"], check
    assert "before then" in check["detail"]
    wait_past(rot_end)
    check = key_validity(ho)
    assert "ended at" in check["detail"] and "exchange peer add --replace" in check["detail"], check
    # at the store, the HO's new key pinned by hand (its identity checked by phone), then the stream goes on
    new = identity(ho.cfg.home)
    ok("peer", "add", "--home", str(s001.cfg.home), "--id", "ho", "--role", "ho", "--signing-key",
       new["signing_key"], "--recipient", new["recipient"], "--replace")
    net.reopen()
    ids = item_ids(net)[:2]
    reprice(net.ho, ids)
    net.settle()
    assert prices(net.store("s001"), ids) == prices(net.ho, ids)
    assert key_validity(Node.open(ho.cfg.home))["ok"]


def test_keys_rotate_killed_at_any_point_is_finished_by_running_it_again(net: Net) -> None:
    """SIGKILL at each of ROTATE_POINTS: the rerun makes (or finishes) one rotation, and the exchange goes on."""
    import os
    import sys

    from enginehelpers import item_ids, prices, reprice

    from exchange.faults import ROTATE_POINTS

    home = str(net.ho.cfg.home)
    ids = item_ids(net)[:2]
    for point in ROTATE_POINTS:
        before = identity(net.ho.cfg.home)["signing_key"]
        env = {k: v for k, v in os.environ.items() if k != "EXCHANGE_HOME"}
        env["EXCHANGE_CRASH_AT"] = point
        killed = subprocess.run([sys.executable, "-m", "exchange", "keys", "rotate", "--home", home],
                                env=env, capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, (point, killed.stdout, killed.stderr)
        if point == "rotate.switching":  # announced, not switched: the old key (set aside) still carries the notice
            res = run("sync", "--home", home)
            assert res.exit_code == 0 and "exported 1" in res.output, res.output
        ok("keys", "rotate", "--home", home)
        after = identity(net.ho.cfg.home)["signing_key"]
        assert after.split()[:2] != before.split()[:2], point
        carried = json.loads((net.ho.cfg.keys_dir / "rotation.json").read_text())["carried"]
        assert json.loads(carried["notice"])["new_key"].split()[:2] == after.split()[:2], point
        assert not (net.ho.cfg.keys_dir / "next").exists() and not (net.ho.cfg.keys_dir / "next.part").exists()
        net.reopen()
        net.settle()
        reprice(net.ho, ids)
        net.settle()
        s001 = Node.open(net.store("s001").cfg.home)
        assert prices(s001, ids) == prices(net.ho, ids), point
        newest = sorted(s001.cfg.archive_received.glob("ho.s001.*.bundle"))[-1]
        assert signer_of(newest, s001) == sshsig.fingerprint(sshsig.parse_public_line(after)), point
    res = run("audit", "verify", "--home", str(net.store("s001").cfg.home), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["errors"] == 0, res.output


def test_a_store_with_nothing_to_send_announces_its_rotation_in_an_empty_bundle(net: Net) -> None:
    s001 = net.store("s001")
    ok("keys", "rotate", "--home", str(s001.cfg.home), "--overlap", "1d")
    net.reopen()
    net.settle()
    ho, s001 = Node.open(net.ho.cfg.home), net.store("s001")
    new_fp = sshsig.fingerprint(s001.signing_key.public_key())
    assert new_fp in {sshsig.fingerprint(s.key) for s in ho.trust.signers if s.principals == ("s001",)}
    told = sorted(ho.cfg.archive_received.glob("s001.ho.*.bundle"))[-1]
    from exchange.wire.bundle import BundleReader

    with BundleReader(told) as r:
        assert sshsig.fingerprint(r.verify_signature(ho.trust).key) != new_fp  # the old key announced it
    assert [r.documents for r in status_sent(s001) if r.file == told.name] == [{}]
    assert json.loads(ok("keys", "list", "--home", str(s001.cfg.home), "--json").stdout)["rotation"][
        "unconfirmed"] == []
    sent_before = len(status_sent(s001))
    assert not run("sync", "--home", str(s001.cfg.home)).exit_code  # confirmed: no further empty bundle
    assert len(status_sent(s001)) == sent_before
