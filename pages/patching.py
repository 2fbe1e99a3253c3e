"""Head importance page: activation patching, attribution patching and ablation on a task."""
import streamlit as st

from core import attribution, patching, plots, tasks
from core.patching import PatchingError
from core.ui import cache, charts, frame, widgets
from core.ui import state as ui

view = ui.page_view()

model = view.model
n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
task = view.task
if task is None:  # typed text: a built-in task this model solves, or a clean/corrupted pair typed here
    with st.spinner("Finding a task this model solves…"):
        demo = cache.demo_task(model)
    PAIRS = {"demo": f"{ui.PROMPT_SOURCES[demo]}: 32 prompts this model solves" if demo else None,
             "typed": "My own pair (the sidebar's prompt and a corrupted one)"}
    PAIRS = {k: v for k, v in PAIRS.items() if v}
    if st.session_state.get("hi_pair") not in PAIRS:  # the typed pair first where it has a worked example
        typed_first = view.prompt is not None and st.session_state.get("prompt") in widgets.DEFAULT_PAIR
        st.session_state["hi_pair"] = "typed" if typed_first else next(iter(PAIRS))
    pair = st.segmented_control(
        "Prompts to patch", list(PAIRS), format_func=PAIRS.get, key="hi_pair", persist_state="session", required=True,
        help="Patching compares a clean run with a corrupted one (a prompt changed so the answer changes). Take a "
        "built-in task this model solves, or type the corrupted prompt yourself.",
    ) or next(iter(PAIRS))
    if pair == "demo":
        task = cache.task_batch(model, demo)
        st.caption(ui.md_escape(f"{task.description}: clean \"{task.clean_prompts[0]}\", corrupted "
                                     f"\"{task.corrupted_prompts[0]}\", … Choose it (and its template) in the "
                                     "sidebar's \"Prompt from\" to pick an example."))
    else:
        task, error = widgets.custom_pair(model, view.prompt)
        if error:
            st.warning(error)
            ui.sidebar_footer()
            st.stop()
store = cache.get_store()
with st.spinner("Running the clean and corrupted prompts…"):
    clean_run = store.get(model, task.clean_tokens)
    corrupted_run = store.get(model, task.corrupted_tokens)
norm = tasks.normaliser(task, clean_run.logits, corrupted_run.logits)
problem = norm.problem(task.metric_label)
charts.note_metric(task.metric_label)
charts.note("metric, clean run (mean)", norm.clean)
charts.note("metric, corrupted run (mean)", norm.corrupted)
st.caption(ui.md_escape(
    f"{task.description}, {len(task)} prompt(s). Metric: {task.metric_label}, mean over the prompts: "
    f"clean run {norm.clean:+.4f}, corrupted run {norm.corrupted:+.4f}."
    + (" The metric is shown normalised: 1 = the clean run's behaviour, 0 = the corrupted run's." if norm.meaningful else "")
))
if abs(norm.gap) < 1e-9:
    st.warning(problem)
    ui.sidebar_footer()
    st.stop()
if problem:
    st.warning(problem)

# Positions are labelled with one prompt's tokens (the sidebar's example).
example = int(st.session_state.get("example", 0)) if view.task is not None else 0


def head_links(grid, baseline: float) -> None:
    """Links to the heads that move the metric most from `baseline`, and to the attribution page.

    grid: [layer, head], or None for layer sweeps and the key/value heads of grouped-query models
    (fewer than the query heads: one serves several), which get no head links.
    """
    if grid is not None and grid.shape[1] == n_heads:
        top = attribution.top_heads(grid - baseline, k=min(6, grid.numel()))
        st.caption("Click a head to open its attention pattern, or follow a link:")
        for col, (layer, head, _) in zip(st.columns(len(top)), top):
            col.page_link("pages/attention.py", label=f"L{layer}H{head} {float(grid[layer, head]):+.2f}",
                          query_params=ui.attention_link_params(layer, head))
    st.page_link("pages/attribution.py", label="Which heads write the answer directly: Logit attribution", icon="🎯",
                 query_params=ui.attribution_link_params())


def show(fig, key: str, clickable: bool = True) -> None:
    """Draw a chart; a click on a head cell opens that head on the Attention page."""
    if not clickable:
        charts.show(fig, width="stretch", key=key)
        return
    clicked = plots.clicked_head(charts.show(fig, width="stretch", key=key, on_select="rerun",
                                             selection_mode="points"), n_layers, n_heads)
    if clicked is not None:
        ui.open_head_on_attention_page(*clicked)


