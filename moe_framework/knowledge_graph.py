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
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
import sqlite3
import threading
import time
import warnings
from collections import deque
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from .kg import files as _files
from .kg import schema as _s
from .kg import validate as _v
from .kg.errors import KnowledgeGraphError, StoreLockedError
from .kg.index import INDEX_TYPES, VectorIndex
from .kg.paths import touches_store
from .kg.storefile import open_store_file

__all__ = [
    "KnowledgeGraph",
    "KnowledgeGraphError",
    "StoreLockedError",
    "Node",
    "SimilarNode",
    "Neighbor",
    "FilingResult",
]

_CHUNK = 900  # ids per "IN (...)" query, under SQLite's default variable limit
_DIRECTIONS = ("out", "in", "both")


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


class KnowledgeGraph:
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
        index_type: "flat" (exact, default), "hnsw" or "ivfpq" (approximate; see
            :mod:`moe_framework.kg.index` and docs/knowledge_graph.md for the recall trade-off).
        index_params: overrides for the approximate index (hnsw: M, ef_construction, ef_search;
            ivfpq: nlist, m, nbits, nprobe, train_min).
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
        self._conn: Optional[sqlite3.Connection] = None
        self._file = None  # the pinned store file (kg.storefile), holder of the writer lock
        self._created = False  # this call created the file (removed again if opening fails)
        self._immutable = False  # read-only media: read without locks or -shm
        self._schema_cookie = None
        self._bank = None
        self._closed = False
        self._queued: list = []
        self._pending_rebuild = False
        VectorIndex.check_params(index_type, index_params)
        try:
            self._open(dim, index_type, index_params, verify, _create, progress)
        except BaseException:
            self._release(discard_created=True)
            raise

    # ================================================================== opening

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

    def _open(self, dim, index_type, index_params, verify, create, progress) -> None:
        path = self.path
        if not self.readonly and dim is not None:
            self._create_if_missing()
        try:
            self._file = open_store_file(path)
        except FileNotFoundError:
            hint = "" if self.readonly or dim is not None else " (pass dim=... to create it)"
            raise FileNotFoundError(f"KnowledgeGraph.open: {path} does not exist{hint}") from None
        if not self.readonly:
            self._file.lock_for_writing()
            self._check_writable_media()
            self._warn_hard_links()
        kind = _s.sniff_file(path, self._file.read_head())
        if create and kind == "sqlite":
            raise FileExistsError(f"KnowledgeGraph.create: {path} already exists")
        if kind == "empty" and (self.readonly or dim is None):
            raise KnowledgeGraphError(f"{path}: empty file, not a knowledge-graph store")
        wal_left = self._choose_read_mode() if self.readonly else 0
        try:
            self._conn = _s.connect(path, readonly=self.readonly, immutable=self._immutable)
            app_id, version, n_tables = _s.read_header(self._conn, path)
            fresh = app_id == 0 and n_tables == 0
            if fresh and (self.readonly or dim is None):
                raise KnowledgeGraphError(
                    f"{path}: empty SQLite database, not a knowledge-graph store"
                )
            if not fresh:
                _s.check_header(path, app_id, version)
                _v.check_schema(self._conn, path)
            if self.readonly:
                _s.configure_common(self._conn)
            else:
                # Only now, after the header and schema say the file is ours, may SQLite write.
                _s.configure_writer(self._conn)
            if fresh:
                _s.init_schema(self._conn, int(dim), time.time())
            self._schema_cookie = self._conn.execute("PRAGMA schema_version").fetchone()[0]
            _s.check_integrity(self._conn, path, verify)
            meta = _s.read_meta(self._conn, path)
            if dim is not None and int(dim) != meta["dim"]:
                raise KnowledgeGraphError(
                    f"{path}: store has dim {meta['dim']}, opened with dim={dim}"
                )
            self.dim = meta["dim"]
            _s.check_references(self._conn, path)
            _v.check_node_metadata(self._conn, path)
            self._index = VectorIndex(self.dim, index_type, index_params, progress=progress)
            self._rebuild_index(self._conn)
        except sqlite3.OperationalError as exc:
            if wal_left:
                raise self._read_only_media_error(wal_left) from exc
            raise KnowledgeGraphError(f"{path}: not a valid knowledge-graph store ({exc})") from exc
        except sqlite3.DatabaseError as exc:
            raise KnowledgeGraphError(f"{path}: not a valid knowledge-graph store ({exc})") from exc

    def _create_if_missing(self) -> None:
        """Create an empty store file (mode 0o666 & ~umask) so the writer lock can be taken on
        it before SQLite writes anything; a concurrent creator is fine (the lock decides)."""
        path = self.path
        if os.path.lexists(path):
            return
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.close(_files.create_new(path))
        except FileExistsError:
            return
        except FileNotFoundError:
            raise FileNotFoundError(
                f"KnowledgeGraph.open: cannot create {path}: folder {folder} does not exist"
            ) from None
        except OSError as exc:
            raise PermissionError(
                exc.errno,
                f"KnowledgeGraph.open: cannot create {path}: folder {folder} is not writable "
                f"({exc.strerror}); a store on read-only media can only be read "
                "(readonly=True)",
            ) from None
        self._created = True

    def _check_writable_media(self) -> None:
        """A writer needs the file and its folder writable (SQLite creates -wal and -shm there);
        say so instead of letting SQLite report a 'readonly database'."""
        real = os.path.realpath(self.path)
        for what, p in (("the file", real), ("its folder", os.path.dirname(real))):
            if not os.access(p, os.W_OK):
                raise PermissionError(
                    f"KnowledgeGraph.open: cannot open {self.path} for writing: {what} {p} is "
                    "not writable (read-only media or permissions; SQLite keeps its -wal and -shm "
                    "files beside the store). Open it with readonly=True to read it"
                )

    def _choose_read_mode(self) -> int:
        """Decide how a readonly handle reads; returns the size of a leftover -wal on
        read-only media (0 otherwise).

        SQLite reads a WAL store through a ``-shm`` file it creates beside it. Where this process
        cannot create files (read-only media) and no ``-wal`` exists, nobody can be writing the
        store: read it as immutable (no locks, no ``-shm``). A ``-wal`` left there by a writer that
        did not close cleanly cannot be replayed without a ``-shm``.
        """
        real = os.path.realpath(self.path)
        if os.access(os.path.dirname(real), os.W_OK):
            return 0
        try:
            wal_size = os.stat(real + "-wal").st_size
        except FileNotFoundError:
            self._immutable = True
            return 0
        return max(1, wal_size)

    def _warn_hard_links(self) -> None:
        links = self._file.links()
        if links > 1:
            warnings.warn(
                f"KnowledgeGraph: {self.path} has {links} hard links (names for the same file). "
                "SQLite keeps the write-ahead log beside the name the store was opened with, so "
                "always open it under one name: after a crash, opening it under another name "
                "would not see the transactions in that log. Every name also sees every write "
                "(a hard link is not a copy; use backup() for copies)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _read_only_media_error(self, wal_size: int) -> PermissionError:
        real = os.path.realpath(self.path)
        return PermissionError(
            f"KnowledgeGraph.open: cannot read {self.path}: the folder {os.path.dirname(real)} is "
            f"not writable, and the write-ahead log {real}-wal ({wal_size} bytes) that a writer "
            f"left behind (it did not close cleanly) can only be read through {real}-shm, which "
            "SQLite cannot create there. The store file itself is not at fault: open it once for "
            "writing on writable media (that folds the log into the file), or copy the store and "
            "its -wal file to a writable folder and read the copy"
        )

    def _iter_embeddings(self, conn, chunk: int = 65536) -> Iterator[tuple]:
        """(ids [m], unit vectors [m, d]) chunks of the whole store, validated."""
        cur = conn.execute("SELECT id, embedding FROM nodes ORDER BY id")
        d = self.dim
        while True:
            rows = cur.fetchmany(chunk)
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            for r in rows:
                if not isinstance(r[1], bytes) or len(r[1]) != 4 * d:
                    raise KnowledgeGraphError(
                        f"{self.path}: node {r[0]} embedding is not {d} float32 values"
                    )
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(-1, d)
            finite = np.isfinite(vecs).all(axis=1)
            if not finite.all():
                bad = int(ids[np.argmin(finite)])
                raise KnowledgeGraphError(f"{self.path}: node {bad} embedding has NaN or Inf")
            norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
            if not (norms > 0).all():
                bad = int(ids[np.argmin(norms > 0)])
                raise KnowledgeGraphError(f"{self.path}: node {bad} embedding has zero norm")
            yield ids, (vecs / norms[:, None]).astype(np.float32)

    def _rebuild_index(self, conn) -> None:
        # One read transaction: the count and the scan see the same snapshot even while another
        # process writes (readonly handles).
        conn.execute("BEGIN")
        try:
            n_total = conn.execute("SELECT count(*) FROM nodes").fetchone()[0]
            bank = self._bank
            if bank is not None:
                bank.reset(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))

            def chunks():
                for ids, vecs in self._iter_embeddings(conn):
                    if bank is not None:
                        bank.add(ids, vecs)
                    yield ids, vecs

            self._index.rebuild_from_chunks(chunks(), n_total)
        finally:
            conn.execute("COMMIT")

    # ================================================================== lifecycle

    def close(self) -> None:
        """Close every connection and release the write lock. Idempotent."""
        if self._closed:
            return
        with self._wlock:
            self._closed = True
            self._release()

    def _release(self, discard_created: bool = False) -> None:
        with self._readers_lock:
            for conn in self._readers.values():
                with contextlib.suppress(Exception):
                    conn.close()
            self._readers.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._file is not None:
            if discard_created and self._created and self._file.is_writer:
                # Opening failed on a file this call created: remove it while still holding the
                # lock, so nobody else can have started using it.
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path + suffix)
            # After the connections: the pinned descriptor keeps SQLite's locks alive until then.
            self._file.release()
            self._file = None

    def __enter__(self) -> KnowledgeGraph:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("readonly" if self.readonly else "writable")
        return f"KnowledgeGraph({self.path!r}, dim={getattr(self, 'dim', None)}, {state})"

    # ================================================================== connections

    def _check_open(self) -> None:
        if self._closed or self._conn is None:
            raise ValueError(f"KnowledgeGraph: {self.path} is closed")

    def _check_writable(self, op: str) -> None:
        self._check_open()
        if self.readonly:
            raise PermissionError(f"KnowledgeGraph.{op}: {self.path} was opened readonly")

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (WAL readers never block the writer or each other)."""
        self._check_open()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = _s.connect(self.path, readonly=True, immutable=self._immutable)
        conn.execute("PRAGMA query_only=ON")
        with self._readers_lock:
            alive = {t.ident for t in threading.enumerate()}
            for tid in [t for t in self._readers if t not in alive]:
                with contextlib.suppress(Exception):
                    self._readers.pop(tid).close()
            self._readers[threading.get_ident()] = conn
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _transaction(self, op: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on any error. Index
        updates queued with ``_after_commit`` are applied only once COMMIT returned, so the
        derived index never holds uncommitted data."""
        self._check_writable(op)
        with self._wlock:
            self._check_writable(op)
            conn = self._conn
            if self._pending_rebuild:
                self._pending_rebuild = False
                self._rebuild_index(conn)
            self._queued = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._recheck_schema(conn)
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._queued = []
                raise
            queued, self._queued = self._queued, []
            try:
                for args in queued:
                    self._apply_to_index(*args)
            except Exception as exc:
                # The write is committed (durable); only the derived cache is behind. Rebuild it
                # from the store before the next search or write instead of failing the call.
                self._pending_rebuild = True
                warnings.warn(
                    f"KnowledgeGraph: index update failed ({exc!r}); rebuilding it from the store",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return
            if self._index.needs_rebuild or self._index.wants_training():
                # Train (ivfpq reached train_min) or drop stale entries now, in the write that
                # made it necessary, so no search ever waits for it.
                try:
                    self._rebuild_index(conn)
                except Exception as exc:
                    self._pending_rebuild = True
                    warnings.warn(
                        f"KnowledgeGraph: index rebuild failed ({exc!r}); retrying before the "
                        "next search or write",
                        RuntimeWarning,
                        stacklevel=3,
                    )

    def _recheck_schema(self, conn) -> None:
        """Inside a write transaction: if another client changed the schema since it was
        checked (say, added a trigger), check it again before writing anything."""
        cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
        if cookie != self._schema_cookie:
            _v.check_schema(conn, self.path)
            self._schema_cookie = cookie

    # ================================================================== writes: nodes

    def _norm_list(self, value, n: int, what: str, default) -> list:
        if value is None:
            return [default() for _ in range(n)] if callable(default) else [default] * n
        if isinstance(value, (str, dict)):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"KnowledgeGraph: {what} has {len(value)} entries for {n} embeddings")
        return value

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
        for t in types:
            _check_type(t)
        metas = [
            _s.dumps_json(m, "metadata") for m in self._norm_list(metadatas, n, "metadatas", dict)
        ]
        provs = self._norm_list(provenance, n, "provenance", None)
        provs = [None if p is None else _s.dumps_json(p, "provenance") for p in provs]
        unit = _s.normalize(x)
        now = time.time()
        with self._transaction("add_nodes_batch") as conn:
            first = self._next_node_id(conn)
            ids = np.arange(first, first + n, dtype=np.int64)
            conn.executemany(
                "INSERT INTO nodes (id, type, embedding, metadata, merge_count, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 1, ?, ?)",
                (
                    (int(i), t, _s.to_blob(v), m, now, now)
                    for i, t, v, m in zip(ids, types, x, metas)
                ),
            )
            rows = [
                (int(i), "insert", None, p, m, _s.to_blob(v), now)
                for i, p, m, v in zip(ids, provs, metas, x)
                if p is not None
            ]
            if rows:
                conn.executemany(
                    "INSERT INTO provenance (node_id, action, similarity, source, metadata, embedding, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            self._after_commit(conn, ids, unit, np.zeros(0, np.int64), None)
        return ids

    @staticmethod
    def _next_node_id(conn) -> int:
        row = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'nodes'), 0), "
            "coalesce((SELECT max(id) FROM nodes), 0))"
        ).fetchone()
        return int(row[0]) + 1

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
        for t in types:
            _check_type(t)
        meta_in = self._norm_list(metadatas, n, "metadatas", dict)
        meta_json = [_s.dumps_json(m, "metadata") for m in meta_in]
        provs = [
            _s.dumps_json(p or {}, "provenance")
            for p in self._norm_list(provenance, n, "provenance", dict)
        ]
        unit = _s.normalize(x)
        results: list = []
        now = time.time()
        with self._transaction("add_or_update_batch") as conn:
            n_before = len(self._index)
            cand_s = cand_i = None
            if n_before and n:
                # A few candidates per report suffice: only the best node this batch has not
                # touched is needed from the index (touched nodes are scored exactly below).
                cand_s, cand_i = self._index.search(
                    unit, min(n_before, 8), self._exact_scores_writer
                )
            touched = _Touched(n, self.dim)
            inserted: list = []
            next_id = self._next_node_id(conn)
            for j in range(n):
                best_id, best_s = self._best_match(j, unit[j], cand_s, cand_i, touched)
                sim = None if best_id is None else float(best_s)
                if best_id is not None and best_s > self.merge_threshold:
                    if best_id in touched:
                        old, old_meta = touched.get(best_id)
                    else:
                        row = conn.execute(
                            "SELECT embedding, metadata FROM nodes WHERE id = ?", (best_id,)
                        ).fetchone()
                        old = _s.from_blob(row[0], self.dim, self.path)
                        old_meta = _s.loads_json(row[1], f"{self.path}: node {best_id} metadata")
                    new = (
                        (1.0 - self.ema_rate) * old.astype(np.float64)
                        + self.ema_rate * x[j].astype(np.float64)
                    ).astype(np.float32)
                    merged_meta = {**old_meta, **meta_in[j]}
                    conn.execute(
                        "UPDATE nodes SET embedding = ?, metadata = ?, merge_count = merge_count + 1, "
                        "updated_at = ? WHERE id = ?",
                        (_s.to_blob(new), _s.dumps_json(merged_meta, "metadata"), now, best_id),
                    )
                    touched.put(best_id, new, _s.normalize(new[None])[0], merged_meta)
                    node_id, action = best_id, "merged"
                else:
                    node_id, action = next_id, "inserted"
                    next_id += 1
                    conn.execute(
                        "INSERT INTO nodes (id, type, embedding, metadata, merge_count, created_at, "
                        "updated_at) VALUES (?, ?, ?, ?, 1, ?, ?)",
                        (node_id, types[j], _s.to_blob(x[j]), meta_json[j], now, now),
                    )
                    touched.put(node_id, x[j], unit[j], dict(meta_in[j]))
                    inserted.append(node_id)
                conn.execute(
                    "INSERT INTO provenance (node_id, action, similarity, source, metadata, embedding, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        node_id,
                        "insert" if action == "inserted" else "merge",
                        sim,
                        provs[j],
                        meta_json[j],
                        _s.to_blob(x[j]),
                        now,
                    ),
                )
                results.append(FilingResult(int(node_id), action, sim))
            new_set = set(inserted)
            add_ids = np.asarray(inserted, np.int64)
            add_vecs = np.stack([touched.unit_of(i) for i in inserted]) if inserted else None
            upd = [i for i in touched.slot if i not in new_set]
            upd_ids = np.asarray(upd, np.int64)
            upd_vecs = np.stack([touched.unit_of(i) for i in upd]) if upd else None
            self._after_commit(conn, add_ids, add_vecs, upd_ids, upd_vecs)
        return results

    def _best_match(self, j, u, cand_s, cand_i, touched) -> tuple:
        best_id, best_s = None, -np.inf
        if cand_i is not None:
            row_s, row_i = cand_s[j], cand_i[j]
            while True:
                untouched = [
                    (s, i) for s, i in zip(row_s, row_i) if i >= 0 and int(i) not in touched
                ]
                if untouched:
                    best_id, best_s = int(untouched[0][1]), float(untouched[0][0])
                    break
                n_index = len(self._index)
                if (row_i < 0).any() or len(row_i) >= n_index:
                    break  # every indexed node was touched by this batch
                # Every candidate was touched by this batch (rare): look further.
                k = min(n_index, 2 * len(row_i))
                s2, i2 = self._index.search(u[None], k, self._exact_scores_writer)
                row_s, row_i = s2[0], i2[0]
        if len(touched):
            tid, m = touched.best(u)
            if m > best_s or (m == best_s and (best_id is None or tid < best_id)):
                best_id, best_s = tid, m
        return best_id, best_s

    def _after_commit(self, conn, add_ids, add_vecs, upd_ids, upd_vecs) -> None:
        """Queue a write's index update; ``_transaction`` applies it after COMMIT."""
        self._queued.append((add_ids, add_vecs, upd_ids, upd_vecs))

    def _apply_to_index(self, add_ids, add_vecs, upd_ids, upd_vecs) -> None:
        if len(add_ids):
            self._index.add(add_ids, add_vecs)
        if len(upd_ids):
            self._index.update(upd_ids, upd_vecs)
        if self._bank is not None:
            if len(add_ids):
                self._bank.add(add_ids, add_vecs)
            if len(upd_ids):
                self._bank.update(upd_ids, upd_vecs)

    def _exact_scores_writer(self, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        return self._exact_scores(ids, q, self._conn)

    def _exact_scores_reader(self, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        return self._exact_scores(ids, q, self._reader())

    def _exact_scores(self, ids: np.ndarray, q: np.ndarray, conn) -> np.ndarray:
        emb = self._fetch_embeddings(ids, conn)
        out = np.full(len(ids), np.nan, np.float32)
        for r, i in enumerate(ids.tolist()):
            e = emb.get(i)
            if e is not None:
                out[r] = float(_s.normalize(e[None])[0] @ q[r])
        return out

    def _fetch_embeddings(self, ids: Iterable[int], conn) -> dict:
        ids = [int(i) for i in ids]
        out = {}
        for c in range(0, len(ids), _CHUNK):
            part = ids[c : c + _CHUNK]
            q = f"SELECT id, embedding FROM nodes WHERE id IN ({','.join('?' * len(part))})"
            for i, blob in conn.execute(q, part):
                out[i] = _s.from_blob(blob, self.dim, self.path)
        return out

    # ================================================================== writes: edges

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

    @staticmethod
    def _existing(conn, ids: Iterable[int]) -> list:
        ids = list(ids)
        out = []
        for c in range(0, len(ids), _CHUNK):
            part = ids[c : c + _CHUNK]
            q = f"SELECT id FROM nodes WHERE id IN ({','.join('?' * len(part))})"
            out += [r[0] for r in conn.execute(q, part)]
        return out

    # ================================================================== reads

    def __len__(self) -> int:
        return int(self._reader().execute("SELECT count(*) FROM nodes").fetchone()[0])

    def __contains__(self, node_id: int) -> bool:
        return bool(self._existing(self._reader(), [int(node_id)]))

    def num_edges(self) -> int:
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

    def iter_nodes(self, batch: int = 4096) -> Iterator[Node]:
        """Every node in id order (streams; fine for large stores)."""
        cur = self._reader().execute(
            "SELECT id, type, embedding, metadata, merge_count, created_at, updated_at FROM nodes "
            "ORDER BY id"
        )
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            for r in rows:
                yield _node(r, self.dim, self.path)

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

    # ================================================================== search

    def search(self, queries: Any, k: int = 10) -> tuple:
        """Cosine top-``k`` of ``queries [q, dim]`` (or [dim]) among all nodes.

        Returns ``(scores [q, k] float32, ids [q, k] int64)`` as numpy arrays, sorted by
        descending score (ties: lower id first); ``ids`` is -1 and ``scores`` -inf where the
        graph has fewer than ``k`` nodes. Exact for ``index_type="flat"``; approximate indexes
        find candidates approximately and re-score them exactly.
        """
        self._check_open()
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"KnowledgeGraph.search: k must be a non-negative int, got {k!r}")
        u = _s.normalize(_s.check_embeddings(queries, self.dim, "query"))
        self._maybe_rebuild()
        return self._index.search(u, int(k), self._exact_scores_reader)

    def find_similar_nodes(
        self, query: Any, top_k: int = 10, threshold: Optional[float] = None
    ) -> list:
        """The ``top_k`` nodes most similar to ``query [dim]`` with cosine >= ``threshold``
        (when given), best first, as :class:`SimilarNode` (id, score, type, metadata)."""
        scores, ids = self.search(query, top_k)
        hits = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        if threshold is not None:
            t = _s.finite_float(threshold, "threshold")
            hits = [h for h in hits if h[1] >= t]
        if not hits:
            return []
        info = {}
        conn = self._reader()
        for c in range(0, len(hits), _CHUNK):
            part = [h[0] for h in hits[c : c + _CHUNK]]
            q = f"SELECT id, type, metadata FROM nodes WHERE id IN ({','.join('?' * len(part))})"
            for i, t, m in conn.execute(q, part):
                info[i] = (t, m)
        return [
            SimilarNode(
                i, s, info[i][0], _s.loads_json(info[i][1], f"{self.path}: node {i} metadata")
            )
            for i, s in hits
            if i in info
        ]

    def _maybe_rebuild(self) -> None:
        if self._pending_rebuild and not self.readonly:
            with self._wlock:
                if self._pending_rebuild:
                    self._pending_rebuild = False
                    self._rebuild_index(self._conn)

    # ================================================================== device bank

    def device_bank(self, device: Any = "cpu", capacity: Optional[int] = None):
        """A :class:`moe_framework.kg.bank.DeviceBank` holding every node's unit embedding on
        ``device``, kept in sync by this handle's writes. ``capacity`` (rows) is preallocated so
        adding nodes does not reallocate (which would invalidate captured CUDA graphs); the default
        is twice the current size (at least 1024). Its ``search`` uses ``ops.kg_search``: no host
        sync, static shapes."""
        from .kg.bank import DeviceBank

        self._check_open()
        with self._wlock:
            chunks = list(self._iter_embeddings(self._reader()))
            ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
            vecs = (
                np.concatenate([c[1] for c in chunks])
                if chunks
                else np.zeros((0, self.dim), np.float32)
            )
            cap = capacity if capacity is not None else max(1024, 2 * len(ids))
            bank = DeviceBank(self.dim, cap, device)
            bank.reset(ids, vecs)
            self._bank = bank
        return bank

    # ================================================================== traversal

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
            parent = {a: None}
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

    # ================================================================== checkpoints

    def checkpoint(self) -> str:
        """Write a consistent snapshot of the store and keep the newest ``keep_checkpoints``.

        The snapshot is taken with SQLite's online backup API into a temporary file, checked
        (quick_check), fsynced, atomically renamed to ``<checkpoint_dir>/snapshot-<seq>.sqlite`` and
        the directory fsynced; only then are the oldest snapshots removed. A crash at any point
        leaves every earlier complete snapshot intact. Returns the snapshot's path. Each snapshot
        is itself a store: ``KnowledgeGraph.open(snapshot, readonly=True)``.
        """
        from .kg.snapshots import take_snapshot

        self._check_writable("checkpoint")
        with self._wlock:
            return take_snapshot(
                self._conn,
                self.checkpoint_dir,
                self.keep_checkpoints,
                self._checkpoint_hook,
                store=self.path,
            )

    def backup(self, path: PathLike) -> str:
        """Write a consistent copy of the store to ``path`` (SQLite backup API into a new temporary
        file next to it, quick_check, fsync, atomic rename, directory fsync; mode 0o666 & ~umask).
        Works on readonly handles too. ``ValueError`` when ``path`` is this store or one of its
        companion files under any name (symlink, symlinked folder, hard link). Returns the path."""
        from .kg.snapshots import write_copy

        self._check_open()
        dst = os.path.abspath(os.fspath(path))
        self._refuse_store_path("backup", dst)
        if os.path.isdir(dst):
            raise IsADirectoryError(f"KnowledgeGraph.backup: {dst} is a directory, not a file path")
        folder = os.path.dirname(dst)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"KnowledgeGraph.backup: folder {folder} does not exist")
        _files.remove_stale_temps(folder, _files.temp_pattern(re.escape(os.path.basename(dst))))
        tmp = _files.temp_path(dst)
        try:
            with self._wlock:
                write_copy(self._conn, tmp, dst)
        finally:
            _files.done_with(tmp)
        _s.fsync_dir(folder)
        return dst

    def _refuse_store_path(self, op: str, dest: str) -> None:
        """Writing ``dest`` must not replace the open store: compare file identities, not
        spellings (see :mod:`moe_framework.kg.paths`)."""
        if touches_store(dest, self.path):
            raise ValueError(
                f"KnowledgeGraph.{op}: {dest} is the store itself ({os.path.realpath(self.path)}) "
                "or one of its -wal/-shm/-journal files under another name (a symlink, a "
                "symlinked folder or a hard link); writing it would destroy the open store"
            )

    def list_checkpoints(self) -> list:
        """Complete snapshots, oldest first."""
        from .kg.snapshots import list_snapshots

        return list_snapshots(self.checkpoint_dir)

    # ================================================================== export

    def to_json(self, path: PathLike, include_embeddings: bool = True) -> None:
        """Write the graph as one JSON document (nodes, edges, provenance-free)."""
        from .kg.export import to_json

        self._refuse_store_path("to_json", os.fspath(path))
        to_json(self, os.fspath(path), include_embeddings)

    def to_graphml(self, path: PathLike) -> None:
        """Write the graph as GraphML (node type, merge_count, metadata as JSON, and every scalar
        metadata field as its own attribute; edge type and weight)."""
        from .kg.export import to_graphml

        self._refuse_store_path("to_graphml", os.fspath(path))
        to_graphml(self, os.fspath(path))

    def draw(
        self,
        path_png: PathLike,
        nodes: Optional[Iterable[int]] = None,
        color_by: str = "expert",
        max_nodes: int = 300,
        title: Optional[str] = None,
    ) -> None:
        """Save a PNG of the subgraph induced by ``nodes`` (default: the first ``max_nodes``
        nodes). Positions are a 2-D PCA of the embeddings (similar nodes land close together);
        colours are the value of metadata field ``color_by``."""
        from .kg.export import draw

        self._refuse_store_path("draw", os.fspath(path_png))
        draw(self, os.fspath(path_png), nodes, color_by, max_nodes, title)


