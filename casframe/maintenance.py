"""Store maintenance over any backend: prune, quota expiry (gc), integrity check (fsck) and du.

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

from __future__ import annotations

import fnmatch
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    ActionResult,
    Directory,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Digest as DigestProto,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Tree as TreeMessage,
)
from casframe.digest import CHUNK_SIZE, EMPTY_DIGEST, Digest
from casframe.errors import (
    BackendContractError,
    BlobNotFoundError,
    CorruptBlobError,
    InvalidDigestError,
    RefNotFoundError,
    UnsafeTreeError,
)
from casframe.names import ACTION_RESULT_REF_PREFIX, is_tree_ref
from casframe.progress import NO_PROGRESS, Progress
from casframe.spi import Capability, RefCapability, RefInfo, StrayEntry
from casframe.tree import is_canonical, parse_directory
from casframe.units import parse_size

if TYPE_CHECKING:
    from casframe.store import Store

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

# Digests per delete_blobs call: fine-grained enough for a progress bar, and S3's DeleteObjects
# takes at most 1000 keys, so a backend can map one call to one request.
_DELETE_BATCH = 1000
# Directories read per read_many call while walking trees (they are small messages).
_READ_BATCH = 256
# Listed blobs between two progress updates (progress objects may lock or redraw).
_PROGRESS_STEP = 1024


# -- durations (sizes: casframe.units, re-exported here) ---------------------------------------

_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)", re.IGNORECASE)
_DURATION_RE = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)\s*[smhdw]?\s*)+", re.IGNORECASE)


def parse_duration(text: str | float) -> float:
    """Seconds from ``30s``, ``10m``, ``1h``, ``2d``, ``1w``, ``1h30m``, ``0`` or a plain number."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return float(text)
    stripped = str(text).strip()
    if not stripped or _DURATION_RE.fullmatch(stripped) is None:
        raise ValueError(
            f"invalid duration {text!r}: expected seconds or a number with a unit s, m, h, d "
            "or w, e.g. 30s, 10m, 1h or 0"
        )
    return sum(
        float(number) * _DURATION_UNITS[unit.lower()]
        for number, unit in _DURATION_PART.findall(stripped)
    )


# -- reports ----------------------------------------------------------------------------------


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


# -- shared machinery -------------------------------------------------------------------------


def _check_grace(grace_period: float) -> float:
    if grace_period < 0:
        raise ValueError(f"invalid grace period {grace_period!r}: must not be negative")
    return float(grace_period)


#: A blob's identity as a plain ``(hash, size)`` tuple, made straight from the listing and from
#: Directory messages without building a checked Digest for each blob (only deletion candidates
#: and problems become Digests). A Digest is such a tuple underneath, so both kinds find each
#: other in the same sets and dicts.
_Key = tuple[str, int]


def _list_blobs(
    store: Store,
    progress: Progress,
    skip: Callable[[str], bool] | None = None,
    emptied: dict[str, float] | None = None,
) -> dict[_Key, float]:
    """Stored blobs with their modification times, but those ``skip(hash)`` is true for.

    The empty blob is never listed. Emptied objects (0 bytes under another hash) are no blobs:
    they go to ``emptied`` (hash → modification time) when it is given.
    """
    stored: dict[_Key, float] = {}
    progress.start("scan", None, unit="objects")
    step = _PROGRESS_STEP
    count = 0
    # Plain tuples: this loop runs once per stored blob, and objects would cost more than the
    # backend's own work (a stat per blob on a local disk).
    for count, (hash_, size, mtime) in enumerate(store.blobs.iter_blob_stats(skip), 1):
        if size:
            stored[(hash_, size)] = mtime
        elif emptied is not None and hash_ != EMPTY_DIGEST.hash:
            emptied[hash_] = mtime
        if not count % step:
            progress.advance(step)
    progress.advance(count % step)
    progress.finish()
    return stored


@dataclass(slots=True)
class _Node:
    """What a Directory names: its subdirectories and its (non-empty) files."""

    subdirs: list[Digest]
    files: list[_Key]


_LEAF = _Node([], [])


