"""Lessons: the files load and check, bad files are refused when they load, every question's answer
equals an independent computation (TransformerLens and plain torch), and the lesson panel works."""
import math
import textwrap
from pathlib import Path

import pytest
import torch
from transformer_lens import patching as tlp

from core import lessons, models, tasks
from core.lessons import Check, Context, LessonError
from core.ui import frame
from tests.helpers import open_app
from tests.random_models import random_model, random_tokens, switch_params

IOI = "When Mary and John went to the store, John gave a drink to"
REPEATED = "the green king saw seven cold fish near a dark hill . the green king saw seven cold fish near a dark hill ."


# ---------------------------------------------------------------------------------------------
# The shipped lessons
# ---------------------------------------------------------------------------------------------


def test_the_four_lessons_load_and_follow_the_curriculum():
    found = lessons.load_lessons()
    assert [lesson.number for lesson in found] == [1, 2, 3, 4]
    assert [lesson.title for lesson in found] == ["The residual stream", "Activation patching on IOI",
                                                   "Induction heads", "Features"]
    for lesson in found:
        assert 30 <= lesson.minutes <= 60 and len(lesson.steps) >= 6
        assert sum(step.check is not None for step in lesson.steps) >= 3
        for step in lesson.steps:
            assert step.page in frame.BY_KEY and step.view["model"] in models.zoo_models()
    pages = {step.page for lesson in found for step in lesson.steps}
    assert {"attention", "attribution", "patching", "saes", "steering", "circuits"} <= pages
    answers = {step.check.answer for lesson in found for step in lesson.steps if step.check}
    assert {"top_induction_head", "logit_lens_first_layer", "composition_input", "strongest_induction_model",
            "top_patching_head", "top_feature"} <= answers


def test_the_command_line_checker_passes_the_shipped_files_and_fails_a_bad_one(tmp_path, capsys):
    assert lessons.main([]) == 0
    assert capsys.readouterr().out.count("ok ") == 4
    bad = tmp_path / "05-bad.toml"
    bad.write_text(_lesson("view = { page = 'nowhere', model = 'ce-induction-2l', prompt = 'a b' }"))
    assert lessons.main([str(bad)]) == 1
    assert "unknown page 'nowhere'" in capsys.readouterr().out


def test_a_shared_position_reads_back():
    assert lessons.parse_position("2.4") == (2, 4)
    for bad in ("2", "a.b", "", None, "2.4.1"):
        assert lessons.parse_position(bad) is None


# ---------------------------------------------------------------------------------------------
# Validation when a lesson loads
# ---------------------------------------------------------------------------------------------


def _lesson(step: str, head: str = 'title = "T"\nminutes = 30\nsummary = "s"') -> str:
    return f"[lesson]\n{head}\n\n[[steps]]\ntitle = \"Step\"\ntext = \"Look.\"\n{step}\n"


GOOD_VIEW = "view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a b c' }"


