"""core/circuit_plots.py: the circuit graph (plotly and SVG), the curve, and the page's heatmaps,
built from circuits with known scores on the induction model's graph (81 edges, no forward pass)."""
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from core import circuit_plots as cp
from core import circuits
from core.composition import CompositionSummary
from core.path_patching import PathPatchingResult
from core.plots import FONT
from core.tasks import Normaliser

NORM = Normaliser(clean=2.0, corrupted=0.0, effect=3.0)
KEY_EDGE = ("L0H3", "L1H1.k")


@pytest.fixture(scope="module")
def graph(zoo_model):
    return circuits.build_graph(zoo_model)


def _scores(graph, values: dict | None = None, seed: int = 0, normaliser=NORM) -> circuits.EdgeScores:
    """Edge scores: seeded random ones of both signs, with `values` {(up, down): score} set exactly."""
    gen = torch.Generator().manual_seed(seed)
    v = (torch.rand(graph.n_up, graph.n_down, generator=gen) - 0.4) * 0.2
    for (up, down), s in (values or {}).items():
        v[graph.up_index(up), graph.down_index(down)] = s
    v = v.masked_fill(~graph.valid, float("nan"))
    return circuits.EdgeScores(graph, "exact", v, v * normaliser.gap, normaliser, "resample", "logit difference")


def _circuit(graph, n: int, values: dict | None = None, **kw) -> circuits.Circuit:
    return circuits.discover(_scores(graph, values, **kw), n=n)


STRONG = {("embed", "L0H3.v"): 0.9, ("L0H3", "L1H1.k"): 0.57, ("L1H1", "logits"): 0.7, ("L0H2", "L1H0.q"): -0.45,
          ("embed", "L1H0.v"): 0.3, ("L1H0", "logits"): -0.35, ("embed", "L0H2.v"): 0.25, ("embed", "L1H1.q"): 0.2}


def _edge_traces(fig):
    return [t for t in fig.data if (t.name or "").startswith("edge ")]


def _midpoints(fig):
    return next(t for t in fig.data if t.name == "edges (click one)")


def test_at_most_60_edges_are_drawn_the_strongest_and_the_rest_are_summed_up(graph):
    circuit = _circuit(graph, graph.n_edges, STRONG)
    assert circuit.n_edges == 81
    fig = cp.circuit_figure(circuit, "all edges")
    drawn = _edge_traces(fig)
    assert len(drawn) == cp.MAX_EDGES == 60 and len(_midpoints(fig).customdata) == 60
    shown = {(d[1], d[2]) for d in _midpoints(fig).customdata}
    scores = {(e["from"], e["to"]): e["score"] for e in circuit.edge_list()}
    weakest_shown = min(abs(scores[e]) for e in shown)
    hidden = [s for e, s in scores.items() if e not in shown]
    assert len(hidden) == 21 and max(abs(s) for s in hidden) <= weakest_shown
    assert set(STRONG) <= shown
    summary = cp.hidden_summary(circuit)
    assert summary.startswith("+ 21 more edges not drawn")
    assert f"|score| ≤ {max(abs(s) for s in hidden):.3f}" in summary and f"together {sum(hidden):+.3f}" in summary
    assert cp.hidden_summary(_circuit(graph, 16, STRONG)) is None


def test_edge_hover_names_the_edge_its_input_and_its_score(graph):
    circuit = _circuit(graph, 12, STRONG)
    mids = _midpoints(cp.circuit_figure(circuit))
    hover = {(d[1], d[2]): h for d, h in zip(mids.customdata, mids.hovertext)}
    text = hover[KEY_EDGE]
    assert "L0H3 → L1H1 (key input)" in text and "score: +0.570 of the clean − corrupted gap" in text
    assert "L0H2 → L1H0 (query input)" in hover[("L0H2", "L1H0.q")] and "-0.450" in hover[("L0H2", "L1H0.q")]
    assert "L1H1 → logits" in hover[("L1H1", "logits")]
    ranks = sorted(int(h.split("rank ")[1].split(" ")[0]) for h in hover.values())
    assert ranks == list(range(1, circuit.n_edges + 1))
    # Raw units where the task's gap is too small to normalise.
    weak = Normaliser(clean=0.1, corrupted=0.09, effect=0.1)
    raw = cp.circuit_figure(_circuit(graph, 12, STRONG, normaliser=weak))
    assert all("in logit difference (raw" in h for h in _midpoints(raw).hovertext)