class _Trees:
    """Follows refs to everything they keep alive, reading each message once per operation.

    A tree ref (:func:`casframe.names.is_tree_ref`) keeps its Directory tree; a Remote Asset
    blob ref keeps its blob; an action-cache ref keeps its ActionResult and every output that
    names: files, logs, ``Tree`` messages and their files, and ``root_directory_digest`` trees.

    Tolerant by design: a missing, corrupt or undecodable message is recorded in ``problems``
    instead of raising, and whatever can still be decoded from a corrupt one is followed,
    because marking more than needed is always safe while marking less loses data. With
    ``check`` it also records unsafe names, non-canonical order and invalid digests (fsck);
    without it, file digests are not validated (a malformed one is never stored anyway).
    """

    def __init__(self, store: Store, *, check: bool = False) -> None:
        self.store = store
        self.check = check
        self.nodes: dict[_Key, _Node] = {}
        #: What each action result keeps alive: blobs and Directory roots.
        self.outputs: dict[_Key, tuple[list[Digest], list[Digest]]] = {}
        #: Messages other than Directories read (hence verified) whole: results, Trees.
        self.verified: set[_Key] = set()
        self.problems: dict[_Key, list[tuple[str, str]]] = {}

    def _problem(self, digest: Digest, kind: str, detail: str) -> None:
        self.problems.setdefault((digest.hash, digest.size), []).append((kind, detail))

    def load(self, digests: list[Digest]) -> None:
        nodes = self.nodes
        todo = [d for d in digests if (d.hash, d.size) not in nodes]
        for start in range(0, len(todo), _READ_BATCH):
            batch = todo[start : start + _READ_BATCH]
            try:
                blobs = list(self.store.read_many(batch))
            except (BlobNotFoundError, CorruptBlobError):
                for digest in batch:  # find out which ones, one by one
                    self._load_one(digest)
                continue
            for digest, data in blobs:
                self._parse(digest, data)

    def _load_one(self, digest: Digest) -> None:
        data, salvaged = self._read(digest, "Directory")
        if data is None:
            self.nodes[(digest.hash, digest.size)] = _LEAF
        else:
            self._parse(digest, data, salvage=salvaged)

    def _read(self, digest: Digest, what: str) -> tuple[bytes | None, bool]:
        """``(content, salvaged)``: unverified content of a corrupt blob, if it can be read."""
        try:
            return self.store.read_bytes(digest), False
        except BlobNotFoundError:
            self._problem(digest, "missing", f"{what} is not stored")
            return None, False
        except CorruptBlobError as exc:
            self._problem(digest, "corrupt", str(exc))
            return self._read_unverified(digest), True

    def _read_unverified(self, digest: Digest) -> bytes | None:
        try:
            with self.store.open_read(digest, verify=False) as stream:
                data: bytes = stream.read(digest.size + 1)
                return data
        except (BlobNotFoundError, CorruptBlobError):
            return None

    def _parse(self, digest: Digest, data: bytes, *, salvage: bool = False) -> None:
        key = (digest.hash, digest.size)
        report = not salvage  # a salvaged Directory is already reported as corrupt
        try:
            if self.check:
                directory = parse_directory(digest, data)
            else:  # marking needs the digests only, not the names: skip checking those
                directory = Directory()
                try:
                    directory.ParseFromString(data)
                except DecodeError as exc:
                    raise CorruptBlobError(digest, f"not a Directory message: {exc}") from None
        except CorruptBlobError as exc:
            if report:
                self._problem(digest, "not-a-directory", str(exc))
            self.nodes[key] = _LEAF
            return
        except UnsafeTreeError as exc:
            if report and self.check:
                self._problem(digest, "unsafe", str(exc))
            directory = Directory()
            directory.ParseFromString(data)  # parse_directory already decoded it once
        if report and self.check and not is_canonical(directory):
            self._problem(digest, "not-canonical", "entries are not sorted by name")
        subdirs = []
        invalid: list[str] = []
        for dir_node in directory.directories:
            try:
                subdirs.append(Digest(dir_node.digest.hash, dir_node.digest.size_bytes))
            except InvalidDigestError as exc:
                invalid.append(str(exc))
        files = []
        for node in directory.files:  # each message attribute access builds an object: once
            file_digest = node.digest
            size = file_digest.size_bytes
            if size:
                files.append((file_digest.hash, size))
            elif self.check and file_digest.hash != EMPTY_DIGEST.hash:
                try:
                    Digest(file_digest.hash, 0)  # raises: only the empty blob has size 0
                except InvalidDigestError as exc:
                    invalid.append(str(exc))
        if self.check:
            valid = []
            for file_key in files:
                try:
                    Digest(*file_key)
                except InvalidDigestError as exc:
                    invalid.append(str(exc))
                    continue
                valid.append(file_key)
            files = valid
        if invalid and report:
            self._problem(digest, "not-a-directory", f"names an invalid digest: {invalid[0]}")
        self.nodes[key] = _Node(subdirs, files)

    def reach_ref(self, ref: RefInfo, marked: set[_Key], dirs_seen: set[_Key]) -> list[_Key]:
        """Add everything ``ref`` keeps alive not yet in ``marked``; return what was added."""
        if is_tree_ref(ref.name):
            return self.reach(ref.digest, marked, dirs_seen)
        added = _add(ref.digest, marked)
        if ref.name.startswith(ACTION_RESULT_REF_PREFIX):
            blobs, roots = self._action_outputs(ref.digest)
            for digest in blobs:
                added += _add(digest, marked)
            for root in roots:
                added += self.reach(root, marked, dirs_seen)
        return added

    def _action_outputs(self, digest: Digest) -> tuple[list[Digest], list[Digest]]:
        """The blobs and Directory roots an ActionResult names (cached)."""
        key = (digest.hash, digest.size)
        cached = self.outputs.get(key)
        if cached is not None:
            return cached
        blobs: list[Digest] = []
        roots: list[Digest] = []
        self.outputs[key] = (blobs, roots)
        data, salvaged = self._read(digest, "ActionResult")
        if data is None:
            return blobs, roots
        result = ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError as exc:
            if not salvaged:
                self._problem(digest, "not-an-action-result", f"does not decode: {exc}")
            return blobs, roots
        if not salvaged:
            self.verified.add(key)
        named = [output.digest for output in result.output_files]
        named += [result.stdout_digest, result.stderr_digest]
        trees = []
        for output in result.output_directories:
            trees += self._digests(digest, [output.tree_digest])
            roots += self._digests(digest, [output.root_directory_digest])
        blobs += self._digests(digest, named) + trees
        for tree in trees:
            blobs += self._tree_files(tree)
        return blobs, roots

    def _tree_files(self, digest: Digest) -> list[Digest]:
        """The files a REAPI ``Tree`` message names (its Directories are inside it)."""
        data, salvaged = self._read(digest, "Tree")
        if data is None:
            return []
        tree = TreeMessage()
        try:
            tree.ParseFromString(data)
        except DecodeError as exc:
            if not salvaged:
                self._problem(digest, "not-a-tree", f"does not decode: {exc}")
            return []
        if not salvaged:
            self.verified.add((digest.hash, digest.size))
        nodes = [node.digest for d in (tree.root, *tree.children) for node in d.files]
        return self._digests(digest, nodes)

    def _digests(self, parent: Digest, protos: list[DigestProto]) -> list[Digest]:
        """Digests from messages, skipping unset ones; a malformed one is a problem of parent."""
        digests = []
        for proto in protos:
            if not proto.hash and not proto.size_bytes:
                continue  # an optional field left unset
            try:
                digests.append(Digest(proto.hash, proto.size_bytes))
            except InvalidDigestError as exc:
                self._problem(parent, "invalid-digest", str(exc))
        return digests

    def reach(self, root: Digest, marked: set[_Key], dirs_seen: set[_Key]) -> list[_Key]:
        """Add every blob of ``root``'s tree not yet in ``marked``; return those added.

        Directories are tracked apart from ``marked`` because the same bytes may be a file in
        one tree and a Directory in another, and must then be followed as a Directory.
        """
        added: list[_Key] = []
        root_key = (root.hash, root.size)
        if root_key not in marked:
            marked.add(root_key)
            added.append(root_key)
        if root_key in dirs_seen:
            return added
        dirs_seen.add(root_key)
        nodes = self.nodes
        level = [root]
        while level:
            self.load(level)
            next_level: list[Digest] = []
            for digest in level:
                node = nodes[(digest.hash, digest.size)]
                fresh = set(node.files).difference(marked)  # also drops duplicate names
                marked.update(fresh)
                added.extend(fresh)
                for child in node.subdirs:
                    child_key = (child.hash, child.size)
                    if child_key not in marked:
                        marked.add(child_key)
                        added.append(child_key)
                    if child_key not in dirs_seen:
                        dirs_seen.add(child_key)
                        next_level.append(child)
            level = next_level
        return added


