"""The work of one batch of a local import or checkout: the tasks runners run.

Each task takes ``(store, payload)`` and returns plain values, so that the same function runs
on a thread of the calling process or in a helper process (:mod:`casframe.workers.worker`),
whose answer crosses a pipe. What this module must never do: import protobuf or the tree
engine (a helper starts faster and smaller without them), or keep state between calls.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from itertools import repeat
from typing import TYPE_CHECKING

from casframe.digest import CHUNK_SIZE, Digest
from casframe.errors import CheckoutError, UnsupportedFileTypeError
from casframe.lazy import lazy_module

if TYPE_CHECKING:
    from casframe import statcache
    from casframe.blobs import VerifiedBlobs
    from casframe.directory import FileEntry
    from casframe.statcache import FileStat
else:
    # Only import reads file times into the stat cache's records: a checkout (and a helper
    # that only links) does not load it, nor hashlib and struct with it.
    statcache = lazy_module("casframe.statcache")

__all__ = [
    "Copy",
    "LinkTask",
    "Stored",
    "copy_files",
    "import_files",
    "link_files",
    "open_regular",
    "tree_path",
    "unsupported",
]

# Files up to this size are read whole; larger ones are streamed in CHUNK_SIZE pieces so
# memory stays bounded whatever the file sizes.
SMALL_FILE = CHUNK_SIZE
# Bytes of small files one import task holds at once (times the task count: the memory budget).
_BATCH_BYTES = 8 << 20
# Never follow a symlink put in place of a file; never block opening a fifo put there.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Errors with which a file system refuses a hardlink that a copy can replace: another file
# system, too many links to one object, no hardlinks at all.
_LINK_REFUSED = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM})

#: A file to copy: its path on disk, its digest, whether it is executable.
Copy = tuple[str, Digest, bool]
#: Files to hardlink: directories (paths) with the files to link there, as the Directory decoder
#: gives them (:data:`casframe.directory.FileEntry`: name, hash, size, executable), their
#: digests validated by the caller. Plain tuples: they cross a helper's pipe cheaply.
LinkTask = list[tuple[str, list["FileEntry"]]]


# -- import -----------------------------------------------------------------------------------


def _special_kind(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def unsupported(path: str, mode: int) -> UnsupportedFileTypeError:
    return UnsupportedFileTypeError(
        f"cannot store {path}: it is a {_special_kind(mode)}; "
        "only regular files, directories and symlinks can be stored"
    )


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open a regular file without following a symlink or blocking on a fifo; fstat it.

    What is recorded (mode, size, time stamps) is then what was opened, even if the path is
    replaced meanwhile.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise unsupported(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _read_small(fd: int, size: int, start: bytes = b"") -> bytes:
    """The whole content of a small file whose ``fstat`` said ``size`` bytes, of which
    ``start`` was read already."""
    data = start or os.read(fd, size + 1)
    if len(data) > size:  # grew since fstat: store what is read to the end
        parts = [data]
        while chunk := os.read(fd, CHUNK_SIZE):
            parts.append(chunk)
        data = b"".join(parts)
    return data


#: What :func:`import_files` reports for each file it stored: its digest (hash and size),
#: whether it is executable and what ``fstat`` said of it before it was read.
Stored = tuple[str, int, bool, "FileStat"]


def import_files(store: VerifiedBlobs, batch: list[str]) -> tuple[list[Stored], bool]:
    """Read, hash and store the files at the ``batch`` paths; a task of import's runners.

    Returns what was stored for the files at the start of the batch, in order, and whether
    the next file left undone is a large one. A large file is stored alone: one met after
    others ends the task before it, so that the caller hands it and the rest on separately
    and several large files spread over the runner's threads or processes. Small files are
    read whole and stored in groups after one existence check per group (which freshens
    what is present: a reused old blob must not look like garbage to prune); large ones are
    copied and hashed by :meth:`VerifiedBlobs.put_open_file`, reading them once.
    """
    done: list[Stored] = []
    pending: list[tuple[Digest, bytes]] = []  # read, to be stored unless present
    pending_bytes = 0
    # Names bound once: this loop runs once per file, and a small file costs only a few
    # microseconds of system calls and hashing.
    read, close, of_bytes, filestat = os.read, os.close, Digest.of_bytes, statcache.FileStat.of
    function = store.function
    for path in batch:
        fd, st = open_regular(path)
        try:
            size = st.st_size
            if size > SMALL_FILE:
                if len(batch) > 1:
                    large_next = True
                    break
                digest = store.put_open_file(fd)
            else:
                data = read(fd, size + 1)
                if len(data) > size:  # grew since fstat: store what is read to the end
                    data = _read_small(fd, size, data)
                digest = of_bytes(data, function)
                if digest[1]:
                    pending.append((digest, data))
                    pending_bytes += digest[1]
        finally:
            close(fd)
        done.append((digest[0], digest[1], bool(st.st_mode & stat.S_IXUSR), filestat(st)))
        if pending_bytes >= _BATCH_BYTES:
            _store_group(store, pending)
            pending, pending_bytes = [], 0
    else:
        large_next = False
    if pending:
        _store_group(store, pending)
    return done, large_next


def _store_group(store: VerifiedBlobs, pending: list[tuple[Digest, bytes]]) -> None:
    missing = store.find_missing((d for d, _ in pending), freshen=True)
    if not missing:
        return
    writes = []
    for digest, data in pending:
        if digest in missing:
            writes.append((digest, data))
            missing.discard(digest)  # a duplicate inside the group is written once
    store.write_hashed(writes)  # hashed here, from the bytes written


# -- checkout ---------------------------------------------------------------------------------


def tree_path(dest: str, path: str) -> str:
    """Where ``path`` (under ``dest``) is in the tree: what ``ls`` shows, never a disk path."""
    return path[len(dest) + 1 :] if path.startswith(dest + os.sep) else "."


def link_files(store: VerifiedBlobs, work: tuple[str, bool, LinkTask]) -> tuple[int, list[Copy]]:
    """Hardlink files into their (new, empty) directories under the checkout ``dest``; a task
    of checkout's runners. Returns how many were linked and those to copy instead (unless
    ``strict``, a refused link is an error)."""
    dest, strict, task = work
    blobs = store.backend
    trusted = Digest._trusted  # validated by the caller, with the rest of the tree
    linked = 0
    for position, (path, files) in enumerate(task):
        if not files:
            continue
        names, hashes, sizes, _ = zip(*files, strict=True)
        # The (name, Digest) pairs link_blobs takes, built by loops in C (Digest._trusted's
        # tuple.__new__ over the columns): no Python code per file.
        digests = map(tuple.__new__, repeat(Digest), zip(hashes, sizes, strict=True))
        links = list(zip(names, digests, strict=True))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise CheckoutError(tree_path(dest, path), exc) from exc
        try:
            blobs.link_blobs(fd, links)
        except OSError as exc:
            if strict or exc.errno not in _LINK_REFUSED:
                name = exc.filename2 if isinstance(exc.filename2, str) else ""
                failed = os.path.join(path, name) if name else path
                raise CheckoutError(tree_path(dest, failed), exc) from exc
            # Copy what is not linked yet: the rest of this directory, then the others.
            made = set(os.listdir(fd))
            linked += sum(1 for n, _ in links if n in made)
            rest = [(os.path.join(path, n), d, False) for n, d in links if n not in made]
            for later_path, later in task[position + 1 :]:
                rest += [
                    (os.path.join(later_path, n), trusted(h, s), False) for n, h, s, _ in later
                ]
            return linked, rest
        finally:
            os.close(fd)
        linked += len(links)
    return linked, []


def copy_files(store: VerifiedBlobs, work: tuple[str, list[Copy]]) -> tuple[int, list[Copy]]:
    """Write copies of files under the checkout ``dest``; a task of checkout's runners."""
    dest, batch = work
    for path, digest, executable in batch:
        _write_copy(store, dest, path, digest, executable)
    return len(batch), []


def _write_copy(
    store: VerifiedBlobs, dest: str, path: str, digest: Digest, executable: bool
) -> None:
    mode = 0o755 if executable else 0o644
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
    except OSError as exc:
        raise CheckoutError(tree_path(dest, path), exc) from exc
    try:
        with os.fdopen(fd, "wb", buffering=0, closefd=False) as out:
            if digest.size <= SMALL_FILE:
                _write_out(dest, path, out.write, store.read_bytes(digest))
            else:
                with store.open_read(digest) as stream:
                    buf = bytearray(CHUNK_SIZE)
                    view = memoryview(buf)
                    while n := stream.readinto(view):  # type: ignore[attr-defined]
                        _write_out(dest, path, out.write, view[:n])
        if executable:
            os.fchmod(fd, mode)  # the umask may have dropped execute bits
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _write_out(
    dest: str, path: str, write: Callable[[bytes | memoryview], object], data: bytes | memoryview
) -> None:
    try:
        write(data)
    except OSError as exc:  # a full disk, a quota
        raise CheckoutError(tree_path(dest, path), exc) from exc
