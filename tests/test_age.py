"""Tests for exchange.wire.crypto.age: C2SP CCTV vectors, interop with real age, damage, streaming."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import tracemalloc
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.errors import CryptoError, ExchangeError, FormatError, LimitError, NoIdentityError, VersionError
from exchange.wire.crypto import age

CI = os.environ.get("CI", "").lower() == "true"
CCTV_DIR = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "age-cctv"
ENC_CHUNK = age.CHUNK_SIZE + 16
SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536, 1_000_000]


def _missing(reason: str) -> None:
    """Skip on a developer clone; in CI a missing prerequisite is a failure."""
    if CI:
        pytest.fail(f"{reason} (CI=true, so this is a failure)")
    pytest.skip(reason)


def _data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


def _encrypt(data: bytes, recipients: list[str]) -> bytes:
    out = io.BytesIO()
    age.encrypt(io.BytesIO(data), out, recipients)
    return out.getvalue()


def _decrypt(blob: bytes, identities: list[str]) -> bytes:
    out = io.BytesIO()
    age.decrypt(io.BytesIO(blob), out, identities)
    return out.getvalue()


# --- CCTV vectors -----------------------------------------------------------------------------

@dataclass
class Vector:
    name: str
    expect: str
    body: bytes
    payload: str | None = None
    identities: list[str] = field(default_factory=list)
    passphrases: list[str] = field(default_factory=list)
    armored: bool = False

    @property
    def unsupported(self) -> bool:
        """Needs a feature we do not implement (armor, scrypt, post-quantum identities)."""
        return (self.armored or any(not i.startswith("AGE-SECRET-KEY-1") for i in self.identities)
                or bool(self.passphrases and not self.identities))


def _vector_names() -> list[str]:
    if not CCTV_DIR.is_dir():
        return ["<missing>"]
    return sorted(p.name for p in CCTV_DIR.iterdir() if p.is_file() and p.name not in ("README.md", "SOURCE"))


def _load_vector(name: str) -> Vector:
    if not CCTV_DIR.is_dir():
        _missing("../shared/testdata/age-cctv not present (user clone)")
    head, body = (CCTV_DIR / name).read_bytes().split(b"\n\n", 1)
    vec = Vector(name=name, expect="", body=body)
    for line in head.decode().splitlines():
        key, value = line.split(": ", 1)
        if key == "expect":
            vec.expect = value
        elif key == "payload":
            vec.payload = value
        elif key == "identity":
            vec.identities.append(value)
        elif key == "passphrase":
            vec.passphrases.append(value)
        elif key == "armored":
            vec.armored = value == "yes"
        elif key == "compressed":
            assert value == "zlib"
            vec.body = zlib.decompress(body)
    return vec


def _run_vector(vec: Vector) -> tuple[bytes, BaseException | None]:
    """Decrypt chunk by chunk; return (plaintext released before any error, the error)."""
    released = bytearray()
    try:
        with age.Decryptor(io.BytesIO(vec.body), vec.identities) as dec:
            while block := dec.read(10_000):
                released += block
    except Exception as exc:  # noqa: BLE001 - the caller checks the type
        return bytes(released), exc
    return bytes(released), None


EXPECTED_ERRORS: dict[str, tuple[type[ExchangeError], ...]] = {
    "header failure": (FormatError, VersionError, LimitError),
    "HMAC failure": (CryptoError,),
    "no match": (CryptoError,),
    "payload failure": (CryptoError,),
}


@pytest.mark.parametrize("name", _vector_names())
def test_cctv_vector(name: str) -> None:
    vec = _load_vector(name)
    released, err = _run_vector(vec)
    if err is not None and not isinstance(err, ExchangeError):
        pytest.fail(f"{name}: raw {type(err).__name__} escaped: {err}")
    if vec.unsupported:
        assert err is not None, f"{name}: needs an unsupported feature but decrypted"
        if vec.expect == "success":
            assert "support" in str(err), f"{name}: unclear error for an unsupported feature: {err}"
        return
    if vec.expect == "success":
        assert err is None, f"{name}: {err}"
        assert hashlib.sha256(released).hexdigest() == vec.payload
        return
    assert isinstance(err, EXPECTED_ERRORS[vec.expect]), f"{name}: expected {vec.expect}, got {err!r}"
    if vec.expect == "payload failure":  # CCTV: what was released must match the payload hash
        assert hashlib.sha256(released).hexdigest() == vec.payload


def test_cctv_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Whole-suite counts, so a silent regression (e.g. success -> unsupported) is caught."""
    names = _vector_names()
    vectors = [_load_vector(n) for n in names]
    decrypted = failed_as_expected = unsupported = unsupported_success = 0
    for vec in vectors:
        _, err = _run_vector(vec)
        if vec.unsupported:
            unsupported += 1
            unsupported_success += vec.expect == "success"
        elif vec.expect == "success" and err is None:
            decrypted += 1
        elif vec.expect != "success" and isinstance(err, EXPECTED_ERRORS[vec.expect]):
            failed_as_expected += 1
    with capsys.disabled():
        print(f"\nCCTV age: {len(vectors)} vectors, {decrypted} success vectors decrypted, "
              f"{failed_as_expected} failed as expected, {unsupported} unsupported (armor/scrypt/pq; "
              f"{unsupported_success} of them success vectors)")
    assert decrypted + failed_as_expected + unsupported == len(vectors)
    if len(vectors) == 143:  # the pinned C2SP/CCTV commit in ../shared
        assert (decrypted, failed_as_expected, unsupported, unsupported_success) == (14, 54, 75, 12)


