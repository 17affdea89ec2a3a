"""The ``grpc://`` and ``grpcs://`` stores: any REAPI v2 server as a casframe backend.

Blobs travel through the ContentAddressableStorage batch calls when they are small and through
ByteStream when they are large; refs through BuildStream's ReferenceStorage or the Remote Asset
API, whichever the server offers. The server's capabilities are read once, on open, and its
batch limit is respected.

Like every backend, this one only moves bytes: it never hashes or verifies content (the core
does, above it), and it never lets a grpc error escape (see :mod:`casframe_grpc._connection`).
REAPI has no call to list or delete blobs or refs, so neither is offered.

This module holds the factory the plugin registers; the stores are in
:mod:`casframe_grpc.blobs` and :mod:`casframe_grpc.refs`.
"""

from __future__ import annotations

import grpc

from casframe import BackendUnavailableError, Store, StoreURL, UnsupportedOperationError
from casframe.reapi import remote_execution as reapi
from casframe.reapi import remote_execution_grpc as reapi_grpc

from ._answers import check_capabilities
from ._connection import Connection, GrpcOptions, translate_error
from .blobs import GrpcBlobStore
from .refs import GrpcRefStore

__all__ = ["open_grpc_store"]


def _read_capabilities(conn: Connection) -> reapi.ServerCapabilities | None:
    """The server's capabilities (None when it has no Capabilities service); fail fast."""
    stub = reapi_grpc.CapabilitiesStub(conn.channel)
    try:
        capabilities = stub.GetCapabilities(
            reapi.GetCapabilitiesRequest(instance_name=conn.instance),
            timeout=conn.options.timeout,
        )
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return None  # an old or minimal server: assume REAPI's defaults
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise BackendUnavailableError(
                f"cannot reach {conn.where}: {exc.details() or code.name}"
            ) from None
        raise translate_error(exc, conn.where, "GetCapabilities") from None
    check_capabilities(conn.where, capabilities)
    functions = capabilities.cache_capabilities.digest_functions
    if functions and reapi.DigestFunction.SHA256 not in functions:
        offered = ", ".join(reapi.DigestFunction.Value.Name(f) for f in functions)
        raise UnsupportedOperationError(
            f"{conn.where} does not store SHA256 digests (it offers {offered}); "
            "casframe needs SHA256"
        )
    return capabilities


def open_grpc_store(url: StoreURL) -> Store:
    """Factory for ``grpc://HOST:PORT[/INSTANCE]`` and ``grpcs://...``.

    Connects and reads the server's capabilities at once, so an unreachable server or one
    without SHA256 is reported here rather than at the first transfer.
    """
    conn = Connection(GrpcOptions.from_url(url))
    try:
        capabilities = _read_capabilities(conn)
    except BaseException:
        conn.close()
        raise
    return Store(GrpcBlobStore(conn, capabilities), GrpcRefStore(conn), url=url.url)
