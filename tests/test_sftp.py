"""The SFTP transport against a real OpenSSH server (tests/sshd.py).

What is checked here is what a careless transport gets wrong in the field:
host keys learnt silently, a store reaching another store's folder, a cut
link leaving a half file under a complete name or restarting from zero,
a remote file removed before our copy is durable, and retrying what can
never succeed (a refused login) or giving up on what would (a reset).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import socket
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from sshd import MISSING_INTERNAL, SftpHomes, SshdServer, free_port, make_home

from exchange.errors import ConfigError, ExchangeError, TransientTransportError, TransportError
from exchange.transport import open_transport
from exchange.transport.drop import DropTransport
from exchange.transport.retry import Retry
from exchange.transport.sftp import Progress, SftpTransport, session_kind
from exchange.transport.sftp.address import HostKeyError, SftpAddress, fetch_host_key, load_login_key, trust_host
from exchange.transport.sftp.fastpath import FastSession, missing_internals
from exchange.transport.sftp.session import StockSession

FAST_RETRY = Retry(attempts=3, base=0.01)
ONE_SHOT = Retry(attempts=1)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def server_fingerprint(srv: SshdServer) -> str:
    return paramiko.Ed25519Key(filename=str(srv.host_key)).fingerprint


def store_transport(srv: SshdServer, homes: SftpHomes, store: str = "s001", retry: Retry | None = None,
                    progress: Progress | None = None) -> SftpTransport:
    return SftpTransport.from_address(srv.store_address(store), home=homes.stores[store], me=store,
                                      retry=retry, progress=progress)


def ho_transport(srv: SshdServer, homes: SftpHomes, store: str = "s001") -> SftpTransport:
    return SftpTransport.from_address(srv.ho_address(store), home=homes.ho, me="ho")


def cut_after(srv: SshdServer, fraction: float) -> Callable[[str, int, int], None]:
    """A progress callback that kills the server's session processes once, part-way through."""
    state = {"cut": False}

    def progress(name: str, done: int, total: int) -> None:
        if not state["cut"] and done >= total * fraction:
            state["cut"] = True
            assert srv.kill_sessions() > 0
    return progress


# -- addresses (no server needed) ---------------------------------------------------


def test_address_parsing() -> None:
    a = SftpAddress.parse("sftp://xs001@ho.example.com:2222/")
    assert (a.user, a.host, a.port, a.path, a.host_id) == ("xs001", "ho.example.com", 2222, "/",
                                                          "[ho.example.com]:2222")
    b = SftpAddress.parse("sftp://xchg@10.0.0.5/srv/xchg/s001")
    assert (b.port, b.path, b.host_id) == (22, "/srv/xchg/s001", "10.0.0.5")
    for bad in ("sftp://host/", "sftp://u@host:99999/", "sftp://u:secret@host/", "ftp://u@host/"):
        with pytest.raises(ConfigError):
            SftpAddress.parse(bad)


def test_direction_needs_a_role() -> None:
    with pytest.raises(ConfigError, match="HO or a store"):
        SftpTransport.from_address("sftp://u@h:2222/")


