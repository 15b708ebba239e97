"""No file operation leaves its place: links, FIFOs and folders named like exchange files.

The attacker is a store holding its own genuine keys, with write access to
what a store can write: its drop folder (``up/``, and ``down/`` through its
SFTP account), a transfer stick, its SFTP account (where it can create
symbolic links with any target text: the HO logs in without a chroot and
would resolve them on its own disk). The inbox, outbox and archive cases are
defence in depth: nothing there should ever be a link, and if one is, it is
set aside as a link, never followed.

Every case runs the real code path (the CLI as a subprocess where practical,
bounded by a timeout so that a FIFO that blocks fails the test instead of
hanging it) and checks: refused with an error naming the file and what it is;
nothing applied; the file outside (the HO's private key, its exchange.toml,
a victim file) unchanged, byte for byte, inode and link count included;
nothing deleted (a planted entry is left where it was or moved aside as the
entry itself, with a ``.reason``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import paramiko
import pytest
from enginehelpers import Net, item_ids, make_net, reprice, seed_ho, seed_store, snapshot
from sshd import SftpHomes, SshdServer

from exchange.transport.sftp import SftpTransport
from exchange.transport.sftp.address import load_login_key
from exchange.transport.usb import TRANSFER_DIR, prepare_stick

CLI_SECONDS = 120  # one CLI run on a loaded CI machine; a FIFO that blocked would never end
T = TypeVar("T")


# ---------------------------------------------------------------- helpers

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``exchange ARGS`` in its own process, bounded (TimeoutExpired fails the test: no hang)."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "250"}
    env.pop("EXCHANGE_HOME", None)
    env.pop("EXCHANGE_CRASH_AT", None)
    return subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, env=env,
                          timeout=CLI_SECONDS)


def bounded(fn: Callable[[], T], seconds: float = 60.0) -> T:
    """Run ``fn`` in a thread; fail (rather than hang) when it has not returned after ``seconds``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test below
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds}s: something blocked (a FIFO opened?)"
    if "error" in out:
        raise out["error"]
    value: T = out["value"]
    return value


