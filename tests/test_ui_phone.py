"""The Data Exchange window on a phone and for everyone, in a real headless Chromium (Debian's).

Every page and tab of the HO and of a store, with real troubles in them (documents parked on
both sides, a quarantined file, a FAILED stream, a silent store), is opened at 390 px wide and
checked: nothing scrolls sideways and each store's state stays visible; one ``h1`` and ``h2``
headings without skipped levels; ``aria-current`` on the active tab; a contrast of at least 4.5:1
for every visible text, computed from the computed styles. Then: ``aria-sort`` follows the sort,
sign-in is a labelled field sent by POST (the token never in an address), a running sync redraws
only its own part and keeps the keyboard focus, times show in the viewer's zone (and with their
offset without script), the HO's Checks tab, and a store's sync result that is not green while
something is wrong. Screenshots land in ``test-artifacts/ui/`` (``phone-*.png``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete, insert

from exchange.database.tables import xchg_received
from exchange.node.home import Node
from exchange.node.lock import work_lock
from exchange.service.sync import pull, sync
from test_ui import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    TOKEN,
    WAIT_MS,
    _need_browser,
    _now,
    add_silent_store,
    expect,
    ho_sends_items,
    park_a_promotion,
    press,
    request,
    store_sells_unknown_item,
    ui_server,
)

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1360, "height": 860}

#: Every visible text (and every cell label drawn by CSS) with its contrast against the background
#: it is drawn on, composited from the computed background colours of its ancestors (WCAG 2 formula).
CONTRAST_JS = """() => {
  const parse = c => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return [0, 0, 0, 0];
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number); return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const over = (top, below) => [0, 1, 2].map(i => top[i] * top[3] + below[i] * (1 - top[3])).concat([1]);
  const lum = c => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  const chain = el => { const out = []; for (let e = el; e && e.nodeType === 1; e = e.parentElement) out.unshift(e); return out; };
  const background = el => chain(el).reduce((bg, e) => over(parse(getComputedStyle(e).backgroundColor), bg), [255, 255, 255, 1]);
  const opacity = el => chain(el).reduce((o, e) => o * parseFloat(getComputedStyle(e).opacity), 1);
  const ratio = (color, el) => { const bg = background(el); const fg = parse(color);
    const c = over([fg[0], fg[1], fg[2], fg[3] * opacity(el)], bg);
    const a = lum(c), b = lum(bg); return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); };
  const bad = []; let checked = 0;
  const visible = el => { const cs = getComputedStyle(el); const r = el.getBoundingClientRect();
    return cs.visibility === 'visible' && r.width > 1 && r.height > 1; };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const t = walker.currentNode; const el = t.parentElement;
    if (!t.textContent.trim() || !el || !visible(el)) continue;
    const r = ratio(getComputedStyle(el).color, el); checked++;
    if (r < 4.5) bad.push(t.textContent.trim().slice(0, 40) + ' [' + el.tagName + '.' + el.className + '] ' + r.toFixed(2));
  }
  for (const el of document.querySelectorAll('[data-label]')) {
    const before = getComputedStyle(el, '::before');
    if (before.content === 'none' || before.content === 'normal' || !visible(el)) continue;
    const r = ratio(before.color, el); checked++;
    if (r < 4.5) bad.push('label ' + el.dataset.label + ' ' + r.toFixed(2));
  }
  return {checked, bad};
}"""

#: Heading levels in document order, and the tabs marked current.
STRUCTURE_JS = """() => ({
  headings: [...document.querySelectorAll('h1, h2, h3, h4, h5, h6')].map(h => Number(h.tagName[1])),
  current: [...document.querySelectorAll('nav.tabs a[aria-current="page"]')].map(a => a.id),
  active: [...document.querySelectorAll('nav.tabs a.active')].map(a => a.id),
  tabs: document.querySelectorAll('nav.tabs').length,
})"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium through Playwright (contexts of any size, zone and locale)."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def phone(chromium: Any) -> Iterator[Any]:
    ctx = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    ctx.set_default_timeout(WAIT_MS)
    pg = ctx.new_page()
    try:
        yield pg
    finally:
        ctx.close()


