"""Uploads to an ``s3://`` store: a blob becomes visible only as a whole.

One PUT for content spooled until the core knows its digest (:class:`_S3Writer`), or, when the
digest is known first, a multipart upload to the final key that is completed only once the core
has checked the content (:class:`_StreamingUpload`).
"""

from __future__ import annotations

import base64
import contextlib
import mmap
import os
import tempfile
import threading
import zlib
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, BinaryIO

import botocore.exceptions

from casframe import (
    BackendUnavailableError,
    BlobWriter,
    Digest,
    DigestMismatchError,
)
from casframe.digest import CHUNK_SIZE
from casframe_s3.bucket import _gather
from casframe_s3.options import S3Options

if TYPE_CHECKING:
    from casframe_s3.blobs import S3BlobStore

# Uploads are kept in memory up to this size, then spooled to a temporary file: unless it was
# announced (begin_write_for, which large local files are too: see limits.prehash_min_size), the
# digest, and so the key, is known only at commit, and S3 cannot rename. 1 MiB is the core's
# chunk size, so small blobs never touch the disk and many concurrent writers stay far below
# 100 MiB.
SPOOL_MEMORY_LIMIT = CHUNK_SIZE
# S3's limit on the parts of one multipart upload.
MAX_PARTS = 10_000


class _S3Writer(BlobWriter):
    """Collects an upload in memory, then in a temporary file, and stores it at commit."""

    def __init__(self, store: S3BlobStore) -> None:
        self._store = store
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self._path = ""
        self._size = 0
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self._done, "write after commit or abort"
        if self._memory is not None:
            if len(self._memory) + len(data) <= SPOOL_MEMORY_LIMIT:
                self._memory += data
                self._size += len(data)
                return
            self._spill()
        assert self._file is not None
        self._file.write(data)
        self._size += len(data)

    def _spill(self) -> None:
        # A named file, so that boto3's transfer manager reads each part from disk when it
        # sends it (with a file object it would copy parts into memory).
        fd, self._path = tempfile.mkstemp(prefix="casframe-s3-")
        self._file = os.fdopen(fd, "wb")
        assert self._memory is not None
        self._file.write(self._memory)
        self._memory = None

    def commit(self, digest: Digest) -> None:
        assert not self._done, "commit after commit or abort"
        try:
            if self._memory is not None:
                self._store.put_small(digest, bytes(self._memory))
            else:
                assert self._file is not None
                self._file.close()
                self._store.put_file(digest, self._path, self._size)
        finally:
            self.abort()

    def abort(self) -> None:
        self._done = True
        self._memory = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        self._file, self._path = None, ""


class _Upload:
    """An upload in progress in this process, which writers of the same blob wait for."""

    __slots__ = ("done", "succeeded")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.succeeded = False


