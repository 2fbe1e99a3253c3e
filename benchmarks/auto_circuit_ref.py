"""auto-circuit's edge attribution patching (EAP) as a reference for our own EAP scores.

auto-circuit (Miller et al., "Transformer Circuit Faithfulness Metrics are not Robust";
github.com/UFO-101/auto-circuit) is not in requirements.txt: its release pins (kaleido==0.2.1,
tracr-pypi, word2word, the `vscode-tqdm` fork of tqdm, blobfile) would change or add system
packages. Install it beside the app, without its dependencies (this module puts .bench-deps on
sys.path itself):

    pip install --no-deps --target .bench-deps -r benchmarks/requirements-auto-circuit.txt

    from benchmarks.auto_circuit_ref import eap_scores, timed_eap

What auto-circuit computes (v1.0.1, read from its source)
---------------------------------------------------------
`patchable_model(model, factorized=True, separate_qkv=True, slice_output="last_seq", seq_len=None)`
replaces these HookPoints of the model, in place, by `PatchWrapperImpl` modules:
  sources       "Resid Start" = blocks.0.hook_resid_pre (embed + pos_embed; embed alone for
                rotary/ALiBi/shortformer models), "A{l}.{h}" = blocks.l.attn.hook_result[:, :, h]
                (z_h @ W_O[h], no b_O), "MLP {l}" = blocks.l.hook_mlp_out;
  destinations  "A{l}.{h}.Q/K/V" = blocks.l.hook_{q,k,v}_input[:, :, h] (before ln1),
                "MLP {l}" = blocks.l.hook_mlp_in (before ln2), "Resid End" =
                blocks.{n_layers-1}.hook_resid_post (before ln_final);
  edges         every source in an earlier "layer" than the destination (a block's heads feed
                its own MLP, unless parallel_attn_mlp).
Each destination's input becomes  x + Σ_src mask[dest, src] · (patch_src − clean_src), where
patch_src is the source's output on the CORRUPTED prompts (AblationType.RESAMPLE,
clean_corrupt="corrupt") and clean_src its output in the current (clean) run. With seq_len=None
one mask entry covers all positions (and all prompts) of an edge.
`mask_gradient_prune_scores(grad_function="logit", answer_function="avg_diff", mask_val=0.0)`
sets every mask to 0 (so the forward pass is the clean run), computes
    loss = −mean_b( logits[b, −1, answer_b] − logits[b, −1, wrong_b] )    ("avg_diff"; with
           several answers per prompt it is mean(answer logits) − mean(wrong logits) per prompt)
on the clean prompts, calls loss.backward() and returns mask.grad, signed, no abs. Hence
    score_ac(U→D) = ∂loss/∂mask = Σ_{b,pos} (a_U^corr − a_U^clean) · ∂(−M)/∂in_D
                  = Σ_{b,pos} (a_U^clean − a_U^corr) · ∂M/∂in_D,
with M = mean over prompts of the clean last-position logit difference. That is exactly OUR
convention (the EAP estimate of M(clean) − M(edge given its corrupted value)): the conversion is
the identity on values, only names change. Summing over prompts of ∂M/∂in, where M already
averages over prompts, is the mean over prompts of each prompt's summed-over-positions term.
Gradients accumulate over the dataloader's batches (a sum of per-batch means), so we always hand
it ONE batch holding all prompts; then no rescaling is needed.

Names: "Resid Start" → "embed", "A{l}.{h}" → "L{l}H{h}", "MLP {l}" → "L{l} MLP",
"A{l}.{h}.Q" → "L{l}H{h}.q" (.k, .v likewise), "Resid End" → "logits".

Compatibility with transformer_lens 3.9 (worked around here; auto-circuit's files are untouched)
- auto-circuit imports `HookedTransformerKeyValueCache` from `transformer_lens` and from
  `transformer_lens.past_key_value_caching`; TL 3 renamed it `TransformerLensKeyValueCache`
  (transformer_lens.cache.key_value_cache). Before importing auto-circuit we alias the old name
  on the `transformer_lens` package and register a tiny `transformer_lens.past_key_value_caching`
  module holding the alias (only when they are missing). auto-circuit uses the class only in
  type hints and in `load_datasets_from_json`'s prefix caching, which we never call.
- `auto_circuit.utils.graph_utils` imports `blobfile` (through the SAE-loading helper
  `sparse_autoencoder.py`, which uses it only to download OpenAI SAE weights); blobfile needs the
  compiled lxml and pycryptodomex. When blobfile is not importable we register a stub module whose
  `BlobFile` raises. `ordered_set`, `tracr`, `kaleido` and `word2word` are not imported on the EAP
  path (only by ACDC, visualize and the tracr/task helpers).
- Its progress bar (tqdm with delay=0) is silenced by rebinding `mask_gradient.tqdm`.
- auto-circuit checks, but does not set, the config flags it needs. `wrap` sets
  use_attn_result, use_split_qkv_input and (unless attn_only) use_hook_mlp_in, and for GQA
  models ungroup_grouped_query_attention (TL 3.9 otherwise gives hook_k/v_input only
  n_key_value_heads heads while auto-circuit makes one K and one V node per query head, and its
  einsum fails). All on a deep copy: `patchable_model` mutates the model it is given (module
  replacement; the PatchableModel also switches it to eval()). Like auto-circuit's own
  `load_tl_model`, the copy's weights get requires_grad=False, so backward computes mask
  gradients only.
GQA keys: auto-circuit's K/V scores are per QUERY head (on the ungrouped copy, query head h
reads KV head h // (n_heads // n_key_value_heads)). kv_heads="kv" sums them per KV head, keyed
"L{l}KV{g}.k" / ".v" as core.circuits names them, which is exactly the score of the grouped
model's k/v input (its gradient is the sum of the copies' gradients); kv_heads="query" keeps them
per query head as "L{l}H{h}.k". The default (None) is "kv" on a grouped-query model (one whose
cfg has n_key_value_heads < n_heads and ungroup_grouped_query_attention off) and "query" otherwise,
matching core.circuits.build_graph.
"""
from __future__ import annotations

