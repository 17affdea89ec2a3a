"""The ``cache://`` backend: a local store in front of a remote one.

The conformance suite runs over three pairs (memory in front of memory, file:// in front of
in-process moto S3, file:// in front of casframe's gRPC server on a free loopback port); the
tests after it check what only a cache does: where reads, writes and lookups go, what happens
when the remote is gone, corrupt or failing, opening by URL and by configuration, and the CLI.
"""

from __future__ import annotations

import io
import logging
import threading
import tracemalloc
from collections.abc import Collection, Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
from casframe_cache import CacheStats, cache_store
from casframe_memory.store import MemoryBlobStore, MemoryRefStore
from click.testing import CliRunner, Result
from test_config import isolated_env  # noqa: F401 - autouse: no user configuration, cwd tmp_path
from test_server import _action_result

from casframe import (
    BackendUnavailableError,
    BlobNotFoundError,
    BlobWriter,
    ConfigError,
    CorruptBlobError,
    Digest,
    Store,
    UnsupportedOperationError,
    layout,
    open_store,
)
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    FileNode,
)
from casframe.cli import make_cli
from casframe.config import load_config
from casframe.digest import CHUNK_SIZE
from casframe.plugins import open_configured_store
from casframe.reapi import remote_asset, remote_asset_grpc
from casframe.server import Server
from casframe.testing import (
    LARGE_FILE_SIZE,
    InjectedFailure,
    assert_tree_equal,
    failing_writes,
    random_bytes,
    write_tree,
)
from casframe.testing.conformance import ConformanceBase, StoreConformance
from casframe.testing.s3 import S3TestBucket


def cache_url(local: str, remote: str) -> str:
    return f"cache://?local={quote(local, safe='')}&remote={quote(remote, safe='')}"


def local_of(store: Store) -> Store:
    return store.blobs.local  # type: ignore[attr-defined,no-any-return]


def remote_of(store: Store) -> Store:
    return store.blobs.remote  # type: ignore[attr-defined,no-any-return]


def stats_of(store: Store) -> CacheStats:
    return store.blobs.stats  # type: ignore[attr-defined,no-any-return]


# -- conformance ------------------------------------------------------------------------------

# set_ref through the cache first sends the remote what the tree needs: it cannot stage a ref to
# a tree with a hole or an unsafe name, which these fsck tests need.
_REF_SENDS_TREE = "set_ref through the cache sends the whole tree, so a damaged one is refused"
_CACHE_GAPS = {
    "test_fsck_finds_flipped_truncated_and_missing_blobs": _REF_SENDS_TREE,
    "test_fsck_checks_the_form_of_directories": _REF_SENDS_TREE,
}


class _CacheConformance(StoreConformance):
    known_gaps = _CACHE_GAPS

    def corrupt_blob(self, store: Store, digest: Digest, data: bytes) -> None:
        # Reads are served from local: damage the copy there.
        ConformanceBase.corrupt_blob(self, local_of(store), digest, data)


class TestCacheMemoryOverMemory(_CacheConformance):
    digest_functions = ("sha256", "blake3")  # both stores opened with the cache's function

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        with open_store("cache://?local=memory://local&remote=memory://remote") as store:
            yield store


class TestCacheFileOverS3(_CacheConformance):
    @pytest.fixture
    def store(self, tmp_path: Path, s3_store: Store) -> Iterator[Store]:
        with cache_store(open_store(f"file://{tmp_path / 'local'}"), s3_store) as store:
            yield store


class TestCacheFileOverGrpc(_CacheConformance):
    # Refs live on the remote, which cannot list them: fsck is refused, so these are no gaps.
    known_gaps = {}

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        with open_store("memory://") as backing, Server(backing, listen="127.0.0.1:0") as server:
            url = cache_url(f"file://{tmp_path / 'local'}", f"grpc://127.0.0.1:{server.port}")
            with open_store(url) as store:
                yield store


