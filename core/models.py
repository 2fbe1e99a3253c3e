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
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from core import checkpoints
from core.paths import ZOO_DIR, data_dir, hub_offline, hub_reachable

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


def unembed_row_major(model: HookedTransformer) -> HookedTransformer:
    """Keep W_U [d_model, d_vocab] as the transpose of a contiguous [d_vocab, d_model] tensor.

    TransformerLens 3.9's `Unembed.forward` is `F.linear(x, W_U.T.contiguous(), b_U)`: with W_U
    stored row-major that copies the whole unembedding on every forward pass (150 MB on GPT-2
    small, about a third of a 32-token pass on a CPU). Stored this way `.contiguous()` is free and
    F.linear gets the very tensor it got before: the same values in the same layout, so the same
    logits to the bit. Every other use of `model.W_U` reads the same values. A W_U that is already
    such a view (of a tied W_E, say) is left as it is.
    """
    import torch

    unembed = getattr(model, "unembed", None)
    w = getattr(unembed, "W_U", None)
    if isinstance(w, torch.nn.Parameter) and w.dim() == 2 and not w.T.is_contiguous():
        with torch.no_grad():
            unembed.W_U = torch.nn.Parameter(w.detach().T.contiguous().T, requires_grad=w.requires_grad)
    return model


def resolve_device(device: str = "auto") -> str:
    """"auto" → "cuda" when a GPU is present, else "cpu"; anything else as given."""
    device = (device or "auto").strip()
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModelLoadError(f"Device '{device}' was asked for, but this machine has no CUDA GPU. Use 'cpu' or 'auto'.")
    elif device != "cpu":
        raise ModelLoadError(f"Unknown device '{device}': use 'auto', 'cpu' or 'cuda'.")
    return device


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "float32") -> HookedTransformer:
    """A HookedTransformer for a zoo name, a local Hugging Face checkpoint folder, a model in the
    Hugging Face cache (by its hub id) or a TransformerLens pretrained name.

    `device`: "cpu", "cuda" or "auto" (CUDA when present). `dtype`: "float32" or "bfloat16"
    (Hugging Face checkpoints; the zoo models are float32).
    """
    name = (name_or_path or "").strip()
    if not name:
        raise ModelLoadError("No model name given. " + _zoo_hint())
    if "\0" in name or len(name) > MAX_NAME_CHARS:
        shown = name.replace("\0", "\\0")
        raise ModelLoadError(
            f"'{shown[:60]}{'…' if len(shown) > 60 else ''}' is not a model name or a folder path "
            f"({len(name)} characters{', with a NUL byte' if chr(0) in name else ''}). {_zoo_hint()}"
        )
    if dtype not in checkpoints.DTYPES:
        raise ModelLoadError(f"Unknown precision '{dtype}': use one of {', '.join(checkpoints.DTYPES)}.")
    device = resolve_device(device)
    if "/" not in name and _is_dir(ZOO_DIR / name):
        model = _load_zoo(ZOO_DIR / name, device)
        key = f"zoo:{name}"
    elif _is_dir(Path(name).expanduser()):
        path = Path(name).expanduser().resolve()
        if (path / CONFIG_FILE).exists():
            model = _load_zoo(path, device)
        else:
            model = _load_hf_dir(path, device, dtype)
        key = f"path:{path}"
    else:
        model = _load_hub(name, device, dtype)
        key = f"hub:{name}"
    model.eval()
    unembed_row_major(model)
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


