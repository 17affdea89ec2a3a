"""A read-only view of a store: every read passes through, nothing is ever written.

``casframe serve --read-only`` serves its store through this view, so that not even the
bookkeeping of reads reaches the store: no ref access time is refreshed, no blob is freshened
for prune's grace period, no temp file is made. Each write raises
:class:`~casframe.errors.PermissionDeniedError`. This module must never pass a write, a touch
or a delete through to the store it wraps.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from typing import BinaryIO, NoReturn

from casframe.digest import Digest
from casframe.errors import PermissionDeniedError
from casframe.spi import (
    BlobInfo,
    BlobStore,
    BlobWriter,
    Capability,
    RefCapability,
    RefInfo,
    RefStore,
)
from casframe.store import Store

__all__ = ["ReadOnlyBlobStore", "ReadOnlyRefStore", "read_only_view"]

# Capabilities that write: a read-only view does not offer them, so the core never freshens
# through it (``Store.find_missing(freshen=True)`` only looks) and prune or fsck --repair
# report that they cannot delete.
_WRITING_CAPABILITIES = frozenset({Capability.TOUCH, Capability.DELETE, Capability.COPY_FILE})


def _refuse(where: str, what: str) -> NoReturn:
    raise PermissionDeniedError(f"{where} is opened read-only: cannot {what}")


class ReadOnlyBlobStore(BlobStore):
    """The blobs of another :class:`BlobStore`, read and listed but never written."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities - _WRITING_CAPABILITIES
        self.limits = inner.limits
        self.digest_functions = inner.digest_functions
        self.digest_function = inner.digest_function

    def describe(self) -> str:
        return self.inner.describe()

    #: Whether :meth:`close` closes ``inner`` (not for views of siblings the inner store owns).
    closes_inner = True

    def close(self) -> None:
        if self.closes_inner:
            self.inner.close()

    # -- reads ------------------------------------------------------------------------------

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        return self.inner.find_missing_blobs(digests)

    def freshen_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        return self.inner.find_missing_blobs(digests)  # looks, never touches

    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        return self.inner.open_blob(digest, offset)

    def read_blobs(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        return self.inner.read_blobs(digests)

    def get_tree(self, root: Digest) -> Iterator[bytes]:
        return self.inner.get_tree(root)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        return self.inner.iter_blobs()

    def iter_blob_stats(
        self, skip: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, int, float]]:
        return self.inner.iter_blob_stats(skip)

    def local_path(self, digest: Digest) -> str:
        return self.inner.local_path(digest)

    def now(self) -> float:
        return self.inner.now()  # a dry-run prune measures by the inner store's clock

    def link_blobs(self, dir_fd: int, links: Iterable[tuple[str, Digest]]) -> None:
        self.inner.link_blobs(dir_fd, links)

    # -- writes -----------------------------------------------------------------------------

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        _refuse(self.describe(), "store blobs")

    def begin_write_for(self, digest: Digest) -> BlobWriter:
        _refuse(self.describe(), "store blobs")

    def write_blobs(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        _refuse(self.describe(), "store blobs")

    def touch_blobs(self, digests: Iterable[Digest]) -> Collection[Digest]:
        _refuse(self.describe(), "refresh blob times")

    def delete_blobs(
        self, digests: Iterable[Digest], *, older_than: float | None = None
    ) -> Collection[Digest]:
        _refuse(self.describe(), "delete blobs")

    def clean_temp(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]:
        if dry_run:  # counting them is a read
            return self.inner.clean_temp(older_than, dry_run=True)
        _refuse(self.describe(), "remove temp files")

    def check_writable(self) -> None:
        _refuse(self.describe(), "store anything")


class ReadOnlyRefStore(RefStore):
    """The refs of another :class:`RefStore`, read without touching and never changed.

    It declares what the inner store declares, ``delete`` included, so that deleting a ref
    is refused as every write is: with :class:`PermissionDeniedError`, saying why.
    """

    capabilities: frozenset[RefCapability] = frozenset()  # the inner store's, per instance

    def __init__(self, inner: RefStore, where: str) -> None:
        self.inner = inner
        self._where = where
        self.capabilities = inner.capabilities

    closes_inner = True

    def close(self) -> None:
        if self.closes_inner:
            self.inner.close()

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        return self.inner.get_ref(name, touch=False)  # a use a read-only server cannot record

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        return self.inner.list_refs(prefix)

    def conflicting_ref(self, name: str) -> str | None:
        return self.inner.conflicting_ref(name)

    def set_ref(self, name: str, digest: Digest) -> None:
        _refuse(self._where, "set refs")

    def delete_ref(self, name: str) -> None:
        _refuse(self._where, "delete refs")

    def check_writable(self) -> None:
        _refuse(self._where, "update refs")


def read_only_view(store: Store, *, closes_store: bool = True) -> Store:
    """``store`` seen read-only; closing the view closes ``store`` when ``closes_store``.
    The view's ``with_digest_function`` gives read-only views of ``store``'s siblings (which
    ``store`` closes)."""
    blobs = ReadOnlyBlobStore(store.blobs)
    refs = ReadOnlyRefStore(store.refs, blobs.describe())
    blobs.closes_inner = refs.closes_inner = closes_store
    view = Store(blobs, refs, url=store.url)
    view.adopt_sibling_opener(
        lambda name: read_only_view(store.with_digest_function(name), closes_store=False)
    )
    return view
