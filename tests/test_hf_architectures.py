"""Every architecture the app loads from a Hugging Face checkpoint folder, tested offline.

For each one (`hf_checkpoints.ARCH_SPECS`): a tiny random checkpoint built with `transformers`
and saved with `save_pretrained` next to a tokenizer made with `tokenizers`, loaded through
`load_model(path)`:
- its log-probabilities equal the `transformers` model's to 1e-4 (float32), and so do its logits
  up to the per-position constant that centring the unembedding removes;
- a second load comes from the converted copy on disk and gives the same numbers, bit for bit;
- the architecture checks of `test_architectures` (attribution adds up to the logit, the logit
  lens's last row is the prediction, every patching sweep equals `transformer_lens.patching`)
  run on it, through the `switched` fixture below;
- every page runs under AppTest with no exception and no error (slow).
Three of them run in the quick suite (GPT-2, Llama, Gemma 2); all of them in CI, with the
secondary checks (bfloat16, sharded and .bin weights, refusals) marked slow.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import test_architectures
import torch
from hf_checkpoints import ARCH_SPECS, hf_log_probs, make_checkpoint

# The architecture checks, run here on the Hugging Face models (pytest resolves their `switched`
# fixture in this module).
from test_architectures import (  # noqa: F401  (collected here as tests)
    test_attribution_adds_up_on_every_architecture,
    test_logit_lens_last_layer_is_the_models_prediction,
    test_neurons_add_up_to_their_mlp_output,
)

from core import checkpoints, models
from core.models import ModelLoadError, load_model

QUICK = ("GPT2LMHeadModel", "LlamaForCausalLM", "Gemma2ForCausalLM")
SUPPORTED = [a for a in ARCH_SPECS if a in checkpoints.ARCHITECTURES]
TEXT = "the old king saw a green bird near the river and the dog ran home"
ATOL = 1e-4


def arch_params(archs=SUPPORTED) -> list:
    return [a if a in QUICK else pytest.param(a, marks=pytest.mark.slow, id=a) for a in archs]


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> tuple[Path, object]:
    """(folder, transformers model) for `arch`, built once per test run."""
    folder = Path(tempfile.mkdtemp(prefix="ce-hf-")) / "checkpoint"
    return make_checkpoint(arch, folder)


@pytest.fixture(scope="module", params=arch_params())
def switched(request):
    folder, _ = checkpoint(request.param)
    return request.param, load_model(str(folder))


def test_patching_sweeps_equal_transformer_lens(switched):
    """`test_architectures`' six sweeps against `transformer_lens.patching`, denoising (noising runs
    the same code with the two caches swapped, and is checked there on every switch)."""
    test_architectures.test_patching_sweeps_equal_transformer_lens(switched, "denoise")


@pytest.mark.parametrize("arch", arch_params())
def test_loads_with_the_hugging_face_models_numbers(arch, tmp_path, monkeypatch):
    from core import paths

    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "data"))  # no converted copy yet: this load converts
    folder, hf = checkpoint(arch)
    converted = []
    real_tl_config = checkpoints.tl_config
    monkeypatch.setattr(checkpoints, "tl_config", lambda *a, **k: converted.append(1) or real_tl_config(*a, **k))
    model = load_model(str(folder))
    assert converted == [1]
    assert model.cfg.original_architecture == arch
    tokens = model.to_tokens(TEXT)
    assert tokens.shape[1] > 12  # longer than every sliding window of the specs
    with torch.no_grad():
        logits = model(tokens)
        ref_logits = hf(tokens).logits
    torch.testing.assert_close(logits.log_softmax(-1), hf_log_probs(hf, tokens), atol=ATOL, rtol=0)
    centred = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731  (what centring W_U removes)
    if model.cfg.output_logits_soft_cap <= 0:
        torch.testing.assert_close(centred(logits), centred(ref_logits), atol=ATOL, rtol=0)
    # The second load is the converted copy on disk: same tokens, same numbers, bit for bit.
    key = model._circuit_explorer_weights_key
    assert (models._converted_dir(key, "float32") / models.CONFIG_FILE).exists()
    again = load_model(str(folder))
    assert converted == [1]  # read from disk, not converted again
    assert again._circuit_explorer_weights_key == key
    assert again.cfg.to_dict() | {"device": None} == model.cfg.to_dict() | {"device": None}
    assert again.tokenizer("the king")["input_ids"] == model.tokenizer("the king")["input_ids"]
    assert again.tokenizer.encode("") == model.tokenizer.encode("")
    assert torch.equal(again.to_tokens(TEXT), tokens)
    with torch.no_grad():
        assert torch.equal(again(tokens), logits)


def test_the_spec_list_covers_every_architecture_the_app_claims():
    assert set(checkpoints.ARCHITECTURES) <= set(ARCH_SPECS)
    covered = " ".join(s.covers for s in ARCH_SPECS.values())
    for switch in ("GQA", "RMSNorm", "rotary", "parallel attention + MLP", "soft caps", "local/global", "tied"):
        assert switch in covered, switch


# ---------------------------------------------------------------------------------------------
# Clear messages: what is not supported, what does not fit
# ---------------------------------------------------------------------------------------------


def test_an_architecture_without_a_converter_is_named_with_what_is_supported(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from core.vocab import build_tokenizer

    tok = build_tokenizer(tmp_path)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path))
    msg = str(err.value)
    assert "BertForMaskedLM" in msg and "not a causal" in msg and "Llama" in msg and "Gemma 2" in msg


def test_attention_sinks_keep_their_value_biases_unfolded():
    """Why `_process` does not call `process_weights_` on gpt-oss: that folds the value biases
    into b_O, which is exact only when each query's attention weights sum to 1; a sink takes a
    share of them. TL's own processing of this checkpoint is off; ours equals transformers."""
    folder, hf = checkpoint("GptOssForCausalLM")
    model = load_model(str(folder))
    assert model.cfg.use_attention_sinks and model.cfg.normalization_type == "RMSPre"  # still folded
    tokens = torch.arange(2, 14)[None]
    reference = hf_log_probs(hf, tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), reference, atol=ATOL, rtol=0)
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    with checkpoints._neutral_copy(folder) as tmp:
        cfg = loading.get_pretrained_model_config(tmp, fold_ln=False, device="cpu", dtype=torch.float32)
    cfg.tokenizer_name = None  # tokens are given as ids here
    tl = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    tl.load_state_dict(loading.get_pretrained_state_dict(str(folder), cfg, hf), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(tl(tokens).log_softmax(-1), reference, atol=ATOL, rtol=0)  # converted: exact
        tl.process_weights_()
        assert (tl(tokens).log_softmax(-1) - reference).abs().max() > 1e-2  # TL's processing: not


def test_unknown_architecture_and_missing_pieces_are_clear(tmp_path):
    import json

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="MambaForCausalLM: TransformerLens's HookedTransformer has no conv"):
        load_model(str(tmp_path / "a"))  # the bridge has an adapter: said, and that the app does not use it
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="MadeUpForCausalLM: TransformerLens has no converter for it. Supported"):
        load_model(str(tmp_path / "c"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="does not say its architecture"):
        load_model(str(tmp_path / "b"))
    folder, _ = checkpoint("LlamaForCausalLM")
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in folder.iterdir():
        if not f.name.startswith(("tokenizer", "special")):
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        load_model(str(bare))


def test_a_model_that_does_not_fit_is_refused_with_what_it_needs(monkeypatch):
    folder, _ = checkpoint("LlamaForCausalLM")
    monkeypatch.setattr(checkpoints, "available_bytes", lambda device: 1000)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    msg = str(err.value)
    plan = checkpoints.memory_plan(folder, "float32", "cpu", models.store_cap_bytes())
    assert "does not fit" in msg and f"{plan.params / 1e6:,.1f}M parameters" in msg and "needed" in msg
    assert plan.params == sum(p.numel() for p in checkpoint("LlamaForCausalLM")[1].parameters())
    assert plan.weights == 4 * plan.params and not plan.fits


def test_memory_plan_counts_half_the_bytes_in_bfloat16():
    folder, _ = checkpoint("GPT2LMHeadModel")
    f32 = checkpoints.memory_plan(folder, "float32", "cpu", 0)
    bf16 = checkpoints.memory_plan(folder, "bfloat16", "cpu", 0)
    assert bf16.weights * 2 == f32.weights and bf16.needed * 2 == f32.needed


@pytest.mark.slow
def test_bfloat16_loads_and_stays_close_to_float32():
    folder, hf = checkpoint("LlamaForCausalLM")
    model = load_model(str(folder), dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16 and model.W_Q.dtype == torch.bfloat16
    tokens = model.to_tokens(TEXT)
    import copy

    reference = hf_log_probs(hf, tokens)
    with torch.no_grad():
        ours = (model(tokens).float().log_softmax(-1) - reference).abs().max()
        theirs = (hf_log_probs(copy.deepcopy(hf).to(torch.bfloat16), tokens) - reference).abs().max()
    # bfloat16 keeps 8 bits of mantissa: as close to float32 as transformers' own bfloat16 run.
    print(f"bfloat16 vs float32 log-probs: ours {ours:.3f}, transformers {theirs:.3f}")
    assert ours < 2 * theirs
    assert model._circuit_explorer_weights_key == load_model(str(folder))._circuit_explorer_weights_key


def test_device_and_precision_are_checked():
    folder, _ = checkpoint("GPT2LMHeadModel")
    with pytest.raises(ModelLoadError, match="Unknown precision"):
        load_model(str(folder), dtype="int3")
    with pytest.raises(ModelLoadError, match="Unknown device"):
        load_model(str(folder), device="tpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device("auto") == expected
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_model(str(folder), device="cuda")


def test_a_damaged_converted_copy_is_converted_again():
    folder, hf = checkpoint("Qwen2ForCausalLM")
    first = load_model(str(folder))
    cached = models._converted_dir(first._circuit_explorer_weights_key, "float32") / models.WEIGHTS_FILE
    cached.write_bytes(b"not safetensors")
    again = load_model(str(folder))
    tokens = again.to_tokens(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).log_softmax(-1), hf_log_probs(hf, tokens), atol=ATOL, rtol=0)
    assert cached.stat().st_size > 1000  # written again


def test_changed_weights_get_a_new_key(tmp_path):
    folder, _ = checkpoint("GPT2LMHeadModel")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    memo = tmp_path / "memo"
    key = checkpoints.weights_key(copy, memo)
    assert checkpoints.weights_key(copy, memo) == key  # remembered
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert checkpoints.weights_key(copy, memo) != key


# ---------------------------------------------------------------------------------------------
# The Hugging Face cache: a hub id loads offline by its name
# ---------------------------------------------------------------------------------------------


def _byte_level_bpe_gpt2(folder: Path):
    """A GPT-2-layout checkpoint with a byte-level BPE tokenizer trained here on generated text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast


    words = "the a king queen saw green bird river dog ran home old near and to of in".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=gen)) for _ in range(400)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    from tests.helpers import make_gpt2_dir

    folder.mkdir(parents=True, exist_ok=True)
    _, hf = make_gpt2_dir(folder, seed=1, tokenizer=tok)
    return tok, hf


@pytest.mark.parametrize("repo_id", ["gpt2", "someone/tiny-gpt2"], ids=["transformer-lens-name", "any-hub-id"])
def test_a_model_in_the_hub_cache_loads_offline_by_its_name(offline_hub, tmp_path, monkeypatch, repo_id):
    from huggingface_hub import constants

    from tests.helpers import hub_cache_from_folder

    tok, hf = _byte_level_bpe_gpt2(tmp_path / "src")
    hub_cache_from_folder(tmp_path / "src", tmp_path / "hub", repo_id)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    name = "gpt2-small" if repo_id == "gpt2" else repo_id
    model = load_model(name)  # what a user online types; offline it is served from the cache
    text = "the old king saw a green bird near the river"
    tokens = model.to_tokens(text, prepend_bos=False)
    assert tokens[0].tolist() == tok(text)["input_ids"]  # the cached byte-level BPE, not another one
    assert len(tokens[0]) < len(text.split()) * 3  # merged, not byte by byte
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), hf_log_probs(hf, tokens), atol=ATOL, rtol=0)
    again = load_model(name)  # converted copy on disk
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))


@pytest.mark.parametrize("arch", arch_params())
def test_every_architecture_loads_from_the_hub_cache_by_its_id(offline_hub, tmp_path, monkeypatch, arch):
    """The checkpoint laid out as a hub download leaves it, loaded offline by `org/name`."""
    from huggingface_hub import constants

    from tests.helpers import hub_cache_from_folder

    folder, hf = checkpoint(arch)
    repo_id = f"tiny-random/{arch.lower()}"
    hub_cache_from_folder(folder, tmp_path / "hub", repo_id)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model(repo_id)
    assert model.cfg.model_name == repo_id and model.cfg.original_architecture == arch
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), hf_log_probs(hf, tokens), atol=ATOL, rtol=0)


def test_a_hub_id_not_in_the_cache_is_a_clear_offline_message(offline_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelLoadError, match="not in this machine's Hugging Face cache"):
        load_model("someone/never-downloaded")


# ---------------------------------------------------------------------------------------------
# Every page on every architecture
# ---------------------------------------------------------------------------------------------

# The Circuits page's edge graph cannot describe these (README table): parallel attention + MLP,
# mixture of experts, a norm after each sublayer.
NO_CIRCUITS = {"GPTJForCausalLM", "GPTNeoXForCausalLM", "PhiForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM",
               "GptOssForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"}


def circuits_work(arch: str) -> bool:
    """Whether the Circuits page's graph describes the architecture (`circuits.check_model`)."""
    from core import circuits

    try:
        circuits.check_model(load_model(str(checkpoint(arch)[0])))
        return True
    except circuits.CircuitError:
        return False


PAGES = ("attention", "attribution", "patching", "circuits", "saes", "steering", "lessons")


@pytest.mark.slow
@pytest.mark.parametrize("arch", SUPPORTED)
def test_every_page_runs_on_the_architecture(arch):
    from tests.helpers import open_app

    folder, _ = checkpoint(arch)
    for page in PAGES:
        at = open_app(model=str(folder), page=page, prompt=TEXT)
        if page in ("patching", "circuits") and any(t.key == "pair_corrupted" for t in at.text_input):
            # A random model solves no built-in task: the user types a corrupted prompt.
            at.text_input(key="pair_corrupted").set_value(TEXT.replace(" home", " house")).run()
        assert not at.exception, (arch, page, [e.value for e in at.exception])
        assert not at.error, (arch, page, [e.value for e in at.error])
        if page == "circuits":
            assert circuits_work(arch) == (arch not in NO_CIRCUITS), arch  # the README's table
        if page == "circuits" and not circuits_work(arch):  # says why, and nothing else
            assert len(at.warning) == 1 and "cannot describe" in at.warning[0].value, (arch, page)
            continue
        if page in ("attention", "attribution", "patching", "circuits", "steering"):
            assert at.get("plotly_chart"), (arch, page)
    for tab in ("By head", "Logit lens", "Neurons"):  # the page draws only the open tab
        at = open_app(model=str(folder), page="attribution", prompt=TEXT, attr_tab=tab)
        assert not at.exception and not at.error, (arch, tab, [e.value for e in at.exception])
        if tab == "Neurons" and arch in ("MixtralForCausalLM", "OlmoeForCausalLM", "GptOssForCausalLM"):
            assert any("mixtures of experts" in i.value for i in at.info), arch
        else:
            assert at.get("plotly_chart"), (arch, tab)


def test_the_model_picker_lists_the_models_in_the_hub_cache(offline_hub, tmp_path, monkeypatch):
    """A causal LM in the Hugging Face cache is offered in the sidebar and opens offline from it;
    a repo of an unsupported architecture is not offered."""
    import streamlit as st
    from huggingface_hub import constants

    from tests.helpers import hub_cache_from_folder, open_app

    hub_cache_from_folder(checkpoint("Qwen3ForCausalLM")[0], tmp_path / "hub", "someone/tiny-qwen3")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    hub_cache_from_folder(tmp_path / "bert", tmp_path / "hub", "someone/a-bert")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.cached_hub_models() == ["someone/tiny-qwen3"]
    st.cache_data.clear()
    at = open_app(page="attention")
    picker = at.selectbox(key="model_choice")
    assert "someone/tiny-qwen3" in picker.options and "someone/a-bert" not in picker.options
    picker.set_value("someone/tiny-qwen3").run()
    assert not at.exception and not at.error
    assert any("Qwen3" in c.value for c in at.sidebar.caption)


@pytest.mark.slow
def test_sharded_weights_are_counted_once_and_extra_files_ignored(tmp_path):
    """Mistral's repos hold the shards and a consolidated copy: the index says which are read."""
    folder, hf = checkpoint("MistralForCausalLM")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    for f in folder.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").exists() and len(checkpoints.weight_files(sharded)) > 1
    (sharded / "consolidated.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    n = sum(p.numel() for p in hf.parameters())
    assert checkpoints.n_params(sharded) == n == checkpoints.n_params(folder)
    model = load_model(str(sharded))
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), hf_log_probs(hf, tokens), atol=ATOL, rtol=0)


def test_online_a_hub_id_is_downloaded_then_checked_then_loaded(tmp_path, monkeypatch):
    """The online path at the hub boundary: `snapshot_download` (here a stand-in that lays the
    checkpoint out as the hub would) fills the cache; the memory check reads it; the model loads."""
    import huggingface_hub
    from huggingface_hub import constants

    from tests.helpers import hub_cache_from_folder

    folder, hf = checkpoint("Qwen2ForCausalLM")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        if repo_id != "someone/tiny-qwen2":
            from huggingface_hub.errors import RepositoryNotFoundError

            err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the hub raises it on a 404
            Exception.__init__(err, "404 Client Error: Repository Not Found")
            raise err
        repo = hub_cache_from_folder(folder, tmp_path / "hub", repo_id)
        return str(next((repo / "snapshots").iterdir()))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = load_model("someone/tiny-qwen2")
    assert calls == [("someone/tiny-qwen2", models.HUB_PATTERNS)]
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), hf_log_probs(hf, tokens), atol=ATOL, rtol=0)
    with pytest.raises(ModelLoadError, match="no such repository"):
        load_model("someone/missing")


