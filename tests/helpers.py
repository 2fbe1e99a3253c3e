"""Helpers shared by the test modules: the app under AppTest, reading its charts, a tiny SAE on
disk, and a real app server for Chromium. (Seeded random models are in `random_models.py`.)"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# ---------------------------------------------------------------------------------------------
# AppTest
# ---------------------------------------------------------------------------------------------


def open_app(**params) -> AppTest:
    """The app (app.py) run once with these query parameters (`page=attribution`, `model=…`)."""
    at = AppTest.from_file(APP, default_timeout=180)
    for k, v in params.items():
        at.query_params[k] = v
    return at.run()


def heatmap_z(trace: dict) -> np.ndarray:
    """A heatmap's z as an array (plotly 6+ may ship it as base64 typed-array data)."""
    z = trace["z"]
    if isinstance(z, dict) and "bdata" in z:
        shape = tuple(int(n) for n in str(z["shape"]).split(","))
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"])).reshape(shape)
    return np.array(z, dtype=float)


def plain(markdown: str) -> str:
    """Markdown text with its backslash escapes removed (errors are escaped before display)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def figure_spec(at: AppTest, title_part: str) -> dict:
    """The plotly spec of the chart whose title contains `title_part`."""
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        title = spec.get("layout", {}).get("title", {})
        if title_part in (title.get("text", "") if isinstance(title, dict) else str(title)):
            return spec
    raise AssertionError(f"no chart titled {title_part!r}")


# ---------------------------------------------------------------------------------------------
# SAEs
# ---------------------------------------------------------------------------------------------


def save_sae(folder, d_in, hook, d_sae=16, seed=0):
    """A small random sae_lens StandardSAE reading `hook`, saved in sae_lens's disk format."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
    sae.save_model(folder)
    return sae


# ---------------------------------------------------------------------------------------------
# A real server, for Chromium
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path = ROOT, timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` in `root` on a free port, once it answers: (process, base URL)."""
    port = free_port()
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless=true",
         f"--server.port={port}", "--server.address=127.0.0.1"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("streamlit did not start: " + proc.stdout.read().decode(errors="replace")[-2000:])


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints on disk
# ---------------------------------------------------------------------------------------------


def make_gpt2_dir(folder, tied: bool = True, seed: int = 0, tokenizer=None):
    """A tiny random GPT-2 saved as a Hugging Face checkpoint folder, with the zoo tokenizer (or
    `tokenizer`, saved beside it).

    Its LayerNorms (the final one too) have weights away from 1 and non-zero biases, and every
    other bias is non-zero, as in a trained GPT-2: a fresh init (weight 1, bias 0) would hide a
    fold that goes wrong. `tied`: W_U is W_E (GPT-2's default) or a separate random matrix.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.vocab import build_tokenizer

    if tokenizer is None:
        tok = build_tokenizer(folder)
    else:
        tok = tokenizer
        tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tok), tie_word_embeddings=tied)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        if not tied:
            hf.lm_head.weight.copy_(0.05 * torch.randn_like(hf.lm_head.weight))
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) == tied
    hf.save_pretrained(folder)
    return folder, hf


def hub_cache_from_folder(folder, cache_root, repo_id: str = "gpt2"):
    """Lay `folder` out as a Hugging Face hub download leaves it in `cache_root`: blobs named by
    their hash, a snapshot of symlinks into them, refs/main naming the snapshot. Hub GPT-2
    configs carry `n_ctx`, which TransformerLens reads, so it is added as the hub has it."""
    import hashlib
    import json
    from pathlib import Path

    repo = Path(cache_root) / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in Path(folder).iterdir():
        data = f.read_bytes()
        if f.name == "config.json":
            cfg = json.loads(data)
            if "n_positions" in cfg:
                cfg.setdefault("n_ctx", cfg["n_positions"])
            data = json.dumps(cfg).encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (repo / "snapshots" / commit / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return repo


MARKUP_TOKENS = ["<script>alert(1)</script>", "<b>bold</b>", "<img src=x onerror=alert(2)>"]


def make_markup_gpt2_dir(folder):
    """A tiny random GPT-2 folder whose tokenizer keeps markup as whole tokens.

    The zoo tokenizer splits '<script>' into '<', '<unk>', '>', so no zoo token can carry
    markup; this one makes '<script>alert(1)</script>' a single token, to prove it is shown
    as text everywhere.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = ["<|bos|>", "<|endoftext|>", "<unk>", "the", "cat", "sat"] + [t.replace(" ", "\u2581") for t in MARKUP_TOKENS]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", unk_token="<unk>", add_bos_token=True
    ).save_pretrained(str(folder))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(vocab))).save_pretrained(folder)
    return folder


# Buttons and page links cut off by their column (a label that does not fit on a 1280×720 projector).
CLIPPED = """() => [...document.querySelectorAll('[data-testid="stButtonGroup"] button, [data-testid="stPageLink"] a')]
    .filter(b => b.offsetParent !== null && b.innerText.trim())
    .filter(b => {
        const box = (b.closest('[data-testid="stColumn"]') || b.closest('[data-testid="stElementContainer"]'))
            .getBoundingClientRect();
        const r = b.getBoundingClientRect();
        return r.right > box.right + 1 || b.scrollWidth > b.clientWidth + 1
            || [...b.querySelectorAll('*')].some(c => c.scrollWidth > c.clientWidth + 1);
    })
    .map(b => b.innerText.trim())"""
