"""A store's conflicts seen at the HO (issue 15, "Edits on both sides"), through the CLI on SQLite and PostgreSQL.

A conflict held for a person at a store, and a store's own change to a document
the HO owns (a price), reach the HO in the store's heartbeat (version 2,
docs/FORMAT.md section 12): `exchange status conflicts`, the overview row, the
metrics, `doctor` and the alerts name them and the command to run at the store,
and they clear once the store resolves them (or the HO's next price replaces
the store's). A version 1 heartbeat is still read; a genuine heartbeat whose
version 2 health is hostile (out of range, extra fields, too many or malformed
names) is quarantined with its reason and changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from enginehelpers import Net, make_net, prices, reprice, seed_ho
from sqlalchemy import select, update
from test_conflicts import edit, store_edits_a_price
from test_heartbeat import get, metrics, served, state_of

from exchange.cli import main
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.tables import xchg_heartbeat
from exchange.errors import BundleError
from exchange.files import utc_now, write_file_atomic
from exchange.node.home import Node
from exchange.wire.bundle import Entry
from exchange.wire.crypto import age
from exchange.wire.formats import (
    HEALTH_FIELDS, HEALTH_FORMAT, HEALTH_MEMBER, HEALTH_PAD, HEALTH_V1_FIELDS, HEARTBEAT_FORMAT,
    HEARTBEAT_MEMBERS, MAX_FOREIGN, heartbeat_name,
)
from exchange.wire.heartbeat import build_heartbeat, read_heartbeat, version_for
from exchange.wire.signed import dump_json, format_time, pack_signed

KEY = ("s001", "C1")


def cli(*args: str, code: int | None = 0) -> Any:
    """``exchange ARGS`` in-process; ``code`` None: any exit code (``doctor`` checks more than conflicts)."""
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert code is None or res.exit_code == code, res.output
    return res


def sync(net: Net, *order: str) -> None:
    for nid in order:
        cli("sync", "--home", str(net.node(nid).cfg.home))
    net.dispose()


def reported(net: Net) -> dict[str, Any]:
    """`exchange status conflicts --json` at the HO: what each store's heartbeat reports."""
    out = json.loads(cli("status", "conflicts", "--json", "--home", str(net.ho.cfg.home)).output)
    return dict(out["peers"])


def page_and_metrics(net: Net) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    net.dispose()
    with served(net.ho.cfg.home) as url:
        return state_of(get(url, "/"), "s001"), metrics(url)


def health_metric(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], what: str, peer: str = "s001") -> float:
    return m[("exchange_peer_reported_health", (("peer", peer), ("what", what)))]


def received_version(net: Net) -> int:
    """The version of the heartbeat s001 last sent the HO, as the HO keeps it."""
    ho = net.ho
    return read_heartbeat(ho.cfg.archive_received / heartbeat_name("s001", "ho"), ho.trust, me="ho",
                          identities=ho.identities).version


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """An HO (SQLite, then PostgreSQL) and two SQLite stores, a heartbeat on every sync; s001's customer C1
    at both ends; capture triggers on; settled, so each end knows the other's version from its heartbeat."""
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001", "s002"))
    for node in n.nodes:
        node.cfg.extra["health"] = {"heartbeat_every": 0}
        node.cfg.save()
    n.reopen()
    seed_ho(n, items=3)
    with n.store("s001").engine.begin() as conn:
        conn.execute(s.customer.insert().values(store_id="s001", customer_id="C1", name="Asha", phone="555",
                                                created_at=date(2024, 3, 1)))
        record_events(conn, "customer", [KEY])
    for node in n.nodes:
        cli("triggers", "install", "--home", str(node.cfg.home))
    n.settle()
    sync(n, "s001", "s002", "ho")
    yield n
    n.dispose()


