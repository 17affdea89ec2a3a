"""The backend conformance suite: what every casframe store must do, as pytest classes.

A backend's test module subclasses :class:`StoreConformance` and provides a ``store`` fixture
returning a fresh, empty :class:`~casframe.Store`::

    from casframe.testing.conformance import StoreConformance

    class TestMyBackend(StoreConformance):
        @pytest.fixture
        def store(self, tmp_path):
            return open_store(...)

Class attributes adapt the suite to a backend without skipping whole classes:

``missing_capabilities``
    the :class:`~casframe.Capability` values the backend does not declare. The suite checks the
    declaration is exact, and tests that need a missing capability check instead that using it
    fails with :class:`~casframe.UnsupportedOperationError` and a message.
``known_gaps``
    ``{"test_name": "reason"}``: that single test must fail (a strict xfail), so the gap is
    documented and the suite says so the day it is fixed. A key may name one parametrized case
    (``"test_x[case]"``) or all of them (``"test_x"``).

Override :meth:`ConformanceBase.corrupt_blob` when the default cannot damage a blob stored in
your backend, and the ``second_store`` fixture to transfer to something other than a fresh
``memory://`` store. Set ``mtime_resolution`` to the step of the backend's timestamps (seconds)
so that grace-period tests wait long enough. The mixins (:class:`BlobConformance`,
:class:`RefConformance`, :class:`TreeConformance`, :class:`TransferConformance`,
:class:`MaintenanceConformance`) can also be used one by one.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from casframe import (
    EMPTY_DIGEST,
    BlobNotFoundError,
    Capability,
    CorruptBlobError,
    Digest,
    DigestMismatchError,
    InvalidDigestError,
    InvalidNameError,
    RefConflictError,
    RefNotFoundError,
    Store,
    UnsafeTreeError,
    UnsupportedFileTypeError,
    UnsupportedOperationError,
    open_store,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    ActionResult,
    Directory,
    DirectoryNode,
    FileNode,
    OutputDirectory,
    OutputFile,
    SymlinkNode,
    Tree,
)
from casframe.digest import CHUNK_SIZE
from casframe.refkinds import ACTION_RESULT_REF_PREFIX, BLOB_REF_PREFIX
from casframe.testing import (
    LARGE_FILE_SIZE,
    TREE_EXECUTABLES,
    TREE_FILES,
    TREE_LARGE_FILE,
    TREE_SYMLINKS,
    InjectedFailure,
    assert_tree_equal,
    describe_tree,
    failing_writes,
    random_bytes,
    write_files,
)
from casframe.tree import iter_tree, missing_in_tree

__all__ = [
    "BlobConformance",
    "ConformanceBase",
    "MaintenanceConformance",
    "RefConformance",
    "StoreConformance",
    "TransferConformance",
    "TreeConformance",
]

MakeTree = Callable[..., Path]


class _ReadOnlyStream:
    """A stream with ``read`` but no ``readinto``, like many wrappers of sockets and pipes."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._inner.read(size)


class ConformanceBase:
    """Fixtures and switches shared by every conformance mixin."""

    #: Capabilities this backend does not declare (see the module docstring).
    missing_capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: ``{"test_name": "reason"}`` for single tests expected to fail (strict xfail).
    known_gaps: ClassVar[Mapping[str, str]] = {}
    #: Seconds between distinguishable blob mtimes (S3's LastModified has one-second steps).
    mtime_resolution: ClassVar[float] = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(
            name for name in cls.known_gaps
            if not name.startswith("test_") or not callable(getattr(cls, name.split("[")[0], None))
        )
        if unknown:
            raise TypeError(f"{cls.__name__}.known_gaps names no test of the suite: {unknown}")
        wrong = [c for c in cls.missing_capabilities if not isinstance(c, Capability)]
        if wrong:
            raise TypeError(f"{cls.__name__}.missing_capabilities holds non-Capability {wrong}")

    @pytest.fixture
    def store(self) -> Store:
        """The backend under test: override to return a fresh, empty store."""
        raise NotImplementedError(
            f"{type(self).__name__} must define a `store` fixture returning a fresh, empty Store"
        )

    @pytest.fixture
    def second_store(self) -> Iterator[Store]:
        """Another store, the peer of transfer tests (default: a fresh ``memory://``)."""
        other = open_store("memory://")
        try:
            yield other
        finally:
            other.close()

    @pytest.fixture(autouse=True)
    def _casframe_known_gap(self, request: pytest.FixtureRequest) -> None:
        node = request.node
        reason = self.known_gaps.get(node.name)
        if reason is None:
            reason = self.known_gaps.get(getattr(node, "originalname", node.name))
        if reason is not None:
            request.applymarker(pytest.mark.xfail(reason=f"known gap: {reason}", strict=True))

    def lacks(self, capability: Capability) -> bool:
        return capability in self.missing_capabilities

    def corrupt_blob(self, store: Store, digest: Digest, data: bytes) -> None:
        """Replace what ``store`` holds for ``digest`` with ``data``, behind its back.

        The default writes over the local file (capability ``local-path``) or replaces the
        bytes in a ``blobs`` dict (``memory://``). Override it for other backends; if yours
        cannot do it, list the corruption tests in ``known_gaps``.
        """
        if Capability.LOCAL_PATH in store.blobs.capabilities:
            path = store.blobs.local_path(digest)
            os.chmod(path, 0o644)
            with open(path, "wb") as f:
                f.write(data)
            return
        table = getattr(store.blobs, "blobs", None)
        if isinstance(table, dict) and digest in table:
            old = table[digest]
            table[digest] = (data, *old[1:]) if isinstance(old, tuple) else data
            return
        raise NotImplementedError(
            f"cannot corrupt a blob of {store.url}: override corrupt_blob(store, digest, data) "
            f"in {type(self).__name__} or list this test in known_gaps"
        )


# -- blobs --------------------------------------------------------------------------------------


