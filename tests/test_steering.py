"""Steering, directional ablation, the glass-box monitor and probes, against direct computations."""
import errno

import pytest
import torch

from core import models, saes, steering, tasks

PLURAL = ["The keys on the table", "The books near the door", "The dogs behind the house", "The cars by the road",
          "The cups on the chair", "The boxes near the window"]
SINGULAR = [p.replace("keys", "key").replace("books", "book").replace("dogs", "dog").replace("cars", "car")
            .replace("cups", "cup").replace("boxes", "box") for p in PLURAL]


@pytest.fixture(scope="module")
def lm():
    return models.load_model("ce-circuits-3l-mlp")


@pytest.fixture(scope="module")
def plural(lm):
    return steering.contrastive_direction(lm, PLURAL, SINGULAR, layer=1, position=2, name="plural")


@torch.no_grad()
def test_contrastive_direction_is_the_mean_difference(lm, plural):
    rows = {}
    for side, prompts in (("p", PLURAL), ("s", SINGULAR)):
        acts = []
        for p in prompts:
            _, cache = lm.run_with_cache(lm.to_tokens(p))
            acts.append(cache["blocks.1.hook_resid_pre"][0, 2])
        rows[side] = torch.stack(acts).mean(0)
    assert torch.allclose(plural.vector, rows["p"] - rows["s"], atol=1e-5)
    assert plural.hook_name == "blocks.1.hook_resid_pre" and plural.info["position"] == 2
    with pytest.raises(steering.SteeringError, match="Position 40 does not exist"):
        steering.contrastive_direction(lm, PLURAL, SINGULAR, layer=1, position=40)
    with pytest.raises(steering.SteeringError, match="at least one prompt"):
        steering.contrastive_direction(lm, ["  "], SINGULAR, layer=1)


@torch.no_grad()
def test_alpha_zero_is_the_unsteered_run_and_the_hook_adds_exactly_alpha_times_the_direction(lm, plural):
    tokens = lm.to_tokens("The key on the cabinet")
    plain = lm(tokens)
    assert torch.equal(lm.run_with_hooks(tokens, fwd_hooks=steering.steering_hooks(lm, plural, "add", 0.0)), plain)
    _, before = lm.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
    got = {}
    hooks = steering.steering_hooks(lm, plural, "add", 1.5, from_pos=2) + [
        ("blocks.1.hook_resid_pre", lambda a, hook: got.setdefault("x", a.clone()))]
    lm.run_with_hooks(tokens, fwd_hooks=hooks)
    diff = got["x"] - before["blocks.1.hook_resid_pre"]
    assert torch.equal(diff[:, :2], torch.zeros_like(diff[:, :2]))
    assert torch.allclose(diff[0, 2:], (1.5 * plural.vector).expand_as(diff[0, 2:]), atol=1e-5)
    # Directional ablation leaves no component along the direction.
    hooks = steering.steering_hooks(lm, plural, "ablate") + [
        ("blocks.1.hook_resid_pre", lambda a, hook: got.__setitem__("y", a.clone()))]
    lm.run_with_hooks(tokens, fwd_hooks=hooks)
    assert (got["y"][0] @ plural.unit).abs().max() < 1e-4
    assert (before["blocks.1.hook_resid_pre"][0] @ plural.unit).abs().max() > 1e-2


@torch.no_grad()
def test_plural_direction_flips_is_to_are(lm, plural):
    """The page's default demonstration, on held-out agreement prompts with singular subjects."""
    held = tasks.sva(lm, n=64, seed=5, split="held_out")
    singular = held.clean_tokens[1::2]
    is_, are = lm.to_single_token("is"), lm.to_single_token("are")
    base = lm(singular)[:, -1]
    steered = lm.run_with_hooks(singular, fwd_hooks=steering.steering_hooks(lm, plural, "add", 1.0))[:, -1]
    assert float((base[:, are] > base[:, is_]).float().mean()) == 0.0
    assert float((steered[:, are] > steered[:, is_]).float().mean()) > 0.9
    shift = steering.next_token_shift(lm, singular[:1], steering.steering_hooks(lm, plural, "add", 1.0))
    assert shift["top_before"] == is_ and shift["top_after"] == are and shift["kl"] > 0.5
    stored = steering.next_token_shift(lm, singular[:1], steering.steering_hooks(lm, plural, "add", 1.0),
                                       base_logits=lm(singular[:1]))
    assert stored["kl"] == pytest.approx(shift["kl"], abs=1e-6) and stored["rows"][0] == pytest.approx(shift["rows"][0])


