"""SAEs: loading and fit checks, the embedded SAEs' cards, the feature index against direct
sae_lens `encode` calls, index reuse and rebuilds, logit effects and feature interventions."""
import json
import os
import re
import sqlite3
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core import corpus, models, sae_index, saes
from tests.helpers import save_sae

SAE_NAME = "ce-circuits-3l-mlp-res2-relu"


@pytest.fixture(scope="module")
def mlp_lm():
    return models.load_model("ce-circuits-3l-mlp")


@pytest.fixture(scope="module")
def loaded():
    return saes.load_embedded(SAE_NAME)


@pytest.fixture(scope="module")
def small_docs(mlp_lm, loaded):
    spec = dict(loaded.card["corpus"], documents=150)
    return corpus.documents(spec, mlp_lm.tokenizer)


@torch.no_grad()
def _dense(model, sae, docs):
    """[n tokens, d_sae] activations of every corpus token but BOS, one plain run per document,
    with (doc, pos, token) of each row: an independent computation of what the index holds."""
    name = sae.cfg.metadata.hook_name
    rows, where = [], []
    for d, doc in enumerate(docs):
        _, cache = model.run_with_cache(torch.tensor([doc]), names_filter=name)
        rows.append(sae.encode(cache[name][0, 1:]))
        where += [(d, p, doc[p]) for p in range(1, len(doc))]
    return torch.cat(rows), where


