"""Stalled streams: clients that open ByteStream calls and then stop sending or stop reading.

A stalled stream must cost the server a slot, never its ability to answer everyone else: other
clients' calls keep being answered at once, a stream without progress is ended after the idle
timeout (an upload keeping what it received), and a stream beyond the limit is refused with
``RESOURCE_EXHAUSTED`` instead of waiting.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_processes import serve_process, stalled_streams

import casframe
from casframe import Digest, Store, hookimpl, open_store
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe._protos.google.bytestream import bytestream_pb2_grpc as byte_grpc
from casframe.server import Server
from casframe.testing import random_bytes

MiB = 1 << 20
# Hang guard for calls whose outcome is not a latency: far above any answer on a busy machine.
HANG_GUARD = 60.0
# What the REAPI clients sharing the server expect of an ordinary call.
ANSWER_WITHIN = 1.0

# A connection of its own, not the one another channel to the same address already has.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# A client that does not read stops the server's sends once the stream's window is full.
NO_WINDOW_GROWTH = [*OWN_CONNECTION, ("grpc.http2.bdp_probe", 0)]


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {HANG_GUARD:g} s")
        time.sleep(0.02)


def _refused_once_counted(call: Callable[[], object]) -> grpc.RpcError:
    """The error of ``call``, made again while it succeeds (the streams that should fill the
    server's limit are not all counted yet), for at most the hang guard."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        try:
            call()
        except grpc.RpcError as exc:
            return exc
        if time.monotonic() > deadline:
            raise AssertionError(f"never refused in {HANG_GUARD:g} s: the limit is not applied")
        time.sleep(0.05)


def _upload_resource(digest: Digest) -> str:
    return f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size}"


def test_500_stalled_writes_and_500_stalled_reads_leave_every_other_call_answered(
    tmp_path: Path,
) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    with open_store(store_url) as store:
        large = store.put_bytes(random_bytes(8 * MiB, seed=1))  # what the stalled Reads read
        batch_blob = random_bytes(MiB, seed=2)
        batched = store.put_bytes(batch_blob)
    absent = Digest.of_bytes(b"never stored")

    # Idle timeout far beyond the test: the streams stay stalled, not ended, while it runs.
    with serve_process(store_url, "--stream-idle-timeout", "600",
                       stderr=subprocess.DEVNULL) as (_, port), \
            stalled_streams(port, writes=500, reads=500, read_digest=(large.hash, large.size)), \
            grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
        grpc.channel_ready_future(channel).result(timeout=HANG_GUARD)
        cas = re_grpc.ContentAddressableStorageStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        calls: dict[str, Callable[[], object]] = {
            "GetCapabilities": lambda: re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(), timeout=HANG_GUARD),
            "Health.Check": lambda: health.Check(
                health_pb2.HealthCheckRequest(), timeout=HANG_GUARD),
            "FindMissingBlobs": lambda: cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                blob_digests=[batched.to_proto(), absent.to_proto()]), timeout=HANG_GUARD),
            "BatchReadBlobs of 1 MiB": lambda: cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
                digests=[batched.to_proto()]), timeout=HANG_GUARD),
        }
        answers: dict[str, object] = {}
        took: dict[str, float] = {}
        for name, call in calls.items():
            started = time.monotonic()
            answers[name] = call()
            took[name] = time.monotonic() - started
        slow = {name: f"{seconds:.2f} s" for name, seconds in took.items()
                if seconds >= ANSWER_WITHIN}
        assert not slow, f"answered in over {ANSWER_WITHIN:g} s with 1,000 stalled streams: {slow}"

        assert answers["Health.Check"].status == health_pb2.HealthCheckResponse.SERVING  # type: ignore[attr-defined]
        assert [d.hash for d in answers["FindMissingBlobs"].missing_blob_digests] == [absent.hash]  # type: ignore[attr-defined]
        (read,) = answers["BatchReadBlobs of 1 MiB"].responses  # type: ignore[attr-defined]
        assert read.data == batch_blob

        # The 1,000 stalled streams fill the default limit: one more is refused, not queued.
        # A stalled Write's chunk may have left the client before the server counted its
        # call, so the Read is tried again until all 1,000 are counted.
        read = byte_pb2.ReadRequest(resource_name=f"blobs/{batched.hash}/{batched.size}")
        refused = _refused_once_counted(
            lambda: list(byte_grpc.ByteStreamStub(channel).Read(read, timeout=HANG_GUARD)))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert refused.details() == "too many streams in progress (limit 1000); retry later"


