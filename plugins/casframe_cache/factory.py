"""The ``cache://`` URL factory: opens the local and the remote store a cache:// URL names.

Imported when a ``cache://`` URL is first opened, not when plugins load (the cache's store
module needs protobuf, which commands such as ``casframe ref list`` never load).
"""

from __future__ import annotations

from casframe import ConfigError, Store, StoreOpener, StoreURL
from casframe_cache.store import CacheBlobStore, cache_store

__all__ = ["open_cache_store"]

_ROLES = ("local", "remote")


def open_cache_store(url: StoreURL, opener: StoreOpener) -> Store:
    """Factory for ``cache://?local=STORE&remote=STORE`` (URLs, configured names or paths).

    ``opener`` opens the two stores with the configuration and plugins the cache itself is
    opened with, and refuses configured names that lead back to the cache. Both are opened
    with the cache's digest function.
    """
    url.digest_function_for(CacheBlobStore)
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
    local = _open_role(url, "local", opener)
    try:
        remote = _open_role(url, "remote", opener)
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


def _open_role(url: StoreURL, role: str, opener: StoreOpener) -> Store:
    """Open the store given as option ``role``."""
    value = url.options[role].strip()
    try:
        opener.config.resolve_store(value)  # checked first, so that the error names the option
    except ConfigError as exc:
        raise ConfigError(f"{url.url}: cache:// {role}={value!r}: {exc}") from None
    return opener.open(value, digest_function=url.digest_function.name)
