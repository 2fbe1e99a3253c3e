"""Path patching (Wang et al. 2022, "Interpretability in the Wild"), batched.

Activation patching asks what a component's output does to the metric by every route at once.
Path patching asks what it does through one route only: from a sender head straight to the
logits, or into the queries, keys or values of some receiver heads. Here, as in ARENA's IOI
exercises, by noising: the base run is the clean prompts and new values come from the
corrupted ones; the metric (`logits [batch, pos, d_vocab] -> 0-d tensor`, a task metric reads
the last position) of the resulting run is reported.

- **Sender → logits.** Run the clean prompts with sender s's `hook_z` taken from the corrupted
  run and every other head's `hook_z` frozen at its clean value; MLPs (if any) recompute
  freely. Only the paths s → (MLPs →) logits carry the change.
- **Sender → receivers' q/k/v.** Step 1: as above (s from the corrupted run, every other head
  frozen at clean, MLPs free) up to the receivers' layers, recording the receivers' `hook_q`,
  `hook_k` or `hook_v`. Step 2: run the clean prompts with only those receiver inputs replaced by
  the recorded values, everything else recomputing freely. For grouped-query models keys and
  values belong to key/value heads: receiver (layer, head) is key/value head
  head // (n_heads // n_kv_heads) (every query head of that group reads the patched key/value).
  Senders at or above the earliest receiver's layer cannot reach it: NaN.

How it is computed (what `core.patching` does for activation patching; none of it changes a
number beyond float rounding, and the tests hold every sweep to one TransformerLens
`run_with_hooks` per sender, ARENA's way, within 1e-4):

1. **Batching.** Each sender is a copy of the clean run; copies are stacked along the batch
   (row = copy * n_prompts + prompt) and run through TransformerLens's own blocks
   (`model.blocks[layer]`, with their hooks), one block at a time.
2. **Start where the sender is.** Below its layer a copy is the clean run (every head there is
   frozen at clean), so it joins the batch at its sender's layer from the clean run's cached
   `resid_pre`. Step 1 stops after the last receiver layer; step 2's copies join at the first
   receiver layer.
3. **Only what can change.** With causal attention, a copy whose sender's corrupted z first
   differs from the clean z at position p equals the clean run before p: it recomputes p..
   only, reading earlier keys and values from the clean cache (`core.patching.reuses_prefix`
   says when that holds; left padding, ALiBi and the rest run from position 0 with the padding
   mask TransformerLens's forward pass builds). A sender whose z is the same in both runs gives
   the clean metric without a pass. The final norm and unembedding run at the last position
   only (`core.attribution.final_logits`).

Freezing: in each block a hook on `hook_z` writes the clean z into every head of every copy,
then the corrupted z into the sender's head of the sender's copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from transformer_lens import ActivationCache, HookedTransformer, utils

from core.attribution import final_logits
from core.patching import DEFAULT_MAX_TOKENS, MAX_LOGITS, chunk_tokens, padding_mask, prefix_entry, reuses_prefix
from core.store import locked

if TYPE_CHECKING:
    from core.tasks import Normaliser, Task

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, d_vocab] -> 0-d tensor
Progress = Callable[[float], None]  # share of the sweep done, 0..1
Cache = ActivationCache | Mapping[str, torch.Tensor]
INPUTS = ("q", "k", "v")


class PathPatchingError(ValueError):
    """Path patching cannot run as asked; the message is meant for the person who asked."""


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_model(model: HookedTransformer) -> None:
    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False):
        raise PathPatchingError("Path patching does not support parallel attention and MLP blocks "
                                "(GPT-J / NeoX style): the MLP reads resid_pre, not the heads' output.")
    if getattr(cfg, "num_experts", None):
        raise PathPatchingError("Path patching does not support mixture-of-experts MLPs.")
    if cfg.positional_embedding_type == "relative_positional_bias":
        raise PathPatchingError("Path patching does not support relative positional bias (T5-style) models.")


def _kv_heads(cfg) -> int:
    """Heads on the key/value hooks' head axis (key/value heads of a grouped-query model)."""
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if not n_kv or getattr(cfg, "ungroup_grouped_query_attention", False):
        return cfg.n_heads
    return n_kv


