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

Two kinds of model need a word:
- **Shortformer, rotary and ALiBi positions** never add a position embedding to the residual
  stream, so there is no "pos_embed" component (TransformerLens's `decompose_resid` lists one
  whenever the cache has `hook_pos_embed`, which shortformer models have).
- **Logit soft-capping** (`output_logits_soft_cap`, Gemma 2): the model's logit is
  `cap * tanh(pre-cap logit / cap)`, which is not linear in the residual stream. Attributions
  explain the **pre-cap** logit (`Attribution.softcap` says so; `precap_target` reads it from the
  run); `target` reads the model's capped logits. The logit lens applies the cap, as the model does.

Notebook use:

    from core import attribution, store
    run = store.ActivationStore().get(model, tokens)              # one forward pass
    att = attribution.by_component(model, run.cache, answers, wrongs)
    att.labels, att.mean()                                       # [component]
    heads = attribution.by_head(model, run.cache, answers, wrongs)  # head_grid(model, heads) -> [layer, head]
    lens = attribution.logit_lens(model, run.cache, answers)     # per layer x position
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.components import LayerNorm, LayerNormPre
from transformer_lens.utilities.activation_functions import apply_softcap

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
    softcap: float | None = None  # set when the model soft-caps its logits: the target is the pre-cap logit

    def mean(self) -> torch.Tensor:
        """[component] mean contribution over the batch."""
        return self.values.mean(-1)

    def total(self) -> torch.Tensor:
        """[batch] the target itself: sum of every contribution plus the bias."""
        return self.values.sum(0) + self.bias


def _ids(tokens: Tokens, batch: int, what: str = "answer") -> torch.Tensor:
    """[batch] token ids from one id (an int or a 0-d / one-element tensor) or one id per prompt ([batch]).

    Anything else is refused rather than reshaped: [n, 1] ids against [n] answers would silently
    pair each prompt with the wrong token in TransformerLens's own helpers' convention.
    """
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.ndim > 1:
        raise ValueError(f"{what} ids must be one id or one per prompt (shape [batch]); got shape {tuple(t.shape)}.")
    t = t.reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{t.numel()} {what} ids for {batch} prompts: give one id, or one per prompt.")
    return t


