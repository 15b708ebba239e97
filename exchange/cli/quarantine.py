"""``exchange quarantine ...``: decide about quarantined files: reviewed, or given back to the importer.

Registered on ``main`` by :mod:`exchange.cli.main`; each command calls one function of
:mod:`exchange.receive.quarantined`, under the work lock (an import may be moving files).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from exchange.cli.main import HOME, JSON, REASON, _echo_json, _node, main

if TYPE_CHECKING:
    from exchange.receive.quarantined import Decided
from exchange.vocabulary import counted

FILES = click.argument("files", nargs=-1)
PEER = click.option("--peer", "peer_id", help="Every quarantined file that names this peer as its sender.")


@main.group()
def quarantine() -> None:
    """Quarantined files: mark them reviewed, or give them back to the importer.

    A quarantined file is counted by `exchange status`, the page and `doctor` until a person
    decides about it; nothing deletes it.

    \b
    Example:
      exchange quarantine review --home /srv/xchg/ho --peer s001 --reason "forks the restart superseded"
    """


@quarantine.command("review")
@HOME
@FILES
@PEER
@REASON
@JSON
def quarantine_review(home: Path | None, files: tuple[str, ...], peer_id: str | None, reason: str,
                      as_json: bool) -> None:
    """Mark quarantined files reviewed: moved to quarantine/reviewed/ with the decision, out of every count.

    \b
    Example:
      exchange quarantine review --home /srv/xchg/ho s001.ho.0000000002.bundle --reason "replayed stick"
    """
    from exchange.receive.quarantined import review

    _decide(review, home, files, peer_id, reason, as_json)


@quarantine.command("retry")
@HOME
@FILES
@PEER
@REASON
@JSON
def quarantine_retry(home: Path | None, files: tuple[str, ...], peer_id: str | None, reason: str,
                     as_json: bool) -> None:
    """Give quarantined files back to the inbox: the next import checks each from the start.

    For a file refused for a cause fixed since (a key trusted, a catalog corrected); one that is
    still wrong is quarantined again with its reason.

    \b
    Example:
      exchange quarantine retry --home /srv/xchg/s001 ho.s001.0000000007.bundle --reason "HO key trusted"
    """
    from exchange.receive.quarantined import give_back

    done = _decide(give_back, home, files, peer_id, reason, as_json)
    if done and not as_json:
        click.echo("run `exchange import` (or the next sync) to check them again")


@quarantine.command("reviewed")
@HOME
@JSON
def quarantine_reviewed(home: Path | None, as_json: bool) -> None:
    """The decisions taken about quarantined files, oldest first (who, when, why, what).

    \b
    Example:
      exchange quarantine reviewed --home /srv/xchg/ho
    """
    from exchange.receive.quarantined import reviewed

    found = reviewed(_node(home))
    if as_json:
        _echo_json({"version": 1, "decisions": found})
        return
    if not found:
        click.echo("no decision about a quarantined file yet")
    for d in found:
        dec = d["decision"]
        click.echo(f"{dec.get('at', '')[:19]}  {dec.get('action', ''):<8} {d['file']}  by {dec.get('by', '')}: "
                   f"{dec.get('reason', '')}  (was: {str(d.get('reason', ''))[:80]})")


def _decide(how: Callable[..., list[Decided]], home: Path | None, files: tuple[str, ...], peer_id: str | None,
            reason: str, as_json: bool) -> list[Decided]:
    """One decision about the files named (or ``peer_id``'s), under the work lock; printed or as JSON."""
    from exchange.node.lock import work_lock

    node = _node(home)
    with work_lock(node.cfg.home):
        done = how(node, list(files), reason, peer_id)
    if as_json:
        _echo_json({"version": 1, "files": [d.as_json() for d in done]})
        return done
    for d in done:
        click.echo(f"{d.file}: {d.action} -> {d.now_at}")
    click.echo(f"{counted(len(done), 'file')} {done[0].action if done else 'decided'}; in the operators' journal")
    return done
