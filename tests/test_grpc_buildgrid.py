"""The grpc:// backend against an independent REAPI server: BuildGrid, from PyPI.

BuildGrid carries its own copies of the REAPI protos, which would clash with casframe's in one
process, so it lives in a virtualenv of its own that ``scripts/test-prereqs`` creates
(``$CASFRAME_PREREQS/buildgrid``, or the path in ``CASFRAME_BUILDGRID_VENV``). ``bgd server
start`` then runs a CAS, ByteStream and Capabilities server on a free loopback port for the
whole module. A missing BuildGrid fails the tests, naming the command that installs it: a skip
would hide that this peer was never tried.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prereqs import PREREQS, missing

from casframe import (
    EMPTY_DIGEST,
    BlobNotFoundError,
    Digest,
    Store,
    UnsupportedDigestFunctionError,
    UnsupportedOperationError,
    open_store,
)
from casframe.digest import CHUNK_SIZE
from casframe.testing import LARGE_FILE_SIZE, assert_tree_equal, random_bytes

_START_TIMEOUT = 60

# One storage per instance: the unnamed instance and "main", so that instance names are seen
# to reach the server and to separate content.
_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
storages:
  - !lru-storage &default-storage
    size: 256MB
  - !lru-storage &main-storage
    size: 64MB
instances:
  - name: ""
    services:
      - !cas
        storage: *default-storage
      - !bytestream
        storage: *default-storage
  - name: main
    services:
      - !cas
        storage: *main-storage
      - !bytestream
        storage: *main-storage
"""


def _buildgrid() -> tuple[Path, str]:
    """The ``bgd`` of the BuildGrid virtualenv, and the release it holds."""
    override = os.environ.get("CASFRAME_BUILDGRID_VENV")
    venv = Path(override) if override else PREREQS / "buildgrid"
    bgd = venv / "bin" / "bgd"
    stamp = venv / ".casframe-installed"
    if not (bgd.exists() and stamp.exists()):
        missing(f"BuildGrid (a virtualenv at {venv})")
    return bgd, stamp.read_text().strip()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_serving(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    import grpc

    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as reapi
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as reapi_grpc,
    )

    deadline = time.monotonic() + _START_TIMEOUT
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reapi_grpc.CapabilitiesStub(channel)
        while True:
            if process.poll() is not None:
                pytest.fail(f"bgd server exited with {process.returncode}:\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
            try:
                stub.GetCapabilities(reapi.GetCapabilitiesRequest(), timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    pytest.fail(f"bgd server did not answer within {_START_TIMEOUT}s:\n"
                                f"{log.read_text(errors='replace')[-4000:]}")
                time.sleep(0.2)


class BuildGrid:
    """A running ``bgd server`` and what it was started with."""

    def __init__(self, port: int, requirement: str, config: str) -> None:
        self.port = port
        self.requirement = requirement
        self.config = config

    def url(self, instance: str = "") -> str:
        return f"grpc://127.0.0.1:{self.port}/{instance}"


@pytest.fixture(scope="module")
def buildgrid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildGrid]:
    bgd, requirement = _buildgrid()
    workdir = tmp_path_factory.mktemp("buildgrid")
    port = _free_port()
    config = _CONFIG.format(port=port)
    (workdir / "bgd.yml").write_text(config)
    log = workdir / "bgd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(bgd), "server", "start", "bgd.yml"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        _wait_until_serving(process, port, log)
        yield BuildGrid(port, requirement, config)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def store(buildgrid: BuildGrid) -> Iterator[Store]:
    with open_store(buildgrid.url()) as opened:
        yield opened


def test_capabilities_set_the_batch_limit(store: Store) -> None:
    # BuildGrid advertises 4 MiB minus 1 KiB; the backend keeps room for message framing.
    assert 3 << 20 < store.blobs.batch_limit < 4 << 20  # type: ignore[attr-defined]
    assert store.blobs.limits.max_batch_bytes < store.blobs.batch_limit  # type: ignore[attr-defined]
    assert store.blobs.capabilities == frozenset()


@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK_SIZE, CHUNK_SIZE + 1])
def test_blob_round_trip(store: Store, size: int) -> None:
    data = random_bytes(size, seed=size + 100)
    digest = store.put_bytes(data)
    assert digest == Digest.of_bytes(data)
    assert store.find_missing([digest]) == set()
    assert store.read_bytes(digest) == data
    with store.open_read(digest) as stream:
        assert stream.read() == data
    assert store.put_bytes(data) == digest  # storing again is success


def test_find_missing_in_thousands(store: Store) -> None:
    stored = [store.put_bytes(b"buildgrid blob %d" % i) for i in range(200)]
    absent = [Digest.of_bytes(b"buildgrid absent %d" % i) for i in range(5000)]
    wrong_size = [Digest(d.hash, d.size + 1) for d in stored[:20]]
    assert store.find_missing([*stored, *absent, *wrong_size, EMPTY_DIGEST]) == {
        *absent, *wrong_size
    }


def test_read_many_batches(store: Store) -> None:
    blobs = {store.put_bytes(random_bytes(50_000, seed=i)): i for i in range(120)}  # ~6 MB
    got = dict(store.read_many(blobs))
    assert got.keys() == blobs.keys()
    absent = Digest.of_bytes(b"not in buildgrid")
    with pytest.raises(BlobNotFoundError) as caught:
        list(store.read_many([next(iter(blobs)), absent]))
    assert caught.value.digests == (absent,)


