"""Turning casframe's typed errors into gRPC status codes, in one place.

Every servicer method is wrapped with :func:`rpc_method`, which converts whatever escapes it
into a status: casframe's own errors by their type, :class:`StatusError` as it says, anything
else as ``INTERNAL`` with the traceback in the server log and never in the reply. Per-item
statuses inside batch responses use :func:`status_proto` with the same table, so a blob gets the
same code in ``BatchReadBlobs`` as in a ByteStream ``Read``.

This module must never let a traceback, a file path of the server, the store's URL or a
backend's own exception text reach a client: messages of casframe's errors raised below the
services (by the store or a backend) are scrubbed here, once, of URLs, absolute paths, network
addresses and the parts of the served store's URL (see :func:`client_message`), and the full
text goes to the server log for the operator. A full disk becomes ``RESOURCE_EXHAUSTED``.
"""

from __future__ import annotations

import errno
import functools
import inspect
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from casframe.digest import Digest
from casframe.errors import (
    BackendUnavailableError,
    BlobNotFoundError,
    CasframeError,
    CompressedDataError,
    CorruptBlobError,
    DigestMismatchError,
    InvalidDigestError,
    InvalidNameError,
    PermissionDeniedError,
    RefConflictError,
    RefNotFoundError,
    UnsafeTreeError,
    UnsupportedDigestFunctionError,
    UnsupportedOperationError,
)

__all__ = [
    "ERROR_DOMAIN",
    "OK_STATUS",
    "REF_CONFLICT_REASON",
    "StatusError",
    "abort_arguments",
    "async_rpc_method",
    "client_message",
    "missing_blobs_error",
    "rpc_method",
    "status_for",
    "status_proto",
]

log = logging.getLogger("casframe.server")

# Checked in order, so a subclass listed first wins over its base.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (BlobNotFoundError, grpc.StatusCode.NOT_FOUND),
    (RefNotFoundError, grpc.StatusCode.NOT_FOUND),
    # The name is fine and so is the request; another ref in the store is in its way.
    (RefConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (DigestMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (CompressedDataError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidDigestError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidNameError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnsafeTreeError, grpc.StatusCode.INVALID_ARGUMENT),
    (CorruptBlobError, grpc.StatusCode.DATA_LOSS),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
    # A digest function the request chose: the client's argument, not a missing service.
    (UnsupportedDigestFunctionError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnsupportedOperationError, grpc.StatusCode.UNIMPLEMENTED),
)

# Where a store is, as it shows in the messages of backends and the store: a URL of any scheme
# (with any credentials or query in it) and an absolute path (the store root, its tmp/ folder).
# A path starts after a space, quote, bracket, '=' or the start of the text, so the '/' inside
# "hash/size" or a ref name is not one, and has a character after its slash, so a lone '/'
# (as in "must not start with '/'") stays.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*?(?=[:,.;)]*(?:[\s'\"<>]|$))")
_PATH = re.compile(r"(?:(?<=[\s'\"(\[=])|^)/[^\s'\"<>,;)\]]+")
# A network address of the backend, as grpcio and socket errors write it.
_ADDRESS = re.compile(
    r"\b(?:(?:ipv4|ipv6|unix|dns):[^\s'\",;]+|\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?)"
)
# Neutral stand-ins: the same scrub applies to a client's own input echoed in a message.
_URL_SHOWN = "<url>"
_PATH_SHOWN = "<path>"
_ADDRESS_SHOWN = "<address>"
_STORE_SHOWN = "<store>"
# Parts of the store's URL shorter than this are too likely to be ordinary words to scrub.
_SHORTEST_STORE_PART = 3

# A full disk or an exhausted quota: the client may retry later or elsewhere.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

# Numbers the log line and the client message share, so an operator can find the traceback
# that belongs to a user's "internal error" report.
_incident_ids = itertools.count(1)


class StatusError(Exception):
    """Raised inside a servicer to answer with exactly this status.

    ``details`` are protobuf messages (``google.rpc`` error details such as
    ``PreconditionFailure``) sent in the standard ``grpc-status-details-bin`` trailer.
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, details: Iterable[Message] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = tuple(details)


def missing_blobs_error(
    code: grpc.StatusCode, what: str, missing: Iterable[Digest]
) -> StatusError:
    """A status naming missing blobs, with REAPI's ``PreconditionFailure`` MISSING details."""
    digests = sorted(missing)
    shown = ", ".join(str(d) for d in digests[:3])
    more = f" and {len(digests) - 3} more" if len(digests) > 3 else ""
    failure = error_details_pb2.PreconditionFailure()
    for digest in digests:
        failure.violations.add(type="MISSING", subject=f"blobs/{digest.hash}/{digest.size}")
    return StatusError(code, f"{what}: missing {shown}{more}", [failure])


@functools.lru_cache(maxsize=16)
def _store_parts(store_url: str) -> re.Pattern[str] | None:
    """What names the store besides URLs and paths: its host or bucket, the key prefix or path
    in it, credentials and option values (an S3 error names ``bucket 'NAME'`` and keys)."""
    parts = urlsplit(store_url)
    words = {store_url, parts.netloc, parts.path.strip("/")}
    # Option values that locate something (an endpoint URL, a host, a file), not flags.
    words.update(v for _, v in parse_qsl(parts.query) if any(c in v for c in "/:@."))
    if parts.hostname:
        words.update((parts.hostname, parts.username or "", parts.password or ""))
    words = {w for w in words if len(w) >= _SHORTEST_STORE_PART}
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![\w.-])(?:{alternatives})(?![\w.-])")


