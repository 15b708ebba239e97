"""Archive retention: remove old bundles and acks, leave a signed checkpoint.

A node's ``archive/`` grows forever. ``exchange archive prune`` removes the
bundles (and their acks) older than a number of days, per stream, as a
contiguous run from the oldest: a bundle is only removed when it verifies, an
``APPLIED`` ack for exactly that file is in the archive, both are older than the
cutoff and its ``prev`` continues the chain. The newest bundle of a stream (the
chain's anchor) and its ack are never removed.

Before anything is deleted, the node writes and fsyncs a **checkpoint** into
``archive/checkpoints/``: a JSON record of what it removed (every file's name
and SHA-256, each bundle's manifest SHA-256 and ``prev``, each ack's result),
signed with the node's key in the outer form of an ack (docs/FORMAT.md section
10). ``exchange audit verify`` treats a checkpoint signed by a trusted node as
the stream's chain anchor for the first remaining bundle, so an archive keeps
verifying after pruning. A crash between writing the checkpoint and deleting
the files is finished by the next run.

The checkpoint format and the archive scan live here; ``exchange.audit.verify``
reads checkpoints with :func:`read_checkpoint`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from exchange import __version__
from exchange.errors import ExchangeError, FormatError, LimitError
from exchange.faults import crashpoint
from exchange.files import COPY_CHUNK, fsync_dir, kind_of, open_regular, utc_now, write_file_atomic
from exchange.wire.bundle import Ack, BundleReader, read_ack
from exchange.wire.crypto import sshsig
from exchange.wire.formats import (
    ACK_DECISION_VERSION, ACK_RESULTS, CHECKPOINT_DECIDED_VERSION, CHECKPOINT_FORMAT, CHECKPOINT_MEMBERS,
    CHECKPOINT_SUFFIX, CHECKPOINT_VERSION, CHECKPOINT_VERSIONS, CHECKPOINTS_DIR, MAX_CHECKPOINT_ACKS,
    MAX_CHECKPOINT_BUNDLES, MAX_CHECKPOINT_BYTES, MAX_CHECKPOINT_REMOVED, MAX_FILE_SIZE, MAX_SEQ, NODE_ID, ROLES,
    bundle_name, parse_name,
)
from exchange.wire.formats import DEFAULT_LANE, LANE, check_lane, lane_field, lane_part, stream_label
from exchange.wire.signed import (
    check_format, dump_json, format_time, json_field, node_field, pack_signed, parse_json, parse_time,
    seq_field, sha256_field, unpack_signed, verify_signed, with_file_name,
)
from exchange.vocabulary import AckResult

log = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(rf"^({NODE_ID})\.({NODE_ID})\.({NODE_ID})\.(?:({LANE})\.)?([0-9]{{10}})\.checkpoint$")
# The importer keeps a second copy of an archived name as NAME.YYYYMMDDHHMMSS.
_STAMPED_RE = re.compile(r"^(.+\.(?:bundle|ack))\.[0-9]{14}$")

Kind = Literal["bundle", "ack", "checkpoint"]


# ---------------------------------------------------------------- archive scan

@dataclass(frozen=True)
class ArchiveFile:
    """A bundle, ack or checkpoint found under an archive root."""

    path: Path
    rel: str  # path relative to the root, with '/' separators
    kind: Kind
    canonical: str  # the name without the importer's .YYYYMMDDHHMMSS suffix
    refused: str = ""  # why the entry is never read: a link, FIFO, device... ('' for a regular file)


def classify(name: str) -> tuple[Kind, str] | None:
    """The kind of an archive file name, and its name without a timestamp suffix."""
    m = _STAMPED_RE.fullmatch(name)
    if m:
        try:
            parse_name(m.group(1))
        except FormatError:
            return None
        name = m.group(1)
    for kind in ("bundle", "ack", "checkpoint"):
        if name.endswith("." + kind) and len(name) > len(kind) + 1:
            return kind, name
    return None


def scan_archive(root: Path) -> list[ArchiveFile]:
    """Every ``*.bundle``, ``*.ack`` and ``*.checkpoint`` under ``root`` (any layout), sorted.

    Entries are judged by ``lstat``: one that is not a regular file (a link, which
    would be followed; a FIFO, which would block a reader) is listed with ``refused``
    set, for the caller to report, and is never opened.
    """
    root = Path(root)
    out: list[ArchiveFile] = []
    for dirpath, dirnames, filenames in os.walk(root):  # never descends into a linked folder
        dirnames.sort()
        for name in sorted(filenames):
            c = classify(name)
            if c is None:
                continue
            path = Path(dirpath) / name
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            refused = "" if stat.S_ISREG(mode) else \
                f"{c[0]} file is {kind_of(mode)}, not a regular file: refused, not opened or followed"
            out.append(ArchiveFile(path, path.relative_to(root).as_posix(), c[0], c[1], refused))
    return out


def sha256_of(path: Path) -> tuple[str, int]:
    """SHA-256 and size of an archive file, opened as a regular file only (NotRegularFileError)."""
    h, size = hashlib.sha256(), 0
    with open_regular(path) as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# ---------------------------------------------------------------- checkpoint format

@dataclass(frozen=True)
class PrunedBundle:
    seq: int
    name: str
    created: str
    sha256: str
    manifest_sha256: str
    prev: str | None

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "name": self.name, "created": self.created, "sha256": self.sha256,
                "manifest_sha256": self.manifest_sha256, "prev": self.prev}


@dataclass(frozen=True)
class PrunedAck:
    seq: int
    name: str
    acker: str
    created: str
    sha256: str
    bundle_sha256: str
    result: str
    #: a REJECTED ack of version 3: an operator's signed decision (skipped, superseded) ended the seq
    decided: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "name": self.name, "acker": self.acker, "created": self.created,
                "sha256": self.sha256, "bundle_sha256": self.bundle_sha256, "result": self.result} | \
            ({"decided": True} if self.decided else {})


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: what a node removed from one stream of its archive."""

    node: str
    sender: str
    recipient: str
    first_seq: int
    last_seq: int
    prev: str | None
    last_manifest_sha256: str
    created: datetime
    cutoff: datetime
    app_version: str
    bundles: tuple[PrunedBundle, ...]
    acks: tuple[PrunedAck, ...]
    removed: tuple[dict[str, Any], ...]
    raw: bytes = field(repr=False)
    file_sha256: str = ""
    role: str | None = None  # the pruning node's role (ho/store); None in a version 1 checkpoint
    lane: str = DEFAULT_LANE  # format 5: the stream's lane (absent from the file for the default lane)

    @property
    def stream(self) -> tuple[str, str, str]:
        return self.sender, self.recipient, self.lane

    @property
    def name(self) -> str:
        return checkpoint_name(self.node, self.sender, self.recipient, self.last_seq, self.lane)

    @classmethod
    def parse(cls, raw: bytes, file_sha256: str = "") -> Checkpoint:
        what = CHECKPOINT_MEMBERS[0]
        obj = parse_json(raw, what)
        check_format(obj, CHECKPOINT_FORMAT, what, CHECKPOINT_VERSIONS)
        version: int = obj["version"]
        role = obj.get("role") if version >= 2 else None
        if version >= 2 and role not in ROLES:
            raise FormatError(f"{what}: role {role!r} is not one of {', '.join(ROLES)}")
        sender = node_field(json_field(obj, "sender", str, what), what)
        recipient = node_field(json_field(obj, "recipient", str, what), what)
        node = node_field(json_field(obj, "node", str, what), what)
        first, last = json_field(obj, "first_seq", int, what), json_field(obj, "last_seq", int, what)
        if not 1 <= first <= last <= MAX_SEQ:
            raise LimitError(f"{what}: bad seq range {first}..{last} (1 to {MAX_SEQ})")
        if last - first >= MAX_CHECKPOINT_BUNDLES:  # checked before any list is built from the range
            raise LimitError(f"{what}: {last - first + 1} seqs in one checkpoint (at most {MAX_CHECKPOINT_BUNDLES})")
        prev = obj.get("prev")
        lists = {name: json_field(obj, name, list, what) for name in ("bundles", "acks", "removed")}
        for name, most in (("bundles", MAX_CHECKPOINT_BUNDLES), ("acks", MAX_CHECKPOINT_ACKS),
                           ("removed", MAX_CHECKPOINT_REMOVED)):
            if len(lists[name]) > most:
                raise LimitError(f"{what}: {len(lists[name])} {name} entries (at most {most})")
        bundles = []
        for i, b in enumerate(lists["bundles"]):
            w = f"{what} bundles[{i}]"
            if not isinstance(b, dict):
                raise FormatError(f"{w}: not an object")
            bp = b.get("prev")
            bundles.append(PrunedBundle(
                seq=seq_field(b.get("seq"), w, "seq"), name=json_field(b, "name", str, w),
                created=json_field(b, "created", str, w), sha256=sha256_field(b.get("sha256"), w),
                manifest_sha256=sha256_field(b.get("manifest_sha256"), w),
                prev=None if bp is None else sha256_field(bp, w)))
        if [b.seq for b in bundles] != list(range(first, last + 1)):
            raise FormatError(f"{what}: bundles do not list seq {first}..{last} in order")
        acks = []
        for i, a in enumerate(lists["acks"]):
            w = f"{what} acks[{i}]"
            if not isinstance(a, dict):
                raise FormatError(f"{w}: not an object")
            result = json_field(a, "result", str, w)
            if result not in ACK_RESULTS:
                raise FormatError(f"{w}: result {result!r}")
            decided = version >= CHECKPOINT_DECIDED_VERSION and "decided" in a  # the writer writes only true
            if decided and (a["decided"] is not True or result != AckResult.REJECTED):
                raise FormatError(f"{w}: decided must be true on a REJECTED ack, or absent")
            acks.append(PrunedAck(
                seq=seq_field(a.get("seq"), w, "seq"), name=json_field(a, "name", str, w),
                acker=node_field(json_field(a, "acker", str, w), w), created=json_field(a, "created", str, w),
                sha256=sha256_field(a.get("sha256"), w), bundle_sha256=sha256_field(a.get("bundle_sha256"), w),
                result=result, decided=decided))
            if acks[-1].acker != recipient or not first <= acks[-1].seq <= last:
                raise FormatError(f"{w}: an ack by {acks[-1].acker} for seq {acks[-1].seq}; only the recipient "
                                  f"{recipient}'s acks of seq {first}..{last} belong here")
        removed = []
        for i, r in enumerate(lists["removed"]):
            w = f"{what} removed[{i}]"
            if not isinstance(r, dict):
                raise FormatError(f"{w}: not an object")
            size = json_field(r, "size", int, w)
            if not 0 <= size <= MAX_FILE_SIZE:
                raise LimitError(f"{w}: size {size} is out of range (0 to {MAX_FILE_SIZE})")
            removed.append({"path": json_field(r, "path", str, w), "sha256": sha256_field(r.get("sha256"), w),
                            "size": size})
        cp = cls(
            node=node, sender=sender, recipient=recipient, first_seq=first, last_seq=last,
            prev=None if prev is None else sha256_field(prev, what),
            last_manifest_sha256=sha256_field(obj.get("last_manifest_sha256"), what),
            created=parse_time(json_field(obj, "created", str, what), what),
            cutoff=parse_time(json_field(obj, "cutoff", str, what), what),
            app_version=json_field(obj, "app_version", str, what),
            bundles=tuple(bundles), acks=tuple(acks), removed=tuple(removed), raw=raw,
            file_sha256=file_sha256, role=role, lane=lane_field(obj, what))
        if cp.prev != bundles[0].prev or cp.last_manifest_sha256 != bundles[-1].manifest_sha256:
            raise FormatError(f"{what}: prev / last_manifest_sha256 disagree with the bundle list")
        if node not in (sender, recipient):
            raise FormatError(f"{what}: signed by {node!r}, which is not an end of stream {sender}->{recipient}")
        return cp


