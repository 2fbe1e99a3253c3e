"""Real-browser smoke test: Playwright drives Debian's Chromium against `streamlit run app.py`.

Skips only where /usr/bin/chromium (or the playwright package) is absent; .ci/run installs both.
"""
import os
import re
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, CLIPPED, ROOT  # the `server` fixture is in conftest.py

SHOTS = Path(os.environ.get("CE_SCREENSHOT_DIR", ROOT / "tests" / ".screenshots"))
pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}"),
              pytest.mark.slow]


def _ticks(page) -> list[str]:
    """The y-axis tick labels of the first plotly chart (the selected head's pattern)."""
    return page.evaluate(
        """() => [...document.querySelector('.js-plotly-plot').querySelectorAll('.yaxislayer-above text')]
                 .map(t => t.textContent)"""
    )


def test_open_change_prompt_heatmap_updates(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server + "/attention", wait_until="domcontentloaded")
        heatmap = page.locator(".js-plotly-plot").first
        heatmap.wait_for(timeout=120_000)
        page.get_by_text("attention pattern").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(SHOTS / "attention_default.png"), full_page=False)
        page.get_by_role("tab", name="Head scores").click()
        page.get_by_text("Ablate on Q / K / V").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(SHOTS / "attention_head_scores.png"), full_page=True)
        page.get_by_role("tab", name="Selected head").click()  # a tab is drawn when opened: wait for its chart
        page.wait_for_function(
            """() => { const g = document.querySelector('.js-plotly-plot');
                       return g && g.querySelectorAll('.yaxislayer-above text').length > 0
                              && g.innerHTML.includes('attention pattern'); }""", timeout=60_000)
        ticks_before = _ticks(page)
        assert any("king" in t for t in ticks_before)

        box = page.locator("textarea").first
        box.fill("a red bird saw a red bird")
        box.press("Control+Enter")
        page.wait_for_function(
            """() => [...document.querySelector('.js-plotly-plot').querySelectorAll('.yaxislayer-above text')]
                     .some(t => t.textContent.includes('bird'))""",
            timeout=60_000,
        )
        ticks_after = _ticks(page)
        assert "7: bird" in ticks_after and not any("king" in t for t in ticks_after)
        assert "prompt=a+red+bird" in page.url or "prompt=a%20red%20bird" in page.url
        page.screenshot(path=str(SHOTS / "attention_changed.png"), full_page=False)
        browser.close()


def test_clicking_a_panel_in_the_all_heads_grid_opens_that_head(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server + "/attention?layer=1&head=1", wait_until="domcontentloaded")
        page.get_by_text("L1H1 attention pattern").first.wait_for(timeout=120_000)
        page.get_by_role("tab", name="All heads").click()  # drawn when opened (the tab is in the URL)
        grid = """[...document.querySelectorAll('.js-plotly-plot')]
                  .find(g => (g.data || []).some(t => t.name === 'open head'))"""
        page.wait_for_function(f"() => !!({grid})", timeout=60_000)
        page.wait_for_timeout(1000)
        # click the centre of the L0H0 panel, where its click target sits (data -> page pixels)
        point = page.evaluate(
            """() => {
                const gd = """ + grid + """;
                const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
                const t = gd.data.find(t => t.name === 'open head');
                return {x: r.left + xa._offset + xa.d2p(t.x[0]), y: r.top + ya._offset + ya.d2p(t.y[0])};
            }"""
        )
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "attention_all_heads.png"), full_page=False)
        page.mouse.click(point["x"], point["y"])
        # The click reruns the page, which puts the head in the URL; on a loaded machine the chart
        # may not take clicks yet, so a click that changed nothing is made once more.
        def opened(url: str) -> bool:
            return "layer=0" in url and "head=0" in url

        try:
            page.wait_for_url(opened, timeout=20_000)
        except sync_api.TimeoutError:
            page.mouse.click(point["x"], point["y"])
            page.wait_for_url(opened, timeout=60_000)
        page.get_by_role("tab", name="Selected head").click()
        page.get_by_text("L0H0 attention pattern").first.wait_for(timeout=60_000)
        assert "layer=0" in page.url and "head=0" in page.url
        browser.close()


