"""du: how much a store holds, and how much of it each ref keeps alive."""

from __future__ import annotations

from casframe.blobs import VerifiedBlobs
from casframe.maintenance.marking import account, list_blobs, mark, require
from casframe.maintenance.reports import DuReport
from casframe.progress import NO_PROGRESS, Progress
from casframe.spi import Capability, RefCapability, RefStore

__all__ = ["du"]


def du(blobs: VerifiedBlobs, refs: RefStore, *, progress: Progress | None = None) -> DuReport:
    """Total size and object count; per ref its total and exclusive size (most exclusive first)."""
    require(blobs, refs, "du", Capability.LIST, RefCapability.LIST)
    progress = progress or NO_PROGRESS
    stored = list_blobs(blobs, progress)
    marking = mark(blobs, refs, per_ref=True, progress=progress)
    account(blobs, marking, set(stored))
    report = DuReport(problems=marking.problems)
    for key in stored:
        report.total_objects += 1
        report.total_bytes += key[1]
        if key in marking.marked:
            report.reachable_objects += 1
            report.reachable_bytes += key[1]
    report.unreachable_objects = report.total_objects - report.reachable_objects
    report.unreachable_bytes = report.total_bytes - report.reachable_bytes
    report.refs = sorted(marking.usage, key=lambda u: (-u.exclusive_bytes, u.name))
    return report
