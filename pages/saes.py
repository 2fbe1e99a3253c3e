"""SAE features page: load an SAE, see the features of the prompt, open a feature's dashboard, search."""
import functools
import json

import streamlit as st

from core import plots, sae_index, saes, steering
from core.ui import cache, charts, frame, widgets
from core.ui import state as ui

view = ui.page_view()
model = view.model
model_id = view.model_id
state = st.session_state

# ---------------------------------------------------------------------------------------------
# Which SAE
# ---------------------------------------------------------------------------------------------
embedded = saes.embedded_saes(model.cfg.model_name)
if state.get("sae_source") not in cache.SAE_SOURCES:
    state["sae_source"] = "embedded"
c1, c2 = st.columns([1, 3])
source = c1.selectbox("SAE from", list(cache.SAE_SOURCES), format_func=cache.SAE_SOURCES.get, key="sae_source",
                      persist_state="session",
                      help="Embedded SAEs were trained on the zoo models by core/zoo/train_sae.py and work offline. "
                      "A local folder holds an SAE in sae_lens's disk format. Pretrained SAEs come from sae_lens's "
                      "registry and are downloaded from the Hugging Face hub.")
loaded, problem = None, None
with c2:
    if source == "embedded":
        if not embedded:
            others = ", ".join(f"{n} ({json.loads((saes.SAE_DIR / n / saes.METRICS_FILE).read_text())['model']})"
                               for n in saes.embedded_saes()) or "none"
            problem = (f"No embedded SAE was trained for {model.cfg.model_name}. Embedded SAEs (and their models): "
                       f"{others}. Pick one of those models in the sidebar, or load an SAE from a folder or sae_lens.")
        else:
            if state.get("sae_embedded") not in embedded:
                wanted = st.query_params.get("sae")
                state["sae_embedded"] = wanted if wanted in embedded else embedded[0]
            ident = st.selectbox("Embedded SAE", embedded, key="sae_embedded", persist_state="session")
            ui.set_url(sae=ident)
            try:
                loaded = cache.load_sae("embedded", ident)
            except saes.SAELoadError as err:
                problem = str(err)
    elif source == "local":
        folder = st.text_input("SAE folder (cfg.json + sae_weights.safetensors)", key="sae_folder",
                               persist_state="session", placeholder="/path/to/sae")
        if folder.strip():
            try:
                loaded = cache.load_sae("local", folder.strip())
            except saes.SAELoadError as err:
                problem = str(err)
        else:
            problem = "Type the folder of an SAE saved by sae_lens (`sae.save_model(path)`)."
    else:
        with st.spinner("Reading sae_lens's registry…"):
            releases = cache.pretrained_for_model(model)
        if not releases:
            problem = (f"sae_lens's registry has no SAE for {model.cfg.model_name}. Load gpt2-small (or another "
                       "pretrained model) in the sidebar to list its SAEs, or use a local folder.")
        else:
            r1, r2 = st.columns(2)
            release = r1.selectbox("Release", sorted(releases), key="sae_release")
            sae_id = r2.selectbox("SAE id", releases[release], key="sae_id")
            if st.button("Load this SAE", key="sae_load"):
                state["_sae_pretrained"] = (model_id, f"{release}\n{sae_id}")
            mine, chosen = state.get("_sae_pretrained") or (None, None)
            chosen = chosen if mine == model_id else None  # a choice made for another model is not this one's
            if chosen:
                with st.spinner("Downloading the SAE…"):
                    try:
                        loaded = cache.load_sae("pretrained", chosen)
                    except saes.SAELoadError as err:
                        problem = str(err)
            else:
                problem = "Pick a release and an SAE id, then load it (it is downloaded from the Hugging Face hub)."
if source != "embedded":
    ui.set_url(sae=None)
if loaded is not None:
    problem = cache.sae_fit_error(model, loaded)
if problem:
    st.warning(ui.md_escape(problem))
    ui.sidebar_footer()
    st.stop()


