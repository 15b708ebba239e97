"""OpenSSH SSHSIG signatures (Ed25519) and an ``allowed_signers`` trust store.

Why SSHSIG: operators already know ``ssh-keygen``; every signature we write
verifies with ``ssh-keygen -Y verify`` and vice versa, so a bundle can be
audited without this program. Formats follow openssh PROTOCOL.sshsig and the
ALLOWED SIGNERS section of ssh-keygen(1); only Ed25519 keys are supported.

Deviation from ssh-keygen: a timestamp in ``allowed_signers`` without a
trailing ``Z`` is read as UTC here (ssh-keygen uses the local zone). Lines we
write always carry the ``Z`` so both tools agree.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from exchange.errors import AuthenticityError, ConfigError, CryptoError, FormatError, LimitError
from exchange.node.perms import check_not_writable_by_others

NAMESPACE = "exchange-bundle"
MAX_SIGNATURE_BYTES = 8 * 1024  # an Ed25519 SSHSIG is ~300 bytes; refuse to parse anything large

_KEY_TYPE = "ssh-ed25519"
_MAGIC = b"SSHSIG"
_VERSION = 1
_HASHES = {"sha512": hashlib.sha512, "sha256": hashlib.sha256}
_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_END = "-----END SSH SIGNATURE-----"
_WRAP = 70  # ssh-keygen wraps base64 at 70 columns (the spec's "76" is not what it does)
_CHUNK = 1 << 20
# Key types ssh-keygen recognises, so "principals keytype ..." is told apart from options.
_KNOWN_TYPES = frozenset(
    t + c for c in ("", "-cert-v01@openssh.com") for t in (
        "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"))


# --- SSH wire format --------------------------------------------------------

def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class _Reader:
    """Bounds-checked reader for RFC 4251 fields; every failure is a FormatError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise FormatError(f"{self.what} is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> bytes:
        return self.take(self.u32())

    def text(self, field: str) -> str:
        try:
            return self.string().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{self.what}: {field} is not UTF-8") from exc

    def end(self) -> None:
        if self.pos != len(self.data):
            raise FormatError(f"{self.what} has {len(self.data) - self.pos} trailing bytes")


def _armor(label: str, blob: bytes) -> bytes:
    """PEM-style armor with base64 wrapped at 70 columns, as OpenSSH writes it."""
    b64 = base64.b64encode(blob).decode()
    lines = [b64[i:i + _WRAP] for i in range(0, len(b64), _WRAP)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]).encode()


def _key_blob(key: Ed25519PublicKey) -> bytes:
    return _string(_KEY_TYPE.encode()) + _string(key.public_bytes_raw())


def _parse_key_blob(blob: bytes, what: str) -> Ed25519PublicKey:
    r = _Reader(blob, what)
    kind = r.text("key type")
    if kind != _KEY_TYPE:
        raise FormatError(f"{what}: unsupported key type {kind!r} (only {_KEY_TYPE})")
    raw = r.string()
    r.end()
    if len(raw) != 32:
        raise FormatError(f"{what}: Ed25519 key is {len(raw)} bytes, not 32")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:  # defensive: OpenSSL may reject some encodings
        raise FormatError(f"{what}: invalid Ed25519 key: {exc}") from exc


def _pub(key: Ed25519PrivateKey | Ed25519PublicKey) -> Ed25519PublicKey:
    return key.public_key() if isinstance(key, Ed25519PrivateKey) else key


def _same(a: Ed25519PublicKey, b: Ed25519PublicKey) -> bool:
    return a.public_bytes_raw() == b.public_bytes_raw()


# --- keys -------------------------------------------------------------------

