"""One gRPC channel to a REAPI server: URL options, channel settings, error translation.

Everything that knows about grpcio's configuration lives here: how a ``grpc://`` or
``grpcs://`` URL and its options become a channel (TLS, keepalive, message sizes, the retry
policy in a service config), and how a ``grpc.RpcError`` becomes one of casframe's errors. The
translation happens once, at this boundary; nothing above the backend sees a grpc error.

This module never retries by hand: retrying UNAVAILABLE is grpcio's job, through the service
config it is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar, cast
from urllib.parse import urlsplit

import grpc
from google.rpc import error_details_pb2, status_pb2

from casframe import (
    SHA256,
    BackendUnavailableError,
    BlobNotFoundError,
    CasframeError,
    ConfigError,
    CorruptBlobError,
    Digest,
    DigestFunction,
    PermissionDeniedError,
    RefConflictError,
    RefNotFoundError,
    StoreURL,
    UnsupportedOperationError,
)
from casframe.reapi import remote_execution as reapi

from ._compression import COMPRESSIONS

__all__ = ["Connection", "GrpcOptions", "translate_error", "translate_status"]

T = TypeVar("T")

# The services this backend calls; the retry policy below applies to every method of each.
_SERVICES = (
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "google.bytestream.ByteStream",
    "build.bazel.remote.asset.v1.Fetch",
    "build.bazel.remote.asset.v1.Push",
    "buildstream.v2.ReferenceStorage",
)

# UNAVAILABLE means the call did not reach the server's logic (connection refused or reset,
# server shutting down), so repeating it is safe for every call made here: reads, idempotent
# content-addressed writes and ref updates. grpcio caps maxAttempts at 5. Backoffs stay short
# so that an unreachable server is reported in about a second, not after a long wait.
_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

# Calls the core may have in flight at once. gRPC calls wait on the network, so more than the
# cores; but on loopback 8 concurrent transfers were 10-15% slower than 4 (they contend for
# the GIL) and held more memory. Raise it over links with a long round trip.
_DEFAULT_CONCURRENCY = 4

# Receive window of each stream (grpcio's "lookahead"): two 1 MiB messages, so the next one
# travels while the last is consumed. One stream of 1 GiB on loopback then moved 15-20% more
# than with the default 64 KiB (one message per round trip), for 2 MiB of memory at most.
_STREAM_WINDOW = 2 << 20

# What one GetTree listing may bring before the client stops trusting it: a real build output
# has far fewer directories (a large monorepo checkout has tens of thousands), while a server
# that pages forever is stopped within about the memory these take. The tree engine then reads
# the tree level by level instead, as it does from servers without GetTree.
_DEFAULT_MAX_TREE_DIRECTORIES = 100_000
_DEFAULT_MAX_TREE_BYTES = 128 << 20

_REF_PROTOCOLS = ("auto", "asset", "reference-storage")
_TLS_OPTIONS = ("server_cert", "client_key", "client_cert")
_KNOWN_OPTIONS = frozenset(
    {*_TLS_OPTIONS, "timeout", "max_message_size", "max_concurrency", "ref_protocol",
     "keepalive_time", "get_tree_max_directories", "get_tree_max_bytes", "compression"}
)

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class GrpcOptions:
    """A ``grpc://``/``grpcs://`` URL, parsed and checked."""

    scheme: str
    #: ``HOST:PORT`` as grpcio's target (IPv6 hosts in brackets).
    target: str
    instance: str
    server_cert: str | None
    client_key: str | None
    client_cert: str | None
    #: Seconds allowed for one unary call.
    timeout: float
    #: Largest message sent or received, in bytes.
    max_message_size: int
    max_concurrency: int
    ref_protocol: str
    #: Seconds between keepalive pings on a connection with calls in flight.
    keepalive_time: float
    #: Most Directories, and most bytes of them, one GetTree listing may bring.
    get_tree_max_directories: int = _DEFAULT_MAX_TREE_DIRECTORIES
    get_tree_max_bytes: int = _DEFAULT_MAX_TREE_BYTES
    #: ``zstd`` to send and receive blobs zstd-compressed where the server offers it; ``none``.
    compression: str = "none"

    @property
    def secure(self) -> bool:
        return self.scheme == "grpcs"

    def describe(self) -> str:
        suffix = f"/{self.instance}" if self.instance else ""
        return f"{self.scheme}://{self.target}{suffix}"

    @classmethod
    def from_url(cls, url: StoreURL) -> GrpcOptions:
        unknown = sorted(set(url.options) - _KNOWN_OPTIONS)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for {url.scheme}:// in {url.url}; "
                f"known options: {', '.join(sorted(_KNOWN_OPTIONS))}"
            )
        parts = urlsplit("//" + url.netloc)
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"invalid port in {url.url}") from None
        host = parts.hostname
        if not host or parts.username is not None:
            raise ConfigError(f"{url.scheme}:// URL needs HOST:PORT (got {url.url!r})")
        if port is None:
            if url.scheme != "grpcs":
                raise ConfigError(f"grpc:// URL needs a port: grpc://HOST:PORT (got {url.url!r})")
            port = 443
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        instance = url.path.strip("/")

        tls = {key: url.option(key) or None for key in _TLS_OPTIONS}
        if url.scheme != "grpcs":
            given = [key for key, value in tls.items() if value]
            if given:
                raise ConfigError(
                    f"option(s) {', '.join(given)} need TLS: use grpcs:// instead of {url.url}"
                )
        if bool(tls["client_key"]) != bool(tls["client_cert"]):
            raise ConfigError(
                f"mutual TLS needs both client_key and client_cert (in {url.url})"
            )
        ref_protocol = url.option("ref_protocol", "auto") or "auto"
        if ref_protocol not in _REF_PROTOCOLS:
            raise ConfigError(
                f"ref_protocol={ref_protocol!r} in {url.url}: expected one of "
                f"{', '.join(_REF_PROTOCOLS)}"
            )
        compression = url.option("compression", "none") or "none"
        if compression not in COMPRESSIONS:
            raise ConfigError(
                f"compression={compression!r} in {url.url}: expected one of "
                f"{', '.join(COMPRESSIONS)}"
            )
        return cls(
            scheme=url.scheme,
            target=target,
            instance=instance,
            server_cert=tls["server_cert"],
            client_key=tls["client_key"],
            client_cert=tls["client_cert"],
            timeout=_positive(url, "timeout", 60.0, float),
            max_message_size=int(_positive(url, "max_message_size", 16 << 20, int)),
            max_concurrency=int(_positive(url, "max_concurrency", _DEFAULT_CONCURRENCY, int)),
            ref_protocol=ref_protocol,
            keepalive_time=_positive(url, "keepalive_time", 300.0, float),
            get_tree_max_directories=int(
                _positive(url, "get_tree_max_directories", _DEFAULT_MAX_TREE_DIRECTORIES, int)
            ),
            get_tree_max_bytes=int(
                _positive(url, "get_tree_max_bytes", _DEFAULT_MAX_TREE_BYTES, int)
            ),
            compression=compression,
        )


