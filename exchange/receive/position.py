"""Where each received stream stands: per peer and lane, the last seq applied and its manifest hash.

A stream is (sender, recipient, lane) since format 5 (docs/CATALOG.md "Lanes"); this node is the
recipient, so a stream here is a row of ``xchg_stream_in`` keyed by (peer, lane). Every read and move
of a received stream's position goes through this module (the importer, ``exchange bundle skip``), so
code that re-bases a peer's streams finds them all here (:func:`lanes_of`).
"""

from __future__ import annotations

from sqlalchemy import Connection, select, update

from exchange.database.tables import xchg_stream_in
from exchange.vocabulary import DEFAULT_LANE

__all__ = ["stream_pos", "set_stream_pos", "lanes_of"]


def stream_pos(conn: Connection, peer: str, lane: str = DEFAULT_LANE, lock: bool = False) -> tuple[int, str | None]:
    """The position of ``peer``'s stream in ``lane`` here: the last seq applied and its manifest hash
    ((0, None) before its first bundle); ``lock`` takes the row for the transaction's end."""
    q = select(xchg_stream_in.c.last_seq, xchg_stream_in.c.last_manifest_sha256).where(
        xchg_stream_in.c.peer == peer, xchg_stream_in.c.lane == lane)
    row = conn.execute(q.with_for_update() if lock else q).first()
    return (int(row[0]), row[1]) if row else (0, None)


def set_stream_pos(conn: Connection, peer: str, lane: str, seq: int, manifest_sha256: str) -> None:
    """Move ``peer``'s stream in ``lane`` to ``seq`` (applied or skipped), making its row if it has none."""
    s = xchg_stream_in.c
    if not conn.execute(update(xchg_stream_in).where(s.peer == peer, s.lane == lane)
                        .values(last_seq=seq, last_manifest_sha256=manifest_sha256)).rowcount:
        conn.execute(xchg_stream_in.insert().values(peer=peer, lane=lane, last_seq=seq,
                                                    last_manifest_sha256=manifest_sha256))


def lanes_of(conn: Connection, peer: str) -> list[str]:
    """Every lane in which ``peer`` has a stream to this node (rows of ``xchg_stream_in``)."""
    return sorted(str(x) for x in conn.execute(select(xchg_stream_in.c.lane)
                                               .where(xchg_stream_in.c.peer == peer)).scalars())
