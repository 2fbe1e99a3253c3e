"""Train the embedded 2-layer attention-only induction model (`ce-induction-2l`).

One command, seeded, CPU only:

    python -m core.zoo.train_induction            # writes assets/models/ce-induction-2l/

Data (generated here, nothing downloaded): sequences of random words from the zoo vocabulary,
of random length; in most of them a chunk of random length, taken at a random offset, is
repeated later at another random offset. Learned absolute positions or a fixed repeat length
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

from core.zoo.vocab import build_tokenizer

MODEL_NAME = "ce-induction-2l"
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "models"


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    n_ctx: int = 128
    min_len: int = 16
    repeat_prob: float = 0.8
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    threads: int = 1


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
        normalization_type="LN",
        positional_embedding_type="shortformer",
        seed=cfg.seed,
        default_prepend_bos=True,
    )


def make_batch(gen: torch.Generator, cfg: TrainConfig, words: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[batch, 1 + length] training tokens: BOS, then random words.

    In a `repeat_prob` share of the sequences one random chunk of k words (2 <= k <= length/4)
    recurs at least twice: first at a random offset, then again after random gaps of up to k
    words, until the sequence is full. Length, k, offsets and gaps are all random.
    """
    length = int(torch.randint(cfg.min_len, cfg.n_ctx, (1,), generator=gen))  # tokens after BOS
    toks = words[torch.randint(0, len(words), (cfg.batch, length), generator=gen)]
    for b in range(cfg.batch):
        if torch.rand(1, generator=gen).item() > cfg.repeat_prob:
            continue
        k = int(torch.randint(2, length // 4 + 1, (1,), generator=gen))
        chunk = words[torch.randint(0, len(words), (k,), generator=gen)]
        pos = int(torch.randint(0, k + 1, (1,), generator=gen))
        while pos + k <= length:
            toks[b, pos : pos + k] = chunk
            pos += k + int(torch.randint(0, k + 1, (1,), generator=gen))
    bos = torch.full((cfg.batch, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, toks], dim=1)


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
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.05, 1 - s / cfg.steps)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    log = []
    for step in range(cfg.steps):
        tokens = make_batch(gen, cfg, words, tokenizer.bos_token_id)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            log.append((step, round(loss.item(), 4)))
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    train_seconds = time.time() - start

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "hooked_config.json").write_text(json.dumps(tl_cfg, indent=2) + "\n")
    return {"train_seconds": round(train_seconds, 1), "loss_log": log, "train_config": asdict(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS / MODEL_NAME)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    args = parser.parse_args()
    cfg = TrainConfig(steps=args.steps, seed=args.seed, lr=args.lr)
    info = train(cfg, args.out)
    from core.zoo import induction_card

    metrics = induction_card.measure(args.out)
    metrics["training"] = info
    induction_card.write(args.out, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "training"}, indent=2))


if __name__ == "__main__":
    main()
