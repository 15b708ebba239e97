"""A file is exactly what its sender wrote, or it is damage (issue 13, "Applied means acknowledged").

Bytes no signature covers (a tar header's mtime, owner fields and checksum
spelling, the end-of-archive trailer, the SSHSIG armor's line breaks and the
blob's reserved field) once could change in transit: the copy still verified and
was applied, its ack named the altered file's SHA-256, the sender refused that
ack and resent the genuine file, and the receiver quarantined every genuine copy
as a replay, for ever. Readers now accept only the exact bytes the writer
produces (docs/FORMAT.md sections 2, 5 and 7). The attacker here is anyone with
write access to the drop folder (a store's own account, a stick, an SFTP host):
they change a sealed file's uncovered bytes; no key is needed.

Oracle, per case: the altered file is refused naming the file and the byte
field, by the reader, ``exchange verify`` and ``exchange audit verify`` alike;
at the importer it is quarantined with a ``.reason`` before any state change
(no row, no stream position, no ack); the genuine copy arriving later applies,
is acknowledged, and its sender reaches PROCESSED; a second genuine copy is
re-acknowledged, not quarantined as a replay.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from enginehelpers import Net, check_stream, make_net, seed_ho, snapshot, transfer_files
from helpers_bundle import CREATED, assemble, seal, world
from sqlalchemy import select, update

from exchange.cli import main
from exchange.database.tables import xchg_sent
from exchange.errors import AuthenticityError, ExchangeError, FormatError
from exchange.files import utc_now
from exchange.receive.importer import import_inbox
from exchange.service import status
from exchange.service.sync import sync
from exchange.wire import bundle, tarfmt
from exchange.wire.crypto import sshsig

BLOCK = tarfmt.BLOCK


# ---------------------------------------------------------------- byte surgery on a sealed file

def members(data: bytes) -> list[tuple[int, tarfmt.Member, bytes]]:
    """(header offset, header, content) of every member of a tar the writer made."""
    src, out = io.BytesIO(data), []
    while True:
        pos = src.tell()
        m = tarfmt.read_header(src)
        if m is None:
            return out
        out.append((pos, m, src.read(m.size)))
        tarfmt.skip_padding(src, m.size)


def _header_field(data: bytes, start: int, value: bytes, which: int = 0) -> bytes:
    """Overwrite one header field of member ``which`` and fix the checksum, as `tar` would."""
    pos = members(data)[which][0]
    h = bytearray(data[pos:pos + BLOCK])
    h[start:start + len(value)] = value
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    return data[:pos] + bytes(h) + data[pos + BLOCK:]


def _mtime_plus_one(data: bytes) -> bytes:
    m = members(data)[0][1]
    return _header_field(data, 136, f"{m.mtime + 1:011o}".encode() + b"\0")


def _checksum_spelling(data: bytes) -> bytes:
    """'0NNNNN\\0 ' as ' NNNNN\\0 ': the same number, another spelling."""
    pos = members(data)[0][0] + 148
    assert data[pos:pos + 1] == b"0"
    return data[:pos] + b" " + data[pos + 1:]


def _checksum_trailer(data: bytes) -> bytes:
    pos = members(data)[0][0] + 154
    return data[:pos] + b"  " + data[pos + 2:]


def _with_sig(data: bytes, sig: bytes) -> bytes:
    ms = members(data)
    return assemble([(m.name, sig if m.name.endswith(".sig") else content) for _p, m, content in ms],
                    ms[0][1].mtime)


def _rewrap(width: int, newline: bytes = b"\n") -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        sig = next(c for _p, m, c in members(data) if m.name.endswith(".sig"))
        lines = sig.decode().splitlines()
        b64 = "".join(lines[1:-1])
        body = [b64[i:i + width] for i in range(0, len(b64), width)]
        text = newline.join(x.encode() for x in [lines[0], *body, lines[-1]]) + newline
        assert text != sig
        return _with_sig(data, text)
    return change


def _armor_extra_newline(data: bytes) -> bytes:
    sig = next(c for _p, m, c in members(data) if m.name.endswith(".sig"))
    return _with_sig(data, sig + b"\n")


def _base64_padding_bits(data: bytes) -> bytes:
    """The last base64 character before '=' with its unused low bits set: decodes to the same blob."""
    sig = next(c for _p, m, c in members(data) if m.name.endswith(".sig"))
    i = sig.index(b"=")
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    v = alphabet.index(sig[i - 1:i])
    pad = sig.count(b"=")
    changed = sig[:i - 1] + alphabet[v | (0b1111 if pad == 2 else 0b11):][:1] + sig[i:]
    assert changed != sig and base64.b64decode(b"".join(changed.split()[4:-4])) == base64.b64decode(
        b"".join(sig.split()[4:-4]))
    return _with_sig(data, changed)


def _reserved_field(data: bytes) -> bytes:
    """The SSHSIG blob's reserved string (verifiers sign over an empty one) filled in."""
    sig = next(c for _p, m, c in members(data) if m.name.endswith(".sig"))
    blob = sshsig._dearmor(sig)
    assert blob[84:88] == b"\0\0\0\0"  # magic, version, key, namespace before it (Ed25519)
    return _with_sig(data, sshsig._armor("SSH SIGNATURE", blob[:84] + b"\0\0\0\x01x" + blob[88:]))


