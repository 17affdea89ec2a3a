"""Digest functions on the wire, as REAPI clients see them: a real server on 127.0.0.1 port 0
over a ``file://`` store, real channels and the generated stubs.

Every service is exercised with SHA-512 and BLAKE3, and the blobs are looked for where the
store keeps that function's blobs (``open_store(url, digest_function=...)``); BLAKE3's hashes
have SHA-256's length, so a BLAKE3 blob must never be found under SHA-256.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import zstandard
from server_processes import ClientStubs

from casframe import DIGEST_FUNCTIONS, Digest, Store, UnsupportedDigestFunctionError, open_store
from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2 as bs_pb2
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe.server import Server
from casframe.server.errors import status_for
from casframe.testing import random_bytes

MiB = 1 << 20
SHA256 = re_pb2.DigestFunction.SHA256
SHA512 = re_pb2.DigestFunction.SHA512
BLAKE3 = re_pb2.DigestFunction.BLAKE3
# The function names of REAPI that casframe does not hash with.
_FOREIGN = {"sha1": re_pb2.DigestFunction.SHA1, "md5": re_pb2.DigestFunction.MD5}


@dataclass
class Served(ClientStubs):
    """A server over a ``file://`` store opened by URL, and a client channel."""

    server: Server
    url: str
    store: Store
    channel: grpc.Channel

    def __post_init__(self) -> None:
        self.attach_stubs(self.channel)

    def store_of(self, function: str) -> Store:
        """The served location's store of ``function``, as the server keeps it."""
        return self.store.with_digest_function(function)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def factory(**options: object) -> Served:
        url = f"file://{tmp_path / f'store{len(started)}'}"
        store = open_store(url)
        server = Server(store, **options)  # type: ignore[arg-type]
        port = server.start()
        served = Served(server, url, store, grpc.insecure_channel(f"127.0.0.1:{port}"))
        started.append(served)
        return served

    try:
        yield factory
    finally:
        for served in started:
            served.channel.close()
            served.server.stop(grace=None)
            served.store.close()


@pytest.fixture
def served(serve: Callable[..., Served]) -> Served:
    return serve()


def rpc_error(code: grpc.StatusCode, call: Callable[..., object], *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args)
        if isinstance(result, Iterator):
            list(result)
    assert info.value.code() == code, (info.value.code(), info.value.details())
    return info.value


def of(function: str, data: bytes) -> Digest:
    return Digest.of_bytes(data, DIGEST_FUNCTIONS[function])


def value(function: str) -> int:
    return DIGEST_FUNCTIONS[function].reapi_value


def segment(function: str, *, named: bool) -> str:
    return f"{function}/" if named else ""


def read(served: Served, resource: str) -> bytes:
    return b"".join(r.data for r in served.bytestream.Read(
        byte_pb2.ReadRequest(resource_name=resource)))


def write(served: Served, resource: str, data: bytes, chunk: int = MiB) -> int:
    requests = [
        byte_pb2.WriteRequest(resource_name=resource if offset == 0 else "",
                              write_offset=offset, data=data[offset : offset + chunk],
                              finish_write=offset + chunk >= len(data))
        for offset in range(0, len(data), chunk)
    ]
    return int(served.bytestream.Write(iter(requests)).committed_size)


# -- Capabilities ---------------------------------------------------------------------------


def test_capabilities_list_every_function_sha256_first(served: Served) -> None:
    caps = served.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    offered = list(caps.cache_capabilities.digest_functions)
    expected = [f.reapi_value for f in DIGEST_FUNCTIONS.values()
                if f.name in served.store.digest_functions]
    assert offered == expected
    assert offered[0] == SHA256 and {SHA512, BLAKE3, re_pb2.DigestFunction.SHA384} <= set(offered)
    # What clients older than REAPI 2.3 read.
    assert caps.execution_capabilities.digest_function == SHA256
    assert not caps.execution_capabilities.exec_enabled


# -- every service, with SHA-512 and BLAKE3 ---------------------------------------------------


