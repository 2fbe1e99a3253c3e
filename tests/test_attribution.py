"""core/attribution.py against TransformerLens's own functions and a plain forward pass."""
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core import attribution, tasks
from core.models import load_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def attn_lm():
    return load_model("ce-circuits-3l-attn")


@pytest.fixture(scope="module")
def mlp_lm():
    return load_model("ce-circuits-3l-mlp")


@pytest.fixture(scope="module")
def folded_mlp_lm():
    """The MLP zoo model with its LayerNorms folded as TransformerLens folds pretrained models."""
    model = load_model("ce-circuits-3l-mlp")
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model


@pytest.fixture(scope="module")
def random_standard_model():
    """Learned absolute positions (a pos_embed component) and MLPs, random weights."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    for p in model.parameters():  # biases are zero at init; make them count
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def _ioi(model, n=8):
    task = tasks.make_task("ioi", model, n=n, seed=5)
    logits, cache = model.run_with_cache(task.clean_tokens)
    return task, logits, cache


def _random_run(model, batch=3, pos=10):
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(tokens)
    answers = torch.tensor([3, 7, 11][:batch])
    wrongs = torch.tensor([5, 2, 40][:batch])
    return logits, cache, answers, wrongs


@pytest.mark.parametrize("name", ["attn_lm", "mlp_lm", "folded_mlp_lm", "random_standard_model"])
@pytest.mark.parametrize("difference", [True, False])
def test_components_add_up_to_the_final_logit(name, difference, request):
    model = request.getfixturevalue(name)
    if name == "random_standard_model":
        logits, cache, answers, wrongs = _random_run(model)
    else:
        task, logits, cache = _ioi(model)
        answers, wrongs = task.answers, task.wrongs
    wrongs = wrongs if difference else None
    reference = attribution.target(model, logits, answers, wrongs)
    for fn in (attribution.by_component, attribution.by_head):
        att = fn(model, cache, answers, wrongs)
        assert att.values.shape == (len(att.labels), len(answers))
        torch.testing.assert_close(att.total(), reference, atol=ATOL, rtol=0)
    acc = attribution.accumulated(model, cache, answers, wrongs)
    torch.testing.assert_close(acc.values[-1] + acc.bias, reference, atol=ATOL, rtol=0)


def test_component_labels_in_residual_order(mlp_lm, attn_lm, random_standard_model):
    _, _, cache = _ioi(mlp_lm, n=2)
    att = attribution.by_component(mlp_lm, cache, 3)
    assert att.labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out", "2_attn_out", "2_mlp_out"]
    _, _, cache = _ioi(attn_lm, n=2)
    assert attribution.by_component(attn_lm, cache, 3).labels == ["embed", "0_attn_out", "1_attn_out", "2_attn_out"]
    _, cache, answers, _ = _random_run(random_standard_model)
    att = attribution.by_component(random_standard_model, cache, answers)
    assert att.labels[:3] == ["embed", "pos_embed", "0_attn_out"]
    heads = attribution.by_head(random_standard_model, cache, answers)
    assert heads.labels[:2] == ["L0H0", "L0H1"] and heads.labels[-1] == "attn bias"
    assert "pos_embed" in heads.labels and "1_mlp_out" in heads.labels


@pytest.mark.parametrize("name", ["folded_mlp_lm", "random_standard_model"])
def test_equal_to_transformer_lens_logit_attrs(name, request):
    """On a model whose final LayerNorm has no weights (folded), TL's logit_attrs is the same quantity."""
    model = request.getfixturevalue(name)
    if name == "random_standard_model":
        # TL's logit_attrs ignores ln_final's weight and bias; use a model without them.
        model = HookedTransformer(model.cfg.__class__(**{**model.cfg.to_dict(), "normalization_type": "LNPre"}))
        torch.manual_seed(2)
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        logits, cache, answers, wrongs = _random_run(model)
    else:
        task, logits, cache = _ioi(model)
        answers, wrongs = task.answers, task.wrongs
    stack, labels = cache.decompose_resid(layer=None, pos_slice=-1, return_labels=True)
    ref = cache.logit_attrs(stack, answers, wrongs, pos_slice=-1)
    att = attribution.by_component(model, cache, answers, wrongs)
    assert att.labels == labels
    torch.testing.assert_close(att.values, ref, atol=ATOL, rtol=0)

    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    ref_heads = cache.logit_attrs(heads, answers, wrongs, pos_slice=-1)
    by_head = attribution.by_head(model, cache, answers, wrongs)
    n = len(head_labels)
    assert by_head.labels[:n] == head_labels
    torch.testing.assert_close(by_head.values[:n], ref_heads, atol=ATOL, rtol=0)
    torch.testing.assert_close(attribution.head_grid(model, by_head),
                               ref_heads.mean(-1).reshape(model.cfg.n_layers, model.cfg.n_heads), atol=ATOL, rtol=0)

    acc, acc_labels = cache.accumulated_resid(layer=None, pos_slice=-1, return_labels=True)
    ref_acc = cache.logit_attrs(acc, answers, wrongs, pos_slice=-1)
    ours = attribution.accumulated(model, cache, answers, wrongs)
    assert ours.labels == acc_labels
    torch.testing.assert_close(ours.values, ref_acc, atol=ATOL, rtol=0)


