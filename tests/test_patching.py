"""The batched patching engine against TransformerLens's own `patching` functions and hand hooks."""
import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tlp

from core import patching, tasks
from core.models import load_model


@pytest.fixture(scope="module")
def attn_model():
    return load_model("ce-circuits-3l-attn")


@pytest.fixture(scope="module")
def mlp_model():
    return load_model("ce-circuits-3l-mlp")


def _random_model(tokenizer, **kw) -> HookedTransformer:
    """A small random model with learned absolute positions and GELU MLPs (GPT-2's layout)."""
    cfg = dict(n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=64, d_vocab=len(tokenizer),
               act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", seed=3)
    cfg.update(kw)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    model.tokenizer = tokenizer
    model.eval()
    return model


def _runs(model, task):
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean_tokens)
        _, corrupted = model.run_with_cache(task.corrupted_tokens)
    return clean, corrupted


def _tl_every(model, tokens, source, metric):
    with torch.no_grad():
        heads_all = tlp.get_act_patch_attn_head_all_pos_every(model, tokens, source, metric)
        heads_pos = tlp.get_act_patch_attn_head_by_pos_every(model, tokens, source, metric)
        blocks = None if model.cfg.attn_only else tlp.get_act_patch_block_every(model, tokens, source, metric)
    return heads_all, heads_pos, blocks


def _check_every(model, task, direction):
    clean, corrupted = _runs(model, task)
    if direction == "denoise":
        tokens, base, source = task.corrupted_tokens, corrupted, clean
    else:
        tokens, base, source = task.clean_tokens, clean, corrupted
    ref_all, ref_pos, ref_blocks = _tl_every(model, tokens, source, task.metric)
    ours_all = patching.every_head_act(model, tokens, base, source, task.metric, by_pos=False)
    ours_pos = patching.every_head_act(model, tokens, base, source, task.metric, by_pos=True)
    assert ours_all.shape == ref_all.shape and ours_pos.shape == ref_pos.shape
    assert torch.allclose(ours_all, ref_all, atol=1e-4, rtol=0)
    assert torch.allclose(ours_pos, ref_pos, atol=1e-4, rtol=0)
    if ref_blocks is not None:
        ours_blocks = patching.block_every(model, tokens, base, source, task.metric)
        assert torch.allclose(ours_blocks, ref_blocks, atol=1e-4, rtol=0)
    else:  # attention-only: resid_pre and attn_out, one TL function each
        with torch.no_grad():
            for key, fn in (("resid_pre", tlp.get_act_patch_resid_pre), ("attn_out", tlp.get_act_patch_attn_out)):
                ref = fn(model, tokens, source, task.metric)
                assert torch.allclose(patching.run_sweep(model, key, tokens, base, source, task.metric), ref, atol=1e-4, rtol=0)
    # The patches move the metric: the comparison is not between two constant grids.
    assert float(ours_pos.abs().max()) > 0


@pytest.mark.slow  # every sweep against TL's one-pass-per-component functions
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_sweep_equals_transformer_lens_on_the_attention_only_zoo_model(attn_model, direction):
    """Rotary positions, no MLPs: every head activation all positions and by position, resid_pre, attn_out."""
    _check_every(attn_model, tasks.make_task("ioi", attn_model, n=3, seed=5), direction)


@pytest.mark.slow  # every sweep against TL's one-pass-per-component functions
def test_every_sweep_equals_transformer_lens_on_the_mlp_zoo_model(mlp_model):
    """Probability-difference metric (greater-than) on the zoo model with MLPs; mlp_out too."""
    _check_every(mlp_model, tasks.make_task("greater_than", mlp_model, n=2, seed=3), "denoise")


@pytest.mark.slow  # every sweep against TL's one-pass-per-component functions
def test_every_sweep_equals_transformer_lens_on_a_random_gpt2_layout_model(attn_model):
    """Learned absolute positions, LayerNorm, gelu_new MLPs: GPT-2's layout with random weights."""
    model = _random_model(attn_model.tokenizer)
    _check_every(model, tasks.make_task("ioi", attn_model, n=2, seed=9), "noise")


@pytest.mark.slow  # every sweep against TL's one-pass-per-component functions
def test_grouped_query_attention_keys_and_values(attn_model):
    """Two key/value heads for four query heads: k/v sweeps have two heads, padded as TL pads them."""
    model = _random_model(attn_model.tokenizer, n_key_value_heads=2, positional_embedding_type="rotary",
                          rotary_dim=16, attn_only=True, d_mlp=None, act_fn=None)
    task = tasks.make_task("ioi", attn_model, n=2, seed=4)
    _check_every(model, task, "denoise")


