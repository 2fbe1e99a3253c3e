"""Every number the core computes, on seeded random models over TransformerLens's switches.

Modelled on how TransformerLens's own tests check the same things (`ActivationCache`'s
decompositions against the forward pass, `patching` against hand hooks, `head_detector` on
hand-made patterns) and on ARENA's chapter 1 tests (logit attribution adds up to the logit, the
logit lens's last layer is the model's prediction). The reference is TransformerLens's own
function where one exists, the model's own forward pass otherwise. The models have non-trivial
norm weights and biases (see `random_models`): LayerNorm / RMSNorm / none, folded and not,
standard / shortformer / rotary / ALiBi positions, attention-only, GQA, soft cap,
`use_attn_result`, left padding.
"""
import pytest
import torch
from random_models import SWITCHES, random_model, random_tokens, switch_params
from transformer_lens import patching as tlp

from core import attention, attribution, patching, store, tasks

ATOL = 1e-4


@pytest.fixture(scope="module", params=switch_params())
def switched(request):
    kw = dict(SWITCHES[request.param])
    return request.param, random_model(seed=3, **kw)


def _left_padded(model):
    """Prompts of different lengths, left-padded as TransformerLens pads them: [batch, pos]."""
    texts = ["the old king saw a green bird near the river", "a cat sat", "my friend ran to the big house"]
    tokens = store.to_tokens(model, texts, padding_side="left")
    assert (tokens[:, 0] == model.tokenizer.pad_token_id).any()  # really padded
    return tokens


def _tokens(name, model):
    return _left_padded(model) if name == "left-padded" else random_tokens(model, batch=3, pos=12)