import copy
import importlib.metadata
import statistics
import sys
import time
import types
from functools import partial
from pathlib import Path
from typing import Literal, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH_DEPS = ROOT / ".bench-deps"
VERSION = "1.0.1"
INSTALL = "pip install --no-deps --target .bench-deps -r benchmarks/requirements-auto-circuit.txt"

Tokens = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def _shim_transformer_lens() -> None:
    import transformer_lens

    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as Cache
    except ImportError:  # TL 1.x/2.x: the old names exist, nothing to do
        return
    if not hasattr(transformer_lens, "HookedTransformerKeyValueCache"):
        transformer_lens.HookedTransformerKeyValueCache = Cache
    try:
        import transformer_lens.past_key_value_caching  # noqa: F401
    except ImportError:
        module = types.ModuleType("transformer_lens.past_key_value_caching")
        module.HookedTransformerKeyValueCache = Cache
        module.__doc__ = "Alias registered by benchmarks/auto_circuit_ref.py for auto-circuit 1.0.1."
        sys.modules["transformer_lens.past_key_value_caching"] = module


def _stub_blobfile() -> None:
    try:
        import blobfile  # noqa: F401
    except ImportError:
        module = types.ModuleType("blobfile")

        class BlobFile:  # only auto_circuit's OpenAI-SAE download helper would call it
            def __init__(self, *args, **kwargs):
                raise ImportError("blobfile is stubbed by benchmarks/auto_circuit_ref.py; pip install blobfile")

        module.BlobFile = BlobFile
        sys.modules["blobfile"] = module


