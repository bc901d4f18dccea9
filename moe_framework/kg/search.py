"""Similarity search: cosine top-k through the derived index, filtered by node type and metadata,
and the device-resident bank for searches inside compiled code."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import schema as _s
from .core import StoreCore
from .filters import NodeFilter
from .records import CHUNK as _CHUNK
from .records import SimilarNode

__all__ = ["Search"]

# A filtered search first widens an index search (cheap when many nodes pass the filter), then,
# if that found too few, scores every node the filter lets through (one scan of the table, SQLite
# narrowing the rows first): exact, and the cheaper way when few pass. Candidates are checked in
# SQLite too, so reading them costs about what the scan costs per node; measured on 100k nodes
# (one CPU core), widening to an eighth of the store costs about half a scan, which bounds what a
# selective filter pays for trying the index first.
_MAX_WIDENED = 16384


def _widening_limit(n_nodes: int) -> int:
    """How many index candidates a filtered search may read before it scores exactly."""
    return min(_MAX_WIDENED, n_nodes // 8)


_EXACT_BATCH = 4096  # rows scored at a time by the exact filtered search


class Search(StoreCore):
    """``search``, ``find_similar_nodes`` (optionally filtered), ``device_bank``."""

    def search(self, queries: Any, k: int = 10) -> tuple:
        """Cosine top-``k`` of ``queries [q, dim]`` (or [dim]) among all nodes.

        Returns ``(scores [q, k] float32, ids [q, k] int64)`` as numpy arrays, sorted by
        descending score (ties: lower id first); ``ids`` is -1 and ``scores`` -inf where the
        graph has fewer than ``k`` nodes. Exact for ``index_type="flat"``; approximate indexes
        find candidates approximately and re-score them exactly.
        """
        self._check_open()
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"KnowledgeGraph.search: k must be a non-negative int, got {k!r}")
        u = _s.normalize(_s.check_embeddings(queries, self.dim, "query"))
        self._maybe_rebuild()
        return self._index.search(u, int(k), self._exact_scores_reader)

    def find_similar_nodes(
        self,
        query: Any,
        top_k: int = 10,
        threshold: Optional[float] = None,
        *,
        types: Any = None,
        where: Optional[dict] = None,
    ) -> list:
        """The ``top_k`` nodes most similar to ``query [dim]`` with cosine >= ``threshold``
        (when given), best first, as :class:`SimilarNode` (id, score, type, metadata).

        ``types``: keep only nodes of these types (a str or a sequence of str). ``where``: keep
        only nodes whose metadata holds each of these keys with an equal JSON value, e.g.
        ``{"layer": 1}`` (numbers by value, booleans only to booleans, ``None`` only to null, a
        missing key never matches; see :mod:`moe_framework.kg.filters`). A filtered search
        returns the ``top_k`` best of the nodes that pass, exactly as if every node were scored
        (with an approximate index, as exact as its unfiltered search; exact when few nodes pass).
        """
        self._check_open()
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(
                f"KnowledgeGraph.find_similar_nodes: top_k must be a non-negative int, got "
                f"{top_k!r}"
            )
        x = _s.check_embeddings(query, self.dim, "query")
        if x.shape[0] != 1:
            raise ValueError(
                f"KnowledgeGraph.find_similar_nodes: query must be one embedding [{self.dim}], "
                f"got {x.shape[0]} rows (search() takes a batch)"
            )
        t = None if threshold is None else _s.finite_float(threshold, "threshold")
        flt = NodeFilter.build(types, where, "find_similar_nodes")
        if flt is not None:
            return self._filtered_similar(_s.normalize(x), int(top_k), t, flt)
        scores, ids = self.search(x, int(top_k))
        hits = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        if t is not None:
            hits = [h for h in hits if h[1] >= t]
        info = self._node_info([h[0] for h in hits])
        return [SimilarNode(i, s, *info[i]) for i, s in hits if i in info]

    def _node_info(self, ids: list, flt: Optional[NodeFilter] = None) -> dict:
        """``{id: (type, metadata)}`` of the existing nodes among ``ids`` (that pass ``flt``:
        SQLite narrows the rows, so only those that may pass are parsed here)."""
        cond, args = ("1", []) if flt is None else flt.sql()
        info = {}
        conn = self._reader()
        chunk = _CHUNK - len(args)  # at least _CHUNK - MAX_SQL_ARGS
        for c in range(0, len(ids), chunk):
            part = ids[c : c + chunk]
            q = (
                f"SELECT id, type, metadata FROM nodes WHERE id IN ({','.join('?' * len(part))}) "
                f"AND {cond}"
            )
            for i, t, m in conn.execute(q, part + args):
                meta = _s.loads_json(m, f"{self.path}: node {i} metadata")
                if flt is None or flt.matches(t, meta):
                    info[i] = (t, meta)
        return info

    def _filtered_similar(self, u: np.ndarray, top_k: int, t, flt: NodeFilter) -> list:
        """The filtered search: widen the index search while that stays cheap, else score every
        node that passes (see ``_widening_limit``)."""
        if flt.matches_nothing or top_k == 0:
            return []
        self._maybe_rebuild()
        passing: dict = {}  # id -> (type, metadata) of the candidates that pass
        checked: set = set()  # ids of every candidate checked so far
        fetch = max(4 * top_k, 16)
        rerank = int(self._index.params.get("rerank", 1)) if self._index.approximate else 1
        while True:
            n_index = len(self._index)
            if fetch * rerank > _widening_limit(n_index):
                break
            scores, ids = self._index.search(u, fetch, self._exact_scores_reader)
            found = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
            new = [i for i, _ in found if i not in checked]
            passing.update(self._node_info(new, flt))
            checked.update(new)
            hits: list = []
            for i, s in found:
                if t is not None and s < t:
                    return hits  # sorted: every further node scores below the threshold too
                if i in passing:
                    hits.append(SimilarNode(i, s, *passing[i]))
                    if len(hits) == top_k:
                        return hits
            if len(found) >= n_index:
                return hits  # every node was a candidate
            if len(found) < fetch:
                break  # an approximate index ran out of candidates: score exactly
            fetch *= 4
        return self._filtered_exact(u[0], top_k, t, flt)

    def _filtered_exact(self, u: np.ndarray, top_k: int, t, flt: NodeFilter) -> list:
        """Score every node ``flt`` lets through against unit ``u [dim]``; keep the best
        ``top_k`` (descending score, lower id on ties) in a running selection."""
        cond, args = flt.sql()
        if self.readonly:
            # Like its index, a readonly handle searches the nodes that existed at open.
            cond += " AND nodes.id <= ?"
            args.append(self._indexed_max_id)
        cur = self._reader().execute(
            f"SELECT id, type, metadata, embedding FROM nodes WHERE {cond} ORDER BY id", args
        )
        best_s, best_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
        info: dict = {}
        while True:
            rows = cur.fetchmany(_EXACT_BATCH)
            if not rows:
                break
            passed = []
            for i, node_type, meta_text, blob in rows:
                meta = _s.loads_json(meta_text, f"{self.path}: node {i} metadata")
                if flt.matches(node_type, meta):
                    passed.append((i, node_type, meta, blob))
            if not passed:
                continue
            ids = np.fromiter((p[0] for p in passed), np.int64, len(passed))
            # Row-wise float64 sums: equal embeddings get bit-equal scores (a BLAS matrix-vector
            # product may round rows differently), so ties go to the lower id.
            units = self._unit_rows(ids, [p[3] for p in passed])
            scores = (units.astype(np.float64) * u).sum(axis=1).astype(np.float32)
            if t is not None:
                ok = scores >= t
                ids, scores, passed = ids[ok], scores[ok], [p for p, k in zip(passed, ok) if k]
            info.update((p[0], (p[1], p[2])) for p in passed)
            best_s = np.concatenate([best_s, scores])
            best_i = np.concatenate([best_i, ids])
            order = np.lexsort((best_i, -best_s.astype(np.float64)))[:top_k]
            best_s, best_i = best_s[order], best_i[order]
            info = {int(i): info[int(i)] for i in best_i}
        return [SimilarNode(int(i), float(s), *info[int(i)]) for s, i in zip(best_s, best_i)]

    # ------------------------------------------------------------------ device bank

    def device_bank(self, device: Any = "cpu", capacity: Optional[int] = None):
        """A :class:`moe_framework.kg.bank.DeviceBank` holding every node's unit embedding on
        ``device``, kept in sync by this handle's writes. ``capacity`` (rows) is preallocated so
        adding nodes does not reallocate (which would invalidate captured CUDA graphs); the default
        is twice the current size (at least 1024). Its ``search`` uses ``ops.kg_search``: no host
        sync, static shapes."""
        from .bank import DeviceBank

        self._check_open()
        with self._wlock:
            chunks = list(self._iter_embeddings(self._reader()))
            ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
            vecs = (
                np.concatenate([c[1] for c in chunks])
                if chunks
                else np.zeros((0, self.dim), np.float32)
            )
            cap = capacity if capacity is not None else max(1024, 2 * len(ids))
            bank = DeviceBank(self.dim, cap, device)
            bank.reset(ids, vecs)
            self._bank = bank
        return bank
