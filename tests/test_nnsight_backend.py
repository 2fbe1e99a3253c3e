"""The nnsight backend against the TransformerLens backend, here and through a stand-in for NDIF.

Tiny random checkpoints built with `transformers` (`hf_checkpoints`, non-trivial norm weights and
biases) are loaded twice: by the app's TransformerLens path (`TLBackend`) and by nnsight
(`NNsightBackend`). Every view gives the same numbers on both to 1e-4 (float32): attention
patterns, residual norms, the logit lens, direct logit attribution by layer and by head,
activation patching of the residual stream, attention and MLP outputs and heads, attribution
patching, steering, and the primitives (a run with reads and edits, gradients).

The remote path runs the same views through `core.ndif.Transport` against `ndif_standin`, a
local HTTP server that deserializes and runs each request as NDIF does; its failure modes
(refusal, stall, a failed job mid-sweep, a failed download, no server) each end in a message.
No test reaches the network: the remote model's config and tokenizer come from a hub cache
laid out in a temporary folder, with the hub offline.
"""
from __future__ import annotations

import functools
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port, hub_cache_from_folder
from hf_checkpoints import make_checkpoint

from core import ndif
from core.backend import Backend, BackendError, Edit, TLBackend, supported_architectures
from core.models import load_model
from core.nnsight_backend import NNsightBackend, load_local

ATOL = 1e-4
QUICK = ("GPT2LMHeadModel",)
ARCHS = ["GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
         "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"]
BASE = torch.tensor([[0, 5, 6, 7, 8, 9, 10]])
SOURCE = torch.tensor([[0, 5, 16, 7, 8, 19, 10]])
ANSWER, WRONG = 11, 12


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ce-nn-")) / arch
    make_checkpoint(arch, folder)
    return folder


@functools.lru_cache(maxsize=None)
def backends(arch: str) -> tuple[TLBackend, NNsightBackend]:
    folder = checkpoint(arch)
    return TLBackend(load_model(str(folder))), NNsightBackend(load_local(folder))


def close(a, b, what: str, atol: float = ATOL) -> None:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    assert torch.allclose(a, b, atol=atol, rtol=0), f"{what}: max difference {float((a - b).abs().max()):.2e}"


def check_views(x: Backend, y: Backend, arch: str) -> None:
    """Every view of `x` equals `y`'s."""
    n_layers = x.spec.n_layers
    close(x.attention_patterns(BASE, range(n_layers)), y.attention_patterns(BASE, range(n_layers)), "patterns")
    (nx, lx), (ny, ly) = x.residual_norms(BASE), y.residual_norms(BASE)
    assert lx == ly
    close(nx, ny, "residual norms")
    a, b = x.logit_lens(BASE, ANSWER, k=3), y.logit_lens(BASE, ANSWER, k=3)
    assert a.labels == b.labels
    assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.answer_rank, b.answer_rank)
    close(a.top_probs, b.top_probs, "lens probabilities")
    close(a.answer_prob, b.answer_prob, "lens answer probability")
    for wrong in (WRONG, None):
        for by in ("layer", "head"):
            a, b = x.dla(BASE, ANSWER, wrong, by), y.dla(BASE, ANSWER, wrong, by)
            assert a.labels == b.labels, (by, a.labels, b.labels)
            close(a.values, b.values, f"DLA by {by}, wrong={wrong}")
            close(a.bias, b.bias, f"DLA bias by {by}")
            assert a.softcap == b.softcap
    for target in ("resid_pre", "attn_out", "mlp_out", "z"):
        a, b = x.patch(BASE, SOURCE, ANSWER, WRONG, target), y.patch(BASE, SOURCE, ANSWER, WRONG, target)
        close(a.values, b.values, f"patching {target}")
        close(a.base, b.base, "base metric")
        close(a.source, b.source, "source metric")
        assert not torch.isnan(a.values).any() and a.failed is None and b.failed is None
        a, b = (x.attribution_patch(BASE, SOURCE, ANSWER, None, target),
                y.attribution_patch(BASE, SOURCE, ANSWER, None, target))
        close(a.values, b.values, f"attribution patching {target}")
    vector = torch.randn(x.spec.d_model, generator=torch.Generator().manual_seed(1))
    a, b = x.steer(BASE, n_layers - 1, vector, 4.0, from_pos=2), y.steer(BASE, n_layers - 1, vector, 4.0, from_pos=2)
    assert [r["token"] for r in a["rows"]] == [r["token"] for r in b["rows"]]
    close([r["logit change"] for r in a["rows"]], [r["logit change"] for r in b["rows"]], "steering")
    close(a["kl"], b["kl"], "steering KL")