def _import_auto_circuit():
    if BENCH_DEPS.is_dir() and str(BENCH_DEPS) not in sys.path:
        sys.path.append(str(BENCH_DEPS))  # after site-packages: .bench-deps never shadows the app's packages
    _shim_transformer_lens()
    _stub_blobfile()
    try:
        import auto_circuit  # noqa: F401
    except ImportError as err:
        raise ImportError(f"auto-circuit is not installed. From {ROOT} run:\n    {INSTALL}") from err
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos import mask_gradient
    from auto_circuit.types import AblationType
    from auto_circuit.utils.graph_utils import patchable_model

    try:
        found = importlib.metadata.version("auto-circuit")
    except importlib.metadata.PackageNotFoundError:
        found = "unknown"
    if found != VERSION:
        import warnings

        warnings.warn(f"auto-circuit {found} found; this reference was checked against {VERSION} ({INSTALL})")
    mask_gradient.tqdm = partial(mask_gradient.tqdm, disable=True)
    return types.SimpleNamespace(PromptDataLoader=PromptDataLoader, PromptDataset=PromptDataset,
                                 mask_gradient_prune_scores=mask_gradient.mask_gradient_prune_scores,
                                 AblationType=AblationType, patchable_model=patchable_model, version=found)


ac = _import_auto_circuit()


def wrap(model):
    """A PatchableModel around a deep copy of `model` (the caller's model is left as it was)."""
    inner = copy.deepcopy(model)
    inner.set_use_attn_result(True)
    inner.set_use_split_qkv_input(True)
    if not inner.cfg.attn_only:
        inner.set_use_hook_mlp_in(True)
    if getattr(inner.cfg, "n_key_value_heads", None) not in (None, inner.cfg.n_heads):
        inner.set_ungroup_grouped_query_attention(True)
    inner.eval()
    for param in inner.parameters():
        param.requires_grad_(False)
    device = next(inner.parameters()).device
    return ac.patchable_model(inner, factorized=True, slice_output="last_seq", seq_len=None,
                              separate_qkv=True, device=device)


def _ids(values, batch: int, device) -> torch.Tensor:
    ids = torch.as_tensor(values, dtype=torch.long, device=device)
    if ids.ndim == 0:
        ids = ids.expand(batch)
    if ids.ndim == 1:
        ids = ids[:, None]  # one answer per prompt
    assert ids.shape[0] == batch, f"{ids.shape[0]} answers for {batch} prompts"
    return ids


def loader(patchable, clean_tokens: Tokens, corrupted_tokens: Tokens, answers, wrongs):
    """One PromptDataLoader batch with every prompt (see the module docstring: batches would sum)."""
    device = next(patchable.parameters()).device
    clean = torch.as_tensor(clean_tokens, dtype=torch.long, device=device)
    corrupt = torch.as_tensor(corrupted_tokens, dtype=torch.long, device=device)
    assert clean.shape == corrupt.shape and clean.ndim == 2, "clean and corrupted tokens: same [batch, pos] shape"
    batch = clean.shape[0]
    dataset = ac.PromptDataset(clean, corrupt, _ids(answers, batch, device), _ids(wrongs, batch, device))
    return ac.PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=batch, shuffle=False)


def raw_scores(patchable, data) -> dict:
    """auto-circuit's PruneScores: {dest module name: mask gradient [heads?, incoming srcs]}."""
    return ac.mask_gradient_prune_scores(patchable, data, None, grad_function="logit", answer_function="avg_diff",
                                         mask_val=0.0, integrated_grad_samples=None,
                                         ablation_type=ac.AblationType.RESAMPLE, clean_corrupt="corrupt")


def _src_name(name: str) -> str:
    if name == "Resid Start":
        return "embed"
    if name.startswith("MLP "):
        return f"L{name[4:]} MLP"
    layer, head = name[1:].split(".")
    return f"L{layer}H{head}"


def _dest_name(name: str, group: int, kv_heads: str) -> str:
    if name == "Resid End":
        return "logits"
    if name.startswith("MLP "):
        return f"L{name[4:]} MLP"
    layer, head, letter = name[1:].split(".")
    if letter in "KV" and kv_heads == "kv":
        return f"L{layer}KV{int(head) // group}.{letter.lower()}"
    return f"L{layer}H{head}.{letter.lower()}"


