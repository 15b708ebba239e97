"""What the pages show, read from the node database (no HTML here).

Every figure is a few grouped queries over the ``xchg_*`` tables, so the HO
overview of a thousand stores costs the same handful of queries as a store's
page. Times from the database are made timezone-aware (SQLite returns naive
UTC datetimes).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from exchange import timefmt
from exchange.receive.stuck import reason_with_resolution, sent_reason_with_resolution

from sqlalchemy import func, select

from exchange.database.tables import (xchg_heartbeat, xchg_parked, xchg_peer_catalog, xchg_received, xchg_sent,
                                       xchg_stream_in)
from exchange.node.home import Node
from exchange.service import status
from exchange.vocabulary import DEFAULT_LANE, ReceivedStatus, SentStatus

#: Sender statuses of a bundle that has not been acknowledged yet.
UNACKED = (SentStatus.EXPORTED, SentStatus.UPLOADED)
#: Receiver statuses of a bundle that is stuck until something happens.
STUCK_IN = (ReceivedStatus.WAITING, ReceivedStatus.HELD, ReceivedStatus.FAILED)


def aware(t: datetime | None) -> datetime | None:
    """``t`` with a timezone (naive values from the database are UTC)."""
    return None if t is None else timefmt.aware(t)


def _latest(*times: datetime | None) -> datetime | None:
    got = [t for t in (aware(x) for x in times) if t is not None]
    return max(got) if got else None


def _summary(text: str | None) -> dict[str, int]:
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _reported(text: str | None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """A stored heartbeat's figures, and the changes to our documents it named (receive/heartbeat.py)."""
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}, []
    if not isinstance(data, dict):
        return {}, []
    foreign = data.pop("foreign", [])
    figures = {str(k): int(v) for k, v in data.items() if type(v) is int}
    return figures, [f for f in foreign if isinstance(f, dict)] if isinstance(foreign, list) else []


# ---------------------------------------------------------------- bundles

@dataclass(frozen=True)
class Bundle:
    file: str
    peer: str
    seq: int
    documents: dict[str, int]
    status: str
    created: datetime | None  # sealed (sent) / received
    updated: datetime | None  # uploaded or processed (sent) / applied (received)
    reason: str | None


def sent_bundles(node: Node, peer: str | None = None, limit: int = 200) -> tuple[list[Bundle], int]:
    """The newest ``limit`` sent bundles (optionally of one peer), and how many there are in all."""
    t = xchg_sent
    cond = t.c.peer == peer if peer else None
    q = select(t).order_by(t.c.created_at.desc(), t.c.peer, t.c.seq.desc()).limit(limit)
    n = select(func.count()).select_from(t)
    if cond is not None:
        q, n = q.where(cond), n.where(cond)
    with node.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
        total = int(conn.execute(n).scalar() or 0)
    return [Bundle(r["file_name"], r["peer"], int(r["seq"]), _summary(r["summary"]), r["status"],
                   aware(r["created_at"]), _latest(r["processed_at"], r["uploaded_at"]),
                   sent_reason_with_resolution(r["status"], r["peer"], int(r["seq"]), r["reason"], r["lane"]))
            for r in rows], total


def quarantined(node: Node, peer: str | None = None) -> list[Bundle]:
    """Files set aside in quarantine/, read from their reason files (as ``exchange status`` does)."""
    out: list[Bundle] = []
    for q in status.quarantined(node):
        if peer and q.peer != peer:
            continue
        try:
            when = aware(datetime.fromisoformat(str(q.time)))
        except ValueError:
            when = aware(datetime.fromtimestamp(q.mtime, UTC))
        out.append(Bundle(q.file, q.peer, q.seq, {}, ReceivedStatus.QUARANTINED, when, None, q.reason))
    return out