def test_large_blob_through_bytestream_with_offsets(store: Store) -> None:
    data = random_bytes(LARGE_FILE_SIZE, seed=7)
    digest = store.put_stream(io.BytesIO(data))
    assert store.find_missing([digest]) == set()
    with store.open_read(digest) as stream:
        assert stream.read() == data
    for offset in (1, CHUNK_SIZE + 7, len(data) - 1, len(data)):
        with store.open_read(digest, offset) as stream:
            assert stream.read() == data[offset:]
    absent = Digest(digest.hash, digest.size + 1)
    with pytest.raises(BlobNotFoundError):
        store.open_read(absent).read()


def test_import_and_checkout_a_tree(store: Store, make_tree, tmp_path: Path) -> None:
    source = make_tree(large=True)
    root = store.import_directory(source)
    store.checkout(root, tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")
    assert store.import_directory(source) == root


def test_transfer_file_to_buildgrid_to_file(store: Store, make_tree, tmp_path: Path) -> None:
    source = make_tree(large=True)
    (source / "unique.txt").write_text(f"not yet in the shared server: {tmp_path}")
    with open_store(f"file://{tmp_path / 'a'}") as first, \
            open_store(f"file://{tmp_path / 'b'}") as last:
        root = first.import_directory(source)
        sent = first.push(store, root)
        assert sent.blobs_sent > 0
        pulled = last.pull(store, root, ref="from-buildgrid")
        assert pulled.blobs_sent == sent.blobs_total
        last.checkout("from-buildgrid", tmp_path / "out")
    assert_tree_equal(source, tmp_path / "out")


def test_instance_names_separate_content(buildgrid: BuildGrid, store: Store) -> None:
    data = b"only in the instance called main"
    with open_store(buildgrid.url("main")) as main:
        digest = main.put_bytes(data)
        assert main.read_bytes(digest) == data
        big = main.put_bytes(random_bytes(LARGE_FILE_SIZE, seed=9))
        assert main.find_missing([digest, big]) == set()
    assert store.find_missing([digest, big]) == {digest, big}


def test_refs_are_refused_clearly(store: Store) -> None:
    # BuildGrid offers neither ReferenceStorage nor a Remote Asset server.
    with pytest.raises(UnsupportedOperationError, match="neither BuildStream's ReferenceStorage"):
        store.set_ref("some/ref", EMPTY_DIGEST)
    with pytest.raises(UnsupportedOperationError, match="cannot read refs"):
        store.get_ref("some/ref")
    with pytest.raises(UnsupportedOperationError, match="cannot list refs: REAPI has no such"):
        store.list_refs()


def test_compression_option_falls_back_to_plain_transfers(buildgrid: BuildGrid, make_tree,
                                                         tmp_path: Path) -> None:
    # BuildGrid offers no compressor (and refuses compressed-blobs resource names): with
    # ?compression=zstd every transfer must still work, uncompressed.
    with open_store(buildgrid.url() + "?compression=zstd") as store:
        blobs = store.blobs
        assert (blobs.streams.compression, blobs.batch_updates.compression) == ("none", "none")
        # Content the module's other tests did not store already: it has to be sent.
        text = f"compressible text from {tmp_path} ".encode() * 50_000
        for data in (text, text[:5000]):
            digest = store.put_bytes(data)
            assert store.read_bytes(digest) == data
            with store.open_read(digest, 7) as stream:
                assert stream.read() == data[7:]
        source = make_tree(large=True)
        root = store.import_directory(source)
        store.checkout(root, tmp_path / "out")
        assert_tree_equal(source, tmp_path / "out")
        wire = blobs.wire
        assert wire.wire_sent == wire.content_sent > len(text)
        assert wire.wire_received == wire.content_received > LARGE_FILE_SIZE


def test_a_digest_function_buildgrid_does_not_offer_is_refused_on_open(
    buildgrid: BuildGrid,
) -> None:
    # This configuration hashes with SHA-256 only: a BLAKE3 store is refused before any
    # transfer, in one line naming what the server offers.
    with pytest.raises(UnsupportedDigestFunctionError) as info:
        open_store(buildgrid.url(), digest_function="blake3")
    assert str(info.value) == (
        f"grpc://127.0.0.1:{buildgrid.port} does not store BLAKE3 digests (it offers SHA256); "
        "open it with one of those as digest_function"
    )


def test_a_store_declares_the_functions_its_server_lists(store: Store) -> None:
    # What casframe serve announces when it serves this store, and what
    # with_digest_function can open: SHA-256 alone here.
    assert store.digest_functions == frozenset({"sha256"})
    with pytest.raises(UnsupportedDigestFunctionError):
        store.with_digest_function("sha512")


def test_casframe_serve_of_buildgrid_offers_what_buildgrid_holds(store: Store, cas_server) -> None:
    import grpc

    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as reapi
    from casframe._protos.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as reapi_grpc,
    )

    proxy = cas_server(store)
    with grpc.insecure_channel(proxy.removeprefix("grpc://")) as channel:
        caps = reapi_grpc.CapabilitiesStub(channel).GetCapabilities(
            reapi.GetCapabilitiesRequest())
        assert list(caps.cache_capabilities.digest_functions) == [reapi.DigestFunction.SHA256]
        with pytest.raises(grpc.RpcError) as info:
            reapi_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
                reapi.FindMissingBlobsRequest(digest_function=reapi.DigestFunction.SHA512))
        sha512 = reapi.Digest(hash="ab" * 64, size_bytes=1)
        with pytest.raises(grpc.RpcError) as unset:  # 128 digits: no function it offers
            reapi_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
                reapi.FindMissingBlobsRequest(blob_digests=[sha512]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("digest function SHA512 is not supported by this server; "
                                    "it offers SHA256")
    assert unset.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unset.value.details() == (
        "cannot tell the digest function of 128-hex-digit digests (this server infers "
        "64 digits: SHA256; it offers SHA256): set digest_function"
    )
