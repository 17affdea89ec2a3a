"""The ``grpc://`` and ``grpcs://`` backends: any REAPI v2 server as a store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from casframe import hookimpl

if TYPE_CHECKING:  # loading the plugin (every command does) imports no registry
    from casframe import BackendRegistry


@hookimpl
def casframe_register_backends(registry: BackendRegistry) -> None:
    for scheme in ("grpc", "grpcs"):
        registry.add(
            scheme,
            "casframe_grpc.store:open_grpc_store",
            description="a Remote Execution API v2 server (ByteStream, CAS, Remote Asset)",
        )