def _rgb(colour: str) -> tuple[float, ...]:
    if colour.startswith("#"):
        return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return tuple(float(x) for x in colour[colour.index("(") + 1:-1].split(","))


def test_edges_are_coloured_by_sign_sized_by_magnitude_and_dashed_by_input(graph):
    circuit = _circuit(graph, 12, STRONG)
    fig = cp.circuit_figure(circuit)
    by_name = {t.name[len("edge "):]: t for t in _edge_traces(fig)}
    for (up, down), s in STRONG.items():
        line = by_name[f"{up} → {down}"].line
        r, _, b = _rgb(line.color)
        assert (b > r) if s > 0 else (r > b), (up, down)
        port = down.split(".")[1] if "." in down else "in"
        assert line.dash == cp.DASH[port]
    assert by_name["embed → L0H3.v"].line.width > by_name["L0H3 → L1H1.k"].line.width > by_name["embed → L1H1.q"].line.width
    # Into q / k / v: three distinct ports left of the head, and three legend entries.
    ends = {down: (t.x[1], t.y[1]) for down in ("L1H0.q", "L1H1.k", "L0H3.v") for t in [by_name[next(
        n for n in by_name if n.endswith(down))]]}
    assert ends["L1H1.k"] == (2 - cp.PORT_DX, 1.0)
    assert ends["L1H0.q"][1] < 0 < 3 < ends["L0H3.v"][1]
    legend = [t.name for t in fig.data if t.showlegend is not False and t.name and t.name.startswith("into")]
    assert legend == ["into a query input", "into a key input", "into a value input", "into an MLP / the logits"]
    bar = next(t for t in fig.data if t.name == "colour scale")
    assert bar.marker.showscale and "supports" in bar.marker.colorbar.title.text and "opposes" in bar.marker.colorbar.title.text


def test_nodes_are_laid_out_in_layers_sized_by_importance_and_heads_are_clickable(graph):
    circuit = _circuit(graph, 12, STRONG)
    fig = cp.circuit_figure(circuit)
    heads = next(t for t in fig.data if t.name == "head nodes")
    size = {f"L{d[1]}H{d[2]}": s for d, s in zip(heads.customdata, heads.marker.size)}
    pos = {f"L{d[1]}H{d[2]}": (x, y) for d, x, y in zip(heads.customdata, heads.x, heads.y)}
    assert pos["L0H3"] == (1.0, 3.0) and pos["L1H1"] == (2.0, 1.0)
    importance = cp.node_importance(circuit)
    in_circuit = [n for n in size if n in circuit.nodes()]
    top = max(importance.values())  # over every node, the embeddings included
    assert in_circuit and all(size[n] == pytest.approx(14 + 26 * importance[n] / top) for n in in_circuit)
    assert size["L0H3"] > size["L0H2"]  # 0.57 + 0.9 (its value input) against 0.45 + 0.25 and less
    assert importance["L0H3"] == pytest.approx(sum(abs(e["score"]) for e in circuit.edge_list()
                                                   if e["from"] == "L0H3" or e["to"].startswith("L0H3.")))
    assert all(size[n] == 9 for n in size if n not in circuit.nodes())
    hover = dict(zip(size, heads.hovertext))
    assert "importance" in hover["L0H3"] and "click: open its attention pattern" in hover["L0H3"]
    others = {t.name: t for t in fig.data if t.name in ("embed nodes", "logits nodes")}
    assert others["embed nodes"].x[0] == 0 and others["logits nodes"].x[0] == 3
    assert fig.layout.font.size == FONT and fig.layout.xaxis.tickfont.size == FONT
    assert list(fig.layout.xaxis.ticktext) == ["embed", "L0 heads", "L1 heads", "logits"]