def _as_receivers(receivers) -> list[tuple[int, int]]:
    """A list of (layer, head) pairs (a single pair is accepted too), deduplicated and sorted."""
    if receivers is None:
        raise PathPatchingError("Path patching to heads needs receivers: a list of (layer, head) pairs.")
    items = list(receivers)
    if len(items) == 2 and all(isinstance(x, int) for x in items):  # one pair, (layer, head)
        items = [tuple(items)]
    out = set()
    for r in items:
        try:
            layer, head = r
            out.add((int(layer), int(head)))
        except (TypeError, ValueError):
            raise PathPatchingError(f"Each receiver is a (layer, head) pair; got {r!r}.") from None
    if not out:
        raise PathPatchingError("Path patching to heads needs at least one receiver (layer, head).")
    return sorted(out)


def _check_receivers(model: HookedTransformer, receivers, input: str) -> tuple[list[tuple[int, int]], dict[int, list[int]]]:
    """(receivers as sorted pairs, {layer: heads on the input hook's head axis})."""
    if input not in INPUTS:
        raise PathPatchingError(f"Unknown receiver input {input!r}: 'q', 'k' or 'v' (or 'logits' for the direct path).")
    pairs = _as_receivers(receivers)
    cfg = model.cfg
    group = cfg.n_heads // _kv_heads(cfg) if input in ("k", "v") else 1
    by_layer: dict[int, set[int]] = {}
    for layer, head in pairs:
        if not 0 <= layer < cfg.n_layers:
            raise PathPatchingError(f"Receiver L{layer}H{head}: layer {layer} is outside the model's {cfg.n_layers} layers.")
        if not 0 <= head < cfg.n_heads:
            raise PathPatchingError(f"Receiver L{layer}H{head}: head {head} is outside the layer's {cfg.n_heads} heads.")
        if layer == 0:
            raise PathPatchingError(f"Receiver L{layer}H{head} is in layer 0: no head is before it to send to its {input}.")
        by_layer.setdefault(layer, set()).add(head // group)
    return pairs, {layer: sorted(heads) for layer, heads in sorted(by_layer.items())}


def _check_tokens(clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    clean = clean_tokens if clean_tokens.ndim == 2 else clean_tokens.unsqueeze(0)
    corrupted = corrupted_tokens if corrupted_tokens.ndim == 2 else corrupted_tokens.unsqueeze(0)
    if clean.ndim != 2 or clean.shape != corrupted.shape:
        raise PathPatchingError(f"Clean and corrupted tokens must both be [batch, pos] of one shape; got "
                                f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}.")
    return clean, corrupted


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


def _needed_clean(model: HookedTransformer) -> Callable[[str], bool]:
    last = utils.get_act_name("resid_post", model.cfg.n_layers - 1)
    return lambda name: name == last or name.endswith(("hook_resid_pre", "hook_z", "hook_k", "hook_v"))


def _caches(model, clean_tokens, corrupted_tokens, clean_cache, corrupted_cache) -> tuple[Cache, Cache]:
    """The two runs' activations: those given, else a forward pass for each (only what is read)."""
    from core import store

    if clean_cache is None:
        clean_cache = store.run_with_cache(model, clean_tokens, names_filter=_needed_clean(model))[1]
    if corrupted_cache is None:
        corrupted_cache = store.run_with_cache(model, corrupted_tokens,
                                               names_filter=lambda name: name.endswith("hook_z"))[1]
    z0 = utils.get_act_name("z", 0)
    for what, cache in (("clean", clean_cache), ("corrupted", corrupted_cache)):
        if tuple(cache[z0].shape[:2]) != tuple(clean_tokens.shape):
            raise PathPatchingError(f"The {what} cache is of a run on {tuple(cache[z0].shape[:2])} tokens, "
                                    f"the prompts are {tuple(clean_tokens.shape)}.")
    return clean_cache, corrupted_cache


def _first_change(clean_cache: Cache, corrupted_cache: Cache, layer: int, head: int) -> int | None:
    """First position where the sender's corrupted z differs from its clean z (any prompt), or None."""
    name = utils.get_act_name("z", layer)
    differs = (clean_cache[name][:, :, head] != corrupted_cache[name][:, :, head]).any(-1).any(0)
    hits = differs.nonzero()
    return int(hits[0]) if len(hits) else None


def _run_blocks(model, tokens, clean_cache, start: int, n_prompts: int, mask, joins: dict[int, int], end: int,
                layer_hooks: Callable[[int, int], list]) -> torch.Tensor:
    """Residual stream [copies * n_prompts, positions start.., d_model] after block `end - 1`.

    joins: layer -> number of copies that join there from the clean run's resid_pre (appended
    after the rows already running); layer_hooks(layer, copies) -> the hooks of that block.
    Blocks run as `core.patching._run_chunk` runs them (keys and values before `start` from the
    clean cache, shortformer positions, the padding mask).
    """
    shortformer = None
    if model.cfg.positional_embedding_type == "shortformer":  # added to queries and keys in every block
        shortformer = model.pos_embed(tokens[:, start:], start, mask)
    resid = None
    for layer in range(min(joins), end):
        n = joins.get(layer, 0)
        if n:
            x = clean_cache[utils.get_act_name("resid_pre", layer)][:, start:].repeat(n, 1, 1)
            resid = x if resid is None else torch.cat([resid, x])
        copies = resid.shape[0] // n_prompts
        entry = prefix_entry(clean_cache, layer, start, copies)
        pos = None if shortformer is None else shortformer.repeat(copies, 1, 1)
        copy_mask = None if mask is None else mask.repeat(copies, 1)
        with model.hooks(fwd_hooks=layer_hooks(layer, copies), reset_hooks_end=True):
            resid = model.blocks[layer](resid, shortformer_pos_embed=pos, past_kv_cache_entry=entry,
                                        attention_mask=copy_mask)
    return resid


def _freeze_hook(clean_z: torch.Tensor, corrupted_z: torch.Tensor, senders: list[tuple[int, int]], n_prompts: int,
                 copies: int):
    """hook_z: clean z into every head of every copy, corrupted z into each (copy, sender head)."""
    def hook(z, hook):
        z.unflatten(0, (copies, n_prompts)).copy_(clean_z)
        for copy, head in senders:
            z[copy * n_prompts : (copy + 1) * n_prompts, :, head] = corrupted_z[:, :, head]
        return z
    return hook


def _metrics(model, resid: torch.Tensor, n_prompts: int, metric: Metric) -> list[torch.Tensor]:
    """The metric of each copy, from the copies' final residual stream (last position)."""
    resid = resid[:, -1:]
    copies = resid.shape[0] // n_prompts
    per = max(1, MAX_LOGITS // (n_prompts * model.cfg.d_vocab))
    out = []
    for c0 in range(0, copies, per):
        c1 = min(copies, c0 + per)
        logits = final_logits(model, resid[c0 * n_prompts : c1 * n_prompts])
        for c in range(c1 - c0):
            out.append(_scalar(metric(logits[c * n_prompts : (c + 1) * n_prompts])))
    return out


def _scalar(value) -> torch.Tensor:
    value = torch.as_tensor(value).detach()
    if value.numel() != 1:
        raise PathPatchingError(f"The metric must return one number (a 0-d tensor); it returned shape {tuple(value.shape)}.")
    return value.reshape(()).float().cpu()


def _sweep(model: HookedTransformer, clean_tokens, corrupted_tokens, metric: Metric, clean_cache, corrupted_cache,
           receivers: dict[int, list[int]] | None, input: str, progress: Progress | None, max_tokens: int | None) -> torch.Tensor:
    """[n_layers, n_heads]: every sender's path-patched metric (to logits when `receivers` is None)."""
    _check_model(model)
    cfg = model.cfg
    clean_tokens, corrupted_tokens = _check_tokens(clean_tokens, corrupted_tokens)
    clean_tokens = clean_tokens.to(cfg.device)
    corrupted_tokens = corrupted_tokens.to(cfg.device)
    clean_cache, corrupted_cache = _caches(model, clean_tokens, corrupted_tokens, clean_cache, corrupted_cache)
    n_prompts, n_pos = clean_tokens.shape
    with locked(model):  # the tokenizer's padding side and cfg flags, read once and together
        prefix = reuses_prefix(model)
        mask = padding_mask(model, clean_tokens)

    first_receiver = min(receivers) if receivers else cfg.n_layers
    last_receiver = max(receivers) if receivers else None
    out = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
    # Senders grouped by the first position they change (0 for every one where prefixes are not reused).
    groups: dict[int, list[tuple[int, int]]] = {}
    unchanged = []
    for layer in range(first_receiver):
        for head in range(cfg.n_heads):
            first = _first_change(clean_cache, corrupted_cache, layer, head)
            if first is None:
                unchanged.append((layer, head))
            else:
                groups.setdefault(first if prefix else 0, []).append((layer, head))
    per = max(1, (max_tokens or chunk_tokens(model, n_pos)) // (n_prompts * n_pos))
    chunks = [(start, senders[i : i + per]) for start, senders in sorted(groups.items())
              for i in range(0, len(senders), per)]  # senders in (layer, head) order within a chunk
    work = [len(senders) * (n_pos - start) for start, senders in chunks]
    done = 0

    # The model's lock is taken per chunk of senders, not per sweep, so other sessions' forward
    # passes run between two chunks; `locked` clears hooks on entry and exit of each.
    with torch.inference_mode():
        if unchanged:  # the corrupted z is the clean z: the run is the clean run
            resid = clean_cache[utils.get_act_name("resid_post", cfg.n_layers - 1)]
            with locked(model):
                value = _metrics(model, resid, n_prompts, metric)[0]
            for layer, head in unchanged:
                out[layer, head] = value
        for (start, senders), w in zip(chunks, work):
            joins: dict[int, int] = {}
            for layer, _ in senders:
                joins[layer] = joins.get(layer, 0) + 1
            recorded: dict[int, torch.Tensor] = {}

            def step1_hooks(layer, copies, start=start, senders=senders, recorded=recorded):
                name = utils.get_act_name("z", layer)
                mine = [(copy, head) for copy, (l, head) in enumerate(senders) if l == layer]
                hooks = [(name, _freeze_hook(clean_cache[name][:, start:], corrupted_cache[name][:, start:], mine,
                                             n_prompts, copies))]
                if receivers and layer in receivers:
                    heads = receivers[layer]

                    def record(act, hook, layer=layer, heads=heads):
                        recorded[layer] = act[:, :, heads]  # a copy (list index)
                        return act

                    hooks.append((utils.get_act_name(input, layer), record))
                return hooks

            def step2_hooks(layer, copies, recorded=recorded):
                if layer not in receivers:
                    return []
                heads = receivers[layer]

                def patch(act, hook, layer=layer, heads=heads):
                    act[:, :, heads] = recorded[layer]
                    return act

                return [(utils.get_act_name(input, layer), patch)]

            end = cfg.n_layers if receivers is None else last_receiver + 1
            with locked(model):
                resid = _run_blocks(model, clean_tokens, clean_cache, start, n_prompts, mask, joins, end, step1_hooks)
                if receivers is not None:
                    resid = _run_blocks(model, clean_tokens, clean_cache, start, n_prompts, mask,
                                        {first_receiver: len(senders)}, cfg.n_layers, step2_hooks)
                values = _metrics(model, resid, n_prompts, metric)
            for (layer, head), value in zip(senders, values):
                out[layer, head] = value
            done += w
            if progress is not None:
                progress(done / sum(work))
    if progress is not None and not chunks:
        progress(1.0)
    return out


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


def path_patch_to_logits(
    model: HookedTransformer,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor,
    metric: Metric,
    clean_cache: Cache | None = None,
    corrupted_cache: Cache | None = None,
    progress: Progress | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> torch.Tensor:
    """[n_layers, n_heads]: the metric of the clean run with each sender head's z from the
    corrupted run and every other head frozen at clean (MLPs recompute): its path to the logits.

    tokens: [batch, pos] (clean and corrupted of one shape); caches: the two runs' activations
    (full `run_with_cache` caches; computed when None); metric(logits [batch, 1, d_vocab]) -> 0-d
    tensor: only the last position's logits are computed, all a task metric reads.
    max_tokens: rows x positions per forward pass (default `patching.chunk_tokens`: from the free memory).
    """
    return _sweep(model, clean_tokens, corrupted_tokens, metric, clean_cache, corrupted_cache, None, "logits",
                  progress, max_tokens)


def path_patch_to_heads(
    model: HookedTransformer,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor,
    metric: Metric,
    receivers: list[tuple[int, int]],
    input: str,
    clean_cache: Cache | None = None,
    corrupted_cache: Cache | None = None,
    progress: Progress | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> torch.Tensor:
    """[n_layers, n_heads]: the metric of the clean run with only the receivers' `input` ("q", "k"
    or "v") set to what it is when each sender head's z comes from the corrupted run and every
    other head is frozen at clean (MLPs recompute). NaN for senders at or above the earliest
    receiver's layer. Arguments as `path_patch_to_logits`; receivers: (layer, head) pairs (for k
    and v of a grouped-query model, the key/value head of that query head is patched).
    """
    _, by_layer = _check_receivers(model, receivers, input)
    return _sweep(model, clean_tokens, corrupted_tokens, metric, clean_cache, corrupted_cache, by_layer, input,
                  progress, max_tokens)


@dataclass(frozen=True)
class PathPatchingResult:
    """One path-patching sweep on a task, with everything needed to show it.

    values: [n_layers, n_heads], normalised (1 = the clean run's metric, 0 = the corrupted run's)
      where the task's `normaliser` says that is meaningful, else the change in the raw metric
      from the clean run; NaN for senders that cannot reach the receivers.
    raw: the metric of each path-patched run. receivers: the (layer, head) pairs (empty for the
      path to the logits); input: "q", "k", "v" or "logits".
    """

    values: torch.Tensor
    raw: torch.Tensor
    normaliser: "Normaliser"
    receivers: tuple[tuple[int, int], ...]
    input: str
    labels: tuple[tuple[str, ...], ...]
    title: str
    metric_label: str

    dims = ("layer", "head")

    @property
    def normalised(self) -> bool:
        return self.normaliser.meaningful

    @property
    def baseline(self) -> float:
        """The value of an unchanged (clean) run on the shown scale."""
        return 1.0 if self.normalised else 0.0

    @property
    def effect(self) -> torch.Tensor:
        """values - baseline: how far each path moves the metric from the clean run (negative: the
        path carries the behaviour; -effect is how much of it flows through that path)."""
        return self.values - self.baseline

    @property
    def value_label(self) -> str:
        return "normalised metric" if self.normalised else f"Δ {self.metric_label}"


def _title(receivers: Sequence[tuple[int, int]], input: str) -> str:
    if input == "logits":
        return "Path patching: each head → logits"
    return "Path patching: each head → " + ", ".join(f"L{l}H{h}.{input}" for l, h in receivers)


def path_patch_task(
    model: HookedTransformer,
    task: "Task",
    receivers: list[tuple[int, int]] | None = None,
    input: str = "logits",
    activation_store=None,
    progress: Progress | None = None,
) -> PathPatchingResult:
    """Path patching on a task, labelled (the notebook API): every head's path to the logits
    (`input="logits"`, no receivers) or to the receivers' q, k or v. Noising: the clean prompts,
    each sender from the corrupted run. The runs come from `activation_store` (a new one if None).
    """
    from core import store as store_module
    from core.tasks import normaliser

    if input == "logits":
        if receivers:
            raise PathPatchingError("The path to the logits has no receivers; pass input='q', 'k' or 'v' "
                                    "to patch into the receivers' inputs.")
        pairs: list[tuple[int, int]] = []
    elif input in INPUTS:
        pairs, _ = _check_receivers(model, receivers, input)
    else:
        raise PathPatchingError(f"Unknown input {input!r}: 'logits', 'q', 'k' or 'v'.")
    _check_model(model)
    activation_store = activation_store or store_module.ActivationStore()
    clean = activation_store.get(model, task.clean_tokens)
    corrupted = activation_store.get(model, task.corrupted_tokens)
    norm = normaliser(task, clean.logits, corrupted.logits)
    if input == "logits":
        raw = path_patch_to_logits(model, clean.tokens, corrupted.tokens, task.metric, clean.cache, corrupted.cache,
                                   progress=progress)
    else:
        raw = path_patch_to_heads(model, clean.tokens, corrupted.tokens, task.metric, pairs, input, clean.cache,
                                  corrupted.cache, progress=progress)
    values = norm(raw) if norm.meaningful else raw - norm.clean
    labels = (tuple(f"L{l}" for l in range(model.cfg.n_layers)), tuple(f"H{h}" for h in range(model.cfg.n_heads)))
    return PathPatchingResult(values, raw, norm, tuple(pairs), input, labels, _title(pairs, input), task.metric_label)
