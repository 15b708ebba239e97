"""Full disks and interrupted writes: nothing half-written becomes visible, the next run completes.

A full disk is a small tmpfs mounted where the file goes (the HO's outbox while
it seals bundles, a store's outbox while it writes acks, the folder holding a
store's SQLite database), filled up with a filler file. Mounting needs root; on
a developer machine without it the tests skip, under CI=true (or with
EXCHANGE_TEST_INJECT_ENOSPC=1) they fall back to fault injection instead: a
write budget on the files exchange.wire.bundle opens (bundles, acks) or SQLite's own
``max_page_count`` (a real SQLITE_FULL from the database engine).

Each case checks, while the disk is full: every complete-named file is whole
(a bundle verifies and matches the row recorded for it, an ack verifies), the
rest is ``*.part`` or nothing, the database passes ``PRAGMA integrity_check``
and no bundle was marked FAILED or answered REJECTED because of the disk; then,
with space freed, ordinary syncs bring every bundle to PROCESSED and the two
sides reconcile (documents row by row, control totals, chains).

The last tests kill ``exchange archive prune`` right after a checkpoint is durable
(faults point ``prune.checkpointed``, a real SIGKILL) or in the middle of the
deletions it records (in process), and check the archive still verifies and the
next prune completes the deletions.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from enginehelpers import Net, check_net, item_ids, make_net, reprice, seed_ho, seed_store
from sqlalchemy import event, select

from exchange.audit.prune import read_checkpoint
from exchange.cli import main
from exchange import files
from exchange.database.tables import xchg_received, xchg_sent
from exchange.errors import DatabaseError
from exchange.faults import PRUNE_POINTS
from exchange.node.home import Node
from exchange.receive.importer import import_inbox
from exchange.service import status
from exchange.service.sync import pull, sync
from exchange.wire import bundle
from exchange.wire.bundle import BundleReader, read_ack
from exchange.wire.formats import CHECKPOINTS_DIR, PART_SUFFIX, is_exchange_file

CI = os.environ.get("CI", "").lower() == "true"
FORCE_INJECT = os.environ.get("EXCHANGE_TEST_INJECT_ENOSPC") == "1"


# ---------------------------------------------------------------- small filesystems

class _Budgeted:
    """A file whose writes fail with ENOSPC once the shared budget is spent (fault injection)."""

    def __init__(self, f: Any, space: SmallFs) -> None:
        self._f, self._space = f, space

    def write(self, data: bytes) -> int:
        if len(data) > self._space.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._space.budget -= len(data)
        return int(self._f.write(data))

    def __enter__(self) -> _Budgeted:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class SmallFs:
    """A folder on a small filesystem that can be filled and freed again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch
        self.mode = "injected" if FORCE_INJECT else "tmpfs"
        self.mounts: list[Path] = []
        self.folders: list[Path] = []
        self.budget = 1 << 62
        self.engines: list[tuple[Any, int]] = []  # (engine, max pages) for the injected database

    def attach(self, folder: Path, size: str = "4m") -> None:
        """Put ``folder`` (existing, empty) on a small filesystem."""
        if self.mode == "tmpfs":
            try:
                res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                     capture_output=True, text=True, timeout=30)
                why = None if res.returncode == 0 else (res.stderr.strip() or f"mount exited {res.returncode}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                why = str(exc)
            if why is None:
                self.mounts.append(folder)
                return
            if not CI:
                pytest.skip(f"cannot mount a small tmpfs here ({why}); CI=true injects ENOSPC instead")
            self.mode = "injected"  # CI without mount rights: fault injection instead of a real full disk
        self.folders.append(folder)
        if len(self.folders) == 1:
            real_open = builtins.open

            def budgeted_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
                f = real_open(file, mode, *args, **kwargs)
                if any(c in mode for c in "wax") and any(
                        Path(file).resolve().is_relative_to(d.resolve()) for d in self.folders):
                    return _Budgeted(f, self)
                return f
            self.mp.setattr(bundle, "open", budgeted_open, raising=False)

    def attach_db(self, node: Node) -> None:
        """Injected mode only: limit the node's SQLite database with ``max_page_count``."""
        self.engines.append((node.engine, 1 << 30))
        engine = node.engine

        @event.listens_for(engine, "connect")
        def _limit(dbapi_conn: Any, _rec: Any) -> None:
            pages = next(p for e, p in self.engines if e is engine)
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")
        engine.dispose()

    def fill(self, leave: int) -> None:
        """Leave about ``leave`` bytes free."""
        if self.mode == "injected":
            self.budget = leave
            for i, (engine, _p) in enumerate(self.engines):
                with engine.connect() as conn:
                    used = int(conn.exec_driver_sql("PRAGMA page_count").scalar() or 0)
                # SQLite's pages are not a disk's bytes (free pages are reused, no WAL/-shm counted):
                # about one page per 40 KB asked keeps the three sizes of the tests distinct
                self.engines[i] = (engine, used + leave // 40_000)
                engine.dispose()
            return
        for m in self.mounts:
            st = os.statvfs(m)
            free = st.f_bavail * st.f_frsize
            with open(m / "filler", "wb") as f:
                f.truncate(0)
                left = max(free - leave, 0)
                chunk = b"\xa5" * (1 << 20)
                while left > 0:
                    n = min(left, len(chunk))
                    try:
                        f.write(chunk[:n])
                        f.flush()
                    except OSError:
                        break
                    left -= n

    def free(self) -> None:
        if self.mode == "injected":
            self.budget = 1 << 62
            for i, (engine, _p) in enumerate(self.engines):
                self.engines[i] = (engine, 1 << 30)
                engine.dispose()
            return
        for m in self.mounts:
            (m / "filler").unlink(missing_ok=True)

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=30)
        self.mounts.clear()


@pytest.fixture
def small_fs(monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallFs]:
    fs = SmallFs(monkeypatch)
    try:
        yield fs
    finally:
        fs.cleanup()


# ---------------------------------------------------------------- checks

def visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


def check_outbox(node: Node) -> list[str]:
    """Every complete-named file in the outbox is whole; the rest is .part; returns the names."""
    names = visible_files(node.cfg.outbox)
    with node.engine.connect() as conn:
        sent = {r.file_name: r.file_sha256 for r in conn.execute(select(xchg_sent))}
    for name in names:
        path = node.cfg.outbox / name
        assert is_exchange_file(name) or name.endswith(PART_SUFFIX), f"unexpected file {name} in the outbox"
        if name.endswith(".bundle"):
            with BundleReader(path) as r:
                r.verify_signature(node.trust)
                assert r.check_payload_hash() == sent.get(name), f"{name}: not the bundle recorded as sent"
        elif name.endswith(".ack"):
            read_ack(path, node.trust, me=None)
    return names


def integrity(db: str) -> str:
    con = sqlite3.connect(db.removeprefix("sqlite:///"))
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


def no_disk_failures(node: Node) -> None:
    """No bundle was FAILED (nor answered REJECTED) because the disk was full."""
    with node.engine.connect() as conn:
        bad = [(r.seq, r.status, r.reason) for r in conn.execute(select(xchg_received))
               if r.status not in ("APPLIED", "WAITING")]
    assert not bad, bad
    for p in node.cfg.outbox.glob("*.ack"):
        assert read_ack(p, node.trust, me=None).result == "APPLIED", p.name
    assert not any(node.cfg.quarantine.iterdir()), list(node.cfg.quarantine.iterdir())


def settle_and_check(net: Net) -> None:
    net.reopen()
    net.settle(max_rounds=8)
    c = check_net(net)
    assert c.problems == [] and c.lost == 0 and c.applied_twice == 0, c.problems
    assert all(r.status == "PROCESSED" for n in net.nodes for r in status.sent(n))


def _net(root: Path, items: int = 12) -> Net:
    net = make_net(root, stores=("s001",), max_rows={"ho": 4, "s001": 4})
    seed_ho(net, items=items)
    return net


# ---------------------------------------------------------------- the cases

def test_export_on_a_full_disk_leaves_no_partial_bundle_and_completes_later(
        tmp_path: Path, small_fs: SmallFs) -> None:
    net = _net(tmp_path / "net")
    ho = net.ho
    small_fs.attach(ho.cfg.outbox, "4m")
    small_fs.fill(leave=60_000)  # room for a bundle or two of ~12 KB (sealing needs about twice that)
    rep = sync(ho)  # no exception: the failure is reported
    assert any("No space left" in e for e in rep.errors), rep.errors
    names = check_outbox(ho)
    assert not [n for n in names if n.startswith(".seal-")], names  # scratch space removed
    assert integrity(ho.cfg.database) == "ok"
    with ho.engine.connect() as conn:  # every recorded bundle exists whole somewhere
        for r in conn.execute(select(xchg_sent)):
            where = [p for p in (ho.cfg.outbox / r.file_name, ho.cfg.archive_sent / r.file_name) if p.exists()]
            assert where and files.sha256_file(where[0]) == r.file_sha256, r.file_name
    exported = len(status.sent(ho))
    small_fs.free()
    settle_and_check(net)
    assert len(status.sent(net.ho)) > exported  # the rest went out after the space came back


def test_ack_on_a_full_disk_is_written_by_the_next_run(tmp_path: Path, small_fs: SmallFs) -> None:
    net = _net(tmp_path / "net", items=6)
    sync(net.ho)
    st = net.store("s001")
    small_fs.attach(st.cfg.outbox, "1m")
    small_fs.fill(leave=0)
    rep = sync(st)
    assert any("No space left" in e for e in rep.errors), rep.errors
    names = check_outbox(st)
    assert not [n for n in names if n.endswith(".ack")], names  # nothing could be written
    assert integrity(st.cfg.database) == "ok"
    no_disk_failures(st)
    with st.engine.connect() as conn:  # the first bundle applied; its ack waits in the database
        got = {int(r.seq): (r.status, r.ack is not None) for r in conn.execute(select(xchg_received))}
    assert got.get(1) == ("APPLIED", True), got
    assert (st.cfg.inbox / "ho.s001.0000000001.bundle").exists()  # kept until its ack is out
    small_fs.free()
    settle_and_check(net)


def _store_db_on_small_disk(net: Net, small_fs: SmallFs, folder: Path) -> Node:
    """Move the store's SQLite database onto a small filesystem (or limit it, when injecting)."""
    st = net.store("s001")
    folder.mkdir()
    small_fs.attach(folder, "4m")
    st.engine.dispose()
    if small_fs.mode == "injected":
        small_fs.attach_db(st)
        return st
    src, dst = sqlite3.connect(st.cfg.home / "exchange.db"), sqlite3.connect(folder / "s001.db")
    try:
        src.backup(dst)  # WAL-safe copy
    finally:
        src.close()
        dst.close()
    st.cfg.database = f"sqlite:///{folder / 's001.db'}"
    st.cfg.save()
    net.reopen()
    return net.store("s001")


@pytest.mark.parametrize("leave", [16_000, 60_000, 150_000])
def test_database_on_a_full_disk_fails_no_bundle_and_recovers(tmp_path: Path, small_fs: SmallFs,
                                                               leave: int) -> None:
    """16 KB: SQLite cannot even open its WAL; 60 KB: the first bundle's transaction does not fit;
    150 KB: the first applies, the second does not. Never FAILED nor REJECTED for a full disk."""
    net = _net(tmp_path / "net")
    st = _store_db_on_small_disk(net, small_fs, tmp_path / "dbdisk")
    assert sync(net.ho).errors == []
    small_fs.fill(leave=leave)
    pull(st)
    with pytest.raises(DatabaseError, match=r"full|disk I/O") as info:
        import_inbox(st)
    assert "Free disk space" in info.value.hint
    small_fs.free()  # (a database on a full disk cannot even be read back consistently while full)
    assert integrity(st.cfg.database) == "ok"
    no_disk_failures(st)
    assert list(st.cfg.inbox.glob("*.bundle")), "the bundles not applied stay in the inbox"
    settle_and_check(net)


def test_sync_reports_a_full_database(tmp_path: Path, small_fs: SmallFs) -> None:
    net = _net(tmp_path / "net")
    st = _store_db_on_small_disk(net, small_fs, tmp_path / "dbdisk")
    if small_fs.mode == "injected":
        pytest.skip("needs a really full disk (SQLite unable to open its WAL), not a page limit")
    assert sync(net.ho).errors == []
    small_fs.fill(leave=16_000)
    try:
        rep = sync(st)
    finally:
        small_fs.free()
    assert rep.errors and all("database" in e.lower() or "import" in e for e in rep.errors), rep.errors


# ---------------------------------------------------------------- prune killed at its checkpoint

def _archive_files(archive: Path) -> set[str]:
    return {p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file()}


def _verify(home: Path) -> tuple[int, dict[str, Any]]:
    res = CliRunner().invoke(main, ["audit", "verify", "--home", str(home), "--json"])
    return res.exit_code, json.loads(res.stdout)


def _prune(home: Path, crash: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("EXCHANGE_CRASH_AT", None)
    if crash:
        env["EXCHANGE_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "exchange", "archive", "prune", "--home", str(home),
                           "--older-than", "0", "--json"], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def pruned_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HO and a store after several rounds both ways (several bundles per stream), settled."""
    root = tmp_path_factory.mktemp("prune")
    net = make_net(root / "net", stores=("s001",), max_rows={"ho": 4, "s001": 3})
    seed_ho(net, items=8)
    net.settle()
    seed_store(net, "s001", sales=5)
    net.settle()
    reprice(net.ho, item_ids(net)[:5], "0.50")
    seed_store(net, "s001", sales=4, seed=3)
    net.settle()
    net.dispose()
    time.sleep(1.1)  # prune --older-than 0 takes what was created before this second
    return root / "net"


@pytest.mark.parametrize("spec", [f"{p}:{n}" for p in PRUNE_POINTS for n in (1, 2)])
def test_prune_killed_after_its_checkpoint_recovers(pruned_world: Path, tmp_path: Path, spec: str) -> None:
    net_dir = tmp_path / "net"
    shutil.copytree(pruned_world, net_dir, symlinks=True)
    home = net_dir / "ho"
    for name in ("exchange.toml",):  # the copy's paths point at the copy
        text = (home / name).read_text().replace(str(pruned_world), str(net_dir))
        (home / name).write_text(text)
    archive = home / "archive"
    before = _archive_files(archive)
    trust = Node.open(home).trust

    p = _prune(home, spec)
    assert p.returncode == -9, f"prune was not killed at {spec}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    n = int(spec.split(":")[1])
    cps = sorted((archive / CHECKPOINTS_DIR).iterdir())
    assert [c.suffix for c in cps] == [".checkpoint"] * n, cps  # durable, complete, no .part
    killed = read_checkpoint(cps[-1], trust)  # the last one written: its files are all still there
    assert {r["path"] for r in killed.removed} <= _archive_files(archive)
    assert _archive_files(archive) >= before - {r["path"] for c in cps[:-1] for r in read_checkpoint(c, trust).removed}
    rc, report = _verify(home)  # the interrupted state verifies
    assert rc == 0, [f for s in report["streams"] for f in s["findings"]]

    p = _prune(home, None)  # the restart finishes the job
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert sum(len(s["finished"]) for s in rep["streams"]) >= len(killed.removed), rep
    left = _archive_files(archive)
    cps = sorted((archive / CHECKPOINTS_DIR).iterdir())
    assert len(cps) == len(rep["streams"]) and not [c for c in cps if c.suffix != ".checkpoint"]
    for cp in cps:
        c = read_checkpoint(cp, trust)
        gone = {r["path"] for r in c.removed}
        assert not gone & left, f"{cp.name}: recorded as removed but still there: {sorted(gone & left)}"
        newest = f"{c.sender}.{c.recipient}.{c.last_seq + 1:010d}.bundle"
        assert any(f.endswith(newest) for f in left), f"the newest bundle {newest} must be kept"
    rc, report = _verify(home)
    assert rc == 0, [f for s in report["streams"] for f in s["findings"]]
    assert all(s["pruned"] for s in report["streams"]), report["streams"]
    p = _prune(home, None)  # and a third run has nothing left to do
    assert p.returncode == 0 and json.loads(p.stdout)["removed"] == 0, p.stdout


class _Killed(BaseException):
    """Stands for SIGKILL inside one Python process: nothing after it runs."""


@pytest.mark.parametrize("keep", ["first", "half", "all-but-one"])
def test_prune_killed_while_deleting_is_finished(pruned_world: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, keep: str) -> None:
    """Killed in the middle of the deletions a checkpoint records (bundles go first, then acks):
    the next prune finishes them, whatever is left, and the archive verifies."""
    from exchange.audit import prune as prune_mod

    net_dir = tmp_path / "net"
    shutil.copytree(pruned_world, net_dir, symlinks=True)
    home = net_dir / "s001"
    (home / "exchange.toml").write_text((home / "exchange.toml").read_text().replace(str(pruned_world), str(net_dir)))
    node = Node.open(home)
    real_delete = prune_mod._delete

    def dies_midway(paths: Any) -> None:
        paths = list(paths)
        n = {"first": 1, "half": len(paths) // 2, "all-but-one": len(paths) - 1}[keep]
        real_delete(paths[:n])
        raise _Killed()

    monkeypatch.setattr(prune_mod, "_delete", dies_midway)
    with pytest.raises(_Killed):
        prune_mod.prune(home / "archive", node_id=node.id, role=node.cfg.role, key=node.signing_key,
                        trust=node.trust, older_than_days=0)
    monkeypatch.setattr(prune_mod, "_delete", real_delete)
    rc, report = _verify(home)
    assert rc == 0, [f for s in report["streams"] for f in s["findings"]]
    p = _prune(home, None)
    assert p.returncode == 0, p.stderr
    archive = home / "archive"
    left = _archive_files(archive)
    for cp in sorted((archive / CHECKPOINTS_DIR).iterdir()):
        gone = {r["path"] for r in read_checkpoint(cp, node.trust).removed}
        assert not gone & left, f"{cp.name}: recorded as removed but still there: {sorted(gone & left)}"
    rc, report = _verify(home)
    assert rc == 0, [f for s in report["streams"] for f in s["findings"]]
