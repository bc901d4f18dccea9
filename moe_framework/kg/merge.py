"""The merge rule: filing reports so that a report close enough to an existing node updates it
(EMA of the embeddings, metadata merged, provenance kept) instead of adding a near-duplicate.
Specified in docs/knowledge_graph.md ("The merge rule")."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import schema as _s
from .core import StoreCore
from .records import FilingResult
from .records import check_type as _check_type

__all__ = ["MergeRule"]


class MergeRule(StoreCore):
    """``add_or_update_*``: file reports with the merge rule."""

    def add_or_update_node(
        self,
        embedding: Any,
        type: str = "node",
        metadata: Optional[dict] = None,
        provenance: Optional[dict] = None,
    ) -> FilingResult:
        """File one report with the merge rule (see :meth:`add_or_update_batch`)."""
        return self.add_or_update_batch(embedding, type, [metadata or {}], [provenance or {}])[0]

    def add_or_update_batch(
        self,
        embeddings: Any,
        types: Union[str, Sequence[str]] = "node",
        metadatas: Optional[Sequence[dict]] = None,
        provenance: Optional[Sequence[Optional[dict]]] = None,
    ) -> list:
        """File reports ``embeddings [n, dim]`` with the merge rule, in one transaction.

        For each report in order: find the most similar node (the graph as updated by the earlier
        reports of this batch; ties go to the lower id). If their cosine is > ``merge_threshold``,
        merge: the node's embedding becomes ``(1 - ema_rate) * e + ema_rate * report`` (computed
        in float64, stored float32), its metadata is updated with the report's keys (the report
        wins), ``merge_count`` grows by one. Otherwise insert a new node. Either way a provenance
        row keeps the report's embedding, metadata and ``provenance`` dict, so merging loses
        nothing. Returns one :class:`FilingResult` per report.
        """
        x = _s.check_embeddings(embeddings, self.dim)
        n = x.shape[0]
        types = self._norm_list(types, n, "types", "node")
        for t in types:
            _check_type(t)
        meta_in = self._norm_list(metadatas, n, "metadatas", dict)
        meta_json = [_s.dumps_json(m, "metadata") for m in meta_in]
        provs = [
            _s.dumps_json(p or {}, "provenance")
            for p in self._norm_list(provenance, n, "provenance", dict)
        ]
        unit = _s.normalize(x)
        results: list = []
        now = time.time()
        with self._transaction("add_or_update_batch") as conn:
            n_before = len(self._index)
            cand_s = cand_i = None
            if n_before and n:
                # A few candidates per report suffice: only the best node this batch has not
                # touched is needed from the index (touched nodes are scored exactly below).
                cand_s, cand_i = self._index.search(
                    unit, min(n_before, 8), self._exact_scores_writer
                )
            touched = _Touched(n, self.dim)
            inserted: list = []
            next_id = self._next_node_id(conn)
            for j in range(n):
                best_id, best_s = self._best_match(j, unit[j], cand_s, cand_i, touched)
                sim = None if best_id is None else float(best_s)
                if best_id is not None and best_s > self.merge_threshold:
                    if best_id in touched:
                        old, old_meta = touched.get(best_id)
                    else:
                        row = conn.execute(
                            "SELECT embedding, metadata FROM nodes WHERE id = ?", (best_id,)
                        ).fetchone()
                        old = _s.from_blob(row[0], self.dim, self.path)
                        old_meta = _s.loads_json(row[1], f"{self.path}: node {best_id} metadata")
                    new = (
                        (1.0 - self.ema_rate) * old.astype(np.float64)
                        + self.ema_rate * x[j].astype(np.float64)
                    ).astype(np.float32)
                    merged_meta = {**old_meta, **meta_in[j]}
                    conn.execute(
                        "UPDATE nodes SET embedding = ?, metadata = ?, merge_count = merge_count + 1, "
                        "updated_at = ? WHERE id = ?",
                        (_s.to_blob(new), _s.dumps_json(merged_meta, "metadata"), now, best_id),
                    )
                    touched.put(best_id, new, _s.normalize(new[None])[0], merged_meta)
                    node_id, action = best_id, "merged"
                else:
                    node_id, action = next_id, "inserted"
                    next_id += 1
                    conn.execute(
                        "INSERT INTO nodes (id, type, embedding, metadata, merge_count, created_at, "
                        "updated_at) VALUES (?, ?, ?, ?, 1, ?, ?)",
                        (node_id, types[j], _s.to_blob(x[j]), meta_json[j], now, now),
                    )
                    touched.put(node_id, x[j], unit[j], dict(meta_in[j]))
                    inserted.append(node_id)
                conn.execute(
                    "INSERT INTO provenance (node_id, action, similarity, source, metadata, embedding, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        node_id,
                        "insert" if action == "inserted" else "merge",
                        sim,
                        provs[j],
                        meta_json[j],
                        _s.to_blob(x[j]),
                        now,
                    ),
                )
                results.append(FilingResult(int(node_id), action, sim))
            new_set = set(inserted)
            add_ids = np.asarray(inserted, np.int64)
            add_vecs = np.stack([touched.unit_of(i) for i in inserted]) if inserted else None
            upd = [i for i in touched.slot if i not in new_set]
            upd_ids = np.asarray(upd, np.int64)
            upd_vecs = np.stack([touched.unit_of(i) for i in upd]) if upd else None
            self._after_commit(conn, add_ids, add_vecs, upd_ids, upd_vecs)
        return results

    def _best_match(self, j, u, cand_s, cand_i, touched) -> tuple:
        best_id, best_s = None, -np.inf
        if cand_i is not None:
            row_s, row_i = cand_s[j], cand_i[j]
            while True:
                untouched = [
                    (s, i) for s, i in zip(row_s, row_i) if i >= 0 and int(i) not in touched
                ]
                if untouched:
                    best_id, best_s = int(untouched[0][1]), float(untouched[0][0])
                    break
                n_index = len(self._index)
                if (row_i < 0).any() or len(row_i) >= n_index:
                    break  # every indexed node was touched by this batch
                # Every candidate was touched by this batch (rare): look further.
                k = min(n_index, 2 * len(row_i))
                s2, i2 = self._index.search(u[None], k, self._exact_scores_writer)
                row_s, row_i = s2[0], i2[0]
        if len(touched):
            tid, m = touched.best(u)
            if m > best_s or (m == best_s and (best_id is None or tid < best_id)):
                best_id, best_s = tid, m
        return best_id, best_s


class _Touched:
    """Nodes created or moved by the batch being filed: current raw and unit embeddings and
    metadata, in arrays so each report scores all of them with one matrix-vector product."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.slot: dict = {}
        self.ids = np.empty(capacity, np.int64)
        self.unit = np.empty((capacity, dim), np.float32)
        self.raw: list = []
        self.meta: list = []

    def __contains__(self, node_id) -> bool:
        return node_id in self.slot

    def __len__(self) -> int:
        return len(self.slot)

    def get(self, node_id: int) -> tuple:
        s = self.slot[node_id]
        return self.raw[s], self.meta[s]

    def unit_of(self, node_id: int) -> np.ndarray:
        return self.unit[self.slot[node_id]]

    def put(self, node_id: int, raw: np.ndarray, unit: np.ndarray, meta: dict) -> None:
        s = self.slot.get(node_id)
        if s is None:
            s = self.slot[node_id] = len(self.raw)
            self.ids[s] = node_id
            self.raw.append(raw)
            self.meta.append(meta)
        else:
            self.raw[s], self.meta[s] = raw, meta
        self.unit[s] = unit

    def best(self, u: np.ndarray) -> tuple:
        """(id, cosine) of the touched node most similar to unit ``u`` (lower id on ties)."""
        n = len(self.raw)
        sc = self.unit[:n] @ u
        m = sc.max()
        return int(self.ids[:n][sc == m].min()), float(m)
