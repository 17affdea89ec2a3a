"""The Directory tree engine: import, checkout, diff, lookup and walk over any Store.

Trees use REAPI's ``Directory`` messages: files, subdirectories and symlinks sorted by name,
each name a single safe path segment. Import stores every file before the Directory that names
it, and every Directory before its parent, so a stored Directory always has its children.
Checkout validates every Directory before touching the disk and only creates entries inside
directories it created itself, so a hostile tree cannot write outside the destination.
This module talks to storage only through :class:`casframe.store.Store`.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from google.protobuf.message import DecodeError

from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Digest as DigestProto,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory
from casframe.digest import Digest
from casframe.errors import (
    CasframeError,
    CorruptBlobError,
    InvalidNameError,
    UnsafeTreeError,
)
from casframe.names import entry_names_are_safe, split_tree_path, validate_entry_name
from casframe.progress import NO_PROGRESS, Progress
from casframe.statcache import StatCache, default_directory, open_stat_cache
from casframe.treesize import TreeLimits, TreeSize, measure_tree, node_digests
from casframe.workers.pool import IMPORT_THRESHOLD_FILES, Runner, open_runner
from casframe.workers.tasks import Stored, import_files, unsupported

if TYPE_CHECKING:
    from casframe.store import Store

__all__ = [
    "TreeEntry",
    "closure",
    "directory_entries",
    "import_directory",
    "iter_tree",
    "list_directory",
    "load_tree",
    "lookup_file",
    "lookup_subdir",
    "missing_in_tree",
    "node_digest",
    "node_digests",
    "parse_directory",
    "walk",
]

# Files per task: large enough to amortise scheduling, small enough to spread the work.
_BATCH_FILES = 256

EntryKind = Literal["file", "directory", "symlink"]


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One entry of a tree. ``digest`` is set for files and directories, ``target`` for links."""

    path: str
    kind: EntryKind
    digest: Digest | None = None
    is_executable: bool = False
    target: str = ""


# -- parsing and validation -------------------------------------------------------------------


def parse_directory(digest: Digest, data: bytes) -> Directory:
    """Decode a Directory blob and check that it is safe to materialise."""
    directory = Directory()
    try:
        directory.ParseFromString(data)
    except DecodeError as exc:
        raise CorruptBlobError(digest, f"not a Directory message: {exc}") from None
    names = [node.name for group in _groups(directory) for node in group]
    if len(set(names)) != len(names) or not entry_names_are_safe(names):
        seen: set[str] = set()
        for name in names:
            try:
                validate_entry_name(name)
            except InvalidNameError as exc:
                raise UnsafeTreeError(f"directory {digest}: {exc}") from None
            if name in seen:
                raise UnsafeTreeError(f"directory {digest}: duplicate name {name!r}")
            seen.add(name)
    for link in directory.symlinks:
        if not link.target or "\x00" in link.target:
            # No file system can hold it: checkout would fail half-way, with files written.
            raise UnsafeTreeError(
                f"directory {digest}: symlink {link.name!r} has an impossible target "
                f"{link.target!r} (empty or with a NUL character)"
            )
    return directory


def _groups(directory: Directory) -> tuple[Any, Any, Any]:
    return directory.files, directory.directories, directory.symlinks


def is_canonical(directory: Directory) -> bool:
    """Whether entries are sorted by name within each kind (REAPI's canonical form)."""
    for group in _groups(directory):
        names = [node.name for node in group]
        if names != sorted(names):
            return False
    return True


def node_digest(proto: DigestProto) -> Digest:
    return Digest(proto.hash, proto.size_bytes)


def iter_tree(store: Store, root: Digest) -> Iterator[tuple[Digest, bytes, Directory]]:
    """Every distinct Directory of a tree (digest, blob, message), breadth first, in batches.

    Directories the backend's ``get_tree`` fast path supplies up front (REAPI's GetTree: the
    whole tree in a few streamed pages) are not read again; the rest are read level by level.
    """
    known = _prefetch_tree(store, root)
    seen = {root}
    level = [root]
    while level:
        next_level: list[Digest] = []
        found = [(d, known.pop(d)) for d in level if d in known]
        supplied = {d for d, _ in found}
        rest = [d for d in level if d not in supplied]
        for digest, data in itertools.chain(found, store.read_many(rest)):
            directory = parse_directory(digest, data)
            yield digest, data, directory
            for child in node_digests(directory.directories):
                if child not in seen:
                    seen.add(child)
                    next_level.append(child)
        level = next_level


