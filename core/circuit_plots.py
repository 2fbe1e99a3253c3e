"""Figures of the Circuits page: the circuit graph (plotly and a standalone SVG), the faithfulness
curve, path-patching, composition and copying heatmaps, estimate-vs-exact and minimality charts.

Pure: plotly, torch and `core` only (no Streamlit). Every label that could hold user text (a model
name typed as a path, a token) is escaped: HTML-escaped for plotly (`plots.safe`), XML-escaped in
the SVG (`xml.sax.saxutils`).

The graph's layout (`graph_layout`), shared by the plotly figure and the SVG: columns left to right
are the embeddings, each layer's heads, that layer's MLP (if any), and the logits; a head sits at
the height of its index, the MLPs in a row below the heads, the embeddings and the logits in the
middle. An edge into a head ends at one of three ports to the head's left (query above, key level,
value below) and is drawn solid / dashed / dotted for q / k / v; edges into an MLP or the logits
end at the node. An edge that would run through another node curves around it (`edge_path`). Width and colour follow the
signed score (blue: the edge supports the clean behaviour, red: it works against it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence
from xml.sax.saxutils import escape, quoteattr

import plotly.graph_objects as go
import torch
from plotly.colors import sample_colorscale

from core.plots import DIVERGING, FONT, TITLE_FONT, importance_heatmap, legible, safe

MAX_EDGES = 60  # edges drawn at most (the strongest by |score|); the rest are summed up in a caption
PORTS = {"q": -0.26, "k": 0.0, "v": 0.26}  # a head's input ports: vertical offset (y grows downwards)
PORT_DX = 0.22  # ports sit this far left of the head
DASH = {"q": "solid", "k": "dash", "v": "dot", "in": "solid"}
SVG_DASH = {"q": None, "k": "9 5", "v": "2 4", "in": None}
INPUT_NAMES = {"q": "query input", "k": "key input", "v": "value input", "in": "input"}
# Diverging, but never white: a weak edge stays visible on a white background.
EDGE_SCALE = [[0.0, "#67001f"], [0.4999, "#f4a582"], [0.5, "#b0b0b0"], [0.5001, "#92c5de"], [1.0, "#053061"]]
NODE_COLOUR = {"head": "#4c78a8", "mlp": "#e0a030", "embed": "#54a24b", "logits": "#7f3c8d"}
INACTIVE = "#d9d9d9"


# ---------------------------------------------------------------------------------------------
# Layout and the edges to draw
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where every node of a graph is drawn: data coordinates (x: column, y: head index, down)."""

    pos: dict  # node name -> (x, y)
    columns: list  # [(x, label)] column labels
    n_heads: int
    mlp_row: float | None = None  # the MLPs' row, below the heads (None: no MLPs)

    @property
    def x_range(self) -> tuple[float, float]:
        xs = [x for x, _ in self.pos.values()]
        return min(xs) - 0.45, max(xs) + 0.5

    @property
    def y_range(self) -> tuple[float, float]:
        bottom = self.n_heads - 0.25 if self.mlp_row is None else self.mlp_row + 0.45
        return -0.75, bottom


MLP_GAP = 0.85  # the MLPs' row sits this far below the last head's: the MLP chain runs clear of every head


def graph_layout(graph) -> Layout:
    """The layered layout of a `core.circuits.Graph`: the embeddings, each layer's heads (one row per
    head index) and its MLP (in a row of their own below the heads), the logits."""
    mid = (graph.n_heads - 1) / 2
    mlp_row = graph.n_heads - 1 + MLP_GAP if graph.has_mlp else None
    pos = {"embed": (0.0, mid)}
    columns = [(0.0, "embed")]
    x = 0.0
    for layer in range(graph.n_layers):
        x += 1
        for h in range(graph.n_heads):
            pos[f"L{layer}H{h}"] = (x, float(h))
        columns.append((x, f"L{layer} heads"))
        if graph.has_mlp:
            x += 1
            pos[f"L{layer} MLP"] = (x, mlp_row)
            columns.append((x, f"L{layer} MLP"))
    x += 1
    pos["logits"] = (x, mid)
    columns.append((x, "logits"))
    return Layout(pos, columns, graph.n_heads, mlp_row)


def receiver(graph, down: str) -> tuple[str, str]:
    """(node drawn, port) of a downstream input: "L1H1.k" -> ("L1H1", "k"), "L0 MLP" -> ("L0 MLP", "in").

    A grouped key/value input ("L1KV0.k") is drawn at the first query head of its group.
    """
    if down == "logits" or down.endswith(" MLP"):
        return down, "in"
    node, port = down.split(".")
    if "KV" in node:
        layer, kv = node[1:].split("KV")
        group = graph.n_heads // graph.n_kv_heads
        return f"L{layer}H{int(kv) * group}", port
    return node, port


