"""Blobs: identity, round trips, verification, corruption and concurrent writers."""

from __future__ import annotations

import io
import threading

import pytest

from casframe import (
    BlobNotFoundError,
    CorruptBlobError,
    Digest,
    DigestMismatchError,
    InvalidDigestError,
    Store,
)
from casframe.digest import CHUNK_SIZE
from casframe.testing import (
    LARGE_FILE_SIZE,
    random_bytes,
)
from casframe.testing.conformance.base import digest_of, empty_of
from casframe.testing.conformance.capabilities import CapabilityConformance


class _ReadOnlyStream:
    """A stream with ``read`` but no ``readinto``, like many wrappers of sockets and pipes."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._inner.read(size)



class BlobConformance(CapabilityConformance):
    """Blob identity, round trips, verification, corruption, concurrency; and the blob
    capabilities (:class:`CapabilityConformance`)."""

    def test_empty_blob_is_always_present(self, store: Store) -> None:
        assert str(empty_of(store)) == store.digest_function.hash_hex(b"") + "/0"
        if store.digest_function.name == "sha256":
            assert str(empty_of(store)) == (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0"
            )
        assert store.find_missing([empty_of(store)]) == set()
        assert store.contains(empty_of(store))
        assert store.read_bytes(empty_of(store)) == b""
        with store.open_read(empty_of(store)) as stream:
            assert stream.read() == b""
        assert list(store.read_many([empty_of(store)])) == [(empty_of(store), b"")]
        assert store.put_bytes(b"") == empty_of(store)
        assert store.put_stream(io.BytesIO(b"")) == empty_of(store)

    def test_a_writable_store_passes_check_writable_unchanged(self, store: Store) -> None:
        """The probe pushing uses to detect a read-only remote: it passes here, changing
        nothing a user can see."""
        digest = store.put_bytes(b"stored before the probe")
        store.check_writable()
        assert store.read_bytes(digest) == b"stored before the probe"
        assert store.read_bytes(empty_of(store)) == b""
        after = store.put_bytes(b"stored after the probe")
        assert store.read_bytes(after) == b"stored after the probe"

    @pytest.mark.parametrize("size", [1, 1000, CHUNK_SIZE, CHUNK_SIZE + 1])
    def test_put_bytes_round_trip(self, store: Store, size: int) -> None:
        data = random_bytes(size, seed=size)
        digest = store.put_bytes(data)
        assert digest == digest_of(store, data)
        assert store.find_missing([digest]) == set()
        assert store.read_bytes(digest) == data
        with store.open_read(digest) as stream:
            assert stream.read() == data
        # Storing what is already stored is success, and changes nothing.
        assert store.put_bytes(data, digest) == digest
        assert store.read_bytes(digest) == data

    def test_large_blob_streams_in_and_out_with_offsets(self, store: Store) -> None:
        data = random_bytes(LARGE_FILE_SIZE, seed=1)
        chunks: list[int] = []
        digest = store.put_stream(io.BytesIO(data), on_chunk=chunks.append)
        assert digest == digest_of(store, data)
        assert sum(chunks) == len(data)
        assert store.find_missing([digest]) == set()
        with store.open_read(digest) as stream:
            parts = []
            while part := stream.read(100_000):
                parts.append(part)
        assert b"".join(parts) == data
        for offset in (1, CHUNK_SIZE, CHUNK_SIZE + 7, len(data) - 1, len(data)):
            with store.open_read(digest, offset) as stream:
                assert stream.read() == data[offset:], f"read from offset {offset}"
        for offset in (-1, len(data) + 1):
            with pytest.raises(InvalidDigestError, match="outside"):
                store.open_read(digest, offset)

    def test_put_stream_from_a_stream_without_readinto(self, store: Store) -> None:
        data = random_bytes(CHUNK_SIZE * 2 + 3, seed=2)
        digest = store.put_stream(_ReadOnlyStream(data), digest_of(store, data))  # type: ignore[arg-type]
        assert store.read_bytes(digest) == data

    def test_wrong_size_means_missing(self, store: Store) -> None:
        data = b"identity is hash and size"
        digest = store.put_bytes(data)
        longer = Digest(digest.hash, digest.size + 1)
        shorter = Digest(digest.hash, digest.size - 1)
        assert store.find_missing([digest, longer, shorter]) == {longer, shorter}
        assert not store.contains(longer)
        # The empty digest's hash with another size is missing too.
        odd_empty = Digest(empty_of(store).hash, 5)
        assert store.find_missing([odd_empty]) == {odd_empty}

    def test_reading_a_known_hash_with_the_wrong_size_is_not_found(self, store: Store) -> None:
        """A healthy blob asked for with another size is missing, not reported corrupt."""
        digest = store.put_bytes(b"right size")
        wrong = Digest(digest.hash, digest.size + 3)
        with pytest.raises(BlobNotFoundError):
            store.read_bytes(wrong)
        with pytest.raises(BlobNotFoundError):
            store.open_read(wrong).read()
        assert store.read_bytes(digest) == b"right size"

    def test_reading_a_missing_blob_raises_blob_not_found(self, store: Store) -> None:
        absent = digest_of(store, b"never stored")
        with pytest.raises(BlobNotFoundError) as caught:
            store.read_bytes(absent)
        assert caught.value.digests == (absent,)
        assert str(absent) in str(caught.value)
        with pytest.raises(BlobNotFoundError):
            store.open_read(absent).read()
        with pytest.raises(BlobNotFoundError):
            store.open_read(absent, 3).read()
        with pytest.raises(BlobNotFoundError):
            list(store.read_many([absent]))

    def test_put_bytes_with_wrong_expected_digest_stores_nothing(self, store: Store) -> None:
        data = b"what was sent"
        claimed = digest_of(store, b"what was promised")
        with pytest.raises(DigestMismatchError) as caught:
            store.put_bytes(data, claimed)
        assert caught.value.expected == claimed
        assert caught.value.actual == digest_of(store, data)
        assert store.find_missing([claimed, digest_of(store, data)]) == {
            claimed,
            digest_of(store, data),
        }

    @pytest.mark.parametrize("claim", ["other-content", "too-short", "too-long"])
    def test_put_stream_with_wrong_expected_digest_stores_nothing(
        self, store: Store, claim: str
    ) -> None:
        data = random_bytes(CHUNK_SIZE + 10, seed=3)
        real = digest_of(store, data)
        claimed = {
            "other-content": digest_of(store, random_bytes(len(data), seed=4)),
            "too-short": digest_of(store, data[:-1]),  # the stream is longer than promised
            "too-long": Digest(real.hash, real.size + 1),
        }[claim]
        with pytest.raises(DigestMismatchError):
            store.put_stream(io.BytesIO(data), claimed)
        assert store.find_missing([real, claimed]) == {real, claimed}

    def test_put_many_refuses_the_batch_when_one_blob_does_not_match(self, store: Store) -> None:
        good = b"good blob"
        bad_claim = digest_of(store, b"promised")
        with pytest.raises(DigestMismatchError):
            store.put_many([(digest_of(store, good), good), (bad_claim, b"delivered")])
        assert store.find_missing([digest_of(store, good), bad_claim]) == {
            digest_of(store, good),
            bad_claim,
        }

    @pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "extended"])
    @pytest.mark.parametrize("size", [100, 2 * CHUNK_SIZE + 5])
    def test_corrupted_blob_is_detected_on_read(
        self, store: Store, damage: str, size: int
    ) -> None:
        data = random_bytes(size, seed=size)
        digest = store.put_bytes(data)
        middle = size // 2
        damaged = {
            "flipped-byte": data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :],
            "truncated": data[:-1],
            "extended": data + b"!",
        }[damage]
        self.corrupt_blob(store, digest, damaged)
        with pytest.raises(CorruptBlobError) as caught:
            store.read_bytes(digest)
        assert caught.value.digest == digest
        assert str(digest) in str(caught.value)
        with pytest.raises(CorruptBlobError):
            with store.open_read(digest) as stream:
                while stream.read(65536):
                    pass
        with pytest.raises(CorruptBlobError):
            list(store.read_many([digest]))

    @pytest.mark.parametrize("size", [100_000, 6 << 20], ids=["small", "over-5MiB"])
    def test_an_upload_is_invisible_until_its_commit(self, store: Store, size: int) -> None:
        """A writer killed half-way must leave nothing readable or reported present: else
        the half blob would pass for the whole one and never be sent again."""
        data = random_bytes(size, seed=12)
        digest = digest_of(store, data)
        for announced in (True, False):
            upload = store.open_upload(digest) if announced else store.blobs.begin_write(size)
            upload.write(data[: size // 2])
            assert store.find_missing([digest]) == {digest}, f"announced={announced}"
            with pytest.raises(BlobNotFoundError):
                store.read_bytes(digest)
            upload.abort()
            assert store.find_missing([digest]) == {digest}
        upload = store.open_upload(digest)
        upload.write(data)
        upload.commit()
        assert store.read_bytes(digest) == data

    def test_concurrent_writers_of_the_same_blob(self, store: Store) -> None:
        data = random_bytes(2 << 20, seed=8)
        expected = digest_of(store, data)
        writers = 8
        start = threading.Barrier(writers)
        results: list[object] = [None] * writers

        def write(index: int) -> None:
            start.wait()
            try:
                if index % 2:
                    results[index] = store.put_stream(io.BytesIO(data), expected)
                else:
                    results[index] = store.put_bytes(data)
            except BaseException as exc:  # noqa: BLE001 - reported below
                results[index] = exc

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [expected] * writers
        assert store.read_bytes(expected) == data

    def test_find_missing_of_thousands_of_digests(self, store: Store) -> None:
        stored = [store.put_bytes(b"blob %d" % i) for i in range(100)]
        absent = [digest_of(store, b"absent %d" % i) for i in range(5000)]
        wrong_size = [Digest(d.hash, d.size + 1) for d in stored[:50]]
        missing = store.find_missing(stored + absent + wrong_size + [empty_of(store)])
        assert missing == set(absent) | set(wrong_size)

    def test_read_many_returns_every_blob_asked_for(self, store: Store) -> None:
        blobs = {store.put_bytes(b"x" * i): b"x" * i for i in range(1, 40)}
        got = dict(store.read_many([*blobs, empty_of(store)]))
        assert got == {**blobs, empty_of(store): b""}