@pytest.mark.parametrize("step, message", [
    ("view = { page = 'nowhere', model = 'ce-induction-2l', prompt = 'a' }", "unknown page 'nowhere'"),
    ("view = { page = 'attention', model = 'gpt-9', prompt = 'a' }", "unknown model 'gpt-9'"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', layer = 2 }", "layer 2 does not exist"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', head = 4 }", "head 4 does not exist"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', head = -1 }", "head -1 does not exist"),
    ("view = { page = 'patching', model = 'ce-induction-2l', source = 'fairy_tales' }", "unknown task 'fairy_tales'"),
    ("view = { page = 'patching', model = 'ce-circuits-3l-attn', source = 'ioi', template = 'nope' }",
     "has no template 'nope'"),
    ("view = { page = 'patching', model = 'ce-circuits-3l-attn', source = 'ioi', example = 99 }", "example 99"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = '  ' }", "the prompt is empty"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', source = 'ioi' }", "not both"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', tab = 'Nope' }", "tab = 'Nope'"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', hi_what = 'heads' }",
     "the attention page has no control 'hi_what'"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', colour = 'red' }",
     "unknown view setting(s) 'colour'"),
    ("view = { page = 'saes', model = 'ce-induction-2l', prompt = 'a', sae = 'ce-circuits-3l-mlp-res2-topk' }",
     "was not trained on ce-induction-2l"),
    ("view = { page = 'saes', model = 'ce-induction-2l', prompt = 'a', sae = 'ce-induction-2l-res1-topk', "
     "feature = 100000 }", "feature 100000 is not in"),
    (GOOD_VIEW + "\ncheck = { answer = 'the_meaning_of_life', question = 'Why?' }", "unknown check 'the_meaning_of_life'"),
    (GOOD_VIEW + "\ncheck = { answer = 'top_patching_head', question = 'Which?' }", "needs a task view"),
    (GOOD_VIEW + "\ncheck = { answer = 'top_feature', question = 'Which?' }", "needs an SAE"),
    (GOOD_VIEW + "\ncheck = { answer = 'top_induction_head' }", "needs a `question`"),
    (GOOD_VIEW + "\ncheck = { answer = 'top_induction_head', question = 'Q', params = { k = 3 } }", "takes the params"),
    ("text2 = 'x'\n" + GOOD_VIEW, "unknown step setting(s) text2"),
    ("view = { page = 'attention', model = 5, prompt = 'a' }", "model is text, not 5"),
    ("view = { page = ['attention'], model = 'ce-induction-2l', prompt = 'a' }", "page is text"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', layer = true }", "layer is a whole number"),
    ("view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', tab = ['All heads'] }", "tab = ['All heads']"),
    ("view = { page = 'patching', model = 'ce-circuits-3l-attn', source = 'ioi', hi_by_pos = 1 }", "hi_by_pos = 1"),
    ("view = { page = 'patching', model = 'ce-circuits-3l-attn', source = 'ioi' }\ncheck = { answer = "
     "'top_patching_head', question = 'Q', params = { direction = 'nois' } }", "direction = 'nois' is not one of"),
    ("view = { page = 'saes', model = 'ce-induction-2l', prompt = 'a', sae = 'ce-induction-2l-res1-topk' }\ncheck = "
     "{ answer = 'top_feature', question = 'Q', params = { position = 'last' } }", "position = 'last' is not a whole"),
    ("", "a step has a view"),
])
def test_a_step_that_names_what_the_app_lacks_is_an_error_when_the_lesson_loads(step, message):
    with pytest.raises(LessonError) as err:
        lessons.parse_lesson(_lesson(step), Path("07-broken.toml"))
    assert message in str(err.value)
    assert str(err.value).startswith("07-broken.toml, step 7.1:")


@pytest.mark.parametrize("text, name, message", [
    ("[lesson\n", "05-x.toml", "not valid TOML"),
    ("[[steps]]\ntitle='a'\ntext='b'\n", "05-x.toml", "no [lesson] table"),
    (_lesson(GOOD_VIEW, head='title = "T"\nminutes = "long"'), "05-x.toml", "minutes (a whole number)"),
    ("[lesson]\ntitle='T'\nminutes=30\n", "05-x.toml", "no steps"),
    (_lesson(GOOD_VIEW), "lesson.toml", "named NN-slug.toml"),
])
def test_a_malformed_file_is_refused_with_its_name(text, name, message):
    with pytest.raises(LessonError, match=None) as err:
        lessons.parse_lesson(text, Path(name))
    assert message in str(err.value) and name in str(err.value)


def test_load_all_keeps_the_good_files_and_reports_the_bad(tmp_path):
    (tmp_path / "01-good.toml").write_text(_lesson(GOOD_VIEW))
    (tmp_path / "01-twin.toml").write_text(_lesson(GOOD_VIEW))
    (tmp_path / "02-bad.toml").write_text(_lesson("view = { page = 'attention', model = 'nope', prompt = 'a' }"))
    (tmp_path / "03-binary.toml").write_bytes(b"\xff\xfe\x00")
    good, errors = lessons.load_all(tmp_path)
    assert [lesson.slug for lesson in good] == ["good"]
    assert len(errors) == 3 and any("already taken" in e for e in errors) and any("unknown model" in e for e in errors)
    assert any("03-binary.toml" in e for e in errors)
    with pytest.raises(LessonError):
        lessons.load_lessons(tmp_path)


def test_a_step_opens_its_view_with_bound_controls_by_label():
    step = lessons.parse_lesson(_lesson(
        "view = { page = 'patching', model = 'ce-circuits-3l-attn', source = 'ioi', example = 3, "
        "hi_what = 'resid_pre', hi_by_pos = true }"), Path("05-x.toml")).steps[0]
    assert step.query_params() == {"model": "ce-circuits-3l-attn", "source": "ioi", "example": "3",
                                   "hi_what": "Residual stream (resid_pre)", "hi_by_pos": "true"}
    assert step.widget_state() == {"hi_what": "resid_pre", "hi_by_pos": True}


