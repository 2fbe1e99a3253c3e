"""Pure figure builders: data in, plotly Figure or CircuitsVis HTML out.

Every token label is HTML-escaped: plotly renders a subset of HTML in labels and hover text,
and a prompt may contain markup that must show as text. The CircuitsVis HTML escapes `<`, `>`
and `&` inside its JSON props so a token can never close the script block it sits in.
"""
from __future__ import annotations

import html
import json
import re
from typing import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

HEAT = "Blues"


def safe(text: str) -> str:
    """A token as plotly-safe text: HTML escaped, whitespace made visible."""
    return html.escape(text.replace("\n", "\\n"), quote=True)


FONT = 14  # px: axis ticks, labels and hover text, legible on a projector
TITLE_FONT = 17


def legible(build):
    """Decorator for figure builders: fonts a room can read (Streamlit's defaults are 10–12 px)."""
    import functools

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        fig = build(*args, **kwargs)
        # Streamlit's chart theme sets the axes' and colour bars' fonts itself, so each is set here.
        fig.update_layout(font=dict(size=FONT), title_font=dict(size=TITLE_FONT), hoverlabel=dict(font_size=FONT),
                          legend=dict(font=dict(size=FONT)))
        fig.update_xaxes(tickfont=dict(size=FONT), title_font=dict(size=FONT))
        fig.update_yaxes(tickfont=dict(size=FONT), title_font=dict(size=FONT))
        for trace in fig.data:
            if "colorbar" in trace and trace.type in ("heatmap", "contour", "histogram2d"):
                trace.colorbar.tickfont = dict(size=FONT)
                trace.colorbar.title.font = dict(size=FONT)
        return fig

    return wrapper


def metric_delta(change: float, digits: int = 3) -> str | None:
    """A st.metric delta shown to `digits` decimals, or None (no arrow) for a change that rounds to
    zero: "-0.000" with a red down arrow says something changed when nothing did."""
    return None if round(abs(change), digits) == 0 else f"{change:+.{digits}f}"


def position_labels(str_tokens: Sequence[str]) -> list[str]:
    """Unique axis labels `pos: token` (plotly merges equal category labels)."""
    return [f"{i}: {safe(t)}" for i, t in enumerate(str_tokens)]


def _hover_tokens(str_tokens: Sequence[str]) -> list[str]:
    return [safe(t) for t in str_tokens]