@pytest.mark.parametrize("function", ["sha512", "blake3"])
def test_cas_batch_calls_use_the_requested_function(served: Served, function: str) -> None:
    small = [b"one", b"two", random_bytes(10_000, seed=3)]
    digests = [of(function, data) for data in small]
    absent = of(function, b"absent")
    response = served.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        digest_function=value(function),
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data)
                  for d, data in zip(digests, small, strict=True)]))
    assert [r.status.code for r in response.responses] == [0, 0, 0]

    assert served.store_of(function).find_missing(digests) == set()
    if function == "blake3":  # same length as SHA-256's, kept apart from them
        assert served.store.find_missing(digests) == set(digests)

    missing = served.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        digest_function=value(function), blob_digests=[d.to_proto() for d in [*digests, absent]]))
    assert [Digest.from_proto(d) for d in missing.missing_blob_digests] == [absent]

    answer = served.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digest_function=value(function), digests=[d.to_proto() for d in digests]))
    assert [r.data for r in answer.responses] == small

    # Content that does not hash to its digest under the function fails alone.
    wrong = served.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        digest_function=value(function),
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(
            digest=Digest(of(function, b"x").hash, 1).to_proto(), data=b"y")]))
    assert wrong.responses[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.mark.parametrize("function", ["sha512", "blake3"])
def test_get_tree_walks_the_functions_tree(served: Served, function: str,
                                           make_tree: Callable[..., Path]) -> None:
    store = served.store_of(function)
    root = store.import_directory(make_tree())
    assert len(root.hash) == DIGEST_FUNCTIONS[function].hex_length
    pages = list(served.cas.GetTree(re_pb2.GetTreeRequest(
        digest_function=value(function), root_digest=root.to_proto())))
    listed = [of(function, d.SerializeToString(deterministic=True))
              for page in pages for d in page.directories]
    assert listed[0] == root and len(listed) > 1
    assert store.find_missing(listed) == set()


@pytest.mark.parametrize("function, named", [
    ("sha512", False), ("sha512", True), ("blake3", True),
])
def test_bytestream_names_the_function(served: Served, function: str, named: bool) -> None:
    data = random_bytes(3 * MiB + 5, seed=7)
    digest = of(function, data)
    part = segment(function, named=named)
    resource = f"uploads/{uuid.uuid4()}/blobs/{part}{digest.hash}/{digest.size}"
    assert write(served, resource, data) == digest.size
    assert served.store_of(function).contains(digest)
    assert read(served, f"blobs/{part}{digest.hash}/{digest.size}") == data
    status = served.bytestream.QueryWriteStatus(
        byte_pb2.QueryWriteStatusRequest(resource_name=resource))
    assert status.complete and status.committed_size == digest.size


@pytest.mark.parametrize("function", ["sha512", "blake3"])
def test_compressed_blobs_name_the_function(served: Served, function: str) -> None:
    data = b"compressible build output\n" * 40_000
    digest = of(function, data)
    packed = zstandard.ZstdCompressor().compress(data)
    part = segment(function, named=True)
    resource = f"uploads/{uuid.uuid4()}/compressed-blobs/zstd/{part}{digest.hash}/{digest.size}"
    write(served, resource, packed, chunk=64 << 10)
    assert served.store_of(function).read_bytes(digest) == data
    received = read(served, f"compressed-blobs/zstd/{part}{digest.hash}/{digest.size}")
    assert zstandard.ZstdDecompressor().decompress(received) == data


def test_a_partial_upload_resumes_under_its_function(served: Served) -> None:
    data = random_bytes(2 * MiB, seed=11)
    digest = of("blake3", data)
    resource = f"uploads/u1/blobs/blake3/{digest.hash}/{digest.size}"
    served.bytestream.Write(iter([byte_pb2.WriteRequest(
        resource_name=resource, write_offset=0, data=data[:MiB])]))
    status = served.bytestream.QueryWriteStatus(
        byte_pb2.QueryWriteStatusRequest(resource_name=resource))
    assert (status.committed_size, status.complete) == (MiB, False)
    served.bytestream.Write(iter([byte_pb2.WriteRequest(
        resource_name=resource, write_offset=MiB, data=data[MiB:], finish_write=True)]))
    assert served.store_of("blake3").contains(digest)
    assert not served.store.contains(digest)


@pytest.mark.parametrize("function", ["sha512", "blake3"])
def test_action_cache_keeps_each_functions_results(served: Served, function: str) -> None:
    store = served.store_of(function)
    out = store.put_bytes(b"output of the action")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out", digest=out.to_proto())])
    action = of(function, b"an Action message")
    served.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        digest_function=value(function), action_digest=action.to_proto(), action_result=result))
    got = served.ac.GetActionResult(re_pb2.GetActionResultRequest(
        digest_function=value(function), action_digest=action.to_proto()))
    assert got == result
    assert store.has_ref(f"ac/_/{action.hash}/{action.size}")
    if function == "blake3":  # unset, a 64-digit action is SHA-256's: not this one
        rpc_error(grpc.StatusCode.NOT_FOUND, served.ac.GetActionResult,
                  re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
    # An output digest of another function is refused before anything is stored.
    bad = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(
        path="out", digest=of("sha384", b"x").to_proto())])
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.ac.UpdateActionResult,
                      re_pb2.UpdateActionResultRequest(
                          digest_function=value(function), action_digest=action.to_proto(),
                          action_result=bad))
    assert "96 hex digits" in error.details()