# ---------------------------------------------------------------------------------------------
# Attribution: the parts add up to the (pre-cap) logit on every architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("difference", [True, False], ids=["logit-diff", "logit"])
def test_attribution_adds_up_on_every_architecture(switched, difference):
    name, model = switched
    tokens = _tokens(name, model)
    logits, cache = model.run_with_cache(tokens)
    answers, wrongs = torch.tensor([5, 9, 17]), (torch.tensor([8, 40, 6]) if difference else None)
    precap = attribution.precap_target(model, cache, answers, wrongs)
    cap = model.cfg.output_logits_soft_cap
    for fn in (attribution.by_component, attribution.by_head, attribution.accumulated):
        att = fn(model, cache, answers, wrongs)
        total = att.values[-1] + att.bias if fn is attribution.accumulated else att.total()
        torch.testing.assert_close(total, precap, atol=ATOL, rtol=0)
        assert att.softcap == (cap if cap > 0 else None), fn.__name__  # says when it is the pre-cap logit
    # The pre-cap logits, computed independently: the final residual stream through ln_final and W_U.
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid[:, None])[:, 0]
    raw = resid @ model.W_U + model.b_U  # [batch, d_vocab]
    idx = torch.arange(3)
    ref = raw[idx, answers] - (raw[idx, wrongs] if difference else 0)
    torch.testing.assert_close(precap, ref, atol=ATOL, rtol=0)
    if cap > 0:  # the model's logits are capped: the target read from them is the capped value
        capped = cap * torch.tanh(raw / cap)
        torch.testing.assert_close(attribution.target(model, logits, answers, wrongs),
                                   capped[idx, answers] - (capped[idx, wrongs] if difference else 0), atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(attribution.target(model, logits, answers, wrongs), precap, atol=ATOL, rtol=0)


def test_neurons_add_up_to_their_mlp_output(switched):
    """Each layer's neurons (`neuron_attribution`) plus its output bias (`neuron_bias`) add up to the
    layer's "mlp_out" bar, which `by_component` reads from the cached hook_mlp_out."""
    name, model = switched
    if not attribution.has_neurons(model):
        assert model.cfg.attn_only or model.cfg.num_experts  # no MLP, or experts instead of one neuron row
        return
    tokens = _tokens(name, model)
    _, cache = model.run_with_cache(tokens)
    answers, wrongs = torch.tensor([5, 9, 17]), torch.tensor([8, 40, 6])
    comp = attribution.by_component(model, cache, answers, wrongs)
    for layer in range(model.cfg.n_layers):
        total = (attribution.neuron_attribution(model, cache, layer, answers, wrongs).sum(0)
                 + attribution.neuron_bias(model, cache, layer, answers, wrongs))
        torch.testing.assert_close(total, comp.values[comp.labels.index(f"{layer}_mlp_out")], atol=ATOL, rtol=0)


def test_pos_embed_is_a_component_only_where_positions_enter_the_residual_stream(switched):
    name, model = switched
    _, cache = model.run_with_cache(_tokens(name, model))
    labels = attribution.by_component(model, cache, 5).labels
    head_labels = attribution.by_head(model, cache, 5).labels
    standard = model.cfg.positional_embedding_type == "standard"
    assert ("pos_embed" in labels) == standard and ("pos_embed" in head_labels) == standard


def test_shortformer_default_model_attribution_equals_its_logits(zoo_model):
    """The app's default model (shortformer): no invented position bar, totals equal the logit difference."""
    task = tasks.make_task("induction", zoo_model, n=8, seed=2)
    logits, cache = zoo_model.run_with_cache(task.clean_tokens)
    ref = attribution.target(zoo_model, logits, task.answers, task.wrongs)
    for fn in (attribution.by_component, attribution.by_head):
        att = fn(zoo_model, cache, task.answers, task.wrongs)
        assert "pos_embed" not in att.labels
        torch.testing.assert_close(att.total(), ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Logit lens: the last layer is the model's own prediction (soft cap and no final norm included)
# ---------------------------------------------------------------------------------------------


def test_logit_lens_last_layer_is_the_models_prediction(switched):
    name, model = switched
    tokens = _tokens(name, model)
    logits, cache = model.run_with_cache(tokens)
    for b in range(tokens.shape[0]):
        lens = attribution.logit_lens(model, cache, answer=7, k=3, batch_index=b)
        probs = logits[b].float().softmax(-1)
        top = probs.topk(3)
        assert torch.equal(lens.top_ids[-1, :, 0], top.indices[:, 0])
        torch.testing.assert_close(lens.top_probs[-1], top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(lens.answer_prob[-1], probs[:, 7], atol=1e-5, rtol=0)
        assert torch.equal(lens.answer_rank[-1], (logits[b] > logits[b, :, 7:8]).sum(-1))
        assert lens.labels[-1] == "final_post" and lens.top_ids.shape[0] == model.cfg.n_layers + 1


def test_logit_lens_on_a_model_without_a_final_norm_reads_w_u_directly():
    """normalization_type=None (ARENA's attention-only setting): no ln_final at all."""
    model = random_model(seed=4, normalization_type=None)
    assert not hasattr(model, "ln_final")
    _, cache = model.run_with_cache(random_tokens(model, batch=1, pos=8))
    lens = attribution.logit_lens(model, cache, answer=3, k=2)
    resid0 = cache["blocks.0.hook_resid_pre"][0]  # layer "0_pre": the embeddings
    ref = (resid0 @ model.W_U + model.b_U).softmax(-1)
    torch.testing.assert_close(lens.top_probs[0], ref.topk(2).values, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Answer / counterfactual shapes
# ---------------------------------------------------------------------------------------------


def test_answer_shapes_are_validated_not_flattened():
    model = random_model(seed=5)
    _, cache = model.run_with_cache(random_tokens(model, batch=3, pos=6))
    with pytest.raises(ValueError, match=r"counterfactual ids must be one id or one per prompt \(shape \[batch\]\); got shape \(3, 1\)"):
        attribution.by_component(model, cache, torch.tensor([1, 2, 3]), torch.tensor([[4], [5], [6]]))
    with pytest.raises(ValueError, match="2 counterfactual ids for 3 prompts"):
        attribution.by_head(model, cache, torch.tensor([1, 2, 3]), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="2 answer ids for 3 prompts"):
        attribution.target(model, torch.zeros(3, 6, model.cfg.d_vocab), torch.tensor([1, 2]))
    # One id for the whole batch, or one per prompt, still work.
    one = attribution.by_component(model, cache, 4, torch.tensor(7))
    per = attribution.by_component(model, cache, torch.tensor([4, 4, 4]), torch.tensor([7, 7, 7]))
    torch.testing.assert_close(one.values, per.values)


# ---------------------------------------------------------------------------------------------
# Patching: equal to transformer_lens.patching on every architecture, left padding included
# ---------------------------------------------------------------------------------------------


def _pair(name, model):
    """(clean tokens, corrupted tokens, answers, wrongs): one word changed, same padding."""
    if name == "left-padded":
        clean_texts = ["the old king saw a green bird near the river", "a cat sat", "my friend ran to the big house"]
        bad_texts = ["the old queen saw a green bird near the river", "a dog sat", "my mother ran to the big house"]
        clean = store.to_tokens(model, clean_texts, padding_side="left")
        corrupted = store.to_tokens(model, bad_texts, padding_side="left")
    else:
        clean = random_tokens(model, batch=2, pos=9, seed=6)
        corrupted = clean.clone()
        corrupted[:, 3] = random_tokens(model, batch=2, pos=9, seed=7)[:, 3]
    assert clean.shape == corrupted.shape
    n = clean.shape[0]
    return clean, corrupted, torch.tensor([11, 30, 12][:n]), torch.tensor([25, 9, 40][:n])


def _task(name, model):
    clean, corrupted, answers, wrongs = _pair(name, model)
    return tasks.Task("pair", "", "logit_diff", clean, corrupted, answers, wrongs, [], [])


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_sweeps_equal_transformer_lens(switched, direction):
    name, model = switched
    task = _task(name, model)
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean_tokens)
        _, corrupted = model.run_with_cache(task.corrupted_tokens)
    tokens, base, source = ((task.corrupted_tokens, corrupted, clean) if direction == "denoise"
                            else (task.clean_tokens, clean, corrupted))
    metric = task.metric
    checks = [("resid_pre", tlp.get_act_patch_resid_pre), ("attn_out", tlp.get_act_patch_attn_out),
              ("z", tlp.get_act_patch_attn_head_out_all_pos), ("z_by_pos", tlp.get_act_patch_attn_head_out_by_pos),
              ("v", tlp.get_act_patch_attn_head_v_all_pos), ("pattern", tlp.get_act_patch_attn_head_pattern_all_pos)]
    if not model.cfg.attn_only:
        checks.append(("mlp_out", tlp.get_act_patch_mlp_out))
    if model.cfg.n_key_value_heads:  # TL's k/v functions index query heads; ours the key/value heads
        checks = [c for c in checks if c[0] != "v"]
    moved = 0.0
    for key, fn in checks:
        with torch.no_grad():
            ref = fn(model, tokens, source, metric)
        ours = patching.run_sweep(model, key, tokens, base, source, metric)
        if key == "z_by_pos":
            ref = ref.reshape(ours.shape)  # TL: [layer, pos, head] here too
        torch.testing.assert_close(ours, ref.float(), atol=ATOL, rtol=0, msg=f"{name} {key}")
        with torch.no_grad():
            moved = max(moved, float((ref - metric(model(tokens))).abs().max()))
    assert moved > 1e-3  # the patches change the metric: not two constant grids


def test_left_padding_mask_is_what_transformer_lens_builds():
    model = random_model(seed=8, padding_side="left")
    tokens = _left_padded(model)
    with store.locked(model):
        mask = patching.padding_mask(model, tokens)
    assert mask is not None and int(mask.sum()) < mask.numel()
    assert torch.equal(mask[:, -1], torch.ones(tokens.shape[0], dtype=mask.dtype))  # the last position is real
    assert not patching.reuses_prefix(model)
    right = random_model(seed=8)
    with store.locked(right):
        assert patching.padding_mask(right, tokens) is None


def test_ablation_loss_leaves_padding_out_like_transformer_lens():
    model = random_model(seed=9, padding_side="left")
    tokens = _left_padded(model)
    logits, cache = model.run_with_cache(tokens)
    comps = patching.head_components(model)[:2]
    result = patching.ablate(model, tokens, cache, comps, lambda lg: lg[:, -1, 3].mean(), kind="zero")
    with torch.no_grad():
        assert result.clean_loss == pytest.approx(float(model(tokens, return_type="loss")), abs=1e-5)
    for c, loss in zip(comps, result.loss):
        def zero(z, hook, h=c.head):
            z = z.clone()
            z[:, :, h] = 0
            return z
        with torch.no_grad():
            ref = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(c.hook_name, zero)])
        assert float(loss) == pytest.approx(float(ref), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Head scores: a prompt without a repeated token still has previous-token scores
# ---------------------------------------------------------------------------------------------


def _patterns(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return attention.stacked_patterns(cache, model.cfg.n_layers)


def test_head_scores_without_a_repeated_token_report_no_target():
    model = random_model(seed=10)
    tokens = torch.arange(1, 11)[None] + 10  # ten different tokens: nothing repeats
    scores = attention.head_scores(model, tokens)
    assert scores["induction"] is None and scores["duplicate_token"] is None
    prev = scores["previous_token"]
    assert prev is not None and prev.shape == (model.cfg.n_layers, model.cfg.n_heads)
    # Hand computation: mean attention from each query to the token just before it.
    pat = _patterns(model, tokens)[0]  # [layer, head, q, k]
    ref = torch.stack([pat[..., q, q - 1] for q in range(1, 10)]).mean(0)
    torch.testing.assert_close(prev, ref, atol=1e-6, rtol=0)
    # TransformerLens's convention (every row, 0 without a target) is there as an option.
    tl = attention.head_scores(model, tokens, convention="all_rows")
    assert torch.equal(tl["induction"], torch.zeros_like(prev))


def test_head_score_conventions_against_transformer_lens_detect_head():
    from transformer_lens import head_detector as hd

    model = random_model(seed=11)
    half = random_tokens(model, batch=1, pos=8, seed=3)[0, 1:]
    tokens = torch.cat([torch.tensor([model.tokenizer.bos_token_id]), half, half])[None]
    pats = _patterns(model, tokens)
    _, cache = model.run_with_cache(tokens, remove_batch_dim=True)
    for kind in ("previous_token", "induction", "duplicate_token"):
        det = attention.detection_pattern(tokens[0], kind)
        # detect_head's own scoring function, per head (detect_head itself re-tokenises a string).
        ref = torch.tensor([
            [float(hd.compute_head_attention_similarity_score(cache["pattern", l][h], det, exclude_bos=False,
                                                              exclude_current_token=False, error_measure="mul"))
             for h in range(model.cfg.n_heads)] for l in range(model.cfg.n_layers)])
        tl = attention.head_scores_from_patterns(pats, tokens, kind, convention="all_rows")
        torch.testing.assert_close(tl, ref.float(), atol=1e-6, rtol=0)
        ours = attention.head_scores_from_patterns(pats, tokens, kind)
        rows = int((det.sum(-1) > 0).sum())
        torch.testing.assert_close(ours, ref.float() * tokens.shape[1] / rows, atol=1e-5, rtol=0)


def test_batch_head_score_is_the_mean_over_sequences_with_a_target():
    model = random_model(seed=12)
    half = random_tokens(model, batch=1, pos=6, seed=5)[0, 1:]
    bos = torch.tensor([model.tokenizer.bos_token_id])
    repeated = torch.cat([bos, half, half])
    plain = torch.cat([bos, torch.arange(20, 30)])  # same length, nothing repeats
    tokens = torch.stack([repeated, plain])
    pats = _patterns(model, tokens)
    both = attention.head_scores_from_patterns(pats, tokens, "induction")
    only = attention.head_scores_from_patterns(pats[:1], tokens[:1], "induction")
    torch.testing.assert_close(both, only)  # the sequence without a target does not count
    tl = attention.head_scores_from_patterns(pats, tokens, "induction", convention="all_rows")
    tl_one = attention.head_scores_from_patterns(pats[:1], tokens[:1], "induction", convention="all_rows")
    torch.testing.assert_close(tl, tl_one / 2)  # TL averages a 0 in
