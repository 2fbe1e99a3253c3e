"""The one Streamlit-aware module of core: cached model and store, the shared sidebar, the URL.

The model (per name) and the activation store are `st.cache_resource`: one per process,
shared by every page and browser session. The current view (model, prompt, layer, head)
lives in the URL query parameters, so a copied link reopens the same view.
"""
from __future__ import annotations

from dataclasses import dataclass

import streamlit as st
from transformer_lens import HookedTransformer

from core.models import DEFAULT_MODEL, ModelLoadError, load_model, zoo_models
from core.prompts import Prompt, PromptError, prepare_prompt
from core.store import ActivationStore

OTHER = "Other (TransformerLens name or local folder)…"
PRETRAINED_SUGGESTIONS = ["gpt2-small"]
DEFAULT_PROMPTS = {
    # A repeated sequence of unrelated words: the second copy can only be predicted by
    # induction, so the induction head lights up at first load.
    "ce-induction-2l": "the green king saw seven cold boats near a quiet hill . "
    "the green king saw seven cold boats near a quiet hill .",
}
FALLBACK_PROMPT = "When Mary and John went to the store, John gave a drink to"
URL_KEYS = ("model", "prompt", "layer", "head")


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_model(name: str) -> HookedTransformer:
    return load_model(name)


@st.cache_resource(show_spinner=False)
def get_store() -> ActivationStore:
    """The activation store shared by every page and session (cap: CIRCUIT_EXPLORER_STORE_BYTES)."""
    return ActivationStore()


def get_model(name: str) -> HookedTransformer:
    """The process-wide model for `name` (raises ModelLoadError with a readable message)."""
    with st.spinner(f"Loading {name}…"):
        return _cached_model(name)


def default_prompt(model_name: str) -> str:
    return DEFAULT_PROMPTS.get(model_name, FALLBACK_PROMPT)


def url_int(key: str) -> int | None:
    """An integer query parameter, or None when absent or not an integer."""
    try:
        return int(st.query_params[key])
    except (KeyError, ValueError):
        return None


def set_url(**values) -> None:
    """Write view values into the URL (None removes a key)."""
    for key, value in values.items():
        if value is None:
            st.query_params.pop(key, None)
        elif st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)


@dataclass
class View:
    """What the sidebar decided: the model (or why there is none) and the prompt."""

    model_name: str
    model: HookedTransformer | None
    model_error: str | None
    prompt_text: str
    prompt: Prompt | None
    prompt_error: str | None


def _init_state() -> None:
    """On a session's first run, seed the widgets from the URL."""
    if st.session_state.get("_url_loaded"):
        return
    st.session_state["_url_loaded"] = True
    zoo = zoo_models()
    requested = st.query_params.get("model", zoo[0] if zoo else DEFAULT_MODEL)
    options = zoo + PRETRAINED_SUGGESTIONS
    if requested in options:
        st.session_state["model_choice"] = requested
    else:
        st.session_state["model_choice"] = OTHER
        st.session_state["model_other"] = requested
    st.session_state["prompt"] = st.query_params.get("prompt", default_prompt(requested))


def sidebar() -> View:
    """The sidebar shared by every page: model picker and prompt. Returns the resulting view."""
    _init_state()
    zoo = zoo_models()
    with st.sidebar:
        st.header("Model and prompt")
        choice = st.selectbox(
            "Model",
            zoo + PRETRAINED_SUGGESTIONS + [OTHER],
            key="model_choice",
            help="Embedded models work offline. Pretrained TransformerLens models are downloaded "
            "from the Hugging Face hub (needs a network).",
            on_change=_model_changed,
        )
        name = choice
        if choice == OTHER:
            name = st.text_input(
                "Model name or folder", key="model_other", placeholder="pythia-70m-deduped or /path/to/gpt2-checkpoint",
                on_change=_model_changed,
            ).strip()
        text = st.text_area("Prompt", key="prompt", height=140)
    model, model_error = None, None
    if not name:
        model_error = "Type a TransformerLens model name or the path of a local checkpoint folder."
    else:
        try:
            model = get_model(name)
        except ModelLoadError as err:
            model_error = str(err)
    prompt, prompt_error = None, None
    if model is not None:
        try:
            prompt = prepare_prompt(model, text)
        except PromptError as err:
            prompt_error = str(err)
    set_url(model=name or None, prompt=text if text else None)
    with st.sidebar:
        if model is not None:
            cfg = model.cfg
            st.caption(
                f"{cfg.n_layers} layers × {cfg.n_heads} heads, d_model {cfg.d_model}, "
                f"context {cfg.n_ctx} tokens, vocabulary {cfg.d_vocab}"
                + (", attention only" if cfg.attn_only else "")
            )
        st.caption(f"Activation store: {get_store().describe()}")
    return View(name, model, model_error, text, prompt, prompt_error)


def _model_changed() -> None:
    """A new model resets the selection and, if the prompt was the old default, the prompt."""
    for key in ("layer", "head"):
        st.session_state.pop(key, None)
        st.query_params.pop(key, None)
    choice = st.session_state.get("model_choice")
    name = st.session_state.get("model_other", "") if choice == OTHER else choice
    defaults = set(DEFAULT_PROMPTS.values()) | {FALLBACK_PROMPT}
    if st.session_state.get("prompt") in defaults:
        st.session_state["prompt"] = default_prompt(name)


def show_problems(view: View) -> bool:
    """Show model/prompt errors in the page. Returns True when the page can go on."""
    if view.model_error:
        st.error(view.model_error)
        return False
    if view.prompt_error:
        st.warning(view.prompt_error)
        return False
    if view.prompt is not None and view.prompt.truncated_from:
        st.warning(
            f"The prompt is {view.prompt.truncated_from} tokens long; this model's context is "
            f"{view.model.cfg.n_ctx}. Showing the first {view.model.cfg.n_ctx} tokens."
        )
    return True