def test_grading_numbers_choices_and_ties():
    number = lessons.Expected("number", 1.23, tolerance=0.01)
    assert number.grade(1.225) and number.grade("1.24") and not number.grade(1.25)
    assert not number.grade(float("nan")) and not number.grade("many") and not number.grade(None)
    exact = lessons.Expected("number", 7)
    assert exact.grade(7) and exact.grade(7.0) and not exact.grade(8)
    choice = lessons.Expected("choice", "L1H1", ("L1H1", "L0H0", "L0H1"), also=("L0H1",))
    assert choice.grade("L1H1") and choice.grade("L0H1") and not choice.grade("L0H0")


# ---------------------------------------------------------------------------------------------
# The answers, against independent computations
# ---------------------------------------------------------------------------------------------


def _independent_induction(model, tokens) -> torch.Tensor:
    """[layer, head] induction scores by plain loops over every query row with a target (the
    Attention page's convention; tests/test_pages.py has the loops)."""
    from tests.test_pages import _independent_scores

    return _independent_scores(model, tokens, "induction")


def test_the_induction_head_is_the_one_plain_loops_find(zoo_model):
    from core import attention

    tokens = attention.repeated_random_tokens(zoo_model, attention.DEFAULT_SEQ_LEN, attention.DEFAULT_BATCH, seed=0)
    scores = _independent_induction(zoo_model, tokens)
    layer, head = divmod(int(scores.argmax()), zoo_model.cfg.n_heads)
    got = lessons.expected(Check("top_induction_head", "q"), Context(zoo_model))
    assert got.value == f"L{layer}H{head}" and got.grade(f"L{layer}H{head}") and not got.grade("L0H0")
    assert len(got.options) == zoo_model.cfg.n_layers * zoo_model.cfg.n_heads
    assert f"{float(scores[layer, head]):.2f}" in got.detail


def _lens_first(model, tokens) -> int:
    """Plain torch: the residual stream from which on the unembedded last position tops with the final answer."""
    logits, cache = model.run_with_cache(tokens)
    final = int(logits[0, -1].argmax())
    streams = [cache["resid_pre", l][0, -1] for l in range(model.cfg.n_layers)]
    streams.append(cache["resid_post", model.cfg.n_layers - 1][0, -1])
    tops = []
    for resid in streams:
        x = resid.double()
        if model.cfg.normalization_type in ("LN", "LNPre"):
            x = x - x.mean()
            x = x / (x.pow(2).mean() + model.cfg.eps).sqrt()
        elif model.cfg.normalization_type in ("RMS", "RMSPre"):
            x = x / (x.pow(2).mean() + model.cfg.eps).sqrt()
        if model.cfg.normalization_type in ("LN", "RMS"):
            x = x * model.ln_final.w.double() + (model.ln_final.b.double() if model.cfg.normalization_type == "LN" else 0)
        out = x @ model.W_U.double() + model.b_U.double()
        tops.append(int(out.argmax()) == final)
    assert tops[-1], "the final stream must rank its own prediction first"
    return next(i for i in range(len(tops)) if all(tops[i:]))  # first from this row on


def _dla_heads(model, tokens, answer, wrong) -> torch.Tensor:
    """TransformerLens's stack_head_results through the final LayerNorm's scale (apply_ln_to_stack) and
    weight, dotted with W_U[answer] - W_U[wrong]. (TL's logit_attrs leaves out the weight.)"""
    _, cache = model.run_with_cache(tokens)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)  # [layer*head, batch, d_model]
    scaled = cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1)
    if model.cfg.normalization_type in ("LN", "RMS"):
        scaled = scaled * model.ln_final.w
    direction = model.W_U[:, answer] - model.W_U[:, wrong]
    return (scaled @ direction).mean(-1).reshape(model.cfg.n_layers, model.cfg.n_heads)


@pytest.mark.parametrize("switch", switch_params())
def test_lens_dla_and_logit_difference_on_random_models(switch):
    from tests.random_models import SWITCHES

    overrides = dict(SWITCHES[switch])
    model = random_model(**overrides)  # a soft cap is monotone: it moves no argmax, so the references hold
    tokens = random_tokens(model, batch=1, pos=10)
    ctx = Context(model, tokens=tokens)
    labels = lessons.lens_labels(model)
    assert lessons.expected(Check("logit_lens_first_layer", "q"), ctx).value == labels[_lens_first(model, tokens)]
    logits = model(tokens)[0, -1]
    answer, wrong = logits.topk(2).indices.tolist()
    got = lessons.expected(Check("logit_difference", "q"), ctx)
    assert got.grade(round(float(logits[answer] - logits[wrong]), 2))
    if model.cfg.use_attn_result or model.cfg.n_key_value_heads:
        return  # TL's stack_head_results needs hook_result; covered by the zoo test below
    grid = _dla_heads(model, tokens, answer, wrong)
    layer, head = divmod(int(grid.argmax()), model.cfg.n_heads)
    assert lessons.expected(Check("top_dla_head", "q"), ctx).value == f"L{layer}H{head}"


