"""The blobs of an ``s3://`` store: objects ``PREFIX/objects/ab/cdef…`` of one bucket.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, BinaryIO

import botocore.exceptions

from casframe import (
    DIGEST_FUNCTIONS,
    SHA256,
    BlobInfo,
    BlobLimits,
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    Capability,
    CasframeError,
    CorruptBlobError,
    Digest,
    DigestFunction,
    StrayEntry,
)
from casframe.digest import CHUNK_SIZE
from casframe_s3.bucket import (
    _FANOUTS,
    _FOLDER_MARKER,
    _NOT_FOUND,
    MAX_DELETE_KEYS,
    _blob_key_name,
    _body_start,
    _Bucket,
    _delete_error,
    _error_code,
    _listed,
    _object_size,
    _ObjectReader,
    _position,
)
from casframe_s3.options import MAX_SINGLE_PUT, S3Options
from casframe_s3.uploads import SPOOL_MEMORY_LIMIT, _S3Writer, _StreamingUpload, _Upload

log = logging.getLogger(__name__)


# find_missing lists fan-out folders instead of asking for each blob once this many digests are
# asked about at once: listing one folder answers for all its digests in one request.
LIST_MIN_DIGESTS = 1000
# A LIST page (up to 1,000 keys, ~100 KB of XML) takes a few HEADs' time to produce and parse;
# listing a folder is worth it while each page resolves at least this many digests.
PAGE_COST_IN_HEADS = 4


class S3BlobStore(BlobStore):
    """Blobs as objects ``PREFIX/objects/ab/cdef…`` of one bucket."""

    capabilities = frozenset({Capability.LIST, Capability.DELETE, Capability.TOUCH})
    # Each function's blobs under their own key prefix (casframe.layout.function_folder).
    digest_functions = frozenset(DIGEST_FUNCTIONS)

    def __init__(self, bucket: _Bucket, function: DigestFunction = SHA256) -> None:
        self._bucket = bucket
        self.digest_function = function
        #: Blobs of at least this size whose digest is known are streamed to their key as they
        #: arrive, never spooled; smaller ones stay in memory (one PUT) anyway.
        self.streaming_min_size = max(bucket.options.multipart_threshold, SPOOL_MEMORY_LIMIT + 1)
        self.limits = BlobLimits(
            # find_missing lists fan-out folders for large sets: the larger, the better.
            max_batch_digests=100_000,
            max_concurrency=bucket.options.max_concurrency,
            # Local files that large are hashed first, so that they can be streamed too.
            prehash_min_size=self.streaming_min_size,
        )
        self._inflight_lock = threading.Lock()
        self._inflight: dict[str, _Upload] = {}
        # Set once a listing showed more than one page of blobs; stores rarely shrink back.
        self._holds_many = False

    @property
    def client(self) -> Any:
        """The boto3 S3 client (for tests and tools that look behind the store's back)."""
        return self._bucket.client

    @property
    def options(self) -> S3Options:
        return self._bucket.options

    def describe(self) -> str:
        return self._bucket.options.location

    def close(self) -> None:
        self._bucket.close()

    # -- find_missing ----------------------------------------------------------------------

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        wanted = set(digests)
        if len(wanted) >= PAGE_COST_IN_HEADS and not self._holds_many:
            stored = self._list_small_store()
            if stored is not None:
                return {d for d in wanted if stored.get(d.hash) != d.size}
        if len(wanted) < LIST_MIN_DIGESTS:
            return self._head_missing(wanted)
        by_fanout: dict[str, list[Digest]] = defaultdict(list)
        for digest in wanted:
            by_fanout[digest.hash[:2]].append(digest)
        to_head: list[Digest] = []
        listed: list[list[Digest]] = []
        for group in by_fanout.values():
            if len(group) >= PAGE_COST_IN_HEADS:
                listed.append(group)
            else:
                to_head.extend(group)
        missing: set[Digest] = set()
        for group_missing, leftover in self._bucket.map(self._list_missing, listed):
            missing |= group_missing
            to_head.extend(leftover)
        return missing | self._head_missing(to_head)

    def _list_small_store(self) -> dict[str, int] | None:
        """``{hash: size}`` of every blob when one LIST page holds them all (a new or small
        store: one request instead of one per digest), else ``None`` and never again."""
        page = next(self._bucket.list_pages(Prefix=self._bucket.objects))
        if page.get("IsTruncated"):
            self._holds_many = True
            return None
        # Emptied objects too: find_missing_blobs answers about them for fsck --repair.
        listed = _listed(
            page.get("Contents", []), self._bucket.objects, self._bucket.hex_length
        )
        return {hash_: size for hash_, size, _ in listed}

    def _head_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        def absent(digest: Digest) -> bool:
            head = self._bucket.head(self._bucket.object_key(digest))
            return head is None or head.get("ContentLength") != digest.size

        digests = list(digests)
        return {
            d for d, gone in zip(digests, self._bucket.map(absent, digests), strict=True) if gone
        }

    def _list_missing(self, group: list[Digest]) -> tuple[set[Digest], list[Digest]]:
        """List one fan-out folder over the range of ``group``'s hashes.

        Returns the digests known missing and those left to ask about one by one, when the
        folder turned out so full that reading it would cost more requests than asking.
        """
        group.sort()
        fanout = group[0].hash[:2]
        folder = f"{self._bucket.objects}{fanout}/"
        sizes: dict[str, set[int]] = defaultdict(set)
        for digest in group:
            sizes[digest.hash].add(digest.size)
        found: dict[str, set[int]] = defaultdict(set)
        first, last = _position(group[0].hash), _position(group[-1].hash)
        start_key = f"{folder}{group[0].hash[2:]}"
        pages = 0
        leftover: list[Digest] = []
        for page in self._bucket.list_pages(Prefix=folder, StartAfter=start_key[:-1]):
            pages += 1
            contents = page.get("Contents", [])
            last_hash = ""
            for item in contents:
                name = fanout + item["Key"][len(folder) :]
                last_hash = name
                if name in sizes:
                    found[name].add(int(item["Size"]))
            if not page.get("IsTruncated") or not last_hash or last_hash >= group[-1].hash:
                break
            # Estimate the pages still to read from how much of the hash range one page covered.
            done = max(_position(last_hash) - first, 1)
            pages_left = pages * (last - _position(last_hash)) / done
            unresolved = [d for d in group if d.hash > last_hash]
            if pages_left * PAGE_COST_IN_HEADS > len(unresolved):
                leftover = unresolved
                break
        skip = set(leftover)
        missing = {d for d in group if d not in skip and d.size not in found.get(d.hash, ())}
        return missing, leftover

    # -- reading ---------------------------------------------------------------------------

    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        key = self._bucket.object_key(digest)
        if offset >= digest.size:
            # Nothing left to read; S3 refuses an empty range, so only check the object.
            head = self._bucket.head(key)
            if head is None:
                raise self._not_found(digest)
            if head.get("ContentLength") != digest.size:
                raise self._wrong_size(digest, int(head.get("ContentLength", -1)))
            return io.BytesIO(b"")
        request: dict[str, Any] = {"Bucket": self._bucket.name, "Key": key}
        if offset:
            request["Range"] = f"bytes={offset}-"
        try:
            response = self._bucket.client.get_object(**request)
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if code in _NOT_FOUND:
                raise self._not_found(digest) from None
            if code == "InvalidRange":  # the stored object is shorter than the offset
                size = exc.response.get("Error", {}).get("ActualObjectSize")
                if not size:
                    head = self._bucket.head(key)
                    if head is None:
                        raise self._not_found(digest) from None
                    size = head.get("ContentLength", -1)
                raise self._wrong_size(digest, int(size)) from None
            self._bucket.fail(exc, "read a blob", key)
        except botocore.exceptions.BotoCoreError as exc:
            self._bucket.fail(exc, "read a blob", key)
        total = _object_size(response)
        if total != digest.size:
            response["Body"].close()
            raise self._wrong_size(digest, total)
        reader = _ObjectReader(response["Body"], self._bucket, key)
        start = _body_start(response)
        if start != offset:
            try:
                if start != 0:
                    raise CasframeError(
                        f"cannot read {key} in {self._bucket.options.location} from byte "
                        f"{offset}: S3 answered Content-Range "
                        f"{response.get('ContentRange')!r}"
                    )
                # HTTP lets a server ignore Range and send the whole object (status 200).
                self._skip(reader, offset, digest)
            except BaseException:
                reader.close()
                raise
        return io.BufferedReader(reader, CHUNK_SIZE)

    @staticmethod
    def _skip(reader: _ObjectReader, count: int, digest: Digest) -> None:
        """Read and drop the first ``count`` bytes of a body."""
        buffer = bytearray(min(count, CHUNK_SIZE))
        skipped = 0
        while skipped < count:
            n = reader.readinto(memoryview(buffer)[: count - skipped])
            if not n:
                raise CorruptBlobError(digest, f"stored object is truncated at {skipped} bytes")
            skipped += n

    def _wrong_size(self, digest: Digest, actual: int) -> CasframeError:
        """Another size is stored under this hash: a healthy blob of that size (so the one asked
        for is simply not stored) or a damaged copy of this one. Only its content can tell."""
        if actual > 0:  # a 0-byte object under another hash than the empty one: damaged
            healthy = Digest(digest.hash, actual)
            try:
                with self.open_blob(healthy) as stream:
                    if Digest.of_stream(stream, self.digest_function) == healthy:
                        return self._not_found(digest)
            except (BlobNotFoundError, CorruptBlobError):
                pass  # replaced meanwhile: report what was seen
        return CorruptBlobError(digest, f"stored object has {actual} bytes")

    def read_blobs(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        def read(digest: Digest) -> bytes:
            with self.open_blob(digest) as stream:
                return stream.read()

        digests = list(digests)
        yield from zip(digests, self._bucket.map(read, digests), strict=True)

    # -- writing ---------------------------------------------------------------------------

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        return _S3Writer(self)

    def begin_write_for(self, digest: Digest) -> BlobWriter:
        """An upload whose digest is known in advance (transfers, ByteStream writes, large
        local files, ``put_stream(expected=…)``): a blob of at least ``streaming_min_size`` is
        sent in parts while it arrives, and one already stored is not sent at all."""
        if digest.size >= self.streaming_min_size:
            return _StreamingUpload(self, digest)
        return _S3Writer(self)

    def write_blobs(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        self._bucket.map(lambda item: self.put_small(*item), blobs)

    def _once(self, key: str, upload: Callable[[], None]) -> None:
        """Run ``upload`` unless this process is already uploading ``key``: then wait for that
        upload and succeed with it (content-addressed, so it is the same content), or upload
        again if it failed."""
        while True:
            with self._inflight_lock:
                current = self._inflight.get(key)
                if current is None:
                    mine = _Upload()
                    self._inflight[key] = mine
                    break
            current.done.wait()
            if current.succeeded:
                return
        try:
            upload()
            mine.succeeded = True
        finally:
            with self._inflight_lock:
                del self._inflight[key]
            mine.done.set()

    def put_small(self, digest: Digest, data: bytes) -> None:
        key = self._bucket.object_key(digest)
        self._once(key, lambda: self._bucket.put(key, data))

    def put_file(self, digest: Digest, path: str, size: int) -> None:
        """Upload a spooled blob: one PUT below the multipart threshold, else boto3's managed
        multipart upload (parts read from disk as they are sent, completed only at the end)."""
        key = self._bucket.object_key(digest)
        self._once(key, lambda: self._upload_file(digest, key, path, size))

    def _upload_file(self, digest: Digest, key: str, path: str, size: int) -> None:
        if size >= self._bucket.options.multipart_threshold:
            existing = self._bucket.head(key)
            if existing is not None and existing.get("ContentLength") == size:
                # Already stored: a HEAD and a touch instead of uploading it again (the
                # touch renews prune's grace period for this writer, as the SPI asks). An
                # object deleted between the two (by a prune) is uploaded after all.
                if digest not in self.touch_blobs([digest]):
                    return
        future = self._bucket.transfers.upload(path, self._bucket.name, key)
        try:
            with self._bucket.errors("upload a blob", key):
                future.result()
        except BaseException:
            # Interrupted (or failed): cancel, and the manager aborts the multipart upload.
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result()
            raise

    def check_writable(self) -> None:
        """PUT the empty blob under its own key: credentials or a bucket policy without
        ``s3:PutObject`` make S3 refuse it (AccessDenied), and a zero-byte object under the
        empty digest is a correct blob, so the probe changes nothing a reader could notice.

        Writers spool locally until ``commit``, so the default probe would detect nothing.
        """
        self._bucket.put(self._bucket.object_key(Digest.empty(self.digest_function)), b"")

    def now(self) -> float:
        """S3's clock, which stamps LastModified: prune's cutoff must not depend on how far
        this machine's clock is from it."""
        return self._bucket.server_time()

    # -- capabilities ----------------------------------------------------------------------

    def iter_blobs(self) -> Iterator[BlobInfo]:
        for hash_, size, mtime in self._iter_listed():
            if size or hash_ == self.digest_function.empty_hash:  # emptied: no blob
                yield BlobInfo(Digest(hash_, size), mtime)

    def iter_blob_stats(
        self, skip: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, int, float]]:
        # The listing gives sizes and times anyway: skip saves nothing but the tuples.
        for listed in self._iter_listed():
            if skip is None or not skip(listed[0]):
                yield listed

    def _iter_listed(self) -> Iterator[tuple[str, int, float]]:
        """Every object key's ``(hash, size, mtime)``, emptied objects included. One request
        answers a small store; a larger one is listed fan-out folder by folder, a few folders
        ahead concurrently, so memory holds only those folders."""
        objects = self._bucket.objects
        first = next(self._bucket.list_pages(Prefix=objects))
        contents = first.get("Contents", [])
        yield from _listed(contents, objects, self._bucket.hex_length)
        if not first.get("IsTruncated") or not contents:
            return
        last_key = contents[-1]["Key"]
        current = last_key[len(objects) : len(objects) + 2]
        folders = [(current, last_key)] if current in _FANOUTS else []
        folders += [(fanout, "") for fanout in _FANOUTS if fanout > current]
        folders.reverse()
        ahead = min(4, self.limits.max_concurrency)
        pending: list[Future[list[tuple[str, int, float]]]] = []
        try:
            while pending or folders:
                while folders and len(pending) < ahead:
                    pending.append(self._bucket.pool.submit(self._list_fanout, *folders.pop()))
                yield from pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()

    def _list_fanout(self, fanout: str, start_after: str = "") -> list[tuple[str, int, float]]:
        folder = f"{self._bucket.objects}{fanout}/"
        extra = {"StartAfter": start_after} if start_after else {}
        listed: list[tuple[str, int, float]] = []
        for page in self._bucket.list_pages(Prefix=folder, **extra):
            listed.extend(
                _listed(page.get("Contents", []), self._bucket.objects, self._bucket.hex_length)
            )
        return listed

    def iter_strays(self) -> Iterator[StrayEntry]:
        """Keys under ``objects/`` that are not object keys (synced in, or written by hand).

        Folder markers (``objects/`` and ``objects/ab/``, which S3 consoles create) are not
        reported: they hold nothing."""
        objects = self._bucket.objects
        start = len(self._bucket.options.key_prefix)
        for page in self._bucket.list_pages(Prefix=objects):
            for item in page.get("Contents", []):
                key: str = item["Key"]
                if _blob_key_name(
                    key, objects, self._bucket.hex_length
                ) is not None or _FOLDER_MARKER.fullmatch(
                    key[len(objects) :]
                ):
                    continue
                yield StrayEntry(key[start:], "a key that is not an object key")

    def delete_blobs(
        self, digests: Iterable[Digest], *, older_than: float | None = None
    ) -> list[Digest]:
        """Delete in batches of up to 1,000 keys; with ``older_than``, one HEAD per blob first.

        Returns the blobs deleted (or already absent: S3 does not tell them apart)."""
        if older_than is not None:
            digests = self._older_than(digests, older_than)
        digests = list(digests)
        keys = sorted({self._bucket.object_key(d) for d in digests})
        batches = [keys[i : i + MAX_DELETE_KEYS] for i in range(0, len(keys), MAX_DELETE_KEYS)]

        def delete(batch: list[str]) -> list[dict[str, Any]]:
            with self._bucket.errors("delete blobs", batch[0]):
                response = self._bucket.client.delete_objects(
                    Bucket=self._bucket.name,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors: list[dict[str, Any]] = response.get("Errors", [])
            return [e for e in errors if e.get("Code") not in _NOT_FOUND]

        failures = [error for errors in self._bucket.map(delete, batches) for error in errors]
        if failures:
            raise _delete_error(self._bucket, failures, len(keys))
        return digests

    def clean_temp(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Abort the multipart uploads under ``objects/`` idle since before ``older_than``.

        A large upload whose writer was killed leaves its parts in the bucket: invisible to
        object listings, billed, until the upload is aborted. An upload counts as idle from its
        newest part (or its start, without parts; LastModified has one-second steps), so a long
        upload still sending parts is left alone, as ``file://`` leaves a temp file that is
        still being written. So is every streaming upload this process has open
        (``_StreamingUpload``, which may wait for its source between parts); boto3's managed
        uploads of files send their parts back to back. Only keys shaped like
        blobs count (``objects/ab/`` and 62 more hex digits), not those of another store whose
        prefix happens to begin with this one's ``objects/``. Returns the uploads aborted (with
        ``dry_run``: found) and the bytes of their parts.

        Best effort, like the rest of a temp clean-up: an upload that cannot be listed or
        aborted (no ``s3:ListBucketMultipartUploads``, ``s3:ListMultipartUploadParts`` or
        ``s3:AbortMultipartUpload``, a server without the calls) is logged as a warning and
        not counted; prune goes on.
        """
        bucket = self._bucket
        client = bucket.client
        uploads: list[tuple[str, str, float]] = []
        try:
            with bucket.errors("list interrupted uploads", bucket.objects):
                pages = client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=bucket.name, Prefix=bucket.objects
                )
                for page in pages:
                    uploads.extend(
                        (u["Key"], u["UploadId"], u["Initiated"].timestamp())
                        for u in page.get("Uploads", [])
                        if _blob_key_name(u["Key"], bucket.objects, bucket.hex_length)
                        is not None
                        and u["UploadId"] not in bucket.active_uploads
                    )
        except CasframeError as exc:
            log.warning("not removing interrupted multipart uploads: %s", exc)
            return 0, 0

        def stale_size(upload: tuple[str, str, float]) -> int | None:
            """The bytes of an idle upload's parts (aborting it), ``None`` if it stays."""
            key, upload_id, started = upload
            size, last = 0, started
            try:
                pages = client.get_paginator("list_parts").paginate(
                    Bucket=bucket.name, Key=key, UploadId=upload_id
                )
                for page in pages:
                    for part in page.get("Parts", []):
                        size += int(part["Size"])
                        last = max(last, part["LastModified"].timestamp())
                if last + 1 > older_than:
                    return None
                if not dry_run:
                    client.abort_multipart_upload(Bucket=bucket.name, Key=key, UploadId=upload_id)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                if _error_code(exc) != "NoSuchUpload":  # else: completed or aborted meanwhile
                    log.warning(
                        "not removing interrupted multipart upload %s: %s",
                        key,
                        bucket.translate(exc, "remove an interrupted upload", key),
                    )
                return None
            return size

        sizes = [size for size in bucket.map(stale_size, uploads) if size is not None]
        return len(sizes), sum(sizes)

    def _older_than(self, digests: Iterable[Digest], cutoff: float) -> list[Digest]:
        """The digests whose object was last modified before ``cutoff``, asked just now.

        One HEAD per object right before the DELETE: prune decided from a listing that may be
        minutes old, and a writer may have touched or stored the blob again since. LastModified
        has one-second resolution, so an object counts as modified up to a second after it.
        """

        def old(digest: Digest) -> Digest | None:
            head = self._bucket.head(self._bucket.object_key(digest))
            if head is None or head["LastModified"].timestamp() + 1 > cutoff:
                return None
            return digest

        return [d for d in self._bucket.map(old, list(digests)) if d is not None]

    def touch_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        """Refresh LastModified by copying each object onto itself (a server-side copy).

        Returns the digests whose object was not there to copy."""
        stamp = {"touched": f"{time.time():.6f}"}

        def touch(digest: Digest) -> bool:
            """Whether the object was absent."""
            key = self._bucket.object_key(digest)
            source = {"Bucket": self._bucket.name, "Key": key}
            try:
                if digest.size <= MAX_SINGLE_PUT:
                    self._bucket.client.copy_object(
                        Bucket=self._bucket.name,
                        Key=key,
                        CopySource=source,
                        MetadataDirective="REPLACE",
                        Metadata=stamp,
                    )
                else:  # CopyObject stops at 5 GiB; the managed copy goes part by part
                    self._bucket.client.copy(
                        source,
                        self._bucket.name,
                        key,
                        ExtraArgs={"MetadataDirective": "REPLACE", "Metadata": stamp},
                    )
            except botocore.exceptions.ClientError as exc:
                if _error_code(exc) in _NOT_FOUND:
                    return True  # absent blobs are ignored, and reported
                self._bucket.fail(exc, "touch a blob", key)
            except botocore.exceptions.BotoCoreError as exc:
                self._bucket.fail(exc, "touch a blob", key)
            return False

        unique = list(dict.fromkeys(digests))
        absent = self._bucket.map(touch, unique)
        return [d for d, gone in zip(unique, absent, strict=True) if gone]
