"""Watching every call the server answers: who asked for what, how it ended, how long it took
and how many bytes it moved, handed to sinks (the debug request log, Prometheus metrics in
:mod:`casframe.server.metrics`, the access log in :mod:`casframe.server.accesslog`).

:class:`CallObserverInterceptor` is the first interceptor of the chain, so it sees every answer,
refusals by the stream limit and by plugins' interceptors included. It counts message bytes by
taking over the handler's codecs: the request deserializer reports the size of each message it
decodes, and responses are serialized inside the observed behaviour, so a call's bytes are exact
and nothing is serialized twice. A call is reported to the sinks before its answer leaves, so a
client that has its answer finds the call counted.

This module must never block the event loop nor change what a client gets: a sink that fails
is logged, never turned into the call's status.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import operator
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol, TypeAlias

import grpc

from casframe.server.interceptors import Continuation, is_async_behavior

__all__ = [
    "CallObserverInterceptor",
    "CallRecord",
    "CallSink",
    "RequestLogSink",
]

log = logging.getLogger("casframe.server")
_FunctionType = types.FunctionType
_ENABLED = operator.methodcaller("enabled")


class _MethodHandler(
    collections.namedtuple("_MethodHandler", (
        "request_streaming", "response_streaming", "request_deserializer",
        "response_serializer", "unary_unary", "unary_stream", "stream_unary", "stream_stream",
    )),
    grpc.RpcMethodHandler,
):
    """A method handler as grpc's ``*_rpc_method_handler`` functions make them (the same
    fields), made directly: each of those functions imports a module when called, which cost
    an observed stream more than the rest of its handler."""

    __slots__ = ()


def _handler(streams_in: bool, streams_out: bool, behavior: Callable[..., Any],
             deserializer: Callable[[bytes], Any]) -> grpc.RpcMethodHandler:
    """A handler of ``behavior``, whose responses are already serialized."""
    behaviors: list[Any] = [None, None, None, None]
    behaviors[2 * streams_in + streams_out] = behavior
    return _MethodHandler(streams_in, streams_out, deserializer, None, *behaviors)


class CallRecord:
    """One call as the sinks see it. ``request`` is the (first) request message, ``response``
    the response of a unary-response call; ``bytes_in``/``bytes_out`` are serialized message
    bytes, ``raw_bytes_out`` the bytes of responses sent as raw data (ByteStream Read's
    chunks). ``duration`` (seconds) and ``code`` are set when the call ends. ``peer`` and
    ``time`` (when the call started, seconds since the epoch) are found when first read, while
    the call is in progress: a sink that needs neither (the metrics) costs no system call."""

    __slots__ = (
        "method", "request_streaming", "response_streaming", "duration", "code", "request",
        "response", "bytes_in", "bytes_out", "raw_bytes_out", "_started", "_context",
        "_peer", "_time",
    )

    def __init__(self, method: str, request_streaming: bool, response_streaming: bool,
                 context: Any) -> None:
        self.method = method
        self.request_streaming = request_streaming
        self.response_streaming = response_streaming
        self._context = context
        self._started = time.perf_counter()
        self._peer: str | None = None
        self._time: float | None = None
        self.duration = 0.0
        self.code: grpc.StatusCode | None = None
        self.request: Any = None
        self.response: Any = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.raw_bytes_out = 0

    @property
    def peer(self) -> str:
        """The client's address as gRPC gives it."""
        if self._peer is None:
            self._peer = str(self._context.peer())
        return self._peer

    @property
    def time(self) -> float:
        """When the call started, in seconds since the epoch (from the monotonic clock's
        reading at the start: one clock read a call instead of two)."""
        if self._time is None:
            self._time = time.time() - (time.perf_counter() - self._started)
        return self._time

    @property
    def service(self) -> str:
        """The full service name (``google.bytestream.ByteStream``)."""
        return self.method.strip("/").partition("/")[0]

    @property
    def name(self) -> str:
        """The method's own name (``Read``)."""
        return self.method.rpartition("/")[2]

    @property
    def streaming(self) -> bool:
        return self.request_streaming or self.response_streaming

    def _received(self, message: Any, size: int) -> Any:
        self.bytes_in += size
        if self.request is None:
            self.request = message
        return message


