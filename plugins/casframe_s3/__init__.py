"""The ``s3://BUCKET/PREFIX`` backend (boto3), registered lazily so boto3 stays optional."""

from __future__ import annotations

from typing import TYPE_CHECKING

from casframe import hookimpl

if TYPE_CHECKING:  # loading the plugin (every command does) imports no registry
    from casframe import BackendRegistry


@hookimpl
def casframe_register_backends(registry: BackendRegistry) -> None:
    registry.add(
        "s3",
        "casframe_s3.store:open_s3_store",
        description="S3 or any S3-compatible object store",
        extra="s3",
    )
