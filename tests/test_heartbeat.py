"""Heartbeats (docs/FORMAT.md section 12), through the CLI on SQLite and PostgreSQL.

A store that syncs with nothing to send is not silent at the HO, one that does
not sync is; trouble inside a store (a document parked there) is visible on the
HO overview and in its metrics; a forged, altered or replayed heartbeat changes
nothing and the bad ones are quarantined with their reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, add_item, add_promotion, item_ids, make_net, seed_ho
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from exchange.cli import main
from exchange.database.tables import XCHG, xchg_heartbeat
from exchange.files import utc_now, write_file_atomic
from exchange.node.home import Node
from exchange.send.export import reload
from exchange.service.ui.server import UiServer, UiSettings, create_app
from exchange.wire import tarfmt
from exchange.wire.formats import HEALTH_FIELDS, heartbeat_name
from exchange.wire.heartbeat import build_heartbeat, read_heartbeat


def run(*args: str) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def cli_sync(node: Node) -> str:
    return run("sync", "--home", str(node.cfg.home)).output


def settle(net: Net, rounds: int = 4) -> None:
    """Sync every node through the CLI until nothing is left in flight."""
    for _ in range(rounds):
        for n in net.nodes:
            cli_sync(n)
    net.dispose()


@contextmanager
def served(home: Path, silent_after_minutes: float = 60) -> Iterator[str]:
    node = Node.open(home)
    s = UiSettings.for_node(node, port=0, silent_after_minutes=silent_after_minutes)
    server = UiServer(create_app(node, s), s)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        node.engine.dispose()


def get(url: str, path: str) -> str:
    with urllib.request.urlopen(url + path.lstrip("/"), timeout=30) as resp:
        assert resp.status == 200
        return resp.read().decode()


def state_of(html: str, store: str) -> str:
    """The State cell of ``store``'s row on the HO overview, as text."""
    m = re.search(rf'<tr[^>]*data-store="{store}".*?<td data-col="state">(.*?)</td>', html, re.S)
    assert m, f"no row for {store}"
    return " ".join(re.sub(r"<[^>]+>", " ", m.group(1)).split())


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(get(url, "/metrics")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def age_ho_records(ho: Node, hours: int) -> None:
    """A quiet night at the HO: every time it recorded about its stores moved ``hours`` back."""
    back = timedelta(hours=hours)
    with ho.engine.begin() as conn:
        for table, cols in (("xchg_sent", ("created_at", "uploaded_at", "processed_at")),
                            ("xchg_received", ("received_at", "applied_at")),
                            ("xchg_heartbeat", ("created", "received_at"))):
            t = XCHG.tables[table]
            for col in cols:
                c = t.c[col]
                for when in set(conn.execute(select(c).where(c.is_not(None))).scalars()):
                    conn.execute(update(t).where(c == when).values({col: when - back}))


def age_stamp(node: Node, peer: str, hours: int) -> None:
    """The last heartbeat ``node`` pushed to ``peer`` was ``hours`` ago (so the next sync sends one)."""
    stamp = node.cfg.archive_sent / heartbeat_name(node.id, peer)
    when = time.time() - hours * 3600
    os.utime(stamp, (when, when))


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001", "s002"))
    seed_ho(n, items=5)
    n.dispose()
    settle(n)
    yield n
    n.dispose()


def test_a_quiet_store_that_syncs_is_not_silent(net: Net) -> None:
    ho, s1, s2 = net.ho, net.store("s001"), net.store("s002")
    with ho.engine.connect() as conn:
        assert {r.peer for r in conn.execute(select(xchg_heartbeat.c.peer))} == {"s001", "s002"}
    age_ho_records(ho, 3)
    for store in (s1, s2):
        age_stamp(store, "ho", 3)
    ho.engine.dispose()
    with served(ho.cfg.home) as url:
        html = get(url, "/")
    assert state_of(html, "s001") == state_of(html, "s002") == "silent 3 h"

    # s001 syncs with nothing to send: no bundle, no ack, only its heartbeat
    out = cli_sync(s1)
    assert "exported 0, pushed 0" in out
    assert not list(s1.cfg.outbox.iterdir())
    assert (net.transfer / "ho" / heartbeat_name("s001", "ho")).is_file()
    cli_sync(ho)
    assert not (net.transfer / "ho" / heartbeat_name("s001", "ho")).exists()
    with served(ho.cfg.home) as url:
        html = get(url, "/")
        m = metrics(url)
    assert state_of(html, "s001") == "OK"
    assert state_of(html, "s002") == "silent 3 h"  # it did not sync: still silent
    now = time.time()
    assert now - m[("exchange_peer_last_heartbeat_timestamp_seconds", (("peer", "s001"),))] < 600
    assert now - m[("exchange_peer_last_contact_timestamp_seconds", (("peer", "s001"),))] < 600
    assert now - m[("exchange_peer_last_contact_timestamp_seconds", (("peer", "s002"),))] > 2 * 3600
    # the version shown is the one the store signed into its heartbeat
    with ho.engine.connect() as conn:
        version = conn.execute(select(xchg_heartbeat.c.app_version).where(xchg_heartbeat.c.peer == "s001")).scalar()
    assert version and re.search(rf"<td[^>]*>\s*{re.escape(version)}\s*</td>", html)


def test_a_document_parked_at_the_store_shows_at_the_ho(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    ids = item_ids(net)
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000001")  # recorded without an event: never sent, so the promotion parks at s001
        add_promotion(conn, "P00009", ["IX0000001", ids[0]])
    reload(ho, "s001", ["promotion"])
    ho.engine.dispose()
    with served(ho.cfg.home) as url:
        assert state_of(get(url, "/"), "s001") == "OK"
    cli_sync(ho)
    age_stamp(st, "ho", 1)  # time passed since its last heartbeat
    cli_sync(st)  # applies the bundle, parks the promotion, and says so in its heartbeat
    assert "P00009" in run("status", "parked", "--home", str(st.cfg.home)).output
    cli_sync(ho)
    with served(ho.cfg.home) as url:
        html = get(url, "/")
        m = metrics(url)
    assert "at the store: 1 document parked" in state_of(html, "s001")
    assert state_of(html, "s002") == "OK"
    assert m[("exchange_peer_reported_health", (("peer", "s001"), ("what", "parked")))] == 1
    assert m[("exchange_peer_reported_health", (("peer", "s002"), ("what", "parked")))] == 0
    for store in ("s001", "s002"):  # nothing parked at the HO itself
        assert m[("exchange_parked_documents", (("peer", store),))] == 0

    # the item arrives, the store applies the promotion: its next heartbeat clears the mark
    run("reload", "--home", str(ho.cfg.home), "--peer", "s001", "--doc", "item")
    cli_sync(ho)
    age_stamp(st, "ho", 1)
    cli_sync(st)
    cli_sync(ho)
    with served(ho.cfg.home) as url:
        assert state_of(get(url, "/"), "s001") == "OK"


def _tamper(data: bytes, member: str, edit: Any) -> bytes:
    """The heartbeat with ``member``'s bytes changed by ``edit`` (headers rewritten as exchange writes them)."""
    src, parts, mtime = io.BytesIO(data), [], 0
    while (m := tarfmt.read_header(src)) is not None:
        body = src.read(m.size)
        tarfmt.skip_padding(src, m.size)
        parts.append((m.name, edit(body) if m.name == member else body))
        mtime = m.mtime
    out = io.BytesIO()
    for name, body in parts:
        tarfmt.write_member(out, name, body, mtime)
    out.write(tarfmt.END)
    return out.getvalue()


def test_forged_altered_and_replayed_heartbeats_change_nothing(net: Net, tmp_path: Path) -> None:
    ho, st = net.ho, net.store("s001")
    name = heartbeat_name("s001", "ho")
    with ho.engine.connect() as conn:
        kept = conn.execute(select(xchg_heartbeat).where(xchg_heartbeat.c.peer == "s001")).mappings().one()
    genuine = ho.cfg.archive_received / name
    for word in (b"parked", b"waiting", b"quarantined", b"unacked", b"failed"):  # the health travels encrypted
        assert word not in genuine.read_bytes()
    assert read_heartbeat(genuine, ho.trust, me="ho", identities=ho.identities).health == dict.fromkeys(
        HEALTH_FIELDS, 0)

    def lands(data: bytes) -> None:
        write_file_atomic(ho.cfg.inbox / name, data)
        CliRunner().invoke(main, ["import", "--home", str(ho.cfg.home)], catch_exceptions=False)
        assert not (ho.cfg.inbox / name).exists()  # taken, dropped or set aside: never left waiting

    def quarantined() -> list[str]:
        return sorted(p.name for p in ho.cfg.quarantine.glob("*.reason"))

    # a replay of the genuine file: dropped (not newer), nothing changes, nothing quarantined
    lands(genuine.read_bytes())
    assert quarantined() == []
    # signed by the HO's own key in the store's name: refused
    bad = build_heartbeat(key=ho.signing_key, node="s001", peer="ho", health={**dict.fromkeys(HEALTH_FIELDS, 0),
                          "parked": 5}, recipients=st.recipients_for("ho"), created=utc_now() + timedelta(seconds=5))
    lands(bad)
    assert len(quarantined()) == 1
    # the store's genuine, newer heartbeat with its encrypted health altered: refused
    fresh = build_heartbeat(key=st.signing_key, node="s001", peer="ho", health=dict.fromkeys(HEALTH_FIELDS, 0),
                            recipients=st.recipients_for("ho"), created=utc_now() + timedelta(seconds=5))
    lands(_tamper(fresh, "health.json.age", lambda b: b[:-1] + bytes([b[-1] ^ 1])))
    assert len(quarantined()) == 2
    # a genuine heartbeat from a clock two hours ahead: refused (it would hide every later one)
    ahead = build_heartbeat(key=st.signing_key, node="s001", peer="ho", health=dict.fromkeys(HEALTH_FIELDS, 0),
                            recipients=st.recipients_for("ho"), created=utc_now() + timedelta(hours=2))
    lands(ahead)
    assert len(quarantined()) == 3
    reasons = [json.loads((ho.cfg.quarantine / r).read_text())["reason"] for r in quarantined()]
    assert any("is not trusted for principal 's001'" in r for r in reasons), reasons
    assert any("health.json.age" in r for r in reasons), reasons
    assert any("ahead of this node's clock" in r for r in reasons), reasons
    with ho.engine.connect() as conn:
        now = conn.execute(select(xchg_heartbeat).where(xchg_heartbeat.c.peer == "s001")).mappings().one()
    assert dict(now) == dict(kept)
    ho.engine.dispose()
    with served(ho.cfg.home) as url:  # set aside under the store's name: marked on its row
        assert state_of(get(url, "/"), "s001") == "3 files quarantined"
    # the genuine newer one is taken
    lands(fresh)
    with ho.engine.connect() as conn:
        assert conn.execute(select(xchg_heartbeat.c.created).where(
            xchg_heartbeat.c.peer == "s001")).scalar() != kept["created"]
