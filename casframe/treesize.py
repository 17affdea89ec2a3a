"""The expanded size of Directory trees, and the limits it is held to.

A Directory may name one child many times (the same ``node_modules`` in two places, or, from a
hostile writer, a thousand entries all naming one subdirectory, ten levels deep: a few hundred
kB stored that expand to 10^30 paths). Everything that expands a tree path by path (checkout,
``ls -r``, diff) measures it first: the size of each distinct Directory is computed once, from
its children's sizes (memoised over the DAG), so a fan-out bomb is measured, and refused, after
reading the little it stores. This module only computes; it reads and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from casframe.digest import Digest
from casframe.directory import Listing
from casframe.errors import ConfigError, TreeTooLargeError, UnsafeTreeError
from casframe.units import parse_size
from casframe.values import replace, value_class

if TYPE_CHECKING:
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory

__all__ = [
    "DEFAULT_MAX_TREE_BYTES",
    "DEFAULT_MAX_TREE_ENTRIES",
    "TREE_LIMIT_OPTIONS",
    "TreeLimits",
    "TreeSize",
    "measure_listings",
    "measure_tree",
    "node_digests",
]

#: Entries (files, directories and symlinks, every path counted) a tree may expand to. The
#: largest real build outputs and source trees hold a few million paths (a full Android or
#: Chromium checkout with its build output is around 2-3 M); 10 M lets any of them through
#: with room to spare, while listing or writing that many paths already takes minutes and
#: gigabytes. A fan-out bomb is refused whatever the limit, as long as it is finite.
DEFAULT_MAX_TREE_ENTRIES = 10_000_000
#: Bytes of file content a checkout may write. 1 TiB is more than the disks of most build
#: machines: a genuine tree larger than that cannot be checked out there anyway, while one file
#: named a million times (a byte bomb with few entries) is refused before the disk fills.
DEFAULT_MAX_TREE_BYTES = 1 << 40

#: Store options (URL query or a named store's ``options`` table) read by the core for every
#: backend; they never reach the backend itself.
TREE_LIMIT_OPTIONS = ("max_tree_entries", "max_tree_bytes")


@value_class
class TreeSize:
    """What a tree expands to: every path below its root, and the bytes of its files."""

    entries: int = 0
    files: int = 0
    bytes: int = 0

    def __init__(self, entries: int = 0, files: int = 0, bytes: int = 0) -> None:  # noqa: A002
        # Written out: one is made for every Directory a tree holds.
        set_field = object.__setattr__
        set_field(self, "entries", entries)
        set_field(self, "files", files)
        set_field(self, "bytes", bytes)


@value_class
class TreeLimits:
    """How large an expanded tree may be before checkout, ``ls -r`` or diff refuse it.

    ``max_entries`` applies to all three, ``max_bytes`` to what checkout writes.
    """

    max_entries: int = DEFAULT_MAX_TREE_ENTRIES
    max_bytes: int = DEFAULT_MAX_TREE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"tree limit {name} must be a whole number >= 0, not {value!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], url: str) -> TreeLimits:
        """The limits a store's options set (``max_tree_entries``, ``max_tree_bytes``)."""
        values: dict[str, int] = {}
        for option, field_name in zip(TREE_LIMIT_OPTIONS, ("max_entries", "max_bytes"),
                                      strict=True):
            text = options.get(option)
            if text is None:
                continue
            try:
                value = parse_size(str(text)) if option == "max_tree_bytes" else int(str(text))
            except ValueError:
                value = -1
            if value < 0:
                kind = "a size such as 500G or 2T" if option == "max_tree_bytes" else "a count"
                raise ConfigError(f"option {option}={text!r} in {url} is not {kind}")
            values[field_name] = value
        return cls(**values)

    def with_overrides(
        self, max_entries: int | None = None, max_bytes: int | None = None
    ) -> TreeLimits:
        """These limits, with the ones given for one call in place of the store's."""
        changes = {
            name: value
            for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes))
            if value is not None
        }
        return replace(self, **changes) if changes else self

    def check(self, size: TreeSize, what: str, *, content: bool = True) -> None:
        """Raise :class:`TreeTooLargeError` when ``size`` is over a limit; ``content`` checks
        the bytes too (for what writes the files out)."""
        if size.entries > self.max_entries:
            raise TreeTooLargeError(
                what, size.entries, self.max_entries, "max_tree_entries", "entries"
            )
        if content and size.bytes > self.max_bytes:
            raise TreeTooLargeError(what, size.bytes, self.max_bytes, "max_tree_bytes", "bytes")