@pytest.fixture(scope="module")
def built(mlp_lm, loaded, small_docs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("index")
    index = sae_index.open_index(mlp_lm, loaded, small_docs, directory=directory)
    dense, where = _dense(mlp_lm, loaded.sae, small_docs)
    return index, dense, where, directory


# ---------------------------------------------------------------------------------------------
# Embedded SAEs and their cards
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", saes.embedded_saes())
def test_embedded_sae_reproduces_its_card(name):
    loaded = saes.load_embedded(name)
    card = loaded.card
    model = models.load_model(card["model"])
    saes.check_fits(model, loaded)
    docs = corpus.documents(card["eval"], model.tokenizer)
    q = saes.quality(model, loaded.sae, docs)
    assert q["tokens"] == card["tokens"]
    # The card rounds to 4 decimals (up to 5e-5 off). Another CPU sums in another order, so an
    # activation within float32 rounding of the firing threshold may land on the other side:
    # L0 and the dead-feature count move by whole activations (seen: 4 of 425,000 on one
    # machine). Allow 10 such flips; the continuous numbers move by far less than 2e-4.
    flips = 10
    assert q["l0"] == pytest.approx(card["l0"], abs=5e-5 + flips / card["tokens"]), "l0"
    for key in ("explained_variance", "ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablated", "loss_recovered"):
        assert q[key] == pytest.approx(card[key], abs=2e-4), key
    assert abs(q["dead_features"] - card["dead_features"]) <= 1  # a feature that fires once, near 0
    # A useful SAE: sparse, faithful, and the model still works with it spliced in.
    assert q["l0"] < 40 and q["explained_variance"] > 0.7 and q["loss_recovered"] > 0.6
    assert q["dead_features"] < 0.5 * card["d_sae"]


@torch.no_grad()
def test_quality_matches_a_hand_computation(mlp_lm, loaded):
    docs = corpus.documents(dict(loaded.card["eval"], documents=12), mlp_lm.tokenizer)
    q = saes.quality(mlp_lm, loaded.sae, docs, batch=5)
    sae, name = loaded.sae, loaded.hook_name
    l0 = n = 0
    xs, errs, ce, ce_sae = [], 0.0, 0.0, 0.0
    targets = 0
    for doc in docs:
        t = torch.tensor([doc])
        _, cache = mlp_lm.run_with_cache(t, names_filter=name)
        x = cache[name][0, 1:]
        f = sae.encode(x)
        l0 += int((f > 0).sum())
        n += len(x)
        xs.append(x)
        errs += float(((sae.decode(f) - x) ** 2).sum())

        def splice(act, hook):
            act[0, 1:] = sae.decode(sae.encode(act[0, 1:]))
            return act

        ce += float(F.cross_entropy(mlp_lm(t)[0, :-1], t[0, 1:], reduction="sum"))
        ce_sae += float(F.cross_entropy(mlp_lm.run_with_hooks(t, fwd_hooks=[(name, splice)])[0, :-1], t[0, 1:], reduction="sum"))
        targets += len(doc) - 1
    X = torch.cat(xs)
    assert q["l0"] == pytest.approx(l0 / n, rel=1e-6)
    assert q["explained_variance"] == pytest.approx(1 - errs / float(((X - X.mean(0)) ** 2).sum()), abs=1e-5)
    assert q["ce_loss_clean"] == pytest.approx(ce / targets, abs=1e-5)
    assert q["ce_loss_with_sae"] == pytest.approx(ce_sae / targets, abs=1e-5)


def test_embedded_saes_are_listed_per_model():
    assert SAE_NAME in saes.embedded_saes("ce-circuits-3l-mlp")
    assert SAE_NAME not in saes.embedded_saes("ce-circuits-3l-attn")
    for name in saes.embedded_saes():
        files = {p.name for p in (saes.SAE_DIR / name).iterdir()}
        assert {"cfg.json", "sae_weights.safetensors", "metrics.json", "SAE_CARD.md"} <= files


# ---------------------------------------------------------------------------------------------
# The index against direct encode calls
# ---------------------------------------------------------------------------------------------


def test_index_feature_stats_match_direct_encode(built):
    index, dense, where, _ = built
    assert index.n_tokens == dense.shape[0]
    checked = 0
    for f in range(index.d_sae):
        stats = index.feature(f)
        col = dense[:, f]
        fired = col > 0
        assert stats.n_fire == int(fired.sum())
        if not stats.n_fire:
            assert stats.top == [] and stats.max_act == 0
            continue
        assert stats.max_act == pytest.approx(float(col.max()), abs=1e-5)
        assert stats.mean_act == pytest.approx(float(col[fired].mean()), abs=1e-5)
        assert stats.density == pytest.approx(float(fired.float().mean()))
        # Top examples: the same values in the same order, at the right (doc, pos).
        values = col.sort(descending=True).values[: len(stats.top)]
        assert np.allclose([e.act for e in stats.top], values.numpy(), atol=1e-5)
        lookup = {(d, p): i for i, (d, p, _) in enumerate(where)}
        for e in stats.top + [e for _, _, ex in stats.intervals for e in ex]:
            assert float(col[lookup[(e.doc, e.pos)]]) == pytest.approx(e.act, abs=1e-5)
        for lo, hi, examples in stats.intervals:
            assert all(lo < e.act <= hi + 1e-6 for e in examples)
            # The index's batched runs and these single runs differ in the last float bits, which
            # may move a value that sits on an interval's edge.
            strict = int(((col > lo + 1e-5) & (col <= hi - 1e-5)).sum())
            loose = int(((col > lo - 1e-5) & (col <= hi + 1e-5)).sum())
            assert min(sae_index.PER_INTERVAL, strict) <= len(examples) <= min(sae_index.PER_INTERVAL, loose)
        counts, _ = np.histogram(col[fired].numpy(), bins=np.linspace(0, float(col.max()), sae_index.HIST_BINS + 1))
        assert sum(stats.hist_counts) == stats.n_fire
        assert np.abs(np.array(stats.hist_counts) - counts).sum() <= 2  # float rounding at bin edges only
        checked += 1
    assert checked > 100


def test_index_context_activations_and_token_search_match_direct_encode(built, small_docs):
    index, dense, where, _ = built
    rows_of_doc = {}
    for i, (d, p, _) in enumerate(where):
        rows_of_doc.setdefault(d, []).append(i)
    for f in (0, 5, int(dense.max(0).values.argmax())):
        docs_with_f = sorted({e.doc for e in index.feature(f).top[:3]})
        assert docs_with_f or int((dense[:, f] > 0).sum()) == 0
        for d in docs_with_f + [0, 7]:  # documents where it fires, and two others
            got = index.doc_activations(f, d)
            assert got[0] == 0.0 and len(got) == len(small_docs[d])
            assert np.allclose(got[1:], dense[rows_of_doc[d], f].numpy(), atol=1e-5)
        assert index.doc(3) == small_docs[3]
    # Search by token: mean activation over every occurrence of the token.
    tokens = torch.tensor([t for _, _, t in where])
    token = int(torch.mode(tokens).values)
    occ = tokens == token
    means = dense[occ].mean(0)
    got = index.features_for_token(token, k=5)
    assert [r["feature"] for r in got] == means.topk(5).indices.tolist()
    assert np.allclose([r["mean_act"] for r in got], means.topk(5).values.numpy(), atol=1e-5)
    assert got[0]["occurrences"] == int(occ.sum())
    assert index.features_for_token(10**6) == []


def test_second_opening_reads_the_index_without_a_forward_pass(built, loaded, small_docs):
    index, _, _, directory = built
    fresh = models.load_model("ce-circuits-3l-mlp")  # as after a restart: a new model object, same weights

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran")

    fresh.forward = no_forward
    fresh.run_with_cache = no_forward
    start = time.perf_counter()
    again = sae_index.open_index(fresh, loaded, small_docs, directory=directory)
    assert again.path == index.path
    assert again.feature(3) == index.feature(3)
    assert time.perf_counter() - start < 5


def test_corrupt_stale_or_incomplete_index_is_rebuilt(mlp_lm, loaded, small_docs, tmp_path):
    docs = small_docs[:20]
    first = sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path)
    expected = first.feature(1)
    calls = []
    original = sae_index.collect

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    sae_index.collect = counting
    try:
        first.path.write_bytes(b"this is not a database" * 100)  # corrupt
        assert sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path).feature(1) == expected
        assert len(calls) == 1
        with sqlite3.connect(first.path) as con:  # an interrupted build
            con.execute("UPDATE meta SET value = '0' WHERE key = 'complete'")
        assert sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path).feature(1) == expected
        assert len(calls) == 2
        with sqlite3.connect(first.path) as con:  # a file whose recorded key is another's
            con.execute("UPDATE meta SET value = 'other' WHERE key = 'key'")
        sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path)
        assert len(calls) == 3
        sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path)  # valid now: read
        assert len(calls) == 3
        # Another corpus (or model, or SAE) is another index.
        other = sae_index.open_index(mlp_lm, loaded, docs[:10], directory=tmp_path)
        assert other.path != first.path and len(calls) == 4
    finally:
        sae_index.collect = original


