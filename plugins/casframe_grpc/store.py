"""The ``grpc://`` and ``grpcs://`` stores: any REAPI v2 server as a casframe backend.

Blobs travel through the ContentAddressableStorage batch calls when they are small and through
ByteStream when they are large; refs through BuildStream's ReferenceStorage or the Remote Asset
API, whichever the server offers. The server's capabilities are read once, on open, and its
batch limit is respected.

Like every backend, this one only moves bytes: it never hashes or verifies content (the core
does, above it), and it never lets a grpc error escape (see :mod:`casframe_grpc._connection`).
REAPI has no call to list or delete blobs or refs, so neither is offered.

A store opened with another digest function (``?digest_function=blake3``,
``open_store(url, digest_function="sha512")``) checks on open that the server's capabilities
list it, and names it in every request: the ``digest_function`` field, and in ByteStream
resource names the ``blake3/`` segment REAPI asks for (SHA-384 and SHA-512 names leave it out,
as REAPI says, and the server infers them from the hash's length). Its refs travel over Remote
Asset, whose requests carry the function; ReferenceStorage has no such field, so it serves
SHA-256 stores only.

This module holds the factory the plugin registers; the stores are in
:mod:`casframe_grpc.blobs` and :mod:`casframe_grpc.refs`.
"""

from __future__ import annotations

import grpc

from casframe import (
    SHA256,
    BackendUnavailableError,
    DigestFunction,
    Store,
    StoreURL,
    UnsupportedDigestFunctionError,
)
from casframe.reapi import remote_execution as reapi
from casframe.reapi import remote_execution_grpc as reapi_grpc

from ._answers import check_capabilities
from ._connection import Connection, GrpcOptions, translate_error
from .blobs import GrpcBlobStore
from .refs import GrpcRefStore

__all__ = ["open_grpc_store"]


def _read_capabilities(conn: Connection) -> reapi.ServerCapabilities | None:
    """The server's capabilities (None when it has no Capabilities service); fail fast, and
    refuse a server that does not offer the store's digest function."""
    stub = reapi_grpc.CapabilitiesStub(conn.channel)
    try:
        capabilities = stub.GetCapabilities(
            reapi.GetCapabilitiesRequest(instance_name=conn.instance),
            timeout=conn.options.timeout,
        )
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            # An old or minimal server: assume REAPI's defaults, SHA-256 alone.
            _check_function(conn, [reapi.DigestFunction.SHA256], "it has no Capabilities "
                            "service, so it is taken to offer SHA256 only")
            return None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise BackendUnavailableError(
                f"cannot reach {conn.where}: {exc.details() or code.name}"
            ) from None
        raise translate_error(exc, conn.where, "GetCapabilities") from None
    check_capabilities(conn.where, capabilities)
    # A server that lists none predates the field: REAPI's default, SHA-256, is all it holds.
    functions = list(capabilities.cache_capabilities.digest_functions) or [
        reapi.DigestFunction.SHA256
    ]
    _check_function(conn, functions, "")
    return capabilities


def _check_function(conn: Connection, offered: list[int], why: str) -> None:
    function = conn.function
    if function.reapi_value in offered:
        return
    names = []
    for value in offered:
        try:
            names.append(reapi.DigestFunction.Value.Name(value))
        except ValueError:
            names.append(str(value))
    raise UnsupportedDigestFunctionError(
        f"{conn.where} does not store {function.name.upper()} digests (it offers "
        f"{', '.join(names)}{'; ' + why if why else ''}); open it with one of those as "
        "digest_function"
    )


def open_grpc_store(url: StoreURL) -> Store:
    """Factory for ``grpc://HOST:PORT[/INSTANCE]`` and ``grpcs://...``.

    Connects and reads the server's capabilities at once, so an unreachable server or one
    without the store's digest function is reported here rather than at the first transfer.
    """
    function: DigestFunction = url.digest_function_for(GrpcBlobStore)
    options = GrpcOptions.from_url(url)
    if function != SHA256 and options.ref_protocol == "reference-storage":
        raise UnsupportedDigestFunctionError(
            f"{url.url}: ref_protocol=reference-storage carries SHA256 digests only "
            f"(BuildStream's ReferenceStorage has no digest function); refs of a "
            f"{function.name} store travel over Remote Asset (ref_protocol=asset or auto)"
        )
    conn = Connection(options, function)
    try:
        capabilities = _read_capabilities(conn)
    except BaseException:
        conn.close()
        raise
    return Store(GrpcBlobStore(conn, capabilities), GrpcRefStore(conn), url=url.url)
