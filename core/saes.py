"""Sparse autoencoders (sae_lens): load, check against a model, encode, explain, intervene.

Three sources, each returning a `LoadedSAE`:
- **embedded**: `assets/saes/<name>/`, trained by `core.zoo.train_sae` on a zoo model, in
  sae_lens's disk format (`cfg.json`, `sae_weights.safetensors`) plus `metrics.json` (model,
  corpus spec, measured quality) and `SAE_CARD.md`;
- **local**: any folder in sae_lens's disk format (`SAE.load_from_disk`);
- **pretrained**: a release and SAE id from sae_lens's registry, downloaded from the Hugging
  Face hub; offline (and not cached) this fails within about a second with `SAELoadError`.

Shapes: `acts` are the hooked activations `[batch, pos, d_in]` (or `[batch, pos, head, d_head]`
for hook_z SAEs); feature activations are `[batch, pos, d_sae]`.
"""
from __future__ import annotations

import errno
import functools
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from core import store
from core.attribution import direct_logit_weight_on, direct_logit_weights
from core.paths import SAE_DIR, hub_offline, hub_reachable

METRICS_FILE = "metrics.json"
CARD_FILE = "SAE_CARD.md"
CFG_FILE = "cfg.json"  # sae_lens's names
WEIGHTS_FILE = "sae_weights.safetensors"


class SAELoadError(Exception):
    """An SAE could not be loaded or does not fit the model; the message is for the user."""


@dataclass
class LoadedSAE:
    sae: "sae_lens.SAE"  # noqa: F821
    sae_id: str  # embedded name, folder path, or "release / sae id"
    source: str  # "embedded", "local" or "pretrained"
    card: dict | None = None  # metrics.json of an embedded SAE

    @property
    def hook_name(self) -> str:
        return hook_name(self.sae)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def corpus_spec(self) -> dict | None:
        return (self.card or {}).get("corpus")


def hook_name(sae) -> str:
    return sae.cfg.metadata.hook_name


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def embedded_saes(model_name: str | None = None) -> list[str]:
    """Names of the embedded SAEs (of `model_name` only, if given), sorted."""
    if not SAE_DIR.exists():
        return []
    out = []
    for d in sorted(SAE_DIR.iterdir()):
        meta = d / METRICS_FILE
        if (d / CFG_FILE).exists() and meta.exists():
            if model_name is None or json.loads(meta.read_text()).get("model") == model_name:
                out.append(d.name)
    return out


def _load_disk(path: Path):
    from sae_lens import SAE

    return SAE.load_from_disk(str(path), device="cpu")


def load_embedded(name: str) -> LoadedSAE:
    path = SAE_DIR / name
    if not (path / CFG_FILE).exists():
        raise SAELoadError(f"No embedded SAE named '{name}'. Embedded SAEs: {', '.join(embedded_saes()) or 'none'}.")
    loaded = load_local(path)
    return LoadedSAE(loaded.sae, name, "embedded", json.loads((path / METRICS_FILE).read_text()))


def load_local(path: str | Path) -> LoadedSAE:
    """An SAE folder in sae_lens's disk format (`cfg.json` + `sae_weights.safetensors`)."""
    text = str(path).strip()
    if not text:
        raise SAELoadError("Type the path of a folder that holds an SAE in sae_lens's format (cfg.json, sae_weights.safetensors).")
    shown = text if len(text) <= 120 else text[:100] + f"… ({len(text):,} characters)"
    if "\x00" in text:
        raise SAELoadError(f"The folder path '{shown.replace(chr(0), '␀')}' contains a NUL character (\\x00), which no "
                           "file or folder name can hold. Type the path again.")
    try:
        p = Path(text).expanduser()
        exists = p.exists()
        is_dir = exists and p.is_dir()
        missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if not (p / f).exists()] if is_dir else []
    except (OSError, ValueError) as err:  # a name over 255 bytes, a path over 4,096, a folder we may not read
        if getattr(err, "errno", None) == errno.ENAMETOOLONG:
            reason = "it is too long for this machine's file system (at most 255 characters per name, 4,096 in all)"
        else:
            reason = f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
        raise SAELoadError(f"Cannot use the folder path '{shown}': {reason}.") from err
    if not exists:
        raise SAELoadError(f"There is no folder '{shown}' on this machine.")
    if not is_dir:
        raise SAELoadError(f"'{shown}' is a file; give the folder that holds cfg.json and sae_weights.safetensors.")
    if missing:
        raise SAELoadError(f"'{shown}' is not an SAE in sae_lens's disk format: {' and '.join(missing)} missing.")
    try:
        sae = _load_disk(p)
    except Exception as err:  # a corrupt or foreign file: say what sae_lens said
        raise SAELoadError(f"Could not read the SAE in '{shown}' (corrupt or not sae_lens's format): {_short(err)}") from err
    return LoadedSAE(sae.eval(), str(p), "local")


