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
from exchange.errors import ExchangeError
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


#: Modules a SQLite home's `exchange doctor` must not load when no peer is reached over SFTP.
NOT_FOR_DOCTOR = {
    "sqlalchemy": "the schema version is read with sqlite3",
    "asyncio": "loaded by SQLAlchemy (and paramiko's invoke)",
    "paramiko": "no SFTP peer: the known_hosts path is only a name",
    "pyarrow": "no bundle is read",
}


def test_doctor_on_a_sqlite_home_loads_no_sqlalchemy(net: Net) -> None:
    st = net.store("s001")
    assert not any(p.transport.startswith("sftp") for p in st.cfg.peers.values())
    code, out, modules = _run_cli(["doctor", "--home", str(st.cfg.home)])
    assert code == 0, out
    assert "sqlite reachable, schema version" in out and "known hosts" in out
    loaded = {m: why for m, why in NOT_FOR_DOCTOR.items() if m in modules}
    assert not loaded, f"`exchange doctor` on a SQLite home loaded: {loaded}"


def test_doctor_reads_an_old_schema_version_with_sqlite3_as_sqlalchemy_does(net: Net) -> None:
    from exchange.service.doctor import check_database

    st = net.store("s001")
    with st.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE xchg_meta SET value = '4' WHERE key = 'schema_version'")
    st.engine.dispose()
    code, out, _ = _run_cli(["doctor", "--home", str(st.cfg.home)])
    assert code == 1
    assert "FAIL database" in out and "xchg schema version 4, this exchange needs" in out
    assert "exchange migrate" in out
    messages = []
    for node in (st, _sqlalchemy_view(st)):
        with pytest.raises(ExchangeError) as exc:
            check_database(node)
        messages.append(exc.value.message)
    assert messages[0] == messages[1]


def test_the_light_schema_version_is_the_migrations_count() -> None:
    from exchange.database import direct, tables

    assert direct.SCHEMA_VERSION == tables.SCHEMA_VERSION == len(tables.MIGRATIONS), (
        "a migration was added: bump exchange/database/direct.py SCHEMA_VERSION")


@pytest.mark.parametrize("url", [
    "sqlite:////abs/exchange.db", "sqlite:///rel/exchange.db", "sqlite:///:memory:", "sqlite://",
    "sqlite:////abs/exchange.db?timeout=5", "sqlite:////abs/ex%20change.db", "sqlite+pysqlite:////abs/x.db",
    "sqlite:////abs/a@b:c/x.db", "sqlite:///a b/x.db",
    "postgresql+psycopg://root@/postgres?host=/var/run/postgresql",
])
def test_the_sqlite_file_shortcut_gives_what_make_url_gives(url: str) -> None:
    from sqlalchemy.engine import make_url

    from exchange.node.home import sqlite_file

    u = make_url(url)
    expected = (Path(u.database) if u.drivername.startswith("sqlite") and u.database and u.database != ":memory:"
                else None)
    assert sqlite_file(url) == expected
