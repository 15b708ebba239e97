"""Streaming age v1 (https://age-encryption.org/v1, c2sp.org/age), X25519 only.

Why our own: bundles must be readable by the stock ``age`` tool (docs/FORMAT.md
section 4) while we keep strict limits (stanza count, header size) that run
before any cryptography, and map every failure to an :mod:`exchange.errors`
class. Passphrase (scrypt), post-quantum, plugin recipients and the ASCII armor
are deliberately not implemented; they fail with a clear :class:`CryptoError`
or :class:`FormatError`.

Memory is bounded by about one 64 KiB chunk in both directions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import re
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from exchange.errors import CryptoError, FormatError, LimitError, NoIdentityError, VersionError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "CHUNK_SIZE", "MAX_STANZAS", "MAX_HEADER_BYTES", "generate_identity", "recipient_from_identity",
    "parse_identity_file", "parse_recipient", "Encryptor", "Decryptor", "encrypt", "decrypt",
    "header_stanza_count",
]

CHUNK_SIZE = 64 * 1024
MAX_STANZAS = 20  # limit checked before any crypto
MAX_HEADER_BYTES = 64 * 1024

_TAG = 16
_ENC_CHUNK = CHUNK_SIZE + _TAG
_VERSION_PREFIX = b"age-encryption.org/"
_V1_LINE = b"age-encryption.org/v1\n"
_X25519_INFO = b"age-encryption.org/v1/X25519"
_IDENTITY_HRP = "age-secret-key-"
_RECIPIENT_HRP = "age"
_UNSUPPORTED_TYPES = ("scrypt", "mlkem768x25519", "p256tag", "mlkem768p256tag")
_B64 = re.compile(rb"[A-Za-z0-9+/]*")
_ARG = re.compile(rb"[\x21-\x7e]+")
_MAC_LINE = re.compile(rb"--- ([A-Za-z0-9+/]{43})\n")


# --- encodings --------------------------------------------------------------------------------

def _b64encode(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _b64decode(text: bytes, what: str) -> bytes:
    """Strict unpadded base64: the spec requires rejecting non-canonical encodings."""
    if not _B64.fullmatch(text) or len(text) % 4 == 1:  # after this b64decode cannot fail
        raise FormatError(f"invalid base64 in age header ({what})")
    data = base64.b64decode(text + b"=" * (-len(text) % 4))
    if _b64encode(data) != text:
        raise FormatError(f"non-canonical base64 in age header ({what})")
    return data


_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i, gen in enumerate((0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)):
            chk ^= gen if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Sequence[int], frm: int, to: int, pad: bool) -> list[int] | None:
    acc = bits = 0
    out: list[int] = []
    for v in data:
        acc = (acc << frm) | v
        bits += frm
        while bits >= to:
            bits -= to
            out.append((acc >> bits) & ((1 << to) - 1))
    if pad and bits:
        out.append((acc << (to - bits)) & ((1 << to) - 1))
    elif not pad and (bits >= frm or (acc << (to - bits)) & ((1 << to) - 1)):
        return None  # non-zero padding or a whole extra group: not a canonical encoding
    return out


def _bech32_encode(hrp: str, data: bytes) -> str:
    values = _convert_bits(data, 8, 5, True) or []
    check = _polymod(_hrp_expand(hrp) + values + [0] * 6) ^ 1
    values += [(check >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_BECH32[v] for v in values)


def _bech32_decode(text: str) -> tuple[str, bytes] | None:
    """BIP173 Bech32 without the 90-character limit (as age requires); None if invalid."""
    if text.lower() != text and text.upper() != text:
        return None
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text) or any(not 33 <= ord(c) <= 126 for c in text[:pos]):
        return None
    hrp, rest = text[:pos], text[pos + 1:]
    if any(c not in _BECH32 for c in rest):
        return None
    values = [_BECH32.index(c) for c in rest]
    if _polymod(_hrp_expand(hrp) + values) != 1:
        return None
    data = _convert_bits(values[:-6], 5, 8, False)
    return None if data is None else (hrp, bytes(data))


# --- keys -------------------------------------------------------------------------------------

def _load_identity(identity: str) -> X25519PrivateKey:
    """Never put the secret itself in an error message."""
    decoded = _bech32_decode(identity.strip())
    if decoded is None:
        raise CryptoError("malformed age identity (not a valid AGE-SECRET-KEY-1... string)")
    hrp, key = decoded
    if hrp != _IDENTITY_HRP:
        raise CryptoError(f"unsupported age identity type '{hrp.upper()}' (only X25519 is supported)")
    if len(key) != 32:
        raise CryptoError(f"malformed age identity: {len(key)} key bytes instead of 32")
    return X25519PrivateKey.from_private_bytes(key)


def parse_recipient(recipient: str) -> X25519PublicKey:
    """Decode an ``age1...`` X25519 recipient."""
    decoded = _bech32_decode(recipient.strip())
    if decoded is None:
        raise CryptoError(f"malformed age recipient {recipient!r}")
    hrp, key = decoded
    if hrp != _RECIPIENT_HRP:
        raise CryptoError(f"unsupported age recipient type '{hrp}' (only X25519 is supported)")
    if len(key) != 32:
        raise CryptoError(f"malformed age recipient {recipient!r}: {len(key)} key bytes instead of 32")
    return X25519PublicKey.from_public_bytes(key)


def generate_identity() -> tuple[str, str]:
    """Return a fresh ``(AGE-SECRET-KEY-1..., age1...)`` pair, as age-keygen would."""
    key = X25519PrivateKey.generate()
    return _bech32_encode(_IDENTITY_HRP, key.private_bytes_raw()).upper(), _recipient_of(key)


def _recipient_of(key: X25519PrivateKey) -> str:
    return _bech32_encode(_RECIPIENT_HRP, key.public_key().public_bytes_raw())


def recipient_from_identity(identity: str) -> str:
    return _recipient_of(_load_identity(identity))


def parse_identity_file(text: str) -> list[str]:
    """Identities of an age-keygen file; '#' comments and blank lines are ignored."""
    found: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            _load_identity(line)
        except CryptoError as exc:
            raise CryptoError(f"identity file line {number}: {exc.message}") from None
        found.append(line)
    if not found:
        raise CryptoError("the identity file contains no age identity")
    return found


# --- primitives -------------------------------------------------------------------------------

def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _x25519_wrap_key(shared: bytes, share: bytes, recipient: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_hkdf(shared, share + recipient, _X25519_INFO))


def _header_mac(file_key: bytes, header: bytes) -> bytes:
    return hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()


def _payload_key(file_key: bytes, nonce: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))


def _chunk_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _build_header(file_key: bytes, recipients: Sequence[str]) -> bytes:
    """Whole header (one X25519 stanza per recipient) including the MAC line."""
    if not recipients:
        raise CryptoError("no age recipients given")
    if len(recipients) > MAX_STANZAS:
        raise LimitError(f"{len(recipients)} age recipients exceed the limit of {MAX_STANZAS}")
    lines = [_V1_LINE]
    for recipient in recipients:
        public = parse_recipient(recipient)
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        try:
            shared = ephemeral.exchange(public)
        except ValueError as exc:  # all-zero shared secret: a low-order "public key"
            raise CryptoError(f"age recipient {recipient!r} is not a usable X25519 key") from exc
        body = _b64encode(_x25519_wrap_key(shared, share, public.public_bytes_raw())
                          .encrypt(bytes(12), file_key, None))
        lines.append(b"-> X25519 " + _b64encode(share) + b"\n")
        lines += [body[i:i + 64] + b"\n" for i in range(0, len(body), 64)]
        if len(body) % 64 == 0:
            lines.append(b"\n")  # the body must end with a line shorter than 64 columns
    header = b"".join(lines) + b"---"
    return header + b" " + _b64encode(_header_mac(file_key, header)) + b"\n"


# --- header parsing ---------------------------------------------------------------------------

class _Source:
    """Buffered reader over ``src`` so the header parser can read lines without losing payload."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self._buf = bytearray()
        self._eof = False

    def _fill(self, n: int) -> bool:
        data = b"" if self._eof else self._src.read(n)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def readline(self, limit: int) -> bytes:
        """Up to and including the next LF; shorter/no LF at EOF or when ``limit`` is reached."""
        while (i := self._buf.find(b"\n", 0, limit)) < 0 and len(self._buf) < limit and self._fill(4096):
            pass
        n = i + 1 if i >= 0 else min(limit, len(self._buf))
        line = bytes(self._buf[:n])
        del self._buf[:n]
        return line

    def peek(self, n: int) -> bytes:
        """Exactly ``n`` bytes unless EOF comes first, left in the buffer."""
        while len(self._buf) < n and self._fill(n - len(self._buf)):
            pass
        return bytes(self._buf[:n])

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        del self._buf[:n]
        return data

    def at_eof(self) -> bool:
        return not self._buf and not self._fill(4096)


