"""The Circuits page (AppTest): what it opens on, every method and view, the numbers against
independent TransformerLens hooks or the weights, the JSON download, and every bad input.

Results are kept process-wide (core/ui/cache.py), so the tests after the first reuse the runs
and scores of the default view."""
import copy
import json

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core import circuits, composition, tasks
from core.ui import cache
from tests.helpers import APP, figure_spec, heatmap_z, open_app, plain

EDGE = ["edge", "L0H3", "L1H1.k"]  # the induction model's previous-token head → its induction head's key


@pytest.fixture(scope="module")
def induction(zoo_model):
    """The task the page opens on: induction, its earlier match replaced (the key path)."""
    return tasks.make_task("induction", zoo_model, n=32, seed=0, split="held_out", corruption="match")


@pytest.fixture(scope="module")
def app():
    """The page on its default view (the default model, typed prompt → the model's demo task)."""
    return open_app(page="circuits")


def _graph(at) -> dict:
    return figure_spec(at, "on paths from the embeddings to the logits")


def _midpoints(spec) -> dict:
    trace = next(t for t in spec["data"] if t.get("name") == "edges (click one)")
    return {tuple(c[1:]): h for c, h in zip(trace["customdata"], trace["hovertext"])}


def _metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


@torch.no_grad()
def _hand_edge_score(model, task, sender: tuple[int, int], receiver: tuple[int, int], which: str) -> float:
    """(M_clean − M_patched) / (M_clean − M_corrupted), the edge sender → receiver.which patched by
    adding (corrupted − clean) sender output to that one input, with TL's own split-input hooks."""
    m = copy.deepcopy(model)
    m.set_use_split_qkv_input(True)
    m.set_use_attn_result(True)
    name = f"blocks.{sender[0]}.attn.hook_result"
    _, clean = m.run_with_cache(task.clean_tokens, names_filter=name)
    _, corrupted = m.run_with_cache(task.corrupted_tokens, names_filter=name)
    delta = corrupted[name][:, :, sender[1]] - clean[name][:, :, sender[1]]

    def hook(act, hook):
        act = act.clone()
        act[:, :, receiver[1]] += delta
        return act

    m_clean = float(task.metric(m(task.clean_tokens)))
    m_corrupted = float(task.metric(m(task.corrupted_tokens)))
    patched = float(task.metric(m.run_with_hooks(task.clean_tokens, fwd_hooks=[(f"blocks.{receiver[0]}.hook_{which}_input", hook)])))
    return (m_clean - patched) / (m_clean - m_corrupted)


def test_first_load_shows_the_induction_circuit_with_the_key_edge(app, zoo_model, induction):
    at = app
    assert not at.exception and not at.error and not at.warning
    assert at.selectbox(key="circ_pair").value == "demo" and at.selectbox(key="circ_corruption").value == "match"
    assert at.segmented_control(key="circ_method").value == "exact"  # 81 edges: exact is affordable
    spec = _graph(at)
    edges = _midpoints(spec)
    assert ("L0H3", "L1H1.k") in edges
    score = _hand_edge_score(zoo_model, induction, (0, 3), (1, 1), "k")
    assert score > 0.3
    assert f"L0H3 → L1H1 (key input)</b><br>score: {score:+.3f} of the clean − corrupted gap" in edges[("L0H3", "L1H1.k")]
    # The N slider opens on the smallest top-N circuit keeping 80% of the behaviour, marked on the curve.
    n = at.slider(key="circ_n").value
    curve = figure_spec(at, "Faithfulness of the top-N circuits")
    xs, ys = curve["data"][0]["x"], curve["data"][0]["y"]
    assert n == next(x for x, y in zip(xs, ys) if y >= 0.8)
    assert all(y < 0.8 for x, y in zip(xs, ys) if x < n)
    assert curve["data"][1]["x"] == [n] and curve["layout"]["xaxis"]["type"] == "log"
    assert f"Top {n} edges by Exact score" in spec["layout"]["title"]["text"]
    metrics = _metrics(at)
    assert metrics["Faithfulness"] == f"{curve['data'][1]['y'][0]:.2f}" and float(metrics["Faithfulness"]) >= 0.8
    kept = int(metrics["Edges kept"].split(" / ")[0])
    assert metrics["Edges kept"] == f"{kept} / 81" and len(edges) == kept
    # Faithfulness is (circuit − corrupted) / (clean − corrupted), from the metrics shown.
    base = tasks.baselines(zoo_model, induction)
    assert float(metrics["Faithfulness"]) == pytest.approx(
        (float(metrics["Circuit metric"]) - base.corrupted) / (base.clean - base.corrupted), abs=0.01)
    # The path-patching view opens on the strongest path to the logits and that head's busiest input.
    assert at.multiselect(key="circ_pp_receivers").value == ["L1H1"] and at.segmented_control(key="circ_pp_input").value == "k"