@torch.no_grad()
def test_generation_from_the_same_seed(lm, plural):
    tokens = lm.to_tokens("The key on the")
    a = steering.generate(lm, tokens, 6, seed=3)
    b = steering.generate(lm, tokens, 6, seed=3)
    assert torch.equal(a, b) and a.shape[1] == tokens.shape[1] + 6
    assert torch.equal(steering.generate(lm, tokens, 6, steering.steering_hooks(lm, plural, "add", 0.0), seed=3), a)
    greedy = steering.generate(lm, tokens, 3, temperature=0)
    seq = tokens
    for _ in range(3):
        seq = torch.cat([seq, lm(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq)


@torch.no_grad()
def test_monitor_projection_is_a_dot_product_and_it_trips_and_intervenes(lm, plural):
    tokens = lm.to_tokens("The keys on the cabinet")
    _, cache = lm.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
    direct = cache["blocks.1.hook_resid_pre"][0] @ plural.unit
    quiet = steering.monitored_generate(lm, tokens, 0, [steering.Watch(plural, threshold=1e9, action="ablate")])
    assert torch.allclose(torch.tensor(quiet.projections[0]), direct, atol=1e-5)
    assert quiet.tripped_at == [None]
    threshold = float(direct[2]) - 1e-3  # crossed first at the plural subject "keys"
    assert float(direct[:2].max()) < threshold
    res = steering.monitored_generate(lm, tokens, 3, [steering.Watch(plural, threshold, action="ablate")])
    assert res.tripped_at == [2]
    assert torch.allclose(torch.tensor(res.projections[0][: tokens.shape[1]]), direct, atol=1e-5)
    # The generated tokens are those of a run with the direction projected out from position 2 on.
    seq = tokens
    for _ in range(3):
        nxt = lm.run_with_hooks(seq, fwd_hooks=[(plural.hook_name, steering.ablate_hook(plural, from_pos=2))])[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(res.tokens, seq)


def test_probes_find_number_and_not_shuffled_labels(lm):
    x, y, meaning = steering.task_probe_data(lm, "sva", n=96)
    assert "plural" in meaning
    real = steering.train_probes(x, y, layer_names=steering.probe_layer_names(lm))
    assert max(real.test_accuracy) >= 0.95
    # Layer 0 sees only the last token (the attractor, of random number): the subject's number is not there yet.
    assert real.test_accuracy[0] <= 0.75
    assert real.n_test == 2 * round(48 * 0.3)  # stratified
    shuffled = steering.train_probes(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))])
    assert max(shuffled.test_accuracy) <= 0.75
    # A probe's prediction is its logistic regression: check one by hand.
    layer = int(torch.tensor(real.test_accuracy).argmax())
    pred = (x[layer] @ real.weights[layer] + real.biases[layer] > 0).long()
    assert float((pred == y).float().mean()) >= 0.9
    with pytest.raises(steering.SteeringError, match="Too few labelled prompts"):
        steering.train_probes(x[:, :10], y[:10])
    # As a direction: the unit weight times the class-mean gap; its threshold is the decision boundary.
    d = steering.probe_direction(real, 1, model_name=lm.cfg.model_name)
    w, b = real.weights[1], float(real.biases[1])
    assert torch.allclose(d.unit, w / w.norm(), atol=1e-6)
    assert float(d.vector.norm()) == pytest.approx(abs(real.gaps[1]), rel=1e-5) and real.gaps[1] > 0
    boundary = d.info["threshold"] * d.unit
    assert float(boundary @ w + b) == pytest.approx(0.0, abs=1e-4)


