"""Prometheus metrics of a node, read from its database at scrape time.

:class:`ExchangeCollector` is a custom collector: nothing is counted in
memory, every scrape runs the same few grouped queries the Data Exchange page
uses, so the figures are right whichever process (service, CLI, scheduler)
moved the bundles. Only the sync cycles are counted by the process that
runs them (:class:`SyncFigures`). The page serves them at ``/metrics``, and
``exchange run`` on ``[metrics] port`` without the page (:mod:`metrics_http`);
docs/UI.md lists them, with the names they replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from exchange import __version__
from exchange.node.home import Node
from exchange.vocabulary import ConflictStatus, ReceivedStatus, SentStatus

log = logging.getLogger(__name__)

SENT_STATUSES = tuple(SentStatus)
RECEIVED_STATUSES = tuple(ReceivedStatus)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class SyncFigures:
    """The sync cycles this process ran: the one thing the database does not record."""

    last: float | None = None  # when the last cycle finished (Unix time), None before the first
    ok: bool | None = None  # whether it ended without an error
    cycles: int = 0
    failures: int = 0  # cycles that ended with an error (or raised)


class ExchangeCollector(Collector):
    """Bundles by direction and status, lag per stream, last sync, parked documents."""

    def __init__(self, node: Node, sync_figures: Callable[[], SyncFigures] | None = None) -> None:
        self.node = node
        self.sync_figures = sync_figures

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with the peers: no collect() at registration

    def collect(self) -> Iterable[Metric]:
        from exchange.service.ui.data import peer_stats, quarantined

        node = self.node
        info = InfoMetricFamily("exchange", "This node and the exchange version it runs.")
        info.add_metric([], {"node": node.id, "role": node.cfg.role, "version": __version__})
        yield info
        up = GaugeMetricFamily("exchange_database_up", "1 if the node database answered this scrape.")
        try:
            stats = peer_stats(node)
            n_quarantined = len(quarantined(node))
        except Exception as exc:  # a scrape reports a broken database, it does not fail
            log.error("metrics: reading the database failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        now = datetime.now(UTC)

        bundles = GaugeMetricFamily("exchange_bundles", "Bundles by direction and status (all peers).",
                                    labels=["direction", "status"])
        sent: dict[str, int] = dict.fromkeys(SENT_STATUSES, 0)
        received: dict[str, int] = dict.fromkeys(RECEIVED_STATUSES, 0)
        for st in stats.values():
            for k, v in st.sent_by_status.items():
                sent[k] = sent.get(k, 0) + v
            for k, v in st.received_by_status.items():
                received[k] = received.get(k, 0) + v
        received[ReceivedStatus.QUARANTINED] += n_quarantined
        for k, v in sent.items():
            bundles.add_metric(["sent", k], v)
        for k, v in received.items():
            bundles.add_metric(["received", k], v)
        yield bundles

        unacked = GaugeMetricFamily("exchange_sent_unacked_bundles",
                                    "Sent bundles not yet acknowledged (EXPORTED or UPLOADED), per peer.",
                                    labels=["peer"])
        lag = GaugeMetricFamily("exchange_sent_lag_seconds",
                                "Seconds since the oldest unacknowledged bundle to the peer was sealed "
                                "(0 when all are acknowledged).", labels=["peer"])
        applied = GaugeMetricFamily("exchange_received_last_applied_seq",
                                    "Last seq applied from the peer's stream.", labels=["peer"])
        seen = GaugeMetricFamily("exchange_received_highest_seq",
                                 "Highest seq seen from the peer (applied, waiting, held or failed).",
                                 labels=["peer"])
        behind = GaugeMetricFamily("exchange_received_lag_bundles",
                                   "Bundles seen from the peer but not applied yet (highest seen - last applied).",
                                   labels=["peer"])
        stuck = GaugeMetricFamily("exchange_received_stuck_bundles",
                                  "Received bundles WAITING, HELD or FAILED, per peer.", labels=["peer"])
        contact = GaugeMetricFamily("exchange_peer_last_contact_timestamp_seconds",
                                    "When the peer was last heard from: its newest heartbeat, bundle or ack "
                                    "(Unix time).", labels=["peer"])
        mismatched = GaugeMetricFamily("exchange_sent_mismatched_bundles",
                                       "Sent bundles whose ack reports other counts or control totals than "
                                       "were sealed (a parked document, a lost row), per peer.", labels=["peer"])
        heartbeat = GaugeMetricFamily("exchange_peer_last_heartbeat_timestamp_seconds",
                                      "The signed time of the peer's newest heartbeat (Unix time).",
                                      labels=["peer"])
        remote = GaugeMetricFamily("exchange_peer_reported_health",
                                   "What the peer's newest heartbeat reports about its side of the streams "
                                   "with this node (what: waiting, held, failed, parked, quarantined, unacked; "
                                   "heartbeat v2 adds conflicts_held, conflicts_decided, foreign_edits).",
                                   labels=["peer", "what"])
        went_back = GaugeMetricFamily("exchange_peer_went_back",
                                      "1 while the peer's streams went back in time (a store restored from a "
                                      "backup) and no restart repaired them (`exchange peer restart`).",
                                      labels=["peer"])
        parked = GaugeMetricFamily("exchange_parked_documents",
                                   "Documents parked at this node, per sending peer (0 when none).", labels=["peer"])
        sent_total = CounterMetricFamily("exchange_bundles_sent",
                                         "Bundles sealed for the peer (the last seq of the stream to it).",
                                         labels=["peer"])
        applied_total = CounterMetricFamily("exchange_bundles_applied",
                                            "Bundles applied from the peer (the last seq applied of its stream).",
                                            labels=["peer"])
        quarantined_total = CounterMetricFamily("exchange_bundles_quarantined",
                                                "Files from the peer in quarantine/ (a release lowers it: read "
                                                "as a counter reset).", labels=["peer"])
        rejected_total = CounterMetricFamily("exchange_bundles_rejected",
                                             "Bundles to the peer that its ack REJECTED (a prune lowers it: read "
                                             "as a counter reset).", labels=["peer"])
        sealed = _sealed(node)
        for peer in sorted(stats):
            st = stats[peer]
            unacked.add_metric([peer], st.sent_unacked)
            age = (now - st.oldest_unacked).total_seconds() if st.oldest_unacked else 0.0
            lag.add_metric([peer], max(0.0, age))
            applied.add_metric([peer], st.last_applied_seq)
            seen.add_metric([peer], st.highest_seen_seq)
            behind.add_metric([peer], st.received_behind)
            stuck.add_metric([peer], st.received_waiting)
            if st.last_contact is not None:
                contact.add_metric([peer], st.last_contact.timestamp())
            mismatched.add_metric([peer], st.sent_mismatched)
            if st.last_heartbeat is not None:
                heartbeat.add_metric([peer], st.last_heartbeat.timestamp())
            for what, n in sorted(st.remote_health.items()):
                remote.add_metric([peer, what], n)
            parked.add_metric([peer], st.parked)
            went_back.add_metric([peer], 1 if st.went_back else 0)
            sent_total.add_metric([peer], sealed.get(peer, 0))
            applied_total.add_metric([peer], sum(x[1] for x in st.lanes.values()) or st.last_applied_seq)
            quarantined_total.add_metric([peer], st.quarantined)
            rejected_total.add_metric([peer], st.sent_rejected)
        yield from (unacked, lag, applied, seen, behind, stuck, contact, heartbeat, remote, mismatched, parked,
                    went_back, sent_total, applied_total, quarantined_total, rejected_total)
        yield from self._lanes(stats, node)
        aside = GaugeMetricFamily("exchange_set_aside_documents",
                                  "Documents this node could not encode and did not send (exchange set-aside list).")
        aside.add_metric([], _set_aside_count(node))
        yield aside
        yield from self._conflicts()
        yield from self._syncs()

    def _lanes(self, stats: Mapping[str, Any], node: Node) -> Iterable[Metric]:
        """Each stream per lane (docs/CATALOG.md "Lanes"): a seq counts within its lane, so a lane stuck
        behind a FAILED bundle shows apart from the lanes that flow."""
        applied = GaugeMetricFamily("exchange_lane_received_last_applied_seq",
                                    "Last seq applied from the peer's stream in the lane.", labels=["peer", "lane"])
        behind = GaugeMetricFamily("exchange_lane_received_lag_bundles",
                                   "Bundles seen from the peer in the lane but not applied yet.",
                                   labels=["peer", "lane"])
        sealed = GaugeMetricFamily("exchange_lane_sent_last_seq",
                                   "The last seq sealed for the peer in the lane.", labels=["peer", "lane"])
        for peer in sorted(stats):
            for lane, (top, last) in sorted(stats[peer].lanes.items()):
                applied.add_metric([peer, lane], last)
                behind.add_metric([peer, lane], max(0, top - last))
        for (peer, lane), n in sorted(_sealed_per_lane(node).items()):
            sealed.add_metric([peer, lane], n)
        return [applied, behind, sealed]

    def _syncs(self) -> Iterable[Metric]:
        """The sync cycles of this process: counted from its start, present (0) before the first."""
        figures = self.sync_figures() if self.sync_figures else SyncFigures()
        cycles = CounterMetricFamily("exchange_sync_cycles", "Sync cycles run by this process.")
        cycles.add_metric([], figures.cycles)
        failures = CounterMetricFamily("exchange_sync_failures",
                                       "Sync cycles run by this process that ended with an error.")
        failures.add_metric([], figures.failures)
        out: list[Metric] = [cycles, failures]
        if figures.last is not None:
            g = GaugeMetricFamily("exchange_last_sync_timestamp_seconds",
                                  "When the last sync cycle run by this process finished (Unix time).")
            g.add_metric([], figures.last)
            ok = GaugeMetricFamily("exchange_last_sync_success",
                                   "1 if the last sync cycle run by this process ended without an error, else 0.")
            ok.add_metric([], 1 if figures.ok else 0)
            out += [g, ok]
        return out

    def _conflicts(self) -> Iterable[Metric]:
        """OPEN conflicts (held for a person) per type editable on both sides; the whole log by status."""
        from exchange.database.conflicts import counts

        g = GaugeMetricFamily("exchange_conflicts_open", "Conflicts of documents edited on both sides held for "
                              "a person (`exchange conflicts list --open`), per document type.",
                              labels=["doc_type"])
        logged = GaugeMetricFamily("exchange_conflicts", "The conflict log: conflicts per document type and "
                                   "status (OPEN, DECIDED, RESOLVED).", labels=["doc_type", "status"])
        with self.node.engine.connect() as conn:
            found = counts(conn)
        held = {t: n for (t, s), n in found.items() if s == ConflictStatus.OPEN}
        for name in sorted({d.name for d in self.node.catalog if d.both_sides} | set(held)):
            g.add_metric([name], held.get(name, 0))
        for (t, s), n in sorted(found.items()):
            logged.add_metric([t, s], n)
        return [g, logged]


def make_registry(node: Node, sync_figures: Callable[[], SyncFigures] | None = None) -> CollectorRegistry:
    """A registry of its own holding one :class:`ExchangeCollector` (not the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExchangeCollector(node, sync_figures))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of ``registry``."""
    return generate_latest(registry)


def _set_aside_count(node: Node) -> int:
    from sqlalchemy import func, select

    from exchange.database.tables import xchg_setaside

    with node.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(xchg_setaside)).scalar() or 0)


def _sealed(node: Node) -> dict[str, int]:
    """Bundles sealed per peer: the streams' last seqs (summed over the lanes), which a prune of old rows
    does not lower."""
    out: dict[str, int] = {}
    for (peer, _lane), n in _sealed_per_lane(node).items():
        out[peer] = out.get(peer, 0) + n
    return out


def _sealed_per_lane(node: Node) -> dict[tuple[str, str], int]:
    """The last seq sealed per peer and lane."""
    from sqlalchemy import select

    from exchange.database.tables import xchg_stream_out

    with node.engine.connect() as conn:
        return {(str(p), str(lane)): max(0, int(n) - 1) for p, lane, n in conn.execute(
            select(xchg_stream_out.c.peer, xchg_stream_out.c.lane, xchg_stream_out.c.next_seq))}
