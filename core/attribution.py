"""Which components write the answer: direct logit attribution, the logit lens, neurons.

Everything here reads a cached run (`core.store.CachedRun`: logits and the full activation
cache) and never runs the model, so a changed answer token costs no forward pass.

The target of an attribution is the answer token's logit at one position, or the logit
difference answer - wrong ("logit difference"), per prompt of a batch. With the final
LayerNorm's scale taken from the cache (as TransformerLens's `apply_ln_to_stack` does), the
final logit is linear in the residual stream, so it splits exactly into parts:

    logit(answer) [- logit(wrong)] = sum over components of (component . direction) + bias

where the components are the embeddings and every attention and MLP layer's output (or each
head's output plus the attention biases), `direction` is the unembedding column(s) times the
final LayerNorm weight, and `bias` is what no component writes (the final LayerNorm's bias and
the unembedding bias). `Attribution.total()` returns the left-hand side; the tests check both
sides against the model's own logits.

Notebook use:

    from core import attribution, store
    run = store.ActivationStore().get(model, tokens)              # one forward pass
    att = attribution.by_component(model, run.cache, answers, wrongs)
    att.labels, att.mean()                                       # [component]
    heads = attribution.by_head(model, run.cache, answers, wrongs)  # .grid() -> [layer, head]
    lens = attribution.logit_lens(model, run.cache, answers)     # per layer x position
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import ActivationCache, HookedTransformer

Tokens = torch.Tensor | int


@dataclass(frozen=True)
class Attribution:
    """Direct contributions to the target, per component and prompt.

    labels: names of the components, in residual-stream order.
    values: [component, batch] contribution of each component to the target.
    bias: [batch] the part of the target no component writes (final LayerNorm bias, unembedding
      bias; for heads also the attention output biases, listed in `values` as "attn bias").
    """

    labels: list[str]
    values: torch.Tensor
    bias: torch.Tensor

    def mean(self) -> torch.Tensor:
        """[component] mean contribution over the batch."""
        return self.values.mean(-1)

    def total(self) -> torch.Tensor:
        """[batch] the target itself: sum of every contribution plus the bias."""
        return self.values.sum(0) + self.bias


def _ids(tokens: Tokens, batch: int) -> torch.Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def _has_ln_weight(model: HookedTransformer) -> bool:
    return hasattr(getattr(model, "ln_final", None), "w")


def _centres(model: HookedTransformer) -> bool:
    """Whether the final normalisation subtracts the mean (LayerNorm; RMSNorm does not)."""
    return model.cfg.normalization_type in ("LN", "LNPre")


def _final_scale(model: HookedTransformer, cache: ActivationCache, pos: int) -> torch.Tensor | float:
    """[batch, 1] the final normalisation's scale at `pos` from the cache (1 without one)."""
    name = "ln_final.hook_scale"
    return cache[name][:, pos, :] if name in cache.cache_dict else 1.0


@torch.no_grad()
def unembed_direction(model: HookedTransformer, answers: Tokens, wrongs: Tokens | None = None,
                      batch: int = 1) -> torch.Tensor:
    """[batch, d_model] direction in the normalised residual stream whose dot product is the target.

    W_U[:, answer] (- W_U[:, wrong]), times the final LayerNorm weight when the model has one
    (TransformerLens folds it into W_U for pretrained models; the zoo models keep it).
    """
    a = _ids(answers, batch)
    d = model.W_U[:, a].T
    if wrongs is not None:
        d = d - model.W_U[:, _ids(wrongs, a.shape[0])].T
    if _has_ln_weight(model):
        d = d * model.ln_final.w
    return d


@torch.no_grad()
def target_bias(model: HookedTransformer, answers: Tokens, wrongs: Tokens | None = None,
                batch: int = 1) -> torch.Tensor:
    """[batch] the constant part of the target: final LayerNorm bias and unembedding bias."""
    a = _ids(answers, batch)
    w = None if wrongs is None else _ids(wrongs, a.shape[0])
    out = model.b_U[a] - (model.b_U[w] if w is not None else 0.0)
    if hasattr(getattr(model, "ln_final", None), "b"):
        u = model.W_U[:, a].T - (model.W_U[:, w].T if w is not None else 0.0)
        out = out + u @ model.ln_final.b
    return out


@torch.no_grad()
def target(model: HookedTransformer, logits: torch.Tensor, answers: Tokens, wrongs: Tokens | None = None,
           pos: int = -1) -> torch.Tensor:
    """[batch] the target read straight from logits [batch, pos, d_vocab]: the reference value."""
    last = logits[:, pos, :]
    idx = torch.arange(last.shape[0])
    out = last[idx, _ids(answers, last.shape[0])]
    if wrongs is not None:
        out = out - last[idx, _ids(wrongs, last.shape[0])]
    return out


