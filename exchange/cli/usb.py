"""``exchange usb ...``: transfer sticks for stores with no network (docs/USB.md).

Registered on ``main`` by :mod:`exchange.cli.main`; each command calls one function
of :mod:`exchange.transport.usb`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from exchange.cli.main import HOME, JSON, _echo_json, _node, _reporter, main, shown
from exchange.errors import outcome_exit_code

STICK = click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))


@main.group()
def usb() -> None:
    """Transfer sticks: carry bundles and acks to and from stores with no network.

    \b
    Example:
      exchange usb sync /media/STICK --home /srv/xchg/s001
    """


@usb.command("prepare")
@STICK
@click.option("--label", help="A name for the stick, kept in stick.json (e.g. ROUND-NORTH).")
def usb_prepare(path: Path, label: str | None) -> None:
    """Make the volume mounted at PATH a transfer stick (exchange-transfer/ and a README).

    \b
    Example:
      exchange usb prepare /media/STICK --label ROUND-NORTH
    """
    from exchange.transport.usb import prepare_stick

    transfer = prepare_stick(path, label)
    click.echo(f"transfer stick ready: {transfer}")
    click.echo("plug it in at the HO and at each store; see README.txt on the stick")


@usb.command("sync")
@STICK
@HOME
@JSON
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
def usb_sync(path: Path, home: Path | None, as_json: bool, quiet: bool) -> None:
    """Sync with the transfer stick at PATH now: take, import, export, put, receipt.

    \b
    Example:
      exchange usb sync /media/STICK --home /srv/xchg/s001
    """
    from exchange.transport.usb import usb_sync as do_sync

    node = _node(home)
    rec = do_sync(node, path, reporter=_reporter(as_json or quiet))
    if as_json:
        _echo_json(rec.as_json())
    else:
        click.echo(shown(f"usb {node.id}: {rec.line()}"))
        for e in rec.errors:
            click.secho(f"  {shown(e)}", fg="yellow")
        if rec.ok:
            click.echo("done: you can remove the stick now")
        else:
            click.secho(f"not finished: {shown(rec.advice())}", fg="yellow")
    code = outcome_exit_code([status for status, n in rec.results.items() if n], other_errors=not rec.ok)
    if code:
        sys.exit(code)


@usb.command("last")
@HOME
@JSON
def usb_last(home: Path | None, as_json: bool) -> None:
    """The latest stick visit of this node (by the service or `usb sync`).

    \b
    Example:
      exchange usb last --home /srv/xchg/s001
    """
    from exchange.service.words import local_time
    from exchange.transport.usb_last import last_usb_result

    last = last_usb_result(_node(home))
    if as_json:
        _echo_json(last)
        return
    if last is None:
        click.echo("no transfer stick has been synced here yet")
        return
    mark = click.style("ok", fg="green") if last.get("ok") else click.style("NOT FINISHED", fg="red")
    click.echo(f"{shown(local_time(last.get('finished')))} {mark} {shown(last.get('summary', ''))}")
    click.echo(shown(f"  stick {last.get('stick')}" + (f" (id {last['stick_id']})" if last.get("stick_id") else "")))
    for e in last.get("errors") or []:
        click.secho(f"  {shown(e)}", fg="yellow")
    if last.get("advice"):
        click.echo(f"  {shown(last['advice'])}")


@usb.command("receipts")
@STICK
@HOME
@click.option("--trust", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="allowed_signers file to verify with (default: the node home's, if given).")
@JSON
def usb_receipts(path: Path, home: Path | None, trust: Path | None, as_json: bool) -> None:
    """List the signed visit receipts on the stick at PATH, verifying their signatures.

    \b
    Example:
      exchange usb receipts /media/STICK --home /srv/xchg/ho
    """
    from exchange.service.words import local_time
    from exchange.transport.usb import list_receipts
    from exchange.wire.crypto import sshsig

    t = sshsig.AllowedSigners.load(trust) if trust else (_node(home).trust if home else None)
    rows = list_receipts(path, t)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no receipts on this stick")
    for row in rows:
        if row["error"]:
            click.secho(shown(f"{row['file']}: NOT VALID: {row['error']}"), fg="red")
            continue
        mark = ("verified" if row["verified"] else "not checked: pass --home or --trust" if t is None
                else f"not checked: {row['node']} is not in this node's trust store")
        click.echo(shown(f"{local_time(row['created'])} {row['node']:<8} took {len(row.get('taken', []))}, "
                         f"put {len(row.get('put', []))}, left {len(row.get('left', []))}"
                         f"{', ' + str(len(row['errors'])) + ' errors' if row.get('errors') else ''}  [{mark}]"))
