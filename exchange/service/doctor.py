"""``exchange doctor``: a store's prerequisites as checks, each OK or FAIL with the fix."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exchange import __version__
from exchange.database.direct import SCHEMA_VERSION, plain_file, sqlite_schema_version
from exchange.errors import ExchangeError
from exchange.node import keys, perms
from exchange.node.home import Node
from exchange.wire.formats import app_major

MIN_FREE_BYTES = 1 << 30
MAX_SKEW_SECONDS = 300


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _run(name: str, fn: Callable[[], str], fix: str) -> Check:
    try:
        return Check(name, True, fn())
    except ExchangeError as exc:
        return Check(name, False, exc.message, exc.hint or fix)
    except Exception as exc:  # a check must report, never crash the doctor
        return Check(name, False, f"{type(exc).__name__}: {exc}", fix)


def check_database(node: Node) -> str:
    # A plain SQLite file is read with sqlite3 (no SQLAlchemy at start-up); anything else, or a
    # file sqlite3 cannot read, goes through the engine and reports as it always has.
    path = plain_file(node.cfg.database)
    v = sqlite_schema_version(path) if path is not None else None
    if v is not None:
        need, dialect = SCHEMA_VERSION, "sqlite"
    else:
        from exchange.database.tables import SCHEMA_VERSION as need, schema_version

        with node.engine.connect() as conn:
            v = schema_version(conn)
        dialect = node.engine.dialect.name
    if v != need:
        raise ExchangeError(f"xchg schema version {v}, this exchange needs {need}",
                            hint="Run `exchange migrate` (or any sync) to upgrade the database.")
    return f"{dialect} reachable, schema version {v}"


def check_keys(node: Node) -> str:
    node.signing_key  # noqa: B018 - loading checks presence and permissions
    node.identities  # noqa: B018
    return "signing key and age identity present, mode 0600"


def check_peers(node: Node) -> str:
    from exchange.wire.crypto import age

    if not node.cfg.peers:
        raise ExchangeError("no peers configured", hint="Add the HO (or stores) with `exchange peer add`.")
    trust = node.trust
    missing = []
    for p in node.cfg.peers.values():
        age.parse_recipient(p.recipient)
        if not any(p.id in s.principals for s in trust.signers):
            missing.append(p.id)
    if missing:
        raise ExchangeError(f"no pinned signing key for {', '.join(missing)}",
                            hint="Re-run `exchange peer add` with the peer's signing key.")
    return f"{len(node.cfg.peers)} peers pinned (signing key and recipient)"


def check_key_validity(node: Node, days: int | None = None) -> str:
    """Warn ahead of a key's end: this node's own key and every peer's, unless a newer key follows it."""
    from datetime import UTC, datetime

    days = keys.warn_days(node.cfg) if days is None else days
    now = datetime.now(UTC)
    ending = keys.ending_keys(node.trust, [node.id, *sorted(node.cfg.peers)], now, days)
    if (node.cfg.keys_dir / keys.ROTATION_STATE).exists():  # a rotation: loads the database only then
        from exchange.node import rotation

        rot, behind = rotation.pending(node.cfg), rotation.lagging(node)
        if rot is not None and behind and now >= rot.created + (rot.old_valid_before - rot.created) / 2:
            ended = now > rot.old_valid_before
            ending.append(f"{', '.join(behind)} never confirmed the key rotation of {node.id}: its old key "
                          f"{'ended' if ended else 'ends'} at {rot.old_valid_before:%Y-%m-%d %H:%M:%S} UTC there, "
                          "and what it signs with the new key cannot be verified there"
                          + (": pin the new key there with `exchange peer add --replace`" if ended
                             else ": sync with them (or carry a USB stick) before then"))
    if ending:
        raise ExchangeError(
            "; ".join(ending),
            hint="For this node's own key run `exchange keys rotate`; for a peer's, have the peer run it; pin a "
                 "revoked store's new keys with `exchange peer add --replace` (docs/OPERATIONS.md, \"Rotating a "
                 "node's keys\", \"A store's PC was stolen\").")
    return f"every key valid for more than {days} days (or followed by a newer key)"


