"""Named stores and remotes from TOML configuration files, and the default store.

The user's file lives at ``$CASFRAME_CONFIG`` or, failing that, ``config.toml`` in the user
config directory (``~/.config/casframe/`` on Linux); a missing file is an empty configuration::

    default_store = "ci"              # optional: a store name, a URL or a path
    [stores.ci]
    url = "s3://bucket/prefix"        # a URL, or a path (relative to this file's folder)
    [stores.ci.options]               # optional, passed to open_store(url, options)
    region = "eu-west-1"

    [remotes.team]                    # pulled from, in file order; pushed to with push = true
    url = "grpcs://cache.example.com/main"
    push = false                      # optional (default false); pull = false skips pulls
    timeout = 5                       # optional: seconds to wait for it to answer (default 10)
    server_cert = "certs/ca.pem"      # optional TLS files, relative to this file's folder
    [remotes.team.options]            # optional, passed to open_store(url, options)

A project names its own remotes in a ``casframe.toml`` (:data:`PROJECT_FILE`) holding only
``[remotes.NAME]`` tables, found in the working directory or the nearest parent that has one.
The remotes of the user's file come first, then the project's; a user remote with the name of
a project remote replaces it (to add credentials or point it at a mirror).

Wherever a store is expected, one can give a URL (``SCHEME://...``), the name of a store defined
here, or a directory path (``./cache``, ``/srv/cas``), which means ``file://ABSPATH``. Without
any, the default store is ``$CASFRAME_STORE``, else ``default_store``, else ``file://`` under
the user cache directory. This module only reads configuration: it never writes a file and
never opens a store (:func:`casframe.plugins.open_configured_store` does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from casframe.errors import ConfigError
from casframe.lazy import lazy_module
from casframe.userdirs import user_dir
from casframe.values import value_class, value_field

if TYPE_CHECKING:
    from urllib import parse
else:  # with ipaddress, a tenth of a short command: only for paths that need quoting
    parse = lazy_module("urllib.parse")

__all__ = [
    "DEFAULT_REMOTE_TIMEOUT",
    "PROJECT_FILE",
    "Config",
    "RemoteEntry",
    "StoreEntry",
    "builtin_default_store_url",
    "config_path",
    "configured_remotes",
    "default_store_url",
    "find_project_file",
    "load_config",
    "load_project_remotes",
]

CONFIG_ENV = "CASFRAME_CONFIG"
STORE_ENV = "CASFRAME_STORE"
#: The file that names a project's remotes, looked for from the working directory upwards.
PROJECT_FILE = "casframe.toml"
#: Seconds a remote has to answer before it is reported unreachable. Long enough for a TLS
#: handshake across continents and a retried connection, short enough that a dead mirror
#: does not hold a build up.
DEFAULT_REMOTE_TIMEOUT = 10.0

# Store and remote names are single words so that they never look like a path or a URL.
_STORE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # compiled by re on first use
_TOP_LEVEL_KEYS = {"default_store", "stores", "remotes"}
_PROJECT_KEYS = {"remotes"}
_STORE_KEYS = ("url", "options")
# TLS files a remote may name at its top level; they reach the backend as options, with
# relative paths resolved against the configuration file's folder.
_TLS_KEYS = ("server_cert", "client_key", "client_cert")
_REMOTE_KEYS = ("url", "push", "pull", "timeout", *_TLS_KEYS, "options")

@value_class
class StoreEntry:
    """One ``[stores.NAME]`` table: a URL and the options passed to its backend."""

    name: str
    url: str
    options: Mapping[str, Any] = value_field(default_factory=dict)


@value_class
class RemoteEntry:
    """One ``[remotes.NAME]`` table: a store pulled from and, with ``push``, pushed to.

    ``options`` (TLS files included) go to the backend with the URL; ``timeout`` is how many
    seconds the remote has to answer the checks before a transfer; ``source`` is the file
    that defined it (for messages).
    """

    name: str
    url: str
    push: bool = False
    pull: bool = True
    timeout: float = DEFAULT_REMOTE_TIMEOUT
    options: Mapping[str, Any] = value_field(default_factory=dict)
    source: str = ""


@value_class
class Config:
    """A parsed configuration file.

    ``path`` is the file that was consulted and ``exists`` whether it was there; both serve
    error messages. ``default_store`` is the file's own setting, already checked.
    """

    path: str
    exists: bool = False
    stores: Mapping[str, StoreEntry] = value_field(default_factory=dict)
    default_store: str | None = None
    #: The user's remotes, in file order.
    remotes: Mapping[str, RemoteEntry] = value_field(default_factory=dict)

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
    return os.path.join(user_dir("config"), "config.toml")


def builtin_default_store_url() -> str:
    """``file://`` + the ``store`` folder in the user cache directory (XDG on Linux)."""
    return "file://" + os.path.join(user_dir("cache"), "store")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration file.

    ``path`` given explicitly must exist; the file found through ``$CASFRAME_CONFIG`` or the
    user config directory may be missing, which is an empty configuration.
    """
    explicit = path is not None
    where = os.path.abspath(os.fspath(path)) if path is not None else config_path()
    try:
        data = _read_toml(where)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{where}: configuration file not found") from None
        return Config(path=where, exists=False)
    return _parse(where, data)


def _read_toml(where: str) -> dict[str, Any]:
    """A TOML file's content; a missing file raises FileNotFoundError, other trouble
    :class:`ConfigError`."""
    try:
        with open(where, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    import tomllib  # compiles its regular expressions on import: only when there is a file

    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:  # TOML is UTF-8: say where the first bad byte is
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{where}: invalid TOML: not UTF-8 text: byte 0x{raw[exc.start]:02x} "
            f"(at line {line}, column {column})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None


def find_project_file(start: str | os.PathLike[str] | None = None) -> str | None:
    """The nearest :data:`PROJECT_FILE` in ``start`` (default: the working directory) or one
    of its parents, or ``None`` when there is none."""
    folder = os.path.abspath(os.fspath(start) if start is not None else os.getcwd())
    while True:
        candidate = os.path.join(folder, PROJECT_FILE)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def load_project_remotes(path: str | os.PathLike[str]) -> tuple[RemoteEntry, ...]:
    """The ``[remotes.NAME]`` tables of a project file, in file order."""
    where = os.path.abspath(os.fspath(path))
    data = _read_toml(where)
    unknown = sorted(set(data) - _PROJECT_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting {unknown[0]!r} (a project file holds only "
            "[remotes.NAME] tables)"
        )
    return tuple(_parse_remotes(where, data).values())


def configured_remotes(
    config: Config | None = None, *, project_dir: str | os.PathLike[str] | None = None
) -> tuple[RemoteEntry, ...]:
    """Every configured remote in order: the user's, then the project's not redefined by the
    user. The project file is looked for from ``project_dir`` (default: the working
    directory) upwards."""
    config = config or load_config()
    remotes = dict(config.remotes)
    project_file = find_project_file(project_dir)
    if project_file is not None:
        for entry in load_project_remotes(project_file):
            remotes.setdefault(entry.name, entry)
    return tuple(remotes.values())


def default_store_url(config: Config | None = None) -> str:
    """The URL of the store used when none is named (see :meth:`Config.default_choice`)."""
    return (config or load_config()).resolve_store(None)[0]


# -- parsing ------------------------------------------------------------------------------------


def _looks_like_path(text: str, *, existing: bool = True) -> bool:
    """A path is spelled like one, or (with ``existing``) names a directory that exists."""
    if "/" in text or os.sep in text or text.startswith((".", "~")):
        return True
    return existing and os.path.isdir(text)


def _absolute_path(path: str, base: str | None = None) -> str:
    """``path`` with ``~`` expanded, relative to ``base`` (default: the working directory)."""
    expanded = os.path.expanduser(path)
    if base is not None and not os.path.isabs(expanded):
        expanded = os.path.join(base, expanded)
    return os.path.abspath(expanded)


# What urllib.parse.quote leaves as it is (with "/", its default safe character).
_UNQUOTED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/")


def _path_url(path: str, base: str | None = None) -> str:
    # Quoted: "#", "?" and "%" in a directory name are part of the path, not of the URL.
    absolute = _absolute_path(path, base)
    if _UNQUOTED.issuperset(absolute):  # nothing to quote (most paths)
        return "file://" + absolute
    return "file://" + parse.quote(absolute, errors="surrogateescape")


def _parse(path: str, data: dict[str, Any]) -> Config:
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: {problem}")

    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise fail(
            f"unknown setting {unknown[0]!r} (expected: {', '.join(sorted(_TOP_LEVEL_KEYS))})"
        )
    base = os.path.dirname(path)
    stores = {
        name: StoreEntry(name, url, _parse_options(path, f"stores.{name}", table))
        for name, url, table in _named_tables(path, data, "store", _STORE_KEYS)
    }

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
    return Config(
        path=path,
        exists=True,
        stores=stores,
        default_store=default,
        remotes=_parse_remotes(path, data),
    )


def _parse_options(path: str, section: str, table: dict[str, Any]) -> dict[str, Any]:
    """A ``[SECTION.options]`` table: scalar values only."""
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: [{section}.options] must be a table")
    for key, value in options.items():
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(
                f"{path}: [{section}.options]: {key!r} must be a string, number or boolean, "
                f"not {type(value).__name__}"
            )
    return dict(options)


def _named_tables(
    path: str, data: dict[str, Any], kind: str, keys: tuple[str, ...]
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(name, url, table)`` of each ``[KINDs.NAME]`` table, checked; a path as ``url``
    (relative to the file's folder) becomes a ``file://`` URL."""
    section = f"{kind}s"
    raw = data.get(section, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: '{section}' must be a table of [{section}.NAME] tables")
    for name, table in raw.items():
        if not re.fullmatch(_STORE_NAME, name):
            raise ConfigError(
                f"{path}: invalid {kind} name {name!r}: use letters, digits, '_', '.' and '-', "
                "starting with a letter or digit"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}.{name}] must be a table with a 'url'")
        extra = sorted(set(table) - set(keys))
        if extra:
            raise ConfigError(
                f"{path}: [{section}.{name}]: unknown key {extra[0]!r} "
                f"(expected: {', '.join(keys)})"
            )
        url = table.get("url")
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{path}: [{section}.{name}]: 'url' must be a non-empty string")
        if "://" not in url:
            url = _path_url(url, os.path.dirname(path))
        yield name, url, table


