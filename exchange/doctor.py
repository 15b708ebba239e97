"""``exchange doctor``: a store's prerequisites as checks, each OK or FAIL with the fix."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import __version__, keys
from .errors import ExchangeError
from .formats import app_major
from .node import Node

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
    from .db import SCHEMA_VERSION, schema_version

    with node.engine.connect() as conn:
        v = schema_version(conn)
    if v != SCHEMA_VERSION:
        raise ExchangeError(f"xchg schema version {v}, this exchange needs {SCHEMA_VERSION}",
                            hint="Run `exchange migrate` (or any sync) to upgrade the database.")
    return f"{node.engine.dialect.name} reachable, schema version {v}"


def check_keys(node: Node) -> str:
    node.signing_key  # noqa: B018 - loading checks presence and permissions
    node.identities  # noqa: B018
    return "signing key and age identity present, mode 0600"


def check_peers(node: Node) -> str:
    from .crypto import age

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


def check_transport(node: Node, peer_id: str) -> str:
    from .transport import open_transport

    peer = node.cfg.peer(peer_id)
    if not peer.transport:
        return "no transport configured (files move by `exchange push --to` / USB)"
    t = open_transport(peer.transport, home=node.cfg.home, me=node.id, peer=peer_id)
    try:
        probe = getattr(t, "probe", None)
        info: dict[str, Any] = probe(node.id, peer_id) if probe else {}
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


def check_disk(node: Node) -> str:
    usage = shutil.disk_usage(node.cfg.home)
    if usage.free < MIN_FREE_BYTES:
        raise ExchangeError(f"only {usage.free >> 20} MiB free for the spool at {node.cfg.home}",
                            hint="Free disk space, or prune the archive (`exchange archive prune`).")
    return f"{usage.free >> 30} GiB free"


def run_checks(node: Node) -> list[Check]:
    checks = [
        _run("database", lambda: check_database(node), "Check the database URL in exchange.toml."),
        _run("keys", lambda: check_keys(node), f"Restore keys into {keys.SIGNING_KEY} / {keys.AGE_KEY}."),
        _run("peers", lambda: check_peers(node), "Add peers with `exchange peer add`."),
    ]
    for pid in sorted(node.cfg.peers):
        checks.append(_run(f"transport {pid}", lambda pid=pid: check_transport(node, pid),  # type: ignore[misc]
                           "Check the address, the key login and the folders (docs/SFTP.md)."))
    checks.append(_run("disk", lambda: check_disk(node), "Free disk space."))
    return checks


def as_json(checks: list[Check]) -> str:
    return json.dumps({"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}, indent=1)