@legible
def pattern_heatmap(pattern: torch.Tensor, str_tokens: Sequence[str], title: str) -> go.Figure:
    """One head's attention pattern. pattern: [q_pos, k_pos] probabilities."""
    labels = position_labels(str_tokens)
    toks = _hover_tokens(str_tokens)
    n = len(toks)
    custom = [[[toks[q], toks[k]] for k in range(n)] for q in range(n)]
    fig = go.Figure(
        go.Heatmap(
            z=pattern.float().cpu().numpy(),
            x=labels,
            y=labels,
            customdata=custom,
            colorscale=HEAT,
            zmin=0.0,
            zmax=1.0,
            colorbar=dict(title="attention"),
            hovertemplate="query %{y}<br>key %{x}<br>query token: %{customdata[0]}"
            "<br>key token: %{customdata[1]}<br>attention: %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=dict(text=title, automargin=True, yref="container", y=1, yanchor="top", pad=dict(t=8)),
        # Key tokens along the top, as CircuitsVis has them: on a 720 px screen the bottom of a
        # long prompt's pattern is below the fold, the top never is.
        xaxis=dict(title="key (attended-to) position", tickangle=-60, type="category", side="top"),
        yaxis=dict(title="query position", autorange="reversed", type="category"),
        height=max(420, 18 * n + 160),
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


GRID_MAX_CELLS = 48  # thumbnails of longer prompts are average-pooled to this many positions


def _bins(n: int, m: int) -> list[tuple[int, int]]:
    """The [start, end) positions that adaptive average pooling puts in each of m bins."""
    return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


@legible
def all_heads_grid(patterns: torch.Tensor, str_tokens: Sequence[str], selected: tuple[int, int] | None = None) -> go.Figure:
    """Small multiples of every head in one heatmap trace. patterns: [layer, head, q_pos, k_pos].

    One trace, not one subplot per head: plotly takes seconds to build 144 subplots. Panels are
    separated by blank (NaN) rows and columns; prompts longer than GRID_MAX_CELLS tokens are
    average-pooled per panel (hover then names the position range). A near-invisible marker at
    each panel's centre is the click target (customdata [layer, head]): heatmaps cannot be
    selected in plotly, markers can.
    """
    n_layers, n_heads, n, _ = patterns.shape
    m = min(n, GRID_MAX_CELLS)
    pats = patterns.float().cpu()
    if m < n:
        pats = torch.nn.functional.adaptive_avg_pool2d(pats.reshape(-1, n, n), m).reshape(n_layers, n_heads, m, m)
    toks = _hover_tokens(str_tokens)
    names = [f"{a}: {toks[a]}" if b - a == 1 else f"{a}–{b - 1}" for a, b in _bins(n, m)]
    step = m + 1
    # Every row and column gets its own category label (head/layer + position: token), so
    # hover reads them from the axes and the figure carries no per-cell text.
    x = [f"H{h} key {names[k]}" if k < m else f"gap H{h}" for h in range(n_heads) for k in range(step)][:-1]
    y = [f"L{l} query {names[q]}" if q < m else f"gap L{l}" for l in range(n_layers) for q in range(step)][:-1]
    z = torch.full((len(y), len(x)), float("nan"))
    for layer in range(n_layers):
        for head in range(n_heads):
            z[layer * step : layer * step + m, head * step : head * step + m] = pats[layer, head]
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(), x=x, y=y, colorscale=HEAT, zmin=0, zmax=1, hoverongaps=False,
            colorbar=dict(title="attention"),
            hovertemplate="%{y}<br>%{x}<br>attention: %{z:.4f}<extra></extra>",
        )
    )
    mid = (m - 1) // 2
    centres = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    fig.add_trace(
        go.Scatter(
            x=[x[h * step + mid] for _, h in centres], y=[y[l * step + mid] for l, _ in centres],
            mode="markers", marker=dict(size=28, opacity=0.01, symbol="square", color="grey"),
            customdata=[[l, h] for l, h in centres], name="open head", hoverinfo="none", showlegend=False,
        )
    )
    if selected is not None:
        layer, head = selected
        fig.add_shape(type="rect", x0=head * step - 0.5, x1=head * step + m - 0.5, y0=layer * step - 0.5,
                      y1=layer * step + m - 0.5, line=dict(color="crimson", width=2))
    fig.update_xaxes(type="category", tickvals=[x[h * step + mid] for h in range(n_heads)],
                     ticktext=[f"H{h}" for h in range(n_heads)], side="top", fixedrange=True, showgrid=False)
    fig.update_yaxes(type="category", tickvals=[y[l * step + mid] for l in range(n_layers)],
                     ticktext=[f"L{l}" for l in range(n_layers)], autorange="reversed", fixedrange=True, showgrid=False)
    fig.update_layout(
        height=max(260, min(1100, 70 * n_layers + 120)), margin=dict(l=10, r=10, t=30, b=10),
        clickmode="event+select", plot_bgcolor="white",
    )
    return fig


def clicked_head(event, n_layers: int, n_heads: int) -> tuple[int, int] | None:
    """(layer, head) of the panel clicked in `all_heads_grid`, from st.plotly_chart's selection event."""
    points = ((event or {}).get("selection") or {}).get("points") or []
    for point in points:
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) == 2:
            layer, head = int(data[0]), int(data[1])
            if 0 <= layer < n_layers and 0 <= head < n_heads:
                return layer, head
    return None


