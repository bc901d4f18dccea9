"""The FAISS side of the knowledge graph: a derived, in-memory search index.

The SQLite store is the truth; this index is rebuilt from it on open and updated after each
committed write. It is never written to or read from a file (FAISS index files are not safe to
load from untrusted sources and FAISS writes them without fsync).

Index types (all on unit-normalised vectors, inner product = cosine):

* ``flat``  — ``IndexIDMap(IndexFlatIP)``: exact, recall 1.0, O(N·d) per query.  An EMA update
  rewrites the stored vector in place (O(d)), so merges never shift the index.
* ``hnsw``  — ``IndexIDMap(IndexHNSWFlat)``: graph search, approximate (recall depends on
  ``ef_search``), sub-linear queries, slow to build.
* ``ivf`` — ``IndexIDMap(IndexIVFScalarQuantizer)`` (8 bits per dimension): inverted lists of
  scalar-quantised vectors, approximate (recall depends on ``nprobe``); trains like ``ivfpq``
  (flat until ``train_min``); ``nlist`` / ``nprobe`` derived from N (:func:`ivf_shape`) and
  retrained when the store grew ``regrow`` times. ``auto`` is ``ivf`` with its defaults
  (:func:`choose_index` says why).
* ``ivfpq`` — ``IndexIDMap(IndexIVFPQ)``: inverted lists of product-quantised codes, approximate
  (recall depends on ``nprobe`` and the code size), small memory. Needs training: until the
  store holds ``train_min`` vectors it behaves as ``flat``. Training happens when the index is
  built (on open, or in the write that brings the store to ``train_min``), never in a search;
  it is logged at INFO level and shown as a progress bar when stderr is a terminal.

The merge rule asks for candidates with ``search_candidates`` (one call per batch, no re-scoring:
it confirms them itself on the stored vectors); ivf types then probe ``merge_nprobe`` lists, and a
batch of queries runs as one GEMM per inverted list (``kg/ivf_batch.py``).

Approximate indexes cannot update a vector in place: an updated node is re-added under the same
id and its old entry becomes stale. Searches over-fetch, drop duplicate ids and re-score every
candidate exactly against its current embedding, so results and scores are always exact cosines
of current embeddings (only *which* candidates are found is approximate). The index is rebuilt
when stale entries exceed a quarter of it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional

import faiss
import numpy as np

from ..options import INDEX_TYPES

log = logging.getLogger("moe_framework.knowledge_graph")

_ADD_CHUNK = 65536  # rows per FAISS add while building (progress granularity)

DEFAULT_PARAMS: dict[str, dict] = {
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128, "rerank": 2},
    "ivfpq": {"nlist": None, "m": None, "nbits": 8, "nprobe": 32, "train_min": 20000, "rerank": 32},
    # IVF over 8-bit scalar-quantised vectors (d bytes per node); nlist / nprobe derived from N
    # when None (see ``_ivf_shape``); retrained when the store grew ``regrow`` times since.
    "ivf": {"nlist": None, "nprobe": None, "train_min": 50000, "rerank": 2, "regrow": 4},
}
# Lists probed by the merge rule's candidate search (``search_candidates``); None: derived from
# the index's nprobe by ``merge_nprobe``. A report that merges is within the merge threshold of
# its node, so its node sits in one of the nearest lists; docs/knowledge_graph_scale.md has the
# measured agreement with the exact rule.
DEFAULT_PARAMS["ivf"]["merge_nprobe"] = None
# "auto" is exact (flat) below ``train_min`` nodes and IVF-SQ8 above, with every parameter
# derived from N; see ``choose_index`` for why it does not pick hnsw or ivfpq.
DEFAULT_PARAMS["auto"] = dict(DEFAULT_PARAMS["ivf"])
_TRAINED = ("ivfpq", "ivf", "auto")  # index types that train (flat until train_min)


def ivf_shape(n_total: int, dim: int, nlist: Optional[int] = None) -> tuple:
    """``(nlist, nprobe)`` an IVF index over ``n_total`` vectors uses by default: about sqrt(N)
    lists (so a list holds about sqrt(N) vectors, and k-means training and assignment stay
    O(N^1.5 d)), probing max(16, nlist / 64) of them (1.6% of the data at 1M; measured recall@10
    1.000 at 100k x 384 probing 1.3% of 1264 lists, 0.934 probing 0.6%; small stores need the
    floor of 16: 0.92-0.94 probing 8 of 55 lists on overlapping 24-d clusters, 0.98 with 16)."""
    if nlist is None:
        nlist = int(min(65536, max(16, round(np.sqrt(max(n_total, 1))))))
    return nlist, int(max(16, round(nlist / 64)))


def merge_nprobe(nprobe: int) -> int:
    """Lists the merge rule's candidate search probes by default: half the index's ``nprobe``,
    at least 8 (measured decision agreement with the exact rule on clustered 384-d reports at the
    threshold: 1.0000 at 100k with 8 of 316 lists, 0.9997 with 4; 1.0000 at 1M with 4 or 8 of
    1,000 lists, 2,000 reports)."""
    return int(min(nprobe, max(8, nprobe // 2)))


def choose_index(n_total: int, dim: int) -> str:
    """What ``index_type="auto"`` uses for ``n_total`` vectors of ``dim``: ``"flat"`` below
    ``train_min`` (an exact scan is then a few ms), else ``"ivf"``. Not ``hnsw``: its build
    inserts ~1k vectors/s per core at d=384 (measured 114 s for 100k on this CPU), which would
    cap ingest far below the store's insert rate; not ``ivfpq``: its recall@10 on clustered
    embeddings stays below 0.95 even re-ranking 100 candidates (0.85 at 100k x 384, m=96)."""
    return "flat" if n_total < DEFAULT_PARAMS["auto"]["train_min"] else "ivf"


# Up to this many queries run on one OpenMP thread: a single query gains little from FAISS's
# parallel scan, and several reader threads each fanning out to all cores oversubscribe the
# machine (measured: 100k x 384 flat, 2 busy cores: p50 18 ms on 1 thread vs 90 ms on 2).
_SMALL_BATCH = 4
# From this many queries the merge rule's IVF candidate search runs list by list as GEMMs
# (kg/ivf_batch.py) instead of FAISS's per-query scan.
_LIST_GEMM_MIN = 64


@contextlib.contextmanager
def _omp_threads(n: Optional[int]):
    """Run FAISS on ``n`` OpenMP threads in this thread only (the setting is per-thread in
    OpenMP), restoring the previous value."""
    if n is None:
        yield
        return
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


class RWLock:
    """Many concurrent readers or one writer (FAISS: concurrent searches are safe, mutation is
    not). Writers are preferred so a stream of searches cannot starve a write."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class VectorIndex:
    """Cosine top-k over node embeddings, keyed by node id.

    ``add``/``update`` take unit-normalised float32 rows. Thread-safe: searches run concurrently,
    mutations take the write side of an :class:`RWLock`.
    """

    def __init__(
        self,
        dim: int,
        index_type: str = "flat",
        params: Optional[dict] = None,
        progress: Optional[bool] = None,
    ) -> None:
        self.check_params(index_type, params)
        self.dim = dim
        self.index_type = index_type
        self.params = dict(DEFAULT_PARAMS.get(index_type, {}))
        self.params.update(params or {})
        self.progress = progress
        self.lock = RWLock()
        self._reset()

    @staticmethod
    def check_params(index_type: str, params: Optional[dict]) -> None:
        """``ValueError`` for an unknown index type or parameter (checked before any file is
        touched)."""
        if index_type not in INDEX_TYPES:
            raise ValueError(
                f"KnowledgeGraph: index_type must be one of {INDEX_TYPES}, got {index_type!r}"
            )
        known = DEFAULT_PARAMS.get(index_type, {})
        unknown = set(params or {}) - set(known)
        if unknown:
            raise ValueError(
                f"KnowledgeGraph: unknown index_params {sorted(unknown)} for {index_type!r} "
                f"(known: {sorted(known)})"
            )

    # ------------------------------------------------------------------ construction

    def _reset(self) -> None:
        # Node id of each row of the flat storage. Node ids only grow (SQLite AUTOINCREMENT) and
        # rows are appended in id order, so the array is sorted and id -> row is a binary search.
        self._row_ids = np.zeros(0, np.int64)
        self._n_rows = 0
        self._stale = 0
        self._trained_kind = "flat"
        self._trained_n = 0
        self._nprobe = 0  # lists an ivf index probes (set when trained)
        self._index = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))

    def _new_approx(self, sample: np.ndarray, n_total: int = 0):
        d = self.dim
        if self.index_type == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, int(self.params["M"]), faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = int(self.params["ef_construction"])
            hnsw.hnsw.efSearch = int(self.params["ef_search"])
            return faiss.IndexIDMap(hnsw)
        if self.index_type in ("ivf", "auto"):
            nlist, nprobe = self._ivf_shape(sample.shape[0], n_total)
            quantizer = faiss.IndexFlatIP(d)
            ivf = faiss.IndexIVFScalarQuantizer(
                quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
            ivf.nprobe = self._nprobe = min(nprobe, nlist)
            self._quantizer = quantizer
            return faiss.IndexIDMap(ivf)
        nlist, m = self._ivfpq_shape(sample.shape[0], n_total)
        if d % m:
            raise ValueError(f"KnowledgeGraph: ivfpq m={m} must divide dim={d}")
        quantizer = faiss.IndexFlatIP(d)
        inner = faiss.IndexIVFPQ(
            quantizer, d, nlist, m, int(self.params["nbits"]), faiss.METRIC_INNER_PRODUCT
        )
        inner.train(np.ascontiguousarray(sample, dtype=np.float32))
        inner.nprobe = min(int(self.params["nprobe"]), nlist)
        self._quantizer = quantizer  # keep the Python object alive as long as the index
        return faiss.IndexIDMap(inner)

    def rebuild(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Replace the contents with ``vecs [n, d]`` (unit rows) under ``ids [n]``."""
        self.rebuild_from_chunks([(np.asarray(ids, dtype=np.int64), vecs)], len(ids))

    def rebuild_from_chunks(self, chunks: Iterable[tuple], n_total: int) -> None:
        """Replace the contents with ``(ids [m], unit vecs [m, d])`` chunks, ``n_total`` rows in
        all. Streams (peak memory: the index plus one chunk) except when an ivfpq index must be
        trained, which needs the rows in one array. Approximate builds are logged (INFO) and
        shown as a progress bar (see ``progress``)."""
        self.lock.acquire_write()
        try:
            self._reset()
            train = self.index_type in _TRAINED and n_total >= int(self.params["train_min"])
            if not (train or (self.index_type == "hnsw" and n_total)):
                for ids, vecs in chunks:
                    self._add_locked(np.asarray(ids, dtype=np.int64), vecs)
                return
            t0 = time.perf_counter()
            with _Progress(self._show_progress(), n_total, f"{self.index_type} index") as bar:
                if train:
                    self._train_and_fill(chunks, n_total, bar)
                else:
                    bar.stage("hnsw index: inserting vectors")
                    for ids, vecs in chunks:  # the first chunk creates the graph
                        self._add_locked(np.asarray(ids, dtype=np.int64), vecs)
                        bar.update(len(ids))
            log.info(
                "KnowledgeGraph: %s index built in %.1f s (%d vectors)",
                self.index_type,
                time.perf_counter() - t0,
                n_total,
            )
        finally:
            self.lock.release_write()

    def _show_progress(self) -> bool:
        if self.progress is not None:
            return bool(self.progress)
        return bool(getattr(sys.stderr, "isatty", lambda: False)())

    def _train_and_fill(self, chunks: Iterable[tuple], n_total: int, bar) -> None:
        kind = self.index_type
        bar.stage(f"{kind} index: reading vectors")
        all_ids = np.empty(n_total, np.int64)
        all_vecs = np.empty((n_total, self.dim), np.float32)
        filled = 0
        for ids, vecs in chunks:
            all_ids[filled : filled + len(ids)] = ids
            all_vecs[filled : filled + len(ids)] = vecs
            filled += len(ids)
            bar.update(len(ids))
        if filled != n_total:
            raise RuntimeError(f"VectorIndex: expected {n_total} rows, got {filled}")
        rng = np.random.default_rng(0)  # deterministic training sample
        if kind == "ivfpq":
            n_train = min(n_total, 100_000)
            nlist, m = self._ivfpq_shape(n_train, n_total)
            shape = f"nlist={nlist}, m={m}, nbits={int(self.params['nbits'])}"
        else:  # k-means wants 39..256 points per centroid; 64 is plenty for the coarse lists
            nlist, nprobe = self._ivf_shape(n_total, n_total)
            n_train = min(n_total, 64 * nlist)
            nlist, nprobe = self._ivf_shape(n_train, n_total)
            shape = f"nlist={nlist}, nprobe={min(nprobe, nlist)}, 8-bit scalar quantiser"
        sample = all_vecs[np.sort(rng.choice(n_total, n_train, replace=False))]
        log.info(
            "KnowledgeGraph: training the %s index on %d of %d vectors (%s); searches wait "
            "until it is built",
            kind,
            n_train,
            n_total,
            shape,
        )
        bar.stage(f"{kind} index: training (k-means, {n_train} vectors)", reset=n_total)
        self._index = self._new_approx(sample, n_total)
        self._trained_kind = kind
        self._trained_n = n_total
        bar.stage(f"{kind} index: adding vectors")
        for lo in range(0, n_total, _ADD_CHUNK):
            self._add_locked(all_ids[lo : lo + _ADD_CHUNK], all_vecs[lo : lo + _ADD_CHUNK])
            bar.update(min(_ADD_CHUNK, n_total - lo))

    def _ivf_shape(self, n_train: int, n_total: int) -> tuple:
        nlist, nprobe = ivf_shape(n_total, self.dim, self.params["nlist"])
        nlist = min(nlist, max(1, n_train // 39))  # k-means wants ~39 points per centroid
        return nlist, int(self.params["nprobe"] or nprobe)

    def _ivfpq_shape(self, n_train: int, n_total: int) -> tuple:
        # ~4 sqrt(N) lists (capped: more lists cost training time for little recall at nprobe=32).
        nlist = self.params["nlist"] or int(max(16, min(1024, 4 * np.sqrt(n_total))))
        nlist = min(nlist, max(1, n_train // 39))  # k-means wants ~39 points per centroid
        m = self.params["m"] or _default_pq_m(self.dim)
        return nlist, m

    # ------------------------------------------------------------------ mutation

    @property
    def approximate(self) -> bool:
        return self._trained_kind != "flat"

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Append new nodes (ids never seen before)."""
        self.lock.acquire_write()
        try:
            self._add_locked(np.asarray(ids, dtype=np.int64), vecs)
        finally:
            self.lock.release_write()

    def _add_locked(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if self.index_type == "hnsw" and not self.approximate:
            self._index = self._new_approx(vecs)
            self._trained_kind = "hnsw"
        if not self.approximate:
            last = self._row_ids[self._n_rows - 1] if self._n_rows else np.iinfo(np.int64).min
            if not (ids[0] > last and (len(ids) == 1 or (np.diff(ids) > 0).all())):
                raise ValueError("VectorIndex.add: ids must be new and ascending")
            need = self._n_rows + len(ids)
            if need > len(self._row_ids):
                grown = np.zeros(max(need, 2 * len(self._row_ids), 1024), np.int64)
                grown[: self._n_rows] = self._row_ids[: self._n_rows]
                self._row_ids = grown
            self._row_ids[self._n_rows : need] = ids
        self._index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
        if not self.approximate:
            self._n_rows += len(ids)

    def update(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """New embeddings for existing nodes (after an EMA merge)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        self.lock.acquire_write()
        try:
            if not self.approximate:
                # In-place rewrite of the flat storage: O(d) per node, no id shift.
                xb = self._flat_storage()
                rows = np.searchsorted(self._row_ids[: self._n_rows], ids)
                if (rows >= self._n_rows).any() or (self._row_ids[rows] != ids).any():
                    raise KeyError("VectorIndex.update: unknown node id")
                xb[rows] = vecs
            else:
                self._index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
                self._stale += len(ids)
        finally:
            self.lock.release_write()

    @property
    def has_stale(self) -> bool:
        """Whether the index holds superseded entries of updated nodes (approximate only)."""
        return self._stale > 0

    @property
    def needs_rebuild(self) -> bool:
        return self.approximate and self._stale > max(1000, self._index.ntotal // 4)

    def wants_training(self) -> bool:
        # ivfpq starts exact and switches once there is enough data to train on; the caller then
        # rebuilds from the store.
        if self.index_type not in _TRAINED:
            return False
        if not self.approximate:
            return self._index.ntotal >= int(self.params["train_min"])
        # ivf / auto with derived parameters: retrain once the store outgrew them.
        regrow = self.params.get("regrow")
        return bool(
            regrow
            and self.params.get("nlist") is None
            and len(self) >= float(regrow) * self._trained_n
        )

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return self._index.ntotal - self._stale

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exact_scores: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None,
    ) -> tuple:
        """Top-``k`` cosine matches of unit ``queries [q, d]``: ``(scores [q, k] f32,
        ids [q, k] int64)``, -1 / -inf where fewer than ``k`` nodes exist. Sorted by descending
        score, ties by ascending id.

        For approximate indexes ``exact_scores(ids [m], queries_rows [m, d]) -> [m]`` re-scores
        candidates against current embeddings (stale entries and quantisation error removed).
        """
        q = queries.shape[0]
        self.lock.acquire_read()
        try:
            n = self._index.ntotal
            if n == 0 or k == 0:
                return (
                    np.full((q, k), -np.inf, np.float32),
                    np.full((q, k), -1, np.int64),
                )
            if not self.approximate:
                kk = min(k, n)
            else:
                # Over-fetch: candidates are re-scored exactly, so a wider net buys recall.
                kk = max(int(self.params["rerank"]) * k, k + 16)
                kk = min(n, kk + min(self._stale, kk))
            if not self.approximate and q > _SMALL_BATCH:
                scores, ids = self._flat_search_batched(queries, kk)
            else:
                with _omp_threads(1 if q <= _SMALL_BATCH else None):
                    scores, ids = self._index.search(queries, kk)
        finally:
            self.lock.release_read()
        if self.approximate and exact_scores is not None:
            scores, ids = self.rescore(queries, scores, ids, exact_scores)
        scores, ids = sort_rows(scores, ids, k)
        return scores, ids

    def search_candidates(self, queries: np.ndarray, k: int) -> tuple:
        """One FAISS call: the ``k`` best entries of unit ``queries [q, d]`` as the index scores
        them, ``(scores [q, k], ids [q, k])``, -1 where there are fewer. For an approximate index
        the scores are approximate and an id may repeat (a stale entry of an updated node) or be
        missed; ivf types probe ``merge_nprobe`` lists (param, else :func:`merge_nprobe`). The caller confirms candidates on
        the stored vectors (the merge rule does: ``kg.merge_plan``). Exact indexes: as ``search``."""
        if not self.approximate:
            return self.search(queries, k)
        self.lock.acquire_read()
        try:
            n = self._index.ntotal
            kk = min(n, k)
            if kk == 0:
                return _pad(
                    np.zeros((len(queries), 0), np.float32),
                    np.zeros((len(queries), 0), np.int64),
                    k,
                )
            params = None
            if self._trained_kind in ("ivf", "auto"):
                nprobe = int(self.params.get("merge_nprobe") or merge_nprobe(self._nprobe))
                if len(queries) >= _LIST_GEMM_MIN:  # a batch: one GEMM per inverted list
                    from .ivf_batch import search_by_lists

                    scores, ids = search_by_lists(self._index, queries, kk, nprobe)
                    return _pad(scores, ids, k)
                params = faiss.SearchParametersIVF()
                params.nprobe = nprobe
            with _omp_threads(1 if len(queries) <= _SMALL_BATCH else None):
                scores, ids = self._index.search(
                    np.ascontiguousarray(queries, dtype=np.float32), kk, params=params
                )
        finally:
            self.lock.release_read()
        return _pad(scores, ids, k)

    def _flat_storage(self) -> np.ndarray:
        """Writable [ntotal, d] view of the flat index's vectors (valid until the next add)."""
        n = self._index.ntotal
        flat: Any = faiss.downcast_index(self._index.index)  # an IndexFlatIP
        ptr = flat.get_xb()
        return faiss.rev_swig_ptr(ptr, n * self.dim).reshape(n, self.dim)

    def _flat_search_batched(self, queries: np.ndarray, k: int) -> tuple:
        # Same vectors, same exact answer (ties: lower row = lower id), but ops.kg_search's
        # blocked GEMM + running top-k on torch's BLAS: FAISS's bundled OpenBLAS measured 4-6x
        # slower on batches here (256 x 20k x 384: 0.81 s vs 0.21 s).
        import torch

        from .. import ops

        bank = torch.from_numpy(self._flat_storage())
        n_valid = torch.tensor(self._n_rows, dtype=torch.int64)
        scores, rows = ops.kg_search(torch.from_numpy(queries), bank, k, n_valid)
        rows = rows.numpy()
        ids = np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)
        return scores.numpy(), ids

    def rescore(self, queries, scores, ids, exact_scores):
        """Exact scores of each row's distinct candidates, fetched with one ``exact_scores``
        call for the whole batch."""
        q, kk = ids.shape
        out_s = np.full((q, kk), -np.inf, np.float32)
        out_i = np.full((q, kk), -1, np.int64)
        # Distinct candidates per row: sort each row, drop repeats and -1 (stale duplicates).
        srt = np.sort(ids, axis=1)
        keep = srt >= 0
        keep[:, 1:] &= srt[:, 1:] != srt[:, :-1]
        rows, cols = np.nonzero(keep)
        if len(rows) == 0:
            return out_s, out_i
        cand = srt[rows, cols]
        s = exact_scores(cand, queries[rows])
        ok = ~np.isnan(s)  # NaN: node vanished (not possible today: nodes are never deleted)
        rows, cand, s = rows[ok], cand[ok], s[ok]
        # Pack each row's candidates to the left (rows are in order after nonzero).
        start = np.searchsorted(rows, np.arange(q))
        pos = np.arange(len(rows)) - start[rows]
        out_s[rows, pos] = s
        out_i[rows, pos] = cand
        return out_s, out_i


class _Progress:
    """A tqdm bar over the vectors of an index build, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit="vec", unit_scale=True, leave=False, file=sys.stderr
            )

    def stage(self, desc: str, reset: Optional[int] = None) -> None:
        if self._bar is not None:
            if reset is not None:
                self._bar.reset(total=reset)
            self._bar.set_description(desc)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def sort_rows(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple:
    """Descending score, ascending id on ties, missing (-1) last; pad/trim to k columns."""
    q, kk = ids.shape
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    key_id = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    if kk:
        order = np.lexsort((key_id, -scores.astype(np.float64)), axis=1)
        scores = np.take_along_axis(scores, order, 1)
        ids = np.take_along_axis(ids, order, 1)
    if kk < k:
        scores = np.concatenate([scores, np.full((q, k - kk), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((q, k - kk), -1, np.int64)], 1)
    return scores[:, :k], ids[:, :k]


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple:
    q, kk = ids.shape
    if kk < k:
        scores = np.concatenate([scores, np.full((q, k - kk), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((q, k - kk), -1, np.int64)], 1)
    return scores, ids


def _default_pq_m(d: int) -> int:
    # ~8 dimensions per sub-quantiser is FAISS's usual accuracy/size point.
    for m in (d // 8, d // 4, d // 2, d):
        if m >= 1 and d % m == 0:
            return m
    return d
