"""Plugin loading: the pluggy manager, built on first use from the ``casframe`` entry points.

casframe's own backends are entry points of the ``casframe`` distribution and load through the
same path as any third party's. Two environment switches control loading:

``CASFRAME_DISABLE_PLUGIN_AUTOLOAD=1``
    load only the plugins that ship with casframe itself;
``CASFRAME_BLOCK_PLUGINS=name,other``
    never load the named plugins (entry-point names, as ``casframe plugins`` shows them).

Nothing is loaded at import time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from casframe import hookspecs
from casframe.registry import BackendRegistry, StoreURL
from casframe.treesize import TREE_LIMIT_OPTIONS, TreeLimits
from casframe.workers.settings import JOBS_OPTION, jobs_from_options

if TYPE_CHECKING:
    from casframe.store import Store

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "backend_registry",
    "get_plugin_manager",
    "list_plugins",
    "open_store",
    "registered_plugin",
    "reset_plugin_manager",
]

ENTRY_POINT_GROUP = "casframe"
_OWN_DISTRIBUTION = "casframe"

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
_plugin_dists: dict[str, tuple[str, str]] = {}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    schemes: tuple[str, ...]
    blocked: bool = False


def _blocked_names() -> set[str]:
    raw = os.environ.get("CASFRAME_BLOCK_PLUGINS", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _autoload_disabled() -> bool:
    return os.environ.get("CASFRAME_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
    )


def _build_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("casframe")
    pm.add_hookspecs(hookspecs)
    blocked = _blocked_names()
    only_own = _autoload_disabled()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist is not None else "?"
        dist_version = ep.dist.version if ep.dist is not None else "?"
        if only_own and dist_name != _OWN_DISTRIBUTION:
            continue
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            _plugin_dists[ep.name] = (dist_name, dist_version)
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        pm.register(ep.load(), name=ep.name)
        _plugin_dists[ep.name] = (dist_name, dist_version)
    pm.check_pending()
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built from entry points on first call."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = _build_manager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the manager so the next use reloads plugins (after changing the switches)."""
    global _manager
    with _lock:
        _manager = None
        _plugin_dists.clear()


@contextmanager
def registered_plugin(plugin: object, name: str | None = None) -> Iterator[str]:
    """Register ``plugin`` for the duration of a ``with`` block (tests, embedding)."""
    pm = get_plugin_manager()
    registered = pm.register(plugin, name=name)
    if registered is None:
        raise ValueError(f"plugin {name!r} is blocked or already registered")
    try:
        yield registered
    finally:
        pm.unregister(plugin)


def backend_registry() -> BackendRegistry:
    """A fresh registry filled by every loaded plugin's ``casframe_register_backends``."""
    pm = get_plugin_manager()
    registry = BackendRegistry()
    # Oldest registration first, so the built-ins come before third parties; each call is made
    # separately so the registry knows which plugin owns each scheme.
    for impl in pm.hook.casframe_register_backends.get_hookimpls():
        registry.current_plugin = impl.plugin_name
        impl.function(registry=registry)
    registry.current_plugin = "<direct>"
    return registry


def list_plugins() -> list[PluginInfo]:
    """Every plugin that was found: name, distribution, version, schemes, blocked or not."""
    pm = get_plugin_manager()
    registry = backend_registry()
    infos = []
    names = [pm.get_name(p) or "?" for p in pm.get_plugins()]
    for name in sorted(set(names) | set(_plugin_dists)):
        dist, version = _plugin_dists.get(name, ("(registered in code)", ""))
        schemes = tuple(e.scheme for e in registry.entries() if e.plugin == name)
        infos.append(PluginInfo(name, dist, version, schemes, blocked=pm.is_blocked(name)))
    return infos


def open_store(
    url: str, options: Mapping[str, Any] | None = None, *, create: bool = True
) -> Store:
    """Open the store at ``url`` through the plugin that registered its scheme.

    The options every store takes (``max_tree_entries``, ``max_tree_bytes``: see
    :class:`~casframe.treesize.TreeLimits`; ``jobs``: see :attr:`~casframe.Store.jobs`) are
    read here and never reach the backend. With
    ``create=False`` a store that does not exist yet is not created: opening it raises
    :class:`~casframe.StoreNotFoundError` (for commands that only read, where a mistyped path
    would otherwise leave an empty store behind).
    """
    parsed = StoreURL.parse(url, options, create=create)
    limits = TreeLimits.from_options(parsed.options, url)
    jobs = jobs_from_options(parsed.options, url)
    core_options = (*TREE_LIMIT_OPTIONS, JOBS_OPTION)
    backend_options = {k: v for k, v in parsed.options.items() if k not in core_options}
    factory = backend_registry().get(parsed.scheme).load()
    store = factory(replace(parsed, options=backend_options))
    store.tree_limits = limits
    if jobs is not None:
        store.jobs = jobs
    return store