def _prefetch_tree(store: Store, root: Digest) -> dict[Digest, bytes]:
    """Directory blobs of ``root``'s tree from the backend's fast path, keyed by their hash.

    Keyed by what the bytes hash to, so they are verified by construction; bytes that hash to
    no digest of the tree are simply never used. Any failure falls back to ordinary reads.
    """
    if root.size == 0:
        return {}
    try:
        return {Digest.of_bytes(data): data for data in store.blobs.get_tree(root)}
    except CasframeError:
        return {}


def closure(store: Store, root: Digest) -> Iterator[Digest]:
    """Every digest a tree needs (its Directories and files), each once, parents first."""
    seen: set[Digest] = set()  # one set: the empty blob is both an empty file and Directory
    for digest, _, directory in iter_tree(store, root):
        if digest not in seen:
            seen.add(digest)
            yield digest
        for file_digest in node_digests(directory.files):
            if file_digest not in seen:
                seen.add(file_digest)
                yield file_digest


def missing_in_tree(store: Store, root: Digest, *, freshen: bool = False) -> set[Digest]:
    """Digests the tree needs that the store lacks (empty when the tree is complete).

    With ``freshen``, every blob found present is touched first (see ``Store.find_missing``).
    """
    missing: set[Digest] = set()
    seen = {root}
    level = [root]
    while level:
        absent = store.find_missing(level, freshen=freshen)
        missing |= absent
        files: set[Digest] = set()
        next_level: list[Digest] = []
        for digest, data in store.read_many([d for d in level if d not in absent]):
            directory = parse_directory(digest, data)
            files.update(node_digests(directory.files))
            for node in directory.directories:
                child = node_digest(node.digest)
                if child not in seen:
                    seen.add(child)
                    next_level.append(child)
        missing |= store.find_missing(files, freshen=freshen)
        level = next_level
    return missing


# -- import -----------------------------------------------------------------------------------


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


# Import writes Directory messages itself. Building a FileNode message object costs several
# microseconds a file, and the Directories are built after the workers finish, on one thread;
# encoding each file's entry in the worker that stored it costs a fraction of that, in
# parallel with the other worker's system calls. The bytes are exactly those of protobuf's
# deterministic serialization (fields in number order, default values left out), which the
# tests check against protobuf itself.

