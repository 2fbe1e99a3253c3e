"""Logit attribution page: which components write the answer, the logit lens, neurons."""
import streamlit as st

from core import attribution, plots
from core.ui import cache, charts, frame, widgets
from core.ui import state as ui

view = ui.page_view()

model, prompt, task = view.model, view.prompt, view.task
store = cache.get_store()
n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
decode = ui.decode_token

# ---------------------------------------------------------------------------------------------
# What to explain: one prompt or the task's batch; the answer and the counterfactual token
# ---------------------------------------------------------------------------------------------
whole_task = False
if task is not None:
    scopes = {**frame.ATTR_SCOPES, "task": f"Mean over the task's {len(task)} prompts"}  # kept in the URL (bind)
    whole_task = (
        st.segmented_control("Prompts", list(scopes), format_func=scopes.get, default="example", key="attr_scope",
                             persist_state="session", bind="query-params")
        or "example"
    ) == "task"
tokens = task.clean_tokens if whole_task else prompt.tokens
with st.spinner("Running the model…"):
    run = store.get(model, tokens)  # the shared store: a second page or a new answer costs no forward pass

target = widgets.attribution_target(model, prompt, task, run, whole_task)
if target.error:
    st.warning(target.error)
    if target.suggestion is not None:
        st.button(ui.md_escape(f"Use {target.suggestion!r}"), on_click=widgets.use_suggestion, args=(target.suggestion_key, target.suggestion))
    ui.sidebar_footer()
    st.stop()
answers, wrongs, label = target.answers, target.wrongs, target.label
model_value = float(attribution.target(model, run.logits, answers, wrongs).mean())
charts.note_metric(label)
charts.note("model's value" + (" (mean)" if whole_task else ""), model_value)
cap = model.cfg.output_logits_soft_cap if model.cfg.output_logits_soft_cap > 0 else None
st.caption(
    ui.md_escape(
        f"Target: {label}"
        + (f", per prompt of the task (answer {decode(model, int(answers[0]))!r} vs "
           f"{decode(model, int(wrongs[0]))!r} in the first)" if whole_task else "")
        + f" at the last position; the model's value: {model_value:+.4f}"
        + (" (mean)." if whole_task else ".")
    )
)
if cap is not None:
    precap_value = float(attribution.precap_target(model, run.cache, answers, wrongs).mean())
    st.info(
        f"This model soft-caps its logits ({cap:g} · tanh(logit / {cap:g})), which is not linear in the residual "
        f"stream. The attributions below explain the **pre-cap** value, {precap_value:+.4f}; the model's capped "
        f"value is {model_value:+.4f}. The logit lens applies the cap."
    )
value_name = "pre-cap value above" if cap is not None else "model's value above"

tab_comp, tab_heads, tab_acc, tab_lens, tab_neurons = st.tabs(
    list(frame.ATTRIBUTION_TABS), key="attr_tab", bind="query-params"  # in the URL: a link opens a tab
)

# Each tab is computed and drawn only while open (bound to the URL, so Streamlit knows which): a new
# prompt costs one forward pass and the open tab, not the logit lens's unembedding of every layer.
with tab_comp:
    if tab_comp.open:
        comp = attribution.by_component(model, run.cache, answers, wrongs)
        charts.show(
            plots.attribution_bar(comp.labels, comp.mean(), label, "Direct effect of each component"),
            width="stretch", key="attr_components",
        )
        st.caption(
            f"Each bar is the component's output at the last position, divided by the final LayerNorm scale "
            f"of this run and read through the unembedding. Bars plus the constant {float(comp.bias.mean()):+.4f} "
            f"(final LayerNorm bias and unembedding bias) add up to the {value_name}."
        )

