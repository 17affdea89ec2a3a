"""File-system steps the ``file://`` stores share: temp names, folder creation and flushing."""

from __future__ import annotations

import errno
import itertools
import os
import threading

_names = itertools.count()
# What a write to a store this process may only read fails with: a read-only mount, or a store
# (or an object) of another user.
CANNOT_WRITE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def temp_name(tmpdir: str) -> str:
    return os.path.join(tmpdir, f"{os.getpid()}.{threading.get_ident()}.{next(_names)}")


def fsync_dir(path: str) -> None:
    """Flush a folder's entries to disk: a rename or link in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(*paths: str) -> None:
    """Create the store's folders where missing; on a store this process may only read, leave
    them missing (reads work without them)."""
    for path in paths:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            if exc.errno not in CANNOT_WRITE:
                raise