def _short(err: Exception, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + "…"


_directory_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _directory() -> dict:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def pretrained_directory() -> dict:
    """sae_lens's registry of pretrained SAEs (packaged with sae_lens: no network needed)."""
    with _directory_lock:
        return _directory()


def _official(name: str) -> str | None:
    from transformer_lens import loading_from_pretrained as loading

    try:
        return loading.get_official_model_name(name)
    except ValueError:
        return None


def pretrained_for_model(model: HookedTransformer) -> dict[str, list[str]]:
    """{release: [sae ids]} of the registry's SAEs made for this model (by official TL name)."""
    mine = _official(model.cfg.model_name) or model.cfg.model_name
    out = {}
    for release, entry in pretrained_directory().items():
        theirs = _official(entry.model) or entry.model
        if theirs == mine:
            out[release] = list(entry.saes_map)
    return out


def load_pretrained(release: str, sae_id: str) -> LoadedSAE:
    """A pretrained SAE from sae_lens's registry; fast, clear failure offline."""
    directory = pretrained_directory()
    if release not in directory:
        raise SAELoadError(f"Unknown SAE release '{release}': it is not in sae_lens's registry.")
    if sae_id not in directory[release].saes_map:
        raise SAELoadError(f"Release '{release}' has no SAE '{sae_id}'.")
    from sae_lens import SAE

    reachable = hub_reachable()
    try:
        with hub_offline(not reachable):
            sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as err:
        if not reachable:
            raise SAELoadError(
                f"Cannot download SAE '{sae_id}' of '{release}': the Hugging Face hub is not reachable from this "
                "machine (offline?) and it is not in the local cache. Embedded SAEs work offline."
            ) from err
        raise SAELoadError(f"Could not load SAE '{sae_id}' of '{release}': {_short(err)}") from err
    return LoadedSAE(sae.eval(), f"{release} / {sae_id}", "pretrained")


def hook_shape(model: HookedTransformer, name: str) -> tuple[int, ...]:
    """Trailing shape (after [batch, pos]) of the activation at hook `name` on this model."""
    shape: list[tuple[int, ...]] = []

    def grab(act, hook):
        shape.append(tuple(act.shape[2:]))

    bos = model.tokenizer.bos_token_id if model.tokenizer is not None and model.tokenizer.bos_token_id is not None else 0
    store.run_with_hooks(model, torch.tensor([[bos]]), [(name, grab)])
    return shape[0]


def check_fits(model: HookedTransformer, loaded: LoadedSAE) -> None:
    """Raise SAELoadError unless the SAE reads a hook this model has, with the right width, and
    encodes and decodes an activation of this model back to its shape."""
    name = loaded.hook_name
    if name not in model.hook_dict:
        raise SAELoadError(
            f"The SAE reads '{name}', which {model.cfg.model_name} does not have "
            f"({model.cfg.n_layers} layers). It was made for another model."
        )
    if getattr(loaded.sae.cfg.metadata, "hook_head_index", None) is not None:
        raise SAELoadError(f"The SAE reads one head of '{name}' (hook_head_index); this page reads whole hooks only.")
    shape = hook_shape(model, name)
    width = math.prod(shape)
    d_in = int(loaded.sae.cfg.d_in)
    if d_in != width and (len(shape) != 1 or d_in != shape[0]):
        raise SAELoadError(
            f"The SAE expects {d_in} numbers per token at '{name}', but {model.cfg.model_name} has "
            f"{width} there ({' × '.join(map(str, shape))}). It was made for another model."
        )
    probe = torch.zeros(1, 1, *shape)
    try:
        with torch.inference_mode():
            out = loaded.sae.decode(encode(loaded.sae, probe))
        if tuple(out.shape) != tuple(probe.shape):
            raise ValueError(f"decoded shape {tuple(out.shape)} is not the activation's {tuple(probe.shape)}")
    except Exception as err:
        hint = " (a hook_z SAE needs reshape_activations = 'hook_z' in its cfg.json)" if name.endswith("hook_z") else ""
        raise SAELoadError(f"The SAE cannot read '{name}' of {model.cfg.model_name}{hint}: {_short(err)}") from err


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def encode(sae, acts: torch.Tensor) -> torch.Tensor:
    """Feature activations [..., d_sae] of hooked activations (sae_lens's own `encode`)."""
    return sae.encode(acts.to(sae.W_enc.dtype))


def prompt_features(model: HookedTransformer, loaded: LoadedSAE, cache) -> torch.Tensor:
    """[pos, d_sae] feature activations of the first prompt of a cached run (a normal tensor)."""
    return encode(loaded.sae, cache[loaded.hook_name][0]).clone()


def top_features_per_token(acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """acts [pos, d_sae] -> (values [pos, k], feature ids [pos, k]), strongest first."""
    k = min(k, acts.shape[-1])
    return acts.topk(k, dim=-1)


def decoder_to_residual(model: HookedTransformer, sae) -> torch.Tensor | None:
    """[d_sae, d_model]: each feature's decoder direction as written into the residual stream.

    Residual-stream, attn_out and mlp_out SAEs write d_model directly; hook_z SAEs go through
    W_O; hook_post (MLP neuron) SAEs through W_out. Other hooks (q, k, v, patterns), and hook_z /
    hook_post SAEs on models that normalise each layer's output (their direction in the stream
    depends on the run's scale): None.
    """
    name = hook_name(sae)
    W = sae.W_dec.detach()
    if W.shape[-1] == model.cfg.d_model and not name.endswith(("hook_z", "hook_post", "hook_q", "hook_k", "hook_v")):
        return W
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
    if layer is None:
        return None
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if model.cfg.use_normalization_before_and_after or model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return None  # a norm follows the layer (Gemma 2/3, OLMo 2/3): no fixed direction in the stream
    if name.endswith("attn.hook_z"):
        W_O = model.blocks[layer].attn.W_O.detach()  # [head, d_head, d_model]
        return torch.einsum("fhd,hdm->fm", W.reshape(W.shape[0], *W_O.shape[:2]), W_O)
    if name.endswith("mlp.hook_post"):
        return W @ model.blocks[layer].mlp.W_out.detach()
    return None


def logit_effects(model: HookedTransformer, sae, feature: int) -> torch.Tensor | None:
    """[d_vocab]: the feature's decoder direction through the final LayerNorm and the unembedding.

    The direct path only: `attribution.direct_logit_weights(W_dec[f])`, the convention of the
    neuron view (centred and times the final LayerNorm's weight on an unfolded model, which
    SAE dashboards get by reading folded pretrained models: there W_U carries both).
    """
    W = decoder_to_residual(model, sae)
    if W is None:
        return None
    return direct_logit_weights(model, W[feature])


def features_promoting(model: HookedTransformer, sae, token: int) -> torch.Tensor | None:
    """[d_sae]: every feature's direct logit effect on one token (as `logit_effects`)."""
    W = decoder_to_residual(model, sae)
    if W is None:
        return None
    return direct_logit_weight_on(model, W.detach(), token)


def check_feature(loaded: LoadedSAE, feature: int) -> None:
    if not 0 <= int(feature) < loaded.d_sae:
        raise SAELoadError(f"Feature {feature} does not exist: this SAE has features 0–{loaded.d_sae - 1}.")


def feature_hook(sae, feature: int, scale: float):
    """A TL hook that multiplies one feature's activation by `scale` (0 ablates it).

    act -> act + decode(f with f[feature] scaled) - decode(f), f = encode(act): the SAE's
    reconstruction error stays in, and every other feature is untouched. For a plain linear
    decoder the change is (scale - 1) · f[feature] · W_dec[feature]; decoders that rescale their
    output (sae_lens's normalised SAEs) are handled by decoding both.
    """

    def hook(act, hook):
        f = sae.encode(act.to(sae.W_enc.dtype))
        scaled = f.clone()
        scaled[..., feature] = scaled[..., feature] * scale
        return act + (sae.decode(scaled) - sae.decode(f)).reshape(act.shape).to(act.dtype)

    return hook


def run_with_feature(model: HookedTransformer, loaded: LoadedSAE, tokens: torch.Tensor, feature: int,
                     scale: float) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] with one feature scaled (0 = ablated) at the SAE's hook."""
    check_feature(loaded, feature)
    return store.run_with_hooks(model, tokens, [(loaded.hook_name, feature_hook(loaded.sae, feature, scale))])


# ---------------------------------------------------------------------------------------------
# Quality (the card's numbers)
# ---------------------------------------------------------------------------------------------


def doc_batches(docs: list[list[int]], pad: int, size: int):
    """Right-padded batches of documents of similar length: (document ids, tokens [b, pos]).

    Causal attention never lets a real token see the padding after it.
    """
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    for s in range(0, len(order), size):
        ids = order[s : s + size]
        width = max(len(docs[i]) for i in ids)
        yield ids, torch.tensor([docs[i] + [pad] * (width - len(docs[i])) for i in ids])


@torch.inference_mode()
def quality(model: HookedTransformer, sae, docs: list[list[int]], batch: int = 64) -> dict:
    """L0, explained variance, dead features and next-token loss with the SAE spliced in.

    Over every real token but the first (BOS) of each document. The loss is the mean next-token
    cross-entropy over real targets: clean, with the activation replaced by the SAE's
    reconstruction at those tokens, and with it zeroed there (for the share of loss recovered).
    """
    name = hook_name(sae)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    l0 = n = 0
    sq_err = 0.0
    xs = []
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.long)
    losses = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_targets = 0
    for ids, tokens in doc_batches(docs, pad, batch):
        lengths = torch.tensor([len(docs[i]) for i in ids])
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        keep = mask.clone()
        keep[:, 0] = False
        _, cache = store.run_with_cache(model, tokens, names_filter=name)
        x = cache[name][keep]
        f = encode(sae, x)
        xh = sae.decode(f)
        l0 += int((f > 0).sum())
        n += x.shape[0]
        fired += (f > 0).sum(0)
        sq_err += float(((xh - x) ** 2).sum())
        xs.append(x.reshape(x.shape[0], -1))
        targets = tokens[:, 1:]
        tmask = mask[:, 1:]
        n_targets += int(tmask.sum())

        def splice(value):
            def hook(act, hook):
                act = act.clone()
                act[keep] = value(act[keep])
                return act
            return hook

        for key, value in (("clean", None), ("sae", lambda a: sae.decode(encode(sae, a)).to(a.dtype)),
                           ("zero", torch.zeros_like)):
            logits = store.run(model, tokens) if value is None else store.run_with_hooks(model, tokens, [(name, splice(value))])
            logp = logits[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            losses[key] += float(-(logp[tmask]).sum())
    X = torch.cat(xs)
    var = float(((X - X.mean(0)) ** 2).sum())
    ce = {k: v / n_targets for k, v in losses.items()}
    recovered = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]) if ce["zero"] != ce["clean"] else float("nan")
    return {
        "tokens": n,
        "l0": l0 / n,
        "explained_variance": 1.0 - sq_err / var,
        "dead_features": int((fired == 0).sum()),
        "ce_loss_clean": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_zero_ablated": ce["zero"],
        "loss_recovered": recovered,
    }


def documents_from_text(model: HookedTransformer, text: str, max_docs: int = 20000) -> list[list[int]]:
    """A text corpus as token documents: each non-empty line is one document (BOS first), cut to
    the model's context. Raises SAELoadError when nothing is left."""
    lines = [line.strip() for line in (text or "").splitlines()]
    lines = [line for line in lines if line][:max_docs]  # the caller says how many documents it got
    docs = []
    for line in lines:
        tokens = store.to_tokens(model, line)[0, : model.cfg.n_ctx].tolist()
        if len(tokens) > 1:
            docs.append(tokens)
    if not docs:
        raise SAELoadError("The corpus is empty: the file has no line of text to read.")
    return docs