def _grouped(cfg) -> bool:
    n_kv = getattr(cfg, "n_key_value_heads", None)
    return n_kv is not None and n_kv != cfg.n_heads and not getattr(cfg, "ungroup_grouped_query_attention", False)


def convert(patchable, prune_scores: dict, kv_heads: Literal["query", "kv"] | None = None,
            grouped: bool | None = None) -> dict[tuple[str, str], float]:
    """auto-circuit's PruneScores -> {(upstream, downstream): score} in our names (values unchanged;
    with kv_heads="kv" the query heads sharing a KV head are summed). `grouped`: whether the
    caller's model was a grouped-query one (the wrapped copy is always ungrouped)."""
    cfg = patchable.wrapped_model.cfg
    grouped = _grouped(cfg) if grouped is None else grouped
    kv_heads = kv_heads or ("kv" if grouped else "query")
    group = cfg.n_heads // (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    if kv_heads == "kv" and group == 1:
        kv_heads = "query"  # no grouping: "L{l}H{h}.k" as core.circuits names them
    out: dict[tuple[str, str], float] = {}
    for edge in patchable.edges:
        key = (_src_name(edge.src.name), _dest_name(edge.dest.name, group, kv_heads))
        out[key] = out.get(key, 0.0) + edge.prune_score(prune_scores).item()
    return out


def eap_scores(model, clean_tokens: Tokens, corrupted_tokens: Tokens, answers, wrongs,
               kv_heads: Literal["query", "kv"] | None = None) -> dict[tuple[str, str], float]:
    """auto-circuit's EAP score of every edge, keyed (upstream, downstream) in our names.

    score(U→D) = Σ_{prompts, positions} (a_U^clean − a_U^corrupted) · ∂M/∂(input of D) on the clean run,
    M = mean over prompts of logit[answer] − logit[wrong] at the last position.
    answers / wrongs: one token id per prompt ([batch]) or several ([batch, k], averaged as auto-circuit does).
    kv_heads: on grouped-query models, "kv" (the default there) keys k/v inputs per KV head
    ("L{l}KV{g}.k"), "query" per query head ("L{l}H{h}.k"); see the module docstring.
    """
    patchable = wrap(model)
    return convert(patchable, raw_scores(patchable, loader(patchable, clean_tokens, corrupted_tokens, answers, wrongs)),
                   kv_heads, _grouped(model.cfg))


def timed_eap(model, clean_tokens: Tokens, corrupted_tokens: Tokens, answers, wrongs, repeats: int = 5,
              warmup: int = 1, kv_heads: Literal["query", "kv"] | None = None, return_wrap_seconds: bool = False):
    """(scores, median seconds of auto-circuit's EAP over `repeats` runs after `warmup` untimed ones).

    Timed: `mask_gradient_prune_scores` alone (one corrupted forward pass under inference_mode to
    collect the patch activations, one clean forward + backward with the masks). Not timed: the
    one-time `wrap` (deep copy + `patchable_model`) and the conversion to our names. With
    return_wrap_seconds=True returns (scores, median_seconds, wrap_seconds).
    """
    start = time.perf_counter()
    patchable = wrap(model)
    wrap_seconds = time.perf_counter() - start
    data = loader(patchable, clean_tokens, corrupted_tokens, answers, wrongs)
    sync = torch.cuda.synchronize if next(patchable.parameters()).is_cuda else (lambda: None)
    for _ in range(warmup):
        raw_scores(patchable, data)
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        prune_scores = raw_scores(patchable, data)
        sync()
        seconds.append(time.perf_counter() - start)
    scores = convert(patchable, prune_scores, kv_heads, _grouped(model.cfg))
    median = statistics.median(seconds)
    return (scores, median, wrap_seconds) if return_wrap_seconds else (scores, median)
