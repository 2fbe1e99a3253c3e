"""A classroom on one laptop (issue 19): a long sweep must not freeze every other session.

Sweeps hold the model's lock per batch chunk, not per sweep, and the lock is first come, first
served (`store.FairLock`), so another thread's plain forward pass started during a sweep runs
between two of its chunks. The interleaving is checked deterministically (the sweep's progress
callback, called between chunks, waits until the other thread holds the lock, so the plain run
must finish before the next chunk does), and the sweep's numbers are bit-identical to its solo
run. A second check bounds the plain run's latency without that handshake: its solo time plus
twice the sweep's longest chunk (measured here), plus a little scheduling slack.
"""
from __future__ import annotations

import statistics
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core import circuits, patching, path_patching, store

N_PROMPTS, N_POS = 4, 16
SLACK_S = 0.25  # thread start-up and scheduling on a busy 2-core machine


@pytest.fixture(scope="module")
def model():
    cfg = HookedTransformerConfig(n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=32, d_vocab=64,
                                  act_fn="gelu", seed=3)
    return HookedTransformer(cfg).eval()


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 64, (N_PROMPTS, N_POS), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(1, 64, (N_PROMPTS,), generator=g)  # every head's copy recomputes 14 positions
    return clean, corrupted


def _metric(logits):
    return (logits[:, -1, 3] - logits[:, -1, 5]).mean()


def _sweeps(model):
    """name -> run(progress): each sweep with one component (sender, edge) per chunk."""
    clean, corrupted = _pair()
    _, clean_cache = store.run_with_cache(model, clean)
    _, corr_cache = store.run_with_cache(model, corrupted)
    one = N_PROMPTS * N_POS  # max_tokens: one copy per forward pass
    runs = circuits.runs_from_tokens(model, clean, corrupted, _metric)
    return {
        "activation patching (z by position)": lambda progress: patching.run_sweep(
            model, "z_by_pos", corrupted, corr_cache, clean_cache, _metric, progress=progress, max_tokens=one),
        "path patching (every head -> logits)": lambda progress: path_patching.path_patch_to_logits(
            model, clean, corrupted, _metric, clean_cache, corr_cache, progress=progress, max_tokens=one),
        "exact edge patching": lambda progress: circuits.edge_patching(
            model, runs, progress=progress, max_tokens=one).raw,
    }


SWEEP_NAMES = ["activation patching (z by position)", "path patching (every head -> logits)", "exact edge patching"]


def _plain_tokens():
    return torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(9))


def test_fair_lock_serves_waiters_in_order():
    lock = store.FairLock()
    order, ready = [], []
    lock.acquire()
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        deadline = time.monotonic() + 10
        while lock.waiting() < i + 1 and time.monotonic() < deadline:  # queue them one after another
            time.sleep(0.001)
        ready.append(lock.waiting())
        threads.append(t)
    assert ready == [1, 2, 3, 4, 5]
    lock.release()  # the releaser asking again queues behind all five
    lock.acquire()
    assert order == [0, 1, 2, 3, 4]
    lock.release()
    for t in threads:
        t.join()
    assert not lock.locked() and lock.acquire(blocking=False) and not lock.acquire(timeout=0.01)
    lock.release()


@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_a_plain_run_started_during_a_sweep_runs_between_two_of_its_chunks(model, name):
    sweep = _sweeps(model)[name]
    tokens = _plain_tokens()
    solo_sweep = sweep(None)
    solo_logits = store.run(model, tokens)
    lock = store.model_lock(model)
    chunks: list[float] = []  # when each chunk finished
    first = threading.Event()
    plain: dict = {}

    def progress(share):
        chunks.append(time.perf_counter())
        if len(chunks) == 1:
            first.set()
            # Between two chunks (the sweep does not hold the lock here): wait until the other
            # thread holds it or queues for it, so the next chunk must queue behind its run.
            deadline = time.monotonic() + 30
            while "done" not in plain and not lock.locked() and not lock.waiting() and time.monotonic() < deadline:
                time.sleep(0.0005)

    def plain_run():
        torch.set_num_threads(n_threads)
        assert first.wait(30)
        plain["logits"] = store.run(model, tokens)
        plain["done"] = time.perf_counter()

    n_threads = torch.get_num_threads()
    other = threading.Thread(target=plain_run)
    other.start()
    result = sweep(progress)
    other.join(30)
    assert len(chunks) >= 10, "the test needs a sweep of many chunks"
    assert chunks[0] < plain["done"] < chunks[1] < chunks[-1]  # in after chunk 1, out before chunk 2
    assert torch.equal(plain["logits"], solo_logits)
    assert torch.equal(result.nan_to_num(7.0), solo_sweep.nan_to_num(7.0))  # the same numbers as alone
    assert not model.hook_dict["blocks.0.attn.hook_z"].fwd_hooks  # no hook left behind
    assert not model.cfg.use_split_qkv_input


