"""SQLite query results as Arrow tables, read by the ADBC driver in a helper process.

Why: reading rows through Python's ``sqlite3`` makes a Python object of every
value, about three times slower than the ADBC SQLite driver on a million sales
lines (2.6 s against 0.85 s here), and that was most of an export's time.

Why a process of its own: the ADBC driver carries its own copy of SQLite, and
two SQLite libraries in one process break each other's POSIX locks on the same
database file (closing one connection drops the other's locks; "database disk
image is malformed" was seen here on the first try). In a child process the
ADBC copy is just another reader of a WAL database, which SQLite is built for.
The child opens the file read-only.

Protocol (private to this module): the parent writes one JSON line per request
on the child's stdin, ``{"values": [v0, v1, ...], "queries": [[sql, [i, ...], rows, convert], ...]}``
(each query's parameters are indexes into ``values``, so a batch's keys, shared
by its three or four queries, are written and parsed once; ``rows`` false for
a statement run only for its effect; ``convert`` null, or ``[schema, minor]``:
the rows converted to that Arrow schema (IPC, base64) before they are sent,
see :class:`Convert`); the child runs them in one read
transaction (one snapshot), rolled back at the end with any temporary table,
and answers on stdout with frames, each an 8-byte big-endian length and its
bytes: a JSON header
``{"ok": true, "tables": n}`` or ``{"ok": false, "error": "..."}``, then one Arrow IPC
stream per query. Requests are answered in the order they were written.

Any failure (driver not installed, child gone, a value the driver could not
type) raises :class:`ReaderUnavailable`; callers then read through ``sqlite3``:
slower, never wrong.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import queue
import struct
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    import subprocess

# logging, subprocess and tempfile are imported where the parent uses them: the child never does,
# and it starts on the exporter's critical path (each import is milliseconds of its start-up)

#: ``EXCHANGE_ARROW_READER``: ``auto`` (default: big batches only), ``always`` (tests), ``off``.
MODE_ENV = "EXCHANGE_ARROW_READER"
#: Documents in a batch from which starting the helper (about 0.3 s) pays for itself.
MIN_DOCS = 2000

_LEN = struct.Struct(">Q")
BATCH_ROWS = "adbc.sqlite.query.batch_rows"


class ReaderUnavailable(Exception):
    """The helper could not answer; read through sqlite3 instead."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    return value if value in ("auto", "always", "off") else "auto"


def wanted(n_docs: int) -> bool:
    """Whether a batch of ``n_docs`` documents should be read by the helper."""
    m = mode()
    return m == "always" or (m == "auto" and n_docs >= MIN_DOCS)


def available() -> bool:
    """The driver is installed (looked up, not imported: only the child imports it)."""
    return importlib.util.find_spec("adbc_driver_sqlite") is not None


def _write_frame(out: IO[bytes], data: bytes | pa.Buffer) -> None:
    out.write(_LEN.pack(len(data) if isinstance(data, bytes) else data.size))
    out.write(data)  # a pa.Buffer is a bytes-like object: no copy


