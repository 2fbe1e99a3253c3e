"""The feature index: every SAE feature's activations over a corpus, computed once, kept in SQLite.

`open_index(model, loaded, docs)` returns a `FeatureIndex` for (model weights, SAE weights,
corpus tokens). The file is named by a hash of all three and also records them inside, so a
changed model, SAE or corpus never reads an old index; a file that is corrupt, incomplete or of
another schema is deleted and rebuilt. Reopening a feature is one row read: no forward pass.

What is stored (BOS, at position 0 of every document, is left out, as is every special token):
- `docs`: the corpus, token ids per document;
- `features`: per feature, how often and how strongly it fires, a histogram of its non-zero
  activations, its top examples, examples from equal-width activation intervals, and all of its
  non-zero activations (global token index, value) for tinting contexts;
- `token_features`: per (token, feature) the sum, count and max of activations on that token,
  for "which features fire on this token"; `token_counts`: occurrences of each token.

Global token index g of (doc d, position p) is `offsets[d] + p`.

Building (a few seconds for the embedded SAEs; more for large SAEs or corpora):
- `request_index(model, loaded, docs)` returns a `Build`: done at once when a valid file exists,
  else the one background build of that file in this process (a daemon thread owned by this
  module, one build at a time), shared by every caller: a Streamlit page polls it and survives
  reruns and navigation, a second session waits on the same build. `open_index` builds in the
  calling thread instead (scripts, tests, benchmarks).
- Progress says the phase and the time left, from the speed measured after a warm-up.
- A full disk (or any write failure) is `FeatureIndexError` with a message; the temporary file and its
  SQLite journal are removed, and indexes already built are kept. Temporary files of builds that
  died are swept after an hour.
- A file damaged after its check (say, overwritten with its size and time unchanged) raises
  `IndexCorrupt` on read, never sqlite3.DatabaseError, and is checked again and rebuilt.
- The folder is bounded in bytes ($CIRCUIT_EXPLORER_DATA_BYTES, default 2 GiB): after each build
  the least recently used indexes go, never one being built, open, or used in the last 10 minutes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformer_lens import HookedTransformer

from core import store
from core.paths import DATA_ENV, data_dir
from core.saes import LoadedSAE, doc_batches, encode

SCHEMA_VERSION = 1
DATA_BYTES_ENV = "CIRCUIT_EXPLORER_DATA_BYTES"  # cap on the indexes kept in the data folder (LRU)
DEFAULT_DATA_BYTES = 2 * 1024**3
TOP_K = 20
INTERVALS = 5
PER_INTERVAL = 5
HIST_BINS = 30
BATCH = 64
INTERVAL_SEED = 0  # the random examples drawn from each activation interval

Progress = Callable[[float, str], None]
_clock = time.perf_counter  # the build's clock (tests replace it to check the time-left estimate)


def _digest(chunks) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return str((tuple(t.shape), t.dtype)).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_fingerprint(named: dict[str, torch.Tensor]) -> str:
    return _digest(part for k in sorted(named) for part in (k.encode(), _bytes(named[k])))


# Switches that TransformerLens (and our store) flip on the shared model while a run uses them:
# they say nothing about which model it is, and reading them mid-flip would give another key.
RUNTIME_SWITCHES = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in", "use_attn_in",
                    "default_prepend_bos", "ungroup_grouped_query_attention", "use_hook_tokens")


def model_fingerprint(model: HookedTransformer) -> str:
    fp = getattr(model, "_circuit_explorer_fingerprint", None)
    if fp is None:
        with store.shared_state(model):  # the weights and config as they are between runs
            cfg = {k: v for k, v in model.cfg.to_dict().items() if k not in RUNTIME_SWITCHES}
            weights = tensors_fingerprint(model.state_dict())
        fp = weights + _digest([
            json.dumps(cfg, default=str, sort_keys=True).encode(),
            json.dumps(sorted(model.tokenizer.all_special_ids) if model.tokenizer is not None else []).encode(),
        ])[:8]
        model._circuit_explorer_fingerprint = fp
    return fp


def sae_fingerprint(sae) -> str:
    fp = getattr(sae, "_circuit_explorer_fingerprint", None)
    if fp is None:
        # The config too: TopK's k, input normalisation and reshaping live there, not in the weights.
        fp = tensors_fingerprint(sae.state_dict()) + _digest([json.dumps(sae.cfg.to_dict(), default=str, sort_keys=True).encode()])[:8]
        sae._circuit_explorer_fingerprint = fp
    return fp


def corpus_fingerprint(docs: list[list[int]]) -> str:
    return _digest(np.asarray(d, dtype=np.int64).tobytes() + b"|" for d in docs)


@dataclass(frozen=True)
class Example:
    act: float
    doc: int
    pos: int


@dataclass
class FeatureStats:
    feature: int
    n_fire: int  # tokens where it is > 0
    n_tokens: int  # tokens in the corpus (BOS excluded)
    max_act: float
    mean_act: float  # over the tokens where it fires
    hist_edges: list[float]  # HIST_BINS + 1 edges over [0, max_act]
    hist_counts: list[int]
    top: list[Example]
    intervals: list[tuple[float, float, list[Example]]]  # (low, high], examples

    @property
    def density(self) -> float:
        return self.n_fire / self.n_tokens if self.n_tokens else 0.0


class FeatureIndexError(Exception):
    """An index could not be built (empty corpus, full disk, ...); the message is for the user.

    `path`: the index file concerned, where there is one (a failed build can be retried)."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


