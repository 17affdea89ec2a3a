"""Import: store a directory on disk as a Directory tree.

Every file is stored before the Directory that names it, and every Directory before its
parent, so a stored Directory always has its children. File content goes through the
verified-blob layer; the Directory messages are encoded here (:mod:`casframe.directory`) from
digests computed of the very bytes stored, and written through its one path for
already-hashed content.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import cast

from casframe.blobs import VerifiedBlobs
from casframe.digest import Digest
from casframe.digestfunctions import DigestFunction
from casframe.directory import directory_entry, file_entry, symlink_entry
from casframe.errors import InvalidNameError
from casframe.progress import NO_PROGRESS, Progress
from casframe.statcache import StatCache, default_directory, open_stat_cache
from casframe.workers.pool import IMPORT_THRESHOLD_FILES, Runner, open_runner
from casframe.workers.tasks import Stored, import_files, unsupported

__all__ = ["import_directory"]

# Files per task: large enough to amortise scheduling, small enough to spread the work.
_BATCH_FILES = 256


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


class _Importer:
    """One import's work on files: stored by a runner's tasks, or taken from the stat cache.

    The scanning thread looks each file up in the stat cache and checks the remembered
    digests with the store in groups (which freshens them: a reused old blob must not look
    like garbage to prune). The other files go in batches to :func:`import_files`, on a
    runner chosen once the scan has found enough files to read: helper processes when there
    are at least ``threshold`` (and ``jobs`` > 1), the threads of this process otherwise
    (:func:`casframe.workers.pool.open_runner`). Batches found before the choice are held
    until it is made.

    The split is about the GIL: a file found in the cache costs three quick system calls
    (lstat, then utime and stat of its object), and two threads doing such work hand the GIL
    back and forth at every call, which costs more than the calls (a re-import of 20,000
    files took 1.0 s on two threads and 0.6 s on one).
    """

    def __init__(
        self, blobs: VerifiedBlobs, cache: StatCache | None, progress: Progress, jobs: int,
        threshold: int,
    ) -> None:
        self.blobs = blobs
        self.cache = cache
        self.progress = progress
        self.jobs = jobs
        self.threshold = threshold
        self.runner: Runner | None = None
        self.held: list[list[_Job]] = []
        self.held_files = 0
        self.outstanding = 0
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        #: Files whose digests came from the cache, to check with the store as a group.
        self.remembered: list[tuple[_ScannedDir, int, str, Digest]] = []

    def submit(self, batch: list[_Job]) -> None:
        if self.runner is None:
            self.held.append(batch)
            self.held_files += len(batch)
            if self.held_files >= self.threshold:
                self.start_runner()
            return
        with self.changed:
            self.outstanding += 1
        try:
            future = self.runner.submit(import_files, [path for _, _, path in batch])
        except BaseException:
            self.done()
            raise
        future.add_done_callback(functools.partial(self.collect, batch))

    def start_runner(self) -> None:
        """Choose the runner (at the threshold, or when the scan ends) and hand it what is
        held."""
        if self.runner is not None or not self.held:
            return  # (nothing to read: a re-import that found every file in the cache)
        self.runner = open_runner(self.blobs, self.jobs, self.held_files, self.threshold)
        held, self.held = self.held, []
        for batch in held:
            self.submit(batch)

    def collect(self, batch: list[_Job], future: Future[tuple[list[Stored], bool]]) -> None:
        """Take a task's results (on the thread that ran or fed it); hand on what it left."""
        try:
            if future.cancelled():
                return
            stored, large_next = future.result()
            record = self.cache.record if self.cache is not None else None
            trusted = Digest._trusted  # computed by the task from the bytes it stored
            for (scanned, index, _), (hash_, size, executable, st) in zip(
                batch, stored, strict=False
            ):
                scanned.entries[index] = file_entry(
                    scanned.files[index], trusted(hash_, size), executable
                )
                if record is not None and size == st[2]:  # st_size: read as fstat said
                    record(st, hash_)
            self.progress.advance(len(stored))
            rest = batch[len(stored) :]
            if large_next and len(rest) > 1:
                self.submit(rest[:1])
                rest = rest[1:]
            if rest:
                self.submit(rest)
        except BaseException as exc:  # noqa: BLE001 - raised by wait() in the caller
            with self.changed:
                if self.error is None:
                    self.error = exc
        finally:
            self.done()

    def done(self) -> None:
        with self.changed:
            self.outstanding -= 1
            self.changed.notify_all()

    def wait(self) -> None:
        """Wait for every batch, including those handed on by tasks; raise the first error."""
        with self.changed:
            while self.outstanding and self.error is None:
                self.changed.wait()
            if self.error is not None:
                raise self.error

    def shutdown(self, *, cancel: bool) -> None:
        if self.runner is not None:
            self.runner.shutdown(cancel=cancel)

    def remember(
        self, scanned: _ScannedDir, index: int, path: str, st: os.stat_result, hash_: str
    ) -> None:
        """Take the file's digest ``hash_`` from the cache (scanning thread only)."""
        size = st.st_size
        digest = Digest._trusted(hash_, size)
        scanned.entries[index] = file_entry(
            scanned.files[index], digest, bool(st.st_mode & stat.S_IXUSR)
        )
        if not size:
            self.progress.advance(1)
            return
        remembered = self.remembered
        remembered.append((scanned, index, path, digest))
        if len(remembered) >= _BATCH_FILES:
            self.check_remembered()

    def check_remembered(self) -> None:
        """Ask the store about remembered digests; read again the files whose blob is gone.

        The cache knows such a file but the store no longer has its blob (pruned since, or
        another store): a task reads it again and stores what it holds now.
        """
        remembered, self.remembered = self.remembered, []
        missing = self.blobs.find_missing((r[3] for r in remembered), freshen=True)
        again = [(scanned, index, path) for scanned, index, path, d in remembered if d in missing]
        self.progress.advance(len(remembered) - len(again))  # the others count when stored
        if again:
            self.submit(again)


