"""``exchange catalog ...``: what differs between this node's catalog and a peer's, and the values kept aside.

Click commands only; the work is in :mod:`exchange.receive.evolution`. docs/CATALOG.md,
"Schema versions", describes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from exchange.cli.main import HOME, JSON, _node, main, shown
from exchange.errors import ConfigError


@main.group()
def catalog() -> None:
    """This node's catalog version against its peers', and values kept for columns not here yet.

    \b
    Example:
      exchange catalog diff --home /srv/xchg/ho --peer s001
    """


@catalog.command("diff")
@HOME
@click.option("--peer", "peer_id", required=True, help="The peer whose last catalog to compare with ours.")
@JSON
def catalog_diff(home: Path | None, peer_id: str, as_json: bool) -> None:
    """Show how a peer's catalog (from its last bundle applied here) differs from this node's.

    \b
    Example:
      exchange catalog diff --home /srv/xchg/ho --peer s001 --json
    """
    from exchange.receive import evolution

    node = _node(home)
    node.cfg.peer(peer_id)  # an unknown peer is a ConfigError naming the known ones
    with node.engine.connect() as conn:
        last = evolution.peer_catalog(conn, peer_id)
    ours = node.catalog.fingerprint
    if last is None:
        if as_json:
            click.echo(json.dumps({"peer": peer_id, "here": ours, "peer_catalog": None, "differences": []}))
            return
        raise ConfigError(f"no catalog recorded from {peer_id} yet: none of its bundles applied here carried one "
                          "(it runs exchange before bundle format v3, or sent nothing yet)",
                          hint=f"Sync with {peer_id}, then run this again.")
    theirs, seq = last
    diffs = evolution.diff(node.catalog, theirs, node.cfg.role)
    if as_json:
        click.echo(json.dumps({"peer": peer_id, "here": ours, "peer_catalog": theirs.fingerprint, "seq": seq,
                               "differences": [d.as_json() for d in diffs]}, indent=1))
        return
    click.echo(f"this node ({node.id}): catalog {ours[:12]}")
    click.echo(f"{shown(peer_id)}: catalog {theirs.short} (bundle {seq})")
    if not diffs:
        click.echo("same catalog and schemas")
        return
    for d in diffs:
        click.echo(f"{d.what:<13} {shown(d.name):<32} here: {shown(d.here):<18} {shown(peer_id)}: {shown(d.peer)}")
        click.echo(f"{'':<14}-> {d.effect}")


@catalog.command("kept")
@HOME
@JSON
def catalog_kept(home: Path | None, as_json: bool) -> None:
    """List values peers sent for columns this node does not have yet (kept aside, not lost).

    \b
    Example:
      exchange catalog kept --home /srv/xchg/s001
    """
    from exchange.receive import evolution

    node = _node(home)
    with node.engine.connect() as conn:
        kept = evolution.kept_columns(conn, node.catalog)
    if as_json:
        click.echo(json.dumps([{"peer": k.peer, "table": k.table, "column": k.column, "type": k.arrow_type,
                                "bundles": k.bundles, "rows": k.rows, "waiting": k.waiting} for k in kept], indent=1))
        return
    if not kept:
        click.echo("no values kept aside")
        return
    for k in kept:
        state = shown(k.waiting) if k.waiting else "ready: run `exchange catalog apply-kept`"
        unit = "documents" if _whole(k) else "rows" if k.column == evolution.CHILD else "values"
        click.echo(f"{shown(k.peer)}: {_what(k)}: {k.rows} {unit} "
                   f"from {k.bundles} bundles - {state}")


def _whole(k: Any) -> bool:
    from exchange.receive.evolution import WHOLE

    return bool(k.column == WHOLE)


def _what(k: Any) -> str:
    """A kept column (``item.brand (string)``), document type (``brand documents``) or child table
    (``item_photo rows of item``), for a terminal."""
    from exchange.receive.evolution import CHILD

    if k.column == CHILD:
        return shown(f"{k.table} rows of {k.arrow_type.removesuffix(' rows')}")
    return shown(f"{k.table} documents" if _whole(k) else f"{k.table}.{k.column} ({k.arrow_type})")


def _apply_kept(node: Any) -> tuple[int, int, list[Any]]:
    """Replay what this node's schema can now take, in one transaction: (values, kept bundle parts of
    document types, what is still kept)."""
    from exchange.database.capture import suppress_capture
    from exchange.database.tables import begin_write
    from exchange.receive import evolution
    from exchange.receive.importer import replay_kept_documents

    with node.engine.begin() as conn:
        begin_write(conn)
        with suppress_capture(conn):  # a peer's values, not a change of ours: never sent back
            n = evolution.replay_kept(conn, node.catalog)
            parts = replay_kept_documents(conn, node)
        return n, parts, evolution.kept_columns(conn, node.catalog)


def apply_kept_after_migrate(node: Any) -> None:
    """``exchange migrate``'s last step: columns it added take the values kept for them."""
    n, parts, left = _apply_kept(node)
    if n:
        click.echo(f"{n} kept values applied")
    if parts:
        click.echo(f"kept documents of {parts} bundles applied")
    if left:
        click.echo(f"{sum(k.rows for k in left)} values still kept aside (see `exchange catalog kept`)")


def kept_line(node: Any) -> str:
    """``exchange status received``'s line about values kept aside (schema evolution); "" when none."""
    from exchange.receive import evolution

    with node.engine.connect() as conn:
        kept = evolution.kept_columns(conn, node.catalog)
    if not kept:
        return ""  # nothing kept: every column received exists here
    what = ", ".join(sorted({_what(k) for k in kept}))
    return shown(f"kept aside: {sum(k.rows for k in kept)} values or documents of {what}, not in this node's "
                 "schema yet (exchange catalog kept)")


@catalog.command("apply-kept")
@HOME
def catalog_apply_kept(home: Path | None) -> None:
    """Write kept values into columns this node has gained since (after a migration or catalog change).

    \b
    Example:
      exchange catalog apply-kept --home /srv/xchg/s001
    """
    n, parts, left = _apply_kept(_node(home))
    click.echo(f"{n} kept values applied")
    if parts:
        click.echo(f"kept documents of {parts} bundles applied")
    for k in left:
        click.echo(f"still kept: {_what(k)} from {shown(k.peer)} ({k.rows}): {shown(k.waiting or 'see the log')}")