# -- where reads, lookups and writes go ---------------------------------------------------------


class CountingBlobStore(MemoryBlobStore):
    """A memory backend that records the digests each ``find_missing_blobs`` was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[set[Digest]] = []

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        self.asked.append(set(digests))
        return super().find_missing_blobs(digests)


@pytest.fixture
def remote() -> Store:
    return Store(CountingBlobStore(), MemoryRefStore(), url="memory://remote")


@pytest.fixture
def cache(tmp_path: Path, remote: Store) -> Iterator[Store]:
    with cache_store(open_store(f"file://{tmp_path / 'local'}"), remote) as store:
        yield store


def test_find_missing_asks_the_remote_only_about_what_local_lacks(
    cache: Store, remote: Store
) -> None:
    local_blob = cache.put_bytes(b"written through the cache")
    remote_blob = remote.put_bytes(b"only on the remote")
    absent = Digest.of_bytes(b"nowhere")
    remote.blobs.asked.clear()  # type: ignore[attr-defined]
    assert cache.find_missing([local_blob, remote_blob, absent]) == {absent}
    assert remote.blobs.asked == [{remote_blob, absent}]  # type: ignore[attr-defined]
    remote.blobs.asked.clear()  # type: ignore[attr-defined]
    assert cache.find_missing([local_blob]) == set()
    assert remote.blobs.asked == [], "the remote was asked about a blob local has"  # type: ignore[attr-defined]
    assert stats_of(cache).remote_lookups == 2


@pytest.mark.parametrize("size", [100, CHUNK_SIZE + 1, LARGE_FILE_SIZE])
@pytest.mark.parametrize("how", ["read_bytes", "open_read", "read_many", "local_path"])
def test_a_read_of_a_remote_blob_fills_local(
    cache: Store, remote: Store, size: int, how: str
) -> None:
    data = random_bytes(size, seed=size)
    digest = remote.put_bytes(data)
    assert local_of(cache).find_missing([digest]) == {digest}
    got = _read(cache, digest, how)
    assert got == data
    assert local_of(cache).read_bytes(digest) == data
    assert stats_of(cache) == CacheStats(hits=0, misses=1, bytes_filled=size, remote_lookups=0)

    # The remote can lose it now: it is read from local.
    remote.blobs.delete_blobs([digest])
    assert remote.find_missing([digest]) == {digest}
    assert _read(cache, digest, how) == data
    assert cache.find_missing([digest]) == set()
    assert stats_of(cache).hits == 1 and stats_of(cache).misses == 1


def _read(store: Store, digest: Digest, how: str) -> bytes:
    if how == "read_bytes":
        return store.read_bytes(digest)
    if how == "open_read":
        with store.open_read(digest) as stream:
            parts = []
            while part := stream.read(65536):
                parts.append(part)
        return b"".join(parts)
    if how == "read_many":
        return dict(store.read_many([digest]))[digest]
    with open(store.blobs.local_path(digest), "rb") as f:
        return f.read()


def test_a_read_from_an_offset_fills_the_whole_blob(cache: Store, remote: Store) -> None:
    data = random_bytes(2 * CHUNK_SIZE + 5, seed=4)
    digest = remote.put_bytes(data)
    with cache.open_read(digest, CHUNK_SIZE + 3) as stream:
        assert stream.read() == data[CHUNK_SIZE + 3 :]
    assert local_of(cache).read_bytes(digest) == data


def test_a_stream_closed_early_leaves_nothing_in_local(cache: Store, remote: Store) -> None:
    data = random_bytes(3 * CHUNK_SIZE, seed=5)
    digest = remote.put_bytes(data)
    with cache.open_read(digest) as stream:
        assert stream.read(1000) == data[:1000]
    assert local_of(cache).find_missing([digest]) == {digest}
    assert cache.read_bytes(digest) == data  # and it is filled by the next complete read
    assert local_of(cache).find_missing([digest]) == set()


def test_a_missing_blob_is_not_found_naming_the_cache(cache: Store) -> None:
    absent = Digest.of_bytes(b"in neither store")
    for read in (cache.read_bytes, lambda d: cache.open_read(d).read(),
                 lambda d: list(cache.read_many([d])), cache.blobs.local_path):
        with pytest.raises(BlobNotFoundError, match="cache") as caught:
            read(absent)
        assert caught.value.digests == (absent,)


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "extended"])
@pytest.mark.parametrize("size", [100, 2 * CHUNK_SIZE + 5])
@pytest.mark.parametrize("how", ["read_bytes", "open_read", "read_many", "local_path", "offset"])
def test_a_corrupt_remote_blob_is_detected_and_not_cached(
    cache: Store, remote: Store, damage: str, size: int, how: str
) -> None:
    data = random_bytes(size, seed=size)
    digest = remote.put_bytes(data)
    middle = size // 2
    remote.blobs.blobs[digest] = (  # type: ignore[attr-defined]
        {
            "flipped-byte": data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :],
            "truncated": data[:-1],
            "extended": data + b"!",
        }[damage],
        0.0,
    )
    with pytest.raises(CorruptBlobError) as caught:
        if how == "offset":
            with cache.open_read(digest, 1) as stream:
                stream.read()
        else:
            _read(cache, digest, how)
    assert caught.value.digest == digest
    assert local_of(cache).find_missing([digest]) == {digest}, "a corrupt blob was cached"
    assert stats_of(cache).bytes_filled == 0


def test_writes_land_in_both_stores(cache: Store, remote: Store) -> None:
    small = cache.put_bytes(b"small")
    large_data = random_bytes(LARGE_FILE_SIZE, seed=7)
    large = cache.put_stream(io.BytesIO(large_data))
    batch = [(Digest.of_bytes(b"one"), b"one"), (Digest.of_bytes(b"two"), b"two")]
    cache.put_many(batch)
    everything = [small, large, *(d for d, _ in batch)]
    assert local_of(cache).find_missing(everything) == set()
    assert remote.find_missing(everything) == set()
    assert remote.read_bytes(large) == large_data
    assert local_of(cache).read_bytes(large) == large_data


@pytest.mark.parametrize("how", ["put_bytes", "put_stream", "put_many"])
def test_a_failing_remote_write_fails_the_write_and_leaves_local_alone(
    cache: Store, remote: Store, how: str
) -> None:
    data = random_bytes(2 * CHUNK_SIZE if how == "put_stream" else 1000, seed=8)
    digest = Digest.of_bytes(data)
    with failing_writes(remote, 0), pytest.raises(InjectedFailure):
        if how == "put_bytes":
            cache.put_bytes(data)
        elif how == "put_stream":
            cache.put_stream(io.BytesIO(data))
        else:
            cache.put_many([(digest, data)])
    assert local_of(cache).find_missing([digest]) == {digest}
    assert cache.find_missing([digest]) == {digest}


class _CommitFails(BlobWriter):
    def __init__(self, inner: BlobWriter) -> None:
        self.inner = inner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(data)

    def commit(self, digest: Digest) -> None:
        raise BackendUnavailableError("the remote went away during the commit")

    def abort(self) -> None:
        self.inner.abort()


def test_a_remote_commit_failure_leaves_local_alone(
    cache: Store, remote: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    begin = remote.blobs.begin_write_for
    monkeypatch.setattr(remote.blobs, "begin_write_for", lambda d: _CommitFails(begin(d)))
    data = random_bytes(2 * CHUNK_SIZE, seed=9)
    digest = Digest.of_bytes(data)
    with pytest.raises(BackendUnavailableError, match="went away"):
        cache.put_stream(io.BytesIO(data), digest)
    assert cache.find_missing([digest]) == {digest}
    assert local_of(cache).find_missing([digest]) == {digest}


def test_large_blobs_stream_through_without_being_held_in_memory(tmp_path: Path) -> None:
    size = 48 << 20
    source = tmp_path / "big.bin"
    with open(source, "wb") as f:
        for index in range(size // CHUNK_SIZE):
            f.write(random_bytes(CHUNK_SIZE, seed=index))
    remote = open_store(f"file://{tmp_path / 'remote'}")
    with cache_store(open_store(f"file://{tmp_path / 'local'}"), remote) as cache:
        tracemalloc.start()
        try:
            written = cache.put_file(source)  # write-through to both
            written_peak = tracemalloc.get_traced_memory()[1]
            local_of(cache).blobs.delete_blobs([written])
            tracemalloc.reset_peak()
            with cache.open_read(written) as stream, open(tmp_path / "out", "wb") as out:
                while chunk := stream.read(CHUNK_SIZE):
                    out.write(chunk)
            read_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert local_of(cache).contains(written), "the read filled local"
    assert Digest.of_bytes((tmp_path / "out").read_bytes()) == written
    assert written_peak < 8 << 20, f"writing held {written_peak} bytes"
    assert read_peak < 8 << 20, f"reading held {read_peak} bytes"


def test_statistics_are_logged_when_the_store_closes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = open_store("memory://remote")
    digest = remote.put_bytes(b"counted")
    with caplog.at_level(logging.INFO, logger="casframe.cache"):
        with cache_store(open_store(f"file://{tmp_path / 'local'}"), remote) as cache:
            cache.read_bytes(digest)
            cache.read_bytes(digest)
            assert str(stats_of(cache)) == (
                "hits: 1, misses: 1, filled: 7 bytes, remote lookups: 0"
            )
    assert [r.getMessage() for r in caplog.records] == [
        f"{cache.blobs.describe()}: hits: 1, misses: 1, filled: 7 bytes, remote lookups: 0"
    ]


def test_concurrent_readers_of_one_missing_blob(cache: Store, remote: Store) -> None:
    data = random_bytes(3 * CHUNK_SIZE, seed=10)
    digest = remote.put_bytes(data)
    results: list[object] = [None] * 6
    start = threading.Barrier(len(results))

    def read(index: int) -> None:
        start.wait()
        try:
            results[index] = cache.read_bytes(digest) if index % 2 else _read(
                cache, digest, "open_read"
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[index] = exc

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [data] * len(results)
    assert local_of(cache).read_bytes(digest) == data


# -- trees and refs -------------------------------------------------------------------------------


def test_checkout_through_the_cache_reads_through_and_then_needs_no_remote(
    tmp_path: Path, cache: Store, remote: Store
) -> None:
    source = write_tree(tmp_path / "source", large=True)
    root = remote.import_directory(source)
    remote.set_ref("ci/deps", root)
    cache.checkout("ci/deps", tmp_path / "linked")  # hardlinks from the local store
    assert_tree_equal(source, tmp_path / "linked")
    first = stats_of(cache)
    assert first.misses > 0 and first.bytes_filled > LARGE_FILE_SIZE
    assert local_of(cache).find_missing(remote.tree_digests(root)) == set()

    remote.blobs.delete_blobs(list(remote.tree_digests(root)))
    cache.checkout(root, tmp_path / "copied", link=False)
    assert_tree_equal(source, tmp_path / "copied")
    assert stats_of(cache).misses == first.misses, "the second checkout went to the remote"


def test_refs_live_on_the_remote(cache: Store, remote: Store, tmp_path: Path) -> None:
    root = cache.import_directory(write_tree(tmp_path / "source"))
    cache.set_ref("project/main", root)
    assert remote.get_ref("project/main") == root
    assert local_of(cache).list_refs() == []
    remote.set_ref("project/other", root)
    assert cache.get_ref("project/other") == root
    assert [r.name for r in cache.list_refs("project/")] == ["project/main", "project/other"]
    cache.delete_ref("project/other")
    assert not remote.has_ref("project/other")


def test_set_ref_sends_the_remote_what_it_lost_from_local(
    cache: Store, remote: Store, tmp_path: Path
) -> None:
    """The remote's own prune may remove a blob local still has: set_ref puts it back."""
    root = cache.import_directory(write_tree(tmp_path / "source"))
    lost = sorted(d for d in remote.tree_digests(root) if d.size)[:3]
    remote.blobs.delete_blobs(lost)
    assert cache.find_missing(lost) == set(), "local answers for them"
    cache.set_ref("project/main", root)
    assert remote.find_missing(remote.tree_digests(root)) == set()
    assert remote.get_ref("project/main") == root


