"""Circuits: edges between components, their attribution, exact patching, discovery and evaluation.

The graph (Elhage et al. 2021; as ACDC, EAP and auto-circuit use it). The residual stream read by
any component is the sum of what every earlier component wrote, plus constant biases. So each
*upstream node* (the embeddings, every attention head, every MLP) writes an output into the
stream, and each *downstream node* (every head's query, key and value input, every MLP's input,
the logits) reads the sum of the outputs of the upstream nodes before it. An edge U → D is one
term of that sum. Patching an edge replaces U's term in D's input, and in D's input only, by its
value on another input (the corrupted prompt, or a mean):

    input_D = Σ_U  keep[U, D] · out_U(this run)  +  (1 − keep[U, D]) · out_U(ablation)  + biases

Upstream outputs: the embedding node is token + learned position embeddings (on the residual
stream; shortformer adds positions to queries and keys only, after the LayerNorm, and is not a
node), a head's is `z @ W_O` (TL's `hook_result`, without `b_O`), an MLP's its `hook_mlp_out`.
Downstream inputs are TL's split q/k/v inputs (`hook_q_input`, one per query head; one per
key/value head on grouped-query models), the MLP's input and the final residual stream, all
*before* their LayerNorm. Everything is tensorised: scores are [n_up, n_down] matrices with NaN
where no edge exists, masks are boolean [n_up, n_down] (or [copies, n_up, n_down]) tensors.

Every number is "noising": the base run is the clean prompts and patched values come from the
ablation (by default each prompt's own corrupted counterpart, i.e. resample ablation).

- `edge_attribution` — EAP (Syed et al. 2023): (clean_U − corrupted_U) · ∂metric/∂input_D on the
  clean run, every edge from one forward and one backward pass; EAP-IG (Hanna et al. 2024): the
  gradient averaged over k inputs interpolated between the corrupted and clean embeddings.
- `edge_patching` — exact: the metric with one edge patched, batched (copies start at the
  receiver's layer from the clean cache; edges into the logits need no block at all).
- `discover` / `acdc` — circuits: the top-N edges pruned to paths from the input to the logits,
  or ACDC's greedy removal with threshold τ; `evaluate` runs the model with every edge outside
  a circuit ablated (edge-level, batched over circuits); `faithfulness_curve`, `completeness`,
  `minimality` (Wang et al. 2022).

Scores are "share of the clean − corrupted gap the edge carries": (M_clean − M_patched) / gap,
where the task's Normaliser is meaningful, else the raw M_clean − M_patched. Positive = the edge
supports the clean behaviour.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Literal

import torch
from transformer_lens import ActivationCache, HookedTransformer, utils

from core.attribution import final_logits
from core.patching import chunk_tokens, prefix_entry, reuses_prefix
from core.store import locked

if TYPE_CHECKING:
    from core.tasks import Normaliser, Task

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, d_vocab] -> 0-d tensor
Progress = Callable[[float], None]
Ablation = Literal["resample", "mean"]
ScoreMethod = Literal["eap", "eap-ig", "exact"]
MAX_ELEMENTS = 2**26  # floats held at once by the batched runs' per-node tensors (256 MiB)


class CircuitError(ValueError):
    """A circuit question this model, task or setting cannot answer, with the reason."""


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------


def check_model(model: HookedTransformer) -> None:
    """Raise CircuitError for a model whose components do not add into one residual stream."""
    cfg = model.cfg
    if cfg.parallel_attn_mlp:
        raise CircuitError("This model runs attention and the MLP in parallel from the same residual stream "
                           "(GPT-J / NeoX style): the circuit graph here assumes the MLP reads the attention "
                           "layer's output, so it cannot describe this model.")
    if getattr(cfg, "num_experts", None):
        raise CircuitError("This model has mixture-of-experts MLPs: the circuit graph treats each MLP as one node "
                           "with one input, which a router that picks experts per token does not fit.")
    if cfg.use_normalization_before_and_after or getattr(cfg, "original_architecture", None) in _post_norm():
        raise CircuitError("This model normalises each layer's output before adding it to the residual stream, "
                           "so a head's output is not a separate term of the stream and its edges are not defined.")


def _post_norm() -> tuple:
    try:
        from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES
        return tuple(POST_NORM_ARCHITECTURES)
    except ImportError:  # pragma: no cover - older TL
        return ()


@dataclass(frozen=True)
class Graph:
    """The nodes of a model's circuit graph, in computation order.

    upstream: "embed", then per layer its heads "L0H0".. and its MLP "L0 MLP".
    downstream: per layer the heads' query inputs "L0H0.q".., key inputs "L0H0.k" (or "L0KV0.k" on
      grouped-query models), value inputs, then "L0 MLP"; last "logits".
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    has_mlp: bool
    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    up_stage: torch.Tensor  # [n_up] where a node writes (0 embed, 2L+1 heads, 2L+2 MLP)
    down_stage: torch.Tensor  # [n_down] where a node reads (2L+1 q/k/v, 2L+2 MLP, 2n+1 logits)
    valid: torch.Tensor  # [n_up, n_down] bool: an edge exists

    @property
    def n_up(self) -> int:
        return len(self.upstream)

    @property
    def n_down(self) -> int:
        return len(self.downstream)

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def up_index(self, name: str) -> int:
        try:
            return self.upstream.index(name)
        except ValueError:
            raise CircuitError(f"No upstream node {name!r} in this model's graph.") from None

    def down_index(self, name: str) -> int:
        try:
            return self.downstream.index(name)
        except ValueError:
            raise CircuitError(f"No downstream node {name!r} in this model's graph.") from None

    def edge_name(self, up: int, down: int) -> str:
        return f"{self.upstream[up]} → {self.downstream[down]}"

    def n_up_before(self, stage: int) -> int:
        """How many upstream nodes write before `stage` (they are a prefix of `upstream`)."""
        return int((self.up_stage < stage).sum())

    def down_slice(self, stage: int) -> slice:
        idx = (self.down_stage == stage).nonzero().flatten()
        return slice(int(idx[0]), int(idx[-1]) + 1)

    @functools.cached_property
    def owners(self) -> tuple[list, dict]:
        """See `_owners`."""
        owner: list = []
        inputs: dict[int, list[int]] = {}
        for dn, name in enumerate(self.downstream):
            if name == "logits":
                owner.append(None)
                continue
            if name.endswith(" MLP"):
                ups = [self.up_index(name)]
            else:
                node = name.split(".")[0]
                layer, rest = node[1:].split("KV") if "KV" in node else node[1:].split("H")
                layer, h = int(layer), int(rest)
                if "KV" in node:  # a key/value head feeds the query heads of its group
                    group = self.n_heads // self.n_kv_heads
                    ups = [self.up_index(f"L{layer}H{q}") for q in range(h * group, (h + 1) * group)]
                else:
                    ups = [self.up_index(f"L{layer}H{h}")]
            owner.append(ups[0] if len(ups) == 1 else ups)
            for u in ups:
                inputs.setdefault(u, []).append(dn)
        return owner, inputs

    def head_of_up(self, up: int) -> tuple[int, int] | None:
        name = self.upstream[up]
        if name == "embed" or name.endswith("MLP"):
            return None
        layer, head = name[1:].split("H")
        return int(layer), int(head)