@legible
def head_score_heatmap(scores: torch.Tensor, title: str, selected: tuple[int, int] | None = None) -> go.Figure:
    """A [layer, head] grid of scores in [0, 1] with hover `L.H` notation."""
    n_layers, n_heads = scores.shape
    text = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)]
    fig = go.Figure(
        go.Heatmap(
            z=scores.float().cpu().numpy(),
            x=[f"H{h}" for h in range(n_heads)],
            y=[f"L{l}" for l in range(n_layers)],
            customdata=text,
            text=[[f"{float(v):.2f}" for v in row] for row in scores],
            texttemplate="%{text}" if n_layers * n_heads <= 64 else None,  # unreadable on big grids
            textfont=dict(size=14),
            colorscale=HEAT,
            zmin=0,
            zmax=1,
            colorbar=dict(title="score"),
            hovertemplate="%{customdata}<br>score: %{z:.4f}<extra></extra>",
        )
    )
    if selected is not None:
        layer, head = selected
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5, line=dict(color="crimson", width=3))
    fig.update_layout(
        title=title,
        xaxis_title="head",
        yaxis=dict(title="layer", autorange="reversed"),
        height=max(260, 130 + 55 * n_layers),
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


@legible
def residual_norm_heatmap(norms: torch.Tensor, str_tokens: Sequence[str]) -> go.Figure:
    """Residual-stream L2 norm. norms: [n_layers + 1, pos] (resid_pre of each layer, then final)."""
    n_rows = norms.shape[0]
    rows = [f"resid_pre {l}" for l in range(n_rows - 1)] + [f"resid_post {n_rows - 2}"]
    toks = _hover_tokens(str_tokens)
    fig = go.Figure(
        go.Heatmap(
            z=norms.float().cpu().numpy(),
            x=position_labels(str_tokens),
            y=rows,
            customdata=[toks for _ in rows],
            colorscale="Viridis",
            colorbar=dict(title="‖x‖₂"),
            hovertemplate="%{y}<br>position %{x}<br>token: %{customdata}<br>norm: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis=dict(title="position: token", tickangle=-60, type="category"),
        yaxis=dict(title="residual stream", autorange="reversed"),
        height=160 + 40 * n_rows,
        margin=dict(l=10, r=10, t=20, b=10),
    )
    return fig


@legible
def composition_bar(rows: Sequence, head_label: str) -> go.Figure:
    """Induction score and repeated-half loss after ablating each input (q/k/v) of a head."""
    names = ["no ablation" if r.on == "none" else f"ablate on {r.on.upper()}" for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"{head_label} induction score", "repeated-half loss (nats)"))
    fig.add_trace(go.Bar(x=names, y=[r.target_score for r in rows], name="score",
                         hovertemplate="%{x}<br>score: %{y:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[r.loss for r in rows], name="loss",
                         hovertemplate="%{x}<br>loss: %{y:.4f} nats<extra></extra>"), row=1, col=2)
    fig.update_yaxes(range=[0, 1], row=1, col=1)
    fig.update_layout(showlegend=False, height=320, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def induction_models(rows: Sequence[dict]) -> go.Figure:
    """Models side by side (rows of `attention.induction_strength`): the strongest induction head's
    score, and the loss on the first (random) and the repeated half of the same sequences."""
    names = [r["model"] for r in rows]
    sizes = [f"{r['model']}<br>{r['parameters']:,} parameters, {r['layers']} layers" for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("strongest induction head's score", "loss per token (nats)"))
    fig.add_trace(go.Bar(x=names, y=[r["score"] for r in rows], name="induction score", customdata=[
        [size, r["head"]] for size, r in zip(sizes, rows)], text=[r["head"] for r in rows], textposition="outside",
        hovertemplate="%{customdata[0]}<br>head %{customdata[1]}: score %{y:.3f}<extra></extra>"), row=1, col=1)
    for key, label in (("first_half_loss", "first half (random)"), ("repeated_half_loss", "repeated half")):
        fig.add_trace(go.Bar(x=names, y=[r[key] for r in rows], name=label, customdata=sizes,
                             hovertemplate="%{customdata}<br>" + label + ": %{y:.3f} nats<extra></extra>"), row=1, col=2)
    fig.update_yaxes(range=[0, 1.1], title_text="score", row=1, col=1)
    fig.update_yaxes(title_text="nats", row=1, col=2)
    fig.update_layout(barmode="group", height=380, margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _script_safe_json(value) -> str:
    """JSON that cannot end a <script> element or open a comment inside one."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def circuitsvis_attention_html(str_tokens: Sequence[str], patterns: torch.Tensor, head_names: Sequence[str],
                               first: int = 0) -> str:
    """CircuitsVis `attention_heads` view with its JavaScript inlined (works offline).

    patterns: [head, q_pos, k_pos]. CircuitsVis's default HTML loads its script from a CDN;
    `local_src` inlines it. We write the call that draws the view ourselves:
    - its props as script-safe JSON (tokens are user text; CircuitsVis (React) shows them as text);
    - head `first` first, with its name, because CircuitsVis always opens enlarged on its first head;
    - drawn once the frame has a width: inside a hidden tab the frame is 0 px wide when it loads,
      and CircuitsVis sized its enlarged head to 0 × 0 for good.
    """
    import circuitsvis.attention as cva

    order = [first] + [h for h in range(patterns.shape[0]) if h != first]
    patterns = patterns[order].float().cpu()
    names = [head_names[h] for h in order]
    src = cva.attention_heads(attention=patterns, tokens=list(str_tokens), attention_head_names=names).local_src
    match = re.search(r'<div id="([^"]+)"', src)
    head, found, _ = src.rpartition("CircuitsVis.render(")
    if match is None or not found:
        raise RuntimeError("unexpected CircuitsVis HTML layout: cannot write its render call")
    props = {"attention": patterns.tolist(), "attentionHeadNames": names, "tokens": list(str_tokens)}
    return head + f"""(function (draw) {{
      const ready = () => document.documentElement.clientWidth > 0;
      if (ready()) {{ draw(); return; }}
      const watch = new ResizeObserver(() => {{ if (ready()) {{ watch.disconnect(); draw(); }} }});
      watch.observe(document.documentElement);
    }})(() => CircuitsVis.render({_script_safe_json(match.group(1))}, CircuitsVis.AttentionHeads,
                                 {_script_safe_json(props)}));
    </script>
"""


# ---------------------------------------------------------------------------------------------
# Logit attribution
# ---------------------------------------------------------------------------------------------

DIVERGING = "RdBu"


def _component_name(label: str) -> str:
    """TransformerLens stack labels as readers say them: "0_attn_out" -> "L0 attn"."""
    if label in ("embed", "pos_embed"):
        return label
    if label.endswith("_attn_out") or label.endswith("_mlp_out"):
        layer, kind = label.split("_")[:2]
        return f"L{layer} {kind}"
    if label.endswith("_pre") or label.endswith("_mid") or label.endswith("_post"):
        layer, kind = label.rsplit("_", 1)
        return f"{kind} {layer}" if layer != "final" else "final"
    return label


@legible
def attribution_bar(labels: Sequence[str], values: torch.Tensor, target_label: str, title: str) -> go.Figure:
    """Direct contribution of each component, in residual-stream order. values: [component]."""
    names = [_component_name(l) for l in labels]
    vals = values.float().cpu().tolist()
    fig = go.Figure(
        go.Bar(
            x=names, y=vals, marker_color=["#2166ac" if v >= 0 else "#b2182b" for v in vals],
            customdata=list(labels),
            hovertemplate="%{x} (%{customdata})<br>contribution: %{y:+.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title, xaxis=dict(title="component (residual-stream order)", type="category"),
        yaxis_title=f"direct effect on {safe(target_label)}", height=380, margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


@legible
def head_attribution_heatmap(grid: torch.Tensor, target_label: str, title: str,
                             selected: tuple[int, int] | None = None) -> go.Figure:
    """[layer, head] direct contributions on a diverging scale centred at 0; a click target per head."""
    n_layers, n_heads = grid.shape
    z = grid.float().cpu()
    bound = float(z.abs().max()) or 1.0
    names = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)]
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(), x=[f"H{h}" for h in range(n_heads)], y=[f"L{l}" for l in range(n_layers)],
            customdata=names, colorscale=DIVERGING, zmid=0, zmin=-bound, zmax=bound,
            text=[[f"{float(v):+.2f}" for v in row] for row in z],
            texttemplate="%{text}" if n_layers * n_heads <= 64 else None, textfont=dict(size=13),
            colorbar=dict(title="logit"),
            hovertemplate="%{customdata}<br>direct effect on " + safe(target_label) + ": %{z:+.4f}<extra></extra>",
        )
    )
    # Heatmap cells cannot be selected in plotly; near-invisible markers can (customdata [layer, head]).
    fig.add_trace(
        go.Scatter(
            x=[f"H{h}" for l in range(n_layers) for h in range(n_heads)],
            y=[f"L{l}" for l in range(n_layers) for h in range(n_heads)],
            mode="markers", marker=dict(size=30, opacity=0.01, symbol="square", color="grey"),
            customdata=[[l, h] for l in range(n_layers) for h in range(n_heads)],
            hoverinfo="none", showlegend=False, name="open head",
        )
    )
    if selected is not None:
        layer, head = selected
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line=dict(color="black", width=3))
    fig.update_layout(
        title=title, xaxis=dict(title="head", type="category"),
        yaxis=dict(title="layer", autorange="reversed", type="category"),
        height=max(260, 130 + 55 * n_layers), margin=dict(l=10, r=10, t=50, b=10), clickmode="event+select",
    )
    return fig


@legible
def accumulated_line(labels: Sequence[str], values: torch.Tensor, target_label: str) -> go.Figure:
    """The target read off the residual stream before each layer and after the last. values: [layer+1]."""
    names = [_component_name(l) for l in labels]
    fig = go.Figure(
        go.Scatter(x=names, y=values.float().cpu().tolist(), mode="lines+markers",
                   hovertemplate="%{x}<br>" + safe(target_label) + ": %{y:+.4f}<extra></extra>")
    )
    fig.update_layout(
        xaxis=dict(title="residual stream", type="category"), yaxis_title=safe(target_label),
        height=340, margin=dict(l=10, r=10, t=20, b=10),
    )
    return fig


@legible
def logit_lens_heatmap(labels: Sequence[str], top_tokens: Sequence[Sequence[Sequence[str]]], top_probs: torch.Tensor,
                       str_tokens: Sequence[str]) -> go.Figure:
    """Layer x position: colour = probability of the top token, text = that token, hover = top k.

    top_tokens: [layer][pos][k] decoded tokens; top_probs: [layer, pos, k].
    """
    n_layers, n_pos, k = top_probs.shape
    rows = [_component_name(l) for l in labels]
    probs = top_probs.float().cpu()
    hover = [
        [
            "<br>".join(f"{safe(top_tokens[l][p][j])}: {float(probs[l, p, j]):.3f}" for j in range(k))
            for p in range(n_pos)
        ]
        for l in range(n_layers)
    ]
    toks = _hover_tokens(str_tokens)
    fig = go.Figure(
        go.Heatmap(
            z=probs[:, :, 0].numpy(), x=position_labels(str_tokens), y=rows, colorscale=HEAT, zmin=0, zmax=1,
            text=[[safe(top_tokens[l][p][0]) for p in range(n_pos)] for l in range(n_layers)],
            texttemplate="%{text}" if n_pos <= 40 else None, textfont=dict(size=13),
            customdata=[[[toks[p], hover[l][p]] for p in range(n_pos)] for l in range(n_layers)],
            colorbar=dict(title="top-1 prob"),
            hovertemplate="%{y}, position %{x}<br>input token: %{customdata[0]}<br>top next tokens:<br>"
            "%{customdata[1]}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis=dict(title="position: input token (cells: most likely next token)", tickangle=-60, type="category"),
        yaxis=dict(title="residual stream", autorange="reversed", type="category"),
        height=170 + 45 * n_layers, margin=dict(l=10, r=10, t=20, b=10),
    )
    return fig


@legible
def answer_by_layer(labels: Sequence[str], prob: torch.Tensor, rank: torch.Tensor, answer: str) -> go.Figure:
    """Probability (left axis) and rank (right axis) of the answer token per layer. prob, rank: [layer]."""
    names = [_component_name(l) for l in labels]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=names, y=prob.float().cpu().tolist(), mode="lines+markers", name="probability",
                             hovertemplate="%{x}<br>P(" + safe(answer) + ") = %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=names, y=rank.cpu().tolist(), mode="lines+markers", name="rank", line=dict(dash="dot"),
                             hovertemplate="%{x}<br>rank of " + safe(answer) + ": %{y}<extra></extra>"),
                  secondary_y=True)
    fig.update_yaxes(title_text=f"P({safe(answer)})", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="rank (0 = top)", secondary_y=True, rangemode="tozero")
    fig.update_layout(xaxis=dict(title="residual stream", type="category"), height=340,
                      margin=dict(l=10, r=10, t=20, b=10), legend=dict(orientation="h"))
    return fig


@legible
def neuron_bar(neurons: Sequence[int], values: Sequence[float], activations: Sequence[float],
               top_tokens: Sequence[str], layer: int, target_label: str) -> go.Figure:
    """The neurons of one MLP layer with the largest direct effect, with their top promoted tokens."""
    fig = go.Figure(
        go.Bar(
            x=[f"N{n}" for n in neurons], y=list(values),
            marker_color=["#2166ac" if v >= 0 else "#b2182b" for v in values],
            customdata=[[f"{a:+.4f}", safe(t)] for a, t in zip(activations, top_tokens)],
            hovertemplate="L" + str(layer) + " %{x}<br>direct effect: %{y:+.4f}<br>activation: %{customdata[0]}"
            "<br>promotes: %{customdata[1]}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis=dict(title=f"neuron of MLP {layer}", type="category"), yaxis_title=f"direct effect on {safe(target_label)}",
        height=360, margin=dict(l=10, r=10, t=20, b=10),
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Head importance (patching, ablation, attribution patching)
# ---------------------------------------------------------------------------------------------


@legible
def importance_heatmap(values: torch.Tensor, y_labels: Sequence[str], x_labels: Sequence[str], title: str,
                       value_label: str, hover: Sequence[Sequence[str]] | None = None,
                       heads: Sequence[Sequence[tuple[int, int]]] | None = None, centre: float = 0.0) -> go.Figure:
    """A diverging heatmap centred at `centre` (0 for the normalised metric). values: [y, x].

    `x_labels`/`y_labels` must be unique (plotly merges equal categories); `hover` gives each
    cell's description (already escaped); `heads` gives each cell's (layer, head), which makes the
    cells clickable (near-invisible markers carry customdata [layer, head], as in
    `head_attribution_heatmap`).
    """
    z = values.float().cpu()
    n_y, n_x = z.shape
    bound = float((z - centre).abs().max()) or 1.0
    text = hover if hover is not None else [[f"{y_labels[i]}, {x_labels[j]}" for j in range(n_x)] for i in range(n_y)]
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(), x=list(x_labels), y=list(y_labels), customdata=text,
            colorscale=DIVERGING, zmid=centre, zmin=centre - bound, zmax=centre + bound,
            text=[[f"{float(v):+.2f}" for v in row] for row in z],
            texttemplate="%{text}" if n_x * n_y <= 64 else None, textfont=dict(size=13),
            colorbar=dict(title=value_label),
            hovertemplate="%{customdata}<br>" + safe(value_label) + ": %{z:+.4f}<extra></extra>",
        )
    )
    if heads is not None:
        fig.add_trace(
            go.Scatter(
                x=[x_labels[j] for i in range(n_y) for j in range(n_x)],
                y=[y_labels[i] for i in range(n_y) for j in range(n_x)],
                mode="markers", marker=dict(size=max(8, min(30, 600 // max(n_x, n_y))), opacity=0.01, symbol="square", color="grey"),
                customdata=[list(heads[i][j]) for i in range(n_y) for j in range(n_x)],
                hoverinfo="none", showlegend=False, name="open head",
            )
        )
    fig.update_layout(
        title=title, xaxis=dict(type="category"), yaxis=dict(autorange="reversed", type="category"),
        height=max(280, 140 + min(22, max(14, 420 // n_y)) * n_y), margin=dict(l=10, r=10, t=50, b=10),
        clickmode="event+select",
    )
    return fig


@legible
def exact_vs_attribution(exact: torch.Tensor, approx: torch.Tensor, names: Sequence[str], title: str) -> go.Figure:
    """Scatter: exact patching (x) against attribution patching (y), both normalised; y = x for reference."""
    x, y = exact.float().flatten().tolist(), approx.float().flatten().tolist()
    lo, hi = min(x + y + [0.0]), max(x + y + [1.0])
    fig = go.Figure(
        [
            go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="grey", dash="dot"), name="y = x",
                       hoverinfo="skip"),
            go.Scatter(x=x, y=y, mode="markers", marker=dict(size=7, color="#2166ac", opacity=0.7), name="component",
                       customdata=[safe(n) for n in names],
                       hovertemplate="%{customdata}<br>exact: %{x:+.4f}<br>attribution: %{y:+.4f}<extra></extra>"),
        ]
    )
    fig.update_layout(
        title=title, xaxis_title="activation patching (exact), normalised metric",
        yaxis_title="attribution patching (linear estimate)", height=420, margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


@legible
def ablation_bar(names: Sequence[str], metric: Sequence[float], loss: Sequence[float], title: str,
                 raw_label: str | None = None) -> go.Figure:
    """Components' ablation effects: the normalised task metric (bars) and the loss change (hover).

    raw_label: when the task's normalised metric is not meaningful, `metric` is the change in the
    raw metric from the clean run, named by this label.
    """
    if raw_label is None:
        colours = ["#2166ac" if v >= 0.5 else "#b2182b" for v in metric]
        value, axis = "task metric after ablation: %{y:+.4f} (1 = clean, 0 = corrupted)", "task metric (1 = clean, 0 = corrupted)"
    else:
        colours = ["#2166ac" if v >= 0 else "#b2182b" for v in metric]
        value, axis = f"{safe(raw_label)}: %{{y:+.4f}}", raw_label
    fig = go.Figure(
        go.Bar(
            x=list(names), y=list(metric), customdata=[f"{l:+.4f}" for l in loss], marker_color=colours,
            hovertemplate="%{x}<br>" + value + "<br>loss change: %{customdata} nats<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis=dict(type="category"), yaxis_title=axis,
                      height=360, margin=dict(l=10, r=10, t=50, b=10))
    return fig


# ---------------------------------------------------------------------------------------------
# SAE features
# ---------------------------------------------------------------------------------------------


@legible
def prompt_features_heatmap(acts: torch.Tensor, str_tokens: Sequence[str], features: Sequence[int]) -> go.Figure:
    """Features (rows) × prompt positions (columns) of SAE activations. acts: [pos, n_features].

    Each cell carries its feature id as customdata, so a click opens that feature.
    """
    z = acts.float().cpu().T  # [feature, pos]
    x = position_labels(str_tokens)
    y = [f"feature {f}" for f in features]
    hover = [[f"feature {f}<br>{x[p]}" for p in range(len(x))] for f in features]
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(), x=x, y=y, customdata=hover, colorscale=HEAT, zmin=0,
            colorbar=dict(title="activation"),
            hovertemplate="%{customdata}<br>activation: %{z:.4f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[x[p] for _ in features for p in range(len(x))], y=[y[i] for i in range(len(features)) for _ in x],
            mode="markers", marker=dict(size=max(8, min(24, 600 // max(len(x), len(features)))), opacity=0.01,
                                        symbol="square", color="grey"),
            customdata=[[int(f)] for f in features for _ in x], hoverinfo="none", showlegend=False, name="open feature",
        )
    )
    fig.update_layout(
        title="Strongest SAE features at each token (click one to open it)",
        xaxis=dict(type="category"), yaxis=dict(autorange="reversed", type="category"),
        height=max(260, 120 + 20 * len(features)), margin=dict(l=10, r=10, t=50, b=10), clickmode="event+select",
    )
    return fig


def clicked_feature(event) -> int | None:
    """The feature id of a click on `prompt_features_heatmap`, if any."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    for p in points:
        data = p.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) == 1:
            return int(data[0])
    return None


@legible
def activation_histogram(edges: Sequence[float], counts: Sequence[int], feature: int, density: float) -> go.Figure:
    """Bars of the non-zero activations' histogram (bins over [0, max])."""
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = (edges[1] - edges[0]) if len(edges) > 1 else 1.0
    ranges = [f"{a:.3f} – {b:.3f}" for a, b in zip(edges[:-1], edges[1:])]
    fig = go.Figure(go.Bar(x=centres, y=list(counts), width=width, customdata=ranges, marker_color="#4c78a8",
                           hovertemplate="activation %{customdata}<br>%{y} tokens<extra></extra>",
                           name=f"fires on {density:.3%} of tokens"))
    fig.update_layout(
        title=f"Feature {feature}: activation histogram",
        xaxis_title="activation", yaxis_title="tokens", height=280, margin=dict(l=10, r=10, t=50, b=10), bargap=0,
    )
    return fig


@legible
def logit_effect_bars(tokens: Sequence[str], values: Sequence[float], title: str, colour: str) -> go.Figure:
    """Horizontal bars of a feature's direct logit effect on some tokens."""
    labels = [f"{i + 1}. {safe(t)}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Bar(x=list(values), y=labels, orientation="h", marker_color=colour,
                           customdata=[safe(t) for t in tokens],
                           hovertemplate="token %{customdata}<br>logit effect %{x:+.4f}<extra></extra>"))
    fig.update_layout(title=title, yaxis=dict(autorange="reversed", type="category"), xaxis_title="logit effect",
                      height=max(220, 90 + 28 * len(tokens)), margin=dict(l=10, r=10, t=50, b=10))  # a row per label at 14 px
    return fig


def tinted_tokens_html(str_tokens: Sequence[str], acts: Sequence[float], max_act: float,
                       mark: int | None = None) -> str:
    """Tokens as HTML spans tinted by activation (0 → white, max_act → full orange); the token at
    `mark` is outlined. Every token is escaped: markup in a prompt shows as text."""
    top = max_act if max_act > 0 else 1.0
    spans = []
    for i, (t, a) in enumerate(zip(str_tokens, acts)):
        alpha = max(0.0, min(1.0, float(a) / top))
        style = f"background: rgba(255, 140, 0, {alpha:.3f}); padding: 1px 2px; border-radius: 3px;"
        if i == mark:
            style += " outline: 2px solid #d62728;"
        title = html.escape(f"{t!r}: {float(a):.4f}", quote=True)
        spans.append(f'<span title="{title}" style="{style}">{html.escape(t)}</span>')
    return '<div style="line-height: 1.9; font-family: monospace;">' + " ".join(spans) + "</div>"


# ---------------------------------------------------------------------------------------------
# Steering
# ---------------------------------------------------------------------------------------------


@legible
def distribution_shift_bars(tokens: Sequence[str], before: Sequence[float], after: Sequence[float], title: str) -> go.Figure:
    """Grouped bars: next-token probabilities without and with steering."""
    labels = [f"{i + 1}. {safe(t)}" for i, t in enumerate(tokens)]
    fig = go.Figure()
    for name, values, colour in (("unsteered", before, "#9ecae1"), ("steered", after, "#e6550d")):
        fig.add_trace(go.Bar(x=labels, y=list(values), name=name, marker_color=colour,
                             hovertemplate="%{x}<br>" + name + ": %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, barmode="group", yaxis_title="probability", xaxis=dict(type="category"),
                      height=320, margin=dict(l=10, r=10, t=50, b=10))
    return fig


@legible
def monitor_lines(str_tokens: Sequence[str], projections: Sequence[Sequence[float]], names: Sequence[str],
                  thresholds: Sequence[float], tripped: Sequence[int | None], prompt_len: int) -> go.Figure:
    """One line per watched direction: projection per token; dashed threshold; a marker where it tripped."""
    x = position_labels(str_tokens)
    fig = go.Figure()
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for i, (proj, name, thr) in enumerate(zip(projections, names, thresholds)):
        c = colours[i % len(colours)]
        n = len(proj)
        fig.add_trace(go.Scatter(x=x[:n], y=list(proj), mode="lines+markers", name=safe(name), line=dict(color=c),
                                 hovertemplate="%{x}<br>projection %{y:.3f}<extra>" + safe(name) + "</extra>"))
        fig.add_trace(go.Scatter(x=[x[0], x[max(0, n - 1)]], y=[thr, thr], mode="lines", line=dict(color=c, dash="dash"),
                                 name=f"threshold {thr:.2f}", hoverinfo="skip"))
        if tripped[i] is not None and tripped[i] < n:
            fig.add_trace(go.Scatter(x=[x[tripped[i]]], y=[proj[tripped[i]]], mode="markers", name=f"tripped: {safe(name)}",
                                     marker=dict(symbol="x", size=16, color=c),
                                     hovertemplate="tripped here: %{x}<br>projection %{y:.3f}<extra></extra>"))
    if prompt_len < len(x):
        fig.add_vline(x=prompt_len - 0.5, line=dict(color="grey", dash="dot"))
    fig.update_layout(title="Glass-box monitor: projection of the residual stream on each watched direction",
                      xaxis=dict(type="category", title="token (the dotted line: generation starts)"),
                      yaxis_title="projection x · û", height=380, margin=dict(l=10, r=10, t=50, b=10))
    return fig


@legible
def probe_accuracy_lines(layer_names: Sequence[str], test: Sequence[float], shuffled: Sequence[float],
                         train: Sequence[float]) -> go.Figure:
    fig = go.Figure()
    for name, values, style in (("held-out accuracy", test, dict(color="#1f77b4")),
                                ("train accuracy", train, dict(color="#1f77b4", dash="dot")),
                                ("held-out, shuffled labels (control)", shuffled, dict(color="#7f7f7f"))):
        fig.add_trace(go.Scatter(x=list(layer_names), y=list(values), mode="lines+markers", name=name, line=style,
                                 hovertemplate="%{x}<br>" + name + ": %{y:.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line=dict(color="black", dash="dash"), annotation_text="chance")
    fig.update_layout(title="Linear probe accuracy by layer", yaxis=dict(range=[0, 1.05], title="accuracy"),
                      xaxis=dict(type="category"), height=340, margin=dict(l=10, r=10, t=50, b=10))
    return fig


# ---------------------------------------------------------------------------------------------
# Labelled results (core.patching.SweepResult): one call from a notebook or a page
# ---------------------------------------------------------------------------------------------


def figure(result) -> go.Figure:
    """The figure of a labelled result: a `core.patching.SweepResult` as a diverging heatmap on its
    own axes ([layer, head], [layer, pos], or head rows by position), hover naming each cell (the
    position's clean and corrupted tokens), head cells clickable (customdata [layer, head])."""
    from core.patching import SweepResult

    if not isinstance(result, SweepResult):
        raise TypeError(f"plots.figure draws a SweepResult, not {type(result).__name__}.")
    values, dims, labels = result.values, result.dims, result.labels
    layers = labels[0]
    if dims == ("layer", "head"):
        heads = labels[1]
        names = [[f"{l}{h}" for h in heads] for l in layers]
        kv = heads[0].startswith("KV")  # a key/value head serves several query heads: not clickable
        cells = None if kv else [[(i, j) for j in range(len(heads))] for i in range(len(layers))]
        return importance_heatmap(values, layers, heads, result.title, result.value_label, names, heads=cells)
    positions = [safe(p) for p in labels[1]]
    hover_pos = [safe(h) for h in result.position_hover]
    if dims == ("layer", "pos"):
        hover = [[f"{l} {hover_pos[p]}" for p in range(len(positions))] for l in layers]
        return importance_heatmap(values, layers, positions, result.title, result.value_label, hover)
    heads = labels[2]  # ("layer", "pos", "head"): rows L.H, columns positions
    grid = values.permute(0, 2, 1).reshape(len(layers) * len(heads), -1)
    rows = [f"{l}{h}" for l in layers for h in heads]
    hover = [[f"{r} {hover_pos[p]}" for p in range(len(positions))] for r in rows]
    kv = heads[0].startswith("KV")
    cells = None if kv else [[(i, j)] * len(positions) for i in range(len(layers)) for j in range(len(heads))]
    return importance_heatmap(grid, rows, positions, result.title, result.value_label, hover, heads=cells)


def head_heatmap(grid: torch.Tensor, title: str, value_label: str) -> go.Figure:
    """A [layer, head] grid of per-head numbers (ablation effects…), cells clickable as in `figure`."""
    n_layers, n_heads = grid.shape
    ys, xs = [f"L{l}" for l in range(n_layers)], [f"H{h}" for h in range(n_heads)]
    names = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)]
    cells = [[(l, h) for h in range(n_heads)] for l in range(n_layers)]
    return importance_heatmap(grid, ys, xs, title, value_label, names, heads=cells)
