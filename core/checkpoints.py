"""Hugging Face causal LM checkpoints on disk → TransformerLens: which architectures, their TL
config, how much memory a load needs, and a key for the weights.

TransformerLens 3.9's `HookedTransformer` converts the weights of every architecture listed in
`ARCHITECTURES` (its `get_pretrained_state_dict` dispatches on the config's architecture). Its
config mapping (`convert_hf_model_config`) reads the folder's `config.json` for most of them,
but for Gemma 1/2/3 and OLMo 1/2 it only knows hard-coded sizes of the official checkpoints,
chosen by the model's *name*, and for Phi it reads a field transformers 5 moved. For those this
module maps `config.json` to the same fields itself (`_name_only_config`); every other field comes from TL's own helper. TL also picks the
architecture from the name when it contains "llama" or "gemma", so TL reads the config from a
copy in a folder whose name says nothing.

Light at import (no torch): `models` imports it, and so do pages that only list architectures.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# original_architecture (config.json's `architectures[0]`) → what a user calls it
ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "GPT-2",
    "GPTNeoForCausalLM": "GPT-Neo",
    "GPTJForCausalLM": "GPT-J",
    "GPTNeoXForCausalLM": "GPT-NeoX / Pythia",
    "OPTForCausalLM": "OPT",
    "BloomForCausalLM": "Bloom",
    "LlamaForCausalLM": "Llama",
    "MistralForCausalLM": "Mistral",
    "MixtralForCausalLM": "Mixtral (MoE)",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "GemmaForCausalLM": "Gemma",
    "Gemma2ForCausalLM": "Gemma 2",
    "Gemma3ForCausalLM": "Gemma 3 (text)",
    "PhiForCausalLM": "Phi-1/2",
    "Phi3ForCausalLM": "Phi-3",
    "OlmoForCausalLM": "OLMo",
    "Olmo2ForCausalLM": "OLMo 2",
    "Olmo3ForCausalLM": "OLMo 3",
    "OlmoeForCausalLM": "OLMoE (MoE)",
    "ApertusForCausalLM": "Apertus",
    "GptOssForCausalLM": "gpt-oss (MoE, attention sinks)",
}

# Architectures TL knows that this app does not load from a folder, and why.
NOT_SUPPORTED: dict[str, str] = {
    "QWenLMHeadModel": "Qwen 1 needs the checkpoint's own Python code (trust_remote_code), which the app never runs",
    "GPT2LMHeadCustomModel": "SantaCoder needs the checkpoint's own Python code (trust_remote_code), which the app never runs",
    "Gemma3ForConditionalGeneration": "multimodal Gemma 3 (4B and larger) is not supported yet; the text-only 270M and 1B are",
    "BertForMaskedLM": "BERT is a masked language model, not a causal one",
    "T5ForConditionalGeneration": "T5 is an encoder-decoder, not a causal language model",
    "HubertModel": "HuBERT is a speech model",
    "HubertForCTC": "HuBERT is a speech model",
}

# TL's causal mask is an n_ctx × n_ctx buffer in every layer: configs that allow 128k tokens would
# need gigabytes for it. TL caps many official models at 2048 for the same reason; so do we.
MAX_N_CTX = 2048

DTYPES = ("float32", "bfloat16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class CheckpointError(Exception):
    """The folder is not a checkpoint this app can load; the message says why, for a person."""


def supported_list() -> str:
    return ", ".join(dict.fromkeys(ARCHITECTURES.values()))


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, as a dict."""
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"'{path}' is a folder but holds no config.json (not a Hugging Face checkpoint).")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{file}' is corrupt ({err}).") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"'{file}' is corrupt (not a JSON object).")
    return cfg


