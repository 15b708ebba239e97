"""Node keys: generation, loading with permission checks, and the trust store.

A node has an Ed25519 signing key in OpenSSH format (``keys/node_ed25519``)
and an age X25519 identity (``keys/node.age``); peers' signing keys are pinned
in ``keys/allowed_signers``, the OpenSSH format ``ssh-keygen -Y verify`` reads.
"""

from __future__ import annotations

import os
import stat
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exchange.errors import ConfigError, KeyPermissionError
from exchange.node import perms
from exchange.node.config import NodeConfig

if TYPE_CHECKING:
    from exchange.wire.crypto import sshsig

SIGNING_KEY = "node_ed25519"
AGE_KEY = "node.age"
TRUST_FILE = "allowed_signers"


def write_private(path: Path, data: bytes) -> None:
    """Create a file readable by its owner only (0600 whatever the umask), refusing to overwrite."""
    perms.create_private(path, data)


def check_private(path: Path) -> None:
    """Refuse a private key others can read or that another account owns, as OpenSSH does (POSIX only)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} is missing",
                          hint="Restore it from backup, or re-create the node with `exchange init`.") from None
    if sys.platform == "win32":
        return
    if st.st_uid not in (os.geteuid(), 0):
        raise KeyPermissionError(f"key file {path} {perms.mode_problem(st, private=True)}",
                                 hint=f"Run: {perms.owner_fix(path)}")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyPermissionError(
            f"permissions {stat.S_IMODE(st.st_mode):04o} for {path} are too open: "
            "a private key must not be accessible by group or others",
            hint=f"Run: {perms.chmod_fix(path)}")


def generate(cfg: NodeConfig) -> None:
    """Create the signing key, the age identity and a trust store naming this node."""
    from exchange.wire.crypto import age, sshsig

    kd = cfg.keys_dir
    perms.make_private_dir(kd)
    if (kd / SIGNING_KEY).exists() or (kd / AGE_KEY).exists():
        raise ConfigError(f"{kd} already holds keys; refusing to overwrite them")
    pem, pub = sshsig.generate_key(comment=f"exchange:{cfg.id}")
    write_private(kd / SIGNING_KEY, pem)
    write_private(kd / f"{SIGNING_KEY}.pub", (pub + "\n").encode())
    identity, recipient = age.generate_identity()
    write_private(kd / AGE_KEY, f"# exchange node {cfg.id}\n# public key: {recipient}\n{identity}\n".encode())
    write_private(kd / f"{AGE_KEY}.pub", (recipient + "\n").encode())
    add_signer(cfg, cfg.id, pub)


def load_signing_key(cfg: NodeConfig) -> Any:
    from exchange.wire.crypto import sshsig

    path = cfg.keys_dir / SIGNING_KEY
    if not path.exists() and (cfg.keys_dir / "next").is_dir():
        raise ConfigError(f"key file {path} is missing: a key rotation was interrupted",
                          hint="Run `exchange keys rotate` again: it finishes the rotation it announced.")
    check_private(path)
    return sshsig.load_private_key(path.read_bytes(), path=str(path))


def load_identities(cfg: NodeConfig, extra: Path | None = None) -> list[str]:
    path = extra or cfg.keys_dir / AGE_KEY
    return load_identity_file(path)


def load_identity_file(path: Path) -> list[str]:
    from exchange.wire.crypto import age

    check_private(path)
    ids = age.parse_identity_file(path.read_text())
    if not ids:
        raise ConfigError(f"{path}: no AGE-SECRET-KEY-1 identity in the file")
    return ids


def public_signing_line(cfg: NodeConfig) -> str:
    return (cfg.keys_dir / f"{SIGNING_KEY}.pub").read_text().strip()


def recipient(cfg: NodeConfig) -> str:
    return (cfg.keys_dir / f"{AGE_KEY}.pub").read_text().strip()


def trust_path(cfg: NodeConfig) -> Path:
    return cfg.keys_dir / TRUST_FILE


_parsed_trust: dict[str, tuple[bytes, sshsig.AllowedSigners]] = {}


def load_trust(cfg: NodeConfig) -> sshsig.AllowedSigners:
    """The trust store as it is on disk now.

    Read on every call, so a revocation or a rotation written by another process counts from the next
    file verified, also in a long-running worker; parsed (and indexed by principal) only when its bytes
    changed since the last call in this process: an HO verifying a thousand stores' bundles parsed a
    thousand-line file for each.
    """
    from exchange.wire.crypto import sshsig

    path = trust_path(cfg)
    perms.check_not_writable_by_others(cfg.keys_dir, "keys folder")
    if not path.exists():
        raise ConfigError(f"{path} is missing: no peer is trusted",
                          hint="Add peers with `exchange peer add`.")
    perms.check_not_writable_by_others(path, "trust store")
    try:
        raw = path.read_bytes()
        known = _parsed_trust.get(str(path))
        if known is not None and known[0] == raw:
            return known[1]
        trust = sshsig.AllowedSigners.parse(raw.decode("utf-8"), source=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read allowed signers file {path}: {exc}") from exc
    _parsed_trust[str(path)] = (raw, trust)
    return trust


def add_signer(cfg: NodeConfig, principal: str, key_line: str,
               valid_after: datetime | None = None, valid_before: datetime | None = None) -> str:
    """Append a principal's key to ``allowed_signers`` (after checking it parses)."""
    from exchange.wire.crypto import sshsig

    sshsig.parse_public_line(key_line)
    line = sshsig.format_signer_line(principal, " ".join(key_line.split()[:2]),
                                     valid_after=valid_after, valid_before=valid_before)
    path = trust_path(cfg)
    existing = path.read_text() if path.exists() else ""
    if line not in existing.splitlines():
        perms.write_private_atomic(path, (existing + line + "\n").encode())
    return line


