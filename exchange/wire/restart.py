"""The restart record (docs/FORMAT.md section 4.2): an HO re-bases both streams with a store that went back.

A store restored from a backup (or re-made after its disk died) no longer
knows where its two streams with the HO stand. The HO seals the next bundle of
its stream to the store with ``prev`` null and, in the encrypted summary, this
record: how far the HO applied the store's stream (``received``), the highest
version it applied from the store (``version``) and the (seq, manifest SHA-256)
of the last bundles it applied from the store (``applied``), so the store can
tell which of its own bundles the HO holds. A store answers, in the summary of
the bundles it sends next, with its restored point (``restart_base``).

Both are read from a peer: every field is checked (types, bounds, sizes) before
anything is built from it, and a malformed one is a FormatError (quarantine).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from exchange.errors import FormatError
from exchange.vocabulary import DEFAULT_LANE, LANE_RE
from exchange.wire.formats import MAX_SEQ
from exchange.wire.signed import format_time, parse_time, sha256_field

#: Inner manifest summary field of the HO's restart bundle.
RESTART_FIELD = "restart"
#: Inner manifest summary field of a store's bundles after a restart: its restored point.
BASE_FIELD = "restart_base"
RESTART_FORMAT = "exchange-restart"
RESTART_VERSION = 1
MAX_APPLIED = 1000  # (seq, manifest) pairs a restart lists: the newest the HO applied from the store
MAX_VERSION = (1 << 62) - 1  # document versions (event ids and the clock) stay below this
MAX_TEXT = 1024  # `by` and `reason`
_FIELDS = ("format", "version", "by", "at", "reason", "received", "version_high", "applied")
LANES_FIELD = "lanes"  # optional: the positions of the lanes other than the default lane (docs/CATALOG.md "Lanes")
MAX_LANES = 64
#: Optional (format 7): the HO itself went back in time (restored from its own backup). The last seq of the
#: HO's stream in the default lane the store had applied, as the store reported it (``--above``): the restart
#: bundle's seq is above it, and the store forgets the versions it holds of the HO's own documents, so the
#: reload that follows (versions from the HO's restored clock) is not dropped as stale.
WENT_BACK_FIELD = "ho_went_back"
_LANE_FIELDS = ["lane", "received", "sent"]


@dataclass(frozen=True)
class LanePos:
    """Both streams of one lane other than the default lane, as the HO stands: the last seq of the store's
    stream it applied in that lane (and its manifest), and the last seq of its own it sealed in that lane."""

    lane: str
    received_seq: int
    received_manifest: str | None
    sent_seq: int
    sent_manifest: str | None

    def as_json(self) -> dict[str, Any]:
        return {"lane": self.lane, "received": {"seq": self.received_seq, "manifest_sha256": self.received_manifest},
                "sent": {"seq": self.sent_seq, "manifest_sha256": self.sent_manifest}}


@dataclass(frozen=True)
class Restart:
    """The HO's restart record as signed into its restart bundle."""

    by: str
    at: datetime
    reason: str
    received_seq: int  # the last seq of the store's stream the HO applied (0: none)
    received_manifest: str | None  # its manifest SHA-256 (None only for seq 0)
    version_high: int  # the highest document version the HO applied from the store
    applied: tuple[tuple[int, str], ...]  # (seq, manifest SHA-256), ascending, all <= received_seq
    lanes: tuple[LanePos, ...] = ()  # every other lane's positions (the restart re-bases every lane)
    went_back: int = 0  # the HO restored from its backup: the store had applied its stream up to this seq

    def as_json(self) -> dict[str, Any]:
        out = {"format": RESTART_FORMAT, "version": RESTART_VERSION, "by": self.by, "at": format_time(self.at),
                "reason": self.reason, "received": {"seq": self.received_seq,
                                                    "manifest_sha256": self.received_manifest},
                "version_high": self.version_high, "applied": [[s, h] for s, h in self.applied]}
        if self.lanes:  # written only with lanes: a record without them is the one format 4 had (format 5 adds it)
            out[LANES_FIELD] = [x.as_json() for x in self.lanes]
        if self.went_back:  # written only when the HO went back: a reader before format 7 refuses the record
            out[WENT_BACK_FIELD] = self.went_back
        return out

    def manifest_at(self, seq: int, lane: str = DEFAULT_LANE) -> str | None:
        """The manifest SHA-256 the HO applied at ``seq`` of ``lane``, when the record lists it (of a lane
        other than the default one, only its last position is listed)."""
        if lane != DEFAULT_LANE:
            pos = self.lane(lane)
            return pos.received_manifest if seq == pos.received_seq else None
        if seq == self.received_seq:
            return self.received_manifest
        return dict(self.applied).get(seq)

    def received_in(self, lane: str) -> tuple[int, str | None]:
        """(seq, manifest) of the last bundle of the store's stream in ``lane`` the HO applied."""
        if lane == DEFAULT_LANE:
            return self.received_seq, self.received_manifest
        pos = self.lane(lane)
        return pos.received_seq, pos.received_manifest

    def lane(self, lane: str) -> LanePos:
        """Both positions in a lane other than the default one (a lane the record does not list: none)."""
        return next((x for x in self.lanes if x.lane == lane), LanePos(lane, 0, None, 0, None))


