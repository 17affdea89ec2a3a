"""Blocking store work from the asyncio server's coroutines, run in its thread pool.

The streaming handlers (ByteStream Read and Write, GetTree) are coroutines on the event loop;
every step that may block goes through :func:`in_pool`, so a stream waiting on its client holds
no thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

__all__ = ["in_pool", "iterate_in_pool"]

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
