"""Schema evolution: apply what this node's schema can hold, keep the rest, hold what is not additive.

A bundle carries its tables' Arrow schemas (Parquet) and, from format v3 on, the
sender's catalog (document types, tables, column types) with its fingerprint.
Nodes upgrade one at a time, so the two sides often differ:

- a column the sender has and this node does not is *kept* (``xchg_kept``: the
  rows' primary keys and the values, per bundle, table and column), reported
  (``exchange catalog kept``, ``exchange status``) and written into the table once
  it has the column with the sender's type (:func:`replay_kept`: before the next
  bundle is applied, after ``exchange migrate``, or ``exchange catalog apply-kept``);
- a column this node has and the bundle lacks is left alone: an update keeps
  the row's value, an insert takes the column's default;
- a column whose type differs, or a key column missing, is not additive: it is
  found before anything of the bundle is applied and raises
  :class:`~exchange.errors.SchemaChangeError`, which holds the bundle (HELD, no
  ack) with a reason naming the table, the column and both catalog versions.

Everything read from the peer here is bounded and checked before use: the
catalog's shape and sizes (:func:`parse_catalog`), column names (at most
:data:`MAX_NAME` characters; a kept column is only ever written through this
node's own table definition).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Connection, and_, bindparam, delete, select, update

from exchange.database import rows
from exchange.database.catalog import CATALOG_SCHEMA_FORMAT, Catalog, DocType
from exchange.database.tables import xchg_doc_version, xchg_kept, xchg_parked, xchg_peer_catalog
from exchange.errors import ApplyError, FormatError, SchemaChangeError
from exchange.files import utc_now
from exchange.wire.formats import EVENTS_TABLE, HEX64, INNER_MANIFEST, MAX_TABLES
from exchange.vocabulary import DEFAULT_LANE, LANE_RE

log = logging.getLogger(__name__)

MAX_NAME = 128  # a table or column name (xchg_kept's columns)
MAX_TYPE = 128  # an Arrow type's text
MAX_COLUMNS = 2000  # columns of one table in a peer's catalog
MAX_DOCS = 1000  # document types in a peer's catalog
MAX_DOC_NAME = 64  # a kept document type's name (xchg_kept.doc_type)
#: ``xchg_kept.column_name`` of a whole table of a document type this node does not have yet
WHOLE = "*"
#: ``xchg_kept.column_name`` of the whole rows of a new child table of a known type (exchange.receive.children)
CHILD = "*rows"
_EVENTS, _SUMMARY = f"{EVENTS_TABLE}.", "_summary."  # table_name prefixes of a kept type's events and totals


class Payload(Protocol):
    """What applying reads of a bundle: an opened bundle, or a document type kept from one (:class:`KeptPart`)."""

    @property
    def tables(self) -> Mapping[str, Any]: ...

    @property
    def summary(self) -> dict[str, Any]: ...

    @property
    def catalog(self) -> Any: ...

    def table(self, name: str) -> Any: ...

    def schema(self, name: str) -> Any: ...


@dataclass(frozen=True)
class PeerCatalog:
    """A peer's catalog as its bundle carried it, checked (see :func:`parse_catalog`)."""

    fingerprint: str
    docs: dict[str, dict[str, Any]]
    #: table -> column -> (Arrow type text, nullable)
    tables: dict[str, dict[str, tuple[str, bool]]]
    raw: dict[str, Any]

    @property
    def short(self) -> str:
        return self.fingerprint[:12]


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise FormatError(f"{INNER_MANIFEST}: catalog: {what} must be a name of 1 to {MAX_NAME} characters")
    return value


