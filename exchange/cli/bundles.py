"""``exchange bundle skip``, ``exchange resend`` and ``exchange supersede``: end a stuck bundle, send its
documents again.

Registered on ``main`` by :mod:`exchange.cli.main` (docs/OPERATIONS.md, "A bundle cannot be applied").
"""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from exchange.cli.main import HOME, _node, main, shown
from exchange.errors import ExchangeError


@main.group()
def bundle() -> None:
    """Resolve a received bundle that cannot be applied (FAILED).

    \b
    Example:
      exchange bundle skip s001 42 --reason "bill B8 names a till that no longer exists"
    """


LANE_HELP = ("The lane of the bundle's stream (default: main; `exchange status` shows it). A seq counts "
             "within its lane; a file name given instead of a seq names its lane itself.")


def _named(seq: str, lane: str | None) -> tuple[tuple[str, str] | None, int, str]:
    """((sender, recipient) of the name, seq, lane) from a seq and ``--lane`` (no names: None), or from a
    bundle's file name."""
    from exchange.vocabulary import DEFAULT_LANE
    from exchange.wire.formats import check_lane, parse_name

    if seq.isascii() and seq.isdigit() and int(seq) >= 1:
        return None, int(seq), check_lane(lane or DEFAULT_LANE, "--lane")
    try:
        fn = parse_name(Path(seq).name)
    except ExchangeError:
        raise click.UsageError(f"{seq!r} is neither a seq (1, 2, ...) nor a bundle's file name: copy the file "
                               "name from `exchange status`, or give the seq with --lane") from None
    if fn.kind != "bundle" or (lane is not None and lane != fn.lane):
        raise click.UsageError((f"{seq}: not a bundle of lane {lane}" if lane else f"{seq}: not a bundle")
                               + ": give the bundle's file name alone, or its seq with --lane")
    return (fn.a, fn.b), fn.seq, fn.lane


def _sent(bundle_: str, lane: str | None, peer_id: str) -> tuple[int, str]:
    """(seq, lane) of a bundle sent to ``peer_id``, named by its seq (and ``--lane``) or its file name."""
    names, seq, lane = _named(bundle_, lane)
    if names is not None and names[1] != peer_id:
        raise click.UsageError(f"{bundle_} is a bundle to {names[1]}, not to {peer_id}")
    return seq, lane


@bundle.command("skip")
@click.argument("sender")
@click.argument("seq", required=False)
@click.option("--lane", default=None, help=LANE_HELP)
@click.option("--reason", required=True, help="Why it is skipped: sent to the sender, kept for auditors.")
@click.option("--by", "by", default=None, help="Who decides (default: the login name).")
@HOME
def bundle_skip(sender: str, seq: str | None, lane: str | None, reason: str, by: str | None,
                home: Path | None) -> None:
    """Skip FAILED bundle SEQ from SENDER (or the bundle file named): nothing of it applied, its stream
    (that lane only) moves past it.

    \b
    Example:
      exchange bundle skip --home /srv/xchg/ho s001 42 --reason "fixed at the store, resent"
      exchange bundle skip --home /srv/xchg/s001 ho.s001.masters.0000000007.bundle --reason "reloaded"
    """
    from exchange.node.lock import work_lock
    from exchange.receive.decisions import skip_bundle

    names, number, lane = _named(sender if seq is None else seq, lane)  # no SEQ: SENDER is the file name
    if names is None and seq is None:
        raise click.UsageError("give SENDER and SEQ, or the bundle's file name")
    if names is not None and seq is not None and names[0] != sender:
        raise click.UsageError(f"{seq} is a bundle from {names[0]}, not from {sender}")
    sender = names[0] if names is not None else sender
    node = _node(home)
    with work_lock(node.cfg.home):
        done = skip_bundle(node, sender, number, reason=reason, by=by or getpass.getuser(), lane=lane)
    click.echo(shown(f"{done.file}: SKIPPED - {done.decision.text()}"))
    click.echo(shown(f"archived as {done.archived}; the decision goes back to {sender} with the next sync, "
                     "and later bundles of the stream are applied then"))


@main.command()
@click.option("--peer", "peer_id", required=True, help="The peer the REJECTED bundle went to.")
@click.option("--bundle", "bundle_", required=True, help="The REJECTED bundle's seq, or its file name.")
@click.option("--lane", default=None, help=LANE_HELP)
@HOME
def resend(peer_id: str, bundle_: str, lane: str | None, home: Path | None) -> None:
    """Queue the documents of a REJECTED bundle again, as they are now (after fixing the cause).

    \b
    Example:
      exchange resend --home /srv/xchg/s001 --peer ho --bundle 42
      exchange resend --home /srv/xchg/ho --peer s001 --bundle 7 --lane masters
    """
    from exchange.send.resend import resend_bundle

    seq, lane = _sent(bundle_, lane, peer_id)
    r = resend_bundle(_node(home), peer_id, seq, lane)
    click.echo(f"{r.upserts} documents and {r.deletes} deletes of bundle {seq} queued for {peer_id}; "
               "they go with the next export or sync")
    if r.reload_types:
        click.echo(shown("it may also have carried documents routed to every store, which are not listed per "
                         f"bundle: run `exchange reload --peer {peer_id} "
                         + " ".join(f"--doc {t}" for t in r.reload_types) + "` to send them again"))


@main.command()
@click.option("--peer", "peer_id", required=True, help="The peer the REJECTED bundle went to.")
@click.option("--bundle", "bundle_", required=True, help="The REJECTED bundle's seq, or its file name.")
@click.option("--lane", default=None, help=LANE_HELP)
@click.option("--reason", required=True, help="Why it is superseded: sent to the peer, kept for auditors.")
@click.option("--by", "by", default=None, help="Who decides (default: the login name).")
@HOME
def supersede(peer_id: str, bundle_: str, lane: str | None, reason: str, by: str | None, home: Path | None) -> None:
    """Send a REJECTED bundle's documents again and tell the peer to skip it, with no operator there.

    \b
    Example:
      exchange supersede --home /srv/xchg/s001 --peer ho --bundle 42 --reason "bad price fixed"
    """
    from exchange.send.resend import supersede_bundle

    seq, lane = _sent(bundle_, lane, peer_id)
    r = supersede_bundle(_node(home), peer_id, seq, reason=reason, by=by or getpass.getuser(), lane=lane)
    click.echo(f"{r.upserts} documents and {r.deletes} deletes of bundle {seq} queued for {peer_id}, with the "
               f"notice that bundle {seq} is superseded; {peer_id} skips it when the next bundle arrives")
