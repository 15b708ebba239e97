"""Size and decompression bombs at the importer: refused from headers and metadata, in bounded
memory and time (docs/FORMAT.md sections 2-4: limits are checked before the work they bound).

Every bomb is dropped into a real store's (or, for acks, the HO's) inbox and run
through ``import_inbox``; it must end QUARANTINED with a reason naming the limit,
within ``SECONDS`` and ``EXTRA_MEMORY`` more than the process used before the
case. Memory is the peak resident size (Linux: VmHWM, reset through
/proc/self/clear_refs before each case, so native allocations such as Arrow's
count too); where that is not available, tracemalloc's peak of Python
allocations. The bombs that need a trusted signature (everything past the
outer manifest) are signed with the HO's real key and encrypted to the store,
as a compromised or buggy HO could do.

``test_limits_summary`` prints the figures (pytest -s).
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from enginehelpers import Net, add_item, make_net
from helpers_bundle import assemble, layout, raw_header, resign

from exchange.database.capture import record_events
from exchange.errors import LimitError
from exchange.node.home import Node
from exchange.receive.importer import import_inbox
from exchange.send.export import export_all
from exchange.wire import bundle, signed, tarfmt
from exchange.wire.crypto import age, sshsig
from exchange.wire.formats import (
    ACK_MEMBERS, BUNDLE_MEMBERS, MAX_INNER_MANIFEST_BYTES, MAX_MANIFEST_BYTES, MAX_TABLE_BYTES, SIG_NAMESPACE,
)

SECONDS = 5.0
EXTRA_MEMORY = 64 << 20
NAME = "ho.s001.0000000001.bundle"
ACK = "s001.ho.0000000001.ack"
FIGURES: dict[str, tuple[float, int, str]] = {}


# ---------------------------------------------------------------- measuring

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False


RSS = _can_reset_peak()


def measure(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """(result, seconds, peak bytes above the starting point) of ``fn()``."""
    gc.collect()
    if RSS:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = _status_kb("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        took = time.perf_counter() - t0
        return out, took, max(_status_kb("VmHWM") - start, 0)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        out = fn()
        took = time.perf_counter() - t0
        return out, took, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------- the world

@dataclass
class World:
    net: Net
    genuine: bytes  # ho.s001.0000000001.bundle, as exported
    ack: bytes  # s001.ho.0000000001.ack for it
    inner: list[tuple[str, bytes]]
    recipient: str  # s001's age recipient

    @property
    def ho(self) -> Node:
        return self.net.ho

    @property
    def store(self) -> Node:
        return self.net.store("s001")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("limits")
    net = make_net(root / "net", stores=("s001",))
    with net.ho.engine.begin() as conn:
        add_item(conn, "I0000001")
        record_events(conn, "item", [("I0000001",)])
    export_all(net.ho)
    genuine = (net.ho.cfg.outbox / NAME).read_bytes()
    st = net.store("s001")
    out = io.BytesIO()
    age.decrypt(io.BytesIO(layout(genuine).payload), out, st.identities)
    src, inner = io.BytesIO(out.getvalue()), []
    while (m := tarfmt.read_header(src)) is not None:
        inner.append((m.name, src.read(m.size)))
        tarfmt.skip_padding(src, m.size)
    # the genuine ack, made on a scratch copy of the store so the store itself stays at seq 0
    ack = bundle.build_ack(key=st.signing_key, acker="s001", sender="ho", seq=1,
                           bundle_sha256=hashlib.sha256(genuine).hexdigest(),
                           manifest_sha256=hashlib.sha256(layout(genuine).manifest).hexdigest(),
                           result="APPLIED", recipients=[st.cfg.peer("ho").recipient])
    recipient = (st.cfg.keys_dir / "node.age.pub").read_text().strip()
    yield World(net, genuine, ack, inner, recipient)
    net.dispose()


def run_bomb(world: World, label: str, make: Callable[[Path], None], error: str, match: str,
             *, ack: bool = False) -> None:
    """Write the bomb with ``make(path)``, import it, check the refusal and the figures."""
    node = world.ho if ack else world.store
    path = node.cfg.inbox / (ACK if ack else NAME)
    make(path)
    size = path.stat().st_size
    try:
        outs, took, extra = measure(lambda: import_inbox(node))
        assert [o.status for o in outs] == ["QUARANTINED"], outs
        reason = json.loads((node.cfg.quarantine / path.name).with_name(path.name + ".reason").read_text())
        assert reason["error"] == error and re.search(match, reason["reason"]), reason
        FIGURES[label] = (took, extra, f"{size:,} bytes -> {error}")
        assert took < SECONDS, f"{label}: {took:.2f} s"
        assert extra < EXTRA_MEMORY, f"{label}: {extra >> 20} MiB more memory"
    finally:
        for p in node.cfg.quarantine.iterdir():
            p.unlink()
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- building bombs

def _seal(world: World, path: Path, tables: dict[str, Any], files: dict[str, tuple[Path, int]]) -> None:
    """A bundle ho -> s001 seq 1 signed by the HO; ``files`` are Parquet files used as they are."""
    cache = bundle.ParquetCache(path.parent.parent / ".work")
    try:
        sources = dict(tables)
        for name, (f, rows) in files.items():
            token = object()
            cache.put(token, f, rows)
            sources[name] = token
        sealed = bundle.seal_bundle(path.with_name(path.name + ".tmp"), key=world.ho.signing_key, sender="ho",
                                    recipient="s001", seq=1, prev=None, recipients=[world.recipient],
                                    tables=sources, summary={"documents": {}}, parquet_cache=cache)
        sealed.path.replace(path)
    finally:
        cache.close()


def _events() -> pa.Table:
    """One item upserted: the importer would read the ``item`` table to apply it."""
    return pa.table({"doc_type": pa.array(["item"], pa.string()), "doc_key": pa.array(['["I0000001"]'], pa.string()),
                     "op": pa.array(["U"], pa.string()), "version": pa.array([1], pa.int64())})


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def patch_footer(data: bytes, old: int, new: int, count: int) -> bytes:
    """Replace every i64 field holding ``old`` (Thrift compact: header 0x16, zigzag varint) in the
    Parquet footer by ``new``, and fix the footer length. ``count`` occurrences are expected."""
    flen = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - flen
    footer = data[start:-8]
    a, b = b"\x16" + _varint(old << 1), b"\x16" + _varint(new << 1)
    assert footer.count(a) == count, (footer.count(a), count)
    footer = footer.replace(a, b)
    return data[:start] + footer + len(footer).to_bytes(4, "little") + b"PAR1"


def _small_parquet(rows: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": pa.array(range(rows), pa.int64())}), buf, compression="zstd")
    return buf.getvalue()


def _resign_inner(world: World, path: Path, members: list[tuple[str, bytes]]) -> None:
    """The genuine bundle with another inner tar, listed, encrypted to s001 and signed by the HO."""
    lay = layout(world.genuine)
    plain = io.BytesIO()
    for name, data in members:
        tarfmt.write_member(plain, name, data, lay.mtime)
    plain.write(tarfmt.END)
    payload = io.BytesIO()
    age.encrypt(io.BytesIO(plain.getvalue()), payload, [world.recipient])

    def listing(obj: dict[str, Any]) -> None:
        obj["inner"] = [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in members]
    path.write_bytes(resign(world.genuine, world.ho.signing_key, listing, payload=payload.getvalue()))


def _flood(path: Path, members: int, head: bytes = b"", name: bytes = b"x") -> None:
    """``head`` followed by ``members`` empty tar members, written in 8 MiB pieces."""
    block = raw_header(name, 0)
    piece = block * 16384
    with open(path, "wb") as f:
        f.write(head)
        left = members
        while left:
            n = min(left, 16384)
            f.write(piece if n == 16384 else block * n)
            left -= n
        f.write(tarfmt.END)


# ---------------------------------------------------------------- Parquet

@pytest.fixture(scope="module")
def rle_bomb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A real Parquet file of ~1 MB: 560 million null int64 values (RLE), 4.5 GB once decoded."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.parquet"
    n = 10_000_000
    chunk = pa.table({"x": pa.nulls(n, pa.int64())})
    with pq.ParquetWriter(path, chunk.schema, compression="zstd") as w:
        for _ in range(56):
            w.write_table(chunk, row_group_size=n)
    del chunk
    return path, 56 * n


def test_parquet_rle_bomb_refused_from_metadata(world: World, rle_bomb: tuple[Path, int]) -> None:
    path, rows = rle_bomb
    meta = pq.read_metadata(path)
    # the uncompressed sizes in the footer are small: only the value count tells the real size
    assert sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) < MAX_TABLE_BYTES // 1000
    assert path.stat().st_size < 4 << 20 and rows * 8 > MAX_TABLE_BYTES
    run_bomb(world, "Parquet: 560 M null int64 (RLE), 4.5 GB decoded",
             lambda p: _seal(world, p, {"_events": _events()}, {"item": (path, rows)}),
             "LimitError", r"expand to more than 4096 MiB")


def test_parquet_footer_claiming_huge_row_counts(world: World, tmp_path: Path) -> None:
    rows, claim = 4093, 1_000_000_000
    data = patch_footer(_small_parquet(rows), rows, claim, count=3)  # file num_rows, row group, column
    f = tmp_path / "claims.parquet"
    f.write_bytes(data)
    assert pq.read_metadata(f).num_rows == claim and f.stat().st_size < 64 << 10
    run_bomb(world, "Parquet footer: 32 KB claiming 1 G int64 rows",
             lambda p: _seal(world, p, {"_events": _events()}, {"item": (f, claim)}),
             "LimitError", r"expand to more than 4096 MiB")


def test_parquet_footer_claiming_huge_row_group_size(world: World, tmp_path: Path) -> None:
    data = _small_parquet(100)
    size = pq.read_metadata(io.BytesIO(data)).row_group(0).total_byte_size
    f = tmp_path / "claims.parquet"
    f.write_bytes(patch_footer(data, size, 6 << 30, count=2))  # the row group and its one column chunk
    assert pq.read_metadata(f).row_group(0).total_byte_size == 6 << 30
    run_bomb(world, "Parquet footer: row group claiming 6 GiB",
             lambda p: _seal(world, p, {"_events": _events()}, {"item": (f, 100)}),
             "LimitError", r"expand to more than 4096 MiB")


# ---------------------------------------------------------------- Parquet whose footer lies

def _dictionary_bomb(rows: int, value_bytes: int) -> bytes:
    """``rows`` copies of one ``value_bytes`` string, as a dictionary page and RLE indices, without
    the Arrow schema (so a reader expands it): a few hundred bytes that decode to rows x value."""
    arr = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["n" * value_bytes]))
    key = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["I1"]))
    buf = io.BytesIO()  # with the item's key column, so its schema passes (docs/CATALOG.md) and decoding is reached
    pq.write_table(pa.table({"item_id": key, "name": arr}), buf, compression="zstd", store_schema=False,
                   dictionary_pagesize_limit=64 << 20)
    return buf.getvalue()


def test_parquet_dictionary_strings_decoding_past_the_budget(world: World, tmp_path: Path) -> None:
    """10,000 copies of a 512 KiB string: the footer is honest (0.5 MiB of pages, 10,000 values)
    and its estimate small, but the strings decode to 5 GiB. Sized from the dictionary's value
    lengths and the indices, before one value is copied out."""
    f = tmp_path / "dict.parquet"
    f.write_bytes(_dictionary_bomb(10_000, 512 << 10))
    meta = pq.read_metadata(f)
    assert bundle.parquet_expanded_size(meta) < 16 << 20 and f.stat().st_size < 4096
    run_bomb(world, "Parquet: one 512 KiB string x 10,000 (dictionary), 5 GiB decoded",
             lambda p: _seal(world, p, {"_events": _events()}, {"item": (f, 10_000)}),
             "LimitError", r"t0002\.parquet: tables decode to more than 4096 MiB \(limit per bundle\); decoding stopped")


def test_parquet_footer_understating_value_counts(world: World, rle_bomb: tuple[Path, int],
                                                  tmp_path: Path) -> None:
    """The RLE bomb with every row group's and column chunk's count patched from 10 M to 1,000:
    the footer's estimate is tiny, the pages hold 560 M values. Refused from the page headers."""
    path, rows = rle_bomb
    data = patch_footer(path.read_bytes(), 10_000_000, 1_000, count=112)  # 56 row groups + 56 chunks
    f = tmp_path / "understated.parquet"
    f.write_bytes(data)
    assert bundle.parquet_expanded_size(pq.read_metadata(f)) < 1 << 20
    run_bomb(world, "Parquet footer: 560 M values stated as 56,000",
             lambda p: _seal(world, p, {"_events": _events()}, {"item": (f, rows)}),
             "FormatError", r"t0002\.parquet: Parquet footer claims 1000 values in \d+ bytes for column x, "
                            r"its pages hold 10000000 values")