def _add(digest: Digest, marked: set[_Key]) -> list[_Key]:
    key = (digest.hash, digest.size)
    if key in marked:
        return []
    marked.add(key)
    return [key]


@dataclass
class _Marking:
    """Everything the refs keep alive, per ref as well when sizing refs."""

    refs: list[RefInfo]
    trees: _Trees
    per_ref: bool
    marked: set[_Key] = field(default_factory=set)
    #: For each ref, what it reaches (per ref), or what it reached first (one shared walk).
    closures: list[list[_Key]] = field(default_factory=list)
    #: Per ref: how many refs reach each blob.
    counts: Counter[_Key] = field(default_factory=Counter)
    usage: list[RefUsage] = field(default_factory=list)
    problems: list[RefProblem] = field(default_factory=list)
    dirs_seen: set[_Key] = field(default_factory=set)

    def follow(self, ref: RefInfo) -> list[_Key]:
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


def _mark(store: Store, *, per_ref: bool, progress: Progress) -> _Marking:
    """Mark every blob the refs reach; ``per_ref`` keeps each ref's closure for sizing."""
    refs = store.list_refs()  # least recently used first
    marking = _Marking(refs, _Trees(store), per_ref)
    progress.start("mark", len(refs), unit="refs")
    for ref in refs:
        marking.closures.append(marking.follow(ref))
        progress.advance(1)
    progress.finish()
    return marking