def _malleated_s(data: bytes) -> bytes:
    """Ed25519 S + L: the same signature equation, another encoding (must not verify)."""
    L = 2**252 + 27742317777372353535851937790883648493
    sig = next(c for _p, m, c in members(data) if m.name.endswith(".sig"))
    blob = sshsig._dearmor(sig)
    s_val = int.from_bytes(blob[-32:], "little") + L
    return _with_sig(data, sshsig._armor("SSH SIGNATURE", blob[:-32] + s_val.to_bytes(32, "little")))


#: name -> (change, error class, what the message says)
ALTERATIONS: dict[str, tuple[Callable[[bytes], bytes], type[ExchangeError], str]] = {
    "mtime": (_mtime_plus_one, FormatError, r"mtime \d+ is not the signed creation time"),
    "checksum leading space": (_checksum_spelling, FormatError, "checksum field differs"),
    "checksum trailing spaces": (_checksum_trailer, FormatError, "checksum field differs"),
    "mode spelling": (lambda d: _header_field(d, 100, b"0000644 "), FormatError, "mode field differs"),
    "uid": (lambda d: _header_field(d, 108, b"0001750\0"), FormatError, "uid field differs"),
    "gid": (lambda d: _header_field(d, 116, b"0001750\0", which=1), FormatError, "gid field differs"),
    "user name": (lambda d: _header_field(d, 265, b"root\0"), FormatError, "user name field differs"),
    "group name": (lambda d: _header_field(d, 297, b"wheel\0", which=1), FormatError, "group name field differs"),
    "ustar version": (lambda d: _header_field(d, 263, b" \0"), FormatError, "version field differs"),
    "device numbers": (lambda d: _header_field(d, 329, b"0000000\0"), FormatError, "device numbers field differs"),
    "size spelling": (lambda d: _header_field(d, 124, f"{members(d)[0][1].size:11o}".encode() + b"\0"),
                      FormatError, "size field differs"),
    "record padding": (lambda d: d + b"\0" * (10240 - len(d) % 10240), FormatError,
                       "unexpected data after the end of the tar archive"),
    "one zero block more": (lambda d: d + b"\0" * BLOCK, FormatError, "unexpected data after the end"),
    "armor wrapped at 76": (_rewrap(76), FormatError, "SSH signature armor differs"),
    "armor wrapped at 64": (_rewrap(64), FormatError, "SSH signature armor differs"),
    "armor CRLF": (_rewrap(70, b"\r\n"), FormatError, "SSH signature armor differs"),
    "armor extra newline": (_armor_extra_newline, FormatError, "SSH signature armor differs"),
    "base64 padding bits": (_base64_padding_bits, FormatError, "SSH signature armor differs"),
    "SSHSIG reserved field": (_reserved_field, FormatError, "SSHSIG reserved field is not empty"),
    "Ed25519 S + L": (_malleated_s, AuthenticityError, "does not match the data"),
}


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A genuine ho -> s001 bundle and a genuine s001 -> ho ack, as the writers make them."""
    bun = seal(tmp_path_factory.mktemp("exact")).path.read_bytes()
    ack = bundle.build_ack(key=world().s001.key, acker="s001", sender="ho", seq=1, bundle_sha256="a" * 64,
                           manifest_sha256="b" * 64, result="APPLIED", created=CREATED,
                           recipients=[world().aud1.recipient])
    return bun, ack


def _trust_file(tmp_path: Path) -> Path:
    p = tmp_path / "allowed_signers"
    p.write_text(world().allowed_signers)
    return p


@pytest.mark.parametrize("kind", ["bundle", "ack"])
@pytest.mark.parametrize("alteration", list(ALTERATIONS))
def test_uncovered_bytes_altered_are_refused(tmp_path: Path, sealed: tuple[bytes, bytes], kind: str,
                                             alteration: str) -> None:
    """Reader and `exchange verify` agree: the altered copy is damage, the genuine one is OK."""
    change, error, match = ALTERATIONS[alteration]
    genuine = sealed[0] if kind == "bundle" else sealed[1]
    name = "ho.s001.0000000001.bundle" if kind == "bundle" else "s001.ho.0000000001.ack"
    good = tmp_path / "good" / name
    bad = tmp_path / "bad" / name
    good.parent.mkdir()
    bad.parent.mkdir()
    good.write_bytes(genuine)
    bad.write_bytes(change(genuine))
    assert bad.read_bytes() != genuine
    w = world()
    with pytest.raises(ExchangeError) as info:
        if kind == "bundle":
            with bundle.open_bundle(bad, trust=w.trust, identities=[w.s001.identity], me="s001",
                                    workdir=tmp_path) as o:
                o.table("sales")
        else:
            bundle.read_ack(bad, w.trust, me="ho")
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {info.value}"
    assert str(info.value).startswith(f"{name}: ")
    assert re.search(match, str(info.value)), str(info.value)
    trust = _trust_file(tmp_path)
    ok = CliRunner().invoke(main, ["verify", str(good), "--trust", str(trust)])
    assert ok.exit_code == 0 and ok.output.startswith(f"OK {name}"), ok.output
    res = CliRunner().invoke(main, ["verify", str(bad), "--trust", str(trust)])
    assert res.exit_code == error.exit_code != 0, res.output
    assert name in res.output and re.search(match, " ".join(res.output.split())), res.output
    assert bad.read_bytes() == change(genuine)  # refused, not repaired or removed


def test_signed_created_differs_from_tar_mtime_even_when_the_checksum_is_right(
        tmp_path: Path, sealed: tuple[bytes, bytes]) -> None:
    """Every header of a bundle or ack carries the signed ``created`` time; any other mtime is
    refused before the signature is checked (an ack's too, from its JSON)."""
    bun, ack = sealed
    for data, name in ((bun, "ho.s001.0000000001.bundle"), (ack, "s001.ho.0000000001.ack")):
        ms = members(data)
        later = assemble([(m.name, c) for _p, m, c in ms], ms[0][1].mtime + 3600)
        p = tmp_path / name
        p.write_bytes(later)
        with pytest.raises(FormatError, match="is not the signed creation time"):
            if name.endswith(".bundle"):
                bundle.BundleReader(p).close()
            else:
                bundle.read_ack(p, world().trust, me="ho")


# ---------------------------------------------------------------- end to end: HO -> store and back

def _one(folder: Path, suffix: str) -> Path:
    found = [p for p in folder.rglob(f"*{suffix}") if p.is_file()]
    assert len(found) == 1, (suffix, found)
    return found[0]


def _sent(net: Net, seq: int = 1) -> Any:
    with net.ho.engine.connect() as conn:
        return conn.execute(select(xchg_sent).where(xchg_sent.c.peer == "s001", xchg_sent.c.seq == seq)).first()


def _resend_now(net: Net) -> None:
    """``resend_after`` passes: the HO's unacknowledged bundles count as uploaded two hours ago,
    so its next sync pushes them again from its archive."""
    with net.ho.engine.begin() as conn:
        conn.execute(update(xchg_sent).where(xchg_sent.c.status == "UPLOADED").values(
            uploaded_at=utc_now() - timedelta(seconds=net.ho.cfg.resend_after + 3600)))


def _reason(node_quarantine: Path, name: str) -> dict[str, Any]:
    reasons = sorted(node_quarantine.glob(f"{name}*.reason"))
    assert reasons, f"no reason file for {name} in {node_quarantine}"
    return json.loads(reasons[-1].read_text())  # type: ignore[no-any-return]


#: case -> (alteration, what `audit verify` says about an archived copy altered so)
E2E = {"mtime": ("mtime", "is not the signed creation time"),
       "checksum spacing": ("checksum leading space", "checksum field differs"),
       "armor line wrap": ("armor wrapped at 76", "SSH signature armor differs")}


@pytest.mark.parametrize("case", list(E2E))
def test_altered_in_transit_then_genuine_copy_applies_and_is_processed(tmp_path: Path, case: str) -> None:
    """A real HO -> s001 net through a dir: transfer folder. The bundle is altered in the
    folder: s001 quarantines it, changing nothing. The HO resends the genuine file: APPLIED,
    acked, PROCESSED at the HO. Then the ack is altered on its way back: the HO quarantines it
    and stays UPLOADED; its next resend reaches s001 as a duplicate, which is re-acked (not
    quarantined as a replay) and the HO reaches PROCESSED. Finally `exchange audit verify`
    reports an archived copy altered the same way as damage."""
    change = ALTERATIONS[E2E[case][0]][0]
    net = make_net(tmp_path / "net", stores=("s001",))
    try:
        seed_ho(net, items=6)
        st = net.store("s001")
        assert not sync(net.ho).errors
        sent_file = _one(net.transfer, ".bundle")
        genuine = sent_file.read_bytes()
        assert _sent(net).status == "UPLOADED"
        sent_file.write_bytes(change(genuine))  # someone with write access to the drop folder

        before = snapshot(st)
        rep = sync(st)
        assert [(o.file, o.status) for o in rep.imported] == [(sent_file.name, "QUARANTINED")], rep.imported
        assert snapshot(st) == before, "an altered bundle changed the store's database"
        assert not list(st.cfg.outbox.iterdir()) and not transfer_files(net.transfer), "an ack went out"
        reason = _reason(st.cfg.quarantine, sent_file.name)
        assert reason["file"] == sent_file.name and reason["error"] in ("FormatError", "AuthenticityError")
        assert sent_file.name in reason["reason"]
        assert (st.cfg.quarantine / sent_file.name).read_bytes() == change(genuine)  # kept, not deleted

        _resend_now(net)
        rep = sync(net.ho)
        assert rep.resent == [sent_file.name], rep
        assert _one(net.transfer, ".bundle").read_bytes() == genuine
        rep = sync(st)
        assert [(o.file, o.status) for o in rep.imported] == [(sent_file.name, "APPLIED")], rep.imported
        ack_file = _one(net.transfer, ".ack")
        genuine_ack = ack_file.read_bytes()
        received = [r for r in status.received(st) if r.peer == "ho"]
        assert sorted((r.seq, r.status) for r in received) == [(1, "APPLIED"), (1, "QUARANTINED")]

        ack_file.write_bytes(change(genuine_ack))  # altered on its way back
        before_ho = snapshot(net.ho)
        rep = sync(net.ho)
        assert [(o.file, o.status) for o in rep.imported if o.file.endswith(".ack")] == [
            (ack_file.name, "QUARANTINED")], rep.imported
        assert _sent(net).status == "UPLOADED", "an altered ack moved the bundle on"
        assert _reason(net.ho.cfg.quarantine, ack_file.name)["file"] == ack_file.name
        assert snapshot(net.ho)["xchg_sent"] != [] and _sent(net).reason is None
        assert before_ho["xchg_stream_in"] == snapshot(net.ho)["xchg_stream_in"]

        # resend_after passes again: the HO's resend is a second genuine copy at s001
        _resend_now(net)
        assert sync(net.ho).resent == [sent_file.name]
        assert _one(net.transfer, ".bundle").read_bytes() == genuine
        rep = sync(st)
        assert [(o.file, o.status) for o in rep.imported] == [(sent_file.name, "DUPLICATE")], rep.imported
        assert sorted(p.name for p in st.cfg.quarantine.iterdir()) == [sent_file.name, sent_file.name + ".reason"], \
            "the genuine copy was quarantined as a replay (only the altered copy may lie there)"
        assert _one(net.transfer, ".ack").read_bytes() == genuine_ack
        rep = sync(net.ho)
        assert _sent(net).status == "PROCESSED", rep.imported
        c = check_stream(net, net.ho, st)
        assert not c.problems, c.problems

        # an archived copy altered the same way: `exchange audit verify` calls it damage
        archived = net.ho.cfg.archive_sent / sent_file.name
        assert archived.read_bytes() == genuine
        trust = net.ho.cfg.home / "keys" / "allowed_signers"
        audit = CliRunner().invoke(main, ["audit", "verify", str(net.ho.cfg.home / "archive"), "--trust",
                                          str(trust), "--json"])
        assert audit.exit_code == 0, audit.output
        archived.write_bytes(change(genuine))
        audit = CliRunner().invoke(main, ["audit", "verify", str(net.ho.cfg.home / "archive"), "--trust",
                                          str(trust), "--json"])
        assert audit.exit_code == 1, audit.output
        report = json.loads(audit.stdout)
        found = [f for s in report["streams"] for f in s["findings"]] + report["general"]
        assert any(f["severity"] == "error" and sent_file.name in json.dumps(f) and E2E[case][1] in f["message"]
                   for f in found), found
    finally:
        net.dispose()


def test_a_second_genuine_copy_is_re_acknowledged(tmp_path: Path) -> None:
    """The duplicate path (importer._place): a copy of an applied bundle, byte for byte the
    one applied, is re-acked with the stored ack, archived under duplicates/, never quarantined."""
    net = make_net(tmp_path / "net", stores=("s001",))
    try:
        seed_ho(net, items=3)
        st = net.store("s001")
        net.settle()
        archived = net.ho.cfg.archive_sent / "ho.s001.0000000001.bundle"
        shutil.copyfile(archived, st.cfg.inbox / archived.name)
        before = snapshot(st)
        out = import_inbox(st)
        assert [(o.file, o.status) for o in out] == [(archived.name, "DUPLICATE")]
        assert snapshot(st) == before
        ack = st.cfg.outbox / "s001.ho.0000000001.ack"
        acked = [p for p in (st.cfg.archive_received, net.ho.cfg.archive_received)
                 for p in p.rglob("s001.ho.0000000001.ack")]
        assert ack.read_bytes() == acked[0].read_bytes()
        assert not st.cfg.quarantine.exists() or not list(st.cfg.quarantine.iterdir())
    finally:
        net.dispose()


def test_a_stream_stuck_on_an_altered_copy_applied_before_is_healed(tmp_path: Path) -> None:
    """A store that applied an altered copy (before readers took only exact bytes) re-acks the genuine one.

    Its stored ack names the altered file's hash, which the HO refuses; the genuine copy the HO resends has the
    same signed manifest, so it is the bundle already applied: acknowledged (never applied again), PROCESSED.
    """
    from exchange.database.tables import xchg_received

    net = make_net(tmp_path / "net", stores=("s001",))
    ho, st = net.ho, net.store()
    seed_ho(net, items=3)
    sync(ho)
    sync(st)  # applied; its ack is on its way back
    for ack in (net.transfer).rglob("s001.ho.*.ack"):
        ack.unlink()  # as if the HO had refused it: it named the altered copy's hash
    altered = "0" * 64
    with st.engine.begin() as conn:
        row = conn.execute(select(xchg_received).where(xchg_received.c.seq == 1)).mappings().one()
        old_ack = bundle.build_ack(key=st.signing_key, acker="s001", sender="ho", seq=1, bundle_sha256=altered,
                                   manifest_sha256=row["manifest_sha256"], result="APPLIED", created=utc_now(),
                                   recipients=st.recipients_for("ho"))
        conn.execute(update(xchg_received).where(xchg_received.c.seq == 1).values(file_sha256=altered,
                                                                                  ack=old_ack))
    before = snapshot(st)
    genuine = next(ho.cfg.archive_sent.rglob("ho.s001.0000000001.bundle"))
    shutil.copyfile(genuine, st.cfg.inbox / genuine.name)
    outs = {o.file: o for o in import_inbox(st)}
    got = outs[genuine.name]
    assert got.status == "DUPLICATE" and "another copy of this signed bundle" in got.reason, got
    assert not list(st.cfg.quarantine.iterdir())
    after = snapshot(st)
    assert {k: v for k, v in after.items() if k != "xchg_received"} == \
        {k: v for k, v in before.items() if k != "xchg_received"}, "nothing applied again"
    sync(st)
    sync(ho)
    assert {r.seq: r.status for r in status.sent(ho) if r.peer == "s001"}[1] == "PROCESSED"
    net.dispose()
