"""Reads of stored nodes, edges and provenance (SQL on this thread's read connection)."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from . import schema as _s
from .core import StoreCore
from .filters import NodeFilter
from .records import Node
from .records import as_id as _as_id
from .records import node_from_row as _node

__all__ = ["Reads"]


class Reads(StoreCore):
    """Counts, nodes, edges and provenance as stored."""

    def __len__(self) -> int:
        return int(self._reader().execute("SELECT count(*) FROM nodes").fetchone()[0])

    def __contains__(self, node_id: int) -> bool:
        return bool(self._existing(self._reader(), [int(node_id)]))

    def num_edges(self) -> int:
        """How many edges the store holds."""
        return int(self._reader().execute("SELECT count(*) FROM edges").fetchone()[0])

    def get_node(self, node_id: int) -> Node:
        """The node ``node_id``; ``KeyError`` when it does not exist."""
        row = (
            self._reader()
            .execute(
                "SELECT id, type, embedding, metadata, merge_count, created_at, updated_at FROM nodes "
                "WHERE id = ?",
                (_as_id(node_id, "node_id"),),
            )
            .fetchone()
        )
        if row is None:
            raise KeyError(f"KnowledgeGraph: node {node_id} does not exist")
        return _node(row, self.dim, self.path)

    def node_ids(self) -> np.ndarray:
        """All node ids ``[N] int64``, ascending."""
        rows = self._reader().execute("SELECT id FROM nodes ORDER BY id").fetchall()
        return np.asarray([r[0] for r in rows], np.int64)

    def iter_nodes(
        self, batch: int = 4096, *, types: Any = None, where: Optional[dict] = None
    ) -> Iterator[Node]:
        """Every node in id order (streams; fine for large stores).

        ``types`` / ``where``: only the nodes of these types / whose metadata holds these keys
        with equal JSON values, as in :meth:`find_similar_nodes` (SQLite narrows the rows first).
        """
        flt = NodeFilter.build(types, where, "iter_nodes")
        if flt is not None and flt.matches_nothing:
            return iter(())
        cond, args = ("1", []) if flt is None else flt.sql()
        cur = self._reader().execute(
            "SELECT id, type, embedding, metadata, merge_count, created_at, updated_at FROM nodes "
            f"WHERE {cond} ORDER BY id",
            args,
        )
        return self._stream_nodes(cur, batch, flt)

    def _stream_nodes(self, cur, batch: int, flt: Optional[NodeFilter]) -> Iterator[Node]:
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            for r in rows:
                node = _node(r, self.dim, self.path)
                if flt is None or flt.matches(node.type, node.metadata):
                    yield node

    def edges(self) -> list:
        """Every edge as ``(src, dst, type, weight)``, sorted."""
        return [
            (r[0], r[1], r[2], r[3])
            for r in self._reader().execute(
                "SELECT src, dst, type, weight FROM edges ORDER BY src, dst, type"
            )
        ]

    def get_provenance(self, node_id: int) -> list:
        """Every report filed into ``node_id``, oldest first: dicts with ``action`` ("insert",
        "merge", "duplicate"), ``similarity``, ``source`` (the caller's provenance dict),
        ``metadata``, ``embedding`` ([dim] float32 or None) and ``created_at``."""
        rows = (
            self._reader()
            .execute(
                "SELECT id, action, similarity, source, metadata, embedding, created_at FROM provenance "
                "WHERE node_id = ? ORDER BY id",
                (_as_id(node_id, "node_id"),),
            )
            .fetchall()
        )
        return [
            {
                "id": r[0],
                "action": r[1],
                "similarity": r[2],
                "source": _s.loads_json(r[3], f"{self.path}: provenance row {r[0]} source"),
                "metadata": _s.loads_json(r[4], f"{self.path}: provenance row {r[0]} metadata"),
                "embedding": None if r[5] is None else _s.from_blob(r[5], self.dim, self.path),
                "created_at": r[6],
            }
            for r in rows
        ]
