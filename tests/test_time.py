"""Time that means the same everywhere, and one row the exporter cannot encode never stops a node.

Every scenario runs through the command line (``exchange sync``, ``status``,
``set-aside``) on real node homes exchanging through a folder, with the HO on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
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

    SQLite keeps any text (here, a day that does not exist); PostgreSQL's ``timestamptz``
    takes ``infinity``, which no Arrow timestamp can hold. (A time with an offset,
    ``2024-03-01 10:00:00+05:30``, was one until ``updated_at`` became zone-aware.)
    """
    value = "2024-02-31 10:00:00" if net.ho.engine.dialect.name == "sqlite" else "infinity"
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
    assert "1 document set aside" in human.output and "updated_at" in human.output

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


def test_an_unencodable_item_in_a_fan_out_is_set_aside_and_every_store_gets_the_rest(db_url: str,
                                                                                       tmp_path: Path) -> None:
    """With several stores the HO seals their bundles in one transaction (exchange.send.export, GROUP): the
    item it cannot encode rolls the group back, is set aside once, and the group is sealed again without it."""
    n = make_net(tmp_path / "net", ho_db=None if db_url.startswith("sqlite") else db_url, stores=("s001", "s002"))
    try:
        seed_ho(n, items=6)
        n.settle()
        bad, good = _items(n)[:2]
        value = _spoil(n, bad)
        reprice(n.ho, [good], "2.00")
        expected = prices(n.ho, [good])[good]
        assert "Traceback" not in _sync(n.ho).output
        assert not [p.name for p in n.ho.cfg.outbox.iterdir() if p.name.endswith(".part")]
        for sid in ("s001", "s002"):
            _sync(n.store(sid))
        _sync(n.ho)  # the stores' acks
        assert [prices(n.store(sid), [good])[good] for sid in ("s001", "s002")] == [expected, expected]
        sent = json.loads(cli("status", "sent", "--json", "--home", str(n.ho.cfg.home)).output)
        assert all(b["status"] == "PROCESSED" for b in sent["bundles"])
        assert {b["peer"] for b in sent["bundles"]} == {"s001", "s002"}
        [aside] = sent["set_aside"]
        assert (aside["doc_key"], aside["column"], aside["value"]) == (json.dumps([bad], separators=(",", ":")),
                                                                      "updated_at", value)
    finally:
        n.dispose()


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
    from test_metrics import scrape, value

    with ui_server(net.ho.cfg.home) as ui:
        assert ui.url
        status, _h, html = request(ui.url, "/")
        metrics = scrape(ui.url)
    assert status == 200
    assert 'id="setaside-table"' in html and f"{bad}" in html and "updated_at" in html
    assert value(metrics, "exchange_set_aside_documents") == 1


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
                   cli("sync", "--json", "--home", home), cli("usb", "last", "--json", "--home", home),
                   cli("peer", "list", "--json", "--home", home)]
        received = node.cfg.home / "archive" / "received"  # what this node can decrypt: sent to it
        archived = sorted(received.rglob("*.bundle"))[:1] + sorted(received.rglob("*.ack"))[:1]
        outputs += [cli("inspect", str(p), "--json", "--home", home) for p in archived]
        doctor = cli("doctor", "--json", "--home", home)  # exit 1 is fine here (a clock, the disk): its times count
        for res in [*outputs, doctor]:
            assert res.exit_code == 0 or res is doctor, res.output
            for where, value in _times(json.loads(res.output)):
                seen += value is not None
                assert value is None or RFC3339.fullmatch(value), f"{node.id} {where}: {value!r}"
    assert seen >= 8


# ---------------------------------------------------------------- business times across zones

IST, EST = timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-5))


@pytest.fixture
def zones(db_url: str, tmp_path: Path) -> Iterator[Net]:
    """An HO (SQLite, then PostgreSQL) and two stores in different zones, items delivered."""
    n = make_net(tmp_path / "net", ho_db=None if db_url.startswith("sqlite") else db_url, stores=("s001", "s002"))
    seed_ho(n, items=3)
    n.settle()
    yield n
    n.dispose()


def _bill(node: Any, store: str, bill_no: str, at: datetime, item: str, amount: str) -> None:
    """A bill as a till makes it: its local time with the offset, and the offset kept beside it."""
    with node.engine.begin() as conn:
        conn.execute(s.sales_bill.insert().values(store_id=store, bill_no=bill_no, bill_date=at,
                                                  bill_date_offset=s.offset_minutes(at), customer_id=None,
                                                  total=Decimal(amount), tax=Decimal("0.00")))
        conn.execute(s.sales_bill_line.insert().values(store_id=store, bill_no=bill_no, line_no=1, item_id=item,
                                                       qty=Decimal("1.000"), price=Decimal(amount),
                                                       amount=Decimal(amount), tax=Decimal("0.00")))
        record_events(conn, "sales_bill", [(store, bill_no)])