def retire_signer(cfg: NodeConfig, principal: str, at: datetime, note: str = "") -> list[str]:
    """Give every key line of ``principal`` still valid at ``at`` a ``valid-before`` of ``at``.

    Lines are rewritten in place (never removed), so files signed before ``at``
    keep verifying; returns the retired keys' fingerprints. ``note`` becomes the
    line's comment (after the key, where ssh-keygen ignores it): a revocation
    names itself there, so a refusal can say why the key ended.
    """
    from exchange.wire.crypto import sshsig

    path = trust_path(cfg)
    out, retired = [], []
    for raw in (path.read_text() if path.exists() else "").splitlines():
        found = sshsig.AllowedSigners.parse(raw, source=str(path)).signers
        s = found[0] if found else None
        if (s is None or s.cert_authority or s.principals != (principal,)
                or (s.valid_before is not None and s.valid_before <= at)):
            out.append(raw)
            continue
        if s.valid_after is not None and s.valid_after >= at:
            raise ConfigError(f"key {sshsig.fingerprint(s.key)} of {principal} only starts at {s.valid_after:%Y-%m-%d %H:%M:%S} "
                              f"UTC, after {at:%Y-%m-%d %H:%M:%S} UTC: it cannot end before it starts",
                              hint="Give a later time, or check the trust store with `exchange keys list`.")
        out.append(sshsig.format_signer_line(
            principal, sshsig.public_line(s.key, note or s.comment), namespaces=",".join(s.namespaces or ()),
            valid_after=s.valid_after, valid_before=at))
        retired.append(sshsig.fingerprint(s.key))
    perms.write_private_atomic(path, "".join(line + "\n" for line in out).encode())
    return retired


REVOKED = "revoked"  # first word of the comment a revocation writes on the key's trust line
MAX_REASON = 200


def revoke_signer(cfg: NodeConfig, principal: str, at: datetime, reason: str = "") -> list[str]:
    """End every key of ``principal`` at ``at`` and mark the lines as revoked (why, by whom, when).

    Unlike a rotation nothing replaces the key: what it signed before ``at``
    stays verifiable, anything it signs from then on is refused, and the peer
    is trusted again only with new keys (``peer add --replace``).
    """
    if principal == cfg.id:
        raise ConfigError(f"{principal} is this node itself: a node does not revoke its own key",
                          hint="Rotate it with `exchange keys rotate`, or revoke it at its peers.")
    if principal not in cfg.peers:
        raise ConfigError(f"no peer {principal!r} in {cfg.home / 'exchange.toml'}",
                          hint="`exchange peer list` shows the peers.")
    reason = " ".join(reason.split())
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise ConfigError(f"--reason must be one printable line of at most {MAX_REASON} characters")
    now = datetime.now(at.tzinfo).replace(microsecond=0)
    note = (f"{REVOKED} by {cfg.id} on {now:%Y-%m-%dT%H:%M:%SZ} from {at:%Y-%m-%dT%H:%M:%SZ}"
            + (f": {reason}" if reason else ""))
    return retire_signer(cfg, principal, at, note)