class Outside:
    """Files outside every exchange folder; ``unchanged()`` checks content, inode, links and mtime."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.before = {p: self._state(p) for p in paths}

    @staticmethod
    def _state(p: Path) -> tuple[str, int, int, int, int]:
        st = os.lstat(p)
        return hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_mode

    def assert_unchanged(self) -> None:
        for p in self.paths:
            assert self._state(p) == self.before[p], f"{p} was changed"

    def inodes(self) -> set[int]:
        return {os.lstat(p).st_ino for p in self.paths}


def victim(folder: Path, name: str = "victim.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(b"an HO file nobody may change\n" * 100)
    return p


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def kind(p: Path) -> str:
    mode = os.lstat(p).st_mode
    return ("link" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode) else "dir" if stat.S_ISDIR(mode)
            else "file" if stat.S_ISREG(mode) else "other")


def no_copy_of(folder: Path, outside: Outside) -> None:
    """Nothing under ``folder`` is a regular file sharing an inode (a hard link) with the outside files."""
    inodes = outside.inodes()
    for p in folder.rglob("*"):
        if kind(p) == "file" and p not in outside.paths:
            assert os.lstat(p).st_ino not in inodes, f"{p} is a hard link to a file outside"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = make_net(tmp_path / "net")
    yield n
    n.dispose()


def ho_secrets(net: Net) -> Outside:
    home = net.ho.cfg.home
    return Outside(home / "keys" / "node_ed25519", home / "exchange.toml")


# ---------------------------------------------------------------- the inbox

def test_links_in_the_inbox_are_set_aside_as_links_never_read(net: Net) -> None:
    ho = net.ho
    key, toml = ho.cfg.home / "keys" / "node_ed25519", ho.cfg.home / "exchange.toml"
    outside = ho_secrets(net)
    os.symlink(toml, ho.cfg.inbox / "s001.ho.0000000001.bundle")
    os.symlink(key, ho.cfg.inbox / "s001.ho.0000000001.ack")
    os.symlink(key, ho.cfg.inbox / "s001.ho.heartbeat")  # heartbeats arrive the same way (FORMAT.md section 12)
    before = snapshot(ho)
    p = cli("import", "--home", str(ho.cfg.home), "--json")
    assert p.returncode == 10, p.stderr  # quarantined: exit 10 (docs/SERVICE.md, Exit codes)
    outs = {o["file"]: o for o in json.loads(p.stdout)}
    for name in ("s001.ho.0000000001.bundle", "s001.ho.0000000001.ack"):
        assert outs[name]["status"] == "QUARANTINED"
        assert f"{name} in {ho.cfg.inbox} is a symbolic link, not a regular file" in outs[name]["reason"]
        q = ho.cfg.quarantine / name
        assert kind(q) == "link", "the link itself is set aside, never a copy of its target"
        assert os.readlink(q) in (str(toml), str(key))
        reason = json.loads((ho.cfg.quarantine / f"{name}.reason").read_text())
        assert reason["file"] == name and "symbolic link" in reason["reason"]
        assert reason["error"] == "NotRegularFileError"
    hb = ho.cfg.quarantine / "s001.ho.heartbeat"
    assert kind(hb) == "link" and os.readlink(hb) == str(key), "a heartbeat link is set aside as a link, never read"
    assert "symbolic link" in json.loads((ho.cfg.quarantine / "s001.ho.heartbeat.reason").read_text())["reason"]
    assert not list(ho.cfg.inbox.iterdir())
    outside.assert_unchanged()
    no_copy_of(ho.cfg.home / "quarantine", outside)
    assert snapshot(ho) == before


def test_a_dangling_link_in_the_inbox_is_set_aside_too(net: Net) -> None:
    """A link to nothing (its target removed, or never there) is quarantined as a link, not left to linger."""
    ho = net.ho
    name = "s001.ho.0000000001.bundle"
    os.symlink(ho.cfg.home / "no-such-file", ho.cfg.inbox / name)
    before = snapshot(ho)
    p = cli("import", "--home", str(ho.cfg.home), "--json")
    assert p.returncode == 10, p.stderr  # quarantined: exit 10 (docs/SERVICE.md, Exit codes)
    outs = {o["file"]: o for o in json.loads(p.stdout)}
    assert outs[name]["status"] == "QUARANTINED" and "symbolic link" in outs[name]["reason"]
    assert kind(ho.cfg.quarantine / name) == "link"
    assert not (ho.cfg.home / "no-such-file").exists(), "nothing was created through the link"
    assert not list(ho.cfg.inbox.iterdir())
    assert snapshot(ho) == before


def test_fifo_and_folder_in_the_inbox_are_set_aside_without_blocking(net: Net) -> None:
    ho = net.ho
    os.mkfifo(ho.cfg.inbox / "s001.ho.0000000001.bundle")
    os.mkfifo(ho.cfg.inbox / "s001.ho.0000000002.ack")
    os.mkfifo(ho.cfg.inbox / "s001.ho.heartbeat")
    folder = ho.cfg.inbox / "s002.ho.0000000001.bundle"
    folder.mkdir()
    (folder / "inside.txt").write_text("kept")
    before = snapshot(ho)
    p = cli("import", "--home", str(ho.cfg.home))  # bounded: a FIFO opened for reading would block forever
    assert p.returncode == 10, p.stderr  # quarantined: exit 10 (docs/SERVICE.md, Exit codes)
    assert "s001.ho.0000000001.bundle: QUARANTINED" in p.stdout and "is a FIFO (named pipe)" in p.stdout
    assert "s002.ho.0000000001.bundle: QUARANTINED" in p.stdout and "is a folder" in p.stdout
    q = ho.cfg.quarantine
    assert kind(q / "s001.ho.0000000001.bundle") == kind(q / "s001.ho.0000000002.ack") == "fifo"
    assert kind(q / "s001.ho.heartbeat") == "fifo"  # a heartbeat FIFO neither blocks nor is read
    assert (q / "s002.ho.0000000001.bundle" / "inside.txt").read_text() == "kept"  # moved whole, not emptied
    for name in ("s001.ho.0000000001.bundle", "s001.ho.0000000002.ack", "s002.ho.0000000001.bundle"):
        assert json.loads((q / f"{name}.reason").read_text())["file"] == name
    assert not list(ho.cfg.inbox.iterdir())
    assert snapshot(ho) == before


# ---------------------------------------------------------------- the drop folder

def drop_folder(root: Path) -> Path:
    for sub in ("up", "down"):
        (root / sub).mkdir(parents=True)
    return root


def test_drop_folder_fifo_links_and_planted_part_are_refused(net: Net, tmp_path: Path) -> None:
    """The HO beside its server (``drop:``): the store planted a FIFO and a link among its uploads, and
    links at the names the HO writes in ``down/`` (the .part, a final name, node-ho.json.part)."""
    seed_ho(net)
    ho = net.ho
    root = drop_folder(tmp_path / "srv" / "s001")
    up, down = root / "up", root / "down"
    outside = ho_secrets(net)
    victims = Outside(*(victim(tmp_path / "outside", f"v{i}.txt") for i in range(3)))
    os.mkfifo(up / "s001.ho.0000000001.bundle")
    os.symlink(ho.cfg.home / "keys" / "node_ed25519", up / "s001.ho.0000000002.bundle")
    os.symlink(victims.paths[0], down / "ho.s001.0000000001.bundle.part")
    os.symlink(victims.paths[1], down / "ho.s002.0000000001.bundle")
    os.symlink(victims.paths[2], down / "node-ho.json.part")
    before = snapshot(ho)
    p = cli("sync", "--home", str(ho.cfg.home), "--via", f"drop:{root}")
    assert p.returncode == 30, p.stdout + p.stderr
    assert f"s001.ho.0000000001.bundle in {up} is a FIFO (named pipe), not a regular file" in p.stdout
    assert f"s001.ho.0000000002.bundle in {up} is a symbolic link, not a regular file" in p.stdout
    outside.assert_unchanged()
    victims.assert_unchanged()
    # the planted entries the HO only reads are left where they are, not deleted
    assert kind(up / "s001.ho.0000000001.bundle") == "fifo" and kind(up / "s001.ho.0000000002.bundle") == "link"
    assert not list(ho.cfg.inbox.iterdir()) and not list(ho.cfg.quarantine.iterdir())
    # what the HO wrote is the real thing, in real files, links replaced as entries
    for name in ("ho.s001.0000000001.bundle", "ho.s002.0000000001.bundle", "node-ho.json"):
        assert kind(down / name) == "file", name
    for name in ("ho.s001.0000000001.bundle", "ho.s002.0000000001.bundle"):
        assert digest(down / name) == digest(ho.cfg.archive_sent / name)
    assert not [n for n in os.listdir(down) if n.endswith(".part")]
    no_copy_of(ho.cfg.home, outside)
    assert {k: v for k, v in snapshot(ho).items() if k.startswith("sales")} == \
        {k: v for k, v in before.items() if k.startswith("sales")}  # nothing applied


def test_drop_folder_that_is_a_link_is_refused(net: Net, tmp_path: Path) -> None:
    """``up/`` replaced by a link into the HO's own files: not a file there is taken or removed."""
    ho = net.ho
    root = tmp_path / "srv" / "s001"
    (root / "down").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    taken = victim(elsewhere, "s001.ho.0000000001.bundle")
    part = victim(elsewhere, "s001.ho.0000000002.bundle.part")
    keep = Outside(taken, part)
    os.symlink(elsewhere, root / "up")
    p = cli("sync", "--home", str(ho.cfg.home), "--via", f"drop:{root}")
    assert p.returncode == 17  # NotRegularFileError: not a regular folder where one was expected
    assert f"folder {root / 'up'} is a symbolic link, not a folder" in p.stdout
    keep.assert_unchanged()
    assert not list(ho.cfg.inbox.iterdir())


