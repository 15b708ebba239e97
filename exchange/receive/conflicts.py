"""Concurrent changes of a document editable on both sides: detected, decided by policy, logged, resolved.

A change from the peer is *concurrent* with one made here when this node changed
the document after the version the peer's change was based on (its ``_bases``
row; docs/FORMAT.md v3): the peer never saw it. Such a change is never applied
or dropped silently. The type's policy (docs/CATALOG.md) decides:

- ``ho-wins`` / ``store-wins``: that side's version stays; the other is logged;
- ``newest-wins``: the change with the later own timestamp (a tie: the HO's);
- ``manual``: both are kept, this side's stays in place, the conflict is OPEN
  until a person runs ``exchange conflicts resolve`` (or the page's button).

Both sides see the same two changes and the same policy, so automatic policies
end in the same document at both ends without another message. A resolution
is written here as a new local change based on the peer's version, so it
travels like any change, and the peer applies it and closes its own OPEN
conflict of that document (:func:`exchange.database.conflicts.settle`).
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import pyarrow as pa
from sqlalchemy import Connection, select

from exchange.database import conflicts as log
from exchange.database import rows
from exchange.database.batch import BASES_SCHEMA
from exchange.database.capture import record_event, suppress_capture
from exchange.database.catalog import Catalog, DocType
from exchange.database.tables import begin_write, xchg_conflict, xchg_doc_version, xchg_restart
from exchange.errors import ConflictError, FormatError
from exchange.files import utc_now
from exchange.node.home import Node
from exchange.vocabulary import ConflictStatus, DocKey
from exchange.receive.evolution import Payload
from exchange.wire.formats import BASES_TABLE

Keep = Literal["ours", "theirs"]
#: (doc_key, op, version) of one type's events in a bundle
Events = Sequence[tuple[DocKey, str, int]]
#: per document: (base, changed_at)
Bases = dict[str, tuple[int, datetime | None]]


def read_bases(opened: Payload, catalog: Catalog, announced: Mapping[str, Events]) -> dict[str, Bases]:
    """The bundle's ``_bases`` table per type, checked: exact schema, no nulls, announced documents only.

    A bundle without it (format v2, or no type editable on both sides) gives no
    bases: each such document counts as based on nothing (0), so a change made
    here is a conflict rather than silently overwritten.
    """
    if BASES_TABLE not in opened.tables:
        return {}
    table = opened.table(BASES_TABLE)
    want = {f.name: f.type for f in BASES_SCHEMA}
    if {f.name: f.type for f in table.schema} != want or len(table.schema) != len(want) \
            or any(table.column(c).null_count for c in want):
        raise FormatError(f"{BASES_TABLE} table: columns {table.schema.names} do not match {list(want)} "
                          f"({', '.join(str(t) for t in want.values())}, no nulls)")
    keys = {t: {k for k, _op, _v in evs} for t, evs in announced.items()}
    out: dict[str, Bases] = {}
    for t, k, b, at in zip(*(table.column(c).to_pylist() for c in want), strict=True):
        if t not in keys or k not in keys[t] or not catalog.get(t).both_sides:
            raise FormatError(f"{BASES_TABLE} table: {t} {str(k)[:80]!r} is not a document of the bundle "
                              "editable on both sides")
        if k in out.setdefault(t, {}):
            raise FormatError(f"{BASES_TABLE} table: {t} {str(k)[:80]!r} is listed twice")
        if b < 0:
            raise FormatError(f"{BASES_TABLE} table: {t} {str(k)[:80]!r} has a negative base {b}")
        out[t][k] = (int(b), log.as_utc(at))
    return out


#: ``newest-wins`` never trusts a peer's change time this far ahead of this node's clock: a store whose clock
#: runs fast (or that lies) would win every conflict. Such a time counts as a tie (the HO's version stays).
MAX_AHEAD = timedelta(minutes=5)


def _winner(policy: str, sender_role: str, theirs_at: datetime | None, ours_at: datetime | None) -> Keep | None:
    """Whose version the policy keeps; None: a person decides (``manual``)."""
    if theirs_at is not None and theirs_at > utc_now() + MAX_AHEAD:
        theirs_at = None
    if policy == "manual":
        return None
    if policy == "newest-wins" and theirs_at is not None and ours_at is not None and theirs_at != ours_at:
        return "theirs" if theirs_at > ours_at else "ours"
    if policy == "store-wins":
        return "theirs" if sender_role == "store" else "ours"
    return "theirs" if sender_role == "ho" else "ours"  # ho-wins, and a newest-wins tie


def _rows_of(data: Mapping[str, pa.Table], dt: DocType, key: str) -> dict[str, pa.Table]:
    out = {}
    for name, t in data.items():
        idx = [i for i, k in enumerate(rows.row_keys(t, dt.key)) if k == key]
        out[name] = t.take(pa.array(idx, type=pa.int64()))
    return out


def _current(conn: Connection, catalog: Catalog, dt: DocType, key: str) -> dict[str, pa.Table] | None:
    """The document as this node holds it; None when it does not exist here."""
    got = rows.read_doc_tables(conn, [catalog.table(t) for t in dt.tables()], dt.key, [key])
    return got if got[dt.header].num_rows else None


def ho_went_back_to(conn: Connection, peer: str) -> bool:
    """Did this HO send ``peer`` a restart saying it went back in time (restored from its own backup)? The
    store then holds versions of this HO's changes from the days it lost, newer than any it still knows of."""
    r = xchg_restart.c
    return any(json.loads(d).get("above") for d in conn.execute(select(r.detail).where(
        r.peer == peer, r.kind == "sent")).scalars())


