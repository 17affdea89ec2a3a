"""Import: store a directory on disk as a Directory tree.

Every file is stored before the Directory that names it, and every Directory before its
parent, so a stored Directory always has its children. File content goes through the
verified-blob layer; the Directory messages are encoded here (:mod:`casframe.directory`) from
digests computed of the very bytes stored, and written through its one path for
already-hashed content.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

from casframe.blobs import VerifiedBlobs
from casframe.digest import CHUNK_SIZE, Digest
from casframe.directory import directory_entry, file_entry, symlink_entry
from casframe.errors import InvalidNameError, UnsupportedFileTypeError
from casframe.progress import NO_PROGRESS, Progress
from casframe.statcache import StatCache, default_directory, open_stat_cache

__all__ = ["import_directory"]

# Files up to this size are read whole and written in batches; larger ones are streamed in
# CHUNK_SIZE pieces so memory stays bounded whatever the file sizes.
_SMALL_FILE = CHUNK_SIZE
# Bytes of small files one worker holds at once (times the worker count: the memory budget).
_BATCH_BYTES = 8 << 20
# Files per worker task: large enough to amortise scheduling, small enough to spread the work.
_BATCH_FILES = 256
# Never follow a symlink put in place of a file; never block opening a fifo put there.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(slots=True)
class _ScannedDir:
    path: str  # relative to the import root, "" for the root itself
    files: list[bytes] = field(default_factory=list)  # names, UTF-8
    symlinks: list[tuple[bytes, bytes]] = field(default_factory=list)  # names and targets
    subdirs: list[str] = field(default_factory=list)
    #: The encoded Directory entry of each file in ``files``, filled in by the workers.
    entries: list[bytes | None] = field(default_factory=list)


#: One file for a worker: its directory, its index in ``files`` there, and its path.
_Job = tuple[_ScannedDir, int, str]


def _refuse_backslashes(root: str, scanned: _ScannedDir) -> None:
    """Refuse a name with a backslash before the tree is stored: checkout refuses such a
    name (a path separator to some clients), so the tree could never be got back."""
    names = [*scanned.files, *(os.fsencode(n) for n in scanned.subdirs),
             *(n for n, _ in scanned.symlinks)]
    if b"\\" not in b"/".join(names):
        return
    name = os.fsdecode(next(n for n in names if b"\\" in n))
    path = os.path.join(root, scanned.path, name)
    raise InvalidNameError(f"cannot store {path!r}: a backslash is not allowed in a name")


def _utf8(name: str, path: str, what: str = "name") -> bytes:
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidNameError(f"cannot store {path!r}: its {what} is not valid UTF-8") from None


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


def _unsupported(path: str, mode: int) -> UnsupportedFileTypeError:
    return UnsupportedFileTypeError(
        f"cannot store {path}: it is a {_special_kind(mode)}; "
        "only regular files, directories and symlinks can be stored"
    )


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open a regular file without following a symlink or blocking on a fifo; fstat it.

    What is recorded (mode, size, time stamps) is then what was opened, even if the path is
    replaced meanwhile.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsupported(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _read_small(fd: int, size: int) -> bytes:
    """The whole content of a small file whose ``fstat`` said ``size`` bytes."""
    data = os.read(fd, size + 1)
    if len(data) > size:  # grew since fstat: store what is read to the end
        parts = [data]
        while chunk := os.read(fd, CHUNK_SIZE):
            parts.append(chunk)
        data = b"".join(parts)
    return data


class _Importer:
    """One import's work on files: read, hash and store them, or take them from the stat cache.

    The scanning thread looks each file up in the stat cache and checks the remembered
    digests with the store in groups (which freshens them: a reused old blob must not look
    like garbage to prune). The pool's workers read, hash and store the other files. Small
    files are read whole and stored in groups after one existence check per group; large ones
    are streamed one by one. A worker that meets a large file first hands the rest of its
    batch to the pool, so that a few large files listed together still spread over the workers.

    The split is about the GIL: a file found in the cache costs three quick system calls
    (lstat, then utime and stat of its object), and two threads doing such work hand the GIL
    back and forth at every call, which costs more than the calls (a re-import of 20,000
    files took 1.0 s on two threads and 0.6 s on one). Reading and writing files takes long
    enough in the kernel for two workers to gain.
    """

    def __init__(
        self, blobs: VerifiedBlobs, pool: ThreadPoolExecutor, cache: StatCache | None,
        progress: Progress,
    ) -> None:
        self.blobs = blobs
        self.pool = pool
        self.cache = cache
        self.progress = progress
        self.futures: list[Future[None]] = []
        #: Files whose digests came from the cache, to check with the store as a group.
        self.remembered: list[tuple[_ScannedDir, int, str, Digest]] = []

    def submit(self, batch: list[_Job]) -> None:
        self.futures.append(self.pool.submit(self.import_files, batch))

    def wait(self) -> None:
        """Wait for every batch, including those workers split off while this waits.

        A split-off batch is added to the list before the task that split it ends, so once
        the last listed task has ended, there is no other.
        """
        index = 0
        while index < len(self.futures):
            self.futures[index].result()
            index += 1

    def remember(self, scanned: _ScannedDir, index: int, path: str, st: os.stat_result) -> bool:
        """Take the file's digest from the cache if it has one (scanning thread only)."""
        hash_ = self.cache.lookup(st) if self.cache is not None else None
        if hash_ is None:
            return False
        digest = Digest._trusted(hash_, st.st_size)
        scanned.entries[index] = file_entry(
            scanned.files[index], digest, bool(st.st_mode & stat.S_IXUSR)
        )
        if not digest.size:
            self.progress.advance(1)
            return True
        self.remembered.append((scanned, index, path, digest))
        if len(self.remembered) >= _BATCH_FILES:
            self.check_remembered()
        return True

    def check_remembered(self) -> None:
        """Ask the store about remembered digests; read again the files whose blob is gone.

        The cache knows such a file but the store no longer has its blob (pruned since, or
        another store): a worker reads it again and stores what it holds now.
        """
        remembered, self.remembered = self.remembered, []
        missing = self.blobs.find_missing((r[3] for r in remembered), freshen=True)
        again = [(scanned, index, path) for scanned, index, path, d in remembered if d in missing]
        self.progress.advance(len(remembered) - len(again))  # the others count when stored
        if again:
            self.submit(again)

    def import_files(self, batch: list[_Job]) -> None:
        blobs, cache = self.blobs, self.cache
        record = cache.record if cache is not None else None
        pending: list[tuple[Digest, bytes]] = []  # read, to be stored unless present
        pending_bytes = 0
        position, end = 0, len(batch)
        while position < end:
            scanned, index, path = batch[position]
            position += 1
            fd, st = _open_regular(path)
            try:
                if st.st_size > _SMALL_FILE:
                    if position < end:
                        self.submit(batch[position:end])
                        end = position
                    digest = blobs.put_open_file(fd)
                else:
                    data = _read_small(fd, st.st_size)
                    digest = Digest.of_bytes(data)
                    if digest.size:
                        pending.append((digest, data))
                        pending_bytes += digest.size
            finally:
                os.close(fd)
            if record is not None and digest.size == st.st_size:
                record(st, digest.hash)
            scanned.entries[index] = file_entry(
                scanned.files[index], digest, bool(st.st_mode & stat.S_IXUSR)
            )
            if pending_bytes >= _BATCH_BYTES:
                _store_absent(self.blobs, pending)
                pending, pending_bytes = [], 0
        if pending:
            _store_absent(self.blobs, pending)
        self.progress.advance(end)



