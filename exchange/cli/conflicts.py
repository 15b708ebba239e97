"""``exchange conflicts ...``: concurrent changes of documents editable on both sides (docs/CATALOG.md).

Registered on ``main`` by :mod:`exchange.cli.main`; the work is done by
:mod:`exchange.receive.conflicts` and :mod:`exchange.database.conflicts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from exchange.cli.main import HOME, JSON, _echo_json, _node, main, shown


@main.group()
def conflicts() -> None:
    """Concurrent changes of documents edited on both sides: list, show, resolve.

    \b
    Example:
      exchange conflicts list --home /srv/xchg/ho --open
    """


def _line(c: Any) -> str:
    key = "/".join(c.as_json()["doc_key"])
    kept = f"kept {c.kept}" if c.kept else "held for a person"
    return (f"#{c.id} {c.status:8} {c.doc_type} {key} with {c.peer} (bundle {c.seq}) policy {c.policy}: {kept}"
            + (f" - {c.note}" if c.note else ""))


@conflicts.command("list")
@HOME
@JSON
@click.option("--open", "open_only", is_flag=True, help="Only the conflicts held for a person (OPEN).")
def conflicts_list(home: Path | None, as_json: bool, open_only: bool) -> None:
    """The conflict log, newest first: both versions kept, the policy applied, what it kept.

    \b
    Example:
      exchange conflicts list --home /srv/xchg/ho --open --json
    """
    from exchange.database.conflicts import conflicts as read

    node = _node(home)
    with node.engine.connect() as conn:
        found = read(conn, open_only=open_only)
    if as_json:
        _echo_json({"node": node.id, "conflicts": [c.as_json() for c in found]})
        return
    if not found:
        click.echo(f"{node.id}: no {'open ' if open_only else ''}conflicts")
    for c in found:
        click.echo(shown(_line(c)))


@conflicts.command("show")
@click.argument("conflict_id", type=int)
@HOME
@JSON
def conflicts_show(conflict_id: int, home: Path | None, as_json: bool) -> None:
    """One conflict with both versions of the document (ours: this node's; theirs: the peer's).

    \b
    Example:
      exchange conflicts show --home /srv/xchg/ho 7
    """
    from exchange.database.conflicts import conflict
    from exchange.errors import ConflictError

    node = _node(home)
    with node.engine.connect() as conn:
        c = conflict(conn, conflict_id)
    if c is None:
        raise ConflictError(f"no conflict #{conflict_id} on {node.id}")
    data = c.as_json(with_rows=True)
    if as_json:
        _echo_json(data)
        return
    click.echo(shown(_line(c)))
    for side in ("ours", "theirs"):
        v = data[side]
        click.echo(shown(f"  {side}: version {v['version']} changed {v['changed_at']}"
                         + (f", based on {v['base']}" if "base" in v else "")))
        if v["rows"] is None:
            click.echo("    (deleted)")
            continue
        for table, table_rows in v["rows"].items():
            for r in table_rows:
                click.echo(shown(f"    {table}: " + ", ".join(f"{k}={r[k]}" for k in r)))


@conflicts.command("resolve")
@click.argument("conflict_id", type=int)
@click.option("--keep", type=click.Choice(["ours", "theirs"]), required=True,
              help="ours: this node's version stays; theirs: the peer's version is written here.")
@click.option("--by", help="Who resolves it, for the log (default: the login name or EXCHANGE_USER).")
@HOME
def conflicts_resolve(conflict_id: int, keep: str, by: str | None, home: Path | None) -> None:
    """Resolve an OPEN conflict; the kept version goes to the peer with the next sync.

    \b
    Example:
      exchange conflicts resolve --home /srv/xchg/ho 7 --keep theirs
    """
    from exchange.receive.conflicts import resolve

    node = _node(home)
    c = resolve(node, conflict_id, "ours" if keep == "ours" else "theirs", by)
    click.echo(shown(_line(c)))
    click.echo(f"the {keep} version goes to {c.peer} with the next sync")