def generate_key(comment: str = "") -> tuple[bytes, str]:
    """Make an Ed25519 key as ``ssh-keygen -t ed25519 -N ''`` would, comment included."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes_raw()
    check = os.urandom(4)
    private = (check + check + _string(_KEY_TYPE.encode()) + _string(pub)
               + _string(key.private_bytes_raw() + pub) + _string(comment.encode()))
    private += bytes(range(1, 1 + (-len(private)) % 8))  # cipher "none" has block size 8
    body = (b"openssh-key-v1\0" + _string(b"none") + _string(b"none") + _string(b"")
            + struct.pack(">I", 1) + _string(_key_blob(key.public_key())) + _string(private))
    return _armor("OPENSSH PRIVATE KEY", body), public_line(key, comment)


def load_private_key(pem: bytes, *, path: str = "<key>") -> Ed25519PrivateKey:
    """Load an unencrypted OpenSSH Ed25519 key; unattended nodes cannot type passphrases."""
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" not in pem:
        raise CryptoError(f"{path}: not an OpenSSH private key (expected 'BEGIN OPENSSH PRIVATE KEY')")
    try:
        key = load_ssh_private_key(pem, password=None)
    except TypeError as exc:  # cryptography's signal for "needs a password"
        raise CryptoError(f"{path}: private key is passphrase-protected; exchange needs an "
                          "unencrypted key (ssh-keygen -p -N '' -f FILE)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"{path}: unreadable OpenSSH private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError(f"{path}: key type is not Ed25519 (make one with ssh-keygen -t ed25519)")
    return key


def public_line(key: Ed25519PrivateKey | Ed25519PublicKey, comment: str = "") -> str:
    """The ``.pub`` line for a key, as ssh-keygen writes it."""
    if "\n" in comment or "\r" in comment:
        raise CryptoError("a key comment cannot contain a line break")
    line = f"{_KEY_TYPE} {base64.b64encode(_key_blob(_pub(key))).decode()}"
    return f"{line} {comment}" if comment else line


def parse_public_line(line: str) -> Ed25519PublicKey:
    """Parse ``ssh-ed25519 AAAA... [comment]``; the comment is ignored."""
    fields = line.strip().split(None, 2)
    if len(fields) < 2 or fields[0] != _KEY_TYPE:
        raise CryptoError(f"not an '{_KEY_TYPE} <base64> [comment]' public key line: {line[:60]!r}")
    try:
        return _parse_key_blob(base64.b64decode(fields[1], validate=True), "public key")
    except (binascii.Error, FormatError) as exc:
        raise CryptoError(f"bad {_KEY_TYPE} public key: {exc}") from exc


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA256 fingerprint as printed by ``ssh-keygen -l``."""
    digest = hashlib.sha256(_key_blob(key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --- signatures ---------------------------------------------------------------

def _digest(data: bytes | BinaryIO, hashalg: str) -> bytes:
    h = _HASHES[hashalg]()
    if isinstance(data, (bytes, bytearray, memoryview)):
        h.update(data)
    else:
        while chunk := data.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def _signed_data(namespace: str, hashalg: str, digest: bytes) -> bytes:
    # Reserved is always empty here, as in ssh-keygen's verifier.
    return _MAGIC + _string(namespace.encode()) + _string(b"") + _string(hashalg.encode()) + _string(digest)


def sign(key: Ed25519PrivateKey, data: bytes | BinaryIO, namespace: str = NAMESPACE) -> bytes:
    """Armored SSHSIG over ``data`` (sha512), byte-identical to ``ssh-keygen -Y sign``."""
    if not namespace:
        raise CryptoError("SSHSIG namespace must not be empty")
    sig = key.sign(_signed_data(namespace, "sha512", _digest(data, "sha512")))
    blob = (_MAGIC + struct.pack(">I", _VERSION) + _string(_key_blob(key.public_key()))
            + _string(namespace.encode()) + _string(b"") + _string(b"sha512")
            + _string(_string(_KEY_TYPE.encode()) + _string(sig)))
    return _armor("SSH SIGNATURE", blob)


def _dearmor(signature: bytes) -> bytes:
    try:
        text = signature.decode("ascii").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise FormatError("SSH signature is not ASCII text") from exc
    if not text.startswith(_BEGIN + "\n"):
        raise FormatError(f"SSH signature does not start with '{_BEGIN}'")
    body, sep, tail = text[len(_BEGIN) + 1:].partition("\n" + _END)
    if not sep or tail.strip():
        raise FormatError(f"SSH signature has no '{_END}' footer or data after it")
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"SSH signature body is not valid base64: {exc}") from exc


def check_exact(signature: bytes) -> None:
    """The signature is exactly what :func:`sign` (and ssh-keygen) writes for its blob.

    The armor's line breaks and whitespace and the blob's reserved field are not signed
    (verifiers sign over an empty reserved): a copy changed there in transit would verify
    yet be another file (another SHA-256), so only the exact form is accepted. Other
    damage to the blob is left to :func:`verify`, which names it.
    """
    blob = _dearmor(signature)
    if _armor("SSH SIGNATURE", blob) != signature:
        raise FormatError("SSH signature armor differs from the one exchange and ssh-keygen write "
                          f"(base64 in {_WRAP}-column lines, LF line ends, nothing else): "
                          "the file was altered after it was signed")
    r = _Reader(blob, "SSHSIG blob")
    r.take(10)  # magic, version
    r.string()  # public key
    r.string()  # namespace
    if r.string():
        raise FormatError("SSHSIG reserved field is not empty (exchange and ssh-keygen write it empty and "
                          "no signature covers it): the file was altered after it was signed")


def verify(signature: bytes, data: bytes | BinaryIO, namespace: str = NAMESPACE) -> Ed25519PublicKey:
    """Check an armored SSHSIG over ``data``; return the (not yet trusted!) signing key.

    The blob is fully parsed before ``data`` is read, so junk costs no hashing.
    """
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise LimitError(f"SSH signature is {len(signature)} bytes (limit {MAX_SIGNATURE_BYTES})")
    r = _Reader(_dearmor(signature), "SSHSIG blob")
    if r.take(6) != _MAGIC:
        raise FormatError("SSHSIG blob does not start with 'SSHSIG'")
    if (version := r.u32()) != _VERSION:
        raise FormatError(f"unsupported SSHSIG version {version} (expected {_VERSION})")
    key = _parse_key_blob(r.string(), "SSHSIG public key")
    got_ns = r.text("namespace")
    r.string()  # reserved: ignored, as the spec says
    hashalg = r.text("hash algorithm")
    sr = _Reader(r.string(), "SSHSIG signature")
    r.end()
    if (kind := sr.text("signature type")) != _KEY_TYPE:
        raise FormatError(f"unsupported SSHSIG signature type {kind!r} (only {_KEY_TYPE})")
    raw_sig = sr.string()
    sr.end()
    if len(raw_sig) != 64:
        raise FormatError(f"Ed25519 signature is {len(raw_sig)} bytes, not 64")
    if hashalg not in _HASHES:
        raise FormatError(f"unsupported SSHSIG hash algorithm {hashalg!r} (sha512 or sha256)")
    if got_ns != namespace:
        raise AuthenticityError(f"signature is for namespace {got_ns!r}, expected {namespace!r}")
    try:
        key.verify(raw_sig, _signed_data(namespace, hashalg, _digest(data, hashalg)))
    except InvalidSignature as exc:
        raise AuthenticityError(
            f"signature by {fingerprint(key)} does not match the data (altered or wrong file)") from exc
    return key


# --- allowed_signers ----------------------------------------------------------

@dataclass(frozen=True)
class AllowedSigner:
    """One Ed25519 line of an allowed_signers file."""

    principals: tuple[str, ...]
    key: Ed25519PublicKey
    namespaces: tuple[str, ...] | None
    valid_after: datetime | None
    valid_before: datetime | None
    cert_authority: bool
    line: str
    comment: str = ""  # the text after the key, which ssh-keygen ignores (exchange notes a revocation there)

    def __hash__(self) -> int:  # the cryptography key object itself is unhashable
        return hash((self.line, self.key.public_bytes_raw()))


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    """One ssh glob ('*', '?') as a compiled regular expression (compiled once per pattern, not per match)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


def _match_list(value: str, patterns: Iterable[str]) -> bool:
    """ssh's match_pattern_list: '*'/'?' globs, any '!' match vetoes, else needs a positive."""
    positive = False
    for pat in patterns:
        neg = pat.startswith("!")
        if _glob(pat[neg:]).fullmatch(value):
            if neg:
                return False
            positive = True
    return positive


def _literal(patterns: Iterable[str]) -> bool:
    """Principals without globs or negations: they match a name exactly, so they can be looked up."""
    return not any(c in p for p in patterns for c in "*?!")


_TIME_FORMATS = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}


