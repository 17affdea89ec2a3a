"""The ``memory://`` backend's plugin: registers the scheme; the stores, the reference
implementation of the backend contract, are in :mod:`casframe_memory.store`, imported when a
``memory://`` store is first opened."""

from __future__ import annotations

from typing import TYPE_CHECKING

from casframe import hookimpl

if TYPE_CHECKING:  # loading the plugin (every command does) imports no registry
    from casframe import BackendRegistry


@hookimpl
def casframe_register_backends(registry: BackendRegistry) -> None:
    registry.add(
        "memory",
        "casframe_memory.store:open_memory_store",
        description="in-process memory, one per open",
    )
