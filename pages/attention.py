"""Attention page: one head's pattern, all heads, CircuitsVis, head-type scores, residual norms."""
import streamlit as st

from core import attention, plots
from core.models import zoo_models
from core.ui import cache, charts, frame, widgets
from core.ui import state as ui

view = ui.page_view()

model, prompt = view.model, view.prompt
store = cache.get_store()
n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads

with st.spinner("Running the model…"):
    run = store.get(model, prompt.tokens)
    patterns = attention.stacked_patterns(run.cache, n_layers)[0]  # [layer, head, q, k]

# Head-type scores on repeated random tokens: they pick the default head and feed the Q/K/V lesson.
seq_len = min(attention.DEFAULT_SEQ_LEN, (model.cfg.n_ctx - 1) // 2)
model_id = view.model_id
with st.spinner("Scoring heads on repeated random tokens…"):
    scores = cache.head_scores(model, seq_len, attention.DEFAULT_BATCH)

ui.select_head(n_layers, n_heads, default=attention.strongest_head(scores["induction"]))
c1, c2, c3 = st.columns([1, 1, 3])
layer = c1.selectbox("Layer", range(n_layers), key="layer")
head = c2.selectbox("Head", range(n_heads), key="head")
c3.markdown(
    f"**L{layer}H{head}** · previous-token {scores['previous_token'][layer, head]:.2f} · "
    f"induction {scores['induction'][layer, head]:.2f} · duplicate-token "
    f"{scores['duplicate_token'][layer, head]:.2f}  \n"
    "Scores on repeated random tokens (1 = all attention on the expected position)."
)
ui.set_url(layer=layer, head=head)

tab_head, tab_all, tab_cv, tab_scores, tab_resid, tab_models = st.tabs(
    list(frame.ATTENTION_TABS), key="tab", bind="query-params"  # in the URL: a link opens a tab
)

with tab_head:  # each tab is drawn only while open (bound to the URL: Streamlit knows which)
    if tab_head.open:
        charts.show(
            plots.pattern_heatmap(patterns[layer, head], prompt.str_tokens, f"L{layer}H{head} attention pattern"),
            width="stretch",
            key="pattern_heatmap",
        )

with tab_all:
    if tab_all.open:
        st.caption("Every head on this prompt (rows: layers, columns: heads). Click a head to open it.")
        charts.show(
            plots.all_heads_grid(patterns, prompt.str_tokens, selected=(layer, head)),
            width="stretch",
            key="all_heads",
            on_select=lambda: ui.open_clicked_head("all_heads", n_layers, n_heads),
            selection_mode="points",
        )

with tab_cv:
    if tab_cv.open:
        st.caption(f"Layer {layer}, every head (CircuitsVis, offline), opened on L{layer}H{head}: hover a head to "
                   "enlarge it, click to keep it, hover the pattern for values.")
        html = plots.circuitsvis_attention_html(
            prompt.str_tokens, patterns[layer], [f"L{layer}H{h}" for h in range(n_heads)], first=head
        )
        st.iframe(html, height=700)

with tab_scores:
    if tab_scores.open:
        cols = st.columns(3)
        for col, (kind, label) in zip(cols, attention.HEAD_TYPE_LABELS.items()):
            charts.show(
                plots.head_score_heatmap(scores[kind], label, selected=(layer, head)), width="stretch", key=f"score_{kind}",
                where=col,
            )
        st.caption(
            f"Measured on {attention.DEFAULT_BATCH} sequences of BOS + {seq_len} random tokens repeated "
            "twice (seed 0). Mean over query positions that have a target of the attention paid to it "
            "(TransformerLens's `detect_head` \"mul\" score divides by every query position instead, so "
            "on these sequences it reads about half as much for an induction head)."
        )
        st.subheader("Which input carries the composition? Ablate on Q / K / V")
        if layer == 0:
            st.info("Choose a head in layer 1 or later: composition needs heads in an earlier layer to read from.")
        elif attention.composition_refusal(model):
            st.info(attention.composition_refusal(model))
        else:
            candidates = [(l, h) for l in range(layer) for h in range(n_heads)]
            prev_default = [f"L{l}H{h}" for l, h in attention.previous_token_heads(scores["previous_token"], before_layer=layer)]
            chosen = st.multiselect(
                "Remove the output of these heads…",
                [f"L{l}H{h}" for l, h in candidates],
                default=prev_default,
                help=f"Default: the previous-token heads (score ≥ {attention.PREV_TOKEN_THRESHOLD}) in earlier layers.",
            )
            sources = [attention.parse_head(s) for s in chosen]
            on = st.segmented_control(
                f"…from this input of L{layer}H{head}", ["Q", "K", "V"], default="K", key="ablate_on", bind="query-params"
            )
            others = [h for h in attention.induction_heads(scores["induction"], layer) if h != head]
            also: list[int] = []
            if others and st.checkbox(
                "…and of the other induction heads of this layer: " + ", ".join(f"L{layer}H{h}" for h in others),
                value=False,
                key="ablate_also",
                help="Heads that do the same job back each other up: ablating one head's input shows its "
                "pattern break; ablating all of them shows what the circuit is worth to the loss.",
            ):
                also = others
            if sources and on:
                table = cache.composition_table(
                    model, seq_len, attention.DEFAULT_BATCH, tuple(sources), (layer, head), tuple(also)
                )
                base = table[0]
                picked = next(r for r in table if r.on == on.lower())
                m1, m2 = st.columns(2)
                m1.metric(f"L{layer}H{head} induction score", f"{picked.target_score:.3f}",
                          plots.metric_delta(picked.target_score - base.target_score))
                m2.metric("Repeated-half loss (nats)", f"{picked.loss:.3f}", plots.metric_delta(picked.loss - base.loss),
                          delta_color="inverse")
                charts.show(plots.composition_bar(table, f"L{layer}H{head}"), width="stretch", key="composition")
                st.caption(
                    "The chosen heads' outputs (z·W_O, no bias) are subtracted from one input of this head "
                    "only (and of the other induction heads, if ticked), via TransformerLens split q/k/v "
                    "inputs; the rest of the model is untouched. In an induction circuit the previous-token "
                    "head feeds the key: ablating on K breaks it, Q and V matter little."
                )
            else:
                st.info("Pick at least one source head and an input.")

with tab_resid:
    if tab_resid.open:
        st.caption("L2 norm of the residual stream at each layer's input and after the last layer.")
        norms = attention.residual_norms(run.cache, n_layers)
        charts.show(plots.residual_norm_heatmap(norms, prompt.str_tokens), width="stretch", key="resid")

with tab_models:  # measured only while open (the tab is bound to the URL, so Streamlit knows which is)
    if not tab_models.open:
        st.caption("Open this tab to measure induction on every model.")
    else:
        st.caption(
            "Every embedded model, and the loaded one, on the same 32 sequences of random tokens repeated twice: the "
            "strongest induction head and its score, and the mean next-token loss on each half. The first half is "
            "random (no model can do better than guess); a model with an induction circuit copies the second."
        )
        names = list(dict.fromkeys(zoo_models() + [view.model_name]))
        rows = []
        with widgets.progress_bar("Measuring induction on each model") as report:
            for i, name in enumerate(names):
                other = model if name == view.model_name else cache.get_model(name)
                rows.append({**cache.induction_strength(other), "model": name})  # named as in the sidebar
                report((i + 1) / len(names))
        charts.show(plots.induction_models(rows), width="stretch", key="induction_models")
        st.dataframe(
            [{"model": r["model"] + (" (loaded)" if r["model"] == view.model_name else ""),
              "parameters": r["parameters"], "layers × heads": f"{r['layers']} × {r['heads']}", "d_model": r["d_model"],
              "strongest induction head": r["head"], "score": round(r["score"], 3),
              "first-half loss (nats)": round(r["first_half_loss"], 3),
              "repeated-half loss (nats)": round(r["repeated_half_loss"], 3)} for r in rows],
            hide_index=True, width="stretch",
        )

ui.sidebar_footer()