def test_heads_and_bias_add_up_to_each_attention_layer(mlp_lm):
    task, _, cache = _ioi(mlp_lm)
    comp = attribution.by_component(mlp_lm, cache, task.answers, task.wrongs)
    heads = attribution.by_head(mlp_lm, cache, task.answers, task.wrongs)
    n_heads = mlp_lm.cfg.n_heads
    bias_total = heads.values[heads.labels.index("attn bias")]
    heads_total = sum(comp.values[comp.labels.index(f"{layer}_attn_out")] for layer in range(mlp_lm.cfg.n_layers))
    from_heads = heads.values[: mlp_lm.cfg.n_layers * n_heads].sum(0) + bias_total
    torch.testing.assert_close(from_heads, heads_total, atol=ATOL, rtol=0)


def _manual_ln_final(model, x):
    x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    return x * model.ln_final.w + model.ln_final.b


def test_logit_lens_against_a_plain_computation(mlp_lm):
    task, logits, cache = _ioi(mlp_lm, n=2)
    answer = int(task.answers[1])
    lens = attribution.logit_lens(mlp_lm, cache, answer=answer, k=3, batch_index=1)
    n_layers = mlp_lm.cfg.n_layers
    assert lens.labels == [f"{i}_pre" for i in range(n_layers)] + ["final_post"]
    pos = task.clean_tokens.shape[1]
    assert lens.top_ids.shape == (n_layers + 1, pos, 3)
    for i in range(n_layers + 1):
        resid = cache["resid_pre", i][1] if i < n_layers else cache["resid_post", n_layers - 1][1]
        probs = (_manual_ln_final(mlp_lm, resid) @ mlp_lm.W_U + mlp_lm.b_U).softmax(-1)
        torch.testing.assert_close(lens.answer_prob[i], probs[:, answer], atol=1e-5, rtol=0)
        top = probs.topk(3, dim=-1)
        torch.testing.assert_close(lens.top_probs[i], top.values, atol=1e-5, rtol=0)
        assert torch.equal(lens.top_ids[i], top.indices)
        rank = (probs > probs[:, answer : answer + 1]).sum(-1)
        assert torch.equal(lens.answer_rank[i], rank)
    # The last layer is the model's own prediction.
    torch.testing.assert_close(lens.top_probs[-1, :, 0], logits[1].softmax(-1).max(-1).values, atol=1e-5, rtol=0)


def test_neuron_attribution_equals_transformer_lens_and_adds_up(mlp_lm):
    task, _, cache = _ioi(mlp_lm)
    answers, wrongs = task.answers, task.wrongs
    comp = attribution.by_component(mlp_lm, cache, answers, wrongs)
    direction = (mlp_lm.W_U[:, answers] - mlp_lm.W_U[:, wrongs]).T * mlp_lm.ln_final.w  # [batch, d_model]
    for layer in range(mlp_lm.cfg.n_layers):
        ours = attribution.neuron_attribution(mlp_lm, cache, layer, answers, wrongs)
        assert ours.shape == (mlp_lm.cfg.d_mlp, len(task))
        # Every layer's neurons, scaled by the final LayerNorm (layer=-1); keep this layer's.
        stack, labels = cache.stack_neuron_results(-1, pos_slice=-1, apply_ln=True, return_labels=True)
        d_mlp = mlp_lm.cfg.d_mlp
        rows = slice(layer * d_mlp, (layer + 1) * d_mlp)
        assert labels[rows][0] == f"L{layer}N0"
        ref = (stack[rows] * direction).sum(-1)  # [neuron, batch]
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
        # Neurons plus the output bias make the MLP layer's component.
        b_out = cache.apply_ln_to_stack(mlp_lm.b_out[layer].expand(1, len(task), -1), pos_slice=-1)
        total = ours.sum(0) + (b_out * direction).sum(-1)[0]
        torch.testing.assert_close(total, comp.values[comp.labels.index(f"{layer}_mlp_out")], atol=ATOL, rtol=0)