def test_a_conflict_held_at_the_store_shows_at_the_ho_until_resolved_there(net: Net) -> None:
    st = net.store("s001")
    edit(net.ho, name="Asha (HO)")
    edit(st, name="Asha (store)")
    sync(net, "s001", "ho", "s001", "ho")  # each end detects the conflict; the store's heartbeat says so

    st_open = json.loads(cli("conflicts", "list", "--open", "--json", "--home", str(st.cfg.home)).output)
    assert [c["status"] for c in st_open["conflicts"]] == ["OPEN"], "held at the store"
    assert "held: exchange conflicts resolve" in cli("status", "conflicts", "--home", str(st.cfg.home)).output
    net.dispose()
    with served(st.cfg.home) as url:  # the store's own page and metrics
        assert 'data-status="OPEN"' in get(url, "/conflicts")
        assert metrics(url)[("exchange_conflicts_open", (("doc_type", "customer"),))] == 1
    assert received_version(net) == 2
    assert reported(net)["s001"]["conflicts_held"] == 1
    text = cli("status", "conflicts", "--home", str(net.ho.cfg.home)).output
    assert "s001 reports 1 held for a person" in text and "(at s001: exchange conflicts list --open)" in text
    state, m = page_and_metrics(net)
    assert "at the store: 1 conflict held for a person (exchange conflicts list --open)" in state
    assert health_metric(m, "conflicts_held") == 1 and health_metric(m, "conflicts_held", "s002") == 0
    doctor = json.loads(cli("doctor", "--json", "--home", str(net.ho.cfg.home), code=1).output)
    check = next(c for c in doctor["checks"] if c["name"] == "conflicts")
    assert not check["ok"] and "at s001" in check["detail"] and "exchange conflicts list --open" in check["fix"]
    alerts = json.loads(cli("alerts", "list", "--json", "--home", str(net.ho.cfg.home)).output)["alerts"]
    held = [a for a in alerts if a["kind"] == "conflict_held" and a["peer"] == "s001"]
    assert len(held) == 1 and "held for a person at s001" in held[0]["detail"]
    assert not any(a["kind"] == "stream_stuck" for a in alerts), "a held conflict is not a stuck stream"

    # resolved at the store: the HO learns it with the store's next sync
    cli("conflicts", "resolve", str(st_open["conflicts"][0]["id"]), "--keep", "ours", "--home", str(st.cfg.home))
    state, _m = page_and_metrics(net)
    assert "at the store: 1 conflict held" in state, "the HO learns it with the store's next sync, not before"
    sync(net, "s001", "ho")
    assert reported(net)["s001"]["conflicts_held"] == 0
    state, m = page_and_metrics(net)
    assert "conflict" not in state and health_metric(m, "conflicts_held") == 0
    assert "s001 reports" not in cli("status", "conflicts", "--home", str(net.ho.cfg.home)).output
    doctor = json.loads(cli("doctor", "--json", "--home", str(net.ho.cfg.home), code=None).output)
    assert next(c for c in doctor["checks"] if c["name"] == "conflicts")["ok"]
    alerts = json.loads(cli("alerts", "list", "--json", "--home", str(net.ho.cfg.home)).output)["alerts"]
    assert not [a for a in alerts if a["kind"] == "conflict_held"]


def test_a_price_edited_at_a_store_is_named_at_the_ho(net: Net) -> None:
    st = net.store("s001")
    item, ho_price = store_edits_a_price(net)

    r = reported(net)["s001"]
    assert (r["foreign_edits"], r["conflicts_held"]) == (1, 0)
    assert [(f["doc_type"], f["key"], f["columns"], f["missing"]) for f in r["foreign"]] == [
        ("item", [item], ["price"], False)], "what changed: the type, the key and the column"
    text = cli("status", "conflicts", "--home", str(net.ho.cfg.home)).output
    assert f"s001 changed item {item} (price)" in text and "(at s001: exchange conflicts list)" in text
    state, m = page_and_metrics(net)
    assert f"at the store: 1 local change to HO documents: item {item} (price) (exchange conflicts list)" in state
    assert health_metric(m, "foreign_edits") == 1

    # the HO's next price replaces the store's: once applied there, the store no longer reports it
    reprice(net.ho, [item], "1.00")
    sync(net, "ho", "s001", "ho")
    assert prices(st, [item])[item] == ho_price + Decimal("1.00")
    assert reported(net)["s001"]["foreign_edits"] == 0
    state, m = page_and_metrics(net)
    assert state == "OK" and health_metric(m, "foreign_edits") == 0
    assert len(json.loads(cli("conflicts", "list", "--json", "--home", str(st.cfg.home)).output)["conflicts"]) == 1, \
        "the store's log keeps it"