class _DecodedRequests:
    """A streaming call's requests as the behaviour reads them, each counted. An iterator of
    its own rather than an async generator: a generator left unfinished (a Write whose one
    message ends it is never read to the end) is closed through the event loop's finalizer
    hook, which schedules a task from another thread's side of the loop (a wake-up of the
    loop through its self-pipe: two system calls) for every such call."""

    __slots__ = ("_requests", "_call")

    def __init__(self, requests: AsyncIterator[_Decoded], call: CallRecord) -> None:
        self._requests = requests.__aiter__()
        self._call = call

    def __aiter__(self) -> _DecodedRequests:
        return self

    async def __anext__(self) -> Any:
        return self._call._received(*await self._requests.__anext__())


class CallSink(Protocol):
    """What a sink of :class:`CallObserverInterceptor` offers. Both methods may run on the
    event loop or in a pool thread, and must return quickly."""

    def enabled(self) -> bool:
        """Whether this sink wants calls now (checked as each call starts)."""
        ...

    def call_started(self, call: CallRecord) -> None: ...

    def call_ended(self, call: CallRecord) -> None: ...


#: A request message and the size of its serialized form (a plain tuple: cheaper to make than
#: a named one, and never a message of its own, so :meth:`_ObservedCall.read` tells it apart).
_Decoded: TypeAlias = tuple[Any, int]


def _raw_sized(raw: bytes) -> _Decoded:
    return raw, len(raw)


# Sized decoders by deserializer (a service's few codecs), and whether a behaviour runs on the
# event loop and how it answers by its code: found once, not for each stream (whose handler is
# made anew for each call by the stream limit).
_DECODERS: dict[Callable[[bytes], Any], Callable[[bytes], _Decoded]] = {}
_FLAVOURS: dict[Any, tuple[bool, bool, bool]] = {}
_KEPT_CODECS = 256


def _sized_decoder(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], _Decoded]:
    if deserializer is None:
        return _raw_sized
    try:
        decoder = _DECODERS.get(deserializer)
    except TypeError:  # a plugin's codec that cannot be a dictionary key
        decoder = None
    if decoder is None:
        decoder = lambda raw: (deserializer(raw), len(raw))  # noqa: E731
        if len(_DECODERS) < _KEPT_CODECS:
            with contextlib.suppress(TypeError):
                _DECODERS[deserializer] = decoder
    return decoder


def _flavour(behavior: Callable[..., Any]) -> tuple[bool, bool, bool]:
    """Whether ``behavior`` runs on the event loop, is an async generator, a coroutine
    function; kept by code object for plain functions (a closure made for each call has the
    same code every time)."""
    code = getattr(behavior, "__code__", None) if type(behavior) is _FunctionType else None
    flavour = _FLAVOURS.get(code) if code is not None else None
    if flavour is None:
        flavour = (is_async_behavior(behavior), inspect.isasyncgenfunction(behavior),
                   inspect.iscoroutinefunction(behavior))
        if code is not None and len(_FLAVOURS) < _KEPT_CODECS:
            _FLAVOURS[code] = flavour
    return flavour


