"""The four lessons, end to end in Chromium: start each from the Lessons page, follow every step with
"Next", answer every question (the induction head by clicking it in the grid) and see it graded right.

The right answers are computed here with core/ (the same functions the app grades with, run in
this process on the same weights); tests/test_lessons.py checks those against TransformerLens.
"""
import os
import re
from pathlib import Path

import pytest

from core import lessons, models, saes, tasks
from core.prompts import prepare_prompt
from core.task_catalog import default_template
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, ROOT

SHOTS = Path(os.environ.get("CE_SCREENSHOT_DIR", ROOT / "tests" / ".screenshots"))
pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}"),
              pytest.mark.slow]


def _expected(step: lessons.Step) -> lessons.Expected:
    view = step.view
    model = models.load_model(view["model"])
    ctx = lessons.Context(model)
    if "prompt" in view:
        ctx.tokens = prepare_prompt(model, view["prompt"]).tokens
    if "source" in view:
        template = view.get("template", default_template(view["source"]))
        extra = {"template": template} if template else {}
        ctx.task = tasks.make_task(view["source"], model, n=32, seed=0, split="held_out", **extra)
        ctx.tokens = ctx.task.clean_tokens[view.get("example", 0)][None]
    if "sae" in view:
        ctx.sae = saes.load_embedded(view["sae"])
    if step.check.answer == "strongest_induction_model":
        ctx.models = {name: models.load_model(name) for name in models.zoo_models()}
    return lessons.expected(step.check, ctx)


def _settled(page, timeout=180_000) -> None:
    """Wait until the script run is over (Streamlit's running indicator gone) and no spinner shows."""
    page.wait_for_timeout(400)
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidget"]')
                 && !document.querySelector('[data-testid="stSpinner"]')""", timeout=timeout)


def _panel(page):
    return page.locator(".st-key-lesson_panel")


def _one(page, css: str):
    """The panel's only element matching `css`, once stale copies from the last run are gone."""
    page.wait_for_function("css => document.querySelectorAll('.st-key-lesson_panel ' + css).length === 1", arg=css,
                           timeout=120_000)
    return _panel(page).locator(css)


def _button(page, label: str):
    page.wait_for_function(
        """label => [...document.querySelectorAll('.st-key-lesson_panel button')]
                    .filter(b => b.innerText.trim() === label).length === 1""", arg=label, timeout=120_000)
    return _panel(page).get_by_role("button", name=label)


def _choose(page, value: str) -> None:
    """Pick `value` in the panel's "Your answer" select box (BaseWeb: open, type, Enter)."""
    box = _one(page, '[data-testid="stSelectbox"]')
    box.click()
    page.keyboard.type(value)
    page.get_by_role("option", name=value, exact=True).click()
    _settled(page)


def _click_head_in_grid(page, layer: int, head: int) -> None:
    """Click the (layer, head) panel of the All heads grid, as a student does."""
    point = page.evaluate(
        """([layer, head]) => {
            for (const gd of document.querySelectorAll('.js-plotly-plot')) {
                const t = (gd.data || []).find(t => t.name === 'open head');
                if (!t) continue;
                const i = t.customdata.findIndex(c => c[0] === layer && c[1] === head);
                const xa = gd._fullLayout[(t.xaxis || 'x').replace('x', 'xaxis')];
                const ya = gd._fullLayout[(t.yaxis || 'y').replace('y', 'yaxis')];
                const r = gd.getBoundingClientRect();
                return {x: r.left + xa._offset + xa.d2p(t.x[i]), y: r.top + ya._offset + ya.d2p(t.y[i])};
            }
            return null;
        }""", [layer, head])
    assert point is not None, "the All heads grid is not on the page"
    page.mouse.click(point["x"], point["y"])
    _settled(page)


def test_every_lesson_end_to_end(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    found = lessons.load_lessons()
    graded = 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for lesson in found:
            page.goto(server + "/lessons", wait_until="domcontentloaded")
            page.locator(f".st-key-start_{lesson.number} button").click(timeout=120_000)
            for i, step in enumerate(lesson.steps, 1):
                where = f"{lesson.number}.{i}"
                _panel(page).get_by_text(step.title, exact=True).wait_for(timeout=180_000)
                _settled(page)
                assert f"lesson={where}" in page.url, (where, page.url)
                assert f"/{step.page}" in page.url, (where, page.url)
                assert page.locator('[data-testid="stException"]').count() == 0, where
                if i in (1, len(lesson.steps)) or step.check is not None:
                    page.screenshot(path=str(SHOTS / f"lesson_{where}.png"))
                if step.check is not None:
                    expected = _expected(step)
                    if step.check.answer == "top_induction_head":  # "click it"
                        layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", expected.value).groups())
                        page.wait_for_function(
                            """() => [...document.querySelectorAll('.js-plotly-plot')]
                                     .some(g => (g.data || []).some(t => t.name === 'open head'))""", timeout=60_000)
                        _settled(page)
                        _click_head_in_grid(page, layer, head)
                        page.wait_for_function(  # the page opened the clicked head
                            "h => location.search.includes(h)", arg=f"layer={layer}&head={head}", timeout=60_000)
                        _settled(page)
                        _one(page, '[data-testid="stSelectbox"]')  # the answer box follows it: "Right." below says so
                        page.screenshot(path=str(SHOTS / f"lesson_{where}_clicked.png"))
                    elif expected.kind == "number":
                        box = _one(page, '[data-testid="stNumberInput"] input')
                        box.fill(str(expected.value))
                        box.press("Enter")
                        _settled(page)
                    else:
                        _choose(page, str(expected.value))
                    _button(page, "Check").click()
                    _panel(page).get_by_text("Right.").wait_for(timeout=120_000)
                    graded += 1
                if i < len(lesson.steps):
                    _settled(page)  # while Streamlit redraws, a stale copy of a button may linger
                    _button(page, "Next →").click()
        _panel(page).get_by_text("All lessons").click()  # in-app: the same session, so its progress
        page.get_by_text("Continue at 4.7").wait_for(timeout=120_000)
        assert page.get_by_text(f"{sum(s.check is not None for s in found[-1].steps)}/").count() >= 1
        page.screenshot(path=str(SHOTS / "lessons_progress.png"), full_page=True)
        browser.close()
    assert graded == sum(s.check is not None for lesson in found for s in lesson.steps)
    assert not errors, errors


def test_the_lessons_page_reads_well_at_projector_and_desktop_sizes(server):
    from tests.helpers import CLIPPED

    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        for width, height in ((1280, 720), (1920, 1080)):
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(server + "/lessons?lesson=2.3", wait_until="domcontentloaded")
            page.locator(".st-key-start_4").wait_for(timeout=120_000)
            _panel(page).get_by_text("Patch each head", exact=True).wait_for(timeout=120_000)
            _settled(page)
            page.locator(".st-key-start_1 button").get_by_text("Start").wait_for(timeout=60_000)
            _button(page, "Next →").wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(SHOTS / f"lessons_{width}.png"))
            assert page.evaluate("() => document.scrollingElement.scrollWidth <= window.innerWidth")
            assert page.evaluate(CLIPPED) == []
            # the first lesson's card and its Start button are on the first screen
            box = page.locator(".st-key-start_1 button").bounding_box()
            assert box is not None and box["y"] + box["height"] <= height and box["x"] + box["width"] <= width
            page.close()
        browser.close()