def test_empty_corpus_is_refused(mlp_lm, loaded, tmp_path):
    for docs in ([], [[mlp_lm.tokenizer.bos_token_id]]):
        with pytest.raises(sae_index.FeatureIndexError, match="empty"):
            sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path)
    with pytest.raises(saes.SAELoadError, match="empty"):
        saes.documents_from_text(mlp_lm, "\n  \n")
    docs = saes.documents_from_text(mlp_lm, "the keys are old\n\nmary went home")
    assert len(docs) == 2 and all(d[0] == mlp_lm.tokenizer.bos_token_id for d in docs)


# ---------------------------------------------------------------------------------------------
# Loading and fit
# ---------------------------------------------------------------------------------------------


def test_local_sae_round_trip_and_bad_folders(mlp_lm, tmp_path):
    good = tmp_path / "good"
    sae = save_sae(good, mlp_lm.cfg.d_model, "blocks.1.hook_resid_post")
    loaded = saes.load_local(good)
    saes.check_fits(mlp_lm, loaded)
    assert torch.equal(loaded.sae.W_dec, sae.W_dec)
    with pytest.raises(saes.SAELoadError, match="no folder"):
        saes.load_local(tmp_path / "missing")
    with pytest.raises(saes.SAELoadError, match="Type the path"):
        saes.load_local("  ")
    with pytest.raises(saes.SAELoadError, match="is a file"):
        saes.load_local(good / "cfg.json")
    with pytest.raises(saes.SAELoadError, match="sae_weights.safetensors missing"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "cfg.json").write_text("{}")
        saes.load_local(tmp_path / "half")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "cfg.json").write_text((good / "cfg.json").read_text())
    (bad / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(saes.SAELoadError, match="corrupt"):
        saes.load_local(bad)


def test_sae_that_does_not_fit_the_model_is_refused(mlp_lm, tmp_path):
    wide = saes.load_local(save_sae(tmp_path / "wide", 768, "blocks.1.hook_resid_post") and tmp_path / "wide")
    with pytest.raises(saes.SAELoadError, match="expects 768 numbers per token"):
        saes.check_fits(mlp_lm, wide)
    deep = saes.load_local(save_sae(tmp_path / "deep", mlp_lm.cfg.d_model, "blocks.9.hook_resid_pre") and tmp_path / "deep")
    with pytest.raises(saes.SAELoadError, match="does not have"):
        saes.check_fits(mlp_lm, deep)
    mlp = saes.load_local(save_sae(tmp_path / "mlp", mlp_lm.cfg.d_mlp, "blocks.0.mlp.hook_post") and tmp_path / "mlp")
    saes.check_fits(mlp_lm, mlp)  # an MLP-neuron SAE fits at hook_post


def test_pretrained_offline_fails_fast_and_unknown_ids_are_named(offline_hub):
    start = time.perf_counter()
    with pytest.raises(saes.SAELoadError, match="not reachable"):
        saes.load_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert time.perf_counter() - start < 3
    with pytest.raises(saes.SAELoadError, match="Unknown SAE release"):
        saes.load_pretrained("no-such-release", "x")
    with pytest.raises(saes.SAELoadError, match="has no SAE"):
        saes.load_pretrained("gpt2-small-res-jb", "blocks.99.hook_resid_pre")


def test_registry_lists_only_the_saes_made_for_the_model(mlp_lm):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    gpt2_like = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, d_vocab=10,
                                                          act_fn="gelu", model_name="gpt2"))
    listed = saes.pretrained_for_model(gpt2_like)
    assert "blocks.8.hook_resid_pre" in listed["gpt2-small-res-jb"]
    assert all(saes.pretrained_directory()[r].model in ("gpt2-small", "gpt2") for r in listed)
    assert saes.pretrained_for_model(mlp_lm) == {}