def _bills_at(node: Any) -> dict[str, tuple[datetime, int | None]]:
    with node.engine.connect() as conn:
        return {str(r[0]): (r[1], r[2]) for r in conn.execute(select(
            s.sales_bill.c.bill_no, s.sales_bill.c.bill_date, s.sales_bill.c.bill_date_offset))}


def test_a_bill_at_2330_in_two_zones_reads_back_with_its_own_offset_at_the_ho(zones: Net) -> None:
    item = _items(zones)[0]
    _bill(zones.store("s001"), "s001", "B-IST", datetime(2024, 3, 1, 23, 30, tzinfo=IST), item, "10.00")
    _bill(zones.store("s002"), "s002", "B-EST", datetime(2024, 3, 1, 23, 30, tzinfo=EST), item, "20.00")
    for sid in ("s001", "s002"):
        _sync(zones.store(sid))
    _sync(zones.ho)

    got = _bills_at(zones.ho)
    ist, est = got["B-IST"], got["B-EST"]
    # the instants: 18:00 UTC on the 1st, 04:30 UTC on the 2nd (the naive store kept 23:30 for both)
    assert ist[0] == datetime(2024, 3, 1, 18, 0, tzinfo=UTC) and est[0] == datetime(2024, 3, 2, 4, 30, tzinfo=UTC)
    assert ist[0].utcoffset() == timedelta(0)
    # and the local time each till showed, offset and all
    assert s.local_time(*ist).isoformat() == "2024-03-01T23:30:00+05:30"
    assert s.local_time(*est).isoformat() == "2024-03-01T23:30:00-05:00"
    # in time order at the HO, whatever its database: the EST bill is the later one
    with zones.ho.engine.connect() as conn:
        order = list(conn.execute(select(s.sales_bill.c.bill_no).order_by(s.sales_bill.c.bill_date)).scalars())
    assert order == ["B-IST", "B-EST"]

    # the auditor's report over the HO's archive sums each store's bills (from the verified bundles)
    home = zones.ho.cfg.home
    res = cli("audit", "report", "--home", str(home), "--identity", str(home / "keys" / "node.age"), "--json")
    assert res.exit_code == 0, res.output
    rows = [r for r in json.loads(res.output)["rows"] if r["doc_type"] == "sales_bill"]
    totals = {r["sender"]: Decimal(r["totals"]["sales_bill.total"]) for r in rows}
    assert totals == {"s001": Decimal("10.00"), "s002": Decimal("20.00")}