def _pair(answers: Tokens, wrongs: Tokens | None, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([batch] answers, [batch] wrong tokens or None), validated against each other and the batch."""
    a = _ids(answers, batch)
    return a, (None if wrongs is None else _ids(wrongs, batch, "counterfactual"))


def _softcap(model: HookedTransformer) -> float | None:
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return float(cap) if cap is not None and cap > 0 else None


def _adds_pos_embed(model: HookedTransformer) -> bool:
    """Whether positions are added to the residual stream (only "standard" learned positions are)."""
    return model.cfg.positional_embedding_type == "standard"


def _decomposed(model: HookedTransformer, cache: ActivationCache, pos: int, mode: str = "all"):
    """`cache.decompose_resid` at `pos`, without a "pos_embed" row where positions never enter the
    residual stream (shortformer: TL caches hook_pos_embed, but adds it to queries and keys only)."""
    stack, labels = cache.decompose_resid(layer=None, mode=mode, pos_slice=pos, return_labels=True)
    if "pos_embed" in labels and not _adds_pos_embed(model):
        keep = [i for i, label in enumerate(labels) if label != "pos_embed"]
        stack, labels = stack[keep], [labels[i] for i in keep]
    return stack, labels


def final_logits(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    """Logits [..., d_vocab] of a final residual stream [batch, pos, d_model], as the model makes them:
    final normalisation (when the model has one), unembedding, soft cap (when it has one)."""
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


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
    a, w = _pair(answers, wrongs, batch)
    d = model.W_U[:, a].T
    if w is not None:
        d = d - model.W_U[:, w].T
    if _has_ln_weight(model):
        d = d * model.ln_final.w
    return d


@torch.no_grad()
def target_bias(model: HookedTransformer, answers: Tokens, wrongs: Tokens | None = None,
                batch: int = 1) -> torch.Tensor:
    """[batch] the constant part of the target: final LayerNorm bias and unembedding bias."""
    a, w = _pair(answers, wrongs, batch)
    out = model.b_U[a] - (model.b_U[w] if w is not None else 0.0)
    if hasattr(getattr(model, "ln_final", None), "b"):
        u = model.W_U[:, a].T - (model.W_U[:, w].T if w is not None else 0.0)
        out = out + u @ model.ln_final.b
    return out


@torch.no_grad()
def target(model: HookedTransformer, logits: torch.Tensor, answers: Tokens, wrongs: Tokens | None = None,
           pos: int = -1) -> torch.Tensor:
    """[batch] the target read straight from logits [batch, pos, d_vocab]: the reference value
    (the model's own logits, so soft-capped on a model that caps them)."""
    last = logits[:, pos, :]
    idx = torch.arange(last.shape[0])
    a, w = _pair(answers, wrongs, last.shape[0])
    out = last[idx, a]
    if w is not None:
        out = out - last[idx, w]
    return out


@torch.no_grad()
def precap_target(model: HookedTransformer, cache: ActivationCache, answers: Tokens, wrongs: Tokens | None = None,
                  pos: int = -1) -> torch.Tensor:
    """[batch] the target before any logit soft cap, from the run's final residual stream: what the
    attributions add up to. Equals `target` on a model without a soft cap."""
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, pos]  # [batch, d_model]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid[:, None])[:, 0]
    logits = model.unembed(resid[:, None])  # [batch, 1, d_vocab], no cap
    return target(model, logits, answers, wrongs)


def _project(model: HookedTransformer, cache: ActivationCache, stack: torch.Tensor, answers, wrongs,
             pos: int) -> torch.Tensor:
    """[component, batch] of a stack [component, batch, d_model] read at `pos`: LN-scaled, dotted."""
    scaled = cache.apply_ln_to_stack(stack, layer=None, pos_slice=pos)
    direction = unembed_direction(model, answers, wrongs, batch=stack.shape[1])
    return (scaled * direction).sum(-1)


@torch.no_grad()
def by_component(model: HookedTransformer, cache: ActivationCache, answers: Tokens,
                 wrongs: Tokens | None = None, pos: int = -1) -> Attribution:
    """Embeddings, then each layer's attention and MLP output ("embed", "0_attn_out", ...).

    "pos_embed" is listed only for models that add positions to the residual stream.
    """
    stack, labels = _decomposed(model, cache, pos)
    values = _project(model, cache, stack, answers, wrongs, pos)
    return Attribution(labels, values, target_bias(model, answers, wrongs, batch=stack.shape[1]), _softcap(model))


def _post_norm(model: HookedTransformer, layer: int, sublayer: str) -> tuple[str, torch.nn.Module] | None:
    """(hook prefix, module) of the norm applied to a layer's attention ("attn") or MLP ("mlp")
    output before it is added to the residual stream (Gemma 2/3's ln1_post / ln2_post; OLMo 2/3's
    ln1 / ln2), or None."""
    n = 1 if sublayer == "attn" else 2
    if model.cfg.use_normalization_before_and_after:
        return f"blocks.{layer}.ln{n}_post", getattr(model.blocks[layer], f"ln{n}_post")
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return f"blocks.{layer}.ln{n}", getattr(model.blocks[layer], f"ln{n}")
    return None


def _through_post_norm(model: HookedTransformer, cache: ActivationCache, layer: int, pos: int,
                       parts: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs [head, batch, d_model] and the attention bias [batch, d_model] as the residual
    stream receives them. A norm after the attention (`_post_norm`) is linear once its scale
    (from the cache) is fixed, so the heads' shares still add up to hook_attn_out exactly."""
    post = _post_norm(model, layer, "attn")
    if post is None:
        return parts, bias
    name, norm = post
    scale = cache[f"{name}.hook_scale"][:, pos]  # [batch, 1]
    centre = isinstance(norm, (LayerNorm, LayerNormPre))
    if centre:
        parts = parts - parts.mean(-1, keepdim=True)
        bias = bias - bias.mean(-1, keepdim=True)
    w = getattr(norm, "w", None)
    parts, bias = parts / scale, bias / scale
    if w is not None:
        parts, bias = parts * w, bias * w
    if getattr(norm, "b", None) is not None:
        bias = bias + norm.b
    return parts, bias


@torch.no_grad()
def head_results(model: HookedTransformer, cache: ActivationCache, pos: int = -1) -> tuple[torch.Tensor, list[str]]:
    """([layer * head, batch, d_model] each head's output at `pos`, labels "L0H0", ...)."""
    outs, labels = [], []
    for layer in range(model.cfg.n_layers):
        z = cache["z", layer][:, pos]  # [batch, head, d_head]
        heads = torch.einsum("bhd,hdm->hbm", z, model.W_O[layer])
        heads, _ = _through_post_norm(model, cache, layer, pos, heads, model.b_O[layer].expand(z.shape[0], -1))
        outs.append(heads)
        labels += [f"L{layer}H{h}" for h in range(model.cfg.n_heads)]
    return torch.cat(outs, 0), labels


def attn_biases(model: HookedTransformer, cache: ActivationCache, pos: int = -1) -> torch.Tensor:
    """[batch, d_model] every layer's attention output bias b_O as the residual stream receives it."""
    batch = cache["z", 0].shape[0]
    total = torch.zeros(batch, model.cfg.d_model, device=model.b_O.device, dtype=model.b_O.dtype)
    for layer in range(model.cfg.n_layers):
        empty = model.b_O.new_zeros(0, batch, model.cfg.d_model)
        _, bias = _through_post_norm(model, cache, layer, pos, empty, model.b_O[layer].expand(batch, -1))
        total = total + bias
    return total


@torch.no_grad()
def by_head(model: HookedTransformer, cache: ActivationCache, answers: Tokens,
            wrongs: Tokens | None = None, pos: int = -1) -> Attribution:
    """Every head ("L0H0", ...), then the embeddings, MLPs and attention biases, so it sums up.

    Head outputs are hook_z times W_O at `pos` (what `cache.stack_head_results` computes; that
    method would also write every head's output at every position into the shared cache). The
    attention output bias b_O of each layer is not a head's, and is listed as "attn bias". Where a
    norm follows the attention (Gemma 2/3, OLMo 2/3), heads and bias are taken through it with the
    run's own scale, so they still add up.
    """
    heads, head_labels = head_results(model, cache, pos)
    rest, rest_labels = _decomposed(model, cache, pos, mode="mlp")
    b_o_stack = attn_biases(model, cache, pos)[None]  # [1, batch, d_model]
    stack = torch.cat([heads, rest, b_o_stack], 0)
    values = _project(model, cache, stack, answers, wrongs, pos)
    labels = head_labels + rest_labels + ["attn bias"]
    return Attribution(labels, values, target_bias(model, answers, wrongs, batch=heads.shape[1]), _softcap(model))


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
    return Attribution(labels, values, target_bias(model, answers, wrongs, batch=stack.shape[1]), _softcap(model))


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
    layer as if it were the last), and the model's logit soft cap applied, so the last layer equals
    the model's own prediction.
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
        logits = final_logits(model, layer_resid[None])[0].float()  # [pos, d_vocab]
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


def has_neurons(model: HookedTransformer) -> bool:
    """Whether the MLPs have one row of neurons per layer (hook_post): not attention-only, not
    mixture-of-experts (there each expert has its own)."""
    return not model.cfg.attn_only and "blocks.0.mlp.hook_post" in model.hook_dict


@torch.no_grad()
def neuron_attribution(model: HookedTransformer, cache: ActivationCache, layer: int, answers: Tokens,
                       wrongs: Tokens | None = None, pos: int = -1) -> torch.Tensor:
    """[neuron, batch] each MLP neuron's direct contribution to the target at `pos`.

    Activation (hook_post) times its output weight row W_out[layer, neuron], centred and divided
    by the cached final LayerNorm scale, dotted with the unembedding direction: the same
    quantity as this layer's rows of `cache.stack_neuron_results(-1, apply_ln=True)` dotted with
    the direction, without materialising [neuron, batch, d_model]. Where a norm follows the MLP
    (Gemma 2/3, OLMo 2/3), the rows go through it with this run's scale (`_neuron_direction`), so
    the neurons plus `neuron_bias` add up to the layer's "mlp_out" bar.
    """
    if model.cfg.attn_only:
        raise ValueError("This model has no MLP layers, so it has no neurons.")
    post = cache["post", layer][:, pos, :]  # [batch, d_mlp]
    direction = _neuron_direction(model, cache, layer, answers, wrongs, pos, post.shape[0])
    w_dir = direction @ model.blocks[layer].mlp.W_out.T  # [batch, d_mlp] (model.W_out stacks every layer)
    return (post * w_dir).T


def _neuron_direction(model: HookedTransformer, cache: ActivationCache, layer: int, answers: Tokens,
                      wrongs: Tokens | None, pos: int, batch: int) -> torch.Tensor:
    """[batch, d_model] d such that a vector v written by this layer's MLP (before any norm after
    it) adds v · d to the target: the unembedding direction, through the final norm's cached scale,
    and through the norm after the MLP (Gemma 2/3, OLMo 2/3) with this run's scale. Both norms are
    linear once their scales are fixed; centring v is centring d."""
    direction = unembed_direction(model, answers, wrongs, batch=batch)
    if _centres(model):
        direction = direction - direction.mean(-1, keepdim=True)  # centring x == centring the direction
    direction = direction / _final_scale(model, cache, pos)
    post = _post_norm(model, layer, "mlp")
    if post is not None:
        name, norm = post
        if getattr(norm, "w", None) is not None:
            direction = direction * norm.w
        if isinstance(norm, (LayerNorm, LayerNormPre)):
            direction = direction - direction.mean(-1, keepdim=True)
        direction = direction / cache[f"{name}.hook_scale"][:, pos]
    return direction


@torch.no_grad()
def neuron_bias(model: HookedTransformer, cache: ActivationCache, layer: int, answers: Tokens,
                wrongs: Tokens | None = None, pos: int = -1) -> torch.Tensor:
    """[batch] what the MLP's output bias b_out (and a norm after the MLP's own bias) adds to the
    target: with `neuron_attribution` summed over neurons, the layer's "mlp_out" bar of `by_component`."""
    batch = cache["post", layer].shape[0]
    direction = _neuron_direction(model, cache, layer, answers, wrongs, pos, batch)
    share = direction @ model.blocks[layer].mlp.b_out
    post = _post_norm(model, layer, "mlp")
    if post is not None and getattr(post[1], "b", None) is not None:
        outer = unembed_direction(model, answers, wrongs, batch=batch)
        if _centres(model):
            outer = outer - outer.mean(-1, keepdim=True)
        share = share + (outer / _final_scale(model, cache, pos)) @ post[1].b
    return share


@torch.no_grad()
def direct_logit_weights(model: HookedTransformer, vectors: torch.Tensor) -> torch.Tensor:
    """[..., d_vocab] the logits a direction [..., d_model] written into the residual stream adds
    directly, per unit of the final normalisation's scale.

    Centred first when the final normalisation is a LayerNorm (it subtracts the mean of what
    reaches the unembedding), times the final LayerNorm's weight when the model keeps one
    unfolded (every zoo model), then W_U. On a model whose LayerNorms TransformerLens folded
    (pretrained models) both are already in W_U, so the same direction gives the same numbers up
    to a constant per direction (TransformerLens also centres W_U over the vocabulary).
    """
    v = vectors.to(model.W_U.dtype)
    if _centres(model):
        v = v - v.mean(-1, keepdim=True)
    if _has_ln_weight(model):
        v = v * model.ln_final.w
    return v @ model.W_U


@torch.no_grad()
def direct_logit_weight_on(model: HookedTransformer, vectors: torch.Tensor, token: int) -> torch.Tensor:
    """[n] `direct_logit_weights(vectors)[:, token]` for directions [n, d_model], without the
    [n, d_vocab] product (24,576 SAE features × GPT-2's vocabulary would be 5 GB)."""
    column = model.W_U[:, token]
    if _has_ln_weight(model):
        column = column * model.ln_final.w
    if _centres(model):
        column = column - column.mean()  # centring each direction == centring this column (after the weight)
    return vectors.to(column.dtype) @ column


@torch.no_grad()
def neuron_top_tokens(model: HookedTransformer, layer: int, neuron: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [k], logit weights [k]) of the tokens neuron's output row promotes most (see `direct_logit_weights`)."""
    top = direct_logit_weights(model, _rows_as_written(model, layer, model.blocks[layer].mlp.W_out[neuron])).topk(k)
    return top.indices, top.values


def _rows_as_written(model: HookedTransformer, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """MLP output rows as the residual stream receives them, up to the run's positive scale: through
    the weight (and centring) of a norm after the MLP, where the model has one."""
    post = _post_norm(model, layer, "mlp")
    if post is None:
        return rows
    norm = post[1]
    if isinstance(norm, (LayerNorm, LayerNormPre)):
        rows = rows - rows.mean(-1, keepdim=True)
    return rows * norm.w if getattr(norm, "w", None) is not None else rows


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
    # The k neurons' output rows through the unembedding in one product (model.W_out would stack
    # every layer's weights once per neuron).
    rows = _rows_as_written(model, layer, model.blocks[layer].mlp.W_out[order])
    top = direct_logit_weights(model, rows).topk(n_tokens, dim=-1).indices
    return NeuronTable(
        layer, order, [float(effects[n]) for n in order], [float(acts[n]) for n in order],
        [row.tolist() for row in top],
    )