def test_an_idle_write_ends_with_unavailable_and_its_upload_resumes(memory_store: Store) -> None:
    data = random_bytes(3 * MiB, seed=3)
    digest = Digest.of_bytes(data)
    resource = _upload_resource(digest)
    release = threading.Event()

    def one_chunk_then_silence() -> Iterator[byte_pb2.WriteRequest]:
        yield byte_pb2.WriteRequest(resource_name=resource, write_offset=0, data=data[:MiB])
        release.wait(HANG_GUARD)

    with Server(memory_store, stream_idle_timeout=0.5) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        bytestream = byte_grpc.ByteStreamStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as ended:
                bytestream.Write(one_chunk_then_silence(), timeout=HANG_GUARD)
        finally:
            release.set()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == (
            "no message on this Write for 0.5 s (the server's stream idle timeout); "
            "retry the call"
        )

        status = bytestream.QueryWriteStatus(
            byte_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=HANG_GUARD)
        assert (status.committed_size, status.complete) == (MiB, False)
        rest = byte_pb2.WriteRequest(
            resource_name=resource, write_offset=MiB, data=data[MiB:], finish_write=True)
        written = bytestream.Write(iter([rest]), timeout=HANG_GUARD)
        assert written.committed_size == len(data)
        assert memory_store.read_bytes(digest) == data
        _wait_for(lambda: len(server.streams) == 0, "the Writes still hold stream slots")


def test_a_read_whose_client_stops_reading_is_ended_and_frees_its_slot(
    memory_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    data = random_bytes(8 * MiB, seed=4)
    digest = memory_store.put_bytes(data)
    request = byte_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}")

    with caplog.at_level(logging.INFO, logger="casframe.server"), \
            Server(memory_store, stream_idle_timeout=0.5) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}", options=NO_WINDOW_GROWTH) as channel:
        responses = byte_grpc.ByteStreamStub(channel).Read(request, timeout=HANG_GUARD)
        received = [next(responses).data]  # then the client stops reading
        _wait_for(lambda: any("Read stream from" in r.getMessage() and "stalled" in
                              r.getMessage() for r in caplog.records),
                  "the server never noticed the stalled Read")
        with pytest.raises(grpc.RpcError) as ended:
            for response in responses:  # what was in flight, then the status
                received.append(response.data)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == (
            "the client took no message for 0.5 s (the server's stream idle timeout); "
            "retry the call"
        )
        assert len(b"".join(received)) < len(data)
        assert data.startswith(b"".join(received))
        _wait_for(lambda: len(server.streams) == 0, "the ended Read still holds its slot")


def test_streams_beyond_the_limit_get_resource_exhausted_at_once(memory_store: Store) -> None:
    blob = memory_store.put_bytes(b"small blob")
    tree = memory_store.put_directory(re_pb2.Directory())
    release = threading.Event()

    def stalled_upload() -> Iterator[byte_pb2.WriteRequest]:
        digest = Digest.of_bytes(b"x" * 100)
        yield byte_pb2.WriteRequest(
            resource_name=_upload_resource(digest), write_offset=0, data=b"x" * 10)
        release.wait(HANG_GUARD)

    with Server(memory_store, max_streams=2) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        bytestream = byte_grpc.ByteStreamStub(channel)
        try:
            stalled = [bytestream.Write.future(stalled_upload(), timeout=HANG_GUARD)
                       for _ in range(2)]
            _wait_for(lambda: len(server.streams) == 2, "the stalled Writes never started")
            read = byte_pb2.ReadRequest(resource_name=f"blobs/{blob.hash}/{blob.size}")
            for refused_call in (
                lambda: list(bytestream.Read(read, timeout=HANG_GUARD)),
                lambda: bytestream.Write(stalled_upload(), timeout=HANG_GUARD),
                lambda: list(re_grpc.ContentAddressableStorageStub(channel).GetTree(
                    re_pb2.GetTreeRequest(root_digest=tree.to_proto()), timeout=HANG_GUARD)),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    refused_call()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert refused.value.details() == (
                    "too many streams in progress (limit 2); retry later")
            capabilities = re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(), timeout=HANG_GUARD)
            assert capabilities.cache_capabilities.max_batch_total_size_bytes > 0
        finally:
            release.set()
        for upload in stalled:  # half-closed without finish_write: kept for resumption
            assert upload.result(timeout=HANG_GUARD).committed_size == 10
        _wait_for(lambda: len(server.streams) == 0, "the ended Writes still hold slots")
        assert b"".join(r.data for r in bytestream.Read(read, timeout=HANG_GUARD)) == b"small blob"


