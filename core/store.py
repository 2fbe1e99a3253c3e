"""The activation store and the one path through which every forward pass goes.

TransformerLens hooks live on the model object, and Streamlit serves every browser session
from its own thread against the same cached model. So every forward pass on a model (plain,
cached or hooked) runs here, under that model's lock, and hooks are always removed afterwards,
on error too. Concurrent callers get exactly the results they would get alone. A long sweep takes
the lock once per batch chunk, and the lock is first come, first served, so another session's
forward pass waits for the chunk in progress, never for the whole sweep.

The same lock covers every other use of state that TransformerLens keeps on the model:
`to_tokens` rewrites `model.cfg.default_prepend_bos` and the tokenizer's `padding_side` while it
runs, and a Hugging Face fast tokenizer is not safe to encode from two threads at once. So text
goes in and out through `to_tokens`, `decode` and `str_tokens` here, never through the model's
own methods.

`ActivationStore` keeps one `run_with_cache` per (model, tokens), shared by every page and
every session, bounded in bytes (least recently used entries are evicted first).
"""
from __future__ import annotations

import os
import threading
import uuid
import weakref
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from transformer_lens import ActivationCache, HookedTransformer

DEFAULT_MAX_BYTES = 2 * 1024**3
MAX_BYTES_ENV = "CIRCUIT_EXPLORER_STORE_BYTES"

HookFn = Callable[..., torch.Tensor | None]

class FairLock:
    """A lock handed to its waiters in the order they came (first come, first served).

    A plain `threading.Lock` is not fair: a thread that releases it and asks again at once (a
    sweep going from one batch chunk to the next) nearly always gets it back before a waiting
    thread wakes up, so a long sweep would starve every other session's forward pass even though
    it lets go between chunks. Here a release hands the lock straight to the longest waiter, and
    a newcomer queues behind every waiter. Not re-entrant.
    """

    def __init__(self):
        self._guard = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._guard:
            if not self._held and not self._waiters:
                self._held = True
                return True
            if not blocking:
                return False
            ticket = threading.Lock()
            ticket.acquire()
            self._waiters.append(ticket)
        if ticket.acquire(timeout=timeout if timeout >= 0 else -1):
            return True
        with self._guard:  # timed out, unless a release handed the lock over meanwhile
            try:
                self._waiters.remove(ticket)
            except ValueError:
                return True
            return False

    def release(self) -> None:
        with self._guard:
            if not self._held:
                raise RuntimeError("release of an unlocked FairLock")
            if self._waiters:
                self._waiters.popleft().release()  # ownership passes on; the lock stays held
            else:
                self._held = False

    def locked(self) -> bool:
        with self._guard:
            return self._held

    def waiting(self) -> int:
        """Threads queued for the lock now."""
        with self._guard:
            return len(self._waiters)

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_locks: "weakref.WeakKeyDictionary[HookedTransformer, FairLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()
_held = threading.local()  # ids of the models whose lock this thread holds


def model_lock(model: HookedTransformer) -> FairLock:
    """The lock every forward pass on `model` holds (one per model object, first come first served).

    Long sweeps (patching, path patching, edge patching, ACDC, SAE index builds) hold it per batch
    chunk, not per sweep, so other sessions' forward passes run between two chunks: a plain run
    waits at most for the chunk in progress, however long the sweep.
    """
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = FairLock()
        return lock


def model_key(model: HookedTransformer) -> str:
    """A stable key for `model`: its load name where known, plus a per-object token.

    Not `id(model)`: ids are reused after garbage collection, so a cache keyed by them can
    hand one model's activations to another.
    """
    key = getattr(model, "_circuit_explorer_key", None)
    if key is None:
        key = f"{model.cfg.model_name}#{uuid.uuid4().hex[:8]}"
        model._circuit_explorer_key = key
    return key


