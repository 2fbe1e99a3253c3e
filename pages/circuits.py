"""Circuits page: every edge between components scored (exact patching, EAP, EAP-IG) or a circuit
found by ACDC; the top-N circuit as a graph with its faithfulness; path patching, weights
(composition, copying, OV), estimate against exact, minimality and completeness; export."""
import json

import streamlit as st

from core import circuit_plots as cp
from core import circuits, plots
from core.circuits import CircuitError
from core.path_patching import PathPatchingError
from core.ui import cache, charts, frame, widgets
from core.ui import state as ui

state = st.session_state
FAITHFUL = 0.8  # the faithfulness the N slider opens on (smallest top-N circuit that keeps 80%)

# A head clicked in the graph (the chart's callback set this): open it on the Attention page at once.
if "_circ_open_head" in state:
    ui.open_head_on_attention_page(*state.pop("_circ_open_head"))

view = ui.page_view()
model = view.model
n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads


def stop(message: str, kind: str = "warning") -> None:
    """A message in the page (never a traceback), then nothing more of the page."""
    getattr(st, kind)(message)
    ui.sidebar_footer()
    st.stop()


try:
    graph = circuits.build_graph(model)
except CircuitError as err:
    stop(ui.md_escape(f"The circuit graph cannot describe {view.model_name}: {err} Every other page works on it; "
                      "on this page, pick a model without that feature (the embedded ones, GPT-2, Llama, Qwen, ...)."))

# ---------------------------------------------------------------------------------------------
# 1. The task: the sidebar's, the model's demo task, or a typed clean/corrupted pair
# ---------------------------------------------------------------------------------------------
task = view.task
row = st.columns(2)
if task is None:
    with st.spinner("Finding a task this model solves…"):
        demo = cache.demo_task(model)
    PAIRS = {"demo": f"{ui.PROMPT_SOURCES[demo]}: 32 prompts this model solves" if demo else None,
             "typed": "My own pair (the sidebar's prompt and a corrupted one)"}
    PAIRS = {k: v for k, v in PAIRS.items() if v}
    if state.get("circ_pair") not in PAIRS:
        state["circ_pair"] = next(iter(PAIRS))
    pair = row[0].selectbox(
        "Prompts", list(PAIRS), format_func=PAIRS.get, key="circ_pair", persist_state="session",
        help="A circuit explains the difference between a clean run and a corrupted one (a prompt changed so the "
        "answer changes). Take a built-in task this model solves, or type the corrupted prompt yourself.",
    )
    if pair == "demo":
        task = cache.task_batch(model, demo)
    else:
        task, error = widgets.custom_pair(model, view.prompt)
        if error:
            stop(error)

CORRUPTIONS = {"match": "the earlier occurrence of the last token (key path)",
               "continuation": "the token that followed it (value path)"}
corruption = None
if task.name == "induction":
    corruption = row[1].selectbox(
        "What the corrupted prompt changes", list(CORRUPTIONS), format_func=CORRUPTIONS.get, key="circ_corruption",
        persist_state="session",
        help="Induction predicts the token that followed the last token's earlier occurrence. Replace that earlier "
        "occurrence and there is nothing to match: the circuit is where the induction head looks (its key, fed by "
        "the previous-token head). Replace the token after it and the match still works but copies something "
        "else: the circuit is what it copies (its value).",
    )
    task = cache.induction_task(model, corruption)

ABLATIONS = {"resample": "Resample", "mean": "Mean"}
METHODS = {"exact": "Exact", "eap": "EAP", "eap-ig": "EAP-IG", "acdc": "ACDC"}
DEFAULT_METHOD = "exact" if graph.n_edges <= 1000 else "eap"  # EAP-IG on GPT-2 small: minutes
if state.get("_circ_method_for") != view.model_id:  # a new model: the method that fits its size
    state["_circ_method_for"] = view.model_id
    state["circ_method"] = DEFAULT_METHOD
