"""``exchange alerts ...``: the alerts a node delivers on each state change (docs/ALERTS.md).

Registered on ``main`` by :mod:`exchange.cli.main`; each command calls one function
of :mod:`exchange.service.alerts`.
"""

from __future__ import annotations

from pathlib import Path

import click

from exchange.cli.main import HOME, JSON, _echo_json, _node, main, shown


@main.group()
def alerts() -> None:
    """Alerts: a command and/or webhook told when a store goes silent, a stream sticks, ...

    \b
    Example:
      exchange alerts list --home /srv/xchg/ho
    """


@alerts.command("check")
@HOME
@JSON
def alerts_check(home: Path | None, as_json: bool) -> None:
    """Deliver now every alert whose state changed since the last check (each sync also does).

    \b
    Example:
      exchange alerts check --home /srv/xchg/ho
    """
    from exchange.errors import ConfigError
    from exchange.service import alerts as al

    node = _node(home)
    if not al.config(node).enabled:
        raise ConfigError("no alerts configured", hint="Set [alerts] command and/or webhook in exchange.toml "
                                                       "(docs/ALERTS.md).")
    sent = al.check(node)
    if as_json:
        _echo_json({"version": 1, "delivered": sent})
        return
    for p in sent:
        click.echo(shown(f"{p['state']}: {p['alert']} {p['peer']} - {p['detail']}"))
    if not sent:
        click.echo("no change since the last check")


@alerts.command("list")
@HOME
@JSON
def alerts_list(home: Path | None, as_json: bool) -> None:
    """The alerts that hold now (raised or not yet delivered), without delivering anything.

    \b
    Example:
      exchange alerts list --home /srv/xchg/ho --json
    """
    from exchange.service import alerts as al

    node = _node(home)
    cfg = al.config(node)
    now = al.states(node, cfg.silent_after_minutes, key_expiry_days=cfg.key_expiry_days)
    if as_json:
        _echo_json({"version": 1, "alerts": list(now.values())})
        return
    for a in now.values():
        click.echo(shown(f"{a['kind']} {a['peer']}: {a['detail']}"))
    if not now:
        click.echo("nothing to alert about")
