"""The ``exchange`` command: click commands only, each calling one library function.

Expected errors (:class:`~exchange.errors.ExchangeError`) print a message and a
hint and exit with the error's code; no traceback. Heavy modules are imported
inside the commands so ``exchange --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from exchange import __version__
from exchange.errors import EXIT_CODES, INTERRUPTED, ExchangeError, outcome_exit_code

HOME = click.option("--home", envvar="EXCHANGE_HOME", type=click.Path(file_okay=False, path_type=Path),
                    help="Node home folder (default: $EXCHANGE_HOME).")
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable, see docs/).")


def shown(text: object) -> str:
    """Text that may come from a peer, for a terminal: control characters escaped, never obeyed."""
    from exchange.logs import escape_controls

    return escape_controls(str(text))


def _fail(exc: ExchangeError) -> NoReturn:
    first, *more = exc.message.split("\n")
    click.secho(f"error: {shown(first)}", fg="red", err=True)
    for line in more:  # continuation lines indented: none can pass for a line of its own
        click.secho(f"  {shown(line)}", fg="red", err=True)
    if exc.hint:
        click.echo(f"hint: {shown(exc.hint)}", err=True)
    sys.exit(exc.exit_code)


class _LazyCommands(click.Group):
    """A group some of whose commands live in their own modules, loaded on first need (start-up stays light)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            _load_command_modules()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load_command_modules()
        return super().list_commands(ctx)


class Group(_LazyCommands):
    """Maps ExchangeError to its exit code at the edge; loads the command modules only when asked.

    ``exchange sync`` (run by cron every few minutes) needs none of the audit,
    usb and ui commands, so their modules are imported only for a name this
    module does not define, or for the command list (``--help``, completion).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ExchangeError as exc:
            _fail(exc)
        except KeyboardInterrupt:  # Ctrl-C: every step is resumable, so say so instead of a traceback
            click.echo("\ninterrupted: nothing is lost; running the same command again is safe "
                       "(it picks up where this one stopped)", err=True)
            sys.exit(INTERRUPTED)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:
            args = place_global_options(self, ctx, args)
        return super().parse_args(ctx, args)



#: ``exchange``'s own options, also accepted after the command (``exchange sync --home H -v``).
_GROUP_FLAGS = ("--verbose", "--log-json")
#: The commands' options, also accepted before the command (``exchange --home H --json status sent``).
_COMMAND_VALUE_OPTIONS = ("--home",)
_COMMAND_FLAGS = ("--json",)


def _is_verbose(token: str) -> bool:
    return token in _GROUP_FLAGS or (len(token) > 1 and token[0] == "-" and set(token[1:]) == {"v"})


def place_global_options(group: click.Group, ctx: click.Context, args: list[str]) -> list[str]:
    """``args`` with the global options where click expects them: ``-v``/``--log-json`` before the
    command, ``--home``/``--json`` after the command's name. Option values (``--label -v``) and
    what follows ``--`` are never moved; an option the command does not have is left for click to refuse."""
    front: list[str] = []
    moved: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        token = args[i]
        if token in _COMMAND_VALUE_OPTIONS and i + 1 < len(args):
            moved += args[i:i + 2]
            i += 2
            continue
        if token in _COMMAND_FLAGS or token.split("=", 1)[0] in _COMMAND_VALUE_OPTIONS:
            moved.append(token)
        else:
            front.append(token)
        i += 1
    if i >= len(args) or args[i] == "--":
        return args
    cmd: click.Command | None = group
    path_end = i
    while isinstance(cmd, click.Group) and path_end < len(args) and not args[path_end].startswith("-"):
        cmd = cmd.get_command(ctx, args[path_end])
        path_end += 1
    if cmd is None:
        return args
    takes_value = {o for p in cmd.params if isinstance(p, click.Option) and not p.is_flag and not p.count
                   for o in (*p.opts, *p.secondary_opts)}
    own = {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
    rest: list[str] = []
    k = path_end
    while k < len(args):
        token = args[k]
        if token == "--":
            rest += args[k:]
            break
        if token in takes_value:
            rest += args[k:k + 2]
            k += 2
            continue
        if _is_verbose(token) and token not in own:
            front.append(token)
        else:
            rest.append(token)
        k += 1
    return [*front, *args[i:path_end], *moved, *rest]


def peer_id_option(help_text: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``--peer ID``: the one spelling of a peer's node id; ``--id`` (the old one) still works, hidden."""
    def deco(f: Callable[..., None]) -> Callable[..., None]:
        f = click.option("--id", "old_id", hidden=True, help="Old spelling of --peer.")(f)
        return click.option("--peer", "peer_id", metavar="ID", help=help_text + " Required.")(f)
    return deco