def build_graph(model: HookedTransformer) -> Graph:
    check_model(model)
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads if cfg.n_key_value_heads is not None and not cfg.ungroup_grouped_query_attention \
        else cfg.n_heads
    has_mlp = not cfg.attn_only
    up, up_stage, down, down_stage = ["embed"], [0], [], []
    kv = "KV" if n_kv != cfg.n_heads else "H"
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            up.append(f"L{layer}H{h}")
            up_stage.append(2 * layer + 1)
        if has_mlp:
            up.append(f"L{layer} MLP")
            up_stage.append(2 * layer + 2)
        down += [f"L{layer}H{h}.q" for h in range(cfg.n_heads)]
        down += [f"L{layer}{kv}{h}.k" for h in range(n_kv)]
        down += [f"L{layer}{kv}{h}.v" for h in range(n_kv)]
        down_stage += [2 * layer + 1] * (cfg.n_heads + 2 * n_kv)
        if has_mlp:
            down.append(f"L{layer} MLP")
            down_stage.append(2 * layer + 2)
    down.append("logits")
    down_stage.append(2 * cfg.n_layers + 1)
    us, ds = torch.tensor(up_stage), torch.tensor(down_stage)
    return Graph(cfg.n_layers, cfg.n_heads, n_kv, has_mlp, tuple(up), tuple(down), us, ds, us[:, None] < ds[None, :])


# ---------------------------------------------------------------------------------------------
# Node outputs and the forward pass with edges patched
# ---------------------------------------------------------------------------------------------


def head_results(model: HookedTransformer, layer: int, z: torch.Tensor) -> torch.Tensor:
    """[batch, pos, n_heads, d_model] each head's output z @ W_O (TL's hook_result, without b_O)."""
    return torch.einsum("bphd,hdm->bphm", z, model.blocks[layer].attn.W_O)


@torch.no_grad()
def node_outputs(model: HookedTransformer, graph: Graph, cache: ActivationCache) -> torch.Tensor:
    """[batch, pos, n_up, d_model] every upstream node's output from a TL activation cache."""
    embed = _embed_output(model, cache)
    parts = [embed[:, :, None]]
    for layer in range(graph.n_layers):
        parts.append(head_results(model, layer, cache[utils.get_act_name("z", layer)]))
        if graph.has_mlp:
            parts.append(cache[utils.get_act_name("mlp_out", layer)][:, :, None])
    return torch.cat(parts, 2)


def _embed_output(model: HookedTransformer, cache: ActivationCache) -> torch.Tensor:
    """What the embeddings write into the residual stream: resid_pre of layer 0."""
    return cache[utils.get_act_name("resid_pre", 0)]


@dataclass
class _Inputs:
    """The first residual stream of a batch and what every block needs besides it."""

    resid: torch.Tensor  # [rows, pos, d_model]
    shortformer: torch.Tensor | None
    mask: torch.Tensor | None

    def repeat(self, copies: int) -> "_Inputs":
        return _Inputs(_rep(self.resid, copies), _rep(self.shortformer, copies), _rep(self.mask, copies))

    def repeat_extras(self, copies: int) -> "_Inputs":
        """The same residual stream with the positions and padding mask repeated for `copies` copies."""
        return _Inputs(self.resid, _rep(self.shortformer, copies), _rep(self.mask, copies))