def _positive(url: StoreURL, key: str, default: float, kind: Callable[[str], float]) -> float:
    raw = url.option(key)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"option {key}={raw!r} in {url.url} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"option {key}={raw!r} in {url.url} must be positive")
    return value


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


# The digest functions REAPI lets a resource name leave out (the server infers them from the
# hash's length); it says the segment "MUST be omitted" for them. Casframe's others (BLAKE3)
# are named: ``blobs/blake3/{hash}/{size}``.
_UNNAMED_IN_RESOURCES = frozenset({"sha256", "sha384", "sha512"})


class Connection:
    """The channel to one server and instance, shared by the blob store and the ref store;
    every digest sent or received is of ``function``."""

    def __init__(self, options: GrpcOptions, function: DigestFunction = SHA256) -> None:
        self.options = options
        self.instance = options.instance
        self.where = options.describe()
        self.function = function
        #: The requests' ``digest_function``: unset for SHA-256, which REAPI infers from the
        #: hash's length and servers older than REAPI 2.3 assume, so their requests stay
        #: exactly what they were; the function's number for any other.
        self.function_value = cast(
            reapi.DigestFunction.Value, 0 if function == SHA256 else function.reapi_value
        )
        #: What a ByteStream resource name has between ``blobs/`` and the hash.
        self.function_segment = (
            "" if function.name in _UNNAMED_IN_RESOURCES else f"{function.name}/"
        )
        service_config = {
            "methodConfig": [
                {"name": [{"service": s} for s in _SERVICES], "retryPolicy": _RETRY_POLICY}
            ]
        }
        keepalive_ms = int(options.keepalive_time * 1000)
        channel_options = [
            ("grpc.max_send_message_length", options.max_message_size),
            ("grpc.max_receive_message_length", options.max_message_size),
            # Keepalive notices a dead peer during long transfers. Pings go only while calls
            # are in flight, and not more often than servers accept by default (5 minutes),
            # so a server never closes the connection for "too many pings".
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 0),
            # Bandwidth-delay probing lets a stream's receive window grow to many MiB: a pull
            # of 8 large blobs, each a ByteStream read consumed slower than the server sends,
            # then held hundreds of MiB in grpcio's buffers. Without it the window still
            # covers the message being read, which loopback and LANs fill at full speed.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", _STREAM_WINDOW),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(service_config)),
            ("grpc.primary_user_agent", "casframe"),
        ]
        if options.secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=(
                    _read_pem(options.server_cert, "server_cert (CA certificates)")
                    if options.server_cert else None
                ),
                private_key=(
                    _read_pem(options.client_key, "client_key") if options.client_key else None
                ),
                certificate_chain=(
                    _read_pem(options.client_cert, "client_cert") if options.client_cert else None
                ),
            )
            self.channel = grpc.secure_channel(options.target, credentials, channel_options)
        else:
            self.channel = grpc.insecure_channel(options.target, channel_options)
        self._closed = False

    def resource_prefix(self) -> str:
        """What ByteStream resource names start with: ``INSTANCE/`` or nothing."""
        return f"{self.instance}/" if self.instance else ""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.channel.close()

    @contextmanager
    def calling(
        self, what: str, *, digest: Digest | None = None, ref: str | None = None
    ) -> Iterator[None]:
        """Run RPCs, turning a ``grpc.RpcError`` into the matching casframe error."""
        try:
            yield
        except grpc.RpcError as exc:
            raise translate_error(exc, self.where, what, digest=digest, ref=ref) from None


