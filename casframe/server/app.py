"""The gRPC server: binds the services to an address, with TLS, limits and interceptors.

:class:`Server` is the embedding API (tests, the pytest plugin, ``casframe serve``). It owns
the gRPC server and the upload spool, not the store: whoever opened the store closes it.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc

from casframe.errors import ConfigError, MissingDependencyError
from casframe.readonly import read_only_view
from casframe.server.bytestream import ByteStreamService, add_bytestream_to_server
from casframe.server.names import Instances
from casframe.server.services import (
    ActionCacheService,
    CapabilitiesService,
    CasService,
    FetchService,
    PushService,
    ReferenceStorageService,
)
from casframe.server.settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_WORKERS,
    PemSource,
    ServerSettings,
)
from casframe.server.tls import check_key_pair, read_pem
from casframe.store import Store

__all__ = ["RequestLogInterceptor", "Server", "plugin_interceptors"]

log = logging.getLogger("casframe.server")

#: The full names of the services a casframe server offers (also the health-check names).
SERVICE_NAMES = (
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "google.bytestream.ByteStream",
    "build.bazel.remote.asset.v1.Fetch",
    "build.bazel.remote.asset.v1.Push",
    "buildstream.v2.ReferenceStorage",
)



def _bind_problem(listen: str) -> str:
    """Why ``listen`` cannot be bound, in the system's words ("Address already in use").

    gRPC's own message only says that binding failed; binding a plain socket to the same
    address tells why.
    """
    host, _, port = listen.rpartition(":")
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
    except OSError as exc:
        return (exc.strerror or str(exc)).strip()
    except ValueError:
        pass
    return "gRPC could not bind it; --log-level debug shows gRPC's own messages"

class RequestLogInterceptor(grpc.ServerInterceptor):
    """Logs one debug line per request: method, peer, status code and duration.

    Costs nothing when the ``casframe.server`` logger is not at debug level.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not log.isEnabledFor(logging.DEBUG):
            return handler
        return _logged(handler, handler_call_details.method)


def _log_request(method: str, context: grpc.ServicerContext, started: float) -> None:
    code = context.code() or grpc.StatusCode.OK  # type: ignore[attr-defined]
    log.debug(
        "%s from %s: %s in %.1f ms",
        method, context.peer(), code.name, (time.monotonic() - started) * 1000,
    )


