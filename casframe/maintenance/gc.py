"""gc: keep a store under a quota by expiring least recently used refs, then pruning."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from casframe.blobs import VerifiedBlobs
from casframe.errors import RefNotFoundError
from casframe.maintenance.marking import (
    BlobKey,
    Marking,
    account,
    check_grace,
    list_blobs,
    mark,
    require,
    sweep_plan,
)
from casframe.maintenance.prune import prune
from casframe.maintenance.reports import GcReport, PruneReport
from casframe.progress import NO_PROGRESS, Progress
from casframe.spi import Capability, RefCapability, RefInfo, RefStore
from casframe.units import parse_size

__all__ = ["gc"]


def gc(
    blobs: VerifiedBlobs,
    refs: RefStore,
    *,
    max_size: int | str,
    low_watermark: float = 0.8,
    keep: Iterable[str] = (),
    grace_period: float = 3600.0,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> GcReport:
    """Keep the store under a quota: expire least recently used refs, then prune.

    When the stored bytes exceed ``max_size``, refs are deleted least recently used first —
    never one matching a ``keep`` pattern (``fnmatch``, e.g. ``release/*``) — until the bytes
    that would remain after pruning (reachable from the remaining refs, or younger than the
    grace period) fall to ``low_watermark × max_size``. Then a normal prune runs (in a dry run,
    its outcome is predicted instead).
    """
    limit = parse_size(max_size)
    if limit <= 0:
        raise ValueError(f"invalid max size {max_size!r}: must be positive")
    if not 0 < low_watermark <= 1:
        raise ValueError(f"invalid low watermark {low_watermark!r}: must be in (0, 1]")
    check_grace(grace_period)
    require(
        blobs,
        refs,
        "gc",
        Capability.LIST,
        RefCapability.LIST,
        *(() if dry_run else (Capability.DELETE, RefCapability.DELETE)),
    )
    progress = progress or NO_PROGRESS
    cutoff = blobs.backend.now() - check_grace(grace_period)

    stored = list_blobs(blobs, progress)
    total = sum(key[1] for key in stored)
    report = GcReport(
        max_size=limit,
        low_watermark=low_watermark,
        dry_run=dry_run,
        objects_before=len(stored),
        bytes_before=total,
        target_bytes=int(limit * low_watermark),
        over_quota=total > limit,
        predicted_bytes=total,
        reached_target=True,
    )
    if not report.over_quota:
        report.prune = prune(
            blobs, refs, grace_period=grace_period, dry_run=dry_run, progress=progress
        )
        report.predicted_bytes = total - report.prune.bytes_freed
        return report

    marking = mark(blobs, refs, per_ref=True, progress=progress)
    account(blobs, marking, set(stored))
    _expire(refs, marking, stored, cutoff, tuple(keep), report)
    if dry_run:
        report.prune = _predicted_prune(marking, stored, cutoff, grace_period, report)
    else:
        # A fresh mark and sweep: refs set by writers since the listing above are seen.
        report.prune = prune(blobs, refs, grace_period=grace_period, progress=progress)
    return report


def _expire(
    refs: RefStore, marking: Marking, stored: dict[BlobKey, float], cutoff: float,
    patterns: tuple[str, ...], report: GcReport,
) -> None:
    """Delete refs least recently used first (in a dry run: pretend to) while the bytes a prune
    would keep exceed the target; fill in what was expired and the prediction."""
    counts = marking.counts
    trees = marking.trees

    def protected(ref: RefInfo) -> bool:
        return any(fnmatch.fnmatchcase(ref.name, pattern) for pattern in patterns)

    def remaining_bytes(live: Callable[[BlobKey], object]) -> int:
        """Stored bytes a prune would keep: young, or reachable according to ``live``."""
        return sum(key[1] for key, mtime in stored.items() if mtime >= cutoff or live(key))

    predicted = remaining_bytes(counts.get)
    # What no expiry can remove: young blobs and what kept refs reach. Expiring stops there
    # too, so refs whose deletion would free nothing (yet) are left alone.
    kept_reach: set[BlobKey] = set()
    for ref in marking.refs:
        if protected(ref):
            trees.reach_ref(ref, kept_reach, set())  # cached: no reads
    floor = remaining_bytes(kept_reach.__contains__)
    stop_at = max(report.target_bytes, floor)
    for ref, usage in zip(marking.refs, marking.usage, strict=True):
        if predicted <= stop_at:
            break
        if protected(ref):
            report.refs_kept.append(ref.name)
            continue
        if not report.dry_run and not _delete_ref_if_unchanged(refs, ref):
            continue
        report.refs_deleted.append(usage)
        for key in trees.reach_ref(ref, set(), set()):  # cached: no reads
            counts[key] -= 1
            if not counts[key]:
                mtime = stored.get(key)
                if mtime is not None and mtime < cutoff:
                    predicted -= key[1]
    report.predicted_bytes = predicted
    report.reached_target = predicted <= report.target_bytes


def _predicted_prune(
    marking: Marking, stored: dict[BlobKey, float], cutoff: float, grace_period: float,
    report: GcReport,
) -> PruneReport:
    """What the prune after a dry run's expiry would do, from what was already read."""
    predicted = PruneReport(grace_period=grace_period, dry_run=True)
    predicted.refs_checked = len(marking.refs) - len(report.refs_deleted)
    deleted = {u.name for u in report.refs_deleted}
    predicted.refs = [u for u in marking.usage if u.name not in deleted]
    predicted.problems = [p for p in marking.problems if p.ref not in deleted]
    sweep_plan(stored, marking.counts.get, cutoff, predicted)
    return predicted


def _delete_ref_if_unchanged(refs: RefStore, ref: RefInfo) -> bool:
    """Delete ``ref`` unless a writer re-pointed or removed it since it was listed."""
    try:
        if refs.get_ref(ref.name, touch=False) != ref.digest:
            return False
        refs.delete_ref(ref.name)
    except RefNotFoundError:
        return False
    return True
