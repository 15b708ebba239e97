"""The ADBC reader process (exchange.database.sqlite_arrow) and the SQLite read paths of exchange.database.rows.

Both SQLite paths (the helper process and sqlite3 tuples) must give the very
same Arrow tables, for every column type the catalog maps, NULLs first,
non-ASCII and numeric keys; a reader that fails must leave the export correct.
"""

from __future__ import annotations

import os
import select as io_select
import sqlite3
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from enginehelpers import check_net, make_net, seed_ho, seed_store
from sqlalchemy import (
    Boolean, Column, Date, DateTime, Float, ForeignKeyConstraint, Integer, MetaData, String, Table, create_engine,
    insert, select,
)

from exchange.database import rows, sqlite_arrow
from exchange.database import schema as s
from exchange.database.sqlite_arrow import ReaderUnavailable, SqliteArrowReader
from exchange.send import streams
from exchange.send.export import build_tables, export_all
from exchange.wire.bundle import open_bundle
from exchange.wire.formats import EVENTS_TABLE

META = MetaData()
head = Table("t_head", META, Column("shop", String(8), primary_key=True), Column("no", Integer, primary_key=True),
             Column("note", String(40)), Column("paid", s.Money(), nullable=False), Column("qty", s.Qty()),
             Column("day", Date()), Column("at", DateTime()), Column("ok", Boolean()), Column("ratio", Float()))
line = Table("t_line", META, Column("shop", String(8), primary_key=True), Column("no", Integer, primary_key=True),
             Column("line_no", Integer, primary_key=True), Column("what", String(20), nullable=False),
             ForeignKeyConstraint(["shop", "no"], ["t_head.shop", "t_head.no"]))

N = 3000  # more than the driver's first batch, so a column NULL at first must still come out typed


@pytest.fixture
def db(tmp_path: Path) -> Any:
    path = tmp_path / "r.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        META.create_all(conn)
        heads, lines = [], []
        for i in range(N):
            shop = "café" if i % 7 == 0 else "s001"
            late = i > 2500  # note, qty, day, at, ok, ratio: NULL in the first 2500 rows
            heads.append({"shop": shop, "no": i, "note": f"n'{i}\"x" if late else None,
                          "paid": Decimal(i) / 100, "qty": Decimal("1.250") if late else None,
                          "day": date(2024, 1, 1 + i % 28) if late else None,
                          "at": datetime(2024, 3, 1, 9, i % 60, 7, 123456) if late else None,
                          "ok": bool(i % 2) if late else None, "ratio": i / 3 if late else None})
            lines += [{"shop": shop, "no": i, "line_no": n, "what": f"w{n}"} for n in range(1, 1 + i % 4)]
        conn.execute(insert(head), heads)
        conn.execute(insert(line), lines)
    yield engine, path
    engine.dispose()


def _keys(conn: Any) -> list[str]:
    return [rows.canonical_key(r) for r in conn.execute(select(head.c.shop, head.c.no))]


def test_both_sqlite_paths_give_the_same_tables(db: Any) -> None:
    engine, path = db
    with engine.connect() as conn, SqliteArrowReader(str(path)) as reader:
        keys = _keys(conn)[::-1]  # any order in: key order out
        by_adbc = rows._read_sqlite_arrow(conn, reader, [head, line], ("shop", "no"), rows._sorted_keys(keys))
        by_sqlite3 = rows._read_sqlite(conn, [head, line], ("shop", "no"), rows._sorted_keys(keys))
        public = rows.read_doc_tables(conn, [head, line], ("shop", "no"), keys, reader=reader)
        assert reader.broken is None
    for name in ("t_head", "t_line"):
        assert by_adbc[name].equals(by_sqlite3[name]), name
        assert public[name].equals(by_sqlite3[name]), name
    h = by_adbc["t_head"]
    assert h.num_rows == N and by_adbc["t_line"].num_rows == sum(i % 4 for i in range(N))
    assert h.schema == rows.arrow_schema(head)
    assert h.column("no").to_pylist()[-1] == 999  # keys in canonical-text order: ["s001","999"] last
    last = next(r for r in h.to_pylist() if r["no"] == N - 1)
    assert last["shop"] == "s001" and last["paid"] == Decimal("29.99") and last["qty"] == Decimal("1.250")
    assert last["note"] == "n'2999\"x" and last["at"] == datetime(2024, 3, 1, 9, 2999 % 60, 7, 123456)
    by_no = {r["no"]: r for r in h.to_pylist()}
    assert h.column("note").null_count == 2501 and [by_no[n]["ok"] for n in (2998, 2999, 1)] == [False, True, None]
    assert by_no[2999]["ratio"] == 2999 / 3 and by_no[2999]["day"] == date(2024, 1, 1 + 2999 % 28)
    assert sum(1 for k in h.column("shop").to_pylist() if k == "café") == len(range(0, N, 7))


