"""core.circuits: every number against an independent computation with TransformerLens's own hooks.

The references below run TL's forward pass with `use_split_qkv_input`, `use_attn_result` and
`use_hook_mlp_in` switched on (on a private copy of the model), read node outputs from
`hook_result` / `hook_mlp_out` / `blocks.0.hook_resid_pre`, and patch receivers at
`hook_{q,k,v}_input` / `hook_mlp_in` / the last block's `hook_resid_post`: one hooked run per edge
for exact patching, TL's backward hooks for EAP, one hooked run per interpolation step for
EAP-IG, and one hooked run per circuit for evaluation. None of it shares code with core.circuits.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from core import circuits as C
from core import store
from tests.random_models import SWITCHES, random_model, random_tokens, switch_params

TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def _flagged(model):
    m = copy.deepcopy(model)
    m.set_use_split_qkv_input(True)
    m.set_use_attn_result(True)
    if not m.cfg.attn_only:
        m.set_use_hook_mlp_in(True)
    return m


def _ref_outputs(m, tokens) -> dict[str, torch.Tensor]:
    """Node name -> [batch, pos, d_model] output, from TL's own cache."""
    _, cache = m.run_with_cache(tokens)
    out = {"embed": cache["blocks.0.hook_resid_pre"]}
    for layer in range(m.cfg.n_layers):
        for h in range(m.cfg.n_heads):
            out[f"L{layer}H{h}"] = cache[f"blocks.{layer}.attn.hook_result"][:, :, h]
        if not m.cfg.attn_only:
            out[f"L{layer} MLP"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return out


def _receiver(m, name: str) -> tuple[str, int | None]:
    """TL hook name and head index of a downstream node."""
    if name == "logits":
        return f"blocks.{m.cfg.n_layers - 1}.hook_resid_post", None
    if name.endswith(" MLP"):
        return f"blocks.{int(name[1:].split()[0])}.hook_mlp_in", None
    node, which = name.split(".")
    layer, head = node[1:].split("KV") if "KV" in node else node[1:].split("H")
    return f"blocks.{layer}.hook_{which}_input", int(head)


def _ref_edge(m, clean, outputs: tuple[dict, dict], metric, up: str, down: str) -> float:
    """M(clean) − M(clean with edge up → down patched), one hooked forward pass.
    outputs: (_ref_outputs of the clean run, of the corrupted run)."""
    delta = outputs[1][up] - outputs[0][up]
    name, head = _receiver(m, down)

    def hook(act, hook):
        act = act.clone()
        if head is None:
            act += delta
        else:
            act[:, :, head] += delta
        return act

    with torch.no_grad():
        base = metric(m(clean))
        patched = metric(m.run_with_hooks(clean, fwd_hooks=[(name, hook)]))
    return float(base - patched)


def _ref_grads(m, resid0: torch.Tensor, tokens, metric) -> dict[str, torch.Tensor]:
    """Downstream name -> gradient of the metric at its input, with blocks.0.hook_resid_pre set to resid0."""
    grads = {}
    names = {}
    graph = C.build_graph(m)
    for d in graph.downstream:
        names.setdefault(_receiver(m, d)[0], []).append(d)

    def save(grad, hook):
        grads[hook.name] = grad.detach().clone()

    resid0 = resid0.detach().clone().requires_grad_(True)

    def set_resid(act, hook):
        return resid0

    m.zero_grad(set_to_none=True)
    bwd = [(name, save) for name in names]
    with m.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", set_resid)], bwd_hooks=bwd), torch.enable_grad():
        metric(m(tokens)).backward()
    out = {}
    for d in graph.downstream:
        name, head = _receiver(m, d)
        out[d] = grads[name] if head is None else grads[name][:, :, head]
    return out


def _ref_eap(m, clean, corrupted, metric, steps: int | None = None) -> dict[tuple[str, str], float]:
    co, cr = _ref_outputs(m, clean), _ref_outputs(m, corrupted)
    graph = C.build_graph(m)
    if steps is None:
        grads = _ref_grads(m, co["embed"].clone(), clean, metric)
    else:
        total = None
        for j in range(1, steps + 1):
            resid0 = cr["embed"] + j / steps * (co["embed"] - cr["embed"])
            g = _ref_grads(m, resid0.clone(), clean, metric)
            total = g if total is None else {k: total[k] + g[k] for k in g}
        grads = {k: v / steps for k, v in total.items()}
    out = {}
    for u, d in graph.valid.nonzero().tolist():
        up, down = graph.upstream[u], graph.downstream[d]
        out[(up, down)] = float(((co[up] - cr[up]) * grads[down]).sum())
    return out


def _ref_evaluate(m, clean, corrupted, metric, keep: torch.Tensor) -> float:
    """The metric with every edge outside `keep` carrying its corrupted value, via TL hooks."""
    graph = C.build_graph(m)
    patch = _ref_outputs(m, corrupted)
    cur: dict[str, torch.Tensor] = {}
    hooks = [("blocks.0.hook_resid_pre", lambda act, hook: cur.__setitem__("embed", act.clone()))]
    for layer in range(m.cfg.n_layers):
        def save_heads(act, hook, layer=layer):
            for h in range(m.cfg.n_heads):
                cur[f"L{layer}H{h}"] = act[:, :, h].clone()
        hooks.append((f"blocks.{layer}.attn.hook_result", save_heads))
        if not m.cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_mlp_out",
                          lambda act, hook, layer=layer: cur.__setitem__(f"L{layer} MLP", act.clone())))
    by_hook: dict[str, list[str]] = {}
    for d in graph.downstream:
        by_hook.setdefault(_receiver(m, d)[0], []).append(d)
    for name, downs in by_hook.items():
        def patch_in(act, hook, downs=downs):
            act = act.clone()
            for d in downs:
                di = graph.down_index(d)
                _, head = _receiver(m, d)
                for u in range(graph.n_up):
                    if graph.valid[u, di] and not keep[u, di]:
                        up = graph.upstream[u]
                        change = cur[up] - patch[up]
                        if head is None:
                            act -= change
                        else:
                            act[:, :, head] -= change
            return act
        hooks.append((name, patch_in))
    with torch.no_grad():
        return float(metric(m.run_with_hooks(clean, fwd_hooks=hooks)))


