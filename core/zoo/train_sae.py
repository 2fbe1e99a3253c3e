"""Train the embedded SAEs with sae_lens's own training runner, offline, on the zoo corpus.

One command each, seeded, CPU only:

    python -m core.zoo.train_sae mlp-relu     # ce-circuits-3l-mlp-res2-relu
    python -m core.zoo.train_sae mlp-topk     # ce-circuits-3l-mlp-res2-topk
    python -m core.zoo.train_sae attn-relu    # ce-circuits-3l-attn-res2-relu
    python -m core.zoo.train_sae induction-topk   # ce-induction-2l-res1-topk

`LanguageModelSAETrainingRunner` gets the zoo model (`override_model`) and an in-memory dataset
of token rows (`override_dataset`): each row is BOS, one corpus document and PAD up to the
context size; special tokens (BOS, PAD) are excluded from the training activations, so the
SAE sees only real tokens, each in the context the model was trained on. No wandb, nothing
downloaded. Afterwards `quality` measures the SAE on a held-out corpus sample (another seed)
and the script writes sae_lens's disk format (`cfg.json`, `sae_weights.safetensors`),
`metrics.json` and `SAE_CARD.md` into `assets/saes/<name>/`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from core.corpus import documents
from core.paths import SAE_DIR
from core.saes import CARD_FILE, METRICS_FILE, quality


@dataclass
class SAETrainConfig:
    name: str
    model: str
    hook: str
    corpus_kind: str = "zoo-lm"
    architecture: str = "standard"  # or "topk"
    d_sae: int = 1024
    l1_coefficient: float = 8.0
    k: int = 16
    training_tokens: int = 1_500_000
    context_size: int = 40
    batch_tokens: int = 4096
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2
    corpus_seed: int = 1
    eval_seed: int = 2
    eval_documents: int = 1000
    index_seed: int = 7  # the corpus the page's feature index reads
    index_documents: int = 3000


VARIANTS = {
    "mlp-relu": SAETrainConfig("ce-circuits-3l-mlp-res2-relu", "ce-circuits-3l-mlp", "blocks.2.hook_resid_pre"),
    "mlp-topk": SAETrainConfig("ce-circuits-3l-mlp-res2-topk", "ce-circuits-3l-mlp", "blocks.2.hook_resid_pre",
                               architecture="topk"),
    "attn-relu": SAETrainConfig("ce-circuits-3l-attn-res2-relu", "ce-circuits-3l-attn", "blocks.2.hook_resid_pre"),
    "induction-topk": SAETrainConfig("ce-induction-2l-res1-topk", "ce-induction-2l", "blocks.1.hook_resid_pre",
                                     corpus_kind="induction", architecture="topk", d_sae=2048, k=32, context_size=64),
}


def corpus_spec(cfg: SAETrainConfig, seed: int, n: int) -> dict:
    return {"kind": cfg.corpus_kind, "seed": seed, "documents": n, "max_len": cfg.context_size}


def training_rows(cfg: SAETrainConfig, tokenizer) -> list[list[int]]:
    """Rows of exactly `context_size` tokens: BOS, a document, PAD (excluded from training)."""
    n_docs = cfg.training_tokens // 10  # documents average ~20 real tokens; the runner stops at training_tokens
    docs = documents(corpus_spec(cfg, cfg.corpus_seed, n_docs), tokenizer)
    pad = tokenizer.pad_token_id
    return [d + [pad] * (cfg.context_size - len(d)) for d in docs]


def train(cfg: SAETrainConfig, out_dir: Path) -> dict:
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig, StandardTrainingSAEConfig, TopKTrainingSAEConfig

    from core.models import load_model

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model)
    dataset = Dataset.from_dict({"input_ids": training_rows(cfg, model.tokenizer)})
    if cfg.architecture == "topk":
        sae_cfg = TopKTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=cfg.d_sae, k=cfg.k)
    else:
        sae_cfg = StandardTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=cfg.d_sae, l1_coefficient=cfg.l1_coefficient,
                                            l1_warm_up_steps=50)
    steps = cfg.training_tokens // cfg.batch_tokens
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=cfg.model, hook_name=cfg.hook, dataset_path="", streaming=False,
        is_dataset_tokenized=True, context_size=cfg.context_size, training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.batch_tokens, store_batch_size_prompts=64,
        n_batches_in_buffer=max(64, 4 * cfg.batch_tokens // cfg.context_size), lr=cfg.lr, lr_warm_up_steps=50,
        lr_decay_steps=steps // 5, exclude_special_tokens=True, seed=cfg.seed, device="cpu",
        logger=LoggingConfig(log_to_wandb=False), output_path=tempfile.mkdtemp(prefix="sae-runner-"), n_checkpoints=0,
        save_final_checkpoint=False, verbose=False, dead_feature_window=200, feature_sampling_window=500,
    )
    start = time.time()
    trained = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model).run()
    seconds = time.time() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    trained.save_inference_model(str(out_dir))
    return {"train_seconds": round(seconds, 1), "train_config": asdict(cfg)}


def measure(cfg: SAETrainConfig, out_dir: Path) -> dict:
    from core.models import load_model
    from core.saes import load_local

    torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model)
    sae = load_local(out_dir).sae
    docs = documents(corpus_spec(cfg, cfg.eval_seed, cfg.eval_documents), model.tokenizer)
    q = quality(model, sae, docs)
    return {
        "name": cfg.name, "model": cfg.model, "hook_name": cfg.hook, "architecture": cfg.architecture,
        "d_in": model.cfg.d_model, "d_sae": cfg.d_sae,
        "eval": corpus_spec(cfg, cfg.eval_seed, cfg.eval_documents),
        "corpus": corpus_spec(cfg, cfg.index_seed, cfg.index_documents),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()},
    }


def write_card(out_dir: Path, metrics: dict) -> None:
    m = metrics
    t = m.get("training", {})
    arch = "TopK (k = {})".format(t.get("train_config", {}).get("k")) if m["architecture"] == "topk" else "ReLU with L1 penalty"
    text = f"""# {m['name']}

