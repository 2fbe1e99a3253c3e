"""Load a model: the one entry point is `load_model(name_or_path)`.

It returns a TransformerLens `HookedTransformer` for
- an embedded zoo model, by name, from `assets/models/<name>/` (`hooked_config.json`,
  `model.safetensors`, `tokenizer.json`);
- a TransformerLens pretrained name (`gpt2-small`, `pythia-70m-deduped`, ...), downloaded from
  the Hugging Face hub; when the hub cannot be reached this fails within about a second with a
  `ModelLoadError` naming the model and the embedded ones;
- a local Hugging Face checkpoint directory of the GPT-2 family.

TransformerLens 3.9 marks HookedTransformer deprecated in favour of TransformerBridge. We keep
HookedTransformer (sae_lens's HookedSAETransformer, `transformer_lens.patching` and
`head_detector` take it); this module is the only place that makes that choice.
"""
from __future__ import annotations

import json
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from core.paths import ZOO_DIR, hub_offline, hub_reachable

if TYPE_CHECKING:  # torch and TransformerLens load in seconds: only when a model is loaded
    from transformer_lens import HookedTransformer

DEFAULT_MODEL = "ce-induction-2l"
CONFIG_FILE = "hooked_config.json"  # not config.json: that name confuses AutoTokenizer
WEIGHTS_FILE = "model.safetensors"
MAX_NAME_CHARS = 1024  # longer than any path this machine accepts; a name beyond it is a mistake


class ModelLoadError(Exception):
    """A model could not be loaded; the message is meant for the person who asked for it."""


def zoo_models() -> list[str]:
    """Names of the embedded models, default first."""
    names = sorted(p.name for p in ZOO_DIR.iterdir() if (p / CONFIG_FILE).exists()) if ZOO_DIR.exists() else []
    if DEFAULT_MODEL in names:
        names.remove(DEFAULT_MODEL)
        names.insert(0, DEFAULT_MODEL)
    return names


def _zoo_hint() -> str:
    names = zoo_models()
    return f"Embedded models that work offline: {', '.join(names)}." if names else "No embedded models found."


def load_model(name_or_path: str, device: str = "cpu") -> HookedTransformer:
    """A HookedTransformer for a zoo name, a TransformerLens pretrained name or a local HF dir."""
    name = (name_or_path or "").strip()
    if not name:
        raise ModelLoadError("No model name given. " + _zoo_hint())
    if "\0" in name or len(name) > MAX_NAME_CHARS:
        shown = name.replace("\0", "\\0")
        raise ModelLoadError(
            f"'{shown[:60]}{'…' if len(shown) > 60 else ''}' is not a model name or a folder path "
            f"({len(name)} characters{', with a NUL byte' if chr(0) in name else ''}). {_zoo_hint()}"
        )
    if "/" not in name and _is_dir(ZOO_DIR / name):
        model = _load_zoo(ZOO_DIR / name, device)
        key = f"zoo:{name}"
    elif _is_dir(Path(name).expanduser()):
        path = Path(name).expanduser().resolve()
        model = _load_zoo(path, device) if (path / CONFIG_FILE).exists() else _load_hf_dir(path, device)
        key = f"path:{path}"
    else:
        model = _load_pretrained(name, device)
        key = f"pretrained:{name}"
    model.eval()
    # The load name says what it is; the token keeps a reloaded (say, retrained) model from
    # being served the activations of the object it replaced.
    model._circuit_explorer_key = f"{key}#{uuid.uuid4().hex[:8]}"
    return model


