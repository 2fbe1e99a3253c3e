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
3. Path patching (`core.path_patching`, batched: copies join at the sender's layer) of every
   sender head to the logits, against one plain `run_with_hooks` per sender (every other head's
   z frozen at its clean value, as ARENA writes it; 6 senders timed and scaled to 144), and to
   three receivers' queries.
4. With --auto-circuit: auto-circuit's EAP (`benchmarks/auto_circuit_ref.py`; install with
   `pip install --no-deps --target .bench-deps -r benchmarks/requirements-auto-circuit.txt`) on the
   same model and pair: largest difference from ours over every edge, and the time ratio (its
   one-time model wrapping reported separately).

Times are medians (min–max) of --repeats, taken round-robin so that a change of load on a shared
machine hits every contender alike (torch threads stated); every ratio is measured in the same run.
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


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Time each function `repeats` times, round-robin (so a change of machine load hits all of them
    alike), after one untimed warm-up call each: ({name: [seconds]}, {name: last result})."""
    times = {k: [] for k in fns}
    out = {k: f() for k, f in fns.items()}
    for _ in range(repeats):
        for k, f in fns.items():
            start = time.perf_counter()
            out[k] = f()
            times[k].append(time.perf_counter() - start)
    return times, out


def fmt(ts: list[float]) -> str:
    return f"{statistics.median(ts):.3f} s ({min(ts):.3f}–{max(ts):.3f})"


def ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}x"


def plain_path_to_logits(model, clean, clean_cache, corr_cache, metric, layer: int, head: int) -> float:
    """Path patching sender (layer, head) -> logits the plain way: one run_with_hooks."""
    def hook(z, hook):
        lay = int(hook.name.split(".")[1])
        z = clean_cache[hook.name].clone()
        if lay == layer:
            z[:, :, head] = corr_cache[hook.name][:, :, head]
        return z

    with torch.no_grad():
        return float(metric(model.run_with_hooks(clean, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), hook)])))


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

    fns = {"fb": forward_backward, "fbi": forward_backward_to_input, "eap": lambda: C.edge_attribution(model, runs)}
    t, out = interleaved(fns, args.repeats)
    eap, t_eap = out["eap"], statistics.median(t["eap"])
    print(f"\n1. EAP, every edge: {fmt(t['eap'])}; one forward + backward pass with every weight's gradient "
          f"{fmt(t['fb'])} (EAP / it: {ratio(t['eap'], t['fb'])}), with the input's gradient only {fmt(t['fbi'])} "
          f"(EAP / it: {ratio(t['eap'], t['fbi'])})")

    order = eap.order()[:args.top]
    pairs = [divmod(int(i), runs.graph.n_down) for i in order]
    t, out = interleaved({"exact": lambda: C.edge_patching(model, runs, pairs)}, max(1, args.repeats // 2))
    t_exact, exact = statistics.median(t["exact"]), out["exact"]
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
    print(f"2. exact patching of the top {len(pairs)} edges: ours {fmt(t['exact'])}; one hooked TL pass per edge "
          f"{t_ref:.2f} s ({len(sample)} timed, scaled); {t_ref / t_exact:.1f}x faster; "
          f"max |difference| {worst:.2e} over {len(sample)} edges")

    # 3. Path patching, every sender head -> logits and -> three receivers' queries, against one
    # plain run_with_hooks per sender (ARENA's way: every other head's z frozen at its clean value).
    from core import path_patching as pp

    _, clean_cache = model.run_with_cache(clean)
    _, corr_cache = model.run_with_cache(corrupted)
    receivers = [(9, 6), (9, 9), (10, 0)]
    t, out = interleaved({
        "logits": lambda: pp.path_patch_to_logits(model, clean, corrupted, metric, clean_cache, corr_cache),
        "q": lambda: pp.path_patch_to_heads(model, clean, corrupted, metric, receivers, "q", clean_cache, corr_cache),
    }, max(1, args.repeats // 2))
    senders = [(layer, head) for layer in (0, 4, 8) for head in (0, 6)]
    t0 = time.perf_counter()
    worst = 0.0
    for layer, head in senders:
        ref = plain_path_to_logits(model, clean, clean_cache, corr_cache, metric, layer, head)
        worst = max(worst, abs(ref - float(out["logits"][layer, head])))
    t_ref = (time.perf_counter() - t0) / len(senders) * model.cfg.n_layers * model.cfg.n_heads
    print(f"3. path patching, every head -> logits: ours {fmt(t['logits'])}; one plain hooked pass per sender "
          f"{t_ref:.1f} s ({len(senders)} timed, scaled to 144); {t_ref / statistics.median(t['logits']):.0f}x faster; "
          f"max |difference| {worst:.1e}. Every head -> the queries of L9H6, L9H9, L10H0: ours {fmt(t['q'])}")

    if args.auto_circuit:
        from benchmarks import auto_circuit_ref

        ac_scores, t_ac, t_wrap = auto_circuit_ref.timed_eap(model, clean, corrupted, torch.tensor([answer]),
                                                              torch.tensor([wrong]), repeats=args.repeats,
                                                              return_wrap_seconds=True)
        g = runs.graph
        diff = max(abs(v - float(eap.raw[g.up_index(u), g.down_index(d)])) for (u, d), v in ac_scores.items())
        print(f"4. auto-circuit EAP: {t_ac:.3f} s (+ {t_wrap:.2f} s wrapping the model once); ours {t_eap:.3f} s; "
              f"ours is {t_ac / t_eap:.2f}x its speed; {len(ac_scores)} edges, max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