class IndexCorrupt(FeatureIndexError):
    """An index file became unreadable after it was opened (overwritten, truncated, deleted).

    Its validation is forgotten, so the next `open_index` / `request_index` checks it again and
    rebuilds it."""


_live: "weakref.WeakSet[FeatureIndex]" = weakref.WeakSet()  # open index objects: their files are in use
_live_guard = threading.Lock()  # a WeakSet must not change while evict() iterates it


class FeatureIndex:
    """Read access to a built index file (one connection per call: safe across threads).

    A file that SQLite cannot read any more raises IndexCorrupt (never sqlite3.DatabaseError)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._reading() as con:
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        try:
            self.d_sae = int(meta["d_sae"])
            self.n_tokens = int(meta["n_tokens"])
            self.n_docs = int(meta["n_docs"])
            self.build_seconds = float(meta["build_seconds"])
            self.key = meta["key"]
        except (KeyError, ValueError) as err:
            _forget(self.path)
            raise IndexCorrupt(f"The feature index file {self.path.name} is damaged (meta: {err}).", self.path) from err
        self._offsets: np.ndarray | None = None
        self._acts: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a few features' blobs, for this object's life
        with _live_guard:
            _live.add(self)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    @contextlib.contextmanager
    def _reading(self):
        """A read-only connection, closed after use; an unreadable file raises IndexCorrupt."""
        try:
            con = self._connect()
            try:
                yield con
            finally:
                con.close()
        except sqlite3.DatabaseError as err:  # "file is not a database", "malformed", "unable to open"
            _forget(self.path)
            raise IndexCorrupt(f"The feature index file {self.path.name} cannot be read ({err}); it will be rebuilt.",
                               self.path) from err

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.build_seconds if self.build_seconds else float("inf")

    def doc(self, d: int) -> list[int]:
        with self._reading() as con:
            row = con.execute("SELECT tokens FROM docs WHERE doc = ?", (int(d),)).fetchone()
        return np.frombuffer(row[0], dtype=np.int32).tolist()

    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            with self._reading() as con:
                (blob,) = con.execute("SELECT value FROM blobs WHERE key = 'offsets'").fetchone()
            self._offsets = np.frombuffer(blob, dtype=np.int64)
        return self._offsets

    def feature(self, f: int) -> FeatureStats:
        with self._reading() as con:
            row = con.execute(
                "SELECT n_fire, max_act, sum_act, hist, top, intervals FROM features WHERE feature = ?", (int(f),)
            ).fetchone()
        if row is None:
            raise KeyError(f"Feature {f} is not in this index (features 0–{self.d_sae - 1}).")
        n_fire, max_act, sum_act, hist, top, intervals = row
        hist = json.loads(hist)
        return FeatureStats(
            feature=int(f), n_fire=n_fire, n_tokens=self.n_tokens, max_act=max_act,
            mean_act=sum_act / n_fire if n_fire else 0.0, hist_edges=hist["edges"], hist_counts=hist["counts"],
            top=[Example(*e) for e in json.loads(top)],
            intervals=[(lo, hi, [Example(*e) for e in ex]) for lo, hi, ex in json.loads(intervals)],
        )

    def activations(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(global token indices, activations) of every non-zero activation of feature f, by index."""
        if int(f) not in self._acts:
            with self._reading() as con:
                idx, acts = con.execute("SELECT idx, acts FROM features WHERE feature = ?", (int(f),)).fetchone()
            if len(self._acts) >= 8:
                self._acts.pop(next(iter(self._acts)))
            self._acts[int(f)] = (np.frombuffer(idx, dtype=np.int64), np.frombuffer(acts, dtype=np.float32))
        return self._acts[int(f)]

    def doc_activations(self, f: int, d: int) -> list[float]:
        """Feature f's activation at every position of document d (0 at BOS)."""
        tokens = self.doc(d)
        start = int(self.offsets()[d])
        idx, acts = self.activations(f)
        lo, hi = np.searchsorted(idx, [start, start + len(tokens)])
        out = [0.0] * len(tokens)
        for g, a in zip(idx[lo:hi], acts[lo:hi]):
            out[int(g) - start] = float(a)
        return out

    def features_for_token(self, token: int, k: int = 20) -> list[dict]:
        """Features that fire most on `token`: mean activation over all of its occurrences."""
        with self._reading() as con:
            occ = con.execute("SELECT n FROM token_counts WHERE token = ?", (int(token),)).fetchone()
            if occ is None:
                return []
            rows = con.execute(
                "SELECT feature, sum_act, n_fire, max_act FROM token_features WHERE token = ? "
                "ORDER BY sum_act DESC, feature LIMIT ?", (int(token), int(k))
            ).fetchall()
        n = occ[0]
        return [{"feature": f, "mean_act": s / n, "fires": c, "occurrences": n, "max_act": m} for f, s, c, m in rows]


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

