"""Is a peer's clock right? Judged from the signed times on what it sent, never trusted for order.

Sequence numbers order the data; a peer's clock only stamps ``created`` on its
bundles and acks (signed). A wrong clock is still worth knowing: signatures are
checked against those times, retention and the audit report go by them. Each
estimate is a bound, not a guess, because transit takes time (a stick may
take days):

- an ack for our bundle N was made after we sealed N and before we read the ack:
  ``ack.created - read_at <= their clock - ours <= ack.created - sealed_at``;
- a bundle was made before we received it: ``their clock - ours >= created - received_at``.

A peer is reported when the bounds prove it off by more than ``max_clock_skew``
seconds (``exchange.toml`` ``[node]``, default 300): ahead when the lower bound is
above it, behind when the upper bound is below minus it. Only the newest ack and
bundle still in the archive are read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from exchange.database.direct import connect_existing, plain_file
from exchange.errors import ExchangeError, FormatError
from exchange.files import open_regular
from exchange.node.home import Node
from exchange.timefmt import aware
from exchange.wire import tarfmt
from exchange.wire.crypto import sshsig
from exchange.wire.formats import (
    ACK_DETAILS_MEMBER, ACK_MEMBERS, BUNDLE_MEMBERS, MAX_ACK_DETAILS_FILE, MAX_MANIFEST_BYTES, MAX_SIG_BYTES,
    ack_name, bundle_name,
)
from exchange.wire.signed import parse_json, parse_time, unpack_signed, verify_signed

# (Read without SQLAlchemy or the bundle reader on a SQLite home: `exchange doctor` stays light,
# docs/PERFORMANCE.md "Start-up". Only the signed outer members are read and verified.)


@dataclass(frozen=True)
class Estimate:
    """Bounds on ``peer``'s clock minus ours, in seconds (None: nothing to bound it by)."""

    peer: str
    low: float | None
    high: float | None
    evidence: str

    def off_by(self, allowed: float) -> float | None:
        """How far beyond ``allowed`` the peer's clock is proven to be (+ ahead, - behind), else None."""
        if self.low is not None and self.low > allowed:
            return self.low
        if self.high is not None and self.high < -allowed:
            return self.high
        return None

    def describe(self, allowed: float) -> str:
        off = self.off_by(allowed)
        if off is not None:
            way = "ahead of" if off > 0 else "behind"
            return (f"{self.peer}'s clock is at least {abs(off):.0f}s {way} this node's "
                    f"(allowed {allowed:.0f}s; {self.evidence})")
        if self.low is None and self.high is None:
            return f"{self.peer}: no signed time received yet"
        return f"{self.peer}: within {allowed:.0f}s ({self.evidence})"


def _secs(a: datetime, b: datetime) -> float:
    return (aware(a) - aware(b)).total_seconds()


# the newest across the peer's lanes (a seq counts within its lane): by time, then seq
_ACKED = ("SELECT seq, created_at, processed_at FROM xchg_sent WHERE peer = ? AND processed_at IS NOT NULL "
          "ORDER BY processed_at DESC, seq DESC LIMIT 1")
_GOT = "SELECT seq, received_at FROM xchg_received WHERE peer = ? ORDER BY received_at DESC, seq DESC LIMIT 1"


def _time(value: Any) -> datetime:
    return aware(value if isinstance(value, datetime) else datetime.fromisoformat(str(value)))


def _latest(node: Node, peer: str) -> tuple[Sequence[Any] | None, Sequence[Any] | None]:
    """(seq, sealed at, ack read at) of the newest acked bundle to ``peer``; (seq, received at) of the
    newest bundle from it."""
    path = plain_file(node.cfg.database)
    if path is not None:
        try:
            with closing(connect_existing(path)) as conn:
                return conn.execute(_ACKED, (peer,)).fetchone(), conn.execute(_GOT, (peer,)).fetchone()
        except sqlite3.Error:
            pass  # SQLAlchemy reads it, and reports any error as it always has
    with node.engine.connect() as conn:
        qmark = conn.dialect.paramstyle == "qmark"
        cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            acked = cur.execute(_ACKED if qmark else _ACKED.replace("?", "%s"), (peer,)).fetchone()
            got = cur.execute(_GOT if qmark else _GOT.replace("?", "%s"), (peer,)).fetchone()
        finally:
            cur.close()
    return acked, got


