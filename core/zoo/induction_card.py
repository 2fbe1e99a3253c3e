"""Measure the induction model's circuit and write its metrics.json and MODEL_CARD.md.

    python -m core.zoo.induction_card [MODEL_DIR]   # re-measure a checkpoint, rewrite the card

The test suite calls `measure` on the committed checkpoint and compares with metrics.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from core import attention
from core.models import ZOO_DIR, load_model

EVAL_SEED = 1234  # the training data uses other generators: these sequences are fresh
EVAL_SEQ_LEN = attention.DEFAULT_SEQ_LEN
EVAL_BATCH = attention.DEFAULT_BATCH


def measure(model_dir: Path) -> dict:
    """Head scores and Q/K/V composition ablations on fresh repeated random tokens."""
    torch.manual_seed(0)
    model = load_model(str(model_dir))
    tokens = attention.repeated_random_tokens(model, EVAL_SEQ_LEN, EVAL_BATCH, seed=EVAL_SEED)
    scores = attention.head_scores(model, tokens)
    last = model.cfg.n_layers - 1
    ind_head = int(scores["induction"][last].argmax())
    sources = attention.previous_token_heads(scores["previous_token"], before_layer=last)
    table = attention.composition_table(model, tokens, EVAL_SEQ_LEN, sources, (last, ind_head))
    return {
        "model": model.cfg.model_name,
        "eval": {"seed": EVAL_SEED, "seq_len": EVAL_SEQ_LEN, "batch": EVAL_BATCH},
        "head_scores": {k: [[round(float(x), 4) for x in row] for row in v] for k, v in scores.items()},
        "induction_head": [last, ind_head],
        "previous_token_heads": [list(s) for s in sources],
        "composition": {r.on: {"induction_score": round(r.target_score, 4), "loss": round(r.loss, 4)} for r in table},
    }


def write(model_dir: Path, metrics: dict) -> None:
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (model_dir / "MODEL_CARD.md").write_text(card_text(metrics))


def card_text(m: dict) -> str:
    L, H = m["induction_head"]
    prev = ", ".join(f"L{l}H{h}" for l, h in m["previous_token_heads"])
    s = m["head_scores"]
    c = m["composition"]
    rows = "\n".join(
        f"| {on} | {c[on]['induction_score']:.3f} | {c[on]['loss']:.3f} |" for on in ("none", "q", "k", "v")
    )
    grid = "\n".join(
        f"| L{l} | " + " | ".join(f"{s['previous_token'][l][h]:.2f} / {s['induction'][l][h]:.2f}" for h in range(len(s['induction'][l]))) + " |"
        for l in range(len(s["induction"]))
    )
    heads = len(s["induction"][0])
    t = m.get("training", {})
    return f"""# {m['model']}: a 2-layer attention-only induction model

Trained by `python -m core.zoo.train_induction` (seeded; {t.get('train_seconds', '?')} s on
{t.get('train_config', {}).get('threads', '?')} CPU thread(s), {t.get('train_config', {}).get('steps', '?')} steps)
on generated sequences of random words from the zoo's word vocabulary ({'{'}random lengths{'}'};
80% of them repeat a chunk of random length at a random offset). 2 layers, 4 heads of
d_head 16, d_model 64, LayerNorm, no MLPs, `shortformer` positional embeddings (added to
queries and keys only), context {t.get('train_config', {}).get('n_ctx', '?')} tokens.

## Known circuit: induction (Olsson et al. 2022)
Measured by `python -m core.zoo.induction_card` on fresh repeated random tokens (seed
{m['eval']['seed']}, {m['eval']['batch']} sequences of BOS + {m['eval']['seq_len']} random words + the same words again).

- **Induction head: L{L}H{H}**, induction score {s['induction'][L][H]:.3f}.
- **Previous-token head(s): {prev}** (score >= 0.3 in layer 0).
- **K-composition**: removing the previous-token heads' outputs from the *key* input of
  L{L}H{H} alone (TransformerLens split q/k/v inputs) is what breaks it:

| ablated input of L{L}H{H} | its induction score | repeated-half loss (nats) |
|---|---|---|
{rows}

Scores of every head (previous-token / induction; 1 = all attention on the target):

| layer | """ + " | ".join(f"H{h}" for h in range(heads)) + " |\n|---|" + "---|" * heads + f"""
{grid}

Head scores are the mean over query positions that have a target of the attention paid to the
target (TransformerLens `head_detector` patterns; its "mul" score divides by all positions).
"""


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ZOO_DIR / "ce-induction-2l"
    old = json.loads((target / "metrics.json").read_text()) if (target / "metrics.json").exists() else {}
    metrics = measure(target)
    if "training" in old:
        metrics["training"] = old["training"]
    write(target, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "training"}, indent=2))
