"""The gRPC server, exercised as REAPI clients see it: a real server on 127.0.0.1 port 0, real
channels and the generated stubs (never casframe's own grpc:// backend)."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from bazel_helpers import startup_options
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from server_processes import ClientStubs, serve_process

import casframe
from casframe import Digest, Store, hookimpl, open_store
from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.buildstream.v2 import buildstream_pb2 as bs_pb2
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.server import Server, ServerSettings
from casframe.server.names import hashed_asset_ref_name
from casframe.testing import random_bytes

MiB = 1 << 20


@dataclass
class Served(ClientStubs):
    """A running server and a client channel with every stub."""

    server: Server
    store: Store
    channel: grpc.Channel

    def __post_init__(self) -> None:
        self.attach_stubs(self.channel)


@pytest.fixture
def serve(memory_store: Store) -> Iterator[Callable[..., Served]]:
    """Start servers (over ``memory_store`` unless given another store) for one test."""
    started: list[Served] = []

    def factory(store: Store | None = None, **options: object) -> Served:
        server = Server(store or memory_store, **options)  # type: ignore[arg-type]
        port = server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        served = Served(server, store or memory_store, channel)
        started.append(served)
        return served

    try:
        yield factory
    finally:
        for served in started:
            served.channel.close()
            served.server.stop(grace=None)


@pytest.fixture
def served(serve: Callable[..., Served]) -> Served:
    return serve()


def rpc_error(code: grpc.StatusCode, call: Callable[..., object], *args: object,
              **kwargs: object) -> grpc.RpcError:
    """Call and expect a gRPC error with ``code``; return it for checks on its message."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    error = info.value
    assert error.code() == code, (error.code(), error.details())
    return error


def dproto(digest: Digest) -> re_pb2.Digest:
    return digest.to_proto()


def blob_resource(digest: Digest, instance: str = "") -> str:
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}blobs/{digest.hash}/{digest.size}"


def upload_resource(digest: Digest, upload: str = "0f2c6a1e-upload", instance: str = "") -> str:
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}uploads/{upload}/blobs/{digest.hash}/{digest.size}"


def write_requests(resource: str, data: bytes, *, chunk: int = MiB, start: int = 0,
                   finish: bool = True) -> Iterator[byte_pb2.WriteRequest]:
    offset = start
    end = len(data)
    first = True
    while True:
        piece = data[offset : offset + chunk]
        last = offset + len(piece) >= end
        yield byte_pb2.WriteRequest(
            resource_name=resource if first else "",
            write_offset=offset,
            data=piece,
            finish_write=finish and last,
        )
        first = False
        offset += len(piece)
        if last:
            return


def status_details(error: grpc.RpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin trailer")


# -- Capabilities and instance names ----------------------------------------------------------


def test_capabilities_describe_the_server(served: Served) -> None:
    caps = served.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    cache = caps.cache_capabilities
    # Every function of the store, SHA-256 first (test_server_digest_functions.py has more).
    assert list(cache.digest_functions) == [
        f.reapi_value for f in casframe.DIGEST_FUNCTIONS.values()
        if f.name in served.store.digest_functions
    ]
    assert cache.digest_functions[0] == re_pb2.DigestFunction.SHA256
    assert caps.execution_capabilities.digest_function == re_pb2.DigestFunction.SHA256
    assert cache.action_cache_update_capabilities.update_enabled
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.ALLOWED
    assert cache.max_batch_total_size_bytes == served.server.settings.max_batch_total_size_bytes
    assert 0 < cache.max_batch_total_size_bytes < served.server.settings.max_message_bytes
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert (caps.high_api_version.major, caps.high_api_version.minor) == (2, 3)
    assert not caps.execution_capabilities.exec_enabled


def test_unknown_instance_is_refused_everywhere(serve: Callable[..., Served]) -> None:
    served = serve(instance_names=("main", "ci/linux"))
    served.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="ci/linux"))
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.caps.GetCapabilities,
                      re_pb2.GetCapabilitiesRequest(instance_name="other"))
    assert "unknown instance name 'other'" in error.details()
    assert "'ci/linux', 'main'" in error.details()
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.FindMissingBlobs,
              re_pb2.FindMissingBlobsRequest(instance_name=""))
    digest = served.store.put_bytes(b"x")
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Read,
              byte_pb2.ReadRequest(resource_name=blob_resource(digest, "other")))
    data = b"".join(r.data for r in served.bytestream.Read(
        byte_pb2.ReadRequest(resource_name=blob_resource(digest, "ci/linux"))))
    assert data == b"x"
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.refs.Status,
              bs_pb2.StatusRequest(instance_name="nope"))


def test_instance_names_are_validated(memory_store: Store) -> None:
    for bad in ("_", "a//b", "/a", "x/blobs", "..", "a/uploads/b"):
        with pytest.raises(casframe.InvalidNameError):
            Server(memory_store, instance_names=(bad,))


def test_unsupported_digest_function_is_refused(served: Served) -> None:
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.FindMissingBlobs,
                      re_pb2.FindMissingBlobsRequest(digest_function=re_pb2.DigestFunction.MD5))
    assert error.details().startswith("digest function MD5 is not supported by this server; "
                                      "it offers SHA256")


# -- ContentAddressableStorage ----------------------------------------------------------------


def test_find_missing_blobs(served: Served) -> None:
    present = served.store.put_bytes(b"present")
    absent = Digest.of_bytes(b"absent")
    wrong_size = Digest(present.hash, present.size + 1)
    empty = Digest.of_bytes(b"")
    response = served.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[dproto(d) for d in (present, absent, wrong_size, empty, absent)]))
    assert [Digest.from_proto(d) for d in response.missing_blob_digests] == [absent, wrong_size]

    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.FindMissingBlobs,
                      re_pb2.FindMissingBlobsRequest(
                          blob_digests=[re_pb2.Digest(hash="XYZ", size_bytes=1)]))
    assert "not a hex digest" in error.details()


