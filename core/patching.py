"""Activation patching, ablation and attribution patching, batched.

Patching asks: if this one activation took its value from the other run, what would the task
metric be? TransformerLens's `patching` module answers with one forward pass per component.
Here every intervention of a sweep is a copy of the base run, and the copies are stacked along
the batch dimension (row = copy * n_prompts + prompt). Three savings, none of which changes a
number beyond float rounding (the tests hold every sweep to TransformerLens's within 1e-4):

1. **Batching.** One forward pass serves many copies.
2. **Start where the patch is.** A copy patched at layer L equals the base run below L, so it
   joins the batch at layer L from the base run's cached `resid_pre` (TransformerLens's
   `start_at_layer`); copies patched at different layers share the passes through later layers.
3. **Compute only what can change, and only what is read.** Attention is causal, so a patch
   whose first new value is at position p leaves every position before p as it was: the copy
   recomputes positions p.. only, reading the earlier keys and values from the base run's cache
   (as TransformerLens's key-value cache does when it generates). That holds for a by-position
   patch at p, and for an all-positions patch when the two runs first differ at p (clean and
   corrupted prompts usually share their start; the values are compared exactly, and a patch
   that writes the values already there is not run: its metric is the base run's). The final
   LayerNorm and the unembedding run only at the position the metric reads (the last one, for
   every task).

The base run is the one that is patched (the corrupted run when denoising, the clean run when
noising) and the source is where patched values come from (the other run's cache, or for an
ablation zeros, a batch mean or another prompt's values). Every block is TransformerLens's own
module, run with its own hooks, so any architecture TransformerLens runs is patched the same way.

Shapes follow `transformer_lens.patching`: layer sweeps give [layer, pos] (or [layer] over all
positions), head sweeps [layer, head] over all positions and [layer, pos, head] by position
(the pattern too, where TransformerLens's own `pattern_by_pos` gives [layer, head, dest_pos]).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Mapping

import torch
from transformer_lens import ActivationCache, HookedTransformer, utils
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from core.attribution import final_logits
from core.store import locked

if TYPE_CHECKING:
    from core.tasks import Normaliser, Task

LAYER_ACTS = ("resid_pre", "attn_out", "mlp_out")
HEAD_ACTS = ("z", "q", "k", "v", "pattern")
ACTS = LAYER_ACTS + HEAD_ACTS + ("post",)
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, d_vocab] -> 0-d (or [k]) tensor
Source = Callable[[str], torch.Tensor]  # hook name -> activation [batch, ...] (full positions)
Progress = Callable[[float], None]  # share of the sweep done, 0..1

DEFAULT_MAX_TOKENS = None  # rows x positions per forward pass: `chunk_tokens` (from the device's free memory)
CPU_MAX_TOKENS = 16384  # on a CPU bigger passes are no faster, and hold the model's lock longer
GPU_MAX_TOKENS = 1 << 18
MIN_TOKENS = 256
MEMORY_SHARE = 0.25  # of the device's free memory, for one patched forward pass
MAX_LOGITS = 2**24  # logits computed at once (64 MiB in float32)


def token_bytes(model: HookedTransformer, n_pos: int) -> int:
    """Bytes one token (one row × position) of a patched forward pass needs at once, roughly:
    a layer's residual stream copies, queries/keys/values and outputs, MLP hidden units and the
    attention scores and pattern over `n_pos` keys, twice over for the hooks' copies and the
    cached prefix keys and values."""
    cfg = model.cfg
    elt = torch.finfo(cfg.dtype).bits // 8
    heads = cfg.n_heads * cfg.d_head
    per_layer = 4 * cfg.d_model + 4 * heads + 2 * (cfg.d_mlp or 0) + 2 * cfg.n_heads * n_pos
    return 2 * elt * per_layer


def chunk_tokens(model: HookedTransformer, n_pos: int) -> int:
    """Rows × positions per patched forward pass: `MEMORY_SHARE` of the model's device's free
    memory over `token_bytes`, between MIN_TOKENS and CPU_MAX_TOKENS (GPU_MAX_TOKENS on CUDA)."""
    from core.checkpoints import available_bytes

    device = str(model.cfg.device)
    cap = GPU_MAX_TOKENS if device.startswith("cuda") else CPU_MAX_TOKENS
    free = available_bytes(device)
    if free is None:
        return CPU_MAX_TOKENS
    return int(max(MIN_TOKENS, min(cap, MEMORY_SHARE * free // token_bytes(model, n_pos))))


class PatchingError(ValueError):
    """A sweep cannot run as asked; the message is meant for the person who asked."""


@dataclass(frozen=True)
class Component:
    """One intervention: an activation at a layer, optionally one position, head or neuron.

    `pos=None` patches every position; `head` is for z/q/k/v/pattern (required there),
    `neuron` for `post` (the MLP's hidden activations).
    """

    act: str
    layer: int
    pos: int | None = None
    head: int | None = None
    neuron: int | None = None

    @property
    def hook_name(self) -> str:
        return utils.get_act_name(self.act, self.layer)


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


def _set(act: torch.Tensor, rows: slice, c: Component, src: torch.Tensor, start: int) -> None:
    """Write the source value of component `c` into `act[rows]` (positions are relative to `start`)."""
    if c.act == "pattern":  # [batch, head, query_pos, key_pos]; the query axis starts at `start`
        q = slice(None) if c.pos is None else c.pos - start
        q_src = slice(start, None) if c.pos is None else c.pos
        act[rows, c.head, q] = src[:, c.head, q_src]
        return
    p = slice(None) if c.pos is None else c.pos - start
    p_src = slice(start, None) if c.pos is None else c.pos
    if c.act in ("z", "q", "k", "v"):  # [batch, pos, head, d_head]
        act[rows, p, c.head] = src[:, p_src, c.head]
    elif c.act == "post":  # [batch, pos, d_mlp]
        idx = slice(None) if c.neuron is None else c.neuron
        act[rows, p, idx] = src[:, p_src, idx]
    else:  # [batch, pos, d_model]
        act[rows, p] = src[:, p_src]


def _check(model: HookedTransformer, components: list[Component], n_pos: int) -> None:
    cfg = model.cfg
    if cfg.positional_embedding_type == "relative_positional_bias":
        raise PatchingError(f"Batched patching does not support {cfg.positional_embedding_type} positions.")
    kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    for c in components:
        if c.act not in ACTS:
            raise PatchingError(f"Unknown activation {c.act!r}; one of {', '.join(ACTS)}.")
        if not 0 <= c.layer < cfg.n_layers:
            raise PatchingError(f"Layer {c.layer} is outside the model's {cfg.n_layers} layers.")
        if c.pos is not None and not 0 <= c.pos < n_pos:
            raise PatchingError(f"Position {c.pos} is outside the prompt's {n_pos} tokens.")
        if c.act in HEAD_ACTS:
            heads = kv_heads if c.act in ("k", "v") else cfg.n_heads
            if c.head is None:
                raise PatchingError(f"Patching {c.act} needs a head.")
            if not 0 <= c.head < heads:
                raise PatchingError(f"Head {c.head} is outside the layer's {heads} {c.act} heads.")
        if c.act in ("post", "mlp_out") and cfg.attn_only:
            raise PatchingError("This model has no MLP layers (it is attention-only).")
        if c.act == "post":
            if c.hook_name not in model.hook_dict:
                raise PatchingError("This model's MLPs have no single neurons to patch (no hook_post).")
            if c.neuron is not None and not 0 <= c.neuron < cfg.d_mlp:
                raise PatchingError(f"Neuron {c.neuron} is outside the layer's {cfg.d_mlp} neurons.")


OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoForCausalLM")


def reuses_prefix(model: HookedTransformer) -> bool:
    """Whether a copy may start at its first changed position, reading earlier keys and values
    from the base run's `hook_k`/`hook_v`.

    Not when attention is not causal, when keys or values are changed after their hooks (QK
    norm, clipping), with ALiBi (its bias is built for the positions in the pass), or when the
    tokenizer pads on the left; those models run every copy from position 0, with the padding
    mask and padding-shifted positions TransformerLens's own forward pass would use.
    """
    cfg = model.cfg
    tok = getattr(model, "tokenizer", None)
    return (
        cfg.attention_dir == "causal"
        and cfg.positional_embedding_type != "alibi"
        and not getattr(cfg, "use_qk_norm", False)
        and getattr(cfg, "clip_qkv", None) is None
        and cfg.original_architecture not in OLMO
        and getattr(tok, "padding_side", "right") != "left"
    )


def patch_components(
    model: HookedTransformer,
    base_tokens: torch.Tensor,
    base_cache: ActivationCache | Mapping[str, torch.Tensor],
    source: Source,
    components: list[Component],
    metric: Metric,
    read: Literal["last", "all"] = "last",
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    progress: Progress | None = None,
) -> torch.Tensor:
    """[len(components)] (or [len(components), k]): the metric of the base run with each component set from `source`.

    base_tokens: [batch, pos]; base_cache: the base run's activations (every layer's resid_pre,
    k and v, the last layer's resid_post and the patched activations: a full `run_with_cache`
    has them); source(hook_name) -> [batch, ...] values of that activation.
    `metric` takes the logits of one patched copy, [batch, read positions, d_vocab], like the
    metric of `transformer_lens.patching` (which sees every position): with `read="last"` only
    the last position is computed, which is all a task metric reads. It returns a 0-d tensor, or
    [k] for k numbers from one pass.
    """
    n_prompts, n_pos = base_tokens.shape
    _check(model, components, n_pos)
    max_tokens = max_tokens or chunk_tokens(model, n_pos)
    with locked(model):  # the tokenizer's padding side and cfg flags, read once and together
        prefix = reuses_prefix(model) and read == "last"
        mask = padding_mask(model, base_tokens)
    if read == "all" and any(c.pos is not None for c in components):
        raise PatchingError("A metric that reads every position needs patches over every position.")
    src_cache: dict[str, torch.Tensor] = {}

    def src(name: str) -> torch.Tensor:
        if name not in src_cache:
            src_cache[name] = source(name)
        return src_cache[name]

    out: list[torch.Tensor | None] = [None] * len(components)
    # Copies that change the same positions share passes: one group per first changed position.
    # A patch that writes the values already there changes nothing: its metric is the base run's.
    groups: dict[int, list[int]] = {}
    unchanged = []
    for i, c in enumerate(components):
        first = _first_change(c, base_cache, src)
        if first is None:
            unchanged.append(i)
        else:
            groups.setdefault(first if prefix else 0, []).append(i)
    # Chunks: no more than `max_tokens` rows x positions (recomputed ones and the earlier keys
    # and values read from the cache) in one pass.
    chunks = []
    for start, idx in sorted(groups.items()):
        idx.sort(key=lambda i: components[i].layer)
        per = max(1, max_tokens // (n_prompts * n_pos))
        chunks += [(start, idx[j : j + per]) for j in range(0, len(idx), per)]
    work = [len(idx) * (n_pos - start) for start, idx in chunks]
    done = 0.0
    # The model's lock is taken per chunk, not per sweep: other sessions' forward passes run
    # between two chunks (each chunk re-establishes the model's state: `locked` clears hooks and
    # sets the split q/k/v switch; the padding side and cfg flags were read above).
    with torch.inference_mode():
        if unchanged:
            with locked(model):
                value = metric(_base_logits(model, base_cache, read)).detach().float().cpu()
            for i in unchanged:
                out[i] = value
        for (start, idx), w in zip(chunks, work):
            with locked(model):
                resid = _run_chunk(model, base_tokens, base_cache, src, [components[i] for i in idx], start,
                                   n_prompts, mask)
                resid = resid[:, -1:] if read == "last" else resid
                # Unembed a few copies at a time: logits are [rows, read positions, d_vocab].
                per_unembed = max(1, MAX_LOGITS // (n_prompts * resid.shape[1] * model.cfg.d_vocab))
                for j0 in range(0, len(idx), per_unembed):
                    j1 = min(len(idx), j0 + per_unembed)
                    logits = final_logits(model, resid[j0 * n_prompts : j1 * n_prompts])
                    for j in range(j0, j1):
                        r = (j - j0) * n_prompts
                        out[idx[j]] = metric(logits[r : r + n_prompts]).detach().float().cpu()
            done += w
            if progress is not None:  # outside the lock: a progress bar may draw
                progress(done / sum(work))
    if progress is not None and not chunks:
        progress(1.0)
    return torch.stack(out) if out else torch.empty(0)


def _component_slice(c: Component, act: torch.Tensor) -> torch.Tensor:
    """The part of an activation a component patches, with positions on axis 1: [batch, pos, ...]."""
    if c.act == "pattern":  # [batch, head, query_pos, key_pos]
        return act[:, c.head]
    if c.act in ("z", "q", "k", "v"):
        return act[:, :, c.head]
    if c.act == "post" and c.neuron is not None:
        return act[:, :, c.neuron]
    return act


def _first_change(c: Component, base_cache, src) -> int | None:
    """First position where the patch writes a value different from the base run's, or None."""
    base = _component_slice(c, base_cache[c.hook_name])
    new = _component_slice(c, src(c.hook_name))
    if c.pos is not None:
        return None if torch.equal(base[:, c.pos], new[:, c.pos]) else c.pos
    differs = (base != new).reshape(base.shape[0], base.shape[1], -1).any(-1).any(0)
    hits = differs.nonzero()
    return int(hits[0]) if len(hits) else None


