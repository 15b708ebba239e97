"""Plug-and-sync USB: transfer sticks for stores with no network.

No real USB here: a "stick" is a folder holding ``exchange-transfer/``;
inserting one is moving that folder under a watched root, pulling it out is
moving it away (mid-copy, by fault injection in the copy loop), a full stick
is a small tmpfs (or, where mounting is not allowed, an injected ENOSPC).
Every node is stick-only: no peer has a transport.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from exchange.cli import main
from exchange.database.tables import xchg_heartbeat, xchg_received, xchg_sent
from exchange.demo.data import seed_masters, seed_store_activity
from exchange.demo.run import reconcile
from exchange.errors import AuthenticityError, BusyError, TransportError, VersionError
from exchange.node import keys
from exchange.node.home import Node, init_home
from exchange.node.lock import work_lock
from exchange.node.peers import add_peer
from exchange.service import status
from exchange.transport.usb import (
    RECEIPTS_DIR, TRANSFER_DIR, UsbAddon, clean_stale_parts, find_sticks, last_usb_result,
    list_receipts, prepare_stick, read_receipt, transfer_folder, usb_sync,
)
from exchange.files import utc_now
from exchange.wire.formats import RECEIPT_FORMAT, RECEIPT_MEMBERS
from exchange.wire.signed import dump_json, format_time, pack_signed

EXE = [sys.executable, "-m", "exchange"]
STORES = {"s001": "north", "s002": "south", "s003": "north"}


def wait_for(cond: Callable[[], Any], timeout: float, step: float = 0.05) -> bool:
    """Poll ``cond()`` until true or ``timeout`` seconds pass (bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


class Net:
    """An HO and three stick-only stores (no transports), as the demo pairs them."""

    def __init__(self, root: Path) -> None:
        ho = Node(init_home(root / "ho", "ho", "ho"))
        stores = [Node(init_home(root / s, s, "store")) for s in STORES]
        for st in stores:
            add_peer(ho.cfg, st.id, "store", keys.public_signing_line(st.cfg), keys.recipient(st.cfg),
                     None, (STORES[st.id],))
            add_peer(st.cfg, ho.id, "ho", keys.public_signing_line(ho.cfg), keys.recipient(ho.cfg), None)
        self.ho = Node.open(ho.cfg.home)
        self.stores = [Node.open(s.cfg.home) for s in stores]
        self.items: list[str] = []

    @property
    def all(self) -> list[Node]:
        return [self.ho, *self.stores]

    def store(self, node_id: str) -> Node:
        return next(s for s in self.stores if s.id == node_id)

    def seed_masters(self, n_items: int = 12) -> None:
        with self.ho.engine.begin() as conn:
            keys_ = seed_masters(conn, n_items, list(STORES), STORES)
        self.items = [str(k[0]) for k in keys_["item"]]

    def sell(self, store: Node, n: int = 3, seed: int = 0) -> None:
        with store.engine.begin() as conn:
            seed_store_activity(conn, store.id, self.items, n, seed=seed)

    def dispose(self) -> None:
        for n in self.all:
            n.engine.dispose()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path / "homes")
    yield n
    n.dispose()


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    """A prepared stick (the volume root, as mounted)."""
    root = tmp_path / "STICK"
    root.mkdir()
    prepare_stick(root, label="TEST")
    return root


def sent_statuses(node: Node) -> dict[str, str]:
    return {r.file: r.status for r in status.sent(node)}


def stick_files(stick: Path) -> list[str]:
    """Every file under exchange-transfer/ except receipts and the README, as relative paths."""
    t = stick / TRANSFER_DIR
    return sorted(str(p.relative_to(t)) for p in t.rglob("*")
                  if p.is_file() and p.parts[-2] != RECEIPTS_DIR and p.name not in ("README.txt", "stick.json")
                  and not p.name.startswith("node-") and not p.name.endswith(".heartbeat"))  # status, not business


def received_applied(node: Node) -> int:
    with node.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(xchg_received)
                                .where(xchg_received.c.status == "APPLIED")).scalar() or 0)


