"""The factory the ``file://`` plugin registers, :func:`open_local_store` (this module is imported
when a ``file://`` store is first opened, and with it the stores)."""

from __future__ import annotations

import os

from casframe import ConfigError, Store, StoreNotFoundError, StoreURL, layout

from .blobs import LocalBlobStore
from .refs import LocalRefStore

__all__ = ["open_local_store"]

#: What a ``file://`` URL's query (or a configured store's options) may set.
_OPTIONS = ("fsync",)


def store_path(url: StoreURL) -> str:
    raw = url.netloc + url.path
    if "%" in raw:  # any byte of a name; urllib.parse (with ipaddress) only when needed
        from urllib.parse import unquote

        raw = unquote(raw, errors="surrogateescape")
    if not raw:
        raise ConfigError(f"file:// URL needs a path: {url.url!r}")
    return os.path.abspath(os.path.expanduser(raw))


def open_local_store(url: StoreURL) -> Store:
    """Factory for ``file://PATH``; creates the layout when missing (unless ``url.create`` is
    false: then a missing directory is :class:`StoreNotFoundError`). A digest function other
    than SHA-256 has its store in ``PATH/digest/NAME`` (:func:`casframe.layout.function_folder`).
    """
    url.check_options(_OPTIONS)
    function = url.digest_function_for(LocalBlobStore)
    root = store_path(url)
    if not url.create and not os.path.exists(root):
        raise StoreNotFoundError(
            f"no store at {root}: it does not exist (commands that only read do not create one)"
        )
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"{url.url}: {root} exists and is not a directory")
    fsync = url.flag("fsync")
    blobs = LocalBlobStore(root, fsync=fsync, function=function)
    refs = LocalRefStore(blobs.root, fsync=fsync)
    shown = f"file://{root}"
    if layout.function_folder(function):
        shown += f"?digest_function={function.name}"
    return Store(blobs, refs, url=shown)
