"""Large models: the same views through a backend (core/backend.py), on this machine or on NDIF.

Three places a model can run: the app's own model (TransformerLens, the one in the sidebar), a
Hugging Face checkpoint folder through nnsight here, or a model NDIF serves (nnsight remote).
Each view is computed by the chosen backend only when it is open; a remote view is sent when
"Run on NDIF" is pressed, and its result stays on the page.
"""
import streamlit as st
import torch

from core import backend as be
from core import plots
from core.ui import charts
from core.ui import state as ui

view = ui.page_view()

WHERE = {"app": "The app's model (TransformerLens)", "local": "A Hugging Face folder, with nnsight, on this machine",
         "remote": "Remote: a model NDIF serves"}
VIEWS = {"dla_layers": "Logit attribution by layer", "dla_heads": "Logit attribution by head",
         "logit_lens": "Logit lens", "attention": "Attention patterns", "residual_norms": "Residual norms",
         "patching": "Activation patching", "attribution_patching": "Attribution patching", "steering": "Steering"}
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEFAULT_SOURCE = "When Mary and John went to the store, Mary gave a drink to"
MAX_RESULTS = 16  # views kept per session, so going back to one costs no new request


@st.cache_resource(show_spinner=False, max_entries=2)
def local_backend(folder: str):
    from core.nnsight_backend import NNsightBackend, load_local
    return NNsightBackend(load_local(folder))


@st.cache_resource(show_spinner=False, max_entries=4)
def remote_lm(repo_id: str):
    from core import ndif
    return ndif.remote_model(repo_id)


@st.cache_data(show_spinner=False, ttl=300)
def served(host: str) -> list[str]:
    from core import ndif
    return ndif.served_models()


def fail(message: str) -> None:
    st.error(ui.md_escape(message))  # paths, ids and server messages shown as typed
    st.stop()


NEEDS_ANSWER = {"dla_layers", "dla_heads", "patching", "attribution_patching"}
MAX_REQUESTS = 100  # a remote sweep of more asks for a shorter prompt or a larger CIRCUIT_EXPLORER_NDIF_TOKENS
BIG = 256  # heads: above this, the attention view fetches and draws one layer


where = st.radio("Where the model runs", list(WHERE), format_func=WHERE.get, horizontal=True, key="nn_where")

# -- the backend ---------------------------------------------------------------------------------
if where == "app":
    from core.ui import cache
    backend = be.TLBackend(view.model, store=cache.get_store())  # the run the other pages made of this prompt
    model_label = view.model_name
elif where == "local":
    folder = st.text_input("Checkpoint folder (config.json, weights, tokenizer)", key="nn_folder",
                           placeholder="/path/to/a/Llama-or-GPT-2-folder").strip()
    if not folder:
        st.info(f"Type the path of a Hugging Face checkpoint folder. nnsight maps these architectures: "
                f"{', '.join(be.supported_architectures())}.")
        st.stop()
    from pathlib import Path
    if not Path(folder).is_dir() or not (Path(folder) / "config.json").is_file():
        fail(f"{folder} is not a checkpoint folder (a folder with config.json, the weights and the tokenizer). "
             "A model on the Hugging Face hub that does not fit here runs remotely: choose Remote.")
    try:
        with st.spinner(f"Loading {folder} with nnsight…"):
            backend = local_backend(folder)
    except be.BackendError as e:
        fail(str(e))
    model_label = folder
else:
    from core import ndif
    settings = ndif.settings()
    if not settings.has_key:
        fail(ndif.NO_KEY)
    try:
        with st.spinner(f"Asking {settings.host} which models it serves…"):
            names = served(settings.host)
    except be.BackendError as e:
        fail(str(e))
    if not names:
        fail(f"NDIF ({settings.host}) serves no model right now; try again later.")
    default = next((i for i, n in enumerate(names) if "llama" in n.lower()), 0)
    repo = st.selectbox("Model on NDIF", names, index=default, key="nn_repo")
    try:
        with st.spinner(f"Reading {repo}'s config and tokenizer…"):
            lm = remote_lm(repo)
        transport_key = f"nn_transport:{repo}"  # per session and model: its request log and finished requests
        if transport_key not in st.session_state:
            st.session_state[transport_key] = ndif.Transport(settings)
        transport = st.session_state[transport_key]
        from core.nnsight_backend import NNsightBackend
        backend = NNsightBackend(lm, transport)
    except be.BackendError as e:
        fail(str(e))
    model_label = f"{repo} on NDIF"