c1, c2, c3 = st.columns([4, 3, 3], vertical_alignment="bottom")
method = c1.segmented_control(
    "Method", list(METHODS), format_func=METHODS.get, key="circ_method", persist_state="session", required=True,
    help="How each edge is scored. Exact: one patched run per edge (the ground truth). EAP: a linear estimate of every "
    "edge from one forward and one backward pass. EAP-IG: EAP with the gradient averaged between the corrupted and "
    "clean inputs (more accurate). ACDC: removes edges greedily, receiver by receiver, while the metric drops by "
    "less than τ.",
) or DEFAULT_METHOD
ablation = c2.segmented_control(
    "Ablation", list(ABLATIONS), format_func=ABLATIONS.get, default="resample", key="circ_ablation",
    persist_state="session", required=True,
    help="What a removed edge carries instead of its clean value. Resample: the sender's value on the prompt's own "
    "corrupted counterpart. Mean: its mean over all the corrupted prompts (per position).",
) or "resample"
steps, tau = 8, 0.02
if method == "eap-ig":
    steps = c3.slider("EAP-IG steps", 1, 32, 8, key="circ_steps", persist_state="session",
                      help="Interpolation steps between the corrupted and clean inputs (one batched forward and "
                      "backward pass for all of them).")
elif method == "acdc":
    tau = c3.slider("ACDC threshold τ", 0.0, 0.2, 0.02, step=0.005, format="%.3f", key="circ_tau",
                    persist_state="session", help="An edge is removed when removing it lowers the metric by less than τ "
                    "(a share of the clean − corrupted gap; in the metric's own units where the gap is too small to "
                    "normalise). Larger τ: a smaller circuit.")

# ---------------------------------------------------------------------------------------------
# 2. The runs, the scores and the faithfulness curve
# ---------------------------------------------------------------------------------------------
try:
    with st.spinner("Running the clean and corrupted prompts…"):
        runs = cache.circuit_runs(model, task, ablation)
except CircuitError as err:
    stop(ui.md_escape(str(err)))
norm = runs.normaliser
problem = norm.problem(task.metric_label)
st.caption(ui.md_escape(
    f"{task.description}, {len(task)} prompt(s). Metric: {task.metric_label}, mean over the prompts: clean run "
    f"{norm.clean:+.4f}, corrupted run {norm.corrupted:+.4f}. "
    + ("An edge's score is the share of that gap it carries (positive: it supports the clean behaviour)."
       if norm.meaningful else f"An edge's score is how much patching it lowers the {task.metric_label} (not "
       "normalised: the gap is too small).")
))
if abs(norm.gap) < 1e-9:
    stop(problem)
if problem:
    st.warning(problem)

# ACDC is compared with the top-N curve of the exact scores (or EAP-IG where exact would take too long).
score_method = method if method != "acdc" else DEFAULT_METHOD
try:
    with widgets.progress_bar(f"Scoring every edge ({METHODS[score_method]})") as progress:
        scores = cache.edge_scores(model, task, ablation, score_method, steps, progress)
    with widgets.progress_bar("Measuring the top-N circuits' faithfulness") as progress:
        curve = cache.faithfulness_curve(model, task, ablation, score_method, steps, progress)
except CircuitError as err:
    stop(ui.md_escape(str(err)))


def default_n() -> int:
    """The smallest top-N circuit with faithfulness ≥ 0.8; else the most faithful one; else 20."""
    n = curve.smallest_faithful(FAITHFUL)
    if n is None and len(curve.requested):
        best = max(range(len(curve.requested)), key=lambda i: float(curve.faithfulness[i]))
        n = curve.requested[best] if float(curve.faithfulness[best]) > 0 else None
    return int(n or min(20, graph.n_edges))


task_id = cache.task_key(task)
context = (view.model_id, task_id, ablation, method, steps if method == "eap-ig" else None)
if state.get("_circ_n_for") != context:
    state["_circ_n_for"] = context
    state["circ_n"] = default_n()
state["circ_n"] = max(1, min(int(state.get("circ_n") or default_n()), graph.n_edges))  # a stale or linked N: clamped