def head_of(name: str) -> tuple[int, int] | None:
    """(layer, head) of a head node "L0H3"; None for the embeddings, an MLP or the logits."""
    if name in ("embed", "logits") or name.endswith(" MLP") or "H" not in name:
        return None
    layer, head = name[1:].split("H")
    return int(layer), int(head)


def describe_edge(up: str, down: str) -> str:
    """ "L0H3 → L1H1 (key input)", "L1H1 → logits", "embed → L0 MLP (input)"."""
    if down == "logits":
        return f"{up} → logits"
    node, port = (down, "in") if down.endswith(" MLP") else down.split(".")
    return f"{up} → {node} ({INPUT_NAMES[port]})"


def _score(value) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v


def drawn_edges(circuit, max_edges: int = MAX_EDGES) -> list[tuple[str, str, float | None]]:
    """The circuit's edges to draw: at most `max_edges`, the largest |score| first (unscored last)."""
    edges = [(e["from"], e["to"], e["score"]) for e in circuit.edge_list()]
    edges.sort(key=lambda e: -abs(e[2]) if e[2] is not None else math.inf)
    return edges[:max_edges]


def score_phrase(value: float | None, scores) -> str:
    """An edge's score in words: "+0.57 of the clean − corrupted gap" (or raw units, or ACDC's drop)."""
    if value is None:
        return "not measured"
    if scores.normalised:
        return f"{value:+.3f} of the clean − corrupted gap"
    return f"{value:+.3f} in {scores.metric_label} (raw: the task's gap is too small to normalise)"


def hidden_summary(circuit, max_edges: int = MAX_EDGES) -> str | None:
    """The caption for the edges not drawn ("+ 34 more edges, |score| ≤ 0.01, together +0.05 …"), or None."""
    edges = [(e["from"], e["to"], e["score"]) for e in circuit.edge_list()]
    if len(edges) <= max_edges:
        return None
    edges.sort(key=lambda e: -abs(e[2]) if e[2] is not None else math.inf)
    rest = edges[max_edges:]
    values = [s for _, _, s in rest if s is not None]
    unit = "of the gap" if circuit.scores.normalised else f"in {circuit.scores.metric_label}"
    if not values:
        return f"+ {len(rest)} more edges, not scored, not drawn."
    return (f"+ {len(rest)} more edges not drawn, |score| ≤ {max(abs(v) for v in values):.3f} each, together "
            f"{sum(values):+.3f} {unit} (Σ|score| {sum(abs(v) for v in values):.3f}).")


def node_importance(circuit) -> dict[str, float]:
    """Node name -> sum of |score| of the circuit's edges into and out of it (its own inputs included)."""
    graph = circuit.graph
    out: dict[str, float] = {}
    for e in circuit.edge_list():
        s = abs(e["score"]) if e["score"] is not None else 0.0
        out[e["from"]] = out.get(e["from"], 0.0) + s
        node, _ = receiver(graph, e["to"])
        out[node] = out.get(node, 0.0) + s
    return out


def _kind(name: str) -> str:
    if name == "embed":
        return "embed"
    if name == "logits":
        return "logits"
    return "mlp" if name.endswith(" MLP") else "head"


def _edge_colour(value: float | None, bound: float) -> str:
    if value is None:
        return "#b0b0b0"
    t = 0.5 + 0.5 * max(-1.0, min(1.0, value / bound))
    return sample_colorscale(EDGE_SCALE, [t])[0]


def _edge_width(value: float | None, bound: float) -> float:
    return 1.5 + 6.5 * (abs(value) / bound if value is not None else 0.0)


