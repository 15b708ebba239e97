"""Several importer workers on one node: streams in parallel, each stream in order.

Each stream is taken under its lock (:mod:`exchange.receive.locks`): on
PostgreSQL workers on several hosts sharing one database and one drop never
apply the same stream at once; a killed worker's session ends, its lock is
released and its transaction rolled back, and the stream is picked up by the
next worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

from exchange.node.home import Node
from exchange.receive.importer import import_inbox

log = logging.getLogger(__name__)


def _worker(home: str, index: int, workers: int = 1) -> list[dict[str, object]]:
    node = Node.open(home)
    outs = import_inbox(node, rotate=index, workers=workers)
    node.engine.dispose()
    return [o.__dict__ for o in outs]


def import_parallel(node: Node, workers: int) -> list[dict[str, object]]:
    """Run ``workers`` importer processes over the inbox; returns every outcome."""
    if workers <= 1:
        return [o.__dict__ for o in import_inbox(node)]
    # Forked from one server process that imported the importer once: with "spawn" every worker imported
    # pyarrow, SQLAlchemy and the rest itself, about a second of CPU each, which on two cores made four
    # workers slower than two. Nothing of this process (its database connections) is inherited.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["exchange.receive.importer", "exchange.receive.workers"])
    with ctx.Pool(workers) as pool:
        results = pool.starmap(_worker, [(str(node.cfg.home), i, workers) for i in range(workers)])
    return [o for r in results for o in r]


def worker_loop(home: Path, stop: object, poll: float = 0.5) -> None:
    """An import-only loop for extra hosts or processes: watch the inbox, apply what lands."""
    import time

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
