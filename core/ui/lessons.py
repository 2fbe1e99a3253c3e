"""The lesson panel: a guided step in the sidebar of whatever page the step opens.

`?lesson=2.4` in a URL puts lesson 2, step 4 in the sidebar: its text, its question (graded by
`core.lessons` on the loaded model) and buttons to the previous and next steps. A step opens its
view by writing the sidebar's widgets and the page's bound controls into session state and
switching page with the step's query parameters, so the page opens exactly there; the student can
then click around freely, and "Open this step's view" puts it back.

Progress (the step reached, the questions answered right) is kept per browser session, and the
position in the URL, so a student can share "I'm at 2.4".
"""
from __future__ import annotations

import json

import streamlit as st
from transformer_lens import HookedTransformer

from core import lessons
from core.models import zoo_models
from core.store import model_key
from core.ui import cache, frame

PARAM = "lesson"  # ?lesson=2.4
PROGRESS = "_lesson_progress"  # session state: {lesson number: {"step": int, "right": [step numbers]}}


@st.cache_resource(show_spinner=False)
def all_lessons() -> tuple[list[lessons.Lesson], list[str]]:
    """(the lessons that load, one message per file that does not), read once per server."""
    return lessons.load_all()


def find(number: int) -> lessons.Lesson | None:
    return next((lesson for lesson in all_lessons()[0] if lesson.number == number), None)


def current() -> tuple[lessons.Lesson, int] | None:
    """The lesson and step the URL names, if they exist."""
    pos = lessons.parse_position(st.query_params.get(PARAM))
    if pos is None:
        return None
    lesson = find(pos[0])
    if lesson is None or not 1 <= pos[1] <= len(lesson.steps):
        return None
    return lesson, pos[1]


def progress() -> dict:
    return st.session_state.setdefault(PROGRESS, {})


def _record(lesson: lessons.Lesson, i: int, right: bool | None = None) -> None:
    entry = progress().setdefault(lesson.number, {"step": 1, "right": []})
    entry["step"] = max(entry["step"], i)
    if right and i not in entry["right"]:
        entry["right"].append(i)


def page_label(step: lessons.Step) -> str:
    return frame.BY_KEY[step.page].label


def view_state(step: lessons.Step) -> dict:
    """Session state that makes the step's page open on its view: the sidebar's widgets (seeded from
    the URL only on a session's first run) and the page's bound controls."""
    view, state = step.view, {}
    model = view["model"]
    state["model_choice"] = model if model in zoo_models() + frame.PRETRAINED_SUGGESTIONS else frame.OTHER
    if state["model_choice"] == frame.OTHER:
        state["model_other"] = model
    if "source" in view:
        state["source"] = view["source"]
        state["example"] = int(view.get("example", 0))
        if "template" in view:
            state["template"] = view["template"]
    else:
        state["source"] = frame.TEXT_SOURCE
        state["prompt"] = view.get("prompt", frame.default_prompt(model))
    for key in ("layer", "head"):
        if key in view:
            state[key] = int(view[key])
    for key, options in frame.BY_KEY[step.page].bound.items():  # the page's controls: the step's, else defaults
        state[key] = frame.bound_default(key, options)
    if "sae" in view:
        state["sae_source"], state["sae_embedded"] = "embedded", view["sae"]
    if "feature" in view:
        state["sae_feature"] = int(view["feature"])
    state.update(step.widget_state())
    return state


GOTO = "_lesson_goto"  # session state: the page and query parameters a lesson button asked for