with tab_heads:
    if tab_heads.open:
        heads = attribution.by_head(model, run.cache, answers, wrongs)
        grid = attribution.head_grid(model, heads)
        event = charts.show(
            plots.head_attribution_heatmap(grid, label, "Direct effect of each head"),
            width="stretch", key="attr_heads", on_select="rerun", selection_mode="points",
        )
        clicked = plots.clicked_head(event, n_layers, n_heads)
        if clicked is not None:
            ui.open_head_on_attention_page(*clicked)
        top = attribution.top_heads(grid, k=min(6, n_layers * n_heads))
        st.caption("Click a head to open its attention pattern, or follow a link:")
        cols = st.columns(len(top))
        for col, (layer, head, value) in zip(cols, top):
            col.page_link("pages/attention.py", label=f"L{layer}H{head} {value:+.2f}",
                          query_params=ui.attention_link_params(layer, head))
        st.caption(
            "Blue heads push towards the answer, red against it (diverging scale centred at 0). "
            f"The attention output biases, not a head's, add {float(heads.mean()[-1]):+.4f}."
        )

with tab_acc:
    if tab_acc.open:
        acc = attribution.accumulated(model, run.cache, answers, wrongs)
        charts.show(plots.accumulated_line(acc.labels, acc.mean() + acc.bias.mean(), label), width="stretch", key="attr_acc")
        st.caption(
            "The residual stream before each layer and after the last, read like the final logits with this "
            "run's final LayerNorm scale (TransformerLens's `accumulated_resid` + `apply_ln_to_stack`). The last "
            f"point is the {value_name.removesuffix(' above')}."
        )

with tab_lens:
    if tab_lens.open:
        i = int(st.session_state.get("example", 0)) if whole_task else 0
        if whole_task:
            st.caption(f"The logit lens reads one prompt: the sidebar's example {i}.")
        answer_id = int(answers[i])
        lens = attribution.logit_lens(model, run.cache, answer=answer_id, k=5, batch_index=i)
        str_tokens = cache.token_texts(model, tokens[i])
        n_pos, k = lens.top_ids.shape[1:]
        texts = cache.token_texts(model, lens.top_ids)  # [layer * pos * k], one take of the model's lock
        top_tokens = [[texts[(l * n_pos + p) * k:(l * n_pos + p + 1) * k] for p in range(n_pos)]
                      for l in range(len(lens.labels))]
        charts.show(plots.logit_lens_heatmap(lens.labels, top_tokens, lens.top_probs, str_tokens),
                    width="stretch", key="attr_lens")
        charts.show(
            plots.answer_by_layer(lens.labels, lens.answer_prob[:, -1], lens.answer_rank[:, -1], decode(model, answer_id)),
            width="stretch", key="attr_lens_answer",
        )
        st.caption(
            "Each layer's residual stream decoded as if it were the last: the final LayerNorm recomputed on it, "
            "then the unembedding. Cells: the most likely next token and its probability; hover for the top 5. "
            "Below: the answer's probability and rank at the last position, per layer."
        )

with tab_neurons:
    if tab_neurons.open:
        if model.cfg.attn_only:
            st.info("This model is attention-only: it has no MLP neurons. Pick a model with MLPs (e.g. ce-circuits-3l-mlp).")
        elif not attribution.has_neurons(model):
            st.info("This model's MLPs are mixtures of experts: each token goes through a few experts' neurons, so "
                    "there is no single row of neurons per layer to rank. The other tabs show the MLPs' total outputs.")
        else:
            layer = st.selectbox("MLP layer", range(n_layers), index=n_layers - 1, key="attr_neuron_layer", persist_state="session")
            table = attribution.top_neurons(model, run.cache, layer, answers, wrongs, k=20)
            texts = iter(cache.token_texts(model, [t for ids in table.top_tokens for t in ids]))
            charts.show(
                plots.neuron_bar(table.neurons, table.effects, table.activations,
                                 [", ".join(next(texts) for _ in ids) for ids in table.top_tokens], layer, label),
                width="stretch", key="attr_neurons",
            )
            st.caption(
                "Neurons with the largest direct effect (activation × output weight, through the final LayerNorm "
                "scale and the unembedding); hover for the activation and the tokens each neuron's output promotes most."
            )

ui.sidebar_footer()
