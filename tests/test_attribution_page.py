"""The logit attribution page (AppTest): numbers against independent computations, no extra
forward passes when the answer changes, and bad input."""
import json
import re
from urllib.parse import parse_qs

import numpy as np
import pytest
import torch

from core import models, tasks
from core.task_catalog import default_template
from tests.helpers import figure_spec, heatmap_z, open_app, plain

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


def _bar(at, title):
    return figure_spec(at, title)["data"][0]


def _charts(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def _chart_with(at, predicate) -> dict:
    return next(spec for spec in _charts(at) if predicate(spec["data"][0]))


def _misses(at) -> int:
    caption = plain(at.sidebar.caption[-1].value)
    return int(re.search(r"misses (\d+)", caption).group(1))


def _manual_ln_scale(resid):
    """[batch] final LayerNorm scale of the last position, computed from the residual stream."""
    x = resid - resid.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + 1e-5).sqrt()


@torch.no_grad()
def _manual_direct_effects(model, tokens, answers, wrongs):
    """Independent of core.attribution: hooks the outputs, then a hand-written LayerNorm and unembedding.

    Returns (components [component, batch], heads [layer, head, batch], final logit diff [batch]).
    """
    _, cache = model.run_with_cache(tokens)
    n_layers = model.cfg.n_layers
    final = cache["resid_post", n_layers - 1][:, -1]
    scale = _manual_ln_scale(final)[:, None]
    direction = (model.W_U[:, answers] - model.W_U[:, wrongs]).T * model.ln_final.w  # [batch, d_model]

    def read(x):  # x: [batch, d_model] written into the residual stream
        return ((x - x.mean(-1, keepdim=True)) / scale * direction).sum(-1)

    comps = [read(cache["embed"][:, -1])]
    heads = torch.zeros(n_layers, model.cfg.n_heads, tokens.shape[0])
    for layer in range(n_layers):
        comps.append(read(cache["attn_out", layer][:, -1]))
        if not model.cfg.attn_only:
            comps.append(read(cache["mlp_out", layer][:, -1]))
        z = cache["z", layer][:, -1]  # [batch, head, d_head]
        for h in range(model.cfg.n_heads):
            heads[layer, h] = read(z[:, h] @ model.W_O[layer, h])
    logits = model(tokens)[:, -1]
    idx = torch.arange(tokens.shape[0])
    return torch.stack(comps), heads, logits[idx, answers] - logits[idx, wrongs]


@pytest.fixture(scope="module")
def attn_lm():
    return models.load_model("ce-circuits-3l-attn")


def test_default_view_explains_the_top_prediction_against_the_runner_up(attn_lm):
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT)
    assert not at.exception and not at.error and not at.warning
    tokens = attn_lm.to_tokens(IOI_PROMPT)
    top = attn_lm(tokens)[0, -1].topk(2).indices
    answer, wrong = (attn_lm.tokenizer.decode([int(t)]) for t in top)
    assert (at.text_input(key="attr_answer").value, at.text_input(key="attr_wrong").value) == (answer, wrong)
    assert answer == "mary"  # the model does IOI on this prompt: the indirect object first
    assert at.query_params["answer"] == answer and at.query_params["wrong"] == wrong

    comps, heads, diff = _manual_direct_effects(attn_lm, tokens, top[:1], top[1:])
    bar = _bar(at, "Direct effect of each component")
    assert bar["x"] == ["embed", "L0 attn", "L1 attn", "L2 attn"]
    np.testing.assert_allclose(bar["y"], comps[:, 0].numpy(), atol=1e-4)
    # A tab is computed and drawn only while open: one app per tab.
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT, attr_tab="By head")
    grid = heatmap_z(figure_spec(at, "Direct effect of each head")["data"][0])
    np.testing.assert_allclose(grid, heads[:, :, 0].numpy(), atol=1e-4)
    # The accumulated residual stream ends at the model's own logit difference.
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT, attr_tab="Accumulated residual")
    acc = _chart_with(at, lambda t: t.get("mode") == "lines+markers" and t["x"][-1] == "final")["data"][0]
    assert acc["x"][0] == "pre 0"
    assert acc["y"][-1] == pytest.approx(float(diff[0]), abs=1e-4)


@pytest.mark.slow  # a secondary view: CI runs it
def test_a_changed_answer_costs_no_forward_pass(attn_lm):
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT)
    misses = _misses(at)
    at.text_input(key="attr_answer").set_value("john").run()
    at.text_input(key="attr_wrong").set_value("mary").run()
    assert not at.exception and not at.warning
    assert _misses(at) == misses
    tokens = attn_lm.to_tokens(IOI_PROMPT)
    john, mary = (attn_lm.to_single_token(w) for w in ("john", "mary"))
    comps, _, _ = _manual_direct_effects(attn_lm, tokens, torch.tensor([john]), torch.tensor([mary]))
    np.testing.assert_allclose(_bar(at, "Direct effect of each component")["y"], comps[:, 0].numpy(), atol=1e-4)
    # The Attention page reads the same stored run.
    at.switch_page("pages/attention.py").run()
    assert not at.exception and _misses(at) == misses


