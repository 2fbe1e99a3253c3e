"""The one Streamlit-aware module of core: cached model and store, the shared sidebar, the URL.

The model (per name) and the activation store are `st.cache_resource`: one per process,
shared by every page and browser session. The current view (model, prompt, layer, head)
lives in the URL query parameters, so a copied link reopens the same view.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import streamlit as st
import torch
from transformer_lens import HookedTransformer

from core import attention, store, task_catalog, tasks
from core.models import ModelLoadError, load_model, zoo_models
from core.prompts import Prompt, PromptError, prepare_prompt, prompt_from_tokens
from core.store import ActivationStore, model_key
from core.ui import frame

TEXT_SOURCE, PROMPT_SOURCES, TASK_BATCH = frame.TEXT_SOURCE, frame.PROMPT_SOURCES, frame.TASK_BATCH
url_int, set_url = frame.url_int, frame.set_url


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_model(name: str) -> HookedTransformer:
    return load_model(name)


@st.cache_resource(show_spinner=False)
def get_store() -> ActivationStore:
    """The activation store shared by every page and session (cap: CIRCUIT_EXPLORER_STORE_BYTES)."""
    return ActivationStore()


_recent_failures: dict[str, tuple[float, str]] = {}
FAILURE_MEMORY_SECONDS = 30.0


def get_model(name: str) -> HookedTransformer:
    """The process-wide model for `name` (raises ModelLoadError with a readable message).

    A failure is remembered for a few seconds, so reruns of a page showing it do not probe the
    hub again on every widget change.
    """
    failed = _recent_failures.get(name)
    if failed and time.monotonic() - failed[0] < FAILURE_MEMORY_SECONDS:
        raise ModelLoadError(failed[1])
    try:
        with st.spinner(f"Loading {md_escape(name)}…"):
            return _cached_model(name)
    except ModelLoadError as err:
        _recent_failures[name] = (time.monotonic(), str(err))
        raise


def md_escape(text: str) -> str:
    """Text shown through Markdown (st.error, st.spinner…) as typed: no links, images or emphasis."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$:])", r"\\\1", text)


@st.cache_data(show_spinner=False, max_entries=16)
def head_scores(_model: HookedTransformer, model_id: str, seq_len: int, batch: int) -> dict:
    """Head-type scores of a model on repeated random tokens (seed 0), once per model object
    (`model_id` = `store.model_key(model)`, the cache key: the model itself is not hashed).

    Computed from attention patterns only, outside the activation store: the full cache of
    32 x 61 tokens would crowd the store out on a large model.
    """
    tokens = attention.repeated_random_tokens(_model, seq_len, batch, seed=0)
    return {k: v.clone() for k, v in attention.head_scores(_model, tokens).items()}


@st.cache_data(show_spinner=False, max_entries=256)
def composition_table(
    _model: HookedTransformer, model_id: str, seq_len: int, batch: int,
    sources: tuple, target: tuple, also: tuple,
) -> list:
    """`attention.composition_table` on the same repeated random tokens, cached per model object."""
    tokens = attention.repeated_random_tokens(_model, seq_len, batch, seed=0)
    return attention.composition_table(_model, tokens, seq_len, list(sources), target, list(also))


@st.cache_data(show_spinner=False, max_entries=64)
def task_batch(_model: HookedTransformer, model_id: str, name: str, n: int, seed: int,
               template: str | None = None) -> tasks.Task:
    """A built-in task's batch on held-out names for a model object (cached; raises TaskError).

    `template`: one of the task's corpus templates (default: its held-out one).
    """
    extra = {"template": template} if template is not None else {}
    return tasks.make_task(name, _model, n=n, seed=seed, split="held_out", **extra)


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


_current = threading.local()  # the view of the page this thread is running (set by run_page)


def run_page(page, choices: frame.Choices) -> None:
    """Load what the sidebar asks for, say what is wrong if anything, else run `page` with the view.

    Called by the frame (app.py) on every run; the page reads the view with `page_view()`.
    """
    view = build_view(choices)
    if not show_problems(view):
        sidebar_footer()
        return
    _current.view = view
    try:
        page.run()
    finally:
        _current.view = None


