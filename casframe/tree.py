"""Reading Directory trees: walk, list, look up, measure, and find what a tree lacks.

Trees use REAPI's ``Directory`` messages: files, subdirectories and symlinks sorted by name,
each name a single safe path segment (:mod:`casframe.directory` decodes and checks them).
Import is :mod:`casframe.treeimport`, checkout :mod:`casframe.checkout`, diff
:mod:`casframe.treediff`. This module reads through the verified-blob layer
(:class:`casframe.blobs.VerifiedBlobs`) only, and never writes.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from casframe.blobs import VerifiedBlobs
from casframe.digest import Digest
from casframe.directory import Listing, is_canonical, node_digest, parse_directory, read_directory
from casframe.errors import CasframeError
from casframe.lazy import lazy_module
from casframe.names import split_tree_path
from casframe.treesize import TreeLimits, TreeSize, measure_listings, measure_tree, node_digests

if TYPE_CHECKING:
    from casframe import treeimport
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory
else:
    # Checkout, ls and diff read trees and never import one: they do not load the importer,
    # its stat cache and its helpers.
    treeimport = lazy_module("casframe.treeimport")

__all__ = [
    "TreeEntry",
    "closure",
    "directory_entries",
    "import_directory",
    "is_canonical",
    "iter_listings",
    "iter_tree",
    "list_directory",
    "load_listings",
    "load_tree",
    "lookup_file",
    "lookup_subdir",
    "missing_in_tree",
    "node_digest",
    "node_digests",
    "parse_directory",
    "walk",
]

EntryKind = Literal["file", "directory", "symlink"]
_D = TypeVar("_D")


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One entry of a tree. ``digest`` is set for files and directories, ``target`` for links."""

    path: str
    kind: EntryKind
    digest: Digest | None = None
    is_executable: bool = False
    target: str = ""


def import_directory(*args: Any, **kwargs: Any) -> Digest:
    """:func:`casframe.treeimport.import_directory`, imported on first use."""
    return treeimport.import_directory(*args, **kwargs)


# -- reading whole trees ---------------------------------------------------------------------


def iter_tree(blobs: VerifiedBlobs, root: Digest) -> Iterator[tuple[Digest, bytes, Directory]]:
    """Every distinct Directory of a tree (digest, blob, message), breadth first, in batches.

    Directories the backend's ``get_tree`` fast path supplies up front (REAPI's GetTree: the
    whole tree in a few streamed pages) are not read again; the rest are read level by level.
    """
    return _iter_decoded(
        blobs, root, parse_directory, lambda directory: node_digests(directory.directories)
    )


def iter_listings(blobs: VerifiedBlobs, root: Digest) -> Iterator[tuple[Digest, bytes, Listing]]:
    """:func:`iter_tree` without protobuf: each Directory as a :class:`Listing`."""
    return _iter_decoded(
        blobs, root, read_directory, lambda listing: [child for _, child in listing.directories]
    )


def _iter_decoded(
    blobs: VerifiedBlobs,
    root: Digest,
    decode: Callable[[Digest, bytes], _D],
    children: Callable[[_D], list[Digest]],
) -> Iterator[tuple[Digest, bytes, _D]]:
    known = _prefetch_tree(blobs, root)
    seen = {root}
    level = [root]
    while level:
        next_level: list[Digest] = []
        found = [(d, known.pop(d)) for d in level if d in known]
        supplied = {d for d, _ in found}
        rest = [d for d in level if d not in supplied]
        for digest, data in itertools.chain(found, blobs.read_many(rest)):
            directory = decode(digest, data)
            yield digest, data, directory
            for child in children(directory):
                if child not in seen:
                    seen.add(child)
                    next_level.append(child)
        level = next_level


def _prefetch_tree(blobs: VerifiedBlobs, root: Digest) -> dict[Digest, bytes]:
    """Directory blobs of ``root``'s tree from the backend's fast path, keyed by their hash.

    Keyed by what the bytes hash to, so they are verified by construction; bytes that hash to
    no digest of the tree are simply never used. Any failure falls back to ordinary reads.
    """
    if root.size == 0:
        return {}
    try:
        function = blobs.function
        return {Digest.of_bytes(data, function): data for data in blobs.backend.get_tree(root)}
    except CasframeError:
        return {}


def closure(blobs: VerifiedBlobs, root: Digest) -> Iterator[Digest]:
    """Every digest a tree needs (its Directories and files), each once, parents first."""
    seen: set[Digest] = set()  # one set: the empty blob is both an empty file and Directory
    for digest, _, directory in iter_tree(blobs, root):
        if digest not in seen:
            seen.add(digest)
            yield digest
        for file_digest in node_digests(directory.files):
            if file_digest not in seen:
                seen.add(file_digest)
                yield file_digest


def missing_in_tree(blobs: VerifiedBlobs, root: Digest, *, freshen: bool = False) -> set[Digest]:
    """Digests the tree needs that the store lacks (empty when the tree is complete).

    With ``freshen``, every blob found present is touched first (see ``Store.find_missing``).
    """
    missing: set[Digest] = set()
    seen = {root}
    level = [root]
    while level:
        absent = blobs.find_missing(level, freshen=freshen)
        missing |= absent
        files: set[Digest] = set()
        next_level: list[Digest] = []
        for digest, data in blobs.read_many([d for d in level if d not in absent]):
            directory = parse_directory(digest, data)
            files.update(node_digests(directory.files))
            for node in directory.directories:
                child = node_digest(node.digest)
                if child not in seen:
                    seen.add(child)
                    next_level.append(child)
        missing |= blobs.find_missing(files, freshen=freshen)
        level = next_level
    return missing