_build_locks: dict[str, threading.Lock] = {}
_build_guard = threading.Lock()


def index_key(model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]]) -> str:
    return _digest([f"v{SCHEMA_VERSION}".encode(), model_fingerprint(model).encode(),
                    sae_fingerprint(loaded.sae).encode(), corpus_fingerprint(docs).encode()])


def index_path(key: str, directory: Path | None = None) -> Path:
    return Path(directory or data_dir()) / f"sae-index-{key}.sqlite"


def _valid(path: Path, key: str, d_sae: int) -> bool:
    """A complete index of this key and schema whose file SQLite reads without error."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                return False
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema") != str(SCHEMA_VERSION) or meta.get("key") != key or meta.get("complete") != "1":
                return False
            (n,) = con.execute("SELECT COUNT(*) FROM features").fetchone()
            return n == d_sae == int(meta.get("d_sae", -1))
        finally:
            con.close()
    except (sqlite3.DatabaseError, ValueError, TypeError):
        return False


def _path_lock(path: Path) -> threading.Lock:
    with _build_guard:
        return _build_locks.setdefault(str(path), threading.Lock())


def _clean_docs(docs: list[list[int]]) -> list[list[int]]:
    docs = [d for d in docs if len(d) > 1]  # a document of BOS alone has nothing to index
    if not docs:
        raise FeatureIndexError("The corpus is empty: give at least one document with a token after BOS.")
    return docs


def open_index(model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]], progress: Progress | None = None,
               directory: Path | None = None) -> FeatureIndex:
    """The index of this (model, SAE, corpus): read if a valid one exists, else built here (and kept).

    Blocks while it builds; `request_index` builds in the background instead. Two callers of one
    index (in any threads) never build it twice: the second waits and reads the first's file.
    """
    docs = _clean_docs(docs)
    key = index_key(model, loaded, docs)
    path = index_path(key, directory)
    with _path_lock(path):
        index = _ready(path, key, loaded.d_sae)
        if index is not None:
            return index
        if path.exists():
            _forget(path)
            path.unlink()  # corrupt, stale or incomplete: never shown
        _sweep(path.parent)
        build(model, loaded, docs, path, key, progress)
        index = FeatureIndex(path)
    evict(path.parent)
    return index


_checked_files: dict[str, tuple] = {}
TMP_MAX_AGE = 3600.0


def _checked(path: Path, key: str, d_sae: int) -> bool:
    """`_valid`, run once per version of the file (its size and modification time) per process."""
    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns, key)
    if _checked_files.get(str(path)) == stamp:
        return True
    ok = _valid(path, key, d_sae)
    if ok:
        _checked_files[str(path)] = stamp
    return ok


def _forget(path: Path) -> None:
    """Check this file again on its next opening (it was found damaged, or deleted)."""
    _checked_files.pop(str(path), None)


def _ready(path: Path, key: str, d_sae: int) -> FeatureIndex | None:
    """The valid index at `path`, marked as just used; None when it is missing or damaged.

    A file overwritten in place with its size and modification time unchanged passes the cached
    check but not the opening: that is caught here too, and the file is checked again."""
    try:
        if not (path.exists() and _checked(path, key, d_sae)):
            return None
        index = FeatureIndex(path)
    except (IndexCorrupt, OSError):
        _forget(path)
        return None
    _touch(path)
    return index


# ---------------------------------------------------------------------------------------------
# Background builds: one per index file per process, shared by every session
# ---------------------------------------------------------------------------------------------

INDEX_THREADS_ENV = "CIRCUIT_EXPLORER_INDEX_THREADS"
FAILED_BUILD_MEMORY = 30.0  # seconds a failed build is shown (not retried) before a new request retries it


def build_threads() -> int:
    """Torch threads of a background build: $CIRCUIT_EXPLORER_INDEX_THREADS, else a quarter of the
    cores (1 to 4). A build runs beside the sessions' own forward passes; on a busy machine more
    OpenMP threads than free cores made it several times slower (measured on 2 cores kept busy by
    two other processes, ce-circuits-3l-mlp-res2-relu's index: 13–24 s with 2 threads, 4.3–4.7 s
    with 1)."""
    try:
        n = int(os.environ.get(INDEX_THREADS_ENV, ""))
    except ValueError:
        n = 0
    return n if n > 0 else max(1, min(4, (os.cpu_count() or 2) // 4))


def _use_threads_here(n: int) -> None:
    """Give the calling thread n torch (OpenMP) threads without changing the default of others.

    `torch.set_num_threads` also sets the count that threads started later take on their first
    parallel op; a helper thread puts that default back, leaving this thread's own setting. A new
    thread whose first parallel op falls between the two calls (about a millisecond) would take n
    threads, and so another float summation order (about 1e-5 apart): a known, narrow window."""
    before = torch.get_num_threads()  # also initialises this thread's count, so it is not reset later
    if n == before:
        return
    torch.set_num_threads(n)
    helper = threading.Thread(target=torch.set_num_threads, args=(before,))
    helper.start()
    helper.join()


class Build:
    """One index built in a background thread; every session asking for the same file gets this object.

    `done`, `failed`, `status()` -> (share, text) for a progress bar, `wait(timeout)`, `result()`.
    """

    def __init__(self, key: str, path: Path, index: FeatureIndex | None = None):
        self.key, self.path = key, Path(path)
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self.index = index
        self.error: str | None = None
        self._share, self._text = 0.0, "waiting to start"
        self._lock = threading.Lock()
        self._done = threading.Event()
        if index is not None:
            self._finish(index=index)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        return self.done and self.error is not None

    def status(self) -> tuple[float, str]:
        with self._lock:
            return self._share, self._text

    def progress(self, share: float, text: str) -> None:
        with self._lock:
            self._share, self._text = share, text

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self) -> FeatureIndex:
        """The index (raises FeatureIndexError with the build's message when it failed)."""
        if not self.done:
            raise RuntimeError("the index is still being built")
        if self.error is not None:
            raise FeatureIndexError(self.error, self.path)
        return self.index

    def _finish(self, index: FeatureIndex | None = None, error: str | None = None) -> None:
        with self._lock:
            self.index, self.error = index, error
            self.finished_at = time.monotonic()
            if index is not None:
                self._share, self._text = 1.0, "done"
        self._done.set()


_builds: dict[str, Build] = {}  # index file -> its build running in this process (or failed moments ago)
_builds_guard = threading.Lock()
_build_slots = threading.BoundedSemaphore(1)  # one build at a time: each one has the cores to itself


def request_index(model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]],
                  directory: Path | None = None) -> Build:
    """The index of this (model, SAE, corpus) as a `Build`: done at once when a valid file exists,
    else the build of it running in this process, started here if there is none.

    The build runs in a daemon thread owned by this module, so it outlives the Streamlit run (and
    the session) that asked for it; it builds with `open_index` (temporary file, atomic rename),
    at most one at a time. Raises FeatureIndexError for an empty corpus.
    """
    docs = _clean_docs(docs)
    key = index_key(model, loaded, docs)
    path = index_path(key, directory)
    running = current_build(path)
    if running is not None:
        return running
    index = _ready(path, key, loaded.d_sae)
    if index is not None:
        return Build(key, path, index)
    with _builds_guard:
        running = _builds.get(str(path))
        if running is None or (running.failed and time.monotonic() - running.finished_at >= FAILED_BUILD_MEMORY):
            running = _builds[str(path)] = Build(key, path)
            threading.Thread(target=_build_in_background, args=(running, model, loaded, docs, directory),
                             name=f"sae-index-{key[:8]}", daemon=True).start()
        return running


