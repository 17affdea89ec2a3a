"""The ``memory://`` backend: blobs and refs in this process's memory.

Every ``open_store("memory://")`` returns a new, empty store; nothing is shared between
instances. It is the reference implementation of the backend contract: small, complete, and
meant to be read by plugin authors.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from typing import BinaryIO

from casframe import (
    DIGEST_FUNCTIONS,
    SHA256,
    BlobInfo,
    BlobStore,
    BlobWriter,
    Capability,
    Digest,
    DigestFunction,
    RefCapability,
    RefConflictError,
    RefInfo,
    RefNotFoundError,
    RefStore,
    Store,
    StoreURL,
)

__all__ = ["MemoryBlobStore", "MemoryRefStore", "open_memory_store"]


class _MemoryWriter(BlobWriter):
    def __init__(self, store: MemoryBlobStore) -> None:
        self._store = store
        self._buffer = io.BytesIO()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.write(data)

    def commit(self, digest: Digest) -> None:
        with self._store.lock:
            stored = self._store.blobs.get(digest)
            # An existing blob is kept as it is, but freshened like touch_blobs would.
            data = self._buffer.getvalue() if stored is None else stored[0]
            self._store.blobs[digest] = (data, time.time())
        self.abort()

    def abort(self) -> None:
        self._buffer = io.BytesIO()


class MemoryBlobStore(BlobStore):
    capabilities = frozenset({Capability.LIST, Capability.DELETE, Capability.TOUCH})
    # Every function: a store holds one, and each store has maps of its own.
    digest_functions = frozenset(DIGEST_FUNCTIONS)

    def __init__(self, function: DigestFunction = SHA256) -> None:
        self.digest_function = function
        self.lock = threading.Lock()
        self.blobs: dict[Digest, tuple[bytes, float]] = {}

    def describe(self) -> str:
        return "memory://"

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        with self.lock:
            return {d for d in digests if d not in self.blobs}

    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        with self.lock:
            entry = self.blobs.get(digest)
        if entry is None:
            raise self._not_found(digest)
        stream = io.BytesIO(entry[0])
        stream.seek(offset)
        return stream

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        return _MemoryWriter(self)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        with self.lock:
            items = list(self.blobs.items())
        for digest, (_, mtime) in items:
            yield BlobInfo(digest, mtime)

    def delete_blobs(
        self, digests: Iterable[Digest], *, older_than: float | None = None
    ) -> list[Digest]:
        deleted = []
        with self.lock:
            for digest in digests:
                entry = self.blobs.get(digest)
                if entry is not None and (older_than is None or entry[1] < older_than):
                    del self.blobs[digest]
                    deleted.append(digest)
        return deleted

    def touch_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        now = time.time()
        absent = []
        with self.lock:
            for digest in digests:
                if digest in self.blobs:
                    self.blobs[digest] = (self.blobs[digest][0], now)
                else:
                    absent.append(digest)
        return absent


class MemoryRefStore(RefStore):
    capabilities = frozenset({RefCapability.LIST, RefCapability.DELETE})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[str, tuple[Digest, float]] = {}

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        with self._lock:
            entry = self._refs.get(name)
            if entry is None:
                raise RefNotFoundError(name, "memory://")
            if touch:
                self._refs[name] = (entry[0], time.time())
            return entry[0]

    def set_ref(self, name: str, digest: Digest) -> None:
        with self._lock:
            # Checked again under the lock: two threads setting "a" and "a/b" at once cannot
            # both pass the core's check.
            existing = self._in_the_way(name)
            if existing is not None:
                raise RefConflictError(name, existing)
            self._refs[name] = (digest, time.time())

    def conflicting_ref(self, name: str) -> str | None:
        with self._lock:
            return self._in_the_way(name)

    def _in_the_way(self, name: str) -> str | None:
        segments = name.split("/")
        for end in range(1, len(segments)):
            folder = "/".join(segments[:end])
            if folder in self._refs:
                return folder
        under = f"{name}/"
        return next((other for other in self._refs if other.startswith(under)), None)

    def delete_ref(self, name: str) -> None:
        with self._lock:
            if self._refs.pop(name, None) is None:
                raise RefNotFoundError(name, "memory://")

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        with self._lock:
            items = [(n, e) for n, e in self._refs.items() if n.startswith(prefix)]
        for name, (digest, accessed) in items:
            yield RefInfo(name, digest, accessed)


def open_memory_store(url: StoreURL) -> Store:
    """Factory for ``memory://``: a new empty store each time, of ``url.digest_function``.
    It takes no options of its own."""
    url.check_options(())
    blobs = MemoryBlobStore(url.digest_function_for(MemoryBlobStore))
    return Store(blobs, MemoryRefStore(), url=url.url)