@pytest.mark.parametrize("arch", [a if a in QUICK else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_every_view_equals_the_transformer_lens_backend(arch):
    tl, nn = backends(arch)
    check_views(tl, nn, arch)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", pytest.param("LlamaForCausalLM", marks=pytest.mark.slow),
                                  pytest.param("Qwen2ForCausalLM", marks=pytest.mark.slow)])
def test_runs_with_reads_edits_and_gradients_equal(arch):
    tl, nn = backends(arch)
    d = tl.spec.d_model
    reads = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.0.hook_mlp_out",
             "blocks.1.attn.hook_z", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post"]
    add = torch.linspace(-1, 1, d)
    add = add - add.mean()  # centred: a LayerNorm model's residual stream is read centred (see core.backend)
    edits = [Edit("blocks.0.attn.hook_z", "zero", head=1, pos=2),
             Edit("blocks.1.hook_resid_pre", "add", add, start=3),
             Edit("blocks.1.hook_mlp_out", "patch", torch.full((d,), 0.5) - 0.5 * tl.spec.layer_norm, pos=-1)]
    x, y = tl.run(BASE, reads, edits, logit_positions=[-1]), nn.run(BASE, reads, edits, logit_positions=[-1])
    for name in reads:
        close(x[name], y[name], name)
    # TL centres the unembedding; the logits agree up to a constant per position.
    close(x["logits"] - x["logits"].mean(-1, keepdim=True), y["logits"] - y["logits"].mean(-1, keepdim=True), "logits")
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"]
    gx, gy = tl.gradients(BASE, hooks, ANSWER, WRONG), nn.gradients(BASE, hooks, ANSWER, WRONG)
    for name in hooks:
        close(gx[name], gy[name], f"gradient at {name}")


@pytest.mark.slow
def test_transformer_lens_backend_sweeps_equal_transformer_lens_patching():
    """The TL backend's batched sweeps against `transformer_lens.patching`, the field's reference."""
    from transformer_lens import patching

    tl, _ = backends("GPT2LMHeadModel")
    model = tl.model
    _, source_cache = model.run_with_cache(SOURCE)

    def metric(logits):
        return logits[0, -1, ANSWER] - logits[0, -1, WRONG]

    refs = {"resid_pre": patching.get_act_patch_resid_pre, "attn_out": patching.get_act_patch_attn_out,
            "mlp_out": patching.get_act_patch_mlp_out, "z": patching.get_act_patch_attn_head_out_all_pos}
    for target, ref in refs.items():
        expected = ref(model, BASE, source_cache, metric)
        close(tl.patch(BASE, SOURCE, ANSWER, WRONG, target).values, expected, f"TL backend {target}")


def test_unsupported_architecture_is_named():
    from core.backend import check_architecture

    with pytest.raises(BackendError, match="GPTJForCausalLM.*GPT2LMHeadModel"):
        check_architecture("GPTJForCausalLM")
    assert "LlamaForCausalLM" in supported_architectures()


def test_backends_on_one_model_share_its_lock_and_refuse_batches():
    """The page builds a backend per run over one cached model: they must share its lock. The
    views take one prompt at a time, on both backends."""
    tl, nn = backends("GPT2LMHeadModel")
    assert NNsightBackend(nn.lm).lock is nn.lock
    for backend in (tl, nn):
        with pytest.raises(BackendError, match="one prompt at a time"):
            backend.dla(torch.cat([BASE, SOURCE]), ANSWER, WRONG)
        with pytest.raises(BackendError, match="at most"):
            backend.residual_norms(torch.zeros(1, backend.spec.n_ctx + 1, dtype=torch.long))
    assert nn.attention_patterns(BASE, [1, 0]).shape[0] == 2
    # The page's TL backend reads its runs from the app's activation store: the same numbers.
    from core.store import ActivationStore

    stored = TLBackend(tl.model, store=ActivationStore())
    close(stored.dla(BASE, ANSWER, WRONG, "head").values, nn.dla(BASE, ANSWER, WRONG, "head").values, "DLA from the store")
    assert stored.top_prediction(BASE) == nn.top_prediction(BASE) == tl.top_prediction(BASE)
    close(nn.attention_patterns(BASE, [1, 0]), tl.attention_patterns(BASE, [1, 0]), "layers in the asked order")


