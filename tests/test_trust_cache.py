"""Issue 17, fixed cost per bundle: the trust store is parsed once per content and looked up by principal.

An HO trusting a thousand stores parsed its thousand-line ``allowed_signers``
and scanned every line's patterns for each bundle. Now ``keys.load_trust``
reads the file on every call and parses it only when its bytes changed, and
``AllowedSigners`` finds a principal's lines through an index. What must not
change: a revocation counts from the next file verified, also in a worker
process that started (and parsed the trust store) before it; and a line with
globs or negations still matches as ssh-keygen would, in file order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner
from enginehelpers import deliver, docs_of, forge_bundle, make_net, seed_ho, seed_store

from exchange.cli import main
from exchange.node import keys
from exchange.node.home import Node, init_home
from exchange.send.export import export_all
from exchange.wire.crypto import sshsig


def bills(node: Node) -> list[tuple[str, ...]]:
    with node.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT store_id, bill_no FROM sales_bill ORDER BY 1, 2")]


def _wait_for(paths: list[Path], what: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> Path:
    """The first of ``paths`` to appear (the worker is polling), within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not any(p.exists() for p in paths):
        assert proc.poll() is None, f"the worker ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < end, f"{what}: none of {paths} appeared within {timeout:.0f} s"
        time.sleep(0.1)
    return next(p for p in paths if p.exists())


def test_a_worker_started_before_a_revocation_refuses_the_key_at_once(tmp_path: Path, db_url: str) -> None:
    net = make_net(tmp_path / "net", ho_db=db_url, stores=("s001",))
    try:
        seed_ho(net, items=6)
        net.settle()
        ho, s001 = net.ho, net.store("s001")
        worker = subprocess.Popen([sys.executable, "-m", "exchange", "worker", "--home", str(ho.cfg.home),
                                   "--poll", "0.1"], stderr=subprocess.DEVNULL)
        try:
            # the worker applies a genuine bundle: it has read and parsed the trust store
            seed_store(net, "s001", sales=2)
            sealed = export_all(s001)
            assert len(sealed) == 1, sealed
            first = s001.cfg.outbox / sealed[0].file
            deliver([first], ho)
            done = _wait_for([ho.cfg.archive_received / first.name, ho.cfg.quarantine / first.name],
                             "the genuine bundle", worker)
            assert done.parent == ho.cfg.archive_received

            at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
            res = CliRunner().invoke(main, ["keys", "revoke", "--home", str(ho.cfg.home), "--peer", "s001",
                                            "--at", at.strftime("%Y%m%d%H%M%S"), "--reason", "PC stolen"])
            assert res.exit_code == 0, res.output
            while datetime.now(UTC).replace(microsecond=0) <= at:  # at most a second or two
                time.sleep(0.1)
            # the thief signs the next bundle of the stream after the revocation
            seed_store(net, "s001", sales=2, seed=5)
            stolen = forge_bundle(s001, "ho", docs_of(s001, "sales_bill", bills(s001)), out_dir=tmp_path,
                                  record=False)
            deliver([stolen], ho)
            done = _wait_for([ho.cfg.quarantine / f"{stolen.name}.reason", ho.cfg.archive_received / stolen.name],
                             "the stolen key's bundle", worker)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0
        assert done.parent == ho.cfg.quarantine, f"a bundle signed with a revoked key was applied: {done}"
        reason = done.read_text()
        assert "revoked by ho on" in reason and "PC stolen" in reason, reason
        assert not (ho.cfg.archive_received / stolen.name).exists()
    finally:
        net.dispose()


def test_the_trust_store_is_parsed_once_per_content_and_read_every_time(tmp_path: Path) -> None:
    node = Node(init_home(tmp_path / "ho", "ho", "ho"))
    first = node.trust
    assert node.trust is first  # same bytes: not parsed again
    other = init_home(tmp_path / "s001", "s001", "store")
    keys.add_signer(node.cfg, "s001", keys.public_signing_line(other))
    again = node.trust  # same Node object (a long-running worker's): the new line counts at once
    assert again is not first
    assert [s.principals for s in again.signers] == [*[s.principals for s in first.signers], ("s001",)]
    stat = os.stat(keys.trust_path(node.cfg))
    os.chmod(keys.trust_path(node.cfg), stat.st_mode | 0o002)  # writable by others: refused, cached or not
    try:
        from exchange.errors import ExchangeError

        try:
            _ = node.trust
        except ExchangeError as exc:
            assert "trust store" in str(exc) or "writ" in str(exc), exc
        else:
            raise AssertionError("a trust store others can write was used")
    finally:
        os.chmod(keys.trust_path(node.cfg), stat.st_mode)


def test_lines_with_globs_and_negations_match_in_file_order_beside_the_index() -> None:
    pems = [sshsig.generate_key(comment=f"k{i}") for i in range(4)]
    pubs = [" ".join(pub.split()[:2]) for _pem, pub in pems]
    text = "\n".join([
        sshsig.format_signer_line("s00*,!s002", pubs[0]),   # a glob with a veto
        sshsig.format_signer_line("s001", pubs[1]),          # literal
        sshsig.format_signer_line("s00?", pubs[2]),          # a one-character glob
        sshsig.format_signer_line("s001,s003", pubs[3]),     # literal, two principals
        f"s001 cert-authority {pubs[0]}",                    # never a plain signer
    ]) + "\n"
    trust = sshsig.AllowedSigners.parse(text)
    ns = sshsig.NAMESPACE

    def keys_for(principal: str) -> list[str]:
        return [sshsig.public_line(s.key).split()[1] for s in trust.signers_for(principal, ns)]

    b64 = [p.split()[1] for p in pubs]
    assert keys_for("s001") == [b64[0], b64[1], b64[2], b64[3]]
    assert keys_for("s002") == [b64[2]]  # vetoed by the first line's !s002
    assert keys_for("s003") == [b64[0], b64[2], b64[3]]
    assert keys_for("s0010") == [b64[0]]
    assert keys_for("x001") == []
    for i, (pem, _pub) in enumerate(pems):
        key = sshsig.load_private_key(pem).public_key()
        if i != 2:
            assert trust.check("s003" if i != 1 else "s001", key, ns).key.public_bytes_raw() == key.public_bytes_raw()
    import pytest

    from exchange.errors import AuthenticityError

    with pytest.raises(AuthenticityError, match="not trusted for principal 's002'"):
        trust.check("s002", sshsig.load_private_key(pems[1][0]).public_key(), ns)
