"""A flood of concurrent clients against a real ``casframe serve`` process: 50 clients, each
with a connection of its own, send 200 mixed requests (every kind a build client sends) at
once. Every answer must be right, and the server's memory must come back near where it
started: a flood costs the server while it lasts, never after.

``CASFRAME_SOAK_ROUNDS=N`` repeats the flood N times on the same server (a soak run, see
docs/server.md); by default it runs once.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
from server_processes import rss_bytes, serve_process

from casframe import Digest
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe._protos.google.bytestream import bytestream_pb2_grpc as byte_grpc
from casframe.testing import random_bytes

CLIENTS = 50
REQUESTS_PER_CLIENT = 200
# Each round of a client sends these 8 requests, so 25 rounds make its 200.
_KINDS = ("GetCapabilities", "FindMissingBlobs", "BatchUpdateBlobs", "BatchReadBlobs",
          "ByteStream.Write", "ByteStream.Read", "UpdateActionResult", "GetActionResult")
ROUNDS = REQUESTS_PER_CLIENT // len(_KINDS)
# Hang guard per call: far above any answer, so a lost call fails instead of hanging the test.
HANG_GUARD = 120.0
# Memory the server may keep after a flood over what it had before it, for the allocator's
# own reasons (freed arenas it has not returned yet, grpc's pools): a leak of even 1 KiB per
# request would pass 10 MiB in one flood and grow with every soak round.
RSS_SLACK = 48 << 20
SOAK_ROUNDS = int(os.environ.get("CASFRAME_SOAK_ROUNDS", "1"))


class Client:
    """One client: a connection of its own and the stubs a build client uses."""

    def __init__(self, port: int, number: int) -> None:
        self.number = number
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        self.caps = re_grpc.CapabilitiesStub(self.channel)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.bytestream = byte_grpc.ByteStreamStub(self.channel)
        self.requests = 0

    def run(self, flood: int) -> None:
        for round_ in range(ROUNDS):
            self.one_round(flood, round_)

    def one_round(self, flood: int, round_: int) -> None:
        seed = (flood * CLIENTS + self.number) * ROUNDS + round_
        small = random_bytes(1000 + round_, seed=seed)
        small_digest = Digest.of_bytes(small)
        large = random_bytes((96 << 10) + round_, seed=seed + 10**9)
        large_digest = Digest.of_bytes(large)

        # The upload starts first and stays open while the other calls are made, as a build
        # client's transfers overlap its cache queries: the server must answer those while
        # 50 uploads wait on their clients.
        resource = f"uploads/{uuid.uuid4()}/blobs/{large_digest.hash}/{large_digest.size}"
        rest_may_go = threading.Event()
        upload = self.bytestream.Write.future(
            _chunks(resource, large, rest_may_go), timeout=HANG_GUARD)

        caps = self.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=HANG_GUARD)
        assert caps.cache_capabilities.max_batch_total_size_bytes > 0

        missing = self.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[small_digest.to_proto(), large_digest.to_proto()]),
            timeout=HANG_GUARD)
        assert {d.hash for d in missing.missing_blob_digests} <= {
            small_digest.hash, large_digest.hash}

        updated = self.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=small_digest.to_proto(), data=small)]),
            timeout=HANG_GUARD)
        assert [r.status.code for r in updated.responses] == [0]

        read = self.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
            digests=[small_digest.to_proto()]), timeout=HANG_GUARD)
        assert [(r.status.code, r.data) for r in read.responses] == [(0, small)]

        rest_may_go.set()
        assert upload.result(timeout=HANG_GUARD).committed_size == len(large)

        got = b"".join(r.data for r in self.bytestream.Read(byte_pb2.ReadRequest(
            resource_name=f"blobs/{large_digest.hash}/{large_digest.size}"), timeout=HANG_GUARD))
        assert got == large

        action = Digest.of_bytes(b"action %d" % seed)
        result = re_pb2.ActionResult(exit_code=round_, output_files=[re_pb2.OutputFile(
            path=f"out/{seed}", digest=large_digest.to_proto())])
        self.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=action.to_proto(), action_result=result), timeout=HANG_GUARD)

        cached = self.ac.GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=action.to_proto()), timeout=HANG_GUARD)
        assert cached == result
        self.requests += len(_KINDS)


def _chunks(
    resource: str, data: bytes, rest_may_go: threading.Event, size: int = 32 << 10
) -> Iterator[byte_pb2.WriteRequest]:
    """An upload in chunks; all but the first wait for ``rest_may_go``."""
    for offset in range(0, len(data), size):
        if offset:
            rest_may_go.wait(HANG_GUARD)
        yield byte_pb2.WriteRequest(
            resource_name=resource if offset == 0 else "", write_offset=offset,
            data=data[offset:offset + size], finish_write=offset + size >= len(data))


def _flood(port: int, flood: int) -> tuple[int, list[str]]:
    """50 clients at once; returns the requests answered and every failure, described."""
    clients = [Client(port, number) for number in range(CLIENTS)]
    errors: list[str] = []
    start = threading.Barrier(CLIENTS)

    def run(client: Client) -> None:
        try:
            start.wait(timeout=HANG_GUARD)
            client.run(flood)
        except Exception as exc:  # noqa: BLE001 - every failure is collected and shown
            errors.append(f"client {client.number}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.channel.close()
    return sum(client.requests for client in clients), errors


def _settled_rss(pid: int) -> int:
    """The server's RSS once calls have ended (grpc frees a call's memory just after it)."""
    time.sleep(1.0)
    return rss_bytes(pid)


def test_50_clients_times_200_mixed_requests_all_answered_and_memory_returns(
    tmp_path: Path,
) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    with serve_process(store_url, stderr=subprocess.DEVNULL) as (process, port):
        # One small flood first: the thread pool, grpc's buffers and the allocator's arenas
        # exist from then on, as in a server that has been running for a while.
        warm = Client(port, CLIENTS)
        warm.run(flood=-1)
        warm.channel.close()
        before = _settled_rss(process.pid)

        after = []
        for flood in range(SOAK_ROUNDS):
            answered, errors = _flood(port, flood)
            assert not errors, f"{len(errors)} failed clients, e.g. {errors[:3]}"
            assert answered == CLIENTS * REQUESTS_PER_CLIENT
            after.append(_settled_rss(process.pid))
        assert process.poll() is None

    grown = {f"flood {n + 1}": f"+{(rss - before) / (1 << 20):.1f} MiB"
             for n, rss in enumerate(after)}
    assert max(after) - before < RSS_SLACK, (
        f"server RSS {before / (1 << 20):.1f} MiB before, then {grown}")
