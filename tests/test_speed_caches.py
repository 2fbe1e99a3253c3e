"""What keeps a prompt change and a second server start fast: head scores kept on disk (keyed by a
hash of the weights), and pages that compute only what they show."""
import pytest
import streamlit as st
import torch

from core import attention, models, paths
from core.models import load_model
from core.ui import cache
from tests.helpers import make_gpt2_dir, open_app

SEQ_LEN, BATCH = 8, 4


@pytest.fixture()
def data(tmp_path, monkeypatch):
    """A data folder of this test's own, and no Streamlit cache from earlier tests."""
    folder = tmp_path / "data"
    monkeypatch.setenv(paths.DATA_ENV, str(folder))
    st.cache_data.clear()
    yield folder
    st.cache_data.clear()


@pytest.fixture()
def gpt2(tmp_path, data):
    folder, _ = make_gpt2_dir(tmp_path / "gpt2")
    return folder, load_model(str(folder))


def _direct(model, seq_len=SEQ_LEN, batch=BATCH):
    tokens = attention.repeated_random_tokens(model, seq_len, batch, seed=0)
    _, full = model.run_with_cache(tokens)  # a plain full forward pass, logits and all
    patterns = attention.stacked_patterns(full, model.cfg.n_layers)
    return {t: attention.head_scores_from_patterns(patterns, tokens, t) for t in attention.HEAD_TYPES}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _count_computations(monkeypatch) -> list:
    calls = []
    real = attention.head_scores

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "head_scores", counted)
    return calls


def test_head_scores_are_computed_once_then_read_back_bit_identical(gpt2, monkeypatch):
    folder, model = gpt2
    key = model._circuit_explorer_weights_key
    path = cache.head_scores_file(model, SEQ_LEN, BATCH)
    assert path == paths.data_dir() / "head-scores" / f"{key}-{SEQ_LEN}-{BATCH}-float32.safetensors"
    calls = _count_computations(monkeypatch)
    computed = cache.head_scores(model, SEQ_LEN, BATCH)
    assert calls == [1] and path.exists()
    assert _equal(computed, _direct(model))  # the pass that stops before the unembedding: the same patterns
    assert not list(path.parent.glob("*.tmp"))  # written to a temporary file, then renamed

    # A new server: another model object from the same weights (reloaded from the converted copy).
    st.cache_data.clear()
    again = load_model(str(folder))
    assert again._circuit_explorer_weights_key == key
    read = cache.head_scores(again, SEQ_LEN, BATCH)
    assert calls == [1]  # read from disk, not computed
    assert _equal(read, computed)
    # Another batch or length is another file.
    cache.head_scores(again, SEQ_LEN, BATCH + 1)
    assert calls == [1, 1] and cache.head_scores_file(again, SEQ_LEN, BATCH + 1).exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other format", "other shape"])
def test_a_damaged_head_scores_file_is_recomputed_and_rewritten(gpt2, monkeypatch, damage):
    from safetensors.torch import save_file

    _, model = gpt2
    computed = cache.head_scores(model, SEQ_LEN, BATCH)
    path = cache.head_scores_file(model, SEQ_LEN, BATCH)
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other format":
        save_file({k: v for k, v in computed.items()}, str(path), metadata={"format": "0"})
    else:
        save_file({k: torch.zeros(1, 1) for k in computed}, str(path), metadata=cache._head_scores_meta() | {"none": ""})
    st.cache_data.clear()
    calls = _count_computations(monkeypatch)
    again = cache.head_scores(model, SEQ_LEN, BATCH)
    assert calls == [1]
    assert _equal(again, computed)
    st.cache_data.clear()
    assert _equal(cache._read_head_scores(path, model), computed)  # rewritten whole


def test_a_failed_write_is_ignored(gpt2, tmp_path, monkeypatch):
    _, model = gpt2
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(paths.DATA_ENV, str(blocker))  # data_dir()/head-scores cannot be made
    scores = cache.head_scores(model, SEQ_LEN, BATCH)
    assert _equal(scores, _direct(model))
    assert blocker.read_text() == "not a folder"


def test_a_model_without_a_weights_key_never_touches_the_disk(data, monkeypatch, zoo_model):
    assert not hasattr(zoo_model, "_circuit_explorer_weights_key")
    assert cache.head_scores_file(zoo_model, SEQ_LEN, BATCH) is None

    def no_disk(*args, **kwargs):
        raise AssertionError("the disk was used")

    monkeypatch.setattr(cache, "_read_head_scores", no_disk)
    monkeypatch.setattr(cache, "_write_head_scores", no_disk)
    assert _equal(cache.head_scores(zoo_model, SEQ_LEN, BATCH), _direct(zoo_model))
    assert not data.exists() or not (data / "head-scores").exists()


