"""Why a server refused a key login, when the server is this machine and can tell.

Over the wire a refused key and an account that may not log in at all look the
same (sshd answers both with "publickey failed", so as not to reveal accounts).
The commonest case of the second is docs/SFTP.md's own: ``useradd --system``
creates the account locked (``!`` in /etc/shadow), and sshd with ``UsePAM no``
refuses a locked account whatever its keys. When the server is on this machine,
the account database says which: read it (/etc/shadow only when readable, as
root) and name the cause; elsewhere, say both and how to check each.
"""

from __future__ import annotations

import ipaddress
import pwd
import socket
from pathlib import Path

__all__ = ["is_this_machine", "account_problem", "UNLOCK"]

SHADOW = Path("/etc/shadow")
#: how docs/SFTP.md unlocks a system account for key logins only (``*`` is no valid password)
UNLOCK = "usermod -p '*' {user}"


def is_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine, without asking DNS (a loopback address or our own name)."""
    name = host.strip("[]").lower()
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    return name in {"localhost", socket.gethostname().lower()}  # no getfqdn(): no DNS on the way to an error


def _shadow_password(user: str, shadow: Path) -> str | None:
    """The account's password field in ``shadow``; None when unreadable (not root) or absent."""
    try:
        with open(shadow, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) > 1 and fields[0] == user:
                    return fields[1]
    except OSError:
        return None
    return None


def account_problem(user: str, shadow: Path = SHADOW) -> tuple[str, str] | None:
    """(what is wrong, the fix) with local account ``user`` that makes sshd refuse it; None if none seen."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return (f"there is no account {user!r} on this server",
                "Create it as docs/SFTP.md shows (useradd, then usermod -p '*'), or fix the user in the address.")
    password = _shadow_password(user, shadow)
    if password is not None and password.startswith("!"):
        return (f"account {user!r} on this server is locked (as `useradd --system` leaves it), so sshd refuses "
                "it whatever its keys",
                f"Unlock it for key logins only: {UNLOCK.format(user=user)} (docs/SFTP.md).")
    shell = Path(entry.pw_shell or "/bin/sh")
    if not shell.is_file():
        return (f"account {user!r} on this server has the shell {shell}, which does not exist, so sshd "
                "refuses it", f"Give it an existing shell: usermod -s /usr/sbin/nologin {user}.")
    return None