spec = backend.spec
st.caption(f"{ui.md_escape(model_label)} · {spec.architecture} · {spec.n_layers} layers × {spec.n_heads} heads · "
           f"d_model {spec.d_model}")

# -- inputs --------------------------------------------------------------------------------------
if where == "app":
    tokens = view.prompt.tokens if view.prompt is not None else backend.to_tokens(DEFAULT_PROMPT)
    from core import store
    text = store.decode(view.model, tokens[0, 1:])  # the prompt after its BOS token
    st.markdown("Prompt: the sidebar's.")
else:
    text = st.text_area("Prompt", DEFAULT_PROMPT, key="nn_prompt", height=68)
    if not text.strip():
        fail("The prompt is empty: type some text.")
    tokens = backend.to_tokens(text)
if tokens.shape[1] > spec.n_ctx:
    fail(f"The prompt is {tokens.shape[1]} tokens; this model reads at most {spec.n_ctx}.")
str_tokens = backend.str_tokens(tokens)


def single_token(label: str, value: str) -> int | None:
    if not value:
        return None
    ids = backend.to_tokens(value)[0]
    bos = getattr(getattr(backend, "lm", None), "tokenizer", None)
    bos_id = getattr(bos, "bos_token_id", None) if bos is not None else None
    if where == "app":
        bos_id = view.model.tokenizer.bos_token_id if getattr(view.model.cfg, "default_prepend_bos", True) else None
    ids = [int(t) for t in ids if bos_id is None or int(t) != bos_id]
    if len(ids) != 1:
        fail(f"The {label} “{value}” is {len(ids)} tokens for this model; give a single token "
             f"(often with a leading space, like ' Mary').")
    return ids[0]


c1, c2, c3 = st.columns([1, 1, 2])
mode = "app" if where == "app" else "hf"  # the app's model and the Hugging Face ones keep their own tokens
answer_text = c1.text_input("Answer token", " Mary" if where != "app" else "", key=f"nn_answer_{mode}",
                            help="The token whose logit is explained. Empty: the model's top prediction (one run).")
wrong_text = c2.text_input("Wrong token (optional)", " John" if where != "app" else "", key=f"nn_wrong_{mode}",
                           help="With one, the target is the logit difference answer − wrong.")
choice = c3.selectbox("View", list(VIEWS), format_func=VIEWS.get, key="nn_view")
wrong = single_token("wrong token", wrong_text)
answer = single_token("answer", answer_text) if answer_text else None
if answer is None and where != "remote":  # the model's top prediction: one run here
    answer = backend.top_prediction(tokens)
if answer is None and choice in NEEDS_ANSWER:
    fail("Give an answer token for a remote model (finding the top prediction is a request of its own).")
target_label = "" if answer is None else f"“{backend.str_tokens(torch.tensor([answer]))[0]}”" + (
    f" − “{backend.str_tokens(torch.tensor([wrong]))[0]}”" if wrong is not None else "")

def reversed_first_half() -> str:
    """A source prompt for the sidebar's: its first half reversed, so what the second half copies
    from the first (induction) changes; the prompt itself where that changes its length."""
    body = tokens[0, 1:].tolist()
    half = len(body) // 2
    if half < 2:
        return text
    candidate = store.decode(view.model, body[:half][::-1] + body[half:])
    return candidate if backend.to_tokens(candidate).shape == tokens.shape else text


