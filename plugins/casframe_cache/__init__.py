"""The ``cache://`` backend: a read-through cache, a local store in front of a remote one.

Opened by URL, with the two stores as percent-encoded options::

    cache://?local=file:///var/cache/cas&remote=s3://bucket/prefix

or as a named store in the configuration file, where ``local`` and ``remote`` may also name
other configured stores (or be paths, meaning ``file://``)::

    [stores.ci]
    url = "cache://"
    [stores.ci.options]
    local = "/var/cache/cas"
    remote = "s3://bucket/prefix?region=eu-west-1"

A nested URL with a query of its own must be percent-encoded inside a ``cache://`` URL
(``urllib.parse.quote(url, safe="")``), or its ``&`` would split the outer query. Reads are
served from local and fill it from the remote; writes go to both; refs live on the remote;
:mod:`casframe_cache.store` has the rules and docs/cache.md the reasons.

It is built on casframe's public API only (the ``StoreOpener`` its factory receives, ``Store``),
like any third-party backend composed of others. Opening never loops: a cache that leads back to
itself through store names is refused with a :class:`ConfigError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from casframe import hookimpl

if TYPE_CHECKING:
    from casframe import BackendRegistry
    from casframe_cache.factory import open_cache_store
    from casframe_cache.store import CacheBlobStore, CacheRefStore, CacheStats, cache_store

__all__ = ["CacheBlobStore", "CacheRefStore", "CacheStats", "cache_store", "open_cache_store"]

# Public names, imported on first use: loading the plugin must not load protobuf.
_LAZY = {
    "CacheBlobStore": "casframe_cache.store",
    "CacheRefStore": "casframe_cache.store",
    "CacheStats": "casframe_cache.store",
    "cache_store": "casframe_cache.store",
    "open_cache_store": "casframe_cache.factory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def casframe_register_backends(registry: BackendRegistry) -> None:
    registry.add(
        "cache",
        "casframe_cache.factory:open_cache_store",
        description="local store in front of a remote (read-through)",
    )