@dataclass(frozen=True)
class EdgePath:
    """An edge's drawn path: a straight line, or a quadratic curve whose control point sits above or
    below the midpoint (`bend`, in head rows) where a straight line would run through another node.
    x grows linearly along the path, so `at(t)` is the point at x = x0 + t (x1 − x0)."""

    x0: float
    y0: float
    x1: float
    y1: float
    port: str
    bend: float = 0.0

    def at(self, t: float) -> tuple[float, float]:
        cy = (self.y0 + self.y1) / 2 + self.bend
        return (self.x0 + t * (self.x1 - self.x0),
                (1 - t) ** 2 * self.y0 + 2 * t * (1 - t) * cy + t ** 2 * self.y1)

    def points(self, n: int = 24) -> tuple[list[float], list[float]]:
        if not self.bend:
            return [self.x0, self.x1], [self.y0, self.y1]
        pts = [self.at(i / (n - 1)) for i in range(n)]
        return [p[0] for p in pts], [p[1] for p in pts]

    def control(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2 + self.bend


CLEARANCE = 0.3  # head rows between an edge and a node it passes (node markers are about this big)
BENDS = (0.8, -0.8, 1.2, -1.2, 1.7, -1.7, 2.4, -2.4)  # control-point offsets tried, in head rows (the peak is half)


def _clearance(path: EdgePath, nodes: list[tuple[float, float]]) -> float:
    """The smallest vertical gap between the path and a node it passes (strictly between its ends)."""
    gaps = [abs(path.at((x - path.x0) / (path.x1 - path.x0))[1] - y) for x, y in nodes
            if path.x0 + 1e-6 < x < path.x1 - 1e-6]
    return min(gaps, default=math.inf)


def edge_path(layout: Layout, graph, up: str, down: str) -> EdgePath:
    """The path an edge is drawn along (the same in the figure and the SVG): from the sender to the
    receiver's port, curved around any node a straight line would cross."""
    x0, y0 = layout.pos[up]
    node, port = receiver(graph, down)
    x1, y1 = layout.pos[node]
    if port in PORTS:
        x1, y1 = x1 - PORT_DX, y1 + PORTS[port]
    straight = EdgePath(x0, y0, x1, y1, port)
    others = [p for n, p in layout.pos.items() if n not in (up, node)]
    if _clearance(straight, others) >= CLEARANCE:
        return straight
    tried = [EdgePath(x0, y0, x1, y1, port, b) for b in BENDS]
    fine = [p for p in tried if _clearance(p, others) >= CLEARANCE]
    return fine[0] if fine else max(tried, key=lambda p: _clearance(p, others))


MARKER_SPOTS = (0.5, 0.38, 0.62, 0.28, 0.72, 0.2, 0.8)  # where along an edge its click target may sit
MARKER_GAP = 0.2  # data units between two click targets (a column is 1 wide, heads are 1 apart)


def _marker_spot(path: EdgePath, taken: list) -> tuple[float, float]:
    """Where an edge's click target goes: its midpoint, unless a stronger edge's target is already
    near there (two edges can share a midpoint), then the first spot along it that is clear."""
    best, best_gap = None, -1.0
    for t in MARKER_SPOTS:
        p = path.at(t)
        gap = min((math.hypot(p[0] - q[0], p[1] - q[1]) for q in taken), default=math.inf)
        if gap >= MARKER_GAP:
            return p
        if gap > best_gap:
            best, best_gap = p, gap
    return best


def _height(layout: Layout) -> int:
    """Pixels for the graph: about 80 per row of heads (and the MLPs' row), within 440..860."""
    rows = layout.n_heads + (1 if layout.mlp_row is not None else 0)
    return int(min(860, max(440, 80 * rows + 170)))


def _bound(edges) -> float:
    return max([abs(s) for _, _, s in edges if s is not None] + [1e-9])


# ---------------------------------------------------------------------------------------------
# The circuit graph (plotly)
# ---------------------------------------------------------------------------------------------


@legible
def circuit_figure(circuit, title: str = "Circuit", max_edges: int = MAX_EDGES) -> go.Figure:
    """The circuit as a layered graph. Click targets: head nodes (customdata ["head", layer, head])
    and each edge's midpoint marker (customdata ["edge", upstream, downstream])."""
    graph, scores = circuit.graph, circuit.scores
    layout = graph_layout(graph)
    edges = drawn_edges(circuit, max_edges)
    bound = _bound(edges)
    ranks = {(u, d): i + 1 for i, (u, d, _) in enumerate(drawn_edges(circuit, circuit.n_edges))}
    fig = go.Figure()
    mids_x, mids_y, mids_data, mids_text, mids_colour, ports = [], [], [], [], [], set()
    for up, down, value in edges:
        path = edge_path(layout, graph, up, down)
        port = path.port
        colour = _edge_colour(value, bound)
        xs, ys = path.points()
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(color=colour, width=_edge_width(value, bound), dash=DASH[port]),
                                 name=f"edge {up} → {down}"))
        mx, my = _marker_spot(path, list(zip(mids_x, mids_y)))
        mids_x.append(mx)
        mids_y.append(my)
        mids_data.append(["edge", up, down])
        mids_colour.append(colour)
        what = "drop in the metric when ACDC removes it" if circuit.method == "acdc" else "score"
        mids_text.append(f"<b>{safe(describe_edge(up, down))}</b><br>{what}: {safe(score_phrase(value, scores))}"
                         f"<br>rank {ranks[(up, down)]} of the circuit's {circuit.n_edges} edges"
                         "<br>click: path-patch this edge")
        if port in PORTS:
            ports.add((receiver(graph, down)[0], port))
    # Ports in use: a short stub to the head, and a small letter.
    for node, port in sorted(ports):
        x, y = layout.pos[node]
        fig.add_trace(go.Scatter(x=[x - PORT_DX, x], y=[y + PORTS[port], y], mode="lines", hoverinfo="skip",
                                 line=dict(color="#9a9a9a", width=1.5), showlegend=False, name="port"))
    if ports:
        px = [layout.pos[n][0] - PORT_DX - 0.07 for n, _ in sorted(ports)]
        py = [layout.pos[n][1] + PORTS[p] for n, p in sorted(ports)]
        fig.add_trace(go.Scatter(x=px, y=py, mode="text", text=[p for _, p in sorted(ports)], hoverinfo="skip",
                                 textfont=dict(size=FONT - 2, color="#555555"), showlegend=False, name="ports"))
    # Nodes: every node of the graph; those in the circuit coloured and sized by importance.
    importance = node_importance(circuit)
    top = max(importance.values(), default=0.0) or 1.0
    in_circuit = set(circuit.nodes())
    names = list(graph.upstream) + ["logits"]
    n_in = {n: 0 for n in names}
    n_out = {n: 0 for n in names}
    for e in circuit.edge_list():
        n_out[e["from"]] += 1
        n_in[receiver(graph, e["to"])[0]] += 1
    for kind in ("embed", "head", "mlp", "logits"):
        group = [n for n in names if _kind(n) == kind]
        if not group:
            continue
        sizes = [14 + 26 * importance.get(n, 0.0) / top if n in in_circuit else 9 for n in group]
        colours = [NODE_COLOUR[kind] if n in in_circuit else INACTIVE for n in group]
        hover = []
        for n in group:
            if n in in_circuit:
                text = (f"<b>{safe(n)}</b><br>importance (Σ|score| of its edges in the circuit): {importance.get(n, 0.0):.3f}"
                        f"<br>edges in: {n_in[n]}, out: {n_out[n]}")
            else:
                text = f"<b>{safe(n)}</b><br>not in this circuit"
            if kind == "head":
                text += "<br>click: open its attention pattern"
            hover.append(text)
        custom = [["head", *head_of(n)] if kind == "head" else ["node", n] for n in group]
        labels = [n if (n in in_circuit or kind != "head") else "" for n in group]
        fig.add_trace(go.Scatter(
            x=[layout.pos[n][0] for n in group], y=[layout.pos[n][1] for n in group], mode="markers+text",
            text=labels, textposition="bottom center" if kind == "mlp" else "top center",  # MLPs: nothing below them
            textfont=dict(size=FONT, color="#222222"),
            marker=dict(size=sizes, color=colours, symbol="circle" if kind == "head" else "square",
                        line=dict(color="white", width=1)),
            customdata=custom, hovertext=hover, hoverinfo="text", name=f"{kind} nodes", showlegend=False,
            selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),
        ))
    # Edge midpoints: hover with the numbers, click to path-patch (on top of the nodes).
    fig.add_trace(go.Scatter(
        x=mids_x, y=mids_y, mode="markers", customdata=mids_data, hovertext=mids_text, hoverinfo="text",
        marker=dict(size=11, color=mids_colour, symbol="diamond", line=dict(color="white", width=1)),
        name="edges (click one)", showlegend=False,
        selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),
    ))
    # Legend: the three ports' line styles; and a colour bar for the sign.
    for port in ("q", "k", "v"):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="#555555", width=3, dash=DASH[port]),
                                 name=f"into a {INPUT_NAMES[port]}", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="#555555", width=3),
                             name="into an MLP / the logits", hoverinfo="skip"))
    unit = "share of the gap" if scores.normalised else "raw Δ metric"
    fig.add_trace(go.Scatter(
        x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False, name="colour scale",
        marker=dict(color=[-bound, bound], cmin=-bound, cmax=bound, colorscale=EDGE_SCALE, showscale=True,
                    colorbar=dict(title=dict(text=f"edge score ({unit}): <span style='color:#67001f'>− opposes</span>, "
                                             f"<span style='color:#053061'>+ supports</span> the clean behaviour",
                                             font=dict(size=FONT - 1), side="top"),
                                  orientation="h", x=0, xanchor="left", y=-0.15, yanchor="top", len=0.5, thickness=12,
                                  tickvals=[-bound, 0, bound], tickfont=dict(size=FONT),
                                  ticktext=[f"{-bound:+.2f}", "0", f"{bound:+.2f}"])),
    ))
    x_lo, x_hi = layout.x_range
    y_lo, y_hi = layout.y_range
    fig.update_layout(
        title=dict(text=safe(title), font=dict(size=TITLE_FONT)),
        xaxis=dict(range=[x_lo, x_hi], tickvals=[x for x, _ in layout.columns], ticktext=[c for _, c in layout.columns],
                   side="top", showgrid=False, zeroline=False, fixedrange=True),
        yaxis=dict(range=[y_hi, y_lo], tickvals=list(range(graph.n_heads)) + ([layout.mlp_row] if layout.mlp_row else []),
                   ticktext=[f"H{h}" for h in range(graph.n_heads)] + (["MLP"] if layout.mlp_row else []),
                   title="head", showgrid=False, zeroline=False, fixedrange=True),
        height=_height(layout) + 80, margin=dict(l=10, r=10, t=90, b=110),
        plot_bgcolor="white", clickmode="event+select", hovermode="closest", dragmode=False,
        legend=dict(orientation="h", yanchor="top", y=-0.02, xanchor="left", x=0, entrywidth=175, maxheight=0.3),
    )
    return fig


