"""The head-importance page (AppTest): numbers against TransformerLens and hand hooks, links, cache, bad input."""
import json

import numpy as np
import pytest
import torch
from transformer_lens import patching as tlp

from core import models, patching, tasks
from core.models import ZOO_DIR
from core.task_catalog import default_template
from tests.helpers import figure_spec, heatmap_z, open_app, plain

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
ABC_PROMPT = "When Mary and John went to the store, Paul gave a drink to"


@pytest.fixture(scope="module")
def attn_lm():
    return models.load_model("ce-circuits-3l-attn")


def _normalised(values, clean, corrupted):
    return (values - corrupted) / (clean - corrupted)


@torch.no_grad()
def _hand_head_denoising(model, task):
    """[layer, head] normalised metric, one plain hooked run per head (independent of core.patching)."""
    _, clean = model.run_with_cache(task.clean_tokens)
    clean_m = float(task.metric(model(task.clean_tokens)))
    corrupted_m = float(task.metric(model(task.corrupted_tokens)))
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            def hook(z, hook, head=head):
                z[:, :, head] = clean[hook.name][:, :, head]
                return z
            logits = model.run_with_hooks(task.corrupted_tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])
            out[layer, head] = float(task.metric(logits))
    return _normalised(out, clean_m, corrupted_m)


def test_first_load_patches_every_head_of_the_typed_ioi_pair(attn_lm):
    at = open_app(page="patching", model="ce-circuits-3l-attn", prompt=IOI_PROMPT)
    assert not at.exception and not at.error and not at.warning
    assert at.text_input(key="pair_corrupted").value == ABC_PROMPT
    spec = figure_spec(at, "Head outputs (z), all positions: exact")
    task = tasks.custom_task(attn_lm, IOI_PROMPT, ABC_PROMPT, "Mary", "John")
    expected = _hand_head_denoising(attn_lm, task)
    with torch.no_grad():  # the caption's clean and corrupted metrics, from plain forward passes
        clean = float(task.metric(attn_lm(task.clean_tokens)))
        corrupted = float(task.metric(attn_lm(task.corrupted_tokens)))
    caption = " ".join(plain(c.value) for c in at.caption)
    assert f"clean run {clean:+.4f}, corrupted run {corrupted:+.4f}" in caption
    assert np.allclose(heatmap_z(spec["data"][0]), expected.numpy(), atol=1e-4)
    # Clickable cells (customdata [layer, head]) and links to the strongest heads and the attribution page.
    assert spec["data"][1]["customdata"][0] == [0, 0]
    links = [el.proto.label for el in at.get("page_link")]
    top = expected.flatten().abs().argmax()
    layer, head = divmod(int(top), attn_lm.cfg.n_heads)
    assert any(label.startswith(f"L{layer}H{head} ") for label in links)
    assert "Logit attribution" in links and "Head importance" in links


def test_ioi_task_noising_finds_the_model_cards_heads(attn_lm):
    """On the IOI task (32 prompts, held-out names, the card's template) noising one head at a
    time finds the card's IOI heads."""
    at = open_app(page="patching", model="ce-circuits-3l-attn", source="ioi")
    # A trained template by default, where the model does IOI; held-out ones stay selectable, labelled.
    picker = at.selectbox(key="template")
    assert picker.value == "when_went"
    assert "friends_found (held out)" in picker.options and "when_went (trained)" in picker.options
    at.segmented_control(key="hi_direction").set_value("noise").run()
    assert not at.exception and not at.error
    assert at.query_params["template"] == "when_went"
    grid = heatmap_z(figure_spec(at, "Head outputs (z), all positions: exact")["data"][0])
    task = tasks.make_task("ioi", attn_lm, n=32, seed=0, template="when_went")
    with torch.no_grad():
        _, corrupted = attn_lm.run_with_cache(task.corrupted_tokens)
        ref = tlp.get_act_patch_attn_head_out_all_pos(attn_lm, task.clean_tokens, corrupted, task.metric)
    base = tasks.baselines(attn_lm, task)
    assert np.allclose(grid, _normalised(ref, base.clean, base.corrupted).numpy(), atol=1e-4)
    card = json.loads((ZOO_DIR / "ce-circuits-3l-attn" / "metrics.json").read_text())
    card_heads = {h["head"] for h in card["circuits"]["ioi"]["top_heads"]}
    layer, head = divmod(int(np.argmin(grid)), attn_lm.cfg.n_heads)  # noising: lowest = most needed
    assert f"L{layer}H{head}" in card_heads
    assert grid.min() < 0.5  # noising that head alone removes over half the clean behaviour


