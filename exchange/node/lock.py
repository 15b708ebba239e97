"""Locks on a node home: one service per home, one working step at a time.

``filelock`` gives the same semantics on POSIX and Windows; a lock held by a
killed process is released by the operating system.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from exchange.errors import BusyError

log = logging.getLogger(__name__)


@contextmanager
def home_lock(home: Path, name: str, timeout: float = 60.0) -> Iterator[None]:
    lock = FileLock(str(home / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # said, so that a command that seems to hang explains itself with -v
        log.info("waiting up to %.0f s for another exchange process holding %s", timeout, lock.lock_file)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise BusyError(f"another exchange process holds {home / ('.' + name + '.lock')}") from None
    try:
        yield
    finally:
        lock.release()


def work_lock(home: Path, timeout: float = 600.0) -> AbstractContextManager[None]:
    """Held while pulling, importing, exporting or pushing."""
    return home_lock(home, "work", timeout)