def test_edges_that_would_cross_a_node_curve_around_it_in_the_figure_and_the_svg():
    from tests.random_models import random_model

    model = random_model(seed=2, tokenizer=None, n_layers=3)  # with MLPs, in their own row below the heads
    g = circuits.build_graph(model)
    layout = cp.graph_layout(g)
    assert layout.mlp_row == 3 + cp.MLP_GAP and layout.pos["L1 MLP"] == (4.0, layout.mlp_row)
    chain = {("embed", "L2 MLP"): 0.9, ("L0 MLP", "L2 MLP"): 0.85, ("L0 MLP", "logits"): 0.8, ("L0H1", "L2H1.k"): 0.7,
             ("L2 MLP", "logits"): 0.6, ("embed", "L0 MLP"): 0.5, ("L0 MLP", "L1H0.v"): 0.4, ("L1H0", "logits"): 0.3,
             ("embed", "L0H1.v"): 0.3, ("L2H1", "logits"): 0.3}
    circuit = circuits.discover(_scores(g, chain, seed=3), n=len(chain))
    fig = cp.circuit_figure(circuit)
    traces = {t.name[len("edge "):]: t for t in _edge_traces(fig)}
    for up, down in chain:
        path = cp.edge_path(layout, g, up, down)
        others = [p for n, p in layout.pos.items() if n not in (up, cp.receiver(g, down)[0])]
        best = max(cp._clearance(cp.EdgePath(path.x0, path.y0, path.x1, path.y1, path.port, b), others)
                   for b in (0.0, *cp.BENDS))
        assert cp._clearance(path, others) >= min(cp.CLEARANCE, best), (up, down)  # clear, or the clearest there is
        line = traces[f"{up} → {down}"]
        assert (len(line.x) > 2) == bool(path.bend)  # a curve is drawn as a curve
    assert cp.edge_path(layout, g, "L0 MLP", "L2 MLP").bend  # along the MLPs' row, through L1 MLP
    assert cp.edge_path(layout, g, "L0H1", "L2H1.k").bend  # along head 1's row, through L1H1
    assert not cp.edge_path(layout, g, "embed", "L0 MLP").bend and not cp.edge_path(layout, g, "L0 MLP", "logits").bend
    svg = ET.fromstring(cp.circuit_svg(circuit))
    paths = {e.find("{http://www.w3.org/2000/svg}title").text.split(":")[0]: e for e in svg if e.get("class") == "edge"}
    assert paths["L0 MLP → L2 MLP (input)"].tag.endswith("path") and " Q " in paths["L0 MLP → L2 MLP (input)"].get("d")
    assert paths["embed → L0 MLP (input)"].tag.endswith("line")


def test_layout_with_mlps_and_grouped_key_value_heads():
    from tests.random_models import SWITCHES, random_model

    model = random_model(seed=1, tokenizer=None, **SWITCHES["gqa-rotary"])
    g = circuits.build_graph(model)
    layout = cp.graph_layout(g)
    assert [label for _, label in layout.columns][:3] == ["embed", "L0 heads", "L0 MLP"]
    kv = next(d for d in g.downstream if "KV" in d and d.endswith(".k"))
    node, port = cp.receiver(g, kv)
    assert port == "k" and node in layout.pos
    fig = cp.circuit_figure(circuits.discover(_scores(g), n=30))
    assert len(_edge_traces(fig)) <= 30


