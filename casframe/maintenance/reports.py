"""The reports of prune, gc, fsck and du: plain dataclasses, with ``to_dict`` for JSON."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from casframe.digest import Digest
from casframe.spi import StrayEntry

__all__ = [
    "DuReport",
    "FsckProblem",
    "FsckReport",
    "GcReport",
    "PruneReport",
    "RefProblem",
    "RefUsage",
]


def _plain(value: Any) -> Any:
    """JSON-ready form: digests as ``HASH/SIZE`` text, dataclasses as dicts."""
    if isinstance(value, Digest):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class _Report:
    def to_dict(self) -> dict[str, Any]:
        """The report as plain data for JSON output (digests as ``HASH/SIZE``)."""
        result: dict[str, Any] = _plain(self)
        return result


@dataclass(frozen=True)
class RefUsage(_Report):
    """What one ref keeps alive. ``exclusive_*`` is what deleting only this ref would free
    (once those blobs are older than the grace period): blobs no other ref reaches."""

    name: str
    digest: Digest
    accessed: float
    total_objects: int
    total_bytes: int
    exclusive_objects: int
    exclusive_bytes: int


@dataclass(frozen=True)
class RefProblem(_Report):
    """A ref whose tree could not be followed completely: ``digest`` is the blob concerned."""

    ref: str
    digest: Digest
    #: missing, corrupt, not-a-directory, not-an-action-result, not-a-tree, invalid-digest
    kind: str
    detail: str


@dataclass
class PruneReport(_Report):
    """What prune found and freed (in a dry run: would free)."""

    grace_period: float
    dry_run: bool
    objects_scanned: int = 0
    bytes_scanned: int = 0
    objects_reachable: int = 0
    bytes_reachable: int = 0
    objects_freed: int = 0
    bytes_freed: int = 0
    objects_kept_young: int = 0
    bytes_kept_young: int = 0
    refs_checked: int = 0
    temp_files_removed: int = 0
    temp_bytes_removed: int = 0
    #: Dry run only: every ref with the bytes it alone keeps alive.
    refs: list[RefUsage] = field(default_factory=list)
    problems: list[RefProblem] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class GcReport(_Report):
    """What gc expired to get under its quota, and the prune that followed."""

    max_size: int
    low_watermark: float
    dry_run: bool
    objects_before: int
    bytes_before: int
    #: ``low_watermark × max_size``: where expiry stops once the store was over ``max_size``.
    target_bytes: int
    over_quota: bool
    #: Stored bytes expected after expiring ``refs_deleted`` and pruning.
    predicted_bytes: int
    #: Whether the prediction is at or below ``target_bytes`` (or the store was under quota).
    reached_target: bool
    refs_deleted: list[RefUsage] = field(default_factory=list)
    #: Refs that would have been expired but match a ``keep`` pattern.
    refs_kept: list[str] = field(default_factory=list)
    prune: PruneReport | None = None


@dataclass
class FsckProblem(_Report):
    """One integrity problem. ``refs`` are the refs whose trees contain ``digest``."""

    #: corrupt, missing, not-a-directory, unsafe, not-canonical, not-an-action-result,
    #: not-a-tree, invalid-digest
    kind: str
    digest: Digest
    detail: str
    refs: list[str] = field(default_factory=list)


@dataclass
class FsckReport(_Report):
    """What fsck checked and found; ``ok`` is false when there is any problem."""

    repair: bool
    #: Whether every stored blob was verified (the backend can list) or only reachable ones.
    listed: bool
    blobs_checked: int = 0
    bytes_checked: int = 0
    refs_checked: int = 0
    directories_checked: int = 0
    problems: list[FsckProblem] = field(default_factory=list)
    #: Corrupt blobs removed by ``repair``.
    deleted: list[Digest] = field(default_factory=list)
    #: Refs whose tree lacks a blob (after repair: including blobs it removed).
    incomplete_refs: list[str] = field(default_factory=list)
    #: Entries of the blob area that are not blobs (a folder named like an object, a stray
    #: file or key): ignored by every operation, reported here, and no problem for ``ok``.
    warnings: list[StrayEntry] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        result = super().to_dict()
        result["ok"] = self.ok
        return result


@dataclass
class DuReport(_Report):
    """Store usage, computed from the listing and the refs' trees."""

    total_objects: int = 0
    total_bytes: int = 0
    reachable_objects: int = 0
    reachable_bytes: int = 0
    unreachable_objects: int = 0
    unreachable_bytes: int = 0
    refs: list[RefUsage] = field(default_factory=list)
    problems: list[RefProblem] = field(default_factory=list)
