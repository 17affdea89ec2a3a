"""Copy the closure of a tree (by digest or ref) from any store to any other.

Order is what makes an interrupted transfer harmless: the destination is asked what it lacks,
files go first, then Directories children before parents, and the ref is set last (by the
caller, :class:`casframe.store.Store`, once :func:`transfer` has returned). Rerunning copies
only what is still missing. Every blob is verified as it arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casframe.blobs import VerifiedBlobs
from casframe.digest import CHUNK_SIZE, Digest
from casframe.errors import BlobNotFoundError
from casframe.progress import NO_PROGRESS, Progress
from casframe.spi import Capability
from casframe.tree import iter_tree

if TYPE_CHECKING:
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory

__all__ = ["REFRESH_AFTER", "TransferResult", "copy_blobs", "transfer"]

#: Seconds after which a transfer touches its whole closure again before setting the ref. Every
#: blob of the closure was touched or stored after the transfer began, so a shorter transfer is
#: safe beside any prune whose grace period is longer than this; a longer one refreshes them
#: (on S3 a touch is a server-side copy of the object, so it is not done needlessly).
REFRESH_AFTER = 60.0


@dataclass(frozen=True)
class TransferResult:
    """What a transfer did. ``blobs_sent == 0`` means the destination already had everything."""

    root: Digest
    ref: str | None
    blobs_total: int
    blobs_sent: int
    bytes_sent: int

    @property
    def already_present(self) -> bool:
        return self.blobs_sent == 0


def _by_height(root: Digest, directories: dict[Digest, Directory]) -> list[list[Digest]]:
    """Directories grouped by height: first those without subdirectories, then those whose
    subdirectories are all in earlier groups, and so on up to the root.

    Storing the groups in order stores every Directory after everything it contains, while a
    whole group can go in one batch call (a tree of depth N takes N+1 groups, not one call per
    Directory).
    """
    height: dict[Digest, int] = {}
    stack: list[tuple[Digest, bool]] = [(root, False)]
    while stack:
        digest, children_done = stack.pop()
        if digest in height:
            continue
        children = [Digest(n.digest.hash, n.digest.size_bytes)
                    for n in directories[digest].directories]
        if children_done:
            height[digest] = 1 + max((height[c] for c in children), default=-1)
            continue
        stack.append((digest, True))
        stack.extend((c, False) for c in children if c not in height)
    groups: list[list[Digest]] = [[] for _ in range(height[root] + 1)]
    for digest, level in height.items():
        groups[level].append(digest)
    return groups


def copy_blobs(
    source: VerifiedBlobs,
    dest: VerifiedBlobs,
    digests: list[Digest],
    *,
    on_done: Callable[[int], None] | None = None,
) -> None:
    """Copy blobs concurrently: small ones in backend batches, large ones streamed."""
    limit = min(source.backend.limits.max_batch_bytes, dest.backend.limits.max_batch_bytes)
    batch_limit = max(CHUNK_SIZE, limit)
    batches: list[list[Digest]] = []
    large: list[Digest] = []
    current: list[Digest] = []
    current_bytes = 0
    for digest in sorted(digests, key=lambda d: d.size):
        if digest.size > CHUNK_SIZE:
            large.append(digest)
            continue
        if current and (current_bytes + digest.size > batch_limit or len(current) >= 1000):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(digest)
        current_bytes += digest.size
    if current:
        batches.append(current)

    def copy_batch(batch: list[Digest]) -> None:
        # read_many has verified every blob against its digest: store them without hashing
        # them a second time.
        dest.write_hashed(source.read_many(batch))
        if on_done:
            on_done(sum(d.size for d in batch))

    def copy_large(digest: Digest) -> None:
        dest.copy_blob_from(source, digest)
        if on_done:
            on_done(digest.size)

    workers = max(source.backend.limits.max_concurrency, dest.backend.limits.max_concurrency)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(copy_large, d) for d in large]
        futures += [pool.submit(copy_batch, b) for b in batches]
        for future in futures:
            future.result()


def transfer(
    source: VerifiedBlobs,
    dest: VerifiedBlobs,
    root: Digest,
    *,
    ref: str | None = None,
    progress: Progress | None = None,
) -> TransferResult:
    """Copy ``root``'s closure from ``source`` to ``dest``.

    With ``ref`` (the ref the caller sets in ``dest`` once this returns), the closure is also
    made sure to be still present and fresh enough for prune's grace period to protect it.
    Stores of different digest functions are refused before anything is read
    (:class:`~casframe.errors.UnsupportedDigestFunctionError`): nothing is ever re-hashed.
    """
    dest.require_same_function(source)
    progress = progress or NO_PROGRESS
    directories: dict[Digest, Directory] = {}
    blobs_of_dirs: dict[Digest, bytes] = {}
    for digest, data, directory in iter_tree(source, root):
        directories[digest] = directory
        blobs_of_dirs[digest] = data
    files: set[Digest] = set()
    for directory in directories.values():
        files.update(Digest(n.digest.hash, n.digest.size_bytes) for n in directory.files)
    closure = files | directories.keys()
    started = time.monotonic()
    missing = dest.find_missing(closure, freshen=True)

    missing_files = [d for d in files if d in missing]
    missing_dirs = [[d for d in group if d in missing] for group in _by_height(root, directories)]
    total_bytes = sum(d.size for d in missing_files) + sum(
        d.size for group in missing_dirs for d in group
    )
    progress.start("transfer", total_bytes, unit="B")
    copy_blobs(source, dest, missing_files, on_done=progress.advance)
    # Children before parents, a whole height at a time, so a stored Directory is always
    # complete.
    for group in missing_dirs:
        dest.put_many([(digest, blobs_of_dirs[digest]) for digest in group])
        progress.advance(sum(d.size for d in group))
    if ref is not None:
        long = time.monotonic() - started > REFRESH_AFTER
        if long or not dest.has(Capability.TOUCH):
            # With ``touch``, every blob of the closure was touched (and then found present)
            # or stored since ``started``: a prune whose grace period is longer than
            # REFRESH_AFTER spares them all, so a short transfer sets its ref at once. A long
            # one touches the closure again and re-checks it, and a destination that cannot
            # touch re-checks it in any case: a prune may have removed blobs found or sent
            # early, and the ref must not point at an incomplete tree.
            lost = dest.find_missing(closure, freshen=True)
            if lost:
                raise BlobNotFoundError(
                    lost,
                    f"{dest.url} (a concurrent prune removed them during the transfer; rerun it)",
                )
    progress.finish()
    return TransferResult(
        root=root,
        ref=ref,
        blobs_total=sum(1 for d in files | directories.keys() if d.size),
        blobs_sent=len(missing_files) + sum(len(group) for group in missing_dirs),
        bytes_sent=total_bytes,
    )