def _is_dir(path: Path) -> bool:
    """Path.is_dir, False where the OS refuses the name (too long for a file name, say)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _load_zoo(model_dir: Path, device: str) -> HookedTransformer:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    name = model_dir.name
    for needed in (CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"):
        if not (model_dir / needed).exists():
            raise ModelLoadError(f"Model '{name}' is incomplete: {needed} is missing from {model_dir}.")
    try:
        cfg_dict = json.loads((model_dir / CONFIG_FILE).read_text())
        cfg = HookedTransformerConfig(**cfg_dict, device=device)
    except (json.JSONDecodeError, TypeError, ValueError, AssertionError) as err:
        raise ModelLoadError(f"Model '{name}': {CONFIG_FILE} is corrupt ({err}).") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # tokenizers raises several exception types for bad files
        raise ModelLoadError(f"Model '{name}': tokenizer files are corrupt ({err}).") from err
    try:
        state = load_file(str(model_dir / WEIGHTS_FILE), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"Model '{name}': {WEIGHTS_FILE} is corrupt ({err}).") from err
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"Model '{name}': weights do not match its config ({err}).") from err
    return model.to(device)


def _is_cached(official_name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(official_name, "config.json")
    return isinstance(hit, str)


def _load_pretrained(name: str, device: str) -> HookedTransformer:
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        raise ModelLoadError(
            f"Unknown model '{name}': not an embedded model, not a local folder and not a "
            f"TransformerLens pretrained name (e.g. gpt2-small). {_zoo_hint()}"
        ) from None
    cached = _is_cached(official)
    reachable = hub_reachable()
    if not cached and not reachable:
        raise ModelLoadError(
            f"Cannot download '{name}' ({official}): the Hugging Face hub is not reachable from "
            f"this machine (offline?). {_zoo_hint()}"
        )
    try:
        # Offline with a cached copy: load it without the hub's retries (minutes otherwise).
        with hub_offline(cached and not reachable), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer.from_pretrained_no_processing(name, device=device)
    except Exception as err:
        raise ModelLoadError(f"Could not load '{name}' ({official}): {err}") from err
    return _process(model)


def _process(model: HookedTransformer) -> HookedTransformer:
    """Fold LayerNorms, centre writing weights and the unembedding, fold value biases: what
    `HookedTransformer.from_pretrained` does, but on the loaded model's own parameters.

    Processing the converted state dict instead (as `from_pretrained` does) is unsafe for models
    with tied embeddings: there W_U and W_E can be views of one tensor, and a fold that writes
    into one writes into the other. A loaded HookedTransformer keeps them as separate parameters.
    """
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    # The exceptions `from_pretrained` makes, which `process_weights_` does not: shortformer models
    # add positions to queries and keys only (nothing to fold or centre them into), post-norm
    # models cannot fold their norms, and a logit soft cap is not invariant to centring W_U.
    shortformer = cfg.positional_embedding_type == "shortformer"
    post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES
    model.process_weights_(
        fold_ln=not (shortformer or post_norm),
        center_writing_weights=not (shortformer or post_norm),
        center_unembed=not (shortformer or softcap_enabled(cfg.output_logits_soft_cap)),
    )
    return model


@contextmanager
def _config_dir_with_n_ctx(path: Path):
    """A folder whose config.json has `n_ctx`, which TL's GPT-2 config conversion reads.

    Hub GPT-2 configs carry it; configs saved by transformers 5 only have `n_positions`.
    """
    cfg = json.loads((path / "config.json").read_text())
    if "n_ctx" in cfg:
        yield path
        return
    cfg["n_ctx"] = cfg.get("n_positions", 1024)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        yield Path(tmp)


def _load_hf_dir(path: Path, device: str) -> HookedTransformer:
    """A local Hugging Face GPT-2-family checkpoint, converted with TL's own loading helpers.

    `HookedTransformer.from_pretrained` only accepts official names, so we do its steps here:
    TL config from the folder's config.json, weights converted by TL, the usual processing.
    """
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ModelLoadError(f"'{path}' is a folder but holds no config.json (not a Hugging Face checkpoint).")
    try:
        arch = (json.loads((path / "config.json").read_text()).get("architectures") or ["?"])[0]
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"'{path}/config.json' is corrupt ({err}).") from err
    if arch != "GPT2LMHeadModel":
        raise ModelLoadError(f"'{path}' holds a {arch}; local checkpoints of the GPT-2 family are supported.")
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        with _config_dir_with_n_ctx(path) as config_dir:
            cfg = loading.get_pretrained_model_config(str(config_dir), fold_ln=False, device=device)
        cfg.model_name = path.name
        state = loading.get_pretrained_state_dict(str(path), cfg, hf_model)
    except Exception as err:
        raise ModelLoadError(f"Could not read the checkpoint in '{path}': {err}") from err
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    # Load as converted, then process the model's own (untied) parameters: see `_process`.
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return _process(model).to(device)
