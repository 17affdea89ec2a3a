"""pytest fixture for an in-process ``casframe serve`` over any store, on a free loopback port.

``cas_server``
    a factory: ``cas_server(store, **settings)`` starts :class:`casframe.server.Server` over
    ``store`` on ``127.0.0.1`` and a free port and returns the URL a ``grpc://`` store (or any
    REAPI client) reaches it at: ``grpc://127.0.0.1:PORT``. ``settings`` are the keyword
    arguments of ``Server`` except ``listen`` (``instance_names``, ``read_only``, ``tls_cert``,
    ``tls_key``, ``tls_client_ca``, ``max_message_bytes``, ``interceptors``, ``use_plugins``,
    …). Plugins' interceptors are installed as ``casframe serve`` installs them, unless
    ``use_plugins=False``. ``cas_server.servers[url]`` is the running :class:`Server`.

The URL names the first instance when the empty instance name is not served
(``grpc://127.0.0.1:PORT/main``); with TLS it is ``grpcs://localhost:PORT`` (the certificate
must name ``localhost``; add ``?server_cert=CA.pem`` to open it). Every server a test started is
stopped when the test ends, before any fixture is torn down, so the stores it serves may come
from any fixture; the stores themselves are left open, as they belong to the caller.

grpc and the server are imported when a server is started: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

import casframe.server
from casframe.errors import ConfigError

if TYPE_CHECKING:
    from casframe.server.app import Server
    from casframe.store import Store

__all__ = ["CasServers", "cas_server"]

_LOOPBACK = "127.0.0.1"


class CasServers:
    """The casframe servers one test started. Call it to start one; see the module docstring."""

    def __init__(self, request: pytest.FixtureRequest | None = None) -> None:
        self._request = request
        #: URL → running server, in start order.
        self.servers: dict[str, Server] = {}

    def __call__(self, store: Store, **settings: Any) -> str:
        """Serve ``store`` on a free loopback port; return its ``grpc://`` URL."""
        if "listen" in settings:
            raise ConfigError(
                "cas_server always listens on 127.0.0.1 and a free port; do not pass listen="
            )
        server = casframe.server.Server(store, listen=f"{_LOOPBACK}:0", **settings)
        port = server.start()
        if self._request is not None:
            # Added while the test runs, so it runs before every fixture's teardown: the server
            # stops before the store it serves is closed, whichever fixture made that store.
            self._request.node.addfinalizer(lambda: server.stop(grace=None))
        url = self._url(server, port)
        self.servers[url] = server
        return url

    @staticmethod
    def _url(server: Server, port: int) -> str:
        settings = server.settings
        scheme, host = ("grpcs", "localhost") if settings.tls else ("grpc", _LOOPBACK)
        names = settings.instance_names
        instance = "" if "" in names else names[0]
        return f"{scheme}://{host}:{port}" + (f"/{instance}" if instance else "")

    def stop_all(self) -> None:
        """Stop every server started here (stopping one twice is harmless)."""
        for server in reversed(list(self.servers.values())):
            server.stop(grace=None)


@pytest.fixture
def cas_server(request: pytest.FixtureRequest) -> Iterator[CasServers]:
    """Start in-process casframe servers over any store (see the module docstring)."""
    servers = CasServers(request)
    try:
        yield servers
    finally:
        servers.stop_all()
