"""A classroom on one laptop (issue 19): N browser sessions at once doing a lesson's steps.

    python -m benchmarks.bench_classroom --sessions 1 8 16 32 [--server-threads 2] [--json out.json]

Starts `streamlit run app.py` on 127.0.0.1 (or uses --url, then memory is not measured), warms it
up with one session (not counted), then for each N runs N concurrent sessions: one headless
Chromium, one browser context (a separate Streamlit session) per student, driven by asyncio
Playwright. Every session has its own prompt and task example, and does, on `--model`:

  attention  open /attention with its prompt; wait for the pattern heatmap with its tokens
  prompt     type its second prompt into the sidebar (Ctrl+Enter); time until the heatmap's
             labels are that prompt's tokens. Labels of another session's prompt are cross-talk
  patching   open /patching on its IOI example; wait for the sweep's heatmap (each example is a
             sweep of its own: the results cache is keyed by it)
  sae        open /saes on an embedded SAE's feature dashboard; wait for its top contexts
  steering   open /steering; wait for the steered generation

It reports, per N, p50 and p95 seconds of each step, errors (timeouts, exceptions, Streamlit
exception boxes, figures of another prompt) and the server's peak RSS (psutil, the server and
its children, sampled every 0.25 s), and writes everything as JSON with --json. Every wait is
bounded (--step-timeout). Only localhost is contacted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = ("attention", "prompt", "patching", "sae", "steering")
EXCEPTION = '[data-testid="stException"]'
HEATMAP_X = """() => {
    const gd = document.querySelector('[data-testid="stMain"] .js-plotly-plot');
    return gd && gd.data && gd.data[0] && gd.data[0].x ? Array.from(gd.data[0].x) : null;
}"""
LABELS_ARE = "(want) => { const x = (" + HEATMAP_X + ")(); return !!x && JSON.stringify(x) === JSON.stringify(want); }"


def lesson_inputs(model_name: str, n: int) -> dict:
    """Per session i < n: two distinct prompts and their expected heatmap labels, an IOI example.

    Prompts are IOI prompts of the model's own vocabulary (the zoo tokenizer knows their words)."""
    from core import models, plots, store, tasks

    model = models.load_model(model_name)
    task = tasks.make_task("ioi", model, n=max(64, 2 * n + 8), seed=1, split="held_out")
    prompts = list(dict.fromkeys(task.clean_prompts))  # distinct, in order
    if len(prompts) < 2 * n:
        raise SystemExit(f"only {len(prompts)} distinct IOI prompts for {n} sessions")
    labels = {p: plots.position_labels(store.str_tokens(model, store.to_tokens(model, p)[0])) for p in prompts[:2 * n]}
    from core import saes

    sae = (saes.embedded_saes(model_name) or [None])[0]
    return {"first": prompts[:n], "second": prompts[n:2 * n], "labels": labels, "sae": sae}


