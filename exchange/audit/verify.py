"""The auditor's tools: verify an archive, extract bundles for analysts, report control totals.

An auditor holds a folder of bundles and acks (a node's ``archive/``, or copies
of several nodes' archives merged in any layout), the ``allowed_signers`` file
and, optionally, an auditor age identity that every node also encrypts to
(``[node] auditors`` in ``exchange.toml``). Nothing else is needed: no node
home, no database. docs/AUDIT.md describes the checks and the outputs.

- :func:`verify_archive`: every file's signature (at its signed creation time),
  payload and inner hashes, inner manifest and control totals (with an
  identity), then per stream the hash chain, gaps, forks and acks, with prune
  checkpoints (:mod:`exchange.audit.prune`) standing in for removed bundles.
- :func:`extract_bundle`: a fully verified bundle's tables as plain Parquet, plus
  its manifests; an unverified one only when forced, marked as such.
- :func:`control_report`: documents and control totals per stream, day and
  document type, from the inner manifests.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from exchange.audit import business_day
from exchange.audit.business_day import DayKind, DayShare
from exchange.audit.prune import (
    ArchiveFile, Checkpoint, PrunedAck, PrunedBundle, decided_ack, read_checkpoint, scan_archive, sha256_of,
)
from exchange.errors import CryptoError, ExchangeError, FormatError, NotRegularFileError
from exchange.wire import parquet_budget
from exchange.wire.bundle import Ack, BundleReader, Manifest, not_for_these_identities, read_ack
from exchange.wire.signed import format_time
from exchange.wire.crypto import sshsig
from exchange.wire.formats import BUNDLE_MEMBERS, CHECKPOINTS_DIR, EVENTS_TABLE, INNER_MANIFEST, MAX_TABLE_BYTES, parse_name
from exchange.wire.formats import DEFAULT_LANE, ack_name, bundle_name, stream_label
from exchange.vocabulary import AckResult

Severity = Literal["error", "warning"]

VERIFY_FAILED_FILE = "VERIFICATION_FAILED.txt"
_SAFE_TABLE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


# ---------------------------------------------------------------- findings

@dataclass(frozen=True)
class Finding:
    """One problem: an ``error`` fails the audit, a ``warning`` is reported only."""

    severity: Severity
    check: str  # file format name signature payload decrypt inner totals chain gap fork ack rejected checkpoint
    message: str
    file: str | None = None
    seq: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "check": self.check, "seq": self.seq, "file": self.file,
                "message": self.message}

    def line(self) -> str:
        where = " ".join(x for x in (f"seq {self.seq}" if self.seq is not None else "", self.file or "") if x)
        return f"{self.check}: {where + ': ' if where else ''}{self.message}"


def _err(check: str, message: str, file: str | None = None, seq: int | None = None) -> Finding:
    return Finding("error", check, message, file, seq)


def _warn(check: str, message: str, file: str | None = None, seq: int | None = None) -> Finding:
    return Finding("warning", check, message, file, seq)


# ---------------------------------------------------------------- one bundle

@dataclass
class BundleCheck:
    """What verifying one bundle file found."""

    rel: str
    sha256: str
    name: str = ""  # the file name without the importer's .YYYYMMDDHHMMSS suffix
    manifest: Manifest | None = None
    signature: bytes = field(default=b"", repr=False)  # manifest.json.sig, as read
    authentic: bool = False  # the manifest's signature verifies against the trust store
    intact: bool = False  # and the ciphertext (and, decrypted, every inner file) matches it
    decrypted: bool = False
    inner: dict[str, Any] | None = None
    tables: dict[str, Path] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        s = (self.inner or {}).get("summary")
        return s if isinstance(s, dict) else {}


def _msg(exc: ExchangeError, path: Path) -> str:
    """The error's message without the file name prefix (findings name the file already)."""
    text = exc.message
    return text[len(path.name) + 2:] if text.startswith(f"{path.name}: ") else text


def check_bundle(path: Path, *, trust: sshsig.AllowedSigners, identities: Sequence[str], workdir: Path,
                 rel: str | None = None, sha256: str | None = None) -> BundleCheck:
    """Verify one bundle; with identities, decrypt into ``workdir`` and check every inner hash and total."""
    rel = rel or path.name
    res = BundleCheck(rel, sha256 or sha256_of(path)[0])
    try:
        reader = BundleReader(path)
    except ExchangeError as exc:
        res.findings.append(_err("format", f"unreadable bundle: {_msg(exc, path)}", rel))
        return res
    with reader:
        m = res.manifest = reader.manifest
        res.signature = reader.signature
        try:
            reader.verify_signature(trust)
            res.authentic = True
        except ExchangeError as exc:
            res.findings.append(_err("signature", _msg(exc, path).removeprefix("signature: "), rel, m.seq))
            return res
        if not identities:
            try:
                reader.check_payload_hash()
                res.intact = True
            except ExchangeError as exc:
                res.findings.append(_err("payload", _msg(exc, path), rel, m.seq))
            return res
        try:
            opened = reader.decrypt(identities, workdir)
        except ExchangeError as exc:
            # Was it only "not encrypted to this identity"? The signed hash of the ciphertext decides.
            try:
                reader.recheck_payload()
            except ExchangeError as damage:
                res.findings.append(_err("payload", _msg(damage, path), rel, m.seq))
                return res
            if not_for_these_identities(exc):
                res.intact = True
                res.findings.append(_warn("decrypt", "not encrypted to the auditor identity (sealed before the "
                                          "auditor was configured?): ciphertext checked against its signed hash "
                                          "only", rel, m.seq))
            else:
                res.findings.append(_err("inner", _msg(exc, path), rel, m.seq))
            return res
        res.intact = res.decrypted = True
        res.inner, res.tables = opened.inner, opened.tables
        res.findings += [_err("totals", p, rel, m.seq) for p in check_totals(opened.inner, opened.tables)]
        return res


