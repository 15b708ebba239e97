"""Shared helpers for the bundle tests: parties and keys, sample tables, raw tar surgery, age forging.

Everything here builds files byte by byte with the project's own primitives
(``tarfmt``, ``age`` internals, ``sshsig.sign``) so a damage test can change
exactly one layer of a bundle and leave every other layer valid.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from exchange.wire import bundle, signed, tarfmt
from exchange.wire.crypto import age, sshsig
from exchange.wire.formats import BUNDLE_MEMBERS, SIG_NAMESPACE

CI = os.environ.get("CI", "").lower() == "true"
CREATED = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
BLOCK = tarfmt.BLOCK


def need(program: str) -> str:
    """Path of an external program; skip without it on a developer clone, fail in CI."""
    path = shutil.which(program)
    if path is None:
        reason = f"{program} is not installed"
        if CI:
            pytest.fail(f"{reason} (CI=true, so this is a failure)")
        pytest.skip(reason)
    return path


# ---------------------------------------------------------------- parties

@dataclass(frozen=True)
class Party:
    name: str
    pem: bytes
    pub: str  # "ssh-ed25519 AAAA..." line
    key: Any  # Ed25519PrivateKey
    identity: str  # AGE-SECRET-KEY-1...
    recipient: str  # age1...


def make_party(name: str) -> Party:
    pem, pub = sshsig.generate_key(name)
    ident, rcpt = age.generate_identity()
    return Party(name, pem, pub, sshsig.load_private_key(pem), ident, rcpt)


@dataclass(frozen=True)
class World:
    """ho and two stores are trusted signers; auditors only decrypt; mallory is trusted by nobody."""

    ho: Party
    s001: Party
    s002: Party
    aud1: Party
    aud2: Party
    mallory: Party
    allowed_signers: str = field(repr=False)

    @property
    def trust(self) -> sshsig.AllowedSigners:
        return sshsig.AllowedSigners.parse(self.allowed_signers)

    def party(self, name: str) -> Party:
        return getattr(self, name)  # type: ignore[no-any-return]


@lru_cache(maxsize=1)
def world() -> World:
    parties = {n: make_party(n) for n in ("ho", "s001", "s002", "aud1", "aud2", "mallory")}
    text = "".join(sshsig.format_signer_line(n, parties[n].pub) + "\n" for n in ("ho", "s001", "s002"))
    return World(**parties, allowed_signers=text)


# ---------------------------------------------------------------- tables

def sales_table(rows: int, seed: int = 0, blob_bytes: int = 0) -> pa.Table:
    """Sales lines with every column type a bundle carries; ``blob_bytes`` of random bytes per row
    make the Parquet file (and so the age payload) large and incompressible."""
    rnd = random.Random(seed)
    cols: dict[str, Any] = {
        "line_id": pa.array(range(1, rows + 1), pa.int64()),
        "sku": pa.array([None if i % 7 == 3 else f"SKU-{rnd.randrange(10**6):06d}-é€" for i in range(rows)],
                        pa.string()),
        "amount": pa.array([None if i % 11 == 5 else Decimal(rnd.randrange(-10**9, 10**9)) / 100
                            for i in range(rows)], pa.decimal128(14, 2)),
        "qty": pa.array([Decimal(rnd.randrange(10**6)) / 1000 for _ in range(rows)], pa.decimal128(14, 3)),
        "day": pa.array([date(2026, 1, 1) + timedelta(days=rnd.randrange(365)) for _ in range(rows)],
                        pa.date32()),
        "at": pa.array([None if i % 13 == 0 else datetime(2026, 1, 1, tzinfo=UTC)
                        + timedelta(microseconds=rnd.randrange(10**13)) for i in range(rows)],
                       pa.timestamp("us", tz="UTC")),
        "void": pa.array([i % 2 == 0 if i % 5 else None for i in range(rows)], pa.bool_()),
    }
    if blob_bytes:
        cols["blob"] = pa.array([rnd.randbytes(blob_bytes) for _ in range(rows)], pa.binary())
    return pa.table(cols)


def events_table(n: int) -> pa.Table:
    return pa.table({
        "doc_type": pa.array(["sale"] * n, pa.string()),
        "doc_key": pa.array([json.dumps([str(i)]) for i in range(n)], pa.string()),
        "op": pa.array(["U" if i % 4 else "D" for i in range(n)], pa.string()),
        "version": pa.array(range(100, 100 + n), pa.int64()),
    })


# ---------------------------------------------------------------- sealing

def seal(directory: Path, *, sender: str = "ho", recipient: str = "s001", seq: int = 1,
         tables: Mapping[str, Any] | None = None, recipients: Sequence[str] | None = None,
         signer: str | None = None, name: str | None = None, **kw: Any) -> bundle.Sealed:
    """Seal a bundle with the world's keys; by default ho -> s001 with one small table."""
    w = world()
    if tables is None:
        tables = {"_events": events_table(3), "sales": sales_table(20)}
    if recipients is None:
        recipients = [w.party(recipient).recipient]
    path = directory / (name or f"{sender}.{recipient}.{seq:010d}.bundle")
    return bundle.seal_bundle(
        path, key=w.party(signer or sender).key, sender=sender, recipient=recipient, seq=seq,
        prev=None, recipients=recipients, tables=tables, summary={"documents": {}},
        created=kw.pop("created", CREATED), **kw)