# ---------------------------------------------------------------------------------------------
# Logit effects and interventions
# ---------------------------------------------------------------------------------------------


def _folded(model_name: str):
    """The same zoo model with its LayerNorms folded and weights centred, as TL loads pretrained models."""
    folded = models.load_model(model_name)
    folded.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return folded


def _same_up_to_a_constant(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    """Equal after removing each row's mean over the vocabulary (TL centres W_U when it folds)."""
    torch.testing.assert_close(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), atol=atol, rtol=0)


def test_logit_effects_read_through_the_final_layernorm_like_a_folded_model(mlp_lm, loaded, tmp_path):
    """The zoo models keep ln_final.w unfolded; the effect of a feature must equal the plain
    W_dec @ W_U of the folded copy of the same model (where TL has put ln_final.w into W_U), as
    the neuron view does, and not the raw product."""
    folded = _folded("ce-circuits-3l-mlp")
    W = loaded.sae.W_dec.detach()
    for f in (0, 17, 300):
        ours = saes.logit_effects(mlp_lm, loaded.sae, f)
        _same_up_to_a_constant(ours[None], (W[f] @ folded.W_U)[None])
        _same_up_to_a_constant(ours[None], saes.logit_effects(folded, loaded.sae, f)[None])
        raw = W[f] @ mlp_lm.W_U  # the old number: ignores the final LayerNorm's weight
        assert not torch.allclose(ours - ours.mean(), raw - raw.mean(), atol=1e-2)
    for token in (5, 77):
        ours = saes.features_promoting(mlp_lm, loaded.sae, token)
        ref = torch.stack([saes.logit_effects(mlp_lm, loaded.sae, f) for f in range(loaded.d_sae)])[:, token]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # An MLP-neuron SAE writes through W_out; a hook_z SAE through W_O, head by head (centred W_out
    # and W_O in the folded copy: the final LayerNorm removes the mean either way).
    mlp = save_sae(tmp_path / "mlp", mlp_lm.cfg.d_mlp, "blocks.1.mlp.hook_post")
    expected = mlp.W_dec[3].detach() @ folded.blocks[1].mlp.W_out @ folded.W_U
    _same_up_to_a_constant(saes.logit_effects(mlp_lm, mlp, 3)[None], expected[None])
    n_heads, d_head = mlp_lm.cfg.n_heads, mlp_lm.cfg.d_head
    z_sae = save_sae(tmp_path / "z", n_heads * d_head, "blocks.2.attn.hook_z")
    W_O = folded.blocks[2].attn.W_O
    direction = sum(z_sae.W_dec[3, h * d_head:(h + 1) * d_head].detach() @ W_O[h] for h in range(n_heads))
    _same_up_to_a_constant(saes.logit_effects(mlp_lm, z_sae, 3)[None], (direction @ folded.W_U)[None])


def test_sae_and_neuron_logit_views_share_one_convention(mlp_lm, tmp_path):
    """A feature whose decoder row is neuron n's output row promotes the same tokens as neuron n."""
    from core import attribution

    sae = save_sae(tmp_path / "rows", mlp_lm.cfg.d_model, "blocks.2.hook_resid_post", d_sae=4)
    with torch.no_grad():
        sae.W_dec[1] = mlp_lm.W_out[2, 9]
    ids, weights = attribution.neuron_top_tokens(mlp_lm, 2, 9, k=10)
    top = saes.logit_effects(mlp_lm, sae, 1).topk(10)
    assert torch.equal(top.indices, ids)
    torch.testing.assert_close(top.values, weights, atol=1e-5, rtol=0)