def received_bundles(node: Node, peer: str | None = None, limit: int = 200) -> tuple[list[Bundle], int]:
    """The newest ``limit`` received bundles and quarantined files, and how many in all."""
    t = xchg_received
    cond = t.c.peer == peer if peer else None
    q = select(t.c.file_name, t.c.peer, t.c.seq, t.c.summary, t.c.status, t.c.received_at,
               t.c.applied_at, t.c.reason, t.c.lane).order_by(t.c.received_at.desc(), t.c.peer,
                                                     t.c.seq.desc()).limit(limit)
    n = select(func.count()).select_from(t)
    if cond is not None:
        q, n = q.where(cond), n.where(cond)
    with node.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
        total = int(conn.execute(n).scalar() or 0)
    out = [Bundle(r["file_name"], r["peer"], int(r["seq"]), _summary(r["summary"]), r["status"],
                  aware(r["received_at"]), aware(r["applied_at"]),
                  reason_with_resolution(r["status"], r["peer"], int(r["seq"]), r["reason"], r["lane"])) for r in rows]
    q_files = quarantined(node, peer)
    epoch = datetime.min.replace(tzinfo=UTC)
    out = sorted(out + q_files, key=lambda b: (b.created or epoch, b.seq), reverse=True)
    return out[:limit], total + len(q_files)


@dataclass(frozen=True)
class ParkedDoc:
    doc_type: str
    doc_key: str
    peer: str
    seq: int
    error: str
    attempts: int
    parked_at: datetime | None


def set_aside_docs(node: Node) -> list[Any]:
    """Documents this node could not encode and did not send (exchange.send.setaside), oldest first."""
    from exchange.send.setaside import listing

    return listing(node)


def parked_docs(node: Node, peer: str | None = None, limit: int = 500) -> tuple[list[ParkedDoc], int]:
    t = xchg_parked
    q = select(t.c.doc_type, t.c.doc_key, t.c.peer, t.c.seq, t.c.error, t.c.attempts,
               t.c.parked_at).order_by(t.c.parked_at, t.c.doc_type, t.c.doc_key).limit(limit)
    n = select(func.count()).select_from(t)
    if peer:
        q, n = q.where(t.c.peer == peer), n.where(t.c.peer == peer)
    with node.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
        total = int(conn.execute(n).scalar() or 0)
    return [ParkedDoc(r["doc_type"], r["doc_key"], r["peer"], int(r["seq"]), r["error"],
                      int(r["attempts"]), aware(r["parked_at"])) for r in rows], total


# ---------------------------------------------------------------- per-peer figures

_EPOCH = datetime.min.replace(tzinfo=UTC)

@dataclass
class PeerStats:
    """Both streams with one peer, as the HO overview and the metrics see them."""

    peer: str
    role: str = ""
    sent_total: int = 0
    sent_waiting: int = 0  # sent, not PROCESSED (EXPORTED, UPLOADED, REJECTED)
    sent_unacked: int = 0  # EXPORTED or UPLOADED
    sent_rejected: int = 0
    sent_mismatched: int = 0  # PROCESSED bundles whose ack reports other figures than were sealed
    sent_unexplained: int = 0  # of those, the ones whose parked and stale counts do not explain it
    oldest_unacked: datetime | None = None  # created_at of the oldest EXPORTED/UPLOADED bundle
    last_ack: datetime | None = None  # the newest processed_at
    received_total: int = 0
    received_waiting: int = 0  # WAITING, HELD or FAILED
    received_failed: int = 0
    received_held: int = 0
    received_stalled: int = 0  # WAITING: held back behind a bundle that has not arrived
    quarantined: int = 0  # files in quarantine/ whose name claims this peer as sender
    last_received: datetime | None = None
    highest_seen_seq: int = 0
    last_applied_seq: int = 0
    #: per lane of the peer's stream to this node: [highest seq seen, last seq applied] (a seq counts per lane)
    lanes: dict[str, list[int]] = field(default_factory=dict)
    stalled_lanes: set[str] = field(default_factory=set)  # lanes with a bundle WAITING for an earlier one
    parked: int = 0
    sent_by_status: dict[str, int] = field(default_factory=dict)
    received_by_status: dict[str, int] = field(default_factory=dict)
    last_heartbeat: datetime | None = None  # its newest heartbeat's signed time (at most when it arrived)
    remote_version: str | None = None  # the version its newest heartbeat states
    remote_health: dict[str, int] = field(default_factory=dict)  # what it reported about itself
    #: heartbeat v2: changes it made to documents this node owns, each with the columns that differ from ours
    remote_foreign: list[dict[str, Any]] = field(default_factory=list)
    went_back: str | None = None  # evidence its streams went back in time (exchange.receive.restart)
    repair: str = ""  # the one command that repairs that

    @property
    def last_contact(self) -> datetime | None:
        """When this peer was last heard from, by any signed sign of life: its newest heartbeat,
        bundle, or ack of ours (an acknowledged upload). The ``node-<peer>.json`` it publishes is not
        counted: it is unsigned, and anyone who can write the folder could keep a silent store green."""
        return _latest(self.last_received, self.last_ack, self.last_heartbeat)

    @property
    def missing_seq(self) -> int | None:
        """The bundle a WAITING stream waits for (the one after the last applied), if any waits."""
        if self.stalled_lanes and DEFAULT_LANE not in self.stalled_lanes:
            return None  # (another lane's: see missing)
        return self.last_applied_seq + 1 if self.received_stalled else None

    @property
    def missing(self) -> list[str]:
        """Each bundle a WAITING stream waits for, as the page says it: ``bundle 7`` (the default lane),
        ``bundle 3 of lane masters``."""
        out = [] if self.missing_seq is None else [f"bundle {self.missing_seq}"]
        for lane in sorted(self.stalled_lanes - {DEFAULT_LANE}):
            out.append(f"bundle {self.lanes.get(lane, [0, 0])[1] + 1} of lane {lane}")
        return out

    @property
    def received_behind(self) -> int:
        if self.lanes:  # summed over the lanes: each lane's seqs are its own
            return sum(max(0, top - applied) for top, applied in self.lanes.values())
        return max(0, self.highest_seen_seq - self.last_applied_seq)


