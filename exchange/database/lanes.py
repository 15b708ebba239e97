"""Which documents travel in a lane: the catalog's lanes as conditions on ``doc_type``.

A stream is per sender, recipient and lane (docs/CATALOG.md "Lanes"). The
queues (``xchg_delivery``, ``xchg_broadcast``, a store's ``xchg_event`` log)
are not split by lane: a document's lane is its type's, so each lane reads its
queue through a condition on ``doc_type``. The default lane takes every type no
other lane names (also a type the catalog does not know, which then fails
loudly where it always did), so the lanes split every queue without a gap or
an overlap. A catalog with one lane needs no condition at all (None), and its
queries stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement

from exchange.database.catalog import Catalog
from exchange.vocabulary import DEFAULT_LANE

__all__ = ["LaneTypes", "lane_types", "condition", "sql_condition"]


class LaneTypes:
    """The document types inside (``only``) or outside (``besides``) a lane; neither: every type."""

    def __init__(self, only: Sequence[str] | None = None, besides: Sequence[str] | None = None) -> None:
        self.only = tuple(only) if only is not None else None
        self.besides = tuple(besides) if besides is not None else None

    @property
    def everything(self) -> bool:
        return self.only is None and not self.besides

    def __contains__(self, doc_type: object) -> bool:
        if self.only is not None:
            return doc_type in self.only
        return doc_type not in (self.besides or ())


def lane_types(catalog: Catalog, lane: str) -> LaneTypes:
    """The types of ``lane``: the default lane is every type no other lane names."""
    if lane != DEFAULT_LANE:
        return LaneTypes(only=catalog.lane_types(lane))
    return LaneTypes(besides=[d.name for d in catalog if d.lane != DEFAULT_LANE])


def condition(column: ColumnElement[Any], types: LaneTypes) -> ColumnElement[bool] | None:
    """``column`` (a ``doc_type`` column) in the lane, as an SQLAlchemy condition; None: every type."""
    if types.only is not None:
        return column.in_(types.only or ["\x00none"])
    if types.besides:
        return column.not_in(types.besides)
    return None


def sql_condition(column: str, types: LaneTypes, mark: str = "?") -> tuple[str, tuple[str, ...]]:
    """The same as SQL text (`` AND column IN (?, ...)``) and its parameters; ``""`` for every type."""
    names = types.only if types.only is not None else types.besides
    if types.only is None and not names:
        return "", ()
    names = names or ("\x00none",)
    op = "IN" if types.only is not None else "NOT IN"
    return f" AND {column} {op} ({', '.join([mark] * len(names))})", tuple(names)

