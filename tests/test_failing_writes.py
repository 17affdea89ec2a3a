"""``failing_writes`` covers every write path of a backend, and counts each blob once."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from casframe import Digest, Store
from casframe.testing import LARGE_FILE_SIZE, InjectedFailure, failing_writes, random_bytes


def test_a_local_file_fails_on_the_copy_path_too(local_store: Store, tmp_path: Path) -> None:
    data = random_bytes(LARGE_FILE_SIZE, seed=3)
    path = tmp_path / "big"
    path.write_bytes(data)
    with failing_writes(local_store, 0) as written, pytest.raises(InjectedFailure):
        local_store.put_file(path)
    assert written == [0]
    digest = Digest.of_bytes(data)
    assert local_store.find_missing([digest]) == {digest}
    assert local_store.put_file(path) == digest, "the copy path is back on exit"


def test_an_upload_of_a_known_digest_fails(s3_store: Store) -> None:
    data = random_bytes(s3_store.blobs.limits.prehash_min_size or LARGE_FILE_SIZE, seed=4)
    digest = Digest.of_bytes(data)
    with failing_writes(s3_store, 0) as written, pytest.raises(InjectedFailure):
        s3_store.put_stream(io.BytesIO(data), digest)
    assert written == [0]
    assert s3_store.find_missing([digest]) == {digest}


@pytest.mark.parametrize("store_name", ["memory_store", "local_store"])
def test_each_blob_counts_once_whatever_the_write_path(
    request: pytest.FixtureRequest, tmp_path: Path, store_name: str
) -> None:
    store: Store = request.getfixturevalue(store_name)
    blobs = [random_bytes(1000 + i, seed=i) for i in range(6)]
    path = tmp_path / "file"
    path.write_bytes(blobs[5])
    with failing_writes(store, 6) as written:
        store.put_bytes(blobs[0])
        store.put_many([(Digest.of_bytes(b), b) for b in blobs[1:3]])
        store.put_stream(io.BytesIO(blobs[3]))
        store.put_stream(io.BytesIO(blobs[4]), Digest.of_bytes(blobs[4]))
        store.put_file(path)
        assert written == [6]
        with pytest.raises(InjectedFailure):
            store.put_bytes(b"one too many")
    assert written == [6]
    assert store.find_missing([Digest.of_bytes(b) for b in blobs]) == set()