A sparse autoencoder on `{m['hook_name']}` of the embedded model `{m['model']}`, trained offline with
sae_lens's `LanguageModelSAETrainingRunner` by `python -m core.zoo.train_sae` on the zoo corpus
(`core.corpus.documents`, kind `{m['corpus']['kind']}`). sae_lens disk format: `cfg.json`, `sae_weights.safetensors`.

- Architecture: {arch}; d_in {m['d_in']}, d_sae {m['d_sae']}.
- Training: {t.get('train_config', {}).get('training_tokens', '?'):,} tokens in {t.get('train_seconds', '?')} s on CPU.

## Measured on {m['eval']['documents']} held-out documents (seed {m['eval']['seed']}, {m['tokens']:,} tokens, BOS excluded)

| metric | value |
|---|---|
| L0 (mean active features per token) | {m['l0']:.2f} |
| explained variance | {m['explained_variance']:.3f} |
| dead features (never active there) | {m['dead_features']} of {m['d_sae']} |
| next-token loss, clean | {m['ce_loss_clean']:.4f} |
| next-token loss, SAE spliced in | {m['ce_loss_with_sae']:.4f} |
| next-token loss, activation zeroed | {m['ce_loss_zero_ablated']:.4f} |
| loss recovered | {m['loss_recovered']:.3f} |

The app's feature index reads {m['corpus']['documents']} documents of the same corpus (seed {m['corpus']['seed']}).
The test suite recomputes these numbers from the committed files (`tests/test_saes.py`).
"""
    (out_dir / CARD_FILE).write_text(text)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--l1", type=float, default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    cfg = VARIANTS[args.variant]
    cfg = replace(cfg, **{k: v for k, v in (("training_tokens", args.tokens), ("l1_coefficient", args.l1), ("k", args.k),
                                            ("threads", args.threads)) if v is not None})
    out = args.out or SAE_DIR / cfg.name
    info = train(cfg, out)
    metrics = measure(cfg, out)
    metrics["training"] = info
    write_card(out, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "training"}, indent=2))


if __name__ == "__main__":
    main()
