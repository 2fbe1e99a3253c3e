import shutil
import time

import pytest
import torch
from transformer_lens import loading_from_pretrained as loading

from core import models, paths
from core.models import DEFAULT_MODEL, ModelLoadError, load_model, zoo_models


def test_zoo_lists_default_first():
    assert zoo_models()[0] == DEFAULT_MODEL


def test_zoo_names_do_not_collide_with_transformer_lens():
    official = {n.lower() for n in loading.OFFICIAL_MODEL_NAMES}
    aliases = {a.lower() for names in loading.MODEL_ALIASES.values() for a in names}
    for name in zoo_models():
        assert name.lower() not in official | aliases


def test_zoo_model_loads_with_its_tokenizer(zoo_model):
    cfg = zoo_model.cfg
    assert (cfg.n_layers, cfg.attn_only, cfg.positional_embedding_type) == (2, True, "shortformer")
    toks = zoo_model.to_tokens("the cat sat")
    assert toks[0, 0].item() == zoo_model.tokenizer.bos_token_id
    assert zoo_model.to_str_tokens("the cat sat") == ["<|bos|>", "the", "cat", "sat"]
    assert zoo_model(toks).shape == (1, 4, cfg.d_vocab)


def test_zoo_model_weights_equal_the_safetensors_file(zoo_model):
    from safetensors.torch import load_file

    state = load_file(str(models.ZOO_DIR / DEFAULT_MODEL / "model.safetensors"))
    for name, tensor in zoo_model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def _assert_same_log_probs(model, hf, text="the king saw a green bird near the river"):
    """TL centres the unembedding, so logits agree up to a constant per position: compare
    log-probabilities, which are exact."""
    tokens = model.to_tokens(text)
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_local_hf_gpt2_folder_matches_hugging_face_logits(tmp_path, tied):
    """Non-trivial LayerNorms (the final one too), tied and untied embeddings: the folded model
    gives Hugging Face's log-probs, and its embedding was not changed by the unembedding's fold."""
    from tests.helpers import make_gpt2_dir

    path, hf = make_gpt2_dir(tmp_path / "gpt2", tied=tied)
    model = load_model(str(path))
    assert model.cfg.normalization_type == "LNPre"  # processed like a pretrained model
    _assert_same_log_probs(model, hf)
    wte = hf.transformer.wte.weight.detach()
    torch.testing.assert_close(model.W_E, wte - wte.mean(-1, keepdim=True), atol=1e-6, rtol=0)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="Unknown model 'no-such-model-xyz'.*ce-induction-2l"):
        load_model("no-such-model-xyz")


def test_empty_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="No model name"):
        load_model("  ")


def test_pretrained_offline_fails_fast_naming_model_and_zoo(offline_hub):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"Cannot download 'gpt2-small'.*not reachable.*ce-induction-2l"):
        load_model("gpt2-small")
    # TransformerLens's own retries take ~23 s offline; our probe gives up after ~1 s.
    assert time.monotonic() - start < 1.5


def test_hub_probe_says_no_for_a_closed_port(offline_hub):
    assert paths.hub_reachable(timeout=1.0) is False


@pytest.fixture()
def zoo_copy(tmp_path):
    dst = tmp_path / "copy-of-zoo"
    shutil.copytree(models.ZOO_DIR / DEFAULT_MODEL, dst)
    return dst


def test_corrupt_weights_are_a_clear_error(zoo_copy):
    (zoo_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="model.safetensors is corrupt"):
        load_model(str(zoo_copy))


def test_truncated_weights_are_a_clear_error(zoo_copy):
    data = (zoo_copy / "model.safetensors").read_bytes()
    (zoo_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(str(zoo_copy))


def test_missing_file_is_a_clear_error(zoo_copy):
    (zoo_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json is missing"):
        load_model(str(zoo_copy))


def test_corrupt_config_is_a_clear_error(zoo_copy):
    (zoo_copy / models.CONFIG_FILE).write_text("{ not json")
    with pytest.raises(ModelLoadError, match="hooked_config.json is corrupt"):
        load_model(str(zoo_copy))


def test_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_cached_pretrained_model_loads_offline_without_retries(offline_hub, tmp_path, monkeypatch, tied):
    """gpt2-small by its TL name from a Hugging Face cache laid out as a download leaves it (blobs,
    symlinked snapshot, refs/main): offline, fast, and with Hugging Face's log-probs."""
    from huggingface_hub import constants

    from tests.helpers import hub_cache_from_folder, make_gpt2_dir

    src, hf = make_gpt2_dir(tmp_path / "gpt2", tied=tied)
    hub_cache_from_folder(src, tmp_path / "hub", "gpt2")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    offline_before = constants.HF_HUB_OFFLINE
    start = time.monotonic()
    model = load_model("gpt2-small")
    assert time.monotonic() - start < 30  # the hub's retries alone would take minutes
    assert constants.HF_HUB_OFFLINE == offline_before  # the offline switch was undone
    assert model.cfg.normalization_type == "LNPre"
    _assert_same_log_probs(model, hf)


@pytest.mark.parametrize("name", ["x" * 300, "gpt2\x00", "/tmp/" + "a" * 5000, "a/" * 200 + "b"])
def test_names_the_os_refuses_are_clear_errors(name):
    with pytest.raises(ModelLoadError, match="not a model name or a folder path|Unknown model"):
        load_model(name)


@pytest.mark.parametrize("switch", ["ln-standard", "rms-rotary", "no-norm", "shortformer-attn-only", "alibi",
                                    "gqa-rotary", "softcap", "attn-result"])
def test_processing_a_loaded_model_keeps_its_log_probs(switch):
    """`_process` folds and centres as TL's from_pretrained does, with its exceptions (shortformer,
    soft cap, post-norm): the model's log-probabilities do not change on any architecture."""
    from random_models import SWITCHES, random_model, random_tokens

    model = random_model(seed=6, **SWITCHES[switch])
    tokens = random_tokens(model, batch=2, pos=10)
    with torch.no_grad():
        before = model(tokens).log_softmax(-1)
        after = models._process(model)(tokens).log_softmax(-1)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=0)
