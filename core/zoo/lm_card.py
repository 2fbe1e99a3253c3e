"""Measure a zoo task model on held-out data and write its metrics.json and MODEL_CARD.md.

    python -m core.zoo.lm_card MODEL_DIR     # re-measure a checkpoint, rewrite its card

Task metrics come from `core.tasks` on held-out names and templates. The circuit section is
found by activation patching with TransformerLens's own `patching` functions, noising: each
head's output (or each MLP's) from the corrupted run is written into the clean run, and we
report the share of the clean-vs-corrupted metric gap that this removes. Roles are read from
the heads' attention on the clean IOI prompts. The test suite calls `measure` on the committed
checkpoints and compares with metrics.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformer_lens import patching

from core import attention, tasks
from core.models import load_model
from core.zoo import circuit_card

EVAL_SEED = 1234  # training draws from other generators: these prompts are fresh
EVAL_BATCH = 128
IND_SEQ_LEN = attention.DEFAULT_SEQ_LEN
IND_BATCH = attention.DEFAULT_BATCH
REQUIRED = {
    "ioi_accuracy": 0.95,
    "ioi_logit_diff": 3.0,
    "greater_than_prob_diff": 0.6,
    "sva_accuracy": 0.95,
    "induction_score": 0.7,
}
ROLE_ATTENTION = 0.3  # attention share that counts as "attends to"
CIRCUIT_TEMPLATES = {"ioi": "when_went"}
POSITIONS = {
    "standard": "learned absolute positions",
    "shortformer": "shortformer positions (learned, added to queries and keys only)",
    "rotary": "rotary positions",
}


def _r(x: float) -> float:
    return round(float(x), 4)


def _task_scores(model, task) -> dict:
    base = tasks.baselines(model, task)
    out = {"metric": _r(base.clean), "accuracy": _r(base.clean_accuracy), "corrupted_metric": _r(base.corrupted)}
    if task.name == "ioi":
        with torch.no_grad():
            correct = task.per_prompt(model(task.clean_tokens)) > 0
        for order in ("ABBA", "BABA"):
            rows = torch.tensor([o == order for o in task.info["orders"]])
            out[f"accuracy_{order.lower()}"] = _r(correct[rows].float().mean())
    return out


class Noising:
    """Noising one task: the clean and corrupted baselines and the corrupted run's cache, computed once."""

    def __init__(self, model, task):
        self.model, self.task = model, task
        self.base = tasks.baselines(model, task)
        with torch.no_grad():
            _, self.corrupted = model.run_with_cache(task.corrupted_tokens)

    def removed(self, metric):
        """Share of the clean - corrupted metric gap that a patched run's metric has lost."""
        return 1 - tasks.normalised(metric, self.base.clean, self.base.corrupted)

    def heads(self) -> torch.Tensor:
        """[layer, head]: noising each head's output (TransformerLens's own patching function)."""
        with torch.no_grad():
            patched = patching.get_act_patch_attn_head_out_all_pos(
                self.model, self.task.clean_tokens, self.corrupted, self.task.metric
            )
        return self.removed(patched)

    def mlps(self) -> torch.Tensor:
        """[layer]: noising each MLP layer's output at every position."""
        out = []
        for layer in range(self.model.cfg.n_layers):
            name = f"blocks.{layer}.hook_mlp_out"
            out.append(self._patched_metric([(name, lambda act, hook: self.corrupted[hook.name])]))
        return self.removed(torch.tensor(out))

    def head_group(self, heads: list[str]) -> float:
        """Noising several heads' outputs at once."""
        by_layer: dict[int, list[int]] = {}
        for h in heads:
            layer, head = attention.parse_head(h)
            by_layer.setdefault(layer, []).append(head)

        def hook(z, hook):
            hs = by_layer[hook.layer()]
            z[:, :, hs] = self.corrupted[hook.name][:, :, hs]
            return z

        return float(self.removed(self._patched_metric([(f"blocks.{layer}.attn.hook_z", hook) for layer in by_layer])))

    def _patched_metric(self, fwd_hooks) -> float:
        with torch.no_grad():
            return float(self.task.metric(self.model.run_with_hooks(self.task.clean_tokens, fwd_hooks=fwd_hooks)))


def head_noising(model, task) -> torch.Tensor:
    """[layer, head]: share of the clean - corrupted metric gap removed by noising each head's output."""
    return Noising(model, task).heads()