def architecture(path: Path, cfg: dict[str, Any] | None = None) -> str:
    """The folder's architecture, or a CheckpointError naming it and what is supported."""
    cfg = read_config(path) if cfg is None else cfg
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    if arch in ARCHITECTURES:
        return arch
    if arch is None:
        raise CheckpointError(
            f"'{path}/config.json' does not say its architecture (no 'architectures' entry). "
            f"Supported: {supported_list()}."
        )
    why = NOT_SUPPORTED.get(arch) or (
        "TransformerLens's HookedTransformer has no converter for it; its TransformerBridge has an adapter, "
        "which this app does not use yet (its pages need HookedTransformer's weights and hooks)"
        if _bridge_knows(arch) else "TransformerLens has no converter for it"
    )
    raise CheckpointError(f"'{path}' holds a {arch}: {why}. Supported architectures: {supported_list()}.")


def _bridge_knows(arch: str) -> bool:
    try:
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    except Exception:  # the bridge moved or failed to import: say only what HookedTransformer lacks
        return False
    return arch in SUPPORTED_ARCHITECTURES


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _rope(hf: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameters (transformers 5: `rope_parameters`, maybe per layer type)."""
    params = getattr(hf, "rope_parameters", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if params and "rope_theta" not in params and isinstance(params.get("full_attention"), dict):
        return params["full_attention"]
    flat = dict(params)
    if getattr(hf, "rope_theta", None) is not None:
        flat.setdefault("rope_theta", hf.rope_theta)
    scaling = getattr(hf, "rope_scaling", None)
    if isinstance(scaling, dict):
        flat = {**scaling, **flat}
    return flat


def _attn_types(hf: Any) -> list[str] | None:
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        return ["local" if t == "sliding_attention" else "global" for t in layer_types]
    return None


def _name_only_config(arch: str, hf: Any) -> dict[str, Any]:
    """TL's fields for the architectures whose TL config TL chooses by name (Gemma, OLMo 1/2) or
    reads where transformers 4 kept a field (Phi's partial_rotary_factor)."""
    n_heads = hf.num_attention_heads
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or n_heads
    cfg: dict[str, Any] = {
        "d_model": hf.hidden_size,
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "d_vocab": hf.vocab_size,
        "initializer_range": getattr(hf, "initializer_range", 0.02),
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_base": _rope(hf).get("rope_theta", 10000.0),
        "gated_mlp": True,
        "original_architecture": arch,
    }
    if arch.startswith("Gemma"):
        cfg.update(
            eps=hf.rms_norm_eps,
            act_fn=getattr(hf, "hidden_activation", None) or hf.hidden_act,
            normalization_type="RMS",
            final_rms=True,
            use_attn_scale=True,
            n_key_value_heads=n_kv,
        )
        scalar = getattr(hf, "query_pre_attn_scalar", None)
        if arch != "GemmaForCausalLM":
            cfg["use_normalization_before_and_after"] = True
            if scalar is not None:
                cfg["attn_scale"] = float(scalar) ** 0.5
            types = _attn_types(hf)
            if types is None and arch == "Gemma2ForCausalLM":
                types = ["local", "global"] * ((hf.num_hidden_layers + 1) // 2)
                types = types[: hf.num_hidden_layers]
            window = getattr(hf, "sliding_window", None)
            if types and window and "local" in types:
                cfg.update(attn_types=types, use_local_attn=True, window_size=window)
            if getattr(hf, "attn_logit_softcapping", None):
                cfg["attn_scores_soft_cap"] = float(hf.attn_logit_softcapping)
            if getattr(hf, "final_logit_softcapping", None):
                cfg["output_logits_soft_cap"] = float(hf.final_logit_softcapping)
        if arch == "Gemma3ForCausalLM":
            cfg["use_qk_norm"] = True
            cfg["rotary_base"] = _rope(hf, "full_attention").get("rope_theta", 1_000_000.0)
            local = _rope(hf, "sliding_attention").get("rope_theta") or getattr(hf, "rope_local_base_freq", None)
            if local is not None:
                cfg["rotary_base_local"] = local
            full = _rope(hf, "full_attention")
            if full.get("rope_type") == "linear" and full.get("factor"):
                cfg["rotary_scaling_factor"] = float(full["factor"])
    elif arch == "PhiForCausalLM":  # TL's mapping reads partial_rotary_factor where transformers 4 kept it
        rope = _rope(hf)
        factor = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 0.5))
        cfg.update(
            eps=hf.layer_norm_eps,
            act_fn=hf.hidden_act,
            normalization_type="LN",
            use_attn_scale=True,
            parallel_attn_mlp=True,
            gated_mlp=False,
            default_prepend_bos=False,
            rotary_dim=round(factor * d_head),
            n_key_value_heads=n_kv if n_kv != n_heads else None,
        )
    else:  # OLMo 1 (non-parametric LayerNorm) and OLMo 2 (RMSNorm after each sublayer, q/k norm)
        cfg.update(
            eps=1e-5 if arch == "OlmoForCausalLM" else hf.rms_norm_eps,
            act_fn=hf.hidden_act,
            normalization_type="LN" if arch == "OlmoForCausalLM" else "RMS",
            attn_types=["global"] * hf.num_hidden_layers,
            n_key_value_heads=n_kv if n_kv != n_heads else None,
        )
        if arch == "OlmoForCausalLM":
            cfg["clip_qkv"] = getattr(hf, "clip_qkv", None)
    return cfg


NAME_ONLY = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
             "PhiForCausalLM"}