@contextmanager
def locked(model: HookedTransformer, use_split_qkv_input: bool = False) -> Iterator[HookedTransformer]:
    """Hold `model`'s lock; optionally switch on TL's split q/k/v inputs for the duration.

    Hooks already on the model are cleared on entry and on exit, so nothing leaks between
    callers. A forward pass started from inside another one (say, from a hook) would wipe the
    outer pass's hooks, so it raises instead.
    """
    held = getattr(_held, "models", None)
    if held is None:
        held = _held.models = set()
    if id(model) in held:
        raise RuntimeError("a forward pass on this model was started from inside another one (e.g. in a hook)")
    with model_lock(model):
        held.add(id(model))
        old_split = model.cfg.use_split_qkv_input
        try:  # everything after taking the lock is undone in `finally`, whatever raises
            model.reset_hooks(including_permanent=False)
            if use_split_qkv_input != old_split:
                model.set_use_split_qkv_input(use_split_qkv_input)
            yield model
        finally:
            model.reset_hooks(including_permanent=False)
            if model.cfg.use_split_qkv_input != old_split:
                model.set_use_split_qkv_input(old_split)
            held.discard(id(model))


@contextmanager
def shared_state(model: HookedTransformer) -> Iterator[None]:
    """Hold `model`'s lock for a use of its shared state that is not a forward pass.

    Re-entrant within one thread (a hook or a page already inside `locked` may tokenise), unlike
    `locked`, which refuses a nested forward pass.
    """
    held = getattr(_held, "models", None)
    if held is None:
        held = _held.models = set()
    if id(model) in held:
        yield
        return
    # The lock without `locked`'s hook reset: hooks live only inside `locked`, which clears them on
    # exit, so none are on the model here (and resetting them twice costs about 2 ms on GPT-2 small,
    # which hundreds of tokenisations a page run would pay).
    with model_lock(model):
        held.add(id(model))
        try:
            yield
        finally:
            held.discard(id(model))


def to_tokens(model: HookedTransformer, text: str | list[str], prepend_bos: bool = True,
              truncate: bool = False, padding_side: str | None = None) -> torch.Tensor:
    """`model.to_tokens` under the model's lock: [batch, pos] token ids on the CPU."""
    kwargs = {} if padding_side is None else {"padding_side": padding_side}
    with shared_state(model):
        return model.to_tokens(text, prepend_bos=prepend_bos, truncate=truncate, move_to_device=False, **kwargs)


def decode(model: HookedTransformer, tokens) -> str:
    """The text of token ids (an int, a list or a tensor), under the model's lock."""
    ids = [int(tokens)] if isinstance(tokens, int) or getattr(tokens, "ndim", 1) == 0 else [int(t) for t in tokens]
    with shared_state(model):
        return model.tokenizer.decode(ids)


def str_tokens(model: HookedTransformer, tokens) -> list[str]:
    """The text of each token id of `tokens` ([pos] or a list), under the model's lock."""
    with shared_state(model):
        return [model.tokenizer.decode([int(t)]) for t in tokens]


