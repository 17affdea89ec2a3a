"""Named stores from the user's TOML configuration file, and the default store.

The file lives at ``$CASFRAME_CONFIG`` or, failing that, ``config.toml`` in the user config
directory (``~/.config/casframe/`` on Linux); a missing file is an empty configuration::

    default_store = "ci"              # optional: a store name, a URL or a path
    [stores.ci]
    url = "s3://bucket/prefix"        # a URL, or a path (relative to this file's folder)
    [stores.ci.options]               # optional, passed to open_store(url, options)
    region = "eu-west-1"

Wherever a store is expected, one can give a URL (``SCHEME://...``), the name of a store defined
here, or a directory path (``./cache``, ``/srv/cas``), which means ``file://ABSPATH``. Without
any, the default store is ``$CASFRAME_STORE``, else ``default_store``, else ``file://`` under
the user cache directory. This module only reads configuration; it never writes a file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from casframe.errors import ConfigError

if TYPE_CHECKING:
    from casframe.store import Store

__all__ = [
    "Config",
    "StoreEntry",
    "active_config",
    "builtin_default_store_url",
    "config_path",
    "default_store_url",
    "load_config",
    "open_configured_store",
]

CONFIG_ENV = "CASFRAME_CONFIG"
STORE_ENV = "CASFRAME_STORE"

# Store names are single words so that they never look like a path or a URL.
_STORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TOP_LEVEL_KEYS = {"default_store", "stores", "remotes"}
_STORE_KEYS = {"url", "options"}

# The configuration a store is being opened from, for backends that open other stores by name.
_opening_config: ContextVar[Config | None] = ContextVar("casframe_opening_config", default=None)


@dataclass(frozen=True)
class StoreEntry:
    """One ``[stores.NAME]`` table: a URL and the options passed to its backend."""

    name: str
    url: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """A parsed configuration file.

    ``path`` is the file that was consulted and ``exists`` whether it was there; both serve
    error messages. ``default_store`` is the file's own setting, already checked.
    """

    path: str
    exists: bool = False
    stores: Mapping[str, StoreEntry] = field(default_factory=dict)
    default_store: str | None = None

    def default_choice(self) -> str:
        """What to open when no store is named: env var, then file setting, then built-in."""
        return os.environ.get(STORE_ENV) or self.default_store or builtin_default_store_url()

    def resolve_store(self, name_or_url: str | None) -> tuple[str, dict[str, Any]]:
        """``(url, options)`` for a URL, a configured store name, a path, or ``None``.

        ``None`` means the default store (see :meth:`default_choice`).
        """
        if name_or_url is None:
            name_or_url = self.default_choice()
        if not name_or_url:
            raise ConfigError("empty store name or URL")
        if "://" in name_or_url:
            return name_or_url, {}
        entry = self.stores.get(name_or_url)
        if entry is not None:
            return entry.url, dict(entry.options)
        if _looks_like_path(name_or_url):
            return _path_url(name_or_url), {}
        defined = ", ".join(sorted(self.stores)) or "none"
        where = self.path if self.exists else f"{self.path} (no such file)"
        raise ConfigError(
            f"unknown store {name_or_url!r}: not a URL and not a store defined in {where} "
            f"(defined: {defined}); write ./{name_or_url} to mean a directory"
        )


def config_path() -> str:
    """Where the configuration file is looked for (it need not exist)."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    import platformdirs

    return os.path.join(platformdirs.user_config_dir("casframe"), "config.toml")


