"""``exchange keys ...``: the trust store over time: list, rotate, revoke (docs/OPERATIONS.md).

Registered on ``main`` by :mod:`exchange.cli.main`; each command calls one function
of :mod:`exchange.node.keys`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from exchange.errors import ConfigError
from exchange.cli.main import HOME, JSON, _echo_json, _node, main, shown


def _utc(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else "-"


@main.group()
def keys() -> None:
    """Signing keys over time: which are trusted, and revoking a stolen one.

    \b
    Example:
      exchange keys list --home /srv/xchg/ho
    """


@keys.command("list")
@HOME
@JSON
def keys_list(home: Path | None, as_json: bool) -> None:
    """Every key in the trust store with its validity and state (valid, retired, revoked, not-yet-valid).

    \b
    Example:
      exchange keys list --home /srv/xchg/ho --json
    """
    from exchange.node import keys as node_keys, rotation

    node = _node(home)
    states = node_keys.key_states(node.trust, datetime.now(UTC))
    rot = rotation.pending(node.cfg)
    waiting = rotation.unconfirmed(node)
    last = None if rot is None else {"created": rot.created, "old_valid_before": rot.old_valid_before,
                                     "peers": sorted(rot.first_seq), "unconfirmed": waiting}
    if as_json:
        _echo_json({"version": 1, "keys": states, "rotation": last})
        return
    for k in states:
        click.echo(f"{shown(k['principal']):<10} {k['fingerprint']}  {k['state']:<13} "
                   f"from {_utc(k['valid_after'])} until {_utc(k['valid_before'])}"
                   + (f"  ({shown(k['note'])})" if k["note"] else ""))
    if rot is not None:
        click.echo(f"last rotation of {node.id}: {_utc(rot.created)}, old key accepted until "
                   f"{_utc(rot.old_valid_before)}; not yet confirmed by: {', '.join(waiting) or 'none'}")


@keys.command("revoke")
@HOME
@click.option("--peer", "peer_id", required=True, help="The peer whose signing key is revoked (a stolen store).")
@click.option("--at", "at_text", help="Revoke from this time (YYYYMMDD[HHMM[SS]], UTC; default: now). "
                                      "What the key signed before stays verifiable.")
@click.option("--reason", default="", help="Why, kept on the key's line in the trust store (one line).")
def keys_revoke(home: Path | None, peer_id: str, at_text: str | None, reason: str) -> None:
    """Revoke a peer's signing key: files it signs after the revocation time are refused (quarantined).

    \b
    Example:
      exchange keys revoke --home /srv/xchg/ho --peer s014 --reason "PC stolen"
    """
    from exchange.node import keys as node_keys
    from exchange.node.peers import parse_when

    node = _node(home)
    at = parse_when(at_text, "--at") if at_text else datetime.now(UTC).replace(microsecond=0)
    revoked = node_keys.revoke_signer(node.cfg, peer_id, at, reason)
    if not revoked:
        raise ConfigError(f"no key of {peer_id} is valid at {_utc(at)}: nothing revoked",
                          hint="`exchange keys list` shows every key and until when it is valid.")
    for fp in revoked:
        click.echo(f"revoked signing key {fp} of {peer_id} from {_utc(at)}: files it signed before stay verifiable")
    click.echo(f"{peer_id} has no trusted key from then on; once it has new keys: exchange peer add --peer {peer_id} "
               f"--role {node.cfg.peer(peer_id).role} --signing-key ... --recipient ... --replace")


def _duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m`` or ``45s``."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isascii() or not number.isdigit():
        raise ConfigError(f"--overlap {text!r}: give a number and a unit, d, h, m or s (for example 7d)")
    return timedelta(**{units[unit]: int(number)})


@keys.command("rotate")
@HOME
@click.option("--overlap", "overlap_text", default="7d", show_default=True,
              help="How long peers accept the old key next to the new one (d, h, m or s; at most 90d).")
def keys_rotate(home: Path | None, overlap_text: str) -> None:
    """Make new signing and age keys and announce them to every peer in the next bundles (signed by the old key).

    \b
    Example:
      exchange keys rotate --home /srv/xchg/s001 --overlap 7d
    """
    from exchange.node import rotation
    from exchange.wire.crypto import sshsig

    node = _node(home)
    rot = rotation.rotate(node, _duration(overlap_text))
    notice = json.loads(rot.carried["notice"])
    old = sshsig.fingerprint(sshsig.parse_public_line(notice["old_key"]))
    new = sshsig.fingerprint(sshsig.parse_public_line(notice["new_key"]))
    click.echo(f"new signing key {new} and recipient {notice['new_recipient']} of {node.id}, from {_utc(rot.created)}")
    click.echo(f"old signing key {old} accepted by peers until {_utc(rot.old_valid_before)}")
    click.echo(f"announced to {', '.join(sorted(rot.first_seq)) or 'no peer'} with the next sync "
               "(`exchange keys list` shows who has confirmed)")
