"""The ``casframe`` entry points of the running environment, remembered between commands.

Asking :mod:`importlib.metadata` for entry points means importing it (it brings ``email``,
``zipfile``, ``csv``, ``tempfile``...) and reading the metadata of every installed
distribution: about as long as everything else a short command such as ``casframe ref list``
does. The answer only changes when the import path changes or a distribution is installed or
removed in one of its folders, which changes that folder's modification time. So the answer
is kept in the user cache directory (``entry-points/`` beside the default store), keyed by the
interpreter, the import path and the modification times of its folders, and importlib.metadata
is asked again whenever any of them differs. ``$CASFRAME_ENTRY_POINT_CACHE`` names another
folder for it, or says ``off``.

A folder changed less than :data:`FRESH_SECONDS` before the answer was read may change again
within the same tick of the file system's clock without its time moving, so such an answer is
used but not remembered. Editing an installed distribution's ``entry_points.txt`` in place
changes no folder: reinstall it (``pip install``), or run ``casframe plugins``, which always
reads the metadata afresh. A cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import importlib
import marshal
import os
import sys
import time

from casframe.userdirs import cache_folder
from casframe.values import value_class

__all__ = ["ENTRY_POINT_CACHE_ENV", "FRESH_SECONDS", "EntryPointRecord", "cache_path",
           "entry_points"]

ENTRY_POINT_CACHE_ENV = "CASFRAME_ENTRY_POINT_CACHE"

#: A folder modified this recently is not trusted to show its next change in its time.
FRESH_SECONDS = 2.0

# Bumped when the stored layout changes; part of the file name.
_FORMAT = 2
# The largest prime below 2**64.
_NAME_MODULUS = (1 << 64) - 59

# What the cache is valid for: the group, and each import path entry with its folder's time.
_Key = tuple[str, tuple[tuple[str, int], ...]]


@value_class
class EntryPointRecord:
    """One entry point of a group: its name, ``module:attribute`` value and distribution."""

    name: str
    value: str
    distribution: str
    version: str

    def load(self) -> object:
        """Import the module and return the attribute, as ``EntryPoint.load`` does."""
        target = self.value.split("[", 1)[0].strip()
        module_name, _, attribute = target.partition(":")
        obj: object = importlib.import_module(module_name.strip())
        for part in filter(None, attribute.strip().split(".")):
            obj = getattr(obj, part)
        return obj


def cache_path() -> str | None:
    """The file remembering the entry points of this interpreter with this import path
    (``None``: the cache is off)."""
    folder = cache_folder(ENTRY_POINT_CACHE_ENV, "entry-points")
    if folder is None:
        return None
    # One file per interpreter and import path: a command run from another folder (whose
    # import path starts with that folder) keeps its own answer instead of replacing this one.
    # The text as a number, modulo a 64-bit prime, names the file (hashlib would set up
    # OpenSSL, a tenth of a short command's start-up; zlib loads a shared library); a clash of
    # names costs a cache miss, never a wrong answer: the file holds the whole key it was
    # written for.
    where = "\0".join((sys.executable, sys.prefix, *sys.path)).encode(errors="surrogateescape")
    interpreter = f"{int.from_bytes(where, 'little') % _NAME_MODULUS:016x}"
    return os.path.join(folder, f"{interpreter}-{sys.implementation.cache_tag}-{_FORMAT}")


def _fingerprint() -> tuple[tuple[str, int], ...]:
    """The import path with each folder's modification time (-1: missing)."""
    stamps = []
    for entry in sys.path:
        try:
            mtime = os.stat(entry or ".").st_mtime_ns
        except OSError:
            mtime = -1
        stamps.append((entry, mtime))
    return tuple(stamps)


def _read_metadata(group: str) -> list[EntryPointRecord]:
    from importlib import metadata  # the slow path this module exists to avoid

    records = []
    for ep in metadata.entry_points(group=group):
        dist = ep.dist
        records.append(
            EntryPointRecord(
                ep.name,
                ep.value,
                dist.name if dist is not None else "?",
                dist.version if dist is not None else "?",
            )
        )
    return records


def _load_cache(path: str, key: _Key) -> list[EntryPointRecord] | None:
    try:
        with open(path, "rb") as f:
            stored_key, rows = marshal.load(f)
        if stored_key != key:
            return None
        return [EntryPointRecord(*row) for row in rows]
    except (OSError, EOFError, ValueError, TypeError):
        return None


def _save_cache(path: str, key: _Key, records: list[EntryPointRecord]) -> None:
    rows = tuple((r.name, r.value, r.distribution, r.version) for r in records)
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temp, "wb") as f:
            marshal.dump((key, rows), f)
        os.replace(temp, path)
    except OSError:
        try:
            os.unlink(temp)
        except OSError:
            pass


def entry_points(group: str, *, fresh: bool = False) -> list[EntryPointRecord]:
    """The entry points of ``group`` in this environment, from the cache when it is current.

    ``fresh=True`` reads the installed metadata whatever the cache holds (and refreshes it).
    """
    fingerprint = _fingerprint()
    key = (group, fingerprint)
    path = cache_path()
    if path is None:
        return _read_metadata(group)
    if not fresh:
        cached = _load_cache(path, key)
        if cached is not None:
            return cached
    records = _read_metadata(group)
    newest = max((mtime for _, mtime in fingerprint), default=-1)
    # Check the folders again: an install that finished while metadata was read, or a folder
    # so recent that its next change may keep the same time, makes this answer not worth
    # remembering (it is still the right answer for this command).
    if _fingerprint() == fingerprint and newest < (time.time() - FRESH_SECONDS) * 1e9:
        _save_cache(path, key, records)
    return records
