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

It is built on casframe's public API only (``open_store``, the configuration, ``Store``), like
any third-party backend composed of others. Opening never loops: a cache that leads back to
itself through store names is refused with a :class:`ConfigError`.
"""

from __future__ import annotations

from contextvars import ContextVar

from casframe import ConfigError, Store, StoreURL, hookimpl, open_store
from casframe.config import active_config
from casframe_cache.store import CacheBlobStore, CacheRefStore, CacheStats, cache_store

__all__ = ["CacheBlobStore", "CacheRefStore", "CacheStats", "cache_store", "open_cache_store"]

_ROLES = ("local", "remote")

# Names of configured stores being opened as a cache's local or remote, outermost first.
_opening: ContextVar[tuple[str, ...]] = ContextVar("casframe_cache_opening", default=())


def open_cache_store(url: StoreURL) -> Store:
    """Factory for ``cache://?local=STORE&remote=STORE`` (URLs, configured names or paths)."""
    if url.netloc or url.path.strip("/"):
        raise ConfigError(
            f"{url.url}: cache:// takes no host or path; give its stores as options: "
            "cache://?local=URL&remote=URL"
        )
    unknown = sorted(set(url.options) - set(_ROLES))
    if unknown:
        raise ConfigError(
            f"{url.url}: unknown cache:// option {unknown[0]!r} (expected: local, remote); "
            "percent-encode a nested URL that has a query of its own"
        )
    absent = [role for role in _ROLES if not url.options.get(role, "").strip()]
    if absent:
        raise ConfigError(
            f"{url.url}: cache:// needs a {' and a '.join(absent)} store "
            "(cache://?local=URL&remote=URL; a URL, a configured store name or a path each)"
        )
    local = _open_role(url, "local")
    try:
        remote = _open_role(url, "remote")
    except BaseException:
        local.close()
        raise
    try:
        if local.url == remote.url:
            raise ConfigError(
                f"{url.url}: the cache's local and remote are the same store ({local.url})"
            )
        return cache_store(local, remote)
    except BaseException:
        try:
            local.close()
        finally:
            remote.close()
        raise


def _open_role(url: StoreURL, role: str) -> Store:
    """Open the store given as option ``role``, refusing a cycle of configured names."""
    value = url.options[role].strip()
    config = active_config()
    chain = _opening.get()
    name = value if "://" not in value and value in config.stores else None
    if name is not None and name in chain:
        raise ConfigError(
            f"store {name!r} leads back to itself as a cache's local or remote store: "
            f"{' -> '.join((*chain, name))}"
        )
    try:
        target, options = config.resolve_store(value)
    except ConfigError as exc:
        raise ConfigError(f"{url.url}: cache:// {role}={value!r}: {exc}") from None
    token = _opening.set((*chain, name) if name is not None else chain)
    try:
        return open_store(target, options)
    finally:
        _opening.reset(token)


@hookimpl
def casframe_register_backends(registry) -> None:  # type: ignore[no-untyped-def]
    registry.add(
        "cache", open_cache_store, description="local store in front of a remote (read-through)"
    )
