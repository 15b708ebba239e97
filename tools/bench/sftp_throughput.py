#!/usr/bin/env python3
"""SFTP throughput: exchange's SFTP transport against OpenSSH's ``sftp``, same run.

    .venv/bin/python tools/bench/sftp_throughput.py [--size-mib 256] [--rounds 3] [--json] [--stock]

Starts a private OpenSSH server on 127.0.0.1 exactly as the tests do
(tests/sshd.py: needs root and /usr/sbin/sshd), makes one Ed25519 key and
one known_hosts file (pinned with ``trust_host``), and moves one random file
up (store to HO: ``up/``) and down (HO to store: ``down/``) with both clients,
alternating them in every round so both see the same machine load. Reports
the median MB/s (10^6 bytes/s) of each and the ratio; the goal is >= 0.80.

Both clients log in as the store's chrooted account. The timings include the
connection and login. exchange's timings also include what OpenSSH's
``sftp put/get`` skip: the ``.part`` copy, fsync at the receiving end, the
rename, and (download) removing the remote file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import paramiko  # noqa: E402
from sshd import SshdServer, unavailable_reason  # noqa: E402

from exchange.transport.sftp import SftpTransport  # noqa: E402
from exchange.transport.sftp.address import trust_host  # noqa: E402

GOAL = 0.80
UP_NAME = "s001.ho.0000000001.bundle"
DOWN_NAME = "ho.s001.0000000001.bundle"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n


def place(src: Path, dst: Path) -> None:
    """Put a file in the server's folder without timing it (a hard link when possible)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class Bench:
    def __init__(self, srv: SshdServer, work: Path, size: int, openssh_cipher: str | None) -> None:
        self.srv = srv
        self.openssh_cipher_option = openssh_cipher
        self.work = work
        self.size = size
        self.acc = srv.accounts["s001"]
        self.address = srv.store_address("s001")
        self.key_path = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f",
                        str(self.key_path)], check=True)
        srv.authorize(self.acc.user, (work / "id_ed25519.pub").read_text())
        self.fingerprint = trust_host(work, self.address)
        self.known_hosts = work / "known_hosts"
        self.key = paramiko.Ed25519Key.from_private_key_file(str(self.key_path))
        self.data = work / UP_NAME
        random_file(self.data, size)
        self.digest = sha256(self.data)
        self.dest = work / "dest"
        self.dest.mkdir()
        self.cipher = "?"

    def _transport(self) -> SftpTransport:
        return SftpTransport(self.address, key=self.key, known_hosts=self.known_hosts, side="store")

    def _sftp(self, batch: str, verbose: bool = False) -> str:
        script = self.work / "batch"
        script.write_text(batch + "\n")
        cmd = ["sftp", "-v" if verbose else "-q", "-b", str(script), "-i", str(self.key_path),
               "-P", str(self.srv.port), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
               "-o", "GlobalKnownHostsFile=/dev/null", f"{self.acc.user}@127.0.0.1"]
        if self.openssh_cipher_option:
            cmd[1:1] = ["-c", self.openssh_cipher_option]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"sftp failed: {run.stderr.strip()}")
        return run.stderr

    def openssh_cipher(self) -> str:
        log = self._sftp("pwd", verbose=True)
        m = re.search(r"kex: server->client cipher: (\S+)", log)
        return m.group(1) if m else "?"

    def _timed(self, fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return self.size / (time.perf_counter() - t0) / 1e6

    def ours_up(self) -> float:
        def run() -> None:
            with self._transport() as t:
                t.push([self.data], "ho")
        rate = self._timed(run)
        self._check(self.acc.folder / "up" / UP_NAME)
        return rate

    def openssh_up(self) -> float:
        rate = self._timed(lambda: self._sftp(f"put {self.data} up/{UP_NAME}"))
        self._check(self.acc.folder / "up" / UP_NAME)
        return rate

    def ours_down(self) -> float:
        place(self.data, self.acc.folder / "down" / DOWN_NAME)

        def run() -> None:
            with self._transport() as t:
                got = t.pull("s001", self.dest)
            assert [p.name for p in got] == [DOWN_NAME], got
        rate = self._timed(run)
        self._check(self.dest / DOWN_NAME)
        return rate

    def openssh_down(self) -> float:
        place(self.data, self.acc.folder / "down" / DOWN_NAME)
        rate = self._timed(lambda: self._sftp(f"get down/{DOWN_NAME} {self.dest / DOWN_NAME}"))
        self._check(self.dest / DOWN_NAME)
        (self.acc.folder / "down" / DOWN_NAME).unlink()
        return rate

    def _check(self, path: Path) -> None:
        if sha256(path) != self.digest:
            raise RuntimeError(f"{path}: content differs from the source")
        path.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--openssh-cipher", help="make OpenSSH use this cipher (default: its own choice, "
                                             "chacha20-poly1305), e.g. aes128-gcm@openssh.com")
    ap.add_argument("--stock", action="store_true",
                    help="measure the fallback: the fast path disabled as a missing paramiko internal disables it")
    args = ap.parse_args()
    if args.stock:
        from exchange.transport.sftp import fastpath, session_kind

        fastpath.REQUIRED = (*fastpath.REQUIRED, (paramiko.SFTPClient, "_disabled_by_bench"))
        session_kind.cache_clear()
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    samples: dict[str, list[float]] = {k: [] for k in ("ours_up", "openssh_up", "ours_down", "openssh_down")}
    load_before = os.getloadavg()[0]
    with SshdServer(stores=("s001",)) as srv, tempfile.TemporaryDirectory(prefix="sftp-bench-") as tmp:
        bench = Bench(srv, Path(tmp), size, args.openssh_cipher)
        openssh_cipher = bench.openssh_cipher()
        for r in range(args.rounds):
            # alternate who goes first, so neither always meets a warm or a cold cache
            order = ("ours", "openssh") if r % 2 == 0 else ("openssh", "ours")
            for direction in ("up", "down"):
                for who in order:
                    samples[f"{who}_{direction}"].append(getattr(bench, f"{who}_{direction}")())
        with bench._transport() as t:
            ours_cipher = str(t._attempt("cipher", lambda s: getattr(s.client.get_transport(),
                                                                     "remote_cipher", "?")))
    result: dict[str, Any] = {
        "size_mib": args.size_mib, "rounds": args.rounds, "unit": "MB/s (1e6 bytes/s), median of rounds",
        "cipher": {"exchange": ours_cipher, "openssh": openssh_cipher},
        "paramiko": paramiko.__version__, "path": "stock" if args.stock else "fast", "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "goal_ratio": GOAL, "samples": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
    }
    ok = True
    for direction in ("up", "down"):
        ours = statistics.median(samples[f"ours_{direction}"])
        theirs = statistics.median(samples[f"openssh_{direction}"])
        ratio = ours / theirs
        ok &= ratio >= GOAL
        result[direction] = {"exchange": round(ours, 1), "openssh": round(theirs, 1), "ratio": round(ratio, 2)}
    result["goal_met"] = ok
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"SFTP throughput, {args.size_mib} MiB file, median of {args.rounds} rounds, 127.0.0.1 "
              f"(load avg {result['loadavg_1min'][0]} -> {result['loadavg_1min'][1]})")
        print(f"ciphers: exchange {ours_cipher}, OpenSSH sftp {openssh_cipher}; paramiko {paramiko.__version__} "
              f"({result['path']} path)")
        print(f"{'direction':<10} {'exchange MB/s':>14} {'OpenSSH MB/s':>13} {'ratio':>6}  goal >= {GOAL:.2f}")
        for direction in ("up", "down"):
            d = result[direction]
            print(f"{direction:<10} {d['exchange']:>14.1f} {d['openssh']:>13.1f} {d['ratio']:>6.2f}  "
                  f"{'met' if d['ratio'] >= GOAL else 'NOT met'}")
        for k, vs in result["samples"].items():
            print(f"  {k:<13} {' '.join(f'{v:7.1f}' for v in vs)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
