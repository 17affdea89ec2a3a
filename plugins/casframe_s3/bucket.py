"""One bucket of an ``s3://`` store: the client, the thread pool, the limits S3 sets, and the one
place botocore errors become casframe's (:meth:`_Bucket.translate`).

Also what reads a GET (:class:`_ObjectReader`) and what tells object keys from strays in a
listing (through :mod:`casframe.layout`). Nothing above this package ever sees a botocore error.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config

from casframe import (
    BackendUnavailableError,
    CasframeError,
    ConfigError,
    Digest,
    PermissionDeniedError,
    __version__,
    layout,
)
from casframe.digest import CHUNK_SIZE
from casframe_s3.options import S3Options

log = logging.getLogger(__name__)

T = TypeVar("T")

# S3's limit on the keys in one DeleteObjects request.
MAX_DELETE_KEYS = 1000
# Parts of uploads with an announced digest are sent from memory; all uploads of one store
# together keep at most this much in flight (at least one part), besides the part each fills.
# Three 8 MiB parts keep moto's server as busy as four or ten do (one at a time is half as
# fast), and a process storing one large blob peaks at ~86 MiB (~50 of them Python and boto3).
PARTS_IN_FLIGHT_BYTES = 24 << 20
# Error codes meaning "no such object" (HEAD answers carry no body, only the status).
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
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

    def __init__(self, options: S3Options, hex_length: int = 64) -> None:
        self.options = options
        #: Hex digits of this store's hashes (its digest function's): object keys of another
        #: length are not its objects.
        self.hex_length = hex_length
        self.name = options.bucket
        self.objects = f"{options.key_prefix}{layout.OBJECTS}/"
        self.refs = f"{options.key_prefix}{layout.REFS}/"
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
        return self.options.key_prefix + layout.object_key(digest)

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



class _ObjectReader(io.RawIOBase):
    """A GET response body as a raw stream: chunked reads, network errors translated."""

    def __init__(self, body: Any, bucket: _Bucket, key: str) -> None:
        super().__init__()
        self._body = body
        self._bucket = bucket
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
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



_FANOUTS = [f"{i:02x}" for i in range(256)]
# Keys S3 consoles create to show an empty folder, relative to objects/.
_FOLDER_MARKER = re.compile(r"(?:[0-9a-f]{2}/)?")


def _blob_key_name(key: str, objects: str, hex_length: int) -> str | None:
    """The hash (of ``hex_length`` digits) a key ``objects/ab/cdef…`` stands for, ``None`` for
    any other key."""
    if not key.startswith(objects):
        return None
    return layout.object_hash(key[len(objects) :], hex_length)


def _listed(
    contents: list[dict[str, Any]], objects: str, hex_length: int
) -> Iterator[tuple[str, int, float]]:
    """Listed keys ``objects/ab/cdef…`` as ``(hash, size, mtime)``; other keys (strays synced
    in) are skipped."""
    for item in contents:
        name = _blob_key_name(item["Key"], objects, hex_length)
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