def clicked(event) -> tuple | None:
    """What a click on `circuit_figure` selected: ("head", layer, head), ("edge", up, down) or None."""
    points = ((event or {}).get("selection") or {}).get("points") or []
    for point in points:
        data = point.get("customdata")
        if not isinstance(data, (list, tuple)) or len(data) != 3:
            continue
        if data[0] == "head":
            try:
                return "head", int(data[1]), int(data[2])
            except (TypeError, ValueError):
                continue
        if data[0] == "edge" and all(isinstance(x, str) for x in data[1:]):
            return "edge", data[1], data[2]
    return None


# ---------------------------------------------------------------------------------------------
# The circuit graph (standalone SVG)
# ---------------------------------------------------------------------------------------------


def _attr(value) -> str:
    return quoteattr(str(value))


def circuit_svg(circuit, title: str = "Circuit", max_edges: int = MAX_EDGES, width: int = 1000) -> str:
    """The same graph as `circuit_figure`, as a standalone SVG document (the same layout and edges:
    one <line class="edge"> or, for a curved edge, <path class="edge"> per drawn edge, each with a
    <title> tooltip). Text is XML-escaped."""
    graph, scores = circuit.graph, circuit.scores
    layout = graph_layout(graph)
    edges = drawn_edges(circuit, max_edges)
    bound = _bound(edges)
    height = _height(layout) + 60
    left, right, top, bottom = 70, 190, 90, 90
    (x_lo, x_hi), (y_lo, y_hi) = layout.x_range, layout.y_range

    def px(x: float) -> float:
        return round(left + (x - x_lo) / (x_hi - x_lo) * (width - left - right), 2)

    def py(y: float) -> float:
        return round(top + (y - y_lo) / (y_hi - y_lo) * (height - top - bottom), 2)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="Helvetica, Arial, sans-serif" font-size="{FONT}">',
           f"<title>{escape(title)}</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="28" font-size="{TITLE_FONT}" font-weight="bold">{escape(title)}</text>']
    for x, label in layout.columns:
        out.append(f'<text x="{px(x)}" y="{top - 30}" text-anchor="middle" fill="#444">{escape(label)}</text>')
    rows = [(float(h), f"H{h}") for h in range(graph.n_heads)] + ([(layout.mlp_row, "MLP")] if layout.mlp_row else [])
    for y, label in rows:
        out.append(f'<text x="{left - 20}" y="{py(y) + 5}" text-anchor="end" fill="#444">{label}</text>')
    importance = node_importance(circuit)
    ranks = {(u, d): i + 1 for i, (u, d, _) in enumerate(drawn_edges(circuit, circuit.n_edges))}
    for up, down, value in edges:
        path = edge_path(layout, graph, up, down)
        dash = f' stroke-dasharray="{SVG_DASH[path.port]}"' if SVG_DASH[path.port] else ""
        tip = f"{describe_edge(up, down)}: score {score_phrase(value, scores)} (rank {ranks[(up, down)]})"
        style = (f'stroke="{_edge_colour(value, bound)}" stroke-width="{_edge_width(value, bound):.2f}"{dash} '
                 'stroke-linecap="round" fill="none"')
        if path.bend:  # the same quadratic curve as the figure's
            cx, cy = path.control()
            out.append(f'<path class="edge" d="M {px(path.x0)} {py(path.y0)} Q {px(cx)} {py(cy)} {px(path.x1)} {py(path.y1)}" '
                       f"{style}><title>{escape(tip)}</title></path>")
        else:
            out.append(f'<line class="edge" x1="{px(path.x0)}" y1="{py(path.y0)}" x2="{px(path.x1)}" y2="{py(path.y1)}" '
                       f"{style}><title>{escape(tip)}</title></line>")
    for node, port in sorted({receiver(graph, d) for _, d, _ in edges if receiver(graph, d)[1] in PORTS}):
        x, y = layout.pos[node]
        out.append(f'<polyline class="port" points="{px(x - PORT_DX)},{py(y + PORTS[port])} {px(x)},{py(y)}" '
                   f'stroke="#9a9a9a" stroke-width="1.5" fill="none"/>')
        out.append(f'<text x="{px(x - PORT_DX) - 4}" y="{py(y + PORTS[port]) + 4}" text-anchor="end" fill="#555" '
                   f'font-size="{FONT - 2}">{escape(port)}</text>')
    top_imp = max(importance.values(), default=0.0) or 1.0
    in_circuit = set(circuit.nodes())
    for name in list(graph.upstream) + ["logits"]:
        x, y = layout.pos[name]
        kind = _kind(name)
        active = name in in_circuit
        r = (14 + 26 * importance.get(name, 0.0) / top_imp) / 2 if active else 4.5
        fill = NODE_COLOUR[kind] if active else INACTIVE
        tip = f"{name}: importance {importance.get(name, 0.0):.3f}" if active else f"{name}: not in this circuit"
        if kind == "head":
            out.append(f'<circle class="node" cx="{px(x)}" cy="{py(y)}" r="{r:.2f}" fill="{fill}" stroke="white">'
                       f"<title>{escape(tip)}</title></circle>")
        else:
            out.append(f'<rect class="node" x="{px(x) - r:.2f}" y="{py(y) - r:.2f}" width="{2 * r:.2f}" height="{2 * r:.2f}" '
                       f'fill="{fill}" stroke="white"><title>{escape(tip)}</title></rect>')
        if active or kind != "head":
            ty = py(y) + r + FONT + 2 if kind == "mlp" else py(y) - r - 5
            out.append(f'<text x="{px(x)}" y="{ty:.2f}" text-anchor="middle" fill="#222">{escape(name)}</text>')
    # Legend: line styles (polylines, so that every <line> is an edge) and the colour key.
    ly = height - 45
    for i, port in enumerate(("q", "k", "v", "in")):
        x = left + i * 190
        dash = f' stroke-dasharray="{SVG_DASH[port]}"' if SVG_DASH[port] else ""
        what = f"into a {INPUT_NAMES[port]}" if port in PORTS else "into an MLP / the logits"
        out.append(f'<polyline class="legend" points="{x},{ly} {x + 40},{ly}" stroke="#555" stroke-width="3"{dash} fill="none"/>')
        out.append(f'<text x="{x + 48}" y="{ly + 5}">{escape(what)}</text>')
    unit = "share of the clean − corrupted gap" if scores.normalised else f"raw Δ {scores.metric_label}"
    out.append(f'<text x="{left}" y="{ly + 30}" fill="#444">Edge colour and width: signed score ({escape(unit)}); '
               f'blue supports the clean behaviour (up to {bound:+.2f}), red opposes it.</text>')
    summary = hidden_summary(circuit, max_edges)
    if summary:
        out.append(f'<text x="{left}" y="{top - 55}" fill="#444">{escape(summary)}</text>')
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The faithfulness curve
# ---------------------------------------------------------------------------------------------