@pytest.fixture
def desktop(chromium: Any) -> Iterator[Any]:
    ctx = chromium.new_context(viewport=DESKTOP)
    ctx.set_default_timeout(WAIT_MS)
    pg = ctx.new_page()
    try:
        yield pg
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def troubled_estate(homes: Path) -> None:
    """The demo estate with every kind of trouble the pages show, with long texts in the cells."""
    ho = Node.open(homes / "ho")
    add_silent_store(ho, homes)  # never heard from
    park_a_promotion(ho)  # the stores park it: it names an item they never received
    sync(ho)
    sync(Node.open(homes / "s001"))
    store_sells_unknown_item(Node.open(homes / "s001"), "I9999991")  # the HO parks this bill
    bad = "s001.ho.0000000050.bundle"
    (homes / "transfer" / "ho" / bad).write_bytes(b"not an age file at all\n")  # quarantined
    sync(ho)
    with ho.engine.begin() as conn:  # a stream from s002 that could not be applied, with a long reason
        conn.execute(insert(xchg_received).values(
            peer="s002", seq=99, file_name="s002.ho.0000000099.bundle", file_sha256="0" * 64,
            status="FAILED", summary='{"sale": 3, "sale_line": 12, "payment": 3}', received_at=_now(),
            reason="database error: (sqlite3.IntegrityError) FOREIGN KEY constraint failed "
                   "[SQL: INSERT INTO sale_line (sale_id, line_no, item_id) VALUES (?, ?, ?)]"))


HO_PAGES = ["/", "/?tab=checks", "/?only=attention", "/?sort=-contact", "/peer/s001", "/peer/s001?tab=sent",
            "/peer/s001?tab=parked", "/peer/s002", "/peer/s003", "/peer/nobody"]
STORE_PAGES = ["/", "/?tab=sent", "/?tab=parked", "/?tab=checks"]


def _shot_name(who: str, path: str) -> str:
    return "phone-" + who + re.sub(r"[^a-z0-9]+", "-", path.lower()).rstrip("-") + ".png"


def check_page(page: Any, url: str, *, phone: bool) -> dict[str, Any]:
    """Open ``url`` and check it: width (phone), headings, current tab, contrast. Returns the structure."""
    page.goto(url)
    page.wait_for_load_state("load")
    where = url
    if phone:
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= PHONE["width"], f"{where}: the page scrolls sideways ({width} px)"
        for cell in page.locator("#stores-table tbody td[data-col='state']").all():
            assert cell.is_visible(), f"{where}: a store's state is hidden"
            box = cell.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], f"{where}: state cut off"
    got = page.evaluate(STRUCTURE_JS)
    levels = got["headings"]
    assert levels.count(1) == 1 and levels[0] == 1, f"{where}: one h1, first: {levels}"
    assert 2 in levels, f"{where}: no h2: {levels}"
    assert all(b - a <= 1 for a, b in zip(levels, levels[1:])), f"{where}: a heading level skipped: {levels}"
    if got["tabs"]:
        assert got["current"] == got["active"] and len(got["current"]) == 1, f"{where}: aria-current {got}"
    contrast = page.evaluate(CONTRAST_JS)
    assert contrast["checked"] > 5, where
    assert contrast["bad"] == [], f"{where}: text below 4.5:1: {contrast['bad']}"
    return dict(got)


# ---------------------------------------------------------------- every page at 390 px