def _read_exact(inp: IO[bytes], n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = inp.read(n - got)
        if not b:
            raise ReaderUnavailable("the Arrow reader process ended")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _read_frame(inp: IO[bytes]) -> bytes:
    (n,) = _LEN.unpack(_read_exact(inp, _LEN.size))
    return _read_exact(inp, n)


@dataclass(frozen=True)
class Convert:
    """A query's rows as the columns' Arrow types: ``schema``, and which of its decimal columns SQLite
    holds as integer minor units. Its first row is the typed placeholders (dropped)."""

    schema: pa.Schema
    minor: tuple[bool, ...]

    def spec(self) -> list[Any]:
        return [base64.b64encode(self.schema.serialize().to_pybytes()).decode("ascii"), list(self.minor)]


#: Schema metadata of a table the reader process converted (:class:`Convert`); without it a table
#: comes as SQLite stores it, placeholders first, and the caller converts it.
CONVERTED = b"exchange.converted"

#: ``(sql, params)``: a query whose rows come back as a table; ``(sql, params, False)``: a
#: statement run for its effect in the request's transaction (a temporary key table), no table;
#: ``(sql, params, True, convert)``: rows the process may convert before answering (see
#: :meth:`SqliteArrowReader.send`).
Statement = tuple[str, Sequence[Any]] | tuple[str, Sequence[Any], bool] | tuple[str, Sequence[Any], bool, Convert]


def _wants_rows(q: Statement) -> bool:
    return len(q) < 3 or bool(q[2])


def _convert(q: Statement) -> Convert | None:
    return q[3] if len(q) > 3 else None


def converted(got: pa.Table, convert: Convert) -> pa.Table:
    """A reader query's rows (placeholders first, as SQLite stores them) as ``convert``'s schema."""
    got = got.slice(1)
    arrays = [from_stored(got.column(i), f, m) for i, (f, m) in enumerate(zip(convert.schema, convert.minor, strict=True))]
    return pa.Table.from_arrays(arrays, schema=convert.schema)


def from_stored(arr: pa.Array | pa.ChunkedArray, field: pa.Field, minor: bool) -> pa.Array | pa.ChunkedArray:
    """SQLite's stored values (int64 minor units when ``minor``, text times and dates, 0/1) -> ``field``'s type."""
    import pyarrow.compute as pc  # (imported when first needed: the process starts without it)

    t = field.type
    if pa.types.is_decimal(t) and minor:
        if not pa.types.is_integer(arr.type) and arr.null_count != len(arr):
            raise pa.ArrowInvalid(f"column {field.name}: expected integer minor units, got {arr.type}")
        ints = pc.cast(arr, pa.int64())
        chunks = ints.chunks if isinstance(ints, pa.ChunkedArray) else [ints]
        return pa.chunked_array([_minor_to_decimal(c, t) for c in chunks], type=t)
    if pa.types.is_timestamp(t) and t.tz is not None:
        return zoned_from_text(pc.cast(arr, pa.string()), t)
    if pa.types.is_date32(t) or pa.types.is_timestamp(t):
        return pc.cast(pc.cast(arr, pa.string()), t)
    if pa.types.is_boolean(t):
        return pc.cast(pc.cast(arr, pa.int64()), t)
    return arr if arr.type == t else pc.cast(arr, t)


#: Text that ends in a zone: "Z", or an offset "+05:30", "+0530", "-05".
_ZONE_SUFFIX = r"(Z|[+-]\d\d(:?\d\d)?)$"


def zoned_from_text(arr: pa.Array | pa.ChunkedArray, t: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """Text of a zone-aware column (SQLite) -> ``t``: what exchange writes carries its zone; naive text
    (another application's write, or a row from before the column was zoned) is the UTC instant, as
    everywhere else. Text that is no time still raises (the exporter sets that document aside)."""
    import pyarrow.compute as pc

    try:
        return pc.cast(arr, t)
    except pa.ArrowInvalid:
        pass
    try:  # all naive (another application's writes): read as wall times, which Arrow takes as UTC: one parse
        return pc.cast(pc.cast(arr, pa.timestamp(t.unit)), t)
    except pa.ArrowInvalid:
        pass
    try:  # naive text is the UTC instant: as the same text with a "Z", in C (a Python loop took 1.4 s a million)
        return pc.cast(pc.if_else(pc.match_substring_regex(arr, _ZONE_SUFFIX), arr,
                                  pc.binary_join_element_wise(arr, "Z", "")), t)
    except pa.ArrowInvalid:  # a form Arrow does not parse (a date alone, "T09:04"): Python's reading decides
        pass
    from datetime import UTC, datetime

    values: list[datetime | None] = []
    for v in arr.to_pylist():
        if v is None:
            values.append(None)
            continue
        try:
            parsed = datetime.fromisoformat(v)
        except ValueError:
            raise pa.ArrowInvalid(f"Failed to parse string: {v!r} as a scalar of type {t}") from None
        values.append(parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC))
    return pa.array(values, t)


def _minor_to_decimal(ints: pa.Array, t: pa.DataType) -> pa.Array:
    """int64 minor units -> decimal128(p, s) by reinterpreting the widened integers (no rounding)."""
    import pyarrow.compute as pc

    wide = pc.cast(ints, pa.decimal128(19, 0))
    return pa.Array.from_buffers(t, len(wide), wide.buffers(), null_count=wide.null_count, offset=wide.offset)


class SqliteArrowReader:
    """One helper process reading one SQLite file; started on first use, ended by :meth:`close`.

    :meth:`send` asks ahead (the exporter asks for batches N+1 and N+2 while it
    seals batch N, so the two cores work at once); :meth:`query` collects the
    answer if it was asked, dropping answers asked ahead for something else.
    A thread feeds requests, so the parent never blocks on the child's full
    stdin (the child queues requests as they arrive), and no more than
    :attr:`DEPTH` requests are in flight. The drain thread takes an answer out
    of the pipe only when it is wanted (or the reader closes): an answer read
    ahead waits in the child, which holds it anyway until it is written, not
    as a second copy here beside the batch being sealed (9 MiB of the
    exporter's peak at a million lines; docs/PERFORMANCE.md, "Peak memory and
    fan-in").
    """

    DEPTH = 2

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)  # the child runs elsewhere
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._in_flight: deque[Any] = deque()  # what was asked, oldest first; answers come in this order
        self._answers: queue.Queue[list[bytes] | str | BaseException] = queue.Queue()
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        self._drain: threading.Thread | None = None
        self._feed: threading.Thread | None = None
        self._wanted = threading.Semaphore(0)  # answers the drain thread may take out of the pipe
        self._closing = False  # then it takes (and drops) every answer left, so the child can end
        self.broken: str | None = None  # set once it failed: never retried in this run
        #: it has answered once: later requests let it convert their rows (importing pyarrow.compute
        #: there, 30-60 ms, is then off the first batch's path)
        self.warm = False

    def start(self) -> None:
        """Start the process now (it imports pyarrow and the driver while the caller works)."""
        if self._proc is None and not self.broken:
            import subprocess
            import tempfile

            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            try:
                self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: the child never blocks on it
                self._proc = subprocess.Popen(  # cwd: the child imports this very package, not a namesake
                    [sys.executable, "-m", "exchange.database.sqlite_arrow", self.path], cwd=root,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
            except OSError as exc:
                self._fail(f"cannot start the Arrow reader: {exc}")
                return
            self._wanted, self._closing = threading.Semaphore(0), False
            self._drain = threading.Thread(target=self._read_answers, args=(self._proc.stdout, self._wanted),
                                           name="arrow-reader-answers", daemon=True)
            self._feed = threading.Thread(target=self._write_requests, args=(self._proc.stdin, self._requests),
                                          name="arrow-reader-requests", daemon=True)
            self._drain.start()
            self._feed.start()

    @staticmethod
    def _write_requests(inp: IO[bytes], requests: queue.Queue[bytes | None]) -> None:
        """The feed thread: requests to the child as it takes them (it starts slowly: 0.3 s of imports)."""
        try:
            while (request := requests.get()) is not None:
                inp.write(request)
                inp.flush()
        except OSError:
            pass  # the child is gone: the drain thread reports it
        finally:
            try:
                inp.close()  # the child ends at the end of its input
            except OSError:
                pass

    def _read_answers(self, out: IO[bytes], wanted: threading.Semaphore) -> None:
        """The drain thread: each answer (its IPC frames, or the child's error text) onto the queue, once
        it is wanted; after :meth:`close` every answer left, dropped."""
        try:
            while True:
                if not self._closing:
                    wanted.acquire()
                head = json.loads(_read_frame(out))  # at the child's end: ReaderUnavailable, queued below
                self.warm = True
                if not head.get("ok"):
                    self._answers.put(str(head.get("error", "unknown error")))
                else:
                    self._answers.put([_read_frame(out) for _ in range(int(head["tables"]))])
        except (OSError, ValueError, KeyError, ReaderUnavailable) as exc:
            self._answers.put(exc)  # whoever waits for an answer learns the child is gone

    @staticmethod
    def _encode(queries: Sequence[Statement], convert: bool = False) -> bytes:
        """One JSON line; a parameter several queries share (a batch's keys) is written once.
        ``convert``: the process converts rows to the columns' types where a query says how."""
        values: list[Any] = []
        index: dict[Any, int] = {}
        out = []
        for q in queries:
            refs = []
            for v in q[1]:
                if v not in index:
                    index[v] = len(values)
                    values.append(v)
                refs.append(index[v])
            how = _convert(q) if convert else None
            out.append([q[0], refs, _wants_rows(q), how.spec() if how is not None else None])
        return json.dumps({"values": values, "queries": out}).encode() + b"\n"

    @staticmethod
    def _key(queries: Sequence[Statement]) -> tuple[tuple[str, tuple[Any, ...], bool], ...]:
        return tuple((q[0], tuple(q[1]), _wants_rows(q)) for q in queries)

    def _send(self, queries: Sequence[Statement]) -> None:
        self.start()
        if self._proc is None or self._feed is None:
            raise ReaderUnavailable(self.broken or "the Arrow reader is not running")
        self._requests.put(self._encode(queries, self.warm))
        self._in_flight.append(self._key(queries))

    def _answer(self) -> list[pa.Table] | str:
        """The oldest in-flight request's tables, or the child's error text for it."""
        self._in_flight.popleft()
        self._wanted.release()  # the drain thread reads it out of the pipe now
        got = self._answers.get()
        if isinstance(got, BaseException):
            raise ReaderUnavailable(f"the Arrow reader's answer was cut off: {got}") from got
        if isinstance(got, str):
            return got
        return [pa.ipc.open_stream(frame).read_all() for frame in got]

    def send(self, queries: Sequence[Statement]) -> None:
        """Ask ahead; a later :meth:`query` with the same queries gets the answer."""
        if self.broken or len(self._in_flight) >= self.DEPTH or self._key(queries) in self._in_flight:
            return
        try:
            self._send(queries)
        except (OSError, ReaderUnavailable) as exc:
            self._fail(f"{type(exc).__name__}: {exc}")

    def query(self, queries: Sequence[Statement]) -> list[pa.Table]:
        """Run ``queries`` in one snapshot; their results as Arrow tables, in order."""
        if self.broken:
            raise ReaderUnavailable(self.broken)
        key = self._key(queries)
        try:
            if key not in self._in_flight:
                while self._in_flight:  # answers asked ahead for something else: dropped
                    self._answer()
                self._send(queries)
            while self._in_flight[0] != key:
                self._answer()
            got = self._answer()
        except (OSError, ValueError, ReaderUnavailable) as exc:  # the process is gone or garbled
            self._fail(f"{type(exc).__name__}: {exc}")
            raise ReaderUnavailable(self.broken or str(exc)) from exc
        if isinstance(got, str):  # this request only (a value the driver could not type): the process stays
            raise ReaderUnavailable(got)
        return got

    def _fail(self, why: str) -> None:
        import logging
        import subprocess

        err = b""
        if self._proc is not None and self._stderr is not None:
            try:
                self._proc.wait(timeout=2)  # it is exiting: its last words are in the file
            except subprocess.TimeoutExpired:
                pass
            self._stderr.seek(0)
            err = self._stderr.read()[-500:]
        self.broken = why + (f" ({err.decode(errors='replace').strip()})" if err.strip() else "")
        logging.getLogger(__name__).warning("Arrow reader for %s unavailable, reading through sqlite3: %s", self.path, self.broken)
        self.close()

    def close(self) -> None:
        import subprocess

        proc, self._proc = self._proc, None
        self._in_flight.clear()
        stderr, self._stderr = self._stderr, None
        if self._feed is not None:
            self._requests.put(None)  # the feed thread closes the child's stdin after what it holds
            self._feed.join(timeout=10)
            if self._feed.is_alive() and proc is not None:  # the child takes no input: it is stuck
                proc.kill()
            self._feed = None
        self._closing = True  # the drain thread takes what the child still writes, so it can exit
        self._wanted.release()
        if self._drain is not None:  # it ends when the child closes its stdout, that is, exits
            self._drain.join(timeout=10)  # (a join, not wait()'s polling: 60 ms at the end of every export)
            self._drain = None
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        self._answers, self._requests = queue.Queue(), queue.Queue()
        if stderr is not None:
            stderr.close()

    def __enter__(self) -> SqliteArrowReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _converted_here(got: pa.Table, how: list[Any], schemas: dict[str, pa.Schema]) -> pa.Table:
    """The child's side of :class:`Convert`: the rows converted, marked :data:`CONVERTED`."""
    text, minor = how
    schema = schemas.get(text)
    if schema is None:
        schema = schemas[text] = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
    table = converted(got, Convert(schema, tuple(bool(m) for m in minor)))
    return table.replace_schema_metadata({**(schema.metadata or {}), CONVERTED: b"1"})


def _serve(path: str, inp: IO[bytes], out: IO[bytes]) -> int:
    """The child: answer requests in order until stdin closes.

    A thread takes requests off stdin as they come, so the parent's write of
    a request asked ahead never waits for the answer being computed.
    """
    import adbc_driver_manager as adbc
    import adbc_driver_sqlite as adbc_sqlite

    requests: queue.Queue[bytes | None] = queue.Queue()
    schemas: dict[str, pa.Schema] = {}  # each schema sent, parsed once

    def take() -> None:
        for line in inp:
            requests.put(line)
        requests.put(None)

    threading.Thread(target=take, name="arrow-reader-requests", daemon=True).start()
    # the driver manager's low-level API: its DB-API layer imports pyarrow.dataset (0.1 s at every start)
    db = adbc_sqlite.connect(Path(path).as_uri() + "?mode=ro")  # percent-encoded; file:///C:/... on Windows
    conn = adbc.AdbcConnection(db)
    try:
        conn.set_autocommit(False)  # each request's queries in one read transaction: one snapshot
        while (line := requests.get()) is not None:
            try:
                tables = []
                request = json.loads(line)
                values = request["values"]
                for sql, refs, wants_rows, how in request["queries"]:
                    stmt = adbc.AdbcStatement(conn)
                    try:
                        stmt.set_options(**{BATCH_ROWS: "65536"})  # fewer, bigger chunks
                        stmt.set_sql_query(sql)
                        if refs:
                            stmt.bind(pa.record_batch([pa.array([values[i]]) for i in refs],
                                                      names=[f"p{n}" for n in range(len(refs))]))
                        if not wants_rows:
                            stmt.execute_update()
                            continue
                        handle, _rows = stmt.execute_query()
                        got = pa.RecordBatchReader._import_from_c(handle.address).read_all()
                        if how is not None:  # here, where the other core has time (the exporter has little)
                            got = _converted_here(got, how, schemas)
                        tables.append(got)
                    finally:
                        stmt.close()
                conn.rollback()  # end the read transaction: the WAL can be checkpointed
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent as text
                try:
                    conn.rollback()
                except Exception:  # noqa: BLE001
                    pass
                _write_frame(out, json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
                out.flush()
                continue
            _write_frame(out, json.dumps({"ok": True, "tables": len(tables)}).encode())
            for t in tables:
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, t.schema) as w:
                    w.write_table(t)
                _write_frame(out, sink.getvalue())
            out.flush()
    finally:
        conn.close()
        db.close()
    return 0


if __name__ == "__main__":
    code = _serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is answered, flushed and closed: no interpreter teardown (unloading pyarrow took
    # 10-15 ms that the exporter waited for at the end of every export)
    os._exit(code)
