"""The SAE features page (AppTest): dashboards against direct sae_lens encode calls, index reuse,
search, feature ablation, and bad input."""
import re
import time

import numpy as np
import pytest
import torch

from core import corpus, models, sae_index, saes
from tests.helpers import figure_spec, heatmap_z, open_app, plain, save_sae

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
    docs = corpus.documents(loaded.card["corpus"], model.tokenizer)
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
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    assert not at.exception and not at.error and not at.warning
    assert at.selectbox(key="sae_embedded").value == "ce-circuits-3l-mlp-res2-relu"
    spec = figure_spec(at, "Strongest SAE features")
    tokens = mlp_lm.to_tokens(MLP_PROMPT)
    _, cache = mlp_lm.run_with_cache(tokens, names_filter=relu_sae.hook_name)
    direct = relu_sae.sae.encode(cache[relu_sae.hook_name][0]).detach()
    features = [int(f) for (f,) in spec["data"][1]["customdata"][:: tokens.shape[1]]]
    # The features shown: each one of the 3 strongest at some token after BOS.
    top3 = {int(f) for row in direct[1:] for f, v in zip(row.topk(3).indices, row.topk(3).values) if v > 0}
    assert set(features) == top3
    z = heatmap_z(spec["data"][0])  # [feature, pos]
    assert np.allclose(z[:, 1:], direct[1:, features].T.numpy(), atol=1e-4)
    assert np.all(z[:, 0] == 0)  # BOS left out
    # Default feature: the strongest one at the last token, in the URL too.
    best = int(direct[-1].argmax())
    assert at.query_params["feature"] == [str(best)] or at.query_params["feature"] == str(best)
    assert f"Feature {best} on this prompt" in " ".join(m.value for m in at.markdown)


def test_feature_dashboard_numbers_match_direct_encode_calls(mlp_lm, relu_sae):
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    at.segmented_control(key="sae_view").set_value("feature").run()
    assert not at.exception and not at.error and not at.warning
    f = int(at.number_input(key="sae_feature_input").value)
    acts, toks = _corpus_acts(mlp_lm, relu_sae)
    col = acts[:, f]
    fired = col > 0
    assert _metric(at, "Density") == f"{float(fired.float().mean()):.3%}"
    assert _metric(at, "Max activation") == f"{float(col.max()):.3f}"
    assert _metric(at, "Mean when firing") == f"{float(col[fired].mean()):.3f}"
    hist = figure_spec(at, f"Feature {f}: activation histogram")
    assert sum(heatmap_z({"z": hist["data"][0]["y"]}) if isinstance(hist["data"][0]["y"], dict) else hist["data"][0]["y"]) == int(fired.sum())
    # Through the final LayerNorm by hand: centre the decoder row, scale by ln_final.w, unembed.
    row = relu_sae.sae.W_dec[f].detach()
    effects = ((row - row.mean()) * mlp_lm.ln_final.w.detach()) @ mlp_lm.W_U.detach()
    up = figure_spec(at, "Promoted tokens")
    x = heatmap_z({"z": up["data"][0]["x"]}) if isinstance(up["data"][0]["x"], dict) else np.array(up["data"][0]["x"])
    assert np.allclose(x, effects.topk(10).values.numpy(), atol=1e-4)
    # Top contexts: the strongest activations in the corpus, in order.
    shown = [float(v) for v in re.findall(r"<b>([0-9.]+)</b> · document", _html(at))]
    assert np.allclose(shown, col.topk(len(shown)).values.numpy(), atol=1.5e-3)
    assert len(shown) == 10


@pytest.mark.slow  # a secondary view: CI runs it
def test_second_opening_reads_the_index(mlp_lm, relu_sae, monkeypatch):
    first = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    first.segmented_control(key="sae_view").set_value("feature").run()
    f = first.number_input(key="sae_feature_input").value

    def no_build(*args, **kwargs):
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(sae_index, "collect", no_build)
    again = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT, feature=str(f))
    again.segmented_control(key="sae_view").set_value("feature").run()
    assert not again.exception and not again.error
    assert _metric(again, "Max activation") == _metric(first, "Max activation")
    assert again.number_input(key="sae_feature_input").value == f


