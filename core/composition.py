"""Weights-based circuit analysis (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits").

Everything here reads the model's weights and nothing else: no forward pass, no hook, no
tokenisation, so no lock is needed, and the model is never modified. Shapes in brackets.

    from core import composition
    from core.models import load_model

    model = load_model("ce-induction-2l")
    k = composition.composition_scores(model, "K")        # [layer, head, layer, head], NaN where sender layer >= receiver layer
    base = composition.random_baseline(model, "K")        # {"mean", "std", "p95", "samples"}
    summary = composition.composition_summary(model, "K") # both at once, for a page
    summary.top_pairs(5)                                  # [(sender L, H, receiver L, H, score), ...]
    composition.copying_scores(model)                     # [layer, head] in [-1, 1]
    composition.top_ov_mappings(model, 1, 1, k=5)         # [(source id, [(output id, value), ...]), ...]
    composition.positional_qk(model, 0, 3)                # [pos, pos]; a previous-token head: the sub-diagonal

Orientation (TransformerLens's, row vectors: a residual vector x is a row, a head writes x W_V W_O):

- W_OV = W_V W_O  [d_model, d_model]: row = what the head reads, column = what it writes.
- W_QK = W_Q W_K^T [d_model, d_model]: row = the query side's residual vector, column = the key's;
  the attention score of query x and key y is x W_QK y^T (before the division by `attn_scale`).
- Composition of a sender head s (earlier layer) into a receiver head r (later layer):
  Q: ||W_OV^s W_QK^r||_F,  K: ||W_OV^s (W_QK^r)^T||_F,  V: ||W_OV^s W_OV^r||_F, each divided by the
  product of the two matrices' Frobenius norms. The sender's output (its columns) is what the
  receiver's query (Q), key (K) or value (V) side reads. Elhage writes the same products with
  column vectors (W_QK^T W_OV, ...), i.e. transposed; the Frobenius norm is the same.
  These are exactly `model.all_composition_scores(mode)` (TransformerLens: `left = model.OV`,
  `right = model.QK`, `model.QK.T`, `model.OV`), except that pairs with sender layer >= receiver
  layer are NaN here (TransformerLens writes 0 there, which reads like a measured "no composition").

What the weights-based numbers leave out, as Elhage and TransformerLens do: LayerNorm scales and
weights between heads (on an unfolded model the receiver's ln1 weight is not in W_Q/W_K/W_V; on a
folded one it is, so a folded copy gives somewhat different scores), biases, rotary rotations (the
QK circuits here are those at relative distance 0), QK norms and the attention soft cap. On models
with grouped-query attention (`n_key_value_heads`) each query head is paired with its shared key
and value weights (`model.W_K` / `model.W_V` repeat them per query head).

Full OV and QK circuits (token space) use the embedding W_E [d_vocab, d_model] and, for OV, the
effective unembedding W_U' = (centring) diag(ln_final.w) W_U: the direction of a token in the
residual stream as this repository defines it (docs/conventions.md, `attribution.direct_logit_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from transformer_lens import FactoredMatrix, HookedTransformer
from transformer_lens.utilities import composition_scores as _tl_composition_scores

from core.attribution import _centres, _has_ln_weight

Kind = Literal["Q", "K", "V"]
KINDS = ("Q", "K", "V")
KIND_LABELS = {"Q": "Q-composition", "K": "K-composition", "V": "V-composition"}
LEARNED_POSITIONS = ("standard", "shortformer")
_BASELINE_FLOATS = 2**24  # random entries per batched score computation (64 MB in float32)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _kind(kind: str) -> str:
    k = kind.upper() if isinstance(kind, str) else kind
    if k not in KINDS:
        raise ValueError(f"Unknown composition kind {kind!r}: use 'Q' (the receiver's queries read the sender), "
                         f"'K' (its keys read the sender) or 'V' (its values read the sender).")
    return k


def _float(t: torch.Tensor) -> torch.Tensor:
    """Half-precision weights go up to float32 (SVD and eig are not implemented for them everywhere)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _attention_weights(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """W_Q, W_K, W_V [layer, head, d_model, d_head] and W_O [layer, head, d_head, d_model], checked.

    W_K and W_V are TransformerLens's per-query-head views (repeated for grouped-query attention).
    """
    cfg = model.cfg
    try:
        w = {name: getattr(model, name) for name in ("W_Q", "W_K", "W_V", "W_O")}
    except (AttributeError, RuntimeError) as e:  # no attention blocks, or heads of different sizes
        raise ValueError(f"This model has no per-head attention weights this analysis can read ({e}).") from e
    n_heads, d_model, d_head = cfg.n_heads, cfg.d_model, cfg.d_head
    expected = {"W_Q": (cfg.n_layers, n_heads, d_model, d_head), "W_K": (cfg.n_layers, n_heads, d_model, d_head),
                "W_V": (cfg.n_layers, n_heads, d_model, d_head), "W_O": (cfg.n_layers, n_heads, d_head, d_model)}
    for name, shape in expected.items():
        if not isinstance(w[name], torch.Tensor) or tuple(w[name].shape) != shape:
            got = tuple(w[name].shape) if isinstance(w[name], torch.Tensor) else type(w[name]).__name__
            raise ValueError(f"{name} has shape {got}, expected {shape} (layer, head, ...): this analysis reads one "
                             f"[d_model, d_head] query/key/value matrix and one [d_head, d_model] output matrix per head.")
    return {name: _float(t.detach()) for name, t in w.items()}


def _head(model: HookedTransformer, layer: int, head: int) -> None:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"Layer {layer!r} is out of range: this model has layers 0 to {n_layers - 1}.")
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads:
        raise ValueError(f"Head {head!r} is out of range: layer {layer} has heads 0 to {n_heads - 1}.")