left, right = st.columns([2, 3])
circuit = evaluation = None
with left:
    if method == "acdc":
        acdc_key = (view.model_id, task_id, ablation, round(tau, 6))
        asked = state.setdefault("_circ_acdc_asked", [])
        if graph.n_edges <= 1000:  # about a second on the embedded models: run it at once
            if acdc_key not in asked:
                asked.append(acdc_key)
        elif st.button(f"Run ACDC with τ = {tau:.3f}", key="circ_acdc_run", type="primary",
                     help="ACDC runs one batch per receiver (about a second on the embedded models, minutes on GPT-2 "
                     "small); its result is kept, so a τ already run shows at once.") and acdc_key not in asked:
            asked.append(acdc_key)
        if acdc_key in asked:
            try:
                with widgets.progress_bar(f"ACDC (τ = {tau:.3f}), one receiver at a time") as progress:
                    circuit = cache.acdc(model, task, ablation, tau, progress)
            except CircuitError as err:
                stop(ui.md_escape(str(err)))
            st.caption(f"ACDC (Conmy et al. 2023) visited the {graph.n_down} receivers from the logits back and removed "
                       f"every edge whose removal lowered the metric by less than τ = {tau:.3f}"
                       + (" of the gap." if norm.meaningful else f" (in {task.metric_label})."))
        else:
            st.info(f"ACDC tries removing every edge, one receiver at a time ({graph.n_down} receivers, "
                    f"{graph.n_edges} edges): press the button to run it.")
    else:
        n = st.slider("Edges kept (N)", 1, graph.n_edges, key="circ_n", persist_state="session",
                      help="The circuit is the N edges with the largest |score|, pruned to those on a path from the "
                      "embeddings to the logits.")
        circuit = circuits.discover(scores, n=min(n, graph.n_edges))
        first = curve.smallest_faithful(FAITHFUL)
        st.caption(f"The circuit: the top {n} of {graph.n_edges} edges by |score|, kept where they lie on a path from "
                   "the embeddings to the logits. "
                   + (f"The smallest top-N circuit keeping {FAITHFUL:.0%} of the behaviour has N = {first}."
                      if first else f"No top-N circuit keeps {FAITHFUL:.0%} of the behaviour."))
    if circuit is not None:
        evaluation = cache.circuit_evaluation(model, task, ablation, circuit)
with right:
    if method == "acdc":
        point = (circuit.n_edges, float(evaluation.faithfulness[0])) if circuit is not None else (None, None)
        fig = cp.faithfulness_figure(curve, *point, FAITHFUL, f"ACDC against the top-N circuits of {METHODS[score_method]} scores",
                                     chosen_label=f"ACDC, τ = {tau:.3f}")
    else:
        fig = cp.faithfulness_figure(curve, n, float(evaluation.faithfulness[0]), FAITHFUL,
                                     f"Faithfulness of the top-N circuits ({METHODS[method]} scores)",
                                     chosen_label=f"N = {n}")
    charts.show(fig, width="stretch", key="circ_curve")
if evaluation is not None:
    metric, faith = float(evaluation.metric[0]), float(evaluation.faithfulness[0])
    m1, m2, m3 = st.columns(3)
    m1.metric("Edges kept", f"{circuit.n_edges} / {graph.n_edges}", f"{circuit.n_edges / graph.n_edges:.1%} of the edges",
              delta_color="off", delta_arrow="off", help="Edges in the circuit / edges in this model's graph.")
    m2.metric("Circuit metric", f"{metric:+.3f}", f"clean {norm.clean:+.3f}, corrupted {norm.corrupted:+.3f}",
              delta_color="off", delta_arrow="off",
              help=f"{task.metric_label} with every edge outside the circuit ablated ({ABLATIONS[ablation].lower()}).")
    shown = f"{round(faith, 2) + 0.0:.2f}" if norm.meaningful else "n/a"  # + 0.0: no "-0.00"
    m3.metric("Faithfulness", shown, "of the behaviour kept" if norm.meaningful else "the gap is too small to divide by",
              delta_color="off", delta_arrow="off",
              help="(circuit − corrupted) / (clean − corrupted): 1 = the circuit alone does all the model does, "
              "0 = nothing.")

