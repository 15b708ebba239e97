"""Key rotation in-band: this node's new keys announced to every peer, and a peer's announced keys trusted.

``exchange keys rotate`` makes new signing and age keys and a key notice
(exchange/wire/keynotice.py) signed by the old key and the new one. Until a
peer has acknowledged (PROCESSED) a bundle that carried the notice, this node
keeps signing for that peer with the old key, and every bundle to it carries
the notice (an empty control bundle when nothing else is pending), so the peer
never meets a key it does not know. The peer, applying such a bundle, trusts the
new key from the rotation and keeps the old one until the overlap ends; after
that the old key is refused everywhere (``keys.check_current``).

State, all in ``keys/`` (private): ``rotation.json`` (the notice, its times,
and per peer the first seq sealed after the rotation), ``node_ed25519.old``
(the old signing key, for the peers not yet told), ``node.age`` (the new
identity first, the old ones after it: what peers sealed to the old recipient
still decrypts). ``next/`` holds the new keys between their making and the
switch; the notice in ``rotation.json`` is the commit point.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, and_, select

from exchange.database.tables import xchg_sent, xchg_stream_out
from exchange.errors import ConfigError, FormatError
from exchange.faults import crashpoint
from exchange.node import keys, perms
from exchange.node.config import NodeConfig
from exchange.vocabulary import DEFAULT_LANE, SentStatus
from exchange.wire import keynotice
from exchange.wire.crypto import age, sshsig
from exchange.wire.signed import format_time, parse_time

if TYPE_CHECKING:
    from exchange.node.home import Node

STATE = keys.ROTATION_STATE
OLD_SIGNING = f"{keys.SIGNING_KEY}.old"
NEXT = "next"
DEFAULT_OVERLAP = timedelta(days=7)


@dataclass(frozen=True)
class Rotation:
    """A rotation of this node's keys: the notice peers are told, and from which seq each is told."""

    carried: dict[str, str]  # the notice as a bundle carries it (keynotice.make_notice)
    created: datetime
    old_valid_before: datetime
    first_seq: dict[str, int]  # per peer at the rotation: the first seq sealed after it


def pending(cfg: NodeConfig) -> Rotation | None:
    """The node's last rotation (``keys/rotation.json``), or None if it never rotated."""
    path = cfg.keys_dir / STATE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw)
        return Rotation(dict(obj["carried"]), parse_time(obj["created"], STATE),
                        parse_time(obj["old_valid_before"], STATE), {str(k): int(v) for k, v in obj["first_seq"].items()})
    except (ValueError, KeyError, TypeError, FormatError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}",
                          hint="Restore it from the home's backup; it records the last key rotation.") from exc


def _confirmed(conn: Connection, peer: str, first_seq: int) -> bool:
    """The peer acknowledged (APPLIED) a bundle sealed after the rotation: it carried the notice (notices
    travel in the default lane, whose seqs ``first_seq`` counts)."""
    return conn.execute(select(xchg_sent.c.seq).where(and_(
        xchg_sent.c.peer == peer, xchg_sent.c.lane == DEFAULT_LANE, xchg_sent.c.seq >= first_seq,
        xchg_sent.c.status == SentStatus.PROCESSED.value)).limit(1)).first() is not None


def _told(rot: Rotation | None, conn: Connection, peer: str, now: datetime) -> bool:
    """True when ``peer`` needs no notice (and gets the new key's signatures)."""
    if rot is None or peer not in rot.first_seq or now > rot.old_valid_before:
        return True
    return _confirmed(conn, peer, rot.first_seq[peer])


def signing_key_for(node: Node, peer: str, conn: Connection | None = None) -> Any:
    """The key this node signs with for ``peer``: the old one until the peer has the notice."""
    rot = pending(node.cfg)
    if rot is None:  # the usual case: no database query
        return node.signing_key
    if conn is None:
        with node.engine.connect() as own:
            told = _told(rot, own, peer, datetime.now(UTC))
    else:
        told = _told(rot, conn, peer, datetime.now(UTC))
    if told:
        return node.signing_key
    path = node.cfg.keys_dir / OLD_SIGNING
    keys.check_private(path)
    return sshsig.load_private_key(path.read_bytes(), path=str(path))


def notice_for(node: Node, peer: str, conn: Connection) -> dict[str, str] | None:
    """The notice a bundle to ``peer`` carries now, if the peer has not confirmed it yet."""
    rot = pending(node.cfg)
    return None if _told(rot, conn, peer, datetime.now(UTC)) or rot is None else rot.carried