def test_by_position_layer_sweeps_and_attribution(attn_lm):
    at = open_app(page="patching", model="ce-circuits-3l-attn", prompt=IOI_PROMPT)
    task = tasks.custom_task(attn_lm, IOI_PROMPT, ABC_PROMPT, "Mary", "John")
    base = tasks.baselines(attn_lm, task)
    with torch.no_grad():
        _, clean = attn_lm.run_with_cache(task.clean_tokens)
        _, corrupted = attn_lm.run_with_cache(task.corrupted_tokens)
    at.toggle(key="hi_by_pos").set_value(True).run()
    spec = figure_spec(at, "Head outputs (z), by position: exact")
    with torch.no_grad():
        ref = tlp.get_act_patch_attn_head_out_by_pos(attn_lm, task.corrupted_tokens, clean, task.metric)  # [layer, pos, head]
    rows = _normalised(ref, base.clean, base.corrupted).permute(0, 2, 1).reshape(-1, ref.shape[1])
    assert np.allclose(heatmap_z(spec["data"][0]), rows.numpy(), atol=1e-4)
    assert spec["data"][0]["y"][:2] == ["L0H0", "L0H1"]
    at.selectbox(key="hi_what").set_value("resid_pre").run()
    spec = figure_spec(at, "Residual stream (resid_pre), layer × position: exact")
    with torch.no_grad():
        ref = tlp.get_act_patch_resid_pre(attn_lm, task.corrupted_tokens, clean, task.metric)
    assert np.allclose(heatmap_z(spec["data"][0]), _normalised(ref, base.clean, base.corrupted).numpy(), atol=1e-4)
    hover = spec["data"][0]["customdata"][0]
    changed = [h for h in hover if "corrupted:" in h]  # the one position where the prompts differ
    assert len(changed) == 1 and "paul" in changed[0] and "john" in changed[0]
    at.segmented_control(key="hi_method").set_value("compare").run()
    assert not at.exception
    scatter = figure_spec(at, "Attribution patching against exact patching")
    approx = patching.attribution_patch(attn_lm, "resid_pre", task.corrupted_tokens, clean, task.metric)
    assert np.allclose(np.array(scatter["data"][1]["y"]), _normalised(approx, base.clean, base.corrupted).flatten().numpy(), atol=1e-4)
    assert np.allclose(np.array(scatter["data"][1]["x"]), _normalised(ref, base.clean, base.corrupted).flatten().numpy(), atol=1e-4)
    assert "(r = " in scatter["layout"]["title"]["text"]