@pytest.mark.slow  # every sweep against TL's one-pass-per-component functions
@pytest.mark.parametrize("extra", [{"use_qk_norm": True}, {"clip_qkv": 0.5}], ids=["qk_norm", "clip_qkv"])
def test_models_whose_keys_change_after_their_hook_patch_from_position_0(attn_model, extra):
    """QK norm and clipping act after hook_k/hook_v: the engine must not reuse cached keys there."""
    model = _random_model(attn_model.tokenizer, positional_embedding_type="rotary", rotary_dim=16,
                          normalization_type="RMS", **extra)
    assert not patching.reuses_prefix(model)
    _check_every(model, tasks.make_task("ioi", attn_model, n=2, seed=8), "denoise")


@pytest.mark.slow  # every sweep against TL's one-pass-per-component functions
def test_shortformer_induction_model(attn_model):
    """ce-induction-2l adds positions to queries and keys only (shortformer)."""
    model = load_model("ce-induction-2l")
    task = tasks.make_task("induction", model, n=3, seed=1)
    _check_every(model, task, "denoise")


def test_chunking_and_progress_do_not_change_numbers(attn_model):
    task = tasks.make_task("ioi", attn_model, n=4, seed=2)
    clean, corrupted = _runs(attn_model, task)
    seen = []
    whole = patching.run_sweep(attn_model, "z_by_pos", task.corrupted_tokens, corrupted, clean, task.metric)
    small = patching.run_sweep(attn_model, "z_by_pos", task.corrupted_tokens, corrupted, clean, task.metric,
                               progress=seen.append, max_tokens=50)
    assert torch.allclose(whole, small, atol=1e-5, rtol=0)
    assert len(seen) > 10 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_patches_that_write_what_is_there_are_not_run(attn_model, monkeypatch):
    """Before the first position where the prompts differ, clean and corrupted activations are
    equal: those by-position patches are skipped and give the corrupted metric; patching a whole
    layer's input gives the clean metric."""
    task = tasks.make_task("ioi", attn_model, n=4, seed=2)
    clean, corrupted = _runs(attn_model, task)
    differ = int((task.clean_tokens != task.corrupted_tokens).any(0).nonzero()[0])
    ran = []
    real = patching._run_chunk
    monkeypatch.setattr(patching, "_run_chunk", lambda *a: ran.extend(a[4]) or real(*a))
    comps = [patching.Component("resid_pre", layer, pos) for layer in range(attn_model.cfg.n_layers)
             for pos in range(task.clean_tokens.shape[1])]
    comps += [patching.Component("resid_pre", layer) for layer in range(attn_model.cfg.n_layers)]
    values = patching.patch_components(attn_model, task.corrupted_tokens, corrupted, patching.cache_source(clean),
                                       comps, task.metric)
    base = tasks.baselines(attn_model, task)
    early = [v for c, v in zip(comps, values) if c.pos is not None and c.pos < differ]
    assert early and all(v == pytest.approx(base.corrupted, abs=1e-5) for v in early)
    assert all(c.pos is None or c.pos >= differ for c in ran)
    assert values[-3:].tolist() == pytest.approx([base.clean] * 3, abs=1e-4)


def test_bad_requests_get_messages(attn_model, mlp_model):
    task = tasks.make_task("ioi", attn_model, n=2, seed=2)
    clean, corrupted = _runs(attn_model, task)
    with pytest.raises(patching.PatchingError, match="no MLP"):
        patching.run_sweep(attn_model, "mlp_out", task.corrupted_tokens, corrupted, clean, task.metric)
    with pytest.raises(patching.PatchingError, match="outside the prompt"):
        patching.patch_components(attn_model, task.corrupted_tokens, corrupted, patching.cache_source(clean),
                                  [patching.Component("resid_pre", 0, 99)], task.metric)
    with pytest.raises(patching.PatchingError, match="needs a head"):
        patching.patch_components(attn_model, task.corrupted_tokens, corrupted, patching.cache_source(clean),
                                  [patching.Component("z", 0, None)], task.metric)
    with pytest.raises(patching.PatchingError, match="outside the layer"):
        patching.patch_components(attn_model, task.corrupted_tokens, corrupted, patching.cache_source(clean),
                                  [patching.Component("z", 0, None, 7)], task.metric)
    with pytest.raises(patching.PatchingError, match="two prompts"):
        patching.derangement(1)


# ---------------------------------------------------------------------------------------------
# Ablation
# ---------------------------------------------------------------------------------------------


