#!/usr/bin/env python3
"""Memory and speed of sealing and opening a big bundle (a benchmark, not a test).

Synthetic sales lines (ids, store, SKU, decimal quantity and amount, date,
timestamp, a random-text note and a random binary column so the Parquet file
stays about as big as the data) are generated batch by batch with pyarrow
compute, never held whole, and fed as a RecordBatchReader to:

  (0) nothing: the interpreter with pyarrow and exchange imported (RSS floor)
  (1) generate: iterate the batches and drop them (cost of the data itself)
  (a) raw:  pyarrow ParquetWriter, zstd, one write_batch per batch (baseline)
  (b) seal: exchange.wire.bundle.seal_bundle (Parquet -> inner tar -> age -> outer tar)
  (c) open: exchange.wire.bundle.open_bundle: signature, decrypt to a work folder,
            every hash checked, Parquet footers read; the tables are not loaded

Each step runs in its own child process; its peak RSS is the child's
ru_maxrss as reported by wait4(2). Goal: every peak under 150 MiB.

    .venv/bin/python tools/bench/bundle_memory.py [--size-mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GOAL_MIB = 150
ALPHABET = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1)) + b"0123456789+/"
TO_TEXT = bytes(ALPHABET[b % 64] for b in range(256))  # random bytes -> random base64-alphabet text
NOTE_CHARS = 96
BLOB_BYTES = 384
SKU_CHARS = 12
# bytes a row adds to the Parquet file, roughly: random blob + 6 bits per text char + numbers
ROW_BYTES = BLOB_BYTES + (NOTE_CHARS + SKU_CHARS) * 6 // 8 + 30


# ---------------------------------------------------------------- data

def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("line_id", pa.int64()), ("store_id", pa.int64()), ("sku", pa.string()),
        ("qty", pa.decimal128(14, 3)), ("amount", pa.decimal128(14, 2)), ("day", pa.date32()),
        ("at", pa.timestamp("us", tz="UTC")), ("note", pa.string()), ("blob", pa.binary()),
    ])


def _fixed_width(typ: Any, n: int, width: int, data: bytes) -> Any:
    import pyarrow as pa

    offsets = pa.array(range(0, (n + 1) * width, width), pa.int32()).buffers()[1]
    return pa.Array.from_buffers(typ, n, [None, offsets, pa.py_buffer(data)])


def _decimal(ints: Any, typ: Any) -> Any:
    """Non-negative int64 values as the unscaled integers of ``typ`` (e.g. cents)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wide = pc.cast(ints, pa.decimal128(19, 0))  # same 16-byte layout, scale 0
    return pa.Array.from_buffers(typ, len(ints), wide.buffers())


