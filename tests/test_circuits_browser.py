"""The Circuits page in Chromium (Playwright): click a head of the circuit graph and land on its
attention pattern; click an edge's diamond and see that path patched. Screenshots of every view at
1280×720 and 1920×1080 go to CE_CIRCUITS_SHOTS (default /tmp/circuits_*.png).

Skips only where /usr/bin/chromium (or the playwright package) is absent.
"""
import os
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, CLIPPED  # the `server` fixture is in conftest.py

SHOTS = Path(os.environ.get("CE_CIRCUITS_SHOTS", "/tmp"))
README_SHOTS = Path(os.environ.get("CE_SCREENSHOT_DIR", Path(__file__).resolve().parent / ".screenshots"))
GRAPH = "on paths from the embeddings to the logits"
pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}"),
              pytest.mark.slow]

# Page pixels of a point of the circuit graph, found by its customdata; the graph is scrolled into view first.
POINT = """([kind, a, b]) => {
    const gd = [...document.querySelectorAll('.js-plotly-plot')]
        .find(g => g.layout.title && g.layout.title.text.includes('on paths from the embeddings'));
    gd.scrollIntoView({block: 'center'});
    const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
    for (const t of gd.data) {
        const i = (t.customdata || []).findIndex(c => c && c[0] === kind && c[1] === a && c[2] === b);
        if (i >= 0) return {x: r.left + xa._offset + xa.d2p(t.x[i]), y: r.top + ya._offset + ya.d2p(t.y[i])};
    }
    return null;
}"""


def _idle(page, timeout_ms: int = 180_000) -> None:
    page.wait_for_timeout(400)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)


def _open(page, server: str, query: str = "") -> None:
    page.goto(f"{server}/circuits{query}", wait_until="domcontentloaded")
    page.get_by_text(GRAPH).first.wait_for(timeout=180_000)
    _idle(page)
    page.wait_for_timeout(1500)


def _view(page, label: str, ready: str, name: str, size: str) -> None:
    """Open one of the page's views, wait for it, scroll it into view and take a screenshot."""
    page.get_by_text(label, exact=True).first.click()
    page.get_by_text(ready).first.wait_for(timeout=120_000)
    _idle(page)
    page.wait_for_timeout(1200)
    page.get_by_text(label, exact=True).first.evaluate("e => e.scrollIntoView({block: 'start'})")  # the view's top
    page.wait_for_timeout(500)
    page.screenshot(path=str(SHOTS / f"circuits_{name}_{size}.png"))


def test_click_a_head_then_an_edge_and_screenshots(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        _open(page, server)
        page.screenshot(path=str(SHOTS / "circuits_1280x720.png"))
        assert page.evaluate(CLIPPED) == []
        fonts = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot .ytick text')].map(t => parseFloat(t.style.fontSize))")
        assert fonts and min(fonts) >= 14
        # A head node: L1H1, the induction head → its attention pattern on the Attention page.
        point = page.evaluate(POINT, ["head", 1, 1])
        assert point is not None
        page.wait_for_timeout(800)
        point = page.evaluate(POINT, ["head", 1, 1])
        page.screenshot(path=str(SHOTS / "circuits_graph_1280x720.png"))
        page.mouse.click(point["x"], point["y"])
        page.get_by_text("L1H1 attention pattern").first.wait_for(timeout=120_000)
        assert "/attention" in page.url and "layer=1" in page.url and "head=1" in page.url
        # Back, and an edge: L0H3 → L1H1's key → the path-patching view shows that path.
        page.get_by_role("link", name="Circuits").first.click()
        page.get_by_text(GRAPH).first.wait_for(timeout=180_000)
        _idle(page)
        page.wait_for_timeout(1500)
        point = page.evaluate(POINT, ["edge", "L0H3", "L1H1.k"])
        assert point is not None
        page.wait_for_timeout(800)
        point = page.evaluate(POINT, ["edge", "L0H3", "L1H1.k"])
        page.mouse.click(point["x"], point["y"])
        page.get_by_text("Showing the path L0H3 → L1H1.k").first.wait_for(timeout=120_000)
        page.get_by_text("Path patching: each head → L1H1.k").first.wait_for(timeout=120_000)
        _idle(page)
        page.wait_for_timeout(1000)
        page.get_by_text("Showing the path L0H3 → L1H1.k").first.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "circuits_paths_1280x720.png"))
        assert "/circuits" in page.url
        for label, ready, name in (("Weights", "K-composition: sender (row)", "weights"),
                                   ("Estimate vs exact", "against exact edge patching", "compare"),
                                   ("Is this the mechanism?", "Minimality: what each node adds", "mechanism")):
            _view(page, label, ready, name, "1280x720")
            assert page.evaluate(CLIPPED) == [], label
        browser.close()


def test_screenshots_at_1920x1080_and_acdc(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})  # the README's screenshot
        _open(page, server)
        page.evaluate(POINT, ["head", 1, 1])
        page.wait_for_timeout(800)
        README_SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(README_SHOTS / "circuits_graph.png"))
        page.close()
        page = browser.new_page(viewport={"width": 1920, "height": 1080})
        _open(page, server)
        page.screenshot(path=str(SHOTS / "circuits_1920x1080.png"))
        page.evaluate(POINT, ["head", 1, 1])
        page.wait_for_timeout(800)
        page.screenshot(path=str(SHOTS / "circuits_graph_1920x1080.png"))
        for label, ready, name in (("Weights", "K-composition: sender (row)", "weights"),
                                   ("Estimate vs exact", "against exact edge patching", "compare"),
                                   ("Is this the mechanism?", "Minimality: what each node adds", "mechanism")):
            _view(page, label, ready, name, "1920x1080")
        page.get_by_text("ACDC", exact=True).first.click()  # 81 edges: it runs at once, no button
        page.get_by_text("ACDC circuit (τ = 0.020)").first.wait_for(timeout=180_000)
        _idle(page)
        page.wait_for_timeout(1200)
        page.screenshot(path=str(SHOTS / "circuits_acdc_1920x1080.png"))
        # The task models: IOI on the 3-layer attention-only model, with its MLP sibling's graph too.
        for model in ("ce-circuits-3l-attn", "ce-circuits-3l-mlp"):
            _open(page, server, f"?model={model}")
            page.evaluate(POINT, ["head", 1, 1])
            page.wait_for_timeout(800)
            page.screenshot(path=str(SHOTS / f"circuits_{model}_1920x1080.png"))
        browser.close()