def peer_stats(node: Node) -> dict[str, PeerStats]:
    """Figures for every configured peer (and any other peer the database knows)."""
    out: dict[str, PeerStats] = {p.id: PeerStats(p.id, p.role) for p in node.cfg.peers.values()}

    def get(peer: str) -> PeerStats:
        if peer not in out:
            out[peer] = PeerStats(peer)
        return out[peer]

    s, r = xchg_sent, xchg_received
    with node.engine.connect() as conn:
        for peer, status, n, oldest, last_ack in conn.execute(
                select(s.c.peer, s.c.status, func.count(), func.min(s.c.created_at),
                       func.max(s.c.processed_at)).group_by(s.c.peer, s.c.status)):
            st, n = get(peer), int(n)
            st.sent_by_status[status] = n
            st.sent_total += n
            if status != SentStatus.PROCESSED:
                st.sent_waiting += n
            if status in UNACKED:
                st.sent_unacked += n
                o = aware(oldest)
                if o is not None and (st.oldest_unacked is None or o < st.oldest_unacked):
                    st.oldest_unacked = o
            if status == SentStatus.REJECTED:
                st.sent_rejected += n
            st.last_ack = _latest(st.last_ack, last_ack)
        for peer, lane, top in conn.execute(select(r.c.peer, r.c.lane, func.max(r.c.seq)).group_by(r.c.peer, r.c.lane)):
            get(peer).lanes.setdefault(str(lane), [0, 0])[0] = int(top or 0)
        for peer, lane in conn.execute(select(r.c.peer, r.c.lane).where(r.c.status == ReceivedStatus.WAITING)
                                       .group_by(r.c.peer, r.c.lane)):
            get(peer).stalled_lanes.add(str(lane))
        for peer, status, n, last_rx, last_applied, top in conn.execute(
                select(r.c.peer, r.c.status, func.count(), func.max(r.c.received_at),
                       func.max(r.c.applied_at), func.max(r.c.seq)).group_by(r.c.peer, r.c.status)):
            st, n = get(peer), int(n)
            st.received_by_status[status] = n
            st.received_total += n
            if status in STUCK_IN:
                st.received_waiting += n
            if status == ReceivedStatus.FAILED:
                st.received_failed += n
            if status == ReceivedStatus.HELD:
                st.received_held += n
            if status == ReceivedStatus.WAITING:
                st.received_stalled += n
            st.last_received = _latest(st.last_received, last_rx, last_applied)
        for st in out.values():  # the per-peer figures are the default lane's (as before lanes)
            st.highest_seen_seq = max(st.highest_seen_seq, st.lanes.get(DEFAULT_LANE, [0, 0])[0])
        for peer, lane, last_seq in conn.execute(select(xchg_stream_in.c.peer, xchg_stream_in.c.lane,
                                                        xchg_stream_in.c.last_seq)):
            st = get(peer)
            seqs = st.lanes.setdefault(str(lane), [0, 0])
            seqs[1], seqs[0] = int(last_seq), max(seqs[0], int(last_seq))
            if lane == DEFAULT_LANE:  # the per-peer figures are the default lane's (as before lanes)
                st.last_applied_seq = int(last_seq)
                st.highest_seen_seq = max(st.highest_seen_seq, int(last_seq))
        for peer, n in conn.execute(select(xchg_parked.c.peer, func.count()).group_by(xchg_parked.c.peer)):
            get(peer).parked = int(n)
        for peer, n in conn.execute(select(s.c.peer, func.count()).where(s.c.reconcile.like('%"ok": false%'))
                                    .group_by(s.c.peer)):
            get(peer).sent_mismatched = int(n)
        for peer, n in conn.execute(select(s.c.peer, func.count()).where(
                s.c.reconcile.like('%"unexplained": ["%')).group_by(s.c.peer)):
            get(peer).sent_unexplained = int(n)
        h = xchg_heartbeat
        for peer, created, received, version, health in conn.execute(
                select(h.c.peer, h.c.created, h.c.received_at, h.c.app_version, h.c.health)):
            st = get(peer)
            st.last_heartbeat = min(aware(created) or _EPOCH, aware(received) or _EPOCH)
            st.remote_version = str(version)
            st.remote_health, st.remote_foreign = _reported(health)
    for q in quarantined(node):
        if q.peer:
            get(q.peer).quarantined += 1
    from exchange.receive.stuck import REGRESS_SQL, regress_problems

    with node.engine.connect() as conn:  # a store restored from a backup: the command that repairs it
        found = conn.exec_driver_sql(REGRESS_SQL).all()
    for (peer, _detail), (what, repair) in zip(found, regress_problems(found), strict=True):
        get(str(peer)).went_back, get(str(peer)).repair = what, repair
    return out


