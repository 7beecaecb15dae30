"""One writer per database: an OS lock on ``<db>/lock`` held for a whole fit, build or append.

Two builds of one database at once used to interleave their commits and lose
rows.  ``fcntl.flock`` is released by the kernel when its holder dies (even by
``kill -9``), so a crashed build never leaves a stale lock behind; the file
keeps the holder's pid only so the refusal can name it.  Readers (query,
info, verify) never take it: LMDB and the commit protocol let them read
committed rows while a writer runs.

The lock is re-entrant within a process (``build`` fits factors under the
lock it already holds): ``flock`` on a second descriptor of the same file
would otherwise refuse its own holder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from attribdb.errors import StoreError
from attribdb.layout import LOCK_FILE

_HELD: dict[str, list] = {}  # realpath of the lock file -> [descriptor, depth]


def _holder(path: Path) -> str:
    """The pid the holder wrote; it writes it just after locking, so wait a moment for it."""
    for _ in range(20):
        try:
            pid = path.read_text().strip()
        except OSError:
            return "unknown"
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


@contextmanager
def writer_lock(root: str | Path):
    """Hold the database's writer lock (creating ``root`` if needed) for the ``with`` block."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK_FILE
        key = os.path.realpath(path)
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StoreError(f"{root} is being written by process {_holder(path)} (fit, build or append); "
                                     "wait for it to finish") from None
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _HELD[key] = [fd, 1]
    except PermissionError as exc:
        raise StoreError(f"cannot write to {root}: {exc.strerror} (a read-only database cannot be "
                         "built or appended to)") from None
    except OSError as exc:
        raise StoreError(f"cannot lock {root} for writing: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            fd, _ = _HELD.pop(key)
            os.close(fd)  # closing the last descriptor releases the flock