if circuit is None:
    ui.sidebar_footer()
    st.stop()
if circuit.n_edges == 0:
    if method == "acdc":
        stop(f"ACDC with τ = {tau:.3f} removed every edge: no path from the embeddings to the logits is left. Lower τ.")
    stop(f"The top {n} edges form no path from the embeddings to the logits; raise N.")

# ---------------------------------------------------------------------------------------------
# 3. The circuit graph: click a head to open it, an edge to path-patch it
# ---------------------------------------------------------------------------------------------
PATH_INPUTS = {"q": "query (q)", "k": "key (k)", "v": "value (v)"}
RECEIVER_OPTIONS = [f"L{l}H{h}" for l in range(1, n_layers) for h in range(n_heads)]


def select_edge(up: str, down: str) -> None:
    """Open the path-patching view on an edge: its receiver and input, and the banner naming it."""
    state["circ_detail"] = "paths"
    state["circ_pp_edge"] = [up, down, view.model_id, task_id]
    node, port = cp.receiver(graph, down)
    if port in PATH_INPUTS and node in RECEIVER_OPTIONS:
        state["circ_pp_receivers"] = [node]
        state["circ_pp_input"] = port


def on_graph_click() -> None:
    hit = cp.clicked(state.get("circ_graph"))
    if hit is None:
        return
    if hit[0] == "head":
        state["_circ_open_head"] = (hit[1], hit[2])
    else:
        select_edge(hit[1], hit[2])


if method == "acdc":
    title = f"ACDC circuit (τ = {tau:.3f}): {circuit.n_edges} edges"
else:
    title = f"Top {n} edges by {METHODS[method]} score: {circuit.n_edges} on paths from the embeddings to the logits"
charts.show(cp.circuit_figure(circuit, title), width="stretch", key="circ_graph", on_select=on_graph_click,
            selection_mode="points")
hidden = cp.hidden_summary(circuit)
st.caption(
    (hidden + " " if hidden else "")
    + "Nodes: embeddings, heads (by layer; height = head index), MLPs, logits; size = Σ|score| of the node's edges. "
    "Edges into a head end at its query, key or value port (solid, dashed, dotted). Blue supports the clean behaviour, "
    "red works against it. Click a head to open its attention pattern, or an edge's diamond to path-patch that edge."
)
task_name = f"{task.name} ({task.description}; template {task.template}" + (f"; corruption {corruption})" if corruption else ")")
e1, e2, e3 = st.columns([3, 3, 4], vertical_alignment="center")
e1.download_button("Circuit as JSON", json.dumps(circuits.circuit_json(circuit, view.model_name, task_name, evaluation), indent=2),
                   file_name=f"circuit-{task.name}.json", mime="application/json", key="circ_json", icon="⬇️")
e2.download_button("Graph as SVG", cp.circuit_svg(circuit, title), file_name=f"circuit-{task.name}.svg", mime="image/svg+xml",
                   key="circ_svg", icon="⬇️")
e3.caption("PNG: the camera button in the graph's toolbar (hover the graph).")

# ---------------------------------------------------------------------------------------------
# 4. One view at a time (tabs would run every view's computation on every rerun)
# ---------------------------------------------------------------------------------------------
VIEWS = frame.CIRCUIT_VIEWS  # kept in the URL (bind): a link or a lesson opens a view
if state.get("circ_detail") not in VIEWS:
    state["circ_detail"] = "paths"
detail = st.segmented_control("View", list(VIEWS), format_func=VIEWS.get, key="circ_detail", persist_state="session", bind="query-params",
                              required=True, label_visibility="collapsed") or "paths"


def show_heads(fig, key: str) -> None:
    """A layer × head heatmap; a click on a cell opens that head on the Attention page."""
    event = charts.show(fig, width="stretch", key=key, on_select="rerun", selection_mode="points")
    clicked = plots.clicked_head(event, n_layers, n_heads)
    if clicked is not None:
        ui.open_head_on_attention_page(*clicked)


