"""Head importance page: activation patching, attribution patching and ablation on a task."""
import time

import streamlit as st
import torch

from core import patching, plots, session, task_catalog, tasks
from core.patching import PatchingError

view = session.page_view()

model = view.model
n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
model_id = session.model_key(model)
task = view.task
if task is None:  # typed text: a built-in task this model solves, or a clean/corrupted pair typed here
    with st.spinner("Finding a task this model solves…"):
        demo = session.demo_task(model, model_id)
    PAIRS = {"demo": f"{session.PROMPT_SOURCES[demo]}: 32 prompts this model solves" if demo else None,
             "typed": "My own pair (the sidebar's prompt and a corrupted one)"}
    PAIRS = {k: v for k, v in PAIRS.items() if v}
    if st.session_state.get("hi_pair") not in PAIRS:  # the typed pair first where it has a worked example
        typed_first = view.prompt is not None and st.session_state.get("prompt") in session.DEFAULT_PAIR
        st.session_state["hi_pair"] = "typed" if typed_first else next(iter(PAIRS))
    pair = st.segmented_control(
        "Prompts to patch", list(PAIRS), format_func=PAIRS.get, key="hi_pair", persist_state="session", required=True,
        help="Patching compares a clean run with a corrupted one (a prompt changed so the answer changes). Take a "
        "built-in task this model solves, or type the corrupted prompt yourself.",
    ) or next(iter(PAIRS))
    if pair == "demo":
        task = session.task_batch(model, model_id, demo, session.TASK_BATCH, 0,
                                  task_catalog.default_template(demo))
        st.caption(session.md_escape(f"{task.description}: clean \"{task.clean_prompts[0]}\", corrupted "
                                     f"\"{task.corrupted_prompts[0]}\", … Choose it (and its template) in the "
                                     "sidebar's \"Prompt from\" to pick an example."))
    else:
        task, error = session.custom_pair(model, view.prompt)
        if error:
            st.warning(error)
            session.sidebar_footer()
            st.stop()
store = session.get_store()
task_id = session.task_key(task)
with st.spinner("Running the clean and corrupted prompts…"):
    clean_run = store.get(model, task.clean_tokens)
    corrupted_run = store.get(model, task.corrupted_tokens)
norm = tasks.normaliser(task, clean_run.logits, corrupted_run.logits)
clean_metric, corrupted_metric = norm.clean, norm.corrupted
problem = norm.problem(task.metric_label)
st.caption(session.md_escape(
    f"{task.description}, {len(task)} prompt(s). Metric: {task.metric_label}, mean over the prompts: "
    f"clean run {clean_metric:+.4f}, corrupted run {corrupted_metric:+.4f}."
    + (" The metric is shown normalised: 1 = the clean run's behaviour, 0 = the corrupted run's." if norm.meaningful else "")
))
if abs(norm.gap) < 1e-9:
    st.warning(problem)
    session.sidebar_footer()
    st.stop()
if problem:
    st.warning(problem)


def normalised(values, base: float):
    """Values as the charts show them: normalised where that is meaningful, else the change in the
    raw metric from the unpatched run (`base`: the corrupted run's metric when denoising, the clean
    run's when noising or ablating)."""
    values = torch.as_tensor(values)
    return norm(values) if norm.meaningful else values - base


VALUE_LABEL = "normalised metric" if norm.meaningful else f"Δ {task.metric_label}"


# Positions are labelled with one prompt's tokens (the sidebar's example), clean and corrupted.
i = int(st.session_state.get("example", 0)) if view.task is not None else 0
decode = session.decode_token
clean_tokens = [decode(model, t) for t in task.clean_tokens[i]]
corrupted_tokens = [decode(model, t) for t in task.corrupted_tokens[i]]
positions = plots.position_labels(clean_tokens)
position_hover = [
    plots.safe(f"position {p}: {c!r}" + (f" (corrupted: {k!r})" if c != k else ""))
    for p, (c, k) in enumerate(zip(clean_tokens, corrupted_tokens))
]


