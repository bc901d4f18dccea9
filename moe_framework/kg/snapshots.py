"""Checkpoints of the store: consistent, fsynced, atomically renamed snapshots with rotation.

Crash reasoning: a snapshot becomes visible under its final name only by ``os.replace`` of a
complete, checked, fsynced temporary file, and the directory is fsynced after the rename. Old
snapshots are removed only after that, oldest first. So whatever instant a crash hits, every
snapshot visible under a final name is complete, and at least one exists once the first
checkpoint has returned. Temporary files left by a crash (the copy and its SQLite ``-journal``)
are removed by the next checkpoint.

Snapshot names are ``snapshot-<seq>.sqlite`` with ``seq`` zero-padded to 8 digits; the number is
parsed, not the width, so ``snapshot-100000000.sqlite`` comes after ``snapshot-99999999.sqlite``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import stat
from typing import Callable, Optional

from . import files
from . import schema as _s
from .errors import KnowledgeGraphError
from .paths import same_file, touches_store

_NAME = re.compile(r"^snapshot-(\d+)\.sqlite$")
_TMP = files.temp_pattern(r"snapshot-\d+\.sqlite")


def _numbered(directory: str) -> list:
    """``(seq, name, is_regular_file)`` for every entry named like a snapshot."""
    out = []
    with os.scandir(directory) as it:
        for e in it:
            m = _NAME.match(e.name)
            if m:
                out.append((int(m.group(1)), e.name, e.is_file(follow_symlinks=False)))
    return out


def list_snapshots(directory: str) -> list:
    """Paths of the complete snapshots in ``directory``, oldest (lowest sequence) first. Only
    regular files count: a directory or symlink that happens to carry a snapshot name is
    neither listed nor ever removed."""
    if not os.path.isdir(directory):
        return []
    found = sorted((seq, name) for seq, name, regular in _numbered(directory) if regular)
    return [os.path.join(directory, name) for _, name in found]


def _remove_copy(tmp: str) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp + suffix)


def write_copy(conn: sqlite3.Connection, tmp: str, final: str, hook=None) -> None:
    """Consistent copy of ``conn``'s database at ``final``: backup API into ``tmp`` (created new,
    mode 0o666 & ~umask), quick_check, fsync, atomic rename. The caller fsyncs the directory."""
    hook = hook or (lambda stage: None)
    os.close(files.create_new(tmp))
    try:
        dst = sqlite3.connect(tmp, isolation_level=None)
    except BaseException:
        _remove_copy(tmp)
        raise
    try:
        # The backup API copies a transactionally consistent image of the database (the source
        # connection sees its committed WAL content), unlike a file copy of a WAL database.
        conn.backup(dst)
        # A standalone file: rollback journal, no -wal/-shm siblings needed to read it.
        dst.execute("PRAGMA journal_mode=DELETE")
        rows = dst.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            raise KnowledgeGraphError(f"checkpoint: snapshot {tmp} failed quick_check: {rows[:3]}")
    except BaseException:
        dst.close()
        _remove_copy(tmp)
        raise
    dst.close()
    hook("written")
    _s.fsync_file(tmp)
    hook("fsynced")
    os.replace(tmp, final)


def take_snapshot(
    conn: sqlite3.Connection,
    directory: str,
    keep: int,
    hook: Optional[Callable[[str], None]] = None,
    store: Optional[str] = None,
) -> str:
    """Write ``<directory>/snapshot-<seq>.sqlite`` and keep the newest ``keep`` snapshots.
    ``store`` (the open store's path) is never overwritten nor removed, whatever its name."""
    hook = hook or (lambda stage: None)
    os.makedirs(directory, exist_ok=True)
    if not stat.S_ISDIR(os.stat(directory).st_mode):
        raise NotADirectoryError(f"KnowledgeGraph.checkpoint: {directory} is not a directory")
    files.remove_stale_temps(directory, _TMP)  # leftovers of a crashed checkpoint
    # The next number is above every snapshot-looking name, listed or not, so no name is reused.
    seq = 1 + max((n[0] for n in _numbered(directory)), default=0)
    final = os.path.join(directory, f"snapshot-{seq:08d}.sqlite")
    if store is not None and touches_store(final, store):
        raise ValueError(
            f"KnowledgeGraph.checkpoint: {final} is the open store itself (or one of its "
            "companion files) under another name; choose another checkpoint_dir"
        )
    tmp = files.temp_path(final)
    try:
        write_copy(conn, tmp, final, hook)
    finally:
        files.done_with(tmp)
    hook("renamed")
    _s.fsync_dir(directory)
    hook("dir_fsynced")
    snaps = list_snapshots(directory)
    if store is not None:
        snaps = [p for p in snaps if not same_file(p, store)]
    for old in snaps[: max(0, len(snaps) - keep)]:
        os.remove(old)
        hook("removed")
    _s.fsync_dir(directory)
    return final
