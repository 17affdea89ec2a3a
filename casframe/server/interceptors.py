"""The server's interceptors: the limit on concurrent streams, and the adapter
that runs classic ``grpc.ServerInterceptor`` objects (what plugins return) on the asyncio server.

The server is ``grpc.aio``: streaming handlers (ByteStream, GetTree) are coroutines, unary
handlers are plain functions that grpc runs in the server's thread pool. Interceptors here must
never block the event loop: a classic interceptor runs in the thread pool, its ``continuation``
hopping back to the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from casframe.server.errors import StatusError

__all__ = [
    "UNCOUNTED_STREAMS",
    "StreamLimitInterceptor",
    "StreamSlots",
    "SyncInterceptorAdapter",
    "is_async_behavior",
]

log = logging.getLogger("casframe.server")

_H = TypeVar("_H")
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
#: Long-lived by design (a load balancer watching health): not counted as a stream.
UNCOUNTED_STREAMS = ("/grpc.health.v1.Health/Watch",)


def is_async_behavior(behavior: Callable[..., Any]) -> bool:
    """Whether grpc.aio runs ``behavior`` on the event loop (else in the thread pool)."""
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def _kind(handler: grpc.RpcMethodHandler) -> tuple[str, Callable[..., Any]]:
    for kind in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            return kind, behavior
    raise ValueError(f"method handler {handler!r} has no behaviour")


def _rewrap(
    handler: grpc.RpcMethodHandler, wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """The same handler (kind and codecs) with its behaviour replaced by ``wrap(kind, it)``."""
    kind, behavior = _kind(handler)
    return _FACTORIES[kind](
        wrap(kind, behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class StreamSlots:
    """Counts the streaming calls in progress and refuses one beyond the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def acquire(self) -> None:
        with self._lock:
            if self._count >= self.limit:
                raise StatusError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many streams in progress (limit {self.limit}); retry later",
                )
            self._count += 1

    def release(self) -> None:
        with self._lock:
            self._count -= 1