def checkpoint_name(node: str, sender: str, recipient: str, last_seq: int, lane: str = DEFAULT_LANE) -> str:
    return f"{node}.{sender}.{recipient}.{lane_part(lane)}{last_seq:010d}{CHECKPOINT_SUFFIX}"


def parse_checkpoint_name(name: str) -> tuple[str, str, str, int, str]:
    """(node, sender, recipient, last seq, lane) of a checkpoint's file name."""
    m = _CHECKPOINT_RE.fullmatch(name)
    if not m or m.group(4) == DEFAULT_LANE:
        raise FormatError(f"{name}: not a checkpoint file name "
                          "(expected <node>.<sender>.<recipient>[.<lane>].<seq:010d>.checkpoint)")
    return m.group(1), m.group(2), m.group(3), int(m.group(5)), m.group(4) or DEFAULT_LANE


def build_checkpoint(*, key: Any, node: str, role: str, sender: str, recipient: str, cutoff: datetime,
                     bundles: Sequence[PrunedBundle], acks: Sequence[PrunedAck],
                     removed: Sequence[Mapping[str, Any]], created: datetime | None = None,
                     lane: str = DEFAULT_LANE) -> bytes:
    """The bytes of a signed checkpoint file (ustar: checkpoint.json, checkpoint.json.sig)."""
    if not bundles:
        raise ValueError("a checkpoint records at least one bundle")
    created = created or utc_now()
    raw = dump_json({
        "format": CHECKPOINT_FORMAT, "app_version": __version__,
        "version": CHECKPOINT_DECIDED_VERSION if any(a.decided for a in acks) else CHECKPOINT_VERSION,
        "node": node, "role": role, "sender": sender, "recipient": recipient,
        **({} if lane == DEFAULT_LANE else {"lane": check_lane(lane)}),
        "first_seq": bundles[0].seq, "last_seq": bundles[-1].seq, "prev": bundles[0].prev,
        "last_manifest_sha256": bundles[-1].manifest_sha256,
        "created": format_time(created), "cutoff": format_time(cutoff),
        "bundles": [b.as_json() for b in bundles], "acks": [a.as_json() for a in acks],
        "removed": [dict(r) for r in removed],
    })
    if len(raw) > MAX_CHECKPOINT_BYTES:
        raise LimitError(f"checkpoint of {len(raw)} bytes is over the limit")
    Checkpoint.parse(raw)  # never write what we would refuse to read
    return pack_signed(CHECKPOINT_MEMBERS, raw, key, created)