def test_batch_update_verifies_each_blob(served: Served) -> None:
    good = b"good content"
    claimed = Digest.of_bytes(b"what the client claims")
    response = served.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=dproto(Digest.of_bytes(good)), data=good),
        re_pb2.BatchUpdateBlobsRequest.Request(digest=dproto(claimed), data=b"something else"),
        re_pb2.BatchUpdateBlobsRequest.Request(
            digest=re_pb2.Digest(hash="0" * 63, size_bytes=1), data=b"x"),
    ]))
    codes = [r.status.code for r in response.responses]
    assert codes == [code_pb2.OK, code_pb2.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT]
    assert "does not match its digest" in response.responses[1].status.message
    assert Digest.from_proto(response.responses[1].digest) == claimed
    assert served.store.read_bytes(Digest.of_bytes(good)) == good
    assert served.store.find_missing([claimed, Digest.of_bytes(b"something else")]) == {
        claimed, Digest.of_bytes(b"something else")}


def test_batch_update_over_the_limit_is_refused_whole(served: Served) -> None:
    limit = served.server.settings.max_batch_total_size_bytes
    blobs = [random_bytes(limit // 2 + 1, seed=s) for s in (1, 2)]  # over the limit, in message
    request = re_pb2.BatchUpdateBlobsRequest(requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=dproto(Digest.of_bytes(b)), data=b)
        for b in blobs])
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.BatchUpdateBlobs, request)
    assert "max_batch_total_size_bytes" in error.details()
    assert served.store.find_missing(Digest.of_bytes(b) for b in blobs) == {
        Digest.of_bytes(b) for b in blobs}


def test_batch_read_reports_each_blob(served: Served) -> None:
    present = served.store.put_bytes(b"present")
    corrupt = served.store.put_bytes(b"will be corrupted")
    served.store.blobs.blobs[corrupt] = (b"will be CORRUPTED", 0.0)  # type: ignore[attr-defined]
    absent = Digest.of_bytes(b"absent")
    response = served.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[dproto(d) for d in (present, absent, corrupt, present)]))
    by_position = [(Digest.from_proto(r.digest), r.status.code, r.data) for r in response.responses]
    assert by_position == [
        (present, code_pb2.OK, b"present"),
        (absent, code_pb2.NOT_FOUND, b""),
        (corrupt, code_pb2.DATA_LOSS, b""),
        (present, code_pb2.OK, b"present"),
    ]
    assert "blob not found" in response.responses[1].status.message
    assert "memory://" not in response.responses[1].status.message  # no server details

    limit = served.server.settings.max_batch_total_size_bytes
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.BatchReadBlobs,
              re_pb2.BatchReadBlobsRequest(digests=[re_pb2.Digest(hash="a" * 64,
                                                                   size_bytes=limit + 1)]))


def test_batch_read_counts_every_requested_copy(served: Served) -> None:
    limit = served.server.settings.max_batch_total_size_bytes
    big = served.store.put_bytes(random_bytes(limit - 2000))  # twice over, the reply overflows
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.BatchReadBlobs,
                      re_pb2.BatchReadBlobsRequest(digests=[dproto(big)] * 2))
    assert f"limit of {limit} bytes" in error.details() and "split" in error.details()
    [alone] = served.cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[dproto(big)])).responses
    assert alone.status.code == code_pb2.OK and len(alone.data) == big.size

    # Up to the advertised limit, copies included, the batch is served.
    half = served.store.put_bytes(random_bytes(limit // 2, seed=1))
    response = served.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[dproto(half)] * 2))
    assert [(r.status.code, len(r.data)) for r in response.responses] == [
        (code_pb2.OK, half.size)] * 2


def test_batch_read_of_many_missing_blobs_fits_in_a_reply(served: Served) -> None:
    # A 2.1 MB request whose statuses, messages and all, would make a 4.8 MB reply.
    digests = [re_pb2.Digest(hash=f"{i:064x}", size_bytes=1) for i in range(30_000)]
    response = served.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
    limit = served.server.settings.max_message_bytes
    assert limit - 200 < response.ByteSize() <= limit
    assert [r.digest for r in response.responses] == digests
    assert {r.status.code for r in response.responses} == {code_pb2.NOT_FOUND}
    assert not any(r.data for r in response.responses)
    # Messages go from the end only as far as needed; the first ones are whole.
    assert "blob not found" in response.responses[0].status.message
    assert response.responses[-1].status.message == ""


def test_batch_read_whose_reply_cannot_fit_is_refused(served: Served) -> None:
    blobs = [random_bytes(190, seed=s) for s in range(16_000)]  # 3.0 MB: under the limit
    digests = [Digest.of_bytes(b) for b in blobs]
    served.store.put_many(list(zip(digests, blobs, strict=True)))
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.BatchReadBlobs,
                      re_pb2.BatchReadBlobsRequest(digests=[dproto(d) for d in digests]))
    limit = served.server.settings.max_message_bytes
    assert f"message limit of {limit} bytes" in error.details()
    assert "split it into smaller batches" in error.details()

    response = served.cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[dproto(d) for d in digests[:8000]]))
    assert [r.data for r in response.responses] == blobs[:8000]
    assert {r.status.code for r in response.responses} == {code_pb2.OK}


def test_batch_update_of_many_bad_blobs_fits_in_a_reply(served: Served) -> None:
    # A 1.9 MB request whose mismatch statuses would make a 6.6 MB reply.
    claimed = [re_pb2.Digest(hash=f"{i:064x}", size_bytes=1) for i in range(25_000)]
    response = served.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b"x") for d in claimed]))
    limit = served.server.settings.max_message_bytes
    assert limit - 200 < response.ByteSize() <= limit
    assert [r.digest for r in response.responses] == claimed
    assert {r.status.code for r in response.responses} == {code_pb2.INVALID_ARGUMENT}
    assert "does not match its digest" in response.responses[0].status.message
    assert response.responses[-1].status.message == ""
    assert served.store.find_missing([Digest.of_bytes(b"x")]) == {Digest.of_bytes(b"x")}


def test_batch_update_whose_reply_cannot_fit_is_refused(served: Served) -> None:
    # 4.1 MB of digests with no data: even code-only statuses would not fit in a reply.
    claimed = [re_pb2.Digest(hash=f"{i:064x}", size_bytes=1) for i in range(57_000)]
    request = re_pb2.BatchUpdateBlobsRequest(requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=d) for d in claimed])
    assert request.ByteSize() < served.server.settings.max_message_bytes
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.BatchUpdateBlobs, request)
    assert "57000 blobs" in error.details() and "split it into smaller batches" in error.details()


