"""`exchange status` at 80 columns and piped, times local with their zone, parked reasons in words
(issue #16: "readable in 80 columns", "Times", "Words a store manager understands").

Through the real CLI in a subprocess (output piped, as cron or `| less` sees it), on SQLite and
PostgreSQL where the database matters (the parked document's store database).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from enginehelpers import Net, add_item, add_promotion, item_ids, make_net, seed_ho

from exchange.send import export
from exchange.service.sync import sync
from exchange.service.words import counted, key_text, local_time, parked_reason, rfc3339


def cli(*args: str, columns: int = 80, tz: str = "UTC") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EXCHANGE_HOME", "EXCHANGE_CRASH_AT")}
    env.update(NO_COLOR="1", COLUMNS=str(columns), TZ=tz)
    p = subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def joined(text: str) -> str:
    """The output with wrapped lines joined: what a reader reads."""
    return re.sub(r"\s*\n\s+", " ", text)


@pytest.fixture
def parked_net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """s001 (its database on ``db_url``) holds a promotion parked for an item it never received."""
    net = make_net(tmp_path / "net", store_dbs={"s001": db_url}, stores=("s001",))
    ho, st = net.ho, net.store("s001")
    seed_ho(net)
    net.settle()
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000001")  # recorded without an event: never sent, so the promotion parks
        add_promotion(conn, "P00009", ["IX0000001", item_ids(net)[0]])
    export.reload(ho, "s001", ["promotion"])
    sync(ho)
    sync(st)
    yield net
    net.dispose()


def test_parked_reason_in_words_at_80_columns_piped(parked_net: Net) -> None:
    home = str(parked_net.store("s001").cfg.home)
    p = cli("status", "received", "--home", home)
    lines = p.stdout.splitlines()
    assert max(map(len, lines)) <= 80, p.stdout
    assert "…" not in p.stdout and "..." not in p.stdout
    text = joined(p.stdout)
    assert "s001: 1 document parked" in text
    assert ("promotion P00009 uses item IX0000001, which this store has not received yet; "
            "it will be applied when the item arrives") in text
    assert re.search(r"detail: \w+: .*foreign key", text, re.I), text  # the technical detail is kept
    assert "1 document parked" in text and "1 documents" not in text
    assert '["P00009"]' not in text  # keys as text, not JSON
    for line in lines:  # every bundle line: the whole file name, status and time
        m = re.match(r"^(ho\.s001\.\d{10}\.bundle)\s+(APPLIED)\s+(\d\d:\d\d:\d\d UTC)$", line)
        if line.startswith("ho.s001."):
            assert m, line
    # --json: the words and the detail in two fields, times RFC 3339 with the offset
    doc = json.loads(cli("status", "parked", "--home", home, "--json").stdout)
    (parked,) = doc["parked"]
    assert parked["reason"].startswith("promotion P00009 uses item IX0000001")
    assert "foreign key" in parked["error"].lower()
    assert datetime.fromisoformat(parked["parked_at"]).utcoffset() == timedelta(0)
    assert parked["parked_at"].endswith("+00:00")


def test_status_times_are_local_with_their_zone(parked_net: Net) -> None:
    home = str(parked_net.ho.cfg.home)
    utc = cli("status", "sent", "--home", home, tz="UTC").stdout
    india = cli("status", "sent", "--home", home, tz="Asia/Kolkata").stdout
    assert re.search(r"\d\d:\d\d:\d\d UTC$", utc, re.M), utc
    assert re.search(r"\d\d:\d\d(:\d\d)? IST$", india, re.M), india
    sent = json.loads(cli("status", "sent", "--home", home, "--json", tz="Asia/Kolkata").stdout)["bundles"]
    assert sent and all(datetime.fromisoformat(b["created"]).tzinfo is not None for b in sent)
    # the same instant: 5:30 later on the wall clock in India
    first_utc = re.search(r"(\d\d):(\d\d):\d\d UTC$", utc, re.M)
    first_ist = re.search(r"(\d\d):(\d\d)(:\d\d)? IST$", india, re.M)
    assert first_utc and first_ist
    minutes = lambda m: int(m.group(1)) * 60 + int(m.group(2))  # noqa: E731
    assert (minutes(first_ist) - minutes(first_utc)) % (24 * 60) == 5 * 60 + 30


def test_status_peer_takes_ids_groups_and_all(parked_net: Net, tmp_path: Path) -> None:
    home = str(parked_net.ho.cfg.home)
    everyone = json.loads(cli("status", "sent", "--home", home, "--json").stdout)["bundles"]
    north = json.loads(cli("status", "sent", "--home", home, "--peer", "north", "--json").stdout)["bundles"]
    by_id = json.loads(cli("status", "sent", "--home", home, "--peer", "s001", "--peer", "all", "--json").stdout)
    assert everyone and north == everyone == by_id["bundles"]
    env = {k: v for k, v in os.environ.items() if k != "EXCHANGE_HOME"}
    p = subprocess.run([sys.executable, "-m", "exchange", "status", "sent", "--home", home, "--peer", "nowhere"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 3 and "'nowhere' is neither a peer nor a store group of ho" in p.stderr


@pytest.fixture
def utc_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local zone is UTC for the test (then back to what it was)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_long_names_wrap_never_cut(utc_zone: None) -> None:
    """A quarantined file with a long reason at 80 columns: every word is there, no line is longer."""
    from exchange.service.status import Row
    from exchange.service.status_text import status_lines

    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    reason = "cannot open: " + "s001.ho.0000000042.bundle in /srv/exchange/ho/inbox/with/a/long/path " * 3
    rows = [Row("s001.ho.0000000042.bundle", "s001", 42, {"sales_bill": 3000, "customer": 12}, "QUARANTINED",
                "2026-12-01T23:59:00+00:00", None, reason),
            Row("s001.ho.0000000043.bundle", "s001", 43, {}, "APPLIED", "2026-12-02T09:00:00+00:00",
                "2026-12-02T09:00:05+00:00", None)]
    lines = status_lines("ho", "received", rows, None, width=80, now=now)
    assert max(map(len, lines)) <= 80, lines
    assert lines[0] == "ho: received, 2 bundles"
    assert lines[1] == "s001.ho.0000000042.bundle  QUARANTINED  2026-12-01 23:59 UTC"
    (applied,) = [line for line in lines if line.startswith("s001.ho.0000000043.bundle")]
    assert applied == "s001.ho.0000000043.bundle  APPLIED      09:00:05 UTC"  # today: no date
    assert joined("\n".join(lines)).count("/srv/exchange/ho/inbox/with/a/long/path") == 3
    narrow = status_lines("ho", "received", rows, None, width=40, now=now)
    assert narrow[1] == "s001.ho.0000000042.bundle  QUARANTINED"  # the time moved to its own line, whole
    assert "2026-12-01 23:59" in narrow[2]


def test_words() -> None:
    assert counted(1, "document") == "1 document" and counted(0, "document") == "0 documents"
    assert counted(2, "bundle") == "2 bundles"
    assert key_text('["s001","B8"]') == "s001/B8" and key_text("plain") == "plain"
    assert rfc3339("2026-11-25 17:00:05") == "2026-11-25T17:00:05+00:00"
    assert rfc3339("2026-11-25T17:00:05Z") == "2026-11-25T17:00:05+00:00"
    assert local_time(None) == "-" and local_time("not a time") == "not a time"
    assert parked_reason("store", "sales_bill", '["s001","B8"]', [("item", ("I1234",))]) == (
        "sales bill s001/B8 uses item I1234, which this store has not received yet; "
        "it will be applied when the item arrives")
    many = parked_reason("ho", "grc", '["s001","G1"]', [("item", (f"I{n}",)) for n in range(5)])
    assert "item I0, item I1, item I2 and 2 others, which the head office" in many and "when they arrive" in many


def test_import_says_what_it_applied_in_words(homes: Path) -> None:
    """`exchange import` lists each document type's result as words, not a Python dict."""
    ho, s001 = str(homes / "ho"), str(homes / "s001")
    cli("reload", "--home", ho, "--peer", "s001", "--doc", "item")
    cli("sync", "--home", ho)
    cli("pull", "--home", s001, "--from", str(homes / "transfer"))
    out = cli("import", "--home", s001).stdout
    assert re.search(r"^ho\.s001\.\d{10}\.bundle: APPLIED$", out, re.M), out
    assert re.search(r"^    item: \d+ applied$", out, re.M), out
    assert "{" not in out and "'" not in out