class MemorySampler(threading.Thread):
    """Peak RSS of a process and its children, sampled every `every` s."""

    def __init__(self, pid: int | None, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self._stop_flag = pid, every, 0, threading.Event()

    def rss(self) -> int:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0

    def run(self) -> None:
        while not self._stop_flag.is_set() and self.pid is not None:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def reset(self) -> None:
        self.peak = self.rss() if self.pid is not None else 0

    def stop(self) -> None:
        self._stop_flag.set()


async def student(browser, url: str, i: int, inputs: dict, model: str, timeout_s: float) -> dict:
    """One session's lesson: {"times": {step: s}, "errors": [...]}."""
    first, second = inputs["first"][i], inputs["second"][i]
    labels = inputs["labels"]
    others = {json.dumps(v): p for p, v in labels.items() if p not in (first, second)}
    rec: dict = {"session": i, "times": {}, "errors": []}
    ctx = await browser.new_context(viewport={"width": 1280, "height": 720})
    page = await ctx.new_page()
    ms = timeout_s * 1000

    async def step(name: str, action) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(action(), timeout_s + 5)
            rec["times"][name] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - every failure is a counted error
            what = type(err).__name__
            if "Timeout" in what:
                shown = await _labels(page)
                if name in ("attention", "prompt") and shown is not None and json.dumps(shown) in others:
                    what = f"cross-talk: the heatmap shows another session's prompt {others[json.dumps(shown)]!r}"
            rec["errors"].append(f"{name}: {what}: {str(err).splitlines()[0][:160] if str(err) else ''}")
        try:
            boxes = await page.locator(EXCEPTION).all_inner_texts()
            if boxes:
                rec["errors"].append(f"{name}: an exception box on the page: {boxes[0][:300]!r}")
        except Exception:  # noqa: BLE001
            pass

    q = urllib.parse.urlencode

    async def attention() -> None:
        await page.goto(f"{url}/attention?{q({'model': model, 'prompt': first})}", wait_until="domcontentloaded",
                        timeout=ms)
        await page.wait_for_function(LABELS_ARE, arg=labels[first], timeout=ms)

    async def prompt() -> None:
        box = page.locator('[data-testid="stSidebar"] textarea').first
        await box.fill(second, timeout=ms)
        await box.press("Control+Enter", timeout=ms)
        await page.wait_for_function(LABELS_ARE, arg=labels[second], timeout=ms)

    async def patching() -> None:
        await page.goto(f"{url}/patching?{q({'model': model, 'source': 'ioi', 'example': i % 32})}",
                        wait_until="domcontentloaded", timeout=ms)
        await page.locator('[data-testid="stMain"] .js-plotly-plot .gtitle', has_text="exact").first.wait_for(
            timeout=ms)

    async def sae() -> None:
        params = {"model": model, "prompt": first, "sae": inputs["sae"], "feature": i}
        await page.goto(f"{url}/saes?{q(params)}", wait_until="domcontentloaded", timeout=ms)
        await page.locator('[data-testid="stMain"] button', has_text="Feature dashboard").first.click(timeout=ms)
        await page.get_by_text("Top activating contexts").first.wait_for(timeout=ms)

    async def steering() -> None:
        await page.goto(f"{url}/steering?{q({'model': model, 'steer_view': 'steer'})}", wait_until="domcontentloaded",
                        timeout=ms)
        await page.get_by_text("Steered", exact=True).first.wait_for(timeout=ms)
        await page.locator('[data-testid="stCode"]').nth(1).wait_for(timeout=ms)

    try:
        await step("attention", attention)
        if "attention" in rec["times"]:
            await step("prompt", prompt)
        await step("patching", patching)
        if inputs["sae"]:
            await step("sae", sae)
        await step("steering", steering)
    finally:
        await ctx.close()
    return rec


async def _labels(page):
    try:
        return await page.evaluate(HEATMAP_X)
    except Exception:  # noqa: BLE001
        return None


def niced_chromium(niceness: int) -> str:
    """A wrapper that starts Debian's Chromium at `niceness`: the students' browsers then take the CPU
    only when the server does not want it, as if they ran on the students' own laptops."""
    import tempfile

    from tests.helpers import CHROMIUM

    path = Path(tempfile.mkdtemp(prefix="ce-chromium-")) / "chromium"
    path.write_text(f'#!/bin/sh\nexec nice -n {int(niceness)} {CHROMIUM} "$@"\n')
    path.chmod(0o755)
    return str(path)


async def run_level(url: str, n: int, inputs: dict, model: str, timeout_s: float, executable: str | None = None) -> list[dict]:
    from playwright.async_api import async_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable or CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            return await asyncio.gather(*(student(browser, url, i, inputs, model, timeout_s) for i in range(n)))
        finally:
            await browser.close()


def percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(n: int, recs: list[dict], peak: int, wall: float) -> dict:
    out = {"sessions": n, "wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2**20) if peak else None,
           "errors": [e for r in recs for e in r["errors"]], "steps": {}}
    for s in STEPS:
        xs = [r["times"][s] for r in recs if s in r["times"]]
        out["steps"][s] = {"n": len(xs), "p50": percentile(xs, 0.5), "p95": percentile(xs, 0.95),
                           "max": max(xs) if xs else None}
    return out


def table(rows: list[dict]) -> str:
    head = "| N | " + " | ".join(f"{s} p50 / p95" for s in STEPS) + " | errors | server peak RSS |"
    lines = [head, "|" + "---|" * (len(STEPS) + 3)]
    for r in rows:
        cells = []
        for s in STEPS:
            st = r["steps"][s]
            cells.append("—" if st["p50"] is None else f"{st['p50']:.2f} / {st['p95']:.2f} s")
        mem = "—" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:,} MiB"
        lines.append(f"| {r['sessions']} | " + " | ".join(cells) + f" | {len(r['errors'])} | {mem} |")
    return "\n".join(lines)