def test_task_batch_mean_equals_the_mean_of_independent_effects(attn_lm):
    at = open_app(page="attribution", model="ce-circuits-3l-attn", source="ioi", example="0")
    at.segmented_control(key="attr_scope").set_value("task").run()
    assert not at.exception and not at.warning
    assert "answer" not in at.query_params and "wrong" not in at.query_params
    task = tasks.make_task("ioi", attn_lm, n=32, seed=0, split="held_out", template=default_template("ioi"))
    comps, heads, _ = _manual_direct_effects(attn_lm, task.clean_tokens, task.answers, task.wrongs)
    np.testing.assert_allclose(_bar(at, "Direct effect of each component")["y"], comps.mean(-1).numpy(), atol=1e-4)
    at = open_app(page="attribution", model="ce-circuits-3l-attn", source="ioi", example="0", attr_tab="By head")
    at.segmented_control(key="attr_scope").set_value("task").run()
    assert not at.exception and not at.warning
    np.testing.assert_allclose(heatmap_z(figure_spec(at, "Direct effect of each head")["data"][0]), heads.mean(-1).numpy(), atol=1e-4)


def test_head_links_open_the_attention_page_on_that_head():
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT, attr_tab="By head")
    links = at.get("page_link")
    assert links
    first = links[0].proto
    params = {k: v[0] for k, v in parse_qs(first.query_string).items()}
    label = re.match(r"L(\d+)H(\d+)", first.label)
    assert (params["layer"], params["head"]) == label.groups() and params["page"] == "attention"
    assert params["model"] == "ce-circuits-3l-attn" and params["prompt"] == IOI_PROMPT
    # The link follows the page's own switch: the Attention page then opens on that head.
    at = open_app(**params)
    assert not at.exception
    assert (at.selectbox(key="layer").value, at.selectbox(key="head").value) == tuple(int(g) for g in label.groups())


def test_logit_lens_equals_a_plain_computation(attn_lm):
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT, attr_tab="Logit lens")
    tokens = attn_lm.to_tokens(IOI_PROMPT)
    _, cache = attn_lm.run_with_cache(tokens)
    lens = _chart_with(at, lambda t: t.get("colorbar", {}).get("title", {}).get("text") == "top-1 prob")
    z = heatmap_z(lens["data"][0])
    n_layers = attn_lm.cfg.n_layers
    for i in range(n_layers + 1):
        resid = cache["resid_pre", i][0] if i < n_layers else cache["resid_post", n_layers - 1][0]
        x = resid - resid.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + attn_lm.cfg.eps).sqrt() * attn_lm.ln_final.w + attn_lm.ln_final.b
        probs = (x @ attn_lm.W_U + attn_lm.b_U).softmax(-1)
        np.testing.assert_allclose(z[i], probs.max(-1).values.detach().numpy(), atol=1e-5)
        assert lens["data"][0]["text"][i][-1] == attn_lm.tokenizer.decode([int(probs[-1].argmax())])


def test_neurons_on_the_mlp_model_equal_transformer_lens():
    model = models.load_model("ce-circuits-3l-mlp")
    at = open_app(page="attribution", model="ce-circuits-3l-mlp", prompt=IOI_PROMPT, attr_tab="Neurons")
    assert not at.exception
    layer = at.selectbox(key="attr_neuron_layer").value
    answer, wrong = at.text_input(key="attr_answer").value, at.text_input(key="attr_wrong").value
    a, w = model.to_single_token(answer), model.to_single_token(wrong)
    _, cache = model.run_with_cache(model.to_tokens(IOI_PROMPT))
    stack, labels = cache.stack_neuron_results(-1, pos_slice=-1, apply_ln=True, return_labels=True)
    direction = (model.W_U[:, a] - model.W_U[:, w]) * model.ln_final.w
    effects = (stack[:, 0] * direction).sum(-1)  # [layer * neuron]
    rows = [i for i, l in enumerate(labels) if l.startswith(f"L{layer}N")]
    mine = effects[rows]
    data = _chart_with(at, lambda t: t.get("type") == "bar" and str(t["x"][0]).startswith("N"))["data"][0]
    top = mine.abs().argsort(descending=True)[:20]
    assert data["x"] == [f"N{int(n)}" for n in top]
    np.testing.assert_allclose(data["y"], mine[top].detach().numpy(), atol=1e-4)


def test_attention_only_model_says_it_has_no_neurons():
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT, attr_tab="Neurons")
    assert any("no MLP neurons" in i.value for i in at.info)


@pytest.mark.parametrize(
    "box, text, message",
    [
        ("attr_answer", "1732", "is 2 tokens ('17', '32')"),
        ("attr_answer", "", "answer is empty"),
        ("attr_answer", "zzzqx", "not in this model's vocabulary"),
        ("attr_wrong", "mary", "same token as the answer"),
    ],
)
def test_bad_answers_are_clear_messages(box, text, message):
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT)
    if box == "attr_wrong":
        at.text_input(key="attr_answer").set_value("mary").run()
    at.text_input(key=box).set_value(text).run()
    assert not at.exception
    assert any(message in plain(w.value) for w in at.warning), [w.value for w in at.warning]