def test_get_tree_pages(served: Served, make_tree: Callable[..., Path]) -> None:
    root = served.store.import_directory(make_tree())
    expected = [data for _, data, _ in casframe.tree.iter_tree(served.store.verified, root)]
    assert len(expected) > 5

    pages = list(served.cas.GetTree(re_pb2.GetTreeRequest(root_digest=dproto(root), page_size=3)))
    assert all(0 < len(page.directories) <= 3 for page in pages)
    assert [bool(page.next_page_token) for page in pages] == [True] * (len(pages) - 1) + [False]
    got = [d.SerializeToString(deterministic=True) for page in pages for d in page.directories]
    assert sorted(got) == sorted(expected)
    assert got[0] == served.store.read_bytes(root)

    # A client may continue from any page's token, on any server.
    resumed = list(served.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=dproto(root), page_size=3, page_token=pages[0].next_page_token)))
    assert [d for page in resumed for d in page.directories] == [
        d for page in pages[1:] for d in page.directories]

    whole = list(served.cas.GetTree(re_pb2.GetTreeRequest(root_digest=dproto(root))))
    assert len(whole) == 1 and len(whole[0].directories) == len(expected)

    rpc_error(grpc.StatusCode.NOT_FOUND, served.cas.GetTree,
              re_pb2.GetTreeRequest(root_digest=dproto(Digest.of_bytes(b"no such root"))))
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.GetTree,
              re_pb2.GetTreeRequest(root_digest=dproto(root), page_token="garbage"))


def test_get_tree_leaves_out_missing_subtrees(served: Served,
                                              make_tree: Callable[..., Path]) -> None:
    root = served.store.import_directory(make_tree())
    src = served.store.subdir(root, "src")
    served.store.blobs.delete_blobs([src])
    pages = list(served.cas.GetTree(re_pb2.GetTreeRequest(root_digest=dproto(root))))
    got = {Digest.of_bytes(d.SerializeToString(deterministic=True))
           for page in pages for d in page.directories}
    assert root in got and src not in got
    assert served.store.subdir(root, "docs") in got


def test_get_tree_page_token_with_non_ascii_digits_is_invalid(
    served: Served, make_tree: Callable[..., Path]
) -> None:
    root = served.store.import_directory(make_tree())
    for index in ("\u00b2", "\u0663"):  # superscript two, Arabic-Indic three: str.isdigit()
        error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.GetTree,
                          re_pb2.GetTreeRequest(root_digest=dproto(root),
                                                page_token=f"{index}:{root.hash[:16]}"))
        assert "was not issued for a tree" in error.details()


# -- ByteStream -------------------------------------------------------------------------------


def test_bytestream_read_with_offset_and_limit(served: Served) -> None:
    data = random_bytes(3 * MiB + 123, seed=3)
    digest = served.store.put_bytes(data)
    resource = blob_resource(digest)

    chunks = [r.data for r in served.bytestream.Read(byte_pb2.ReadRequest(resource_name=resource))]
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= MiB

    def read(offset: int, limit: int) -> bytes:
        return b"".join(r.data for r in served.bytestream.Read(byte_pb2.ReadRequest(
            resource_name=resource, read_offset=offset, read_limit=limit)))

    assert read(MiB + 5, 0) == data[MiB + 5 :]
    assert read(10, 100) == data[10:110]
    assert read(len(data) - 7, 1000) == data[-7:]
    assert read(len(data), 0) == b""
    rpc_error(grpc.StatusCode.OUT_OF_RANGE, served.bytestream.Read,
              byte_pb2.ReadRequest(resource_name=resource, read_offset=len(data) + 1))
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Read,
              byte_pb2.ReadRequest(resource_name=resource, read_limit=-1))
    error = rpc_error(grpc.StatusCode.NOT_FOUND, served.bytestream.Read,
                      byte_pb2.ReadRequest(resource_name=blob_resource(Digest.of_bytes(b"nope"))))
    assert "blob not found" in error.details()


def test_bytestream_read_of_a_corrupt_blob_is_data_loss(served: Served) -> None:
    data = random_bytes(2 * MiB + 1, seed=4)
    digest = served.store.put_bytes(data)
    bad = bytearray(data)
    bad[-1] ^= 1
    served.store.blobs.blobs[digest] = (bytes(bad), 0.0)  # type: ignore[attr-defined]
    received = bytearray()
    with pytest.raises(grpc.RpcError) as info:
        for response in served.bytestream.Read(
                byte_pb2.ReadRequest(resource_name=blob_resource(digest))):
            received += response.data
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert len(received) < len(data)  # the last chunk is never sent


def test_bytestream_write_large_blob_in_chunks(served: Served) -> None:
    data = random_bytes(5 * MiB + 4321, seed=5)
    digest = Digest.of_bytes(data)
    response = served.bytestream.Write(write_requests(upload_resource(digest), data, chunk=MiB))
    assert response.committed_size == len(data)
    assert served.store.read_bytes(digest) == data
    status = served.bytestream.QueryWriteStatus(
        byte_pb2.QueryWriteStatusRequest(resource_name=upload_resource(digest)))
    assert (status.committed_size, status.complete) == (len(data), True)
    assert served.server.partial_uploads == 0

    # Already stored: answered at once with the full size, whatever is sent.
    again = served.bytestream.Write(write_requests(upload_resource(digest, "other"), data[:10],
                                                   finish=False))
    assert again.committed_size == len(data)


def test_bytestream_write_with_metadata_suffix_and_instance(serve: Callable[..., Served]) -> None:
    served = serve(instance_names=("main",))
    data = b"small blob in one message"
    digest = Digest.of_bytes(data)
    resource = upload_resource(digest, instance="main") + "/some/metadata"
    assert served.bytestream.Write(write_requests(resource, data)).committed_size == len(data)
    assert served.store.read_bytes(digest) == data


