"""Exit codes say what happened, and global options go anywhere (issue #16, "The CLI: safe to script").

Through the real command line (a subprocess of ``python -m exchange``, as cron runs it): a sync that
quarantined a file or could not reach its SFTP server exits with the documented code, and the one table
of codes (``exchange.errors.EXIT_CODES``) is the one in ``exchange --help`` and in docs/SERVICE.md.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exchange import errors
from exchange.errors import EXIT_CODES, ExchangeError, outcome_exit_code
from exchange.vocabulary import Outcome

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """``exchange ARGS`` in its own process, output piped, bounded."""
    env = {k: v for k, v in os.environ.items() if k not in ("EXCHANGE_HOME", "EXCHANGE_CRASH_AT")}
    env.update(NO_COLOR="1", COLUMNS=str(columns))
    return subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _classes(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _classes(sub)
    return out


def test_every_error_code_is_in_the_table_and_the_table_has_no_stale_code() -> None:
    import exchange.transport.sftp  # noqa: F401  (classes defined beside the code that raises them)
    import exchange.wire.bundle  # noqa: F401

    codes = {c.exit_code for c in _classes(ExchangeError) | {ExchangeError}}
    assert codes <= set(EXIT_CODES), sorted(codes - set(EXIT_CODES))
    assert set(EXIT_CODES) - codes == {0, 2, errors.INTERRUPTED}  # success, click's usage error, Ctrl-C: no class


def test_docs_table_and_help_match_the_code() -> None:
    text = (ROOT / "docs" / "SERVICE.md").read_text(encoding="utf-8")
    rows = dict((int(c), m) for c, m in re.findall(r"^\| (\d+) \| (.+?) \|$", text, re.M))
    assert rows == EXIT_CODES
    help_text = cli("--help", columns=80).stdout
    listed = dict((int(c), m.strip()) for c, m in re.findall(r"^\s+(\d+)  (.+)$", help_text.split("Exit status")[1], re.M))
    assert listed == EXIT_CODES
    assert max(len(line) for line in help_text.splitlines()) <= 80


def test_outcome_exit_code_order() -> None:
    transient, permanent = errors.TransientTransportError("reset"), errors.TransportError("host key")
    assert outcome_exit_code([Outcome.APPLIED, Outcome.DUPLICATE, Outcome.WAITING, Outcome.PROCESSED]) == 0
    assert outcome_exit_code([Outcome.HELD, Outcome.FAILED, Outcome.QUARANTINED], [permanent]) == 10
    assert outcome_exit_code([Outcome.APPLIED, Outcome.REJECTED], [transient]) == 21
    assert outcome_exit_code([Outcome.HELD], [transient]) == 15
    assert outcome_exit_code([], [transient]) == 31
    assert outcome_exit_code([], [transient, permanent]) == 30
    assert outcome_exit_code([], [transient], other_errors=True) == 30
    assert outcome_exit_code([], [], other_errors=True) == 30


def test_sync_that_quarantines_a_file_exits_10(homes: Path) -> None:
    store = homes / "s001"
    bad = store / "inbox" / "ho.s001.0000000099.bundle"
    bad.write_bytes(b"not a bundle at all")
    p = cli("sync", "--home", str(store))
    assert p.returncode == 10, p.stdout + p.stderr
    assert (store / "quarantine" / bad.name).exists()
    # the next sync has nothing wrong left to report: 0 again
    p = cli("sync", "--home", str(store))
    assert p.returncode == 0, p.stdout + p.stderr
    # the same through --json (a script reads both)
    bad.write_bytes(b"still not a bundle")
    p = cli("--json", "sync", "--home", str(store))
    assert p.returncode == 10, p.stdout + p.stderr
    assert [o["status"] for o in json.loads(p.stdout)["imported"]] == ["QUARANTINED"]


def test_import_that_quarantines_exits_10(homes: Path) -> None:
    store = homes / "s002"
    (store / "inbox" / "ho.s002.0000000099.bundle").write_bytes(b"garbage")
    p = cli("import", "--home", str(store))
    assert p.returncode == 10, p.stdout + p.stderr
    assert "QUARANTINED" in p.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_sftp_connection_exits_31_as_documented(homes: Path) -> None:
    """Nothing listens on the port: transient (retried, then 31), the code docs/SFTP.md gives it."""
    store = homes / "s001"
    p = cli("sync", "--home", str(store), "--via", f"sftp://xs001@127.0.0.1:{_closed_port()}/")
    assert p.returncode == 31, p.stdout + p.stderr
    assert "pull from ho" in p.stdout


def test_global_options_before_or_after_the_command(homes: Path) -> None:
    home = str(homes / "ho")
    after = cli("status", "sent", "--home", home, "--json", "-v")
    before = cli("--home", home, "--json", "-v", "status", "sent")
    mixed = cli("-v", "status", "--json", "sent", "--home", home)
    for p in (after, before, mixed):
        assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout) == json.loads(mixed.stdout)
    assert json.loads(after.stdout)["bundles"]
    # -v after the command reaches the logger: log lines carry the date
    verbose = cli("sync", "--home", home, "-vv")
    assert verbose.returncode == 0, verbose.stderr
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4} ", verbose.stderr, re.M), verbose.stderr
    # an option's value that looks like -v is a value, not the verbose flag
    stick = homes / "STICK"
    stick.mkdir()
    p = cli("usb", "prepare", str(stick), "--label", "-v")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((stick / "exchange-transfer" / "stick.json").read_text())["label"] == "-v"


@pytest.mark.parametrize("args", [["--json", "init"], ["usb", "prepare", "--home", "x", "."]])
def test_a_global_option_the_command_does_not_have_is_refused(args: list[str]) -> None:
    p = cli(*args)
    assert p.returncode == 2, p.stdout + p.stderr


def test_one_spelling_for_a_peer_and_reload_takes_groups_and_all(homes: Path) -> None:
    ho = str(homes / "ho")
    p = cli("reload", "--home", ho, "--peer", "north", "--doc", "item")
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(r"\d+ documents queued for s001; they go with the next export or sync\n", p.stdout), p.stdout
    p = cli("reload", "--home", ho, "--peer", "all", "--peer", "s001", "--doc", "item")
    assert [line.split(" queued for ")[1].split(";")[0] for line in p.stdout.splitlines()] == ["s001", "s002"]
    p = cli("reload", "--home", ho, "--peer", "west", "--doc", "item")
    assert p.returncode == 3 and "'west' is neither a peer nor a store group of ho" in p.stderr
    # --peer everywhere a node id is asked for; the old --id still works (hidden from --help)
    p = cli("peer", "set-group", "--home", ho, "--peer", "s001", "--group", "south")
    assert p.returncode == 0 and p.stdout.startswith("s001: groups south (were north)"), p.stdout + p.stderr
    p = cli("peer", "set-group", "--home", ho, "--id", "s001", "--group", "north")
    assert p.returncode == 0 and p.stdout.startswith("s001: groups north (were south)"), p.stdout + p.stderr
    assert "--id" not in cli("peer", "add", "--help").stdout
    p = cli("peer", "set-group", "--home", ho, "--id", "s001", "--peer", "s002", "--group", "north")
    assert p.returncode == 2 and "name different peers" in p.stderr
    p = cli("peer", "set-group", "--home", ho, "--group", "north")
    assert p.returncode == 2 and "Missing option '--peer'" in p.stderr