def test_bad_input(lm, plural, tmp_path):
    with pytest.raises(steering.SteeringError, match="out of the sane range"):
        steering.steering_hooks(lm, plural, "add", 1e6)
    wrong = steering.Direction("wide", "blocks.1.hook_resid_pre", torch.ones(768), "file")
    with pytest.raises(steering.SteeringError, match="d_model = 128"):
        steering.steering_hooks(lm, wrong, "add", 1.0)
    steering.save_direction(plural, tmp_path)
    assert steering.list_directions(tmp_path) == ["plural"]
    again = steering.load_direction("plural", tmp_path)
    assert torch.equal(again.vector, plural.vector) and again.hook_name == plural.hook_name
    for bad_json in ("{}", "[1]", '{"name": 3, "hook_name": "x"}'):
        (tmp_path / "plural.json").write_text(bad_json)
        with pytest.raises(steering.SteeringError, match="corrupt"):
            steering.load_direction("plural", tmp_path)
    steering.save_direction(plural, tmp_path)
    (tmp_path / "plural.safetensors").write_bytes(b"garbage")
    with pytest.raises(steering.SteeringError, match="corrupt"):
        steering.load_direction("plural", tmp_path)
    other = steering.Direction("p", plural.hook_name, plural.vector, "contrast", {"model": "ce-circuits-3l-attn"})
    with pytest.raises(steering.SteeringError, match="was made on ce-circuits-3l-attn"):
        steering.steering_hooks(lm, other, "add", 1.0)
    with pytest.raises(steering.SteeringError, match="name"):
        steering.save_direction(steering.Direction("../evil", plural.hook_name, plural.vector, "contrast"), tmp_path)


def test_sae_feature_direction(lm):
    loaded = saes.load_embedded("ce-circuits-3l-mlp-res2-relu")
    d = steering.sae_direction(loaded, 7)
    assert d.hook_name == "blocks.2.hook_resid_pre" and torch.equal(d.vector, loaded.sae.W_dec[7].detach())


