"""The steering page (AppTest): its numbers against direct computations, the monitor, probes, bad input."""
import numpy as np
import pytest
import torch

from core import models, steering, tasks
from tests.helpers import figure_spec, open_app, plain

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
    at = open_app(page="steering", model="ce-circuits-3l-mlp")
    assert not at.exception and not at.error and not at.warning
    tokens = lm.to_tokens("The key on the cabinet")
    hook = [(plural.hook_name, _steer_hook(plural, 1.0))]
    base = lm(tokens)[0, -1].log_softmax(-1)
    steered = lm.run_with_hooks(tokens, fwd_hooks=hook)[0, -1].log_softmax(-1)
    kl = float((base.exp() * (base - steered)).sum())
    captions = " ".join(plain(c.value) for c in at.caption)
    assert f"Top next token 'is' → 'are'; KL(unsteered ‖ steered) = {kl:.4f} nats" in captions
    bars = figure_spec(at, "Next token, unsteered and steered")
    labels = [l.split(". ", 1)[1] for l in bars["data"][1]["x"]]
    after = [float(steered[lm.to_single_token(t)].exp()) for t in labels]
    assert np.allclose(bars["data"][1]["y"], after, atol=1e-5)
    # The stated agreement measurement, recomputed.
    held = tasks.sva(lm, n=64, seed=5, split="held_out")
    singular = held.clean_tokens[1::2]
    is_, are = lm.to_single_token("is"), lm.to_single_token("are")
    s = float((lm.run_with_hooks(singular, fwd_hooks=hook)[:, -1, are] > lm.run_with_hooks(singular, fwd_hooks=hook)[:, -1, is_]).float().mean())
    assert f"in 0% unsteered and {s:.0%} steered" in captions and s > 0.9
    # Generation: the same seed without and with the hook; the prompt and its continuation decoded as one text.
    codes = [c.value for c in at.code]
    unsteered = steering.generate(lm, tokens, 12, (), 0, 1.0)
    with_hook = steering.generate(lm, tokens, 12, hook, 0, 1.0)
    assert codes[:2] == [lm.to_string(unsteered[0, 1:]), lm.to_string(with_hook[0, 1:])]
    assert codes[0].startswith("the key on the cabinet is") and codes[1].startswith("the key on the cabinet are")
    # The model learned agreement: no notice, no offer to switch models.
    assert not any("need a model that learned" in plain(i.value) for i in at.info)


