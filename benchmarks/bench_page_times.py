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

    python -m benchmarks.bench_page_times --all-pages [--repeats 5] [--threads 2] [--pages attention,saes]

on the random gpt2-small-shaped checkpoint only, with AppTest (server side, Python imports warm after
the first repeat, which is reported apart), each repeat:
- first start: an empty data folder (a fresh $CIRCUIT_EXPLORER_DATA), Streamlit's st.cache_resource
  and st.cache_data cleared -> the Attention page's first render (hash, conversion, head scores);
- second start: the same data folder (converted checkpoint and head scores on disk), the Streamlit
  caches cleared again (a new process, as far as the app can tell) -> the first render;
- prompt change on every page: open the page (`?page=...`) in a new session on a 32-token prompt
  (BOS + 31 words of the zoo vocabulary), type another 32-token prompt in the sidebar, time that
  rerun. Each page and repeat gets prompts no page has seen, so the store holds no run of them.
Targets: second start <= 2 s, prompt change <= 0.5 s. The feature-index prefetch is off
(CIRCUIT_EXPLORER_PREFETCH_INDEXES=0): it would build every zoo SAE's index in the background.
With --profile PAGE it also prints cProfile's top functions of that page's prompt change.
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


ALL_PAGES = ("attention", "attribution", "patching", "circuits", "saes", "steering", "lessons")
PROMPT_TOKENS = 32  # as the pages see them: BOS + 31 words
FIRST_START_TARGET, SECOND_START_TARGET, CHANGE_TARGET = None, 2.0, 0.5


def word_prompt(rng, n_tokens: int = PROMPT_TOKENS) -> str:
    """A prompt of n_tokens tokens (BOS included) for the zoo's word-level tokenizer."""
    from core.vocab import WORDS

    return " ".join(rng.choice(WORDS) for _ in range(n_tokens - 1))


def _store_misses(at) -> int | None:
    import re

    for caption in reversed(at.sidebar.caption):
        found = re.search(r"misses (\d+)", caption.value.replace("\\", ""))
        if found:
            return int(found.group(1))
    return None


def _fresh_start(data: Path) -> None:
    """As a new server process sees it: the data folder `data`, no Streamlit cache."""
    import os

    import streamlit as st

    from core import paths
    from core.ui import cache

    os.environ[paths.DATA_ENV] = str(data)
    st.cache_resource.clear()
    st.cache_data.clear()
    cache._recent_failures.clear()


EXTRA_PARAMS: dict[str, str] = {}  # --params: more query parameters (a tab: attr_tab=lens)


def _app(page: str, model: str, prompt: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=900)
    for key, value in EXTRA_PARAMS.items():
        at.query_params[key] = value
    at.query_params["page"] = page
    at.query_params["model"] = model
    at.query_params["prompt"] = prompt
    return at


def _check(at, where: str) -> None:
    if at.exception or at.error:
        raise RuntimeError(f"{where}: {[e.value for e in at.exception]} {[e.value for e in at.error]}")


class _ScriptProfile:
    """cProfile of the app's script thread (AppTest runs the script in a thread of its own, which a
    profiler enabled in the main thread does not see) while the context is open."""

    def __init__(self):
        import cProfile

        self.prof = cProfile.Profile()

    def __enter__(self):
        from streamlit.testing.v1.local_script_runner import LocalScriptRunner

        self._original = original = LocalScriptRunner._run_script_thread
        prof = self.prof

        def profiled(runner):
            prof.enable()
            try:
                original(runner)
            finally:
                prof.disable()

        LocalScriptRunner._run_script_thread = profiled
        return self

    def __exit__(self, *exc):
        from streamlit.testing.v1.local_script_runner import LocalScriptRunner

        LocalScriptRunner._run_script_thread = self._original

    def print(self, title: str, n: int = 45) -> None:
        import pstats

        print(f"--- cProfile of {title} (script thread, cumulative) ---")
        pstats.Stats(self.prof).sort_stats("cumulative").print_stats(n)


def _count_tokens(model_path: str, prompt: str) -> int:
    from core import store
    from core.ui import cache

    model = cache._cached_model(model_path, *cache.load_settings())  # loaded already: a cache hit
    return int(store.to_tokens(model, prompt).shape[1])