def check_current(trust: sshsig.AllowedSigners, principal: str, key: Any, now: datetime | None = None) -> None:
    """A live node accepts a signed file only while the key that signed it is still trusted *now*.

    The signature is checked at the file's signed ``created`` time, and the
    signer chooses that time: a retired or stolen key could date a new file
    before its end. So on arrival the key must also be valid now (an auditor,
    who has no arrival time, checks at ``created`` only). AuthenticityError
    naming the revocation or the retirement otherwise.
    """
    from exchange.errors import AuthenticityError
    from exchange.wire.crypto import sshsig

    try:
        trust.check(principal, key, sshsig.NAMESPACE, now)
        return
    except AuthenticityError:
        pass
    raw = key.public_bytes_raw()
    lines = [s for s in trust.signers if principal in s.principals and s.key.public_bytes_raw() == raw]
    ends = [s.valid_before for s in lines if s.valid_before is not None]
    end = f"{max(ends):%Y-%m-%d %H:%M:%S} UTC" if ends else "?"
    fp = sshsig.fingerprint(key)
    revoked = [s.comment for s in lines if s.comment.split(" ", 1)[0] == REVOKED]
    if revoked:
        raise AuthenticityError(
            f"signature: key {fp} of {principal} was {revoked[0]}: nothing it signs is accepted after {end}",
            hint=f"The key was revoked (`exchange keys list`). Do not trust it again; once {principal} has new "
                 "keys, pin them with `exchange peer add --replace` (docs/OPERATIONS.md, \"A store's PC was stolen\").")
    raise AuthenticityError(
        f"signature: key {fp} of {principal} was retired at {end}: it is no longer accepted, whatever time "
        "the file states",
        hint=f"{principal} must sign with its current key (compare `exchange identity` there with "
             "`exchange keys list` here); a file it sealed before the change must be sealed again.")


WARN_DAYS = 14  # `exchange doctor` warns this many days ahead of a key's end ([keys] warn_days in exchange.toml)


def warn_days(cfg: NodeConfig) -> int:
    """``[keys] warn_days`` from exchange.toml, else :data:`WARN_DAYS`."""
    section = cfg.extra.get("keys", {})
    value = section.get("warn_days", WARN_DAYS) if isinstance(section, dict) else WARN_DAYS
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 3650:
        raise ConfigError(f"[keys] warn_days = {value!r} in exchange.toml: give a number of days from 0 to 3650")
    return value


def key_states(trust: sshsig.AllowedSigners, now: datetime) -> list[dict[str, Any]]:
    """Every key line with its state at ``now``: valid, not-yet-valid, retired or revoked."""
    from exchange.wire.crypto import sshsig

    out = []
    for s in trust.signers:
        if s.valid_after is not None and now < s.valid_after:
            state = "not-yet-valid"
        elif s.valid_before is not None and now > s.valid_before:
            state = REVOKED if s.comment.split(" ", 1)[0] == REVOKED else "retired"
        else:
            state = "valid"
        out.append({"principal": ",".join(s.principals), "fingerprint": sshsig.fingerprint(s.key),
                    "valid_after": s.valid_after, "valid_before": s.valid_before, "state": state,
                    "note": s.comment})
    return out


def ending_keys(trust: sshsig.AllowedSigners, principals: list[str], now: datetime, days: int) -> list[str]:
    """Principals whose trust ends within ``days`` (or has ended) with no key to follow, each as a sentence.

    A principal is covered up to the latest end among its keys valid now or
    later; a rotation's old key ending inside its overlap is fine as long as
    the new key goes on.
    """
    from datetime import timedelta

    out = []
    horizon = now + timedelta(days=days)
    for p in principals:
        mine = [s for s in trust.signers if p in s.principals and not s.cert_authority]
        live = [s for s in mine if s.valid_before is None or s.valid_before > now]
        if not live:
            ended = max((s.valid_before for s in mine if s.valid_before is not None), default=None)
            revoked = any(s.comment.split(" ", 1)[0] == REVOKED for s in mine)
            out.append(f"{p} has no valid key: " + (f"{'revoked' if revoked else 'ended'} at "
                                                    f"{ended:%Y-%m-%d %H:%M:%S} UTC" if ended else "none pinned"))
            continue
        if any(s.valid_before is None for s in live):
            continue
        end = max(s.valid_before for s in live if s.valid_before is not None)
        if end <= horizon:
            out.append(f"{p}'s key ends at {end:%Y-%m-%d %H:%M:%S} UTC (in {(end - now).days} days) "
                       "and no key follows it")
    return out


ROTATION_STATE = "rotation.json"  # exchange.node.rotation's state; read here too, without SQLAlchemy


def rotation_announcing(cfg: NodeConfig) -> bool:
    """A key rotation some peer may not have confirmed yet (its notice must still travel)."""
    import json

    try:
        state = json.loads((cfg.keys_dir / ROTATION_STATE).read_bytes())
    except FileNotFoundError:
        return False
    except ValueError:
        return True  # unreadable: the full cycle reports it
    return not (isinstance(state, dict) and state.get("complete") is True)
