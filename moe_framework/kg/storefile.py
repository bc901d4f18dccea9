"""The store file's descriptor and the single-writer lock.

The writer lock is an exclusive ``flock`` on the store file itself, so every name of the file (a
symlink, a symlinked directory, a hard link, ``..``) meets the same lock, and no lock file is left
behind. ``flock`` locks are independent of the POSIX record locks SQLite takes on the same file.

Descriptors are pinned: POSIX record locks belong to a process and an inode, and closing *any*
descriptor of the file drops all of them (SQLite's included, for every connection of the process).
So this module opens each store file at most once per process, reads the header through that
descriptor, and closes it only when the last handle of the process on that file has released it,
after that handle closed its SQLite connections.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from typing import Optional

from .errors import KnowledgeGraphError, StoreLockedError

__all__ = ["StoreFile", "open_store_file"]


class _Entry:
    """One store file of this process: its descriptors, how many handles use it, the writer."""

    def __init__(self, fd: int) -> None:
        self.fds = [fd]
        self.users = 0
        self.writer = False


_lock = threading.Lock()
_files: dict = {}  # (st_dev, st_ino) -> _Entry


def _forget_after_fork() -> None:
    # A forked child starts with no entries: it must not unlock its parent's flock (same open
    # file description) nor close descriptors its parent's connections rely on. The inherited
    # descriptors stay open in the child, unused.
    global _lock, _files
    _lock = threading.Lock()
    _files = {}


os.register_at_fork(after_in_child=_forget_after_fork)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class StoreFile:
    """This handle's use of a pinned store file: read its header, take and drop the writer lock.

    ``release()`` must come after the handle's SQLite connections are closed.
    """

    def __init__(self, path: str, key: tuple, entry: _Entry) -> None:
        self.path = path
        self.key = key
        self._entry = entry
        self._pid = os.getpid()
        self._writer = False
        self._released = False

    @property
    def fd(self) -> int:
        return self._entry.fds[0]

    @property
    def is_writer(self) -> bool:
        """Whether this handle holds the writer lock."""
        return self._writer

    def read_head(self, n: int = 100) -> bytes:
        return os.pread(self.fd, n, 0)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def links(self) -> int:
        """How many names (hard links) the file has."""
        return os.fstat(self.fd).st_nlink

    def lock_for_writing(self) -> None:
        """Take the exclusive writer lock; :class:`StoreLockedError` when another handle (this
        process or another) holds it, under whatever name it opened the file."""
        with _lock:
            if self._entry.writer:
                raise StoreLockedError(self._locked_message("another handle in this process"))
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(self._locked_message("another process")) from None
                raise
            self._entry.writer = self._writer = True

    def _locked_message(self, who: str) -> str:
        return (
            f"{self.path} is already open for writing by {who} (possibly under another name: a "
            "symlink or a hard link to the same file); open it with readonly=True to read"
        )

    def release(self) -> None:
        """Drop the writer lock (if held) and this handle's use of the descriptor. Idempotent;
        does nothing in a forked child (the lock and descriptors are the parent's)."""
        if self._released or os.getpid() != self._pid:
            return
        self._released = True
        with _lock:
            if self._writer:
                self._writer = False
                self._entry.writer = False
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            self._entry.users -= 1
            if self._entry.users == 0:
                if _files.get(self.key) is self._entry:
                    del _files[self.key]
                for fd in self._entry.fds:
                    os.close(fd)


def open_store_file(path: str) -> StoreFile:
    """Pin the existing regular file ``path``. Raises ``FileNotFoundError``,
    :class:`KnowledgeGraphError` for a directory, FIFO, socket or device (never blocks on a FIFO),
    and ``PermissionError`` when it cannot be read."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise KnowledgeGraphError(
            f"{path}: {_kind(st.st_mode)}, not a knowledge-graph store (a store is a SQLite file)"
        )
    key = (st.st_dev, st.st_ino)
    with _lock:
        entry: Optional[_Entry] = _files.get(key)
        if entry is None:
            # O_NONBLOCK: if the name was swapped for a FIFO since the stat, open must not hang.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                os.close(fd)  # not a store file: no SQLite lock can be on it
                raise KnowledgeGraphError(
                    f"{path}: {_kind(fst.st_mode)}, not a knowledge-graph store "
                    "(a store is a SQLite file)"
                )
            key = (fst.st_dev, fst.st_ino)
            entry = _files.get(key)  # the name now points at another file we already hold
            if entry is None:
                entry = _files[key] = _Entry(fd)
            else:
                entry.fds.append(fd)  # closing it now could drop the process's SQLite locks
        entry.users += 1
    return StoreFile(path, key, entry)
