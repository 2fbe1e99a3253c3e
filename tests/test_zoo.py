"""The committed zoo checkpoint shows the circuit its card claims, and the card's numbers reproduce."""
import json

import pytest
import torch

from core.models import ZOO_DIR
from core.vocab import build_tokenizer, vocabulary
from core.zoo import induction_card, train_induction

MODEL_DIR = ZOO_DIR / "ce-induction-2l"


@pytest.fixture(scope="module")
def measured():
    return induction_card.measure(MODEL_DIR)


@pytest.fixture(scope="module")
def card():
    return json.loads((MODEL_DIR / "metrics.json").read_text())


@pytest.mark.slow  # re-measures a committed model's card (or trains)
def test_card_numbers_reproduce(measured, card):
    assert measured["induction_head"] == card["induction_head"]
    assert measured["previous_token_heads"] == card["previous_token_heads"]
    for kind, grid in card["head_scores"].items():
        torch.testing.assert_close(torch.tensor(measured["head_scores"][kind]), torch.tensor(grid), atol=2e-4, rtol=0)
    for table in ("composition", "composition_all_induction_heads"):
        assert card[table].keys() == {"none", "q", "k", "v"}
        for on, vals in card[table].items():
            assert measured[table][on] == pytest.approx(vals, abs=2e-4), (table, on)
    assert measured["other_induction_heads"] == card["other_induction_heads"]
    assert measured["tl_detect_head_induction_mul"] == pytest.approx(card["tl_detect_head_induction_mul"], abs=2e-4)
    text = (MODEL_DIR / "MODEL_CARD.md").read_text()
    layer, head = card["induction_head"]
    assert f"Induction head L{layer}H{head}**: induction score {card['head_scores']['induction'][layer][head]:.3f}" in text


@pytest.mark.slow  # re-measures a committed model's card (or trains)
def test_textbook_induction_mechanism(measured):
    scores = measured["head_scores"]
    layer, head = measured["induction_head"]
    assert layer == 1 and scores["induction"][layer][head] >= 0.8
    prev = measured["previous_token_heads"]
    assert prev and all(l == 0 and scores["previous_token"][l][h] >= 0.5 for l, h in prev)


@pytest.mark.slow  # re-measures a committed model's card (or trains)
def test_all_induction_heads_k_ablation_breaks_the_circuit(measured):
    c = measured["composition_all_induction_heads"]
    assert c["k"]["loss"] >= c["none"]["loss"] + 2.0
    assert all(abs(c[on]["loss"] - c["none"]["loss"]) <= 0.5 for on in ("q", "v"))


@pytest.mark.slow  # re-measures a committed model's card (or trains)
def test_k_composition(measured):
    c = measured["composition"]
    base = c["none"]
    assert c["k"]["induction_score"] <= 0.5 * base["induction_score"]
    assert c["k"]["loss"] >= base["loss"] + 2.0
    for on in ("q", "v"):  # the same ablation on the query or value input changes little
        assert c[on]["induction_score"] >= 0.75 * base["induction_score"], on
        assert c[on]["loss"] <= base["loss"] + 0.5, on


def test_training_batches_are_seeded_and_repeat_chunks():
    cfg = train_induction.TrainConfig(batch=64)
    tok = build_tokenizer()
    words = torch.tensor([i for i in range(len(tok)) if i not in set(tok.all_special_ids)])
    a = train_induction.make_batch(torch.Generator().manual_seed(3), cfg, words, tok.bos_token_id)
    b = train_induction.make_batch(torch.Generator().manual_seed(3), cfg, words, tok.bos_token_id)
    assert torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all() and a.shape[1] <= cfg.n_ctx
    assert not set(a[:, 1:].flatten().tolist()) & set(tok.all_special_ids)

    def has_long_repeat(row, n=4):
        seen = set()
        for i in range(len(row) - n + 1):
            gram = tuple(row[i : i + n].tolist())
            if gram in seen:
                return True
            seen.add(gram)
        return False

    share = sum(has_long_repeat(r[1:]) for r in a) / len(a)
    assert 0.5 <= share < 1.0  # most sequences repeat a chunk, some do not


def test_vocabulary_is_unique_and_tokenizer_round_trips():
    vocab = vocabulary()
    assert len(vocab) == len(set(vocab))
    tok = build_tokenizer()
    text = "when mary and john went to the house , john gave a drink to"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == text


@pytest.mark.slow  # re-measures a committed model's card (or trains)
def test_training_is_deterministic(tmp_path):
    """Two short runs of the training script with the same seed give bit-identical weights."""
    from safetensors.torch import load_file

    cfg = train_induction.TrainConfig(steps=15, batch=4)
    train_induction.train(cfg, tmp_path / "a")
    train_induction.train(cfg, tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "hooked_config.json").read_text())["model_name"] == "ce-induction-2l"