@dataclass(frozen=True)
class Base:
    """A store's restored point, carried in its bundles after a restart (``restart_base``)."""

    restart: int  # the seq of the HO's restart bundle it answers
    seq: int  # the last of its own bundles the HO holds as the store sealed it
    version: int  # the highest version the store had sent in those bundles

    def as_json(self) -> dict[str, int]:
        return {"restart": self.restart, "seq": self.seq, "version": self.version}


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"restart record: {what} must be an integer {lo} .. {hi}, not {str(value)[:40]!r}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT or not value.isprintable():
        raise FormatError(f"restart record: {what} must be 1 to {MAX_TEXT} printable characters")
    return value


def _position(value: Any, what: str) -> tuple[int, str | None]:
    """``{seq, manifest_sha256}``: seq 0 with null, or seq >= 1 with a SHA-256."""
    if not isinstance(value, dict) or sorted(value) != ["manifest_sha256", "seq"]:
        raise FormatError(f"restart record: {what} must be {{seq, manifest_sha256}}")
    seq = _int(value["seq"], 0, MAX_SEQ, f"{what}.seq")
    if seq == 0:
        if value["manifest_sha256"] is not None:
            raise FormatError(f"restart record: {what}.manifest_sha256 must be null for seq 0")
        return 0, None
    return seq, sha256_field(value["manifest_sha256"], f"restart record: {what}.manifest_sha256")


def _lanes(value: Any) -> tuple[LanePos, ...]:
    """The optional ``lanes``: at most MAX_LANES entries, each a lane other than the default one, once."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LANES:
        raise FormatError(f"restart record: lanes must be a list of 1 to {MAX_LANES} lane positions")
    out: list[LanePos] = []
    for item in value:
        if not isinstance(item, dict) or sorted(item) != _LANE_FIELDS:
            raise FormatError("restart record: a lanes entry must be exactly {lane, received, sent}")
        lane = item["lane"]
        if not isinstance(lane, str) or not LANE_RE.fullmatch(lane) or lane == DEFAULT_LANE:
            raise FormatError(f"restart record: {str(lane)[:20]!r} is not a lane other than the default lane")
        if any(x.lane == lane for x in out):
            raise FormatError(f"restart record: lane {lane} listed twice")
        r_seq, r_man = _position(item["received"], f"lanes[{lane}].received")
        s_seq, s_man = _position(item["sent"], f"lanes[{lane}].sent")
        out.append(LanePos(lane, r_seq, r_man, s_seq, s_man))
    return tuple(out)


def parse_restart(obj: Any) -> Restart:
    """The summary's ``restart`` object, strictly (exactly its fields, bounded), or FormatError."""
    if not isinstance(obj, dict) or sorted(set(obj) - {LANES_FIELD, WENT_BACK_FIELD}) != sorted(_FIELDS):
        raise FormatError(f"restart record: expected exactly the fields {', '.join(_FIELDS)} (and {LANES_FIELD}, "
                          f"{WENT_BACK_FIELD})")
    if obj["format"] != RESTART_FORMAT or type(obj["version"]) is not int or obj["version"] != RESTART_VERSION:
        raise FormatError(f"restart record: unknown format {str(obj['format'])[:40]!r} version "
                          f"{str(obj['version'])[:10]!r}")
    received = obj["received"]
    if not isinstance(received, dict) or sorted(received) != ["manifest_sha256", "seq"]:
        raise FormatError("restart record: received must be {seq, manifest_sha256}")
    seq = _int(received["seq"], 0, MAX_SEQ, "received.seq")
    if seq == 0 and received["manifest_sha256"] is not None:
        raise FormatError("restart record: received.manifest_sha256 must be null for seq 0")
    manifest = None if seq == 0 else sha256_field(received["manifest_sha256"], "restart record: received.manifest_sha256")
    applied = obj["applied"]
    if not isinstance(applied, list) or len(applied) > MAX_APPLIED:
        raise FormatError(f"restart record: applied must be a list of at most {MAX_APPLIED} [seq, sha256]")
    pairs: list[tuple[int, str]] = []
    for item in applied:
        if not isinstance(item, list) or len(item) != 2:
            raise FormatError("restart record: applied entries are [seq, manifest_sha256]")
        s = _int(item[0], 1, seq, "applied seq (at most received.seq)")
        if pairs and s <= pairs[-1][0]:
            raise FormatError("restart record: applied seqs must ascend")
        pairs.append((s, sha256_field(item[1], "restart record: applied manifest")))
    if seq and pairs and pairs[-1] != (seq, manifest):
        raise FormatError("restart record: the last applied entry must be received")
    return Restart(_text(obj["by"], "by"), parse_time(obj["at"], "restart record: at"), _text(obj["reason"], "reason"),
                   seq, manifest, _int(obj["version_high"], 0, MAX_VERSION, "version_high"), tuple(pairs),
                   _lanes(obj[LANES_FIELD]) if LANES_FIELD in obj else (),
                   _int(obj[WENT_BACK_FIELD], 1, MAX_SEQ, WENT_BACK_FIELD) if WENT_BACK_FIELD in obj else 0)


def parse_base(obj: Any) -> Base:
    """A store's ``restart_base``, strictly, or FormatError."""
    if not isinstance(obj, dict) or sorted(obj) != ["restart", "seq", "version"]:
        raise FormatError("restart_base: expected exactly {restart, seq, version}")
    return Base(_int(obj["restart"], 2, MAX_SEQ, "restart_base.restart"), _int(obj["seq"], 0, MAX_SEQ, "restart_base.seq"),
                _int(obj["version"], 0, MAX_VERSION, "restart_base.version"))