def parse_catalog(raw: Any) -> PeerCatalog | None:
    """The ``catalog`` of an inner manifest, checked; None when the sender predates format v3.

    The fingerprint must be the SHA-256 of the rest (recomputed here): a mismatch
    or any malformed part is a FormatError, so the bundle is quarantined.
    """
    if raw is None:
        return None
    what = f"{INNER_MANIFEST}: catalog"
    if not isinstance(raw, dict) or set(raw) != {"format", "docs", "tables", "fingerprint"}:
        raise FormatError(f"{what} must be an object of format, docs, tables and fingerprint")
    if raw["format"] != CATALOG_SCHEMA_FORMAT:
        raise FormatError(f"{what}: unknown format {str(raw['format'])[:40]!r} (known: {CATALOG_SCHEMA_FORMAT})")
    fp = raw["fingerprint"]
    if not isinstance(fp, str) or len(fp) != 64 or not set(fp) <= HEX64:
        raise FormatError(f"{what}: fingerprint is not a SHA-256")
    docs_raw, tables_raw = raw["docs"], raw["tables"]
    if not isinstance(docs_raw, dict) or len(docs_raw) > MAX_DOCS:
        raise FormatError(f"{what}: docs must be an object of at most {MAX_DOCS} document types")
    if not isinstance(tables_raw, dict) or len(tables_raw) > MAX_TABLES:
        raise FormatError(f"{what}: tables must be an object of at most {MAX_TABLES} tables")
    docs: dict[str, dict[str, Any]] = {}
    for name, d in docs_raw.items():
        _name(name, "a document type")
        if not isinstance(d, dict) or set(d) - {"lane"} != {"tables", "key", "owner"} \
                or d["owner"] not in ("ho", "store"):
            raise FormatError(f"{what}: document type {name!r} must have tables, key and owner (ho or store), "
                              "and may have a lane (format 5)")
        if "lane" in d and (not isinstance(d["lane"], str) or not LANE_RE.fullmatch(d["lane"])
                            or d["lane"] == DEFAULT_LANE):
            raise FormatError(f"{what}: document type {name!r}: lane {str(d['lane'])[:40]!r} is not a lane name "
                              "(the default lane is written by leaving lane out)")
        for field_ in ("tables", "key"):
            if not isinstance(d[field_], list) or not d[field_] or len(d[field_]) > MAX_COLUMNS:
                raise FormatError(f"{what}: document type {name!r}: {field_} must be a list of names")
            for v in d[field_]:
                _name(v, f"{name}.{field_}")
        docs[name] = {"tables": list(d["tables"]), "key": list(d["key"]), "owner": d["owner"]} \
            | ({"lane": d["lane"]} if "lane" in d else {})
    tables: dict[str, dict[str, tuple[str, bool]]] = {}
    for tname, cols in tables_raw.items():
        _name(tname, "a table")
        if not isinstance(cols, dict) or not cols or len(cols) > MAX_COLUMNS:
            raise FormatError(f"{what}: table {tname!r} must be an object of 1 to {MAX_COLUMNS} columns")
        out: dict[str, tuple[str, bool]] = {}
        for cname, spec in cols.items():
            _name(cname, f"a column of {tname}")
            if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                    and 0 < len(spec[0]) <= MAX_TYPE and isinstance(spec[1], bool)):
                raise FormatError(f"{what}: column {tname}.{cname} must be [type, nullable]")
            out[cname] = (spec[0], spec[1])
        tables[tname] = out
    body = {k: raw[k] for k in ("format", "docs", "tables")}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    if digest != fp:
        raise FormatError(f"{what}: fingerprint {fp[:12]} does not match its content ({digest[:12]})")
    return PeerCatalog(fp, docs, tables, raw)


def _versions(catalog: Catalog, peer_cat: PeerCatalog | None) -> str:
    theirs = f"catalog {peer_cat.short}" if peer_cat else "a catalog before format v3"
    return f"sender runs {theirs}, this node runs catalog {catalog.fingerprint[:12]}"


def check_doc_keys(catalog: Catalog, peer_cat: PeerCatalog | None, doc_types: list[str]) -> None:
    """A document type whose key differs between the two sides is not additive: hold the bundle."""
    if peer_cat is None:
        return
    for name in doc_types:
        theirs = peer_cat.docs.get(name)
        if name in catalog and theirs is not None and list(catalog.get(name).key) != theirs["key"]:
            raise SchemaChangeError(
                f"{name}: the key is ({', '.join(theirs['key'])}) at the sender and "
                f"({', '.join(catalog.get(name).key)}) here; {_versions(catalog, peer_cat)}: "
                "the bundle is held until both sides have the same key")


def check_schemas(catalog: Catalog, peer_cat: PeerCatalog | None, doc_types: Iterable[str],
                  opened: Payload) -> None:
    """Every table of ``doc_types`` in the bundle, by its Parquet schema: before any row is read or written."""
    check_doc_keys(catalog, peer_cat, list(doc_types))
    for d in doc_types:
        dt = catalog.get(d)
        for name in dt.tables():
            if name in opened.tables:
                unknown_columns(catalog, peer_cat, dt, name, opened.schema(name))


