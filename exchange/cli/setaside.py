"""``exchange set-aside ...``: documents this node could not encode and did not send.

Registered on ``main`` by :mod:`exchange.cli.main`; each command calls one function
of :mod:`exchange.send.setaside` (docs/OPERATIONS.md, "A document set aside").
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import click

from exchange.cli.main import HOME, JSON, _echo_json, _node, main, shown


@main.group("set-aside")
def set_aside() -> None:
    """Documents the exporter could not encode: left out of bundles so the rest goes on.

    \b
    Example:
      exchange set-aside list --home /srv/xchg/ho
    """


@set_aside.command("list")
@HOME
@JSON
def set_aside_list(home: Path | None, as_json: bool) -> None:
    """Each document set aside: the table, column, key and value that could not be encoded.

    \b
    Example:
      exchange set-aside list --home /srv/xchg/ho --json
    """
    from exchange.send.setaside import listing

    found = listing(_node(home))
    if as_json:
        _echo_json({"version": 1, "set_aside": [{**asdict(d), "reason": d.reason} for d in found]})
        return
    if not found:
        click.echo("no document set aside")
        return
    for d in found:
        click.echo(shown(f"{d.set_at}  {d.reason}"))
    click.echo(f"{len(found)} document(s) set aside; fix the rows, then run `exchange set-aside retry`")


@set_aside.command("retry")
@HOME
@click.option("--doc", "doc_type", help="Only documents of this type (default: every type).")
@click.option("--key", "doc_key", help="Only this document: its key as a JSON array, e.g. '[\"I0001\"]'.")
def set_aside_retry(home: Path | None, doc_type: str | None, doc_key: str | None) -> None:
    """Check set-aside documents again and queue those that encode now (with the next export or sync).

    \b
    Example:
      exchange set-aside retry --home /srv/xchg/ho --doc item --key '["I0001"]'
    """
    from exchange.send.setaside import retry

    done = retry(_node(home), doc_type, doc_key)
    for t, k in done.queued:
        click.echo(shown(f"queued again: {t} {k}"))
    for p in done.still:
        click.echo(shown(f"still set aside: {p.reason}"), err=True)
    click.echo(f"{len(done.queued)} queued, {len(done.still)} still set aside")
    if done.still:
        sys.exit(1)
