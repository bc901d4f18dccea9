"""Plain writes: nodes inserted as given (no merge rule), typed weighted edges, provenance rows.
Each call is one transaction."""

from __future__ import annotations

import time
from itertools import repeat
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from . import schema as _s
from .core import StoreCore
from .records import as_id as _as_id
from .records import check_type as _check_type
from .records import check_types as _check_types

__all__ = ["Writes"]


class Writes(StoreCore):
    """Insert nodes, add edges, attach provenance."""

    # ------------------------------------------------------------------ nodes

    def add_node(
        self,
        embedding: Any,
        type: str = "node",
        metadata: Optional[dict] = None,
        provenance: Optional[dict] = None,
    ) -> int:
        """Insert one node (no merge rule). ``embedding``: [dim] float. Returns its id."""
        return int(
            self.add_nodes_batch(
                embedding, type, [metadata or {}], [provenance] if provenance else None
            )[0]
        )

    def add_nodes_batch(
        self,
        embeddings: Any,
        types: Union[str, Sequence[str]] = "node",
        metadatas: Optional[Sequence[dict]] = None,
        provenance: Optional[Sequence[Optional[dict]]] = None,
    ) -> np.ndarray:
        """Insert ``embeddings [n, dim]`` as new nodes in one transaction (no merge rule).

        ``provenance``: optional per-node source dicts, recorded as "insert" provenance rows.
        Returns the new ids ``[n] int64`` (ascending).
        """
        x = _s.check_embeddings(embeddings, self.dim)
        n = x.shape[0]
        types = self._norm_list(types, n, "types", "node")
        _check_types(types)
        metas = _s.dumps_json_list(self._norm_list(metadatas, n, "metadatas", dict), "metadata")
        provs = self._norm_list(provenance, n, "provenance", None)
        given = [j for j, p in enumerate(provs) if p is not None]
        prov_text = dict(zip(given, _s.dumps_json_list([provs[j] for j in given], "provenance")))
        unit = _s.normalize(x)
        blobs = _s.to_blobs(x)
        now = time.time()
        with self._transaction("add_nodes_batch") as conn:
            first = self._next_node_id(conn)
            ids = np.arange(first, first + n, dtype=np.int64)
            conn.executemany(
                "INSERT INTO nodes (id, type, embedding, metadata, merge_count, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 1, ?, ?)",
                zip(range(first, first + n), types, blobs, metas, repeat(now), repeat(now)),
            )
            if given:
                conn.executemany(
                    "INSERT INTO provenance (node_id, action, similarity, source, metadata, embedding, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (first + j, "insert", None, prov_text[j], metas[j], blobs[j], now)
                        for j in given
                    ],
                )
            self._after_commit(conn, ids, unit, np.zeros(0, np.int64), None)
        return ids

    # ------------------------------------------------------------------ edges

    def add_edge(self, src: int, dst: int, type: str = "related", weight: float = 1.0) -> None:
        """Add (or re-weight) the directed edge ``src -> dst`` of ``type``; both nodes must exist."""
        self.add_edges_batch([(src, dst, type, weight)])

    def add_edges_batch(self, edges: Iterable[tuple]) -> int:
        """Add ``(src, dst, type, weight)`` edges in one transaction (an existing edge with the same
        (src, dst, type) gets the new weight). Returns how many were written."""
        rows = []
        for e in edges:
            if len(e) != 4:
                raise ValueError(
                    f"KnowledgeGraph.add_edges_batch: expected (src, dst, type, weight), got {e!r}"
                )
            src, dst, t, w = e
            _check_type(t, "edge type")
            rows.append(
                (_as_id(src, "src"), _as_id(dst, "dst"), t, _s.finite_float(w, "edge weight"))
            )
        if not rows:
            return 0
        now = time.time()
        with self._transaction("add_edges_batch") as conn:
            ends = {r[0] for r in rows} | {r[1] for r in rows}
            missing = ends - set(self._existing(conn, ends))
            if missing:
                raise ValueError(f"KnowledgeGraph.add_edge: node {min(missing)} does not exist")
            conn.executemany(
                "INSERT INTO edges (src, dst, type, weight, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (src, dst, type) DO UPDATE SET weight = excluded.weight",
                [(*r, now) for r in rows],
            )
        return len(rows)

    # ------------------------------------------------------------------ provenance

    def record_provenance(
        self,
        node_id: int,
        action: str,
        embedding: Any = None,
        metadata: Optional[dict] = None,
        source: Optional[dict] = None,
        similarity: Optional[float] = None,
    ) -> None:
        """Attach a provenance row to an existing node without changing it (e.g. a duplicate
        report the librarian dropped in favour of its representative)."""
        self.record_provenance_batch([(node_id, action, embedding, metadata, source, similarity)])

    def record_provenance_batch(self, rows: Iterable[tuple]) -> None:
        """``(node_id, action, embedding|None, metadata|None, source|None, similarity|None)``
        rows, one transaction."""
        out = []
        for node_id, action, emb, meta, src, sim in rows:
            _check_type(action, "action")
            blob = None if emb is None else _s.to_blob(_s.check_embeddings(emb, self.dim)[0])
            out.append(
                (
                    _as_id(node_id, "node_id"),
                    action,
                    None if sim is None else _s.finite_float(sim, "similarity"),
                    _s.dumps_json(src or {}, "source"),
                    _s.dumps_json(meta or {}, "metadata"),
                    blob,
                )
            )
        if not out:
            return
        now = time.time()
        with self._transaction("record_provenance") as conn:
            missing = {r[0] for r in out} - set(self._existing(conn, {r[0] for r in out}))
            if missing:
                raise ValueError(
                    f"KnowledgeGraph.record_provenance: node {min(missing)} does not exist"
                )
            conn.executemany(
                "INSERT INTO provenance (node_id, action, similarity, source, metadata, embedding, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*r[:2], r[2], r[3], r[4], r[5], now) for r in out],
            )
