import pytest
import torch
from transformer_lens import head_detector

from core import attention, store


def test_repeated_random_tokens_shape_and_repeat(zoo_model):
    toks = attention.repeated_random_tokens(zoo_model, seq_len=10, batch=3, seed=5)
    assert toks.shape == (3, 21)
    assert torch.equal(toks[:, 1:11], toks[:, 11:])
    assert (toks[:, 0] == zoo_model.tokenizer.bos_token_id).all()
    assert not set(toks[:, 1:].flatten().tolist()) & set(zoo_model.tokenizer.all_special_ids)
    assert torch.equal(toks, attention.repeated_random_tokens(zoo_model, seq_len=10, batch=3, seed=5))


def test_too_long_repeat_is_refused(zoo_model):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        attention.repeated_random_tokens(zoo_model, seq_len=zoo_model.cfg.n_ctx)


def test_head_scores_hand_worked_case():
    # one sequence, tokens a b a b: previous-token targets on rows 1..3, induction on rows 2..3
    tokens = torch.tensor([[7, 1, 2, 1, 2]])
    p = torch.zeros(1, 1, 1, 5, 5)
    p[0, 0, 0, 0, 0] = 1
    p[0, 0, 0, 1, 0] = 1  # row 1: all on previous token (pos 0)
    p[0, 0, 0, 2, 1] = 0.5  # row 2: half on previous
    p[0, 0, 0, 2, 2] = 0.5
    p[0, 0, 0, 3, 2] = 1  # row 3: on previous token; induction target of row 3 (token 1) is pos 2
    p[0, 0, 0, 4, 1] = 1  # row 4: token 2's earlier copy is at 2, induction target is 3; not here
    prev = attention.head_scores_from_patterns(p, tokens, "previous_token")
    ind = attention.head_scores_from_patterns(p, tokens, "induction")
    dup = attention.head_scores_from_patterns(p, tokens, "duplicate_token")
    assert prev.item() == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert ind.item() == pytest.approx((1 + 0) / 2)
    assert dup.item() == pytest.approx((0 + 0) / 2)  # rows 3 and 4 have duplicate targets 1 and 2


def _words_string(model, seq_len, seed):
    """A repeated random-word prompt that tokenizes back to exactly those words."""
    toks = attention.repeated_random_tokens(model, seq_len, batch=1, seed=seed)[0, 1:]
    words = [model.tokenizer.decode([int(t)]) for t in toks]
    return " ".join(words), toks


@pytest.mark.parametrize("kind,tl_name", [
    ("previous_token", "previous_token_head"),
    ("induction", "induction_head"),
    ("duplicate_token", "duplicate_token_head"),
])
def test_head_scores_agree_with_transformer_lens_head_detector(zoo_model, kind, tl_name):
    text, _ = _words_string(zoo_model, 20, seed=3)
    tokens = zoo_model.to_tokens(text)
    assert tokens.shape[1] == 41
    ours = attention.head_scores(zoo_model, tokens)[kind]
    theirs = head_detector.detect_head(zoo_model, text, tl_name, error_measure="mul")
    det = attention.detection_pattern(tokens[0], kind)
    rows_with_target = int((det.sum(-1) > 0).sum())
    torch.testing.assert_close(ours * rows_with_target / tokens.shape[1], theirs.float(), atol=1e-5, rtol=1e-5)