def control_bundle_due(node: Node, peer: str) -> bool:
    """Nothing sealed for ``peer`` since the rotation: an empty bundle must carry the notice."""
    rot = pending(node.cfg)
    if rot is None:  # the usual case: no database query
        return False
    with node.engine.connect() as conn:
        if _told(rot, conn, peer, datetime.now(UTC)):
            return False
        return conn.execute(select(xchg_sent.c.seq).where(and_(
            xchg_sent.c.peer == peer, xchg_sent.c.lane == DEFAULT_LANE,
            xchg_sent.c.seq >= rot.first_seq[peer])).limit(1)).first() is None


def unconfirmed(node: Node) -> list[str]:
    """Peers that have not yet acknowledged the notice of a rotation still in its overlap."""
    rot = pending(node.cfg)
    if rot is None:
        return []
    now = datetime.now(UTC)
    with node.engine.connect() as conn:
        waiting = [p for p in sorted(rot.first_seq) if not _told(rot, conn, p, now)]
    if not waiting and keys.rotation_announcing(node.cfg):  # every peer told: syncs need not ask again
        _write_state(node.cfg, rot, complete=True)
    return waiting


def lagging(node: Node) -> list[str]:
    """Peers that never acknowledged a bundle carrying the last rotation's notice (overlap over or not)."""
    rot = pending(node.cfg)
    if rot is None:
        return []
    with node.engine.connect() as conn:
        return [p for p in sorted(rot.first_seq) if p in node.cfg.peers and not _confirmed(conn, p, rot.first_seq[p])]


def _write_state(cfg: NodeConfig, rot: Rotation, complete: bool = False) -> None:
    perms.write_private_atomic(cfg.keys_dir / STATE, json.dumps({
        "carried": rot.carried, "created": format_time(rot.created),
        "old_valid_before": format_time(rot.old_valid_before), "first_seq": rot.first_seq,
        "complete": complete}, indent=1).encode())


def rotate(node: Node, overlap: timedelta = DEFAULT_OVERLAP) -> Rotation:
    """Make new keys and the notice for every peer; switch this node to them (resumes an interrupted run).

    Refused while the previous rotation is still being announced (a peer has
    not confirmed it and its overlap has not ended).
    """
    cfg, kd = node.cfg, node.cfg.keys_dir
    rot = pending(cfg)
    if rot is not None and _interrupted(kd, rot):
        _switch(cfg, rot)  # the last run stopped after its commit point: finish it
        return rot
    if rot is not None and unconfirmed(node):
        raise ConfigError(
            f"the rotation of {format_time(rot.created)} is still being announced: "
            f"{', '.join(unconfirmed(node))} have not confirmed it (its overlap ends {format_time(rot.old_valid_before)})",
            hint="Sync until every peer has acknowledged a bundle (`exchange keys list`), then rotate again.")
    old_key = node.signing_key
    part = kd / f"{NEXT}.part"
    for folder in (kd / NEXT, part):  # new keys never announced (stopped before the commit point): made again
        shutil.rmtree(folder, ignore_errors=True)
    perms.make_private_dir(part)
    pem, pub = sshsig.generate_key(comment=f"exchange:{cfg.id}")
    identity, recipient = age.generate_identity()
    keys.write_private(part / keys.SIGNING_KEY, pem)
    keys.write_private(part / f"{keys.SIGNING_KEY}.pub", (pub + "\n").encode())
    keys.write_private(part / keys.AGE_KEY, f"{identity}\n".encode())
    keys.write_private(part / f"{keys.AGE_KEY}.pub", (recipient + "\n").encode())
    os.replace(part, kd / NEXT)  # complete, or absent
    crashpoint("rotate.prepared")
    new_key = sshsig.load_private_key(pem)
    now = datetime.now(UTC).replace(microsecond=0)
    carried = keynotice.make_notice(cfg.id, old_key, new_key, recipient, now, overlap)
    with node.engine.connect() as conn:
        seqs = dict(conn.execute(select(xchg_stream_out.c.peer, xchg_stream_out.c.next_seq)
                                 .where(xchg_stream_out.c.lane == DEFAULT_LANE)).all())
    first = {p: int(seqs.get(p, 1)) for p in sorted(cfg.peers)}
    rot = Rotation(carried, now, now + overlap, first)
    _write_state(cfg, rot)  # the commit point
    crashpoint("rotate.committed")
    _switch(cfg, rot)
    return rot