def test_patching_refuses_prompts_of_different_lengths():
    _, nn = backends("GPT2LMHeadModel")
    with pytest.raises(BackendError, match="same length"):
        nn.patch(BASE, SOURCE[:, :-1], ANSWER, WRONG)


@pytest.mark.slow
def test_concurrent_views_and_tokenisation_share_one_model():
    """Sessions share one nnsight model: views and tokenisation from several threads at once give
    what each gives alone."""
    _, nn = backends("GPT2LMHeadModel")
    alone = (nn.dla(BASE, ANSWER, WRONG, "head").values, nn.patch(BASE, SOURCE, ANSWER, WRONG, "z").values,
             nn.to_tokens("the old king"))
    errors, results = [], []

    def work():
        try:
            for _ in range(3):
                results.append((nn.dla(BASE, ANSWER, WRONG, "head").values,
                                nn.patch(BASE, SOURCE, ANSWER, WRONG, "z").values, nn.to_tokens("the old king")))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9
    for dla, patch, tokens in results:
        close(dla, alone[0], "concurrent DLA")
        close(patch, alone[1], "concurrent patching")
        assert torch.equal(tokens, alone[2])


# ---------------------------------------------------------------------------------------------
# Remote, against the stand-in
# ---------------------------------------------------------------------------------------------

REPO = "test-org/tiny-llama"
REPOS = {"LlamaForCausalLM": REPO, "GPT2LMHeadModel": "test-org/tiny-gpt2"}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """(stand-in process, {arch: meta-built remote model}, {arch: local nnsight backend}, hub cache)
    for a Llama and a GPT-2 checkpoint, served by `ndif_standin` in a process of its own."""
    from huggingface_hub import constants
    from ndif_standin import StandinProcess

    cache = tmp_path_factory.mktemp("hub")
    metas, locals_ = {}, {}
    old = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    try:
        for arch, repo in REPOS.items():
            hub_cache_from_folder(checkpoint(arch), cache, repo)
            metas[arch] = ndif.remote_model(repo)
            assert str(next(metas[arch]._module.parameters()).device) == "meta"  # no weights here
            locals_[arch] = NNsightBackend(load_local(checkpoint(arch)))
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = old
    standin = StandinProcess({metas[arch].to_model_key(): checkpoint(arch) for arch in REPOS})
    standin.hub_cache = str(cache)
    yield standin, metas, locals_
    standin.close()


@pytest.fixture
def service(services):
    standin, metas, locals_ = services
    standin.mode = "ok"
    yield standin, metas["LlamaForCausalLM"], locals_["LlamaForCausalLM"]
    standin.mode = "ok"


def remote(standin, meta, timeout: float = 30, tokens: int = 4096, key: str = "test-key") -> NNsightBackend:
    s = ndif.Settings(host=standin.url, api_key=key, timeout=timeout, tokens_per_request=tokens)
    return NNsightBackend(meta, ndif.Transport(s, poll_every=0.02))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_remote_views_equal_local_ones_and_are_logged(services, arch):
    """Every view, a run with reads and edits, and gradients, sent to the stand-in (its own process,
    where this package cannot be imported) equal the same computations here."""
    standin, metas, locals_ = services
    standin.mode = "ok"
    local, rb = locals_[arch], remote(standin, metas[arch])
    check_views(local, rb, arch)
    reads = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern"]
    edits = [Edit("blocks.0.attn.hook_z", "zero", head=1, pos=2),
             Edit("blocks.0.hook_resid_pre", "add", torch.linspace(-1, 1, local.spec.d_model), start=4)]
    x, y = local.run(BASE, reads, edits, [-1]), rb.run(BASE, reads, edits, [-1])
    for name in [*reads, "logits"]:
        close(x[name], y[name], f"remote run: {name}")
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]
    gx, gy = local.gradients(BASE, hooks, ANSWER, WRONG), rb.gradients(BASE, hooks, ANSWER, WRONG)
    for name in hooks:
        close(gx[name], gy[name], f"remote gradient: {name}")
    log = rb.transport.log
    assert {r.status for r in log} == {"done"} and all(r.sent > 0 and r.received > 0 for r in log)
    received = standin.received
    assert received[-1]["api_key"] == "test-key"
    # Eager attention only where attention weights are read; SDPA otherwise.
    envs = [r["env"]["attn_implementation"] for r in received[-len(log):]]
    assert [w.what for w, env in zip(log, envs) if env == "eager"] == ["attention patterns", "run"]
    # One request per view: a sweep of 2 layers x 7 positions fits in one.
    assert sum(r.what == "patching" for r in log) == 4


