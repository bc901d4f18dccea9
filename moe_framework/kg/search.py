"""Similarity search: cosine top-k through the derived index, and the device-resident bank for
searches inside compiled code."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import schema as _s
from .core import StoreCore
from .records import CHUNK as _CHUNK
from .records import SimilarNode

__all__ = ["Search"]


class Search(StoreCore):
    """``search``, ``find_similar_nodes``, ``device_bank``."""

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
        self, query: Any, top_k: int = 10, threshold: Optional[float] = None
    ) -> list:
        """The ``top_k`` nodes most similar to ``query [dim]`` with cosine >= ``threshold``
        (when given), best first, as :class:`SimilarNode` (id, score, type, metadata)."""
        scores, ids = self.search(query, top_k)
        hits = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        if threshold is not None:
            t = _s.finite_float(threshold, "threshold")
            hits = [h for h in hits if h[1] >= t]
        if not hits:
            return []
        info = {}
        conn = self._reader()
        for c in range(0, len(hits), _CHUNK):
            part = [h[0] for h in hits[c : c + _CHUNK]]
            q = f"SELECT id, type, metadata FROM nodes WHERE id IN ({','.join('?' * len(part))})"
            for i, t, m in conn.execute(q, part):
                info[i] = (t, m)
        return [
            SimilarNode(
                i, s, info[i][0], _s.loads_json(info[i][1], f"{self.path}: node {i} metadata")
            )
            for i, s in hits
            if i in info
        ]

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
