"""Deciding about quarantined files (`exchange quarantine review | retry | reviewed`), through the CLI.

A quarantined file is counted by `exchange status`, the page and the overview until a person decides:
reviewed (moved to quarantine/reviewed/ with the decision, out of every count, never deleted), or given
back to the importer (checked from the start: a bundle refused for a key not yet trusted applies once
the key is). Each decision is in the operators' journal. HO on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, make_net, seed_ho, seed_store

from exchange.cli.main import main
from exchange.service import status
from exchange.service.ui.data import peer_stats


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    n = make_net(tmp_path / "net", ho_db=db_url)
    yield n
    n.dispose()


def cli(*args: str, code: int = 0) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def quarantined(net: Net) -> list[str]:
    return sorted(q.file for q in status.quarantined(net.ho))


def test_review_takes_a_file_out_of_every_count_and_keeps_it(net: Net) -> None:
    ho, home = net.ho, str(net.ho.cfg.home)
    ho.cfg.inbox.mkdir(parents=True, exist_ok=True)
    (ho.cfg.inbox / "s001.ho.0000000099.bundle").write_bytes(b"not a bundle at all")
    os.symlink("/etc/hostname", ho.cfg.inbox / "s002.ho.0000000098.bundle")  # a link a peer left: moved as itself
    cli("import", "--home", home, code=10)
    assert quarantined(net) == ["s001.ho.0000000099.bundle", "s002.ho.0000000098.bundle"]
    res = cli("status", "received", "--home", home)
    assert "2 files quarantined: once understood, `exchange quarantine review FILE --reason TEXT`" in res.output
    rows = {p: st.quarantined for p, st in peer_stats(ho).items()}
    assert rows["s001"] == 1 and rows["s002"] == 1

    out = cli("quarantine", "review", "--home", home, "s001.ho.0000000099.bundle", "--reason", "garbage from a test")
    assert "s001.ho.0000000099.bundle: reviewed -> quarantine/reviewed/s001.ho.0000000099.bundle" in out.output
    assert quarantined(net) == ["s002.ho.0000000098.bundle"]
    kept = ho.cfg.quarantine / "reviewed" / "s001.ho.0000000099.bundle"
    assert kept.read_bytes() == b"not a bundle at all"  # never deleted
    rows = {p: st.quarantined for p, st in peer_stats(ho).items()}
    assert rows["s001"] == 0 and rows["s002"] == 1
    # by peer: the link moves as a link, what it points to is never touched
    out = json.loads(cli("quarantine", "review", "--home", home, "--peer", "s002", "--reason", "stray link",
                         "--json").output)
    assert out["files"] == [{"file": "s002.ho.0000000098.bundle", "peer": "s002", "action": "reviewed",
                             "now_at": "quarantine/reviewed/s002.ho.0000000098.bundle"}]
    assert os.readlink(ho.cfg.quarantine / "reviewed" / "s002.ho.0000000098.bundle") == "/etc/hostname"
    assert quarantined(net) == [] and "quarantined:" not in cli("status", "received", "--home", home).output
    # the decisions: in the reason files and the operators' journal
    decided = json.loads(cli("quarantine", "reviewed", "--home", home, "--json").output)["decisions"]
    assert [(d["file"], d["decision"]["action"], d["decision"]["reason"]) for d in decided] == [
        ("s001.ho.0000000099.bundle", "reviewed", "garbage from a test"),
        ("s002.ho.0000000098.bundle", "reviewed", "stray link")]
    assert decided[0]["reason"] and decided[0]["error"]  # the importer's reason kept beside the decision
    entries = json.loads(cli("journal", "--home", home, "--json").output)
    assert [(e["action"], e["peer"], e["detail"]["file"]) for e in entries[:2]] == [
        ("quarantine reviewed", "s002", "s002.ho.0000000098.bundle"),
        ("quarantine reviewed", "s001", "s001.ho.0000000099.bundle")]


def test_a_name_that_is_not_a_quarantined_file_is_refused(net: Net) -> None:
    home = str(net.ho.cfg.home)
    for name in ("../exchange.toml", "s001.ho.0000000001.bundle", "/etc/passwd"):
        res = cli("quarantine", "review", "--home", home, name, "--reason", "x", code=3)
        assert "is not a file in" in res.output
    res = cli("quarantine", "retry", "--home", home, "--peer", "s001", "--reason", "x", code=3)
    assert "no quarantined file to decide about from s001" in res.output
    assert (net.ho.cfg.home / "exchange.toml").exists()


def test_retry_imports_a_bundle_refused_before_its_key_was_trusted(net: Net) -> None:
    """A store's bundle arrives while the HO's trust store lacks the store's key (a hand edit gone wrong):
    quarantined; the key trusted again, `quarantine retry` gives it back and the next import applies it."""
    ho, home = net.ho, str(net.ho.cfg.home)
    seed_ho(net)
    net.settle()
    seed_store(net, "s001", sales=3)
    net.dispose()
    cli("sync", "--home", str(net.store("s001").cfg.home))
    trust = ho.cfg.home / "keys" / "allowed_signers"
    before = trust.read_text()
    trust.write_text("".join(line for line in before.splitlines(keepends=True) if not line.startswith("s001 ")))
    cli("sync", "--home", home, code=10)
    name = next(f for f in quarantined(net) if f.startswith("s001.ho."))
    trust.write_text(before)
    net.reopen()
    out = cli("quarantine", "retry", "--home", home, name, "--reason", "s001's key trusted again")
    assert f"{name}: retried -> inbox/{name}" in out.output and "run `exchange import`" in out.output
    assert quarantined(net) == []
    cli("import", "--home", home)
    net.reopen()
    got = {r.file: r.status for r in status.received(net.ho)}
    assert got[name] == "APPLIED"
    decided = json.loads(cli("quarantine", "reviewed", "--home", home, "--json").output)["decisions"]
    assert [(d["file"], d["decision"]["action"]) for d in decided] == [(name, "retried")]
