"""The Sent, Received and parked views as plain lines for a terminal of any width, piped or not.

``exchange status`` and the demo print these lines. Nothing is cut: a file name, a status and a
time are never truncated; a bundle is one line (file, status, last change) and indented lines
under it (documents, first seen, reason), wrapped at the width. Times are local with their zone,
the date left out when it is today. Text that may come from a peer has its control characters
escaped.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from datetime import datetime

from exchange.logs import escape_controls
from exchange.service.status import Parked, Row
from exchange.service.words import counted, documents_text, key_text, local_time, thing
from exchange.vocabulary import DEFAULT_LANE

INDENT = "    "
_FIRST = {"sent": "sealed", "received": "received"}
_LAST = {"sent": "updated", "received": "applied"}


def _wrapped(text: str, width: int) -> list[str]:
    """``text`` under a bundle, wrapped at ``width``; a long word (a path) is never broken."""
    return textwrap.wrap(escape_controls(text), max(width, 40), initial_indent=INDENT,
                         subsequent_indent=INDENT + "  ", break_long_words=False, break_on_hyphens=False)


def bundle_lines(view: str, rows: Sequence[Row], *, width: int = 80, now: datetime | None = None) -> list[str]:
    """One record per bundle: ``file  STATUS  time`` then its details, indented."""
    out: list[str] = []
    fw = max((len(escape_controls(r.file)) for r in rows), default=0)
    sw = max((len(r.status) for r in rows), default=0)
    for r in rows:
        when = local_time(r.updated or r.created, now)
        head = f"{escape_controls(r.file):<{fw}}  {escape_controls(r.status):<{sw}}  {when}"
        details = []
        if len(head) > width:  # no room for the time: it moves to the next line, whole
            head = f"{escape_controls(r.file)}  {escape_controls(r.status)}"
            details.append(f"{_LAST.get(view, 'updated')} {when}")
        out.append(head.rstrip())
        if r.documents:
            details.append(documents_text(r.documents))
        if r.updated and r.created:
            details.append(f"{_FIRST.get(view, 'created')} {local_time(r.created, now)}")
        if details:
            out += _wrapped("; ".join(details), width)
        if r.reason:
            out += _wrapped(f"reason: {r.reason}", width)
        rec = r.reconcile
        if rec and not rec.get("ok", True):  # the ack reports other figures than were sealed
            out += _wrapped(f"the ack differs from what was sent: {'; '.join(rec.get('problems', []))}", width)
    return out


def in_lane(lane: str) -> str:
    """`` of lane orders`` after a bundle's seq; nothing for the default lane."""
    return "" if lane == DEFAULT_LANE else f" of lane {lane}"


def parked_lines(parked: Sequence[Parked], *, width: int = 80, now: datetime | None = None) -> list[str]:
    """One record per parked document: what it is, from where, since when, and why."""
    out: list[str] = []
    for d in parked:
        out += textwrap.wrap(escape_controls(
            f"{thing(d.doc_type)} {key_text(d.doc_key)} from {d.peer} (bundle {d.seq}{in_lane(d.lane)}), parked since "
            f"{local_time(d.parked_at, now)}, {counted(d.attempts, 'attempt')}"), max(width, 40),
            subsequent_indent=INDENT, break_long_words=False, break_on_hyphens=False)
        if d.reason:
            out += _wrapped(d.reason, width)
        out += _wrapped(f"detail: {d.error}", width)
    return out


def status_lines(node_id: str, view: str, rows: Sequence[Row], parked: Sequence[Parked] | None, *,
                 width: int = 80, now: datetime | None = None) -> list[str]:
    """The whole ``exchange status VIEW`` text: a title line, the bundles, then the parked documents."""
    out: list[str] = []
    if view != "parked":
        out.append(f"{node_id}: {view}, {counted(len(rows), 'bundle')}")
        out += bundle_lines(view, rows, width=width, now=now)
    if parked:
        if out:
            out.append("")
        out.append(f"{node_id}: {counted(len(parked), 'document')} parked")
        out += parked_lines(parked, width=width, now=now)
    elif view == "parked":
        out.append(f"{node_id}: no parked documents")
    return out