def current_build(path: str | Path) -> Build | None:
    """The build of this index file running in this process (or failed under FAILED_BUILD_MEMORY s ago)."""
    with _builds_guard:
        build = _builds.get(str(path))
        if build is not None and build.failed and time.monotonic() - build.finished_at >= FAILED_BUILD_MEMORY:
            return None
        return build


def forget_build(path: str | Path) -> None:
    """Drop a failed build, so that the next request tries again (a "Try again" button)."""
    with _builds_guard:
        build = _builds.get(str(path))
        if build is not None and build.failed:
            _builds.pop(str(path))


def building() -> set[str]:
    """Index files being built in this process now."""
    with _builds_guard:
        return {p for p, b in _builds.items() if not b.done}


def _build_in_background(build: Build, model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]],
                         directory: Path | None) -> None:
    try:
        _use_threads_here(build_threads())
        build.progress(0.0, "waiting for another index build to finish")
        with _build_slots:
            build.progress(0.0, "starting")
            index = open_index(model, loaded, docs, build.progress, directory)
        build._finish(index=index)
    except FeatureIndexError as err:
        build._finish(error=str(err))
    except Exception as err:  # noqa: BLE001 - shown in the page instead of dying silently in a thread
        build._finish(error=f"The feature index could not be built: {type(err).__name__}: {err}")
    finally:
        with _builds_guard:
            if _builds.get(str(build.path)) is build and not build.failed:
                _builds.pop(str(build.path))


# ---------------------------------------------------------------------------------------------
# The data folder: bounded in bytes, least recently used indexes go first
# ---------------------------------------------------------------------------------------------

IN_USE_SECONDS = 600.0  # an index opened this recently is in use (a session is showing it)


def data_cap() -> int:
    """Bytes the data folder's indexes may take: $CIRCUIT_EXPLORER_DATA_BYTES, else 2 GiB."""
    try:
        n = int(os.environ.get(DATA_BYTES_ENV, ""))
    except ValueError:
        n = 0
    return n if n > 0 else DEFAULT_DATA_BYTES


def _touch(path: Path) -> None:
    """Record a use of an index file: its access time (the modification time, part of its check, stays)."""
    try:
        st = path.stat()
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
    except OSError:
        pass