def _base_logits(model, base_cache, read: str) -> torch.Tensor:
    """The unpatched run's logits at the read positions, from its cached final residual stream."""
    resid = base_cache[utils.get_act_name("resid_post", model.cfg.n_layers - 1)]
    return final_logits(model, resid[:, -1:] if read == "last" else resid)


def padding_mask(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor | None:
    """[batch, pos] the padding mask TransformerLens's forward pass builds for `tokens` (1 = real
    token), or None where it builds none (a tokenizer that pads on the right). Call under the lock:
    it reads the tokenizer's padding side and `cfg.default_prepend_bos`."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or tok.padding_side != "left":
        return None
    return utils.get_attention_mask(tok, tokens, model.cfg.default_prepend_bos).to(model.cfg.device)


def prefix_entry(cache, layer: int, start: int, copies: int) -> TransformerLensKeyValueCacheEntry | None:
    """The cached run's keys and values of positions before `start` at `layer`, repeated for
    `copies` copies (a frozen TL key-value cache entry), or None when `start` is 0."""
    if start == 0:
        return None
    k = cache[utils.get_act_name("k", layer)][:, :start]
    v = cache[utils.get_act_name("v", layer)][:, :start]
    return TransformerLensKeyValueCacheEntry(k.repeat(copies, 1, 1, 1), v.repeat(copies, 1, 1, 1), frozen=True)


def _run_chunk(model, base_tokens, base_cache, source, comps: list[Component], start: int, n_prompts: int,
               mask: torch.Tensor | None = None):
    """Final residual stream [len(comps) * n_prompts, positions start.., d_model] of the patched copies.

    mask: the base run's padding mask [n_prompts, pos] (left padding; then `start` is 0).
    """
    if mask is not None and start > 0:
        raise AssertionError("a left-padded batch is recomputed from position 0")
    shortformer = None
    if model.cfg.positional_embedding_type == "shortformer":  # added to queries and keys in every block
        shortformer = model.pos_embed(base_tokens[:, start:].to(model.cfg.device), start, mask)
    by_layer: dict[int, list[int]] = {}
    for j, c in enumerate(comps):
        by_layer.setdefault(c.layer, []).append(j)
    resid = None
    row_of = {}  # copy index -> first row
    for layer in range(comps[0].layer, model.cfg.n_layers):
        joiners = by_layer.get(layer, [])
        if joiners:
            x = base_cache[utils.get_act_name("resid_pre", layer)][:, start:]
            first = 0 if resid is None else resid.shape[0]
            for n, j in enumerate(joiners):
                row_of[j] = first + n * n_prompts
            x = x.repeat(len(joiners), 1, 1)
            resid = x if resid is None else torch.cat([resid, x])
        copies = resid.shape[0] // n_prompts
        entry = prefix_entry(base_cache, layer, start, copies)
        hooks = []
        for name in {comps[j].hook_name for j in joiners}:
            mine = [j for j in joiners if comps[j].hook_name == name]
            src = source(name)

            def hook(act, hook, mine=mine, src=src):
                for j in mine:
                    r = row_of[j]
                    _set(act, slice(r, r + n_prompts), comps[j], src, start)
                return act

            hooks.append((name, hook))
        pos = None if shortformer is None else shortformer.repeat(copies, 1, 1)
        copy_mask = None if mask is None else mask.repeat(copies, 1)
        with model.hooks(fwd_hooks=hooks, reset_hooks_end=True):
            resid = model.blocks[layer](resid, shortformer_pos_embed=pos, past_kv_cache_entry=entry,
                                        attention_mask=copy_mask)
    # Copies were appended in layer order; put them back in `comps` order.
    order = torch.cat([torch.arange(row_of[j], row_of[j] + n_prompts) for j in range(len(comps))])
    return resid[order]


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """A named family of components: one activation, over every position or by position."""

    key: str
    act: str
    by_pos: bool
    label: str

    def n_heads(self, cfg) -> int:
        """Heads of this activation: key/value heads for k and v of grouped-query models."""
        if self.act in ("k", "v") and getattr(cfg, "n_key_value_heads", None):
            return cfg.n_key_value_heads
        return cfg.n_heads

    def components(self, model: HookedTransformer, n_pos: int) -> list[Component]:
        cfg = model.cfg
        heads = self.n_heads(cfg)
        positions = range(n_pos) if self.by_pos else [None]
        if self.act in HEAD_ACTS:
            return [Component(self.act, l, p, h) for l in range(cfg.n_layers) for p in positions for h in range(heads)]
        if self.act == "post":
            return [Component("post", l, p, None, n) for l in range(cfg.n_layers) for p in positions for n in range(cfg.d_mlp)]
        return [Component(self.act, l, p) for l in range(cfg.n_layers) for p in positions]

    def shape(self, model: HookedTransformer, n_pos: int) -> tuple[int, ...]:
        cfg = model.cfg
        heads = self.n_heads(cfg)
        dims = [cfg.n_layers] + ([n_pos] if self.by_pos else [])
        if self.act in HEAD_ACTS:
            dims.append(heads)
        return tuple(dims)


SWEEPS = {
    s.key: s
    for s in [
        Sweep("resid_pre", "resid_pre", True, "Residual stream (resid_pre), layer × position"),
        Sweep("attn_out", "attn_out", True, "Attention layer output, layer × position"),
        Sweep("mlp_out", "mlp_out", True, "MLP layer output, layer × position"),
        Sweep("z", "z", False, "Head outputs (z), all positions"),
        Sweep("z_by_pos", "z", True, "Head outputs (z), by position"),
        Sweep("q", "q", False, "Head queries (q), all positions"),
        Sweep("k", "k", False, "Head keys (k), all positions"),
        Sweep("v", "v", False, "Head values (v), all positions"),
        Sweep("pattern", "pattern", False, "Head attention patterns, all positions"),
        Sweep("q_by_pos", "q", True, "Head queries (q), by position"),
        Sweep("k_by_pos", "k", True, "Head keys (k), by position"),
        Sweep("v_by_pos", "v", True, "Head values (v), by position"),
        Sweep("pattern_by_pos", "pattern", True, "Head attention patterns, by query (destination) position"),
    ]
}
EVERY_HEAD_ACT = ("z", "q", "k", "v", "pattern")  # the order of TL's *_every functions


def cache_source(cache: ActivationCache | Mapping[str, torch.Tensor]) -> Source:
    return lambda name: cache[name]


def run_sweep(
    model: HookedTransformer,
    sweep: str | Sweep,
    base_tokens: torch.Tensor,
    base_cache: ActivationCache,
    source_cache: ActivationCache,
    metric: Metric,
    progress: Progress | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    read: Literal["last", "all"] = "last",
) -> torch.Tensor:
    """One sweep, in the shape of the matching `transformer_lens.patching` function (by-position
    pattern: [layer, pos, head], where TL's `pattern_by_pos` is [layer, head, dest_pos]).

    Denoising: base = corrupted run, source = clean cache. Noising: base = clean, source = corrupted.
    The metric sees the last position's logits only (`read="last"`, all a task metric reads);
    pass `read="all"` for a metric of every position (all-positions sweeps only; slower).
    """
    s = SWEEPS[sweep] if isinstance(sweep, str) else sweep
    if s.act in ("mlp_out", "post") and model.cfg.attn_only:
        raise PatchingError("This model has no MLP layers (it is attention-only).")
    n_pos = base_tokens.shape[1]
    comps = s.components(model, n_pos)
    values = patch_components(model, base_tokens, base_cache, cache_source(source_cache), comps, metric,
                              progress=progress, max_tokens=max_tokens, read=read)
    return values.reshape(s.shape(model, n_pos))


def every_head_act(model, base_tokens, base_cache, source_cache, metric, by_pos: bool,
                   progress: Progress | None = None) -> torch.Tensor:
    """[5, layer, head] (or [5, layer, pos, head]): z, q, k, v, pattern, as TL's `*_every`."""
    comps: list[Component] = []
    shapes = []
    n_pos = base_tokens.shape[1]
    for act in EVERY_HEAD_ACT:
        s = Sweep(act, act, by_pos, act)
        comps += s.components(model, n_pos)
        shapes.append(s.shape(model, n_pos))
    values = patch_components(model, base_tokens, base_cache, cache_source(source_cache), comps, metric,
                              progress=progress)
    out, i = [], 0
    width = shapes[0][-1]
    for shape in shapes:
        n = math.prod(shape)
        part = values[i : i + n].reshape(shape)
        i += n
        if shape[-1] < width:  # grouped-query keys/values: pad as TL does
            part = torch.nn.functional.pad(part, (0, width - shape[-1]))
        out.append(part)
    return torch.stack(out)


def block_every(model, base_tokens, base_cache, source_cache, metric, progress: Progress | None = None) -> torch.Tensor:
    """[3, layer, pos]: resid_pre, attn_out, mlp_out by layer and position (TL's `get_act_patch_block_every`)."""
    n_pos = base_tokens.shape[1]
    comps = [c for act in LAYER_ACTS for c in Sweep(act, act, True, act).components(model, n_pos)]
    values = patch_components(model, base_tokens, base_cache, cache_source(source_cache), comps, metric,
                              progress=progress)
    return values.reshape(3, model.cfg.n_layers, n_pos)


# ---------------------------------------------------------------------------------------------
# Ablation
# ---------------------------------------------------------------------------------------------

AblationKind = Literal["zero", "mean", "resample"]


def derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded permutation of range(n) that moves every index (n >= 2)."""
    if n < 2:
        raise PatchingError("Resample ablation needs at least two prompts, to take each one's values from another.")
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return torch.tensor(perm)


def ablation_source(cache: ActivationCache | Mapping[str, torch.Tensor], kind: AblationKind, n_prompts: int,
                    seed: int = 0) -> Source:
    """Values that replace an activation: zeros, its mean over the batch (per position), or another prompt's."""
    if kind == "zero":
        return lambda name: torch.zeros_like(cache[name])
    if kind == "mean":
        return lambda name: cache[name].mean(0, keepdim=True).expand_as(cache[name])
    if kind == "resample":
        perm = derangement(n_prompts, seed)
        return lambda name: cache[name][perm]
    raise PatchingError(f"Unknown ablation {kind!r}: zero, mean or resample.")


def loss_metric(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Metric:
    """Mean next-token cross-entropy over `tokens` [batch, pos] (logits of every position); padding
    left out where `attention_mask` [batch, pos] is 0, as TransformerLens's loss does."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        return utils.lm_cross_entropy_loss(logits, tokens, attention_mask)
    return metric


@dataclass
class AblationResult:
    """Each ablated component's task metric and loss, beside the unablated run's."""

    components: list[Component]
    metric: torch.Tensor  # [n]
    loss: torch.Tensor  # [n]
    clean_metric: float
    clean_loss: float


def ablate(
    model: HookedTransformer,
    tokens: torch.Tensor,
    cache: ActivationCache,
    components: list[Component],
    metric: Metric,
    kind: AblationKind = "zero",
    seed: int = 0,
    progress: Progress | None = None,
    logits: torch.Tensor | None = None,
) -> AblationResult:
    """Ablate each component (at every position) on `tokens`: the task metric and the loss.

    `logits`: the unablated run's logits when already at hand (a stored run), else computed.
    """
    if any(c.pos is not None for c in components):
        raise PatchingError("Ablation is over every position.")
    src = ablation_source(cache, kind, tokens.shape[0], seed)
    with locked(model):
        mask = padding_mask(model, tokens.to(model.cfg.device))
    lm = loss_metric(tokens.to(model.cfg.device), mask)

    def both(logits):  # one pass gives both numbers
        return torch.stack([metric(logits).float(), lm(logits).float()])

    values = patch_components(model, tokens, cache, src, components, both, read="all", progress=progress)
    if logits is None:
        with locked(model), torch.inference_mode():
            logits = model(tokens.to(model.cfg.device))
    return AblationResult(components, values[:, 0], values[:, 1], float(metric(logits)), float(lm(logits)))


def head_components(model: HookedTransformer, act: str = "z") -> list[Component]:
    return [Component(act, l, None, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def mlp_components(model: HookedTransformer) -> list[Component]:
    return [Component("mlp_out", l) for l in range(model.cfg.n_layers)]


def neuron_components(model: HookedTransformer, layer: int) -> list[Component]:
    return [Component("post", layer, None, None, n) for n in range(model.cfg.d_mlp)]


# ---------------------------------------------------------------------------------------------
# Attribution patching
# ---------------------------------------------------------------------------------------------


def attribution_patch(
    model: HookedTransformer,
    sweep: str | Sweep,
    base_tokens: torch.Tensor,
    source_cache: ActivationCache,
    metric: Metric,
) -> torch.Tensor:
    """The linear estimate of `run_sweep`'s metric change: (source - base) · d metric / d activation.

    One forward and one backward pass on the base run for every component at once. Returns the
    estimated metric of each patched run (base metric + estimated change), in the sweep's shape.
    """
    s = SWEEPS[sweep] if isinstance(sweep, str) else sweep
    if s.act in ("mlp_out", "post") and model.cfg.attn_only:
        raise PatchingError("This model has no MLP layers (it is attention-only).")
    names = [utils.get_act_name(s.act, l) for l in range(model.cfg.n_layers)]
    acts: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        acts[hook.name] = act
        return act

    with locked(model), torch.enable_grad():
        with model.hooks(fwd_hooks=[(n, keep) for n in names], reset_hooks_end=True):
            logits = model(base_tokens)
        value = metric(logits)
        grads = torch.autograd.grad(value, [acts[n] for n in names])
    per_layer = []
    for n, g in zip(names, grads):
        diff = (source_cache[n] - acts[n].detach()) * g
        if s.act == "pattern":  # [batch, head, dest, src] -> [pos(dest), head] or [head]
            d = diff.sum(dim=(0, 3)).T if s.by_pos else diff.sum(dim=(0, 2, 3))
        elif s.act in ("z", "q", "k", "v"):  # [batch, pos, head, d_head]
            d = diff.sum(dim=(0, 3)) if s.by_pos else diff.sum(dim=(0, 1, 3))
        else:  # [batch, pos, d_model]
            d = diff.sum(dim=(0, 2)) if s.by_pos else diff.sum(dim=(0, 1, 2))
        per_layer.append(d)
    # The metric is a batch mean in the tasks; the gradient already carries the 1/batch.
    return (float(value.detach()) + torch.stack(per_layer).detach()).float().cpu()


# ---------------------------------------------------------------------------------------------
# A task's sweep, labelled: what a page shows and a notebook plots in one line
# ---------------------------------------------------------------------------------------------

Direction = Literal["denoise", "noise"]
Method = Literal["exact", "attribution"]


@dataclass(frozen=True)
class SweepResult:
    """One sweep on a task, with everything needed to show it.

    values: the sweep in `transformer_lens.patching`'s shape, normalised (1 = the clean run's
      metric, 0 = the corrupted run's) where that is meaningful (`normalised`), else the change in
      the raw metric from the unpatched (base) run.
    raw: the metric of each patched run, unnormalised.
    dims: the names of the axes of `values` ("layer", "pos", "head"); labels: their labels
      ("L0", "3: ' Mary'", "H2" — key/value heads of grouped-query models are "KV0").
    position_hover: per position, its clean token and, where it differs, the corrupted one.
    """

    sweep: Sweep
    direction: Direction
    method: Method
    values: torch.Tensor
    raw: torch.Tensor
    normaliser: "Normaliser"
    dims: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    position_hover: tuple[str, ...]
    metric_label: str

    @property
    def normalised(self) -> bool:
        return self.normaliser.meaningful

    @property
    def value_label(self) -> str:
        return "normalised metric" if self.normalised else f"Δ {self.metric_label}"

    @property
    def baseline(self) -> float:
        """The value of an unchanged run on the shown scale: the base run's."""
        if not self.normalised:
            return 0.0
        return 0.0 if self.direction == "denoise" else 1.0

    @property
    def title(self) -> str:
        return f"{self.sweep.label}: {'exact' if self.method == 'exact' else 'attribution patching'}"

    @property
    def heads_grid(self) -> torch.Tensor | None:
        """[layer, head] of a head sweep (by position: each head at its position furthest from the
        baseline), or None for layer sweeps."""
        if self.dims[-1] != "head":
            return None
        if "pos" not in self.dims:
            return self.values
        at = (self.values - self.baseline).abs().argmax(1, keepdim=True)
        return self.values.gather(1, at).squeeze(1)


def component_names(result: SweepResult) -> list[str]:
    """One name per value of a sweep, in `values.flatten()` order ("L1H2", "L0 pos 3", "L2KV1 pos 0")."""
    axes = result.labels
    if result.dims == ("layer", "head"):
        return [f"{l}{h}" for l in axes[0] for h in axes[1]]
    if result.dims == ("layer", "pos"):
        return [f"{l} pos {p}" for l in axes[0] for p in range(len(axes[1]))]
    return [f"{l}{h} pos {p}" for l in axes[0] for p in range(len(axes[1])) for h in axes[2]]


def agreement(exact: SweepResult, estimate: SweepResult) -> float:
    """Pearson correlation of attribution patching's estimate with exact patching, over components."""
    a, b = exact.values.flatten().float(), estimate.values.flatten().float()
    if a.numel() < 2:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def sweep_task(
    model: HookedTransformer,
    task: "Task",
    sweep: str | Sweep,
    direction: Direction = "denoise",
    method: Method = "exact",
    activation_store=None,
    progress: Progress | None = None,
    example: int = 0,
) -> SweepResult:
    """One patching sweep on a task, labelled (the notebook API: `plots.figure(sweep_task(...))`).

    Denoising runs the corrupted prompts with one activation from the clean run; noising the clean
    prompts with one from the corrupted run. `method="attribution"` is attribution patching's
    linear estimate. The runs come from `activation_store` (a new one if None). Positions are
    labelled with prompt `example`'s tokens.
    """
    from core import store as store_module
    from core.tasks import normaliser

    s = SWEEPS[sweep] if isinstance(sweep, str) else sweep
    if direction not in ("denoise", "noise"):
        raise PatchingError(f"Unknown direction {direction!r}: 'denoise' or 'noise'.")
    if method not in ("exact", "attribution"):
        raise PatchingError(f"Unknown method {method!r}: 'exact' or 'attribution'.")
    activation_store = activation_store or store_module.ActivationStore()
    clean = activation_store.get(model, task.clean_tokens)
    corrupted = activation_store.get(model, task.corrupted_tokens)
    norm = normaliser(task, clean.logits, corrupted.logits)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    if method == "attribution":
        raw = attribution_patch(model, sweep, base.tokens, source.cache, task.metric)
    else:
        raw = run_sweep(model, sweep, base.tokens, base.cache, source.cache, task.metric, progress=progress)
    base_metric = norm.corrupted if direction == "denoise" else norm.clean
    values = norm(raw) if norm.meaningful else raw - base_metric
    clean_str = store_module.str_tokens(model, task.clean_tokens[example])
    corrupted_str = store_module.str_tokens(model, task.corrupted_tokens[example])
    n_heads = s.n_heads(model.cfg)
    h_name = "KV" if n_heads != model.cfg.n_heads else "H"
    axes = {"layer": tuple(f"L{l}" for l in range(model.cfg.n_layers)),
            "pos": tuple(f"{p}: {t}" for p, t in enumerate(clean_str)),
            "head": tuple(f"{h_name}{h}" for h in range(n_heads))}
    dims = ("layer",) + (("pos",) if s.by_pos else ()) + (("head",) if s.act in HEAD_ACTS else ())
    hover = tuple(f"position {p}: {c!r}" + (f" (corrupted: {k!r})" if c != k else "")
                  for p, (c, k) in enumerate(zip(clean_str, corrupted_str)))
    return SweepResult(s, direction, method, values, raw, norm, dims, tuple(axes[d] for d in dims), hover,
                       task.metric_label)


AblationTarget = Literal["heads", "mlps", "neurons"]


def ablate_task(model: HookedTransformer, task: "Task", target: AblationTarget = "heads", kind: AblationKind = "zero",
                layer: int = 0, activation_store=None, progress: Progress | None = None) -> tuple[AblationResult, "Normaliser"]:
    """Ablate every head, every MLP layer or every neuron of `layer` on the task's clean prompts:
    (the AblationResult, the task's Normaliser for showing its metric)."""
    from core import store as store_module
    from core.tasks import normaliser

    comps = {"heads": lambda: head_components(model), "mlps": lambda: mlp_components(model),
             "neurons": lambda: neuron_components(model, layer)}
    if target not in comps:
        raise PatchingError(f"Unknown ablation target {target!r}: heads, mlps or neurons.")
    activation_store = activation_store or store_module.ActivationStore()
    clean = activation_store.get(model, task.clean_tokens)
    corrupted = activation_store.get(model, task.corrupted_tokens)
    result = ablate(model, clean.tokens, clean.cache, comps[target](), task.metric, kind=kind, progress=progress,
                    logits=clean.logits)
    return result, normaliser(task, clean.logits, corrupted.logits)