def test_returning_to_a_sweep_does_not_patch_again(monkeypatch, attn_lm):
    calls = []
    real = patching.run_sweep
    monkeypatch.setattr(patching, "run_sweep", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    prompt = "When Lucy and Peter went to the park, Peter gave a book to"
    at = open_app(page="patching", model="ce-circuits-3l-attn", prompt=prompt)
    calls.clear()  # the page opens on the IOI task this model solves; then the typed pair is chosen
    at.segmented_control(key="hi_pair").set_value("typed").run()
    calls.clear()
    at.text_input(key="pair_corrupted").set_value("When Lucy and Peter went to the park, Alice gave a book to")
    at.text_input(key="pair_answer").set_value("Lucy")
    at.text_input(key="pair_wrong").set_value("Peter").run()
    assert not at.warning and calls == ["z"]
    at.selectbox(key="hi_act").set_value("v").run()
    at.toggle(key="hi_by_pos").set_value(True).run()
    assert calls == ["z", "v", "v_by_pos"]
    at.selectbox(key="hi_what").set_value("attn_out").run()
    at.selectbox(key="hi_what").set_value("heads").run()  # back: value head, by position, as left
    assert calls == ["z", "v", "v_by_pos", "attn_out"]
    assert figure_spec(at, "Head values (v), by position: exact")
    at.segmented_control(key="hi_view").set_value("ablate").run()  # the other view, and back
    at.segmented_control(key="hi_view").set_value("patch").run()
    assert calls == ["z", "v", "v_by_pos", "attn_out"] and not at.exception


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_head_ablation_view_matches_a_hand_hook(attn_lm, kind):
    at = open_app(page="patching", model="ce-circuits-3l-attn", source="ioi")
    assert not [c for c in at.get("plotly_chart") if "Task metric change" in c.proto.spec]  # not run until asked
    at.segmented_control(key="hi_view").set_value("ablate").run()
    at.selectbox(key="hi_kind").set_value(kind).run()
    assert not at.exception
    metric_grid = heatmap_z(figure_spec(at, "Task metric change")["data"][0])
    loss_grid = heatmap_z(figure_spec(at, "Loss change")["data"][0])
    task = tasks.make_task("ioi", attn_lm, n=32, seed=0, template=default_template("ioi"))
    base = tasks.baselines(attn_lm, task)
    layer, head = 1, 1

    def hook(z, hook):
        z[:, :, head] = 0 if kind == "zero" else z[:, :, head].mean(0, keepdim=True)
        return z

    with torch.no_grad():
        fwd = [(f"blocks.{layer}.attn.hook_z", hook)]
        metric = float(task.metric(attn_lm.run_with_hooks(task.clean_tokens, fwd_hooks=fwd)))
        loss = float(attn_lm.run_with_hooks(task.clean_tokens, fwd_hooks=fwd, return_type="loss"))
        clean_loss = float(attn_lm(task.clean_tokens, return_type="loss"))
    assert metric_grid[layer, head] == pytest.approx(_normalised(metric, base.clean, base.corrupted) - 1, abs=1e-4)
    assert loss_grid[layer, head] == pytest.approx(loss - clean_loss, abs=1e-4)


@pytest.mark.slow  # ablates every neuron of a layer
def test_mlp_model_ablation_of_layers_and_neurons():
    model = models.load_model("ce-circuits-3l-mlp")
    at = open_app(page="patching", model="ce-circuits-3l-mlp", source="greater_than")
    at.segmented_control(key="hi_view").set_value("ablate").run()
    at.selectbox(key="hi_target").set_value("mlps").run()
    assert not at.exception and not at.error
    bars = figure_spec(at, "MLP layers ablated")["data"][0]
    task = tasks.make_task("greater_than", model, n=32, seed=0, template=default_template("greater_than"))
    base = tasks.baselines(model, task)
    with torch.no_grad():
        logits = model.run_with_hooks(task.clean_tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda a, hook: torch.zeros_like(a))])
    assert bars["y"][0] == pytest.approx(_normalised(float(task.metric(logits)), base.clean, base.corrupted), abs=1e-4)
    at.selectbox(key="hi_target").set_value("neurons").run()
    assert not at.exception
    neurons = figure_spec(at, "neurons of MLP 2")["data"][0]
    assert len(neurons["x"]) == 20
    for label, value in list(zip(neurons["x"], neurons["y"]))[:3]:  # hand hook: zero one neuron of MLP 2
        n = int(label[1:])

        def zero(post, hook, n=n):
            post[:, :, n] = 0
            return post

        with torch.no_grad():
            logits = model.run_with_hooks(task.clean_tokens, fwd_hooks=[("blocks.2.mlp.hook_post", zero)])
        assert value == pytest.approx(_normalised(float(task.metric(logits)), base.clean, base.corrupted), abs=1e-4)
    at.segmented_control(key="hi_view").set_value("patch").run()
    at.selectbox(key="hi_what").set_value("mlp_out").run()
    assert not at.exception and figure_spec(at, "MLP layer output, layer × position: exact")