def test_markup_in_tokens_never_runs_in_the_browser(server, tmp_path):
    """A tokenizer that keeps '<script>alert(1)</script>' whole: no dialog opens, the text shows."""
    import urllib.parse

    from tests.helpers import make_markup_gpt2_dir

    sync_api = pytest.importorskip("playwright.sync_api")
    folder = make_markup_gpt2_dir(tmp_path / "markup-gpt2")
    prompt = "<script>alert(1)</script> the <b>bold</b> cat <img▁src=x▁onerror=alert(2)>"
    query = urllib.parse.urlencode({"model": str(folder), "prompt": prompt})
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{server}/attention?{query}", wait_until="domcontentloaded")
        page.get_by_text("attention pattern").first.wait_for(timeout=120_000)
        page.wait_for_function(
            """() => [...document.querySelectorAll('.js-plotly-plot .yaxislayer-above text')]
                     .some(t => t.textContent === '1: <script>alert(1)</script>')""",
            timeout=60_000,
        )
        page.get_by_role("tab", name="Interactive (CircuitsVis)").click()
        page.wait_for_timeout(3000)
        assert dialogs == []
        assert page.evaluate("() => document.querySelectorAll('b').length") == 0
        browser.close()


def test_attribution_page_click_a_head_opens_its_attention_pattern(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    from urllib.parse import quote

    prompt = "When Mary and John went to the store, John gave a drink to"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server}/attribution?model=ce-circuits-3l-attn&prompt={quote(prompt)}", wait_until="domcontentloaded")
        page.get_by_text("Direct effect of each component").first.wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "attribution_components.png"), full_page=False)
        page.get_by_role("tab", name="By head").click()
        page.get_by_text("Direct effect of each head").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SHOTS / "attribution_heads.png"), full_page=False)
        # The click target of L1H1 (data -> page pixels) in the visible head heatmap.
        point = page.evaluate(
            """() => {
                const gd = [...document.querySelectorAll('.js-plotly-plot')]
                    .find(g => g.offsetParent !== null && g.layout.title && g.layout.title.text.includes('each head'));
                const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
                const t = gd.data[1], i = t.customdata.findIndex(c => c[0] === 1 && c[1] === 1);
                return {x: r.left + xa._offset + xa.d2p(t.x[i]), y: r.top + ya._offset + ya.d2p(t.y[i])};
            }"""
        )
        page.mouse.click(point["x"], point["y"])
        page.get_by_text("L1H1 attention pattern").first.wait_for(timeout=60_000)
        assert "layer=1" in page.url and "head=1" in page.url and "model=ce-circuits-3l-attn" in page.url
        # Back through the sidebar: model, prompt and answer boxes are as they were.
        page.get_by_role("link", name="Logit attribution").click()
        page.get_by_text("Direct effect of each head").first.wait_for(timeout=60_000)  # the tab left open, too
        assert page.get_by_role("textbox", name="Answer").input_value() == "mary"
        assert page.get_by_role("textbox", name="Counterfactual (optional)").input_value() == "john"
        assert "model=ce-circuits-3l-attn" in page.url
        browser.close()


