"""The read-through cache store: a local store in front of a remote one, on public modules alone.

How each operation is served (docs/cache.md explains the choices):

- ``find_missing_blobs`` asks the local store, then the remote about what local lacks only.
- reads are served from local; on a local miss the blob streams from the remote while it is
  written into local, where it becomes visible only when its digest checks out (a corrupt
  remote blob raises :class:`CorruptBlobError` and leaves nothing in local).
- writes go to the remote first and then to local, and fail if either fails: local never holds
  a blob whose remote write failed, so "local has it" keeps meaning "it was on the remote".
- refs live on the remote alone. Setting one copies to the remote, from local, whatever of the
  tree the remote lacks (its own prune may have removed a blob local still has) and sets the ref
  there last, so a ref on the shared remote never points at an incomplete tree (a ref to a
  single blob, such as the server's action results, needs only that blob there).
- freshening (``find_missing(freshen=True)``, what writers and ``casframe serve``'s
  FindMissingBlobs ask before reusing blobs) asks the remote, the shared truth: what it holds is
  touched there, so that a prune of the remote run from another machine spares it for its
  grace period; what it lost but local still holds is sent back from local. Local presence
  alone would say "present" for a blob the remote's prune may delete at any moment.
- capabilities: ``local-path`` when the local store has it (a missing blob is filled first),
  and ``touch`` (on the remote). No ``list`` or ``delete``: deleting from a cache would have
  to mean deleting from the shared remote. Evict by running maintenance on the local store.

This module must never hand out unverified remote bytes as a local blob, nor set a ref on the
remote without checking the remote holds its tree; it uses casframe's public modules only.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TypeVar
from urllib.parse import quote

from casframe import (
    DIGEST_FUNCTIONS,
    BlobInfo,
    BlobLimits,
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    Capability,
    ConfigError,
    CorruptBlobError,
    Digest,
    DigestMismatchError,
    RefCapability,
    RefInfo,
    RefStore,
    Store,
    UnsupportedDigestFunctionError,
    UnsupportedOperationError,
)
from casframe.blobs import VerifiedBlobs, VerifiedUpload
from casframe.reapi import action_outputs, parse_action_result
from casframe.refkinds import RefKind, action_result_outputs, ref_kind
from casframe.transfer import transfer

__all__ = ["CacheBlobStore", "CacheRefStore", "CacheStats", "cache_store"]

log = logging.getLogger("casframe.cache")

_T = TypeVar("_T")


@dataclass(frozen=True)
class CacheStats:
    """What a cache store did since it was opened."""

    #: Blob reads (and local paths) served by the local store.
    hits: int = 0
    #: Blob reads (and local paths) that had to go to the remote.
    misses: int = 0
    #: Bytes of remote blobs written into the local store by reads.
    bytes_filled: int = 0
    #: Digests ``find_missing`` asked the remote about (those local lacked).
    remote_lookups: int = 0

    def __str__(self) -> str:
        return (
            f"hits: {self.hits}, misses: {self.misses}, filled: {self.bytes_filled} bytes, "
            f"remote lookups: {self.remote_lookups}"
        )


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = {"hits": 0, "misses": 0, "bytes_filled": 0, "remote_lookups": 0}

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._values[name] += amount

    def snapshot(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._values)


def _read_into(stream: BinaryIO, view: memoryview) -> int:
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        return int(readinto(view))
    chunk = stream.read(len(view))
    view[: len(chunk)] = chunk
    return len(chunk)


class _FillingReader(io.RawIOBase):
    """A remote blob streamed to the reader and, on the way, into the local store.

    The local copy is committed when the remote stream has given exactly the digest's size and
    then ends, and only if the bytes hash to the digest; anything else aborts it and raises
    :class:`CorruptBlobError`. Closing the reader early aborts the local copy too.
    """

    def __init__(
        self, digest: Digest, source: BinaryIO, local: Store, remote: Store, counters: _Counters
    ) -> None:
        super().__init__()
        self._digest = digest
        self._source = source
        self._remote_url = remote.url
        self._counters = counters
        self._upload: VerifiedUpload = local.open_upload(digest)
        self._position = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        remaining = self._digest.size - self._position
        if self._done or remaining <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        try:
            n = _read_into(self._source, view[: min(len(view), remaining)])
            if not n:
                raise self._corrupt(f"holds only {self._position} bytes")
            self._upload.write(view[:n])
            self._position += n
            if self._position == self._digest.size:
                self._finish()
        except BaseException:
            self._upload.abort()
            raise
        return n

    def _finish(self) -> None:
        if self._source.read(1):
            raise self._corrupt(f"holds more than {self._digest.size} bytes")
        try:
            self._upload.commit()
        except DigestMismatchError as exc:
            raise self._corrupt(f"returned content hashing to {exc.actual.hash}") from None
        self._done = True
        self._counters.add(bytes_filled=self._digest.size)

    def _corrupt(self, detail: str) -> CorruptBlobError:
        return CorruptBlobError(self._digest, f"the remote {self._remote_url} {detail}")

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._done:
                self._upload.abort()
        finally:
            try:
                self._source.close()
            finally:
                super().close()


class _WriteThrough(BlobWriter):
    """One upload to the remote and the local store; committed on the remote first."""

    def __init__(self, remote: BlobWriter, local: BlobWriter) -> None:
        self._remote = remote
        self._local = local

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._remote.write(data)
        self._local.write(data)

    def commit(self, digest: Digest) -> None:
        # Remote first: if it fails, local is never given a blob the remote may not have.
        self._remote.commit(digest)
        self._local.commit(digest)

    def abort(self) -> None:
        try:
            self._local.abort()
        finally:
            self._remote.abort()


class CacheBlobStore(BlobStore):
    """Blobs of a read-through, write-through cache: ``local`` in front of ``remote``.

    ``local`` and ``remote`` are open stores; the cache owns them and closes them with itself.
    """

    # The class declares every function; an instance, those both of its stores can hold.
    digest_functions = frozenset(DIGEST_FUNCTIONS)

    def __init__(self, local: Store, remote: Store) -> None:
        if local.digest_function != remote.digest_function:
            raise UnsupportedDigestFunctionError(
                f"the cache's local {local.url} ({local.digest_function.name}) and remote "
                f"{remote.url} ({remote.digest_function.name}) use different digest functions"
            )
        self.local = local
        self.remote = remote
        self.digest_function = local.digest_function
        self.digest_functions = local.digest_functions & remote.digest_functions
        self._counters = _Counters()
        self.capabilities = frozenset(
            {Capability.TOUCH} | ({Capability.LOCAL_PATH} & local.blobs.capabilities)
        )
        near, far = local.blobs.limits, remote.blobs.limits
        self.limits = BlobLimits(
            max_batch_digests=min(near.max_batch_digests, far.max_batch_digests),
            max_batch_bytes=min(near.max_batch_bytes, far.max_batch_bytes),
            max_concurrency=max(near.max_concurrency, far.max_concurrency),
        )

    @property
    def stats(self) -> CacheStats:
        """Hits, misses and bytes filled so far."""
        return self._counters.snapshot()

    def describe(self) -> str:
        return f"cache(local={self.local.url}, remote={self.remote.url})"

    def close(self) -> None:
        stats = self.stats
        if stats.hits or stats.misses:
            log.info("%s: %s", self.describe(), stats)
        try:
            self.local.close()
        finally:
            self.remote.close()

    # -- primitives -------------------------------------------------------------------------

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        not_local = self.local.blobs.find_missing_blobs(digests)
        if not not_local:
            return set()
        self._counters.add(remote_lookups=len(not_local))
        return self.remote.blobs.find_missing_blobs(not_local)

    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        def from_local() -> BinaryIO:
            return self.local.blobs.open_blob(digest, offset)

        if offset:
            # The bytes before the offset are needed to verify the local copy: fill it whole,
            # then read from local.
            return self._read_through(from_local, lambda: self._fill(digest, then=from_local))
        return self._read_through(from_local, lambda: self._stream_from_remote(digest))

    def _stream_from_remote(self, digest: Digest) -> BinaryIO:
        try:
            source = self.remote.blobs.open_blob(digest)
        except BlobNotFoundError:
            raise self._not_found(digest) from None
        try:
            reader = _FillingReader(digest, source, self.local, self.remote, self._counters)
            return reader  # type: ignore[return-value]
        except BaseException:
            source.close()
            raise

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        remote = self.remote.blobs.begin_write(size_hint)
        return self._write_through(remote, lambda: self.local.blobs.begin_write(size_hint))

    def begin_write_for(self, digest: Digest) -> BlobWriter:
        remote = self.remote.blobs.begin_write_for(digest)
        return self._write_through(remote, lambda: self.local.blobs.begin_write_for(digest))

    @staticmethod
    def _write_through(remote: BlobWriter, begin_local: Callable[[], BlobWriter]) -> BlobWriter:
        try:
            local = begin_local()
        except BaseException:
            remote.abort()
            raise
        return _WriteThrough(remote, local)

    # -- batches ----------------------------------------------------------------------------

    def read_blobs(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        # Each blob is tried in local as open_blob does, so that both paths report a damaged
        # local copy alike; what local lacks is then read from the remote in one batch.
        misses: list[Digest] = []
        for digest in digests:
            try:
                stream = self.local.blobs.open_blob(digest)
            except BlobNotFoundError:
                misses.append(digest)
                continue
            with stream:
                data = stream.read()
            self._counters.add(hits=1)
            yield digest, data
        if not misses:
            return
        self._counters.add(misses=len(misses))
        try:
            fetched = list(self.remote.blobs.read_blobs(misses))
        except BlobNotFoundError as exc:
            raise BlobNotFoundError(exc.digests, self.describe()) from None
        try:
            self.local.put_many(fetched)
        except DigestMismatchError as exc:
            raise CorruptBlobError(
                exc.expected,
                f"the remote {self.remote.url} returned content hashing to {exc.actual.hash}",
            ) from None
        self._counters.add(bytes_filled=sum(len(data) for _, data in fetched))
        yield from fetched

    def write_blobs(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        items = list(blobs)
        self.remote.blobs.write_blobs(items)
        self.local.blobs.write_blobs(items)

    # -- capabilities -----------------------------------------------------------------------

    def local_path(self, digest: Digest) -> str:
        if Capability.LOCAL_PATH not in self.capabilities:
            raise UnsupportedOperationError(
                f"{self.describe()} has no local files: its local store has none"
            )

        def from_local() -> str:
            return self.local.blobs.local_path(digest)

        return self._read_through(from_local, lambda: self._fill(digest, then=from_local))

    def iter_blobs(self) -> Iterator[BlobInfo]:
        raise self._maintenance_elsewhere("list its blobs")

    def delete_blobs(
        self, digests: Iterable[Digest], *, older_than: float | None = None
    ) -> Collection[Digest]:
        raise self._maintenance_elsewhere("delete blobs")

    def touch_blobs(self, digests: Iterable[Digest]) -> Collection[Digest]:
        # On the remote, as far as it can: a remote without touch (grpc://) freshens what its
        # FindMissingBlobs is asked about (casframe serve does), so asking is touching there.
        return self.remote.find_missing(digests, freshen=True)

    def freshen_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        """Freshen on the remote; send back from local what the remote lost (its prune)."""
        self._counters.add(remote_lookups=len(digests))
        lost = self.remote.find_missing(digests, freshen=True)
        if not lost:
            return set()
        restorable = lost - self.local.find_missing(lost)
        for digest in sorted(restorable):
            self.remote.copy_blob_from(self.local, digest)
        return lost - restorable

    # -- helpers ----------------------------------------------------------------------------

    def _read_through(self, from_local: Callable[[], _T], from_remote: Callable[[], _T]) -> _T:
        """``from_local()``, counted as a hit; on a local miss, ``from_remote()``, as a miss."""
        try:
            result = from_local()
        except BlobNotFoundError:
            self._counters.add(misses=1)
            return from_remote()
        self._counters.add(hits=1)
        return result

    def _fill(self, digest: Digest, *, then: Callable[[], _T]) -> _T:
        """Copy one blob from the remote into local, verified (streamed when it is large);
        return what ``then()`` returns."""
        try:
            self.local.copy_blob_from(self.remote, digest)
        except BlobNotFoundError:
            raise self._not_found(digest) from None
        self._counters.add(bytes_filled=digest.size)
        return then()

    def _maintenance_elsewhere(self, what: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"a cache store cannot {what}: run maintenance on its local store "
            f"({self.local.url}) to evict, or on its remote ({self.remote.url})"
        )


class CacheRefStore(RefStore):
    """Refs of a cache store: the remote's, with completeness checked on the remote."""

    capabilities: frozenset[RefCapability] = frozenset()  # the remote's, per instance

    def __init__(self, blobs: CacheBlobStore) -> None:
        self._remote = blobs.remote
        self.capabilities = blobs.remote.refs.capabilities
        # Reads the tree of a ref being set through the cache (local first). Never closed:
        # the cache store closes the stores it is made of.
        self._through_cache = VerifiedBlobs(blobs)

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        return self._remote.refs.get_ref(name, touch=touch)

    def set_ref(self, name: str, digest: Digest) -> None:
        kind = ref_kind(name)
        if kind is RefKind.TREE:
            # A transfer to the remote: it sends what the remote lacks (read through the
            # cache), children before parents, freshens the rest, and sets the ref last.
            transfer(self._through_cache, self._remote.verified, digest, ref=name)
        else:
            # A ref to one blob (the server's action results and Remote Asset blobs): that
            # blob, never parsed as a Directory, must be on the remote.
            if kind is RefKind.ACTION_RESULT:
                self._send_outputs(digest)
            if self._remote.find_missing([digest], freshen=True):
                self._remote.verified.copy_blob_from(self._through_cache, digest)
        self._remote.set_ref(name, digest, check_complete=False)

    def _send_outputs(self, digest: Digest) -> None:
        """Put on the remote what the ActionResult ``digest`` names, before its ref.

        The local side answers "present" for outputs the remote may have pruned since they
        were stored, so a client never sends them again: without this, other users of the
        remote would find the action's result but not its outputs.
        """
        through, remote = self._through_cache, self._remote.verified
        result = parse_action_result(digest, through.read_bytes(digest))
        blobs, roots = action_result_outputs(through, action_outputs(result))
        for missing in remote.find_missing(blobs, freshen=True):
            remote.copy_blob_from(through, missing)
        for root in roots:
            transfer(through, remote, root)

    def conflicting_ref(self, name: str) -> str | None:
        return self._remote.refs.conflicting_ref(name)  # refs live on the remote

    def delete_ref(self, name: str) -> None:
        self._remote.refs.delete_ref(name)

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        return self._remote.refs.list_refs(prefix)


def cache_store(local: Store, remote: Store) -> Store:
    """A cache store with ``local`` in front of ``remote``; it owns (and closes) both."""
    if local is remote:
        raise ConfigError(f"the cache's local and remote are the same store ({local.url})")
    blobs = CacheBlobStore(local, remote)
    url = f"cache://?local={_quote(local.url)}&remote={_quote(remote.url)}"
    return Store(blobs, CacheRefStore(blobs), url=url)


def _quote(url: str) -> str:
    # Readable, yet parsed back to the same URL: only the characters a query would split on.
    return quote(url, safe=":/@,;")
