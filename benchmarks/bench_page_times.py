"""Server-side page times of the Attention page, measured with streamlit's AppTest.

    python -m benchmarks.bench_page_times [--repeats 5] [--threads 2]

For the zoo model and for a random gpt2-small-shaped model (12 layers, d_model 768, 12 heads,
context 1024, vocabulary 50257, saved as a local Hugging Face GPT-2 checkpoint with the zoo
tokenizer, since GPT-2's tokenizer cannot be downloaded here), it reports
- first render: a new session's first full run, model load included (model and store caches
  cleared before each repeat; Python imports are warm after the first repeat);
- prompt change: the rerun after typing a new prompt in that session.
Medians over repeats; torch thread count stated.

With --browser it also times a real `streamlit run app.py` process in Debian's Chromium:
process start to the selected head's heatmap drawn, and a prompt edit to the redrawn heatmap
(includes the browser; run alone, it starts one server per repeat).

    python -m benchmarks.bench_page_times --cold-start [OTHER_CHECKOUT ...] --repeats 3

times only what a first visitor of "/" sees on a fresh server: the page title, the sidebar, the
first heatmap (each from `streamlit run`), here and in other checkouts (before/after figures).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def gpt2_small_shaped(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.vocab import build_tokenizer

    build_tokenizer(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)  # GPT2Config() defaults = gpt2-small shape
    return folder


def time_page(model: str, prompt: str, new_prompt: str, repeats: int) -> tuple[list[float], list[float]]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    first, change = [], []
    for _ in range(repeats):
        st.cache_resource.clear()
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        at.query_params["model"] = model
        at.query_params["prompt"] = prompt
        t0 = time.perf_counter()
        at.run()
        first.append(time.perf_counter() - t0)
        assert not at.exception and not at.error, (at.exception, at.error)
        at.sidebar.text_area[0].set_value(new_prompt)
        t0 = time.perf_counter()
        at.run()
        change.append(time.perf_counter() - t0)
        assert not at.exception
    return first, change


def _start_and_open(page, root: Path, path: str):
    """Start `streamlit run app.py` in `root` on a free port and open `path` in `page` as soon as
    the server answers. Returns the server process."""
    import os
    import subprocess

    from tests.helpers import free_port as _free_port

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", f"--server.port={port}", "--server.address=127.0.0.1",
         "--server.headless=true"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
    )
    while True:
        try:
            page.goto(f"http://127.0.0.1:{port}{path}", wait_until="domcontentloaded", timeout=2000)
            return proc
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("streamlit exited before it served the page")
            time.sleep(0.05)


def time_browser(model: str, new_prompt: str, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds from `streamlit run` to the heatmap in Chromium, and from a prompt edit to its redraw."""
    import urllib.parse

    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    start_times, change_times = [], []
    for _ in range(repeats):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            t0 = time.perf_counter()
            proc = _start_and_open(page, ROOT, f"/attention?model={urllib.parse.quote(model)}")
            try:
                page.get_by_text("attention pattern").first.wait_for(timeout=300_000)
                page.locator(".js-plotly-plot .heatmaplayer").first.wait_for(timeout=300_000)
                start_times.append(time.perf_counter() - t0)
                box = page.locator("textarea").first
                box.fill(new_prompt)
                t0 = time.perf_counter()
                box.press("Control+Enter")
                page.wait_for_function(
                    """() => [...document.querySelector('.js-plotly-plot').querySelectorAll('.yaxislayer-above text')]
                             .some(t => t.textContent.includes('garden'))""",
                    timeout=300_000,
                )
                change_times.append(time.perf_counter() - t0)
            finally:
                browser.close()
                proc.terminate()
                proc.wait(timeout=30)
    return start_times, change_times


def time_cold_start(root: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds from `streamlit run app.py` (in `root`, a checkout) to what a first visitor of "/"
    sees: the page title, the sidebar's model picker, the first heatmap. A new server each repeat,
    so imports are as cold as the OS file cache allows."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    out: dict[str, list[float]] = {"title": [], "sidebar": [], "heatmap": []}
    for _ in range(repeats):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            t0 = time.perf_counter()
            proc = _start_and_open(page, root, "/")
            try:
                waits = (("title", lambda: page.get_by_text("Attention patterns").first.wait_for(timeout=300_000)),
                         ("sidebar", lambda: page.get_by_text("Model and prompt").first.wait_for(timeout=300_000)),
                         ("heatmap", lambda: page.locator(".js-plotly-plot .heatmaplayer").first.wait_for(timeout=300_000)))
                for name, wait in waits:
                    wait()
                    out[name].append(time.perf_counter() - t0)
            finally:
                browser.close()
                proc.terminate()
                proc.wait(timeout=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--browser", action="store_true", help="also time a real server in Chromium")
    parser.add_argument("--cold-start", nargs="*", metavar="CHECKOUT",
                        help="only time server start -> first paint -> first heatmap in Chromium, for this "
                        "checkout and the given other ones (e.g. a worktree of an older commit)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cold_start is not None:
        for root in [ROOT, *map(Path, args.cold_start)]:
            times = time_cold_start(root, args.repeats)
            print(f"{root}: " + "   ".join(
                f"start -> {k} {statistics.median(v):5.2f} s ({min(v):.2f}-{max(v):.2f})" for k, v in times.items()))
        return
    prompt = "the green king saw seven cold boats near a quiet hill . the green king saw seven cold boats near a quiet hill ."
    new = "a red bird sang in the old garden . a red bird sang in the old garden ."
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (medians; min-max)")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("ce-induction-2l", "ce-induction-2l"), ("random gpt2-small-shaped", str(gpt2_small_shaped(Path(tmp))))]
        for label, model in cases:
            first, change = time_page(model, prompt, new, args.repeats)
            print(f"{label:26s} cold first render (imports + model load) {first[0]:6.2f} s")
            first = first[1:] or first
            print(
                f"{label:26s} first render {statistics.median(first):6.2f} s ({min(first):.2f}-{max(first):.2f})"
                f"   prompt change {statistics.median(change):6.2f} s ({min(change):.2f}-{max(change):.2f})"
            )
            if args.browser:
                start, edit = time_browser(model, new, args.repeats)
                print(
                    f"{label:26s} browser: streamlit run -> heatmap {statistics.median(start):6.2f} s "
                    f"({min(start):.2f}-{max(start):.2f})   prompt edit -> redraw {statistics.median(edit):6.2f} s "
                    f"({min(edit):.2f}-{max(edit):.2f})"
                )


if __name__ == "__main__":
    main()
