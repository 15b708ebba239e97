"""The words people read: counts with their plural, document keys as text, local times with their zone.

The CLI, the demo and the page (``service/ui``) show the same words; ``--json`` keeps the exact
values (RFC 3339 times with their offset, keys as stored).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from exchange.timefmt import as_time, rfc3339
from exchange.vocabulary import counted

__all__ = ["counted", "key_text", "documents_text", "as_time", "rfc3339", "local_time", "json_ready",
           "thing", "parked_reason", "applied_text"]


def key_text(doc_key: str) -> str:
    """A document key as people write it: ``s001/B8``, not the stored JSON ``["s001", "B8"]``."""
    try:
        parts = json.loads(doc_key)
    except ValueError:
        return doc_key
    if isinstance(parts, list) and parts and all(isinstance(p, str | int) for p in parts):
        return "/".join(str(p) for p in parts)
    return doc_key


def documents_text(documents: dict[str, int]) -> str:
    """``item 200, promotion 2``: document type and count."""
    return ", ".join(f"{k} {v}" for k, v in documents.items())


def local_time(value: datetime | str | None, now: datetime | None = None) -> str:
    """A time for people: local, with its zone; the date only when it is not today (``14:02:31 CET``,
    ``2026-11-25 17:00 CET``). ``-`` for none; text that is not a time as it is."""
    try:
        t = as_time(value)
    except ValueError:
        return str(value)
    if t is None:
        return "-"
    local = t.astimezone()
    today = (now or datetime.now(UTC)).astimezone().date()
    return local.strftime("%H:%M:%S %Z" if local.date() == today else "%Y-%m-%d %H:%M %Z")


def json_ready(obj: Any) -> Any:
    """``obj`` with every datetime as RFC 3339 (for ``json.dumps``)."""
    if isinstance(obj, datetime):
        return rfc3339(obj)
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj


def thing(doc_type: str) -> str:
    """A document type as a word: ``sales_bill`` -> ``sales bill``."""
    return doc_type.replace("_", " ")


def parked_reason(role: str, doc_type: str, doc_key: str, missing: list[tuple[str, tuple[str, ...]]]) -> str:
    """Why a document is parked, in the words of the people who run the store or the HO.

    ``missing``: what it references that this node does not hold (:func:`exchange.receive.missing.parked_missing`).
    The database's own error stays beside it as the technical detail.
    """
    here = "this store" if role == "store" else "the head office"
    doc = f"{thing(doc_type)} {key_text(doc_key)}"
    if not missing:
        return (f"{doc} could not be applied here; it is tried again after each bundle that arrives "
                "and by `exchange retry` (the detail says what the database refused)")
    named = [f"{thing(t)} {'/'.join(v)}" for t, v in missing[:3]]
    more = f" and {counted(len(missing) - 3, 'other')}" if len(missing) > 3 else ""
    which = ", ".join(named) + more
    kinds = sorted({thing(t) for t, _v in missing})
    arrives = f"the {kinds[0]} arrives" if len(missing) == 1 else "they arrive"
    return (f"{doc} uses {which}, which {here} has not received yet; it will be applied when {arrives}")


def applied_text(applied: Any) -> str:
    """One document type's result of an import (``8 applied, 1 parked``), not a Python dict; the
    control totals stay in ``--json``. A shape from a peer's ack that is not a dict is shown as text."""
    if not isinstance(applied, dict):
        return str(applied)
    words = {"stale": "already newer here"}
    return ", ".join(f"{v} {words.get(str(k), k)}" for k, v in applied.items() if k != "totals" and v) or "nothing"
