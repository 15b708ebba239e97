"""A SQLite home read with the standard ``sqlite3`` module, without SQLAlchemy.

The start-up paths (a no-op ``exchange sync``, ``exchange status sent``,
``exchange doctor``) answer from a SQLite file directly, since importing
SQLAlchemy and the table definitions costs more than the whole command should
(docs/PERFORMANCE.md, "Start-up"). They share the rules here: which URLs are a
plain file (anything else is left to SQLAlchemy), a connection that never
creates a missing file, and the schema version. ``exchange.database.tables
.SCHEMA_VERSION`` (the length of its migrations list) stays the authority:
tests/test_startup.py fails when the two differ.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

#: len(exchange.database.tables.MIGRATIONS): bump it with every migration added there.
SCHEMA_VERSION = 15

_HAS_META = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'xchg_meta'"
_VERSION = "SELECT value FROM xchg_meta WHERE key = 'schema_version'"


def plain_file(url: str) -> str | None:
    """The file of a plain ``sqlite:///PATH`` URL; None for anything SQLAlchemy might read differently."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix):]
    if not path or path == ":memory:" or any(ch in path for ch in "?#%"):
        return None  # query options, URL escapes, in-memory: leave them to SQLAlchemy
    return path


def connect_existing(path: str) -> sqlite3.Connection:
    """A connection to an existing SQLite file, never creating a missing one (sqlite3.Error otherwise).

    A relative path is relative to the working directory, as for SQLAlchemy; the
    timeout is the engine's busy_timeout.
    """
    return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=rw", uri=True, timeout=30)


def sqlite_schema_version(path: str) -> int | None:
    """The version recorded in a SQLite file (0 before the first migration, as
    ``tables.schema_version``); None when ``sqlite3`` cannot read it (SQLAlchemy then decides)."""
    try:
        with closing(connect_existing(path)) as conn:
            if not conn.execute(_HAS_META).fetchall():
                return 0
            row = conn.execute(_VERSION).fetchone()
        return int(row[0]) if row else 0
    except (sqlite3.Error, ValueError, TypeError):
        return None