def _decimal(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def check_totals(inner: Mapping[str, Any], tables: Mapping[str, Path]) -> list[str]:
    """Recompute the inner manifest's ``summary.documents`` from the Parquet tables.

    Document and delete counts from ``_events``; rows per table; each
    ``"table.column"`` total as the column's sum. Returns the disagreements.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    summary = inner.get("summary")
    docs = summary.get("documents") if isinstance(summary, dict) else None
    if not isinstance(docs, dict):
        return []
    problems: list[str] = []
    upserts: dict[str, int] = defaultdict(int)
    deletes: dict[str, int] = defaultdict(int)
    budget = parquet_budget.Budget(MAX_TABLE_BYTES)  # decoding bounded by what is decoded, as the importer

    def read(path: Path, columns: list[str]) -> Any:
        return parquet_budget.read_table(path, parquet_budget.scan(path), budget, columns)

    if EVENTS_TABLE in tables:
        try:
            ev = read(tables[EVENTS_TABLE], ["doc_type", "op"]).to_pydict()
        except ExchangeError as exc:
            return [f"{EVENTS_TABLE}: {exc.message}"]
        for t, op in zip(ev["doc_type"], ev["op"], strict=True):
            (upserts if op == "U" else deletes)[str(t)] += 1
        for t in sorted(set(upserts) | set(deletes)):
            if t not in docs:
                problems.append(f"{t}: documents in {EVENTS_TABLE} but not in the inner manifest's summary")
    rows_cache: dict[str, int] = {}

    def rows_of(table: str) -> int:
        if table not in rows_cache:
            rows_cache[table] = pq.read_metadata(tables[table]).num_rows if table in tables else 0
        return rows_cache[table]

    for doc_type, d in docs.items():
        if not isinstance(d, dict):
            problems.append(f"{doc_type}: summary entry is not an object")
            continue
        if EVENTS_TABLE in tables:
            if d.get("count") != upserts.get(doc_type, 0):
                problems.append(f"{doc_type}: summary says {d.get('count')} documents, "
                                f"{EVENTS_TABLE} lists {upserts.get(doc_type, 0)} upserts")
            if "deletes" in d and d.get("deletes") != deletes.get(doc_type, 0):
                problems.append(f"{doc_type}: summary says {d.get('deletes')} deletes, "
                                f"{EVENTS_TABLE} lists {deletes.get(doc_type, 0)}")
        for table, n in (d.get("rows") or {}).items():
            if rows_of(str(table)) != n:
                problems.append(f"{doc_type}: {table} has {rows_of(str(table))} rows, summary says {n}")
        for ref, want in (d.get("totals") or {}).items():
            table, _, col = str(ref).partition(".")
            expected = _decimal(want)
            if expected is None:
                problems.append(f"{doc_type}: total {ref} = {want!r} is not a number")
                continue
            if table not in tables:
                got: Any = Decimal(0)
            else:
                try:
                    column = read(tables[table], [col]).column(col)
                except ExchangeError as exc:  # a Parquet file that lies, or the budget spent
                    problems.append(f"{doc_type}: total {ref}: {exc.message}")
                    continue
                except Exception as exc:  # pyarrow: KeyError, ArrowInvalid ...
                    problems.append(f"{doc_type}: total {ref}: no such column ({exc})")
                    continue
                got = pc.sum(column).as_py() if len(column) else Decimal(0)
            if _decimal(got if got is not None else 0) != expected:
                problems.append(f"{doc_type}: {ref} sums to {got}, summary says {want}")
    return problems


# ---------------------------------------------------------------- the archive

@dataclass
class AckFile:
    rel: str
    sha256: str
    ack: Ack
    copies: list[str] = field(default_factory=list)


@dataclass
class StreamResult:
    """The per-stream part of a verify report."""

    sender: str
    recipient: str
    lane: str = DEFAULT_LANE  # each lane is a stream of its own: its seqs, chain, gaps and forks
    seqs: list[int] = field(default_factory=list)  # authentic bundles present
    files: int = 0
    acked: int = 0
    decrypted: int = 0
    pruned: list[tuple[int, int]] = field(default_factory=list)
    unacked: list[int] = field(default_factory=list)
    not_decrypted: list[int] = field(default_factory=list)  # authentic, not encrypted to the identity
    skipped: list[int] = field(default_factory=list)  # ended unapplied by an operator's signed decision
    failed: list[int] = field(default_factory=list)  # REJECTED, not in the archive: FAILED at the receiver
    findings: list[Finding] = field(default_factory=list)

    @property
    def name(self) -> str:
        return stream_label(self.sender, self.recipient, self.lane)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def as_json(self) -> dict[str, Any]:
        return {"stream": self.name, "sender": self.sender, "recipient": self.recipient, "lane": self.lane,
                "bundles": len(self.seqs), "files": self.files,
                "first_seq": self.seqs[0] if self.seqs else None,
                "last_seq": self.seqs[-1] if self.seqs else None,
                "acked": self.acked, "decrypted": self.decrypted,
                "pruned": [{"first_seq": a, "last_seq": b} for a, b in self.pruned],
                "not_yet_acknowledged": self.unacked, "not_decrypted": self.not_decrypted,
                "skipped": self.skipped, "failed": self.failed,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [f.as_json() for f in self.findings]}


@dataclass
class VerifyReport:
    root: Path
    decrypt: bool
    strict: bool = False
    streams: list[StreamResult] = field(default_factory=list)
    general: list[Finding] = field(default_factory=list)  # files no stream could be named for
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def findings(self) -> list[Finding]:
        return self.general + [f for s in self.streams for f in s.findings]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" or self.strict]

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {"version": 1, "ok": self.ok, "root": str(self.root), "decrypted": self.decrypt,
                "strict": self.strict, "files": self.counts,
                "errors": len([f for f in self.findings if f.severity == "error"]),
                "warnings": len([f for f in self.findings if f.severity == "warning"]),
                "streams": [s.as_json() for s in self.streams],
                "general": [f.as_json() for f in self.general]}


def _name_parts(name: str) -> tuple[str, str, int, str] | None:
    """(a, b, seq, lane) of a bundle's or ack's file name; None when it is not one."""
    try:
        fn = parse_name(name)
    except FormatError:
        return None
    return fn.a, fn.b, fn.seq, fn.lane


class _Archive:
    """The archive's files, verified once per distinct content and grouped by stream."""

    def __init__(self, root: Path, trust: sshsig.AllowedSigners, identities: Sequence[str],
                 workdir: Path | None, keep: bool = False) -> None:
        self.root, self.trust, self.identities = root, trust, list(identities)
        self.workdir, self.keep = workdir, keep
        self.bundles: dict[str, BundleCheck] = {}  # by file sha256
        self.acks: dict[str, AckFile] = {}
        self.checkpoints: dict[str, Checkpoint] = {}
        self.bad_files: list[tuple[ArchiveFile, Finding]] = []
        self.name_warnings: list[tuple[tuple[str, str, str], Finding]] = []
        self.counts = {"bundles": 0, "acks": 0, "checkpoints": 0, "distinct": 0}
        self.files: list[ArchiveFile] = []
        self.checkpoint_rel: dict[str, str] = {}

    def load(self, on_bundle: Any = None) -> None:
        self.files = scan_archive(self.root)
        for f in self.files:
            self.counts[f.kind + "s"] += 1
            try:
                if f.refused:
                    raise NotRegularFileError(f.refused)
                sha, _size = sha256_of(f.path)
            except (ExchangeError, OSError) as exc:  # a link or FIFO (never opened), or gone meanwhile
                why = exc.message if isinstance(exc, ExchangeError) else f"cannot read: {exc.strerror}"
                self.bad_files.append((f, _err("file", why, f.rel)))
                continue
            if f.kind == "bundle":
                self._bundle(f, sha, on_bundle)
            elif f.kind == "ack":
                self._ack(f, sha)
            else:
                self._checkpoint(f, sha)
        self.counts["distinct"] = len(self.bundles) + len(self.acks) + len(self.checkpoints)

    def _bundle(self, f: ArchiveFile, sha: str, on_bundle: Any) -> None:
        if sha in self.bundles:
            self.bundles[sha].copies.append(f.rel)
            return
        with _scratch(self.workdir) as tmp:
            res = check_bundle(f.path, trust=self.trust, identities=self.identities, workdir=tmp,
                               rel=f.rel, sha256=sha)
            if on_bundle is not None:
                on_bundle(res)
            res.tables = {}
        res.name = f.canonical
        res.copies.append(f.rel)
        self.bundles[sha] = res
        m = res.manifest
        if m is None:
            self.bad_files += [(f, x) for x in res.findings]
        else:
            parts = _name_parts(f.canonical)
            if parts != (m.sender, m.recipient, m.seq, m.lane):
                self.name_warnings.append(((m.sender, m.recipient, m.lane), _warn(
                    "name", f"file name disagrees with the signed manifest "
                    f"({bundle_name(m.sender, m.recipient, m.seq, m.lane)})", f.rel, m.seq)))

    def _ack(self, f: ArchiveFile, sha: str) -> None:
        if sha in self.acks:
            self.acks[sha].copies.append(f.rel)
            return
        try:
            ack = read_ack(f.path, self.trust, me=None, identities=self.identities)
        except ExchangeError as exc:
            self.bad_files.append((f, _err("ack", f"ack does not verify: {_msg(exc, f.path)}", f.rel)))
            return
        self.acks[sha] = AckFile(f.rel, sha, ack, [f.rel])
        if ack.details == "unreadable":  # signed, but its encrypted details are not what it signed
            self.name_warnings.append(((ack.sender, ack.acker, ack.lane), _err(
                "ack", f"ack details: {ack.details_error}", f.rel, ack.seq)))
        if _name_parts(f.canonical) != (ack.acker, ack.sender, ack.seq, ack.lane):
            self.name_warnings.append(((ack.sender, ack.acker, ack.lane), _warn(
                "name", "file name disagrees with the signed ack "
                f"({ack_name(ack.acker, ack.sender, ack.seq, ack.lane)})", f.rel, ack.seq)))

    def _checkpoint(self, f: ArchiveFile, sha: str) -> None:
        if sha in self.checkpoints:
            return
        try:
            self.checkpoints[sha] = read_checkpoint(f.path, self.trust)
            self.checkpoint_rel[sha] = f.rel
        except ExchangeError as exc:
            self.bad_files.append((f, _err("checkpoint", f"checkpoint does not verify: {_msg(exc, f.path)}",
                                           f.rel)))


    def owner(self, rel: str) -> str | None:
        """Whose archive the file at ``rel`` lies in: the one node that sent what the ``sent/``
        folder beside its folder holds (None when that cannot be told)."""
        folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
        if folder.endswith(f"{CHECKPOINTS_DIR}/"):
            folder = folder[:-len(CHECKPOINTS_DIR) - 1]
        senders = {parts[0] for f in self.files if f.kind != "checkpoint" and f.rel.startswith(folder + "sent/")
                   and (parts := _name_parts(f.canonical)) is not None}
        return senders.pop() if len(senders) == 1 else None


@contextmanager
def _scratch(parent: Path | None) -> Iterator[Path]:
    tmp = tempfile.mkdtemp(prefix=".audit-", dir=parent)
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stream_of_bad(f: ArchiveFile) -> tuple[str, str, str] | None:
    """Best guess of a bad file's stream (sender, recipient, lane) from its name (it could not be read)."""
    if f.kind == "checkpoint":
        m = re.fullmatch(r"[^.]+\.([^.]+)\.([^.]+)\.(?:([^.]+)\.)?[0-9]{10}\.checkpoint", f.canonical)
        return (m.group(1), m.group(2), m.group(3) or DEFAULT_LANE) if m else None
    parts = _name_parts(f.canonical)
    if parts is None:
        return None
    return (parts[0], parts[1], parts[3]) if f.kind == "bundle" else (parts[1], parts[0], parts[3])


def verify_archive(root: Path, *, trust: sshsig.AllowedSigners, identities: Sequence[str] = (),
                   strict: bool = False, workdir: Path | None = None,
                   roles: Mapping[str, str] | None = None) -> VerifyReport:
    """Verify every bundle, ack and checkpoint under ``root``, then every stream they form.

    ``roles`` (node id -> ho/store, from a node's configuration) lets a checkpoint's claimed
    role be checked too; without it only its signer and the archive it lies in are.
    """
    root = Path(root)
    if not root.is_dir():
        raise ExchangeError(f"{root} is not a folder", hint="Pass the archive folder (e.g. <home>/archive).")
    arc = _Archive(root, trust, identities, workdir)
    arc.load()
    report = VerifyReport(root, bool(identities), strict, counts=dict(arc.counts))
    # a stream is (sender, recipient, lane): gaps, forks and chains are checked per lane
    streams: dict[tuple[str, str, str], StreamResult] = {}

    def stream(key: tuple[str, str, str]) -> StreamResult:
        if key not in streams:
            streams[key] = StreamResult(*key)
        return streams[key]

    by_stream: dict[tuple[str, str, str], list[BundleCheck]] = defaultdict(list)
    for res in arc.bundles.values():
        if res.manifest is None:
            continue  # in arc.bad_files
        key = (res.manifest.sender, res.manifest.recipient, res.manifest.lane)
        by_stream[key].append(res)
        sr = stream(key)
        for finding in _with_copies(res):
            if finding.check == "decrypt" and finding.severity == "warning":
                sr.not_decrypted.append(res.manifest.seq)  # summed up per stream below
            else:
                sr.findings.append(finding)
    acks_by_stream: dict[tuple[str, str, str], list[AckFile]] = defaultdict(list)
    for a in arc.acks.values():
        key = (a.ack.sender, a.ack.acker, a.ack.lane)
        acks_by_stream[key].append(a)
        stream(key)
    cps_by_stream: dict[tuple[str, str, str], list[Checkpoint]] = defaultdict(list)
    for sha, cp in arc.checkpoints.items():
        refused = _refuse_checkpoint(cp, arc.checkpoint_rel[sha], arc.owner(arc.checkpoint_rel[sha]), roles)
        stream(cp.stream).findings += refused
        if not any(f.severity == "error" for f in refused):
            cps_by_stream[cp.stream].append(cp)
    evidence = _evidence(arc.acks.values())
    for key in evidence:
        stream(key)
    for f, finding in arc.bad_files:
        guess = _stream_of_bad(f)
        if guess is None:
            report.general.append(finding)
        else:
            stream(guess).findings.append(finding)
    for named, finding in arc.name_warnings:
        stream(named).findings.append(finding)
    bad_seqs: dict[tuple[str, str, str], set[int]] = defaultdict(set)
    for res in arc.bundles.values():
        if not res.authentic:
            m = res.manifest
            parts = (m.sender, m.recipient, m.seq, m.lane) if m is not None else _name_parts(res.name)
            if parts:
                bad_seqs[(parts[0], parts[1], parts[3])].add(parts[2])
    restarts = _restart_times(by_stream)
    for key in sorted(streams):
        _check_stream(stream(key), by_stream[key], acks_by_stream[key], cps_by_stream[key], bad_seqs[key],
                      None if key[2] == DEFAULT_LANE else restarts.get(key[:2]))
        _check_heads(stream(key), by_stream[key], acks_by_stream[key], cps_by_stream[key], evidence.get(key, []))
    report.streams = [streams[k] for k in sorted(streams)]
    return report


def _refuse_checkpoint(cp: Checkpoint, rel: str, owner: str | None,
                       roles: Mapping[str, str] | None) -> list[Finding]:
    """Why a verified checkpoint may not stand in for what it records (errors), or a warning.

    Only the node whose archive it lies in prunes that archive, in the role it has.
    """
    if owner is not None and cp.node != owner:
        return [_err("checkpoint", f"signed by {cp.node}, but it lies in the archive of {owner}: only a node "
                     "prunes its own archive; not used", rel, cp.last_seq)]
    if roles is not None and cp.role is not None and roles.get(cp.node) != cp.role:
        return [_err("checkpoint", f"claims {cp.node} prunes as {cp.role!r}, but {cp.node} is "
                     f"{roles.get(cp.node) or 'not a configured node'!r} here; not used", rel, cp.last_seq)]
    if owner is None:
        return [_warn("checkpoint", f"cannot tell whose archive it lies in (no sent/ folder beside it); "
                      f"taken as {cp.node}'s", rel, cp.last_seq)]
    return []


@dataclass(frozen=True)
class Evidence:
    """A stream position a peer signed into an ack (v2 ``heads``), kept in the audited archive."""

    seq: int
    manifest_sha256: str | None
    af: AckFile
    what: str
    required: bool  # the archive must reach ``seq`` (False: only a manifest to compare)


def _evidence(acks: Iterable[AckFile]) -> dict[tuple[str, str, str], list[Evidence]]:
    """Per stream (sender, recipient, lane), what the acks' signed heads say it reached (an ack's heads
    are about the two streams of its own lane)."""
    out: dict[tuple[str, str, str], list[Evidence]] = defaultdict(list)
    for af in acks:
        a, h = af.ack, af.ack.heads
        if h is None:
            continue
        rf, st = h.received_from_you, h.sent_to_you
        if rf.seq:
            out[(a.sender, a.acker, a.lane)].append(Evidence(rf.seq, rf.manifest_sha256, af,
                                                             f"{a.acker} applied it", True))
        if st.acknowledged:
            out[(a.acker, a.sender, a.lane)].append(Evidence(
                st.acknowledged, st.manifest_sha256 if st.acknowledged == st.seq else None, af,
                f"{a.sender} acknowledged it APPLIED to {a.acker}", True))
        if st.seq and st.seq != st.acknowledged:
            out[(a.acker, a.sender, a.lane)].append(Evidence(st.seq, st.manifest_sha256, af,
                                                             f"{a.acker} sealed it", False))
    return out


def _check_heads(sr: StreamResult, bundles: list[BundleCheck], acks: list[AckFile],
                 checkpoints: list[Checkpoint], evidence: list[Evidence]) -> None:
    """Signed heads against the archive: a stream cut short, or missing entirely, is an error that
    names the missing seqs and the signed file that shows they existed."""
    known: dict[int, set[str]] = defaultdict(set)
    for bc in bundles:
        if bc.authentic and bc.manifest is not None:
            known[bc.manifest.seq].add(bc.manifest.sha256)
    for cp in checkpoints:
        for pb in cp.bundles:
            known[pb.seq].add(pb.manifest_sha256)
    top = max(set(known) | {af.ack.seq for af in acks}, default=0)
    for ev in evidence:
        if ev.manifest_sha256 is not None and known.get(ev.seq) and ev.manifest_sha256 not in known[ev.seq]:
            sr.findings.append(_err("fork", f"{ev.af.rel} (signed by {ev.af.ack.acker}) names manifest "
                                    f"{ev.manifest_sha256[:12]}.. for this seq, the archive holds "
                                    f"{', '.join(x[:12] + '..' for x in sorted(known[ev.seq]))}", ev.af.rel, ev.seq))
    need = max((ev for ev in evidence if ev.required), key=lambda ev: ev.seq, default=None)
    if need is None or need.seq <= top:
        return
    proof = f"{need.af.rel} (signed by {need.af.ack.acker} at {format_time(need.af.ack.created)})"
    if top == 0:
        sr.findings.append(_err("head", f"the whole stream is missing from the archive (no bundle, ack or "
                                f"checkpoint), but {proof} shows {_span(1, need.seq)} existed: seq {need.seq} "
                                f"was sent ({need.what})", need.af.rel, 1))
    else:
        sr.findings.append(_err("head", f"{_span(top + 1, need.seq)} missing: the newest file of this stream "
                                f"in the archive is seq {top}, but {proof} shows seq {need.seq} was sent "
                                f"({need.what}): newest bundles and acks deleted?", need.af.rel, top + 1))


def _with_copies(res: BundleCheck) -> list[Finding]:
    if len(res.copies) <= 1:
        return res.findings
    extra = f" (same file also at {', '.join(res.copies[1:])})"
    return [Finding(f.severity, f.check, f.message + extra, f.file, f.seq) for f in res.findings]


def _ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def _missing(present: set[int], top: int) -> list[tuple[int, int]]:
    """The ranges of 1..top not in ``present``, in time linear in ``present`` (not in ``top``)."""
    out, expect = [], 1
    for s in sorted(present):
        if s > expect:
            out.append((expect, min(s - 1, top)))
        expect = max(expect, s + 1)
    if expect <= top:
        out.append((expect, top))
    return [(a, b) for a, b in out if a <= b]


def _reason(ack: Ack) -> str:
    if ack.reason is not None or ack.details == "clear":
        return str(ack.reason)
    return "reason encrypted; pass --identity of an auditor it is encrypted to"


def _bundles(n: int) -> str:
    return f"{n} bundle{'' if n == 1 else 's'}"


def _span(a: int, b: int) -> str:
    return f"seq {a}" if a == b else f"seq {a}..{b}"


def _restart_times(by_stream: Mapping[tuple[str, str, str], list[BundleCheck]]) -> dict[tuple[str, str], datetime]:
    """(sender, recipient) -> the signed time of the newest stream restart in its default lane, where the
    restart bundle travels (FORMAT.md 4.2): it ends the unacknowledged bundles of every other lane too."""
    out: dict[tuple[str, str], datetime] = {}
    for (sender, recipient, lane), found in by_stream.items():
        if lane != DEFAULT_LANE:
            continue
        for bc in found:
            m = bc.manifest
            if bc.authentic and m is not None and m.seq > 1 and m.prev is None:
                out[(sender, recipient)] = max(m.created, out.get((sender, recipient), m.created))
    return out


def _check_stream(sr: StreamResult, bundles: list[BundleCheck], acks: list[AckFile],
                  checkpoints: list[Checkpoint], bad_seqs: set[int], lane_restart: datetime | None = None) -> None:
    """Every check of one stream; ``lane_restart``: the time of a restart of the default lane of the same
    two nodes, which ended what this lane had sealed and not seen acknowledged by then."""
    out = sr.findings
    # What is known about each seq: signed manifests (from bundles and checkpoints) and their prev.
    known: dict[int, dict[str, str | None]] = defaultdict(dict)  # seq -> manifest sha -> prev
    sources: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    present: dict[int, list[BundleCheck]] = defaultdict(list)
    for bc in bundles:
        if not bc.authentic or bc.manifest is None:
            continue
        m = bc.manifest
        present[m.seq].append(bc)
        known[m.seq][m.sha256] = m.prev
        sources[m.seq][m.sha256].append(bc.rel)
        sr.files += len(bc.copies)
        sr.decrypted += int(bc.decrypted)
    pruned: dict[int, tuple[Checkpoint, PrunedBundle]] = {}
    pruned_acks: dict[int, list[PrunedAck]] = defaultdict(list)
    for cp in checkpoints:
        for pb in cp.bundles:
            pruned.setdefault(pb.seq, (cp, pb))
            known[pb.seq].setdefault(pb.manifest_sha256, pb.prev)
            sources[pb.seq][pb.manifest_sha256].append(f"checkpoint {cp.name}")
        for pa in cp.acks:
            pruned_acks[pa.seq].append(pa)
    sr.seqs = sorted(present)
    sr.pruned = _ranges([s for s in pruned if s not in present])

    # forks: two different signed manifests for one seq
    for seq in sorted(known):
        if len(known[seq]) > 1:
            where = "; ".join(f"manifest {sha[:12]}.. in {', '.join(src)}" for sha, src in sources[seq].items())
            out.append(_err("fork", f"{len(known[seq])} different signed bundles for one seq: {where}", seq=seq))
    # an operator's stream restart (`exchange peer restart`, FORMAT.md 4.2): prev null after seq 1; what
    # came before it and is missing or unacknowledged was superseded by it (shown, not an error)
    restarted = max((q for q in known if q > 1 and any(p is None for p in known[q].values())), default=0)
    if lane_restart is not None:  # in another lane: what it sealed up to the restart's signed time
        before = [bc.manifest.seq for bc in bundles if bc.authentic and bc.manifest is not None
                  and bc.manifest.created <= lane_restart]
        restarted = max(restarted, max(before, default=0) + 1)
        at = format_time(lane_restart)
    # the hash chain
    for seq in sorted(known):
        for sha, prev in known[seq].items():
            src = sources[seq][sha][0]
            if seq == 1:
                if prev is not None:
                    out.append(_err("chain", f"seq 1 has prev {prev[:12]}.. (must be null)", src, seq))
            elif prev is None:
                out.append(_warn("restart", "the stream restarts here (prev null): an operator's stream restart "
                                 "(`exchange peer restart`, signed by the sender); what is missing or "
                                 "unacknowledged before it was superseded by it", src, seq))
            elif seq - 1 in known and prev not in known[seq - 1]:
                want = ", ".join(s[:12] + ".." for s in known[seq - 1])
                out.append(_err("chain", f"prev {prev[:12]}.. is not the manifest SHA-256 of seq {seq - 1} "
                                f"({want})", src, seq))
    # gaps: every seq from 1 to the last known or acknowledged is a bundle or in a checkpoint
    acks_by_seq: dict[int, list[AckFile]] = defaultdict(list)
    for af in acks:
        acks_by_seq[af.ack.seq].append(af)
    # a bundle its receiver REJECTED (FAILED there) waits in the receiver's inbox for `exchange retry` or
    # `exchange bundle skip`: the signed ack accounts for it, so it is not a gap
    sr.failed = sorted(s for s, afs in acks_by_seq.items() if s not in known
                       and all(af.ack.result == AckResult.REJECTED for af in afs))
    for seq in sr.failed:
        af = acks_by_seq[seq][0]
        out.append(_warn("failed", f"REJECTED by {af.ack.acker} ({_reason(af.ack)}) and not in this archive: "
                         "FAILED at the receiver, where it waits for `exchange retry` or `exchange bundle skip`",
                         af.rel, seq))
    if known or acks_by_seq:
        for lo, hi in _missing(set(known) | set(sr.failed), max(set(known) | set(acks_by_seq))):
            notes = []
            unreadable = sorted(s for s in bad_seqs if lo <= s <= hi)
            if unreadable:
                notes.append(f"present but not authentic: {', '.join(map(str, unreadable))}")
            acked = sorted(s for s in acks_by_seq if lo <= s <= hi)
            if acked:
                notes.append(f"acknowledged in the archive: {', '.join(map(str, acked))}")
            note = f" ({'; '.join(notes)})" if notes else ""
            what = "missing" if lo == hi else f"{hi - lo + 1} bundles missing (seq {lo}..{hi})"
            start = ", the stream's beginning" if lo == 1 else ""
            if hi < restarted:  # lost with a restore, or never applied: superseded by the restart
                out.append(_warn("restart", f"{what}{start}: not in the archive, before the stream restart at "
                                 f"seq {restarted}{note}", seq=lo))
                continue
            out.append(_err("gap", f"{what}{start}: not in the archive and no checkpoint covers it{note}",
                            seq=lo))
    # acks: each bundle has a signed APPLIED ack naming exactly its file
    last_acked = max(set(acks_by_seq) | {s for s, pas in pruned_acks.items() if pas}, default=0)
    for seq in sr.seqs:
        intact = {bc.sha256: bc for bc in present[seq] if bc.intact}
        all_shas = {bc.sha256 for bc in present[seq]}
        here = acks_by_seq.get(seq, [])
        if not intact:
            continue  # the file's own findings say why
        for af in here:
            if af.ack.bundle_sha256 not in all_shas:
                out.append(_err("ack", f"ack names file SHA-256 {af.ack.bundle_sha256[:16]}.., but the archived "
                                f"bundle is {', '.join(s[:16] + '..' for s in sorted(all_shas))}: "
                                f"{af.ack.acker} acknowledged a different file", af.rel, seq))
        matching = [af for af in here if af.ack.bundle_sha256 in intact]
        for af in matching:
            bm = intact[af.ack.bundle_sha256].manifest
            if af.ack.manifest_sha256 is not None and bm is not None and af.ack.manifest_sha256 != bm.sha256:
                out.append(_err("ack", "ack's manifest SHA-256 differs from the bundle's", af.rel, seq))
        applied = [af for af in matching if af.ack.result == AckResult.APPLIED]
        rejected = [af for af in matching if af.ack.result == AckResult.REJECTED]
        if applied:
            sr.acked += 1
            for af in rejected:
                out.append(_warn("rejected", f"REJECTED at {format_time(af.ack.created)} ({_reason(af.ack)}), "
                                 "APPLIED later", af.rel, seq))
        elif decided := [af for af in rejected if af.ack.decision is not None]:
            sr.skipped.append(seq)  # an operator's signed decision ended it unapplied: shown, not an error
            decision = decided[-1].ack.decision
            assert decision is not None
            out.append(_warn("skipped", f"not applied: {decision.kind} by a decision {decided[-1].ack.acker} "
                             f"signed ({decision.text()})", decided[-1].rel, seq))
        elif rejected:
            for af in rejected:
                out.append(_err("rejected", f"REJECTED by {af.ack.acker}: {_reason(af.ack)}", af.rel, seq))
        elif not here:
            if seq < restarted:
                which = (f"seq {restarted}" if lane_restart is None
                         else f"{at} in the default lane (it ends every lane's unacknowledged bundles)")
                out.append(_warn("restart", f"never acknowledged: superseded by the stream restart at {which}",
                                 sorted(intact.values(), key=lambda bc: bc.rel)[0].rel, seq))
            elif seq > last_acked:
                sr.unacked.append(seq)
            else:
                first = sorted(intact.values(), key=lambda bc: bc.rel)[0]
                out.append(_err("ack", "no ack in the archive (later bundles are acknowledged)", first.rel, seq))
    if sr.not_decrypted:
        sr.not_decrypted.sort()
        spans = ", ".join(_span(a, b).removeprefix("seq ") for a, b in _ranges(sr.not_decrypted))
        out.append(_warn("decrypt", f"{_bundles(len(sr.not_decrypted))} (seq {spans}) not encrypted to the "
                         "auditor identity (sealed before the auditor was configured?): ciphertext checked "
                         "against its signed hash, not decrypted"))
    if sr.unacked:
        out.append(_warn("ack", f"not yet acknowledged: the newest {_bundles(len(sr.unacked))} "
                         f"({_span(sr.unacked[0], sr.unacked[-1])}) have no ack in the archive yet"))
    for seq in sorted(acks_by_seq):
        if seq in present or seq not in pruned:
            continue  # a missing bundle is a gap (above)
        for af in acks_by_seq[seq]:
            if af.ack.bundle_sha256 != pruned[seq][1].sha256:
                out.append(_err("ack", f"ack names file SHA-256 {af.ack.bundle_sha256[:16]}.., the checkpoint "
                                f"{pruned[seq][0].name} records {pruned[seq][1].sha256[:16]}..", af.rel, seq))
    by_sha = {af.sha256: af for af in acks}
    for seq, (cp, pb) in sorted(pruned.items()):
        if seq in present:
            continue
        recorded = [pa for pa in pruned_acks.get(seq, []) if pa.bundle_sha256 == pb.sha256]
        for pa in recorded:
            real = by_sha.get(pa.sha256)
            if real is not None and real.ack.result != pa.result:
                out.append(_err("checkpoint", f"checkpoint {cp.name} records {pa.name} as {pa.result}, the "
                                f"signed ack says {real.ack.result}", real.rel, seq))
        signed = [af for af in acks_by_seq.get(seq, []) if af.ack.bundle_sha256 == pb.sha256]
        if signed:  # the receiver's own signed acks decide; a checkpoint never stands in for them
            decided = [af for af in signed if decided_ack(af.ack)]
            if any(af.ack.result == AckResult.APPLIED for af in signed):
                pass
            elif decided:
                decision = decided[-1].ack.decision
                what = f"{decision.kind} ({decision.text()})" if decision else "skipped or superseded"
                sr.skipped.append(seq)
                out.append(_warn("skipped", f"not applied: {what} by a decision {decided[-1].ack.acker} signed; "
                                 f"pruned, checkpoint {cp.name}", decided[-1].rel, seq))
            else:
                out += [_err("rejected", f"REJECTED by {af.ack.acker}: {_reason(af.ack)} (checkpoint {cp.name} "
                             "cannot make it applied)", af.rel, seq) for af in signed]
        elif any(pa.result == AckResult.APPLIED for pa in recorded):
            pass
        elif any(pa.decided for pa in recorded):
            sr.skipped.append(seq)  # pruned with the decision's ack: the signed checkpoint records it
            out.append(_warn("skipped", f"not applied: ended by an operator's signed decision (skipped or "
                             f"superseded), pruned; checkpoint {cp.name} records its ack", seq=seq))
        else:
            out.append(_err("checkpoint", f"checkpoint {cp.name} records no APPLIED ack for the pruned bundle",
                            seq=seq))


# ---------------------------------------------------------------- extract

@dataclass
class Extracted:
    bundle: str
    folder: Path | None
    verified: bool
    problems: list[str] = field(default_factory=list)
    tables: dict[str, int] = field(default_factory=dict)  # file written -> rows

    def as_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "folder": str(self.folder) if self.folder else None,
                "verified": self.verified, "problems": self.problems, "tables": self.tables}


