"""The states that hold a received stream, and the command that resolves each.

Shared by ``status received`` and ``status sent`` (the reason names the command), ``exchange doctor``
(which reads a SQLite home with ``sqlite3``, so nothing here imports SQLAlchemy),
``exchange retry`` (exit 21 while a bundle is FAILED) and the page.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from exchange.vocabulary import DEFAULT_LANE, ParkedState, ReceivedStatus, SentStatus


@dataclass(frozen=True)
class Stuck:
    """A received bundle that holds its stream (its lane only), and the command that resolves it."""

    peer: str
    seq: int
    status: str
    reason: str
    lane: str = DEFAULT_LANE

    @property
    def resolve(self) -> str:
        return how_to_resolve(self.status, self.peer, self.seq, self.lane)

    def line(self) -> str:
        return f"bundle {self.seq} of {self.peer}{in_lane(self.lane)} {self.status}: {self.reason}"


def in_lane(lane: str) -> str:
    """`` (lane masters)`` after a stream's name; nothing for the default lane."""
    return "" if lane == DEFAULT_LANE else f" (lane {lane})"


def lane_option(lane: str) -> str:
    """`` --lane masters`` in a command that names a seq; nothing for the default lane."""
    return "" if lane == DEFAULT_LANE else f" --lane {lane}"


def how_to_resolve(status: str, peer: str, seq: int, lane: str = DEFAULT_LANE) -> str:
    """The command that resolves a received bundle in ``status`` ("" for a state that needs nothing)."""
    if status == ReceivedStatus.FAILED:
        return (f"fix the cause, then `exchange retry`; or skip it: `exchange bundle skip {peer} {seq}"
                f"{lane_option(lane)} --reason TEXT` (the sender gets the decision and can send the documents "
                "again)")
    if status == ReceivedStatus.WAITING:
        return (f"`exchange sync` fetches the missing bundle; if {peer} no longer has it, ask its operator "
                "to check `exchange status sent` there (this node restored from a backup: the HO's operator "
                "repairs both streams with `exchange peer restart --peer STORE --reason TEXT`; if the HO itself was "
                "restored, each store's `exchange doctor` names the `--above N` to add)")
    if status == ReceivedStatus.HELD:
        return "upgrade exchange to the sender's major version, then `exchange retry`"
    return ""


#: The received bundles that hold a stream, in stream order (plain SQL: ``doctor`` runs it with sqlite3).
STUCK_SQL = ("SELECT peer, seq, status, reason, lane FROM xchg_received "
             "WHERE status IN ('FAILED', 'HELD', 'WAITING') ORDER BY peer, lane, seq")
#: Documents parked, per state (plain SQL, as STUCK_SQL).
PARKED_SQL = "SELECT state, count(*) FROM xchg_parked GROUP BY state"


def parked_problem(by_state: Iterable[Sequence[Any]]) -> tuple[str, str] | None:
    """(what, how to resolve) for PARKED_SQL's rows; None when nothing is parked."""
    counts = {str(s): int(n) for s, n in by_state}
    total, orphaned = sum(counts.values()), counts.get(ParkedState.ORPHANED, 0)
    if not total:
        return None
    if orphaned:
        return (f"{total} documents parked, {orphaned} of them can never apply (ORPHANED: a document they "
                "refer to was deleted at its source)",
                "See them with `exchange status parked`; the automatic retries leave ORPHANED documents out: "
                "ask the sender for a corrected version, or re-create what they refer to and run `exchange retry`")
    return (f"{total} documents parked (could not be applied)",
            "See them with `exchange status parked`; fix the cause, then `exchange retry` "
            "(they are also retried after each import and on the service's timer)")


def stuck_bundles(found: Iterable[Sequence[Any]]) -> list[Stuck]:
    """STUCK_SQL's rows as :class:`Stuck`."""
    return [Stuck(str(r[0]), int(r[1]), str(r[2]), str(r[3] or ""), str(r[4]) if len(r) > 4 else DEFAULT_LANE)
            for r in found]


def reason_with_resolution(status: str, peer: str, seq: int, reason: str | None,
                           lane: str = DEFAULT_LANE) -> str | None:
    """A received bundle's reason, followed by the command that resolves it when it holds its stream
    (``status received`` and the page show this)."""
    fix = how_to_resolve(status, peer, seq, lane)
    return f"{reason or status}; to resolve: {fix}" if fix else reason


def sent_reason_with_resolution(status: str, peer: str, seq: int, reason: str | None,
                                lane: str = DEFAULT_LANE) -> str | None:
    """A sent bundle's reason; a REJECTED one's followed by the commands that send its documents again."""
    if status != SentStatus.REJECTED:
        return reason
    opt = lane_option(lane)
    return (f"{reason or status}; to resolve: fix the cause, then `exchange resend --peer {peer} --bundle {seq}"
            f"{opt}` (or, while {peer} still holds it FAILED, `exchange supersede --peer {peer} --bundle {seq}{opt} "
            "--reason TEXT`, so it is skipped there without an operator)")


#: Open evidence of a peer gone back in time, ``xchg_restart`` (plain SQL, as STUCK_SQL; exchange.receive.restart
#: writes it).
REGRESS_SQL = ("SELECT peer, detail FROM xchg_restart WHERE kind = 'detected' AND resolved_at IS NULL "
               "ORDER BY peer, id")


def regress_problems(found: Iterable[Sequence[Any]]) -> list[tuple[str, str]]:
    """REGRESS_SQL's rows as (what, the command that repairs it)."""
    out = []
    for peer, detail in found:
        d = json.loads(detail)
        out.append((f"{peer}: {d.get('what', 'went back in time')}", str(d.get("repair", ""))))
    return out