@legible
def faithfulness_figure(curve, chosen_n: int | None, chosen_faithfulness: float | None, level: float = 0.8,
                        title: str = "Faithfulness of the top-N circuit", chosen_label: str | None = None) -> go.Figure:
    """Faithfulness of the top-N circuits against N (log scale), a line at `level`, the chosen N marked."""
    ns, kept, faith = list(curve.requested), list(curve.n_edges), [float(f) for f in curve.faithfulness]
    fig = go.Figure(go.Scatter(
        x=ns, y=faith, mode="lines+markers", name="top-N circuit", line=dict(color="#4c78a8"),
        customdata=kept, hovertemplate="top %{x} edges → %{customdata} kept on paths to the logits"
                                       "<br>faithfulness %{y:.3f}<extra></extra>",
    ))
    fig.add_hline(y=level, line=dict(color="grey", dash="dash"), annotation_text=f"{level:.0%} of the behaviour",
                  annotation_position="bottom right", annotation_font_size=FONT - 1)
    if chosen_n is not None and chosen_faithfulness is not None and not math.isnan(chosen_faithfulness):
        fig.add_trace(go.Scatter(
            x=[chosen_n], y=[chosen_faithfulness], mode="markers", name=chosen_label or f"chosen: N = {chosen_n}",
            marker=dict(size=15, color="#d62728", symbol="star"),
            hovertemplate=safe(chosen_label or "chosen") + ": %{x} edges<br>faithfulness %{y:.3f}<extra></extra>",
        ))
    top = max(ns + [1])
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000) if t <= top]
    fig.update_layout(
        title=title, xaxis=dict(type="log", title="edges kept (top N by |score|, log scale)", tickvals=ticks,
                                ticktext=[f"{t:,}" for t in ticks], minor=dict(showgrid=False)),
        yaxis=dict(title="faithfulness (1 = whole model)"), height=300, margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=0.02, xanchor="right", x=1), showlegend=True,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Path patching, composition, copying