def test_truncated_upload_is_kept_and_resumes(served: Served) -> None:
    data = random_bytes(3 * MiB + 17, seed=6)
    digest = Digest.of_bytes(data)
    resource = upload_resource(digest)
    half = 2 * MiB

    # The client closes its stream without finish_write: nothing is stored, the part is kept.
    response = served.bytestream.Write(write_requests(resource, data[:half], finish=False))
    assert response.committed_size == half
    assert served.store.find_missing([digest]) == {digest}
    status = served.bytestream.QueryWriteStatus(byte_pb2.QueryWriteStatusRequest(
        resource_name=resource))
    assert (status.committed_size, status.complete) == (half, False)

    # Continuing anywhere else than the committed size is refused, and keeps the part.
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Write,
              write_requests(resource, data, start=half + 1))
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Write,
                      write_requests(resource, data, start=0))
    assert "does not match" in error.details() and str(half) in error.details()

    response = served.bytestream.Write(write_requests(resource, data, start=half))
    assert response.committed_size == len(data)
    assert served.store.read_bytes(digest) == data
    assert served.server.partial_uploads == 0


def test_cancelled_upload_resumes(served: Served) -> None:
    data = random_bytes(4 * MiB, seed=7)
    digest = Digest.of_bytes(data)
    resource = upload_resource(digest)
    sent = threading.Event()
    hold = threading.Event()

    def requests() -> Iterator[byte_pb2.WriteRequest]:
        for index, request in enumerate(write_requests(resource, data)):
            if index == 2:
                sent.set()
                hold.wait(10)  # the connection "drops" here
                return
            yield request

    future = served.bytestream.Write.future(requests())
    assert sent.wait(10)
    deadline = time.monotonic() + 10
    while True:  # the server keeps what it received
        try:
            status = served.bytestream.QueryWriteStatus(
                byte_pb2.QueryWriteStatusRequest(resource_name=resource))
            if status.committed_size == 2 * MiB:
                break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        assert time.monotonic() < deadline
        time.sleep(0.02)
    future.cancel()
    hold.set()
    assert served.store.find_missing([digest]) == {digest}

    deadline = time.monotonic() + 10
    while True:  # the cancelled call lets go of the upload
        try:
            response = served.bytestream.Write(write_requests(resource, data, start=2 * MiB))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED and time.monotonic() < deadline
            time.sleep(0.02)
    assert response.committed_size == len(data)
    assert served.store.read_bytes(digest) == data


def test_upload_with_wrong_content_stores_nothing(served: Served) -> None:
    data = random_bytes(2 * MiB, seed=8)
    digest = Digest.of_bytes(data)
    resource = upload_resource(digest)
    wrong = data[:-1] + bytes([data[-1] ^ 1])
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Write,
                      write_requests(resource, wrong))
    assert "does not match its digest" in error.details()
    too_long = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Write,
                         write_requests(upload_resource(digest, "u2"), data + b"!"))
    assert "does not match its digest" in too_long.details()
    too_short = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Write,
                          write_requests(upload_resource(digest, "u3"), data[:-1]))
    assert "does not match its digest" in too_short.details()
    single = Digest.of_bytes(b"one message")
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Write,
              write_requests(upload_resource(single), b"another message"))

    assert served.store.find_missing([digest, single]) == {digest, single}
    assert len(served.store.blobs.blobs) == 0  # type: ignore[attr-defined]
    assert served.server.partial_uploads == 0
    rpc_error(grpc.StatusCode.NOT_FOUND, served.bytestream.QueryWriteStatus,
              byte_pb2.QueryWriteStatusRequest(resource_name=resource))


