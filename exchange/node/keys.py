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


def load_trust(cfg: NodeConfig) -> sshsig.AllowedSigners:
    from exchange.wire.crypto import sshsig

    path = trust_path(cfg)
    perms.check_not_writable_by_others(cfg.keys_dir, "keys folder")
    if not path.exists():
        raise ConfigError(f"{path} is missing: no peer is trusted",
                          hint="Add peers with `exchange peer add`.")
    return sshsig.AllowedSigners.load(path)


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


def retire_signer(cfg: NodeConfig, principal: str, at: datetime) -> list[str]:
    """Give every key line of ``principal`` still valid at ``at`` a ``valid-before`` of ``at``.

    Lines are rewritten in place (never removed), so files signed before ``at``
    keep verifying; returns the retired keys' fingerprints.
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
        out.append(sshsig.format_signer_line(
            principal, sshsig.public_line(s.key), namespaces=",".join(s.namespaces or ()),
            valid_after=s.valid_after, valid_before=at))
        retired.append(sshsig.fingerprint(s.key))
    perms.write_private_atomic(path, "".join(line + "\n" for line in out).encode())
    return retired
