"""Times as every ``--json`` output and the page show them: RFC 3339 with an offset.

Why: SQLAlchemy stores ``DateTime(timezone=True)`` on SQLite as text without
its offset and reads it back naive, so the same record printed
``2026-11-25T17:00:00`` on a SQLite home and ``2026-11-25T17:00:00+00:00`` on
PostgreSQL; a script reading both had to guess. Every time exchange itself
records is UTC (``files.utc_now``), so a naive one read back is UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime


def aware(t: datetime) -> datetime:
    """``t`` with its offset; a naive time is one exchange recorded in UTC and read back without it."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def rfc3339(t: object) -> str | None:
    """A recorded time (a datetime, or the ISO text SQLite keeps) as RFC 3339 with an offset; None stays None."""
    if t is None:
        return None
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    if not isinstance(t, datetime):
        raise TypeError(f"not a time: {t!r}")
    return aware(t).isoformat()