@torch.no_grad()
def test_feature_scaling_matches_hooked_sae_transformer(mlp_lm, loaded):
    from sae_lens import HookedSAETransformer

    tokens = mlp_lm.to_tokens("The keys on the cabinet are old . The keys that the man holds")
    name = loaded.hook_name
    _, cache = mlp_lm.run_with_cache(tokens, names_filter=name)
    acts = loaded.sae.encode(cache[name])
    f = int(acts[0, -1].argmax())
    assert float(acts[0, -1, f]) > 0
    plain = mlp_lm(tokens)
    assert torch.equal(saes.run_with_feature(mlp_lm, loaded, tokens, f, 1.0), plain)  # scale 1: nothing changes
    # The residual after the hook differs from the original by exactly (scale - 1) · f · W_dec[f].
    changed = saes.feature_hook(loaded.sae, f, 3.0)(cache[name].clone(), None)
    assert torch.allclose(changed - cache[name], 2.0 * acts[..., f, None] * loaded.sae.W_dec[f], atol=1e-5)
    # Ablation against sae_lens's own HookedSAETransformer with the error term kept.
    hooked = HookedSAETransformer(mlp_lm.cfg)
    hooked.load_state_dict(mlp_lm.state_dict(), strict=False)
    hooked.add_sae(loaded.sae, use_error_term=True)
    try:
        def zero(a, hook):
            a[..., f] = 0.0
            return a

        expected = hooked.run_with_hooks(tokens, fwd_hooks=[(f"{name}.hook_sae_acts_post", zero)])
    finally:
        hooked.reset_saes()
    ours = saes.run_with_feature(mlp_lm, loaded, tokens, f, 0.0)
    assert torch.allclose(ours, expected, atol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-4)
    with pytest.raises(saes.SAELoadError, match="does not exist"):
        saes.run_with_feature(mlp_lm, loaded, tokens, loaded.d_sae, 0.0)


@torch.no_grad()
def test_capture_plan_reads_the_same_tensor_with_fewer_layers(mlp_lm):
    tokens = mlp_lm.to_tokens("The keys on the cabinet are old")
    _, full = mlp_lm.run_with_cache(tokens)
    for name in ("blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post",
                 "blocks.1.attn.hook_z", "ln_final.hook_normalized"):
        read, stop = sae_index.capture_plan(name, mlp_lm.cfg.n_layers)
        _, cache = mlp_lm.run_with_cache(tokens, names_filter=read, stop_at_layer=stop)
        assert torch.equal(cache[read], full[name]), name
    assert sae_index.capture_plan("blocks.2.hook_resid_pre", 3) == ("blocks.1.hook_resid_post", 2)


@pytest.mark.slow
def test_training_script_runs_offline_and_is_seeded(tmp_path):
    """A short run of the embedded SAEs' training script (sae_lens's runner): it writes an SAE in
    sae_lens's format that loads and fits its model, and the same seed gives the same weights."""
    from dataclasses import replace

    from core.zoo import train_sae

    cfg = replace(train_sae.VARIANTS["mlp-relu"], training_tokens=3 * 4096, threads=1)
    outs = []
    for run in ("a", "b"):
        info = train_sae.train(cfg, tmp_path / run)
        assert info["train_config"]["training_tokens"] == 3 * 4096
        outs.append(saes.load_local(tmp_path / run))
    model = models.load_model(cfg.model)
    saes.check_fits(model, outs[0])
    assert outs[0].hook_name == cfg.hook and outs[0].d_sae == cfg.d_sae
    for a, b in zip(outs[0].sae.state_dict().values(), outs[1].sae.state_dict().values()):
        assert torch.equal(a, b)


def test_hook_z_sae_without_reshaping_and_other_dtypes(mlp_lm, tmp_path):
    n = mlp_lm.cfg.n_heads * mlp_lm.cfg.d_head
    save_sae(tmp_path / "z", n, "blocks.1.attn.hook_z")  # flat d_in, but no reshape_activations = hook_z
    cfg = json.loads((tmp_path / "z" / "cfg.json").read_text())
    assert cfg.get("reshape_activations", "none") == "none"
    with pytest.raises(saes.SAELoadError, match="hook_z SAE needs reshape_activations"):
        saes.check_fits(mlp_lm, saes.load_local(tmp_path / "z"))
    cfg["reshape_activations"] = "hook_z"
    (tmp_path / "z" / "cfg.json").write_text(json.dumps(cfg))
    saes.check_fits(mlp_lm, saes.load_local(tmp_path / "z"))
    # A bfloat16 SAE fingerprints (the index key) without numpy's help.
    sae = save_sae(tmp_path / "bf", mlp_lm.cfg.d_model, "blocks.1.hook_resid_post").to(torch.bfloat16)
    assert len(sae_index.sae_fingerprint(sae)) > 16


