"""What a peer's bundle may write: only the documents it announces, and only documents it owns.

A genuine signature proves who sent a file, not that the sender may write what
it contains. A store is a PC in a shop: stolen, infected or misused, it still
holds its own genuine keys. So before anything of a bundle is applied:

- every row of every table belongs to a document the bundle's events announce
  as an upsert (a child row smuggled in under another document's key, or a
  table of a type the events never name, would otherwise be written);
- a store-sent document belongs to the signing store: each owner column
  (``DocType.owner_columns``, reference schema ``store_id``) holds the sender's
  id, in the rows sent and in the rows the receiver already has under that key,
  for upserts and deletes alike.

A violation refuses the whole bundle (:class:`exchange.errors.OwnershipError`):
nothing of it is applied, the sender gets a REJECTED ack naming the document,
the claimed owner and the sender.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Connection

from exchange.database import rows
from exchange.database.catalog import Catalog, DocType
from exchange.errors import FormatError, OwnershipError
from exchange.vocabulary import DEFAULT_LANE, DocKey
from exchange.wire.formats import BASES_TABLE, EVENTS_TABLE

#: (doc_key, op, version) of one document type's events in a bundle
Events = Sequence[tuple[DocKey, str, int]]


def check_lane(catalog: Catalog, sender_docs: Mapping[str, Mapping[str, object]] | None, lane: str,
               doc_types: Sequence[str]) -> None:
    """Every document type a bundle carries travels in the bundle's lane (docs/CATALOG.md "Lanes").

    The lane is this node's catalog's (a type it does not know yet: the sender's catalog's). A bundle
    that claims another lane for a type would slip documents past a stuck bundle of their own lane, and
    apply out of their stream's order: it is a FormatError, quarantined before anything is applied.
    A sender whose catalog declares no lanes (format 3, or a bundle sealed before the upgrade) has one
    stream, the default lane, and may send any type in it.
    """
    theirs = sender_docs or {}
    one_stream = lane == DEFAULT_LANE and not any("lane" in d for d in theirs.values())
    if one_stream:
        return
    for doc_type in doc_types:
        own = (catalog.lane_of(doc_type) if doc_type in catalog
               else str(theirs.get(doc_type, {}).get("lane", DEFAULT_LANE)))
        if own != lane:
            raise FormatError(f"{doc_type} documents travel in lane {own!r}, but this bundle is of lane {lane!r}: "
                              "nothing of it applied", hint="Both ends must give each document type the same "
                              "lane ([catalog] lanes in exchange.toml; `exchange catalog diff` shows them).")


def key_text(doc_key: str) -> str:
    """A document key as an operator reads it: its values joined by '/'."""
    try:
        return "/".join(rows.parse_key(doc_key))
    except ValueError:
        return doc_key[:80]


def check_tables_announced(catalog: Catalog, tables: Iterable[str], announced: Mapping[str, Events]) -> None:
    """Every table of the bundle belongs to a document type its events name."""
    for name in tables:
        if name in (EVENTS_TABLE, BASES_TABLE):
            continue
        dt = catalog.doc_for_table(name)
        if dt is None or dt.name not in announced:
            raise OwnershipError(
                f"the bundle carries table {name}, but its events announce no "
                f"{dt.name + ' documents' if dt else 'document type of that table'}: "
                "nothing of the bundle was applied")


#: Rows whose keys are made and looked up at once (:func:`check_rows_announced`).
ROWS_AT_ONCE = 16_384


def check_rows_announced(dt: DocType, data: Mapping[str, pa.Table], upserts: set[DocKey]) -> None:
    """Every row of every table of ``dt`` belongs to a document announced as an upsert."""
    announced = pa.array(list(upserts), pa.string())
    for name, table in data.items():
        outside: list[str] = []
        # whole columns (no Python string per row when all are in), a slice of rows at a time: a bundle's
        # keys of every line at once were the importer's peak (docs/PERFORMANCE.md, "Peak memory and fan-in")
        for at in range(0, table.num_rows, ROWS_AT_ONCE):
            keys = rows.key_array(table.slice(at, ROWS_AT_ONCE), dt.key)
            inside = pc.is_in(keys, value_set=announced)
            if pc.all(inside).as_py() is False:
                outside += pc.unique(keys.filter(pc.invert(inside))).to_pylist()
        outside = list(dict.fromkeys(outside))
        if outside:
            raise OwnershipError(
                f"table {name} holds rows of {dt.name} {key_text(outside[0])}"
                + (f" (and {len(outside) - 1} more)" if len(outside) > 1 else "")
                + ", which the bundle's events do not announce: nothing of the bundle was applied")


def check_owner(conn: Connection, catalog: Catalog, dt: DocType, sender: str, events: Events,
                header: pa.Table | None, owner: str | None = None) -> None:
    """Each document of ``dt`` in the bundle, and what the receiver holds under its key, is ``sender``'s.

    ``owner``: the HO's change of a type editable on both sides must be of the receiving store's own
    documents (``owner`` is that store's id): the HO never writes one store's document at another.
    """
    if not dt.owner_columns:
        return
    why = f"the bundle was signed by {sender}: a store may only write its own documents"
    if owner is not None:
        sender, why = owner, f"this node is {owner}: the HO may send a store only that store's own documents"
    keys = [k for k, _op, _v in events]
    in_key = [c for c in dt.owner_columns if c in dt.key]
    if in_key:
        at = [dt.key.index(c) for c in in_key]
        split = rows.split_keys(pa.array(keys, pa.string()), len(dt.key))
        if split is not None and all(pc.all(pc.equal(split[i], sender)).as_py() is not False for i in at):
            todo = []  # every key names the sender (checked as whole columns); else key by key below
        else:
            todo = keys
        for k in todo:
            values = rows.parse_key(k)
            for col, i in zip(in_key, at, strict=True):
                if values[i] != sender:
                    _refuse(dt, k, col, values[i], why)
    rest = [c for c in dt.owner_columns if c not in dt.key]
    if not rest:
        return  # the key names the owner: the rows sent and the rows held agree with it
    if header is not None:
        _check_column_owners(dt, header, rest, sender, why)
    held = rows.read_docs(conn, catalog.table(dt.header), dt.key, keys)
    _check_column_owners(dt, held, rest, sender, why, held_here=True)


def _check_column_owners(dt: DocType, table: pa.Table, columns: Sequence[str], sender: str, why: str,
                         held_here: bool = False) -> None:
    for col in columns:
        values = table.column(col).to_pylist()
        for i, v in enumerate(values):
            if v is None or str(v) != sender:
                key = rows.row_keys(table.slice(i, 1), dt.key)[0]
                _refuse(dt, key, col, v, why, held_here)


def _refuse(dt: DocType, key: str, column: str, owner: object, why: str, held_here: bool = False) -> None:
    where = " as held here" if held_here else ""
    raise OwnershipError(
        f"{dt.name} {key_text(key)}{where} belongs to {owner!s} ({column}), but {why}; "
        "nothing of the bundle was applied")