def one_peer(peer_id: str | None, old_id: str | None) -> str:
    """The id given as ``--peer`` (or the old ``--id``); a usage error when neither or two different."""
    if peer_id and old_id and peer_id != old_id:
        raise click.UsageError(f"--peer {peer_id} and --id {old_id} name different peers: give --peer only")
    got = peer_id or old_id
    if not got:
        raise click.UsageError("Missing option '--peer'.")
    return got


PEERS = click.option("--peer", "peers", multiple=True, metavar="PEER|GROUP|all",
                     help="A peer id, a store group or all (repeatable).")


def resolve_peers(node: Any, wanted: tuple[str, ...]) -> list[str]:
    """Peer ids for ``--peer`` values: an id, a store group (its stores) or ``all`` (every peer)."""
    from exchange.errors import ConfigError

    peers = node.cfg.peers
    out: list[str] = []
    for w in wanted:
        found = (sorted(peers) if w == "all" else [w] if w in peers
                 else sorted(p.id for p in peers.values() if w in p.groups))
        if not found:
            groups = sorted({g for p in peers.values() for g in p.groups})
            raise ConfigError(f"{w!r} is neither a peer nor a store group of {node.id}",
                              hint=f"Peers: {', '.join(sorted(peers)) or 'none'}; groups: "
                                   f"{', '.join(groups) or 'none'}; or all.")
        out += [p for p in found if p not in out]
    return out


def _node(home: Path | None) -> Any:
    from exchange.node.home import Node

    return Node.open(home)


def _reporter(quiet: bool) -> Any:
    from exchange.progress import NullReporter

    if quiet or not sys.stderr.isatty():
        return NullReporter()
    from exchange.cli.console import RichReporter

    return RichReporter()


def _address(text: str) -> str:
    """A transport address; a plain folder path means the folder transport."""
    return text if "://" in text or text.split(":", 1)[0] in ("dir", "drop") else f"dir:{text}"


def _transport_address(value: str | None) -> str | None:
    """``--transport`` as entered, refused now (exit 2, naming it and the accepted forms) if no transport opens it."""
    if value is None:
        return None
    from exchange.errors import ConfigError
    from exchange.transport import check_address

    try:
        return check_address(value)
    except ConfigError as exc:
        raise click.BadParameter(f"{exc.message}. {exc.hint}") from exc


def _json_value(value: Any) -> Any:
    """What json cannot write: a time as RFC 3339 with its offset, anything else as text."""
    from datetime import datetime

    from exchange.service.words import rfc3339

    return rfc3339(value) if isinstance(value, datetime) else str(value)


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=1, default=_json_value))


def _epilog() -> str:
    """The main help's tail: global options, examples and the exit statuses (errors.EXIT_CODES)."""
    codes = "\n".join(f"  {code:>2}  {text}" for code, text in EXIT_CODES.items())
    return ("-v, --json and --home may go before or after the command; EXCHANGE_HOME can replace --home.\n\n"
            "\b\nExamples:\n  exchange sync --home /srv/xchg/s001\n  exchange status received -v --home /srv/xchg/s001\n"
            "  exchange --home /srv/xchg/ho --json status sent\n\n"
            f"\b\nExit status (also in docs/SERVICE.md):\n{codes}")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@click.version_option(__version__, prog_name="exchange")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--log-json", is_flag=True, help="Log JSON lines (for services).")
@click.pass_context
def main(ctx: click.Context, verbose: int, log_json: bool) -> None:
    """Move business data between a head office and its stores as signed, encrypted bundles.

    A sync, import or stick visit that quarantined a file, left a bundle FAILED or HELD, or got a
    REJECTED ack exits non-zero although it ran to its end: cron and systemd see it.
    """
    from exchange.logs import setup_logging

    ctx.obj = {"verbose": verbose, "log_json": log_json}
    if ctx.invoked_subcommand != "run":
        setup_logging(verbose, log_json)


# ---------------------------------------------------------------- node and keys

@main.command()
@HOME
@click.option("--node", "node_id", required=True, help="This node's id, e.g. ho or s001.")
@click.option("--role", type=click.Choice(["ho", "store"]), required=True,
              help="ho: the head office; store: one store.")
@click.option("--database", help="SQLAlchemy URL (default: SQLite in the home).")
def init(home: Path | None, node_id: str, role: str, database: str | None) -> None:
    """Create a node home with keys, trust store, database and spool folders.

    \b
    Example:
      exchange init --home /srv/xchg/s001 --node s001 --role store
    """
    from exchange.node.config import resolve_home
    from exchange.node.home import init_home

    cfg = init_home(resolve_home(home), node_id, "ho" if role == "ho" else "store", database)
    click.echo(f"created node {cfg.id} ({cfg.role}) in {cfg.home}")
    click.echo("give your peers the output of: exchange identity --home " + str(cfg.home))


