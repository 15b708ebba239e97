"""A new child table of a document type both sides have: its rows kept aside, applied once this node has it.

The sender's item gains a table ``item_photo``; this node's catalog does not have it
yet. Refusing the bundle would stop the stream for an additive change, so the rows
are kept (``xchg_kept``, ``column_name`` :data:`CHILD`: whole rows as Arrow IPC, with
the peer, seq, document type and the documents they belong to) and written once this
node's catalog lists the table under the same type: oldest bundle first, before a
newer bundle is applied (:func:`replay`).

What a peer may put there is checked like any table of the bundle
(:mod:`exchange.receive.admission`): the table must be declared under that type in
the sender's signed catalog, the type must be one this node has and the bundle's
events announce, and every row must belong to an announced upsert of it. A table no
catalog declares, or one declared under a type the events do not announce, still
refuses the bundle (check_tables_announced).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Connection, and_, delete, select, update
from sqlalchemy.exc import StatementError

from exchange.database import rows
from exchange.database.catalog import Catalog, DocType
from exchange.database.failures import database_unusable, root_error
from exchange.database.tables import xchg_kept, xchg_parked
from exchange.errors import ApplyError, OwnershipError
from exchange.files import utc_now
from exchange.receive import evolution

log = logging.getLogger(__name__)

CHILD = evolution.CHILD
waiting = evolution.child_waiting
#: Arrow schema metadata of a kept table: the documents it replaces, with the version applied (JSON)
_DOCS = b"exchange.documents"

#: the versions applied here from a peer: (conn, peer, doc type, keys) -> {key: version}
Versions = Callable[[Connection, str, str, list[str]], dict[str, int]]


def new_tables(catalog: Catalog, peer_cat: evolution.PeerCatalog | None, tables: Sequence[str],
               announced: Mapping[str, object]) -> dict[str, str]:
    """The bundle's tables that are new children of a type this node has: table -> document type.

    Only a table the sender's catalog declares under exactly one type, as a child (not its
    header), of a type this node has and the bundle's events announce. Any other table this
    node does not know is left out, so admission refuses the bundle as before.
    """
    if peer_cat is None:
        return {}
    out: dict[str, str] = {}
    for name in tables:
        if name.startswith("_") or catalog.doc_for_table(name) is not None:
            continue
        owners = [d for d, spec in peer_cat.docs.items() if name in spec["tables"]]
        if len(owners) == 1 and owners[0] in catalog and owners[0] in announced \
                and peer_cat.docs[owners[0]]["tables"][0] != name:
            out[name] = owners[0]
    return out


def read(opened: evolution.Payload, dt: DocType, names: Sequence[str]) -> dict[str, pa.Table]:
    """The kept child tables of ``dt`` in the bundle, checked: each carries the type's key columns
    (else its rows cannot be tied to an announced document: the bundle is refused)."""
    out: dict[str, pa.Table] = {}
    for name in names:
        table = opened.table(name)
        cols = table.schema.names
        if len(set(cols)) != len(cols) or any(not c or len(c) > evolution.MAX_NAME for c in cols):
            raise ApplyError(f"table {name}: duplicate or overlong column names (at most {evolution.MAX_NAME} "
                             "characters)")
        missing = [c for c in dt.key if c not in cols]
        if missing:
            raise OwnershipError(f"table {name} (a {dt.name} table in the sender's catalog) lacks the key column "
                                 f"{', '.join(missing)}: its rows belong to no announced document; nothing of the "
                                 "bundle was applied")
        out[name] = table
    return out


def count(got: dict[str, object], tables: Mapping[str, pa.Table], want: object) -> None:
    """Add the kept tables' rows and the manifest's totals over them to ``got`` (control totals)."""
    got_rows = got["rows"]
    assert isinstance(got_rows, dict)
    got_rows.update({t: data.num_rows for t, data in tables.items()})
    got_totals = got["totals"]
    assert isinstance(got_totals, dict)
    got_totals.update(totals(tables, want))


def totals(tables: Mapping[str, pa.Table], want: object) -> dict[str, str]:
    """The sums the manifest gives for columns of the kept tables (a numeric column only)."""
    refs = want.get("totals") if isinstance(want, dict) else None
    out: dict[str, str] = {}
    for ref in list(refs)[:200] if isinstance(refs, dict) else []:
        tname, _, col = str(ref).partition(".")
        data = tables.get(tname)
        if data is None or col not in data.column_names:
            continue
        t = data.schema.field(col).type
        if not (pa.types.is_integer(t) or pa.types.is_decimal(t) or pa.types.is_floating(t)):
            continue
        value = pc.sum(data.column(col)).as_py() if data.num_rows else None
        out[ref] = str(value if value is not None else Decimal(0))
    return out


def keep(conn: Connection, peer: str, seq: int, dt: DocType, tables: Mapping[str, pa.Table],
         applied: Mapping[str, int]) -> int:
    """Keep the rows of the documents ``applied`` (key -> version) of each kept table; rows kept.

    The documents are recorded with the rows, so a document whose table is empty in this bundle
    (its photos removed) has its older kept rows replaced by none."""
    n = 0
    for name, data in tables.items() if applied else ():  # nothing applied (deletes only): nothing to replace
        wanted = [i for i, k in enumerate(rows.row_keys(data, dt.key)) if k in applied]
        part = data.take(pa.array(wanted, type=pa.int64()))
        part = part.replace_schema_metadata({_DOCS: json.dumps(dict(applied)).encode()})
        cond = and_(xchg_kept.c.peer == peer, xchg_kept.c.seq == seq, xchg_kept.c.table_name == name,
                    xchg_kept.c.column_name == CHILD)
        conn.execute(delete(xchg_kept).where(cond))
        conn.execute(xchg_kept.insert().values(
            peer=peer, seq=seq, table_name=name, column_name=CHILD, doc_type=dt.name, arrow_type="rows",
            rows=part.num_rows, data=evolution._ipc(part), kept_at=utc_now()))
        n += part.num_rows
        log.info("%s (%s) from %s seq %d: %d rows kept (no such table here yet)", name, dt.name, peer, seq,
                 part.num_rows)
    return n


def replay(conn: Connection, catalog: Catalog, versions: Versions) -> int:
    """Write the kept rows of child tables this node's catalog now has, oldest bundle first; parts written.

    A document is written only if the version kept is still the one applied here (a newer bundle, or
    a delete, wins) and its header exists; its rows of the table are replaced. Columns of the kept
    rows this node's table lacks are kept in turn; a type change, or rows the database refuses,
    stay kept with the reason (``exchange catalog kept``).
    """
    k = xchg_kept.c
    todo = conn.execute(select(k.peer, k.seq, k.table_name, k.doc_type).where(k.column_name == CHILD)
                        .order_by(k.seq, k.peer, k.table_name)).all()
    n = 0
    for peer, seq, table, doc_type in todo:
        if waiting(catalog, table, doc_type):
            continue
        cond = and_(k.peer == peer, k.seq == seq, k.table_name == table, k.column_name == CHILD)
        try:
            with conn.begin_nested():
                blob = conn.execute(select(k.data).where(cond)).scalar_one()
                written, rest = _write(conn, catalog, peer, int(seq), table, evolution._from_ipc(blob), versions)
                if rest is None:
                    conn.execute(delete(xchg_kept).where(cond))
                else:  # the rows of documents still parked here stay kept until they apply
                    conn.execute(update(xchg_kept).where(cond).values(data=evolution._ipc(rest), rows=rest.num_rows))
            n += 1
            log.info("%s rows kept from %s seq %d applied: %d", table, peer, seq, written)
        except ApplyError as exc:
            reason = exc.message
        except StatementError as exc:
            if database_unusable(exc):
                raise
            reason = str(root_error(exc)).splitlines()[0][:500]
        else:
            continue
        log.warning("%s rows kept from %s seq %d still not applied: %s", table, peer, seq, reason)
        conn.execute(update(xchg_kept).where(cond).values(reason=f"not applied: {reason}"[:2000]))
    return n


def _write(conn: Connection, catalog: Catalog, peer: str, seq: int, name: str, data: pa.Table,
           versions: Versions) -> tuple[int, pa.Table | None]:
    """Write the kept rows of the documents still at the version kept; returns the rows written and the
    rows of documents parked here at that version (kept on, None: none), which a retry applies."""
    dt = catalog.doc_for_table(name)
    assert dt is not None
    docs: dict[str, int] = json.loads((data.schema.metadata or {}).get(_DOCS, b"{}"))
    data = whole = data.replace_schema_metadata(None)
    _check_types(catalog, name, data.schema)
    data, extra = evolution.split_table(catalog, None, dt, name, data)
    current = versions(conn, peer, dt.name, list(docs))
    same = [key for key, v in docs.items() if current.get(key) == v]
    header = rows.read_docs(conn, catalog.table(dt.header), dt.key, same) if same else None
    present = set(rows.row_keys(header, dt.key)) if header is not None else set()
    keys = [key for key in same if key in present]
    table = catalog.table(name)
    rows.delete_docs(conn, table, dt.key, keys)
    wanted = [i for i, key in enumerate(rows.row_keys(data, dt.key)) if key in present]
    part = data.take(pa.array(wanted, type=pa.int64()))
    if part.num_rows:
        rows.insert_rows(conn, table, part)
    evolution.keep(conn, peer, seq, dt, name, extra, set(keys))
    parked = _parked(conn, peer, dt.name, {key: v for key, v in docs.items() if key not in present})
    if not parked:
        return int(part.num_rows), None
    waits = [i for i, key in enumerate(rows.row_keys(whole, dt.key)) if key in parked]
    rest = whole.take(pa.array(waits, type=pa.int64())).replace_schema_metadata(
        {_DOCS: json.dumps(parked).encode()})
    return int(part.num_rows), rest


def _parked(conn: Connection, peer: str, doc_type: str, docs: Mapping[str, int]) -> dict[str, int]:
    """Those of ``docs`` (key -> version) parked here from ``peer`` at exactly that version."""
    if not docs:
        return {}
    p = xchg_parked.c
    found = conn.execute(select(p.doc_key, p.version).where(and_(
        p.peer == peer, p.doc_type == doc_type, p.doc_key.in_(list(docs))))).all()
    return {str(key): int(v) for key, v in found if docs.get(str(key)) == int(v)}


def _check_types(catalog: Catalog, name: str, schema: pa.Schema) -> None:
    """A column of another type here than in the kept rows: they stay kept (ApplyError), with the column."""
    here = rows.arrow_schema(catalog.table(name))
    for f in schema:
        if f.name in here.names and f.type != here.field(f.name).type \
                and not rows.zone_only(f.type, here.field(f.name).type):
            raise ApplyError(f"table {name}: column {f.name} is {f.type} in the kept rows and "
                             f"{here.field(f.name).type} here: kept until this node's column has the sender's "
                             "type (then exchange catalog apply-kept)")