def evict(directory: Path | None = None, cap: int | None = None) -> list[Path]:
    """Delete least recently used index files until the folder's index files fit in `cap` bytes.

    Never deleted: an index being built (its temporary file, and the file it will replace), one
    open in this process, or one used in the last IN_USE_SECONDS (a session is showing it).
    Returns the deleted files."""
    directory = Path(directory or data_dir())
    cap = data_cap() if cap is None else cap
    try:
        files = [(p, p.stat()) for p in directory.glob("sae-index-*.sqlite")]
        temps = [p.stat().st_size for p in directory.glob("sae-index-*.tmp*")]
    except OSError:
        return []
    total = sum(st.st_size for _, st in files) + sum(temps)
    if total <= cap:
        return []
    with _live_guard:
        busy = building() | {str(i.path) for i in list(_live)}
    with _build_guard:
        busy |= {p for p, lock in _build_locks.items() if lock.locked()}
    now = time.time()
    removed = []
    for p, st in sorted(files, key=lambda f: f[1].st_atime):
        if total <= cap:
            break
        if str(p) in busy or now - st.st_atime < IN_USE_SECONDS:
            continue
        try:
            p.unlink()
        except OSError:
            continue
        _forget(p)
        total -= st.st_size
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# Progress and time left
# ---------------------------------------------------------------------------------------------

WARMUP_UPDATES = 3  # batches left out of the speed: the first ones pay for allocation, caches, lazy imports
# Share of the progress bar per phase (measured on the embedded SAEs, 1 thread: encoding about 55% of
# a build, the summary 35%, writing 10%).
ENCODE_SHARE, SUMMARY_SHARE = 0.55, 0.35
_post_rate: list[float] = []  # non-zero activations per second that the last build summarised and wrote


class Throughput:
    """Time left from the speed measured after a warm-up, never from the first updates alone.

    `update(done)` after each unit of work (a batch): the first `warmup` updates only start the
    clock; from then on the speed is (work since then) / (time since then), and the time left is
    (total - done) / speed. None while there is no measurement yet.
    """

    def __init__(self, total: float, warmup: int = WARMUP_UPDATES, clock: Callable[[], float] | None = None):
        self.total, self.warmup, self.clock = float(total), int(warmup), clock or (lambda: _clock())
        self.updates = 0
        self.mark: tuple[float, float] | None = None  # (time, done) at the end of the warm-up
        self.rate: float | None = None  # units per second

    def update(self, done: float) -> float | None:
        now = self.clock()
        self.updates += 1
        if self.updates == self.warmup:
            self.mark = (now, float(done))
        elif self.mark is not None and now > self.mark[0] and done > self.mark[1]:
            self.rate = (done - self.mark[1]) / (now - self.mark[0])
        return self.left(done)

    def left(self, done: float) -> float | None:
        return None if self.rate is None else max(0.0, (self.total - done) / self.rate)