def test_residual_stream_questions_on_the_lesson_model():
    model = models.load_model("ce-circuits-3l-mlp")
    tokens = model.to_tokens(IOI)
    ctx = Context(model, tokens=tokens)
    assert lessons.expected(Check("token_count", "q"), ctx).value == tokens.shape[1] == 15
    _, cache = model.run_with_cache(tokens)
    norms = [cache["resid_pre", l][0, -1].norm() for l in range(3)] + [cache["resid_post", 2][0, -1].norm()]
    assert lessons.expected(Check("largest_norm_layer", "q"), ctx).value == lessons.norm_labels(model)[
        int(torch.stack(norms).argmax())]
    assert lessons.expected(Check("logit_lens_first_layer", "q"), ctx).value == lessons.lens_labels(model)[
        _lens_first(model, tokens)]
    logits = model(tokens)[0, -1]
    answer, wrong = logits.topk(2).indices.tolist()
    grid = _dla_heads(model, tokens, answer, wrong)
    layer, head = divmod(int(grid.argmax()), 4)
    assert lessons.expected(Check("top_dla_head", "q"), ctx).value == f"L{layer}H{head}"


@pytest.mark.slow
def test_patching_questions_equal_transformer_lens_patching():
    model = models.load_model("ce-circuits-3l-attn")
    task = tasks.make_task("ioi", model, n=32, seed=0, split="held_out", template="when_went")
    ctx = Context(model, tokens=task.clean_tokens[:1], task=task)
    clean_logits, clean_cache = model.run_with_cache(task.clean_tokens)
    corrupted_logits, corrupted_cache = model.run_with_cache(task.corrupted_tokens)
    clean, corrupted = float(task.metric(clean_logits).mean()), float(task.metric(corrupted_logits).mean())
    assert lessons.expected(Check("clean_metric", "q"), ctx).grade(round(clean, 2))

    def metric(logits):
        return (task.metric(logits).mean() - corrupted) / (clean - corrupted)

    heads = tlp.get_act_patch_attn_head_out_all_pos(model, task.corrupted_tokens, clean_cache, metric)
    layer, head = divmod(int(heads.abs().argmax()), 4)
    assert lessons.expected(Check("top_patching_head", "q"), ctx).value == f"L{layer}H{head}"
    resid = tlp.get_act_patch_resid_pre(model, task.corrupted_tokens, clean_cache, metric)  # [layer, pos]
    got = lessons.expected(Check("top_resid_position", "q"), ctx)
    assert got.value.startswith(f"{int(resid[0].argmax())}: ")

    def noise_metric(logits):
        return (task.metric(logits).mean() - corrupted) / (clean - corrupted) - 1

    noised = tlp.get_act_patch_attn_head_out_all_pos(model, task.clean_tokens, corrupted_cache, noise_metric)
    layer, head = divmod(int(noised.abs().argmax()), 4)
    assert lessons.expected(Check("top_patching_head", "q", {"direction": "noise"}), ctx).value == f"L{layer}H{head}"

    # Mean ablation of each head's z over the clean prompts, by hand with a hook.
    drops = torch.zeros(3, 4)
    for l in range(3):
        mean_z = clean_cache["z", l].mean(0, keepdim=True)
        for h in range(4):
            def hook(z, hook, h=h, mean_z=mean_z):
                z[:, :, h] = mean_z[:, :, h]
                return z
            logits = model.run_with_hooks(task.clean_tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])
            drops[l, h] = clean - float(task.metric(logits).mean())
    layer, head = divmod(int(drops.argmax()), 4)
    assert lessons.expected(Check("top_ablation_head", "q"), ctx).value == f"L{layer}H{head}"
    solved = float((task.metric(clean_logits) > 0).float().mean()) >= tasks.MIN_DEMO_ACCURACY
    assert lessons.expected(Check("task_solved", "q"), ctx).value == ("Yes" if solved else "No") == "Yes"
    failing = tasks.make_task("ioi", model, n=32, seed=0, split="held_out", template="friends_gave_it")
    assert lessons.expected(Check("task_solved", "q"), Context(model, task=failing)).value == "No"