@pytest.mark.slow
def test_a_sweep_is_cut_into_requests_of_the_configured_size(service):
    standin, meta, local = service
    rb = remote(standin, meta, tokens=7 * 6)  # 6 rows a request: source, base and 4 patches
    shares = []
    result = rb.patch(BASE, SOURCE, ANSWER, WRONG, "resid_pre", progress=lambda f, text: shares.append(f))
    assert len(rb.transport.log) == 4  # 14 patches / 4 per request
    assert shares == [0, 0.25, 0.5, 0.75, 1.0]  # a progress step per request
    close(result.values, local.patch(BASE, SOURCE, ANSWER, WRONG, "resid_pre").values, "chunked sweep")


@pytest.mark.slow
def test_refusal_says_why(service):
    standin, meta, _ = service
    standin.mode = "refuse"
    with pytest.raises(ndif.RemoteRefused, match="401.*Invalid API key.*NDIF_API_KEY"):
        remote(standin, meta).dla(BASE, ANSWER, WRONG)
    standin.mode = "too_large"
    with pytest.raises(ndif.RemoteRefused, match="413.*CIRCUIT_EXPLORER_NDIF_TOKENS"):
        remote(standin, meta).dla(BASE, ANSWER, WRONG)
    standin.mode = "refuse_in_body"  # NDIF's own way: HTTP 200, status ERROR, a traceback
    start = time.perf_counter()
    with pytest.raises(ndif.RemoteRefused, match="refused the direct logit attribution request: Exception: Invalid API "
                                                 "key.*NDIF_API_KEY"):
        remote(standin, meta).dla(BASE, ANSWER, WRONG)
    assert time.perf_counter() - start < 2  # at once, not after polling to the deadline


@pytest.mark.slow
def test_a_stalled_job_times_out_with_its_id(service):
    standin, meta, _ = service
    standin.mode = "stall"
    start = time.perf_counter()
    with pytest.raises(ndif.RemoteTimeout, match="did not finish .* in 1 s.*job [0-9a-f]+"):
        remote(standin, meta, timeout=1).residual_norms(BASE)
    assert time.perf_counter() - start < 3


@pytest.mark.slow
def test_a_hanging_service_is_bounded_by_the_deadline(service):
    """A status request that gets no answer does not outlast the deadline (nnsight's own HTTP
    timeouts are 10 s to connect and 600 s to read)."""
    standin, meta, _ = service
    standin.control(mode="hang", hang=8.0)
    start = time.perf_counter()
    with pytest.raises(ndif.RemoteTimeout, match="did not finish"):
        remote(standin, meta, timeout=1.5).residual_norms(BASE)
    assert time.perf_counter() - start < 4


@pytest.mark.slow
def test_gradients_work_on_a_server_that_runs_with_gradients_off(service):
    standin, meta, local = service
    standin.control(mode="ok", grad=False)
    try:
        rb = remote(standin, meta)
        close(rb.attribution_patch(BASE, SOURCE, ANSWER, WRONG, "z").values,
              local.attribution_patch(BASE, SOURCE, ANSWER, WRONG, "z").values, "attribution patching, gradients off")
        close(rb.dla(BASE, ANSWER, WRONG).values, local.dla(BASE, ANSWER, WRONG).values, "DLA, gradients off")
    finally:
        standin.control(mode="ok", grad=True)


@pytest.mark.slow
def test_a_busy_service_is_asked_again(service):
    """HTTP 503 on the first status requests: asked again until it answers, then the result."""
    standin, meta, local = service
    standin.mode = "flaky"
    norms, _ = remote(standin, meta).residual_norms(BASE)
    close(norms, local.residual_norms(BASE)[0], "after 503s")