class BlobConformance(ConformanceBase):
    """Blob identity, round trips, verification, corruption, concurrency, capabilities."""

    def test_empty_blob_is_always_present(self, store: Store) -> None:
        assert str(EMPTY_DIGEST) == (
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0"
        )
        assert store.find_missing([EMPTY_DIGEST]) == set()
        assert store.contains(EMPTY_DIGEST)
        assert store.read_bytes(EMPTY_DIGEST) == b""
        with store.open_read(EMPTY_DIGEST) as stream:
            assert stream.read() == b""
        assert list(store.read_many([EMPTY_DIGEST])) == [(EMPTY_DIGEST, b"")]
        assert store.put_bytes(b"") == EMPTY_DIGEST
        assert store.put_stream(io.BytesIO(b"")) == EMPTY_DIGEST

    def test_a_writable_store_passes_check_writable_unchanged(self, store: Store) -> None:
        """The probe pushing uses to detect a read-only remote: it passes here, changing
        nothing a user can see."""
        digest = store.put_bytes(b"stored before the probe")
        store.check_writable()
        assert store.read_bytes(digest) == b"stored before the probe"
        assert store.read_bytes(EMPTY_DIGEST) == b""
        after = store.put_bytes(b"stored after the probe")
        assert store.read_bytes(after) == b"stored after the probe"

    @pytest.mark.parametrize("size", [1, 1000, CHUNK_SIZE, CHUNK_SIZE + 1])
    def test_put_bytes_round_trip(self, store: Store, size: int) -> None:
        data = random_bytes(size, seed=size)
        digest = store.put_bytes(data)
        assert digest == Digest.of_bytes(data)
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
        assert digest == Digest.of_bytes(data)
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
        digest = store.put_stream(_ReadOnlyStream(data), Digest.of_bytes(data))  # type: ignore[arg-type]
        assert store.read_bytes(digest) == data

    def test_wrong_size_means_missing(self, store: Store) -> None:
        data = b"identity is hash and size"
        digest = store.put_bytes(data)
        longer = Digest(digest.hash, digest.size + 1)
        shorter = Digest(digest.hash, digest.size - 1)
        assert store.find_missing([digest, longer, shorter]) == {longer, shorter}
        assert not store.contains(longer)
        # The empty digest's hash with another size is missing too.
        odd_empty = Digest(EMPTY_DIGEST.hash, 5)
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
        absent = Digest.of_bytes(b"never stored")
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
        claimed = Digest.of_bytes(b"what was promised")
        with pytest.raises(DigestMismatchError) as caught:
            store.put_bytes(data, claimed)
        assert caught.value.expected == claimed
        assert caught.value.actual == Digest.of_bytes(data)
        assert store.find_missing([claimed, Digest.of_bytes(data)]) == {
            claimed,
            Digest.of_bytes(data),
        }

    @pytest.mark.parametrize("claim", ["other-content", "too-short", "too-long"])
    def test_put_stream_with_wrong_expected_digest_stores_nothing(
        self, store: Store, claim: str
    ) -> None:
        data = random_bytes(CHUNK_SIZE + 10, seed=3)
        real = Digest.of_bytes(data)
        claimed = {
            "other-content": Digest.of_bytes(random_bytes(len(data), seed=4)),
            "too-short": Digest.of_bytes(data[:-1]),  # the stream is longer than promised
            "too-long": Digest(real.hash, real.size + 1),
        }[claim]
        with pytest.raises(DigestMismatchError):
            store.put_stream(io.BytesIO(data), claimed)
        assert store.find_missing([real, claimed]) == {real, claimed}

    def test_put_many_refuses_the_batch_when_one_blob_does_not_match(self, store: Store) -> None:
        good = b"good blob"
        bad_claim = Digest.of_bytes(b"promised")
        with pytest.raises(DigestMismatchError):
            store.put_many([(Digest.of_bytes(good), good), (bad_claim, b"delivered")])
        assert store.find_missing([Digest.of_bytes(good), bad_claim]) == {
            Digest.of_bytes(good),
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
        digest = Digest.of_bytes(data)
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
        expected = Digest.of_bytes(data)
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
        absent = [Digest.of_bytes(b"absent %d" % i) for i in range(5000)]
        wrong_size = [Digest(d.hash, d.size + 1) for d in stored[:50]]
        missing = store.find_missing(stored + absent + wrong_size + [EMPTY_DIGEST])
        assert missing == set(absent) | set(wrong_size)

    def test_read_many_returns_every_blob_asked_for(self, store: Store) -> None:
        blobs = {store.put_bytes(b"x" * i): b"x" * i for i in range(1, 40)}
        got = dict(store.read_many([*blobs, EMPTY_DIGEST]))
        assert got == {**blobs, EMPTY_DIGEST: b""}

    # -- capabilities ---------------------------------------------------------------------

    def test_declared_capabilities_match_missing_capabilities(self, store: Store) -> None:
        declared = frozenset(store.blobs.capabilities)
        assert declared == frozenset(Capability) - self.missing_capabilities, (
            "set missing_capabilities to exactly what the backend does not declare"
        )

    def test_capability_list(self, store: Store) -> None:
        a, b = store.put_bytes(b"listed a"), store.put_bytes(b"listed b")
        if self.lacks(Capability.LIST):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                list(store.blobs.iter_blobs())
            return
        before = time.time()
        listed = {info.digest: info.mtime for info in store.blobs.iter_blobs()}
        assert {a, b} <= listed.keys()
        for digest in (a, b):
            assert abs(listed[digest] - before) < 600, "mtime is seconds since the epoch"

    def test_capability_delete(self, store: Store) -> None:
        keep, drop = store.put_bytes(b"keep me"), store.put_bytes(b"drop me")
        absent = Digest.of_bytes(b"was never here")
        if self.lacks(Capability.DELETE):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.blobs.delete_blobs([drop])
            assert store.find_missing([keep, drop]) == set()
            return
        store.blobs.delete_blobs([drop, absent])
        assert store.find_missing([keep, drop]) == {drop}
        with pytest.raises(BlobNotFoundError):
            store.read_bytes(drop)
        # A deleted blob can be stored again.
        assert store.put_bytes(b"drop me") == drop
        assert store.read_bytes(drop) == b"drop me"

    def test_capability_touch(self, store: Store) -> None:
        digest = store.put_bytes(b"touch me")
        absent = Digest.of_bytes(b"not here")
        if self.lacks(Capability.TOUCH):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.blobs.touch_blobs([digest])
            return

        def mtime() -> float | None:
            if self.lacks(Capability.LIST):
                return None
            return next(i.mtime for i in store.blobs.iter_blobs() if i.digest == digest)

        before = mtime()
        time.sleep(max(0.02, 1.05 * self.mtime_resolution))
        reported = store.blobs.touch_blobs([digest, absent])  # absent ones are ignored
        assert reported is None or list(reported) == [absent], "touch reports the absent ones"
        after = mtime()
        if before is not None and after is not None:
            assert after > before
        assert store.read_bytes(digest) == b"touch me"
        assert store.find_missing([absent]) == {absent}

    def test_find_missing_with_freshen_touches_what_is_present(self, store: Store) -> None:
        """What writers ask before reusing blobs (``freshen_blobs`` on a backend with touch)."""
        digest = store.put_bytes(b"reused")
        absent = Digest.of_bytes(b"never stored")
        wrong_size = Digest(digest.hash, digest.size + 1)
        before = self._mtime(store, digest)
        time.sleep(max(0.02, 1.05 * self.mtime_resolution))
        assert store.find_missing([digest, absent, wrong_size], freshen=True) == {
            absent, wrong_size
        }
        after = self._mtime(store, digest)
        if before is not None and after is not None and not self.lacks(Capability.TOUCH):
            assert after > before
        assert store.find_missing([absent], freshen=True) == {absent}
        assert store.find_missing([EMPTY_DIGEST], freshen=True) == set()

    def _mtime(self, store: Store, digest: Digest) -> float | None:
        if self.lacks(Capability.LIST):
            return None
        return next(i.mtime for i in store.blobs.iter_blobs() if i.digest == digest)

    @pytest.mark.parametrize("offset", [0, 1000])
    def test_put_open_file(self, store: Store, tmp_path: Path, offset: int) -> None:
        """A local file, from its offset to its end (the backend may copy it its own way)."""
        data = random_bytes(LARGE_FILE_SIZE, seed=3)
        path = tmp_path / "local-file"
        path.write_bytes(data)
        with open(path, "rb") as f:
            f.seek(offset)
            digest = store.put_open_file(f.fileno())
        assert digest == Digest.of_bytes(data[offset:])
        assert store.read_bytes(digest) == data[offset:]
        with open(path, "rb") as f:
            copied = store.blobs.begin_write_copy(f.fileno())
            if copied is None:
                return  # the backend has no copy path; put_open_file streamed the file
            writer, held = copied
            with held:
                assert held.read() == data, "the stream holds what the upload holds"
            writer.abort()
            writer.abort()  # safe to repeat
        other = Digest.of_bytes(data + b"x")
        assert store.find_missing([other]) == {other}

    def test_delete_older_than_spares_what_is_newer(self, store: Store) -> None:
        """Prune's cutoff is re-checked as each blob is deleted (``older_than``)."""
        digest = store.put_bytes(b"stored just now")
        if self.lacks(Capability.DELETE):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.blobs.delete_blobs([digest], older_than=time.time())
            return
        store.blobs.delete_blobs([digest], older_than=time.time() - 3600)
        assert store.contains(digest), "a blob newer than older_than must survive"
        store.blobs.delete_blobs([digest], older_than=time.time() + 3600)
        assert not store.contains(digest)

    def test_storing_an_existing_blob_freshens_it(self, store: Store) -> None:
        """A writer storing a blob again renews its grace period (with ``touch``)."""
        digest = store.put_bytes(b"stored twice")
        if self.lacks(Capability.TOUCH) or self.lacks(Capability.LIST):
            # Without them there is no time to renew; storing again must still succeed.
            assert store.put_bytes(b"stored twice") == digest
            return
        store.blobs.touch_blobs([])  # an empty call is fine

        def mtime() -> float:
            return next(i.mtime for i in store.blobs.iter_blobs() if i.digest == digest)

        before = mtime()
        time.sleep(1.1)  # beyond coarse timestamps: S3's LastModified has whole seconds
        store.put_bytes(b"stored twice")
        assert mtime() > before
        with io.BytesIO(b"stored twice") as stream:
            store.put_stream(stream)
        assert mtime() > before

    def test_iter_blob_stats_matches_iter_blobs(self, store: Store) -> None:
        digests = {store.put_bytes(b"stat %d" % i) for i in range(5)}
        if self.lacks(Capability.LIST):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                list(store.blobs.iter_blob_stats())
            return
        stats = {(h, size): mtime for h, size, mtime in store.blobs.iter_blob_stats()}
        infos = {info.digest: info.mtime for info in store.blobs.iter_blobs()}
        assert stats.keys() == infos.keys() >= digests
        assert all(abs(stats[d] - infos[d]) < 1 for d in digests)
        asked: list[str] = []
        skipped = sorted(digests)[:2]

        def skip(hash_: str) -> bool:
            asked.append(hash_)
            return hash_ in {d.hash for d in skipped}

        rest = {(h, size) for h, size, _ in store.blobs.iter_blob_stats(skip)}
        assert rest == stats.keys() - set(skipped)
        assert sorted(asked) == sorted(h for h, _ in stats), "skip is asked about every blob"

    def test_clean_temp_leaves_stored_blobs_alone(self, store: Store) -> None:
        digest = store.put_bytes(b"not a temp file")
        removed, size = store.blobs.clean_temp(time.time() + 3600, dry_run=True)
        assert removed >= 0 and size >= 0
        store.blobs.clean_temp(time.time() + 3600)
        assert store.read_bytes(digest) == b"not a temp file"

    def test_capability_local_path(self, store: Store) -> None:
        digest = store.put_bytes(b"on disk")
        absent = Digest.of_bytes(b"not on disk")
        if self.lacks(Capability.LOCAL_PATH):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.blobs.local_path(digest)
            return
        with open(store.blobs.local_path(digest), "rb") as f:
            assert f.read() == b"on disk"
        with pytest.raises(BlobNotFoundError):
            store.blobs.local_path(absent)

    def test_link_blobs(self, store: Store, tmp_path: Path) -> None:
        digest = store.put_bytes(b"linked")
        absent = Digest.of_bytes(b"not stored")
        dest = tmp_path / "links"
        dest.mkdir()
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self.lacks(Capability.LOCAL_PATH):
                with pytest.raises(UnsupportedOperationError, match=r"\w"):
                    store.blobs.link_blobs(fd, [("a", digest)])
                return
            store.blobs.link_blobs(fd, [("a", digest), ("b", digest)])
            with pytest.raises(BlobNotFoundError):
                store.blobs.link_blobs(fd, [("c", digest), ("d", absent)])
        finally:
            os.close(fd)
        assert sorted(os.listdir(dest)) == ["a", "b", "c"], "links made before the failure stay"
        assert (dest / "a").read_bytes() == (dest / "c").read_bytes() == b"linked"
        assert (dest / "a").stat().st_ino == (dest / "b").stat().st_ino


# -- refs ---------------------------------------------------------------------------------------


def _small_tree(store: Store, label: str = "a") -> Digest:
    """Store a one-file tree (file ``f`` holding ``label``) and return its root digest."""
    content = f"content of {label}".encode()
    file_digest = store.put_bytes(content)
    root = Directory(files=[FileNode(name="f", digest=file_digest.to_proto())])
    return store.put_directory(root)


INVALID_REF_NAMES = [
    "", "/a", "a/", "a//b", "a/../b", ".", "..", "a/./b", "nul\x00byte", "/",
    # A segment over 255 bytes (UTF-8), named short in test ids.
    pytest.param("x" * 256, id="'x'*256"),
    pytest.param("team/" + "\u00e9" * 128, id="'team/'+'\u00e9'*128"),
]


class RefConformance(ConformanceBase):
    """Refs: names, set/get/delete/list, LRU order, copy, completeness check."""

    def test_set_get_ref(self, store: Store) -> None:
        tree = _small_tree(store)
        store.set_ref("main", tree)
        assert store.get_ref("main") == tree
        assert store.has_ref("main")
        assert store.resolve("main") == tree
        assert store.resolve(str(tree)) == tree

    def test_set_ref_replaces_the_target(self, store: Store) -> None:
        first, second = _small_tree(store, "one"), _small_tree(store, "two")
        store.set_ref("main", first)
        store.set_ref("main", second)
        assert store.get_ref("main") == second
        assert [r.name for r in store.list_refs()] == ["main"]

    def test_ref_names_may_contain_slashes(self, store: Store) -> None:
        tree = _small_tree(store)
        names = ["project/element/key", "project/element/other", "x/y/z/w/v"]
        for name in names:
            store.set_ref(name, tree)
        for name in names:
            assert store.get_ref(name) == tree
        assert sorted(r.name for r in store.list_refs()) == sorted(names)
        assert not store.has_ref("project")
        assert not store.has_ref("project/element")

    def test_list_refs_with_prefix(self, store: Store) -> None:
        tree = _small_tree(store)
        for name in ("proj/a", "proj/b/c", "project-x", "other/a"):
            store.set_ref(name, tree)
        assert sorted(r.name for r in store.list_refs("proj/")) == ["proj/a", "proj/b/c"]
        assert sorted(r.name for r in store.list_refs("proj")) == [
            "proj/a",
            "proj/b/c",
            "project-x",
        ]
        assert [r.name for r in store.list_refs("nothing")] == []
        infos = store.list_refs("other/")
        assert len(infos) == 1 and infos[0].digest == tree
        assert abs(infos[0].accessed - time.time()) < 600, "seconds since the epoch"

    @pytest.mark.parametrize("name", INVALID_REF_NAMES, ids=repr)
    def test_invalid_ref_names_are_refused(self, store: Store, name: str) -> None:
        tree = _small_tree(store)
        store.set_ref("good", tree)
        with pytest.raises(InvalidNameError, match="invalid ref name"):
            store.set_ref(name, tree)
        with pytest.raises(InvalidNameError):
            store.get_ref(name)
        with pytest.raises(InvalidNameError):
            store.delete_ref(name)
        with pytest.raises(InvalidNameError):
            store.copy_ref("good", name)
        assert [r.name for r in store.list_refs()] == ["good"]

    def test_get_ref_refreshes_access_time_for_lru_order(self, store: Store) -> None:
        tree = _small_tree(store)
        for name in ("first", "second", "third"):
            store.set_ref(name, tree)
            time.sleep(0.02)
        assert [r.name for r in store.list_refs()] == ["first", "second", "third"]
        store.get_ref("first")
        time.sleep(0.02)
        store.get_ref("second", touch=False)  # looking without touching keeps the order
        assert [r.name for r in store.list_refs()] == ["second", "third", "first"]
        time.sleep(0.02)
        store.resolve("second")  # resolving a ref to use it is an access
        assert [r.name for r in store.list_refs()][-1] == "second"

    def test_delete_ref(self, store: Store) -> None:
        tree = _small_tree(store)
        store.set_ref("a/b", tree)
        store.set_ref("keep", tree)
        store.delete_ref("a/b")
        assert not store.has_ref("a/b")
        assert [r.name for r in store.list_refs()] == ["keep"]
        with pytest.raises(RefNotFoundError, match="a/b"):
            store.get_ref("a/b")
        with pytest.raises(RefNotFoundError, match="a/b"):
            store.delete_ref("a/b")
        # The tree itself stays: deleting a ref is not deleting content.
        assert missing_in_tree(store.verified, tree) == set()
        # Once "a/b" is gone, "a" is a free name.
        store.set_ref("a", tree)
        assert store.get_ref("a") == tree

    def test_missing_ref_raises_ref_not_found(self, store: Store) -> None:
        with pytest.raises(RefNotFoundError, match="no/such/ref") as caught:
            store.get_ref("no/such/ref")
        assert caught.value.name == "no/such/ref"
        with pytest.raises(RefNotFoundError):
            store.resolve("no/such/ref")
        assert not store.has_ref("no/such/ref")

    def test_copy_ref(self, store: Store) -> None:
        tree = _small_tree(store)
        store.set_ref("release/1.0", tree)
        assert store.copy_ref("release/1.0", "release/latest") == tree
        assert store.get_ref("release/latest") == tree
        assert store.get_ref("release/1.0") == tree
        other = _small_tree(store, "b")
        store.set_ref("release/1.0", other)
        assert store.get_ref("release/latest") == tree, "a copy does not follow the original"
        with pytest.raises(RefNotFoundError):
            store.copy_ref("no/such", "anything")
        assert not store.has_ref("anything")

    def test_set_ref_refuses_a_tree_whose_blobs_are_missing(self, store: Store) -> None:
        file_content, inner_content = b"file stored late", b"inner file stored late"
        absent_file = Digest.of_bytes(file_content)
        inner = Directory(
            files=[FileNode(name="g", digest=Digest.of_bytes(inner_content).to_proto())]
        )
        inner_data = inner.SerializeToString(deterministic=True)
        absent_dir = Digest.of_bytes(inner_data)
        root = Directory(
            files=[FileNode(name="f", digest=absent_file.to_proto())],
            directories=[DirectoryNode(name="d", digest=absent_dir.to_proto())],
        )
        incomplete = store.put_directory(root)
        with pytest.raises(BlobNotFoundError) as caught:
            store.set_ref("broken", incomplete)
        assert set(caught.value.digests) == {absent_file, absent_dir}
        assert not store.has_ref("broken")
        with pytest.raises(BlobNotFoundError):
            store.set_ref("broken", Digest.of_bytes(b"no such root"))
        assert not store.has_ref("broken")
        # Children arriving one level at a time: each level's missing blobs are reported.
        store.put_bytes(file_content)
        store.put_bytes(inner_data)
        with pytest.raises(BlobNotFoundError) as caught:
            store.set_ref("broken", incomplete)
        assert caught.value.digests == (Digest.of_bytes(inner_content),)
        store.put_bytes(inner_content)
        store.set_ref("complete", incomplete)
        assert store.get_ref("complete") == incomplete

    @pytest.mark.parametrize("name", ["ac", "asset", "ac/_/x", "asset/blob/k"])
    def test_the_server_namespaces_are_no_names_for_trees(self, store: Store, name: str) -> None:
        tree = _small_tree(store)
        store.set_ref("good", tree)
        with pytest.raises(InvalidNameError, match=f"ref name {name!r} is reserved"):
            store.set_ref(name, tree)
        with pytest.raises(InvalidNameError, match="is reserved"):
            store.copy_ref("good", name)
        if "/" not in name:  # not even one of the server's own refs
            with pytest.raises(InvalidNameError, match="is reserved"):
                store.set_ref(name, tree, check_complete=False)
        assert not store.has_ref(name)

    @pytest.mark.parametrize(
        ("first", "second"),
        [("a", "a/b"), ("a/b", "a"), ("x/y", "x/y/z/w"), ("x/y/z/w", "x/y"), ("x/y", "x")],
        ids=repr,
    )
    def test_a_ref_never_shadows_another(self, store: Store, first: str, second: str) -> None:
        """A name is a ref or a folder of refs, never both, whatever the backend can hold."""
        tree = _small_tree(store)
        store.set_ref(first, tree)
        attempts = (
            lambda: store.set_ref(second, tree),
            lambda: store.set_ref(second, tree, check_complete=False),
            lambda: store.copy_ref(first, second),
        )
        for attempt in attempts:
            with pytest.raises(RefConflictError) as caught:
                attempt()
            assert (caught.value.name, caught.value.existing) == (second, first)
            assert f"{second!r} conflicts with an existing ref" in str(caught.value)
            assert repr(first) in str(caught.value)
        assert not store.has_ref(second)
        assert store.get_ref(first) == tree
        store.set_ref(f"{first}-sibling", tree)  # a name that only starts alike is no folder

    def test_set_ref_accepts_the_empty_tree(self, store: Store) -> None:
        store.set_ref("empty", EMPTY_DIGEST)
        assert store.get_ref("empty") == EMPTY_DIGEST


# -- tree engine --------------------------------------------------------------------------------


def _hostile_directory(store: Store, case: str) -> Digest:
    """Store a Directory that must never be checked out, and return its digest."""
    content = store.put_bytes(b"escaped!\n").to_proto()
    inner = store.put_directory(
        Directory(files=[FileNode(name="escaped.txt", digest=content)])
    ).to_proto()

    def file(name: str) -> FileNode:
        return FileNode(name=name, digest=content)

    def folder(name: str) -> DirectoryNode:
        return DirectoryNode(name=name, digest=inner)

    def link(name: str) -> SymlinkNode:
        return SymlinkNode(name=name, target="/tmp")

    directory = {
        "file-dotdot": Directory(files=[file("..")]),
        "file-dot": Directory(files=[file(".")]),
        "file-slash": Directory(files=[file("a/b")]),
        "file-absolute": Directory(files=[file("/casframe-escape")]),
        "file-parent-path": Directory(files=[file("../escape")]),
        "file-empty": Directory(files=[file("")]),
        "file-nul": Directory(files=[file("x\x00")]),
        "dir-dotdot": Directory(directories=[folder("..")]),
        "dir-parent-path": Directory(directories=[folder("../../escape")]),
        "dir-empty": Directory(directories=[folder("")]),
        "link-dotdot": Directory(symlinks=[link("..")]),
        "link-parent-path": Directory(symlinks=[link("../link")]),
        "duplicate-files": Directory(files=[file("x"), file("x")]),
        "duplicate-file-and-dir": Directory(files=[file("x")], directories=[folder("x")]),
        "duplicate-dir-and-link": Directory(directories=[folder("x")], symlinks=[link("x")]),
        "duplicate-file-and-link": Directory(files=[file("x")], symlinks=[link("x")]),
        "link-target-empty": Directory(
            files=[file("a")], symlinks=[SymlinkNode(name="b", target="")]
        ),
        "link-target-nul": Directory(
            files=[file("a")], symlinks=[SymlinkNode(name="b", target="x\x00y")]
        ),
    }
    if case.startswith("nested-"):
        bad = store.put_bytes(directory[case.removeprefix("nested-")].SerializeToString())
        good = Directory(
            files=[file("fine.txt")],
            directories=[DirectoryNode(name="sub", digest=bad.to_proto())],
        )
        return store.put_directory(good)
    return store.put_bytes(directory[case].SerializeToString())


HOSTILE_CASES = [
    "file-dotdot",
    "file-dot",
    "file-slash",
    "file-absolute",
    "file-parent-path",
    "file-empty",
    "file-nul",
    "dir-dotdot",
    "dir-parent-path",
    "dir-empty",
    "link-dotdot",
    "link-parent-path",
    "duplicate-files",
    "duplicate-file-and-dir",
    "duplicate-dir-and-link",
    "duplicate-file-and-link",
    "link-target-empty",
    "link-target-nul",
    "nested-dir-dotdot",
    "nested-file-absolute",
]


def _walk_paths(store: Store, tree: Digest | str) -> dict[str, tuple[str, bool, str]]:
    return {e.path: (e.kind, e.is_executable, e.target) for e in store.walk(tree)}


class TreeConformance(ConformanceBase):
    """The tree engine over the backend: import, checkout, diff, lookups, hostile trees."""

    @pytest.mark.parametrize("link", [None, False, True], ids=["link-auto", "copy", "hardlink"])
    def test_import_and_checkout_round_trip(
        self, store: Store, make_tree: MakeTree, tmp_path: Path, link: bool | None
    ) -> None:
        source = make_tree("source")
        root = store.import_directory(source)
        dest = tmp_path / "checkout"
        if link and self.lacks(Capability.LOCAL_PATH):
            with pytest.raises(UnsupportedOperationError, match="hardlink"):
                store.checkout(root, dest, link=True)
            assert not dest.exists()
            return
        store.checkout(root, dest, link=link)
        assert_tree_equal(source, dest)
        # What was checked out imports back to the very same tree.
        assert store.import_directory(dest) == root

    def test_large_file_round_trip(
        self, store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        source = make_tree("source", large=True)
        root = store.import_directory(source)
        entry = {e.path: e for e in store.walk(root)}[TREE_LARGE_FILE]
        assert entry.digest is not None and entry.digest.size == LARGE_FILE_SIZE
        store.checkout(root, tmp_path / "checkout")
        assert_tree_equal(source, tmp_path / "checkout")

    def test_import_is_deterministic(
        self, store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        first = store.import_directory(make_tree("one"))
        assert store.import_directory(tmp_path / "one") == first
        assert store.import_directory(make_tree("two")) == first, "the path is not content"
        assert missing_in_tree(store.verified, first) == set()
        store.set_ref("tree", first)

    def test_import_stores_symlinks_as_they_are(self, store: Store, make_tree: MakeTree) -> None:
        root = store.import_directory(make_tree())
        entries = _walk_paths(store, root)
        for path, target in TREE_SYMLINKS.items():
            assert entries[path] == ("symlink", False, target)
        for path in TREE_EXECUTABLES:
            assert entries[path] == ("file", True, "")
        assert entries["empty"] == ("directory", False, "")
        assert store.subdir(root, "empty") == EMPTY_DIGEST

    def test_diff(self, store: Store, make_tree: MakeTree) -> None:
        source = make_tree("source")
        before = store.import_directory(source)
        (source / "README.txt").unlink()
        (source / "NEW.txt").write_bytes(b"new\n")
        (source / "src/pkg/module.py").write_bytes(b"def answer():\n    return 43\n")
        (source / "src/pkg/data/blob.bin").chmod(0o755)  # only the executable bit changes
        (source / "links/relative").unlink()
        (source / "links/relative").symlink_to("../NEW.txt")
        (source / "newdir/inner").mkdir(parents=True)
        (source / "newdir/inner/x.txt").write_bytes(b"x\n")
        (source / "new-empty").mkdir()
        for path in sorted((source / "deep").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (source / "deep").rmdir()
        after = store.import_directory(source)

        diff = store.diff(before, after)
        assert diff.added == ["NEW.txt", "new-empty/", "newdir/inner/x.txt"]
        assert diff.removed == ["README.txt", "deep/a/b/c/d/leaf.txt"]
        assert diff.modified == ["links/relative", "src/pkg/data/blob.bin", "src/pkg/module.py"]
        assert diff
        reverse = store.diff(after, before)
        assert (reverse.added, reverse.removed) == (diff.removed, diff.added)
        assert not store.diff(after, after)

        in_subdir = store.diff(before, after, subdir="src/pkg")
        assert (in_subdir.added, in_subdir.removed) == ([], [])
        assert in_subdir.modified == ["data/blob.bin", "module.py"]

    def test_subdir_lookup(self, store: Store, make_tree: MakeTree) -> None:
        source = make_tree()
        root = store.import_directory(source)
        pkg = store.subdir(root, "src/pkg")
        assert pkg == store.import_directory(source / "src/pkg")
        assert store.subdir(root, "/src/pkg/") == pkg
        assert store.subdir(root, "") == root
        with pytest.raises(FileNotFoundError, match="src/nope"):
            store.subdir(root, "src/nope")
        with pytest.raises(FileNotFoundError):
            store.subdir(root, "README.txt")  # a file is not a directory
        with pytest.raises(InvalidNameError):
            store.subdir(root, "src/../etc")

    def test_ls(self, store: Store, make_tree: MakeTree) -> None:
        root = store.import_directory(make_tree())
        listing = {e.path: e for e in store.ls(root, "src/pkg")}
        assert sorted(listing) == ["__init__.py", "data", "empty-too", "module.py"]
        assert listing["module.py"].kind == "file"
        assert listing["module.py"].digest == Digest.of_bytes(TREE_FILES["src/pkg/module.py"])
        assert listing["data"].kind == "directory"
        assert listing["__init__.py"].digest == EMPTY_DIGEST
        top = [e.path for e in store.ls(root)]
        assert top == sorted(top)
        assert {"README.txt", "bin", "links", "empty"} <= set(top)

    def test_walk(self, store: Store, make_tree: MakeTree) -> None:
        source = make_tree()
        root = store.import_directory(source)
        walked = list(store.walk(root))
        paths = [e.path for e in walked]
        on_disk = describe_tree(source)
        assert sorted(paths) == sorted(on_disk)
        kinds = {"file": "file", "directory": "dir", "symlink": "symlink"}
        for entry in walked:
            kind, detail, executable = on_disk[entry.path]
            assert kinds[entry.kind] == kind, entry.path
            if entry.kind == "file":
                assert entry.digest is not None and entry.digest.hash == detail
                assert entry.is_executable == executable, entry.path
            if entry.kind == "symlink":
                assert entry.target == detail
        for index, path in enumerate(paths):  # parents come before their children
            parent = path.rpartition("/")[0]
            assert not parent or paths.index(parent) < index
        assert [e.path for e in store.walk(root, "src")] == [
            p.removeprefix("src/") for p in paths if p.startswith("src/")
        ]

    def test_open_file_by_path(self, store: Store, make_tree: MakeTree) -> None:
        root = store.import_directory(make_tree(large=True))
        with store.open_file(root, "src/pkg/module.py") as f:
            assert f.read() == TREE_FILES["src/pkg/module.py"]
        with store.open_file(root, "src/pkg/__init__.py") as f:
            assert f.read() == b""
        with store.open_file(root, TREE_LARGE_FILE) as f:
            assert Digest.of_stream(f).size == LARGE_FILE_SIZE
        with pytest.raises(FileNotFoundError, match="src/pkg/nope.py"):
            store.open_file(root, "src/pkg/nope.py")
        with pytest.raises(IsADirectoryError):
            store.open_file(root, "src/pkg")
        with pytest.raises(IsADirectoryError):
            store.open_file(root, "links/relative")  # a symlink is not a file to open

    def test_import_refuses_a_fifo_naming_it(
        self, store: Store, make_tree: MakeTree
    ) -> None:
        source = make_tree()
        fifo = source / "src" / "pipe"
        os.mkfifo(fifo)
        with pytest.raises(UnsupportedFileTypeError, match="fifo") as caught:
            store.import_directory(source)
        assert str(fifo) in str(caught.value)

    @pytest.mark.parametrize("case", HOSTILE_CASES)
    def test_checkout_refuses_a_hostile_tree(
        self, store: Store, tmp_path: Path, case: str
    ) -> None:
        hostile = _hostile_directory(store, case)
        work = tmp_path / "work"
        dest = work / "a" / "dest"
        dest.parent.mkdir(parents=True)
        before = describe_tree(tmp_path)
        with pytest.raises(UnsafeTreeError):
            store.checkout(hostile, dest, link=False)
        assert describe_tree(tmp_path) == before, "checkout wrote something"
        assert not os.path.lexists("/casframe-escape")

    def test_checkout_refuses_a_non_empty_destination(
        self, store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        root = store.import_directory(make_tree())
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "precious.txt").write_bytes(b"keep")
        with pytest.raises(FileExistsError):
            store.checkout(root, dest)
        assert sorted(os.listdir(dest)) == ["precious.txt"]
        assert (dest / "precious.txt").read_bytes() == b"keep"
        not_a_dir = tmp_path / "file"
        not_a_dir.write_bytes(b"")
        with pytest.raises(FileExistsError):
            store.checkout(root, not_a_dir)
        empty = tmp_path / "empty-dest"
        empty.mkdir()
        store.checkout(root, empty)  # an existing empty directory is fine

    def test_checkout_by_ref_name(
        self, store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        source = make_tree()
        store.set_ref("project/build", store.import_directory(source))
        store.checkout("project/build", tmp_path / "out")
        assert_tree_equal(source, tmp_path / "out")


# -- transfer -----------------------------------------------------------------------------------


def _dirs(store: Store, tree: Digest) -> Iterator[tuple[Digest, bytes, Directory]]:
    return iter_tree(store.verified, tree)


class TransferConformance(ConformanceBase):
    """Copying trees between the backend and ``second_store``, in both directions."""

    def test_push_a_ref(
        self, store: Store, second_store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        source = make_tree(large=True)
        root = store.import_directory(source)
        store.set_ref("project/main", root)
        result = store.push(second_store, "project/main")
        assert result.root == root and result.ref == "project/main"
        assert result.blobs_sent > 0 and result.bytes_sent > LARGE_FILE_SIZE
        assert second_store.get_ref("project/main") == root
        second_store.checkout("project/main", tmp_path / "there")
        assert_tree_equal(source, tmp_path / "there")

        again = store.push(second_store, "project/main")
        assert (again.blobs_sent, again.bytes_sent) == (0, 0)
        assert again.already_present

    def test_pull_a_ref(
        self, store: Store, second_store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        source = make_tree(large=True)
        root = second_store.import_directory(source)
        second_store.set_ref("project/main", root)
        result = store.pull(second_store, "project/main", ref="mirror/main")
        assert result.ref == "mirror/main"
        assert store.get_ref("mirror/main") == root
        assert not store.has_ref("project/main")
        store.checkout("mirror/main", tmp_path / "here")
        assert_tree_equal(source, tmp_path / "here")
        assert store.pull(second_store, "project/main", ref="mirror/main").blobs_sent == 0

    def test_push_by_digest_sets_only_the_ref_asked_for(
        self, store: Store, second_store: Store, make_tree: MakeTree
    ) -> None:
        root = store.import_directory(make_tree())
        result = store.push(second_store, root)
        assert result.ref is None and second_store.list_refs() == []
        assert missing_in_tree(second_store.verified, root) == set()
        store.push(second_store, str(root), ref="by/digest")
        assert second_store.get_ref("by/digest") == root

    @pytest.mark.parametrize("fail_during", ["files", "directories"])
    @pytest.mark.parametrize("direction", ["push", "pull"])
    def test_interrupted_transfer_leaves_no_ref_and_resumes(
        self,
        store: Store,
        second_store: Store,
        make_tree: MakeTree,
        tmp_path: Path,
        direction: str,
        fail_during: str,
    ) -> None:
        source_store, dest_store = (
            (store, second_store) if direction == "push" else (second_store, store)
        )
        source = make_tree()
        root = source_store.import_directory(source)
        source_store.set_ref("project/main", root)
        needed = set(source_store.tree_digests(root)) - {EMPTY_DIGEST}
        directories = {d for d, _, _ in _dirs(source_store, root)} - {EMPTY_DIGEST}
        files = needed - directories
        after = 3 if fail_during == "files" else len(files) + 1

        with failing_writes(dest_store, after) as written:
            with pytest.raises(InjectedFailure):
                source_store.push(dest_store, "project/main")
        assert written == [after]
        assert not dest_store.has_ref("project/main"), "a ref to an incomplete tree"
        assert dest_store.list_refs() == []
        present = needed - dest_store.find_missing(needed)
        assert len(present) == after
        for digest in present & directories:
            assert missing_in_tree(dest_store.verified, digest) == set(), (
                "a Directory before its children"
            )

        result = source_store.push(dest_store, "project/main")
        assert result.blobs_sent == len(needed) - after, "rerun sends only what is missing"
        assert dest_store.get_ref("project/main") == root
        dest_store.checkout("project/main", tmp_path / "out")
        assert_tree_equal(source, tmp_path / "out")

    @pytest.mark.parametrize("size", [100, 2 * CHUNK_SIZE + 5])
    def test_transfer_refuses_a_corrupt_source_blob(
        self, store: Store, second_store: Store, tmp_path: Path, size: int
    ) -> None:
        data = random_bytes(size, seed=11)
        file_digest = store.put_bytes(data)
        root = store.put_directory(
            Directory(files=[FileNode(name="f", digest=file_digest.to_proto())])
        )
        store.set_ref("project/main", root)
        self.corrupt_blob(store, file_digest, data[:-1] + bytes([data[-1] ^ 0xFF]))
        with pytest.raises(CorruptBlobError) as caught:
            store.push(second_store, "project/main")
        assert caught.value.digest == file_digest
        assert not second_store.has_ref("project/main")
        assert second_store.find_missing([file_digest, root]) == {file_digest, root}


# -- maintenance: prune, gc, fsck, du ----------------------------------------------------------


def _blob(n: int, seed: str) -> bytes:
    """``n`` bytes unique to ``seed``."""
    unit = (seed.encode() + b"-") * (n // (len(seed) + 1) + 1)
    return unit[:n]


_SHARED = _blob(1000, "shared")


def _import_files(store: Store, root: Path, files: Mapping[str, bytes]) -> Digest:
    return store.import_directory(write_files(root, files))


def _stored(store: Store) -> dict[Digest, float]:
    return {info.digest: info.mtime for info in store.blobs.iter_blobs()}


def _closure(store: Store, root: Digest) -> set[Digest]:
    return {d for d in store.tree_digests(root) if d.size}


def _import_without(store: Store, root: Path, files: Mapping[str, bytes], absent: bytes) -> Digest:
    """Import ``files`` into ``store`` but leave out the blob ``absent``: a tree with a hole,
    made without the delete capability."""
    scratch = open_store("memory://")
    try:
        tree = _import_files(scratch, root, files)
        hole = Digest.of_bytes(absent)
        blobs = [(d, scratch.read_bytes(d)) for d in scratch.tree_digests(tree) if d != hole]
    finally:
        scratch.close()
    store.put_many(blobs)
    return tree


class MaintenanceConformance(ConformanceBase):
    """prune, gc, fsck and du through the backend contract.

    A backend that cannot list or delete blobs is checked to refuse prune, gc and du with
    :class:`~casframe.UnsupportedOperationError`; fsck then checks what the refs reach.
    """

    # -- timing: the grace period must be longer than the backend's mtime steps ----------------

    @property
    def grace(self) -> float:
        """A short grace period this backend's timestamps can resolve."""
        return 1.0 + self.mtime_resolution

    def wait_past_grace(self) -> None:
        time.sleep(self.grace + 0.2 + self.mtime_resolution)

    def settle(self) -> None:
        """Let what was just stored become older than ``now`` at the backend's resolution, so
        that a prune with no grace period may delete it."""
        if self.mtime_resolution:
            time.sleep(self.mtime_resolution + 0.1)

    def refused(self, operation: Callable[[], object], *needs: Capability) -> bool:
        """True (after checking the clear refusal) when the backend lacks one of ``needs``."""
        lacking = [c for c in needs if self.lacks(c)]
        if not lacking:
            return False
        with pytest.raises(UnsupportedOperationError, match="not supported by this backend"):
            operation()
        return True

    def cannot_sweep(self, store: Store) -> bool:
        return self.refused(
            lambda: store.prune(grace_period=0), Capability.LIST, Capability.DELETE
        )

    # -- prune ----------------------------------------------------------------------------------

    def test_prune_grace_zero_removes_exactly_the_unreachable(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.cannot_sweep(store):
            return
        a = _import_files(store, tmp_path / "a", {"shared": _SHARED, "x/a1": _blob(300, "a1")})
        b = _import_files(store, tmp_path / "b", {"shared": _SHARED, "y/b1": _blob(500, "b1")})
        gone = _import_files(store, tmp_path / "g", {"shared": _SHARED, "z": _blob(700, "gone")})
        store.set_ref("keep/a", a)
        store.set_ref("keep/b", b)
        store.set_ref("gone", gone)
        store.delete_ref("gone")
        loose = store.put_bytes(b"a loose blob no tree names")
        unnamed = _import_files(store, tmp_path / "u", {"u": _blob(900, "unnamed")})

        before = _stored(store)
        reachable = _closure(store, a) | _closure(store, b)
        garbage = set(before) - reachable
        assert loose in garbage and unnamed in garbage and Digest.of_bytes(_SHARED) not in garbage

        self.settle()
        report = store.prune(grace_period=0)

        assert set(_stored(store)) == reachable
        assert report.objects_scanned == len(before)
        assert report.bytes_scanned == sum(d.size for d in before)
        assert report.objects_freed == len(garbage)
        assert report.bytes_freed == sum(d.size for d in garbage)
        assert report.objects_reachable == len(reachable)
        assert report.objects_kept_young == 0
        assert report.refs_checked == 2 and not report.problems
        assert not missing_in_tree(store.verified, a) and not missing_in_tree(store.verified, b)
        again = store.prune(grace_period=0)
        assert again.objects_freed == 0 and again.objects_scanned == len(reachable)

    def test_prune_spares_objects_younger_than_the_grace_period(self, store: Store) -> None:
        if self.cannot_sweep(store):
            return
        old = store.put_bytes(b"old garbage")
        self.wait_past_grace()
        kept_all = store.prune(grace_period=3600)
        assert kept_all.objects_freed == 0 and kept_all.objects_kept_young == 1
        assert store.contains(old)

        # Stored just before the prune: a slow prune above must not eat into its grace.
        young = store.put_bytes(b"young garbage")
        report = store.prune(grace_period=self.grace)
        assert not store.contains(old)
        assert store.contains(young)
        assert (report.objects_freed, report.bytes_freed) == (1, old.size)
        assert (report.objects_kept_young, report.bytes_kept_young) == (1, young.size)

    def test_storing_an_old_blob_again_renews_its_grace_period(self, store: Store) -> None:
        if self.cannot_sweep(store):
            return
        digest = store.put_bytes(b"stored long ago")
        self.wait_past_grace()
        store.put_bytes(b"stored long ago")
        store.prune(grace_period=self.grace)
        assert store.contains(digest)

    def test_set_ref_renews_the_grace_period_of_its_tree(
        self, store: Store, tmp_path: Path
    ) -> None:
        """An old unreferenced tree that gets a ref survives a prune that marked before."""
        if self.cannot_sweep(store):
            return
        tree = _import_files(store, tmp_path / "t", {"f": _blob(100, "f"), "d/g": _blob(200, "g")})
        self.wait_past_grace()
        store.set_ref("late", tree)
        store.blobs.delete_blobs(list(_closure(store, tree)), older_than=time.time() - self.grace)
        assert not missing_in_tree(store.verified, tree)

    def test_prune_dry_run_deletes_nothing_and_sizes_each_ref(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.refused(lambda: store.prune(grace_period=0, dry_run=True), Capability.LIST):
            return
        a = _import_files(store, tmp_path / "a", {"shared": _SHARED, "a1": _blob(3000, "a1")})
        b = _import_files(store, tmp_path / "b", {"shared": _SHARED, "s/b1": _blob(5000, "b1")})
        store.set_ref("a", a)
        store.set_ref("b", b)
        store.set_ref("b-copy", b)  # same tree: neither b nor b-copy alone keeps anything alive
        garbage = store.put_bytes(_blob(400, "garbage"))
        before = _stored(store)

        report = store.prune(grace_period=0, dry_run=True)

        assert _stored(store) == before
        assert report.dry_run
        assert (report.objects_freed, report.bytes_freed) == (1, garbage.size)
        usage = {u.name: u for u in report.refs}
        assert set(usage) == {"a", "b", "b-copy"}
        only_a = _closure(store, a) - _closure(store, b)
        assert usage["a"].exclusive_bytes == sum(d.size for d in only_a)
        assert usage["a"].exclusive_objects == len(only_a)
        assert usage["a"].total_bytes == sum(d.size for d in _closure(store, a))
        assert usage["b"].exclusive_bytes == 0 and usage["b-copy"].exclusive_bytes == 0
        assert usage["b"].total_bytes == sum(d.size for d in _closure(store, b))
        json.dumps(report.to_dict())  # JSON-ready as it is
        assert report.to_dict()["refs"][0]["digest"].count("/") == 1

        if self.cannot_sweep(store):
            return
        # The exclusive size is what deleting the ref frees.
        store.delete_ref("a")
        self.settle()
        freed = store.prune(grace_period=0)
        assert freed.bytes_freed == usage["a"].exclusive_bytes + garbage.size

    def test_prune_keeps_what_a_damaged_tree_still_reaches(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.cannot_sweep(store):
            return
        lost_file = _blob(100, "lost")
        tree = _import_files(
            store, tmp_path / "t", {"lost/f": lost_file, "kept/g": _blob(200, "kept")}
        )
        store.set_ref("damaged", tree)
        root = store.get_directory(tree)
        lost = next(Digest.from_proto(n.digest) for n in root.directories if n.name == "lost")
        store.blobs.delete_blobs([lost])
        # Change a name in the root Directory: its hash no longer matches, yet it decodes.
        self.corrupt_blob(store, tree, store.read_bytes(tree).replace(b"kept", b"kepT"))
        orphan = Digest.of_bytes(lost_file)  # only the missing Directory named it
        expected = set(_stored(store)) - {orphan}

        self.settle()
        report = store.prune(grace_period=0)

        assert set(_stored(store)) == expected  # everything still reachable was kept
        assert Digest.of_bytes(_blob(200, "kept")) in expected
        problems = {(p.ref, p.digest, p.kind) for p in report.problems}
        assert ("damaged", lost, "missing") in problems
        assert ("damaged", tree, "corrupt") in problems

    def test_action_cache_and_asset_refs_keep_what_they_name(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.cannot_sweep(store):
            return
        out = store.put_bytes(_blob(300, "output file"))
        log = store.put_bytes(b"stdout of the action")
        in_tree = store.put_bytes(_blob(200, "file of an output Tree"))
        tree_message = Tree(root=Directory(files=[FileNode(name="x", digest=in_tree.to_proto())]))
        tree = store.put_bytes(tree_message.SerializeToString(deterministic=True))
        root = _import_files(store, tmp_path / "o", {"y": _blob(250, "output directory file")})
        result = ActionResult(
            output_files=[OutputFile(path="out", digest=out.to_proto())],
            output_directories=[
                OutputDirectory(path="t", tree_digest=tree.to_proto()),
                OutputDirectory(path="r", root_directory_digest=root.to_proto()),
            ],
            stdout_digest=log.to_proto(),
        )
        result_digest = store.put_bytes(result.SerializeToString(deterministic=True))
        action = Digest.of_bytes(b"an action")
        store.set_ref(
            f"{ACTION_RESULT_REF_PREFIX}_/{action.hash}/{action.size}", result_digest,
            check_complete=False,
        )
        asset = store.put_bytes(b"a fetched asset")
        store.set_ref(f"{BLOB_REF_PREFIX}key", asset, check_complete=False)
        garbage = store.put_bytes(b"garbage")
        expected = set(_stored(store)) - {garbage}

        self.settle()
        report = store.prune(grace_period=0)

        assert set(_stored(store)) == expected
        assert not report.problems  # neither is parsed as a Directory
        assert store.fsck().ok
        usage = {u.name.split("/")[0]: u for u in store.du().refs}
        assert usage["asset"].total_bytes == asset.size
        assert usage["ac"].total_objects == len(expected) - 1  # all but the asset

        store.blobs.delete_blobs([in_tree, log])
        found = {(p.kind, p.digest) for p in store.fsck().problems}
        assert found == {("missing", in_tree), ("missing", log)}

    def test_maintenance_refuses_bad_arguments(self, store: Store) -> None:
        with pytest.raises(ValueError, match="grace period"):
            store.prune(grace_period=-1)
        with pytest.raises(ValueError, match="low watermark"):
            store.gc(max_size="1G", low_watermark=1.5)
        with pytest.raises(ValueError, match="invalid size"):
            store.gc(max_size="lots")

    # -- gc -------------------------------------------------------------------------------------

    def _refs_in_order(self, store: Store, tmp_path: Path, names: list[str]) -> dict[str, Digest]:
        refs = {}
        for name in names:
            tree = _import_files(
                store, tmp_path / name.replace("/", "_"), {"f": _blob(10_000, name)}
            )
            store.set_ref(name, tree)
            refs[name] = tree
            time.sleep(0.05)  # distinct access times: the order set is the LRU order
        return refs

    def test_gc_expires_least_recently_used_refs_first(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.refused(lambda: store.gc(max_size="1G"), Capability.LIST, Capability.DELETE):
            return
        refs = self._refs_in_order(store, tmp_path, ["old", "mid", "new"])
        store.get_ref("old")  # using a ref makes it recent: now "mid" is the least recently used
        mid = _closure(store, refs["mid"])
        total = sum(d.size for d in _stored(store))
        assert 30_000 < total < 31_000

        self.settle()
        report = store.gc(max_size=25_000, low_watermark=0.9, grace_period=0)

        assert report.over_quota and report.reached_target
        assert [u.name for u in report.refs_deleted] == ["mid"]
        assert {r.name for r in store.list_refs()} == {"old", "new"}
        assert report.prune is not None
        assert report.prune.bytes_freed == sum(d.size for d in mid)
        remaining = sum(d.size for d in _stored(store))
        assert remaining == report.predicted_bytes <= report.target_bytes == 22_500
        json.dumps(report.to_dict())

    def test_gc_never_expires_refs_matching_keep(self, store: Store, tmp_path: Path) -> None:
        if self.refused(lambda: store.gc(max_size="1G"), Capability.LIST, Capability.DELETE):
            return
        self._refs_in_order(store, tmp_path, ["release/1", "ci/2", "ci/3"])

        self.settle()
        report = store.gc(max_size=25_000, low_watermark=0.9, keep=["release/*"], grace_period=0)

        assert report.refs_kept == ["release/1"]
        assert [u.name for u in report.refs_deleted] == ["ci/2"]
        assert {r.name for r in store.list_refs()} == {"release/1", "ci/3"}

        # Nothing left to expire but protected refs: gc stops short of its target and says so.
        tight = store.gc(max_size=5_000, keep=["release/*", "ci/*"], grace_period=0)
        assert not tight.refs_deleted and not tight.reached_target
        assert {r.name for r in store.list_refs()} == {"release/1", "ci/3"}

    def test_gc_dry_run_under_quota_and_young_data(self, store: Store, tmp_path: Path) -> None:
        if self.refused(
            lambda: store.gc(max_size="1G", dry_run=True), Capability.LIST
        ) or self.refused(lambda: store.gc(max_size="1G"), Capability.DELETE):
            return
        self._refs_in_order(store, tmp_path, ["a", "b", "c"])
        garbage = store.put_bytes(_blob(1000, "garbage"))
        before = _stored(store)

        self.settle()
        dry = store.gc(max_size="20K", low_watermark=0.5, grace_period=0, dry_run=True)
        assert _stored(store) == before and len(store.list_refs()) == 3
        assert [u.name for u in dry.refs_deleted] == ["a", "b"]  # 10,240 × 0.5 leaves room for one
        assert dry.prune is not None and dry.prune.dry_run
        assert dry.prune.bytes_freed == sum(u.exclusive_bytes for u in dry.refs_deleted) + 1000
        assert dry.predicted_bytes == sum(d.size for d in before) - dry.prune.bytes_freed

        under = store.gc(max_size="1M", grace_period=0)
        assert not under.over_quota and not under.refs_deleted
        assert under.prune is not None and under.prune.objects_freed == 1
        assert not store.contains(garbage) and len(store.list_refs()) == 3

        # Young data cannot be freed by expiring refs: gc leaves the refs alone.
        young = store.gc(max_size=1000, grace_period=3600)
        assert young.over_quota and not young.refs_deleted and not young.reached_target
        assert len(store.list_refs()) == 3

    # -- fsck -----------------------------------------------------------------------------------

    def _damageable(self, store: Store, tmp_path: Path) -> dict[str, Digest]:
        """Two refs; ``damaged``'s tree lacks the blob of ``sub/gone`` from the start."""
        files = {"flip": _blob(2000, "flip"), "trunc": _blob(3000, "trunc"),
                 "sub/gone": _blob(400, "gone"), "ok": _blob(500, "ok")}
        tree = _import_without(store, tmp_path / "t", files, absent=files["sub/gone"])
        other = _import_files(
            store, tmp_path / "o", {"ok": _blob(500, "ok"), "mine": _blob(600, "mine")}
        )
        store.set_ref("damaged", tree, check_complete=False)
        store.set_ref("healthy", other)
        return {
            "tree": tree,
            "other": other,
            "flip": Digest.of_bytes(files["flip"]),
            "trunc": Digest.of_bytes(files["trunc"]),
            "gone": Digest.of_bytes(files["sub/gone"]),
        }

    def test_fsck_of_a_healthy_store_is_ok(self, store: Store, tmp_path: Path) -> None:
        tree = _import_files(
            store, tmp_path / "t", {"a": _blob(500, "ok"), "sub/b": _blob(600, "b")}
        )
        other = _import_files(store, tmp_path / "o", {"c": _blob(700, "c")})
        store.set_ref("one", tree)
        store.set_ref("two", other)

        report = store.fsck()

        assert report.ok and report.to_dict()["ok"] is True
        assert report.refs_checked == 2 and report.directories_checked == 3
        assert report.listed == (not self.lacks(Capability.LIST))
        if report.listed:
            assert report.blobs_checked == len(_stored(store))
        else:
            assert report.blobs_checked == len(_closure(store, tree) | _closure(store, other))
        assert not report.incomplete_refs

    def test_fsck_finds_flipped_truncated_and_missing_blobs(
        self, store: Store, tmp_path: Path
    ) -> None:
        d = self._damageable(store, tmp_path)
        flipped = bytearray(_blob(2000, "flip"))
        flipped[1000] ^= 0x01
        self.corrupt_blob(store, d["flip"], bytes(flipped))
        self.corrupt_blob(store, d["trunc"], _blob(3000, "trunc")[:1234])

        # Reading damaged content is a typed error, never data.
        for digest in (d["flip"], d["trunc"]):
            with pytest.raises(CorruptBlobError, match=digest.hash):
                store.read_bytes(digest)
            with pytest.raises(CorruptBlobError), store.open_read(digest) as stream:
                stream.read()

        report = store.fsck()

        assert not report.ok and not report.to_dict()["ok"]
        found = {(p.kind, p.digest): p for p in report.problems}
        assert set(found) == {
            ("corrupt", d["flip"]), ("corrupt", d["trunc"]), ("missing", d["gone"])
        }
        assert all(p.refs == ["damaged"] for p in report.problems)
        assert "1234 bytes" in found[("corrupt", d["trunc"])].detail
        assert report.incomplete_refs == ["damaged"]
        assert json.loads(json.dumps(report.to_dict()))["problems"][0]["refs"] == ["damaged"]

    def test_fsck_repair_deletes_only_corrupt_blobs(self, store: Store, tmp_path: Path) -> None:
        if self.refused(lambda: store.fsck(repair=True), Capability.DELETE):
            return
        d = self._damageable(store, tmp_path)
        flipped = bytearray(_blob(2000, "flip"))
        flipped[0] ^= 0x80
        self.corrupt_blob(store, d["flip"], bytes(flipped))
        self.corrupt_blob(store, d["trunc"], b"short")
        healthy = _closure(store, d["other"])

        report = store.fsck(repair=True)

        assert sorted(report.deleted) == sorted([d["flip"], d["trunc"]])
        assert report.incomplete_refs == ["damaged"]
        assert store.find_missing([d["flip"], d["trunc"]]) == {d["flip"], d["trunc"]}
        assert not store.find_missing(healthy)  # the healthy ref is untouched
        assert not missing_in_tree(store.verified, d["other"])

        again = store.fsck()
        assert {(p.kind, p.digest) for p in again.problems} == {
            ("missing", d["flip"]), ("missing", d["trunc"]), ("missing", d["gone"])
        }
        assert again.incomplete_refs == ["damaged"]

    def test_fsck_checks_the_form_of_directories(self, store: Store) -> None:
        file_digest = store.put_bytes(b"content")
        unsorted = Directory(
            files=[
                FileNode(name="b", digest=file_digest.to_proto()),
                FileNode(name="a", digest=file_digest.to_proto()),
            ]
        )
        unsorted_digest = store.put_bytes(unsorted.SerializeToString(deterministic=True))
        unsafe = Directory(files=[FileNode(name="..", digest=file_digest.to_proto())])
        unsafe_digest = store.put_bytes(unsafe.SerializeToString(deterministic=True))
        store.set_ref("unsorted", unsorted_digest)
        store.set_ref("unsafe", unsafe_digest, check_complete=False)
        store.set_ref(
            "not-a-tree", store.put_bytes(b"\xff\xff\xff not protobuf"), check_complete=False
        )

        report = store.fsck()

        kinds = {(p.kind, tuple(p.refs)) for p in report.problems}
        assert kinds == {
            ("not-canonical", ("unsorted",)), ("unsafe", ("unsafe",)),
            ("not-a-directory", ("not-a-tree",)),
        }
        if self.lacks(Capability.DELETE):
            return
        # Repair deletes corrupt blobs only: well-formed-but-wrong Directories stay.
        assert not store.fsck(repair=True).deleted
        assert store.contains(unsorted_digest) and store.contains(unsafe_digest)

    # -- du -------------------------------------------------------------------------------------

    def test_du_totals_and_exclusive_sizes(self, store: Store, tmp_path: Path) -> None:
        if self.refused(store.du, Capability.LIST):
            return
        a = _import_files(store, tmp_path / "a", {"shared": _SHARED, "a1": _blob(3000, "a1")})
        b = _import_files(store, tmp_path / "b", {"shared": _SHARED, "b1": _blob(5000, "b1")})
        store.set_ref("a", a)
        store.set_ref("b", b)
        garbage = store.put_bytes(_blob(77, "garbage"))
        listing = _stored(store)

        report = store.du()

        assert report.total_objects == len(listing)
        assert report.total_bytes == sum(d.size for d in listing)
        assert (report.unreachable_objects, report.unreachable_bytes) == (1, garbage.size)
        assert report.reachable_bytes == report.total_bytes - garbage.size
        usage = {u.name: u for u in report.refs}
        for name, tree, other in (("a", a, b), ("b", b, a)):
            mine = _closure(store, tree)
            assert usage[name].total_bytes == sum(x.size for x in mine)
            assert usage[name].total_objects == len(mine)
            assert usage[name].exclusive_bytes == sum(
                x.size for x in mine - _closure(store, other)
            )
        assert [u.name for u in report.refs] == ["b", "a"]  # most exclusive bytes first
        json.dumps(report.to_dict())


class StoreConformance(
    BlobConformance, RefConformance, TreeConformance, TransferConformance, MaintenanceConformance
):
    """Everything a casframe store must do. Subclass it once per backend."""