def test_head_importance_page_patches_and_a_click_opens_the_head(server):
    """Open the page on the typed IOI pair, see the head grid, click the strongest head, come back."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from urllib.parse import quote

    prompt = "When Mary and John went to the store, John gave a drink to"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{server}/patching?model=ce-circuits-3l-attn&prompt={quote(prompt)}", wait_until="domcontentloaded")
        page.get_by_text("Head outputs (z), all positions: exact").first.wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "patching_heads.png"), full_page=False)
        # A pair of one's own (not the default), kept across the trip to the Attention page.
        box = page.get_by_role("textbox", name="Corrupted prompt")
        box.fill("When Mary and John went to the store, Alice gave a drink to")
        box.press("Enter")
        page.wait_for_timeout(3000)
        page.get_by_text("Head outputs (z), all positions: exact").first.wait_for(timeout=60_000)
        # The strongest cell of the grid (largest |value|), clicked through its marker.
        point = page.evaluate(
            """() => {
                const gd = [...document.querySelectorAll('.js-plotly-plot')]
                    .find(g => g.offsetParent !== null && g.layout.title && g.layout.title.text.includes('all positions: exact'));
                const z = gd.data[0].z, xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
                let best = [0, 0], v = -1;
                Array.from(z, r => Array.from(r)).forEach((row, l) => row.forEach((x, h) => {
                    if (Math.abs(x) > v) { v = Math.abs(x); best = [l, h]; } }));
                const t = gd.data[1], i = t.customdata.findIndex(c => c[0] === best[0] && c[1] === best[1]);
                return {x: r.left + xa._offset + xa.d2p(t.x[i]), y: r.top + ya._offset + ya.d2p(t.y[i]), l: best[0], h: best[1]};
            }"""
        )
        page.mouse.click(point["x"], point["y"])
        page.get_by_text(f"L{point['l']}H{point['h']} attention pattern").first.wait_for(timeout=60_000)
        assert f"layer={point['l']}" in page.url and f"head={point['h']}" in page.url
        page.get_by_role("link", name="Head importance").click()
        page.get_by_text("Head outputs (z), all positions: exact").first.wait_for(timeout=60_000)
        assert page.get_by_role("textbox", name="Corrupted prompt").input_value().endswith("Alice gave a drink to")
        browser.close()


def test_sae_page_click_a_feature_opens_its_dashboard(server):
    """Open the SAE page on the embedded SAE, click the strongest cell of the prompt's feature map,
    land on that feature's dashboard with its top contexts."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from urllib.parse import quote

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{server}/saes?model=ce-circuits-3l-mlp&prompt={quote('The keys that the man holds')}",
                  wait_until="domcontentloaded")
        page.get_by_text("Strongest SAE features at each token").first.wait_for(timeout=180_000)
        page.wait_for_timeout(1500)
        point = page.evaluate(
            """() => {
                const gd = [...document.querySelectorAll('.js-plotly-plot')]
                    .find(g => g.offsetParent !== null && g.layout.title && g.layout.title.text.includes('Strongest SAE'));
                const z = gd.data[0].z, xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
                let best = [0, 0], v = -1;
                Array.from(z, r => Array.from(r)).forEach((row, f) => row.forEach((x, q) => {
                    if (x > v) { v = x; best = [f, q]; } }));
                const t = gd.data[1], nx = gd.data[0].x.length, i = best[0] * nx + best[1];
                return {x: r.left + xa._offset + xa.d2p(t.x[i]), y: r.top + ya._offset + ya.d2p(t.y[i]), f: t.customdata[i][0]};
            }"""
        )
        page.mouse.click(point["x"], point["y"])
        page.get_by_text("Top activating contexts").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        assert f"feature={point['f']}" in page.url
        # The feature box follows the click on the page's next run: wait for it, on a loaded machine too.
        sync_api.expect(page.get_by_role("spinbutton", name=re.compile("Feature"))).to_have_value(
            str(point["f"]), timeout=60_000)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "sae_feature.png"), full_page=False)
        browser.close()


def test_steering_page_steers_and_the_monitor_trips(server):
    """Open the steering page: the default plural direction turns ' is' into ' are'; the monitor trips at 'keys'."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{server}/steering?model=ce-circuits-3l-mlp", wait_until="domcontentloaded")
        page.get_by_text("Top next token 'is' → 'are'").first.wait_for(timeout=180_000)
        page.get_by_text("Monitor", exact=True).first.click()
        page.get_by_text("at position 2 ('keys')").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "steering_monitor.png"), full_page=False)
        browser.close()


def _wait_until_idle(page, timeout_ms: int = 120_000) -> None:
    """Until Streamlit's running indicator has gone (the script run is over)."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)


