"""Copies of the store: rotating snapshots, backups, and exports (JSON, GraphML, PNG). None of
them may be written over the open store under any of its names."""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

from . import files as _files
from . import schema as _s
from .core import StoreCore
from .paths import touches_store
from .records import PathLike

__all__ = ["Persistence"]


class Persistence(StoreCore):
    """``checkpoint``, ``backup``, ``list_checkpoints``, ``to_json``, ``to_graphml``, ``draw``."""

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> str:
        """Write a consistent snapshot of the store and keep the newest ``keep_checkpoints``.

        The snapshot is taken with SQLite's online backup API into a temporary file, checked
        (quick_check), fsynced, atomically renamed to ``<checkpoint_dir>/snapshot-<seq>.sqlite`` and
        the directory fsynced; only then are the oldest snapshots removed. A crash at any point
        leaves every earlier complete snapshot intact. Returns the snapshot's path. Each snapshot
        is itself a store: ``KnowledgeGraph.open(snapshot, readonly=True)``.
        """
        from .snapshots import take_snapshot

        self._check_writable("checkpoint")
        with self._wlock:
            return take_snapshot(
                self._own_conn(),
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
        from .snapshots import write_copy

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
                write_copy(self._own_conn(), tmp, dst)
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
        from .snapshots import list_snapshots

        return list_snapshots(self.checkpoint_dir)

    # ------------------------------------------------------------------ export

    def to_json(self, path: PathLike, include_embeddings: bool = True) -> None:
        """Write the graph as one JSON document (nodes, edges, provenance-free)."""
        from .export import to_json

        self._refuse_store_path("to_json", os.fspath(path))
        to_json(self, os.fspath(path), include_embeddings)

    def to_graphml(self, path: PathLike) -> None:
        """Write the graph as GraphML (node type, merge_count, metadata as JSON, and every scalar
        metadata field as its own attribute; edge type and weight)."""
        from .export import to_graphml

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
        from .export import draw

        self._refuse_store_path("draw", os.fspath(path_png))
        draw(self, os.fspath(path_png), nodes, color_by, max_nodes, title)
