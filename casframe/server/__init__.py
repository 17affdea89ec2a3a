"""casframe's gRPC server: any Store served to REAPI clients (Bazel, BuildStream, casframe).

Public API:

``Server(store, *, listen=..., instance_names=..., read_only=..., tls_cert=..., ...)``
    the embeddable server (:mod:`casframe.server.app`);
``ServerSettings``
    its settings, which plugins receive as ``config`` in ``casframe_server_interceptors``;
``serve_command``
    the ``casframe serve`` click command (:mod:`casframe.server.command`).

Importing this package costs nothing: each name is imported from its module on first use, the
gRPC machinery with ``Server``. The server never imports a backend; it serves whatever
:class:`casframe.Store` it is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from casframe.lazy import lazy_names

if TYPE_CHECKING:
    from casframe.server.app import Server
    from casframe.server.command import serve_command
    from casframe.server.settings import ServerSettings

__all__ = ["Server", "ServerSettings", "serve_command"]

# Every public name, imported from its module on first use (as in the ``casframe`` package).
_LAZY = {
    "Server": "casframe.server.app",
    "ServerSettings": "casframe.server.settings",
    "serve_command": "casframe.server.command",
}


__getattr__ = lazy_names(__name__, _LAZY, globals())