# ---------------------------------------------------------------- the stick

@pytest.fixture
def stick(tmp_path: Path) -> Path:
    root = tmp_path / "STICK"
    root.mkdir()
    prepare_stick(root)
    return root


def test_stick_fifos_links_and_planted_part(net: Net, stick: Path, tmp_path: Path) -> None:
    """A stick written by a store: a FIFO and a link for the HO, a FIFO as stick.json, a .part link in
    the folder the HO writes to. The visit ends, refuses them, and touches nothing they point to."""
    seed_ho(net)
    ho = net.ho
    t = stick / TRANSFER_DIR
    (t / "ho").mkdir()
    (t / "s001").mkdir()
    outside = ho_secrets(net)
    victims = Outside(victim(tmp_path / "outside"))
    os.mkfifo(t / "ho" / "s001.ho.0000000001.bundle")
    os.symlink(ho.cfg.home / "exchange.toml", t / "ho" / "s001.ho.0000000002.bundle")
    os.symlink(victims.paths[0], t / "s001" / "ho.s001.0000000001.bundle.part")
    (t / "stick.json").unlink()
    os.mkfifo(t / "stick.json")
    p = cli("usb", "sync", str(stick), "--home", str(ho.cfg.home), "--json")
    assert p.returncode == 30, p.stdout + p.stderr
    rec = json.loads(p.stdout)
    errors = "\n".join(rec["errors"])
    assert "s001.ho.0000000001.bundle" in errors and "is a FIFO (named pipe), not a regular file" in errors
    assert "s001.ho.0000000002.bundle" in errors and "is a symbolic link, not a regular file" in errors
    assert rec["taken"] == [] and rec["results"] == {}
    outside.assert_unchanged()
    victims.assert_unchanged()
    assert kind(t / "ho" / "s001.ho.0000000001.bundle") == "fifo"  # refused, left, not deleted
    assert kind(t / "ho" / "s001.ho.0000000002.bundle") == "link"
    assert kind(t / "stick.json") == "fifo"
    put = t / "s001" / "ho.s001.0000000001.bundle"
    assert kind(put) == "file" and digest(put) == digest(ho.cfg.archive_sent / put.name)
    assert not (t / "s001" / "ho.s001.0000000001.bundle.part").exists()
    no_copy_of(ho.cfg.home, outside)


