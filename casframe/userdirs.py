"""Folders casframe keeps in the user cache directory, each movable or turned off by a variable.

``CASFRAME_STAT_CACHE`` (digests of imported files, :mod:`casframe.statcache`) and
``CASFRAME_ENTRY_POINT_CACHE`` (installed plugins, :mod:`casframe.entrypoints`) name a folder
to use instead, or say ``off`` (also ``0``, ``false``, ``no``) to keep nothing.
"""

from __future__ import annotations

import os

__all__ = ["OFF_WORDS", "cache_folder"]

#: Values of a cache variable that turn the cache off.
OFF_WORDS = frozenset({"off", "0", "false", "no"})


def cache_folder(variable: str, name: str) -> str | None:
    """``$variable`` if set, else folder ``name`` of the user cache directory; ``None``: off."""
    configured = os.environ.get(variable, "").strip()
    if configured.lower() in OFF_WORDS:
        return None
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    import platformdirs  # third party, and slow to import: only when no variable says where

    return os.path.join(platformdirs.user_cache_dir("casframe"), name)
