"""The call observer (casframe.server.observe) driven as grpc.aio drives a handler, without a
network: what it hands the behaviour and the sinks."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from casframe.server.observe import CallObserverInterceptor, CallRecord

WRITE = "/google.bytestream.ByteStream/Write"


class _Recorder:
    """A sink keeping the calls that ended."""

    def __init__(self) -> None:
        self.ended: list[CallRecord] = []

    def enabled(self) -> bool:
        return True

    def call_started(self, call: CallRecord) -> None:
        pass

    def call_ended(self, call: CallRecord) -> None:
        self.ended.append(call)


class _Requests:
    """A client stream as grpc.aio hands it over: each raw message through the handler's
    request deserializer."""

    def __init__(self, raw: list[bytes], deserializer: Any) -> None:
        self._raw = raw
        self._deserializer = deserializer

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        if not self._raw:
            raise StopAsyncIteration
        return self._deserializer(self._raw.pop(0))


class _Details:
    method = WRITE
    invocation_metadata = ()


def _decode(raw: bytes) -> str:
    return raw.decode()


def test_a_client_stream_read_in_part_leaves_no_async_generator_for_the_loop_to_close() -> None:
    """A Write whose first message finishes the upload is not read to its end. The requests
    the observer hands the behaviour must then need no closing: an async generator left open
    makes the event loop schedule its ``aclose`` through the loop's self-pipe (a task and a
    wake-up of the loop) for every such call."""
    sink = _Recorder()

    async def first_only(requests: AsyncIterator[str], context: Any) -> str:
        async for message in requests:
            return message
        return ""

    plain = grpc.stream_unary_rpc_method_handler(first_only, request_deserializer=_decode)

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return plain

    async def call() -> tuple[Any, list[object]]:
        handler = await CallObserverInterceptor([sink]).intercept_service(
            continuation, _Details())
        assert handler is not None
        started: list[object] = []
        hooks = sys.get_asyncgen_hooks()

        def first_iteration(generator: object) -> None:
            started.append(generator)
            if hooks.firstiter is not None:
                hooks.firstiter(generator)

        sys.set_asyncgen_hooks(firstiter=first_iteration, finalizer=hooks.finalizer)
        try:
            requests = _Requests([b"upload", b"never read"], handler.request_deserializer)
            answer = await handler.stream_unary(requests, None)
        finally:
            sys.set_asyncgen_hooks(*hooks)
        return answer, started

    answer, started = asyncio.run(call())
    assert answer == "upload"
    assert started == []
    [ended] = sink.ended
    assert (ended.method, ended.code, ended.request, ended.bytes_in) == (
        WRITE, grpc.StatusCode.OK, "upload", len(b"upload"))
