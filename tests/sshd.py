"""A private OpenSSH server for the SFTP tests and the benchmark (see RECIPES.md).

Why a real sshd rather than a paramiko test server: chroot, ``internal-sftp``,
``posix-rename@openssh.com`` and OpenSSH's flow control are exactly what the HO
runs, and a fake server would only test our own assumptions.

Layout, all under one root-owned 0755 folder made with ``mkdtemp`` in ``/srv``
(sshd refuses a chroot whose ancestors are group/other writable, so ``/tmp``
does not work)::

    /srv/xchg-test.XXXX/etc/          sshd_config, host key, log, keys/<user>
    /srv/xchg-test.XXXX/<store>/      root-owned 0755: the store's chroot
    /srv/xchg-test.XXXX/<store>/up/   owned by the store's OS user
    /srv/xchg-test.XXXX/<store>/down/ owned by the store's OS user

Each store logs in as its own system user (``xt<random><store>``, removed at
teardown) locked into its folder by ``Match User`` / ``ChrootDirectory`` /
``ForceCommand internal-sftp``. The HO logs in as root without a chroot.

Usable as a pytest plugin (``pytest_plugins = ["sshd"]``: fixture ``sshd``)
and as a plain context manager (``with SshdServer() as srv:``) by tools.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
STORES = ("s001", "s002")
HO_USER = "root"


def unavailable_reason() -> str | None:
    """Why a private sshd cannot run here, or None when it can."""
    if sys.platform == "win32":
        return "the OpenSSH server fixture needs Linux"
    if not SSHD.exists():
        return f"{SSHD} is missing (apt-get install openssh-server; tools/test.sh does)"
    if os.geteuid() != 0:
        return "the sshd fixture needs root (it creates OS users and chroot folders)"
    if shutil.which(SSH_KEYGEN) is None:
        return "ssh-keygen is missing (apt-get install openssh-client)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (scans /proc: works without pgrep)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class StoreAccount:
    store: str
    user: str
    folder: Path  # the chroot: the store sees it as "/"


class SshdServer:
    """One sshd on 127.0.0.1 with a chrooted SFTP account per store."""

    def __init__(self, stores: Sequence[str] = STORES, log_level: str = "ERROR") -> None:
        self.stores = tuple(stores)
        self.log_level = log_level
        self.tag = "xt" + secrets.token_hex(3)
        self.root = Path(tempfile.mkdtemp(prefix="xchg-test.", dir="/srv"))
        self.root.chmod(0o755)
        self.etc = self.root / "etc"
        self.keys = self.etc / "keys"
        self.config = self.etc / "sshd_config"
        self.log = self.etc / "sshd.log"
        self.host_key = self.etc / "ssh_host_ed25519_key"
        self.port = 0
        self.accounts: dict[str, StoreAccount] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> SshdServer:
        try:
            self._prepare()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation folder
        self.keys.mkdir(parents=True)
        self.etc.chmod(0o755)
        self.keys.chmod(0o755)
        _run(SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "xchg-test-host", "-f", str(self.host_key))
        for store in self.stores:
            user = f"{self.tag}{store}"
            _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user)
            # A system account starts locked; with UsePAM no sshd refuses a locked account.
            self.accounts[store] = StoreAccount(store, user, self.root / store)
            _run("usermod", "-p", "*", user)
            folder = self.root / store
            folder.mkdir(mode=0o755)
            folder.chmod(0o755)
            for sub in ("up", "down"):
                (folder / sub).mkdir(mode=0o755)
                shutil.chown(folder / sub, user, user)
            (self.keys / user).touch(mode=0o644)
        (self.keys / HO_USER).touch(mode=0o644)
        self.port = free_port()
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.etc / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.keys}/%u",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "MaxStartups 100:30:200",
            "Subsystem sftp internal-sftp",
            f"LogLevel {self.log_level}",
        ]
        for acc in self.accounts.values():
            lines += [f"Match User {acc.user}",
                      f"    ChrootDirectory {acc.folder}",
                      "    ForceCommand internal-sftp",
                      "    AllowTcpForwarding no",
                      "    X11Forwarding no"]
        self.config.write_text("\n".join(lines) + "\n")
        check = subprocess.run([str(SSHD), "-t", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t refused the config: {check.stderr.strip()}")

    def _launch(self) -> None:
        self.proc = subprocess.Popen([str(SSHD), "-D", "-f", str(self.config), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not listen on port {self.port}: {self.log_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.kill_sessions()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        for acc in self.accounts.values():
            subprocess.run(["userdel", acc.user], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.accounts.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SshdServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- helpers for tests ---------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def host_public_line(self) -> str:
        return Path(f"{self.host_key}.pub").read_text().strip()

    def store_address(self, store: str) -> str:
        """The address a store's node uses: its chroot is "/"."""
        return f"sftp://{self.accounts[store].user}@127.0.0.1:{self.port}/"

    def ho_address(self, store: str) -> str:
        """The address the HO uses for one store's folder (no chroot)."""
        return f"sftp://{HO_USER}@127.0.0.1:{self.port}{self.accounts[store].folder}"

    def authorize(self, user: str, public_line: str) -> None:
        """Let ``user`` log in with that key (sshd reads the file at each login)."""
        path = self.keys / user
        with open(path, "a") as f:
            f.write(public_line.strip() + "\n")

    def deauthorize(self, user: str) -> None:
        (self.keys / user).write_text("")

    def sessions(self) -> list[int]:
        return _children(self.proc.pid) if self.proc else []

    def kill_sessions(self) -> int:
        """SIGKILL every process serving a connection: a cut link, seen from the client."""
        pids = self.sessions()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def clean(self) -> None:
        """Empty every store's up/ and down/ (between tests sharing the server)."""
        for acc in self.accounts.values():
            for sub in ("up", "down"):
                for f in (acc.folder / sub).iterdir():
                    if f.is_dir():
                        shutil.rmtree(f)
                    else:
                        f.unlink()