def _ack_created(path: Path, peer: str, trust: sshsig.AllowedSigners) -> datetime:
    """The signed ``created`` of an ack by ``peer`` (its signature verified)."""
    got = unpack_signed(path, ACK_MEMBERS, MAX_MANIFEST_BYTES, "ack", (ACK_DETAILS_MEMBER, MAX_ACK_DETAILS_FILE))
    created = parse_time(parse_json(got.raw, "ack").get("created"), "ack created")
    verify_signed(got.sig, got.raw, peer, trust, created)
    return created


def _bundle_created(path: Path, peer: str, trust: sshsig.AllowedSigners) -> datetime:
    """The signed ``created`` of a bundle by ``peer``: its manifest and signature only, not the payload."""
    with open_regular(path) as f:
        _h, raw = tarfmt.read_member(f, BUNDLE_MEMBERS[0], MAX_MANIFEST_BYTES, "bundle")
        _h, sig = tarfmt.read_member(f, BUNDLE_MEMBERS[1], MAX_SIG_BYTES, "bundle")
    manifest = parse_json(raw, "bundle manifest")
    if manifest.get("sender") != peer:
        raise FormatError(f"{path.name}: manifest names sender {manifest.get('sender')!r}, not {peer!r}")
    created = parse_time(manifest.get("created"), "bundle created")
    verify_signed(sig, raw, peer, trust, created)
    return created


def estimate(node: Node, peer: str) -> Estimate:
    """Bounds from the newest acked bundle's ack and the newest bundle received from ``peer``."""
    low: float | None = None
    high: float | None = None
    notes: list[str] = []
    archive = node.cfg.archive_received
    acked, got = _latest(node, peer)
    if acked is not None:
        path = archive / ack_name(peer, node.id, int(acked[0]))
        if path.is_file():
            created = _ack_created(path, peer, node.trust)
            low, high = _secs(created, _time(acked[2])), _secs(created, _time(acked[1]))
            notes.append(f"ack #{acked[0]} signed {aware(created).isoformat()}")
    if got is not None:
        path = archive / bundle_name(peer, node.id, int(got[0]))
        if path.is_file():
            created = _bundle_created(path, peer, node.trust)
            bound = _secs(created, _time(got[1]))
            low = bound if low is None else max(low, bound)
            notes.append(f"bundle #{got[0]} signed {aware(created).isoformat()}")
    return Estimate(peer, low, high, "; ".join(notes) or "nothing archived")


def check(node: Node) -> str:
    """The doctor's check: every peer within the allowed skew, or an error naming those that are not."""
    allowed = float(node.cfg.max_clock_skew)
    found = [estimate(node, p) for p in sorted(node.cfg.peers)]
    bad = [e.describe(allowed) for e in found if e.off_by(allowed) is not None]
    if bad:
        raise ExchangeError("; ".join(bad), hint="Set the clock of that node (enable NTP). Data is ordered by "
                            "sequence numbers and is not affected; signed times, retention and the audit "
                            "report's days are.")
    return "; ".join(e.describe(allowed) for e in found) or "no peers"


def warnings(node: Node) -> list[str]:
    """One line per peer whose clock is proven off by more than the allowed skew (for ``status``)."""
    allowed = float(node.cfg.max_clock_skew)
    out = []
    for p in sorted(node.cfg.peers):
        try:
            e = estimate(node, p)
        except (ExchangeError, OSError):
            continue  # an archived file unreadable now: the doctor says why
        if e.off_by(allowed) is not None:
            out.append(e.describe(allowed))
    return out