# ---------------------------------------------------------------------------------------------
# Models and pairs
# ---------------------------------------------------------------------------------------------


def _model(name: str):
    kw = dict(SWITCHES[name])
    return random_model(seed=4, fold=kw.pop("fold", False), **kw)


def _pair(name, model):
    if name == "left-padded":
        clean = store.to_tokens(model, ["the old king saw a green bird near the river", "a cat sat"],
                                padding_side="left")
        corrupted = store.to_tokens(model, ["the old queen saw a green bird near the river", "a dog sat"],
                                    padding_side="left")
    else:
        clean = random_tokens(model, batch=2, pos=8, seed=6)
        corrupted = clean.clone()
        corrupted[:, 3] = random_tokens(model, batch=2, pos=8, seed=7)[:, 3]
        corrupted[:, 6] = random_tokens(model, batch=2, pos=8, seed=8)[:, 6]
    return clean, corrupted


def _metric(answer=11, wrong=25):
    return lambda logits: (logits[:, -1, answer] - logits[:, -1, wrong]).mean()


@pytest.fixture(scope="module", params=switch_params())
def case(request):
    model = _model(request.param)
    clean, corrupted = _pair(request.param, model)
    metric = _metric()
    runs = C.runs_from_tokens(model, clean, corrupted, metric)
    return request.param, model, clean, corrupted, metric, runs


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------


def test_graph_counts_every_edge_once():
    model = random_model(seed=1)  # 2 layers, 4 heads, MLPs
    g = C.build_graph(model)
    assert g.upstream[:6] == ("embed", "L0H0", "L0H1", "L0H2", "L0H3", "L0 MLP")
    assert g.downstream[:4] == ("L0H0.q", "L0H1.q", "L0H2.q", "L0H3.q") and g.downstream[-1] == "logits"
    # each layer's q/k/v inputs read the embeddings and every earlier layer's heads and MLP
    heads, layers = 4, 2
    per_layer_up = heads + 1
    expected = sum(3 * heads * (1 + per_layer_up * L) + (1 + per_layer_up * L + heads) for L in range(layers))
    expected += 1 + per_layer_up * layers  # the logits read everything
    assert g.n_edges == expected == 110
    assert not g.valid[g.up_index("L1H0"), g.down_index("L1H2.q")]  # same layer: no edge
    assert g.valid[g.up_index("L1H0"), g.down_index("L1 MLP")]  # a layer's MLP reads its heads