@pytest.mark.parametrize("name, code", [
    ("", grpc.StatusCode.INVALID_ARGUMENT),
    ("blobs/{h}", grpc.StatusCode.INVALID_ARGUMENT),
    ("blobs/{h}/-1", grpc.StatusCode.INVALID_ARGUMENT),
    ("blobs/{h}/1e3", grpc.StatusCode.INVALID_ARGUMENT),
    ("blobs/{h}/5/extra", grpc.StatusCode.INVALID_ARGUMENT),
    ("blobs/{H}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("blobs/../../etc/passwd/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("/blobs/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("../blobs/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("objects/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("uploads/u/blobs/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("compressed-blobs/deflate/{h}/5", grpc.StatusCode.UNIMPLEMENTED),
    ("compressed-blobs/zstd/{h}", grpc.StatusCode.INVALID_ARGUMENT),
    ("compressed-blobs/lz4/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_malformed_read_resource_names(served: Served, name: str, code: grpc.StatusCode) -> None:
    digest = served.store.put_bytes(b"12345")
    name = name.format(h=digest.hash, H=digest.hash.upper())
    error = rpc_error(code, served.bytestream.Read, byte_pb2.ReadRequest(resource_name=name))
    assert error.details()


def test_identity_compressed_blobs_are_plain_blobs(served: Served) -> None:
    digest = served.store.put_bytes(b"12345")
    name = f"compressed-blobs/identity/{digest.hash}/{digest.size}"
    assert b"".join(r.data for r in served.bytestream.Read(
        byte_pb2.ReadRequest(resource_name=name))) == b"12345"


@pytest.mark.parametrize("name, code", [
    ("blobs/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("uploads/blobs/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("uploads//blobs/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("uploads/u/blobs/{h}", grpc.StatusCode.INVALID_ARGUMENT),
    ("uploads/u/files/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("uploads/u/blobs/xyz/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("uploads/u/compressed-blobs/brotli/{h}/5", grpc.StatusCode.UNIMPLEMENTED),
    ("uploads/u/compressed-blobs/lz4/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
    ("other/uploads/u/blobs/{h}/5", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_malformed_write_resource_names(served: Served, name: str, code: grpc.StatusCode) -> None:
    digest = Digest.of_bytes(b"12345")
    name = name.format(h=digest.hash)
    error = rpc_error(code, served.bytestream.Write, write_requests(name, b"12345"))
    assert error.details()
    rpc_error(code, served.bytestream.QueryWriteStatus,
              byte_pb2.QueryWriteStatusRequest(resource_name=name))
    assert served.store.find_missing([digest]) == {digest}


def test_interrupted_uploads_expire(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    import casframe.server.bytestream as bytestream_module

    # The spool's own clock, moved by the test: a slow machine must not expire "b" early.
    clock = [1000.0]
    monkeypatch.setattr(bytestream_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    served = serve(upload_expiry=60, max_partial_uploads=2)
    data = random_bytes(MiB, seed=9)
    digest = Digest.of_bytes(data)
    for upload in ("a", "b", "c"):  # the third evicts the oldest
        served.bytestream.Write(write_requests(upload_resource(digest, upload), data[:100],
                                               finish=False))
        clock[0] += 1
    assert served.server.partial_uploads == 2
    rpc_error(grpc.StatusCode.NOT_FOUND, served.bytestream.QueryWriteStatus,
              byte_pb2.QueryWriteStatusRequest(resource_name=upload_resource(digest, "a")))
    clock[0] += 58.5  # "b" is now past its expiry, "c" not yet
    rpc_error(grpc.StatusCode.NOT_FOUND, served.bytestream.QueryWriteStatus,
              byte_pb2.QueryWriteStatusRequest(resource_name=upload_resource(digest, "b")))
    assert served.server.partial_uploads == 1
    status = served.bytestream.QueryWriteStatus(
        byte_pb2.QueryWriteStatusRequest(resource_name=upload_resource(digest, "c")))
    assert status.committed_size == 100
    clock[0] += 1
    rpc_error(grpc.StatusCode.NOT_FOUND, served.bytestream.QueryWriteStatus,
              byte_pb2.QueryWriteStatusRequest(resource_name=upload_resource(digest, "c")))
    assert served.server.partial_uploads == 0


# -- ActionCache ------------------------------------------------------------------------------


def _action_result(store: Store) -> tuple[re_pb2.ActionResult, dict[str, Digest]]:
    out = store.put_bytes(b"output file")
    nested = store.put_bytes(b"file inside an output directory")
    stdout = store.put_bytes(b"stdout text")
    inner = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=dproto(nested))])
    tree = re_pb2.Tree(root=re_pb2.Directory(directories=[re_pb2.DirectoryNode(
        name="sub", digest=dproto(Digest.of_bytes(inner.SerializeToString(deterministic=True))))]),
        children=[inner])
    tree_digest = store.put_bytes(tree.SerializeToString(deterministic=True))
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out.txt", digest=dproto(out))],
        output_directories=[re_pb2.OutputDirectory(path="dir", tree_digest=dproto(tree_digest))],
        exit_code=0,
        stdout_digest=dproto(stdout),
    )
    return result, {"out": out, "nested": nested, "stdout": stdout, "tree": tree_digest}


@pytest.mark.parametrize("lost", ["out", "nested", "stdout", "tree"])
def test_action_cache_round_trip(serve: Callable[..., Served], lost: str) -> None:
    served = serve(instance_names=("", "other"))
    result, blobs = _action_result(served.store)
    action = Digest.of_bytes(b"an Action message")
    request = re_pb2.GetActionResultRequest(action_digest=dproto(action))
    error = rpc_error(grpc.StatusCode.NOT_FOUND, served.ac.GetActionResult, request)
    assert str(action) in error.details()

    served.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=dproto(action), action_result=result))
    assert served.ac.GetActionResult(request) == result
    assert served.store.has_ref(f"ac/_/{action.hash}/{action.size}")
    # Each instance has its own action cache.
    rpc_error(grpc.StatusCode.NOT_FOUND, served.ac.GetActionResult,
              re_pb2.GetActionResultRequest(instance_name="other", action_digest=dproto(action)))

    served.store.blobs.delete_blobs([blobs[lost]])
    error = rpc_error(grpc.StatusCode.NOT_FOUND, served.ac.GetActionResult, request)
    assert str(blobs[lost]) in error.details()
    failure = error_details_pb2.PreconditionFailure()
    assert status_details(error).details[0].Unpack(failure)
    assert failure.violations[0].type == "MISSING"


@pytest.mark.parametrize("path", ["../escape", "/etc/cron.d/x", "a/../../b", "nul\x00"])
def test_action_results_must_stay_in_the_working_directory(served: Served, path: str) -> None:
    """Every client that gets the result writes its outputs: one path may not poison them."""
    fine, _ = _action_result(served.store)
    fine.output_symlinks.add(path="link", target="/anywhere/at/all")  # a target may be so
    served.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=dproto(Digest.of_bytes(b"fine")), action_result=fine))
    for group in ("output_files", "output_directories", "output_symlinks"):
        bad, _ = _action_result(served.store)
        if group == "output_symlinks":
            bad.output_symlinks.add(path=path, target="t")
        else:
            getattr(bad, group)[0].path = path
        action = Digest.of_bytes(group.encode())
        error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.ac.UpdateActionResult,
                          re_pb2.UpdateActionResultRequest(action_digest=dproto(action),
                                                           action_result=bad))
        assert repr(path) in error.details()
        assert not served.store.has_ref(f"ac/_/{action.hash}/{action.size}")


# -- Remote Asset -----------------------------------------------------------------------------


def test_remote_asset_push_and_fetch_a_directory_ref(served: Served,
                                                     make_tree: Callable[..., Path]) -> None:
    root = served.store.import_directory(make_tree())
    uri = "casframe:ref/project/main"
    served.push.PushDirectory(ra_pb2.PushDirectoryRequest(uris=[uri],
                                                          root_directory_digest=dproto(root)))
    assert served.store.get_ref("project/main") == root
    response = served.fetch.FetchDirectory(ra_pb2.FetchDirectoryRequest(
        uris=["casframe:ref/absent", uri]))
    assert response.status.code == code_pb2.OK
    assert response.uri == uri
    assert Digest.from_proto(response.root_directory_digest) == root

    # A miss is a NOT_FOUND error: clients such as BuildStream 1.6 read nothing else.
    error = rpc_error(grpc.StatusCode.NOT_FOUND, served.fetch.FetchDirectory,
                      ra_pb2.FetchDirectoryRequest(uris=["casframe:ref/x", "casframe:ref/y"]))
    assert error.details() == "no content pushed for 'casframe:ref/x', 'casframe:ref/y'"

    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.fetch.FetchDirectory,
              ra_pb2.FetchDirectoryRequest(uris=[]))
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.fetch.FetchDirectory,
              ra_pb2.FetchDirectoryRequest(uris=["casframe:ref/../x"]))
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.push.PushDirectory,
                      ra_pb2.PushDirectoryRequest(uris=["casframe:ref/ac/_/x"],
                                                  root_directory_digest=dproto(root)))
    assert "reserved" in error.details()
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.fetch.FetchDirectory,
                      ra_pb2.FetchDirectoryRequest(
                          uris=[uri], qualifiers=[ra_pb2.Qualifier(name="branch", value="x")]))
    assert "branch" in error.details()


def test_remote_asset_refuses_incomplete_trees(served: Served,
                                               make_tree: Callable[..., Path]) -> None:
    root = served.store.import_directory(make_tree())
    lost = served.store.subdir(root, "src/pkg")
    served.store.blobs.delete_blobs([lost])
    error = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, served.push.PushDirectory,
                      ra_pb2.PushDirectoryRequest(uris=["casframe:ref/broken"],
                                                  root_directory_digest=dproto(root)))
    assert "incomplete" in error.details() and str(lost) in error.details()
    assert not served.store.has_ref("broken")


def test_remote_asset_blobs_by_uri_and_qualifiers(served: Served) -> None:
    digest = served.store.put_bytes(b"tarball bytes")
    uri = "https://example.com/source.tar.gz"
    qualifiers = [ra_pb2.Qualifier(name="checksum.sri", value="sha256-abc")]
    served.push.PushBlob(ra_pb2.PushBlobRequest(uris=[uri], qualifiers=qualifiers,
                                                blob_digest=dproto(digest)))
    found = served.fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri], qualifiers=qualifiers))
    assert found.status.code == code_pb2.OK
    assert Digest.from_proto(found.blob_digest) == digest
    error = rpc_error(grpc.StatusCode.NOT_FOUND, served.fetch.FetchBlob,
                      ra_pb2.FetchBlobRequest(uris=[uri]))
    assert error.details() == f"no content pushed for {uri!r}"
    rpc_error(grpc.StatusCode.NOT_FOUND, served.fetch.FetchDirectory,
              ra_pb2.FetchDirectoryRequest(uris=[uri], qualifiers=qualifiers))
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.fetch.FetchBlob, ra_pb2.FetchBlobRequest(
        uris=[uri], qualifiers=qualifiers * 2))
    rpc_error(grpc.StatusCode.FAILED_PRECONDITION, served.push.PushBlob, ra_pb2.PushBlobRequest(
        uris=[uri], blob_digest=dproto(Digest.of_bytes(b"not uploaded"))))


