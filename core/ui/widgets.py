"""Widgets that several pages share or that hold logic beyond drawing: the answer boxes, the
custom clean/corrupted pair, a progress bar with the time left, the feature index's build panel.

They read and write session state and call `core`; none computes an analysis itself.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import streamlit as st
import torch
from transformer_lens import HookedTransformer

from core import tasks
from core.prompts import Prompt
from core.store import model_key
from core.ui import cache, frame
from core.ui.state import decode_token, md_escape, set_url


@contextmanager
def progress_bar(what: str) -> Iterator[Callable[[float], None]]:
    """A progress bar with the time left, for work that reports its share done (0..1); removed after."""
    bar = st.empty()
    start = time.monotonic()

    def report(share: float) -> None:
        elapsed = time.monotonic() - start
        left = f", about {elapsed * (1 - share) / share:.0f} s left" if share > 0 and elapsed > 0.5 else ""
        bar.progress(min(1.0, max(0.0, share)), text=f"{what}: {share:.0%}{left}")

    try:
        yield report
    finally:
        bar.empty()


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
            top = cache.get_store().get(model, prompt.tokens).logits[0, -1].topk(2).indices.tolist()
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


INDEX_POLL_SECONDS = 1.0  # how often a page showing a build in progress looks at it


INDEX_FIRST_WAIT = 1.0  # a build just started is waited for this long (a small corpus is done by then)


def feature_index(model: HookedTransformer, loaded, docs: list[list[int]], what: str):
    """The SQLite feature index for (model, SAE, corpus), or None while it is being built.

    The build runs once per server, in a background thread owned by `core.sae_index` (a registry
    keyed by the index file): it outlives reruns, page changes and the session that started it,
    and every session asking for the same index gets the same build. While it runs, a fragment
    shows its progress and time left, polls it every INDEX_POLL_SECONDS, and reruns the page when
    it is done. Raises sae_index.FeatureIndexError (a message for the user) for an empty corpus or a
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
