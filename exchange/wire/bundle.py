"""Write, read and verify bundles and acks (docs/FORMAT.md, version 1).

Writing streams: tables go to Parquet files in a scratch folder, the inner tar
streams through the age encryptor into a scratch ciphertext file, and the outer
tar copies it in; memory stays at a few chunks whatever the size. Reading is
one sequential pass: structure and limits from the tar headers first, then the
signature, then decryption with every hash checked, and only then are tables
handed out. The auditor reads with the same :class:`BundleReader`: strictly to
verify, or leniently (:meth:`BundleReader.salvage`, for ``audit extract
--force``) to list every problem instead of stopping at the first. Strict JSON
and the signed JSON files (acks' outer form) are :mod:`exchange.wire.signed`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from exchange import __version__
from exchange.errors import (
    AuthenticityError, BundleError, ExchangeError, FormatError, LimitError, NotForUsError,
    NotRegularFileError, VersionError,
)
from exchange.errors import CryptoError, NoIdentityError
from exchange.files import COPY_CHUNK, create_fresh, open_regular, utc_now
from exchange.wire import parquet_budget, tarfmt
from exchange.wire.crypto import age, sshsig
from exchange.wire.formats import (
    ACK_FORMAT, ACK_MEMBERS, BUNDLE_FORMAT, BUNDLE_MEMBERS, FORMAT_VERSION, INNER_MANIFEST,
    MAX_INNER_MANIFEST_BYTES, MAX_MANIFEST_BYTES, MAX_PAYLOAD_BYTES,
    MAX_SIG_BYTES, MAX_TABLE_BYTES, MAX_TABLES, PAYLOAD_FORMAT, PAYLOAD_MEMBER, SIG_NAMESPACE, TABLE_FILE,
    MAX_SEQ, app_major,
)
from exchange.wire.formats import DEFAULT_LANE, check_lane, lane_field
from exchange.wire.formats import (  # acks, version 2
    ACK_DECISION_VERSION, ACK_DETAILS_FORMAT, ACK_DETAILS_MEMBER, ACK_DETAILS_PAD, ACK_RESULTS, ACK_V2_FIELDS,
    ACK_VERSION,
    ACK_VERSIONS, MAX_ACK_DETAILS_BYTES, MAX_ACK_DETAILS_FILE, MAX_ACK_PARKED, MAX_COUNT, MAX_REASON_CHARS,
)
from exchange.vocabulary import AckResult
from exchange.wire.decision import Decision
from exchange.wire.signed import (
    check_exact, check_format, dump_json, format_time, json_field, node_field, pack_signed, parse_json,
    parse_time, seq_field, sha256_field, unpack_signed, verify_signed, with_file_name,
)

#: bytes per value once decoded, by Parquet physical type (BYTE_ARRAY: its offset; the data is
#: counted in the uncompressed size); FIXED_LEN_BYTE_ARRAY uses its length, at least a decimal128's 16
_PARQUET_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8, "BYTE_ARRAY": 4}


class HeldError(VersionError):
    """Authentic, but written by another major version: keep it, apply after upgrade."""

    hint = "Upgrade exchange on the older side; the bundle is kept and applied after the upgrade."


# ---------------------------------------------------------------- helpers

class _HashingWriter:
    """Counts and hashes what passes through to ``dst``."""

    def __init__(self, dst: BinaryIO) -> None:
        self.dst, self.h, self.size = dst, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.dst.write(data)

    def flush(self) -> None:
        self.dst.flush()


class _HashingReader:
    """Reads at most ``limit`` bytes from ``src``, hashing them."""

    def __init__(self, src: BinaryIO, limit: int | None = None) -> None:
        self.src, self.h, self.left = src, hashlib.sha256(), limit

    def read(self, n: int = -1) -> bytes:
        if self.left is not None:
            n = self.left if n < 0 else min(n, self.left)
        data = self.src.read(n) if n != 0 else b""
        self.h.update(data)
        if self.left is not None:
            self.left -= len(data)
        return data

    def drain(self) -> int:
        total = 0
        while chunk := self.read(COPY_CHUNK):
            total += len(chunk)
        return total


def parquet_expanded_size(meta: Any) -> int:
    """What a Parquet file's tables take once decoded, from its footer alone (no row is read).

    Per column chunk the larger of its uncompressed size and its value count times the
    decoded width of its type: RLE and dictionary encodings let a chunk of a few bytes
    stand for hundreds of millions of values, which the uncompressed sizes do not show.
    """
    total = 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        size = 0
        for j in range(rg.num_columns):
            c = rg.column(j)
            width = _PARQUET_WIDTH.get(c.physical_type) or max(16, meta.schema.column(j).length or 0)
            size += max(c.total_uncompressed_size, max(c.num_values, rg.num_rows) * width)
        total += max(size, rg.total_byte_size, rg.num_rows)
    return total


# ---------------------------------------------------------------- manifests

@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}

    @classmethod
    def parse(cls, obj: Any, what: str) -> Entry:
        if not isinstance(obj, dict):
            raise FormatError(f"{what}: file entry is not an object")
        name = json_field(obj, "name", str, what)
        size = json_field(obj, "size", int, what)
        if size < 0:
            raise FormatError(f"{what}: negative size for {name!r}")
        return cls(name, size, sha256_field(obj.get("sha256"), what))


@dataclass(frozen=True)
class Manifest:
    """The signed outer manifest; ``raw`` is the exact bytes that were signed."""

    sender: str
    recipient: str
    seq: int
    prev: str | None
    created: datetime
    app_version: str
    payload: Entry
    inner: tuple[Entry, ...]
    raw: bytes = field(repr=False)
    lane: str = DEFAULT_LANE  # format 5: absent from the manifest for the default lane

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @classmethod
    def parse(cls, raw: bytes, what: str = BUNDLE_MEMBERS[0]) -> Manifest:
        obj = parse_json(raw, what)
        check_format(obj, BUNDLE_FORMAT, what)
        prev = obj.get("prev")
        inner = json_field(obj, "inner", list, what)
        if not 1 <= len(inner) <= MAX_TABLES + 1:
            raise LimitError(f"{what}: {len(inner)} inner files (1 to {MAX_TABLES + 1} allowed)")
        m = cls(
            sender=node_field(json_field(obj, "sender", str, what), what),
            recipient=node_field(json_field(obj, "recipient", str, what), what),
            seq=json_field(obj, "seq", int, what),
            prev=None if prev is None else sha256_field(prev, what),
            created=parse_time(json_field(obj, "created", str, what), what),
            app_version=json_field(obj, "app_version", str, what),
            payload=Entry.parse(json_field(obj, "payload", dict, what), what),
            inner=tuple(Entry.parse(e, what) for e in inner),
            raw=raw,
            lane=lane_field(obj, what),
        )
        app_major(m.app_version)
        if m.seq < 1:
            raise FormatError(f"{what}: seq must be >= 1")
        if m.seq > MAX_SEQ:
            raise LimitError(f"{what}: seq {m.seq} is over the limit ({MAX_SEQ})")
        if m.payload.name != BUNDLE_MEMBERS[2] or m.payload.size > MAX_PAYLOAD_BYTES:
            raise FormatError(f"{what}: bad payload entry")
        names = [e.name for e in m.inner]
        if names[0] != INNER_MANIFEST or len(set(names)) != len(names) or not all(
                n == TABLE_FILE.format(i) for i, n in enumerate(names[1:], 1)):
            raise FormatError(f"{what}: inner file list is not inner.json, t0001.parquet, ...")
        if m.inner[0].size > MAX_INNER_MANIFEST_BYTES:
            raise LimitError(f"{what}: {INNER_MANIFEST} of {m.inner[0].size} bytes "
                             f"(limit {MAX_INNER_MANIFEST_BYTES})")
        return m


def _lane_json(lane: str) -> dict[str, str]:
    return {} if lane == DEFAULT_LANE else {"lane": check_lane(lane)}


# ---------------------------------------------------------------- writing

@dataclass(frozen=True)
class Sealed:
    path: Path
    size: int
    sha256: str
    manifest: Manifest


TableSource = Any  # pa.Table | pa.RecordBatchReader (pyarrow is imported lazily)


#: How tables are written. No dictionary pages and no column statistics: zstd finds the repeats
#: a dictionary would, nobody reads a bundle by predicate, and for one 20,000-bill batch (four
#: tables) this wrote 1.51 MB in 35 ms against pyarrow's defaults' 1.66 MB in 59 ms.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "use_dictionary": False, "write_statistics": False}


def _write_parquet(path: Path, source: TableSource) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(source, pa.Table):  # whole row groups, however finely the table is chunked
        with pq.ParquetWriter(path, source.schema, **PARQUET_OPTIONS) as writer:
            writer.write_table(source)
        return int(source.num_rows)
    rows = 0
    with pq.ParquetWriter(path, source.schema, **PARQUET_OPTIONS) as writer:
        for batch in source:  # a stream (a big table): one row group per batch, bounded memory
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


class ParquetCache:
    """Parquet files written once and shared by several bundles (one change to many stores).

    Keyed by the identity of the Arrow table object: the exporter hands the
    same table to every store whose batch is identical, so the rows are read
    and encoded once and only the per-store layers (inner manifest, age
    encryption to that store, signature) are redone.
    """

    def __init__(self, folder: Path) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=".parquet-", dir=folder)
        self.dir = Path(self._tmp.name)
        self._files: dict[int, tuple[Path, int, Any]] = {}
        self._sha256: dict[Path, str] = {}  # of the files written: hashed once, not per bundle

    def sha256_of(self, path: Path) -> str | None:
        return self._sha256.get(path)

    def note_sha256(self, path: Path, digest: str) -> None:
        if path.parent == self.dir:
            self._sha256[path] = digest

    def get(self, source: TableSource) -> tuple[Path, int] | None:
        hit = self._files.get(id(source))
        return (hit[0], hit[1]) if hit and hit[2] is source else None

    def put(self, source: TableSource, path: Path, rows: int) -> None:
        self._files[id(source)] = (path, rows, source)

    def drop(self, source: TableSource) -> None:
        hit = self._files.pop(id(source), None)
        if hit is not None:
            self._sha256.pop(hit[0], None)
            hit[0].unlink(missing_ok=True)

    def close(self) -> None:
        self._tmp.cleanup()


#: Bytes of encrypted payload held in memory while a bundle is sealed (the rest spills to a temporary file).
PAYLOAD_IN_MEMORY = 4 << 20

#: The JSON text of the last catalog sealed, at its place in an inner manifest: (catalog, text).
_CATALOG_TEXT: list[tuple[Mapping[str, Any], bytes]] = []


def _with_catalog(inner_raw: bytes, catalog: Mapping[str, Any]) -> bytes:
    """``inner_raw`` (:func:`dump_json` of a manifest) with ``"catalog": catalog`` as its last field.

    The same bytes as dumping the manifest with the catalog in it; the catalog's
    text (most of an inner manifest) is made once per catalog, not per bundle:
    a fan-out seals thousands of bundles with one catalog.
    """
    if not _CATALOG_TEXT or _CATALOG_TEXT[0][0] is not catalog:
        whole = dump_json({"catalog": catalog})  # b'{\n "catalog": ...\n}\n', at the depth it has in a manifest
        _CATALOG_TEXT[:] = [(catalog, whole[len(b"{\n"):-len(b"\n}\n")])]
    if not inner_raw.endswith(b"\n}\n"):
        raise ValueError("an inner manifest is a JSON object")
    return inner_raw[:-len(b"\n}\n")] + b",\n" + _CATALOG_TEXT[0][1] + b"\n}\n"


def seal_bundle(
    path: Path, *, key: Any, sender: str, recipient: str, seq: int, prev: str | None,
    recipients: Sequence[str], tables: Mapping[str, TableSource],
    summary: Mapping[str, Any] | None = None, created: datetime | None = None,
    app_version: str = __version__, parquet_cache: ParquetCache | None = None,
    catalog: Mapping[str, Any] | None = None, sync: bool = True, lane: str = DEFAULT_LANE,
) -> Sealed:
    """Write a complete, fsynced bundle to ``path`` (the caller renames it into place).

    ``sync=False``: not fsynced here; the caller fsyncs it before recording it
    (an exporter sealing many bundles in one transaction fsyncs them together).

    A write that fails (a full disk) removes the partial ``path`` at once, so it holds
    no space and is never taken for a bundle, and raises an ExchangeError saying so.
    """
    try:
        return _seal_bundle(path, key=key, sender=sender, recipient=recipient, seq=seq, prev=prev,
                            recipients=recipients, tables=tables, summary=summary, created=created,
                            app_version=app_version, parquet_cache=parquet_cache, catalog=catalog, sync=sync,
                            lane=lane)
    except OSError as exc:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        raise ExchangeError(f"cannot write bundle {path.name} in {path.parent}: {exc.strerror or exc}",
                            hint="Free disk space there, then sync again: the documents stay pending.") from exc


def _seal_bundle(
    path: Path, *, key: Any, sender: str, recipient: str, seq: int, prev: str | None,
    recipients: Sequence[str], tables: Mapping[str, TableSource],
    summary: Mapping[str, Any] | None, created: datetime | None,
    app_version: str, parquet_cache: ParquetCache | None, catalog: Mapping[str, Any] | None = None,
    sync: bool = True, lane: str = DEFAULT_LANE,
) -> Sealed:
    if len(tables) > MAX_TABLES:
        raise LimitError(f"{len(tables)} tables in one bundle (at most {MAX_TABLES})")
    created = created or utc_now()
    mtime = int(created.timestamp())
    with ExitStack() as stack:
        work: Path | None = None  # a folder for tables not in the cache, made only if there is one
        files: list[tuple[str, Path | bytes]] = []
        listing = []
        for i, (name, source) in enumerate(tables.items(), 1):
            fname = TABLE_FILE.format(i)
            hit = parquet_cache.get(source) if parquet_cache is not None else None
            if hit is not None:
                fpath, rows = hit
            elif parquet_cache is not None:
                fpath = parquet_cache.dir / f"{id(source):x}.parquet"
                rows = _write_parquet(fpath, source)
                parquet_cache.put(source, fpath, rows)
            else:
                if work is None:
                    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".seal-", dir=path.parent)))
                fpath = work / fname
                rows = _write_parquet(fpath, source)
            files.append((fname, fpath))
            listing.append({"file": fname, "table": name, "rows": rows})
        inner: dict[str, Any] = {
            "format": PAYLOAD_FORMAT, "version": FORMAT_VERSION, "sender": sender,
            "recipient": recipient, "seq": seq, **_lane_json(lane), "tables": listing,
            "summary": dict(summary or {}),
        }
        # FORMAT.md v3: the sender's catalog and schemas, and their fingerprint (its text made once)
        inner_raw = dump_json(inner) if catalog is None else _with_catalog(dump_json(inner), catalog)
        if len(inner_raw) > MAX_INNER_MANIFEST_BYTES:
            raise LimitError(f"inner manifest of {len(inner_raw)} bytes is over the limit")
        files.insert(0, (INNER_MANIFEST, inner_raw))
        entries = []
        # the encrypted payload waits in memory up to PAYLOAD_IN_MEMORY (a fan-out's bundles: no second write
        # and read of each), beyond it in a file without a name: nothing to remove, even after a crash
        raw_out = cast(BinaryIO, stack.enter_context(
            tempfile.SpooledTemporaryFile(max_size=PAYLOAD_IN_MEMORY, dir=str(path.parent))))
        hashed = _HashingWriter(raw_out)
        with age.Encryptor(hashed, list(recipients)) as enc:  # type: ignore[arg-type]
            for fname, member in files:
                if isinstance(member, bytes):
                    enc.write(tarfmt.header(fname, len(member), mtime))
                    enc.write(member)
                    enc.write(tarfmt.padding(len(member)))
                    entries.append(Entry(fname, len(member), hashlib.sha256(member).hexdigest()))
                    continue
                size = member.stat().st_size
                enc.write(tarfmt.header(fname, size, mtime))
                known = parquet_cache.sha256_of(member) if parquet_cache is not None else None
                h = hashlib.sha256()
                with open(member, "rb") as src:
                    while chunk := src.read(COPY_CHUNK):
                        if known is None:
                            h.update(chunk)
                        enc.write(chunk)
                enc.write(tarfmt.padding(size))
                if known is None and parquet_cache is not None:
                    parquet_cache.note_sha256(member, known := h.hexdigest())
                entries.append(Entry(fname, size, known or h.hexdigest()))
            enc.write(tarfmt.END)
        raw_out.flush()
        payload = Entry(BUNDLE_MEMBERS[2], hashed.size, hashed.h.hexdigest())
        manifest_raw = dump_json({
            "format": BUNDLE_FORMAT, "version": FORMAT_VERSION, "app_version": app_version,
            "sender": sender, "recipient": recipient, **_lane_json(lane), "seq": seq, "prev": prev,
            "created": format_time(created), "payload": payload.as_json(),
            "inner": [e.as_json() for e in entries],
        })
        if len(manifest_raw) > MAX_MANIFEST_BYTES:
            raise LimitError(f"manifest of {len(manifest_raw)} bytes is over the limit")
        sig = sshsig.sign(key, manifest_raw, SIG_NAMESPACE)
        with create_fresh(path) as out:  # a link or FIFO planted at NAME.part is removed, not written through
            hashed_out = _HashingWriter(out)
            tarfmt.write_member(hashed_out, BUNDLE_MEMBERS[0], manifest_raw, mtime)  # type: ignore[arg-type]
            tarfmt.write_member(hashed_out, BUNDLE_MEMBERS[1], sig, mtime)  # type: ignore[arg-type]
            hashed_out.write(tarfmt.header(BUNDLE_MEMBERS[2], payload.size, mtime))
            raw_out.seek(0)
            while chunk := raw_out.read(COPY_CHUNK):
                hashed_out.write(chunk)
            hashed_out.write(tarfmt.padding(payload.size))
            hashed_out.write(tarfmt.END)
            out.flush()
            if sync:
                os.fsync(out.fileno())
    manifest = Manifest.parse(manifest_raw)
    return Sealed(path, hashed_out.size, hashed_out.h.hexdigest(), manifest)


# ---------------------------------------------------------------- reading

@dataclass
class Opened:
    """A verified, decrypted bundle; tables live in ``workdir`` until closed."""

    manifest: Manifest
    inner: dict[str, Any]
    signer: sshsig.AllowedSigner
    file_sha256: str
    tables: dict[str, Path]
    #: per table, what its pages hold (parquet_budget.scan); every table read counts against ``budget``
    plans: dict[str, parquet_budget.FilePlan] = field(default_factory=dict)
    budget: parquet_budget.Budget = field(default_factory=lambda: parquet_budget.Budget(MAX_TABLE_BYTES))

    @property
    def summary(self) -> dict[str, Any]:
        s = self.inner.get("summary", {})
        return s if isinstance(s, dict) else {}

    @property
    def catalog(self) -> Any:
        """The sender's catalog as sealed (inner manifest ``catalog``, FORMAT.md v3), unchecked;
        None from a sender before v3. ``exchange.receive.evolution`` validates it before use."""
        return self.inner.get("catalog")

    def schema(self, name: str) -> Any:
        """One table's Arrow schema from its Parquet footer (checked and bounded when the bundle was
        opened), without reading any rows: what schema checks look at before anything is applied."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(self.tables[name])
        except (pa.ArrowException, OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise FormatError(f"{self.tables[name].name}: the schema of table {name!r} cannot be read "
                              f"({str(exc).splitlines()[0][:200]})") from exc

    def table(self, name: str) -> Any:
        """Read one table; Parquet data that cannot be decoded is a FormatError (malformed bundle)."""
        import pyarrow as pa

        path = self.tables[name]
        try:
            plan = self.plans.get(name) or parquet_budget.scan(path)
            table = parquet_budget.read_table(path, plan, self.budget)  # bounded by what is decoded
            table.validate(full=True)  # e.g. invalid UTF-8 in a string column, which Parquet readers let through
            return table
        except (pa.ArrowException, OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the local disk, not the data (pyarrow's decoding errors carry no errno)
            raise FormatError(f"{path.name}: Parquet data of table {name!r} cannot be read "
                              f"({str(exc).splitlines()[0][:200]})") from exc


class BundleReader:
    """One sequential pass over a bundle file: structure, signature, payload."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._f = open_regular(self.path)  # never through a link, never a FIFO (which would block)
        except OSError as exc:
            raise FormatError(f"{self.path.name}: cannot open: {exc.strerror}") from exc
        except NotRegularFileError as exc:
            raise NotRegularFileError(f"cannot open: {exc.message}") from exc
        self._src = _HashingReader(self._f)
        try:
            file_size = os.fstat(self._f.fileno()).st_size
            if file_size == 0:
                raise FormatError("empty file")
            what = "bundle"
            h_raw, raw = tarfmt.read_member(self._src, BUNDLE_MEMBERS[0], MAX_MANIFEST_BYTES, what)  # type: ignore[arg-type]
            h_sig, self.signature = tarfmt.read_member(
                self._src, BUNDLE_MEMBERS[1], MAX_SIG_BYTES, what)  # type: ignore[arg-type]
            m = tarfmt.read_header(self._src)  # type: ignore[arg-type]
            if m is None or m.name != BUNDLE_MEMBERS[2]:
                raise FormatError(f"member {BUNDLE_MEMBERS[2]!r} missing or out of order")
            if m.size > MAX_PAYLOAD_BYTES:
                raise LimitError(f"payload of {m.size} bytes is over the limit")
            need = sum(tarfmt.BLOCK + n + -n % tarfmt.BLOCK for n in (len(raw), len(self.signature), m.size))
            need += len(tarfmt.END)
            if file_size < need:
                raise FormatError(f"truncated: the file has {file_size} bytes, its tar headers need {need}")
            if file_size != need:  # a member flood or junk (even zeros) after the archive: refuse now,
                raise FormatError(  # before the whole file is hashed or any cryptography runs
                    "unexpected extra member in tar, or unexpected data after the end of the tar archive "
                    f"(the file has {file_size} bytes, its three members need exactly {need})")
            self.payload_size = m.size
            self._payload_offset = file_size - len(tarfmt.END) - m.size - -m.size % tarfmt.BLOCK
            self.manifest = Manifest.parse(raw)
            if m.size != self.manifest.payload.size:
                raise AuthenticityError("payload size differs from the signed manifest")
            check_exact((h_raw, h_sig, m), self.signature, self.manifest.created)
        except ExchangeError as exc:
            self.close()
            raise with_file_name(self.path, exc) from exc
        self.signer: sshsig.AllowedSigner | None = None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify_signature(self, trust: sshsig.AllowedSigners) -> sshsig.AllowedSigner:
        try:
            self.signer = verify_signed(self.signature, self.manifest.raw, self.manifest.sender, trust,
                                        self.manifest.created)
        except ExchangeError as exc:
            raise with_file_name(self.path, exc) from exc
        return self.signer

    def check_recipient(self, me: str) -> None:
        if self.manifest.recipient != me:
            raise NotForUsError(
                f"{self.path.name}: addressed to {self.manifest.recipient!r}, this node is {me!r}")

    def check_major(self) -> None:
        ours, theirs = app_major(__version__), app_major(self.manifest.app_version)
        if ours != theirs:
            raise HeldError(
                f"{self.path.name}: written by exchange {self.manifest.app_version} "
                f"(major {theirs}); this node runs {__version__} (major {ours})")

    def _finish(self) -> str:
        """After the payload: end of archive, then the whole-file hash."""
        tarfmt.skip_padding(self._src, self.payload_size)  # type: ignore[arg-type]
        tarfmt.expect_end(self._src)  # type: ignore[arg-type]
        if self._f.read(1):
            raise FormatError("unexpected data after the end of the tar archive")
        return self._src.h.hexdigest()

    def check_payload_hash(self) -> str:
        """Without decrypting: the ciphertext is the one signed. Returns the file hash."""
        try:
            sub = _HashingReader(self._src, self.payload_size)  # type: ignore[arg-type]
            if sub.drain() != self.payload_size:
                raise FormatError("truncated payload")
            if sub.h.hexdigest() != self.manifest.payload.sha256:
                raise AuthenticityError("payload SHA-256 differs from the signed manifest")
            return self._finish()
        except ExchangeError as exc:
            raise with_file_name(self.path, exc) from exc

    def recheck_payload(self) -> str:
        """:meth:`check_payload_hash` from the payload's start again, after a failed :meth:`decrypt`.

        Tells damage from "not encrypted to these identities" (the auditor's question)
        without opening and parsing the file a second time.
        """
        self._f.seek(0)
        self._src = _HashingReader(self._f)
        self._src.read(self._payload_offset)  # the manifest and signature, for the whole-file hash
        return self.check_payload_hash()

    def decrypt(self, identities: Sequence[str], workdir: Path) -> Opened:
        """Decrypt into ``workdir``, checking every hash; then the inner manifest."""
        if self.signer is None:
            raise AuthenticityError(f"{self.path.name}: signature not verified before decryption")
        try:
            sub = _HashingReader(self._src, self.payload_size)  # type: ignore[arg-type]
            dec = age.Decryptor(sub, list(identities))  # type: ignore[arg-type]
            paths: dict[str, Path] = {}
            for entry in self.manifest.inner:
                m = tarfmt.read_header(dec)  # type: ignore[arg-type]
                if m is None or m.name != entry.name:
                    raise AuthenticityError(f"payload member {getattr(m, 'name', None)!r} "
                                            f"where {entry.name!r} was signed")
                if m.size != entry.size:
                    raise AuthenticityError(f"payload member {entry.name} size differs from the signed manifest")
                tarfmt.check_exact(m, int(self.manifest.created.timestamp()))
                target = workdir / entry.name
                if _copy_member(dec, m, target) != entry.sha256:
                    raise AuthenticityError(f"payload member {entry.name} differs from the signed hash")
                tarfmt.skip_padding(dec, m.size)  # type: ignore[arg-type]
                paths[entry.name] = target
            tarfmt.expect_end(dec)  # type: ignore[arg-type]
            if dec.read(1):
                raise FormatError("data after the end of the inner tar")
            if sub.drain():
                raise FormatError("data after the end of the age payload")
            if sub.h.hexdigest() != self.manifest.payload.sha256:
                raise AuthenticityError("payload SHA-256 differs from the signed manifest")
            file_sha = self._finish()
            inner, plans = self._check_inner(paths)
        except ExchangeError as exc:
            raise with_file_name(self.path, exc) from exc
        tables = {t["table"]: paths[t["file"]] for t in inner["tables"]}
        return Opened(self.manifest, inner, self.signer, file_sha, tables,
                      {t["table"]: plans[t["file"]] for t in inner["tables"]})

    def _check_inner(self, paths: dict[str, Path]) -> tuple[dict[str, Any], dict[str, parquet_budget.FilePlan]]:
        inner = parse_json(paths[INNER_MANIFEST].read_bytes(), INNER_MANIFEST)
        check_format(inner, PAYLOAD_FORMAT, INNER_MANIFEST)
        m = self.manifest
        for problem in _inner_identity(m, inner):
            raise problem
        tables = json_field(inner, "tables", list, INNER_MANIFEST)
        files = [e.name for e in m.inner[1:]]
        seen = set()
        expanded = 0
        plans: dict[str, parquet_budget.FilePlan] = {}
        for t, fname in zip(tables, files, strict=False):
            if not isinstance(t, dict) or t.get("file") != fname or not isinstance(t.get("table"), str) \
                    or not isinstance(t.get("rows"), int) or t["table"] in seen:
                raise FormatError(f"{INNER_MANIFEST}: table list does not match the payload files")
            seen.add(t["table"])
            meta = _footer(paths[fname], fname)
            rows = meta.num_rows
            try:
                claimed = parquet_expanded_size(meta)
            except Exception as exc:  # pyarrow raises several types for a bad footer
                raise FormatError(f"{fname}: not a readable Parquet file ({exc})") from exc
            if expanded + claimed <= MAX_TABLE_BYTES:  # the footer's claim passes: the pages decide
                plans[fname] = parquet_budget.scan(paths[fname], meta)
                claimed = max(claimed, plans[fname].decoded)
            expanded += claimed
            if expanded > MAX_TABLE_BYTES:  # a decompression bomb: refuse before reading any rows
                raise LimitError(f"{fname}: tables expand to more than {MAX_TABLE_BYTES >> 20} MiB "
                                 "uncompressed (limit per bundle)")
            if rows != t["rows"]:
                raise FormatError(f"{fname}: {rows} rows, inner manifest says {t['rows']}")
        if len(tables) != len(files):
            raise FormatError(f"{INNER_MANIFEST}: {len(tables)} tables listed, {len(files)} files in payload")
        return inner, plans


    def salvage(self, identities: Sequence[str], workdir: Path) -> Salvaged:
        """The auditor's lenient pass (``audit extract --force``): decrypt what can be decrypted
        into ``workdir`` and list every disagreement with the signed manifest, not only the first.

        Needs no verified signature: what it returns is marked unverified by the caller
        and never applied. Structure errors of the outer tar were raised when opening.
        """
        out = Salvaged()
        expected = {e.name: e for e in self.manifest.inner}
        sub = _HashingReader(self._src, self.payload_size)  # type: ignore[arg-type]
        try:
            dec = age.Decryptor(sub, list(identities))  # type: ignore[arg-type]
            while (m := tarfmt.read_header(dec)) is not None:  # type: ignore[arg-type]
                if m.name in out.files or len(out.files) > MAX_TABLES + 1:
                    out.problems.append(f"payload member {m.name} repeated or too many members")
                    break
                digest = _copy_member(dec, m, workdir / m.name)
                tarfmt.skip_padding(dec, m.size)  # type: ignore[arg-type]
                out.files[m.name] = workdir / m.name
                e = expected.get(m.name)
                if e is None:
                    out.problems.append(f"payload member {m.name} is not in the signed manifest")
                elif e.size != m.size or e.sha256 != digest:
                    out.problems.append(f"payload member {m.name} differs from the signed hash")
        except ExchangeError as exc:
            out.not_for_us = not_for_these_identities(exc)
            out.problems.append(f"payload could not be fully decrypted: {exc}")
        sub.drain()
        out.payload_intact = sub.h.hexdigest() == self.manifest.payload.sha256
        if not out.payload_intact:
            out.problems.append("payload SHA-256 differs from the signed manifest")
        out.problems += [f"payload member {name} listed in the signed manifest is missing"
                         for name in expected if name not in out.files]
        if INNER_MANIFEST in out.files:
            out.inner_raw = out.files[INNER_MANIFEST].read_bytes()
            try:
                out.inner = parse_json(out.inner_raw, INNER_MANIFEST)
            except BundleError:
                out.inner = None
        out.problems += _inner_problems(self.manifest, out.inner, out.files)
        return out


@dataclass
class Salvaged:
    """What :meth:`BundleReader.salvage` got out of a payload, and everything wrong with it."""

    files: dict[str, Path] = field(default_factory=dict)  # payload member name -> decrypted file
    problems: list[str] = field(default_factory=list)
    inner_raw: bytes = b""
    inner: dict[str, Any] | None = None  # inner.json when it is a JSON object
    payload_intact: bool = False  # the ciphertext is the one the manifest signs
    not_for_us: bool = False  # not encrypted to the identities given


def _copy_member(dec: Any, m: tarfmt.Member, target: Path) -> str:
    """Copy a payload member's ``m.size`` bytes to a new scratch file; its SHA-256."""
    h = hashlib.sha256()
    with open(target, "wb") as out:
        left = m.size
        while left:
            chunk = dec.read(min(COPY_CHUNK, left))
            if not chunk:
                raise FormatError(f"payload member {m.name} truncated")
            h.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def not_for_these_identities(exc: ExchangeError) -> bool:
    """Decryption failed only because the payload is not encrypted to the identities given."""
    return isinstance(exc, NoIdentityError)


def _footer(path: Path, fname: str) -> Any:
    """A Parquet file's footer (pyarrow FileMetaData); FormatError when it cannot be read."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path)
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise FormatError(f"{fname}: not a readable Parquet file ({exc})") from exc


def _inner_identity(m: Manifest, inner: Mapping[str, Any]) -> list[AuthenticityError]:
    """The inner manifest repeats the signed sender, recipient, seq and lane (else: re-signed or forwarded)."""
    default = {"lane": DEFAULT_LANE}
    return [AuthenticityError(f"inner manifest {name} {inner.get(name, default.get(name))!r} differs from the "
                              f"signed outer manifest ({getattr(m, name)!r}): payload re-signed or forwarded")
            for name in ("sender", "recipient", "seq", "lane")
            if inner.get(name, default.get(name)) != getattr(m, name)]


def _inner_problems(m: Manifest, inner: Any, files: Mapping[str, Path]) -> list[str]:
    """Lenient checks of a salvaged inner manifest: its identity and each listed table's row count."""
    if not isinstance(inner, dict):
        return [f"{INNER_MANIFEST} is missing or not a JSON object"]
    out = [p.message for p in _inner_identity(m, inner)]
    tables = inner.get("tables")
    for t in tables if isinstance(tables, list) else []:
        if not isinstance(t, dict) or not isinstance(t.get("file"), str) or t["file"] not in files:
            continue
        try:
            rows = _footer(files[t["file"]], t["file"]).num_rows
        except FormatError as exc:
            out.append(exc.message)
            continue
        if rows != t.get("rows"):
            out.append(f"{t['file']}: {rows} rows, inner manifest says {t.get('rows')}")
    return out


@contextmanager
def open_bundle(
    path: Path, *, trust: sshsig.AllowedSigners, identities: Sequence[str], me: str | None,
    check_major: bool = True, workdir: Path | None = None,
) -> Iterator[Opened]:
    """Verify and decrypt a bundle; yields the tables, removes the scratch files after."""
    with BundleReader(path) as reader:
        reader.verify_signature(trust)
        if me is not None:
            reader.check_recipient(me)
        if check_major:
            reader.check_major()
        tmp = tempfile.mkdtemp(prefix=".open-", dir=workdir)
        try:
            yield reader.decrypt(identities, Path(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- acks

def _check_counts(applied: Mapping[str, Any], parked: Sequence[Any], what: str, v1: bool = False) -> None:
    """Every count an ack states is within MAX_COUNT, its lists within their documented lengths
    (a version 1 ack's parked list was bounded by its size only)."""
    if len(applied) > MAX_TABLES:
        raise LimitError(f"{what}: {len(applied)} document types (at most {MAX_TABLES})")
    if len(parked) > MAX_ACK_PARKED and not v1:
        raise LimitError(f"{what}: {len(parked)} parked documents listed (at most {MAX_ACK_PARKED})")
    for doc_type, v in applied.items():
        for name, n in (v.items() if isinstance(v, dict) else [("", v)]):
            if type(n) is int and not 0 <= n <= MAX_COUNT:
                raise LimitError(f"{what}: {doc_type} {name} count {n} is out of range (0 to {MAX_COUNT})")


@dataclass(frozen=True)
class Head:
    """A stream position the acker states in a v2 ack: signed evidence for `audit verify`.

    ``received_from_you``: the last seq of stream sender -> acker applied by the acker.
    ``sent_to_you``: the last seq of stream acker -> sender the acker has sealed, and in
    ``acknowledged`` the last one the sender acknowledged APPLIED (so the sender holds it).
    """

    seq: int
    manifest_sha256: str | None
    acknowledged: int | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "manifest_sha256": self.manifest_sha256}
        if self.acknowledged is not None:
            out["acknowledged"] = self.acknowledged
        return out

    @classmethod
    def parse(cls, obj: Any, what: str, sent: bool) -> Head:
        if not isinstance(obj, dict) or set(obj) != ({"seq", "manifest_sha256"} | ({"acknowledged"} if sent else set())):
            raise FormatError(f"{what}: not an object of seq, manifest_sha256{', acknowledged' if sent else ''}")
        seq = seq_field(obj["seq"], what, "seq", 0)
        msha = obj["manifest_sha256"]
        head = cls(seq, None if msha is None else sha256_field(msha, what),
                   seq_field(obj["acknowledged"], what, "acknowledged", 0) if sent else None)
        if (seq == 0 and head.manifest_sha256 is not None) or (head.acknowledged or 0) > seq:
            raise FormatError(f"{what}: inconsistent stream head {obj!r}")
        return head


@dataclass(frozen=True)
class Heads:
    received_from_you: Head
    sent_to_you: Head

    def as_json(self) -> dict[str, Any]:
        return {"received_from_you": self.received_from_you.as_json(), "sent_to_you": self.sent_to_you.as_json()}

    @classmethod
    def parse(cls, obj: Any, what: str) -> Heads:
        if not isinstance(obj, dict) or set(obj) != {"received_from_you", "sent_to_you"}:
            raise FormatError(f"{what}: heads is not an object of received_from_you, sent_to_you")
        return cls(Head.parse(obj["received_from_you"], f"{what} heads.received_from_you", False),
                   Head.parse(obj["sent_to_you"], f"{what} heads.sent_to_you", True))


#: heads that claim nothing (no evidence): for acks written outside a node's database
NO_HEADS = Heads(Head(0, None), Head(0, None, 0))


@dataclass(frozen=True)
class Ack:
    """A verified ack. ``reason``, ``applied`` and ``parked`` are the details: in the clear in a
    version 1 ack; in a version 2 ack only once :meth:`open_details` decrypted them
    (``details`` says which: ``clear``, ``decrypted``, ``sealed`` or ``unreadable``)."""

    acker: str
    sender: str
    seq: int
    bundle_sha256: str
    manifest_sha256: str | None
    result: str
    reason: str | None
    created: datetime
    app_version: str
    applied: dict[str, Any]
    parked: list[Any]
    raw: bytes = field(repr=False)
    file_sha256: str = ""
    version: int = 1
    heads: Heads | None = None
    sealed: bytes | None = field(default=None, repr=False)  # v2: the details' age file
    details: str = "clear"
    details_error: str = ""
    parked_total: int = 0
    decision: Decision | None = None  # v3: an operator's decision (skipped, superseded), once decrypted
    lane: str = DEFAULT_LANE  # format 5: the stream's lane (absent from ack.json for the default lane)

    @classmethod
    def parse(cls, raw: bytes, file_sha256: str = "", sealed: bytes | None = None) -> Ack:
        what = ACK_MEMBERS[0]
        obj = parse_json(raw, what)
        if obj.get("format") != ACK_FORMAT:
            raise FormatError(f"{what}: format is {obj.get('format')!r}, expected {ACK_FORMAT!r}")
        version = obj.get("version")
        if type(version) is not int or version not in ACK_VERSIONS:
            raise VersionError(f"{what}: ack version {version!r} is not supported by this exchange "
                               f"(supports {sorted(ACK_VERSIONS)})",
                               hint="Upgrade exchange to read files written by a newer version.")
        result = json_field(obj, "result", str, what)
        if result not in ACK_RESULTS:
            raise FormatError(f"{what}: result {result!r} is not APPLIED or REJECTED")
        msha = obj.get("manifest_sha256")
        common: dict[str, Any] = dict(
            acker=node_field(json_field(obj, "acker", str, what), what),
            sender=node_field(json_field(obj, "sender", str, what), what),
            seq=seq_field(obj.get("seq"), what, "seq"),
            bundle_sha256=sha256_field(obj.get("bundle_sha256"), what),
            manifest_sha256=None if msha is None else sha256_field(msha, what),
            result=result, created=parse_time(json_field(obj, "created", str, what), what),
            app_version=json_field(obj, "app_version", str, what), raw=raw, file_sha256=file_sha256,
            lane=lane_field(obj, what))
        if version == 1:
            reason = obj.get("reason")
            applied, parked = json_field(obj, "applied", dict, what), json_field(obj, "parked", list, what)
            _check_counts(applied, parked, what, v1=True)
            return cls(**common, reason=reason if isinstance(reason, str) else None, applied=applied,
                       parked=parked, parked_total=len(parked)).bind(sealed)
        if set(obj) - {"lane"} != set(ACK_V2_FIELDS):  # v3: the same fields, its details add a decision
            raise FormatError(f"{what}: fields {sorted(obj)} are not those of a version {version} ack "
                              f"({', '.join(ACK_V2_FIELDS)})")
        entry = Entry.parse(obj["details"], f"{what} details")
        if entry.name != ACK_DETAILS_MEMBER or entry.size > MAX_ACK_DETAILS_FILE:
            raise FormatError(f"{what}: bad details entry")
        sha256_field(obj["details_plain_sha256"], what)
        ack = cls(**common, reason=None, applied={}, parked=[], version=version,
                  heads=Heads.parse(obj["heads"], what), details="sealed")
        return ack if sealed is None else ack.bind(sealed)

    def bind(self, sealed: bytes | None) -> Ack:
        """This ack with its details member, which must be the one its signed ``ack.json`` names."""
        if self.version == 1:
            if sealed is not None:
                raise FormatError(f"a version 1 ack has no {ACK_DETAILS_MEMBER} member")
            return self
        entry = Entry.parse(parse_json(self.raw, ACK_MEMBERS[0])["details"], f"{ACK_MEMBERS[0]} details")
        if sealed is None:
            raise FormatError(f"member {ACK_DETAILS_MEMBER!r} missing")
        if len(sealed) != entry.size or hashlib.sha256(sealed).hexdigest() != entry.sha256:
            raise AuthenticityError(f"{ACK_DETAILS_MEMBER} differs from the SHA-256 signed in ack.json")
        return replace(self, sealed=sealed)

    def open_details(self, identities: Sequence[str]) -> Ack:
        """This ack with its details decrypted (v2); ``details`` says how that went, nothing raises."""
        if self.sealed is None or not identities:
            return self
        try:
            d = self._details(decrypt_small(self.sealed, identities, MAX_ACK_DETAILS_BYTES, ACK_DETAILS_MEMBER))
        except NoIdentityError:
            return self  # not encrypted to these identities: stays sealed
        except CryptoError as exc:
            return replace(self, details="unreadable", details_error=exc.message)
        except BundleError as exc:
            return replace(self, details="unreadable", details_error=exc.message)
        return replace(self, details="decrypted", reason=d["reason"], applied=d["applied"], parked=d["parked"],
                       parked_total=d["parked_total"], decision=d["decision"])

    def _details(self, plain: bytes) -> dict[str, Any]:
        what = ACK_DETAILS_MEMBER
        if hashlib.sha256(plain).hexdigest() != parse_json(self.raw, ACK_MEMBERS[0])["details_plain_sha256"]:
            raise AuthenticityError(f"{what}: decrypted details differ from the signed hash "
                                    "(another plaintext for another recipient?)")
        d = parse_json(plain, what)
        if d.get("format") != ACK_DETAILS_FORMAT or d.get("version") != self.version:
            raise FormatError(f"{what}: not {ACK_DETAILS_FORMAT} version {self.version}")
        if lane_field(d, what) != self.lane:
            raise AuthenticityError(f"{what}: lane {d.get('lane', DEFAULT_LANE)!r} differs from the signed ack")
        for name in ("acker", "sender", "seq", "bundle_sha256"):
            if d.get(name) != getattr(self, name):
                raise AuthenticityError(f"{what}: {name} {d.get(name)!r} differs from the signed ack")
        reason = d.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise FormatError(f"{what}: reason is not a string")
        applied, parked = json_field(d, "applied", dict, what), json_field(d, "parked", list, what)
        total = json_field(d, "parked_total", int, what)
        _check_counts(applied, parked, what)
        if not len(parked) <= total <= MAX_COUNT:
            raise LimitError(f"{what}: parked_total {total} is out of range ({len(parked)} to {MAX_COUNT})")
        decision = Decision.parse(d.get("decision"), what) if self.version >= ACK_DECISION_VERSION else None
        if decision is not None and self.result != AckResult.REJECTED:
            raise FormatError(f"{what}: a decision ends a bundle unapplied, but the ack says {self.result}")
        return {"reason": reason, "applied": applied, "parked": parked, "parked_total": total, "decision": decision}


def decrypt_small(sealed: bytes, identities: Sequence[str], limit: int, member: str) -> bytes:
    """Decrypt a small age member (an ack's details, a heartbeat's health), refusing more than ``limit``
    bytes of plaintext and anything after the end of the age payload."""
    dec = age.Decryptor(io.BytesIO(sealed), list(identities))
    plain = dec.read(limit + 1)
    if len(plain) > limit:
        raise LimitError(f"{member}: more than {limit} bytes once decrypted")
    if dec.read(1):
        raise FormatError(f"{member}: data after the end of the age payload")
    return plain


def build_ack(
    *, key: Any, acker: str, sender: str, seq: int, bundle_sha256: str,
    manifest_sha256: str | None, result: str, recipients: Sequence[str], heads: Heads | None = None,
    reason: str | None = None, applied: Mapping[str, Any] | None = None, parked: Sequence[Any] = (),
    created: datetime | None = None, decision: Decision | None = None, lane: str = DEFAULT_LANE,
) -> bytes:
    """The bytes of a signed ack file, version 2 (kept in the database, then written out).

    The clear ``ack.json`` holds routing, the result and the stream heads; the figures
    (applied counts and totals, parked documents, the reason) are age-encrypted to
    ``recipients`` (the bundle's sender and the auditors) in ``details.json.age``, bound
    by its SHA-256 (and its plaintext's, salted by a nonce) in the signed ``ack.json``.
    With a ``decision`` (a REJECTED ack ending a bundle unapplied) the ack is version 3; without, version 2,
    which every older reader reads.
    """
    version = ACK_VERSION if decision is None else ACK_DECISION_VERSION
    created = created or utc_now()
    parked = list(parked)
    total = len(parked)
    while True:
        plain = dump_json({
            "format": ACK_DETAILS_FORMAT, "version": version, "acker": acker, "sender": sender,
            "seq": seq, **_lane_json(lane), "bundle_sha256": bundle_sha256, "nonce": os.urandom(16).hex(),
            "reason": None if reason is None else reason[:MAX_REASON_CHARS],
            "applied": dict(applied or {}), "parked": parked[:MAX_ACK_PARKED], "parked_total": total,
        } | ({} if decision is None else {"decision": decision.as_json()}))
        if len(plain) <= MAX_ACK_DETAILS_BYTES or not parked:
            break
        parked = parked[:min(len(parked), MAX_ACK_PARKED) // 2]  # too much to list: the first ones
    if len(plain) > MAX_ACK_DETAILS_BYTES:
        raise LimitError(f"ack details of {len(plain)} bytes are over the limit")
    plain += b" " * min(-len(plain) % ACK_DETAILS_PAD, MAX_ACK_DETAILS_BYTES - len(plain))  # size shows little
    sealed = io.BytesIO()
    age.encrypt(io.BytesIO(plain), sealed, list(recipients))
    details = Entry(ACK_DETAILS_MEMBER, len(sealed.getvalue()), hashlib.sha256(sealed.getvalue()).hexdigest())
    raw = dump_json({
        "format": ACK_FORMAT, "version": version, "app_version": __version__,
        "acker": acker, "sender": sender, "seq": seq, **_lane_json(lane), "bundle_sha256": bundle_sha256,
        "manifest_sha256": manifest_sha256, "result": result, "created": format_time(created),
        "heads": (heads or NO_HEADS).as_json(), "details": details.as_json(),
        "details_plain_sha256": hashlib.sha256(plain).hexdigest(),
    })
    Ack.parse(raw, sealed=sealed.getvalue())  # never write what we would refuse to read
    return pack_signed(ACK_MEMBERS, raw, key, created, (ACK_DETAILS_MEMBER, sealed.getvalue()))


def read_ack(path: Path, trust: sshsig.AllowedSigners, *, me: str | None,
             identities: Sequence[str] = ()) -> Ack:
    """Parse and verify an ack file: structure, signature by the acker, addressed to ``me``.

    With ``identities`` a version 2 ack's details are decrypted (see :meth:`Ack.open_details`).
    """
    try:
        raw, sig, sealed, file_sha = unpack_signed(path, ACK_MEMBERS, MAX_MANIFEST_BYTES, "ack",
                                                   (ACK_DETAILS_MEMBER, MAX_ACK_DETAILS_FILE))
        ack = Ack.parse(raw, file_sha)
        verify_signed(sig, raw, ack.acker, trust, ack.created)
        ack = ack.bind(sealed)  # after the signature: the member must be the one it signed
        if me is not None and ack.sender != me:
            raise NotForUsError(f"ack for a bundle sent by {ack.sender!r}, this node is {me!r}")
        return ack.open_details(identities)
    except ExchangeError as exc:
        raise with_file_name(path, exc) from exc