# ---------------------------------------------------------------------------------------------


def carried(result) -> torch.Tensor:
    """[layer, head] how much of the behaviour each path carries: 1 − normalised metric (or the raw
    drop clean − patched): positive = the path supports the clean behaviour, like an edge score."""
    return -result.effect


def path_heatmap(result, selected: tuple[int, int] | None = None) -> go.Figure:
    """A path-patching sweep as a layer × head heatmap of `carried`; senders that cannot reach are blank."""
    values = carried(result)
    n_layers, n_heads = values.shape
    target = "logits" if result.input == "logits" else ", ".join(f"L{l}H{h}.{result.input}" for l, h in result.receivers)
    unit = "share of the clean − corrupted gap it carries" if result.normalised else f"drop in {result.metric_label}"
    hover = []
    for l in range(n_layers):
        row = []
        for h in range(n_heads):
            v = float(values[l, h])
            row.append(f"L{l}H{h} → {safe(target)}" + ("<br>(cannot reach: not before the receivers)" if math.isnan(v) else ""))
        hover.append(row)
    cells = [[(l, h) for h in range(n_heads)] for l in range(n_layers)]
    fig = importance_heatmap(values, [f"L{l}" for l in range(n_layers)], [f"H{h}" for h in range(n_heads)],
                             result.title, unit, hover, heads=cells)
    finite = values[~values.isnan()]
    bound = float(finite.abs().max()) if finite.numel() else 1.0
    short = "share of<br>the gap" if result.normalised else "drop"
    fig.update_traces(selector=dict(type="heatmap"), hoverongaps=False, zmin=-(bound or 1.0), zmax=bound or 1.0,
                      colorbar=dict(title=dict(text=short)),
                      text=[["" if math.isnan(float(v)) else f"{round(float(v), 2) + 0.0:+.2f}" for v in row] for row in values])
    fig.update_layout(xaxis_title="sender head", yaxis_title="sender layer")
    if selected is not None:
        l, h = selected
        fig.add_shape(type="rect", x0=h - 0.5, x1=h + 0.5, y0=l - 0.5, y1=l + 0.5, line=dict(color="black", width=3))
    return fig