@pytest.mark.slow  # a secondary view: CI runs it
def test_search_ablation_and_own_text(mlp_lm, relu_sae):
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
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
    assert any("2 tokens" in plain(w.value) for w in at.warning)
    at.text_input(key="sae_search_logit").set_value("are").run()
    effects = relu_sae.sae.W_dec.detach() @ mlp_lm.W_U.detach()[:, int(mlp_lm.to_tokens("are", prepend_bos=False)[0, 0])]
    logit_buttons = [b for b in at.button if b.key and b.key.startswith("sae_logit_")]
    assert logit_buttons[0].key == f"sae_logit_{int(effects.argmax())}"


def test_bad_sae_input_gets_messages(tmp_path, tiny_gpt2_dir):
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    at.selectbox(key="sae_source").set_value("local").run()
    assert any("Type the folder" in plain(w.value) for w in at.warning)
    at.text_input(key="sae_folder").set_value(str(tmp_path / "nowhere")).run()
    assert any("no folder" in plain(w.value) for w in at.warning)

    save_sae(tmp_path / "wide", 768, "blocks.1.hook_resid_post")
    at.text_input(key="sae_folder").set_value(str(tmp_path / "wide")).run()
    assert any("expects 768 numbers per token" in plain(w.value) for w in at.warning)
    assert not at.exception
    at.selectbox(key="sae_source").set_value("pretrained").run()
    assert any("registry has no SAE" in plain(w.value) for w in at.warning)
    # A model with no embedded SAE names the ones that exist.
    folder, _ = tiny_gpt2_dir
    other = open_app(page="saes", model=str(folder), prompt="the cat")
    assert any("No embedded SAE was trained" in plain(w.value) for w in other.warning)
    assert not other.exception


def test_feature_and_sae_from_the_url(mlp_lm, relu_sae):
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT, feature="999999")
    assert not at.exception and not at.error
    tokens = mlp_lm.to_tokens(MLP_PROMPT)
    _, cache = mlp_lm.run_with_cache(tokens, names_filter=relu_sae.hook_name)
    best = int(relu_sae.sae.encode(cache[relu_sae.hook_name][0, -1]).argmax())
    assert any("Feature 999999 does not exist" in i.value and f"showing feature {best}" in i.value for i in at.info)
    assert at.query_params["feature"] in (str(best), [str(best)])
    # A link names the SAE and the feature: both come back.
    link = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT, sae="ce-circuits-3l-mlp-res2-topk", feature="5")
    assert link.selectbox(key="sae_embedded").value == "ce-circuits-3l-mlp-res2-topk"
    link.segmented_control(key="sae_view").set_value("feature").run()
    assert link.number_input(key="sae_feature_input").value == 5 and not link.exception


def test_default_model_opens_on_its_embedded_sae():
    """A fresh start (no URL parameters): the default zoo model and its embedded SAE, dashboard and all."""
    at = open_app(page="saes")
    assert not at.exception and not at.error and not at.warning
    assert at.selectbox(key="sae_embedded").value == "ce-induction-2l-res1-topk"
    figure_spec(at, "Strongest SAE features")
    at.segmented_control(key="sae_view").set_value("feature").run()
    assert not at.exception and not at.error
    assert "Top activating contexts" in " ".join(m.value for m in at.markdown)


# ---------------------------------------------------------------------------------------------
# Issue 16: the index built in the background, bad folders, a full disk, a damaged file, file
# names as text, jargon explained, search labels that fit
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def built_indexes():
    """The embedded SAEs' indexes of the tests above, built before them, as on a server that has run
    before: their dashboards are there at once. A first visit, which builds in the background, is
    tested below with a folder of its own."""
    for name in ("ce-circuits-3l-mlp-res2-relu", "ce-circuits-3l-mlp-res2-topk", "ce-induction-2l-res1-topk"):
        loaded = saes.load_embedded(name)
        model = models.load_model(loaded.card["model"])
        sae_index.open_index(model, loaded, corpus.documents(loaded.card["corpus"], model.tokenizer))


