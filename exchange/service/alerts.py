"""Alerts: a configured command and/or webhook told of each state change worth waking someone for.

The states are computed from the node's database (the same figures as the HO
overview and the metrics, heartbeats included), per peer: ``peer_silent``,
``stream_stuck``, ``bundle_rejected``, ``documents_parked``, ``ack_mismatch``,
``conflict_held`` and ``key_expiring`` (from the trust store's ``valid-before``).
Each is remembered in ``<home>/alerts.json``; only a change (raised or
cleared) is delivered, once, so a store silent all night costs one alert, not
one per sync. A delivery that fails (the command
exits non-zero, the webhook does not answer 2xx) leaves that state unrecorded:
it is tried again at the next check. The JSON payload is documented in
docs/ALERTS.md.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from exchange import __version__
from exchange.errors import ConfigError
from exchange.files import write_file_atomic
from exchange.node import settings
from exchange.node.home import Node

log = logging.getLogger(__name__)

STATE_FILE = "alerts.json"
PAYLOAD_VERSION = 1
DEFAULT_SILENT_MINUTES = 60.0
TIMEOUT = 10  # seconds for the command and the webhook each
KINDS = ("peer_silent", "stream_stuck", "bundle_rejected", "documents_parked", "ack_mismatch", "conflict_held",
         "key_expiring")
DEFAULT_KEY_DAYS = 14.0


@dataclass(frozen=True)
class AlertConfig:
    command: list[str]
    webhook: str | None
    silent_after_minutes: float
    key_expiry_days: float = DEFAULT_KEY_DAYS

    @property
    def enabled(self) -> bool:
        return bool(self.command or self.webhook)


def config(node: Node) -> AlertConfig:
    """``[alerts]`` of exchange.toml: ``command`` (a string, split like a shell would, or a list),
    ``webhook`` (an http(s) URL), ``silent_after`` in seconds or ``silent_after_minutes`` (else ``[ui]``'s,
    else 60 minutes)."""
    section = node.cfg.extra.get("alerts", {})
    ui = node.cfg.extra.get("ui", {})
    if not isinstance(section, dict):
        raise ConfigError("[alerts] in exchange.toml must be a table")
    raw = section.get("command") or []
    command = shlex.split(raw) if isinstance(raw, str) else [str(a) for a in raw] if isinstance(raw, list) else None
    if command is None:
        raise ConfigError("[alerts] command must be a string or a list of strings")
    webhook = section.get("webhook") or None
    if webhook is not None and not (isinstance(webhook, str) and webhook.startswith(("http://", "https://"))):
        raise ConfigError(f"[alerts] webhook must be an http:// or https:// URL, not {webhook!r}")
    try:  # seconds (silent_after) or the older minutes; [ui]'s when [alerts] says neither
        silent = settings.silent_minutes(section, settings.silent_minutes(ui, DEFAULT_SILENT_MINUTES))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[alerts] silent_after must be a number of seconds: {exc}") from exc
    try:
        days: Any = section.get("key_expiry_days", DEFAULT_KEY_DAYS)
        key_days = float(days)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[alerts] key_expiry_days must be a number: {exc}") from exc
    return AlertConfig(command, webhook, silent, key_days)


def expiring_keys(node: Node, days: float, now: datetime) -> dict[str, datetime]:
    """Principal (this node or a peer) -> when its signing key stops being trusted, for those whose
    every trusted key ends (``valid-before``) within ``days``; a principal with a key valid beyond
    that (an overlap after a rotation) is fine."""
    limit = now + timedelta(days=days)
    ends: dict[str, datetime | None] = {}
    for signer in node.trust.signers:
        if signer.valid_after is not None and signer.valid_after > limit:
            continue  # a key that only starts later does not cover the time until then
        for principal in signer.principals:
            if principal != node.id and principal not in node.cfg.peers:
                continue
            end = signer.valid_before
            if principal not in ends:
                ends[principal] = end
            else:
                was = ends[principal]
                ends[principal] = None if was is None or end is None else max(was, end)
    return {p: end for p, end in ends.items() if end is not None and end <= limit}


def states(node: Node, silent_after_minutes: float, now: datetime | None = None,
           key_expiry_days: float = DEFAULT_KEY_DAYS) -> dict[str, dict[str, Any]]:
    """``"<kind>:<peer>"`` -> ``{"kind", "peer", "detail"}`` for every alert that holds now."""
    from exchange.service.ui.data import peer_stats, remote_troubles, silence

    now = now or datetime.now(UTC)
    out: dict[str, dict[str, Any]] = {}

    def add(kind: str, peer: str, detail: str) -> None:
        out[f"{kind}:{peer}"] = {"kind": kind, "peer": peer, "detail": detail}

    from exchange.database.conflicts import open_per_peer

    with node.engine.connect() as conn:
        held_here = open_per_peer(conn)
    for peer, st in sorted(peer_stats(node).items()):
        if peer not in node.cfg.peers:
            continue
        quiet = silence(st, silent_after_minutes, now)
        if quiet:
            add("peer_silent", peer, quiet)
        stuck = [f"went back in time ({st.went_back}); repair with {st.repair}"] if st.went_back else []
        stuck += [f"waiting for {m}" for m in st.missing]
        if st.received_failed:
            stuck.append("FAILED stream")
        if st.received_held:
            stuck.append("HELD stream")
        stuck += [t for t in remote_troubles(st.remote_health) if "parked" not in t and "quarantined" not in t
                  and "conflict" not in t and "local change" not in t]
        if stuck:
            add("stream_stuck", peer, "; ".join(stuck))
        if st.sent_rejected:
            add("bundle_rejected", peer, f"{st.sent_rejected} REJECTED bundle(s) sent to {peer}")
        parked = []
        if st.parked:
            parked.append(f"{st.parked} document(s) from {peer} parked here")
        if st.remote_health.get("parked"):
            parked.append(f"{st.remote_health['parked']} document(s) parked at {peer}")
        if parked:
            add("documents_parked", peer, "; ".join(parked))
        held = []
        if held_here.get(peer):
            held.append(f"{held_here[peer]} conflict(s) with {peer} held for a person here "
                        "(exchange conflicts list --open)")
        if st.remote_health.get("conflicts_held"):
            held.append(f"{st.remote_health['conflicts_held']} conflict(s) held for a person at {peer} "
                        f"(exchange conflicts list --open, at {peer})")
        if held:
            add("conflict_held", peer, "; ".join(held))
        if st.sent_unexplained:  # a parked document is documents_parked's; this is a lost document or amount
            add("ack_mismatch", peer, f"{st.sent_unexplained} bundle(s) whose ack leaves documents or amounts "
                                      "unaccounted for")
    for principal, end in sorted(expiring_keys(node, key_expiry_days, now).items()):
        add("key_expiring", principal, f"the signing key of {principal} stops being trusted "
                                       f"{end.astimezone(UTC):%Y-%m-%d %H:%M} UTC (valid-before)")
    return out


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_command(command: list[str], body: bytes) -> str | None:
    """Run the command with the payload on stdin; None when it exited 0, else why."""
    try:
        done = subprocess.run(command, input=body, capture_output=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"command failed: {exc}"
    if done.returncode:
        return f"command exited {done.returncode}: {done.stderr.decode(errors='replace')[:200]}"
    return None


def _post(url: str, body: bytes) -> str | None:
    """POST the payload; None on a 2xx answer, else why."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": f"exchange/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310 - http(s) checked in config
            return None if 200 <= resp.status < 300 else f"webhook answered {resp.status}"
    except (OSError, urllib.error.URLError) as exc:
        return f"webhook failed: {exc}"