@torch.no_grad()
def test_monitor_trips_on_a_generated_token_and_subtracts(lm, plural):
    """A watch that trips during generation: from that token on, alpha · û is subtracted."""
    tokens = lm.to_tokens("It was a")
    free = steering.generate(lm, tokens, 6, temperature=0)
    _, cache = lm.run_with_cache(free, names_filter=plural.hook_name)
    proj = cache[plural.hook_name][0] @ plural.unit
    n = tokens.shape[1]
    # The first generated token that projects more than every token before it (BOS aside).
    later = next(p for p in range(n, free.shape[1]) if float(proj[p]) > float(proj[1:p].max()) + 1.0)
    threshold = float(proj[1:later].max()) + 0.5
    assert float(proj[later]) > threshold
    res = steering.monitored_generate(lm, tokens, 6, [steering.Watch(plural, threshold, "subtract", 3.0)])
    assert res.tripped_at == [later]
    assert torch.equal(res.tokens[0, : later + 1], free[0, : later + 1])
    seq = res.tokens[:, : later + 1]

    def sub(x, hook):
        x = x.clone()
        x[:, later:] -= 3.0 * plural.unit
        return x

    while seq.shape[1] < res.tokens.shape[1]:
        seq = torch.cat([seq, lm.run_with_hooks(seq, fwd_hooks=[(plural.hook_name, sub)])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.tokens, seq)


# ---------------------------------------------------------------------------------------------
# Issue 16: names, saving on a full disk, the chart's tokens, word pieces, the default demonstration
# ---------------------------------------------------------------------------------------------


def test_direction_names_are_a_safe_character_set(plural, tmp_path):
    for good in ("plural", "my plural 2", "a.b-c_d", "-x", "_", "x" * 64):
        assert steering.check_name(good) == good
    for bad in ("..", ".", ".hidden", "../evil", "a/b", "a\\b", " a", "a ", "", "x" * 65, "a\nb", "plural\n", "é", "a:b"):
        with pytest.raises(steering.SteeringError, match="cannot be a direction's name"):
            steering.check_name(bad)
        with pytest.raises(steering.SteeringError, match="cannot be a direction's name"):
            steering.save_direction(steering.Direction(bad, plural.hook_name, plural.vector, "contrast"), tmp_path)
        with pytest.raises(steering.SteeringError, match="cannot be a direction's name"):
            steering.load_direction(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written, hidden or not
    # Hidden files left by an older version ('..' saved as '...json') are not offered.
    steering.save_direction(plural, tmp_path)
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"..{suffix}").write_bytes((tmp_path / f"plural{suffix}").read_bytes())
    assert steering.list_directions(tmp_path) == ["plural"]
    spaced = steering.Direction("my plural 2", plural.hook_name, plural.vector, "contrast")
    steering.save_direction(spaced, tmp_path)
    assert steering.list_directions(tmp_path) == ["my plural 2", "plural"]
    assert torch.equal(steering.load_direction("my plural 2", tmp_path).vector, plural.vector)


def _disk_full_after(n_bytes: int):
    """A writer that writes `n_bytes` of what it was given, then fails as a full disk does."""
    def fail(path, data: bytes):
        with open(path, "wb") as f:
            f.write(data[:n_bytes])
        raise OSError(errno.ENOSPC, "No space left on device")
    return fail


def test_a_full_disk_leaves_nothing_half_written(plural, tmp_path, monkeypatch):
    """Simulated with monkeypatch: the vector's write fails (as safetensors reports it), then the JSON's."""
    import safetensors
    import safetensors.torch

    steering.save_direction(plural, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = steering.Direction("plural", plural.hook_name, 2 * plural.vector, "contrast", {"note": "second"})
    real_save_file = safetensors.torch.save_file

    def full_safetensors(tensors, filename, metadata=None):
        real_save_file(tensors, filename)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise safetensors.SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(safetensors.torch, "save_file", full_safetensors)
    with pytest.raises(steering.SteeringError, match="disk is full.*Nothing was written"):
        steering.save_direction(changed, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, the old direction intact
    with pytest.raises(steering.SteeringError, match="disk is full"):
        steering.save_direction(steering.Direction("fresh", plural.hook_name, plural.vector, "contrast"), tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []
    (tmp_path / "new").rmdir()
    monkeypatch.undo()

    real_write_text = type(tmp_path).write_text

    def full_text(self, text, *args, **kwargs):
        if self.suffix == ".tmp":
            _disk_full_after(10)(self, text.encode())
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "write_text", full_text)
    with pytest.raises(steering.SteeringError, match="disk is full"):
        steering.save_direction(changed, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert torch.equal(steering.load_direction("plural", tmp_path).vector, plural.vector)
    # Another failure (a read-only folder, say) is reported as itself, also with nothing left behind.
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(steering.SteeringError, match="PermissionError.*Nothing was written"):
        steering.save_direction(changed, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@torch.no_grad()
def test_the_shift_rows_are_both_top_tens(lm, plural):
    """At α = 4 the unsteered prediction ' is' (p ≈ 1) drops out of the steered top 10; it stays in the rows."""
    tokens = lm.to_tokens("The key on the cabinet")
    base = lm(tokens)[0, -1].softmax(-1)
    hook = [(plural.hook_name, lambda x, hook: x + 4.0 * plural.vector)]
    after = lm.run_with_hooks(tokens, fwd_hooks=hook)[0, -1].softmax(-1)
    is_ = lm.to_single_token("is")
    assert is_ not in after.topk(10).indices.tolist() and float(base[is_]) > 0.99
    shift = steering.next_token_shift(lm, tokens, steering.steering_hooks(lm, plural, "add", 4.0))
    rows = shift["rows"]
    assert {r["token"] for r in rows} == set(base.topk(10).indices.tolist()) | set(after.topk(10).indices.tolist())
    for r in rows:
        assert r["before"] == pytest.approx(float(base[r["token"]]), abs=1e-5)
        assert r["after"] == pytest.approx(float(after[r["token"]]), abs=1e-5)
    assert rows[0]["token"] == is_  # largest probability of either run first
    peaks = [max(r["before"], r["after"]) for r in rows]
    assert peaks == sorted(peaks, reverse=True)


def test_generated_text_joins_word_pieces_as_the_tokenizer_does(lm):
    tok = lm.tokenizer
    pieces = ["<|bos|>", "the", "war", "lasted", "from", "the", "year", "17", "##61", "to", "jane", "##98"]
    ids = tok.convert_tokens_to_ids(pieces)
    assert steering.sequence_text(lm, ids) == tok.decode(ids[1:]) == "the war lasted from the year 1761 to jane98"
    assert steering.glued_positions(lm, ids) == [8, 11]
    # The labels are WordPiece's own names of its pieces: '##61' continues '17'.
    assert steering.token_labels(lm, ids) == tok.convert_ids_to_tokens(ids) == pieces


def test_word_piece_labels_on_a_byte_level_tokenizer(tmp_path):
    """GPT-2-style tokens carry their own spaces: nothing is marked, the text is the tokenizer's decode."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["The keys on the table are red.", "The key on the cabinet is new."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)  # TransformerLens re-loads a tokenizer by its name_or_path
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=8, n_ctx=32,
                                                      d_vocab=len(tok), attn_only=True, seed=0), tokenizer=tok)
    ids = [tok.bos_token_id] + tok("The keys on the cabinets are newer.")["input_ids"]
    assert any(not tok.decode([i]).startswith(" ") for i in ids[2:])  # some pieces continue a word
    assert steering.glued_positions(model, ids) == []
    assert steering.token_labels(model, ids) == [tok.decode([i]) for i in ids]
    assert steering.sequence_text(model, ids) == tok.decode(ids[1:]) == "The keys on the cabinets are newer."


@torch.no_grad()
def test_the_default_demonstration_is_measured_on_the_loaded_model(lm):
    """The page decides from this measurement, not from the model's name."""
    check = steering.default_demo_check(lm)
    assert check.works and steering.DEMO_MODEL == lm.cfg.model_name
    # Recomputed by hand: the same held-out singular-subject prompts, the plural direction added at every position.
    held = tasks.sva(lm, n=64, seed=5, split="held_out")
    singular = held.clean_tokens[1::2]
    is_, are = lm.to_single_token("is"), lm.to_single_token("are")
    d = steering.contrastive_direction(lm, steering.PLURAL_PROMPTS, steering.SINGULAR_PROMPTS, 1, 2)
    steered = lm.run_with_hooks(singular, fwd_hooks=[(d.hook_name, lambda x, hook: x + d.vector)])[:, -1]
    base = lm(singular)[:, -1]
    assert check.flip.n == len(singular) == 32
    assert check.flip.unsteered == float((base[:, are] > base[:, is_]).float().mean()) == 0.0
    assert check.flip.steered == float((steered[:, are] > steered[:, is_]).float().mean()) > 0.9
    assert "100% of 32 held-out agreement prompts" in check.reason
    # The induction model cannot even pose the agreement task: its vocabulary has no such nouns.
    induction = models.load_model("ce-induction-2l")
    no = steering.default_demo_check(induction)
    assert not no.works and no.flip is None and "no single-token nouns" in no.reason
    assert steering.demo_model_available()


def test_a_direction_that_does_not_flip_fails_the_demo_check(lm, monkeypatch):
    monkeypatch.setattr(steering, "DEMO_ALPHA", 0.0)  # adding nothing flips nothing
    check = steering.default_demo_check(lm)
    assert not check.works and check.flip.steered == check.flip.unsteered == 0.0
    assert "does not use that direction" in check.reason
