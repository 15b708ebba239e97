"""The operators' journal: every action an operator takes on the exchange itself, with who, when and why.

Pausing a store, removing it or abandoning what was pending for it changes what
the estate receives; an auditor must be able to see that it was a decision, by
whom and for what reason, long after the command scrolled off a terminal.
Rows are only ever appended.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from exchange.timefmt import aware
from exchange.database.tables import xchg_journal
from exchange.files import utc_now


@dataclass(frozen=True)
class JournalEntry:
    id: int
    at: datetime
    actor: str
    action: str
    peer: str | None
    detail: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "at": aware(self.at).isoformat(),  # SQLite gives it back naive UTC
                "actor": self.actor, "action": self.action, "peer": self.peer, "detail": self.detail}


def actor() -> str:
    """Who runs this command: the account behind ``sudo`` if any, and the machine."""
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's numeric uid)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"[:128]


def record(conn: Connection, action: str, peer: str | None, **detail: Any) -> None:
    """Append one entry, in the caller's transaction (the action and its record commit together)."""
    conn.execute(xchg_journal.insert().values(at=utc_now(), actor=actor(), action=action, peer=peer,
                                              detail=json.dumps(detail, sort_keys=True, default=str)))


def entries(conn: Connection, peer: str | None = None, limit: int = 200) -> list[JournalEntry]:
    """The newest entries first (of one peer if given)."""
    q = select(xchg_journal).order_by(xchg_journal.c.id.desc()).limit(limit)
    if peer is not None:
        q = q.where(xchg_journal.c.peer == peer)
    return [JournalEntry(r.id, r.at, r.actor, r.action, r.peer, json.loads(r.detail))
            for r in conn.execute(q)]
