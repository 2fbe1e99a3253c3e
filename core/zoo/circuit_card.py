"""Discover a zoo model's circuit at the level of edges and record it beside the weights.

    python -m core.zoo.circuit_card assets/models/ce-circuits-3l-attn ioi
    python -m core.zoo.circuit_card assets/models/ce-induction-2l induction

Writes `circuit.json` (per task: the discovered circuit's edges with their exact scores, its
faithfulness, the faithfulness curve, EAP and EAP-IG against exact edge patching, ACDC's circuit)
and `circuit_<task>.svg` (the picture) into the model's folder, and the section "Circuit, edge by
edge" of its MODEL_CARD.md (between the markers below; lm_card.py and induction_card.py keep it
when they rewrite the card).

Method: resample ablation (each clean prompt's edges outside the circuit take their values from
its own corrupted prompt), exact edge patching scores (one edge at a time, batched), the circuit
= the top-N edges pruned to paths from the embeddings to the logits, N the smallest on the curve
whose circuit keeps ≥ 80 % of the clean − corrupted gap.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from core import circuits, tasks
from core.models import load_model

START, END = "<!-- circuit:start -->", "<!-- circuit:end -->"
EVAL_SEED, EVAL_BATCH = 1234, 32
LEVEL = 0.8
ACDC_THRESHOLD = 0.02
# The task each model is measured on: IOI on a trained template with held-out names; induction
# with the earlier occurrence of the last token replaced (the key path).
TASKS = {
    "ioi": dict(template="when_went", split="held_out"),
    "induction": dict(corruption="match"),
}
CURVE = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256]


def _r(x: float) -> float:
    return round(float(x), 4)


def measure(model_dir: Path, task_name: str) -> tuple[dict, circuits.Circuit]:
    """(the circuit.json entry of one task, the circuit)."""
    torch.manual_seed(0)
    model = load_model(str(model_dir))
    task = tasks.make_task(task_name, model, n=EVAL_BATCH, seed=EVAL_SEED, **TASKS[task_name])
    runs = circuits.task_runs(model, task)
    n_edges = runs.graph.n_edges
    exact = circuits.edge_patching(model, runs)
    ns = [n for n in CURVE if n < n_edges] + [n_edges]
    curve = circuits.faithfulness_curve(model, runs, exact, ns)
    n = curve.smallest_faithful(LEVEL) or n_edges
    circuit = circuits.discover(exact, n=n)
    evaluation = circuits.evaluate(model, runs, circuit)
    out = {
        "model": model.cfg.model_name, "task": task_name, "settings": {**TASKS[task_name], "seed": EVAL_SEED,
                                                                       "batch": EVAL_BATCH},
        "ablation": runs.ablation, "scores": "exact",
        "clean_metric": _r(runs.clean), "corrupted_metric": _r(runs.corrupted),
        "edges_in_graph": n_edges, "requested": n, "edges": circuit.n_edges,
        "faithfulness": _r(evaluation.faithfulness[0]), "nodes": circuit.nodes(),
        "edge_list": [{**e, "score": _r(e["score"])} for e in circuit.edge_list()],
        "curve": [{"requested": r, "edges": e, "faithfulness": _r(f)}
                  for r, e, f in zip(curve.requested, curve.n_edges, curve.faithfulness.tolist())],
        "estimates": {},
    }
    for method in ("eap", "eap-ig"):
        est = circuits.score_edges(model, runs, method)
        agree = circuits.agreement(exact, est)
        out["estimates"][method] = {"correlation": _r(agree["correlation"]), "top20_overlap": _r(agree["top_overlap"])}
    acdc = circuits.acdc(model, runs, ACDC_THRESHOLD)
    out["acdc"] = {"threshold": ACDC_THRESHOLD, "edges": acdc.n_edges, "nodes": acdc.nodes(),
                   "faithfulness": _r(circuits.evaluate(model, runs, acdc).faithfulness[0])}
    return out, circuit


def section(model_dir: Path) -> str:
    """The card's circuit section from circuit.json (empty if there is none)."""
    path = Path(model_dir) / "circuit.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    lines = [START, "## Circuit, edge by edge", "",
             "Found by `python -m core.zoo.circuit_card` (Circuits page, `core/circuits.py`). The graph's nodes are the "
             "embeddings, every head (with separate query, key and value inputs) and the logits; an edge is one "
             "node's output read by another's input. Scores: exact edge patching (each edge's input from the "
             "corrupted prompt, one at a time), as a share of the clean − corrupted gap. Circuit: the top-N edges "
             "pruned to paths from the embeddings to the logits, N the smallest whose circuit keeps ≥ 80 % of the "
             "gap when every other edge takes its corrupted value (faithfulness).", ""]
    for task, c in data.items():
        share = c["edges"] / c["edges_in_graph"]
        settings = ", ".join(f"{k} {v}" for k, v in c["settings"].items())
        lines += [f"### {task} ({settings})", "",
                  f"![{task} circuit](circuit_{task}.svg)", "",
                  f"**{c['edges']} of {c['edges_in_graph']} edges ({share:.0%}) keep {c['faithfulness']:.0%} of the "
                  f"clean behaviour** (metric clean {c['clean_metric']:+.3f}, corrupted {c['corrupted_metric']:+.3f}). "
                  f"Nodes: {', '.join(c['nodes'])}.", "",
                  "| edge | score |", "|---|---|"]
        lines += [f"| {e['from']} → {e['to']} | {e['score']:+.3f} |" for e in c["edge_list"]]
        by_edges: dict[int, float] = {}
        for p in c["curve"]:  # several N can prune to the same circuit
            by_edges.setdefault(p["edges"], p["faithfulness"])
        curve = ", ".join(f"{e}: {f:.2f}" for e, f in by_edges.items())
        est = c["estimates"]
        lines += ["", f"Faithfulness by edges kept: {curve}.", "",
                  f"Estimates against exact edge patching, over every edge: EAP correlation "
                  f"{est['eap']['correlation']:.2f} (top-20 overlap {est['eap']['top20_overlap']:.0%}), EAP-IG "
                  f"{est['eap-ig']['correlation']:.2f} ({est['eap-ig']['top20_overlap']:.0%}). ACDC (τ = "
                  f"{c['acdc']['threshold']}): {c['acdc']['edges']} edges, faithfulness {c['acdc']['faithfulness']:.2f}, "
                  f"nodes {', '.join(c['acdc']['nodes'])}.", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def with_section(card: str, model_dir: Path) -> str:
    """`card` with the circuit section (from circuit.json) in place of any earlier one."""
    if START in card and END in card:
        card = card[:card.index(START)].rstrip("\n") + "\n" + card[card.index(END) + len(END):].lstrip("\n")
    extra = section(model_dir)
    return card.rstrip("\n") + "\n\n" + extra if extra else card


def main() -> None:
    from core import circuit_plots

    model_dir = Path(sys.argv[1])
    names = sys.argv[2:] or ["ioi"]
    path = model_dir / "circuit.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        entry, circuit = measure(model_dir, name)
        data[name] = entry
        title = f"{entry['model']}: {name}, {entry['edges']} edges, faithfulness {entry['faithfulness']:.2f}"
        (model_dir / f"circuit_{name}.svg").write_text(circuit_plots.circuit_svg(circuit, title=title))
        print(json.dumps({k: entry[k] for k in ("edges", "edges_in_graph", "faithfulness", "nodes")}))
    path.write_text(json.dumps(data, indent=2) + "\n")
    card = model_dir / "MODEL_CARD.md"
    card.write_text(with_section(card.read_text(), model_dir))


if __name__ == "__main__":
    main()
