"""Heartbeats (docs/FORMAT.md section 12): a node's signed "I am alive, at this version, in this health".

Every sync leaves one heartbeat per peer, even when there is nothing to send, so
the peer can tell a quiet node from a dead one and see trouble inside it (streams
waiting, HELD or FAILED, parked documents, quarantined files) without a login
there. It carries no seq and never enters a stream: a newer one replaces the
older (same file name), and the receiver keeps the newest by its signed
``created``. The clear part holds routing and times only; the health figures are
age-encrypted to the peer, bound by their hashes in the signed ``heartbeat.json``
(the same outer form as an ack v2).
"""

from __future__ import annotations

import hashlib
import io
import os
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
    HEALTH_FIELDS, HEALTH_FORMAT, HEALTH_MEMBER, HEALTH_PAD, HEARTBEAT_FORMAT, HEARTBEAT_MEMBERS,
    HEARTBEAT_V1_FIELDS, HEARTBEAT_VERSION, HEARTBEAT_VERSIONS, MAX_COUNT, MAX_HEALTH_BYTES, MAX_HEALTH_FILE,
    MAX_HEARTBEAT_BYTES,
)
from exchange.wire.signed import (
    check_format, dump_json, format_time, json_field, node_field, pack_signed, parse_json, parse_time,
    sha256_field, unpack_signed, verify_signed, with_file_name,
)


@dataclass(frozen=True)
class Heartbeat:
    """A verified heartbeat and the health it reports (decrypted)."""

    node: str
    peer: str
    created: datetime
    app_version: str
    health: dict[str, int]
    file: bytes = field(repr=False)  # the signed file, kept so an auditor can check it later


def check_health(obj: Any, what: str) -> dict[str, int]:
    """Exactly :data:`HEALTH_FIELDS`, each an integer 0 .. MAX_COUNT."""
    if not isinstance(obj, dict) or set(obj) != set(HEALTH_FIELDS):
        raise FormatError(f"{what}: health is not an object of {', '.join(HEALTH_FIELDS)}")
    out = {}
    for name in HEALTH_FIELDS:
        n = obj[name]
        if type(n) is not int:
            raise FormatError(f"{what}: health {name} is not an integer")
        if not 0 <= n <= MAX_COUNT:
            raise LimitError(f"{what}: health {name} {n} is out of range (0 to {MAX_COUNT})")
        out[name] = n
    return out


def build_heartbeat(*, key: Any, node: str, peer: str, health: Mapping[str, int], recipients: Sequence[str],
                    created: datetime | None = None) -> bytes:
    """The bytes of a signed heartbeat from ``node`` to ``peer`` (health encrypted to ``recipients``)."""
    created = created or utc_now()
    figures = check_health(dict(health), "heartbeat")
    plain = dump_json({"format": HEALTH_FORMAT, "version": HEARTBEAT_VERSION, "node": node, "peer": peer,
                       "created": format_time(created), "nonce": os.urandom(16).hex(), "health": figures})
    plain += b" " * (-len(plain) % HEALTH_PAD)
    sealed = io.BytesIO()
    age.encrypt(io.BytesIO(plain), sealed, list(recipients))
    entry = Entry(HEALTH_MEMBER, len(sealed.getvalue()), hashlib.sha256(sealed.getvalue()).hexdigest())
    raw = dump_json({
        "format": HEARTBEAT_FORMAT, "version": HEARTBEAT_VERSION, "app_version": __version__,
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
        if set(d) != {"format", "version", "node", "peer", "created", "nonce", "health"}:
            raise FormatError(f"{HEALTH_MEMBER}: unexpected fields {sorted(d)}")
        for name in ("node", "peer", "created"):
            if d[name] != obj[name]:
                raise AuthenticityError(f"{HEALTH_MEMBER}: {name} {d[name]!r} differs from the signed heartbeat")
        health = check_health(d["health"], HEALTH_MEMBER)
        return Heartbeat(obj["node"], obj["peer"], created, obj["app_version"], health,
                         _repack(raw, sig, sealed, created, _sha))
    except ExchangeError as exc:
        raise with_file_name(path, exc) from exc