def read_checkpoint(path: Path, trust: sshsig.AllowedSigners) -> Checkpoint:
    """Parse and verify a checkpoint: structure, name, signature by ``node`` at ``created``."""
    path = Path(path)
    try:
        raw, sig, _none, file_sha = unpack_signed(path, CHECKPOINT_MEMBERS, MAX_CHECKPOINT_BYTES, "checkpoint")
        cp = Checkpoint.parse(raw, file_sha)
        verify_signed(sig, raw, cp.node, trust, cp.created)
        if parse_checkpoint_name(path.name) != (cp.node, cp.sender, cp.recipient, cp.last_seq, cp.lane):
            raise FormatError(f"file name disagrees with the signed checkpoint ({cp.name})")
        return cp
    except ExchangeError as exc:
        raise with_file_name(path, exc) from exc


# ---------------------------------------------------------------- prune

@dataclass
class StreamPrune:
    """What pruning did (or would do) to one stream of the node's archive."""

    sender: str
    recipient: str
    lane: str = DEFAULT_LANE
    first_seq: int | None = None
    last_seq: int | None = None
    kept_from: int | None = None
    stopped: str = ""
    removed: list[str] = field(default_factory=list)
    bytes: int = 0
    checkpoints: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # leftovers of an interrupted prune, removed now

    @property
    def stream(self) -> str:
        return stream_label(self.sender, self.recipient, self.lane)

    def as_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "sender": self.sender, "recipient": self.recipient, "lane": self.lane,
                "pruned_first_seq": self.first_seq, "pruned_last_seq": self.last_seq,
                "kept_from_seq": self.kept_from, "stopped": self.stopped, "removed": self.removed,
                "bytes": self.bytes, "checkpoints": self.checkpoints, "finished": self.finished}


