"""The s3:// backend against moto, in-process and over HTTP.

The conformance suite runs twice (in-process moto, moto's server); the tests after it cover
what only S3 has: URL options, the layout shared with file://, interchange with sync tools,
multipart uploads with bounded memory, and the errors a user meets (unknown bucket, unreachable
endpoint, missing credentials, access denied, throttling, partial deletes).
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from casframe import (
    BackendUnavailableError,
    CasframeError,
    ConfigError,
    CorruptBlobError,
    Digest,
    DigestFunction,
    DigestMismatchError,
    InvalidDigestError,
    PermissionDeniedError,
    Store,
    layout,
    open_store,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    FileNode,
)
from casframe.digest import Hasher
from casframe.testing import assert_tree_equal, random_bytes
from casframe.testing.conformance import StoreConformance
from casframe.testing.s3 import MotoServer, S3TestBucket
from casframe.tree import missing_in_tree

MiB = 1 << 20


def object_key(bucket: S3TestBucket, digest: Digest) -> str:
    return f"{bucket.prefix}/{layout.object_key(digest)}"


# -- conformance ------------------------------------------------------------------------------


class _S3Conformance(StoreConformance):
    mtime_resolution = 1.0  # LastModified has one-second steps

    def corrupt_blob(self, store: Store, digest: Digest, data: bytes) -> None:
        options = store.blobs.options  # type: ignore[attr-defined]
        store.blobs.client.put_object(  # type: ignore[attr-defined]
            Bucket=options.bucket,
            Key=options.key_prefix + layout.object_key(digest),
            Body=data,
        )


class TestS3InProcessConformance(_S3Conformance):
    digest_functions = ("sha256", "sha512")  # keys of 128 hex digits, listed and pruned

    @pytest.fixture
    def store(self, s3_store: Store) -> Store:
        return s3_store


class TestS3ServerConformance(_S3Conformance):
    digest_functions = ("sha256", "blake3")

    @pytest.fixture
    def store(self, s3_server_store: Store) -> Store:
        return s3_server_store


# -- URL and options --------------------------------------------------------------------------


def test_url_options_reach_boto3(s3_mock: S3TestBucket) -> None:
    url = (
        f"s3://{s3_mock.name}/deep/prefix/?region=us-east-1&addressing_style=path"
        "&max_concurrency=7&multipart_threshold=16MiB&multipart_chunksize=6M&retry_mode=adaptive"
        "&max_attempts=3&connect_timeout=2.5&request_checksum_calculation=when_supported"
        "&payload_signing=yes"
    )
    with open_store(url) as store:
        assert store.url == f"s3://{s3_mock.name}/deep/prefix"
        assert store.blobs.limits.max_concurrency == 7
        options = store.blobs.options  # type: ignore[attr-defined]
        assert (options.multipart_threshold, options.multipart_chunksize) == (16 * MiB, 6 * MiB)
        config = store.blobs.client.meta.config  # type: ignore[attr-defined]
        assert config.retries == {"mode": "adaptive", "total_max_attempts": 3}
        assert config.s3["addressing_style"] == "path"
        assert config.connect_timeout == 2.5
        assert config.max_pool_connections >= 7
        assert config.request_checksum_calculation == "when_supported"
        assert config.response_checksum_validation == "when_required"
        assert config.s3["payload_signing_enabled"] is True
        digest = store.put_bytes(b"under a deep prefix")
    assert f"deep/prefix/objects/{digest.hash[:2]}/{digest.hash[2:]}" in s3_mock.keys()


def test_options_from_the_config_file_are_used(s3_mock: S3TestBucket) -> None:
    with open_store(s3_mock.store_url, {"max_concurrency": 3, "retry_mode": "adaptive"}) as store:
        assert store.blobs.limits.max_concurrency == 3
        # The URL's query wins over the config file.
    with open_store(s3_mock.store_url + "?max_concurrency=5", {"max_concurrency": 3}) as store:
        assert store.blobs.limits.max_concurrency == 5


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3:///prefix", "needs a bucket"),
        ("s3://bucket/a//b", "empty, '.' or '..' segment"),
        ("s3://user:secret@bucket/p", "no credentials"),
        (
            "s3://bucket/p?endpoint=http://x",
            r"unknown option\(s\) endpoint for .*accept: .*endpoint_url",
        ),
        ("s3://bucket/p?retry_mode=sometimes", "retry_mode='sometimes'.*one of: standard"),
        ("s3://bucket/p?max_concurrency=0", "max_concurrency='0'"),
        ("s3://bucket/p?multipart_chunksize=1MiB", "at least 5242880 bytes"),
        ("s3://bucket/p?multipart_threshold=lots", "not a size"),
        ("s3://bucket/p?endpoint_url=localhost:9000", "must start with http"),
        ("s3://bucket/p?addressing_style=sideways", "addressing_style"),
        ("s3://bucket/p?payload_signing=maybe", "payload_signing='maybe'.*not a boolean"),
        ("s3://bucket/p?read_timeout=nan", "read_timeout='nan'.*finite number of at least"),
        ("s3://bucket/p?read_timeout=inf", "read_timeout='inf'.*finite number of at least"),
        ("s3://bucket/p?connect_timeout=-inf", "connect_timeout='-inf'.*finite number"),
        ("s3://bucket/p?connect_timeout=NaN", "connect_timeout='NaN'.*finite number"),
        ("s3://bucket/p?connect_timeout=0", "connect_timeout='0'.*at least 0.001"),
    ],
)
def test_bad_urls_are_config_errors(s3_mock: S3TestBucket, url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(url)


def test_unknown_profile_is_a_config_error(s3_mock: S3TestBucket) -> None:
    with pytest.raises(ConfigError, match="AWS profile 'nobody'.*not defined"):
        open_store(f"{s3_mock.store_url}?profile=nobody")


# -- layout and interchange with file:// --------------------------------------------------------


def test_layout_is_that_of_file_stores(s3_mock: S3TestBucket, s3_store: Store) -> None:
    big = s3_store.put_stream(io.BytesIO(random_bytes(2 * MiB + 1)))
    tree = s3_store.put_directory(Directory(files=[FileNode(name="f", digest=big.to_proto())]))
    s3_store.set_ref("project/main", tree)
    assert s3_mock.keys() == sorted(
        [object_key(s3_mock, tree), object_key(s3_mock, big), "store/refs/heads/project/main"]
    )
    assert object_key(s3_mock, big) == f"store/objects/{big.hash[:2]}/{big.hash[2:]}"
    ref = s3_mock.client.get_object(Bucket=s3_mock.name, Key="store/refs/heads/project/main")
    assert ref["Body"].read() == tree.serialize()


def _upload_tree(client: Any, bucket: str, root: Path, prefix: str) -> None:
    """What `aws s3 sync ROOT s3://BUCKET/PREFIX` does, with boto3."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            client.upload_file(str(path), bucket, key)


