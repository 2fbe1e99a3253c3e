"""The state of a page run: the View the frame builds from the sidebar, what pages read from it,
and the URL (query parameters) a copied link reopens.

The frame (core/ui/frame.py, run by app.py) calls `run_page`; a page calls `page_view()` first.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import streamlit as st
import torch
from transformer_lens import HookedTransformer

from core import store, tasks
from core.models import ModelLoadError
from core.prompts import Prompt, PromptError, prepare_prompt, prompt_from_tokens
from core.store import model_key
from core.ui import cache, charts, frame

TEXT_SOURCE, PROMPT_SOURCES = frame.TEXT_SOURCE, frame.PROMPT_SOURCES
url_int, set_url = frame.url_int, frame.set_url


def md_escape(text: str) -> str:
    """Text shown through Markdown (st.error, st.spinner…) as typed: no links, images or emphasis."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$:])", r"\\\1", text)


@dataclass
class View:
    """What the sidebar decided: the model (or why there is none) and the prompt."""

    model_name: str
    model: HookedTransformer | None
    model_error: str | None
    prompt: Prompt | None
    prompt_error: str | None
    task: tasks.Task | None = None  # when the prompt is a task example: the task's whole batch
    suggested_models: list[str] = field(default_factory=list)  # models where the asked-for task exists

    @property
    def model_id(self) -> str:
        """The model's key (`store.model_key`): for widget keys and per-model session state."""
        return model_key(self.model)


_current = threading.local()  # the view of the page this thread is running (set by run_page)


def run_page(page, choices: frame.Choices) -> None:
    """Load what the sidebar asks for, say what is wrong if anything, else run `page` with the view.

    Called by the frame (app.py) on every run; the page reads the view with `page_view()`.
    """
    view = build_view(choices)
    lesson_panel(view)
    if not show_problems(view):
        sidebar_footer()
        return
    _current.view = view
    try:
        page.run()
    finally:
        _current.view = None


def lesson_panel(view: View) -> None:
    """Follow a lesson button's page switch; draw the step the URL names (`?lesson=2.4`) in the
    sidebar (core/ui/lessons.py)."""
    if st.query_params.get("lesson") or "_lesson_goto" in st.session_state:
        from core.ui import lessons

        lessons.follow()
        lessons.panel(view)


def page_view() -> View:
    """The view the frame built for this run (model, prompt, task).

    A page that Streamlit ran without app.py (see `frame.draw_for_unframed_page`) draws the frame
    itself, with the same widgets, and stops after its problems if there are any.
    """
    view = getattr(_current, "view", None)
    if view is None:
        view = build_view(frame.draw_for_unframed_page())
        lesson_panel(view)
        if not show_problems(view):
            sidebar_footer()
            st.stop()
    return view


def build_view(choices: frame.Choices) -> View:
    """The model (or why there is none) and the prompt or task example the sidebar asks for."""
    name, source = choices.model_name, choices.source
    model, model_error = None, None
    if not name:
        model_error = "Type a TransformerLens model name or the path of a local checkpoint folder."
    else:
        try:
            model = cache.get_model(name)
        except ModelLoadError as err:
            model_error = str(err)
    prompt, prompt_error, task, suggested = None, None, None, []
    if model is not None and source == TEXT_SOURCE:
        try:
            prompt = prepare_prompt(model, choices.text)
        except PromptError as err:
            prompt_error = str(err)
    elif model is not None:
        try:
            task = cache.task_batch(model, source, template=choices.template)
            prompt = prompt_from_tokens(model, task.clean_tokens[choices.example])
        except tasks.TaskError as err:
            others = [m for m in cache.models_with_task(source) if m != name]
            prompt_error = f"{PROMPT_SOURCES[source]} cannot be built for this model: {err}"
            if others:
                prompt_error += f" Embedded models that have it: {', '.join(others)}."
                suggested = others
    charts.note_view(model=name, prompt=task.clean_prompts[choices.example] if task is not None else choices.text,
                     metric=task.metric_label if task is not None else None)
    if model is not None:
        cache.prefetch_embedded_indexes(model)
    with st.sidebar:
        if task is not None:
            _task_caption(model, task, choices.example)
        if model is not None:
            cfg = model.cfg
            st.caption(
                f"{cfg.n_layers} layers × {cfg.n_heads} heads, d_model {cfg.d_model}, "
                f"context {cfg.n_ctx} tokens, vocabulary {cfg.d_vocab}"
                + (", attention only" if cfg.attn_only else "")
                + f"; {_arch_label(cfg)}, on {cfg.device}, {str(cfg.dtype).removeprefix('torch.')}"
            )
    return View(name, model, model_error, prompt, prompt_error, task, suggested)


