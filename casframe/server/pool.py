"""Blocking store work from the asyncio server's coroutines, run in its thread pool.

The streaming handlers (ByteStream Read and Write, GetTree) are coroutines on the event loop;
every step that may block goes through :func:`in_pool`, so a stream waiting on its client holds
no thread.

:func:`small_calls_inline` serves a unary method's small calls on the event loop itself: over a
local store (``file://``, ``memory://``) a FindMissingBlobs of a few digests is a few system
calls on cached metadata, less work than the trip to a pool thread and back that grpc.aio makes
for a plain function (about a third of the server's CPU per call, measured with rusage and
callgrind; see docs/server.md#performance). Larger calls still go to the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

__all__ = ["in_pool", "iterate_in_pool", "small_calls_inline"]

_T = TypeVar("_T")


async def in_pool(pool: Executor, function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` run in ``pool``. Should the calling task be cancelled meanwhile,
    the work still finishes before this returns, so nothing else touches what it uses early."""
    future = asyncio.get_running_loop().run_in_executor(pool, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


async def iterate_in_pool(pool: Executor, items: Iterator[_T]) -> AsyncIterator[_T]:
    """The items of a blocking iterator (a generator doing store work), each one computed in
    ``pool``; the generator is closed in the pool too, however the iteration ends."""
    end = object()
    try:
        while (item := await in_pool(pool, next, items, end)) is not end:
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            await in_pool(pool, close)


class _Aborted(BaseException):
    """What :class:`_BlockingContext`'s ``abort`` raises, for the coroutine to send (not an
    Exception, so that no handler's error boundary takes it for a failure of its own)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _BlockingContext:
    """grpc.aio's context as a plain function run in a pool thread sees one: ``abort`` ends
    the function by raising (the coroutine around it then aborts the call on the loop)."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code, details)


def small_calls_inline(
    behavior: Callable[[Any, Any], _T], pool: Executor, small: Callable[[Any], bool]
) -> Callable[[Any, Any], Any]:
    """A coroutine serving the unary ``behavior`` (a plain function of the request and the
    context): on the event loop when ``small(request)``, else in ``pool``."""

    async def call(request: Any, context: Any) -> _T:
        given = _BlockingContext(context)
        try:
            if small(request):
                return behavior(request, given)
            return await in_pool(pool, behavior, request, given)
        except _Aborted as aborted:
            await context.abort(aborted.code, aborted.details)
            raise  # abort raises; never reached

    return call