def decide(conn: Connection, catalog: Catalog, dt: DocType, peer: str, sender_role: str, seq: int,
           fresh: list[tuple[DocKey, str, int]], data: Mapping[str, pa.Table], bases: Bases
           ) -> tuple[list[tuple[DocKey, str, int]], dict[str, int], int]:
    """Split the peer's fresh changes of ``dt``: (to apply, versions seen but not applied, conflicts).

    A conflict is logged with both versions; what its policy keeps here decides
    whether the peer's change is applied. Versions the policy decided against
    are still recorded as seen (the peer's next change is based on them); an
    OPEN one is not, so it stays a conflict until a person resolves it. A change
    applied without conflict closes the document's OPEN conflicts with the peer.
    At an HO restored from its own backup (after its restart said so), a base above
    every version it sent that store is one of the days it lost: read as the
    newest it sent (the store had seen all of it), not refused.
    """
    local = log.local_changes(conn, peer, dt.name, [k for k, _op, _v in fresh])
    given = log.sent_versions(conn, peer, dt.name, [k for k in bases if bases[k][0]])
    lost_days = bool(bases) and ho_went_back_to(conn, peer)
    for k, (base, _at) in list(bases.items()):  # a peer claiming to have seen a version never sent would always win
        if base > given.get(k, 0) and lost_days:  # seen a version of the days this HO lost: at most all it has
            bases = {**bases, k: (given.get(k, 0), _at)}
        elif base > given.get(k, 0):
            raise FormatError(f"{BASES_TABLE} table: {dt.name} {k[:80]!r} claims base version {base}, but "
                              f"this node sent {peer} at most version {given.get(k, 0)} of it")
    apply: list[tuple[DocKey, str, int]] = []
    seen: dict[str, int] = {}
    found = 0
    for k, op, v in fresh:
        base, their_at = bases.get(k, (0, None))
        mine = local.get(k)
        if mine is None or mine.version <= base:
            apply.append((k, op, v))
            continue
        found += 1
        keep: str | None = _winner(dt.conflict, sender_role, their_at, mine.at)
        theirs = _rows_of(data, dt, k) if op == "U" else None
        ours = _current(conn, catalog, dt, k)
        note = (f"both sides changed {dt.name}: kept {keep} by policy {dt.conflict}" if keep
                else f"both sides changed {dt.name}: held for a person (policy manual); this side's version stays")
        merged = _merge(dt, ours, theirs, sender_role, their_at, mine.at) if dt.column_conflicts else None
        if merged is not None:
            keep, (table, note) = "merged", merged
            _write(conn, catalog, dt, k, {dt.header: table})
            seen[k] = v
        log.record(conn, doc_type=dt.name, doc_key=k, peer=peer, seq=seq, policy=dt.conflict,
                   status=ConflictStatus.OPEN if keep is None else ConflictStatus.DECIDED, kept=keep, ours=mine,
                   our_rows=ours, their_version=v, their_base=base, their_at=their_at, their_rows=theirs, note=note)
        if keep == "theirs":
            apply.append((k, op, v))
        elif keep == "ours":
            seen[k] = v
    settled = [k for k, _op, _v in apply if k not in local or local[k].version <= bases.get(k, (0, None))[0]]
    if settled:
        log.settle(conn, peer, dt.name, settled, f"settled by {peer}'s change made on top of this side's version")
    return apply, seen, found