def test_graph_of_grouped_query_and_attention_only_models():
    g = C.build_graph(_model("gqa-rotary"))
    assert "L1KV1.k" in g.downstream and "L1H3.k" not in g.downstream
    g = C.build_graph(_model("shortformer-attn-only"))
    assert not any("MLP" in n for n in g.upstream) and g.n_edges == 81


@pytest.mark.parametrize("change", [{"parallel_attn_mlp": True}, {"num_experts": 4, "experts_per_token": 2}])
def test_models_the_graph_cannot_describe_are_refused(change):
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=20,
                                  act_fn="gelu", **change)

    class Stub:  # the graph reads only the config
        pass

    stub = Stub()
    stub.cfg = cfg
    with pytest.raises(C.CircuitError, match="parallel|mixture"):
        C.build_graph(stub)


# ---------------------------------------------------------------------------------------------
# Exactness on every switch
# ---------------------------------------------------------------------------------------------


def test_no_edge_patched_is_the_clean_run_and_every_edge_patched_the_corrupted_run(case):
    _, model, clean, corrupted, metric, runs = case
    g = runs.graph
    got = C.evaluate_masks(model, runs, torch.stack([g.valid, torch.zeros_like(g.valid)]))
    with torch.no_grad():
        assert float(got[0]) == pytest.approx(float(metric(model(clean))), abs=TOL)
        assert float(got[1]) == pytest.approx(float(metric(model(corrupted))), abs=TOL)


def test_exact_edge_patching_equals_one_hooked_run_per_edge(case):
    name, model, clean, corrupted, metric, runs = case
    ref_model = _flagged(model)
    scores = C.edge_patching(model, runs)
    g = runs.graph
    gen = torch.Generator().manual_seed(0)
    edges = g.valid.nonzero()
    sample = edges[torch.randperm(len(edges), generator=gen)[:10]].tolist()
    for kind in (".q", ".k", ".v", " MLP", "logits"):  # every kind of receiver, from a head and the embeddings
        ds = [d for d in range(g.n_down) if g.downstream[d].endswith(kind)]
        if ds:
            sample += [[g.up_index("embed"), ds[-1]], [g.n_up_before(int(g.down_stage[ds[-1]])) - 1, ds[-1]]]
    outputs = (_ref_outputs(ref_model, clean), _ref_outputs(ref_model, corrupted))
    for u, d in sample:
        ref = _ref_edge(ref_model, clean, outputs, metric, g.upstream[u], g.downstream[d])
        assert float(scores.raw[u, d]) == pytest.approx(ref, abs=TOL), (name, g.edge_name(u, d))
    assert torch.isnan(scores.raw[~g.valid]).all() and not torch.isnan(scores.raw[g.valid]).any()


def test_eap_equals_gradient_times_difference_with_tl_hooks(case):
    name, model, clean, corrupted, metric, runs = case
    ref = _ref_eap(_flagged(model), clean, corrupted, metric)
    got = C.edge_attribution(model, runs, "eap")
    g = runs.graph
    scale = max(abs(v) for v in ref.values())
    for (up, down), v in ref.items():
        assert float(got.raw[g.up_index(up), g.down_index(down)]) == pytest.approx(v, abs=1e-5 * max(1, scale)), \
            (name, up, down)
    assert not got.raw.requires_grad


@pytest.mark.parametrize("name", ["ln-standard", "rms-rotary", "shortformer-attn-only"])
def test_eap_ig_equals_the_average_gradient_over_interpolated_inputs(name):
    model = _model(name)
    clean, corrupted = _pair(name, model)
    metric = _metric()
    runs = C.runs_from_tokens(model, clean, corrupted, metric)
    ref = _ref_eap(_flagged(model), clean, corrupted, metric, steps=3)
    got = C.edge_attribution(model, runs, "eap-ig", steps=3)
    g = runs.graph
    for (up, down), v in ref.items():
        assert float(got.raw[g.up_index(up), g.down_index(down)]) == pytest.approx(v, abs=1e-5), (up, down)
    # one step with alpha = 1 is plain EAP
    one = C.edge_attribution(model, runs, "eap-ig", steps=1)
    eap = C.edge_attribution(model, runs, "eap")
    assert torch.allclose(one.raw.nan_to_num(), eap.raw.nan_to_num(), atol=1e-6)


