"""Diff: what changed between two stored trees, path by path, in path order.

Identical subtrees are skipped by digest. Before the first change is produced, the size of the
comparison is measured: each distinct pair of differing Directories is sized once, and each
subtree added or removed as a whole once (:func:`casframe.treesize.measure_tree`), so two
fan-out bombs that differ in one deep file are refused after reading what they store, not
compared path by path forever. Changes are then produced by a depth-first walk that holds one
level of entries per depth, never the whole list. This module only reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from casframe.blobs import VerifiedBlobs
from casframe.digest import Digest
from casframe.errors import UnsafeTreeError
from casframe.tree import TreeEntry, directory_entries, iter_tree, lookup_subdir
from casframe.treesize import TreeLimits, TreeSize, measure_tree

if TYPE_CHECKING:
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory

__all__ = ["Change", "TreeDiff", "diff_trees", "iter_diff"]

#: One changed path: ``A`` (added), ``D`` (deleted) or ``M`` (modified), and the path.
Change = tuple[Literal["A", "D", "M"], str]
# What a walk step yields: a change, a pair of differing directories, or a directory added
# or removed as a whole (with the letter of its changes).
_Step = (
    tuple[Literal["change"], Change]
    | tuple[Literal["pair"], str, Digest, Digest]
    | tuple[Literal["whole"], Literal["A", "D"], str, Digest]
)


@dataclass
class TreeDiff:
    """Paths (relative to the compared directory) that differ between two trees."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.modified)


def diff_trees(
    blobs: VerifiedBlobs, a: Digest, b: Digest, subdir: str = "", *,
    limits: TreeLimits | None = None,
) -> TreeDiff:
    """Files and symlinks added, removed or modified from tree ``a`` to tree ``b``.

    Paths are relative to ``subdir``. A directory added or removed as a whole is listed as
    all its files (an empty one as ``name/``); an entry that changed kind is removed and added.
    """
    result = TreeDiff()
    lists = {"A": result.added, "D": result.removed, "M": result.modified}
    for letter, path in iter_diff(blobs, a, b, subdir, limits=limits):
        lists[letter].append(path)
    return result


def iter_diff(
    blobs: VerifiedBlobs, a: Digest, b: Digest, subdir: str = "", *,
    limits: TreeLimits | None = None,
) -> Iterator[Change]:
    """The changes of :func:`diff_trees`, one at a time, sorted by path (then letter).

    The comparison is measured first: one that would visit more than ``limits.max_entries``
    entries raises :class:`~casframe.errors.TreeTooLargeError` before any change is returned.
    """
    if subdir:
        a = lookup_subdir(blobs, a, subdir)
        b = lookup_subdir(blobs, b, subdir)
    comparison = _Comparison(blobs)
    size = comparison.measure(a, b)
    (limits or TreeLimits()).check(
        TreeSize(entries=size), f"the diff of {a} and {b}", content=False
    )
    return comparison.changes(a, b)


def _sort_key(entry: TreeEntry) -> str:
    # Every path below directory ``x`` starts with ``x/``: ordering siblings by this key
    # orders the full paths as strings (``x.txt`` < ``x/a`` < ``xa``).
    return entry.path + "/" if entry.kind == "directory" else entry.path