def go(lesson: lessons.Lesson, i: int) -> None:
    """Button callback: open step i of the lesson, its page in its view.

    A callback, because the sidebar's widgets can only be written before they are drawn; the
    page switch itself happens early in the next run (`follow`).
    """
    step = lesson.step(i)
    _record(lesson, i)
    st.session_state.update(view_state(step))
    st.session_state.pop("_reset_selection", None)
    if "feature" in step.view:
        st.session_state.pop("_sae_for", None)  # the SAE page then reads the feature from the URL
    # Bound controls travel in session state only: Streamlit refuses a URL parameter bound to a widget
    # in a page switch, and writes it into the URL itself once the page draws the widget.
    bound = {key for spec in frame.PAGES for key in spec.bound}
    params = {**{k: v for k, v in step.query_params().items() if k not in bound}, PARAM: f"{lesson.number}.{i}"}
    if st.query_params.get("present"):
        params["present"] = st.query_params["present"]
    st.session_state[GOTO] = (frame.BY_KEY[step.page].script, params)


def follow() -> None:
    """Switch to the page a lesson button asked for, if any (ends this script run)."""
    target = st.session_state.pop(GOTO, None)
    if target is not None:
        st.switch_page(target[0], query_params=target[1])


VIEW_CONTROLS = ("tab", "attr_tab", "hi_view", "sae_view", "steer_view", "circ_detail")  # where to look, not what


def _on_view(step: lessons.Step, view) -> bool:
    """Is the page showing what the step's question is about: its model, its task or SAE, and the
    settings it names (a direction, an ablation, a scope)? Tabs and views may differ."""
    state = st.session_state
    if view.model is None or view.model_name != step.view["model"]:
        return False
    if "source" in step.view and (view.task is None or state.get("source") != step.view["source"]):
        return False
    if "sae" in step.view and state.get("sae_embedded") != step.view["sae"]:
        return False
    return all(state.get(key) == value for key, value in step.widget_state().items() if key not in VIEW_CONTROLS)


@st.cache_data(show_spinner=False, max_entries=256, hash_funcs=cache.BY_MODEL)
def _expected(model: HookedTransformer, answer: str, params_json: str, tokens: tuple | None, source: str | None,
              template: str | None, sae: str | None, also_models: tuple, example: int = 0,
              whole_task: bool = True) -> lessons.Expected:
    """The right answer, computed once per model, question and view."""
    import torch

    ctx = lessons.Context(model, store=cache.get_store(), example=example, whole_task=whole_task)
    if tokens is not None:
        ctx.tokens = torch.tensor([tokens])
    if source is not None:
        ctx.task = cache.task_batch(model, source, template=template)
    if sae is not None:
        ctx.sae = cache.load_sae("embedded", sae)
    if answer == "strongest_induction_model":
        ctx.models = {name: cache.get_model(name) for name in also_models}
    return lessons.expected(lessons.Check(answer, "", json.loads(params_json)), ctx)


def expected_for(check: lessons.Check, step: lessons.Step, view) -> lessons.Expected:
    """The right answer to the step's question on what the page has loaded."""
    state = st.session_state
    models = tuple(dict.fromkeys(zoo_models() + [view.model_name]))
    tokens = tuple(view.prompt.tokens[0].tolist()) if view.prompt is not None else None
    source = step.view.get("source") if view.task is not None else None
    # The attribution page explains one example unless its scope says the whole task.
    whole = step.page != "attribution" or state.get("attr_scope") == "task"
    return _expected(view.model, check.answer, json.dumps(check.params, sort_keys=True), tokens, source,
                     state.get("template") if source else None, step.view.get("sae"), models,
                     int(state.get("example", 0)) if source else 0, whole)


def _open_head() -> str:
    """The head open on the page ("L1H1"): the one the student last clicked or chose."""
    state = st.session_state
    layer = state["layer"] if "layer" in state else frame.url_int("layer")
    head = state["head"] if "head" in state else frame.url_int("head")
    return f"L{layer}H{head}"


def _grade(lesson: lessons.Lesson, i: int, expected: lessons.Expected, key: str) -> None:
    """Check button callback: grade the answer widget's value and remember the verdict."""
    answer = st.session_state.get(key)
    right = expected.grade(answer)
    st.session_state[f"_lesson_result_{lesson.number}_{i}"] = (right, answer, expected.detail)
    _record(lesson, i, right)


