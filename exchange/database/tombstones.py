"""Deletes applied from a peer, beside their version: when and by which bundle (the retention's evidence).

A deleted document's row in ``xchg_doc_version`` is its tombstone: the version of
the delete keeps an older copy from bringing the document back. The retention
(:mod:`exchange.service.retention`) may purge a tombstone only once no older copy
can still arrive, which it proves from when the delete was applied and how far
the stream that carried it has moved since; this module records both, in the
importer's transaction, right after the versions are written.

Only deletes are stamped (an upsert leaves the columns as they were, so the hot
path of an import writes nothing more); the retention therefore also checks
that the document is absent here before it trusts a stamp.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, and_, update

from exchange.database import rows
from exchange.database.tables import xchg_doc_version
from exchange.files import utc_now


def mark_deleted(conn: Connection, peer: str, doc_type: str, keys: Sequence[str], *, lane: str, seq: int) -> None:
    """Stamp the version rows of ``keys`` (deletes of ``doc_type`` just applied from ``peer``, bundle ``seq``
    of ``lane``): applied now."""
    if not keys:
        return
    v = xchg_doc_version.c
    now = utc_now()
    for i in range(0, len(keys), rows.CHUNK):
        conn.execute(update(xchg_doc_version).where(and_(
            v.peer == peer, v.doc_type == doc_type, v.doc_key.in_(keys[i:i + rows.CHUNK]))).values(
                deleted_at=now, deleted_lane=lane, deleted_seq=seq))
