"""The ``cache://`` URL factory: opens the local and the remote store a cache:// URL names.

Imported when a ``cache://`` URL is first opened, not when plugins load (the cache's store
module needs protobuf, which commands such as ``casframe ref list`` never load).
"""

from __future__ import annotations

from contextvars import ContextVar

from casframe import ConfigError, Store, StoreURL, open_store
from casframe.config import active_config
from casframe_cache.store import cache_store

__all__ = ["open_cache_store"]

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