def page_view() -> View:
    """The view the frame built for this run (model, prompt, task).

    A page that Streamlit ran without app.py (see `frame.draw_for_unframed_page`) draws the frame
    itself, with the same widgets, and stops after its problems if there are any.
    """
    view = getattr(_current, "view", None)
    if view is None:
        view = build_view(frame.draw_for_unframed_page())
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
            model = get_model(name)
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
            task = task_batch(model, model_key(model), source, TASK_BATCH, 0, choices.template)
            prompt = prompt_from_tokens(model, task.clean_tokens[choices.example])
        except tasks.TaskError as err:
            others = [m for m in models_with_task(source) if m != name]
            prompt_error = f"{PROMPT_SOURCES[source]} cannot be built for this model: {err}"
            if others:
                prompt_error += f" Embedded models that have it: {', '.join(others)}."
                suggested = others
    if model is not None:
        prefetch_embedded_indexes(model, model_key(model))
    with st.sidebar:
        if task is not None:
            _task_caption(model, task, choices.example)
        if model is not None:
            cfg = model.cfg
            st.caption(
                f"{cfg.n_layers} layers × {cfg.n_heads} heads, d_model {cfg.d_model}, "
                f"context {cfg.n_ctx} tokens, vocabulary {cfg.d_vocab}"
                + (", attention only" if cfg.attn_only else "")
            )
    return View(name, model, model_error, prompt, prompt_error, task, suggested)


def _task_caption(model: HookedTransformer, task: tasks.Task, i: int) -> None:
    """The example's clean and corrupted prompts and answers, as plain text."""
    answer, wrong = decode_token(model, task.answers[i]), decode_token(model, task.wrongs[i])
    st.text(f"Clean: {task.clean_prompts[i]}\nCorrupted: {task.corrupted_prompts[i]}")
    note = f"Answer {answer!r} vs {wrong!r}; metric: {task.metric_label}."
    if task.metric_kind == "prob_diff":
        note += " Answer/wrong stand for every year after/before the start year."
    st.caption(md_escape(f"{task.description}. {note} Template '{task.template}', {len(task)} prompts."))


def sidebar_footer() -> None:
    """What the shared activation store holds; pages call this last, after their runs."""
    st.sidebar.caption(f"Activation store: {get_store().describe()}")


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


# ---------------------------------------------------------------------------------------------
# Logit attribution page: the target token(s), and links to a head on the Attention page
# ---------------------------------------------------------------------------------------------


def decode_token(model: HookedTransformer, token: int) -> str:
    return store.decode(model, int(token))


def to_tokens(model: HookedTransformer, text: str, prepend_bos: bool = True) -> torch.Tensor:
    """[1, pos] tokens of `text`, cut to the model's context (tokenised under the store's lock)."""
    return store.to_tokens(model, text, prepend_bos=prepend_bos)[:, : model.cfg.n_ctx]


@dataclass
class AttributionTarget:
    """What the attribution explains: answer ids [batch], optional wrong ids [batch], a label."""

    answers: "torch.Tensor | None" = None
    wrongs: "torch.Tensor | None" = None
    label: str = ""
    error: str | None = None
    suggestion: str | None = None  # a value the person could use instead (first token of a split answer)
    suggestion_key: str | None = None


ANSWER_KEY, WRONG_KEY = "attr_answer", "attr_wrong"


def use_suggestion(key: str, value: str) -> None:
    """Button callback: put a suggested value into a text box."""
    st.session_state[key] = value


