"""The user's cache and configuration folders, and the caches casframe keeps there.

:func:`user_dir` answers what ``platformdirs.user_cache_dir("casframe")`` and
``user_config_dir`` answer. Importing platformdirs costs a short command about as much as
everything else it does (it brings pathlib and tempfile), and every command needs the
configuration folder; so on Linux, where the XDG base directory rules are two lines, the usual
case (an absolute ``$HOME``, the XDG variable unset or absolute) is answered here, and every
other case, and every other system, by platformdirs (tests compare the two).

``CASFRAME_STAT_CACHE`` (digests of imported files, :mod:`casframe.statcache`) and
``CASFRAME_ENTRY_POINT_CACHE`` (installed plugins, :mod:`casframe.entrypoints`) name a folder
to use instead, or say ``off`` (also ``0``, ``false``, ``no``) to keep nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Literal

__all__ = ["OFF_WORDS", "cache_folder", "user_dir"]

_XDG = {"cache": ("XDG_CACHE_HOME", ".cache"), "config": ("XDG_CONFIG_HOME", ".config")}

#: Values of a cache variable that turn the cache off.
OFF_WORDS = frozenset({"off", "0", "false", "no"})


def cache_folder(variable: str, name: str) -> str | None:
    """``$variable`` if set, else folder ``name`` of the user cache directory; ``None``: off."""
    configured = os.environ.get(variable, "").strip()
    if configured.lower() in OFF_WORDS:
        return None
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    return os.path.join(user_dir("cache"), name)


def user_dir(kind: Literal["cache", "config"]) -> str:
    """casframe's folder in the user cache or configuration directory (it need not exist)."""
    variable, default = _XDG[kind]
    if sys.platform == "linux" and "ANDROID_DATA" not in os.environ:
        xdg = os.environ.get(variable, "")
        home = os.environ.get("HOME", "")
        if os.path.isabs(xdg):
            return os.path.join(xdg, "casframe")
        if not xdg and os.path.isabs(home):
            return os.path.join(home, default, "casframe")
    import platformdirs  # third party, and slow to import: only where the rules are longer

    if kind == "cache":
        return platformdirs.user_cache_dir("casframe")
    return platformdirs.user_config_dir("casframe")
