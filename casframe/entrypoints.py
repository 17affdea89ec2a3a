"""The entry points of one group, read straight from the installed distributions' metadata.

:func:`importlib.metadata.entry_points` answers the same question, but importing
:mod:`importlib.metadata` loads the :mod:`email` package, :mod:`zipfile` and
:mod:`importlib.resources` (a third of the ``casframe`` command's start-up), and asking an
entry point for its distribution's name parses every ``METADATA`` file it reaches with the
email parser. This module follows the same rules for the common layout, a directory on
``sys.path`` holding ``NAME-VERSION.dist-info`` (or ``.egg-info``) directories:

- ``sys.path`` is searched in order; a distribution found twice (same normalized name) counts
  once, where it is first found, as :mod:`importlib.metadata` does;
- ``entry_points.txt`` is read in its ini-like format (``[group]`` then ``name = value``);
- a distribution's name and version come from the ``Name:`` and ``Version:`` headers of its
  ``METADATA`` (``PKG-INFO`` for ``.egg-info``), read only for distributions that have an entry
  point in the group.

Anything else (a zip archive or an ``.egg`` on ``sys.path``, a meta-path finder that supplies
distributions of its own) is left to :mod:`importlib.metadata` itself, so that no entry point is
ever missed.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["EntryPoint", "entry_points"]

_INFO_SUFFIXES = (".dist-info", ".egg-info")


@dataclass(frozen=True)
class EntryPoint:
    """One ``name = module:attribute`` line of a group, with the distribution declaring it."""

    name: str
    value: str
    distribution: str
    version: str

    def load(self) -> Any:
        """Import the module and return the object the entry point names."""
        target = self.value.partition("[")[0].strip()  # extras ("mod:obj [extra]") are ignored
        module, _, attribute = target.partition(":")
        obj: Any = importlib.import_module(module.strip())
        for part in filter(None, attribute.strip().split(".")):
            obj = getattr(obj, part)
        return obj


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError):
        return None  # absent (or not a directory: an .egg-info file), as importlib.metadata


def _group_lines(text: str, group: str) -> Iterator[tuple[str, str]]:
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == group and "=" in line:
            name, _, value = line.partition("=")
            yield name.strip(), value.strip()


def _headers(info: str, fallback_name: str, fallback_version: str) -> tuple[str, str]:
    """``Name`` and ``Version`` from the metadata file's header block (before the body)."""
    name, version = fallback_name, fallback_version
    for filename in ("METADATA", "PKG-INFO"):
        text = _read(os.path.join(info, filename))
        if text is None:
            continue
        for line in text.splitlines():
            if not line.strip():
                break  # end of the headers
            key, _, value = line.partition(":")
            if key.lower() == "name":
                name = value.strip()
            elif key.lower() == "version":
                version = value.strip()
        break
    return name, version


def _needs_importlib_metadata(paths: list[str]) -> bool:
    if any(os.path.isfile(entry) for entry in paths):  # a zip archive on sys.path
        return True
    path_finder = importlib.machinery.PathFinder
    return any(
        finder is not path_finder and hasattr(finder, "find_distributions")
        for finder in sys.meta_path
    )


def _from_importlib_metadata(group: str) -> list[EntryPoint]:
    from importlib import metadata

    return [
        EntryPoint(
            ep.name,
            ep.value,
            ep.dist.name if ep.dist is not None else "?",
            ep.dist.version if ep.dist is not None else "?",
        )
        for ep in metadata.entry_points(group=group)
    ]


def entry_points(group: str) -> list[EntryPoint]:
    """Every entry point of ``group`` in the installed distributions, in ``sys.path`` order."""
    paths = list(sys.path)
    if _needs_importlib_metadata(paths):
        return _from_importlib_metadata(group)
    infos: list[tuple[str, str]] = []  # (directory, child) of every *.dist-info / *.egg-info
    for entry in paths:
        directory = entry or "."
        try:
            children = os.listdir(directory)
        except OSError:
            continue  # missing or unreadable, as importlib.metadata treats it
        for child in children:
            low = child.lower()
            if low.endswith(_INFO_SUFFIXES):
                infos.append((directory, child))
            elif low.endswith(".egg"):
                return _from_importlib_metadata(group)
    seen: set[str] = set()
    found: list[EntryPoint] = []
    for directory, child in infos:
        dir_name, _, dir_version = child.rsplit(".", 1)[0].partition("-")
        key = _normalize(dir_name)
        if key in seen:
            continue
        seen.add(key)
        info = os.path.join(directory, child)
        text = _read(os.path.join(info, "entry_points.txt"))
        lines = list(_group_lines(text, group)) if text else []
        if lines:
            dist, version = _headers(info, dir_name, dir_version)
            found.extend(EntryPoint(name, value, dist, version) for name, value in lines)
    return found
