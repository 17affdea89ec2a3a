"""Hook specifications: the only places where plugins extend casframe.

Every hook is prefixed ``casframe_``. Plugins implement them with :data:`casframe.hookimpl` and
declare a module or object in the ``casframe`` entry-point group. casframe's own backends are
loaded through exactly this machinery. This module holds specifications only, no behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from casframe.registry import BackendRegistry

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("casframe")
hookimpl = pluggy.HookimplMarker("casframe")


@hookspec
def casframe_register_backends(registry: BackendRegistry) -> None:
    """Register store URL schemes.

    :param registry: call ``registry.add(scheme, factory, ...)`` once per scheme. ``factory`` is
        a callable ``factory(url: StoreURL) -> Store`` (``factory(url, opener: StoreOpener)``
        for a backend that opens other stores) or, to keep start-up cheap and optional
        dependencies optional, a ``"module:attribute"`` string imported only when a store of that
        scheme is opened; pass ``extra="name"`` (an extra of casframe itself) or
        ``install="your-dist[extra]"`` (a third party's requirement) so that a missing
        dependency names what to ``pip install``.

    Called once per plugin manager, the first time casframe resolves a URL or lists plugins
    (``open_store``, ``casframe plugins``), once per plugin, in registration order, and again
    after a plugin is registered or unregistered; return values are ignored. Registering a
    scheme another plugin already registered raises
    :class:`casframe.errors.DuplicateSchemeError` naming both plugins.
    """


@hookspec
def casframe_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``casframe`` command line.

    :param cli: the top-level :class:`click.Group`; call ``cli.add_command(command)``.

    Called once, when the ``casframe`` command starts, before arguments are parsed; return
    values are ignored. A command name already taken is an error naming the plugin.
    """


@hookspec
def casframe_server_interceptors(config: Any) -> list[Any]:  # type: ignore[empty-body]
    """Return gRPC server interceptors to install in ``casframe serve``.

    :param config: the server's settings object.
    :return: a list of ``grpc.ServerInterceptor`` instances (run in the server's thread pool)
        or ``grpc.aio.ServerInterceptor`` instances (run on its event loop), possibly empty.

    Called once per server start; the lists of all plugins are concatenated in registration
    order. This is the place for authentication, logging and metrics.
    """
