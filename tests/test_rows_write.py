"""The write side of exchange.database.rows across its batch boundaries, and the importer's Arrow pool.

``insert_rows`` / ``upsert_rows`` write a table in slices of ``WRITE_BATCH``
rows (executemany on SQLite, COPY on PostgreSQL) so the import never holds a
Python tuple per row of a whole bundle; a slice starts at an offset into the
Arrow buffers, which the decimal-to-minor-units path must honour.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from sqlalchemy import select

from exchange.database import rows
from exchange.database.schema import RETAIL
from exchange.database.tables import make_engine
from exchange.receive import importer

N = 11  # with WRITE_BATCH = 4: slices of 4, 4 and 3 rows


def _items(price_bump: int = 0) -> pa.Table:
    item = RETAIL.tables["item"]
    return pa.Table.from_pylist([{
        "item_id": f"I{i:03d}", "name": f"item {i}", "category": "C", "uom": "EA",
        "price": Decimal(f"{i + price_bump}.{i:02d}"), "tax_rate": Decimal("5.25"),
        "active": i % 2 == 0, "updated_at": datetime(2025, 1, 1, 12, i),
    } for i in range(N)], schema=rows.arrow_schema(item))


def _customers() -> pa.Table:
    customer = RETAIL.tables["customer"]
    return pa.Table.from_pylist([{
        "store_id": "s001", "customer_id": f"C{i:03d}", "name": f"customer {i}",
        "phone": None if i % 3 else f"+91{i:08d}", "email": None if i % 2 else f"c{i}@example.com",
        "created_at": datetime(2025, 2, 1, 8, i),
    } for i in range(N)], schema=rows.arrow_schema(customer))


def _stored(engine: Any, name: str) -> list[dict[str, Any]]:
    table = RETAIL.tables[name]
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).order_by(*table.primary_key.columns)).mappings()]


def test_insert_and_upsert_write_every_slice(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows, "WRITE_BATCH", 4)
    engine = make_engine(db_url)
    RETAIL.create_all(engine, tables=[RETAIL.tables["item"], RETAIL.tables["customer"]])
    try:
        with engine.begin() as conn:
            assert rows.insert_rows(conn, RETAIL.tables["item"], _items()) == N
            assert rows.insert_rows(conn, RETAIL.tables["customer"], _customers()) == N
        assert _stored(engine, "item") == _items().to_pylist()
        assert _stored(engine, "customer") == _customers().to_pylist()
        with engine.begin() as conn:
            assert rows.upsert_rows(conn, RETAIL.tables["item"], _items(price_bump=100)) == N
        assert _stored(engine, "item") == _items(price_bump=100).to_pylist()
    finally:
        engine.dispose()


def test_import_allocates_from_the_system_pool_and_restores_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake(*_a: Any, **_k: Any) -> importer.FileOutcome:
        seen.append(pa.default_memory_pool().backend_name)
        raise RuntimeError("stop here")

    before = pa.default_memory_pool().backend_name
    monkeypatch.setattr(importer, "_import_file", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        importer.import_file(None, tmp_path / "x.bundle")  # type: ignore[arg-type]
    assert seen == ["system"]
    assert pa.default_memory_pool().backend_name == before
