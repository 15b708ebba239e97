"""Alerts (exchange.service.alerts, docs/ALERTS.md), through the CLI on SQLite and PostgreSQL.

A real HTTP receiver on 127.0.0.1 and a real command (a Python process that
appends its stdin to a file) are configured at the HO; a store going silent,
a document parked at a store and their recoveries each arrive exactly once,
in both, with the documented payload; a receiver that fails gets the alert
again at the next check.
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime, timedelta
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, add_item, add_promotion, item_ids, make_net, seed_ho
from test_heartbeat import age_ho_records, age_stamp

from exchange.cli import main
from exchange.node.home import Node
from exchange.send.export import reload

PAYLOAD_KEYS = {"version", "node", "role", "app_version", "alert", "peer", "state", "detail", "since", "time"}


class Receiver:
    """A webhook on 127.0.0.1: records every JSON body POSTed; answers ``status``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(n))
                assert self.headers["Content-Type"] == "application/json"
                self.send_response(outer.status)
                self.end_headers()
                if outer.status == 200:
                    outer.bodies.append(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run(*args: str) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def cli_sync(node: Node) -> None:
    run("sync", "--home", str(node.cfg.home))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def net(tmp_path: Path, db_url: str, receiver: Receiver) -> Iterator[tuple[Net, Path]]:
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001", "s002"))
    seed_ho(n, items=5)
    n.dispose()
    for _ in range(3):
        for node in n.nodes:
            cli_sync(node)
    log = tmp_path / "alerts.log"
    cfg = n.ho.cfg
    cfg.extra["alerts"] = {"command": [sys.executable, "-c",
                                       f"import sys; open({str(log)!r}, 'a').write(sys.stdin.read() + '\\n')"],
                           "webhook": receiver.url, "silent_after_minutes": 60}
    cfg.save()
    n.reopen()
    yield n, log
    n.dispose()


def commanded(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def changes(bodies: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(b["alert"], b["peer"], b["state"]) for b in bodies]


def test_alerts_fire_once_per_change_by_command_and_webhook(net: tuple[Net, Path], receiver: Receiver) -> None:
    n, log = net
    ho, s1, s2 = n.ho, n.store("s001"), n.store("s002")
    assert "no change" in run("alerts", "check", "--home", str(ho.cfg.home)).output
    assert receiver.bodies == [] and commanded(log) == []

    # a quiet night; s001 keeps syncing (heartbeats), s002 does not
    age_ho_records(ho, 3)
    age_stamp(s1, "ho", 3)
    n.dispose()
    cli_sync(s1)
    cli_sync(ho)  # the HO's sync checks the alerts
    assert [(b["alert"], b["peer"], b["state"]) for b in receiver.bodies] == [("peer_silent", "s002", "raised")]
    body = receiver.bodies[0]
    assert set(body) == PAYLOAD_KEYS and body["version"] == 1 and body["node"] == "ho" and body["role"] == "ho"
    assert body["detail"] == "silent 3 h"
    assert commanded(log) == receiver.bodies  # the command got the same payload on its stdin
    for _ in range(2):  # no storm: the state holds, nothing more is sent
        cli_sync(ho)
    assert len(receiver.bodies) == 1 and len(commanded(log)) == 1
    listed = json.loads(run("alerts", "list", "--home", str(ho.cfg.home), "--json").output)["alerts"]
    assert [(a["kind"], a["peer"]) for a in listed] == [("peer_silent", "s002")]

    # a promotion parks at s001: its heartbeat tells the HO, which raises documents_parked
    ids = item_ids(n)
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000001")
        add_promotion(conn, "P00009", ["IX0000001", ids[0]])
    reload(ho, "s001", ["promotion"])
    n.dispose()
    receiver.status = 503  # the receiver is down: the change is kept for the next check
    cli_sync(ho)
    age_stamp(s1, "ho", 1)
    cli_sync(s1)
    cli_sync(ho)
    assert len(receiver.bodies) == 1
    receiver.status = 200
    out = run("alerts", "check", "--home", str(ho.cfg.home)).output
    assert "raised: documents_parked s001" in out
    new = [(b["alert"], b["peer"], b["state"]) for b in receiver.bodies[1:]]
    assert ("documents_parked", "s001", "raised") in new
    assert receiver.bodies[-1]["detail"] == "1 document(s) parked at s001"

    # s002 is back and the item reaches s001: both clear, once each
    age_stamp(s2, "ho", 3)
    run("reload", "--home", str(ho.cfg.home), "--peer", "s001", "--doc", "item")
    cli_sync(ho)
    age_stamp(s1, "ho", 1)
    cli_sync(s1)
    cli_sync(s2)
    cli_sync(ho)
    cleared = [(b["alert"], b["peer"]) for b in receiver.bodies if b["state"] == "cleared"]
    assert sorted(cleared) == [("documents_parked", "s001"), ("peer_silent", "s002")]
    silent = [b for b in receiver.bodies if b["alert"] == "peer_silent"]
    assert silent[1]["since"] == silent[0]["since"]  # the cleared alert says since when it held
    cli_sync(ho)
    # each channel was told each change once (the webhook got the one it missed at a later check)
    assert sorted(changes(commanded(log))) == sorted(changes(receiver.bodies))
    assert len(set(changes(receiver.bodies))) == len(receiver.bodies) == 4
    assert json.loads(run("alerts", "list", "--home", str(ho.cfg.home), "--json").output)["alerts"] == []


def test_a_key_about_to_expire_raises_an_alert_once(net: tuple[Net, Path], receiver: Receiver) -> None:
    n, log = net
    ho = n.ho
    signers = ho.cfg.keys_dir / "allowed_signers"
    lines = signers.read_text().splitlines()
    soon = (datetime.now(UTC) + timedelta(days=5)).strftime("%Y%m%d%H%M")
    later = (datetime.now(UTC) + timedelta(days=60)).strftime("%Y%m%d%H%M")
    # s002's key ends in 5 days; s001's in 60 (beyond the 14 days warned of)
    signers.write_text("\n".join(
        line.replace("s002 namespaces=", f's002 valid-before="{soon}",namespaces=', 1)
            .replace("s001 namespaces=", f's001 valid-before="{later}",namespaces=', 1) for line in lines) + "\n")
    n.reopen()
    run("alerts", "check", "--home", str(ho.cfg.home))
    run("alerts", "check", "--home", str(ho.cfg.home))
    assert changes(receiver.bodies) == [("key_expiring", "s002", "raised")]
    assert f"{soon[:4]}-{soon[4:6]}-{soon[6:8]}" in receiver.bodies[0]["detail"]
    assert changes(commanded(log)) == changes(receiver.bodies)