def test_circuit_evaluation_equals_tl_hooks_with_edges_patched(case):
    name, model, clean, corrupted, metric, runs = case
    ref_model = _flagged(model)
    g = runs.graph
    gen = torch.Generator().manual_seed(1)
    keeps = torch.stack([(torch.rand(g.valid.shape, generator=gen) < p) & g.valid for p in (0.2, 0.5, 0.9)])
    got = C.evaluate_masks(model, runs, keeps)
    for k, v in zip(keeps, got.tolist()):
        assert v == pytest.approx(_ref_evaluate(ref_model, clean, corrupted, metric, k), abs=TOL), name


def test_mean_ablation_patches_the_mean_over_corrupted_prompts():
    model = _model("ln-standard")
    clean, corrupted = _pair("ln-standard", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric(), ablation="mean")
    ref = C.node_outputs(model, runs.graph, store.run_with_cache(model, corrupted)[1]).mean(0)
    assert torch.allclose(runs.patch[0], ref) and torch.allclose(runs.patch[1], ref)


# ---------------------------------------------------------------------------------------------
# Circuits: pruning, discovery, faithfulness, completeness, minimality, ACDC
# ---------------------------------------------------------------------------------------------


def test_pruning_keeps_only_paths_from_the_input_to_the_logits():
    g = C.build_graph(random_model(seed=1))
    keep = torch.zeros_like(g.valid)
    path = [("embed", "L0H1.k"), ("L0H1", "L1H2.q"), ("L1H2", "logits")]
    for u, d in path:
        keep[g.up_index(u), g.down_index(d)] = True
    dangling_in = ("L0H3", "L1 MLP")  # L0H3 has no input kept, and L1 MLP reaches no logits
    keep[g.up_index(dangling_in[0]), g.down_index(dangling_in[1])] = True
    no_exit = ("embed", "L0H0.v")  # L0H0 writes nowhere kept
    keep[g.up_index(no_exit[0]), g.down_index(no_exit[1])] = True
    pruned = C.prune(g, keep)
    assert {(g.upstream[u], g.downstream[d]) for u, d in pruned.nonzero().tolist()} == set(path)


def test_discovery_picks_the_top_edges_and_rejects_bad_n():
    model = _model("ln-standard")
    clean, corrupted = _pair("ln-standard", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric())
    scores = C.edge_patching(model, runs)
    full = C.discover(scores, n=runs.graph.n_edges)
    assert full.n_edges == runs.graph.n_edges  # every edge is on a path
    assert C.evaluate(model, runs, full).faithfulness[0] == pytest.approx(1.0, abs=1e-4)
    assert C.discover(scores, n=0).n_edges == 0
    with pytest.raises(C.CircuitError, match="edges"):
        C.discover(scores, n=runs.graph.n_edges + 1)
    with pytest.raises(C.CircuitError, match="one of them"):
        C.discover(scores)
    top = C.top_edges(scores, 5)
    kept = scores.values[top].abs()
    assert kept.min() >= scores.values[runs.graph.valid & ~top].abs().max()


def test_completeness_and_minimality_follow_their_definitions():
    model = _model("ln-standard")
    clean, corrupted = _pair("ln-standard", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric())
    scores = C.edge_patching(model, runs)
    circuit = C.discover(scores, n=30)
    ref_model = _flagged(model)
    comp = C.completeness(model, runs, circuit, sets=[(), ("L0H1",)])
    g = runs.graph
    for i, s in enumerate(comp.sets):
        c = C.knock_out(g, circuit.edges, s)
        f = C.knock_out(g, g.valid, s)
        assert float(comp.circuit_metric[i]) == pytest.approx(_ref_evaluate(ref_model, clean, corrupted, _metric(), c),
                                                              abs=TOL)
        assert float(comp.model_metric[i]) == pytest.approx(_ref_evaluate(ref_model, clean, corrupted, _metric(), f),
                                                            abs=TOL)
    # the whole model is complete: F(M \ K) − F(M \ K) = 0 for every K
    whole = C.Circuit(g, g.valid.clone(), scores, "all")
    assert C.completeness(model, runs, whole).score.abs().max() < 1e-5
    mini = C.minimality(model, runs, circuit)
    assert len(mini.sets) == len([n for n in circuit.nodes() if n not in ("embed", "logits")])
    base = float(C.evaluate(model, runs, circuit).metric[0])
    assert torch.allclose(mini.model_metric, torch.full_like(mini.model_metric, base), atol=1e-5)


