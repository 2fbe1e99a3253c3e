"""The app frame, run by app.py around every page: navigation, the shared sidebar, the URL.

Why here and not in each page: Streamlit ties a widget's state to the script that draws it. The
entrypoint (app.py) runs on every page, so the sidebar's widgets drawn from it keep their values
when the user switches pages (drawn by each page, they were page widgets, and a first click on
another page reset the model and emptied the prompt).

Light on purpose: the frame draws the navigation, the sidebar and the page title before torch and
TransformerLens have loaded (seconds on a cold start); the model loads behind a spinner.

The view lives in the URL (`?model=…&prompt=…` or `?source=ioi&template=…&example=3`), so a
copied link reopens it; `?page=…` on the root URL opens that page.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import streamlit as st

from core import task_catalog
from core.models import DEFAULT_MODEL, cached_hub_models, zoo_models
from core.ui import charts

OTHER = "Other (name, hub id or local folder)…"
PRETRAINED_SUGGESTIONS = ["gpt2-small"]
DEFAULT_PROMPTS = {
    # A repeated sequence of unrelated words: the second copy can only be predicted by
    # induction, so the induction head lights up at first load.
    "ce-induction-2l": "the green king saw seven cold fish near a dark hill . "
    "the green king saw seven cold fish near a dark hill .",
}
FALLBACK_PROMPT = "When Mary and John went to the store, John gave a drink to"
TEXT_SOURCE = "text"
PROMPT_SOURCES = {TEXT_SOURCE: "Typed text", **task_catalog.LABELS}
TASK_BATCH = task_catalog.BATCH
MAX_URL_PROMPT = 2000  # characters of a typed prompt kept in the link (a longer URL may be refused)


@dataclass(frozen=True)
class PageSpec:
    key: str  # URL path and `?page=` value
    script: str
    label: str  # in the navigation
    icon: str
    title: str  # at the top of the page
    # Controls kept in the URL (Streamlit's bind="query-params"): widget key -> {value: label}, the
    # option values a lesson names and the labels the URL shows. Pages take their options from here;
    # core/lessons.py checks a lesson's views against it; tests/test_lessons.py checks the widgets.
    bound: dict = field(default_factory=dict)


def _same(*labels: str) -> dict:
    return {label: label for label in labels}


ATTENTION_TABS = _same("Selected head", "All heads", "Interactive (CircuitsVis)", "Head scores", "Residual norm",
                       "Across models")
ATTRIBUTION_TABS = _same("By component", "By head", "Accumulated residual", "Logit lens", "Neurons")
PATCH_WHAT = {"heads": "Attention heads", "resid_pre": "Residual stream (resid_pre)", "attn_out": "Attention layer outputs",
              "mlp_out": "MLP layer outputs"}
PATCH_ACTS = {"z": "output (z)", "q": "query (q)", "k": "key (k)", "v": "value (v)", "pattern": "attention pattern"}
PATCH_DIRECTIONS = {"denoise": "Denoise: clean → corrupted", "noise": "Noise: corrupted → clean"}
PATCH_METHODS = {"exact": "Exact", "attribution": "Estimate", "compare": "Both"}
PATCH_VIEWS = {"patch": "Patching", "ablate": "Ablation"}
PATCH_KINDS = {"zero": "Zero", "mean": "Mean over the prompts", "resample": "Resample (another prompt's value)"}
ATTR_SCOPES = {"example": "This example", "task": f"Mean over the task's {TASK_BATCH} prompts"}
SAE_VIEWS = {"prompt": "This prompt", "feature": "Feature dashboard", "search": "Search"}
STEER_VIEWS = {"build": "Directions", "steer": "Steer", "monitor": "Monitor", "probe": "Probes"}
CIRCUIT_VIEWS = {"paths": "Path patching", "weights": "Weights", "compare": "Estimate vs exact",
                 "mechanism": "Is this the mechanism?"}
PAGES = [
    PageSpec("attention", "pages/attention.py", "Attention", "👀", "Attention patterns",
             {"tab": ATTENTION_TABS, "ablate_on": _same("Q", "K", "V")}),
    PageSpec("attribution", "pages/attribution.py", "Logit attribution", "🎯", "Logit attribution",
             {"attr_tab": ATTRIBUTION_TABS, "attr_scope": ATTR_SCOPES}),  # not "tab": state is per key, across pages
    PageSpec("patching", "pages/patching.py", "Head importance", "🧪", "Head importance",
             {"hi_view": PATCH_VIEWS, "hi_what": PATCH_WHAT, "hi_act": PATCH_ACTS, "hi_by_pos": {False: "false", True: "true"},
              "hi_direction": PATCH_DIRECTIONS, "hi_method": PATCH_METHODS, "hi_kind": PATCH_KINDS}),
    PageSpec("saes", "pages/saes.py", "SAE features", "🧩", "SAE features", {"sae_view": SAE_VIEWS}),
    PageSpec("steering", "pages/steering.py", "Steering", "🧭", "Steering and monitoring", {"steer_view": STEER_VIEWS}),
    PageSpec("circuits", "pages/circuits.py", "Circuits", "🕸️", "Circuits", {"circ_detail": CIRCUIT_VIEWS}),
    PageSpec("remote", "pages/remote.py", "Large models", "🛰️", "Large models: nnsight and NDIF"),
    PageSpec("lessons", "pages/lessons.py", "Lessons", "🎓", "Lessons"),
]
BY_KEY = {p.key: p for p in PAGES}
BOUND_DEFAULTS = {"steer_view": "steer", "ablate_on": "K"}  # where a control's default is not its first option


def bound_default(key: str, options: dict):
    """The value a bound control takes when nothing sets it (a lesson step resets it to this)."""
    return BOUND_DEFAULTS.get(key, next(iter(options)))


LINK_KEYS = ("model", "prompt", "source", "example", "template", "present", "lesson")  # kept by page links


@dataclass(frozen=True)
class Choices:
    """What the sidebar's widgets say, before anything is loaded."""

    model_name: str
    source: str
    text: str
    template: str | None
    example: int