# One view at a time (tabs would run both sweeps on every rerun).
VIEWS = frame.PATCH_VIEWS  # these controls are kept in the URL (bind): a link or a lesson opens them
view_choice = st.segmented_control("View", list(VIEWS), format_func=VIEWS.get, default="patch", key="hi_view",
                                   persist_state="session", bind="query-params", label_visibility="collapsed", required=True) or "patch"

# ---------------------------------------------------------------------------------------------
# Patching: exact (batched), attribution patching, or both side by side
# ---------------------------------------------------------------------------------------------
WHAT = dict(frame.PATCH_WHAT)
if model.cfg.attn_only:
    WHAT.pop("mlp_out")
ACTS, DIRECTIONS, METHODS = frame.PATCH_ACTS, frame.PATCH_DIRECTIONS, frame.PATCH_METHODS
HELP = {
    "what": "What to patch. Attention heads: one head at a time. Residual stream (resid_pre): everything the "
            "model has computed so far at one layer and position, as it enters that layer. Layer outputs: what a "
            "whole attention or MLP layer adds to the residual stream.",
    "act": "Which of a head's activations is copied. z: the head's output (its weighted values, before W_O). "
           "q, k, v: its query, key and value vectors. Attention pattern: where it looks.",
    "direction": "Denoising runs the corrupted prompts and copies one activation in from the clean run: does it "
                 "alone restore the behaviour? Noising runs the clean prompts with one activation from the "
                 "corrupted run: does it alone break it?",
    "method": "Exact: activation patching, one patched run per component (batched). Estimate: attribution "
              "patching, a linear estimate of all of them from one forward and one backward pass (fast, "
              "approximate). Both: side by side, with a scatter.",
}

def patching_view() -> None:
    c1, c2, c3 = st.columns(3)
    if "hi_what" in st.session_state and st.session_state["hi_what"] not in WHAT:  # MLPs on an attention-only model
        st.session_state["hi_what"] = "heads"
    what = c1.selectbox("Patch", list(WHAT), format_func=WHAT.get, key="hi_what", persist_state="session",
                        bind="query-params",
                        help=HELP["what"])
    by_pos = False
    act = what
    if what == "heads":
        act = c2.selectbox("Head activation", list(ACTS), format_func=ACTS.get, key="hi_act", persist_state="session",
                           bind="query-params",
                           help=HELP["act"])
        by_pos = c3.toggle("By position", key="hi_by_pos", persist_state="session", bind="query-params",
                           help="One cell per head and position instead of one per head (all positions at once).")
    d1, d2 = st.columns([3, 2])
    direction = d1.segmented_control("Direction", list(DIRECTIONS), format_func=DIRECTIONS.get, default="denoise",
                                     key="hi_direction", persist_state="session", required=True, bind="query-params",
                                     help=HELP["direction"]) or "denoise"
    method = d2.segmented_control("Method", list(METHODS), format_func=METHODS.get, default="exact",
                                  key="hi_method", persist_state="session", required=True, bind="query-params", help=HELP["method"]) or "exact"
    sweep = f"{act}_by_pos" if what == "heads" and by_pos else act
    results = {}
    for m in (["exact", "attribution"] if method == "compare" else [method]):
        with widgets.progress_bar("Patching" if m == "exact" else "Attribution patching") as progress:
            results[m] = cache.patching_sweep(model, task, sweep, direction, m, example, progress)
    if method == "compare":
        exact, estimate = results["exact"], results["attribution"]
        charts.show(plots.exact_vs_attribution(
            exact.values, estimate.values, patching.component_names(exact),
            f"Attribution patching against exact patching (r = {patching.agreement(exact, estimate):.3f})"),
            width="stretch", key="hi_scatter")
        st.caption(
            "Each point is one component. On the dotted line the linear estimate (one forward and one backward pass "
            "for every component at once) equals the exact patch (one patched run per component). Points far from "
            "it are where the model is not linear in that activation: attention patterns and early layers, often."
        )
        col_a, col_b = st.columns(2)
        with col_a:
            show(plots.figure(exact), "hi_exact", what == "heads")
        with col_b:
            show(plots.figure(estimate), "hi_attr", what == "heads")
    else:
        show(plots.figure(results[method]), "hi_grid", what == "heads")
    shown = results.get("exact", results.get("attribution"))
    head_links(shown.heads_grid, shown.baseline)
    st.caption(
        ("Denoising: each cell runs the corrupted prompts with one activation taken from the clean run; 1 means that "
         "activation alone restores the clean behaviour. " if direction == "denoise" else
         "Noising: each cell runs the clean prompts with one activation taken from the corrupted run; 0 means that "
         "activation alone destroys the clean behaviour. ")
        + "Colours (diverging scale centred at 0): blue is the clean behaviour (1 = all of it), white the corrupted "
        "run's (0), red below the corrupted run."
    )

