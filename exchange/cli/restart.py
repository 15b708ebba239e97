"""``exchange peer restart``: re-base a store's streams after it went back in time (docs/OPERATIONS.md).

Registered on the ``peer`` group by :mod:`exchange.cli.main`; calls
:func:`exchange.service.restart.restart_store` under the work lock.
"""

from __future__ import annotations

from pathlib import Path

import click

from exchange.cli.main import HOME, JSON, REASON, _echo_json, _node, one_peer, peer, peer_id_option
from exchange.vocabulary import counted


@peer.command("restart")
@HOME
@peer_id_option("The store that was restored from a backup, or re-made after its disk died.")
@REASON
@JSON
def peer_restart(home: Path | None, peer_id: str | None, old_id: str | None, reason: str, as_json: bool) -> None:
    """Restart both streams with a store that went back in time (restored from a backup, or a new disk).

    Seals a signed restart record to the store, queues a full reload of what routes to it, and
    supersedes what it never acknowledged; the store sends again what of its own the HO lacks.

    \b
    Example:
      exchange peer restart --home /srv/xchg/ho --peer s001 --reason "restored from Sunday's backup"
    """
    from exchange.node.lock import work_lock
    from exchange.service.restart import restart_store

    node = _node(home)
    peer_id = one_peer(peer_id, old_id)
    with work_lock(node.cfg.home):
        done = restart_store(node, peer_id, reason)
    if as_json:
        _echo_json(done.as_json())
        return
    click.echo(f"restart sealed for {peer_id}: {done.file} (its streams re-based; {peer_id}'s own stream continues "
               f"after seq {done.received_seq})")
    click.echo(f"{counted(done.upserts, 'document')} queued for {peer_id} (a full reload), and "
               f"{counted(done.deletes, 'delete')}; they go with the next sync")
    if done.superseded:
        click.echo(f"superseded: {counted(len(done.superseded), 'bundle')} it never acknowledged "
                   f"(seq {', '.join(map(str, done.superseded))}, now ABANDONED)")
    if done.forked:
        click.echo(f"set aside: {counted(len(done.forked), 'bundle')} it sealed before it went back "
                   f"(seq {', '.join(map(str, done.forked))}, quarantined)")