def client_message(message: str, store_url: str = "") -> str:
    """``message`` without the URLs, absolute paths and network addresses it names, nor the
    parts of ``store_url`` (the served store's URL)."""
    message = _URL.sub(_URL_SHOWN, message)
    store = _store_parts(store_url)
    if store is not None:
        message = store.sub(_STORE_SHOWN, message)
    return _ADDRESS.sub(_ADDRESS_SHOWN, _PATH.sub(_PATH_SHOWN, message))


def _scrubbed(exc: BaseException, store_url: str) -> str:
    """The client's text for a casframe error raised below the services; the full text, when
    it named a location, goes to the log."""
    full = str(exc)
    shown = client_message(full, store_url)
    if shown != full:
        log.warning("request failed: %s: %s", type(exc).__name__, full)
    return shown


def status_for(exc: BaseException, store_url: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception.

    Unexpected exceptions are logged with their traceback here and answered with a bare
    ``INTERNAL`` message carrying an incident number. A store out of space is
    ``RESOURCE_EXHAUSTED``. Messages of casframe's errors are scrubbed of locations
    (:func:`client_message`; ``store_url`` is the served store's); a :class:`StatusError` is
    the services' own text, sent as it is.
    """
    if isinstance(exc, StatusError):
        return exc.code, exc.message
    # Not-found messages are rebuilt so they do not name the server's store URL or paths.
    if isinstance(exc, BlobNotFoundError):
        shown = ", ".join(str(d) for d in exc.digests[:3])
        more = f" and {len(exc.digests) - 3} more" if len(exc.digests) > 3 else ""
        return grpc.StatusCode.NOT_FOUND, f"blob not found: {shown}{more}"
    if isinstance(exc, RefNotFoundError):
        return grpc.StatusCode.NOT_FOUND, f"ref not found: {exc.name}"
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, _scrubbed(exc, store_url)
    if isinstance(exc, CasframeError):
        code = grpc.StatusCode.UNAVAILABLE if exc.temporary else grpc.StatusCode.INTERNAL
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return code, client_message(str(exc), store_url)
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        log.error("store out of space: %s", exc)
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the server's store is out of space (nothing was stored); try again later",
        )
    incident = next(_incident_ids)
    log.error("internal error #%d", incident, exc_info=exc)
    message = f"internal server error (incident #{incident} in the server log)"
    return grpc.StatusCode.INTERNAL, message


def status_proto(exc: BaseException, store_url: str = "") -> status_pb2.Status:
    """A ``google.rpc.Status`` for one item of a batch response."""
    code, message = status_for(exc, store_url)
    return status_pb2.Status(code=code.value[0], message=message)


OK_STATUS = status_pb2.Status(code=code_pb2.OK)


#: ``ErrorInfo.domain`` and ``reason`` of a status refusing a ref that conflicts with another;
#: its metadata names both (``ref``, ``existing``), for clients to tell them apart reliably.
ERROR_DOMAIN = "casframe"
REF_CONFLICT_REASON = "REF_CONFLICT"


def _details(exc: BaseException) -> tuple[Message, ...]:
    if isinstance(exc, StatusError):
        return exc.details
    if isinstance(exc, RefConflictError):
        info = error_details_pb2.ErrorInfo(
            reason=REF_CONFLICT_REASON,
            domain=ERROR_DOMAIN,
            metadata={"ref": exc.name, "existing": exc.existing},
        )
        return (info,)
    return ()


def abort_arguments(
    exc: BaseException, servicer: Any
) -> tuple[grpc.StatusCode, str, tuple[Any, ...]]:
    """The code, message and trailing metadata (error details) that answer ``exc`` raised in
    ``servicer`` (whose settings name the store URL to keep out of the message)."""
    settings = getattr(servicer, "settings", None)  # a servicer's ServerSettings
    code, message = status_for(exc, settings.store_url if settings is not None else "")
    details = _details(exc)
    if details:
        status = status_pb2.Status(code=code.value[0], message=message)
        for detail in details:
            status.details.add().Pack(detail)
        return code, message, (("grpc-status-details-bin", status.SerializeToString()),)
    return code, message, ()


def _abort(context: grpc.ServicerContext, exc: BaseException, servicer: Any) -> None:
    code, message, trailing = abort_arguments(exc, servicer)
    if trailing:
        context.set_trailing_metadata(trailing)
    context.abort(code, message)


def _client_gone(exc: BaseException, context: grpc.ServicerContext) -> bool:
    # A cancelled or disconnected client shows up as grpc.RpcError from the request iterator.
    return isinstance(exc, grpc.RpcError) and not context.is_active()


F = TypeVar("F", bound=Callable[..., Any])


def rpc_method(method: F) -> F:
    """Wrap a servicer method (unary or streaming) so every failure becomes a gRPC status."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
                if _client_gone(exc, context):
                    return
                _abort(context, exc, self)

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            if _client_gone(exc, context):
                return None
            _abort(context, exc, self)

    return unary  # type: ignore[return-value]


def async_rpc_method(method: F) -> F:
    """:func:`rpc_method` for a coroutine servicer method on the asyncio server."""

    @functools.wraps(method)
    async def call(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.BaseError:
            raise  # grpc's own: an abort already sent, or the call already gone
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            await context.abort(*abort_arguments(exc, self))

    return call  # type: ignore[return-value]