@pytest.mark.parametrize(
    "corrupted, answer, wrong, message",
    [
        ("When Mary and John went to the store, Paul gave a big drink to", "Mary", "John", "same length"),
        (ABC_PROMPT, "Mary Ann", "John", "must be a single token"),
        (ABC_PROMPT, "", "John", "empty"),
        (IOI_PROMPT, "Mary", "John", "score the same"),
        (ABC_PROMPT, "Mary", "Mary", "same token"),
    ],
)
def test_invalid_pairs_get_messages(corrupted, answer, wrong, message):
    at = open_app(page="patching", model="ce-circuits-3l-attn", prompt=IOI_PROMPT)
    at.text_input(key="pair_corrupted").set_value(corrupted)
    at.text_input(key="pair_answer").set_value(answer)
    at.text_input(key="pair_wrong").set_value(wrong).run()
    assert not at.exception and not at.error
    assert message in plain(" ".join(w.value for w in at.warning))
    assert not at.get("plotly_chart")


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_one_prompt_pair_cannot_mean_or_resample_ablate(kind):
    at = open_app(page="patching", model="ce-circuits-3l-attn", prompt=IOI_PROMPT)
    at.segmented_control(key="hi_view").set_value("ablate").run()
    at.selectbox(key="hi_kind").set_value(kind).run()
    assert not at.exception
    assert "needs several prompts" in plain(" ".join(w.value for w in at.warning))
    at.selectbox(key="hi_kind").set_value("zero").run()
    assert not at.warning and figure_spec(at, "Task metric change")


def test_markup_in_the_prompt_is_shown_as_text():
    prompt = "<b>When</b> Mary and John went to the store, John gave a drink to"
    at = open_app(page="patching", model="ce-circuits-3l-attn", prompt=prompt)
    at.segmented_control(key="hi_pair").set_value("typed").run()
    at.text_input(key="pair_corrupted").set_value("<b>When</b> Mary and John went to the store, Paul gave a drink to")
    at.text_input(key="pair_answer").set_value("Mary")
    at.text_input(key="pair_wrong").set_value("John").run()
    assert not at.exception
    at.selectbox(key="hi_what").set_value("resid_pre").run()
    spec = figure_spec(at, "Residual stream (resid_pre)")
    labels = " ".join(spec["data"][0]["x"])
    assert "<b>" not in labels and "&lt;" in labels


def test_attention_only_model_offers_no_mlp_sweeps():
    at = open_app(page="patching", model="ce-circuits-3l-attn", prompt=IOI_PROMPT)
    at.segmented_control(key="hi_view").set_value("ablate").run()
    assert at.selectbox(key="hi_target").options == ["Attention heads"]
    at.segmented_control(key="hi_view").set_value("patch").run()
    assert "MLP layer outputs" not in at.selectbox(key="hi_what").options
    assert "Attention heads" in at.selectbox(key="hi_what").options


def test_grouped_query_model_labels_key_value_heads(tmp_path, attn_lm):
    """A model with fewer key/value heads than query heads: k sweeps show KV heads, not clickable."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from core.zoo import save_checkpoint

    cfg = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, n_key_value_heads=2, n_ctx=64, d_vocab=attn_lm.cfg.d_vocab,
               attn_only=True, normalization_type="LN", positional_embedding_type="rotary", rotary_dim=16, seed=1,
               model_name="gqa-test", default_prepend_bos=True)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    folder = tmp_path / "gqa-test"
    save_checkpoint(model, cfg, folder)
    attn_lm.tokenizer.save_pretrained(str(folder))
    at = open_app(page="patching", model=str(folder), prompt=IOI_PROMPT)
    assert not at.exception
    at.selectbox(key="hi_act").set_value("k").run()
    assert not at.exception and not at.error
    spec = figure_spec(at, "Head keys (k), all positions: exact")
    assert spec["data"][0]["x"] == ["KV0", "KV1"] and len(spec["data"]) == 1  # no click targets


def test_default_model_opens_on_a_task_it_solves_and_typed_pairs_default_to_the_top_two_tokens():
    """Issue 16: on the default model (induction only) the page used to show only "The answer is
    empty". It opens on the induction task, which that model solves, with real numbers; a typed pair
    starts with the model's two most likely next tokens as the answers."""
    model = models.load_model("ce-induction-2l")
    at = open_app(page="patching")
    assert not at.exception and not at.error and not at.warning
    assert at.segmented_control(key="hi_pair").value == "demo"
    grid = heatmap_z(figure_spec(at, "Head outputs (z), all positions: exact")["data"][0])
    task = tasks.make_task("induction", model, n=32, seed=0)
    expected = _hand_head_denoising(model, task)
    assert np.allclose(grid, expected.numpy(), atol=1e-4) and float(np.abs(grid).max()) > 0.2
    at.segmented_control(key="hi_pair").set_value("typed").run()
    prompt = at.sidebar.text_area(key="prompt").value
    with torch.no_grad():
        top = model(model.to_tokens(prompt))[0, -1].topk(2).indices
    expected_answers = [model.tokenizer.decode([int(t)]) for t in top]
    assert [at.text_input(key=k).value for k in ("pair_answer", "pair_wrong")] == expected_answers