def test_click_targets_of_edges_that_share_a_midpoint_are_apart(graph):
    """L0H3 → L1H1.k and L0H2 → L1H2.k cross at the same midpoint; the stronger keeps it."""
    circuit = _circuit(graph, 14, {**STRONG, ("L0H2", "L1H2.k"): 0.15, ("L1H2", "logits"): 0.5})
    mids = _midpoints(cp.circuit_figure(circuit))
    spot = {(d[1], d[2]): (x, y) for d, x, y in zip(mids.customdata, mids.x, mids.y)}
    assert spot[KEY_EDGE] == pytest.approx(((1 + 2 - cp.PORT_DX) / 2, 2.0))
    other = spot[("L0H2", "L1H2.k")]
    assert math.dist(other, spot[KEY_EDGE]) >= cp.MARKER_GAP
    assert other[1] == pytest.approx(2.0)  # still on its own (horizontal) edge
    points = list(spot.values())
    assert min(math.dist(a, b) for i, a in enumerate(points) for b in points[i + 1:]) >= cp.MARKER_GAP


def test_clicks_are_read_from_the_selection_event():
    assert cp.clicked({"selection": {"points": [{"customdata": ["head", 1, 2]}]}}) == ("head", 1, 2)
    assert cp.clicked({"selection": {"points": [{"customdata": ["edge", "L0H3", "L1H1.k"]}]}}) == ("edge", "L0H3", "L1H1.k")
    assert cp.clicked({"selection": {"points": [{"customdata": ["node", "embed"]}, {"x": 1}]}}) is None
    assert cp.clicked(None) is None and cp.clicked({"selection": {"points": []}}) is None


def test_svg_parses_has_one_line_per_drawn_edge_and_escapes_text(graph):
    circuit = _circuit(graph, graph.n_edges, STRONG)
    title = 'Circuit of <script>alert("x")</script> & "quotes"'
    svg = cp.circuit_svg(circuit, title)
    root = ET.fromstring(svg)
    ns = {"s": "http://www.w3.org/2000/svg"}
    lines = [e for e in root if e.get("class") == "edge"]  # a <line>, or a <path> where the edge is curved
    assert len(lines) == len(cp.drawn_edges(circuit)) == 60
    assert {e.tag for e in lines} == {"{http://www.w3.org/2000/svg}line", "{http://www.w3.org/2000/svg}path"}
    assert len(root.findall(".//s:line", ns)) + len(root.findall(".//s:path", ns)) == 60  # nothing else is a line
    assert root.find("s:title", ns).text == title  # escaped in the file, the same text once parsed
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    tips = [line.find("s:title", ns).text for line in lines]
    assert any(t.startswith("L0H3 → L1H1 (key input): score +0.570 of the clean − corrupted gap") for t in tips)
    dashes = {t.split(":")[0]: line.get("stroke-dasharray") for t, line in zip(tips, lines)}
    assert dashes["L0H3 → L1H1 (key input)"] == cp.SVG_DASH["k"] and dashes["L1H1 → logits"] is None
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "+ 21 more edges not drawn" in " ".join(t or "" for t in texts)
    # Same layout as the figure: the key edge ends at L1H1's key port in both.
    width = int(root.get("width"))
    key = next(line for t, line in zip(tips, lines) if t.startswith("L0H3 → L1H1 (key"))
    assert key.tag.endswith("line")  # nothing in its way: straight
    x_end = float(key.get("x2"))
    (lo, hi) = cp.graph_layout(graph).x_range
    assert x_end == pytest.approx(70 + (2 - cp.PORT_DX - lo) / (hi - lo) * (width - 70 - 190), abs=0.01)


def test_faithfulness_figure_marks_the_chosen_n_and_the_80_percent_line():
    curve = circuits.Curve([1, 3, 10, 81], [0, 3, 9, 81], torch.zeros(4), torch.tensor([0.0, 0.3, 0.85, 1.0]))
    fig = cp.faithfulness_figure(curve, 10, 0.85)
    assert fig.layout.xaxis.type == "log" and list(fig.data[0].x) == [1, 3, 10, 81]
    assert list(fig.data[0].customdata) == [0, 3, 9, 81]
    assert list(fig.data[1].x) == [10] and list(fig.data[1].y) == [0.85]
    assert fig.layout.shapes[0].y0 == 0.8
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 5, 10, 20, 50]