def test_every_page_fits_a_phone_and_is_accessible(homes: Path, phone: Any, desktop: Any, shots: Path) -> None:
    troubled_estate(homes)
    with ui_server(homes / "ho") as ui:
        for path in HO_PAGES:
            got = check_page(phone, ui.url.rstrip("/") + path, phone=True)
            phone.screenshot(path=str(shots / _shot_name("ho", path)), full_page=True)
            if path == "/":
                assert got["current"] == ["tab-link-stores"]
                # the marks are there, on the first line of each store's card
                state = phone.locator('#stores-table tr[data-store="s001"] [data-col="state"]')
                expect(state).to_contain_text(re.compile(r"\d+ documents? parked"))
                expect(state).to_contain_text("file quarantined")
                store_box = phone.locator('#stores-table tr[data-store="s001"] td').first.bounding_box()
                state_box = state.bounding_box()
                assert store_box and state_box and abs(state_box["y"] - store_box["y"]) < 30, (store_box, state_box)
            if path == "/?tab=checks":
                assert got["current"] == ["tab-link-checks"]
            check_page(desktop, ui.url.rstrip("/") + path, phone=False)
        desktop.goto(ui.url)
        desktop.screenshot(path=str(shots / "desktop-ho-overview-troubles.png"), full_page=True)
    with ui_server(homes / "s001") as ui:
        for path in STORE_PAGES:
            got = check_page(phone, ui.url.rstrip("/") + path, phone=True)
            phone.screenshot(path=str(shots / _shot_name("store", path)), full_page=True)
            tab = {"/": "received"}.get(path, path.rpartition("=")[2])
            assert got["current"] == [f"tab-link-{tab}"], got
            check_page(desktop, ui.url.rstrip("/") + path, phone=False)
        # while a sync runs (its spinner, the disabled button), too
        with work_lock(homes / "s001", timeout=10):
            phone.goto(ui.url)
            press(phone, "#sync-button")
            expect(phone.locator("#sync-state")).to_contain_text("syncing...")
            check_page(phone, ui.url, phone=True)
            phone.screenshot(path=str(shots / "phone-store-syncing.png"), full_page=True)
        ui.context.jobs.wait(60)
    with ui_server(homes / "s001", token=TOKEN) as ui:  # the sign-in page
        check_page(phone, ui.url, phone=True)
        phone.screenshot(path=str(shots / "phone-sign-in.png"), full_page=True)


def test_sorted_column_carries_aria_sort(homes: Path, desktop: Any) -> None:
    page = desktop
    with ui_server(homes / "ho") as ui:
        page.goto(ui.url)
        sorts = page.locator("#stores-table thead th").evaluate_all(
            "ths => ths.map(th => [th.textContent.trim(), th.getAttribute('aria-sort')])")
        assert len(sorts) == 9 and all(s in ("ascending", "descending", "none") for _t, s in sorts), sorts
        assert [t for t, s in sorts if s != "none"] == ["State ▲"], sorts  # the default order: by state
        page.click("#stores-table thead th >> text=Store")
        expect(page.locator("#stores-table thead th").first).to_have_attribute("aria-sort", "ascending")
        page.click("#stores-table thead th >> text=Store")
        expect(page.locator("#stores-table thead th").first).to_have_attribute("aria-sort", "descending")
        ids = page.locator("#stores-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.store)")
        assert ids == ["s002", "s001"]
        others = page.locator("#stores-table thead th[aria-sort='none']").count()
        assert others == 8  # every sortable column but the sorted one


def test_sign_in_is_a_labelled_post_and_the_token_never_in_an_address(homes: Path, desktop: Any) -> None:
    page = desktop
    seen: list[tuple[str, str]] = []
    page.on("request", lambda r: seen.append((r.method, r.url)))
    with ui_server(homes / "s001", token=TOKEN) as ui:
        page.goto(ui.url + "?tab=sent")
        field = page.get_by_label("Token")  # the field has a label
        expect(field).to_have_attribute("type", "password")
        field.fill(TOKEN)
        with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/login")):
            page.click('form[action="/login"] button[type="submit"]')
        expect(page.locator("#sync-button")).to_be_enabled()
        assert page.url == ui.url + "?tab=sent", "back to the page asked for"
        expect(page.locator("#tab-link-sent")).to_have_attribute("aria-current", "page")
        history = page.evaluate("window.history.length")
        assert history >= 2
    posts = [u for m, u in seen if m == "POST"]
    assert posts == [ui.url + "login"]
    assert not [u for _m, u in seen if TOKEN in u], "the token was in an address"


# ---------------------------------------------------------------- a running sync keeps the focus