def translate_error(
    error: grpc.RpcError,
    where: str,
    what: str,
    *,
    digest: Digest | None = None,
    ref: str | None = None,
) -> CasframeError:
    """The casframe error for a failed call ``what`` to ``where``."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        conflict = _ref_conflict(error)
        if conflict is not None:
            return conflict
    return translate_status(code, details or "", where, what, digest=digest, ref=ref)


# How casframe serve names the two refs of a conflict: an ErrorInfo in the status details.
_CONFLICT_DOMAIN, _CONFLICT_REASON = "casframe", "REF_CONFLICT"


def _ref_conflict(error: grpc.RpcError) -> RefConflictError | None:
    """The :class:`RefConflictError` a casframe server described in the status details."""
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in metadata or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # noqa: BLE001 - a malformed trailer is no conflict
            return None
        for packed in status.details:
            info = error_details_pb2.ErrorInfo()
            if not packed.Is(info.DESCRIPTOR) or not packed.Unpack(info):
                continue
            if (info.domain, info.reason) == (_CONFLICT_DOMAIN, _CONFLICT_REASON):
                name, existing = info.metadata.get("ref"), info.metadata.get("existing")
                if name and existing:
                    return RefConflictError(name, existing)
    return None


def translate_status(
    code: grpc.StatusCode | int,
    details: str,
    where: str,
    what: str,
    *,
    digest: Digest | None = None,
    ref: str | None = None,
) -> CasframeError:
    """The casframe error for a status (a ``grpc.StatusCode`` or a ``google.rpc.Code`` number)."""
    if isinstance(code, int):
        code = _CODES_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    said = f": {details}" if details else ""
    if code == grpc.StatusCode.NOT_FOUND:
        if ref is not None:
            return RefNotFoundError(ref, where)
        if digest is not None:
            return BlobNotFoundError(digest, where)
        return CasframeError(f"{where} found nothing for {what}{said}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return BackendUnavailableError(f"cannot reach {where}{said}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendUnavailableError(f"{where} did not answer {what} in time{said}")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PermissionDeniedError(f"{where} refused {what} ({code.name}){said}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return UnsupportedOperationError(f"{where} does not offer {what}{said}")
    if code == grpc.StatusCode.DATA_LOSS and digest is not None:
        return CorruptBlobError(digest, f"{where} reports data loss{said}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CasframeError(f"{where} rejected {what} as invalid{said}")
    return CasframeError(f"{what} failed at {where}: {code.name}{said}")