def test_set_ref_refuses_a_tree_that_neither_store_holds_whole(
    cache: Store, remote: Store
) -> None:
    file_digest = cache.put_bytes(b"in both, then in neither")
    root = cache.put_directory(Directory(files=[FileNode(name="f", digest=file_digest.to_proto())]))
    remote.blobs.delete_blobs([file_digest])
    local_of(cache).blobs.delete_blobs([file_digest])
    with pytest.raises(BlobNotFoundError) as caught:
        cache.set_ref("broken", root)
    assert caught.value.digests == (file_digest,)
    assert not remote.has_ref("broken")


def test_a_server_over_the_cache_keeps_action_results_on_the_remote(
    cache: Store, remote: Store
) -> None:
    """Refs to single blobs (action results) are not trees: the blob goes to the remote."""
    result, outputs = _action_result(cache)
    action = Digest.of_bytes(b"an Action message")
    with Server(cache, listen="127.0.0.1:0") as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = re_grpc.ActionCacheStub(channel)
        stub.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=action.to_proto(), action_result=result))
        assert stub.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=action.to_proto())) == result
    stored = remote.get_ref(f"ac/_/{action.hash}/{action.size}")
    assert remote.read_bytes(stored) == result.SerializeToString(deterministic=True)
    assert remote.find_missing(outputs.values()) == set()