@pytest.mark.parametrize("option, value, message", [
    ("--max-streams", "0", "0 is not in the range x>=1"),
    ("--stream-idle-timeout", "0", "0.0 is not in the range x>0"),
])
def test_serve_refuses_limits_that_are_not_positive(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "casframe.server", f"file://{tmp_path / 'store'}",
         "--listen", "127.0.0.1:0", option, value],
        capture_output=True, text=True, timeout=HANG_GUARD,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


class _AsyncCallCounter(grpc.aio.ServerInterceptor):
    """An asyncio interceptor, as a plugin may now return: counts the calls it lets through."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.methods.append(details.method)
        return await continuation(details)


def test_asyncio_interceptors_from_plugins_see_streams(memory_store: Store) -> None:
    counter = _AsyncCallCounter()

    class Plugin:
        @hookimpl
        def casframe_server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
            return [counter]

    data = random_bytes(3 * MiB, seed=5)
    digest = Digest.of_bytes(data)
    with casframe.registered_plugin(Plugin(), "async-counter"), \
            Server(memory_store) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        bytestream = byte_grpc.ByteStreamStub(channel)
        request = byte_pb2.WriteRequest(resource_name=_upload_resource(digest), write_offset=0,
                                        data=data, finish_write=True)
        assert bytestream.Write(iter([request]), timeout=HANG_GUARD).committed_size == len(data)
        read = byte_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}")
        assert b"".join(r.data for r in bytestream.Read(read, timeout=HANG_GUARD)) == data
    assert counter.methods == ["/google.bytestream.ByteStream/Write",
                               "/google.bytestream.ByteStream/Read"]


class _WrappingInterceptor(grpc.ServerInterceptor):
    """A classic interceptor that wraps every ByteStream behaviour and GetTree's, as plugins
    written for the threaded server do (metrics around each call)."""

    def __init__(self) -> None:
        self.finished: list[str] = []

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        wrapped = details.method.startswith("/google.bytestream.ByteStream/") or (
            details.method == "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree")
        if handler is None or not wrapped:
            return handler
        finished = self.finished
        name = details.method.rpartition("/")[2]
        codecs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_stream:
            def read(request: Any, context: Any) -> Iterator[Any]:
                yield from handler.unary_stream(request, context)
                finished.append(name)

            return grpc.unary_stream_rpc_method_handler(read, **codecs)

        def call(request: Any, context: Any) -> Any:
            behavior = handler.stream_unary or handler.unary_unary
            response = behavior(request, context)
            finished.append(name)
            return response

        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(call, **codecs)
        return grpc.unary_unary_rpc_method_handler(call, **codecs)


def test_classic_interceptors_that_wrap_bytestream_calls_keep_working(
    memory_store: Store,
) -> None:
    wrapping = _WrappingInterceptor()
    data = random_bytes(3 * MiB, seed=6)
    digest = Digest.of_bytes(data)
    resource = _upload_resource(digest)
    with Server(memory_store, interceptors=[wrapping]) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        bytestream = byte_grpc.ByteStreamStub(channel)
        chunks = [byte_pb2.WriteRequest(resource_name=resource, write_offset=offset,
                                        data=data[offset:offset + MiB],
                                        finish_write=offset + MiB >= len(data))
                  for offset in range(0, len(data), MiB)]
        assert bytestream.Write(iter(chunks), timeout=HANG_GUARD).committed_size == len(data)
        read = byte_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}")
        assert b"".join(r.data for r in bytestream.Read(read, timeout=HANG_GUARD)) == data
        with pytest.raises(grpc.RpcError) as missing:
            list(bytestream.Read(byte_pb2.ReadRequest(
                resource_name=f"blobs/{'0' * 64}/5"), timeout=HANG_GUARD))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        status = bytestream.QueryWriteStatus(
            byte_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=HANG_GUARD)
        assert status.complete
        root = memory_store.put_directory(re_pb2.Directory(files=[
            re_pb2.FileNode(name="blob", digest=digest.to_proto())]))
        (page,) = re_grpc.ContentAddressableStorageStub(channel).GetTree(
            re_pb2.GetTreeRequest(root_digest=root.to_proto()), timeout=HANG_GUARD)
        assert list(page.directories) == [memory_store.get_directory(root)]
    assert wrapping.finished == ["Write", "Read", "QueryWriteStatus", "GetTree"]


def test_a_stalled_client_that_goes_away_frees_its_slots(memory_store: Store) -> None:
    large = memory_store.put_bytes(random_bytes(8 * MiB, seed=7))
    with Server(memory_store) as server:
        assert server.port is not None
        with stalled_streams(server.port, writes=5, reads=5,
                             read_digest=(large.hash, large.size), channels=2) as client:
            _wait_for(lambda: len(server.streams) == 10, "the stalled streams never started")
            client.kill()  # its connections drop with the streams still stalled
            client.wait()
        _wait_for(lambda: len(server.streams) == 0, "a vanished client's streams hold slots")


def _directory_chain(store: Store, depth: int, files: int) -> Digest:
    """The root of ``depth`` nested Directories of ``files`` file entries each (~90 bytes an
    entry), around an empty one: every GetTree page of one Directory is larger than an HTTP/2
    stream window, so a client that stops reading stops the server's sends."""
    child = store.put_directory(re_pb2.Directory())
    for level in range(depth):
        blob = store.put_bytes(b"file %d" % level).to_proto()
        child = store.put_directory(re_pb2.Directory(
            files=[re_pb2.FileNode(name=f"f{entry:05d}", digest=blob) for entry in range(files)],
            directories=[re_pb2.DirectoryNode(name="d", digest=child.to_proto())],
        ))
    return child