def _index_of(model, loaded, directory):
    """The index file the page uses for an embedded SAE's corpus in `directory`."""
    docs = [d for d in corpus.documents(loaded.card["corpus"], model.tokenizer) if len(d) > 1]
    return sae_index.index_path(sae_index.index_key(model, loaded, docs), directory)


def _finish(at, path, timeout=300):
    """Wait for the background build of `path` (if any), then rerun the page, as its poll does."""
    build = sae_index.current_build(path)
    if build is not None:
        assert build.wait(timeout)
    return at.run()


def _infos(at) -> str:
    return "\n".join(plain(i.value) for i in at.info)


@pytest.fixture()
def held_collect(monkeypatch):
    import threading

    gate, calls = threading.Event(), []
    original = sae_index.collect

    def held(*args, **kwargs):
        calls.append(1)
        assert gate.wait(300), "the test never let the build go on"
        return original(*args, **kwargs)

    monkeypatch.setattr(sae_index, "collect", held)
    yield gate, calls
    gate.set()


@pytest.mark.slow  # builds feature indexes
def test_first_visit_builds_the_index_in_the_background(mlp_lm, relu_sae, tmp_path, monkeypatch, held_collect):
    gate, calls = held_collect
    monkeypatch.setenv(sae_index.DATA_ENV, str(tmp_path))
    path = _index_of(mlp_lm, relu_sae, tmp_path)
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    assert not at.exception and not at.error and not at.warning
    bars = at.get("progress")
    assert len(bars) == 1 and "Building the feature index over the zoo corpus" in plain(bars[0].proto.text)
    figure_spec(at, "Strongest SAE features")  # the prompt's features meanwhile
    at.segmented_control(key="sae_view").set_value("feature").run()
    assert not at.exception and "appear when the corpus index is built" in _infos(at)
    figure_spec(at, "Promoted tokens")  # logit effects need no index
    assert not [m for m in at.metric if m.label == "Density"]
    # Another tab asks for the same index: it waits on the same build. Leaving the page and coming
    # back, or a rerun, does not start another one either.
    other = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    assert other.get("progress") and not other.exception
    at.switch_page("pages/attention.py").run()
    at.switch_page("pages/saes.py").run()
    assert at.get("progress") and sae_index.current_build(path) is not None
    assert len(calls) == 1
    gate.set()
    at = _finish(at, path)
    assert not at.get("progress") and len(calls) == 1
    at.segmented_control(key="sae_view").set_value("feature").run()
    f = int(at.number_input(key="sae_feature_input").value)
    acts, _ = _corpus_acts(mlp_lm, relu_sae)
    assert _metric(at, "Max activation") == f"{float(acts[:, f].max()):.3f}"
    other = other.run()
    assert not other.get("progress") and len(calls) == 1


@pytest.mark.parametrize("folder", ["/tmp/" + "s" * 300, "/tmp/sae\x00folder", "/" + "/".join(["d" * 200] * 25)],
                         ids=["300-character-name", "nul-byte", "path-over-4096"])
def test_impossible_sae_folders_are_messages(folder):
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    at.selectbox(key="sae_source").set_value("local").run()
    at.text_input(key="sae_folder").set_value(folder).run()
    assert not at.exception
    assert any("NUL character" in plain(w.value) or "too long for this machine's file system" in plain(w.value)
               for w in at.warning)


