"""The scheme registry that ``casframe_register_backends`` fills, and store URL parsing.

Factories may be given as ``"module:attribute"`` strings and are imported only when a store of
that scheme is opened, so that an optional dependency (boto3 for ``s3://``) costs nothing at
start-up and its absence produces an install hint instead of an ImportError.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from casframe.digestfunctions import SHA256, DigestFunction, by_name
from casframe.errors import (
    ConfigError,
    DuplicateSchemeError,
    MissingDependencyError,
    UnknownSchemeError,
    UnsupportedDigestFunctionError,
)
from casframe.lazy import lazy_module
from casframe.values import value_class, value_field

if TYPE_CHECKING:
    from urllib import parse

    from casframe.plugins import StoreOpener
    from casframe.spi import BlobStore
    from casframe.store import Store
else:  # with ipaddress, a tenth of a short command: only for URLs with a query or odd characters
    parse = lazy_module("urllib.parse")

__all__ = ["DIGEST_FUNCTION_OPTION", "BackendRegistry", "Factory", "SchemeEntry", "StoreURL"]

#: The store option (URL query ``?digest_function=blake3``, a configured store's options,
#: ``open_store(..., digest_function=...)``) naming the store's digest function. The core reads
#: it into :attr:`StoreURL.digest_function`; it never reaches a backend's ``options``.
DIGEST_FUNCTION_OPTION = "digest_function"

_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.")
# Characters after which urlsplit does more than split: a query or fragment, IPv6 brackets.
_NOT_PLAIN = frozenset("?#[]")


def split_url(url: str) -> tuple[str, str, str, str]:
    """``(scheme, netloc, path, query)`` as :func:`urllib.parse.urlsplit` gives them.

    A plain URL (``file:///srv/cas``, ``grpc://host:50051/instance``: printable ASCII, no
    query, fragment or brackets) is split here; any other goes to urlsplit, whose errors
    (``Invalid IPv6 URL``) it keeps. Tests compare the two on every kind of input.
    """
    scheme, colon, rest = url.partition(":")
    if (
        colon
        and url.isascii()
        and url.isprintable()
        and " " not in url
        and _NOT_PLAIN.isdisjoint(url)
        and scheme[:1].isalpha()
        and _SCHEME_CHARS.issuperset(scheme)
    ):
        netloc = ""
        if rest[:2] == "//":
            netloc, slash, path = rest[2:].partition("/")
            rest = slash + path
        return scheme.lower(), netloc, rest, ""
    parts = parse.urlsplit(url)
    return parts.scheme, parts.netloc, parts.path, parts.query


#: ``factory(url)``, or ``factory(url, opener)`` for a backend that opens other stores.
Factory = Callable[["StoreURL"], "Store"] | Callable[["StoreURL", "StoreOpener"], "Store"]


@value_class
class StoreURL:
    """A parsed store URL: ``scheme://netloc/path?key=value`` plus options from configuration.

    ``options`` merges the URL's query with options given in the config file (the query wins).
    ``create`` is false when the caller only reads: a backend that would create a missing
    store (``file://`` makes its directory) raises :class:`StoreNotFoundError` instead.
    ``digest_function`` is the function the store is opened with (the ``digest_function``
    option; SHA-256 when it is not set): see :meth:`digest_function_for`.
    """

    url: str
    scheme: str
    netloc: str
    path: str
    options: Mapping[str, str] = value_field(default_factory=dict)
    create: bool = True
    digest_function: DigestFunction = SHA256

    @classmethod
    def parse(
        cls, url: str, options: Mapping[str, Any] | None = None, *, create: bool = True
    ) -> StoreURL:
        if "://" not in url:
            raise ConfigError(f"not a store URL (expected SCHEME://...): {url!r}")
        scheme, netloc, path, query = split_url(url)
        if not scheme:
            raise ConfigError(f"store URL has no scheme: {url!r}")
        merged = {str(k): str(v) for k, v in (options or {}).items()}
        if query:
            merged.update(parse.parse_qsl(query, keep_blank_values=True))
        function = SHA256
        if DIGEST_FUNCTION_OPTION in merged:
            function = by_name(merged.pop(DIGEST_FUNCTION_OPTION))
        return cls(
            url=url,
            scheme=scheme.lower(),
            netloc=netloc,
            path=path,
            options=merged,
            create=create,
            digest_function=function,
        )

    def digest_function_for(self, blob_store: type[BlobStore] | BlobStore) -> DigestFunction:
        """:attr:`digest_function`, once checked against what ``blob_store`` (a class or an
        instance) declares in ``digest_functions``: a factory calls it before any I/O, so a
        function its backend cannot hold is refused with
        :class:`~casframe.errors.UnsupportedDigestFunctionError` before anything is made."""
        function = self.digest_function
        declared = blob_store.digest_functions
        if function.name not in declared:
            raise UnsupportedDigestFunctionError(
                f"{self.scheme}:// stores cannot hold {function.name} digests ({self.url}); "
                f"they support {', '.join(sorted(declared))}"
            )
        return function

    def check_options(self, known: Iterable[str]) -> None:
        """Refuse every option not in ``known`` with a :class:`ConfigError` listing the known
        ones, so that a misspelt option (``fsycn``) never passes silently as no option."""
        accepted = sorted(set(known))
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for {self.url}; {self.scheme}:// "
                f"stores accept: {', '.join(accepted) if accepted else 'no options'}"
            )

    def option(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.options.get(key)
        if value is None:
            return default
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on", ""):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {key}={value!r} in {self.url} is not a boolean")


@value_class
class SchemeEntry:
    scheme: str
    factory: Factory | str
    plugin: str
    description: str = ""
    extra: str | None = None
    install: str | None = None

    def load(self) -> Factory:
        """Import a lazy factory, turning a missing optional dependency into an install hint."""
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or module_name
            if module_name == missing or module_name.startswith(missing + "."):
                # The plugin's own module is absent: a broken installation, not an extra.
                raise ConfigError(
                    f"plugin {self.plugin!r} registered {self.scheme}:// with factory "
                    f"{self.factory!r}, but module {missing!r} cannot be found"
                ) from exc
            raise MissingDependencyError(
                f"the {self.scheme}:// backend", missing, self.extra, self.install
            ) from exc
        factory: Factory = getattr(module, attr)
        return factory


class BackendRegistry:
    """URL scheme → factory, filled by the ``casframe_register_backends`` hook.

    Each plugin's hook receives its own view of the table (:meth:`for_plugin`), so every
    scheme is owned by the plugin that added it and no shared state says whose hook is running.
    Once :mod:`casframe.plugins` has filled the table it is frozen: the one place to add a
    scheme is a plugin's hook.
    """

    def __init__(self, plugin: str = "<direct>") -> None:
        self._entries: dict[str, SchemeEntry] = {}
        self._frozen = [False]  # shared by every view of one table
        self._plugin = plugin

    @property
    def plugin(self) -> str:
        """The plugin that owns the schemes added through this view."""
        return self._plugin

    def for_plugin(self, plugin: str) -> BackendRegistry:
        """A view of this table whose :meth:`add` registers schemes as owned by ``plugin``."""
        view = BackendRegistry(plugin)
        view._entries, view._frozen = self._entries, self._frozen
        return view

    def freeze(self) -> None:
        """Refuse further :meth:`add` calls, through this view and every other."""
        self._frozen[0] = True

    def add(
        self,
        scheme: str,
        factory: Factory | str,
        *,
        description: str = "",
        extra: str | None = None,
        install: str | None = None,
    ) -> None:
        """Register ``scheme`` (without ``://``). See ``casframe_register_backends``."""
        if self._frozen[0]:
            raise ConfigError(
                f"plugin {self._plugin!r} cannot add scheme {scheme!r}: the backend registry is "
                "complete; add schemes from the casframe_register_backends hook"
            )
        scheme = scheme.lower().removesuffix("://")
        if not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"invalid URL scheme {scheme!r} from plugin {self._plugin}")
        if isinstance(factory, str) and ":" not in factory:
            raise ConfigError(f"lazy factory must be 'module:attribute', got {factory!r}")
        existing = self._entries.get(scheme)
        if existing is not None:
            raise DuplicateSchemeError(
                f"scheme {scheme}:// is registered twice: by plugin {existing.plugin!r} "
                f"and by plugin {self._plugin!r}"
            )
        self._entries[scheme] = SchemeEntry(
            scheme, factory, self._plugin, description, extra, install
        )

    def get(self, scheme: str) -> SchemeEntry:
        try:
            return self._entries[scheme.lower()]
        except KeyError:
            known = ", ".join(f"{s}://" for s in sorted(self._entries)) or "none"
            raise UnknownSchemeError(
                f"unknown store scheme {scheme!r}; registered schemes: {known}"
            ) from None

    def entries(self) -> list[SchemeEntry]:
        return [self._entries[s] for s in sorted(self._entries)]

    def __contains__(self, scheme: object) -> bool:
        return isinstance(scheme, str) and scheme.lower() in self._entries
