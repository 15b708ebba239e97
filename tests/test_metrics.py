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
from exchange.database.tables import xchg_parked, xchg_received, xchg_sent, xchg_stream_in, xchg_stream_out
from exchange.node.home import Node
from exchange.send.export import export_all, reload
from exchange.service.metrics import SyncFigures, make_registry, render
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
    for store in ("s001", "s002"):
        assert value(m, "exchange_parked_documents", peer=store) == 0  # zero-valued series are present
    assert ("exchange_last_sync_timestamp_seconds", ()) not in m  # no sync ran in this process
    assert ("exchange_last_sync_success", ()) not in m
    assert value(m, "exchange_sync_cycles_total") == 0
    assert value(m, "exchange_sync_failures_total") == 0
    with ho.engine.connect() as conn:
        sealed = dict(conn.execute(select(xchg_stream_out.c.peer, xchg_stream_out.c.next_seq)).all())
        rejected = dict(conn.execute(select(xchg_sent.c.peer, func.count()).where(
            xchg_sent.c.status == "REJECTED").group_by(xchg_sent.c.peer)).all())
    for store in ("s001", "s002"):
        assert value(m, "exchange_bundles_sent_total", peer=store) == sealed[store] - 1 > 0
        assert value(m, "exchange_bundles_applied_total", peer=store) == applied[store] > 0
        assert value(m, "exchange_bundles_rejected_total", peer=store) == rejected.get(store, 0)
        assert value(m, "exchange_bundles_quarantined_total", peer=store) == 0
    names = {name for name, _labels in m}
    assert not {n for n in names if n.endswith("_by_peer")}  # one metric with a peer label, no twin
    assert "exchange_scrape_timestamp_seconds" not in names  # Prometheus records the scrape time itself


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
    assert value(m, "exchange_parked_documents", peer="ho") == 1
    assert value(m, "exchange_bundles_quarantined_total", peer="ho") == 1
    assert value(m, "exchange_bundles", direction="received", status="WAITING") == 1
    assert value(m, "exchange_bundles", direction="received", status="QUARANTINED") == 1
    assert value(m, "exchange_received_stuck_bundles", peer="ho") == 1
    assert value(m, "exchange_received_highest_seq", peer="ho") == 50
    assert value(m, "exchange_received_last_applied_seq", peer="ho") == last_seq
    assert value(m, "exchange_received_lag_bundles", peer="ho") == 50 - last_seq
    assert job.finished is not None
    assert value(m, "exchange_last_sync_timestamp_seconds") == pytest.approx(job.finished)
    assert value(m, "exchange_last_sync_success") == 1
    assert value(m, "exchange_sync_cycles_total") == 1
    assert value(m, "exchange_sync_failures_total") == 0
    assert value(m, "exchange_info", node="s001", role="store",
                 version=__import__("exchange").__version__) == 1


def test_database_down_is_reported_not_raised(homes: Path) -> None:
    node = Node.open(homes / "s001")
    node.cfg.database = f"sqlite:///{homes / 'missing' / 'nowhere.db'}"
    m = parse(render(make_registry(node, lambda: SyncFigures(time.time(), True, 1, 0))).decode())
    assert value(m, "exchange_database_up") == 0
    assert ("exchange_bundles", (("direction", "sent"), ("status", "PROCESSED"))) not in m


# ---------------------------------------------------------------- counters per peer, SQLite and PostgreSQL

def test_counters_per_peer_match_the_database(tmp_path: Path, db_url: str) -> None:
    """The HO's database on SQLite, then PostgreSQL: each counter per peer against the rows it counts."""
    from enginehelpers import make_net, seed_ho, seed_store

    net = make_net(tmp_path / "net", ho_db=db_url, stores=("s001", "s002"))
    try:
        seed_ho(net, items=5)
        net.settle()  # the stores have the items before they sell them
        seed_store(net, "s001", sales=3)
        net.settle()
        ho = net.ho
        (ho.cfg.quarantine / "s002.ho.0000000009.bundle.reason").write_text(
            '{"time": "2026-01-01T00:00:00+00:00", "reason": "test"}')
        with served(ho.cfg.home) as ui:
            m = scrape(ui.url)
        with ho.engine.connect() as conn:
            sent = dict(conn.execute(select(xchg_sent.c.peer, func.count()).group_by(xchg_sent.c.peer)).all())
            applied = dict(conn.execute(select(xchg_received.c.peer, func.count()).where(
                xchg_received.c.status == "APPLIED").group_by(xchg_received.c.peer)).all())
        assert set(sent) == {"s001", "s002"} and applied.get("s001", 0) > 0
        for store in ("s001", "s002"):
            assert value(m, "exchange_bundles_sent_total", peer=store) == sent[store]
            assert value(m, "exchange_bundles_applied_total", peer=store) == applied.get(store, 0)
            assert value(m, "exchange_bundles_rejected_total", peer=store) == 0
            assert value(m, "exchange_parked_documents", peer=store) == 0
        assert value(m, "exchange_bundles_quarantined_total", peer="s001") == 0
        assert value(m, "exchange_bundles_quarantined_total", peer="s002") == 1
        assert value(m, "exchange_database_up") == 1
    finally:
        net.dispose()


