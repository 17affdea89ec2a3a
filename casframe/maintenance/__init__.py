"""Store maintenance over any backend: prune, quota expiry (gc), integrity check (fsck) and du.

One module per job: :mod:`~casframe.maintenance.prune`, :mod:`~casframe.maintenance.gc`,
:mod:`~casframe.maintenance.fsck`, :mod:`~casframe.maintenance.du`, the reports in
:mod:`~casframe.maintenance.reports` and what they share in :mod:`~casframe.maintenance.marking`;
what each kind of ref keeps alive is :class:`casframe.refkinds.RefReach`.

Everything is computed from what the backend lists and what the trees say at the time of the
call (``iter_blobs``, ``list_refs``, Directory reads). Nothing is counted into a side file, so an
interrupted run can leave no wrong accounting behind: the next run simply looks again.

Only the backend contract is used. An operation whose capability the backend lacks raises
:class:`UnsupportedOperationError` before touching anything.

How prune stays safe beside writers that take no lock (docs/maintenance.md explains it fully):

1. It deletes only blobs that no ref reaches and whose modification time is older than the
   grace cutoff, and it hands that cutoff to ``delete_blobs(older_than=...)`` so the backend
   re-checks it as each blob goes: a blob touched after the listing survives.
2. Writers touch every blob they reuse before they check their tree complete and set the ref
   (``Store.set_ref``, import, transfer), so any blob a new ref needs is younger than the grace
   period when prune would come to delete it.
3. It reads the refs again once the listing is done and keeps what any new or moved ref
   reaches, so a ref set while the listing ran is honoured even on a backend that cannot touch.
   (It marks before listing so that the listing can skip what is known reachable: a local
   store then spares a ``stat`` per reachable blob.)

This module must never delete a blob that a ref read after the listing reaches, nor a blob
modified within the grace period, nor anything at all in a dry run. A ref whose tree is
incomplete or corrupt is reported, and everything that can still be reached through it is kept.
"""

from casframe.maintenance.du import du
from casframe.maintenance.fsck import fsck
from casframe.maintenance.gc import gc
from casframe.maintenance.prune import prune
from casframe.maintenance.reports import (
    DuReport,
    FsckProblem,
    FsckReport,
    GcReport,
    PruneReport,
    RefProblem,
    RefUsage,
)
from casframe.units import parse_duration, parse_size

__all__ = [
    "DuReport",
    "FsckProblem",
    "FsckReport",
    "GcReport",
    "PruneReport",
    "RefProblem",
    "RefUsage",
    "du",
    "fsck",
    "gc",
    "parse_duration",
    "parse_size",
    "prune",
]
