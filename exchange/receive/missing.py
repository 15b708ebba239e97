"""What a parked document refers to that this node does not hold yet (a bill's item, a promotion's item).

A document parks when the database refuses it; most often a foreign key names a row of another
document that has not arrived. The words for people (:mod:`exchange.service.words`) name that row
("bill s001/B8 uses item I1234, which this store has not received yet") instead of the database's
``IntegrityError``. The answer comes from the parked rows and the database, never from the error's
text; the stored error stays as the technical detail.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection, and_, literal, select
from sqlalchemy.exc import SQLAlchemyError

from exchange.database.catalog import Catalog
from exchange.database.tables import xchg_parked
from exchange.errors import ExchangeError
from exchange.node.home import Node
from exchange.database.rows import unpack_tables

log = logging.getLogger(__name__)

#: Values checked per foreign key of one parked document (its rows are bounded by the bundle limits).
MAX_CHECKED = 50

#: (document type of the missing row, or its table when no document type holds it; its key values)
Missing = tuple[str, tuple[str, ...]]


def missing_references(conn: Connection, catalog: Catalog, doc_type: str,
                       data: dict[str, pa.Table]) -> list[Missing]:
    """The rows of other documents that ``data`` (one document's tables) references and the database lacks."""
    own = set(catalog.get(doc_type).tables())
    out: list[Missing] = []
    for tname, tab in data.items():
        table = catalog.table(tname)
        for fk in table.foreign_key_constraints:
            ref = fk.referred_table
            if ref.name in own:
                continue
            cols = [c.name for c in fk.columns]
            ref_cols = [e.column.name for e in fk.elements]
            if not cols or any(c not in tab.column_names for c in cols):
                continue
            values = sorted({tuple(str(v) for v in row) for row in zip(*(tab.column(c).to_pylist() for c in cols))
                             if None not in row})[:MAX_CHECKED]
            doc = catalog.doc_for_table(ref.name)
            for value in values:
                cond = and_(*(ref.c[rc] == v for rc, v in zip(ref_cols, value)))
                if conn.execute(select(literal(1)).select_from(ref).where(cond).limit(1)).first() is None:
                    found = (doc.name if doc else ref.name, value)
                    if found not in out:
                        out.append(found)
    return out


def parked_missing(node: Node, docs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[Missing]]:
    """For parked documents (doc_type, doc_key): what each references that is missing (``[]``: nothing
    found, the cause is elsewhere, see the stored error)."""
    wanted: Sequence[tuple[str, str]] = list(docs)
    out: dict[tuple[str, str], list[Missing]] = {d: [] for d in wanted}
    if not wanted:
        return out
    with node.engine.connect() as conn:
        for doc_type, doc_key in wanted:
            cond = and_(xchg_parked.c.doc_type == doc_type, xchg_parked.c.doc_key == doc_key)
            blob: Any = conn.execute(select(xchg_parked.c.data).where(cond)).scalar()
            if blob is None:
                continue
            try:
                out[(doc_type, doc_key)] = missing_references(conn, node.catalog, doc_type, unpack_tables(bytes(blob)))
            except (ExchangeError, SQLAlchemyError, pa.ArrowException, ValueError, KeyError) as exc:
                # a type no longer in the catalog, a table renamed: the stored error still says what failed
                log.debug("cannot tell what parked %s %s misses: %s", doc_type, doc_key, exc)
    return out
