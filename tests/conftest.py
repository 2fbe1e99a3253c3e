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


from tests.helpers import make_gpt2_dir, make_markup_gpt2_dir  # noqa: E402


@pytest.fixture()
def tiny_gpt2_dir(tmp_path):
    """A tiny random GPT-2 checkpoint folder (tied embeddings, non-trivial LayerNorms): (path, HF model)."""
    return make_gpt2_dir(tmp_path)


@pytest.fixture()
def markup_gpt2_dir(tmp_path):
    return make_markup_gpt2_dir(tmp_path / "markup-gpt2")


@pytest.fixture(scope="session", autouse=True)
def index_dir(tmp_path_factory):
    """Feature indexes go to a temporary folder, not the repository's .data/."""
    from core import paths  # not core.sae_index: that would import sae_lens for every test

    old = os.environ.get(paths.DATA_ENV)
    os.environ[paths.DATA_ENV] = str(tmp_path_factory.mktemp("data"))
    yield
    if old is None:
        os.environ.pop(paths.DATA_ENV, None)
    else:
        os.environ[paths.DATA_ENV] = old


@pytest.fixture(scope="module")
def server():
    """A real `streamlit run app.py` for the Chromium tests of a module: its base URL."""
    from tests.helpers import start_server

    proc, url = start_server()
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except Exception:  # noqa: BLE001
        proc.kill()
