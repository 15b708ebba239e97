"""One lock per stream (and one for the parked documents), taken without waiting.

Coordination lives in the database, not in a home-made scheduler: on
PostgreSQL a session advisory lock per name (``pg_try_advisory_lock``), so
importers on several hosts sharing one database and one drop never apply the
same stream at once; a killed worker's session ends and its lock is released.
On SQLite (one host) a lock file per name does the same. The importer and the
workers both use it; it imports neither.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock, Timeout

from exchange.node.home import Node


@contextmanager
def try_lock(node: Node, name: str, wait: float = 0.0) -> Iterator[bool]:
    """Try to take the named lock for this node, waiting at most ``wait`` seconds; yields whether we hold it."""
    if node.engine.dialect.name == "postgresql":
        # a session lock needs no transaction: autocommit spares a BEGIN and a COMMIT round trip on each call
        with node.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            key = f"xchg:{node.id}:{name}"
            end = time.monotonic() + wait
            while True:  # bounded: at most ``wait`` seconds
                got = bool(conn.exec_driver_sql("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).scalar())
                if got or time.monotonic() >= end:
                    break
                time.sleep(0.05)
            try:
                yield got
            finally:
                if got:
                    conn.exec_driver_sql("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
        return
    lock = FileLock(str(node.cfg.home / f".lock-{name}"))
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
