"""Checkpoints of the store: consistent, fsynced, atomically renamed snapshots with rotation.

Crash reasoning: a snapshot becomes visible under its final name only by ``os.replace`` of a
complete, checked, fsynced temporary file, and the directory is fsynced after the rename. Old
snapshots are removed only after that, oldest first. So whatever instant a crash hits, every
snapshot visible under a final name is complete, and at least one exists once the first
checkpoint has returned. Temporary files left by a crash are removed by the next checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from typing import Callable, Optional

from . import schema as _s
from .errors import KnowledgeGraphError

_NAME = re.compile(r"^snapshot-(\d{8})\.sqlite$")
_TMP = re.compile(r"^\.snapshot-(\d{8})\.sqlite\.tmp-\d+$")


def list_snapshots(directory: str) -> list:
    """Paths of the complete snapshots in ``directory``, oldest (lowest sequence) first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return [p for _, p in sorted(found)]


def write_copy(conn: sqlite3.Connection, tmp: str, final: str, hook=None) -> None:
    """Consistent copy of ``conn``'s database at ``final``: backup API into ``tmp``, quick_check,
    fsync, atomic rename. The caller fsyncs the directory."""
    hook = hook or (lambda stage: None)
    dst = sqlite3.connect(tmp, isolation_level=None)
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
        with contextlib.suppress(OSError):
            os.remove(tmp)
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
) -> str:
    hook = hook or (lambda stage: None)
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):  # leftovers of a crashed checkpoint
        if _TMP.match(name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))
    existing = list_snapshots(directory)
    seq = 1 + (int(_NAME.match(os.path.basename(existing[-1])).group(1)) if existing else 0)
    final = os.path.join(directory, f"snapshot-{seq:08d}.sqlite")
    tmp = os.path.join(directory, f".snapshot-{seq:08d}.sqlite.tmp-{os.getpid()}")

    write_copy(conn, tmp, final, hook)
    hook("renamed")
    _s.fsync_dir(directory)
    hook("dir_fsynced")
    snaps = list_snapshots(directory)
    for old in snaps[: max(0, len(snaps) - keep)]:
        os.remove(old)
        hook("removed")
    _s.fsync_dir(directory)
    return final