def _download_tree(client: Any, bucket: str, prefix: str, root: Path) -> None:
    """What `aws s3 sync s3://BUCKET/PREFIX ROOT` does, with boto3."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            path = root / item["Key"][len(prefix) + 1 :]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(path))


def test_a_synced_local_store_opens_as_s3_and_back(
    s3_mock: S3TestBucket, make_tree: Any, tmp_path: Path
) -> None:
    source = make_tree("source", large=True)
    with open_store(f"file://{tmp_path / 'local'}") as local:
        local.set_ref("project/main", local.import_directory(source))
    _upload_tree(s3_mock.client, s3_mock.name, tmp_path / "local", "synced")

    with open_store(f"s3://{s3_mock.name}/synced") as s3:
        s3.checkout("project/main", tmp_path / "from-s3")
        assert_tree_equal(source, tmp_path / "from-s3")
        assert [r.name for r in s3.list_refs()] == ["project/main"]
        s3.set_ref("project/copy", s3.get_ref("project/main"))

    _download_tree(s3_mock.client, s3_mock.name, "synced", tmp_path / "back")
    with open_store(f"file://{tmp_path / 'back'}") as back:
        back.checkout("project/copy", tmp_path / "from-back")
        assert_tree_equal(source, tmp_path / "from-back")


def test_aws_cli_sync_both_ways(
    aws_cli: str, s3_server_bucket: S3TestBucket, make_tree: Any, tmp_path: Path
) -> None:
    source = make_tree("source")
    with open_store(f"file://{tmp_path / 'local'}") as local:
        local.set_ref("main", local.import_directory(source))
    endpoint = ["--endpoint-url", str(s3_server_bucket.endpoint_url)]
    target = f"s3://{s3_server_bucket.name}/synced"

    def aws(*args: str) -> None:
        subprocess.run(
            [aws_cli, "s3", "sync", "--only-show-errors", *args, *endpoint], check=True, timeout=120
        )

    aws(str(tmp_path / "local"), target)
    url = f"{target}?endpoint_url={s3_server_bucket.endpoint_url}"
    with open_store(url) as s3:
        s3.checkout("main", tmp_path / "from-s3")
        s3.set_ref("copied", s3.get_ref("main"))
    assert_tree_equal(source, tmp_path / "from-s3")
    aws(target, str(tmp_path / "back"))
    with open_store(f"file://{tmp_path / 'back'}") as back:
        back.checkout("copied", tmp_path / "from-back")
    assert_tree_equal(source, tmp_path / "from-back")


def test_transfer_file_to_s3_to_file(s3_store: Store, make_tree: Any, tmp_path: Path) -> None:
    source = make_tree("source", large=True)
    with (
        open_store(f"file://{tmp_path / 'one'}") as one,
        open_store(f"file://{tmp_path / 'two'}") as two,
    ):
        root = one.import_directory(source)
        one.set_ref("release/1", root)
        pushed = one.push(s3_store, "release/1")
        assert pushed.blobs_sent == pushed.blobs_total
        assert s3_store.get_ref("release/1") == root
        assert one.push(s3_store, "release/1").already_present
        pulled = two.pull(s3_store, "release/1")
        assert pulled.root == root
        two.checkout("release/1", tmp_path / "checkout")
    assert_tree_equal(source, tmp_path / "checkout")


# -- large blobs ------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from casframe import Digest, open_store

    url, path = sys.argv[1], sys.argv[2]
    with open_store(url) as store:
        digest = store.put_file(path)
        assert digest == Digest.of_file(path), digest
        with store.open_read(digest) as stream:   # verified while it streams
            read_back = Digest.of_stream(stream)
        assert read_back == digest
        with store.open_read(digest, digest.size - 10) as stream:
            with open(path, "rb") as f:
                f.seek(-10, 2)
                assert stream.read() == f.read()
    with open("/proc/self/status") as status:  # this program's own peak, not its parent's
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(digest, peak_kib)
    """
)


