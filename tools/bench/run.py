#!/usr/bin/env python3
"""exchange benchmark suite: every figure next to a baseline measured in the same run.

    .venv/bin/python tools/bench/run.py            # full run (several minutes)
    .venv/bin/python tools/bench/run.py --quick    # about a minute, smaller sizes
    .venv/bin/python tools/bench/run.py --json     # one JSON object on stdout
    .venv/bin/python tools/bench/run.py --pg URL   # HO side on PostgreSQL
                                                   # (default: $EXCHANGE_TEST_PG, else SQLite only)
    .venv/bin/python tools/bench/run.py --only export,import --profile

Benchmarks are not timed unit tests: the machine is noisy, so each figure is
reported as a ratio against a baseline doing the same work with plain tools,
measured in the same run on the same machine. Results go to
tools/bench/results/latest.json, <time>-<mode>.json, and <mode>.json for a whole run
(not --only/--size); docs/PERFORMANCE.md reads them.

Sections (keys of the JSON in brackets):
  export    N sales lines from a store database to sealed bundles (export_all)
            vs ADBC -> Arrow -> Parquet zstd, and vs a csv+gzip cron script
            [export_rows_per_s, export_baseline_rows_per_s, bundle_bytes,
             csv_gzip_bytes, csv_gzip_rows_per_s]
  import    the same bundles into an empty HO, then again (newer versions) into
            a full one, vs ADBC ingest to a staging table + one
            INSERT ... SELECT ... ON CONFLICT DO UPDATE
            [import_rows_per_s, import_full_rows_per_s, import_baseline_rows_per_s]
  startup   `exchange --help`, a no-op `exchange sync`, `exchange status sent` and
            `exchange doctor` on an idle store, median of 5 (runs in turns), vs
            `python -c "import pyarrow.parquet, paramiko, cryptography"`
            [startup_help_s, startup_sync_s, startup_status_s, startup_doctor_s,
             startup_baseline_s]
  memory    peak RSS sealing and opening a 1 GiB bundle (tools/bench/bundle_memory.py)
            [peak_rss_mib_export, peak_rss_mib_import]
  fixed     fixed cost per bundle: S stores' bundles of one sales line each through
            import_inbox (one importer), time per bundle, SQLite HO and (with --pg)
            PostgreSQL HO, median of 3 [fixed_ms_per_bundle]
  fanin     S stores' bundles landing at once in the HO inbox, 1/2/4 workers
            [fanin_seconds_by_workers]
  fanout    one item master change to S stores (export_all on the HO)
            [fanout_seconds, fanout_bytes_total]
  watch     `exchange run`: bundle renamed into the inbox -> in archive/received
            [watch_latency_ms, watch_latency_ms_max]

Every measured step runs in a child process of its own (``--child``): its
peak RSS is its own, and the ADBC drivers (which bundle their own SQLite)
never share a process with SQLAlchemy's sqlite3 connections to the same file.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exchange  # noqa: E402,F401  first, as in the CLI: it picks Arrow's allocator before pyarrow loads
import common as c  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SALES_TABLES = ("sales_bill", "sales_bill_line", "sales_bill_payment")
SECTIONS = ("export", "import", "startup", "memory", "fixed", "fanin", "fanout", "watch")

SIZES: dict[str, dict[str, int]] = {
    "full": {
        "export_lines": 1_000_000, "items": 5_000,
        "fanin_stores": 1_000, "fanin_lines": 2_000, "fixed_bundles": 500, "fixed_runs": 3,
        # The brief's fan-out: 100,000 items to 1,000 stores (3 GB of bundles in the scratch folder).
        # Since export_all seals one bundle per store in turn (2026-12-01), each batch is read and
        # encoded once for all stores: 237 s on PostgreSQL, where peer-by-peer export had sealed
        # 222 stores in 16 minutes. The section is capped at FANOUT_TIMEOUT.
        "fanout_items": 100_000, "fanout_stores": 1_000,
        "watch_bundles": 10, "startup_runs": 5, "memory_mib": 1024, "export_runs": 3,
    },
    "quick": {
        "export_lines": 100_000, "items": 2_000,
        "fanin_stores": 100, "fanin_lines": 200, "fixed_bundles": 100, "fixed_runs": 3,
        "fanout_items": 10_000, "fanout_stores": 100,
        "watch_bundles": 10, "startup_runs": 5, "memory_mib": 128, "export_runs": 1,
    },
}

FANOUT_TIMEOUT = 900.0    # s; a fan-out slower than this is reported as an error, not waited for
GOAL_RSS_MIB = 150        # peak RSS of export and import (issue 17)
GOAL_FANIN_S = 60.0       # 1,000 stores x 2,000 lines with 2 workers (issue 17)
GOAL_FANOUT_S = 60.0      # 100,000 items to 1,000 stores (issue 17)


def export_goal(lines: int) -> float:
    """Issue 17: >= 1.0 of ADBC + Parquet at 1M lines (reading, encoding and sealing overlap), 0.7 at 100k."""
    return 1.0 if lines >= 1_000_000 else 0.7


def import_goal(database: str, full: bool) -> float:
    """Issue 17: SQLite >= 0.8 of ingest + upsert; PostgreSQL >= 1.0 into an empty HO, >= 0.9 into a full one."""
    if database == "sqlite":
        return 0.8
    return 0.9 if full else 1.0
GOAL_STARTUP = 1.0        # x the import-only baseline (issue 17)
GOAL_FIXED_MS = {"sqlite": 15.0, "postgresql": 25.0}  # fixed cost per bundle (issue 17)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================ child steps
# Each runs in a fresh process: `run.py --child '{"op": ..., ...}'`, printing
# one line `@@RESULT {json}` with its result, wall seconds and peak RSS.


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def op_seed(a: dict[str, Any]) -> dict[str, Any]:
    """Bulk-load items (and optionally a store's sales, and capture events) into a database."""
    items = c.gen_items(a["items"], price_bump=a.get("price_bump", 0))
    tables: dict[str, Any] = dict(items.tables) if a.get("load_items", True) else {}
    events: dict[str, list[str]] = {}
    if a.get("item_events"):
        events["item"] = c.doc_keys(items.tables["item"], ("item_id",))
    if a.get("sales_lines"):
        sales = c.gen_sales(a["store"], a["sales_lines"], items, seed=a.get("seed", 0))
        tables.update(sales)
        events["sales_bill"] = c.doc_keys(sales["sales_bill"], ("store_id", "bill_no"))
    c.ingest(a["url"], tables, events)
    return {"rows": {k: v.num_rows for k, v in tables.items()}}


def op_export(a: dict[str, Any]) -> dict[str, Any]:
    from exchange.node.home import Node
    from exchange.send.export import export_all, reload

    node = Node.open(a["home"])
    if a.get("reload"):
        reload(node, a["reload"]["peer"], a["reload"]["docs"])
    _ = node.catalog, node.signing_key  # load the catalog and keys before the clock starts
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    out = export_all(node)
    dt = time.perf_counter() - t0
    cpu = [round(b - a, 3) for a, b in zip(cpu0, _cpu_seconds(), strict=True)]
    files = [e.file for e in out]
    size = sum((node.cfg.outbox / f).stat().st_size for f in files)
    return {"seconds": dt, "files": files, "bytes": size, "documents": sum(e.documents for e in out),
            "cpu_seconds": cpu[0], "reader_cpu_seconds": cpu[1]}


def evict_libraries() -> int:
    """Drop the shared libraries of this environment from the page cache before anything is measured.

    Why: a library written moments ago (a fresh ``pip install``, CI's clean clone) sits in the page cache
    in large folios, and a process mapping it counts whole folios as resident: ``import pyarrow`` showed
    RssFile 54 MiB instead of 29 (docs/PERFORMANCE.md "Caveats"), which moved every peak RSS of the run,
    baselines included, by about 25 MiB. Read back from disk, the same files map page by page as on any
    machine that installed them earlier. Returns how many files were dropped."""
    n = 0
    roots = {Path(p) for p in (sys.prefix, getattr(sys, "base_prefix", sys.prefix))}
    for root in roots:
        for f in root.rglob("*.so*"):
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            except (OSError, AttributeError):
                pass
            finally:
                os.close(fd)
    return n


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process and of its ended children (the exporter's reader process)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def op_import(a: dict[str, Any]) -> dict[str, Any]:
    from exchange.node.home import Node
    from exchange.receive.importer import import_inbox

    node = Node.open(a["home"])
    _ = node.catalog, node.signing_key, node.identities, node.trust
    cpu0 = _cpu_seconds()[0]
    t0 = time.perf_counter()
    outs = import_inbox(node)
    dt = time.perf_counter() - t0
    cpu = round(_cpu_seconds()[0] - cpu0, 3)  # SQLite's work is in this process; PostgreSQL's is the server's
    statuses: dict[str, int] = {}
    for o in outs:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    bad = [f"{o.file}: {o.status} {o.reason[:300]}" for o in outs if o.status != "APPLIED"]
    return {"seconds": dt, "statuses": statuses, "problems": bad[:5],
            "parked": sum(o.parked for o in outs), "cpu_seconds": cpu}


def op_baseline_parquet(a: dict[str, Any]) -> dict[str, Any]:
    """The same rows read into Arrow by ADBC and written to Parquet zstd by pyarrow."""
    import pyarrow.parquet as pq

    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    cpu0 = _cpu_seconds()[0]
    t0 = time.perf_counter()
    conn = c.adbc_connect(a["url"])
    size = rows = 0
    try:
        with conn.cursor() as cur:
            for t in SALES_TABLES:
                cur.execute(f"SELECT * FROM {t}")
                table = cur.fetch_arrow_table()
                rows += table.num_rows
                pq.write_table(table, out / f"{t}.parquet", compression="zstd")
                size += (out / f"{t}.parquet").stat().st_size
    finally:
        conn.close()
    return {"seconds": time.perf_counter() - t0, "bytes": size, "rows": rows,
            "cpu_seconds": round(_cpu_seconds()[0] - cpu0, 3)}


def op_baseline_csv(a: dict[str, Any]) -> dict[str, Any]:
    """A cron-job style dump: csv module + gzip level 6 over a plain sqlite3/psycopg cursor."""
    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    conn = c.plain_connect(a["url"])
    size = rows = 0
    try:
        for t in SALES_TABLES:
            cur = conn.cursor()
            cur.execute(f"SELECT * FROM {t}")
            path = out / f"{t}.csv.gz"
            with gzip.open(path, "wt", compresslevel=6, newline="") as f:
                w = csv.writer(f)
                w.writerow([d[0] for d in cur.description])
                while batch := cur.fetchmany(10_000):
                    w.writerows(batch)
                    rows += len(batch)
            size += path.stat().st_size
    finally:
        conn.close()
    return {"seconds": time.perf_counter() - t0, "bytes": size, "rows": rows}


def op_baseline_ingest(a: dict[str, Any]) -> dict[str, Any]:
    """The same Arrow tables -> ADBC ingest into a staging table -> one upsert per table."""
    from exchange.database.schema import RETAIL

    items = c.gen_items(a["items"])
    sales = c.gen_sales(a["store"], a["sales_lines"], items, seed=a.get("seed", 0))
    dialect = "postgresql" if c.is_pg(a["url"]) else "sqlite"
    conn = c.adbc_connect(a["url"])
    runs, cpus = [], []
    try:
        for _ in range(a.get("repeat", 1)):
            cpu0 = _cpu_seconds()[0]
            t0 = time.perf_counter()
            with conn.cursor() as cur:
                for name in SALES_TABLES:
                    t = RETAIL.tables[name]
                    pk = [col.name for col in t.primary_key.columns]
                    cols = [col.name for col in t.columns]
                    stage = f"xbench_stage_{name}"
                    cur.adbc_ingest(stage, c.physical(sales[name], dialect, name), mode="replace", temporary=True)
                    sets = ", ".join(f"{col} = excluded.{col}" for col in cols if col not in pk)
                    cur.execute(f"INSERT INTO {name} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM {stage} "
                                f"WHERE true ON CONFLICT ({', '.join(pk)}) DO UPDATE SET {sets}")
                    cur.execute(f"DROP TABLE {stage}")
            conn.commit()
            runs.append(time.perf_counter() - t0)
            cpus.append(round(_cpu_seconds()[0] - cpu0, 3))
    finally:
        conn.close()
    return {"seconds_by_run": runs, "cpu_seconds_by_run": cpus}


def op_profile(a: dict[str, Any]) -> dict[str, Any]:
    """cProfile of export_all or import_inbox; top functions by own and cumulative time."""
    import cProfile
    import io
    import pstats

    from exchange.node.home import Node
    from exchange.receive.importer import import_inbox
    from exchange.send.export import export_all

    node = Node.open(a["home"])
    _ = node.catalog, node.signing_key, node.identities, node.trust
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    (export_all if a["what"] == "export" else import_inbox)(node)
    prof.disable()
    dt = time.perf_counter() - t0
    texts = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(25)
        texts[key] = buf.getvalue()
    Path(a["out"]).write_text(f"{a['what']} of {a['lines']} sales lines: {dt:.2f} s under cProfile\n\n"
                              + "\n".join(f"== by {k}\n{v}" for k, v in texts.items()))
    st = pstats.Stats(prof)
    top = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]  # type: ignore[attr-defined]
    return {"seconds": dt, "top_tottime": [
        {"function": f"{Path(fn[0]).name}:{fn[1]}({fn[2]})", "tottime": round(v[2], 3), "calls": v[1],
         "cumtime": round(v[3], 3)} for fn, v in top]}


def op_fanin_parallel(a: dict[str, Any]) -> dict[str, Any]:
    from exchange.node.home import Node
    from exchange.receive import workers  # type: ignore[attr-defined]

    node = Node.open(a["home"])
    cpu = _CpuSampler(node.cfg.database)
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        outs = workers.import_parallel(node, a["workers"])
    finally:
        cpu.stop()
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    statuses: dict[str, int] = {}
    for o in outs:
        st = o["status"] if isinstance(o, dict) else o.status  # outcomes or their __dict__
        statuses[st] = statuses.get(st, 0) + 1
    own = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": own + cpu.children, "statuses": statuses,
            "server_cpu_seconds": cpu.server}


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of one live process (Linux /proc), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class _CpuSampler:
    """CPU seconds, sampled every 0.2 s from a thread (Linux /proc, a local server): of this process's
    descendants (the importer workers, however they were started) and of the PostgreSQL backends serving
    the database (None on SQLite). What the importers and the server each spent: is fan-in CPU-bound?"""

    def __init__(self, url: str) -> None:
        import threading

        self.url = url
        self.kids: dict[int, float] = {}
        self.backends: dict[int, float] = {}
        self.server: float | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def children(self) -> float:
        return sum(self.kids.values())

    def _sample(self, store: dict[int, float], pids: list[int]) -> None:
        for pid in pids:
            got = _proc_cpu(pid)
            if got is not None:
                store[pid] = max(store.get(pid, 0.0), got)

    def _run(self) -> None:
        from sqlalchemy import create_engine, make_url, text

        eng = create_engine(self.url) if c.is_pg(self.url) else None
        try:
            conn = eng.connect() if eng is not None else None
            me = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() if conn is not None else None
            while True:
                stop = self.done.wait(0.2)
                self._sample(self.kids, _descendants(os.getpid()))
                if conn is not None:
                    pids = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d AND pid <> :me"),
                                        {"d": make_url(self.url).database, "me": me}).scalars().all()
                    conn.rollback()
                    self._sample(self.backends, list(pids))
                if stop:
                    break
            if conn is not None:
                conn.close()
                self.server = sum(self.backends.values())
        except Exception:  # noqa: BLE001 - a figure beside the bench, never its failure
            self.server = None
        finally:
            if eng is not None:
                eng.dispose()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)