def unknown_columns(catalog: Catalog, peer_cat: PeerCatalog | None, dt: DocType, name: str,
                    schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` this node's table ``name`` does not have (kept aside).

    A key column missing or a column of another type raises SchemaChangeError (the bundle is
    HELD); a repeated column name is malformed (ApplyError: FAILED, as before).
    """
    expected = rows.arrow_schema(catalog.table(name))
    if len(set(schema.names)) != len(schema.names):
        raise ApplyError(f"table {name} does not match this node's catalog (duplicate column names): "
                         "the two sides' catalogs differ")
    missing = [c for c in dt.key if c not in schema.names]
    if missing:
        raise SchemaChangeError(
            f"table {name}: key column {', '.join(missing)} missing from the bundle; "
            f"{_versions(catalog, peer_cat)}: the bundle is held until both sides have the same key")
    unknown: list[str] = []
    for f in schema:
        if len(f.name) > MAX_NAME or not f.name:
            raise ApplyError(f"table {name}: a column name of {len(f.name)} characters (at most {MAX_NAME})")
        if f.name not in expected.names:
            unknown.append(f.name)
        elif f.type != expected.field(f.name).type and not rows.zone_only(f.type, expected.field(f.name).type):
            raise SchemaChangeError(
                f"table {name}: column {f.name} is {f.type} in the bundle and {expected.field(f.name).type} "
                f"here; {_versions(catalog, peer_cat)}: the bundle is held until this node's schema has "
                "the sender's type (exchange migrate, or the catalog change), then applied by exchange retry")
    return unknown


def split_table(catalog: Catalog, peer_cat: PeerCatalog | None, dt: DocType, name: str,
                data: pa.Table) -> tuple[pa.Table, dict[str, pa.Table]]:
    """``data`` as this node can apply it, and the columns to keep aside (each with the primary key)."""
    data = rows.with_zones(data, rows.arrow_schema(catalog.table(name)))  # naive <-> UTC times: the same instants
    unknown = unknown_columns(catalog, peer_cat, dt, name, data.schema)
    if not unknown:
        return data, {}
    table = catalog.table(name)
    pk = [c.name for c in table.primary_key.columns if c.name in data.column_names]
    kept = {c: data.select([*pk, c]) for c in unknown}
    return data.drop_columns(unknown), kept


def keep(conn: Connection, peer: str, seq: int, dt: DocType, name: str, columns: Mapping[str, pa.Table],
         keys: set[str]) -> int:
    """Store the values of ``columns`` for the rows of documents ``keys`` (the ones applied); row count."""
    n = 0
    for column, table in columns.items():
        wanted = [i for i, k in enumerate(rows.row_keys(table, dt.key)) if k in keys]
        table = table.take(pa.array(wanted, type=pa.int64()))
        if not table.num_rows:
            continue
        cond = and_(xchg_kept.c.peer == peer, xchg_kept.c.seq == seq, xchg_kept.c.table_name == name,
                    xchg_kept.c.column_name == column)
        conn.execute(delete(xchg_kept).where(cond))
        conn.execute(xchg_kept.insert().values(
            peer=peer, seq=seq, table_name=name, column_name=column, doc_type=dt.name,
            arrow_type=str(table.schema.field(column).type), rows=table.num_rows, data=_ipc(table),
            kept_at=utc_now()))
        n += table.num_rows
        log.info("%s.%s from %s seq %d: %d values kept (no such column here yet)", name, column, peer, seq,
                 table.num_rows)
    return n


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(blob).read_all()


@dataclass
class KeptColumn:
    """Values kept for one table column from one peer: waiting for the column, or applicable now."""

    peer: str
    table: str
    column: str
    arrow_type: str
    bundles: int
    rows: int
    #: why it waits: the column is missing here, or has another type; "" when it can be applied now
    waiting: str


def kept_columns(conn: Connection, catalog: Catalog) -> list[KeptColumn]:
    """Every kept column, per peer, with whether this node's schema can take it now."""
    k = xchg_kept.c
    from sqlalchemy import func

    q = (select(k.peer, k.table_name, k.column_name, k.arrow_type, func.count(), func.sum(k.rows))
         .where(k.column_name.notin_([WHOLE, CHILD]))
         .group_by(k.peer, k.table_name, k.column_name, k.arrow_type)
         .order_by(k.peer, k.table_name, k.column_name))
    out = []
    for peer, table, column, atype, bundles, n in conn.execute(q):
        out.append(KeptColumn(peer, table, column, atype, int(bundles), int(n or 0),
                              _waiting(catalog, table, column, atype)))
    docs = (select(k.peer, k.doc_type, func.count(), func.sum(k.rows), func.max(k.reason))
            .where(and_(k.column_name == WHOLE, k.table_name.startswith(_EVENTS, autoescape=True)))
            .group_by(k.peer, k.doc_type).order_by(k.peer, k.doc_type))
    for peer, doc_type, bundles, n, reason in conn.execute(docs):
        waiting = reason or ("" if doc_type in catalog else f"no document type {doc_type} here yet")
        out.append(KeptColumn(peer, doc_type, WHOLE, "documents", int(bundles), int(n or 0), waiting))
    children = (select(k.peer, k.table_name, k.doc_type, func.count(), func.sum(k.rows), func.max(k.reason))
                .where(k.column_name == CHILD).group_by(k.peer, k.table_name, k.doc_type)
                .order_by(k.peer, k.table_name))
    for peer, table, doc_type, bundles, n, reason in conn.execute(children):
        out.append(KeptColumn(peer, table, CHILD, f"{doc_type} rows", int(bundles), int(n or 0),
                              child_waiting(catalog, table, doc_type) or reason or ""))
    return out


def child_waiting(catalog: Catalog, table: str, doc_type: str) -> str:
    """Why kept rows of a new child ``table`` of ``doc_type`` cannot be written yet; "" once this node's
    catalog has the table under that type (exchange.receive.children)."""
    dt = catalog.doc_for_table(table)
    if dt is None:
        return f"no table {table} in this node's {doc_type} documents yet"
    if dt.name != doc_type or dt.header == table:
        where = "the header of" if dt.header == table else "part of"
        return f"table {table} is {where} {dt.name} documents here, the kept rows are of {doc_type} documents"
    return ""


def _waiting(catalog: Catalog, table: str, column: str, atype: str) -> str:
    t = catalog.metadata.tables.get(table)
    if t is None or catalog.doc_for_table(table) is None:
        return f"no table {table} in this node's catalog"
    if column not in t.c:
        return f"no column {table}.{column} here yet"
    here = str(rows.arrow_type(t.c[column]))
    if here != atype:
        return f"{table}.{column} is {here} here, the kept values are {atype}"
    return ""


#: Arrow schema metadata of kept values held for parked documents: {document key: the version parked}
_PARKED_AT = b"exchange.parked_at"


def replay_kept(conn: Connection, catalog: Catalog) -> int:
    """Write kept values whose column now exists here with their type, oldest bundle first; row count.

    Only rows that exist are updated (a document deleted since keeps nothing); applied
    entries are deleted. Runs in the caller's transaction, before a newer bundle is
    applied, so a newer value always wins over a kept older one. The values of a document
    parked here stay kept, marked with its parked version, until it applies (``exchange
    retry`` replays them then); if a newer version overtook it, they are dropped.
    """
    ready = [c for c in kept_columns(conn, catalog) if not c.waiting and c.column not in (WHOLE, CHILD)]
    n = 0
    for c in ready:
        table = catalog.table(c.table)
        k = xchg_kept.c
        cond = and_(k.peer == c.peer, k.table_name == c.table, k.column_name == c.column)
        for seq, blob in conn.execute(select(k.seq, k.data).where(cond).order_by(k.seq)).all():
            data, waits = _parked_apart(conn, catalog, c.peer, c.table, _from_ipc(blob))
            pk = [name for name in data.column_names if name != c.column]
            params = [{f"k_{p}": r[p] for p in pk} | {"v_value": r[c.column]} for r in data.to_pylist()]
            stmt = (update(table).where(and_(*[table.c[p] == bindparam(f"k_{p}") for p in pk]))
                    .values({c.column: bindparam("v_value")}))
            if params:
                conn.execute(stmt, params)
            if waits is None:
                conn.execute(delete(xchg_kept).where(and_(cond, k.seq == seq)))
            else:
                conn.execute(update(xchg_kept).where(and_(cond, k.seq == seq)).values(
                    data=_ipc(waits), rows=waits.num_rows))
            n += len(params)
        log.info("%s.%s: kept values from %s applied", c.table, c.column, c.peer)
    return n


def _parked_apart(conn: Connection, catalog: Catalog, peer: str, table: str,
                  data: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """Kept values split: those to write now, and those of documents parked here (None: none), marked with
    the version parked. A value marked before is written once its document is applied at that version,
    kept while it is still parked at it, and dropped when a newer version (or a delete) overtook it."""
    dt = catalog.doc_for_table(table)
    marked: dict[str, int] = json.loads((data.schema.metadata or {}).get(_PARKED_AT, b"{}"))
    data = data.replace_schema_metadata(None)
    if dt is None or not all(col in data.column_names for col in dt.key) or not data.num_rows:
        return data, None
    keys = rows.row_keys(data, dt.key)
    p, v = xchg_parked.c, xchg_doc_version.c
    wanted = sorted(set(keys))
    parked: dict[str, int] = {}
    applied: dict[str, int] = {}
    for i in range(0, len(wanted), rows.CHUNK):
        part = wanted[i:i + rows.CHUNK]
        parked.update({str(key): int(ver) for key, ver in conn.execute(select(p.doc_key, p.version).where(and_(
            p.peer == peer, p.doc_type == dt.name, p.doc_key.in_(part))))})
        if marked:
            applied.update({str(key): int(ver) for key, ver in conn.execute(select(v.doc_key, v.version).where(
                and_(v.peer == peer, v.doc_type == dt.name, v.doc_key.in_(part))))})
    now: list[int] = []
    later: list[int] = []
    versions: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in marked:
            if parked.get(key) == marked[key]:
                later.append(i)
                versions[key] = marked[key]
            elif applied.get(key) == marked[key]:
                now.append(i)
            continue  # overtaken by a newer version or a delete: dropped
        if key in parked:
            later.append(i)
            versions[key] = parked[key]
        else:
            now.append(i)
    write = data.take(pa.array(now, pa.int64()))
    if not later:
        return write, None
    waits = data.take(pa.array(later, pa.int64())).replace_schema_metadata(
        {_PARKED_AT: json.dumps(versions).encode()})
    return write, waits


def keep_doc_types(conn: Connection, catalog: Catalog, peer: str, seq: int, opened: Payload,
                   peer_cat: PeerCatalog | None, unknown: list[str]) -> tuple[set[str], dict[str, int]]:
    """Keep aside whole the documents of types this node does not have yet (a new document type at the
    sender): its tables, its events and its control totals, applied once the catalog has the type
    (:func:`kept_documents`). Returns the tables kept and the documents kept per type.

    The sender's catalog says which tables are the type's; a sender before format v3, a type its own
    catalog does not name, or a table this node's catalog gives another type are refused as before
    (ApplyError: the two sides' catalogs differ).
    """
    if peer_cat is None:
        raise ApplyError(f"unknown document types {unknown}: the two sides' catalogs differ (the sender runs "
                         "a version before bundle format 3, whose bundles do not say what a new type holds)")
    events = opened.table(EVENTS_TABLE)
    expected = opened.summary.get("documents", {})
    tables: set[str] = set()
    counts: dict[str, int] = {}
    for name in unknown:
        spec = peer_cat.docs.get(name)
        if spec is None or len(name) > MAX_DOC_NAME:
            raise ApplyError(f"unknown document type {name[:80]!r}: neither this node's catalog nor the "
                             "sender's names it")
        for tname in spec["tables"]:
            mine = catalog.doc_for_table(tname)
            if mine is not None or tname in tables or tname.startswith((_EVENTS, _SUMMARY)):
                raise ApplyError(f"document type {name}: table {tname} is "
                                 + (f"part of {mine.name} here" if mine else "named twice")
                                 + ": the two sides' catalogs differ")
            if tname in opened.tables:
                _keep_whole(conn, peer, seq, name, tname, opened.table(tname))
                tables.add(tname)
        mine_events = events.filter(pc.equal(events.column("doc_type"), name))
        _keep_whole(conn, peer, seq, name, _EVENTS + name, mine_events)
        totals = json.dumps(expected.get(name, {}) if isinstance(expected, dict) else {}).encode()
        _keep_whole(conn, peer, seq, name, _SUMMARY + name, pa.table({"json": pa.array([totals], pa.binary())}))
        counts[name] = mine_events.num_rows
        log.info("%s documents from %s seq %d kept aside: no such document type here yet", name, peer, seq)
    return tables, counts


def _keep_whole(conn: Connection, peer: str, seq: int, doc_type: str, table_name: str, data: pa.Table) -> None:
    conn.execute(xchg_kept.insert().values(
        peer=peer, seq=seq, table_name=table_name, column_name=WHOLE, doc_type=doc_type, arrow_type="table",
        rows=data.num_rows, data=_ipc(data), kept_at=utc_now()))


@dataclass
class KeptPart:
    """The documents of one kept type from one bundle, read back to be applied like a bundle (:class:`Payload`)."""

    peer: str
    seq: int
    doc_type: str
    data: dict[str, pa.Table] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)

    @property
    def tables(self) -> Mapping[str, Any]:
        return self.data

    @property
    def summary(self) -> dict[str, Any]:
        return {"documents": {self.doc_type: self.totals}}

    @property
    def catalog(self) -> Any:
        return None

    def table(self, name: str) -> Any:
        return self.data[name]

    def schema(self, name: str) -> Any:
        return self.data[name].schema


def kept_documents(conn: Connection, catalog: Catalog) -> list[KeptPart]:
    """Kept documents of types this node's catalog has gained since, per bundle, oldest first."""
    k = xchg_kept.c
    parts: dict[tuple[str, int, str], KeptPart] = {}
    q = (select(k.peer, k.seq, k.doc_type, k.table_name, k.data)
         .where(and_(k.column_name == WHOLE, k.doc_type.in_(catalog.names)))  # only what can be applied now
         .order_by(k.peer, k.seq, k.doc_type))
    for peer, seq, doc_type, table_name, blob in conn.execute(q):
        part = parts.setdefault((peer, int(seq), doc_type), KeptPart(peer, int(seq), doc_type))
        data = _from_ipc(blob)
        if table_name == _SUMMARY + doc_type:
            part.totals = json.loads(data.column("json")[0].as_py())
        elif table_name == _EVENTS + doc_type:
            part.data[EVENTS_TABLE] = data
        else:
            part.data[table_name] = data
    return list(parts.values())


def refused_documents(conn: Connection, part: KeptPart, reason: str) -> None:
    """Why ``part`` still cannot be applied (shown by ``exchange catalog kept``); it stays kept."""
    k = xchg_kept.c
    conn.execute(update(xchg_kept).where(and_(k.peer == part.peer, k.seq == part.seq, k.doc_type == part.doc_type,
                                              k.column_name == WHOLE)).values(reason=reason[:2000]))


def forget_documents(conn: Connection, part: KeptPart) -> None:
    """The kept rows of ``part``, once applied."""
    k = xchg_kept.c
    conn.execute(delete(xchg_kept).where(and_(k.peer == part.peer, k.seq == part.seq, k.doc_type == part.doc_type,
                                              k.column_name == WHOLE)))


def record_peer_catalog(conn: Connection, peer: str, seq: int, peer_cat: PeerCatalog | None) -> None:
    """Remember the catalog the peer's applied bundle carried (``exchange catalog diff``, the page)."""
    if peer_cat is None:
        return
    values = dict(fingerprint=peer_cat.fingerprint, catalog=json.dumps(peer_cat.raw, sort_keys=True),
                  seq=seq, received_at=utc_now())
    if not conn.execute(update(xchg_peer_catalog).where(xchg_peer_catalog.c.peer == peer)
                        .values(**values)).rowcount:
        conn.execute(xchg_peer_catalog.insert().values(peer=peer, **values))


def peer_catalog(conn: Connection, peer: str) -> tuple[PeerCatalog, int] | None:
    """The last catalog recorded from ``peer`` and the seq that carried it."""
    row = conn.execute(select(xchg_peer_catalog.c.catalog, xchg_peer_catalog.c.seq)
                       .where(xchg_peer_catalog.c.peer == peer)).first()
    if row is None:
        return None
    parsed = parse_catalog(json.loads(row[0]))
    assert parsed is not None
    return parsed, int(row[1])


@dataclass(frozen=True)
class Difference:
    """One way the two sides' catalogs differ, and what it does to the peer's bundles here."""

    what: str  # "document type", "lane", "key", "table", "column", "type", "nullable"
    name: str  # doc type, table or table.column
    here: str  # this node's side ("-": absent)
    peer: str  # the peer's side ("-": absent)
    effect: str

    def as_json(self) -> dict[str, str]:
        return {"what": self.what, "name": self.name, "here": self.here, "peer": self.peer, "effect": self.effect}


def diff(ours: Catalog, theirs: PeerCatalog, role: str) -> list[Difference]:
    """How ``theirs`` (the peer's last catalog) differs from this node's (whose role is ``role``),
    in catalog order, each with its effect on the documents that go that way."""
    mine = ours.description
    out: list[Difference] = []
    for name in [*mine["docs"], *(d for d in theirs.docs if d not in mine["docs"])]:
        a, b = mine["docs"].get(name), theirs.docs.get(name)
        if a is None:
            out.append(Difference("document type", name, "-", "yes",
                                  "the peer's bundles with these documents fail here until the catalog has it"))
            continue
        if b is None:
            out.append(Difference("document type", name, "yes", "-",
                                  "the peer does not know these documents"))
            continue
        we_send = a["owner"] == role
        there, here = ("at the peer", "the peer's") if we_send else ("here", "this node's")
        # (a peer whose catalog declares no lane at all sends everything in the default lane: no difference)
        lanes_declared = any("lane" in d for d in theirs.docs.values())
        if lanes_declared and a.get("lane", DEFAULT_LANE) != b.get("lane", DEFAULT_LANE):
            out.append(Difference("lane", name, a.get("lane", DEFAULT_LANE), b.get("lane", DEFAULT_LANE),
                                  "bundles with these documents in the other lane are quarantined: give the "
                                  "type one lane on both sides ([catalog] lanes)"))
        if a["key"] != b["key"]:
            out.append(Difference("key", name, ", ".join(a["key"]), ", ".join(b["key"]),
                                  f"not additive: bundles with these documents are HELD {there}"))
        for table in [*a["tables"], *(t for t in b["tables"] if t not in a["tables"])]:
            cols_a, cols_b = mine["tables"].get(table), theirs.tables.get(table)
            if cols_b is None or table not in b["tables"]:
                out.append(Difference("table", table, "yes", "-", "the peer keeps these rows aside until it has "
                                      "the table" if we_send else f"not in the peer's {name} documents"))
                continue
            if cols_a is None or table not in a["tables"]:
                out.append(Difference("table", table, "-", "yes", f"not in this node's {name} documents"
                                      if we_send else "the peer's rows are kept aside here until this node has "
                                      "the table"))
                continue
            for col in [*cols_a, *(c for c in cols_b if c not in cols_a)]:
                ca, cb = cols_a.get(col), cols_b.get(col)
                full = f"{table}.{col}"
                sender_only = ("values kept aside at the peer until it has the column" if we_send
                               else "the peer's values are kept aside here until this node has the column")
                receiver_only = ("the peer keeps its value on update, its default on insert" if we_send
                                 else "keeps its value here on update, its default on insert")
                if cb is None:
                    out.append(Difference("column", full, ca[0], "-", sender_only if we_send else receiver_only))
                elif ca is None:
                    out.append(Difference("column", full, "-", cb[0], receiver_only if we_send else sender_only))
                elif ca[0] != cb[0] and _zone_text_only(ca[0], cb[0]):
                    out.append(Difference("type", full, ca[0], cb[0], "times converted: a naive time is the "
                                          "UTC instant (not held; exchange migrate makes both zone-aware)"))
                elif ca[0] != cb[0]:
                    out.append(Difference("type", full, ca[0], cb[0],
                                          f"not additive: bundles with this table are HELD {there}"))
                elif ca[1] != cb[1]:
                    out.append(Difference("nullable", full, "null" if ca[1] else "not null",
                                          "null" if cb[1] else "not null",
                                          f"a NULL sent into a NOT NULL column {there} parks the document"))
    return out


def _zone_text_only(a: str, b: str) -> bool:
    """Two column types of catalogs (Arrow type text) that differ only as naive and UTC times (rows.zone_only)."""
    kinds = {"timestamp[us]", "timestamp[us, tz=UTC]"}
    return a in kinds and b in kinds
