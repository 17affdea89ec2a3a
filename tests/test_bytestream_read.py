"""How ByteStream Read spends the server's thread pool: the steps every download pays.

A client that walks a tree with ByteStream (Bazel's and BuildStream's roots, any client without
batch calls) makes one Read per small blob, so each step a Read takes in the pool is a thread hop
that every such blob pays.
These drive the servicer directly, with a pool that counts its work and a context that keeps
what was sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from casframe import Digest, Store, open_store
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.server import ServerSettings
from casframe.server.bytestream import ByteStreamService
from casframe.server.names import Instances
from casframe.testing import random_bytes


class CountingPool(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.steps = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.steps += 1
        return super().submit(fn, *args, **kwargs)


class Abort(Exception):
    pass


class RecordingContext:
    """What a grpc.aio servicer context does for Read: take messages, abort with a status."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    async def abort(self, code: grpc.StatusCode, details: str, *rest: Any) -> None:
        raise Abort(code, details)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path.as_uri())


def read(store: Store, digest: Digest, offset: int = 0) -> tuple[list[bytes], int]:
    """The messages a Read of ``digest`` sends, and the pool steps it took."""
    pool = CountingPool()
    service = ByteStreamService(store, ServerSettings(), Instances([""]), pool)
    context = RecordingContext()
    request = byte_pb2.ReadRequest(
        resource_name=f"blobs/{digest.hash}/{digest.size}", read_offset=offset
    )
    try:
        asyncio.run(service.Read(request, context))  # type: ignore[arg-type]
    finally:
        pool.shutdown()
    return context.sent, pool.steps


def test_a_small_blob_is_read_in_one_pool_step(store: Store) -> None:
    data = random_bytes(5000, seed=1)
    digest = store.put_bytes(data)
    sent, steps = read(store, digest)
    assert sent == [data]
    assert steps == 1


def test_a_large_blob_takes_one_pool_step_a_chunk(store: Store) -> None:
    data = random_bytes((3 << 20) + 5, seed=2)
    digest = store.put_bytes(data)
    sent, steps = read(store, digest)
    assert b"".join(sent) == data
    # Chunks start at 64 KiB and double up to the 1 MiB the settings allow.
    assert [len(m) for m in sent] == [
        64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 1 << 20, (64 << 10) + 5
    ]
    assert steps == len(sent)


def test_a_read_from_an_offset_sends_the_rest(store: Store) -> None:
    data = random_bytes(200_000, seed=3)
    digest = store.put_bytes(data)
    sent, steps = read(store, digest, offset=150_000)
    assert b"".join(sent) == data[150_000:]
    assert steps == 1


def test_a_corrupt_blob_fails_before_its_last_chunk(store: Store, tmp_path: Path) -> None:
    data = random_bytes(300_000, seed=4)
    digest = store.put_bytes(data)
    [path] = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    path.chmod(0o644)
    damaged = bytearray(data)
    damaged[-1] ^= 1
    path.write_bytes(bytes(damaged))
    pool = CountingPool()
    service = ByteStreamService(store, ServerSettings(), Instances([""]), pool)
    context = RecordingContext()
    request = byte_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}")
    with pytest.raises(Abort) as failure:
        asyncio.run(service.Read(request, context))  # type: ignore[arg-type]
    pool.shutdown()
    assert failure.value.args[0] == grpc.StatusCode.DATA_LOSS
    assert sum(map(len, context.sent)) < len(data)
