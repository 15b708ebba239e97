"""Helpers for the engine and crash tests: real node homes on disk, exchanging through a folder.

A :class:`Net` is an HO and some stores made the way an operator makes them
(``init_home``, ``add_peer``), each with its own database (SQLite files; the HO
may live on PostgreSQL), all paired through one ``dir:`` transfer folder.
The check functions compare the two sides of every stream the way an auditor
would: documents row by row, control totals, the bundles' hash chains and the
files on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import func, inspect, select, text, update

from exchange import files
from exchange.database import rows
from exchange.database import schema as s
from exchange.database.capture import record_events
from exchange.database.catalog import DocType
from exchange.database.tables import (
    XCHG, xchg_doc_version, xchg_received, xchg_sent, xchg_stream_in, xchg_stream_out,
)
from exchange.demo.data import seed_masters, seed_store_activity
from exchange.demo.run import reconcile
from exchange.node import keys
from exchange.node.home import Node, init_home
from exchange.node.peers import add_peer
from exchange.send import streams
from exchange.send.export import build_tables
from exchange.service import status
from exchange.service.sync import SyncReport, sync
from exchange.wire import bundle
from exchange.wire.bundle import BundleReader, open_bundle
from exchange.wire.formats import EVENTS_TABLE, PART_SUFFIX, bundle_name, is_exchange_file

GROUPS = {"s001": "north", "s002": "south", "s003": "north"}
BASE_DAY = datetime(2024, 3, 1, 9, 0)


# ---------------------------------------------------------------- a network of nodes

@dataclass
class Net:
    root: Path
    transfer: Path
    ho: Node
    stores: dict[str, Node]
    masters: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[Node]:
        return [self.ho, *self.stores.values()]

    def store(self, sid: str = "s001") -> Node:
        return self.stores[sid]

    def node(self, nid: str) -> Node:
        return self.ho if nid == self.ho.id else self.stores[nid]

    def reopen(self) -> None:
        """Fresh Node objects (after exchange.toml changed), engines disposed."""
        self.dispose()
        self.ho = Node.open(self.ho.cfg.home)
        self.stores = {k: Node.open(v.cfg.home) for k, v in self.stores.items()}

    def dispose(self) -> None:
        for n in self.nodes:
            if "engine" in n.__dict__:
                n.engine.dispose()

    def cycle(self, order: Sequence[str] | None = None) -> list[SyncReport]:
        """One sync of every node: the HO first, then the stores (or ``order``)."""
        ids = list(order) if order else [self.ho.id, *self.stores]
        reps = []
        for nid in ids:
            rep = sync(self.node(nid))
            assert not rep.errors, f"sync {nid}: {rep.errors}"
            reps.append(rep)
        return reps

    def settle(self, max_rounds: int = 6) -> int:
        """Sync every node until every Sent bundle is PROCESSED and no file is on its way."""
        for n in range(1, max_rounds + 1):
            self.cycle()
            if self.quiet():
                return n
        raise AssertionError(f"not settled after {max_rounds} rounds: {self.describe()}")

    def quiet(self) -> bool:
        for node in self.nodes:
            if any(r.status != "PROCESSED" for r in status.sent(node)):
                return False
            if _spool(node.cfg.inbox) or _spool(node.cfg.outbox):
                return False
            for peer in node.cfg.peers:
                if any(d[2] != "PROCESSED" for d in deliveries(node, peer).values()):
                    return False
        return not transfer_files(self.transfer)

    def describe(self) -> str:
        out = []
        for node in self.nodes:
            out.append(f"{node.id} sent={[(r.peer, r.seq, r.status) for r in status.sent(node)]} "
                       f"received={[(r.peer, r.seq, r.status, r.reason) for r in status.received(node)]} "
                       f"inbox={_spool(node.cfg.inbox)} outbox={_spool(node.cfg.outbox)}")
        out.append(f"transfer={transfer_files(self.transfer)}")
        return "\n".join(out)


def transfer_files(folder: Path) -> list[str]:
    """Bundles and acks (complete or partial) lying in a transfer folder (not heartbeats: status files
    every sync leaves, tests/test_heartbeat.py follows them)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and (is_exchange_file(p.name) or p.name.endswith(PART_SUFFIX))
                  and not p.name.removesuffix(PART_SUFFIX).endswith(".heartbeat"))