@pytest.mark.parametrize("function", ["sha512", "blake3"])
def test_remote_asset_keeps_each_functions_assets(served: Served, function: str,
                                                  make_tree: Callable[..., Path]) -> None:
    store = served.store_of(function)
    root = store.import_directory(make_tree())
    blob = store.put_bytes(b"a fetched source archive")
    served.push.PushDirectory(ra_pb2.PushDirectoryRequest(
        digest_function=value(function), uris=["casframe:ref/app/1", "https://example.com/t"],
        root_directory_digest=root.to_proto()))
    served.push.PushBlob(ra_pb2.PushBlobRequest(
        digest_function=value(function), uris=["https://example.com/src.tar"],
        blob_digest=blob.to_proto(), references_directories=[root.to_proto()]))
    assert store.get_ref("app/1") == root

    for uri in ("casframe:ref/app/1", "https://example.com/t"):
        fetched = served.fetch.FetchDirectory(ra_pb2.FetchDirectoryRequest(
            digest_function=value(function), uris=[uri]))
        assert Digest.from_proto(fetched.root_directory_digest) == root
        assert fetched.digest_function == value(function)
    fetched_blob = served.fetch.FetchBlob(ra_pb2.FetchBlobRequest(
        digest_function=value(function), uris=["https://example.com/src.tar"]))
    assert Digest.from_proto(fetched_blob.blob_digest) == blob
    assert fetched_blob.digest_function == value(function)
    # A Fetch that names no function asks for SHA-256's assets.
    rpc_error(grpc.StatusCode.NOT_FOUND, served.fetch.FetchDirectory,
              ra_pb2.FetchDirectoryRequest(uris=["casframe:ref/app/1"]))
    assert not served.store.has_ref("app/1")


# -- unset fields: inferred from the hash's length --------------------------------------------


def test_unset_function_is_inferred_from_the_hash_length(served: Served) -> None:
    for function in ("sha384", "sha512"):
        data = f"inferred {function}".encode()
        digest = of(function, data)
        served.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=digest.to_proto(), data=data)]))
        assert served.store_of(function).contains(digest)
        assert read(served, f"blobs/{digest.hash}/{digest.size}") == data
    # 64 digits are SHA-256, never BLAKE3.
    data = b"sixty-four digits"
    blake3 = of("blake3", data)
    served.store_of("blake3").put_bytes(data)
    missing = served.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[blake3.to_proto()]))
    assert [Digest.from_proto(d) for d in missing.missing_blob_digests] == [blake3]
    rpc_error(grpc.StatusCode.NOT_FOUND, served.bytestream.Read,
              byte_pb2.ReadRequest(resource_name=f"blobs/{blake3.hash}/{blake3.size}"))
    sha256 = served.store.put_bytes(data)
    assert read(served, f"blobs/{sha256.hash}/{sha256.size}") == data


def test_digests_of_several_lengths_in_one_request_are_refused(served: Served) -> None:
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.FindMissingBlobs,
                      re_pb2.FindMissingBlobsRequest(blob_digests=[
                          of("sha256", b"a").to_proto(), of("sha512", b"b").to_proto()]))
    assert "64 and 128 hex digits" in error.details()


# -- what is refused ------------------------------------------------------------------------


