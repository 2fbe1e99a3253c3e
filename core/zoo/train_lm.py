"""Train the embedded task language models on the generated zoo corpus.

One command each, seeded, CPU only (one thread; the two can train side by side on two cores):

    python -m core.zoo.train_lm attn     # ce-circuits-3l-attn: 3 layers, attention only
    python -m core.zoo.train_lm mlp      # ce-circuits-3l-mlp: 3 layers with MLPs

Data: short documents (1 to 3 episodes from `core.corpus`: IOI, greater-than, agreement,
induction, filler), drawn on the fly from a seeded generator, batched by length; held-out names
and templates never appear. Rotary positions: relative offsets come for free, which previous-
token and induction heads need (learned absolute positions left the copying circuits unformed
after 2500 steps in a trial).
After training, `core.zoo.lm_card` measures every task on held-out data and writes
`metrics.json` and `MODEL_CARD.md` beside the weights.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from core.corpus import Corpus, CorpusConfig, build_tokenizer
from core.paths import ZOO_DIR
from core.zoo import save_checkpoint


@dataclass
class LMConfig:
    name: str
    n_layers: int
    attn_only: bool
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    act_fn: str = "gelu"
    positional_embedding_type: str = "rotary"
    n_ctx: int = 128
    seed: int = 0
    steps: int = 4000
    batch: int = 48
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    decay_from: float = 0.75  # linear decay to 10% over the last quarter of training
    threads: int = 1
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


VARIANTS = {
    "attn": LMConfig(name="ce-circuits-3l-attn", n_layers=3, attn_only=True, steps=7000),
    "mlp": LMConfig(name="ce-circuits-3l-mlp", n_layers=3, attn_only=False, steps=7000),
}


def model_config(cfg: LMConfig, d_vocab: int) -> dict:
    """HookedTransformerConfig fields."""
    out = dict(
        model_name=cfg.name,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
        n_ctx=cfg.n_ctx,
        d_vocab=d_vocab,
        attn_only=cfg.attn_only,
        act_fn=None if cfg.attn_only else cfg.act_fn,
        normalization_type="LN",
        positional_embedding_type=cfg.positional_embedding_type,
        **({"rotary_dim": cfg.d_model // cfg.n_heads} if cfg.positional_embedding_type == "rotary" else {}),
        seed=cfg.seed,
        default_prepend_bos=True,
    )
    if not cfg.attn_only:
        out["d_mlp"] = cfg.d_mlp
    return out


def lr_factor(cfg: LMConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup)
    start = int(cfg.decay_from * cfg.steps)
    if step < start:
        return warm
    return warm * (1.0 - 0.9 * (step - start) / max(1, cfg.steps - start))


def train(cfg: LMConfig, out_dir: Path, snapshot_every: int = 0) -> dict:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer(out_dir, name_or_path=str(out_dir))
    corpus = Corpus(tokenizer, cfg.corpus)
    tl_cfg = model_config(cfg, len(tokenizer))
    model = HookedTransformer(HookedTransformerConfig(**tl_cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    rng = random.Random(cfg.seed)
    start = time.time()
    log = []
    recent = []
    queue: list[torch.Tensor] = []
    pad = tokenizer.pad_token_id
    for step in range(cfg.steps):
        if not queue:
            queue = corpus.batches(rng, cfg.batch, cfg.n_ctx)
        tokens = queue.pop()
        logits = model(tokens)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=pad
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            mean = sum(recent) / len(recent)
            recent = []
            log.append({"step": step, "loss": round(mean, 4)})
            print(f"step {step:5d}  loss {mean:.4f}  {time.time() - start:6.1f}s", flush=True)
        if snapshot_every and step and step % snapshot_every == 0:
            save_checkpoint(model, tl_cfg, out_dir / f"snapshot-{step}")
    train_seconds = time.time() - start
    save_checkpoint(model, tl_cfg, out_dir)
    return {"train_seconds": round(train_seconds, 1), "loss_log": log, "train_config": asdict(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--pos", default=None, help="positional embedding type")
    parser.add_argument("--mix", default=None, help="episode shares, e.g. ioi=0.3,induction=0.25")
    parser.add_argument("--snapshot-every", type=int, default=0, help="also save snapshot-<step>/ folders")
    parser.add_argument("--no-card", action="store_true", help="skip measuring and writing the model card")
    args = parser.parse_args()
    cfg = VARIANTS[args.variant]
    cfg = replace(cfg, **{k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("lr", args.lr),
                                            ("positional_embedding_type", args.pos)) if v is not None})
    if args.mix:
        shares = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
        cfg = replace(cfg, corpus=replace(cfg.corpus, **shares))
    out = args.out or ZOO_DIR / cfg.name
    info = train(cfg, out, args.snapshot_every)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if not args.no_card:
        from core.zoo import lm_card

        metrics = lm_card.measure(out)
        metrics["training"] = info
        lm_card.write(out, metrics)
        print(json.dumps({k: v for k, v in metrics.items() if k != "training"}, indent=2))


if __name__ == "__main__":
    main()