def test_gettree_calls_whose_clients_stop_reading_hold_no_thread(memory_store: Store) -> None:
    root = _directory_chain(memory_store, depth=20, files=1000)
    workers, stalled_count = 2, 6  # more stalled GetTree calls than the server has threads
    request = re_pb2.GetTreeRequest(root_digest=root.to_proto(), page_size=1)
    with Server(memory_store, max_workers=workers) as server:
        address = f"127.0.0.1:{server.port}"
        channels = [grpc.insecure_channel(address, options=NO_WINDOW_GROWTH)
                    for _ in range(stalled_count)]
        try:
            stalled = [re_grpc.ContentAddressableStorageStub(channel).GetTree(
                request, timeout=HANG_GUARD) for channel in channels]
            # Each takes its first page, then stops reading.
            assert [len(next(pages).directories) for pages in stalled] == [1] * stalled_count
            _wait_for(lambda: len(server.streams) == stalled_count,
                      "the stalled GetTree calls are not all counted as streams")

            with grpc.insecure_channel(address, options=OWN_CONNECTION) as other:
                health = health_pb2_grpc.HealthStub(other)
                calls: dict[str, Callable[[], Any]] = {
                    "GetCapabilities": lambda: re_grpc.CapabilitiesStub(other).GetCapabilities(
                        re_pb2.GetCapabilitiesRequest(), timeout=HANG_GUARD),
                    "Health.Check": lambda: health.Check(
                        health_pb2.HealthCheckRequest(), timeout=HANG_GUARD),
                }
                took: dict[str, float] = {}
                answers: dict[str, Any] = {}
                for name, call in calls.items():
                    started = time.monotonic()
                    answers[name] = call()
                    took[name] = time.monotonic() - started
                slow = {name: f"{seconds:.2f} s" for name, seconds in took.items()
                        if seconds >= ANSWER_WITHIN}
                assert not slow, (
                    f"answered in over {ANSWER_WITHIN:g} s with {stalled_count} stalled "
                    f"GetTree calls on {workers} threads: {slow}")
                assert answers["GetCapabilities"].cache_capabilities.digest_functions
                assert answers["Health.Check"].status == health_pb2.HealthCheckResponse.SERVING

                pages = list(re_grpc.ContentAddressableStorageStub(other).GetTree(
                    re_pb2.GetTreeRequest(root_digest=root.to_proto()), timeout=HANG_GUARD))
                tree = [directory for page in pages for directory in page.directories]
                assert len(tree) == 21  # the 20 levels and the empty Directory at the bottom
                assert tree[0] == memory_store.get_directory(root)
                assert not pages[-1].next_page_token
        finally:
            for channel in channels:
                channel.close()
        _wait_for(lambda: len(server.streams) == 0, "the cancelled GetTree calls hold slots")