_slots = threading.local()  # containers the frame keeps for later parts of this thread's run


def lesson_slot():
    """The top of the sidebar, kept for the lesson panel (None outside a framed run)."""
    return getattr(_slots, "lesson", None)


def default_prompt(model_name: str) -> str:
    return DEFAULT_PROMPTS.get(model_name, FALLBACK_PROMPT)


# ---------------------------------------------------------------------------------------------
# Navigation
# ---------------------------------------------------------------------------------------------


def _home() -> None:
    """The root URL: open the page named by `?page=` (default: Attention), keeping the view."""
    params = st.query_params.to_dict()
    target = BY_KEY.get(params.pop("page", ""), PAGES[0])
    st.switch_page(target.script, query_params=params)


def navigation():
    """st.navigation over the pages; the root URL is a hidden page that opens one of them, so every
    page, Attention included, has its own URL (`/attention` works on a running server)."""
    pages = [st.Page(p.script, title=p.label, icon=p.icon, url_path=p.key) for p in PAGES]
    home = st.Page(_home, title="Circuit Explorer", url_path="home", default=True, visibility="hidden")
    return st.navigation([home, *pages], position="hidden")


def page_spec(page) -> PageSpec | None:
    return next((p for p in PAGES if p.key == page.url_path), None)


# ---------------------------------------------------------------------------------------------
# The sidebar's widgets and the URL
# ---------------------------------------------------------------------------------------------


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


def view_params(page: str) -> dict:
    """The current URL's sidebar view (model, prompt or task), pointed at `page`."""
    return {**{k: v for k, v in st.query_params.to_dict().items() if k in LINK_KEYS}, "page": page}


@st.cache_data(show_spinner=False, ttl=60)
def _cached_hub_models() -> list[str]:
    """The causal LMs in this machine's Hugging Face cache (`models.cached_hub_models`), looked at
    once a minute."""
    return cached_hub_models()


