import threading
import time

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core import store
from core.store import ActivationStore


@pytest.fixture(scope="module")
def small_model():
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50, act_fn="gelu", seed=1)
    return HookedTransformer(cfg).eval()


def _tokens(seed, n=12):
    return torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(seed))


def _run_in_threads(fn, jobs, n_threads):
    """{job: fn(job)} with the jobs dealt round-robin to n_threads threads started together."""
    results, errors = {}, []
    n_torch_threads = torch.get_num_threads()

    def worker(ids):
        # A new thread's OpenMP team has the default size, not the caller's set_num_threads: with
        # another size a matmul sums in another order (1e-5 apart), so set the same one.
        torch.set_num_threads(n_torch_threads)
        try:
            for i in ids:
                results[i] = fn(i)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(jobs[k::n_threads],)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _zero_head_hook(head):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    return hook


def _job(model, i):
    """Alternate plain, cached and hooked runs; return logits."""
    tokens = _tokens(i % 5)
    kind = i % 3
    if kind == 0:
        return store.run(model, tokens)
    if kind == 1:
        return store.run_with_cache(model, tokens)[0]
    return store.run_with_hooks(model, tokens, [("blocks.0.attn.hook_z", _zero_head_hook(i % 4))])


def test_concurrent_runs_are_bit_identical_to_sequential(small_model):
    jobs = list(range(48))
    expected = {i: _job(small_model, i) for i in jobs}
    results = _run_in_threads(lambda i: _job(small_model, i), jobs, n_threads=6)
    for i in jobs:
        assert torch.equal(results[i], expected[i]), i
    plain = store.run(small_model, _tokens(2))
    hooked = store.run_with_hooks(small_model, _tokens(2), [("blocks.0.attn.hook_z", _zero_head_hook(0))])
    assert not torch.equal(plain, hooked)


def test_hooks_are_removed_on_error(small_model):
    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.run_with_hooks(small_model, _tokens(0), [("blocks.0.hook_resid_pre", boom)])
    assert all(len(hp.fwd_hooks) == 0 for hp in small_model.hook_dict.values())
    torch.testing.assert_close(store.run(small_model, _tokens(0)), small_model(_tokens(0)), rtol=0, atol=0)


def test_split_qkv_is_restored_after_use_and_on_error(small_model):
    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.run_with_hooks(small_model, _tokens(0), [("blocks.1.hook_k_input", boom)], use_split_qkv_input=True)
    assert small_model.cfg.use_split_qkv_input is False


def test_store_runs_once_per_model_and_tokens(small_model):
    s = ActivationStore(max_bytes=10**9)
    a = s.get(small_model, _tokens(0))
    b = s.get(small_model, _tokens(0))
    assert a is b and s.hits == 1 and s.misses == 1
    logits, cache = small_model.run_with_cache(_tokens(0))
    assert torch.equal(a.logits, logits)
    assert torch.equal(a.cache["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"])
    assert len(s.entries()) == 1 and "1 cached run" in s.describe()


def test_store_never_exceeds_its_cap(small_model):
    one = ActivationStore(max_bytes=10**9).get(small_model, _tokens(0)).nbytes
    s = ActivationStore(max_bytes=int(2.5 * one))
    for i in range(10):
        s.get(small_model, _tokens(i))
        assert s.nbytes <= s.max_bytes
    assert len(s.entries()) == 2  # the two most recent
    s.get(small_model, _tokens(8))  # a hit: nothing evicted
    assert s.hits == 1 and len(s.entries()) == 2
    s.get(small_model, _tokens(0))  # a miss evicts the least recently used (tokens 9)
    s.get(small_model, _tokens(8))
    assert s.hits == 2


def test_store_returns_but_does_not_keep_a_run_larger_than_the_cap(small_model):
    s = ActivationStore(max_bytes=10)
    run = s.get(small_model, _tokens(0))
    assert run.logits.shape == (1, 12, 50)
    assert s.entries() == [] and s.nbytes == 0