def attribution_target(model: HookedTransformer, prompt: Prompt, task: tasks.Task | None, run, whole_task: bool) -> AttributionTarget:
    """Draw the answer / counterfactual boxes and parse them (messages instead of exceptions).

    Defaults: a task's answer and wrong token; for typed text the model's two most likely next
    tokens (so the page opens on "why this and not the runner-up"). Defaults are reset when
    the prompt changes, and the boxes are kept in the URL (`answer`, `wrong`).
    """
    state = st.session_state
    c1, c2 = st.columns(2)
    if whole_task:
        c1.text_input("Answer", value="each prompt's answer", disabled=True, key="attr_answer_task")
        c2.text_input("Counterfactual", value="each prompt's wrong token", disabled=True, key="attr_wrong_task")
        set_url(answer=None, wrong=None)  # the boxes do not apply to the batch
        label = "logit difference answer − wrong"
        if task.metric_kind == "prob_diff":
            label += " (one year token against one; the task's own metric is a probability difference)"
        return AttributionTarget(task.answers, task.wrongs, label)
    where = (model_key(model), tuple(prompt.tokens[0].tolist()))
    if state.get("_attr_for") != where:
        first_time = "_attr_for" not in state
        state["_attr_for"] = where
        if task is not None:
            i = int(state.get("example", 0))
            ids = [int(task.answers[i]), int(task.wrongs[i])]
        else:
            ids = run.logits[0, -1].topk(2).indices.tolist()
        default = (decode_token(model, ids[0]), decode_token(model, ids[1]))
        # The default tokens are known by id: their text may not re-tokenize to them (a "##53"
        # continuation shows as "53"; GPT-2's "," is not " ,").
        state["_attr_known"] = {default[0]: ids[0], default[1]: ids[1]}
        url = (st.query_params.get("answer"), st.query_params.get("wrong")) if first_time else (None, None)
        state[ANSWER_KEY] = url[0] if url[0] is not None else default[0]
        state[WRONG_KEY] = url[1] if url[1] is not None else default[1]
    answer_text = c1.text_input("Answer", key=ANSWER_KEY, persist_state="session", help="The next token to explain (one token). "
                                "'Mary' means ' Mary', as after a space.")
    wrong_text = c2.text_input("Counterfactual (optional)", key=WRONG_KEY, persist_state="session",
                               help="Explain the logit difference answer − counterfactual; leave empty for the answer's logit.")
    set_url(answer=answer_text or None, wrong=wrong_text or None)
    known = state.get("_attr_known", {})
    try:
        answer = tasks.answer_token(model, answer_text, "answer", known=known)
    except tasks.TaskError as err:
        return AttributionTarget(error=md_escape(str(err)), suggestion=err.suggestion, suggestion_key=ANSWER_KEY)
    if not wrong_text.strip():
        return AttributionTarget(torch.tensor([answer]), None, f"logit({decode_token(model, answer)!r})")
    try:
        wrong = tasks.answer_token(model, wrong_text, "counterfactual", known=known)
    except tasks.TaskError as err:
        return AttributionTarget(error=md_escape(str(err)), suggestion=err.suggestion, suggestion_key=WRONG_KEY)
    if wrong == answer:
        return AttributionTarget(error=md_escape(
            f"The counterfactual is the same token as the answer ({decode_token(model, answer)!r}): "
            "their logit difference is always 0. Pick another token, or leave it empty."))
    label = f"logit({decode_token(model, answer)!r}) − logit({decode_token(model, wrong)!r})"
    return AttributionTarget(torch.tensor([answer]), torch.tensor([wrong]), label)


_view_params = frame.view_params


def attention_link_params(layer: int, head: int) -> dict:
    """Query params that open (layer, head) on the Attention page with this model and prompt."""
    return {**_view_params("attention"), "layer": str(layer), "head": str(head)}


def attribution_link_params() -> dict:
    """Query params that open the Logit attribution page with this model and prompt."""
    return _view_params("attribution")


def open_head_on_attention_page(layer: int, head: int) -> None:
    """Switch to the Attention page showing (layer, head)."""
    st.session_state["layer"], st.session_state["head"] = layer, head
    st.switch_page("pages/attention.py", query_params=attention_link_params(layer, head))


# ---------------------------------------------------------------------------------------------
# Head-importance page: the task (a built-in one or a typed pair) and cached sweeps
# ---------------------------------------------------------------------------------------------

# The typed pair's defaults when the prompt is the IOI example: the IOI paper's ABC corruption.
DEFAULT_PAIR = {frame.FALLBACK_PROMPT: ("When Mary and John went to the store, Paul gave a drink to", "Mary", "John")}
PAIR_KEYS = ("pair_corrupted", "pair_answer", "pair_wrong")