def batches(size_bytes: int, batch_rows: int) -> Iterator[Any]:
    """Batches of sales lines until about ``size_bytes`` of Parquet-bound data; vectorized.

    os.urandom, not random.randbytes: the latter builds a big int as large as the
    bytes first, which would double the generator's own memory per batch.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = _schema()
    produced = start = 0
    while produced < size_bytes:
        n = batch_rows
        rand = pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(os.urandom(8 * n))])
        cols = [
            pa.array(range(start, start + n), pa.int64()),
            pc.bit_wise_and(rand, 0x3FF),
            _fixed_width(pa.string(), n, SKU_CHARS, os.urandom(n * SKU_CHARS).translate(TO_TEXT)),
            _decimal(pc.bit_wise_and(pc.shift_right(rand, 10), 0xFFFFF), schema.field("qty").type),
            _decimal(pc.bit_wise_and(pc.shift_right(rand, 30), 0xFFFFFFF), schema.field("amount").type),
            pc.cast(pc.cast(pc.add(pc.bit_wise_and(rand, 0x3FF), 20_000), pa.int32()), pa.date32()),
            pc.cast(pc.add(pc.bit_wise_and(rand, 0xFFFFFFFFFF), 1_767_225_600_000_000),
                    pa.timestamp("us", tz="UTC")),
            _fixed_width(pa.string(), n, NOTE_CHARS, os.urandom(n * NOTE_CHARS).translate(TO_TEXT)),
            _fixed_width(pa.binary(), n, BLOB_BYTES, os.urandom(n * BLOB_BYTES)),
        ]
        yield pa.RecordBatch.from_arrays(cols, schema=schema)
        produced += n * ROW_BYTES
        start += n


def reader(args: argparse.Namespace) -> Any:
    import pyarrow as pa

    return pa.RecordBatchReader.from_batches(_schema(), batches(args.size_mib << 20, args.batch_rows))


# ---------------------------------------------------------------- child steps

def _step(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow  # noqa: F401
    import pyarrow.parquet as pq

    from exchange.wire import bundle
    from exchange.wire.crypto import sshsig

    work = Path(args.workdir)
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if args.child == "nothing":
        out["bytes"] = 0
    elif args.child == "generate":
        rows = size = 0
        for b in reader(args):
            rows += b.num_rows
            size += b.nbytes
        out.update(bytes=size, rows=rows)
    elif args.child == "raw":
        r = reader(args)
        rows = 0
        with pq.ParquetWriter(work / "raw.parquet", r.schema, compression="zstd") as w:
            for b in r:
                w.write_batch(b)
                rows += b.num_rows
        out.update(bytes=(work / "raw.parquet").stat().st_size, rows=rows,
                   row_groups=pq.ParquetFile(work / "raw.parquet").metadata.num_row_groups)
    elif args.child == "seal":
        key = sshsig.load_private_key((work / "ho.key").read_bytes())
        s = bundle.seal_bundle(work / "ho.s001.0000000001.bundle", key=key, sender="ho", recipient="s001",
                               seq=1, prev=None, recipients=[(work / "s001.age.pub").read_text().strip()],
                               tables={"sales": reader(args)}, summary={"documents": {}})
        out.update(bytes=s.size)
    elif args.child == "open":
        path = work / "ho.s001.0000000001.bundle"
        trust = sshsig.AllowedSigners.load(work / "allowed_signers")
        identity = (work / "s001.age.key").read_text().strip()
        scratch = work / "open"
        scratch.mkdir(exist_ok=True)
        with bundle.open_bundle(path, trust=trust, identities=[identity], me="s001", workdir=scratch) as o:
            rows = pq.read_metadata(o.tables["sales"]).num_rows  # footer only, not the table
            out.update(bytes=path.stat().st_size, rows=rows, file_sha256=o.file_sha256)
    else:
        raise SystemExit(f"unknown step {args.child}")
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- parent

STEPS = [("nothing", "(0) python+pyarrow"), ("generate", "(1) generate only"), ("raw", "(a) raw parquet"),
         ("seal", "(b) seal"), ("open", "(c) open/verify")]


def _run_child(step: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result = work / f"{step}.json"
    argv = [sys.executable, os.path.abspath(__file__), "--child", step, "--workdir", str(work),
            "--size-mib", str(args.size_mib), "--batch-rows", str(args.batch_rows), "--result", str(result)]
    t0 = time.perf_counter()
    pid = os.posix_spawn(sys.executable, argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} failed (exit status {os.waitstatus_to_exitcode(status)})")
    out: dict[str, Any] = json.loads(result.read_text())
    out["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    out["process_s"] = elapsed
    return out


def _keys(work: Path) -> None:
    from exchange.wire.crypto import age, sshsig

    pem, pub = sshsig.generate_key("ho")
    (work / "ho.key").write_bytes(pem)
    (work / "allowed_signers").write_text(sshsig.format_signer_line("ho", pub) + "\n")
    identity, recipient = age.generate_identity()
    (work / "s001.age.key").write_text(identity + "\n")
    (work / "s001.age.pub").write_text(recipient + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=1024, help="Parquet-bound data to generate (default 1024)")
    p.add_argument("--batch-rows", type=int, default=8192, help="rows per record batch (default 8192)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--workdir", help="folder for the files (default: a temporary folder, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        Path(args.result).write_text(json.dumps(_step(args)))
        return 0

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bundle-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _keys(work)
        results = {}
        for step, label in STEPS:
            if not args.json:
                print(f"running {label} ...", file=sys.stderr, flush=True)
            results[step] = _run_child(step, args, work)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    raw, seal, opened = results["raw"], results["seal"], results["open"]
    summary = {
        "size_mib": args.size_mib, "batch_rows": args.batch_rows,
        "steps": {s: {k: v for k, v in r.items() if k != "file_sha256"} for s, r in results.items()},
        "seal_over_raw_wall": seal["wall_s"] / raw["wall_s"],
        "bundle_mib": seal["bytes"] / 2**20,
        "max_peak_rss_mib": max(r["peak_rss_mib"] for r in results.values()),
        "goal_mib": GOAL_MIB,
    }
    summary["goal_met"] = summary["max_peak_rss_mib"] < GOAL_MIB
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"bundle memory benchmark: {args.size_mib} MiB of sales lines, {args.batch_rows} rows per batch, "
          f"{raw.get('rows', 0):,} rows")
    print(f"{'step':<22}{'output MiB':>12}{'wall s':>9}{'MiB/s':>9}{'peak RSS MiB':>15}")
    for step, label in STEPS:
        r = results[step]
        mib = r["bytes"] / 2**20
        rate = f"{mib / r['wall_s']:.0f}" if r["bytes"] else "-"
        print(f"{label:<22}{mib:>12.0f}{r['wall_s']:>9.1f}{rate:>9}{r['peak_rss_mib']:>15.0f}")
    print(f"seal/raw wall time: {summary['seal_over_raw_wall']:.2f}x   "
          f"(raw Parquet row groups: {raw.get('row_groups')}; bundle {summary['bundle_mib']:.0f} MiB)")
    verdict = "met" if summary["goal_met"] else "NOT met"
    print(f"peak RSS goal < {GOAL_MIB} MiB: {verdict} (max {summary['max_peak_rss_mib']:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
