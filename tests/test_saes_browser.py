"""The SAE page in Debian's Chromium at 1280×720 (issue 16): the index builds in the background
while the page works, and the search results' labels fit their column.

Skips only where /usr/bin/chromium (or the playwright package) is absent, as tests/test_browser.py.
"""
from urllib.parse import quote

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS  # the `server` fixture is in conftest.py

pytestmark = [pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists(),
                                 reason=f"Chromium not installed at {CHROMIUM}"), pytest.mark.slow]


def test_search_results_fit_at_1280x720(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(f"{server}/saes?model=ce-circuits-3l-mlp&prompt={quote('The keys that the man holds')}",
                  wait_until="domcontentloaded")
        page.get_by_text("Strongest SAE features at each token").first.wait_for(timeout=180_000)
        # Built in the background (or read, if an earlier test built it): the page polls and redraws itself.
        page.get_by_text("Feature index:").first.wait_for(timeout=180_000)
        page.get_by_text("Search", exact=True).first.click()
        results = """n => [...document.querySelectorAll('button')]
            .filter(b => b.offsetParent !== null && /^Feature \\d+/.test(b.innerText)).length >= n"""
        page.get_by_placeholder("e.g. keys").fill("keys")
        page.keyboard.press("Enter")
        page.wait_for_function(results, arg=5, timeout=60_000)
        page.get_by_placeholder("e.g. are").fill("are")
        page.keyboard.press("Enter")
        page.wait_for_function(results, arg=15, timeout=60_000)
        page.wait_for_timeout(1000)
        buttons = page.evaluate(
            """() => [...document.querySelectorAll('button')]
                .filter(b => b.offsetParent !== null && /^Feature \\d+/.test(b.innerText))
                .map(b => { const r = b.getBoundingClientRect(), c = b.closest('[data-testid="stColumn"]');
                            const cr = c.getBoundingClientRect();
                            return {text: b.innerText, right: r.right, colRight: cr.right + 0.5,
                                    overflow: b.scrollWidth - b.clientWidth,
                                    inner: Math.max(...[...b.querySelectorAll('*')].map(e => e.scrollWidth - e.clientWidth))}; })"""
        )
        browser.close()
    assert len([b for b in buttons if "fires" in b["text"]]) >= 5 and len(buttons) >= 10
    for b in buttons:
        assert b["right"] <= b["colRight"] and b["overflow"] <= 0 and b["inner"] <= 0, b