def _interrupted(kd: Path, rot: Rotation) -> bool:
    """``next/`` holds the keys ``rot`` announced, not yet (fully) switched to."""
    nxt = kd / NEXT
    if not nxt.is_dir():
        return False
    pub = nxt / f"{keys.SIGNING_KEY}.pub"
    if not pub.exists():
        return True  # moved by the switch: only what follows it is left
    announced = json.loads(rot.carried["notice"])["new_key"]
    return " ".join(pub.read_text().split()[:2]) == " ".join(str(announced).split()[:2])


def _switch(cfg: NodeConfig, rot: Rotation) -> None:
    """Make the new keys this node's own (each step idempotent), then trust them in its own store."""
    kd, nxt = cfg.keys_dir, cfg.keys_dir / NEXT
    if (nxt / keys.SIGNING_KEY).exists():
        if (kd / keys.SIGNING_KEY).exists():
            os.replace(kd / keys.SIGNING_KEY, kd / OLD_SIGNING)
            crashpoint("rotate.switching")
        os.replace(nxt / keys.SIGNING_KEY, kd / keys.SIGNING_KEY)
    if (nxt / f"{keys.SIGNING_KEY}.pub").exists():
        os.replace(nxt / f"{keys.SIGNING_KEY}.pub", kd / f"{keys.SIGNING_KEY}.pub")
    if (nxt / keys.AGE_KEY).exists():
        new_ids = (nxt / keys.AGE_KEY).read_text()
        old = (kd / keys.AGE_KEY).read_text()
        if new_ids.strip() not in old:  # the new identity first; the old ones still decrypt
            perms.write_private_atomic(kd / keys.AGE_KEY, (new_ids + old).encode())
        os.replace(nxt / f"{keys.AGE_KEY}.pub", kd / f"{keys.AGE_KEY}.pub")
        (nxt / keys.AGE_KEY).unlink()
    shutil.rmtree(nxt, ignore_errors=True)
    notice = keynotice.read_notice(rot.carried, cfg.id, sshsig.parse_public_line(
        json.loads(rot.carried["notice"])["old_key"]))
    trust_notice(cfg, notice)


def carried_notice(summary: dict[str, Any], sender: str, signer_key: Any) -> keynotice.KeyNotice | None:
    """The verified notice a bundle's summary carries, if any (FormatError/AuthenticityError if bad)."""
    if keynotice.SUMMARY_FIELD not in summary:
        return None
    return keynotice.read_notice(summary[keynotice.SUMMARY_FIELD], sender, signer_key)


def trust_notice(cfg: NodeConfig, notice: keynotice.KeyNotice) -> bool:
    """Trust the announced key from its start and end the old one at the overlap's end (idempotent).

    Only ever shortens the old key's validity (a revoked key stays revoked),
    and updates the peer's age recipient. Returns whether anything changed.
    """
    path = keys.trust_path(cfg)
    old_raw, new_raw = notice.old_key.public_bytes_raw(), notice.new_key.public_bytes_raw()
    out, changed, has_new = [], False, False
    for raw in path.read_text().splitlines():
        found = sshsig.AllowedSigners.parse(raw, source=str(path)).signers
        s = found[0] if found else None
        if s is not None and s.principals == (notice.node,) and not s.cert_authority:
            key = s.key.public_bytes_raw()
            has_new = has_new or key == new_raw
            if key == old_raw and (s.valid_before is None or s.valid_before > notice.old_valid_before):
                raw = sshsig.format_signer_line(notice.node, sshsig.public_line(s.key, s.comment),
                                                namespaces=",".join(s.namespaces or ()),
                                                valid_after=s.valid_after, valid_before=notice.old_valid_before)
                changed = True
        out.append(raw)
    if not has_new:
        out.append(sshsig.format_signer_line(notice.node, notice.new_key_line, valid_after=notice.new_valid_after))
        changed = True
    if changed:
        perms.write_private_atomic(path, "".join(line + "\n" for line in out).encode())
    peer = cfg.peers.get(notice.node)
    if peer is not None and peer.recipient != notice.new_recipient:
        from dataclasses import replace

        cfg.peers[notice.node] = replace(peer, recipient=notice.new_recipient)
        cfg.save()
        changed = True
    return changed


def accept(node: Node, notice: keynotice.KeyNotice) -> None:
    """A peer's notice, from a bundle being applied: trusted now, for the rest of this run too."""
    trust_notice(node.cfg, notice)  # Node.trust reads the file again: the next bundle meets the new key
