"""Execution backends: the same analyses on a TransformerLens model here, or through nnsight.

The analyses below need a handful of things from a model: a run that returns named activations,
a run with interventions (patch, add or zero at a hook and position), logits at chosen positions
and gradients. `Backend` says which; two implementations give them:

- `TLBackend` wraps the app's `HookedTransformer` (hooks under the store's lock); its numbers are
  the ones every other page shows.
- `NNsightBackend` wraps an `nnsight.TransformersModel` on a Hugging Face model (a folder, a
  hub id), run on this machine or on NDIF (`core.ndif`). Weights never need to be here for a
  remote model: each view is one traced program that computes its numbers where the model
  lives and sends back only what the page draws.

TransformerLens hook names stay the app's vocabulary (`blocks.3.hook_resid_pre`,
`blocks.3.attn.hook_z`, ...). `Layout` maps them onto a Hugging Face architecture's modules for
the families in `LAYOUTS` (GPT-2; Llama, Mistral, Qwen 2/3; Gemma 1/2/3).

Numbers follow the app's TransformerLens conventions (`core.models._process`), so both backends
agree to float32 rounding:
- on LayerNorm models the residual stream and every component written to it are centred (mean
  over d_model removed), as TransformerLens's `center_writing_weights` makes them;
- a head's output excludes its value bias, which goes to the layer's "attn bias" instead
  (`fold_value_biases`);
- a single-token target is the logit minus its mean over the vocabulary (`center_unembed`),
  except on a model that soft-caps its logits; a logit difference is the same either way.

Every view is batched: a sweep of N patches is a few forward passes of many rows (row 0 the
source prompt, row 1 the base prompt, one row per patch), chunked by `max_rows`, so a remote
sweep is a few requests instead of N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from core.attribution import Attribution, LogitLens

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Progress = Callable[[float, str], None]

PATCH_TARGETS = {
    "resid_pre": "residual stream before each layer, by layer × position",
    "attn_out": "attention output of each layer, by layer × position",
    "mlp_out": "MLP output of each layer, by layer × position",
    "z": "each head's output (hook_z), at every position, by layer × head",
}


class BackendError(Exception):
    """A view could not be computed; the message is for the person who asked."""


@dataclass(frozen=True)
class Spec:
    """The shape of the model a backend runs."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    layer_norm: bool  # LayerNorm (centres) rather than RMSNorm
    softcap: float | None  # final logit soft cap


@dataclass(frozen=True)
class Layout:
    """Where a Hugging Face architecture keeps what the TransformerLens hooks name."""

    layers: str  # module list of the blocks
    attn: str  # attention module, in a block
    out_proj: str  # attention output projection, in the attention module (its input is hook_z)
    mlp: str
    final_norm: str
    embed: str
    pos_embed: str | None = None  # learned positions added to the residual stream (GPT-2)
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    post_attn_norm: str | None = None  # Gemma 2/3: a norm on the attention output before the residual
    post_mlp_norm: str | None = None


_GPT2 = Layout("transformer.h", "attn", "c_proj", "mlp", "transformer.ln_f", "transformer.wte",
               pos_embed="transformer.wpe", conv1d=True)
