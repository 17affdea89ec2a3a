"""Turning casframe's typed errors into gRPC status codes, in one place.

Every servicer method is wrapped with :func:`rpc_method`, which converts whatever escapes it
into a status: casframe's own errors by their type, :class:`StatusError` as it says, anything
else as ``INTERNAL`` with the traceback in the server log and never in the reply. Per-item
statuses inside batch responses use :func:`status_proto` with the same table, so a blob gets the
same code in ``BatchReadBlobs`` as in a ByteStream ``Read``.

This module must never let a traceback, a file path of the server or a backend's own exception
text reach a client for an unexpected error.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from casframe.digest import Digest
from casframe.errors import (
    BackendUnavailableError,
    BlobNotFoundError,
    CasframeError,
    CorruptBlobError,
    DigestMismatchError,
    InvalidDigestError,
    InvalidNameError,
    PermissionDeniedError,
    RefNotFoundError,
    UnsafeTreeError,
    UnsupportedOperationError,
)

__all__ = [
    "OK_STATUS",
    "StatusError",
    "abort_arguments",
    "async_rpc_method",
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
    (DigestMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidDigestError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidNameError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnsafeTreeError, grpc.StatusCode.INVALID_ARGUMENT),
    (CorruptBlobError, grpc.StatusCode.DATA_LOSS),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (UnsupportedOperationError, grpc.StatusCode.UNIMPLEMENTED),
)

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


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception.

    Unexpected exceptions are logged with their traceback here and answered with a bare
    ``INTERNAL`` message carrying an incident number.
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
            return code, str(exc)
    if isinstance(exc, CasframeError):
        code = grpc.StatusCode.UNAVAILABLE if exc.temporary else grpc.StatusCode.INTERNAL
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return code, str(exc)
    incident = next(_incident_ids)
    log.error("internal error #%d", incident, exc_info=exc)
    message = f"internal server error (incident #{incident} in the server log)"
    return grpc.StatusCode.INTERNAL, message


def status_proto(exc: BaseException) -> status_pb2.Status:
    """A ``google.rpc.Status`` for one item of a batch response."""
    code, message = status_for(exc)
    return status_pb2.Status(code=code.value[0], message=message)


OK_STATUS = status_pb2.Status(code=code_pb2.OK)


def abort_arguments(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[Any, ...]]:
    """The code, message and trailing metadata (error details) that answer ``exc``."""
    code, message = status_for(exc)
    if isinstance(exc, StatusError) and exc.details:
        status = status_pb2.Status(code=code.value[0], message=message)
        for detail in exc.details:
            status.details.add().Pack(detail)
        return code, message, (("grpc-status-details-bin", status.SerializeToString()),)
    return code, message, ()


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message, trailing = abort_arguments(exc)
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
                _abort(context, exc)

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            if _client_gone(exc, context):
                return None
            _abort(context, exc)

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
            await context.abort(*abort_arguments(exc))

    return call  # type: ignore[return-value]
