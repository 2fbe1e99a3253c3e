"""The steering page (AppTest): its numbers against direct computations, the monitor, probes, bad input."""
import numpy as np
import pytest
import torch

from core import models, steering, tasks
from tests.test_pages import _app, _figure, _plain

PLURAL = ["The keys on the table", "The books near the door", "The dogs behind the house", "The cars by the road",
          "The cups on the chair", "The boxes near the window", "The trees by the river", "The cats under the table"]
SINGULAR = [p.replace("keys", "key").replace("books", "book").replace("dogs", "dog").replace("cars", "car")
            .replace("cups", "cup").replace("boxes", "box").replace("trees", "tree").replace("cats", "cat") for p in PLURAL]


@pytest.fixture(scope="module")
def lm():
    return models.load_model("ce-circuits-3l-mlp")


@pytest.fixture(scope="module")
def plural(lm):
    return steering.contrastive_direction(lm, PLURAL, SINGULAR, 1, 2, name="plural")


def _steer_hook(direction, alpha):
    def hook(x, hook):
        return x + alpha * direction.vector
    return hook


@torch.no_grad()
def test_default_steering_flips_is_to_are_and_every_number_is_right(lm, plural):
    at = _app(page="steering", model="ce-circuits-3l-mlp")
    assert not at.exception and not at.error and not at.warning
    tokens = lm.to_tokens("The key on the cabinet")
    hook = [(plural.hook_name, _steer_hook(plural, 1.0))]
    base = lm(tokens)[0, -1].log_softmax(-1)
    steered = lm.run_with_hooks(tokens, fwd_hooks=hook)[0, -1].log_softmax(-1)
    kl = float((base.exp() * (base - steered)).sum())
    captions = " ".join(_plain(c.value) for c in at.caption)
    assert f"Top next token 'is' → 'are'; KL(unsteered ‖ steered) = {kl:.4f} nats" in captions
    bars = _figure(at, "Next token, unsteered and steered")
    labels = [l.split(". ", 1)[1] for l in bars["data"][1]["x"]]
    after = [float(steered[lm.to_single_token(t)].exp()) for t in labels]
    assert np.allclose(bars["data"][1]["y"], after, atol=1e-5)
    # The stated agreement measurement, recomputed.
    held = tasks.sva(lm, n=64, seed=5, split="held_out")
    singular = held.clean_tokens[1::2]
    is_, are = lm.to_single_token("is"), lm.to_single_token("are")
    s = float((lm.run_with_hooks(singular, fwd_hooks=hook)[:, -1, are] > lm.run_with_hooks(singular, fwd_hooks=hook)[:, -1, is_]).float().mean())
    assert f"in 0% unsteered and {s:.0%} steered" in captions and s > 0.9
    # Generation: the same seed without and with the hook.
    codes = [c.value for c in at.code]
    plain = steering.generate(lm, tokens, 12, (), 0, 1.0)
    with_hook = steering.generate(lm, tokens, 12, hook, 0, 1.0)
    assert codes[:2] == [lm.to_string(plain[0, tokens.shape[1]:]), lm.to_string(with_hook[0, tokens.shape[1]:])]


@torch.no_grad()
def test_monitor_trips_on_the_plural_subject_and_its_numbers_are_dot_products(lm, plural):
    at = _app(page="steering", model="ce-circuits-3l-mlp")
    at.segmented_control(key="st_view").set_value("monitor").run()
    assert not at.exception and not at.warning
    tokens = lm.to_tokens("The keys on the")
    _, cache = lm.run_with_cache(tokens, names_filter=plural.hook_name)
    direct = (cache[plural.hook_name][0] @ plural.unit).numpy()
    spec = _figure(at, "Glass-box monitor")
    assert np.allclose(spec["data"][0]["y"][: tokens.shape[1]], direct, atol=1e-4)
    assert any("crossed" in _plain(c.value) and "at position 2 ('keys')" in _plain(c.value) for c in at.caption)
    seq = tokens
    for _ in range(8):
        nxt = lm.run_with_hooks(seq, fwd_hooks=[(plural.hook_name, steering.ablate_hook(plural, 2))])[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert at.code[-1].value == lm.to_string(seq[0, 1:])


def test_probe_view_and_bad_input(lm):
    at = _app(page="steering", model="ce-circuits-3l-mlp")
    at.segmented_control(key="st_view").set_value("probe").run()
    assert not at.exception and not at.warning
    x, y, _ = steering.task_probe_data(lm, "sva")
    real = steering.train_probes(x, y)
    spec = _figure(at, "Linear probe accuracy by layer")
    assert np.allclose(spec["data"][0]["y"], real.test_accuracy)
    assert max(real.test_accuracy) >= 0.95 and max(spec["data"][2]["y"]) <= 0.8  # shuffled-label control
    at.segmented_control(key="st_psrc").set_value("typed").run()
    at.text_area(key="st_p1").set_value("The keys on the table\nThe books near the door").run()
    assert any("Too few labelled prompts" in _plain(w.value) for w in at.warning)
    # Directions: a position that does not exist, an empty side.
    at.segmented_control(key="st_view").set_value("build").run()
    at.number_input(key="st_pos_i").set_value(30).run()
    at.button(key="st_build").click().run()
    assert any("Position 30 does not exist" in _plain(w.value) for w in at.warning)
    at.number_input(key="st_pos_i").set_value(2).run()
    at.text_area(key="st_neg").set_value("   ").run()
    at.button(key="st_build").click().run()
    assert any("at least one prompt" in _plain(w.value) for w in at.warning)
    # Steering: alpha out of range, markup in the prompt shown as text.
    at.segmented_control(key="st_view").set_value("steer").run()
    at.number_input(key="st_alpha").set_value(500.0).run()
    assert any("out of the sane range" in _plain(w.value) for w in at.warning)
    at.number_input(key="st_alpha").set_value(1.0).run()
    at.text_input(key="st_prompt").set_value("<script>alert(1)</script> the key").run()
    assert not at.exception


def test_a_saved_direction_of_the_wrong_size_is_refused(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(steering, "directions_dir", lambda: tmp_path)
    steering.save_direction(steering.Direction("wide", "blocks.1.hook_resid_pre", torch.ones(768), "file"), tmp_path)
    at = _app(page="steering", model="ce-circuits-3l-mlp")
    at.selectbox(key="st_dir").set_value("wide").run()
    assert any("d_model = 128" in _plain(w.value) for w in at.warning)
    assert not at.exception
