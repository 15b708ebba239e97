"""Identity: a store cannot pass for another node, read another store's data, roll a stream back,
or keep signing with a retired key (docs/FORMAT.md section 8; docs/SECURITY.md).

Every attacker here holds a real node's keys (a store gone rogue), so only the
property under test fails: bundles are forged with ``forge_bundle`` at exactly
the stream position the victim expects next, and a control bundle at the same
position, signed by the rightful key, shows that the signature was the only
problem. Stream positions are read back from the victims' databases, and the
replay cases run the importer in a fresh process (``exchange import``), so
nothing is remembered in memory. SFTP account isolation (a store cannot list or
fetch another store's folder on the HO's server) is tested in tests/test_sftp.py
(``test_store_is_confined_to_its_folder``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from enginehelpers import (
    Net, deliver, docs_of, forge_bundle, item_ids, make_net, prices, reprice, seed_ho, seed_store, snapshot,
)
from sqlalchemy import select

from exchange.cli import main
from exchange.database.tables import xchg_stream_in
from exchange.errors import CryptoError
from exchange.node import keys
from exchange.node.home import Node
from exchange.receive.importer import import_inbox
from exchange.service import status
from exchange.service.sync import sync
from exchange.files import utc_now
from exchange.wire.bundle import open_bundle
from exchange.wire.crypto import sshsig


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = make_net(tmp_path / "net", max_rows={"ho": 6, "s001": 4, "s002": 4})
    seed_ho(n, items=10)
    n.settle()
    yield n
    n.dispose()


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def stream_in(node: Node, peer: str) -> tuple[int, str | None] | None:
    with node.engine.connect() as conn:
        row = conn.execute(select(xchg_stream_in.c.last_seq, xchg_stream_in.c.last_manifest_sha256)
                           .where(xchg_stream_in.c.peer == peer)).first()
    return (int(row[0]), row[1]) if row else None


def next_position(receiver: Node, sender: str) -> tuple[int, str | None]:
    """The (seq, prev) the receiver expects next from ``sender``: where a forger must aim."""
    pos = stream_in(receiver, sender)
    return (1, None) if pos is None else (pos[0] + 1, pos[1])


def quarantined(node: Node, name: str) -> dict[str, Any]:
    path = node.cfg.quarantine / name
    assert path.exists(), f"{name} is not in {node.id}'s quarantine: {list(node.cfg.quarantine.iterdir())}"
    return json.loads(path.with_name(name + ".reason").read_text())  # type: ignore[no-any-return]


def import_in_new_process(home: Path, exit_code: int = 0) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("EXCHANGE_CRASH_AT", "EXCHANGE_HOME")}
    p = subprocess.run([sys.executable, "-m", "exchange", "import", "--home", str(home), "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == exit_code, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- impersonation

def test_a_store_cannot_sign_as_another_store(net: Net, tmp_path: Path) -> None:
    ho, s001, s002 = net.ho, net.store("s001"), net.store("s002")
    seed_store(net, "s001", sales=3)
    with s001.engine.connect() as conn:
        bills = [tuple(r) for r in conn.exec_driver_sql("SELECT store_id, bill_no FROM sales_bill")]
    docs = docs_of(s001, "sales_bill", bills)
    at = next_position(ho, "s001")
    before = snapshot(ho)
    # s002 seals s001's next bundle (real data, right seq and chain) with its own real key
    forged = forge_bundle(s001, "ho", docs, key=s002.signing_key, record=False, at=at, out_dir=_dir(tmp_path))
    outs = import_inbox(ho) if deliver([forged], ho) else []
    assert [o.status for o in outs] == ["QUARANTINED"]
    reason = quarantined(ho, forged.name)
    assert reason["error"] == "AuthenticityError"
    assert "not trusted for principal 's001'" in reason["reason"] and "trusted for: s002" in reason["reason"]
    assert snapshot(ho) == before and stream_in(ho, "s001") == (None if at[0] == 1 else (at[0] - 1, at[1]))
    # control: the same bundle signed by s001's own key is accepted at that position
    genuine = forge_bundle(s001, "ho", docs, record=False, at=at, out_dir=_dir(tmp_path / "genuine"))
    deliver([genuine], ho)
    assert [o.status for o in import_inbox(ho)] == ["APPLIED"]


def test_a_store_cannot_sign_as_the_ho(net: Net, tmp_path: Path) -> None:
    ho, s001, s002 = net.ho, net.store("s001"), net.store("s002")
    ids = item_ids(net)
    reprice(ho, ids[:2], "-0.50")  # the new prices exist only in the HO's database (and the forger's hands)
    docs = docs_of(ho, "item", [(i,) for i in ids[:2]])
    for victim in (s002, s001):
        at = next_position(victim, "ho")
        before, pos = snapshot(victim), stream_in(victim, "ho")
        forged = forge_bundle(ho, victim.id, docs, key=s001.signing_key, record=False, at=at,
                              out_dir=_dir(tmp_path / victim.id))
        deliver([forged], victim)
        assert [o.status for o in import_inbox(victim)] == ["QUARANTINED"]
        reason = quarantined(victim, forged.name)
        assert reason["error"] == "AuthenticityError" and "principal 'ho'" in reason["reason"], reason
        assert snapshot(victim) == before and stream_in(victim, "ho") == pos
        assert prices(victim, ids[:2]) != prices(ho, ids[:2])


def test_an_ack_signed_by_another_store_is_refused(net: Net, tmp_path: Path) -> None:
    """s002 cannot mark the HO's bundles to s001 as PROCESSED (or REJECTED) by forging s001's receipt."""
    from exchange.database.tables import xchg_sent
    from exchange.files import write_file_atomic
    from exchange.wire.bundle import build_ack
    from exchange.wire.formats import ack_name

    ho, s002 = net.ho, net.store("s002")
    reprice(ho, item_ids(net)[:1])
    sync(ho)  # a new bundle to s001, UPLOADED, waiting for its ack
    with ho.engine.connect() as conn:
        sent = conn.execute(select(xchg_sent).where(xchg_sent.c.peer == "s001", xchg_sent.c.status == "UPLOADED")
                            ).mappings().first()
    assert sent is not None
    for result in ("APPLIED", "REJECTED"):
        path = tmp_path / result / ack_name("s001", "ho", sent["seq"])
        path.parent.mkdir()
        write_file_atomic(path, build_ack(key=s002.signing_key, acker="s001", sender="ho", seq=sent["seq"],
                                          bundle_sha256=sent["file_sha256"], manifest_sha256=sent["manifest_sha256"],
                                          result=result, reason=None if result == "APPLIED" else "forged",
                                          recipients=[s002.cfg.peer("ho").recipient]))
        deliver([path], ho)
        assert [o.status for o in import_inbox(ho)] == ["QUARANTINED"]
        assert "principal 's001'" in quarantined(ho, path.name)["reason"]
        (ho.cfg.quarantine / path.name).rename(tmp_path / f"{result}.kept")
    assert {r.seq: r.status for r in status.sent(ho) if r.peer == "s001"}[sent["seq"]] == "UPLOADED"


# ---------------------------------------------------------------- confidentiality

def test_a_store_cannot_read_another_stores_bundles(net: Net) -> None:
    ho, s001, s002 = net.ho, net.store("s001"), net.store("s002")
    sent = sorted(ho.cfg.archive_sent.glob("ho.s001.*.bundle"))
    assert sent, "the HO sent s001 bundles"
    for path in sent:
        # the signature checks out for anyone who trusts the HO, the payload opens only for s001
        with pytest.raises(CryptoError, match="no identity matches"):
            with open_bundle(path, trust=s002.trust, identities=s002.identities, me=None,
                             workdir=s002.cfg.work):
                pass
        with open_bundle(path, trust=s001.trust, identities=s001.identities, me="s001", workdir=s001.cfg.work):
            pass
    assert not list(s002.cfg.work.iterdir()), "no plaintext left behind"
    # delivered to s002 by mistake (or on purpose): set aside, nothing decrypted or applied
    before = snapshot(s002)
    deliver(sent[:1], s002)
    assert [o.status for o in import_inbox(s002)] == ["QUARANTINED"]
    assert quarantined(s002, sent[0].name)["error"] == "NotForUsError"
    assert snapshot(s002) == before


# ---------------------------------------------------------------- replay and rollback

def test_replay_rollback_and_fork_are_refused_across_a_restart(net: Net, tmp_path: Path) -> None:
    ho, s001 = net.ho, net.store("s001")
    ids = item_ids(net)
    old_files = sorted(s001.cfg.archive_received.glob("ho.s001.*.bundle"))
    assert len(old_files) >= 2
    reprice(ho, ids, "2.00")  # newer prices for every item, in newer bundles
    net.settle()
    want_prices = prices(s001, ids)
    assert want_prices == prices(ho, ids)
    pos = stream_in(s001, "ho")
    assert pos is not None and pos[0] > len(old_files)
    before = snapshot(s001)
    net.dispose()  # every later step runs the importer in a new process: nothing remembered in memory

    # 1. replay: the very files applied long ago -> re-acknowledged, never applied again
    for f in old_files:
        shutil.copy(f, s001.cfg.inbox / f.name)
    outs = import_in_new_process(s001.cfg.home)
    assert {o["status"] for o in outs} == {"DUPLICATE"}, outs
    # 2. rollback: an old seq, signed by the HO, carrying other (older-looking) content
    rollback = forge_bundle(ho, "s001", docs_of(ho, "item", [(i,) for i in ids[:3]]), record=False,
                            at=(1, None), out_dir=_dir(tmp_path / "rollback"))
    # 3. fork: the next seq, signed by the HO, but not chained to what s001 applied
    fork = forge_bundle(ho, "s001", docs_of(ho, "item", [(i,) for i in ids[:3]]), record=False,
                        at=(pos[0] + 1, "0" * 64), out_dir=_dir(tmp_path / "fork"))
    net.dispose()
    for f in (rollback, fork):
        deliver([f], s001)
        outs = import_in_new_process(s001.cfg.home, exit_code=10)  # quarantined: exit 10
        assert [o["status"] for o in outs] == ["QUARANTINED"], outs
        assert ("already applied from a different file" if f is rollback else "hash chain broken") in \
            outs[0]["reason"]
    s001 = Node.open(s001.cfg.home)
    try:
        assert stream_in(s001, "ho") == pos
        assert prices(s001, ids) == want_prices
        after = snapshot(s001)
        # nothing applied; the one trace is the evidence that the HO went back in time (its seq 1 sealed
        # again with another file: an HO restored from its own backup), whose repair the doctor names
        assert {k: v for k, v in after.items() if k not in ("xchg_received", "xchg_restart")} == \
            {k: v for k, v in before.items() if k not in ("xchg_received", "xchg_restart")}
        assert after["xchg_received"] == before["xchg_received"]
        new = [r for r in after["xchg_restart"] if r not in before["xchg_restart"]]
        assert len(new) == 1 and "detected" in str(new[0]) and "--above" in str(new[0]), new
    finally:
        s001.engine.dispose()


# ---------------------------------------------------------------- key rotation

def _rotate_ho_key(net: Net, when: Any) -> tuple[Any, str, str]:
    """A new HO signing key from ``when`` on: the old line gets valid-before, the new valid-after,
    in every node's allowed_signers. Returns (old key, old public line, new public line)."""
    ho_home = net.ho.cfg.home
    old_key = net.ho.signing_key
    old_pub = keys.public_signing_line(net.ho.cfg)
    pem, new_pub = sshsig.generate_key("exchange:ho (2)")
    key_file = ho_home / "keys" / keys.SIGNING_KEY
    key_file.rename(tmp_dir := ho_home / "keys" / f"{keys.SIGNING_KEY}.retired")  # the operator keeps it aside
    keys.write_private(key_file, pem)
    assert tmp_dir.exists()
    (ho_home / "keys" / f"{keys.SIGNING_KEY}.pub").write_text(new_pub + "\n")
    for node in net.nodes:
        path = keys.trust_path(node.cfg)
        kept = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("ho ")]
        path.write_text("\n".join(kept + [
            sshsig.format_signer_line("ho", " ".join(old_pub.split()[:2]), valid_before=when),
            sshsig.format_signer_line("ho", " ".join(new_pub.split()[:2]), valid_after=when)]) + "\n")
    net.reopen()
    return old_key, old_pub, new_pub