def _listing(inner: Any) -> list[dict[str, Any]]:
    """The inner manifest's table entries whose ``file`` is a string (forced extraction reads anything)."""
    tables = inner.get("tables") if isinstance(inner, dict) else None
    if not isinstance(tables, list):
        return []
    return [t for t in tables if isinstance(t, dict) and isinstance(t.get("file"), str)]


def _table_files(inner: Any, files: Mapping[str, Path]) -> dict[str, Path]:
    """Output file name -> decrypted Parquet file; unsafe or unknown table names keep the tNNNN name."""
    out: dict[str, Path] = {}
    named = {t.get("file"): t.get("table") for t in _listing(inner)}
    for fname, path in files.items():
        if fname == INNER_MANIFEST:
            continue
        table = named.get(fname)
        base = table if isinstance(table, str) and _SAFE_TABLE.fullmatch(table) and ".." not in table else fname
        name = base if base.endswith(".parquet") else f"{base}.parquet"
        if name in out or name in (f"{BUNDLE_MEMBERS[0]}.parquet", f"{INNER_MANIFEST}.parquet"):
            name = fname
        out[name] = path
    return out


def extract_bundle(path: Path, *, trust: sshsig.AllowedSigners, identities: Sequence[str], out: Path,
                   force: bool = False) -> Extracted:
    """Verify ``path`` fully, then write its tables, manifest.json and inner.json to out/<name>/.

    An unverified bundle is refused (``folder`` None) unless ``force``; forced
    output carries a VERIFICATION_FAILED.txt naming what failed.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    result = Extracted(path.name, None, False)
    target = Path(out) / path.name
    if target.exists():
        raise ExchangeError(f"{target} already exists", hint="Remove it, or extract to another --out folder.")
    Path(out).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.part-", dir=out))
    try:
        dec = work / "decrypted"
        dec.mkdir()
        check = check_bundle(path, trust=trust, identities=identities, workdir=dec)
        errors = [x for x in check.findings if x.severity == "error"]
        if check.decrypted and not errors and check.manifest is not None:
            result.verified = True
            manifest, inner_raw, sig = check.manifest, (dec / INNER_MANIFEST).read_bytes(), check.signature
            files = {e.name: dec / e.name for e in manifest.inner}
            inner: Any = check.inner
        else:
            if not check.decrypted and check.authentic and not errors:
                raise CryptoError("cannot decrypt: not encrypted to this identity "
                                  "(sealed before the auditor was configured?)",
                                  hint="Use an identity the bundle is encrypted to.")
            result.problems = [x.line() for x in check.findings if x.severity == "error"] or \
                ["the bundle could not be verified"]
            if not force:
                return result
            shutil.rmtree(dec)
            dec.mkdir()
            try:
                with BundleReader(path) as reader:
                    salvaged = reader.salvage(identities, dec)
            except ExchangeError as exc:
                raise ExchangeError(f"{path.name}: nothing can be extracted, even with --force: {exc}") from exc
            manifest, sig, inner_raw, files, inner = (reader.manifest, reader.signature, salvaged.inner_raw,
                                                      salvaged.files, salvaged.inner)
            result.problems += [p for p in salvaged.problems if p not in " ".join(result.problems)]
            if isinstance(inner, dict):
                tables = {t["table"]: files[t["file"]] for t in _listing(inner)
                          if t.get("file") in files and isinstance(t.get("table"), str)}
                try:
                    result.problems += [p for p in check_totals(inner, tables) if p not in result.problems]
                except Exception as exc:  # unreadable Parquet while recomputing: say so, keep going
                    result.problems.append(f"control totals could not be recomputed: {exc}")
        folder = work / "out"
        folder.mkdir()
        (folder / BUNDLE_MEMBERS[0]).write_bytes(manifest.raw)
        (folder / BUNDLE_MEMBERS[1]).write_bytes(sig)
        if inner_raw:
            (folder / INNER_MANIFEST).write_bytes(inner_raw)
        for name, src in sorted(_table_files(inner, files).items()):
            shutil.copyfile(src, folder / name)
            try:
                result.tables[name] = pq.read_metadata(folder / name).num_rows
            except Exception:  # a damaged table in a forced extraction: written, not counted
                result.tables[name] = -1
        if not result.verified:
            (folder / VERIFY_FAILED_FILE).write_text(
                f"{path.name} FAILED VERIFICATION and was extracted only because --force was given.\n"
                "Do not rely on these files: they are not (all) what the sender signed.\n\nWhat failed:\n"
                + "".join(f"- {p}\n" for p in result.problems))
        os.replace(folder, target)
        result.folder = target
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- control report

@dataclass
class ReportRow:
    sender: str
    recipient: str
    day: str
    doc_type: str
    #: what ``day`` is: ``local`` (the documents' own local business day), ``utc`` (the UTC day of their
    #: business time) or ``bundle`` (the bundle's signed creation day, UTC: types without a business time)
    basis: str = "bundle"
    bundles: int = 0
    documents: int = 0
    deletes: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    totals: dict[str, Decimal] = field(default_factory=dict)

    @property
    def stream(self) -> str:
        return f"{self.sender}->{self.recipient}"

    def as_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "sender": self.sender, "recipient": self.recipient, "day": self.day,
                "day_basis": self.basis, "doc_type": self.doc_type, "bundles": self.bundles, "documents": self.documents,
                "deletes": self.deletes, "rows": self.rows, "totals": {k: str(v) for k, v in self.totals.items()}}


@dataclass
class ControlReport:
    root: Path
    rows: list[ReportRow] = field(default_factory=list)
    bundles: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # failed verification: not counted
    not_readable: list[str] = field(default_factory=list)  # authentic, not encrypted to the identity
    day: str = "local"  # business_day.DayKind: how rows with a business time are grouped
    #: bundles whose documents are counted on the bundle's day, and why (a business time that cannot be read)
    notes: list[dict[str, str]] = field(default_factory=list)

    @property
    def total_columns(self) -> list[str]:
        return sorted({k for r in self.rows for k in r.totals})

    def as_json(self) -> dict[str, Any]:
        return {"version": 1, "root": str(self.root), "bundles": self.bundles, "day": self.day,
                "rows": [r.as_json() for r in self.rows], "skipped": self.skipped,
                "not_readable": self.not_readable, "notes": self.notes}

    def write_csv(self, path: Path) -> None:
        import csv

        cols = self.total_columns
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([csv_cell(c) for c in
                        ["sender", "recipient", "day", "doc_type", "bundles", "documents", "deletes", *cols,
                         "day_basis"]])  # last: the columns before it are where they were before format 6
            for r in self.rows:
                w.writerow([csv_cell(v) for v in [r.sender, r.recipient, r.day, r.doc_type, r.bundles, r.documents,
                                                  r.deletes, *[r.totals.get(c, "") for c in cols], r.basis]])


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as data: text that it would run as a formula gets a leading ``'``.

    Document types and control-total names come from the peers' bundles. A
    number (an int, or a finite Decimal such as ``-12.50``) stays a number.
    """
    if isinstance(value, int) or (isinstance(value, Decimal) and value.is_finite()):
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def control_report(root: Path, *, trust: sshsig.AllowedSigners, identities: Sequence[str],
                   workdir: Path | None = None, day: DayKind = "local") -> ControlReport:
    """Documents and control totals per stream, day and document type.

    ``day``: ``local`` puts each document with a business time (a bill) on its own local
    day (its time at its own offset: :mod:`exchange.audit.business_day`), ``utc`` on the
    UTC day of that time, ``bundle`` every document on its bundle's signed creation day
    (UTC); types without a business time are always on the bundle's day. Each bundle
    counts once however many copies the archive holds; bundles that fail verification
    are listed in ``skipped`` and not counted.
    """
    if not identities:
        raise ExchangeError("the report needs an auditor identity", hint="Pass --identity AUDITOR_KEY.")
    root = Path(root)
    if not root.is_dir():
        raise ExchangeError(f"{root} is not a folder")
    seen: set[tuple[str, str, int, str]] = set()
    agg: dict[tuple[str, str, str, str, str], ReportRow] = {}
    rep = ControlReport(root, day=day)

    def row(m: Manifest, day_: str, doc_type: str, basis: str) -> ReportRow:
        return agg.setdefault((m.sender, m.recipient, day_, doc_type, basis),
                              ReportRow(m.sender, m.recipient, day_, doc_type, basis))

    def take(res: BundleCheck) -> None:
        m = res.manifest
        errors = [x for x in res.findings if x.severity == "error"]
        if m is None or errors:
            rep.skipped.append({"file": res.rel, "reason": "; ".join(x.line() for x in errors) or "unreadable"})
            return
        if not res.decrypted:
            rep.not_readable.append(res.rel)
            return
        key = (m.sender, m.recipient, m.seq, m.sha256)
        if key in seen:
            return
        seen.add(key)
        rep.bundles += 1
        docs = res.summary.get("documents")
        for doc_type, d in (docs.items() if isinstance(docs, dict) else []):
            if not isinstance(d, dict):
                continue
            split = _business_days(res, str(doc_type), d, day, rep)
            if split is not None:
                for day_, share in sorted(split.items()):
                    r = row(m, day_, doc_type, day)
                    r.bundles += 1
                    r.documents += share.documents
                    for t, n in share.rows.items():
                        r.rows[t] = r.rows.get(t, 0) + n
                    for ref, v in share.totals.items():
                        r.totals[ref] = r.totals.get(ref, Decimal(0)) + v
                if not int(d.get("deletes") or 0):
                    continue
                r = row(m, m.created.date().isoformat(), doc_type, "bundle")  # a delete has no time: its bundle's
                r.bundles += 1
                r.deletes += int(d.get("deletes") or 0)
                continue
            r = row(m, m.created.date().isoformat(), doc_type, "bundle")
            r.bundles += 1
            r.documents += int(d.get("count") or 0)
            r.deletes += int(d.get("deletes") or 0)
            for t, n in (d.get("rows") or {}).items():
                r.rows[t] = r.rows.get(t, 0) + int(n)
            for ref, v in (d.get("totals") or {}).items():
                r.totals[ref] = r.totals.get(ref, Decimal(0)) + (_decimal(v) or Decimal(0))

    arc = _Archive(root, trust, identities, workdir)
    arc.load(on_bundle=take)
    rep.rows = [agg[k] for k in sorted(agg)]
    return rep