def test_a_template_the_model_fails_is_not_normalised():
    """Issue 16: on the held-out template friends_found the attention-only model barely does IOI
    (clean - corrupted gap 0.16 against a spread of 3.2); normalised numbers exploded (+26.7). The
    page says so and shows the raw change in the metric instead, which we recompute by hand."""
    model = models.load_model("ce-circuits-3l-attn")
    at = open_app(page="patching", model="ce-circuits-3l-attn", source="ioi", template="friends_found")
    assert not at.exception
    assert any("does not show this behaviour here" in plain(w.value) for w in at.warning)
    spec = figure_spec(at, "Head outputs (z), all positions: exact")
    assert "normalised" not in json.dumps(spec["data"][0]["colorbar"])
    task = tasks.make_task("ioi", model, n=32, seed=0, template="friends_found")
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean_tokens)
        ref = tlp.get_act_patch_attn_head_out_all_pos(model, task.corrupted_tokens, clean, task.metric)
        corrupted_metric = float(task.metric(model(task.corrupted_tokens)))
    assert np.allclose(heatmap_z(spec["data"][0]), (ref - corrupted_metric).numpy(), atol=1e-4)
    assert float(np.abs(heatmap_z(spec["data"][0])).max()) < 5  # no exploded numbers
    # On a trained template the same page normalises, without a warning.
    at.selectbox(key="template").set_value("when_went").run()
    assert not at.warning


def test_normaliser_effect_size_against_a_hand_computation():
    model = models.load_model("ce-circuits-3l-attn")
    for template, meaningful in (("friends_found", False), ("when_went", True)):
        task = tasks.make_task("ioi", model, n=32, seed=0, template=template)
        with torch.no_grad():
            c, k = task.per_prompt(model(task.clean_tokens)), task.per_prompt(model(task.corrupted_tokens))
        n = tasks.normaliser(task, model(task.clean_tokens), model(task.corrupted_tokens))
        pooled = float(np.sqrt((np.var(c.numpy(), ddof=1) + np.var(k.numpy(), ddof=1)) / 2))
        assert n.effect == pytest.approx(float(c.mean() - k.mean()) / pooled, rel=1e-4)
        assert n.meaningful is meaningful
        assert float(n(torch.tensor(n.clean))) == pytest.approx(1.0) and float(n(torch.tensor(n.corrupted))) == pytest.approx(0.0)


def test_default_answers_are_known_by_id_even_when_their_text_does_not_tokenise_back():
    """A word-piece top token ("##61" shows as "61") is a valid default answer: the typed pair uses
    the model's own top-2 token ids, as the Logit attribution page does."""
    model = models.load_model("ce-circuits-3l-mlp")
    prompt = "The war lasted from the year 17"
    at = open_app(page="patching", model="ce-circuits-3l-mlp", prompt=prompt)
    at.segmented_control(key="hi_pair").set_value("typed").run()
    with torch.no_grad():
        top = model(model.to_tokens(prompt))[0, -1].topk(2).indices
    assert [at.text_input(key=k).value for k in ("pair_answer", "pair_wrong")] == \
        [model.tokenizer.decode([int(t)]) for t in top]
    at.text_input(key="pair_corrupted").set_value("The war lasted from the year 18").run()
    assert not at.exception and not any("vocabulary" in plain(w.value) for w in at.warning)
    task = tasks.Task("pair", "", "logit_diff", model.to_tokens(prompt), model.to_tokens("The war lasted from the year 18"),
                      top[:1], top[1:], [prompt], [""])
    with torch.no_grad():
        clean = float(task.metric(model(task.clean_tokens)))
    caption = " ".join(plain(c.value) for c in at.caption)
    assert f"clean run {clean:+.4f}" in caption
