"""What prune, gc and du share: listing the stored blobs, marking what the refs keep alive,
accounting per ref, planning and doing the sweep."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from casframe.blobs import VerifiedBlobs
from casframe.digest import Digest
from casframe.errors import BackendContractError, InvalidDigestError
from casframe.maintenance.reports import PruneReport, RefProblem, RefUsage
from casframe.progress import Progress
from casframe.refkinds import BlobKey, RefReach, refs_by_use
from casframe.spi import Capability, RefCapability, RefInfo, RefStore, require_capabilities

# Digests per delete_blobs call: fine-grained enough for a progress bar, and S3's DeleteObjects
# takes at most 1000 keys, so a backend can map one call to one request.
_DELETE_BATCH = 1000
# Listed blobs between two progress updates (progress objects may lock or redraw).
_PROGRESS_STEP = 1024

__all__ = [
    "BlobKey",
    "Marking",
    "account",
    "check_grace",
    "delete_unless_fresh",
    "emptied_digest",
    "list_blobs",
    "mark",
    "require",
    "sweep_emptied",
    "sweep_plan",
]


def require(
    blobs: VerifiedBlobs, refs: RefStore, operation: str, *capabilities: Capability | RefCapability
) -> None:
    """Refuse ``operation`` before it touches anything when the store lacks ``capabilities``."""
    require_capabilities(blobs.backend, refs, operation, *capabilities, where=blobs.url)


def check_grace(grace_period: float) -> float:
    if grace_period < 0:
        raise ValueError(f"invalid grace period {grace_period!r}: must not be negative")
    return float(grace_period)


#: A blob's identity as a plain ``(hash, size)`` tuple, made straight from the listing and from
#: Directory messages without building a checked Digest for each blob (only deletion candidates
#: and problems become Digests). A Digest is such a tuple underneath, so both kinds find each
#: other in the same sets and dicts.


def list_blobs(
    blobs: VerifiedBlobs,
    progress: Progress,
    skip: Callable[[str], bool] | None = None,
    emptied: dict[str, float] | None = None,
) -> dict[BlobKey, float]:
    """Stored blobs with their modification times, but those ``skip(hash)`` is true for.

    The empty blob is never listed. Emptied objects (0 bytes under another hash) are no blobs:
    they go to ``emptied`` (hash → modification time) when it is given.
    """
    stored: dict[BlobKey, float] = {}
    empty_hash = blobs.function.empty_hash
    progress.start("scan", None, unit="objects")
    step = _PROGRESS_STEP
    count = 0
    # Plain tuples: this loop runs once per stored blob, and objects would cost more than the
    # backend's own work (a stat per blob on a local disk).
    for count, (hash_, size, mtime) in enumerate(blobs.backend.iter_blob_stats(skip), 1):
        if size:
            stored[(hash_, size)] = mtime
        elif emptied is not None and hash_ != empty_hash:
            emptied[hash_] = mtime
        if not count % step:
            progress.advance(step)
    progress.advance(count % step)
    progress.finish()
    return stored


@dataclass
class Marking:
    """Everything the refs keep alive, per ref as well when sizing refs."""

    refs: list[RefInfo]
    trees: RefReach
    per_ref: bool
    marked: set[BlobKey] = field(default_factory=set)
    #: For each ref, what it reaches (per ref), or what it reached first (one shared walk).
    closures: list[list[BlobKey]] = field(default_factory=list)
    #: Per ref: how many refs reach each blob.
    counts: Counter[BlobKey] = field(default_factory=Counter)
    usage: list[RefUsage] = field(default_factory=list)
    problems: list[RefProblem] = field(default_factory=list)
    dirs_seen: set[BlobKey] = field(default_factory=set)

    def follow(self, ref: RefInfo) -> list[BlobKey]:
        """Mark what ``ref`` keeps alive; return what it added (per ref: all it reaches)."""
        if self.per_ref:
            closure = self.trees.reach_ref(ref, set(), set())
            self.counts.update(closure)
            self.marked.update(closure)
        else:  # one shared walk: each problem is reported for the first ref that reaches it
            closure = self.trees.reach_ref(ref, self.marked, self.dirs_seen)
        problems = self.trees.problems
        for key in problems.keys() & closure if problems else ():
            self.problems += [
                RefProblem(ref.name, Digest(*key), kind, detail) for kind, detail in problems[key]
            ]
        return closure


def mark(blobs: VerifiedBlobs, refs: RefStore, *, per_ref: bool, progress: Progress) -> Marking:
    """Mark every blob the refs reach; ``per_ref`` keeps each ref's closure for sizing."""
    listed = refs_by_use(refs)  # least recently used first
    marking = Marking(listed, RefReach(blobs), per_ref)
    progress.start("mark", len(listed), unit="refs")
    for ref in listed:
        marking.closures.append(marking.follow(ref))
        progress.advance(1)
    progress.finish()
    return marking