# ---------------------------------------------------------------- fault injection

class CopyFault:
    """Fault injection in the transport's copy loop (not mocking a dependency).

    Replaces ``shutil.copyfileobj`` as ``exchange.transport.dir.durable_copy``
    calls it: copies whose destination matches ``where`` are counted, and from
    the ``nth`` one on, half the bytes are written and then ``action`` runs
    (e.g. moves the stick away) and ``OSError(err)`` is raised, as a yanked or
    full device does. Other copies run unchanged.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where: Callable[[str], bool], *, nth: int = 1,
                 err: int = errno.EIO, action: Callable[[], None] = lambda: None, once: bool = True) -> None:
        self.real = shutil.copyfileobj
        self.where, self.nth, self.err, self.action, self.once = where, nth, err, action, once
        self.seen = 0
        self.fired = 0
        monkeypatch.setattr(shutil, "copyfileobj", self.copy)  # the module dir.py copies with

    def copy(self, fsrc: Any, fdst: Any, length: int = 0) -> None:
        if not self.where(str(fdst.name)) or (self.once and self.fired):
            return self.real(fsrc, fdst, length or (1 << 20))
        self.seen += 1
        if self.seen < self.nth:
            return self.real(fsrc, fdst, length or (1 << 20))
        data = fsrc.read()
        fdst.write(data[: len(data) // 2])
        fdst.flush()
        self.fired += 1
        self.action()
        raise OSError(self.err, os.strerror(self.err))


# ---------------------------------------------------------------- the stick itself

def test_prepare_makes_a_stick_and_is_idempotent(tmp_path: Path) -> None:
    vol = tmp_path / "VOL"
    vol.mkdir()
    with pytest.raises(TransportError, match="not a transfer stick"):
        transfer_folder(vol)
    res = CliRunner().invoke(main, ["usb", "prepare", str(vol), "--label", "NORTH"])
    assert res.exit_code == 0, res.output
    t = vol / TRANSFER_DIR
    readme = (t / "README.txt").read_text()
    assert "Plug the stick into" in readme and "exchange usb sync" in readme
    info = json.loads((t / "stick.json").read_text())
    assert info["label"] == "NORTH" and len(info["id"]) == 16
    (t / "s001").mkdir()
    (t / "s001" / "ho.s001.0000000001.bundle").write_bytes(b"x")
    res = CliRunner().invoke(main, ["usb", "prepare", str(t)])  # the folder itself also works
    assert res.exit_code == 0, res.output
    assert json.loads((t / "stick.json").read_text())["id"] == info["id"]  # same stick id
    assert (t / "s001" / "ho.s001.0000000001.bundle").exists()
    assert not (t / TRANSFER_DIR).exists()


def test_find_sticks_looks_two_levels_down(tmp_path: Path) -> None:
    media = tmp_path / "media"
    for rel in ("LABEL1", "user/LABEL2", "a/b/TOO-DEEP", "user/NOT-A-STICK"):
        (media / rel).mkdir(parents=True)
    for rel in ("LABEL1", "user/LABEL2", "a/b/TOO-DEEP"):
        (media / rel / TRANSFER_DIR).mkdir()
    assert find_sticks([str(media)]) == [media / "LABEL1", media / "user" / "LABEL2"]
    assert find_sticks([str(tmp_path / "missing")]) == []
    assert find_sticks([str(media / "LABEL1")]) == [media / "LABEL1"]  # a root may be the stick


def test_stale_part_cleanup_is_limited_to_this_nodes_folders(net: Net, stick: Path) -> None:
    t = stick / TRANSFER_DIR
    for rel in ("s001/ho.s001.0000000001.bundle.part",   # s001's own box: every .part is stale
                "ho/s001.ho.0000000001.bundle.part",     # written by s001 into the HO's folder
                "ho/node-s001.json.part",
                "ho/s002.ho.0000000001.bundle.part",     # s002's: not s001's to remove
                "s002/ho.s002.0000000001.bundle.part",   # a folder s001 never uses
                "receipts/s001.20260101T000000Z.receipt.part",
                "receipts/s002.20260101T000000Z.receipt.part"):
        (t / rel).parent.mkdir(exist_ok=True)
        (t / rel).write_bytes(b"partial")
    removed = clean_stale_parts(t, "s001", ["ho"])
    assert sorted(removed) == ["ho/node-s001.json.part", "ho/s001.ho.0000000001.bundle.part",
                               "receipts/s001.20260101T000000Z.receipt.part",
                               "s001/ho.s001.0000000001.bundle.part"]
    assert (t / "ho/s002.ho.0000000001.bundle.part").exists()
    assert (t / "s002/ho.s002.0000000001.bundle.part").exists()
    assert (t / "receipts/s002.20260101T000000Z.receipt.part").exists()


# ---------------------------------------------------------------- the round trip

def test_three_store_round_trip_by_stick_alone(net: Net, stick: Path) -> None:
    """HO + s001..s003, all stick-only: one stick, carried round until every bundle is PROCESSED."""
    net.seed_masters()
    lines = [f"three-store round trip by stick alone (stick {stick.name}, HO {net.ho.id}, "
             f"stores {', '.join(STORES)})"]
    sold: set[str] = set()
    visits = 0

    def done() -> bool:
        return len(sold) == len(net.stores) and all(
            s == "PROCESSED" for n in net.all for s in sent_statuses(n).values())

    rounds = 0
    for rounds in range(1, 7):  # bounded: three rounds suffice, six allowed
        for node in net.all:
            rec = usb_sync(node, stick)
            visits += 1
            assert rec.ok, rec.errors
            assert rec.receipt and Path(rec.receipt).exists()
            lines.append(f"  round {rounds} {node.id:<5} {rec.line()}")
            if node is not net.ho and node.id not in sold:
                net.sell(node, 3, seed=len(sold))  # stores trade once the masters have arrived
                sold.add(node.id)
                lines.append(f"          {node.id} records 3 sales bills, customers, a GRC and a GRT")
        if done():
            break
    assert done(), {n.id: sent_statuses(n) for n in net.all}
    assert rounds == 3

    lines.append("  final Sent status per node:")
    for node in net.all:
        st = sent_statuses(node)
        lines.append(f"    {node.id:<5} " + ", ".join(f"{f} {s}" for f, s in st.items()))
        assert st and all(s == "PROCESSED" for s in st.values())
        assert all(r.status == "APPLIED" for r in status.received(node))
    rec_rows = reconcile(net.ho, net.stores)
    bad = [r for r in rec_rows if not r["ok"]]
    assert not bad, bad
    docs = sum(r["sent_docs"] for r in rec_rows)
    lines.append(f"  reconciled {len(rec_rows)} (store, document type) pairs, {docs} documents: "
                 "documents and control totals equal on both sides")

    # every store's heartbeat reached the HO by stick alone, and the HO's reached every store
    for node in net.all:
        with node.engine.connect() as conn:
            beats = set(conn.execute(select(xchg_heartbeat.c.peer)).scalars())
        assert beats == (set(STORES) if node is net.ho else {"ho"}), (node.id, beats)

    # nothing left on the stick but receipts; every visit left a receipt the HO can verify
    assert stick_files(stick) == []
    receipts = list_receipts(stick, net.ho.trust)
    assert len(receipts) == visits and all(r["verified"] and not r["error"] for r in receipts)
    assert {r["node"] for r in receipts} == {"ho", *STORES}
    last = last_usb_result(net.store("s003"))
    assert last is not None and last["ok"] and last["receipt"]
    lines.append(f"  {visits} visits, {len(receipts)} signed receipts on the stick, all verified at the HO")
    print("\n" + "\n".join(lines))


def test_receipt_is_signed_and_tamper_evident(net: Net, stick: Path) -> None:
    net.seed_masters()
    rec = usb_sync(net.ho, stick)
    assert rec.receipt
    path = Path(rec.receipt)
    body = read_receipt(path, net.ho.trust)
    assert body["format"] == "exchange-usb-receipt" and body["version"] == 1
    assert body["node"] == "ho" and body["created"] == rec.created
    assert sorted(p["file"] for p in body["put"]) == [f"ho.{s}.0000000001.bundle" for s in STORES]
    assert all(len(p["sha256"]) == 64 and p["size"] > 0 for p in body["put"])
    assert body["taken"] == [] and body["errors"] == []
    assert body["stick_id"] == json.loads((stick / TRANSFER_DIR / "stick.json").read_text())["id"]
    # a store holds the HO's key: it can verify the HO's receipt too
    read_receipt(path, net.store("s001").trust)
    # the same receipt, kept in the node home
    assert (net.ho.cfg.home / "usb-receipts" / path.name).read_bytes() == path.read_bytes()
    data = bytearray(path.read_bytes())
    at = data.index(b'"sha256": "') + len(b'"sha256": "')
    data[at] = ord("0") if data[at] != ord("0") else ord("1")  # claim another file was put
    path.write_bytes(bytes(data))
    with pytest.raises(AuthenticityError):
        read_receipt(path, net.ho.trust)
    rows = list_receipts(stick, net.ho.trust)
    assert rows[0]["error"] and not rows[0]["verified"]


@pytest.mark.parametrize("version", [True, 1.0, 2], ids=["true", "float", "newer"])
def test_a_receipt_of_another_version_is_refused(net: Net, tmp_path: Path, version: Any) -> None:
    """A store signs, with its own genuine key, a receipt whose version is not the integer 1
    (``true`` and ``1.0`` equal 1 to Python): refused by the one signed-JSON reader, naming the file."""
    store = net.store("s001")
    now = utc_now()
    body = {"format": RECEIPT_FORMAT, "version": version, "node": "s001", "created": format_time(now),
            "stick_id": "x", "taken": [], "put": [], "left": [], "cleaned": [], "results": {}, "exported": [],
            "errors": []}
    path = tmp_path / "s001.20261202T000000Z.receipt"
    path.write_bytes(pack_signed(RECEIPT_MEMBERS, dump_json(body), store.signing_key, now))
    with pytest.raises(VersionError, match=rf"^{re.escape(path.name)}: receipt\.json: format version "
                                           rf"{re.escape(repr(version))} is not supported"):
        read_receipt(path, net.ho.trust)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None or shutil.which("tar") is None,
                    reason="needs ssh-keygen and tar (Debian: openssh-client, tar)")
def test_receipt_verifies_with_standard_tools(net: Net, stick: Path, tmp_path: Path) -> None:
    """docs/USB.md: tar + ssh-keygen -Y verify, no trust in this code."""
    rec = usb_sync(net.store("s001"), stick)
    assert rec.receipt
    out = tmp_path / "r"
    out.mkdir()
    subprocess.run(["tar", "-xf", rec.receipt, "-C", str(out)], check=True, timeout=30)
    assert sorted(p.name for p in out.iterdir()) == ["receipt.json", "receipt.json.sig"]
    with open(out / "receipt.json", "rb") as data:
        res = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(net.ho.cfg.keys_dir / "allowed_signers"),
                              "-I", "s001", "-n", "exchange-bundle", "-s", str(out / "receipt.json.sig")],
                             stdin=data, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "receipt.json").read_text())["node"] == "s001"


# ---------------------------------------------------------------- damage and interruptions

def test_tampered_bundle_on_the_stick_is_quarantined_and_nothing_applied(net: Net, stick: Path) -> None:
    net.seed_masters()
    usb_sync(net.ho, stick)
    bundle = stick / TRANSFER_DIR / "s001" / "ho.s001.0000000001.bundle"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the encrypted payload
    bundle.write_bytes(bytes(data))

    s001 = net.store("s001")
    rec = usb_sync(s001, stick)
    assert [t["file"] for t in rec.taken] == [bundle.name]
    assert rec.results == {"QUARANTINED": 1}
    assert "quarantined 1" in rec.line()
    assert received_applied(s001) == 0
    with s001.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s001.catalog.table("item"))).scalar() == 0
    assert (s001.cfg.quarantine / bundle.name).exists()
    reason = json.loads((s001.cfg.quarantine / (bundle.name + ".reason")).read_text())
    assert reason["error"] in ("AuthenticityError", "CryptoError"), reason  # age MAC or hash check
    assert [r.status for r in status.received(s001)] == ["QUARANTINED"]

    # an hour later the HO resends what was never acknowledged; the good copy applies
    with net.ho.engine.begin() as conn:
        conn.execute(update(xchg_sent).values(uploaded_at=utc_now() - timedelta(hours=2)))
    rec = usb_sync(net.ho, stick)
    assert bundle.name in [p["file"] for p in rec.put]
    rec = usb_sync(s001, stick)
    assert rec.results == {"APPLIED": 1}
    usb_sync(net.ho, stick)
    assert sent_statuses(net.ho)[bundle.name] == "PROCESSED"


def _move(src: Path, dst: Path) -> Callable[[], None]:
    return lambda: os.replace(src, dst)


def test_stick_pulled_out_while_putting_files(net: Net, stick: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    net.seed_masters()
    away = tmp_path / "pulled-out"
    # the second copy onto the stick (HO -> s002) is cut halfway: the stick disappears
    fault = CopyFault(monkeypatch, lambda dst: str(stick) in dst, nth=2, action=_move(stick, away))
    rec = usb_sync(net.ho, stick)
    assert fault.fired == 1
    assert rec.removed and not rec.ok and rec.receipt is None
    assert "STICK REMOVED" in rec.line() and "plug it in again" in rec.advice()
    assert not stick.exists(), "the transport must not re-create the stick's folders on local disk"
    # on the stick: the first copy complete, the interrupted one only as .part, nothing else
    os.replace(away, stick)  # plugged in again
    assert stick_files(stick) == ["s001/ho.s001.0000000001.bundle", "s002/ho.s002.0000000001.bundle.part"]
    st = sent_statuses(net.ho)
    assert st == {"ho.s001.0000000001.bundle": "UPLOADED", "ho.s002.0000000001.bundle": "EXPORTED",
                  "ho.s003.0000000001.bundle": "EXPORTED"}
    assert (net.ho.cfg.outbox / "ho.s002.0000000001.bundle").exists()
    assert last_usb_result(net.ho)["removed"] is True  # type: ignore[index]

    rec = usb_sync(net.ho, stick)  # the next insertion cleans up and completes
    assert rec.ok, rec.errors
    assert rec.cleaned == ["s002/ho.s002.0000000001.bundle.part"]
    assert sorted(p["file"] for p in rec.put) == ["ho.s002.0000000001.bundle", "ho.s003.0000000001.bundle"]
    assert stick_files(stick) == [f"{s}/ho.{s}.0000000001.bundle" for s in STORES]
    assert set(sent_statuses(net.ho).values()) == {"UPLOADED"}
    for s in net.stores:  # and the stores get intact files
        assert usb_sync(s, stick).results == {"APPLIED": 1}


def test_stick_pulled_out_while_taking_files(net: Net, stick: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    net.seed_masters()
    usb_sync(net.ho, stick)
    s001 = net.store("s001")
    away = tmp_path / "pulled-out"
    fault = CopyFault(monkeypatch, lambda dst: str(s001.cfg.inbox) in dst, action=_move(stick, away))
    rec = usb_sync(s001, stick)
    assert fault.fired == 1 and rec.removed and rec.taken == [] and rec.receipt is None
    assert received_applied(s001) == 0
    os.replace(away, stick)
    # the source stays on the stick until its copy is durable
    assert (stick / TRANSFER_DIR / "s001" / "ho.s001.0000000001.bundle").exists()
    rec = usb_sync(s001, stick)
    assert rec.ok and rec.results == {"APPLIED": 1}
    assert not list(s001.cfg.inbox.glob("*.part"))
    assert not (stick / TRANSFER_DIR / "s001" / "ho.s001.0000000001.bundle").exists()


def _try_mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``path``; None on success, else why not."""
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if res.returncode == 0 else (res.stderr.strip() or f"mount exited {res.returncode}")