def test_a_split_answer_offers_its_first_token():
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt="The war lasted from the year 1732 to the year")
    at.text_input(key="attr_answer").set_value("1758").run()
    assert any("Try its first token, '17'" in plain(w.value) for w in at.warning)
    at.button[0].click().run()
    assert at.text_input(key="attr_answer").value == "17"
    assert not at.warning and not at.exception


def test_empty_prompt_and_html_prompt():
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt="   ")
    assert not at.exception and any("prompt is empty" in w.value for w in at.warning)
    evil = "<script>alert(1)</script> the cat"
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=evil, attr_tab="Logit lens")
    assert not at.exception
    lens = next(el.proto.spec for el in at.get("plotly_chart") if "top-1 prob" in el.proto.spec)
    assert "<script>" not in lens


def test_on_ioi_the_heads_that_write_the_answer_are_the_name_movers():
    """The page's top heads on an IOI prompt are the ones the model card found attending to the
    indirect object (name movers, by attention and patching, computed independently)."""
    card = json.loads((models.ZOO_DIR / "ce-circuits-3l-attn" / "metrics.json").read_text())
    movers = set(card["circuits"]["ioi"]["name_movers"])
    at = open_app(page="attribution", model="ce-circuits-3l-attn", prompt=IOI_PROMPT, attr_tab="By head")
    grid = heatmap_z(figure_spec(at, "Direct effect of each head")["data"][0])
    n_heads = grid.shape[1]
    flat = grid.flatten()
    name = lambda i: f"L{i // n_heads}H{i % n_heads}"  # noqa: E731
    assert name(int(np.argmax(flat))) in movers  # the head writing ' Mary' most is a name mover
    top5 = {name(int(i)) for i in np.argsort(-flat)[:5]}
    assert movers <= top5  # and every name mover is among the five strongest writers


@pytest.mark.slow  # a secondary view of the page: CI runs it, development runs skip it
def test_subword_and_year_answers_open_without_a_message():
    """Default answers are kept by id: a year continuation ("##53", shown "53") would not
    re-tokenize from its text."""
    model = models.load_model("ce-circuits-3l-mlp")
    at = open_app(page="attribution", model="ce-circuits-3l-mlp", source="greater_than", example="2")
    assert not at.exception and not at.warning
    task = tasks.make_task("greater_than", model, n=32, seed=0, split="held_out", template=default_template("greater_than"))
    assert at.text_input(key="attr_answer").value == model.tokenizer.decode([int(task.answers[2])])
    _, cache = model.run_with_cache(task.clean_tokens[2:3])
    comps, _, diff = _manual_direct_effects(model, task.clean_tokens[2:3], task.answers[2:3], task.wrongs[2:3])
    np.testing.assert_allclose(_bar(at, "Direct effect of each component")["y"], comps[:, 0].numpy(), atol=1e-4)
    at.segmented_control(key="attr_scope").set_value("task").run()
    assert not at.exception
    assert "probability difference" in plain(at.caption[0].value)  # said: not the task's own metric
    prompt = "The war lasted from the year 1732 to the year 17"
    at = open_app(page="attribution", model="ce-circuits-3l-mlp", prompt=prompt)
    assert not at.exception and not at.warning
    top = model(model.to_tokens(prompt))[0, -1].argmax()
    assert model.tokenizer.convert_ids_to_tokens(int(top)).startswith("##")


def test_soft_capped_model_says_the_bars_explain_the_pre_cap_logit(tmp_path):
    """Gemma 2's logit soft cap: the page states the pre-cap value the bars add up to and the
    model's capped value, both checked against a hand computation."""
    from random_models import save_zoo_folder

    folder, model = save_zoo_folder(tmp_path / "capped", seed=2, output_logits_soft_cap=2.0)
    prompt = "the king saw a green bird near the"
    at = open_app(page="attribution", model=folder, prompt=prompt)
    assert not at.exception and not at.error
    answer, wrong = (at.text_input(key=k).value for k in ("attr_answer", "attr_wrong"))
    tokens = model.to_tokens(prompt)
    a, w = (int(model.to_single_token(t)) for t in (answer, wrong))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        resid = model.ln_final(cache["resid_post", model.cfg.n_layers - 1])[0, -1]
        raw = resid @ model.W_U + model.b_U
    precap = float(raw[a] - raw[w])
    capped = float(2.0 * (torch.tanh(raw[a] / 2.0) - torch.tanh(raw[w] / 2.0)))
    info = plain(at.info[0].value)
    assert "soft-caps its logits" in info and f"{precap:+.4f}" in info and f"{capped:+.4f}" in info
    assert abs(precap - capped) > 1e-2  # the cap matters on this prompt
    bar = _bar(at, "Direct effect of each component")
    caption = next(plain(c.value) for c in at.caption if "add up to the pre-cap value" in plain(c.value))
    bias = float(re.search(r"constant ([+-][0-9.]+)", caption).group(1))
    assert sum(bar["y"]) + bias == pytest.approx(precap, abs=1e-3)
