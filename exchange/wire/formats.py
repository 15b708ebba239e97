"""Magic strings, versions, limits and the file-name grammar of docs/FORMAT.md.

One module holds what defines the on-disk format, so a change to the format is
a change here and in docs/FORMAT.md together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Literal

from exchange.errors import FormatError
from exchange.vocabulary import DEFAULT_LANE as DEFAULT_LANE, LANE_RE as LANE_RE, AckResult

FORMAT_VERSION = 1  # the `version` of bundles, payloads, transfers and receipts
SUPPORTED_VERSIONS = frozenset({1})
SPEC_VERSION = 7  # docs/FORMAT.md's version: 2 = acks v2 (details encrypted, stream heads), checkpoints v2;
#                  3 = the key notice, acks v3 (an operator's decision), heartbeats, the catalog, _bases,
#                      zone-aware times (timestamp[us, tz=UTC] plus an offset column);
#                  4 = checkpoints v3 (a pruned operator's decision), the stream restart (summary.restart,
#                      summary.restart_base: exchange.wire.restart);
#                  5 = lanes (a stream per sender, recipient and lane; the lane in names, manifests, acks),
#                      the restart record's `lanes`;
#                  6 = heartbeats v2 (a node's conflicts with the peer, its changes to the peer's documents);
#                      every reference business time zone-aware (item.updated_at, customer.created_at and its
#                      created_at_offset); readers take a UTC time for a column not migrated yet (naive, UTC)
#                  7 = the restart record's `ho_went_back` (the HO restored from its own backup)
ACK_VERSION = 2  # acks written now; version 1 acks (clear details) are still read
ACK_DECISION_VERSION = 3  # an ack carrying an operator's decision (skipped, superseded)
ACK_VERSIONS = frozenset({1, 2, 3})
SUPERSEDES = "supersedes"  # inner manifest summary: the sender's notices that earlier seqs are superseded
MAX_SUPERSEDES = 100  # notices one bundle carries (the newest)

BUNDLE_FORMAT = "exchange-bundle"
ACK_FORMAT = "exchange-ack"
PAYLOAD_FORMAT = "exchange-payload"
SIG_NAMESPACE = "exchange-bundle"

PAYLOAD_MEMBER = "payload.tar.age"
BUNDLE_MEMBERS = ("manifest.json", "manifest.json.sig", PAYLOAD_MEMBER)
ACK_MEMBERS = ("ack.json", "ack.json.sig")
ACK_DETAILS_MEMBER = "details.json.age"  # ack v2: the third member, age-encrypted details
ACK_DETAILS_FORMAT = "exchange-ack-details"
INNER_MANIFEST = "inner.json"
EVENTS_TABLE = "_events"
BASES_TABLE = "_bases"  # v3: per document editable on both sides, the version its change was based on

MAX_MANIFEST_BYTES = 1 << 20
MAX_SIG_BYTES = 8 << 10
MAX_PAYLOAD_BYTES = (8 << 30) - 1
MAX_INNER_MANIFEST_BYTES = 4 << 20
MAX_TABLES = 1000
MAX_TABLE_BYTES = 4 << 30  # uncompressed size of all tables of one bundle (Parquet metadata)
MAX_JSON_DEPTH = 32
MAX_SEQ = 9_999_999_999
MAX_COUNT = 999_999_999  # any count in an ack or checkpoint (documents, rows, parked, stale)
MAX_ACK_PARKED = 1000  # parked documents listed in one ack (the count says how many in all)
MAX_ACK_DETAILS_BYTES = 1 << 20  # plaintext of an ack's details; its age file at most +64 KiB header
#: the age file of an ack's details: the plaintext limit, an age header (at most 64 KiB) and chunk tags
MAX_ACK_DETAILS_FILE = MAX_ACK_DETAILS_BYTES + (80 << 10)
ACK_DETAILS_PAD = 4096  # the details' JSON is padded with spaces to a multiple of this
MAX_REASON_CHARS = 16 << 10  # a REJECTED reason is cut there (it names a document, not a dump)
ACK_RESULTS = tuple(AckResult)  # what an ack (and a checkpoint's record of one) may say
ACK_V2_FIELDS = ("format", "version", "app_version", "acker", "sender", "seq", "bundle_sha256",
                 "manifest_sha256", "result", "created", "heads", "details", "details_plain_sha256")

# Checkpoints (docs/FORMAT.md section 10): what `archive prune` removed, signed in the outer form of an ack.
CHECKPOINT_FORMAT = "exchange-checkpoint"
CHECKPOINT_VERSION = 2  # 2 adds ``role``; version 1 checkpoints are still read
#: 3 adds ``decided`` to an ack entry (a REJECTED ack carrying an operator's decision); written only then
CHECKPOINT_DECIDED_VERSION = 3
CHECKPOINT_VERSIONS = frozenset({1, 2, 3})
CHECKPOINT_MEMBERS = ("checkpoint.json", "checkpoint.json.sig")
CHECKPOINT_SUFFIX = ".checkpoint"
CHECKPOINTS_DIR = "checkpoints"
MAX_CHECKPOINT_BYTES = 8 << 20
MAX_CHECKPOINT_BUNDLES = 2000  # bundles per checkpoint file; a longer run is split
MAX_CHECKPOINT_ACKS = 8 * MAX_CHECKPOINT_BUNDLES  # acks recorded (copies and REJECTED-then-APPLIED)
MAX_CHECKPOINT_REMOVED = 32 * MAX_CHECKPOINT_BUNDLES  # files recorded as removed
MAX_FILE_SIZE = 1 << 34  # a removed file's recorded size (a bundle is at most 8 GiB)
ROLES = ("ho", "store")

# USB receipts (docs/USB.md): one signed receipt per stick visit, in the outer form of an ack.
RECEIPT_FORMAT = "exchange-usb-receipt"
RECEIPT_MEMBERS = ("receipt.json", "receipt.json.sig")
RECEIPT_SUFFIX = ".receipt"
MAX_RECEIPT_BYTES = MAX_MANIFEST_BYTES

# Heartbeats (docs/FORMAT.md section 12): "alive, this version, this health", one per peer per sync.
HEARTBEAT_FORMAT = "exchange-heartbeat"
HEARTBEAT_VERSION = 2  # written to a peer known to read it (HEARTBEAT_V2_SINCE), else version 1
HEARTBEAT_VERSIONS = frozenset({1, 2})
#: the first exchange version that reads heartbeat version 2: a peer whose signed app_version is older
#: (or not known yet) is sent version 1, which every version reads
HEARTBEAT_V2_SINCE = "1.1.0"
HEARTBEAT_MEMBERS = ("heartbeat.json", "heartbeat.json.sig")
HEALTH_MEMBER = "health.json.age"  # the third member: the node's health, age-encrypted to the peer
HEALTH_FORMAT = "exchange-heartbeat-health"
MAX_HEARTBEAT_BYTES = 16 << 10
MAX_HEALTH_BYTES = 16 << 10  # plaintext of the health; its age file at most +80 KiB (header, tags)
MAX_HEALTH_FILE = MAX_HEALTH_BYTES + (80 << 10)
HEALTH_PAD = 1024
#: what a heartbeat's health counts, each 0 .. MAX_COUNT, about the stream pair of the node and that peer
HEALTH_V1_FIELDS = ("waiting", "held", "failed", "parked", "quarantined", "unacked")
#: version 2 adds the node's conflicts with the peer (docs/CATALOG.md): held for a person, decided by a
#: policy, and its own standing changes to documents the peer owns (a store's price edit)
HEALTH_FIELDS = (*HEALTH_V1_FIELDS, "conflicts_held", "conflicts_decided", "foreign_edits")
#: version 2's ``foreign``: at most this many of those changes named (type, key, a digest per column)
MAX_FOREIGN = 10
MAX_FOREIGN_KEY_PARTS = 8
MAX_FOREIGN_KEY_CHARS = 128  # each part of a key
MAX_FOREIGN_COLUMNS = 64
FOREIGN_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")  # a document type or column a heartbeat names
HEARTBEAT_V1_FIELDS = ("format", "version", "app_version", "node", "peer", "created", "health",
                       "health_plain_sha256")
MAX_CLOCK_AHEAD = 3600  # seconds a heartbeat's `created` may be ahead of the receiver's clock

# Signed times: exactly YYYY-MM-DDTHH:MM:SSZ, ASCII digits ([0-9], never \d: see _NAME_RE below).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
TIME_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
HEX64 = frozenset("0123456789abcdef")
TABLE_FILE = "t{:04d}.parquet"  # the n-th table of a payload, from 1

NODE_ID = r"[a-z0-9][a-z0-9-]{0,31}"
NODE_ID_RE = re.compile(rf"^{NODE_ID}$")
#: Lanes (format 5): a stream is per sender, recipient and lane. The default lane keeps the names of
#: format 3 (no lane in the name, none in the manifest or the ack), so files written before stay valid.
LANE = LANE_RE.pattern.strip("^$")  # DEFAULT_LANE and LANE_RE live in exchange.vocabulary (every layer)
# [0-9], never \d: \d and int() also take other scripts' digits ('٣'), which the grammar does not allow.
_NAME_RE = re.compile(rf"^({NODE_ID})\.({NODE_ID})\.(?:({LANE})\.)?([0-9]{{10}})\.(bundle|ack)$")
_HEARTBEAT_RE = re.compile(rf"^({NODE_ID})\.({NODE_ID})\.heartbeat$")
PART_SUFFIX = ".part"

Kind = Literal["bundle", "ack", "heartbeat"]


@dataclass(frozen=True)
class FileName:
    """A parsed bundle, ack or heartbeat name: for an ack, ``a`` is the acker and ``b`` the sender;
    for a heartbeat ``a`` is its node, ``b`` the peer it is for, and ``seq`` 0 (it has none)."""

    a: str
    b: str
    seq: int
    kind: Kind
    lane: str = DEFAULT_LANE  # format 5: the stream's lane; the default lane is not written in the name

    def __str__(self) -> str:
        if self.kind == "heartbeat":
            return f"{self.a}.{self.b}.heartbeat"
        return f"{self.a}.{self.b}.{lane_part(self.lane)}{self.seq:010d}.{self.kind}"


def lane_part(lane: str) -> str:
    """The lane as a file name spells it: nothing for the default lane, else ``lane.``."""
    return "" if lane == DEFAULT_LANE else f"{lane}."


def check_lane(lane: object, what: str = "lane") -> str:
    """A lane name (1-16 of a-z, 0-9 and '-', starting with a letter); FormatError otherwise."""
    if not isinstance(lane, str) or not LANE_RE.fullmatch(lane):
        raise FormatError(f"{what}: invalid lane {lane!r}: use 1-16 of a-z, 0-9 and '-', starting with a letter")
    return lane


def lane_field(obj: Mapping[str, Any], what: str) -> str:
    """The optional ``lane`` of a signed JSON file (manifest, ack, checkpoint; format 5): absent means the
    default lane, which is never written out (one spelling per file, and default-lane files stay format 3's)."""
    if "lane" not in obj:
        return DEFAULT_LANE
    lane = check_lane(obj["lane"], f"{what}: lane")
    if lane == DEFAULT_LANE:
        raise FormatError(f"{what}: the default lane {DEFAULT_LANE!r} is written by leaving lane out")
    return lane


def stream_label(sender: str, recipient: str, lane: str = DEFAULT_LANE) -> str:
    """A stream as messages name it: ``ho->s001`` (default lane) or ``ho->s001 [masters]``."""
    return f"{sender}->{recipient}" + ("" if lane == DEFAULT_LANE else f" [{lane}]")


def bundle_name(sender: str, recipient: str, seq: int, lane: str = DEFAULT_LANE) -> str:
    return str(FileName(sender, recipient, seq, "bundle", lane))


def ack_name(acker: str, sender: str, seq: int, lane: str = DEFAULT_LANE) -> str:
    return str(FileName(acker, sender, seq, "ack", lane))


def heartbeat_name(node: str, peer: str) -> str:
    return str(FileName(node, peer, 0, "heartbeat"))


def parse_name(name: str) -> FileName:
    """Parse a bundle/ack/heartbeat file name; FormatError if it does not follow the grammar."""
    h = _HEARTBEAT_RE.fullmatch(name)
    if h:
        return FileName(h.group(1), h.group(2), 0, "heartbeat")
    m = _NAME_RE.fullmatch(name)
    # the default lane is never spelled out: one file, one name
    if not m or not 1 <= int(m.group(4)) <= MAX_SEQ or m.group(3) == DEFAULT_LANE:
        raise FormatError(f"{name}: not a bundle or ack file name "
                          "(expected <sender>.<recipient>[.<lane>].<seq:010d>.bundle or .ack)")
    kind: Kind = "bundle" if m.group(5) == "bundle" else "ack"
    return FileName(m.group(1), m.group(2), int(m.group(4)), kind, m.group(3) or DEFAULT_LANE)


def is_exchange_file(name: str) -> bool:
    """True for complete bundle/ack/heartbeat names; ``.part`` and temporary names are not."""
    m = _NAME_RE.fullmatch(name)
    return (m is not None and m.group(3) != DEFAULT_LANE) or _HEARTBEAT_RE.fullmatch(name) is not None


def check_node_id(node: str) -> str:
    if not NODE_ID_RE.fullmatch(node):
        raise FormatError(f"invalid node id {node!r}: use 1-32 of a-z, 0-9 and '-', starting with a letter or digit")
    return node


def app_major(version: str) -> int:
    major = version.split(".", 1)[0]
    if not (major.isascii() and major.isdigit()):
        raise FormatError(f"invalid application version {version!r}")
    return int(major)
