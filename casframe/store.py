"""Store: the user API over one backend's BlobStore and RefStore.

A facade: blob content is checked by the verified-blob layer it owns
(:class:`casframe.blobs.VerifiedBlobs`), ref names are validated here, and the tree, transfer
and maintenance algorithms, which work on that layer, are exposed as methods. Nothing below
this module imports it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO

from casframe.blobs import VerifiedBlobs, VerifiedUpload, VerifyingReader
from casframe.digest import Digest, looks_like_digest
from casframe.digestfunctions import DigestFunction, by_name
from casframe.errors import (
    BlobNotFoundError,
    InvalidDigestError,
    RefConflictError,
    RefNotFoundError,
    UnsupportedDigestFunctionError,
)
from casframe.lazy import lazy_module
from casframe.names import validate_ref_name
from casframe.refkinds import RESERVED_REF_NAMESPACES, refs_by_use, writable_ref_name
from casframe.spi import (
    BlobStore,
    Capability,
    RefCapability,
    RefInfo,
    RefStore,
    require_capabilities,
)
from casframe.treesize import TreeLimits
from casframe.workers.settings import DEFAULT_JOBS

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from casframe import checkout as _checkout
    from casframe import maintenance as _maintenance
    from casframe import transfer as _transfer
    from casframe import tree as _tree
    from casframe import treediff as _treediff
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory
    from casframe.maintenance import DuReport, FsckReport, GcReport, PruneReport
    from casframe.progress import Progress
    from casframe.transfer import TransferResult
    from casframe.tree import TreeEntry
    from casframe.treediff import Change, TreeDiff
else:
    # The algorithms behind the methods, each imported when one of its methods is first
    # called: a command that only reads refs (casframe ref list) does not import them all.
    _checkout = lazy_module("casframe.checkout")
    _maintenance = lazy_module("casframe.maintenance")
    _transfer = lazy_module("casframe.transfer")
    _tree = lazy_module("casframe.tree")
    _treediff = lazy_module("casframe.treediff")

# VerifiedUpload and VerifyingReader live in casframe.blobs; they are named here too, where
# they were first published.
__all__ = ["Store", "VerifiedUpload", "VerifyingReader"]


class _Siblings:
    """The stores of one location, one per digest function, opened on first use and closed
    with the store first opened there (the owner)."""

    def __init__(self, owner: Store, open_sibling: Callable[[str], Store] | None) -> None:
        self.owner = owner
        self.open_sibling = open_sibling
        self.lock = threading.Lock()
        self.members: dict[str, Store] = {owner.digest_function.name: owner}

    def get(self, store: Store, name: str) -> Store:
        function = by_name(name)
        with self.lock:
            sibling = self.members.get(function.name)
            if sibling is not None:
                return sibling
            if function.name not in store.digest_functions or self.open_sibling is None:
                supported = sorted(store.digest_functions if self.open_sibling else
                                   {store.digest_function.name})
                raise UnsupportedDigestFunctionError(
                    f"{store.url} cannot hold {function.name} digests; it supports "
                    f"{', '.join(supported)}"
                )
            sibling = self.open_sibling(function.name)
            sibling._siblings = self
            self.members[function.name] = sibling
            return sibling

    def close(self) -> None:
        with self.lock:
            others = [s for s in self.members.values() if s is not self.owner]
            self.members = {self.owner.digest_function.name: self.owner}
        for sibling in others:
            sibling._close_own()


class Store:
    """A content-addressed store: blobs, Directory trees and refs over one backend.

    ``tree_limits`` bound what checkout, ``walk`` and diff expand a tree to (the store options
    ``max_tree_entries`` and ``max_tree_bytes`` set them; each call may override them).
    ``jobs`` is how many processes a large local import or checkout uses (the store option
    ``jobs``; default: one per core).
    """

    def __init__(
        self,
        blobs: BlobStore,
        refs: RefStore,
        *,
        url: str = "",
        tree_limits: TreeLimits | None = None,
        jobs: int | None = None,
    ) -> None:
        self.blobs = blobs
        self.refs = refs
        #: The verified-blob layer over ``blobs``, which the algorithms work on.
        self.verified = VerifiedBlobs(blobs, url)
        self.tree_limits = tree_limits or TreeLimits()
        self.jobs = DEFAULT_JOBS if jobs is None else jobs
        self._siblings = _Siblings(self, None)

    @property
    def digest_function(self) -> DigestFunction:
        """The function every digest of this store is computed with (its backend's
        ``digest_function``; SHA-256 unless the store was opened with another)."""
        return self.verified.function

    @property
    def digest_functions(self) -> frozenset[str]:
        """Every digest function (REAPI name) this store's backend can hold."""
        return frozenset(self.blobs.digest_functions)

    def with_digest_function(self, name: str) -> Store:
        """The store over this same location with the digest function ``name``: this store
        for its own function, else a sibling opened on first use, kept, and closed with this
        store. A function the backend does not declare (or a store not opened by URL, which
        cannot be opened again) raises :class:`~casframe.UnsupportedDigestFunctionError`.
        Safe to call from several threads (the server asks once per request)."""
        if name == self.verified.function.name:
            return self
        return self._siblings.get(self, name)

    def adopt_sibling_opener(self, open_sibling: Callable[[str], Store]) -> None:
        """How :meth:`with_digest_function` opens this location with another function
        (``open_sibling(name)``); set by the code that opened this store by URL."""
        if self._siblings.owner is self:
            self._siblings.open_sibling = open_sibling

    @property
    def url(self) -> str:
        return self.verified.url

    @url.setter
    def url(self, value: str) -> None:
        self.verified.url = value

    def __repr__(self) -> str:
        return f"<Store {self.url}>"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the backend, and the stores :meth:`with_digest_function` opened from this
        one. A store so opened is closed by the store it came from: its own ``close`` does
        nothing."""
        if self._siblings.owner is not self:
            return
        try:
            self._siblings.close()
        finally:
            self._close_own()

    def _close_own(self) -> None:
        try:
            self.blobs.close()
        finally:
            if self.refs is not self.blobs:
                self.refs.close()

    def has(self, capability: Capability | RefCapability) -> bool:
        """Whether the backend declares ``capability`` (of its blobs, or of its refs)."""
        if isinstance(capability, RefCapability):
            return capability in self.refs.capabilities
        return self.verified.has(capability)

    def require(self, operation: str, *capabilities: Capability | RefCapability) -> None:
        """Raise :class:`~casframe.errors.UnsupportedOperationError` naming ``operation`` and
        what the backend lacks of ``capabilities``, before the operation touches anything."""
        require_capabilities(self.blobs, self.refs, operation, *capabilities, where=self.url)

    def check_writable(self) -> None:
        """Raise :class:`~casframe.errors.PermissionDeniedError` when this store is known to
        refuse writes (a read-only server, missing write permission).

        Nothing visible changes: at most the empty blob is stored, which is always present.
        """
        self.refs.check_writable()
        self.blobs.check_writable()

    # -- blobs ------------------------------------------------------------------------------

    def find_missing(self, digests: Iterable[Digest], *, freshen: bool = False) -> set[Digest]:
        """The subset of ``digests`` not stored here (see :meth:`VerifiedBlobs.find_missing`)."""
        return self.verified.find_missing(digests, freshen=freshen)

    def contains(self, digest: Digest) -> bool:
        return self.verified.contains(digest)

    def open_read(self, digest: Digest, offset: int = 0, *, verify: bool = True) -> BinaryIO:
        """Stream a blob from ``offset``; with ``verify``, corruption raises at the end."""
        return self.verified.open_read(digest, offset, verify=verify)

    def read_bytes(self, digest: Digest) -> bytes:
        """Read a whole blob (verified). Meant for small blobs such as Directory messages."""
        return self.verified.read_bytes(digest)

    def read_many(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        """Read small blobs in backend batches, verifying each."""
        return self.verified.read_many(digests)

    def put_bytes(self, data: bytes, expected: Digest | None = None) -> Digest:
        """Store ``data``; with ``expected``, refuse content that does not match it."""
        return self.verified.put_bytes(data, expected)

    def put_many(self, blobs: Collection[tuple[Digest, bytes]]) -> None:
        """Store small blobs after checking each one's content against its digest."""
        self.verified.put_many(blobs)

    def open_upload(self, expected: Digest) -> VerifiedUpload:
        """A push-style upload of ``expected``: ``write`` chunks, then ``commit`` or ``abort``
        (see :meth:`VerifiedBlobs.open_upload`)."""
        return self.verified.open_upload(expected)

    def put_stream(
        self,
        stream: BinaryIO,
        expected: Digest | None = None,
        *,
        on_chunk: Callable[[int], None] | None = None,
    ) -> Digest:
        """Stream content in, hashing as it goes; commit only under the digest it really has
        (see :meth:`VerifiedBlobs.put_stream`)."""
        return self.verified.put_stream(stream, expected, on_chunk=on_chunk)

    def put_file(self, path: str | os.PathLike[str]) -> Digest:
        return self.verified.put_file(path)

    def put_open_file(self, fd: int) -> Digest:
        """Store the open regular file ``fd`` from its offset to its end; return the digest."""
        return self.verified.put_open_file(fd)

    def copy_blob_from(self, source: Store, digest: Digest) -> None:
        """Copy one blob from ``source``, verifying it on the way in."""
        self.verified.copy_blob_from(source.verified, digest)

    # -- Directory messages -----------------------------------------------------------------

    def get_directory(self, digest: Digest) -> Directory:

        return self.verified.get_directory(digest)

    def put_directory(self, directory: Directory) -> Digest:
        """Store a Directory message. The caller guarantees its children are already stored."""
        return self.put_bytes(directory.SerializeToString(deterministic=True))

    # -- trees ------------------------------------------------------------------------------

    def import_directory(
        self,
        path: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        stat_cache: bool | str | os.PathLike[str] = True,
        jobs: int | None = None,
    ) -> Digest:
        """Store a directory on disk as a Directory tree; return the root digest.

        ``stat_cache``: files unchanged since the last import of ``path`` are not read again
        (:mod:`casframe.statcache`); ``False`` reads every file, a path keeps the cache there.
        ``jobs``: processes to use when the tree is large enough (default: :attr:`jobs`).
        """

        return _tree.import_directory(
            self.verified, path, progress=progress, stat_cache=stat_cache,
            jobs=self.jobs if jobs is None else jobs,
        )

    def checkout(
        self,
        tree: Digest | str,
        dest: str | os.PathLike[str],
        *,
        link: bool | None = None,
        progress: Progress | None = None,
        max_tree_entries: int | None = None,
        max_tree_bytes: int | None = None,
        jobs: int | None = None,
    ) -> None:
        """Materialise a tree (digest or ref) at ``dest``, which must be absent or empty.

        ``link=None`` hardlinks when the store has local files on the same file system and
        copies otherwise; ``True`` insists on hardlinks; ``False`` always copies. A tree that
        expands to more entries or bytes than the limits (this store's ``tree_limits`` unless
        given here) raises :class:`~casframe.errors.TreeTooLargeError` before anything is
        written; a failed checkout removes what it wrote. ``jobs``: processes to use when the
        tree is large enough (default: :attr:`jobs`).
        """

        limits = self.tree_limits.with_overrides(max_tree_entries, max_tree_bytes)
        _checkout.checkout(
            self.verified, self.resolve(tree), dest, link=link, progress=progress, limits=limits,
            jobs=self.jobs if jobs is None else jobs,
        )

    def diff(
        self,
        a: Digest | str,
        b: Digest | str,
        subdir: str = "",
        *,
        max_tree_entries: int | None = None,
    ) -> TreeDiff:
        """What changed from tree ``a`` to tree ``b`` (see :meth:`iter_diff`)."""

        limits = self.tree_limits.with_overrides(max_tree_entries)
        return _treediff.diff_trees(
            self.verified, self.resolve(a), self.resolve(b), subdir=subdir, limits=limits
        )

    def iter_diff(
        self,
        a: Digest | str,
        b: Digest | str,
        subdir: str = "",
        *,
        max_tree_entries: int | None = None,
    ) -> Iterator[Change]:
        """``(letter, path)`` for each path added (``A``), removed (``D``) or modified
        (``M``), sorted by path; a comparison visiting more entries than the limit raises
        :class:`~casframe.errors.TreeTooLargeError` before the first one."""

        limits = self.tree_limits.with_overrides(max_tree_entries)
        return _treediff.iter_diff(
            self.verified, self.resolve(a), self.resolve(b), subdir=subdir, limits=limits
        )

    def subdir(self, tree: Digest | str, path: str) -> Digest:
        """The digest of the Directory at ``path`` inside ``tree``."""

        return _tree.lookup_subdir(self.verified, self.resolve(tree), path)

    def walk(
        self, tree: Digest | str, path: str = "", *, max_tree_entries: int | None = None
    ) -> Iterator[TreeEntry]:
        """Every entry under ``path`` of ``tree``, depth first, parents before children.

        The subtree is measured first: one with more entries than the limit raises
        :class:`~casframe.errors.TreeTooLargeError` here, before any entry is returned.
        """

        limits = self.tree_limits.with_overrides(max_tree_entries)
        return _tree.walk(self.verified, self.resolve(tree), path, limits=limits)

    def ls(self, tree: Digest | str, path: str = "") -> list[TreeEntry]:
        """The entries directly inside ``path`` of ``tree``."""

        return _tree.list_directory(self.verified, self.resolve(tree), path)

    def open_file(self, tree: Digest | str, path: str) -> BinaryIO:
        """Open the file at ``path`` inside ``tree`` (verified stream)."""

        entry = _tree.lookup_file(self.verified, self.resolve(tree), path)
        assert entry.digest is not None
        return self.open_read(entry.digest)

    def tree_digests(self, tree: Digest | str) -> Iterator[Digest]:
        """Every digest in a tree's closure (Directories and files), each once."""

        return _tree.closure(self.verified, self.resolve(tree))

    # -- refs -------------------------------------------------------------------------------

    def resolve(self, tree: Digest | str) -> Digest:
        """A digest as it is; a string as ``HASH/SIZE`` or, failing that, a ref name."""
        if isinstance(tree, Digest):
            return tree
        head = tree.split("/", 1)[0]
        if "/" in tree and head.isalnum() and len(head) == self.digest_function.hex_length:
            try:
                return Digest.parse(tree)
            except InvalidDigestError:
                pass
        return self.get_ref(tree)

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        return self.refs.get_ref(validate_ref_name(name), touch=touch)

    def set_ref(self, name: str, digest: Digest, *, check_complete: bool = True) -> None:
        """Point ``name`` at a tree. By default refuse a tree that is not fully stored, and a
        name in the server's own namespaces (``ac``, ``asset`` and every name under them),
        which prune would not read as a tree; ``check_complete=False`` allows both (for the
        server's own refs), except the bare names ``ac`` and ``asset``.

        A name that would shadow another ref or be shadowed by it (``a`` and ``a/b``) is
        refused with :class:`~casframe.errors.RefConflictError` in every case.

        The completeness check also freshens every blob of the tree just before the ref is set,
        so a concurrent prune (whose grace period is longer than this call) cannot remove a blob
        the new ref needs, even one that was stored long ago and unreferenced until now.
        """
        if check_complete:
            writable_ref_name(name)  # a tree: never under the server's own namespaces
            self._refuse_conflict(name)
            missing = _tree.missing_in_tree(self.verified, digest, freshen=True)
            if missing:
                raise BlobNotFoundError(missing, f"{self.url} (tree {digest} is incomplete)")
        else:
            validate_ref_name(name)
            if name in RESERVED_REF_NAMESPACES:  # never a ref, not even one of the server's
                writable_ref_name(name)
            self._refuse_conflict(name)
        self.refs.set_ref(name, digest)

    def _refuse_conflict(self, name: str) -> None:
        existing = self.refs.conflicting_ref(name)
        if existing is not None:
            raise RefConflictError(name, existing)

    def delete_ref(self, name: str) -> None:
        self.refs.delete_ref(validate_ref_name(name))

    def copy_ref(self, source: str, dest: str) -> Digest:
        writable_ref_name(dest)  # not under the server's own namespaces
        digest = self.get_ref(source)
        self._refuse_conflict(dest)
        self.refs.set_ref(dest, digest)
        return digest

    def list_refs(self, prefix: str = "") -> list[RefInfo]:
        """Refs starting with ``prefix``, least recently used first."""
        return refs_by_use(self.refs, prefix)

    def has_ref(self, name: str) -> bool:
        try:
            self.get_ref(name, touch=False)
        except RefNotFoundError:
            return False
        return True

    # -- transfer ---------------------------------------------------------------------------

    def push(
        self,
        dest: Store,
        tree: Digest | str,
        *,
        ref: str | None = None,
        progress: Progress | None = None,
    ) -> TransferResult:
        """Copy a tree's closure to ``dest``; set ``ref`` there (default: the ref pushed)."""
        return _transfer_between(self, dest, tree, ref, progress)

    def pull(
        self,
        source: Store,
        tree: Digest | str,
        *,
        ref: str | None = None,
        progress: Progress | None = None,
    ) -> TransferResult:
        """Copy a tree's closure from ``source`` into this store."""
        return _transfer_between(source, self, tree, ref, progress)

    # -- maintenance ------------------------------------------------------------------------

    def prune(
        self, *, grace_period: float = 3600.0, dry_run: bool = False,
        progress: Progress | None = None,
    ) -> PruneReport:
        """Delete blobs no ref reaches that are older than ``grace_period`` seconds."""
        return _maintenance.prune(
            self.verified, self.refs, grace_period=grace_period, dry_run=dry_run,
            progress=progress,
        )

    def gc(
        self, *, max_size: int | str, low_watermark: float = 0.8, keep: Iterable[str] = (),
        grace_period: float = 3600.0, dry_run: bool = False, progress: Progress | None = None,
    ) -> GcReport:
        """Expire least recently used refs while over ``max_size``, then prune."""
        return _maintenance.gc(
            self.verified, self.refs, max_size=max_size, low_watermark=low_watermark, keep=keep,
            grace_period=grace_period, dry_run=dry_run, progress=progress,
        )

    def fsck(self, *, repair: bool = False, progress: Progress | None = None) -> FsckReport:
        """Verify every blob and every ref's tree; with ``repair``, delete corrupt blobs."""
        return _maintenance.fsck(self.verified, self.refs, repair=repair, progress=progress)

    def du(self, *, progress: Progress | None = None) -> DuReport:
        """Total size and object count; per ref its total and exclusive size."""
        return _maintenance.du(self.verified, self.refs, progress=progress)

    def executor(self) -> ThreadPoolExecutor:
        """A thread pool sized for this backend."""
        return self.verified.executor()


def _transfer_between(
    source: Store, dest: Store, tree: Digest | str, ref: str | None, progress: Progress | None
) -> TransferResult:
    """Copy ``tree`` (a digest, or a ref name in ``source``, then also the default ``ref``)
    and set ``ref`` in ``dest`` last."""
    if isinstance(tree, str):
        root = source.resolve(tree)
        if ref is None and not looks_like_digest(tree):
            ref = tree
    else:
        root = tree
    if ref is not None:
        writable_ref_name(ref)  # a tree: never under the server's own namespaces
    result = _transfer.transfer(source.verified, dest.verified, root, ref=ref, progress=progress)
    if ref is not None:
        dest.set_ref(ref, root, check_complete=False)
    return result
