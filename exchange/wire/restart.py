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

    def as_json(self) -> dict[str, Any]:
        return {"format": RESTART_FORMAT, "version": RESTART_VERSION, "by": self.by, "at": format_time(self.at),
                "reason": self.reason, "received": {"seq": self.received_seq,
                                                    "manifest_sha256": self.received_manifest},
                "version_high": self.version_high, "applied": [[s, h] for s, h in self.applied]}

    def manifest_at(self, seq: int) -> str | None:
        """The manifest SHA-256 the HO applied at ``seq``, when the record lists it."""
        if seq == self.received_seq:
            return self.received_manifest
        return dict(self.applied).get(seq)


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


def parse_restart(obj: Any) -> Restart:
    """The summary's ``restart`` object, strictly (exactly its fields, bounded), or FormatError."""
    if not isinstance(obj, dict) or sorted(obj) != sorted(_FIELDS):
        raise FormatError(f"restart record: expected exactly the fields {', '.join(_FIELDS)}")
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
                   seq, manifest, _int(obj["version_high"], 0, MAX_VERSION, "version_high"), tuple(pairs))


def parse_base(obj: Any) -> Base:
    """A store's ``restart_base``, strictly, or FormatError."""
    if not isinstance(obj, dict) or sorted(obj) != ["restart", "seq", "version"]:
        raise FormatError("restart_base: expected exactly {restart, seq, version}")
    return Base(_int(obj["restart"], 2, MAX_SEQ, "restart_base.restart"), _int(obj["seq"], 0, MAX_SEQ, "restart_base.seq"),
                _int(obj["version"], 0, MAX_VERSION, "restart_base.version"))