def _spool(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def make_net(root: Path, *, ho_db: str | None = None, stores: Sequence[str] = ("s001", "s002"),
             max_rows: dict[str, int] | None = None, store_dbs: dict[str, str] | None = None) -> Net:
    """An HO and ``stores`` paired through ``root/transfer`` (no data yet); SQLite unless a URL is given."""
    root.mkdir(parents=True, exist_ok=True)
    transfer = root / "transfer"
    transfer.mkdir(exist_ok=True)
    ho_cfg = init_home(root / "ho", "ho", "ho", database=ho_db)
    st_cfgs = [init_home(root / sid, sid, "store", database=(store_dbs or {}).get(sid)) for sid in stores]
    for cfg in st_cfgs:
        add_peer(ho_cfg, cfg.id, "store", keys.public_signing_line(cfg), keys.recipient(cfg),
                 f"dir:{transfer}", (GROUPS.get(cfg.id, "north"),))
        add_peer(cfg, "ho", "ho", keys.public_signing_line(ho_cfg), keys.recipient(ho_cfg), f"dir:{transfer}")
    for cfg in [ho_cfg, *st_cfgs]:
        if max_rows and cfg.id in max_rows:
            cfg.max_bundle_rows = max_rows[cfg.id]
            cfg.save()
    return Net(root, transfer, Node.open(ho_cfg.home), {c.id: Node.open(c.home) for c in st_cfgs})


def seed_ho(net: Net, items: int = 20) -> None:
    with net.ho.engine.begin() as conn:
        net.masters = seed_masters(conn, items, list(net.stores), {k: GROUPS.get(k, "north") for k in net.stores})


def item_ids(net: Net) -> list[str]:
    return [k[0] for k in net.masters["item"]]


def seed_store(net: Net, sid: str, sales: int = 10, seed: int = 0) -> dict[str, list[tuple[str, ...]]]:
    with net.store(sid).engine.begin() as conn:
        return seed_store_activity(conn, sid, item_ids(net), sales, seed=seed)


def reprice(node: Node, ids: Iterable[str], delta: str = "1.00") -> None:
    """Change items' prices at the HO and record the events (as an application would)."""
    ids = list(ids)
    with node.engine.begin() as conn:
        for item_id in ids:
            price = conn.execute(select(s.item.c.price).where(s.item.c.item_id == item_id)).scalar_one()
            conn.execute(update(s.item).where(s.item.c.item_id == item_id)
                         .values(price=price + Decimal(delta)))
        record_events(conn, "item", [(i,) for i in ids])


def prices(node: Node, ids: Iterable[str]) -> dict[str, Decimal]:
    with node.engine.connect() as conn:
        return {r[0]: r[1] for r in conn.execute(select(s.item.c.item_id, s.item.c.price)
                                                 .where(s.item.c.item_id.in_(list(ids))))}


def add_item(conn: Any, item_id: str, price: str = "9.99") -> None:
    conn.execute(s.item.insert().values(item_id=item_id, name=f"Item {item_id}", category="GROCERY", uom="EA",
                                        price=Decimal(price), tax_rate=Decimal("5.00"), updated_at=BASE_DAY))


def add_promotion(conn: Any, promo_id: str, lines: list[str]) -> None:
    """A promotion for every store with one line per item (no event recorded: the caller decides)."""
    from datetime import date

    conn.execute(s.promotion.insert().values(promo_id=promo_id, name="Flash sale", store_group=None,
                                             starts_on=date(2024, 3, 1), ends_on=date(2024, 3, 8),
                                             discount_pct=Decimal("10.00")))
    conn.execute(s.promotion_item.insert(), [
        {"promo_id": promo_id, "line_no": n, "item_id": item, "promo_price": Decimal("1.50") + n}
        for n, item in enumerate(lines, 1)])


# ---------------------------------------------------------------- database views

def business_tables() -> list[str]:
    return sorted(s.RETAIL.tables)


def table_counts(node: Node, names: Iterable[str] | None = None) -> dict[str, int]:
    tables = {**s.RETAIL.tables, **XCHG.tables}
    with node.engine.connect() as conn:
        return {n: int(conn.execute(select(func.count()).select_from(tables[n])).scalar() or 0)
                for n in (names or sorted(tables))}


def snapshot(node: Node) -> dict[str, Any]:
    """Every table of the database (names and all rows, sorted): for 'nothing changed' checks.

    The peers' heartbeats (``xchg_heartbeat``) are left out: they change with every sync by
    design (tests/test_heartbeat.py checks what may change them)."""
    with node.engine.connect() as conn:
        names = sorted(inspect(conn).get_table_names())
        out: dict[str, Any] = {"__tables__": names}
        for name in names:
            if name == "xchg_heartbeat":
                continue
            q = conn.exec_driver_sql(f'SELECT * FROM "{name}"')
            out[name] = sorted(repr(tuple(r)) for r in q)
    return out


def _canon(v: Any) -> str:
    if isinstance(v, Decimal):
        return format(v, "f")
    if isinstance(v, datetime):
        return v.isoformat()
    return repr(v)


def doc_hashes(node: Node, dt: DocType, doc_keys: Sequence[str]) -> dict[str, str]:
    """Per document key: a SHA-256 over every row of every table of the document (absent: no entry)."""
    parts: dict[str, list[str]] = defaultdict(list)
    with node.engine.connect() as conn:
        for tname in dt.tables():
            data = rows.read_docs(conn, node.catalog.table(tname), dt.key, doc_keys)
            for k, row in zip(rows.row_keys(data, dt.key), data.to_pylist(), strict=True):
                parts[k].append(tname + ":" + json.dumps({c: _canon(v) for c, v in sorted(row.items())}))
    heads: set[str] = set()
    with node.engine.connect() as conn:
        head = rows.read_docs(conn, node.catalog.table(dt.header), dt.key, doc_keys)
        heads = set(rows.row_keys(head, dt.key))
    return {k: hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest()
            for k, v in parts.items() if k in heads}


def doc_versions(node: Node) -> dict[tuple[str, str], int]:
    with node.engine.connect() as conn:
        return {(t, k): int(v) for t, k, v in conn.execute(select(
            xchg_doc_version.c.doc_type, xchg_doc_version.c.doc_key, xchg_doc_version.c.version))}


def deliveries(sender: Node, peer: str) -> dict[tuple[str, str], tuple[str, int, str, int | None]]:
    """(doc_type, doc_key) -> (op, version, status, seq) of what ``sender`` sends ``peer``."""
    return {doc: (d.op, d.version, d.status, d.seq) for doc, d in status.documents(sender, peer).items()}


# ---------------------------------------------------------------- files

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deliver(files: Iterable[Path], node: Node) -> list[Path]:
    """Copy files into a node's inbox, as a USB stick would bring them."""
    out = []
    for f in files:
        target = node.cfg.inbox / f.name
        shutil.copyfile(f, target)
        out.append(target)
    return out


def outbox_bundles(node: Node, peer: str | None = None) -> list[Path]:
    return sorted(p for p in node.cfg.outbox.iterdir()
                  if p.name.endswith(".bundle") and (peer is None or p.name.split(".")[1] == peer))


def member_offset(path: Path, member: str) -> tuple[int, int]:
    """(offset, size) of a member's data inside a (tar) bundle file."""
    with tarfile.open(path) as tf:
        info = tf.getmember(member)
        return info.offset_data, info.size


def flip_byte(path: Path, member: str = "payload.tar.age", where: float = 0.5) -> Path:
    """Flip one byte of ``member``'s data in place (the tar stays well formed)."""
    off, size = member_offset(path, member)
    pos = off + int(size * where)
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- forging bundles with real keys

def forge_bundle(sender: Node, peer: str, docs: Sequence[tuple[str, str, str, int]], *,
                 app_version: str | None = None, key: Any = None, record: bool = True,
                 summary_hook: Callable[[dict[str, Any]], None] | None = None,
                 tables_hook: Callable[[dict[str, Any]], None] | None = None,
                 out_dir: Path | None = None, at: tuple[int, str | None] | None = None,
                 created: datetime | None = None, catalog: Any = None, lane: str = "main") -> Path:
    """Seal the next bundle of the stream ``sender`` -> ``peer`` by hand, as the exporter would.

    ``docs`` are (doc_type, doc_key, op, version) rows. The current rows are read
    from the sender's database; hooks may change the summary or the tables
    before sealing; ``catalog`` replaces the inner manifest's ``catalog`` (default: the sender's). With ``record`` the sender's stream moves on (xchg_sent row,
    next seq, last manifest hash) exactly as ``export`` records a bundle.
    ``at`` = (seq, prev) places an unrecorded bundle anywhere (a replay, a fork);
    ``created`` is the signed creation time (a key's holder may state any); ``lane``: the stream's lane.
    """
    in_stream = (xchg_stream_out.c.peer == peer) & (xchg_stream_out.c.lane == lane)
    with sender.engine.begin() as conn:
        row = conn.execute(select(xchg_stream_out.c.next_seq, xchg_stream_out.c.last_manifest_sha256)
                           .where(in_stream)).first()
        seq, prev = (int(row[0]), row[1]) if row else (1, None)
        if at is not None:
            assert not record, "a bundle placed by hand is not recorded"
            seq, prev = at
        tables, summary = build_tables(conn, sender.catalog, list(docs))
        if summary_hook:
            summary_hook(summary)
        if tables_hook:
            tables_hook(tables)
        name = bundle_name(sender.id, peer, seq, lane)
        folder = out_dir or sender.cfg.outbox
        part = folder / (name + PART_SUFFIX)
        kwargs: dict[str, Any] = {}
        if app_version:
            kwargs["app_version"] = app_version
        if created:
            kwargs["created"] = created
        kwargs["catalog"] = sender.catalog.description if catalog is None else catalog
        sealed = bundle.seal_bundle(part, key=key or sender.signing_key, sender=sender.id, recipient=peer,
                                    seq=seq, prev=prev, recipients=sender.recipients_for(peer),
                                    tables=tables, summary=summary, lane=lane, **kwargs)
        if record:
            conn.execute(xchg_sent.insert().values(
                peer=peer, lane=lane, seq=seq, file_name=name, file_sha256=sealed.sha256,
                manifest_sha256=sealed.manifest.sha256, size=sealed.size, status="EXPORTED",
                summary=json.dumps({t: v["count"] + v["deletes"] for t, v in summary["documents"].items()}),
                created_at=files.utc_now()))
            if row is None:
                conn.execute(xchg_stream_out.insert().values(peer=peer, lane=lane, next_seq=seq + 1,
                                                             last_manifest_sha256=sealed.manifest.sha256))
            else:
                conn.execute(update(xchg_stream_out).where(in_stream).values(
                    next_seq=seq + 1, last_manifest_sha256=sealed.manifest.sha256))
    final = folder / name
    part.replace(final)
    return final


def docs_of(node: Node, doc_type: str, doc_keys: Iterable[Sequence[str]]) -> list[tuple[str, str, str, int]]:
    """(doc_type, key, 'U', version) for documents, with the node's newest event id as version."""
    with node.engine.connect() as conn:
        version = int(conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM xchg_event")).scalar() or 0)
    return [(doc_type, rows.canonical_key(k), "U", version) for k in doc_keys]


# ---------------------------------------------------------------- consistency of a whole network

@dataclass
class Check:
    problems: list[str] = field(default_factory=list)
    documents: int = 0
    lost: int = 0
    applied_twice: int = 0
    bundles: int = 0

    def add(self, other: Check) -> None:
        self.problems += other.problems
        self.documents += other.documents
        self.lost += other.lost
        self.applied_twice += other.applied_twice
        self.bundles += other.bundles


def _streams(net: Net) -> list[tuple[Node, Node]]:
    out = []
    for st in net.stores.values():
        out += [(net.ho, st), (st, net.ho)]
    return out


def check_stream(net: Net, sender: Node, receiver: Node, *, reloads: bool = False) -> Check:
    """Everything ``sender`` sent ``receiver`` arrived once, intact, in order, and reads the same.

    A document version in two bundles counts as applied twice, unless ``reloads``
    (``export.reload`` sends the current state again on purpose).
    """
    c = Check()
    peer = receiver.id
    with sender.engine.connect() as conn:
        lanes = {str(x) for x in conn.execute(select(xchg_sent.c.lane).where(xchg_sent.c.peer == peer)).scalars()}
    with receiver.engine.connect() as conn:
        lanes |= {str(x) for x in conn.execute(select(xchg_received.c.lane)
                                                .where(xchg_received.c.peer == sender.id)).scalars()}
    seen: Counter[tuple[str, str, int]] = Counter()
    for lane in sorted(lanes):  # each lane is a stream of its own: seqs, positions and chain
        c.add(_check_lane(sender, receiver, lane, seen))
    name = f"{sender.id}->{receiver.id}"
    twice = {} if reloads else {d: n for d, n in seen.items() if n > 1}
    c.applied_twice += len(twice)
    if twice:
        c.problems.append(f"{name}: documents in more than one bundle: {sorted(twice)[:5]}")
    # every document delivered: the same rows on both sides, the receiver at the sent version
    dlv = deliveries(sender, peer)
    versions = doc_versions(receiver)
    by_type: dict[str, list[str]] = defaultdict(list)
    for (t, k), (op, version, st, _seq) in dlv.items():
        c.documents += 1
        if st != "PROCESSED":
            c.problems.append(f"{name}: {t} {k} still {st}")
            c.lost += 1
            continue
        if versions.get((t, k)) != version:
            c.problems.append(f"{name}: {t} {k} at version {versions.get((t, k))} on the receiver, sent {version}")
            c.lost += 1
        if op == "U":
            by_type[t].append(k)
    for t, ks in by_type.items():
        dt = sender.catalog.get(t)
        a, b = doc_hashes(sender, dt, ks), doc_hashes(receiver, dt, ks)
        for k in ks:
            if k not in b or a.get(k) != b[k]:
                c.problems.append(f"{name}: {t} {k} differs (sender {a.get(k, '-')[:12]}, "
                                  f"receiver {b.get(k, '-')[:12]})")
                c.lost += 1
    return c


def _check_lane(sender: Node, receiver: Node, lane: str, seen: Counter[tuple[str, str, int]]) -> Check:
    """One lane's stream from ``sender`` to ``receiver``: seqs 1..n, positions, the hash chain; the
    documents of its bundles counted into ``seen``."""
    c = Check()
    peer = receiver.id
    with sender.engine.connect() as conn:
        sent = {int(r.seq): r for r in conn.execute(select(xchg_sent).where(
            xchg_sent.c.peer == peer, xchg_sent.c.lane == lane))}
        out_pos = conn.execute(select(xchg_stream_out).where(xchg_stream_out.c.peer == peer,
                                                             xchg_stream_out.c.lane == lane)).first()
    with receiver.engine.connect() as conn:
        got = {int(r.seq): r for r in conn.execute(select(xchg_received).where(
            xchg_received.c.peer == sender.id, xchg_received.c.lane == lane))}
        in_pos = conn.execute(select(xchg_stream_in).where(xchg_stream_in.c.peer == sender.id,
                                                           xchg_stream_in.c.lane == lane)).first()
    name = f"{sender.id}->{receiver.id}" + ("" if lane == "main" else f" [{lane}]")
    c.bundles = len(sent)
    # the stream: seqs 1..n, each sent PROCESSED, each received APPLIED from the very file sent
    if sorted(sent) != list(range(1, len(sent) + 1)):
        c.problems.append(f"{name}: sent seqs {sorted(sent)} have holes")
    if sorted(got) != sorted(sent):
        c.problems.append(f"{name}: received seqs {sorted(got)} != sent {sorted(sent)}")
    for seq, r in sent.items():
        if r.status != "PROCESSED":
            c.problems.append(f"{name} #{seq}: sent status {r.status} ({r.reason})")
        g = got.get(seq)
        if g is None:
            continue
        if g.status != "APPLIED":
            c.problems.append(f"{name} #{seq}: received status {g.status} ({g.reason})")
        if (g.file_sha256, g.manifest_sha256) != (r.file_sha256, r.manifest_sha256):
            c.problems.append(f"{name} #{seq}: received a different file than the one recorded as sent")
    n = len(sent)
    if n:
        if out_pos is None or int(out_pos.next_seq) != n + 1:
            c.problems.append(f"{name}: sender's next seq {out_pos and out_pos.next_seq} != {n + 1}")
        if in_pos is None or int(in_pos.last_seq) != n or in_pos.last_manifest_sha256 != sent[n].manifest_sha256 \
                or (out_pos is not None and out_pos.last_manifest_sha256 != in_pos.last_manifest_sha256):
            c.problems.append(f"{name}: receiver's stream position {in_pos and tuple(in_pos)} "
                              f"!= last sent ({n}, {sent[n].manifest_sha256})")
    # the hash chain and the documents of every bundle, read from the sender's archive
    prev: str | None = None
    for seq in sorted(sent):
        path = sender.cfg.archive_sent / sent[seq].file_name
        if not path.exists():
            c.problems.append(f"{name} #{seq}: {path.name} missing from the sender's archive")
            continue
        if sha(path) != sent[seq].file_sha256:
            c.problems.append(f"{name} #{seq}: archived file differs from the one recorded")
        with BundleReader(path) as r:
            if r.manifest.prev != prev or r.manifest.seq != seq:
                c.problems.append(f"{name} #{seq}: hash chain broken (prev {r.manifest.prev}, expected {prev})")
            prev = r.manifest.sha256
        with open_bundle(path, trust=receiver.trust, identities=receiver.identities, me=receiver.id,
                         workdir=receiver.cfg.work) as opened:
            ev = opened.table(EVENTS_TABLE).to_pydict()
            for t, k, v in zip(ev["doc_type"], ev["doc_key"], ev["version"], strict=True):
                seen[(t, k, int(v))] += 1
                if lane != "main" and sender.catalog.lane_of(t) != lane:  # (main: also bundles from before lanes)
                    c.problems.append(f"{name} #{seq}: a {t} document, of lane {sender.catalog.lane_of(t)}")
    return c


def check_files(net: Net) -> Check:
    """One file per (stream, seq) wherever copies lie; nothing quarantined; spools empty."""
    c = Check()
    hashes: dict[str, set[str]] = defaultdict(set)
    for p in net.root.rglob("*"):
        if p.is_file() and ".bundle" in p.name and not p.name.endswith(PART_SUFFIX):
            base = p.name[: p.name.index(".bundle") + len(".bundle")]
            hashes[base].add(sha(p))
    for base, found in sorted(hashes.items()):
        if len(found) != 1:
            c.problems.append(f"seq reused: {len(found)} different files named {base}")
    recorded: dict[str, str] = {}
    for node in net.nodes:
        with node.engine.connect() as conn:
            for name, file_sha in conn.execute(select(xchg_sent.c.file_name, xchg_sent.c.file_sha256)):
                recorded[name] = file_sha
    for base, found in hashes.items():
        if base in recorded and found != {recorded[base]}:
            c.problems.append(f"{base}: a copy differs from the file recorded as sent")
        if base not in recorded:
            c.problems.append(f"{base}: a bundle on disk that no node recorded as sent")
    for node in net.nodes:
        q = [p.name for p in node.cfg.quarantine.iterdir()] if node.cfg.quarantine.is_dir() else []
        if q:
            c.problems.append(f"{node.id}: quarantined {q}")
    return c


def check_net(net: Net, *, reloads: bool = False) -> Check:
    """Every stream of the network (see :func:`check_stream`) plus :func:`check_files` and reconcile."""
    c = check_files(net)
    for a, b in _streams(net):
        c.add(check_stream(net, a, b, reloads=reloads))
    for row in reconcile(net.ho, list(net.stores.values())):
        if not row["ok"]:
            c.problems.append(f"reconcile: {row}")
    return c