# ---------------------------------------------------------------------------------------------
# Ablation: zero, mean or resample; the task metric and the loss
# ---------------------------------------------------------------------------------------------
TARGETS = {"heads": "Attention heads", "mlps": "MLP layers", "neurons": "Neurons of one MLP layer"}
if model.cfg.attn_only:
    TARGETS = {"heads": TARGETS["heads"]}
KINDS = frame.PATCH_KINDS

def ablation_view() -> None:
    a1, a2, a3 = st.columns(3)
    if st.session_state.get("hi_target") not in TARGETS:
        st.session_state["hi_target"] = "heads"
    target = a1.selectbox("Ablate", list(TARGETS), format_func=TARGETS.get, key="hi_target", persist_state="session")
    kind = a2.selectbox("Ablation", list(KINDS), format_func=KINDS.get, key="hi_kind", persist_state="session",
                        bind="query-params")
    layer = 0
    if target == "neurons":
        layer = a3.selectbox("MLP layer", range(n_layers), index=n_layers - 1, key="hi_neuron_layer", persist_state="session")
    if kind != "zero" and len(task) < 2:
        st.warning(f"{KINDS[kind]} ablation needs several prompts (it takes values from the others); this pair "
                   "has one. Use zero ablation, or a task from the sidebar.")
    else:
        with widgets.progress_bar("Ablating") as progress:
            result, ablation_norm = cache.ablation_sweep(model, task, target, layer, kind, progress)
        delta = ablation_norm.change_from_clean(result.metric)  # 0 = no change
        loss = result.loss - result.clean_loss
        st.caption(
            f"Each component is replaced at every position of the clean prompts ({KINDS[kind].lower()}). Left: the change "
            + ("in the normalised task metric (0 = no change, −1 = the clean behaviour gone). " if ablation_norm.meaningful
               else f"in the task metric ({task.metric_label}) from the clean run. ")
            + f"Right: the change in the next-token loss over the prompts, in nats (clean loss {result.clean_loss:.4f})."
        )
        if target == "heads":
            b1, b2 = st.columns(2)
            with b1:
                show(plots.head_heatmap(delta.reshape(n_layers, n_heads), "Task metric change", ablation_norm.change_label),
                     "hi_abl_metric")
            with b2:
                show(plots.head_heatmap(loss.reshape(n_layers, n_heads), "Loss change", "Δ loss (nats)"), "hi_abl_loss")
            head_links(delta.reshape(n_layers, n_heads), 0.0)
        elif target == "mlps":
            charts.show(plots.ablation_bar([f"MLP {l}" for l in range(n_layers)], ablation_norm(result.metric).tolist()
                                               if ablation_norm.meaningful else delta.tolist(), loss.tolist(),
                                               "MLP layers ablated", None if ablation_norm.meaningful else
                                               f"Δ {task.metric_label} from the clean run"),
                        width="stretch", key="hi_abl_mlps")
        else:
            top = delta.abs().topk(min(20, delta.numel())).indices.tolist()
            metric = ablation_norm(result.metric) if ablation_norm.meaningful else delta
            charts.show(plots.ablation_bar([f"N{n}" for n in top], [float(metric[n]) for n in top],
                                               [float(loss[n]) for n in top], f"The 20 neurons of MLP {layer} that matter most",
                                               None if ablation_norm.meaningful else f"Δ {task.metric_label} from the clean run"),
                        width="stretch", key="hi_abl_neurons")


try:
    if view_choice == "patch":
        patching_view()
    else:
        ablation_view()
except PatchingError as err:
    st.warning(ui.md_escape(str(err)))
ui.sidebar_footer()
