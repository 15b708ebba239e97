"""The xchg schema version, and reading it from a SQLite file without SQLAlchemy.

``exchange doctor`` checks the version on every run; on a SQLite home it reads
it with the standard ``sqlite3`` module, since importing SQLAlchemy and the
table definitions costs more than the whole command should (docs/PERFORMANCE.md,
"Start-up"). ``exchange.database.tables.SCHEMA_VERSION`` (the length of its
migrations list) stays the authority: tests/test_startup.py fails when the two differ.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

#: len(exchange.database.tables.MIGRATIONS): bump it with every migration added there.
SCHEMA_VERSION = 5

_HAS_META = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'xchg_meta'"
_VERSION = "SELECT value FROM xchg_meta WHERE key = 'schema_version'"


def sqlite_schema_version(path: str) -> int | None:
    """The version recorded in a SQLite file (0 before the first migration, as
    ``tables.schema_version``); None when ``sqlite3`` cannot read it (SQLAlchemy then decides)."""
    uri = Path(path).resolve().as_uri() + "?mode=rw"  # never create a missing file
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            if not conn.execute(_HAS_META).fetchall():
                return 0
            row = conn.execute(_VERSION).fetchone()
        return int(row[0]) if row else 0
    except (sqlite3.Error, ValueError, TypeError):
        return None
