"""The refs of an ``s3://`` store: small objects ``PREFIX/refs/heads/NAME``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import botocore.exceptions

from casframe import (
    Digest,
    RefCapability,
    RefInfo,
    RefNotFoundError,
    RefStore,
    layout,
)
from casframe_s3.bucket import _DENIED, _NOT_FOUND, _Bucket, _error_code

log = logging.getLogger(__name__)

# Largest ref object read: a serialized Digest is ~70 bytes; anything huge is not a ref.
MAX_REF_BYTES = 64 << 10


class S3RefStore(RefStore):
    """Refs as small objects ``PREFIX/refs/heads/NAME``; last access in their metadata.

    The access time is kept in user metadata (``accessed``, client clock, microseconds) rather
    than taken from LastModified, whose one-second resolution cannot order refs used within
    the same second. Refs written by other tools fall back to LastModified.
    """

    capabilities = frozenset({RefCapability.LIST, RefCapability.DELETE})

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
        return layout.decode_ref(data, name, self._where()), response

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
            layout.encode_ref(digest),
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
