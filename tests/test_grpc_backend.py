"""The grpc:// backend against casframe's own server, started in this process on a free port.

The server serves a ``memory://`` or a ``file://`` store (the "backing" store); the backend
under test is ``grpc://127.0.0.1:PORT``. A recording interceptor on the server shows which
calls the backend made, so batching and the small/large split are checked from the wire.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_server_tls import Pki, pki  # noqa: F401 - one test PKI for the server and this backend

from casframe import (
    EMPTY_DIGEST,
    BackendUnavailableError,
    BlobNotFoundError,
    Capability,
    CasframeError,
    ConfigError,
    Digest,
    DigestMismatchError,
    PermissionDeniedError,
    RefNotFoundError,
    Store,
    UnsupportedOperationError,
    open_store,
)
from casframe.digest import CHUNK_SIZE
from casframe.server import Server
from casframe.testing import LARGE_FILE_SIZE, assert_tree_equal, random_bytes
from casframe.testing.conformance import ConformanceBase, StoreConformance
from casframe.tree import iter_tree

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_BYTESTREAM = "/google.bytestream.ByteStream/"


class CallRecorder(grpc.ServerInterceptor):
    """Counts the methods called on a server; can fail or delay chosen ones."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        #: method → how many more calls to refuse with UNAVAILABLE
        self.refuse: dict[str, int] = {}
        #: method → seconds to wait before answering
        self.delay: dict[str, float] = {}

    def count(self, method: str) -> int:
        return self.calls[method]

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        method = details.method
        with self._lock:
            self.calls[method] += 1
            refuse = self.refuse.get(method, 0) > 0
            if refuse:
                self.refuse[method] -= 1
        delay = self.delay.get(method, 0.0)
        if refuse:
            def unavailable(request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAVAILABLE, "refused by the test")

            return grpc.unary_unary_rpc_method_handler(unavailable)
        if delay:
            time.sleep(delay)
        return continuation(details)


class Served:
    """A backing store, a casframe server over it, and the recorder on that server."""

    def __init__(self, backing: Store, server: Server, recorder: CallRecorder) -> None:
        self.backing = backing
        self.server = server
        self.recorder = recorder

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def url(self, instance: str = "", **options: Any) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"grpc://127.0.0.1:{self.port}/{instance}" + (f"?{query}" if query else "")

    def open(self, instance: str = "", **options: Any) -> Store:
        return open_store(self.url(instance, **options))


def _backing(kind: str, tmp_path: Path) -> Store:
    return open_store("memory://" if kind == "memory" else f"file://{tmp_path / 'backing'}")


