"""Edge attribution and exact edge patching (core.circuits) against their references, in one run.

    python -m benchmarks.bench_circuits --threads 2 --repeats 5
    python -m benchmarks.bench_circuits --auto-circuit      # also auto-circuit's EAP (see below)

Model: a random GPT-2-small-shaped HookedTransformer (12 layers, d_model 768, 12 heads, d_mlp 3072,
vocabulary 50257, learned positions, LayerNorm; random weights cost the same time as real ones;
LayerNorm weights and biases made non-trivial). Its circuit graph has 32,491 edges. Prompt pair:
15 random tokens shaped like an IOI prompt with BOS ("When Mary and John went to the store, John
gave a drink to" is 15 GPT-2 tokens), the corrupted copy differing at position 10 (where ABC's
third name is). Metric: logit difference at the last position.

Rows:
1. EAP over every edge (`circuits.edge_attribution`: one forward pass with the per-head inputs
   split out, one backward pass, one matrix product) against ONE plain forward + backward pass of
   the same model and metric (`model(tokens)`, `.backward()`): the ratio is what EAP costs on top
   of the gradient it needs.
2. Exact patching of the 200 edges EAP ranks highest (`circuits.edge_patching`, batched, copies
   start at the receiver's layer and at the first position that differs) against one hooked
   TransformerLens forward pass per edge (the ACDC-style ground truth written plainly:
   `run_with_hooks` adding the sender's corrupted − clean output to the receiver's
   `hook_{q,k,v}_input` / `hook_mlp_in` / final residual stream; `--ref-edges` of them timed and
   scaled to 200, each costing one full forward pass), and the largest difference between the two.
3. With --auto-circuit: auto-circuit's EAP (`benchmarks/auto_circuit_ref.py`; install with
   `pip install --no-deps --target .bench-deps -r benchmarks/requirements-auto-circuit.txt`) on the
   same model and pair: largest difference from ours over every edge, and the time ratio (its
   one-time model wrapping reported separately).

Times are medians of --repeats (torch threads stated); every ratio is measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core import circuits as C


def gpt2_small_shaped(seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=seed)
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") and ("ln" in name):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.rsplit(".", 1)[-1].startswith("b"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def pair(seed: int = 1, length: int = 15, diff_at: int = 10):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 50257, (1, length), generator=gen)
    clean[0, 0] = 50256  # BOS
    corrupted = clean.clone()
    corrupted[0, diff_at] = (clean[0, diff_at] + 1) % 50257
    answer, wrong = int(clean[0, 3]), int(clean[0, 5])
    return clean, corrupted, answer, wrong


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def reference_edge(model, clean, co, cr, metric, up: str, down: str) -> float:
    """M(clean) − M(edge patched): one hooked TL forward pass (model has the split flags on)."""
    delta = cr[up] - co[up]
    cfg = model.cfg
    if down == "logits":
        name, head = f"blocks.{cfg.n_layers - 1}.hook_resid_post", None
    elif down.endswith(" MLP"):
        name, head = f"blocks.{int(down[1:].split()[0])}.hook_mlp_in", None
    else:
        node, which = down.split(".")
        layer, h = node[1:].split("H")
        name, head = f"blocks.{layer}.hook_{which}_input", int(h)

    def hook(act, hook):
        act = act.clone()
        if head is None:
            act += delta
        else:
            act[:, :, head] += delta
        return act

    with torch.no_grad():
        return float(metric(model.run_with_hooks(clean, fwd_hooks=[(name, hook)])))


def outputs(model, tokens) -> dict:
    _, cache = model.run_with_cache(tokens)
    out = {"embed": cache["blocks.0.hook_resid_pre"]}
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            out[f"L{layer}H{h}"] = cache[f"blocks.{layer}.attn.hook_result"][:, :, h]
        out[f"L{layer} MLP"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=200)
    parser.add_argument("--ref-edges", type=int, default=40, help="edges the one-pass-per-edge reference times")
    parser.add_argument("--auto-circuit", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats} (medians)")

    model = gpt2_small_shaped()
    clean, corrupted, answer, wrong = pair()
    metric = lambda logits: (logits[:, -1, answer] - logits[:, -1, wrong]).mean()  # noqa: E731
    runs = C.runs_from_tokens(model, clean, corrupted, metric)
    print(f"model: GPT-2-small shape, {runs.graph.n_edges} edges; pair: {clean.shape[1]} tokens, differing at 10")

    def forward_backward():
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            metric(model(clean)).backward()
        model.zero_grad(set_to_none=True)

    def forward_backward_to_input():
        leaf = {}

        def make_leaf(act, hook):
            leaf["x"] = act.detach().requires_grad_(True)
            return leaf["x"]

        with torch.enable_grad(), model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", make_leaf)]):
            out = metric(model(clean))
            torch.autograd.grad(out, leaf["x"])

    median_time(forward_backward, 1)  # warm-up
    t_fb, _ = median_time(forward_backward, args.repeats)
    t_fbi, _ = median_time(forward_backward_to_input, args.repeats)
    C.edge_attribution(model, runs)  # warm-up
    t_eap, eap = median_time(lambda: C.edge_attribution(model, runs), args.repeats)
    print(f"\n1. EAP, every edge: {t_eap:.3f} s; one forward + backward pass: {t_fb:.3f} s with every weight's "
          f"gradient (ratio {t_eap / t_fb:.2f}x), {t_fbi:.3f} s with the input's gradient only "
          f"(ratio {t_eap / t_fbi:.2f}x)")

    order = eap.order()[:args.top]
    pairs = [divmod(int(i), runs.graph.n_down) for i in order]
    t_exact, exact = median_time(lambda: C.edge_patching(model, runs, pairs), max(1, args.repeats // 2))
    flagged = gpt2_small_shaped()
    flagged.set_use_split_qkv_input(True)
    flagged.set_use_attn_result(True)
    flagged.set_use_hook_mlp_in(True)
    co, cr = outputs(flagged, clean), outputs(flagged, corrupted)
    sample = pairs[:: max(1, len(pairs) // args.ref_edges)][:args.ref_edges]
    base = float(metric(flagged(clean)))
    t0 = time.perf_counter()
    worst = 0.0
    for u, d in sample:
        ref = base - reference_edge(flagged, clean, co, cr, metric, runs.graph.upstream[u], runs.graph.downstream[d])
        worst = max(worst, abs(ref - float(exact.raw[u, d])))
    t_ref = (time.perf_counter() - t0) / len(sample) * len(pairs)
    print(f"2. exact patching of the top {len(pairs)} edges: ours {t_exact:.3f} s; one hooked TL pass per edge "
          f"{t_ref:.2f} s ({len(sample)} timed, scaled); {t_ref / t_exact:.1f}x faster; "
          f"max |difference| {worst:.2e} over {len(sample)} edges")

    if args.auto_circuit:
        from benchmarks import auto_circuit_ref

        ac_scores, t_ac, t_wrap = auto_circuit_ref.timed_eap(model, clean, corrupted, torch.tensor([answer]),
                                                              torch.tensor([wrong]), repeats=args.repeats,
                                                              return_wrap_seconds=True)
        g = runs.graph
        diff = max(abs(v - float(eap.raw[g.up_index(u), g.down_index(d)])) for (u, d), v in ac_scores.items())
        print(f"3. auto-circuit EAP: {t_ac:.3f} s (+ {t_wrap:.2f} s wrapping the model once); ours {t_eap:.3f} s; "
              f"ours is {t_ac / t_eap:.2f}x its speed; {len(ac_scores)} edges, max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