def test_a_failed_request_keeps_the_process_and_a_dead_one_falls_back(db: Any) -> None:
    engine, path = db
    with engine.connect() as conn, SqliteArrowReader(str(path)) as reader:
        with pytest.raises(ReaderUnavailable, match="no such table"):
            reader.query([("SELECT * FROM nowhere", [])])
        assert reader.broken is None
        assert reader.query([("SELECT count(*) AS n FROM t_line", [])])[0].column("n").to_pylist() == \
            [sum(i % 4 for i in range(N))]
        expected = rows._read_sqlite(conn, [head, line], ("shop", "no"), rows._sorted_keys(_keys(conn)))
        assert reader._proc is not None
        reader._proc.kill()
        reader._proc.wait()
        got = rows.read_doc_tables(conn, [head, line], ("shop", "no"), _keys(conn), reader=reader)
        assert reader.broken  # broken pipe, or the answer ended early
        assert all(got[n].equals(expected[n]) for n in expected)
        with pytest.raises(ReaderUnavailable):
            reader.query([("SELECT 1", [])])


def test_the_reader_opens_the_database_read_only(db: Any) -> None:
    engine, path = db
    with SqliteArrowReader(str(path)) as reader:
        with pytest.raises(ReaderUnavailable, match="(?i)read.?only"):
            reader.query([("DELETE FROM t_line", [])])
    assert sqlite3.connect(path).execute("SELECT count(*) FROM t_line").fetchone()[0] == sum(i % 4 for i in range(N))


def test_an_answer_asked_ahead_is_used_or_dropped(db: Any) -> None:
    _engine, path = db
    one, two = [("SELECT 1 AS v", [])], [("SELECT ? AS v", [2])]
    with SqliteArrowReader(str(path)) as reader:
        reader.send(one)
        assert reader.query(two)[0].column("v").to_pylist() == [2]  # the answer to `one` was dropped
        reader.send(two)
        reader.send(one)  # one request in flight at most: ignored
        assert reader.query(two)[0].column("v").to_pylist() == [2]
        assert reader.query(one)[0].column("v").to_pylist() == [1]


def test_two_answers_asked_ahead_come_in_order(db: Any) -> None:
    _engine, path = db
    a, b, c = ([(f"SELECT {i} AS v", [])] for i in (1, 2, 3))
    with SqliteArrowReader(str(path)) as reader:
        reader.send(a)  # written by the feed thread while the child is still starting
        reader.send(b)
        reader.send(c)  # two in flight at most: ignored
        assert len(reader._in_flight) == 2
        assert reader.query(a)[0].column("v").to_pylist() == [1]
        assert reader.query(b)[0].column("v").to_pylist() == [2]
        assert reader.query(c)[0].column("v").to_pylist() == [3]
        reader.send(a)
        reader.send(b)
        assert reader.query(b)[0].column("v").to_pylist() == [2]  # the answer to `a` is dropped on the way
        assert not reader._in_flight and reader.broken is None


def test_an_answer_asked_ahead_waits_in_the_pipe_until_it_is_wanted(db: Any) -> None:
    """The exporter's peak memory: an answer read ahead is not copied into this process beside the
    batch being sealed; it stays in the child's pipe until :meth:`query` wants it."""
    _engine, path = db
    a, b = [("SELECT 1 AS v", [])], [("SELECT count(*) AS n FROM t_line", [])]
    with SqliteArrowReader(str(path)) as reader:
        reader.send(a)
        reader.send(b)
        assert reader._proc is not None and reader._proc.stdout is not None
        ready, _w, _x = io_select.select([reader._proc.stdout], [], [], 30)  # the child has answered `a`
        assert ready, "the reader process did not answer within 30 s"
        assert reader._answers.qsize() == 0  # ...and nothing of it was taken out of the pipe
        assert reader.query(a)[0].column("v").to_pylist() == [1]
        assert reader.query(b)[0].column("n").to_pylist() == [sum(i % 4 for i in range(N))]
        assert reader.broken is None