@main.command()
@HOME
@JSON
def identity(home: Path | None, as_json: bool) -> None:
    """Print this node's public identity, for a peer to paste into `peer add`.

    \b
    Example:
      exchange identity --home /srv/xchg/s001
    """
    from exchange.node import keys

    cfg = _node(home).cfg
    ident = {"id": cfg.id, "role": cfg.role, "signing_key": keys.public_signing_line(cfg),
             "recipient": keys.recipient(cfg)}
    if as_json:
        _echo_json(ident)
        return
    click.echo(f"node:        {cfg.id} ({cfg.role})")
    click.echo(f"signing key: {ident['signing_key']}")
    click.echo(f"recipient:   {ident['recipient']}")
    click.echo("\non the peer, run:\n  exchange peer add --peer {} --role {} --signing-key \"{}\" --recipient {}".format(
        cfg.id, cfg.role, ident["signing_key"], ident["recipient"]))


class _PeerGroup(_LazyCommands):
    """``peer``: some of its commands live in their own modules (``peer restart``, cli/restart.py)."""


@main.group(cls=_PeerGroup)
def peer() -> None:
    """Peers this node exchanges with.

    \b
    Example:
      exchange peer list --home /srv/xchg/ho
    """


@peer.command("add")
@HOME
@peer_id_option("The peer's node id, as its `exchange identity` prints it.")
@click.option("--role", type=click.Choice(["ho", "store"]), required=True,
              help="The peer's role; a store's only peer is its HO.")
@click.option("--signing-key", required=True, help='"ssh-ed25519 AAAA..." from the peer\'s `exchange identity`.')
@click.option("--recipient", required=True, help="age1... from the peer's `exchange identity`.")
@click.option("--transport", callback=lambda _c, _p, v: _transport_address(v),
              help="dir:/path, drop:/path or sftp://user@host:port/root (checked now).")
@click.option("--group", "groups", multiple=True, help="Store group (repeatable).")
@click.option("--valid-after", help="Key valid from (YYYYMMDD[HHMM[SS]]Z), for key rotation.")
@click.option("--valid-before", help="Key valid until, for key rotation.")
@click.option("--replace", is_flag=True,
              help="Change an existing peer's keys: the old signing key stays valid only for what it signed before now.")
def peer_add(home: Path | None, peer_id: str | None, old_id: str | None, role: str, signing_key: str, recipient: str,
             transport: str | None, groups: tuple[str, ...], valid_after: str | None,
             valid_before: str | None, replace: bool) -> None:
    """Pin a peer's signing key and age recipient (an existing peer's keys change only with --replace).

    \b
    Example (the keys as `exchange identity` prints them on the peer):
      exchange peer add --home /srv/xchg/ho --peer s001 --role store --group north
          --signing-key "ssh-ed25519 AAAA..." --recipient age1...
    """
    from exchange.node.peers import add_peer

    peer_id = one_peer(peer_id, old_id)
    node = _node(home)
    done = add_peer(node.cfg, peer_id, role, signing_key, recipient, transport, groups,
                    valid_after, valid_before, replace=replace)
    from exchange.service.words import local_time

    when = local_time(done.at) if done.at else ""
    for fp in done.retired:
        click.echo(f"retired signing key {fp} of {peer_id}: valid only for files signed before {when}")
    if done.old_recipient:
        click.echo(f"replaced recipient {done.old_recipient} of {peer_id}")
    click.echo(f"peer {peer_id} {'updated' if done.existed else 'added'}; trusted: {done.line}")
    _rerouted(node, peer_id)


def _rerouted(node: Any, peer_id: str) -> None:
    """Queue a store's group- and column-routed documents as its routing now stands, and say so."""
    from exchange.send.export import reroute_peer

    q = reroute_peer(node, peer_id)
    if q.total:
        from exchange.service.words import counted

        click.echo(f"{counted(q.upserts, 'document')} queued for {peer_id} and {counted(q.deletes, 'delete')} of "
                   "documents no longer routed to it; they go with the next export or sync")


@peer.command("set-group")
@HOME
@peer_id_option("The store to move.")
@click.option("--group", "groups", multiple=True, required=True,
              help="The store's group from now on (repeatable); replaces the groups it had.")
def peer_set_group(home: Path | None, peer_id: str | None, old_id: str | None, groups: tuple[str, ...]) -> None:
    """Move a store to other groups: its new groups' documents are queued, the old ones' deleted there.

    \b
    Example:
      exchange peer set-group --home /srv/xchg/ho --peer s001 --group south
    """
    from exchange.node.peers import set_groups

    peer_id = one_peer(peer_id, old_id)
    node = _node(home)
    was = set_groups(node.cfg, peer_id, groups)
    click.echo(f"{peer_id}: groups {', '.join(node.cfg.peer(peer_id).groups)} (were {', '.join(was) or 'none'})")
    _rerouted(node, peer_id)


@peer.command("list")
@HOME
@JSON
def peer_list(home: Path | None, as_json: bool) -> None:
    """List peers with their pinned keys.

    \b
    Example:
      exchange peer list --home /srv/xchg/ho --json
    """
    from exchange.node.peers import list_peers

    rows = list_peers(_node(home).cfg)
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        state = "" if r["state"] == "active" else f"  [{r['state'].upper()} since {r['state_since']}: {r['state_reason']}]"
        click.echo(f"{r['id']:<12} {r['role']:<6} {r['transport'] or '-':<40} {r['fingerprints']}{state}")


