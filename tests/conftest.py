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
