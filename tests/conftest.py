import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(os.environ.get("CE_TEST_THREADS", "2")))
# A server builds every embedded SAE's feature index in the background when it loads a model;
# tests that load models would all start those builds. The one test of it switches it back on.
os.environ["CIRCUIT_EXPLORER_PREFETCH_INDEXES"] = "0"
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The training scripts set torch's thread count for themselves; later tests keep ours."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def zoo_model():
    from core.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def offline_hub():
    """Point the hub at a closed loopback port, so 'offline' holds whatever this machine can reach."""
    from huggingface_hub import constants

    old = constants.ENDPOINT
    constants.ENDPOINT = "http://127.0.0.1:9"
    yield
    constants.ENDPOINT = old


def make_gpt2_dir(folder, tied: bool = True, seed: int = 0):
    """A tiny random GPT-2 saved as a Hugging Face checkpoint folder, with the zoo tokenizer.

    Its LayerNorms (the final one too) have weights away from 1 and non-zero biases, and every
    other bias is non-zero, as in a trained GPT-2: a fresh init (weight 1, bias 0) would hide a
    fold that goes wrong. `tied`: W_U is W_E (GPT-2's default) or a separate random matrix.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.zoo.vocab import build_tokenizer

    tok = build_tokenizer(folder)
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


@pytest.fixture()
def tiny_gpt2_dir(tmp_path):
    """A tiny random GPT-2 checkpoint folder (tied embeddings, non-trivial LayerNorms): (path, HF model)."""
    return make_gpt2_dir(tmp_path)


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


@pytest.fixture()
def markup_gpt2_dir(tmp_path):
    return make_markup_gpt2_dir(tmp_path / "markup-gpt2")


@pytest.fixture(scope="session", autouse=True)
def index_dir(tmp_path_factory):
    """Feature indexes go to a temporary folder, not the repository's .data/."""
    from core import sae_index

    old = os.environ.get(sae_index.DATA_ENV)
    os.environ[sae_index.DATA_ENV] = str(tmp_path_factory.mktemp("data"))
    yield
    if old is None:
        os.environ.pop(sae_index.DATA_ENV, None)
    else:
        os.environ[sae_index.DATA_ENV] = old