def _parse_time(value: str) -> datetime:
    digits = value[:-1] if value.endswith(("Z", "z")) else value
    fmt = _TIME_FORMATS.get(len(digits))
    if fmt is None or not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"bad timestamp {value!r} (YYYYMMDD[HHMM[SS]][Z])")
    try:
        return datetime.strptime(digits, fmt).replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise ValueError(f"bad timestamp {value!r}: {exc}") from exc


def _utc(when: datetime | None) -> datetime:
    """Naive datetimes are taken as UTC; second resolution like ssh-keygen."""
    when = datetime.now(timezone.utc) if when is None else when
    when = when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    return when.replace(microsecond=0)


def _show(when: datetime) -> str:
    return when.strftime("%Y-%m-%d" if when.time() == datetime.min.time() else "%Y-%m-%d %H:%M:%S UTC")


def _next_field(s: str) -> tuple[str, str]:
    """Split off one whitespace-delimited field; spaces inside double quotes do not split."""
    m = re.match(r'[ \t]*((?:[^ \t"]|"[^"]*")*)', s)
    assert m is not None  # the pattern matches any string
    if s[m.end():m.end() + 1] == '"':
        raise ValueError("unterminated double quote")
    return m.group(1), s[m.end():]


def _parse_options(field: str) -> dict[str, str | None]:
    """Options as ssh-keygen takes them: case-insensitive names, values in double quotes."""
    opts: dict[str, str | None] = {}
    for item in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', field):  # commas outside quotes
        name, eq, value = item.partition("=")
        name = name.lower()
        if name not in ("cert-authority", "namespaces", "valid-after", "valid-before"):
            raise ValueError(f"unknown option {item!r}" if item else "empty option (stray comma?)")
        if name in opts:
            raise ValueError(f"option {name!r} given twice")
        if (name == "cert-authority") == bool(eq):
            raise ValueError(f"option {name!r} " + ("takes no value" if eq else "needs a value"))
        if eq and not (len(value) >= 2 and value[0] == value[-1] == '"' and value.count('"') == 2):
            raise ValueError(f'value of {name!r} must be in double quotes (ssh-keygen requires it)')
        opts[name] = value[1:-1] if eq else None
    return opts


