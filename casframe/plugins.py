"""Plugins and opening stores through them: the pluggy manager, built on first use from the
``casframe`` entry points, its scheme registry, and :class:`StoreOpener`, which resolves a URL
or a configured name to the factory of the plugin that registered its scheme.

Hooks are called through pluggy; where the plugin behind a result must be known,
:func:`each_plugin` is the one place that splits a hook call per plugin. casframe's own backends
are entry points of the ``casframe`` distribution and load through the same path as any third
party's. Two environment switches control loading:

``CASFRAME_DISABLE_PLUGIN_AUTOLOAD=1``
    load only the plugins that ship with casframe itself;
``CASFRAME_BLOCK_PLUGINS=name,other``
    never load the named plugins (entry-point names, as ``casframe plugins`` shows them).

Nothing is loaded at import time.
"""

from __future__ import annotations

import inspect
import os
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pluggy

from casframe import hookspecs
from casframe.entrypoints import entry_points
from casframe.errors import ConfigError, UnsupportedDigestFunctionError
from casframe.lazy import lazy_module
from casframe.values import replace, value_class

if TYPE_CHECKING:
    from casframe import config, registry, treesize
    from casframe.config import Config
    from casframe.registry import BackendRegistry, Factory, StoreURL
    from casframe.store import Store
    from casframe.workers import settings
else:  # for opening stores: `casframe --help` only asks the plugins for their commands
    config = lazy_module("casframe.config")
    registry = lazy_module("casframe.registry")
    settings = lazy_module("casframe.workers.settings")
    treesize = lazy_module("casframe.treesize")

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "PluginManager",
    "StoreOpener",
    "backend_registry",
    "each_plugin",
    "get_plugin_manager",
    "list_plugins",
    "open_configured_store",
    "open_store",
    "registered_plugin",
    "reset_plugin_manager",
]

ENTRY_POINT_GROUP = "casframe"
_OWN_DISTRIBUTION = "casframe"

_lock = threading.Lock()
_manager: PluginManager | None = None
# Set by reset_plugin_manager: the next build reads installed metadata, not the cache.
_read_fresh = False


@value_class
class PluginInfo:
    name: str
    distribution: str
    version: str
    schemes: tuple[str, ...]
    blocked: bool = False


_FUNCTION = types.FunctionType