def test_open_transport_schemes(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    t = open_transport(sshd.store_address("s001"), home=sftp_homes.stores["s001"], me="s001", peer="ho")
    assert isinstance(t, SftpTransport) and t.side == "store"
    d = open_transport(f"drop:{tmp_path}", home=sftp_homes.ho, me="ho", peer="s001")
    assert isinstance(d, DropTransport) and d.side == "ho"
    t.close()


def test_login_key_permission_checked(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    home = tmp_path / "copy"
    shutil.copytree(sftp_homes.stores["s001"], home)
    key = home / "keys" / "node_ed25519"
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="too open"):
        load_login_key(home)


# -- both directions with real node homes ---------------------------------------------------


def test_store_pushes_up_and_ho_pulls(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    src = random_file(tmp_path / "s001.ho.0000000001.bundle", 3_000_017)
    with store_transport(sshd, sftp_homes) as t:
        assert t.push([src], "ho") == [src]
    up = sshd.accounts["s001"].folder / "up"
    assert digest(up / src.name) == digest(src)
    assert src.exists()  # push never removes the source
    info = up / "node-s001.json"
    assert info.exists()  # the store published its version for the HO's doctor

    dest = tmp_path / "inbox"
    dest.mkdir()
    with ho_transport(sshd, sftp_homes) as t:
        assert t.pull("ho", dest) == [dest / src.name]
        probe = t.probe("ho", "s001")
    assert digest(dest / src.name) == digest(src)
    assert not (up / src.name).exists()
    assert probe["peer_info"]["node"] == "s001"
    assert abs(probe["server_time"] - os.path.getmtime(dest / src.name)) < 120


def test_ho_pushes_down_and_store_pulls(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    files = [random_file(tmp_path / f"ho.s001.{n:010d}.bundle", size)
             for n, size in ((1, 0), (2, 1), (3, 5 << 20))]
    with ho_transport(sshd, sftp_homes) as t:
        assert t.push(files, "s001") == files
    down = sshd.accounts["s001"].folder / "down"
    assert sorted(p.name for p in down.iterdir() if p.name.endswith(".bundle")) == [f.name for f in files]
    dest = tmp_path / "inbox"
    dest.mkdir()
    with store_transport(sshd, sftp_homes) as t:
        got = t.pull("s001", dest)
    assert got == [dest / f.name for f in files]
    for f in files:
        assert digest(dest / f.name) == digest(f)
    assert not any(p.name.endswith(".bundle") for p in down.iterdir())
    assert not list(dest.glob("*.part"))


# -- host keys ----------------------------------------------------------------------------


def test_unknown_host_key_refused_then_trusted(sshd: SshdServer, tmp_path: Path) -> None:
    user = sshd.accounts["s002"].user
    home = make_home(sshd, tmp_path / "s002", "s002", authorize_as=user, trust=None)
    address = sshd.store_address("s002")
    src = random_file(tmp_path / "s002.ho.0000000001.bundle", 1000)
    t = SftpTransport.from_address(address, home=home, retry=FAST_RETRY)
    with pytest.raises(TransportError) as info:
        t.push([src], "ho")
    err = info.value
    assert not isinstance(err, TransientTransportError)
    assert server_fingerprint(sshd) in str(err)
    assert f"exchange peer trust-host --home {home} --address {address}" in str(err)
    assert not (home / "known_hosts").exists()  # nothing learnt silently
    assert not list((sshd.accounts["s002"].folder / "up").iterdir())

    assert fetch_host_key("127.0.0.1", sshd.port).fingerprint == server_fingerprint(sshd)
    assert trust_host(home, address) == server_fingerprint(sshd)
    assert t.push([src], "ho") == [src]
    t.close()
    # the file is OpenSSH's own format: ssh-keygen finds the [host]:port entry
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(home / "known_hosts")],
                           capture_output=True, text=True)
    assert found.returncode == 0 and "ssh-ed25519" in found.stdout


def test_changed_host_key_refused(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    home = tmp_path / "copy"
    shutil.copytree(sftp_homes.stores["s001"], home)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = paramiko.Ed25519Key(filename=str(tmp_path / "other"))
    pinned = f"[127.0.0.1]:{sshd.port} ssh-ed25519 {other.get_base64()}\n"
    (home / "known_hosts").write_text("# pinned by hand\n" + pinned)
    address = sshd.store_address("s001")
    src = random_file(tmp_path / "s001.ho.0000000001.bundle", 1000)
    t = SftpTransport.from_address(address, home=home, retry=FAST_RETRY)
    with pytest.raises(HostKeyError) as info:
        t.push([src], "ho")
    msg = str(info.value)
    assert "CHANGED" in msg and server_fingerprint(sshd) in msg and other.fingerprint in msg
    assert "exchange peer trust-host --home" in msg
    assert (home / "known_hosts").read_text() == "# pinned by hand\n" + pinned

    with pytest.raises(HostKeyError, match="not the expected"):
        trust_host(home, address, expected=other.fingerprint)
    assert (home / "known_hosts").read_text() == "# pinned by hand\n" + pinned
    assert trust_host(home, address, expected=server_fingerprint(sshd)) == server_fingerprint(sshd)
    lines = (home / "known_hosts").read_text().splitlines()
    assert lines[0] == "# pinned by hand" and len(lines) == 2 and other.get_base64() not in lines[1]
    assert t.push([src], "ho") == [src]
    t.close()


def test_openssh_accepts_our_known_hosts(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    home = sftp_homes.stores["s001"]
    batch = tmp_path / "batch"
    batch.write_text("ls up\n")
    run = subprocess.run(["sftp", "-q", "-b", str(batch), "-i", str(home / "keys" / "node_ed25519"),
                          "-P", str(sshd.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                          "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={home / 'known_hosts'}",
                          "-o", "GlobalKnownHostsFile=/dev/null", f"{sshd.accounts['s001'].user}@127.0.0.1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -- isolation between stores ------------------------------------------------------------


def test_store_is_confined_to_its_folder(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    home = sftp_homes.stores["s001"]
    other = sshd.accounts["s002"].folder
    (other / "down" / "ho.s002.0000000001.bundle").write_bytes(b"for s002 only")
    src = random_file(tmp_path / "s001.ho.0000000001.bundle", 100)
    for path in ("/../s002", str(other)):
        address = f"sftp://{sshd.accounts['s001'].user}@127.0.0.1:{sshd.port}{path}"
        with SftpTransport.from_address(address, home=home, retry=FAST_RETRY) as t:
            with pytest.raises(TransportError, match="not found") as info:
                t.push([src], "ho")
            assert not isinstance(info.value, TransientTransportError)
            with pytest.raises(TransportError, match="not found"):
                t.pull("s001", tmp_path)
    assert [p.name for p in (other / "up").iterdir()] == []
    assert (other / "down" / "ho.s002.0000000001.bundle").read_bytes() == b"for s002 only"

    # the raw SFTP view: its own folder is the root, nothing else is visible or writable
    client = paramiko.SSHClient()
    client.load_host_keys(str(home / "known_hosts"))
    client.connect("127.0.0.1", sshd.port, username=sshd.accounts["s001"].user,
                   pkey=load_login_key(home), allow_agent=False, look_for_keys=False)
    try:
        sftp = client.open_sftp()
        assert sorted(sftp.listdir("/")) == ["down", "up"]
        assert sorted(sftp.listdir("/..")) == ["down", "up"]
        for path in ("/../s002/down", f"{other}/down", str(sshd.root)):
            with pytest.raises(FileNotFoundError):
                sftp.listdir(path)
        with pytest.raises(FileNotFoundError):
            sftp.open(f"{other}/up/x", "wb")
        with pytest.raises(PermissionError):
            sftp.open("/x", "wb")  # the chroot itself is root's
    finally:
        client.close()


# -- failures: what is retried and what is not ------------------------------------------------


def count_connects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = SftpTransport._connect

    def counting(self: SftpTransport) -> object:
        calls.append(1)
        return real(self)
    monkeypatch.setattr(SftpTransport, "_connect", counting)
    return calls


def test_closed_port_is_transient_and_retried(sftp_homes: SftpHomes, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    calls = count_connects(monkeypatch)
    address = f"sftp://nobody@127.0.0.1:{free_port()}/"
    src = random_file(tmp_path / "s001.ho.0000000001.bundle", 10)
    with caplog.at_level(logging.WARNING, logger="exchange.transport.sftp"):
        with SftpTransport.from_address(address, home=sftp_homes.stores["s001"], retry=FAST_RETRY) as t:
            with pytest.raises(TransientTransportError, match="gave up after 3 attempts"):
                t.push([src], "ho")
    assert len(calls) == 3
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_refused_login_is_not_retried(sshd: SshdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(sshd, tmp_path / "stranger", "stranger", authorize_as=None,
                     trust=sshd.store_address("s001"))
    calls = count_connects(monkeypatch)
    src = random_file(tmp_path / "stranger.ho.0000000001.bundle", 10)
    with SftpTransport.from_address(sshd.store_address("s001"), home=home, retry=FAST_RETRY) as t:
        with pytest.raises(TransportError, match="refused the login") as info:
            t.push([src], "ho")
    assert not isinstance(info.value, TransientTransportError)
    assert "authorized" in info.value.hint
    assert len(calls) == 1


def test_incompatible_server_is_refused_not_retried(sftp_homes: SftpHomes, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A server speaking SSH 1 on 127.0.0.1: paramiko's IncompatiblePeer (its type, not its message
    text) is a refusal with a hint, tried once."""
    calls = count_connects(monkeypatch)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    served: list[int] = []

    def serve() -> None:
        try:
            while len(served) < 3:
                conn, _ = listener.accept()
                served.append(1)
                with conn:
                    conn.sendall(b"SSH-1.5-OldServer\r\n")
                    conn.settimeout(5)
                    try:
                        conn.recv(1024)
                    except OSError:
                        pass
        except OSError:
            pass  # closed at the end of the test
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    address = f"sftp://nobody@127.0.0.1:{listener.getsockname()[1]}/"
    src = random_file(tmp_path / "s001.ho.0000000001.bundle", 10)
    try:
        with SftpTransport.from_address(address, home=sftp_homes.stores["s001"], retry=FAST_RETRY,
                                        timeout=10) as t:
            with pytest.raises(TransportError, match="no common SSH algorithms") as info:
                t.push([src], "ho")
    finally:
        listener.close()
        thread.join(10)
    assert not isinstance(info.value, TransientTransportError) and "OpenSSH" in info.value.hint
    assert len(calls) == 1


def test_retry_wrapper_retries_only_transient_failures() -> None:
    """The one retry path (transport/retry.py): backoff on a broken link up to the limit, a refusal
    at once, a bug (unclassified) untouched; the clean-up runs after every classified failure."""
    from exchange.transport.retry import with_retry

    def classify(exc: Exception) -> ExchangeError | None:
        if isinstance(exc, ExchangeError):
            return exc
        return TransientTransportError(f"link: {exc}") if isinstance(exc, ConnectionError) else None

    def failing(errors: list[Exception]) -> Callable[[], str]:
        def op() -> str:
            calls.append(1)
            if errors:
                raise errors.pop(0)
            return "done"
        return op
    policy = Retry(attempts=3, base=0.5, max_delay=0.75)
    for errors, outcome, n_calls, sleeps, n_cleaned in [
            ([ConnectionResetError("reset")] * 2, "done", 3, [0.5, 0.75], 2),
            ([ConnectionResetError("reset")] * 3, "gave up after 3 attempts", 3, [0.5, 0.75], 3),
            ([TransportError("permission denied")], "permission denied", 1, [], 1),
            ([ValueError("a bug")], "a bug", 1, [], 0)]:
        calls: list[int] = []
        slept: list[float] = []
        cleaned: list[ExchangeError] = []
        run = failing(list(errors))
        if outcome == "done":
            assert with_retry(run, policy=policy, classify=classify, after_failure=cleaned.append, where="t",
                              sleep=slept.append) == "done"
        else:
            with pytest.raises((ExchangeError, ValueError), match=outcome) as info:
                with_retry(run, policy=policy, classify=classify, after_failure=cleaned.append, where="t",
                           sleep=slept.append)
            assert type(info.value) is (ValueError if "bug" in outcome else
                                        TransportError if "permission" in outcome else TransientTransportError)
        assert (len(calls), slept, len(cleaned)) == (n_calls, sleeps, n_cleaned)


# -- cut links and resume ----------------------------------------------------------------------


def test_cut_upload_resumes_on_next_push(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture, sftp_path: str) -> None:
    src = random_file(tmp_path / "s001.ho.0000000001.bundle", 24 << 20)
    up = sshd.accounts["s001"].folder / "up"
    with store_transport(sshd, sftp_homes, retry=ONE_SHOT, progress=cut_after(sshd, 0.5)) as t:
        with pytest.raises(TransientTransportError):
            t.push([src], "ho")
    part = up / (src.name + ".part")
    assert not (up / src.name).exists()
    partial = part.stat().st_size
    assert 0 < partial < src.stat().st_size

    with caplog.at_level(logging.INFO, logger="exchange.transport.sftp"):
        with store_transport(sshd, sftp_homes) as t:
            assert t.push([src], "ho") == [src]
    assert f"resuming upload of {src.name} at byte {partial} of {24 << 20}" in caplog.text
    assert digest(up / src.name) == digest(src)
    assert not part.exists()


def test_cut_upload_resumes_within_the_same_push(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    src = random_file(tmp_path / "s001.ho.0000000001.bundle", 16 << 20)
    with caplog.at_level(logging.INFO, logger="exchange.transport.sftp"):
        with store_transport(sshd, sftp_homes, retry=FAST_RETRY, progress=cut_after(sshd, 0.4)) as t:
            assert t.push([src], "ho") == [src]
    assert "retrying" in caplog.text and "resuming upload" in caplog.text
    assert digest(sshd.accounts["s001"].folder / "up" / src.name) == digest(src)


def test_stale_remote_part_is_not_trusted(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture, sftp_path: str) -> None:
    src = random_file(tmp_path / "s001.ho.0000000001.bundle", 3 << 20)
    up = sshd.accounts["s001"].folder / "up"
    (up / (src.name + ".part")).write_bytes(os.urandom(1 << 20))  # same name, other content
    with caplog.at_level(logging.INFO, logger="exchange.transport.sftp"):
        with store_transport(sshd, sftp_homes) as t:
            assert t.push([src], "ho") == [src]
    assert "restarting upload" in caplog.text
    assert digest(up / src.name) == digest(src)


def test_cut_download_resumes_on_next_pull(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture, sftp_path: str) -> None:
    down = sshd.accounts["s001"].folder / "down"
    name = "ho.s001.0000000001.bundle"
    src = random_file(tmp_path / name, 24 << 20)
    shutil.copyfile(src, down / name)
    dest = tmp_path / "inbox"
    dest.mkdir()
    with store_transport(sshd, sftp_homes, retry=ONE_SHOT, progress=cut_after(sshd, 0.5)) as t:
        with pytest.raises(TransientTransportError):
            t.pull("s001", dest)
    assert not (dest / name).exists()
    partial = (dest / (name + ".part")).stat().st_size
    assert 0 < partial < src.stat().st_size
    assert (down / name).exists()  # never removed before our copy is complete

    with caplog.at_level(logging.INFO, logger="exchange.transport.sftp"):
        with store_transport(sshd, sftp_homes) as t:
            assert t.pull("s001", dest) == [dest / name]
    assert f"resuming download of {name} at byte {partial} of {24 << 20}" in caplog.text
    assert digest(dest / name) == digest(src)
    assert not (down / name).exists() and not (dest / (name + ".part")).exists()


def test_download_is_durable_before_remote_removal(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    down = sshd.accounts["s001"].folder / "down"
    name = "ho.s001.0000000001.bundle"
    random_file(down / name, 2 << 20)
    dest = tmp_path / "inbox"
    dest.mkdir()
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_remove = os.fsync, os.replace, paramiko.SFTPClient.remove

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a: str | Path, b: str | Path) -> None:
        events.append(("replace", f"{a} -> {b}"))
        real_replace(a, b)

    def remove(self: paramiko.SFTPClient, path: str) -> None:
        assert (dest / name).exists() and not (dest / (name + ".part")).exists()
        events.append(("remove", path))
        real_remove(self, path)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(paramiko.SFTPClient, "remove", remove)
    with store_transport(sshd, sftp_homes) as t:
        assert t.pull("s001", dest) == [dest / name]
    kinds = [k for k, v in events if k != "fsync" or v.endswith(".part")]
    assert kinds == ["fsync", "replace", "remove"], events
    assert events[kinds.index("replace")][1] == f"{dest / (name + '.part')} -> {dest / name}"


def test_crash_after_download_keeps_remote_copy(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    down = sshd.accounts["s001"].folder / "down"
    name = "ho.s001.0000000001.bundle"
    src = random_file(tmp_path / name, 1 << 20)
    shutil.copyfile(src, down / name)
    dest = tmp_path / "inbox"
    dest.mkdir()
    script = textwrap.dedent(f"""
        from pathlib import Path
        from exchange.transport.sftp import SftpTransport
        t = SftpTransport.from_address({sshd.store_address('s001')!r}, home=Path({str(sftp_homes.stores['s001'])!r}))
        t.pull("s001", Path({str(dest)!r}))
    """)
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "EXCHANGE_CRASH_AT": "pull.copied"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == -9, run.stderr
    assert digest(dest / name) == digest(src)  # durable before the crash point
    assert (down / name).exists()  # and the remote copy is still there
    with store_transport(sshd, sftp_homes) as t:
        assert t.pull("s001", dest) == [dest / name]  # recognised, not fetched twice
    assert not (down / name).exists()
    assert digest(dest / name) == digest(src)



def test_small_files_cost_few_round_trips(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow link pays per round trip: one listing per call, then open / data+fsync+close / rename
    per upload and lstat+open / data+EOF / remove per download. No per-file stat of its own: the
    lstat that refuses a link or FIFO travels in the same flight as the open."""
    from paramiko import sftp as codes

    kinds = {v: k[4:] for k, v in vars(codes).items() if k.startswith("CMD_") and isinstance(v, int)}
    sent: list[str] = []
    real = paramiko.SFTPClient._async_request  # type: ignore[attr-defined]

    def counting(self: paramiko.SFTPClient, fileobj: object, t: int, *args: object) -> int:
        sent.append(kinds[t] if t != codes.CMD_EXTENDED else str(args[0]).split("@")[0])
        result: int = real(self, fileobj, t, *args)
        return result
    files = [random_file(tmp_path / f"s001.ho.{n:010d}.bundle", 1000) for n in (1, 2, 3)]
    with SftpTransport.from_address(sshd.store_address("s001"), home=sftp_homes.stores["s001"]) as t:
        t.probe("s001", "ho")  # connect first: login traffic is not what is counted
        monkeypatch.setattr(paramiko.SFTPClient, "_async_request", counting)
        assert t.push(files, "ho") == files
        assert [k for k in sent if k not in ("OPENDIR", "READDIR")] == \
            ["CLOSE"] + ["OPEN", "WRITE", "fsync", "CLOSE", "posix-rename"] * 3
    up = sshd.accounts["s001"].folder / "up"
    down = sshd.accounts["s001"].folder / "down"
    for f in files:
        os.replace(up / f.name, down / f.name.replace("s001.ho", "ho.s001"))
    dest = tmp_path / "inbox"
    dest.mkdir()
    with SftpTransport.from_address(sshd.store_address("s001"), home=sftp_homes.stores["s001"]) as t:
        t.probe("s001", "ho")
        sent.clear()
        assert len(t.pull("s001", dest)) == 3
    assert [k for k in sent if k not in ("OPENDIR", "READDIR")] == \
        ["CLOSE"] + ["LSTAT", "OPEN", "READ", "READ", "CLOSE", "REMOVE"] * 3


def test_file_replaced_after_listing_is_fetched_again(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, sftp_path: str) -> None:
    """The listed size is only a hint: the read that must hit end-of-file catches a replaced file."""
    name = "ho.s001.0000000001.bundle"
    src = random_file(tmp_path / name, 700_000)
    shutil.copyfile(src, sshd.accounts["s001"].folder / "down" / name)
    real = SftpTransport._sizes
    lied: list[str] = []

    def stale(self: SftpTransport, s: object, folder: str) -> dict[str, int]:
        sizes = real(self, s, folder)  # type: ignore[arg-type]
        if not lied and name in sizes:
            sizes[name] -= 10  # as if listed before the sender replaced it with a longer file
            lied.append(name)
        return sizes
    monkeypatch.setattr(SftpTransport, "_sizes", stale)
    dest = tmp_path / "inbox"
    dest.mkdir()
    with caplog.at_level(logging.WARNING, logger="exchange.transport.sftp"):
        with store_transport(sshd, sftp_homes, retry=FAST_RETRY) as t:
            assert t.pull("s001", dest) == [dest / name]
    assert "longer than" in caplog.text and "retrying" in caplog.text
    assert digest(dest / name) == digest(src)


# -- the fast path and its fallback ----------------------------------------------------------------


def test_this_paramiko_has_every_internal_the_fast_path_uses() -> None:
    """Fails when a paramiko upgrade drops or changes an internal: the transports would still work
    (on stock paramiko, slower), and this says which name went."""
    assert missing_internals() == []
    assert session_kind() is FastSession


def test_missing_internal_falls_back_to_stock_paramiko_with_identical_bytes(
        sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path, request: pytest.FixtureRequest,
        caplog: pytest.LogCaptureFixture) -> None:
    """Upload and download once on the fast path and once with an internal missing: the check at
    first use says so and picks stock paramiko, and the bytes are the same either way."""
    files = [random_file(tmp_path / f"s001.ho.{n:010d}.bundle", size)
             for n, size in ((1, (5 << 20) + 13), (2, 1), (3, 0))]
    up = sshd.accounts["s001"].folder / "up"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    got: dict[str, dict[str, str]] = {}
    for kind in ("fast", "stock"):
        if kind == "stock":
            request.getfixturevalue("stock_paramiko")
        with caplog.at_level(logging.WARNING, logger="exchange.transport.sftp"):
            with store_transport(sshd, sftp_homes) as t:
                assert t.push(files, "ho") == files
        on_server = {f.name: digest(up / f.name) for f in files}
        with ho_transport(sshd, sftp_homes) as t:
            assert sorted(t.pull("ho", inbox)) == sorted(inbox / f.name for f in files)
        got[kind] = {n: digest(inbox / n) for n in on_server}
        assert got[kind] == on_server == {f.name: digest(f) for f in files}
        assert not [n for n in os.listdir(up) if n.endswith((".bundle", ".part"))]  # taken, nothing left
        for f in files:
            (inbox / f.name).unlink()
        warned = [r.getMessage() for r in caplog.records if "stock paramiko" in r.getMessage()]
        if kind == "fast":
            assert warned == [] and session_kind() is FastSession
        else:
            assert session_kind() is StockSession
            assert any(f"SFTPClient.{MISSING_INTERNAL}" in w for w in warned), warned
    assert got["fast"] == got["stock"]


# -- drop: the HO reading the server's folders directly ------------------------------------------


def test_drop_refuses_a_folder_without_up_and_down(tmp_path: Path) -> None:
    t = DropTransport(tmp_path, side="ho")
    with pytest.raises(TransportError, match="does not exist"):
        t.push([random_file(tmp_path / "ho.s001.0000000001.bundle", 10)], "s001")
    with pytest.raises(TransportError, match="does not exist"):
        t.pull("ho", tmp_path)


def test_drop_and_sftp_meet_in_the_same_folders(sshd: SshdServer, sftp_homes: SftpHomes, tmp_path: Path) -> None:
    """The store over SFTP, the HO with drop: on the server's own disk: one layout for both."""
    folder = sshd.accounts["s001"].folder
    ho = open_transport(f"drop:{folder}", home=sftp_homes.ho, me="ho", peer="s001")
    up = random_file(tmp_path / "s001.ho.0000000001.bundle", 100_000)
    down = random_file(tmp_path / "ho.s001.0000000001.bundle", 100_000)
    inbox_ho, inbox_store = tmp_path / "ho-inbox", tmp_path / "store-inbox"
    inbox_ho.mkdir()
    inbox_store.mkdir()
    with store_transport(sshd, sftp_homes) as store:
        assert store.push([up], "ho") == [up]
        assert ho.push([down], "s001") == [down]
        assert ho.pull("ho", inbox_ho) == [inbox_ho / up.name]
        assert store.pull("s001", inbox_store) == [inbox_store / down.name]
        assert store.probe("s001", "ho")["peer_info"]["node"] == "ho"
    assert digest(inbox_ho / up.name) == digest(up)
    assert digest(inbox_store / down.name) == digest(down)


def test_cli_trust_host(sshd: SshdServer, tmp_path: Path) -> None:
    """The command the refusal message names really pins the key (and checks --fingerprint)."""
    from click.testing import CliRunner

    from exchange.cli import main

    home = make_home(sshd, tmp_path / "s002", "s002", authorize_as=sshd.accounts["s002"].user, trust=None)
    address = sshd.store_address("s002")
    runner = CliRunner()
    wrong = runner.invoke(main, ["peer", "trust-host", "--home", str(home), "--address", address,
                                 "--fingerprint", "SHA256:" + "A" * 43])
    assert wrong.exit_code != 0 and not (home / "known_hosts").exists()
    ok = runner.invoke(main, ["peer", "trust-host", "--home", str(home), "--address", address,
                              "--fingerprint", server_fingerprint(sshd)])
    assert ok.exit_code == 0, ok.output
    assert server_fingerprint(sshd) in ok.output
    src = random_file(tmp_path / "s002.ho.0000000001.bundle", 10)
    with SftpTransport.from_address(address, home=home) as t:
        assert t.push([src], "ho") == [src]
