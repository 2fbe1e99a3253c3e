"""Steering, directional ablation, the glass-box monitor and probes, against direct computations."""
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