def test_closing_with_answers_in_the_pipe_lets_the_child_end(db: Any) -> None:
    """Answers nobody asked for are drained at close, so the child finishes writing and exits by
    itself (exit status 0), rather than being killed while blocked on a full pipe."""
    _engine, path = db
    big = [("SELECT * FROM t_head CROSS JOIN (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3)", [])]
    reader = SqliteArrowReader(str(path))
    reader.send(big)  # each far more than a pipe holds (64 KiB)
    reader.send([(big[0][0] + " WHERE no >= ?", [0])])
    proc = reader._proc
    assert proc is not None and proc.stdout is not None
    assert io_select.select([proc.stdout], [], [], 30)[0], "the reader process did not answer within 30 s"
    reader.close()
    assert proc.returncode == 0


def test_export_tables_are_the_same_through_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = make_net(tmp_path / "net", stores=("s001",))
    seed_ho(net, items=30)
    net.cycle()  # the store gets its items first: its sales name them
    seed_store(net, "s001", sales=60)
    store = net.store()
    with store.engine.connect() as conn:
        docs = streams.pending(conn, store, 10_000).docs  # what the store's next bundle would carry
        assert {d[0] for d in docs} >= {"sales_bill", "customer", "grc", "grt"}
        monkeypatch.setenv(sqlite_arrow.MODE_ENV, "always")
        with SqliteArrowReader(str(store.engine.url.database)) as reader:
            via_reader, summary_r = build_tables(conn, store.catalog, docs, reader)
            assert reader.broken is None and reader._proc is not None
        via_sqlite3, summary_s = build_tables(conn, store.catalog, docs)
    assert summary_r == summary_s
    assert via_reader.keys() == via_sqlite3.keys() and EVENTS_TABLE in via_reader
    for name, table in via_sqlite3.items():
        assert via_reader[name].equals(table), name
    net.dispose()


@pytest.mark.parametrize("mode", ["always", "off"])
def test_export_in_batches_with_and_without_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       mode: str) -> None:
    """Several full batches: the look-ahead read is used, and every document goes exactly once."""
    monkeypatch.setenv(sqlite_arrow.MODE_ENV, mode)
    net = make_net(tmp_path / "net", stores=("s001",), max_rows={"s001": 7})
    seed_ho(net, items=30)
    net.cycle()
    seed_store(net, "s001", sales=40)
    store = net.store()
    out = export_all(store)
    assert len(out) >= 5
    seen: list[tuple[str, str]] = []
    for e in out:
        with open_bundle(store.cfg.outbox / e.file, identities=net.ho.identities, trust=net.ho.trust,
                         me="ho", workdir=net.ho.cfg.work) as b:
            events = b.table(EVENTS_TABLE)
            seen += list(zip(events.column("doc_type").to_pylist(), events.column("doc_key").to_pylist(), strict=True))
    net.settle()  # and the HO applies them all: every stream checks out, row by row
    assert not check_net(net).problems
    with store.engine.connect() as conn:
        states = streams.document_states(conn, "ho")
    assert {st[2] for st in states.values()} == {"PROCESSED"}
    assert len(seen) == len(set(seen)) and set(seen) == set(states)
    net.dispose()


def test_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sqlite_arrow.MODE_ENV, raising=False)
    assert sqlite_arrow.mode() == "auto" and not sqlite_arrow.wanted(10) and sqlite_arrow.wanted(sqlite_arrow.MIN_DOCS)
    monkeypatch.setenv(sqlite_arrow.MODE_ENV, "off")
    assert not sqlite_arrow.wanted(10**6)
    monkeypatch.setenv(sqlite_arrow.MODE_ENV, "always")
    assert sqlite_arrow.wanted(1)
    assert os.environ[sqlite_arrow.MODE_ENV] == "always"


def test_the_driver_is_installed() -> None:
    """A dependency, not an option: without it every export reads through sqlite3 (slowly)."""
    assert sqlite_arrow.available()
    assert pa.__version__


def test_odd_and_relative_paths_open_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "a b%#c?"
    folder.mkdir()
    con = sqlite3.connect(folder / "x.db")
    con.execute("CREATE TABLE t (v TEXT)")
    con.execute("INSERT INTO t VALUES ('here')")
    con.commit()
    con.close()
    monkeypatch.chdir(folder)
    with SqliteArrowReader("x.db") as reader:  # relative to the caller, though the child runs elsewhere
        assert reader.query([("SELECT v FROM t", [])])[0].column("v").to_pylist() == ["here"]


