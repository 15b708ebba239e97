"""`exchange doctor`, and a full store <-> HO exchange over a real OpenSSH SFTP server.

The SFTP half uses the private sshd of tests/sshd.py: each store logs in to its
own chrooted account, the HO logs in as an unchrooted account and reaches each
store's folder; both sides run the ordinary `sync`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from exchange.cli import main
from exchange.demo.data import seed_masters, seed_store_activity
from exchange.demo.run import reconcile, run_demo
from exchange.node import keys
from exchange.node.home import Node
from exchange.node.peers import add_peer
from exchange.service import status
from exchange.service.doctor import run_checks
from exchange.service.sync import sync
from sshd import HO_USER, SshdServer, make_home


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("doctor") / "d"
    assert run_demo(root, items=5, sales=2, echo=lambda _s: None)
    return root


def doctor(home: Path) -> tuple[int, dict[str, object]]:
    res = CliRunner().invoke(main, ["doctor", "--home", str(home), "--json"])
    return res.exit_code, json.loads(res.output)


def test_doctor_passes_on_a_healthy_store(demo: Path) -> None:
    code, out = doctor(demo / "s001")
    assert code == 0, out
    names = {c["name"]: c for c in out["checks"]}  # type: ignore[union-attr,index]
    assert {"database", "keys", "peers", "transport ho", "disk"} <= set(names)
    assert all(c["ok"] for c in names.values())
    assert "peer version 1." in names["transport ho"]["detail"]  # the HO published its node.json


def test_doctor_names_the_fix_for_each_failure(demo: Path, tmp_path: Path) -> None:
    home = tmp_path / "s001"
    shutil.copytree(demo / "s001", home)
    toml = home / "exchange.toml"
    toml.write_text(toml.read_text().replace(str(demo / "s001"), str(home))
                    .replace(f"dir:{demo / 'transfer'}", f"dir:{tmp_path / 'no-stick'}"))
    key = home / "keys" / keys.SIGNING_KEY
    os.chmod(key, 0o644)
    code, out = doctor(home)
    assert code == 1
    failed = {c["name"]: c for c in out["checks"] if not c["ok"]}  # type: ignore[union-attr]
    assert set(failed) == {"keys", "mode signing key", "transport ho"}
    assert "chmod 600" in failed["keys"]["fix"] and str(key) in failed["keys"]["detail"]
    assert failed["mode signing key"]["fix"] == f"Run: chmod 600 {key}"
    assert "not available" in failed["transport ho"]["detail"]
    text = CliRunner().invoke(main, ["doctor", "--home", str(home)]).output
    assert "FAIL keys" in text and "fix: Run: chmod 600" in text and "OK   database" in text


def test_full_sync_over_sftp_and_doctor(sshd_server: SshdServer, tmp_path: Path) -> None:
    store = sshd_server.stores[0]
    ho_home = make_home(sshd_server, tmp_path / "ho", "ho", authorize_as=HO_USER,
                        trust=sshd_server.ho_address(store))
    st_home = make_home(sshd_server, tmp_path / store, store,
                        authorize_as=sshd_server.accounts[store].user, trust=sshd_server.store_address(store))
    ho, st = Node.open(ho_home), Node.open(st_home)
    add_peer(ho.cfg, store, "store", keys.public_signing_line(st.cfg), keys.recipient(st.cfg),
             sshd_server.ho_address(store), ("north",))
    add_peer(st.cfg, "ho", "ho", keys.public_signing_line(ho.cfg), keys.recipient(ho.cfg),
             sshd_server.store_address(store))
    ho, st = Node.open(ho_home), Node.open(st_home)
    try:
        with ho.engine.begin() as conn:
            items = [k[0] for k in seed_masters(conn, 30, [store], {store: "north"})["item"]]
        for node in (ho, st, ho):
            assert not sync(node).errors
        with st.engine.begin() as conn:
            seed_store_activity(conn, store, items, 10)
        for node in (st, ho, st):
            assert not sync(node).errors
        assert {r.status for r in status.sent(ho)} == {"PROCESSED"}
        assert {r.status for r in status.sent(st)} == {"PROCESSED"}
        assert {r.status for r in status.received(ho)} == {"APPLIED"}
        assert all(r["ok"] for r in reconcile(ho, [st]))
        for home in (st_home, ho_home):  # doctor's SFTP test connection: login, both folders, clock
            checks = {c.name: c for c in run_checks(Node.open(home))}
            peer = "ho" if home == st_home else store
            assert checks[f"transport {peer}"].ok, checks[f"transport {peer}"]
    finally:
        sshd_server.kill_sessions()
        sshd_server.clean()