@dataclass
class PruneReport:
    node: str
    archive: Path
    cutoff: datetime
    dry_run: bool
    streams: list[StreamPrune] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # files that could not be read: kept

    @property
    def removed(self) -> int:
        return sum(len(s.removed) + len(s.finished) for s in self.streams)

    def as_json(self) -> dict[str, Any]:
        return {"version": 1, "node": self.node, "archive": str(self.archive),
                "cutoff": format_time(self.cutoff), "dry_run": self.dry_run,
                "removed": self.removed, "bytes": sum(s.bytes for s in self.streams),
                "streams": [s.as_json() for s in self.streams], "problems": self.problems}


@dataclass
class _BundleCopy:
    f: ArchiveFile
    sha256: str
    size: int
    manifest_sha256: str
    prev: str | None
    created: datetime
    stream: tuple[str, str, str]  # sender, recipient, lane
    seq: int
    ok: bool
    problem: str = ""


@dataclass
class _AckCopy:
    f: ArchiveFile
    sha256: str
    size: int
    ack: Ack


def _read_bundle(f: ArchiveFile, trust: sshsig.AllowedSigners) -> _BundleCopy | str:
    try:
        sha, size = sha256_of(f.path)
        with BundleReader(f.path) as r:
            m = r.manifest
            try:
                r.verify_signature(trust)
                r.check_payload_hash()
                ok, problem = True, ""
            except ExchangeError as exc:
                ok, problem = False, str(exc)
            return _BundleCopy(f, sha, size, m.sha256, m.prev, m.created, (m.sender, m.recipient, m.lane), m.seq,
                               ok, problem)
    except ExchangeError as exc:
        return str(exc)


