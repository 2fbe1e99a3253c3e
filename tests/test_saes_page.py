"""The SAE features page (AppTest): dashboards against direct sae_lens encode calls, index reuse,
search, feature ablation, and bad input."""
import re

import numpy as np
import pytest
import torch

from core import models, sae_index, saes
from core.zoo import sae_data
from tests.test_pages import _app, _figure, _plain, _z

MLP_PROMPT = "The keys that the man holds"


@pytest.fixture(scope="module")
def mlp_lm():
    return models.load_model("ce-circuits-3l-mlp")


@pytest.fixture(scope="module")
def relu_sae():
    return saes.load_embedded("ce-circuits-3l-mlp-res2-relu")


@torch.no_grad()
def _corpus_acts(model, loaded):
    """[tokens, d_sae] over the SAE's zoo corpus (BOS left out), batched by hand, and the tokens."""
    docs = sae_data.documents(loaded.card["corpus"], model.tokenizer)
    name = loaded.hook_name
    out, toks = [], []
    for i in range(0, len(docs), 100):
        chunk = docs[i:i + 100]
        width = max(len(d) for d in chunk)
        tokens = torch.tensor([d + [0] * (width - len(d)) for d in chunk])
        _, cache = model.run_with_cache(tokens, names_filter=name)
        for j, d in enumerate(chunk):
            out.append(loaded.sae.encode(cache[name][j, 1:len(d)]))
            toks += d[1:]
    return torch.cat(out), torch.tensor(toks)


def _html(at) -> str:
    return "\n".join(el.proto.body for el in at.get("html"))


def _metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_page_opens_on_the_embedded_sae_with_the_prompts_features(mlp_lm, relu_sae):
    at = _app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    assert not at.exception and not at.error and not at.warning
    assert at.selectbox(key="sae_embedded").value == "ce-circuits-3l-mlp-res2-relu"
    spec = _figure(at, "Strongest SAE features")
    tokens = mlp_lm.to_tokens(MLP_PROMPT)
    _, cache = mlp_lm.run_with_cache(tokens, names_filter=relu_sae.hook_name)
    direct = relu_sae.sae.encode(cache[relu_sae.hook_name][0]).detach()
    features = [int(f) for (f,) in spec["data"][1]["customdata"][:: tokens.shape[1]]]
    # The features shown: each one of the 3 strongest at some token after BOS.
    top3 = {int(f) for row in direct[1:] for f, v in zip(row.topk(3).indices, row.topk(3).values) if v > 0}
    assert set(features) == top3
    z = _z(spec["data"][0])  # [feature, pos]
    assert np.allclose(z[:, 1:], direct[1:, features].T.numpy(), atol=1e-4)
    assert np.all(z[:, 0] == 0)  # BOS left out
    # Default feature: the strongest one at the last token, in the URL too.
    best = int(direct[-1].argmax())
    assert at.query_params["feature"] == [str(best)] or at.query_params["feature"] == str(best)
    assert f"Feature {best} on this prompt" in " ".join(m.value for m in at.markdown)


def test_feature_dashboard_numbers_match_direct_encode_calls(mlp_lm, relu_sae):
    at = _app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    at.segmented_control(key="sae_view").set_value("feature").run()
    assert not at.exception and not at.error and not at.warning
    f = int(at.number_input(key="sae_feature_input").value)
    acts, toks = _corpus_acts(mlp_lm, relu_sae)
    col = acts[:, f]
    fired = col > 0
    assert _metric(at, "Density") == f"{float(fired.float().mean()):.3%}"
    assert _metric(at, "Max activation") == f"{float(col.max()):.3f}"
    assert _metric(at, "Mean when firing") == f"{float(col[fired].mean()):.3f}"
    hist = _figure(at, f"Feature {f}: activation histogram")
    assert sum(_z({"z": hist["data"][0]["y"]}) if isinstance(hist["data"][0]["y"], dict) else hist["data"][0]["y"]) == int(fired.sum())
    # Through the final LayerNorm by hand: centre the decoder row, scale by ln_final.w, unembed.
    row = relu_sae.sae.W_dec[f].detach()
    effects = ((row - row.mean()) * mlp_lm.ln_final.w.detach()) @ mlp_lm.W_U.detach()
    up = _figure(at, "Promoted tokens")
    x = _z({"z": up["data"][0]["x"]}) if isinstance(up["data"][0]["x"], dict) else np.array(up["data"][0]["x"])
    assert np.allclose(x, effects.topk(10).values.numpy(), atol=1e-4)
    # Top contexts: the strongest activations in the corpus, in order.
    shown = [float(v) for v in re.findall(r"<b>([0-9.]+)</b> · document", _html(at))]
    assert np.allclose(shown, col.topk(len(shown)).values.numpy(), atol=1.5e-3)
    assert len(shown) == 10


def test_second_opening_reads_the_index(mlp_lm, relu_sae, monkeypatch):
    first = _app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    first.segmented_control(key="sae_view").set_value("feature").run()
    f = first.number_input(key="sae_feature_input").value

    def no_build(*args, **kwargs):
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(sae_index, "collect", no_build)
    again = _app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT, feature=str(f))
    again.segmented_control(key="sae_view").set_value("feature").run()
    assert not again.exception and not again.error
    assert _metric(again, "Max activation") == _metric(first, "Max activation")
    assert again.number_input(key="sae_feature_input").value == f