@pytest.mark.slow
def test_partial_failure_keeps_the_finished_requests(service):
    standin, meta, local = service
    standin.control(mode="error_after", ok_jobs=1)
    rb = remote(standin, meta, tokens=7 * 6)
    result = rb.patch(BASE, SOURCE, ANSWER, WRONG, "resid_pre")
    assert "1 of 4 requests finished" in result.failed and "CUDA out of memory" in result.failed
    done = ~torch.isnan(result.values)
    assert int(done.sum()) == 4  # the first request's four patches
    close(result.values[done], local.patch(BASE, SOURCE, ANSWER, WRONG, "resid_pre").values[done], "kept rows")
    # Run again: the finished request is not sent again, the missing ones are.
    standin.mode = "ok"
    again = rb.patch(BASE, SOURCE, ANSWER, WRONG, "resid_pre")
    assert again.failed is None and len(rb.transport.log) == 2 + 3  # 1 done + 1 failed, then the 3 missing
    close(again.values, local.patch(BASE, SOURCE, ANSWER, WRONG, "resid_pre").values, "completed sweep")
    # A request that fails on its own is an error, not an empty view.
    standin.control(mode="error_after", ok_jobs=0)
    with pytest.raises(ndif.RemoteFailed, match="failed on NDIF.*CUDA out of memory"):
        rb.dla(BASE, ANSWER, WRONG)


@pytest.mark.slow
@pytest.mark.parametrize("mode, message", [("bad_result", "could not be read"), ("no_data", "sent no result")])
def test_a_broken_result_is_an_error(service, mode, message):
    standin, meta, _ = service
    standin.mode = mode
    with pytest.raises(ndif.RemoteFailed, match=message):
        remote(standin, meta).logit_lens(BASE, ANSWER)


def test_unreachable_service_fails_fast():
    s = ndif.Settings(host=f"http://127.0.0.1:{free_port()}", api_key="k", timeout=30, tokens_per_request=4096)
    start = time.perf_counter()
    with pytest.raises(ndif.RemoteUnreachable, match="cannot be reached"):
        ndif.served_models(s)
    assert time.perf_counter() - start < ndif.STATUS_TIMEOUT + 1


@pytest.mark.slow
def test_a_request_to_an_unreachable_service_fails_fast(service):
    _, meta, _ = service
    s = ndif.Settings(host=f"http://127.0.0.1:{free_port()}", api_key="k", timeout=30, tokens_per_request=4096)
    start = time.perf_counter()
    with pytest.raises(ndif.RemoteUnreachable, match="cannot be reached"):
        NNsightBackend(meta, ndif.Transport(s)).residual_norms(BASE)
    assert time.perf_counter() - start < ndif.STATUS_TIMEOUT + 1


@pytest.mark.slow
def test_served_models_are_listed(service):
    standin, _, _ = service
    s = ndif.Settings(host=standin.url, api_key="", timeout=5, tokens_per_request=4096)
    assert ndif.served_models(s) == sorted(REPOS.values())


def test_remote_model_offline_without_a_cached_config_says_so(tmp_path):
    from huggingface_hub import constants

    old = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(tmp_path), True
    try:
        with pytest.raises(BackendError, match="config and tokenizer"):
            ndif.remote_model("meta-llama/Llama-3.1-70B")
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = old


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "abc")
    monkeypatch.setenv("NDIF_HOST", "http://example.invalid/")
    monkeypatch.setenv("CIRCUIT_EXPLORER_NDIF_TIMEOUT", "nonsense")
    s = ndif.settings()
    assert s.api_key == "abc" and s.host == "http://example.invalid" and s.timeout == ndif.DEFAULT_TIMEOUT
    monkeypatch.delenv("NDIF_API_KEY")
    assert not ndif.settings().has_key


# ---------------------------------------------------------------------------------------------
# The Large models page
# ---------------------------------------------------------------------------------------------

PAGE_VIEWS = ["dla_layers", "dla_heads", "logit_lens", "attention", "residual_norms", "patching",
              "attribution_patching", "steering"]


def page_problems(at) -> list:
    return [e.value for e in at.exception] + [e.value for e in at.error]


def errors(at) -> list[str]:
    """The page's error messages as plain text (they are Markdown-escaped)."""
    from helpers import plain

    return [plain(e.value) for e in at.error]


@pytest.mark.slow
def test_page_shows_every_view_on_the_apps_model():
    from helpers import open_app

    at = open_app(page="remote")
    assert not page_problems(at) and at.get("plotly_chart")  # opens on a chart
    for v in PAGE_VIEWS:
        at.selectbox(key="nn_view").set_value(v).run()
        assert not page_problems(at), (v, page_problems(at))
        assert at.get("plotly_chart"), v