def _audit(home: Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["audit", "verify", "--home", str(home)])
    return res.exit_code, res.output


def test_key_rotation_keeps_old_archives_verifiable_and_retires_the_old_key(net: Net, tmp_path: Path) -> None:
    s001_home = net.store("s001").cfg.home
    old_bundles = sorted(net.store("s001").cfg.archive_received.glob("ho.s001.*.bundle"))
    assert old_bundles
    rotated = utc_now() + timedelta(seconds=1)
    old_key, _old_pub, _new_pub = _rotate_ho_key(net, rotated)
    while utc_now() <= rotated:
        time.sleep(0.1)
    for node in net.nodes:  # every archive, made before the rotation, still verifies
        rc, out = _audit(node.cfg.home)
        assert rc == 0, out
    # the retired key, used after its valid-before: refused, although seq and chain are right
    s001 = net.store("s001")
    ids = item_ids(net)
    pos = stream_in(s001, "ho")
    assert pos is not None
    stale = forge_bundle(net.ho, "s001", docs_of(net.ho, "item", [(i,) for i in ids[:2]]), key=old_key,
                         record=False, at=(pos[0] + 1, pos[1]), out_dir=_dir(tmp_path / "stale"))
    before = snapshot(s001)
    deliver([stale], s001)
    assert [o.status for o in import_inbox(s001)] == ["QUARANTINED"]
    reason = quarantined(s001, stale.name)
    assert reason["error"] == "AuthenticityError" and "valid-before" in reason["reason"], reason
    assert snapshot(s001) == before and stream_in(s001, "ho") == pos
    # the new key carries the stream on, and every archive still verifies, old and new bundles alike
    reprice(net.ho, ids[:2], "0.10")
    net.settle()
    assert prices(net.store("s001"), ids[:2]) == prices(net.ho, ids[:2])
    assert stream_in(net.store("s001"), "ho")[0] > pos[0]  # type: ignore[index]
    for node in net.nodes:
        rc, out = _audit(node.cfg.home)
        assert rc == 0, out
    assert all((s001_home / "archive" / "received" / b.name).exists() for b in old_bundles)