class _ObservedCall:
    """A call in progress: its record, its sinks, and the servicer context the behaviour
    sees, which remembers the status set through it (grpc.aio's context for thread-pool
    handlers cannot tell it) and counts the responses written through it."""

    __slots__ = ("_context", "call", "_sinks", "_serializer", "_ended")

    def __init__(
        self,
        context: Any,
        call: CallRecord,
        sinks: Sequence[CallSink],
        serializer: Callable[[Any], bytes] | None,
    ) -> None:
        self._context = context
        self.call = call
        self._sinks = sinks
        self._serializer = serializer
        self._ended = False
        for sink in sinks:
            try:
                sink.call_started(call)
            except Exception:  # noqa: BLE001 - a sink never fails a call
                log.exception("call sink %r failed", sink)

    # -- the context the behaviour sees ----------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.call.code = code
        self._context.set_code(code)

    def abort(self, code: grpc.StatusCode, *args: Any, **kwargs: Any) -> Any:
        # Reported before the status leaves: the client has its answer after the sinks.
        self.call.code = code
        self.end(None)
        return self._context.abort(code, *args, **kwargs)

    def write(self, message: Any) -> Awaitable[None]:
        # The context's own coroutine, not one more around it: a Read writes many chunks.
        return self._context.write(self.encode(message))

    async def read(self) -> Any:
        got = await self._context.read()
        if type(got) is tuple:
            return self.call._received(*got)
        return got  # grpc.aio.EOF

    # -- for the wrappers ------------------------------------------------------------------

    def encode(self, message: Any) -> Any:
        """``message`` serialized as the handler's codec would, counted."""
        if message is None:
            return None
        call = self.call
        if isinstance(message, (bytes, memoryview)):
            call.raw_bytes_out += len(message)
        data = message if self._serializer is None else self._serializer(message)
        call.bytes_out += len(data)
        return data

    def decoded_sync(self, requests: Iterator[_Decoded]) -> Iterator[Any]:
        for request in requests:
            yield self.call._received(*request)

    def end(self, exc: BaseException | None) -> None:
        """Report the call to the sinks, once."""
        if self._ended:
            return
        self._ended = True
        call = self.call
        call.duration = time.perf_counter() - call._started
        if call.code is None:
            if exc is None:
                call.code = grpc.StatusCode.OK
            elif isinstance(exc, asyncio.CancelledError):
                call.code = grpc.StatusCode.CANCELLED
            else:
                call.code = grpc.StatusCode.UNKNOWN
        for sink in self._sinks:
            try:
                sink.call_ended(call)
            except Exception:  # noqa: BLE001 - a sink never fails a call
                log.exception("call sink %r failed", sink)


# Observed handlers kept for reuse, by method, handler and sinks: unary handlers are the same
# objects call after call, and wrapping one anew costs about as much as observing the call.
# Streams' handlers are made anew for each call (the stream limit wraps them), so they are not
# kept; neither is anything past this many, should a plugin make new handlers on every call.
_KEPT_HANDLERS = 256


