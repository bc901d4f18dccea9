"""KnowledgeGraph: a durable store of expert knowledge (nodes, typed weighted edges, provenance).

The source of truth is one SQLite file (WAL, ``synchronous=FULL``, every write one transaction).
A FAISS index is derived from it on open and kept in sync after each committed write; an optional
device-resident bank serves graph-safe search through ``ops.kg_search``. Nothing is unpickled or
executed on load. Format, guarantees and trade-offs: docs/knowledge_graph.md.

Example::

    with KnowledgeGraph.open("kg.sqlite", dim=384) as kg:
        r = kg.add_or_update_node(vec, type="report", metadata={"expert": 3})
        hits = kg.find_similar_nodes(vec, top_k=5)
        kg.checkpoint()

The class is composed of parts, one concern each (all in :mod:`moe_framework.kg`): ``core``
(state, connections, transactions, index upkeep), ``lifecycle`` (open / close), ``writes``,
``merge`` (the merge rule), ``reads``, ``search`` (with ``filters``), ``traversal`` and
``persistence`` (snapshots, backups, exports).
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np

from . import schema as _s
from .index import INDEX_TYPES, VectorIndex
from .lifecycle import Lifecycle
from .merge import MergeRule
from .persistence import Persistence
from .reads import Reads
from .records import PathLike
from .search import Search
from .traversal import Traversal
from .writes import Writes

__all__ = ["KnowledgeGraph"]


class KnowledgeGraph(Lifecycle, Writes, MergeRule, Reads, Search, Traversal, Persistence):
    """Nodes with float32 embeddings and JSON metadata, typed weighted directed edges, and merge
    provenance, in one SQLite file; cosine search through a derived FAISS index.

    Open with :meth:`open` (creates the file when missing and ``dim`` is given) or :meth:`create`.
    One handle may hold a store open for writing (an exclusive ``flock`` on the store file itself,
    so a symlink or hard link to it meets the same lock); any number of ``readonly=True`` handles
    may read it. A handle is safe to use from several threads: searches and reads run
    concurrently, writes are serialised.

    Args:
        path: the store file.
        dim: embedding dimension (required to create; checked against the file otherwise).
        merge_threshold: ``add_or_update_*`` merges a report into the most similar node when their
            cosine is strictly greater than this (in [0, 1]).
        ema_rate: merge update ``e <- (1 - ema_rate) * e + ema_rate * report`` (in (0, 1]).
        index_type: "flat" (exact, default), "hnsw", "ivfpq" or "ivf" (approximate), or "auto"
            (exact below 50k nodes, then "ivf" with parameters derived from N); see
            :mod:`moe_framework.kg.index` and docs/knowledge_graph.md for the recall trade-off.
        index_params: overrides for the approximate index (hnsw: M, ef_construction, ef_search;
            ivfpq: nlist, m, nbits, nprobe, train_min; ivf / auto: nlist, nprobe, train_min,
            rerank, regrow).
        readonly: open read-only (no lock, no writes; SQLite reads see later commits of the
            writer, the search index reflects the store as it was at open). On read-only media
            (a folder this process cannot write) a cleanly closed store is read as immutable.
        verify: "quick" (default: SQLite quick_check), "full" (integrity_check) or "none".
        keep_checkpoints: how many snapshots :meth:`checkpoint` keeps.
        checkpoint_dir: where snapshots go (default ``<path>.checkpoints``).
        progress: show a progress bar while an approximate index is built or trained (default:
            when stderr is a terminal). The build is also logged at INFO level.
    """

    def __init__(
        self,
        path: PathLike,
        dim: Optional[int] = None,
        *,
        merge_threshold: float = 0.9,
        ema_rate: float = 0.1,
        index_type: str = "flat",
        index_params: Optional[dict] = None,
        readonly: bool = False,
        verify: str = "quick",
        keep_checkpoints: int = 3,
        checkpoint_dir: Optional[PathLike] = None,
        progress: Optional[bool] = None,
        _create: Optional[bool] = None,
    ) -> None:
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self.merge_threshold = _s.finite_float(merge_threshold, "merge_threshold")
        if not 0.0 <= self.merge_threshold <= 1.0:
            raise ValueError(
                f"KnowledgeGraph: merge_threshold must be in [0, 1], got {merge_threshold}"
            )
        self.ema_rate = _s.finite_float(ema_rate, "ema_rate")
        if not 0.0 < self.ema_rate <= 1.0:
            raise ValueError(f"KnowledgeGraph: ema_rate must be in (0, 1], got {ema_rate}")
        if index_type not in INDEX_TYPES:
            raise ValueError(
                f"KnowledgeGraph: index_type must be one of {INDEX_TYPES}, got {index_type!r}"
            )
        if verify not in ("quick", "full", "none"):
            raise ValueError(
                f"KnowledgeGraph: verify must be 'quick', 'full' or 'none', got {verify!r}"
            )
        if dim is not None and (not isinstance(dim, (int, np.integer)) or dim <= 0):
            raise ValueError(f"KnowledgeGraph: dim must be a positive int, got {dim!r}")
        if int(keep_checkpoints) < 1:
            raise ValueError(
                f"KnowledgeGraph: keep_checkpoints must be >= 1, got {keep_checkpoints}"
            )
        self.keep_checkpoints = int(keep_checkpoints)
        self.checkpoint_dir = os.fspath(checkpoint_dir or self.path + ".checkpoints")
        self._checkpoint_hook = None  # tests: called with a stage name during checkpoint()

        self._wlock = threading.RLock()  # serialises writers of this handle
        self._readers: dict = {}  # thread id -> read connection
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        self._conn = None
        self._file = None  # the pinned store file (kg.storefile), holder of the writer lock
        self._created = False  # this call created the file (removed again if opening fails)
        self._immutable = False  # read-only media: read without locks or -shm
        self._schema_cookie = None
        self._bank = None
        self._closed = False
        self._queued: list = []
        self._pending_rebuild = False
        self._indexed_max_id = 0
        VectorIndex.check_params(index_type, index_params)
        try:
            self._open(dim, index_type, index_params, verify, _create, progress)
        except BaseException:
            self._release(discard_created=True)
            raise

    @classmethod
    def open(cls, path: PathLike, dim: Optional[int] = None, **kwargs) -> KnowledgeGraph:
        """Open the store at ``path``; create it when missing (needs ``dim``, not ``readonly``).

        Raises :class:`KnowledgeGraphError` (a ``ValueError``) when the file is not a valid store
        (foreign SQLite file, corrupt or truncated, a pickle, wrong dimension, non-finite
        embedding, dangling edge), :class:`StoreLockedError` when another handle writes it.
        """
        return cls(path, dim, **kwargs)

    @classmethod
    def create(cls, path: PathLike, dim: int, **kwargs) -> KnowledgeGraph:
        """Create a new store; ``FileExistsError`` if ``path`` already holds data."""
        if dim is None:
            raise ValueError("KnowledgeGraph.create: dim is required")
        return cls(path, dim, _create=True, **kwargs)
