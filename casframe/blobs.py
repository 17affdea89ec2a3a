"""The verified-blob layer: one backend's blobs, every byte checked against its digest.

Everything that must hold for blob content whatever the backend is enforced here, once: the
empty blob is always present, content is hashed while it streams in and committed only under
the digest it really has, reads are verified. The tree engine, transfer, maintenance, the
server and the ``cache://`` backend work through this layer; :class:`casframe.store.Store`
owns one and adds refs and the algorithms on top.

Bytes reach the backend unhashed by this layer in one place only, :meth:`VerifiedBlobs.
write_hashed`, for callers that computed each digest from the very bytes they pass. This
module must never import the algorithms or the store facade above it.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO

from casframe.digest import CHUNK_SIZE, Digest, Hasher
from casframe.digestfunctions import SHA256, DigestFunction
from casframe.directory import parse_directory
from casframe.errors import (
    CorruptBlobError,
    DigestMismatchError,
    InvalidDigestError,
    UnsupportedDigestFunctionError,
    UnsupportedOperationError,
)
from casframe.lazy import lazy_module
from casframe.spi import BlobStore, BlobWriter, Capability

if TYPE_CHECKING:
    import concurrent.futures as futures
    from concurrent.futures import ThreadPoolExecutor

    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory
else:
    futures = lazy_module("concurrent.futures")  # with logging: only once threads are used

__all__ = ["VerifiedBlobs", "VerifiedUpload", "VerifyingReader"]


class VerifyingReader(io.RawIOBase):
    """Passes a blob's bytes through, raising :class:`CorruptBlobError` when they end.

    Reading from offset 0 checks size and hash (computed with ``function``); reading from an
    offset checks the size only.
    Corruption is raised when the last byte is read (or when the stream ends early), so a
    consumer that writes the data somewhere must not publish it before reaching the end.
    """

    def __init__(
        self, raw: BinaryIO, digest: Digest, offset: int = 0, function: DigestFunction = SHA256
    ) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._hasher: Hasher | None = Hasher(function) if offset == 0 else None
        self._position = offset
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        remaining = self._digest.size - self._position
        if remaining <= 0:
            # One more read to prove the stored object is not longer than its digest says.
            extra = self._raw.read(1)
            if extra:
                raise CorruptBlobError(self._digest, "stored object is longer than its size")
            self._finish()
            return 0
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            n = readinto(view[: min(len(view), remaining)])
        else:
            chunk = self._raw.read(min(len(view), remaining))
            n = len(chunk)
            view[:n] = chunk
        if not n:
            raise CorruptBlobError(
                self._digest, f"stored object is truncated at {self._position} bytes"
            )
        if self._hasher is not None:
            self._hasher.update(view[:n])
        self._position += n
        if self._position == self._digest.size:
            self._finish()
        return n

    def _finish(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._hasher is not None:
            actual = self._hasher.digest()
            if actual != self._digest:
                raise CorruptBlobError(self._digest, f"content hashes to {actual.hash}")

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


class VerifiedUpload:
    """Content streaming into a backend writer, hashed on the way; visible only after
    :meth:`commit`, and only under the digest it really has.

    With ``expected``, content past the expected size or hashing to another digest raises
    :class:`DigestMismatchError` (the caller then calls :meth:`abort`; nothing is stored).
    Content is hashed with ``function``, the store's.
    """

    def __init__(
        self,
        writer: BlobWriter,
        expected: Digest | None = None,
        function: DigestFunction = SHA256,
    ) -> None:
        self._writer = writer
        self._expected = expected
        self._hasher = Hasher(function)

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._hasher.size

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self._hasher.update(chunk)
        if self._expected is not None and self._hasher.size > self._expected.size:
            raise DigestMismatchError(self._expected, self._hasher.digest())
        self._writer.write(chunk)

    def commit(self) -> Digest:
        digest = self._hasher.digest()
        if self._expected is not None and digest != self._expected:
            raise DigestMismatchError(self._expected, digest)
        if digest.size:
            self._writer.commit(digest)
        else:
            self._writer.abort()
        return digest

    def abort(self) -> None:
        self._writer.abort()


def _hash_stored(stored: BinaryIO, function: DigestFunction) -> Digest:
    """The digest of what a copy upload holds (``begin_write_copy``'s stream): hashed in
    place when it is a whole regular file of at least a chunk, which only the upload can
    change (a ``file://`` upload's temp file), else read as a stream. A stream with
    ``wait_copied`` is a file the copy is still filling: each window is hashed as soon as it
    is copied, while the next one is."""
    arriving = getattr(stored, "wait_copied", None)
    if arriving is not None:
        return Digest.of_own_file(stored.fileno(), function, arriving=arriving)
    try:
        fd = stored.fileno()
        whole_file = stored.tell() == 0 and stat.S_ISREG(os.fstat(fd).st_mode)
        size = os.fstat(fd).st_size
    except (AttributeError, OSError, ValueError):  # not a file (io.UnsupportedOperation)
        whole_file, fd, size = False, -1, 0
    if whole_file and size >= CHUNK_SIZE:
        return Digest.of_own_file(fd, function)
    return Digest.of_stream(stored, function)


class VerifiedBlobs:
    """The blobs of one backend, read and written only under the digests of their content.

    ``backend`` is the :class:`~casframe.spi.BlobStore` itself, for its limits, optional
    capabilities and digest function (every hash here is computed with
    ``backend.digest_function``); ``url`` names the store in error messages.
    """

    def __init__(self, backend: BlobStore, url: str = "") -> None:
        self.backend = backend
        self.url = url or backend.describe()
        #: The digest function of every blob here.
        self.function: DigestFunction = backend.digest_function

    def __repr__(self) -> str:
        return f"<VerifiedBlobs {self.url}>"

    def has(self, capability: Capability) -> bool:
        return capability in self.backend.capabilities

    def executor(self) -> ThreadPoolExecutor:
        """A thread pool sized for this backend."""
        return futures.ThreadPoolExecutor(max_workers=self.backend.limits.max_concurrency)

    def find_missing(self, digests: Iterable[Digest], *, freshen: bool = False) -> set[Digest]:
        """The subset of ``digests`` not stored here (the empty blob is never missing).

        With ``freshen``, blobs found present have their modification time refreshed (on a
        backend with the ``touch`` capability) and are then asked for again: whatever this call
        reports present was touched while it existed, so prune's grace period protects it from
        that moment on. Writers that reuse stored blobs ask this way before setting a ref.
        """
        wanted = {d for d in digests if d[1]}  # d.size, without a property call each
        if freshen and self.has(Capability.TOUCH):
            missing = self._query_missing(wanted, self.backend.freshen_blobs)
        else:
            missing = self._query_missing(wanted, self.backend.find_missing_blobs)
        return missing & wanted

    def _query_missing(
        self, wanted: set[Digest], query: Callable[[Collection[Digest]], set[Digest]]
    ) -> set[Digest]:
        batch = self.backend.limits.max_batch_digests
        if len(wanted) <= batch:
            return query(wanted) if wanted else set()
        missing: set[Digest] = set()
        pending = list(wanted)
        for start in range(0, len(pending), batch):
            missing |= query(pending[start : start + batch])
        return missing

    def contains(self, digest: Digest) -> bool:
        return not self.find_missing([digest])

    def open_read(self, digest: Digest, offset: int = 0, *, verify: bool = True) -> BinaryIO:
        """Stream a blob from ``offset``; with ``verify``, corruption raises at the end."""
        if offset < 0 or offset > digest.size:
            raise InvalidDigestError(f"offset {offset} is outside blob {digest}")
        if digest.size == 0:
            return io.BytesIO(b"")
        raw = self.backend.open_blob(digest, offset)
        if not verify:
            return raw
        return io.BufferedReader(
            VerifyingReader(raw, digest, offset, self.function), CHUNK_SIZE
        )

    def read_bytes(self, digest: Digest) -> bytes:
        """Read a whole blob (verified). Meant for small blobs such as Directory messages."""
        if digest.size == 0:
            return b""
        parts = []
        remaining = digest.size + 1  # one byte more proves the object is not too long
        with self.backend.open_blob(digest) as raw:
            while remaining > 0 and (chunk := raw.read(remaining)):
                parts.append(chunk)
                remaining -= len(chunk)
        data = b"".join(parts)
        self._check(digest, data)
        return data

    def read_many(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        """Read small blobs in backend batches, verifying each."""
        wanted = []
        for digest in digests:
            if digest.size == 0:
                yield digest, b""
            else:
                wanted.append(digest)
        for digest, data in self.backend.read_blobs(wanted):
            self._check(digest, data)
            yield digest, data

    def _check(self, digest: Digest, data: bytes) -> None:
        if len(data) != digest.size:
            raise CorruptBlobError(digest, f"stored object has {len(data)} bytes")
        actual = Digest.of_bytes(data, self.function)
        if actual != digest:
            raise CorruptBlobError(digest, f"content hashes to {actual.hash}")

    def put_bytes(self, data: bytes, expected: Digest | None = None) -> Digest:
        """Store ``data``; with ``expected``, refuse content that does not match it."""
        digest = Digest.of_bytes(data, self.function)
        if expected is not None and digest != expected:
            raise DigestMismatchError(expected, digest)
        if digest.size:
            self.backend.write_blobs([(digest, bytes(data))])
        return digest

    def put_many(self, blobs: Collection[tuple[Digest, bytes]]) -> None:
        """Store small blobs after checking each one's content against its digest."""
        for digest, data in blobs:
            actual = Digest.of_bytes(data, self.function)
            if actual != digest:
                raise DigestMismatchError(digest, actual)
        self.backend.write_blobs([(d, b) for d, b in blobs if d.size])

    def open_upload(self, expected: Digest) -> VerifiedUpload:
        """A push-style upload of ``expected``: ``write`` chunks, then ``commit`` or ``abort``.

        The same rules as :meth:`put_stream`, for callers that receive content in pieces over
        time (the gRPC server's resumable ByteStream uploads).
        """
        return VerifiedUpload(self.backend.begin_write_for(expected), expected, self.function)

    def put_stream(
        self,
        stream: BinaryIO,
        expected: Digest | None = None,
        *,
        on_chunk: Callable[[int], None] | None = None,
    ) -> Digest:
        """Stream content in, hashing as it goes; commit only under the digest it really has.

        Without ``expected``, a regular file of at least the backend's ``limits.prehash_min_size``
        bytes is hashed first and then stored as an upload of that digest; if it changed
        between the two readings, it is stored as the second reading found it.
        """
        if expected is None and (start := self._prehash_start(stream)) is not None:
            announced = Digest.of_stream(stream, self.function)
            stream.seek(start)
            try:
                return self._put_stream(stream, announced, on_chunk)
            except DigestMismatchError:
                stream.seek(start)  # (on_chunk then hears of the bytes read so far twice)
        return self._put_stream(stream, expected, on_chunk)

    def _prehash_start(self, stream: BinaryIO) -> int | None:
        """Where ``stream`` is, if it is a regular file the backend wants hashed first."""
        threshold = self.backend.limits.prehash_min_size
        if threshold is None:
            return None
        try:
            st = os.fstat(stream.fileno())
            start = stream.tell()
        except (AttributeError, OSError, ValueError):  # not a file (io.UnsupportedOperation)
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size - start < threshold:
            return None
        return start

    def _put_stream(
        self,
        stream: BinaryIO,
        expected: Digest | None,
        on_chunk: Callable[[int], None] | None,
    ) -> Digest:
        upload = VerifiedUpload(
            self.backend.begin_write_for(expected) if expected else self.backend.begin_write(None),
            expected,
            self.function,
        )
        buf = bytearray(CHUNK_SIZE)
        view = memoryview(buf)
        readinto = getattr(stream, "readinto", None)
        try:
            while True:
                if readinto is not None:
                    n = readinto(view)
                    if not n:
                        break
                    chunk: bytes | memoryview = view[:n]
                else:
                    chunk = stream.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    n = len(chunk)
                upload.write(chunk)
                if on_chunk is not None:
                    on_chunk(n)
            return upload.commit()
        except BaseException:
            upload.abort()
            raise

    def put_file(self, path: str | os.PathLike[str]) -> Digest:
        with open(path, "rb", buffering=0) as f:
            return self.put_open_file(f.fileno())

    def put_open_file(self, fd: int) -> Digest:
        """Store the open regular file ``fd`` from its offset to its end; return the digest.

        Uses the backend's copy path (``begin_write_copy``, capability ``copy-file``) when it
        has one and it takes this file, hashing what the upload then holds; otherwise reads and
        streams the file. Either way the content is committed only under the digest of the
        very bytes stored.
        """
        copied = None
        if self.has(Capability.COPY_FILE):
            try:
                copied = self.backend.begin_write_copy(fd)
            except UnsupportedOperationError:
                pass  # not this file (its file system cannot copy it so): read it instead
        if copied is None:
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
                return self.put_stream(stream)
        writer, stored = copied
        try:
            with stored:
                digest = _hash_stored(stored, self.function)
            if digest.size:
                writer.commit(digest)
            else:
                writer.abort()
        except BaseException:
            writer.abort()
            raise
        return digest

    def copy_blob_from(self, source: VerifiedBlobs, digest: Digest) -> None:
        """Copy one blob from ``source`` (a store of the same digest function), verifying it on
        the way in."""
        self.require_same_function(source)
        if digest.size <= CHUNK_SIZE:
            self.put_bytes(source.read_bytes(digest), digest)
            return
        with source.open_read(digest, verify=False) as stream:
            try:
                self.put_stream(stream, digest)
            except DigestMismatchError as exc:
                raise CorruptBlobError(
                    digest, f"source {source.url} returned other content: {exc.actual}"
                ) from None

    def write_hashed(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        """Store blobs whose digests the caller computed from these very bytes.

        The single path by which content reaches the backend without being hashed here: for
        bytes just hashed by the caller (import, Directory messages it encoded) or just
        verified by a read of this layer (transfer). Anything else goes through
        :meth:`put_many`.
        """
        self.backend.write_blobs([(d, data) for d, data in blobs if d.size])

    def require_same_function(self, other: VerifiedBlobs) -> None:
        """Refuse, with :class:`UnsupportedDigestFunctionError`, to move blobs between this
        store and ``other`` when their digest functions differ: a digest names a blob only
        under its own function, and casframe never re-hashes a tree into another."""
        if other.function != self.function:
            raise UnsupportedDigestFunctionError(
                f"cannot copy between {other.url} ({other.function.name}) and {self.url} "
                f"({self.function.name}): the stores use different digest functions"
            )

    def get_directory(self, digest: Digest) -> Directory:
        """Read a Directory message (verified) and check that it is safe to materialise."""
        return parse_directory(digest, self.read_bytes(digest))