def _project(model: HookedTransformer, cache: ActivationCache, stack: torch.Tensor, answers, wrongs,
             pos: int) -> torch.Tensor:
    """[component, batch] of a stack [component, batch, d_model] read at `pos`: LN-scaled, dotted."""
    scaled = cache.apply_ln_to_stack(stack, layer=None, pos_slice=pos)
    direction = unembed_direction(model, answers, wrongs, batch=stack.shape[1])
    return (scaled * direction).sum(-1)


@torch.no_grad()
def by_component(model: HookedTransformer, cache: ActivationCache, answers: Tokens,
                 wrongs: Tokens | None = None, pos: int = -1) -> Attribution:
    """Embeddings, then each layer's attention and MLP output ("embed", "0_attn_out", ...)."""
    stack, labels = cache.decompose_resid(layer=None, pos_slice=pos, return_labels=True)
    values = _project(model, cache, stack, answers, wrongs, pos)
    return Attribution(labels, values, target_bias(model, answers, wrongs, batch=stack.shape[1]))


@torch.no_grad()
def head_results(model: HookedTransformer, cache: ActivationCache, pos: int = -1) -> tuple[torch.Tensor, list[str]]:
    """([layer * head, batch, d_model] each head's output at `pos`, labels "L0H0", ...)."""
    outs, labels = [], []
    for layer in range(model.cfg.n_layers):
        z = cache["z", layer][:, pos]  # [batch, head, d_head]
        outs.append(torch.einsum("bhd,hdm->hbm", z, model.W_O[layer]))
        labels += [f"L{layer}H{h}" for h in range(model.cfg.n_heads)]
    return torch.cat(outs, 0), labels


@torch.no_grad()
def by_head(model: HookedTransformer, cache: ActivationCache, answers: Tokens,
            wrongs: Tokens | None = None, pos: int = -1) -> Attribution:
    """Every head ("L0H0", ...), then the embeddings, MLPs and attention biases, so it sums up.

    Head outputs are hook_z times W_O at `pos` (what `cache.stack_head_results` computes; that
    method would also write every head's output at every position into the shared cache). The
    attention output bias b_O of each layer is not a head's, and is listed as "attn bias".
    """
    heads, head_labels = head_results(model, cache, pos)
    rest, rest_labels = cache.decompose_resid(layer=None, mode="mlp", pos_slice=pos, return_labels=True)
    b_o = model.b_O.sum(0)  # [d_model], every layer's attention bias
    b_o_stack = b_o.expand(1, heads.shape[1], -1)
    stack = torch.cat([heads, rest, b_o_stack], 0)
    values = _project(model, cache, stack, answers, wrongs, pos)
    labels = head_labels + rest_labels + ["attn bias"]
    return Attribution(labels, values, target_bias(model, answers, wrongs, batch=heads.shape[1]))


def head_grid(model: HookedTransformer, att: Attribution) -> torch.Tensor:
    """[layer, head] mean head contributions of a `by_head` attribution."""
    n = model.cfg.n_layers * model.cfg.n_heads
    return att.mean()[:n].reshape(model.cfg.n_layers, model.cfg.n_heads)