def _parse_line(line: str) -> AllowedSigner | None:
    """Parse one non-comment line; None for a valid line with a non-Ed25519 key."""
    principals, rest = _next_field(line)
    first, after = _next_field(rest)
    opts: dict[str, str | None] = {}
    if not first:
        raise ValueError("no key after the principals")
    if first not in _KNOWN_TYPES:
        opts = _parse_options(first)
        first, after = _next_field(after)
        if not first:
            raise ValueError("no key after the options")
        if first not in _KNOWN_TYPES:
            raise ValueError(f"unknown key type {first!r}")
    b64, comment = _next_field(after)
    try:
        blob = base64.b64decode(b64, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"key is not valid base64: {exc}") from exc
    pats = tuple(principals.split(","))
    if not principals or "" in pats:
        raise ValueError("empty principal")
    namespaces = None if opts.get("namespaces") is None else tuple(str(opts["namespaces"]).split(","))
    if namespaces is not None and "" in namespaces:
        raise ValueError("empty namespace in namespaces=")
    after_t = None if opts.get("valid-after") is None else _parse_time(str(opts["valid-after"]))
    before_t = None if opts.get("valid-before") is None else _parse_time(str(opts["valid-before"]))
    if after_t and before_t and before_t <= after_t:
        raise ValueError('"valid-before" is not after "valid-after"')
    if first != _KEY_TYPE:
        r = _Reader(blob, "key")
        if r.text("key type") != first:
            raise ValueError(f"key blob type does not match {first!r}")
        return None
    try:
        key = _parse_key_blob(blob, "key")
    except FormatError as exc:
        raise ValueError(str(exc)) from exc
    return AllowedSigner(pats, key, namespaces, after_t, before_t, "cert-authority" in opts, line.strip(),
                         comment.strip())


