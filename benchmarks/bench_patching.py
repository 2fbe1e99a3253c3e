"""Batched patching (core.patching) against TransformerLens's `patching` functions, timed in one run.

    python -m benchmarks.bench_patching --threads 2 --repeats 5

Model: a random GPT-2-small-shaped HookedTransformer (12 layers, d_model 768, 12 heads, d_mlp
3072, vocabulary 50257, learned positions; random weights cost the same time as real ones).
Prompts: a 15-token pair shaped like IOI's ("When Mary and John went to the store, John gave a
drink to" with BOS is 15 GPT-2 tokens, and the ABC corruption changes the second "John", at
position 10): random tokens, the corrupted copy differing at `--diff-at` (default 10). Our engine
also runs on a worst-case pair that differs at position 1, where it cannot skip unchanged
positions. Metric: a logit difference at the last position. Direction: denoising.

For each sweep: TL's time (one run unless --tl-repeats), our median of --repeats, the ratio, and
the largest absolute difference between the two results. TL's "every head activation by
position" sweep is 10,800 forward passes (over an hour here); `--tl-sample` times TL on a seeded
share of its components (TL's own `generic_activation_patch` with an index_df) and scales the
time to all of them, which is exact up to noise because each of TL's components costs one full
forward pass.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tlp

from core import patching

GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                  act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard")
QUICK = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=64, d_vocab=500,
             act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard")
N_POS = 15


def make_model(quick: bool) -> HookedTransformer:
    model = HookedTransformer(HookedTransformerConfig(**(QUICK if quick else GPT2_SMALL), seed=0))
    model.eval()
    return model


def make_pair(model: HookedTransformer, diff_at: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (1, N_POS), generator=g)
    corrupted = clean.clone()
    corrupted[0, diff_at] = (clean[0, diff_at] + 1) % model.cfg.d_vocab
    return clean, corrupted


def make_metric(model):
    answer, wrong = 11, 17

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    return metric


def _every_tl_sampled(model, corrupted, clean_cache, metric, share: float, seed: int = 0):
    """TL's five by-position head sweeps on a seeded share of their components: (seconds scaled to all, {act: (index_df, values)})."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    setters = {"z": tlp.layer_pos_head_vector_patch_setter, "q": tlp.layer_pos_head_vector_patch_setter,
               "k": tlp.layer_pos_head_vector_patch_setter, "v": tlp.layer_pos_head_vector_patch_setter,
               "pattern": tlp.layer_head_pos_pattern_patch_setter}
    total, seconds, samples = 0, 0.0, {}
    for act, setter in setters.items():
        cols = ["layer", "head_index", "dest_pos"] if act == "pattern" else ["layer", "pos", "head"]
        rows = [(l, h, p) if act == "pattern" else (l, p, h) for l in range(n_layers) for p in range(N_POS) for h in range(n_heads)]
        total += len(rows)
        df = pd.DataFrame(rows, columns=cols).sample(frac=share, random_state=seed).sort_index() if share < 1 else pd.DataFrame(rows, columns=cols)
        t0 = time.perf_counter()
        with torch.no_grad():
            values = tlp.generic_activation_patch(model, corrupted, clean_cache, metric, setter, act, index_df=df)
        seconds += time.perf_counter() - t0
        samples[act] = (df, values)
    n_sampled = sum(len(df) for df, _ in samples.values())
    return seconds * total / n_sampled, samples


