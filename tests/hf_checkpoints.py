"""Tiny random Hugging Face checkpoints of every architecture the app loads, built with
`transformers` (its config class, `save_pretrained`) and a tokenizer made with `tokenizers`.

Each is seeded and small (2 layers, d_model 32), with what a trained checkpoint has and a fresh
init hides: norm weights away from 1, non-zero biases, attention logits large enough that soft
caps and sliding windows change the answer. `ARCH_SPECS` says which TransformerLens switch each
one exercises (GQA, RMSNorm, rotary, parallel attention + MLP, soft caps, local/global attention,
tied embeddings, MoE, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

D, HEADS, MLP, CTX = 32, 4, 64, 64
SCALE = 0.25


@dataclass(frozen=True)
class Spec:
    config: str  # transformers config class
    kwargs: dict
    covers: str  # what it exercises, for the README table and test ids
    tied: bool = False
    extra: dict = field(default_factory=dict)


BASE = dict(num_hidden_layers=2, hidden_size=D, num_attention_heads=HEADS, intermediate_size=MLP,
            max_position_embeddings=CTX)
IDS = dict(pad_token_id=0, eos_token_id=1)
TWO_KINDS = ["sliding_attention", "full_attention"]


def _b(**kw) -> dict:
    return {**BASE, **kw}


ARCH_SPECS: dict[str, Spec] = {
    "GPT2LMHeadModel": Spec(
        "GPT2Config", dict(n_layer=2, n_embd=D, n_head=HEADS, n_positions=CTX),
        "LayerNorm, learned positions, tied embeddings", tied=True),
    "GPTNeoForCausalLM": Spec(
        "GPTNeoConfig", dict(num_layers=2, hidden_size=D, num_heads=HEADS, max_position_embeddings=CTX,
                             attention_types=[[["global", "local"], 1]], window_size=4),
        "local/global attention, no attention scale"),
    "GPTJForCausalLM": Spec(
        "GPTJConfig", dict(n_layer=2, n_embd=D, n_head=HEADS, n_positions=CTX, rotary_dim=4),
        "parallel attention + MLP, partial rotary (adjacent pairs)"),
    "GPTNeoXForCausalLM": Spec(
        "GPTNeoXConfig", _b(rotary_pct=0.25, use_parallel_residual=True),
        "parallel attention + MLP, partial rotary"),
    "OPTForCausalLM": Spec(
        "OPTConfig", dict(num_hidden_layers=2, hidden_size=D, num_attention_heads=HEADS, ffn_dim=MLP,
                          max_position_embeddings=CTX, word_embed_proj_dim=D),
        "learned positions with offset, ReLU"),
    "BloomForCausalLM": Spec(
        "BloomConfig", dict(n_layer=2, hidden_size=D, n_head=HEADS), "ALiBi, LayerNorm after the embedding", tied=True),
    "LlamaForCausalLM": Spec("LlamaConfig", _b(num_key_value_heads=2), "RMSNorm, rotary, GQA, gated MLP"),
    "MistralForCausalLM": Spec("MistralConfig", _b(num_key_value_heads=2, sliding_window=4), "GQA, sliding-window attention"),
    "MixtralForCausalLM": Spec(
        "MixtralConfig", _b(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        "mixture of experts, GQA"),
    "Qwen2ForCausalLM": Spec("Qwen2Config", _b(num_key_value_heads=2), "GQA, q/k/v biases, tied embeddings", tied=True),
    "Qwen3ForCausalLM": Spec("Qwen3Config", _b(num_key_value_heads=2, head_dim=8), "q/k RMSNorm, GQA"),
    "GemmaForCausalLM": Spec(
        "GemmaConfig", _b(num_key_value_heads=1, head_dim=8),
        "multi-query attention, (1 + w) RMSNorm, scaled embedding, tied", tied=True),
    "Gemma2ForCausalLM": Spec(
        "Gemma2Config", _b(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
        "soft caps (attention and logits), local/global attention, norms before and after", tied=True),
    "Gemma3ForCausalLM": Spec(
        "Gemma3TextConfig", _b(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                               layer_types=TWO_KINDS),
        "q/k norm, local/global attention with two rope bases", tied=True),
    "PhiForCausalLM": Spec(
        "PhiConfig", _b(partial_rotary_factor=0.5), "parallel attention + MLP, partial rotary, biases"),
    "Phi3ForCausalLM": Spec(
        "Phi3Config", _b(num_key_value_heads=2, original_max_position_embeddings=CTX, sliding_window=None),
        "fused qkv and gate/up projections, GQA"),
    "OlmoForCausalLM": Spec("OlmoConfig", _b(**IDS), "non-parametric LayerNorm"),
    "Olmo2ForCausalLM": Spec("Olmo2Config", _b(**IDS), "norms after each sublayer, q/k norm"),
    "Olmo3ForCausalLM": Spec(
        "Olmo3Config", _b(num_key_value_heads=2, sliding_window=4, layer_types=TWO_KINDS, **IDS),
        "local/global attention, norms after each sublayer"),
    "OlmoeForCausalLM": Spec(
        "OlmoeConfig", _b(num_experts=4, num_experts_per_tok=2, **IDS), "mixture of experts, q/k norm"),
    "ApertusForCausalLM": Spec("ApertusConfig", _b(num_key_value_heads=2), "xIELU activation, q/k norm, GQA"),
    "GptOssForCausalLM": Spec(
        "GptOssConfig", _b(num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=4, layer_types=TWO_KINDS,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "mixture of experts, attention sinks, local/global attention"),
}


def _is_norm(name: str) -> bool:
    return any(part in name for part in ("norm", "ln_", ".ln", "layernorm", "layer_norm")) and "proj" not in name


def make_checkpoint(arch: str, folder: Path, seed: int = 0):
    """A tiny random `arch` checkpoint saved in `folder` with the zoo's word-level tokenizer
    (built with `tokenizers`): (folder, the transformers model in eval mode, float32)."""
    import transformers

    from core.vocab import build_tokenizer

    spec = ARCH_SPECS[arch]
    folder = Path(folder)
    tok = build_tokenizer(folder)
    kwargs = dict(spec.kwargs)
    for key in ("pad_token_id", "eos_token_id"):  # the special tokens of our tokenizer
        kwargs.pop(key, None)
    config = getattr(transformers, spec.config)(
        vocab_size=len(tok), tie_word_embeddings=spec.tied, architectures=[arch],
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        **kwargs,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if _is_norm(name) and name.endswith("weight"):
                # Gemma stores w with scale (1 + w); elsewhere the scale is w itself.
                p.copy_((0.0 if "Gemma" in arch else 1.0) + 0.3 * noise)
            elif name.endswith("bias") or "sinks" in name:
                p.copy_(0.2 * noise)
            elif p.dim() >= 2:
                p.copy_(SCALE * noise)  # large enough that soft caps and windows bite
            else:
                p.copy_(0.2 * noise)
    model.save_pretrained(folder)
    return folder, model.float().eval()


def hf_log_probs(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens).logits.float().log_softmax(-1)