@pytest.mark.slow  # the handshake test above is the quick check
@pytest.mark.parametrize("name", SWEEP_NAMES[:1] + SWEEP_NAMES[2:])
def test_a_plain_run_during_a_sweep_waits_at_most_about_one_chunk(model, name):
    sweep = _sweeps(model)[name]
    tokens = _plain_tokens()
    sweep(None)  # warm up
    solo = []
    for _ in range(5):
        t0 = time.perf_counter()
        store.run(model, tokens)
        solo.append(time.perf_counter() - t0)
    chunks: list[float] = []
    first = threading.Event()
    plain: dict = {}
    start = time.perf_counter()

    def progress(share):
        chunks.append(time.perf_counter())
        if len(chunks) == 1:
            first.set()

    def plain_run():
        torch.set_num_threads(n_threads)
        assert first.wait(30)
        t0 = time.perf_counter()
        store.run(model, tokens)
        plain["done"] = time.perf_counter()
        plain["latency"] = plain["done"] - t0

    n_threads = torch.get_num_threads()
    other = threading.Thread(target=plain_run)
    other.start()
    sweep(progress)
    other.join(30)
    gaps = [b - a for a, b in zip([start] + chunks, chunks)]
    bound = statistics.median(solo) + 2 * max(gaps) + SLACK_S
    assert plain["latency"] <= bound, (plain["latency"], bound, max(gaps), statistics.median(solo))
    assert plain["done"] < chunks[-1]  # it did not wait for the whole sweep


# ---------------------------------------------------------------------------------------------
# Embedded SAE indexes: built ahead, once per server, in a worker no session owns
# ---------------------------------------------------------------------------------------------


class _FakeBuild:
    def __init__(self, name):
        self.name, self.done, self.failed, self.error = name, False, False, None
        self.release = threading.Event()

    def status(self):
        return 0.5, "encoding"

    def wait(self, timeout=None):
        self.release.wait(timeout)
        self.done = True
        return True


def test_prefetch_builds_every_embedded_index_once_the_loaded_models_first(monkeypatch, zoo_model):
    from core import models, sae_index, saes
    from core.ui import cache

    monkeypatch.setenv(cache.PREFETCH_ENV, "1")
    monkeypatch.setattr(cache, "_prefetched", set())
    monkeypatch.setattr(cache, "_prefetch_queue", [])
    monkeypatch.setattr(cache, "_prefetch_status", {})
    monkeypatch.setattr(cache, "_prefetch_worker", None)
    builds: list[_FakeBuild] = []
    requested = threading.Event()

    def request_index(model, loaded, docs, directory=None):
        builds.append(_FakeBuild(loaded.sae_id))
        builds[-1].model = model
        requested.set()
        return builds[-1]

    monkeypatch.setattr(sae_index, "request_index", request_index)
    monkeypatch.setattr(cache.corpus, "documents", lambda spec, tok: [[1, 2, 3]])
    monkeypatch.setattr(saes, "check_fits", lambda model, loaded: None)
    monkeypatch.setattr(saes, "load_embedded", lambda name: SimpleNamespace(sae_id=name, corpus_spec={}))
    monkeypatch.setattr(models, "load_model", lambda name: SimpleNamespace(name=name, tokenizer=None))  # the others
    monkeypatch.setattr(cache.store, "shared_state", lambda model: threading.Lock())
    everything = [n for m in models.zoo_models() for n in saes.embedded_saes(m)]
    mine = saes.embedded_saes(zoo_model.cfg.model_name)
    assert mine and len(everything) > len(mine)

    cache.prefetch_embedded_indexes(zoo_model)
    cache.prefetch_embedded_indexes(zoo_model)  # a second session: nothing queued twice
    assert requested.wait(10)
    # The worker records the build's status just after requesting it: wait for that, not a race.
    deadline = time.monotonic() + 10
    while cache.embedded_index_progress().get(mine[0]) != (0.5, "encoding") and time.monotonic() < deadline:
        time.sleep(0.005)
    progress = cache.embedded_index_progress()
    assert list(progress) == mine + [n for n in everything if n not in mine]  # the loaded model's first
    assert progress[mine[0]] == (0.5, "encoding") and all(v == (0.0, "queued") for v in list(progress.values())[1:])
    for i in range(len(everything)):  # one build at a time: the next is requested when this one is done
        deadline = time.monotonic() + 10
        while len(builds) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(builds) == i + 1, cache.embedded_index_progress()
        builds[i].release.set()
    cache._prefetch_worker.join(10)
    assert [b.name for b in builds] == list(progress)
    assert builds[0].model is zoo_model  # the session's model object, not a second copy
    assert all(isinstance(b.model, SimpleNamespace) for b in builds[len(mine):])
    assert cache.embedded_index_progress() == {n: (1.0, "ready") for n in everything}


def test_prefetch_is_off_in_tests_by_default(monkeypatch, zoo_model):
    from core.ui import cache

    monkeypatch.setattr(cache, "_prefetched", set())
    monkeypatch.setattr(cache, "_prefetch_status", {})
    cache.prefetch_embedded_indexes(zoo_model)
    assert cache.embedded_index_progress() == {}
