"""The one process-wide cache of the app: models, the activation store, and results.

Everything here is shared by every page and browser session. Cached functions that take a model
are keyed by `store.model_key(model)` (Streamlit's `hash_funcs`), never by the object's id: ids
are reused after garbage collection. Results that a page draws with a progress bar (patching and
ablation sweeps) live in a `store.KeyedCache`, the store's own per-key-lock LRU: one computation
per key, a second caller waits for the first. Nothing here computes an analysis: each function
calls `core`.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import weakref
from pathlib import Path

import streamlit as st
import torch
from transformer_lens import HookedTransformer

from core import attention, corpus, patching, saes, store, task_catalog, tasks
from core.models import ModelLoadError, load_model, zoo_models
from core.paths import data_dir
from core.store import ActivationStore, KeyedCache, model_key

BY_MODEL = {HookedTransformer: model_key}  # hash_funcs: a model is its key
BY_MODEL_AND_SAE = {**BY_MODEL, saes.LoadedSAE: lambda loaded: _sae_key(loaded)}
TASK_BATCH = task_catalog.BATCH


def _sae_key(loaded: saes.LoadedSAE) -> tuple:
    """An SAE as a cache key: where it came from and a hash of its weights and config."""
    from core import sae_index

    return (loaded.source, loaded.sae_id, sae_index.sae_fingerprint(loaded.sae))
RESULTS_KEPT = 64


DEVICE_ENV = "CIRCUIT_EXPLORER_DEVICE"  # auto (CUDA when present) | cpu | cuda
DTYPE_ENV = "CIRCUIT_EXPLORER_DTYPE"  # float32 | bfloat16 (Hugging Face checkpoints)


def load_settings() -> tuple[str, str]:
    """(device, precision) the app loads models with: $CIRCUIT_EXPLORER_DEVICE (default auto:
    CUDA when present) and $CIRCUIT_EXPLORER_DTYPE (default float32)."""
    return os.environ.get(DEVICE_ENV, "auto") or "auto", os.environ.get(DTYPE_ENV, "float32") or "float32"


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_model(name: str, device: str = "auto", dtype: str = "float32") -> HookedTransformer:
    return load_model(name, device=device, dtype=dtype)


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
    from core.ui.state import md_escape

    failed = _recent_failures.get(name)
    if failed and time.monotonic() - failed[0] < FAILURE_MEMORY_SECONDS:
        raise ModelLoadError(failed[1])
    try:
        with st.spinner(f"Loading {md_escape(name)}…"):
            return _cached_model(name, *load_settings())
    except ModelLoadError as err:
        _recent_failures[name] = (time.monotonic(), str(err))
        raise


_texts: "weakref.WeakKeyDictionary[HookedTransformer, dict[int, str]]" = weakref.WeakKeyDictionary()
_texts_guard = threading.Lock()


def token_texts(model: HookedTransformer, ids) -> list[str]:
    """The text of each token id in `ids` (ints or a tensor of any shape, flattened), as
    `store.decode` gives it for one id. Ids not decoded before are decoded together under one
    take of the model's lock (each take resets the model's hooks: on GPT-2 small a few
    milliseconds, which per token made the logit lens's 2,000 labels take seconds), then
    remembered for the model (a token's text never changes)."""
    flat = [int(t) for t in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
    with _texts_guard:
        known = _texts.setdefault(model, {})
        missing = sorted({t for t in flat if t not in known})
    if missing:
        decoded = dict(zip(missing, store.str_tokens(model, missing)))
        with _texts_guard:
            known.update(decoded)
    return [known[t] for t in flat]


# ---------------------------------------------------------------------------------------------
# Tasks and head scores
# ---------------------------------------------------------------------------------------------


HEAD_SCORES_DIR = "head-scores"
HEAD_SCORES_FORMAT = "1"  # bump when the scores' definition changes: older files are then recomputed


@st.cache_data(show_spinner=False, max_entries=16, hash_funcs=BY_MODEL)
def head_scores(model: HookedTransformer, seq_len: int, batch: int) -> dict:
    """Head-type scores of a model on repeated random tokens (seed 0), once per model.

    Computed from attention patterns only, outside the activation store: the full cache of
    32 x 61 tokens would crowd the store out on a large model. For a model loaded from a Hugging
    Face checkpoint (it carries `_circuit_explorer_weights_key`, a hash of its weights) they are
    also kept on disk (`head_scores_file`), so the next server start reads them instead of
    computing them (seconds on GPT-2 small). A file that cannot be read is recomputed and
    rewritten; a failed write is ignored.
    """
    path = head_scores_file(model, seq_len, batch)
    if path is not None:
        stored = _read_head_scores(path, model)
        if stored is not None:
            return stored
    tokens = attention.repeated_random_tokens(model, seq_len, batch, seed=0)
    scores = {k: None if v is None else v.clone() for k, v in attention.head_scores(model, tokens).items()}
    if path is not None:
        _write_head_scores(path, scores)
    return scores


def head_scores_file(model: HookedTransformer, seq_len: int, batch: int) -> Path | None:
    """Where `head_scores` keeps a model's scores: data_dir()/head-scores/<weights key>-<seq_len>-
    <batch>-<dtype>.safetensors (with -<device type> before the suffix off the CPU, whose numbers
    differ in the last bits); None for a model without a weights key (the zoo's: scored in well
    under a second)."""
    key = getattr(model, "_circuit_explorer_weights_key", None)
    if not key:
        return None
    dtype = str(model.cfg.dtype).removeprefix("torch.")
    device = torch.device(model.cfg.device).type
    suffix = "" if device == "cpu" else f"-{device}"
    return data_dir() / HEAD_SCORES_DIR / f"{key}-{int(seq_len)}-{int(batch)}-{dtype}{suffix}.safetensors"


def _head_scores_meta() -> dict[str, str]:
    return {"format": HEAD_SCORES_FORMAT, "seed": "0", "convention": "rows_with_target",
            "types": ",".join(attention.HEAD_TYPES)}


def _read_head_scores(path: Path, model: HookedTransformer) -> dict | None:
    """The scores kept in `path`, or None when it is missing, unreadable, corrupt, of another format
    or of another shape than the model's [layer, head]."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in _head_scores_meta().items()):
                return None
            absent = set(filter(None, meta.get("none", "").split(",")))
            scores = {t: None if t in absent else f.get_tensor(t) for t in attention.HEAD_TYPES}
    except Exception:  # noqa: BLE001 - missing, truncated, garbage: computed again
        return None
    shape = (model.cfg.n_layers, model.cfg.n_heads)
    if any(v is not None and (tuple(v.shape) != shape or v.dtype != torch.float32) for v in scores.values()):
        return None
    return scores


def _write_head_scores(path: Path, scores: dict) -> None:
    """Keep `scores` in `path`: written to a temporary file, then renamed (a reader never sees half a
    file). A read-only or full disk only costs the next start the computation."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in scores.items() if v is not None}
        meta = {**_head_scores_meta(), "none": ",".join(k for k, v in scores.items() if v is None)}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 - OSError, or safetensors' own error on a full disk
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


@st.cache_data(show_spinner=False, max_entries=16, hash_funcs=BY_MODEL)
def induction_strength(model: HookedTransformer) -> dict:
    """`attention.induction_strength`, once per model (the Attention page's "Across models" tab)."""
    return attention.induction_strength(model)


@st.cache_data(show_spinner=False, max_entries=256, hash_funcs=BY_MODEL)
def composition_table(model: HookedTransformer, seq_len: int, batch: int, sources: tuple, target: tuple,
                      also: tuple) -> list:
    """`attention.composition_table` on the same repeated random tokens, once per model and choice."""
    tokens = attention.repeated_random_tokens(model, seq_len, batch, seed=0)
    return attention.composition_table(model, tokens, seq_len, list(sources), target, list(also))


@st.cache_data(show_spinner=False, max_entries=64, hash_funcs=BY_MODEL)
def task_batch(model: HookedTransformer, name: str, n: int = TASK_BATCH, seed: int = 0,
               template: str | None = None) -> tasks.Task:
    """A built-in task's batch on held-out names (raises TaskError). `template`: one of the task's
    corpus templates (default: its trained default, `task_catalog.default_template`)."""
    template = template or task_catalog.default_template(name)
    extra = {"template": template} if template is not None else {}
    return tasks.make_task(name, model, n=n, seed=seed, split="held_out", **extra)


@st.cache_data(show_spinner=False, max_entries=16, hash_funcs=BY_MODEL)
def demo_task(model: HookedTransformer) -> str | None:
    """The first built-in task (in `tasks.DEMO_ORDER`) this model solves (`tasks.solves`), or None."""
    for name in tasks.DEMO_ORDER:
        try:
            task = task_batch(model, name)
        except tasks.TaskError:
            continue
        runs = get_store()  # the page then reads the same runs: no second forward pass
        if tasks.solves(task, runs.get(model, task.clean_tokens).logits, runs.get(model, task.corrupted_tokens).logits):
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
            task_batch(model, name)
        except tasks.TaskError:
            continue
        out.append(zoo_name)
    return out


# ---------------------------------------------------------------------------------------------
# Sweeps: kept per model, task and choice, computed once (a progress bar is drawn meanwhile)
# ---------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def _results() -> KeyedCache:
    """Process-wide LRU of sweep results, shared by every session (st.cache_data cannot hold a
    function that draws a progress bar created outside it)."""
    return KeyedCache(RESULTS_KEPT)


def task_key(task: tasks.Task) -> str:
    """A content hash of a task's prompts and answers (a cache key that never mixes two tasks up)."""
    h = hashlib.sha1()
    for t in (task.clean_tokens, task.corrupted_tokens, task.answers, task.wrongs):
        h.update(t.cpu().numpy().tobytes())
    h.update(task.metric_kind.encode())
    return h.hexdigest()


def patching_sweep(model: HookedTransformer, task: tasks.Task, sweep: str, direction: str, method: str,
                   example: int = 0, progress=None) -> patching.SweepResult:
    """`patching.sweep_task`, kept per model, task and choice (positions labelled by `example`)."""
    key = ("patch", model_key(model), task_key(task), sweep, direction, method, example)
    return _results().get(key, lambda: patching.sweep_task(model, task, sweep, direction, method, get_store(),
                                                           progress, example))


def ablation_sweep(model: HookedTransformer, task: tasks.Task, target: str, layer: int, kind: str,
                   progress=None) -> tuple[patching.AblationResult, tasks.Normaliser]:
    """`patching.ablate_task`, kept per model, task and choice."""
    key = ("ablate", model_key(model), task_key(task), target, layer, kind)
    return _results().get(key, lambda: patching.ablate_task(model, task, target, kind, layer, get_store(), progress))


# ---------------------------------------------------------------------------------------------
# Circuits (pages/circuits.py): runs, edge scores, curves, ACDC, path patching, weights
# ---------------------------------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=16, hash_funcs=BY_MODEL)
def induction_task(model: HookedTransformer, corruption: str, n: int = TASK_BATCH, seed: int = 0) -> tasks.Task:
    """The induction task as `task_batch` builds it (same n, seed, split), with the corruption chosen:
    "match" (the earlier occurrence of the last token replaced: the key path) or "continuation"."""
    return tasks.make_task("induction", model, n=n, seed=seed, split="held_out", corruption=corruption)


@st.cache_resource(show_spinner=False)
def _circuit_runs() -> KeyedCache:
    """Runs hold a task's clean activation cache: a few, apart from the results."""
    return KeyedCache(4)


def circuit_runs(model: HookedTransformer, task: tasks.Task, ablation: str):
    """`circuits.task_runs` (from the activation store), kept per model, task and ablation."""
    from core import circuits

    key = ("circuit_runs", model_key(model), task_key(task), ablation)
    return _circuit_runs().get(key, lambda: circuits.task_runs(model, task, ablation, get_store()))


def _score_key(model, task, ablation: str, method: str, steps: int) -> tuple:
    return (model_key(model), task_key(task), ablation, method, steps if method == "eap-ig" else None)


def edge_scores(model: HookedTransformer, task: tasks.Task, ablation: str, method: str, steps: int = 8, progress=None):
    """`circuits.score_edges` (EAP, EAP-IG or exact), kept per model, task and choice."""
    from core import circuits

    key = ("edge_scores", *_score_key(model, task, ablation, method, steps))
    return _results().get(key, lambda: circuits.score_edges(model, circuit_runs(model, task, ablation), method, steps,
                                                            progress))


def faithfulness_curve(model: HookedTransformer, task: tasks.Task, ablation: str, method: str, steps: int = 8,
                       progress=None):
    """`circuits.faithfulness_curve` of the top-N circuits of a method's scores, kept per choice."""
    from core import circuits

    key = ("curve", *_score_key(model, task, ablation, method, steps))
    return _results().get(key, lambda: circuits.faithfulness_curve(
        model, circuit_runs(model, task, ablation), edge_scores(model, task, ablation, method, steps), progress=progress))


def circuit_key(circuit) -> str:
    """A content hash of a circuit's edges (what its evaluation depends on, given the runs)."""
    return hashlib.sha1(circuit.edges.cpu().numpy().tobytes()).hexdigest()


def circuit_evaluation(model: HookedTransformer, task: tasks.Task, ablation: str, circuit):
    """`circuits.evaluate` of one circuit, kept per model, task, ablation and edge set."""
    from core import circuits

    key = ("circuit_eval", model_key(model), task_key(task), ablation, circuit_key(circuit))
    return _results().get(key, lambda: circuits.evaluate(model, circuit_runs(model, task, ablation), circuit))


def acdc(model: HookedTransformer, task: tasks.Task, ablation: str, threshold: float, progress=None):
    """`circuits.acdc` with threshold τ, kept per model, task, ablation and τ."""
    from core import circuits

    key = ("acdc", model_key(model), task_key(task), ablation, round(float(threshold), 6))
    return _results().get(key, lambda: circuits.acdc(model, circuit_runs(model, task, ablation), threshold, progress))


def minimality(model: HookedTransformer, task: tasks.Task, ablation: str, circuit):
    """`circuits.minimality` of every node of a circuit, kept per edge set."""
    from core import circuits

    key = ("minimality", model_key(model), task_key(task), ablation, circuit_key(circuit))
    return _results().get(key, lambda: circuits.minimality(model, circuit_runs(model, task, ablation), circuit))


def completeness(model: HookedTransformer, task: tasks.Task, ablation: str, circuit, sets: tuple):
    """`circuits.completeness` for node sets (a tuple of tuples), kept per edge set and sets."""
    from core import circuits

    key = ("completeness", model_key(model), task_key(task), ablation, circuit_key(circuit), sets)
    return _results().get(key, lambda: circuits.completeness(model, circuit_runs(model, task, ablation), circuit,
                                                             [list(s) for s in sets]))


def path_patching(model: HookedTransformer, task: tasks.Task, receivers: tuple, input: str, progress=None):
    """`path_patching.path_patch_task` (every head → logits, or → the receivers' q/k/v), kept per choice."""
    from core import path_patching as pp

    key = ("path_patch", model_key(model), task_key(task), tuple(sorted(receivers)), input)
    return _results().get(key, lambda: pp.path_patch_task(model, task, list(receivers) or None, input, get_store(),
                                                          progress))


@st.cache_data(show_spinner=False, max_entries=24, hash_funcs=BY_MODEL)
def composition(model: HookedTransformer, kind: str):
    """`composition.composition_summary` (scores and the random baseline) of one kind, once per model."""
    from core import composition as comp

    return comp.composition_summary(model, kind)


@st.cache_data(show_spinner=False, max_entries=8, hash_funcs=BY_MODEL)
def copying_scores(model: HookedTransformer):
    from core import composition as comp

    return comp.copying_scores(model)


@st.cache_data(show_spinner=False, max_entries=64, hash_funcs=BY_MODEL)
def top_ov_mappings(model: HookedTransformer, layer: int, head: int, k: int = 10) -> list:
    from core import composition as comp

    return comp.top_ov_mappings(model, layer, head, k)


@st.cache_data(show_spinner=False, max_entries=16, hash_funcs=BY_MODEL)
def probes(model: HookedTransformer, source: str, positive: tuple = (), negative: tuple = ()):
    """`steering.probes_with_control`, once per model and labelled prompts."""
    from core import steering

    return steering.probes_with_control(model, source, list(positive), list(negative))


@st.cache_data(show_spinner=False, max_entries=8, hash_funcs=BY_MODEL)
def demo_check(model: HookedTransformer):
    """`steering.default_demo_check`, once per model; its unsteered run stays in the activation store."""
    from core import steering

    return steering.default_demo_check(model, get_store())


# ---------------------------------------------------------------------------------------------
# Steering (pages/steering.py): what a view shows, kept per model, direction and intervention, so a
# rerun that changes none of them (a new sidebar prompt, which the Steer view does not read) runs
# no forward pass
# ---------------------------------------------------------------------------------------------

STEERING_KEPT = 64


@st.cache_resource(show_spinner=False)
def _steering_results() -> KeyedCache:
    """Small results (distributions, sampled sequences), apart from the sweeps so they never evict one."""
    return KeyedCache(STEERING_KEPT)


def _tokens_key(tokens: torch.Tensor) -> tuple:
    return (tuple(tokens.shape), tuple(int(t) for t in tokens.flatten().tolist()))


def steering_key(model: HookedTransformer, direction, mode: str, alpha: float = 0.0, from_pos: int = 0) -> tuple:
    """What `steering.steering_hooks(model, direction, mode, alpha, from_pos)` does, as a cache key: the
    model, the direction's content (name, hook, a hash of its vector) and the intervention."""
    vector = direction.vector.detach().to("cpu").contiguous()
    digest = hashlib.sha1(vector.view(torch.uint8).numpy().tobytes() if vector.numel() else b"").hexdigest()
    return (model_key(model), direction.name, direction.hook_name, str(vector.dtype), tuple(vector.shape), digest,
            mode, float(alpha) if mode == "add" else None, int(from_pos))


def next_token_shift(model: HookedTransformer, tokens: torch.Tensor, hooks, steer: tuple) -> dict:
    """`steering.next_token_shift` (the unsteered logits from the activation store), kept per
    prompt and `steering_key`."""
    from core import steering

    key = ("shift", steer, _tokens_key(tokens))
    return _steering_results().get(key, lambda: steering.next_token_shift(
        model, tokens, hooks, base_logits=get_store().get(model, tokens).logits))


def agreement_prompts(model: HookedTransformer):
    """`steering.agreement_prompts`, once per model: the AgreementPrompts, or the SteeringError's
    message where the model cannot build them (remembered too: building is seconds of tokenising)."""
    from core import steering

    def build():
        try:
            return steering.agreement_prompts(model)
        except steering.SteeringError as err:
            return str(err)

    return _steering_results().get(("agreement_prompts", model_key(model)), build)


def agreement_flip(model: HookedTransformer, hooks, steer: tuple):
    """`steering.agreement_flip` on the model's agreement prompts (unsteered logits from the store),
    kept per `steering_key`; None where the model has no agreement prompts."""
    from core import steering

    prompts = agreement_prompts(model)
    if isinstance(prompts, str):
        return None
    return _steering_results().get(("agreement", steer), lambda: steering.agreement_flip(
        model, hooks, prompts, base_logits=get_store().get(model, prompts.tokens).logits))


def generate(model: HookedTransformer, tokens: torch.Tensor, n_new: int, hooks, steer: tuple | None, seed: int,
             temperature: float) -> torch.Tensor:
    """`steering.generate`, kept per prompt, length, seed, temperature and `steering_key` (None: no
    hooks). Sampling is seeded, so the kept sequence is the one a new run would draw."""
    from core import steering

    key = ("generate", model_key(model), steer, _tokens_key(tokens), int(n_new), int(seed), float(temperature))
    return _steering_results().get(key, lambda: steering.generate(model, tokens, int(n_new), hooks if steer else (),
                                                                  int(seed), float(temperature)))


def sequence_texts(model: HookedTransformer, ids) -> tuple[str, list[int], list[str]]:
    """(`steering.sequence_text`, `steering.glued_positions`, `steering.token_labels`) of one
    sequence, kept per model and ids (each decodes token pairs one lock take at a time)."""
    from core import steering

    ids = [int(t) for t in ids]

    def texts():
        glued = steering.glued_positions(model, ids)
        labels = ["##" + t if i in glued else t for i, t in enumerate(token_texts(model, ids))]
        return steering.sequence_text(model, ids), glued, labels

    return _steering_results().get(("texts", model_key(model), tuple(ids)), texts)


# ---------------------------------------------------------------------------------------------
# SAEs: the SAE (embedded, local folder, pretrained), its corpus and its feature index
# ---------------------------------------------------------------------------------------------

SAE_SOURCES = {"embedded": "Embedded", "local": "Local folder", "pretrained": "Pretrained (sae_lens)"}


def load_sae(source: str, ident: str) -> saes.LoadedSAE:
    """A LoadedSAE, once per process (raises SAELoadError). ident: name, folder, or "release\\nsae id".

    A local folder is cached with its files' modification times, so a retrained SAE is reread.
    """
    stamp = ""
    if source == "local":
        try:
            stamp = ",".join(str(os.stat(os.path.join(ident, f)).st_mtime_ns) for f in ("cfg.json", "sae_weights.safetensors"))
        except (OSError, ValueError):  # missing, a name too long, a NUL byte: saes.load_local says which
            stamp = "missing"
    return _load_sae(source, ident, stamp)


@st.cache_resource(show_spinner=False, max_entries=8)
def _load_sae(source: str, ident: str, stamp: str) -> saes.LoadedSAE:  # stamp: part of the cache key only
    if source == "embedded":
        return saes.load_embedded(ident)
    if source == "local":
        return saes.load_local(ident)
    release, _, sae_id = ident.partition("\n")
    return saes.load_pretrained(release, sae_id)


@st.cache_data(show_spinner=False, max_entries=32, hash_funcs=BY_MODEL_AND_SAE)
def sae_fit_error(model: HookedTransformer, loaded: saes.LoadedSAE) -> str | None:
    """Why this SAE does not fit this model, or None (once per model and SAE)."""
    try:
        saes.check_fits(model, loaded)
    except saes.SAELoadError as err:
        return str(err)
    return None


@st.cache_resource(show_spinner=False, hash_funcs=BY_MODEL)
def pretrained_for_model(model: HookedTransformer) -> dict:
    return saes.pretrained_for_model(model)


@st.cache_resource(show_spinner=False, max_entries=8, hash_funcs=BY_MODEL)
def zoo_documents(model: HookedTransformer, spec_json: str) -> list[list[int]]:
    """The generated corpus of an embedded SAE (`corpus.documents`), once per process."""
    with store.shared_state(model):  # the corpus generator encodes with the model's tokenizer
        return corpus.documents(json.loads(spec_json), model.tokenizer)


@st.cache_data(show_spinner=False, max_entries=4, hash_funcs=BY_MODEL)
def text_documents(model: HookedTransformer, data: bytes) -> list[list[int]]:
    """An uploaded corpus as token documents (see saes.documents_from_text), once per file and model."""
    return saes.documents_from_text(model, data.decode("utf-8", errors="replace"))


_prefetched: set[str] = set()  # model keys whose embedded SAEs were queued (and "*" once all were)
_prefetched_guard = threading.Lock()
PREFETCH_ENV = "CIRCUIT_EXPLORER_PREFETCH_INDEXES"  # "0" leaves every index to its first visit
_prefetch_queue: list[tuple[str, HookedTransformer | str]] = []  # (embedded SAE, its model, or the model's name)
_prefetch_status: dict[str, object] = {}  # embedded SAE -> "queued", its sae_index.Build, or an error message
_prefetch_worker: threading.Thread | None = None


def prefetch_embedded_indexes(model: HookedTransformer | None = None) -> None:
    """Build, in the background, the feature index of every embedded SAE, once per server process:
    the SAEs of `model` first (called when a model is first loaded, which on a new server is its
    first page view), then every other embedded SAE of the zoo. The SAE page then finds its index
    built, or being built with progress (`embedded_index_progress`), instead of making its first
    visitor wait.

    One daemon worker thread owns the queue and requests one index at a time
    (`sae_index.request_index`, which shares each build with every session asking for it and runs
    at most one build at a time), so a build never depends on the session that started it: it goes
    on when that student navigates away or closes the tab. The other zoo models are loaded in the
    worker for their build (small; dropped afterwards: the index file is keyed by weights, not by
    the model object). `CIRCUIT_EXPLORER_PREFETCH_INDEXES=0` (the tests) switches it off.
    """
    global _prefetch_worker
    if os.environ.get(PREFETCH_ENV, "1") == "0":
        return
    from core.models import zoo_models as _zoo

    with _prefetched_guard:
        first: list[tuple[str, HookedTransformer | str]] = []
        if model is not None and model_key(model) not in _prefetched:
            _prefetched.add(model_key(model))
            first = [(name, model) for name in saes.embedded_saes(model.cfg.model_name)
                     if not _prefetch_started(name)]
        rest: list[tuple[str, HookedTransformer | str]] = []
        if "*" not in _prefetched:
            _prefetched.add("*")
            mine = {name for name, _ in first}
            rest = [(name, zoo_name) for zoo_name in _zoo() for name in saes.embedded_saes(zoo_name)
                    if name not in mine and not _prefetch_started(name)]
        if not first and not rest:
            return
        queued = {name for name, _ in first}
        _prefetch_queue[:] = first + [q for q in _prefetch_queue if q[0] not in queued] + rest
        for name, _ in first + rest:
            _prefetch_status.setdefault(name, "queued")
        if _prefetch_worker is None:
            _prefetch_worker = threading.Thread(target=_prefetch_work, name="prefetch-sae-indexes", daemon=True)
            _prefetch_worker.start()


def _prefetch_started(name: str) -> bool:
    """Whether the worker has requested this SAE's index already (caller holds _prefetched_guard)."""
    return name in _prefetch_status and _prefetch_status[name] != "queued"


def _prefetch_work() -> None:
    global _prefetch_worker
    from core import sae_index
    from core.models import load_model as _load

    while True:
        with _prefetched_guard:
            if not _prefetch_queue:
                _prefetch_worker = None  # under the guard: a caller queuing now starts a new worker
                return
            name, model = _prefetch_queue.pop(0)
        try:
            loaded = saes.load_embedded(name)
            if isinstance(model, str):
                model = _load(model)
            saes.check_fits(model, loaded)
            with store.shared_state(model):
                docs = corpus.documents(loaded.corpus_spec, model.tokenizer)
            build = sae_index.request_index(model, loaded, docs)
            with _prefetched_guard:
                _prefetch_status[name] = build
            build.wait()  # one at a time, in queue order
        except Exception as err:  # noqa: BLE001 - the page says what is wrong when that SAE is chosen
            with _prefetched_guard:
                _prefetch_status[name] = f"{type(err).__name__}: {err}"
        del model


def embedded_index_progress() -> dict[str, tuple[float, str]]:
    """Every embedded SAE whose feature index this server builds ahead, and how far it is:
    {SAE name: (share done 0..1, text)}, in build order. Text: "queued", the build's own phase and
    time left (sae_index's progress text), "ready", or "failed: ...". Empty when prefetching is
    off (`CIRCUIT_EXPLORER_PREFETCH_INDEXES=0`) or not started yet. Cheap: for a page to poll."""
    with _prefetched_guard:
        status = dict(_prefetch_status)
    out: dict[str, tuple[float, str]] = {}
    for name, s in status.items():
        if s == "queued":
            out[name] = (0.0, "queued")
        elif isinstance(s, str):
            out[name] = (0.0, f"failed: {s}")
        elif s.done:
            out[name] = (1.0, "ready") if not s.failed else (0.0, f"failed: {s.error}")
        else:
            out[name] = s.status()
    return out