# --- keys -------------------------------------------------------------------------------------

def test_spec_key_pair() -> None:
    identity = "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"
    assert age.recipient_from_identity(identity) == "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"
    assert age.recipient_from_identity(identity.lower()) == age.recipient_from_identity(identity)


def test_generate_identity_round_trip() -> None:
    identity, recipient = age.generate_identity()
    assert identity.startswith("AGE-SECRET-KEY-1") and recipient.startswith("age1")
    assert age.recipient_from_identity(identity) == recipient
    age.parse_recipient(recipient)
    assert _decrypt(_encrypt(b"hi", [recipient]), [identity]) == b"hi"


@pytest.mark.parametrize("bad", [
    "", "age1", "age1qqqq", "AGE1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwJ",
    "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwk",  # checksum
    "age1pq1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq", "ssh-ed25519 AAAA", "age1\u00e9",
])
def test_parse_recipient_rejects(bad: str) -> None:
    with pytest.raises(CryptoError):
        age.parse_recipient(bad)


def test_identity_errors_do_not_leak_the_secret() -> None:
    identity, _ = age.generate_identity()
    broken = identity[:-1] + ("Q" if identity[-1] != "Q" else "P")
    with pytest.raises(CryptoError) as info:
        age.recipient_from_identity(broken)
    assert broken not in str(info.value) and broken[16:40] not in str(info.value)
    with pytest.raises(CryptoError, match="unsupported age identity type"):
        age.recipient_from_identity("AGE-SECRET-KEY-PQ-1XX76JRALNLXDMEW0CRK45QMCCH4X06SE84UN3VPM33W6HWDX0H3SK3ZQFR")


def test_parse_identity_file() -> None:
    a, _ = age.generate_identity()
    b, _ = age.generate_identity()
    text = f"# created: now\n# public key: x\n{a}\n\n  \n# another\n{b}\r\n"
    assert age.parse_identity_file(text) == [a, b]
    with pytest.raises(CryptoError, match="line 2"):
        age.parse_identity_file(f"{a}\nnot-a-key\n")
    with pytest.raises(CryptoError):
        age.parse_identity_file("# only comments\n")


# --- interop with the real age binary ---------------------------------------------------------

@pytest.fixture(scope="module")
def age_bin() -> tuple[str, str]:
    tool, keygen = shutil.which("age"), shutil.which("age-keygen")
    if tool is None or keygen is None:
        _missing("the age / age-keygen programs are not on PATH")
    assert tool is not None and keygen is not None
    return tool, keygen


