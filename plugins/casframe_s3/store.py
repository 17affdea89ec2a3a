"""The ``s3://BUCKET/PREFIX`` backend: a casframe store in any S3-compatible bucket (boto3).

Layout under PREFIX, that of ``file://`` so that a local store copied with any S3 sync tool opens
as an S3 store and back::

    PREFIX/objects/ab/cdef…   blob with sha256 ``abcdef…``
    PREFIX/refs/heads/NAME    a serialized REAPI Digest message; user metadata ``accessed``
                              holds the last access (seconds since the epoch)

A blob becomes visible only as a whole: one PUT, or a multipart upload that is completed only
after the core has checked the content against its digest. When the digest is known before the
content (transfers, ByteStream writes, large local files, which the core hashes first), the
parts go to the final key from memory while the content arrives; otherwise the content is
spooled until the core knows its digest. Nothing here verifies content on its
way in or out (the core does; the one hash computed here tells a blob stored with another size
from a damaged one), and nothing above this module ever sees a botocore error: they are
translated into casframe's errors once, in :meth:`_Bucket.translate`.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import io
import logging
import mmap
import os
import re
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, NoReturn, TypeVar

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config

from casframe import (
    EMPTY_DIGEST,
    BackendUnavailableError,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    Capability,
    CasframeError,
    ConfigError,
    CorruptBlobError,
    Digest,
    DigestMismatchError,
    InvalidDigestError,
    PermissionDeniedError,
    RefInfo,
    RefNotFoundError,
    RefStore,
    Store,
    StoreURL,
    StrayEntry,
    __version__,
)
from casframe.digest import CHUNK_SIZE
from casframe_s3.options import MAX_SINGLE_PUT, S3Options

__all__ = ["S3BlobStore", "S3RefStore", "open_s3_store"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Uploads are kept in memory up to this size, then spooled to a temporary file: unless it was
# announced (begin_write_for, which large local files are too: see prehash_min_size), the
# digest, and so the key, is known only at commit, and S3 cannot rename. 1 MiB is the core's
# chunk size, so small blobs never touch the disk and many concurrent writers stay far below
# 100 MiB.
SPOOL_MEMORY_LIMIT = CHUNK_SIZE
# find_missing lists fan-out folders instead of asking for each blob once this many digests are
# asked about at once: listing one folder answers for all its digests in one request.
LIST_MIN_DIGESTS = 1000
# A LIST page (up to 1,000 keys, ~100 KB of XML) takes a few HEADs' time to produce and parse;
# listing a folder is worth it while each page resolves at least this many digests.
PAGE_COST_IN_HEADS = 4
# S3's limits: parts of one multipart upload; keys in one DeleteObjects request.
MAX_PARTS = 10_000
MAX_DELETE_KEYS = 1000
# Parts of uploads with an announced digest are sent from memory; all uploads of one store
# together keep at most this much in flight (at least one part), besides the part each fills.
# Three 8 MiB parts keep moto's server as busy as four or ten do (one at a time is half as
# fast), and a process storing one large blob peaks at ~86 MiB (~50 of them Python and boto3).
PARTS_IN_FLIGHT_BYTES = 24 << 20
# Largest ref object read: a serialized Digest is ~70 bytes; anything huge is not a ref.
MAX_REF_BYTES = 64 << 10
# Error codes meaning "no such object" (HEAD answers carry no body, only the status).
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_HEX_DIGITS = frozenset("0123456789abcdef")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-\d+/(?:\d+|\*)", re.IGNORECASE)
_NO_BUCKET = frozenset({"NoSuchBucket"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
_TEMPORARY = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "500",
        "502",
        "503",
        "504",
    }
)
_CONNECTION_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionError,  # ConnectTimeout, ConnectionClosed, proxy errors
    botocore.exceptions.HTTPClientError,  # ReadTimeout and friends
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
)


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _credentials_help(options: S3Options) -> str:
    profile = f"profile {options.profile!r}" if options.profile else "AWS_PROFILE or profile="
    return (
        "boto3 looks for credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        f"{profile} in ~/.aws/credentials and ~/.aws/config, web identity and SSO settings, "
        "and the container or instance role"
    )


class _Bucket:
    """One bucket and prefix with its boto3 client, worker threads and transfer manager.

    Shared by the store's BlobStore and RefStore; all S3 calls of both go through here.
    """

    def __init__(self, options: S3Options) -> None:
        self.options = options
        self.name = options.bucket
        self.objects = f"{options.key_prefix}objects/"
        self.refs = f"{options.key_prefix}refs/heads/"
        try:
            core = botocore.session.get_session()
            core.register_component("data_loader", _shared_loader())
            session = boto3.session.Session(
                botocore_session=core, profile_name=options.profile, region_name=options.region
            )
        except botocore.exceptions.ProfileNotFound:
            raise ConfigError(self._profile_missing()) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise ConfigError(f"cannot set up AWS access for {options.location}: {exc}") from None
        # Threads that may use the client at once: our workers, the transfer manager's, and
        # the core's own (which call open_blob and commit directly).
        connections = 3 * options.max_concurrency + 4
        config = Config(
            # total_max_attempts counts the first try, as max_attempts does in ~/.aws/config.
            retries={"mode": options.retry_mode, "total_max_attempts": options.max_attempts},
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            max_pool_connections=connections,
            s3={
                "addressing_style": options.addressing_style,
                "payload_signing_enabled": options.payload_signing,
            },
            request_checksum_calculation=options.request_checksum_calculation,
            response_checksum_validation=options.response_checksum_validation,
            user_agent_extra=f"casframe/{__version__}",
            tcp_keepalive=True,
        )
        try:
            self.client: Any = session.client(
                "s3", endpoint_url=options.endpoint_url, config=config
            )
        except botocore.exceptions.ProfileNotFound:
            raise ConfigError(self._profile_missing()) from None
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            raise ConfigError(f"cannot create an S3 client for {options.location}: {exc}") from None
        # Servers that predate the CRC32 checksum headers still demand Content-MD5 on
        # DeleteObjects; sending both satisfies old and new ones.
        self.client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._transfers: Any = None
        in_flight = max(1, PARTS_IN_FLIGHT_BYTES // options.multipart_chunksize)
        self.part_slots = threading.BoundedSemaphore(min(options.max_concurrency, in_flight))
        self._closed = False
        self.warned_read_only = False
        #: UploadIds of the multipart uploads this process is sending (clean_temp spares them).
        self.active_uploads: set[str] = set()

    def _profile_missing(self) -> str:
        return (
            f"AWS profile {self.options.profile!r} for {self.options.location} is not defined "
            "in ~/.aws/config or ~/.aws/credentials "
            "(or the files AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE name)"
        )

    # -- plumbing ------------------------------------------------------------------------

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.options.max_concurrency, thread_name_prefix="casframe-s3"
                )
            return self._pool

    @property
    def transfers(self) -> Any:
        """boto3's managed transfer (multipart, concurrent parts), made on first large upload."""
        with self._lock:
            if self._transfers is None:
                config = TransferConfig(
                    multipart_threshold=self.options.multipart_threshold,
                    multipart_chunksize=self.options.multipart_chunksize,
                    max_concurrency=self.options.max_concurrency,
                    preferred_transfer_client="classic",
                )
                self._transfers = create_transfer_manager(self.client, config)
            return self._transfers

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
            transfers, self._transfers = self._transfers, None
        if transfers is not None:
            transfers.shutdown()
        if pool is not None:
            pool.shutdown(wait=True)
        self.client.close()

    def map(self, func: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
        """``func`` over ``items`` on the worker threads; the first failure is raised after all
        submitted work has finished (so nothing runs on after the call returns).

        One item runs on the calling thread: no hand-over, and a caller that gave up on a
        daemon thread (a remote's time-out) holds no pool thread that exit would wait for.
        """
        items = list(items)
        if len(items) == 1:
            return [func(items[0])]
        futures = [self.pool.submit(func, item) for item in items]
        return _gather(futures)

    def object_key(self, digest: Digest) -> str:
        return f"{self.objects}{digest.hash[:2]}/{digest.hash[2:]}"

    # -- error translation (the one place botocore errors become casframe errors) ------------

    def translate(self, exc: BaseException, action: str, key: str | None = None) -> CasframeError:
        opts = self.options
        where = f"{opts.location}" + (f" (key {key})" if key else "")
        code = _error_code(exc)
        if isinstance(
            exc,
            botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError,
        ):
            return PermissionDeniedError(
                f"no AWS credentials to {action} in bucket {opts.bucket!r}: "
                + _credentials_help(opts)
            )
        if isinstance(exc, botocore.exceptions.ProfileNotFound):
            return ConfigError(self._profile_missing())
        if isinstance(exc, _CONNECTION_ERRORS):
            return BackendUnavailableError(
                f"cannot {action} in {where}: S3 endpoint {opts.endpoint_description} "
                f"is unreachable or timed out ({exc})"
            )
        if code in _NO_BUCKET:
            return ConfigError(
                f"bucket {opts.bucket!r} does not exist (endpoint {opts.endpoint_description})"
            )
        if code == "RequestTimeTooSkewed":
            return PermissionDeniedError(
                f"S3 endpoint {opts.endpoint_description} refused to {action} in {where}: "
                "this machine's clock is too far off (more than 15 minutes)"
            )
        if code in _DENIED:
            return PermissionDeniedError(
                f"access denied to {action} in bucket {opts.bucket!r}"
                + (f", key {key}" if key else "")
                + f" (endpoint {opts.endpoint_description}, {code}): check the credentials "
                "and the bucket policy"
            )
        if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed"):
            region = _bucket_region(exc)
            hint = f"set region={region}" if region else "set region= to the bucket's region"
            return ConfigError(
                f"bucket {opts.bucket!r} is in another region than {opts.region or 'the default'}: "
                f"{hint}"
            )
        if code in ("InvalidBucketName",):
            return ConfigError(
                f"{opts.bucket!r} is not a valid bucket name for {opts.endpoint_description}"
            )
        if code in _TEMPORARY:
            return BackendUnavailableError(
                f"cannot {action} in {where}: S3 endpoint {opts.endpoint_description} "
                f"answered {code} after {opts.max_attempts} attempts"
            )
        if isinstance(exc, botocore.exceptions.ClientError):
            message = exc.response.get("Error", {}).get("Message", "")
            return CasframeError(f"cannot {action} in {where}: S3 answered {code}: {message}")
        return CasframeError(f"cannot {action} in {where}: {exc}")

    @contextlib.contextmanager
    def errors(self, action: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self.translate(exc, action, key) from exc

    def fail(self, exc: BaseException, action: str, key: str | None = None) -> NoReturn:
        raise self.translate(exc, action, key) from exc

    # -- requests used in several places -------------------------------------------------------

    def check_bucket(self) -> None:
        """Fail fast, with one clear message, when the bucket is absent or out of reach."""
        try:
            self.client.head_bucket(Bucket=self.name)
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError(
                    f"bucket {self.name!r} does not exist "
                    f"(endpoint {self.options.endpoint_description})"
                ) from None
            self.fail(exc, "open the store")
        except botocore.exceptions.BotoCoreError as exc:
            self.fail(exc, "open the store")

    def server_time(self) -> float:
        """The endpoint's clock, from the ``Date`` of a ``HeadBucket`` answer (whole seconds,
        so up to a second behind); this machine's clock, with a warning, when it sends none."""
        with self.errors("read the S3 endpoint's clock"):
            response = self.client.head_bucket(Bucket=self.name)
        header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            return email.utils.parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError):
            log.warning(
                "S3 endpoint %s sent no usable Date header (%r): prune and gc measure the "
                "grace period by this machine's clock",
                self.options.endpoint_description,
                header,
            )
            return time.time()

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata, or ``None`` when there is no such object."""
        try:
            response: dict[str, Any] = self.client.head_object(Bucket=self.name, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            self.fail(exc, "look up an object", key)
        except botocore.exceptions.BotoCoreError as exc:
            self.fail(exc, "look up an object", key)
        return response

    def put(self, key: str, body: bytes, **extra: Any) -> None:
        with self.errors("store an object", key):
            self.client.put_object(Bucket=self.name, Key=key, Body=body, **extra)

    def list_pages(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Pages of ListObjectsV2, translated errors; ``kwargs`` as for the API."""
        token = None
        while True:
            request = dict(kwargs, Bucket=self.name)
            if token:
                request["ContinuationToken"] = token
            with self.errors("list objects", kwargs.get("Prefix")):
                page: dict[str, Any] = self.client.list_objects_v2(**request)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return


_loader_lock = threading.Lock()
_loader: Any = None


def _shared_loader() -> Any:
    """One botocore model loader for the process: parsing the S3 model takes 0.1-0.5 s, and
    every store opened (tests open hundreds) would parse it again. The models are read-only."""
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


def _bucket_region(exc: BaseException) -> str | None:
    if isinstance(exc, botocore.exceptions.ClientError):
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = headers.get("x-amz-bucket-region") or exc.response.get("Error", {}).get("Region")
        return str(region) if region else None
    return None


def _add_content_md5(request: Any, **_: Any) -> None:
    import hashlib

    body = request.body
    if isinstance(body, bytes | bytearray) and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def _gather(futures: list[Future[T]]) -> list[T]:
    """Wait for every future; return their results or raise the first failure."""
    results: list[T] = []
    first: BaseException | None = None
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others ended
            if first is None:
                first = exc
                for other in futures:
                    other.cancel()
    if first is not None:
        raise first
    return results


# -- reading --------------------------------------------------------------------------------


class _ObjectReader(io.RawIOBase):
    """A GET response body as a raw stream: chunked reads, network errors translated."""

    def __init__(self, body: Any, bucket: _Bucket, key: str) -> None:
        super().__init__()
        self._body = body
        self._bucket = bucket
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(min(len(view), CHUNK_SIZE))
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise BackendUnavailableError(
                f"reading {self._key} from {self._bucket.options.location} "
                f"({self._bucket.options.endpoint_description}) failed: {exc}"
            ) from exc
        n = len(data)
        view[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


# -- writing --------------------------------------------------------------------------------


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


# -- the blob store -------------------------------------------------------------------------


class S3BlobStore(BlobStore):
    """Blobs as objects ``PREFIX/objects/ab/cdef…`` of one bucket."""

    capabilities = frozenset({Capability.LIST, Capability.DELETE, Capability.TOUCH})
    # find_missing lists fan-out folders for large sets: the larger the set, the better.
    max_batch_digests = 100_000

    def __init__(self, bucket: _Bucket) -> None:
        self._bucket = bucket
        self.max_concurrency = bucket.options.max_concurrency
        self._inflight_lock = threading.Lock()
        self._inflight: dict[str, _Upload] = {}
        # Larger local files are hashed first and streamed to their key, never spooled; smaller
        # ones stay in memory (one PUT) anyway.
        self.prehash_min_size: int = max(bucket.options.multipart_threshold, SPOOL_MEMORY_LIMIT + 1)
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
        listed = _listed(page.get("Contents", []), self._bucket.objects)
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
            return io.BytesIO(b"")  # type: ignore[return-value]
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
        return io.BufferedReader(reader, CHUNK_SIZE)  # type: ignore[return-value]

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
                    if Digest.of_stream(stream) == healthy:
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
        local files, ``put_stream(expected=…)``): a blob of at least ``prehash_min_size`` is
        sent in parts while it arrives, and one already stored is not sent at all."""
        if digest.size >= self.prehash_min_size:
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
        self._bucket.put(self._bucket.object_key(EMPTY_DIGEST), b"")

    def now(self) -> float:
        """S3's clock, which stamps LastModified: prune's cutoff must not depend on how far
        this machine's clock is from it."""
        return self._bucket.server_time()

    # -- capabilities ----------------------------------------------------------------------

    def iter_blobs(self) -> Iterator[BlobInfo]:
        for hash_, size, mtime in self._iter_listed():
            if size or hash_ == EMPTY_DIGEST.hash:  # an emptied object is no blob
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
        yield from _listed(contents, objects)
        if not first.get("IsTruncated") or not contents:
            return
        last_key = contents[-1]["Key"]
        current = last_key[len(objects) : len(objects) + 2]
        folders = [(current, last_key)] if current in _FANOUTS else []
        folders += [(fanout, "") for fanout in _FANOUTS if fanout > current]
        folders.reverse()
        ahead = max(1, min(4, self.max_concurrency))
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
            listed.extend(_listed(page.get("Contents", []), self._bucket.objects))
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
                if _blob_key_name(key, objects) is not None or _FOLDER_MARKER.fullmatch(
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
                        if _blob_key_name(u["Key"], bucket.objects) is not None
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


_FANOUTS = [f"{i:02x}" for i in range(256)]
# Keys S3 consoles create to show an empty folder, relative to objects/.
_FOLDER_MARKER = re.compile(r"(?:[0-9a-f]{2}/)?")


def _blob_key_name(key: str, objects: str) -> str | None:
    """The hash a key ``objects/ab/cdef…`` stands for, ``None`` for any other key."""
    relative = key[len(objects) :]
    if not key.startswith(objects) or len(relative) != 65 or relative[2] != "/":
        return None
    name = relative[:2] + relative[3:]
    return name if _HEX_DIGITS.issuperset(name) else None


def _listed(contents: list[dict[str, Any]], objects: str) -> Iterator[tuple[str, int, float]]:
    """Listed keys ``objects/ab/cdef…`` as ``(hash, size, mtime)``; other keys (strays synced
    in) are skipped."""
    for item in contents:
        name = _blob_key_name(item["Key"], objects)
        if name is not None:
            yield name, int(item["Size"]), item["LastModified"].timestamp()


def _position(hash_hex: str) -> int:
    """Where a hash lies in the hash space, for estimating how much of a range a page covered."""
    return int(hash_hex[:15].ljust(15, "0"), 16)


def _object_size(response: dict[str, Any]) -> int:
    """The whole object's size from a GET response (ranged or not)."""
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(response.get("ContentLength", -1))


def _body_start(response: dict[str, Any]) -> int | None:
    """Where a GET response's body starts in the object: 0 for a whole object (no
    Content-Range), ``None`` for a Content-Range that is not ``bytes START-END/TOTAL``."""
    content_range = response.get("ContentRange")
    if not content_range:
        return 0
    match = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
    return int(match.group(1)) if match else None


def _delete_error(bucket: _Bucket, failures: list[dict[str, Any]], total: int) -> CasframeError:
    codes = {str(f.get("Code", "")) for f in failures}
    shown = "; ".join(
        f"{f.get('Key')}: {f.get('Code')} {f.get('Message', '')}".strip() for f in failures[:5]
    )
    more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
    message = (
        f"could not delete {len(failures)} of {total} blobs from {bucket.options.location}: "
        f"{shown}{more}"
    )
    if codes <= _DENIED:
        return PermissionDeniedError(message)
    if codes <= _TEMPORARY:
        return BackendUnavailableError(message)
    return CasframeError(message)


# -- the ref store --------------------------------------------------------------------------


class S3RefStore(RefStore):
    """Refs as small objects ``PREFIX/refs/heads/NAME``; last access in their metadata.

    The access time is kept in user metadata (``accessed``, client clock, microseconds) rather
    than taken from LastModified, whose one-second resolution cannot order refs used within
    the same second. Refs written by other tools fall back to LastModified.
    """

    def __init__(self, bucket: _Bucket) -> None:
        self._bucket = bucket

    def close(self) -> None:
        self._bucket.close()

    def _where(self) -> str:
        return self._bucket.options.location

    def _read(self, name: str) -> tuple[Digest, dict[str, Any]]:
        key = self._bucket.refs + name
        try:
            response = self._bucket.client.get_object(Bucket=self._bucket.name, Key=key)
            with contextlib.closing(response["Body"]) as body:
                data = body.read(MAX_REF_BYTES)
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                raise RefNotFoundError(name, self._where()) from None
            self._bucket.fail(exc, "read a ref", key)
        except botocore.exceptions.BotoCoreError as exc:
            self._bucket.fail(exc, "read a ref", key)
        try:
            return Digest.from_serialized(data), response
        except InvalidDigestError as exc:
            raise InvalidDigestError(
                f"ref {name} in {self._where()} is damaged: {exc}; set it again or delete it"
            ) from None

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        digest, response = self._read(name)
        if touch:
            self._touch(name, response.get("ETag"))
        return digest

    def _touch(self, name: str, etag: str | None) -> None:
        key = self._bucket.refs + name
        request: dict[str, Any] = {
            "Bucket": self._bucket.name,
            "Key": key,
            "CopySource": {"Bucket": self._bucket.name, "Key": key},
            "MetadataDirective": "REPLACE",
            "Metadata": {"accessed": f"{time.time():.6f}"},
        }
        if etag:
            request["CopySourceIfMatch"] = etag  # never revive an older target over a new one
        try:
            self._bucket.client.copy_object(**request)
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if code in _NOT_FOUND or code in ("PreconditionFailed", "412"):
                return  # deleted or re-pointed meanwhile, which is an access of its own
            if code in _DENIED:
                # Read-only credentials may still read refs; only their LRU order suffers.
                if not self._bucket.warned_read_only:
                    self._bucket.warned_read_only = True
                    log.warning(
                        "cannot record ref access times in %s (%s): read-only access?",
                        self._where(),
                        code,
                    )
                return
            self._bucket.fail(exc, "record a ref's access time", key)
        except botocore.exceptions.BotoCoreError as exc:
            self._bucket.fail(exc, "record a ref's access time", key)

    def set_ref(self, name: str, digest: Digest) -> None:
        self._bucket.put(
            self._bucket.refs + name,
            digest.serialize(),
            Metadata={"accessed": f"{time.time():.6f}"},
        )

    def conflicting_ref(self, name: str) -> str | None:
        # One HEAD a folder and a listing under the name, all side by side: one round trip
        # on every ref set (the server sets one per action result).
        segments = name.split("/")
        folders = ["/".join(segments[:end]) for end in range(1, len(segments))]

        def ask(folder: str | None) -> str | None:
            if folder is not None:
                present = self._bucket.head(self._bucket.refs + folder) is not None
                return folder if present else None
            return self._first_ref_under(name)

        found = self._bucket.map(ask, [*folders, None])
        return next((ref for ref in found if ref is not None), None)

    def _first_ref_under(self, name: str) -> str | None:
        for page in self._bucket.list_pages(Prefix=f"{self._bucket.refs}{name}/", MaxKeys=100):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # a console's "folder" marker is no ref
                    return str(item["Key"][len(self._bucket.refs) :])
        return None

    def delete_ref(self, name: str) -> None:
        key = self._bucket.refs + name
        if self._bucket.head(key) is None:  # S3 deletes absent keys silently
            raise RefNotFoundError(name, self._where())
        with self._bucket.errors("delete a ref", key):
            self._bucket.client.delete_object(Bucket=self._bucket.name, Key=key)

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        names: list[tuple[str, float]] = []
        for page in self._bucket.list_pages(Prefix=self._bucket.refs + prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(self._bucket.refs) :]
                if name.endswith("/") or not name:
                    continue  # a "folder" marker that consoles create, never a ref
                names.append((name, item["LastModified"].timestamp()))

        def info(entry: tuple[str, float]) -> RefInfo | None:
            name, modified = entry
            try:
                digest, response = self._read(name)
            except RefNotFoundError:
                return None  # deleted meanwhile
            # A damaged ref raises InvalidDigestError: a prune that skipped it would delete
            # the tree it holds.
            accessed = response.get("Metadata", {}).get("accessed")
            try:
                when = float(accessed) if accessed else modified
            except ValueError:
                when = modified
            return RefInfo(name, digest, when)

        for ref in self._bucket.map(info, names):
            if ref is not None:
                yield ref


# -- factory --------------------------------------------------------------------------------


def open_s3_store(url: StoreURL) -> Store:
    """Factory for ``s3://BUCKET/PREFIX?options``; checks the bucket before returning."""
    options = S3Options.from_url(url)
    bucket = _Bucket(options)
    try:
        bucket.check_bucket()
    except BaseException:
        bucket.close()
        raise
    return Store(S3BlobStore(bucket), S3RefStore(bucket), url=options.location)