def duration(seconds: float) -> str:
    """'under a second', '12 s', '3 min 5 s'."""
    if seconds < 1:
        return "under a second"
    s = int(round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"


class _Reporter:
    """A build's progress for a `Progress` callback: the phase, the bar's share, and the time left.

    While encoding (most of a build), the time left is the tokens still to encode at the speed
    measured after the warm-up, plus the summary of the non-zero activations that the corpus will
    give at this rate, at the speed the last build in this process summarised them (when there was
    one; else it says "then the summary"). The summary's time left uses that same speed.
    """

    def __init__(self, progress: Progress | None, total_tokens: int, d_sae: int):
        self.progress, self.total, self.d_sae = progress, total_tokens, d_sae
        self.tokens = Throughput(total_tokens)
        self.post_start = 0.0
        self.nonzero = 0

    def _emit(self, share: float, text: str) -> None:
        if self.progress:
            self.progress(min(1.0, max(0.0, share)), text)

    def encoded(self, done: int, total: int, nonzero: int) -> None:
        left = self.tokens.update(done)
        text = f"Encoding the corpus: {done:,} of {total:,} tokens"
        if left is None:
            text += " (measuring the speed…)"
        else:
            rest = nonzero / done * total / _post_rate[-1] if _post_rate and done else None
            text += f", {self.tokens.rate:,.0f} tokens/s: about {duration(left + rest)} left" if rest is not None else \
                f", {self.tokens.rate:,.0f} tokens/s: about {duration(left)} left to encode, then the summary"
        self._emit(ENCODE_SHARE * done / max(1, total), text)

    def summarising(self, nonzero: int) -> None:
        self.nonzero = nonzero
        self.post_start = _clock()
        self._emit(ENCODE_SHARE, self._post_text(f"Summarising {self.d_sae:,} features ({nonzero:,} non-zero "
                                                 "activations)"))

    def _post_text(self, what: str) -> str:
        """`what`, with the time left when an earlier build in this process measured the summary's speed."""
        if not _post_rate:
            return what
        left = self.nonzero / _post_rate[-1] - (_clock() - self.post_start)
        return f"{what}: about {duration(max(left, 0.0))} left"

    def summarising_step(self, share: float) -> None:
        self._emit(ENCODE_SHARE + SUMMARY_SHARE * share, self._post_text(f"Summarising {self.d_sae:,} features"))

    def writing(self, share: float) -> None:
        self._emit(ENCODE_SHARE + SUMMARY_SHARE + (0.99 - ENCODE_SHARE - SUMMARY_SHARE) * share,
                   self._post_text("Writing the index to disk"))

    def finished(self, nonzero: int, post_seconds: float) -> None:
        if post_seconds > 0:
            _post_rate[:] = [max(nonzero, 1) / post_seconds]


def _remove_temporary(tmp: Path) -> None:
    """A build's temporary file and whatever SQLite left beside it (rollback journal, WAL)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        try:
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        except OSError:
            pass


def _disk_full(err: BaseException) -> bool:
    return (getattr(err, "errno", None) == errno.ENOSPC or getattr(err, "sqlite_errorcode", None) == 13  # SQLITE_FULL
            or "disk is full" in str(err) or "No space left" in str(err))


def _write_failure(err: BaseException, directory: Path) -> str:
    """The message for a build that could not write its file (a full disk, a read-only folder…)."""
    try:
        free = f" ({shutil.disk_usage(directory).free / 1e6:,.0f} MB free)"
    except OSError:
        free = ""
    keep = ("Nothing was lost: the indexes already built are kept and the half-written file was removed; "
            "the prompt's features work without an index.")
    if _disk_full(err):
        return (f"The disk is full: the feature index could not be written to {directory}{free}. {keep} Free some "
                f"space, or point {DATA_ENV} at a folder on another disk (or lower {DATA_BYTES_ENV}), then reload.")
    return f"The feature index could not be written to {directory}: {err}. {keep}"


def _sweep(directory: Path) -> None:
    """Remove temporary files (and their SQLite journals) of builds that died over an hour ago."""
    if not directory.exists():
        return
    now = time.time()
    for tmp in directory.glob("sae-index-*.tmp*"):
        try:
            if now - tmp.stat().st_mtime > TMP_MAX_AGE:
                tmp.unlink()
        except OSError:
            pass


def capture_plan(name: str, n_layers: int) -> tuple[str, int | None]:
    """(hook to read, stop_at_layer): the cheapest forward pass that yields the activation at `name`.

    `blocks.L.hook_resid_pre` is the very tensor `blocks.{L-1}.hook_resid_post` holds, so it is
    read there and block L never runs; other block hooks stop after their block; the
    unembedding never runs for a block hook.
    """
    if name.startswith("blocks."):
        layer = int(name.split(".")[1])
        if name == f"blocks.{layer}.hook_resid_pre" and layer > 0:
            return f"blocks.{layer - 1}.hook_resid_post", layer
        return name, layer + 1
    return name, None


@torch.inference_mode()
def collect(model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]],
            on_batch: Callable[[int, int, int], None] | None = None):
    """Every non-zero feature activation over the corpus: (features, global indices, values), and
    the token id at each global index. Forward passes stop after the SAE's layer; the model's lock
    is held per batch, so other sessions' runs interleave with a long build.

    on_batch(tokens done, tokens in all, non-zero activations so far) after every batch."""
    name = loaded.hook_name
    tok = model.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    # Left out besides position 0: BOS and padding wherever they occur (packed or padded rows).
    # Other special tokens (<unk>, EOS) are indexed like any token.
    special = {i for i in (getattr(tok, "bos_token_id", None), getattr(tok, "pad_token_id", None)) if i is not None}
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    feats, gidx, vals = [], [], []
    read, stop = capture_plan(name, model.cfg.n_layers)
    done = nonzero = 0
    total = int(lengths.sum())
    for ids, tokens in doc_batches(docs, pad, BATCH):
        with store.locked(model):
            _, cache = model.run_with_cache(tokens, names_filter=read, stop_at_layer=stop)
        acts = cache[read]
        width = tokens.shape[1]
        pos = torch.arange(width)
        lens = torch.tensor([len(docs[i]) for i in ids])
        keep = (pos[None, :] < lens[:, None]) & (pos[None, :] > 0)
        if special:
            keep &= ~torch.isin(tokens, torch.tensor(sorted(special)))
        g = torch.tensor(offsets[ids])[:, None] + pos[None, :]
        f = encode(loaded.sae, acts[keep])  # [n, d_sae]
        rows, cols = f.nonzero(as_tuple=True)
        feats.append(cols)
        gidx.append(g[keep][rows])
        vals.append(f[rows, cols].float())
        done += int(lens.sum())
        nonzero += len(cols)
        if on_batch:
            on_batch(done, total, nonzero)
    real = torch.ones(len(flat), dtype=torch.bool)
    real[torch.tensor(offsets)] = False
    if special:
        real &= ~torch.isin(flat, torch.tensor(sorted(special)))
    return torch.cat(feats), torch.cat(gidx), torch.cat(vals), flat, real, offsets


def build(model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]], path: Path, key: str,
          progress: Progress | None = None) -> None:
    """Compute the index of (model, SAE, corpus) and write it to `path` (atomically: a temporary
    file, renamed when complete). Raises FeatureIndexError with a message for the user when the disk is
    full or the file cannot be written; the temporary file and its journal are removed then too."""
    start = _clock()
    d_sae = loaded.d_sae
    report = _Reporter(progress, sum(len(d) for d in docs), d_sae)
    feats, gidx, vals, flat, real, offsets = collect(model, loaded, docs, report.encoded)
    n_tokens = int(real.sum())
    encode_seconds = _clock() - start
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:  # the temporary file goes, whatever stops the build: an error, or Streamlit stopping the script
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(tmp)
        try:
            con.executescript(
                """
                CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE blobs (key TEXT PRIMARY KEY, value BLOB);
                CREATE TABLE docs (doc INTEGER PRIMARY KEY, tokens BLOB);
                CREATE TABLE features (feature INTEGER PRIMARY KEY, n_fire INTEGER, max_act REAL, sum_act REAL,
                                       hist TEXT, top TEXT, intervals TEXT, idx BLOB, acts BLOB);
                CREATE TABLE token_counts (token INTEGER PRIMARY KEY, n INTEGER);
                CREATE TABLE token_features (token INTEGER, feature INTEGER, sum_act REAL, n_fire INTEGER, max_act REAL);
                """
            )
            con.executemany("INSERT INTO docs VALUES (?, ?)", ((i, np.asarray(d, dtype=np.int32).tobytes()) for i, d in enumerate(docs)))
            con.execute("INSERT INTO blobs VALUES ('offsets', ?)", (np.asarray(offsets, dtype=np.int64).tobytes(),))
            report.summarising(len(feats))
            nonzero = len(feats)
            feats, gidx, vals = (feats.numpy().astype(np.int64), gidx.numpy().astype(np.int64),
                                 vals.numpy().astype(np.float32))
            rows = _feature_rows(feats, gidx, vals, d_sae, np.asarray(offsets, dtype=np.int64), report)
            token_rows, occ = _token_rows(feats, gidx, vals, flat, real, d_sae)
            del feats, gidx, vals
            step = max(1, d_sae // 8)
            for s in range(0, d_sae, step):
                con.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[s:s + step])
                report.writing(min(d_sae, s + step) / d_sae * 0.5)
            con.executemany("INSERT INTO token_counts VALUES (?, ?)", ((t, int(c)) for t, c in enumerate(occ.tolist()) if c))
            con.executemany("INSERT INTO token_features VALUES (?, ?, ?, ?, ?)", token_rows)
            report.writing(0.8)
            con.execute("CREATE INDEX token_features_by_token ON token_features (token, sum_act DESC)")
            seconds = _clock() - start
            meta = {"schema": SCHEMA_VERSION, "key": key, "d_sae": d_sae, "n_tokens": n_tokens, "n_docs": len(docs),
                    "sae_id": loaded.sae_id, "hook_name": loaded.hook_name, "model": model.cfg.model_name,
                    "build_seconds": seconds, "encode_seconds": encode_seconds, "n_nonzero": nonzero,
                    "built_at": time.time(), "complete": 1}
            con.executemany("INSERT INTO meta VALUES (?, ?)", ((k, str(v)) for k, v in meta.items()))
            con.commit()
            report.writing(1.0)
        finally:
            con.close()
        os.replace(tmp, path)
    except BaseException as err:
        _remove_temporary(tmp)
        if isinstance(err, (sqlite3.OperationalError, OSError)):
            raise FeatureIndexError(_write_failure(err, path.parent), path) from err
        raise
    report.finished(nonzero, _clock() - start - encode_seconds)
    if progress:
        progress(1.0, f"Index built: {n_tokens:,} tokens, {d_sae:,} features in {seconds:.1f} s")


def _feature_rows(feats: np.ndarray, gidx: np.ndarray, vals: np.ndarray, d_sae: int, offsets: np.ndarray,
                  report: "_Reporter") -> list[tuple]:
    """Rows of the `features` table from every non-zero activation (feature, global index, value),
    vectorised over all features at once (numpy, no per-feature tensor op).

    Per feature: count, max, sum, a histogram of HIST_BINS equal bins over [0, max], the TOP_K
    strongest examples (ties by corpus order), PER_INTERVAL examples drawn at random (seeded) from
    each of INTERVALS equal-width activation intervals (lo, hi], strongest first, and all of its
    activations by corpus index.
    """
    n = len(vals)
    by_index = np.lexsort((gidx, feats))  # by feature, then corpus index
    feats, gidx, vals = feats[by_index], gidx[by_index], vals[by_index]
    counts = np.bincount(feats, minlength=d_sae)
    ends = np.cumsum(counts)
    starts = ends - counts
    fired = counts > 0
    top_of = np.zeros(d_sae, dtype=np.float32)
    top_of[fired] = np.maximum.reduceat(vals, starts[fired]) if fired.any() else 0
    mx = top_of.astype(np.float64)
    sums = np.bincount(feats, weights=vals.astype(np.float64), minlength=d_sae)
    report.summarising_step(0.2)

    # The strongest first (stable: ties stay in corpus order), for the top examples.
    by_value = np.argsort((feats << 32) | _descending_key(vals), kind="stable")
    rank = np.arange(n) - starts[feats[by_value]]
    top_sel = by_value[rank < TOP_K]  # grouped by feature, strongest first
    top_start = np.searchsorted(feats[top_sel], np.arange(d_sae + 1))
    report.summarising_step(0.45)

    # Histogram (numpy.histogram's rule: equal bins over [0, max], the last one closed).
    m_el = mx[feats]
    ok = (m_el > 0) & (vals >= 0)
    b = np.minimum((vals[ok] * (HIST_BINS / m_el[ok])).astype(np.int64), HIST_BINS - 1)
    hist = np.bincount(feats[ok] * HIST_BINS + b, minlength=d_sae * HIST_BINS).reshape(d_sae, HIST_BINS)

    # Interval j of each activation: lo_j < v <= hi_j with lo_j = max * j / INTERVALS, compared in float32
    # as the activations are (so hi_j of one interval is lo_(j+1) of the next, exactly).
    edges = (mx[:, None] * np.arange(INTERVALS + 1) / INTERVALS).astype(np.float32)  # [d_sae, INTERVALS + 1]
    j = np.zeros(n, dtype=np.int64)
    for k in range(1, INTERVALS):
        j += vals > edges[feats, k]
    inside = np.nonzero((m_el > 0) & (vals > 0))[0]
    # PER_INTERVAL uniform picks without replacement per (feature, interval): the smallest random keys.
    group = feats[inside] * INTERVALS + j[inside]
    keys = np.random.default_rng(INTERVAL_SEED).integers(0, 1 << 31, len(inside))
    order = np.argsort((group << 31) | keys)
    g_sorted = group[order]
    first = np.searchsorted(g_sorted, g_sorted, side="left")
    picked = inside[order[np.arange(len(order)) - first < PER_INTERVAL]]
    # Strongest first within an interval (ties in corpus order).
    picked = picked[np.lexsort((gidx[picked], -vals[picked], feats[picked] * INTERVALS + j[picked]))]
    pick_start = np.searchsorted(feats[picked], np.arange(d_sae + 1))
    report.summarising_step(0.7)

    def examples(sel: np.ndarray) -> list[list]:
        d = np.searchsorted(offsets, gidx[sel], side="right") - 1
        return [list(e) for e in zip(vals[sel].tolist(), d.tolist(), (gidx[sel] - offsets[d]).tolist())]

    top_ex, pick_ex, pick_j = examples(top_sel), examples(picked), j[picked].tolist()
    edges_unit = np.linspace(0.0, 1.0, HIST_BINS + 1)
    empty_hist = json.dumps({"edges": [], "counts": []})
    rows = []
    for f in range(d_sae):
        s, e = int(starts[f]), int(ends[f])
        c = e - s
        if c == 0:
            rows.append((f, 0, 0.0, 0.0, empty_hist, "[]", "[]", b"", b""))
            continue
        m = float(top_of[f])
        counts_f = hist[f].tolist() if m > 0 else [c] + [0] * (HIST_BINS - 1)
        a, z = int(pick_start[f]), int(pick_start[f + 1])
        mine = list(zip(pick_ex[a:z], pick_j[a:z]))
        intervals = [[m * k / INTERVALS, m * (k + 1) / INTERVALS, [ex for ex, jk in mine if jk == k]]
                     for k in range(INTERVALS - 1, -1, -1)]  # the highest interval first
        rows.append((f, c, m, float(sums[f]), json.dumps({"edges": (edges_unit * m).tolist(), "counts": counts_f}),
                     json.dumps(top_ex[int(top_start[f]):int(top_start[f + 1])]), json.dumps(intervals),
                     gidx[s:e].astype(np.int64).tobytes(), vals[s:e].astype(np.float32).tobytes()))
        if f % 256 == 255:
            report.summarising_step(0.7 + 0.3 * f / d_sae)
    return rows


def _descending_key(vals: np.ndarray) -> np.ndarray:
    """int64 keys in [0, 2**32) that sort float32 values from the largest to the smallest."""
    u = vals.astype(np.float32).view(np.uint32).astype(np.int64)
    ordered = np.where(u >= 1 << 31, (1 << 32) - 1 - u, u + (1 << 31))  # IEEE bits -> ascending order
    return (1 << 32) - 1 - ordered


def _token_rows(feats: np.ndarray, gidx: np.ndarray, vals: np.ndarray, flat: torch.Tensor, real: torch.Tensor,
                d_sae: int) -> tuple[list[tuple], torch.Tensor]:
    """Rows of `token_features` (per (token, feature): sum, count, max of its activations on that
    token) and the occurrences of every token (BOS and padding left out)."""
    tok_of = flat.numpy()[gidx]
    pair = tok_of * d_sae + feats
    uniq, inv = np.unique(pair, return_inverse=True)
    sums = np.bincount(inv, weights=vals.astype(np.float64), minlength=len(uniq))
    nfire = np.bincount(inv, minlength=len(uniq))
    maxes = torch.zeros(len(uniq)).scatter_reduce_(0, torch.from_numpy(inv), torch.from_numpy(vals), reduce="amax",
                                                   include_self=False).numpy()
    rows = list(zip((uniq // d_sae).tolist(), (uniq % d_sae).tolist(), sums.tolist(), nfire.tolist(),
                    maxes.astype(np.float64).tolist()))
    return rows, torch.bincount(flat[real])