def _open_cache(
    root: str, stat_cache: bool | str | os.PathLike[str], started_ns: int
) -> StatCache | None:
    if stat_cache is False:
        return None
    directory = default_directory() if stat_cache is True else os.fspath(stat_cache)
    if directory is None:
        return None
    return open_stat_cache(root, directory, started_ns)


def import_directory(
    blobs: VerifiedBlobs,
    path: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    stat_cache: bool | str | os.PathLike[str] = True,
) -> Digest:
    """Store the directory ``path`` (recursively) and return its root Directory digest.

    With ``stat_cache`` (the default; a path names the folder for the cache files), files
    unchanged since the previous import of ``path`` are not read again: their digests come
    from :mod:`casframe.statcache`, and the store is still asked for every one of them.
    """
    progress = progress or NO_PROGRESS
    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
    cache = _open_cache(root, stat_cache, time.time_ns())
    progress.start("import", None)

    # Scan (file types come from readdir, no stat) while workers hash and store what was
    # found so far, in batches bounded in count; each worker bounds its bytes in memory.
    with blobs.executor() as pool:
        importer = _Importer(blobs, pool, cache, progress)
        try:
            scanned = _scan(root, importer)
            importer.check_remembered()
            importer.wait()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise

    # Every file is stored; store Directories children first so each one is complete.
    root_digest, serialized = _encode_directories(scanned)
    _store_absent(blobs, serialized)
    if cache is not None:
        cache.save()
    progress.finish()
    return root_digest