def test_version_2_only_to_a_peer_known_to_read_it(net: Net) -> None:
    assert [version_for(v) for v in (None, "", "1.0.0", "1.0.9", "1.1.0", "1.2.0rc1", "2.0.0", "x")] == [
        1, 1, 1, 1, 2, 2, 2, 1]
    assert received_version(net) == 2, "the HO's version is known at the store: version 2"
    st = net.store("s001")
    sync(net, "s001")  # takes the HO's heartbeat waiting for it: no newer one until the HO syncs again
    with st.engine.begin() as conn:  # the HO's newest heartbeat said it runs 1.0.0 (before version 2)
        conn.execute(update(xchg_heartbeat).where(xchg_heartbeat.c.peer == "ho").values(app_version="1.0.0"))
    sync(net, "s001")
    waiting = net.transfer / "ho" / heartbeat_name("s001", "ho")
    hb = read_heartbeat(waiting, net.ho.trust, me="ho", identities=net.ho.identities)
    assert hb.version == 1 and set(hb.health) == set(HEALTH_V1_FIELDS)


def _seal(st: Node, health: Any, *, version: int = 2, foreign: Any = None, extra: dict[str, Any] | None = None,
          seconds: int = 5) -> bytes:
    """A heartbeat signed with the store's genuine keys around any health body (what a hostile or broken
    store could send): built as exchange builds one, without its checks."""
    created = utc_now() + timedelta(seconds=seconds)
    body: dict[str, Any] = {"format": HEALTH_FORMAT, "version": version, "node": "s001", "peer": "ho",
                            "created": format_time(created), "nonce": os.urandom(16).hex(), "health": health}
    if foreign is not None:
        body["foreign"] = foreign
    body.update(extra or {})
    plain = dump_json(body)
    plain += b" " * (-len(plain) % HEALTH_PAD)
    sealed = io.BytesIO()
    age.encrypt(io.BytesIO(plain), sealed, list(st.recipients_for("ho")))
    entry = Entry(HEALTH_MEMBER, len(sealed.getvalue()), hashlib.sha256(sealed.getvalue()).hexdigest())
    raw = dump_json({"format": HEARTBEAT_FORMAT, "version": version, "app_version": "1.1.0", "node": "s001",
                     "peer": "ho", "created": format_time(created), "health": entry.as_json(),
                     "health_plain_sha256": hashlib.sha256(plain).hexdigest()})
    return pack_signed(HEARTBEAT_MEMBERS, raw, st.signing_key, created, (HEALTH_MEMBER, sealed.getvalue()))


def _lands(net: Net, data: bytes, code: int = 0) -> None:
    """The heartbeat in the HO's inbox, imported (``code``: BundleError's 10 when it is quarantined)."""
    name = heartbeat_name("s001", "ho")
    write_file_atomic(net.ho.cfg.inbox / name, data)
    cli("import", "--home", str(net.ho.cfg.home), code=code)
    assert not (net.ho.cfg.inbox / name).exists()


def _kept(net: Net) -> dict[str, Any]:
    with net.ho.engine.connect() as conn:
        return dict(conn.execute(select(xchg_heartbeat).where(xchg_heartbeat.c.peer == "s001")).mappings().one())