def check(node: Node, now: datetime | None = None) -> list[dict[str, Any]]:
    """Deliver every change since the last check, on each channel (command, webhook) on its own;
    returns the payloads delivered (on at least one channel).

    Each channel remembers what it was told, so a webhook that was down gets the change at the
    next check while the command is not told twice. Nothing happens (not even the state file)
    when no command or webhook is configured.
    """
    cfg = config(node)
    if not cfg.enabled:
        return []
    now = now or datetime.now(UTC)
    stamp = now.isoformat(timespec="seconds")
    path = node.cfg.home / STATE_FILE
    saved = _load(path)
    after = states(node, cfg.silent_after_minutes, now, cfg.key_expiry_days)
    channels: dict[str, Callable[[bytes], str | None]] = {}
    if cfg.command:
        channels["command"] = partial(_run_command, cfg.command)
    if cfg.webhook:
        channels["webhook"] = partial(_post, cfg.webhook)
    out: dict[str, dict[str, Any]] = {}
    delivered: dict[str, dict[str, Any]] = {}
    for name, send in channels.items():
        before = saved.get(name) if isinstance(saved.get(name), dict) else {}
        assert isinstance(before, dict)
        told = dict(before)
        for key in sorted(set(before) ^ set(after)):  # raised (new) or cleared (gone); a held state stays quiet
            old, new = before.get(key), after.get(key)
            cur = new or old
            assert isinstance(cur, dict)
            payload = {
                "version": PAYLOAD_VERSION, "node": node.id, "role": node.cfg.role, "app_version": __version__,
                "alert": cur.get("kind"), "peer": cur.get("peer"), "state": "raised" if new else "cleared",
                "detail": cur.get("detail"), "since": stamp if new else str((old or {}).get("since") or stamp),
                "time": stamp,
            }
            why = send(json.dumps(payload, sort_keys=True).encode())
            if why:
                log.warning("alert %s %s for %s not delivered by %s (tried again next time): %s",
                            payload["alert"], payload["state"], payload["peer"], name, why)
                continue
            if new:
                told[key] = {**new, "since": stamp}
            else:
                told.pop(key, None)
            delivered.setdefault(f"{key}:{payload['state']}", payload)
        out[name] = told
    if out != saved:
        write_file_atomic(path, (json.dumps(out, indent=1, sort_keys=True) + "\n").encode())
    for p in delivered.values():
        log.info("alert %s %s for %s: %s", p["alert"], p["state"], p["peer"], p["detail"])
    return list(delivered.values())