def hook_words(name: str) -> str:
    """What a TransformerLens hook name means, for a student."""
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None
    if layer is None:
        return f"`{name}` is the activation TransformerLens names so."
    # Only learned absolute positions are added to the residual stream (rotary, shortformer and ALiBi act in attention).
    embeddings = ("token and position embeddings" if model.cfg.positional_embedding_type == "standard"
                  else "token embedding")
    earlier = "layer 0" if layer == 1 else f"layers 0–{layer - 1}"
    what = {
        "hook_resid_pre": f"the residual stream as it enters layer {layer}: the sum of the {embeddings} and "
                          f"everything {earlier} wrote, which layer {layer} reads"
                          if layer else f"the residual stream as it enters layer 0: the {embeddings}",
        "hook_resid_mid": f"the residual stream in layer {layer}, after its attention and before its MLP",
        "hook_resid_post": f"the residual stream after layer {layer}: what the next layer reads",
        "hook_mlp_out": f"what the MLP of layer {layer} adds to the residual stream",
        "hook_attn_out": f"what the attention of layer {layer} adds to the residual stream",
        "hook_z": f"each attention head's output of layer {layer}, before `W_O` mixes the heads",
        "hook_post": f"the MLP neurons of layer {layer}, after the non-linearity",
    }.get(parts[-1], f"an activation of layer {layer}")
    return f"`{name}` (TransformerLens's name) is {what}. The SAE reads this vector at every token and rebuilds it."


def card_help(hook: str, with_card: bool = True) -> str:
    """The tooltip of the SAE's card: the hook and every number of the card, in a line each."""
    lines = [hook_words(hook)]
    if with_card:
        lines += [
            "L0: how many features are non-zero at a token, on average. Lower is sparser, easier to read.",
            "Explained variance: the share of the activations' variance that the SAE's rebuilt vector keeps "
            "(1 = a perfect copy).",
            "Dead features: features that never fire on the held-out tokens, so they explain nothing.",
            "Next-token loss with the SAE spliced in: the model run with the SAE's rebuilt vector in place of the "
            "real one. Loss recovered: how much of the gap to zeroing the activation the SAE closes (100% = as "
            "good as the real activation).",
        ]
    return "\n\n".join(lines)


sae = loaded.sae
card = loaded.card
if card:
    st.caption(ui.md_escape(
        f"{loaded.sae_id}: {card['architecture']} SAE on {card['hook_name']}, {card['d_sae']} features. Measured on "
        f"{card['tokens']:,} held-out tokens: L0 {card['l0']:.1f}, explained variance {card['explained_variance']:.3f}, "
        f"{card['dead_features']} dead features, next-token loss {card['ce_loss_clean']:.3f} → "
        f"{card['ce_loss_with_sae']:.3f} with the SAE spliced in ({card['loss_recovered']:.1%} of the loss recovered)."
    ), help=card_help(card["hook_name"]))
else:
    st.caption(ui.md_escape(f"{loaded.sae_id}: SAE on {loaded.hook_name}, {loaded.d_sae} features "
                                 f"(d_in {sae.cfg.d_in})."), help=card_help(loaded.hook_name, with_card=False))

# ---------------------------------------------------------------------------------------------
# The corpus and its index
# ---------------------------------------------------------------------------------------------
docs, corpus_label = None, None
if loaded.corpus_spec:
    spec = loaded.corpus_spec
    docs = cache.zoo_documents(model, json.dumps(spec, sort_keys=True))
    corpus_label = f"the zoo corpus ({spec['documents']:,} documents, seed {spec['seed']})"
else:
    upload = st.file_uploader("Corpus for the feature dashboards: a text file, one document per line", type=["txt"],
                              key="sae_corpus_file")
    if upload is not None:
        try:
            docs = cache.text_documents(model, upload.getvalue())
            corpus_label = f"{upload.name} ({len(docs):,} documents, one per non-empty line)"
        except saes.SAELoadError as err:
            st.warning(ui.md_escape(str(err)))
corpus_md = ui.md_escape(corpus_label or "")  # an uploaded file's name is the user's text: shown as typed
index = None
if docs is not None:
    if state.pop("_sae_index_damaged", None):
        st.info("The feature index file was damaged or removed while in use; it is being rebuilt.")
    try:
        index = widgets.feature_index(model, loaded, docs, corpus_label)
    except sae_index.FeatureIndexError as err:
        st.warning(ui.md_escape(str(err)))
        if err.path is not None:
            st.button("Try again", key="sae_index_retry", on_click=sae_index.forget_build, args=(err.path,))
    if index is not None:
        st.caption(f"Feature index: {index.n_tokens:,} tokens of {corpus_md}, built once in {index.build_seconds:.1f} s "
                   f"({index.tokens_per_second:,.0f} tokens/s) and kept on disk (SQLite).")
