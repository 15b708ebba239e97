"""Where each sent stream stands: per peer and lane, the next seq to seal and the last manifest's hash.

A stream is (sender, recipient, lane) since format 5 (docs/CATALOG.md "Lanes"); this node is the
sender, so a stream here is a row of ``xchg_stream_out`` keyed by (peer, lane), which also holds the
lane's cursor over the broadcast queue. Every read and move of a sent stream's position goes through
this module (the exporter), so code that re-bases a peer's streams finds them all here (:func:`lanes_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, select, update

from exchange.database.tables import xchg_stream_out
from exchange.vocabulary import DEFAULT_LANE

__all__ = ["Cursor", "Position", "next_position", "take_positions", "advance", "broadcast_cursor", "move_cursor",
           "lanes_of"]

Cursor = tuple[int, str, str]  # (version, doc_type, doc_key) of the last broadcast document sealed


@dataclass(frozen=True)
class Position:
    """A sent stream's row as :func:`take_positions` read it: the next bundle's (seq, prev) and the cursor."""

    seq: int
    prev: str | None
    cursor: Cursor


def broadcast_cursor(conn: Connection, peer: str, lane: str) -> Cursor:
    """The broadcast cursor of ``peer``'s stream in ``lane``. A lane without a stream yet starts where the
    default lane's is: what is behind that went to the peer before the lane existed (a catalog that
    declares lanes later does not send the item master again)."""
    s = xchg_stream_out.c
    for name in dict.fromkeys((lane, DEFAULT_LANE)):
        cur = conn.execute(select(s.bc_version, s.bc_type, s.bc_key).where(s.peer == peer, s.lane == name)).first()
        if cur is not None:
            return int(cur[0]), str(cur[1]), str(cur[2])
    return 0, "", ""


def next_position(conn: Connection, peer: str, lane: str) -> tuple[int, str | None]:
    """(seq, prev) of the next bundle of ``peer``'s stream in ``lane``, its row taken for the transaction
    (and made, starting at seq 1 with the default lane's broadcast cursor, for a new lane)."""
    s = xchg_stream_out.c
    row = conn.execute(select(s.next_seq, s.last_manifest_sha256).where(s.peer == peer, s.lane == lane)
                       .with_for_update()).first()
    if row is not None:
        return int(row[0]), row[1]
    start = dict(zip(("bc_version", "bc_type", "bc_key"), broadcast_cursor(conn, peer, lane), strict=True))
    conn.execute(xchg_stream_out.insert().values(peer=peer, lane=lane, next_seq=1, last_manifest_sha256=None, **start))
    return 1, None


def take_positions(conn: Connection, peers: Sequence[str], lane: str) -> dict[str, Position]:
    """The streams in ``lane`` of several ``peers`` (an export group's), read and taken for the transaction
    in one query, in peer order; a peer without a row in that lane is not in the result (its first bundle
    makes it through :func:`next_position`)."""
    s = xchg_stream_out.c
    found = conn.execute(select(s.peer, s.next_seq, s.last_manifest_sha256, s.bc_version, s.bc_type, s.bc_key)
                         .where(s.lane == lane, s.peer.in_(peers)).order_by(s.peer).with_for_update())
    return {str(r[0]): Position(int(r[1]), r[2], (int(r[3]), str(r[4]), str(r[5]))) for r in found}


def advance(conn: Connection, peer: str, lane: str, seq: int, manifest_sha256: str,
            cursor: Cursor | None = None) -> None:
    """Bundle ``seq`` of ``peer``'s stream in ``lane`` is sealed: the next is ``seq + 1``, chained to it;
    ``cursor``: the broadcast cursor moves with it, atomically."""
    s = xchg_stream_out.c
    values: dict[str, object] = {"next_seq": seq + 1, "last_manifest_sha256": manifest_sha256}
    if cursor is not None:
        values.update(bc_version=cursor[0], bc_type=cursor[1], bc_key=cursor[2])
    conn.execute(update(xchg_stream_out).where(s.peer == peer, s.lane == lane).values(**values))


def move_cursor(conn: Connection, peer: str, lane: str, cursor: Cursor) -> None:
    """Set the broadcast cursor of ``peer``'s stream in ``lane`` (made if it has no row yet)."""
    s = xchg_stream_out.c
    if not conn.execute(update(xchg_stream_out).where(s.peer == peer, s.lane == lane).values(
            bc_version=cursor[0], bc_type=cursor[1], bc_key=cursor[2])).rowcount:
        conn.execute(xchg_stream_out.insert().values(peer=peer, lane=lane, next_seq=1, bc_version=cursor[0],
                                                     bc_type=cursor[1], bc_key=cursor[2]))


def lanes_of(conn: Connection, peer: str) -> list[str]:
    """Every lane in which this node has a stream to ``peer`` (rows of ``xchg_stream_out``)."""
    return sorted(str(x) for x in conn.execute(select(xchg_stream_out.c.lane)
                                               .where(xchg_stream_out.c.peer == peer)).scalars())