@pytest.fixture(params=["tmpfs", "injected"])
def full_stick(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A stick with room for one bundle (~42 KB) but not two; yields (stick, make_room)."""
    root = tmp_path / "SMALL"
    root.mkdir()
    mode = request.param
    if mode == "tmpfs":
        why = _try_mount_tmpfs(root, "64k")
        if why is not None:
            if os.environ.get("CI", "").lower() != "true":
                pytest.skip(f"cannot mount a small tmpfs here ({why}); the injected variant runs instead")
            mode = "injected"  # CI without mount rights: inject ENOSPC instead
    if mode == "tmpfs":
        def make_room() -> None:
            subprocess.run(["mount", "-o", "remount,size=4m", str(root)], check=True, timeout=30)
        try:
            prepare_stick(root)
            yield root, make_room
        finally:
            subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)
        return
    prepare_stick(root)
    # fault injection, not a mock: from the second copy onto the stick, the device is "full"
    fault = CopyFault(monkeypatch, lambda dst: str(root) in dst, nth=2, err=errno.ENOSPC, once=False)

    def make_room_injected() -> None:
        fault.nth = 10**9

    yield root, make_room_injected


def test_full_stick_leaves_no_partial_file_and_completes_later(
        net: Net, full_stick: tuple[Path, Callable[[], None]]) -> None:
    stick, make_room = full_stick
    net.seed_masters()
    rec = usb_sync(net.ho, stick)
    assert not rec.ok and not rec.removed
    assert any("No space left" in e for e in rec.errors), rec.errors
    assert "The stick is full" in rec.advice()
    assert rec.receipt is not None  # the failed copy was removed at once: room for the receipt
    files = stick_files(stick)
    # no partial visible file: the first bundle complete, nothing else but .part (removed at once to free space)
    assert "s001/ho.s001.0000000001.bundle" in files
    assert [f for f in files if not f.endswith(".part")] == ["s001/ho.s001.0000000001.bundle"]
    st = sent_statuses(net.ho)
    assert st["ho.s001.0000000001.bundle"] == "UPLOADED"
    assert st["ho.s002.0000000001.bundle"] == st["ho.s003.0000000001.bundle"] == "EXPORTED"
    assert (net.ho.cfg.outbox / "ho.s002.0000000001.bundle").exists()
    last = last_usb_result(net.ho)
    assert last is not None and not last["ok"]

    make_room()  # the next insertion, with space
    rec = usb_sync(net.ho, stick)
    assert rec.ok, rec.errors
    assert stick_files(stick) == [f"{s}/ho.{s}.0000000001.bundle" for s in STORES]
    assert set(sent_statuses(net.ho).values()) == {"UPLOADED"}
    assert not list(net.ho.cfg.outbox.glob("*.bundle"))


def test_sync_waits_for_the_work_lock(net: Net, stick: Path) -> None:
    with work_lock(net.ho.cfg.home):
        with pytest.raises(BusyError):
            usb_sync(net.ho, stick, lock_timeout=0.2)


# ---------------------------------------------------------------- CLI

def test_cli_usb_sync_json_last_and_receipts(net: Net, stick: Path) -> None:
    net.seed_masters()
    runner = CliRunner()
    res = runner.invoke(main, ["usb", "sync", str(stick), "--home", str(net.ho.cfg.home), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["ok"] and out["node"] == "ho" and len(out["put"]) == 3 and out["receipt"]
    res = runner.invoke(main, ["usb", "sync", str(stick), "--home", str(net.store("s001").cfg.home)])
    assert res.exit_code == 0, res.output
    assert "usb s001: took 1, applied 1" in res.output and "you can remove the stick now" in res.output
    res = runner.invoke(main, ["usb", "last", "--home", str(net.store("s001").cfg.home), "--json"])
    assert json.loads(res.output)["summary"].startswith("took 1, applied 1")
    res = runner.invoke(main, ["usb", "receipts", str(stick), "--home", str(net.ho.cfg.home)])
    assert res.exit_code == 0 and res.output.count("[verified]") == 2, res.output
    res = runner.invoke(main, ["usb", "sync", str(stick.parent), "--home", str(net.ho.cfg.home)])
    assert res.exit_code == 30 and "not a transfer stick" in res.output


# ---------------------------------------------------------------- the watcher

class FakeService:
    """What an addon sees of the service: the node and the stop event."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.stop_event = threading.Event()


def _receipts(stick: Path, node: str) -> list[Path]:
    return sorted((stick / TRANSFER_DIR / RECEIPTS_DIR).glob(f"{node}.*.receipt"))


def test_addon_syncs_each_insertion_once(net: Net, tmp_path: Path) -> None:
    net.seed_masters()
    staging = tmp_path / "drawer"
    staging.mkdir()
    outside = staging / "LABEL"
    outside.mkdir()
    prepare_stick(outside)
    usb_sync(net.ho, outside)
    media = tmp_path / "media"
    (media / "clerk").mkdir(parents=True)
    inside = media / "clerk" / "LABEL"
    s001 = net.store("s001")
    addon = UsbAddon(roots=[str(media)], interval=0.1)
    addon.start(FakeService(s001))  # type: ignore[arg-type]
    try:
        os.replace(outside, inside)  # inserted
        assert wait_for(lambda: len(_receipts(inside, "s001")) == 1, 10)
        time.sleep(0.6)  # several polls while it stays in: no second run
        assert len(_receipts(inside, "s001")) == 1 and addon.runs == 1
        assert addon.last is not None and addon.last["results"] == {"APPLIED": 1}
        assert received_applied(s001) == 1
        os.replace(inside, outside)  # removed
        assert wait_for(lambda: not addon._seen, 10)
        os.replace(outside, inside)  # inserted again: one more visit
        assert wait_for(lambda: len(_receipts(inside, "s001")) == 2, 10)
    finally:
        t0 = time.monotonic()
        addon.stop()
        assert time.monotonic() - t0 < 5
    last = last_usb_result(s001)
    assert last is not None and last["ok"] and last["stick"] == str(inside / TRANSFER_DIR)


def test_addon_in_a_running_service_picks_up_a_stick(net: Net, tmp_path: Path) -> None:
    net.seed_masters()
    drawer = tmp_path / "drawer"
    drawer.mkdir()
    outside = drawer / "TRANSFER"
    outside.mkdir()
    prepare_stick(outside)
    usb_sync(net.ho, outside)
    media = tmp_path / "media"
    (media / "clerk").mkdir(parents=True)
    s001 = net.store("s001")
    s001.cfg.extra["usb"] = {"roots": [str(media)]}
    s001.cfg.save()
    log = tmp_path / "service.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*EXE, "run", "--home", str(s001.cfg.home), "--interval", "3600"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        def text() -> str:
            return log.read_text(errors="replace")

        assert wait_for(lambda: "sync:" in text() or proc.poll() is not None, 30), text()
        assert proc.poll() is None, text()
        assert "usb: watching" in text()
        inside = media / "clerk" / "TRANSFER"
        t0 = time.monotonic()
        os.replace(outside, inside)  # inserted
        assert wait_for(lambda: len(_receipts(inside, "s001")) == 1, 15), text()
        latency = time.monotonic() - t0
        assert latency < 10
        assert wait_for(lambda: "usb s001 at" in text(), 5), text()
        assert "took 1, applied 1" in text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    last = last_usb_result(s001.cfg.home)
    assert last is not None and last["ok"] and last["results"] == {"APPLIED": 1}
    assert received_applied(s001) == 1
    print(f"\nservice picked up the inserted stick and wrote its receipt in {latency:.2f} s")