def test_buildstream_1_6_artifact_uri_is_the_1_4_reference(served: Served,
                                                           make_tree: Callable[..., Path]) -> None:
    """BuildStream 1.6 keeps an artifact under a Remote Asset URN, 1.4 under the bare key in
    ReferenceStorage: both are the one ref ``KEY``, so either generation pulls what the other
    pushed."""
    root = served.store.import_directory(make_tree())
    key = "project/hello/0f1e2d3c4b5a"
    urn = f"urn:fdc:buildstream.build:2020:v1:{key}"
    served.push.PushDirectory(ra_pb2.PushDirectoryRequest(uris=[urn],
                                                          root_directory_digest=dproto(root)))
    assert [ref.name for ref in served.store.list_refs()] == [key]
    got = served.refs.GetReference(bs_pb2.GetReferenceRequest(key=key))
    assert Digest.from_proto(got.digest) == root

    other = served.store.import_directory(make_tree("other"))
    served.refs.UpdateReference(bs_pb2.UpdateReferenceRequest(keys=["project/hello/77"],
                                                               digest=dproto(other)))
    fetched = served.fetch.FetchDirectory(ra_pb2.FetchDirectoryRequest(
        uris=["urn:fdc:buildstream.build:2020:v1:project/hello/77"]))
    assert fetched.status.code == code_pb2.OK
    assert Digest.from_proto(fetched.root_directory_digest) == other

    # The key is a ref name like any other: the server's own namespaces stay closed to it.
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.push.PushDirectory,
                      ra_pb2.PushDirectoryRequest(
                          uris=["urn:fdc:buildstream.build:2020:v1:asset/blob/x"],
                          root_directory_digest=dproto(root)))
    assert "reserved" in error.details()
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.fetch.FetchDirectory,
              ra_pb2.FetchDirectoryRequest(uris=["urn:fdc:buildstream.build:2020:v1:a/../b"]))
    # With qualifiers, or as a blob, the URN is an ordinary Remote Asset URI.
    qualified = ra_pb2.Qualifier(name="vcs.commit", value="1")
    served.push.PushDirectory(ra_pb2.PushDirectoryRequest(
        uris=[urn], qualifiers=[qualified], root_directory_digest=dproto(other)))
    assert served.store.get_ref(key) == root
    assert sum(ref.name.startswith("asset/directory/") for ref in served.store.list_refs()) == 1