_LLAMA = Layout("model.layers", "self_attn", "o_proj", "mlp", "model.norm", "model.embed_tokens")
_GEMMA = Layout("model.layers", "self_attn", "o_proj", "mlp", "model.norm", "model.embed_tokens", norm_offset=1.0)
_GEMMA2 = Layout("model.layers", "self_attn", "o_proj", "mlp", "model.norm", "model.embed_tokens", norm_offset=1.0,
                 post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm")
LAYOUTS: dict[str, Layout] = {
    "GPT2LMHeadModel": _GPT2,
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "GemmaForCausalLM": _GEMMA,
    "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": _GEMMA2,
}


def supported_architectures() -> list[str]:
    return sorted(LAYOUTS)


def check_architecture(architecture: str) -> Layout:
    if architecture not in LAYOUTS:
        raise BackendError(
            f"The nnsight backend does not map {architecture} yet; it maps "
            f"{', '.join(supported_architectures())}. Load the model on this machine with "
            "TransformerLens instead (the model picker's other options).")
    return LAYOUTS[architecture]


@dataclass(frozen=True)
class Patching:
    """A patching sweep: the metric (logit difference, or centred logit) after each patch.

    values: [layer, position] or [layer, head]; NaN where a request failed (see `failed`).
    base, source: the metric on the base and the source prompt, unpatched.
    """

    target: str
    values: torch.Tensor
    base: float
    source: float
    failed: str | None = None


@dataclass(frozen=True)
class Edit:
    """One intervention at a TransformerLens hook: `kind` "patch" (set to `value`), "add" (add
    `value`) or "zero"; at one position (`pos`), from `start` on, or at all; on one head (`head`,
    hook_z only) or all."""

    hook: str
    kind: str
    value: torch.Tensor | None = None
    pos: int | None = None
    head: int | None = None
    start: int | None = None  # every position from here on (instead of `pos`)

    def index(self) -> tuple:
        """The (batch, position) index the edit writes."""
        if self.pos is not None:
            return (slice(None), self.pos)
        return (slice(None), slice(self.start, None))


def _units(target: str, spec: Spec, n_pos: int) -> list[tuple[int, int]]:
    """The (layer, position) or (layer, head) of every patch a sweep makes, layer-major."""
    inner = spec.n_heads if target == "z" else n_pos
    return [(layer, i) for layer in range(spec.n_layers) for i in range(inner)]


def _check_pair(base: torch.Tensor, source: torch.Tensor, spec: Spec) -> None:
    if base.ndim != 2 or base.shape[0] != 1 or source.shape != base.shape:
        raise BackendError(
            f"Patching needs one base and one source prompt of the same length in tokens; got "
            f"{base.shape[-1]} and {source.shape[-1]} tokens.")
    _check_one(base, spec)


def _check_one(tokens: torch.Tensor, spec: Spec) -> None:
    """The views take one prompt, [1, pos], of at least one token and at most the context."""
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise BackendError(f"The views take one prompt at a time (tokens [1, pos]); got shape {tuple(tokens.shape)}.")
    if tokens.shape[1] == 0:
        raise BackendError("The prompt is empty.")
    if tokens.shape[1] > spec.n_ctx:
        raise BackendError(f"The prompt is {tokens.shape[1]} tokens; the model reads at most {spec.n_ctx}.")


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


class Backend:
    """What the analyses need from a model. Subclasses implement the views; a view that one
    cannot give raises `BackendError`."""

    spec: Spec
    max_rows: int = 64  # rows of one batched forward pass (one remote request)

    # -- text ----------------------------------------------------------------------------------
    def to_tokens(self, text: str) -> torch.Tensor:
        raise NotImplementedError

    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        raise NotImplementedError

    # -- primitives ----------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, reads: list[str], edits: list[Edit] = (),
            logit_positions: list[int] | None = None) -> dict[str, torch.Tensor]:
        """One forward pass of `tokens` [batch, pos] with `edits` applied; the activations named
        in `reads` (TransformerLens names and shapes, after the edits) and "logits" at
        `logit_positions` ([batch, len(positions), d_vocab]; all positions when None)."""
        raise NotImplementedError

    def gradients(self, tokens: torch.Tensor, hooks: list[str], answer: int, wrong: int | None = None,
                  pos: int = -1) -> dict[str, torch.Tensor]:
        """d target / d activation at each hook ([batch, ...] as `run` returns), target summed
        over the batch: the logit difference (or centred logit) at `pos`."""
        raise NotImplementedError

    def top_prediction(self, tokens: torch.Tensor) -> int:
        """The most likely next token after `tokens` [1, pos]."""
        return int(self.run(tokens, [], logit_positions=[-1])["logits"][0, 0].argmax())

    # -- views ---------------------------------------------------------------------------------
    def attention_patterns(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """[len(layers), head, query, key] attention patterns of one prompt [1, pos]."""
        raise NotImplementedError

    def residual_norms(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """([layer + 1, pos] norm of the residual stream before each layer and after the last,
        labels "0_pre", ..., "final_post")."""
        raise NotImplementedError

    def logit_lens(self, tokens: torch.Tensor, answer: int | None = None, k: int = 5) -> LogitLens:
        raise NotImplementedError

    def dla(self, tokens: torch.Tensor, answer: int, wrong: int | None = None, by: str = "layer") -> Attribution:
        """Direct logit attribution at the last position, by "layer" (embeddings, each attention
        and MLP output) or by "head" (every head, then embeddings, MLPs and "attn bias")."""
        raise NotImplementedError

    def patch(self, base: torch.Tensor, source: torch.Tensor, answer: int, wrong: int | None = None,
              target: str = "resid_pre", progress: Progress | None = None) -> Patching:
        """Activation patching: the source run's activation put into the base run, one component
        (and position) at a time; the metric at the last position after each."""
        raise NotImplementedError

    def attribution_patch(self, base: torch.Tensor, source: torch.Tensor, answer: int, wrong: int | None = None,
                          target: str = "resid_pre") -> Patching:
        """The linear estimate of `patch`: base metric + (source - base) · d metric / d activation."""
        raise NotImplementedError

    def steer(self, tokens: torch.Tensor, layer: int, vector: torch.Tensor, alpha: float, from_pos: int = 0,
              k: int = 10) -> dict:
        """Next-token distribution without and with alpha · vector added to the residual stream
        before `layer` from `from_pos` on (`core.steering.distribution_shift`'s dict)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# TransformerLens
# ---------------------------------------------------------------------------------------------


def _tl_metric(logits: torch.Tensor, answer: int, wrong: int | None) -> torch.Tensor:
    """[batch] metric of TL logits [batch, d_vocab] (already centred over the vocabulary by
    `center_unembed` where TL centres them)."""
    if wrong is None:
        return logits[:, answer]
    return logits[:, answer] - logits[:, wrong]


class TLBackend(Backend):
    """The app's HookedTransformer, behind the activation store's lock."""

    def __init__(self, model: HookedTransformer, max_rows: int = 64, store=None):
        self.model = model
        self.max_rows = max_rows
        self.store = store  # a core.store.ActivationStore: cached runs are read from it (the app's)
        cfg = model.cfg
        cap = getattr(cfg, "output_logits_soft_cap", -1.0)
        self.spec = Spec(
            architecture=str(getattr(cfg, "original_architecture", None) or "HookedTransformer"),
            n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
            d_model=cfg.d_model, d_head=cfg.d_head, d_vocab=cfg.d_vocab_out, n_ctx=cfg.n_ctx,
            layer_norm=cfg.normalization_type in ("LN", "LNPre"), softcap=float(cap) if cap and cap > 0 else None)

    def to_tokens(self, text: str) -> torch.Tensor:
        from core import store
        return store.to_tokens(self.model, text)

    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        from core import store
        return store.str_tokens(self.model, torch.as_tensor(tokens).reshape(-1))

    def _hook_fn(self, edit: Edit):
        def fn(act, hook):
            sel = act[:, :, edit.head] if edit.head is not None else act  # hook_z: [b, p, head, d_head]
            idx = edit.index()
            if edit.kind == "zero":
                sel[idx] = 0.0
            elif edit.kind == "patch":
                sel[idx] = edit.value.to(act.dtype)
            elif edit.kind == "add":
                sel[idx] += edit.value.to(act.dtype)
            else:
                raise BackendError(f"Unknown edit {edit.kind!r}: 'patch', 'add' or 'zero'.")
            return act
        return fn

    @torch.no_grad()
    def run(self, tokens, reads, edits=(), logit_positions=None):
        from core.store import locked
        acts: dict[str, torch.Tensor] = {}

        def keep(act, hook):
            acts[hook.name] = act.detach().clone()

        fwd = [(e.hook, self._hook_fn(e)) for e in edits] + [(name, keep) for name in reads]
        with locked(self.model):
            with self.model.hooks(fwd_hooks=fwd, reset_hooks_end=True):
                logits = self.model(tokens)
        acts["logits"] = logits if logit_positions is None else logits[:, logit_positions]
        return acts

    def gradients(self, tokens, hooks, answer, wrong=None, pos=-1):
        from core.store import locked
        acts: dict[str, torch.Tensor] = {}

        def keep(act, hook):
            acts[hook.name] = act
            return act

        with locked(self.model), torch.enable_grad():
            with self.model.hooks(fwd_hooks=[(h, keep) for h in hooks], reset_hooks_end=True):
                logits = self.model(tokens)
            value = _tl_metric(logits[:, pos], answer, wrong).sum()
            grads = torch.autograd.grad(value, [acts[h] for h in hooks])
        return {h: g.detach() for h, g in zip(hooks, grads)}

    def _cache(self, tokens):
        """(logits, cache) of one plain run: from the activation store when there is one."""
        if self.store is not None:
            run = self.store.get(self.model, tokens)
            return run.logits, run.cache
        from core import store
        return store.run_with_cache(self.model, tokens)

    def top_prediction(self, tokens: torch.Tensor) -> int:
        """The most likely next token after `tokens` [1, pos]."""
        return int(self._cache(tokens)[0][0, -1].argmax())

    @torch.no_grad()
    def attention_patterns(self, tokens, layers):
        _check_one(tokens, self.spec)
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
        acts = self.run(tokens, names, logit_positions=[-1])
        return torch.stack([acts[n][0] for n in names])

    @torch.no_grad()
    def residual_norms(self, tokens):
        _check_one(tokens, self.spec)
        _, cache = self._cache(tokens)
        resid, labels = cache.accumulated_resid(layer=None, return_labels=True)  # [layer+1, batch, pos, d]
        return resid[:, 0].norm(dim=-1), labels

    def logit_lens(self, tokens, answer=None, k=5):
        _check_one(tokens, self.spec)
        from core import attribution
        _, cache = self._cache(tokens)
        return attribution.logit_lens(self.model, cache, answer, k=k)

    def dla(self, tokens, answer, wrong=None, by="layer"):
        _check_one(tokens, self.spec)
        from core import attribution
        _, cache = self._cache(tokens)
        if by == "layer":
            return attribution.by_component(self.model, cache, answer, wrong)
        if by == "head":
            return attribution.by_head(self.model, cache, answer, wrong)
        raise BackendError(f"Unknown attribution {by!r}: 'layer' or 'head'.")

    def _hook(self, target: str, layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z" if target == "z" else f"blocks.{layer}.hook_{target}"

    @torch.no_grad()
    def patch(self, base, source, answer, wrong=None, target="resid_pre", progress=None):
        _check_pair(base, source, self.spec)
        units = _units(target, self.spec, base.shape[1])
        values = torch.full((len(units),), float("nan"))
        base_m = source_m = float("nan")
        groups = _chunks(list(enumerate(units)), self.max_rows)
        for n, group in enumerate(groups):
            rows = torch.cat([source, base] + [base] * len(group))
            by_layer: dict[int, list[tuple[int, int]]] = {}
            for r, (_, (layer, i)) in enumerate(group, start=2):
                by_layer.setdefault(layer, []).append((r, i))
            hooks = []
            for layer, items in by_layer.items():
                def fn(act, hook, items=items):
                    for r, i in items:
                        if target == "z":
                            act[r, :, i] = act[0, :, i]
                        else:
                            act[r, i] = act[0, i]
                    return act
                hooks.append((self._hook(target, layer), fn))
            from core.store import locked
            with locked(self.model):
                with self.model.hooks(fwd_hooks=hooks, reset_hooks_end=True):
                    logits = self.model(rows)[:, -1]
            m = _tl_metric(logits, answer, wrong).float()
            source_m, base_m = float(m[0]), float(m[1])
            for r, (j, _) in enumerate(group, start=2):
                values[j] = m[r]
            if progress:
                progress((n + 1) / len(groups), f"forward pass {n + 1} of {len(groups)}")
        return Patching(target, values.reshape(self.spec.n_layers, -1), base_m, source_m)

    def attribution_patch(self, base, source, answer, wrong=None, target="resid_pre"):
        _check_pair(base, source, self.spec)
        hooks = [self._hook(target, layer) for layer in range(self.spec.n_layers)]
        both = torch.cat([source, base])
        grads = self.gradients(base, hooks, answer, wrong)
        acts = self.run(both, hooks, logit_positions=[-1])
        m = _tl_metric(acts["logits"][:, 0], answer, wrong)
        per_layer = []
        for h in hooks:
            diff = (acts[h][0] - acts[h][1]) * grads[h][0]
            per_layer.append(diff.sum(dim=(0, 2)) if target == "z" else diff.sum(-1))
        base_m = float(m[1])
        return Patching(target, (base_m + torch.stack(per_layer)).float(), base_m, float(m[0]))

    @torch.no_grad()
    def steer(self, tokens, layer, vector, alpha, from_pos=0, k=10):
        _check_one(tokens, self.spec)
        from core.steering import distribution_shift
        edit = Edit(f"blocks.{layer}.hook_resid_pre", "add", alpha * vector.float(), start=from_pos)
        base = self.run(tokens, [], logit_positions=[-1])["logits"][0, 0]
        changed = self.run(tokens, [], [edit], logit_positions=[-1])["logits"][0, 0]
        return distribution_shift(base, changed, k)