@torch.inference_mode()
def run(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Plain forward pass. tokens: [batch, pos] -> logits [batch, pos, d_vocab]."""
    with locked(model):
        return model(tokens)


@torch.inference_mode()
def run_with_hooks(
    model: HookedTransformer,
    tokens: torch.Tensor,
    fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]],
    use_split_qkv_input: bool = False,
) -> torch.Tensor:
    """Forward pass with temporary TransformerLens hooks. Returns logits [batch, pos, d_vocab]."""
    with locked(model, use_split_qkv_input=use_split_qkv_input):
        with model.hooks(fwd_hooks=list(fwd_hooks), reset_hooks_end=True):
            return model(tokens)


@torch.inference_mode()
def run_with_cache(
    model: HookedTransformer, tokens: torch.Tensor, names_filter=None
) -> tuple[torch.Tensor, ActivationCache]:
    """`model.run_with_cache` under the lock (no store). Returns (logits, cache)."""
    with locked(model):
        return model.run_with_cache(tokens, names_filter=names_filter)


@dataclass(frozen=True)
class CachedRun:
    """One stored forward pass: logits [batch, pos, d_vocab] and the full activation cache."""

    model_key: str
    tokens: torch.Tensor  # [batch, pos]
    logits: torch.Tensor
    cache: ActivationCache
    nbytes: int


@dataclass(frozen=True)
class StoreEntry:
    model_key: str
    shape: tuple[int, ...]
    nbytes: int


def _cache_nbytes(logits: torch.Tensor, cache: ActivationCache) -> int:
    """Bytes held by the logits and the cache, each storage counted once.

    Cached tensors share storage (`blocks.L.hook_resid_post` is `blocks.L+1.hook_resid_pre`),
    so summing `t.nbytes` over the cache would count some memory twice.
    """
    seen: set[tuple] = set()
    total = 0
    for t in (logits, *cache.cache_dict.values()):
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class KeyedCache:
    """A thread-safe LRU of computed values, bounded by a cost (bytes, or a count), computing each
    key once: two callers asking for the same key at once wait for one computation.

    A value costlier than the whole cap is returned but not kept, so the cap is never exceeded. A
    computation that raises stores nothing; the next caller computes again.
    """

    def __init__(self, max_cost: int, cost: Callable[[object], int] = lambda value: 1):
        if max_cost < 0:
            raise ValueError("max_cost must be >= 0")
        self.max_cost = max_cost
        self._cost_of = cost
        self._entries: OrderedDict = OrderedDict()  # key -> (value, cost)
        self._total = 0
        self._lock = threading.Lock()
        self._key_locks: dict = {}
        self.hits = 0
        self.misses = 0

    def get(self, key, compute: Callable[[], object]):
        """The value for `key`, from `compute()` the first time."""
        with self._lock:
            found, value = self._lookup(key)
            if found:
                return value
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one computation per key; the others wait for it
            with self._lock:
                found, value = self._lookup(key)
                if found:
                    return value
            done = False
            try:
                value = compute()
                done = True
            finally:
                # Store before releasing the per-key lock, so a caller that was waiting on it
                # finds the value instead of computing it again.
                with self._lock:
                    self._key_locks.pop(key, None)
                    if done:
                        self.misses += 1
                        cost = self._cost_of(value)
                        if cost <= self.max_cost:
                            self._entries[key] = (value, cost)
                            self._total += cost
                            self._evict()
            return value

    def _lookup(self, key) -> tuple[bool, object]:
        """(found, value) for `key`, marked most recently used (caller holds the lock)."""
        hit = self._entries.get(key)
        if hit is None:
            return False, None
        self._entries.move_to_end(key)
        self.hits += 1
        return True, hit[0]

    def _evict(self) -> None:
        """Drop least recently used entries until within the cap (caller holds the lock)."""
        while self._entries and self._total > self.max_cost:
            _, (_, cost) = self._entries.popitem(last=False)
            self._total -= cost

    @property
    def total(self) -> int:
        """The summed cost of what is held now."""
        with self._lock:
            return self._total

    def values(self) -> list:
        """What is held, least recently used first."""
        with self._lock:
            return [value for value, _ in self._entries.values()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._total = 0


class ActivationStore:
    """LRU store of `run_with_cache` results keyed by (model, tokens), bounded in bytes.

    Thread-safe (a `KeyedCache` costed in bytes). Two callers asking for the same run at once wait
    for one forward pass. A run larger than the whole cap is returned but not kept.
    """

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is None:
            max_bytes = int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._runs = KeyedCache(max_bytes, cost=lambda run: run.nbytes)

    @property
    def hits(self) -> int:
        return self._runs.hits

    @property
    def misses(self) -> int:
        return self._runs.misses

    @staticmethod
    def _key(model: HookedTransformer, tokens: torch.Tensor) -> tuple:
        return (model_key(model), tuple(tokens.shape), tuple(tokens.flatten().tolist()))

    def get(self, model: HookedTransformer, tokens: torch.Tensor) -> CachedRun:
        """The cached run of `model` on `tokens` [batch, pos] (or [pos]), computing it once."""
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        tokens = tokens.detach().to("cpu")
        key = self._key(model, tokens)

        def forward() -> CachedRun:
            logits, cache = run_with_cache(model, tokens.to(model.cfg.device))
            return CachedRun(key[0], tokens, logits, cache, _cache_nbytes(logits, cache))

        return self._runs.get(key, forward)

    @property
    def nbytes(self) -> int:
        """Bytes of activations held now (logits and every cached tensor's storage, once each)."""
        return self._runs.total

    def entries(self) -> list[StoreEntry]:
        """What the store holds, least recently used first."""
        return [StoreEntry(e.model_key, tuple(e.tokens.shape), e.nbytes) for e in self._runs.values()]

    def describe(self) -> str:
        entries = self.entries()
        used = sum(e.nbytes for e in entries)
        return (
            f"{len(entries)} cached run(s), {used / 2**20:.1f} MiB of {self.max_bytes / 2**20:.0f} MiB "
            f"(hits {self.hits}, misses {self.misses})"
        )

    def clear(self) -> None:
        self._runs.clear()
