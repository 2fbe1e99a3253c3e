"""Presentation mode in a real browser (issue 19): every page with `?present=1` at 1280×720 and
1920×1080 is readable from the back of a room.

Per page and screen size: the sidebar and toolbar are hidden and "Exit presentation" is visible;
plotly tick labels are at least 16 px and titles at least 24 px (computed styles); the page does
not scroll sideways; the first chart's x axis is on screen once the chart's top is scrolled to the
top of the window (the chart fits one 16:9 screen); no button or link label is cut off. The
screenshots go to tests/.screenshots/present_<page>_<width>.png.
"""
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, CLIPPED, ROOT  # the `server` fixture is in conftest.py

SHOTS = Path(os.environ.get("CE_SCREENSHOT_DIR", ROOT / "tests" / ".screenshots"))
pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}"),
              pytest.mark.slow]

PAGES = [  # (name, path and query, text that says the page has drawn its first chart)
    ("attention", "/attention?present=1", "attention pattern"),
    ("attribution", "/attribution?present=1", "Direct effect of each component"),
    ("patching", "/patching?model=ce-circuits-3l-attn&source=ioi&present=1", "Head outputs (z), all positions: exact"),
    ("saes", f"/saes?model=ce-circuits-3l-mlp&prompt={quote('The keys that the man holds')}&present=1",
     "Strongest SAE features at each token"),
    ("steering", "/steering?model=ce-circuits-3l-mlp&present=1", "Top next token 'is' → 'are'"),
    ("circuits", "/circuits?present=1", "edges"),
]
SIZES = [(1280, 720), (1920, 1080)]

MEASURE = """() => {
    const visible = el => el.offsetParent !== null || el.getClientRects().length > 0;
    const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(visible);
    const px = sel => plots.flatMap(p => [...p.querySelectorAll(sel)])
        .map(t => parseFloat(getComputedStyle(t).fontSize));
    const main = document.querySelector('[data-testid="stMain"]') || document.scrollingElement;
    const sidebar = document.querySelector('[data-testid="stSidebar"]');
    return {
        charts: plots.length,
        ticks: px('.xtick text').concat(px('.ytick text')),
        titles: px('.gtitle'),
        docOverflow: document.scrollingElement.scrollWidth - window.innerWidth,
        mainOverflow: main.scrollWidth - main.clientWidth,
        sidebarShown: !!sidebar && visible(sidebar) && sidebar.getBoundingClientRect().width > 0,
        headerShown: [...document.querySelectorAll('[data-testid="stHeader"], [data-testid="stToolbar"]')]
            .some(h => visible(h) && h.getBoundingClientRect().height > 0),
    };
}"""

TOP = """() => { window.scrollTo(0, 0);
    const main = document.querySelector('[data-testid="stMain"]'); if (main) main.scrollTo(0, 0); }"""

EXIT_CLIPPED = """() => {
    const b = [...document.querySelectorAll('button')].find(b => b.innerText.includes('Exit presentation'));
    const r = b.getBoundingClientRect();
    return r.right > window.innerWidth || r.top < 0 || [b, ...b.querySelectorAll('*')].some(c => c.scrollWidth > c.clientWidth + 1);
}"""

AXIS_IN_VIEW = """() => {
    const plot = [...document.querySelectorAll('.js-plotly-plot')].find(p => p.offsetParent !== null);
    plot.scrollIntoView({block: 'start'});
    const axis = plot.querySelector('.xaxislayer-above') || plot.querySelector('.xy');
    const box = axis.getBoundingClientRect(), whole = plot.getBoundingClientRect();
    return {axisBottom: box.bottom, chartBottom: whole.bottom, viewport: window.innerHeight};
}"""


@pytest.mark.parametrize("name,path,ready", PAGES, ids=[p[0] for p in PAGES])
def test_every_page_is_readable_in_presentation_mode(server, name, path, ready):
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": SIZES[0][0], "height": SIZES[0][1]})
        page.goto(server + path, wait_until="domcontentloaded")
        page.get_by_text(ready).first.wait_for(timeout=240_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
        page.get_by_role("button", name="Exit presentation").wait_for(timeout=60_000)
        page.wait_for_timeout(2000)
        assert "present=1" in page.url
        for width, height in SIZES:
            page.set_viewport_size({"width": width, "height": height})
            page.evaluate(TOP)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(SHOTS / f"present_{name}_{width}.png"), full_page=False)
            m = page.evaluate(MEASURE)
            where = f"{name} at {width}×{height}"
            assert m["charts"] > 0, where
            assert not m["sidebarShown"] and not m["headerShown"], where
            assert m["ticks"] and min(m["ticks"]) >= 16, (where, sorted(set(m["ticks"])))
            assert m["titles"] and min(m["titles"]) >= 24, (where, sorted(set(m["titles"])))
            assert m["docOverflow"] <= 0 and m["mainOverflow"] <= 0, (where, m)
            assert page.evaluate(CLIPPED) == [], where
            assert page.evaluate(EXIT_CLIPPED) is False, where
            axis = page.evaluate(AXIS_IN_VIEW)
            assert axis["axisBottom"] <= axis["viewport"] and axis["chartBottom"] <= axis["viewport"], (where, axis)
        browser.close()


def test_exit_presentation_brings_the_sidebar_back_and_links_keep_the_mode(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(server + "/attention?present=1", wait_until="domcontentloaded")
        page.get_by_role("button", name="Exit presentation").wait_for(timeout=120_000)
        # Page links (in the hidden sidebar) carry the mode.
        hrefs = page.evaluate("() => [...document.querySelectorAll('[data-testid=\"stPageLink\"] a')].map(a => a.href)")
        assert hrefs and all("present=1" in h for h in hrefs), hrefs
        page.get_by_role("button", name="Exit presentation").click()
        page.locator('[data-testid="stSidebar"]').get_by_text("Presentation mode").wait_for(timeout=60_000)
        page.wait_for_function("() => !location.search.includes('present=1')", timeout=60_000)
        assert page.get_by_role("button", name="Exit presentation").count() == 0
        browser.close()


def test_export_menus_download_a_png_and_the_whole_view(server):
    """A chart's Export menu gives a PNG (made on click, by kaleido); "Export this view" gives one
    HTML file with the page's charts and the link that reopens the view."""
    import struct

    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720}, accept_downloads=True)
        page.goto(server + "/attention?present=1", wait_until="domcontentloaded")
        page.get_by_text("attention pattern").first.wait_for(timeout=120_000)
        page.get_by_role("button", name="Export", exact=False).first.click()
        with page.expect_download(timeout=120_000) as png:
            page.get_by_role("button", name="PNG (2× pixels)").first.click()
        data = Path(png.value.path()).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[1] > 0
        page.keyboard.press("Escape")
        with page.expect_download(timeout=120_000) as view:
            page.get_by_role("button", name="Export this view").click()
        text = Path(view.value.path()).read_text(encoding="utf-8")
        assert "Reopen this view" in text and "/attention?" in text and "present=1" in text
        assert "L1H1 attention pattern" in text and "ce-induction-2l" in text
        browser.close()
