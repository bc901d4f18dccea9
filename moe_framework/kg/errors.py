"""Exceptions raised by the knowledge-graph store."""


class KnowledgeGraphError(ValueError):
    """The file is not a usable knowledge-graph store: foreign, corrupt, truncated, a pickle, or it
    holds values that break the store's invariants (wrong dimension, non-finite embedding, an edge
    to a missing node). The message names the file and what was found."""


class StoreLockedError(KnowledgeGraphError):
    """Another process (or another open handle) already holds the store open for writing."""
