"""The words of the domain as types: statuses, ack results, document keys.

A status is written in the database, shown on the page and in the CLI, counted
in the metrics and printed in ``--json``; a typo in any one of them was a
silent bug. Each is a :class:`enum.StrEnum`: its members *are* the strings
stored and shown (``SentStatus.PROCESSED == "PROCESSED"``), so databases, JSON
and templates are unchanged, and mypy catches a word that does not exist.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NewType

__all__ = ["SentStatus", "DocStatus", "ReceivedStatus", "ParkedState", "Outcome", "AckResult", "ConflictStatus", "Tone",
           "tone", "DocKey", "DocRef", "counted"]


#: A stream is per sender, recipient and lane (docs/CATALOG.md "Lanes", FORMAT.md version 5). A document
#: type without a lane of its own is in the default lane, whose files keep the names of format 3.
DEFAULT_LANE = "main"
LANE_RE = re.compile(r"^[a-z][a-z0-9-]{0,15}$")


class SentStatus(StrEnum):
    """A bundle this node sent."""

    EXPORTED = "EXPORTED"  # sealed in the outbox
    UPLOADED = "UPLOADED"  # delivered to the peer's drop
    PROCESSED = "PROCESSED"  # an APPLIED ack came back
    REJECTED = "REJECTED"  # a REJECTED ack came back
    ABANDONED = "ABANDONED"  # never acknowledged: its peer was removed with --abandon (the journal says who, why)


class DocStatus(StrEnum):
    """A document on its way to one peer: its events follow their bundle."""

    PENDING = "PENDING"  # not in a bundle yet
    SETASIDE = "SETASIDE"  # the exporter could not encode it: waits in xchg_setaside (`exchange set-aside`)
    EXPORTED = "EXPORTED"
    UPLOADED = "UPLOADED"
    PROCESSED = "PROCESSED"
    REJECTED = "REJECTED"
    ABANDONED = "ABANDONED"  # its peer was removed with --abandon before it was acknowledged


class ReceivedStatus(StrEnum):
    """A bundle this node received."""

    RECEIVED = "RECEIVED"  # seen, not placed yet
    APPLIED = "APPLIED"
    WAITING = "WAITING"  # an earlier seq is missing
    HELD = "HELD"  # another major version: kept, applied after an upgrade
    FAILED = "FAILED"  # authentic, could not be applied: the stream waits for `exchange retry`
    SKIPPED = "SKIPPED"  # FAILED, then skipped by an operator's decision (`exchange bundle skip`): never applied
    QUARANTINED = "QUARANTINED"  # not authentic, not for us, or malformed: set aside


class ParkedState(StrEnum):
    """A parked document: retried, or known never to apply."""

    RETRYING = "RETRYING"  # retried after each import and on the timer
    ORPHANED = "ORPHANED"  # a document it refers to was deleted at its source: only `exchange retry` tries it


class Outcome(StrEnum):
    """What one import or ack step did with one file (the importer's and the sync report's word)."""

    APPLIED = "APPLIED"
    WAITING = "WAITING"
    HELD = "HELD"
    FAILED = "FAILED"
    QUARANTINED = "QUARANTINED"
    DUPLICATE = "DUPLICATE"  # applied before: re-acknowledged, not applied again
    PROCESSED = "PROCESSED"  # an ack moved a sent bundle to PROCESSED
    REJECTED = "REJECTED"  # an ack moved a sent bundle to REJECTED


class AckResult(StrEnum):
    """The result an ack signs."""

    APPLIED = "APPLIED"
    REJECTED = "REJECTED"


class ConflictStatus(StrEnum):
    """Two concurrent changes of a document editable on both sides (``xchg_conflict``)."""

    OPEN = "OPEN"  # policy "manual": both versions kept, this side's stays until a person resolves it
    DECIDED = "DECIDED"  # the type's policy chose; the loser is kept in the log
    RESOLVED = "RESOLVED"  # a person chose (here), or a later change from the peer settled it


class Tone(StrEnum):
    """How a status reads at a glance: the page's pill class, the terminal's colour."""

    OK = "ok"
    INFO = "info"
    WARN = "warn"
    BAD = "bad"


_TONES: dict[str, Tone] = {
    ReceivedStatus.APPLIED: Tone.OK, SentStatus.PROCESSED: Tone.OK,
    ReceivedStatus.WAITING: Tone.WARN, ReceivedStatus.HELD: Tone.WARN, DocStatus.SETASIDE: Tone.WARN,
    ConflictStatus.OPEN: Tone.WARN,
    ReceivedStatus.FAILED: Tone.BAD, ReceivedStatus.SKIPPED: Tone.WARN, SentStatus.REJECTED: Tone.BAD, ReceivedStatus.QUARANTINED: Tone.BAD,
    SentStatus.ABANDONED: Tone.WARN,
}


def tone(status: str) -> Tone:
    """The tone of any status word (in progress and unknown words read as information)."""
    return _TONES.get(status, Tone.INFO)


#: A document key: the canonical JSON array of its key values as text (``["s001","B42"]``),
#: as ``exchange.database.rows.canonical_key`` writes it.
DocKey = NewType("DocKey", str)

#: A document: its type and key.
DocRef = tuple[str, DocKey]


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """A count as people say it: ``1 document``, ``2 documents``, ``0 documents``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