@pytest.mark.parametrize("request_value, shown", [
    (_FOREIGN["md5"], "MD5"), (_FOREIGN["sha1"], "SHA1"), (99, "number 99"),
])
def test_functions_casframe_does_not_hash_with_are_refused(served: Served, request_value: int,
                                                           shown: str) -> None:
    digest = of("sha256", b"x")
    calls = [
        (served.cas.FindMissingBlobs, re_pb2.FindMissingBlobsRequest(
            digest_function=request_value, blob_digests=[digest.to_proto()])),
        (served.cas.BatchReadBlobs, re_pb2.BatchReadBlobsRequest(
            digest_function=request_value, digests=[digest.to_proto()])),
        (served.ac.GetActionResult, re_pb2.GetActionResultRequest(
            digest_function=request_value, action_digest=digest.to_proto())),
        (served.fetch.FetchBlob, ra_pb2.FetchBlobRequest(
            digest_function=request_value, uris=["https://example.com/x"])),
    ]
    for call, request in calls:
        error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, call, request)
        assert error.details() == (
            f"digest function {shown} is not supported by this server; it offers "
            "SHA256, SHA384, SHA512, BLAKE3"
        )


def test_digests_of_the_wrong_length_for_the_function_are_refused(served: Served) -> None:
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.cas.FindMissingBlobs,
                      re_pb2.FindMissingBlobsRequest(
                          digest_function=SHA512, blob_digests=[of("sha256", b"a").to_proto()]))
    assert error.details() == ("digests of 64 hex digits do not fit digest_function SHA512, "
                               "whose hashes have 128")
    digest = of("sha512", b"a")
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Read,
                      byte_pb2.ReadRequest(resource_name=f"blobs/blake3/{digest.hash}/1"))
    assert "do not fit the resource name's blake3" in error.details()


@pytest.mark.parametrize("name, message", [
    ("blobs/md5/{h}/1", "digest function 'md5' of the resource name is not supported"),
    ("blobs/whirlpool/{h}/1", "unknown digest function 'whirlpool'"),
    ("blobs/SHA256/{h}/1", "unknown digest function 'SHA256'"),
    ("compressed-blobs/zstd/vso/{h}/1", "digest function 'vso' of the resource name"),
    ("blobs/blake3/{h}", "malformed resource name"),
    ("blobs/blake3/{h}/1/2", "malformed resource name"),  # uploads may add metadata: read only
])
def test_resource_names_with_bad_functions_are_refused(served: Served, name: str,
                                                       message: str) -> None:
    digest = of("sha256", b"x")
    resource = name.format(h=digest.hash)
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Read,
                      byte_pb2.ReadRequest(resource_name=resource))
    assert message in error.details()
    if resource.endswith("/1/2"):
        return
    upload = f"uploads/u/{resource}"
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.Write,
              iter([byte_pb2.WriteRequest(resource_name=upload, data=b"x", finish_write=True)]))
    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.bytestream.QueryWriteStatus,
              byte_pb2.QueryWriteStatusRequest(resource_name=upload))


def test_reference_storage_serves_sha256_only(served: Served,
                                              make_tree: Callable[..., Path]) -> None:
    root = served.store_of("sha512").import_directory(make_tree())
    error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, served.refs.UpdateReference,
                      bs_pb2.UpdateReferenceRequest(keys=["k"], digest=root.to_proto()))
    assert "do not fit digest_function SHA256" in error.details()


def test_read_only_server_serves_every_function(serve: Callable[..., Served]) -> None:
    served = serve(read_only=True)
    digest = served.store_of("blake3").put_bytes(b"kept")
    assert read(served, f"blobs/blake3/{digest.hash}/{digest.size}") == b"kept"
    fresh = of("blake3", b"new")
    error = rpc_error(grpc.StatusCode.PERMISSION_DENIED, served.cas.BatchUpdateBlobs,
                      re_pb2.BatchUpdateBlobsRequest(digest_function=BLAKE3, requests=[
                          re_pb2.BatchUpdateBlobsRequest.Request(digest=fresh.to_proto(),
                                                                 data=b"new")]))
    assert "read-only" in error.details()
    assert not served.store_of("blake3").contains(fresh)


def test_an_unsupported_digest_function_from_below_is_the_clients_argument() -> None:
    # A store raising it (a function it cannot hold) answers the request's choice, not a
    # missing service: INVALID_ARGUMENT, not UNIMPLEMENTED.
    error = UnsupportedDigestFunctionError("file:///srv/cas cannot hold sha1 digests")
    assert status_for(error) == (grpc.StatusCode.INVALID_ARGUMENT,
                                 "<url> cannot hold sha1 digests")