def custom_pair(model: HookedTransformer, prompt: Prompt) -> tuple[tasks.Task | None, str | None]:
    """Draw the corrupted prompt and the two answers for a typed clean prompt; return (task, message).

    The clean prompt is the sidebar's. Defaults: the IOI paper's corruption for the IOI example;
    otherwise the clean prompt itself (edit it: patching needs two runs that differ) and the
    model's two most likely next tokens as the answers, as on the Logit attribution page.
    """
    state = st.session_state
    clean = state.get("prompt", "")
    if state.get("_pair_for") != (model_key(model), clean):
        state["_pair_for"] = (model_key(model), clean)
        known: dict[str, int] = {}
        if clean in DEFAULT_PAIR:
            corrupted, answer, wrong = DEFAULT_PAIR[clean]
        else:
            top = get_store().get(model, prompt.tokens).logits[0, -1].topk(2).indices.tolist()
            corrupted, answer, wrong = clean, decode_token(model, top[0]), decode_token(model, top[1])
            known = {answer: top[0], wrong: top[1]}  # known by id: their text may not tokenise back
        state["_pair_known"] = known
        state.update(dict(zip(PAIR_KEYS, (corrupted, answer, wrong))))
    st.caption("Patching compares two runs. The clean prompt is the sidebar's; type a corrupted prompt of the "
               "same token length and the two answers, or take a task in the sidebar (\"Prompt from\").")
    corrupted = st.text_input("Corrupted prompt", key=PAIR_KEYS[0], persist_state="session")
    c1, c2 = st.columns(2)
    answer = c1.text_input("Answer (clean run's)", key=PAIR_KEYS[1], persist_state="session")
    wrong = c2.text_input("Wrong answer (corrupted run's)", key=PAIR_KEYS[2], persist_state="session")
    try:
        return tasks.custom_task(model, clean, corrupted, answer, wrong, known=state.get("_pair_known")), None
    except tasks.TaskError as err:
        return None, md_escape(str(err))


DEMO_TASKS = ("ioi", "sva", "greater_than", "induction")  # the order a page's demo is picked in
DEMO_MIN_ACCURACY = 0.8


@st.cache_data(show_spinner=False, max_entries=16)
def demo_task(_model: HookedTransformer, model_id: str) -> str | None:
    """The first built-in task this model solves (clean accuracy >= 0.8, and a clean - corrupted gap
    that makes normalised numbers meaningful) on its default template, or None."""
    for name in DEMO_TASKS:
        try:
            task = task_batch(_model, model_id, name, TASK_BATCH, 0, task_catalog.default_template(name))
        except tasks.TaskError:
            continue
        clean, corrupted = store.run(_model, task.clean_tokens), store.run(_model, task.corrupted_tokens)
        if task.accuracy(clean) >= DEMO_MIN_ACCURACY and tasks.normaliser(task, clean, corrupted).meaningful:
            return name
    return None


@st.cache_data(show_spinner=False, max_entries=8)
def models_with_task(name: str) -> list[str]:
    """The embedded models for which the built-in task `name` can be built."""
    out = []
    for zoo_name in zoo_models():
        try:
            model = get_model(zoo_name)
        except ModelLoadError:
            continue  # a damaged zoo folder: not one to suggest
        try:
            task_batch(model, model_key(model), name, TASK_BATCH, 0, task_catalog.default_template(name))
        except tasks.TaskError:
            continue
        out.append(zoo_name)
    return out


def task_key(task: tasks.Task) -> str:
    """A content hash of a task's prompts and answers (a cache key that never mixes two tasks up)."""
    import hashlib

    h = hashlib.sha1()
    for t in (task.clean_tokens, task.corrupted_tokens, task.answers, task.wrongs):
        h.update(t.cpu().numpy().tobytes())
    h.update(task.metric_kind.encode())
    return h.hexdigest()


RESULTS_KEPT = 64


@st.cache_resource(show_spinner=False)
def _results() -> tuple:
    """Process-wide LRU of sweep results, shared by every session (st.cache_data cannot hold a
    function that draws a progress bar created outside it)."""
    from collections import OrderedDict

    return OrderedDict(), threading.Lock(), {}