def require_sshd() -> None:
    """Skip when no private sshd can run; fail instead under CI=true (no silent gaps)."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " and CI=true: the SFTP tests must run in CI")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshdServer]:
    """One sshd for the whole session (users and folders removed at the end)."""
    require_sshd()
    with SshdServer() as srv:
        yield srv


@pytest.fixture
def sshd(sshd_server: SshdServer) -> Iterator[SshdServer]:
    """The session's sshd, with every store's folders emptied after the test."""
    yield sshd_server
    sshd_server.kill_sessions()
    sshd_server.clean()


MISSING_INTERNAL = "_gone_from_this_paramiko"


@pytest.fixture
def stock_paramiko(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The SFTP fast path disabled exactly as a paramiko lacking one of its internals disables it:
    the start-up check finds a name it needs missing and the transport runs on stock paramiko."""
    import paramiko

    from exchange.transport.sftp import fastpath, session_kind

    monkeypatch.setattr(fastpath, "REQUIRED", (*fastpath.REQUIRED, (paramiko.SFTPClient, MISSING_INTERNAL)))
    session_kind.cache_clear()  # checked once per process: check again with the name missing
    yield
    session_kind.cache_clear()  # the next test checks the real paramiko again


@pytest.fixture(params=["fast", "stock"])
def sftp_path(request: pytest.FixtureRequest) -> str:
    """Run the test on the SFTP fast path, then on stock paramiko (as when an internal is missing)."""
    from exchange.transport.sftp import session_kind
    from exchange.transport.sftp.fastpath import FastSession

    if request.param == "stock":
        request.getfixturevalue("stock_paramiko")
    assert (session_kind() is FastSession) == (request.param == "fast")
    return str(request.param)


@dataclass
class SftpHomes:
    """Node homes (made by ``init_home``) whose keys the sshd accepts and which trust its host key."""

    ho: Path
    stores: dict[str, Path]


def make_home(srv: SshdServer, path: Path, node: str, *, authorize_as: str | None,
              trust: str | None) -> Path:
    """A node home; its key authorized for ``authorize_as``; ``trust``'s host key pinned."""
    from exchange.node.home import init_home
    from exchange.node.keys import public_signing_line
    from exchange.transport.sftp.address import trust_host

    cfg = init_home(path, node, "ho" if node == "ho" else "store")
    if authorize_as:
        srv.authorize(authorize_as, public_signing_line(cfg))
    if trust:
        trust_host(cfg.home, trust)
    return cfg.home


@pytest.fixture(scope="session")
def sftp_homes(sshd_server: SshdServer, tmp_path_factory: pytest.TempPathFactory) -> SftpHomes:
    """An HO home (logs in as root) and one home per store (logs in as the store's account)."""
    base = tmp_path_factory.mktemp("sftp-homes")
    ho = make_home(sshd_server, base / "ho", "ho", authorize_as=HO_USER,
                   trust=sshd_server.ho_address(sshd_server.stores[0]))
    stores = {s: make_home(sshd_server, base / s, s, authorize_as=sshd_server.accounts[s].user,
                           trust=sshd_server.store_address(s))
              for s in sshd_server.stores}
    return SftpHomes(ho, stores)