def op_fixed(a: dict[str, Any]) -> dict[str, Any]:
    """import_inbox over one-line bundles, timed after the node is open and warm (catalog, keys, a connection)."""
    from exchange.node.home import Node
    from exchange.receive.importer import import_inbox

    node = Node.open(a["home"])
    _ = node.catalog, node.trust, node.identities, node.signing_key
    with node.engine.connect():
        pass
    t0, c0 = time.perf_counter(), time.process_time()
    outs = import_inbox(node)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    statuses: dict[str, int] = {}
    for o in outs:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    return {"seconds": secs, "cpu_seconds": cpu, "statuses": statuses, "bundles": len(outs)}


CHILD_OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "seed": op_seed, "export": op_export, "import": op_import, "baseline_parquet": op_baseline_parquet,
    "baseline_csv": op_baseline_csv, "baseline_ingest": op_baseline_ingest, "profile": op_profile,
    "fanin_parallel": op_fanin_parallel, "fixed": op_fixed,
}


def child_main(spec: str) -> int:
    a = json.loads(spec)
    t0 = time.perf_counter()
    res = CHILD_OPS[a["op"]](a)
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_mib"] = round(_maxrss_mib(), 1)
    print("@@RESULT " + json.dumps(res), flush=True)
    return 0


def child(op: str, timeout: float, **kw: Any) -> dict[str, Any]:
    spec = json.dumps({"op": op, **kw})
    try:
        p = subprocess.run([c.PY, str(Path(__file__).resolve()), "--child", spec], capture_output=True,
                           text=True, timeout=timeout, cwd=c.ROOT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"child {op} did not finish within {timeout:.0f} s") from None
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])  # type: ignore[no-any-return]
    raise RuntimeError(f"child {op} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


# ================================================================ the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._baseline_cpu: dict[str, list[float]] = {}  # CPU s of each ingest baseline run, by database URL
        self.mode = "quick" if args.quick else "full"
        self.size = dict(SIZES[self.mode])
        for kv in args.size or []:
            k, v = kv.split("=", 1)
            if k not in self.size:
                raise SystemExit(f"--size {k}: unknown (known: {', '.join(self.size)})")
            self.size[k] = int(v)
        self.pg_base: str | None = args.pg or os.environ.get("EXCHANGE_TEST_PG") or None
        if args.no_pg:
            self.pg_base = None
        self.pg = c.PgScratch(self.pg_base) if self.pg_base else None
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="xbench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.r: dict[str, Any] = {"mode": self.mode, "sizes": self.size, "notes": [], "errors": {},
                                  "ho_database": "postgresql" if self.pg else "sqlite",
                                  "store_database": "sqlite"}
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.export_net: dict[str, Any] = {}

    # ---------------------------------------------------------------- helpers

    def note(self, text: str) -> None:
        self.r["notes"].append(text)
        log("note: " + text)

    def row(self, figure: str, value: str, baseline: str = "", ratio: float | None = None,
            goal: str = "", met: bool | None = None) -> None:
        verdict = "" if met is None else ("met" if met else "MISSED")
        self.rows.append((figure, value, baseline, "" if ratio is None else f"{ratio:.2f}", goal, verdict))

    def ho_database(self, tag: str) -> str | None:
        """A fresh HO database: a PostgreSQL scratch database, or None (SQLite in the home)."""
        return self.pg.create(tag) if self.pg else None

    def new_pair(self, name: str, ho_tag: str, store_id: str = "s001", transfer: bool = True
                 ) -> tuple[Any, Any, Path]:
        from exchange.node.home import Node

        root = self.work / name
        root.mkdir(parents=True, exist_ok=True)
        ho = c.make_node(root / "ho", "ho", "ho", self.ho_database(ho_tag))
        st = c.make_node(root / store_id, store_id, "store")
        if transfer:
            (root / "transfer").mkdir(exist_ok=True)
        c.pair(ho, st, root / "transfer" if transfer else None)
        ho.engine.dispose()
        st.engine.dispose()
        return Node.open(ho.cfg.home), Node.open(st.cfg.home), root

    # ---------------------------------------------------------------- sections

    def run(self) -> dict[str, Any]:
        only = set(self.args.only.split(",")) if self.args.only else set(SECTIONS)
        unknown = only - set(SECTIONS) - {"profile"}
        if unknown:
            raise SystemExit(f"--only: unknown section(s) {', '.join(sorted(unknown))}; the sections are "
                             f"{', '.join(SECTIONS)}")
        if "import" in only and "export" not in only:  # the import reads the bundles the export section seals
            log("--only import: the export section runs too (the import needs its bundles)")
            only.add("export")
        self.r["machine"] = c.machine_info(self.pg_base)
        self.r["command"] = "tools/bench/run.py " + " ".join(sys.argv[1:])
        self.r["libraries_evicted"] = evict_libraries()
        t_all = time.perf_counter()
        try:
            for name in SECTIONS:
                if name not in only:
                    continue
                log(f"== {name}")
                t0 = time.perf_counter()
                try:
                    getattr(self, f"sec_{name}")()
                except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                    self.r["errors"][name] = f"{type(exc).__name__}: {exc}"
                    log(f"section {name} FAILED:\n{traceback.format_exc()}")
                    self.rows.append((name, "ERROR", "", "", "", "ERROR"))
                self.r.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
            if self.args.profile or "profile" in only:
                log("== profile")
                try:
                    self.sec_profile()
                except Exception as exc:  # noqa: BLE001
                    self.r["errors"]["profile"] = f"{type(exc).__name__}: {exc}"
                    log(f"profile FAILED:\n{traceback.format_exc()}")
        finally:
            if self.pg:
                self.pg.close()
            if not self.args.keep and not self.args.workdir:
                shutil.rmtree(self.work, ignore_errors=True)
        self.r["total_seconds"] = round(time.perf_counter() - t_all, 1)
        self.r["table"] = [dict(zip(("figure", "value", "baseline", "ratio", "goal", "verdict"), row,
                                    strict=True)) for row in self.rows]
        return self.r

    def sec_export(self) -> None:
        n, items = self.size["export_lines"], self.size["items"]
        ho, st, root = self.new_pair("export", "export_ho")
        self.export_net = {"ho": ho, "st": st, "root": root}
        log(f"seeding {n:,} sales lines into the store, {items:,} items on both sides")
        seeded = child("seed", 900, url=st.cfg.database, items=items, store="s001", sales_lines=n, seed=1)
        child("seed", 300, url=ho.cfg.database, items=items)
        self.r["export_tables"] = seeded["rows"]
        # This machine's speed wanders by a third from one run to the next, so export and baseline
        # run in turns, each export from the same seeded database, and the medians are compared.
        db = Path(c.sqlite_path(st.cfg.database))
        files = [db.with_name(db.name + x) for x in ("", "-wal", "-shm")]
        saved = root / "seeded"
        saved.mkdir()
        for f in files:  # nothing has the database open now
            if f.exists():
                shutil.copyfile(f, saved / f.name)
        runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for i in range(max(1, self.size["export_runs"])):
            if i:  # the same seeded database again, an empty outbox
                for f in [*st.cfg.outbox.iterdir(), *files]:
                    f.unlink(missing_ok=True)
                for f in saved.iterdir():
                    shutil.copyfile(f, db.with_name(f.name))
            log(f"export_all on the store (run {i + 1})")
            e = child("export", 3600, home=str(st.cfg.home))
            log(f"  {e['seconds']:.2f} s, {len(e['files'])} bundles, {e['bytes']:,} bytes, "
                f"peak RSS {e['peak_rss_mib']:.0f} MiB, CPU {e['cpu_seconds']:.2f} s "
                f"+ reader {e['reader_cpu_seconds']:.2f} s")
            b = child("baseline_parquet", 900, url=st.cfg.database, out=str(root / "parquet"))
            log(f"  baseline ADBC->Parquet {b['seconds']:.2f} s, {b['bytes']:,} bytes, CPU {b['cpu_seconds']:.2f} s")
            runs.append((e, b))
        shutil.rmtree(saved)
        e = dict(runs[-1][0])  # its bundles are the ones the import section applies
        e["seconds"] = median(r[0]["seconds"] for r in runs)
        e["peak_rss_mib"] = max(r[0]["peak_rss_mib"] for r in runs)
        b = dict(runs[-1][1], seconds=median(r[1]["seconds"] for r in runs))
        self.export_net["files"] = e["files"]
        self.r["export_runs"] = [{"seconds": round(r[0]["seconds"], 3), "baseline_seconds": round(r[1]["seconds"], 3),
                                  "peak_rss_mib": r[0]["peak_rss_mib"], "cpu_seconds": r[0]["cpu_seconds"],
                                  "reader_cpu_seconds": r[0]["reader_cpu_seconds"],
                                  "baseline_cpu_seconds": r[1]["cpu_seconds"]} for r in runs]
        g = child("baseline_csv", 1800, url=st.cfg.database, out=str(root / "csv"))
        log(f"  baseline csv+gzip {g['seconds']:.2f} s, {g['bytes']:,} bytes")
        rate, base, csv_rate = n / e["seconds"], n / b["seconds"], n / g["seconds"]
        self.r.update(export_rows_per_s=round(rate), export_seconds=round(e["seconds"], 3),
                      export_bundles=len(e["files"]), export_baseline_rows_per_s=round(base),
                      export_baseline_seconds=round(b["seconds"], 3), parquet_bytes=b["bytes"],
                      bundle_bytes=e["bytes"], csv_gzip_bytes=g["bytes"], csv_gzip_rows_per_s=round(csv_rate),
                      csv_gzip_seconds=round(g["seconds"], 3),
                      peak_rss_mib_export_db=e["peak_rss_mib"])
        self.row(f"export rows/s ({n:,} sales lines, median of {len(runs)})", f"{rate:,.0f}",
                 f"{base:,.0f} ADBC->Parquet",
                 rate / base, f">= {export_goal(n):.2f}", rate / base >= export_goal(n))
        cpu = median(r[0]["cpu_seconds"] + r[0]["reader_cpu_seconds"] for r in runs)
        bcpu = median(r[1]["cpu_seconds"] for r in runs)
        self.r.update(export_cpu_seconds=cpu, export_baseline_cpu_seconds=bcpu)
        self.row("  (CPU s of the export, both processes; median)", f"{cpu:.2f}", f"{bcpu:.2f} ADBC->Parquet",
                 bcpu / cpu if cpu else None, "", None)
        self.row("export vs csv+gzip cron script", f"{rate:,.0f}", f"{csv_rate:,.0f} csv+gzip", rate / csv_rate,
                 "", None)
        self.row("bundle bytes", f"{e['bytes']:,}", f"{g['bytes']:,} csv+gzip", e["bytes"] / g["bytes"],
                 "<= 1.00", e["bytes"] <= g["bytes"])
        self.row("  (plain Parquet zstd bytes)", f"{b['bytes']:,}", "", None, "", None)

    def sec_import(self) -> None:
        n, items = self.size["export_lines"], self.size["items"]
        if not self.export_net.get("files"):
            raise RuntimeError("the export section produced no bundles to import")
        ho, st, root = self.export_net["ho"], self.export_net["st"], self.export_net["root"]
        # with --pg, a SQLite HO too (the same home, keys and bundles; its own database): every store
        # receives the HO's masters into SQLite, so both databases are in one table (issue 17)
        lite = self._sqlite_ho(ho.cfg.home, items) if self.pg else None
        unchecked_url = None
        if self.pg:  # the same empty HO database, for the import with [import] reference_check = "exchange"
            from sqlalchemy import make_url

            unchecked_url = self.pg.create("import_ho_exchange", template=make_url(ho.cfg.database).database)
        homes = [ho.cfg.home] + ([lite] if lite else [])
        for h in homes:
            c.copy_files([st.cfg.outbox / f for f in self.export_net["files"]], Path(h) / "inbox")
        first = []
        for h in homes:
            log(f"import_inbox on the HO (empty database{', sqlite' if h == lite else ''})")
            first.append(child("import", 3600, home=str(h)))
            self._check_import(first[-1])
            log(f"  {first[-1]['seconds']:.2f} s {first[-1]['statuses']}")
        log("reload + export_all on the store (same documents, newer version)")
        e2 = child("export", 3600, home=str(st.cfg.home), reload={"peer": "ho", "docs": ["sales_bill"]})
        for h in homes:
            c.copy_files([st.cfg.outbox / f for f in e2["files"]], Path(h) / "inbox")
        second = []
        for h in homes:
            log(f"import_inbox on the HO (full database: every document overwritten{', sqlite' if h == lite else ''})")
            second.append(child("import", 3600, home=str(h)))
            self._check_import(second[-1])
            log(f"  {second[-1]['seconds']:.2f} s {second[-1]['statuses']}")
        i1, i2 = first[0], second[0]
        # baseline: a database of the same kind with the same schema and items
        b_empty, b_full = self._ingest_baseline(self.pg.create("import_base") if self.pg
                                                else f"sqlite:///{root / 'baseline.db'}")
        rate, full, base, base_full = n / i1["seconds"], n / i2["seconds"], n / b_empty, n / b_full
        self.r.update(import_rows_per_s=round(rate), import_full_rows_per_s=round(full),
                      import_baseline_rows_per_s=round(base), import_full_baseline_rows_per_s=round(base_full),
                      import_seconds=round(i1["seconds"], 3), import_full_seconds=round(i2["seconds"], 3),
                      peak_rss_mib_import_db=i1["peak_rss_mib"])
        db = self.r["ho_database"]
        self._import_rows(db, rate, full, base, base_full)
        if db == "sqlite":
            self._import_cpu_row(i1, i2, self._baseline_cpu.get(f"sqlite:///{root / 'baseline.db'}", []))
        if lite:
            lurl = f"sqlite:///{root / 'baseline.db'}"
            lb_empty, lb_full = self._ingest_baseline(lurl)
            lrate, lfull = n / first[1]["seconds"], n / second[1]["seconds"]
            lbase, lbase_full = n / lb_empty, n / lb_full
            self.r.update(import_sqlite_rows_per_s=round(lrate), import_sqlite_full_rows_per_s=round(lfull),
                          import_sqlite_baseline_rows_per_s=round(lbase),
                          import_sqlite_full_baseline_rows_per_s=round(lbase_full),
                          peak_rss_mib_import_sqlite=first[1]["peak_rss_mib"])
            self._import_rows("sqlite", lrate, lfull, lbase, lbase_full)
            self._import_cpu_row(first[1], second[1], self._baseline_cpu.get(lurl, []))
        if self.pg and unchecked_url:
            self._import_without_fks(ho, st, root, e2["files"], unchecked_url, b_empty, b_full)

    def _import_cpu_row(self, empty: dict[str, Any], full: dict[str, Any], base: list[float]) -> None:
        """SQLite's import and its baseline in CPU seconds (steadier than wall time on a shared machine;
        SQLite works inside the measured process, so its CPU is the whole work)."""
        if len(base) != 2 or "cpu_seconds" not in empty or "cpu_seconds" not in full:
            return
        mine = (empty["cpu_seconds"], full["cpu_seconds"])
        self.r.update(import_sqlite_cpu_seconds=list(mine), import_sqlite_baseline_cpu_seconds=base)
        self.row("  (CPU s of the import into SQLite, empty / full)", f"{mine[0]:.2f} / {mine[1]:.2f}",
                 f"{base[0]:.2f} / {base[1]:.2f} ingest+upsert",
                 base[0] / mine[0] if mine[0] else None, "", None)

    def _import_rows(self, db: str, rate: float, full: float, base: float, base_full: float) -> None:
        self.row(f"import rows/s, empty HO ({db})", f"{rate:,.0f}", f"{base:,.0f} ADBC ingest+upsert",
                 rate / base, f">= {import_goal(db, False):.2f}", rate / base >= import_goal(db, False))
        self.row(f"import rows/s, full HO ({db})", f"{full:,.0f}", f"{base_full:,.0f} ADBC ingest+upsert",
                 full / base_full, f">= {import_goal(db, True):.2f}", full / base_full >= import_goal(db, True))

    def _import_without_fks(self, ho: Any, st: Any, root: Path, full_files: list[str], unchecked_url: str,
                            b_empty: float, b_full: float) -> None:
        """Issue 17: the same import figures against the schema without foreign keys (a baseline database
        whose FKs are dropped), and the import with ``[import] reference_check = "exchange"`` (FK triggers
        off for the bulk write, references checked set-based) against both baselines."""
        n, items = self.size["export_lines"], self.size["items"]
        assert self.pg is not None
        from exchange.database.schema import RETAIL
        from exchange.database.tables import make_engine

        url = self.pg.create("import_base_nofk")
        eng = make_engine(url)
        RETAIL.create_all(eng)
        with eng.begin() as conn:
            for name in SALES_TABLES:
                for fk in RETAIL.tables[name].foreign_key_constraints:
                    conn.exec_driver_sql(f'ALTER TABLE {name} DROP CONSTRAINT "{fk.name}"')
        eng.dispose()
        child("seed", 300, url=url, items=items)
        nb = child("baseline_ingest", 1800, url=url, items=items, store="s001", sales_lines=n, seed=1, repeat=2)
        nb_empty, nb_full = nb["seconds_by_run"]
        log(f"  baseline ingest+upsert without foreign keys: empty {nb_empty:.2f} s, full {nb_full:.2f} s")
        from exchange.node.home import Node

        node = Node.open(ho.cfg.home)  # the same home, on the copy of its empty database, the checks by exchange
        node.cfg.database = unchecked_url
        node.cfg.extra["import"] = {"reference_check": "exchange"}
        node.cfg.save()
        for f in node.cfg.inbox.iterdir():
            f.unlink()
        c.copy_files([st.cfg.outbox / f for f in self.export_net["files"]], node.cfg.inbox)
        log('import_inbox on the HO (empty database, reference_check = "exchange")')
        u1 = child("import", 3600, home=str(ho.cfg.home))
        self._check_import(u1)
        log(f"  {u1['seconds']:.2f} s {u1['statuses']}")
        c.copy_files([st.cfg.outbox / f for f in full_files], node.cfg.inbox)
        log('import_inbox on the HO (full database, reference_check = "exchange")')
        u2 = child("import", 3600, home=str(ho.cfg.home))
        self._check_import(u2)
        log(f"  {u2['seconds']:.2f} s {u2['statuses']}")
        rate, full = n / self.r["import_seconds"], n / self.r["import_full_seconds"]
        urate, ufull = n / u1["seconds"], n / u2["seconds"]
        nbase, nbase_full = n / nb_empty, n / nb_full
        base, base_full = n / b_empty, n / b_full
        self.r.update(import_nofk_baseline_rows_per_s=round(nbase), import_full_nofk_baseline_rows_per_s=round(nbase_full),
                      import_exchange_rows_per_s=round(urate), import_full_exchange_rows_per_s=round(ufull),
                      import_exchange_seconds=round(u1["seconds"], 3), import_full_exchange_seconds=round(u2["seconds"], 3))
        self.row("import rows/s, empty HO, vs schema without FKs", f"{rate:,.0f}", f"{nbase:,.0f} same, no FKs",
                 rate / nbase, "", None)
        self.row("import rows/s, full HO, vs schema without FKs", f"{full:,.0f}", f"{nbase_full:,.0f} same, no FKs",
                 full / nbase_full, "", None)
        self.row('import rows/s, empty HO, reference_check "exchange"', f"{urate:,.0f}",
                 f"{base:,.0f} ADBC ingest+upsert", urate / base, "", None)
        self.row('import rows/s, full HO, reference_check "exchange"', f"{ufull:,.0f}",
                 f"{base_full:,.0f} ADBC ingest+upsert", ufull / base_full, "", None)
        self.row('  the same vs schema without FKs, empty / full', f"{urate / nbase:.2f} / {ufull / nbase_full:.2f}",
                 "", None, "", None)

    def _ingest_baseline(self, url: str) -> tuple[float, float]:
        """Seconds of the ADBC ingest + upsert baseline into an empty, then a full database at ``url``."""
        from exchange.database.schema import RETAIL
        from exchange.database.tables import make_engine

        n, items = self.size["export_lines"], self.size["items"]
        eng = make_engine(url)
        RETAIL.create_all(eng)
        eng.dispose()
        child("seed", 300, url=url, items=items)
        b = child("baseline_ingest", 1800, url=url, items=items, store="s001", sales_lines=n, seed=1, repeat=2)
        b_empty, b_full = b["seconds_by_run"]
        self._baseline_cpu[url] = b.get("cpu_seconds_by_run", [])
        log(f"  baseline ingest+upsert ({'postgresql' if c.is_pg(url) else 'sqlite'}): empty {b_empty:.2f} s, "
            f"full {b_full:.2f} s (CPU {' / '.join(f'{x:.2f}' for x in self._baseline_cpu[url])} s)")
        return b_empty, b_full

    def _sqlite_ho(self, template: Path, items: int) -> Path:
        """A copy of the HO home (keys, peers, nothing imported) on a new SQLite database with the items."""
        from exchange.node import config, perms
        from exchange.node.home import Node

        home = Path(template).parent / "ho-sqlite"
        shutil.copytree(template, home)
        cfg = config.load(home)
        cfg.database = config.default_database(home)
        cfg.save()
        perms.create_private(home / "exchange.db")
        node = Node(cfg)
        node.migrate()
        node.engine.dispose()
        child("seed", 300, url=cfg.database, items=items)
        return home

    def _check_import(self, res: dict[str, Any]) -> None:
        if set(res["statuses"]) != {"APPLIED"} or res.get("parked"):
            raise RuntimeError(f"import did not apply everything: {res['statuses']}, parked {res.get('parked')}, "
                               f"{res['problems']}")

    def sec_startup(self) -> None:
        ho, st, _root = self.new_pair("startup", "startup_ho", store_id="s900")
        runs = self.size["startup_runs"]
        home = str(st.cfg.home)
        cmds = {
            "help": [c.EXCHANGE, "--help"],
            "sync": [c.EXCHANGE, "sync", "--home", home],
            "status": [c.EXCHANGE, "status", "sent", "--home", home],
            "doctor": [c.EXCHANGE, "doctor", "--home", home],
            "baseline": [c.PY, "-c", "import pyarrow.parquet, paramiko, cryptography"],
        }
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for i in range(runs + 1):  # in turns, so a slow spell hits every command; the first round warms the cache
            for name, cmd in cmds.items():
                t0 = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=c.ROOT)
                dt = time.perf_counter() - t0
                if p.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {(p.stdout + p.stderr)[-500:]}")
                if i:
                    times[name].append(dt)
        mid = {name: median(ts) for name, ts in times.items()}
        for name, ts in times.items():
            log(f"  {name}: median {mid[name]:.3f} s of {runs} (best {min(ts):.3f})")
        base = mid["baseline"]
        self.r.update({f"startup_{name}_s": round(v, 4) for name, v in mid.items()})
        for name, label in (("help", "start-up `exchange --help` s"), ("sync", "start-up no-op `exchange sync` s"),
                            ("status", "start-up `exchange status sent` s"), ("doctor", "start-up `exchange doctor` s")):
            self.row(label, f"{mid[name]:.3f}", f"{base:.3f} import-only", mid[name] / base,
                     f"<= {GOAL_STARTUP:.2f}", mid[name] <= GOAL_STARTUP * base)

    def sec_memory(self) -> None:
        script = Path(__file__).resolve().parent / "bundle_memory.py"
        mib = self.size["memory_mib"]
        if script.exists():
            log(f"tools/bench/bundle_memory.py --size-mib {mib} --json")
            p = subprocess.run([c.PY, str(script), "--size-mib", str(mib), "--json"], capture_output=True,
                               text=True, timeout=1800, cwd=c.ROOT)
            if p.returncode != 0:
                raise RuntimeError(f"bundle_memory.py failed ({p.returncode}): {p.stderr[-1000:]}")
            data = json.loads(p.stdout[p.stdout.index("{"):])
            steps = data["steps"]
            exp, imp = steps["seal"]["peak_rss_mib"], steps["open"]["peak_rss_mib"]
            raw, floor = steps["raw"]["peak_rss_mib"], steps["nothing"]["peak_rss_mib"]
            self.r.update(peak_rss_mib_export=round(exp, 1), peak_rss_mib_import=round(imp, 1),
                          peak_rss_mib_raw_parquet=round(raw, 1), peak_rss_mib_floor=round(floor, 1),
                          memory_bundle_mib=round(data.get("bundle_mib", 0), 1),
                          memory_source="tools/bench/bundle_memory.py")
            what = f"{data.get('bundle_mib', mib):.0f} MiB bundle"
            if mib < 1024:
                self.note(f"peak memory measured on a {what} (--size-mib {mib}), not 1 GiB: quick mode")
            self.row(f"peak RSS seal ({what}) MiB", f"{exp:.0f}", f"{raw:.0f} raw Parquet", exp / raw,
                     f"< {GOAL_RSS_MIB}", exp < GOAL_RSS_MIB)
            self.row(f"peak RSS open/verify ({what}) MiB", f"{imp:.0f}", f"{floor:.0f} interpreter", imp / floor,
                     f"< {GOAL_RSS_MIB}", imp < GOAL_RSS_MIB)
        else:
            self.note("tools/bench/bundle_memory.py not found: peak RSS is that of the export/import "
                      "children on the export section's bundles, not a 1 GiB bundle")
            exp, imp = self.r.get("peak_rss_mib_export_db"), self.r.get("peak_rss_mib_import_db")
            if exp is None or imp is None:
                raise RuntimeError("no bundle_memory.py and no export/import measurement to fall back on")
            self.r.update(peak_rss_mib_export=exp, peak_rss_mib_import=imp, memory_source="export/import children")
        # the database paths, end to end (export_all / import_inbox of the export section)
        for key, label in (("peak_rss_mib_export_db", "peak RSS export_all, DB->bundle MiB"),
                           ("peak_rss_mib_import_db", "peak RSS import_inbox, bundle->DB MiB"),
                           ("peak_rss_mib_import_sqlite", "peak RSS import_inbox into SQLite MiB")):
            if key in self.r:
                self.row(f"{label} ({self.size['export_lines']:,} lines)", f"{self.r[key]:.0f}", "", None,
                         f"< {GOAL_RSS_MIB}", self.r[key] < GOAL_RSS_MIB)

    def _fake_ho(self, name: str, n_stores: int, prefix: str, items: int, item_events: bool, pg: bool = True
                 ) -> tuple[Any, list[c.FakeStore]]:
        """An HO home with ``n_stores`` store peers that exist only as keys (on SQLite unless ``pg``)."""
        from exchange.node.home import Node

        root = self.work / name
        root.mkdir(parents=True, exist_ok=True)
        ho = c.make_node(root / "ho", "ho", "ho", self.ho_database(name) if pg else None)
        ho.engine.dispose()
        stores = c.fake_stores([f"{prefix}{i:04d}" for i in range(1, n_stores + 1)])
        c.add_many_peers(ho, stores)
        child("seed", 900, url=ho.cfg.database, items=items, item_events=item_events)
        return Node.open(ho.cfg.home), stores

    def sec_fixed(self) -> None:
        """Fixed cost per bundle: bundles of one sales line from as many stores, one importer, time per bundle."""
        from exchange.wire.formats import bundle_name

        n, runs = self.size["fixed_bundles"], max(1, self.size["fixed_runs"])
        out: dict[str, float] = {}
        for kind in ("sqlite",) + (("postgresql",) if self.pg else ()):
            ho, stores = self._fake_ho(f"fixed_{kind}", n, "x", 100, False, pg=kind == "postgresql")
            rcpt, items = _recipient(ho), c.gen_items(100)
            bundles = self.work / f"fixed_{kind}" / "bundles"
            bundles.mkdir(exist_ok=True)
            for i, s in enumerate(stores, 1):
                c.seal_store_bundle(s, ho.id, rcpt, c.gen_sales(s.id, 1, items, seed=i),
                                    bundles / bundle_name(s.id, ho.id, 1))
            ho.engine.dispose()
            files = sorted(bundles.iterdir())
            per: list[float] = []
            for r in range(runs):
                home = self._clone_home(ho.cfg.home, f"fixed_{kind}_{r}", pg=kind == "postgresql")
                c.copy_files(files, home / "inbox")
                res = child("fixed", max(300.0, n * 2.0), home=str(home))
                if set(res["statuses"]) - {"APPLIED"} or res["bundles"] != n:
                    raise RuntimeError(f"fixed cost ({kind}): {res['statuses']}")
                per.append(res["seconds"] / n * 1000)
                log(f"  {kind}: {per[-1]:.1f} ms per bundle")
            out[kind] = round(median(per), 1)
            goal = GOAL_FIXED_MS[kind]
            self.row(f"fixed cost per bundle, {kind} HO ({n} one-line bundles, median of {runs}) ms",
                     f"{out[kind]:.1f}", " / ".join(f"{x:.1f}" for x in per), None, f"<= {goal:.0f}",
                     out[kind] <= goal)
        self.r["fixed_ms_per_bundle"] = out

    def sec_fanin(self) -> None:
        from exchange.wire.formats import bundle_name

        n_stores, n_lines, items_n = self.size["fanin_stores"], self.size["fanin_lines"], self.size["items"]
        t0 = time.perf_counter()
        ho, stores = self._fake_ho("fanin", n_stores, "f", items_n, False)
        ho_rcpt = _recipient(ho)
        bundles = self.work / "fanin" / "bundles"
        bundles.mkdir(exist_ok=True)
        items = c.gen_items(items_n)
        log(f"sealing {n_stores} store bundles of {n_lines} sales lines")
        for i, s in enumerate(stores, 1):
            tables = c.gen_sales(s.id, n_lines, items, seed=i)
            c.seal_store_bundle(s, ho.id, ho_rcpt, tables, bundles / bundle_name(s.id, ho.id, 1))
        files = sorted(bundles.iterdir())
        log(f"  prepared in {time.perf_counter() - t0:.1f} s")
        try:
            import exchange.receive.workers as w  # noqa: F401
            has_workers = hasattr(w, "import_parallel")
        except ImportError:
            has_workers = False
        if not has_workers:
            self.note("exchange.receive.workers.import_parallel not available: fan-in workers are N concurrent "
                      "`exchange import --home HO` processes (each takes the home's work lock, so they "
                      "serialise; this is the 'before' picture)")
        by_workers: dict[str, float] = {}
        template = ho.cfg.home
        for workers in (1, 2, 4):
            home = self._clone_home(template, f"fanin_w{workers}")
            c.copy_files(files, home / "inbox")
            secs = self._fanin_once(home, workers, len(files), has_workers)
            by_workers[str(workers)] = round(secs, 2)
            log(f"  {workers} workers: {secs:.2f} s")
        self.r.update(fanin_seconds_by_workers=by_workers, fanin_mode="import_parallel" if has_workers
                      else "concurrent `exchange import` processes")
        one, two = by_workers["1"], by_workers["2"]
        at_size = n_stores >= 1000 and n_lines >= 2000  # the size: the 60 s goal applies to it only
        for workers, secs in by_workers.items():
            goal, met = "", None
            if workers == "2" and at_size:
                goal, met = f"< {GOAL_FANIN_S:.0f}", secs < GOAL_FANIN_S
            elif workers == "4":
                goal, met = f"< {two:.1f} (2 workers)", secs < two
            self.row(f"fan-in {n_stores} stores x {n_lines:,} lines, {workers} worker(s) s", f"{secs:.1f}",
                     f"{one:.1f} with 1 worker" if workers != "1" else f"{n_stores * n_lines / secs:,.0f} rows/s",
                     one / secs if workers != "1" else None, goal, met)

    def _clone_home(self, template: Path, tag: str, pg: bool = True) -> Path:
        """A copy of an HO home with its own database (a copy of the template's; SQLite unless ``pg``)."""
        from exchange.node import config

        home = template.parent.parent / tag
        shutil.copytree(template, home)
        cfg = config.load(home)
        if self.pg and pg:
            from sqlalchemy import make_url

            tpl = make_url(cfg.database).database
            cfg.database = self.pg.create(tag, template=tpl)
        else:
            cfg.database = f"sqlite:///{home / 'exchange.db'}"
        cfg.save()
        for sub in ("outbox", "inbox", "archive/received", "archive/sent"):
            d = home / sub
            if d.exists():
                for f in d.iterdir():
                    if f.is_file():
                        f.unlink()
        return home

    def _fanin_once(self, home: Path, workers: int, expected: int, has_workers: bool) -> float:
        timeout = max(300.0, expected * 3.0)
        outbox = home / "outbox"
        t0 = time.perf_counter()
        if has_workers:
            res = child("fanin_parallel", timeout, home=str(home), workers=workers)
            if set(res["statuses"]) - {"APPLIED"}:
                raise RuntimeError(f"fan-in with {workers} workers: {res['statuses']}")
            if "cpu_seconds" in res:  # where the time goes: the importers' CPU, the server's (is it CPU-bound?)
                self.r.setdefault("fanin_importer_cpu_s_by_workers", {})[str(workers)] = round(res["cpu_seconds"], 1)
                server = res.get("server_cpu_seconds")
                if server is not None:
                    self.r.setdefault("fanin_server_cpu_s_by_workers", {})[str(workers)] = round(server, 1)
                log(f"  importer processes used {res['cpu_seconds']:.1f} s of CPU in {res['seconds']:.1f} s"
                    + (f", the PostgreSQL backends {server:.1f} s" if server is not None else ""))
        else:
            deadline = t0 + timeout
            rounds = 0
            while sum(1 for f in outbox.iterdir() if f.name.endswith(".ack")) < expected:
                rounds += 1
                if rounds > 5 or time.perf_counter() > deadline:
                    raise RuntimeError(f"fan-in with {workers} workers: not every bundle acked")
                procs = [subprocess.Popen([c.EXCHANGE, "import", "--home", str(home)], cwd=c.ROOT,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                         for _ in range(workers)]
                for p in procs:
                    try:
                        _, err = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.communicate()
                        raise RuntimeError(f"fan-in worker timed out after {timeout:.0f} s") from None
                    if p.returncode not in (0, 20, 30):
                        log(f"  worker exit {p.returncode}: {err[-300:]}")
        acks = sum(1 for f in outbox.iterdir() if f.name.endswith(".ack"))
        dt = time.perf_counter() - t0
        if acks < expected:
            raise RuntimeError(f"fan-in with {workers} workers: {acks} acks for {expected} bundles")
        return dt

    def sec_fanout(self) -> None:
        n_items, n_stores = self.size["fanout_items"], self.size["fanout_stores"]
        if self.mode == "full" and n_stores < 1000:
            self.note(f"fan-out measured on {n_stores} stores, not 1,000 (reduced default: see SIZES in "
                      "run.py); time per store is reported beside it")
        ho, _stores = self._fake_ho("fanout", n_stores, "o", n_items, True)
        log(f"export_all on the HO: {n_items:,} item changes to {n_stores} stores")
        e = child("export", FANOUT_TIMEOUT, home=str(ho.cfg.home))
        log(f"  {e['seconds']:.2f} s, {len(e['files'])} bundles, {e['bytes']:,} bytes")
        if len(e["files"]) < n_stores:
            raise RuntimeError(f"fan-out sealed {len(e['files'])} bundles for {n_stores} stores")
        per_store = e["seconds"] / n_stores
        self.r.update(fanout_seconds=round(e["seconds"], 2), fanout_bytes_total=e["bytes"],
                      fanout_bundles=len(e["files"]), fanout_seconds_per_store=round(per_store, 3),
                      peak_rss_mib_fanout=e["peak_rss_mib"])
        at_size = n_items >= 100_000 and n_stores >= 1000  # the size: the 60 s goal applies to it only
        self.row(f"fan-out {n_items:,} items -> {n_stores} stores s", f"{e['seconds']:.1f}",
                 f"{per_store:.2f} s/store", None, f"< {GOAL_FANOUT_S:.0f}" if at_size else "",
                 e["seconds"] < GOAL_FANOUT_S if at_size else None)
        self.row("fan-out bytes total", f"{e['bytes']:,}", f"{e['bytes'] / n_stores:,.0f} per store", None, "", None)

    def sec_watch(self) -> None:
        from sqlalchemy import select

        from exchange.database.capture import record_events
        from exchange.database.schema import item
        from exchange.demo.data import seed_masters
        from exchange.send.export import export_all

        n = self.size["watch_bundles"]
        ho, st, root = self.new_pair("watch", "watch_ho")
        with ho.engine.begin() as conn:
            seed_masters(conn, 200, [st.id], {st.id: "g1"})
        bundles: list[Path] = []
        for i in range(n):
            if i:
                with ho.engine.begin() as conn:
                    keys = [(k,) for k in conn.execute(select(item.c.item_id).limit(20 + i)).scalars()]
                    record_events(conn, "item", keys)
            out = export_all(ho)
            bundles += [ho.cfg.outbox / e.file for e in out]
        ho.engine.dispose()
        st.engine.dispose()
        logf = root / "run.log"
        with open(logf, "w") as lf:
            proc = subprocess.Popen([c.EXCHANGE, "run", "--home", str(st.cfg.home), "--interval", "3600"],
                                    stdout=lf, stderr=subprocess.STDOUT, cwd=c.ROOT, start_new_session=True)
        lat: list[float] = []
        try:
            deadline = time.monotonic() + 60
            while "sync:" not in logf.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"exchange run did not start: {logf.read_text()[-1000:]}")
                time.sleep(0.05)
            archive = st.cfg.archive_received
            for b in bundles:
                part = st.cfg.inbox / (b.name + ".part")
                shutil.copyfile(b, part)
                with open(part, "rb+") as f:
                    os.fsync(f.fileno())
                t0 = time.perf_counter()
                os.replace(part, st.cfg.inbox / b.name)
                while not (archive / b.name).exists():
                    if time.perf_counter() - t0 > 60 or proc.poll() is not None:
                        raise RuntimeError(f"{b.name} not applied within 60 s: {logf.read_text()[-1000:]}")
                    time.sleep(0.002)
                lat.append((time.perf_counter() - t0) * 1000)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        med, mx = median(lat), max(lat)
        self.r.update(watch_latency_ms=round(med, 1), watch_latency_ms_max=round(mx, 1),
                      watch_latencies_ms=[round(x, 1) for x in lat])
        self.row(f"watch-to-apply latency, median of {len(lat)} ms", f"{med:.0f}", "200 debounce", med / 200,
                 "", None)
        self.row("watch-to-apply latency, max ms", f"{mx:.0f}", "", None, "", None)

    def sec_profile(self) -> None:
        """cProfile of export_all and import_inbox on --profile-lines sales lines (default 100k)."""
        n, items = self.args.profile_lines, self.size["items"]
        ho, st, _root = self.new_pair("profile", "profile_ho")
        child("seed", 900, url=st.cfg.database, items=items, store="s001", sales_lines=n, seed=7)
        child("seed", 300, url=ho.cfg.database, items=items)
        RESULTS.mkdir(parents=True, exist_ok=True)
        pe = child("profile", 3600, home=str(st.cfg.home), what="export", lines=n,
                   out=str(RESULTS / "profile_export.txt"))
        c.copy_files([p for p in st.cfg.outbox.iterdir() if p.name.endswith(".bundle")], ho.cfg.inbox)
        pi = child("profile", 3600, home=str(ho.cfg.home), what="import", lines=n,
                   out=str(RESULTS / "profile_import.txt"))
        self.r["profile"] = {"lines": n, "export": pe, "import": pi}
        log(f"profiles written to {RESULTS}/profile_export.txt and profile_import.txt")