def _logged(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                return behavior(request, context)
            finally:
                _log_request(method, context, started)

        return call

    def stream_response(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.monotonic()
            try:
                yield from behavior(request, context)
            finally:
                _log_request(method, context, started)

        return call

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **codecs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            stream_response(handler.stream_stream), **codecs
        )
    return handler


def plugin_interceptors(settings: ServerSettings) -> list[grpc.ServerInterceptor]:
    """Interceptors every plugin returns from ``casframe_server_interceptors``, in order."""
    from casframe.plugins import get_plugin_manager

    hook = get_plugin_manager().hook.casframe_server_interceptors
    interceptors: list[grpc.ServerInterceptor] = []
    # get_hookimpls() lists the oldest registration first (calling the hook would run the newest
    # first): built-in plugins come before third parties', as the hook's documentation says.
    for impl in hook.get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue
        # pluggy lets an implementation omit arguments it does not use.
        kwargs = {"config": settings} if "config" in impl.argnames else {}
        returned = cast("Iterable[Any] | None", impl.function(**kwargs))
        for interceptor in returned or ():
            if not isinstance(interceptor, grpc.ServerInterceptor):
                raise ConfigError(
                    f"plugin {impl.plugin_name!r} returned {interceptor!r} from "
                    "casframe_server_interceptors; expected grpc.ServerInterceptor instances"
                )
            interceptors.append(interceptor)
    return interceptors


class Server:
    """A casframe gRPC server over one store.

    ``start()`` binds and returns the port (``listen="HOST:0"`` picks a free one); ``stop()``
    finishes in-flight calls for up to ``grace`` seconds; ``wait()`` blocks until stopped.
    As a context manager it starts on entry and stops on exit. ``interceptors`` are added after
    the built-in request log and before those of plugins (``use_plugins=False`` skips those).
    """

    def __init__(
        self,
        store: Store,
        *,
        listen: str = "127.0.0.1:0",
        instance_names: Iterable[str] = ("",),
        read_only: bool = False,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_client_ca: PemSource | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_workers: int = DEFAULT_WORKERS,
        upload_expiry: float = 15 * 60.0,
        max_partial_uploads: int = 256,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        use_plugins: bool = True,
    ) -> None:
        settings = ServerSettings(
            store_url=store.url,
            listen=listen,
            instance_names=tuple(instance_names),
            read_only=read_only,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            max_message_bytes=max_message_bytes,
            max_workers=max_workers,
            upload_expiry=upload_expiry,
            max_partial_uploads=max_partial_uploads,
        )
        self.store = store
        # Read-only: served through a view that never writes, not even a read's bookkeeping.
        self._served = read_only_view(store) if read_only else store
        self.settings = settings
        self.instances = Instances(settings.instance_names)
        self._extra_interceptors = tuple(interceptors)
        self._use_plugins = use_plugins
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._bytestream: ByteStreamService | None = None
        self._health: Any = None
        self._stopped = False
        self.port: int | None = None

    def __repr__(self) -> str:
        state = f"on {self.address}" if self.port is not None else "not started"
        return f"<casframe Server {self.store.url} {state}>"

    @property
    def address(self) -> str:
        """``HOST:PORT`` the server listens on (the real port once started)."""
        host, _, port = self.settings.listen.rpartition(":")
        return f"{host}:{self.port if self.port is not None else port}"

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(grace=None)

    def start(self) -> int:
        """Bind, start serving and return the port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        try:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        except ImportError:
            raise MissingDependencyError(
                "casframe's server (health service)", "grpc_health", None
            ) from None

        settings = self.settings
        if settings.tls_cert is not None and settings.tls_key is not None:
            check_key_pair(settings.tls_cert, settings.tls_key)  # grpcio would accept any
        interceptors: list[grpc.ServerInterceptor] = [RequestLogInterceptor()]
        interceptors.extend(self._extra_interceptors)
        if self._use_plugins:
            interceptors.extend(plugin_interceptors(settings))

        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_workers, thread_name_prefix="casframe-grpc"
        )
        server = grpc.server(
            self._executor,
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Without this, Linux lets a second server bind the same port silently.
                ("grpc.so_reuseport", 0),
                # Bandwidth-delay probing lets each stream's receive window grow to many MiB, so
                # 8 concurrent uploads of 1 MiB chunks peaked at 150-340 MiB of RSS; without it
                # the window still covers one whole message and the same load stays near
                # 110-120 MiB at the same loopback speed (measured, bench/grpc_bench.py).
                ("grpc.http2.bdp_probe", 0),
                # ... and a fixed window of two 1 MiB messages instead, so the next chunk of
                # an upload travels while the last is stored: 15-20% more per stream than
                # grpcio's 64 KiB, for 2 MiB per stream at most.
                ("grpc.http2.lookahead_bytes", 2 << 20),
            ],
        )
        shared = (self._served, settings, self.instances)
        from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc
        from casframe._protos.build.bazel.remote.execution.v2 import (
            remote_execution_pb2_grpc as re_grpc,
        )
        from casframe._protos.buildstream.v2 import buildstream_pb2_grpc

        self._bytestream = ByteStreamService(*shared)
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(*shared), server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(CasService(*shared), server)
        re_grpc.add_ActionCacheServicer_to_server(ActionCacheService(*shared), server)
        add_bytestream_to_server(self._bytestream, server)
        remote_asset_pb2_grpc.add_FetchServicer_to_server(FetchService(*shared), server)
        remote_asset_pb2_grpc.add_PushServicer_to_server(PushService(*shared), server)
        buildstream_pb2_grpc.add_ReferenceStorageServicer_to_server(
            ReferenceStorageService(*shared), server
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)

        try:
            if settings.tls:
                assert settings.tls_cert is not None and settings.tls_key is not None
                credentials = grpc.ssl_server_credentials(
                    [(
                        read_pem(settings.tls_key, "key"),
                        read_pem(settings.tls_cert, "certificate"),
                    )],
                    root_certificates=(
                        read_pem(settings.tls_client_ca, "client CA")
                        if settings.tls_client_ca else None
                    ),
                    require_client_auth=settings.tls_client_ca is not None,
                )
                port = server.add_secure_port(settings.listen, credentials)
            else:
                port = server.add_insecure_port(settings.listen)
        except RuntimeError:  # grpcio raises this when it cannot bind
            self._executor.shutdown(wait=False)
            raise OSError(
                errno.EADDRNOTAVAIL, f"cannot listen ({_bind_problem(settings.listen)})",
                settings.listen,
            ) from None
        if not port:
            self._executor.shutdown(wait=False)
            raise OSError(errno.EADDRNOTAVAIL, "cannot listen", settings.listen)

        server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        self._health.set("", serving)
        for name in SERVICE_NAMES:
            self._health.set(name, serving)
        self._server = server
        self.port = port
        # At debug level only: `casframe serve` announces itself on stdout, once.
        log.debug(
            "serving %s on %s%s%s", self.store.url, self.address,
            " (TLS" + (", client certificates required)" if settings.tls_client_ca else ")")
            if settings.tls else "",
            " read-only" if settings.read_only else "",
        )
        return port

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, then end them."""
        server = self._server
        if server is None or self._stopped:
            return
        self._stopped = True
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        server.stop(grace).wait()
        if self._bytestream is not None:
            self._bytestream.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        log.info("stopped serving %s", self.store.url)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; return False if ``timeout`` passed first."""
        if self._server is None:
            raise RuntimeError("server not started")
        timed_out = self._server.wait_for_termination(timeout)
        return not timed_out

    @property
    def partial_uploads(self) -> int:
        """How many interrupted ByteStream uploads are kept for resumption."""
        return len(self._bytestream.spool) if self._bytestream is not None else 0