def kept_values(node: Node) -> tuple[int, list[str]]:
    """Values peers sent for columns this node does not have yet (kept aside), and those columns."""
    from exchange.receive.evolution import CHILD, WHOLE, kept_columns

    with node.engine.connect() as conn:
        kept = kept_columns(conn, node.catalog)
    return sum(k.rows for k in kept), sorted({f"{k.table} documents" if k.column == WHOLE else
                                              f"{k.table} rows" if k.column == CHILD else f"{k.table}.{k.column}"
                                              for k in kept})


def last_activity(node: Node) -> datetime | None:
    """The newest exchange time in the database (a fallback when no sync ran in this process)."""
    with node.engine.connect() as conn:
        row = conn.execute(select(
            func.max(xchg_sent.c.created_at), func.max(xchg_sent.c.uploaded_at),
            func.max(xchg_sent.c.processed_at))).first()
        row2 = conn.execute(select(func.max(xchg_received.c.received_at),
                                   func.max(xchg_received.c.applied_at))).first()
    return _latest(*(row or ()), *(row2 or ()))


# ---------------------------------------------------------------- published node info

_info_cache: dict[str, tuple[int, dict[str, Any] | None]] = {}
_info_lock = threading.Lock()


def published_info(node: Node, peer: str) -> dict[str, Any] | None:
    """What ``peer`` published about itself (``node-<peer>.json``: version, time), if readable cheaply.

    The folder transport leaves it in this node's box (``<root>/<me>/``); for
    other transports nothing is fetched from a page view, and this is None.
    The file is read again only when its modification time changed (one stat
    per store and page view), so a store that just synced is seen at once.
    """
    address = node.cfg.peers[peer].transport if peer in node.cfg.peers else None
    if not address or "://" in address:
        return None
    root = Path(address[4:] if address.startswith("dir:") else address).expanduser()
    path = root / node.id / f"node-{peer}.json"
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    with _info_lock:
        hit = _info_cache.get(str(path))
        if hit and hit[0] == stamp:
            return hit[1]
    info: dict[str, Any] | None
    try:
        data = json.loads(path.read_text())
        info = data if isinstance(data, dict) else None
    except (OSError, ValueError):
        info = None
    with _info_lock:
        _info_cache[str(path)] = (stamp, info)
    return info


# ---------------------------------------------------------------- HO overview