def paths_view() -> None:
    with widgets.progress_bar("Path patching: every head → logits") as progress:
        to_logits = cache.path_patching(model, task, (), "logits", progress)
    carried = cp.carried(to_logits)
    pp_context = (view.model_id, task_id)
    edge = state.get("circ_pp_edge")
    if edge and tuple(edge[2:]) != pp_context:  # an edge clicked on another model or task
        state.pop("circ_pp_edge", None)
        edge = None
    if state.get("_circ_pp_for") != pp_context:  # defaults: the strongest path to the logits, its busiest input
        state["_circ_pp_for"] = pp_context
        if RECEIVER_OPTIONS and not (edge and cp.receiver(graph, edge[1])[0] in RECEIVER_OPTIONS):
            later = carried[1:].nan_to_num(float("-inf"))
            layer, head = divmod(int(later.argmax()), n_heads)
            node = f"L{layer + 1}H{head}"
            totals = {p: sum(abs(s) for u, d, s in scores.top(graph.n_edges) if d.startswith(node + ".") and d.endswith(p))
                      for p in PATH_INPUTS}
            state["circ_pp_receivers"] = [node]
            state["circ_pp_input"] = max(totals, key=totals.get)
    selected_logits = selected_heads = None
    if edge:
        up, down = edge[:2]
        node, port = cp.receiver(graph, down)
        sender = cp.head_of(up)
        if down == "logits":
            st.info(f"Showing the path {up} → logits" + ("." if sender else
                    f": {up} is not a head, so it has no row here (path patching sends from heads)."))
            selected_logits = sender
        elif port in PATH_INPUTS and state.get("circ_pp_receivers") == [node] and state.get("circ_pp_input") == port:
            st.info(f"Showing the path {up} → {node}.{port}" + ("." if sender else
                    f": {up} is not a head, so it has no row here (path patching sends from heads)."))
            selected_heads = sender
        elif port in PATH_INPUTS and node not in RECEIVER_OPTIONS:
            st.info(f"The edge {up} → {down} ends in layer 0: no head comes before {node}, so path patching has no "
                    "sender for it. Its score is on the graph above.")
        elif port == "in" and down != "logits":
            st.info(f"The edge {up} → {down} ends at an MLP: path patching here sends into heads' queries, keys and "
                    "values, or into the logits. Its score is on the graph above.")
        else:
            state.pop("circ_pp_edge", None)  # the controls moved on from the clicked edge
    c1, c2 = st.columns([3, 2])
    receivers = c1.multiselect("Receiver heads", RECEIVER_OPTIONS, key="circ_pp_receivers", persist_state="session",
                               help="Path patching into these heads' inputs: each sender's corrupted output reaches them "
                               "directly, every other head frozen at its clean output.")
    if state.get("circ_pp_input") not in PATH_INPUTS:
        state["circ_pp_input"] = "k"
    which = c2.segmented_control("Receiver input", list(PATH_INPUTS), format_func=PATH_INPUTS.get, key="circ_pp_input",
                                 persist_state="session", required=True) or "k"
    left, right = st.columns(2)
    with left:
        show_heads(cp.path_heatmap(to_logits, selected_logits), "circ_pp_logits")
    with right:
        if not RECEIVER_OPTIONS:
            st.info("This model has one layer: no head sends to another.")
        elif not receivers:
            st.info("Choose receiver heads to see every earlier head's path into their queries, keys or values.")
        else:
            pairs = tuple(sorted(cp.head_of(r) for r in receivers))
            try:
                with widgets.progress_bar("Path patching: every head → the receivers") as progress:
                    result = cache.path_patching(model, task, pairs, which, progress)
            except PathPatchingError as err:
                st.warning(ui.md_escape(str(err)))
            else:
                show_heads(cp.path_heatmap(result, selected_heads), "circ_pp_heads")
    unit = "the share of the clean − corrupted gap the path carries" if to_logits.normalised else \
        f"the drop in {task.metric_label} the path causes (raw: the gap is too small to normalise)"
    st.caption(f"Path patching (Wang et al. 2022), noising: the clean prompts run with one sender head's output from the "
               f"corrupted run, reaching only the logits (left) or only the receivers' {which} (right); every other head "
               f"is frozen at its clean output. Each cell is {unit}: 1 − the normalised metric, positive = the path "
               "supports the clean behaviour. Blank: the sender is not before every receiver. Click a head to open it.")


