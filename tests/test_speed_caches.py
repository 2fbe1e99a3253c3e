"""What keeps a prompt change and a second server start fast: head scores kept on disk (keyed by a
hash of the weights), and pages that compute only what they show."""
import pytest
import streamlit as st
import torch

from core import attention, paths
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