def _recipient(node: Any) -> str:
    from exchange.node import keys

    return keys.recipient(node.cfg)


# ================================================================ output


def print_table(r: dict[str, Any], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(file=file or sys.stdout, width=140)
    m = r["machine"]
    con.print(f"[bold]exchange benchmarks[/bold] ({r['mode']}), HO database: {r['ho_database']}, "
              f"stores: {r['store_database']}")
    con.print(f"machine: {m.get('nproc')} cores, {m.get('memory_gib')} GiB, {m.get('cpu', '?')}; "
              f"Python {m.get('python')}, pyarrow {m.get('pyarrow')}, SQLite {m.get('sqlite')}"
              + (f", PostgreSQL {m['postgresql']}" if m.get("postgresql") else ""))
    t = Table(show_lines=False)
    for col, just in (("figure", "left"), ("value", "right"), ("baseline (same run)", "right"),
                      ("ratio", "right"), ("goal", "left"), ("", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in r["table"]:
        verdict = row["verdict"]
        style = "green" if verdict == "met" else "red" if verdict in ("MISSED", "ERROR") else ""
        t.add_row(row["figure"], row["value"], row["baseline"], row["ratio"], row["goal"],
                  f"[{style}]{verdict}[/{style}]" if style else verdict)
    con.print(t)
    for n in r["notes"]:
        con.print(f"note: {n}")
    for k, v in r["errors"].items():
        con.print(f"[red]error in {k}: {v}[/red]")
    con.print(f"total {r['total_seconds']} s; sections: {r.get('section_seconds')}")


def markdown(r: dict[str, Any]) -> str:
    """The table of a result as Markdown (for docs/PERFORMANCE.md)."""
    m = r["machine"]
    out = [f"Mode `{r['mode']}`, HO database {r['ho_database']}, stores {r['store_database']}; "
           f"{m.get('nproc')} cores, {m.get('memory_gib')} GiB, {m.get('cpu', '?')}, Python {m.get('python')}, "
           f"pyarrow {m.get('pyarrow')}, SQLite {m.get('sqlite')}"
           + (f", PostgreSQL {m['postgresql'].split(' ')[0]}" if m.get("postgresql") else "") + ".", "",
           "| figure | value | baseline (same run) | ratio | goal | |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for row in r["table"]:
        cells = [row[k].replace("|", "\\|") for k in ("figure", "value", "baseline", "ratio", "goal", "verdict")]
        cells[5] = f"**{cells[5]}**" if cells[5] in ("MISSED", "ERROR") else cells[5]
        out.append("| " + " | ".join(cells) + " |")
    for n in r["notes"]:
        out.append(f"\nNote: {n}")
    for k, v in r["errors"].items():
        out.append(f"\nError in {k}: {v}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--pg", help="SQLAlchemy URL of a PostgreSQL server for the HO side "
                                "(default: $EXCHANGE_TEST_PG); scratch databases are created and dropped")
    p.add_argument("--no-pg", action="store_true", help="SQLite only, even if EXCHANGE_TEST_PG is set")
    p.add_argument("--only", help=f"comma-separated sections ({','.join(SECTIONS)}); import runs export too (it needs its bundles)")
    p.add_argument("--size", action="append", metavar="KEY=N", help="override a size (see SIZES in run.py)")
    p.add_argument("--profile", action="store_true", help="also cProfile export and import (results/profile_*.txt)")
    p.add_argument("--profile-lines", type=int, default=100_000)
    p.add_argument("--workdir", help="keep the generated homes here (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--out", help="JSON file to write (default: tools/bench/results/latest.json, <time>-<mode>.json, and <mode>.json for a whole run)")
    p.add_argument("--markdown", metavar="JSON", help="print a saved result's table as Markdown and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    bench = Bench(args)
    r = bench.run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    ignore = RESULTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# benchmark output: machine-specific, never committed\n*\n")
    text = json.dumps(r, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    else:  # every run kept under its time; <mode>.json only by a whole run (a partial one never hides it)
        partial = bool(args.only or args.size)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        (RESULTS / f"{stamp}-{r['mode']}{'-partial' if partial else ''}.json").write_text(text)
        (RESULTS / "latest.json").write_text(text)
        if not partial:
            (RESULTS / f"{r['mode']}.json").write_text(text)
    if args.json:
        print(json.dumps(r, default=str))
    else:
        print_table(r)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