def test_a_shared_link_survives_clicking_through_every_page(server):
    """Issue 16: open a shared link, click every page in the sidebar, find the same model and prompt
    on each (the first click used to reset the model and empty the prompt); the same for a task
    with a held-out template. Typing a page's URL on the running server opens it, no dialog."""
    import urllib.parse

    sync_api = pytest.importorskip("playwright.sync_api")
    prompt = "When Mary and John went to the store, John gave a drink to"
    link = f"{server}/?model=ce-circuits-3l-attn&prompt={urllib.parse.quote(prompt)}"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(link, wait_until="domcontentloaded")
        page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
        for label, path, title in (("Logit attribution", "/attribution", "Logit attribution"),
                                   ("Head importance", "/patching", "Head importance"),
                                   ("SAE features", "/saes", "SAE features"), ("Steering", "/steering", "Steering and monitoring"),
                                   ("Circuits", "/circuits", "Circuits"), ("Attention", "/attention", "Attention patterns")):
            page.get_by_role("link", name=label).first.click()
            page.wait_for_url(re.compile(f".*{path}\\?.*"), timeout=60_000)
            # The new page's own run has drawn its title and finished (not the old page still showing).
            page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=120_000)
            _wait_until_idle(page)
            page.get_by_text("3 layers × 4 heads").first.wait_for(timeout=120_000)  # the sidebar's model caption
            assert page.locator("textarea").first.input_value() == prompt, label
            assert "model=ce-circuits-3l-attn" in page.url and "prompt=" in page.url, label
            assert page.get_by_text("The prompt is empty").count() == 0, label
        # A task source and a held-out template survive navigation too.
        page.goto(f"{server}/attribution?model=ce-circuits-3l-attn&source=ioi&template=friends_found&example=2",
                  wait_until="domcontentloaded")
        page.get_by_text("Template 'friends_found', 32 prompts").first.wait_for(timeout=120_000)  # the sidebar's caption
        page.get_by_role("link", name="SAE features").first.click()
        page.wait_for_url(re.compile(".*/saes\\?.*"), timeout=60_000)
        page.get_by_text("Template 'friends_found', 32 prompts").first.wait_for(timeout=120_000)
        assert "template=friends_found" in page.url and "source=ioi" in page.url and "example=2" in page.url
        # Typing a page's URL on the running server opens that page.
        page.goto(f"{server}/attention?model=ce-circuits-3l-mlp", wait_until="domcontentloaded")
        page.get_by_text("3 layers × 4 heads").first.wait_for(timeout=120_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
        assert page.get_by_text("Page not found").count() == 0
        assert "/attention" in page.url and "model=ce-circuits-3l-mlp" in page.url
        browser.close()


def test_nothing_is_cut_off_and_the_pattern_axis_is_in_view_at_1280x720(server):
    """Issue 16: labels were cut ("Noising: corrupted → …", "Compare b…", "Logit attributi…") and the
    attention heatmap's key axis sat below the fold on a 1280×720 projector."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        for path, ready in (("/patching?model=ce-circuits-3l-attn&source=ioi", "Head outputs (z), all positions: exact"),
                            ("/attention", "attention pattern"), ("/attribution", "Direct effect of each component"),
                            ("/remote", "Direct logit attribution to")):
            page.goto(server + path, wait_until="domcontentloaded")
            page.get_by_text(ready).first.wait_for(timeout=120_000)
            page.wait_for_timeout(1500)
            assert page.evaluate(CLIPPED) == [], path
        page.goto(server + "/attention", wait_until="domcontentloaded")
        page.get_by_text("attention pattern").first.wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        bottom = page.evaluate("() => document.querySelector('.js-plotly-plot .xaxislayer-above').getBoundingClientRect().bottom")
        assert bottom < 720
        fonts = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot .ytick text')].map(t => parseFloat(t.style.fontSize))")
        assert fonts and min(fonts) >= 14
        browser.close()