def test_the_n_slider_redraws_the_circuit_and_an_n_too_small_is_a_message(app):
    at = app
    at.slider(key="circ_n").set_value(40).run()
    assert not at.exception
    spec = _graph(at)
    assert "Top 40 edges" in spec["layout"]["title"]["text"]
    kept = int(_metrics(at)["Edges kept"].split(" / ")[0])
    assert 0 < kept <= 40 and len(_midpoints(spec)) == kept
    at.slider(key="circ_n").set_value(1).run()
    assert not at.exception
    assert "The top 1 edges form no path from the embeddings to the logits; raise N." in [w.value for w in at.warning]
    assert figure_spec(at, "Faithfulness of the top-N circuits")  # the curve stays, to pick N from
    at.slider(key="circ_n").set_value(16).run()


def test_an_n_beyond_the_edge_count_is_clamped(app):
    """No slider sends one, and core refuses it; a session's stale N (a larger model's) is clamped
    before the slider is drawn."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["page"] = "circuits"
    at.session_state["_circ_n_for"] = app.session_state["_circ_n_for"]  # the same view: no reset to the default
    at.session_state["circ_n"] = 10_000
    at.run()
    assert not at.exception and not at.error
    assert at.slider(key="circ_n").value == 81
    assert "Top 81 edges" in _graph(at)["layout"]["title"]["text"]


@torch.no_grad()
def _hand_path(model, task, sender: tuple[int, int], receiver: tuple[int, int] | None, which: str = "k") -> float:
    """1 − normalised metric of a path-patched run on the 2-layer attention-only model, by hand: the
    sender's z from the corrupted run (every other head is clean there: nothing before it changed);
    to the logits: that run's metric; to a layer-1 receiver: its `which` recorded in that run, then
    the clean run with only that activation replaced."""
    names = lambda n: n.endswith("hook_z")  # noqa: E731
    _, corrupted = model.run_with_cache(task.corrupted_tokens, names_filter=names)
    z_name = f"blocks.{sender[0]}.attn.hook_z"

    def send(z, hook):
        z[:, :, sender[1]] = corrupted[z_name][:, :, sender[1]]
        return z

    if receiver is None:
        metric = float(task.metric(model.run_with_hooks(task.clean_tokens, fwd_hooks=[(z_name, send)])))
    else:
        name, recorded = f"blocks.{receiver[0]}.attn.hook_{which}", {}

        def record(act, hook):
            recorded["act"] = act[:, :, receiver[1]].clone()
            return act

        def patch(act, hook):
            act[:, :, receiver[1]] = recorded["act"]
            return act

        model.run_with_hooks(task.clean_tokens, fwd_hooks=[(z_name, send), (name, record)])
        metric = float(task.metric(model.run_with_hooks(task.clean_tokens, fwd_hooks=[(name, patch)])))
    base = tasks.baselines(model, task)
    return 1 - (metric - base.corrupted) / (base.clean - base.corrupted)


def test_the_path_patching_view_shows_a_clicked_edge(zoo_model, induction):
    at = open_app(page="circuits")
    at.segmented_control(key="circ_detail").set_value("weights").run()
    # What the graph's callback does for a click on the L0H3 → L1H1.k diamond (Chromium clicks it for real).
    model_id = at.session_state["_circ_method_for"]
    at.session_state["circ_pp_edge"] = ["L0H3", "L1H1.k", model_id, cache.task_key(induction)]
    at.session_state["circ_pp_receivers"] = ["L1H1"]
    at.session_state["circ_pp_input"] = "k"
    at.session_state["circ_detail"] = "paths"
    at.run()
    assert not at.exception
    assert "Showing the path L0H3 → L1H1.k." in [i.value for i in at.info]
    spec = figure_spec(at, "Path patching: each head → L1H1.k")
    grid = heatmap_z(spec["data"][0])
    assert np.isnan(grid[1]).all()  # layer-1 senders cannot reach a layer-1 receiver
    shape = spec["layout"]["shapes"][0]
    assert (shape["x0"], shape["y0"]) == (2.5, -0.5)  # the edge's sender, L0H3, outlined
    for h in range(4):
        assert grid[0, h] == pytest.approx(_hand_path(zoo_model, induction, (0, h), (1, 1), "k"), abs=1e-4)
    to_logits = heatmap_z(figure_spec(at, "Path patching: each head → logits")["data"][0])
    assert to_logits[1, 1] == pytest.approx(_hand_path(zoo_model, induction, (1, 1), None), abs=1e-4)
    # Another input of the same receiver: the banner goes, the heatmap follows.
    at.segmented_control(key="circ_pp_input").set_value("v").run()
    assert not at.exception and not [i for i in at.info if "Showing the path" in i.value]
    assert figure_spec(at, "Path patching: each head → L1H1.v")
    # An edge clicked on another model or task is forgotten.
    at.session_state["circ_pp_edge"] = ["L0H3", "L1H1.k", "another model", "another task"]
    at.run()
    assert not at.exception and "circ_pp_edge" not in at.session_state


def test_clicking_a_head_in_the_graph_opens_it_on_the_attention_page_and_coming_back_keeps_the_view():
    at = open_app(page="circuits")
    at.slider(key="circ_n").set_value(24).run()
    at.session_state["_circ_open_head"] = (1, 1)  # what the graph's callback leaves for a click on L1H1
    at.run()
    assert not at.exception
    assert (at.selectbox(key="layer").value, at.selectbox(key="head").value) == (1, 1)
    assert figure_spec(at, "L1H1 attention pattern")
    at.switch_page("pages/circuits.py").run()
    assert not at.exception and at.slider(key="circ_n").value == 24
    assert "Top 24 edges" in _graph(at)["layout"]["title"]["text"]


@pytest.mark.slow  # a secondary view of the page: CI runs it, development runs skip it
def test_each_method_draws_its_circuit(app):
    at = app
    at.slider(key="circ_n").set_value(20).run()
    for method, label in (("eap", "EAP"), ("eap-ig", "EAP-IG")):
        at.segmented_control(key="circ_method").set_value(method).run()
        assert not at.exception
        spec = _graph(at)
        assert f"by {label} score" in spec["layout"]["title"]["text"]
        assert ("L0H3", "L1H1.k") in _midpoints(spec), method
        assert f"({label} scores)" in figure_spec(at, "Faithfulness of the top-N circuits")["layout"]["title"]["text"]
    at.slider(key="circ_steps").set_value(4).run()
    assert not at.exception and at.slider(key="circ_steps").value == 4
    at.segmented_control(key="circ_method").set_value("acdc").run()
    assert not at.exception
    # 81 edges: ACDC runs at once (a button asks first on graphs of more than 1000 edges)
    assert not any("press the button" in i.value for i in at.info)
    spec = figure_spec(at, "ACDC circuit (τ = 0.020)")
    assert ("L0H3", "L1H1.k") in _midpoints(spec)
    acdc_point = figure_spec(at, "ACDC against the top-N circuits")["data"][1]
    assert acdc_point["name"] == "ACDC, τ = 0.020" and acdc_point["y"][0] == pytest.approx(float(_metrics(at)["Faithfulness"]), abs=0.005)
    at.run()  # a τ already run shows at once (cached)
    assert figure_spec(at, "ACDC circuit (τ = 0.020)")
    at.segmented_control(key="circ_method").set_value("exact").run()


@pytest.mark.slow  # a secondary view of the page: CI runs it, development runs skip it
def test_weights_view_composition_copying_and_ov(app, zoo_model):
    at = app
    at.segmented_control(key="circ_detail").set_value("weights").run()
    assert not at.exception
    spec = figure_spec(at, "K-composition: sender (row) → receiver (column)")
    z = heatmap_z(spec["data"][0])
    assert spec["data"][0]["y"] == [f"L0H{h}" for h in range(4)] and spec["data"][0]["x"] == [f"L1H{h}" for h in range(4)]
    # K-composition of L0H3 into L1H1 from the raw weights, in float64.
    w = {k: getattr(zoo_model, k).detach().double() for k in ("W_Q", "W_K", "W_V", "W_O")}
    ov = w["W_V"][0, 3] @ w["W_O"][0, 3]
    qk_t = w["W_K"][1, 1] @ w["W_Q"][1, 1].T
    hand = float(torch.linalg.norm(ov @ qk_t) / (torch.linalg.norm(ov) * torch.linalg.norm(qk_t)))
    assert z[3, 1] == pytest.approx(hand, rel=1e-4)
    base = composition.random_baseline(zoo_model, "K")
    caption = " ".join(c.value for c in at.caption)
    assert f"mean {base['mean']:.3f}" in caption and f"95th percentile {base['p95']:.3f}" in caption
    assert ("above" if hand > base["p95"] else "within") in spec["data"][0]["customdata"][3][1]
    copying = heatmap_z(figure_spec(at, "Copying score")["data"][0])
    np.testing.assert_allclose(copying, composition.copying_scores(zoo_model).numpy(), atol=1e-5)
    layer, head = divmod(int(np.nanargmax(copying)), 4)
    assert at.selectbox(key="circ_ov_head").value == f"L{layer}H{head}"
    table = at.dataframe[0].value
    top = composition.top_ov_mappings(zoo_model, layer, head, 10)
    assert list(table["source token"]) == [zoo_model.tokenizer.decode([s]) for s, _ in top]
    at.segmented_control(key="circ_comp_kind").set_value("V").run()
    assert not at.exception and figure_spec(at, "V-composition")
    at.segmented_control(key="circ_detail").set_value("paths").run()


def test_compare_view_scatter_and_agreement(app):
    at = app
    at.segmented_control(key="circ_detail").set_value("compare").run()
    assert not at.exception
    spec = figure_spec(at, "against exact edge patching")
    x, y = np.array(spec["data"][1]["x"]), np.array(spec["data"][1]["y"])
    assert len(x) == 81  # every edge of the graph
    r = np.corrcoef(x, y)[0, 1]
    assert _metrics(at)["Correlation (Pearson r)"] == f"{r:.3f}" and f"(r = {r:.3f}" in spec["layout"]["title"]["text"]
    top_x = set(np.argsort(-np.abs(x), kind="stable")[:20])
    top_y = set(np.argsort(-np.abs(y), kind="stable")[:20])
    assert _metrics(at)["Top-20 overlap"] == f"{len(top_x & top_y) / 20:.0%}"
    at.segmented_control(key="circ_cmp_method").set_value("eap").run()
    assert not at.exception and figure_spec(at, "EAP against exact edge patching")
    at.segmented_control(key="circ_detail").set_value("paths").run()


def test_is_this_the_mechanism_minimality_and_completeness(app, zoo_model, induction):
    at = app
    at.slider(key="circ_n").set_value(16).run()
    at.segmented_control(key="circ_detail").set_value("mechanism").run()
    assert not at.exception
    bars = figure_spec(at, "Minimality")["data"][0]
    graph_nodes = [n for n in _graph_nodes(at) if n not in ("embed", "logits")]
    assert bars["x"] == graph_nodes
    assert all(v >= 0 for v in bars["y"])
    chosen = at.multiselect(key="circ_complete_nodes").value
    assert chosen == [bars["x"][int(np.argmax(bars["y"]))]]
    metrics = _metrics(at)
    without_c = float(metrics[f"Circuit without {chosen[0]}"])
    without_m = float(metrics[f"Whole model without {chosen[0]}"])
    base = tasks.baselines(zoo_model, induction)
    gap = base.clean - base.corrupted
    assert float(metrics["Incompleteness |F(C ∖ K) − F(M ∖ K)|"]) == pytest.approx(abs(without_c - without_m) / gap, abs=2e-3)
    assert any("Completeness (Wang et al. 2022)" in c.value for c in at.caption)
    assert any("Minimality (Wang et al. 2022)" in c.value for c in at.caption)
    at.multiselect(key="circ_complete_nodes").set_value(["L0H3", "L1H1"]).run()
    assert not at.exception and "Circuit without L0H3, L1H1" in _metrics(at)
    at.segmented_control(key="circ_detail").set_value("paths").run()


def _graph_nodes(at) -> list[str]:
    """The nodes the graph draws in colour (those in the circuit), in graph order."""
    names = []
    for t in _graph(at)["data"]:
        if t.get("name", "").endswith("nodes"):
            for data, colour in zip(t["customdata"], t["marker"]["color"]):
                if colour != "#d9d9d9":
                    names.append(f"L{data[1]}H{data[2]}" if data[0] == "head" else data[1])
    return names


def test_the_json_download_is_the_circuit(app, monkeypatch):
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    saved = []
    real = MemoryMediaFileStorage.load_and_get_id
    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id",
                        lambda self, data, mimetype, kind, filename=None: saved.append((mimetype, filename, data))
                        or real(self, data, mimetype, kind, filename))
    at = app
    at.slider(key="circ_n").set_value(16).run()
    assert not at.exception
    got = {mime: (name, data) for mime, name, data in saved}
    name, data = got["application/json"]
    doc = json.loads(data)
    assert name == "circuit-induction.json"
    assert doc["model"] == "ce-induction-2l" and doc["method"] == "exact" and doc["requested_edges"] == 16
    assert "corruption match" in doc["task"] and doc["n_edges_in_graph"] == 81
    edges = {(e["from"], e["to"]): e["score"] for e in doc["edges"]}
    hover = _midpoints(_graph(at))
    assert set(edges) == set(hover) and doc["n_edges"] == len(edges)
    assert f"score: {edges[('L0H3', 'L1H1.k')]:+.3f}" in hover[("L0H3", "L1H1.k")]
    assert f"{doc['faithfulness']:.2f}" == _metrics(at)["Faithfulness"]
    svg_name, svg = got["image/svg+xml"]
    assert svg_name == "circuit-induction.svg" and svg.decode().count('<line class="edge"') == len(edges)


# ---------------------------------------------------------------------------------------------
# Bad input: a message in the page, never a traceback
# ---------------------------------------------------------------------------------------------


def test_a_task_whose_corrupted_prompts_do_not_match_is_a_message(monkeypatch, zoo_model):
    real = cache.induction_task

    def broken(model, corruption, *args, **kwargs):
        task = copy.copy(real(model, corruption, *args, **kwargs))
        task.corrupted_tokens = task.corrupted_tokens[:, :-1]
        return task

    monkeypatch.setattr(cache, "induction_task", broken)
    at = open_app(page="circuits")
    assert not at.exception
    assert any("no corrupted prompt for each clean one" in plain(w.value) for w in at.warning)
    assert not [c for c in at.get("plotly_chart")]


def test_a_model_the_graph_cannot_describe_is_a_message(monkeypatch):
    real = circuits.check_model

    def parallel(model):  # the same model, as if it ran attention and the MLP in parallel (GPT-J)
        stub = copy.copy(model.cfg)
        stub.parallel_attn_mlp = True
        real(type("Stub", (), {"cfg": stub})())

    monkeypatch.setattr(circuits, "check_model", parallel)
    at = open_app(page="circuits")
    assert not at.exception
    assert not at.error  # not the user's mistake: a warning that says why and what works
    assert any("cannot describe ce-induction-2l" in plain(e.value) and "in parallel" in plain(e.value)
               and "Every other page works on it" in plain(e.value) for e in at.warning)
    assert not at.get("plotly_chart")


def test_a_typed_pair_answer_of_several_tokens_and_a_pair_that_scores_the_same():
    at = open_app(page="circuits")
    at.selectbox(key="circ_pair").set_value("typed").run()
    assert not at.exception
    # The default pair is the prompt twice: both runs score the same.
    assert any("The clean and corrupted runs score the same" in w.value for w in at.warning)
    assert not at.get("plotly_chart")
    at.text_input(key="pair_answer").set_value("green king").run()
    assert not at.exception
    assert any("is 2 tokens" in plain(w.value) and "must be a single token" in plain(w.value) for w in at.warning)
    assert not at.get("plotly_chart")


def test_the_sidebars_induction_task_and_the_value_path():
    """With induction chosen in the sidebar the page analyses its whole batch; "the token that followed
    it" corrupts the copied token instead (the value path), and the circuit changes with it."""
    at = open_app(page="circuits", source="induction", example="3")
    assert not at.exception and not at.error
    assert "circ_pair" not in [s.key for s in at.selectbox]  # the sidebar chose the task
    assert "Top " in _graph(at)["layout"]["title"]["text"] and ("L0H3", "L1H1.k") in _midpoints(_graph(at))
    at.selectbox(key="circ_corruption").set_value("continuation").run()
    assert not at.exception
    edges = _midpoints(_graph(at))
    # The induction head now copies the wrong token: its value input from the embeddings carries the
    # behaviour, and the previous-token head's key edge (nothing changed where it looks) drops out.
    assert ("embed", "L1H1.v") in edges and ("L1H1", "logits") in edges
    assert ("L0H3", "L1H1.k") not in edges
    assert "the token that followed it (value path)" in at.selectbox(key="circ_corruption").format_func("continuation")


@pytest.mark.slow  # a secondary view of the page: CI runs it, development runs skip it
def test_the_ioi_model_opens_on_its_ioi_circuit():
    at = open_app(page="circuits", model="ce-circuits-3l-attn")
    assert not at.exception and not at.error
    assert at.selectbox(key="circ_pair").value == "demo" and "IOI" in at.selectbox(key="circ_pair").format_func("demo")
    assert float(_metrics(at)["Faithfulness"]) >= 0.8
    assert len(_midpoints(_graph(at))) >= 5


@pytest.mark.slow  # a secondary view: CI runs it
def test_a_behaviour_the_model_barely_shows_gets_no_faithfulness_number():
    """ce-circuits-3l-mlp barely separates induction's clean and match-broken runs (gap ≈ 0.1):
    the page says so, and faithfulness (a division by that gap) is not shown as a number."""
    at = open_app(page="circuits", model="ce-circuits-3l-mlp", source="induction")
    assert not at.exception
    assert any("does not show this behaviour" in w.value for w in at.warning)
    assert _metrics(at)["Faithfulness"] == "n/a"
