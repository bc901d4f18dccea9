"""File identity for the store: two spellings of one file (symlinks, hard links, ``..``) are the
same file. Every write that could replace or truncate a file compares identities with
:func:`same_file`, never path strings, so a symlinked directory such as ``runs/latest -> ckpt-1``
cannot make a backup overwrite the store it is copying."""

from __future__ import annotations

import os
from typing import Union

PathLike = Union[str, os.PathLike]

__all__ = ["same_file", "store_companions", "touches_store"]

# SQLite's own files next to a database (WAL, shared memory, rollback journal) and the lock file
# earlier versions kept beside the store.
_COMPANION_SUFFIXES = ("-wal", "-shm", "-journal", ".lock")


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file.

    Existing files are compared by device and inode (``os.stat`` follows symlinks, so symlinked
    files, symlinked directories and hard links all compare equal). A path that does not exist yet
    is compared by its resolved location (``os.path.realpath`` resolves every symlinked directory
    on the way), which is where a write to it would land.
    """
    a, b = os.fspath(a), os.fspath(b)
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (FileNotFoundError, NotADirectoryError):
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def store_companions(path: PathLike) -> list:
    """The store file and the files SQLite and the single-writer lock keep beside it.

    SQLite resolves a symlinked store file and keeps its ``-wal``/``-shm`` beside the real file,
    so the companions of both spellings are listed when they differ.
    """
    p = os.fspath(path)
    names = [p] + [p + s for s in _COMPANION_SUFFIXES]
    real = os.path.realpath(p)
    if real != os.path.abspath(p):
        names += [real + s for s in _COMPANION_SUFFIXES]
    return names


def touches_store(dest: PathLike, store: PathLike) -> bool:
    """True when writing ``dest`` would overwrite ``store`` or one of its companion files."""
    return any(same_file(dest, c) for c in store_companions(store))
