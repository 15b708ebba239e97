"""The key notice: a node announces its new signing key and age recipient to a peer (docs/FORMAT.md 4.1).

Why in-band: nobody edits ``allowed_signers`` by hand. The notice travels
inside a bundle's encrypted payload (``summary.key_notice`` of ``inner.json``)
and is signed twice: by the old key, which the peer trusts (who announces), and
by the new key (that the sender holds it). A peer that applies the bundle
trusts the new key from ``new_valid_after`` and the old one until
``old_valid_before``, the overlap in which either is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from exchange.errors import AuthenticityError, FormatError, LimitError
from exchange.wire.crypto import age, sshsig
from exchange.wire.formats import SIG_NAMESPACE
from exchange.wire.signed import check_format, dump_json, format_time, json_field, node_field, parse_json, parse_time

NOTICE_FORMAT = "exchange-key-notice"
NOTICE_VERSION = 1
SUMMARY_FIELD = "key_notice"  # where a bundle's inner.json carries it: summary.key_notice
MAX_NOTICE_BYTES = 4096  # the signed JSON (about 600 bytes)
MAX_OVERLAP = timedelta(days=90)  # a peer refuses a notice keeping the old key longer than this
NOTICE_FIELDS = ("format", "version", "node", "created", "old_key", "new_key", "new_recipient",
                 "new_valid_after", "old_valid_before")


@dataclass(frozen=True)
class KeyNotice:
    """A verified notice: ``node`` signs with ``new_key`` from ``new_valid_after``, ``old_key`` ends at ``old_valid_before``."""

    node: str
    created: datetime
    old_key: Any  # Ed25519PublicKey
    new_key: Any
    new_key_line: str
    new_recipient: str
    new_valid_after: datetime
    old_valid_before: datetime


def make_notice(node: str, old_key: Any, new_key: Any, new_recipient: str, created: datetime,
                overlap: timedelta) -> dict[str, str]:
    """The carried form: the notice's JSON text, its signature by the old key and by the new one."""
    if not timedelta(0) <= overlap <= MAX_OVERLAP:
        raise LimitError(f"overlap {overlap} is outside 0 .. {MAX_OVERLAP.days} days")
    body = {"format": NOTICE_FORMAT, "version": NOTICE_VERSION, "node": node, "created": format_time(created),
            "old_key": sshsig.public_line(old_key), "new_key": sshsig.public_line(new_key),
            "new_recipient": new_recipient, "new_valid_after": format_time(created),
            "old_valid_before": format_time(created + overlap)}
    raw = dump_json(body)
    return {"notice": raw.decode(), "old_sig": sshsig.sign(old_key, raw, SIG_NAMESPACE).decode(),
            "new_sig": sshsig.sign(new_key, raw, SIG_NAMESPACE).decode()}


def read_notice(carried: Any, sender: str, signer_key: Any) -> KeyNotice:
    """Check a carried notice from ``sender``'s bundle signed by ``signer_key``; FormatError/AuthenticityError.

    Hostile input: every field is bounded and checked before use, the old key
    must be the one that signed the bundle, and both signatures must verify.
    """
    what = f"key notice ({SUMMARY_FIELD})"
    if not isinstance(carried, dict) or set(carried) != {"notice", "old_sig", "new_sig"}:
        raise FormatError(f"{what}: expected an object with exactly notice, old_sig and new_sig")
    if not all(isinstance(v, str) and len(v) <= MAX_NOTICE_BYTES for v in carried.values()):
        raise LimitError(f"{what}: each member must be a string of at most {MAX_NOTICE_BYTES} characters")
    raw = carried["notice"].encode()
    obj = parse_json(raw, what)
    check_format(obj, NOTICE_FORMAT, what, versions=frozenset({NOTICE_VERSION}))
    if set(obj) != set(NOTICE_FIELDS):
        raise FormatError(f"{what}: fields must be exactly {', '.join(NOTICE_FIELDS)}")
    node = node_field(json_field(obj, "node", str, what), what)
    if node != sender:
        raise AuthenticityError(f"{what}: announces keys of {node!r} in a bundle from {sender!r}")
    try:
        old_key = sshsig.parse_public_line(json_field(obj, "old_key", str, what))
        new_line = json_field(obj, "new_key", str, what)
        new_key = sshsig.parse_public_line(new_line)
        recipient = json_field(obj, "new_recipient", str, what)
        age.parse_recipient(recipient)
    except FormatError:
        raise
    except Exception as exc:  # CryptoError from the key parsers
        raise FormatError(f"{what}: {exc}") from exc
    if old_key.public_bytes_raw() != signer_key.public_bytes_raw():
        raise AuthenticityError(f"{what}: its old key is not the key that signed the bundle")
    if new_key.public_bytes_raw() == old_key.public_bytes_raw():
        raise FormatError(f"{what}: the new key is the old one")
    created = parse_time(json_field(obj, "created", str, what), what)
    after = parse_time(json_field(obj, "new_valid_after", str, what), what)
    before = parse_time(json_field(obj, "old_valid_before", str, what), what)
    if not created <= after <= before or before - after > MAX_OVERLAP:
        raise FormatError(f"{what}: times must be created <= new_valid_after <= old_valid_before, with an "
                          f"overlap of at most {MAX_OVERLAP.days} days")
    for name, key in (("old_sig", old_key), ("new_sig", new_key)):
        try:
            got = sshsig.verify(carried[name].encode(), raw, SIG_NAMESPACE)
        except (FormatError, AuthenticityError) as exc:
            raise AuthenticityError(f"{what}: {name}: {exc}") from exc
        if got.public_bytes_raw() != key.public_bytes_raw():
            raise AuthenticityError(f"{what}: {name} is not by the {name[:3]} key")
    return KeyNotice(node, created, old_key, new_key, sshsig.public_line(new_key), recipient, after, before)
