"""Helpers for testing casframe and its backends: realistic trees, tree comparison, faults.

This package is also a pytest plugin (:mod:`casframe.testing.plugin`, loaded through the
``pytest11`` entry point, so every project that installs casframe gets its fixtures: stores,
S3 on moto in :mod:`casframe.testing.s3`, an in-process server in
:mod:`casframe.testing.server`) and ships the backend conformance suite
(:mod:`casframe.testing.conformance`). docs/testing.md describes them.

It must stay cheap to import: only the standard library at module level. Loading the pytest
plugin must cost a test run nothing, whether or not it uses casframe.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from casframe.errors import UnsupportedOperationError

if TYPE_CHECKING:
    from casframe.store import Store

__all__ = [
    "LARGE_FILE_SIZE",
    "TREE_EMPTY_DIRS",
    "TREE_EXECUTABLES",
    "TREE_FILES",
    "TREE_LARGE_FILE",
    "TREE_SYMLINKS",
    "InjectedFailure",
    "assert_tree_equal",
    "describe_tree",
    "failing_writes",
    "random_bytes",
    "tree_differences",
    "write_files",
    "write_tree",
]

# Over 5 MiB (S3's smallest multipart part) and not a multiple of the 1 MiB chunk size, so
# streaming code meets several full chunks and a short last one.
LARGE_FILE_SIZE = (5 << 20) + 4321

#: What :func:`write_tree` writes, for tests that want to name the paths.
TREE_FILES = {
    "README.txt": b"casframe test tree\n",
    "bin/run.sh": b"#!/bin/sh\necho run\n",
    "src/pkg/__init__.py": b"",
    "src/pkg/module.py": b"def answer():\n    return 42\n",
    "src/pkg/data/blob.bin": bytes(range(256)) * 8,
    "docs/copy-of-blob.bin": bytes(range(256)) * 8,  # same content as src/pkg/data/blob.bin
    "docs/guide.md": b"# Guide\n\nSee README.txt.\n",
    "deep/a/b/c/d/leaf.txt": b"leaf\n",
    "unicod\u00e9/na\u00efve.txt": b"non-ASCII names\n",
}
TREE_EXECUTABLES = ("bin/run.sh",)
TREE_SYMLINKS = {
    "links/relative": "../README.txt",
    "links/absolute": "/usr/share/casframe-test/absolute-target",
    "links/to-dir": "../src/pkg",
    "links/dangling": "no-such-file",
}
TREE_EMPTY_DIRS = ("empty", "src/pkg/empty-too")
TREE_LARGE_FILE = "big/large.bin"


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (so runs are reproducible)."""
    return random.Random(seed).randbytes(size)


def write_files(root: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """Write ``{relative path: content}`` below ``root`` (made as needed) and return it."""
    root = Path(root)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def write_tree(root: str | os.PathLike[str], *, large: bool = False) -> Path:
    """Write a realistic directory tree at ``root`` (which must not exist) and return it.

    It holds nested directories, empty directories, an executable file, an empty file, two
    files with the same content, non-ASCII names, and symlinks (relative, absolute, to a
    directory, dangling). ``large=True`` adds a file of :data:`LARGE_FILE_SIZE` bytes.
    """
    root = Path(root)
    root.mkdir(parents=True)
    for rel, content in TREE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o644)
    for rel in TREE_EXECUTABLES:
        (root / rel).chmod(0o755)
    for rel in TREE_EMPTY_DIRS:
        (root / rel).mkdir(parents=True)
    for rel, target in TREE_SYMLINKS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    if large:
        path = root / TREE_LARGE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random_bytes(LARGE_FILE_SIZE, seed=5))
    return root