_Stanza = tuple[list[bytes], bytes]  # (arguments, body)


def _parse_header(source: _Source, max_stanzas: int | None) -> tuple[list[_Stanza], bytes, bytes]:
    """Return (stanzas, header bytes up to and including '---', MAC). No cryptography here."""
    consumed = 0

    def line() -> bytes:
        nonlocal consumed
        budget = MAX_HEADER_BYTES - consumed
        text = source.readline(budget)
        consumed += len(text)
        if not text.endswith(b"\n"):
            if len(text) >= budget:
                raise LimitError(f"age header exceeds {MAX_HEADER_BYTES} bytes")
            raise FormatError("age header is truncated")
        return text

    head = source.peek(256)
    if head.lstrip().startswith(b"-----BEGIN"):
        raise FormatError("armored (PEM) age files are not supported")
    if not head.startswith(_VERSION_PREFIX):
        raise FormatError("not an age file (no 'age-encryption.org/v1' line)")
    version = line()
    if version != _V1_LINE:
        if _ARG.fullmatch(version[len(_VERSION_PREFIX):-1]):
            shown = version[len(_VERSION_PREFIX):-1].decode("ascii")[:40]
            raise VersionError(f"unsupported age format version {shown!r} (only v1 is supported)")
        raise FormatError("malformed age version line")
    header = bytearray(version)
    stanzas: list[_Stanza] = []
    while True:
        text = line()
        header += text
        if text.startswith(b"---"):
            match = _MAC_LINE.fullmatch(text)
            if match is None:
                raise FormatError("malformed age header MAC line")
            if not stanzas:
                raise FormatError("age header has no recipient stanza")
            mac_input = bytes(header[:len(header) - len(text) + 3])  # up to and including '---'
            return stanzas, mac_input, _b64decode(match[1], "header MAC")
        if not text.startswith(b"-> "):
            raise FormatError("unexpected line in age header (expected '-> ' stanza or '---' MAC line)")
        if max_stanzas is not None and len(stanzas) >= max_stanzas:
            raise LimitError(f"age header has more than {max_stanzas} recipient stanzas")
        args = text[3:-1].split(b" ")
        if not all(_ARG.fullmatch(a) for a in args):
            raise FormatError("malformed age stanza arguments (empty or non-printable)")
        body = bytearray()
        while True:
            body_line = line()
            header += body_line
            if len(body_line) > 65 or not _B64.fullmatch(body_line[:-1]):
                raise FormatError("malformed age stanza body line")
            body += body_line[:-1]
            if len(body_line) < 65:
                break
        stanzas.append((args, _b64decode(bytes(body), "stanza body")))


