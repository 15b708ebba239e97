"""Strict JSON and the signed JSON files: acks, checkpoints, USB receipts (docs/FORMAT.md).

Every JSON a peer writes is read here the same way (UTF-8, no duplicate keys,
bounded depth, typed fields, ASCII-digit times), and every small signed file
has one shape: a ustar of ``NAME.json`` then its SSHSIG ``NAME.json.sig``
(then, for an ack v2, one more member), with tar headers whose mtime is the
signed ``created`` time. Bundles (exchange.wire.bundle) use the same JSON
rules and exact-bytes check; the auditor (exchange.audit) and the USB
receipts use these public helpers rather than copies of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from exchange.errors import (
    AuthenticityError, BundleError, ExchangeError, FormatError, LimitError, VersionError,
)
from exchange.files import open_regular
from exchange.wire import tarfmt
from exchange.wire.crypto import sshsig
from exchange.wire.formats import (
    HEX64, MAX_JSON_DEPTH, MAX_SEQ, MAX_SIG_BYTES, SIG_NAMESPACE, SUPPORTED_VERSIONS, TIME_FORMAT, TIME_RE,
    check_node_id,
)

E = TypeVar("E", bound=ExchangeError)


# ---------------------------------------------------------------- times

def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(s: Any, what: str) -> datetime:
    """A signed time, ``YYYY-MM-DDTHH:MM:SSZ`` in ASCII digits only.

    ``strptime`` alone would take other scripts' digits ('٢٠٢٦') and one-digit
    fields, so two spellings could stand for one signed time.
    """
    text = str(s)
    try:
        if not TIME_RE.fullmatch(text):
            raise ValueError(text)
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise FormatError(f"{what}: bad time {s!r} (expected YYYY-MM-DDTHH:MM:SSZ, ASCII digits)") from exc


# ---------------------------------------------------------------- strict JSON

def _depth(obj: Any) -> int:
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        depth = max(depth, d)
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return depth


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def parse_json(raw: bytes, what: str) -> dict[str, Any]:
    """Strict JSON object: UTF-8, no duplicate keys, bounded depth."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dupes)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from exc
    except RecursionError as exc:
        raise LimitError(f"{what}: JSON nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: expected a JSON object")
    if _depth(obj) > MAX_JSON_DEPTH:
        raise LimitError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def dump_json(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False, ensure_ascii=True) + "\n").encode()


