"""Train the embedded 2-layer attention-only induction model (`ce-induction-2l`).

One command, seeded, CPU only:

    python -m core.zoo.train_induction            # writes assets/models/ce-induction-2l/

Data (`core.corpus.induction_batch`, nothing downloaded): sequences of random words from the
zoo vocabulary (`core.vocab`), of random length; in most of them a chunk of random length, taken
at a random offset, is repeated later at another random offset. Learned absolute positions or a fixed repeat length
let a model use positional shortcuts instead of an induction head; `shortformer` positions
(added to queries and keys only, never to the residual stream) and random lengths/offsets
leave the textbook mechanism as the way to lower the loss on repeats.

After training the script measures the circuit (head scores, Q/K/V composition ablations) on
fresh repeated random tokens with the app's own functions and writes `metrics.json` and
`MODEL_CARD.md` beside the weights.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core import attention
from core.corpus import induction_batch
from core.paths import ZOO_DIR
from core.vocab import build_tokenizer
from core.zoo import save_checkpoint

MODEL_NAME = "ce-induction-2l"


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 6000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    n_ctx: int = 128
    min_len: int = 16
    repeat_prob: float = 0.8
    max_pad: int = 6
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    threads: int = 1
    positional_embedding_type: str = "shortformer"
    normalization_type: str | None = "LN"


def model_config(cfg: TrainConfig, d_vocab: int) -> dict:
    """HookedTransformerConfig fields of the induction model."""
    return dict(
        model_name=MODEL_NAME,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
        n_ctx=cfg.n_ctx,
        d_vocab=d_vocab,
        attn_only=True,
        act_fn=None,
        normalization_type=cfg.normalization_type,
        positional_embedding_type=cfg.positional_embedding_type,
        **({"rotary_dim": cfg.d_model // cfg.n_heads} if cfg.positional_embedding_type == "rotary" else {}),
        seed=cfg.seed,
        default_prepend_bos=True,
    )


def make_batch(gen: torch.Generator, cfg: TrainConfig, words: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[batch, 1 + length] training tokens: `core.corpus.induction_batch` with this config's
    batch size, context, minimum length, repeat share and padding."""
    return induction_batch(gen, words, bos_id, batch=cfg.batch, n_ctx=cfg.n_ctx, min_len=cfg.min_len,
                           repeat_prob=cfg.repeat_prob, max_pad=cfg.max_pad)


def model_with_tokenizer(model, tokenizer):
    model.tokenizer = tokenizer
    return model


@torch.no_grad()
def _circuit_progress(model, probe: torch.Tensor) -> tuple[float, float]:
    """Best last-layer induction score and best layer-0 previous-token score on `probe`."""
    _, cache = model.run_with_cache(probe, names_filter=lambda n: n.endswith("hook_pattern"))
    patterns = attention.stacked_patterns(cache, model.cfg.n_layers)
    ind = attention.head_scores_from_patterns(patterns, probe, "induction")[-1].max().item()
    prev = attention.head_scores_from_patterns(patterns, probe, "previous_token")[0].max().item()
    return ind, prev


def train(cfg: TrainConfig, out_dir: Path) -> dict:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer(out_dir)
    special = set(tokenizer.all_special_ids)
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    tl_cfg = model_config(cfg, len(tokenizer))
    model = HookedTransformer(HookedTransformerConfig(**tl_cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = attention.repeated_random_tokens(model_with_tokenizer(model, tokenizer), 20, 8, seed=cfg.seed + 999)
    start = time.time()
    log = []
    for step in range(cfg.steps):
        tokens = make_batch(gen, cfg, words, tokenizer.bos_token_id)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            ind, prev = _circuit_progress(model, probe)
            log.append({"step": step, "loss": round(loss.item(), 4), "induction": round(ind, 3), "previous_token": round(prev, 3)})
            print(
                f"step {step:5d}  loss {loss.item():.4f}  best induction {ind:.3f}  best prev-token {prev:.3f}"
                f"  {time.time() - start:6.1f}s",
                flush=True,
            )
    train_seconds = time.time() - start

    save_checkpoint(model, tl_cfg, out_dir)
    return {"train_seconds": round(train_seconds, 1), "loss_log": log, "train_config": asdict(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ZOO_DIR / MODEL_NAME)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--pos", default=TrainConfig.positional_embedding_type)
    parser.add_argument("--repeat-prob", type=float, default=TrainConfig.repeat_prob)
    parser.add_argument("--norm", default=TrainConfig.normalization_type)
    args = parser.parse_args()
    cfg = TrainConfig(
        steps=args.steps, seed=args.seed, lr=args.lr, positional_embedding_type=args.pos, repeat_prob=args.repeat_prob,
        normalization_type=None if args.norm in ("none", "None") else args.norm,
    )
    info = train(cfg, args.out)
    from core.zoo import induction_card

    metrics = induction_card.measure(args.out)
    metrics["training"] = info
    induction_card.write(args.out, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "training"}, indent=2))


if __name__ == "__main__":
    main()
