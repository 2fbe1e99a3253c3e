"""Attention analyses: head-type scores, Q/K/V composition ablations, residual norms.

Pure functions of (model, tokens or cache); usable from a notebook. Shapes in brackets.
Head-type scores use TransformerLens's own detection patterns (`transformer_lens.head_detector`)
and its "mul" measure, averaged over the query rows that have a target (TransformerLens divides
by every row; `convention="all_rows"` gives its number; see `head_scores_from_patterns`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens import head_detector as hd

from core import store

HEAD_TYPES = ("previous_token", "induction", "duplicate_token")
HeadType = Literal["previous_token", "induction", "duplicate_token"]
HEAD_TYPE_LABELS = {
    "previous_token": "Previous-token score",
    "induction": "Induction score",
    "duplicate_token": "Duplicate-token score",
}
DEFAULT_SEQ_LEN = 30  # repeated random tokens: BOS + 30 tokens + the same 30 again
DEFAULT_BATCH = 32
PREV_TOKEN_THRESHOLD = 0.5
INDUCTION_THRESHOLD = 0.5
_DETECTORS = {
    "previous_token": hd.get_previous_token_head_detection_pattern,
    "induction": hd.get_induction_head_detection_pattern,
    "duplicate_token": hd.get_duplicate_token_head_detection_pattern,
}


def repeated_random_tokens(
    model: HookedTransformer, seq_len: int = 24, batch: int = 16, seed: int = 0
) -> torch.Tensor:
    """[batch, 1 + 2*seq_len]: BOS, then seq_len random tokens, then the same tokens again.

    Tokens are drawn from the ordinary vocabulary (special tokens excluded) with a fixed seed.
    """
    if 1 + 2 * seq_len > model.cfg.n_ctx:
        raise ValueError(f"2*seq_len+1 = {1 + 2 * seq_len} exceeds the model's context {model.cfg.n_ctx}")
    special = set(getattr(model.tokenizer, "all_special_ids", []) or []) if model.tokenizer else set()
    allowed = torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(allowed), (batch, seq_len), generator=gen)
    half = allowed[idx]
    bos_id = model.tokenizer.bos_token_id if model.tokenizer is not None else 0
    bos = torch.full((batch, 1), bos_id if bos_id is not None else 0, dtype=torch.long)
    return torch.cat([bos, half, half], dim=1)


def detection_pattern(tokens: torch.Tensor, head_type: HeadType) -> torch.Tensor:
    """TransformerLens's detection pattern for one sequence. tokens: [pos] -> [q_pos, k_pos]."""
    return _DETECTORS[head_type](tokens.cpu().unsqueeze(0)).float()


Convention = Literal["rows_with_target", "all_rows"]


def head_scores_from_patterns(
    patterns: torch.Tensor, tokens: torch.Tensor, head_type: HeadType, convention: Convention = "rows_with_target"
) -> torch.Tensor | None:
    """Score of every head from its attention patterns, or None when no query row has a target.

    patterns: [batch, layer, head, q_pos, k_pos]; tokens: [batch, pos]. Returns [layer, head].
    `convention="rows_with_target"` (ours, the default): for each sequence, the attention mass on
    the pattern's targets summed over the query rows that have a target and divided by their
    number (so a perfect head scores 1); then the mean over the sequences that have any target.
    A prompt with no repeated token has no induction or duplicate-token target: those types are
    None, and the previous-token score is still given.
    `convention="all_rows"`: TransformerLens's `detect_head(..., error_measure="mul")`, which
    divides by every query row and averages over every sequence (0 where there is no target).
    """
    scores = []
    for b in range(tokens.shape[0]):
        det = detection_pattern(tokens[b], head_type)  # [q, k]
        rows = int((det.sum(-1) > 0).sum())
        mass = (patterns[b].float().cpu() * det).sum(dim=(-1, -2))  # [layer, head]
        if convention == "all_rows":
            scores.append(mass / det.shape[0])
        elif rows > 0:
            scores.append(mass / rows)
    if convention == "all_rows":
        return torch.stack(scores).mean(0)
    return torch.stack(scores).mean(0) if scores else None


def stacked_patterns(cache: ActivationCache, n_layers: int) -> torch.Tensor:
    """[batch, layer, head, q_pos, k_pos] from a cache with batch dim."""
    return torch.stack([cache["pattern", layer] for layer in range(n_layers)], dim=1)


