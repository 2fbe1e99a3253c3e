"""Server-side times of the Logit attribution page, measured with streamlit's AppTest.

    python -m benchmarks.bench_attribution [--repeats 5] [--threads 2] [--gpt2-shaped]

For each embedded task model (and, with --gpt2-shaped, a random gpt2-small-shaped checkpoint),
on the IOI prompt, it reports medians (min-max) over repeats of
- first render: a new session's first full run of the page (model load included; caches cleared);
- counterfactual change: the rerun after typing another counterfactual token, then
- answer change: the same for the answer box (neither runs the model: checked with the
  store's miss count);
- task mean: switching to the mean over the IOI task's 32 prompts (one forward pass of the batch);
and the time of the attribution maths alone for one answer (core.attribution: components, heads,
accumulated residual, logit lens, top neurons) from the stored run.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _misses(at) -> int:
    text = at.sidebar.caption[-1].value.replace("\\", "")
    return int(re.search(r"misses (\d+)", text).group(1))


def time_page(model: str, answers: tuple[str, str], repeats: int) -> dict[str, list[float]]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    out: dict[str, list[float]] = {"first render": [], "counterfactual change": [], "answer change": [], "task mean": []}
    for _ in range(repeats):
        st.cache_resource.clear()
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        at.query_params.update(page="attribution", model=model, prompt=PROMPT)
        t0 = time.perf_counter()
        at.run()
        out["first render"].append(time.perf_counter() - t0)
        assert not at.exception and not at.error and not at.warning, (at.exception, at.error, at.warning)
        misses = _misses(at)
        for key, value, label in (("attr_wrong", answers[1], "counterfactual change"), ("attr_answer", answers[0], "answer change")):
            at.text_input(key=key).set_value(value)
            t0 = time.perf_counter()
            at.run()
            out[label].append(time.perf_counter() - t0)
            assert not at.exception and not at.warning, (at.exception, at.warning)
        assert _misses(at) == misses, "an answer change ran the model"
        at.sidebar.selectbox(key="source").set_value("ioi").run()
        at.segmented_control(key="attr_scope").set_value(f"Mean over the task's {32} prompts")
        t0 = time.perf_counter()
        at.run()
        out["task mean"].append(time.perf_counter() - t0)
        assert not at.exception, at.exception
    return out


def time_maths(model_name: str, repeats: int) -> list[float]:
    from core import attribution
    from core.models import load_model
    from core.store import ActivationStore

    model = load_model(model_name)
    run = ActivationStore().get(model, model.to_tokens(PROMPT))
    answer, wrong = run.logits[0, -1].topk(2).indices.tolist()
    a, w = torch.tensor([answer]), torch.tensor([wrong])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        attribution.by_component(model, run.cache, a, w)
        attribution.head_grid(model, attribution.by_head(model, run.cache, a, w))
        attribution.accumulated(model, run.cache, a, w)
        attribution.logit_lens(model, run.cache, answer=answer)
        if not model.cfg.attn_only:
            attribution.top_neurons(model, run.cache, model.cfg.n_layers - 1, a, w)
        times.append(time.perf_counter() - t0)
    return times


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} s ({min(xs):.3f}–{max(xs):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpt2-shaped", action="store_true", help="also a random gpt2-small-shaped model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats, medians (min–max)")
    models = [("ce-circuits-3l-attn", ("john", "")), ("ce-circuits-3l-mlp", ("john", "drink"))]
    tmp = None
    if args.gpt2_shaped:
        from benchmarks.bench_page_times import gpt2_small_shaped

        tmp = tempfile.TemporaryDirectory()
        models.append((str(gpt2_small_shaped(Path(tmp.name))), ("john", "mary")))
    for name, answers in models:
        page = time_page(name, answers, args.repeats)
        label = Path(name).name if "/" in name else name
        print(f"\n{label}")
        for k, v in page.items():
            print(f"  {k:24s} {fmt(v)}")
        print(f"  {'attribution maths alone':24s} {fmt(time_maths(name, max(args.repeats, 5)))}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