def run_with_progress(fn, what: str, **kw):
    """Call a cached sweep with a progress bar and an estimate of the time left."""
    bar = st.empty()
    start = time.monotonic()

    def progress(share: float) -> None:
        elapsed = time.monotonic() - start
        left = f", about {elapsed * (1 - share) / share:.0f} s left" if share > 0 and elapsed > 0.5 else ""
        bar.progress(min(1.0, max(0.0, share)), text=f"{what}: {share:.0%}{left}")

    result = fn(model, model_id, task, task_id, _progress=progress, **kw)
    bar.empty()
    return result


def head_links(grid: torch.Tensor, baseline: float, key: str) -> None:
    """Links to the heads that move the metric most from `baseline`, and to the attribution page.

    grid: [layer, head]. Key/value heads of grouped-query models (fewer than the query heads)
    get no head links: one of them serves several query heads.
    """
    if grid.shape[1] != n_heads:
        st.page_link("pages/attribution.py", label="Logit attribution", icon="🎯",
                     query_params=session.attribution_link_params())
        return
    flat = (grid - baseline).abs().flatten()
    top = flat.topk(min(6, flat.numel())).indices.tolist()
    st.caption("Click a head to open its attention pattern, or follow a link:")
    cols = st.columns(len(top))
    for col, k in zip(cols, top):
        layer, head = divmod(k, grid.shape[1])
        col.page_link("pages/attention.py", label=f"L{layer}H{head} {float(grid[layer, head]):+.2f}",
                      query_params=session.attention_link_params(layer, head))
    st.page_link("pages/attribution.py", label="Which heads write the answer directly: Logit attribution", icon="🎯",
                 query_params=session.attribution_link_params())


def open_clicked(event) -> None:
    clicked = plots.clicked_head(event, n_layers, n_heads)
    if clicked is not None:
        session.open_head_on_attention_page(*clicked)


# One view at a time (tabs would run both sweeps on every rerun).
VIEWS = {"patch": "Patching", "ablate": "Ablation"}
view_choice = st.segmented_control("View", list(VIEWS), format_func=VIEWS.get, default="patch", key="hi_view",
                                   persist_state="session", label_visibility="collapsed", required=True) or "patch"

# ---------------------------------------------------------------------------------------------
# Patching: exact (batched), attribution patching, or both side by side
# ---------------------------------------------------------------------------------------------
WHAT = {"heads": "Attention heads", "resid_pre": "Residual stream (resid_pre)", "attn_out": "Attention layer outputs",
        "mlp_out": "MLP layer outputs"}
if model.cfg.attn_only:
    WHAT.pop("mlp_out")
