"""Hints that tell the truth, and bad values refused when they are entered (issue #16, "The CLI").

Through the real command line (click's CliRunner on ``exchange``; a subprocess for Ctrl-C) with real
node homes, keys and bundles: a bad node id at ``init`` speaks of node ids, not of quarantine; a bad age
recipient or signing key at ``peer add`` says so; ``verify`` on a node's own sent bundle still checks
the signature and says only the recipient can decrypt it; ``import --dry-run`` claims nothing it did not
do; Ctrl-C exits 130 with one line; ``peer add --transport`` and ``ui --port`` refuse what no transport
or socket could use, naming the value and the accepted forms.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from enginehelpers import deliver, flip_byte, make_net, member_offset, outbox_bundles, seed_ho
from filelock import FileLock

from exchange.cli.main import main
from exchange.errors import INTERRUPTED, AuthenticityError, FormatError, NodeIdError, PeerKeyError
from exchange.node import keys
from exchange.node.config import NodeConfig, load
from exchange.node.home import init_home
from exchange.send.export import export_all


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _pair(tmp_path: Path) -> tuple[NodeConfig, NodeConfig]:
    return init_home(tmp_path / "ho", "ho", "ho"), init_home(tmp_path / "s001", "s001", "store")


def _add_store(ho: NodeConfig, st: NodeConfig, *extra: str, recipient: str | None = None,
               signing_key: str | None = None, peer_id: str | None = None) -> Result:
    return run("peer", "add", "--home", str(ho.home), "--peer", peer_id or st.id, "--role", "store",
               "--signing-key", signing_key or keys.public_signing_line(st),
               "--recipient", recipient or keys.recipient(st), *extra)


# ---------------------------------------------------------------- wrong hints

@pytest.mark.parametrize("bad", ["S 1", "Store_1", "-s1", "x" * 33])
def test_init_bad_node_id_speaks_of_node_ids(tmp_path: Path, bad: str) -> None:
    home = tmp_path / "n"
    res = run("init", "--home", str(home), "--node", bad, "--role", "store")
    assert res.exit_code == NodeIdError.exit_code == 3, res.output
    assert f"invalid node id {bad!r}" in res.output
    assert "hint: A node id is 1 to 32 characters of a-z, 0-9 and '-'" in res.output
    assert "quarantine" not in res.output and "sender" not in res.output
    assert not (home / "exchange.toml").exists()


def test_peer_add_bad_recipient_or_signing_key_says_so(tmp_path: Path) -> None:
    ho, st = _pair(tmp_path)
    before = (ho.home / "exchange.toml").read_bytes()
    res = _add_store(ho, st, recipient="age1xyz")
    assert res.exit_code == PeerKeyError.exit_code == 3, res.output
    assert "bad age recipient for peer s001: malformed age recipient 'age1xyz'" in res.output
    assert "from the peer's `exchange identity`" in res.output
    assert "identity (key) file" not in res.output  # the hint for a decryption failure, not for a pasted key

    res = _add_store(ho, st, signing_key="ssh-ed25519 AAAA-not-base64")
    assert res.exit_code == 3, res.output
    assert "bad signing key for peer s001" in res.output
    assert (ho.home / "exchange.toml").read_bytes() == before  # nothing recorded

    res = _add_store(ho, st, peer_id="S001")  # the peer's id is a node id too
    assert res.exit_code == 3, res.output
    assert "invalid node id 'S001'" in res.output and "hint: A node id is 1 to 32 characters" in res.output
    assert "exchange.toml" not in res.output
    assert (ho.home / "exchange.toml").read_bytes() == before


def test_verify_own_sent_bundle_checks_the_signature_and_says_who_can_decrypt(tmp_path: Path) -> None:
    net = make_net(tmp_path / "net", stores=("s001",))
    seed_ho(net, items=5)
    export_all(net.ho)
    (bundle,) = outbox_bundles(net.ho, "s001")
    ho, s001 = str(net.ho.cfg.home), str(net.store().cfg.home)

    res = run("verify", str(bundle), "--home", ho)
    assert res.exit_code == 0, res.output
    assert "good, by ho" in res.output
    assert "ciphertext matches the signed hash" in res.output
    assert "not decrypted: ho sent this bundle, only its recipient s001 can decrypt it" in res.output
    res = run("inspect", str(bundle), "--home", ho, "--json")
    assert res.exit_code == 0, res.output
    assert "only its recipient s001 can decrypt it" in res.output

    res = run("verify", str(bundle), "--home", s001)  # the recipient decrypts and checks every inner file
    assert res.exit_code == 0, res.output
    assert "decrypted; every inner file matches its signed hash" in res.output

    for member, says in (("payload.tar.age", "payload SHA-256 differs from the signed manifest"),
                         ("manifest.json", "does not match the data")):  # still checked: hash and signature
        copy = tmp_path / member / bundle.name
        copy.parent.mkdir()
        shutil.copyfile(bundle, copy)
        _alter(copy, member)
        res = run("verify", str(copy), "--home", ho)
        assert res.exit_code == AuthenticityError.exit_code, (member, res.output)
        assert says in res.output and "OK" not in res.output

    copy = tmp_path / "sig" / bundle.name  # a malformed signature: the hint does not claim a quarantine
    copy.parent.mkdir()
    shutil.copyfile(bundle, copy)
    off, size = member_offset(copy, "manifest.json.sig")
    data = bytearray(copy.read_bytes())
    data[off + size // 2] = ord("!")  # never base64: a malformed file (11), not a wrong signature
    copy.write_bytes(bytes(data))
    res = run("verify", str(copy), "--home", ho)
    assert res.exit_code == FormatError.exit_code and "OK" not in res.output, res.output
    assert "quarantine" not in res.output and "Nothing was moved" in res.output
    assert copy.exists()


def _alter(path: Path, member: str) -> None:
    """Change one digit inside a hex hash of ``member``: still well formed, no longer what was signed."""
    if member != "manifest.json":
        flip_byte(path, member)
        return
    off, size = member_offset(path, member)
    data = bytearray(path.read_bytes())
    found = re.search(rb"[0-9a-f]{64}", bytes(data[off:off + size]))
    assert found
    pos = off + found.start() + next(i for i, c in enumerate(found.group()) if chr(c).isdigit())
    data[pos] ^= 0x01  # '0'<->'1', ... '8'<->'9'
    path.write_bytes(bytes(data))


def test_import_dry_run_never_says_re_acknowledged(tmp_path: Path, db_url: str) -> None:
    net = make_net(tmp_path / "net", stores=("s001",), store_dbs={"s001": db_url})
    seed_ho(net, items=5)
    export_all(net.ho)
    (bundle,) = outbox_bundles(net.ho, "s001")
    store = net.store()
    home = str(store.cfg.home)
    deliver([bundle], store)
    res = run("import", "--home", home)
    assert res.exit_code == 0, res.output
    assert "APPLIED" in res.output
    acks = sorted(p.name for p in store.cfg.outbox.iterdir())

    copy = tmp_path / "again" / bundle.name  # the same bundle again, checked only
    copy.parent.mkdir()
    shutil.copyfile(bundle, copy)
    res = run("import", "--home", home, "--dry-run", str(copy))
    assert res.exit_code == 0, res.output
    assert "DUPLICATE - already applied; an import would acknowledge it again" in res.output
    assert "re-acknowledged" not in res.output
    assert res.output.endswith("dry run: nothing was applied, moved, quarantined or acknowledged\n")
    assert copy.exists() and sorted(p.name for p in store.cfg.outbox.iterdir()) == acks  # nothing done

    deliver([bundle], store)  # the real import still says what it did
    res = run("import", "--home", home)
    assert "DUPLICATE - already applied; re-acknowledged" in res.output and "dry run" not in res.output
    assert not list(store.cfg.inbox.iterdir())
    net.dispose()


def test_ctrl_c_says_running_again_is_safe(tmp_path: Path) -> None:
    """SIGINT to a real `exchange import` waiting on the home's lock: one line, exit 130, no traceback."""
    cfg = init_home(tmp_path / "s001", "s001", "store")
    lock = FileLock(str(cfg.home / ".work.lock"))  # what a running sync holds
    lock.acquire()
    env = {k: v for k, v in os.environ.items() if k != "EXCHANGE_HOME"}
    proc = subprocess.Popen([sys.executable, "-m", "exchange", "import", "-v", "--home", str(cfg.home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killer = threading.Timer(120, proc.kill)  # bounded whatever happens
    killer.start()
    try:
        assert proc.stderr is not None
        waiting = proc.stderr.readline()  # the command says it waits for the lock: it is inside the command
        assert "waiting up to 600 s for another exchange process" in waiting, waiting
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        killer.cancel()
        lock.release()
    assert proc.returncode == INTERRUPTED == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip() == ("interrupted: nothing is lost; running the same command again is safe "
                           "(it picks up where this one stopped)")
    assert out == ""
    # and it is: the same command, once the lock is free, runs to its end
    res = run("import", "--home", str(cfg.home))
    assert res.exit_code == 0 and "inbox is empty" in res.output, res.output


# ---------------------------------------------------------------- bad values refused when entered

@pytest.mark.parametrize("address, says", [
    ("ftp://x", "unsupported transport address 'ftp://x'"),
    ("dir:", "unsupported transport address 'dir:'"),
    ("relative/folder", "transport address 'relative/folder' is not an absolute folder"),
    ("ho.example.com:/srv/xchg", "is not an absolute folder"),
    ("sftp://ho.example.com/srv", "not an SFTP address with a user and host: 'sftp://ho.example.com/srv'"),
    ("sftp://u:secret@ho.example.com/", "carries a password"),
    ("sftp://u@ho.example.com:99999/", "bad port in SFTP address"),
])
def test_peer_add_refuses_a_transport_that_is_not_an_address(tmp_path: Path, address: str, says: str) -> None:
    ho, st = _pair(tmp_path)
    before = (ho.home / "exchange.toml").read_bytes()
    res = _add_store(ho, st, "--transport", address)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "Invalid value for '--transport'" in text and says in text, text
    assert "sftp://user@host" in text  # the accepted form(s)
    assert (ho.home / "exchange.toml").read_bytes() == before  # refused now, not at the next sync
    assert "s001" not in load(ho.home).peers


@pytest.mark.parametrize("address", ["dir:{root}/xfer", "{root}/xfer", "drop:{root}/s001", "~/xfer",
                                     "sftp://xs001@ho.example.com:2222/", "sftp://xchg@sftp.ho.internal/srv/s001"])
def test_peer_add_keeps_every_accepted_form(tmp_path: Path, address: str) -> None:
    ho, st = _pair(tmp_path)
    given = address.format(root=tmp_path)
    res = _add_store(ho, st, "--transport", given)
    assert res.exit_code == 0, res.output
    assert load(ho.home).peers["s001"].transport == given


@pytest.mark.parametrize("args, value", [(("ui", "--port", "99999"), "99999"), (("ui", "--port", "-1"), "-1"),
                                         (("run", "--ui-port", "70000"), "70000")])
def test_port_out_of_range_is_refused_with_the_range(tmp_path: Path, args: tuple[str, ...], value: str) -> None:
    cfg = init_home(tmp_path / "s001", "s001", "store")
    res = run(*args, "--home", str(cfg.home))
    assert res.exit_code == 2, res.output
    assert f"{value} is not in the range 0<=x<=65535" in res.output