def _one_head(model: HookedTransformer, layer: int, head: int) -> dict[str, torch.Tensor]:
    """W_Q, W_K, W_V [d_model, d_head] and W_O [d_head, d_model] of one head (checked), read from its
    layer's attention module (W_K / W_V: TransformerLens's per-query-head view under GQA)."""
    _head(model, layer, head)
    cfg, attn = model.cfg, model.blocks[layer].attn
    out = {}
    for name, shape in (("W_Q", (cfg.d_model, cfg.d_head)), ("W_K", (cfg.d_model, cfg.d_head)),
                        ("W_V", (cfg.d_model, cfg.d_head)), ("W_O", (cfg.d_head, cfg.d_model))):
        w = getattr(attn, name, None)
        if not isinstance(w, torch.Tensor) or w.ndim != 3 or w.shape[0] != cfg.n_heads or tuple(w.shape[1:]) != shape:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"Layer {layer}'s {name} has shape {got}, expected {(cfg.n_heads, *shape)}: this analysis reads "
                             f"one [d_model, d_head] query/key/value matrix and one [d_head, d_model] output matrix per head.")
        out[name] = _float(w[head].detach())
    return out


# ---------------------------------------------------------------------------------------------
# Composition scores
# ---------------------------------------------------------------------------------------------


def _receiver(w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, kind: str) -> FactoredMatrix:
    """The receiver's matrix [..., d_model, d_model] whose rows read the sender's output."""
    if kind == "Q":
        return FactoredMatrix(w_q, w_k.transpose(-2, -1))  # W_QK: the query side reads the sender
    if kind == "K":
        return FactoredMatrix(w_k, w_q.transpose(-2, -1))  # W_QK^T: the key side reads the sender
    return FactoredMatrix(w_v, w_o)  # W_OV: the value side reads the sender