@pytest.mark.slow
def test_every_page_runs_in_bfloat16(monkeypatch):
    """$CIRCUIT_EXPLORER_DTYPE=bfloat16: the app loads the model in bfloat16 and every page draws."""
    from tests.helpers import open_app

    monkeypatch.setenv("CIRCUIT_EXPLORER_DTYPE", "bfloat16")
    folder, _ = checkpoint("LlamaForCausalLM")
    for page in PAGES:
        at = open_app(model=str(folder), page=page, prompt=TEXT)
        if any(t.key == "pair_corrupted" for t in at.text_input):
            at.text_input(key="pair_corrupted").set_value(TEXT.replace(" home", " house")).run()
        assert not at.exception and not at.error, (page, [e.value for e in at.exception], [e.value for e in at.error])
        if page in ("attention", "attribution", "patching", "circuits", "steering"):
            assert at.get("plotly_chart"), page
    assert any("bfloat16" in c.value for c in at.sidebar.caption)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "GptOssForCausalLM"])
def test_mixture_of_experts_models_run_in_bfloat16(arch):
    """TL makes the router and experts in float32 whatever the model's dtype: cast, the bfloat16
    model runs and passes the load's probe against transformers' own bfloat16 run."""
    folder, hf = checkpoint(arch)
    model = load_model(str(folder), dtype="bfloat16")
    with torch.no_grad():
        logits = model(model.to_tokens(TEXT))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_a_model_whose_bfloat16_rounding_changes_its_answers_is_sent_to_float32():
    """The tiny OLMoE's router picks other experts under the two implementations' bfloat16
    rounding (log-probs 2.2 apart): refused in bfloat16, with the way out; exact in float32."""
    folder, hf = checkpoint("OlmoeForCausalLM")
    with pytest.raises(ModelLoadError, match="Load it in float32"):
        load_model(str(folder), dtype="bfloat16")
    assert load_model(str(folder)).cfg.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("option", [
    ("LlamaForCausalLM", {"attention_bias": True}),
    ("PhiForCausalLM", {"qk_layernorm": True}),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}),
], ids=lambda o: f"{o[0]}-{next(iter(o[1]))}")
def test_a_config_option_transformer_lens_does_not_convert_is_refused(tmp_path, option):
    """Options TL's converters ignore load without an error; the load's probe against transformers
    catches them, names the difference, and nothing is kept on disk."""
    import hf_checkpoints

    arch, extra = option
    spec = hf_checkpoints.ARCH_SPECS[arch]
    patched = hf_checkpoints.Spec(spec.config, {**spec.kwargs, **extra}, spec.covers, spec.tied)
    original = hf_checkpoints.ARCH_SPECS[arch]
    hf_checkpoints.ARCH_SPECS[arch] = patched
    try:
        folder, _ = make_checkpoint(arch, tmp_path / "ckpt")
    finally:
        hf_checkpoints.ARCH_SPECS[arch] = original
    with pytest.raises(ModelLoadError, match="converts to TransformerLens, but not exactly") as err:
        load_model(str(folder))
    assert "log-probabilities differ" in str(err.value)
    key = checkpoints.weights_key(folder, models.converted_root())
    assert not models._converted_dir(key, "float32").exists()