def _python_reading(text: str | None) -> datetime | None:
    """How a zoned column's text reads, value by value: Python's ISO reading, naive text the UTC instant."""
    if text is None:
        return None
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


_TEXTS = st.one_of(st.none(), st.builds(
    lambda when, sep, frac, zone: when.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + frac + zone,
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)), st.sampled_from([" ", "T"]),
    st.sampled_from(["", ".5", ".000000", ".123456", ".123456789"]),
    st.sampled_from(["", "", "Z", "+00:00", "+05:30", "-0800", "+01"])),
    st.sampled_from(["2024-03-01", "2024-03-01T09", "2024-03-01 09:04", "yesterday at noon", "2024-02-30 10:00:00"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(_TEXTS, min_size=1, max_size=12))
def test_zoned_text_reads_as_python_reads_it(texts: list[str | None]) -> None:
    """The column-at-once reading of zoned text (naive text taken as UTC in C) gives what the value-by-value
    reading gives, and fails where it fails (the exporter then sets the document aside)."""
    t = pa.timestamp("us", tz="UTC")
    try:
        expected: list[datetime | None] | None = [_python_reading(x) for x in texts]
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(pa.ArrowInvalid):
            sqlite_arrow.zoned_from_text(pa.array(texts, pa.string()), t)
        return
    got = sqlite_arrow.zoned_from_text(pa.array(texts, pa.string()), t)
    assert got.type == t
    assert got.to_pylist() == [None if e is None else e for e in expected]


def test_rows_converted_in_the_reader_process_are_the_same(db: Any) -> None:
    """Once the process has answered, it converts rows to the columns' types itself (the exporter's
    core has the least time); its first answer, on the first batch's path, comes as stored. Either way
    the tables are those of the sqlite3 path: every column type, NULLs first, non-ASCII keys."""
    engine, path = db
    with engine.connect() as conn, SqliteArrowReader(str(path)) as reader:
        ordered = rows._sorted_keys(_keys(conn))
        asked = rows._arrow_queries(conn, [head, line], ("shop", "no"), ordered)
        cold = reader.query(asked)
        assert [t.schema.metadata for t in cold] == [None, None]  # as stored, placeholders first
        assert cold[0].num_rows == N + 1
        warm = reader.query(asked)
        assert all(sqlite_arrow.CONVERTED in (t.schema.metadata or {}) for t in warm)
        assert [t.num_rows for t in warm] == [N, sum(i % 4 for i in range(N))]
        via_reader = rows._read_sqlite_arrow(conn, reader, [head, line], ("shop", "no"), ordered)
        via_sqlite3 = rows._read_sqlite(conn, [head, line], ("shop", "no"), ordered)
        assert reader.broken is None
    for name, table in via_sqlite3.items():
        assert via_reader[name].equals(table), name
        assert via_reader[name].schema == rows.arrow_schema(head if name == "t_head" else line)
        assert via_reader[name].schema.metadata is None


def test_a_value_the_process_cannot_convert_fails_that_request_only(db: Any) -> None:
    """Text where minor units belong: the process's conversion fails for that request (the process
    stays), and reading falls back to sqlite3, which raises the encoding error the exporter sets aside."""
    engine, path = db
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE t_head SET paid = 'twelve' WHERE shop = 's001' AND no = 1")
    with engine.connect() as conn, SqliteArrowReader(str(path)) as reader:
        reader.query([("SELECT 1 AS v", [])])  # answered once: later rows are converted there
        keys = [rows.canonical_key(("s001", 1)), rows.canonical_key(("s001", 2))]
        with pytest.raises(ReaderUnavailable, match="minor units"):
            reader.query(rows._arrow_queries(conn, [head], ("shop", "no"), keys))
        with pytest.raises(rows.ENCODE_ERRORS):
            rows.read_doc_tables(conn, [head], ("shop", "no"), keys, reader=reader)
        good = rows.read_doc_tables(conn, [head], ("shop", "no"), [rows.canonical_key(("s001", 2))], reader=reader)
        assert good["t_head"].column("paid").to_pylist() == [Decimal("0.02")] and reader.broken is None
