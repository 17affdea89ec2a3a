"""The gRPC server: binds the services to an address, with TLS, limits and interceptors.

:class:`Server` is the embedding API (tests, the pytest plugin, ``casframe serve``). It owns
the gRPC server and the upload spool, not the store: whoever opened the store closes it.

The server is grpc.aio, on an event loop in a thread of its own: the streams (ByteStream,
GetTree) are coroutines, so a stream waiting on its client (a stalled upload, a download nobody
reads) costs no thread and can never starve other calls; unary calls and all blocking store
work run in a bounded thread pool (``max_workers``), but for the small FindMissingBlobs and
BatchReadBlobs calls over a local store, served on the loop (:mod:`casframe.server.pool`).
Stream count and idle time are limited (``max_streams``, ``stream_idle_timeout``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit

import grpc

from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.buildstream.v2 import buildstream_pb2_grpc
from casframe.compression import DEFAULT_LEVEL, DEFAULT_MAX_WINDOW
from casframe.errors import ConfigError, MissingDependencyError
from casframe.plugins import each_plugin, get_plugin_manager
from casframe.readonly import read_only_view
from casframe.server.actioncache import ActionCacheService
from casframe.server.bytestream import ByteStreamService, add_bytestream_to_server
from casframe.server.capabilities import CapabilitiesService
from casframe.server.cas import CasService
from casframe.server.counts import content_counts_of
from casframe.server.interceptors import (
    StreamLimitInterceptor,
    StreamSlots,
    SyncInterceptorAdapter,
)
from casframe.server.names import Instances
from casframe.server.observe import CallObserverInterceptor, CallSink, RequestLogSink
from casframe.server.pool import small_calls_inline
from casframe.server.refstorage import ReferenceStorageService
from casframe.server.remoteasset import FetchService, PushService
from casframe.server.settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    DEFAULT_WORKERS,
    PemSource,
    ServerSettings,
)
from casframe.server.tls import check_key_pair, read_pem
from casframe.store import Store

__all__ = ["Interceptor", "Server", "plugin_interceptors"]

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


#: Stores whose calls are a few system calls on local files or memory: their small calls are
#: served on the event loop, cheaper than the trip to a pool thread (casframe.server.pool).
_LOCAL_SCHEMES = ("file", "memory")
#: The calls served so, and what is small: each costs at most a few hundred microseconds.
_SMALL_CALLS: dict[str, Callable[[Any], bool]] = {
    "FindMissingBlobs": lambda request: len(request.blob_digests) <= 128,
    "BatchReadBlobs": lambda request: len(request.digests) <= 64
    and sum(digest.size_bytes for digest in request.digests) <= 1 << 20,
}


#: What ``interceptors=`` and the ``casframe_server_interceptors`` hook may give: classic
#: interceptors (run in the thread pool) or asyncio ones (run on the event loop).
Interceptor: TypeAlias = grpc.ServerInterceptor | grpc.aio.ServerInterceptor


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


def plugin_interceptors(settings: ServerSettings) -> list[Interceptor]:
    """Interceptors every plugin returns from ``casframe_server_interceptors``, oldest plugin
    first (built-ins before third parties', as the hook's documentation says)."""
    interceptors: list[Interceptor] = []
    for plugin, call in each_plugin(get_plugin_manager(), "casframe_server_interceptors"):
        for returned in call(config=settings):
            for interceptor in cast("Iterable[Any]", returned or ()):
                if not isinstance(interceptor, grpc.ServerInterceptor | grpc.aio.ServerInterceptor):
                    raise ConfigError(
                        f"plugin {plugin!r} returned {interceptor!r} from "
                        "casframe_server_interceptors; expected grpc.ServerInterceptor or "
                        "grpc.aio.ServerInterceptor instances"
                    )
                interceptors.append(interceptor)
    return interceptors


class Server:
    """A casframe gRPC server over one store.

    ``start()`` binds and returns the port (``listen="HOST:0"`` picks a free one); ``stop()``
    finishes in-flight calls for up to ``grace`` seconds; ``wait()`` blocks until stopped.
    As a context manager it starts on entry and stops on exit. ``interceptors`` are added after
    the built-in request log and before those of plugins (``use_plugins=False`` skips those).
    ``call_sinks`` are told of every call (:mod:`casframe.server.observe`): the metrics and
    the access log of ``casframe serve``.
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
        max_streams: int = DEFAULT_MAX_STREAMS,
        stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT,
        zstd_max_window_bytes: int = DEFAULT_MAX_WINDOW,
        zstd_level: int = DEFAULT_LEVEL,
        interceptors: Sequence[Interceptor] = (),
        use_plugins: bool = True,
        worker_index: int = 0,
        worker_count: int = 1,
        call_sinks: Sequence[CallSink] = (),
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
            max_streams=max_streams,
            stream_idle_timeout=stream_idle_timeout,
            worker_index=worker_index,
            worker_count=worker_count,
            zstd_max_window_bytes=zstd_max_window_bytes,
            zstd_level=zstd_level,
        )
        self.store = store
        # Read-only: served through a view that never writes, not even a read's bookkeeping.
        self._served = read_only_view(store) if read_only else store
        self.settings = settings
        self.instances = Instances(settings.instance_names)
        self.streams = StreamSlots(settings.max_streams)
        self._extra_interceptors = tuple(interceptors)
        self._use_plugins = use_plugins
        self._call_sinks = (RequestLogSink(), *call_sinks)
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._bytestream: ByteStreamService | None = None
        self._health: Any = None
        self._stopped = threading.Event()
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
        if self._loop is not None:
            raise RuntimeError("server already started")
        try:
            from grpc_health.v1 import health  # noqa: F401 - checked here, used on the loop
        except ImportError:
            raise MissingDependencyError(
                "casframe's server (health service)", "grpc_health", None
            ) from None

        settings = self.settings
        if settings.tls_cert is not None and settings.tls_key is not None:
            check_key_pair(settings.tls_cert, settings.tls_key)  # grpcio would accept any
        plugins = plugin_interceptors(settings) if self._use_plugins else []
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_workers, thread_name_prefix="casframe-grpc"
        )
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name="casframe-grpc-loop", daemon=True
        )
        thread.start()
        self._loop, self._loop_thread = loop, thread
        try:
            port = asyncio.run_coroutine_threadsafe(
                self._start([*self._extra_interceptors, *plugins]), loop
            ).result()
        except BaseException:
            self._close_loop()
            self._loop = self._loop_thread = None  # never started: stop() has nothing to do
            self._executor.shutdown(wait=False)
            raise
        self.port = port
        # At debug level only: `casframe serve` announces itself on stdout, once.
        log.debug(
            "serving %s on %s%s%s", self.store.url, self.address,
            " (TLS" + (", client certificates required)" if settings.tls_client_ca else ")")
            if settings.tls else "",
            " read-only" if settings.read_only else "",
        )
        return port

    async def _start(self, interceptors: list[Interceptor]) -> int:
        """Build, bind and start the grpc.aio server (on the server's event loop)."""
        from grpc_health.v1 import health_pb2

        settings = self.settings
        assert self._executor is not None
        chain: list[grpc.aio.ServerInterceptor] = [
            CallObserverInterceptor(self._call_sinks), StreamLimitInterceptor(self.streams)
        ]
        for interceptor in interceptors:
            if isinstance(interceptor, grpc.aio.ServerInterceptor):
                chain.append(interceptor)
            else:
                chain.append(SyncInterceptorAdapter(interceptor, self._executor))
        server = grpc.aio.server(
            migration_thread_pool=self._executor,
            interceptors=chain,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Without this, Linux lets a second server bind the same port silently; the
                # workers of `casframe serve --workers N` share theirs on purpose.
                ("grpc.so_reuseport", int(settings.worker_count > 1)),
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
        self._add_services(server)
        port = self._bind(server)
        await server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self._health.set("", serving)
        for name in SERVICE_NAMES:
            await self._health.set(name, serving)
        self._server = server
        return port

    def _add_services(self, server: grpc.aio.Server) -> None:
        """Add every casframe service and the health service to ``server``."""
        from grpc_health.v1 import health, health_pb2_grpc

        assert self._executor is not None
        shared = (self._served, self.settings, self.instances)
        counts = content_counts_of(self._call_sinks)
        self._bytestream = ByteStreamService(*shared, self._executor, counts=counts)
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(*shared), server)
        cas = CasService(*shared, self._executor, counts=counts)
        if urlsplit(self.store.url).scheme in _LOCAL_SCHEMES:
            for name, small in _SMALL_CALLS.items():
                setattr(cas, name, small_calls_inline(getattr(cas, name), self._executor, small))
        re_grpc.add_ContentAddressableStorageServicer_to_server(cas, server)
        re_grpc.add_ActionCacheServicer_to_server(
            ActionCacheService(*shared, counts=counts), server
        )
        add_bytestream_to_server(self._bytestream, server)
        remote_asset_pb2_grpc.add_FetchServicer_to_server(FetchService(*shared), server)
        remote_asset_pb2_grpc.add_PushServicer_to_server(PushService(*shared), server)
        buildstream_pb2_grpc.add_ReferenceStorageServicer_to_server(
            ReferenceStorageService(*shared), server
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)

    def _bind(self, server: grpc.aio.Server) -> int:
        """Bind ``server`` to the listen address, with TLS if configured; return the port."""
        settings = self.settings
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
            raise OSError(
                errno.EADDRNOTAVAIL, f"cannot listen ({_bind_problem(settings.listen)})",
                settings.listen,
            ) from None
        if not port:
            raise OSError(errno.EADDRNOTAVAIL, "cannot listen", settings.listen)
        return port

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, then end them."""
        loop = self._loop
        if loop is None or self._stopped.is_set():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(grace), loop).result()
        finally:
            if self._bytestream is not None:
                self._bytestream.close()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._close_loop()
            self._stopped.set()
        log.info("stopped serving %s", self.store.url)

    async def _stop(self, grace: float | None) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        # What grpc leaves behind (calls it ended, waiting for their close): ended here, so
        # closing the loop destroys no pending task.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; return False if ``timeout`` passed first."""
        if self._loop is None:
            raise RuntimeError("server not started")
        return self._stopped.wait(timeout)

    @property
    def partial_uploads(self) -> int:
        """How many interrupted ByteStream uploads are kept for resumption."""
        return len(self._bytestream.spool) if self._bytestream is not None else 0