@dataclass
class StoreRow:
    stats: PeerStats
    version: str
    attention: list[str]
    #: the catalog version (fingerprint) of the store's last bundle, "" before format v3; and whether it differs
    catalog: str = ""
    catalog_differs: bool = False

    @property
    def id(self) -> str:
        return self.stats.peer

    @property
    def problems(self) -> list[str]:
        """The marks other than silence."""
        return [a for a in self.attention if not a.startswith(("silent ", "never heard"))]

    def unacked_age(self, now: datetime) -> float | None:
        t = self.stats.oldest_unacked
        return (now - t).total_seconds() if t else None


def duration(seconds: float) -> str:
    """A length of time as the page shows it (``42 s``, ``12 min``...)."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def store_rows(node: Node, silent_after_minutes: float, now: datetime | None = None) -> list[StoreRow]:
    """One row per store peer, with what needs the operator's attention."""
    now = now or datetime.now(UTC)
    stats = peer_stats(node)
    with node.engine.connect() as conn:  # which catalog version each store runs (exchange.receive.evolution)
        catalogs = dict(conn.execute(select(xchg_peer_catalog.c.peer, xchg_peer_catalog.c.fingerprint)).all())
    ours = node.catalog.fingerprint if catalogs else ""
    rows = []
    for peer_id in sorted(stats):
        st = stats[peer_id]
        if peer_id in node.cfg.peers and node.cfg.peers[peer_id].role != "store":
            continue
        info = published_info(node, peer_id)
        version = st.remote_version or (str(info.get("version")) if info and info.get("version") else "-")
        fp = catalogs.get(peer_id, "")
        rows.append(StoreRow(st, version, troubles(st, silent_after_minutes, now), fp, bool(fp) and fp != ours))
    return rows


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def silence(st: PeerStats, silent_after_minutes: float, now: datetime) -> str | None:
    """``silent 3 h`` / ``never heard from`` when the store's last contact is too old, else None."""
    contact = st.last_contact
    if contact is None:
        return "never heard from"
    if (now - contact).total_seconds() > silent_after_minutes * 60:
        return f"silent {duration((now - contact).total_seconds())}"
    return None


def troubles(st: PeerStats, silent_after_minutes: float, now: datetime) -> list[str]:
    """Everything the HO knows to be wrong with one store, one short phrase each (empty: OK)."""
    quiet = silence(st, silent_after_minutes, now)
    out = [quiet] if quiet else []
    if st.went_back:
        out.append(f"went back in time: {st.repair}")
    out += [f"waiting for {m}" for m in st.missing]
    if st.received_failed:
        out.append("FAILED stream")
    if st.received_held:
        out.append("HELD stream")
    if st.sent_rejected:
        out.append(_count(st.sent_rejected, "REJECTED bundle", "REJECTED bundles"))
    if st.quarantined:
        out.append(_count(st.quarantined, "file quarantined", "files quarantined"))
    if st.parked:
        out.append(_count(st.parked, "document parked", "documents parked"))
    return out + remote_troubles(st.remote_health, st.remote_foreign)


def foreign_text(f: dict[str, Any]) -> str:
    """One change a peer made to a document of ours: ``item 1001 (price)``."""
    what = f"{f.get('doc_type')} {'/'.join(str(k) for k in f.get('key') or [])}"
    cols = f.get("columns")
    if f.get("missing"):
        return f"{what} (not here)"
    return f"{what} ({', '.join(cols) or 'no column differs now'})" if isinstance(cols, list) else what


def remote_troubles(health: dict[str, int], foreign: list[dict[str, Any]] | None = None) -> list[str]:
    """What a store's newest heartbeat says is wrong on its side (its own streams, parked, quarantine,
    conflicts held for a person there, its changes to documents we own), each naming where to look."""
    out = []
    if health.get("waiting"):
        out.append("at the store: " + _count(health["waiting"], "bundle waiting", "bundles waiting"))
    if health.get("failed"):
        out.append("at the store: FAILED stream")
    if health.get("held"):
        out.append("at the store: HELD stream")
    if health.get("parked"):
        out.append("at the store: " + _count(health["parked"], "document parked", "documents parked"))
    if health.get("quarantined"):
        out.append("at the store: " + _count(health["quarantined"], "file quarantined", "files quarantined"))
    if health.get("conflicts_held"):
        out.append("at the store: " + _count(health["conflicts_held"], "conflict", "conflicts")
                   + " held for a person (exchange conflicts list --open)")
    if health.get("foreign_edits"):
        named = [foreign_text(f) for f in (foreign or [])[:3]]
        more = health["foreign_edits"] - len(named)
        out.append("at the store: " + _count(health["foreign_edits"], "local change", "local changes")
                   + " to HO documents" + (f": {', '.join(named)}" if named else "")
                   + (f" and {more} more" if named and more > 0 else "")
                   + " (exchange conflicts list)")
    return out


