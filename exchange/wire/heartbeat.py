"""Heartbeats (docs/FORMAT.md section 12): a node's signed "I am alive, at this version, in this health".

Every sync leaves one heartbeat per peer, even when there is nothing to send, so
the peer can tell a quiet node from a dead one and see trouble inside it (streams
waiting, HELD or FAILED, parked documents, quarantined files) without a login
there. It carries no seq and never enters a stream: a newer one replaces the
older (same file name), and the receiver keeps the newest by its signed
``created``. The clear part holds routing and times only; the health figures are
age-encrypted to the peer, bound by their hashes in the signed ``heartbeat.json``
(the same outer form as an ack v2).

Version 2 adds the node's conflicts with the peer to the health (held for a
person, decided by a policy, its own standing changes to documents the peer
owns) and names up to :data:`MAX_FOREIGN` of those changes (``foreign``). It is
written only to a peer whose signed version reads it (:func:`version_for`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from exchange import __version__
from exchange.errors import AuthenticityError, ExchangeError, FormatError, LimitError, NotForUsError
from exchange.files import utc_now
from exchange.wire import tarfmt
from exchange.wire.bundle import Entry, decrypt_small
from exchange.wire.crypto import age, sshsig
from exchange.wire.formats import (
    FOREIGN_NAME_RE, HEALTH_FIELDS, HEALTH_FORMAT, HEALTH_MEMBER, HEALTH_PAD, HEALTH_V1_FIELDS, HEARTBEAT_FORMAT,
    HEARTBEAT_MEMBERS, HEARTBEAT_V1_FIELDS, HEARTBEAT_V2_SINCE, HEARTBEAT_VERSION, HEARTBEAT_VERSIONS, MAX_COUNT,
    MAX_FOREIGN, MAX_FOREIGN_COLUMNS, MAX_FOREIGN_KEY_CHARS, MAX_FOREIGN_KEY_PARTS, MAX_HEALTH_BYTES,
    MAX_HEALTH_FILE, MAX_HEARTBEAT_BYTES,
)
from exchange.wire.signed import (
    check_format, dump_json, format_time, json_field, node_field, pack_signed, parse_json, parse_time,
    sha256_field, unpack_signed, verify_signed, with_file_name,
)


@dataclass(frozen=True)
class ForeignEdit:
    """A change the node made to a document the peer owns (not sent: the owner's version stands).

    ``columns``: a digest of each column of the node's row as it stands now
    (:func:`exchange.database.conflicts.row_digests`), so the owner can name the
    columns that differ from its own without the values travelling.
    """

    doc_type: str
    key: tuple[str, ...]
    at: datetime | None
    columns: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"doc_type": self.doc_type, "key": list(self.key),
                "at": format_time(self.at) if self.at is not None else None, "columns": dict(self.columns)}


@dataclass(frozen=True)
class Heartbeat:
    """A verified heartbeat and the health it reports (decrypted)."""

    node: str
    peer: str
    created: datetime
    app_version: str
    health: dict[str, int]
    file: bytes = field(repr=False)  # the signed file, kept so an auditor can check it later
    version: int = 1
    foreign: tuple[ForeignEdit, ...] = ()  # version 2: some of health["foreign_edits"], named


def version_for(peer_app_version: str | None) -> int:
    """The heartbeat version to write to a peer whose signed app_version is this (None: not known yet).

    Version 2 only to a peer at :data:`HEARTBEAT_V2_SINCE` or later: an older
    reader quarantines it (a version it does not read), and the HO would lose the
    store's heartbeat altogether rather than miss its new figures.
    """
    def parts(v: str) -> tuple[int, ...] | None:
        m = re.fullmatch(r"([0-9]{1,6})\.([0-9]{1,6})(?:\.([0-9]{1,6}))?(?:[-+.].*)?", v)
        return tuple(int(x or 0) for x in m.groups()) if m else None

    theirs = parts(peer_app_version or "")
    since = parts(HEARTBEAT_V2_SINCE)
    return 2 if theirs is not None and since is not None and theirs >= since else 1


_DIGEST_RE = re.compile(r"[0-9a-f]{16}")


def check_foreign(obj: Any, what: str, count: int) -> tuple[ForeignEdit, ...]:
    """A version 2 ``foreign``: at most :data:`MAX_FOREIGN` (and at most ``count``, the health's
    ``foreign_edits``) entries of exactly doc_type, key, at, columns, each bounded."""
    if not isinstance(obj, list) or len(obj) > min(MAX_FOREIGN, count):
        raise LimitError(f"{what}: foreign is not a list of at most {min(MAX_FOREIGN, count)} changes "
                         f"(health foreign_edits {count}, at most {MAX_FOREIGN} named)")
    out = []
    for i, e in enumerate(obj):
        where = f"{what}: foreign[{i}]"
        if not isinstance(e, dict) or set(e) != {"doc_type", "key", "at", "columns"}:
            raise FormatError(f"{where} is not an object of doc_type, key, at, columns")
        doc_type, key, at, columns = e["doc_type"], e["key"], e["at"], e["columns"]
        if not isinstance(doc_type, str) or not FOREIGN_NAME_RE.fullmatch(doc_type):
            raise FormatError(f"{where}: doc_type is not a document type name")
        if not isinstance(key, list) or not 1 <= len(key) <= MAX_FOREIGN_KEY_PARTS or any(
                not isinstance(k, str) or len(k) > MAX_FOREIGN_KEY_CHARS for k in key):
            raise LimitError(f"{where}: key is not a list of 1 to {MAX_FOREIGN_KEY_PARTS} texts of at most "
                             f"{MAX_FOREIGN_KEY_CHARS} characters")
        when = None if at is None else parse_time(at, f"{where} at")
        if not isinstance(columns, dict) or len(columns) > MAX_FOREIGN_COLUMNS or any(
                not FOREIGN_NAME_RE.fullmatch(c) or not isinstance(d, str) or not _DIGEST_RE.fullmatch(d)
                for c, d in columns.items()):
            raise FormatError(f"{where}: columns is not an object of at most {MAX_FOREIGN_COLUMNS} column names, "
                              "each with a 16-hex-digit digest")
        out.append(ForeignEdit(doc_type, tuple(key), when, dict(columns)))
    return tuple(out)


def check_health(obj: Any, what: str, version: int = HEARTBEAT_VERSION) -> dict[str, int]:
    """Exactly the fields of ``version`` (:data:`HEALTH_V1_FIELDS`, :data:`HEALTH_FIELDS`), each an integer
    0 .. MAX_COUNT."""
    fields = HEALTH_V1_FIELDS if version == 1 else HEALTH_FIELDS
    if not isinstance(obj, dict) or set(obj) != set(fields):
        extra = sorted(set(obj) - set(fields))[:5] if isinstance(obj, dict) else []
        raise FormatError(f"{what}: health is not an object of {', '.join(fields)} (version {version})"
                          + (f"; unexpected {', '.join(repr(str(x)[:40]) for x in extra)}" if extra else ""))
    out = {}
    for name in fields:
        n = obj[name]
        if type(n) is not int:
            raise FormatError(f"{what}: health {name} is not an integer")
        if not 0 <= n <= MAX_COUNT:
            raise LimitError(f"{what}: health {name} {n} is out of range (0 to {MAX_COUNT})")
        out[name] = n
    return out


def build_heartbeat(*, key: Any, node: str, peer: str, health: Mapping[str, int], recipients: Sequence[str],
                    created: datetime | None = None, version: int = HEARTBEAT_VERSION,
                    foreign: Sequence[ForeignEdit] = ()) -> bytes:
    """The bytes of a signed heartbeat from ``node`` to ``peer`` (health encrypted to ``recipients``).

    Version 1 carries the first six figures of ``health`` only. Version 2 names as
    many of ``foreign`` (at most :data:`MAX_FOREIGN`) as fit the health's size limit.
    """
    created = created or utc_now()
    if version not in HEARTBEAT_VERSIONS:
        raise FormatError(f"heartbeat version {version} is not one this exchange writes")
    fields = HEALTH_V1_FIELDS if version == 1 else HEALTH_FIELDS
    figures = check_health({k: v for k, v in health.items() if k in fields}, "heartbeat", version)
    body: dict[str, Any] = {"format": HEALTH_FORMAT, "version": version, "node": node, "peer": peer,
                            "created": format_time(created), "nonce": os.urandom(16).hex(), "health": figures}
    if version >= 2:
        named: list[dict[str, Any]] = []
        for f in list(foreign)[:min(MAX_FOREIGN, figures["foreign_edits"])]:
            body["foreign"] = [*named, f.as_json()]
            if len(dump_json(body)) > MAX_HEALTH_BYTES - HEALTH_PAD:  # the figures always go; names as fit
                break
            named.append(f.as_json())
        body["foreign"] = named
        check_foreign(named, "heartbeat", figures["foreign_edits"])  # never write what we would refuse to read
    plain = dump_json(body)
    plain += b" " * (-len(plain) % HEALTH_PAD)
    sealed = io.BytesIO()
    age.encrypt(io.BytesIO(plain), sealed, list(recipients))
    entry = Entry(HEALTH_MEMBER, len(sealed.getvalue()), hashlib.sha256(sealed.getvalue()).hexdigest())
    raw = dump_json({
        "format": HEARTBEAT_FORMAT, "version": version, "app_version": __version__,
        "node": node, "peer": peer, "created": format_time(created), "health": entry.as_json(),
        "health_plain_sha256": hashlib.sha256(plain).hexdigest(),
    })
    _parse_clear(raw)  # never write what we would refuse to read
    return pack_signed(HEARTBEAT_MEMBERS, raw, key, created, (HEALTH_MEMBER, sealed.getvalue()))


def _parse_clear(raw: bytes) -> tuple[dict[str, Any], Entry]:
    what = HEARTBEAT_MEMBERS[0]
    obj = parse_json(raw, what)
    check_format(obj, HEARTBEAT_FORMAT, what, HEARTBEAT_VERSIONS)
    if set(obj) != set(HEARTBEAT_V1_FIELDS):
        raise FormatError(f"{what}: fields {sorted(obj)} are not those of a heartbeat "
                          f"({', '.join(HEARTBEAT_V1_FIELDS)})")
    node_field(json_field(obj, "node", str, what), what)
    node_field(json_field(obj, "peer", str, what), what)
    parse_time(json_field(obj, "created", str, what), what)
    app = json_field(obj, "app_version", str, what)
    if len(app) > 64:
        raise LimitError(f"{what}: app_version longer than 64 characters")
    entry = Entry.parse(obj["health"], f"{what} health")
    if entry.name != HEALTH_MEMBER or entry.size > MAX_HEALTH_FILE:
        raise FormatError(f"{what}: bad health entry")
    sha256_field(obj["health_plain_sha256"], what)
    return obj, entry


def _repack(raw: bytes, sig: bytes, sealed: bytes, created: datetime, sha: str) -> bytes:
    """The file's bytes again from its members (exact bytes only: a reader accepts no other
    spelling), so what is kept is what was verified, never a second read of the path."""
    buf, mtime = io.BytesIO(), int(created.timestamp())
    for name, data in zip((*HEARTBEAT_MEMBERS, HEALTH_MEMBER), (raw, sig, sealed), strict=True):
        tarfmt.write_member(buf, name, data, mtime)
    buf.write(tarfmt.END)
    if hashlib.sha256(buf.getvalue()).hexdigest() != sha:
        raise FormatError("heartbeat: not the exact bytes exchange writes")
    return buf.getvalue()


def read_heartbeat(path: Path, trust: sshsig.AllowedSigners, *, me: str, identities: Sequence[str]) -> Heartbeat:
    """Parse, verify and decrypt a heartbeat addressed to ``me`` (a BundleError names the problem).

    Sizes first (file, tar headers), then the clear JSON, the signature by ``node``'s key
    trusted at ``created``, the third member against its signed hash, and only then the
    decrypted health against its signed plaintext hash and the repeated fields.
    """
    try:
        raw, sig, sealed, _sha = unpack_signed(path, HEARTBEAT_MEMBERS, MAX_HEARTBEAT_BYTES, "heartbeat",
                                               (HEALTH_MEMBER, MAX_HEALTH_FILE))
        obj, entry = _parse_clear(raw)
        created = parse_time(obj["created"], "created")
        verify_signed(sig, raw, obj["node"], trust, created)
        if obj["peer"] != me:
            raise NotForUsError(f"heartbeat for {obj['peer']!r}, this node is {me!r}")
        if sealed is None:
            raise FormatError(f"member {HEALTH_MEMBER!r} missing")
        if len(sealed) != entry.size or hashlib.sha256(sealed).hexdigest() != entry.sha256:
            raise AuthenticityError(f"{HEALTH_MEMBER} differs from the SHA-256 signed in heartbeat.json")
        plain = decrypt_small(sealed, identities, MAX_HEALTH_BYTES, HEALTH_MEMBER)
        if hashlib.sha256(plain).hexdigest() != obj["health_plain_sha256"]:
            raise AuthenticityError(f"{HEALTH_MEMBER}: decrypted health differs from the signed hash")
        d = parse_json(plain, HEALTH_MEMBER)
        check_format(d, HEALTH_FORMAT, HEALTH_MEMBER, HEARTBEAT_VERSIONS)
        version = obj["version"]
        want = {"format", "version", "node", "peer", "created", "nonce", "health"} | (
            {"foreign"} if version >= 2 else set())
        if set(d) != want:
            raise FormatError(f"{HEALTH_MEMBER}: fields {sorted(str(k)[:40] for k in d)[:12]} are not those of a "
                              f"version {version} health ({', '.join(sorted(want))})")
        for name in ("version", "node", "peer", "created"):
            if d[name] != obj[name]:
                raise AuthenticityError(f"{HEALTH_MEMBER}: {name} {d[name]!r} differs from the signed heartbeat")
        health = check_health(d["health"], HEALTH_MEMBER, version)
        foreign = check_foreign(d["foreign"], HEALTH_MEMBER, health["foreign_edits"]) if version >= 2 else ()
        return Heartbeat(obj["node"], obj["peer"], created, obj["app_version"], health,
                         _repack(raw, sig, sealed, created, _sha), version, foreign)
    except ExchangeError as exc:
        raise with_file_name(path, exc) from exc