def _merge(dt: DocType, ours: Mapping[str, pa.Table] | None, theirs: Mapping[str, pa.Table] | None,
           sender_role: str, theirs_at: datetime | None, ours_at: datetime | None) -> tuple[pa.Table, str] | None:
    """Both versions merged column by column, or None when a differing column is left to a person.

    Each column both sides hold alike keeps its value; one that differs is
    decided by its own policy (``DocType.column_conflicts``), or the type's.
    Both sides compute the same row from the same two versions, so they converge
    without another message. A delete on either side is not merged.
    """
    if ours is None or theirs is None:
        return None
    mine, other = ours[dt.header].to_pylist(), theirs[dt.header].to_pylist()
    if len(mine) != 1 or len(other) != 1:
        return None
    policies = dict(dt.column_conflicts)
    row: dict[str, Any] = {}
    taken: list[str] = []
    for col, value in other[0].items():
        if col not in mine[0] or mine[0][col] == value:
            row[col] = value
            continue
        side = _winner(policies.get(col, dt.conflict), sender_role, theirs_at, ours_at)
        if side is None:
            return None
        row[col] = value if side == "theirs" else mine[0][col]
        taken.append(f"{col} from {side}")
    table = pa.Table.from_pylist([row], schema=theirs[dt.header].schema)
    return table, f"both sides changed {dt.name}: merged by column ({', '.join(taken) or 'no difference'})"


def _operator() -> str:
    try:
        return os.environ.get("EXCHANGE_USER") or getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def resolve(node: Node, conflict_id: int, keep: Keep, by: str | None = None) -> log.Conflict:
    """Settle an OPEN conflict here: ``ours`` keeps this side's version, ``theirs`` takes the peer's.

    Either way the chosen version is written as a new local change of the
    document, based on the peer's version, so it travels to the peer like any
    change and both ends converge. Other OPEN conflicts of the same document
    with the same peer close with it.
    """
    who = by or _operator()
    with node.engine.begin() as conn:
        begin_write(conn)
        found = log.conflict(conn, conflict_id)
        if found is None:
            raise ConflictError(f"no conflict #{conflict_id} on {node.id}")
        if found.status != ConflictStatus.OPEN:
            raise ConflictError(f"conflict #{conflict_id} is {found.status}, not OPEN: nothing to resolve",
                                hint="Only a conflict held for a person (policy manual) is resolved by hand; "
                                     "the log keeps the others as they were decided.")
        dt = node.catalog.get(found.doc_type)
        c = xchg_conflict.c
        latest = conn.execute(select(c.id, c.their_version).where(
            c.peer == found.peer, c.doc_type == found.doc_type, c.doc_key == found.doc_key,
            c.status == ConflictStatus.OPEN).order_by(c.id.desc()).limit(1)).first()
        assert latest is not None
        if keep == "theirs":
            chosen = log.conflict(conn, int(latest[0]))
            assert chosen is not None
            _write(conn, node.catalog, dt, found.doc_key, chosen.theirs)
            version = chosen.their_version
        else:
            version = int(latest[1])
        exists = _current(conn, node.catalog, dt, found.doc_key) is not None
        record_event(conn, dt.name, rows.parse_key(found.doc_key), "U" if exists else "D")
        _seen(conn, found.peer, dt.name, found.doc_key, version)
        log.settle(conn, found.peer, dt.name, [found.doc_key],
                   f"resolved on {node.id} by {who}: kept {keep}; sent to {found.peer} as a new version",
                   by=who, kept=keep)
        done = log.conflict(conn, conflict_id)
        assert done is not None
        return done


def _write(conn: Connection, catalog: Catalog, dt: DocType, key: str, data: dict[str, pa.Table] | None) -> None:
    """Replace the document by ``data`` (None: delete it), without capture (the caller records the event)."""
    with suppress_capture(conn):
        for name in reversed(dt.children):
            rows.delete_docs(conn, catalog.table(name), dt.key, [key])
        if data is None or not data.get(dt.header, pa.table({})).num_rows:
            rows.delete_docs(conn, catalog.table(dt.header), dt.key, [key])
            return
        rows.upsert_rows(conn, catalog.table(dt.header), data[dt.header])
        for name in dt.children:
            if name in data:
                rows.insert_rows(conn, catalog.table(name), data[name])


def _seen(conn: Connection, peer: str, doc_type: str, key: str, version: int) -> None:
    """The peer's version is the base of the change that resolves the conflict."""
    v = xchg_doc_version.c
    cond = (v.peer == peer) & (v.doc_type == doc_type) & (v.doc_key == key)
    held = conn.execute(select(v.version).where(cond)).scalar()
    if held is None:
        conn.execute(xchg_doc_version.insert().values(peer=peer, doc_type=doc_type, doc_key=key, version=version))
    elif int(held) < version:
        conn.execute(xchg_doc_version.update().where(cond).values(version=version))


def summary(node: Node) -> dict[str, Any]:
    """Open conflicts per type, for status and the page."""
    with node.engine.connect() as conn:
        return {"open": log.open_count(conn)}
