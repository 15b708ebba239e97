"""The importer's key work on whole Arrow columns says what the key-by-key Python path says.

``rows.row_keys`` / ``key_array`` build canonical keys with Arrow when every value is plain
(printable ASCII text without a quote or backslash, or an integer), ``rows.unchecked_keys``
vouches for plain keys as whole columns and hands every other key to the importer's key-by-key
check, and ``_stored_versions`` looks a bundle's versions up in one statement. Each is compared
here with the per-value definition it replaces, on values built to hit both paths.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from exchange.database import rows
from exchange.database.schema import RETAIL
from exchange.database.tables import XCHG, make_engine, xchg_doc_version
from exchange.receive import importer

plain = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'),
               max_size=8)
ascii_ = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
text = st.one_of(plain, ascii_, st.text(max_size=8))  # quotes, backslashes, control and non-ASCII too


def _reference(columns: list[list[Any]]) -> list[str]:
    """The definition: ``canonical_key`` of each row's values (``str`` of each)."""
    return [rows.canonical_key(v) for v in zip(*columns, strict=True)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(text, st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), plain), max_size=20))
def test_row_keys_by_arrow_equal_the_keys_value_by_value(values: list[tuple[str, int | None, str]]) -> None:
    cols = [list(c) for c in zip(*values, strict=True)] if values else [[], [], []]
    data = pa.table({"a": pa.array(cols[0], pa.string()), "n": pa.array(cols[1], pa.int64()),
                     "b": pa.array(cols[2], pa.string())})
    want = _reference(cols)
    assert rows.row_keys(data, ("a", "n", "b")) == want
    assert rows.key_array(data, ("a", "n", "b")).to_pylist() == want
    assert rows.row_keys(data.slice(1), ("b",)) == _reference([cols[2][1:]])  # an offset into the buffers


def test_row_keys_of_other_types_and_chunks_take_the_value_by_value_path() -> None:
    from datetime import date
    from decimal import Decimal

    data = pa.table({"d": pa.array([date(2024, 3, 1), date(2025, 1, 2)]),
                     "m": pa.array([Decimal("1.50"), Decimal("-2.00")], pa.decimal128(10, 2)),
                     "t": pa.chunked_array([["x"], ['y"z']])})
    for cols in (("d",), ("m",), ("t",), ("d", "t"), ("t", "m")):
        assert rows.row_keys(data, cols) == _reference([data.column(c).to_pylist() for c in cols])
    chunked = pa.table({"t": pa.chunked_array([["a", "b"], ["c"]])})
    assert rows.row_keys(chunked, ("t",)) == ['["a"]', '["b"]', '["c"]']
    assert rows.row_keys(chunked.slice(0, 0), ("t",)) == []


def _slow_check(key: str) -> bool:
    """The importer's key-by-key check of a sales line key (``_check_keys`` before whole columns)."""
    table = RETAIL.tables["sales_bill_line"]
    try:
        values = rows.parse_key(key)
        rows.typed_key(table, ("store_id", "bill_no", "line_no"), values)
        return rows.canonical_key(values) == key
    except (ValueError, TypeError):
        return False


key_texts = st.one_of(
    st.tuples(text, text, st.one_of(st.integers().map(str), text)).map(lambda v: json.dumps(list(v))),
    st.tuples(plain, plain, st.integers().map(str)).map(lambda v: rows.canonical_key(v)),
    st.lists(st.one_of(plain, st.integers()), max_size=4).map(lambda v: json.dumps(v, separators=(",", ":"))),
    st.text(max_size=20))


@settings(max_examples=300, deadline=None)
@given(st.lists(key_texts, max_size=12))
def test_keys_vouched_for_by_columns_pass_the_key_by_key_check(keys: list[str]) -> None:
    left = rows.unchecked_keys(RETAIL.tables["sales_bill_line"], ("store_id", "bill_no", "line_no"), keys)
    assert left == [k for k in keys if k in set(left)]  # in their order
    for k in keys:
        if k not in left:
            assert _slow_check(k), k  # vouched for: the old check accepts it too
        elif not _slow_check(k):
            pass  # refused by the key-by-key check the importer runs on what is left
    assert all(k in left for k in keys if not _slow_check(k))


@given(st.lists(st.tuples(plain, plain), max_size=10))
def test_split_keys_gives_the_values_parse_key_gives(values: list[tuple[str, str]]) -> None:
    keys = [rows.canonical_key(v) for v in values]
    split = rows.split_keys(pa.array(keys, pa.string()), 2)
    assert split is not None
    assert [list(v) for v in zip(*(c.to_pylist() for c in split), strict=True)] == [rows.parse_key(k) for k in keys]
    assert rows.split_keys(pa.array(keys, pa.string()), 3) is None or not keys


@pytest.fixture
def versions_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    XCHG.create_all(engine, tables=[xchg_doc_version])
    yield engine
    engine.dispose()


def test_stored_versions_of_a_big_batch_in_one_lookup(versions_engine: Engine) -> None:
    """More keys than one IN list holds: the versions of this peer and the legacy ones, the higher wins;
    other peers' and other types' versions are not this bundle's."""
    n = 3 * rows.CHUNK + 7
    keys = [rows.canonical_key(["s001", f"B{i:05d}"]) for i in range(n)]
    stored = {}
    with versions_engine.begin() as conn:
        data = []
        for i, k in enumerate(keys):
            if i % 5 == 0:
                continue  # never applied
            data.append(("s001", "sales_bill", k, 10 + i))
            stored[k] = 10 + i
            if i % 3 == 0:
                data.append((importer.LEGACY_PEER, "sales_bill", k, 100 + i))  # recorded before per-sender
                stored[k] = 100 + i
            if i % 7 == 0:
                data.append(("s002", "sales_bill", k, 1000 + i))  # another sender: not this one's
                data.append(("s001", "customer", k, 1000 + i))  # another type
        rows.insert_rows(conn, xchg_doc_version, pa.table({
            name: [r[j] for r in data] for j, name in enumerate(("peer", "doc_type", "doc_key", "version"))}))
    with versions_engine.connect() as conn:
        assert importer._stored_versions(conn, "s001", "sales_bill", keys) == stored
        few = keys[:rows.CHUNK]  # the IN-list path: the same answer
        assert importer._stored_versions(conn, "s001", "sales_bill", few) == {k: v for k, v in stored.items()
                                                                             if k in set(few)}