@pytest.mark.slow  # builds feature indexes
def test_full_disk_is_a_message_in_the_page(mlp_lm, relu_sae, tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.setenv(sae_index.DATA_ENV, str(tmp_path))
    path = _index_of(mlp_lm, relu_sae, tmp_path)
    real_connect = sqlite3.connect

    def connect(database, *args, **kwargs):
        con = real_connect(database, *args, **kwargs)
        if str(database).endswith(".tmp"):
            con.execute("PRAGMA max_page_count = 40")  # a tiny quota: SQLite's own 'database or disk is full'
        return con

    monkeypatch.setattr(sae_index.sqlite3, "connect", connect)
    at = _finish(open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT), path)
    assert not at.exception and not at.error
    message = "\n".join(plain(w.value) for w in at.warning)
    assert "The disk is full" in message and "Nothing was lost" in message
    assert list(tmp_path.iterdir()) == []  # no temporary file, no journal
    figure_spec(at, "Strongest SAE features")  # the page goes on without the index
    # Space freed: "Try again" builds it.
    monkeypatch.setattr(sae_index.sqlite3, "connect", real_connect)
    at.button(key="sae_index_retry").click().run()
    at = _finish(at, path)
    assert not at.warning and not at.exception and path.exists()
    assert any("Feature index:" in c.value for c in at.caption)


@pytest.mark.slow  # builds feature indexes
def test_damaged_index_file_is_rebuilt_not_a_traceback(mlp_lm, relu_sae, tmp_path, monkeypatch):
    import os

    monkeypatch.setenv(sae_index.DATA_ENV, str(tmp_path))
    path = _index_of(mlp_lm, relu_sae, tmp_path)
    at = _finish(open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT), path)
    at.segmented_control(key="sae_view").set_value("feature").run()
    before = _metric(at, "Max activation")
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.write(b"\0" * 100)  # the header overwritten; size and modification time unchanged
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    at.run()
    assert not at.exception and not at.error
    assert at.get("progress") or _metric(at, "Max activation") == before  # rebuilding, or rebuilt already
    at = _finish(at, path)
    assert not at.exception and _metric(at, "Max activation") == before
    with open(path, "rb") as fh:
        assert fh.read(16) == b"SQLite format 3\0"


@pytest.mark.slow  # builds feature indexes
def test_uploaded_corpus_file_name_is_shown_as_text(tmp_path, monkeypatch):

    monkeypatch.setenv(sae_index.DATA_ENV, str(tmp_path / "data"))
    save_sae(tmp_path / "sae", 128, "blocks.1.hook_resid_post")
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    at.selectbox(key="sae_source").set_value("local").run()
    at.text_input(key="sae_folder").set_value(str(tmp_path / "sae")).run()
    name = "[x](javascript:alert(1)) **bold** $x^2$ <b>b</b>.txt"
    at.file_uploader(key="sae_corpus_file").set_value((name, b"the keys are old\nmary went home\n", "text/plain")).run()
    for _ in range(60):  # a two-line corpus: built within a second or two
        if not at.get("progress"):
            break
        time.sleep(1)
        at.run()
    at.segmented_control(key="sae_view").set_value("feature").run()
    assert not at.exception
    shown = [el.value for el in list(at.caption) + list(at.markdown) + list(at.info) if "bold" in el.value]
    assert any("Feature index:" in s for s in shown) and any("Top activating contexts" in s or "never fires" in s
                                                              for s in shown)
    for s in shown:
        assert "**bold**" not in s and "](javascript" not in s and "$x^2$" not in s and "<b>" not in s
        assert name in plain(s)  # shown, as typed


@pytest.mark.slow  # a secondary view of the page: CI runs it, development runs skip it
def test_jargon_on_the_page_has_a_one_line_explanation(mlp_lm):
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    card = next(c for c in at.caption if "explained variance" in c.value)
    for word in ("hook_resid_pre", "L0", "Explained variance", "Dead features"):
        assert word in card.proto.help, word
    assert "residual stream as it enters layer 2" in card.proto.help
    # Rotary positions act inside attention: this model's residual stream holds no position embedding.
    assert mlp_lm.cfg.positional_embedding_type == "rotary" and "position embedding" not in card.proto.help
    at.segmented_control(key="sae_view").set_value("feature").run()
    logit = next(c for c in at.caption if "W_dec · W_U" in c.value)
    assert "W_dec[f]" in logit.proto.help and "unembedding" in logit.proto.help
    kl = next(c for c in at.caption if "KL" in c.value)
    assert "Kullback–Leibler" in kl.proto.help and "nats" in kl.proto.help