@torch.no_grad()
def test_monitor_trips_on_the_plural_subject_and_its_numbers_are_dot_products(lm, plural):
    at = open_app(page="steering", model="ce-circuits-3l-mlp")
    at.segmented_control(key="steer_view").set_value("monitor").run()
    assert not at.exception and not at.warning
    tokens = lm.to_tokens("The keys on the")
    _, cache = lm.run_with_cache(tokens, names_filter=plural.hook_name)
    direct = (cache[plural.hook_name][0] @ plural.unit).numpy()
    spec = figure_spec(at, "Glass-box monitor")
    assert np.allclose(spec["data"][0]["y"][: tokens.shape[1]], direct, atol=1e-4)
    assert any("crossed" in plain(c.value) and "at position 2 ('keys')" in plain(c.value) for c in at.caption)
    seq = tokens
    for _ in range(8):
        nxt = lm.run_with_hooks(seq, fwd_hooks=[(plural.hook_name, steering.ablate_hook(plural, 2))])[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert at.code[-1].value == lm.to_string(seq[0, 1:])


@pytest.mark.slow  # trains probes / generates on two models
def test_probe_view_and_bad_input(lm):
    at = open_app(page="steering", model="ce-circuits-3l-mlp")
    at.segmented_control(key="steer_view").set_value("probe").run()
    assert not at.exception and not at.warning
    x, y, _ = steering.task_probe_data(lm, "sva")
    real = steering.train_probes(x, y)
    spec = figure_spec(at, "Linear probe accuracy by layer")
    assert np.allclose(spec["data"][0]["y"], real.test_accuracy)
    assert max(real.test_accuracy) >= 0.95 and max(spec["data"][2]["y"]) <= 0.8  # shuffled-label control
    at.segmented_control(key="steer_psrc").set_value("typed").run()
    at.text_area(key="steer_p1").set_value("The keys on the table\nThe books near the door").run()
    assert any("Too few labelled prompts" in plain(w.value) for w in at.warning)
    # Directions: a position that does not exist, an empty side.
    at.segmented_control(key="steer_view").set_value("build").run()
    at.number_input(key="steer_pos_i").set_value(30).run()
    at.button(key="steer_build").click().run()
    assert any("Position 30 does not exist" in plain(w.value) for w in at.warning)
    at.number_input(key="steer_pos_i").set_value(2).run()
    at.text_area(key="steer_neg").set_value("   ").run()
    at.button(key="steer_build").click().run()
    assert any("at least one prompt" in plain(w.value) for w in at.warning)
    # Steering: alpha out of range, markup in the prompt shown as text.
    at.segmented_control(key="steer_view").set_value("steer").run()
    at.number_input(key="steer_alpha").set_value(500.0).run()
    assert any("out of the sane range" in plain(w.value) for w in at.warning)
    at.number_input(key="steer_alpha").set_value(1.0).run()
    at.text_input(key="steer_prompt").set_value("<script>alert(1)</script> the key").run()
    assert not at.exception


def test_a_saved_direction_of_the_wrong_size_is_refused(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(steering, "directions_dir", lambda: tmp_path)
    steering.save_direction(steering.Direction("wide", "blocks.1.hook_resid_pre", torch.ones(768), "file"), tmp_path)
    at = open_app(page="steering", model="ce-circuits-3l-mlp")
    at.selectbox(key="steer_dir").set_value("wide").run()
    assert any("d_model = 128" in plain(w.value) for w in at.warning)
    assert not at.exception


# ---------------------------------------------------------------------------------------------
# Issue 16
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # a secondary view: CI runs it
def test_on_a_model_without_agreement_the_page_says_so_and_switches_in_one_click():
    at = open_app(page="steering", model="ce-induction-2l")
    assert not at.exception
    notice = " ".join(plain(i.value) for i in at.info)
    assert "need a model that learned subject–verb agreement" in notice and "no single-token nouns" in notice
    at.button(key="steer_switch_demo").click().run()
    assert not at.exception
    assert at.session_state["model_choice"] == steering.DEMO_MODEL
    assert at.query_params["model"] in (steering.DEMO_MODEL, [steering.DEMO_MODEL])
    captions = " ".join(plain(c.value) for c in at.caption)
    assert "Top next token 'is' → 'are'" in captions and "in 0% unsteered and 100% steered" in captions
    assert not any("need a model that learned" in plain(i.value) for i in at.info)


@torch.no_grad()
@pytest.mark.slow  # a secondary view of the page: CI runs it, development runs skip it
def test_at_alpha_4_the_chart_keeps_the_unsteered_prediction(lm, plural):
    at = open_app(page="steering", model="ce-circuits-3l-mlp")
    at.number_input(key="steer_alpha").set_value(4.0).run()
    assert not at.exception and not at.warning
    tokens = lm.to_tokens("The key on the cabinet")
    base = lm(tokens)[0, -1].softmax(-1)
    after = lm.run_with_hooks(tokens, fwd_hooks=[(plural.hook_name, _steer_hook(plural, 4.0))])[0, -1].softmax(-1)
    union = set(base.topk(10).indices.tolist()) | set(after.topk(10).indices.tolist())
    bars = figure_spec(at, "Next token, unsteered and steered")
    labels = [l.split(". ", 1)[1] for l in bars["data"][0]["x"]]
    assert sorted(lm.to_single_token(t) for t in labels) == sorted(union)
    assert "is" in labels and float(base[lm.to_single_token("is")]) > 0.99
    for name, probs in ((0, base), (1, after)):
        assert np.allclose(bars["data"][name]["y"], [float(probs[lm.to_single_token(t)]) for t in labels], atol=1e-5)


@torch.no_grad()
@pytest.mark.slow  # trains probes / generates on two models
def test_generated_word_pieces_are_joined_as_the_tokenizer_joins_them(lm, plural):
    at = open_app(page="steering", model="ce-circuits-3l-mlp")
    at.text_input(key="steer_prompt").set_value("The war lasted from the year 17").run()
    at.slider(key="steer_temp").set_value(0.0).run()
    assert not at.exception
    tokens = lm.to_tokens("The war lasted from the year 17")
    greedy = steering.generate(lm, tokens, 12, temperature=0)
    assert lm.tokenizer.convert_ids_to_tokens(int(greedy[0, tokens.shape[1]])).startswith("##")  # the year's second half
    text = lm.tokenizer.decode(greedy[0, 1:].tolist())
    assert at.code[0].value == text and text.startswith("the war lasted from the year 17") and " 17 " not in text
    first = lm.tokenizer.convert_ids_to_tokens(int(greedy[0, tokens.shape[1]]))
    assert any(f"'17' + '{first}'" in plain(c.value) for c in at.caption)
    # The monitor: its labels name each piece as WordPiece does ('##61' after '17'); its text is one decode.
    at.segmented_control(key="steer_view").set_value("monitor").run()
    at.text_input(key="steer_mprompt").set_value("The war lasted from the year 17").run()
    assert not at.exception
    watch = steering.Watch(plural, round(plural.info["threshold"], 3), "ablate")
    res = steering.monitored_generate(lm, tokens, 8, [watch])
    pieces = lm.tokenizer.convert_ids_to_tokens(res.tokens[0].tolist())
    assert pieces[tokens.shape[1]].startswith("##")
    spec = figure_spec(at, "Glass-box monitor")
    assert spec["data"][0]["x"][1:] == [f"{i}: {t}" for i, t in enumerate(pieces)][1:]
    assert at.code[-1].value == lm.tokenizer.decode(res.tokens[0, 1:].tolist())


@pytest.mark.slow  # a secondary view of the page: CI runs it, development runs skip it
def test_direction_names_and_a_full_disk_on_the_page(lm, tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    monkeypatch.setattr(steering, "directions_dir", lambda: tmp_path)
    at = open_app(page="steering", model="ce-circuits-3l-mlp")
    at.segmented_control(key="steer_view").set_value("build").run()
    for bad in ("..", ".hidden", "a/b"):
        at.text_input(key="steer_name").set_value(bad).run()
        at.button(key="steer_build").click().run()
        assert any("cannot be a direction's name" in plain(w.value) and "not a dot" in plain(w.value) for w in at.warning)
    assert list(tmp_path.iterdir()) == [] and "steer_save_.." not in [b.key for b in at.button]

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\x00" * 10)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    at.button(key="steer_save_plural").click().run()
    assert not at.exception
    assert any("disk is full" in plain(w.value) and "Nothing was written" in plain(w.value) for w in at.warning)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a secondary view of the page: CI runs it, development runs skip it
def test_the_words_of_the_field_have_a_one_line_explanation():
    at = open_app(page="steering", model="ce-circuits-3l-mlp")
    helps = {
        "alpha": at.number_input(key="steer_alpha").proto.help,
        "mode": at.segmented_control(key="steer_mode").proto.help,
        "direction": at.selectbox(key="steer_dir").proto.help,
        "kl": next(c.proto.help for c in at.caption if "KL(unsteered" in plain(c.value)),
    }
    assert "α = 1 adds the direction once" in helps["alpha"]
    assert "x − (x · û) û" in helps["mode"] and "Directional ablation" in helps["mode"]
    assert "residual stream as it enters layer L" in helps["direction"]
    assert "KL divergence" in helps["kl"] and "0 means identical" in helps["kl"]
    at.segmented_control(key="steer_view").set_value("build").run()
    assert "resid_pre of layer L" in at.number_input(key="steer_layer").proto.help
    assert at.text_input(key="steer_name").proto.help.startswith("A direction's name is")
    at.segmented_control(key="steer_view").set_value("monitor").run()
    assert "x · û" in at.multiselect(key="steer_watch").proto.help
    at.segmented_control(key="steer_view").set_value("probe").run()
    assert "A probe is a small classifier" in at.segmented_control(key="steer_psrc").proto.help
    assert any("A probe is a small classifier" in c.proto.help and "resid_post" in c.proto.help for c in at.caption)
    assert "pushes the residual stream toward label 1" in at.selectbox(key="steer_probe_layer").proto.help