def test_a_version_1_heartbeat_is_still_read(net: Net) -> None:
    st = net.store("s001")
    v1 = build_heartbeat(key=st.signing_key, node="s001", peer="ho", version=1,
                         health={**dict.fromkeys(HEALTH_FIELDS, 0), "parked": 2, "conflicts_held": 7},
                         recipients=st.recipients_for("ho"), created=utc_now() + timedelta(seconds=5))
    _lands(net, v1)
    assert not list(net.ho.cfg.quarantine.glob("*.reason"))
    assert json.loads(_kept(net)["health"]) == {**dict.fromkeys(HEALTH_V1_FIELDS, 0), "parked": 2}
    assert "s001" not in reported(net), "a version 1 heartbeat says nothing of conflicts"
    state, m = page_and_metrics(net)
    assert state == "at the store: 2 documents parked" and health_metric(m, "parked") == 2


ZERO = dict.fromkeys(HEALTH_FIELDS, 0)
NAMED = {"doc_type": "item", "key": ["I1"], "at": None, "columns": {"price": "0123456789abcdef"}}


HOSTILE: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("too-big", {**ZERO, "conflicts_held": 10 ** 9}, {"foreign": []}, "conflicts_held 1000000000 is out of range"),
    ("negative", {**ZERO, "conflicts_held": -1}, {"foreign": []}, "conflicts_held -1 is out of range"),
    ("extra-field", {**ZERO, "evil": 1}, {"foreign": []}, "unexpected 'evil'"),
    ("bool", {**ZERO, "foreign_edits": True}, {"foreign": []}, "health foreign_edits is not an integer"),
    ("extra-top", ZERO, {"foreign": [], "extra": {"note": "x"}}, "are not those of a version 2 health"),
    ("no-foreign", ZERO, {}, "are not those of a version 2 health"),
    ("more-than-count", {**ZERO, "foreign_edits": 1}, {"foreign": [NAMED, NAMED]},
     "foreign is not a list of at most 1"),
    ("more-than-max", {**ZERO, "foreign_edits": 50}, {"foreign": [NAMED] * (MAX_FOREIGN + 1)}, "at most 10 named"),
    ("bad-digest", {**ZERO, "foreign_edits": 1}, {"foreign": [{**NAMED, "columns": {"price": "zz"}}]},
     "16-hex-digit digest"),
    ("long-key", {**ZERO, "foreign_edits": 1}, {"foreign": [{**NAMED, "key": ["x" * 129]}]}, "at most 128 characters"),
    ("bad-type", {**ZERO, "foreign_edits": 1}, {"foreign": [{**NAMED, "doc_type": "Item; drop"}]},
     "not a document type"),
    ("extra-entry-field", {**ZERO, "foreign_edits": 1}, {"foreign": [{**NAMED, "sql": 1}]},
     "is not an object of doc_type"),
    ("v2-with-v1-figures", dict.fromkeys(HEALTH_V1_FIELDS, 0), {"foreign": []}, "health is not an object of"),
    ("v1-with-v2-figures", ZERO, {"version": 1}, "health is not an object of"),
]


def test_a_hostile_version_2_health_is_refused(net: Net) -> None:
    """Each signed with the store's genuine keys: quarantined with a reason naming the problem, nothing kept."""
    before = _kept(net)
    seen: set[str] = set()
    for i, (case, health, kw, reason) in enumerate(HOSTILE):
        _lands(net, _seal(net.store("s001"), health, seconds=5 + i, **kw), code=BundleError.exit_code)
        new = {p.name for p in net.ho.cfg.quarantine.glob("*.reason")} - seen
        assert len(new) == 1, case
        seen |= new
        got = json.loads((net.ho.cfg.quarantine / new.pop()).read_text())["reason"]
        assert reason in got and "health.json.age" in got, (case, got)
        assert _kept(net) == before, f"{case}: nothing recorded"
    # and a well-formed one from the same store is taken
    _lands(net, _seal(net.store("s001"), {**ZERO, "foreign_edits": 1}, foreign=[NAMED], seconds=5 + len(HOSTILE)))
    assert json.loads(_kept(net)["health"])["foreign"] == [
        {"doc_type": "item", "key": ["I1"], "at": None, "columns": None, "missing": True}]