def _head_labels(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]


@legible
def composition_heatmap(summary, title: str | None = None) -> go.Figure:
    """Composition scores [L, H, L, H] as senders (rows) × receivers (columns), only the layers that
    can compose; hover says whether each score is above the random baseline's 95th percentile."""
    scores = summary.scores.float().cpu()
    n_layers, n_heads = scores.shape[:2]
    senders = _head_labels(n_layers - 1, n_heads)
    receivers = [f"L{l}H{h}" for l in range(1, n_layers) for h in range(n_heads)]
    grid = scores.reshape(n_layers * n_heads, n_layers * n_heads)[: len(senders), n_heads:]
    hover, text = [], []
    for i, s in enumerate(senders):
        hrow, trow = [], []
        for j, r in enumerate(receivers):
            v = float(grid[i, j])
            if math.isnan(v):
                hrow.append(f"{s} → {r}: cannot compose (the sender is not in an earlier layer)")
                trow.append("")
            else:
                above = v > summary.p95
                hrow.append(f"{s} → {r}<br>{summary.kind}-composition {v:.3f}<br>"
                            + (f"above the random baseline's 95th percentile ({summary.p95:.3f})" if above
                               else f"within the random baseline (95th percentile {summary.p95:.3f})"))
                trow.append(f"{v:.2f}" + ("*" if above else ""))
        hover.append(hrow)
        text.append(trow)
    finite = grid[~grid.isnan()]
    top = float(finite.max()) if finite.numel() else 1.0
    fig = go.Figure(go.Heatmap(
        z=grid.numpy(), x=receivers, y=senders, customdata=hover, colorscale="Blues", zmin=0, zmax=max(top, summary.p95),
        text=text, texttemplate="%{text}" if grid.numel() <= 64 else None, textfont=dict(size=13), hoverongaps=False,
        colorbar=dict(title="score"), hovertemplate="%{customdata}<extra></extra>",
    ))
    fig.update_layout(
        title=title or f"{summary.kind}-composition: sender (row) → receiver (column)",
        xaxis=dict(title=f"receiver head (its {summary.kind.lower()} side reads the sender)", type="category"),
        yaxis=dict(title="sender head", autorange="reversed", type="category"),
        height=max(300, min(900, 130 + 34 * len(senders))), margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


@legible
def copying_heatmap(scores: torch.Tensor, selected: tuple[int, int] | None = None) -> go.Figure:
    """[layer, head] copying scores in [-1, 1] on a diverging scale."""
    z = scores.float().cpu()
    n_layers, n_heads = z.shape
    names = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)]
    fig = go.Figure(go.Heatmap(
        z=z.numpy(), x=[f"H{h}" for h in range(n_heads)], y=[f"L{l}" for l in range(n_layers)], customdata=names,
        colorscale=DIVERGING, zmid=0, zmin=-1, zmax=1,
        text=[[f"{float(v):+.2f}" for v in row] for row in z], texttemplate="%{text}" if z.numel() <= 64 else None,
        textfont=dict(size=13), colorbar=dict(title="copying"),
        hovertemplate="%{customdata}<br>copying score %{z:+.3f}<br>(+1: attending to a token raises that token's logit)"
                      "<extra></extra>",
    ))
    if selected is not None:
        l, h = selected
        fig.add_shape(type="rect", x0=h - 0.5, x1=h + 0.5, y0=l - 0.5, y1=l + 0.5, line=dict(color="black", width=3))
    fig.update_layout(
        title="Copying score (full OV circuit)", xaxis=dict(title="head", type="category"),
        yaxis=dict(title="layer", autorange="reversed", type="category"),
        height=max(260, 130 + 55 * n_layers), margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Estimate against exact, minimality
# ---------------------------------------------------------------------------------------------


@legible
def edge_scatter(exact, estimate, agreement: dict, estimate_label: str) -> go.Figure:
    """Every edge's estimated score (y) against its exact score (x), with y = x for reference."""
    graph = exact.graph
    a, b = exact.values.flatten(), estimate.values.flatten()
    ok = (~(a.isnan() | b.isnan())).nonzero().flatten().tolist()
    x, y = [float(a[i]) for i in ok], [float(b[i]) for i in ok]
    names = [safe(describe_edge(graph.upstream[i // graph.n_down], graph.downstream[i % graph.n_down])) for i in ok]
    lo, hi = min(x + y + [0.0]), max(x + y + [0.0])
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="grey", dash="dot"), name="y = x", hoverinfo="skip"),
        go.Scatter(x=x, y=y, mode="markers", marker=dict(size=8, color="#4c78a8", opacity=0.75), name="edge",
                   customdata=names, hovertemplate="%{customdata}<br>exact: %{x:+.4f}<br>" + safe(estimate_label)
                   + ": %{y:+.4f}<extra></extra>"),
    ])
    unit = exact.value_label
    fig.update_layout(
        title=f"{estimate_label} against exact edge patching (r = {agreement['correlation']:.3f}, "
              f"top-{agreement['top']} overlap {agreement['top_overlap']:.0%})",
        xaxis_title=f"exact: one patched run per edge ({unit})", yaxis_title=f"{estimate_label} estimate ({unit})",
        height=440, margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


@legible
def minimality_bar(check, title: str = "Minimality: what each node adds to the circuit") -> go.Figure:
    """One bar per node v: |F(C \\ {v}) − F(C)| (normalised where the task's gap allows)."""
    names = [", ".join(s[-1:]) for s in check.sets]
    values = [float(v) for v in check.score]
    unit = "share of the clean − corrupted gap" if check.normaliser.meaningful else "raw Δ metric"
    fig = go.Figure(go.Bar(
        x=names, y=values, marker_color=["#4c78a8" if v >= 0.05 else "#bbbbbb" for v in values],
        customdata=[[float(c), float(m)] for c, m in zip(check.circuit_metric, check.model_metric)],
        hovertemplate="%{x}<br>|F(C without it) − F(C)| = %{y:.3f}<br>F(C without it) = %{customdata[0]:+.3f}, "
                      "F(C) = %{customdata[1]:+.3f}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis=dict(title="node knocked out of the circuit", type="category"),
                      yaxis_title=unit, height=340, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def ov_table(mappings: Sequence, decode) -> list[dict]:
    """Rows for a table of top OV mappings: source token and its top output tokens (decoded as text)."""
    rows = []
    for source, outs in mappings:
        rows.append({"source token": decode(source),
                     "top output tokens (value)": ", ".join(f"{decode(i)!r} ({v:+.2f})" for i, v in outs)})
    return rows