REASON = click.option("--reason", required=True, help="Why, in a few words: kept in the operators' journal.")


@peer.command("pause")
@HOME
@peer_id_option("The peer to pause.")
@REASON
def peer_pause(home: Path | None, peer_id: str | None, old_id: str | None, reason: str) -> None:
    """Stop exchanging with a peer (a store closed for a refit); its documents keep queueing for it.

    \b
    Example:
      exchange peer pause --peer s014 --reason "closed for refit until 12 Jan"
    """
    from exchange.service.peer_life import pause

    p = pause(_node(home), one_peer(peer_id, old_id), reason)
    click.echo(f"{p.id} paused since {p.state_since}: nothing is sent to it or fetched from it; documents for it "
               f"keep queueing. Resume with `exchange peer resume --peer {p.id}`.")


@peer.command("resume")
@HOME
@peer_id_option("The paused peer.")
@click.option("--reason", help="Why, in a few words: kept in the operators' journal.")
def peer_resume(home: Path | None, peer_id: str | None, old_id: str | None, reason: str | None) -> None:
    """Exchange with a paused peer again; what queued up goes with the next sync.

    \b
    Example:
      exchange peer resume --peer s014
    """
    from exchange.service.peer_life import resume

    peer_id = one_peer(peer_id, old_id)
    left = resume(_node(home), peer_id, reason)
    click.echo(f"{peer_id} resumed; waiting for the next sync: {left.describe()}")


@peer.command("remove")
@HOME
@peer_id_option("The peer to retire.")
@click.option("--drain", "mode", flag_value="drain", default=True,
              help="Refuse while anything is still on the way to or from it (the default).")
@click.option("--abandon", "mode", flag_value="abandon",
              help="Give up what is still on the way (marked ABANDONED, on record in the journal).")
@REASON
def peer_remove(home: Path | None, peer_id: str | None, old_id: str | None, mode: str, reason: str) -> None:
    """Retire a peer: nothing more is routed to it, its keys are retired, its history stays verifiable.

    \b
    Example:
      exchange peer remove --peer s014 --reason "store closed 2026-12-31"
    """
    from exchange.service.peer_life import remove

    peer_id = one_peer(peer_id, old_id)
    done = remove(_node(home), peer_id, "abandon" if mode == "abandon" else "drain", reason)
    for fp in done.retired_keys:
        click.echo(f"retired signing key {fp} of {peer_id}: valid only for files signed before now")
    if not done.abandoned.empty:
        click.echo(f"abandoned: {done.abandoned.describe()} (status ABANDONED)")
    click.echo(f"{peer_id} removed: nothing more is routed to it; its bundles stay in the archive, verifiable")


@main.command()
@HOME
@click.option("--peer", "peer_id", help="Only the entries about this peer.")
@click.option("--limit", default=200, show_default=True, help="How many of the newest entries.")
@JSON
def journal(home: Path | None, peer_id: str | None, limit: int, as_json: bool) -> None:
    """The operators' journal: who paused, resumed or removed a peer, when and why (newest first).

    \b
    Example:
      exchange journal --peer s014
    """
    from exchange.database.journal import entries

    node = _node(home)
    with node.engine.connect() as conn:
        got = entries(conn, peer_id, limit)
    if as_json:
        _echo_json([e.as_json() for e in got])
        return
    if not got:
        click.echo("the journal is empty")
    for e in got:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(e.detail.items()) if v not in (None, [], 0, False))
        click.echo(f"{e.as_json()['at']}  {e.actor}  {e.action} {e.peer or ''}  {shown(detail)}")


# ---------------------------------------------------------------- files