def test_neuron_top_tokens_are_its_logit_effect(mlp_lm):
    ids, weights = attribution.neuron_top_tokens(mlp_lm, 1, 7, k=4)
    row = mlp_lm.W_out[1, 7]
    effect = ((row - row.mean()) * mlp_lm.ln_final.w) @ mlp_lm.W_U  # [d_vocab]
    assert torch.equal(ids, effect.topk(4).indices)
    torch.testing.assert_close(weights, effect.topk(4).values)


def test_attn_only_model_has_no_neurons(attn_lm):
    task, _, cache = _ioi(attn_lm, n=2)
    with pytest.raises(ValueError, match="no MLP"):
        attribution.neuron_attribution(attn_lm, cache, 0, task.answers)


def test_head_results_equal_transformer_lens_and_leave_the_cache_alone(mlp_lm):
    task, _, cache = _ioi(mlp_lm, n=4)
    keys = set(cache.cache_dict)
    ours, labels = attribution.head_results(mlp_lm, cache, pos=-1)
    assert set(cache.cache_dict) == keys  # the shared store's cache is not written to
    _, fresh = mlp_lm.run_with_cache(task.clean_tokens)
    ref, ref_labels = fresh.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    assert labels == ref_labels
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_unfolded_components_equal_the_folded_models(mlp_lm, folded_mlp_lm):
    """Folding LayerNorm weights into W_U (TransformerLens's processing) moves the weight, not the
    contributions: every component and head is the same on the zoo model and its folded copy."""
    task, _, cache = _ioi(mlp_lm)
    _, _, folded_cache = _ioi(folded_mlp_lm)
    for fn in (attribution.by_component, attribution.accumulated):
        ours = fn(mlp_lm, cache, task.answers, task.wrongs)
        ref = fn(folded_mlp_lm, folded_cache, task.answers, task.wrongs)
        assert ours.labels == ref.labels
        torch.testing.assert_close(ours.values, ref.values, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.total(), ref.total(), atol=ATOL, rtol=0)
    # Heads: TL's processing also folds each head's value bias into b_O, which moves part of a
    # head's output into "attn bias"; heads plus that bias, and every other row, are unchanged.
    ours = attribution.by_head(mlp_lm, cache, task.answers, task.wrongs)
    ref = attribution.by_head(folded_mlp_lm, folded_cache, task.answers, task.wrongs)
    n = mlp_lm.cfg.n_layers * mlp_lm.cfg.n_heads
    attn = lambda a: a.values[:n].sum(0) + a.values[-1]  # noqa: E731
    torch.testing.assert_close(attn(ours), attn(ref), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.values[n:-1], ref.values[n:-1], atol=ATOL, rtol=0)


def test_rmsnorm_and_unnormalised_models_add_up():
    """Neurons and components of models whose final normalisation does not centre (RMS) or is absent."""
    for norm in ("RMS", None):
        torch.manual_seed(3)
        cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50,
                                      act_fn="gelu", normalization_type=norm, seed=3)
        model = HookedTransformer(cfg)
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        logits, cache, answers, wrongs = _random_run(model)
        comp = attribution.by_component(model, cache, answers, wrongs)
        torch.testing.assert_close(comp.total(), attribution.target(model, logits, answers, wrongs), atol=ATOL, rtol=0)
        for layer in range(2):
            neurons = attribution.neuron_attribution(model, cache, layer, answers, wrongs).sum(0)
            stack = cache.apply_ln_to_stack(model.b_out[layer].expand(1, 3, -1), pos_slice=-1)
            b_out = (stack[0] * attribution.unembed_direction(model, answers, wrongs, batch=3)).sum(-1)
            torch.testing.assert_close(neurons + b_out, comp.values[comp.labels.index(f"{layer}_mlp_out")], atol=ATOL, rtol=0)
