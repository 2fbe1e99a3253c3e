"""Page-link clicks under load: N browser sessions at once click through the sidebar's pages.

    python -m benchmarks.bench_navigation_load --sessions 8 --rounds 2 [--pause-ms 0]

Starts `streamlit run app.py` (or uses --url), opens N Chromium sessions on the Attention page
of ce-circuits-3l-attn, and has each click Logit attribution → Head importance → Attention,
`--rounds` times, waiting `--pause-ms` after each page's URL changes (0: click again at once,
while the page is still running). Reports clicks that did not change the page within 20 s (a
click that "did nothing") and the median seconds from click to the new URL.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ORDER = [("Logit attribution", "/attribution"), ("Head importance", "/patching"), ("Attention", "/attention")]


def _session(url: str, rounds: int, pause_ms: int, results: list) -> None:
    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(url + "/attention?model=ce-circuits-3l-attn", wait_until="domcontentloaded")
        page.locator(".js-plotly-plot").first.wait_for(timeout=300_000)
        for _ in range(rounds):
            for label, path in ORDER:
                t0 = time.perf_counter()
                page.get_by_role("link", name=label, exact=True).first.click()
                try:
                    page.wait_for_url(lambda u, path=path: path in u, timeout=20_000)
                    results.append((True, time.perf_counter() - t0))
                except Exception:
                    results.append((False, time.perf_counter() - t0))
                page.wait_for_timeout(pause_ms)
        browser.close()


def main() -> None:
    from tests.helpers import free_port as _free_port

    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pause-ms", type=int, default=1500)
    parser.add_argument("--url", help="a running server (default: start one from this checkout)")
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", f"--server.port={port}",
                                 "--server.address=127.0.0.1", "--server.headless=true"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.2)
    results: list = []
    try:
        threads = [threading.Thread(target=_session, args=(url, args.rounds, args.pause_ms, results))
                   for _ in range(args.sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    lost = sum(1 for ok, _ in results if not ok)
    print(f"{args.sessions} sessions, pause {args.pause_ms} ms: {len(results)} clicks, {lost} did not change the page "
          f"within 20 s; click -> new URL median {statistics.median(t for _, t in results):.2f} s")


if __name__ == "__main__":
    main()
