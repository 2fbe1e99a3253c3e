"""Page tests with streamlit.testing.v1.AppTest: what a person sees, and bad input."""
import base64
import json
import re
import shutil

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core import models

APP = str(models.ZOO_DIR.parent.parent / "app.py")


def _app(**params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    for k, v in params.items():
        at.query_params[k] = v
    return at.run()


def _z(trace: dict) -> np.ndarray:
    """A heatmap's z as an array (plotly 6+ may ship it as base64 typed-array data)."""
    z = trace["z"]
    if isinstance(z, dict) and "bdata" in z:
        shape = tuple(int(n) for n in str(z["shape"]).split(","))
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"])).reshape(shape)
    return np.array(z, dtype=float)


def _plain(markdown: str) -> str:
    """Markdown text with its backslash escapes removed (errors are escaped before display)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def _figure(at: AppTest, title_part: str) -> dict:
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        title = spec.get("layout", {}).get("title", {})
        if title_part in (title.get("text", "") if isinstance(title, dict) else str(title)):
            return spec
    raise AssertionError(f"no chart titled {title_part!r}")


def _independent_induction_scores(model, tokens):
    """Plain loops, same definition as TransformerLens's induction pattern: for each query
    position q, the attention paid to every k = j + 1 <= q where token j equals token q (j != q);
    averaged over the rows that have such a k, then over the batch."""
    _, cache = model.run_with_cache(tokens)
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        p = cache["pattern", layer]  # [batch, head, q, k]
        for b, row in enumerate(tokens.tolist()):
            per_row = []
            for q in range(len(row)):
                targets = sorted({j + 1 for j in range(len(row)) if j != q and row[j] == row[q] and j + 1 <= q})
                if targets:
                    per_row.append(p[b, :, q, targets].sum(-1))
            out[layer] += torch.stack(per_row).mean(0) / len(tokens)
    return out


def test_default_view_shows_the_induction_head(zoo_model):
    at = _app()
    assert not at.exception and not at.error
    from core import attention

    toks = attention.repeated_random_tokens(zoo_model, attention.DEFAULT_SEQ_LEN, attention.DEFAULT_BATCH, seed=0)
    scores = _independent_induction_scores(zoo_model, toks)
    layer, head = divmod(int(scores.argmax()), zoo_model.cfg.n_heads)
    assert layer == zoo_model.cfg.n_layers - 1  # the induction head sits in the last layer
    assert (at.selectbox(key="layer").value, at.selectbox(key="head").value) == (layer, head)
    assert at.query_params["model"] == "ce-induction-2l"
    assert at.query_params["layer"] == str(layer) and at.query_params["head"] == str(head)
    assert f"induction {scores[layer, head]:.2f}" in at.markdown[0].value


def test_heatmap_numbers_equal_a_plain_forward_pass(zoo_model):
    at = _app()
    layer, head = at.selectbox(key="layer").value, at.selectbox(key="head").value
    prompt = at.sidebar.text_area[0].value
    _, cache = zoo_model.run_with_cache(zoo_model.to_tokens(prompt))
    fig = _figure(at, f"L{layer}H{head} attention pattern")
    np.testing.assert_allclose(_z(fig["data"][0]), cache["pattern", layer][0, head].numpy(), atol=1e-6)
    assert fig["data"][0]["x"][1].startswith("1: ")


def test_prompt_change_redraws_and_goes_into_the_url():
    at = _app()
    at.sidebar.text_area[0].set_value("the cat sat on the mat").run()
    assert not at.exception
    layer, head = at.selectbox(key="layer").value, at.selectbox(key="head").value
    fig = _figure(at, f"L{layer}H{head} attention pattern")
    assert len(_z(fig["data"][0])) == 7  # BOS + 6 words
    assert at.query_params["prompt"] == "the cat sat on the mat"


def test_link_reopens_the_same_view():
    at = _app(model="ce-induction-2l", prompt="a red bird and a red bird", layer="0", head="2")
    assert not at.exception
    assert at.sidebar.text_area[0].value == "a red bird and a red bird"
    assert (at.selectbox(key="layer").value, at.selectbox(key="head").value) == (0, 2)
    assert _figure(at, "L0H2 attention pattern")


def test_out_of_range_head_in_url_falls_back_to_default():
    at = _app(layer="99", head="-3")
    assert not at.exception and at.selectbox(key="layer").value < 2


def test_empty_prompt_is_a_clear_message():
    at = _app()
    at.sidebar.text_area[0].set_value("   ").run()
    assert not at.exception
    assert any("prompt is empty" in w.value for w in at.warning)


def test_long_prompt_is_truncated_with_a_message(zoo_model):
    at = _app(prompt=" ".join(["the cat sat"] * 100))
    assert not at.exception
    assert any("301 tokens long" in w.value and "first 128 tokens" in w.value for w in at.warning)
    layer, head = at.selectbox(key="layer").value, at.selectbox(key="head").value
    assert len(_z(_figure(at, f"L{layer}H{head} attention pattern")["data"][0])) == 128


def test_html_in_the_prompt_is_shown_as_text():
    evil = "<script>alert(1)</script> <b>the</b> cat"
    at = _app(prompt=evil)
    assert not at.exception
    assert at.sidebar.text_area[0].value == evil  # kept verbatim, not lost
    layer, head = at.selectbox(key="layer").value, at.selectbox(key="head").value
    fig = _figure(at, f"L{layer}H{head} attention pattern")
    labels = fig["data"][0]["x"]
    assert labels[1:4] == ["1: &lt;", "2: &lt;unk&gt;", "3: &gt;"]
    for el in at.get("plotly_chart"):
        assert "<script" not in el.proto.spec and "<b>the" not in el.proto.spec
    frames = at.get("iframe")
    assert frames, "CircuitsVis frame missing"
    src = frames[0].proto.srcdoc
    assert src.count("</script>") == 1 and "\\u003cscript" not in src.split("CircuitsVis.render")[0][-10:]


def test_unknown_model_is_a_clear_message():
    at = _app(model="no-such-model-xyz")
    assert not at.exception
    assert any("Unknown model 'no-such-model-xyz'" in _plain(e.value) for e in at.error)


def test_offline_pretrained_model_is_a_clear_message(offline_hub):
    at = _app(model="gpt2-small")
    assert not at.exception
    assert any("Cannot download 'gpt2-small'" in _plain(e.value) and "ce-induction-2l" in _plain(e.value) for e in at.error)


def test_corrupt_model_folder_is_a_clear_message(tmp_path):
    bad = tmp_path / "broken-model"
    shutil.copytree(models.ZOO_DIR / models.DEFAULT_MODEL, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 10)
    at = _app(model=str(bad))
    assert not at.exception
    assert any("model.safetensors is corrupt" in _plain(e.value) for e in at.error)


def test_local_hf_checkpoint_can_be_explored(tiny_gpt2_dir):
    path, _ = tiny_gpt2_dir
    at = _app(model=str(path), prompt="the king saw the king")
    assert not at.exception and not at.error
    assert at.selectbox(key="layer").value in (0, 1)


def test_composition_control_shows_the_core_numbers(zoo_model):
    from core import attention

    at = _app()
    layer, head = at.selectbox(key="layer").value, at.selectbox(key="head").value
    sources = [attention.parse_head(s) for s in at.multiselect[0].value]
    assert sources, "previous-token heads preselected"
    toks = attention.repeated_random_tokens(zoo_model, attention.DEFAULT_SEQ_LEN, attention.DEFAULT_BATCH, seed=0)
    cases = [("K", False), ("Q", False), ("V", False), ("K", True)]
    for on, everyone in cases:
        at.get("button_group")[0].set_value(on)
        if everyone:
            at.checkbox(key="ablate_also").check()
        at.run()
        also = [h for h in attention.induction_heads(
            attention.head_scores(zoo_model, toks)["induction"], layer) if h != head] if everyone else []
        expected = attention.ablate_composition(
            zoo_model, toks, attention.DEFAULT_SEQ_LEN, sources, (layer, head), on.lower(), also
        )
        values = {m.label: m.value for m in at.metric}
        assert values[f"L{layer}H{head} induction score"] == f"{expected.target_score:.3f}"
        assert values["Repeated-half loss (nats)"] == f"{expected.loss:.3f}"


def test_markdown_in_a_model_name_is_shown_as_text():
    at = _app(model="[click](http://example.com) *x*")
    assert not at.exception
    shown = [e.value for e in at.error]
    assert shown and all("](http" not in v and "\\[click\\]" in v for v in shown)


def test_default_prompts_are_in_vocabulary(zoo_model):
    from core.session import DEFAULT_PROMPTS

    str_tokens = zoo_model.to_str_tokens(DEFAULT_PROMPTS[models.DEFAULT_MODEL])
    assert "<unk>" not in str_tokens


def test_switching_model_in_the_sidebar_resets_the_view(tiny_gpt2_dir):
    path, _ = tiny_gpt2_dir
    at = _app()
    assert at.selectbox(key="layer").value == 1
    at.sidebar.selectbox(key="model_choice").set_value(session_other()).run()
    at.sidebar.text_input(key="model_other").input(str(path)).run()
    assert not at.exception and not at.error
    assert at.query_params["model"] == str(path)
    assert at.sidebar.text_area[0].value == "When Mary and John went to the store, John gave a drink to"
    layer, head = at.selectbox(key="layer").value, at.selectbox(key="head").value
    assert 0 <= layer < 2 and 0 <= head < 4
    assert at.query_params["layer"] == str(layer)


def session_other():
    from core.session import OTHER

    return OTHER