def _delete(paths: Iterable[Path]) -> None:
    dirs = set()
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        dirs.add(p.parent)
    for d in dirs:
        fsync_dir(d)


def prune(archive: Path, *, node_id: str, role: str, key: Any, trust: sshsig.AllowedSigners,
          older_than_days: float, dry_run: bool = False, now: datetime | None = None) -> PruneReport:
    """Remove bundles and acks created before now - ``older_than_days`` from ``archive``.

    Only streams ``node_id`` is an end of are pruned, and only this node's own checkpoints
    (signed by ``node_id`` in its ``role``) count as records of what was pruned before: one
    planted by another node is reported and ignored, never a reason to delete anything. See
    the module docstring for what is kept; the caller holds the node's work lock.
    """
    if older_than_days < 0:
        raise ExchangeError("--older-than must be 0 or more days")
    now = now or utc_now()
    cutoff = now - timedelta(days=older_than_days)
    archive = Path(archive)
    report = PruneReport(node_id, archive, cutoff, dry_run)
    files = scan_archive(archive)
    # per stream (sender, recipient, lane): each lane is pruned and checkpointed on its own
    bundles: dict[tuple[str, str, str], dict[int, list[_BundleCopy]]] = defaultdict(lambda: defaultdict(list))
    acks: dict[tuple[str, str, str], dict[int, list[_AckCopy]]] = defaultdict(lambda: defaultdict(list))
    covered: dict[tuple[str, str, str], dict[int, PrunedBundle]] = defaultdict(dict)
    for f in files:
        if f.refused:
            report.problems.append(f"{f.rel}: {f.refused}")
        elif f.kind == "checkpoint":
            try:
                cp = read_checkpoint(f.path, trust)
            except ExchangeError as exc:
                report.problems.append(f"{f.rel}: {exc}")
                continue
            if cp.node != node_id or cp.role not in (None, role):
                report.problems.append(f"{f.rel}: signed by {cp.node} as {cp.role or 'a node'}, not by this node "
                                       f"({node_id}, {role}): ignored (a node only trusts its own checkpoints)")
                continue
            for b in cp.bundles:
                covered[cp.stream][b.seq] = b
        elif f.kind == "bundle":
            got = _read_bundle(f, trust)
            if isinstance(got, str):
                report.problems.append(f"{f.rel}: {got}")
                continue
            if node_id in got.stream[:2]:
                bundles[got.stream][got.seq].append(got)
        else:
            try:
                ack = read_ack(f.path, trust, me=None)
                sha, size = sha256_of(f.path)
            except ExchangeError as exc:
                report.problems.append(f"{f.rel}: {exc}")
                continue
            stream = (ack.sender, ack.acker, ack.lane)
            if node_id in stream[:2]:
                acks[stream][ack.seq].append(_AckCopy(f, sha, size, ack))
    for stream in sorted(set(bundles) | set(covered)):
        sp = StreamPrune(*stream)
        report.streams.append(sp)
        _prune_stream(sp, bundles[stream], acks[stream], covered[stream], report, node_id=node_id,
                      role=role, key=key, cutoff=cutoff, now=now)
    return report


