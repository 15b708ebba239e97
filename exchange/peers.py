"""Adding and listing peers: config entry plus a pinned key in allowed_signers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from . import keys
from .config import NodeConfig, Peer
from .crypto import age, sshsig
from .errors import ConfigError
from .formats import check_node_id


def _when(text: str | None, what: str) -> datetime | None:
    if not text:
        return None
    t = text.rstrip("Z")
    for fmt in ("%Y%m%d%H%M%S", "%Y%m%d%H%M", "%Y%m%d"):
        try:
            return datetime.strptime(t, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise ConfigError(f"{what} {text!r}: use YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS (UTC)")


def add_peer(cfg: NodeConfig, peer_id: str, role: str | None, signing_key: str, recipient: str,
             transport: str | None = None, groups: tuple[str, ...] = (),
             valid_after: str | None = None, valid_before: str | None = None) -> str:
    """Record a peer (or update it) and pin its signing key; returns the trust line."""
    try:
        check_node_id(peer_id)
    except Exception as exc:
        raise ConfigError(str(exc)) from exc
    if peer_id == cfg.id:
        raise ConfigError(f"{peer_id} is this node itself")
    age.parse_recipient(recipient)
    sshsig.parse_public_line(signing_key)
    peer_role = role or ("store" if cfg.role == "ho" else "ho")
    if peer_role == cfg.role == "store":
        raise ConfigError("a store exchanges with the HO only", hint="Use --role ho for the head office.")
    line = keys.add_signer(cfg, peer_id, signing_key, _when(valid_after, "--valid-after"),
                           _when(valid_before, "--valid-before"))
    old = cfg.peers.get(peer_id)
    cfg.peers[peer_id] = Peer(id=peer_id, role="ho" if peer_role == "ho" else "store", recipient=recipient,
                              transport=transport or (old.transport if old else None),
                              groups=tuple(groups) or (old.groups if old else ()))
    cfg.save()
    return line


def list_peers(cfg: NodeConfig) -> list[dict[str, Any]]:
    trust = keys.load_trust(cfg)
    out = []
    for p in sorted(cfg.peers.values(), key=lambda p: p.id):
        fps = [sshsig.fingerprint(s.key) for s in trust.signers if p.id in s.principals]
        out.append({"id": p.id, "role": p.role, "recipient": p.recipient, "transport": p.transport,
                    "groups": list(p.groups), "fingerprints": fps})
    return out
