"""Whose fault a database error is: the database's (wait and try again) or the statement's (FAILED).

A full disk, a lost connection or a locked file says nothing about the bundle being
applied: the transaction rolls back and the file waits in the inbox. Anything else the
database refuses (a store's trigger that raises or names a missing table, a constraint)
is about what was written: the bundle is FAILED with the database's reason, so it shows
in ``status received``, the page and ``doctor`` and can be retried or skipped.
Decided by the driver's error code (SQLite's ``sqlite_errorcode``, PostgreSQL's SQLSTATE),
never by the message.
"""

from __future__ import annotations

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

#: SQLite primary result codes of a database that cannot be used right now
#: (BUSY, LOCKED, NOMEM, READONLY, INTERRUPT, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB).
SQLITE_UNUSABLE = frozenset({5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 26})

#: SQLSTATE classes of a PostgreSQL server that cannot be used right now: connection (08),
#: transaction rollback (40: serialization, deadlock), insufficient resources (53),
#: operator intervention (57), system error (58), internal error (XX).
PG_UNUSABLE_CLASSES = frozenset({"08", "40", "53", "57", "58", "XX"})


def database_unusable(exc: SQLAlchemyError) -> bool:
    """Whether ``exc`` says the database itself cannot be used (not what was written)."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in SQLITE_UNUSABLE
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(state, str) and len(state) == 5:
        return state[:2] in PG_UNUSABLE_CLASSES
    return isinstance(exc, OperationalError)  # another driver: as before, OperationalError is the database's


def transaction_lost(conn: Connection) -> bool:
    """Whether the database ended the transaction ``conn`` is in (a SQLite trigger's RAISE(ROLLBACK)).

    Nothing written before is still there, so nothing may be committed after it.
    """
    if conn.dialect.name != "sqlite":
        return False
    raw = conn.connection.dbapi_connection
    return raw is not None and not getattr(raw, "in_transaction", True)


def root_error(exc: Exception) -> Exception:
    """The first database error of a chain: a trigger's RAISE(ROLLBACK) surfaces as the failed
    ROLLBACK TO SAVEPOINT that followed it, and the operator needs the trigger's message."""
    first: Exception = exc
    seen = 0
    cur: BaseException | None = exc.__context__
    while cur is not None and seen < 10:  # bounded: a chain is a few links
        if isinstance(cur, DBAPIError):
            first = cur
        cur, seen = cur.__context__, seen + 1
    return first
