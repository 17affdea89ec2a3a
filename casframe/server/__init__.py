"""casframe's gRPC server: any Store served to REAPI clients (Bazel, BuildStream, casframe).

Public API:

``Server(store, *, listen=..., instance_names=..., read_only=..., tls_cert=..., ...)``
    the embeddable server (:mod:`casframe.server.app`);
``ServerSettings``
    its settings, which plugins receive as ``config`` in ``casframe_server_interceptors``;
``serve_command``
    the ``casframe serve`` click command (:mod:`casframe.server.command`).

Importing this package costs only click: the gRPC machinery loads when ``Server`` or
``ServerSettings`` is first used. The server never imports a backend; it serves whatever
:class:`casframe.Store` it is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from casframe.server.command import serve_command

if TYPE_CHECKING:
    from casframe.server.app import Server
    from casframe.server.settings import ServerSettings

__all__ = ["Server", "ServerSettings", "serve_command"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from casframe.server.app import Server

        return Server
    if name == "ServerSettings":
        from casframe.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