def test_a_running_sync_redraws_its_part_only_and_keeps_the_focus(homes: Path, desktop: Any) -> None:
    page = desktop
    ho = Node.open(homes / "ho")
    name = ho_sends_items(ho)
    with ui_server(homes / "s001") as ui:
        page.goto(ui.url)
        with work_lock(homes / "s001", timeout=10):  # the sync waits for the lock: it stays running
            press(page, "#sync-button")
            expect(page.locator("#sync-state")).to_contain_text("syncing...")
            assert page.locator('meta[http-equiv="refresh"]').count() == 0, "a full-page refresh with script"
            page.evaluate("""() => { window.__samePage = 42; document.getElementById('sync').__old = true;
                                     document.getElementById('tab-link-sent').focus(); }""")
            # the sync part is redrawn (a new element) at least twice while the lock is held
            for _ in range(2):
                page.wait_for_function("() => !document.getElementById('sync').__old", timeout=WAIT_MS)
                page.evaluate("() => { document.getElementById('sync').__old = true; }")
            assert page.evaluate("window.__samePage") == 42, "the page was reloaded"
            assert page.evaluate("document.activeElement.id") == "tab-link-sent", "the focus moved"
        row = page.locator(f'#received-table tr[data-file="{name}"]')
        expect(row.locator(".pill")).to_have_text("APPLIED")  # the end of the job redrew the tables
        expect(page.locator("#sync-result")).to_contain_text("applied 1")
        expect(page.locator("#sync-button")).to_be_enabled()
        assert page.evaluate("window.__samePage") == 42, "the page was reloaded at the end"
        assert page.evaluate("document.activeElement.id") == "tab-link-sent", "the focus moved at the end"
    # without script the page still follows a sync, with a slower refresh
    with ui_server(homes / "s001") as ui:
        with work_lock(homes / "s001", timeout=10):
            html = request(ui.url, "/")[2]
            csrf = re.search(r'name="csrf" value="([^"]+)"', html)
            assert csrf
            assert request(ui.url, "/sync", "POST", {"csrf": csrf.group(1)})[0] == 303
            running = request(ui.url, "/")[2]
            assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in running
            assert 'http-equiv="refresh" content="1"' not in running
        ui.context.jobs.wait(60)


# ---------------------------------------------------------------- times

def test_times_show_in_the_viewers_zone_and_with_an_offset_without_script(homes: Path, chromium: Any) -> None:
    zone = "Asia/Kolkata"  # +05:30 all year: never the machine's zone by accident
    with ui_server(homes / "s001") as ui:
        html = request(ui.url, "/")[2]
        fallback = re.findall(r'<time datetime="([^"]+)">([^<]+)</time>', html)
        assert fallback, "no <time> on the page"
        for iso, shown in fallback:
            t = datetime.fromisoformat(iso)
            assert t.tzinfo is not None, iso
            off = t.strftime("%z")
            assert shown == t.strftime("%Y-%m-%d %H:%M:%S ") + f"{off[:3]}:{off[3:]}", (iso, shown)
        ctx = chromium.new_context(viewport=DESKTOP, timezone_id=zone, locale="en-US")
        try:
            page = ctx.new_page()
            page.goto(ui.url)
            cells = page.locator("#received-table time[datetime]")
            expect(cells.first).to_contain_text("GMT+5:30")
            for iso, text in cells.evaluate_all("ts => ts.map(t => [t.getAttribute('datetime'), t.textContent])"):
                t = datetime.fromisoformat(iso).astimezone(ZoneInfo(zone))
                clock = f"{t.hour % 12 or 12}:{t.minute:02d}:{t.second:02d} {'AM' if t.hour < 12 else 'PM'}"
                assert clock in text and "GMT+5:30" in text and str(t.year) in text, (iso, text)
            header = page.locator("header.top time")
            expect(header).to_contain_text("GMT+5:30")
        finally:
            ctx.close()


# ---------------------------------------------------------------- the HO's Checks tab

def test_ho_checks_tab(homes: Path, desktop: Any, shots: Path) -> None:
    page = desktop
    with ui_server(homes / "ho") as ui:
        page.goto(ui.url)
        page.click("#tab-link-checks")
        expect(page.locator("#tab-link-checks")).to_have_attribute("aria-current", "page")
        for name in ("database", "keys", "peers", "transport s001", "transport s002", "disk"):
            expect(page.locator(f'#checks-table tr[data-check="{name}"] .pill')).to_have_text("OK")
        assert page.locator("#stores-table").count() == 0
        page.screenshot(path=str(shots / "ho-checks.png"), full_page=True)
        # a check that fails says so, with its fix: s002's folder replaced by a file
        (homes / "transfer" / "s002").rename(homes / "transfer" / "s002.moved")
        (homes / "transfer" / "s002").write_text("not a folder\n")
        page.reload()
        row = page.locator('#checks-table tr[data-check="transport s002"]')
        expect(row.locator(".pill")).to_have_text("FAIL")
        expect(row.locator(".reason")).not_to_be_empty()
        expect(page.locator('#checks-table tr[data-check="transport s001"] .pill')).to_have_text("OK")