@torch.no_grad()
def composition_scores(model: HookedTransformer, kind: Kind) -> torch.Tensor:
    """[sender layer, sender head, receiver layer, receiver head] Elhage's composition scores.

    score = ||W_OV^s M^r||_F / (||W_OV^s||_F ||M^r||_F), with M^r the receiver's W_QK (kind "Q"),
    W_QK^T ("K") or W_OV ("V"), in TransformerLens's row-vector orientation (module docstring).
    NaN wherever sender layer >= receiver layer (no composition is possible there); elsewhere equal
    to `model.all_composition_scores(kind)`, computed with the same TransformerLens function one
    receiver layer at a time (so never the [L, H, L, H, d_head, d_head] products of every pair).
    Values lie in [0, 1]. On the model's device, float32 for half-precision models.
    """
    kind = _kind(kind)
    w = _attention_weights(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sender = FactoredMatrix(w["W_V"], w["W_O"])  # [layer, head, d_model, d_model]
    out = torch.full((n_layers, n_heads, n_layers, n_heads), float("nan"), dtype=w["W_V"].dtype, device=w["W_V"].device)
    for r in range(1, n_layers):
        receiver = _receiver(w["W_Q"][r], w["W_K"][r], w["W_V"][r], w["W_O"][r], kind)  # [head, ...]
        out[:r, :, r, :] = _tl_composition_scores(sender[:r], receiver, broadcast_dims=True)  # [r, head, head]
    return out


@torch.no_grad()
def random_baseline(model: HookedTransformer, kind: Kind, n_samples: int = 200, seed: int = 0) -> dict:
    """The composition score of random heads of this model's shapes: what "no structure" scores.

    Each sample draws, in one `torch.randn(4, d_model, d_head)` call, a sender's W_V and W_O^T and a
    receiver's W_Q and W_K (kind "Q"/"K") or W_V and W_O^T (kind "V"), all with i.i.d. standard
    Gaussian entries (the score does not depend on their scale), from a `torch.Generator` seeded with
    `seed`: the same seed gives the same numbers, the first n samples do not depend on n_samples,
    and torch's global random state is left untouched. Q and V draw the same receivers (W_Q W_K^T and
    W_V W_O have the same law), so their baselines are equal; K reads the transposed receiver.
    Computed on the CPU in float32 with TransformerLens's `composition_scores`, like `composition_scores`.

    Returns {"mean", "std" (unbiased), "p95" (linear-interpolated 95th percentile): float,
    "samples": [n_samples] tensor}.
    """
    kind = _kind(kind)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer of at least 2 (a mean, a spread and a 95th percentile); got {n_samples!r}.")
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    gen = torch.Generator().manual_seed(seed)
    samples = []
    chunk = max(1, _BASELINE_FLOATS // (4 * d_model * d_head))
    for start in range(0, n_samples, chunk):
        n = min(chunk, n_samples - start)
        draws = torch.stack([torch.randn(4, d_model, d_head, generator=gen) for _ in range(n)])  # [n, 4, d_model, d_head]
        sender = FactoredMatrix(draws[:, 0], draws[:, 1].transpose(-2, -1))  # W_V W_O
        a, b = draws[:, 2], draws[:, 3]
        if kind == "V":
            receiver = FactoredMatrix(a, b.transpose(-2, -1))  # W_V W_O
        else:
            receiver = _receiver(a, b, a, b, kind)  # Q: W_Q W_K^T; K: W_K W_Q^T
        samples.append(_tl_composition_scores(sender, receiver, broadcast_dims=False))
    s = torch.cat(samples)
    return {"mean": float(s.mean()), "std": float(s.std()), "p95": float(torch.quantile(s, 0.95)), "samples": s}


@dataclass(frozen=True)
class CompositionSummary:
    """Composition scores of one kind and the random baseline to read them against.

    scores: [sender layer, sender head, receiver layer, receiver head], NaN where sender layer >=
    receiver layer. mean, std, p95: the baseline's (floats); samples: [n_samples] its scores.
    """

    kind: str
    scores: torch.Tensor
    mean: float
    std: float
    p95: float
    samples: torch.Tensor

    @property
    def label(self) -> str:
        return KIND_LABELS[self.kind]

    def z(self) -> torch.Tensor:
        """[L, H, L, H] (score - baseline mean) / baseline std; NaN where scores are."""
        return (self.scores - self.mean) / self.std

    def above_baseline(self) -> torch.Tensor:
        """[L, H, L, H] bool: the score is above the baseline's 95th percentile (False where NaN)."""
        return self.scores > self.p95

    def top_pairs(self, k: int = 10) -> list[tuple[int, int, int, int, float]]:
        """The k highest-scoring pairs: (sender layer, sender head, receiver layer, receiver head, score)."""
        flat = self.scores.flatten()
        valid = torch.nonzero(~flat.isnan()).flatten()
        order = valid[flat[valid].argsort(descending=True)[:k]]
        L, H = self.scores.shape[0], self.scores.shape[1]
        out = []
        for i in order.tolist():
            out.append((i // (H * L * H), (i // (L * H)) % H, (i // H) % L, i % H, float(flat[i])))
        return out


def composition_summary(model: HookedTransformer, kind: Kind, n_samples: int = 200, seed: int = 0) -> CompositionSummary:
    """`composition_scores` and `random_baseline` of one kind, in one object a page can plot."""
    base = random_baseline(model, kind, n_samples, seed)
    return CompositionSummary(_kind(kind), composition_scores(model, kind), base["mean"], base["std"], base["p95"],
                              base["samples"])


# ---------------------------------------------------------------------------------------------
# Full OV circuits (token space)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def effective_unembed(model: HookedTransformer) -> torch.Tensor:
    """[d_model, d_vocab_out] W_U' = C diag(ln_final.w) W_U: the unembedding as a direction reads it.

    The matrix form of `attribution.direct_logit_weights` (which applies it to given directions:
    `direct_logit_weights(model, v) == v @ effective_unembed(model)`): times the final LayerNorm's
    weight when the model keeps one unfolded, centred over d_model (C = I - 1 1^T / d_model) when the
    final normalisation is a LayerNorm; plain W_U otherwise. Written here because attribution has no
    function that returns the matrix, and `direct_logit_weights(model, eye(d_model))` would cost a
    d_model x d_model x d_vocab product (GPT-2: 30 GFLOP) for what is a scaling and a centring.
    """
    w_u = _float(model.W_U.detach())
    if _has_ln_weight(model):
        w_u = model.ln_final.w.detach().to(w_u.dtype)[:, None] * w_u
    if _centres(model):
        w_u = w_u - w_u.mean(0, keepdim=True)
    return w_u


@torch.no_grad()
def ov_circuit(model: HookedTransformer, layer: int, head: int) -> FactoredMatrix:
    """[d_vocab, d_vocab_out] the full OV circuit W_E W_V W_O W_U' of one head.

    Row = the source token the head attends to, column = the output token whose logit that moves
    (directly, per unit of the final normalisation's scale). Factored as (W_E W_V) [d_vocab, d_head]
    times (W_O W_U') [d_head, d_vocab_out], so `.eigenvalues` costs a d_head x d_head eig.
    """
    w = _one_head(model, layer, head)
    w_e = _float(model.W_E.detach())
    return FactoredMatrix(w_e @ w["W_V"], w["W_O"] @ effective_unembed(model))


@torch.no_grad()
def copying_scores(model: HookedTransformer) -> torch.Tensor:
    """[layer, head] Elhage's copying score of every head's full OV circuit, in [-1, 1].

    Re(sum of eigenvalues) / sum of |eigenvalues| of W_E W_OV W_U'. Near 1: attending to a token
    raises that token's own logit (copying, as induction heads do); near -1: lowers it. The nonzero
    eigenvalues are those of the d_head x d_head matrix W_O W_U' W_E W_V (through the [d_model, d_model]
    matrix W_U' W_E, computed once; the small products and eig in float64). NaN for a head whose OV circuit is zero.
    """
    w = _attention_weights(model)
    if model.cfg.d_vocab_out != model.cfg.d_vocab:
        raise ValueError(f"Copying scores need a square OV circuit: this model reads {model.cfg.d_vocab} tokens "
                         f"and writes {model.cfg.d_vocab_out}.")
    unembed_embed = effective_unembed(model) @ _float(model.W_E.detach())  # [d_model, d_model], the one big product
    small = w["W_O"].double() @ unembed_embed.double() @ w["W_V"].double()  # [layer, head, d_head, d_head]
    eig = torch.linalg.eigvals(small)
    return (eig.sum(-1).real / eig.abs().sum(-1)).to(w["W_O"].dtype)


@torch.no_grad()
def top_ov_mappings(model: HookedTransformer, layer: int, head: int, k: int = 10,
                    sources: Sequence[int] | torch.Tensor | None = None) -> list[tuple[int, list[tuple[int, float]]]]:
    """What the head's full OV circuit maps source tokens to: [(source id, [(output id, value), ...k]), ...].

    sources: token ids (rows of `ov_circuit`); by default the k tokens with the largest diagonal
    entry (those whose own logit the head raises most when it attends to them), largest first.
    For each source, the k output ids with the largest value in its row, largest first. Ids only.
    """
    ov = ov_circuit(model, layer, head)
    d_vocab, d_out = ov.shape[-2], ov.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}.")
    if sources is None:
        if d_vocab != d_out:
            raise ValueError("This model's OV circuit is not square: give the source token ids.")
        diag = (ov.A * ov.B.T).sum(-1)  # [d_vocab] row i . column i
        src = diag.topk(min(k, d_vocab)).indices.tolist()
    else:
        src = torch.as_tensor(sources, dtype=torch.long).reshape(-1).tolist()
        bad = [s for s in src if not 0 <= s < d_vocab]
        if bad:
            raise ValueError(f"Source token ids {bad} are out of range: the vocabulary has ids 0 to {d_vocab - 1}.")
    if not src:
        return []
    rows = ov.A[src] @ ov.B  # [n_sources, d_vocab_out]
    top = rows.topk(min(k, d_out), dim=-1)
    return [(s, list(zip(ids, vals))) for s, ids, vals in zip(src, top.indices.tolist(), top.values.tolist())]


# ---------------------------------------------------------------------------------------------
# QK circuits (token and position space)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def qk_circuit(model: HookedTransformer, layer: int, head: int) -> FactoredMatrix:
    """[d_vocab (query token), d_vocab (key token)] the token QK circuit W_E W_Q W_K^T W_E^T of one head.

    The attention score (before the division by `attn_scale`) a query token gives a key token
    through the embeddings alone, ignoring LayerNorm, biases and positions, as Elhage does.
    """
    w = _one_head(model, layer, head)
    w_e = _float(model.W_E.detach())
    return FactoredMatrix(w_e @ w["W_Q"], (w_e @ w["W_K"]).T)


@torch.no_grad()
def positional_qk(model: HookedTransformer, layer: int, head: int, n: int = 32, causal: bool = False) -> torch.Tensor | None:
    """[query pos, key pos] W_pos W_Q W_K^T W_pos^T of one head over the first n positions.

    For learned positions ("standard", "shortformer"; None for rotary, ALiBi and other schemes with
    no W_pos). n is capped at the context length. A previous-token head scores key = query - 1 above
    the other keys of each row: the sub-diagonal. Raw bilinear form (before the division by
    `attn_scale`, ignoring LayerNorm and biases); entries with key > query are never used by a causal
    head: causal=True sets them to NaN for plotting.
    """
    w = _one_head(model, layer, head)
    if model.cfg.positional_embedding_type not in LEARNED_POSITIONS:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of positions; got {n!r}.")
    w_pos = _float(model.W_pos.detach())[: min(n, model.cfg.n_ctx)]
    out = (w_pos @ w["W_Q"]) @ (w_pos @ w["W_K"]).T
    if causal:
        out = out.masked_fill(torch.ones_like(out, dtype=torch.bool).triu(1), float("nan"))
    return out