SORT_KEYS = ("store", "contact", "out", "in", "age", "parked", "version", "catalog", "attention")


def sort_rows(rows: list[StoreRow], sort: str, now: datetime) -> tuple[list[StoreRow], str, bool]:
    """Sort by ``sort`` (a column name, ``-name`` for descending); returns (rows, column, descending)."""
    desc = sort.startswith("-")
    col = sort.lstrip("-")
    if col not in SORT_KEYS:
        col, desc = "attention", False

    def key(r: StoreRow) -> tuple[Any, ...]:
        st = r.stats
        if col == "store":
            return (r.id,)
        if col == "contact":
            c = st.last_contact
            return (c.timestamp() if c else float("-inf"), r.id)
        if col == "out":
            return (st.sent_waiting, r.id)
        if col == "in":
            return (st.received_waiting, r.id)
        if col == "age":
            age = r.unacked_age(now)
            return (age if age is not None else -1.0, r.id)
        if col == "parked":
            return (st.parked, r.id)
        if col == "version":
            return (r.version, r.id)
        if col == "catalog":
            return (r.catalog_differs, r.catalog, r.id)
        # attention: stores with a real problem first, then those only silent (a quiet night
        # marks many stores silent; it must not bury the few with a FAILED stream or parked documents)
        return (0 if r.problems else 1 if r.attention else 2, r.id)

    return sorted(rows, key=key, reverse=desc), col, desc


def totals(rows: list[StoreRow]) -> dict[str, int]:
    return {
        "stores": len(rows),
        "attention": sum(1 for r in rows if r.attention),
        "out": sum(r.stats.sent_waiting for r in rows),
        "in": sum(r.stats.received_waiting for r in rows),
        "parked": sum(r.stats.parked for r in rows),
        "quarantined": sum(r.stats.quarantined for r in rows),
    }



# ---------------------------------------------------------------- what the sync result must not hide

@dataclass(frozen=True)
class Problem:
    kind: str  # went-back, parked, failed, held, waiting, rejected, quarantined
    text: str
    href: str  # the tab (store) or the part of the overview (HO) that says what to do


def problems(node: Node, stats: Any) -> list[Problem]:
    """What is wrong now, read from the database at each page view (so a reason disappears as soon as
    it is resolved, by a Retry, a later sync or by hand). While any is listed the sync result is not
    green: a sync that parked a document or left a stream FAILED did not go well, whatever it moved."""
    peers = list(stats)
    ho = node.cfg.role == "ho"
    parked = sum(s.parked for s in peers)
    failed = sum(s.received_failed for s in peers)
    held = sum(s.received_held for s in peers)
    waiting = sum(1 for s in peers if s.received_stalled)
    rejected = sum(s.sent_rejected for s in peers)
    quarantined = sum(s.quarantined for s in peers)
    streams = "/?only=attention" if ho else "/?tab=received"
    out: list[Problem] = [Problem("went-back", f"{s.went_back}; repair with {s.repair}", streams)
                          for s in peers if s.went_back]
    if parked:
        out.append(Problem("parked", _count(parked, "document parked", "documents parked"),
                           "/#problems" if ho else "/?tab=parked"))
    if failed:
        out.append(Problem("failed", _count(failed, "bundle FAILED", "bundles FAILED"), streams))
    if held:
        out.append(Problem("held", _count(held, "bundle HELD", "bundles HELD"), streams))
    if waiting:
        out.append(Problem("waiting", _count(waiting, "stream waiting for a missing bundle",
                                             "streams waiting for a missing bundle"), streams))
    if rejected:
        out.append(Problem("rejected", _count(rejected, "bundle REJECTED by its receiver",
                                              "bundles REJECTED by their receivers"),
                           "/?only=attention" if ho else "/?tab=sent"))
    if quarantined:
        out.append(Problem("quarantined", _count(quarantined, "file quarantined", "files quarantined"),
                           "/#problems" if ho else "/?tab=received"))
    return out