def _init_state() -> None:
    """On a session's first run, seed the widgets from the URL."""
    state = st.session_state
    if state.get("_url_loaded"):
        return
    state["_url_loaded"] = True
    charts.seed_from_url()
    zoo = zoo_models()
    requested = st.query_params.get("model", zoo[0] if zoo else DEFAULT_MODEL)
    if requested in zoo + PRETRAINED_SUGGESTIONS + _cached_hub_models():
        state["model_choice"] = requested
    else:
        state["model_choice"] = OTHER
        state["model_other"] = requested
    state["prompt"] = st.query_params.get("prompt", default_prompt(requested))
    source = st.query_params.get("source", TEXT_SOURCE)
    state["source"] = source if source in PROMPT_SOURCES else TEXT_SOURCE
    example = url_int("example")
    state["example"] = example if example is not None and 0 <= example < TASK_BATCH else 0
    template = st.query_params.get("template")
    if template and any(t.name == template for t in task_catalog.templates(state["source"])):
        state["template"] = template


def _model_changed() -> None:
    """A new model resets the selection and, if the prompt was the old default, the prompt."""
    state = st.session_state
    state["_reset_selection"] = True
    for key in ("layer", "head"):
        st.query_params.pop(key, None)
    choice = state.get("model_choice")
    name = state.get("model_other", "") if choice == OTHER else choice
    defaults = set(DEFAULT_PROMPTS.values()) | {FALLBACK_PROMPT}
    if state.get("prompt") in defaults:
        state["prompt"] = default_prompt(name)


def switch_model(name: str) -> None:
    """Button callback: load another model in the sidebar (e.g. the one a page's demo needs)."""
    state = st.session_state
    if name in zoo_models() + PRETRAINED_SUGGESTIONS + _cached_hub_models():
        state["model_choice"] = name
    else:
        state["model_choice"], state["model_other"] = OTHER, name
    _model_changed()


def _template_picker(source: str) -> str | None:
    """The template of a text task (a trained one by default), or None for tasks without templates."""
    tpls = task_catalog.templates(source)
    if not tpls:
        return None
    held = {t.name: t.held_out for t in tpls}
    if st.session_state.get("template") not in held:
        st.session_state["template"] = task_catalog.default_template(source)
    return st.selectbox(
        "Template", list(held), format_func=lambda n: n + (" (held out)" if held[n] else " (trained)"),
        key="template", persist_state="session",
        help="The sentence shape of the task's prompts. Names are always held out (never seen in training); "
        "a held-out template was never seen in training either, and a small model may fail there.",
    )


