"""Token documents for the embedded SAEs: what they are trained on and what their index reads.

A corpus is named by a small spec kept in each embedded SAE's `metrics.json`, so the page, the
tests and the training script regenerate exactly the same documents:

    {"kind": "zoo-lm", "seed": 7, "documents": 3000, "max_len": 64}

- `zoo-lm`: documents of the zoo language corpus (`core.zoo.corpus`), as the task models saw them;
- `induction`: random-word sequences with a repeated chunk, as `ce-induction-2l` saw them.

Every document starts with BOS. Nothing is downloaded.
"""
from __future__ import annotations

import random

import torch


def documents(spec: dict, tokenizer) -> list[list[int]]:
    """Token ids of `spec["documents"]` BOS-initial documents of at most `spec["max_len"]` tokens."""
    kind, seed, n, max_len = spec["kind"], int(spec["seed"]), int(spec["documents"]), int(spec["max_len"])
    bos = tokenizer.bos_token_id
    if kind == "zoo-lm":
        from core.zoo.corpus import Corpus

        corpus = Corpus(tokenizer)
        rng = random.Random(seed)
        return [[bos] + corpus.document(rng, max_len - 1) for _ in range(n)]
    if kind == "induction":
        from core.zoo.train_induction import TrainConfig, make_batch

        cfg = TrainConfig(batch=1, n_ctx=max_len, min_len=min(16, max_len - 1))
        special = set(tokenizer.all_special_ids)
        words = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
        gen = torch.Generator().manual_seed(seed)
        return [make_batch(gen, cfg, words, bos)[0].tolist() for _ in range(n)]
    raise ValueError(f"Unknown corpus kind {kind!r}: expected 'zoo-lm' or 'induction'.")