def describe_tree(root: str | os.PathLike[str]) -> dict[str, tuple[str, str, bool]]:
    """Map each path under ``root`` to ``(kind, content sha256 or link target, executable)``.

    Symlinks are described, never followed. Kinds: ``file``, ``dir``, ``symlink``, ``other``.
    """
    root = os.fspath(root)
    result: dict[str, tuple[str, str, bool]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("symlink", os.readlink(path), False)
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", "", False)
            elif stat.S_ISREG(st.st_mode):
                result[rel] = ("file", _file_sha256(path), bool(st.st_mode & stat.S_IXUSR))
            else:
                result[rel] = ("other", "", False)
    return result


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_differences(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """Human-readable differences between two directories (empty when they are equal).

    Compares names, kinds, file contents, the owner's executable bit and symlink targets.
    """
    left, right = describe_tree(a), describe_tree(b)
    problems = []
    for rel in sorted(left.keys() | right.keys()):
        old, new = left.get(rel), right.get(rel)
        if old == new:
            continue
        if old is None:
            problems.append(f"{rel}: only in {b}")
        elif new is None:
            problems.append(f"{rel}: only in {a}")
        elif old[0] != new[0]:
            problems.append(f"{rel}: {old[0]} in {a}, {new[0]} in {b}")
        elif old[0] == "symlink":
            problems.append(f"{rel}: symlink to {old[1]!r} in {a}, to {new[1]!r} in {b}")
        elif old[1] != new[1]:
            problems.append(f"{rel}: contents differ")
        else:
            problems.append(f"{rel}: executable {old[2]} in {a}, {new[2]} in {b}")
    return problems


def assert_tree_equal(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Fail with the list of differences unless the two directories are equal."""
    problems = tree_differences(a, b)
    if problems:
        raise AssertionError("trees differ:\n  " + "\n  ".join(problems))


class InjectedFailure(Exception):
    """Raised by :func:`failing_writes` to simulate a store failing in the middle of work."""


@contextmanager
def failing_writes(
    store: Store, after: int, error: Callable[[], BaseException] | None = None
) -> Iterator[list[int]]:
    """Make ``store``'s backend fail every blob write after the first ``after`` ones.

    Wraps the backend's write path (``write_blobs``, ``begin_write`` and ``begin_write_for``)
    on this instance only; the failing write raises :class:`InjectedFailure`, or what
    ``error()`` returns (``OSError(errno.ENOSPC, ...)`` plays a full disk), before anything
    of that blob is written. ``begin_write_copy`` declines (raises
    :class:`~casframe.UnsupportedOperationError`, as for a file it cannot copy), so local
    files go through ``begin_write`` and count there. Yields a one-item list holding how many blobs
    were written so far; a write path that calls another one counts its blob once.
    """
    blobs = store.blobs
    lock = threading.Lock()
    written = [0]
    inside = threading.local()  # the default write_blobs calls begin_write: count once
    names = ("write_blobs", "begin_write", "begin_write_for", "begin_write_copy")
    original_write_blobs = blobs.write_blobs
    original_begin_write = blobs.begin_write
    original_begin_write_for = blobs.begin_write_for
    shadowed = {name: vars(blobs)[name] for name in names if name in vars(blobs)}

    def count_one() -> None:
        with lock:
            if written[0] >= after:
                if error is not None:
                    raise error()
                raise InjectedFailure(f"injected failure: {store.url} fails after {after} blobs")
            written[0] += 1

    def counted(write, *args):
        """Count one blob unless an outer write path already did, then call ``write``."""
        outer = getattr(inside, "active", False)
        if not outer:
            count_one()
        inside.active = True
        try:
            return write(*args)
        finally:
            inside.active = outer

    def write_blobs(items):
        for item in items:
            counted(original_write_blobs, [item])

    def begin_write(size_hint=None):
        return counted(original_begin_write, size_hint)

    def begin_write_for(digest):
        return counted(original_begin_write_for, digest)

    def begin_write_copy(fd):
        # The core then reads the file through begin_write(_for), counted there.
        raise UnsupportedOperationError(f"{store.url} copies no files while writes fail")

    blobs.write_blobs = write_blobs  # type: ignore[method-assign]
    blobs.begin_write = begin_write  # type: ignore[method-assign]
    blobs.begin_write_for = begin_write_for  # type: ignore[method-assign]
    blobs.begin_write_copy = begin_write_copy  # type: ignore[method-assign]
    try:
        yield written
    finally:
        for name in names:
            if name in shadowed:
                setattr(blobs, name, shadowed[name])
            else:
                delattr(blobs, name)