def question(lesson: lessons.Lesson, i: int, step: lessons.Step, view) -> None:
    check = step.check
    st.markdown(f"**Question.** {check.question}")
    grader = lessons.GRADERS[check.answer]
    if (grader.needs_task and view.task is None) or not _on_view(step, view):
        st.caption("This question is about the step's model and prompts: open the step's view to answer it.")
        return
    try:
        with st.spinner("Working out the answer on this model…"):
            expected = expected_for(check, step, view)
    except Exception as err:  # noqa: BLE001 - a lesson's question must not take the page down with it
        from core.ui.state import md_escape

        st.error(md_escape(f"This question cannot be graded on this model: {type(err).__name__}: {err}"))
        return
    key = f"_lesson_answer_{lesson.number}_{i}_{model_key(view.model)}"
    head = _open_head()
    index = None
    if head in expected.options:  # a head question follows the head open on the page: "click it"
        key, index = f"{key}_{head}", expected.options.index(head)
    if expected.kind == "number":
        whole = expected.tolerance == 0 and isinstance(expected.value, int)
        answer = st.number_input("Your answer", value=None, key=key, step=1 if whole else 0.01,
                                 format="%d" if whole else "%.2f")
    else:
        answer = st.selectbox("Your answer", expected.options, index=index, key=key,
                              placeholder="Choose…")
    st.button("Check", key=f"_lesson_check_{lesson.number}_{i}", type="primary", disabled=answer is None,
              on_click=_grade, args=(lesson, i, expected, key))
    result = st.session_state.get(f"_lesson_result_{lesson.number}_{i}")
    if result is not None:
        right, given, detail = result
        if right:
            st.success(f"Right. {detail}", icon="✅")
        else:
            st.error(f"Not {given!s}: try again, or read the figure once more.", icon="✖️")
            with st.expander("Show the answer"):
                st.write(f"{expected.value}. {detail}")


def panel(view) -> None:
    """The current step in the sidebar, when the URL names one (drawn on every page)."""
    where = current()
    if where is None:
        return
    lesson, i = where
    step = lesson.step(i)
    _record(lesson, i)
    entry = progress()[lesson.number]
    from core.ui import charts

    # In presentation mode the sidebar is hidden: the step goes above the page, folded.
    slot = st.expander(f"🎓 Lesson {lesson.number}.{i}: {step.title}") if charts.presenting() else (
        frame.lesson_slot() or st.sidebar)
    with slot.container(border=True, key="lesson_panel"):
        st.caption(f"🎓 Lesson {lesson.number}: {lesson.title} · step {lesson.number}.{i} of {len(lesson.steps)}")
        st.progress(i / len(lesson.steps))
        st.markdown(f"#### {step.title}")
        st.markdown(step.text)
        on_page = st.query_params.get("page") == step.page
        if not on_page or not _on_view(step, view):
            st.button("Open this step's view", key="_lesson_open", icon="↩️", on_click=go, args=(lesson, i))
        if step.check is not None:
            question(lesson, i, step, view)
        c1, c2 = st.columns(2)
        c1.button("← Back", key="_lesson_prev", disabled=i == 1, width="stretch", on_click=go, args=(lesson, i - 1))
        if i < len(lesson.steps):
            c2.button("Next →", key="_lesson_next", type="primary", width="stretch", on_click=go, args=(lesson, i + 1))
        else:
            c2.page_link(frame.BY_KEY["lessons"].script, label="All lessons", icon="🎓")
        right = len(entry["right"])
        asked = sum(s.check is not None for s in lesson.steps)
        st.caption(f"{right} of {asked} questions answered right in this session. Share this step: `?lesson="
                   f"{lesson.number}.{i}`")
        if st.button("Leave the lesson", key="_lesson_leave", type="tertiary"):
            st.query_params.pop(PARAM, None)
            st.rerun()