def test_interrupted_build_leaves_nothing_behind(mlp_lm, loaded, small_docs, tmp_path):
    class Stop(BaseException):  # what Streamlit raises inside a progress update on a rerun
        pass

    def progress(share, text):
        if share > 0.86:
            raise Stop()

    with pytest.raises(Stop):
        sae_index.open_index(mlp_lm, loaded, small_docs[:30], progress=progress, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []
    # A build that died with its process long ago leaves a temporary file: the next build removes it.
    old = tmp_path / "sae-index-dead.sqlite.1234.tmp"
    old.write_bytes(b"half")
    os.utime(old, (time.time() - 2 * sae_index.TMP_MAX_AGE,) * 2)
    index = sae_index.open_index(mlp_lm, loaded, small_docs[:30], directory=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [index.path.name]


def test_unknown_tokens_are_indexed_and_bos_pad_are_not(mlp_lm, loaded, tmp_path):
    tok = mlp_lm.tokenizer
    doc = mlp_lm.to_tokens("the keys xyzzyq are old")[0].tolist()
    assert tok.unk_token_id in doc
    index = sae_index.open_index(mlp_lm, loaded, [doc + [tok.pad_token_id] * 3], directory=tmp_path)
    assert index.n_tokens == len(doc) - 1  # BOS and the padding are left out, <unk> is not


# ---------------------------------------------------------------------------------------------
# Issue 16: background builds, time left, full disk, damaged files, a bounded data folder, paths
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def held_collect(monkeypatch):
    """`sae_index.collect` held at a gate until the test opens it: (gate, names of the threads that called it)."""
    import threading

    gate, calls = threading.Event(), []
    original = sae_index.collect

    def held(*args, **kwargs):
        calls.append(threading.current_thread().name)
        assert gate.wait(300), "the test never let the build go on"
        return original(*args, **kwargs)

    monkeypatch.setattr(sae_index, "collect", held)
    yield gate, calls
    gate.set()


def _same_stats(a, b):
    """Two builds' numbers for one feature (another thread count may change the last float bits)."""
    assert a.n_fire == b.n_fire and a.n_tokens == b.n_tokens
    assert a.max_act == pytest.approx(b.max_act, abs=1e-5) and a.mean_act == pytest.approx(b.mean_act, abs=1e-5)
    assert np.allclose([e.act for e in a.top], [e.act for e in b.top], atol=1e-5)


def test_background_build_runs_once_for_every_caller(mlp_lm, loaded, small_docs, tmp_path, held_collect):
    import threading

    gate, calls = held_collect
    docs = small_docs[:40]
    threads_before = torch.get_num_threads()
    builds = []
    callers = [threading.Thread(target=lambda: builds.append(sae_index.request_index(mlp_lm, loaded, docs,
                                                                                     directory=tmp_path)))
               for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()  # the callers are gone (as a Streamlit run that ends, or a session that leaves the page)
    build = builds[0]
    assert all(b is build for b in builds) and not build.done
    assert sae_index.current_build(build.path) is build
    deadline = time.monotonic() + 60
    while not calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls == [f"sae-index-{build.key[:8]}"]  # one build, in the registry's own thread
    assert sae_index.request_index(mlp_lm, loaded, docs, directory=tmp_path) is build  # a later caller waits on it too
    share, text = build.status()
    assert share == 0.0 and text == "starting"
    gate.set()
    assert build.wait(300) and not build.failed
    index = build.result()
    assert len(calls) == 1 and sae_index.current_build(build.path) is None  # done: no longer running
    again = sae_index.request_index(mlp_lm, loaded, docs, directory=tmp_path)
    assert again.done and again.result().path == index.path and len(calls) == 1
    # Its numbers are those of a build made here, in this thread, in another folder.
    here = sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path / "here")
    for f in (0, 3, 77):
        _same_stats(index.feature(f), here.feature(f))
    # The build's own torch thread count stayed in its thread.
    assert torch.get_num_threads() == threads_before
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [threads_before]


def test_time_left_comes_from_the_speed_after_the_warm_up(mlp_lm, loaded, small_docs, tmp_path, monkeypatch):
    now = [0.0]
    speed = sae_index.Throughput(1000, warmup=2, clock=lambda: now[0])
    now[0] = 30.0
    assert speed.update(10) is None  # the first batch: 30 s (loading, allocating)
    now[0] = 31.0
    assert speed.update(20) is None  # the end of the warm-up starts the clock
    now[0] = 32.0
    assert speed.update(120) == pytest.approx((1000 - 120) / 100)  # 100 units in the second since
    # In a build: three slow batches (40 s each), then 0.5 s per batch. The time left must be the
    # tokens left at the speed since the warm-up, not extrapolated from the first batches or the bar.
    monkeypatch.setattr(sae_index, "_clock", lambda: now[0])
    monkeypatch.setattr(sae_index, "_post_rate", [])  # no earlier build to time the summary by
    monkeypatch.setattr(sae_index, "BATCH", 8)  # 19 batches of the 150 documents
    now[0] = 0.0
    seen = []

    def progress(share, text):
        if text.startswith("Encoding"):
            seen.append(text)
            now[0] += 40.0 if len(seen) < sae_index.WARMUP_UPDATES else 0.5

    sae_index.open_index(mlp_lm, loaded, small_docs[:150], progress=progress, directory=tmp_path)
    done = [int(re.search(r"Encoding the corpus: ([\d,]+) of ([\d,]+)", t).group(1).replace(",", "")) for t in seen]
    total = int(re.search(r"of ([\d,]+) tokens", seen[0]).group(1).replace(",", ""))
    assert len(seen) > sae_index.WARMUP_UPDATES + 1
    w = sae_index.WARMUP_UPDATES - 1  # the update that ends the warm-up
    for i, text in enumerate(seen):
        if i <= w:
            assert "measuring the speed" in text and "left" not in text
            continue
        rate = (done[i] - done[w]) / (0.5 * (i - w))
        assert f"about {sae_index.duration((total - done[i]) / rate)} left to encode" in text, text
        assert f"{rate:,.0f} tokens/s" in text


def test_full_disk_is_a_message_and_leaves_no_temporary_files(mlp_lm, loaded, small_docs, tmp_path, monkeypatch):
    kept = sae_index.open_index(mlp_lm, loaded, small_docs[:10], directory=tmp_path)  # built before: not lost
    kept_bytes = kept.path.read_bytes()
    stale = tmp_path / "sae-index-dead.sqlite.1234abcd.tmp-journal"  # left by a build that died long ago
    stale.write_bytes(b"journal")
    os.utime(stale, (time.time() - 2 * sae_index.TMP_MAX_AGE,) * 2)
    real_connect = sqlite3.connect

    class NoCleanUp:
        """A connection whose close cannot roll back (the disk is full): its journal stays behind."""

        def __init__(self, con):
            self._con = con

        def __getattr__(self, name):
            return getattr(self._con, name)

        def close(self):
            pass

    def connect(database, *args, **kwargs):
        con = real_connect(database, *args, **kwargs)
        if str(database).endswith(".tmp"):
            con.execute("PRAGMA max_page_count = 40")  # a tiny quota: SQLite's own 'database or disk is full'
            return NoCleanUp(con)
        return con

    monkeypatch.setattr(sae_index.sqlite3, "connect", connect)
    with pytest.raises(sae_index.FeatureIndexError, match="disk is full") as caught:
        sae_index.open_index(mlp_lm, loaded, small_docs[10:40], directory=tmp_path)
    assert "Nothing was lost" in str(caught.value)
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    assert "full" in str(caught.value.__cause__)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.path.name]  # no .tmp, no -journal
    assert kept.path.read_bytes() == kept_bytes and kept.feature(1).n_tokens == kept.n_tokens
    # Through the background path: a failed build, with the same message, kept for the page to show.
    build = sae_index.request_index(mlp_lm, loaded, small_docs[10:40], directory=tmp_path)
    assert build.wait(300) and build.failed and "disk is full" in build.error
    with pytest.raises(sae_index.FeatureIndexError, match="disk is full"):
        build.result()
    assert sae_index.current_build(build.path) is build  # not retried on every rerun…
    sae_index.forget_build(build.path)  # …until asked to ("Try again")
    assert sae_index.current_build(build.path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.path.name]


def test_overwritten_header_with_unchanged_size_and_time_is_rebuilt(mlp_lm, loaded, small_docs, tmp_path,
                                                                    monkeypatch):
    docs = small_docs[:20]
    first = sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path)
    expected = first.feature(2)
    sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path)  # checked once: now known by size and time
    calls = []
    original = sae_index.collect
    monkeypatch.setattr(sae_index, "collect", lambda *a, **k: calls.append(1) or original(*a, **k))

    def overwrite_header(path):
        st = path.stat()
        with open(path, "r+b") as fh:
            fh.write(b"\0" * 100)  # SQLite's header: its magic string and page size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    overwrite_header(first.path)
    with pytest.raises(sae_index.IndexCorrupt):  # an index already open says so, not sqlite3.DatabaseError
        first.feature(2)
    again = sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path)
    assert len(calls) == 1 and again.feature(2) == expected
    # The background path (what the page uses) too, without having read the file in between.
    sae_index.open_index(mlp_lm, loaded, docs, directory=tmp_path)
    overwrite_header(first.path)
    build = sae_index.request_index(mlp_lm, loaded, docs, directory=tmp_path)
    assert build.wait(300) and not build.failed and len(calls) == 2
    _same_stats(build.result().feature(2), expected)