# ---------------------------------------------------------------- the store's sync result tells the truth

def test_store_sync_result_is_not_green_while_something_is_wrong(homes: Path, desktop: Any, shots: Path) -> None:
    page = desktop
    ho = Node.open(homes / "ho")
    park_a_promotion(ho)
    sync(ho)
    with ui_server(homes / "s001") as ui:
        page.goto(ui.url)
        press(page, "#sync-button")
        result = page.locator("#sync-result")
        expect(result).to_contain_text("applied 1")
        expect(result).to_have_class("result-bad")  # it moved bundles, but a document is parked
        color = result.evaluate("e => getComputedStyle(e).color")
        assert color == "rgb(180, 35, 24)", color  # --bad, not --ok
        link = page.locator('#sync-problems a[data-problem="parked"]')
        expect(link).to_have_text("1 document parked")
        page.screenshot(path=str(shots / "store-sync-result-parked.png"), full_page=True)
        link.click()  # the result line points to the tab that says what to do
        expect(page.locator("#tab-link-parked")).to_have_attribute("aria-current", "page")
        expect(page.locator('#parked-table tr[data-doc^="promotion"]')).to_have_count(1)

        page.click("#tab-link-received")  # the bundle it came in says so too
        reason = page.locator("#received-table td.reason", has_text="parked")
        expect(reason).to_have_count(1)

        # a FAILED bundle blocking a stream: also not green, pointing to the Received tab
        store = Node.open(homes / "s001")
        with store.engine.begin() as conn:
            conn.execute(insert(xchg_received).values(
                peer="ho", seq=999, file_name="ho.s001.0000000999.bundle", file_sha256="0" * 64,
                status="FAILED", summary='{"item": 1}', received_at=_now(), reason="database error: test"))
        page.goto(ui.url)
        failed = page.locator('#sync-problems a[data-problem="failed"]')
        expect(failed).to_have_text("1 bundle FAILED")
        expect(failed).to_have_attribute("href", "/?tab=received")
        with store.engine.begin() as conn:  # resolved (by hand here): the reason goes at once
            conn.execute(delete(xchg_received).where(xchg_received.c.seq == 999, xchg_received.c.peer == "ho"))
        page.goto(ui.url + "?tab=parked")
        expect(failed).to_have_count(0)
        expect(result).to_have_class("result-bad")  # the parked document is still there

        # the item arrives; Retry applies the promotion: nothing wrong any more, the result is green
        ho_sends_items(ho)
        with work_lock(store.cfg.home):
            assert pull(store)
        press(page, "#retry-button")
        expect(page.locator("#retry-result")).to_contain_text("1 applied, 0 still parked")
        expect(page.locator("#sync-problems")).to_have_count(0)
        expect(result).to_have_class("result-ok")
        page.screenshot(path=str(shots / "store-sync-result-resolved.png"), full_page=True)
        page.click("#tab-link-received")  # and no stale "parked" on the bundle any more
        expect(page.locator("#received-table tbody tr").first).to_be_visible()
        expect(reason).to_have_count(0)


# ---------------------------------------------------------------- the script is the page's own

def test_the_only_script_is_the_pages_own_file(homes: Path) -> None:
    """The CSP allows scripts and fetches from the page itself only; no page carries inline script or
    event-handler attributes (so the policy needs no 'unsafe-inline')."""
    troubled_estate(homes)
    for home, paths in (("ho", HO_PAGES), ("s001", STORE_PAGES)):
        with ui_server(homes / home) as ui:
            for path in paths:
                status, headers, html = request(ui.url, path)
                assert status == (404 if path == "/peer/nobody" else 200), path
                csp = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
                assert csp["script-src"] == "'self'" and csp["connect-src"] == "'self'", csp
                assert "unsafe" not in headers["content-security-policy"]
                assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/page.js" defer>'], path
                assert not re.search(r"\son[a-z]+\s*=", html), f"{path}: an inline event handler"
            status, headers, js = request(ui.url, "/static/page.js")
            assert status == 200 and "javascript" in headers["content-type"]