def _scan(root: str, importer: _Importer) -> list[_ScannedDir]:
    """Every directory under ``root``, parents before children, its files handed to
    ``importer`` in batches as they are found."""
    # Without a previous import to consult (a first one), no lstat of each file.
    use_cache = importer.cache is not None and bool(importer.cache.known)
    scanned: list[_ScannedDir] = []
    batch: list[_Job] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        current = _ScannedDir(rel)
        scanned.append(current)
        files, entries_of_files = current.files, current.entries
        with os.scandir(os.path.join(root, rel) if rel else root) as entries:
            for entry in entries:
                name = _utf8(entry.name, entry.path)
                if entry.is_symlink():
                    target = os.readlink(entry.path)
                    current.symlinks.append((name, _utf8(target, entry.path, "symlink target")))
                elif entry.is_dir(follow_symlinks=False):
                    current.subdirs.append(entry.name)
                    stack.append(f"{rel}/{entry.name}" if rel else entry.name)
                elif entry.is_file(follow_symlinks=False):
                    index = len(files)
                    files.append(name)
                    entries_of_files.append(None)
                    if use_cache:
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode) and importer.remember(
                            current, index, entry.path, st
                        ):
                            continue
                    batch.append((current, index, entry.path))
                    if len(batch) >= _BATCH_FILES:
                        importer.submit(batch)
                        batch = []
                else:
                    raise _unsupported(entry.path, entry.stat(follow_symlinks=False).st_mode)
        _refuse_backslashes(root, current)
    if batch:
        importer.submit(batch)
    return scanned


def _encode_directories(scanned: list[_ScannedDir]) -> tuple[Digest, list[tuple[Digest, bytes]]]:
    """The root's digest and every Directory message, children before parents."""
    # Bottom-up: children were listed after their parents.
    digests_of_dirs: dict[str, Digest] = {}
    serialized: list[tuple[Digest, bytes]] = []
    for scanned_dir in reversed(scanned):
        filled = cast(list[bytes], scanned_dir.entries)  # every one is filled in now
        prefix = f"{scanned_dir.path}/" if scanned_dir.path else ""
        data = b"".join(
            [
                *[entry for _, entry in sorted(zip(scanned_dir.files, filled, strict=True))],
                *[
                    directory_entry(name.encode("utf-8"), digests_of_dirs[prefix + name])
                    for name in sorted(scanned_dir.subdirs)
                ],
                *[symlink_entry(name, target) for name, target in sorted(scanned_dir.symlinks)],
            ]
        )
        digest = Digest.of_bytes(data)
        digests_of_dirs[scanned_dir.path] = digest
        serialized.append((digest, data))
    return digests_of_dirs[""], serialized


def _store_absent(blobs: VerifiedBlobs, hashed: list[tuple[Digest, bytes]]) -> None:
    """Store those of ``hashed`` (digests computed here of these bytes) the store lacks, in
    order, each once; those present are freshened."""
    missing = blobs.find_missing((d for d, _ in hashed), freshen=True)
    if not missing:
        return
    writes = []
    for digest, data in hashed:
        if digest in missing:
            writes.append((digest, data))
            missing.discard(digest)  # a duplicate is written once
    blobs.write_hashed(writes)