def test_search_ablation_and_own_text(mlp_lm, relu_sae):
    at = _app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    at.segmented_control(key="sae_view").set_value("search").run()
    at.text_input(key="sae_search_token").set_value("keys").run()
    buttons = [b for b in at.button if b.key and b.key.startswith("sae_tok_")]
    assert buttons
    acts, toks = _corpus_acts(mlp_lm, relu_sae)
    token = int(mlp_lm.to_tokens("keys", prepend_bos=False)[0, 0])
    best = int(acts[toks == token].mean(0).argmax())
    assert buttons[0].key == f"sae_tok_{best}"
    buttons[0].click().run()
    assert at.segmented_control(key="sae_view").value == "feature"
    assert at.number_input(key="sae_feature_input").value == best
    # Ablation table against a hand hook: x + (0 - 1) · f(x) · W_dec[f] at the SAE's hook.
    tokens = mlp_lm.to_tokens(MLP_PROMPT)

    def ablate(x, hook):
        return x - relu_sae.sae.encode(x)[..., best, None] * relu_sae.sae.W_dec[best]

    with torch.no_grad():
        p1 = mlp_lm.run_with_hooks(tokens, fwd_hooks=[(relu_sae.hook_name, ablate)])[0, -1].softmax(-1)
    table = at.dataframe[0].value
    for _, row in table.iterrows():
        t = int(mlp_lm.to_tokens(row["token"], prepend_bos=False)[0, 0])
        assert row["probability after"] == pytest.approx(float(p1[t]), abs=1e-5)
    # Own text with markup: shown as text.
    at.text_input(key="sae_test_text").set_value("<script>alert(1)</script> the keys").run()
    body = _html(at)
    assert "<script>" not in body and "&lt;" in body
    # Search: a multi-token entry and an id.
    at.segmented_control(key="sae_view").set_value("search").run()
    at.text_input(key="sae_search_logit").set_value("the keys").run()
    assert any("2 tokens" in _plain(w.value) for w in at.warning)
    at.text_input(key="sae_search_logit").set_value("are").run()
    effects = relu_sae.sae.W_dec.detach() @ mlp_lm.W_U.detach()[:, int(mlp_lm.to_tokens("are", prepend_bos=False)[0, 0])]
    logit_buttons = [b for b in at.button if b.key and b.key.startswith("sae_logit_")]
    assert logit_buttons[0].key == f"sae_logit_{int(effects.argmax())}"


def test_bad_sae_input_gets_messages(tmp_path, tiny_gpt2_dir):
    at = _app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    at.selectbox(key="sae_source").set_value("local").run()
    assert any("Type the folder" in _plain(w.value) for w in at.warning)
    at.text_input(key="sae_folder").set_value(str(tmp_path / "nowhere")).run()
    assert any("no folder" in _plain(w.value) for w in at.warning)
    from tests.test_saes import _save_sae

    _save_sae(tmp_path / "wide", 768, "blocks.1.hook_resid_post")
    at.text_input(key="sae_folder").set_value(str(tmp_path / "wide")).run()
    assert any("expects 768 numbers per token" in _plain(w.value) for w in at.warning)
    assert not at.exception
    at.selectbox(key="sae_source").set_value("pretrained").run()
    assert any("registry has no SAE" in _plain(w.value) for w in at.warning)
    # A model with no embedded SAE names the ones that exist.
    folder, _ = tiny_gpt2_dir
    other = _app(page="saes", model=str(folder), prompt="the cat")
    assert any("No embedded SAE was trained" in _plain(w.value) for w in other.warning)
    assert not other.exception


def test_feature_and_sae_from_the_url(mlp_lm, relu_sae):
    at = _app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT, feature="999999")
    assert not at.exception and not at.error
    tokens = mlp_lm.to_tokens(MLP_PROMPT)
    _, cache = mlp_lm.run_with_cache(tokens, names_filter=relu_sae.hook_name)
    best = int(relu_sae.sae.encode(cache[relu_sae.hook_name][0, -1]).argmax())
    assert any("Feature 999999 does not exist" in i.value and f"showing feature {best}" in i.value for i in at.info)
    assert at.query_params["feature"] in (str(best), [str(best)])
    # A link names the SAE and the feature: both come back.
    link = _app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT, sae="ce-circuits-3l-mlp-res2-topk", feature="5")
    assert link.selectbox(key="sae_embedded").value == "ce-circuits-3l-mlp-res2-topk"
    link.segmented_control(key="sae_view").set_value("feature").run()
    assert link.number_input(key="sae_feature_input").value == 5 and not link.exception


def test_default_model_opens_on_its_embedded_sae():
    """A fresh start (no URL parameters): the default zoo model and its embedded SAE, dashboard and all."""
    at = _app(page="saes")
    assert not at.exception and not at.error and not at.warning
    assert at.selectbox(key="sae_embedded").value == "ce-induction-2l-res1-topk"
    _figure(at, "Strongest SAE features")
    at.segmented_control(key="sae_view").set_value("feature").run()
    assert not at.exception and not at.error
    assert "Top activating contexts" in " ".join(m.value for m in at.markdown)
