"""fsck: verify every blob and everything every ref keeps alive; repair deletes corrupt blobs."""

from __future__ import annotations

import time
from collections.abc import Iterable

from casframe.blobs import VerifiedBlobs
from casframe.digest import CHUNK_SIZE, Digest
from casframe.errors import BlobNotFoundError, CorruptBlobError
from casframe.maintenance.marking import BlobKey, emptied_digest, list_blobs, require
from casframe.maintenance.reports import FsckProblem, FsckReport
from casframe.progress import NO_PROGRESS, Progress
from casframe.refkinds import READ_BATCH, RefReach, refs_by_use
from casframe.spi import Capability, RefCapability, RefInfo, RefStore

__all__ = ["fsck"]


class _Problems:
    """fsck's problems, one per (kind, digest), each with the refs that contain it."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, Digest], FsckProblem] = {}
        #: For corrupt blobs: the stored (listed) digest to re-check and delete on repair.
        self.stored_as: dict[Digest, Digest] = {}

    def add(self, kind: str, digest: Digest, detail: str) -> None:
        if (kind, digest) not in self.by_key:
            self.by_key[(kind, digest)] = FsckProblem(kind, digest, detail)

    def discard(self, kind: str, digest: Digest) -> None:
        self.by_key.pop((kind, digest), None)

    def of_kind(self, kind: str) -> list[FsckProblem]:
        return [p for (k, _), p in self.by_key.items() if k == kind]


def _verify(
    blobs: VerifiedBlobs, digests: list[Digest], problems: _Problems, report: FsckReport,
    progress: Progress,
) -> None:
    """Read every blob through the verifying paths; record the corrupt ones."""
    progress.start("verify", sum(d.size for d in digests), unit="B")
    small = [d for d in digests if d.size <= CHUNK_SIZE]
    large = [d for d in digests if d.size > CHUNK_SIZE]
    batch: list[Digest] = []
    batch_bytes = 0
    for digest in small:
        batch.append(digest)
        batch_bytes += digest.size
        if len(batch) >= READ_BATCH or batch_bytes >= blobs.backend.limits.max_batch_bytes:
            _verify_batch(blobs, batch, problems, report, progress)
            batch, batch_bytes = [], 0
    _verify_batch(blobs, batch, problems, report, progress)
    buffer = bytearray(CHUNK_SIZE)
    for digest in large:
        try:
            with blobs.open_read(digest) as stream:
                while n := stream.readinto(buffer):  # type: ignore[attr-defined]
                    progress.advance(n)
        except CorruptBlobError as exc:
            problems.add("corrupt", digest, exc.detail)
            problems.stored_as[digest] = digest
        except BlobNotFoundError:
            continue  # deleted since it was listed
        report.blobs_checked += 1
        report.bytes_checked += digest.size
    progress.finish()


def _verify_batch(
    blobs: VerifiedBlobs, batch: list[Digest], problems: _Problems, report: FsckReport,
    progress: Progress,
) -> None:
    if not batch:
        return
    try:
        checked = [d for d, _ in blobs.read_many(batch)]
    except (BlobNotFoundError, CorruptBlobError):
        checked = []
        for digest in batch:  # find out which ones, one by one
            try:
                blobs.read_bytes(digest)
            except CorruptBlobError as exc:
                problems.add("corrupt", digest, exc.detail)
                problems.stored_as[digest] = digest
            except BlobNotFoundError:
                continue  # deleted since it was listed
            checked.append(digest)
    report.blobs_checked += len(checked)
    report.bytes_checked += sum(d.size for d in checked)
    progress.advance(sum(d.size for d in batch))


def _merge_resized(stored: Iterable[BlobKey], problems: _Problems) -> None:
    """Report an object stored under the right hash but with another size once, as corrupt.

    The listing shows such an object under its actual size (its own corrupt problem) while the
    trees ask for the size they name (missing, or corrupt on read): one object, one problem,
    under the digest the trees need.
    """
    by_hash = {key[0]: key for key in stored}
    for problem in list(problems.by_key.values()):
        if problem.kind not in ("missing", "corrupt"):
            continue
        other_key = by_hash.get(problem.digest.hash)
        if other_key is None or other_key == problem.digest:
            continue
        other = Digest(*other_key) if other_key[1] else emptied_digest(other_key[0])
        problems.discard(problem.kind, problem.digest)
        problems.discard("corrupt", other)
        problems.stored_as.pop(other, None)
        problems.add("corrupt", problem.digest, f"stored object has {other.size} bytes")
        problems.stored_as[problem.digest] = other


def _still_corrupt(blobs: VerifiedBlobs, digest: Digest, victim: Digest) -> bool:
    """Re-read just before a repair deletes: a writer may have replaced a truncated object."""
    if not victim.size:  # an emptied object, which no read path would read (size 0)
        return not blobs.backend.find_missing_blobs([victim])
    try:
        with blobs.open_read(digest) as stream:
            while stream.read(CHUNK_SIZE):
                pass
    except CorruptBlobError:
        return True
    except BlobNotFoundError:
        return False
    return False


def fsck(
    blobs: VerifiedBlobs, refs: RefStore, *, repair: bool = False,
    progress: Progress | None = None,
) -> FsckReport:
    """Check every blob's size and hash and everything every ref keeps alive.

    Problems found, each with its digest and the refs that contain it: ``corrupt`` (content
    does not match the digest), ``missing`` (a ref needs a blob that is not stored),
    ``not-a-directory`` (a tree names a Directory that does not decode), ``unsafe`` (a Directory
    with a name checkout would refuse), ``not-canonical`` (entries not sorted by name),
    ``not-an-action-result`` / ``not-a-tree`` (an action-cache ref's messages do not decode),
    ``invalid-digest`` (a message names a malformed digest). A backend that cannot list gets
    every check, with blob verification limited to blobs the refs reach.

    ``repair`` deletes corrupt blobs, and nothing else; the report then names the refs whose
    trees are incomplete, so they can be pushed again from elsewhere or deleted.
    """
    require(blobs, refs, "fsck", RefCapability.LIST)
    if repair:
        require(blobs, refs, "fsck --repair", Capability.DELETE)
    progress = progress or NO_PROGRESS
    started = time.time()
    listed = blobs.has(Capability.LIST)
    report = FsckReport(repair=repair, listed=listed)
    problems = _Problems()

    stored: dict[BlobKey, float] | None = None
    emptied: dict[str, float] = {}
    if listed:
        stored = _verify_listed(blobs, problems, report, emptied, progress)

    checked_refs = refs_by_use(refs)
    trees, closures = _follow_refs(blobs, checked_refs, problems, report, progress)

    # With check=True every key is a valid digest (invalid ones were reported and dropped).
    reachable = {
        Digest(*key)
        for key in set().union(*closures)
        if key[1] and key not in trees.problems and (stored is None or key not in stored)
    }
    missing = blobs.find_missing(reachable)  # with a listing: only what it did not show
    for digest in missing:
        problems.add("missing", digest, "blob is not stored")
    if stored is not None:
        _merge_resized(stored.keys() | {(h, 0) for h in emptied}, problems)
    else:  # nothing was verified yet: verify what the refs reach
        read = trees.nodes.keys() | trees.verified  # verified as they were read
        present = sorted(d for d in reachable - missing if (d.hash, d.size) not in read)
        _verify(blobs, present, problems, report, progress)
        report.blobs_checked += len(read)

    if repair:
        _repair(blobs, problems, report)
    _attribute(checked_refs, closures, problems, report)
    report.seconds = time.time() - started
    return report


def _verify_listed(
    blobs: VerifiedBlobs, problems: _Problems, report: FsckReport, emptied: dict[str, float],
    progress: Progress,
) -> dict[BlobKey, float]:
    """List and verify every stored blob; return the listing (emptied objects: ``emptied``)."""
    stored = list_blobs(blobs, progress, emptied=emptied)
    for hash_ in sorted(emptied):  # known corrupt without reading them
        victim = emptied_digest(hash_)
        problems.add("corrupt", victim, "stored object is empty (0 bytes): its content is lost")
        problems.stored_as[victim] = victim
    _verify(blobs, sorted(Digest(*key) for key in stored), problems, report, progress)
    report.warnings = list(blobs.backend.iter_strays())
    return stored


def _follow_refs(
    blobs: VerifiedBlobs, refs: list[RefInfo], problems: _Problems, report: FsckReport,
    progress: Progress,
) -> tuple[RefReach, list[set[BlobKey]]]:
    """What each ref keeps alive, checking every message on the way."""
    report.refs_checked = len(refs)
    trees = RefReach(blobs, check=True)
    closures: list[set[BlobKey]] = []
    progress.start("trees", len(refs), unit="refs")
    for ref in refs:
        closures.append(set(trees.reach_ref(ref, set(), set())))
        progress.advance(1)
    progress.finish()
    report.directories_checked = len(trees.nodes)
    for key, recorded in trees.problems.items():
        for kind, detail in recorded:
            problems.add(kind, Digest(*key), detail)
            if kind == "corrupt":
                problems.stored_as.setdefault(Digest(*key), Digest(*key))
    return trees, closures


def _repair(blobs: VerifiedBlobs, problems: _Problems, report: FsckReport) -> None:
    """Delete the corrupt blobs that are still corrupt."""
    for problem in problems.of_kind("corrupt"):
        victim = problems.stored_as.get(problem.digest, problem.digest)
        if _still_corrupt(blobs, problem.digest, victim):
            blobs.backend.delete_blobs([victim])
            report.deleted.append(problem.digest)


def _attribute(
    refs: list[RefInfo], closures: list[set[BlobKey]], problems: _Problems, report: FsckReport
) -> None:
    """Name the refs each problem concerns, and the refs left incomplete; fill the report."""
    absent = {(d.hash, d.size) for d in report.deleted}
    absent.update((p.digest.hash, p.digest.size) for p in problems.of_kind("missing"))
    by_digest: dict[BlobKey, list[FsckProblem]] = {}
    for problem in problems.by_key.values():
        by_digest.setdefault((problem.digest.hash, problem.digest.size), []).append(problem)
    for ref, closure in zip(refs, closures, strict=True):
        for key in closure & by_digest.keys():
            for found in by_digest[key]:
                found.refs.append(ref.name)
        if closure & absent:
            report.incomplete_refs.append(ref.name)
    report.problems = sorted(problems.by_key.values(), key=lambda p: (p.kind, p.digest))
    report.incomplete_refs.sort()