def _hand_ablation(model, tokens, name, index, value_fn):
    """Metric logits and loss with one activation replaced by a hand hook."""
    def hook(act, hook):
        act[index] = value_fn(act)[index]
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
        loss = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)], return_type="loss")
    return logits, float(loss)


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_head_ablation_matches_a_hand_hook(attn_model, kind):
    task = tasks.make_task("ioi", attn_model, n=6, seed=1)
    tokens = task.clean_tokens
    with torch.no_grad():
        _, cache = attn_model.run_with_cache(tokens)
    comps = patching.head_components(attn_model)
    result = patching.ablate(attn_model, tokens, cache, comps, task.metric, kind=kind, seed=3)
    perm = patching.derangement(len(task), 3)
    for layer, head in [(0, 2), (1, 3), (2, 0)]:
        value = {"zero": torch.zeros_like, "mean": lambda a: a.mean(0, keepdim=True).expand_as(a).clone(),
                 "resample": lambda a: a[perm].clone()}[kind]
        logits, loss = _hand_ablation(attn_model, tokens, f"blocks.{layer}.attn.hook_z", (slice(None), slice(None), head), value)
        i = comps.index(patching.Component("z", layer, None, head))
        assert float(result.metric[i]) == pytest.approx(float(task.metric(logits)), abs=1e-4)
        assert float(result.loss[i]) == pytest.approx(loss, abs=1e-4)
    with torch.no_grad():
        assert result.clean_loss == pytest.approx(float(attn_model(tokens, return_type="loss")), abs=1e-5)


def test_mlp_and_neuron_ablation_match_hand_hooks(mlp_model):
    task = tasks.make_task("sva", mlp_model, n=6, seed=1)
    tokens = task.clean_tokens
    with torch.no_grad():
        _, cache = mlp_model.run_with_cache(tokens)
    mlps = patching.ablate(mlp_model, tokens, cache, patching.mlp_components(mlp_model), task.metric, kind="mean")
    logits, loss = _hand_ablation(mlp_model, tokens, "blocks.0.hook_mlp_out", (slice(None),),
                                  lambda a: a.mean(0, keepdim=True).expand_as(a).clone())
    assert float(mlps.metric[0]) == pytest.approx(float(task.metric(logits)), abs=1e-4)
    assert float(mlps.loss[0]) == pytest.approx(loss, abs=1e-4)
    neurons = patching.ablate(mlp_model, tokens, cache, patching.neuron_components(mlp_model, 1), task.metric, kind="zero")
    assert neurons.metric.shape == (mlp_model.cfg.d_mlp,)
    for n in (0, 77, mlp_model.cfg.d_mlp - 1):
        logits, loss = _hand_ablation(mlp_model, tokens, "blocks.1.mlp.hook_post", (slice(None), slice(None), n), torch.zeros_like)
        assert float(neurons.metric[n]) == pytest.approx(float(task.metric(logits)), abs=1e-4)
        assert float(neurons.loss[n]) == pytest.approx(loss, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Attribution patching
# ---------------------------------------------------------------------------------------------


def _hand_attribution(model, task, act_name):
    """Backward hooks (the attribution-patching notebook's way): grads at the corrupted run."""
    acts, grads = {}, {}

    def fwd(act, hook):
        acts[hook.name] = act.detach().clone()

    def bwd(grad, hook):
        grads[hook.name] = grad.detach().clone()

    names = lambda n: n.endswith(act_name)  # noqa: E731
    model.reset_hooks()
    model.add_hook(names, fwd, "fwd")
    model.add_hook(names, bwd, "bwd")
    try:
        value = task.metric(model(task.corrupted_tokens))
        value.backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean_tokens)
    return float(value.detach()), {n: (clean[n] - acts[n]) * grads[n] for n in acts}


def test_attribution_patching_equals_backward_hooks(attn_model):
    task = tasks.make_task("ioi", attn_model, n=4, seed=6)
    with torch.no_grad():
        _, clean = attn_model.run_with_cache(task.clean_tokens)
    base, parts = _hand_attribution(attn_model, task, "hook_z")
    ours = patching.attribution_patch(attn_model, "z_by_pos", task.corrupted_tokens, clean, task.metric)
    for layer in range(attn_model.cfg.n_layers):
        hand = parts[f"blocks.{layer}.attn.hook_z"].sum(dim=(0, 3))  # [pos, head]
        assert torch.allclose(ours[layer] - base, hand, atol=1e-5)
    all_pos = patching.attribution_patch(attn_model, "z", task.corrupted_tokens, clean, task.metric)
    assert torch.allclose(all_pos - base, (ours - base).sum(1), atol=1e-4)
    base2, parts2 = _hand_attribution(attn_model, task, "hook_pattern")
    pat = patching.attribution_patch(attn_model, "pattern_by_pos", task.corrupted_tokens, clean, task.metric)
    hand = parts2["blocks.1.attn.hook_pattern"].sum(dim=(0, 3)).T  # [dest, head]
    assert torch.allclose(pat[1] - base2, hand, atol=1e-5)