def test_store_cap_from_environment(monkeypatch):
    monkeypatch.setenv(store.MAX_BYTES_ENV, "12345")
    assert ActivationStore().max_bytes == 12345


def test_concurrent_store_gets_compute_once(small_model):
    s = ActivationStore(max_bytes=10**9)
    out = []
    threads = [threading.Thread(target=lambda: out.append(s.get(small_model, _tokens(3)))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.misses == 1 and all(o is out[0] for o in out)


def test_distinct_models_do_not_share_entries(small_model):
    other = HookedTransformer(small_model.cfg).eval()
    s = ActivationStore(max_bytes=10**9)
    a = s.get(small_model, _tokens(0))
    b = s.get(other, _tokens(0))
    assert a is not b and s.misses == 2 and len(s.entries()) == 2


def test_forward_pass_from_inside_a_hook_is_refused(small_model):
    def nested(x, hook):
        store.run(small_model, _tokens(1))
        return x

    with pytest.raises(RuntimeError, match="inside another one"):
        store.run_with_hooks(small_model, _tokens(0), [("blocks.0.hook_resid_pre", nested)])
    assert all(len(hp.fwd_hooks) == 0 for hp in small_model.hook_dict.values())
    store.run(small_model, _tokens(0))  # the lock was released


def test_stray_hooks_are_cleared_before_a_stored_run(small_model):
    s = ActivationStore(max_bytes=10**9)

    def boom(x, hook):
        raise RuntimeError("boom")

    small_model.add_hook("blocks.0.hook_resid_pre", boom)  # a stray hook: the store clears it
    run = s.get(small_model, _tokens(4))
    assert torch.equal(run.logits, small_model(_tokens(4)))
    assert s.nbytes == run.nbytes


def test_concurrent_store_gets_hooked_runs_and_split_qkv_ablations_match_sequential(zoo_model):
    """Threads mixing store.get (full caches), plain runs and Q/K/V ablations (which switch the
    model's split-qkv mode) get exactly the sequential results; the store stays under its cap."""
    from core import attention

    toks = [attention.repeated_random_tokens(zoo_model, 8, 2, seed=i) for i in range(4)]

    def job(s, i):
        t = toks[i % 4]
        kind = i % 3
        if kind == 0:
            run = s.get(zoo_model, t)
            return ("get", run.logits, run.cache["blocks.1.attn.hook_pattern"], run.cache["blocks.0.hook_resid_post"])
        if kind == 1:
            return ("plain", store.run(zoo_model, t))
        r = attention.ablate_composition(zoo_model, t, 8, [(0, 2), (0, 3)], (1, 1), "kqv"[(i // 3) % 3])
        return ("ablate", r.target_score, r.loss)

    one = ActivationStore(max_bytes=10**9).get(zoo_model, toks[0]).nbytes
    expected = {i: job(ActivationStore(max_bytes=10**9), i) for i in range(36)}
    shared = ActivationStore(max_bytes=int(2.5 * one))
    results = _run_in_threads(lambda i: job(shared, i), list(range(36)), n_threads=4)
    for i, exp in expected.items():
        got = results[i]
        assert got[0] == exp[0]
        for a, b in zip(got[1:], exp[1:]):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), i
            else:
                assert a == b, i
    assert shared.nbytes <= shared.max_bytes and len(shared.entries()) <= 2
    assert zoo_model.cfg.use_split_qkv_input is False


# ---------------------------------------------------------------------------------------------
# Accounting: each storage counted once, totals read under the lock
# ---------------------------------------------------------------------------------------------


def test_entry_size_counts_shared_storage_once(small_model):
    run = ActivationStore(max_bytes=10**9).get(small_model, _tokens(0))
    cache = run.cache.cache_dict
    # TransformerLens caches resid_post of layer 0 and resid_pre of layer 1 as one tensor.
    assert cache["blocks.0.hook_resid_post"].untyped_storage().data_ptr() == \
        cache["blocks.1.hook_resid_pre"].untyped_storage().data_ptr()
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [run.logits, *cache.values()]}
    assert run.nbytes == sum(unique.values())
    assert run.nbytes < run.logits.nbytes + sum(t.nbytes for t in cache.values())  # the old double count


def test_store_total_is_never_seen_above_the_cap_while_threads_insert(small_model):
    one = ActivationStore(max_bytes=10**9).get(small_model, _tokens(0)).nbytes
    s = ActivationStore(max_bytes=int(1.5 * one))
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(s.nbytes)
            time.sleep(1e-4)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        _run_in_threads(lambda i: s.get(small_model, _tokens(i)).nbytes, list(range(40)), n_threads=4)
    finally:
        stop.set()
        watcher.join()
    assert seen and max(seen) <= s.max_bytes
    assert s.nbytes == sum(e.nbytes for e in s.entries())


# ---------------------------------------------------------------------------------------------
# Shared model state beyond hooks: tokenisation and task building under the same lock
# ---------------------------------------------------------------------------------------------


def test_concurrent_tokenisation_and_task_building_match_sequential():
    """TransformerLens's to_tokens flips model.cfg.default_prepend_bos (and the tokenizer's
    padding side) while it runs. Threads that tokenise with and without BOS, build tasks (hundreds
    of tokenisations each), prepare prompts and run the model must all get the sequential results."""
    from core import prompts, tasks
    from core.models import load_model

    model = load_model("ce-circuits-3l-attn")
    texts = ["When Mary and John went to the store, John gave a drink to", "the cat sat on the mat",
             "The keys on the cabinet"]

    def job(i):
        kind = i % 5
        text = texts[i % 3]
        if kind == 0:
            t = tasks.make_task(["ioi", "sva"][(i // 5) % 2], model, n=4, seed=i % 3)
            return ("task", t.clean_tokens, t.corrupted_tokens, t.answers, t.wrongs)
        if kind == 1:
            p = prompts.prepare_prompt(model, text)
            return ("prompt", p.tokens, tuple(p.str_tokens))
        if kind == 2:  # flips default_prepend_bos to False for the call
            return ("no-bos", store.to_tokens(model, text, prepend_bos=False))
        if kind == 3:  # padding side flipped for the call
            return ("left", store.to_tokens(model, texts, padding_side="left"))
        return ("run", store.run(model, prompts.prepare_prompt(model, text).tokens))

    jobs = list(range(60))
    expected = {i: job(i) for i in jobs}
    results = _run_in_threads(job, jobs, n_threads=4)
    for i in jobs:
        assert results[i][0] == expected[i][0]
        for got, exp in zip(results[i][1:], expected[i][1:]):
            assert (torch.equal(got, exp) if isinstance(got, torch.Tensor) else got == exp), (i, results[i][0])
    assert model.cfg.default_prepend_bos is True and model.tokenizer.padding_side == "right"


def test_tokenising_inside_a_locked_section_does_not_deadlock(zoo_model):
    model = zoo_model
    with store.locked(model):
        tokens = store.to_tokens(model, "the cat sat")  # re-entrant for the thread that holds the lock
        assert store.decode(model, tokens[0, 1:]) == "the cat sat"
    assert store.str_tokens(model, tokens[0]) == ["<|bos|>", "the", "cat", "sat"]


def test_tokenising_takes_the_lock_but_not_a_forward_pass_inside_it(zoo_model):
    """`shared_state` (tokenise, decode) excludes a forward pass on another thread, is re-entrant,
    and refuses a forward pass started inside it, like `locked`."""
    ran = []

    def forward():
        store.run(zoo_model, torch.tensor([[1, 5, 6]]))
        ran.append(time.monotonic())

    with store.shared_state(zoo_model):
        assert store.to_tokens(zoo_model, "the cat").shape[0] == 1  # re-entrant
        t = threading.Thread(target=forward)
        t.start()
        time.sleep(0.3)
        assert not ran  # waits for the lock
        released = time.monotonic()
        with pytest.raises(RuntimeError, match="inside another one"):
            store.run(zoo_model, torch.tensor([[1, 5]]))
    t.join(10)
    assert ran and ran[0] >= released
