"""Files leave the inbox one of two ways: archived after use, or set aside in quarantine.

Either way the entry itself moves (a link as a link, a FIFO as a FIFO): what a
link points to is never read, copied or changed, and nothing is deleted.
Every quarantine goes through :func:`quarantine`, which writes the reason file
``exchange status`` and the page read, logs it, and reports it to the
reporter, so every file set aside appears in the page's activity list.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from exchange.errors import ExchangeError
from exchange.files import free_name, fsync_dir, move_entry, utc_now, write_file_atomic
from exchange.node.home import Node
from exchange.progress import Reporter
from exchange.vocabulary import ReceivedStatus

log = logging.getLogger(__name__)

#: The suffix of the reason file written beside each quarantined file.
REASON_SUFFIX = ".reason"


def quarantine(node: Node, path: Path, problem: ExchangeError | str, reporter: Reporter) -> Path:
    """Move ``path`` to quarantine/ with a reason file beside it, and report it; returns where it went.

    ``problem`` is the error that refused the file, or the reason in words
    when no exception was raised (a replay, a broken chain, an unknown ack).
    """
    q = node.cfg.quarantine
    q.mkdir(parents=True, exist_ok=True)
    target = free_name(q, path.name)
    reason = {"file": path.name, "time": utc_now().isoformat(),
              "error": type(problem).__name__ if isinstance(problem, ExchangeError) else "Rejected",
              "reason": str(problem), "hint": problem.hint if isinstance(problem, ExchangeError) else ""}
    write_file_atomic(target.with_name(target.name + REASON_SUFFIX), (json.dumps(reason, indent=1) + "\n").encode())
    move_out(path, target)
    status = ReceivedStatus.QUARANTINED
    log.warning("%s %s: %s", path.name, status, problem, extra={"file": path.name, "status": status})
    reporter.state(path.name, status, str(problem))
    return target


def archive(node: Node, path: Path, sub: str = "") -> Path:
    """Move a file that has been used into archive/received (``sub`` below it); never overwrite a copy."""
    dest = node.cfg.archive_received / sub if sub else node.cfg.archive_received
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / path.name
    if os.path.lexists(target):  # a dangling link counts: nothing is written through it
        stamped = f"{path.name}.{utc_now().strftime('%Y%m%d%H%M%S')}"
        target, n = dest / stamped, 1
        while os.path.lexists(target):  # never overwrite an archived copy, even within one second
            target, n = dest / f"{stamped}.{n}", n + 1
    move_out(path, target)
    return target


def move_out(path: Path, target: Path) -> None:
    """Move a file out of the inbox as link + unlink where possible.

    A rename out of a watched folder makes watchdog hold every later event of
    that folder for half a second (it waits for the other half of the move);
    a link and an unlink are seen at once. The file exists in its new place
    before it leaves the inbox either way.
    """
    try:
        os.link(path, target, follow_symlinks=False)  # a link is linked as itself, never its target
    except OSError:  # another filesystem, no hard links, a folder: a rename (or a fresh copy)
        move_entry(path, target)
        return
    fsync_dir(target.parent)
    path.unlink()