class PluginManager(pluggy.PluginManager):
    """casframe's pluggy manager: the hook specs, where each plugin came from, and the scheme
    registry, built on first use and built again only after a plugin is registered or
    unregistered."""

    def __init__(self) -> None:
        super().__init__("casframe")
        self.add_hookspecs(hookspecs)
        #: Plugin name -> (distribution, version) of the entry points found, blocked ones too.
        self.distributions: dict[str, tuple[str, str]] = {}
        self._registry: BackendRegistry | None = None
        self._registry_lock = threading.RLock()

    def register(self, plugin: object, name: str | None = None) -> str | None:
        with self._registry_lock:
            self._registry = None
            return super().register(plugin, name)

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        # A plugin module's names that hold no function are no hook implementations: skipped
        # here, without pluggy's static lookup of each (3 M instructions of every command).
        # Whatever any pluggy release takes for one (a routine) is still asked about.
        if isinstance(plugin, types.ModuleType) and not (
            isinstance(value := vars(plugin).get(name), _FUNCTION)
            or inspect.isroutine(value) or isinstance(value, (staticmethod, classmethod))
        ):
            return None
        return super().parse_hookimpl_opts(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any | None:
        with self._registry_lock:
            self._registry = None
            return super().unregister(plugin, name)

    def backend_registry(self) -> BackendRegistry:
        """The schemes every plugin registers through ``casframe_register_backends``."""
        with self._registry_lock:
            if self._registry is None:
                schemes = registry.BackendRegistry()
                for plugin, call in each_plugin(self, "casframe_register_backends"):
                    call(registry=schemes.for_plugin(plugin))
                schemes.freeze()
                self._registry = schemes
            return self._registry


def each_plugin(
    pm: pluggy.PluginManager, hook_name: str
) -> Iterator[tuple[str, pluggy.HookCaller]]:
    """``(plugin name, caller)`` for each plugin implementing ``hook_name``, oldest first.

    For the hooks whose results or errors must name the plugin they came from. Each caller is
    pluggy's own, restricted to that plugin's implementations (wrappers and omitted arguments
    work as with ``pm.hook.NAME``); the order is the registration order, built-ins first.
    """
    hook: pluggy.HookCaller = getattr(pm.hook, hook_name)
    implementing: list[object] = []
    for impl in hook.get_hookimpls():  # oldest registration first (a call runs newest first)
        if impl.plugin not in implementing:
            implementing.append(impl.plugin)
    for plugin in implementing:
        others = [p for p in pm.get_plugins() if p is not plugin]
        yield pm.get_name(plugin) or "?", pm.subset_hook_caller(hook_name, others)


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


def _build_manager(fresh: bool) -> PluginManager:
    pm = PluginManager()
    blocked = _blocked_names()
    only_own = _autoload_disabled()
    for ep in entry_points(ENTRY_POINT_GROUP, fresh=fresh):
        dist_name, dist_version = ep.distribution, ep.version
        if only_own and dist_name != _OWN_DISTRIBUTION:
            continue
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            pm.distributions[ep.name] = (dist_name, dist_version)
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        pm.register(ep.load(), name=ep.name)
        pm.distributions[ep.name] = (dist_name, dist_version)
    pm.check_pending()
    return pm


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built from entry points on first call."""
    global _manager, _read_fresh
    with _lock:
        if _manager is None:
            _manager = _build_manager(_read_fresh)
            _read_fresh = False
        return _manager


def reset_plugin_manager() -> None:
    """Forget the manager so the next use reloads plugins (after changing the switches).

    The next use reads the installed distributions' metadata afresh rather than the entry
    points remembered in the user cache directory (see :mod:`casframe.entrypoints`).
    """
    global _manager, _read_fresh
    with _lock:
        _manager = None
        _read_fresh = True


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
    """The scheme registry of the process-wide plugin manager (built once, then reused)."""
    return get_plugin_manager().backend_registry()


def list_plugins() -> list[PluginInfo]:
    """Every plugin that was found: name, distribution, version, schemes, blocked or not."""
    pm = get_plugin_manager()
    registry = pm.backend_registry()
    infos = []
    names = [pm.get_name(p) or "?" for p in pm.get_plugins()]
    for name in sorted(set(names) | set(pm.distributions)):
        dist, version = pm.distributions.get(name, ("(registered in code)", ""))
        schemes = tuple(e.scheme for e in registry.entries() if e.plugin == name)
        infos.append(PluginInfo(name, dist, version, schemes, blocked=pm.is_blocked(name)))
    return infos


class StoreOpener:
    """Opens stores as the store being opened was: same configuration, same plugins.

    A backend factory that takes a second argument, ``factory(url, opener)``, receives one, so
    that a backend composed of other stores (``cache://``) opens them by URL, by a name of the
    configuration the outer store came from (the CLI's ``--config`` file, say), or by path. A
    chain of configured names that leads back to a store being opened is refused.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        plugin_manager: PluginManager | None = None,
        opening: tuple[str, ...] = (),
    ) -> None:
        self._config = config
        self._pm = plugin_manager
        self._opening = opening

    @property
    def config(self) -> Config:
        """The configuration names resolve in: the one given, else the user's file."""
        if self._config is None:
            self._config = config.load_config()
        return self._config

    @property
    def plugin_manager(self) -> PluginManager:
        if self._pm is None:
            self._pm = get_plugin_manager()
        return self._pm

    def open(
        self,
        name_or_url: str | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        create: bool = True,
        digest_function: str | None = None,
    ) -> Store:
        """Open a store given as a URL, a configured name, a path, or ``None`` (the default
        store); ``options`` are merged over the configured ones. ``create`` and
        ``digest_function`` as in :func:`open_store`."""
        if digest_function is not None:
            options = {**(options or {}), registry.DIGEST_FUNCTION_OPTION: digest_function}
        names = self.config
        choice = name_or_url if name_or_url is not None else names.default_choice()
        url, configured = names.resolve_store(choice)
        opening = self._opening
        if "://" not in choice and choice in names.stores:
            if choice in opening:
                raise ConfigError(
                    f"store {choice!r} leads back to itself through the stores it opens: "
                    f"{' -> '.join((*opening, choice))}"
                )
            opening = (*opening, choice)
        merged = {**configured, **(options or {})}
        return self._open_url(url, merged, create, opening)

    def open_url(
        self, url: str, options: Mapping[str, Any] | None = None, *, create: bool = True
    ) -> Store:
        """Open the store at ``url`` (never a configured name), as :func:`open_store` does."""
        return self._open_url(url, options, create, self._opening)

    def _open_url(
        self, url: str, options: Mapping[str, Any] | None, create: bool, opening: tuple[str, ...]
    ) -> Store:
        parsed = registry.StoreURL.parse(url, options, create=create)
        limits = treesize.TreeLimits.from_options(parsed.options, url)
        jobs = settings.jobs_from_options(parsed.options, url)
        core_options = (*treesize.TREE_LIMIT_OPTIONS, settings.JOBS_OPTION)
        backend_options = {k: v for k, v in parsed.options.items() if k not in core_options}
        factory = self.plugin_manager.backend_registry().get(parsed.scheme).load()
        inner = StoreOpener(self._config, plugin_manager=self._pm, opening=opening)
        store = _call_factory(factory, replace(parsed, options=backend_options), inner)
        if store.digest_function != parsed.digest_function:
            # A backend that ignored the option (one that declares only sha256) opened a
            # store of another function: refuse it rather than hash with the wrong one.
            store.close()
            parsed.digest_function_for(store.blobs)
            raise UnsupportedDigestFunctionError(
                f"the {parsed.scheme}:// backend opened {url} with {store.digest_function.name}"
                f" digests, not {parsed.digest_function.name} as asked"
            )
        store.tree_limits = limits
        if jobs is not None:
            store.jobs = jobs

        def open_sibling(name: str) -> Store:
            return self._open_url(
                url, {**(options or {}), registry.DIGEST_FUNCTION_OPTION: name}, create, opening
            )

        store.adopt_sibling_opener(open_sibling)
        return store


def _call_factory(factory: Factory, url: StoreURL, opener: StoreOpener) -> Store:
    """``factory(url, opener)`` if the factory takes a second argument, else ``factory(url)``."""
    call: Callable[..., Store] = factory
    try:
        inspect.signature(call).bind(url, opener)
    except TypeError:
        return call(url)
    except ValueError:  # no signature to inspect (a builtin): the one-argument form
        return call(url)
    return call(url, opener)


def open_store(
    url: str,
    options: Mapping[str, Any] | None = None,
    *,
    create: bool = True,
    digest_function: str | None = None,
) -> Store:
    """Open the store at ``url`` through the plugin that registered its scheme.

    The options every store takes (``max_tree_entries``, ``max_tree_bytes``: see
    :class:`~casframe.treesize.TreeLimits`; ``jobs``: see :attr:`~casframe.Store.jobs`;
    ``digest_function``: see :attr:`~casframe.Store.digest_function`) are read here and never
    reach the backend's ``options``. ``digest_function`` (``"sha256"``, ``"sha384"``,
    ``"sha512"``, ``"blake3"``) overrides the option of that name; a function the backend
    cannot hold raises :class:`~casframe.UnsupportedDigestFunctionError`. With
    ``create=False`` a store that does not exist yet is not created: opening it raises
    :class:`~casframe.StoreNotFoundError` (for commands that only read, where a mistyped path
    would otherwise leave an empty store behind). Store names inside ``url`` (a ``cache://``
    store's ``local``, say) resolve in the user's configuration file.
    """
    if digest_function is not None:
        options = {**(options or {}), registry.DIGEST_FUNCTION_OPTION: digest_function}
    return StoreOpener().open_url(url, options, create=create)


def open_configured_store(
    name_or_url: str | None = None,
    *,
    config: Config | None = None,
    create: bool = True,
    digest_function: str | None = None,
) -> Store:
    """Open a store given as a URL, a configured name, a path, or ``None`` for the default.

    Names resolve in ``config`` (default: the user's file), and so do names that the store's
    backend opens in turn. ``create`` and ``digest_function`` as in :func:`open_store`.
    """
    return StoreOpener(config).open(name_or_url, create=create, digest_function=digest_function)