def test_a_server_over_the_cache_keeps_remote_asset_directories_on_the_remote(
    cache: Store, remote: Store, tmp_path: Path
) -> None:
    """A Remote Asset directory is a tree ref in the server's own namespace: it goes to the
    remote with its tree, like any tree ref set through the cache."""
    root = cache.import_directory(write_tree(tmp_path / "source"))
    uri = "https://example.com/source.tar.gz"
    with Server(cache, listen="127.0.0.1:0") as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        remote_asset_grpc.PushStub(channel).PushDirectory(remote_asset.PushDirectoryRequest(
            uris=[uri], root_directory_digest=root.to_proto()))
        fetched = remote_asset_grpc.FetchStub(channel).FetchDirectory(
            remote_asset.FetchDirectoryRequest(uris=[uri]))
    assert Digest.from_proto(fetched.root_directory_digest) == root
    assert [r.digest for r in remote.list_refs("asset/directory/")] == [root]
    assert remote.find_missing(remote.tree_digests(root)) == set()


def test_a_blob_ref_sends_its_blob_to_the_remote_when_it_lost_it(
    cache: Store, remote: Store
) -> None:
    digest = cache.put_bytes(b"\xff\xfe not a Directory message")
    remote.blobs.delete_blobs([digest])
    cache.set_ref("asset/blob/key", digest, check_complete=False)
    assert remote.get_ref("asset/blob/key") == digest
    assert remote.read_bytes(digest) == b"\xff\xfe not a Directory message"


