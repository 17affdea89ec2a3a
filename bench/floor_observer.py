"""The floor of call metrics: the least a grpc.aio server interceptor does to give the series
of issue 18's request metrics, for bench/metrics_bench.py's ``--observe floor``. Not part of
casframe: a plugin module the bench installs into the servers it starts (a folder of its own on
``PYTHONPATH`` holding this file and a distribution's metadata naming it as a ``casframe``
entry point), through the ``casframe_server_interceptors`` hook like any plugin's interceptor.

For every call it counts, per method, the calls started, the calls ended by status code, the
call's seconds into a latency histogram (``casframe.server.metrics.LATENCY_BUCKETS``) with their
sum, and the serialized bytes of the requests and responses, as plainly as Python allows: an
object with slots per method found in a module-level dict, ``time.perf_counter`` twice,
``bisect`` into the buckets, the handler's codecs wrapped to count each message's length, and
``context.code()`` to tell the status. No prometheus_client, no lock, no message read, no
record of the call: those are what casframe's metrics add above this floor. The counters are
plain integers changed from the event loop and the thread pool alike, so an update can in
principle be lost between threads (a real implementation would pay for a lock or per-thread
values: the floor is a lower bound). The blob, byte and hit counters of ``ServerMetrics``,
which need the messages' content, are not here either.

With ``CASFRAME_BENCH_FLOOR_OUT`` set to a folder, the process writes its counts there at exit
(``floor-PID.json``), so that the bench can check that the floor saw the calls it sent.
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from casframe import hookimpl
from casframe.server.metrics import LATENCY_BUCKETS

OUT_ENV = "CASFRAME_BENCH_FLOOR_OUT"
_OK = grpc.StatusCode.OK
_now = time.perf_counter
_bisect = bisect.bisect_left


class Series:
    """One method's numbers."""

    __slots__ = ("started", "ok", "codes", "buckets", "seconds", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.started = self.ok = self.bytes_in = self.bytes_out = 0
        self.seconds = 0.0
        self.codes: dict[Any, int] = {}  # calls that did not end OK, by status code
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: +Inf

    def ended(self, started: float, code: grpc.StatusCode | None) -> None:
        """A call that returned, with the status its context was given (None: OK)."""
        seconds = _now() - started
        self.buckets[_bisect(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds
        if code is None or code is _OK:
            self.ok += 1
        else:
            self.codes[code] = self.codes.get(code, 0) + 1

    def failed(self, started: float, code: grpc.StatusCode | None, exc: BaseException) -> None:
        """A call that raised ``exc``, after its context was given ``code`` (an abort's)."""
        seconds = _now() - started
        self.buckets[_bisect(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds
        if code is None or code is _OK:  # raised without an abort
            cancelled = isinstance(exc, asyncio.CancelledError)
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
        self.codes[code] = self.codes.get(code, 0) + 1

    def figures(self) -> dict[str, Any]:
        return {"started": self.started, "ok": self.ok, "seconds": self.seconds,
                "codes": {getattr(code, "name", str(code)): n for code, n in self.codes.items()},
                "buckets": self.buckets, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


#: Every method's series, by the method's full name.
SERIES: dict[str, Series] = {}


def _series(method: str) -> Series:
    series = SERIES.get(method)
    if series is None:
        series = SERIES[method] = Series()
    return series


def _decoder(series: Series, deserializer: Callable[[bytes], Any] | None) -> Callable[..., Any]:
    if deserializer is None:

        def raw(data: bytes) -> Any:
            series.bytes_in += len(data)
            return data

        return raw

    def decode(data: bytes) -> Any:
        series.bytes_in += len(data)
        return deserializer(data)

    return decode


def _encoder(series: Series, serializer: Callable[[Any], bytes] | None) -> Callable[..., Any]:
    if serializer is None:

        def raw(message: Any) -> Any:
            series.bytes_out += len(message)
            return message

        return raw

    def encode(message: Any) -> bytes:
        data = serializer(message)
        series.bytes_out += len(data)
        return data

    return encode


class _Told:
    """A thread-pool behaviour's context, which remembers the status code set through it:
    grpc.aio's context of such a behaviour has no ``code()`` to ask (that of a coroutine
    behaviour has)."""

    __slots__ = ("_context", "code")

    def __init__(self, context: Any) -> None:
        self._context = context
        self.code: grpc.StatusCode | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code
        self._context.set_code(code)

    def abort(self, code: grpc.StatusCode, details: str = "") -> Any:
        self.code = code
        return self._context.abort(code, details)


def _timed_coroutine(series: Series, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call_async(request: Any, context: Any) -> Any:
        series.started += 1
        started = _now()
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            series.failed(started, context.code(), exc)
            raise
        series.ended(started, context.code())
        return response

    return call_async


def _timed_async_stream(series: Series, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def stream_async(request: Any, context: Any) -> AsyncIterator[Any]:
        series.started += 1
        started = _now()
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            series.failed(started, context.code(), exc)
            raise
        series.ended(started, context.code())

    return stream_async


def _timed_stream(series: Series, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def stream(request: Any, context: Any) -> Iterator[Any]:
        series.started += 1
        told = _Told(context)
        started = _now()
        try:
            yield from behavior(request, told)
        except BaseException as exc:
            series.failed(started, told.code, exc)
            raise
        series.ended(started, told.code)

    return stream


def _timed_function(series: Series, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def call(request: Any, context: Any) -> Any:
        series.started += 1
        told = _Told(context)
        started = _now()
        try:
            response = behavior(request, told)
        except BaseException as exc:
            series.failed(started, told.code, exc)
            raise
        series.ended(started, told.code)
        return response

    return call


def _timer_of(behavior: Callable[..., Any]) -> Callable[[Series, Any], Callable[..., Any]]:
    """What counts and times ``behavior``, a behaviour of the same kind (coroutine, async
    generator, generator or function: grpc.aio runs each its own way)."""
    if inspect.iscoroutinefunction(behavior):
        return _timed_coroutine
    if inspect.isasyncgenfunction(behavior):
        return _timed_async_stream
    if inspect.isgeneratorfunction(behavior):
        return _timed_stream
    return _timed_function


_BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class _Method:
    """What a method's calls are counted with: its series, the codecs given and the counting
    ones, which of the handler's fields holds the behaviour and how to time it."""

    __slots__ = ("series", "given", "decode", "encode", "index", "timer")

    def __init__(self, method: str, handler: grpc.RpcMethodHandler) -> None:
        self.series = series = _series(method)
        deserializer, serializer = handler.request_deserializer, handler.response_serializer
        self.given = (deserializer, serializer)
        self.decode = _decoder(series, deserializer)
        self.encode = _encoder(series, serializer)
        self.index = 2 * bool(handler.request_streaming) + bool(handler.response_streaming)
        self.timer = _timer_of(getattr(handler, _BEHAVIORS[self.index]))

    def counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behaviors: list[Any] = [None, None, None, None]
        index = self.index
        behaviors[index] = self.timer(self.series, handler[4 + index])
        return type(handler)(handler.request_streaming, handler.response_streaming,
                             self.decode, self.encode, *behaviors)


class FloorInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call (see the module). A unary method's counted handler is made
    once and found again by the handler's identity; a stream's handler, which the server's
    stream limit makes anew for each call, gets a counted behaviour each call, the codecs and
    the behaviour's kind found once per method."""

    def __init__(self) -> None:
        self._methods: dict[str, _Method] = {}
        # method -> (the unary handler given, its counted one)
        self._unary: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        name = handler_call_details.method
        kept = self._unary.get(name)
        if kept is not None and kept[0] is handler:
            return kept[1]
        method = self._methods.get(name)
        if (method is None or method.given[0] is not handler.request_deserializer
                or method.given[1] is not handler.response_serializer):
            method = self._methods[name] = _Method(name, handler)
        counted = method.counted(handler)
        if not (handler.request_streaming or handler.response_streaming):
            self._unary[name] = (handler, counted)
        return counted


def _write_counts() -> None:
    folder = os.environ.get(OUT_ENV)
    if folder:
        path = os.path.join(folder, f"floor-{os.getpid()}.json")
        with open(path, "w", encoding="utf-8") as out:
            json.dump({method: series.figures() for method, series in SERIES.items()}, out)


@hookimpl
def casframe_server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    atexit.register(_write_counts)
    return [FloorInterceptor()]