def test_stick_whose_transfer_folder_is_a_link_is_refused(net: Net, tmp_path: Path) -> None:
    seed_ho(net)
    elsewhere = tmp_path / "ho-files"
    files = [victim(elsewhere / "ho", "s001.ho.0000000001.bundle.part"),
             victim(elsewhere / "ho", "s001.ho.0000000001.bundle"),
             victim(elsewhere / "s001", "ho.s001.0000000001.bundle.part")]
    keep = Outside(*files)
    stick = tmp_path / "STICK"
    stick.mkdir()
    os.symlink(elsewhere, stick / TRANSFER_DIR)
    p = cli("usb", "sync", str(stick), "--home", str(net.ho.cfg.home))
    assert p.returncode == 17, p.stdout + p.stderr
    assert f"{stick / TRANSFER_DIR} is a symbolic link, not a folder: this stick is refused" in p.stdout + p.stderr
    keep.assert_unchanged()
    assert sorted(str(f.relative_to(elsewhere)) for f in elsewhere.rglob("*") if f.is_file()) == \
        sorted(str(f.relative_to(elsewhere)) for f in files)
    assert not list(net.ho.cfg.inbox.iterdir())


def test_stick_cleanup_deletes_nothing_outside(net: Net, stick: Path, tmp_path: Path) -> None:
    """A box on the stick that links out, and a .part link to an outside file: clean-up stays inside."""
    seed_ho(net)
    t = stick / TRANSFER_DIR
    elsewhere = tmp_path / "ho-archive"
    outside_files = [victim(elsewhere, "s001.ho.0000000001.bundle.part"),
                     victim(elsewhere, "s001.ho.0000000003.bundle")]
    os.symlink(elsewhere, t / "ho")
    (t / "s001").mkdir()
    target = victim(tmp_path / "outside")
    os.symlink(target, t / "s001" / "ho.s001.0000000007.bundle.part")
    keep = Outside(*outside_files, target)
    p = cli("usb", "sync", str(stick), "--home", str(net.ho.cfg.home), "--json")
    assert p.returncode == 30, p.stdout + p.stderr
    rec = json.loads(p.stdout)
    assert any(f"folder {t / 'ho'} is a symbolic link, not a folder" in e for e in rec["errors"]), rec["errors"]
    keep.assert_unchanged()
    assert sorted(os.listdir(elsewhere)) == sorted(f.name for f in outside_files)
    # the .part link itself (an entry inside the stick's folder) was cleaned up; its target was not touched
    assert rec["cleaned"] == ["s001/ho.s001.0000000007.bundle.part"]
    assert not os.path.lexists(t / "s001" / "ho.s001.0000000007.bundle.part")
    assert not any(name.startswith("ho/") for name in rec["left"])  # a linked folder's names stay off the receipt
    assert not list(net.ho.cfg.inbox.iterdir())


