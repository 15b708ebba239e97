"""The README and the guides, followed literally (issue #16): what they promise holds.

Real node homes (the demo's), the real service as a subprocess, the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from sqlalchemy import create_engine, func, insert, select

from exchange.database import schema as s
from sshd import SshdServer, make_home

from test_service import new_bundles, received_status, service_factory, wait_for  # noqa: F401

# --- docs/SERVICE.md: "applies a file within a second of its landing", whatever way it lands ------


def test_a_bundle_moved_into_the_inbox_with_mv_is_applied(homes: Path, service_factory: object) -> None:
    """`mv` from a folder the service does not watch: inotify says IN_MOVED_TO, which watchdog
    used to report as "created" (ignored as maybe half written) so the file waited for the next
    scheduled sync (an hour here)."""
    store = homes / "s001"
    first, second = new_bundles(homes, 2)
    staging = homes / "staging"  # same filesystem as the inbox, outside it: a rename, not a copy
    staging.mkdir()
    shutil.copy(first, staging / first.name)
    shutil.copy(second, staging / second.name)
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    assert received_status(store, first.name) is None
    subprocess.run(["mv", str(staging / first.name), str(store / "inbox" / first.name)], check=True)
    assert wait_for(lambda: received_status(store, first.name) == "APPLIED", 10), svc.text()
    os.rename(staging / second.name, store / "inbox" / second.name)  # the same from a program
    assert wait_for(lambda: received_status(store, second.name) == "APPLIED", 10), svc.text()
    assert svc.stop() == 0


def test_a_bundle_written_directly_into_the_inbox_is_applied(homes: Path, service_factory: object) -> None:
    """`cp` straight into the inbox (no rename): the close after the write wakes the service."""
    store = homes / "s001"
    bundle = new_bundles(homes)[0]
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    subprocess.run(["cp", str(bundle), str(store / "inbox" / bundle.name)], check=True)
    assert wait_for(lambda: received_status(store, bundle.name) == "APPLIED", 10), svc.text()
    assert svc.stop() == 0


# --- tools/demo.sh: its last lines say how to run exchange and what to try next -----------------


def _demo(tmp_path: Path, path_env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "exchange", "demo", "--home", "demo", "--items", "5", "--sales", "2"],
                         cwd=tmp_path, env={**os.environ, "PATH": path_env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("== next:"))
    return lines[start:]


def test_the_demo_ends_with_how_to_run_exchange_and_what_to_try(tmp_path: Path) -> None:
    venv_bin = Path(sys.prefix) / "bin"
    assert sys.prefix != sys.base_prefix, "the tests run from the project's virtual environment"
    bare = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin.resolve())
    last = _demo(tmp_path, bare)
    assert "homes in demo/ (ho, s001, s002)" in last[0], last
    assert all(len(line) <= 80 for line in last), last
    activate = last[1].split("#")[0].strip()
    assert activate == f". {venv_bin / 'activate'}", last  # exchange is not on PATH: say how
    commands = [line.split("#")[0].strip() for line in last[2:] if line.startswith("   exchange ")]
    assert any(c.startswith("exchange status sent --home demo/ho") for c in commands), last
    assert any(c.startswith("exchange ui --home demo/ho") for c in commands), last
    # followed literally, from the same folder, in a shell that has only the PATH the reader had
    for cmd in commands:
        if cmd.startswith("exchange ui"):
            cmd = cmd.replace("exchange ui", "exchange ui --help", 1)  # a server: its options parse
        run = subprocess.run(["bash", "-c", f"{activate} && {cmd}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PATH": bare})
        assert run.returncode == 0, (cmd, run.stdout, run.stderr)
        if "status sent" in cmd:
            assert "PROCESSED" in run.stdout, run.stdout
    # with exchange already on PATH, no activation line
    last = _demo(tmp_path, os.pathsep.join([str(venv_bin), bare]))
    assert last[1].strip().startswith("exchange "), last


# --- README "Using it": a store and its HO, business data in, rows from before the triggers sent --


def exchange(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, timeout=120)
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    return out


def _pair(tmp_path: Path, ho_db: str) -> tuple[Path, Path]:
    """README's steps with a shared folder as the transport: both sides add each other."""
    ho, st, transfer = tmp_path / "ho", tmp_path / "s001", tmp_path / "transfer"
    transfer.mkdir()
    exchange("init", "--home", str(ho), "--node", "ho", "--role", "ho", *(["--database", ho_db] if ho_db else []))
    exchange("init", "--home", str(st), "--node", "s001", "--role", "store")
    ids = {h.name: json.loads(exchange("identity", "--home", str(h), "--json").stdout) for h in (ho, st)}
    exchange("peer", "add", "--home", str(ho), "--peer", "s001", "--role", "store", "--signing-key",
             ids["s001"]["signing_key"], "--recipient", ids["s001"]["recipient"], "--transport", f"dir:{transfer}",
             "--group", "north")
    exchange("peer", "add", "--home", str(st), "--peer", "ho", "--role", "ho", "--signing-key",
             ids["ho"]["signing_key"], "--recipient", ids["ho"]["recipient"], "--transport", f"dir:{transfer}")
    return ho, st


def _url(home: Path) -> str:
    """The node's database, as `exchange init` wrote it into exchange.toml."""
    import tomllib

    return str(tomllib.loads((home / "exchange.toml").read_text())["node"]["database"])


NOW = datetime(2026, 12, 1, 9, 0)