def _account(store: Store, marking: _Marking, present: set[_Key]) -> None:
    """Given the blobs the listing showed, report missing ones and size each ref (per ref)."""
    problems = marking.trees.problems
    suspects: list[tuple[str, _Key]] = []  # (ref, blob) absent from the listing
    present_of_ref: list[set[_Key]] = []
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
        missing = store.find_missing(digests.values())
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


def _sweep_plan(
    stored: dict[_Key, float],
    is_live: Callable[[_Key], object],
    cutoff: float,
    report: PruneReport,
) -> list[Digest]:
    """Fill the counts of ``report`` and return the blobs to delete, in hash order.

    Hash order deletes a local store's objects folder by folder, as ``git prune`` does; in
    listing or age order every delete would touch another directory.
    """
    candidates: list[_Key] = []
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


def _emptied_digest(hash_: str) -> Digest:
    """What names an emptied object for the backend: its hash with size 0.

    No blob has that digest (the constructor refuses it); ``delete_blobs`` and
    ``find_missing_blobs`` accept it for objects ``iter_blob_stats`` listed so.
    """
    return Digest._trusted(hash_, 0)


def _sweep_emptied(emptied: dict[str, float], cutoff: float, report: PruneReport) -> list[Digest]:
    """Emptied objects no ref reached (those are skipped by the listing): garbage like any
    unreachable blob, deleted once older than the cutoff. They count as objects of 0 bytes."""
    doomed = [_emptied_digest(h) for h, mtime in emptied.items() if mtime < cutoff]
    report.objects_scanned += len(emptied)
    report.objects_kept_young += len(emptied) - len(doomed)
    report.objects_freed += len(doomed)
    return doomed