def test_remote_asset_keeps_what_a_push_references(served: Served,
                                                   make_tree: Callable[..., Path]) -> None:
    """What a Push names in references_* lives exactly as long as the asset: prune keeps it,
    and deleting the asset's one ref lets prune take all of it."""
    store = served.store
    tree = store.import_directory(make_tree())
    log = store.put_bytes(b"build log")
    message = store.put_bytes(b"artifact message naming the tree and the log")
    uri = "urn:fdc:buildstream.build:2020:artifact:proj/hello/abc"
    served.push.PushBlob(ra_pb2.PushBlobRequest(
        uris=[uri], blob_digest=dproto(message), references_blobs=[dproto(log)],
        references_directories=[dproto(tree)]))
    fetched = served.fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri]))
    assert Digest.from_proto(fetched.blob_digest) == message
    assert store.prune(grace_period=0).objects_freed == 0
    assert not store.find_missing([message, log, *store.tree_digests(tree)])
    # BuildStream 2's URIs keep a readable name.
    assert [r.name for r in store.list_refs()] == [
        "asset/held/blob/buildstream/artifact/proj/hello/abc"]

    # Pushed again without references: the plain form replaces the held one.
    served.push.PushBlob(ra_pb2.PushBlobRequest(uris=[uri], blob_digest=dproto(message)))
    assert [r.name for r in store.list_refs()] == ["asset/blob/buildstream/artifact/proj/hello/abc"]
    store.prune(grace_period=0)
    assert store.find_missing([log, tree]) == {log, tree}
    assert not store.find_missing([message])

    # Everything referenced must be stored first; nothing is set otherwise.
    lost = Digest.of_bytes(b"never uploaded")
    error = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, served.push.PushDirectory,
                      ra_pb2.PushDirectoryRequest(
                          uris=["urn:fdc:buildstream.build:2020:source:x"],
                          root_directory_digest=dproto(store.import_directory(make_tree("s"))),
                          references_blobs=[dproto(lost)]))
    assert str(lost) in error.details()
    assert len(store.list_refs()) == 1

    # With qualifiers, or a name no ref may have, the URI is keyed by its hash.
    for odd_uri, qualifiers in [(uri, [ra_pb2.Qualifier(name="vcs.commit", value="1")]),
                                ("urn:fdc:buildstream.build:2020:artifact:a//b", [])]:
        served.push.PushBlob(ra_pb2.PushBlobRequest(uris=[odd_uri], qualifiers=qualifiers,
                                                    blob_digest=dproto(message)))
    hashed = [r.name for r in store.list_refs() if "buildstream" not in r.name]
    assert len(hashed) == 2 and all(re.fullmatch("asset/blob/[0-9a-f]{64}", n) for n in hashed)

    # What an older casframe kept under the hash of the URI is still found.
    older = "urn:fdc:buildstream.build:2020:artifact:proj/hello/older"
    kept = store.put_bytes(b"pushed to an older casframe")
    store.set_ref(hashed_asset_ref_name("blob", "", older, []), kept, check_complete=False)
    fetched = served.fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[older]))
    assert Digest.from_proto(fetched.blob_digest) == kept


# -- ReferenceStorage -------------------------------------------------------------------------


def test_reference_storage(served: Served, make_tree: Callable[..., Path]) -> None:
    assert served.refs.Status(bs_pb2.StatusRequest()).allow_updates
    rpc_error(grpc.StatusCode.NOT_FOUND, served.refs.GetReference,
              bs_pb2.GetReferenceRequest(key="project/element/abc"))
    root = served.store.import_directory(make_tree())
    served.refs.UpdateReference(bs_pb2.UpdateReferenceRequest(
        keys=["project/element/abc", "project/element/latest"], digest=dproto(root)))
    for key in ("project/element/abc", "project/element/latest"):
        got = served.refs.GetReference(bs_pb2.GetReferenceRequest(key=key))
        assert Digest.from_proto(got.digest) == root
        assert served.store.get_ref(key) == root

    error = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, served.refs.UpdateReference,
                      bs_pb2.UpdateReferenceRequest(keys=["x"],
                                                    digest=dproto(Digest.of_bytes(b"no tree"))))
    assert "incomplete" in error.details()
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.refs.UpdateReference,
              bs_pb2.UpdateReferenceRequest(keys=["../escape"], digest=dproto(root)))
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.refs.GetReference,
              bs_pb2.GetReferenceRequest(key="/abs"))


# -- health, read-only, interceptors, errors --------------------------------------------------


def test_health_reports_serving(served: Served) -> None:
    for service in ("", "build.bazel.remote.execution.v2.ContentAddressableStorage",
                    "google.bytestream.ByteStream"):
        response = served.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    rpc_error(grpc.StatusCode.NOT_FOUND, served.health.Check,
              health_pb2.HealthCheckRequest(service="no.such.Service"))


def test_read_only_server_refuses_every_write(serve: Callable[..., Served],
                                              make_tree: Callable[..., Path],
                                              memory_store: Store) -> None:
    root = memory_store.import_directory(make_tree())
    data = random_bytes(2 * MiB, seed=10)
    served = serve(read_only=True)
    digest = Digest.of_bytes(b"new")
    denied = grpc.StatusCode.PERMISSION_DENIED
    calls: list[tuple[Callable[..., object], object]] = [
        (served.cas.BatchUpdateBlobs, re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=dproto(digest), data=b"new")])),
        (served.bytestream.Write, write_requests(upload_resource(Digest.of_bytes(data)), data)),
        (served.ac.UpdateActionResult, re_pb2.UpdateActionResultRequest(
            action_digest=dproto(digest), action_result=re_pb2.ActionResult())),
        (served.push.PushBlob, ra_pb2.PushBlobRequest(uris=["urn:x"], blob_digest=dproto(root))),
        (served.push.PushDirectory, ra_pb2.PushDirectoryRequest(
            uris=["casframe:ref/x"], root_directory_digest=dproto(root))),
        (served.refs.UpdateReference, bs_pb2.UpdateReferenceRequest(keys=["x"],
                                                                     digest=dproto(root))),
    ]
    for call, request in calls:
        error = rpc_error(denied, call, request)
        assert "read-only" in error.details()
    assert memory_store.find_missing([digest, Digest.of_bytes(data)]) == {
        digest, Digest.of_bytes(data)}
    assert memory_store.list_refs() == []

    caps = served.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert not caps.cache_capabilities.action_cache_update_capabilities.update_enabled
    assert not served.refs.Status(bs_pb2.StatusRequest()).allow_updates
    # Reads still work.
    pages = list(served.cas.GetTree(re_pb2.GetTreeRequest(root_digest=dproto(root))))
    assert pages[0].directories


class _RecordingInterceptor(grpc.ServerInterceptor):
    def __init__(self, name: str, calls: list[tuple[str, str]]) -> None:
        self.name = name
        self.calls = calls

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        self.calls.append((self.name, handler_call_details.method))
        return continuation(handler_call_details)


def test_plugin_interceptors_see_requests(serve: Callable[..., Served]) -> None:
    calls: list[tuple[str, str]] = []
    configs: list[object] = []

    class ThrowawayPlugin:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        def casframe_server_interceptors(self, config: object) -> list[grpc.ServerInterceptor]:
            configs.append(config)
            return [_RecordingInterceptor(self.name, calls)]

    with casframe.registered_plugin(ThrowawayPlugin("first"), "throwaway-first"), \
            casframe.registered_plugin(ThrowawayPlugin("second"), "throwaway-second"):
        served = serve(instance_names=("main",))
    served.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="main"))
    method = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
    assert calls == [("first", method), ("second", method)]  # in registration order
    assert isinstance(configs[0], ServerSettings)
    assert configs[0].instance_names == ("main",)


