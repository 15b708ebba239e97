"""Several importer workers on one node: streams in parallel, each stream in order.

Coordination lives in the database, not in a home-made scheduler: on
PostgreSQL a session advisory lock per stream (``pg_try_advisory_lock``), so
workers on several hosts sharing one database and one drop never apply the
same stream at once; a killed worker's session ends, its lock is released and
its transaction rolled back, and the stream is picked up by the next worker.
On SQLite (one host) a lock file per stream does the same.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from exchange.node.home import Node

log = logging.getLogger(__name__)


@contextmanager
def try_lock(node: Node, name: str) -> Iterator[bool]:
    """Try to take the named lock for this node without waiting; yields whether we hold it."""
    if node.engine.dialect.name == "postgresql":
        with node.engine.connect() as conn:
            key = f"xchg:{node.id}:{name}"
            got = bool(conn.exec_driver_sql("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.exec_driver_sql("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
                    conn.commit()
        return
    lock = FileLock(str(node.cfg.home / f".lock-{name}"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _worker(home: str, index: int) -> list[dict[str, object]]:
    from exchange.receive.importer import import_inbox

    node = Node.open(home)
    outs = import_inbox(node, rotate=index)
    node.engine.dispose()
    return [o.__dict__ for o in outs]


def import_parallel(node: Node, workers: int) -> list[dict[str, object]]:
    """Run ``workers`` importer processes over the inbox; returns every outcome."""
    if workers <= 1:
        from exchange.receive.importer import import_inbox

        return [o.__dict__ for o in import_inbox(node)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        results = pool.starmap(_worker, [(str(node.cfg.home), i) for i in range(workers)])
    return [o for r in results for o in r]


def worker_loop(home: Path, stop: object, poll: float = 0.5) -> None:
    """An import-only loop for extra hosts or processes: watch the inbox, apply what lands."""
    import time

    from exchange.receive.importer import import_inbox

    node = Node.open(home)
    index = os.getpid()
    while not getattr(stop, "is_set")():
        try:
            import_inbox(node, rotate=index)
        except Exception:
            log.exception("worker import failed; retrying")
        time.sleep(poll)


class WorkersAddon:
    """Extra importer processes beside the service (``exchange run --workers N``)."""

    def __init__(self, count: int, *, log_json: bool = False, verbose: int = 0) -> None:
        self.count = count
        self.log_json = log_json  # the service's log format and level, so every line it writes looks alike
        self.verbose = verbose
        self.procs: list[object] = []

    def command(self, home: str) -> list[str]:
        """The worker's command line: ``exchange [--log-json] [-v...] worker --home HOME``."""
        import sys

        flags = (["--log-json"] if self.log_json else []) + ["-v"] * self.verbose
        return [sys.executable, "-m", "exchange", *flags, "worker", "--home", home]

    def start(self, service: object) -> None:
        import subprocess

        home = str(getattr(service, "node").cfg.home)
        for _ in range(self.count):
            self.procs.append(subprocess.Popen(self.command(home)))

    def stop(self) -> None:
        import signal
        import subprocess

        for p in self.procs:
            assert isinstance(p, subprocess.Popen)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            assert isinstance(p, subprocess.Popen)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