def start(threads: int, store_bytes: int | None) -> tuple[subprocess.Popen, str]:
    from tests.helpers import free_port

    port = free_port()
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    if store_bytes is not None:
        env["CIRCUIT_EXPLORER_STORE_BYTES"] = str(store_bytes)
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless=true",
                             f"--server.port={port}", "--server.address=127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("streamlit did not start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--model", default="ce-circuits-3l-mlp")
    parser.add_argument("--server-threads", type=int, default=2, help="torch (OpenMP) threads of the server")
    parser.add_argument("--store-bytes", type=int, help="the activation store's cap (default: the app's, 2 GiB)")
    parser.add_argument("--step-timeout", type=float, default=120.0)
    parser.add_argument("--url", help="a running server (memory is then not measured)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--client-nice", type=int, default=0,
                        help="run the browsers at this niceness (e.g. 19): on one machine, the server then gets the "
                        "CPU first, as if the students' browsers ran on their own laptops")
    args = parser.parse_args()
    inputs = lesson_inputs(args.model, max(args.sessions))
    proc, url = (None, args.url) if args.url else start(args.server_threads, args.store_bytes)
    sampler = MemorySampler(proc.pid if proc else None)
    sampler.start()
    rows = []
    executable = niced_chromium(args.client_nice) if args.client_nice else None
    try:
        t0 = time.perf_counter()
        warm = asyncio.run(run_level(url, 1, inputs, args.model, max(args.step_timeout, 180), executable))
        print(f"warm-up (1 session, not counted): {time.perf_counter() - t0:.1f} s, errors {warm[0]['errors']}, "
              f"server RSS {sampler.rss() / 2**20:.0f} MiB", flush=True)
        idle_rss = sampler.rss()
        for n in args.sessions:
            sampler.reset()
            t0 = time.perf_counter()
            recs = asyncio.run(run_level(url, n, inputs, args.model, args.step_timeout, executable))
            row = summarise(n, recs, sampler.peak, time.perf_counter() - t0)
            rows.append(row)
            print(f"N={n}: {row['wall_s']} s, {len(row['errors'])} errors, peak RSS {row['peak_rss_mib']} MiB", flush=True)
            for e in row["errors"][:10]:
                print("   ", e, flush=True)
    finally:
        sampler.stop()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    conditions = {"model": args.model, "server_torch_threads": args.server_threads, "cpus": os.cpu_count(),
                  "client_nice": args.client_nice,
                  "load_average": os.getloadavg(), "store_bytes": args.store_bytes,
                  "idle_rss_mib_after_warm_up": round(idle_rss / 2**20) if proc else None,
                  "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"\n{args.model}, server torch threads {args.server_threads}, {os.cpu_count()} CPUs, browsers at nice "
          f"{args.client_nice}, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; seconds per step\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"conditions": conditions, "levels": rows}, indent=1))


if __name__ == "__main__":
    main()