def _neutral_copy(path: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder holding only config.json, whose path has no 'llama' or 'gemma' in it
    (TL picks those architectures from the name) and whose config has `n_ctx` (TL's GPT-2
    mapping reads it; configs saved by transformers 5 only have `n_positions`)."""
    for _ in range(20):
        tmp = tempfile.TemporaryDirectory(prefix="ce-")
        if not any(word in tmp.name.lower() for word in ("llama", "gemma")):
            break
        tmp.cleanup()
    else:  # pragma: no cover - twenty unlucky names in a row
        raise CheckpointError("could not make a temporary folder for the config")
    cfg = read_config(path)
    if cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg.get("n_positions", 1024)
    (Path(tmp.name) / "config.json").write_text(json.dumps(cfg))
    return tmp


def tl_config(path: Path, device: str, dtype: Any, name: str | None = None):
    """The HookedTransformerConfig for the checkpoint in `path` (unfolded, unprocessed)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig

    arch = architecture(path)
    if arch in NAME_ONLY:
        hf = AutoConfig.from_pretrained(str(path))
        cfg_dict = _name_only_config(arch, hf)
        cfg_dict.update(
            model_name=name or path.name,
            tokenizer_name=str(path),
            init_weights=False,
            device=device,
            n_devices=1,
            dtype=dtype,
            from_checkpoint=False,
            default_prepend_bos=cfg_dict.get("default_prepend_bos", True),
        )
        cfg_dict["n_ctx"] = min(cfg_dict["n_ctx"], MAX_N_CTX)
        return HookedTransformerConfig.from_dict(cfg_dict)
    with _neutral_copy(path) as tmp:
        hf_dict = read_config(path)
        cfg = loading.get_pretrained_model_config(tmp, hf_cfg=hf_dict, fold_ln=False, device=device, dtype=dtype)
    if cfg.n_ctx > MAX_N_CTX:
        cfg = HookedTransformerConfig.from_dict({**cfg.to_dict(), "n_ctx": MAX_N_CTX})
    cfg.model_name = name or path.name
    cfg.tokenizer_name = str(path)
    return cfg


# ---------------------------------------------------------------------------------------------
# Size and memory
# ---------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files as transformers reads them: the shards its index names, else
    model.safetensors, else the PyTorch .bin files (not, say, Mistral's extra consolidated.safetensors)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            try:
                names = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
                if not all(isinstance(n, str) for n in names):
                    raise ValueError("weight_map values are not file names")
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
                raise CheckpointError(f"'{path / index}' is corrupt ({err}).") from err
            return [path / n for n in names]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("model*.safetensors"))
    return files or sorted(path.glob("pytorch_model*.bin"))


def n_params(path: Path) -> int:
    """Number of parameters in the folder's weights, read from the safetensors headers (no
    tensor is loaded); for .bin checkpoints, estimated from the file size at 4 bytes each."""
    total = 0
    for file in weight_files(path):
        if file.suffix != ".safetensors":
            total += _bin_params(file)
            continue
        try:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if size > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"'{file}' is corrupt ({err}).") from err
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in info.get("shape", []):
                count *= int(dim)
            total += count
    return total


