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
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformer_lens import HookedTransformer

from core import store
from core.saes import LoadedSAE, doc_batches, encode

SCHEMA_VERSION = 1
DATA_ENV = "CIRCUIT_EXPLORER_DATA"
TOP_K = 20
INTERVALS = 5
PER_INTERVAL = 5
HIST_BINS = 30
BATCH = 64

Progress = Callable[[float, str], None]


def data_dir() -> Path:
    """Where the app keeps its indexes: $CIRCUIT_EXPLORER_DATA, else `.data/` in the repository."""
    return Path(os.environ.get(DATA_ENV) or Path(__file__).resolve().parent.parent / ".data")


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


def model_fingerprint(model: HookedTransformer) -> str:
    fp = getattr(model, "_circuit_explorer_fingerprint", None)
    if fp is None:
        fp = tensors_fingerprint(model.state_dict()) + _digest([
            json.dumps(model.cfg.to_dict(), default=str, sort_keys=True).encode(),
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


class IndexError_(Exception):
    """An index could not be built (empty corpus, ...); the message is for the user."""


class FeatureIndex:
    """Read access to a built index file (one connection per call: safe across threads)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta = self._meta()
        self.d_sae = int(meta["d_sae"])
        self.n_tokens = int(meta["n_tokens"])
        self.n_docs = int(meta["n_docs"])
        self.build_seconds = float(meta["build_seconds"])
        self.key = meta["key"]
        self._offsets: np.ndarray | None = None
        self._acts: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a few features' blobs, for this object's life

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def _meta(self) -> dict:
        with self._connect() as con:
            return dict(con.execute("SELECT key, value FROM meta").fetchall())

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.build_seconds if self.build_seconds else float("inf")

    def doc(self, d: int) -> list[int]:
        with self._connect() as con:
            row = con.execute("SELECT tokens FROM docs WHERE doc = ?", (int(d),)).fetchone()
        return np.frombuffer(row[0], dtype=np.int32).tolist()

    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            with self._connect() as con:
                (blob,) = con.execute("SELECT value FROM blobs WHERE key = 'offsets'").fetchone()
            self._offsets = np.frombuffer(blob, dtype=np.int64)
        return self._offsets

    def feature(self, f: int) -> FeatureStats:
        with self._connect() as con:
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
            with self._connect() as con:
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
        with self._connect() as con:
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


def open_index(model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]], progress: Progress | None = None,
               directory: Path | None = None) -> FeatureIndex:
    """The index of this (model, SAE, corpus): read if a valid one exists, else built (and kept)."""
    docs = [d for d in docs if len(d) > 1]  # a document of BOS alone has nothing to index
    if not docs:
        raise IndexError_("The corpus is empty: give at least one document with a token after BOS.")
    key = index_key(model, loaded, docs)
    path = index_path(key, directory)
    with _build_guard:
        lock = _build_locks.setdefault(str(path), threading.Lock())
    with lock:
        if path.exists() and _checked(path, key, loaded.d_sae):
            return FeatureIndex(path)
        if path.exists():
            path.unlink()  # corrupt, stale or incomplete: never shown
        _sweep(path.parent)
        build(model, loaded, docs, path, key, progress)
    return FeatureIndex(path)


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


def _sweep(directory: Path) -> None:
    """Remove temporary files of builds that died (a killed process) over an hour ago."""
    if not directory.exists():
        return
    now = time.time()
    for tmp in directory.glob("sae-index-*.tmp"):
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
def collect(model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]], progress: Progress | None = None):
    """Every non-zero feature activation over the corpus: (features, global indices, values), and
    the token id at each global index. Forward passes stop after the SAE's layer."""
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
    done = 0
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
        if progress:
            progress(0.85 * done / total, f"Encoding the corpus: {done:,} of {total:,} tokens")
    real = torch.ones(len(flat), dtype=torch.bool)
    real[torch.tensor(offsets)] = False
    if special:
        real &= ~torch.isin(flat, torch.tensor(sorted(special)))
    return torch.cat(feats), torch.cat(gidx), torch.cat(vals), flat, real, offsets


def build(model: HookedTransformer, loaded: LoadedSAE, docs: list[list[int]], path: Path, key: str,
          progress: Progress | None = None) -> None:
    start = time.perf_counter()
    d_sae = loaded.d_sae
    feats, gidx, vals, flat, real, offsets = collect(model, loaded, docs, progress)
    n_tokens = int(real.sum())
    # Sort by feature, then by activation (descending), then by index: ties resolve the same way everywhere.
    order = torch.argsort(gidx, stable=True)
    order = order[torch.argsort(vals[order], descending=True, stable=True)]
    order = order[torch.argsort(feats[order], stable=True)]
    feats, gidx, vals = feats[order], gidx[order], vals[order]
    counts = torch.bincount(feats, minlength=d_sae)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    off = np.asarray(offsets)

    def example(i: int) -> list:
        g = int(gidx[i])
        d = int(doc_of[g])
        return [float(vals[i]), d, g - int(off[d])]

    # Per (token, feature): sum, count, max of activations, for search by token.
    tok_of = flat[gidx]
    pair = tok_of * d_sae + feats
    uniq, inv = torch.unique(pair, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, vals.double())
    nfire = torch.bincount(inv, minlength=len(uniq))
    maxes = torch.zeros(len(uniq)).scatter_reduce_(0, inv, vals, reduce="amax", include_self=False)
    occ = torch.bincount(flat[real])

    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the temporary file goes, whatever stops the build: an error, or Streamlit stopping the script
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
            rows = []
            for f in range(d_sae):
                s, e = int(starts[f]), int(ends[f])
                n = e - s
                if n == 0:
                    rows.append((f, 0, 0.0, 0.0, json.dumps({"edges": [], "counts": []}), "[]", "[]", b"", b""))
                    continue
                v = vals[s:e]
                mx = float(v[0])
                edges = torch.linspace(0.0, mx, HIST_BINS + 1)
                hist = torch.histc(v, bins=HIST_BINS, min=0.0, max=mx).long().tolist() if mx > 0 else [n] + [0] * (HIST_BINS - 1)
                top = [example(s + i) for i in range(min(TOP_K, n))]
                gen = torch.Generator().manual_seed(f)
                intervals = []
                for j in range(INTERVALS):
                    lo, hi = mx * j / INTERVALS, mx * (j + 1) / INTERVALS
                    inside = ((v > lo) & (v <= hi)).nonzero()[:, 0]  # descending order of v
                    pick = inside[torch.randperm(len(inside), generator=gen)[:PER_INTERVAL]].sort().values
                    intervals.append([lo, hi, [example(s + int(i)) for i in pick]])
                by_index = torch.argsort(gidx[s:e])
                rows.append((f, n, mx, float(v.double().sum()), json.dumps({"edges": edges.tolist(), "counts": hist}),
                             json.dumps(top), json.dumps(intervals[::-1]),
                             gidx[s:e][by_index].numpy().astype(np.int64).tobytes(),
                             v[by_index].numpy().astype(np.float32).tobytes()))
                if progress and f % 256 == 0:
                    progress(0.85 + 0.13 * f / d_sae, f"Summarising features: {f:,} of {d_sae:,}")
            con.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            con.executemany("INSERT INTO token_counts VALUES (?, ?)", ((t, int(c)) for t, c in enumerate(occ.tolist()) if c))
            con.executemany(
                "INSERT INTO token_features VALUES (?, ?, ?, ?, ?)",
                ((int(p // d_sae), int(p % d_sae), float(sm), int(c), float(m))
                 for p, sm, c, m in zip(uniq.tolist(), sums.tolist(), nfire.tolist(), maxes.tolist())),
            )
            con.execute("CREATE INDEX token_features_by_token ON token_features (token, sum_act DESC)")
            seconds = time.perf_counter() - start
            meta = {"schema": SCHEMA_VERSION, "key": key, "d_sae": d_sae, "n_tokens": n_tokens, "n_docs": len(docs),
                    "sae_id": loaded.sae_id, "hook_name": loaded.hook_name, "model": model.cfg.model_name,
                    "build_seconds": seconds, "built_at": time.time(), "complete": 1}
            con.executemany("INSERT INTO meta VALUES (?, ?)", ((k, str(v)) for k, v in meta.items()))
            con.commit()
        finally:
            con.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if progress:
        progress(1.0, f"Index built: {n_tokens:,} tokens, {d_sae:,} features in {seconds:.1f} s")