def builtin_default_store_url() -> str:
    """``file://`` + the ``store`` folder in the user cache directory (XDG on Linux)."""
    import platformdirs

    return "file://" + os.path.join(platformdirs.user_cache_dir("casframe"), "store")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration file.

    ``path`` given explicitly must exist; the file found through ``$CASFRAME_CONFIG`` or the
    user config directory may be missing, which is an empty configuration.
    """
    explicit = path is not None
    where = os.path.abspath(os.fspath(path)) if path is not None else config_path()
    try:
        with open(where, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{where}: configuration file not found") from None
        return Config(path=where, exists=False)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    return _parse(where, data)


def default_store_url(config: Config | None = None) -> str:
    """The URL of the store used when none is named (see :meth:`Config.default_choice`)."""
    return (config or load_config()).resolve_store(None)[0]


def open_configured_store(name_or_url: str | None = None, *, config: Config | None = None) -> Store:
    """Open a store given as a URL, a configured name, a path, or ``None`` for the default."""
    from casframe.plugins import open_store

    config = config or load_config()
    url, options = config.resolve_store(name_or_url)
    token = _opening_config.set(config)
    try:
        return open_store(url, options)
    finally:
        _opening_config.reset(token)


def active_config() -> Config:
    """The configuration the store being opened comes from; else the user's file.

    For backends composed of other stores (``cache://``): while :func:`open_configured_store`
    runs a factory, a store name given in that factory's options resolves in the same
    configuration (the CLI's ``--config`` file, say), not only in the default one.
    """
    return _opening_config.get() or load_config()


# -- parsing ------------------------------------------------------------------------------------


def _looks_like_path(text: str, *, existing: bool = True) -> bool:
    """A path is spelled like one, or (with ``existing``) names a directory that exists."""
    if "/" in text or os.sep in text or text.startswith((".", "~")):
        return True
    return existing and os.path.isdir(text)


def _path_url(path: str, base: str | None = None) -> str:
    expanded = os.path.expanduser(path)
    if base is not None and not os.path.isabs(expanded):
        expanded = os.path.join(base, expanded)
    return "file://" + os.path.abspath(expanded)


def _parse(path: str, data: dict[str, Any]) -> Config:
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: {problem}")

    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise fail(
            f"unknown setting {unknown[0]!r} (expected: {', '.join(sorted(_TOP_LEVEL_KEYS))})"
        )
    # [remotes.NAME] is reserved for push/pull defaults in a later version; accepted, unused.
    if not isinstance(data.get("remotes", {}), dict):
        raise fail("'remotes' must be a table")

    base = os.path.dirname(path)
    raw_stores = data.get("stores", {})
    if not isinstance(raw_stores, dict):
        raise fail("'stores' must be a table of [stores.NAME] tables")
    stores: dict[str, StoreEntry] = {}
    for name, table in raw_stores.items():
        if not _STORE_NAME.fullmatch(name):
            raise fail(
                f"invalid store name {name!r}: use letters, digits, '_', '.' and '-', "
                "starting with a letter or digit"
            )
        if not isinstance(table, dict):
            raise fail(f"[stores.{name}] must be a table with a 'url'")
        extra = sorted(set(table) - _STORE_KEYS)
        if extra:
            raise fail(f"[stores.{name}]: unknown key {extra[0]!r} (expected: url, options)")
        url = table.get("url")
        if not isinstance(url, str) or not url:
            raise fail(f"[stores.{name}]: 'url' must be a non-empty string")
        if "://" not in url:
            url = _path_url(url, base)
        options = table.get("options", {})
        if not isinstance(options, dict):
            raise fail(f"[stores.{name}.options] must be a table")
        for key, value in options.items():
            if isinstance(value, bool | int | float | str):
                continue
            raise fail(
                f"[stores.{name}.options]: {key!r} must be a string, number or boolean, "
                f"not {type(value).__name__}"
            )
        stores[name] = StoreEntry(name, url, dict(options))

    default = data.get("default_store")
    if default is not None:
        if not isinstance(default, str) or not default:
            raise fail("'default_store' must be a non-empty string (a store name or URL)")
        if "://" not in default and default not in stores:
            if not _looks_like_path(default, existing=False):
                defined = ", ".join(sorted(stores)) or "none"
                raise fail(
                    f"default_store {default!r} is not a URL nor a store defined here "
                    f"(defined: {defined})"
                )
            default = _path_url(default, base)
    return Config(path=path, exists=True, stores=stores, default_store=default)