def _business_days(res: BundleCheck, doc_type: str, d: Mapping[str, Any], day: DayKind,
                   rep: ControlReport) -> dict[str, DayShare] | None:
    """The bundle's documents of ``doc_type`` by business day (None: by the bundle's day); a business time
    that cannot be read is noted in ``rep.notes`` with why, and the bundle's day used."""
    import pyarrow.parquet as pq

    catalog = (res.inner or {}).get("catalog")
    specs = catalog.get("docs") if isinstance(catalog, dict) else None
    spec = specs.get(doc_type) if isinstance(specs, dict) else None
    given = d.get("totals")
    totals: Mapping[str, Any] = given if isinstance(given, dict) else {}
    budget = parquet_budget.Budget(MAX_TABLE_BYTES)

    def read(path: Path, columns: list[str]) -> Any:
        return parquet_budget.read_table(path, parquet_budget.scan(path), budget, columns)

    try:
        return business_day.shares(doc_type, spec, totals, res.tables, read,
                                   lambda p: pq.read_schema(p), day)
    except ExchangeError as exc:
        why = exc.message
    except Exception as exc:  # pyarrow on a peer's file: KeyError, ArrowInvalid ...
        why = f"{type(exc).__name__}: {str(exc)[:200]}"
    rep.notes.append({"file": res.rel, "reason": f"{doc_type} counted on the bundle's day: {why}"})
    return None


def auditor_key_text(identity: str, recipient: str, created: datetime) -> str:
    """The contents of an auditor identity file (age-keygen's layout)."""
    return (f"# exchange auditor identity, created {format_time(created)}\n"
            f"# public key: {recipient}\n{identity}\n")