def test_the_attention_page_keeps_head_scores_for_the_next_start(gpt2, monkeypatch):
    """First start: the page scores the heads and keeps them; a second start (Streamlit's caches
    cleared) reads them: the same default head and header, no computation."""
    folder, model = gpt2
    prompt = "the green king saw seven cold fish near a dark hill . the green king saw seven"
    st.cache_resource.clear()
    first = open_app(model=str(folder), prompt=prompt)
    assert not first.exception and not first.error
    seq_len = min(attention.DEFAULT_SEQ_LEN, (model.cfg.n_ctx - 1) // 2)
    assert cache.head_scores_file(model, seq_len, attention.DEFAULT_BATCH).exists()
    st.cache_resource.clear()
    st.cache_data.clear()
    calls = _count_computations(monkeypatch)
    second = open_app(model=str(folder), prompt=prompt)
    assert not second.exception and not second.error and calls == []
    assert [s.value for s in second.selectbox] == [s.value for s in first.selectbox]
    assert second.markdown[0].value == first.markdown[0].value


# ---------------------------------------------------------------------------------------------
# The unembedding's layout: the same logits without TransformerLens's per-pass copy of W_U
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2 folder", "zoo"])
def test_row_major_unembedding_gives_bit_identical_logits(gpt2, which):
    model = gpt2[1] if which == "gpt2 folder" else load_model("ce-circuits-3l-mlp")
    assert model.W_U.T.is_contiguous()  # load_model stores it so
    model.unembed.W_U = torch.nn.Parameter(model.W_U.detach().contiguous())  # as TransformerLens keeps it
    tokens = torch.tensor([[0, 20, 278, 356, 40, 41, 42, 43]])
    before = model.W_U.detach().clone()
    with torch.inference_mode():
        logits, run = model.run_with_cache(tokens)
    assert models.unembed_row_major(model) is model
    w = model.W_U
    assert w.T.is_contiguous() and torch.equal(w, before) and w.requires_grad
    with torch.inference_mode():
        again, run_again = model.run_with_cache(tokens)
    assert torch.equal(again, logits)
    assert all(torch.equal(run[k], run_again[k]) for k in run.keys())
    models.unembed_row_major(model)
    assert model.W_U is w  # already row-major: left as it is


def test_token_texts_decode_each_id_as_the_store_does(zoo_model):
    from core import store

    ids = torch.tensor([[5, 20, 20], [278, 0, 356]])
    assert cache.token_texts(zoo_model, ids) == [store.decode(zoo_model, int(t)) for t in ids.flatten()]
    assert cache.token_texts(zoo_model, [356, 5]) == [store.decode(zoo_model, 356), store.decode(zoo_model, 5)]
    assert cache.token_texts(zoo_model, []) == []


# ---------------------------------------------------------------------------------------------
# Pages compute only what they show
# ---------------------------------------------------------------------------------------------

IOI = "When Mary and John went to the store, John gave a drink to"


def _forbid(monkeypatch, module, *names):
    def forbidden(*args, **kwargs):
        raise AssertionError("computed for a tab that is not open")

    for name in names:
        monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("tab, shown, closed", [
    ("By component", "Direct effect of each component", ("by_head", "accumulated", "logit_lens", "top_neurons")),
    ("By head", "Direct effect of each head", ("by_component", "accumulated", "logit_lens", "top_neurons")),
    ("Accumulated residual", "lines+markers", ("by_component", "by_head", "logit_lens", "top_neurons")),
    ("Logit lens", "top-1 prob", ("by_component", "by_head", "accumulated", "top_neurons")),
    ("Neurons", "MLP 2", ("by_component", "by_head", "accumulated", "logit_lens")),
])
def test_the_attribution_page_computes_only_the_open_tab(monkeypatch, tab, shown, closed):
    from core import attribution

    _forbid(monkeypatch, attribution, *closed)
    at = open_app(page="attribution", model="ce-circuits-3l-mlp", prompt=IOI, attr_tab=tab)
    assert not at.exception, [e.value for e in at.exception]
    specs = " ".join(el.proto.spec for el in at.get("plotly_chart"))
    assert shown in specs


def test_the_logit_lens_labels_are_the_tokens_the_model_predicts(monkeypatch):
    """The lens's labels, decoded together (one take of the lock), are each top token's own text."""
    import html
    import json

    from core import attribution, store

    model = load_model("ce-circuits-3l-mlp")
    at = open_app(page="attribution", model="ce-circuits-3l-mlp", prompt=IOI, attr_tab="Logit lens")
    trace = next(json.loads(el.proto.spec)["data"][0] for el in at.get("plotly_chart") if "top-1 prob" in el.proto.spec)
    _, run = model.run_with_cache(model.to_tokens(IOI))
    lens = attribution.logit_lens(model, run, answer=0, k=5)
    shown = [[html.unescape(t) for t in layer] for layer in trace["text"]]  # the chart escapes markup
    assert shown == [[store.decode(model, int(ids[0])) for ids in layer] for layer in lens.top_ids]
    hover = [[[html.unescape(line.rsplit(": ", 1)[0]) for line in cell[1].split("<br>")] for cell in layer]
             for layer in trace["customdata"]]  # the top 5 of every cell, in order
    assert hover == [[[store.decode(model, int(t)) for t in ids] for ids in layer] for layer in lens.top_ids]


def _store_misses(at) -> int:
    import re

    return int(re.search(r"misses (\d+)", at.sidebar.caption[-1].value.replace("\\", "")).group(1))


def test_a_sidebar_prompt_change_reruns_nothing_on_the_steering_page(monkeypatch):
    """The Steer view has its own prompt: a new sidebar prompt shows the same numbers, computed once."""
    from core import steering

    calls = []
    for name in ("next_token_shift", "agreement_flip", "generate"):
        real = getattr(steering, name)
        monkeypatch.setattr(steering, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    at = open_app(page="steering", model="ce-circuits-3l-mlp", prompt="The keys on the cabinet")
    assert not at.exception and not at.warning
    shown = ([el.proto.spec for el in at.get("plotly_chart")], [c.value for c in at.caption], [c.value for c in at.code])
    done, misses = len(calls), _store_misses(at)
    at.sidebar.text_area(key="prompt").set_value("The key near the door").run()
    assert not at.exception
    assert len(calls) == done and _store_misses(at) == misses
    assert ([el.proto.spec for el in at.get("plotly_chart")], [c.value for c in at.caption],
            [c.value for c in at.code]) == shown
    # Another intervention is another computation, and other numbers.
    at.number_input(key="steer_alpha").set_value(2.0).run()
    assert not at.exception and len(calls) > done
    assert [el.proto.spec for el in at.get("plotly_chart")] != shown[0]