def node_digests(nodes: Iterable[Any]) -> list[Digest]:
    """The digests of FileNodes or DirectoryNodes, validated all at once."""
    protos = [node.digest for node in nodes]
    return Digest.many([p.hash for p in protos], [p.size_bytes for p in protos])


def measure_tree(
    directories: Mapping[Digest, Directory],
    root: Digest,
    sizes: dict[Digest, TreeSize] | None = None,
) -> dict[Digest, TreeSize]:
    """The expanded size of ``root`` and of every Directory below it, each computed once.

    ``directories`` holds every distinct Directory of the tree (as read and validated by
    :func:`casframe.tree.iter_tree`). Children are sized before their parents by a depth-first
    walk with an explicit stack, so neither a deep chain nor a wide fan-out costs more than one
    visit per distinct Directory. Python integers do not overflow: the size of a bomb is exact.
    ``sizes`` (filled in and returned) may hold sizes already known, from an earlier call.
    """

    def own(digest: Digest) -> TreeSize:
        directory = directories[digest]
        files = len(directory.files)
        entries = files + len(directory.directories) + len(directory.symlinks)
        return TreeSize(entries, files, sum(f.size for f in node_digests(directory.files)))

    return _measure(root, {} if sizes is None else sizes, own,
                    lambda digest: node_digests(directories[digest].directories))


def measure_listings(listings: Mapping[Digest, Listing], root: Digest) -> dict[Digest, TreeSize]:
    """:func:`measure_tree` of Directories decoded as :class:`~casframe.directory.Listing`
    (file digests validated as there, children already validated by the decoder)."""

    def own(digest: Digest) -> TreeSize:
        files, directories, symlinks = listings[digest]
        content = 0
        if files:
            # One pass in C over the columns; the entries stay tuples (checkout links them).
            _, hashes, sizes, _ = zip(*files, strict=True)
            Digest.validate_many(hashes, sizes)
            content = sum(sizes)
        return TreeSize(len(files) + len(directories) + len(symlinks), len(files), content)

    return _measure(root, {}, own,
                    lambda digest: [child for _, child in listings[digest].directories])


def _measure(
    root: Digest,
    sizes: dict[Digest, TreeSize],
    own: Callable[[Digest], TreeSize],
    children_of_digest: Callable[[Digest], list[Digest]],
) -> dict[Digest, TreeSize]:
    children_of: dict[Digest, list[Digest]] = {}  # of the Directories being sized
    stack: list[tuple[Digest, bool]] = [(root, False)]
    while stack:
        digest, children_done = stack.pop()
        if children_done:
            mine = own(digest)
            entries, files, content = mine.entries, mine.files, mine.bytes
            for child in children_of.pop(digest):  # each name counts, repeated or not
                below = sizes[child]
                entries += below.entries
                files += below.files
                content += below.bytes
            sizes[digest] = TreeSize(entries, files, content)
            continue
        if digest in sizes:
            continue
        if digest in children_of:
            # Content addressing makes a cycle impossible in verified blobs; refuse it anyway
            # rather than loop, should a Directory ever reach here unverified.
            raise UnsafeTreeError(f"directory {digest} contains itself")
        children = children_of[digest] = children_of_digest(digest)
        stack.append((digest, True))
        stack.extend((child, False) for child in set(children) if child not in sizes)
    return sizes
