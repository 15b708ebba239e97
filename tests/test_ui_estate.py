"""The HO overview of a 30-store estate in real Chromium: the marks name exactly the stores in trouble.

Issue #16 asks for the overview's marks checked "with a 30-store HO": thirty real
store homes paired with the HO through a ``dir:`` folder and synced, then three
kinds of trouble made the way they happen (a file that is no bundle dropped in the
HO's folder, a sale of an item the HO never had, a bundle the store rejected),
and the page read at desktop and phone width.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from enginehelpers import Net, make_net, seed_ho
from sqlalchemy import func, select
from test_ui import ARTIFACTS, WAIT_MS, expect, store_sells_unknown_item, ui_server
from test_ui_phone import chromium  # noqa: F401 - the module's Chromium (a fixture)

from exchange.database.tables import xchg_sent
from exchange.service.sync import sync

STORES = [f"s{i:03d}" for i in range(1, 31)]
TROUBLED = {"s007": "1 file quarantined", "s013": "parked", "s021": "REJECTED"}


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    net = make_net(tmp_path_factory.mktemp("estate") / "net", stores=STORES)
    seed_ho(net, items=4)
    net.settle()
    # s007: someone with write access to the drop folder leaves a file that is no bundle
    (net.transfer / "ho" / "s007.ho.0000000050.bundle").write_bytes(b"not an age file\n")
    # s013: sells an item the HO never had: the HO parks the bill
    store_sells_unknown_item(net.store("s013"), "I9999991")
    sync(net.store("s013"))
    # s021: refused the HO's newest bundle to it
    with net.ho.engine.begin() as conn:
        top = conn.execute(select(func.max(xchg_sent.c.seq)).where(xchg_sent.c.peer == "s021")).scalar()
        conn.execute(xchg_sent.update().where(xchg_sent.c.peer == "s021", xchg_sent.c.seq == top)
                     .values(status="REJECTED", reason="signature: unknown key"))
    sync(net.ho)
    yield net
    net.dispose()


def _states(page: Any) -> dict[str, str]:
    return dict(page.locator("#stores-table tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.store, r.querySelector('[data-col=state]').textContent.trim()])"))


@pytest.mark.parametrize("width", [1360, 390])
def test_thirty_stores_the_marks_name_exactly_the_stores_in_trouble(estate: Net, chromium: Any, width: int) -> None:
    phone = width < 700
    ctx = chromium.new_context(viewport={"width": width, "height": 900}, is_mobile=phone, has_touch=phone)
    ctx.set_default_timeout(WAIT_MS)
    page = ctx.new_page()
    try:
        with ui_server(estate.ho.cfg.home) as ui:
            page.goto(ui.url)
            expect(page.locator("#stores-table tbody tr")).to_have_count(30)
            states = _states(page)
            assert set(states) == set(STORES)
            marked = {s for s, text in states.items() if text != "OK"}
            assert marked == set(TROUBLED), states
            for store, word in TROUBLED.items():
                assert word in states[store], (store, states[store])
            # the default order (by state) puts the stores that need attention first
            order = list(states)
            assert set(order[:3]) == set(TROUBLED), order
            # "only the stores that need attention" lists those three and nothing else
            page.goto(ui.url.rstrip("/") + "/?only=attention")
            expect(page.locator("#stores-table tbody tr")).to_have_count(3)
            assert set(_states(page)) == set(TROUBLED)
            page.goto(ui.url)
            wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
                .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
                .slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + e.textContent.slice(0, 60))""")
            assert page.evaluate("document.scrollingElement.scrollWidth") <= width, wide  # no sideways scroll
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"estate-30-stores-{width}.png"), full_page=True)
    finally:
        ctx.close()