def _load_zoo(model_dir: Path, device: str, label: str | None = None) -> HookedTransformer:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    name = label or model_dir.name
    for needed in (CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"):
        if not (model_dir / needed).exists():
            raise ModelLoadError(f"Model '{name}' is incomplete: {needed} is missing from {model_dir}.")
    try:
        cfg_dict = json.loads((model_dir / CONFIG_FILE).read_text())
        if isinstance(cfg_dict.get("dtype"), str):
            cfg_dict["dtype"] = getattr(torch, cfg_dict["dtype"])
        cfg = HookedTransformerConfig(**cfg_dict, device=device)
    except (json.JSONDecodeError, TypeError, ValueError, AssertionError) as err:
        raise ModelLoadError(f"Model '{name}': {CONFIG_FILE} is corrupt ({err}).") from err
    try:
        tokenizer = load_tokenizer(model_dir)
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


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id`'s newest snapshot in the local Hugging Face cache, if it has the
    config and weights (a config or tokenizer fetched alone, say by AutoTokenizer, is not a model)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed repo id
        return None
    if not isinstance(hit, str):
        return None
    folder = Path(hit).parent
    try:
        return folder if checkpoints.weight_files(folder) else None
    except checkpoints.CheckpointError:
        return folder  # a damaged index: the load says so


def cached_hub_models() -> list[str]:
    """Hub ids of the causal LMs of a supported architecture in this machine's Hugging Face cache
    (they load offline by that name), sorted."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE)
    out = []
    try:
        repos = sorted(root.glob("models--*"))
    except OSError:
        return []
    for repo in repos:
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        folder = _cached_snapshot(repo_id)
        try:
            if folder is None or not checkpoints.weight_files(folder):
                continue
            checkpoints.architecture(folder)
        except (checkpoints.CheckpointError, OSError):
            continue  # damaged or not a causal LM the app loads: not offered
        out.append(repo_id)
    return out


# Weight files a causal LM checkpoint needs, and the files a tokenizer needs (not ONNX, Flax, ...)
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt"]


def _load_hub(name: str, device: str, dtype: str) -> HookedTransformer:
    """A model by name from the Hugging Face hub, or from the local cache of it when offline.

    A TransformerLens pretrained name (`gpt2-small`) goes through TL's `from_pretrained`, which
    knows each official model's quirks; any other hub id (`org/model`) of a supported
    architecture is downloaded (or found in the cache) and loaded as a folder (`_load_hf_dir`).
    """
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        official = None
    if official is not None:
        return _load_pretrained(name, official, device, dtype)
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise ModelLoadError(
            f"Unknown model '{name}': not an embedded model, not a local folder, not a Hugging Face hub "
            f"id (org/model) and not a TransformerLens pretrained name (e.g. gpt2-small). {_zoo_hint()}"
        )
    folder = _cached_snapshot(name)
    if folder is None:
        if not hub_reachable():
            raise ModelLoadError(
                f"Cannot download '{name}': it is not in this machine's Hugging Face cache and the hub "
                f"is not reachable (offline?). {_zoo_hint()}"
            )
        folder = _download(name)
    return _load_hf_dir(folder, device, dtype, name=name)


# TL pretrained names whose checkpoints are not Hugging Face model folders (TL reads them itself).
NON_HF_FORMAT = ("NeelNanda/", "ArthurConmy/", "Baidicoot/")


def _download(repo_id: str) -> Path:
    """The checkpoint's config, tokenizer and safetensors weights, into the Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise ModelLoadError(
            f"'{repo_id}' is gated on the Hugging Face hub: accept its licence there and set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"Unknown model '{repo_id}': the Hugging Face hub has no such repository.") from None
    except Exception as err:
        raise ModelLoadError(f"Could not download '{repo_id}': {err}") from err


def _load_pretrained(name: str, official: str, device: str, dtype: str) -> HookedTransformer:
    import torch
    from transformer_lens import HookedTransformer

    snapshot = _cached_snapshot(official)
    reachable = hub_reachable()
    if snapshot is None and not reachable:
        raise ModelLoadError(
            f"Cannot download '{name}' ({official}): the Hugging Face hub is not reachable from "
            f"this machine (offline?). {_zoo_hint()}"
        )
    if snapshot is None and not official.startswith(NON_HF_FORMAT):
        # Download the checkpoint first, so its size is checked before anything is built from it.
        snapshot = _download(official)
    key = None
    if snapshot is not None and checkpoints.weight_files(snapshot):
        try:
            plan = checkpoints.memory_plan(snapshot, dtype, device, store_cap_bytes())
            key = checkpoints.weights_key(snapshot, converted_root())
        except (checkpoints.CheckpointError, OSError) as err:
            raise ModelLoadError(f"Could not read the cached copy of '{name}' ({official}): {err}") from err
        if not plan.fits:
            raise ModelLoadError(f"'{name}' does not fit: {plan.message()}")
        cached = _converted_dir(key, dtype)
        if (cached / CONFIG_FILE).exists():
            try:
                model = _load_zoo(cached, device, label=name)
                model.cfg.model_name = official.split("/")[-1]  # as TL names it
                model._circuit_explorer_weights_key = key
                return model
            except ModelLoadError:
                shutil.rmtree(cached, ignore_errors=True)
    try:
        # Offline with a cached copy: load it without the hub's retries (minutes otherwise).
        with hub_offline(snapshot is not None and not reachable), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HookedTransformer.from_pretrained_no_processing(
                name, device=device, dtype=getattr(torch, dtype)
            )
    except Exception as err:
        raise ModelLoadError(f"Could not load '{name}' ({official}): {err}") from err
    model = _process(model)
    if key is not None and snapshot is not None:
        _save_converted(model, _converted_dir(key, dtype), snapshot)
        model._circuit_explorer_weights_key = key
    return model


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
    flags = dict(
        fold_ln=not (shortformer or post_norm),
        center_writing_weights=not (shortformer or post_norm),
        center_unembed=not (shortformer or softcap_enabled(cfg.output_logits_soft_cap)),
    )
    if getattr(cfg, "use_attention_sinks", False):
        # `process_weights_` always folds the value biases into b_O, which assumes each query's
        # attention weights sum to 1; an attention sink takes a share of them (gpt-oss), so the
        # fold changes the output. Process a copy of the weights (own tensors: no tied views)
        # without that fold.
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_and_process_state_dict(state, fold_value_biases=False, **flags)
        return model
    model.process_weights_(**flags)
    return model


def _load_hf_dir(path: Path, device: str, dtype: str = "float32", name: str | None = None) -> HookedTransformer:
    """A local Hugging Face causal LM checkpoint of any architecture in
    `checkpoints.ARCHITECTURES`, converted with TL's own helpers.

    `HookedTransformer.from_pretrained` only accepts official names, so we do its steps here: TL
    config from the folder's config.json, the weights converted by TL's converter for that
    architecture, the tokenizer from the folder, the usual processing. The result is kept on
    disk (`_converted_dir`), keyed by a hash of the weights, so a second start skips it all.
    """
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    try:
        checkpoints.architecture(path)
        plan = checkpoints.memory_plan(path, dtype, device, store_cap_bytes())
    except checkpoints.CheckpointError as err:
        raise ModelLoadError(str(err)) from err
    if not plan.fits:
        raise ModelLoadError(f"'{name or path.name}' does not fit: {plan.message()}")
    _check_tokenizer_files(path)
    try:
        key = checkpoints.weights_key(path, converted_root())
    except OSError as err:
        raise ModelLoadError(f"Could not read the checkpoint in '{path}': {err}") from err
    cached = _converted_dir(key, dtype)
    if (cached / CONFIG_FILE).exists():
        try:
            model = _load_zoo(cached, device, label=name or path.name)
            model.cfg.model_name = name or path.name  # this request's name, not the first load's
            model._circuit_explorer_weights_key = key
            return model
        except ModelLoadError:
            shutil.rmtree(cached, ignore_errors=True)  # a damaged cache entry: convert again
    torch_dtype = getattr(torch, dtype)
    try:
        cfg = checkpoints.tl_config(path, device, torch_dtype, name=name or path.name)
    except checkpoints.CheckpointError as err:
        raise ModelLoadError(str(err)) from err
    except Exception as err:
        raise ModelLoadError(f"Could not read the config of '{path}': {err}") from err
    tokenizer = _folder_tokenizer(path)
    probe = torch.arange(PROBE_TOKENS)[None] % cfg.d_vocab
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        with torch.no_grad():
            reference = hf_model(probe).logits.float().log_softmax(-1)
        state = loading.get_pretrained_state_dict(str(path), cfg, hf_model)
    except Exception as err:
        raise ModelLoadError(f"Could not read the checkpoint in '{path}': {err}") from err
    del hf_model
    try:
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        # Load as converted, then process the model's own (untied) parameters: see `_process`.
        model.load_and_process_state_dict(
            state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
        )
        del state
        _gates_in_model_dtype(model)
        model = _process(model)
        with torch.no_grad():
            ours = model(probe).float().log_softmax(-1)
    except Exception as err:
        raise ModelLoadError(f"Could not convert the checkpoint in '{path}' to TransformerLens: {err}") from err
    _verify(ours, reference, dtype, path)
    model = model.to(device)
    _save_converted(model, cached, path)
    model._circuit_explorer_weights_key = key
    return model


# The converted model must give transformers' log-probabilities on a short probe before it is
# used or kept: a config option TransformerLens does not convert (Llama's attention_bias, Phi's
# qk_layernorm, Qwen2's sliding window, Phi-3's longrope, ...) loads without an error otherwise.
PROBE_TOKENS = 12
PROBE_TOLERANCE = {"float32": 1e-2, "bfloat16": 1.0}


def _verify(ours, reference, dtype: str, path: Path) -> None:
    diff = float((ours - reference).abs().max())
    if not diff <= PROBE_TOLERANCE.get(dtype, 1e-2) and dtype != "float32":
        raise ModelLoadError(
            f"'{path.name}' in {dtype}: its log-probabilities differ from transformers' own {dtype} run by "
            f"{diff:.3g} on a {PROBE_TOKENS}-token probe (allowed {PROBE_TOLERANCE.get(dtype)}). The two round "
            "differently (a mixture-of-experts router can then pick other experts); the app refuses it rather "
            "than show numbers that depend on rounding. Load it in float32 (CIRCUIT_EXPLORER_DTYPE=float32)."
        )
    if not diff <= PROBE_TOLERANCE.get(dtype, 1e-2):  # also catches NaN
        raise ModelLoadError(
            f"'{path.name}' converts to TransformerLens, but not exactly: its log-probabilities differ from "
            f"transformers' by {diff:.3g} on a {PROBE_TOKENS}-token probe (allowed {PROBE_TOLERANCE.get(dtype, 1e-2)} "
            f"in {dtype}). The checkpoint uses an option TransformerLens does not convert (for example attention "
            "or MLP biases on Llama, q/k norms on Phi, Qwen2's sliding window, long-context rope scaling); "
            "the app refuses it rather than show wrong numbers."
        )


def _gates_in_model_dtype(model: HookedTransformer) -> None:
    """TL's mixture-of-experts layers make their router and experts' weights in float32 whatever
    the model's dtype; a bfloat16 model then fails its first forward pass. Cast every floating
    parameter that is not in the model's dtype to it (elsewhere they all are already)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != model.cfg.dtype:
                param.data = param.data.to(model.cfg.dtype)


def _check_tokenizer_files(path: Path) -> None:
    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise ModelLoadError(
            f"'{path}' has no tokenizer (tokenizer.json, vocab.json or tokenizer.model): the app needs "
            "one to turn prompts into tokens. Save it next to the weights (tokenizer.save_pretrained)."
        )


def _folder_tokenizer(path: Path):
    _check_tokenizer_files(path)
    try:
        return load_tokenizer(path)
    except Exception as err:  # tokenizers raises several exception types for bad files
        raise ModelLoadError(f"'{path}': tokenizer files are corrupt ({err}).") from err


GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: Path):
    """The folder's tokenizer. When its tokenizer_config names the generic class (a tokenizer.json
    saved as is), that class reads it: transformers 5's AutoTokenizer would pick the class of the
    config's model type instead (Qwen2Tokenizer for a Qwen2 checkpoint), whose own pre-tokenizer
    then garbles a tokenizer.json made for something else (TL's `get_tokenizer_with_bos` would
    make the same swap when it reloads the tokenizer with a BOS token)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = path / "tokenizer_config.json"
    if (path / "tokenizer.json").exists() and config.exists():
        try:
            cls = json.loads(config.read_text()).get("tokenizer_class")
        except (OSError, json.JSONDecodeError):
            cls = None
        if cls in GENERIC_TOKENIZERS:
            # add_bos_token as TL asks for it; without it TL reloads through AutoTokenizer.
            return PreTrainedTokenizerFast.from_pretrained(str(path), add_bos_token=True)
    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------
# Converted checkpoints on disk
# ---------------------------------------------------------------------------------------------


def store_cap_bytes() -> int:
    from core.store import DEFAULT_MAX_BYTES, MAX_BYTES_ENV

    return int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))


def converted_root() -> Path:
    return data_dir() / "converted"


CONVERT_FORMAT = 2  # bump when `_process` or the saved layout changes: old copies are then not read


def _converted_dir(key: str, dtype: str) -> Path:
    """Where the converted copy of the weights `key` lives: per precision, conversion format and
    TransformerLens version (a fix in either makes a new copy)."""
    import transformer_lens

    version = getattr(transformer_lens, "__version__", "tl")
    return converted_root() / f"{key}-{dtype}-f{CONVERT_FORMAT}-tl{version}"


def _save_converted(model: HookedTransformer, folder: Path, source: Path | None = None) -> None:
    """The processed TL weights and config, in the zoo's format, and the tokenizer files as the
    source folder has them (TL changes a loaded tokenizer, say its BOS; saved after that, it would
    load differently next time). A failure to write (read-only or full disk, anything) only costs
    the next start its conversion."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(_cfg_json(model.cfg)))
        copied = False
        if source is not None:
            for name in (*checkpoints.TOKENIZER_FILES, "config.json"):
                if (source / name).exists():
                    shutil.copyfile(source / name, tmp / name)
                    copied = copied or name != "config.json"
        if not copied and model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except Exception:  # noqa: BLE001 - a cache that could not be written is not an error
        shutil.rmtree(tmp, ignore_errors=True)


def _cfg_json(cfg) -> dict:
    """A HookedTransformerConfig as JSON that `HookedTransformerConfig(**d)` takes back."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init or f.name in ("device", "n_params"):
            continue
        value = getattr(cfg, f.name)
        if f.name == "dtype":
            value = str(value).removeprefix("torch.")
        out[f.name] = value
    return out