def test_faithfulness_curve_ends_at_the_whole_model():
    model = _model("rms-rotary")
    clean, corrupted = _pair("rms-rotary", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric())
    scores = C.edge_attribution(model, runs)
    curve = C.faithfulness_curve(model, runs, scores)
    assert curve.requested[0] == 1 and curve.requested[-1] == runs.graph.n_edges
    assert float(curve.faithfulness[-1]) == pytest.approx(1.0, abs=1e-4)
    assert all(n <= r for n, r in zip(curve.n_edges, curve.requested))


def test_acdc_with_a_huge_threshold_removes_everything_and_with_a_negative_one_nothing():
    model = _model("no-norm")
    clean, corrupted = _pair("no-norm", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric())
    assert C.acdc(model, runs, threshold=1e9).n_edges == 0
    kept = C.acdc(model, runs, threshold=-1e9)
    assert kept.n_edges == runs.graph.n_edges


def test_circuit_json_is_plain_data():
    import json

    model = _model("ln-standard")
    clean, corrupted = _pair("ln-standard", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric())
    circuit = C.discover(C.edge_attribution(model, runs), n=10)
    data = C.circuit_json(circuit, "random", "pair", C.evaluate(model, runs, circuit))
    text = json.dumps(data)
    back = json.loads(text)
    assert back["n_edges"] == circuit.n_edges == len(back["edges"])
    assert {"from", "to", "score"} <= set(back["edges"][0])
    assert back["method"] == "eap" and 0 < back["n_edges"] <= 10


def test_a_task_without_matching_corrupted_prompts_is_refused(zoo_model):
    from dataclasses import replace

    from core.tasks import make_task

    task = make_task("induction", zoo_model, n=4)
    broken = replace(task, corrupted_tokens=task.corrupted_tokens[:, :-1])
    with pytest.raises(C.CircuitError, match="corrupted"):
        C.task_runs(zoo_model, broken)
    with pytest.raises(C.CircuitError, match="ablation"):
        C.task_runs(zoo_model, task, ablation="zero")


def test_threads_sharing_a_model_get_the_sequential_numbers(zoo_model):
    """EAP, exact patching, evaluation and tokenisation from several threads at once (the lock)."""
    from core.tasks import make_task

    task = make_task("induction", zoo_model, n=6, corruption="match")
    runs = C.task_runs(zoo_model, task)
    want_eap = C.edge_attribution(zoo_model, runs).raw
    keep = C.discover(C.edge_attribution(zoo_model, runs), n=12).edges
    want_eval = float(C.evaluate_masks(zoo_model, runs, keep)[0])
    want_tokens = store.to_tokens(zoo_model, "the cat sat")
    errors: list[str] = []

    def work(i):
        try:
            for _ in range(2):
                if i % 3 == 0:
                    got = C.edge_attribution(zoo_model, runs).raw
                    if not torch.allclose(got.nan_to_num(), want_eap.nan_to_num(), atol=1e-6):
                        errors.append("eap")
                elif i % 3 == 1:
                    if abs(float(C.evaluate_masks(zoo_model, runs, keep)[0]) - want_eval) > 1e-5:
                        errors.append("evaluate")
                else:
                    make_task("induction", zoo_model, n=3, seed=i)
                    if not torch.equal(store.to_tokens(zoo_model, "the cat sat"), want_tokens):
                        errors.append("tokens")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not zoo_model.cfg.use_split_qkv_input  # the switch is restored


@pytest.mark.parametrize("change", [{"use_qk_norm": True, "normalization_type": "RMS"}, {"clip_qkv": 0.5}],
                         ids=["qk-norm", "clip-qkv"])