def test_rows_present_before_triggers_install_are_sent(db_url: str, tmp_path: Path) -> None:
    ho, st = _pair(tmp_path, "" if db_url.startswith("sqlite") else db_url)
    ho_engine = create_engine(_url(ho))
    with ho_engine.begin() as conn:  # the POS's rows from before exchange: no event recorded
        for n in (1, 2, 3):
            conn.execute(insert(s.item).values(item_id=f"I{n}", name="Tea", category="BEVERAGE", uom="EA",
                                               price=Decimal("2.50"), tax_rate=Decimal("5"), updated_at=NOW))
        conn.execute(insert(s.item_barcode).values(item_id="I1", line_no=1, barcode="4006381333931"))
    out = exchange("triggers", "install", "--home", str(ho))
    assert "snapshot: 3 documents" in out.stdout and "item 3" in out.stdout, out.stdout
    with ho_engine.begin() as conn:  # a change after the install: captured by the trigger
        conn.execute(insert(s.item).values(item_id="I4", name="Rice", category="GROCERY", uom="KG",
                                           price=Decimal("1.10"), tax_rate=Decimal("5"), updated_at=NOW))
    again = exchange("triggers", "install", "--home", str(ho))  # already installed: no second snapshot
    assert "snapshot" not in again.stdout, again.stdout
    exchange("sync", "--home", str(ho))
    exchange("sync", "--home", str(st))
    st_engine = create_engine(_url(st))
    with st_engine.connect() as conn:
        items = sorted(r[0] for r in conn.execute(select(s.item.c.item_id)))
        barcodes = conn.execute(select(func.count()).select_from(s.item_barcode)).scalar()
    assert items == ["I1", "I2", "I3", "I4"] and barcodes == 1
    ho_engine.dispose()
    st_engine.dispose()


def test_triggers_install_no_snapshot_sends_only_later_changes(tmp_path: Path) -> None:
    ho, st = _pair(tmp_path, "")
    ho_engine = create_engine(_url(ho))
    with ho_engine.begin() as conn:
        conn.execute(insert(s.item).values(item_id="OLD", name="Tea", category="BEVERAGE", uom="EA",
                                           price=Decimal("2.50"), tax_rate=Decimal("5"), updated_at=NOW))
    out = exchange("triggers", "install", "--home", str(ho), "--no-snapshot")
    assert "snapshot" not in out.stdout
    with ho_engine.begin() as conn:
        conn.execute(insert(s.item).values(item_id="NEW", name="Rice", category="GROCERY", uom="KG",
                                           price=Decimal("1.10"), tax_rate=Decimal("5"), updated_at=NOW))
    exchange("sync", "--home", str(ho))
    exchange("sync", "--home", str(st))
    st_engine = create_engine(_url(st))
    with st_engine.connect() as conn:
        assert sorted(r[0] for r in conn.execute(select(s.item.c.item_id))) == ["NEW"]
    # asked for explicitly, later: the rows from before go too
    assert "snapshot: 2 documents" in exchange("triggers", "install", "--home", str(ho), "--snapshot").stdout
    exchange("sync", "--home", str(ho))
    exchange("sync", "--home", str(st))
    with st_engine.connect() as conn:
        assert sorted(r[0] for r in conn.execute(select(s.item.c.item_id))) == ["NEW", "OLD"]
    ho_engine.dispose()
    st_engine.dispose()


# --- docs/SFTP.md: a locked account is told apart from a key that is not authorized -------------


def test_doctor_tells_a_locked_account_from_an_unauthorized_key(sshd: SshdServer, tmp_path: Path) -> None:
    from exchange.node import keys
    from exchange.node.home import Node
    from exchange.node.peers import add_peer

    acc = sshd.accounts[sshd.stores[0]]
    ho_home = tmp_path / "ho"
    exchange("init", "--home", str(ho_home), "--node", "ho", "--role", "ho")
    ho = Node.open(ho_home)
    homes = {}
    for name, authorized in (("mine", True), ("stranger", False)):
        home = make_home(sshd, tmp_path / name, acc.store, authorize_as=acc.user if authorized else None,
                         trust=sshd.store_address(acc.store))
        add_peer(Node.open(home).cfg, "ho", "ho", keys.public_signing_line(ho.cfg), keys.recipient(ho.cfg),
                 sshd.store_address(acc.store))
        homes[name] = home
    try:
        subprocess.run(["usermod", "-L", acc.user], check=True)  # as `useradd --system` leaves an account
        locked = exchange("doctor", "--home", str(homes["mine"]), ok=False).stdout
        line = next(x for x in locked.splitlines() if "transport ho" in x)
        assert "FAIL" in line and f"account {acc.user!r} on this server is locked" in locked, locked
        assert f"usermod -p '*' {acc.user}" in locked and "authorized keys" not in line, locked
        fix = f"usermod -p '*' {acc.user}"  # the fix doctor printed, run as printed
        subprocess.run(["bash", "-c", fix], check=True)
        fixed = exchange("doctor", "--home", str(homes["mine"])).stdout
        assert "FAIL" not in next(x for x in fixed.splitlines() if "transport ho" in x), fixed
        stranger = exchange("doctor", "--home", str(homes["stranger"]), ok=False).stdout
        assert "not in that account's authorized keys" in stranger and "is locked" not in stranger, stranger
    finally:
        subprocess.run(["usermod", "-p", "*", acc.user], check=True)  # the session's sshd stays usable