def _prune_stream(sp: StreamPrune, bundles: Mapping[int, list[_BundleCopy]],
                  acks: Mapping[int, list[_AckCopy]], covered: Mapping[int, PrunedBundle],
                  report: PruneReport, *, node_id: str, role: str, key: Any, cutoff: datetime,
                  now: datetime) -> None:
    present = sorted(bundles)
    newest = present[-1] if present else None
    # 1. Finish an interrupted prune: files a checkpoint already records. A kill during the
    # deletions can leave acks whose bundles are already gone, so look at acks' seqs too.
    leftovers: list[Path] = []
    for seq in sorted(set(present) | set(acks)):
        if seq in covered and seq != newest:
            for c in bundles.get(seq, []):
                if c.manifest_sha256 == covered[seq].manifest_sha256:
                    leftovers.append(c.f.path)
                    sp.finished.append(c.f.rel)
            for a in acks.get(seq, []):
                if a.ack.bundle_sha256 == covered[seq].sha256:
                    leftovers.append(a.f.path)
                    sp.finished.append(a.f.rel)
    if not present:
        sp.stopped = "no bundles left in the archive"
        if leftovers and not report.dry_run:
            _delete(leftovers)
        return
    newest = present[-1]
    # 2. The contiguous run of prunable bundles from the oldest not yet covered.
    batch: list[tuple[PrunedBundle, list[_BundleCopy], list[_AckCopy]]] = []
    prev_manifest: str | None = None
    start = min((s for s in present if s not in covered), default=None)
    if start is None:
        sp.stopped = "everything older is already recorded in checkpoints"
    else:
        seq = start
        if seq > 1:
            anchor = covered.get(seq - 1)
            prev_manifest = anchor.manifest_sha256 if anchor else None
        while True:
            why = _why_keep(seq, newest, bundles, acks, cutoff, prev_manifest, covered)
            if why:
                sp.stopped, sp.kept_from = why, seq
                break
            copies = bundles[seq]
            c = copies[0]
            applied = [a for a in acks[seq] if a.ack.bundle_sha256 == c.sha256]
            batch.append((PrunedBundle(seq, bundle_name(sp.sender, sp.recipient, seq, sp.lane), format_time(c.created),
                                       c.sha256, c.manifest_sha256, c.prev), copies, applied))
            prev_manifest = c.manifest_sha256
            seq += 1
    if batch:
        sp.first_seq, sp.last_seq = batch[0][0].seq, batch[-1][0].seq
    sp.bytes = sum(c.size for _b, copies, ackl in batch for c in copies) + \
        sum(a.size for _b, _c, ackl in batch for a in ackl)
    for _b, copies, ackl in batch:
        sp.removed += [c.f.rel for c in copies] + [a.f.rel for a in ackl]
    if report.dry_run:
        return
    if leftovers:
        _delete(leftovers)
        log.info("prune %s: finished an interrupted prune (%d files)", sp.stream, len(leftovers))
    for i in range(0, len(batch), MAX_CHECKPOINT_BUNDLES):
        chunk = batch[i:i + MAX_CHECKPOINT_BUNDLES]
        pruned_acks = [PrunedAck(a.ack.seq, a.f.canonical, a.ack.acker, format_time(a.ack.created),
                                 a.sha256, a.ack.bundle_sha256, a.ack.result, decided_ack(a.ack))
                       for _b, _c, ackl in chunk for a in ackl]
        removed = [{"path": c.f.rel, "sha256": c.sha256, "size": c.size} for _b, copies, _a in chunk for c in copies]
        removed += [{"path": a.f.rel, "sha256": a.sha256, "size": a.size} for _b, _c, ackl in chunk for a in ackl]
        data = build_checkpoint(key=key, node=node_id, role=role, sender=sp.sender, recipient=sp.recipient,
                                lane=sp.lane, cutoff=cutoff,
                                bundles=[b for b, _c, _a in chunk], acks=pruned_acks, removed=removed,
                                created=now)
        folder = report.archive / CHECKPOINTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / checkpoint_name(node_id, sp.sender, sp.recipient, chunk[-1][0].seq, sp.lane)
        if target.exists():
            raise ExchangeError(f"{target} already exists; refusing to overwrite a checkpoint")
        write_file_atomic(target, data)
        sp.checkpoints.append(target.relative_to(report.archive).as_posix())
        crashpoint("prune.checkpointed")
        _delete([c.f.path for _b, copies, _a in chunk for c in copies] +
                [a.f.path for _b, _c, ackl in chunk for a in ackl])
        log.info("prune %s: removed seq %d..%d, checkpoint %s", sp.stream, chunk[0][0].seq,
                 chunk[-1][0].seq, target.name)


