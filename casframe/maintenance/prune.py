"""prune: delete every blob no ref reaches once it is older than the grace period."""

from __future__ import annotations

import time

from casframe.blobs import VerifiedBlobs
from casframe.maintenance.marking import (
    account,
    check_grace,
    delete_unless_fresh,
    list_blobs,
    mark,
    require,
    sweep_emptied,
    sweep_plan,
)
from casframe.maintenance.reports import PruneReport
from casframe.progress import NO_PROGRESS, Progress
from casframe.refkinds import refs_by_use
from casframe.spi import Capability, RefCapability, RefStore

__all__ = ["prune"]


def prune(
    blobs: VerifiedBlobs,
    refs: RefStore,
    *,
    grace_period: float = 3600.0,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> PruneReport:
    """Delete every blob that no ref reaches and that is older than ``grace_period`` seconds.

    Also removes what interrupted uploads left behind (``BlobStore.clean_temp``) when it is
    older than the grace period. A dry run deletes nothing, reports what would go and,
    for every ref, the bytes only that ref keeps alive.
    """
    grace_period = check_grace(grace_period)
    require(
        blobs, refs, "prune", Capability.LIST, RefCapability.LIST,
        *(() if dry_run else (Capability.DELETE,)),
    )
    progress = progress or NO_PROGRESS
    started = time.time()
    # The store's clock, which stamped the times the cutoff is compared with: a prune run
    # from a machine whose clock is ahead of the bucket's must not shorten the grace period.
    cutoff = blobs.backend.now() - grace_period
    report = PruneReport(grace_period=grace_period, dry_run=dry_run)

    # Mark first, so the listing can skip what is reachable (a local store then need not
    # stat it); read the refs again after the listing, so a ref set meanwhile is seen.
    marking = mark(blobs, refs, per_ref=dry_run, progress=progress)
    sizes = {key[0]: key[1] for key in marking.marked if key[1]}  # hash -> size trees name
    reached: list[str] = []

    def skip(hash_: str) -> bool:
        if hash_ in sizes:
            reached.append(hash_)
            return True
        return False

    emptied: dict[str, float] = {}
    stored = list_blobs(blobs, progress, skip, emptied)  # only blobs no ref reached
    present = {(hash_, sizes[hash_]) for hash_ in reached}
    account(blobs, marking, present | stored.keys())
    seen = {(ref.name, ref.digest) for ref in marking.refs}
    for ref in refs_by_use(refs):
        if (ref.name, ref.digest) not in seen:  # set or moved while the listing ran
            marking.follow(ref)
    report.refs_checked = len(marking.refs)
    report.problems = marking.problems
    report.refs = marking.usage
    report.objects_scanned = report.objects_reachable = len(present)
    report.bytes_scanned = report.bytes_reachable = sum(key[1] for key in present)
    doomed = sweep_plan(stored, marking.marked.__contains__, cutoff, report)
    doomed = sorted(doomed + sweep_emptied(emptied, cutoff, report))
    if not dry_run:
        delete_unless_fresh(blobs, doomed, cutoff, report, progress)
    report.temp_files_removed, report.temp_bytes_removed = blobs.backend.clean_temp(
        cutoff, dry_run=dry_run
    )
    report.seconds = time.time() - started
    return report