def weights_view() -> None:
    if n_layers < 2:
        st.info("Composition needs two layers: this model has one.")
    else:
        if state.get("circ_comp_kind") not in ("Q", "K", "V"):
            state["circ_comp_kind"] = "K"
        kind = st.segmented_control("Composition", ["Q", "K", "V"], key="circ_comp_kind", persist_state="session",
                                    required=True, format_func=lambda k: f"{k}-composition",
                                    help="How much a later head's query (Q), key (K) or value (V) side reads what an "
                                    "earlier head writes, from the weights alone (Elhage et al. 2021).") or "K"
        try:
            with st.spinner("Composition scores and a random baseline…"):
                summary = cache.composition(model, kind)
        except ValueError as err:
            st.warning(ui.md_escape(str(err)))
        else:
            charts.show(cp.composition_heatmap(summary), width="stretch", key="circ_comp")
            above = int(summary.above_baseline().sum())
            st.caption(f"‖W_OV(sender) · W(receiver)‖ / (‖W_OV‖ ‖W‖), Frobenius norms, from the weights alone. Random baseline "
                       f"({len(summary.samples)} pairs of random heads of this model's shapes): mean {summary.mean:.3f}, "
                       f"95th percentile {summary.p95:.3f}. {above} pair(s) score above it (marked *).")
    try:
        with st.spinner("Copying scores…"):
            copying = cache.copying_scores(model)
    except ValueError as err:
        st.warning(ui.md_escape(str(err)))
        return
    heads = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
    if state.get("circ_ov_head") not in heads:
        best = int(copying.nan_to_num(float("-inf")).flatten().argmax())
        state["circ_ov_head"] = heads[best]
    c1, c2 = st.columns([3, 2], vertical_alignment="center")
    chosen = c2.selectbox("Head for its OV mappings", heads, key="circ_ov_head", persist_state="session",
                          help="Its full OV circuit W_E W_V W_O W_U: which output tokens it raises when it attends to "
                          "a source token.")
    c2.caption("Copying score: Re(Σ eigenvalues) / Σ |eigenvalues| of the head's full OV circuit. Near +1: attending to "
               "a token raises that token's logit (copying, as induction heads do).")
    layer, head = cp.head_of(chosen)
    with c1:
        charts.show(cp.copying_heatmap(copying, (layer, head)), width="stretch", key="circ_copying")
    try:
        mappings = cache.top_ov_mappings(model, layer, head, 10)
    except ValueError as err:
        st.warning(ui.md_escape(str(err)))
    else:
        st.dataframe(cp.ov_table(mappings, lambda t: ui.decode_token(model, t)), hide_index=True, width="stretch")
        st.caption(f"{chosen}'s top OV mappings: the 10 source tokens whose own logit it raises most when it attends "
                   "to them, each with the output tokens it raises most (direct effect, through the final LayerNorm's "
                   "weight and the unembedding).")


