"""``exchange bundle skip``, ``exchange resend`` and ``exchange supersede``: end a stuck bundle, send its
documents again.

Registered on ``main`` by :mod:`exchange.cli.main` (docs/OPERATIONS.md, "A bundle cannot be applied").
"""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from exchange.cli.main import HOME, _node, main, shown


@main.group()
def bundle() -> None:
    """Resolve a received bundle that cannot be applied (FAILED).

    \b
    Example:
      exchange bundle skip s001 42 --reason "bill B8 names a till that no longer exists"
    """


@bundle.command("skip")
@click.argument("sender")
@click.argument("seq", type=click.IntRange(1))
@click.option("--reason", required=True, help="Why it is skipped: sent to the sender, kept for auditors.")
@click.option("--by", "by", default=None, help="Who decides (default: the login name).")
@HOME
def bundle_skip(sender: str, seq: int, reason: str, by: str | None, home: Path | None) -> None:
    """Skip FAILED bundle SEQ from SENDER: nothing of it applied, the stream moves past it.

    \b
    Example:
      exchange bundle skip --home /srv/xchg/ho s001 42 --reason "fixed at the store, resent"
    """
    from exchange.node.lock import work_lock
    from exchange.receive.decisions import skip_bundle

    node = _node(home)
    with work_lock(node.cfg.home):
        done = skip_bundle(node, sender, seq, reason=reason, by=by or getpass.getuser())
    click.echo(shown(f"{done.file}: SKIPPED - {done.decision.text()}"))
    click.echo(shown(f"archived as {done.archived}; the decision goes back to {sender} with the next sync, "
                     "and later bundles of the stream are applied then"))


@main.command()
@click.option("--peer", "peer_id", required=True, help="The peer the REJECTED bundle went to.")
@click.option("--bundle", "seq", required=True, type=click.IntRange(1), help="The REJECTED bundle's seq.")
@HOME
def resend(peer_id: str, seq: int, home: Path | None) -> None:
    """Queue the documents of a REJECTED bundle again, as they are now (after fixing the cause).

    \b
    Example:
      exchange resend --home /srv/xchg/s001 --peer ho --bundle 42
    """
    from exchange.send.resend import resend_bundle

    r = resend_bundle(_node(home), peer_id, seq)
    click.echo(f"{r.upserts} documents and {r.deletes} deletes of bundle {seq} queued for {peer_id}; "
               "they go with the next export or sync")
    if r.reload_types:
        click.echo(shown("it may also have carried documents routed to every store, which are not listed per "
                         f"bundle: run `exchange reload --peer {peer_id} "
                         + " ".join(f"--doc {t}" for t in r.reload_types) + "` to send them again"))


@main.command()
@click.option("--peer", "peer_id", required=True, help="The peer the REJECTED bundle went to.")
@click.option("--bundle", "seq", required=True, type=click.IntRange(1), help="The REJECTED bundle's seq.")
@click.option("--reason", required=True, help="Why it is superseded: sent to the peer, kept for auditors.")
@click.option("--by", "by", default=None, help="Who decides (default: the login name).")
@HOME
def supersede(peer_id: str, seq: int, reason: str, by: str | None, home: Path | None) -> None:
    """Send a REJECTED bundle's documents again and tell the peer to skip it, with no operator there.

    \b
    Example:
      exchange supersede --home /srv/xchg/s001 --peer ho --bundle 42 --reason "bad price fixed"
    """
    from exchange.send.resend import supersede_bundle

    r = supersede_bundle(_node(home), peer_id, seq, reason=reason, by=by or getpass.getuser())
    click.echo(f"{r.upserts} documents and {r.deletes} deletes of bundle {seq} queued for {peer_id}, with the "
               f"notice that bundle {seq} is superseded; {peer_id} skips it when the next bundle arrives")