ahead = cache.embedded_index_progress()  # the server builds every embedded SAE's index ahead, one at a time
if ahead and any(text != "ready" for _, text in ahead.values()):
    ready = sum(text == "ready" for _, text in ahead.values())
    with st.expander(f"Feature indexes built ahead for every embedded SAE: {ready} of {len(ahead)} ready"):
        for name, (share, text) in ahead.items():
            st.progress(min(max(share, 0.0), 1.0), text=ui.md_escape(f"{name}: {text}"))
else:
    st.info("Without a corpus the dashboards show logit effects and your own text only: upload a text file to see "
            "each feature's top activating contexts.")


def decode(t: int) -> str:
    return ui.decode_token(model, t)


# ---------------------------------------------------------------------------------------------
# The prompt's features (also picks the default feature)
# ---------------------------------------------------------------------------------------------


@functools.cache  # once per run, and only in the views that show the prompt (not Search)
def prompt_run():
    return cache.get_store().get(model, view.prompt.tokens)


@functools.cache
def prompt_acts():
    acts = saes.prompt_features(model, loaded, prompt_run().cache)  # [pos, d_sae]
    acts[0] = 0.0  # BOS: its activations are outliers that every dashboard leaves out
    return acts


if state.get("_sae_for") != loaded.sae_id:  # first run with this SAE: the URL's feature, else the last token's strongest
    from_url = ui.url_int("feature") if "_sae_for" not in state else None
    state["sae_feature"] = from_url if from_url is not None and 0 <= from_url < loaded.d_sae else int(prompt_acts()[-1].argmax())
    if from_url is not None and from_url != state["sae_feature"]:
        st.info(f"Feature {from_url} does not exist in this SAE (features 0–{loaded.d_sae - 1}); showing feature "
                f"{state['sae_feature']}, the strongest at the prompt's last token.")
    state["_sae_for"] = loaded.sae_id
ui.set_url(feature=int(state["sae_feature"]))

VIEWS = frame.SAE_VIEWS  # kept in the URL (bind): a link or a lesson opens a view
LOGIT_EFFECT_HELP = (
    "`W_dec[f]` is the direction the feature adds to the residual stream (its row of the decoder). Multiplied "
    "by the final LayerNorm's weight and the unembedding `W_U` it gives one number per token: how much one unit "
    "of the feature raises (+) or lowers (−) that token's logit directly, not counting what later layers do with it.")
KL_HELP = ("KL: the Kullback–Leibler divergence from the next-token distribution before to the one after, in nats. "
           "0 means nothing changed; about 0.01 is a small change; above 1 the prediction changed a lot.")


def open_feature(f: int) -> None:
    state["sae_feature"] = int(f)
    state["sae_view"] = "feature"


def open_clicked() -> None:
    f = plots.clicked_feature(state.get("sae_prompt_map"))
    if f is not None:
        open_feature(f)


view_choice = st.segmented_control("View", list(VIEWS), format_func=VIEWS.get, default="prompt", key="sae_view",
                                   persist_state="session", bind="query-params", label_visibility="collapsed", required=True) or "prompt"


def prompt_view() -> None:
    k = st.slider("Features per token", 1, 8, 3, key="sae_per_token", persist_state="session")
    acts = prompt_acts()
    values, ids = saes.top_features_per_token(acts[1:], k)
    chosen = []
    for f in ids[values > 0].tolist():
        if f not in chosen:
            chosen.append(f)
    if not chosen:
        st.info("No feature fires on this prompt (after BOS).")
        return
    chosen = sorted(chosen, key=lambda f: -float(acts[:, f].max()))[:30]
    fig = plots.prompt_features_heatmap(acts[:, chosen], view.prompt.str_tokens, chosen)
    charts.show(fig, width="stretch", key="sae_prompt_map", on_select=open_clicked, selection_mode="points")
    st.caption(f"The {len(chosen)} features that are among the {k} strongest at some token (BOS left out). "
               f"Activations of {loaded.hook_name} encoded by the SAE; click a cell to open its feature.")
    f = int(state["sae_feature"])
    st.markdown(f"**Feature {f} on this prompt** (max {float(acts[:, f].max()):.3f})")
    st.html(plots.tinted_tokens_html(view.prompt.str_tokens, acts[:, f].tolist(), float(acts[:, f].max())))