def ioi_attention_roles(model, task, prev_scores: torch.Tensor) -> dict:
    """Per head: attention from the last position to IO and S, from S2 to S1 and S1+1; a role."""
    _, cache = model.run_with_cache(task.clean_tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    toks = task.clean_tokens
    b = torch.arange(toks.shape[0])
    io_pos = (toks == task.answers[:, None]).float().argmax(1)
    s_mask = toks == task.wrongs[:, None]
    s1_pos = s_mask.float().argmax(1)
    s2_pos = s_mask.shape[1] - 1 - s_mask.flip(1).float().argmax(1)
    roles = {}
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
        for head in range(model.cfg.n_heads):
            p = pat[:, head]
            stats = {
                "end_to_io": _r(p[b, -1, io_pos].mean()),
                "end_to_s": _r((p[b, -1, s1_pos] + p[b, -1, s2_pos]).mean()),
                "s2_to_s1": _r(p[b, s2_pos, s1_pos].mean()),
                "s2_to_s1_plus_1": _r(p[b, s2_pos, s1_pos + 1].mean()),
                "previous_token_score": _r(prev_scores[layer, head]),
            }
            roles[f"L{layer}H{head}"] = {**stats, "role": _role(stats)}
    return roles


def _role(s: dict) -> str:
    if s["end_to_io"] >= ROLE_ATTENTION and s["end_to_io"] > s["end_to_s"]:
        return "name mover (the last position attends to the indirect object)"
    if s["end_to_s"] >= ROLE_ATTENTION:
        return "S-attending (the last position attends to the repeated name)"
    if s["s2_to_s1"] >= ROLE_ATTENTION:
        return "duplicate-token (the second S attends to the first)"
    if s["s2_to_s1_plus_1"] >= ROLE_ATTENTION:
        return "induction (the second S attends to the token after the first)"
    if s["previous_token_score"] >= attention.PREV_TOKEN_THRESHOLD:
        return "previous-token"
    return "other"


def _grid(t: torch.Tensor) -> list:
    return [[_r(x) for x in row] for row in t] if t.dim() == 2 else [_r(x) for x in t]


def _top_heads(removed: torch.Tensor, k: int = 4) -> list[dict]:
    flat = removed.flatten()
    order = flat.abs().argsort(descending=True)[:k]
    n_heads = removed.shape[1]
    return [{"head": f"L{int(i) // n_heads}H{int(i) % n_heads}", "removed": _r(flat[i])} for i in order]


def measure(model_dir: Path) -> dict:
    torch.manual_seed(0)
    model = load_model(str(model_dir))
    out: dict = {"model": model.cfg.model_name, "eval": {"seed": EVAL_SEED, "batch": EVAL_BATCH, "split": "held_out"}}

    def make(name, **kw):
        return tasks.make_task(name, model, n=EVAL_BATCH, seed=EVAL_SEED, **kw)

    # Task metrics: every template with held-out names; the held-out template is the headline.
    for name in ("ioi", "greater_than", "sva"):
        by_template = {}
        for tpl in tasks.templates(name):
            scores = _task_scores(model, make(name, template=tpl.name))
            scores["held_out_template"] = tpl.held_out
            if not tpl.headline:
                scores["stress_test"] = True
            by_template[tpl.name] = scores
        held = [t.name for t in tasks.templates(name) if t.held_out and t.headline]
        out[name] = {"held_out_templates": held, "by_template": by_template}
    # Agreement with the attractor of the same number as the subject (the easy case), for contrast.
    out["sva"]["same_number_attractor"] = {
        t: _task_scores(model, make("sva", template=t, attractor="same")) for t in out["sva"]["held_out_templates"]
    }
    ind_task = make("induction")
    out["induction"] = _task_scores(model, ind_task)

    rand = attention.repeated_random_tokens(model, IND_SEQ_LEN, IND_BATCH, seed=EVAL_SEED)
    scores = attention.head_scores(model, rand)
    ind = scores["induction"]
    best = divmod(int(ind.argmax()), model.cfg.n_heads)
    out["induction"].update(
        best_head=f"L{best[0]}H{best[1]}", best_head_score=_r(ind.max()),
        head_scores={k: _grid(v) for k, v in scores.items()},
    )
    out["headline"] = headline(out)

    # Circuits, by noising (corrupted -> clean), on the held-out template of each task.
    circuits = {}
    for name in ("ioi", "greater_than", "sva", "induction"):
        # IOI's circuit is read on held-out names in the first template (where the model does
        # the task); the others on their held-out template.
        task = ind_task if name == "induction" else make(name, template=CIRCUIT_TEMPLATES.get(name))
        noising = Noising(model, task)
        removed = noising.heads()
        entry = {"template": task.template, "head_noising_removed": _grid(removed), "top_heads": _top_heads(removed)}
        if not model.cfg.attn_only:
            entry["mlp_noising_removed"] = _grid(noising.mlps())
        if name == "ioi":
            roles = ioi_attention_roles(model, task, scores["previous_token"])
            for row in entry["top_heads"]:
                row.update(roles[row["head"]])
            entry["roles"] = roles
            movers = [h for h, r in roles.items() if r["role"].startswith("name mover")]
            entry["name_movers"] = movers
            if movers:
                entry["name_movers_noised_together"] = _r(noising.head_group(movers))
        circuits[name] = entry
    out["circuits"] = circuits
    return out


def headline(m: dict) -> dict:
    """The required metrics, each on held-out names and held-out templates."""
    ioi = [m["ioi"]["by_template"][t] for t in m["ioi"]["held_out_templates"]]
    gt = [m["greater_than"]["by_template"][t] for t in m["greater_than"]["held_out_templates"]]
    sva = [m["sva"]["by_template"][t] for t in m["sva"]["held_out_templates"]]
    return {
        "ioi_accuracy": min(s["accuracy"] for s in ioi),
        "ioi_logit_diff": min(s["metric"] for s in ioi),
        "greater_than_prob_diff": min(s["metric"] for s in gt),
        "sva_accuracy": min(s["accuracy"] for s in sva),
        "induction_score": m["induction"]["best_head_score"],
    }


def write(model_dir: Path, metrics: dict) -> None:
    model_dir = Path(model_dir)
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (model_dir / "MODEL_CARD.md").write_text(circuit_card.with_section(card_text(metrics), model_dir))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def card_text(m: dict) -> str:
    t = m.get("training", {})
    cfg = t.get("train_config", {})
    h = m["headline"]
    arch = (
        f"{cfg.get('n_layers')} layers, d_model {cfg.get('d_model')}, {cfg.get('n_heads')} heads per layer, "
        + ("attention only" if cfg.get("attn_only") else f"MLPs of {cfg.get('d_mlp')} ({cfg.get('act_fn')})")
        + f", LayerNorm, {POSITIONS.get(cfg.get('positional_embedding_type'), cfg.get('positional_embedding_type'))}, "
        f"context {cfg.get('n_ctx')}"
    )
    lines = [
        f"# {m['model']}",
        "",
        "An embedded language model of Circuit Explorer, trained by "
        f"`python -m core.zoo.train_lm {'attn' if cfg.get('attn_only') else 'mlp'}` on the generated zoo corpus "
        "(`core/corpus.py`: IOI, greater-than, agreement, induction and filler sentences).",
        "",
        f"- Architecture: {arch}.",
        f"- Training: {cfg.get('steps')} steps of {cfg.get('batch')} documents (1 to 3 sentences, up to "
        f"{cfg.get('n_ctx')} tokens, batched by length), AdamW lr "
        f"{cfg.get('lr')}, seed {cfg.get('seed')}, {cfg.get('threads')} CPU thread: {t.get('train_seconds')} s.",
        f"- Final training loss: {t['loss_log'][-1]['loss'] if t.get('loss_log') else 'n/a'} nats/token.",
        "- Held out of training: 20% of the names (they appear only in filler and name-copying sentences, "
        "never in a task sentence) and one template of each task (two for agreement); every number below is "
        "measured on them (seed "
        f"{m['eval']['seed']}, {m['eval']['batch']} prompts each).",
        "",
        "## Required metrics (held-out names and templates)",
        "",
        "| metric | value | required | met |",
        "|---|---|---|---|",
    ]
    names = {
        "ioi_accuracy": "IOI accuracy (IO beats S)",
        "ioi_logit_diff": "IOI mean logit difference IO − S",
        "greater_than_prob_diff": "greater-than probability difference",
        "sva_accuracy": "agreement accuracy, opposite-number attractor (worst held-out template)",
        "induction_score": f"best induction head score ({m['induction']['best_head']}, repeated random words)",
    }
    for k, label in names.items():
        lines.append(f"| {label} | {h[k]:.3f} | ≥ {REQUIRED[k]} | {'yes' if h[k] >= REQUIRED[k] else '**no**'} |")
    lines += ["", "## Every template (held-out names)", "", "| task | template | metric | accuracy | corrupted metric |", "|---|---|---|---|---|"]
    for task in ("ioi", "greater_than", "sva"):
        for tpl, s in m[task]["by_template"].items():
            mark = (" (held out, stress test)" if s.get("stress_test") else " (held out)") if s["held_out_template"] else ""
            acc = _pct(s["accuracy"])
            if "accuracy_abba" in s:
                acc += f" (ABBA {_pct(s['accuracy_abba'])}, BABA {_pct(s['accuracy_baba'])})"
            lines.append(f"| {task} | {tpl}{mark} | {s['metric']:.3f} | {acc} | {s['corrupted_metric']:.3f} |")
    ind = m["induction"]
    lines.append(f"| induction | random-{tasks.INDUCTION_LEN} | {ind['metric']:.3f} | {_pct(ind['accuracy'])} | {ind['corrupted_metric']:.3f} |")
    lines += [
        "",
        "Metrics: IOI, agreement and induction use the logit difference answer − wrong token; greater-than the "
        "probability of the years after the start year minus those before it. Corrupted prompts: IOI with the "
        "repeated name replaced by a third name, greater-than with start year 01, agreement with the subject's "
        "number flipped, induction with the earlier continuation replaced. A stress test is a held-out "
        "template reported but not required: `friends_gave_it` ends in \"gave it to\", a phrase never "
        "followed by a name in training.",
        "",
        "## Circuits found by activation patching",
        "",
        "Noising: one head's output (`hook_z`, every position) from the corrupted run written into the clean run; "
        "\"removed\" is the share of the clean − corrupted metric gap that disappears (1 = the head carries "
        "the whole task, negative = the head works against it). Computed with `transformer_lens.patching`. "
        "IOI is patched on held-out names in the template `when_went`; the other tasks on their held-out template.",
        "",
    ]
    c = m["circuits"]
    for task, entry in c.items():
        tops = ", ".join(f"{r['head']} {r['removed']:+.2f}" for r in entry["top_heads"])
        lines.append(f"- **{task}** ({entry['template']}): strongest heads {tops}.")
        if "mlp_noising_removed" in entry:
            mlps = ", ".join(f"MLP{i} {x:+.2f}" for i, x in enumerate(entry["mlp_noising_removed"]))
            lines.append(f"  MLP outputs noised one layer at a time: {mlps}.")
    ioi = c["ioi"]
    lines += ["", "### IOI heads and their roles", "",
              "| head | removed | last → IO | last → S | S2 → S1 | S2 → S1+1 | prev-token | role |",
              "|---|---|---|---|---|---|---|---|"]
    for r in ioi["top_heads"]:
        lines.append(
            f"| {r['head']} | {r['removed']:+.2f} | {r['end_to_io']:.2f} | {r['end_to_s']:.2f} | {r['s2_to_s1']:.2f} | "
            f"{r['s2_to_s1_plus_1']:.2f} | {r['previous_token_score']:.2f} | {r['role']} |"
        )
    if ioi.get("name_movers"):
        lines += ["", f"Name movers ({', '.join(ioi['name_movers'])}) noised together remove "
                  f"{_pct(ioi['name_movers_noised_together'])} of the IOI logit difference."]
    lines += ["", f"Attention columns: mean attention on the clean IOI prompts that the patching used (held-out names, "
              f"template {ioi['template']}). Roles follow the IOI paper's names, "
              f"assigned by attention ≥ {ROLE_ATTENTION}; they describe where a head looks, the patching column whether it matters.", ""]
    return "\n".join(lines)


def main() -> None:
    model_dir = Path(sys.argv[1])
    metrics = measure(model_dir)
    training = model_dir / "training.json"
    if training.exists():
        metrics["training"] = json.loads(training.read_text())
    write(model_dir, metrics)
    print(json.dumps(metrics["headline"], indent=2))
    print(json.dumps({k: v["top_heads"] for k, v in metrics["circuits"].items()}, indent=2))


if __name__ == "__main__":
    main()
