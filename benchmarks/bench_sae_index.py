"""Feature-index build throughput against SAEDashboard (`sae_dashboard`), measured in the same run.

    python -m benchmarks.bench_sae_index --threads 2 --repeats 3

Both get the same embedded SAE, the same zoo model and the same corpus: `--sequences` rows of
exactly `--seq-len` tokens (BOS, then zoo documents back to back, no padding), every feature.
Ours: `core.sae_index` builds the SQLite index (one forward pass per batch, stopped after the
SAE's layer; top examples, interval samples, histograms, token stats, written to disk).
Theirs: `SaeVisRunner(SaeVisConfig(...)).run(sae, HookedSAETransformer, tokens)`, which computes
each feature's dashboard data (top and quantile sequences, histograms, logit tables).
Times are medians of `--repeats` runs (ours builds a fresh file each time).

sae_dashboard 0.8 pins transformer-lens < 3 and transformers < 4.57, so it is not in
requirements.txt. Install it beside the app without its pins, then point PYTHONPATH at it:

    pip install --no-deps --target .bench-deps -r benchmarks/requirements-sae-dashboard.txt
    PYTHONPATH=.bench-deps python -m benchmarks.bench_sae_index
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch


def corpus_rows(tokenizer, spec: dict, n: int, seq_len: int) -> torch.Tensor:
    from core.corpus import documents

    docs = documents(dict(spec, documents=n * 4), tokenizer)
    stream = [t for d in docs for t in d[1:]]
    rows = [[tokenizer.bos_token_id] + stream[i * (seq_len - 1):(i + 1) * (seq_len - 1)] for i in range(n)]
    return torch.tensor(rows)


def ours(model, loaded, tokens: torch.Tensor) -> float:
    from core import sae_index

    docs = tokens.tolist()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index = sae_index.open_index(model, loaded, docs, directory=Path(tmp))
        seconds = time.perf_counter() - start
        assert index.n_tokens == tokens.numel() - tokens.shape[0]
    return seconds


def theirs(model, loaded, tokens: torch.Tensor) -> float:
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import HookedSAETransformer

    hooked = HookedSAETransformer(model.cfg)
    hooked.load_state_dict(model.state_dict(), strict=False)
    hooked.set_tokenizer(model.tokenizer)
    sae = copy.deepcopy(loaded.sae)  # the runner folds the decoder norms into the SAE it is given
    cfg = SaeVisConfig(hook_point=loaded.hook_name, features=list(range(loaded.d_sae)), minibatch_size_features=256,
                       minibatch_size_tokens=64, device="cpu", verbose=False)
    start = time.perf_counter()
    SaeVisRunner(cfg).run(encoder=sae, model=hooked, tokens=tokens)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default="ce-circuits-3l-mlp-res2-relu")
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from core import saes
    from core.models import load_model

    loaded = saes.load_embedded(args.sae)
    model = load_model(loaded.card["model"])
    tokens = corpus_rows(model.tokenizer, loaded.card["corpus"], args.sequences, args.seq_len)
    n_tokens = tokens.numel() - tokens.shape[0]
    print(f"{args.sae} on {loaded.card['model']}: {loaded.d_sae} features, {tokens.shape[0]} × {tokens.shape[1]} tokens "
          f"({n_tokens:,} after BOS), torch threads {torch.get_num_threads()}, median of {args.repeats}")
    ours(model, loaded, tokens[:8])  # warm up
    a = [ours(model, loaded, tokens) for _ in range(args.repeats)]
    try:
        b = [theirs(model, loaded, tokens) for _ in range(args.repeats)]
    except ImportError as err:
        print(f"sae_dashboard is not importable ({err}); see this script's docstring.")
        b = []
    ta = statistics.median(a)
    print(f"ours (SQLite index)  {ta:7.2f} s  {n_tokens / ta:10,.0f} tokens/s  {loaded.d_sae / ta:8,.0f} features/s  runs {[round(x, 2) for x in a]}")
    if b:
        tb = statistics.median(b)
        print(f"sae_dashboard        {tb:7.2f} s  {n_tokens / tb:10,.0f} tokens/s  {loaded.d_sae / tb:8,.0f} features/s  "
              f"runs {[round(x, 2) for x in b]}")
        print(f"ratio: ours is {tb / ta:.1f}× faster")


if __name__ == "__main__":
    main()