def test_attribution_patching_tracks_exact_patching_on_ioi(attn_model):
    """The linear estimate correlates with exact patching of head outputs on the zoo IOI task."""
    task = tasks.make_task("ioi", attn_model, n=16, seed=0)
    clean, corrupted = _runs(attn_model, task)
    exact = patching.run_sweep(attn_model, "z", task.corrupted_tokens, corrupted, clean, task.metric)
    approx = patching.attribution_patch(attn_model, "z", task.corrupted_tokens, clean, task.metric)
    corr = torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1]
    assert float(corr) > 0.8


def test_sweep_task_is_the_labelled_sweep_of_transformer_lens(attn_model):
    """The notebook API: one call gives TL's numbers, normalised, with axis labels; a figure draws them."""
    from core import plots

    task = tasks.make_task("ioi", attn_model, n=4, seed=3, template="when_went")
    result = patching.sweep_task(attn_model, task, "z", direction="noise")
    with torch.no_grad():
        _, corrupted = attn_model.run_with_cache(task.corrupted_tokens)
        ref = tlp.get_act_patch_attn_head_out_all_pos(attn_model, task.clean_tokens, corrupted, task.metric)
        clean_m = float(task.metric(attn_model(task.clean_tokens)))
        corrupted_m = float(task.metric(attn_model(task.corrupted_tokens)))
    torch.testing.assert_close(result.raw, ref, atol=1e-4, rtol=0)
    assert result.normalised and result.baseline == 1.0
    torch.testing.assert_close(result.values, (ref - corrupted_m) / (clean_m - corrupted_m), atol=1e-4, rtol=0)
    assert result.dims == ("layer", "head") and result.labels == (("L0", "L1", "L2"), ("H0", "H1", "H2", "H3"))
    fig = plots.figure(result)
    np.testing.assert_allclose(np.array(fig.data[0].z), result.values.numpy(), atol=1e-6)
    assert list(fig.data[0].x) == ["H0", "H1", "H2", "H3"] and fig.layout.title.text == result.title
    # By position: labelled with the example's tokens; rows are heads, as the page draws them.
    by_pos = patching.sweep_task(attn_model, task, "resid_pre", direction="denoise")
    words = [attn_model.tokenizer.decode([int(t)]) for t in task.clean_tokens[0]]
    assert by_pos.dims == ("layer", "pos") and by_pos.labels[1] == tuple(f"{p}: {w}" for p, w in enumerate(words))
    with pytest.raises(patching.PatchingError, match="Unknown direction"):
        patching.sweep_task(attn_model, task, "z", direction="sideways")


def test_chunk_sizes_follow_the_devices_free_memory(zoo_model, monkeypatch):
    """Rows × positions per patched pass: a share of the free memory over one token's bytes,
    clamped; a sweep chunked small (little memory) equals one chunked large."""
    from core import checkpoints

    model = zoo_model
    per = patching.token_bytes(model, 12)
    assert per > 2 * 4 * model.cfg.d_model  # at least a residual stream copy, float32
    sizes = {}
    for free in (10**3, 10**7, 10**8, 10**12, None):
        monkeypatch.setattr(checkpoints, "available_bytes", lambda device, free=free: free)
        sizes[free] = patching.chunk_tokens(model, 12)
    assert sizes[10**3] == patching.MIN_TOKENS  # never below the floor
    assert sizes[10**12] == sizes[None] == patching.CPU_MAX_TOKENS  # a CPU's cap (unknown memory: the cap)
    assert sizes[10**7] == max(patching.MIN_TOKENS, int(patching.MEMORY_SHARE * 10**7 // per))
    assert sizes[10**3] <= sizes[10**7] <= sizes[10**8] <= sizes[10**12]
    tokens = model.to_tokens(["the cat sat on the mat and the dog ran", "a red bird saw a green bird and a cat"])
    corrupted = tokens.flip(0)
    _, clean_cache = model.run_with_cache(tokens)
    _, corr_cache = model.run_with_cache(corrupted)

    def metric(logits):
        return logits[:, -1, 5].mean() - logits[:, -1, 9].mean()

    results = []
    for free in (10**3, 10**12):  # 256 tokens a pass (one copy of 2 × 11 positions) vs everything at once
        monkeypatch.setattr(checkpoints, "available_bytes", lambda device, free=free: free)
        results.append(patching.run_sweep(model, "z_by_pos", corrupted, corr_cache, clean_cache, metric))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)
