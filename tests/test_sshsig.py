"""SSHSIG and allowed_signers, cross-checked against the real ssh-keygen."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.errors import (
    AuthenticityError, ConfigError, CryptoError, ExchangeError, FormatError, LimitError,
)
from exchange.wire.crypto import sshsig
from exchange.wire.crypto.sshsig import (
    NAMESPACE, AllowedSigners, fingerprint, format_signer_line, generate_key, load_private_key,
    parse_public_line, public_line, sign, verify, verify_with_trust,
)

KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
UTC = timezone.utc


@pytest.fixture(scope="session")
def keygen() -> str:
    if not os.access(KEYGEN, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("ssh-keygen is required in CI")
        pytest.skip("ssh-keygen not installed; interop with OpenSSH not checked")
    return KEYGEN


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=60, check=False)


def ssh_keypair(tmp: Path, name: str = "id", comment: str = "me@shop") -> Path:
    path = tmp / name
    res = run(KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    assert res.returncode == 0, res.stderr
    return path


def ssh_sign(tmp: Path, key: Path, data: bytes, namespace: str = NAMESPACE, *opts: str) -> bytes:
    msg = tmp / "msg"
    msg.write_bytes(data)
    sig = tmp / "msg.sig"
    sig.unlink(missing_ok=True)  # -Y sign prompts before overwriting
    res = run(KEYGEN, "-Y", "sign", "-f", str(key), "-n", namespace, *opts, str(msg))
    assert res.returncode == 0, res.stderr
    return sig.read_bytes()


def ssh_verify(tmp: Path, allowed: str, principal: str, sig: bytes, data: bytes,
               namespace: str = NAMESPACE, verify_time: str | None = None) -> bool:
    (tmp / "allowed_signers").write_text(allowed)
    (tmp / "check.sig").write_bytes(sig)
    extra = [f"-Overify-time={verify_time}"] if verify_time else []
    res = run(KEYGEN, "-Y", "verify", *extra, "-f", str(tmp / "allowed_signers"), "-I", principal,
              "-n", namespace, "-s", str(tmp / "check.sig"), stdin=data)
    return res.returncode == 0


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def armor(blob: bytes) -> bytes:
    b64 = base64.b64encode(blob).decode()
    return ("-----BEGIN SSH SIGNATURE-----\n"
            + "".join(b64[i:i + 70] + "\n" for i in range(0, len(b64), 70))
            + "-----END SSH SIGNATURE-----\n").encode()


def dearmor(sig: bytes) -> bytes:
    return base64.b64decode("".join(sig.decode().splitlines()[1:-1]))


def s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def make_sig(key: Ed25519PrivateKey, data: bytes, namespace: str = NAMESPACE, hashalg: str = "sha512",
             reserved: bytes = b"", version: int = 1) -> bytes:
    """Build an SSHSIG by hand from the spec, independent of the module under test."""
    h = hashlib.new(hashalg, data).digest()
    signed = b"SSHSIG" + s(namespace.encode()) + s(b"") + s(hashalg.encode()) + s(h)
    pub = s(b"ssh-ed25519") + s(key.public_key().public_bytes_raw())
    blob = (b"SSHSIG" + struct.pack(">I", version) + s(pub) + s(namespace.encode()) + s(reserved)
            + s(hashalg.encode()) + s(s(b"ssh-ed25519") + s(key.sign(signed))))
    return armor(blob)


# --- interop with ssh-keygen ---------------------------------------------------

def test_our_signature_verifies_with_ssh_keygen(keygen: str, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    data = b"bundle bytes\n" * 1000
    sig = sign(key, data)
    assert sig.startswith(b"-----BEGIN SSH SIGNATURE-----\n") and sig.endswith(b"-----END SSH SIGNATURE-----\n")
    assert all(len(line) <= 70 for line in sig.splitlines())
    allowed = format_signer_line("s001", public_line(key)) + "\n"
    assert ssh_verify(tmp_path, allowed, "s001", sig, data)
    assert not ssh_verify(tmp_path, allowed, "s001", sig, data + b"x")
    assert not ssh_verify(tmp_path, allowed, "s002", sig, data)
    assert not ssh_verify(tmp_path, allowed, "s001", sig, data, namespace="other")


@pytest.mark.parametrize("hashalg", ["sha512", "sha256"])
def test_ssh_keygen_signature_verifies_with_ours(keygen: str, tmp_path: Path, hashalg: str) -> None:
    path = ssh_keypair(tmp_path)
    data = os.urandom(5000)
    sig = ssh_sign(tmp_path, path, data, NAMESPACE, f"-Ohashalg={hashalg}")
    signer = verify(sig, data)
    assert public_line(signer) == public_line(parse_public_line(path.with_suffix(".pub").read_text()))
    assert verify(sig, io.BytesIO(data)).public_bytes_raw() == signer.public_bytes_raw()
    with pytest.raises(AuthenticityError):
        verify(sig, data[:-1])


def test_signatures_are_byte_identical_to_ssh_keygen(keygen: str, tmp_path: Path) -> None:
    """Ed25519 is deterministic, so armor and wrapping must match ssh-keygen exactly."""
    path = ssh_keypair(tmp_path)
    ours = load_private_key(path.read_bytes())
    for data in (b"", b"x", os.urandom(777)):
        assert sign(ours, data) == ssh_sign(tmp_path, path, data)


def test_ssh_keygen_key_loads(keygen: str, tmp_path: Path) -> None:
    path = ssh_keypair(tmp_path, comment="s001@store")
    loaded = load_private_key(path.read_bytes(), path=str(path))
    assert public_line(loaded, "s001@store") == path.with_suffix(".pub").read_text().strip()


def test_generated_key_accepted_by_ssh_keygen(keygen: str, tmp_path: Path) -> None:
    pem, line = generate_key("hq@exchange")
    assert pem.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert line.startswith("ssh-ed25519 AAAA") and line.endswith(" hq@exchange")
    path = tmp_path / "gen"
    path.write_bytes(pem)
    path.chmod(0o600)
    res = run(KEYGEN, "-y", "-f", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().strip() == line  # comment is stored in the private key too
    data = b"signed by ssh-keygen with our key"
    sig = ssh_sign(tmp_path, path, data)
    assert public_line(verify(sig, data)) == line.rsplit(" ", 1)[0]
    assert public_line(load_private_key(pem)) == line.rsplit(" ", 1)[0]


def test_fingerprint_matches_ssh_keygen(keygen: str, tmp_path: Path) -> None:
    path = ssh_keypair(tmp_path)
    res = run(KEYGEN, "-l", "-f", str(path.with_suffix(".pub")))
    assert res.returncode == 0
    expected = res.stdout.decode().split()[1]
    assert fingerprint(parse_public_line(path.with_suffix(".pub").read_text())) == expected
    assert expected.startswith("SHA256:") and not expected.endswith("=")


def test_time_window_agrees_with_ssh_keygen(keygen: str, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    after, before = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, 12, 30, tzinfo=UTC)
    other = Ed25519PrivateKey.generate()
    text = "# store keys\n\n" + "\n".join([
        format_signer_line("s002", public_line(other)),
        format_signer_line("s001", public_line(key, "s001 key"), valid_after=after, valid_before=before),
    ]) + "\n"
    trust = AllowedSigners.parse(text)
    allowed = trust.render()
    assert 'valid-after="20260101000000Z",valid-before="20270101123000Z"' in allowed
    data = b"archive"
    sig = sign(key, data)
    cases = [("20260601000000Z", datetime(2026, 6, 1, tzinfo=UTC), True),
             ("20260101000000Z", after, True),  # both bounds are inclusive
             ("20270101123000Z", before, True),
             ("20251231235959Z", datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), False),
             ("20270101123001Z", datetime(2027, 1, 1, 12, 30, 1, tzinfo=UTC), False)]
    for stamp, at, ok in cases:
        assert ssh_verify(tmp_path, allowed, "s001", sig, data, verify_time=stamp) is ok, stamp
        if ok:
            assert verify_with_trust(sig, data, "s001", trust, at=at).principals == ("s001",)
        else:
            with pytest.raises(AuthenticityError, match="valid-after|valid-before"):
                verify_with_trust(sig, data, "s001", trust, at=at)


def test_ssh_keygen_options_and_patterns_agree(keygen: str, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    pub = public_line(key)
    data = b"d"
    sig = sign(key, data)
    lines = {
        f'S0*,!s0x9 NAMESPACES="other,exch*" {pub}': {"S001": True, "s0x9": False, "s1": False},
        f'*,!s00? {pub}': {"s001": False, "s0011": True, "hq": True},
        f'!s001 {pub}': {"s001": False, "s002": False},
        f'hq cert-authority {pub}': {"hq": False},
        f's001 namespaces="file" {pub}': {"s001": False},
    }
    for line, expect in lines.items():
        trust = AllowedSigners.parse(line)
        for principal, ok in expect.items():
            assert ssh_verify(tmp_path, line + "\n", principal, sig, data) is ok, (line, principal)
            if ok:
                verify_with_trust(sig, data, principal, trust)
            else:
                with pytest.raises(AuthenticityError):
                    verify_with_trust(sig, data, principal, trust)


# --- verify() negatives ----------------------------------------------------------

def test_round_trip_and_stream(key: Ed25519PrivateKey) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one hashing chunk
    sig = sign(key, io.BytesIO(data))
    assert sig == sign(key, data)
    assert verify(sig, io.BytesIO(data)).public_bytes_raw() == key.public_key().public_bytes_raw()
    assert verify(sign(key, b"x", "other-ns"), b"x", "other-ns")


def test_wrong_namespace(key: Ed25519PrivateKey) -> None:
    with pytest.raises(AuthenticityError, match="namespace 'file'"):
        verify(sign(key, b"data", "file"), b"data")
    with pytest.raises(CryptoError):
        sign(key, b"data", "")


def test_flipped_data_byte(key: Ed25519PrivateKey) -> None:
    data = bytearray(os.urandom(100))
    sig = sign(key, bytes(data))
    data[50] ^= 1
    with pytest.raises(AuthenticityError, match="does not match"):
        verify(sig, bytes(data))


def test_every_flipped_blob_byte_is_rejected(key: Ed25519PrivateKey) -> None:
    blob = dearmor(sign(key, b"data"))
    kinds = set()
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises((AuthenticityError, FormatError)) as info:
            verify(armor(bytes(bad)), b"data")
        kinds.add(type(info.value))
    assert kinds == {AuthenticityError, FormatError}


@pytest.mark.parametrize("mangle", [
    lambda sig: sig[:-20],                                    # footer cut
    lambda sig: sig[: len(sig) // 2],                         # truncated armor
    lambda sig: sig.replace(b"BEGIN", b"BEGAN"),
    lambda sig: b"\n" + sig,                                  # header must come first
    lambda sig: sig + b"trailing junk\n",
    lambda sig: sig.replace(b"U1NI", b"U1N!"),                # bad base64
    lambda sig: sig.replace(b"\n-----END", b"AA\n-----END"),  # base64 length wrong
    lambda sig: b"garbage",
    lambda sig: b"",
    lambda sig: "é".encode() + sig,
])
def test_malformed_armor(key: Ed25519PrivateKey, mangle: object) -> None:
    sig = sign(key, b"data")
    with pytest.raises(FormatError):
        verify(mangle(sig), b"data")  # type: ignore[operator]


@pytest.mark.parametrize("blob, message", [
    (b"SSH", "truncated"),
    (b"SSHSIF" + bytes(10), "SSHSIG"),
    (b"SSHSIG\x00\x00\x00\x02", "version 2"),
    (b"SSHSIG\x00\x00\x00\x01" + s(s(b"ssh-rsa") + s(b"x")), "ssh-rsa"),
    (b"SSHSIG\x00\x00\x00\x01" + s(s(b"ssh-ed25519") + s(bytes(31))), "not 32"),
    (b"SSHSIG\x00\x00\x00\x01\xff\xff\xff\xff", "truncated"),
])
def test_malformed_blob(blob: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        verify(armor(blob), b"")


def test_blob_field_checks(key: Ed25519PrivateKey) -> None:
    assert verify(make_sig(key, b"d"), b"d")
    assert verify(make_sig(key, b"d", reserved=b"future"), b"d")  # reserved is ignored
    with pytest.raises(FormatError, match="md5"):
        verify(make_sig(key, b"d", hashalg="md5"), b"d")
    with pytest.raises(FormatError, match="version 0"):
        verify(make_sig(key, b"d", version=0), b"d")
    with pytest.raises(FormatError, match="trailing"):
        verify(armor(dearmor(make_sig(key, b"d")) + b"\0"), b"d")


def test_sha256_signature_verifies(key: Ed25519PrivateKey) -> None:
    sig = make_sig(key, b"payload", hashalg="sha256")
    assert b"sha256" in dearmor(sig)
    assert verify(sig, io.BytesIO(b"payload")).public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(AuthenticityError):
        verify(sig, b"payloaD")


def test_oversized_signature_is_refused_before_parsing() -> None:
    with pytest.raises(LimitError):
        verify(b"-----BEGIN SSH SIGNATURE-----\n" + b"A" * sshsig.MAX_SIGNATURE_BYTES, b"")


# --- trust ----------------------------------------------------------------

def test_verify_with_trust(key: Ed25519PrivateKey) -> None:
    stranger = Ed25519PrivateKey.generate()
    trust = AllowedSigners.parse(format_signer_line("s001", public_line(key)) + "\n"
                                 + format_signer_line("hq", public_line(stranger)) + "\n")
    sig = sign(key, b"d")
    assert verify_with_trust(sig, b"d", "s001", trust).key.public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(AuthenticityError, match=r"not trusted for principal 's002' \(it is trusted for: s001\)"):
        verify_with_trust(sig, b"d", "s002", trust)
    with pytest.raises(AuthenticityError, match=r"not trusted for principal 's001' \(it is trusted for: hq\)"):
        verify_with_trust(sign(stranger, b"d"), b"d", "s001", trust)
    unknown = Ed25519PrivateKey.generate()
    with pytest.raises(AuthenticityError, match=f"^key {re.escape(fingerprint(unknown.public_key()))} is "
                                                "not trusted for principal 's001'$"):
        verify_with_trust(sign(unknown, b"d"), b"d", "s001", trust)
    with pytest.raises(AuthenticityError, match="not for namespace 'file'"):
        trust.check("s001", key.public_key(), "file")


def test_not_yet_valid_and_expired_messages(key: Ed25519PrivateKey) -> None:
    pub = public_line(key)
    trust = AllowedSigners.parse(f's001 valid-after="20270101" {pub}\n'
                                 f's002 valid-before="20200101120000Z" {pub}\n')
    with pytest.raises(AuthenticityError, match=r"trusted for 's001' only from 2027-01-01 \(valid-after\)"):
        trust.check("s001", key.public_key(), NAMESPACE)
    with pytest.raises(AuthenticityError, match=r"'s002' expired 2020-01-01 12:00:00 UTC \(valid-before\)"):
        trust.check("s002", key.public_key(), NAMESPACE)
    assert trust.check("s001", key.public_key(), NAMESPACE, at=datetime(2027, 1, 1)).valid_after == \
        datetime(2027, 1, 1, tzinfo=UTC)  # naive `at` and unsuffixed times are UTC
    assert trust.signers_for("s002", NAMESPACE, at=datetime(2019, 1, 1, tzinfo=UTC))
    assert not trust.signers_for("s002", NAMESPACE)


def test_parse_fields_and_unsupported_lines(key: Ed25519PrivateKey) -> None:
    pub = public_line(key)
    rsa = "ssh-rsa " + base64.b64encode(s(b"ssh-rsa") + s(b"\x01\x00\x01") + s(b"\x00" + bytes(64))).decode()
    text = (f"  # comment\n\n*@hq,s001 Cert-Authority,namespaces=\"a,b\" {pub} ca\n"
            f"s001 {rsa} old key\n"
            f's001,s002 valid-after="202601021530",valid-before="20270101000000z" {pub} comment here\n')
    trust = AllowedSigners.parse(text)
    ca, plain = trust.signers
    assert ca.cert_authority and ca.principals == ("*@hq", "s001") and ca.namespaces == ("a", "b")
    assert plain.valid_after == datetime(2026, 1, 2, 15, 30, tzinfo=UTC)
    assert plain.valid_before == datetime(2027, 1, 1, tzinfo=UTC) and plain.namespaces is None
    assert trust.other_lines == [f"s001 {rsa} old key"]
    assert trust.principals_for_key(key.public_key()) == ["s001", "s002"]
    assert trust.signers_for("x@hq", "a") == []  # cert-authority lines never match plain keys
    assert [s.line for s in AllowedSigners.parse(trust.render()).signers] == [ca.line, plain.line]


@pytest.mark.parametrize("line, message", [
    ("s001", "no key"),
    ("s001 bogus-option {pub}", "unknown option"),
    ("s001 namespaces=file {pub}", "double quotes"),
    ('s001 namespaces="a",namespaces="b" {pub}', "twice"),
    ("s001 cert-authority=\"x\" {pub}", "takes no value"),
    ("s001 valid-after {pub}", "needs a value"),
    ('s001 valid-after="2026" {pub}', "bad timestamp"),
    ('s001 valid-after="20261340" {pub}', "20261340"),
    ('s001 valid-after="20270101",valid-before="20260101" {pub}', "valid-before"),
    ('s001 namespaces="a,b {pub}', "quote"),
    ("s001 cert-authority, {pub}", "empty option"),
    ("s001,,s002 {pub}", "empty principal"),
    ("s001 ssh-ed25519 AAAA!!", "base64"),
    ("s001 ssh-ed25519 " + base64.b64encode(s(b"ssh-ed25519") + s(bytes(5))).decode(), "not 32"),
    ("s001 ssh-rsa " + base64.b64encode(s(b"ssh-dss")).decode(), "does not match"),
    ("s001 cert-authority foo-key AAAA", "unknown key type"),
])
def test_malformed_line_names_source_and_line(key: Ed25519PrivateKey, line: str, message: str) -> None:
    text = "# ok\n" + line.format(pub=public_line(key)) + "\n"
    with pytest.raises(ConfigError, match=f"^peers/allowed_signers:2: .*{message}"):
        AllowedSigners.parse(text, source="peers/allowed_signers")


def test_load(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "allowed_signers"
    path.write_text(format_signer_line("s001", public_line(key), namespaces="") + "\n")
    assert AllowedSigners.load(path).signers[0].namespaces is None
    with pytest.raises(ConfigError, match="cannot read"):
        AllowedSigners.load(tmp_path / "missing")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError):
        AllowedSigners.load(path)


def test_format_signer_line_rejects_bad_input(key: Ed25519PrivateKey) -> None:
    for principal in ("", "two words", 'q"uote'):
        with pytest.raises(ConfigError):
            format_signer_line(principal, public_line(key))
    with pytest.raises(ConfigError):
        format_signer_line("s001", public_line(key), namespaces='a b')
    with pytest.raises(CryptoError):
        format_signer_line("s001", "ssh-rsa AAAA")
    with pytest.raises(ConfigError):
        format_signer_line("s001", public_line(key) + " x\ny")


# --- keys -------------------------------------------------------------------

def test_load_private_key_errors(tmp_path: Path, keygen: str) -> None:
    enc = tmp_path / "enc"
    assert run(KEYGEN, "-q", "-t", "ed25519", "-N", "secret", "-f", str(enc)).returncode == 0
    with pytest.raises(CryptoError, match="enc: .*passphrase"):
        load_private_key(enc.read_bytes(), path=str(enc))
    ec = tmp_path / "ec"
    assert run(KEYGEN, "-q", "-t", "ecdsa", "-N", "", "-f", str(ec)).returncode == 0
    with pytest.raises(CryptoError, match="not Ed25519"):
        load_private_key(ec.read_bytes())
    for junk in (b"", b"garbage", b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"):
        with pytest.raises(CryptoError):
            load_private_key(junk)


@pytest.mark.parametrize("line", [
    "", "ssh-ed25519", "ssh-rsa AAAA", "ssh-ed25519 !!!", "ssh-ed25519 AAAA",
    "ssh-ed25519 " + base64.b64encode(s(b"ssh-rsa") + s(bytes(32))).decode(),
    "ssh-ed25519 " + base64.b64encode(s(b"ssh-ed25519") + s(bytes(32)) + b"x").decode(),
])
def test_parse_public_line_errors(line: str) -> None:
    with pytest.raises(CryptoError):
        parse_public_line(line)


def test_public_line_round_trip(key: Ed25519PrivateKey) -> None:
    line = public_line(key, "a comment")
    assert parse_public_line(line).public_bytes_raw() == key.public_key().public_bytes_raw()
    assert public_line(key.public_key()) == line.rsplit(" ", 2)[0]


# --- properties ---------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), namespace=st.text(min_size=1, max_size=40))
def test_property_round_trip(key: Ed25519PrivateKey, data: bytes, namespace: str) -> None:
    sig = sign(key, data, namespace)
    assert verify(sig, data, namespace).public_bytes_raw() == key.public_key().public_bytes_raw()
    assert verify(sig, io.BytesIO(data), namespace)
    with pytest.raises(AuthenticityError):
        verify(sig, data + b"\0", namespace)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=600), wrap=st.booleans())
def test_property_junk_only_raises_exchange_errors(raw: bytes, wrap: bool) -> None:
    with pytest.raises(ExchangeError):
        verify(armor(raw) if wrap else raw, b"data")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_property_mutated_signature_never_verifies(key: Ed25519PrivateKey, data: st.DataObject) -> None:
    blob = bytearray(dearmor(sign(key, b"data")))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] = data.draw(st.integers(0, 255).filter(lambda b: b != blob[i]))
    cut = data.draw(st.integers(0, len(blob)))
    with pytest.raises(ExchangeError):
        verify(armor(bytes(blob[:cut] if data.draw(st.booleans()) else blob)), b"data")