def _check_stanzas(stanzas: list[_Stanza]) -> list[tuple[bytes, bytes]]:
    """Validate X25519 stanzas strictly (spec MUSTs) and return (share, body) pairs."""
    types = [args[0].decode("ascii") for args, _ in stanzas]
    if "scrypt" in types and len(stanzas) > 1:
        raise FormatError("an scrypt stanza must be the only stanza in an age header")
    found: list[tuple[bytes, bytes]] = []
    for args, body in stanzas:
        if args[0] != b"X25519":
            continue
        if len(args) != 2:
            raise FormatError(f"X25519 stanza has {len(args) - 1} arguments instead of 1")
        share = _b64decode(args[1], "X25519 share")
        if len(share) != 32 or len(body) != 32:
            raise FormatError("X25519 stanza has a share or wrapped key of the wrong length")
        found.append((share, body))
    if not found:
        unsupported = [t for t in types if t in _UNSUPPORTED_TYPES]
        if unsupported:
            raise CryptoError(f"unsupported age recipient type '{unsupported[0]}' (only X25519 is supported)")
    return found


def _unwrap_file_key(stanzas: list[_Stanza], identities: Sequence[X25519PrivateKey]) -> bytes:
    x25519_stanzas = _check_stanzas(stanzas)
    if not identities:
        raise CryptoError("no age identity given")
    for share, body in x25519_stanzas:
        ephemeral = X25519PublicKey.from_public_bytes(share)
        for identity in identities:
            try:
                shared = identity.exchange(ephemeral)
            except ValueError as exc:
                raise FormatError("X25519 stanza share is a low-order point (all-zero shared secret)") from exc
            recipient = identity.public_key().public_bytes_raw()
            try:
                return _x25519_wrap_key(shared, share, recipient).decrypt(bytes(12), body, None)
            except InvalidTag:
                continue
    raise NoIdentityError(f"no identity matches any of the {len(stanzas)} recipient stanzas")


def header_stanza_count(src: BinaryIO) -> int:
    """Count stanzas after a syntax check only (no key, MAC unchecked); size limit applies."""
    return len(_parse_header(_Source(src), None)[0])


# --- streaming --------------------------------------------------------------------------------