def _bin_params(file: Path) -> int:
    """Parameters in a PyTorch .bin file, memory-mapped (nothing read but the tensors' headers)."""
    import torch

    try:
        state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"'{file}' is corrupt ({err}).") from err
    return sum(t.numel() for t in state.values() if hasattr(t, "numel"))


@dataclass(frozen=True)
class MemoryPlan:
    """What loading a checkpoint needs and what the device has, in bytes."""

    params: int
    dtype: str
    device: str
    weights: int  # the model's weights at `dtype`
    peak: int  # while loading: the Hugging Face model and the TL model side by side
    store: int  # the activation store's cap
    available: int | None  # free memory on the device (None: unknown)

    @property
    def needed(self) -> int:
        return self.peak + self.store

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available

    def message(self) -> str:
        gib = 1024**3
        have = "unknown" if self.available is None else f"{self.available / gib:.1f} GiB free"
        return (
            f"{self.params / 1e6:,.1f}M parameters at {self.dtype}: {self.weights / gib:.2f} GiB of weights, "
            f"about {self.needed / gib:.1f} GiB needed to load it with the activation store "
            f"({self.store / gib:.1f} GiB) on {self.device} ({have}). A model too large for this machine "
            "can still run on NDIF: open the Large models page."
        )


def available_bytes(device: str) -> int | None:
    """Free memory on `device`: CUDA's free memory, or the machine's available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or the OS refuses: say unknown
        return None


def memory_plan(path: Path, dtype: str, device: str, store_bytes: int) -> MemoryPlan:
    """What loading needs on `device`. The conversion itself runs in the machine's RAM
    (transformers' model and TL's copy live together until the first is dropped): for a GPU load
    the tighter of the two is returned (`cpu_plan` for the RAM side)."""
    params = n_params(path)
    weights = params * DTYPE_BYTES.get(dtype, 4)
    on_device = MemoryPlan(params, dtype, device, weights, 2 * weights, store_bytes, available_bytes(device))
    if device.startswith("cuda"):
        in_ram = MemoryPlan(params, dtype, "cpu (converting)", weights, 2 * weights, 0, available_bytes("cpu"))
        if not in_ram.fits:
            return in_ram
    return on_device


# ---------------------------------------------------------------------------------------------
# A key for the weights (the disk cache of converted checkpoints uses it)
# ---------------------------------------------------------------------------------------------

_HASH_MEMO = ".circuit-explorer-hashes.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def weights_key(path: Path, memo_dir: Path | None = None) -> str:
    """A BLAKE2 hash of the folder's config, tokenizer and weight files.

    Hashing a gigabyte takes a second or two, so the hash is remembered in `memo_dir` against
    each file's size and modification time: a second start of an unchanged checkpoint only
    stats its files.
    """
    tokenizer = [path / f for f in TOKENIZER_FILES if (path / f).exists()]
    files = [path / "config.json", *tokenizer, *weight_files(path)]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo_file = (memo_dir / _HASH_MEMO) if memo_dir else None
    memo: dict[str, Any] = {}
    memo_key = json.dumps([str(path.resolve()), stats])
    if memo_file and memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
        if memo_key in memo:
            return memo[memo_key]
    digest = hashlib.blake2b(digest_size=16)
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    key = digest.hexdigest()
    if memo_file:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            memo[memo_key] = key
            tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            tmp.replace(memo_file)
        except OSError:
            pass
    return key
