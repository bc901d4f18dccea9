"""The knowledge graph: a durable SQLite store of expert knowledge with a derived FAISS index.

:class:`KnowledgeGraph` (``graph.py``) is composed of one part per concern: ``core.py`` (state,
connections, transactions, index upkeep), ``lifecycle.py`` (open, validate, lock, close),
``writes.py``, ``merge.py`` (the merge rule), ``reads.py``, ``search.py`` and ``filters.py``,
``traversal.py``, ``persistence.py`` (snapshots, backups, exports). Below them: the file format
(``schema.py``, ``validate.py``), the FAISS index (``index.py``), the device bank (``bank.py``),
snapshots and exports (``snapshots.py``, ``export.py``), file identity and locking (``paths.py``,
``storefile.py``, ``files.py``).
"""

from .errors import KnowledgeGraphError, StoreLockedError
from .graph import KnowledgeGraph
from .records import FilingResult, Neighbor, Node, SimilarNode

__all__ = [
    "KnowledgeGraph",
    "KnowledgeGraphError",
    "StoreLockedError",
    "Node",
    "SimilarNode",
    "Neighbor",
    "FilingResult",
]