@pytest.mark.slow
def test_page_runs_a_folder_with_nnsight_and_refuses_bad_input(tmp_path):
    from helpers import MARKUP_TOKENS, open_app

    at = open_app(page="remote")
    at.radio(key="nn_where").set_value("local").run()
    at.text_input(key="nn_folder").set_value(str(checkpoint("GPT2LMHeadModel"))).run()
    at.text_input(key="nn_answer_hf").set_value("").run()  # the model's top prediction
    for v in PAGE_VIEWS:
        at.selectbox(key="nn_view").set_value(v).run()
        assert not page_problems(at), (v, page_problems(at))
        assert at.get("plotly_chart"), v
    at.text_area(key="nn_prompt").set_value(" ".join(MARKUP_TOKENS)).run()  # shown as text, never run
    assert not at.exception
    at.text_area(key="nn_prompt").set_value("   ").run()
    assert any("empty" in e for e in errors(at))
    at.text_area(key="nn_prompt").set_value("hello world").run()
    at.text_input(key="nn_answer_hf").set_value("hello world again").run()
    assert any("single token" in e for e in errors(at))
    at.text_input(key="nn_folder").set_value(str(tmp_path / "nothing")).run()
    assert any("not a checkpoint folder" in e for e in errors(at)) and not at.exception
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoint("GPT2LMHeadModel"), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    at.text_input(key="nn_folder").set_value(str(corrupt)).run()
    assert any("could not load" in e for e in errors(at)) and not at.exception


def test_page_remote_without_a_key_says_how_to_set_one(monkeypatch):
    from helpers import open_app

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    at = open_app(page="remote")
    at.radio(key="nn_where").set_value("remote").run()
    assert any("NDIF_API_KEY" in e for e in errors(at)) and not at.exception


@pytest.mark.slow
def test_page_remote_unreachable_fails_fast(monkeypatch):
    from helpers import open_app

    monkeypatch.setenv("NDIF_API_KEY", "k")
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{free_port()}")
    at = open_app(page="remote")
    start = time.perf_counter()
    at.radio(key="nn_where").set_value("remote").run()
    assert any("cannot be reached" in e for e in errors(at)) and not at.exception
    assert time.perf_counter() - start < ndif.STATUS_TIMEOUT + 3


@pytest.mark.slow
def test_page_remote_sends_a_view_on_request(service, monkeypatch):
    from helpers import open_app, plain
    from huggingface_hub import constants

    standin, meta, _ = service
    standin.mode = "ok"
    monkeypatch.setenv("NDIF_API_KEY", "k")
    monkeypatch.setenv("NDIF_HOST", standin.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", standin.hub_cache)
    at = open_app(page="remote")
    at.radio(key="nn_where").set_value("remote").run()
    assert at.selectbox(key="nn_repo").value == REPO
    assert not page_problems(at), page_problems(at)
    at.text_input(key="nn_answer_hf").set_value("").run()
    assert any("Give an answer token" in e for e in errors(at))
    at.text_area(key="nn_prompt").set_value("the old king saw").run()
    at.text_input(key="nn_answer_hf").set_value(" bird").run()
    at.text_input(key="nn_wrong_hf").set_value("").run()
    assert not at.get("plotly_chart") and not page_problems(at)  # nothing sent yet
    sent = len(standin.received)
    at.button(key="nn_send").click().run()
    assert not page_problems(at), page_problems(at)
    assert at.get("plotly_chart") and len(standin.received) == sent + 1
    standin.mode = "refuse"
    at.selectbox(key="nn_view").set_value("logit_lens").run()
    at.button(key="nn_send").click().run()
    assert any("refused" in e for e in errors(at)) and not at.exception
    # A sweep whose second request fails: the finished part is shown with a warning; pressing the
    # button again sends only the missing requests and completes it.
    monkeypatch.setenv("CIRCUIT_EXPLORER_NDIF_TOKENS", str(6 * 6))
    standin.control(mode="error_after", ok_jobs=1)
    at.text_area(key="nn_prompt").set_value("the old king saw a bird").run()  # 7 tokens: 3 patches a request
    at.selectbox(key="nn_view").set_value("patching").run()
    at.text_area(key="nn_source").set_value("the old king saw a dog").run()
    at.session_state[f"nn_transport:{REPO}"] = ndif.Transport(ndif.settings(), poll_every=0.02)
    at.run()
    assert not page_problems(at), page_problems(at)
    at.button(key="nn_send").click().run()
    assert not at.exception and at.get("plotly_chart")
    assert any("Part of the sweep is missing" in w for w in [plain(w.value) for w in at.warning])
    sent = len(standin.received)
    standin.mode = "ok"
    at.button(key="nn_send").click().run()
    assert not page_problems(at) and not at.warning and at.get("plotly_chart")
    assert len(standin.received) == sent + 4  # 14 patches in 5 requests; the first finished before