@torch.inference_mode()
def pattern_cache(model: HookedTransformer, tokens: torch.Tensor) -> ActivationCache:
    """Every layer's attention pattern (`hook_pattern`) on `tokens` [batch, pos], under the model's
    lock (`store.locked`). The pass stops after the last block: patterns never need the final
    LayerNorm or the unembedding, which on a GPT-2-sized vocabulary costs more than all the blocks
    together. The patterns are the ones a full forward pass computes (the same operations)."""
    with store.locked(model):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"),
                                        stop_at_layer=model.cfg.n_layers)
    return cache


def head_scores(
    model: HookedTransformer, tokens: torch.Tensor, activation_store: store.ActivationStore | None = None,
    convention: Convention = "rows_with_target",
) -> dict[str, torch.Tensor | None]:
    """{head type: [layer, head] scores, or None where no query row has that type's target} for
    `tokens` [batch, pos] (all HEAD_TYPES; see `head_scores_from_patterns` for the convention)."""
    if activation_store is not None:
        cache = activation_store.get(model, tokens).cache
    else:
        cache = pattern_cache(model, tokens)
    patterns = stacked_patterns(cache, model.cfg.n_layers)
    return {t: head_scores_from_patterns(patterns, tokens, t, convention) for t in HEAD_TYPES}


def strongest_head(scores: torch.Tensor) -> tuple[int, int]:
    """(layer, head) of the highest score in a [layer, head] grid."""
    flat = int(scores.argmax())
    return divmod(flat, scores.shape[1])


def previous_token_heads(
    prev_scores: torch.Tensor, before_layer: int, threshold: float = PREV_TOKEN_THRESHOLD
) -> list[tuple[int, int]]:
    """Heads in layers < before_layer whose previous-token score is >= threshold."""
    return [
        (layer, head)
        for layer in range(before_layer)
        for head in range(prev_scores.shape[1])
        if prev_scores[layer, head] >= threshold
    ]


def induction_heads(ind_scores: torch.Tensor, layer: int, threshold: float = INDUCTION_THRESHOLD) -> list[int]:
    """Heads of `layer` whose induction score is >= threshold."""
    return [h for h in range(ind_scores.shape[1]) if ind_scores[layer, h] >= threshold]


def parse_head(label: str) -> tuple[int, int]:
    """'L1H2' or '1.2' -> (1, 2)."""
    text = label.strip().upper()
    if text.startswith("L") and "H" in text:
        layer, head = text[1:].split("H")
    else:
        layer, head = text.split(".")
    return int(layer), int(head)


