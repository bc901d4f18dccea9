"""Opening and closing a knowledge-graph handle: creating the file, the writer lock, checks of
the media, the header, the schema and the contents, and releasing it all again."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import warnings
from typing import TypeVar

from . import files as _files
from . import schema as _s
from . import validate as _v
from .core import StoreCore
from .errors import KnowledgeGraphError
from .index import VectorIndex
from .storefile import open_store_file

_Handle = TypeVar("_Handle", bound="Lifecycle")

__all__ = ["Lifecycle"]


class Lifecycle(StoreCore):
    """Open (validate, lock, build the index) and close a store."""

    # ------------------------------------------------------------------ opening

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
        head = self._file.read_head()
        kind = _s.sniff_file(path, head)
        wal = path + "-wal"
        if kind == "sqlite" and not (os.path.exists(wal) and os.path.getsize(wal) > 0):
            # With a write-ahead log left, a checkpoint may have been cut short after writing
            # page 1; SQLite completes it from the log, so only a store without one is checked.
            _s.check_length(path, head, self._file.size())
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
                _s.configure_writer(self._conn, fresh=fresh)
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
        assert self._file is not None  # _open pinned it just before
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

    # ------------------------------------------------------------------ closing

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

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("readonly" if self.readonly else "writable")
        return f"KnowledgeGraph({self.path!r}, dim={getattr(self, 'dim', None)}, {state})"
