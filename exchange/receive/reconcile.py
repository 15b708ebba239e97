"""The sender's check of every ack: what the receiver says it applied against what was sealed.

The receiver's ack (its encrypted details) states per document type how many
documents it applied, parked and skipped as older than what it held, and the
control totals of what it applied. The sender kept the control totals it
sealed (``xchg_sent.sent_totals``). Any difference (a parked document, a
document or amount unaccounted for) is recorded on the bundle
(``xchg_sent.reconcile``) and shown on the Sent view, in ``status --json`` and
the metrics. The figures come from the peer: each is checked for type and
range before use, and one that is not a count or an amount is itself a
difference, never a crash.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

from exchange.vocabulary import AckResult
from exchange.wire.bundle import Ack
from exchange.wire.formats import MAX_COUNT

MAX_PROBLEMS = 20  # differences listed per bundle (the count says how many in all)


def _count(v: Any) -> int | None:
    return v if type(v) is int and 0 <= v <= MAX_COUNT else None


def _amount(v: Any) -> Decimal | None:
    if not isinstance(v, str | int) or isinstance(v, bool) or len(str(v)) > 64:
        return None
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def reconcile(sent_totals: str | None, ack: Ack) -> dict[str, Any] | None:
    """``{"ok", "problems", "unexplained", "count", "types"}`` for an APPLIED ack whose details this node
    read; None otherwise (a REJECTED bundle applied nothing; sealed details, or a bundle sealed before
    totals were kept, leave nothing to compare). ``unexplained``: the differences the ack's parked and
    stale counts do not account for (a document or an amount lost)."""
    if not sent_totals or ack.result != AckResult.APPLIED or ack.details not in ("clear", "decrypted"):
        return None
    try:
        sent = json.loads(sent_totals)
    except ValueError:
        return None
    if not isinstance(sent, dict):
        return None
    problems: list[str] = []
    unexplained: list[str] = []
    types: dict[str, Any] = {}
    for t in sorted(set(sent) | set(ack.applied))[:1000]:
        s: dict[str, Any] = sent[t] if isinstance(sent.get(t), dict) else {}
        n_sent = int(s.get("count", 0)) + int(s.get("deletes", 0))
        a = ack.applied.get(t)
        if not isinstance(a, dict):
            unexplained.append(f"{t}: {n_sent} sent, the ack reports none")
            types[t] = {"sent": n_sent}
            continue
        applied, parked, stale = _count(a.get("applied")), _count(a.get("parked")), _count(a.get("stale"))
        if applied is None or parked is None or stale is None:
            unexplained.append(f"{t}: the ack's counts are not counts")
            continue
        types[t] = {"sent": n_sent, "applied": applied, "parked": parked, "stale": stale}
        if applied + parked + stale != n_sent:
            unexplained.append(f"{t}: {n_sent} sent, {applied} applied, {parked} parked, {stale} older than "
                               f"held: {n_sent - applied - parked - stale:+d} unaccounted for")
        elif parked:
            problems.append(f"{t}: {parked} of {n_sent} parked")
        want: dict[str, Any] = s["totals"] if isinstance(s.get("totals"), dict) else {}
        got: dict[str, Any] = a["totals"] if isinstance(a.get("totals"), dict) else {}
        for ref in sorted(set(want) | set(got))[:100]:
            w, g = _amount(want.get(ref, "0")), _amount(got.get(ref, "0"))
            if g is None:
                unexplained.append(f"{t}: {ref} in the ack is not an amount")
            elif w is not None and w != g:
                # fewer documents applied (parked, older than held) explain a smaller total
                (problems if parked or stale else unexplained).append(f"{t}: {ref} sent {w}, applied {g}")
    every = unexplained + problems
    return {"ok": not every, "problems": every[:MAX_PROBLEMS], "unexplained": unexplained[:MAX_PROBLEMS],
            "count": len(every), "types": types}