def json_field(obj: Mapping[str, Any], name: str, typ: type | tuple[type, ...], what: str) -> Any:
    """``obj[name]``, which must be of ``typ`` (a bool is not an int)."""
    if name not in obj:
        raise FormatError(f"{what}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise FormatError(f"{what}: field {name!r} has the wrong type")
    return value


def sha256_field(value: Any, what: str) -> str:
    """A lowercase hex SHA-256, or FormatError."""
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= HEX64:
        raise FormatError(f"{what}: not a lowercase hex SHA-256: {value!r}")
    return value


def node_field(value: str, what: str) -> str:
    """A node id from a peer's JSON (the file-name grammar's)."""
    try:
        return check_node_id(value)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from exc


def seq_field(value: Any, what: str, name: str, low: int = 1) -> int:
    """A seq from a peer's JSON, within ``low`` .. MAX_SEQ before anything uses it."""
    if type(value) is not int:
        raise FormatError(f"{what}: {name} is not an integer")
    if not low <= value <= MAX_SEQ:
        raise LimitError(f"{what}: {name} {value} is out of range ({low} to {MAX_SEQ})")
    return value


def check_format(obj: Mapping[str, Any], expected: str, what: str,
                 versions: frozenset[int] = SUPPORTED_VERSIONS) -> None:
    """``format`` is ``expected`` and ``version`` one this exchange reads (VersionError otherwise)."""
    fmt = obj.get("format")
    if fmt != expected:
        raise FormatError(f"{what}: format is {fmt!r}, expected {expected!r}")
    version = obj.get("version")
    if type(version) is not int or version not in versions:  # not True, 1.0 or [1]
        raise VersionError(
            f"{what}: format version {version!r} is not supported by this exchange "
            f"(supports {sorted(versions)})",
            hint="Upgrade exchange to read files written by a newer version.")


# ---------------------------------------------------------------- errors and exact bytes

def with_file_name(path: Path, exc: E) -> E:
    """The error with the file's name in front of its message, keeping its class and hint."""
    if str(exc).startswith(f"{path.name}:"):
        return exc
    return type(exc)(f"{path.name}: {exc.message}", hint=exc.hint)


def check_exact(headers: Sequence[tarfmt.Member], signature: bytes, created: datetime | None) -> None:
    """Every byte no signature covers is the writer's: tar headers (mtime = ``created``) and armor.

    So a file is either exactly what its sender wrote or damage, and its SHA-256 (what
    an ack names) is the sender's (docs/FORMAT.md sections 2 and 7). Without a readable
    ``created`` (the caller's parse refuses the file anyway) the members' mtimes must agree.
    """
    mtime = int(created.timestamp()) if created is not None else headers[0].mtime
    for m in headers:
        tarfmt.check_exact(m, mtime)
    sshsig.check_exact(signature)


# ---------------------------------------------------------------- signed JSON files

class Unpacked(NamedTuple):
    """A signed JSON file as read: its JSON, signature, optional third member and file SHA-256."""

    raw: bytes
    sig: bytes
    extra: bytes | None
    sha256: str


def pack_signed(members: tuple[str, str], raw: bytes, key: Any, created: datetime,
                extra: tuple[str, bytes] | None = None) -> bytes:
    """The bytes of a signed JSON file (ack, checkpoint, receipt): ustar of JSON then its SSHSIG
    (then, for an ack v2, its encrypted details)."""
    sig = sshsig.sign(key, raw, SIG_NAMESPACE)
    mtime = int(created.timestamp())
    buf = io.BytesIO()
    tarfmt.write_member(buf, members[0], raw, mtime)
    tarfmt.write_member(buf, members[1], sig, mtime)
    if extra is not None:
        tarfmt.write_member(buf, extra[0], extra[1], mtime)
    buf.write(tarfmt.END)
    return buf.getvalue()


def unpack_signed(path: Path, members: tuple[str, str], limit: int, what: str,
                  extra: tuple[str, int] | None = None) -> Unpacked:
    """Read a signed JSON file strictly, with an optional third member ``extra`` (name, limit).

    Size limits are checked from the file size and tar headers before anything is
    parsed; the file is opened as a regular file only (never a link or a FIFO).
    The signature is not verified here: see :func:`verify_signed`.
    """
    most = limit + MAX_SIG_BYTES + (extra[1] + tarfmt.BLOCK if extra else 0) + 4096
    try:
        with open_regular(path) as f:  # never through a link, never a FIFO (which would block)
            data = f.read() if 0 < os.fstat(f.fileno()).st_size <= most else b""
    except OSError as exc:
        raise FormatError(f"cannot read: {exc.strerror}") from exc
    if not data:
        raise LimitError(f"empty or oversized {what} file")
    src = io.BytesIO(data)
    h_raw, raw = tarfmt.read_member(src, members[0], limit, what)
    h_sig, sig = tarfmt.read_member(src, members[1], MAX_SIG_BYTES, what)
    headers = [h_raw, h_sig]
    third = None
    if extra is not None and data[src.tell():src.tell() + tarfmt.BLOCK].strip(b"\0"):
        at = src.tell()
        m = tarfmt.read_header(src)
        if m is not None and m.name != extra[0]:
            raise FormatError(f"{what}: unexpected extra member {m.name!r} in tar")
        src.seek(at)
        h_third, third = tarfmt.read_member(src, extra[0], extra[1], what)
        headers.append(h_third)
    tarfmt.expect_end(src)
    check_exact(headers, sig, _signed_created(raw))
    return Unpacked(raw, sig, third, hashlib.sha256(data).hexdigest())


def _signed_created(raw: bytes) -> datetime | None:
    """The ``created`` time a signed JSON file states (its tar headers' mtime), if it states one."""
    try:
        return parse_time(parse_json(raw, "signed file")["created"], "created")
    except (ExchangeError, KeyError):
        return None


def verify_signed(sig: bytes, raw: bytes, principal: str, trust: sshsig.AllowedSigners,
                  at: datetime) -> sshsig.AllowedSigner:
    """The signature is by ``principal``'s key trusted at ``at`` (that key); AuthenticityError otherwise."""
    try:
        return sshsig.verify_with_trust(sig, raw, principal, trust, SIG_NAMESPACE, at=at)
    except ExchangeError as exc:
        if not isinstance(exc, BundleError):
            raise AuthenticityError(f"signature: {exc.message}") from exc
        raise