def top_heads(grid: torch.Tensor, k: int = 5) -> list[tuple[int, int, float]]:
    """The k heads of a [layer, head] grid with the largest |value|: (layer, head, value)."""
    n_heads = grid.shape[1]
    order = grid.flatten().abs().argsort(descending=True)[:k].tolist()
    return [(i // n_heads, i % n_heads, float(grid.flatten()[i])) for i in order]


@torch.no_grad()
def accumulated(model: HookedTransformer, cache: ActivationCache, answers: Tokens,
                wrongs: Tokens | None = None, pos: int = -1) -> Attribution:
    """The target read from the residual stream before each layer and after the last.

    Labels "0_pre", ..., "final_post"; LN-scaled with the final scale from the cache, so the
    last entry (plus the bias) equals the model's logit (difference).
    """
    stack, labels = cache.accumulated_resid(layer=None, pos_slice=pos, return_labels=True)
    values = _project(model, cache, stack, answers, wrongs, pos)
    return Attribution(labels, values, target_bias(model, answers, wrongs, batch=stack.shape[1]))


# ---------------------------------------------------------------------------------------------
# Logit lens
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitLens:
    """The residual stream at each layer decoded through ln_final and the unembedding.

    labels: [layer] "0_pre" (the embeddings), "1_pre", ..., "final_post" (the model's output).
    top_ids, top_probs: [layer, pos, k] the k most likely next tokens at each layer and position.
    answer_prob, answer_rank: [layer, pos] of the answer token (rank 0 = the top token).
    The final LayerNorm is recomputed on each layer's residual stream (the logit lens reads each
    layer as if it were the last), so the last layer equals the model's own prediction.
    """

    labels: list[str]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    answer_prob: torch.Tensor | None
    answer_rank: torch.Tensor | None


@torch.no_grad()
def logit_lens(model: HookedTransformer, cache: ActivationCache, answer: int | None = None, k: int = 5,
               batch_index: int = 0) -> LogitLens:
    """Top-k tokens per layer x position, and the answer's probability and rank per layer x position.

    One layer at a time, so at most [pos, d_vocab] logits are held (GPT-2 at 1,024 tokens: 200 MB).
    """
    resid, labels = cache.accumulated_resid(layer=None, return_labels=True)  # [layer, batch, pos, d_model]
    top_ids, top_probs, answer_prob, answer_rank = [], [], [], []
    for layer_resid in resid[:, batch_index]:
        logits = model.unembed(model.ln_final(layer_resid[None]))[0].float()  # [pos, d_vocab]
        probs = logits.softmax(-1)
        top = probs.topk(k, dim=-1)
        top_ids.append(top.indices)
        top_probs.append(top.values)
        if answer is not None:
            answer_prob.append(probs[:, answer])
            answer_rank.append((logits > logits[:, answer : answer + 1]).sum(-1))
    stack = lambda xs: torch.stack(xs) if xs else None  # noqa: E731
    return LogitLens(labels, stack(top_ids), stack(top_probs), stack(answer_prob), stack(answer_rank))


# ---------------------------------------------------------------------------------------------
# Neurons
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def neuron_attribution(model: HookedTransformer, cache: ActivationCache, layer: int, answers: Tokens,
                       wrongs: Tokens | None = None, pos: int = -1) -> torch.Tensor:
    """[neuron, batch] each MLP neuron's direct contribution to the target at `pos`.

    Activation (hook_post) times its output weight row W_out[layer, neuron], centred and divided
    by the cached final LayerNorm scale, dotted with the unembedding direction: the same
    quantity as this layer's rows of `cache.stack_neuron_results(-1, apply_ln=True)` dotted with
    the direction,
    without materialising [neuron, batch, d_model].
    """
    if model.cfg.attn_only:
        raise ValueError("This model has no MLP layers, so it has no neurons.")
    post = cache["post", layer][:, pos, :]  # [batch, d_mlp]
    scale = _final_scale(model, cache, pos)  # [batch, 1]
    direction = unembed_direction(model, answers, wrongs, batch=post.shape[0])  # [batch, d_model]
    if _centres(model):
        direction = direction - direction.mean(-1, keepdim=True)  # centring x == centring the direction
    w_dir = direction @ model.W_out[layer].T  # [batch, d_mlp]
    return (post * w_dir / scale).T


@torch.no_grad()
def neuron_top_tokens(model: HookedTransformer, layer: int, neuron: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [k], logit weights [k]) of the tokens neuron's output row promotes most (W_out @ W_U)."""
    row = model.W_out[layer, neuron]
    if _centres(model):
        row = row - row.mean()  # the final LayerNorm centres what reaches the unembedding
    if _has_ln_weight(model):
        row = row * model.ln_final.w
    weights = row @ model.W_U
    top = weights.topk(k)
    return top.indices, top.values


@dataclass(frozen=True)
class NeuronTable:
    """The neurons of one layer with the largest mean |direct effect|, largest first."""

    layer: int
    neurons: list[int]
    effects: list[float]  # mean direct effect on the target over the batch
    activations: list[float]  # mean activation (hook_post) at the position
    top_tokens: list[list[int]]  # ids of the tokens each neuron's output promotes most


@torch.no_grad()
def top_neurons(model: HookedTransformer, cache: ActivationCache, layer: int, answers: Tokens,
                wrongs: Tokens | None = None, k: int = 20, pos: int = -1, n_tokens: int = 3) -> NeuronTable:
    effects = neuron_attribution(model, cache, layer, answers, wrongs, pos).mean(-1)  # [neuron]
    order = effects.abs().argsort(descending=True)[:k].tolist()
    acts = cache["post", layer][:, pos, :].mean(0)
    return NeuronTable(
        layer, order, [float(effects[n]) for n in order], [float(acts[n]) for n in order],
        [neuron_top_tokens(model, layer, n, n_tokens)[0].tolist() for n in order],
    )
