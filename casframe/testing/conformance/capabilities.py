"""The blob capabilities a backend declares: each one it declares works, and each one it does
not is refused with :class:`~casframe.UnsupportedOperationError`."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from casframe import (
    BlobNotFoundError,
    Capability,
    Digest,
    Store,
    UnsupportedOperationError,
)
from casframe.testing import (
    LARGE_FILE_SIZE,
    random_bytes,
)
from casframe.testing.conformance.base import ConformanceBase, digest_of, empty_of


class CapabilityConformance(ConformanceBase):
    """The blob capabilities: each declared one works, each undeclared one is refused."""

    def test_capability_list(self, store: Store) -> None:
        a, b = store.put_bytes(b"listed a"), store.put_bytes(b"listed b")
        if self.lacks(store, Capability.LIST):
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
        absent = digest_of(store, b"was never here")
        if self.lacks(store, Capability.DELETE):
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
        absent = digest_of(store, b"not here")
        if self.lacks(store, Capability.TOUCH):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.blobs.touch_blobs([digest])
            return

        def mtime() -> float | None:
            if self.lacks(store, Capability.LIST):
                return None
            return next(i.mtime for i in store.blobs.iter_blobs() if i.digest == digest)

        before = mtime()
        time.sleep(max(0.02, 1.05 * self.mtime_resolution))
        reported = store.blobs.touch_blobs([digest, absent])  # absent ones are ignored
        assert list(reported) == [absent], "touch_blobs returns the digests it found absent"
        after = mtime()
        if before is not None and after is not None:
            assert after > before
        assert store.read_bytes(digest) == b"touch me"
        assert store.find_missing([absent]) == {absent}

    def test_find_missing_with_freshen_touches_what_is_present(self, store: Store) -> None:
        """What writers ask before reusing blobs (``freshen_blobs`` on a backend with touch)."""
        digest = store.put_bytes(b"reused")
        absent = digest_of(store, b"never stored")
        wrong_size = Digest(digest.hash, digest.size + 1)
        before = self._mtime(store, digest)
        time.sleep(max(0.02, 1.05 * self.mtime_resolution))
        assert store.find_missing([digest, absent, wrong_size], freshen=True) == {
            absent, wrong_size
        }
        after = self._mtime(store, digest)
        if before is not None and after is not None and not self.lacks(store, Capability.TOUCH):
            assert after > before
        assert store.find_missing([absent], freshen=True) == {absent}
        assert store.find_missing([empty_of(store)], freshen=True) == set()

    def _mtime(self, store: Store, digest: Digest) -> float | None:
        if self.lacks(store, Capability.LIST):
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
        assert digest == digest_of(store, data[offset:])
        assert store.read_bytes(digest) == data[offset:]
        with open(path, "rb") as f:
            if self.lacks(store, Capability.COPY_FILE):
                # No copy path: put_open_file streamed the file; asking for one is refused.
                with pytest.raises(UnsupportedOperationError, match=r"\w"):
                    store.blobs.begin_write_copy(f.fileno())
                return
            writer, held = store.blobs.begin_write_copy(f.fileno())
            with held:
                assert held.read() == data, "the stream holds what the upload holds"
            writer.abort()
            writer.abort()  # safe to repeat
        other = digest_of(store, data + b"x")
        assert store.find_missing([other]) == {other}

    def test_delete_older_than_spares_what_is_newer(self, store: Store) -> None:
        """Prune's cutoff is re-checked as each blob is deleted (``older_than``)."""
        digest = store.put_bytes(b"stored just now")
        if self.lacks(store, Capability.DELETE):
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
        if self.lacks(store, Capability.TOUCH) or self.lacks(store, Capability.LIST):
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
        if self.lacks(store, Capability.LIST):
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
        absent = digest_of(store, b"not on disk")
        if self.lacks(store, Capability.LOCAL_PATH):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.blobs.local_path(digest)
            return
        with open(store.blobs.local_path(digest), "rb") as f:
            assert f.read() == b"on disk"
        with pytest.raises(BlobNotFoundError):
            store.blobs.local_path(absent)

    def test_link_blobs(self, store: Store, tmp_path: Path) -> None:
        digest = store.put_bytes(b"linked")
        absent = digest_of(store, b"not stored")
        dest = tmp_path / "links"
        dest.mkdir()
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self.lacks(store, Capability.LOCAL_PATH):
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