def test_large_blob_is_a_multipart_upload_with_bounded_memory(
    s3_server_bucket: S3TestBucket, tmp_path: Path
) -> None:
    size = 40 * MiB + 123
    path = tmp_path / "large.bin"
    with open(path, "wb") as f:
        for i in range(41):
            f.write(random_bytes(min(MiB, size - i * MiB), seed=i))
    url = f"{s3_server_bucket.store_url}&multipart_threshold=8MiB&multipart_chunksize=8MiB"
    # ru_maxrss of a child counts its parent's memory up to exec (pytest and moto's server
    # here), so the child reports its own high-water mark.
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, url, str(path)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr
    text, peak_kib = child.stdout.split()
    peak_mib = int(peak_kib) / 1024
    assert peak_mib < 100, f"peak RSS {peak_mib:.0f} MiB"
    digest = Digest.parse(text)
    head = s3_server_bucket.client.head_object(
        Bucket=s3_server_bucket.name, Key=object_key(s3_server_bucket, digest)
    )
    assert head["ContentLength"] == size
    assert head["ETag"].strip('"').endswith("-6"), "uploaded in 6 parts of 8 MiB"
    multipart = s3_server_bucket.client.list_multipart_uploads(Bucket=s3_server_bucket.name)
    assert not multipart.get("Uploads"), "no unfinished multipart upload is left behind"


@pytest.mark.parametrize("size", [100, 2 * MiB, 9 * MiB])
def test_upload_with_a_wrong_digest_leaves_no_object(s3_mock: S3TestBucket, size: int) -> None:
    with open_store(f"{s3_mock.store_url}?multipart_threshold=8MiB") as store:
        data = random_bytes(size, seed=3)
        claimed = Digest.of_bytes(data[:-1] + b"?")
        with pytest.raises(DigestMismatchError):
            store.put_stream(io.BytesIO(data), claimed)
        assert s3_mock.keys() == []
        uploads = s3_mock.client.list_multipart_uploads(Bucket=s3_mock.name)
        assert not uploads.get("Uploads")


def _tamper_with_ranges(store: Store, replace: str | None) -> None:
    """Make GetObject requests arrive with their Range header removed (``replace=None``, a
    server that ignores Range) or replaced."""

    def tamper(request: Any, **_: Any) -> None:
        if "Range" in request.headers:
            del request.headers["Range"]
            if replace is not None:
                request.headers["Range"] = replace

    store.blobs.client.meta.events.register(  # type: ignore[attr-defined]
        "before-sign.s3.GetObject", tamper
    )


def test_reading_from_an_offset_when_the_server_ignores_range(s3_store: Store) -> None:
    data = random_bytes(3 * MiB + 5, seed=10)
    digest = s3_store.put_stream(io.BytesIO(data))
    _tamper_with_ranges(s3_store, None)
    for offset in (1000, 2 * MiB + 3, digest.size - 1):
        with s3_store.open_read(digest, offset) as stream:
            assert stream.read(10) == data[offset : offset + 10]
            assert stream.read() == data[offset + 10 :]


def test_a_range_other_than_asked_for_is_an_error(s3_store: Store) -> None:
    data = random_bytes(2000, seed=11)
    digest = s3_store.put_bytes(data)
    _tamper_with_ranges(s3_store, "bytes=5-")
    with pytest.raises(CasframeError, match=r"from byte 1000: S3 answered Content-Range"):
        s3_store.open_read(digest, 1000)
    assert s3_store.read_bytes(digest) == data  # whole reads send no Range


def test_writers_of_the_same_blob_upload_it_once(s3_mock: S3TestBucket, s3_store: Store) -> None:
    import threading

    data = random_bytes(3 * MiB, seed=9)
    puts = []

    def put_slowly(**_: Any) -> None:
        puts.append(1)
        if len(puts) == 1:
            time.sleep(1.0)  # the others arrive while the first upload is surely in flight

    s3_store.blobs.client.meta.events.register(  # type: ignore[attr-defined]
        "before-call.s3.PutObject", put_slowly
    )
    barrier = threading.Barrier(4)

    def write() -> None:
        barrier.wait()
        s3_store.put_bytes(data)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert s3_store.read_bytes(Digest.of_bytes(data)) == data
    assert len(puts) == 1


# -- find_missing, listing, delete ------------------------------------------------------------


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """LIST pages of 40 keys (instead of 1,000), so a few hundred blobs make a "large" store."""
    import casframe_s3.bucket as s3_module

    original = s3_module._Bucket.list_pages
    monkeypatch.setattr(
        s3_module._Bucket, "list_pages", lambda self, **kw: original(self, MaxKeys=40, **kw)
    )


