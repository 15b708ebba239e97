"""``/metrics``: scraped over plain HTTP, parsed with prometheus_client's parser, checked
against the node databases built by the demo."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select

from exchange.database import schema
from exchange.database.capture import record_event
from exchange.database.tables import xchg_parked, xchg_received, xchg_sent, xchg_stream_in
from exchange.node.home import Node
from exchange.send.export import export_all, reload
from exchange.service.metrics import make_registry, render
from exchange.service.sync import push, sync
from exchange.service.ui.server import UiServer, UiSettings, create_app

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]




@contextmanager
def served(home: Path) -> Iterator[UiServer]:
    node = Node.open(home)
    settings = UiSettings.for_node(node, port=0)
    server = UiServer(create_app(node, settings), settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url + "metrics", timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(resp.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def by_status(node: Node, table: object) -> dict[str, int]:
    t = table  # xchg_sent or xchg_received
    with node.engine.connect() as conn:
        return {s: int(n) for s, n in conn.execute(
            select(t.c.status, func.count()).group_by(t.c.status))}  # type: ignore[attr-defined]


def test_ho_metrics_match_the_database(homes: Path) -> None:
    ho = Node.open(homes / "ho")
    reload(ho, "s001", ["item"])  # a bundle waiting for s001's ack
    export_all(ho)
    push(ho)
    with served(homes / "ho") as ui:
        m = scrape(ui.url)
    sent, received = by_status(ho, xchg_sent), by_status(ho, xchg_received)
    assert sent.get("UPLOADED") == 1
    for status in ("EXPORTED", "UPLOADED", "PROCESSED", "REJECTED"):
        assert value(m, "exchange_bundles", direction="sent", status=status) == sent.get(status, 0)
    for status in ("RECEIVED", "APPLIED", "WAITING", "HELD", "FAILED"):
        assert value(m, "exchange_bundles", direction="received", status=status) == received.get(status, 0)
    assert value(m, "exchange_bundles", direction="received", status="QUARANTINED") == 0
    assert value(m, "exchange_info", node="ho", role="ho", version=__import__("exchange").__version__) == 1
    assert value(m, "exchange_database_up") == 1

    with ho.engine.connect() as conn:
        oldest = conn.execute(select(func.min(xchg_sent.c.created_at)).where(
            xchg_sent.c.peer == "s001", xchg_sent.c.status.in_(("EXPORTED", "UPLOADED")))).scalar()
        applied = dict(conn.execute(select(xchg_stream_in.c.peer, xchg_stream_in.c.last_seq)).all())
        top = dict(conn.execute(select(xchg_received.c.peer, func.max(xchg_received.c.seq))
                                .group_by(xchg_received.c.peer)).all())
        last_rx = {p: max(t for t in (rx, ap) if t) for p, rx, ap in conn.execute(
            select(xchg_received.c.peer, func.max(xchg_received.c.received_at),
                   func.max(xchg_received.c.applied_at)).group_by(xchg_received.c.peer))}
        last_ack = dict(conn.execute(select(xchg_sent.c.peer, func.max(xchg_sent.c.processed_at))
                                     .group_by(xchg_sent.c.peer)).all())
    assert value(m, "exchange_sent_unacked_bundles", peer="s001") == 1
    assert value(m, "exchange_sent_unacked_bundles", peer="s002") == 0
    assert oldest is not None
    age = (datetime.now(UTC) - oldest.replace(tzinfo=UTC)).total_seconds()
    assert 0 <= value(m, "exchange_sent_lag_seconds", peer="s001") <= age + 1
    assert value(m, "exchange_sent_lag_seconds", peer="s001") >= age - 60
    assert value(m, "exchange_sent_lag_seconds", peer="s002") == 0
    for store in ("s001", "s002"):
        assert value(m, "exchange_received_last_applied_seq", peer=store) == applied[store]
        assert value(m, "exchange_received_highest_seq", peer=store) == top[store]
        assert value(m, "exchange_received_lag_bundles", peer=store) == top[store] - applied[store]
        contact = max(t.replace(tzinfo=UTC) for t in (last_rx[store], last_ack[store]) if t)
        assert value(m, "exchange_peer_last_contact_timestamp_seconds", peer=store) == contact.timestamp()
    assert value(m, "exchange_parked_documents") == 0
    assert ("exchange_last_sync_timestamp_seconds", ()) not in m  # no sync ran in this process


def test_store_metrics_count_parked_waiting_and_quarantined(homes: Path) -> None:
    ho = Node.open(homes / "ho")
    with ho.engine.begin() as conn:  # an item without an event, named by a promotion with one
        conn.execute(insert(schema.item), [{
            "item_id": "I9999999", "name": "Unannounced", "category": "BEVERAGE", "uom": "EA",
            "price": 3, "tax_rate": 5, "active": True, "updated_at": datetime.now().replace(microsecond=0)}])
        conn.execute(insert(schema.promotion_item), [{
            "promo_id": "P00001", "line_no": 99, "item_id": "I9999999", "promo_price": 2}])
        record_event(conn, "promotion", ("P00001",))
    sync(ho)
    store = Node.open(homes / "s001")
    with served(homes / "s001") as ui:
        ui.context.jobs.start_sync()
        job = ui.context.jobs.wait(60)
        assert job is not None and job.ok, job
        with store.engine.begin() as conn:  # a bundle from the future: WAITING for the ones before it
            conn.execute(insert(xchg_received).values(
                peer="ho", seq=50, file_name="ho.s001.0000000050.bundle", file_sha256="0" * 64,
                status="WAITING", summary="{}", received_at=datetime.now(UTC), reason="waiting"))
        (store.cfg.quarantine / "ho.s001.0000000007.bundle.reason").write_text(
            '{"time": "2026-01-01T00:00:00+00:00", "reason": "test"}')
        m = scrape(ui.url)
    with store.engine.connect() as conn:
        parked = int(conn.execute(select(func.count()).select_from(xchg_parked)).scalar() or 0)
        last_seq = int(conn.execute(select(xchg_stream_in.c.last_seq)).scalar() or 0)
    assert parked == 1
    assert value(m, "exchange_parked_documents") == 1
    assert value(m, "exchange_parked_documents_by_peer", peer="ho") == 1
    assert value(m, "exchange_bundles", direction="received", status="WAITING") == 1
    assert value(m, "exchange_bundles", direction="received", status="QUARANTINED") == 1
    assert value(m, "exchange_received_stuck_bundles", peer="ho") == 1
    assert value(m, "exchange_received_highest_seq", peer="ho") == 50
    assert value(m, "exchange_received_last_applied_seq", peer="ho") == last_seq
    assert value(m, "exchange_received_lag_bundles", peer="ho") == 50 - last_seq
    assert job.finished is not None
    assert value(m, "exchange_last_sync_timestamp_seconds") == pytest.approx(job.finished)
    assert value(m, "exchange_info", node="s001", role="store",
                 version=__import__("exchange").__version__) == 1


def test_database_down_is_reported_not_raised(homes: Path) -> None:
    node = Node.open(homes / "s001")
    node.cfg.database = f"sqlite:///{homes / 'missing' / 'nowhere.db'}"
    m = parse(render(make_registry(node, lambda: time.time())).decode())
    assert value(m, "exchange_database_up") == 0
    assert ("exchange_bundles", (("direction", "sent"), ("status", "PROCESSED"))) not in m
