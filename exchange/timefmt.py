"""Times as every ``--json`` output and the page show them: RFC 3339 with an offset.

Why: SQLAlchemy stores ``DateTime(timezone=True)`` on SQLite as text without
its offset and reads it back naive, so the same record printed
``2026-11-25T17:00:00`` on a SQLite home and ``2026-11-25T17:00:00+00:00`` on
PostgreSQL; a script reading both had to guess. Every time exchange itself
records is UTC (``files.utc_now``), so a naive one read back is UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

#: Minutes east of UTC no zone exceeds: a business time's offset beyond is refused (RFC 3339 allows +-23:59;
#: real zones span -12:00..+14:00; docs/CATALOG.md, "Time").
MAX_OFFSET = 18 * 60
#: A business time ``C``'s offset column is ``C`` + this suffix (``bill_date_offset``): an integer of minutes.
OFFSET_SUFFIX = "_offset"


def aware(t: datetime) -> datetime:
    """``t`` with its offset; a naive time is one exchange recorded in UTC and read back without it."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def as_time(value: datetime | str | None) -> datetime | None:
    """A stored time as an aware datetime: a naive one (SQLite keeps no offset) is UTC; ValueError if not a time."""
    if value is None or value == "":
        return None
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return aware(t)


def rfc3339(value: object) -> str | None:
    """A recorded time (a datetime, or the ISO text SQLite keeps) as RFC 3339 with an offset, the form of
    every ``--json`` (``2026-11-25T17:00:05+00:00``); None stays None, text that is not a time as it is."""
    try:
        t = as_time(value if isinstance(value, (datetime, str)) or value is None else str(value))
    except ValueError:
        return str(value)
    return t.isoformat() if t else None