def test_maintenance_runs_on_the_local_store_not_on_the_cache(
    cache: Store, remote: Store, tmp_path: Path
) -> None:
    digest = cache.put_bytes(b"evict me from local")
    with pytest.raises(UnsupportedOperationError, match="list/delete"):
        cache.prune(grace_period=0)
    with pytest.raises(UnsupportedOperationError, match="run maintenance on its local store"):
        cache.blobs.delete_blobs([digest])
    report = local_of(cache).prune(grace_period=0)  # evicts the local copies
    assert report.objects_freed == 1
    assert local_of(cache).find_missing([digest]) == {digest}
    assert cache.read_bytes(digest) == b"evict me from local"  # read through again


def test_the_remote_can_be_gone(tmp_path: Path) -> None:
    """Blobs local holds are found and read without the remote; refs need it."""
    with open_store("memory://") as backing:
        server = Server(backing, listen="127.0.0.1:0")
        server.start()
        try:
            url = cache_url(f"file://{tmp_path / 'local'}", f"grpc://127.0.0.1:{server.port}")
            cache = open_store(url)
            source = write_tree(tmp_path / "source")
            root = cache.import_directory(source)
            cache.set_ref("main", root)
        finally:
            server.stop()
        with cache:
            assert cache.find_missing(cache.tree_digests(root)) == set()
            cache.checkout(root, tmp_path / "out", link=False)
            assert_tree_equal(source, tmp_path / "out")
            with pytest.raises(BackendUnavailableError):
                cache.get_ref("main")
            with pytest.raises(BackendUnavailableError):
                cache.put_bytes(b"cannot be written through")
            assert local_of(cache).find_missing([Digest.of_bytes(b"cannot be written through")])