def _count_calls(store: Store) -> dict[str, int]:
    """Requests per S3 operation from now on. The store's worker threads send them at once,
    so the count is taken under a lock: an unguarded ``+= 1`` loses some."""
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def count(event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[1]
        with lock:
            calls[operation] = calls.get(operation, 0) + 1

    store.blobs.client.meta.events.register("before-call.s3", count)  # type: ignore[attr-defined]
    return calls


def test_find_missing_in_a_small_store_is_one_listing(s3_store: Store) -> None:
    stored = [s3_store.put_bytes(b"stored %d" % i) for i in range(60)]
    absent = [Digest.of_bytes(b"absent %d" % i) for i in range(3000)]
    wrong = [Digest(d.hash, d.size + 1) for d in stored[:20]]
    calls = _count_calls(s3_store)
    assert s3_store.find_missing(stored + absent + wrong) == set(absent) | set(wrong)
    assert calls == {"ListObjectsV2": 1}


def test_find_missing_of_thousands_lists_fanout_folders(s3_store: Store, small_pages: None) -> None:
    stored = [Digest.of_bytes(b"s%d" % i) for i in range(200)]
    s3_store.put_many([(d, b"s%d" % i) for i, d in enumerate(stored)])
    absent = [Digest.of_bytes(b"absent %d" % i) for i in range(3000)]
    wrong = [Digest(d.hash, d.size + 1) for d in stored[:20]]
    calls = _count_calls(s3_store)
    assert s3_store.find_missing(stored + absent + wrong) == set(absent) | set(wrong)
    # One probe, then about one page per fan-out folder; no digest asked about alone.
    assert 256 <= calls["ListObjectsV2"] <= 300
    assert calls.get("HeadObject", 0) == 0


def test_find_missing_in_a_full_folder_falls_back_to_asking(
    s3_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import casframe_s3.bucket as s3_module

    # Pages of 2 keys make every folder "full": listing it would cost more than asking.
    stored = [s3_store.put_bytes(b"full %d" % i) for i in range(120)]
    absent = [Digest.of_bytes(b"gone %d" % i) for i in range(1000)]
    original = s3_module._Bucket.list_pages
    monkeypatch.setattr(
        s3_module._Bucket, "list_pages", lambda self, **kw: original(self, MaxKeys=2, **kw)
    )
    calls = _count_calls(s3_store)
    assert s3_store.find_missing(stored + absent) == set(absent)
    assert calls["HeadObject"] > 0


def test_iter_blobs_over_many_pages(
    s3_mock: S3TestBucket, s3_store: Store, small_pages: None
) -> None:
    blobs = {Digest.of_bytes(b"%d" % i): b"%d" % i for i in range(300)}
    s3_store.put_many(list(blobs.items()))
    s3_mock.client.put_object(Bucket=s3_mock.name, Key="store/objects/README", Body=b"stray")
    before = time.time()
    listed = {info.digest: info.mtime for info in s3_store.blobs.iter_blobs()}
    assert listed.keys() == blobs.keys()
    assert all(abs(mtime - before) < 600 for mtime in listed.values())


def test_partial_delete_failures_are_reported(s3_store: Store) -> None:
    keep, drop = s3_store.put_bytes(b"protected"), s3_store.put_bytes(b"deletable")
    locked_key = f"store/{layout.object_key(keep)}"

    def refuse_one(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Errors"] = [{"Key": locked_key, "Code": "AccessDenied", "Message": "Locked"}]

    s3_store.blobs.client.meta.events.register(  # type: ignore[attr-defined]
        "after-call.s3.DeleteObjects", refuse_one
    )
    with pytest.raises(PermissionDeniedError, match=f"could not delete 1 of 2 blobs.*{locked_key}"):
        s3_store.blobs.delete_blobs([keep, drop])


# -- refs -------------------------------------------------------------------------------------


def test_ref_access_time_lives_in_metadata(s3_mock: S3TestBucket, s3_store: Store) -> None:
    digest = s3_store.put_directory(Directory())
    s3_store.set_ref("a", digest)
    key = "store/refs/heads/a"
    first = float(s3_mock.client.head_object(Bucket=s3_mock.name, Key=key)["Metadata"]["accessed"])
    time.sleep(0.01)
    s3_store.get_ref("a")
    second = float(s3_mock.client.head_object(Bucket=s3_mock.name, Key=key)["Metadata"]["accessed"])
    assert second > first
    assert s3_store.list_refs()[0].accessed == second
    # A ref written by another tool has no metadata: LastModified stands in.
    s3_mock.client.put_object(
        Bucket=s3_mock.name, Key="store/refs/heads/b", Body=digest.serialize()
    )
    assert {r.name for r in s3_store.list_refs()} == {"a", "b"}


def test_a_damaged_ref_stops_prune(s3_mock: S3TestBucket, s3_store: Store) -> None:
    tree = s3_store.put_directory(Directory(files=[
        FileNode(name="f", digest=s3_store.put_bytes(b"kept by a damaged ref").to_proto())
    ]))
    s3_store.set_ref("keep", tree)
    # A console's "folder" marker is no ref and is passed over.
    s3_mock.client.put_object(Bucket=s3_mock.name, Key="store/refs/heads/dir/", Body=b"")
    assert [r.name for r in s3_store.list_refs()] == ["keep"]
    s3_mock.client.put_object(Bucket=s3_mock.name, Key="store/refs/heads/keep", Body=b"")
    with pytest.raises(InvalidDigestError, match="ref keep in s3://.* is damaged"):
        s3_store.list_refs()
    with pytest.raises(InvalidDigestError, match="ref keep"):
        s3_store.prune(grace_period=0)
    assert not missing_in_tree(s3_store.verified, tree)


def test_reading_refs_with_read_only_credentials(
    s3_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    digest = s3_store.put_directory(Directory())
    s3_store.set_ref("main", digest)
    _inject(s3_store, "CopyObject", 403, "AccessDenied", times=10)
    with caplog.at_level(logging.WARNING):
        assert s3_store.get_ref("main") == digest
        assert s3_store.get_ref("main") == digest
    assert sum("read-only" in r.message for r in caplog.records) == 1


# -- errors -----------------------------------------------------------------------------------


class _RawBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body


def _inject(store: Store, operation: str, status: int, code: str, times: int) -> list[int]:
    """Answer the next ``times`` calls of ``operation`` with an S3 error, before they are sent."""
    from botocore.awsrequest import AWSResponse

    sent: list[int] = []
    body = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
        f"<Message>injected {code}</Message></Error>"
    ).encode()

    def respond(request: Any, **_: Any) -> Any:
        sent.append(1)
        if len(sent) <= times:
            return AWSResponse(
                request.url, status, {"Content-Type": "application/xml"}, _RawBody(body)
            )
        return None

    store.blobs.client.meta.events.register_first(  # type: ignore[attr-defined]
        f"before-send.s3.{operation}", respond
    )
    return sent


def test_throttling_is_survived_by_retries(s3_server_store: Store) -> None:
    sent = _inject(s3_server_store, "PutObject", 503, "SlowDown", times=2)
    digest = s3_server_store.put_bytes(b"after two SlowDowns")
    assert len(sent) == 3
    assert s3_server_store.read_bytes(digest) == b"after two SlowDowns"


def test_throttling_beyond_the_retries_is_a_temporary_error(s3_server_bucket: S3TestBucket) -> None:
    with open_store(f"{s3_server_bucket.store_url}&max_attempts=2") as store:
        _inject(store, "PutObject", 503, "SlowDown", times=5)
        with pytest.raises(BackendUnavailableError, match="SlowDown after 2 attempts") as caught:
            store.put_bytes(b"never stored")
        assert caught.value.temporary


def test_access_denied_names_bucket_and_key(s3_server_store: Store) -> None:
    digest = s3_server_store.put_bytes(b"secret")
    _inject(s3_server_store, "GetObject", 403, "AccessDenied", times=1)
    with pytest.raises(PermissionDeniedError) as caught:
        s3_server_store.read_bytes(digest)
    message = str(caught.value)
    assert "access denied" in message and "AccessDenied" in message
    assert f"objects/{digest.hash[:2]}/{digest.hash[2:]}" in message
    assert "casframe-test-" in message  # the bucket


def test_unknown_bucket(s3_server_bucket: S3TestBucket) -> None:
    url = f"s3://no-such-bucket/p?endpoint_url={s3_server_bucket.endpoint_url}"
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert str(caught.value) == (
        f"bucket 'no-such-bucket' does not exist (endpoint {s3_server_bucket.endpoint_url})"
    )


def test_unreachable_endpoint(fake_aws_credentials: None) -> None:
    import socket

    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        endpoint = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as caught:
            open_store(f"s3://bucket/p?endpoint_url={endpoint}&max_attempts=2&connect_timeout=2")
        assert time.monotonic() - started < 30
    message = str(caught.value)
    assert f"S3 endpoint {endpoint} is unreachable" in message
    assert "s3://bucket/p" in message
    assert caught.value.temporary


def test_missing_credentials(
    s3_server_bucket: S3TestBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    with pytest.raises(PermissionDeniedError) as caught:
        open_store(s3_server_bucket.store_url)
    message = str(caught.value)
    assert f"no AWS credentials to open the store in bucket '{s3_server_bucket.name}'" in message
    assert "AWS_ACCESS_KEY_ID" in message and "~/.aws/credentials" in message


def test_fixture_module_is_cheap_to_import() -> None:
    code = (
        "import sys, casframe.testing.s3\n"
        "sys.exit(any(m in sys.modules for m in ('boto3', 'moto')))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_moto_server_fixture_gives_a_loopback_endpoint(moto_server: MotoServer) -> None:
    assert moto_server.endpoint_url.startswith("http://127.0.0.1:")


# -- uploads whose digest is announced (BlobStore.begin_write_for) -----------------------------


def _put_announced(store: Store, data: bytes, claimed: Digest, calls: list[str]) -> None:
    """What the core does with a known digest: write in 1 MiB chunks, commit only if it matches."""
    writer = store.blobs.begin_write_for(claimed)  # type: ignore[attr-defined]
    try:
        for start in range(0, len(data), MiB):
            writer.write(data[start : start + MiB])
        calls.append("before-commit")
        actual = Digest.of_bytes(data)
        if actual != claimed:
            raise DigestMismatchError(claimed, actual)
        writer.commit(actual)
    except BaseException:
        writer.abort()
        raise


def _record_calls(store: Store) -> list[str]:
    calls: list[str] = []
    store.blobs.client.meta.events.register(  # type: ignore[attr-defined]
        "before-call.s3", lambda event_name, **_: calls.append(event_name.rsplit(".", 1)[1])
    )
    return calls


def test_announced_upload_sends_parts_while_the_content_arrives(
    s3_mock: S3TestBucket,
) -> None:
    with open_store(f"{s3_mock.store_url}?multipart_threshold=8MiB") as store:
        data = random_bytes(20 * MiB + 5, seed=21)
        digest = Digest.of_bytes(data)
        calls = _record_calls(store)
        writer = store.blobs.begin_write_for(digest)  # type: ignore[attr-defined]
        for start in range(0, len(data), MiB):
            writer.write(data[start : start + MiB])
        deadline = time.monotonic() + 30
        while calls.count("UploadPart") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The size is known, so the last part goes out as soon as it is complete too.
        assert calls.count("UploadPart") == 3, "every part goes out before commit"
        assert "CompleteMultipartUpload" not in calls
        assert s3_mock.keys() == [], "nothing is visible before commit"
        writer.commit(digest)
        assert calls.count("UploadPart") == 3 and calls[-1] == "CompleteMultipartUpload"
        assert store.read_bytes(digest) == data
        head = s3_mock.client.head_object(Bucket=s3_mock.name, Key=object_key(s3_mock, digest))
        assert head["ETag"].strip('"').endswith("-3")

        # Announced again: it is already stored, so nothing is sent; the object is only
        # freshened (a server-side copy onto itself), renewing prune's grace period.
        calls.clear()
        _put_announced(store, data, digest, calls)
        assert calls == ["HeadObject", "before-commit", "CopyObject"]


def test_announced_upload_with_other_content_leaves_nothing(s3_mock: S3TestBucket) -> None:
    with open_store(f"{s3_mock.store_url}?multipart_threshold=8MiB") as store:
        data = random_bytes(20 * MiB, seed=22)
        claimed = Digest(Digest.of_bytes(b"something else").hash, len(data))
        calls = _record_calls(store)
        with pytest.raises(DigestMismatchError):
            _put_announced(store, data, claimed, calls)
        assert "UploadPart" in calls and "AbortMultipartUpload" in calls
        assert s3_mock.keys() == []
        assert not s3_mock.client.list_multipart_uploads(Bucket=s3_mock.name).get("Uploads")


def test_announced_small_upload_is_one_put(s3_mock: S3TestBucket, s3_store: Store) -> None:
    data = random_bytes(3 * MiB, seed=23)
    calls = _record_calls(s3_store)
    _put_announced(s3_store, data, Digest.of_bytes(data), calls)
    assert calls == ["before-commit", "PutObject"]
    assert s3_store.read_bytes(Digest.of_bytes(data)) == data


# -- large uploads with a known digest: straight to the key, no spool file -----------------------


@pytest.fixture
def no_spool_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every temporary file made through ``tempfile.mkstemp`` (the S3 writer's spool)."""
    import tempfile

    made: list[str] = []
    original = tempfile.mkstemp

    def recording(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, path = original(*args, **kwargs)
        made.append(path)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", recording)
    return made


def _write_file(path: Path, size: int, seed: int) -> Digest:
    hasher = Hasher()
    with open(path, "wb") as f:
        for start in range(0, size, MiB):
            chunk = random_bytes(min(MiB, size - start), seed=seed + start)
            hasher.update(chunk)
            f.write(chunk)
    return hasher.digest()


def _unfinished_uploads(bucket: S3TestBucket) -> list[Any]:
    return list(bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []))


def test_put_file_hashes_then_streams_to_the_key_without_a_spool_file(
    s3_server_bucket: S3TestBucket, tmp_path: Path, no_spool_files: list[str]
) -> None:
    path = tmp_path / "large.bin"
    digest = _write_file(path, 20 * MiB + 7, seed=31)
    with open_store(s3_server_bucket.store_url) as store:
        calls = _record_calls(store)
        assert store.put_file(path) == digest
        assert calls == [
            "HeadObject",
            "CreateMultipartUpload",
            "UploadPart",
            "UploadPart",
            "UploadPart",
            "CompleteMultipartUpload",
        ]
        assert store.read_bytes(digest) == path.read_bytes()
    assert no_spool_files == []
    assert _unfinished_uploads(s3_server_bucket) == []


def test_push_of_a_large_blob_streams_without_a_spool_file(
    s3_server_bucket: S3TestBucket, tmp_path: Path, no_spool_files: list[str]
) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    digest = _write_file(source / "large.bin", 17 * MiB, seed=32)
    with (
        open_store(f"file://{tmp_path / 'local'}") as local,
        open_store(s3_server_bucket.store_url) as s3,
    ):
        local.set_ref("big", local.import_directory(source))
        calls = _record_calls(s3)
        local.push(s3, "big")
        assert calls.count("UploadPart") == 3 and calls.count("CompleteMultipartUpload") == 1
        assert s3.read_bytes(digest) == (source / "large.bin").read_bytes()
    assert no_spool_files == []


def test_wrong_content_for_a_declared_digest_is_aborted_without_a_trace(
    s3_server_bucket: S3TestBucket, no_spool_files: list[str]
) -> None:
    data = random_bytes(20 * MiB, seed=33)
    same_size = Digest(Digest.of_bytes(b"other").hash, len(data))
    shorter = Digest.of_bytes(data + b"more")  # the content ends before its declared size
    longer = Digest.of_bytes(data[: 18 * MiB])  # the content goes on past its declared size
    with open_store(s3_server_bucket.store_url) as store:
        calls = _record_calls(store)
        for claimed in (same_size, shorter, longer):
            calls.clear()
            with pytest.raises(DigestMismatchError) as caught:
                store.put_stream(io.BytesIO(data), claimed)
            assert caught.value.expected == claimed
            assert calls.count("UploadPart") >= 2, "parts went out while the content arrived"
            assert "CompleteMultipartUpload" not in calls
            assert calls[-1] == "AbortMultipartUpload"
            assert s3_server_bucket.keys() == []
            assert _unfinished_uploads(s3_server_bucket) == []
    assert no_spool_files == []


def test_a_file_that_changes_after_hashing_is_stored_as_read(
    s3_server_bucket: S3TestBucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "changing.bin"
    first = _write_file(path, 12 * MiB, seed=34)
    hash_stream = Digest.of_stream

    def hash_then_change(stream: Any, function: DigestFunction) -> Digest:
        digest = hash_stream(stream, function)
        _write_file(path, 12 * MiB, seed=35)  # same size, other content, same inode
        return digest

    monkeypatch.setattr(Digest, "of_stream", staticmethod(hash_then_change))
    with open_store(s3_server_bucket.store_url) as store:
        stored = store.put_file(path)
    monkeypatch.undo()
    assert stored != first and stored == Digest.of_file(path)
    assert s3_server_bucket.keys() == [object_key(s3_server_bucket, stored)]
    assert _unfinished_uploads(s3_server_bucket) == []


def test_present_large_blobs_are_not_uploaded_again(
    s3_server_bucket: S3TestBucket, tmp_path: Path
) -> None:
    path = tmp_path / "large.bin"
    digest = _write_file(path, 9 * MiB, seed=36)
    with open_store(s3_server_bucket.store_url) as store:
        store.put_file(path)
        calls = _record_calls(store)
        assert store.put_file(path) == digest
        assert store.put_stream(io.BytesIO(path.read_bytes()), digest) == digest
        # One existence check and a freshening server-side copy each; no content is sent.
        assert calls == ["HeadObject", "CopyObject", "HeadObject", "CopyObject"]


def test_announced_upload_of_a_blob_pruned_meanwhile_is_not_a_success(
    s3_mock: S3TestBucket,
) -> None:
    with open_store(f"{s3_mock.store_url}?multipart_threshold=2MiB") as store:
        data = random_bytes(3 * MiB, seed=37)
        digest = store.put_stream(io.BytesIO(data))
        calls = _record_calls(store)
        writer = store.blobs.begin_write_for(digest)  # type: ignore[attr-defined]
        for start in range(0, len(data), MiB):
            writer.write(data[start : start + MiB])
        # A prune deletes the old, unreferenced object while the content is still arriving.
        s3_mock.client.delete_object(Bucket=s3_mock.name, Key=object_key(s3_mock, digest))
        with pytest.raises(BackendUnavailableError, match="deleted .* store it again") as caught:
            writer.commit(digest)
        assert caught.value.temporary
        assert calls == ["HeadObject", "CopyObject"], "the content was not sent"
        # Storing it again does send it.
        assert store.put_stream(io.BytesIO(data), digest) == digest
        assert store.read_bytes(digest) == data


def test_spooled_upload_of_a_blob_pruned_meanwhile_is_uploaded_after_all(
    s3_mock: S3TestBucket,
) -> None:
    with open_store(f"{s3_mock.store_url}?multipart_threshold=2MiB") as store:
        data = random_bytes(3 * MiB, seed=38)
        digest = store.put_stream(io.BytesIO(data))

        calls = _record_calls(store)

        def prune(**_: Any) -> None:  # between the writer's HEAD and its freshening copy
            if calls == ["HeadObject"]:
                s3_mock.client.delete_object(Bucket=s3_mock.name, Key=object_key(s3_mock, digest))

        store.blobs.client.meta.events.register(  # type: ignore[attr-defined]
            "after-call.s3.HeadObject", prune
        )
        assert store.put_stream(io.BytesIO(data)) == digest  # digest unknown: spooled
        assert calls[:3] == ["HeadObject", "CopyObject", "CreateMultipartUpload"], "then sent"
        assert store.contains(digest)
        assert store.read_bytes(digest) == data


def test_touch_reports_the_absent_blobs(s3_store: Store) -> None:
    present = s3_store.put_bytes(b"present")
    absent = Digest.of_bytes(b"absent")
    assert s3_store.blobs.touch_blobs([present, absent, absent]) == [absent]


def test_parts_in_flight_are_bounded_across_concurrent_uploads(
    s3_server_bucket: S3TestBucket,
) -> None:
    import threading

    import casframe_s3.bucket as s3_module

    blobs = [random_bytes(24 * MiB, seed=40 + i) for i in range(3)]
    with open_store(s3_server_bucket.store_url) as store:
        limit = s3_module.PARTS_IN_FLIGHT_BYTES // (8 * MiB)
        client = store.blobs.client  # type: ignore[attr-defined]
        lock = threading.Lock()
        in_flight = [0, 0]  # now, highest

        def started(**_: Any) -> None:
            with lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight)

        def ended(**_: Any) -> None:
            with lock:
                in_flight[0] -= 1

        client.meta.events.register("before-call.s3.UploadPart", started)
        client.meta.events.register("after-call.s3.UploadPart", ended)
        threads = [
            threading.Thread(target=store.put_stream, args=(io.BytesIO(b), Digest.of_bytes(b)))
            for b in blobs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for data in blobs:
            assert store.read_bytes(Digest.of_bytes(data)) == data
    assert 2 <= in_flight[1] <= limit


_PUSH_CHILD = textwrap.dedent(
    """
    import sys
    from casframe import open_store

    source_url, dest_url = sys.argv[1], sys.argv[2]
    with open_store(source_url) as source, open_store(dest_url) as dest:
        source.push(dest, "big")
    with open("/proc/self/status") as status:  # this program's own peak, not its parent's
        print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")))
    """
)


def test_push_of_a_large_blob_with_bounded_memory(
    s3_server_bucket: S3TestBucket, tmp_path: Path
) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    digest = _write_file(source / "large.bin", 96 * MiB + 5, seed=37)
    local_url = f"file://{tmp_path / 'local'}"
    with open_store(local_url) as local:
        local.set_ref("big", local.import_directory(source))
    child = subprocess.run(
        [sys.executable, "-c", _PUSH_CHILD, local_url, s3_server_bucket.store_url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    peak_mib = int(child.stdout) / 1024
    assert peak_mib < 100, f"peak RSS {peak_mib:.0f} MiB"
    head = s3_server_bucket.client.head_object(
        Bucket=s3_server_bucket.name, Key=object_key(s3_server_bucket, digest)
    )
    assert head["ContentLength"] == digest.size
    assert _unfinished_uploads(s3_server_bucket) == []


def test_parts_carry_crc32_checksums_when_asked(s3_server_bucket: S3TestBucket) -> None:
    import base64
    import zlib

    data = random_bytes(20 * MiB, seed=41)
    digest = Digest.of_bytes(data)
    url = f"{s3_server_bucket.store_url}&request_checksum_calculation=when_supported"
    with open_store(url) as store:
        sent: list[dict[str, Any]] = []
        store.blobs.client.meta.events.register(  # type: ignore[attr-defined]
            "before-send.s3.UploadPart", lambda request, **_: sent.append(dict(request.headers))
        )
        store.put_stream(io.BytesIO(data), digest)
        assert store.read_bytes(digest) == data
    parts = [data[i : i + 8 * MiB] for i in range(0, len(data), 8 * MiB)]
    expected = {base64.b64encode(zlib.crc32(p).to_bytes(4, "big")).decode() for p in parts}
    assert {h["x-amz-checksum-crc32"].decode() for h in sent} == expected
    # In a header, computed from the part in memory: no aws-chunked body with a trailer.
    assert all(b"aws-chunked" not in h.get("Content-Encoding", b"") for h in sent)
    head = s3_server_bucket.client.head_object(
        Bucket=s3_server_bucket.name,
        Key=object_key(s3_server_bucket, digest),
        ChecksumMode="ENABLED",
    )
    assert head.get("ChecksumCRC32"), "the server combined the parts' checksums"


# -- interrupted multipart uploads --------------------------------------------------------------


def _abandon_upload(bucket: S3TestBucket, key: str, part: bytes) -> str:
    """Start a multipart upload and send one part, as a writer killed midway leaves it."""
    started = bucket.client.create_multipart_upload(Bucket=bucket.name, Key=key)
    upload_id: str = started["UploadId"]
    bucket.client.upload_part(
        Bucket=bucket.name, Key=key, UploadId=upload_id, PartNumber=1, Body=part
    )
    return upload_id


def test_prune_aborts_interrupted_multipart_uploads_of_the_store(
    s3_server_bucket: S3TestBucket, s3_server_store: Store
) -> None:
    unreferenced = s3_server_store.put_bytes(b"a stored blob is not a leftover")
    s3_server_store.set_ref("keep", s3_server_store.put_directory(Directory()))
    ours = object_key(s3_server_bucket, Digest.of_bytes(b"never finished"))
    _abandon_upload(s3_server_bucket, ours, b"p" * 1000)
    _abandon_upload(s3_server_bucket, "elsewhere/big.bin", b"q" * 10)  # not the store's
    # Nor is a key that is no blob's, such as one of a store whose prefix is "store/objects/x".
    _abandon_upload(s3_server_bucket, "store/objects/x/objects/ab/cd", b"r" * 10)

    later = time.time() + 60
    assert s3_server_store.blobs.clean_temp(later, dry_run=True) == (1, 1000)
    assert len(_unfinished_uploads(s3_server_bucket)) == 3
    # An upload whose last part is newer than the cutoff is still being written: left alone.
    assert s3_server_store.blobs.clean_temp(time.time() - 3600) == (0, 0)
    assert len(_unfinished_uploads(s3_server_bucket)) == 3

    time.sleep(1.1)  # LastModified has one-second steps
    report = s3_server_store.prune(grace_period=0)

    assert (report.temp_files_removed, report.temp_bytes_removed) == (1, 1000)
    assert sorted(u["Key"] for u in _unfinished_uploads(s3_server_bucket)) == [
        "elsewhere/big.bin", "store/objects/x/objects/ab/cd"
    ]
    assert s3_server_store.contains(unreferenced) is False  # pruned with grace 0, not a temp
    assert s3_server_store.blobs.clean_temp(later) == (0, 0)


@pytest.mark.parametrize(
    ("operation", "warning"),
    [
        ("ListMultipartUploads", "not removing interrupted multipart uploads"),
        ("ListParts", "not removing interrupted multipart upload store/"),
        ("AbortMultipartUpload", "not removing interrupted multipart upload store/"),
    ],
)
def test_clean_temp_refused_by_the_server_is_a_warning_and_prune_goes_on(
    s3_server_bucket: S3TestBucket,
    s3_server_store: Store,
    caplog: pytest.LogCaptureFixture,
    operation: str,
    warning: str,
) -> None:
    """Without s3:ListBucketMultipartUploads, s3:ListMultipartUploadParts or
    s3:AbortMultipartUpload, prune still prunes; the uploads stay, with a warning."""
    _abandon_upload(s3_server_bucket, object_key(s3_server_bucket, Digest.of_bytes(b"x")), b"x")
    _inject(s3_server_store, operation, 403, "AccessDenied", times=1)
    time.sleep(1.1)

    with caplog.at_level(logging.WARNING, logger="casframe_s3"):
        report = s3_server_store.prune(grace_period=0)

    assert report.temp_files_removed == 0
    assert warning in caplog.text
    assert "access denied" in caplog.text
    assert len(_unfinished_uploads(s3_server_bucket)) == 1


def test_clean_temp_spares_the_uploads_this_process_is_sending(
    s3_server_bucket: S3TestBucket, s3_server_store: Store
) -> None:
    data = random_bytes(12 * MiB, seed=41)
    writer = s3_server_store.blobs.begin_write_for(Digest.of_bytes(data))
    try:
        writer.write(data[: 9 * MiB])  # a whole part goes out: the upload exists
        assert len(_unfinished_uploads(s3_server_bucket)) == 1
        time.sleep(1.1)
        assert s3_server_store.blobs.clean_temp(time.time() + 60) == (0, 0)
        assert len(_unfinished_uploads(s3_server_bucket)) == 1
    finally:
        writer.abort()
    assert _unfinished_uploads(s3_server_bucket) == []


def test_an_object_emptied_under_its_hash_is_corrupt(
    s3_mock: S3TestBucket, s3_store: Store
) -> None:
    digest = s3_store.put_bytes(b"file content")
    s3_mock.client.put_object(Bucket=s3_mock.name, Key=object_key(s3_mock, digest), Body=b"")
    with pytest.raises(CorruptBlobError, match="0 bytes"):
        s3_store.read_bytes(digest)
    assert list(s3_store.blobs.iter_blobs()) == []
