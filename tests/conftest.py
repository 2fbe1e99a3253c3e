import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(os.environ.get("CE_TEST_THREADS", "2")))
warnings.filterwarnings("ignore", category=DeprecationWarning)


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


@pytest.fixture()
def tiny_gpt2_dir(tmp_path):
    """A tiny random GPT-2 saved as a Hugging Face checkpoint folder, with the zoo tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.zoo.vocab import build_tokenizer

    tok = build_tokenizer(tmp_path)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tok))
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    return tmp_path, hf


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