def test_a_write_declaring_the_largest_size_is_refused_and_stores_nothing(
    tmp_path: Path,
) -> None:
    largest = (1 << 63) - 1
    digest = Digest("ab" * 32, largest)
    store_root = tmp_path / "store"
    with open_store(f"file://{store_root}") as store, Server(store) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        bytestream = byte_grpc.ByteStreamStub(channel)
        one_message = _upload_resource(digest)
        streamed = _upload_resource(digest)
        for requests in (
            [byte_pb2.WriteRequest(resource_name=one_message, data=b"abc", finish_write=True)],
            [byte_pb2.WriteRequest(resource_name=streamed, data=b"abc"),
             byte_pb2.WriteRequest(write_offset=3, data=b"de", finish_write=True)],
        ):
            with pytest.raises(grpc.RpcError) as refused:
                bytestream.Write(iter(requests), timeout=HANG_GUARD)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            sent = b"".join(r.data for r in requests)
            assert refused.value.details() == (
                f"content does not match its digest: expected {digest}, "
                f"got {Digest.of_bytes(sent)}")
        for resource in (one_message, streamed):  # nothing kept to resume
            with pytest.raises(grpc.RpcError) as missing:
                bytestream.QueryWriteStatus(
                    byte_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=HANG_GUARD)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert missing.value.details() == (
                f"no upload in progress for {resource!r}: start at offset 0")
        assert not store.contains(digest)
        assert server.partial_uploads == 0
    assert [path for path in store_root.rglob("*") if not path.is_dir()] == []


def test_query_write_status_of_the_largest_declared_size(memory_store: Store) -> None:
    digest = Digest("cd" * 32, (1 << 63) - 1)
    resource = _upload_resource(digest)
    query = byte_pb2.QueryWriteStatusRequest(resource_name=resource)
    with Server(memory_store) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        bytestream = byte_grpc.ByteStreamStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            bytestream.QueryWriteStatus(query, timeout=HANG_GUARD)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing.value.details() == (
            f"no upload in progress for {resource!r}: start at offset 0")

        # A few bytes, then the client half-closes: kept, and reported as incomplete.
        started = bytestream.Write(iter([byte_pb2.WriteRequest(
            resource_name=resource, data=b"abc")]), timeout=HANG_GUARD)
        assert started.committed_size == 3
        status = bytestream.QueryWriteStatus(query, timeout=HANG_GUARD)
        assert (status.committed_size, status.complete) == (3, False)

        # One past the largest size is no blob size at all.
        beyond = resource.replace(str(digest.size), str(1 << 63))
        with pytest.raises(grpc.RpcError) as invalid:
            bytestream.QueryWriteStatus(
                byte_pb2.QueryWriteStatusRequest(resource_name=beyond), timeout=HANG_GUARD)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid.value.details() == (
            f"malformed resource name {beyond!r}: not a valid blob size: {1 << 63}")
