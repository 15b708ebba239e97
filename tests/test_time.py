"""Time that means the same everywhere, and one row the exporter cannot encode never stops a node.

Every scenario runs through the command line (``exchange sync``, ``status``,
``set-aside``) on real node homes exchanging through a folder, with the HO on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from enginehelpers import Net, make_net, prices, reprice, seed_ho
from sqlalchemy import select

from exchange.cli import main
from exchange.database import schema as s
from exchange.database.capture import record_events

#: RFC 3339 with an offset (``Z`` or ``+hh:mm``), as docs/STATUS_JSON.md promises for every time.
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
TIME_KEYS = re.compile(r"(^|_)(created|updated|time|at|finished|prepared|started|when|parked_at|set_at)$")


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def net(db_url: str, tmp_path: Path) -> Iterator[Net]:
    """An HO (SQLite, then PostgreSQL) and one store, items delivered and acknowledged."""
    n = make_net(tmp_path / "net", ho_db=None if db_url.startswith("sqlite") else db_url, stores=("s001",))
    seed_ho(n, items=6)
    n.settle()
    yield n
    n.dispose()


def _items(net: Net) -> list[str]:
    with net.ho.engine.connect() as conn:
        return [str(i) for i in conn.execute(select(s.item.c.item_id).order_by(s.item.c.item_id)).scalars()]


def _spoil(net: Net, item_id: str) -> str:
    """Put a value in an item's ``updated_at`` that its timestamp type cannot hold, as a POS could.

    SQLite keeps any text (here, a time with an offset in a column declared without one);
    PostgreSQL's ``timestamp`` takes ``infinity``, which no Arrow timestamp can hold.
    """
    value = "2024-03-01 10:00:00+05:30" if net.ho.engine.dialect.name == "sqlite" else "infinity"
    with net.ho.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE item SET updated_at = '{value}' WHERE item_id = '{item_id}'")
        record_events(conn, "item", [(item_id,)])
    return value


def _sync(node: Any) -> Any:
    res = cli("sync", "--home", str(node.cfg.home))
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def test_an_unencodable_item_is_set_aside_and_every_other_change_still_reaches_the_store(net: Net) -> None:
    bad, good = _items(net)[:2]
    value = _spoil(net, bad)
    reprice(net.ho, [good], "2.00")
    expected = prices(net.ho, [good])[good]

    res = _sync(net.ho)  # was: exit 1 and an ArrowInvalid traceback, nothing exported
    assert "Traceback" not in res.output
    _sync(net.store())
    _sync(net.ho)  # the store's ack
    assert prices(net.store(), [good])[good] == expected  # the unrelated change went on

    sent = json.loads(cli("status", "sent", "--json", "--home", str(net.ho.cfg.home)).output)
    assert all(b["status"] == "PROCESSED" for b in sent["bundles"])
    [aside] = sent["set_aside"]
    assert (aside["doc_type"], aside["doc_key"], aside["table"], aside["column"], aside["value"]) == (
        "item", json.dumps([bad], separators=(",", ":")), "item", "updated_at", value)
    for word in ("item", bad, "updated_at", value):
        assert word in aside["reason"]
    assert RFC3339.fullmatch(aside["set_at"])
    listed = json.loads(cli("set-aside", "list", "--json", "--home", str(net.ho.cfg.home)).output)
    assert [d["doc_key"] for d in listed["set_aside"]] == [aside["doc_key"]]
    human = cli("status", "sent", "--home", str(net.ho.cfg.home))
    assert "1 document(s) set aside" in human.output and "updated_at" in human.output

    # still broken: retry says so, and keeps it aside (exit 1, the reason again)
    res = cli("set-aside", "retry", "--home", str(net.ho.cfg.home))
    assert res.exit_code == 1 and "still set aside" in res.output and "updated_at" in res.output

    # fixed: retry queues it, and it travels like any change
    with net.ho.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE item SET updated_at = '2024-03-01 04:30:00', name = 'Fixed' "
                             f"WHERE item_id = '{bad}'")
    res = cli("set-aside", "retry", "--home", str(net.ho.cfg.home))
    assert res.exit_code == 0 and "1 queued, 0 still set aside" in res.output
    _sync(net.ho)
    _sync(net.store())
    with net.store().engine.connect() as conn:
        assert conn.execute(select(s.item.c.name).where(s.item.c.item_id == bad)).scalar_one() == "Fixed"
    assert json.loads(cli("set-aside", "list", "--json", "--home", str(net.ho.cfg.home)).output)["set_aside"] == []


def test_a_document_fixed_and_changed_by_the_application_leaves_the_list_by_itself(net: Net) -> None:
    bad = _items(net)[0]
    _spoil(net, bad)
    _sync(net.ho)
    assert len(json.loads(cli("set-aside", "list", "--json", "--home", str(net.ho.cfg.home)).output)["set_aside"]) == 1
    with net.ho.engine.begin() as conn:  # the POS corrects the row and records the change itself
        conn.exec_driver_sql(f"UPDATE item SET updated_at = '2024-03-02 09:00:00' WHERE item_id = '{bad}'")
        record_events(conn, "item", [(bad,)])
    _sync(net.ho)
    assert json.loads(cli("set-aside", "list", "--json", "--home", str(net.ho.cfg.home)).output)["set_aside"] == []


def test_the_page_shows_what_was_set_aside(net: Net) -> None:
    from test_ui import request, ui_server

    bad = _items(net)[0]
    _spoil(net, bad)
    _sync(net.ho)
    net.dispose()
    with ui_server(net.ho.cfg.home) as ui:
        assert ui.url
        status, _h, html = request(ui.url, "/")
    assert status == 200
    assert 'id="setaside-table"' in html and f"{bad}" in html and "updated_at" in html


def _times(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every value under a key that names a time, anywhere in a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "sample":  # business rows as sent: checked by the bill tests, not exchange's own times
                continue
            if TIME_KEYS.search(str(k)) and (v is None or isinstance(v, str)):
                yield f"{path}.{k}", v
            else:
                yield from _times(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _times(v, f"{path}[{i}]")


def test_every_json_time_is_rfc3339_with_an_offset(net: Net) -> None:
    """docs/STATUS_JSON.md: SQLite homes printed their recorded times without an offset."""
    _spoil(net, _items(net)[0])  # a set-aside record has a time too
    reprice(net.ho, _items(net)[1:3])
    _sync(net.ho)
    _sync(net.store())
    seen = 0
    for node in (net.ho, net.store()):
        home = str(node.cfg.home)
        outputs = [cli("status", "sent", "--json", "--home", home), cli("status", "received", "--json", "--home", home),
                   cli("status", "parked", "--json", "--home", home), cli("set-aside", "list", "--json", "--home", home),
                   cli("sync", "--json", "--home", home)]
        received = node.cfg.home / "archive" / "received"  # what this node can decrypt: sent to it
        archived = sorted(received.rglob("*.bundle"))[:1] + sorted(received.rglob("*.ack"))[:1]
        outputs += [cli("inspect", str(p), "--json", "--home", home) for p in archived]
        for res in outputs:
            assert res.exit_code == 0, res.output
            for where, value in _times(json.loads(res.output)):
                seen += value is not None
                assert value is None or RFC3339.fullmatch(value), f"{node.id} {where}: {value!r}"
    assert seen >= 8
