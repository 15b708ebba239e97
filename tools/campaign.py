#!/usr/bin/env python3
"""The reliability and security campaign, long form (the permanent tests are its short form).

    .venv/bin/python tools/campaign.py                 # short: 20 crash runs, the test files once
    .venv/bin/python tools/campaign.py --long          # 200 crash runs, 20 000 hostile cases
    .venv/bin/python tools/campaign.py --long --runs 60 --json
    .venv/bin/python tools/campaign.py --only crash --runs 60 --seed 7

Sections (``--only``, comma separated):

crash     R runs of the crash harness of tests/test_crash.py (its ``build`` network:
          an HO and a store with data flowing both ways in several bundles per
          stream). Runs alternate between a named kill point (every point of
          ``exchange.faults.ALL_POINTS`` in both sync orders, the repeated
          ``point:N`` variants, and ``exchange archive prune`` killed at its
          checkpoint) and a random kill time (an ``exchange sync``, or a prune,
          started and SIGKILLed after a random delay). Then ordinary syncs until
          everything is PROCESSED, and the checks: both databases hold the same
          documents (row counts per table, per-document SHA-256 over every row,
          control totals), no document version travelled in two bundles, every
          (stream, seq) names one file, and ``exchange audit verify`` passes on
          every node's archive. Figures: kill points exercised, runs, kills that
          landed, documents checked, lost, applied twice, audit failures.
hostile   tests/test_hostile.py with more examples (HOSTILE_*_EXAMPLES); figure: cases run.
limits    tests/test_limits.py; figures: time and extra memory of every bomb.
diskfull  tests/test_diskfull.py (tmpfs when root may mount, else injected ENOSPC).
identity  tests/test_identity.py.
atheris   coverage-guided fuzzing (libFuzzer through atheris, when installed: pip install
          atheris) of the reader and the importer's content checks, for --seconds; the
          first byte of an input picks the layer it replaces in a genuine bundle or ack
          (raw file, manifest JSON re-signed, inner tar re-encrypted and re-signed, a
          Parquet table, ack JSON re-signed, raw ack), so mutations reach every layer.
          Not in the default sections; figures: executions, coverage, crashes.

Exit status 0 when every check passed. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

PY = sys.executable


# ---------------------------------------------------------------- crash runs

@dataclass
class Run:
    index: int
    kind: str  # point | random | prune-point | prune-random
    spec: str  # the kill point (point:N), or the random delay in seconds
    order: str
    killed: str = ""  # the node whose process died by SIGKILL ("" if the process ended first)
    rounds: int = 0
    documents: int = 0
    rows_compared: int = 0
    lost: int = 0
    applied_twice: int = 0
    audit_ok: bool = True
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EXCHANGE_CRASH_AT", "EXCHANGE_HOME")}
    return env


def _sync_cmd(home: Path) -> list[str]:
    return [PY, "-m", "exchange", "sync", "--home", str(home)]


def _prune_cmd(home: Path) -> list[str]:
    return [PY, "-m", "exchange", "archive", "prune", "--home", str(home), "--older-than", "0", "--json"]


def _run(cmd: list[str], crash: str | None = None) -> subprocess.CompletedProcess[str]:
    env = _env()
    if crash:
        env["EXCHANGE_CRASH_AT"] = crash
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _kill_after(cmd: list[str], delay: float) -> int:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds unless it ended; its return code."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return p.returncode


def _row_counts(net: Any) -> tuple[int, list[str]]:
    """Per stream, document type and table: rows of the delivered documents on both sides."""
    from enginehelpers import _streams, deliveries

    from exchange.database import rows

    compared, problems = 0, []
    for sender, receiver in _streams(net):
        by_type: dict[str, list[str]] = {}
        for (t, k), (op, _v, st, _seq) in deliveries(sender, receiver.id).items():
            if op == "U" and st == "PROCESSED":
                by_type.setdefault(t, []).append(k)
        for t, ks in by_type.items():
            dt = sender.catalog.get(t)
            for tname in dt.tables():
                counts = []
                for node in (sender, receiver):
                    with node.engine.connect() as conn:
                        counts.append(rows.read_docs(conn, node.catalog.table(tname), dt.key, ks).num_rows)
                compared += 1
                if counts[0] != counts[1]:
                    problems.append(f"{sender.id}->{receiver.id} {tname}: {counts[0]} rows sent, {counts[1]} held")
    return compared, problems


def _audit(net: Any) -> list[str]:
    from exchange.audit.verify import verify_archive

    out = []
    for node in net.nodes:
        rep = verify_archive(node.cfg.home / "archive", trust=node.trust)
        out += [f"audit {node.id}: {f.line()}" for f in rep.errors]
    return out


def _check(net: Any, run: Run) -> None:
    from enginehelpers import check_net

    c = check_net(net)
    run.documents, run.lost, run.applied_twice = c.documents, c.lost, c.applied_twice
    run.problems += c.problems
    run.rows_compared, problems = _row_counts(net)
    run.problems += problems
    audit = _audit(net)
    run.audit_ok = not audit
    run.problems += audit


def _checkpoint_checks(home: Path, run: Run) -> None:
    """After a prune ran to its end: every file a checkpoint records is gone, the archive verifies."""
    from exchange.audit.prune import CHECKPOINTS_DIR, read_checkpoint
    from exchange.audit.verify import verify_archive
    from exchange.node.home import Node

    node = Node.open(home)
    try:
        archive = home / "archive"
        left = {p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file()}
        cps = sorted((archive / CHECKPOINTS_DIR).glob("*")) if (archive / CHECKPOINTS_DIR).is_dir() else []
        if not cps:
            run.problems.append("prune left no checkpoint")
        for cp in cps:
            if cp.suffix != ".checkpoint":
                run.problems.append(f"stray file {cp.name} in checkpoints/")
                continue
            still = {r["path"] for r in read_checkpoint(cp, node.trust).removed} & left
            if still:
                run.problems.append(f"{cp.name}: {len(still)} recorded files not deleted")
        rep = verify_archive(archive, trust=node.trust)
        if rep.errors:
            run.audit_ok = False
            run.problems += [f"audit after prune: {f.line()}" for f in rep.errors]
    finally:
        node.engine.dispose()


def crash_run(index: int, kind: str, spec: str, order: str, root: Path, rng: random.Random,
              window: tuple[float, float, float]) -> Run:
    import test_crash as tc

    run = Run(index, kind, spec, order)
    t0 = time.monotonic()
    net = tc.build(root / f"run-{index}")
    try:
        chain = tc.ORDERS[order]
        if kind == "point":
            for nid in chain:
                p = tc.run_sync(net.node(nid).cfg.home, spec)
                if p.returncode == -9:
                    run.killed = nid
                    why = tc.evidence(net, nid, spec.split(":")[0])
                    if why:
                        run.problems.append(why)
                    break
                if p.returncode != 0:
                    run.problems.append(f"sync {nid}: rc={p.returncode} {p.stderr[-500:]}")
            if not run.killed:
                run.problems.append(f"no sync reached {spec} in order {chain}")
        elif kind == "random":
            at = rng.randrange(len(chain))
            delay = rng.uniform(window[0] * 0.95, window[1] * 1.05)
            run.spec = f"{chain[at]}@{delay:.2f}s"
            for i, nid in enumerate(chain):
                if i == at:
                    rc = _kill_after(_sync_cmd(net.node(nid).cfg.home), delay)
                    run.killed = nid if rc == -9 else ""
                    if rc not in (0, -9):
                        run.problems.append(f"sync {nid} ended with rc={rc}")
                else:
                    p = tc.run_sync(net.node(nid).cfg.home, "")
                    if p.returncode != 0:
                        run.problems.append(f"sync {nid}: rc={p.returncode} {p.stderr[-500:]}")
        net.reopen()
        run.rounds = net.settle(max_rounds=6)
        _check(net, run)
        if kind.startswith("prune"):
            home = net.ho.cfg.home if rng.random() < 0.6 else net.store("s001").cfg.home
            net.dispose()
            time.sleep(max(0.0, 1.05 - (time.monotonic() % 1.0)))  # bundles older than "now" to the second
            time.sleep(1.0)
            if kind == "prune-point":
                p = _run(_prune_cmd(home), spec)
                run.killed = home.name if p.returncode == -9 else ""
                if p.returncode != -9:
                    run.problems.append(f"prune not killed at {spec}: rc={p.returncode}")
            else:
                delay = rng.uniform(window[2] * 0.5, window[2] * 1.05)  # prune starts faster (no pyarrow)
                run.spec = f"{home.name}@{delay:.2f}s"
                rc = _kill_after(_prune_cmd(home), delay)
                run.killed = home.name if rc == -9 else ""
            from exchange.audit.verify import verify_archive
            from exchange.node.home import Node

            node = Node.open(home)
            if verify_archive(home / "archive", trust=node.trust).errors:  # the interrupted state verifies
                run.audit_ok = False
                run.problems.append("audit failed right after the killed prune")
            node.engine.dispose()
            p = _run(_prune_cmd(home))
            if p.returncode != 0:
                run.problems.append(f"prune after the kill: rc={p.returncode} {p.stderr[-500:]}")
            else:
                _checkpoint_checks(home, run)
    except Exception as exc:  # a run that breaks is a finding, not the end of the campaign
        run.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        net.dispose()
        run.seconds = time.monotonic() - t0
        shutil.rmtree(root / f"run-{index}", ignore_errors=True)
    return run


def _plan(runs: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, spec, order) for each run: named points and random kill times, alternating."""
    import test_crash as tc

    from exchange.faults import POINTS, PRUNE_POINTS

    named: list[tuple[str, str, str]] = [("point", p, o) for p in POINTS for o in tc.ORDERS]
    named += [("prune-point", f"{p}:{n}", "down") for p in PRUNE_POINTS for n in (1, 2)]
    named += [("point", f"{p}:{n}", o) for p, o, most in tc.REPEATED for n in range(2, most + 1)]
    plan = []
    for i in range(runs):
        if i % 2 == 0:
            plan.append(named[(i // 2) % len(named)])
        else:
            kind = "prune-random" if (i // 2) % 6 == 5 else "random"
            plan.append((kind, "", rng.choice(sorted(tc.ORDERS))))
    return plan


def _calibrate(root: Path) -> tuple[float, float, float]:
    """(seconds a new process spends importing exchange, seconds an uninterrupted ``exchange sync``
    of the HO takes on the harness network, seconds a prune of its archive takes): random kills aim
    between the start-up time and the end, where the work is."""
    import test_crash as tc

    starts = []
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run([PY, "-c", "import exchange.cli, exchange.service.sync, exchange.receive.importer, exchange.send.export, "
                        "pyarrow.parquet"], check=True, env=_env())
        starts.append(time.monotonic() - t0)
    net = tc.build(root / "calibrate")
    try:
        t0 = time.monotonic()
        tc.run_sync(net.ho.cfg.home, "")
        sync_seconds = time.monotonic() - t0
        net.reopen()
        net.settle()
        net.dispose()
        time.sleep(1.1)
        t0 = time.monotonic()
        _run(_prune_cmd(net.ho.cfg.home))
        return sorted(starts)[1], sync_seconds, time.monotonic() - t0
    finally:
        net.dispose()
        shutil.rmtree(root / "calibrate", ignore_errors=True)


def crash_section(runs: int, seed: int, echo: Any) -> dict[str, Any]:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="campaign-crash-"))
    results: list[Run] = []
    try:
        window = _calibrate(root)
        echo(f"crash: {runs} runs (seed {seed}); a process starts in {window[0]:.2f} s, an uninterrupted "
             f"HO sync takes {window[1]:.2f} s, a prune {window[2]:.2f} s: random kills fall in the second half")
        for i, (kind, spec, order) in enumerate(_plan(runs, rng)):
            r = crash_run(i, kind, spec, order, root, rng, window)
            results.append(r)
            mark = "ok" if not r.problems else "PROBLEM"
            echo(f"  {i + 1:>4}/{runs} {kind:<12} {r.spec:<26} {r.order:<4} killed={r.killed or '-':<5} "
                 f"rounds={r.rounds} docs={r.documents} lost={r.lost} twice={r.applied_twice} "
                 f"{r.seconds:5.1f}s {mark}")
            for p in r.problems[:5]:
                echo(f"         ! {p}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    points = sorted({r.spec.split(":")[0] for r in results if r.kind.endswith("point") and r.killed})
    kinds = Counter(r.kind for r in results)
    landed = Counter(r.kind for r in results if r.killed)
    return {
        "kill_window_seconds": {"start": round(window[0], 2), "sync": round(window[1], 2),
                                "prune": round(window[2], 2)},
        "runs": len(results),
        "runs_by_kind": dict(kinds),
        "kills_landed_by_kind": dict(landed),
        "kill_points_exercised": points,
        "kill_points_count": len(points),
        "random_kill_times": sum(1 for r in results if r.kind.endswith("random") and r.killed),
        "documents_checked": sum(r.documents for r in results),
        "table_row_counts_compared": sum(r.rows_compared for r in results),
        "documents_lost": sum(r.lost for r in results),
        "documents_applied_twice": sum(r.applied_twice for r in results),
        "audit_failures": sum(1 for r in results if not r.audit_ok),
        "runs_with_problems": sum(1 for r in results if r.problems),
        "seconds": round(sum(r.seconds for r in results), 1),
        "problems": [f"run {r.index} ({r.kind} {r.spec} {r.order}): {p}" for r in results for p in r.problems][:50],
        "ok": all(not r.problems for r in results),
    }


# ---------------------------------------------------------------- the test files, longer

def _pytest(path: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = subprocess.run([PY, "-m", "pytest", path, "-q", "-s", "-p", "no:cacheprovider",
                        "-W", "ignore::DeprecationWarning"],
                       capture_output=True, text=True, cwd=ROOT, env={**_env(), **(env or {})}, timeout=7200)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def _outcome(text: str) -> dict[str, int]:
    last = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)",
                                             last[-1] if last else "")}


def hostile_section(long: bool, echo: Any) -> dict[str, Any]:
    bundles, acks = (15000, 5000) if long else (1500, 600)
    echo(f"hostile: tests/test_hostile.py with {bundles} bundle and {acks} ack examples")
    rc, out, took = _pytest("tests/test_hostile.py", {"HOSTILE_BUNDLE_EXAMPLES": str(bundles),
                                                      "HOSTILE_ACK_EXAMPLES": str(acks)})
    m = re.search(r"hostile cases run: (\d+)", out)
    outcomes = dict(re.findall(r"^  ((?:store|ho) [^:]+: [A-Z]+[^:\n]*): (\d+)$", out, re.M))
    res = {"cases_run": int(m.group(1)) if m else 0, "outcomes": {k: int(v) for k, v in outcomes.items()},
           "tests": _outcome(out), "seconds": round(took, 1), "ok": rc == 0}
    echo(f"  cases run: {res['cases_run']} in {took:.0f} s: {'ok' if rc == 0 else 'FAILED'}")
    if rc:
        echo(out[-3000:])
    return res


def limits_section(echo: Any) -> dict[str, Any]:
    echo("limits: tests/test_limits.py")
    rc, out, took = _pytest("tests/test_limits.py")
    rows = re.findall(r"^  (.+?)\s+([\d.]+) ms\s+([\d.]+) MiB  (.+)$", out, re.M)
    cases = [{"case": c.strip(), "ms": float(ms), "extra_mib": float(mib), "what": w} for c, ms, mib, w in rows]
    for c in cases:
        echo(f"  {c['case']:<52} {c['ms']:8.1f} ms {c['extra_mib']:6.1f} MiB  {c['what']}")
    if rc:
        echo(out[-3000:])
    return {"cases": cases, "tests": _outcome(out), "seconds": round(took, 1), "ok": rc == 0}


def tests_section(name: str, path: str, echo: Any) -> dict[str, Any]:
    rc, out, took = _pytest(path)
    res = {"tests": _outcome(out), "seconds": round(took, 1), "ok": rc == 0}
    echo(f"{name}: {path}: {res['tests']} in {took:.0f} s")
    if rc:
        echo(out[-3000:])
    return res


# ---------------------------------------------------------------- atheris

BUNDLE_NAME = "ho.s001.0000000001.bundle"
ACK_NAME = "s001.ho.0000000001.ack"
LAYERS = ("raw bundle", "manifest", "inner tar", "parquet", "ack json", "raw ack")


def atheris_child(workdir: str, fuzzer_args: list[str]) -> None:  # pragma: no cover - runs under libFuzzer
    """The fuzz target, in a process of its own (libFuzzer never returns)."""
    import hashlib
    import io

    import atheris

    with atheris.instrument_imports():
        from exchange.errors import ExchangeError
        from exchange.receive import importer
        from exchange.wire import bundle, tarfmt
        from exchange.wire.crypto import age, sshsig
        from exchange.wire.formats import ACK_MEMBERS, BUNDLE_MEMBERS, SIG_NAMESPACE
    from enginehelpers import add_item, make_net
    from helpers_bundle import assemble, layout, resign

    from exchange.database.capture import record_events
    from exchange.send.export import export_all

    work = Path(workdir)
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    net = make_net(work / "net", stores=("s001",))
    with net.ho.engine.begin() as conn:
        add_item(conn, "I0000001")
        record_events(conn, "item", [("I0000001",)])
    export_all(net.ho)
    st, ho = net.store("s001"), net.ho
    genuine = (ho.cfg.outbox / BUNDLE_NAME).read_bytes()
    lay = layout(genuine)
    recipient = (st.cfg.keys_dir / "node.age.pub").read_text().strip()
    plain = io.BytesIO()
    age.decrypt(io.BytesIO(lay.payload), plain, st.identities)
    inner_tar = plain.getvalue()
    src, inner = io.BytesIO(inner_tar), []
    while (m := tarfmt.read_header(src)) is not None:
        inner.append((m.name, src.read(m.size)))
        tarfmt.skip_padding(src, m.size)
    ack = bundle.build_ack(key=st.signing_key, acker="s001", sender="ho", seq=1,
                           bundle_sha256=hashlib.sha256(genuine).hexdigest(),
                           manifest_sha256=hashlib.sha256(lay.manifest).hexdigest(), result="APPLIED",
                           recipients=[st.cfg.peer("ho").recipient])
    ack_json = ack[512:512 + tarfmt.read_header(io.BytesIO(ack)).size]  # type: ignore[union-attr]
    ack_src, ack_members = io.BytesIO(ack), []
    while (am := tarfmt.read_header(ack_src)) is not None:
        ack_members.append((am.name, ack_src.read(am.size)))
        tarfmt.skip_padding(ack_src, am.size)
    ack_details = ack_members[2:]  # ack v2: the encrypted details, kept so re-signed cases reach them
    seeds = [genuine, lay.manifest, inner_tar, inner[2][1], ack_json, ack]
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(bytes([i]) + seed)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    bpath, apath = scratch / BUNDLE_NAME, scratch / ACK_NAME

    def sealed_with(members: list[tuple[str, bytes]], plain_tar: bytes | None = None) -> bytes:
        if plain_tar is None:
            buf = io.BytesIO()
            for n, d in members:
                tarfmt.write_member(buf, n, d, lay.mtime)
            buf.write(tarfmt.END)
            plain_tar = buf.getvalue()
        out = io.BytesIO()
        age.encrypt(io.BytesIO(plain_tar), out, [recipient])

        def listing(obj: dict[str, Any]) -> None:
            obj["inner"] = [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                            for n, d in members]
        return bytes(resign(genuine, ho.signing_key, listing, payload=out.getvalue()))

    def target(data: bytes) -> None:
        if not data:
            return
        layer, body = data[0] % len(LAYERS), data[1:]
        if layer == 0:
            blob, is_ack = body, False
        elif layer == 1:
            blob = assemble([(BUNDLE_MEMBERS[0], body), (BUNDLE_MEMBERS[1], sshsig.sign(ho.signing_key, body,
                             SIG_NAMESPACE)), (BUNDLE_MEMBERS[2], lay.payload)], lay.mtime)
            is_ack = False
        elif layer == 2:
            members: list[tuple[str, bytes]] = []
            s2 = io.BytesIO(body)
            try:
                while (m2 := tarfmt.read_header(s2)) is not None and len(members) < 8:
                    members.append((m2.name, s2.read(min(m2.size, 1 << 20))))
                    tarfmt.skip_padding(s2, m2.size)
            except ExchangeError:
                members = members or inner
            blob, is_ack = sealed_with(members or inner, plain_tar=body), False
        elif layer == 3:
            blob, is_ack = sealed_with([inner[0], inner[1], (inner[2][0], body), *inner[3:]]), False
        elif layer == 4:
            blob = assemble([(ACK_MEMBERS[0], body), (ACK_MEMBERS[1], sshsig.sign(st.signing_key, body,
                             SIG_NAMESPACE)), *ack_details])
            is_ack = True
        else:
            blob, is_ack = body, True
        if is_ack:
            apath.write_bytes(blob)
            try:
                bundle.read_ack(apath, ho.trust, me="ho")
            except ExchangeError:
                pass
            return
        bpath.write_bytes(blob)
        try:
            with bundle.open_bundle(bpath, trust=st.trust, identities=st.identities, me="s001",
                                    workdir=scratch) as o:
                importer._documents(o)
                events = importer._events(o)
                for doc_type in set(events["doc_type"]) & set(st.catalog.names):
                    dt = st.catalog.get(doc_type)
                    importer._check_keys(st, dt, [k for t, k in zip(events["doc_type"], events["doc_key"],
                                                                     strict=True) if t == doc_type])
                    for t in dt.tables():
                        if t in o.tables:
                            importer._check_table(st, dt, t, o.table(t))
        except ExchangeError:
            pass

    atheris.Setup([sys.argv[0], *fuzzer_args, str(corpus)], target)
    atheris.Fuzz()


def atheris_section(seconds: int, echo: Any) -> dict[str, Any]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        echo("atheris: not installed (pip install atheris); skipped")
        return {"skipped": "atheris is not installed", "ok": True}
    work = Path(tempfile.mkdtemp(prefix="campaign-atheris-"))
    try:
        echo(f"atheris: fuzzing the reader for {seconds} s ({', '.join(LAYERS)})")
        t0 = time.monotonic()
        p = subprocess.run([PY, str(Path(__file__).resolve()), "--atheris-child", str(work),
                            f"-max_total_time={seconds}", "-max_len=262144", "-rss_limit_mb=3072",
                            "-timeout=30", f"-artifact_prefix={work}/"],
                           capture_output=True, text=True, env=_env(), timeout=seconds + 600)
        took = time.monotonic() - t0
        log = p.stdout + p.stderr
        runs = re.findall(r"Done (\d+) runs in (\d+) second", log)
        cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
        crashes = sorted(x.name for x in work.iterdir() if x.name.startswith(("crash-", "timeout-", "oom-")))
        res = {"executions": int(runs[-1][0]) if runs else 0, "coverage": int(cov[-1][0]) if cov else 0,
               "features": int(cov[-1][1]) if cov else 0, "seconds": round(took, 1), "crashes": crashes,
               "ok": p.returncode == 0 and not crashes}
        echo(f"  executions {res['executions']}, coverage {res['coverage']} edges, {res['features']} features, "
             f"crashes {len(crashes)}")
        if not res["ok"]:
            echo(log[-4000:])
            keep = Path(tempfile.mkdtemp(prefix="campaign-atheris-crash-"))
            for c in crashes:
                shutil.copy(work / c, keep / c)
            res["artifacts"] = str(keep)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- main

SECTIONS = ("crash", "hostile", "limits", "diskfull", "identity", "atheris")
DEFAULT_SECTIONS = ("crash", "hostile", "limits", "diskfull", "identity")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--long", action="store_true", help="the long form: 200 crash runs, 20 000 hostile cases")
    ap.add_argument("--runs", type=int, help="crash runs (default 200 with --long, else 20)")
    ap.add_argument("--seed", type=int, default=20261125, help="random seed of the crash plan and kill times")
    ap.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                    help=f"sections to run ({', '.join(SECTIONS)}; default all but atheris)")
    ap.add_argument("--seconds", type=int, default=300, help="atheris: fuzzing time (default 300)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (figures) on stdout")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    runs = args.runs or (200 if args.long else 20)

    def echo(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    report: dict[str, Any] = {"long": args.long, "seed": args.seed}
    t0 = time.monotonic()
    if "crash" in only:
        report["crash"] = crash_section(runs, args.seed, echo)
        c = report["crash"]
        echo(f"crash: kill points exercised {c['kill_points_count']} ({', '.join(c['kill_points_exercised'])}); "
             f"runs {c['runs']}; random kill times landed {c['random_kill_times']}; documents checked "
             f"{c['documents_checked']}; lost {c['documents_lost']}; applied twice "
             f"{c['documents_applied_twice']}; audit failures {c['audit_failures']}")
    if "hostile" in only:
        report["hostile"] = hostile_section(args.long, echo)
    if "limits" in only:
        report["limits"] = limits_section(echo)
    if "diskfull" in only:
        report["diskfull"] = tests_section("diskfull", "tests/test_diskfull.py", echo)
    if "identity" in only:
        report["identity"] = tests_section("identity", "tests/test_identity.py", echo)
    if "atheris" in only:
        report["atheris"] = atheris_section(args.seconds, echo)
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        echo(f"campaign {'passed' if report['ok'] else 'FOUND PROBLEMS'} in {report['seconds']:.0f} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--atheris-child"]:
        atheris_child(sys.argv[2], sys.argv[3:])
    sys.exit(main())