# ---------------------------------------------------------------- the outbox and the archive

def test_links_planted_in_outbox_and_archive_are_never_written_through(net: Net, tmp_path: Path) -> None:
    """Defence in depth: links at the names the HO itself writes (a bundle's and an ack's .part, the
    archived copies) are replaced or stepped around, never written through."""
    seed_ho(net)
    net.settle()  # the store has the items it sells
    seed_store(net, "s001", sales=3)
    ho, s001 = net.ho, net.store("s001")
    reprice(ho, item_ids(net)[:3])  # the HO's next bundle for s001: seq 2
    victims = Outside(*(victim(tmp_path / "outside", f"v{i}.txt") for i in range(4)))
    os.symlink(victims.paths[0], ho.cfg.outbox / "ho.s001.0000000002.bundle.part")
    os.symlink(victims.paths[1], ho.cfg.outbox / "ho.s001.0000000001.ack.part")
    os.symlink(victims.paths[2], ho.cfg.archive_sent / "ho.s001.0000000002.bundle")
    os.symlink(victims.paths[3], ho.cfg.archive_received / "s001.ho.0000000001.bundle")
    p = cli("sync", "--home", str(s001.cfg.home))
    assert p.returncode == 0, p.stdout + p.stderr
    p = cli("sync", "--home", str(ho.cfg.home))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "applied 1" in p.stdout
    victims.assert_unchanged()
    sent = ho.cfg.archive_sent / "ho.s001.0000000002.bundle"
    assert kind(sent) == "file" and digest(sent) == digest(net.transfer / "s001" / sent.name)
    ack = net.transfer / "s001" / "ho.s001.0000000001.ack"
    assert kind(ack) == "file"
    stamped = [n for n in os.listdir(ho.cfg.archive_received) if n.startswith("s001.ho.0000000001.bundle.")]
    assert kind(ho.cfg.archive_received / "s001.ho.0000000001.bundle") == "link" and len(stamped) == 1


# ---------------------------------------------------------------- SFTP (real sshd)

def store_sftp(srv: SshdServer, homes: SftpHomes, store: str = "s001") -> paramiko.SSHClient:
    """A plain SFTP login as the store, with its own key: what a rogue store can do with its account."""
    home = homes.stores[store]
    client = paramiko.SSHClient()
    client.load_host_keys(str(home / "known_hosts"))
    client.connect("127.0.0.1", srv.port, username=srv.accounts[store].user, pkey=load_login_key(home),
                   allow_agent=False, look_for_keys=False, timeout=30)
    return client


