"""The zoo models' circuits, edge by edge: what the Circuits page opens on and what the cards record.

- ce-induction-2l, induction with the earlier occurrence of the last token replaced (the key
  path): the previous-token head → induction head key edge is among the top edges, the query
  edges from the same head are at the bottom, and a small circuit keeps the behaviour.
- ce-circuits-3l-attn, IOI on a trained template: the recorded circuit is faithful (≥ 0.8) and
  holds the card's IOI heads; re-measuring gives the committed edge list (slow).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from core import circuits as C
from core.models import load_model
from core.paths import ZOO_DIR
from core.tasks import make_task
from core.zoo import circuit_card


@pytest.fixture(scope="module")
def induction():
    model = load_model("ce-induction-2l")
    task = make_task("induction", model, corruption="match")
    runs = C.task_runs(model, task)
    return model, runs


@pytest.fixture(scope="module")
def exact(induction):
    model, runs = induction
    return C.edge_patching(model, runs)


@pytest.mark.parametrize("method", ["exact", "eap-ig"])
def test_induction_key_edge_is_a_top_edge_and_query_edges_are_far_below(induction, exact, method):
    model, runs = induction
    scores = exact if method == "exact" else C.edge_attribution(model, runs, "eap-ig", steps=8)
    n = runs.graph.n_edges
    k_rank = scores.rank("L0H3", "L1H1.k")  # strongest previous-token head -> strongest induction head
    assert k_rank <= 10, scores.top(12)
    for h in range(4):
        assert scores.rank("L0H3", f"L1H{h}.q") > 0.75 * n  # the query side does not read the previous token
        assert scores.rank("L0H3", f"L1H{h}.v") > k_rank  # nor is it what gets copied
    assert scores.score("L0H3", "L1H1.k") > 0.1  # carries a real share of the behaviour


def test_induction_circuit_keeps_the_behaviour_with_a_fifth_of_the_edges(induction, exact):
    model, runs = induction
    curve = C.faithfulness_curve(model, runs, exact, ns=[8, 12, 14, 16, 20])
    n = curve.smallest_faithful(0.8)
    assert n is not None and n <= 0.2 * runs.graph.n_edges
    circuit = C.discover(exact, n=n)
    assert circuit.contains("L0H3", "L1H1.k")
    assert {"L0H3", "L1H1", "logits"} <= set(circuit.nodes())


def test_the_value_path_corruption_puts_the_copied_token_first(induction):
    """With the earlier continuation replaced instead, what changes is the copied token: the
    embeddings → induction heads' value edges lead, and the key edge carries nothing."""
    model, _ = induction
    runs = C.task_runs(model, make_task("induction", model, corruption="continuation"))
    scores = C.edge_patching(model, runs)
    top = scores.top(8)
    assert ("embed", "L1H1.v") in [(u, d) for u, d, _ in top]
    assert abs(scores.score("L0H3", "L1H1.k")) < 0.05


def _recorded(model: str) -> dict:
    return json.loads((ZOO_DIR / model / "circuit.json").read_text())


def test_recorded_ioi_circuit_is_faithful_and_holds_the_card_heads():
    c = _recorded("ce-circuits-3l-attn")["ioi"]
    assert c["faithfulness"] >= 0.8
    assert c["edges"] <= 0.1 * c["edges_in_graph"]
    assert {"L0H3", "L1H0", "L1H1", "L1H3"} <= set(c["nodes"])  # the card's IOI heads (activation patching)
    card = (ZOO_DIR / "ce-circuits-3l-attn" / "MODEL_CARD.md").read_text()
    assert "## Circuit, edge by edge" in card and "![ioi circuit](circuit_ioi.svg)" in card
    for e in c["edge_list"]:
        assert f"| {e['from']} → {e['to']} | {e['score']:+.3f} |" in card
    svg = ET.parse(ZOO_DIR / "ce-circuits-3l-attn" / "circuit_ioi.svg").getroot()
    assert svg.tag.endswith("svg")


def test_recorded_induction_circuit_has_the_key_edge():
    c = _recorded("ce-induction-2l")["induction"]
    assert c["faithfulness"] >= 0.8
    assert {"from": "L0H3", "to": "L1H1.k"} in [{k: e[k] for k in ("from", "to")} for e in c["edge_list"]]
    assert (ZOO_DIR / "ce-induction-2l" / "circuit_induction.svg").exists()


def test_card_section_is_replaced_not_repeated(tmp_path):
    (tmp_path / "circuit.json").write_text((ZOO_DIR / "ce-induction-2l" / "circuit.json").read_text())
    once = circuit_card.with_section("# Card\n\ntext\n", tmp_path)
    twice = circuit_card.with_section(once, tmp_path)
    assert once == twice and once.count(circuit_card.START) == 1 and once.startswith("# Card\n\ntext\n")


@pytest.mark.slow  # re-measures the committed circuits
@pytest.mark.parametrize("model,task", [("ce-circuits-3l-attn", "ioi"), ("ce-induction-2l", "induction")])
def test_recorded_circuits_reproduce(model, task):
    measured, _ = circuit_card.measure(ZOO_DIR / model, task)
    recorded = _recorded(model)[task]
    assert [(e["from"], e["to"]) for e in measured["edge_list"]] == [(e["from"], e["to"]) for e in recorded["edge_list"]]
    for m, r in zip(measured["edge_list"], recorded["edge_list"]):
        assert m["score"] == pytest.approx(r["score"], abs=2e-4)
    assert measured["faithfulness"] == pytest.approx(recorded["faithfulness"], abs=2e-4)
    assert measured["acdc"]["edges"] == recorded["acdc"]["edges"]
