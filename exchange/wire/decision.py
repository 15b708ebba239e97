"""An operator's decision about a bundle that could not be applied, as a version 3 ack carries it.

``exchange bundle skip`` at the receiver (kind ``skipped``) and the receiver's answer to a
sender's supersede notice (kind ``superseded``) both end a FAILED bundle without applying it.
The decision travels in the REJECTED ack's encrypted details (docs/FORMAT.md section 6), so it
is signed by the acker with the rest of the ack: who decided, when, and why. Read from a peer,
every field is bounded and checked before use.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from exchange.errors import FormatError
from exchange.wire.formats import MAX_REASON_CHARS
from exchange.wire.signed import format_time, json_field, parse_time

#: What a decision may say happened to the bundle.
DECISION_KINDS = ("skipped", "superseded")
#: Longest operator name a decision carries (a login or a person's name).
MAX_DECIDER_CHARS = 128


@dataclass(frozen=True)
class Decision:
    """``kind`` of decision, made by ``by`` at ``at``, because ``reason``."""

    kind: str
    by: str
    at: datetime
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "by": self.by, "at": format_time(self.at), "reason": self.reason}

    def text(self) -> str:
        """One line for status views and the audit report."""
        return f"{self.kind} by {self.by} at {format_time(self.at)}: {self.reason}"

    @classmethod
    def parse(cls, obj: Any, what: str) -> Decision:
        """A decision from a peer's details, or FormatError naming ``what``."""
        if not isinstance(obj, dict) or set(obj) != {"kind", "by", "at", "reason"}:
            raise FormatError(f"{what}: decision is not an object of kind, by, at, reason")
        kind = json_field(obj, "kind", str, what)
        if kind not in DECISION_KINDS:
            raise FormatError(f"{what}: decision kind {kind[:40]!r} is not one of {', '.join(DECISION_KINDS)}")
        return cls(kind, check_text(json_field(obj, "by", str, what), MAX_DECIDER_CHARS, f"{what} decision by"),
                   parse_time(json_field(obj, "at", str, what), f"{what} decision at"),
                   check_text(json_field(obj, "reason", str, what), MAX_REASON_CHARS, f"{what} decision reason"))


def check_text(value: str, limit: int, what: str) -> str:
    """Printable text of 1 .. ``limit`` characters (no control characters: it is shown on terminals)."""
    if not 1 <= len(value) <= limit or not value.isprintable() or value != value.strip():
        raise FormatError(f"{what}: must be 1 to {limit} printable characters without surrounding spaces")
    return value