def compare_view() -> None:
    ESTIMATES = {"eap": "EAP", "eap-ig": "EAP-IG"}
    if state.get("circ_cmp_method") not in ESTIMATES:
        state["circ_cmp_method"] = method if method in ESTIMATES else "eap-ig"
    estimate_method = st.segmented_control("Estimate", list(ESTIMATES), format_func=ESTIMATES.get, key="circ_cmp_method",
                                           persist_state="session", required=True) or "eap-ig"
    if graph.n_edges > 1000 and not st.toggle("Compute the exact scores", key="circ_cmp_exact", persist_state="session",
                                              help=f"One patched run per edge: {graph.n_edges} edges."):
        st.info(f"Exact scores need one patched run per edge ({graph.n_edges} edges on this model).")
        return
    try:
        with widgets.progress_bar("Exact edge patching (one run per edge)") as progress:
            exact = cache.edge_scores(model, task, ablation, "exact", steps, progress)
        with widgets.progress_bar(f"{ESTIMATES[estimate_method]} estimate") as progress:
            estimate = cache.edge_scores(model, task, ablation, estimate_method, steps, progress)
    except CircuitError as err:
        st.warning(ui.md_escape(str(err)))
        return
    agree = circuits.agreement(exact, estimate)
    label = ESTIMATES[estimate_method] + (f" ({steps} steps)" if estimate_method == "eap-ig" else "")
    c1, c2, c3 = st.columns(3)
    c1.metric("Correlation (Pearson r)", f"{agree['correlation']:.3f}", help=f"Over all {agree['edges']} edges.")
    c2.metric(f"Top-{agree['top']} overlap", f"{agree['top_overlap']:.0%}",
              help=f"Share of the exact top {agree['top']} edges (by |score|) that the estimate also ranks in its top {agree['top']}.")
    c3.metric("Edges compared", f"{agree['edges']}")
    charts.show(cp.edge_scatter(exact, estimate, agree, label), width="stretch", key="circ_scatter")
    st.caption("Each point is one edge. On the dotted line the estimate (one forward and one backward pass for every "
               "edge) equals exact edge patching (one patched run per edge). Points far from it are edges where the model "
               "is not linear between the clean and corrupted inputs; EAP-IG's averaged gradient usually brings them closer.")


def mechanism_view() -> None:
    try:
        with st.spinner("Knocking each node out of the circuit…"):
            check = cache.minimality(model, task, ablation, circuit)
    except CircuitError as err:
        st.warning(ui.md_escape(str(err)))
        return
    nodes = [s[-1] for s in check.sets]
    if not nodes:
        st.info("The circuit has no node between the embeddings and the logits to knock out.")
        return
    charts.show(cp.minimality_bar(check), width="stretch", key="circ_minimality")
    st.caption("Minimality (Wang et al. 2022): for each node v, |F(C ∖ {v}) − F(C)|, how much the circuit's metric moves "
               "when v is knocked out of it (its outgoing edges ablated); a node near 0 adds nothing, so a minimal "
               "circuit has none (grey: under 0.05).")
    if state.get("_circ_complete_for") != cache.circuit_key(circuit):
        state["_circ_complete_for"] = cache.circuit_key(circuit)
        state["circ_complete_nodes"] = [nodes[int(check.score.argmax())]]
    chosen = st.multiselect("Knock out these nodes (K)", nodes, key="circ_complete_nodes", persist_state="session",
                            help="Completeness: the chosen nodes are ablated in the circuit and in the whole model.")
    try:
        with st.spinner("Knocking the nodes out of the circuit and of the whole model…"):
            comp = cache.completeness(model, task, ablation, circuit, ((), tuple(chosen)))
    except CircuitError as err:
        st.warning(ui.md_escape(str(err)))
        return
    named = ", ".join(chosen) if chosen else "nothing"
    unit = "of the gap" if comp.normaliser.meaningful else f"in {task.metric_label}"
    c1, c2, c3 = st.columns(3)
    c1.metric(f"Circuit without {named}", f"{float(comp.circuit_metric[1]):+.3f}", help="F(C ∖ K): the task metric.")
    c2.metric(f"Whole model without {named}", f"{float(comp.model_metric[1]):+.3f}", help="F(M ∖ K): the task metric.")
    c3.metric("Incompleteness |F(C ∖ K) − F(M ∖ K)|", f"{float(comp.score[1]):.3f}", help=f"{unit}; with K empty: "
              f"{float(comp.score[0]):.3f} (1 − faithfulness, in absolute value).")
    st.caption(f"Completeness (Wang et al. 2022): knock K = {{{named}}} out of both the circuit C and the whole model M; "
               "if the circuit is complete the two still agree, so |F(C ∖ K) − F(M ∖ K)| stays near 0 — a large value "
               f"means the model does something without those nodes that the circuit misses ({unit}).")


if detail == "paths":
    paths_view()
elif detail == "weights":
    weights_view()
elif detail == "compare":
    compare_view()
else:
    mechanism_view()
ui.sidebar_footer()
