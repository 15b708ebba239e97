"""Start-up: what a quick command loads on a SQLite home (issue 17, docs/PERFORMANCE.md "Start-up").

`exchange status sent` and `exchange doctor` run from cron jobs, monitoring and an operator's
terminal; importing SQLAlchemy (which loads asyncio and, for the xchg tables' partial indexes,
the PostgreSQL dialects) costs more than the whole command should. Each test runs the real CLI
in a fresh interpreter and reads that interpreter's ``sys.modules``; the sqlite3 reader's rows are
compared with SQLAlchemy's on the same file.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from enginehelpers import Net, make_net, seed_ho, seed_store
from sqlalchemy import update

from exchange.database.tables import xchg_sent
from exchange.node.home import Node
from exchange.send.export import export_all
from exchange.service import status

#: Modules a SQLite home's `status sent` must not load, and why each is heavy.
NOT_FOR_STATUS = {
    "sqlalchemy": "SQLAlchemy itself: the rows are read with sqlite3",
    "sqlalchemy.dialects.postgresql": "PostgreSQL dialects on a SQLite home",
    "asyncio": "loaded by SQLAlchemy; nothing here is asynchronous",
    "pyarrow.compute": "Arrow kernels, for one table of rows",
    "exchange.transport.usb": "the stick machinery, for one line from usb-last.json",
}

_CHILD = """
import json, sys
from exchange.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
print("@@MODULES " + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _run_cli(args: list[str]) -> tuple[int, str, set[str]]:
    """Exit code, output and loaded modules of the real CLI in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, timeout=120,
                       env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    out, _, tail = p.stdout.rpartition("@@MODULES ")
    assert tail, p.stderr[-2000:]
    data = json.loads(tail)
    return int(data["code"]), out, set(data["modules"])


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    """A settled HO and one SQLite store that has sent bills (PROCESSED) and sealed one more (not pushed)."""
    n = make_net(tmp_path / "net", stores=("s001",))
    seed_ho(n, items=3)
    n.settle()
    seed_store(n, "s001", sales=2)
    n.settle()
    seed_store(n, "s001", sales=1, seed=7)
    export_all(n.store("s001"))
    n.dispose()
    yield n
    n.dispose()


def _sqlalchemy_view(node: Node) -> Node:
    """The same home and file through a URL the sqlite3 shortcut leaves to SQLAlchemy."""
    path = node.cfg.database[len("sqlite:///"):]
    return Node(dataclasses.replace(node.cfg, database=f"sqlite+pysqlite:///{path}"))


def test_status_sent_on_a_sqlite_home_loads_no_sqlalchemy(net: Net) -> None:
    st = net.store("s001")
    rows = status.sent(st)
    assert len(rows) >= 2 and {r.status for r in rows} >= {"PROCESSED"}
    code, out, modules = _run_cli(["status", "sent", "--home", str(st.cfg.home)])
    assert code == 0, out
    for r in rows:
        assert r.file in out
    loaded = {m: why for m, why in NOT_FOR_STATUS.items() if m in modules}
    assert not loaded, f"`exchange status sent` on a SQLite home loaded: {loaded}"

    code, out, modules = _run_cli(["status", "sent", "--json", "--home", str(st.cfg.home)])
    assert code == 0, out
    assert json.loads(out) == status.as_json(status.sent(_sqlalchemy_view(st)))
    assert "sqlalchemy" not in modules


def test_sqlite3_reads_the_same_sent_rows_as_sqlalchemy(net: Net) -> None:
    st = net.store("s001")
    with st.engine.begin() as conn:  # every column the view shows filled in on some row
        first = min(status.sent(st), key=lambda r: r.seq)
        conn.execute(update(xchg_sent).where(xchg_sent.c.seq == first.seq).values(
            status="FAILED", reason="refused: 'bad' \u00e9\n", processed_at=None))
    st.engine.dispose()
    fast, slow = status.sent(st), status.sent(_sqlalchemy_view(st))
    assert fast == slow
    assert any(r.reason for r in fast) and any(r.updated is None for r in fast) and all(r.created for r in fast)
    assert len({r.status for r in fast}) >= 2


def test_a_sqlite_file_sqlite3_cannot_read_goes_through_sqlalchemy(tmp_path: Path) -> None:
    """No xchg_sent table (a database never migrated): the same error as before the shortcut."""
    n = make_net(tmp_path / "net", stores=("s001",))
    st = n.store("s001")
    n.dispose()
    other = tmp_path / "empty.db"
    other.write_bytes(b"")
    node = Node(dataclasses.replace(st.cfg, database=f"sqlite:///{other}"))
    with pytest.raises(Exception) as fast:
        status.sent(node)
    with pytest.raises(Exception) as slow:
        status.sent(_sqlalchemy_view(node))
    assert type(fast.value) is type(slow.value)
    assert "xchg_sent" in str(fast.value)