class _Comparison:
    """Directories read for one diff (each once), and the sizes measured from them."""

    def __init__(self, blobs: VerifiedBlobs) -> None:
        self.blobs = blobs
        self.directories: dict[Digest, Directory] = {}
        self.sizes: dict[Digest, TreeSize] = {}
        self.pair_sizes: dict[tuple[Digest, Digest], int] = {}
        self.entry_maps: dict[Digest, dict[str, TreeEntry]] = {}

    def entries(self, digest: Digest) -> dict[str, TreeEntry]:
        """The entries of a Directory by name, read and built once per diff."""
        found = self.entry_maps.get(digest)
        if found is None:
            directory = self.directories.get(digest)
            if directory is None:
                directory = self.directories[digest] = self.blobs.get_directory(digest)
            found = {entry.path: entry for entry in directory_entries(directory, "")}
            self.entry_maps[digest] = found
        return found

    def whole_size(self, digest: Digest) -> int:
        """Entries a subtree added or removed whole expands to."""
        if digest not in self.sizes:
            for found, _, directory in iter_tree(self.blobs, digest):
                self.directories.setdefault(found, directory)
            measure_tree(self.directories, digest, self.sizes)
        return self.sizes[digest].entries

    def split(
        self, left: Digest, right: Digest
    ) -> tuple[int, list[tuple[Digest, Digest]], list[Digest]]:
        """Names compared at one level, the differing directory pairs, the whole subtrees."""
        old_entries, new_entries = self.entries(left), self.entries(right)
        names = old_entries.keys() | new_entries.keys()
        pairs: list[tuple[Digest, Digest]] = []
        wholes: list[Digest] = []
        for name in names:
            old, new = old_entries.get(name), new_entries.get(name)
            if old is not None and new is not None and old.kind == new.kind:
                if old.kind == "directory" and old.digest != new.digest:
                    pairs.append((old.digest, new.digest))  # type: ignore[arg-type]
                continue
            wholes += [e.digest for e in (old, new) if e is not None and e.kind == "directory"]  # type: ignore[misc]
        return len(names), pairs, wholes

    def measure(self, a: Digest, b: Digest) -> int:
        """Entries the comparison of ``a`` and ``b`` visits, each distinct pair sized once."""
        if a == b:
            return 0
        split: dict[tuple[Digest, Digest], tuple[int, list[tuple[Digest, Digest]], list[Digest]]]
        split = {}  # of the pairs being sized
        stack: list[tuple[Digest, Digest, bool]] = [(a, b, False)]
        while stack:
            left, right, children_done = stack.pop()
            if (left, right) in self.pair_sizes:
                continue
            if not children_done:
                if (left, right) in split:  # impossible with verified blobs, as in measure_tree
                    raise UnsafeTreeError(f"directories {left} and {right} contain themselves")
                names, pairs, wholes = split[left, right] = self.split(left, right)
                stack.append((left, right, True))
                stack.extend((*pair, False) for pair in set(pairs) if pair not in self.pair_sizes)
                continue
            names, pairs, wholes = split.pop((left, right))
            self.pair_sizes[left, right] = (
                names
                + sum(self.pair_sizes[pair] for pair in pairs)
                + sum(self.whole_size(digest) for digest in wholes)
            )
        return self.pair_sizes[a, b]

    def changes(self, a: Digest, b: Digest) -> Iterator[Change]:
        if a == b:
            return
        stack: list[Iterator[_Step]] = [iter(self.pair_steps("", a, b))]
        while stack:
            step = next(stack[-1], None)
            if step is None:
                stack.pop()
            elif step[0] == "change":
                yield step[1]
            elif step[0] == "pair":
                stack.append(iter(self.pair_steps(step[1], step[2], step[3])))
            else:
                stack.append(iter(self.whole_steps(step[1], step[2], step[3])))

    def pair_steps(self, prefix: str, left: Digest, right: Digest) -> list[_Step]:
        old_entries, new_entries = self.entries(left), self.entries(right)
        keyed: list[tuple[str, str, _Step]] = []
        for name in old_entries.keys() | new_entries.keys():
            old, new = old_entries.get(name), new_entries.get(name)
            path = prefix + name
            if old is not None and new is not None and old.kind == new.kind:
                if old.kind == "directory":
                    if old.digest != new.digest:
                        step: _Step = ("pair", path + "/", old.digest, new.digest)  # type: ignore[assignment]
                        keyed.append((name + "/", "", step))
                elif old != new:
                    keyed.append((name, "M", ("change", ("M", path))))
                continue
            for letter, entry in (("D", old), ("A", new)):
                if entry is not None:
                    keyed.append((_sort_key(entry), letter, self.entry_step(letter, prefix, entry)))  # type: ignore[arg-type]
        keyed.sort(key=lambda item: (item[0], item[1]))
        return [step for _, _, step in keyed]

    def whole_steps(self, letter: Literal["A", "D"], prefix: str, digest: Digest) -> list[_Step]:
        entries = sorted(self.entries(digest).values(), key=_sort_key)
        if not entries:
            return [("change", (letter, prefix))]  # an empty directory: ``name/``
        return [self.entry_step(letter, prefix, entry) for entry in entries]

    @staticmethod
    def entry_step(letter: Literal["A", "D"], prefix: str, entry: TreeEntry) -> _Step:
        if entry.kind == "directory":
            return ("whole", letter, prefix + entry.path + "/", entry.digest)  # type: ignore[return-value]
        return ("change", (letter, prefix + entry.path))