def check_transport(node: Node, peer_id: str) -> str:
    from exchange.transport import open_transport

    peer = node.cfg.peer(peer_id)
    if not peer.exchanging:  # on purpose (`exchange peer pause` / `remove`): not an error, not contacted
        return f"{peer.state} since {peer.state_since} ({peer.state_reason}): not contacted"
    if not peer.transport:
        return "no transport configured (files move by `exchange push --to` / USB)"
    t = open_transport(peer.transport, home=node.cfg.home, me=node.id, peer=peer_id)
    try:
        info: dict[str, Any] = t.probe(node.id, peer_id)
    finally:
        t.close()
    parts = [f"{peer.transport} reachable, folders readable and writable"]
    server_time = info.get("server_time")
    if server_time is not None:
        skew = server_time - time.time()
        if abs(skew) > MAX_SKEW_SECONDS:
            raise ExchangeError(f"clock skew of {skew:+.0f}s against {peer.transport}",
                                hint="Set the clock (enable NTP); signatures are checked against creation times.")
        parts.append(f"clock skew {skew:+.1f}s")
    published = info.get("peer_info")
    if published:
        theirs = str(published.get("version", "?"))
        if app_major(theirs) != app_major(__version__):
            raise ExchangeError(f"peer {peer_id} runs exchange {theirs}, this node {__version__}",
                                hint="Both sides must run the same major version: upgrade the older one.")
        parts.append(f"peer version {theirs}")
    return "; ".join(parts)


def mode_targets(node: Node) -> list[tuple[str, Path, bool]]:
    """(label, path, is a folder) of everything in the home that must be private (known hosts: if present)."""
    from exchange.node.config import CONFIG_NAME, KNOWN_HOSTS
    from exchange.node.home import sqlite_file

    cfg = node.cfg
    out = [("home", cfg.home, True), ("keys folder", cfg.keys_dir, True), ("config", cfg.home / CONFIG_NAME, False),
           ("signing key", cfg.keys_dir / keys.SIGNING_KEY, False), ("age key", cfg.keys_dir / keys.AGE_KEY, False),
           ("trust store", keys.trust_path(cfg), False), ("known hosts", cfg.home / KNOWN_HOSTS, False)]
    db = sqlite_file(cfg.database)
    if db is not None:
        out.append(("database", db, False))
    return out


def check_mode(path: Path, is_dir: bool, optional: bool = False) -> str:
    """Owned by this account (or root), no access for group or others (0700 / 0600)."""
    if not perms.posix():
        return "not checked on Windows: keep the home readable by the service account alone (NTFS)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if optional:
            return f"{path} not present"
        raise ExchangeError(f"{path} is missing") from None
    problem = perms.mode_problem(st, private=True)
    if problem is not None:
        own = st.st_uid in (os.geteuid(), 0)
        fix = perms.chmod_fix(path, is_dir) if own else perms.owner_fix(path)
        raise ExchangeError(f"{path} {problem}", hint=f"Run: {fix}")
    return f"{stat.S_IMODE(st.st_mode):04o} {path}"


def check_disk(node: Node) -> str:
    usage = shutil.disk_usage(node.cfg.home)
    if usage.free < MIN_FREE_BYTES:
        raise ExchangeError(f"only {usage.free >> 20} MiB free for the spool at {node.cfg.home}",
                            hint="Free disk space, or prune the archive (`exchange archive prune`).")
    return f"{usage.free >> 30} GiB free"


def check_streams(node: Node) -> str:
    """Every received stream moves: no bundle FAILED, HELD or WAITING, no document parked; else the command."""
    from contextlib import closing

    from exchange.database.direct import connect_existing
    from exchange.receive.stuck import PARKED_SQL, STUCK_SQL, parked_problem, stuck_bundles

    path = plain_file(node.cfg.database)
    if path is not None:  # a SQLite home: read with sqlite3, as the schema version (no SQLAlchemy)
        with closing(connect_existing(path)) as raw:
            stuck = stuck_bundles(raw.execute(STUCK_SQL).fetchall())
            parked = parked_problem(raw.execute(PARKED_SQL).fetchall())
    else:
        with node.engine.connect() as conn:
            stuck = stuck_bundles(conn.exec_driver_sql(STUCK_SQL).all())
            parked = parked_problem(conn.exec_driver_sql(PARKED_SQL).all())
    if stuck:
        more = f"; {len(stuck) - 1} more stuck" if len(stuck) > 1 else ""
        raise ExchangeError(f"{stuck[0].line()}{more}", hint=f"{stuck[0].resolve} (docs/OPERATIONS.md)")
    if parked:
        raise ExchangeError(parked[0], hint=f"{parked[1]} (docs/OPERATIONS.md)")
    return "no bundle FAILED, HELD or WAITING; no document parked"