# ====================================================================== helpers


class _Touched:
    """Nodes created or moved by the batch being filed: current raw and unit embeddings and
    metadata, in arrays so each report scores all of them with one matrix-vector product."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.slot: dict = {}
        self.ids = np.empty(capacity, np.int64)
        self.unit = np.empty((capacity, dim), np.float32)
        self.raw: list = []
        self.meta: list = []

    def __contains__(self, node_id) -> bool:
        return node_id in self.slot

    def __len__(self) -> int:
        return len(self.slot)

    def get(self, node_id: int) -> tuple:
        s = self.slot[node_id]
        return self.raw[s], self.meta[s]

    def unit_of(self, node_id: int) -> np.ndarray:
        return self.unit[self.slot[node_id]]

    def put(self, node_id: int, raw: np.ndarray, unit: np.ndarray, meta: dict) -> None:
        s = self.slot.get(node_id)
        if s is None:
            s = self.slot[node_id] = len(self.raw)
            self.ids[s] = node_id
            self.raw.append(raw)
            self.meta.append(meta)
        else:
            self.raw[s], self.meta[s] = raw, meta
        self.unit[s] = unit

    def best(self, u: np.ndarray) -> tuple:
        """(id, cosine) of the touched node most similar to unit ``u`` (lower id on ties)."""
        n = len(self.raw)
        sc = self.unit[:n] @ u
        m = sc.max()
        return int(self.ids[:n][sc == m].min()), float(m)


def _node(row, dim: int, path: str) -> Node:
    return Node(
        int(row[0]),
        row[1],
        _s.from_blob(row[2], dim, path),
        _s.loads_json(row[3], f"{path}: node {row[0]} metadata"),
        int(row[4]),
        float(row[5]),
        float(row[6]),
    )


def _unwind(parent: dict, b: int) -> list:
    path = deque()
    v = b
    while v is not None:
        path.appendleft(v)
        v = parent[v]
    return list(path)


def _as_id(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        if hasattr(x, "item") and getattr(x, "ndim", None) == 0:
            x = x.item()
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise ValueError(f"KnowledgeGraph: {what} must be an int node id, got {x!r}")
    return int(x)


def _check_type(t: Any, what: str = "node type") -> None:
    if not isinstance(t, str) or not t:
        raise ValueError(f"KnowledgeGraph: {what} must be a non-empty str, got {t!r}")
    _v.check_text(t, what)