def time_all_pages(model: str, repeats: int, pages: list[str], profile: str | None = None,
                   seed: int = 0) -> dict[str, list[float]]:
    """{measure: seconds per repeat} for the first start, the second start and each page's prompt change."""
    import random

    rng = random.Random(seed)
    out: dict[str, list[float]] = {"first start": [], "second start": [], **{p: [] for p in pages}}
    misses: dict[str, list[int]] = {p: [] for p in pages}
    for r in range(repeats):
        with tempfile.TemporaryDirectory(prefix="ce-bench-data-") as data:
            for label in ("first start", "second start"):
                _fresh_start(Path(data))
                at = _app("attention", model, word_prompt(rng))
                t0 = time.perf_counter()
                at.run()
                out[label].append(time.perf_counter() - t0)
                _check(at, label)
            for page in pages:
                before, after = word_prompt(rng), word_prompt(rng)
                assert _count_tokens(model, before) == _count_tokens(model, after) == PROMPT_TOKENS
                at = _app(page, model, before)
                at.run()
                _check(at, f"{page}, opened")
                missed = _store_misses(at)
                at.sidebar.text_area(key="prompt").set_value(after)
                prof = _ScriptProfile() if profile == page and r == repeats - 1 else None
                if prof:
                    with prof:
                        t0 = time.perf_counter()
                        at.run()
                else:
                    t0 = time.perf_counter()
                    at.run()
                out[page].append(time.perf_counter() - t0)
                _check(at, f"{page}, prompt changed")
                now = _store_misses(at)
                misses[page].append(now - missed if now is not None and missed is not None else -1)
                if prof:
                    prof.print(f"the {page} page's prompt change")
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in out.items()), flush=True)
    out["_misses"] = misses  # type: ignore[assignment]
    return out


def report_all_pages(times: dict, threads: int, repeats: int) -> None:
    misses = times.pop("_misses")
    print(f"\nrandom gpt2-small-shaped checkpoint, AppTest (server side), torch {torch.get_num_threads()} threads "
          f"(asked {threads}), {repeats} repeats; medians (min-max); prompts of {PROMPT_TOKENS} tokens")
    cold = times["first start"][0]
    print(f"first repeat's first start, Python imports included: {cold:.2f} s")
    print("| measure | median | range | target | median / target | store misses per change |")
    print("|---|---|---|---|---|---|")
    for key, xs in times.items():
        if key == "first start" and len(xs) > 1:
            xs = xs[1:]  # imports warm, as in every later start of a server
        target = {"first start": FIRST_START_TARGET, "second start": SECOND_START_TARGET}.get(key, CHANGE_TARGET)
        label = key if key.endswith("start") else f"prompt change, {key}"
        med = statistics.median(xs)
        ratio = f"{med / target:.2f}" if target else "-"
        miss = ",".join(map(str, sorted(set(misses.get(key, []))))) or "-"
        print(f"| {label} | {med:.2f} s | {min(xs):.2f}-{max(xs):.2f} | {f'<= {target:g} s' if target else '-'} | "
              f"{ratio} | {miss} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--browser", action="store_true", help="also time a real server in Chromium")
    parser.add_argument("--cold-start", nargs="*", metavar="CHECKOUT",
                        help="only time server start -> first paint -> first heatmap in Chromium, for this "
                        "checkout and the given other ones (e.g. a worktree of an older commit)")
    parser.add_argument("--all-pages", action="store_true",
                        help="first start, second start and a prompt change on every page (gpt2-small shape)")
    parser.add_argument("--pages", default=",".join(ALL_PAGES), help="with --all-pages: which pages (comma-separated)")
    parser.add_argument("--profile", metavar="PAGE", help="with --all-pages: cProfile that page's last prompt change")
    parser.add_argument("--params", default="", help="with --all-pages: more query parameters, e.g. attr_tab=neurons")
    args = parser.parse_args()
    EXTRA_PARAMS.update(kv.split("=", 1) for kv in args.params.split(",") if "=" in kv)
    torch.set_num_threads(args.threads)
    if args.all_pages:
        import os

        os.environ["CIRCUIT_EXPLORER_PREFETCH_INDEXES"] = "0"
        pages = [p for p in args.pages.split(",") if p]
        unknown = set(pages) - set(ALL_PAGES)
        if unknown:
            parser.error(f"unknown pages {sorted(unknown)}; pages: {', '.join(ALL_PAGES)}")
        with tempfile.TemporaryDirectory(prefix="ce-bench-gpt2-") as tmp:
            model = str(gpt2_small_shaped(Path(tmp)))
            report_all_pages(time_all_pages(model, args.repeats, pages, args.profile), args.threads, args.repeats)
        return
    if args.cold_start is not None:
        for root in [ROOT, *map(Path, args.cold_start)]:
            times = time_cold_start(root, args.repeats)
            print(f"{root}: " + "   ".join(
                f"start -> {k} {statistics.median(v):5.2f} s ({min(v):.2f}-{max(v):.2f})" for k, v in times.items()))
        return
    import os

    from core import paths

    # Converted checkpoints and head scores go to a scratch folder, not the repository's .data/.
    os.environ.setdefault(paths.DATA_ENV, tempfile.mkdtemp(prefix="ce-bench-data-"))
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