def _cached(key: tuple, compute) -> dict:
    """The kept result for `key`, computed once: a second caller of the same key waits for the first."""
    kept, lock, computing = _results()
    with lock:
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
        key_lock = computing.setdefault(key, threading.Lock())
    with key_lock:
        with lock:
            if key in kept:
                return kept[key]
        value = compute()  # on an error (or a rerun) the key lock stays for the next caller
        with lock:
            kept[key] = value
            while len(kept) > RESULTS_KEPT:
                kept.popitem(last=False)
            if computing.get(key) is key_lock:
                computing.pop(key)
        return value


def patching_sweep(model: HookedTransformer, model_id: str, task: tasks.Task, task_id: str, sweep: str,
                   direction: str, method: str, _progress=None) -> dict:
    """One sweep's raw metric values (numpy), cached per model object, task and choice.

    direction: "denoise" (clean values into the corrupted run) or "noise" (the reverse);
    method: "exact" or "attribution".
    """
    return _cached(("patch", model_id, task_id, sweep, direction, method),
                   lambda: _patching_sweep(model, task, sweep, direction, method, _progress))


def _patching_sweep(_model, _task, sweep, direction, method, _progress) -> dict:
    from core import patching

    store = get_store()
    clean, corrupted = store.get(_model, _task.clean_tokens), store.get(_model, _task.corrupted_tokens)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    if method == "attribution":
        values = patching.attribution_patch(_model, sweep, base.tokens, source.cache, _task.metric)
    else:
        values = patching.run_sweep(_model, sweep, base.tokens, base.cache, source.cache, _task.metric, progress=_progress)
    return {"values": values.numpy()}


def ablation_sweep(model: HookedTransformer, model_id: str, task: tasks.Task, task_id: str, target: str,
                   layer: int, kind: str, _progress=None) -> dict:
    """Ablation of every head, MLP layer or neuron of `layer` on the clean prompts (numpy arrays), cached."""
    return _cached(("ablate", model_id, task_id, target, layer, kind),
                   lambda: _ablation_sweep(model, task, target, layer, kind, _progress))


def _ablation_sweep(_model, _task, target, layer, kind, _progress) -> dict:
    from core import patching

    comps = {"heads": lambda: patching.head_components(_model), "mlps": lambda: patching.mlp_components(_model),
             "neurons": lambda: patching.neuron_components(_model, layer)}[target]()
    run = get_store().get(_model, _task.clean_tokens)
    result = patching.ablate(_model, run.tokens, run.cache, comps, _task.metric, kind=kind, progress=_progress,
                             logits=run.logits)
    return {"metric": result.metric.numpy(), "loss": result.loss.numpy(), "clean_metric": result.clean_metric,
            "clean_loss": result.clean_loss}


# ---------------------------------------------------------------------------------------------
# SAE page: the SAE (embedded, local folder, pretrained), its corpus and its feature index
# ---------------------------------------------------------------------------------------------

SAE_SOURCES = {"embedded": "Embedded", "local": "Local folder", "pretrained": "Pretrained (sae_lens)"}


def load_sae(source: str, ident: str):
    """A LoadedSAE, once per process (raises SAELoadError). ident: name, folder, or "release\\nsae id".

    A local folder is cached with its files' modification times, so a retrained SAE is reread.
    """
    import os

    stamp = ""
    if source == "local":
        try:
            stamp = ",".join(str(os.stat(os.path.join(ident, f)).st_mtime_ns) for f in ("cfg.json", "sae_weights.safetensors"))
        except (OSError, ValueError):  # missing, a name too long, a NUL byte: saes.load_local says which
            stamp = "missing"
    return _load_sae(source, ident, stamp)


@st.cache_resource(show_spinner=False, max_entries=8)
def _load_sae(source: str, ident: str, stamp: str):  # stamp: part of the cache key only
    from core import saes

    if source == "embedded":
        return saes.load_embedded(ident)
    if source == "local":
        return saes.load_local(ident)
    release, _, sae_id = ident.partition("\n")
    return saes.load_pretrained(release, sae_id)


@st.cache_data(show_spinner=False, max_entries=32)
def sae_fit_error(_model: HookedTransformer, model_id: str, _loaded, sae_key: str) -> str | None:
    """Why this SAE does not fit this model, or None (cached per model object and SAE)."""
    from core import saes

    try:
        saes.check_fits(_model, _loaded)
    except saes.SAELoadError as err:
        return str(err)
    return None