def context_html(ex: sae_index.Example, f: int, max_act: float, before: int = 12, after: int = 4) -> str:
    tokens = index.doc(ex.doc)
    doc_acts = index.doc_activations(f, ex.doc)
    lo, hi = max(1, ex.pos - before), min(len(tokens), ex.pos + after + 1)
    return plots.tinted_tokens_html([decode(t) for t in tokens[lo:hi]], doc_acts[lo:hi], max_act, mark=ex.pos - lo)


def feature_view() -> None:
    # The chosen feature lives under "sae_feature" (a widget's own key is forgotten while it is not drawn).
    state["sae_feature_input"] = int(state["sae_feature"])
    f = int(st.number_input(f"Feature (0–{loaded.d_sae - 1})", 0, loaded.d_sae - 1, key="sae_feature_input", step=1,
                            on_change=lambda: open_feature(state["sae_feature_input"])))
    left, right = st.columns([2, 3])
    with left:
        if index is not None:
            stats = index.feature(f)
            m1, m2, m3 = st.columns(3)
            m1.metric("Density", f"{stats.density:.3%}", help=f"Fires on {stats.n_fire:,} of {stats.n_tokens:,} corpus tokens.")
            m2.metric("Max activation", f"{stats.max_act:.3f}")
            m3.metric("Mean when firing", f"{stats.mean_act:.3f}")
            if stats.n_fire:
                charts.show(plots.activation_histogram(stats.hist_edges, stats.hist_counts, f, stats.density),
                            width="stretch", key="sae_hist")
        elif docs is not None:
            st.info("Density, the activation histogram and the top contexts appear when the corpus index is built "
                    "(progress above); the logit effects, your own text and the ablation work now.")
        effects = saes.logit_effects(model, sae, f)
        if effects is None:
            st.info(f"Logit effects need a decoder that writes to the residual stream; {loaded.hook_name} does not.")
        else:
            n = min(10, effects.numel())
            st.caption("Logit effects (`W_dec · W_U`): how much one unit of this feature raises or lowers each token's "
                       "logit directly.", help=LOGIT_EFFECT_HELP)
            up, down = effects.topk(n), (-effects).topk(n)
            charts.show(plots.logit_effect_bars([decode(t) for t in up.indices.tolist()], up.values.tolist(),
                                                    "Promoted tokens", "#2ca02c"), width="stretch", key="sae_up")
            charts.show(plots.logit_effect_bars([decode(t) for t in down.indices.tolist()], (-down.values).tolist(),
                                                    "Suppressed tokens", "#d62728"), width="stretch", key="sae_down")
    with right:
        if index is not None:
            stats = index.feature(f)
            if not stats.n_fire:
                st.info(f"Feature {f} never fires on {corpus_md}: a dead feature there.")
            else:
                st.markdown(f"**Top activating contexts** in {corpus_md} (firing token outlined; hover a token for its value)")
                for ex in stats.top[:10]:
                    st.html(f"<div><b>{ex.act:.3f}</b> · document {ex.doc}, position {ex.pos}</div>"
                            + context_html(ex, f, stats.max_act))
                with st.expander("Examples from each activation interval"):
                    for lo, hi, examples in stats.intervals:
                        st.markdown(f"Interval ({lo:.3f}, {hi:.3f}]: {len(examples)} example(s)")
                        for ex in examples:
                            st.html(f"<div><b>{ex.act:.3f}</b></div>" + context_html(ex, f, stats.max_act))
        st.markdown("**Test your own text**")
        text = st.text_input("Text", key="sae_test_text", persist_state="session",
                             placeholder="Type text to see this feature's activation on each token")
        if text.strip():
            tokens = ui.to_tokens(model, text)
            own = saes.prompt_features(model, loaded, cache.get_store().get(model, tokens).cache)[:, f]
            own[0] = 0.0
            labels = [decode(t) for t in tokens[0].tolist()]
            st.html(plots.tinted_tokens_html(labels[1:], own[1:].tolist(), float(own.max())))
            st.caption(f"Max activation {float(own.max()):.4f} at {labels[int(own.argmax())]!r}.")
        st.markdown("**Ablate or scale this feature** on the sidebar's prompt")
        scale = st.slider("Scale (0 = ablate, 1 = unchanged)", -2.0, 5.0, 0.0, 0.25, key="sae_scale",
                          persist_state="session")
        changed = saes.run_with_feature(model, loaded, view.prompt.tokens, f, scale)[0, -1]
        shift = steering.distribution_shift(prompt_run().logits[0, -1], changed, k=5)
        st.dataframe([{"token": decode(r["token"]), "probability before": r["before"], "probability after": r["after"],
                       "logit change": r["logit change"]} for r in shift["rows"]], hide_index=True, width="stretch")
        st.caption(ui.md_escape(
            f"Next token after the prompt, with feature {f} × {scale:g} at {loaded.hook_name} (the SAE's error "
            f"term kept): top is {decode(shift['top_before'])!r} → {decode(shift['top_after'])!r}; KL "
            f"{shift['kl']:.4f} nats. Feature {f} is {float(prompt_acts()[-1, f]):.3f} at the last token."), help=KL_HELP)


