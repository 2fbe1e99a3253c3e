"""Export (issue 19): PNG and SVG of the requested size, HTML that works offline, one file per view.

The PNG/SVG test starts kaleido's Chromium (a few seconds, once); the browser tests open the HTML
in headless Chromium with every request recorded: only file: and data: URLs may load.
"""
import html
import struct
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

from core import export, plots
from tests.helpers import CHROMIUM, CHROMIUM_ARGS

MARKUP = "<script>alert(1)</script> the <b>bold</b> <img src=x onerror=alert(2)>"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}")


def _figure(title: str = "L1H1 attention pattern") -> go.Figure:
    return plots.pattern_heatmap(torch.softmax(torch.randn(5, 5), -1), ["<bos>", "a", "<b>b</b>", "c", "d"], title)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def svg_size(data: bytes) -> tuple[float, float]:
    """(width, height) attributes of an SVG's root element."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(data)
    assert root.tag.endswith("svg")
    return float(root.get("width")), float(root.get("height"))


@needs_chromium
@pytest.mark.slow  # starts Chromium through kaleido
def test_png_and_svg_have_the_requested_size():
    pytest.importorskip("kaleido")
    fig = _figure()
    assert png_size(export.figure_png(fig, width=640, height=360, scale=1)) == (640, 360)
    assert png_size(export.figure_png(fig, width=300, height=200, scale=2)) == (600, 400)
    assert svg_size(export.figure_svg(fig, width=800, height=450)) == (800, 450)
    # The figure's own size by default.
    fig.update_layout(width=500, height=300)
    assert png_size(export.figure_png(fig, scale=1)) == (500, 300)


def test_view_html_escapes_the_prompt_and_inlines_plotly_once():
    from plotly.offline import get_plotlyjs

    figs = [_figure("first <i>chart</i>"), _figure("second")]
    page = export.view_html("Attention <patterns>", figs,
                            {"model": "ce-induction-2l", "prompt": MARKUP, "metric": "logit(' a') − logit(' b')",
                             "value": 0.123456789},
                            link="http://localhost:8501/attention?prompt=%3Cscript%3E&present=1")
    assert "<script>alert(1)</script>" not in page and "<b>bold</b>" not in page and "<img src=x" not in page
    assert html.escape(MARKUP) in page
    assert "Attention &lt;patterns&gt;" in page and "0.123457" in page
    assert page.count(get_plotlyjs()[:300]) == 1  # plotly.js once, for both charts
    assert page.count('class="plotly-graph-div"') == 2
    assert "<script src=" not in page and 'src="http' not in page and "<link" not in page
    assert 'href="http://localhost:8501/attention?prompt=%3Cscript%3E&amp;present=1"' in page
    # A link that is not http(s) is shown as text, never as a live href.
    assert "href=" not in export.view_html("t", [], {}, link="javascript:alert(1)").split("<body>")[1]


def test_circuitsvis_html_is_self_contained():
    page = export.circuitsvis_html(["<bos>", "<script>x</script>", "b"], torch.softmax(torch.randn(2, 3, 3), -1), ["L0H0", "L0H1"])
    assert "<script src=" not in page and "unpkg" not in page and "cdn" not in page.lower().split("circuitsvis")[0]
    assert "<script>x</script>" not in page


# ---------------------------------------------------------------------------------------------
# In a browser, offline
# ---------------------------------------------------------------------------------------------


def _open_offline(tmp_path, name: str, text: str, wait_for: str):
    """Open `text` as a file in headless Chromium; return (requests off file:/data:, console errors, dialogs, counts)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        outside, errors, dialogs = [], [], []

        def route(r):
            url = r.request.url
            if url.startswith(("file:", "data:", "blob:", "about:")):
                r.continue_()
            else:
                outside.append(url)
                r.abort()

        page.route("**/*", route)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.as_uri(), wait_until="load")
        page.wait_for_selector(wait_for, timeout=30_000)
        page.wait_for_timeout(500)
        counts = page.evaluate("""() => ({
            plots: document.querySelectorAll('.js-plotly-plot').length,
            drawn: [...document.querySelectorAll('.js-plotly-plot')]
                .filter(p => p.querySelector('svg.main-svg .heatmaplayer, svg.main-svg .plot')).length,
            bold: document.querySelectorAll('b').length,
            images: document.querySelectorAll('img').length,
            text: document.body.innerText,
        })""")
        browser.close()
    return outside, errors, dialogs, counts


@needs_chromium
@pytest.mark.slow
def test_figure_html_renders_offline(tmp_path):
    outside, errors, dialogs, counts = _open_offline(tmp_path, "figure.html", export.figure_html(_figure()),
                                                     ".js-plotly-plot svg.main-svg")
    assert outside == [] and errors == [] and dialogs == []
    assert counts["plots"] == 1 and counts["drawn"] == 1


@needs_chromium
@pytest.mark.slow
def test_view_html_renders_offline_and_shows_the_prompt_as_text(tmp_path):
    page = export.view_html("Attention patterns", [_figure("one"), _figure("two")],
                            {"model": "ce-induction-2l", "prompt": MARKUP, "metric": "none"},
                            link="http://localhost:8501/attention?present=1")
    outside, errors, dialogs, counts = _open_offline(tmp_path, "view.html", page, ".js-plotly-plot svg.main-svg")
    assert outside == [] and errors == [] and dialogs == []
    assert counts["plots"] == 2 and counts["drawn"] == 2
    assert counts["bold"] == 0 and counts["images"] == 0
    assert MARKUP in counts["text"]


@needs_chromium
@pytest.mark.slow
def test_circuitsvis_html_renders_offline(tmp_path):
    page = export.circuitsvis_html(["<bos>", "a", "b"], torch.softmax(torch.randn(2, 3, 3), -1), ["L0H0", "L0H1"])
    outside, errors, dialogs, _ = _open_offline(tmp_path, "cv.html", page, "div[id^='circuits-vis'] *")
    assert outside == [] and errors == [] and dialogs == []