def _read_only(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``check()``; a bad file's error without the importer's hint (verify and inspect move nothing)."""
    from exchange.errors import BundleError

    try:
        return check()
    except BundleError as exc:
        if exc.hint is BundleError.hint:  # "set aside in quarantine/": true of an import only
            exc.hint = ("Nothing was moved: this command only reads the file. If it came from a peer, "
                        "ask the sender to send it again.")
        raise


def _trust_for(home: Path | None, trust: Path | None) -> Any:
    from exchange.wire.crypto import sshsig

    if trust:
        return sshsig.AllowedSigners.load(trust)
    if home is not None:
        return _node(home).trust
    return None


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@HOME
@click.option("--trust", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="allowed_signers file (default: the node home's).")
@click.option("--identity", "identity_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="age identity to decrypt with and print a sample of rows.")
@JSON
def inspect(file: Path, home: Path | None, trust: Path | None, identity_file: Path | None, as_json: bool) -> None:
    """Show a bundle's or ack's manifest, signature, stream position and tables.

    \b
    Example:
      exchange inspect ho.s001.0000000001.bundle --home /srv/xchg/ho
    """
    from exchange.audit.inspect import describe
    from exchange.node.keys import load_identity_file

    node = _node(home) if home is not None and trust is None and not identity_file else None
    ids = load_identity_file(identity_file) if identity_file else (node.identities if node else [])
    info = _read_only(lambda: describe(file, trust=_trust_for(home, trust), identities=ids, sent_by=node.id if node else None))
    if as_json:
        _echo_json(info)
        return
    from exchange.cli.console import print_inspect

    print_inspect(info)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@HOME
@click.option("--trust", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="allowed_signers file (default: the node home's).")
@click.option("--identity", "identity_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="age identity: also decrypt the payload and check every inner file.")
def verify(file: Path, home: Path | None, trust: Path | None, identity_file: Path | None) -> None:
    """Exit 0 only for an authentic, intact file; otherwise name the first problem.

    \b
    Example:
      exchange verify s001.ho.0000000007.bundle --home /srv/xchg/ho
    """
    from exchange.audit.inspect import describe
    from exchange.node.keys import load_identity_file

    t = _trust_for(home, trust)
    if t is None:
        raise ExchangeError("no trust store", hint="Pass --home or --trust allowed_signers.")
    node = _node(home) if home is not None and trust is None and not identity_file else None
    ids = load_identity_file(identity_file) if identity_file else (node.identities if node else [])
    info = _read_only(lambda: describe(file, trust=t, identities=ids, sent_by=node.id if node else None))
    click.echo(shown(f"OK {file.name}: {info['signature']}; {info.get('payload', info.get('result', ''))}"))


# ---------------------------------------------------------------- engine

@main.command("import")
@HOME
@click.option("--dry-run", "dry_run", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Run every check on FILE and report what would change, changing nothing.")
@JSON
def import_(home: Path | None, dry_run: Path | None, as_json: bool) -> None:
    """Apply the bundles and acks waiting in the inbox, in stream order.

    \b
    Examples:
      exchange import --home /srv/xchg/s001
      exchange import --home /srv/xchg/s001 --dry-run inbox/ho.s001.0000000003.bundle
    """
    from dataclasses import asdict

    from exchange.node.lock import work_lock
    from exchange.receive.importer import import_file, import_inbox
    from exchange.service.words import applied_text

    node = _node(home)
    with work_lock(node.cfg.home):
        if dry_run:
            outs = [import_file(node, dry_run, dry_run=True)]
        else:
            outs = import_inbox(node, reporter=_reporter(as_json))
    if as_json:
        _echo_json([asdict(o) for o in outs])
        _exit_for(outs, [], [])
        return
    for o in outs:
        click.echo(shown(f"{o.file}: {o.status}{' - ' + o.reason if o.reason else ''}"))
        for t, a in o.applied.items():
            click.echo(shown(f"    {t}: {applied_text(a)}"))
    if not outs:
        click.echo("inbox is empty")
    if dry_run:  # the statuses above say what an import would do
        click.echo("dry run: nothing was applied, moved, quarantined or acknowledged")
    _exit_for(outs, [], [])


@main.command()
@HOME
@JSON
def export(home: Path | None, as_json: bool) -> None:
    """Seal pending documents into bundles in the outbox.

    \b
    Example:
      exchange export --home /srv/xchg/s001
    """
    from dataclasses import asdict

    from exchange.node.lock import work_lock
    from exchange.send.export import export_all

    node = _node(home)
    with work_lock(node.cfg.home):
        out = export_all(node, reporter=_reporter(as_json))
    if as_json:
        _echo_json([asdict(e) for e in out])
        return
    for e in out:
        click.echo(f"{e.file}: {e.documents} documents")
    if not out:
        click.echo("nothing pending")


@main.command()
@HOME
@click.option("--to", "target", required=True, help="Folder (USB stick, share) to deliver to.")
def push(home: Path | None, target: str) -> None:
    """Copy outbox files to a folder, one sub-folder per recipient.

    \b
    Example:
      exchange push --home /srv/xchg/ho --to /media/STICK
    """
    _move_files(home, "push", target)


@main.command()
@HOME
@click.option("--from", "source", required=True, help="Folder (USB stick, share) to take files from.")
def pull(home: Path | None, source: str) -> None:
    """Take the files addressed to this node from a folder into the inbox.

    \b
    Example:
      exchange pull --home /srv/xchg/s001 --from /media/STICK
    """
    _move_files(home, "pull", source)


def _move_files(home: Path | None, step: str, where: str) -> None:
    """One push or pull to a folder given on the command line, under the work lock; exit 30 on errors."""
    from exchange.node.lock import work_lock
    from exchange.service import sync

    node = _node(home)
    rep = sync.SyncReport()
    with work_lock(node.cfg.home):
        if step == "push":
            sync.push(node, target=_address(where), report=rep)
        else:
            sync.pull(node, source=_address(where), report=rep)
    moved = rep.pushed if step == "push" else rep.pulled
    click.echo(shown(f"{step}ed {len(moved)} files" + (f"; errors: {rep.errors}" if rep.errors else "")))
    _exit_for([], rep.failures, rep.errors)


def _exit_for(outcomes: list[Any], failures: list[Exception], errors: list[str]) -> None:
    """Exit non-zero (see `exchange --help`) when a file or a transfer went wrong, though the run finished.

    ``errors`` beyond ``failures`` (an entry that is not a regular file, refused) count as transport (30)."""
    code = outcome_exit_code((o.status for o in outcomes), failures, other_errors=len(errors) > len(failures))
    if code:
        sys.exit(code)


@main.command()
@HOME
@click.option("--via", help="Use this folder/address for every peer instead of the configured ones.")
@JSON
def sync(home: Path | None, via: str | None, as_json: bool) -> None:
    """One sync cycle: pull, import, export, push (receive first, then send).

    \b
    Example:
      exchange sync --home /srv/xchg/s001 || echo "exit $?: see exchange --help"
    """
    from exchange.service.sync import sync as do_sync

    node = _node(home)
    rep = do_sync(node, via=_address(via) if via else None, reporter=_reporter(as_json))
    if as_json:
        _echo_json({"pulled": rep.pulled, "imported": [o.__dict__ for o in rep.imported],
                    "exported": [e.__dict__ for e in rep.exported], "pushed": rep.pushed,
                    "resent": rep.resent, "errors": rep.errors})
    else:
        click.echo(shown(f"sync {node.id}: {rep.line()}"))
        for e in rep.errors:
            click.secho(f"  {shown(e)}", fg="yellow")
    _exit_for(rep.imported, rep.failures, rep.errors)


@main.command()
@HOME
def retry(home: Path | None) -> None:
    """Retry FAILED bundles and parked documents; exits 21 while a bundle is still FAILED.

    \b
    Example:
      exchange retry --home /srv/xchg/s001
    """
    from exchange.node.lock import work_lock
    from exchange.receive.retry import retry as retry_all

    node = _node(home)
    with work_lock(node.cfg.home):
        result = retry_all(node)
    for line in result.lines():
        click.echo(shown(line))
    if result.failed:  # the stream still waits: say so by the exit code (21), with the command that resolves it
        from exchange.receive.decisions import failed_error

        raise failed_error(result.failed)
    _exit_for(result.outcomes, [], [])


@main.command()
@HOME
@click.option("--peer", "peers", multiple=True, required=True, metavar="PEER|GROUP|all",
              help="The peer to send the documents to: an id, a store group or all (repeatable).")
@click.option("--doc", "docs", multiple=True, required=True, help="Document type (repeatable).")
def reload(home: Path | None, peers: tuple[str, ...], docs: tuple[str, ...]) -> None:
    """Queue the full current state of document types for a peer (new or repaired store).

    \b
    Example:
      exchange reload --home /srv/xchg/ho --peer s001 --doc item
    """
    from exchange.send.export import requeue

    from exchange.service.words import counted

    node = _node(home)
    for peer_id in resolve_peers(node, peers):
        q = requeue(node, peer_id, docs, everything=True)
        click.echo(f"{counted(q.upserts, 'document')} queued for {peer_id}"
                   + (f", and {counted(q.deletes, 'delete')} of documents no longer routed to it" if q.deletes else "")
                   + "; they go with the next export or sync")


@main.command()
@click.argument("view", type=click.Choice(["sent", "received", "parked", "conflicts"]))
@HOME
@PEERS
@JSON
def status(view: str, home: Path | None, peers: tuple[str, ...], as_json: bool) -> None:
    """The Sent or Received view (and parked documents), or the conflicts of documents edited on both sides.

    Readable at 80 columns and when piped.

    Times are local with their zone (the date only when not today); --json gives RFC 3339 times.

    \b
    Examples:
      exchange status received --home /srv/xchg/s001
      exchange status sent --home /srv/xchg/ho --peer north --json
      exchange status conflicts --home /srv/xchg/ho
    """
    import shutil

    from exchange.service import status as st
    from exchange.service.status_text import status_lines

    node = _node(home)
    if view == "conflicts":
        if as_json:
            _echo_json(st.conflicts(node))
        else:
            click.echo(shown(st.conflicts_text(node)))
        return
    rows = st.sent(node) if view == "sent" else st.received(node) if view == "received" else []
    parked = st.parked(node) if view in ("received", "parked") else None
    if peers:
        only = set(resolve_peers(node, peers))
        rows = [r for r in rows if r.peer in only]
        parked = None if parked is None else [p for p in parked if p.peer in only]
    aside = st.set_aside(node) if view == "sent" else None
    if as_json:
        _echo_json({**st.as_json(rows, parked), **({"set_aside": aside} if aside else {})})
        return
    width = shutil.get_terminal_size((80, 24)).columns
    for line in status_lines(node.id, view, rows, parked, width=width):
        click.echo(line)
    if aside:
        from exchange.vocabulary import counted

        click.echo(shown(f"{counted(len(aside), 'document')} set aside, not sent (`exchange set-aside list`): "
                         f"{aside[0]['reason']}"), err=True)
    if view == "received":  # (the sent view of a SQLite home stays without SQLAlchemy: docs/PERFORMANCE.md)
        from exchange.service.peerclock import warnings

        for line in warnings(node):
            click.echo(shown(f"clock: {line}"), err=True)
        from exchange.cli.catalog import kept_line

        kept = kept_line(node)
        if kept:  # values of columns this node does not have yet (schema evolution)
            click.echo(kept)
        n_q = sum(1 for r in rows if r.status == "QUARANTINED")
        if n_q:  # counted everywhere until a person decides (exchange.receive.quarantined)
            from exchange.vocabulary import counted

            click.echo(shown(f"{counted(n_q, 'file')} quarantined: once understood, `exchange quarantine review "
                             "FILE --reason TEXT` (or `retry` to import it again; docs/OPERATIONS.md)"), err=True)
    from exchange.transport.usb_last import last_usb_result

    last = last_usb_result(node)
    if last:
        from exchange.service.words import local_time

        click.echo(shown(f"last stick visit {local_time(last.get('finished'))}: "
                         f"{'ok' if last.get('ok') else 'NOT FINISHED'} - {last.get('summary')}"))


@main.group()
def triggers() -> None:
    """Database triggers that capture changes of an existing POS.

    \b
    Example:
      exchange triggers install --home /srv/xchg/s001
    """


@triggers.command("install")
@HOME
@click.option("--snapshot/--no-snapshot", default=None,
              help="Also queue every document already in the tables, to be sent at the next sync "
                   "(default: only when the triggers were not installed yet).")
def triggers_install(home: Path | None, snapshot: bool | None) -> None:
    """Install capture triggers on the tables of the document types this node owns.

    The first install also queues the documents already there (a snapshot), so
    the peers receive the rows from before the triggers too.

    \b
    Example:
      exchange triggers install --home /srv/xchg/s001
      exchange triggers install --home /srv/xchg/s001 --no-snapshot
    """
    from exchange.database.capture import install_triggers, snapshot_events, triggers_installed

    node = _node(home)
    with node.engine.connect() as conn:
        take = snapshot if snapshot is not None else not triggers_installed(conn, node.catalog, node.cfg.role)
        names = install_triggers(conn, node.catalog, node.cfg.role)
        counts = snapshot_events(conn, node.catalog, node.cfg.role) if take else {}
        conn.commit()
    click.echo(f"installed {len(names)} triggers")
    if take:
        from exchange.service.words import counted, documents_text

        total = counted(sum(counts.values()), "document")
        click.echo(f"snapshot: {total} already there queued to send at the next sync"
                   + (f" ({documents_text(counts)})" if counts else ""))


@main.command()
@click.option("--home", "home", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Folder for the demo's HO and stores.")
@click.option("--items", default=200, show_default=True, help="Items in the HO's item master.")
@click.option("--sales", default=50, show_default=True, help="Sales bills per store.")
@click.option("--fresh/--keep", default=True, help="Start from an empty folder.")
def demo(home: Path, items: int, sales: int, fresh: bool) -> None:
    """Run an HO and two stores through a full exchange via a folder.

    \b
    Example:
      exchange demo --home /tmp/demo --items 50 --sales 10
    """
    from exchange.demo.run import run_demo

    if not run_demo(home, items=items, sales=sales, fresh=fresh, echo=click.echo):
        sys.exit(1)
    import shutil

    from exchange.demo.run import next_steps

    venv = Path(sys.prefix) if sys.prefix != sys.base_prefix else None  # tools/demo.sh: .venv
    found = shutil.which("exchange")  # the reader's shell finds this one (or another, or none)
    on_path = found is not None and (venv is None or Path(found).resolve() == (venv / "bin" / "exchange").resolve())
    for line in next_steps(home, venv=venv, on_path=on_path, cwd=Path.cwd()):
        click.echo(line)


# ---------------------------------------------------------------- service and checks

@main.command()
@HOME
@click.option("--interval", type=float, help="Seconds between sync cycles (default: sync_interval, 900).")
@click.option("--ui-port", type=click.IntRange(0, 65535),
              help="Serve the Data Exchange page on this port (default: [ui] port; off).")
@click.option("--ui-host", default=None, help="Address for the page (default 127.0.0.1; elsewhere needs a token).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus /metrics on 127.0.0.1 at this port (default: [metrics] port; off).")
@click.option("--usb/--no-usb", "watch_usb", default=None,
              help="Watch mount roots for a transfer stick (default: on when [usb] is configured or no transport).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Importer processes: streams apply in parallel, each stream in order.")
@click.pass_obj
def run(obj: dict[str, Any], home: Path | None, interval: float | None, ui_port: int | None,
        ui_host: str | None, metrics_port: int | None, watch_usb: bool | None, workers: int) -> None:
    """Run the service: apply files as they land, sync on a schedule.

    \b
    Example:
      exchange run --home /srv/xchg/ho --ui-port 8080 --workers 2
    """
    from exchange.logs import setup_logging
    from exchange.service.daemon import Service, install_signal_handlers

    setup_logging(max(1, obj["verbose"]), obj["log_json"])  # every state change is a log line
    node = _node(home)
    service = Service(node, interval=interval)
    ui_cfg = node.cfg.extra.get("ui", {})
    port = ui_port if ui_port is not None else ui_cfg.get("port")
    if port:
        from exchange.service.ui.server import UiAddon

        service.addons.append(UiAddon(host=ui_host or ui_cfg.get("host", "127.0.0.1"), port=int(port)))
    from exchange.service.metrics_http import MetricsAddon, wanted_port

    m_port = wanted_port(node, metrics_port)
    if m_port:
        service.addons.append(MetricsAddon(m_port))
    usb_cfg = node.cfg.extra.get("usb", {})
    if watch_usb or (watch_usb is None and (usb_cfg or not any(p.transport for p in node.cfg.peers.values()))):
        from exchange.transport.usb import UsbAddon

        service.addons.append(UsbAddon(roots=usb_cfg.get("roots")))
    if workers > 1:
        from exchange.receive.workers import WorkersAddon

        service.addons.append(WorkersAddon(workers - 1, log_json=obj["log_json"], verbose=obj["verbose"]))
    install_signal_handlers(service)
    service.run()


@main.command()
@HOME
@click.option("--poll", type=float, default=0.2, show_default=True, help="Seconds between inbox scans.")
@click.pass_obj
def worker(obj: dict[str, Any], home: Path | None, poll: float) -> None:
    """An import-only worker (extra process or host sharing the database and the drop).

    \b
    Example:
      exchange worker --home /srv/xchg/ho
    """
    import signal
    import threading

    from exchange.logs import setup_logging
    from exchange.receive.workers import worker_loop

    setup_logging(max(1, obj["verbose"]), obj["log_json"])
    node = _node(home)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker_loop(node.cfg.home, stop, poll)


@main.command()
@HOME
@JSON
@click.option("--key-warn-days", type=click.IntRange(0, 3650), default=None,
              help="Warn this many days ahead of a key's end of validity (default: [keys] warn_days, 14).")
def doctor(home: Path | None, as_json: bool, key_warn_days: int | None) -> None:
    """Check the node's prerequisites; exit 0 only when all pass.

    \b
    Example:
      exchange doctor --home /srv/xchg/s001
    """
    from exchange.node.home import Node
    from exchange.service.doctor import as_json as checks_json, run_checks

    checks = run_checks(Node.open(home, check_modes=False), key_warn_days)  # modes are among the checks
    if as_json:
        click.echo(checks_json(checks))
    else:
        for c in checks:
            mark = click.style("OK  ", fg="green") if c.ok else click.style("FAIL", fg="red")
            click.echo(f"{mark} {c.name:<18} {shown(c.detail)}")
            if not c.ok and c.fix:
                click.echo(f"     fix: {shown(c.fix)}")
    if not all(c.ok for c in checks):
        sys.exit(1)


@main.command()
@HOME
def migrate(home: Path | None) -> None:
    """Create or upgrade exchange's tables in the node database.

    \b
    Example:
      exchange migrate --home /srv/xchg/ho
    """
    node = _node(home)
    n = node.migrate()
    click.echo(f"database up to date ({n} migration steps run)")
    from exchange.cli.catalog import apply_kept_after_migrate

    apply_kept_after_migrate(node)


@peer.command("trust-host")
@HOME
@click.option("--address", required=True, help="sftp://user@host:port/path")
@click.option("--fingerprint", help="Expected SHA256:... fingerprint (refuse if different).")
def peer_trust_host(home: Path | None, address: str, fingerprint: str | None) -> None:
    """Pin an SFTP server's host key in the node's known_hosts (after you compare the fingerprint).

    \b
    Example:
      exchange peer trust-host --home /srv/xchg/s001 --address sftp://xs001@ho.example:22/
    """
    from exchange.transport.sftp.address import trust_host

    node = _node(home)
    fp = trust_host(node.cfg.home, address, expected=fingerprint)
    click.echo(f"trusted host key {fp} for {address}")


def _load_command_modules() -> None:
    """Commands that live in their own modules (audit, usb, ui) register on ``main`` when imported."""
    import importlib

    for mod in ("audit", "usb", "ui", "keys", "bundles", "setaside", "catalog", "conflicts", "alerts", "restart", "quarantine"):
        importlib.import_module(f"{__package__}.{mod}")
