"""The sender's notices that a bundle is superseded, carried in its next bundles to that peer.

``exchange supersede`` records the decision (``xchg_decision``, side ``notice``, kind
``superseded``); every bundle sealed for that peer afterwards names it in its inner
manifest's ``summary.supersedes`` (docs/FORMAT.md section 4), until the receiver's signed
ack carrying the decision comes back (side ``sent``), so the receiver skips the FAILED
bundle without an operator there. Repeating a notice is harmless: the receiver acts only
on one naming the FAILED bundle at the head of the stream.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, select

from exchange.timefmt import aware
from exchange.database.tables import xchg_decision
from exchange.wire.decision import Decision
from exchange.wire.formats import MAX_SUPERSEDES
from exchange.vocabulary import DEFAULT_LANE

#: ``xchg_decision.side`` of this node's own notice that a bundle it sent is superseded.
NOTICE = "notice"


def supersede_notices(conn: Connection, peer: str, lane: str = DEFAULT_LANE) -> list[dict[str, Any]]:
    """The newest MAX_SUPERSEDES superseded decisions for ``peer``'s stream in ``lane``, as the summary
    carries them (a notice names a seq of the stream the bundle carrying it is in)."""
    d = xchg_decision.c
    answered = select(d.seq).where(and_(d.side == "sent", d.peer == peer, d.lane == lane))
    found = conn.execute(select(d.seq, d.decided_by, d.decided_at, d.reason).where(and_(
        d.side == NOTICE, d.peer == peer, d.lane == lane, d.kind == "superseded", d.seq.not_in(answered)))
        .order_by(d.seq.desc()).limit(MAX_SUPERSEDES))
    return [{"seq": int(seq), **Decision("superseded", str(by), aware(at),
                                         str(why)).as_json()} for seq, by, at, why in found]
