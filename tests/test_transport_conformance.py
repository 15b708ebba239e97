"""One contract, every transport: dir (USB stick), drop (HO beside its server), sftp (and sftp on
stock paramiko, as it runs when the fast path's paramiko internals are missing).

Each medium gives a store end (``s001``) and an HO end (``ho``) and says where
files addressed to a node wait, so the same checks run against all three:
bytes arrive unchanged, a partial copy never carries a complete name, a
re-push is harmless, and a node takes only what is addressed to it.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exchange.transport import Transport, info_name, node_info
from exchange.transport.dir import DirTransport
from exchange.transport.drop import DropTransport
from exchange.transport.sftp import SftpTransport, session_kind
from exchange.transport.sftp.fastpath import FastSession

STORE, HO = "s001", "ho"


@dataclass
class Medium:
    name: str
    store: Transport
    ho: Transport
    waiting: dict[str, Path]  # node id -> the folder (on this machine) holding files addressed to it

    def close(self) -> None:
        self.store.close()
        self.ho.close()


@pytest.fixture(params=["dir", "drop", "sftp", "sftp-stock"])
def medium(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Medium]:
    if request.param == "dir":
        root = tmp_path / "stick"
        root.mkdir()  # a mounted stick: the transport never creates its root
        m = Medium("dir", DirTransport(root), DirTransport(root), {HO: root / HO, STORE: root / STORE})
    elif request.param == "drop":
        root = tmp_path / "srv" / STORE
        for sub in ("up", "down"):
            (root / sub).mkdir(parents=True)
        m = Medium("drop", DropTransport(root, side="store"), DropTransport(root, side="ho"),
                   {HO: root / "up", STORE: root / "down"})
    else:
        if request.param == "sftp-stock":
            request.getfixturevalue("stock_paramiko")
        srv = request.getfixturevalue("sshd")
        homes = request.getfixturevalue("sftp_homes")
        folder = srv.accounts[STORE].folder
        m = Medium(request.param,
                   SftpTransport.from_address(srv.store_address(STORE), home=homes.stores[STORE]),
                   SftpTransport.from_address(srv.ho_address(STORE), home=homes.ho),
                   {HO: folder / "up", STORE: folder / "down"})
    try:
        yield m
    finally:
        m.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(folder: Path, name: str, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(os.urandom(size))
    return path


def waiting_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("sender,recipient", [(STORE, HO), (HO, STORE)])
def test_push_then_pull_gives_identical_bytes(medium: Medium, tmp_path: Path, sender: str,
                                              recipient: str) -> None:
    out = tmp_path / "outbox"
    files = [make(out, f"{sender}.{recipient}.{n:010d}.bundle", size)
             for n, size in ((1, 0), (2, 1), (3, 300_001), (4, (3 << 20) + 7))]
    files.append(make(out, f"{sender}.{recipient}.0000000009.ack", 512))
    src, dst = (medium.store, medium.ho) if sender == STORE else (medium.ho, medium.store)
    assert src.push(files, recipient) == files
    assert all(f.exists() for f in files)  # pushing never removes the source
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    got = dst.pull(recipient, inbox)
    assert sorted(got) == sorted(inbox / f.name for f in files)
    for f in files:
        assert sha(inbox / f.name) == sha(f)
    assert not any(n.endswith((".bundle", ".ack", ".part")) for n in waiting_names(medium.waiting[recipient]))
    assert not list(inbox.glob("*.part"))
    assert dst.pull(recipient, inbox) == []  # taken once


def test_part_files_never_visible_as_complete_names(medium: Medium, tmp_path: Path) -> None:
    files = [make(tmp_path / "outbox", f"s001.ho.{n:010d}.bundle", size)
             for n, size in ((1, 24 << 20), (2, 4 << 20), (3, 1000))]
    sizes = {f.name: f.stat().st_size for f in files}
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def watch() -> None:
        """Every complete name observed, in either folder, must already have its full size."""
        while not stop.is_set():
            for folder in (medium.waiting[HO], inbox):
                if not folder.is_dir():
                    continue
                for entry in os.scandir(folder):
                    if entry.name in sizes:
                        try:
                            seen.append((entry.name, entry.stat().st_size))
                        except FileNotFoundError:
                            pass
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        medium.store.push(files, HO)
        got = medium.ho.pull(HO, inbox)
    finally:
        stop.set()
        watcher.join()
    assert len(got) == 3
    partial = [(n, s) for n, s in seen if s != sizes[n]]
    assert partial == [], f"{medium.name}: complete names seen with partial content"

    # a partial copy left by the other side is neither taken nor disturbed
    stray = make(medium.waiting[HO], "s001.ho.0000000004.bundle.part", 100)
    assert medium.ho.pull(HO, inbox) == []
    assert stray.exists() and not (inbox / "s001.ho.0000000004.bundle").exists()


def test_repush_of_an_identical_file_is_idempotent(medium: Medium, tmp_path: Path) -> None:
    f = make(tmp_path / "outbox", "s001.ho.0000000001.bundle", (2 << 20) + 3)
    assert medium.store.push([f], HO) == [f]
    assert medium.store.push([f], HO) == [f]
    box = medium.waiting[HO]
    assert [n for n in waiting_names(box) if n.startswith("s001.ho.")] == [f.name]
    assert sha(box / f.name) == sha(f)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert medium.ho.pull(HO, inbox) == [inbox / f.name]
    assert sha(inbox / f.name) == sha(f)


def test_only_files_addressed_to_me_are_pulled(medium: Medium, tmp_path: Path) -> None:
    box = medium.waiting[HO]
    mine = [make(box, "s001.ho.0000000001.bundle", 100), make(box, "s001.ho.0000000002.ack", 50)]
    others = [make(box, "s001.s002.0000000001.bundle", 100),  # for another node
              make(box, "s002.s001.0000000001.ack", 10),      # an ack for s001, not for us
              make(box, "notes.txt", 10),                      # not an exchange file
              make(box, "s001.ho.0000000003.bundle.part", 10)]  # not complete
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    got = medium.ho.pull(HO, inbox)
    assert sorted(p.name for p in got) == sorted(p.name for p in mine)
    assert sorted(p.name for p in inbox.iterdir()) == sorted(p.name for p in mine)
    assert all(p.exists() for p in others) and not any(p.exists() for p in mine)


@pytest.mark.parametrize("sender,recipient", [(STORE, HO), (HO, STORE)])
def test_a_newer_heartbeat_replaces_the_one_waiting(medium: Medium, tmp_path: Path, sender: str,
                                                    recipient: str) -> None:
    """A heartbeat has one name per sender and peer (docs/FORMAT.md section 12): pushed again before the
    peer took the last one, the newer replaces it, and the peer takes that one only."""
    src, dst = (medium.store, medium.ho) if sender == STORE else (medium.ho, medium.store)
    name = f"{sender}.{recipient}.heartbeat"
    old, new = make(tmp_path / "a", name, 5000), make(tmp_path / "b", name, 5100)
    assert src.push([old], recipient) == [old]
    assert src.push([new], recipient) == [new]
    assert [n for n in waiting_names(medium.waiting[recipient]) if "heartbeat" in n] == [name]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert dst.pull(recipient, inbox) == [inbox / name]
    assert sha(inbox / name) == sha(new)


PROTOCOL_MEMBERS = ("push", "pull", "probe", "publish_info", "close")


@pytest.mark.parametrize("cls", [DirTransport, DropTransport, SftpTransport])
def test_every_transport_class_has_the_protocol_methods(cls: type) -> None:
    """The static check (``_: type[Transport] = ...`` in each module) seen at run time: every method
    of the protocol, with the protocol's parameters."""
    for name in PROTOCOL_MEMBERS:
        ours, theirs = inspect.signature(getattr(cls, name)), inspect.signature(getattr(Transport, name))
        assert list(ours.parameters) == list(theirs.parameters), f"{cls.__name__}.{name}{ours}"


def test_probe_sees_the_peers_published_info(medium: Medium, tmp_path: Path) -> None:
    """publish_info then probe, through the protocol only (as doctor and sync call them)."""
    assert isinstance(medium.store, Transport) and isinstance(medium.ho, Transport)
    if medium.name.startswith("sftp"):  # the fallback really runs, and the real paramiko has the fast path
        assert (session_kind() is FastSession) == (medium.name == "sftp")
    published = node_info(STORE)
    medium.store.publish_info(STORE, HO, published)
    before = time.time()
    got = medium.ho.probe(HO, STORE)
    assert got["peer_info"] == published
    assert abs(got["server_time"] - before) < 120  # the folder's clock: same machine here
    for folder in medium.waiting.values():  # the probe's test files are gone
        assert not [n for n in waiting_names(folder) if n.startswith(".probe-")]
    assert medium.ho.probe(HO, STORE)["peer_info"] == published  # repeatable
    assert info_name(STORE) in waiting_names(medium.waiting[HO])
    assert medium.ho.pull(HO, tmp_path) == [] and medium.ho.refused == []  # the info is not pulled
