"""What a bundle's documents look like on both sides: the ``_events`` table and the control totals.

The sender writes them (:mod:`exchange.send.export`) and the receiver checks
them (:mod:`exchange.receive.importer`); they live here, below both, so the
receive side never imports the send side. docs/FORMAT.md specifies both.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from exchange.database.catalog import DocType

#: The ``_events`` table of a bundle: one row per document, in the order applied.
EVENTS_SCHEMA = pa.schema([
    pa.field("doc_type", pa.string(), nullable=False),
    pa.field("doc_key", pa.string(), nullable=False),
    pa.field("op", pa.string(), nullable=False),
    pa.field("version", pa.int64(), nullable=False),
])

#: The ``_bases`` table (FORMAT.md v3): per document of a type editable on both sides, the version of
#: it the sender last applied from the recipient (0: none) and when the sender last changed it.
BASES_SCHEMA = pa.schema([
    pa.field("doc_type", pa.string(), nullable=False),
    pa.field("doc_key", pa.string(), nullable=False),
    pa.field("base", pa.int64(), nullable=False),
    pa.field("changed_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


def control_totals(dt: DocType, tables: dict[str, pa.Table], upserts: int) -> dict[str, Any]:
    """Document count, rows per table and sums of the amount/quantity columns."""
    totals: dict[str, str] = {}
    for ref in dt.totals:
        tname, col = ref.split(".", 1)
        t = tables.get(tname)
        value = pc.sum(t.column(col)).as_py() if t is not None and t.num_rows else None
        totals[ref] = str(value if value is not None else Decimal(0))
    return {"count": upserts, "rows": {t: tables[t].num_rows for t in dt.tables() if t in tables},
            "totals": totals}