@pytest.mark.slow
def test_a_cached_copy_takes_the_name_it_is_loaded_by(offline_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.helpers import hub_cache_from_folder

    folder, _ = checkpoint("Qwen3ForCausalLM")
    assert load_model(str(folder)).cfg.model_name == folder.name
    repo = hub_cache_from_folder(folder, tmp_path / "hub", "someone/same-weights")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = next((repo / "snapshots").iterdir())
    assert load_model(str(snapshot)).cfg.model_name == snapshot.name
    assert load_model("someone/same-weights").cfg.model_name == "someone/same-weights"  # a cache hit, renamed


@pytest.mark.slow
def test_a_pytorch_bin_checkpoint_loads_and_is_counted_exactly(tmp_path):
    folder, hf = checkpoint("GPT2LMHeadModel")
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save({k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}, binary / "pytorch_model.bin")
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (binary / f.name).write_bytes(f.read_bytes())
    assert checkpoints.weight_files(binary) == [binary / "pytorch_model.bin"]
    assert checkpoints.n_params(binary) == sum(v.numel() for v in hf.state_dict().values())  # not bytes / 4
    model = load_model(str(binary))
    assert model.cfg.original_architecture == "GPT2LMHeadModel"


def test_a_damaged_repo_in_the_hub_cache_is_not_offered_and_breaks_nothing(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.helpers import hub_cache_from_folder

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (bad / "model.safetensors.index.json").write_text("{not json")
    hub_cache_from_folder(bad, tmp_path / "hub", "someone/damaged")
    hub_cache_from_folder(checkpoint("LlamaForCausalLM")[0], tmp_path / "hub", "someone/fine")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.cached_hub_models() == ["someone/fine"]


@pytest.mark.slow
def test_online_a_repo_with_only_its_config_cached_is_downloaded(tmp_path, monkeypatch):
    """A config (or tokenizer) fetched alone, by AutoTokenizer say, is not the model: download it."""
    import huggingface_hub
    from huggingface_hub import constants

    from tests.helpers import hub_cache_from_folder

    folder, hf = checkpoint("LlamaForCausalLM")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_bytes((folder / "config.json").read_bytes())
    hub_cache_from_folder(only_config, tmp_path / "hub", "someone/partial")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kw):
        calls.append(repo_id)
        target = tmp_path / "downloaded"
        if not target.exists():
            target.mkdir()
            for f in folder.iterdir():
                (target / f.name).write_bytes(f.read_bytes())
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = load_model("someone/partial")
    assert calls == ["someone/partial"]
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), hf_log_probs(hf, tokens), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_composition_and_head_sae_directions_are_refused_where_a_norm_follows_each_layer(tmp_path):
    """Gemma 2 normalises each attention layer's output: removing one head's z @ W_O from a later
    input, or reading an hook_z SAE feature as a fixed stream direction, is not defined there."""
    from core import attention, saes
    from tests.helpers import open_app, save_sae

    gemma = load_model(str(checkpoint("Gemma2ForCausalLM")[0]))
    llama = load_model(str(checkpoint("LlamaForCausalLM")[0]))
    assert attention.composition_refusal(llama) is None and attention.composition_refusal(gemma)
    tokens = attention.repeated_random_tokens(gemma, 6, 2, seed=0)
    with pytest.raises(ValueError, match="normalises each attention layer"):
        attention.ablate_composition(gemma, tokens, 6, [(0, 1)], (1, 0), "k")
    at = open_app(model=str(checkpoint("Gemma2ForCausalLM")[0]), page="attention", tab="Head scores", layer="1",
                  head="0")
    assert not at.exception and any("normalises each attention layer" in i.value for i in at.info)
    d_z = gemma.cfg.n_heads * gemma.cfg.d_head
    sae = save_sae(tmp_path / "z", d_z, "blocks.0.attn.hook_z")
    assert saes.decoder_to_residual(gemma, sae) is None
    assert saes.decoder_to_residual(llama, save_sae(tmp_path / "zl", llama.cfg.n_heads * llama.cfg.d_head,
                                                    "blocks.0.attn.hook_z")) is not None