def open_as(path: Path, who: str = "s001", *, me: str | None | bool = True, **kw: Any) -> Any:
    """open_bundle as ``who`` (``me`` defaults to ``who``), reading every table; returns a dict."""
    w = world()
    with bundle.open_bundle(path, trust=kw.pop("trust", w.trust), identities=[w.party(who).identity],
                            me=who if me is True else me, **kw) as o:  # type: ignore[arg-type]
        return {"manifest": o.manifest, "inner": o.inner, "file_sha256": o.file_sha256,
                "tables": {name: o.table(name) for name in o.tables}}


# ---------------------------------------------------------------- raw tar

def raw_header(name: bytes, size: int, mtime: int = 0, typeflag: bytes = b"0",
               linkname: bytes = b"") -> bytes:
    """A ustar header with any name/type (tarfmt.header refuses what an attacker would write)."""
    h = bytearray(tarfmt.header("x", size, mtime))
    h[0:100] = name.ljust(100, b"\0")[:100]
    h[156:157] = typeflag
    h[157:257] = linkname.ljust(100, b"\0")[:100]
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    return bytes(h)


def member(name: str | bytes, data: bytes, mtime: int = 0, typeflag: bytes = b"0") -> bytes:
    raw_name = name if isinstance(name, bytes) else name.encode()
    return raw_header(raw_name, len(data), mtime, typeflag) + data + tarfmt.padding(len(data))


def assemble(members: Sequence[tuple[str | bytes, bytes]], mtime: int = 0, end: bool = True) -> bytes:
    return b"".join(member(n, d, mtime) for n, d in members) + (tarfmt.END if end else b"")


@dataclass(frozen=True)
class Layout:
    """Offsets of a sealed bundle's members: ``header`` is the 512-byte header, ``data`` its content."""

    manifest: bytes
    sig: bytes
    payload: bytes
    mtime: int
    header: dict[str, int]
    data: dict[str, int]
    end: int  # offset of the end-of-archive marker

    @property
    def members(self) -> list[tuple[str, bytes]]:
        return [(BUNDLE_MEMBERS[0], self.manifest), (BUNDLE_MEMBERS[1], self.sig),
                (BUNDLE_MEMBERS[2], self.payload)]


def layout(data: bytes) -> Layout:
    src = io.BytesIO(data)
    header: dict[str, int] = {}
    offs: dict[str, int] = {}
    content: dict[str, bytes] = {}
    mtime = 0
    while True:
        pos = src.tell()
        m = tarfmt.read_header(src)
        if m is None:
            break
        header[m.name], offs[m.name], mtime = pos, src.tell(), m.mtime
        content[m.name] = src.read(m.size)
        tarfmt.skip_padding(src, m.size)
    return Layout(content[BUNDLE_MEMBERS[0]], content[BUNDLE_MEMBERS[1]], content[BUNDLE_MEMBERS[2]],
                  mtime, header, offs, pos)


def resign(data: bytes, key: Any, edit: Callable[[dict[str, Any]], None] | None = None, *,
           payload: bytes | None = None, manifest_raw: bytes | None = None) -> bytes:
    """Rebuild a bundle with an edited manifest (and optionally another payload), signed by ``key``.

    With a new ``payload`` the manifest's payload entry is updated to it, so the
    signature and the payload hash are right and only deeper layers can be wrong.
    """
    lay = layout(data)
    obj = json.loads(lay.manifest)
    new_payload = lay.payload if payload is None else payload
    obj["payload"]["size"] = len(new_payload)
    obj["payload"]["sha256"] = hashlib.sha256(new_payload).hexdigest()
    if edit is not None:
        edit(obj)
    raw = signed.dump_json(obj) if manifest_raw is None else manifest_raw
    sig = sshsig.sign(key, raw, SIG_NAMESPACE)
    return assemble([(BUNDLE_MEMBERS[0], raw), (BUNDLE_MEMBERS[1], sig), (BUNDLE_MEMBERS[2], new_payload)],
                    lay.mtime)


# ---------------------------------------------------------------- age internals

def decrypt_payload(payload: bytes, identity: str) -> bytes:
    out = io.BytesIO()
    age.decrypt(io.BytesIO(payload), out, [identity])
    return out.getvalue()


class AgeForge:
    """age v1 built from the module's internals, so chunks can be reordered, dropped or re-flagged."""

    def __init__(self, recipients: Sequence[str]) -> None:
        file_key, nonce = os.urandom(16), os.urandom(16)
        self.head = age._build_header(file_key, list(recipients)) + nonce
        self._aead = age._payload_key(file_key, nonce)

    def chunk(self, counter: int, plain: bytes, last: bool) -> bytes:
        return self._aead.encrypt(age._chunk_nonce(counter, last), plain, None)

    def chunks(self, plaintext: bytes) -> list[bytes]:
        """The correct chunk sequence (the last one carries the final flag)."""
        pieces = [plaintext[i:i + age.CHUNK_SIZE] for i in range(0, len(plaintext), age.CHUNK_SIZE)] or [b""]
        return [self.chunk(i, p, i == len(pieces) - 1) for i, p in enumerate(pieces)]

    @staticmethod
    def pieces(plaintext: bytes) -> list[bytes]:
        return [plaintext[i:i + age.CHUNK_SIZE] for i in range(0, len(plaintext), age.CHUNK_SIZE)]


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    return data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1:]