class _StreamingUpload(BlobWriter):
    """An upload whose digest was announced: sent to its final key while the content arrives.

    The content is gathered into parts in memory, and each part goes out as soon as it is
    complete, on the store's worker threads, while the next one fills; nothing touches the
    disk. The multipart upload is completed only at commit, which the core calls only after the
    whole content hashed to the announced digest: until then nothing is visible, and abort
    discards the parts (AbortMultipartUpload once no part is in flight any more, so none
    survives it). Memory: the part being filled, plus the parts in flight, at most
    ``_Bucket.part_slots`` for all the store's uploads together.

    Each part lives in its own anonymous memory map, exactly as large as the part (the size is
    known from the digest), sent as the request body without a copy and unmapped once sent:
    freed 8 MiB blocks of the C heap are not always given back, so a process sending parts
    from ``bytes`` grows past what it holds.
    """

    def __init__(self, store: S3BlobStore, expected: Digest) -> None:
        self._store = store
        self._bucket = store._bucket
        self._expected = expected
        self._key = self._bucket.object_key(expected)
        self._part_size = _part_size(self._bucket.options, expected.size)
        self._part: mmap.mmap | None = None
        self._filled = 0  # bytes in self._part
        self._offset = 0  # where self._part starts in the blob
        self._parts: list[Future[dict[str, Any]]] = []
        self._failed: BaseException | None = None  # the first part that failed, seen early
        self._upload_id: str | None = None
        self._done = False
        # With request_checksum_calculation=when_supported, each part carries its CRC32, which
        # S3 checks on receipt and combines (as boto3's managed uploads do); computed here from
        # the part in memory, it travels as a header, never as an aws-chunked trailer.
        self._crc32 = self._bucket.options.request_checksum_calculation == "when_supported"
        existing = self._bucket.head(self._key)
        self._present = existing is not None and existing.get("ContentLength") == expected.size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self._done, "write after commit or abort"
        if self._present:
            return  # already stored: the core still hashes what arrives, nothing to send
        view = memoryview(data).cast("B")
        while view:
            if self._part is None:
                length = min(self._part_size, self._expected.size - self._offset)
                if length <= 0:
                    return  # longer than announced: commit will refuse it
                self._part = mmap.mmap(-1, length)
            n = min(len(view), len(self._part) - self._filled)
            self._part[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == len(self._part):
                self._send_part()

    def _send_part(self) -> None:
        if self._failed is not None:
            raise self._failed  # stop reading the rest: the upload cannot succeed
        if self._upload_id is None:
            extra = {"ChecksumAlgorithm": "CRC32"} if self._crc32 else {}
            with self._bucket.errors("start a multipart upload", self._key):
                response = self._bucket.client.create_multipart_upload(
                    Bucket=self._bucket.name, Key=self._key, **extra
                )
            self._upload_id = response["UploadId"]
            self._bucket.active_uploads.add(self._upload_id)
        assert self._part is not None
        body = [self._part]
        self._offset += len(self._part)
        self._part, self._filled = None, 0
        slots = self._bucket.part_slots
        slots.acquire()  # waits while the store's parts in flight fill their share of memory
        try:
            future = self._bucket.pool.submit(self._upload_part, len(self._parts) + 1, body)
        except BaseException:
            slots.release()
            body[0].close()
            raise
        future.add_done_callback(self._part_ended)
        self._parts.append(future)

    def _part_ended(self, future: Future[dict[str, Any]]) -> None:
        # Also called for a part cancelled before it started, so its slot is never lost.
        self._bucket.part_slots.release()
        if not future.cancelled() and future.exception() is not None and self._failed is None:
            self._failed = future.exception()

    def _upload_part(self, number: int, body: list[mmap.mmap]) -> dict[str, Any]:
        with body.pop() as part:  # held here only, and unmapped once sent
            checksum = {}
            if self._crc32:
                crc = zlib.crc32(part).to_bytes(4, "big")
                checksum["ChecksumCRC32"] = base64.b64encode(crc).decode()
            with self._bucket.errors("upload part of a blob", self._key):
                response = self._bucket.client.upload_part(
                    Bucket=self._bucket.name,
                    Key=self._key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=part,
                    **checksum,
                )
        return {"ETag": response["ETag"], "PartNumber": number, **checksum}

    def commit(self, digest: Digest) -> None:
        assert not self._done, "commit after commit or abort"
        try:
            if digest != self._expected:
                # The core commits only content that matched; what was sent is other content,
                # and there is no copy of it to store under ``digest``.
                raise DigestMismatchError(self._expected, digest)
            if self._present:  # it was there before the upload began: freshen it
                if digest in self._store.touch_blobs([digest]):
                    # Deleted since the HEAD (by a prune: it was not referenced yet), and the
                    # content went by unsent and unkept. Storing it again sends it.
                    raise BackendUnavailableError(
                        f"blob {digest} was deleted from {self._bucket.options.location} while "
                        "it was being stored (by a prune?); its content was not sent, as the "
                        "blob was there when the upload began: store it again"
                    )
                return
            # Every part, the last one included, went out when it was complete.
            parts = _gather(self._parts)
            with self._bucket.errors("complete a multipart upload", self._key):
                self._bucket.client.complete_multipart_upload(
                    Bucket=self._bucket.name,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
            self._bucket.active_uploads.discard(self._upload_id)
            self._upload_id = None
        finally:
            self.abort()

    def abort(self) -> None:
        self._done = True
        if self._part is not None:
            self._part.close()
            self._part = None
        for future in self._parts:
            future.cancel()
        for future in self._parts:
            with contextlib.suppress(BaseException):
                future.result()
        self._parts = []
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            self._bucket.active_uploads.discard(upload_id)
            with contextlib.suppress(
                botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError
            ):
                self._bucket.client.abort_multipart_upload(
                    Bucket=self._bucket.name, Key=self._key, UploadId=upload_id
                )


def _part_size(options: S3Options, size: int) -> int:
    """The part size for a blob of ``size`` bytes: S3 allows 10,000 parts, so parts grow past
    the configured size for blobs over ~80 GB (with 8 MiB parts)."""
    return max(options.multipart_chunksize, -(-size // MAX_PARTS))
