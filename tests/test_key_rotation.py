"""Issue 18, "Keys over time": a replaced key really retires, a stolen key is revoked, doctor warns ahead.

Real node homes (the HO on SQLite, then on PostgreSQL), real bundles signed with
real keys, every operator step through the CLI (click's CliRunner on
``exchange.cli:main``), and ``ssh-keygen -Y verify`` reading the trust store the
commands write. The attacker holds a key that was replaced or stolen: it signs
a genuine bundle and states whatever ``created`` time it likes.
"""

from __future__ import annotations

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
    """``exchange import --json`` at ``node``: one outcome per file."""
    return json.loads(ok("import", "--home", str(node.cfg.home), "--json").stdout)  # type: ignore[no-any-return]


def stamp(when: datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S")


def wait_past(when: datetime) -> None:
    """Sleep (bounded) until the clock, at second resolution, is after ``when``."""
    for _ in range(100):
        if datetime.now(UTC).replace(microsecond=0) > when:
            return
        time.sleep(0.05)
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