# ---------------------------------------------------------------- `exchange run` without the page

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(home: Path, *run_args: str) -> Iterator[tuple[str, Path]]:
    """`exchange run` as a subprocess (the real CLI), stopped with SIGTERM; yields its metrics URL."""
    import signal
    import subprocess
    import sys

    port = free_port()
    log_file = home / "service.log"
    with open(log_file, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "exchange", "run", "--home", str(home), "--interval", "3600",
                                 "--no-usb", "--metrics-port", str(port), *run_args],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield f"http://127.0.0.1:{port}/", log_file
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0, log_file.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def scrape_after_first_sync(url: str, log_file: Path) -> Samples:
    """Scrape until the start-up sync cycle is counted (bounded: 60 s)."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            m = scrape(url)
        except OSError:  # not listening yet
            time.sleep(0.1)
            continue
        if m.get(("exchange_sync_cycles_total", ()), 0) >= 1:
            return m
        time.sleep(0.1)
    raise AssertionError("no sync counted within 60 s:\n" + log_file.read_text(errors="replace"))


def test_run_serves_metrics_without_the_page(homes: Path) -> None:
    store = homes / "s001"
    active = [ln.strip() for ln in (store / "exchange.toml").read_text().splitlines()]
    assert "[ui]" not in active  # no page (the template lists [ui] commented out): the metrics alone
    with running(store) as (url, log_file):
        m = scrape_after_first_sync(url, log_file)
    assert value(m, "exchange_sync_cycles_total") == 1
    assert value(m, "exchange_sync_failures_total") == 0
    assert value(m, "exchange_last_sync_success") == 1
    assert time.time() - 120 < value(m, "exchange_last_sync_timestamp_seconds") <= time.time()
    assert value(m, "exchange_info", node="s001", role="store",
                 version=__import__("exchange").__version__) == 1
    node = Node.open(store)
    with node.engine.connect() as conn:
        last_seq = int(conn.execute(select(xchg_stream_in.c.last_seq)).scalar() or 0)
    assert value(m, "exchange_bundles_applied_total", peer="ho") == last_seq > 0
    assert value(m, "exchange_parked_documents", peer="ho") == 0


def test_run_counts_a_failed_sync(homes: Path) -> None:
    import shutil

    shutil.rmtree(homes / "transfer")
    (homes / "transfer").write_text("not a folder")  # the drop is gone: every pull and push fails
    with running(homes / "s001") as (url, log_file):
        m = scrape_after_first_sync(url, log_file)
    assert value(m, "exchange_sync_cycles_total") == 1
    assert value(m, "exchange_sync_failures_total") == 1
    assert value(m, "exchange_last_sync_success") == 0


def test_run_metrics_port_taken_is_a_clear_error(homes: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "exchange", "run", "--home", str(homes / "s001"), "--no-usb",
                              "--metrics-port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr  # a configuration error (errors.EXIT_CODES)
    assert f"cannot serve the metrics on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- the Grafana dashboard

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"


def dashboard_metrics() -> set[str]:
    """Every exchange_* name the dashboard's queries (panel targets and variables) use."""
    import json
    import re

    board = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, object]]) -> None:
        for p in panels:
            for t in p.get("targets", []):  # type: ignore[attr-defined]
                exprs.append(str(t["expr"]))
            walk(p.get("panels", []))  # type: ignore[arg-type]

    walk(board["panels"])
    for var in board.get("templating", {}).get("list", []):
        q = var.get("query")
        exprs.append(str(q.get("query", "") if isinstance(q, dict) else q or ""))
    assert exprs
    return set(re.findall(r"\bexchange_[a-z_]+\b", " ".join(exprs)))


def test_grafana_dashboard_uses_only_metrics_a_real_scrape_has(homes: Path) -> None:
    """The HO after a sync by its page: every metric the dashboard queries is in the scrape."""
    with served(homes / "ho") as ui:
        ui.context.jobs.start_sync()
        job = ui.context.jobs.wait(60)
        assert job is not None and job.ok, job
        m = scrape(ui.url)
    scraped = {name for name, _labels in m}
    used = dashboard_metrics()
    assert {"exchange_sync_failures_total", "exchange_last_sync_success", "exchange_bundles_sent_total",
            "exchange_peer_last_contact_timestamp_seconds"} <= used
    assert used - scraped == set(), f"the dashboard queries metrics no scrape has: {sorted(used - scraped)}"


def test_run_refuses_a_metrics_port_that_is_not_a_port(homes: Path) -> None:
    import subprocess
    import sys

    toml = homes / "s001" / "exchange.toml"
    toml.write_text(toml.read_text() + '\n[metrics]\nport = "nine"\n')
    out = subprocess.run([sys.executable, "-m", "exchange", "run", "--home", str(homes / "s001"), "--no-usb"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr  # a configuration error (errors.EXIT_CODES)
    assert "(metrics.port)" in out.stderr and "'nine'" in out.stderr
    assert "Traceback" not in out.stderr