def test_induction_strength_equals_transformer_lens_loss(zoo_model):
    from core import attention

    row = attention.induction_strength(zoo_model)
    tokens = attention.repeated_random_tokens(zoo_model, attention.DEFAULT_SEQ_LEN, attention.DEFAULT_BATCH, seed=0)
    per_token = zoo_model(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
    half = attention.DEFAULT_SEQ_LEN
    assert math.isclose(row["first_half_loss"], float(per_token[:, :half].mean()), rel_tol=1e-5)
    assert math.isclose(row["repeated_half_loss"], float(per_token[:, half + 1:].mean()), rel_tol=1e-5)
    scores = _independent_induction(zoo_model, tokens)
    assert row["head"] == "L{}H{}".format(*divmod(int(scores.argmax()), 4))
    assert math.isclose(row["score"], float(scores.max()), rel_tol=1e-5)
    assert row["parameters"] == sum(p.numel() for p in zoo_model.parameters())


@pytest.mark.slow
def test_induction_lesson_questions_on_every_zoo_model():
    zoo = {name: models.load_model(name) for name in models.zoo_models()}
    model = zoo["ce-induction-2l"]
    ctx = Context(model, tokens=model.to_tokens(REPEATED), models=zoo)
    # The embedded induction model composes through the key (its model card's circuit).
    assert lessons.expected(Check("composition_input", "q"), ctx).value == "K"
    assert lessons.expected(Check("composition_loss", "q"), ctx).value == "It rises"
    rows = {name: _independent_induction(m, _repeated(m)).max() for name, m in zoo.items()}
    best = max(rows, key=rows.get)
    got = lessons.expected(Check("strongest_induction_model", "q"), ctx)
    assert got.value == best and set(got.options) == set(zoo)


def _repeated(model):
    from core import attention

    return attention.repeated_random_tokens(model, attention.DEFAULT_SEQ_LEN, attention.DEFAULT_BATCH, seed=0)


def test_the_top_feature_is_sae_lens_encode_argmax():
    from core import saes

    model = models.load_model("ce-circuits-3l-mlp")
    loaded = saes.load_embedded("ce-circuits-3l-mlp-res2-topk")
    tokens = model.to_tokens("The keys on the table")
    _, cache = model.run_with_cache(tokens)
    acts = loaded.sae.encode(cache[loaded.sae.cfg.metadata.hook_name][0, -1])
    got = lessons.expected(Check("top_feature", "q", {"position": -1}), Context(model, tokens=tokens, sae=loaded))
    assert got.value == int(acts.argmax()) and got.grade(int(acts.argmax()))


@pytest.mark.slow
def test_the_steering_questions_read_the_steering_page_numbers():
    from core import steering

    model = models.load_model("ce-circuits-3l-mlp")
    ctx = Context(model)
    check = steering.default_demo_check(model)
    assert lessons.expected(Check("steering_flips", "q"), ctx).value == (
        "Yes" if check.flip.steered > check.flip.unsteered else "No") == "Yes"
    probes = steering.probes_with_control(model, "sva")[0]
    got = lessons.expected(Check("best_probe_layer", "q"), ctx)
    best = max(probes.test_accuracy)
    assert {l for l, a in zip(probes.layers, probes.test_accuracy) if a == best} == set(got.also)


# ---------------------------------------------------------------------------------------------
# The pages' bound controls are the ones lessons may name
# ---------------------------------------------------------------------------------------------


def _labels(at, key):
    for kind in ("selectbox", "button_group", "toggle"):
        for el in at.get(kind):
            if getattr(el, "key", None) == key:
                if kind == "toggle":
                    return {"true", "false"}
                return set(el.options)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("page, model, extra", [
    ("attention", "ce-induction-2l", {"layer": "1", "head": "1"}),
    ("attribution", "ce-induction-2l", {}),
    ("patching", "ce-circuits-3l-mlp", {"source": "ioi"}),
    ("saes", "ce-circuits-3l-mlp", {}),
    ("steering", "ce-circuits-3l-mlp", {}),
    ("circuits", "ce-induction-2l", {"source": "induction"}),
])
def test_every_bound_control_shows_exactly_the_labels_lessons_may_name(page, model, extra):
    at = open_app(page=page, model=model, **extra)
    assert not at.exception
    for key, labels in frame.BY_KEY[page].bound.items():
        if key in ("tab", "attr_tab"):
            assert [t.label for t in at.tabs][: len(labels)] == list(labels.values())
            continue
        shown = _labels(at, key)
        if shown is None:
            continue  # drawn only in another view of the page (e.g. the patching page's head controls)
        assert shown == set(labels.values()) or shown <= set(labels.values()), (key, shown)


# ---------------------------------------------------------------------------------------------
# The panel and the page
# ---------------------------------------------------------------------------------------------


def _sidebar_button(at, label):
    return next(b for b in at.sidebar.button if b.label == label)


def test_a_step_link_opens_the_panel_grades_and_moves_on():
    at = open_app(page="attention", lesson="3.2", model="ce-induction-2l", prompt=REPEATED, tab="All heads",
                  layer="0", head="0")
    assert not at.exception
    assert any("Find the induction head" in m.value for m in at.sidebar.markdown)
    answer = next(s for s in at.sidebar.selectbox if s.label == "Your answer")
    assert answer.value == "L0H0"  # follows the head open on the page
    _sidebar_button(at, "Check").click().run()
    assert at.sidebar.error and not at.sidebar.success
    next(s for s in at.sidebar.selectbox if s.label == "Your answer").set_value("L1H1").run()
    _sidebar_button(at, "Check").click().run()
    assert at.sidebar.success and "L1H1" in at.sidebar.success[0].value
    _sidebar_button(at, "Next →").click().run()
    assert not at.exception
    assert at.query_params["lesson"] == "3.3" and at.query_params["tab"] == "Head scores"
    assert at.selectbox(key="layer").value == 1 and at.selectbox(key="head").value == 1
    assert any("Previous-token heads" in m.value for m in at.sidebar.markdown)


def test_a_step_on_another_model_switches_the_sidebar():
    at = open_app(page="attention", lesson="1.7", model="ce-induction-2l")
    assert not at.exception
    assert any("Open this step's view" == b.label for b in at.sidebar.button)
    _sidebar_button(at, "Open this step's view").click().run()
    assert not at.exception
    assert at.query_params["page"] == "attribution" and at.query_params["model"] == "ce-circuits-3l-mlp"
    assert at.sidebar.text_area[0].value == IOI and at.session_state["attr_tab"] == "By head"
    assert not any("Open this step's view" == b.label for b in at.sidebar.button)


def test_in_presentation_mode_the_step_is_folded_above_the_page():
    at = open_app(page="attention", lesson="3.2", present="1", model="ce-induction-2l", prompt=REPEATED,
                  tab="All heads", layer="0", head="0")
    assert not at.exception
    assert any(e.label.startswith("🎓 Lesson 3.2: Find the induction head") for e in at.expander)
    assert not any("Find the induction head" in m.value for m in at.sidebar.markdown)
    assert any(s.label == "Your answer" for s in at.main.selectbox)


@pytest.mark.parametrize("position", ["9.1", "1.99", "x", "1.0"])
def test_an_unknown_step_in_the_link_is_ignored(position):
    at = open_app(page="attention", lesson=position)
    assert not at.exception and not at.error
    assert not any("Lesson" in c.value for c in at.sidebar.caption[:1])


def test_the_lessons_page_lists_the_lessons_and_starts_one():
    at = open_app(page="lessons")
    assert not at.exception and not at.error
    assert [s.value for s in at.subheader][:4] == ["1. The residual stream", "2. Activation patching on IOI",
                                                   "3. Induction heads", "4. Features"]
    at.button(key="start_3").click().run()
    assert not at.exception
    assert at.query_params["page"] == "attention" and at.query_params["lesson"] == "3.1"
    assert at.selectbox(key="layer").value == 1 and at.selectbox(key="head").value == 1


def test_the_lessons_page_reports_a_bad_file_and_keeps_the_others(tmp_path, monkeypatch):
    import shutil

    from core.ui import lessons as lesson_ui

    for path in lessons.LESSONS_DIR.glob("*.toml"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "05-teacher.toml").write_text(textwrap.dedent(_lesson(
        "view = { page = 'attention', model = 'ce-induction-2l', prompt = 'a', head = 9 }")))
    monkeypatch.setattr(lessons, "LESSONS_DIR", tmp_path)
    lesson_ui.all_lessons.clear()
    try:
        at = open_app(page="lessons")
        assert not at.exception
        assert any("05-teacher.toml, step 5.1: head 9 does not exist" in e.value.replace("\\", "") for e in at.error)
        assert len([s for s in at.subheader if s.value[0].isdigit()]) == 4
    finally:
        lesson_ui.all_lessons.clear()
