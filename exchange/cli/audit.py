"""``exchange audit ...`` and ``exchange archive prune``: the auditor's and the retention commands.

Click commands only; the work is in :mod:`exchange.audit.verify` and :mod:`exchange.audit.prune`.
docs/AUDIT.md describes them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from exchange.cli.main import HOME, JSON, main
from exchange.errors import ConfigError, ExchangeError
from exchange.logs import escape_controls

TRUST = click.option("--trust", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="allowed_signers file (default: the node home's, with --home).")
IDENTITY = click.option("--identity", "identity_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        help="Auditor age identity (from `exchange audit keygen`).")


def _trust(home: Path | None, trust: Path | None) -> Any:
    from exchange.wire.crypto import sshsig

    if trust is not None:
        return sshsig.AllowedSigners.load(trust)
    if home is not None:
        from exchange.node.home import Node

        return Node.open(home).trust
    raise ConfigError("no trust store given",
                      hint="Pass --trust allowed_signers (or run on a node with --home DIR).")


def _identities(identity_file: Path | None) -> list[str]:
    if identity_file is None:
        return []
    from exchange.node.keys import load_identity_file

    return load_identity_file(identity_file)


def _roles(home: Path | None) -> dict[str, str] | None:
    """Node id -> role (ho/store) as a node home configures itself and its peers."""
    if home is None:
        return None
    from exchange.node.config import load

    cfg = load(home)
    return {cfg.id: cfg.role, **{p.id: p.role for p in cfg.peers.values()}}


def _archive_dir(archive: Path | None, home: Path | None) -> Path:
    if archive is not None:
        return archive
    if home is not None:
        from exchange.node.config import resolve_home

        return resolve_home(home) / "archive"
    raise click.UsageError("give ARCHIVE_DIR (or --home DIR to use the node's archive/)")


def _echo_json(obj: Any) -> None:
    import json

    click.echo(json.dumps(obj, indent=1, default=str))


@main.group()
def audit() -> None:
    """Auditors' tools: verify an archive, extract bundles, report control totals.

    \b
    Example:
      exchange audit verify /srv/xchg/ho/archive --trust allowed_signers
    """


@audit.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="File to write the auditor identity to (created 0600; never overwritten).")
def audit_keygen(out: Path) -> None:
    """Create an auditor age identity and print the recipient to give every node.

    \b
    Example:
      exchange audit keygen --out auditor.key
    """
    from exchange.audit.verify import auditor_key_text
    from exchange.node.keys import write_private
    from exchange.files import utc_now
    from exchange.wire.crypto import age

    if out.exists():
        raise ConfigError(f"{out} already exists; refusing to overwrite a key",
                          hint="Choose another --out file.")
    identity, recipient = age.generate_identity()
    pub = out.with_name(out.name + ".pub")
    try:
        write_private(out, auditor_key_text(identity, recipient, utc_now()).encode())
        pub.write_text(recipient + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {exc.filename or out}: {exc.strerror}",
                          hint="Choose a folder that exists and that you can write to.") from exc
    click.echo(f"wrote auditor identity {out} (keep it secret, keep a backup)")
    click.echo(f"recipient: {recipient}")
    click.echo("\nadd it to every node's exchange.toml, then bundles sealed from then on are readable with it:\n"
               f'  [node]\n  auditors = ["{recipient}"]')


@audit.command("verify")
@click.argument("archive", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@HOME
@TRUST
@IDENTITY
@click.option("--strict", is_flag=True, help="Warnings count as findings too (e.g. bundles not yet acknowledged).")
@JSON
def audit_verify(archive: Path | None, home: Path | None, trust: Path | None, identity_file: Path | None,
                 strict: bool, as_json: bool) -> None:
    """Verify every bundle, ack and checkpoint under ARCHIVE, and every stream they form.

    Exit 0 when nothing is wrong, 1 on any finding.

    \b
    Example:
      exchange audit verify /srv/xchg/ho/archive --trust allowed_signers --identity auditor.key
    """
    from exchange.audit.verify import verify_archive

    root = _archive_dir(archive, home)
    report = verify_archive(root, trust=_trust(home, trust), identities=_identities(identity_file),
                            strict=strict, roles=_roles(home))
    if as_json:
        _echo_json(report.as_json())
    else:
        _print_verify(report)
    if not report.ok:
        sys.exit(1)


def _print_verify(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from exchange.cli.console import data

    console = Console()
    c = report.counts
    console.print(data(f"archive {report.root}: {c.get('bundles', 0)} bundle files, {c.get('acks', 0)} acks, "
                  f"{c.get('checkpoints', 0)} checkpoints"
                  + ("" if report.decrypt else " (payloads not decrypted: no --identity)")))
    t = Table("stream", "bundles", "seq", "pruned", "acked", "decrypted", "findings", title="streams")
    for s in report.streams:
        seq = f"{s.seqs[0]}..{s.seqs[-1]}" if s.seqs else "-"
        pruned = ", ".join(f"{a}..{b}" for a, b in s.pruned) or "-"
        errors, warnings = s.errors, s.warnings
        if errors:
            result = f"[red]{len(errors)} error{'s' if len(errors) > 1 else ''}[/]"
        else:
            result = "[green]ok[/]"
        if warnings:
            result += f", [yellow]{len(warnings)} warning{'s' if len(warnings) > 1 else ''}[/]"
        t.add_row(data(s.name), str(len(s.seqs)), data(seq), data(pruned), f"{s.acked}/{len(s.seqs)}",
                  str(s.decrypted) if report.decrypt else "-", result)
    console.print(t)
    for s in report.streams:
        for f in s.findings:
            colour = "red" if f.severity == "error" else "yellow"
            console.print(Text.assemble((f"{f.severity.upper():<7}", colour), " ", data(f"{s.name} {f.line()}")),
                          highlight=False)
    for f in report.general:
        colour = "red" if f.severity == "error" else "yellow"
        console.print(Text.assemble((f"{f.severity.upper():<7}", colour), " ", data(f.line())), highlight=False)
    n_err = len([f for f in report.findings if f.severity == "error"])
    n_warn = len(report.findings) - n_err
    if report.ok:
        console.print(f"[green]OK[/]: {len(report.streams)} streams verified"
                      + (f", {n_warn} warnings" if n_warn else ""))
    else:
        console.print(f"[red]FAILED[/]: {n_err} errors, {n_warn} warnings"
                      + (" (--strict: warnings count)" if report.strict else ""))


@audit.command("extract")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--identity", "identity_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Auditor age identity.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write <bundle name>/ folders into.")
@HOME
@TRUST
@click.option("--force", is_flag=True,
              help="Also write bundles that fail verification (marked with VERIFICATION_FAILED.txt).")
@JSON
def audit_extract(bundles: tuple[Path, ...], identity_file: Path, out: Path, home: Path | None,
                  trust: Path | None, force: bool, as_json: bool) -> None:
    """Verify each BUNDLE fully, then write its tables as plain Parquet with its manifests.

    Exit 1 if any bundle failed verification (with --force its files are still written).

    \b
    Example:
      exchange audit extract s001.ho.0000000007.bundle --identity auditor.key --out extracted/
    """
    from exchange.audit.verify import VERIFY_FAILED_FILE, extract_bundle

    t, ids = _trust(home, trust), _identities(identity_file)
    results: list[dict[str, Any]] = []
    failed = False
    for b in bundles:
        try:
            r = extract_bundle(b, trust=t, identities=ids, out=out, force=force)
        except ExchangeError as exc:
            failed = True
            if as_json:
                results.append({"bundle": b.name, "folder": None, "verified": False, "problems": [exc.message],
                                "tables": {}})
            else:
                click.secho(f"REFUSED {b.name}: {escape_controls(exc.message)}", fg="red", err=True)
                if exc.hint:
                    click.echo(f"hint: {escape_controls(exc.hint)}", err=True)
            continue
        results.append(r.as_json())
        failed = failed or not r.verified
        if as_json:
            continue
        if r.verified:
            tables = ", ".join(f"{n} ({rows} rows)" for n, rows in r.tables.items())
            click.echo(escape_controls(f"OK {b.name} -> {r.folder}: {tables}"))
        elif r.folder is None:
            click.secho(f"REFUSED {b.name}: verification failed; nothing written", fg="red", err=True)
            for p in r.problems:
                click.secho(f"  - {escape_controls(p)}", fg="red", err=True)
            click.echo("hint: pass --force to write it anyway, marked as unverified", err=True)
        else:
            banner = f"!!! {b.name} FAILED VERIFICATION - extracted ONLY because of --force !!!"
            for stream in (False, True):
                click.secho(banner, fg="red", bold=True, err=stream)
            for p in r.problems:
                click.secho(f"  - {escape_controls(p)}", fg="red")
            click.secho(f"written to {r.folder} with {VERIFY_FAILED_FILE}; do not rely on its contents",
                        fg="red")
    if as_json:
        _echo_json({"version": 1, "extracted": results})
    if failed:
        sys.exit(1)


@audit.command("report")
@click.argument("archive", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--identity", "identity_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Auditor age identity.")
@HOME
@TRUST
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows as CSV (one column per control total).")
@click.option("--day", "day", type=click.Choice(["local", "utc", "bundle"]), default="local", show_default=True,
              help="Which day a document counts on: its own local business day (a bill's time at its "
                   "till's offset), the UTC day of that time, or the bundle's signed creation day (UTC).")
@JSON
def audit_report(archive: Path | None, identity_file: Path, home: Path | None, trust: Path | None,
                 csv_file: Path | None, day: str, as_json: bool) -> None:
    """Documents and control totals per stream, day and document type, from verified bundles.

    Exit 1 if a bundle failed verification (it is left out of the figures).

    \b
    Example:
      exchange audit report /srv/xchg/ho/archive --identity auditor.key --csv totals.csv
      exchange audit report /srv/xchg/ho/archive --identity auditor.key --day utc
    """
    from typing import cast

    from exchange.audit.business_day import DayKind
    from exchange.audit.verify import control_report

    rep = control_report(_archive_dir(archive, home), trust=_trust(home, trust),
                         identities=_identities(identity_file), day=cast(DayKind, day))
    if csv_file is not None:
        rep.write_csv(csv_file)
    if as_json:
        _echo_json(rep.as_json())
    else:
        _print_report(rep, csv_file)
    if rep.skipped:
        sys.exit(1)


def _print_report(rep: Any, csv_file: Path | None) -> None:
    from itertools import groupby

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from exchange.cli.console import data

    console = Console()
    what = {"local": "local business day", "utc": "UTC day of the business time",
            "bundle": "day of bundle creation UTC"}[rep.day]
    console.print(f"control totals from {rep.bundles} bundles (per stream, {what}, document type)")
    by_bundle = sorted({r.doc_type for r in rep.rows if r.basis == "bundle"}) if rep.day != "bundle" else []
    if by_bundle:
        console.print(data(f"on the day of bundle creation UTC (no business time, or deletes): "
                           f"{', '.join(by_bundle)}"))
    for name, rows in groupby(rep.rows, key=lambda r: r.stream):
        t = Table(title=data(name), box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, padding=(0, 1, 0, 0))
        t.add_column("day", no_wrap=True)
        t.add_column("document", no_wrap=True)
        t.add_column("bundles", justify="right", min_width=7)
        t.add_column("docs", justify="right")
        t.add_column("del", justify="right")
        t.add_column("control total", no_wrap=True)
        t.add_column("value", justify="right", no_wrap=True)
        for r in rows:
            totals = list(r.totals.items()) or [("", "")]
            for i, (k, v) in enumerate(totals):
                head = [data(r.day), data(r.doc_type), data(r.bundles), data(r.documents),
                        data(r.deletes)] if i == 0 else [data("")] * 5
                t.add_row(*head, data(k), data(v))
        console.print(t)
    if rep.not_readable:
        console.print(f"[yellow]{len(rep.not_readable)} authentic bundles are not encrypted to this identity "
                      "and are not in the figures[/] (sealed before the auditor was configured?)")
    for n in rep.notes:
        console.print(Text.assemble(("NOTE", "yellow"), " ", data(f"{n['file']}: {n['reason']}")), highlight=False)
    for s in rep.skipped:
        console.print(Text.assemble(("SKIPPED", "red"), " ", data(f"{s['file']}: {s['reason']}")), highlight=False)
    if csv_file is not None:
        console.print(data(f"wrote {csv_file}"))


@main.group("archive")
def archive_group() -> None:
    """The node's archive of sent and received bundles and acks.

    \b
    Example:
      exchange archive prune --home /srv/xchg/ho --older-than 400 --dry-run
    """


@archive_group.command("prune")
@HOME
@click.option("--older-than", "days", required=True, type=click.FloatRange(min=0), metavar="DAYS",
              help="Remove bundles (and their acks) created more than DAYS days ago.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@JSON
def archive_prune(home: Path | None, days: float, dry_run: bool, as_json: bool) -> None:
    """Remove old archived bundles and acks, leaving a signed checkpoint per stream, and the database's
    bookkeeping rows beyond the same retention (events, received and sent bundles, deliveries of deletes,
    settled conflicts, versions of deleted documents).

    The newest bundle of every stream and its ack are always kept, and so is any
    bundle without an APPLIED ack; `exchange audit verify` still passes after.
    Nothing not yet delivered and acknowledged leaves the database (docs/AUDIT.md).

    \b
    Example:
      exchange archive prune --home /srv/xchg/ho --older-than 400
    """
    from exchange.audit.prune import prune
    from exchange.node.home import Node
    from exchange.node.lock import work_lock

    from exchange.service.retention import purge

    node = Node.open(home)
    with work_lock(node.cfg.home):
        rep = prune(node.cfg.home / "archive", node_id=node.id, role=node.cfg.role, key=node.signing_key,
                    trust=node.trust, older_than_days=days, dry_run=dry_run)
        rows = purge(node, days, dry_run=dry_run)  # the bookkeeping rows beyond the same retention
    if as_json:
        _echo_json({**rep.as_json(), "database": rows})
        return
    verb = "would remove" if dry_run else "removed"
    for s in rep.streams:
        what = f"seq {s.first_seq}..{s.last_seq}" if s.first_seq is not None else "nothing"
        click.echo(f"{s.stream:<24} {verb} {what} ({len(s.removed)} files, {s.bytes} bytes); kept: {s.stopped}")
        for c in s.checkpoints:
            click.echo(f"{'':<24} checkpoint {c}")
        if s.finished:
            click.echo(f"{'':<24} finished an interrupted prune: {len(s.finished)} files")
    for p in rep.problems:
        click.secho(f"kept unreadable file {escape_controls(str(p))}", fg="yellow")
    click.echo(f"database: {verb} " + ", ".join(f"{n} {t}" for t, n in rows.items()) + " rows")
    click.echo(f"{verb} {rep.removed} files{' (dry run: nothing changed)' if dry_run else ''}")