def _arch_label(cfg) -> str:
    from core.checkpoints import ARCHITECTURES

    arch = getattr(cfg, "original_architecture", None)
    return ARCHITECTURES.get(arch, "embedded model" if arch is None else arch)


def _task_caption(model: HookedTransformer, task: tasks.Task, i: int) -> None:
    """The example's clean and corrupted prompts and answers, as plain text."""
    answer, wrong = decode_token(model, task.answers[i]), decode_token(model, task.wrongs[i])
    st.text(f"Clean: {task.clean_prompts[i]}\nCorrupted: {task.corrupted_prompts[i]}")
    note = f"Answer {answer!r} vs {wrong!r}; metric: {task.metric_label}."
    if task.metric_kind == "prob_diff":
        note += " Answer/wrong stand for every year after/before the start year."
    st.caption(md_escape(f"{task.description}. {note} Template '{task.template}', {len(task)} prompts."))


def sidebar_footer() -> None:
    """What the shared activation store holds, and "Export this view"; pages call this last, after their runs."""
    st.sidebar.caption(f"Activation store: {cache.get_store().describe()}")
    charts.export_view_button()


def select_head(n_layers: int, n_heads: int, default: tuple[int, int]) -> None:
    """Seed the Layer/Head widgets (keys "layer", "head") before they are drawn.

    Values come from the URL on a session's first run, else the default; after a model
    change, or when a value does not fit the model, they fall back to the default. Written
    through session state (not `index=`), so the browser's widgets follow.
    """
    state = st.session_state
    reset = state.pop("_reset_selection", False)
    for key, size, fallback in (("layer", n_layers, default[0]), ("head", n_heads, default[1])):
        value = state.get(key)
        if key not in state or reset:
            value = None if reset else url_int(key)
        if value is None or not 0 <= value < size:
            value = fallback
        state[key] = value


def open_clicked_head(chart_key: str, n_layers: int, n_heads: int) -> None:
    """on_select callback of the all-heads grid: open the clicked head."""
    from core.plots import clicked_head

    clicked = clicked_head(st.session_state.get(chart_key), n_layers, n_heads)
    if clicked is not None:
        st.session_state["layer"], st.session_state["head"] = clicked


def show_problems(view: View) -> bool:
    """Show model/prompt errors in the page. Returns True when the page can go on."""
    if view.model_error:
        st.error(md_escape(view.model_error))
        return False
    if view.prompt_error:
        st.warning(view.prompt_error)
        for i, name in enumerate(view.suggested_models):
            st.button(f"Switch to {name}", key=f"_switch_model_{i}", on_click=frame.switch_model, args=(name,))
        return False
    if view.prompt is not None and view.prompt.truncated_from:
        st.warning(
            f"The prompt is {view.prompt.truncated_from} tokens long; this model's context is "
            f"{view.model.cfg.n_ctx}. Showing the first {view.model.cfg.n_ctx} tokens."
        )
    return True


def decode_token(model: HookedTransformer, token: int) -> str:
    return store.decode(model, int(token))


def to_tokens(model: HookedTransformer, text: str, prepend_bos: bool = True) -> torch.Tensor:
    """[1, pos] tokens of `text`, cut to the model's context (tokenised under the store's lock)."""
    return store.to_tokens(model, text, prepend_bos=prepend_bos)[:, : model.cfg.n_ctx]


def attention_link_params(layer: int, head: int) -> dict:
    """Query params that open (layer, head) on the Attention page with this model and prompt."""
    return {**frame.view_params("attention"), "layer": str(layer), "head": str(head)}


def attribution_link_params() -> dict:
    """Query params that open the Logit attribution page with this model and prompt."""
    return frame.view_params("attribution")


def open_head_on_attention_page(layer: int, head: int) -> None:
    """Switch to the Attention page showing (layer, head)."""
    st.session_state["layer"], st.session_state["head"] = layer, head
    st.switch_page("pages/attention.py", query_params=attention_link_params(layer, head))
