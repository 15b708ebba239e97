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
@click.option("--above", type=click.IntRange(0), default=0, show_default=True,
              help="This HO was restored from its own backup: the last seq of its stream the store applied, "
                   "as the store's `exchange doctor` names it; the restart goes above it.")
@JSON
def peer_restart(home: Path | None, peer_id: str | None, old_id: str | None, reason: str, above: int,
                 as_json: bool) -> None:
    """Restart both streams with a store that went back in time (restored from a backup, or a new disk).

    Seals a signed restart record to the store, queues a full reload of what routes to it, and
    supersedes what it never acknowledged; the store sends again what of its own the HO lacks.

    \b
    Example:
      exchange peer restart --home /srv/xchg/ho --peer s001 --reason "restored from Sunday's backup"
      exchange peer restart --home /srv/xchg/ho --peer s001 --above 42 --reason "HO restored"
    """
    from exchange.node.lock import work_lock
    from exchange.service.restart import restart_store

    node = _node(home)
    peer_id = one_peer(peer_id, old_id)
    with work_lock(node.cfg.home):
        done = restart_store(node, peer_id, reason, above=above)
    if as_json:
        _echo_json(done.as_json())
        return
    click.echo(f"restart sealed for {peer_id}: {done.file} (its streams re-based; {peer_id}'s own stream continues "
               f"after seq {done.received_seq})")
    if done.above:
        click.echo(f"this HO went back in time: the restart goes above seq {done.above}, which {peer_id} applied "
                   "(its versions of this HO's documents are forgotten there, its copies of this HO's edits sent "
                   "back)")
    click.echo(f"{counted(done.upserts, 'document')} queued for {peer_id} (a full reload), and "
               f"{counted(done.deletes, 'delete')}; they go with the next sync")
    if done.superseded:
        click.echo(f"superseded: {counted(len(done.superseded), 'bundle')} it never acknowledged "
                   f"(seq {', '.join(map(str, done.superseded))}, now ABANDONED)")
    if done.forked:
        click.echo(f"set aside: {counted(len(done.forked), 'bundle')} it sealed before it went back "
                   f"(seq {', '.join(map(str, done.forked))}, quarantined)")


@peer.command("restarts")
@HOME
@click.option("--peer", "peer_id", help="Only the entries about this peer.")
@JSON
def peer_restarts(home: Path | None, peer_id: str | None, as_json: bool) -> None:
    """Stream restarts and the evidence of peers gone back in time, newest first.

    At the HO: each restart sent (answered once the store sent its restored point) and each store
    seen going back; at a store: each restart applied, with what it acknowledged and sent again.

    \b
    Example:
      exchange peer restarts --home /srv/xchg/ho --peer s001
    """
    from exchange.receive.restart import history

    node = _node(home)
    with node.engine.connect() as conn:
        found = history(conn, peer_id)
    if as_json:
        _echo_json({"version": 1, "restarts": found})
        return
    if not found:
        click.echo("no stream restart, and no peer seen going back in time")
    for e in found:
        d = e["detail"]
        state = {"detected": "OPEN" if e["resolved_at"] is None else "repaired",
                 "sent": "waiting for its answer" if e["resolved_at"] is None else "answered",
                 "applied": "announcing its restored point" if e["resolved_at"] is None else "done"}[e["kind"]]
        what = (d.get("what", "") if e["kind"] == "detected" else
                f"seq {e['seq']} by {d.get('by')}: {d.get('reason')}; its stream continues after seq "
                f"{d.get('received_seq')}")
        if d.get("ho_went_back") or d.get("above"):  # the HO restored from its own backup
            what += (f"; the HO went back (above seq {d.get('ho_went_back') or d.get('above')})" +
                     (f": {d['versions_forgotten']} versions of its documents forgotten, {d['ho_edits_sent_back']} "
                      "of its edits sent back" if "versions_forgotten" in d else ""))
        click.echo(f"{e['at']:%Y-%m-%d %H:%M:%S}  {e['peer']:<8} {e['kind']:<9} {state:<29} {what}")
