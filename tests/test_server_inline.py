"""Small unary calls over a local store are served on the server's event loop, larger ones and
those over any other store in its thread pool; either way a failure is the same status."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from casframe import Digest, Store, open_store
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe.blobs import VerifiedBlobs
from casframe.server import Server


@pytest.fixture
def threads_asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each store lookup of a FindMissingBlobs or BatchReadBlobs ran in."""
    names: list[str] = []
    find_missing, read_many = VerifiedBlobs.find_missing, VerifiedBlobs.read_many

    def find_missing_noting(self: VerifiedBlobs, *args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return find_missing(self, *args, **kwargs)

    def read_many_noting(self: VerifiedBlobs, *args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return read_many(self, *args, **kwargs)

    monkeypatch.setattr(VerifiedBlobs, "find_missing", find_missing_noting)
    monkeypatch.setattr(VerifiedBlobs, "read_many", read_many_noting)
    return names


@pytest.fixture
def cas_of() -> Iterator[Callable[[Store], re_grpc.ContentAddressableStorageStub]]:
    """A server over the given store, and a CAS stub talking to it."""
    servers: list[Server] = []
    channels: list[grpc.Channel] = []

    def start(store: Store) -> re_grpc.ContentAddressableStorageStub:
        server = Server(store, use_plugins=False)
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.start()}")
        channels.append(channel)
        return re_grpc.ContentAddressableStorageStub(channel)

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(grace=None)


def _digests(store: Store, count: int) -> list[re_pb2.Digest]:
    stored = store.put_bytes(b"stored")
    absent = [Digest.of_bytes(b"absent %d" % i) for i in range(count - 1)]
    return [re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in [stored, *absent]]


def test_small_calls_over_a_local_store_run_on_the_event_loop(
    cas_of: Callable[[Store], re_grpc.ContentAddressableStorageStub], threads_asked: list[str]
) -> None:
    store = open_store("memory://")
    cas = cas_of(store)
    digests = _digests(store, 200)
    small = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests[:16]))
    assert len(small.missing_blob_digests) == 15
    cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests[:1]))
    large = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests))
    assert len(large.missing_blob_digests) == 199
    loop, read, pooled = threads_asked
    assert loop == "casframe-grpc-loop" and read == "casframe-grpc-loop"
    assert pooled.startswith("casframe-grpc_")


def test_calls_over_other_stores_run_in_the_pool(
    cas_of: Callable[[Store], re_grpc.ContentAddressableStorageStub], threads_asked: list[str]
) -> None:
    store = open_store("memory://")
    store.url = "grpc://elsewhere.example:8980"  # as a remote store names itself
    cas = cas_of(store)
    cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=_digests(store, 2)))
    assert [name.startswith("casframe-grpc_") for name in threads_asked] == [True]


@pytest.mark.parametrize("count", [2, 200])
def test_failures_are_statuses_on_the_loop_and_in_the_pool(
    cas_of: Callable[[Store], re_grpc.ContentAddressableStorageStub], count: int
) -> None:
    store = open_store("memory://")
    cas = cas_of(store)
    digests = [*_digests(store, count), re_pb2.Digest(hash="not a digest", size_bytes=1)]
    with pytest.raises(grpc.RpcError) as info:
        cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid digest" in info.value.details()
    # The server goes on answering after a refusal.
    assert cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests[:2]))