class CallObserverInterceptor(grpc.aio.ServerInterceptor):
    """Reports every call to ``sinks`` (those :meth:`CallSink.enabled` at the call's start).

    Costs one check per call when no sink is enabled.
    """

    def __init__(self, sinks: Sequence[CallSink]) -> None:
        self.sinks = tuple(sinks)
        # By the handler's identity, the method and which sinks are enabled: hashing the
        # handler itself (a tuple of eight fields) and the sinks cost more than the lookup.
        # Each entry holds its handler, so no other object takes that identity meanwhile.
        self._kept: dict[tuple[int, str, tuple[bool, ...]],
                         tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wanted = tuple(map(_ENABLED, self.sinks))
        if not any(wanted):
            return handler
        method = handler_call_details.method
        if handler.request_streaming or handler.response_streaming:
            return _observed(handler, method, self._enabled(wanted))
        key = (id(handler), method, wanted)
        kept = self._kept.get(key)
        if kept is not None and kept[0] is handler:
            return kept[1]
        observed = _observed(handler, method, self._enabled(wanted))
        if len(self._kept) < _KEPT_HANDLERS:
            self._kept[key] = (handler, observed)
        return observed

    def _enabled(self, wanted: tuple[bool, ...]) -> tuple[CallSink, ...]:
        return tuple([sink for sink, enabled in zip(self.sinks, wanted, strict=True) if enabled])


def _observed(
    handler: grpc.RpcMethodHandler, method: str, sinks: Sequence[CallSink]
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour observed and its codecs taken over (see the module)."""
    streams_in = bool(handler.request_streaming)
    streams_out = bool(handler.response_streaming)
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary
        or handler.stream_stream
    )
    serializer = handler.response_serializer
    reads_async, async_gen, coroutine = _flavour(behavior)
    if not (streams_in or streams_out):
        return _handler(False, False,
                        _observing_unary(behavior, method, sinks, serializer, coroutine),
                        _sized_decoder(handler.request_deserializer))

    def begin(request: Any, context: Any) -> tuple[_ObservedCall, Any]:
        call = CallRecord(method, streams_in, streams_out, context)
        observed = _ObservedCall(context, call, sinks, serializer)
        if not streams_in:
            call.request, call.bytes_in = request
            return observed, call.request
        if reads_async:
            return observed, _DecodedRequests(request, call)
        return observed, observed.decoded_sync(request)

    return _handler(streams_in, streams_out,
                    _observing(behavior, streams_out, begin, async_gen, coroutine),
                    _sized_decoder(handler.request_deserializer))


def _observing_unary(
    behavior: Callable[..., Any],
    method: str,
    sinks: Sequence[CallSink],
    serializer: Callable[[Any], bytes] | None,
    coroutine: bool,
) -> Callable[..., Any]:
    """The observed behaviour of a unary call (most calls): ``_observing``'s, with the call
    started in line."""
    if coroutine:

        async def call_async(request: _Decoded, context: Any) -> Any:
            call = CallRecord(method, False, False, context)
            call.request, call.bytes_in = request
            observed = _ObservedCall(context, call, sinks, serializer)
            try:
                response = call.response = await behavior(call.request, observed)
                data = observed.encode(response)
            except BaseException as exc:
                observed.end(exc)
                raise
            observed.end(None)
            return data

        return call_async

    def call_sync(request: _Decoded, context: Any) -> Any:
        call = CallRecord(method, False, False, context)
        call.request, call.bytes_in = request
        observed = _ObservedCall(context, call, sinks, serializer)
        try:
            response = call.response = behavior(call.request, observed)
            data = observed.encode(response)
        except BaseException as exc:
            observed.end(exc)
            raise
        observed.end(None)
        return data

    return call_sync


def _observing(
    behavior: Callable[..., Any],
    streams_out: bool,
    begin: Callable[[Any, Any], tuple[_ObservedCall, Any]],
    async_gen: bool,
    coroutine: bool,
) -> Callable[..., Any]:
    """A behaviour of the same kind as ``behavior`` (sync or async, unary or streaming reply)
    that starts the call with ``begin``, encodes each response and ends the call however the
    behaviour ends."""
    wrapped: Callable[..., Any]
    if async_gen:

        async def stream_async(request: Any, context: Any) -> AsyncIterator[Any]:
            observed, given = begin(request, context)
            try:
                async for response in behavior(given, observed):
                    yield observed.encode(response)
            except BaseException as exc:
                observed.end(exc)
                raise
            observed.end(None)

        wrapped = stream_async
    elif coroutine:

        async def call_async(request: Any, context: Any) -> Any:
            observed, given = begin(request, context)
            try:
                response = await behavior(given, observed)
                if not streams_out:
                    observed.call.response = response
                    response = observed.encode(response)
            except BaseException as exc:
                observed.end(exc)
                raise
            observed.end(None)
            return response

        wrapped = call_async
    elif streams_out:

        def stream(request: Any, context: Any) -> Iterator[Any]:
            observed, given = begin(request, context)
            try:
                for response in behavior(given, observed) or ():
                    yield observed.encode(response)
            except BaseException as exc:
                observed.end(exc)
                raise
            observed.end(None)

        wrapped = stream
    else:

        def call(request: Any, context: Any) -> Any:
            observed, given = begin(request, context)
            try:
                response = behavior(given, observed)
                observed.call.response = response
                data = observed.encode(response)
            except BaseException as exc:
                observed.end(exc)
                raise
            observed.end(None)
            return data

        wrapped = call
    return wrapped


class RequestLogSink:
    """One debug line per request on the ``casframe.server`` logger: method, peer, status
    code and duration. Enabled only while that logger is at debug level."""

    def enabled(self) -> bool:
        return log.isEnabledFor(logging.DEBUG)

    def call_started(self, call: CallRecord) -> None:
        pass

    def call_ended(self, call: CallRecord) -> None:
        assert call.code is not None
        log.debug(
            "%s from %s: %s in %.1f ms", call.method, call.peer, call.code.name,
            call.duration * 1000,
        )

