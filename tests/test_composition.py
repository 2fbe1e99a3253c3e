"""Weights-based circuits (`core/composition.py`) against computations on the raw weight matrices.

Every number is checked against a plain-torch computation written here in float64 (matmuls of the
model's per-head weights, `torch.linalg.norm`, `torch.linalg.eigvals` on the full d_vocab x d_vocab
OV circuit) and the composition scores also against TransformerLens's `all_composition_scores`,
on seeded random models over several of TransformerLens's switches (LayerNorm / RMSNorm / none,
folded, shortformer, rotary, grouped-query attention), then on the zoo's induction model, where the
known previous-token and induction heads must show up in the weights.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from random_models import SWITCHES, random_model

from core import attribution, composition
from core.paths import ROOT

RTOL = 1e-5
CASES = ["ln-standard", "ln-folded", "no-norm", "rms-rotary", "shortformer-attn-only", "gqa-rotary"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for this module: its matrices are tiny (at most 479 x 479), and a second
    OpenMP thread only spin-waits on a busy machine (the whole file took a minute with two threads
    on a loaded 2-core machine, 5 s with one). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=CASES, ids=CASES)
def switched(request):
    """A small random model (d_vocab 64, so the full OV circuit's eigenvalues are cheap) of one switch."""
    return request.param, random_model(seed=5, tokenizer=None, **SWITCHES[request.param])


@pytest.fixture(scope="module")
def induction_model():
    from core.models import load_model

    return load_model("ce-induction-2l")


@pytest.fixture(scope="module")
def induction_metrics():
    return json.loads((ROOT / "assets" / "models" / "ce-induction-2l" / "metrics.json").read_text())


def _close(actual, expected, rtol=RTOL):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Independent references: raw weights, float64
# ---------------------------------------------------------------------------------------------


def _raw_heads(model):
    """W_Q, W_K, W_V [layer, head, d_model, d_head] and W_O [layer, head, d_head, d_model], float64, read
    from the attention modules' own parameters (for grouped-query attention: the stored key/value
    heads, shared by hand, not through TransformerLens's per-query-head properties)."""
    n_heads = model.cfg.n_heads
    out = {k: [] for k in ("Q", "K", "V", "O")}
    for block in model.blocks:
        attn = block.attn
        w_k, w_v = (attn._W_K, attn._W_V) if model.cfg.n_key_value_heads else (attn.W_K, attn.W_V)
        shared = torch.arange(n_heads) // (n_heads // w_k.shape[0])  # query head -> its key/value head
        out["Q"].append(attn.W_Q)
        out["K"].append(w_k[shared])
        out["V"].append(w_v[shared])
        out["O"].append(attn.W_O)
    return {k: torch.stack(v).detach().double() for k, v in out.items()}


def _reference_scores(model, kind):
    """[L, H, L, H] ||OV_s R_r||_F / (||OV_s||_F ||R_r||_F) over every pair, NaN unless sender layer < receiver layer."""
    w = _raw_heads(model)
    ov = w["V"] @ w["O"]  # [L, H, d_model, d_model]: row = what the sender reads, column = what it writes
    qk = w["Q"] @ w["K"].transpose(-2, -1)  # [L, H, d_model (query side), d_model (key side)]
    rec = {"Q": qk, "K": qk.transpose(-2, -1), "V": ov}[kind]
    prod = torch.einsum("ahij,bgjk->ahbgik", ov, rec)
    norm = lambda m: torch.linalg.norm(m, dim=(-2, -1))  # noqa: E731
    ref = norm(prod) / (norm(ov)[:, :, None, None] * norm(rec)[None, None])
    L = model.cfg.n_layers
    later = torch.arange(L)[:, None] < torch.arange(L)[None, :]  # [sender layer, receiver layer]
    return ref.masked_fill(~later[:, None, :, None], float("nan"))


def _reference_unembed(model):
    """W_U' by hand: rows of W_U times ln_final.w, then centred over d_model for LayerNorm."""
    w_u = model.W_U.detach().double()
    if hasattr(model, "ln_final") and hasattr(model.ln_final, "w"):
        w_u = model.ln_final.w.detach().double()[:, None] * w_u
    if model.cfg.normalization_type in ("LN", "LNPre"):
        w_u = w_u - w_u.mean(0, keepdim=True)
    return w_u


def _reference_ov(model, layer=slice(None), head=slice(None)):
    """The full OV circuit W_E W_V W_O W_U' [(layer, head,) d_vocab, d_vocab] as one plain matrix."""
    w = _raw_heads(model)
    return model.W_E.detach().double() @ (w["V"][layer, head] @ w["O"][layer, head]) @ _reference_unembed(model)


# ---------------------------------------------------------------------------------------------
# Composition scores
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_composition_scores_equal_raw_weights_and_transformer_lens(switched, kind):
    _, model = switched
    scores = composition.composition_scores(model, kind)
    ref = _reference_scores(model, kind)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert scores.shape == (L, H, L, H)
    defined = ~ref.isnan()
    assert torch.equal(scores.isnan(), ~defined)
    _close(scores[defined], ref[defined])
    tl = model.all_composition_scores(kind).detach()
    _close(scores[defined], tl[defined])
    assert (tl[~defined] == 0).all()  # TransformerLens writes 0 where we write NaN
    assert ((scores[defined] >= 0) & (scores[defined] <= 1 + 1e-6)).all()


def test_nan_layout_is_sender_layer_at_or_after_receiver_layer():
    model = random_model(seed=2, tokenizer=None, n_layers=3, attn_only=True)
    scores = composition.composition_scores(model, "K")
    for ls in range(3):
        for lr in range(3):
            block = scores[ls, :, lr, :]
            assert block.isnan().all() if ls >= lr else not block.isnan().any(), (ls, lr)


def test_gqa_equals_the_same_model_with_its_key_and_value_heads_repeated():
    """A grouped-query model scores as the multi-head model whose key/value heads are copied per query head."""
    gqa = random_model(seed=5, tokenizer=None, **SWITCHES["gqa-rotary"])
    assert gqa.cfg.n_key_value_heads == 2 and gqa.cfg.n_heads == 4
    mha = random_model(seed=9, tokenizer=None, **{**SWITCHES["gqa-rotary"], "n_key_value_heads": None})
    with torch.no_grad():
        for g, m in zip(gqa.blocks, mha.blocks):
            m.attn.W_Q.copy_(g.attn.W_Q)
            m.attn.W_O.copy_(g.attn.W_O)
            m.attn.W_K.copy_(g.attn._W_K[[0, 0, 1, 1]])
            m.attn.W_V.copy_(g.attn._W_V[[0, 0, 1, 1]])
        mha.embed.W_E.copy_(gqa.embed.W_E)
    for kind in "QKV":
        torch.testing.assert_close(composition.composition_scores(gqa, kind), composition.composition_scores(mha, kind),
                                   equal_nan=True, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(composition.qk_circuit(gqa, 1, 3).AB, composition.qk_circuit(mha, 1, 3).AB)


def test_weights_are_read_not_written(switched):
    _, model = switched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kind in "QKV":
        composition.composition_scores(model, kind)
    composition.random_baseline(model, "K", n_samples=4)
    composition.copying_scores(model)
    composition.top_ov_mappings(model, 1, 0, k=3)
    composition.qk_circuit(model, 1, 0).AB
    composition.positional_qk(model, 0, 0, n=8)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# Random baseline
# ---------------------------------------------------------------------------------------------


def test_baseline_is_the_same_score_on_gaussian_matrices_drawn_as_documented():
    model = random_model(seed=1, tokenizer=None)
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    for kind in "QKV":
        base = composition.random_baseline(model, kind, n_samples=40, seed=7)
        gen = torch.Generator().manual_seed(7)
        draws = torch.stack([torch.randn(4, d_model, d_head, generator=gen) for _ in range(40)]).double()
        v, o_t, a, b = draws.unbind(1)  # each [40, d_model, d_head]
        ov = v @ o_t.transpose(-2, -1)
        rec = {"Q": a @ b.transpose(-2, -1), "K": b @ a.transpose(-2, -1), "V": a @ b.transpose(-2, -1)}[kind]
        norm = lambda m: torch.linalg.norm(m, dim=(-2, -1))  # noqa: E731
        ref = norm(ov @ rec) / (norm(ov) * norm(rec))
        _close(base["samples"], ref)
        assert base["mean"] == pytest.approx(ref.mean().item(), rel=RTOL)
        assert base["std"] == pytest.approx(ref.std().item(), rel=1e-4)
        assert base["p95"] == pytest.approx(torch.quantile(ref, 0.95).item(), rel=RTOL)
        assert all(isinstance(base[k], float) for k in ("mean", "std", "p95"))


def test_baseline_is_reproducible_and_leaves_the_global_rng_alone(monkeypatch):
    model = random_model(seed=1, tokenizer=None)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = composition.random_baseline(model, "K", n_samples=50, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = composition.random_baseline(model, "K", n_samples=50, seed=3)
    assert torch.equal(a["samples"], b["samples"]) and a["p95"] == b["p95"]
    c = composition.random_baseline(model, "K", n_samples=50, seed=4)
    assert not torch.equal(a["samples"], c["samples"])
    longer = composition.random_baseline(model, "K", n_samples=80, seed=3)
    assert torch.equal(longer["samples"][:50], a["samples"])
    monkeypatch.setattr(composition, "_BASELINE_FLOATS", 4 * 32 * 8 * 7)  # chunks of 7 samples
    torch.testing.assert_close(composition.random_baseline(model, "K", n_samples=50, seed=3)["samples"], a["samples"])


def test_summary_bundles_scores_and_baseline(switched):
    _, model = switched
    s = composition.composition_summary(model, "K", n_samples=20, seed=2)
    base = composition.random_baseline(model, "K", n_samples=20, seed=2)
    torch.testing.assert_close(s.scores, composition.composition_scores(model, "K"), equal_nan=True)
    assert (s.mean, s.std, s.p95) == (base["mean"], base["std"], base["p95"]) and s.label == "K-composition"
    assert torch.equal(s.above_baseline(), s.scores > base["p95"])
    torch.testing.assert_close(s.z(), (s.scores - base["mean"]) / base["std"], equal_nan=True)
    top = s.top_pairs(3)
    flat = s.scores.flatten()
    assert [v for *_, v in top] == pytest.approx(flat[~flat.isnan()].sort(descending=True).values[:3].tolist())
    for ls, hs, lr, hr, v in top:
        assert ls < lr and s.scores[ls, hs, lr, hr].item() == pytest.approx(v)


# ---------------------------------------------------------------------------------------------
# Full OV circuit, copying scores, top mappings
# ---------------------------------------------------------------------------------------------


def test_effective_unembed_is_the_repos_token_direction(switched):
    _, model = switched
    w_u = composition.effective_unembed(model)
    _close(w_u, _reference_unembed(model))
    eye = torch.eye(model.cfg.d_model)
    _close(w_u, attribution.direct_logit_weights(model, eye))


def test_ov_circuit_is_embed_ov_unembed(switched):
    _, model = switched
    ref = _reference_ov(model)
    for layer, head in [(0, 0), (1, 3)]:
        ov = composition.ov_circuit(model, layer, head)
        assert tuple(ov.shape) == (model.cfg.d_vocab, model.cfg.d_vocab_out)
        _close(ov.AB, ref[layer, head])


def test_copying_scores_equal_eigenvalues_of_the_full_matrix(switched):
    _, model = switched
    scores = composition.copying_scores(model)
    assert scores.shape == (model.cfg.n_layers, model.cfg.n_heads)
    eig = torch.linalg.eigvals(_reference_ov(model))  # [layer, head, d_vocab]: every eigenvalue of the full matrix
    ref = eig.sum(-1).real / eig.abs().sum(-1)
    torch.testing.assert_close(scores.double(), ref, rtol=RTOL, atol=1e-6)
    assert ((scores >= -1) & (scores <= 1)).all()


def test_copying_score_of_a_hand_made_copying_head_is_one_and_of_a_negating_head_minus_one():
    model = random_model(seed=6, tokenizer=None, normalization_type=None, attn_only=True)
    with torch.no_grad():
        # W_U = W_E^T and W_V W_O = +/- P P^T: the full OV circuit is +/- W_E P P^T W_E^T, whose
        # eigenvalues are all >= 0 (resp. <= 0).
        model.unembed.W_U.copy_(model.W_E.T)
        proj = torch.randn(model.cfg.d_model, model.cfg.d_head)
        model.blocks[0].attn.W_V[0].copy_(proj)
        model.blocks[0].attn.W_O[0].copy_(proj.T)
        model.blocks[0].attn.W_V[1].copy_(proj)
        model.blocks[0].attn.W_O[1].copy_(-proj.T)
    scores = composition.copying_scores(model)
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert scores[0, 1].item() == pytest.approx(-1.0, abs=1e-6)


def test_top_ov_mappings_read_the_full_matrix(switched):
    _, model = switched
    full = _reference_ov(model, 1, 2)
    got = composition.top_ov_mappings(model, 1, 2, k=4)
    assert [s for s, _ in got] == full.diagonal().topk(4).indices.tolist()
    for source, outs in got:
        top = full[source].topk(4)
        assert [i for i, _ in outs] == top.indices.tolist()
        assert [v for _, v in outs] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-5)
    chosen = composition.top_ov_mappings(model, 1, 2, k=2, sources=[5, 0])
    assert [s for s, _ in chosen] == [5, 0]
    assert [i for i, _ in chosen[0][1]] == full[5].topk(2).indices.tolist()
    assert composition.top_ov_mappings(model, 1, 2, sources=[]) == []


# ---------------------------------------------------------------------------------------------
# QK circuits
# ---------------------------------------------------------------------------------------------


def test_qk_circuit_is_embed_qk_embed(switched):
    _, model = switched
    w = _raw_heads(model)
    w_e = model.W_E.detach().double()
    for layer, head in [(0, 1), (1, 3)]:
        qk = composition.qk_circuit(model, layer, head)
        assert tuple(qk.shape) == (model.cfg.d_vocab, model.cfg.d_vocab)
        _close(qk.AB, w_e @ w["Q"][layer, head] @ w["K"][layer, head].T @ w_e.T)


def test_positional_qk_only_for_learned_positions(switched):
    name, model = switched
    pq = composition.positional_qk(model, 1, 2, n=10)
    if model.cfg.positional_embedding_type in ("rotary", "alibi"):
        assert pq is None
        return
    w = _raw_heads(model)
    w_pos = model.W_pos.detach().double()[:10]
    _close(pq, w_pos @ w["Q"][1, 2] @ w["K"][1, 2].T @ w_pos.T)
    assert composition.positional_qk(model, 1, 2, n=10_000).shape == (model.cfg.n_ctx, model.cfg.n_ctx)
    causal = composition.positional_qk(model, 1, 2, n=10, causal=True)
    upper = torch.ones(10, 10, dtype=torch.bool).triu(1)
    assert causal[upper].isnan().all() and torch.equal(causal[~upper], pq[~upper])


def test_positional_qk_is_none_for_alibi():
    assert composition.positional_qk(random_model(seed=1, tokenizer=None, **SWITCHES["alibi"]), 0, 0) is None


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_value_error():
    model = random_model(seed=1, tokenizer=None)
    with pytest.raises(ValueError, match="Unknown composition kind 'O'"):
        composition.composition_scores(model, "O")
    with pytest.raises(ValueError, match="Unknown composition kind"):
        composition.random_baseline(model, "QK")
    with pytest.raises(ValueError, match="Unknown composition kind"):
        composition.composition_summary(model, "")
    for fn in (composition.ov_circuit, composition.qk_circuit, composition.positional_qk, composition.top_ov_mappings):
        with pytest.raises(ValueError, match="Layer 2 is out of range: this model has layers 0 to 1"):
            fn(model, 2, 0)
        with pytest.raises(ValueError, match="Layer -1 is out of range"):
            fn(model, -1, 0)
        with pytest.raises(ValueError, match="Head 4 is out of range: layer 1 has heads 0 to 3"):
            fn(model, 1, 4)
    with pytest.raises(ValueError, match="out of range: the vocabulary has ids 0 to 63"):
        composition.top_ov_mappings(model, 0, 0, sources=[3, 64])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        composition.top_ov_mappings(model, 0, 0, k=0)
    with pytest.raises(ValueError, match="n must be a positive number"):
        composition.positional_qk(model, 0, 0, n=0)
    with pytest.raises(ValueError, match="n_samples must be an integer of at least 2"):
        composition.random_baseline(model, "K", n_samples=1)


def test_kind_is_case_insensitive_and_half_precision_models_compute_in_float32():
    model = random_model(seed=1, tokenizer=None)
    torch.testing.assert_close(composition.composition_scores(model, "k"), composition.composition_scores(model, "K"),
                               equal_nan=True)
    half = random_model(seed=1, tokenizer=None).to(torch.bfloat16)
    for fn in (lambda m: composition.composition_scores(m, "K"), composition.copying_scores,
               lambda m: composition.ov_circuit(m, 1, 1).AB, lambda m: composition.qk_circuit(m, 1, 1).AB,
               lambda m: composition.positional_qk(m, 0, 0, n=6)):
        got, ref = fn(half), fn(model)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=0.02 * ref.nan_to_num().abs().max().item(), equal_nan=True)


def test_weights_of_a_shape_it_cannot_read_are_a_value_error():
    cfg = SimpleNamespace(n_layers=2, n_heads=4, d_model=32, d_head=8, d_vocab=64, d_vocab_out=64)
    good = dict(W_Q=torch.zeros(2, 4, 32, 8), W_K=torch.zeros(2, 4, 32, 8), W_V=torch.zeros(2, 4, 32, 8),
                W_O=torch.zeros(2, 4, 8, 32))
    bad_k = SimpleNamespace(cfg=cfg, **{**good, "W_K": torch.zeros(2, 2, 32, 8)})  # key heads not per query head
    with pytest.raises(ValueError, match=r"W_K has shape \(2, 2, 32, 8\), expected \(2, 4, 32, 8\)"):
        composition.composition_scores(bad_k, "K")
    no_attention = SimpleNamespace(cfg=cfg)
    with pytest.raises(ValueError, match="no per-head attention weights"):
        composition.copying_scores(no_attention)


# ---------------------------------------------------------------------------------------------
# The zoo's induction model: the circuit shows up in the weights
# ---------------------------------------------------------------------------------------------


def _strongest(grid):
    i = int(torch.tensor(grid).flatten().argmax())
    return divmod(i, len(grid[0]))


def test_induction_model_k_composition_stands_above_the_random_baseline(induction_model, induction_metrics):
    scores = induction_metrics["head_scores"]
    prev_layer, prev = _strongest(scores["previous_token"])
    ind_layer, ind = _strongest(scores["induction"])
    assert (prev_layer, ind_layer) == (0, 1)
    summary = composition.composition_summary(induction_model, "K")
    k = summary.scores[prev_layer, prev, ind_layer, ind].item()
    print(f"K-comp L{prev_layer}H{prev} -> L{ind_layer}H{ind} = {k:.4f}; baseline mean {summary.mean:.4f} "
          f"std {summary.std:.4f} p95 {summary.p95:.4f}")
    assert k > summary.p95
    # The model's strongest K-composition pair runs from a previous-token head into an induction head
    # (L0H3 -> L1H1 here, 0.218, just ahead of L0H2 -> L1H1, 0.217).
    ls, hs, lr, hr, _ = summary.top_pairs(1)[0]
    assert scores["previous_token"][ls][hs] > 0.5 and scores["induction"][lr][hr] > 0.5
    _close(summary.scores[0, :, 1, :], _reference_scores(induction_model, "K")[0, :, 1, :])


def test_induction_heads_copy(induction_model, induction_metrics):
    copying = composition.copying_scores(induction_model)
    print("copying scores", copying)
    induction = [h for h, s in enumerate(induction_metrics["head_scores"]["induction"][1]) if s > 0.5]
    assert induction and all(copying[1, h] > 0.9 for h in induction)
    # against the eigenvalues of the full 479 x 479 circuit of the strongest induction head
    eig = torch.linalg.eigvals(_reference_ov(induction_model, 1, 1))
    assert copying[1, 1].item() == pytest.approx((eig.sum().real / eig.abs().sum()).item(), rel=RTOL)
    # its top mapping sends each source token to itself
    for source, outs in composition.top_ov_mappings(induction_model, 1, 1, k=5):
        assert outs[0][0] == source


def test_previous_token_head_positional_qk_peaks_on_the_subdiagonal(induction_model, induction_metrics):
    layer, head = _strongest(induction_metrics["head_scores"]["previous_token"])
    n = 32
    pq = composition.positional_qk(induction_model, layer, head, n=n)
    assert pq.shape == (n, n)
    rows = range(1, n)
    hits = sum(int(pq[q, : q + 1].argmax()) == q - 1 for q in rows)  # keys a causal head can see
    print(f"L{layer}H{head}: key = query - 1 is the row's maximum in {hits} of {len(rows)} rows")
    assert hits >= 0.8 * len(rows)