def _delete(
    store: Store, digests: list[Digest], cutoff: float, report: PruneReport, progress: Progress
) -> None:
    """Delete ``digests`` if still older than ``cutoff``; what a writer stored or touched since
    the listing is spared, and the report moves it from freed to kept young."""
    progress.start("delete", len(digests), unit="objects")
    for start in range(0, len(digests), _DELETE_BATCH):
        batch = digests[start : start + _DELETE_BATCH]
        deleted = store.blobs.delete_blobs(batch, older_than=cutoff)
        if deleted is None:  # what the older contract allowed for "cannot tell"
            raise BackendContractError(
                f"{type(store.blobs).__name__}.delete_blobs returned None: it must return the "
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


# -- prune ------------------------------------------------------------------------------------


def prune(
    store: Store,
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
    grace_period = _check_grace(grace_period)
    store.require(
        "prune", Capability.LIST, RefCapability.LIST, *(() if dry_run else (Capability.DELETE,))
    )
    progress = progress or NO_PROGRESS
    started = time.time()
    # The store's clock, which stamped the times the cutoff is compared with: a prune run
    # from a machine whose clock is ahead of the bucket's must not shorten the grace period.
    cutoff = store.blobs.now() - grace_period
    report = PruneReport(grace_period=grace_period, dry_run=dry_run)

    # Mark first, so the listing can skip what is reachable (a local store then need not
    # stat it); read the refs again after the listing, so a ref set meanwhile is seen.
    marking = _mark(store, per_ref=dry_run, progress=progress)
    sizes = {key[0]: key[1] for key in marking.marked if key[1]}  # hash -> size trees name
    reached: list[str] = []

    def skip(hash_: str) -> bool:
        if hash_ in sizes:
            reached.append(hash_)
            return True
        return False

    emptied: dict[str, float] = {}
    stored = _list_blobs(store, progress, skip, emptied)  # only blobs no ref reached
    present = {(hash_, sizes[hash_]) for hash_ in reached}
    _account(store, marking, present | stored.keys())
    seen = {(ref.name, ref.digest) for ref in marking.refs}
    for ref in store.list_refs():
        if (ref.name, ref.digest) not in seen:  # set or moved while the listing ran
            marking.follow(ref)
    report.refs_checked = len(marking.refs)
    report.problems = marking.problems
    report.refs = marking.usage
    report.objects_scanned = report.objects_reachable = len(present)
    report.bytes_scanned = report.bytes_reachable = sum(key[1] for key in present)
    doomed = _sweep_plan(stored, marking.marked.__contains__, cutoff, report)
    doomed = sorted(doomed + _sweep_emptied(emptied, cutoff, report))
    if not dry_run:
        _delete(store, doomed, cutoff, report, progress)
    report.temp_files_removed, report.temp_bytes_removed = store.blobs.clean_temp(
        cutoff, dry_run=dry_run
    )
    report.seconds = time.time() - started
    return report


# -- gc ---------------------------------------------------------------------------------------


def gc(
    store: Store,
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
    _check_grace(grace_period)
    store.require(
        "gc",
        Capability.LIST,
        RefCapability.LIST,
        *(() if dry_run else (Capability.DELETE, RefCapability.DELETE)),
    )
    patterns = tuple(keep)
    progress = progress or NO_PROGRESS
    cutoff = store.blobs.now() - _check_grace(grace_period)

    stored = _list_blobs(store, progress)
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
        report.prune = prune(store, grace_period=grace_period, dry_run=dry_run, progress=progress)
        report.predicted_bytes = total - report.prune.bytes_freed
        return report

    marking = _mark(store, per_ref=True, progress=progress)
    _account(store, marking, set(stored))
    counts = marking.counts
    trees = marking.trees

    def protected(ref: RefInfo) -> bool:
        return any(fnmatch.fnmatchcase(ref.name, pattern) for pattern in patterns)

    def remaining_bytes(live: Callable[[_Key], object]) -> int:
        """Stored bytes a prune would keep: young, or reachable according to ``live``."""
        return sum(key[1] for key, mtime in stored.items() if mtime >= cutoff or live(key))

    predicted = remaining_bytes(counts.get)
    # What no expiry can remove: young blobs and what kept refs reach. Expiring stops there
    # too, so refs whose deletion would free nothing (yet) are left alone.
    kept_reach: set[_Key] = set()
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
        if not dry_run and not _delete_ref_if_unchanged(store, ref):
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

    if dry_run:
        predicted_prune = PruneReport(grace_period=grace_period, dry_run=True)
        predicted_prune.refs_checked = len(marking.refs) - len(report.refs_deleted)
        deleted = {u.name for u in report.refs_deleted}
        predicted_prune.refs = [u for u in marking.usage if u.name not in deleted]
        predicted_prune.problems = [p for p in marking.problems if p.ref not in deleted]
        _sweep_plan(stored, counts.get, cutoff, predicted_prune)
        report.prune = predicted_prune
    else:
        # A fresh mark and sweep: refs set by writers since the listing above are seen.
        report.prune = prune(store, grace_period=grace_period, progress=progress)
    return report


def _delete_ref_if_unchanged(store: Store, ref: RefInfo) -> bool:
    """Delete ``ref`` unless a writer re-pointed or removed it since it was listed."""
    try:
        if store.get_ref(ref.name, touch=False) != ref.digest:
            return False
        store.delete_ref(ref.name)
    except RefNotFoundError:
        return False
    return True


# -- fsck -------------------------------------------------------------------------------------


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
    store: Store, digests: list[Digest], problems: _Problems, report: FsckReport,
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
        if len(batch) >= _READ_BATCH or batch_bytes >= store.blobs.limits.max_batch_bytes:
            _verify_batch(store, batch, problems, report, progress)
            batch, batch_bytes = [], 0
    _verify_batch(store, batch, problems, report, progress)
    buffer = bytearray(CHUNK_SIZE)
    for digest in large:
        try:
            with store.open_read(digest) as stream:
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
    store: Store, batch: list[Digest], problems: _Problems, report: FsckReport,
    progress: Progress,
) -> None:
    if not batch:
        return
    try:
        checked = [d for d, _ in store.read_many(batch)]
    except (BlobNotFoundError, CorruptBlobError):
        checked = []
        for digest in batch:  # find out which ones, one by one
            try:
                store.read_bytes(digest)
            except CorruptBlobError as exc:
                problems.add("corrupt", digest, exc.detail)
                problems.stored_as[digest] = digest
            except BlobNotFoundError:
                continue  # deleted since it was listed
            checked.append(digest)
    report.blobs_checked += len(checked)
    report.bytes_checked += sum(d.size for d in checked)
    progress.advance(sum(d.size for d in batch))


def _merge_resized(stored: Iterable[_Key], problems: _Problems) -> None:
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
        other = Digest(*other_key) if other_key[1] else _emptied_digest(other_key[0])
        problems.discard(problem.kind, problem.digest)
        problems.discard("corrupt", other)
        problems.stored_as.pop(other, None)
        problems.add("corrupt", problem.digest, f"stored object has {other.size} bytes")
        problems.stored_as[problem.digest] = other


def _still_corrupt(store: Store, digest: Digest, victim: Digest) -> bool:
    """Re-read just before a repair deletes: a writer may have replaced a truncated object."""
    if not victim.size:  # an emptied object, which no read path would read (size 0)
        return not store.blobs.find_missing_blobs([victim])
    try:
        with store.open_read(digest) as stream:
            while stream.read(CHUNK_SIZE):
                pass
    except CorruptBlobError:
        return True
    except BlobNotFoundError:
        return False
    return False


def fsck(store: Store, *, repair: bool = False, progress: Progress | None = None) -> FsckReport:
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
    store.require("fsck", RefCapability.LIST)
    if repair:
        store.require("fsck --repair", Capability.DELETE)
    progress = progress or NO_PROGRESS
    started = time.time()
    listed = store.has(Capability.LIST)
    report = FsckReport(repair=repair, listed=listed)
    problems = _Problems()

    stored: dict[_Key, float] | None = None
    emptied: dict[str, float] = {}
    if listed:
        stored = _list_blobs(store, progress, emptied=emptied)
        for hash_ in sorted(emptied):  # known corrupt without reading them
            victim = _emptied_digest(hash_)
            problems.add("corrupt", victim, "stored object is empty (0 bytes): its content is lost")
            problems.stored_as[victim] = victim
        _verify(store, sorted(Digest(*key) for key in stored), problems, report, progress)
        report.warnings = list(store.blobs.iter_strays())

    refs = store.list_refs()
    report.refs_checked = len(refs)
    trees = _Trees(store, check=True)
    closures: list[set[_Key]] = []
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

    # With check=True every key is a valid digest (invalid ones were reported and dropped).
    reachable = {
        Digest(*key)
        for key in set().union(*closures)
        if key[1] and key not in trees.problems and (stored is None or key not in stored)
    }
    missing = store.find_missing(reachable)  # with a listing: only what it did not show
    for digest in missing:
        problems.add("missing", digest, "blob is not stored")
    if stored is not None:
        _merge_resized(stored.keys() | {(h, 0) for h in emptied}, problems)
    else:  # nothing was verified yet: verify what the refs reach
        read = trees.nodes.keys() | trees.verified  # verified as they were read
        present = sorted(d for d in reachable - missing if (d.hash, d.size) not in read)
        _verify(store, present, problems, report, progress)
        report.blobs_checked += len(read)

    if repair:
        for problem in problems.of_kind("corrupt"):
            victim = problems.stored_as.get(problem.digest, problem.digest)
            if _still_corrupt(store, problem.digest, victim):
                store.blobs.delete_blobs([victim])
                report.deleted.append(problem.digest)

    absent = {(d.hash, d.size) for d in report.deleted}
    absent.update((p.digest.hash, p.digest.size) for p in problems.of_kind("missing"))
    by_digest: dict[_Key, list[FsckProblem]] = {}
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
    report.seconds = time.time() - started
    return report


# -- du ---------------------------------------------------------------------------------------


def du(store: Store, *, progress: Progress | None = None) -> DuReport:
    """Total size and object count; per ref its total and exclusive size (most exclusive first)."""
    store.require("du", Capability.LIST, RefCapability.LIST)
    progress = progress or NO_PROGRESS
    stored = _list_blobs(store, progress)
    marking = _mark(store, per_ref=True, progress=progress)
    _account(store, marking, set(stored))
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
