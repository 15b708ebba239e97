"""Bundles and acks that work: round trips, several recipients, and the auditor's walkthrough
of docs/FORMAT.md section 9 run for real with GNU tar, ssh-keygen, age and sha256sum."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from datetime import UTC, date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_bundle import (
    CREATED, events_table, layout, need, open_as, sales_table, seal, world,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange import __version__
from exchange import files
from exchange.errors import CryptoError, NotForUsError
from exchange.wire import bundle
from exchange.wire.formats import BUNDLE_MEMBERS, INNER_MANIFEST, ack_name


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same(got: pa.Table, want: pa.Table) -> None:
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    assert got.equals(want), f"\n{got}\n!=\n{want}"


def _many_batches(batches: int, rows: int) -> tuple[pa.RecordBatchReader, pa.Table]:
    parts = [sales_table(rows, seed=i).to_batches()[0] for i in range(batches)]
    # line_id restarts in every batch: make it unique so order is checked too
    fixed = [b.set_column(0, "line_id", pa.array(range(i * rows, (i + 1) * rows), pa.int64()))
             for i, b in enumerate(parts)]
    return pa.RecordBatchReader.from_batches(fixed[0].schema, iter(fixed)), pa.Table.from_batches(fixed)


# ---------------------------------------------------------------- round trips

def test_round_trip_several_tables(tmp_path: Path) -> None:
    reader, streamed = _many_batches(batches=60, rows=97)
    unicode = pa.table({
        "text": pa.array(["", "a", "é€😀", "中文字符", "e\u0301", "nul\0inside", "tab\tnl\n", None, "ℵ" * 1000],
                         pa.string()),
        "n": pa.array([0, -1, 2**63 - 1, -(2**63), None, 7, 8, 9, 10], pa.int64()),
    })
    times = pa.table({
        "s": pa.array([datetime(1970, 1, 1), datetime(2038, 1, 19, 3, 14, 8), None], pa.timestamp("s")),
        "ms": pa.array([datetime(1900, 1, 1, tzinfo=UTC), None, datetime(2262, 1, 1, tzinfo=UTC)],
                       pa.timestamp("ms", tz="UTC")),
        "ns": pa.array([0, None, 2**62], pa.timestamp("ns", tz="Europe/Paris")),
        "d": pa.array([date(1, 1, 1), date(9999, 12, 31), None], pa.date32()),
        "money": pa.array([Decimal("999999999999.99"), Decimal("-999999999999.99"), None],
                          pa.decimal128(14, 2)),
    })
    empty = sales_table(0)
    tables: dict[str, Any] = {"_events": events_table(5), "sales": sales_table(300, seed=1),
                              "streamed": reader, "unicode ✓": unicode, "times": times, "empty": empty}
    expected = {**tables, "streamed": streamed}
    summary = {"documents": {"sale": {"count": 5, "rows": {"sales": 300}, "totals": {"sales.amount": "1.23"}}}}

    s = bundle.seal_bundle(tmp_path / "ho.s001.0000000001.bundle", key=world().ho.key, sender="ho",
                           recipient="s001", seq=1, prev=None, recipients=[world().s001.recipient],
                           tables=tables, summary=summary, created=CREATED)

    assert s.size == s.path.stat().st_size and s.sha256 == _file_sha(s.path)
    m = s.manifest
    assert (m.sender, m.recipient, m.seq, m.prev, m.created, m.app_version) == \
        ("ho", "s001", 1, None, CREATED, __version__)
    assert [e.name for e in m.inner] == [INNER_MANIFEST] + [f"t{i:04d}.parquet" for i in range(1, 7)]
    assert not [p for p in tmp_path.iterdir() if p != s.path], "seal left scratch files behind"

    w = world()
    with bundle.open_bundle(s.path, trust=w.trust, identities=[w.s001.identity], me="s001") as o:
        assert o.file_sha256 == s.sha256
        assert o.manifest.raw == m.raw and o.signer.principals == ("ho",)
        assert o.summary == summary
        assert [(t["table"], t["rows"]) for t in o.inner["tables"]] == \
            [(name, expected[name].num_rows) for name in tables]
        assert list(o.tables) == list(tables)
        for name, want in expected.items():
            if name == "times":
                # Parquet has no seconds unit: timestamp[s] comes back as timestamp[ms], same instants
                got = o.table(name)
                assert got.schema.field("s").type == pa.timestamp("ms")
                assert got.column("s").cast(pa.timestamp("s")).equals(want.column("s"))
                _assert_same(got.drop_columns(["s"]), want.drop_columns(["s"]))
                continue
            _assert_same(o.table(name), want)
        by_name = {e.name: e for e in m.inner}
        for t in o.inner["tables"]:
            path = o.tables[t["table"]]
            assert path.name == t["file"]
            assert _file_sha(path) == by_name[t["file"]].sha256
            assert path.stat().st_size == by_name[t["file"]].size
        workdir = next(iter(o.tables.values())).parent
        assert pq.ParquetFile(o.tables["streamed"]).metadata.num_rows == 60 * 97
    assert not workdir.exists(), "open_bundle left the decrypted tables behind"


def test_no_tables_and_only_empty_tables(tmp_path: Path) -> None:
    s = seal(tmp_path, tables={}, name="none.bundle")
    got = open_as(s.path)
    assert got["tables"] == {} and [e.name for e in s.manifest.inner] == [INNER_MANIFEST]
    schema_only = pa.RecordBatchReader.from_batches(sales_table(0).schema, iter([]))
    s = seal(tmp_path, tables={"a": sales_table(0), "b": schema_only}, name="empty.bundle")
    got = open_as(s.path)
    for name in ("a", "b"):
        _assert_same(got["tables"][name], sales_table(0))


def test_large_multi_chunk_payload(tmp_path: Path) -> None:
    table = sales_table(400, seed=3, blob_bytes=2000)  # ~800 KB of random bytes: ~13 age chunks
    s = seal(tmp_path, tables={"big": table})
    assert s.manifest.payload.size > 10 * 65536
    _assert_same(open_as(s.path)["tables"]["big"], table)


def test_step_by_step_reader(tmp_path: Path) -> None:
    s = seal(tmp_path)
    w = world()
    with bundle.BundleReader(s.path) as r:
        assert r.manifest.raw == s.manifest.raw
        assert r.verify_signature(w.trust).principals == ("ho",)
        r.check_recipient("s001")
        r.check_major()
        assert r.check_payload_hash() == s.sha256  # no key needed to check the ciphertext
    with bundle.BundleReader(s.path) as r:
        with pytest.raises(Exception, match="signature not verified"):
            r.decrypt([w.s001.identity], tmp_path)


def test_multi_recipient_everyone_sees_the_same_tables(tmp_path: Path) -> None:
    w = world()
    tables = {"_events": events_table(4), "sales": sales_table(150, seed=9, blob_bytes=500)}
    s = seal(tmp_path, tables=tables, recipients=[w.s001.recipient, w.aud1.recipient, w.aud2.recipient])
    seen = {who: open_as(s.path, who, me="s001" if who == "s001" else None) for who in ("s001", "aud1", "aud2")}
    for who, got in seen.items():
        assert got["file_sha256"] == s.sha256, who
        assert got["manifest"].raw == s.manifest.raw, who
        for name, want in tables.items():
            _assert_same(got["tables"][name], want)
    assert seen["aud1"]["inner"] == seen["aud2"]["inner"] == seen["s001"]["inner"]
    with pytest.raises(NotForUsError, match="addressed to 's001'"):
        open_as(s.path, "aud1", me="aud1")  # an auditor reads with me=None
    with pytest.raises(CryptoError, match="no identity matches any of the 3 recipient stanzas"):
        open_as(s.path, "s002", me=None)


def test_ack_round_trip(tmp_path: Path) -> None:
    w = world()
    s = seal(tmp_path)
    for result, reason, parked in (("APPLIED", None, []),
                                   ("REJECTED", "stream gap: expected seq 1",
                                    [{"doc_type": "sale", "doc_key": '["7"]', "error": "bad sku ✗"}])):
        data = bundle.build_ack(key=w.s001.key, acker="s001", sender="ho", seq=1, bundle_sha256=s.sha256,
                                manifest_sha256=s.manifest.sha256, result=result, reason=reason,
                                applied={"sale": {"count": 3}}, parked=parked, created=CREATED,
                                recipients=[w.aud1.recipient])
        path = tmp_path / ack_name("s001", "ho", 1)
        files.write_file_atomic(path, data)
        sealed = bundle.read_ack(path, w.trust, me="ho")  # without an identity: the figures stay encrypted
        assert (sealed.result, sealed.reason, sealed.applied, sealed.details) == (result, None, {}, "sealed")
        ack = bundle.read_ack(path, w.trust, me="ho", identities=[w.aud1.identity])
        assert (ack.acker, ack.sender, ack.seq, ack.bundle_sha256, ack.manifest_sha256) == \
            ("s001", "ho", 1, s.sha256, s.manifest.sha256)
        assert (ack.result, ack.reason, ack.parked, ack.created) == (result, reason, parked, CREATED)
        assert ack.applied == {"sale": {"count": 3}} and ack.app_version == __version__
        assert ack.file_sha256 == hashlib.sha256(data).hexdigest()
        assert not path.with_name(path.name + ".part").exists()


def test_huge_ack_keeps_the_first_parked_documents(tmp_path: Path) -> None:
    w = world()
    parked = [{"doc_type": "sale", "doc_key": f'["{i}"]', "error": "x" * 200} for i in range(6000)]
    data = bundle.build_ack(key=w.s001.key, acker="s001", sender="ho", seq=1, bundle_sha256="0" * 64,
                            manifest_sha256=None, result="APPLIED", parked=parked, created=CREATED,
                            recipients=[w.aud1.recipient])
    path = tmp_path / "s001.ho.0000000001.ack"
    path.write_bytes(data)
    ack = bundle.read_ack(path, w.trust, me="ho", identities=[w.aud1.identity])
    assert ack.parked == parked[:1000] and ack.parked_total == 6000


# ---------------------------------------------------------------- the auditor's walkthrough, for real

def _run(*args: str | Path, cwd: Path, stdin: bytes | None = None, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run([str(a) for a in args], cwd=cwd, input=stdin, capture_output=True, timeout=120,
                         check=False)
    if ok:
        assert res.returncode == 0, f"{args}: rc={res.returncode}\n{res.stderr.decode(errors='replace')}"
    return res


def test_auditors_walkthrough_with_standard_tools(tmp_path: Path) -> None:
    """docs/FORMAT.md section 9, command by command (jq replaced by Python when absent)."""
    tar, ssh_keygen, age_bin, sha256sum = need("tar"), need("ssh-keygen"), need("age"), need("sha256sum")
    w = world()
    tables = {"_events": events_table(6), "sales": sales_table(250, seed=5, blob_bytes=300),
              "empty": sales_table(0)}
    s = seal(tmp_path, tables=tables, seq=42,
             recipients=[w.s001.recipient, w.aud1.recipient, w.aud2.recipient])
    assert s.path.name == "ho.s001.0000000042.bundle"
    (tmp_path / "allowed_signers").write_text(w.allowed_signers)
    (tmp_path / "auditor.key").write_text(f"# created: test\n# public key: {w.aud1.recipient}\n{w.aud1.identity}\n")

    # the outer tar: exactly three plain members, mode 0644, owner 0/0, mtime = created
    listing = _run(tar, "--numeric-owner", "--full-time", "-tvf", s.path, cwd=tmp_path)
    lines = listing.stdout.decode().splitlines()
    assert [ln.split()[-1] for ln in lines] == list(BUNDLE_MEMBERS)
    for ln in lines:
        mode, owner, _size, _day, _clock, _name = ln.split()
        assert (mode, owner) == ("-rw-r--r--", "0/0")
    b = tmp_path / "b"
    b.mkdir()
    _run(tar, "-xf", s.path, "-C", b, cwd=tmp_path)
    assert sorted(p.name for p in b.iterdir()) == sorted(BUNDLE_MEMBERS)
    assert datetime.fromtimestamp((b / "manifest.json").stat().st_mtime, UTC) == CREATED

    # who signed it, and was that key trusted at the time?
    manifest = (b / "manifest.json").read_bytes()
    res = _run(ssh_keygen, "-Y", "verify", "-f", "../allowed_signers", "-I", "ho", "-n", "exchange-bundle",
               "-s", "manifest.json.sig", cwd=b, stdin=manifest)
    assert b"Good \"exchange-bundle\" signature for ho" in res.stdout + res.stderr
    for principal, data in (("s001", manifest), ("ho", manifest.replace(b'"seq": 42', b'"seq": 43'))):
        bad = _run(ssh_keygen, "-Y", "verify", "-f", "../allowed_signers", "-I", principal, "-n",
                   "exchange-bundle", "-s", "manifest.json.sig", cwd=b, stdin=data, ok=False)
        assert bad.returncode != 0, f"ssh-keygen accepted a signature for {principal} / altered data"

    # the ciphertext is the one that was signed
    if shutil.which("jq"):
        signed_sha = _run("jq", "-r", ".payload.sha256", "manifest.json", cwd=b).stdout.decode().strip()
        inner_lines = _run("jq", "-r", '.inner[] | "\\(.sha256)  inner/\\(.name)"', "manifest.json",
                           cwd=b).stdout
    else:
        obj = json.loads(manifest)
        signed_sha = obj["payload"]["sha256"]
        inner_lines = "".join(f"{e['sha256']}  inner/{e['name']}\n" for e in obj["inner"]).encode()
    assert signed_sha == s.manifest.payload.sha256
    assert _run(sha256sum, "payload.tar.age", cwd=b).stdout.decode().split()[0] == signed_sha

    # decrypt and check every inner file against the signed list
    with open(b / "payload.tar", "wb") as out:
        res = subprocess.run([age_bin, "-d", "-i", "../auditor.key", "payload.tar.age"], cwd=b, stdout=out,
                             stderr=subprocess.PIPE, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    (b / "inner").mkdir()
    _run(tar, "-xf", "payload.tar", "-C", "inner", cwd=b)
    assert sorted(p.name for p in (b / "inner").iterdir()) == sorted(e.name for e in s.manifest.inner)
    res = _run(sha256sum, "-c", cwd=b, stdin=inner_lines)
    assert res.stdout.decode().count(": OK") == len(s.manifest.inner)
    bad_lines = inner_lines.replace(inner_lines[:1], b"f" if inner_lines[:1] != b"f" else b"e", 1)
    assert _run(sha256sum, "-c", cwd=b, stdin=bad_lines, ok=False).returncode != 0

    # cat inner/inner.json; read the Parquet files with plain pyarrow
    inner = json.loads((b / "inner" / "inner.json").read_text())
    assert (inner["format"], inner["sender"], inner["recipient"], inner["seq"]) == \
        ("exchange-payload", "ho", "s001", 42)
    for t in inner["tables"]:
        _assert_same(pq.read_table(b / "inner" / t["file"]), tables[t["table"]])
    py = _run(os.environ.get("PYTHON", shutil.which("python3") or "python3"), "-c",
              'import pyarrow.parquet as pq; print(pq.read_table("inner/t0002.parquet").num_rows)',
              cwd=b, ok=False)
    if py.returncode == 0:  # the system python3 may have no pyarrow; the venv check above is the real one
        assert py.stdout.strip() == b"250"


def test_ack_verifies_with_standard_tools(tmp_path: Path) -> None:
    tar, ssh_keygen = need("tar"), need("ssh-keygen")
    w = world()
    age_bin = need("age")
    data = bundle.build_ack(key=w.s001.key, acker="s001", sender="ho", seq=3, bundle_sha256="a" * 64,
                            manifest_sha256="b" * 64, result="REJECTED", created=CREATED, reason="bad sku",
                            recipients=[w.aud1.recipient])
    (tmp_path / "s001.ho.0000000003.ack").write_bytes(data)
    (tmp_path / "allowed_signers").write_text(w.allowed_signers)
    _run(tar, "-xf", "s001.ho.0000000003.ack", cwd=tmp_path)
    res = _run(ssh_keygen, "-Y", "verify", "-f", "allowed_signers", "-I", "s001", "-n", "exchange-bundle",
               "-s", "ack.json.sig", cwd=tmp_path, stdin=(tmp_path / "ack.json").read_bytes())
    assert b"Good" in res.stdout + res.stderr
    # the encrypted details: the member signed in ack.json, readable with the auditor's key and age(1)
    clear = json.loads((tmp_path / "ack.json").read_text())
    sealed = (tmp_path / "details.json.age").read_bytes()
    assert hashlib.sha256(sealed).hexdigest() == clear["details"]["sha256"] and b"bad sku" not in data
    (tmp_path / "auditor.key").write_text(f"{w.aud1.identity}\n")
    plain = _run(age_bin, "-d", "-i", "auditor.key", "details.json.age", cwd=tmp_path).stdout
    assert hashlib.sha256(plain).hexdigest() == clear["details_plain_sha256"]
    assert json.loads(plain)["reason"] == "bad sku"


def test_age_keygen_identity_opens_a_bundle(tmp_path: Path) -> None:
    """An auditor key made by the stock age-keygen works with our reader."""
    keygen = need("age-keygen")
    _run(keygen, "-o", "aud.key", cwd=tmp_path)
    text = (tmp_path / "aud.key").read_text()
    identity = next(ln for ln in text.splitlines() if ln.startswith("AGE-SECRET-KEY-1"))
    recipient = next(ln.split(": ")[1] for ln in text.splitlines() if ln.startswith("# public key"))
    w = world()
    s = seal(tmp_path, recipients=[w.s001.recipient, recipient])
    with bundle.open_bundle(s.path, trust=w.trust, identities=[identity], me=None) as o:
        assert o.table("_events").equals(events_table(3))


# ---------------------------------------------------------------- property: random tables round-trip

_UTC = timezone.utc
_VALUES: dict[str, tuple[pa.DataType, st.SearchStrategy[Any]]] = {
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "string": (pa.string(), st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)),
    "decimal": (pa.decimal128(14, 2), st.decimals(min_value=Decimal("-999999999999.99"),
                                                  max_value=Decimal("999999999999.99"), places=2,
                                                  allow_nan=False, allow_infinity=False)),
    "bool": (pa.bool_(), st.booleans()),
    "date32": (pa.date32(), st.dates()),
    "timestamp": (pa.timestamp("us", tz="UTC"), st.datetimes(timezones=st.just(_UTC))),
}


@st.composite
def _tables(draw: st.DrawFn) -> dict[str, pa.Table]:
    count = draw(st.integers(1, 4))
    names = draw(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
                          min_size=count, max_size=count, unique=True))
    out = {}
    for name in names:
        rows = draw(st.integers(0, 200))
        kinds = draw(st.lists(st.sampled_from(sorted(_VALUES)), min_size=1, max_size=5))
        cols = {}
        for i, kind in enumerate(kinds):
            typ, values = _VALUES[kind]
            cols[f"c{i}_{kind}"] = pa.array(
                draw(st.lists(st.none() | values, min_size=rows, max_size=rows)), typ)
        out[name] = pa.table(cols)
    return out


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(tables=_tables(), streamed=st.booleans())
def test_random_tables_round_trip(tmp_path: Path, tables: dict[str, pa.Table], streamed: bool) -> None:
    sources: dict[str, Any] = {
        name: (pa.RecordBatchReader.from_batches(t.schema, t.to_batches(max_chunksize=37)) if streamed else t)
        for name, t in tables.items()}
    s = seal(tmp_path, tables=sources, name="prop.bundle")
    w = world()
    with bundle.open_bundle(s.path, trust=w.trust, identities=[w.s001.identity], me="s001") as o:
        assert list(o.tables) == list(tables)
        by_file = {e.name: e.sha256 for e in s.manifest.inner}
        for t in o.inner["tables"]:
            assert _file_sha(o.tables[t["table"]]) == by_file[t["file"]]
        for name, want in tables.items():
            _assert_same(o.table(name), want)
    lay = layout(s.path.read_bytes())
    assert hashlib.sha256(lay.payload).hexdigest() == s.manifest.payload.sha256
    s.path.unlink()