def _report(node: Any, *extra: str) -> dict[str, Any]:
    home = node.cfg.home
    res = cli("audit", "report", "--home", str(home), "--identity", str(home / "keys" / "node.age"), "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)  # type: ignore[no-any-return]


def _bill_days(report: dict[str, Any], total: str = "sales_bill.total") -> dict[tuple[str, str], Decimal]:
    return {(r["sender"], r["day"]): Decimal(r["totals"][total]) for r in report["rows"]
            if r["doc_type"] == "sales_bill"}


def test_the_audit_report_sums_bills_per_their_own_local_business_day(zones: Net, tmp_path: Path) -> None:
    """23:30 at +05:30 (18:00Z on the 1st) and 23:30 at -05:00 (04:30Z on the 2nd) both close 1 March's
    trading; a bill at 00:30 +05:30 on the 2nd (19:00Z on the 1st) is the 2nd's. The report puts each on
    its own local day; --day utc and --day bundle still give the UTC days."""
    item = _items(zones)[0]
    _bill(zones.store("s001"), "s001", "B-IST", datetime(2024, 3, 1, 23, 30, tzinfo=IST), item, "10.00")
    _bill(zones.store("s001"), "s001", "B-IST2", datetime(2024, 3, 2, 0, 30, tzinfo=IST), item, "5.00")
    _bill(zones.store("s002"), "s002", "B-EST", datetime(2024, 3, 1, 23, 30, tzinfo=EST), item, "20.00")
    for sid in ("s001", "s002"):
        _sync(zones.store(sid))
    _sync(zones.ho)

    local = _report(zones.ho)
    assert local["day"] == "local"
    assert _bill_days(local) == {("s001", "2024-03-01"): Decimal("10.00"), ("s001", "2024-03-02"): Decimal("5.00"),
                                 ("s002", "2024-03-01"): Decimal("20.00")}
    assert _bill_days(local, "sales_bill_line.amount") == _bill_days(local)  # the lines follow their bill
    bills = {(r["sender"], r["day"]): r for r in local["rows"] if r["doc_type"] == "sales_bill"}
    assert {k: (r["documents"], r["rows"]["sales_bill_line"], r["day_basis"]) for k, r in bills.items()} == {
        ("s001", "2024-03-01"): (1, 1, "local"), ("s001", "2024-03-02"): (1, 1, "local"),
        ("s002", "2024-03-01"): (1, 1, "local")}

    utc = _report(zones.ho, "--day", "utc")
    assert _bill_days(utc) == {("s001", "2024-03-01"): Decimal("15.00"), ("s002", "2024-03-02"): Decimal("20.00")}
    by_bundle = _report(zones.ho, "--day", "bundle")
    today = datetime.now(UTC).date().isoformat()  # the bundles were sealed just now
    assert {(s_, d) for s_, d in _bill_days(by_bundle)} <= {("s001", today), ("s002", today),
                                                             ("s001", _yesterday(today)), ("s002", _yesterday(today))}
    assert sum(_bill_days(by_bundle).values()) == Decimal("35.00")

    # the table and the CSV say which day each row is
    home = zones.ho.cfg.home
    out = tmp_path / "totals.csv"
    res = cli("audit", "report", "--home", str(home), "--identity", str(home / "keys" / "node.age"),
              "--csv", str(out))
    assert res.exit_code == 0 and "local business day" in res.output and "2024-03-02" in res.output, res.output
    lines = out.read_text().splitlines()
    assert lines[0].startswith("sender,recipient,day,doc_type,") and lines[0].endswith(",day_basis")
    assert any(line.startswith("s002,ho,2024-03-01,sales_bill,") and line.endswith(",local") for line in lines)


def _yesterday(day: str) -> str:
    return (datetime.fromisoformat(day) - timedelta(days=1)).date().isoformat()


def test_a_bill_offset_beyond_any_zone_is_reported_on_its_bundle_day_with_why(zones: Net) -> None:
    """An offset is a peer's data: one no zone has (5000 minutes) is not trusted to move a bill's day;
    the bill is counted on its bundle's day and the report says why, without a traceback. The HO does
    not store it: the bill parks with the column and the value named, the store's other bill applies,
    a retry keeps it parked, and the store's correction (a newer version) replaces it."""
    st = zones.store("s001")
    item = _items(zones)[0]
    _bill(st, "s001", "B-ODD", datetime(2024, 3, 1, 23, 30, tzinfo=IST), item, "10.00")
    _bill(st, "s001", "B-OK", datetime(2024, 3, 1, 22, 0, tzinfo=IST), item, "5.00")
    with st.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE sales_bill SET bill_date_offset = 5000 WHERE bill_no = 'B-ODD'")
    _sync(st)
    _sync(zones.ho)
    home = str(zones.ho.cfg.home)
    assert set(_bills_at(zones.ho)) == {"B-OK"}
    [parked] = json.loads(cli("status", "parked", "--home", home, "--json").output)["parked"]
    assert parked["doc_key"] == '["s001","B-ODD"]'
    assert "sales_bill.bill_date_offset = 5000 minutes east of UTC is beyond any zone" in parked["error"]
    assert cli("retry", "--home", home).exit_code == 0
    assert set(_bills_at(zones.ho)) == {"B-OK"}
    assert len(json.loads(cli("status", "parked", "--home", home, "--json").output)["parked"]) == 1
    rep = _report(zones.ho)
    [note] = rep["notes"]
    assert "s001.ho." in note["file"] and "offset 5000 minutes is beyond any zone" in note["reason"]
    [row] = [r for r in rep["rows"] if r["doc_type"] == "sales_bill"]
    assert (row["day_basis"], Decimal(row["totals"]["sales_bill.total"])) == ("bundle", Decimal("15.00"))

    with st.engine.begin() as conn:  # the till's fix: the offset it meant
        conn.exec_driver_sql("UPDATE sales_bill SET bill_date_offset = 330 WHERE bill_no = 'B-ODD'")
        record_events(conn, "sales_bill", [("s001", "B-ODD")])
    _sync(st)
    _sync(zones.ho)
    assert s.local_time(*_bills_at(zones.ho)["B-ODD"]).isoformat() == "2024-03-01T23:30:00+05:30"
    assert json.loads(cli("status", "parked", "--home", home, "--json").output)["parked"] == []


def test_business_times_travel_as_zone_aware_parquet(zones: Net) -> None:
    from exchange.wire.bundle import open_bundle

    st = zones.store("s001")
    _bill(st, "s001", "B1", datetime(2024, 3, 1, 23, 30, tzinfo=IST), _items(zones)[0], "5.00")
    _sync(st)
    with st.engine.connect() as conn:  # SQLite keeps the instant as UTC text, in time order
        raw = conn.exec_driver_sql("SELECT bill_date, bill_date_offset FROM sales_bill").one()
    assert tuple(raw) == ("2024-03-01 18:00:00.000000Z", 330)
    path = sorted((st.cfg.home / "archive" / "sent").rglob("s001.ho.*.bundle"))[-1]
    ho = zones.ho
    with open_bundle(path, trust=ho.trust, identities=ho.identities, me=ho.id, workdir=ho.cfg.work) as opened:
        bills = opened.table("sales_bill")
    assert bills.schema.field("bill_date").type == pa.timestamp("us", tz="UTC")
    assert bills.column("bill_date_offset").to_pylist() == [330]
    _sync(ho)  # the HO's own inspection of what it received: the instant in RFC 3339
    received = next((ho.cfg.home / "archive" / "received").glob(path.name))
    shown = json.loads(cli("inspect", str(received), "--json", "--home", str(ho.cfg.home)).output)
    [sample] = [t["sample"] for t in shown["tables"] if t["table"] == "sales_bill"]
    assert (sample[0]["bill_date"], sample[0]["bill_date_offset"]) == ("2024-03-01T18:00:00+00:00", "330")


def test_an_older_bundle_with_naive_bill_times_is_still_applied(zones: Net) -> None:
    """Format 2 bundles carry naive times and no offset column: read as UTC, offset unknown (NULL)."""
    from enginehelpers import docs_of, forge_bundle

    st = zones.store("s001")
    _bill(st, "s001", "OLD1", datetime(2024, 3, 1, 9, 15), _items(zones)[0], "7.00")

    def as_before(tables: dict[str, Any]) -> None:
        t = tables["sales_bill"]
        t = t.drop_columns(["bill_date_offset"])
        i = t.schema.get_field_index("bill_date")
        tables["sales_bill"] = t.set_column(i, pa.field("bill_date", pa.timestamp("us"), False),
                                            t.column(i).cast(pa.timestamp("us")))

    forge_bundle(st, "ho", docs_of(st, "sales_bill", [("s001", "OLD1")]), tables_hook=as_before)
    with st.engine.begin() as conn:  # the forged bundle carried it: the log has nothing more to send
        conn.exec_driver_sql("UPDATE xchg_event SET routed = 1")
    _sync(st)
    _sync(zones.ho)
    assert _bills_at(zones.ho)["OLD1"] == (datetime(2024, 3, 1, 9, 15, tzinfo=UTC), None)
    received = json.loads(cli("status", "received", "--json", "--home", str(zones.ho.cfg.home)).output)
    assert [b["status"] for b in received["bundles"] if b["peer"] == "s001"][-1] == "APPLIED"


def test_a_time_in_another_zone_name_or_unit_is_still_a_type_change(zones: Net) -> None:
    """Only naive and UTC times of the same unit are the same instants to a receiver (rows.zone_only); a
    peer's Parquet that names another zone for a column is not guessed at: HELD, the column named."""
    from enginehelpers import docs_of, forge_bundle

    st = zones.store("s001")
    _bill(st, "s001", "ZONED", datetime(2024, 3, 1, 23, 30, tzinfo=IST), _items(zones)[0], "7.00")

    def other_zone(tables: dict[str, Any]) -> None:
        t = tables["sales_bill"]
        i = t.schema.get_field_index("bill_date")
        kind = pa.timestamp("us", tz="+05:30")
        tables["sales_bill"] = t.set_column(i, pa.field("bill_date", kind, False), t.column(i).cast(kind))

    forge_bundle(st, "ho", docs_of(st, "sales_bill", [("s001", "ZONED")]), tables_hook=other_zone)
    with st.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE xchg_event SET routed = 1")
    _sync(st)
    res = cli("sync", "--home", str(zones.ho.cfg.home))
    assert res.exit_code == 15 and "Traceback" not in res.output, res.output
    received = json.loads(cli("status", "received", "--json", "--home", str(zones.ho.cfg.home)).output)
    [held] = [b for b in received["bundles"] if b["peer"] == "s001" and b["status"] == "HELD"]
    assert "column bill_date is timestamp[us, tz=+05:30] in the bundle and timestamp[us, tz=UTC] here" in held["reason"]
    assert "ZONED" not in _bills_at(zones.ho)


def test_a_home_made_before_zoned_bill_times_is_upgraded_by_migrate(zones: Net) -> None:
    """`exchange migrate` turns an earlier release's naive bill_date into the zoned form, values kept as UTC."""
    ho = zones.ho
    pg = ho.engine.dialect.name == "postgresql"
    with ho.engine.begin() as conn:  # the table as the previous release made it, with one bill
        conn.exec_driver_sql("ALTER TABLE sales_bill DROP COLUMN bill_date_offset")
        if pg:
            conn.exec_driver_sql("ALTER TABLE sales_bill ALTER COLUMN bill_date TYPE timestamp")
        conn.exec_driver_sql("INSERT INTO sales_bill (store_id, bill_no, bill_date, total, tax) "
                             "VALUES ('s001', 'LEGACY', '2024-03-01 10:05:00', 100, 0)")
    res = cli("migrate", "--home", str(ho.cfg.home))
    assert res.exit_code == 0, res.output
    assert _bills_at(ho)["LEGACY"] == (datetime(2024, 3, 1, 10, 5, tzinfo=UTC), None)
    res = cli("migrate", "--home", str(ho.cfg.home))  # again: nothing left to do
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- a peer's clock

@pytest.mark.parametrize("off_by", [3600, -3600])
def test_a_store_clock_off_by_an_hour_is_reported_by_doctor_and_status(net: Net, off_by: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's clock is set wrong for its sync (its signed ``created`` times come from it).

    Ahead: its bundle was signed "after" the HO received it. Behind: its ack for
    the HO's bundle was signed "before" the HO sealed that bundle. Both are
    proven, not guessed, so both are reported; data still flows by seq.
    """
    from exchange.files import utc_now
    from exchange.receive import importer
    from exchange.send import export
    from exchange.wire import bundle

    reprice(net.ho, _items(net)[:1])
    _sync(net.ho)
    _bill_now = datetime.now(UTC).replace(microsecond=0)
    with net.store().engine.begin() as conn:
        conn.execute(s.customer.insert().values(store_id="s001", customer_id="C1", name="Asha",
                                                created_at=_bill_now))
        record_events(conn, "customer", [("s001", "C1")])
    for module in (bundle, importer, export):  # every time the store's sync takes from its clock
        monkeypatch.setattr(module, "utc_now", lambda: utc_now() + timedelta(seconds=off_by))
    _sync(net.store())  # its ack for the HO's bundle and its own bundle carry its wrong clock
    monkeypatch.undo()
    _sync(net.ho)

    doctor = json.loads(cli("doctor", "--json", "--home", str(net.ho.cfg.home)).output)
    [clock] = [c for c in doctor["checks"] if c["name"] == "peer clocks"]
    assert not clock["ok"], clock
    assert ("ahead of" if off_by > 0 else "behind") in clock["detail"] and "s001" in clock["detail"]
    assert "allowed 300s" in clock["detail"]
    status = cli("status", "received", "--home", str(net.ho.cfg.home))
    assert "clock: s001's clock is at least" in status.output
    # sequence numbers, not clocks, ordered the data: everything was applied
    with net.ho.engine.connect() as conn:
        assert conn.execute(select(s.customer.c.name).where(s.customer.c.customer_id == "C1")).scalar_one() == "Asha"

    # a skew allowed by the configuration is not reported
    toml = net.ho.cfg.home / "exchange.toml"
    toml.write_text(toml.read_text().replace("max_clock_skew = 300", "max_clock_skew = 7200"))
    doctor = json.loads(cli("doctor", "--json", "--home", str(net.ho.cfg.home)).output)
    [clock] = [c for c in doctor["checks"] if c["name"] == "peer clocks"]
    assert clock["ok"] and "s001: within 7200s" in clock["detail"]


def test_clocks_in_step_pass_the_doctor(net: Net) -> None:
    reprice(net.ho, _items(net)[:1])
    _sync(net.ho)
    _sync(net.store())
    _sync(net.ho)
    doctor = json.loads(cli("doctor", "--json", "--home", str(net.ho.cfg.home)).output)
    [clock] = [c for c in doctor["checks"] if c["name"] == "peer clocks"]
    assert clock["ok"] and "s001: within 300s" in clock["detail"], clock


def test_a_transfer_order_whose_route_cannot_be_read_is_set_aside_and_the_others_route(net: Net) -> None:
    """A column-routed document is read at routing time (its destination): set aside there, the rest routed."""
    with net.ho.engine.connect() as conn:
        orders = sorted(str(k) for k in conn.execute(select(s.transfer_order.c.to_id)).scalars())
    assert len(orders) >= 1
    bad = orders[0]
    value = "31/02/2024" if net.ho.engine.dialect.name == "sqlite" else "infinity"
    with net.ho.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE transfer_order SET order_date = '{value}' WHERE to_id = '{bad}'")
        record_events(conn, "transfer_order", [(bad,)])
    good = _items(net)[3]
    reprice(net.ho, [good], "3.00")
    _sync(net.ho)
    _sync(net.store())
    assert prices(net.store(), [good]) == prices(net.ho, [good])
    [aside] = json.loads(cli("set-aside", "list", "--json", "--home", str(net.ho.cfg.home)).output)["set_aside"]
    assert (aside["doc_type"], aside["table"], aside["column"], aside["value"]) == (
        "transfer_order", "transfer_order", "order_date", value)


def test_a_reload_sets_aside_a_transfer_order_whose_route_cannot_be_read(net: Net) -> None:
    with net.ho.engine.connect() as conn:
        orders = sorted(str(k) for k in conn.execute(select(s.transfer_order.c.to_id)).scalars())
    bad = orders[0]
    value = "31/02/2024" if net.ho.engine.dialect.name == "sqlite" else "infinity"
    with net.ho.engine.begin() as conn:  # no event: the POS changed it behind exchange's back
        conn.exec_driver_sql(f"UPDATE transfer_order SET order_date = '{value}' WHERE to_id = '{bad}'")
    res = cli("reload", "--home", str(net.ho.cfg.home), "--peer", "s001", "--doc", "transfer_order")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    [aside] = json.loads(cli("set-aside", "list", "--json", "--home", str(net.ho.cfg.home)).output)["set_aside"]
    assert (aside["doc_key"], aside["column"], aside["value"]) == (json.dumps([bad]), "order_date", value)
    assert "0 documents queued" in res.output or len(orders) > 1
    _sync(net.ho)  # nothing waits behind it
    sent = json.loads(cli("status", "sent", "--json", "--home", str(net.ho.cfg.home)).output)
    assert [d["doc_key"] for d in sent["set_aside"]] == [json.dumps([bad])]
    _sync(net.store())  # set aside is not deleted: the store keeps the order it had
    with net.store().engine.connect() as conn:
        assert bad in set(conn.execute(select(s.transfer_order.c.to_id)).scalars())


def test_a_store_bill_that_cannot_be_encoded_is_set_aside_and_its_other_bills_reach_the_ho(net: Net) -> None:
    """A store sends from its capture log: the bad bill's events leave the log, the next bill goes."""
    st = net.store()
    with st.engine.begin() as conn:
        conn.execute(s.sales_bill.insert().values(store_id="s001", bill_no="GOOD", bill_date=datetime(2024, 3, 1, 9),
                                                  total=Decimal("1.00"), tax=Decimal("0.00")))
        conn.exec_driver_sql("INSERT INTO sales_bill (store_id, bill_no, bill_date, total, tax) "
                             "VALUES ('s001', 'BAD', 'yesterday at noon', 100, 0)")
        record_events(conn, "sales_bill", [("s001", "BAD"), ("s001", "GOOD")])
    _sync(st)
    _sync(net.ho)
    assert set(_bills_at(net.ho)) == {"GOOD"}
    [aside] = json.loads(cli("set-aside", "list", "--json", "--home", str(st.cfg.home)).output)["set_aside"]
    assert (aside["doc_key"], aside["column"], aside["value"]) == ('["s001","BAD"]', "bill_date", "yesterday at noon")
    with st.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE sales_bill SET bill_date = '2024-03-01 12:00:00' WHERE bill_no = 'BAD'")
    assert cli("set-aside", "retry", "--home", str(st.cfg.home), "--doc", "sales_bill",
               "--key", '["s001","BAD"]').exit_code == 0
    _sync(st)
    _sync(net.ho)
    assert _bills_at(net.ho)["BAD"] == (datetime(2024, 3, 1, 12, tzinfo=UTC), None)


# ---------------------------------------------------------------- the reference schema's other business times

#: Business times made zone-aware after bill_date, and their offset columns (exchange.database.schema.ZONED).
LATER_ZONED = {("item", "updated_at"): None, ("customer", "created_at"): "created_at_offset"}


def _as_previous_release(node: Any) -> None:
    """The node's database as the previous release made it: these times naive, no offset column."""
    from test_schema_evolution import sql

    for (table, column), offset in LATER_ZONED.items():
        if offset:
            sql(node, f"ALTER TABLE {table} DROP COLUMN {offset}")
        if node.engine.dialect.name == "postgresql":
            sql(node, f"ALTER TABLE {table} ALTER COLUMN {column} TYPE timestamp USING {column} AT TIME ZONE 'UTC'")


def _customer_times(node: Any) -> dict[str, tuple[datetime, int | None]]:
    """Each customer's created_at (read as this release reads it: the UTC instant) and its offset, if any."""
    from sqlalchemy import inspect, text

    with node.engine.connect() as conn:
        has_offset = "created_at_offset" in {c["name"] for c in inspect(conn).get_columns("customer")}
        q = "SELECT customer_id, created_at" + (", created_at_offset" if has_offset else "") + " FROM customer"
        out = {}
        for r in conn.execute(text(q)):
            t = r[1] if isinstance(r[1], datetime) else datetime.fromisoformat(str(r[1]))
            out[str(r[0])] = ((t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC),
                              r[2] if has_offset else None)
        return out


def _item_time(node: Any, item_id: str) -> datetime:
    with node.engine.connect() as conn:
        value = conn.execute(select(s.item.c.updated_at).where(s.item.c.item_id == item_id)).scalar_one()
    assert value.utcoffset() == timedelta(0)
    return value  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_later_business_times_migrate_on_either_side_in_any_order(kind: str, tmp_path: Path) -> None:
    """item.updated_at and customer.created_at became zone-aware (customer with its offset). s001 migrates
    first and sends a zone-aware sign-up to an HO not migrated; the HO, not migrated, sends a naive item time
    to s001; then the HO migrates and sends a zone-aware item time to s002, not migrated; s002 migrates last.
    Nothing is HELD, every instant arrives the same, the offset waits at the HO until it has the column."""
    from sqlalchemy import text
    from test_schema_evolution import _net, received, statuses, sync_all

    with _net(kind, tmp_path / "net", None) as net:
        ho, s001, s002 = net.ho, net.store("s001"), net.store("s002")
        if kind == "postgresql":  # sessions in the nodes' own zones: nothing may depend on a session's TimeZone
            for node, zone in ((ho, "Asia/Kolkata"), (s001, "Asia/Kolkata"), (s002, "America/New_York")):
                with node.engine.connect() as conn:
                    conn.exec_driver_sql(f"ALTER DATABASE \"{node.engine.url.database}\" SET timezone = '{zone}'")
                    conn.commit()
                node.engine.dispose()
                with node.engine.connect() as conn:
                    assert conn.exec_driver_sql("SHOW timezone").scalar() == zone
        for node in net.nodes:
            _as_previous_release(node)
        net.reopen()
        ho, s001, s002 = net.ho, net.store("s001"), net.store("s002")
        assert cli("migrate", "--home", str(s001.cfg.home)).exit_code == 0
        net.reopen()
        ho, s001, s002 = net.ho, net.store("s001"), net.store("s002")

        # HO (not migrated) -> s001 (migrated): an item whose time the HO's POS wrote naive (UTC)
        with ho.engine.begin() as conn:
            conn.execute(text("INSERT INTO item (item_id, name, category, uom, price, tax_rate, active, updated_at) "
                              "VALUES ('I1', 'Tea', 'GROCERY', 'EA', 100, 500, :t, '2024-03-01 10:00:00')"),
                         {"t": True})
            record_events(conn, "item", [("I1",)])
        # s001 (migrated) -> HO (not migrated): a customer signed up at 23:30 in India, offset and all
        signed_up = datetime(2024, 3, 1, 23, 30, tzinfo=IST)
        with s001.engine.begin() as conn:
            conn.execute(s.customer.insert().values(store_id="s001", customer_id="C1", name="Asha",
                                                    created_at=signed_up, created_at_offset=330))
            record_events(conn, "customer", [("s001", "C1")])
        # s002 (not migrated) -> HO (not migrated): its POS writes naive times, as before
        with s002.engine.begin() as conn:
            conn.execute(text("INSERT INTO customer (store_id, customer_id, name, created_at) "
                              "VALUES ('s002', 'C2', 'Ben', '2024-03-01 09:00:00')"))
            record_events(conn, "customer", [("s002", "C2")])
        sync_all(net)  # every sync exits 0: nothing HELD
        for node in net.nodes:
            assert set(statuses(node)) == {"APPLIED"}, (node.id, received(node))
        assert _item_time(s001, "I1") == datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
        assert _customer_times(ho) == {"C1": (datetime(2024, 3, 1, 18, 0, tzinfo=UTC), None),
                                       "C2": (datetime(2024, 3, 1, 9, 0, tzinfo=UTC), None)}
        kept = json.loads(cli("catalog", "kept", "--home", str(ho.cfg.home), "--json").output)
        assert [(k["peer"], k["table"], k["column"], k["rows"]) for k in kept] == [
            ("s001", "customer", "created_at_offset", 1)]

        # the HO migrates: its times become zone-aware, the kept offset is written
        res = cli("migrate", "--home", str(ho.cfg.home))
        assert res.exit_code == 0 and "1 kept values applied" in res.output, res.output
        net.reopen()
        ho, s001, s002 = net.ho, net.store("s001"), net.store("s002")
        got = _customer_times(ho)
        assert got["C1"] == (datetime(2024, 3, 1, 18, 0, tzinfo=UTC), 330)
        assert s.local_time(*got["C1"]).isoformat() == "2024-03-01T23:30:00+05:30"
        assert got["C2"] == (datetime(2024, 3, 1, 9, 0, tzinfo=UTC), None)
        assert _item_time(ho, "I1") == datetime(2024, 3, 1, 10, 0, tzinfo=UTC)

        # HO (migrated) -> s001 (migrated) and s002 (not migrated): a zone-aware item time
        changed = datetime(2024, 3, 2, 12, 0, tzinfo=IST)
        with ho.engine.begin() as conn:
            conn.execute(s.item.update().where(s.item.c.item_id == "I1").values(name="Green tea", updated_at=changed))
            record_events(conn, "item", [("I1",)])
        sync_all(net)
        for node in net.nodes:
            assert set(statuses(node)) == {"APPLIED"}, (node.id, received(node))
        for store in (s001, s002):
            assert _item_time(store, "I1") == datetime(2024, 3, 2, 6, 30, tzinfo=UTC)
        sent = json.loads(cli("status", "sent", "--home", str(ho.cfg.home), "--json").output)["bundles"]
        assert {r["status"] for r in sent} == {"PROCESSED"}
        if kind == "postgresql":  # s002's column is still naive: shown, and said not to hold anything
            diff = json.loads(cli("catalog", "diff", "--peer", "s002", "--home", str(ho.cfg.home), "--json").output)
            [zoned] = [d for d in diff["differences"] if d["name"] == "customer.created_at"]
            assert (zoned["here"], zoned["peer"]) == ("timestamp[us, tz=UTC]", "timestamp[us]")
            assert "not held" in zoned["effect"]

        # s002 migrates weeks later: every instant it holds is the same, its old sign-up has no offset
        assert cli("migrate", "--home", str(s002.cfg.home)).exit_code == 0
        net.reopen()
        s002 = net.store("s002")
        assert _customer_times(s002) == {"C2": (datetime(2024, 3, 1, 9, 0, tzinfo=UTC), None)}
        assert _item_time(s002, "I1") == datetime(2024, 3, 2, 6, 30, tzinfo=UTC)
        if kind == "postgresql":
            with s002.engine.connect() as conn:
                assert s.naive_times(conn) == []
        else:  # the previous release's naive text, rewritten as UTC text (text order is time order)
            with s002.engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT created_at FROM customer").scalar_one() == \
                    "2024-03-01 09:00:00.000000Z"
        assert cli("migrate", "--home", str(s002.cfg.home)).output.startswith("database up to date (0 ")


def test_the_demo_stores_trade_in_two_zones_and_the_ho_sums_their_local_days(tmp_path: Path) -> None:
    """The demo's stores stamp bills and sign-ups with their own zone and keep the offset; the HO holds
    the instants with those offsets and the demo's last table sums each store's local day."""
    from exchange.demo.run import run_demo
    from exchange.node.home import Node

    lines: list[str] = []
    assert run_demo(tmp_path / "demo", items=5, sales=4, echo=lines.append)
    ho = Node.open(tmp_path / "demo" / "ho")
    try:
        with ho.engine.connect() as conn:
            bills = conn.execute(select(s.sales_bill.c.store_id, s.sales_bill.c.bill_date,
                                        s.sales_bill.c.bill_date_offset)).all()
            signups = conn.execute(select(s.customer.c.store_id, s.customer.c.created_at,
                                          s.customer.c.created_at_offset)).all()
    finally:
        ho.engine.dispose()
    assert {(r[0], r[2]) for r in bills} == {("s001", 330), ("s002", -300)}
    assert {(r[0], r[2]) for r in signups} == {("s001", 330), ("s002", -300)}
    # the day starts at 09:00 at each store: 03:30 UTC in India, 14:00 UTC in New York
    first = {store: min(s.local_time(at, off) for st, at, off in bills if st == store) for store in ("s001", "s002")}
    assert {k: v.strftime("%H %z") for k, v in first.items()} == {"s001": "09 +0530", "s002": "09 -0500"}
    assert min(at for st, at, _o in bills if st == "s001") > datetime(2024, 1, 1, 3, 30, tzinfo=UTC)
    i = lines.index("\n== sales at the HO per store and local business day (each bill at its till's own offset)")
    assert lines[i + 1].startswith("  s001 2024-01-01 (UTC+05:30)    4 bills  total ")
    assert lines[i + 2].startswith("  s002 2024-01-01 (UTC-05:00)    4 bills  total ")
    assert "s001 at UTC+05:30, s002 at UTC-05:00" in "\n".join(lines)


def test_a_bill_parked_before_the_ho_migrated_applies_at_its_instant_after(pg_url: str, tmp_path: Path) -> None:
    """A PostgreSQL HO of the release before zoned bill times, its sessions at +05:30, parks a bill (an item it
    does not have yet) whose time it holds naive (UTC); it migrates, gets the item and retries: the bill lands
    at its instant, not at the session's wall clock (18:00Z, not 12:30Z)."""
    from sqlalchemy import text

    n = make_net(tmp_path / "net", ho_db=pg_url, stores=("s001",))
    try:
        seed_ho(n, items=1)
        n.settle()
        ho, st = n.ho, n.store()
        with ho.engine.connect() as conn:
            conn.exec_driver_sql(f"ALTER DATABASE \"{ho.engine.url.database}\" SET timezone = 'Asia/Kolkata'")
            conn.commit()
        ho.engine.dispose()
        with ho.engine.begin() as conn:  # sales_bill as the release before zoned bill times made it
            conn.exec_driver_sql("ALTER TABLE sales_bill DROP COLUMN bill_date_offset")
            conn.exec_driver_sql("ALTER TABLE sales_bill ALTER COLUMN bill_date TYPE timestamp "
                                 "USING bill_date AT TIME ZONE 'UTC'")
        n.reopen()
        ho, st = n.ho, n.store()
        with st.engine.begin() as conn:  # an item the HO has not got (the store's own, by hand)
            conn.execute(text("INSERT INTO item (item_id, name, category, uom, price, tax_rate, active, updated_at) "
                              "VALUES ('GHOST', 'Local', 'GROCERY', 'EA', 100, 500, :t, '2024-03-01 10:00:00Z')"),
                         {"t": True})
        _bill(st, "s001", "B-PARK", datetime(2024, 3, 1, 23, 30, tzinfo=IST), "GHOST", "4.00")
        _sync(st)
        _sync(ho)
        parked = json.loads(cli("status", "parked", "--json", "--home", str(ho.cfg.home)).output)
        assert [p["doc_key"] for p in parked["parked"]] == ['["s001","B-PARK"]'], parked
        assert cli("migrate", "--home", str(ho.cfg.home)).exit_code == 0
        n.reopen()
        ho = n.ho
        with ho.engine.begin() as conn:
            conn.execute(text("INSERT INTO item (item_id, name, category, uom, price, tax_rate, active, updated_at) "
                              "VALUES ('GHOST', 'Local', 'GROCERY', 'EA', 1.00, 5.00, true, now())"))
        res = cli("retry", "--home", str(ho.cfg.home))
        assert res.exit_code == 0, res.output
        assert _bills_at(ho)["B-PARK"] == (datetime(2024, 3, 1, 18, 0, tzinfo=UTC), 330)  # the offset kept too
    finally:
        n.dispose()