def _open_cache(
    root: str, stat_cache: bool | str | os.PathLike[str], started_ns: int,
    function: DigestFunction,
) -> StatCache | None:
    if stat_cache is False:
        return None
    directory = default_directory() if stat_cache is True else os.fspath(stat_cache)
    if directory is None:
        return None
    return open_stat_cache(root, directory, started_ns, function)


def import_directory(
    blobs: VerifiedBlobs,
    path: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    stat_cache: bool | str | os.PathLike[str] = True,
    jobs: int = 1,
) -> Digest:
    """Store the directory ``path`` (recursively) and return its root Directory digest.

    With ``stat_cache`` (the default; a path names the folder for the cache files), files
    unchanged since the previous import of ``path`` are not read again: their digests come
    from :mod:`casframe.statcache`, and the store is still asked for every one of them.
    ``jobs`` is how many helper processes read and store files when there are enough of them
    to pay (see :mod:`casframe.workers.pool`); ``Store.import_directory`` passes the store's.
    """
    progress = progress or NO_PROGRESS
    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
    cache = _open_cache(root, stat_cache, time.time_ns(), blobs.function)
    progress.start("import", None)

    # Scan (file types come from readdir, no stat) while tasks hash and store what was found
    # so far, in batches bounded in count; each task bounds its bytes in memory.
    importer = _Importer(blobs, cache, progress, jobs, IMPORT_THRESHOLD_FILES)
    try:
        scanned = _scan(root, importer)
        importer.check_remembered()
        importer.start_runner()
        importer.wait()
    except BaseException:
        importer.shutdown(cancel=True)
        raise
    importer.shutdown(cancel=False)

    # Every file is stored; store Directories children first so each one is complete.
    root_digest, serialized = _encode_directories(scanned, blobs.function)
    _store_absent(blobs, serialized)
    if cache is not None:
        cache.save()
    progress.finish()
    return root_digest


def _scan(root: str, importer: _Importer) -> list[_ScannedDir]:
    """Every directory under ``root``, parents before children, its files handed to
    ``importer`` in batches as they are found."""
    # Without a previous import to consult (a first one), no lstat of each file.
    lookup = importer.cache.lookup if importer.cache is not None and importer.cache.known else None
    remember, is_regular = importer.remember, stat.S_ISREG
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
                    if lookup is not None:
                        st = entry.stat(follow_symlinks=False)
                        if is_regular(st.st_mode) and (hash_ := lookup(st)) is not None:
                            remember(current, index, entry.path, st, hash_)
                            continue
                    batch.append((current, index, entry.path))
                    if len(batch) >= _BATCH_FILES:
                        importer.submit(batch)
                        batch = []
                else:
                    raise unsupported(entry.path, entry.stat(follow_symlinks=False).st_mode)
        _refuse_backslashes(root, current)
    if batch:
        importer.submit(batch)
    return scanned


def _encode_directories(
    scanned: list[_ScannedDir], function: DigestFunction
) -> tuple[Digest, list[tuple[Digest, bytes]]]:
    """The root's digest and every Directory message (hashed with ``function``), children
    before parents."""
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
        digest = Digest.of_bytes(data, function)
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
