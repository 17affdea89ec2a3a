"""The ``grpc://`` backend against a server that lies, pages forever or never answers.

:class:`HostileServer` is a real gRPC server on 127.0.0.1 and a free port, built from
casframe's generated protos, that serves a memory store honestly except for the tricks a test
switches on. Every client path of the backend (capabilities, find-missing, batch read and
update, ByteStream read and write, GetTree and pull, refs over ReferenceStorage and Remote
Asset) must end in a typed casframe error, in bounded time and memory, and never return data
the server made up.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from casframe import (
    BackendUnavailableError,
    CorruptBlobError,
    Digest,
    RemoteProtocolError,
    Store,
    open_store,
)
from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casframe._protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.buildstream.v2 import buildstream_pb2 as bs_pb2
from casframe._protos.buildstream.v2 import buildstream_pb2_grpc as bs_grpc
from casframe._protos.google.bytestream import bytestream_pb2 as byte_pb2
from casframe._protos.google.bytestream import bytestream_pb2_grpc as byte_grpc
from casframe.compression import compress
from casframe.testing import assert_tree_equal, random_bytes

MiB = 1 << 20
# What the zstd tricks send: far more than any blob (a few KiB of zstd), or not zstd at all.
_ZSTD_TRICKS = {"zstd-bomb": compress(bytes(64 * MiB)), "zstd-garbage": b"not zstd" * 1000}
HANG_GUARD = 120  # seconds: only ever reached if a call hangs


def _proto(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


def _digest(message: re_pb2.Digest) -> Digest:
    return Digest(message.hash, message.size_bytes)


class HostileServer:
    """An honest REAPI server over ``store``, except for the ``tricks`` a test switches on.

    ``stalled`` holds method names that never answer until the server stops. ``pages`` counts
    the GetTree pages sent; ``endless_stopped`` is set when an endless stream (GetTree or
    ByteStream Read) ends, which only the client cancelling it can do.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tricks: set[str] = set()
        self.stalled: set[str] = set()
        self.pages = 0
        self.endless_stopped = threading.Event()
        self._stopping = threading.Event()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=16),
                                   options=[("grpc.so_reuseport", 0)])
        re_grpc.add_CapabilitiesServicer_to_server(_Capabilities(self), self._server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(_Cas(self), self._server)
        byte_grpc.add_ByteStreamServicer_to_server(_ByteStream(self), self._server)
        bs_grpc.add_ReferenceStorageServicer_to_server(_References(self), self._server)
        ra_grpc.add_FetchServicer_to_server(_Fetch(self), self._server)
        ra_grpc.add_PushServicer_to_server(_Push(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def url(self, **options: object) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"grpc://127.0.0.1:{self.port}" + (f"?{query}" if query else "")

    def enter(self, method: str) -> None:
        """Called first by every method: a stalled one waits here until the server stops."""
        if method in self.stalled:
            self._stopping.wait(HANG_GUARD)

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop(grace=None).wait()


class _Part:
    def __init__(self, hostile: HostileServer) -> None:
        self.hostile = hostile
        self.store = hostile.store

    def trick(self, name: str) -> bool:
        return name in self.hostile.tricks


class _Capabilities(_Part, re_grpc.CapabilitiesServicer):
    def GetCapabilities(self, request: Any, context: Any) -> re_pb2.ServerCapabilities:  # noqa: N802
        self.hostile.enter("GetCapabilities")
        cache = re_pb2.CacheCapabilities(
            digest_functions=[re_pb2.DigestFunction.SHA256], max_batch_total_size_bytes=4 * MiB)
        if self.trick("negative-batch-size"):
            cache.max_batch_total_size_bytes = -1
        if self.trick("negative-blob-size"):
            cache.max_cas_blob_size_bytes = -(1 << 40)
        if self.hostile.tricks & _ZSTD_TRICKS.keys():
            cache.supported_compressors.append(re_pb2.Compressor.ZSTD)
        return re_pb2.ServerCapabilities(cache_capabilities=cache)


class _Cas(_Part, re_grpc.ContentAddressableStorageServicer):
    def FindMissingBlobs(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("FindMissingBlobs")
        asked = [_digest(d) for d in request.blob_digests]
        missing = self.store.find_missing(asked)
        reply = re_pb2.FindMissingBlobsResponse(
            missing_blob_digests=[_proto(d) for d in asked if d in missing])
        if self.trick("unasked-missing"):
            reply.missing_blob_digests.append(_proto(Digest.of_bytes(b"never asked")))
        if self.trick("too-many-missing"):
            reply.missing_blob_digests.extend([_proto(d) for d in asked] * 2)
        return reply

    def BatchReadBlobs(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("BatchReadBlobs")
        reply = re_pb2.BatchReadBlobsResponse()
        for message in request.digests:
            data = self.store.read_bytes(_digest(message))
            if self.trick("long-data"):
                data += b"and more"
            if self.trick("wrong-data"):
                data = bytes(len(data))
            entry = reply.responses.add(digest=message, data=data, status=status_pb2.Status())
            for trick in self.hostile.tricks & _ZSTD_TRICKS.keys():
                entry.data, entry.compressor = _ZSTD_TRICKS[trick], re_pb2.Compressor.ZSTD
        if self.trick("unasked-entry"):
            reply.responses.add(digest=_proto(Digest.of_bytes(b"x")), data=b"x")
        if self.trick("duplicate-entry"):
            reply.responses.append(reply.responses[0])
        return reply

    def BatchUpdateBlobs(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("BatchUpdateBlobs")
        reply = re_pb2.BatchUpdateBlobsResponse()
        for item in request.requests:
            self.store.put_bytes(item.data, _digest(item.digest))
            reply.responses.add(digest=item.digest, status=status_pb2.Status())
        if self.trick("unasked-entry"):
            reply.responses.add(digest=_proto(Digest.of_bytes(b"x")))
        if self.trick("duplicate-entry"):
            reply.responses.append(reply.responses[0])
        if self.trick("dropped-entry"):
            del reply.responses[:]
        return reply

    def GetTree(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        self.hostile.enter("GetTree")
        root = _digest(request.root_digest)
        directories = [re_pb2.Directory.FromString(self.store.read_bytes(root))]
        if self.trick("endless-stream"):  # new pages, tokens and Directories, in one stream
            try:
                for n in range(10**9):
                    self.hostile.pages += 1
                    junk = re_pb2.Directory(files=[re_pb2.FileNode(name=f"f{n}", digest=_proto(
                        Digest.of_bytes(str(n).encode())))])
                    yield re_pb2.GetTreeResponse(directories=[junk], next_page_token=f"p{n}")
            finally:
                self.hostile.endless_stopped.set()
        self.hostile.pages += 1
        if self.trick("repeated-token"):  # a call per page, always naming the same next one
            yield re_pb2.GetTreeResponse(directories=directories, next_page_token="again")
        elif self.trick("empty-pages"):  # a new token each call, never a Directory
            yield re_pb2.GetTreeResponse(next_page_token=uuid.uuid4().hex)
        else:
            yield re_pb2.GetTreeResponse(directories=self._whole_tree(root))

    def _whole_tree(self, root: Digest) -> list[re_pb2.Directory]:
        found, level = [], [root]
        while level:
            messages = [re_pb2.Directory.FromString(self.store.read_bytes(d)) for d in level]
            found += messages
            level = [_digest(n.digest) for m in messages for n in m.directories]
        return found


class _ByteStream(_Part, byte_grpc.ByteStreamServicer):
    def Read(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        self.hostile.enter("Read")
        _, hash_, size = request.resource_name.rsplit("/", 2)
        data = self.store.read_bytes(Digest(hash_, int(size)))[request.read_offset:]
        if self.trick("short-read"):
            data = data[:-1]
        for trick in self.hostile.tricks & _ZSTD_TRICKS.keys():
            data = _ZSTD_TRICKS[trick]
        for start in range(0, len(data), MiB):
            yield byte_pb2.ReadResponse(data=data[start : start + MiB])
        if self.trick("endless-read"):
            try:
                while True:
                    yield byte_pb2.ReadResponse(data=bytes(MiB))
            finally:
                self.hostile.endless_stopped.set()

    def Write(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("Write")
        chunks, resource = [], ""
        for request in request_iterator:
            resource = resource or request.resource_name
            chunks.append(request.data)
        _, hash_, size = resource.rsplit("/", 2)
        digest = self.store.put_bytes(b"".join(chunks), Digest(hash_, int(size)))
        committed = digest.size + 1 if self.trick("wrong-committed-size") else digest.size
        return byte_pb2.WriteResponse(committed_size=committed)


class _References(_Part, bs_grpc.ReferenceStorageServicer):
    def Status(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("Status")
        if self.trick("asset-only"):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no ReferenceStorage here")
        return bs_pb2.StatusResponse(allow_updates=True)

    def GetReference(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("GetReference")
        if self.trick("invalid-ref-digest"):
            return bs_pb2.GetReferenceResponse(digest=re_pb2.Digest(hash="zz", size_bytes=-1))
        digest = self.store.get_ref(request.key)
        return bs_pb2.GetReferenceResponse(digest=_proto(digest))

    def UpdateReference(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("UpdateReference")
        for key in request.keys:
            self.store.set_ref(key, _digest(request.digest))
        return bs_pb2.UpdateReferenceResponse()


class _Fetch(_Part, ra_grpc.FetchServicer):
    def FetchDirectory(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("FetchDirectory")
        reply = ra_pb2.FetchDirectoryResponse(uri=request.uris[0], status=status_pb2.Status())
        if self.trick("invalid-asset-digest"):
            reply.root_directory_digest.CopyFrom(re_pb2.Digest(hash="A" * 64, size_bytes=3))
        else:
            name = request.uris[0].removeprefix("casframe:ref/")
            reply.root_directory_digest.CopyFrom(_proto(self.store.get_ref(name)))
        return reply


class _Push(_Part, ra_grpc.PushServicer):
    def PushDirectory(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.hostile.enter("PushDirectory")
        return ra_pb2.PushDirectoryResponse()


@pytest.fixture
def hostile(memory_store: Store) -> Iterator[HostileServer]:
    server = HostileServer(memory_store)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tree(memory_store: Store, make_tree: Callable[..., Path]) -> tuple[Path, Digest]:
    source = make_tree()
    root = memory_store.import_directory(source)
    memory_store.set_ref("build/main", root)
    return source, root


def _remote(hostile: HostileServer, **options: object) -> Store:
    return open_store(hostile.url(**options))


# -- capabilities -----------------------------------------------------------------------------


@pytest.mark.parametrize("trick, field", [
    ("negative-batch-size", "max_batch_total_size_bytes = -1"),
    ("negative-blob-size", "max_cas_blob_size_bytes = -1099511627776"),
])
def test_capabilities_with_negative_sizes_are_refused_on_open(
    hostile: HostileServer, trick: str, field: str,
) -> None:
    hostile.tricks.add(trick)
    with pytest.raises(RemoteProtocolError, match="a size cannot be negative") as info:
        _remote(hostile)
    assert f"answered GetCapabilities with {field}" in str(info.value)


# -- blobs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trick, message", [
    ("unasked-missing", "which was not asked for"),
    ("too-many-missing", "FindMissingBlobs of 3 digests with 8 missing ones"),
])
def test_find_missing_answers_beyond_the_question_are_refused(
    hostile: HostileServer, memory_store: Store, trick: str, message: str,
) -> None:
    present = memory_store.put_bytes(b"present")
    asked = [present, Digest.of_bytes(b"absent one"), Digest.of_bytes(b"absent two")]
    hostile.tricks.add(trick)
    with _remote(hostile) as remote:
        with pytest.raises(RemoteProtocolError, match=message):
            remote.find_missing(asked)


@pytest.mark.parametrize("trick, error, message", [
    ("unasked-entry", RemoteProtocolError, "which was not asked for"),
    ("duplicate-entry", RemoteProtocolError, "more than once"),
    ("long-data", CorruptBlobError, "sent 4008 bytes for it"),
    ("wrong-data", CorruptBlobError, "content hashes to"),
])
def test_batch_read_answers_that_are_not_the_blob_are_refused(
    hostile: HostileServer, memory_store: Store, trick: str, error: type[Exception],
    message: str,
) -> None:
    data = random_bytes(4000, seed=3)
    digest = memory_store.put_bytes(data)
    hostile.tricks.add(trick)
    with _remote(hostile) as remote:
        with pytest.raises(error, match=message):
            remote.read_bytes(digest)
        with pytest.raises(error, match=message):
            dict(remote.read_many([digest, memory_store.put_bytes(b"another")]))


@pytest.mark.parametrize("trick, message", [
    ("unasked-entry", "which was not asked for"),
    ("duplicate-entry", "more than once"),
    ("dropped-entry", "did not confirm storing 1 blob"),
])
def test_batch_update_answers_that_do_not_match_the_request_are_refused(
    hostile: HostileServer, trick: str, message: str,
) -> None:
    hostile.tricks.add(trick)
    with _remote(hostile) as remote:
        with pytest.raises(RemoteProtocolError, match=message):
            remote.put_bytes(random_bytes(2000, seed=4))


@pytest.mark.parametrize("trick, message", [
    ("endless-read", "sent more than its 3145728 bytes through ByteStream.Read"),
    ("short-read", "ended ByteStream.Read 1 bytes short"),
])
def test_bytestream_reads_of_the_wrong_length_are_corrupt(
    hostile: HostileServer, memory_store: Store, trick: str, message: str,
) -> None:
    data = random_bytes(3 * MiB, seed=5)
    digest = memory_store.put_bytes(data)
    hostile.tricks.add(trick)
    endless = trick == "endless-read"
    with _remote(hostile) as remote:
        with pytest.raises(CorruptBlobError, match=message):
            remote.read_bytes(digest)
        # The client cancelled the call: the server's endless stream ended.
        assert not endless or hostile.endless_stopped.wait(HANG_GUARD)
        hostile.endless_stopped.clear()
        with remote.open_read(digest, verify=False) as stream:
            with pytest.raises(CorruptBlobError, match=message):
                while stream.read(MiB):
                    pass
        assert not endless or hostile.endless_stopped.wait(HANG_GUARD)


@pytest.mark.parametrize("trick, message", [
    # Its frame states its size: refused before decoding in batches, while decoding in streams.
    ("zstd-bomb",
     r"decodes to (67108864 bytes, not the \d+|more than the \d+ bytes) its digest gives"),
    ("zstd-garbage", "is not a valid zstd stream"),
])
def test_zstd_from_the_server_is_decoded_within_the_blob_size(
    hostile: HostileServer, memory_store: Store, trick: str, message: str,
) -> None:
    small = memory_store.put_bytes(random_bytes(4000, seed=6))
    large = memory_store.put_bytes(random_bytes(3 * MiB, seed=7))
    hostile.tricks.add(trick)
    with _remote(hostile, compression="zstd") as remote:
        for digest in (small, large):
            with pytest.raises(CorruptBlobError, match=message) as info:
                remote.read_bytes(digest)
            assert "the zstd " in str(info.value) and str(digest) in str(info.value)


def test_bytestream_write_with_a_wrong_committed_size_is_refused(
    hostile: HostileServer, memory_store: Store,
) -> None:
    hostile.tricks.add("wrong-committed-size")
    data = random_bytes(5 * MiB, seed=6)  # over the batch limit: through ByteStream
    with _remote(hostile) as remote:
        with pytest.raises(RemoteProtocolError, match=r"committed 5242881 bytes of"):
            remote.put_bytes(data)


# -- GetTree and pull -------------------------------------------------------------------------


def _stopped(hostile: HostileServer, trick: str, pages: int | None) -> None:
    """The server, which would have paged forever, was stopped by the client."""
    if pages is None:  # one endless stream: the client cancelled it
        assert hostile.endless_stopped.wait(HANG_GUARD)
    else:  # a call per page: the client stopped asking
        assert hostile.pages == pages


# A hang guard: before the client checked GetTree listings, these looped forever.
@pytest.mark.timeout(60)
@pytest.mark.parametrize("trick, message, pages", [
    ("endless-stream", "with more than 50 directories (get_tree_max_directories)", None),
    ("repeated-token", "with the page token 'again' again", 2),
    ("empty-pages", "with more than 8 empty pages", 9),
])
def test_get_tree_that_never_ends_is_stopped(
    hostile: HostileServer, tree: tuple[Path, Digest], trick: str, message: str,
    pages: int | None,
) -> None:
    _, root = tree
    hostile.tricks.add(trick)
    # Repeated tokens and empty pages are refused whatever the limits; an endless stream of new
    # Directories is stopped by get_tree_max_directories (lowered here: the default takes longer).
    options = {"get_tree_max_directories": 50} if pages is None else {}
    with _remote(hostile, **options) as remote:
        with pytest.raises(RemoteProtocolError, match=re.escape(message)):
            for _ in remote.blobs.get_tree(root):  # type: ignore[attr-defined]
                pass
    _stopped(hostile, trick, pages)


def test_get_tree_over_the_byte_limit_is_stopped(
    hostile: HostileServer, tree: tuple[Path, Digest],
) -> None:
    _, root = tree
    hostile.tricks.add("endless-stream")
    with _remote(hostile, get_tree_max_bytes=4096) as remote:
        with pytest.raises(
            RemoteProtocolError, match=r"more than 4096 bytes \(get_tree_max_bytes\)"
        ):
            list(remote.blobs.get_tree(root))  # type: ignore[attr-defined]
    _stopped(hostile, "endless-stream", None)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("trick, pages", [
    ("endless-stream", None), ("repeated-token", 2), ("empty-pages", 9),
])
def test_pull_from_a_server_paging_forever_ends_with_the_right_tree(
    hostile: HostileServer, tree: tuple[Path, Digest], trick: str, pages: int | None,
    tmp_path: Path,
) -> None:
    source, root = tree
    hostile.tricks.add(trick)
    options = {"get_tree_max_directories": 200} if pages is None else {}
    with _remote(hostile, **options) as remote, \
            open_store("memory://") as local:
        local.pull(remote, root, ref="pulled")
        local.checkout("pulled", tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")
    _stopped(hostile, trick, pages)


# -- refs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol, trick, call", [
    ("reference-storage", "invalid-ref-digest", "ReferenceStorage.GetReference"),
    ("asset", "invalid-asset-digest", "Fetch.FetchDirectory"),
])
def test_refs_answered_with_invalid_digests_are_refused(
    hostile: HostileServer, tree: tuple[Path, Digest], protocol: str, trick: str, call: str,
) -> None:
    hostile.tricks.add(trick)
    with _remote(hostile, ref_protocol=protocol) as remote:
        with pytest.raises(RemoteProtocolError,
                           match=f"answered {call} of ref build/main with an invalid digest"):
            remote.get_ref("build/main")


def test_refs_work_over_both_protocols_when_the_server_is_honest(
    hostile: HostileServer, tree: tuple[Path, Digest],
) -> None:
    _, root = tree
    with _remote(hostile) as remote:
        assert remote.get_ref("build/main") == root
    hostile.tricks.add("asset-only")
    with _remote(hostile) as remote:
        assert remote.get_ref("build/main") == root


# -- a server that never answers --------------------------------------------------------------


def _calls(root: Digest, small: Digest, large: Digest) -> dict[str, Callable[[Store], object]]:
    return {
        "FindMissingBlobs": lambda s: s.find_missing([Digest.of_bytes(b"absent")]),
        "BatchReadBlobs": lambda s: s.read_bytes(small),
        "BatchUpdateBlobs": lambda s: s.put_bytes(b"new small blob"),
        "GetTree": lambda s: list(s.blobs.get_tree(root)),  # type: ignore[attr-defined]
        "Read": lambda s: s.read_bytes(large),
        "Write": lambda s: s.put_bytes(random_bytes(5 * MiB, seed=9)),
        "GetReference": lambda s: s.get_ref("build/main"),
        "Status": lambda s: s.get_ref("build/main"),
        "UpdateReference": lambda s: s.set_ref("other", root, check_complete=False),
        "FetchDirectory": lambda s: s.get_ref("build/main"),
        "PushDirectory": lambda s: s.set_ref("other", root, check_complete=False),
    }


@pytest.mark.parametrize("method, protocol", [
    ("FindMissingBlobs", "auto"), ("BatchReadBlobs", "auto"), ("BatchUpdateBlobs", "auto"),
    ("GetTree", "auto"), ("Read", "auto"), ("Write", "auto"),
    ("Status", "auto"), ("GetReference", "reference-storage"),
    ("UpdateReference", "reference-storage"), ("FetchDirectory", "asset"),
    ("PushDirectory", "asset"),
])
def test_a_call_the_server_never_answers_ends_at_the_timeout(
    hostile: HostileServer, memory_store: Store, tree: tuple[Path, Digest], method: str,
    protocol: str,
) -> None:
    _, root = tree
    small = memory_store.put_bytes(b"small blob")
    large = memory_store.put_bytes(random_bytes(2 * MiB, seed=8))
    remote = _remote(hostile, timeout=1, ref_protocol=protocol)
    hostile.stalled.add(method)
    with remote, pytest.raises(BackendUnavailableError, match="did not answer .* in time"):
        _calls(root, small, large)[method](remote)


def test_capabilities_the_server_never_answers_end_at_the_timeout(
    hostile: HostileServer,
) -> None:
    hostile.stalled.add("GetCapabilities")
    with pytest.raises(BackendUnavailableError, match="cannot reach"):
        _remote(hostile, timeout=1)


def test_an_honest_hostile_server_serves_every_path(
    hostile: HostileServer, memory_store: Store, tree: tuple[Path, Digest], tmp_path: Path,
) -> None:
    """Without tricks the test server is a working REAPI server: the tricks alone fail."""
    source, root = tree
    large = random_bytes(3 * MiB, seed=10)
    with _remote(hostile) as remote, open_store("memory://") as local:
        assert remote.read_bytes(remote.put_bytes(large)) == large
        assert len(list(remote.blobs.get_tree(root))) > 1  # type: ignore[attr-defined]
        local.pull(remote, "build/main")
        local.checkout("build/main", tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")