# -- opening ------------------------------------------------------------------------------------


def test_open_by_url_with_percent_encoded_nested_urls(
    tmp_path: Path, s3_server_bucket: S3TestBucket
) -> None:
    # The remote URL has a query of its own (the moto server's endpoint, and a region).
    remote_url = s3_server_bucket.store_url + "&region=us-east-1"
    url = cache_url(f"file://{tmp_path / 'local'}", remote_url)
    with open_store(url) as cache:
        assert cache.url.startswith(f"cache://?local=file://{tmp_path / 'local'}&remote=s3://")
        digest = cache.put_bytes(b"through a nested URL")
        assert s3_server_bucket.keys() == [
            f"{s3_server_bucket.prefix}/{layout.object_key(digest)}"
        ]


def test_open_by_url_with_plain_nested_urls(tmp_path: Path) -> None:
    local, remote = f"file://{tmp_path / 'local'}", f"file://{tmp_path / 'remote'}"
    with open_store(f"cache://?local={local}&remote={remote}") as cache:
        digest = cache.put_bytes(b"plain")
    with open_store(remote) as opened:
        assert opened.read_bytes(digest) == b"plain"


CONFIG = """
default_store = "ci"

[stores.ci]
url = "cache://"
[stores.ci.options]
local = "./local"
remote = "shared"

[stores.shared]
url = "./remote"

[stores.self]
url = "cache://"
options = { local = "self", remote = "./remote" }

[stores.ping]
url = "cache://"
options = { local = "./local", remote = "pong" }

[stores.pong]
url = "cache://"
options = { local = "./other", remote = "ping" }

[stores.twice]
url = "cache://"
options = { local = "shared", remote = "./remote/" }
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("CASFRAME_CONFIG", str(path))
    return path


def test_open_by_config_name(tmp_path: Path, config_file: Path) -> None:
    with open_configured_store("ci") as cache:
        assert local_of(cache).url == f"file://{tmp_path / 'local'}"
        assert remote_of(cache).url == f"file://{tmp_path / 'remote'}"
        digest = cache.put_bytes(b"configured")
    with open_configured_store("shared") as shared:
        assert shared.read_bytes(digest) == b"configured"
    # A URL may name configured stores too.
    with open_store("cache://?local=./other&remote=shared") as cache:
        assert cache.read_bytes(digest) == b"configured"


def test_names_resolve_in_the_configuration_the_cache_came_from(
    tmp_path: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CASFRAME_CONFIG")  # only given explicitly now, like --config
    with open_configured_store("ci", config=load_config(config_file)) as cache:
        assert remote_of(cache).url == f"file://{tmp_path / 'remote'}"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("cache://", "needs a local and a remote store"),
        ("cache://?local=memory://", "needs a remote store"),
        ("cache://?remote=memory://&local=", "needs a local store"),
        ("cache://host?local=memory://a&remote=memory://b", "takes no host or path"),
        ("cache://?local=memory://a&remote=s3://b/p?region=x&endpoint_url=y",
         "unknown cache:// option 'endpoint_url'"),
        ("cache://?local=memory://&remote=memory://", "are the same store (memory://)"),
        ("cache://?local=nosuchstore&remote=memory://", "local='nosuchstore': unknown store"),
    ],
)
def test_bad_cache_urls_are_refused_clearly(url: str, message: str, config_file: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert message in str(caught.value)


def test_one_store_cannot_be_both_local_and_remote() -> None:
    with open_store("memory://") as store, pytest.raises(ConfigError, match="the same store"):
        cache_store(store, store)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("self", "store 'self' leads back to itself through the stores it opens: "
                 "self -> self"),
        ("ping", "store 'ping' leads back to itself through the stores it opens: "
                 "ping -> pong -> ping"),
        ("twice", "are the same store (file://"),
    ],
)
def test_bad_cache_configurations_are_refused_clearly(
    name: str, message: str, config_file: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        open_configured_store(name)
    assert message in str(caught.value)


# -- the command line ---------------------------------------------------------------------------


def _cli(*args: str) -> Result:
    result = CliRunner().invoke(make_cli(), list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def test_cli_import_and_checkout_through_a_cache(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "source")
    remote_url = f"file://{tmp_path / 'remote'}"
    first = cache_url(f"file://{tmp_path / 'runner-1'}", remote_url)
    root = _cli("--store", first, "import", str(source), "--ref", "ci/build").stdout.strip()
    with open_store(remote_url) as remote:
        assert str(remote.get_ref("ci/build")) == root

    # Another runner with an empty local store checks the ref out by reading through.
    second = cache_url(f"file://{tmp_path / 'runner-2'}", remote_url)
    _cli("--store", second, "checkout", "ci/build", str(tmp_path / "out"))
    assert_tree_equal(source, tmp_path / "out")
    with open_store(f"file://{tmp_path / 'runner-2'}") as filled:
        assert filled.find_missing(filled.tree_digests(Digest.parse(root))) == set()


def test_cli_uses_a_cache_named_in_its_config_file(tmp_path: Path) -> None:
    (tmp_path / "casframe.toml").write_text(CONFIG)
    source = write_tree(tmp_path / "source")
    config = str(tmp_path / "casframe.toml")
    root = _cli("--config", config, "--store", "ci", "import", str(source), "--ref", "r")
    _cli("--config", config, "--store", "shared", "checkout", "r", str(tmp_path / "out"))
    assert_tree_equal(source, tmp_path / "out")
    assert root.stdout.strip()


def test_cli_reports_a_bad_cache_url_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_cli(), ["--store", "cache://?local=memory://", "ls", "x"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "casframe: error: cache://?local=memory://: cache:// needs a remote store "
        "(cache://?local=URL&remote=URL; a URL, a configured store name or a path each)"
    ]


def test_an_action_result_reaches_the_remote_with_its_outputs(cache: Store, remote: Store) -> None:
    """Local answers "present" for outputs the remote has pruned since, so no client sends
    them again: the cache must, or other users of the remote get the result without them."""
    result, blobs = _action_result(cache)  # stored through the cache: on both sides
    remote.blobs.delete_blobs(list(blobs.values()))
    assert cache.find_missing(blobs.values()) == set()
    stored = cache.put_bytes(result.SerializeToString(deterministic=True))
    name = f"ac/_/{'ab' * 32}/5"
    cache.set_ref(name, stored, check_complete=False)
    assert remote.find_missing(blobs.values()) == set()
    assert remote.get_ref(name) == stored