def repeated_half_loss(logits: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mean next-token loss (nats) on the second copy of a repeated sequence.

    tokens: [batch, 1 + 2*seq_len] as from `repeated_random_tokens`. Scores the predictions of
    tokens 2..seq_len of the second copy (its first token cannot be predicted by copying).
    """
    start = seq_len + 1  # logits at this position predict the 2nd token of the second copy
    logp = F.log_softmax(logits[:, start:-1].float(), dim=-1)
    target = tokens[:, start + 1 :]
    return -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean()


@dataclass(frozen=True)
class CompositionAblation:
    """Effect of removing source heads' outputs from one input (q, k or v) of a target head."""

    on: str  # "q", "k", "v" or "none"
    target_score: float  # induction score of the target head
    loss: float  # repeated-half loss, nats


def composition_refusal(model: HookedTransformer) -> str | None:
    """Why removing a head's output from a later head's input is not defined on this model, or
    None. Where a norm follows each attention layer (Gemma 2/3, OLMo 2/3), a head's z @ W_O is not
    what the residual stream receives (the layer's heads are normalised together), so there is no
    single term of the stream to remove."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if model.cfg.use_normalization_before_and_after or model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return ("This model normalises each attention layer's output before adding it to the residual stream, so "
                "a head's output is not a separate term of the stream and cannot be removed from a later head's "
                "input. The head scores above still apply.")
    return None


def ablate_composition(
    model: HookedTransformer,
    tokens: torch.Tensor,
    seq_len: int,
    sources: list[tuple[int, int]],
    target: tuple[int, int],
    on: Literal["q", "k", "v", "none"],
    also: Sequence[int] = (),
) -> CompositionAblation:
    """Remove the outputs of `sources` heads from the `on` input of `target` head only.

    `also`: other heads of the target's layer whose `on` input gets the same ablation (for a
    model with several redundant induction heads); the score reported is still the target's.

    Uses TransformerLens's split q/k/v inputs (`blocks.L.hook_{q,k,v}_input`,
    [batch, pos, head, d_model]): the source heads' contributions `z @ W_O` (no bias) are
    subtracted from the target head's slice, leaving every other head and input untouched.
    Returns the target head's induction score and the repeated-half loss after the ablation.
    tokens: [batch, 1 + 2*seq_len] repeated sequences.
    """
    t_layer, t_head = target
    refusal = composition_refusal(model)
    if refusal:
        raise ValueError(refusal)
    if any(layer >= t_layer for layer, _ in sources):
        raise ValueError("source heads must sit in earlier layers than the target head")
    captured: dict[int, torch.Tensor] = {}

    def capture_z(z, hook):
        captured[hook.layer()] = z
        return None

    ablated = sorted({t_head, *also})

    def remove_sources(x, hook):
        x = x.clone()
        for layer, head in sources:
            contribution = captured[layer][:, :, head, :] @ model.W_O[layer, head]  # [batch, pos, d_model]
            x[:, :, ablated, :] -= contribution[:, :, None, :]
        return x

    pattern_name = f"blocks.{t_layer}.attn.hook_pattern"
    patterns: dict[str, torch.Tensor] = {}

    def save_pattern(p, hook):
        patterns["p"] = p
        return None

    hooks = [(f"blocks.{layer}.attn.hook_z", capture_z) for layer in sorted({l for l, _ in sources})]
    if on != "none":
        hooks.append((f"blocks.{t_layer}.hook_{on}_input", remove_sources))
    hooks.append((pattern_name, save_pattern))
    logits = store.run_with_hooks(model, tokens, hooks, use_split_qkv_input=True)
    pat = patterns["p"][:, t_head]  # [batch, q, k]
    scores = head_scores_from_patterns(pat[:, None, None], tokens, "induction")
    if scores is None:
        raise ValueError("the tokens repeat nothing, so there is no induction score to measure")
    score = scores[0, 0]
    return CompositionAblation(on, float(score), float(repeated_half_loss(logits, tokens, seq_len)))


def composition_table(
    model: HookedTransformer,
    tokens: torch.Tensor,
    seq_len: int,
    sources: list[tuple[int, int]],
    target: tuple[int, int],
    also: Sequence[int] = (),
) -> list[CompositionAblation]:
    """`ablate_composition` for none, q, k and v, in that order."""
    return [ablate_composition(model, tokens, seq_len, sources, target, on, also) for on in ("none", "q", "k", "v")]


def residual_norms(cache: ActivationCache, n_layers: int) -> torch.Tensor:
    """L2 norm of the residual stream. Returns [n_layers + 1, pos] for the first sequence:
    row l is `blocks.l.hook_resid_pre` (row n_layers is the final `hook_resid_post`)."""
    rows = [cache["resid_pre", layer][0] for layer in range(n_layers)]
    rows.append(cache["resid_post", n_layers - 1][0])
    return torch.stack(rows).float().norm(dim=-1)


@torch.no_grad()
def induction_strength(model: HookedTransformer, batch: int = DEFAULT_BATCH) -> dict:
    """How much induction a model does, for comparing models side by side: its strongest induction
    head and that head's score, and its mean next-token loss on the first (random, unpredictable) and
    on the repeated half of the same repeated random tokens (seed 0), with its size.

    A model with an induction circuit predicts the repeated half far better than the first.
    """
    seq_len = min(DEFAULT_SEQ_LEN, (model.cfg.n_ctx - 1) // 2)
    tokens = repeated_random_tokens(model, seq_len, batch, seed=0)
    logits, cache = store.run_with_cache(model, tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    scores = head_scores_from_patterns(stacked_patterns(cache, model.cfg.n_layers), tokens, "induction")
    layer, head = strongest_head(scores)
    logp = F.log_softmax(logits[:, :seq_len].float(), dim=-1)  # positions 0..seq_len-1 predict the first half
    first = -logp.gather(-1, tokens[:, 1 : seq_len + 1].unsqueeze(-1)).mean()
    return {
        "model": model.cfg.model_name, "layers": model.cfg.n_layers, "heads": model.cfg.n_heads,
        "d_model": model.cfg.d_model, "parameters": sum(p.numel() for p in model.parameters()),
        "head": f"L{layer}H{head}", "score": float(scores[layer, head]),
        "first_half_loss": float(first), "repeated_half_loss": float(repeated_half_loss(logits, tokens, seq_len)),
    }