def _rep(t: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    return None if t is None else t.repeat(copies, *([1] * (t.dim() - 1)))


def _embed(model: HookedTransformer, tokens: torch.Tensor) -> _Inputs:
    """Call under the model's lock (it reads the tokenizer's padding side)."""
    resid, _, shortformer, mask = model.input_to_embed(tokens.to(model.cfg.device))
    return _Inputs(resid, shortformer, mask)


def _attention(model: HookedTransformer, layer: int, q_in, k_in, v_in, inputs: _Inputs,
               captured: dict, entry=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn_out [rows, pos, d_model], head results [rows, pos, n_heads, d_model]) of one layer
    from split q/k/v inputs [rows, pos, heads, d_model] (before the LayerNorm)."""
    block = model.blocks[layer]
    sf = 0.0 if inputs.shortformer is None else inputs.shortformer[:, :, None]
    out = block.attn(query_input=block.ln1(q_in) + sf, key_input=block.ln1(k_in) + sf,
                     value_input=block.ln1(v_in), past_kv_cache_entry=entry, attention_mask=inputs.mask)
    return out, head_results(model, layer, captured.pop(layer))


def _mlp(model: HookedTransformer, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
    block = model.blocks[layer]
    return block.apply_mlp(block.ln2(mlp_in))


class _CaptureZ:
    """A hook on every attention layer's hook_z that keeps the value for `_attention`."""

    def __init__(self):
        self.values: dict[int, torch.Tensor] = {}

    def __call__(self, z, hook):
        self.values[int(hook.name.split(".")[1])] = z
        return z

    def hooks(self):
        return [(lambda name: name.endswith("attn.hook_z"), self)]


def _forward(model: HookedTransformer, graph: Graph, inputs: _Inputs, copies: int,
             ablated: torch.Tensor | None = None, patch: torch.Tensor | None = None,
             receivers: list | None = None, start: int = 0, cache: ActivationCache | None = None) -> torch.Tensor:
    """Final residual stream at the last position [rows, d_model] of `copies` copies of a batch.

    inputs: the first residual stream, rows = copies x prompts (copy-major).
    ablated: [copies, n_up, n_down] float, 1 where an edge takes its value from `patch`
      ([prompts, pos, n_up, d_model]) instead of from this run; None = no edge patched.
    receivers: when a list, every downstream input tensor is appended to it (for gradients), in
      `graph.downstream` order, each [rows, pos, k, d_model].
    start, cache: positions before `start` are the clean run's in every copy (`Runs.start`): the
      copies compute positions start.. only and read earlier keys and values from the clean `cache`.
    Call inside `_Session(model)`.
    """
    capture = _active_capture(model)
    resid = inputs.resid[:, start:]
    rows, n_pos, d = resid.shape
    prompts = rows // copies
    cfg = model.cfg
    attn_inputs = _Inputs(resid, None if inputs.shortformer is None else inputs.shortformer[:, start:], inputs.mask)
    diffs = None  # [copies, prompts, pos, n_up, d]: this run's output minus the patch, node by node
    if ablated is not None:
        patch = patch[:, start:]
        diffs = resid.new_zeros(copies, prompts, n_pos, graph.n_up, d)
    written = 0

    def write(out: torch.Tensor) -> None:  # out: [rows, pos, k, d], the next k upstream nodes
        nonlocal written
        k = out.shape[2]
        if diffs is not None:
            diffs[:, :, :, written:written + k] = (out.reshape(copies, prompts, n_pos, k, d)
                                                   - patch[None, :, :, written:written + k])
        written += k

    def minus_patched(x: torch.Tensor, stage: int) -> torch.Tensor:
        """x [rows, pos, k, d] (k receivers at `stage`) minus the patched edges' differences."""
        if ablated is None:
            return x
        n = graph.n_up_before(stage)
        a = ablated[:, :n, graph.down_slice(stage)]
        if not bool(a.any()):
            return x
        delta = torch.einsum("cpsnd,cnk->cpskd", diffs[:, :, :, :n], a)
        return x - delta.reshape(rows, n_pos, -1, d)

    write(resid[:, :, None])
    for layer in range(cfg.n_layers):
        stage = 2 * layer + 1
        k_q, k_kv = cfg.n_heads, graph.n_kv_heads
        x = resid[:, :, None].expand(rows, n_pos, k_q + 2 * k_kv, d)
        x = minus_patched(x, stage)
        if receivers is not None:
            x = x.clone()
            receivers.append(x)
        entry = prefix_entry(cache, layer, start, copies)
        q_in, k_in, v_in = x[:, :, :k_q], x[:, :, k_q:k_q + k_kv], x[:, :, k_q + k_kv:]
        attn_out, results = _attention(model, layer, q_in, k_in, v_in, attn_inputs, capture.values, entry)
        write(results)
        resid = resid + attn_out
        if graph.has_mlp:
            m = minus_patched(resid[:, :, None], stage + 1)
            if receivers is not None:
                m = m.clone()
                receivers.append(m)
            mlp_out = _mlp(model, layer, m[:, :, 0])
            write(mlp_out[:, :, None])
            resid = resid + mlp_out
    final = minus_patched(resid[:, :, None], 2 * cfg.n_layers + 1)
    if receivers is not None:
        final = final.clone()
        receivers.append(final)
    return final[:, -1, 0]


_CAPTURES: dict[int, _CaptureZ] = {}


def _active_capture(model: HookedTransformer) -> _CaptureZ:
    return _CAPTURES[id(model)]


class _Session:
    """The model locked with split q/k/v inputs and the z-capturing hook installed. Sweeps take one
    per batch chunk (hooks cleared and the split switch set again each time), never one per sweep."""

    def __init__(self, model: HookedTransformer):
        self.model = model

    def __enter__(self):
        self._locked = locked(self.model, use_split_qkv_input=True)
        self._locked.__enter__()
        try:
            capture = _CaptureZ()
            _CAPTURES[id(self.model)] = capture
            for name, hook in capture.hooks():
                self.model.add_hook(name, hook)
        except BaseException:  # release the lock (and clear the hooks) before passing the error on
            self.__exit__(None, None, None)
            raise
        return self.model

    def __exit__(self, *exc):
        _CAPTURES.pop(id(self.model), None)
        return self._locked.__exit__(*exc)


def _metric_per_copy(model, final: torch.Tensor, copies: int, metric: Metric) -> torch.Tensor:
    """[copies] the metric of each copy from final residual streams [copies * prompts, d_model]."""
    logits = final_logits(model, final[:, None])
    prompts = final.shape[0] // copies
    return torch.stack([metric(logits[c * prompts:(c + 1) * prompts]) for c in range(copies)]).float().detach()


def _chunk_copies(graph: Graph, prompts: int, n_pos: int, d_model: int) -> int:
    per_copy = prompts * n_pos * (graph.n_up + graph.n_kv_heads * 2 + graph.n_heads) * d_model
    return max(1, MAX_ELEMENTS // max(per_copy, 1))


# ---------------------------------------------------------------------------------------------
# Runs a task needs: clean and corrupted caches, ablation values
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runs:
    """The clean run and the ablation values of a task, in the graph's terms."""

    graph: Graph
    clean_tokens: torch.Tensor
    clean_cache: ActivationCache
    clean_outputs: torch.Tensor  # [prompts, pos, n_up, d_model]
    patch: torch.Tensor  # [prompts, pos, n_up, d_model] the values an ablated edge carries
    corrupted_tokens: torch.Tensor
    normaliser: "Normaliser"
    metric: Metric
    ablation: Ablation
    metric_label: str = "metric"

    @functools.cached_property
    def start(self) -> int:
        """First position where an ablated value differs from the clean one: every position before
        it is the same in every patched run (callers use 0 for a left-padded batch)."""
        if self.clean_tokens.shape[1] == 0:
            return 0
        differs = (self.patch != self.clean_outputs).flatten(2).any(-1).any(0)
        hits = differs.nonzero()
        return int(hits[0]) if len(hits) else 0

    @property
    def clean(self) -> float:
        return self.normaliser.clean

    @property
    def corrupted(self) -> float:
        return self.normaliser.corrupted


def task_runs(model: HookedTransformer, task: "Task", ablation: Ablation = "resample",
              activation_store=None) -> Runs:
    """The clean and corrupted runs of `task` (from `activation_store`) as a circuit analysis uses them.

    ablation "resample": an ablated edge carries its upstream node's value on the prompt's own
    corrupted counterpart; "mean": its mean over the task's corrupted prompts (per position).
    """
    from core import store as store_module
    from core.tasks import normaliser

    if ablation not in ("resample", "mean"):
        raise CircuitError(f"Unknown ablation {ablation!r}: 'resample' or 'mean'.")
    if task.corrupted_tokens is None or task.corrupted_tokens.shape != task.clean_tokens.shape:
        raise CircuitError("This task has no corrupted prompt for each clean one, so no edge can be patched: "
                           "a circuit needs a corrupted run (for induction, the repeated half replaced by "
                           "random tokens).")
    graph = build_graph(model)
    activation_store = activation_store or store_module.ActivationStore()
    clean = activation_store.get(model, task.clean_tokens)
    corrupted = activation_store.get(model, task.corrupted_tokens)
    clean_out = node_outputs(model, graph, clean.cache)
    corr_out = node_outputs(model, graph, corrupted.cache)
    patch = corr_out if ablation == "resample" else corr_out.mean(0, keepdim=True).expand_as(corr_out).contiguous()
    norm = normaliser(task, clean.logits, corrupted.logits)
    return Runs(graph, clean.tokens, clean.cache, clean_out, patch, corrupted.tokens, norm, task.metric, ablation,
                task.metric_label)


def runs_from_tokens(model: HookedTransformer, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor,
                     metric: Metric, ablation: Ablation = "resample") -> Runs:
    """`task_runs` for a bare pair of token batches and a metric (notebooks, tests, benchmarks)."""
    from core import store as store_module
    from core.tasks import Normaliser

    graph = build_graph(model)
    clean_logits, clean_cache = store_module.run_with_cache(model, clean_tokens)
    corr_logits, corr_cache = store_module.run_with_cache(model, corrupted_tokens)
    clean_out = node_outputs(model, graph, clean_cache)
    corr_out = node_outputs(model, graph, corr_cache)
    patch = corr_out if ablation == "resample" else corr_out.mean(0, keepdim=True).expand_as(corr_out).contiguous()
    norm = Normaliser(float(metric(clean_logits)), float(metric(corr_logits)), None)
    return Runs(graph, clean_tokens, clean_cache, clean_out, patch, corrupted_tokens, norm, metric, ablation)


# ---------------------------------------------------------------------------------------------
# Edge scores
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeScores:
    """A score for every edge: [n_up, n_down], NaN where there is no edge.

    values: share of the clean − corrupted gap the edge carries, (M_clean − M_patched) / gap, where
      the normaliser is meaningful, else the raw M_clean − M_patched (`normalised` says which).
    raw: M_clean − M_patched in the metric's units (estimated for EAP / EAP-IG).
    """

    graph: Graph
    method: str
    values: torch.Tensor
    raw: torch.Tensor
    normaliser: "Normaliser"
    ablation: Ablation
    metric_label: str = "metric"
    info: dict = field(default_factory=dict)

    @property
    def normalised(self) -> bool:
        return self.normaliser.meaningful

    @property
    def value_label(self) -> str:
        return "share of the clean − corrupted gap" if self.normalised else f"Δ {self.metric_label}"

    def order(self) -> torch.Tensor:
        """Flat indices of the edges, largest |score| first (NaN edges excluded)."""
        flat = self.values.flatten()
        ok = ~torch.isnan(flat)
        idx = ok.nonzero().flatten()
        return idx[flat[idx].abs().argsort(descending=True, stable=True)]

    def top(self, n: int) -> list[tuple[str, str, float]]:
        """The n largest edges by |score|: (upstream, downstream, score)."""
        out = []
        for i in self.order()[:n].tolist():
            u, d = divmod(i, self.graph.n_down)
            out.append((self.graph.upstream[u], self.graph.downstream[d], float(self.values[u, d])))
        return out

    def score(self, up: str, down: str) -> float:
        return float(self.values[self.graph.up_index(up), self.graph.down_index(down)])

    def rank(self, up: str, down: str) -> int:
        """1-based rank of an edge by |score|."""
        flat = self.graph.up_index(up) * self.graph.n_down + self.graph.down_index(down)
        hit = (self.order() == flat).nonzero()
        if not len(hit):
            raise CircuitError(f"The edge {up} → {down} has no score (it does not exist or was not computed).")
        return int(hit[0]) + 1


def _scores(runs: Runs, method: str, raw: torch.Tensor, info: dict | None = None) -> EdgeScores:
    raw = raw.float().masked_fill(~runs.graph.valid, float("nan"))
    norm = runs.normaliser
    values = raw / norm.gap if norm.meaningful else raw
    return EdgeScores(runs.graph, method, values, raw, norm, runs.ablation, runs.metric_label, info or {})


def edge_attribution(model: HookedTransformer, runs: Runs, method: Literal["eap", "eap-ig"] = "eap",
                     steps: int = 8, progress: Progress | None = None) -> EdgeScores:
    """EAP or EAP-IG scores of every edge, M_clean − M_patched estimated to first order.

    EAP: Σ_pos (out_U(clean) − out_U(patch)) · ∂M/∂input_D on the clean run: one forward and one
    backward pass. EAP-IG: the gradient averaged over `steps` runs whose first residual stream
    is ablated + α (clean − ablated), α = 1/steps, 2/steps, .., 1 (a right Riemann sum of the
    integrated gradient; "ablated" is the embeddings' patch value: each prompt's corrupted
    embeddings for resample ablation, their mean for mean ablation), in one batch where memory
    allows (MAX_ELEMENTS), else a few steps at a time.
    """
    if method not in ("eap", "eap-ig"):
        raise CircuitError(f"Unknown attribution method {method!r}: 'eap' or 'eap-ig'.")
    if steps < 1:
        raise CircuitError("EAP-IG needs at least one step.")
    graph = runs.graph
    k = 1 if method == "eap" else steps
    prompts, n_pos = runs.clean_tokens.shape
    d_model = runs.patch.shape[-1]
    # Steps run together in one batch where the receivers' inputs and gradients fit MAX_ELEMENTS.
    per_step = prompts * n_pos * graph.n_down * d_model
    chunk = max(1, min(k, MAX_ELEMENTS // max(per_step, 1)))
    g = None
    with _Session(model):
        clean_inputs = _embed(model, runs.clean_tokens)
    start0 = runs.patch[:, :, 0].to(clean_inputs.resid.dtype)  # the embeddings' ablated value
    alphas = torch.arange(1, k + 1, dtype=clean_inputs.resid.dtype) / k
    for i in range(0, k, chunk):
        a = alphas[i:i + chunk]
        inputs = clean_inputs.repeat(len(a))
        if method == "eap-ig":  # ablated + α (clean − ablated), for each α of this chunk
            inputs.resid = (start0[None] + a[:, None, None, None] * (clean_inputs.resid - start0)[None]
                            ).reshape(inputs.resid.shape)
        with _Session(model), torch.enable_grad():
            inputs.resid = inputs.resid.detach().requires_grad_(True)
            receivers: list[torch.Tensor] = []
            final = _forward(model, graph, inputs, len(a), receivers=receivers)
            logits = final_logits(model, final[:, None])
            total = sum(runs.metric(logits[c * prompts:(c + 1) * prompts]) for c in range(len(a))) / k
            grads = torch.autograd.grad(total, receivers)
        part = torch.cat(grads, 2).detach()  # [len(a) * prompts, pos, n_down, d]
        part = part.reshape(len(a), prompts, *part.shape[1:]).sum(0)  # the 1/k is in `total`
        g = part if g is None else g + part
        if progress:
            progress(0.9 * (i + len(a)) / k)
    diff = (runs.clean_outputs - runs.patch).to(g.dtype)  # [prompts, pos, n_up, d]
    n_up, n_down = graph.n_up, graph.n_down
    raw = diff.permute(2, 0, 1, 3).reshape(n_up, -1) @ g.permute(2, 0, 1, 3).reshape(n_down, -1).T
    if progress:
        progress(1.0)
    return _scores(runs, method, raw, {"steps": k} if method == "eap-ig" else {})


def _start(model: HookedTransformer, runs: "Runs", base: _Inputs) -> int:
    """Where patched copies may start: `runs.start` where earlier keys and values can be read from
    the clean cache (core.patching.reuses_prefix: causal attention, keys final at hook_k, no
    ALiBi, no padding), else 0."""
    return runs.start if base.mask is None and reuses_prefix(model) else 0


@torch.no_grad()
def edge_patching(model: HookedTransformer, runs: Runs, edges: Iterable[tuple[int, int]] | None = None,
                  progress: Progress | None = None, max_tokens: int | None = None) -> EdgeScores:
    """Exact scores: the metric with one edge patched at a time (ACDC's ground truth), batched.

    edges: (upstream index, downstream index) pairs; None = every edge. Edges not computed are NaN.
    Each copy of the clean run has one receiver input changed by patch_U − clean_U; it starts at
    the receiver's layer from the clean cache (the layers below are unchanged), and copies for
    the logits need only the final LayerNorm and unembedding.
    """
    graph = runs.graph
    valid = graph.valid
    if edges is None:
        pairs = valid.nonzero().tolist()
    else:
        pairs = [(int(u), int(d)) for u, d in edges]
        for u, d in pairs:
            if not (0 <= u < graph.n_up and 0 <= d < graph.n_down) or not bool(valid[u, d]):
                raise CircuitError(f"There is no edge ({u}, {d}) in this model's graph.")
    raw = torch.full((graph.n_up, graph.n_down), float("nan"))
    if not pairs:
        return _scores(runs, "exact", raw)
    prompts, n_pos = runs.clean_tokens.shape
    diff = runs.patch - runs.clean_outputs  # what patching adds to the receiver's input
    per_chunk = max(1, (max_tokens or chunk_tokens(model, n_pos)) // (prompts * n_pos))
    # Edges into the same layer run together; sort so that chunks share start layers.
    pairs.sort(key=lambda p: int(graph.down_stage[p[1]]))
    done = 0
    with _Session(model):
        base = _embed(model, runs.clean_tokens)
        start = _start(model, runs, base)
    for i in range(0, len(pairs), per_chunk):
        chunk = pairs[i:i + per_chunk]
        with _Session(model):  # the lock per chunk: other sessions' runs go between two chunks
            metrics = _additive(model, graph, runs, base, chunk, diff, start)
        for (u, d), m in zip(chunk, metrics.tolist()):
            raw[u, d] = runs.clean - m
        done += len(chunk)
        if progress:
            progress(done / len(pairs))
    return _scores(runs, "exact", raw)


def _additive(model, graph: Graph, runs: Runs, base: _Inputs, pairs: list[tuple[int, int]],
              diff: torch.Tensor, start: int = 0) -> torch.Tensor:
    """[len(pairs)] the metric of the clean run with, per copy, diff[:, :, u] added to input d.

    Copies join at their receiver's stage from the clean cache. Positions before `start` are the
    same in every copy (nothing patched differs there): copies compute positions start.. only and
    read the earlier keys and values from the clean cache.
    """
    cache = runs.clean_cache
    prompts = runs.clean_tokens.shape[0]
    cfg = model.cfg
    stages = [int(graph.down_stage[d]) for _, d in pairs]
    order: list[int] = []  # copy index of each block of rows, in the order copies joined
    resid = None

    def join(stage: int, name: str) -> list[tuple[int, int, int]]:
        """Copies whose receiver reads at `stage` join the batch: (first row, upstream, downstream)."""
        nonlocal resid
        mine = [j for j, s in enumerate(stages) if s == stage]
        if not mine:
            return []
        x = cache[name][:, start:].repeat(len(mine), 1, 1)
        first = 0 if resid is None else resid.shape[0]
        resid = x if resid is None else torch.cat([resid, x])
        order.extend(mine)
        return [(first + n * prompts, *pairs[j]) for n, j in enumerate(mine)]

    capture = _active_capture(model)
    kq, kkv = cfg.n_heads, graph.n_kv_heads
    for layer in range(cfg.n_layers):
        stage = 2 * layer + 1
        joined = join(stage, utils.get_act_name("resid_pre", layer))
        if resid is not None:
            copies = resid.shape[0] // prompts
            x = resid[:, :, None].repeat(1, 1, kq + 2 * kkv, 1)
            lo = graph.down_slice(stage).start
            for r, u, dn in joined:
                x[r:r + prompts, :, dn - lo] += diff[:, start:, u]
            entry = prefix_entry(cache, layer, start, copies)
            inputs = _Inputs(resid, None if base.shortformer is None else base.shortformer[:, start:], base.mask)
            attn_out, _ = _attention(model, layer, x[:, :, :kq], x[:, :, kq:kq + kkv], x[:, :, kq + kkv:],
                                     inputs.repeat_extras(copies), capture.values, entry)
            resid = resid + attn_out
        if graph.has_mlp:
            joined = join(stage + 1, utils.get_act_name("resid_mid", layer))
            if resid is not None:
                m = resid.clone()
                for r, u, dn in joined:
                    m[r:r + prompts] += diff[:, start:, u]
                resid = resid + _mlp(model, layer, m)
    joined = join(2 * cfg.n_layers + 1, utils.get_act_name("resid_post", cfg.n_layers - 1))
    last = resid[:, -1].clone()
    for r, u, dn in joined:
        last[r:r + prompts] += diff[:, -1, u]
    metrics = _metric_per_copy(model, last, len(pairs), runs.metric)
    out = torch.empty(len(pairs))
    out[torch.tensor(order)] = metrics
    return out


# ---------------------------------------------------------------------------------------------
# Circuits: selection, pruning, evaluation
# ---------------------------------------------------------------------------------------------


def prune(graph: Graph, keep: torch.Tensor, feed: bool = True) -> torch.Tensor:
    """Keep only edges on a path from the embeddings to the logits (bool [n_up, n_down]).

    An edge into a node that reaches no logits changes nothing measured (exact for any ablation).
    With `feed` (right for resample ablation only), an edge out of a node that no kept edge
    feeds goes too: every input of that node is its corrupted value, so its output is its
    corrupted output, which is what the edge carries when ablated. Under mean ablation that node
    computes f(mean input), not the mean of f, so `feed=False` keeps those edges.
    """
    keep = keep & graph.valid
    while True:
        fed = _fed(graph, keep) if feed else torch.ones(graph.n_up, dtype=torch.bool)
        reaches = _reaching(graph, keep)
        into_live = torch.tensor([_reaches_owner(graph, dn, reaches) for dn in range(graph.n_down)])
        new = keep & fed[:, None] & into_live[None]
        if torch.equal(new, keep):
            return keep
        keep = new


def _fed(graph: Graph, keep: torch.Tensor) -> torch.Tensor:
    """bool [n_up]: nodes that a kept path from the embeddings reaches (embed itself included)."""
    fed = torch.zeros(graph.n_up, dtype=torch.bool)
    fed[0] = True
    for u in range(1, graph.n_up):
        ins = _inputs_of(graph, u)
        fed[u] = bool((keep[:, ins] & fed[:, None]).any()) if ins else False
    return fed


def _inputs_of(graph: Graph, up: int) -> list[int]:
    """The downstream indices that feed upstream node `up` (a head's q/k/v, an MLP's input)."""
    return _owners(graph)[1].get(up, [])


def _owner(graph: Graph, down: int) -> int | None:
    return _owners(graph)[0][down]


def _owners(graph: Graph) -> tuple[list, dict]:
    """(owner upstream index of each downstream input — a list for a grouped key/value input,
    None for the logits —, downstream inputs of each upstream node), kept on the graph."""
    return graph.owners


def _reaches_owner(graph, dn, reaches) -> bool:
    o = _owner(graph, dn)
    if o is None:
        return True
    if isinstance(o, list):
        return any(bool(reaches[u]) for u in o)
    return bool(reaches[o])


@dataclass(frozen=True)
class Circuit:
    """A set of edges (bool [n_up, n_down]) chosen by a method, with the scores it used."""

    graph: Graph
    edges: torch.Tensor
    scores: EdgeScores
    method: str
    requested: int | None = None  # N for top-N
    threshold: float | None = None  # τ for ACDC

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def edge_list(self) -> list[dict]:
        out = []
        for u, d in self.edges.nonzero().tolist():
            out.append({"from": self.graph.upstream[u], "to": self.graph.downstream[d],
                        "score": _num(self.scores.values[u, d])})
        out.sort(key=lambda e: -abs(e["score"]) if e["score"] is not None else 0.0)
        return out

    def nodes(self) -> list[str]:
        """Upstream nodes with a kept edge in or out, and 'logits' if reached, in graph order."""
        used = set()
        for u, d in self.edges.nonzero().tolist():
            used.add(self.graph.upstream[u])
            o = _owner(self.graph, d)
            if o is None:
                used.add("logits")
            else:
                for x in (o if isinstance(o, list) else [o]):
                    used.add(self.graph.upstream[x])
        return [n for n in self.graph.upstream + ("logits",) if n in used]

    def contains(self, up: str, down: str) -> bool:
        return bool(self.edges[self.graph.up_index(up), self.graph.down_index(down)])


def _num(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def top_edges(scores: EdgeScores, n: int, absolute: bool = True) -> torch.Tensor:
    """bool [n_up, n_down]: the n edges with the largest |score| (or score)."""
    graph = scores.graph
    if n < 0:
        raise CircuitError("The number of edges must be at least 0.")
    if n > graph.n_edges:
        raise CircuitError(f"This model's graph has {graph.n_edges} edges; N = {n} is more than that.")
    flat = scores.values.flatten()
    ok = ~torch.isnan(flat)
    idx = ok.nonzero().flatten()
    key = flat[idx].abs() if absolute else flat[idx]
    chosen = idx[key.argsort(descending=True, stable=True)[:n]]
    keep = torch.zeros(graph.n_up * graph.n_down, dtype=torch.bool)
    keep[chosen] = True
    return keep.reshape(graph.n_up, graph.n_down)


def discover(scores: EdgeScores, n: int | None = None, threshold: float | None = None,
             absolute: bool = True) -> Circuit:
    """The top-n edges (or those with |score| ≥ threshold), pruned to paths from input to logits."""
    if (n is None) == (threshold is None):
        raise CircuitError("Give the number of edges N or a score threshold (one of them).")
    if n is not None:
        keep = top_edges(scores, n, absolute)
    else:
        v = scores.values
        keep = ((v.abs() if absolute else v) >= threshold) & ~torch.isnan(v)
    graph = scores.graph
    return Circuit(graph, prune(graph, keep, feed=scores.ablation == "resample"), scores, scores.method,
                   requested=n, threshold=threshold)


@dataclass(frozen=True)
class Evaluation:
    """The task metric of circuits (every edge outside each ablated), and their faithfulness."""

    metric: torch.Tensor  # [circuits]
    faithfulness: torch.Tensor  # [circuits] (M_circuit − M_corrupted) / (M_clean − M_corrupted)
    n_edges: list[int]
    clean: float
    corrupted: float


@torch.no_grad()
def evaluate_masks(model: HookedTransformer, runs: Runs, keeps: torch.Tensor,
                   progress: Progress | None = None) -> torch.Tensor:
    """[circuits] the task metric with every edge outside each mask patched; keeps: bool
    [circuits, n_up, n_down] (or one [n_up, n_down]). Circuits run as copies of one batch."""
    with _Session(model):
        base = _embed(model, runs.clean_tokens)
    return _evaluate(model, runs, keeps, base, progress)


def _evaluate(model: HookedTransformer, runs: Runs, keeps: torch.Tensor, base: _Inputs,
              progress: Progress | None = None) -> torch.Tensor:
    """`evaluate_masks` from the clean run's first residual stream `base`. Takes the model's lock
    (a `_Session`) per chunk of circuits, so call it outside one."""
    graph = runs.graph
    if keeps.dim() == 2:
        keeps = keeps[None]
    if keeps.shape[0] == 0:
        raise CircuitError("No circuit to evaluate.")
    prompts, n_pos = runs.clean_tokens.shape
    chunk = _chunk_copies(graph, prompts, n_pos, runs.patch.shape[-1])
    with _Session(model):  # the tokenizer's padding side, read under the lock
        start = _start(model, runs, base)
    out = []
    for i in range(0, keeps.shape[0], chunk):
        k = keeps[i:i + chunk]
        ablated = (graph.valid[None] & ~k).to(runs.patch.dtype)
        with _Session(model):
            final = _forward(model, graph, base.repeat(k.shape[0]), k.shape[0], ablated, runs.patch,
                             start=start, cache=runs.clean_cache)
            out.append(_metric_per_copy(model, final, k.shape[0], runs.metric))
        if progress:
            progress(min(1.0, (i + k.shape[0]) / keeps.shape[0]))
    return torch.cat(out)


def evaluate(model: HookedTransformer, runs: Runs, circuits: list[Circuit] | Circuit,
             progress: Progress | None = None) -> Evaluation:
    circuits = [circuits] if isinstance(circuits, Circuit) else circuits
    if not circuits:
        raise CircuitError("No circuit to evaluate.")
    metric = evaluate_masks(model, runs, torch.stack([c.edges for c in circuits]), progress)
    return Evaluation(metric, _faithfulness(runs, metric), [c.n_edges for c in circuits], runs.clean, runs.corrupted)


def _faithfulness(runs: Runs, metric: torch.Tensor) -> torch.Tensor:
    gap = runs.clean - runs.corrupted
    if abs(gap) < 1e-9:
        return torch.full_like(metric, float("nan"))
    return (metric - runs.corrupted) / gap


@dataclass(frozen=True)
class Curve:
    requested: list[int]
    n_edges: list[int]  # after pruning
    metric: torch.Tensor
    faithfulness: torch.Tensor

    def smallest_faithful(self, level: float = 0.8) -> int | None:
        """The smallest requested N whose circuit keeps `level` of the behaviour, or None."""
        for n, f in zip(self.requested, self.faithfulness.tolist()):
            if f >= level:
                return n
        return None


def curve_points(n_edges: int, points: int = 12) -> list[int]:
    """Requested Ns for a faithfulness curve: roughly log-spaced from 1 to every edge."""
    if n_edges < 1:
        return []
    ns = {1, n_edges}
    for i in range(points):
        ns.add(max(1, round(n_edges ** (i / max(points - 1, 1)))))
    return sorted(ns)


def faithfulness_curve(model: HookedTransformer, runs: Runs, scores: EdgeScores, ns: list[int] | None = None,
                       progress: Progress | None = None) -> Curve:
    ns = ns or curve_points(scores.graph.n_edges)
    circuits = [discover(scores, n=n) for n in ns]
    ev = evaluate(model, runs, circuits, progress)
    return Curve(list(ns), ev.n_edges, ev.metric, ev.faithfulness)


def knock_out(graph: Graph, keep: torch.Tensor, nodes: Iterable[str]) -> torch.Tensor:
    """keep with every edge out of `nodes` (upstream names) removed (the nodes ablated)."""
    keep = keep.clone()
    for name in nodes:
        keep[graph.up_index(name)] = False
    return keep


@dataclass(frozen=True)
class NodeCheck:
    """Completeness or minimality of a circuit for node sets (Wang et al. 2022, section 4)."""

    sets: list[tuple[str, ...]]
    circuit_metric: torch.Tensor  # F(C \\ K) for each set K
    model_metric: torch.Tensor  # F(M \\ K) (completeness) or F(C \\ (K ∪ {v})) (minimality)
    score: torch.Tensor  # |difference|
    normaliser: "Normaliser"


def completeness(model: HookedTransformer, runs: Runs, circuit: Circuit,
                 sets: list[Iterable[str]] | None = None, progress: Progress | None = None) -> NodeCheck:
    """|F(C \\ K) − F(M \\ K)| for node sets K of the circuit (default: each node alone and
    the empty set): small when the circuit does what the whole model does even when knocked out."""
    nodes = [n for n in circuit.nodes() if n not in ("embed", "logits")]
    sets = [tuple(s) for s in sets] if sets is not None else [()] + [(n,) for n in nodes]
    full = runs.graph.valid
    masks = [knock_out(runs.graph, circuit.edges, s) for s in sets] + [knock_out(runs.graph, full, s) for s in sets]
    m = evaluate_masks(model, runs, torch.stack(masks), progress)
    c, f = m[:len(sets)], m[len(sets):]
    return NodeCheck(sets, c, f, _norm_abs(runs, c - f), runs.normaliser)


def minimality(model: HookedTransformer, runs: Runs, circuit: Circuit,
               base: Iterable[str] = (), progress: Progress | None = None) -> NodeCheck:
    """|F(C \\ (K ∪ {v})) − F(C \\ K)| for every node v of the circuit, K = `base`: how much each
    node adds; a node scoring near 0 is not needed."""
    base = tuple(base)
    nodes = [n for n in circuit.nodes() if n not in ("embed", "logits") and n not in base]
    sets = [base + (v,) for v in nodes]
    masks = [knock_out(runs.graph, circuit.edges, s) for s in sets] + [knock_out(runs.graph, circuit.edges, base)]
    m = evaluate_masks(model, runs, torch.stack(masks), progress)
    without, ref = m[:-1], m[-1].expand(len(sets))
    return NodeCheck(sets, without, ref, _norm_abs(runs, without - ref), runs.normaliser)


def _norm_abs(runs: Runs, delta: torch.Tensor) -> torch.Tensor:
    norm = runs.normaliser
    return (delta / norm.gap).abs() if norm.meaningful else delta.abs()


def acdc(model: HookedTransformer, runs: Runs, threshold: float = 0.01,
         progress: Progress | None = None) -> Circuit:
    """ACDC (Conmy et al. 2023) with the task metric, batched per receiver.

    Receivers are visited from the logits backwards. For each, every incoming edge still in the
    circuit is tried removed against the current circuit, all in one batch (one copy per edge);
    edges whose removal lowers the normalised metric by less than `threshold` (raw units where
    the normaliser is not meaningful) are removed together. The original removes one edge at a
    time and re-measures; trying a receiver's edges against the same circuit is what lets them
    share a batch. The scores of the result are the measured drops (NaN for edges never tried).
    """
    graph = runs.graph
    keep = graph.valid.clone()
    drops = torch.full((graph.n_up, graph.n_down), float("nan"))
    norm = runs.normaliser
    scale = norm.gap if norm.meaningful else 1.0
    receivers = sorted(range(graph.n_down), key=lambda d: -int(graph.down_stage[d]))
    with _Session(model), torch.no_grad():
        base = _embed(model, runs.clean_tokens)
    _acdc_visit(model, runs, receivers, keep, drops, scale, threshold, base, progress)

    raw = drops * scale
    scores = EdgeScores(graph, "acdc", drops if norm.meaningful else raw, raw, norm, runs.ablation,
                        runs.metric_label, {"threshold": threshold})
    return Circuit(graph, prune(graph, keep, feed=runs.ablation == "resample"), scores, "acdc", threshold=threshold)


def _acdc_visit(model, runs: Runs, receivers: list[int], keep: torch.Tensor, drops: torch.Tensor, scale: float,
                threshold: float, base: _Inputs, progress: Progress | None) -> None:
    """ACDC's loop over receivers; updates `keep` and `drops` in place. The model's lock is taken
    per batch chunk of each receiver's trials, so other sessions' forward passes interleave with a
    long search."""
    graph = runs.graph
    for i, d in enumerate(receivers):
        if not _reaches_owner(graph, d, _reaching(graph, keep)):
            keep[:, d] = False
        else:
            ups = keep[:, d].nonzero().flatten().tolist()
            if ups:
                # copy 0: the current circuit; copy j: it without edge ups[j - 1]
                trial = keep[None].repeat(len(ups) + 1, 1, 1)
                for j, u in enumerate(ups):
                    trial[j + 1, u, d] = False
                with torch.no_grad():  # _evaluate takes the lock per chunk
                    m = _evaluate(model, runs, trial, base)
                drop = (m[0] - m[1:]) / scale
                for j, u in enumerate(ups):
                    drops[u, d] = float(drop[j])
                    if float(drop[j]) < threshold:
                        keep[u, d] = False
        if progress:
            progress((i + 1) / len(receivers))


def _reaching(graph: Graph, keep: torch.Tensor) -> torch.Tensor:
    """bool [n_up]: upstream nodes with a kept path to the logits."""
    reaches = torch.zeros(graph.n_up, dtype=torch.bool)
    logits = graph.n_down - 1
    for u in range(graph.n_up - 1, -1, -1):
        if bool(keep[u, logits]):
            reaches[u] = True
            continue
        for dn in keep[u].nonzero().flatten().tolist():
            if _reaches_owner(graph, dn, reaches):
                reaches[u] = True
                break
    return reaches


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def circuit_json(circuit: Circuit, model_name: str, task: str, evaluation: Evaluation | None = None) -> dict:
    """The circuit as plain JSON-able data: nodes, edges with scores, task, model, method."""
    out = {
        "model": model_name,
        "task": task,
        "method": circuit.method,
        "ablation": circuit.scores.ablation,
        "score_unit": circuit.scores.value_label,
        "requested_edges": circuit.requested,
        "threshold": circuit.threshold,
        "n_edges": circuit.n_edges,
        "n_edges_in_graph": circuit.graph.n_edges,
        "nodes": circuit.nodes(),
        "edges": circuit.edge_list(),
    }
    if evaluation is not None:
        out["metric"] = float(evaluation.metric[0])
        out["clean_metric"] = evaluation.clean
        out["corrupted_metric"] = evaluation.corrupted
        out["faithfulness"] = _num(evaluation.faithfulness[0])
    return out


def score_edges(model: HookedTransformer, runs: Runs, method: ScoreMethod = "eap", steps: int = 8,
                progress: Progress | None = None) -> EdgeScores:
    """EAP, EAP-IG or exact scores of every edge (the page's one call)."""
    if method == "exact":
        return edge_patching(model, runs, progress=progress)
    return edge_attribution(model, runs, method, steps=steps, progress=progress)


def agreement(exact: EdgeScores, estimate: EdgeScores, top: int = 20) -> dict:
    """Pearson correlation over the edges both scored, and the overlap of their top-`top` edges."""
    a, b = exact.values.flatten(), estimate.values.flatten()
    ok = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[ok].double(), b[ok].double()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.numel() > 1 else float("nan")
    ta = set(exact.order()[:top].tolist())
    tb = set(estimate.order()[:top].tolist())
    return {"correlation": corr, "top_overlap": len(ta & tb) / max(1, min(top, len(ta))), "top": top,
            "edges": int(ok.sum())}