class StreamLimitInterceptor(grpc.aio.ServerInterceptor):
    """Holds a :class:`StreamSlots` slot for each streaming call while its behaviour runs;
    a call beyond the limit is answered ``RESOURCE_EXHAUSTED`` at once."""

    def __init__(self, slots: StreamSlots) -> None:
        self.slots = slots

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or not (handler.request_streaming or handler.response_streaming)
            or handler_call_details.method in UNCOUNTED_STREAMS
        ):
            return handler
        return _rewrap(handler, lambda kind, behavior: self._limited(behavior))

    def _limited(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        slots = self.slots
        if inspect.iscoroutinefunction(behavior):

            async def call_async(request: Any, context: Any) -> Any:
                try:
                    slots.acquire()
                except StatusError as exc:
                    await context.abort(exc.code, exc.message)
                try:
                    return await behavior(request, context)
                finally:
                    slots.release()

            return call_async
        if inspect.isasyncgenfunction(behavior):

            async def stream_async(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    slots.acquire()
                except StatusError as exc:
                    await context.abort(exc.code, exc.message)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    slots.release()

            return stream_async

        def stream(request: Any, context: Any) -> Iterator[Any]:
            try:
                slots.acquire()
            except StatusError as exc:
                context.abort(exc.code, exc.message)
            try:
                yield from behavior(request, context)
            finally:
                slots.release()

        if inspect.isgeneratorfunction(behavior):
            return stream

        def call_unary(request: Any, context: Any) -> Any:
            try:
                slots.acquire()
            except StatusError as exc:
                context.abort(exc.code, exc.message)
            try:
                return behavior(request, context)
            finally:
                slots.release()

        return call_unary


class SyncInterceptorAdapter(grpc.aio.ServerInterceptor):
    """Runs a classic ``grpc.ServerInterceptor`` on the asyncio server.

    Its ``intercept_service`` runs in the thread pool; ``continuation`` returns the handler
    of the rest of the chain. Coroutine behaviours (ByteStream, GetTree) are shown to it as
    plain functions: if it returns the handler it was given, the call runs as a coroutine as
    before; if it wraps the behaviour, the wrapped call runs in a pool thread and drives the
    coroutine from there (holding that thread for the whole stream, as on a threaded server).
    """

    def __init__(self, interceptor: grpc.ServerInterceptor, pool: Executor) -> None:
        self.interceptor = interceptor
        self._pool = pool

    def __repr__(self) -> str:
        return f"<SyncInterceptorAdapter {self.interceptor!r}>"

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        loop = asyncio.get_running_loop()
        shown: list[tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = []

        def sync_continuation(
            details: grpc.HandlerCallDetails,
        ) -> grpc.RpcMethodHandler | None:
            pending = _awaited(continuation(details))
            handler = asyncio.run_coroutine_threadsafe(pending, loop).result()
            if handler is None:
                return None
            kind, behavior = _kind(handler)
            if not is_async_behavior(behavior):
                return handler
            facade = _rewrap(handler, lambda k, b: _threaded(k, b, loop, self._pool))
            shown.append((facade, handler))
            return facade

        returned = await loop.run_in_executor(
            self._pool, self.interceptor.intercept_service, sync_continuation, handler_call_details
        )
        for facade, handler in shown:
            if returned is facade:
                return handler
        if returned is None:
            return None
        return _rewrap(returned, _in_generator)


def _in_generator(kind: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A streaming behaviour as a generator function. grpc.aio calls a plain function that
    returns an iterator on the event loop itself, where its ``context.abort`` would wait on
    the loop forever; a generator's body runs in the thread pool."""
    if not kind.endswith("_stream") or is_async_behavior(behavior):
        return behavior
    if inspect.isgeneratorfunction(behavior):
        return behavior

    def stream(request: Any, context: Any) -> Iterator[Any]:
        responses = behavior(request, context)
        if responses is not None:
            yield from responses

    return stream


async def _awaited(awaitable: Awaitable[_H]) -> _H:
    return await awaitable


class _AsyncContext:
    """The asyncio context surface casframe's coroutine handlers use, over a thread-pool
    handler's context (for a classic interceptor that wrapped a coroutine behaviour)."""

    def __init__(self, context: Any, responses: queue.Queue[Any] | None, pool: Executor) -> None:
        self._context = context
        self._responses = responses
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: self._context.abort(*args, **kwargs)
        )

    async def write(self, message: Any) -> None:
        assert self._responses is not None, "write on a call without streamed responses"
        await asyncio.get_running_loop().run_in_executor(self._pool, self._responses.put, message)


async def _aiter_sync(iterator: Iterator[Any], pool: Executor) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    done = object()
    while (item := await loop.run_in_executor(pool, next, iterator, done)) is not done:
        yield item


_END = object()


def _threaded(
    kind: str, behavior: Callable[..., Any], loop: asyncio.AbstractEventLoop, pool: Executor
) -> Callable[..., Any]:
    """A plain function (or generator) that runs coroutine ``behavior`` on ``loop``."""
    request_streaming = kind.startswith("stream_")

    def arguments(request: Any, context: Any, responses: queue.Queue[Any] | None) -> Any:
        given = _aiter_sync(request, pool) if request_streaming else request
        return given, _AsyncContext(context, responses, pool)

    if kind.endswith("_unary"):

        def call(request: Any, context: Any) -> Any:
            coroutine = behavior(*arguments(request, context, None))
            return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

        return call

    def stream(request: Any, context: Any) -> Iterator[Any]:
        responses: queue.Queue[Any] = queue.Queue(maxsize=1)

        async def run() -> None:
            try:
                await behavior(*arguments(request, context, responses))
            finally:
                await loop.run_in_executor(pool, responses.put, _END)

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            while (message := responses.get()) is not _END:
                yield message
            future.result()
        finally:
            future.cancel()
            while not future.done():  # unblock a put waiting on a response nobody takes
                try:
                    responses.get(timeout=0.1)
                except queue.Empty:
                    pass

    return stream
