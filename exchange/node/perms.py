"""Private files of a node home: created 0600 / 0700 whatever the umask, refused when others can write them.

A node home holds secrets (keys), the trust store that decides whose bundles
apply (``allowed_signers``, ``known_hosts``), the configuration naming peers
and the database. Another account that can write any of them can make this
node trust its key, so modes are set explicitly at creation (never left to the
umask) and checked again at load, with the ``chmod`` that fixes a bad one.
POSIX only: on Windows the home is protected with NTFS permissions
(docs/SERVICE.md).
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

from exchange.errors import ConfigError
from exchange.files import create_file, write_file_atomic

FILE_MODE = 0o600
DIR_MODE = 0o700


def posix() -> bool:
    return sys.platform != "win32"


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents, with default modes) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True)
    if posix():
        os.chmod(path, DIR_MODE)


def make_private_dirs(root: Path, path: Path) -> None:
    """Create ``path`` and every folder between it and ``root`` 0700 (``root`` must exist)."""
    current = root
    for name in path.relative_to(root).parts:
        current = current / name
        make_private_dir(current)


def create_private(path: Path, data: bytes = b"") -> None:
    """Create ``path`` 0600 with ``data`` (durably), refusing to overwrite anything already there."""
    create_file(path, data, mode=FILE_MODE)


def write_private_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, 0600: exchange.files' one durable write, in its private mode."""
    write_file_atomic(path, data, mode=FILE_MODE)


def chmod_fix(path: Path, is_dir: bool = False) -> str:
    """The exact command that gives ``path`` its private mode."""
    return f"chmod {'700' if is_dir else '600'} {shlex.quote(str(path))}"


def mode_problem(st: os.stat_result, *, private: bool) -> str | None:
    """What is wrong with a file's owner or mode, or None.

    ``private`` also refuses read access by group or others (a secret, or the
    doctor's check); otherwise only write access by them is refused.
    """
    if st.st_uid not in (os.geteuid(), 0):
        return f"is owned by uid {st.st_uid}, not by this account (uid {os.geteuid()}) or root"
    mode = stat.S_IMODE(st.st_mode)
    bad = (stat.S_IRWXG | stat.S_IRWXO) if private else (stat.S_IWGRP | stat.S_IWOTH)
    if mode & bad:
        who = " and ".join(w for w, bits in (("group", stat.S_IRWXG), ("others", stat.S_IRWXO)) if mode & bad & bits)
        what = "accessible" if private else "writable"
        return f"has mode {mode:04o}: {what} by {who}"
    return None


def owner_fix(path: Path) -> str:
    return f"chown {os.geteuid()} {shlex.quote(str(path))} (as root), then {chmod_fix(path, path.is_dir())}"


def check_not_writable_by_others(path: Path, what: str) -> None:
    """Refuse a trust store, config or key (or its folder) that another account can write.

    Follows a symbolic link: what matters is the file actually read.
    """
    if not posix():
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # the caller reports a missing file in its own words
    problem = mode_problem(st, private=False)
    if problem is None:
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    fix = owner_fix(path) if st.st_uid not in (os.geteuid(), 0) else chmod_fix(path, is_dir)
    raise ConfigError(f"{what} {path} {problem}; another account could change what this node trusts",
                      hint=f"Run: {fix}")