def decided_ack(ack: Ack) -> bool:
    """A REJECTED ack of version 3 carries an operator's signed decision (docs/FORMAT.md section 6):
    the seq ended unapplied for good, so it may be pruned like an APPLIED one."""
    return ack.result == AckResult.REJECTED and ack.version >= ACK_DECISION_VERSION


def _why_keep(seq: int, newest: int, bundles: Mapping[int, list[_BundleCopy]],
              acks: Mapping[int, list[_AckCopy]], cutoff: datetime, prev_manifest: str | None,
              covered: Mapping[int, PrunedBundle]) -> str:
    """Why bundle ``seq`` must stay (stopping the run), or '' if it may go."""
    if seq >= newest:
        return f"seq {newest} is the newest bundle of the stream (the chain's anchor)"
    copies = bundles.get(seq)
    if not copies:
        return f"seq {seq} is missing from the archive (gap): nothing after it is pruned"
    bad = [c for c in copies if not c.ok]
    if bad:
        return f"seq {seq}: {bad[0].f.rel} does not verify ({bad[0].problem})"
    if len({c.sha256 for c in copies}) > 1:
        return f"seq {seq}: the archive holds different files for this seq (kept for investigation)"
    c = copies[0]
    if c.created >= cutoff:
        return f"seq {seq} was created {format_time(c.created)}, after the cutoff {format_time(cutoff)}"
    expected_prev = None if seq == 1 else prev_manifest
    if seq > 1 and prev_manifest is None:
        return f"seq {seq}: seq {seq - 1} is neither in the archive nor in a checkpoint (chain anchor unknown)"
    if c.prev != expected_prev:
        return f"seq {seq}: prev does not match seq {seq - 1}'s manifest (chain break)"
    matching = [a for a in acks.get(seq, []) if a.ack.bundle_sha256 == c.sha256]
    if not any(a.ack.result == AckResult.APPLIED or decided_ack(a.ack) for a in matching):
        return f"seq {seq} has no APPLIED ack (nor an operator's decision) for this file in the archive"
    if any(a.ack.created >= cutoff for a in matching):
        return f"seq {seq}: its ack is newer than the cutoff"
    others = [a for a in acks.get(seq, []) if a.ack.bundle_sha256 != c.sha256]
    if others:
        return f"seq {seq}: an ack in the archive names a different file (kept for investigation)"
    return ""