@st.cache_resource(show_spinner=False)
def pretrained_for_model(_model: HookedTransformer, model_id: str) -> dict:
    from core import saes

    return saes.pretrained_for_model(_model)


@st.cache_resource(show_spinner=False, max_entries=8)
def zoo_documents(_model: HookedTransformer, model_id: str, spec_json: str) -> list[list[int]]:
    """The generated corpus of an embedded SAE (see core.zoo.sae_data), once per process."""
    import json

    from core.zoo import sae_data

    with store.shared_state(_model):  # the corpus generator encodes with the model's tokenizer
        return sae_data.documents(json.loads(spec_json), _model.tokenizer)


INDEX_POLL_SECONDS = 1.0  # how often a page showing a build in progress looks at it
INDEX_FIRST_WAIT = 1.0  # a build just started is waited for this long (a small corpus is done by then)


def feature_index(model: HookedTransformer, loaded, docs: list[list[int]], what: str):
    """The SQLite feature index for (model, SAE, corpus), or None while it is being built.

    The build runs once per server, in a background thread owned by `core.sae_index` (a registry
    keyed by the index file): it outlives reruns, page changes and the session that started it,
    and every session asking for the same index gets the same build. While it runs, a fragment
    shows its progress and time left, polls it every INDEX_POLL_SECONDS, and reruns the page when
    it is done. Raises sae_index.IndexError_ (a message for the user) for an empty corpus or a
    build that failed (a full disk…).
    """
    from core import sae_index

    build = sae_index.request_index(model, loaded, docs)
    if not build.done:
        build.wait(max(0.0, INDEX_FIRST_WAIT - (time.monotonic() - build.started)))
    if build.done:
        return build.result()
    _index_progress(str(build.path), what)
    return None


@st.fragment(run_every=INDEX_POLL_SECONDS)
def _index_progress(path: str, what: str) -> None:
    """The progress bar of a background index build; the whole page reruns when it is over."""
    from core import sae_index

    build = sae_index.current_build(path)
    if build is None or build.done:
        st.rerun(scope="app")
    share, text = build.status()
    st.progress(share, text=md_escape(f"Building the feature index over {what}, once for this server: {text}."))
    st.caption("It builds in the background: keep exploring (the prompt's features, logit effects, your own text "
               "and the ablation work without it), or leave the page and come back; another tab asking for the "
               "same index waits for this build.")


_prefetched: set[str] = set()
_prefetched_guard = threading.Lock()
PREFETCH_ENV = "CIRCUIT_EXPLORER_PREFETCH_INDEXES"  # "0" leaves every index to its first visit


def prefetch_embedded_indexes(model: HookedTransformer, model_id: str) -> None:
    """Start building, in the background, the feature indexes of every embedded SAE of this model,
    once per model object: called when a model is first loaded, so that the SAE page finds them
    built (or being built, with progress) instead of making its first visitor wait.

    The SAEs are read and their corpora generated in a daemon thread too (the corpus generator
    tokenises under the store's lock); `sae_index.request_index` runs one build at a time, on one
    torch thread, and shares each with every session that asks for it.
    """
    import os

    if os.environ.get(PREFETCH_ENV, "1") == "0":
        return
    with _prefetched_guard:
        if model_id in _prefetched:
            return
        _prefetched.add(model_id)

    def work() -> None:
        from core import sae_index, saes
        from core.zoo import sae_data

        for name in saes.embedded_saes(model.cfg.model_name):
            try:
                loaded = saes.load_embedded(name)
                saes.check_fits(model, loaded)
                with store.shared_state(model):
                    docs = sae_data.documents(loaded.corpus_spec, model.tokenizer)
                sae_index.request_index(model, loaded, docs)
            except Exception:  # noqa: BLE001 - the page says what is wrong when that SAE is chosen
                continue

    threading.Thread(target=work, name=f"prefetch-{model_id}", daemon=True).start()


@st.cache_data(show_spinner=False, max_entries=4)
def text_documents(_model: HookedTransformer, model_id: str, data: bytes) -> list[list[int]]:
    """An uploaded corpus as token documents (see saes.documents_from_text), once per file and model."""
    from core import saes

    return saes.documents_from_text(_model, data.decode("utf-8", errors="replace"))