def test_path_heatmap_shows_what_each_path_carries(zoo_model):
    values = torch.tensor([[1.001, 0.9, 0.5, 0.2], [float("nan")] * 4])  # normalised metric after patching
    result = PathPatchingResult(values, values * 2, NORM, ((1, 1),), "k", (("L0", "L1"), ("H0", "H1", "H2", "H3")),
                                "Path patching: each head → L1H1.k", "logit difference")
    fig = cp.path_heatmap(result, selected=(0, 3))
    heat = fig.data[0]
    assert heat.z[0][3] == pytest.approx(0.8) and heat.z[0][0] == pytest.approx(-0.001, abs=1e-6)
    assert all(math.isnan(v) for v in heat.z[1])
    assert list(heat.text[1]) == ["", "", "", ""] and heat.text[0][3] == "+0.80"
    assert heat.text[0][0] == "+0.00"  # −0.001 rounds to 0: no "−0.00"
    assert heat.zmin == pytest.approx(-0.8) and heat.zmax == pytest.approx(0.8)
    assert "L0H3 → L1H1.k" in heat.customdata[0][3] and "cannot reach" in heat.customdata[1][0]
    assert fig.layout.shapes[0].x0 == 2.5 and fig.layout.title.text == result.title
    assert [list(c) for c in fig.data[1].customdata][:2] == [[0, 0], [0, 1]]  # cells open their head


def test_composition_copying_scatter_minimality_and_ov_table(zoo_model):
    scores = torch.full((2, 4, 2, 4), float("nan"))
    scores[0, :, 1, :] = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 40
    summary = CompositionSummary("K", scores, 0.1, 0.02, 0.2, torch.zeros(10))
    fig = cp.composition_heatmap(summary)
    heat = fig.data[0]
    assert list(heat.y) == ["L0H0", "L0H1", "L0H2", "L0H3"] and list(heat.x) == ["L1H0", "L1H1", "L1H2", "L1H3"]
    assert heat.z[3][1] == pytest.approx(13 / 40)
    assert "above the random baseline" in heat.customdata[3][1] and "within the random baseline" in heat.customdata[0][0]
    assert heat.text[3][1] == "0.32*" and heat.text[0][0] == "0.00"  # 13 / 40 is 0.32499… in float32

    copying = cp.copying_heatmap(torch.tensor([[0.1, -0.5, 0.9, 0.0], [0.2, 0.95, 0.3, -0.1]]), (1, 1))
    assert copying.data[0].zmin == -1 and copying.data[0].zmax == 1 and copying.layout.shapes[0].y0 == 0.5

    graph = circuits.build_graph(zoo_model)
    exact, estimate = _scores(graph, STRONG, seed=0), _scores(graph, STRONG, seed=1)
    agree = circuits.agreement(exact, estimate)
    scatter = cp.edge_scatter(exact, estimate, agree, "EAP")
    assert len(scatter.data[1].x) == graph.n_edges == agree["edges"]
    assert f"r = {agree['correlation']:.3f}" in scatter.layout.title.text
    assert any("L0H3 → L1H1 (key input)" in c for c in scatter.data[1].customdata)

    check = circuits.NodeCheck([("L0H3",), ("L1H1",)], torch.tensor([0.5, 1.9]), torch.tensor([1.9, 1.9]),
                               torch.tensor([0.7, 0.0]), NORM)
    bar = cp.minimality_bar(check)
    assert list(bar.data[0].x) == ["L0H3", "L1H1"] and list(bar.data[0].y) == pytest.approx([0.7, 0.0])

    rows = cp.ov_table([(5, [(5, 2.0), (7, 1.0)])], lambda t: {5: "<b>x</b>", 7: "y"}[t])
    assert rows == [{"source token": "<b>x</b>", "top output tokens (value)": "'<b>x</b>' (+2.00), 'y' (+1.00)"}]
