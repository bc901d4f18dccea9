"""The records a :class:`~moe_framework.kg.graph.KnowledgeGraph` returns (nodes, search hits,
edges, filing results) and the argument checks every part of the store shares."""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from . import schema as _s
from . import validate as _v

__all__ = [
    "Node",
    "SimilarNode",
    "Neighbor",
    "FilingResult",
    "PathLike",
    "CHUNK",
    "DIRECTIONS",
    "as_id",
    "check_type",
    "node_from_row",
]

CHUNK = 900  # ids per "IN (...)" query, under SQLite's default variable limit
DIRECTIONS = ("out", "in", "both")


class Node(NamedTuple):
    """A stored node. ``embedding``: [dim] float32 (a copy)."""

    id: int
    type: str
    embedding: np.ndarray
    metadata: dict
    merge_count: int
    created_at: float
    updated_at: float


class SimilarNode(NamedTuple):
    """A search hit: cosine ``score`` of the query with the node's current embedding."""

    id: int
    score: float
    type: str
    metadata: dict


class Neighbor(NamedTuple):
    """An edge seen from one endpoint: ``direction`` is "out" (node -> id) or "in" (id -> node)."""

    id: int
    type: str
    weight: float
    direction: str


class FilingResult(NamedTuple):
    """Outcome of one ``add_or_update``: ``action`` is "inserted" or "merged"; ``similarity`` is the
    cosine with the best existing node (None when the graph was empty)."""

    node_id: int
    action: str
    similarity: Optional[float]


PathLike = Union[str, "os.PathLike[str]"]


def node_from_row(row, dim: int, path: str) -> Node:
    """A :class:`Node` from a ``SELECT id, type, embedding, metadata, merge_count, created_at,
    updated_at`` row, its embedding and metadata checked."""
    return Node(
        int(row[0]),
        row[1],
        _s.from_blob(row[2], dim, path),
        _s.loads_json(row[3], f"{path}: node {row[0]} metadata"),
        int(row[4]),
        float(row[5]),
        float(row[6]),
    )


def as_id(x: Any, what: str) -> int:
    """``x`` as an int node id (a 0-dim array or tensor is accepted; bools are not)."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        if hasattr(x, "item") and getattr(x, "ndim", None) == 0:
            x = x.item()
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise ValueError(f"KnowledgeGraph: {what} must be an int node id, got {x!r}")
    return int(x)


def check_type(t: Any, what: str = "node type") -> None:
    """``ValueError`` unless ``t`` is a non-empty str of valid Unicode text."""
    if not isinstance(t, str) or not t:
        raise ValueError(f"KnowledgeGraph: {what} must be a non-empty str, got {t!r}")
    _v.check_text(t, what)


def check_types(types: list, what: str = "node type") -> None:
    """:func:`check_type` of each entry, each distinct object checked once (a batch usually
    repeats one str)."""
    for t in {id(t): t for t in types}.values():
        check_type(t, what)