def _ours_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def zoo_times(repeats: int) -> None:
    """The page's sweeps on the zoo task models: IOI (template when_went), 32 prompts."""
    from core import tasks
    from core.models import load_model

    print(f"zoo models, IOI when_went, 32 prompts; torch threads {torch.get_num_threads()}; medians of {repeats}")
    for name in ("ce-circuits-3l-attn", "ce-circuits-3l-mlp"):
        model = load_model(name)
        task = tasks.make_task("ioi", model, n=32, seed=0, template="when_went")
        with torch.no_grad():
            clean = model.run_with_cache(task.clean_tokens)[1]
            corrupted = model.run_with_cache(task.corrupted_tokens)[1]
        cells = []
        for key in ("z", "z_by_pos", "resid_pre"):  # noising, as the card's patching
            s, _ = _ours_time(lambda: patching.run_sweep(model, key, task.clean_tokens, clean, corrupted, task.metric), repeats)
            cells.append(f"{key} {s:.3f} s")
        s, _ = _ours_time(lambda: patching.every_head_act(model, task.corrupted_tokens, corrupted, clean, task.metric, by_pos=True), repeats)
        cells.append(f"every head activation by position (denoising) {s:.3f} s")
        print(f"{name} [{task.clean_tokens.shape[1]} tokens]: " + " | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of our sweeps (median reported)")
    parser.add_argument("--tl-repeats", type=int, default=1, help="repeats of TL's sweeps (median reported)")
    parser.add_argument("--tl-sample", type=float, default=0.2,
                        help="share of the components TL's every-activation-by-position sweep is timed on (1 = all)")
    parser.add_argument("--diff-at", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a tiny model (checks the script, not a benchmark)")
    parser.add_argument("--zoo", action="store_true", help="only time the page's sweeps on the zoo models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.zoo:
        zoo_times(args.repeats)
        return
    model = make_model(args.quick)
    metric = make_metric(model)
    pairs = {"IOI-like pair (differs at %d)" % args.diff_at: make_pair(model, args.diff_at),
             "worst case (differs at 1)": make_pair(model, 1)}
    caches = {}
    with torch.no_grad():
        for name, (clean, corrupted) in pairs.items():
            caches[name] = (model.run_with_cache(clean)[1], model.run_with_cache(corrupted)[1])
    print(f"model: {'quick' if args.quick else 'gpt2-small-shaped'} random weights; torch threads {torch.get_num_threads()}; "
          f"{N_POS} tokens; ours: median of {args.repeats}, TL: median of {args.tl_repeats}")
    sweeps = [
        ("heads, all positions", tlp.get_act_patch_attn_head_out_all_pos, lambda m, c, b, s: patching.run_sweep(m, "z", c, b, s, metric)),
        ("heads, by position", tlp.get_act_patch_attn_head_out_by_pos, lambda m, c, b, s: patching.run_sweep(m, "z_by_pos", c, b, s, metric)),
        ("resid_pre, by position", tlp.get_act_patch_resid_pre, lambda m, c, b, s: patching.run_sweep(m, "resid_pre", c, b, s, metric)),
        ("every head activation, by position", None, lambda m, c, b, s: patching.every_head_act(m, c, b, s, metric, by_pos=True)),
    ]
    first = next(iter(pairs))
    print(f"{'sweep':38s} {'TL passes':>9s} {'TL s':>9s} | " + " | ".join(f"{n}: ours s, ratio, max |diff|" for n in pairs))
    for label, tl_fn, ours_fn in sweeps:
        clean, corrupted = pairs[first]
        clean_cache, corrupted_cache = caches[first]
        if tl_fn is not None:
            tl_times, ref = [], None
            for _ in range(args.tl_repeats):
                t0 = time.perf_counter()
                with torch.no_grad():
                    ref = tl_fn(model, corrupted, clean_cache, metric)
                tl_times.append(time.perf_counter() - t0)
            tl_s = statistics.median(tl_times)
            passes = ref.numel()
        else:
            tl_s, samples = _every_tl_sampled(model, corrupted, clean_cache, metric, args.tl_sample)
            passes = 5 * model.cfg.n_layers * N_POS * model.cfg.n_heads
        cells = []
        for name, (clean, corrupted) in pairs.items():
            clean_cache, corrupted_cache = caches[name]
            ours_s, ours = _ours_time(lambda: ours_fn(model, corrupted, corrupted_cache, clean_cache), args.repeats)
            if name != first:
                cells.append(f"{ours_s:8.3f} {tl_s / ours_s:7.1f}x      (TL not rerun)")
                continue
            if tl_fn is not None:
                diff = float((ours - ref).abs().max())
            else:
                acts = patching.EVERY_HEAD_ACT
                diff = 0.0
                for a, (df, values) in samples.items():
                    grid = ours[acts.index(a)]  # [layer, pos, head]
                    for (_, row), v in zip(df.iterrows(), values):
                        l, x, y = (int(row.iloc[0]), int(row.iloc[1]), int(row.iloc[2]))
                        mine = grid[l, y, x] if a == "pattern" else grid[l, x, y]
                        diff = max(diff, abs(float(mine) - float(v)))
            cells.append(f"{ours_s:8.3f} {tl_s / ours_s:7.1f}x {diff:9.1e}")
        note = f" (TL timed on {args.tl_sample:.0%} of them)" if tl_fn is None and args.tl_sample < 1 else ""
        print(f"{label:38s} {passes:9d} {tl_s:9.2f} | " + " | ".join(cells) + note, flush=True)


if __name__ == "__main__":
    main()
