"""Graph traversal over the stored edges: neighbours, k-hop neighbourhoods, shortest paths
(BFS, or Dijkstra with the edge weight as length). Edges are read from SQLite, one hop at a time,
so traversal works on stores larger than memory and sees the writer's latest commits."""

from __future__ import annotations

import heapq
from collections import deque
from typing import Optional

import numpy as np

from .core import StoreCore
from .records import CHUNK as _CHUNK
from .records import DIRECTIONS as _DIRECTIONS
from .records import Neighbor
from .records import as_id as _as_id

__all__ = ["Traversal"]


class Traversal(StoreCore):
    """``neighbors``, ``k_hop``, ``shortest_path``."""

    def neighbors(self, node: int, type: Optional[str] = None, direction: str = "both") -> list:
        """Edges touching ``node`` as :class:`Neighbor` (id, type, weight, direction), sorted by
        (id, type, direction). ``direction``: "out" (node -> x), "in" (x -> node) or "both";
        ``type`` filters by edge type."""
        node = _as_id(node, "node")
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"KnowledgeGraph.neighbors: direction must be one of {_DIRECTIONS}, got {direction!r}"
            )
        conn = self._reader()
        if not self._existing(conn, [node]):
            raise KeyError(f"KnowledgeGraph: node {node} does not exist")
        out = []
        for _frm, to, t, w, d in self._adjacent(conn, [node], type, direction):
            out.append(Neighbor(to, t, w, d))
        return sorted(out, key=lambda n: (n.id, n.type, n.direction))

    def _adjacent(self, conn, nodes: list, type: Optional[str], direction: str) -> list:
        """(from, to, type, weight, direction) for edges leaving ``nodes`` in ``direction``."""
        out = []
        tf = "" if type is None else " AND type = ?"
        for c in range(0, len(nodes), _CHUNK):
            part = nodes[c : c + _CHUNK]
            marks = ",".join("?" * len(part))
            args = part + ([type] if type is not None else [])
            if direction in ("out", "both"):
                q = f"SELECT src, dst, type, weight FROM edges WHERE src IN ({marks}){tf}"
                out += [(a, b, t, w, "out") for a, b, t, w in conn.execute(q, args)]
            if direction in ("in", "both"):
                q = f"SELECT dst, src, type, weight FROM edges WHERE dst IN ({marks}){tf}"
                out += [(a, b, t, w, "in") for a, b, t, w in conn.execute(q, args)]
        return out

    def k_hop(self, node: int, k: int, type: Optional[str] = None, direction: str = "both") -> dict:
        """Nodes within ``k`` hops of ``node``: ``{id: hop count}`` (``node`` itself at 0).
        Edges are followed in ``direction`` ("both" treats the graph as undirected)."""
        node = _as_id(node, "node")
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"KnowledgeGraph.k_hop: k must be a non-negative int, got {k!r}")
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"KnowledgeGraph.k_hop: direction must be one of {_DIRECTIONS}, got {direction!r}"
            )
        conn = self._reader()
        if not self._existing(conn, [node]):
            raise KeyError(f"KnowledgeGraph: node {node} does not exist")
        dist = {node: 0}
        frontier = [node]
        for hop in range(1, int(k) + 1):
            nxt = []
            for _, to, _, _, _ in self._adjacent(conn, frontier, type, direction):
                if to not in dist:
                    dist[to] = hop
                    nxt.append(to)
            if not nxt:
                break
            frontier = nxt
        return dist

    def shortest_path(
        self,
        a: int,
        b: int,
        weighted: bool = False,
        type: Optional[str] = None,
        direction: str = "both",
    ) -> Optional[list]:
        """Node ids of a shortest path from ``a`` to ``b`` (inclusive), or None if unreachable.

        ``weighted=False``: fewest hops (BFS). ``weighted=True``: Dijkstra with the edge weight as
        its length (weights must be >= 0; parallel edges count with their smallest weight).
        Deterministic: among equal-length paths the one through lower ids is preferred.
        """
        a, b = _as_id(a, "a"), _as_id(b, "b")
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"KnowledgeGraph.shortest_path: direction must be one of {_DIRECTIONS}, got {direction!r}"
            )
        conn = self._reader()
        for v in (a, b):
            if not self._existing(conn, [v]):
                raise KeyError(f"KnowledgeGraph: node {v} does not exist")
        if a == b:
            return [a]
        if not weighted:
            parent: dict = {a: None}
            frontier = [a]
            while frontier:
                nxt = []
                for frm, to, _, _, _ in sorted(self._adjacent(conn, frontier, type, direction)):
                    if to not in parent:
                        parent[to] = frm
                        if to == b:
                            return _unwind(parent, b)
                        nxt.append(to)
                frontier = sorted(nxt)
            return None
        dist = {a: 0.0}
        parent = {a: None}
        done = set()
        heap = [(0.0, a)]
        while heap:
            d, u = heapq.heappop(heap)
            if u in done:
                continue
            if u == b:
                return _unwind(parent, b)
            done.add(u)
            for _, to, _, w, _ in self._adjacent(conn, [u], type, direction):
                if w < 0:
                    raise ValueError(
                        f"KnowledgeGraph.shortest_path: weighted search needs non-negative weights, "
                        f"edge {u} - {to} has {w}"
                    )
                nd = d + w
                if to not in dist or nd < dist[to] or (nd == dist[to] and u < parent[to]):
                    dist[to] = nd
                    parent[to] = u
                    heapq.heappush(heap, (nd, to))
        return None


def _unwind(parent: dict, b: int) -> list:
    path: deque = deque()
    v = b
    while v is not None:
        path.appendleft(v)
        v = parent[v]
    return list(path)
