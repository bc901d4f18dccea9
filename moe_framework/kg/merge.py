"""The merge rule: filing reports so that a report close enough to an existing node updates it
(EMA of the embeddings, metadata merged, provenance kept) instead of adding a near-duplicate.
Specified in docs/knowledge_graph.md ("The merge rule")."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

from . import schema as _s
from .core import StoreCore
from .merge_plan import MergePlan as _Plan
from .records import FilingResult
from .records import check_types as _check_types

__all__ = ["MergeRule"]


class MergeRule(StoreCore):
    """``add_or_update_*``: file reports with the merge rule."""

    # Seconds per phase of the last ``add_or_update_batch`` (see its end); for benchmarks.
    _last_merge_times: Optional[dict] = None

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
        _check_types(types)
        meta_in = self._norm_list(metadatas, n, "metadatas", dict)
        meta_json = _s.dumps_json_list(meta_in, "metadata")
        provs = _s.dumps_json_list(
            [p or {} for p in self._norm_list(provenance, n, "provenance", dict)], "provenance"
        )
        unit = _s.normalize(x)
        blobs = _s.to_blobs(x)
        now = time.time()
        t_start = time.perf_counter()
        with self._transaction("add_or_update_batch") as conn:
            plan = _Plan(self, conn, x, unit, meta_in)
            plan.run()
            t_rows = time.perf_counter()
            inserts, updates, prov_rows = plan.rows(types, meta_json, blobs, provs, now)
            if inserts:
                conn.executemany(
                    "INSERT INTO nodes (id, type, embedding, metadata, merge_count, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    inserts,
                )
            if updates:
                conn.executemany(
                    "UPDATE nodes SET embedding = ?, metadata = ?, merge_count = merge_count + ?, "
                    "updated_at = ? WHERE id = ?",
                    updates,
                )
            conn.executemany(
                "INSERT INTO provenance (node_id, action, similarity, source, metadata, embedding, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                prov_rows,
            )
            add_ids, add_vecs, upd_ids, upd_vecs = plan.index_update()
            self._after_commit(conn, add_ids, add_vecs, upd_ids, upd_vecs)
            t_sql = time.perf_counter()
        t_end = time.perf_counter()
        # Where the time went (benchmarks): ``plan.times`` plus the SQL writes and the COMMIT
        # with the index update after it.
        self._last_merge_times = {
            **plan.times,
            "sql_writes": t_sql - t_rows,
            "commit_and_index": t_end - t_sql,
            "total": t_end - t_start,
            "rows_written": len(inserts) + len(updates) + len(prov_rows),
        }
        return plan.results()
