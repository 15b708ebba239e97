"""Parquet decoding bounded by what is actually decoded, never by what a footer claims.

A Parquet footer is written by the sender and can lie: sizes and value counts
that look small while the pages decode to gigabytes. What bounds the decoder
are the page headers (Arrow decompresses every page to exactly the size its
header states, and decodes exactly the values it counts) and the encodings:

1. Before any row is decoded, :func:`scan` reads every page header of every
   column chunk, over the byte ranges Arrow reads, and adds up what decoding
   holds: decompressed page bytes and values times their decoded width. The
   footer must agree with them (each column chunk's value count and
   uncompressed size are the sums over its pages), so it cannot understate
   them. Only the encodings exchange's writers produce are accepted (PLAIN,
   RLE / bit-packed levels, dictionary); the others (DELTA_BYTE_ARRAY's prefix
   sharing, for one) can expand a page without a bound its header shows.
2. Decoding then goes row group by row group against a running budget
   (:class:`Budget`, one per bundle): a row group's Arrow buffers are counted
   as soon as it is decoded, and decoding stops with a LimitError once the
   bundle's budget or the table's (twice what its pages hold) is exceeded.
3. The one expansion the pages do not bound, dictionary-encoded strings (one
   long value repeated by a few bits each), is read as Arrow dictionaries: the
   exact decoded size is computed from the value lengths and the indices, and
   checked, before any value is copied out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from exchange.errors import FormatError, LimitError

#: Thrift compact protocol types (Apache Thrift, compact protocol spec)
_T_STOP, _T_TRUE, _T_FALSE, _T_BYTE, _T_I16, _T_I32, _T_I64, _T_DOUBLE = 0, 1, 2, 3, 4, 5, 6, 7
_T_BINARY, _T_LIST, _T_SET, _T_MAP, _T_STRUCT = 8, 9, 10, 11, 12
_MAX_HEADER = 1 << 20  # a page header is a few dozen bytes; Arrow's own cap is 16 MiB
_HEADER_READS = (512, 64 << 10, _MAX_HEADER)  # read a header through growing windows
MAX_PAGES = 100_000  # per file: a legitimate table of a bundle has a few hundred
_MAX_DEPTH = 8
#: page types and the encodings exchange's writers produce (parquet.thrift)
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_ENCODINGS = {0: "PLAIN", 2: "PLAIN_DICTIONARY", 3: "RLE", 4: "BIT_PACKED", 8: "RLE_DICTIONARY"}
_DICTIONARY_ENCODINGS = frozenset({2, 8})
_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8, "BYTE_ARRAY": 4}
#: a table may decode to this many times what its pages hold (validity bitmaps, offsets, padding)
#: plus TABLE_SLACK before it counts as lying
TABLE_FACTOR = 2
TABLE_SLACK = 1 << 20


class _Compact:
    """Just enough of the Thrift compact protocol to read a Parquet PageHeader."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise FormatError("Parquet page header is truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise FormatError("Parquet page header: varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, kind: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise FormatError("Parquet page header nested too deeply")
        if kind in (_T_TRUE, _T_FALSE):
            return
        if kind == _T_BYTE:
            self.byte()
        elif kind in (_T_I16, _T_I32, _T_I64):
            self.varint()
        elif kind == _T_DOUBLE:
            self.take(8)
        elif kind == _T_BINARY:
            self.take(self.varint())
        elif kind in (_T_LIST, _T_SET):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            for _ in range(size):
                self.byte() if elem in (_T_TRUE, _T_FALSE) else self.skip(elem, depth + 1)
        elif kind == _T_MAP:
            size = self.varint()
            types = self.byte() if size else 0
            for _ in range(size):
                self.skip(types >> 4, depth + 1)
                self.skip(types & 0x0F, depth + 1)
        elif kind == _T_STRUCT:
            self.struct(depth + 1)
        else:
            raise FormatError(f"Parquet page header: unknown Thrift type {kind}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError("Parquet page header is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def struct(self, depth: int = 0, keep: frozenset[int] = frozenset()) -> dict[int, Any]:
        """Read a struct; integer fields are returned, nested structs in ``keep`` too (as dicts)."""
        out: dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == _T_STOP:
                return out
            delta = head >> 4
            fid = last + delta if delta else self.zigzag()
            last = fid
            if kind in (_T_I16, _T_I32, _T_I64):
                out[fid] = self.zigzag()
            elif kind == _T_STRUCT and fid in keep:
                out[fid] = self.struct(depth + 1)
            else:
                self.skip(kind, depth)


@dataclass
class RowGroupPlan:
    """What decoding one row group holds, from its page headers."""

    decoded: int = 0  # upper bound of the Arrow bytes of its columns (dictionaries expanded excluded)
    dictionary_columns: list[str] = field(default_factory=list)  # byte-array columns with dictionary pages


@dataclass
class FilePlan:
    row_groups: list[RowGroupPlan]

    @property
    def decoded(self) -> int:
        return sum(rg.decoded for rg in self.row_groups)


def _page_header(f: BinaryIO, pos: int, end: int) -> tuple[dict[int, Any], int]:
    """The page header at ``pos`` and its length (windows grow only for an unusual header)."""
    for window in _HEADER_READS:
        f.seek(pos)
        raw = f.read(min(window, max(0, end - pos)))
        r = _Compact(raw)
        try:
            return r.struct(keep=frozenset({5, 7, 8})), r.pos
        except FormatError:
            if len(raw) < window:  # the whole rest of the chunk was read: really truncated
                raise
    raise LimitError(f"Parquet page header over {_MAX_HEADER} bytes")


def _chunk_range(col: Any) -> tuple[int, int]:
    """Where Arrow reads a column chunk (parquet-cpp's ComputeColumnChunkRange, without padding)."""
    start = int(col.data_page_offset)
    dict_off = col.dictionary_page_offset
    if col.has_dictionary_page and dict_off is not None and 0 < dict_off < start:
        start = int(dict_off)
    return start, int(col.total_compressed_size)


def _scan_chunk(f: BinaryIO, col: Any, width: int, file_size: int, what: str,
                pages: list[int]) -> tuple[int, bool]:
    """(decoded bytes bound, has dictionary-encoded data) of one column chunk, from its pages;
    ``pages`` counts the file's pages (one element, bounded by MAX_PAGES)."""
    start, length = _chunk_range(col)
    end = start + length
    if length == 0:  # an empty chunk (a table without rows): nothing is read
        return 0, False
    if start < 4 or length < 0 or end > file_size:
        raise FormatError(f"{what}: column chunk at {start}+{length} lies outside the file")
    pos, decoded, dictionary, values_seen, unpacked = start, 0, False, 0, 0
    while pos < end:
        pages[0] += 1
        if pages[0] > MAX_PAGES:
            raise LimitError(f"{what}: more than {MAX_PAGES} Parquet pages")
        h, hlen = _page_header(f, pos, end)
        kind, size, csize = h.get(1), h.get(2), h.get(3)
        if kind is None or size is None or csize is None or size < 0 or csize < 0:
            raise FormatError(f"{what}: Parquet page header without valid type and sizes")
        pos += hlen + csize
        unpacked += hlen + size
        if kind == _DICTIONARY_PAGE:
            sub, field_id = h.get(7, {}), 1
        elif kind == _DATA_PAGE:
            sub, field_id = h.get(5, {}), 1
        elif kind == _DATA_PAGE_V2:
            sub, field_id = h.get(8, {}), 1
        else:
            decoded += size  # an index page: read and skipped
            continue
        values, encoding = sub.get(field_id), sub.get(4 if kind == _DATA_PAGE_V2 else 2)
        if values is None or values < 0 or encoding is None:
            raise FormatError(f"{what}: Parquet page header without a value count or encoding")
        if encoding not in _ENCODINGS:
            raise FormatError(f"{what}: Parquet page encoding {encoding} is not one exchange writes "
                              f"({', '.join(_ENCODINGS.values())})")
        dictionary |= kind != _DICTIONARY_PAGE and encoding in _DICTIONARY_ENCODINGS
        values_seen += values if kind != _DICTIONARY_PAGE else 0
        decoded += size + values * (width + 1)  # the page, and its values decoded (+ validity)
    if pos != end:
        raise FormatError(f"{what}: Parquet pages overrun their column chunk")
    if (values_seen, unpacked) != (col.num_values, col.total_uncompressed_size):
        raise FormatError(f"{what}: Parquet footer claims {col.num_values} values in "
                          f"{col.total_uncompressed_size} bytes for column {col.path_in_schema}, its pages hold "
                          f"{values_seen} values in {unpacked} bytes: the file is not what it claims")
    return decoded, dictionary


def scan(path: Path, meta: Any | None = None) -> FilePlan:
    """Read every page header of ``path``: what decoding it holds, before any row is decoded."""
    import pyarrow.parquet as pq

    what = path.name
    try:
        meta = meta or pq.read_metadata(path)
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            plans, pages = [], [0]
            for i in range(meta.num_row_groups):
                rg, plan = meta.row_group(i), RowGroupPlan()
                for j in range(rg.num_columns):
                    col = rg.column(j)
                    width = _WIDTH.get(col.physical_type) or max(16, meta.schema.column(j).length or 0)
                    decoded, dictionary = _scan_chunk(f, col, width, size, what, pages)
                    plan.decoded += decoded
                    if dictionary and col.physical_type == "BYTE_ARRAY":
                        plan.dictionary_columns.append(meta.schema.column(j).path)
                plans.append(plan)
    except (FormatError, LimitError):
        raise
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise FormatError(f"{what}: not a readable Parquet file ({exc})") from exc
    return FilePlan(plans)


class Budget:
    """Bytes a bundle's tables may decode to, in all; shared by every table of the bundle."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def charge(self, n: int, what: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise LimitError(f"{what}: tables decode to more than {self.limit >> 20} MiB "
                             "(limit per bundle); decoding stopped")


def _dictionary_expanded(column: Any) -> int:
    """Exact bytes a dictionary-encoded string column takes once decoded (offsets + data)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for chunk in column.chunks:
        if not pa.types.is_dictionary(chunk.type):
            total += chunk.nbytes
            continue
        lengths = pc.binary_length(chunk.dictionary).fill_null(0)
        taken = pc.sum(pc.take(lengths, chunk.indices))
        total += int(taken.as_py() or 0) + 4 * (len(chunk) + 1) + (len(chunk) + 7) // 8
    return total


def read_table(path: Path, plan: FilePlan, budget: Budget, columns: list[str] | None = None) -> Any:
    """The table (or only ``columns``), decoded row group by row group against ``budget`` and the table's own.

    The table's budget is what its pages hold (:func:`scan`) times TABLE_FACTOR plus
    TABLE_SLACK: a file that decodes to more than its pages can hold lies about
    itself (a FormatError); the bundle's budget running out is a LimitError.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    what = path.name
    own = plan.decoded * TABLE_FACTOR + TABLE_SLACK
    used = 0
    pf = pq.ParquetFile(path, pre_buffer=False)
    if len(plan.row_groups) != pf.metadata.num_row_groups:
        raise FormatError(f"{what}: Parquet file changed while it was read")
    pieces = []
    dict_pf: Any = None
    for i, rg in enumerate(plan.row_groups):
        if rg.dictionary_columns:
            if dict_pf is None:  # long strings repeated by dictionary: size them before expanding
                dict_pf = pq.ParquetFile(path, read_dictionary=sorted({c for r in plan.row_groups
                                                                       for c in r.dictionary_columns}))
            part = dict_pf.read_row_group(i, columns=columns, use_threads=False)
            n = sum(_dictionary_expanded(c) if pa.types.is_dictionary(c.type) else c.nbytes for c in part.columns)
            own += n  # the expansion is legitimate; it is counted against the bundle's budget
            budget.charge(n, what)
            used += n
            part = part.cast(pa.schema([pf.schema_arrow.field(c) for c in part.column_names]))
        else:
            part = pf.read_row_group(i, columns=columns, use_threads=False)
            n = part.get_total_buffer_size()
            budget.charge(n, what)
            used += n
        if used > own:
            raise FormatError(f"{what}: row group {i} decodes to {used} bytes, more than its pages hold "
                              f"({plan.decoded} bytes): the file is not what it claims")
        pieces.append(part)
    if not pieces:
        schema = pf.schema_arrow
        return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
    return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