def test_data_folder_is_bounded_least_recently_used_first(mlp_lm, loaded, small_docs, tmp_path, monkeypatch):
    import gc

    paths = [sae_index.open_index(mlp_lm, loaded, small_docs[5 * i:5 * i + 5], directory=tmp_path).path
             for i in range(4)]
    gc.collect()  # no index object left open
    sizes = {p: p.stat().st_size for p in paths}
    now = time.time()

    def last_used(p, seconds_ago):
        os.utime(p, ns=(int((now - seconds_ago) * 1e9), p.stat().st_mtime_ns))

    for p, ago in zip(paths, (3000, 1000, 2000, 4000)):
        last_used(p, ago)
    # Reading an index marks it used, without changing its modification time (part of its check).
    mtime = paths[3].stat().st_mtime_ns
    sae_index.open_index(mlp_lm, loaded, small_docs[15:20], directory=tmp_path)
    gc.collect()
    assert paths[3].stat().st_mtime_ns == mtime and now - paths[3].stat().st_atime < 60
    # Over the cap: the least recently used go first, until it fits.
    cap = sum(sizes.values()) - sizes[paths[0]] // 2
    assert sae_index.evict(tmp_path, cap) == [paths[0]]
    assert sae_index.evict(tmp_path, cap) == []
    # In use: open in this process, being built, or used in the last IN_USE_SECONDS: never evicted.
    open_one = sae_index.FeatureIndex(paths[3])
    last_used(paths[3], 5000)  # (a read may move the access time: set it after)
    lock = sae_index._path_lock(paths[2])
    lock.acquire()  # as while a build of it runs
    try:
        assert sae_index.evict(tmp_path, 1) == [paths[1]]
    finally:
        lock.release()
    assert all(p.exists() for p in paths[2:]) and open_one.feature(0).n_tokens == open_one.n_tokens
    del open_one
    gc.collect()
    last_used(paths[3], 5000)
    assert sae_index.evict(tmp_path, 1) == [paths[3], paths[2]]  # closed, unlocked: least recently used first
    # Just built (or read): in use for IN_USE_SECONDS, whatever the cap.
    again = sae_index.open_index(mlp_lm, loaded, small_docs[0:5], directory=tmp_path).path
    gc.collect()
    assert again == paths[0] and sae_index.evict(tmp_path, 1) == []
    # The cap comes from $CIRCUIT_EXPLORER_DATA_BYTES, and every new build applies it.
    last_used(again, 1000)
    monkeypatch.setenv(sae_index.DATA_BYTES_ENV, "1")
    assert sae_index.data_cap() == 1
    newest = sae_index.open_index(mlp_lm, loaded, small_docs[40:45], directory=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [newest.path.name]  # over the cap too, but in use: kept
    monkeypatch.delenv(sae_index.DATA_BYTES_ENV)
    assert sae_index.data_cap() == sae_index.DEFAULT_DATA_BYTES


@pytest.mark.parametrize("text", ["/tmp/" + "a" * 300, "/tmp/sae\x00folder", "/" + "/".join(["b" * 200] * 25)],
                         ids=["300-character-name", "nul-byte", "path-over-4096"])
def test_impossible_folder_paths_are_messages(text):
    with pytest.raises(saes.SAELoadError, match="NUL character|too long for this machine's file system"):
        saes.load_local(text)


def test_model_fingerprint_ignores_the_switches_runs_flip():
    """The index key must not depend on state a concurrent run flips (split q/k/v inputs while an
    ablation runs, default_prepend_bos while text is tokenised): else one index is built twice."""
    from core import store

    during_a_run = models.load_model("ce-circuits-3l-attn")
    with store.locked(during_a_run, use_split_qkv_input=True):  # as in an ablation's forward pass
        during_a_run.cfg.default_prepend_bos = False  # as inside to_tokens(prepend_bos=False)
        try:
            flipped = sae_index.model_fingerprint(during_a_run)
        finally:
            during_a_run.cfg.default_prepend_bos = True
    between_runs = models.load_model("ce-circuits-3l-attn")
    assert sae_index.model_fingerprint(between_runs) == flipped