def ho_transport(srv: SshdServer, homes: SftpHomes, store: str = "s001") -> SftpTransport:
    return SftpTransport.from_address(srv.ho_address(store), home=homes.ho, me="ho")


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_sftp_remote_part_that_is_a_link_is_not_written_through(
        sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path, sftp_path: str) -> None:
    """The store makes ``down/<bundle>.part`` and ``down/node-ho.json.part`` symlinks to absolute paths:
    the HO logs in without a chroot, so an open through them would write the HO's own files (as root)."""
    target, info_target = victim(tmp_path / "outside"), victim(tmp_path / "outside", "other.txt")
    keep = Outside(target, info_target)
    src = random_file(tmp_path / "ho.s001.0000000001.bundle", (3 << 20) + 11)
    with store_sftp(sshd, sftp_homes) as client:
        sftp = client.open_sftp()
        sftp.symlink(str(target), "/down/ho.s001.0000000001.bundle.part")
        sftp.symlink(str(info_target), "/down/node-ho.json.part")
        sftp.close()
    down = sshd.accounts["s001"].folder / "down"
    assert kind(down / "ho.s001.0000000001.bundle.part") == "link"
    with ho_transport(sshd, sftp_homes) as t:
        assert bounded(lambda: t.push([src], "s001")) == [src]
    keep.assert_unchanged()
    assert kind(down / src.name) == "file" and digest(down / src.name) == digest(src)
    assert kind(down / "node-ho.json") == "file"  # the HO's info for the store's doctor, written fresh
    assert not [n for n in os.listdir(down) if n.endswith(".part")]


def test_sftp_remote_part_with_another_prefix_is_not_continued(
        sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        sftp_path: str) -> None:
    """A ``.part`` whose last MiB matches ours but whose first byte does not: checking the tail alone
    would continue it and publish a file the HO never wrote. The whole prefix is hashed."""
    data = os.urandom(3 << 20)
    src = tmp_path / "ho.s001.0000000001.bundle"
    src.write_bytes(data)
    forged = bytes([data[0] ^ 0xFF]) + data[1:(5 << 19)]  # 2.5 MiB: same tail, other head
    with store_sftp(sshd, sftp_homes) as client:
        sftp = client.open_sftp()
        with sftp.open("/down/ho.s001.0000000001.bundle.part", "wb") as f:
            f.write(forged)
        sftp.close()
    with caplog.at_level(logging.INFO, logger="exchange.transport.sftp"):
        with ho_transport(sshd, sftp_homes) as t:
            assert bounded(lambda: t.push([src], "s001")) == [src]
    assert "restarting upload of ho.s001.0000000001.bundle.part: the partial copy on the server differs" \
        in caplog.text
    assert "resuming upload" not in caplog.text
    down = sshd.accounts["s001"].folder / "down"
    assert digest(down / src.name) == digest(src)
    assert not os.path.lexists(down / (src.name + ".part"))


def test_sftp_fifo_and_link_among_uploads_are_refused(
        sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path, sftp_path: str) -> None:
    """In ``up/``: a FIFO (opening it would block the server's open for ever) and a symlink the store
    made to an HO file; beside them a genuine file. Only the genuine file is taken."""
    up = sshd.accounts["s001"].folder / "up"
    target = victim(tmp_path / "outside")
    keep = Outside(target)
    fifo, info = up / "s001.ho.0000000001.bundle", up / "node-s001.json"
    for f in (fifo, info):  # FIFOs on the server's disk (made by whoever has a shell there)
        os.mkfifo(f)
        os.chown(f, os.stat(up).st_uid, os.stat(up).st_gid)
    with store_sftp(sshd, sftp_homes) as client:
        sftp = client.open_sftp()
        sftp.symlink(str(target), "/up/s001.ho.0000000002.bundle")
        sftp.close()
    genuine = random_file(up / "s001.ho.0000000003.bundle", 70_001)
    want = digest(genuine)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with ho_transport(sshd, sftp_homes) as t:
        got = bounded(lambda: t.pull("ho", inbox))
        refused = "\n".join(t.refused)
        assert "peer_info" not in bounded(lambda: t.probe("ho", "s001"))  # the doctor's read: no hang either
    assert got == [inbox / "s001.ho.0000000003.bundle"] and digest(got[0]) == want
    assert "s001.ho.0000000001.bundle on the server is a FIFO (named pipe), not a regular file" in refused
    assert "s001.ho.0000000002.bundle on the server is a symbolic link, not a regular file" in refused
    assert sorted(os.listdir(inbox)) == ["s001.ho.0000000003.bundle"]
    assert kind(fifo) == "fifo" and kind(up / "s001.ho.0000000002.bundle") == "link"  # left, not deleted
    keep.assert_unchanged()
    for f in (fifo, info, up / "s001.ho.0000000002.bundle"):
        os.unlink(f)
