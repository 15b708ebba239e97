"""``exchange retry``, the page's Retry button and the service: one retry, one result.

A retry tries the FAILED bundles of the inbox again (in stream order, with the
bundles waiting behind them), then every parked document once, and returns one
:class:`RetryResult` that the CLI prints, the page shows and both judge by.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from exchange.database.tables import xchg_parked
from exchange.node.home import Node
from exchange.progress import Reporter
from exchange.receive.decisions import still_failed
from exchange.receive.stuck import Stuck
from exchange.receive.importer import FileOutcome, import_inbox, retry_parked, wrote_acks
from exchange.receive.locks import try_lock
from exchange.vocabulary import Outcome

@dataclass
class RetryResult:
    """What one retry did: each file of the inbox, and the parked documents."""

    outcomes: list[FileOutcome] = field(default_factory=list)
    parked_applied: int = 0
    still_parked: int = 0
    failed: list[Stuck] = field(default_factory=list)  # still FAILED after the retry

    @property
    def ok(self) -> bool:
        """Nothing failed, nothing was set aside, nothing is still parked."""
        return not self.still_parked and not self.failed and not any(
            o.status in (Outcome.FAILED, Outcome.QUARANTINED) for o in self.outcomes)

    @property
    def acks_due(self) -> bool:
        """An ack was written (applied, re-acknowledged or rejected): push it back now."""
        return wrote_acks(self.outcomes)

    def parked_line(self) -> str:
        return f"parked documents: {self.parked_applied} applied, {self.still_parked} still parked"

    def text(self) -> str:
        """The lines in one (the page's result line)."""
        return "; ".join(self.lines())

    def lines(self) -> list[str]:
        """One line per file, then the parked documents (the CLI's output)."""
        return [f"{o.file}: {o.status}" + (f" - {o.reason}" if o.reason else "") for o in self.outcomes] + [
            self.parked_line()]


def parked_count(node: Node, peer: str | None = None) -> int:
    q = select(func.count()).select_from(xchg_parked)
    if peer is not None:
        q = q.where(xchg_parked.c.peer == peer)
    with node.engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


#: Seconds a retry waits for another worker's pass over the parked documents: an operator who pressed
#: Retry expects the pass to happen, and a pass takes seconds.
PARKED_WAIT = 10.0


def retry(node: Node, *, reporter: Reporter | None = None, peer: str | None = None) -> RetryResult:
    """Retry FAILED bundles, then every parked document exactly once.

    ``peer`` limits both to that peer's (a store's page retries that store only,
    and the other stores' trouble is left for their own pages or ``exchange retry``).
    The caller holds the home's work lock. Parked documents another worker is
    retrying right now (its lock still taken after ``PARKED_WAIT``) are counted as still parked.
    """
    outs = import_inbox(node, retry=True, reporter=reporter, parked=False, peer=peer)
    with try_lock(node, "parked", wait=PARKED_WAIT) as got:
        if got:
            applied, still = retry_parked(node, peer)
        else:
            applied, still = 0, parked_count(node, peer)
    return RetryResult(outs, applied, still, still_failed(node, peer))
