"""Stores paused, resumed and removed through the CLI, with the operators' journal as the audit trail.

Real node homes (the HO on SQLite and PostgreSQL, stores on SQLite) paired
through a real ``dir:`` folder; every step is an ``exchange`` command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, check_net, deliveries, item_ids, make_net, prices, reprice, seed_store

from exchange.cli.main import main
from exchange.database.capture import record_events
from exchange.errors import ConfigError
from exchange.node import config
from exchange.send.pending import idle
from exchange.service import status
from exchange.service.sync import export_needed



def cli(*args: str, code: int = 0) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def ho(net: Net, *args: str, code: int = 0) -> Result:
    out = cli(*args[:2], "--home", str(net.ho.cfg.home), *args[2:], code=code) if args[0] == "peer" else \
        cli(args[0], "--home", str(net.ho.cfg.home), *args[1:], code=code)
    net.reopen()
    return out


def journal(net: Net, peer: str) -> list[dict[str, object]]:
    return list(json.loads(ho(net, "journal", "--peer", peer, "--json").output))


def test_a_paused_store_gets_nothing_until_resumed_then_everything_it_missed(net: Net) -> None:
    ids = item_ids(net)[:3]
    before = prices(net.store("s001"), ids)
    out = ho(net, "peer", "pause", "--peer", "s001", "--reason", "closed for refit")
    assert "s001 paused since" in out.output
    reprice(net.ho, ids)
    for _ in range(3):
        net.cycle()
    assert prices(net.store("s001"), ids) == before  # nothing went to it
    assert prices(net.store("s002"), ids) != before  # the rest of the estate goes on
    queued = {d[2] for (t, _k), d in deliveries(net.ho, "s001").items() if t == "item"}
    assert "PENDING" in queued  # its documents queue up meanwhile
    assert "[PAUSED since" in ho(net, "peer", "list").output
    doctor = json.loads(ho(net, "doctor", "--json").output)
    [line] = [c for c in doctor["checks"] if c["name"] == "transport s001"]
    assert line["ok"] and "paused since" in line["detail"] and "closed for refit" in line["detail"]
    assert not [r for r in status.sent(net.ho) if r.peer == "s001" and r.status != "PROCESSED"]
    assert export_needed(net.ho) is False  # its queue alone is no work: a cron HO takes the fast path
    if net.ho.engine.url.get_backend_name() == "sqlite":
        assert idle(net.ho)

    out = ho(net, "peer", "resume", "--peer", "s001")
    assert "s001 resumed; waiting for the next sync: documents for every store it has not received yet" in out.output
    net.settle()
    assert prices(net.store("s001"), ids) == prices(net.ho, ids)
    assert check_net(net).problems == []
    entries = journal(net, "s001")
    assert [e["action"] for e in entries] == ["peer resume", "peer pause"]
    assert entries[1]["detail"] == {"reason": "closed for refit"} and "@" in str(entries[1]["actor"])
    assert entries[0]["detail"]["paused_for"] == "closed for refit"  # type: ignore[index]


def test_pause_twice_or_resume_an_active_store_says_what_to_do(net: Net) -> None:
    ho(net, "peer", "pause", "--peer", "s002", "--reason", "inventory")
    again = ho(net, "peer", "pause", "--peer", "s002", "--reason", "x", code=ConfigError.exit_code)
    assert "already paused" in again.output and "exchange peer resume --peer s002" in again.output
    wrong = ho(net, "peer", "resume", "--peer", "s001", code=ConfigError.exit_code)
    assert "s001 is active, not paused" in wrong.output
    # re-adding the paused store (a new transport, say) keeps it paused
    s2 = net.store("s002").cfg
    from exchange.node import keys
    ho(net, "peer", "add", "--id", "s002", "--role", "store", "--signing-key", keys.public_signing_line(s2),
       "--recipient", keys.recipient(s2))
    assert net.ho.cfg.peer("s002").state == "paused"


def test_remove_refuses_to_lose_what_is_on_the_way_then_abandons_it_on_record(net: Net) -> None:
    ids = item_ids(net)[:2]
    reprice(net.ho, ids)
    sync = cli("export", "--home", str(net.ho.cfg.home))  # sealed for both stores, not delivered
    assert sync.exit_code == 0
    refused = ho(net, "peer", "remove", "--peer", "s001", "--reason", "closed", code=ConfigError.exit_code)
    assert "still has" in refused.output and "bundle" in refused.output and "--abandon" in refused.output
    assert net.ho.cfg.peer("s001").state == "active"

    out = ho(net, "peer", "remove", "--peer", "s001", "--abandon", "--reason", "store closed for good")
    assert "retired signing key" in out.output and "abandoned:" in out.output
    assert {r.status for r in status.sent(net.ho) if r.peer == "s001" and r.seq > 1} == {"ABANDONED"}
    assert not [f for f in net.ho.cfg.outbox.iterdir() if "s001" in f.name]  # moved to the archive, not deleted
    assert [f for f in net.ho.cfg.archive_sent.iterdir() if f.name.startswith("ho.s001.")]
    [entry] = journal(net, "s001")
    assert entry["action"] == "peer remove" and entry["detail"]["mode"] == "abandon"  # type: ignore[index]
    assert entry["detail"]["abandoned_bundles"] >= 1  # type: ignore[index,operator]

    # nothing more is routed to it; the rest of the estate goes on
    before = set(deliveries(net.ho, "s001"))
    reprice(net.ho, item_ids(net)[2:4])
    time.sleep(1.05)  # allowed_signers times have whole seconds: sign after the second of the removal
    seed_store(net, "s001", sales=2, seed=7)  # the closed store's PC still syncs: its files are refused
    net.cycle()
    net.cycle(order=["ho", "s002"])
    assert set(deliveries(net.ho, "s001")) == before
    assert prices(net.store("s002"), item_ids(net)[2:4]) == prices(net.ho, item_ids(net)[2:4])
    refused_files = [q for q in status.quarantined(net.ho) if q.peer == "s001" and "valid-before" in q.reason]
    assert refused_files, "a bundle signed by the removed store's retired key must be refused"


def test_remove_a_drained_store_then_its_history_stays_and_nothing_is_routed_to_it(net: Net) -> None:
    out = ho(net, "peer", "remove", "--peer", "s002", "--reason", "merged into s001")
    assert "s002 removed" in out.output and "abandoned" not in out.output
    listed = {p["id"]: p for p in json.loads(ho(net, "peer", "list", "--json").output)}
    assert listed["s002"]["state"] == "removed" and listed["s002"]["state_reason"] == "merged into s001"
    assert [r for r in status.sent(net.ho) if r.peer == "s002"]  # its history is kept
    sent_before = status.sent(net.ho)
    reprice(net.ho, item_ids(net)[:2])
    promo = sorted(k for (t, k) in deliveries(net.ho, "s001") if t == "promotion")[0]
    with net.ho.engine.begin() as conn:  # a promotion for every store changes: routed by group, not by cursor
        record_events(conn, "promotion", [tuple(json.loads(promo))])
    net.cycle(order=["ho", "s001"])
    net.cycle(order=["ho", "s001"])
    assert [r for r in status.sent(net.ho) if r.peer == "s002"] == [r for r in sent_before if r.peer == "s002"]
    assert {d[2] for (t, _k), d in deliveries(net.ho, "s002").items() if t == "promotion"} == {"PROCESSED"}
    assert prices(net.store("s001"), item_ids(net)[:2]) == prices(net.ho, item_ids(net)[:2])
    again = ho(net, "peer", "remove", "--peer", "s002", "--reason", "x", code=ConfigError.exit_code)
    assert "already removed" in again.output


def test_a_hand_edited_state_is_refused_with_the_file_and_the_commands(tmp_path: Path) -> None:
    n = make_net(tmp_path / "n", stores=("s001",))
    path = n.ho.cfg.home / config.CONFIG_NAME
    path.write_text(path.read_text().replace('role = "store"', 'role = "store"\nstate = "sleeping"'))
    with pytest.raises(ConfigError) as e:
        config.load(n.ho.cfg.home)
    assert str(path) in str(e.value) and "sleeping" in str(e.value) and "peer pause" in e.value.hint
    n.dispose()