def _key_file(tmp_path: Path, identity: str, name: str = "key.txt") -> Path:
    path = tmp_path / name
    path.write_text(f"# created: by test\n# public key: {age.recipient_from_identity(identity)}\n{identity}\n")
    path.chmod(0o600)
    return path


def _run(*args: str | Path, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run([str(a) for a in args], input=stdin, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


@pytest.mark.parametrize("size", SIZES)
def test_ours_decrypts_with_age(age_bin: tuple[str, str], tmp_path: Path, size: int) -> None:
    identity, recipient = age.generate_identity()
    data = _data(size)
    (tmp_path / "f.age").write_bytes(_encrypt(data, [recipient]))
    assert _run(age_bin[0], "-d", "-i", _key_file(tmp_path, identity), tmp_path / "f.age") == data


@pytest.mark.parametrize("size", SIZES)
def test_age_decrypts_with_ours(age_bin: tuple[str, str], tmp_path: Path, size: int) -> None:
    identity, recipient = age.generate_identity()
    data = _data(size, seed=1)
    blob = _run(age_bin[0], "-r", recipient, stdin=data)
    assert _decrypt(blob, [identity]) == data


def test_age_keygen_keys_load_in_ours(age_bin: tuple[str, str], tmp_path: Path) -> None:
    key = tmp_path / "k.txt"
    _run(age_bin[1], "-o", key)
    text = key.read_text()
    identities = age.parse_identity_file(text)
    public = next(line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("# public key: "))
    assert len(identities) == 1 and age.recipient_from_identity(identities[0]) == public
    data = _data(70_000, seed=2)
    assert _decrypt(_run(age_bin[0], "-r", public, stdin=data), identities) == data
    assert _decrypt(_encrypt(data, [public]), identities) == data


def test_our_keys_load_in_age(age_bin: tuple[str, str], tmp_path: Path) -> None:
    identity, recipient = age.generate_identity()
    key = _key_file(tmp_path, identity)
    assert _run(age_bin[1], "-y", key).decode().strip() == recipient
    data = _data(1000, seed=3)
    blob = _run(age_bin[0], "-r", recipient, stdin=data)
    assert _run(age_bin[0], "-d", "-i", key, stdin=blob) == data


def test_multi_recipient_interop(age_bin: tuple[str, str], tmp_path: Path) -> None:
    keygen_key = tmp_path / "k0.txt"
    _run(age_bin[1], "-o", keygen_key)
    identities = age.parse_identity_file(keygen_key.read_text()) + [age.generate_identity()[0] for _ in range(2)]
    recipients = [age.recipient_from_identity(i) for i in identities]
    data = _data(200_000, seed=4)
    ours = _encrypt(data, recipients)
    theirs = _run(age_bin[0], *[x for r in recipients for x in ("-r", r)], stdin=data)
    assert age.header_stanza_count(io.BytesIO(ours)) == 3
    for n, identity in enumerate(identities):
        key = _key_file(tmp_path, identity, f"id{n}.txt")
        assert _run(age_bin[0], "-d", "-i", key, stdin=ours) == data
        assert _decrypt(ours, [identity]) == data
        assert _decrypt(theirs, [identity]) == data
    with pytest.raises(NoIdentityError, match="no identity matches any of the 3 recipient stanzas"):
        _decrypt(ours, [age.generate_identity()[0]])


# --- damage -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return age.generate_identity()


def _split(blob: bytes) -> tuple[bytes, list[bytes]]:
    """(header + nonce, encrypted chunks)."""
    end = blob.index(b"\n", blob.index(b"\n--- ") + 1) + 1 + 16
    payload = blob[end:]
    return blob[:end], [payload[i:i + ENC_CHUNK] for i in range(0, len(payload), ENC_CHUNK)]


def _stream_without_last_flag(data: bytes, recipient: str) -> bytes:
    """A well-formed file whose final chunk is (wrongly) encrypted with the last flag 0."""
    file_key, nonce = os.urandom(16), os.urandom(16)
    aead = age._payload_key(file_key, nonce)
    pieces = [data[i:i + age.CHUNK_SIZE] for i in range(0, len(data), age.CHUNK_SIZE)] or [b""]
    chunks = [aead.encrypt(age._chunk_nonce(n, False), p, None) for n, p in enumerate(pieces)]
    return age._build_header(file_key, [recipient]) + nonce + b"".join(chunks)


def _expect_crypto_error(blob: bytes, identity: str, match: str | None = None) -> None:
    with pytest.raises(CryptoError, match=match):
        _decrypt(blob, [identity])


def test_truncated_payload(keys: tuple[str, str]) -> None:
    blob = _encrypt(_data(3 * 65536 + 100), [keys[1]])
    head, chunks = _split(blob)
    for cut in (1, 50, 116, 117, ENC_CHUNK + 116, len(blob) - len(head) - 1):
        _expect_crypto_error(blob[:-cut], keys[0], "tampered or truncated|no final chunk|no chunks")
    _expect_crypto_error(head + b"".join(chunks[:-1]), keys[0], "truncated after chunk 2")
    _expect_crypto_error(head, keys[0], "no chunks")


def test_chunk_reordering(keys: tuple[str, str]) -> None:
    head, c = _split(_encrypt(_data(3 * 65536 + 100), [keys[1]]))
    assert len(c) == 4
    for _case, chunks in {"dropped": [c[0], c[2], c[3]], "swapped": [c[1], c[0], c[2], c[3]],
                         "duplicated": [c[0], c[1], c[1], c[2], c[3]], "last moved": [c[0], c[3]]}.items():
        with pytest.raises(CryptoError, match=r"chunk \d failed authentication"):
            _decrypt(head + b"".join(chunks), [keys[0]])


def test_data_after_final_chunk(keys: tuple[str, str]) -> None:
    full = _encrypt(_data(2 * 65536), [keys[1]])  # full final chunk: the boundary is visible
    _expect_crypto_error(full + b"x", keys[0], "data after the final age chunk")
    _expect_crypto_error(full + full, keys[0], "data after the final age chunk")
    short = _encrypt(_data(1000), [keys[1]])  # short final chunk: garbage merges into it
    _expect_crypto_error(short + b"x", keys[0], "chunk 0 failed authentication")
    empty = _encrypt(b"", [keys[1]])
    _expect_crypto_error(empty + b"\x00", keys[0], "chunk 0 failed authentication")


def test_missing_last_flag(keys: tuple[str, str]) -> None:
    for size, match in [(0, "chunk 0 failed"), (100, "chunk 0 failed"), (65536, "truncated after chunk 0"),
                        (3 * 65536, "truncated after chunk 2"), (65536 + 5, "chunk 1 failed")]:
        _expect_crypto_error(_stream_without_last_flag(_data(size), keys[1]), keys[0], match)


def test_empty_final_chunk_rejected(keys: tuple[str, str]) -> None:
    """A non-empty payload must not end with an empty final chunk (spec MUST NOT)."""
    file_key, nonce = os.urandom(16), os.urandom(16)
    aead = age._payload_key(file_key, nonce)
    blob = (age._build_header(file_key, [keys[1]]) + nonce + aead.encrypt(age._chunk_nonce(0, False), b"a" * 65536, None)
            + aead.encrypt(age._chunk_nonce(1, True), b"", None))
    _expect_crypto_error(blob, keys[0], "final chunk 1 is empty")


def test_flipped_header_bytes(keys: tuple[str, str]) -> None:
    blob = _encrypt(b"secret", [keys[1]])
    head, _ = _split(blob)
    for pos in range(len(head)):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(ExchangeError):
            _decrypt(bytes(bad), [keys[0]])


def test_header_mac_covers_stanzas(keys: tuple[str, str]) -> None:
    blob = _encrypt(b"secret", [keys[1]])
    bad = blob.replace(b"\n--- ", b"\n-> grease x\n\n--- ", 1)
    _expect_crypto_error(bad, keys[0], "age header MAC does not verify")


def _fake_header(stanzas: int) -> bytes:
    stanza = b"-> X25519 " + age._b64encode(bytes(range(1, 33))) + b"\n" + age._b64encode(bytes(32)) + b"\n"
    return b"age-encryption.org/v1\n" + stanza * stanzas + b"--- " + age._b64encode(bytes(32)) + b"\n" + bytes(40)


def test_too_many_stanzas_before_crypto(keys: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_crypto(*args: object) -> bytes:
        raise AssertionError("cryptography ran before the stanza limit was checked")

    monkeypatch.setattr(age, "_unwrap_file_key", no_crypto)
    monkeypatch.setattr(age, "_hkdf", no_crypto)
    with pytest.raises(LimitError, match="more than 20 recipient stanzas"):
        _decrypt(_fake_header(age.MAX_STANZAS + 1), [keys[0]])
    assert age.header_stanza_count(io.BytesIO(_fake_header(age.MAX_STANZAS + 1))) == 21


def test_recipient_limit_on_encrypt(keys: tuple[str, str]) -> None:
    recipients = [age.generate_identity()[1] for _ in range(age.MAX_STANZAS - 1)] + [keys[1]]
    assert _decrypt(_encrypt(b"x", recipients), [keys[0]]) == b"x"
    with pytest.raises(LimitError):
        _encrypt(b"x", recipients + [keys[1]])


def test_oversized_header(keys: tuple[str, str]) -> None:
    body = age._b64encode(bytes(50_000))
    lines = b"".join(body[i:i + 64] + b"\n" for i in range(0, len(body), 64))
    blob = b"age-encryption.org/v1\n-> big\n" + lines + b"\n--- " + age._b64encode(bytes(32)) + b"\n"
    with pytest.raises(LimitError, match="exceeds 65536 bytes"):
        _decrypt(blob, [keys[0]])
    with pytest.raises(LimitError):
        _decrypt(b"age-encryption.org/v1\n-> " + b"a" * 100_000, [keys[0]])


@pytest.mark.parametrize(("blob", "error", "match"), [
    (b"", FormatError, "not an age file"),
    (b"PK\x03\x04 zip", FormatError, "not an age file"),
    (b"age-encryption.org/v2\n-> X25519 a\n\n", VersionError, "unsupported age format version 'v2'"),
    (b"\n-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n-----END AGE ENCRYPTED FILE-----\n", FormatError, "armored"),
    (b"age-encryption.org/v1\n--- " + b"A" * 43 + b"\n", FormatError, "no recipient stanza"),
    (b"age-encryption.org/v1\n-> scrypt c2FsdHNhbHRzYWx0c2FsdA 10\n" + b"A" * 43 + b"\n--- " + b"A" * 43 + b"\n",
     CryptoError, "unsupported age recipient type 'scrypt'"),
    (b"age-encryption.org/v1\n-> X25519 \xff\n\n", FormatError, "stanza arguments"),
    (b"age-encryption.org/v1\n-> X25519 abc\nAB==\n", FormatError, "stanza body"),
    (b"age-encryption.org/v1\n-> X25519 abc\n", FormatError, "truncated"),
])
def test_malformed_inputs(keys: tuple[str, str], blob: bytes, error: type[ExchangeError], match: str) -> None:
    with pytest.raises(error, match=match):
        _decrypt(blob, [keys[0]])


def test_wrong_identity_and_missing_nonce(keys: tuple[str, str]) -> None:
    blob = _encrypt(b"data", [keys[1]])
    _expect_crypto_error(blob, age.generate_identity()[0], "no identity matches any of the 1 recipient stanzas")
    with pytest.raises(FormatError, match="nonce"):
        _decrypt(_split(blob)[0][:-3], [keys[0]])
    with pytest.raises(CryptoError, match="no age identity given"):
        _decrypt(blob, [])


def test_aborted_encryption_is_not_finalized(keys: tuple[str, str]) -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError):
        with age.Encryptor(out, [keys[1]]) as enc:
            enc.write(b"partial")
            raise RuntimeError("boom")
    _expect_crypto_error(out.getvalue(), keys[0])


def test_decryptor_is_a_raw_io(keys: tuple[str, str]) -> None:
    data = _data(150_000, seed=5)
    blob = _encrypt(data, [keys[1]])
    with io.BufferedReader(age.Decryptor(io.BytesIO(blob), [keys[0]])) as reader:
        assert reader.read() == data
    dec = age.Decryptor(io.BytesIO(blob), [keys[0]])
    buf = bytearray(100_000)
    assert dec.readinto(buf) == 100_000 and bytes(buf) == data[:100_000]
    assert dec.read() == data[100_000:] and dec.read(10) == b""


# --- properties and streaming -----------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.integers(0, 300_000), st.sampled_from([0, 1, 65535, 65536, 65537, 131072, 196608])),
       seed=st.integers(0, 2**32), writes=st.lists(st.integers(1, 150_000), min_size=1, max_size=8),
       reads=st.integers(1, 100_000))
def test_round_trip_property(keys: tuple[str, str], size: int, seed: int, writes: list[int], reads: int) -> None:
    data = random.Random(seed).randbytes(size)
    out = io.BytesIO()
    with age.Encryptor(out, [keys[1]]) as enc:
        pos = n = 0
        while pos < size:
            step = writes[n % len(writes)]
            assert enc.write(memoryview(data)[pos:pos + step]) == len(data[pos:pos + step])
            pos, n = pos + step, n + 1
    blob = out.getvalue()
    chunks = max(1, -(-size // age.CHUNK_SIZE))
    assert len(blob) == len(_split(blob)[0]) + size + 16 * chunks
    dec = age.Decryptor(io.BytesIO(blob), [keys[0]])
    got = bytearray()
    while block := dec.read(reads):
        got += block
    assert got == data


def test_streaming_memory(keys: tuple[str, str], tmp_path: Path) -> None:
    block = _data(1 << 20, seed=6)
    expected = hashlib.sha256()
    for _ in range(64):
        expected.update(block)
    path = tmp_path / "big.age"
    tracemalloc.start()
    try:
        with path.open("wb") as fh, age.Encryptor(fh, [keys[1]]) as enc:
            for _ in range(64):
                enc.write(block)
        enc_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        got = hashlib.sha256()
        with path.open("rb") as fh, age.Decryptor(fh, [keys[0]]) as dec:
            while chunk := dec.read(age.CHUNK_SIZE):
                got.update(chunk)
        dec_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with path.open("rb") as fh:
        header_and_nonce = len(_split(fh.read(1000))[0])
    assert path.stat().st_size == header_and_nonce + (64 << 20) + 16 * ((64 << 20) // age.CHUNK_SIZE)
    assert got.digest() == expected.digest()
    assert enc_peak < 4 << 20, f"encryption peak {enc_peak} bytes"
    assert dec_peak < 4 << 20, f"decryption peak {dec_peak} bytes"


_FRAGMENTS = [b"-> ", b"X25519 ", b"scrypt ", b"--- ", b"---", b"\n", b"\r\n", b" ", b"=", b"->", b"\xff",
              b"A" * 43, b"A" * 64, b"AAAA", b"age-encryption.org/v1\n", b"age-encryption.org/", b"-----BEGIN"]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.binary(max_size=40)), max_size=30))
def test_garbage_only_raises_exchange_errors(keys: tuple[str, str], parts: list[bytes]) -> None:
    """Whatever the input, the only exceptions are ExchangeError subclasses."""
    junk = b"".join(parts)
    valid = _encrypt(b"payload", [keys[1]])
    for blob in (junk, b"age-encryption.org/v1\n" + junk, valid[:len(junk)] + junk, valid + junk):
        try:
            _decrypt(blob, [keys[0]])
        except ExchangeError:
            pass
        try:
            age.header_stanza_count(io.BytesIO(blob))
        except ExchangeError:
            pass
