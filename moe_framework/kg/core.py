"""The part of a knowledge-graph handle every other part builds on: its state, per-thread read
connections, write transactions, and keeping the derived search index in step with the store.

:class:`StoreCore` is the base of the parts :class:`~moe_framework.kg.graph.KnowledgeGraph` is
made of (lifecycle, writes, merge rule, reads, search, traversal, persistence); each part reaches
the store only through what is defined here, so a change to how connections or transactions
work is made in one place.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import numpy as np

from . import schema as _s
from . import validate as _v
from .errors import KnowledgeGraphError
from .index import VectorIndex
from .records import CHUNK as _CHUNK

if TYPE_CHECKING:
    from .bank import DeviceBank
    from .storefile import StoreFile

__all__ = ["StoreCore"]


class StoreCore:
    """State, connections, transactions and index upkeep shared by every part of a
    :class:`~moe_framework.kg.graph.KnowledgeGraph` (set up by its ``__init__``)."""

    path: str
    readonly: bool
    dim: int
    merge_threshold: float
    ema_rate: float
    keep_checkpoints: int
    checkpoint_dir: str
    _checkpoint_hook: Optional[Callable[[str], None]]
    _wlock: Any  # threading.RLock: serialises writers of this handle
    _readers: dict  # thread id -> read connection
    _readers_lock: Any  # threading.Lock
    _local: threading.local
    _conn: Optional[sqlite3.Connection]  # the write (or, readonly, the open-time) connection
    _file: Optional[StoreFile]
    _created: bool
    _immutable: bool
    _schema_cookie: Optional[int]
    _bank: Optional[DeviceBank]
    _closed: bool
    _queued: list
    _pending_rebuild: bool
    _index: VectorIndex
    # Highest node id the search index was built from: a readonly handle's filtered searches
    # stay within it, like its index (see Search).
    _indexed_max_id: int

    # ------------------------------------------------------------------ connections

    def _check_open(self) -> None:
        if self._closed or self._conn is None:
            raise ValueError(f"KnowledgeGraph: {self.path} is closed")

    def _own_conn(self) -> sqlite3.Connection:
        """The handle's own connection (the writer's; a readonly handle's open-time one)."""
        self._check_open()
        conn = self._conn
        if conn is None:  # closed (``_check_open`` says so first); narrows the type
            raise ValueError(f"KnowledgeGraph: {self.path} is closed")
        return conn

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
            conn = self._own_conn()
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

    # ------------------------------------------------------------------ derived index

    def _iter_embeddings(self, conn, chunk: int = 65536) -> Iterator[tuple]:
        """(ids [m], unit vectors [m, d]) chunks of the whole store, validated."""
        cur = conn.execute("SELECT id, embedding FROM nodes ORDER BY id")
        while True:
            rows = cur.fetchmany(chunk)
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            yield ids, self._unit_rows(ids, [r[1] for r in rows])

    def _unit_rows(self, ids: np.ndarray, blobs: list) -> np.ndarray:
        """Unit vectors [m, d] float32 of the stored embeddings ``blobs`` of nodes ``ids``;
        :class:`KnowledgeGraphError` naming the node when one is not ``dim`` finite float32
        values with a non-zero norm."""
        d = self.dim
        for i, blob in zip(ids.tolist(), blobs):
            if not isinstance(blob, bytes) or len(blob) != 4 * d:
                raise KnowledgeGraphError(
                    f"{self.path}: node {i} embedding is not {d} float32 values"
                )
        vecs = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(-1, d)
        finite = np.isfinite(vecs).all(axis=1)
        if not finite.all():
            bad = int(ids[np.argmin(finite)])
            raise KnowledgeGraphError(f"{self.path}: node {bad} embedding has NaN or Inf")
        norms = _s.row_norms(vecs)
        if not (norms > 0).all():
            bad = int(ids[np.argmin(norms > 0)])
            raise KnowledgeGraphError(f"{self.path}: node {bad} embedding has zero norm")
        return _s.divide_rows(vecs, norms)

    def _rebuild_index(self, conn) -> None:
        # One read transaction: the count and the scan see the same snapshot even while another
        # process writes (readonly handles).
        conn.execute("BEGIN")
        try:
            n_total = conn.execute("SELECT count(*) FROM nodes").fetchone()[0]
            max_id = conn.execute("SELECT coalesce(max(id), 0) FROM nodes").fetchone()[0]
            bank = self._bank
            if bank is not None:
                bank.reset(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))

            def chunks():
                for ids, vecs in self._iter_embeddings(conn):
                    if bank is not None:
                        bank.add(ids, vecs)
                    yield ids, vecs

            self._index.rebuild_from_chunks(chunks(), n_total)
            self._indexed_max_id = int(max_id)
        finally:
            conn.execute("COMMIT")

    def _maybe_rebuild(self) -> None:
        if self._pending_rebuild and not self.readonly:
            with self._wlock:
                if self._pending_rebuild:
                    self._pending_rebuild = False
                    self._rebuild_index(self._conn)

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

    # ------------------------------------------------------------------ rows

    def _exact_scores_writer(self, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        return self._exact_scores(ids, q, self._conn)

    def _exact_scores_reader(self, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        return self._exact_scores(ids, q, self._reader())

    def _exact_scores(self, ids: np.ndarray, q: np.ndarray, conn) -> np.ndarray:
        """Cosine of each node ``ids[r]`` with unit ``q[r]`` (NaN for a node that does not exist),
        from the stored embeddings: one query per ``CHUNK`` distinct ids, one product for all."""
        uniq, inverse = np.unique(ids, return_inverse=True)
        blobs = self._fetch_blobs(uniq.tolist(), conn)
        have = np.fromiter((i in blobs for i in uniq.tolist()), bool, len(uniq))
        out = np.full(len(ids), np.nan, np.float32)
        if have.any():
            # Each distinct node is read and normalised once, however many rows ask for it.
            slot = np.cumsum(have) - 1
            vecs = self._unit_rows(uniq[have], [blobs[i] for i in uniq[have].tolist()])
            present = have[inverse]
            rows = vecs[slot[inverse[present]]]
            out[present] = np.einsum("ij,ij->i", rows, np.asarray(q, np.float32)[present])
        return out

    def _fetch_blobs(self, ids: list, conn) -> dict:
        out = {}
        for c in range(0, len(ids), _CHUNK):
            part = ids[c : c + _CHUNK]
            q = f"SELECT id, embedding FROM nodes WHERE id IN ({','.join('?' * len(part))})"
            out.update(conn.execute(q, part))
        return out

    @staticmethod
    def _existing(conn, ids: Iterable[int]) -> list:
        ids = list(ids)
        out = []
        for c in range(0, len(ids), _CHUNK):
            part = ids[c : c + _CHUNK]
            q = f"SELECT id FROM nodes WHERE id IN ({','.join('?' * len(part))})"
            out += [r[0] for r in conn.execute(q, part)]
        return out

    @staticmethod
    def _next_node_id(conn) -> int:
        row = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'nodes'), 0), "
            "coalesce((SELECT max(id) FROM nodes), 0))"
        ).fetchone()
        return int(row[0]) + 1

    def _norm_list(self, value, n: int, what: str, default) -> list:
        if value is None:
            return [default() for _ in range(n)] if callable(default) else [default] * n
        if isinstance(value, (str, dict)):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"KnowledgeGraph: {what} has {len(value)} entries for {n} embeddings")
        return value