def sidebar() -> Choices:
    """Draw the sidebar's links and widgets; return what they say and keep it in the URL."""
    _init_state()
    zoo = zoo_models()
    with st.sidebar:
        _slots.lesson = st.container()  # a lesson's step, when the URL names one (core/ui/lessons.py)
        links = st.container()  # filled last, with the view the widgets below say
        st.header("Model and prompt")
        cached = [m for m in _cached_hub_models() if m not in zoo + PRETRAINED_SUGGESTIONS]
        choice = st.selectbox(
            "Model", zoo + PRETRAINED_SUGGESTIONS + cached + [OTHER], key="model_choice", persist_state="session",
            help="Embedded models are trained by this project and work offline. Pretrained TransformerLens models "
            "and other Hugging Face hub ids are downloaded from the hub (needs a network) unless this machine's "
            "Hugging Face cache has them: those are listed here and load offline. A local checkpoint folder of "
            "any of 22 architectures (GPT-2, Pythia, Llama, Mistral, Qwen, Gemma, Phi, OLMo, …) loads too. "
            "Device: $CIRCUIT_EXPLORER_DEVICE (auto: CUDA when present); precision: $CIRCUIT_EXPLORER_DTYPE.",
            on_change=_model_changed,
        )
        name = choice
        if choice == OTHER:
            name = st.text_input(
                "Model name or folder", key="model_other", placeholder="pythia-70m-deduped, Qwen/Qwen2.5-0.5B or /path/to/checkpoint",
                persist_state="session", on_change=_model_changed,
            ).strip()
        source = st.selectbox(
            "Prompt from", list(PROMPT_SOURCES), format_func=PROMPT_SOURCES.get, key="source", persist_state="session",
            help="Type a prompt, or take one from a task: clean and corrupted prompts with the answer and the wrong "
            "token, generated for this model's vocabulary (held-out names on the embedded models).",
        )
        text, example, template = "", 0, None
        if source == TEXT_SOURCE:
            if "prompt" not in st.session_state:
                st.session_state["prompt"] = default_prompt(name)
            text = st.text_area("Prompt", key="prompt", height=140, persist_state="session")
        else:
            template = _template_picker(source)
            example = int(st.number_input(f"Example (0–{TASK_BATCH - 1})", 0, TASK_BATCH - 1, key="example", step=1,
                                          persist_state="session"))
        charts.toggle()
    if source == TEXT_SOURCE:
        long_prompt = len(text) > MAX_URL_PROMPT
        set_url(model=name or None, prompt=None if long_prompt or not text else text, source=None, example=None,
                template=None)
        if long_prompt:
            st.sidebar.caption(f"This prompt ({len(text):,} characters) is too long to keep in the page's link "
                               f"(up to {MAX_URL_PROMPT:,}): a copied link opens the default prompt.")
    else:
        set_url(model=name or None, prompt=None, source=source, example=example, template=template)
    params = {k: v for k, v in st.query_params.to_dict().items() if k in LINK_KEYS}
    with links:
        for p in PAGES:
            st.page_link(p.script, label=p.label, icon=p.icon, query_params=params)
    return Choices(name, source, text, template, example)


# ---------------------------------------------------------------------------------------------
# The frame around a page
# ---------------------------------------------------------------------------------------------


# Streamlit leaves 6rem above a page's title; on a 720 px projector that pushes the first chart's
# axis below the fold. Room for the toolbar is enough.
LAYOUT_CSS = """<style>
[data-testid="stMainBlockContainer"] { padding-top: 2.5rem; }
[data-testid="stMainBlockContainer"] h1 { padding-top: 0; }
</style>"""


def draw(spec: PageSpec | None) -> Choices:
    """The frame's own elements: the sidebar, then the page's title; returns the sidebar's choices."""
    charts.begin_run(spec.title if spec is not None else None)
    st.html(LAYOUT_CSS)
    choices = sidebar()
    charts.draw_top()  # presentation mode: its styles, the caption line, "Exit presentation"
    if spec is not None:
        st.title(spec.title)
        set_url(page=spec.key)
    return choices


def run(page) -> None:
    """Draw the sidebar and the page's title at once, load the model and the prompt behind a
    spinner, then run the page with that view (see `core.ui.state.page_view`)."""
    spec = page_spec(page)
    if spec is None:  # the root URL: it only opens a page, at once
        page.run()
        return
    choices = draw(spec)
    with st.spinner("Starting: loading TransformerLens…"):  # seconds on a cold start, once per server
        from core.ui import state
    state.run_page(page, choices)


def draw_for_unframed_page() -> Choices:
    """The frame, drawn from a page that Streamlit ran without app.py.

    Streamlit runs a script in pages/ directly (its older pages/-folder mode) until app.py's
    st.navigation has run once in the process: the first request for a page URL on a fresh server
    (and every AppTest run after a page switch). Drawn as app.py would draw them, with the
    entrypoint's script hash, the sidebar's widgets are the same widgets as in a framed run, so
    their values carry over; and the legacy mode is switched off, as st.navigation does.
    """
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    PagesManager.uses_pages_directory = False
    ctx = get_script_run_ctx()
    info = ctx.pages_manager.get_pages().get(ctx.page_script_hash, {})
    spec = BY_KEY.get(info.get("url_pathname", ""))
    with ctx.run_with_active_hash(ctx.pages_manager.main_script_hash):
        return draw(spec)
