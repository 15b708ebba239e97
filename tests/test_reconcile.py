"""The sender reconciles every ack (exchange.receive.reconcile), through the CLI on SQLite and PostgreSQL.

A document parked at the store shows as a difference on the HO's Sent view, in
``status sent --json`` and in the metrics, and the ack's totals are those of
what was applied (not of what was sent); an ack whose figures leave a document
unaccounted for is flagged in the bundle's reason; a clean ack reconciles ok.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from enginehelpers import Net, add_item, add_promotion, item_ids, make_net, reprice, seed_ho
from sqlalchemy import select
from test_heartbeat import metrics, served

from exchange.cli import main
from exchange.database.tables import xchg_sent
from exchange.files import write_file_atomic
from exchange.node.home import Node
from exchange.send.export import reload
from exchange.wire.bundle import BundleReader, build_ack, read_ack
from exchange.wire.formats import ack_name


def run(*args: str) -> Result:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def cli_sync(node: Node) -> None:
    run("sync", "--home", str(node.cfg.home))


def sent_json(node: Node) -> dict[int, dict[str, Any]]:
    out = json.loads(run("status", "sent", "--home", str(node.cfg.home), "--json").output)
    return {b["seq"]: b for b in out["bundles"] if b["peer"] == "s001"}


@pytest.fixture
def net(tmp_path: Path, db_url: str) -> Iterator[Net]:
    n = make_net(tmp_path / "net", ho_db=db_url, stores=("s001",))
    seed_ho(n, items=5)
    n.dispose()
    for _ in range(3):
        for node in n.nodes:
            cli_sync(node)
    n.dispose()
    yield n
    n.dispose()


def test_a_clean_ack_reconciles(net: Net) -> None:
    rows = sent_json(net.ho)
    assert rows and all(r["status"] == "PROCESSED" for r in rows.values())
    for r in rows.values():
        assert r["reconcile"]["ok"] is True and r["reconcile"]["problems"] == []
        assert r["reconcile"]["types"]["item"]["sent"] == r["reconcile"]["types"]["item"]["applied"] == 5


def test_a_document_parked_at_the_store_shows_on_the_sent_view(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    ids = item_ids(net)
    with ho.engine.begin() as conn:
        add_item(conn, "IX0000001")  # recorded without an event: never sent, so the promotion parks at s001
        add_promotion(conn, "P00009", ["IX0000001", ids[0]])
    reload(ho, "s001", ["promotion"])
    ho.engine.dispose()
    cli_sync(ho)
    cli_sync(st)
    cli_sync(ho)
    rows = sent_json(ho)
    seq = max(rows)
    rec = rows[seq]["reconcile"]
    assert rows[seq]["status"] == "PROCESSED" and rec["ok"] is False
    n = rec["types"]["promotion"]["sent"]
    assert rec["types"]["promotion"] == {"sent": n, "applied": n - 1, "parked": 1, "stale": 0}
    assert f"promotion: 1 of {n} parked" in rec["problems"]
    assert rec["unexplained"] == []  # the parked count explains the smaller total
    assert rows[seq]["reason"] == "1 document parked at s001"
    # the ack states the totals of what was applied: what was sent less the parked promotion's lines
    ack = read_ack(ho.cfg.archive_received / ack_name("s001", "ho", seq), ho.trust, me="ho",
                   identities=ho.identities)
    with ho.engine.connect() as conn:
        sealed = json.loads(conn.execute(select(xchg_sent.c.sent_totals).where(
            xchg_sent.c.peer == "s001", xchg_sent.c.seq == seq)).scalar())
    ref = "promotion_item.promo_price"
    sent_total, applied_total = Decimal(sealed["promotion"]["totals"][ref]), Decimal(ack.applied["promotion"]["totals"][ref])
    assert sent_total - applied_total == Decimal("1.50") + 1 + Decimal("1.50") + 2  # P00009's two lines
    assert f"promotion: {ref} sent {sent_total}, applied {applied_total}" in rec["problems"]
    # the human Sent view and the metrics say so too
    text = run("status", "sent", "--home", str(ho.cfg.home)).output
    assert "the ack differs from what was sent" in " ".join(text.split())
    ho.engine.dispose()
    with served(ho.cfg.home) as url:
        m = metrics(url)
    assert m[("exchange_sent_mismatched_bundles", (("peer", "s001"),))] == 1


def test_an_ack_leaving_a_document_unaccounted_for_is_flagged(net: Net) -> None:
    ho, st = net.ho, net.store("s001")
    reprice(ho, item_ids(net)[:3], "2.00")
    ho.engine.dispose()
    cli_sync(ho)  # the bundle goes to the transfer folder; s001 does not take it
    seq = max(sent_json(ho))
    bundle = ho.cfg.archive_sent / f"ho.s001.{seq:010d}.bundle"
    with BundleReader(bundle) as r:
        manifest_sha = r.manifest.sha256
    with ho.engine.connect() as conn:
        row = conn.execute(select(xchg_sent).where(xchg_sent.c.peer == "s001", xchg_sent.c.seq == seq)).mappings().one()
    sealed = json.loads(row["sent_totals"])
    assert sealed["item"]["count"] == 3
    # the store's own key signs an ack that reports two items applied and nothing parked: one is lost
    data = build_ack(key=st.signing_key, acker="s001", sender="ho", seq=seq, bundle_sha256=row["file_sha256"],
                     manifest_sha256=manifest_sha, result="APPLIED", recipients=st.recipients_for("ho"),
                     applied={"item": {"applied": 2, "parked": 0, "stale": 0, "totals": sealed["item"]["totals"]}})
    write_file_atomic(ho.cfg.inbox / ack_name("s001", "ho", seq), data)
    cli_sync(ho)
    got = sent_json(ho)[seq]
    assert got["status"] == "PROCESSED"
    assert got["reconcile"]["unexplained"] == ["item: 3 sent, 2 applied, 0 parked, 0 older than held: +1 unaccounted for"]
    assert got["reason"] == ("the ack differs from what was sent: "
                             "item: 3 sent, 2 applied, 0 parked, 0 older than held: +1 unaccounted for")
