"""Internals of the knowledge graph: file format (schema), derived FAISS index, device bank,
snapshots and export. The public class is :class:`moe_framework.knowledge_graph.KnowledgeGraph`."""

from .errors import KnowledgeGraphError, StoreLockedError

__all__ = ["KnowledgeGraphError", "StoreLockedError"]