def _parse_remotes(path: str, data: dict[str, Any]) -> dict[str, RemoteEntry]:
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: {problem}")

    base = os.path.dirname(path)
    remotes: dict[str, RemoteEntry] = {}
    for name, url, table in _named_tables(path, data, "remote", _REMOTE_KEYS):
        section = f"remotes.{name}"
        flags = {}
        for key, default in (("push", False), ("pull", True)):
            value = table.get(key, default)
            if not isinstance(value, bool):
                raise fail(f"[{section}]: '{key}' must be true or false")
            flags[key] = value
        timeout = table.get("timeout", DEFAULT_REMOTE_TIMEOUT)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < float("inf")
        ):
            raise fail(f"[{section}]: 'timeout' must be a positive number of seconds")
        options = _parse_options(path, section, table)
        for key in _TLS_KEYS:
            if key not in table:
                continue
            value = table[key]
            if not isinstance(value, str) or not value:
                raise fail(f"[{section}]: '{key}' must be a file path")
            if key in options:
                raise fail(f"[{section}]: '{key}' is given twice (here and in its options)")
            options[key] = _absolute_path(value, base)
        remotes[name] = RemoteEntry(
            name, url, push=flags["push"], pull=flags["pull"], timeout=float(timeout),
            options=options, source=path,
        )
    return remotes
