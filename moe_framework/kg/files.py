"""Files the store writes besides itself (backups, snapshots, exports): temporary names, leftovers
of crashed writers, and creation modes.

Every such file is written under a temporary name ``.<name>.tmp-<pid>-<token>`` in the destination
folder and renamed into place. A process killed mid-write leaves that file (and, for SQLite
copies, its ``-journal``/``-wal``/``-shm``); :func:`remove_stale_temps` removes the leftovers of
processes that are gone. New files are created with mode ``0o666`` filtered by the umask (and the
folder's default ACL), like every other tool, never ``0o600``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading

__all__ = [
    "create_new",
    "done_with",
    "pid_alive",
    "remove_stale_temps",
    "temp_path",
    "temp_pattern",
]

# SQLite's companions of a database being written (a killed copy can leave any of them).
_SQLITE_SUFFIX = r"(?:-journal|-wal|-shm)?"

_active: set = set()  # temporary paths this process is writing right now
_active_lock = threading.Lock()


def temp_path(final: str) -> str:
    """A fresh temporary name beside ``final``, registered as in use until :func:`done_with`."""
    folder, base = os.path.split(os.path.abspath(final))
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    with _active_lock:
        _active.add(tmp)
    return tmp


def done_with(tmp: str) -> None:
    with _active_lock:
        _active.discard(tmp)


def temp_pattern(base_regex: str) -> re.Pattern:
    """Names of temporaries (and their SQLite companions) of finals matching ``base_regex``;
    group 1 is the writer's pid."""
    return re.compile(rf"^\.{base_regex}\.tmp-(\d+)(?:-[0-9a-f]+)?{_SQLITE_SUFFIX}$")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(folder: str, pattern: re.Pattern) -> list:
    """Remove the files in ``folder`` matching ``pattern`` whose writer is gone: its pid is not
    running, or it is this process but no write of ours uses the name (a crashed run that had
    the same pid, as happens in containers). Returns the removed paths."""
    removed: list = []
    me = os.getpid()
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        path = os.path.join(folder, name)
        with _active_lock:
            in_use = any(path.startswith(a) for a in _active)
        if (pid == me and not in_use) or (pid != me and not pid_alive(pid)):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.remove(path)
                removed.append(path)
    return removed


def create_new(path: str) -> int:
    """Create ``path`` (it must not exist) for writing with mode 0o666 & ~umask; returns the fd."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