def test_models_whose_keys_change_after_hook_k_start_from_position_0(change):
    """QK norm and clipping act after hook_k: the clean cache's keys are not the final ones, so
    patched copies cannot read the unchanged prefix from it (core.patching.reuses_prefix)."""
    model = random_model(seed=5, positional_embedding_type="rotary", **change)
    clean, corrupted = _pair("ln-standard", model)
    metric = _metric()
    runs = C.runs_from_tokens(model, clean, corrupted, metric)
    assert runs.start == 3  # the pair first differs at position 3
    ref_model = _flagged(model)
    g = runs.graph
    got = C.evaluate_masks(model, runs, torch.stack([g.valid, torch.zeros_like(g.valid)]))
    with torch.no_grad():
        assert float(got[0]) == pytest.approx(float(metric(model(clean))), abs=TOL)
        assert float(got[1]) == pytest.approx(float(metric(model(corrupted))), abs=TOL)
    scores = C.edge_patching(model, runs)
    outputs = (_ref_outputs(ref_model, clean), _ref_outputs(ref_model, corrupted))
    for up, down in [("embed", "L1H0.k"), ("L0H2", "L1H1.q"), ("L0 MLP", "L1H3.v"), ("L1H1", "logits")]:
        ref = _ref_edge(ref_model, clean, outputs, metric, up, down)
        assert float(scores.raw[g.up_index(up), g.down_index(down)]) == pytest.approx(ref, abs=TOL), (up, down)
    keep = (torch.rand(g.valid.shape, generator=torch.Generator().manual_seed(2)) < 0.5) & g.valid
    assert float(C.evaluate_masks(model, runs, keep)[0]) == pytest.approx(
        _ref_evaluate(ref_model, clean, corrupted, metric, keep), abs=TOL)


@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_pruning_never_changes_what_a_circuit_measures(ablation):
    """Pruned edges carry what they would carry ablated: under resample an unfed node outputs its
    corrupted value; under mean ablation it does not, so only the reaches-the-logits rule applies."""
    model = _model("ln-standard")
    clean, corrupted = _pair("ln-standard", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric(), ablation=ablation)
    g = runs.graph
    gen = torch.Generator().manual_seed(3)
    keeps = [(torch.rand(g.valid.shape, generator=gen) < p) & g.valid for p in (0.05, 0.15, 0.4)]
    keeps.append(torch.zeros_like(g.valid))
    for h in range(4):  # every head -> logits, nothing feeding them
        keeps[-1][g.up_index(f"L1H{h}"), g.down_index("logits")] = True
    pruned = [C.prune(g, k, feed=ablation == "resample") for k in keeps]
    before = C.evaluate_masks(model, runs, torch.stack(keeps))
    after = C.evaluate_masks(model, runs, torch.stack(pruned))
    assert torch.allclose(before, after, atol=1e-5), (before, after)
    circuit = C.discover(C.edge_patching(model, runs), n=10)
    assert circuit.edges.sum() <= 10


def test_unscored_edges_are_not_ranked_or_kept():
    model = _model("ln-standard")
    clean, corrupted = _pair("ln-standard", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric())
    g = runs.graph
    some = C.edge_patching(model, runs, edges=[(g.up_index("L0H1"), g.down_index("logits"))])
    assert some.rank("L0H1", "logits") == 1
    with pytest.raises(C.CircuitError, match="no score"):
        some.rank("L0H2", "logits")
    assert C.discover(some, threshold=0.0).n_edges <= 1  # NaN edges are not "above" a threshold
    with pytest.raises(C.CircuitError, match="No circuit"):
        C.evaluate_masks(model, runs, torch.zeros(0, g.n_up, g.n_down, dtype=torch.bool))


def test_eap_ig_under_mean_ablation_starts_from_the_mean_embeddings():
    """EAP-IG's path runs from the ablated embeddings to the clean ones, so with one step it is
    EAP and with many its sum approaches M(clean) − M(every input ablated)."""
    model = _model("no-norm")
    clean, corrupted = _pair("no-norm", model)
    runs = C.runs_from_tokens(model, clean, corrupted, _metric(), ablation="mean")
    one = C.edge_attribution(model, runs, "eap-ig", steps=1)
    eap = C.edge_attribution(model, runs, "eap")
    assert torch.allclose(one.raw.nan_to_num(), eap.raw.nan_to_num(), atol=1e-6)
    ig = C.edge_attribution(model, runs, "eap-ig", steps=16)
    embed_edges = ig.raw[0].nan_to_num().sum()  # every edge out of the embeddings: the whole input
    g = runs.graph
    only_embed_ablated = g.valid.clone()
    only_embed_ablated[0] = False
    drop = runs.clean - float(C.evaluate_masks(model, runs, only_embed_ablated)[0])
    assert float(embed_edges) == pytest.approx(drop, abs=0.05 * abs(drop) + 1e-4)
