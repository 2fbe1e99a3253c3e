"""Server-side page times of the Attention page, measured with streamlit's AppTest.

    python -m benchmarks.bench_page_times [--repeats 5] [--threads 2]

For the zoo model and for a random gpt2-small-shaped model (12 layers, d_model 768, 12 heads,
context 1024, vocabulary 50257, saved as a local Hugging Face GPT-2 checkpoint with the zoo
tokenizer, since GPT-2's tokenizer cannot be downloaded here), it reports
- first render: a new session's first full run, model load included (model and store caches
  cleared before each repeat; Python imports are warm after the first repeat);
- prompt change: the rerun after typing a new prompt in that session.
Medians over repeats; torch thread count stated.
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

    from core.zoo.vocab import build_tokenizer

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