def test_parquet_footer_understating_page_sizes(world: World, tmp_path: Path) -> None:
    """A column chunk whose footer states 1/100 of its uncompressed bytes (what the old estimate
    trusted): the page headers, which Arrow decompresses to, tell the truth."""
    rows = 100_000
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": pa.array(range(rows), pa.int64())}), buf, compression="zstd")
    size = pq.read_metadata(io.BytesIO(buf.getvalue())).row_group(0).column(0).total_uncompressed_size
    f = tmp_path / "small-claims.parquet"
    f.write_bytes(patch_footer(buf.getvalue(), size, size // 100, count=2))  # the chunk and its row group
    run_bomb(world, "Parquet footer: page bytes stated as 1/100",
             lambda p: _seal(world, p, {"_events": _events()}, {"item": (f, rows)}),
             "FormatError", rf"Parquet footer claims {rows} values in {size // 100} bytes .* its pages hold "
                            rf"{rows} values in {size} bytes")


def test_parquet_encoding_exchange_never_writes(world: World, tmp_path: Path) -> None:
    """DELTA_BYTE_ARRAY shares prefixes between values, so a page can expand without a bound its
    header shows: only the encodings exchange's writers produce are decoded."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"name": pa.array(["x" * 100 + str(i) for i in range(1000)])}), buf,
                   use_dictionary=False, column_encoding={"name": "DELTA_BYTE_ARRAY"})
    f = tmp_path / "delta.parquet"
    f.write_bytes(buf.getvalue())
    run_bomb(world, "Parquet: a DELTA_BYTE_ARRAY page",
             lambda p: _seal(world, p, {"_events": _events()}, {"item": (f, 1000)}),
             "FormatError", r"Parquet page encoding 7 is not one exchange writes")


def test_parquet_dictionary_bomb_is_an_audit_finding(tmp_path: Path) -> None:
    """`exchange audit` recomputes control totals with the same bounded reader: the bomb is a
    problem it reports, not an exception or gigabytes of memory."""
    from exchange.audit.verify import check_totals

    f = tmp_path / "t0001.parquet"
    f.write_bytes(_dictionary_bomb(10_000, 512 << 10))
    inner = {"summary": {"documents": {"item": {"count": 0, "rows": {"item": 10_000},
                                                  "totals": {"item.name": "0"}}}}}
    problems, took, extra = measure(lambda: check_totals(inner, {"item": f}))
    assert problems == ["item: total item.name: t0001.parquet: tables decode to more than 4096 MiB "
                        "(limit per bundle); decoding stopped"], problems
    assert took < SECONDS and extra < EXTRA_MEMORY


@pytest.mark.parametrize("layout_", ["dictionary pages (writers before 2026-12-01)", "many row groups"])
def test_parquet_genuine_files_read_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout_: str) -> None:
    """The bounded reader changes nothing for a genuine file: dictionary-encoded strings (as
    exchange wrote them before 2026-12-01) come back as plain strings, several row groups as one
    table, every value equal."""
    from helpers_bundle import events_table, open_as, sales_table, seal
    from helpers_bundle import world as parties

    table = sales_table(30_000, seed=5)
    table = table.append_column("shop", pa.array([f"shop-{i % 7}" * 3 for i in range(30_000)], pa.string()))
    source: Any = table
    if layout_.startswith("dictionary"):
        monkeypatch.setitem(bundle.PARQUET_OPTIONS, "use_dictionary", True)
        monkeypatch.setitem(bundle.PARQUET_OPTIONS, "write_statistics", True)
    else:
        source = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=4_000))
    sealed = seal(tmp_path, tables={"_events": events_table(3), "sales": source})
    got = open_as(sealed.path)["tables"]["sales"]
    assert got.schema == table.schema and got.equals(table)
    # and the layout under test is really there
    lay = layout(sealed.path.read_bytes())
    plain = io.BytesIO()
    age.decrypt(io.BytesIO(lay.payload), plain, [parties().s001.identity])
    src, files = io.BytesIO(plain.getvalue()), {}
    while (m := tarfmt.read_header(src)) is not None:
        files[m.name] = src.read(m.size)
        tarfmt.skip_padding(src, m.size)
    meta = pq.read_metadata(io.BytesIO(files["t0002.parquet"]))
    if layout_.startswith("dictionary"):
        assert any("RLE_DICTIONARY" in meta.row_group(0).column(j).encodings for j in range(meta.num_columns))
    else:
        assert meta.num_row_groups == 8


def test_parquet_running_budget_spans_the_bundle_and_each_table(tmp_path: Path) -> None:
    """The budget is the bundle's: two tables that each fit are refused together once they
    decode past it (row group by row group, the second table stops); and a table decoding to
    more than its page headers allow (here: a plan understating it) is a FormatError."""
    from exchange.wire import parquet_budget

    f = tmp_path / "t0001.parquet"
    f.write_bytes(_small_parquet(100_000))  # 800 KB of int64 once decoded
    plan = parquet_budget.scan(f)
    assert plan.decoded >= 800_000  # an upper bound of what decoding holds
    budget = parquet_budget.Budget(1_200_000)
    assert parquet_budget.read_table(f, plan, budget).num_rows == 100_000
    with pytest.raises(LimitError, match=r"t0001\.parquet: tables decode to more than 1 MiB"):
        parquet_budget.read_table(f, plan, budget)
    big = tmp_path / "t0002.parquet"
    big.write_bytes(_small_parquet(400_000))  # 3.2 MB decoded: past the table slack of 1 MiB
    lying = parquet_budget.FilePlan([parquet_budget.RowGroupPlan(decoded=0)])
    with pytest.raises(bundle.FormatError, match=r"row group 0 decodes to \d+ bytes, more than its pages hold"):
        parquet_budget.read_table(big, lying, parquet_budget.Budget(MAX_TABLE_BYTES))


#: the documented memory limit of an import (docs/PERFORMANCE.md: peak RSS < 200 MiB)
IMPORT_RSS_LIMIT = 200 << 20
#: VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the forked copy of the parent
#: (the test process, hundreds of MiB after the bombs above); VmHWM is the new image's own peak
_CHILD = """
import json, sys
from pathlib import Path
from exchange.receive.importer import import_inbox
from exchange.node.home import Node
out = import_inbox(Node.open(Path(sys.argv[1])))
hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) * 1024
print(json.dumps({"status": [o.status for o in out], "reason": [o.reason for o in out], "peak": peak}))
"""


def _import_in_child(node: Node) -> dict[str, Any]:
    """``import_inbox`` of ``node`` in a fresh interpreter: its peak RSS, Arrow's native memory included."""
    node.engine.dispose()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(node.cfg.home)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", ["dictionary strings, 5 GiB decoded", "footer understating 560 M values"])
def test_parquet_lying_file_peak_rss_in_a_child(world: World, rle_bomb: tuple[Path, int], tmp_path: Path,
                                                case: str) -> None:
    """The worst decoding cases, imported by a child process: quarantined, and the child's peak RSS
    (VmHWM: the interpreter, pyarrow, the database and the bomb) under the limit."""
    node = world.store
    f = tmp_path / "bomb.parquet"
    if case.startswith("dictionary"):
        f.write_bytes(_dictionary_bomb(10_000, 512 << 10))
        rows = 10_000
    else:
        path, rows = rle_bomb
        f.write_bytes(patch_footer(path.read_bytes(), 10_000_000, 1_000, count=112))
    inbox = node.cfg.inbox / NAME
    _seal(world, inbox, {"_events": _events()}, {"item": (f, rows)})
    try:
        got = _import_in_child(node)
        assert got["status"] == ["QUARANTINED"], got
        FIGURES[f"child peak RSS: {case}"] = (0.0, got["peak"], f"limit {IMPORT_RSS_LIMIT >> 20} MiB")
        print(f"\n{case}: child peak RSS {got['peak'] / 2**20:.1f} MiB ({got['reason'][0][:120]})")
        assert got["peak"] < IMPORT_RSS_LIMIT, f"{got['peak'] >> 20} MiB"
    finally:
        for p in node.cfg.quarantine.iterdir():
            p.unlink()
        inbox.unlink(missing_ok=True)


# ---------------------------------------------------------------- JSON

def test_outer_manifest_nested_a_million_deep(world: World) -> None:
    raw = b"[" * (MAX_MANIFEST_BYTES - 1) + b"\n"
    run_bomb(world, "manifest.json: 1 MiB of '[' (signed)",
             lambda p: p.write_bytes(resign(world.genuine, world.ho.signing_key, manifest_raw=raw)),
             "LimitError", r"nested too deeply")


def test_outer_manifest_over_its_size_limit(world: World) -> None:
    obj = json.loads(layout(world.genuine).manifest)
    obj["pad"] = "x" * MAX_MANIFEST_BYTES
    run_bomb(world, "manifest.json: 1 MiB + (signed)",
             lambda p: p.write_bytes(resign(world.genuine, world.ho.signing_key,
                                            manifest_raw=signed.dump_json(obj))),
             "LimitError", r"manifest.json is \d+ bytes \(limit 1048576\)")


def test_inner_manifest_over_its_size_limit(world: World) -> None:
    def make(p: Path) -> None:
        inner = json.loads(world.inner[0][1])
        inner["summary"]["pad"] = "x" * MAX_INNER_MANIFEST_BYTES
        _resign_inner(world, p, [("inner.json", signed.dump_json(inner)), *world.inner[1:]])
    run_bomb(world, "inner.json: 4 MiB + (signed, encrypted)", make, "LimitError",
             r"inner.json of \d+ bytes \(limit 4194304\)")


def test_inner_manifest_nested_deeply(world: World) -> None:
    def make(p: Path) -> None:
        raw = world.inner[0][1].replace(b'"summary": {', b'"summary": {"deep": ' + b"[" * 200_000
                                        + b"]" * 200_000 + b", ", 1)
        _resign_inner(world, p, [("inner.json", raw), *world.inner[1:]])
    run_bomb(world, "inner.json: 200 000 levels (signed, encrypted)", make, "LimitError",
             r"nested (too deeply|deeper than 32)")


def test_ack_nested_and_oversized(world: World) -> None:
    key = world.store.signing_key

    def nested(p: Path) -> None:
        raw = b"[" * (MAX_MANIFEST_BYTES - 1) + b"\n"
        p.write_bytes(assemble([(ACK_MEMBERS[0], raw), (ACK_MEMBERS[1], sshsig.sign(key, raw, SIG_NAMESPACE))]))
    run_bomb(world, "ack.json: 1 MiB of '[' (signed)", nested, "LimitError", r"nested too deeply", ack=True)
    run_bomb(world, "ack: 64 MiB file", lambda p: p.write_bytes(world.ack + bytes(64 << 20)),
             "LimitError", r"empty or oversized ack", ack=True)


# ---------------------------------------------------------------- tar

def test_a_million_tar_members(world: World) -> None:
    run_bomb(world, "bundle: 1 000 000 empty tar members (512 MB)", lambda p: _flood(p, 1_000_000),
             "FormatError", r"member 'x' where 'manifest.json' was expected")


def test_a_million_tar_members_after_a_valid_bundle(world: World) -> None:
    valid = world.genuine[:-len(tarfmt.END)]
    assert valid + tarfmt.END == world.genuine
    run_bomb(world, "bundle + 1 000 000 members (512 MB)", lambda p: _flood(p, 1_000_000, head=valid),
             "FormatError", r"unexpected extra member")


def test_a_million_tar_members_as_an_ack(world: World) -> None:
    run_bomb(world, "ack: 1 000 000 members (512 MB)", lambda p: _flood(p, 1_000_000, name=b"ack.json"),
             "LimitError", r"empty or oversized ack", ack=True)


def test_tar_headers_claiming_giant_members(world: World) -> None:
    lay = layout(world.genuine)
    run_bomb(world, "manifest.json header claiming 8 GiB",
             lambda p: p.write_bytes(raw_header(BUNDLE_MEMBERS[0].encode(), 8**11 - 1) + lay.manifest),
             "LimitError", r"manifest.json is 8589934591 bytes")
    giant = (raw_header(BUNDLE_MEMBERS[0].encode(), len(lay.manifest)) + lay.manifest + tarfmt.padding(len(lay.manifest))
             + raw_header(BUNDLE_MEMBERS[1].encode(), len(lay.sig)) + lay.sig + tarfmt.padding(len(lay.sig))
             + raw_header(BUNDLE_MEMBERS[2].encode(), 8**11 - 1) + lay.payload)
    run_bomb(world, "payload header claiming 8 GiB (file 12 KB)", lambda p: p.write_bytes(giant),
             "FormatError", r"truncated: the file has \d+ bytes, its tar headers need 85899")
    base256 = bytearray(raw_header(BUNDLE_MEMBERS[0].encode(), 0))
    base256[124:136] = b"\x80" + (1 << 62).to_bytes(11, "big")
    base256[148:156] = b" " * 8
    base256[148:156] = f"{sum(base256):06o}".encode() + b"\0 "
    run_bomb(world, "GNU base-256 size 2^62", lambda p: p.write_bytes(bytes(base256) + tarfmt.END),
             "FormatError", r"bad size field")


# ---------------------------------------------------------------- age header

def _age_payload(world: World, edit: Callable[[list[bytes]], list[bytes]]) -> bytes:
    payload = layout(world.genuine).payload
    end = payload.index(b"\n---") + 1
    lines = payload[:end].splitlines(keepends=True)
    return b"".join(edit(lines)) + payload[end:]


def test_age_header_with_thousands_of_stanzas(world: World) -> None:
    payload = _age_payload(world, lambda lines: [lines[0], *lines[1:] * 5000])
    run_bomb(world, "age header: 5000 stanzas (signed)",
             lambda p: p.write_bytes(resign(world.genuine, world.ho.signing_key, payload=payload)),
             "LimitError", r"more than 20 recipient stanzas")


def test_age_header_with_a_huge_line(world: World) -> None:
    payload = _age_payload(world, lambda lines: [lines[0], b"-> X25519 " + b"A" * (16 << 20) + b"\n", *lines[1:]])
    run_bomb(world, "age header: one 16 MiB line (signed)",
             lambda p: p.write_bytes(resign(world.genuine, world.ho.signing_key, payload=payload)),
             "LimitError", r"age header exceeds 65536 bytes")


def test_limits_summary() -> None:
    """Runs last (file order): the figures of every case."""
    if not FIGURES:
        pytest.skip("no limit case ran in this session")
    how = "peak RSS (VmHWM)" if RSS else "tracemalloc peak"
    print(f"\nlimit cases: {len(FIGURES)} (time, extra memory as {how})")
    for label, (took, extra, what) in FIGURES.items():
        print(f"  {label:<52} {took * 1000:8.1f} ms {extra / 2**20:7.1f} MiB  {what}")
    assert all(t < SECONDS and (m < EXTRA_MEMORY or (label.startswith("child") and m < IMPORT_RSS_LIMIT))
               for label, (t, m, _w) in FIGURES.items())
