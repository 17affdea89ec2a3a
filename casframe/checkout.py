"""Checkout: write a stored tree into a directory on disk.

The whole tree is read, validated and measured before the first write, so a tree with an
unsafe name or over its limits (:class:`~casframe.treesize.TreeLimits`) is refused with nothing
written. Then it is written while walking the DAG directory by directory, with files handed to
worker threads in bounded batches: memory holds the distinct Directories and a few batches,
never the expanded tree, however often a subtree repeats. Entries are only created inside
directories this checkout created, never through a symlink, so a hostile tree cannot write
outside the destination. A failure removes what was written (the destination itself when the
checkout created it) and names the entry by its path in the tree. This module talks to storage
only through :class:`casframe.blobs.VerifiedBlobs`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from casframe.blobs import VerifiedBlobs
from casframe.digest import Digest
from casframe.errors import CheckoutError, UnsupportedOperationError
from casframe.lazy import lazy_module
from casframe.progress import NO_PROGRESS, Progress
from casframe.spi import Capability
from casframe.tree import load_listings
from casframe.treesize import TreeLimits
from casframe.workers.pool import (
    CHECKOUT_THRESHOLD_FILES,
    CheckoutThreads,
    InlineRunner,
    Pending,
    Runner,
    WorkerPool,
    open_checkout_runner,
)
from casframe.workers.tasks import Copy, LinkTask, copy_files, link_files, tree_path

if TYPE_CHECKING:
    import shutil

    from casframe.directory import FileEntry, Listing
else:
    shutil = lazy_module("shutil")  # only to undo a failed checkout (it brings bz2, lzma)

__all__ = ["checkout"]

# Files per task: large enough to amortise scheduling, small enough to spread the work.
_BATCH_FILES = 256
# Bytes of files one copy task writes: a large file is a task of its own, so several large
# files are written in parallel.
_BATCH_BYTES = 8 << 20
_T = TypeVar("_T")


def checkout(
    blobs: VerifiedBlobs,
    root: Digest,
    dest: str | os.PathLike[str],
    *,
    link: bool | None = None,
    progress: Progress | None = None,
    limits: TreeLimits | None = None,
    jobs: int = 1,
) -> None:
    """Materialise tree ``root`` at ``dest`` (absent or empty).

    Hardlinked files share the store's read-only objects; executable files are always copied,
    because a hardlink shares its mode with the stored object. A tree that expands past
    ``limits`` raises :class:`~casframe.errors.TreeTooLargeError` before anything is written;
    a file system error raises :class:`~casframe.errors.CheckoutError` naming the tree path.
    A tree of many files is written by ``jobs`` helper processes (``Store.checkout`` passes
    the store's).
    """
    progress = progress or NO_PROGRESS
    dest = os.path.abspath(os.fspath(dest))
    can_link = blobs.has(Capability.LOCAL_PATH)
    if link and not can_link:
        raise UnsupportedOperationError(
            f"{blobs.url} has no local files to hardlink; check out with copies instead"
        )
    use_links = can_link if link is None else link
    early = _EarlyHelpers(blobs, jobs, links=use_links)
    try:
        directories, sizes = load_listings(
            blobs, root, limits or TreeLimits(), f"tree {root}", content=True,
            files_seen=early.files_seen,
        )
        progress.start("checkout", sizes[root].files)
        created = _prepare_destination(dest)
    except BaseException:
        early.stop()
        raise
    try:
        runner = early.runner or open_checkout_runner(
            blobs, jobs, sizes[root].files, CHECKOUT_THRESHOLD_FILES, links=use_links
        )
        # Links: this process links too, beside its helpers (``jobs - 1`` of them).
        beside = InlineRunner(blobs) if use_links and isinstance(runner, WorkerPool) else None
        writer = _FileWriter(
            runner, dest, jobs=jobs, use_links=use_links, strict=bool(link), progress=progress,
            beside=beside,
        )
        try:
            _write_tree(directories, root, dest, writer)
            writer.finish()
        except BaseException:
            runner.shutdown(cancel=True)
            raise
        # Every batch is answered: helpers beside this process are idle, and stopped at once
        # (waiting for an idle helper's interpreter to wind down cost a whole command ~25 ms).
        runner.shutdown(cancel=beside is not None)
    except BaseException:
        _remove_written(dest, created)
        raise
    progress.finish()


class _EarlyHelpers:
    """Starts the helper processes while the tree is still being read, as soon as the
    Directories read so far hold enough files for them (the tree holds at least as many):
    a helper's start-up then overlaps the reading instead of following it."""

    def __init__(self, blobs: VerifiedBlobs, jobs: int, *, links: bool) -> None:
        self.blobs = blobs
        self.jobs = jobs
        self.links = links
        self.runner: Runner | CheckoutThreads | InlineRunner | None = None

    def files_seen(self, files: int) -> None:
        if self.runner is None and self.jobs > 1 and files >= CHECKOUT_THRESHOLD_FILES:
            self.runner = open_checkout_runner(
                self.blobs, self.jobs, files, CHECKOUT_THRESHOLD_FILES, links=self.links
            )
            if isinstance(self.runner, WorkerPool):
                self.runner.start()

    def stop(self) -> None:
        """The tree is refused (or the destination): stop the helpers started for it."""
        if self.runner is not None:
            self.runner.shutdown(cancel=True)


def _prepare_destination(dest: str) -> bool:
    """Make sure ``dest`` is a new or empty directory; whether it was created here."""
    try:
        os.mkdir(dest)
    except FileExistsError:
        if os.path.islink(dest) or not os.path.isdir(dest):
            raise FileExistsError(errno.EEXIST, "checkout destination exists", dest) from None
        if os.listdir(dest):
            raise FileExistsError(
                errno.ENOTEMPTY, "checkout destination is not empty", dest
            ) from None
        return False
    return True


def _remove_written(dest: str, created: bool) -> None:
    """Undo a failed checkout: remove ``dest`` if it was created, else empty it again."""
    if created:
        shutil.rmtree(dest, ignore_errors=True)  # never follows a symlink
        return
    with contextlib.suppress(OSError), os.scandir(dest) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _write_tree(
    directories: dict[Digest, Listing], root: Digest, dest: str, writer: _FileWriter
) -> None:
    """Create every directory and symlink, depth first, handing the files to ``writer``.

    A directory's subdirectories are created before its symlinks: on a case-insensitive file
    system a symlink ``A`` next to a directory ``a`` then fails to be created, instead of
    sending the writes meant for ``a/`` through it. Files are opened with ``O_EXCL`` and
    linked with ``link``, which never follow a symlink in their place.
    """
    stack = [(dest, root)]
    while stack:
        path, digest = stack.pop()
        directory = directories[digest]
        children = [(os.path.join(path, name), child) for name, child in directory.directories]
        current = path
        try:
            for current, _ in children:
                os.mkdir(current)
            for name, target in directory.symlinks:
                current = os.path.join(path, name)
                os.symlink(target, current)
        except OSError as exc:
            raise CheckoutError(tree_path(dest, current), exc) from exc
        writer.add(path, directory)
        stack.extend(reversed(children))


class _FileWriter:
    """Writes the files of the directories it is given, in batches of the runner's tasks.

    At most a few batches per job are in flight at once, so a tree of millions of files
    never sits in memory as a list. Files the file system refuses to hardlink (and ``strict``
    is false) come back from the tasks and are copied instead.

    With ``beside`` (links with helpers), this process works too: it keeps each helper two
    batches ahead and runs the others itself, instead of waiting, so it never waits for a
    helper still starting; batches no helper has taken when the tree is walked are taken
    back and run here.
    """

    def __init__(
        self,
        runner: Runner | CheckoutThreads | InlineRunner,
        dest: str,
        *,
        jobs: int,
        use_links: bool,
        strict: bool,
        progress: Progress,
        beside: InlineRunner | None = None,
    ) -> None:
        self.runner = runner
        self.beside = beside
        self.ahead = 2 * getattr(runner, "jobs", 1)  # batches given to helpers at once
        # What each batch given to a helper holds, until it is answered: to take it back.
        self.given: dict[int, tuple[Callable[[VerifiedBlobs, Any], tuple[int, list[Copy]]],
                                    Any]] = {}
        self.dest = dest
        self.use_links = use_links
        self.strict = strict
        self.progress = progress
        self.max_pending = 2 * max(1, jobs) + 2
        self.pending: deque[Pending[tuple[int, list[Copy]]]] = deque()
        self.links: LinkTask = []
        self.link_count = 0
        self.copies: list[Copy] = []
        self.copy_bytes = 0

    def add(self, path: str, directory: Listing) -> None:
        files = directory.files
        if not files:
            return
        # Every file digest of these very listings was validated when the tree was measured,
        # before anything was written: the entries go to the tasks as the decoder made them.
        links = files
        if self.use_links:
            _, _, sizes, executables = zip(*files, strict=True)
            if 0 in sizes or any(executables):  # copied: an empty or executable file
                links = [f for f in files if f[2] and not f[3]]
                self._copy(path, [f for f in files if not f[2] or f[3]])
        else:
            links = []
            self._copy(path, files)
        if links:
            self.links.append((path, links))
            self.link_count += len(links)
            if self.link_count >= _BATCH_FILES:
                self._flush_links()

    def _copy(self, path: str, files: list[FileEntry]) -> None:
        trusted = Digest._trusted
        for name, hash_, size, executable in files:
            self.copies.append((os.path.join(path, name), trusted(hash_, size), executable))
            self.copy_bytes += size
            if len(self.copies) >= _BATCH_FILES or self.copy_bytes >= _BATCH_BYTES:
                self._flush_copies()

    def finish(self) -> None:
        """Write what is left and wait for every batch, copies of refused links included."""
        self._flush_links()
        if self.beside is not None:
            self._take_back()
        while True:
            self._flush_copies()
            if not self.pending:
                return
            while self.pending:
                self._collect()

    def _flush_links(self) -> None:
        if self.links:
            task, self.links, self.link_count = self.links, [], 0
            self._submit(link_files, (self.dest, self.strict, task))

    def _flush_copies(self) -> None:
        if self.copies:
            batch, self.copies, self.copy_bytes = self.copies, [], 0
            self._submit(copy_files, (self.dest, batch))

    def _submit(
        self, task: Callable[[VerifiedBlobs, _T], tuple[int, list[Copy]]], work: _T
    ) -> None:
        if self.beside is not None:
            while self.pending and self.pending[0].done():  # type: ignore[attr-defined]
                self._collect()
            if len(self.pending) >= self.ahead:
                self._done(self.beside.submit(task, work).result())
                return
        while len(self.pending) >= self.max_pending:
            self._collect()
        pending = self.runner.submit(task, work)
        self.pending.append(pending)
        if self.beside is not None:
            self.given[id(pending)] = (task, work)

    def _take_back(self) -> None:
        """Run here the batches no helper has started (a helper may still be starting), and
        from now on every batch (the copies of refused links)."""
        assert self.beside is not None
        self.ahead = 0
        waiting: deque[Pending[tuple[int, list[Copy]]]] = deque()
        for pending in self.pending:
            if pending.cancel():  # type: ignore[attr-defined]  # a Future: not started yet
                task, work = self.given.pop(id(pending))
                waiting.append(self.beside.submit(task, work))
            else:
                waiting.append(pending)
        self.pending = waiting

    def _collect(self) -> None:
        """Wait for the oldest batch; keep the files it could not link, to copy them."""
        pending = self.pending.popleft()
        self.given.pop(id(pending), None)
        self._done(pending.result())

    def _done(self, result: tuple[int, list[Copy]]) -> None:
        written, refused = result
        self.progress.advance(written)
        for item in refused:
            self.copies.append(item)
            self.copy_bytes += item[1].size
