"""The no-op decision of a sync cycle (``exchange.send.pending``), made before SQLAlchemy loads.

``idle`` may say "work" when there is none (the full cycle then finds nothing),
never "idle" when there is work: every kind of work a cycle does is made here
one at a time on a settled network, and ``idle`` must see it, and the full
cycle must then actually do it. PostgreSQL homes and unusual SQLite URLs never
take the shortcut.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from enginehelpers import Net, make_net, reprice, seed_ho, seed_store
from sqlalchemy import insert, select, update

from exchange.database.tables import xchg_broadcast, xchg_sent
from exchange.files import utc_now
from exchange.node.home import Node
from exchange.send.export import reload
from exchange.database.direct import plain_file as sqlite_file
from exchange.send.pending import idle
from exchange.service.sync import export_needed, sync


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    """A settled HO (on ``db_url``) and one SQLite store: every item and bill delivered and acked."""
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001",))
    seed_ho(n, items=5)
    n.settle()  # the store needs the items before it can sell them
    seed_store(n, "s001", sales=2)
    n.settle()
    yield n
    n.dispose()


def _on_sqlite(node: Node) -> bool:
    return node.cfg.database.startswith("sqlite")


def test_a_settled_network_is_idle_on_sqlite_only(net: Net) -> None:
    for node in net.nodes:
        assert idle(node) is _on_sqlite(node), node.id
        assert not export_needed(node), node.id
        rep = sync(node)
        assert (rep.pulled, rep.imported, rep.exported, rep.pushed, rep.resent, rep.errors) == (
            [], [], [], [], [], [])


def _sale(net: Net) -> Node:
    seed_store(net, "s001", sales=1, seed=7)  # unrouted xchg_event rows
    return net.store("s001")


def _price_change(net: Net) -> Node:
    reprice(net.ho, [net.masters["item"][0][0]])  # an item, broadcast to every store
    return net.ho


def _reload(net: Net) -> Node:
    st = net.store("s001")
    assert reload(st, "ho", ["sales_bill"]) > 0  # PENDING deliveries, no event
    return st


def _broadcast_ahead(net: Net) -> Node:
    with net.ho.engine.begin() as conn:  # a broadcast row no store's cursor has reached
        newest = conn.execute(select(xchg_broadcast.c.version).order_by(xchg_broadcast.c.version.desc())).scalar()
        conn.execute(insert(xchg_broadcast).values(doc_type="item", doc_key=json.dumps(["I-NEW"]), op="D",
                                                   version=int(newest or 0) + 1))
    return net.ho


def _unacked_long_ago(net: Net) -> Node:
    st = net.store("s001")
    with st.engine.begin() as conn:
        conn.execute(update(xchg_sent).where(xchg_sent.c.file_name.like("%.bundle"))
                     .values(status="UPLOADED", uploaded_at=utc_now() - timedelta(days=2)))
    return st


WORK: dict[str, Callable[[Net], Node]] = {
    "unrouted event": _sale, "price change": _price_change, "pending delivery": _reload,
    "broadcast ahead of a cursor": _broadcast_ahead, "bundle due for resend": _unacked_long_ago,
}


@pytest.mark.parametrize("kind", sorted(WORK))
def test_every_kind_of_database_work_is_seen(net: Net, kind: str) -> None:
    node = WORK[kind](net)
    assert not idle(node)
    rep = sync(node)
    assert not rep.errors
    if kind == "bundle due for resend":
        assert rep.resent
    else:
        assert rep.exported and rep.pushed
    net.settle()
    assert all(idle(n) is _on_sqlite(n) for n in net.nodes)


def test_a_bundle_waiting_for_its_ack_within_resend_after_is_idle(net: Net) -> None:
    st = net.store("s001")
    with st.engine.begin() as conn:
        conn.execute(update(xchg_sent).where(xchg_sent.c.file_name.like("%.bundle"))
                     .values(status="UPLOADED", uploaded_at=utc_now() - timedelta(minutes=5)))
    assert idle(st)
    assert sync(st).resent == []


@pytest.mark.parametrize("where", ["inbox", "outbox"])
@pytest.mark.parametrize("name", ["ho.s001.0000000099.bundle", "s001.ho.0000000099.ack.part"])
def test_files_in_the_spool_are_work(net: Net, where: str, name: str) -> None:
    st = net.store("s001")
    folder = st.cfg.inbox if where == "inbox" else st.cfg.outbox
    (folder / name).write_bytes(b"x")
    # a .part in the inbox is a copy still arriving (not work); in the outbox, an export to recover
    assert idle(st) is (where == "inbox" and name.endswith(".part"))


def test_a_missing_or_empty_database_is_left_to_the_full_cycle(net: Net, tmp_path: Path) -> None:
    st = net.store("s001")
    st.cfg.database = f"sqlite:///{tmp_path / 'gone.db'}"
    assert not idle(st)
    assert not (tmp_path / "gone.db").exists()  # the probe never creates a database
    (tmp_path / "empty.db").write_bytes(b"")
    st.cfg.database = f"sqlite:///{tmp_path / 'empty.db'}"
    assert not idle(st)  # no xchg tables: the full cycle reports the database error


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:////abs/exchange.db", "/abs/exchange.db"),
    ("sqlite:///rel/exchange.db", "rel/exchange.db"),
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("sqlite:////abs/exchange.db?timeout=5", None),
    ("sqlite:////abs/ex%20change.db", None),
    ("sqlite+pysqlite:////abs/exchange.db", None),
    ("postgresql+psycopg://root@/postgres?host=/var/run/postgresql", None),
])
def test_only_plain_sqlite_urls_take_the_shortcut(url: str, path: str | None) -> None:
    assert sqlite_file(url) == path


_CHILD = """
import json, sys
from exchange.cli import main
try:
    main(["sync", "--home", sys.argv[1]])
except SystemExit as exc:
    assert not exc.code, exc.code
print(json.dumps(sorted(m for m in ("sqlalchemy", "pyarrow", "cryptography", "paramiko") if m in sys.modules)))
"""


def _modules_loaded_by_cli_sync(home: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(home)], capture_output=True, text=True,
                         check=True).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


def test_an_idle_store_syncs_without_loading_sqlalchemy(tmp_path: Path) -> None:
    net = make_net(tmp_path / "net", stores=("s001",))
    seed_ho(net, items=3)
    net.settle()
    net.dispose()
    home = net.store("s001").cfg.home
    assert _modules_loaded_by_cli_sync(home) == []
    seed_store(net, "s001", sales=1)
    net.dispose()
    assert "sqlalchemy" in _modules_loaded_by_cli_sync(home)  # work to do: the full cycle runs
