"""The knowledge-graph store, under its original module path.

The implementation lives in :mod:`moe_framework.kg` (the class in ``kg/graph.py``, the merge rule
in ``kg/merge.py``, traversal in ``kg/traversal.py``, ...). This module re-exports its public
names so ``from moe_framework.knowledge_graph import KnowledgeGraph, Node, ...`` keeps working.
"""

from __future__ import annotations

from .kg import (
    FilingResult,
    KnowledgeGraph,
    KnowledgeGraphError,
    Neighbor,
    Node,
    SimilarNode,
    StoreLockedError,
)

__all__ = [
    "KnowledgeGraph",
    "KnowledgeGraphError",
    "StoreLockedError",
    "Node",
    "SimilarNode",
    "Neighbor",
    "FilingResult",
]