source = None
if choice in ("patching", "attribution_patching"):
    default_source = DEFAULT_SOURCE if where != "app" else reversed_first_half()
    source_text = st.text_area("Source prompt (patched into the prompt above; the same length in tokens)",
                               default_source, key="nn_source", height=68)
    source = backend.to_tokens(source_text)
    if source.shape != tokens.shape:
        fail(f"The source prompt is {source.shape[1]} tokens and the prompt {tokens.shape[1]}: patching needs "
             "the same length.")
    if torch.equal(source, tokens):
        st.info("The source prompt is the prompt itself, so no patch changes anything: change a word.")
    target = st.radio("Patch", list(be.PATCH_TARGETS), format_func=be.PATCH_TARGETS.get, horizontal=True,
                      key="nn_target")
    if where == "remote" and choice == "patching":
        n_units = spec.n_layers * (spec.n_heads if target == "z" else tokens.shape[1])
        per = max(1, backend.transport.rows_per_request(tokens.shape[1]) - 2)
        n_requests = -(-n_units // per)
        if n_requests > MAX_REQUESTS:
            fail(f"This sweep is {n_units:,} patched runs: {n_requests:,} requests of {per} runs each. Use a shorter "
                 f"prompt, or allow more tokens a request (CIRCUIT_EXPLORER_NDIF_TOKENS, now "
                 f"{backend.transport.settings.tokens_per_request}); at most {MAX_REQUESTS} requests are sent at once.")
        st.caption(f"{n_units:,} patched runs in {n_requests} request{'s' if n_requests != 1 else ''}.")
att_layers = None
if choice == "attention":  # a large model: fetch and draw one layer
    a1, a2 = st.columns(2)
    att_layer = a1.slider("Layer", 0, spec.n_layers - 1, 0, key="nn_att_layer")
    att_head = a2.slider("Head", 0, spec.n_heads - 1, 0, key="nn_att_head")
    att_layers = tuple(range(spec.n_layers)) if spec.n_layers * spec.n_heads <= BIG else (att_layer,)
if choice == "steering":
    s1, s2, s3 = st.columns(3)
    toward = s1.text_input("Toward (a prompt)", " love", key="nn_toward")
    away = s2.text_input("Away from (a prompt)", " hate", key="nn_away")
    layer = s3.slider("Layer", 0, spec.n_layers - 1, spec.n_layers // 2, key="nn_layer")
    alpha = st.slider("Strength α", -20.0, 20.0, 4.0, 0.5, key="nn_alpha")
    if not toward.strip() or not away.strip():
        fail("Steering needs two prompts: one to steer toward and one away from.")


def compute():
    progress_box = st.empty()
    if where == "remote":  # the status NDIF reports while a request waits (queued, running, ...)
        status_box = st.empty()
        backend.transport.on_status = lambda text: status_box.caption(ui.md_escape(text))

    def progress(share: float, text: str) -> None:
        progress_box.progress(min(1.0, max(0.0, share)), text=text)

    if choice == "dla_layers":
        return backend.dla(tokens, answer, wrong, "layer")
    if choice == "dla_heads":
        return backend.dla(tokens, answer, wrong, "head")
    if choice == "logit_lens":
        return backend.logit_lens(tokens, answer, k=5)
    if choice == "attention":
        return backend.attention_patterns(tokens, att_layers)
    if choice == "residual_norms":
        return backend.residual_norms(tokens)
    if choice == "patching":
        result = backend.patch(tokens, source, answer, wrong, target, progress=progress)
        progress_box.empty()
        return result
    if choice == "attribution_patching":
        return backend.attribution_patch(tokens, source, answer, wrong, target)
    hook = f"blocks.{layer}.hook_resid_pre"
    pos = backend.run(backend.to_tokens(toward), [hook], logit_positions=[-1])[hook][0, -1]
    neg = backend.run(backend.to_tokens(away), [hook], logit_positions=[-1])[hook][0, -1]
    return backend.steer(tokens, layer, pos - neg, alpha, from_pos=1)


uses_answer = choice in NEEDS_ANSWER or choice == "logit_lens"
key = ("nn_result", where, model_label, choice, tuple(tokens[0].tolist()),
       (answer, wrong) if uses_answer else None,
       None if source is None else (tuple(source[0].tolist()), target),
       att_layers, (toward, away, layer, alpha) if choice == "steering" else None)
results = st.session_state.setdefault("nn_results", {})
if key in results:
    results[key] = results.pop(key)  # most recently used last
else:
    if where == "remote" and not st.button("Run on NDIF", type="primary", key="nn_send"):
        st.info("Each view is sent to NDIF as one request (a sweep as a few). Press **Run on NDIF** to send it.")
        st.stop()
    try:
        with st.spinner(f"{VIEWS[choice]} on {backend.where if where != 'app' else 'this machine'}…"):
            computed = compute()
    except be.BackendError as e:
        fail(str(e))
    if getattr(computed, "failed", None):
        result = computed  # shown, not kept: running it again sends only the missing requests
    else:
        results[key] = computed
        while len(results) > MAX_RESULTS:  # the least recently used go first
            results.pop(next(iter(results)))
result = results.get(key, locals().get("result"))

# -- the view ------------------------------------------------------------------------------------
if choice == "dla_layers":
    charts.show(plots.attribution_bar(result.labels, result.values[:, 0], target_label,
                                      f"Direct logit attribution to {plots.safe(target_label)}"), key="nn_dla")
    st.caption(f"Components plus the bias add up to {float(result.total()[0]):+.4f}"
               + (" (before the logit soft cap)." if result.softcap else "."))
elif choice == "dla_heads":
    n = spec.n_layers * spec.n_heads
    grid = result.values[:n, 0].reshape(spec.n_layers, spec.n_heads)
    charts.show(plots.head_attribution_heatmap(grid, target_label, f"Direct logit attribution by head to "
                                               f"{plots.safe(target_label)}"), key="nn_heads")
elif choice == "logit_lens":
    top_tokens = [[[backend.str_tokens(torch.tensor([int(t)]))[0] for t in pos] for pos in layer_ids]
                  for layer_ids in result.top_ids.tolist()]
    charts.show(plots.logit_lens_heatmap(result.labels, top_tokens, result.top_probs, str_tokens), key="nn_lens")
    if result.answer_prob is not None:
        charts.show(plots.answer_by_layer(result.labels, result.answer_prob[:, -1], result.answer_rank[:, -1],
                                          backend.str_tokens(torch.tensor([answer]))[0]), key="nn_lens_answer")
elif choice == "attention":
    row = att_layers.index(att_layer)
    charts.show(plots.pattern_heatmap(result[row, att_head], str_tokens, f"L{att_layer}H{att_head}"),
                key="nn_att_head_fig")
    if len(att_layers) == spec.n_layers:
        charts.show(plots.all_heads_grid(result, str_tokens, selected=(att_layer, att_head)), key="nn_att_all")
elif choice == "residual_norms":
    norms, _ = result
    charts.show(plots.residual_norm_heatmap(norms, str_tokens), key="nn_norms")
elif choice in ("patching", "attribution_patching"):
    # The change from the base run, in logits: a share of (source - base) would blow up where the
    # two prompts barely differ on the target.
    values = result.values - result.base
    unit = "change in the logit difference" if wrong is not None else "change in the logit"
    if result.target == "z":
        fig = plots.head_heatmap(values, f"{VIEWS[choice]}: heads", unit)
    else:
        ys = [f"layer {layer}" for layer in range(spec.n_layers)]
        fig = plots.importance_heatmap(values, ys, plots.position_labels(str_tokens),
                                       f"{VIEWS[choice]}: {be.PATCH_TARGETS[result.target]}", unit)
    charts.show(fig, key="nn_patch")
    st.caption(f"Target {ui.md_escape(target_label)}: {result.base:+.3f} on the prompt, {result.source:+.3f} on the "
               f"source prompt (a change of {result.source - result.base:+.3f}). Each cell: the target with that one "
               "activation taken from the source run, minus the prompt's.")
    if result.failed:
        # Not kept, so the "Run on NDIF" button above stays: pressing it sends only what is missing.
        st.warning(ui.md_escape(f"Part of the sweep is missing (blank cells): {result.failed}. Press Run on NDIF "
                                "again to send the missing requests; the finished ones are not sent again."))
else:
    rows = result["rows"]
    names = [backend.str_tokens(torch.tensor([r["token"]]))[0] for r in rows]
    charts.show(plots.distribution_shift_bars(names, [r["before"] for r in rows], [r["after"] for r in rows],
                                              f"Next token, steered at layer {layer} with α = {alpha}"),
                key="nn_steer")
    st.caption(f"KL(before ‖ after) = {result['kl']:.4f} nats.")

if where == "remote":
    log = backend.transport.log
    if log:
        with st.expander(f"Requests sent to NDIF ({len(log)})"):
            st.dataframe([{"view": r.what, "status": r.status, "sent (kB)": round(r.sent / 1e3, 1),
                           "received (kB)": round(r.received / 1e3, 1), "seconds": round(r.seconds, 2)}
                          for r in log[-50:]], hide_index=True)