ACTS = {"z": "output (z)", "q": "query (q)", "k": "key (k)", "v": "value (v)", "pattern": "attention pattern"}
DIRECTIONS = {"denoise": "Denoise: clean → corrupted", "noise": "Noise: corrupted → clean"}
METHODS = {"exact": "Exact", "attribution": "Estimate", "compare": "Both"}
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
    if st.session_state.get("hi_what") not in WHAT:
        st.session_state["hi_what"] = "heads"
    what = c1.selectbox("Patch", list(WHAT), format_func=WHAT.get, key="hi_what", persist_state="session",
                        help=HELP["what"])
    by_pos = False
    act = what
    if what == "heads":
        act = c2.selectbox("Head activation", list(ACTS), format_func=ACTS.get, key="hi_act", persist_state="session",
                           help=HELP["act"])
        by_pos = c3.toggle("By position", key="hi_by_pos", persist_state="session",
                           help="One cell per head and position instead of one per head (all positions at once).")
    d1, d2 = st.columns([3, 2])
    direction = d1.segmented_control("Direction", list(DIRECTIONS), format_func=DIRECTIONS.get, default="denoise",
                                     key="hi_direction", persist_state="session", required=True,
                                     help=HELP["direction"]) or "denoise"
    method = d2.segmented_control("Method", list(METHODS), format_func=METHODS.get, default="exact",
                                  key="hi_method", persist_state="session", required=True, help=HELP["method"]) or "exact"
    sweep = f"{act}_by_pos" if what == "heads" and by_pos else act
    label = patching.SWEEPS[sweep].label
    results = {}
    for m in (["exact", "attribution"] if method == "compare" else [method]):
        results[m] = normalised(run_with_progress(
            session.patching_sweep, "Patching" if m == "exact" else "Attribution patching",
            sweep=sweep, direction=direction, method=m)["values"],
            corrupted_metric if direction == "denoise" else clean_metric)
    baseline = (0.0 if direction == "denoise" else 1.0) if norm.meaningful else 0.0

    def draw(values: torch.Tensor, m: str, key: str):
        title = f"{label}: {'exact' if m == 'exact' else 'attribution patching'}"
        value_label = VALUE_LABEL
        if what != "heads":  # [layer, pos]
            hover = [[f"L{l} {position_hover[p]}" for p in range(len(positions))] for l in range(n_layers)]
            fig = plots.importance_heatmap(values, [f"L{l}" for l in range(n_layers)], positions, title, value_label, hover)
            st.plotly_chart(fig, width="stretch", key=key)
        else:
            n = values.shape[-1]
            kv = n != n_heads  # grouped-query keys/values: fewer heads, each serving several query heads
            h_name = "KV" if kv else "H"
            if not by_pos:  # [layer, head]
                names = [[f"L{l}{h_name}{h}" for h in range(n)] for l in range(n_layers)]
                fig = plots.importance_heatmap(values, [f"L{l}" for l in range(n_layers)], [f"{h_name}{h}" for h in range(n)],
                                               title, value_label, names,
                                               heads=None if kv else [[(l, h) for h in range(n)] for l in range(n_layers)])
            else:  # [layer, pos, head] -> rows L.H, columns positions
                grid = values.permute(0, 2, 1).reshape(n_layers * n, -1)
                rows = [f"L{l}{h_name}{h}" for l in range(n_layers) for h in range(n)]
                hover = [[f"{r} {position_hover[p]}" for p in range(len(positions))] for r in rows]
                fig = plots.importance_heatmap(grid, rows, positions, title, value_label, hover,
                                               heads=None if kv else [[(l, h)] * len(positions) for l in range(n_layers) for h in range(n)])
            event = st.plotly_chart(fig, width="stretch", key=key, on_select="rerun", selection_mode="points")
            open_clicked(event)

    if method == "compare":
        exact, approx = results["exact"], results["attribution"]
        r = float(torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1]) if exact.numel() > 1 else float("nan")
        comps = patching.SWEEPS[sweep].components(model, len(positions))
        h_name = "KV" if patching.SWEEPS[sweep].n_heads(model.cfg) != n_heads else "H"
        comp_names = [f"L{c.layer}" + (f"{h_name}{c.head}" if c.head is not None else "")
                      + (f" pos {c.pos}" if c.pos is not None else "") for c in comps]
        st.plotly_chart(plots.exact_vs_attribution(exact, approx, comp_names,
                                                   f"Attribution patching against exact patching (r = {r:.3f})"),
                        width="stretch", key="hi_scatter")
        st.caption(
            "Each point is one component. On the dotted line the linear estimate (one forward and one backward pass "
            "for every component at once) equals the exact patch (one patched run per component). Points far from "
            "it are where the model is not linear in that activation: attention patterns and early layers, often."
        )
        col_a, col_b = st.columns(2)
        with col_a:
            draw(exact, "exact", "hi_exact")
        with col_b:
            draw(approx, "attribution", "hi_attr")
    else:
        draw(results[method], method, "hi_grid")
    if what == "heads":
        values = results.get("exact", results.get("attribution"))
        if by_pos:  # each head at its position furthest from the baseline
            at = (values - baseline).abs().argmax(1, keepdim=True)
            values = values.gather(1, at).squeeze(1)
        head_links(values, baseline, "hi_links")
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
KINDS = {"zero": "Zero", "mean": "Mean over the prompts", "resample": "Resample (another prompt's value)"}