def search_label(f: int, *numbers: str) -> str:
    """A result button's label, short enough for a third of a 1280-pixel-wide window."""
    return " · ".join([f"Feature {f}", *numbers])


def single_token(text: str) -> int | None:
    tokens = ui.to_tokens(model, text, prepend_bos=False)[0]
    if text.strip() == "" or len(tokens) != 1:
        st.warning(ui.md_escape(f"'{text}' is {len(tokens)} tokens for this model; type one token."))
        return None
    return int(tokens[0])


def search_view() -> None:
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**Features that fire on a token**")
        word = st.text_input("Token", key="sae_search_token", persist_state="session", placeholder="e.g. keys")
        if word.strip():
            t = single_token(word)
            if t is not None and index is None:
                st.info("Needs the corpus index: it is being built (progress above)." if docs is not None
                        else "Needs the corpus index (upload a corpus).")
            elif t is not None:
                rows = index.features_for_token(t)
                if not rows:
                    st.info(ui.md_escape(f"{decode(t)!r} does not occur in ") + f"{corpus_md}.")
                else:
                    st.caption(ui.md_escape(
                        f"Mean activation over the {rows[0]['occurrences']:,} occurrences of {decode(t)!r}; "
                        "fires: at how many of them the feature is above 0."))
                for r in rows:
                    st.button(search_label(r["feature"], f"{r['mean_act']:.3f}", f"fires {r['fires']:,}"),
                              key=f"sae_tok_{r['feature']}", on_click=open_feature, args=(r["feature"],),
                              help=f"Mean {r['mean_act']:.4f} over {r['occurrences']:,} occurrences; fires on "
                                   f"{r['fires']:,} of them, at most {r['max_act']:.3f}.")
    with c2:
        st.markdown("**Features that promote a token**")
        word = st.text_input("Token ", key="sae_search_logit", persist_state="session", placeholder="e.g. are")
        if word.strip():
            t = single_token(word)
            if t is not None:
                effects = saes.features_promoting(model, sae, t)
                if effects is None:
                    st.info(f"{loaded.hook_name} does not write to the residual stream.")
                else:
                    top = effects.topk(min(10, effects.numel()))
                    st.caption("Logit effect (`W_dec · W_U`) of each feature on this token.", help=LOGIT_EFFECT_HELP)
                    for f, v in zip(top.indices.tolist(), top.values.tolist()):
                        st.button(search_label(f, f"{v:+.3f}"), key=f"sae_logit_{f}", on_click=open_feature,
                                  args=(f,))
    with c3:
        st.markdown("**Feature by id**")
        fid = st.number_input(f"Feature id (0–{loaded.d_sae - 1})", 0, loaded.d_sae - 1, key="sae_search_id", step=1)
        st.button("Open", key="sae_open_id", on_click=open_feature, args=(int(fid),))


try:
    {"prompt": prompt_view, "feature": feature_view, "search": search_view}[view_choice]()
except sae_index.IndexCorrupt as err:  # the file was overwritten or removed under us: rebuilt on the next run
    retries = state.get("_sae_index_retries", 0)
    if retries < 1:
        state["_sae_index_damaged"] = True
        state["_sae_index_retries"] = retries + 1
        st.rerun()
    st.warning(ui.md_escape(f"The feature index cannot be read, even rebuilt: {err}"))  # no endless reruns
else:
    state["_sae_index_retries"] = 0
ui.sidebar_footer()