@pytest.mark.slow  # builds feature indexes
def test_search_results_fit_their_column(mlp_lm, relu_sae):
    """Issue 16 (9): at 1280×720 a search column is 263 px wide, about 40 characters of a button's
    label (measured in Chromium, tests/test_saes_browser.py); the old labels (57+ characters) lost
    their "(fires on N)". The count is in a short label now, the occurrences in a caption above."""
    at = open_app(page="saes", model="ce-circuits-3l-mlp", prompt=MLP_PROMPT)
    at.segmented_control(key="sae_view").set_value("search").run()
    at.text_input(key="sae_search_token").set_value("keys").run()
    at.text_input(key="sae_search_logit").set_value("are").run()
    acts, toks = _corpus_acts(mlp_lm, relu_sae)
    token = int(mlp_lm.to_tokens("keys", prepend_bos=False)[0, 0])
    on_token = acts[toks == token]
    buttons = [b for b in at.button if b.key and b.key.startswith("sae_tok_")]
    assert buttons
    for b in buttons:
        f = int(b.key.removeprefix("sae_tok_"))
        assert len(b.label) <= 36, b.label
        assert b.label.endswith(f"fires {int((on_token[:, f] > 0).sum()):,}"), b.label
        assert f"{float(on_token[:, f].mean()):.3f}" in b.label
    assert any(f"over the {int((toks == token).sum()):,} occurrences" in c.value for c in at.caption)
    logit = [b for b in at.button if b.key and b.key.startswith("sae_logit_")]
    assert logit and all(len(b.label) <= 36 for b in logit)


@pytest.mark.slow  # builds feature indexes
def test_loading_a_model_builds_its_embedded_sae_indexes_in_the_background(monkeypatch, tmp_path):
    """Issue 16: the embedded SAEs' indexes should not make the SAE page's first visitor wait. When
    the app first loads a model, the indexes of that model's embedded SAEs start building in the
    background; the SAE page then opens them without building again."""
    from core.ui import cache

    monkeypatch.setenv(cache.PREFETCH_ENV, "1")
    monkeypatch.setenv(sae_index.DATA_ENV, str(tmp_path))
    monkeypatch.setattr(cache, "_prefetched", set())
    monkeypatch.setattr(cache, "_prefetch_queue", [])
    monkeypatch.setattr(cache, "_prefetch_status", {})
    monkeypatch.setattr(cache, "_prefetch_worker", None)
    # The worker builds the loaded model's SAEs first, then every other embedded SAE: keep this test
    # to the loaded model's (tests/test_classroom.py checks the order over the whole zoo).
    monkeypatch.setattr(models, "zoo_models", lambda: ["ce-circuits-3l-attn"])
    at = open_app(model="ce-circuits-3l-attn")  # the Attention page: no SAE asked for
    assert not at.exception
    model = models.load_model("ce-circuits-3l-attn")
    names = saes.embedded_saes("ce-circuits-3l-attn")
    assert names
    deadline = 120
    for name in names:
        loaded = saes.load_embedded(name)
        docs = corpus.documents(loaded.corpus_spec, model.tokenizer)
        path = sae_index.index_path(sae_index.index_key(model, loaded, sae_index._clean_docs(docs)))
        # Requested by the model's first load, from a background thread: it may not have asked yet,
        # or may be done already (then the file is there).
        start = time.monotonic()
        while not path.exists() and sae_index.current_build(path) is None and time.monotonic() - start < deadline:
            time.sleep(0.05)
        build = sae_index.current_build(path)
        assert path.exists() or build is not None, name
        if build is not None:
            assert build.wait(deadline) and not build.failed, name
        assert path.exists() and str(path).startswith(str(tmp_path))
        assert sae_index.request_index(model, loaded, docs).done  # a visit now finds it ready
    assert all(text == "ready" for _, text in cache.embedded_index_progress().values())
    if cache._prefetch_worker is not None:
        cache._prefetch_worker.join(deadline)  # nothing left writing into tmp_path after the test
