"""Parked documents that can never apply: a document they refer to was deleted at its source.

A parked document is retried after each import and on a timer, because what it
lacks usually arrives later (an item sent after the promotion naming it). But if
the document it refers to was deleted, by a delete its owner sent (a version is
recorded here and the row is gone) or here by this node that owns it (a delete
in this node's capture log), retrying can never succeed: the parked document is
ORPHANED, reported as such, and left out of the automatic retries (``exchange
retry`` still tries it, and a newer version of it from its sender replaces it).
"""

from __future__ import annotations

from sqlalchemy import Connection, and_, select

import pyarrow as pa

from exchange.database import rows
from exchange.database.catalog import Catalog
from exchange.database.tables import xchg_doc_version, xchg_event


def _references(catalog: Catalog, data: dict[str, pa.Table]) -> dict[str, set[str]]:
    """Document type -> keys of its documents that ``data``'s rows refer to by foreign key."""
    headers = {catalog.get(n).header: catalog.get(n) for n in catalog.names}
    out: dict[str, set[str]] = {}
    for tname, table in data.items():
        for fk in catalog.table(tname).foreign_key_constraints:
            target = headers.get(fk.referred_table.name)
            if target is None:
                continue
            remote = [e.column.name for e in fk.elements]
            if sorted(remote) != sorted(target.key) or not all(c.name in table.column_names for c in fk.columns):
                continue
            local = {e.column.name: e.parent.name for e in fk.elements}
            cols = [table.column(local[k]).to_pylist() for k in target.key]
            for values in zip(*cols, strict=True):
                if None not in values:
                    out.setdefault(target.name, set()).add(rows.canonical_key(list(values)))
    return out


def deleted_dependency(conn: Connection, catalog: Catalog, data: dict[str, pa.Table], own_role: str
                       ) -> str | None:
    """Why a parked document (``data``: its rows) can never apply, or None if it still might."""
    for doc_type, keys in _references(catalog, data).items():
        dt = catalog.get(doc_type)
        wanted = sorted(keys)
        present = set(rows.row_keys(rows.read_docs(conn, catalog.table(dt.header), dt.key, wanted), dt.key))
        missing = [k for k in wanted if k not in present]
        if not missing:
            continue
        v = xchg_doc_version.c
        gone = conn.execute(select(v.doc_key, v.peer).where(and_(v.doc_type == doc_type, v.doc_key.in_(missing[:500])))
                            ).first()
        if gone is not None:
            return (f"can never apply: the {doc_type} {gone[0]} it refers to was deleted at its source "
                    f"({gone[1] or 'a peer'}) after it was sent")
        if dt.owner == own_role:
            e = xchg_event.c
            here = conn.execute(select(e.doc_key).where(and_(e.doc_type == doc_type, e.op == "D",
                                                             e.doc_key.in_(missing[:500])))).first()
            if here is not None:
                return f"can never apply: the {doc_type} {here[0]} it refers to was deleted here, at its source"
    return None