# -- lookup, walk, list -----------------------------------------------------------------------


def lookup_subdir(blobs: VerifiedBlobs, root: Digest, path: str) -> Digest:
    digest = root
    walked: list[str] = []
    for segment in split_tree_path(path):
        directory = blobs.get_directory(digest)
        for node in directory.directories:
            if node.name == segment:
                digest = node_digest(node.digest)
                break
        else:
            where = "/".join([*walked, segment])
            raise FileNotFoundError(errno.ENOENT, f"no directory {where!r} in tree {root}")
        walked.append(segment)
    return digest


def lookup_file(blobs: VerifiedBlobs, root: Digest, path: str) -> TreeEntry:
    segments = split_tree_path(path)
    if not segments:
        raise IsADirectoryError(errno.EISDIR, f"{path!r} is the tree's root directory")
    parent = lookup_subdir(blobs, root, "/".join(segments[:-1]))
    for entry in list_directory(blobs, parent, ""):
        if entry.path == segments[-1]:
            if entry.kind == "file":
                return TreeEntry(path, "file", entry.digest, entry.is_executable)
            raise IsADirectoryError(errno.EISDIR, f"{path!r} in tree {root} is a {entry.kind}")
    raise FileNotFoundError(errno.ENOENT, f"no file {path!r} in tree {root}")


def directory_entries(directory: Directory, prefix: str) -> list[TreeEntry]:
    entries = [
        TreeEntry(prefix + n.name, "file", node_digest(n.digest), n.is_executable)
        for n in directory.files
    ]
    entries += [
        TreeEntry(prefix + n.name, "directory", node_digest(n.digest))
        for n in directory.directories
    ]
    entries += [TreeEntry(prefix + n.name, "symlink", target=n.target) for n in directory.symlinks]
    entries.sort(key=lambda e: e.path)
    return entries


def list_directory(blobs: VerifiedBlobs, root: Digest, path: str) -> list[TreeEntry]:
    digest = lookup_subdir(blobs, root, path)
    return directory_entries(blobs.get_directory(digest), "")


def load_tree(
    blobs: VerifiedBlobs, root: Digest, limits: TreeLimits, what: str, *, content: bool = False
) -> tuple[dict[Digest, Directory], dict[Digest, TreeSize]]:
    """Every distinct Directory of a tree, and the expanded size of each, checked against
    ``limits`` (with ``content``, the bytes of its files too) before the caller does any work.

    Raises :class:`~casframe.errors.TreeTooLargeError` naming ``what`` for a tree over a limit.
    """
    directories = {digest: directory for digest, _, directory in iter_tree(blobs, root)}
    sizes = measure_tree(directories, root)
    limits.check(sizes[root], what, content=content)
    return directories, sizes


def load_listings(
    blobs: VerifiedBlobs,
    root: Digest,
    limits: TreeLimits,
    what: str,
    *,
    content: bool = False,
    files_seen: Callable[[int], None] | None = None,
) -> tuple[dict[Digest, Listing], dict[Digest, TreeSize]]:
    """:func:`load_tree` without protobuf (for checkout): the same checks, in the same order,
    with each Directory as a :class:`Listing`.

    ``files_seen`` is told, after each Directory read, how many file entries the distinct
    Directories read so far hold: a lower bound of the files the tree expands to, known
    before the whole tree is read and checked (checkout starts its helpers by it).
    """
    if files_seen is None:
        listings = {digest: listing for digest, _, listing in iter_listings(blobs, root)}
    else:
        listings = {}
        files = 0
        for digest, _, listing in iter_listings(blobs, root):
            listings[digest] = listing
            files += len(listing.files)
            files_seen(files)
    sizes = measure_listings(listings, root)
    limits.check(sizes[root], what, content=content)
    return listings, sizes


def walk(
    blobs: VerifiedBlobs, root: Digest, path: str = "", *, limits: TreeLimits | None = None
) -> Iterator[TreeEntry]:
    """Every entry under ``path``, depth first in name order: a directory, then its contents.

    The tree is read and measured before the first entry is returned (each distinct Directory
    read once); one over ``limits.max_entries`` raises
    :class:`~casframe.errors.TreeTooLargeError` instead.
    """
    start = lookup_subdir(blobs, root, path)
    where = f"directory {path!r} of tree {root}" if path.strip("/") else f"tree {root}"
    directories, _ = load_tree(blobs, start, limits or TreeLimits(), where)
    return _walk_loaded(directories, start)


def _walk_loaded(directories: dict[Digest, Directory], start: Digest) -> Iterator[TreeEntry]:
    stack: list[Iterator[TreeEntry]] = [iter(directory_entries(directories[start], ""))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        if entry.kind == "directory" and entry.digest is not None:
            children = directory_entries(directories[entry.digest], entry.path + "/")
            stack.append(iter(children))