def test_head_scores_use_the_store(zoo_model):
    s = store.ActivationStore(max_bytes=10**9)
    toks = attention.repeated_random_tokens(zoo_model, 8, 2)
    a = attention.head_scores(zoo_model, toks, s)
    b = attention.head_scores(zoo_model, toks)
    assert s.misses == 1
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_no_ablation_equals_a_plain_run(zoo_model):
    seq_len = 12
    toks = attention.repeated_random_tokens(zoo_model, seq_len, 4, seed=2)
    res = attention.ablate_composition(zoo_model, toks, seq_len, [(0, 0)], (1, 1), "none")
    logits, cache = zoo_model.run_with_cache(toks)
    expected_score = attention.head_scores_from_patterns(
        cache["pattern", 1][:, 1][:, None, None], toks, "induction"
    ).item()
    logp = logits.log_softmax(-1)
    manual = -torch.stack([
        logp[b, p, toks[b, p + 1]] for b in range(4) for p in range(seq_len + 1, 2 * seq_len)
    ]).mean()
    assert res.target_score == pytest.approx(expected_score, abs=1e-6)
    assert res.loss == pytest.approx(manual.item(), abs=1e-5)


@pytest.mark.parametrize("on,also", [("q", ()), ("k", ()), ("v", ()), ("k", (0, 2))])
def test_composition_ablation_matches_a_manual_recomputation(zoo_model, on, also):
    """Recompute the target heads' q/k/v by hand from LN(resid - source outputs) and patch them in."""
    seq_len, sources, (tl, th) = 10, [(0, 1), (0, 2)], (1, 3)
    toks = attention.repeated_random_tokens(zoo_model, seq_len, 3, seed=9)
    ours = attention.ablate_composition(zoo_model, toks, seq_len, sources, (tl, th), on, also)

    _, cache = zoo_model.run_with_cache(toks)
    resid = cache["resid_pre", tl]
    removed = sum(cache["z", l][:, :, h] @ zoo_model.W_O[l, h] for l, h in sources)
    x = zoo_model.blocks[tl].ln1(resid - removed)
    if on in ("q", "k"):
        x = x + cache["hook_pos_embed"]
    W = {"q": zoo_model.W_Q, "k": zoo_model.W_K, "v": zoo_model.W_V}[on][tl]
    b = {"q": zoo_model.b_Q, "k": zoo_model.b_K, "v": zoo_model.b_V}[on][tl]
    patterns = {}

    def patch(act, hook):
        act = act.clone()
        for h in (th, *also):
            act[:, :, h] = x @ W[h] + b[h]  # [batch, pos, d_head]
        return act

    def save(p, hook):
        patterns["p"] = p

    logits = zoo_model.run_with_hooks(
        toks, fwd_hooks=[(f"blocks.{tl}.attn.hook_{on}", patch), (f"blocks.{tl}.attn.hook_pattern", save)]
    )
    score = attention.head_scores_from_patterns(patterns["p"][:, th][:, None, None], toks, "induction").item()
    assert ours.target_score == pytest.approx(score, abs=1e-5)
    assert ours.loss == pytest.approx(attention.repeated_half_loss(logits, toks, seq_len).item(), abs=1e-5)


def test_sources_must_precede_target(zoo_model):
    toks = attention.repeated_random_tokens(zoo_model, 5, 1)
    with pytest.raises(ValueError, match="earlier layers"):
        attention.ablate_composition(zoo_model, toks, 5, [(1, 0)], (1, 1), "k")


def test_residual_norms_match_manual(zoo_model):
    toks = zoo_model.to_tokens("the cat sat on the mat")
    _, cache = zoo_model.run_with_cache(toks)
    norms = attention.residual_norms(cache, 2)
    assert norms.shape == (3, toks.shape[1])
    manual = torch.stack([
        cache["blocks.0.hook_resid_pre"][0], cache["blocks.1.hook_resid_pre"][0], cache["blocks.1.hook_resid_post"][0]
    ]).pow(2).sum(-1).sqrt()
    torch.testing.assert_close(norms, manual)


def test_helpers():
    assert attention.parse_head("L1H3") == (1, 3) and attention.parse_head("2.0") == (2, 0)
    s = torch.tensor([[0.1, 0.6], [0.9, 0.2]])
    assert attention.strongest_head(s) == (1, 0)
    assert attention.previous_token_heads(s, before_layer=1) == [(0, 1)]
    assert attention.previous_token_heads(s, before_layer=2) == [(0, 1), (1, 0)]
