"""Requests and bytes per view on NDIF, for a Llama-3-70B-shaped model, without its weights.

The model is built by nnsight on the meta device from a Llama-3-70B-shaped config (80 layers,
d_model 8192, 64 heads with 8 key/value heads, 128,256 tokens). Each view runs through
`core.ndif.DryRun`, which serializes every request exactly as it would be sent (the traced
program, compressed as nnsight compresses it) and answers with random numbers of the shapes the
view saves; their compressed size is what comes back. Against each view it prints the naive
count: one request per component (per layer, per head, per patched layer × position), each
with the base and source runs it needs made once.

    python -m benchmarks.bench_ndif_requests [--pos 16] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

LLAMA_3_70B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    hidden_act="silu", bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")


def meta_model(folder: Path):
    """The 70B-shaped model on the meta device, with a small tokenizer (ids are all it needs)."""
    from nnsight import TransformersModel

    from core.models import load_tokenizer
    from tests.hf_checkpoints import make_checkpoint
    tiny = Path(tempfile.mkdtemp(prefix="ce-tok-"))
    make_checkpoint("LlamaForCausalLM", tiny / "ckpt")
    folder.mkdir(parents=True, exist_ok=True)
    for f in (tiny / "ckpt").iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(LLAMA_3_70B))
    import nnsight.modeling.huggingface as hf
    hf._ID_CACHE[str(folder)] = "meta-llama/Llama-3.3-70B-Instruct"  # the key NDIF would know it by
    return TransformersModel(str(folder), task="text-generation", attn_implementation="eager",
                             tokenizer=load_tokenizer(folder))


def main() -> None:
    from core import ndif
    from core.nnsight_backend import NNsightBackend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pos", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--tokens", type=int, default=ndif.DEFAULT_TOKENS, help="tokens per request")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    lm = meta_model(Path(tempfile.mkdtemp(prefix="ce-70b-")))
    print(f"meta build of a Llama-3-70B-shaped model: {time.perf_counter() - start:.1f} s, "
          f"{sum(p.numel() for p in lm._module.parameters()) / 1e9:.1f} B parameters, no weights")
    s = ndif.Settings(host="http://dry-run", api_key="", timeout=1, tokens_per_request=args.tokens)
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(2, 400, (1, args.pos), generator=gen)
    source = base.clone()
    source[0, 2] = 401
    L, H, P = 80, 64, args.pos
    answer, wrong = 5, 6
    vector = torch.randn(8192, generator=gen)
    views = [
        ("attention patterns, all layers", lambda b: b.attention_patterns(base, range(L)), L),
        ("residual norms", lambda b: b.residual_norms(base), L + 1),
        ("logit lens", lambda b: b.logit_lens(base, answer), L + 1),
        ("direct logit attribution by head", lambda b: b.dla(base, answer, wrong, "head"), L * H + 2 * L + 1),
        ("patching: residual stream, layer × position", lambda b: b.patch(base, source, answer, wrong, "resid_pre"), L * P + 2),
        ("patching: attention out, layer × position", lambda b: b.patch(base, source, answer, wrong, "attn_out"), L * P + 2),
        ("patching: MLP out, layer × position", lambda b: b.patch(base, source, answer, wrong, "mlp_out"), L * P + 2),
        ("patching: heads (all positions)", lambda b: b.patch(base, source, answer, wrong, "z"), L * H + 2),
        ("attribution patching: heads", lambda b: b.attribution_patch(base, source, answer, wrong, "z"), L + 2),
        ("steering (next-token shift)", lambda b: b.steer(base, 40, vector, 4.0), 2),
    ]
    print(f"prompt {P} tokens; at most {args.tokens} tokens a request ({max(1, args.tokens // P)} rows)\n")
    print("| view | requests | naive requests | sent | received | naive sent |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run, naive in views:
        transport = ndif.DryRun(s)
        backend = NNsightBackend(lm, transport)
        run(backend)
        sent = sum(r.sent for r in transport.log)
        received = sum(r.received for r in transport.log)
        per_request = sent / len(transport.log)
        print(f"| {name} | {len(transport.log)} | {naive:,} | {sent / 1e3:,.1f} kB | {received / 1e3:,.1f} kB "
              f"| ≥ {naive * min(per_request, sent) / 1e6:,.1f} MB |")
    print("\nnaive sent: the naive count times the smallest request here (each naive request carries at "
          "least a prompt and a program); requests: ceil(components / (rows a request - 2)) for a sweep.")


if __name__ == "__main__":
    main()