def ablation_view() -> None:
    a1, a2, a3 = st.columns(3)
    if st.session_state.get("hi_target") not in TARGETS:
        st.session_state["hi_target"] = "heads"
    target = a1.selectbox("Ablate", list(TARGETS), format_func=TARGETS.get, key="hi_target", persist_state="session")
    kind = a2.selectbox("Ablation", list(KINDS), format_func=KINDS.get, key="hi_kind", persist_state="session")
    layer = 0
    if target == "neurons":
        layer = a3.selectbox("MLP layer", range(n_layers), index=n_layers - 1, key="hi_neuron_layer", persist_state="session")
    if kind != "zero" and len(task) < 2:
        st.warning(f"{KINDS[kind]} ablation needs several prompts (it takes values from the others); this pair "
                   "has one. Use zero ablation, or a task from the sidebar.")
    else:
        res = run_with_progress(session.ablation_sweep, "Ablating", target=target, layer=layer, kind=kind)
        shift = 1.0 if norm.meaningful else 0.0  # the clean run's value on the chart's scale
        delta = normalised(res["metric"], clean_metric) - shift  # 0 = no change
        raw_label = None if norm.meaningful else f"Δ {task.metric_label} from the clean run"
        loss = torch.as_tensor(res["loss"]) - res["clean_loss"]
        st.caption(
            f"Each component is replaced at every position of the clean prompts ({KINDS[kind].lower()}). Left: the change "
            + ("in the normalised task metric (0 = no change, −1 = the clean behaviour gone). " if norm.meaningful else
               f"in the task metric ({task.metric_label}) from the clean run. ")
            + "Right: the change in the "
            f"next-token loss over the prompts, in nats (clean loss {res['clean_loss']:.4f})."
        )
        if target == "heads":
            names = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)]
            cells = [[(l, h) for h in range(n_heads)] for l in range(n_layers)]
            ys, xs = [f"L{l}" for l in range(n_layers)], [f"H{h}" for h in range(n_heads)]
            b1, b2 = st.columns(2)
            with b1:
                event = st.plotly_chart(
                    plots.importance_heatmap(delta.reshape(n_layers, n_heads), ys, xs, "Task metric change",
                                             f"Δ {VALUE_LABEL}" if norm.meaningful else VALUE_LABEL, names, heads=cells),
                    width="stretch", key="hi_abl_metric", on_select="rerun", selection_mode="points")
                open_clicked(event)
            with b2:
                event = st.plotly_chart(
                    plots.importance_heatmap(loss.reshape(n_layers, n_heads), ys, xs, "Loss change", "Δ loss (nats)", names,
                                             heads=cells),
                    width="stretch", key="hi_abl_loss", on_select="rerun", selection_mode="points")
                open_clicked(event)
            head_links(delta.reshape(n_layers, n_heads), 0.0, "hi_abl_links")
        elif target == "mlps":
            st.plotly_chart(plots.ablation_bar([f"MLP {l}" for l in range(n_layers)], (delta + shift).tolist(), loss.tolist(),
                                               "MLP layers ablated", raw_label), width="stretch", key="hi_abl_mlps")
        else:
            top = delta.abs().topk(min(20, delta.numel())).indices.tolist()
            st.plotly_chart(plots.ablation_bar([f"N{n}" for n in top], [float(delta[n] + shift) for n in top],
                                               [float(loss[n]) for n in top], f"The 20 neurons of MLP {layer} that matter most",
                                               raw_label),
                            width="stretch", key="hi_abl_neurons")

try:
    if view_choice == "patch":
        patching_view()
    else:
        ablation_view()
except PatchingError as err:
    st.warning(session.md_escape(str(err)))
session.sidebar_footer()