_VARINT_1 = [bytes((n,)) for n in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _VARINT_1[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _digest_field(digest: Digest) -> bytes:
    """Field 2 (``digest``) of a FileNode or DirectoryNode: Digest{hash=1, size_bytes=2}."""
    hash_, size = digest
    if not size:
        return b"\x12\x42\n@" + hash_.encode("ascii")  # 66 bytes: the hash (64 hex digits)
    size_field = _varint(size)
    # At most 66 + 1 + 10 bytes: the length fits one varint byte.
    return b"".join(
        (b"\x12", _VARINT_1[67 + len(size_field)], b"\n@", hash_.encode("ascii"), b"\x10",
         size_field)
    )


def _file_entry(name: bytes, digest: Digest, executable: bool) -> bytes:
    """Directory field 1: FileNode{name=1, digest=2, is_executable=4}."""
    name_length = _varint(len(name))
    digest_field = _digest_field(digest)
    body_length = 1 + len(name_length) + len(name) + len(digest_field) + (2 if executable else 0)
    return b"".join(
        (b"\n", _varint(body_length), b"\n", name_length, name, digest_field,
         b" \x01" if executable else b"")
    )


def _directory_entry(name: bytes, digest: Digest) -> bytes:
    """Directory field 2: DirectoryNode{name=1, digest=2}."""
    return _length_delimited(b"\x12", _length_delimited(b"\n", name) + _digest_field(digest))


def _symlink_entry(name: bytes, target: bytes) -> bytes:
    """Directory field 3: SymlinkNode{name=1, target=2}."""
    body = _length_delimited(b"\n", name)
    if target:
        body += _length_delimited(b"\x12", target)
    return _length_delimited(b"\x1a", body)


class _Importer:
    """One import's work on files: stored by a runner's tasks, or taken from the stat cache.

    The scanning thread looks each file up in the stat cache and checks the remembered
    digests with the store in groups (which freshens them). The other files go in batches to
    :func:`import_files`, on a runner chosen once the scan has found enough files to read:
    helper processes when there are at least ``threshold`` (and ``jobs`` > 1), the threads of
    this process otherwise (:func:`casframe.workers.pool.open_runner`). Batches found before
    the choice are held until it is made.

    The split is about the GIL: a file found in the cache costs three quick system calls
    (lstat, then utime and stat of its object), and two threads doing such work hand the GIL
    back and forth at every call, which costs more than the calls (a re-import of 20,000
    files took 1.0 s on two threads and 0.6 s on one).
    """

    def __init__(
        self, store: Store, cache: StatCache | None, progress: Progress, jobs: int,
        threshold: int,
    ) -> None:
        self.store = store
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
        if self.runner is not None:
            return
        self.runner = open_runner(self.store, self.jobs, self.held_files, self.threshold)
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
            for (scanned, index, _), (hash_, size, executable, st) in zip(
                batch, stored, strict=False
            ):
                scanned.entries[index] = _file_entry(
                    scanned.files[index], Digest._trusted(hash_, size), executable
                )
                if record is not None and size == st.st_size:
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

    def remember(self, scanned: _ScannedDir, index: int, path: str, st: os.stat_result) -> bool:
        """Take the file's digest from the cache if it has one (scanning thread only)."""
        hash_ = self.cache.lookup(st) if self.cache is not None else None
        if hash_ is None:
            return False
        digest = Digest._trusted(hash_, st.st_size)
        scanned.entries[index] = _file_entry(
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
        another store): a task reads it again and stores what it holds now.
        """
        remembered, self.remembered = self.remembered, []
        missing = self.store.find_missing((r[3] for r in remembered), freshen=True)
        again = [(scanned, index, path) for scanned, index, path, d in remembered if d in missing]
        self.progress.advance(len(remembered) - len(again))  # the others count when stored
        if again:
            self.submit(again)


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
    store: Store,
    path: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    stat_cache: bool | str | os.PathLike[str] = True,
    jobs: int | None = None,
) -> Digest:
    """Store the directory ``path`` (recursively) and return its root Directory digest.

    With ``stat_cache`` (the default; a path names the folder for the cache files), files
    unchanged since the previous import of ``path`` are not read again: their digests come
    from :mod:`casframe.statcache`, and the store is still asked for every one of them.
    ``jobs`` (default: the store's) is how many helper processes read and store files when
    there are enough of them to pay (see :mod:`casframe.workers.pool`).
    """
    progress = progress or NO_PROGRESS
    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
    cache = _open_cache(root, stat_cache, time.time_ns())
    progress.start("import", None)

    # Scan (file types come from readdir, no stat) while tasks hash and store what was found
    # so far, in batches bounded in count; each task bounds its bytes in memory.
    scanned: list[_ScannedDir] = []
    importer = _Importer(
        store, cache, progress, store.jobs if jobs is None else jobs, IMPORT_THRESHOLD_FILES
    )
    # Without a previous import to consult (a first one), no lstat of each file.
    use_cache = cache is not None and bool(cache.known)
    try:
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
                        current.symlinks.append(
                            (name, _utf8(target, entry.path, "symlink target"))
                        )
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
                        raise unsupported(
                            entry.path, entry.stat(follow_symlinks=False).st_mode
                        )
            _refuse_backslashes(root, current)
        if batch:
            importer.submit(batch)
        importer.check_remembered()
        importer.start_runner()
        importer.wait()
    except BaseException:
        importer.shutdown(cancel=True)
        raise
    importer.shutdown(cancel=False)

    # Build Directory messages bottom-up: children were listed after their parents.
    digests_of_dirs: dict[str, Digest] = {}
    serialized: list[tuple[Digest, bytes]] = []
    for scanned_dir in reversed(scanned):
        filled = cast(list[bytes], scanned_dir.entries)  # every one is filled in now
        prefix = f"{scanned_dir.path}/" if scanned_dir.path else ""
        data = b"".join(
            [
                *[entry for _, entry in sorted(zip(scanned_dir.files, filled, strict=True))],
                *[
                    _directory_entry(name.encode("utf-8"), digests_of_dirs[prefix + name])
                    for name in sorted(scanned_dir.subdirs)
                ],
                *[_symlink_entry(name, target) for name, target in sorted(scanned_dir.symlinks)],
            ]
        )
        digest = Digest.of_bytes(data)
        digests_of_dirs[scanned_dir.path] = digest
        serialized.append((digest, data))

    # Every file is stored; store Directories children first so each one is complete.
    missing = store.find_missing((d for d, _ in serialized), freshen=True)
    pending = []
    for digest, data in serialized:
        if digest in missing:
            pending.append((digest, data))
            missing.discard(digest)
    store.blobs.write_blobs(pending)
    if cache is not None:
        cache.save()
    progress.finish()
    return digests_of_dirs[""]


# -- lookup, walk, list -----------------------------------------------------------------------


def lookup_subdir(store: Store, root: Digest, path: str) -> Digest:
    digest = root
    walked: list[str] = []
    for segment in split_tree_path(path):
        directory = store.get_directory(digest)
        for node in directory.directories:
            if node.name == segment:
                digest = node_digest(node.digest)
                break
        else:
            where = "/".join([*walked, segment])
            raise FileNotFoundError(errno.ENOENT, f"no directory {where!r} in tree {root}")
        walked.append(segment)
    return digest


def lookup_file(store: Store, root: Digest, path: str) -> TreeEntry:
    segments = split_tree_path(path)
    if not segments:
        raise IsADirectoryError(errno.EISDIR, f"{path!r} is the tree's root directory")
    parent = lookup_subdir(store, root, "/".join(segments[:-1]))
    for entry in list_directory(store, parent, ""):
        if entry.path == segments[-1]:
            if entry.kind == "file":
                return TreeEntry(path, "file", entry.digest, entry.is_executable)
            raise IsADirectoryError(errno.EISDIR, f"{path!r} in tree {root} is a {entry.kind}")
    raise FileNotFoundError(errno.ENOENT, f"no file {path!r} in tree {root}")


def directory_entries(directory: Directory, prefix: str) -> list[TreeEntry]:
    entries = [
        TreeEntry(prefix + n.name, "file", node_digest(n.digest), n.is_executable)
        for n in directory.files
    ]
    entries += [
        TreeEntry(prefix + n.name, "directory", node_digest(n.digest))
        for n in directory.directories
    ]
    entries += [TreeEntry(prefix + n.name, "symlink", target=n.target) for n in directory.symlinks]
    entries.sort(key=lambda e: e.path)
    return entries


def list_directory(store: Store, root: Digest, path: str) -> list[TreeEntry]:
    digest = lookup_subdir(store, root, path)
    return directory_entries(store.get_directory(digest), "")


def load_tree(
    store: Store, root: Digest, limits: TreeLimits, what: str, *, content: bool = False
) -> tuple[dict[Digest, Directory], dict[Digest, TreeSize]]:
    """Every distinct Directory of a tree, and the expanded size of each, checked against
    ``limits`` (with ``content``, the bytes of its files too) before the caller does any work.

    Raises :class:`~casframe.errors.TreeTooLargeError` naming ``what`` for a tree over a limit.
    """
    directories = {digest: directory for digest, _, directory in iter_tree(store, root)}
    sizes = measure_tree(directories, root)
    limits.check(sizes[root], what, content=content)
    return directories, sizes


def walk(
    store: Store, root: Digest, path: str = "", *, limits: TreeLimits | None = None
) -> Iterator[TreeEntry]:
    """Every entry under ``path``, depth first in name order: a directory, then its contents.

    The tree is read and measured before the first entry is returned (each distinct Directory
    read once); one over ``limits.max_entries`` raises
    :class:`~casframe.errors.TreeTooLargeError` instead.
    """
    start = lookup_subdir(store, root, path)
    where = f"directory {path!r} of tree {root}" if path.strip("/") else f"tree {root}"
    directories, _ = load_tree(store, start, limits or TreeLimits(), where)
    return _walk_loaded(directories, start)


def _walk_loaded(directories: dict[Digest, Directory], start: Digest) -> Iterator[TreeEntry]:
    stack: list[Iterator[TreeEntry]] = [iter(directory_entries(directories[start], ""))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        if entry.kind == "directory" and entry.digest is not None:
            children = directory_entries(directories[entry.digest], entry.path + "/")
            stack.append(iter(children))
