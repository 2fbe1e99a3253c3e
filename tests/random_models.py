"""Seeded random HookedTransformers that cover TransformerLens's architecture switches.

A freshly initialised model has identity LayerNorms and zero biases, which hides real bugs (a
missing final LayerNorm weight, a forgotten bias, a fold that writes into the wrong tensor).
Every model here gets non-trivial norm weights and biases, like a pretrained one.

    model = random_model(normalization_type="RMS", positional_embedding_type="rotary")
    model = random_model(fold=True)          # LayerNorms folded, as TL's from_pretrained does
    model = random_model(padding_side="left")
"""
from __future__ import annotations

import functools

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

BASE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=48, act_fn="gelu",
            normalization_type="LN", positional_embedding_type="standard")

# One config per switch (and a few together); the id says what it covers.
SWITCHES = {
    "ln-standard": {},
    "ln-folded": {"fold": True},
    "rms-rotary": {"normalization_type": "RMS", "positional_embedding_type": "rotary"},
    "rms-folded-rotary": {"normalization_type": "RMS", "positional_embedding_type": "rotary", "fold": True},
    "no-norm": {"normalization_type": None},
    "shortformer-attn-only": {"positional_embedding_type": "shortformer", "attn_only": True},
    "alibi": {"positional_embedding_type": "alibi"},
    "gqa-rotary": {"n_key_value_heads": 2, "positional_embedding_type": "rotary", "normalization_type": "RMS"},
    "softcap": {"output_logits_soft_cap": 3.0},
    "attn-result": {"use_attn_result": True},
    "left-padded": {"padding_side": "left"},
}


# Every switch runs in CI; while developing (-m "not slow") four that between them exercise each
# code path: LayerNorm + learned positions, shortformer + attention-only, grouped-query + rotary +
# RMSNorm, left padding.
QUICK = ("ln-standard", "shortformer-attn-only", "gqa-rotary", "left-padded")


def switch_params() -> list:
    """SWITCHES' names as pytest params, those outside QUICK marked slow."""
    import pytest

    return [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow, id=n) for n in SWITCHES]


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    import tempfile

    from core.vocab import build_tokenizer

    folder = tempfile.mkdtemp(prefix="ce-test-tokenizer-")
    build_tokenizer(folder)
    return folder


def zoo_tokenizer():
    """A fresh copy of the zoo's word-level tokenizer (pad token `<pad>`), loaded from disk as a
    model's tokenizer is (TransformerLens re-reads it by its path)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_dir())


def config(seed: int = 0, d_vocab: int = 64, **overrides) -> dict:
    """HookedTransformerConfig fields of a small model with the given switches."""
    cfg = {**BASE, "d_vocab": d_vocab, "seed": seed, **overrides}
    if cfg["positional_embedding_type"] == "rotary":
        cfg.setdefault("rotary_dim", cfg["d_head"])
    if cfg.get("attn_only"):
        cfg.pop("d_mlp", None)
        cfg.pop("act_fn", None)
    return cfg


def save_zoo_folder(folder, seed: int = 0, **overrides) -> tuple[str, HookedTransformer]:
    """A random model saved in the zoo's format (what `load_model(folder)` reads): (path, model)."""
    from pathlib import Path

    from core.zoo import save_checkpoint

    model = random_model(seed=seed, **overrides)
    save_checkpoint(model, {**config(seed, model.cfg.d_vocab, **overrides), "model_name": Path(folder).name}, folder)
    model.tokenizer.save_pretrained(str(folder))
    return str(folder), model


def random_model(seed: int = 0, fold: bool = False, padding_side: str = "right", tokenizer=True,
                 **overrides) -> HookedTransformer:
    """A random model with every norm weight near 1 (not 1) and every bias non-zero.

    tokenizer: True for the zoo tokenizer (then d_vocab is its size), or None for none.
    fold: fold the LayerNorms and centre the weights as TL does for pretrained models.
    """
    tok = zoo_tokenizer() if tokenizer else None  # each model owns its tokenizer, as a loaded one does
    cfg = config(seed, len(tok) if tok is not None else 64, **overrides)
    model = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tok, default_padding_side=padding_side)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(p.shape, generator=gen)
            if leaf == "w" and (".ln" in name or name.startswith("ln_final")):
                p.copy_(1.0 + 0.3 * noise)  # norm weights
            elif leaf.lstrip("_").startswith("b"):
                p.copy_(0.2 * noise)  # every bias, LayerNorm biases included
    if fold:
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model.eval()


def random_tokens(model: HookedTransformer, batch: int = 3, pos: int = 12, seed: int = 1) -> torch.Tensor:
    """[batch, pos] random ordinary tokens with BOS first (no pad, BOS or other special token after it)."""
    gen = torch.Generator().manual_seed(seed)
    tok = model.tokenizer
    bos = tok.bos_token_id if tok is not None else 0
    special = set(tok.all_special_ids) if tok is not None else {0}
    allowed = torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])
    body = allowed[torch.randint(0, len(allowed), (batch, pos - 1), generator=gen)]
    return torch.cat([torch.full((batch, 1), bos), body], dim=1)
