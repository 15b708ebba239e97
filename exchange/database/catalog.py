"""Document types: which tables make a business document, who owns it, where it goes.

The catalog is the one place the rest of `exchange` learns about business
tables: capture installs triggers from it, the exporter reads documents by its
keys and routes them with :class:`Route`, the importer applies tables in its
order (header first, so child foreign keys hold) and checks its control totals.

A site either uses the reference retail schema (:func:`reference_catalog`) or
maps its own POS tables in ``exchange.toml`` (:func:`catalog_from_config`,
format in docs/CATALOG.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal, cast, get_args

from sqlalchemy import Engine, MetaData, Table
from sqlalchemy.exc import SQLAlchemyError

from exchange.errors import ConfigError, DatabaseError
from exchange.vocabulary import DEFAULT_LANE, LANE_RE

__all__ = [
    "Owner", "RouteKind", "Policy", "PeerInfo", "Route", "DocType", "Catalog",
    "reference_catalog", "catalog_from_config", "CATALOG_SCHEMA_FORMAT",
]

#: The ``format`` of :meth:`Catalog.describe` (docs/FORMAT.md section 5, ``catalog``).
CATALOG_SCHEMA_FORMAT = "exchange-catalog-1"

Owner = Literal["ho", "store"]
RouteKind = Literal["all", "group", "column", "ho"]
#: What decides between two concurrent changes of a document editable on both sides (docs/CATALOG.md).
Policy = Literal["ho-wins", "store-wins", "newest-wins", "manual"]
_OWNERS: tuple[str, ...] = get_args(Owner)
_ROUTE_KINDS: tuple[str, ...] = get_args(RouteKind)
_POLICIES: tuple[str, ...] = get_args(Policy)


@dataclass(frozen=True)
class PeerInfo:
    """What routing needs to know about a peer: its id, role and store groups."""

    id: str
    role: Owner
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    """Where a document goes, decided from its header row.

    - ``all``: every store;
    - ``group``: the stores in the group named in ``column`` (NULL: every store);
    - ``column``: the store whose id is in ``column`` (a transfer order's destination);
    - ``ho``: the head office (store-owned documents).
    """

    kind: RouteKind
    column: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _ROUTE_KINDS:
            raise ConfigError(f"unknown route kind {self.kind!r} (known: {', '.join(_ROUTE_KINDS)})")
        needs_column = self.kind in ("group", "column")
        if needs_column and not self.column:
            raise ConfigError(f"route {self.kind!r} needs a column: write \"{self.kind}:COLUMN\"")
        if not needs_column and self.column is not None:
            raise ConfigError(f"route {self.kind!r} takes no column (got {self.column!r})")

    @classmethod
    def parse(cls, text: str) -> Route:
        """``"all"``, ``"ho"``, ``"group:COL"`` or ``"column:COL"`` as written in exchange.toml."""
        if not isinstance(text, str):
            raise ConfigError(f"a route is a string such as \"all\" or \"column:store_id\", not {text!r}")
        kind, sep, column = text.strip().partition(":")
        if kind not in _ROUTE_KINDS:
            raise ConfigError(
                f"unknown route {text!r}: use \"all\", \"ho\", \"group:COLUMN\" or \"column:COLUMN\"")
        return cls(cast(RouteKind, kind), column.strip() if sep else None)

    def __str__(self) -> str:
        return f"{self.kind}:{self.column}" if self.column else self.kind

    def targets(self, header_row: Mapping[str, Any], peers: Sequence[PeerInfo]) -> list[str]:
        """The ids of the peers (in ``peers`` order) that must receive the document."""
        stores = [p for p in peers if p.role == "store"]
        if self.kind == "ho":
            return [p.id for p in peers if p.role == "ho"]
        if self.kind == "all":
            return [p.id for p in stores]
        assert self.column is not None
        try:
            value = header_row[self.column]
        except KeyError:
            raise ConfigError(f"route {self} names column {self.column!r}, absent from the row") from None
        if self.kind == "group":
            if value is None:
                return [p.id for p in stores]
            return [p.id for p in stores if str(value) in p.groups]
        if value is None:
            return []
        return [p.id for p in stores if p.id == str(value)]


@dataclass(frozen=True)
class DocType:
    """A business document: a header table plus child tables sharing its key."""

    name: str
    header: str
    children: tuple[str, ...]
    key: tuple[str, ...]
    owner: Owner
    route: Route
    totals: tuple[str, ...] = field(default=())
    #: Store-sent types: the header column(s) naming the store a document belongs to. The HO applies
    #: a store's document only when each of them holds the signing store's id (docs/SECURITY.md).
    owner_columns: tuple[str, ...] = field(default=())
    #: Editable at the HO too (store-owned types only): the HO's changes go back to the owner store,
    #: and two concurrent changes are a conflict decided by ``conflict`` (exchange.receive.conflicts).
    both_sides: bool = False
    conflict: Policy = "ho-wins"
    #: Per header column, a policy of its own: two concurrent changes are merged column by column,
    #: each differing column decided by its policy (the others by ``conflict``). Types without children.
    column_conflicts: tuple[tuple[str, Policy], ...] = ()
    #: The lane its documents travel in (docs/CATALOG.md "Lanes"): each lane is a stream of its own per
    #: sender and recipient, so a bulk reload or a stuck bundle in one lane never holds up another.
    lane: str = DEFAULT_LANE

    def tables(self) -> tuple[str, ...]:
        """Header first, then children: the order to insert (reverse it to delete)."""
        return (self.header, *self.children)


class Catalog:
    """The document types of a node, checked against the table definitions."""

    def __init__(self, metadata: MetaData, doc_types: Sequence[DocType]) -> None:
        self.metadata = metadata
        self._docs: dict[str, DocType] = {}
        self._by_table: dict[str, DocType] = {}
        for doc in doc_types:
            self._check(doc)
            if doc.name in self._docs:
                raise ConfigError(f"document type {doc.name!r} is defined twice")
            for table in doc.tables():
                other = self._by_table.get(table)
                if other is not None:
                    raise ConfigError(
                        f"table {table!r} belongs to document types {other.name!r} and {doc.name!r}; "
                        "a table can be part of one document type only")
                self._by_table[table] = doc
            self._docs[doc.name] = doc

    def _check(self, doc: DocType) -> None:
        where = f"document type {doc.name!r}"
        if not doc.name:
            raise ConfigError("a document type needs a name")
        if not isinstance(doc.lane, str) or not LANE_RE.fullmatch(doc.lane):
            raise ConfigError(f"{where}: lane {doc.lane!r} is not a lane name: use 1-16 of a-z, 0-9 and '-', "
                              "starting with a letter")
        if doc.owner not in _OWNERS:
            raise ConfigError(f"{where}: owner must be \"ho\" or \"store\", not {doc.owner!r}")
        if not doc.key:
            raise ConfigError(f"{where}: key must name at least one column")
        if len(set(doc.key)) != len(doc.key):
            raise ConfigError(f"{where}: key {list(doc.key)} repeats a column")
        if len(set(doc.tables())) != len(doc.tables()):
            raise ConfigError(f"{where}: a table is listed twice in {list(doc.tables())}")
        for name in doc.tables():
            table = self._lookup(name, where)
            missing = [k for k in doc.key if k not in table.c]
            if missing:
                raise ConfigError(
                    f"{where}: key column(s) {', '.join(missing)} missing from table {name!r} "
                    f"(the header and every child carry the key columns {', '.join(doc.key)})")
        header = self.metadata.tables[doc.header]
        if doc.route.column is not None and doc.route.column not in header.c:
            raise ConfigError(
                f"{where}: route {doc.route} names column {doc.route.column!r}, "
                f"absent from header table {doc.header!r}")
        if doc.owner == "store" and doc.route.kind != "ho":
            raise ConfigError(f"{where}: a store-owned document goes to the HO: route must be \"ho\", "
                              f"not {str(doc.route)!r}")
        if doc.owner == "store" and not doc.owner_columns:
            raise ConfigError(
                f"{where}: a store-sent document must name the column(s) holding its owner's store id, "
                "or one store could write another store's documents",
                hint=f"Add owner_columns = [\"store_id\"] (the header column holding the store id) to the "
                     f"[[catalog.doc]] of {doc.name!r} in exchange.toml.")
        if doc.owner == "ho" and doc.owner_columns:
            raise ConfigError(f"{where}: owner_columns is for store-sent documents; HO documents are "
                              "written by the HO only")
        missing_owner = [c for c in doc.owner_columns if c not in header.c]
        if missing_owner:
            raise ConfigError(f"{where}: owner column(s) {', '.join(missing_owner)} missing from header "
                              f"table {doc.header!r}")
        if doc.conflict not in _POLICIES:
            raise ConfigError(f"{where}: conflict must be one of {', '.join(_POLICIES)}, not {doc.conflict!r}")
        for col, policy in doc.column_conflicts:
            if policy not in _POLICIES:
                raise ConfigError(f"{where}: column {col}: conflict must be one of {', '.join(_POLICIES)}, "
                                  f"not {policy!r}")
            if col not in header.c or col in doc.key:
                raise ConfigError(f"{where}: a column policy needs a non-key column of {doc.header!r}, "
                                  f"not {col!r}")
        if doc.column_conflicts and (doc.children or not doc.both_sides):
            raise ConfigError(f"{where}: column policies are for types edited on both sides without child tables")
        if doc.both_sides and (doc.owner != "store" or not doc.owner_columns):
            raise ConfigError(
                f"{where}: edit = \"both\" is for store-owned documents (the HO's change goes back to the "
                "store named in owner_columns); an HO-owned document is edited at the HO only",
                hint=f"Remove edit = \"both\" from the [[catalog.doc]] of {doc.name!r}, or make it owner = \"store\".")
        if doc.owner == "ho" and doc.route.kind == "ho":
            raise ConfigError(f"{where}: an HO-owned document cannot be routed to the HO; "
                              "use \"all\", \"group:COLUMN\" or \"column:COLUMN\"")
        for total in doc.totals:
            table_name, dot, column = total.partition(".")
            if not dot or not table_name or not column:
                raise ConfigError(f"{where}: total {total!r} must be written \"table.column\"")
            if table_name not in doc.tables():
                raise ConfigError(f"{where}: total {total!r} names table {table_name!r}, "
                                  f"not one of the document's tables {list(doc.tables())}")
            if column not in self.metadata.tables[table_name].c:
                raise ConfigError(f"{where}: total {total!r}: table {table_name!r} has no column {column!r}")

    def _lookup(self, name: str, where: str) -> Table:
        table = self.metadata.tables.get(name)
        if table is None:
            known = ", ".join(sorted(self.metadata.tables)) or "none"
            raise ConfigError(f"{where}: table {name!r} does not exist (tables: {known})")
        return table

    @property
    def names(self) -> list[str]:
        """Document type names, in catalog order (masters first: apply in this order)."""
        return list(self._docs)

    def __iter__(self) -> Iterator[DocType]:
        return iter(self._docs.values())

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, name: object) -> bool:
        return name in self._docs

    def get(self, name: str) -> DocType:
        try:
            return self._docs[name]
        except KeyError:
            raise ConfigError(
                f"unknown document type {name!r} (known: {', '.join(self._docs) or 'none'})") from None

    def owned_by(self, role: Owner) -> list[DocType]:
        return [d for d in self._docs.values() if d.owner == role]

    def edited_by(self, role: Owner) -> list[DocType]:
        """The types ``role`` changes and sends: those it owns, and (the HO) those editable on both sides."""
        return [d for d in self._docs.values() if d.owner == role or (d.both_sides and role == "ho")]

    def lane_of(self, doc_type: str) -> str:
        """The lane of a document type; a type this catalog does not know is in the default lane."""
        doc = self._docs.get(doc_type)
        return doc.lane if doc is not None else DEFAULT_LANE

    def lanes(self) -> list[str]:
        """Every lane of this catalog, the default lane first, then in catalog order."""
        return list(dict.fromkeys([DEFAULT_LANE, *(d.lane for d in self)]))

    def lane_types(self, lane: str) -> list[str]:
        """The document types of ``lane``, in catalog order (the order to apply)."""
        return [d.name for d in self if d.lane == lane]

    def doc_for_table(self, table: str) -> DocType | None:
        """The document type a table belongs to, if any."""
        return self._by_table.get(table)

    def table(self, name: str) -> Table:
        return self._lookup(name, "catalog")

    def __repr__(self) -> str:
        return f"Catalog({self.names})"

    @cached_property
    def description(self) -> dict[str, Any]:
        """What this node's catalog is, as bundles carry it (inner manifest ``catalog``, FORMAT.md v3).

        Document types (tables, key, owner) and, per table, each column's Arrow type and
        nullability: what a receiver needs to tell an additive change (a new nullable column,
        a new table or document type) from one that is not (a type change, a dropped key).
        ``fingerprint`` is the SHA-256 of the rest, so two nodes with the same catalog and
        schemas show the same version.
        """
        from exchange.database.rows import arrow_type

        # format 5: a type's lane, written only when not the default (a catalog of one lane is unchanged)
        docs = {d.name: {"tables": list(d.tables()), "key": list(d.key), "owner": d.owner}
                | ({} if d.lane == DEFAULT_LANE else {"lane": d.lane}) for d in self}
        tables = {name: {c.name: [str(arrow_type(c)), c.nullable is not False]
                         for c in self.metadata.tables[name].columns}
                  for d in self for name in d.tables()}
        body = {"format": CATALOG_SCHEMA_FORMAT, "docs": docs, "tables": tables}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        return {**body, "fingerprint": digest}

    @property
    def fingerprint(self) -> str:
        """The catalog version: the SHA-256 of :attr:`description` (shown shortened to 12 digits)."""
        return str(self.description["fingerprint"])


#: The reference catalog's lanes (docs/CATALOG.md "Lanes"), ``[catalog] lanes = "reference"``: HO -> store,
#: the item master (a reload is 200,000 items) apart from orders and invoices, which a store works with
#: today; promotions and audit plans stay in the default lane. Store -> HO, the day's sales bills apart
#: from goods movements (receipts, returns) and customers, in the default lane.
REFERENCE_LANES = {"item": "masters", "transfer_order": "orders", "sales_order": "orders",
                   "sales_invoice": "orders", "sales_bill": "sales"}


def _reference_doc_types() -> list[DocType]:
    ho, to_ho = Route("all"), Route("ho")
    owner = ("store_id",)  # store-sent documents belong to the store named here
    return [
        DocType("item", "item", ("item_barcode",), ("item_id",), "ho", ho,
                ("item.price",)),
        DocType("promotion", "promotion", ("promotion_item",), ("promo_id",), "ho",
                Route("group", "store_group"), ("promotion_item.promo_price",)),
        DocType("transfer_order", "transfer_order", ("transfer_order_line",), ("to_id",), "ho",
                Route("column", "dest_store"),
                ("transfer_order.total_value", "transfer_order_line.qty")),
        DocType("sales_order", "sales_order", ("sales_order_line",), ("so_id",), "ho",
                Route("column", "store_id"),
                ("sales_order.total", "sales_order_line.qty", "sales_order_line.amount")),
        DocType("sales_invoice", "sales_invoice", ("sales_invoice_line",), ("invoice_id",), "ho",
                Route("column", "store_id"),
                ("sales_invoice.total", "sales_invoice.tax", "sales_invoice_line.qty",
                 "sales_invoice_line.amount", "sales_invoice_line.tax")),
        DocType("audit_plan", "audit_plan", ("audit_plan_line",), ("plan_id",), "ho",
                Route("column", "store_id"), ()),
        DocType("customer", "customer", (), ("store_id", "customer_id"), "store", to_ho, (), owner,
                both_sides=True, conflict="manual"),
        DocType("sales_bill", "sales_bill", ("sales_bill_line", "sales_bill_payment"),
                ("store_id", "bill_no"), "store", to_ho,
                ("sales_bill.total", "sales_bill.tax", "sales_bill_line.qty", "sales_bill_line.amount",
                 "sales_bill_line.tax", "sales_bill_payment.amount"), owner),
        DocType("grc", "grc", ("grc_line",), ("store_id", "grc_no"), "store", to_ho,
                ("grc_line.qty",), owner),
        DocType("grt", "grt", ("grt_line",), ("store_id", "grt_no"), "store", to_ho,
                ("grt_line.qty", "grt_line.amount"), owner),
    ]


def reference_catalog(engine: Engine | None = None) -> Catalog:
    """The document types of the reference retail schema (:data:`exchange.database.schema.RETAIL`).

    With ``engine``, the tables as that database has them: a column a later release
    added and ``exchange migrate`` has not added there yet is left out, so a node
    not yet migrated neither exports nor expects it.
    """
    return Catalog(_reference_metadata(engine), _reference_doc_types())


def _reference_metadata(engine: Engine | None) -> MetaData:
    from exchange.database.schema import RETAIL, as_in_database

    if engine is None:
        return RETAIL
    try:
        with engine.connect() as conn:
            return as_in_database(conn)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the reference tables' columns: {exc}") from exc


_CATALOG_KEYS = {"schema", "doc", "conflicts", "lanes"}
_DOC_KEYS = {"name", "header", "children", "key", "owner", "route", "totals", "owner_columns", "edit", "conflict",
             "lane"}
_EDITS = ("owner", "both")
_SCHEMAS = ("reference", "database")


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{what} must be a list of names, not {value!r}")
    return tuple(value)


def _doc_from_config(entry: Any, index: int) -> DocType:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"[[catalog.doc]] #{index + 1} must be a table, not {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"[[catalog.doc]] #{index + 1} needs name = \"...\"")
    where = f"[[catalog.doc]] {name!r}"
    unknown = set(entry) - _DOC_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(_DOC_KEYS))})")
    header = entry.get("header", name)
    if not isinstance(header, str) or not header:
        raise ConfigError(f"{where}: header must be a table name, not {header!r}")
    if "key" not in entry:
        raise ConfigError(f"{where} needs key = [\"column\", ...]")
    owner = entry.get("owner")
    if owner not in _OWNERS:
        raise ConfigError(f"{where}: owner must be \"ho\" or \"store\", not {owner!r}")
    route_text = entry.get("route", "ho" if owner == "store" else "all")
    try:
        route = Route.parse(route_text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    edit = entry.get("edit", "owner")
    if edit not in _EDITS:
        raise ConfigError(f"{where}: edit must be \"owner\" or \"both\", not {edit!r}")
    lane = entry.get("lane", DEFAULT_LANE)
    if not isinstance(lane, str) or not LANE_RE.fullmatch(lane):
        raise ConfigError(f"{where}: lane must be a lane name (1-16 of a-z, 0-9 and '-', starting with a "
                          f"letter), not {lane!r}")
    conflict = entry.get("conflict", "ho-wins")
    if conflict not in _POLICIES:
        raise ConfigError(f"{where}: conflict must be one of {', '.join(_POLICIES)}, not {conflict!r}")
    return DocType(
        name=name,
        header=header,
        children=_str_list(entry.get("children", []), f"{where}: children"),
        key=_str_list(entry["key"], f"{where}: key"),
        owner=cast(Owner, owner),
        route=route,
        totals=_str_list(entry.get("totals", []), f"{where}: totals"),
        owner_columns=_str_list(entry.get("owner_columns", []), f"{where}: owner_columns"),
        both_sides=edit == "both",
        conflict=cast(Policy, conflict),
        lane=lane,
    )


def _with_policies(catalog: Catalog, policies: Any) -> Catalog:
    """``[catalog] conflicts = { type = "policy" }``: another policy for a type, the reference schema's too."""
    if not policies:
        return catalog
    if not isinstance(policies, Mapping):
        raise ConfigError("[catalog]: conflicts must be a table such as { customer = \"ho-wins\" }")
    docs = {d.name: d for d in catalog}
    for name, policy in policies.items():
        if name not in docs:
            raise ConfigError(f"[catalog] conflicts: unknown document type {name!r} (known: {', '.join(docs)})")
        if isinstance(policy, Mapping):  # { policy = "manual", columns = { phone = "store-wins" } }
            unknown = set(policy) - {"policy", "columns"}
            columns = policy.get("columns", {})
            if unknown or not isinstance(columns, Mapping):
                extra = f", not {', '.join(sorted(unknown))}" if unknown else ""
                raise ConfigError(f"[catalog] conflicts: {name} takes policy = \"...\" and columns = "
                                  "{ column = \"policy\" }" + extra)
            docs[name] = replace(docs[name], column_conflicts=tuple(
                (str(c), cast(Policy, p)) for c, p in columns.items()))
            policy = policy.get("policy", docs[name].conflict)
        if policy not in _POLICIES:
            raise ConfigError(f"[catalog] conflicts: {name} must be one of {', '.join(_POLICIES)}, "
                              f"not {policy!r}")
        if not docs[name].both_sides:
            raise ConfigError(f"[catalog] conflicts: {name} is edited by its owner only; a policy is for "
                              "types editable on both sides (edit = \"both\")")
        docs[name] = replace(docs[name], conflict=cast(Policy, policy))
    return Catalog(catalog.metadata, list(docs.values()))


def _with_lanes(catalog: Catalog, lanes: Any) -> Catalog:
    """``[catalog] lanes = { type = "lane" }``: another lane for a type, the reference schema's too
    (``"main"``: back to the default lane). Both ends of a stream must give a type the same lane."""
    if lanes is None:
        return catalog
    if lanes == "reference":  # the reference catalog's lanes, for the types this catalog has
        lanes = {t: lane for t, lane in REFERENCE_LANES.items() if t in catalog}
    if not isinstance(lanes, Mapping):
        raise ConfigError("[catalog]: lanes must be \"reference\" or a table such as { item = \"masters\" }")
    docs = {d.name: d for d in catalog}
    for name, lane in lanes.items():
        if name not in docs:
            raise ConfigError(f"[catalog] lanes: unknown document type {name!r} (known: {', '.join(docs)})")
        if not isinstance(lane, str) or not LANE_RE.fullmatch(lane):
            raise ConfigError(f"[catalog] lanes: {name}: {lane!r} is not a lane name (1-16 of a-z, 0-9 and "
                              "'-', starting with a letter)")
        docs[name] = replace(docs[name], lane=lane)
    return Catalog(catalog.metadata, list(docs.values()))


def _reflect(engine: Engine, tables: Sequence[str]) -> MetaData:
    metadata = MetaData()
    try:
        metadata.reflect(bind=engine, only=list(dict.fromkeys(tables)))
    except SQLAlchemyError as exc:
        if "Could not reflect" in str(exc) or "not available" in str(exc):
            raise ConfigError(f"[catalog]: {exc}", hint="Create the tables first, or fix the table names "
                              "in [[catalog.doc]] of exchange.toml.") from exc
        raise DatabaseError(f"cannot read the table definitions of the catalog: {exc}") from exc
    return metadata


def catalog_from_config(cfg: Mapping[str, Any], *, reflect_from: Engine | None = None) -> Catalog:
    """The catalog described by the ``[catalog]`` table of exchange.toml.

    ``cfg`` is that table; a whole config mapping holding a ``catalog`` table is
    accepted too. ``schema = "reference"`` (the default without ``[[catalog.doc]]``)
    uses the built-in retail tables; ``schema = "database"`` (the default with
    ``[[catalog.doc]]``) reflects the named tables from ``reflect_from``, the
    node's own database, so a site maps its POS tables without writing Python.
    """
    section: Any = cfg.get("catalog", cfg) if isinstance(cfg, Mapping) else cfg
    if not isinstance(section, Mapping):
        raise ConfigError(f"[catalog] must be a table, not {section!r}")
    unknown = set(section) - _CATALOG_KEYS
    if unknown:
        raise ConfigError(f"[catalog]: unknown setting(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(_CATALOG_KEYS))})")
    entries = section.get("doc", [])
    if not isinstance(entries, list):
        raise ConfigError("[catalog]: doc must be an array of tables: write [[catalog.doc]]")
    schema = section.get("schema", "database" if entries else "reference")
    if schema not in _SCHEMAS:
        raise ConfigError(f"[catalog]: schema must be \"reference\" or \"database\", not {schema!r}")
    doc_types = [_doc_from_config(entry, i) for i, entry in enumerate(entries)]
    policies, lanes = section.get("conflicts"), section.get("lanes")
    if schema == "reference":
        if not doc_types:
            return _with_lanes(_with_policies(reference_catalog(reflect_from), policies), lanes)
        return _with_lanes(_with_policies(Catalog(_reference_metadata(reflect_from), doc_types), policies), lanes)
    if not doc_types:
        raise ConfigError("[catalog]: schema = \"database\" needs at least one [[catalog.doc]]")
    if reflect_from is None:
        raise ConfigError("[catalog]: the site's tables must be read from its database, "
                          "but no database was given", hint="Set database.url in exchange.toml.")
    tables = [t for doc in doc_types for t in doc.tables()]
    return _with_lanes(_with_policies(Catalog(_reflect(reflect_from, tables), doc_types), policies), lanes)