class AllowedSigners:
    """Who may sign for which principal: ssh-keygen's allowed_signers semantics."""

    def __init__(self, signers: Iterable[AllowedSigner] = (), other_lines: Iterable[str] = ()) -> None:
        self.signers = list(signers)
        self.other_lines = list(other_lines)  # unsupported key types: kept for render(), never match
        self._index: tuple[int, dict[str, list[int]], list[int]] | None = None

    def _by_principal(self) -> tuple[dict[str, list[int]], list[int]]:
        """Plain-key lines by literal principal, and the lines with globs or negations (matched one by one).

        An HO trusts a thousand stores: scanning every line's patterns per verify cost milliseconds a bundle.
        Built once per parsed file (rebuilt if ``signers`` changed length), so file order is kept.
        """
        if self._index is None or self._index[0] != len(self.signers):
            exact: dict[str, list[int]] = {}
            patterned: list[int] = []
            for i, s in enumerate(self.signers):
                if s.cert_authority:
                    continue
                if _literal(s.principals):
                    for p in dict.fromkeys(s.principals):
                        exact.setdefault(p, []).append(i)
                else:
                    patterned.append(i)
            self._index = (len(self.signers), exact, patterned)
        return self._index[1], self._index[2]

    @classmethod
    def parse(cls, text: str, *, source: str = "allowed_signers") -> AllowedSigners:
        """Parse the file text; a bad line is a ConfigError naming ``source:line``."""
        signers: list[AllowedSigner] = []
        others: list[str] = []
        for no, raw in enumerate(text.split("\n"), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                parsed = _parse_line(line)
            except (ValueError, FormatError) as exc:
                raise ConfigError(f"{source}:{no}: {exc}",
                                  hint="Fix or remove the line (see ALLOWED SIGNERS in ssh-keygen(1)).") from exc
            if parsed is None:
                others.append(line)
            else:
                signers.append(parsed)
        return cls(signers, others)

    @classmethod
    def load(cls, path: Path) -> AllowedSigners:
        """Read and parse an allowed_signers file; refused when another account can write it."""
        check_not_writable_by_others(Path(path), "trust store")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read allowed signers file {path}: {exc}") from exc
        return cls.parse(text, source=str(path))

    def _plain(self, principal: str) -> list[AllowedSigner]:
        exact, patterned = self._by_principal()
        found = exact.get(principal, []) + [i for i in patterned if _match_list(principal, self.signers[i].principals)]
        return [self.signers[i] for i in sorted(found)]

    @staticmethod
    def _why_not(s: AllowedSigner, namespace: str, at: datetime) -> str | None:
        if s.namespaces is not None and not _match_list(namespace, s.namespaces):
            return f"not for namespace {namespace!r} (namespaces={','.join(s.namespaces)})"
        if s.valid_after is not None and at < s.valid_after:
            return f"only from {_show(s.valid_after)} (valid-after)"
        if s.valid_before is not None and at > s.valid_before:
            return f"expired {_show(s.valid_before)} (valid-before)"
        return None

    def signers_for(self, principal: str, namespace: str, at: datetime | None = None) -> list[AllowedSigner]:
        """Plain-key lines usable for ``principal`` in ``namespace`` at ``at`` (default: now)."""
        when = _utc(at)
        return [s for s in self._plain(principal) if self._why_not(s, namespace, when) is None]

    def check(self, principal: str, key: Ed25519PublicKey, namespace: str,
              at: datetime | None = None) -> AllowedSigner:
        """Return the line that trusts ``key`` for ``principal``, or say precisely why none does."""
        when = _utc(at)
        reasons = []
        for s in self._plain(principal):
            if _same(s.key, key):
                why = self._why_not(s, namespace, when)
                if why is None:
                    return s
                reasons.append(f"{why} ({s.comment})" if s.comment else why)
        fp = fingerprint(key)
        if reasons:
            raise AuthenticityError(f"key {fp} is trusted for {principal!r} " + "; ".join(reasons))
        others = self.principals_for_key(key)
        extra = f" (it is trusted for: {', '.join(others)})" if others else ""
        raise AuthenticityError(f"key {fp} is not trusted for principal {principal!r}{extra}")

    def principals_for_key(self, key: Ed25519PublicKey) -> list[str]:
        """Non-negated principal patterns of plain-key lines holding ``key``, in file order."""
        out: list[str] = []
        for s in self.signers:
            if not s.cert_authority and _same(s.key, key):
                out += [p for p in s.principals if not p.startswith("!") and p not in out]
        return out

    def render(self) -> str:
        """The file text: supported lines, then kept unsupported ones (comments are not kept)."""
        return "".join(f"{line}\n" for line in [s.line for s in self.signers] + self.other_lines)


def format_signer_line(principal: str, key_line: str, *, namespaces: str = NAMESPACE,
                       valid_after: datetime | None = None, valid_before: datetime | None = None) -> str:
    """One allowed_signers line ssh-keygen accepts; times are written in UTC with 'Z'.

    ``namespaces=""`` omits the option (any namespace). No trailing newline.
    """
    if not principal or re.search(r'[\s"]', principal):
        raise ConfigError(f"invalid principal {principal!r} (no spaces or quotes)")
    if re.search(r'[\s"]', namespaces):
        raise ConfigError(f"invalid namespaces {namespaces!r} (no spaces or quotes)")
    if "\n" in key_line or "\r" in key_line:
        raise ConfigError("a public key line cannot contain a line break")
    fields = key_line.split(None, 2)
    parse_public_line(key_line)
    opts = [f'namespaces="{namespaces}"'] if namespaces else []
    for name, when in (("valid-after", valid_after), ("valid-before", valid_before)):
        if when is not None:
            opts.append(f'{name}="{_utc(when).strftime("%Y%m%d%H%M%SZ")}"')
    line = " ".join([principal, ",".join(opts)] if opts else [principal]) + " " + " ".join(fields)
    try:
        _parse_line(line)
    except (ValueError, FormatError) as exc:
        raise ConfigError(f"cannot make an allowed_signers line: {exc}") from exc
    return line


def verify_with_trust(signature: bytes, data: bytes | BinaryIO, principal: str, trust: AllowedSigners,
                      namespace: str = NAMESPACE, at: datetime | None = None) -> AllowedSigner:
    """verify() then trust.check(); pass ``at`` = the signed creation time for archives."""
    key = verify(signature, data, namespace)
    return trust.check(principal, key, namespace, at)
