"""`exchange run`: the watchdog importer, the schedule, the lock, signals, logs.

Each test runs the real service as a subprocess on real node homes built by
the demo (an HO and two stores exchanging through a folder).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from exchange.database.tables import xchg_received
from exchange.node.home import Node
from exchange.send.export import export_all, reload
from exchange.service.sync import sync

EXE = [sys.executable, "-m", "exchange"]




def wait_for(cond: object, timeout: float, step: float = 0.02) -> bool:
    """Poll ``cond()`` until true or ``timeout`` seconds pass (bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(step)
    return False


class Service:
    def __init__(self, home: Path, *args: str, run_args: tuple[str, ...] = ()) -> None:
        self.log = home / "service.log"
        self.proc = subprocess.Popen([*EXE, *args, "run", "--home", str(home), "--interval", "3600", *run_args],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self) -> None:
        assert wait_for(lambda: "sync:" in self.text() or self.proc.poll() is not None, 20), self.text()
        assert self.proc.poll() is None, self.text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def service_factory() -> Iterator[object]:
    started: list[Service] = []

    def start(home: Path, *args: str, run_args: tuple[str, ...] = ()) -> Service:
        s = Service(home, *args, run_args=run_args)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(timeout=10)


def new_bundles(homes: Path, n_rounds: int = 1) -> list[Path]:
    """Have the HO seal bundles for s001; return them (not delivered)."""
    ho = Node.open(homes / "ho")
    out = []
    for _ in range(n_rounds):
        reload(ho, "s001", ["item"])
        for e in export_all(ho):
            if e.peer == "s001":
                out.append(ho.cfg.outbox / e.file)
    return out


def deliver(bundle: Path, inbox: Path) -> None:
    """Copy as the transports do: write .part, then rename into place."""
    part = inbox / (bundle.name + ".part")
    shutil.copy(bundle, part)
    os.replace(part, inbox / bundle.name)


def received_status(home: Path, name: str) -> str | None:
    node = Node.open(home)
    with node.engine.connect() as conn:
        row = conn.execute(select(xchg_received.c.status).where(xchg_received.c.file_name == name)).first()
    node.engine.dispose()
    return row[0] if row else None


def test_file_landing_is_applied_promptly(homes: Path, service_factory: object) -> None:
    store = homes / "s001"
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    bundle = new_bundles(homes)[0]
    t0 = time.monotonic()
    deliver(bundle, store / "inbox")
    assert wait_for(lambda: (store / "archive" / "received" / bundle.name).exists(), 10), svc.text()
    latency = time.monotonic() - t0
    assert received_status(store, bundle.name) == "APPLIED"
    # the ack went back without waiting for the next scheduled sync
    assert wait_for(lambda: (homes / "transfer" / "ho" / f"s001.ho.{bundle.name.split('.')[2]}.ack").exists(), 10)
    assert f"{bundle.name} APPLIED" in svc.text()
    assert svc.stop() == 0
    print(f"watch-to-apply latency: {latency * 1000:.0f} ms")


def test_part_files_are_ignored_and_existing_files_processed_at_start(homes: Path, service_factory: object) -> None:
    store = homes / "s001"
    first, second = new_bundles(homes, 2)
    shutil.copy(first, store / "inbox" / first.name)  # there before the service starts
    part = store / "inbox" / (second.name + ".part")
    shutil.copy(second, part)  # an incomplete copy: must be left alone
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    assert wait_for(lambda: received_status(store, first.name) == "APPLIED", 10), svc.text()
    time.sleep(1.0)
    assert part.exists() and received_status(store, second.name) is None
    os.replace(part, store / "inbox" / second.name)
    assert wait_for(lambda: received_status(store, second.name) == "APPLIED", 10), svc.text()
    assert svc.stop() == 0


def test_second_service_on_one_home_is_refused(homes: Path, service_factory: object) -> None:
    store = homes / "s001"
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    second = subprocess.run([*EXE, "run", "--home", str(store)], capture_output=True, text=True, timeout=60)
    assert second.returncode == 50, second.stderr
    assert "another exchange process" in second.stderr and "Traceback" not in second.stderr
    assert svc.proc.poll() is None
    assert svc.stop() == 0


def test_sigterm_mid_cycle_leaves_a_consistent_state(homes: Path, service_factory: object) -> None:
    store = homes / "s001"
    bundles = new_bundles(homes, 6)
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    for b in bundles:
        deliver(b, store / "inbox")
    assert wait_for(lambda: "APPLIED" in svc.text(), 20), svc.text()
    assert svc.stop() == 0  # finished the step in progress, then stopped cleanly
    assert "stopped" in svc.text()
    # whatever was left is picked up by the next run; nothing is applied twice
    node = Node.open(store)
    sync(node)
    with node.engine.connect() as conn:
        rows = conn.execute(select(xchg_received.c.seq, xchg_received.c.status)
                            .where(xchg_received.c.peer == "ho").order_by(xchg_received.c.seq)).all()
    seqs = [int(r[0]) for r in rows]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(r[1] == "APPLIED" for r in rows)
    assert not [p for p in (store / "inbox").iterdir() if p.name.endswith(".bundle")]


def test_failing_sync_does_not_stop_the_service(homes: Path, service_factory: object) -> None:
    store = homes / "s001"
    blocker = homes / "not-a-folder"
    blocker.write_text("a file where the transfer folder should be")
    toml = store / "exchange.toml"
    toml.write_text(toml.read_text().replace(f"dir:{homes / 'transfer'}", f"dir:{blocker}"))
    svc = service_factory(store, "--log-json")  # type: ignore[operator]
    assert wait_for(lambda: "failed" in svc.text(), 20), svc.text()
    assert svc.proc.poll() is None  # still running
    bundle = new_bundles(homes)[0]
    deliver(bundle, store / "inbox")  # and still importing
    assert wait_for(lambda: received_status(store, bundle.name) == "APPLIED", 10), svc.text()
    assert svc.stop() == 0
    lines = [json.loads(line) for line in svc.text().splitlines() if line.startswith("{")]
    assert any(rec.get("status") == "APPLIED" and rec.get("file") == bundle.name for rec in lines)
    assert all({"time", "level", "message"} <= set(rec) for rec in lines)


def _children(pid: int) -> list[list[str]]:
    """The command lines of ``pid``'s child processes (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append((stat.parent / "cmdline").read_bytes().decode().split("\0")[:-1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return out


def test_workers_log_json_like_the_service(homes: Path, service_factory: object) -> None:
    """`exchange --log-json run --workers 3`: the worker processes write JSON lines too."""
    store = homes / "s001"
    svc = service_factory(store, "--log-json", run_args=("--workers", "3"))  # type: ignore[operator]
    svc.wait_started()
    assert wait_for(lambda: len([c for c in _children(svc.proc.pid) if "worker" in c]) == 2, 20), \
        _children(svc.proc.pid)
    workers = [c for c in _children(svc.proc.pid) if "worker" in c]
    assert all("--log-json" in c for c in workers), workers
    bundles = new_bundles(homes, 3)
    for b in bundles:
        deliver(b, store / "inbox")
    assert wait_for(lambda: all(received_status(store, b.name) == "APPLIED" for b in bundles), 30), svc.text()
    assert svc.stop() == 0
    lines = [line for line in svc.text().splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), svc.text()
