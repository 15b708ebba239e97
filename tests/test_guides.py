"""The README and the guides, followed literally (issue #16): what they promise holds.

Real node homes (the demo's), the real service as a subprocess, the real CLI.
"""

from __future__ import annotations

import os
import sys
import shutil
import subprocess
from pathlib import Path

from test_service import new_bundles, received_status, service_factory, wait_for  # noqa: F401

# --- docs/SERVICE.md: "applies a file within a second of its landing", whatever way it lands ------


def test_a_bundle_moved_into_the_inbox_with_mv_is_applied(homes: Path, service_factory: object) -> None:
    """`mv` from a folder the service does not watch: inotify says IN_MOVED_TO, which watchdog
    used to report as "created" (ignored as maybe half written) so the file waited for the next
    scheduled sync (an hour here)."""
    store = homes / "s001"
    first, second = new_bundles(homes, 2)
    staging = homes / "staging"  # same filesystem as the inbox, outside it: a rename, not a copy
    staging.mkdir()
    shutil.copy(first, staging / first.name)
    shutil.copy(second, staging / second.name)
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    assert received_status(store, first.name) is None
    subprocess.run(["mv", str(staging / first.name), str(store / "inbox" / first.name)], check=True)
    assert wait_for(lambda: received_status(store, first.name) == "APPLIED", 10), svc.text()
    os.rename(staging / second.name, store / "inbox" / second.name)  # the same from a program
    assert wait_for(lambda: received_status(store, second.name) == "APPLIED", 10), svc.text()
    assert svc.stop() == 0


def test_a_bundle_written_directly_into_the_inbox_is_applied(homes: Path, service_factory: object) -> None:
    """`cp` straight into the inbox (no rename): the close after the write wakes the service."""
    store = homes / "s001"
    bundle = new_bundles(homes)[0]
    svc = service_factory(store)  # type: ignore[operator]
    svc.wait_started()
    subprocess.run(["cp", str(bundle), str(store / "inbox" / bundle.name)], check=True)
    assert wait_for(lambda: received_status(store, bundle.name) == "APPLIED", 10), svc.text()
    assert svc.stop() == 0


# --- tools/demo.sh: its last lines say how to run exchange and what to try next -----------------


def _demo(tmp_path: Path, path_env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "exchange", "demo", "--home", "demo", "--items", "5", "--sales", "2"],
                         cwd=tmp_path, env={**os.environ, "PATH": path_env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("== next:"))
    return lines[start:]


def test_the_demo_ends_with_how_to_run_exchange_and_what_to_try(tmp_path: Path) -> None:
    venv_bin = Path(sys.prefix) / "bin"
    assert sys.prefix != sys.base_prefix, "the tests run from the project's virtual environment"
    bare = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin.resolve())
    last = _demo(tmp_path, bare)
    assert "demo/ho" in last[0] and "demo/s001" in last[0]
    assert all(len(line) <= 80 for line in last), last
    activate = last[1].split("#")[0].strip()
    assert activate == f". {venv_bin / 'activate'}", last  # exchange is not on PATH: say how
    commands = [line.split("#")[0].strip() for line in last[2:] if line.startswith("   exchange ")]
    assert any(c.startswith("exchange status sent --home demo/ho") for c in commands), last
    assert any(c.startswith("exchange ui --home demo/ho") for c in commands), last
    # followed literally, from the same folder, in a shell that has only the PATH the reader had
    for cmd in commands:
        if cmd.startswith("exchange ui"):
            cmd = cmd.replace("exchange ui", "exchange ui --help", 1)  # a server: its options parse
        run = subprocess.run(["bash", "-c", f"{activate} && {cmd}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PATH": bare})
        assert run.returncode == 0, (cmd, run.stdout, run.stderr)
        if "status sent" in cmd:
            assert "PROCESSED" in run.stdout, run.stdout
    # with exchange already on PATH, no activation line
    last = _demo(tmp_path, os.pathsep.join([str(venv_bin), bare]))
    assert last[1].strip().startswith("exchange "), last