@pytest.fixture(params=["memory", "file"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    recorder = CallRecorder()
    with _backing(request.param, tmp_path) as backing:
        with Server(backing, listen="127.0.0.1:0", instance_names=("", "main"),
                    interceptors=[recorder]) as server:
            yield Served(backing, server, recorder)


@pytest.fixture
def store(served: Served) -> Iterator[Store]:
    with served.open() as opened:
        yield opened


# -- blobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK_SIZE, CHUNK_SIZE + 1])
def test_small_blobs_round_trip_through_batch_calls(
    served: Served, store: Store, size: int
) -> None:
    """Up to the batch limit blobs are written in batches; read so up to 1 MiB (one chunk)."""
    data = random_bytes(size, seed=size)
    digest = store.put_bytes(data)
    assert served.backing.read_bytes(digest) == data
    assert store.find_missing([digest]) == set()
    assert store.read_bytes(digest) == data
    with store.open_read(digest) as stream:
        assert stream.read() == data
    assert served.recorder.count(_BYTESTREAM + "Write") == 0
    assert (served.recorder.count(_BYTESTREAM + "Read") > 0) == (size > CHUNK_SIZE)


def test_large_blob_streams_through_bytestream_with_offsets(
    served: Served, store: Store
) -> None:
    data = random_bytes(LARGE_FILE_SIZE, seed=1)
    digest = store.put_stream(io.BytesIO(data))
    assert served.recorder.count(_BYTESTREAM + "Write") == 1
    assert served.backing.read_bytes(digest) == data
    with store.open_read(digest) as stream:
        parts = []
        while part := stream.read(100_000):
            parts.append(part)
    assert b"".join(parts) == data
    for offset in (1, CHUNK_SIZE, CHUNK_SIZE + 7, len(data) - 1, len(data)):
        with store.open_read(digest, offset) as stream:
            assert stream.read() == data[offset:], f"offset {offset}"
    assert served.recorder.count(_BYTESTREAM + "Read") >= 5
    # Storing it again asks first and sends nothing.
    assert store.put_stream(io.BytesIO(data), digest) == digest
    assert served.recorder.count(_BYTESTREAM + "Write") == 1


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_an_announced_upload_streams_before_it_is_committed(served: Served, store: Store) -> None:
    """A large blob whose digest is known goes out while it is written, not spooled first;
    the server commits it only when the core commits it."""
    data = random_bytes(6 * CHUNK_SIZE + 5, seed=3)
    digest = Digest.of_bytes(data)
    writer = store.blobs.begin_write_for(digest)
    for start in range(0, 5 * CHUNK_SIZE, CHUNK_SIZE):
        writer.write(data[start : start + CHUNK_SIZE])
    # Chunks already travelled: the server holds an upload in progress, not a blob.
    _wait_for(lambda: served.server.partial_uploads == 1, "the upload to reach the server")
    assert served.backing.find_missing([digest]) == {digest}
    writer.write(data[5 * CHUNK_SIZE :])
    writer.commit(digest)
    assert served.backing.read_bytes(digest) == data
    assert served.server.partial_uploads == 0
    assert served.recorder.count(_BYTESTREAM + "Write") == 1


def test_an_upload_the_core_refuses_is_never_committed(served: Served, store: Store) -> None:
    data = random_bytes(4 * CHUNK_SIZE, seed=4)
    claimed = Digest.of_bytes(data[:-1] + b"?")
    with pytest.raises(DigestMismatchError):
        store.put_stream(io.BytesIO(data), claimed)
    actual = Digest.of_bytes(data)
    assert served.backing.find_missing([claimed, actual]) == {claimed, actual}
    # An abort in the middle cancels the call: nothing is stored either.
    writer = store.blobs.begin_write_for(actual)
    writer.write(data[: 3 * CHUNK_SIZE])
    writer.abort()
    assert served.backing.find_missing([actual]) == {actual}
    assert store.put_stream(io.BytesIO(data), actual) == actual  # and the blob can still go
    assert served.backing.read_bytes(actual) == data


def test_a_transfer_stores_directories_a_level_at_a_time(
    served: Served, store: Store, tmp_path: Path
) -> None:
    source = tmp_path / "tree"
    for a in range(4):  # 1 + 4 + 16 + 64 = 85 directories, 4 levels
        for b in range(4):
            for c in range(4):
                leaf = source / f"a{a}" / f"b{b}" / f"c{c}"
                leaf.mkdir(parents=True)
                (leaf / "f").write_bytes(b"%d %d %d" % (a, b, c))
    with open_store(f"file://{tmp_path / 'local'}") as local:
        root = local.import_directory(source)
        served.recorder.reset()
        result = local.push(store, root, ref="levels")
    assert result.blobs_sent == 85 + 64
    # One call for the 64 files, then one per level of Directories: not one per Directory.
    assert served.recorder.count(_CAS + "BatchUpdateBlobs") == 1 + 4
    assert store.get_ref("levels") == root


class InFlight(grpc.ServerInterceptor):
    """Tracks how many calls of the given methods run at once, holding each a little.

    Until ``expected`` calls have been in flight together, each call also waits (up to
    ``patience`` seconds) for the others: on a busy machine one call of a wave can arrive
    after the others have finished their hold, and that must not pass for a client that
    sends fewer calls at once.
    """

    def __init__(
        self, methods: tuple[str, ...], hold: float, expected: int, patience: float = 10.0
    ) -> None:
        self.methods = methods
        self.hold = hold
        self.expected = expected
        self.patience = patience
        self.now = self.most = 0
        self._lock = threading.Condition()

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.endswith(self.methods):
            return handler
        behavior = handler.unary_unary or handler.stream_unary

        def held(request: Any, context: grpc.ServicerContext) -> Any:
            with self._lock:
                self.now += 1
                self.most = max(self.most, self.now)
                self._lock.notify_all()
                self._lock.wait_for(lambda: self.most >= self.expected, timeout=self.patience)
            try:
                time.sleep(self.hold)
                return behavior(request, context)
            finally:
                with self._lock:
                    self.now -= 1

        make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler)
        return make(held, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


@pytest.mark.parametrize("concurrency", [3, 5])
def test_a_transfer_keeps_max_concurrency_calls_in_flight(
    tmp_path: Path, concurrency: int
) -> None:
    """Batches and streams go out concurrently, never more than ``max_concurrency`` at once
    (a transfer uses the larger of its two stores' concurrency; file:// allows 2)."""
    in_flight = InFlight(("/BatchUpdateBlobs", "/Write"), hold=0.05, expected=concurrency)
    blobs = [random_bytes(300_000, seed=i) for i in range(24)]  # ~7 batch calls
    blobs += [random_bytes(2 * CHUNK_SIZE + i, seed=100 + i) for i in range(4)]  # 4 streams
    with open_store("memory://") as backing, \
            Server(backing, interceptors=[in_flight]) as server, \
            open_store(f"grpc://127.0.0.1:{server.port}?max_concurrency={concurrency}") as store, \
            open_store(f"file://{tmp_path / 'local'}") as local:
        from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
            Directory,
            FileNode,
        )

        files = [FileNode(name=f"f{i:02}", digest=local.put_bytes(b).to_proto())
                 for i, b in enumerate(blobs)]
        root = local.put_directory(Directory(files=files))
        local.push(store, root, ref="wide")
        assert backing.get_ref("wide") == root
    assert in_flight.most == concurrency


def test_a_stream_reads_across_messages_and_can_be_abandoned(served: Served, store: Store) -> None:
    data = random_bytes(4 * CHUNK_SIZE, seed=2)
    digest = served.backing.put_bytes(data)
    stream = store.blobs.open_blob(digest)
    assert stream.read(10) == data[:10]
    assert stream.read(CHUNK_SIZE) == data[10 : CHUNK_SIZE + 10]  # across message boundaries
    stream.close()  # cancels the rest of the call
    assert store.read_bytes(EMPTY_DIGEST) == b""  # the channel is still fine


def test_missing_blobs_are_not_found(store: Store) -> None:
    absent = Digest.of_bytes(b"never stored")
    large_absent = Digest(absent.hash, LARGE_FILE_SIZE)
    for digest in (absent, large_absent):
        with pytest.raises(BlobNotFoundError) as caught:
            store.open_read(digest).read()
        assert caught.value.digests == (digest,)
        assert "grpc://127.0.0.1:" in str(caught.value)
    with pytest.raises(BlobNotFoundError):
        store.open_read(large_absent, large_absent.size).read()
    present = store.put_bytes(b"present")
    with pytest.raises(BlobNotFoundError) as caught:
        list(store.read_many([present, absent]))
    assert caught.value.digests == (absent,)


def test_find_missing_goes_in_batches_of_ten_thousand(served: Served, store: Store) -> None:
    stored = [store.put_bytes(b"blob %d" % i) for i in range(100)]
    absent = [Digest.of_bytes(b"absent %d" % i) for i in range(5000)]
    wrong_size = [Digest(d.hash, d.size + 1) for d in stored[:50]]
    served.recorder.reset()
    assert store.find_missing([*stored, *absent, *wrong_size, EMPTY_DIGEST]) == {
        *absent, *wrong_size
    }
    # One call for the first occurrence of each hash, one for the other sizes of those hashes.
    assert served.recorder.count(_CAS + "FindMissingBlobs") == 2
    served.recorder.reset()
    many = [Digest.of_bytes(b"many %d" % i) for i in range(25_000)]
    assert store.blobs.find_missing_blobs(many) == set(many)
    assert served.recorder.count(_CAS + "FindMissingBlobs") == 3


def test_batches_stay_under_the_servers_limit(served: Served, store: Store) -> None:
    limit = store.blobs.batch_limit  # type: ignore[attr-defined]
    blobs = [random_bytes(200_000, seed=i) for i in range(60)]  # 12 MB, ~4 batches each way
    digests = [Digest.of_bytes(b) for b in blobs]
    served.recorder.reset()
    store.put_many(list(zip(digests, blobs, strict=True)))
    updates = served.recorder.count(_CAS + "BatchUpdateBlobs")
    assert updates >= sum(map(len, blobs)) // limit + 1
    assert dict(store.read_many(digests)) == dict(zip(digests, blobs, strict=True))
    assert served.recorder.count(_CAS + "BatchReadBlobs") == updates
    assert served.recorder.count(_BYTESTREAM + "Write") == 0


def test_capabilities_are_read_on_open(store: Store) -> None:
    blobs = store.blobs
    assert blobs.capabilities == frozenset()
    # casframe's server advertises 3 MiB (4 MiB messages, 1 MiB kept for framing).
    assert blobs.batch_limit == (3 << 20) - 1024  # type: ignore[attr-defined]
    # The core groups 1 MiB per call: each call in flight holds about four times its payload.
    assert blobs.limits.max_batch_bytes == 1 << 20
    assert blobs.limits.max_concurrency == 4


# -- refs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["asset", "reference-storage", "auto"])
def test_refs_over_each_protocol(served: Served, protocol: str) -> None:
    with served.open(ref_protocol=protocol) as store:
        tree = store.put_directory(_one_file_directory(store, b"ref target"))
        store.set_ref("project/main", tree)
        assert store.get_ref("project/main") == tree
        assert served.backing.get_ref("project/main") == tree
        with pytest.raises(RefNotFoundError, match="no/such/ref") as caught:
            store.get_ref("no/such/ref")
        assert caught.value.name == "no/such/ref"
        assert not store.has_ref("no/such/ref")
        with pytest.raises(UnsupportedOperationError, match="cannot list refs: REAPI has no such"):
            store.list_refs()
        with pytest.raises(UnsupportedOperationError, match="cannot delete refs: REAPI has no"):
            store.delete_ref("project/main")
        assert store.get_ref("project/main") == tree
        used = "reference-storage" if protocol == "auto" else protocol
        assert store.refs.protocol() == used  # type: ignore[attr-defined]
    asset_calls = served.recorder.count("/build.bazel.remote.asset.v1.Push/PushDirectory")
    assert (asset_calls == 1) == (protocol == "asset")


def test_refs_set_over_one_protocol_are_read_over_the_other(served: Served) -> None:
    with served.open(ref_protocol="asset") as by_asset, \
            served.open(ref_protocol="reference-storage") as by_reference:
        tree = by_asset.put_directory(_one_file_directory(by_asset, b"shared"))
        by_asset.set_ref("shared/ref", tree)
        assert by_reference.get_ref("shared/ref") == tree


def test_auto_falls_back_to_remote_asset(served: Served) -> None:
    served.recorder.refuse = {}

    class NoReferenceStorage(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
            if details.method.startswith("/buildstream.v2.ReferenceStorage/"):
                return None  # grpc answers UNIMPLEMENTED
            return continuation(details)

    with Server(served.backing, interceptors=[NoReferenceStorage()]) as server, \
            open_store(f"grpc://127.0.0.1:{server.port}") as store:
        store.set_ref("by/asset", EMPTY_DIGEST)
        assert store.get_ref("by/asset") == EMPTY_DIGEST
        assert store.refs.protocol() == "asset"  # type: ignore[attr-defined]


def test_set_ref_refuses_an_incomplete_tree(store: Store) -> None:
    root = store.put_directory(_one_file_directory(store, b"x", store_file=False))
    with pytest.raises(BlobNotFoundError):
        store.set_ref("broken", root)
    assert not store.has_ref("broken")


# -- trees and transfer ----------------------------------------------------------------------------


def test_import_into_grpc_and_checkout_from_it(
    served: Served, store: Store, make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    source = make_tree(large=True)
    root = store.import_directory(source)
    assert root == served.backing.import_directory(source)
    store.set_ref("imported", root)
    store.checkout("imported", tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")


def test_transfer_file_to_grpc_to_file(
    store: Store, make_tree: Callable[..., Path], tmp_path: Path
) -> None:
    source = make_tree(large=True)
    with open_store(f"file://{tmp_path / 'first'}") as first, \
            open_store(f"file://{tmp_path / 'last'}") as last:
        first.set_ref("release/1", first.import_directory(source))
        pushed = first.push(store, "release/1")
        assert pushed.blobs_sent == pushed.blobs_total
        assert first.push(store, "release/1").already_present
        pulled = last.pull(store, "release/1")
        assert pulled.blobs_sent == pushed.blobs_total
        last.checkout("release/1", tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")


_TRANSFER_IN_A_CHILD = """
import json, sys
from casframe import open_store
direction, remote_url, local_url = sys.argv[1:]
with open_store(remote_url) as remote, open_store(local_url) as local:
    if direction == "push":
        local.push(remote, "big")
    else:
        local.pull(remote, "big")
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_mib": peak / 1024}))
"""


def test_large_transfers_stay_within_memory_in_a_child(tmp_path: Path) -> None:
    """Pushing and pulling 192 MiB of large blobs, four streams at a time, holds a few MiB per
    stream: nothing is spooled in memory, and grpcio's receive windows do not grow to buffer
    whole streams that the client consumes more slowly than the server sends them."""
    import json
    import subprocess
    import sys

    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        Directory,
        FileNode,
    )

    size = 48 << 20
    with open_store(f"file://{tmp_path / 'source'}") as source:
        files = [FileNode(name=f"big{i}", digest=source.put_bytes(random_bytes(size, i)).to_proto())
                 for i in range(4)]
        source.set_ref("big", source.put_directory(Directory(files=files)))
    peaks = {}
    with open_store(f"file://{tmp_path / 'served'}") as backing, Server(backing) as server:
        for direction, local in (("push", "source"), ("pull", "pulled")):
            done = subprocess.run(
                [sys.executable, "-c", _TRANSFER_IN_A_CHILD, direction,
                 f"grpc://127.0.0.1:{server.port}", f"file://{tmp_path / local}"],
                capture_output=True, text=True, timeout=300, check=False,
            )
            assert done.returncode == 0, done.stderr
            peaks[direction] = json.loads(done.stdout)["peak_mib"]
        assert backing.find_missing(Digest.from_proto(f.digest) for f in files) == set()
    with open_store(f"file://{tmp_path / 'pulled'}") as pulled:
        assert pulled.find_missing(Digest.from_proto(f.digest) for f in files) == set()
    # A child holds ~45 MiB before it transfers anything; unbounded windows took 200+ MiB.
    assert peaks["push"] < 120 and peaks["pull"] < 120, peaks


def test_instance_names_reach_the_server(served: Served) -> None:
    with served.open("main") as main:
        digest = main.put_bytes(b"in main")
        big = main.put_stream(io.BytesIO(random_bytes(LARGE_FILE_SIZE, seed=4)))
        assert main.read_bytes(digest) == b"in main"
        assert main.find_missing([digest, big]) == set()
    with pytest.raises(CasframeError, match="unknown instance name 'other'"):
        served.open("other")


# -- failures --------------------------------------------------------------------------------------


def test_unreachable_server_fails_fast_and_clearly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match=rf"cannot reach grpc://127.0.0.1:{port}"):
            open_store(f"grpc://127.0.0.1:{port}?timeout=2")
        assert time.monotonic() - started < 5


def test_unavailable_is_retried_by_grpc(served: Served, store: Store) -> None:
    served.recorder.refuse[_CAS + "FindMissingBlobs"] = 2
    absent = Digest.of_bytes(b"asked three times")
    assert store.find_missing([absent]) == {absent}
    assert served.recorder.count(_CAS + "FindMissingBlobs") == 3


def test_a_slow_server_hits_the_timeout(served: Served) -> None:
    with served.open(timeout=0.5) as store:
        served.recorder.delay[_CAS + "FindMissingBlobs"] = 2.0
        with pytest.raises(BackendUnavailableError, match="did not answer FindMissingBlobs"):
            store.find_missing([Digest.of_bytes(b"slow")])


def test_read_only_server_refuses_writes(tmp_path: Path) -> None:
    with open_store("memory://") as backing, \
            Server(backing, read_only=True) as server, \
            open_store(f"grpc://127.0.0.1:{server.port}") as store:
        with pytest.raises(PermissionDeniedError, match="read-only"):
            store.put_bytes(b"small")
        with pytest.raises(PermissionDeniedError, match="read-only"):
            store.put_stream(io.BytesIO(random_bytes(LARGE_FILE_SIZE, seed=5)))
        with pytest.raises(PermissionDeniedError):
            store.set_ref("x", EMPTY_DIGEST)


def test_prune_needs_what_grpc_cannot_offer(store: Store) -> None:
    """prune and gc list blobs and refs and delete blobs: REAPI has none of these calls."""
    for capability in (Capability.LIST, Capability.DELETE, Capability.TOUCH):
        assert not store.has(capability)
    with pytest.raises(UnsupportedOperationError, match="cannot list its blobs"):
        list(store.blobs.iter_blobs())
    with pytest.raises(UnsupportedOperationError, match="cannot list refs"):
        store.list_refs()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("grpc://127.0.0.1", "needs a port"),
        ("grpc://127.0.0.1:1?tiemout=3", "unknown option.*tiemout"),
        ("grpc://127.0.0.1:1?timeout=-1", "must be positive"),
        ("grpc://127.0.0.1:1?timeout=soon", "not a number"),
        ("grpc://127.0.0.1:1?ref_protocol=git", "ref_protocol='git'"),
        ("grpc://127.0.0.1:1?server_cert=/ca.pem", "need TLS: use grpcs://"),
        ("grpcs://127.0.0.1:1?client_key=/k.pem", "needs both client_key and client_cert"),
        ("grpcs://127.0.0.1:1?server_cert=/no/such/ca.pem", "cannot read the server_cert"),
    ],
)
def test_bad_urls_are_refused_before_connecting(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(url)


# -- TLS -----------------------------------------------------------------------------------------

def _write_pem(tmp_path: Path, **files: bytes) -> dict[str, Path]:
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def test_grpcs_with_server_certificate(pki: Pki, tmp_path: Path) -> None:  # noqa: F811 - fixture
    pem = _write_pem(tmp_path, ca=pki.ca)
    with open_store("memory://") as backing, \
            Server(backing, tls_cert=pki.server.cert, tls_key=pki.server.key) as server:
        with open_store(f"grpcs://localhost:{server.port}?server_cert={pem['ca']}") as store:
            digest = store.put_bytes(b"over TLS")
            assert backing.read_bytes(digest) == b"over TLS"
        with pytest.raises(BackendUnavailableError, match="cannot reach grpc://"):
            open_store(f"grpc://127.0.0.1:{server.port}?timeout=3")  # plaintext to TLS


def test_grpcs_with_mutual_tls(pki: Pki, tmp_path: Path) -> None:  # noqa: F811 - fixture
    pem = _write_pem(tmp_path, ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
    with open_store("memory://") as backing, \
            Server(backing, tls_cert=pki.server.cert, tls_key=pki.server.key,
                   tls_client_ca=pki.ca) as server:
        base = f"grpcs://localhost:{server.port}?server_cert={pem['ca']}"
        url = f"{base}&client_cert={pem['cert']}&client_key={pem['key']}"
        with open_store(url) as store:
            data = random_bytes(LARGE_FILE_SIZE, seed=6)
            digest = store.put_stream(io.BytesIO(data))
            assert backing.read_bytes(digest) == data
        with pytest.raises(BackendUnavailableError, match="cannot reach grpcs://localhost"):
            open_store(f"{base}&timeout=3")  # no client certificate


# -- the conformance suite -----------------------------------------------------------------------

# REAPI, Remote Asset and ReferenceStorage have no call to list or delete refs: grpc:// declares
# neither ref capability, and the suite checks those are refused instead of listing them as gaps.

# A gap of casframe's server, not of this backend: its ByteStream.Read stops after the digest's
# size, so an over-long object in a memory:// store is served as its (correct) first bytes
# instead of failing with DATA_LOSS. (Over file:// the local backend notices the wrong size.)
_SERVER_OVERLONG = "casframe's server does not detect an over-long object in ByteStream.Read"


class _GrpcConformance(StoreConformance):
    backing_kind = ""
    query = ""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        with _backing(self.backing_kind, tmp_path) as backing, Server(backing) as server, \
                open_store(f"grpc://127.0.0.1:{server.port}{self.query}") as store:
            self.backing = backing
            yield store

    def corrupt_blob(self, store: Store, digest: Digest, data: bytes) -> None:
        # Damage the blob where the server keeps it: the backing store.
        ConformanceBase.corrupt_blob(self, self.backing, digest, data)


class TestGrpcOverMemory(_GrpcConformance):
    backing_kind = "memory"
    known_gaps = {
        "test_corrupted_blob_is_detected_on_read[2097157-extended]": _SERVER_OVERLONG,
    }


class TestGrpcOverFile(_GrpcConformance):
    backing_kind = "file"


class TestGrpcZstdOverFile(_GrpcConformance):
    """Every blob zstd-compressed on the wire, both ways."""

    backing_kind = "file"
    query = "?compression=zstd"


# -- helpers -------------------------------------------------------------------------------------


def _one_file_directory(store: Store, content: bytes, *, store_file: bool = True) -> Any:
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        Directory,
        FileNode,
    )

    digest = store.put_bytes(content) if store_file else Digest.of_bytes(content)
    return Directory(files=[FileNode(name="f", digest=digest.to_proto())])


def test_get_tree_lists_every_directory_in_few_calls(
    served: Served, store: Store, make_tree: Callable[..., Path]
) -> None:
    root = store.import_directory(make_tree())
    expected = {digest: data for digest, data, _ in iter_tree(store.verified, root)}
    served.recorder.reset()
    got = list(store.blobs.get_tree(root))  # type: ignore[attr-defined]
    assert {Digest.of_bytes(data): data for data in got} == expected
    assert served.recorder.count(_CAS + "GetTree") == 1
    with pytest.raises(BlobNotFoundError):
        list(store.blobs.get_tree(Digest.of_bytes(b"no such root")))  # type: ignore[attr-defined]


class OnePagePerCall(grpc.ServerInterceptor):
    """Makes GetTree end its stream after one page, as servers that page by calls do."""

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.endswith("/GetTree"):
            return handler

        def first_page(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            yield next(iter(handler.unary_stream(request, context)))

        return grpc.unary_stream_rpc_method_handler(
            first_page,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@pytest.mark.parametrize("pages", ["in-one-stream", "one-per-call"])
def test_get_tree_follows_pages(tmp_path: Path, pages: str) -> None:
    source = tmp_path / "wide"
    for i in range(1500):  # casframe's server sends 1,000 directories a page
        (source / f"d{i:04}").mkdir(parents=True)
        (source / f"d{i:04}" / "f").write_bytes(b"%d" % i)
    recorder = CallRecorder()
    interceptors = [recorder, *([OnePagePerCall()] if pages == "one-per-call" else [])]
    with open_store("memory://") as backing, \
            Server(backing, interceptors=interceptors) as server, \
            open_store(f"grpc://127.0.0.1:{server.port}") as store:
        root = backing.import_directory(source)
        got = [Digest.of_bytes(d) for d in store.blobs.get_tree(root)]  # type: ignore[attr-defined]
        assert len(got) == 1501
        assert set(got) == {digest for digest, _, _ in iter_tree(backing.verified, root)}
        assert recorder.count(_CAS + "GetTree") == (1 if pages == "in-one-stream" else 2)