def test_plugin_returning_a_non_interceptor_is_named(memory_store: Store) -> None:
    class BadPlugin:
        @hookimpl
        def casframe_server_interceptors(self, config: object) -> list[object]:
            return ["not an interceptor"]

    with casframe.registered_plugin(BadPlugin(), "bad-interceptor"):
        server = Server(memory_store)
        with pytest.raises(casframe.ConfigError, match="bad-interceptor"):
            server.start()


def test_each_request_is_logged_at_debug_level(served: Served,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="casframe.server"):
        served.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest())
        rpc_error(grpc.StatusCode.NOT_FOUND, served.refs.GetReference,
                  bs_pb2.GetReferenceRequest(key="absent"))
    lines = [r.getMessage() for r in caplog.records if r.name == "casframe.server"]
    assert any("FindMissingBlobs" in line and ": OK in" in line for line in lines)
    assert any("GetReference" in line and ": NOT_FOUND in" in line for line in lines)


def test_unexpected_errors_are_internal_without_details(serve: Callable[..., Served],
                                                        memory_store: Store,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def broken(digests: object) -> set[Digest]:
        raise RuntimeError("secret detail /srv/private/path")

    memory_store.blobs.find_missing_blobs = broken  # type: ignore[method-assign]
    served = serve()
    with caplog.at_level(logging.ERROR, logger="casframe.server"):
        error = rpc_error(grpc.StatusCode.INTERNAL, served.cas.FindMissingBlobs,
                          re_pb2.FindMissingBlobsRequest(
                              blob_digests=[dproto(Digest.of_bytes(b"x"))]))
    assert "secret" not in error.details() and "Traceback" not in error.details()
    assert "incident #" in error.details()
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


def test_backend_unavailable_is_unavailable(serve: Callable[..., Served],
                                            memory_store: Store) -> None:
    def down(digests: object) -> set[Digest]:
        raise casframe.BackendUnavailableError("bucket unreachable")

    memory_store.blobs.find_missing_blobs = down  # type: ignore[method-assign]
    served = serve()
    error = rpc_error(grpc.StatusCode.UNAVAILABLE, served.cas.FindMissingBlobs,
                      re_pb2.FindMissingBlobsRequest(blob_digests=[dproto(Digest.of_bytes(b"x"))]))
    assert "bucket unreachable" in error.details()


def test_server_as_context_manager_over_a_local_store(tmp_path: Path) -> None:
    with open_store(f"file://{tmp_path / 'store'}") as store, Server(store) as server:
        assert server.port
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            data = b"through a file:// store"
            response = cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=dproto(Digest.of_bytes(data)),
                                                       data=data)]))
            assert response.responses[0].status.code == code_pb2.OK
        assert store.read_bytes(Digest.of_bytes(data)) == data


def test_listening_on_a_taken_port_fails_clearly(served: Served, memory_store: Store) -> None:
    with pytest.raises(OSError, match="cannot listen"):
        Server(memory_store, listen=f"127.0.0.1:{served.server.port}").start()


# -- the command ------------------------------------------------------------------------------


def test_serve_command_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    with serve_process(store_url, "--instance", "main", "--log-level", "debug") as (process, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            caps = re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(instance_name="main"), timeout=10)
            assert caps.cache_capabilities.max_batch_total_size_bytes > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        stderr = process.stderr.read() if process.stderr else ""
    assert "GetCapabilities" in stderr  # the debug request log
    assert "Traceback" not in stderr


def test_serve_command_reports_bad_options(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "casframe.server", f"file://{tmp_path / 'store'}",
         "--listen", "127.0.0.1:0", "--tls-cert", __file__],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "--tls-key" in result.stderr and "Traceback" not in result.stderr


# -- Bazel as a real client -------------------------------------------------------------------

_BAZEL_BUILD = """
[genrule(
    name = "gen%d" % i,
    outs = ["out%d.txt" % i],
    cmd = "echo output %d > $@ && head -c 300000 /dev/zero | tr '\\\\0' 'x' >> $@" % i,
) for i in range(5)]

genrule(
    name = "all",
    srcs = [":gen%d" % i for i in range(5)],
    outs = ["all.txt"],
    cmd = "cat $(SRCS) > $@",
)
"""


def test_bazel_takes_every_action_from_the_remote_cache(bazel: str, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "WORKSPACE").write_text('workspace(name = "casframe_bazel_test")\n')
    (workspace / "BUILD").write_text(_BAZEL_BUILD)
    store_url = f"file://{tmp_path / 'store'}"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115

    def build(port: int, output_base: str) -> tuple[str, Path]:
        result = subprocess.run(
            [bazel, *startup_options(tmp_path / output_base), "build", "//:all",
             f"--remote_cache=grpc://127.0.0.1:{port}", "--spawn_strategy=local",
             "--color=no", "--curses=no"],
            cwd=workspace, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        bin_dir = tmp_path / output_base / "execroot" / "casframe_bazel_test" / "bazel-out"
        return result.stderr, next(bin_dir.glob("*/bin"))

    def cache_hits(output: str) -> int:
        match = re.search(r"(\d+) remote cache hit", output)
        return int(match.group(1)) if match else 0

    with log, serve_process(store_url, "--log-level", "debug", stderr=log) as (process, port):
        first, bin_dir = build(port, "first")
        assert cache_hits(first) == 0
        assert (bin_dir / "all.txt").read_text().startswith("output 0\n")

        # A fresh output base: every one of the 6 actions comes from the cache.
        second, _ = build(port, "second")
        assert cache_hits(second) == 6, second[-2000:]

        # An output gone from the store: its action is a cache miss and runs again.
        lost = Digest.of_file(bin_dir / "out3.txt")
        with open_store(store_url) as store:
            store.blobs.delete_blobs([lost])
        third, _ = build(port, "third")
        assert cache_hits(third) == 5, third[-2000:]

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    server_log = (tmp_path / "server.log").read_text()
    assert "UpdateActionResult" in server_log and "ByteStream/Write" in server_log
    assert "Traceback" not in server_log