def account(blobs: VerifiedBlobs, marking: Marking, present: set[BlobKey]) -> None:
    """Given the blobs the listing showed, report missing ones and size each ref (per ref)."""
    problems = marking.trees.problems
    suspects: list[tuple[str, BlobKey]] = []  # (ref, blob) absent from the listing
    present_of_ref: list[set[BlobKey]] = []
    for ref, closure in zip(marking.refs, marking.closures, strict=True):
        # Set operations run in C: these touch every reachable blob once per ref.
        reached = set(closure)
        here = reached & present
        if marking.per_ref:
            present_of_ref.append(here)
        if len(here) != len(reached):
            suspects += [
                (ref.name, key) for key in reached - here if key[1] and key not in problems
            ]
    if suspects:  # absent from the listing: missing, unless stored after it
        digests = {}
        for _, key in suspects:
            try:
                digests[key] = Digest(*key)
            except InvalidDigestError:
                continue  # a malformed name in a Directory: fsck reports those
        missing = blobs.find_missing(digests.values())
        marking.problems += [
            RefProblem(name, digests[key], "missing", "blob is not stored")
            for name, key in suspects
            if key in digests and digests[key] in missing
        ]
    if marking.per_ref:
        only_one = {key for key, n in marking.counts.items() if n == 1}
        for ref, here in zip(marking.refs, present_of_ref, strict=True):
            exclusive = here & only_one
            marking.usage.append(
                RefUsage(
                    name=ref.name,
                    digest=ref.digest,
                    accessed=ref.accessed,
                    total_objects=len(here),
                    total_bytes=sum(key[1] for key in here),
                    exclusive_objects=len(exclusive),
                    exclusive_bytes=sum(key[1] for key in exclusive),
                )
            )


def sweep_plan(
    stored: dict[BlobKey, float],
    is_live: Callable[[BlobKey], object],
    cutoff: float,
    report: PruneReport,
) -> list[Digest]:
    """Fill the counts of ``report`` and return the blobs to delete, in hash order.

    Hash order deletes a local store's objects folder by folder, as ``git prune`` does; in
    listing or age order every delete would touch another directory.
    """
    candidates: list[BlobKey] = []
    live_objects = live_bytes = young_objects = young_bytes = freed_bytes = 0
    for key, mtime in stored.items():
        if is_live(key):
            live_objects += 1
            live_bytes += key[1]
        elif mtime >= cutoff:
            young_objects += 1
            young_bytes += key[1]
        else:
            candidates.append(key)
            freed_bytes += key[1]
    report.objects_scanned += len(stored)
    report.bytes_scanned += live_bytes + young_bytes + freed_bytes
    report.objects_reachable += live_objects
    report.bytes_reachable += live_bytes
    report.objects_kept_young += young_objects
    report.bytes_kept_young += young_bytes
    report.objects_freed += len(candidates)
    report.bytes_freed += freed_bytes
    candidates.sort()
    return [Digest(*key) for key in candidates]


def emptied_digest(hash_: str) -> Digest:
    """What names an emptied object for the backend: its hash with size 0.

    No blob has that digest (the constructor refuses it); ``delete_blobs`` and
    ``find_missing_blobs`` accept it for objects ``iter_blob_stats`` listed so.
    """
    return Digest._trusted(hash_, 0)


def sweep_emptied(emptied: dict[str, float], cutoff: float, report: PruneReport) -> list[Digest]:
    """Emptied objects no ref reached (those are skipped by the listing): garbage like any
    unreachable blob, deleted once older than the cutoff. They count as objects of 0 bytes."""
    doomed = [emptied_digest(h) for h, mtime in emptied.items() if mtime < cutoff]
    report.objects_scanned += len(emptied)
    report.objects_kept_young += len(emptied) - len(doomed)
    report.objects_freed += len(doomed)
    return doomed


def delete_unless_fresh(
    blobs: VerifiedBlobs, digests: list[Digest], cutoff: float, report: PruneReport,
    progress: Progress,
) -> None:
    """Delete ``digests`` if still older than ``cutoff``; what a writer stored or touched since
    the listing is spared, and the report moves it from freed to kept young."""
    progress.start("delete", len(digests), unit="objects")
    for start in range(0, len(digests), _DELETE_BATCH):
        batch = digests[start : start + _DELETE_BATCH]
        deleted = blobs.backend.delete_blobs(batch, older_than=cutoff)
        if deleted is None:  # what the older contract allowed for "cannot tell"
            raise BackendContractError(
                f"{type(blobs.backend).__name__}.delete_blobs returned None: it must return the "
                "digests it deleted, so that prune reports what it freed"
            )
        gone = set(deleted)
        spared = [d for d in batch if d not in gone]
        spared_bytes = sum(d.size for d in spared)
        report.objects_freed -= len(spared)
        report.bytes_freed -= spared_bytes
        report.objects_kept_young += len(spared)
        report.bytes_kept_young += spared_bytes
        progress.advance(len(batch))
    progress.finish()