def check_went_back(node: Node) -> str:
    """No peer went back in time (a store restored from a backup): else the one command that repairs it."""
    from contextlib import closing

    from exchange.database.direct import connect_existing
    from exchange.receive.stuck import REGRESS_SQL, regress_problems

    path = plain_file(node.cfg.database)
    if path is not None:  # a SQLite home: read with sqlite3 (no SQLAlchemy)
        with closing(connect_existing(path)) as raw:
            found = regress_problems(raw.execute(REGRESS_SQL).fetchall())
    else:
        with node.engine.connect() as conn:
            found = regress_problems(conn.exec_driver_sql(REGRESS_SQL).all())
    if found:
        more = f"; {len(found) - 1} more" if len(found) > 1 else ""
        raise ExchangeError(f"{found[0][0]}{more}", hint=f"Repair with {found[0][1]}")
    return "no peer's streams went back in time"


_HELD_SQL = "SELECT peer, COUNT(*) FROM xchg_conflict WHERE status = 'OPEN' GROUP BY peer ORDER BY peer"
_REPORTED_SQL = "SELECT peer, health FROM xchg_heartbeat ORDER BY peer"


def check_conflicts(node: Node) -> str:
    """No conflict held for a person, here or (its heartbeat v2 says) at a peer; else where to resolve it."""
    from contextlib import closing

    from exchange.database.direct import connect_existing

    path = plain_file(node.cfg.database)
    if path is not None:  # a SQLite home: read with sqlite3 (no SQLAlchemy)
        with closing(connect_existing(path)) as raw:
            here, reported = raw.execute(_HELD_SQL).fetchall(), raw.execute(_REPORTED_SQL).fetchall()
    else:
        with node.engine.connect() as conn:
            here = list(conn.exec_driver_sql(_HELD_SQL).all())
            reported = list(conn.exec_driver_sql(_REPORTED_SQL).all())
    problems = [(f"{n} conflict(s) with {peer} held for a person here",
                 f"Run `exchange conflicts list --open --home {node.cfg.home}`, then "
                 "`exchange conflicts resolve ID --keep ours|theirs`") for peer, n in here]
    for peer, health in reported:
        try:
            n = json.loads(health).get("conflicts_held", 0)
        except (ValueError, AttributeError):
            continue
        if type(n) is int and n > 0:
            problems.append((f"{n} conflict(s) held for a person at {peer} (its heartbeat)",
                             f"At {peer}: `exchange conflicts list --open`, then "
                             "`exchange conflicts resolve ID --keep ours|theirs` (docs/OPERATIONS.md)"))
    if problems:
        more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        hints = list(dict.fromkeys(h for _p, h in problems))  # here, and at a peer: each said once
        raise ExchangeError("; ".join(p for p, _h in problems[:3]) + more, hint="; ".join(hints[:2]))
    return "no conflict held for a person, here or at a peer"


def run_checks(node: Node, key_days: int | None = None) -> list[Check]:
    checks = [
        _run("database", lambda: check_database(node), "Check the database URL in exchange.toml."),
        _run("keys", lambda: check_keys(node), f"Restore keys into {keys.SIGNING_KEY} / {keys.AGE_KEY}."),
        _run("peers", lambda: check_peers(node), "Add peers with `exchange peer add`."),
        _run("key validity", lambda: check_key_validity(node, key_days), "See `exchange keys list`."),
        _run("streams", lambda: check_streams(node), "See `exchange status received`."),
        _run("streams went back", lambda: check_went_back(node), "See docs/OPERATIONS.md."),
        _run("conflicts", lambda: check_conflicts(node), "See `exchange status conflicts`."),
    ]
    for pid in sorted(node.cfg.peers):
        checks.append(_run(f"transport {pid}", lambda pid=pid: check_transport(node, pid),  # type: ignore[misc]
                           "Check the address, the key login and the folders (docs/SFTP.md)."))
    for label, path, is_dir in mode_targets(node):
        optional = label == "known hosts"
        checks.append(_run(f"mode {label}", lambda p=path, d=is_dir, o=optional: check_mode(p, d, o),  # type: ignore[misc]
                           perms.chmod_fix(path, is_dir)))
    checks.append(_run("disk", lambda: check_disk(node), "Free disk space."))
    from exchange.service import peerclock

    checks.append(_run("peer clocks", lambda: peerclock.check(node), "Set the peer's clock (enable NTP)."))
    return checks


def as_json(checks: list[Check]) -> str:
    return json.dumps({"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}, indent=1)