class Encryptor:
    """Writable file-like; the header is written at once, then one chunk at a time.

    The last chunk is held back until :meth:`close` so it can carry the final flag.
    Leaving a ``with`` block by an exception does *not* finalize: the truncated
    output then fails to decrypt instead of passing for a complete file.
    """

    def __init__(self, dst: BinaryIO, recipients: Sequence[str]) -> None:
        file_key = os.urandom(16)
        nonce = os.urandom(16)
        header = _build_header(file_key, recipients)
        self._dst = dst
        self._aead = _payload_key(file_key, nonce)
        self._counter = 0
        self._buf = bytearray()
        self.closed = False
        dst.write(header + nonce)

    def _emit(self, chunk: bytes | bytearray | memoryview, last: bool) -> None:
        self._dst.write(self._aead.encrypt(_chunk_nonce(self._counter, last), bytes(chunk), None))
        self._counter += 1

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.closed:
            raise CryptoError("write to a closed age Encryptor")
        view = memoryview(data).cast("B")
        size = len(view)
        take = min(CHUNK_SIZE - len(self._buf), size)
        self._buf += view[:take]
        view = view[take:]
        if view:  # more data follows the buffered full chunk, so it is not the last one
            self._emit(self._buf, False)
            self._buf.clear()
            while len(view) > CHUNK_SIZE:
                self._emit(view[:CHUNK_SIZE], False)
                view = view[CHUNK_SIZE:]
            self._buf += view
        return size

    def close(self) -> None:
        """Write the final chunk (empty only if nothing was written). Does not close ``dst``."""
        if not self.closed:
            self._emit(self._buf, True)
            self._buf.clear()
            self.closed = True

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._dst.flush()

    def __enter__(self) -> Encryptor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.closed = True


class Decryptor(io.RawIOBase):
    """Readable file-like; header, key and MAC are checked in the constructor.

    Plaintext is released one authenticated chunk at a time: on error, whatever was
    already read must be discarded by the caller. Chunks are numbered from 0.
    """

    def __init__(self, src: BinaryIO, identities: Sequence[str]) -> None:
        super().__init__()
        keys = [_load_identity(i) for i in identities]
        self._src = _Source(src)
        stanzas, header, mac = _parse_header(self._src, MAX_STANZAS)
        file_key = _unwrap_file_key(stanzas, keys)
        if not hmac.compare_digest(_header_mac(file_key, header), mac):
            raise CryptoError("age header MAC does not verify")
        nonce = self._src.read(16)
        if len(nonce) != 16:
            raise FormatError("age file is truncated: the payload nonce is missing")
        self._aead = _payload_key(file_key, nonce)
        self._counter = 0
        self._plain = b""
        self._pos = 0
        self._done = False
        self._error: CryptoError | None = None

    def _open(self, data: bytes, last: bool) -> bytes | None:
        try:
            return self._aead.decrypt(_chunk_nonce(self._counter, last), data, None)
        except InvalidTag:
            return None

    def _next_chunk(self) -> tuple[bytes, CryptoError | None]:
        """Decrypt the next chunk; sets ``_done`` after a valid final chunk at EOF.

        A chunk that authenticates but sits in the wrong place (a non-final chunk at
        EOF, a final chunk followed by more data) is released with a deferred error,
        as the reference implementation and the CCTV payload hashes expect.
        """
        i = self._counter
        data = self._src.read(_ENC_CHUNK)
        if not data and i == 0:
            raise CryptoError("age payload has no chunks (truncated)")
        at_eof = len(data) < _ENC_CHUNK or self._src.at_eof()
        plain, deferred = self._open(data, at_eof), None
        if plain is None and len(data) == _ENC_CHUNK:
            plain = self._open(data, not at_eof)
            deferred = CryptoError(f"age payload truncated after chunk {i} (no final chunk)" if at_eof
                                   else "data after the final age chunk")
        if plain is None:
            raise CryptoError(f"age payload chunk {i} failed authentication (tampered or truncated)")
        if at_eof and not plain and i > 0:
            raise CryptoError(f"age payload final chunk {i} is empty (only allowed for an empty payload)")
        self._counter += 1
        self._done = at_eof
        return plain, deferred

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all if negative); fewer only at EOF or before a pending error."""
        if self.closed:
            raise CryptoError("read from a closed age Decryptor")
        out = bytearray()
        while size < 0 or len(out) < size:
            if self._pos == len(self._plain):
                if self._error is not None:
                    if out:
                        break  # release verified plaintext first; raise on the next call
                    raise self._error
                if self._done:
                    break
                try:
                    (self._plain, self._error), self._pos = self._next_chunk(), 0
                except CryptoError as exc:
                    self._error = exc
                continue
            avail = len(self._plain) - self._pos
            take = avail if size < 0 else min(size - len(out), avail)
            out += self._plain[self._pos:self._pos + take]
            self._pos += take
        return bytes(out)

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


def encrypt(src: BinaryIO, dst: BinaryIO, recipients: Sequence[str]) -> None:
    with Encryptor(dst, recipients) as enc:
        while block := src.read(CHUNK_SIZE):
            enc.write(block)


def decrypt(src: BinaryIO, dst: BinaryIO, identities: Sequence[str]) -> None:
    """On error ``dst`` holds a partial plaintext: write to a temporary file and discard it."""
    with Decryptor(src, identities) as dec:
        while block := dec.read(CHUNK_SIZE):
            dst.write(block)
