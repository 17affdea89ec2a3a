"""Store: the user API over one backend's BlobStore and RefStore.

Everything that must hold whatever the backend is enforced here, once: the empty blob is always
present, content is hashed while it streams in and committed only under the digest it really
has, reads are verified, ref names are validated. Tree, transfer and maintenance algorithms
live in their own modules and are exposed here as methods.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, BinaryIO

from casframe.digest import CHUNK_SIZE, Digest, Hasher
from casframe.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    DigestMismatchError,
    InvalidDigestError,
    RefConflictError,
    RefNotFoundError,
    UnsupportedOperationError,
)
from casframe.names import RESERVED_REF_NAMESPACES, validate_ref_name, writable_ref_name
from casframe.spi import BlobStore, BlobWriter, Capability, RefCapability, RefInfo, RefStore
from casframe.treesize import TreeLimits
from casframe.workers.settings import DEFAULT_JOBS

if TYPE_CHECKING:
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory
    from casframe.maintenance import DuReport, FsckReport, GcReport, PruneReport
    from casframe.progress import Progress
    from casframe.transfer import TransferResult
    from casframe.tree import TreeEntry
    from casframe.treediff import Change, TreeDiff

__all__ = ["Store", "VerifiedUpload", "VerifyingReader"]


class VerifyingReader(io.RawIOBase):
    """Passes a blob's bytes through, raising :class:`CorruptBlobError` when they end.

    Reading from offset 0 checks size and hash; reading from an offset checks the size only.
    Corruption is raised when the last byte is read (or when the stream ends early), so a
    consumer that writes the data somewhere must not publish it before reaching the end.
    """

    def __init__(self, raw: BinaryIO, digest: Digest, offset: int = 0) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._hasher: Hasher | None = Hasher() if offset == 0 else None
        self._position = offset
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        remaining = self._digest.size - self._position
        if remaining <= 0:
            # One more read to prove the stored object is not longer than its digest says.
            extra = self._raw.read(1)
            if extra:
                raise CorruptBlobError(self._digest, "stored object is longer than its size")
            self._finish()
            return 0
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            n = readinto(view[: min(len(view), remaining)])
        else:
            chunk = self._raw.read(min(len(view), remaining))
            n = len(chunk)
            view[:n] = chunk
        if not n:
            raise CorruptBlobError(
                self._digest, f"stored object is truncated at {self._position} bytes"
            )
        if self._hasher is not None:
            self._hasher.update(view[:n])
        self._position += n
        if self._position == self._digest.size:
            self._finish()
        return n

    def _finish(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._hasher is not None:
            actual = self._hasher.digest()
            if actual != self._digest:
                raise CorruptBlobError(self._digest, f"content hashes to {actual.hash}")

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


class VerifiedUpload:
    """Content streaming into a backend writer, hashed on the way; visible only after
    :meth:`commit`, and only under the digest it really has.

    With ``expected``, content past the expected size or hashing to another digest raises
    :class:`DigestMismatchError` (the caller then calls :meth:`abort`; nothing is stored).
    """

    def __init__(self, writer: BlobWriter, expected: Digest | None = None) -> None:
        self._writer = writer
        self._expected = expected
        self._hasher = Hasher()

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._hasher.size

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self._hasher.update(chunk)
        if self._expected is not None and self._hasher.size > self._expected.size:
            raise DigestMismatchError(self._expected, self._hasher.digest())
        self._writer.write(chunk)

    def commit(self) -> Digest:
        digest = self._hasher.digest()
        if self._expected is not None and digest != self._expected:
            raise DigestMismatchError(self._expected, digest)
        if digest.size:
            self._writer.commit(digest)
        else:
            self._writer.abort()
        return digest

    def abort(self) -> None:
        self._writer.abort()


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
        self.url = url or blobs.describe()
        self.tree_limits = tree_limits or TreeLimits()
        self.jobs = DEFAULT_JOBS if jobs is None else jobs

    def __repr__(self) -> str:
        return f"<Store {self.url}>"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.blobs.close()
        finally:
            if self.refs is not self.blobs:
                self.refs.close()

    def has(self, capability: Capability | RefCapability) -> bool:
        """Whether the backend declares ``capability`` (of its blobs, or of its refs)."""
        if isinstance(capability, RefCapability):
            return capability in self.refs.capabilities
        return capability in self.blobs.capabilities

    def require(self, operation: str, *capabilities: Capability | RefCapability) -> None:
        """Raise :class:`~casframe.errors.UnsupportedOperationError` naming ``operation`` and
        what the backend lacks of ``capabilities``, before the operation touches anything."""
        lacking = [c for c in capabilities if not self.has(c)]
        if lacking:
            parts = [
                "/".join(c for c in lacking if isinstance(c, kind)) + f" {things}"
                for kind, things in ((Capability, "blobs"), (RefCapability, "refs"))
                if any(isinstance(c, kind) for c in lacking)
            ]
            raise UnsupportedOperationError(
                f"{operation} is not supported by this backend: it cannot {', '.join(parts)} "
                f"({self.url})"
            )

    def check_writable(self) -> None:
        """Raise :class:`~casframe.errors.PermissionDeniedError` when this store is known to
        refuse writes (a read-only server, missing write permission).

        Nothing visible changes: at most the empty blob is stored, which is always present.
        """
        self.refs.check_writable()
        self.blobs.check_writable()

    # -- blobs ------------------------------------------------------------------------------

    def find_missing(self, digests: Iterable[Digest], *, freshen: bool = False) -> set[Digest]:
        """The subset of ``digests`` not stored here (the empty blob is never missing).

        With ``freshen``, blobs found present have their modification time refreshed (on a
        backend with the ``touch`` capability) and are then asked for again: whatever this call
        reports present was touched while it existed, so prune's grace period protects it from
        that moment on. Writers that reuse stored blobs ask this way before setting a ref.
        """
        wanted = {d for d in digests if d.size != 0}
        if freshen and self.has(Capability.TOUCH):
            missing = self._query_missing(wanted, self.blobs.freshen_blobs)
        else:
            missing = self._query_missing(wanted, self.blobs.find_missing_blobs)
        return missing & wanted

    def _query_missing(
        self, wanted: set[Digest], query: Callable[[Collection[Digest]], set[Digest]]
    ) -> set[Digest]:
        batch = self.blobs.limits.max_batch_digests
        if len(wanted) <= batch:
            return query(wanted) if wanted else set()
        missing: set[Digest] = set()
        pending = list(wanted)
        for start in range(0, len(pending), batch):
            missing |= query(pending[start : start + batch])
        return missing

    def contains(self, digest: Digest) -> bool:
        return not self.find_missing([digest])

    def open_read(self, digest: Digest, offset: int = 0, *, verify: bool = True) -> BinaryIO:
        """Stream a blob from ``offset``; with ``verify``, corruption raises at the end."""
        if offset < 0 or offset > digest.size:
            raise InvalidDigestError(f"offset {offset} is outside blob {digest}")
        if digest.size == 0:
            return io.BytesIO(b"")
        raw = self.blobs.open_blob(digest, offset)
        if not verify:
            return raw
        return io.BufferedReader(VerifyingReader(raw, digest, offset), CHUNK_SIZE)

    def read_bytes(self, digest: Digest) -> bytes:
        """Read a whole blob (verified). Meant for small blobs such as Directory messages."""
        if digest.size == 0:
            return b""
        parts = []
        remaining = digest.size + 1  # one byte more proves the object is not too long
        with self.blobs.open_blob(digest) as raw:
            while remaining > 0 and (chunk := raw.read(remaining)):
                parts.append(chunk)
                remaining -= len(chunk)
        data = b"".join(parts)
        self._check(digest, data)
        return data

    def read_many(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        """Read small blobs in backend batches, verifying each."""
        wanted = []
        for digest in digests:
            if digest.size == 0:
                yield digest, b""
            else:
                wanted.append(digest)
        for digest, data in self.blobs.read_blobs(wanted):
            self._check(digest, data)
            yield digest, data

    @staticmethod
    def _check(digest: Digest, data: bytes) -> None:
        if len(data) != digest.size:
            raise CorruptBlobError(digest, f"stored object has {len(data)} bytes")
        actual = Digest.of_bytes(data)
        if actual != digest:
            raise CorruptBlobError(digest, f"content hashes to {actual.hash}")

    def put_bytes(self, data: bytes, expected: Digest | None = None) -> Digest:
        """Store ``data``; with ``expected``, refuse content that does not match it."""
        digest = Digest.of_bytes(data)
        if expected is not None and digest != expected:
            raise DigestMismatchError(expected, digest)
        if digest.size:
            self.blobs.write_blobs([(digest, bytes(data))])
        return digest

    def put_many(self, blobs: Collection[tuple[Digest, bytes]]) -> None:
        """Store small blobs after checking each one's content against its digest."""
        for digest, data in blobs:
            actual = Digest.of_bytes(data)
            if actual != digest:
                raise DigestMismatchError(digest, actual)
        self.blobs.write_blobs([(d, b) for d, b in blobs if d.size])

    def open_upload(self, expected: Digest) -> VerifiedUpload:
        """A push-style upload of ``expected``: ``write`` chunks, then ``commit`` or ``abort``.

        The same rules as :meth:`put_stream`, for callers that receive content in pieces over
        time (the gRPC server's resumable ByteStream uploads).
        """
        return VerifiedUpload(self.blobs.begin_write_for(expected), expected)

    def put_stream(
        self,
        stream: BinaryIO,
        expected: Digest | None = None,
        *,
        on_chunk: Callable[[int], None] | None = None,
    ) -> Digest:
        """Stream content in, hashing as it goes; commit only under the digest it really has.

        Without ``expected``, a regular file of at least the backend's ``limits.prehash_min_size``
        bytes is hashed first and then stored as an upload of that digest; if it changed
        between the two readings, it is stored as the second reading found it.
        """
        if expected is None and (start := self._prehash_start(stream)) is not None:
            announced = Digest.of_stream(stream)
            stream.seek(start)
            try:
                return self._put_stream(stream, announced, on_chunk)
            except DigestMismatchError:
                stream.seek(start)  # (on_chunk then hears of the bytes read so far twice)
        return self._put_stream(stream, expected, on_chunk)

    def _prehash_start(self, stream: BinaryIO) -> int | None:
        """Where ``stream`` is, if it is a regular file the backend wants hashed first."""
        threshold = self.blobs.limits.prehash_min_size
        if threshold is None:
            return None
        try:
            st = os.fstat(stream.fileno())
            start = stream.tell()
        except (AttributeError, OSError, ValueError):  # not a file (io.UnsupportedOperation)
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size - start < threshold:
            return None
        return start

    def _put_stream(
        self,
        stream: BinaryIO,
        expected: Digest | None,
        on_chunk: Callable[[int], None] | None,
    ) -> Digest:
        upload = VerifiedUpload(
            self.blobs.begin_write_for(expected) if expected else self.blobs.begin_write(None),
            expected,
        )
        buf = bytearray(CHUNK_SIZE)
        view = memoryview(buf)
        readinto = getattr(stream, "readinto", None)
        try:
            while True:
                if readinto is not None:
                    n = readinto(view)
                    if not n:
                        break
                    chunk: bytes | memoryview = view[:n]
                else:
                    chunk = stream.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    n = len(chunk)
                upload.write(chunk)
                if on_chunk is not None:
                    on_chunk(n)
            return upload.commit()
        except BaseException:
            upload.abort()
            raise

    def put_file(self, path: str | os.PathLike[str]) -> Digest:
        with open(path, "rb", buffering=0) as f:
            return self.put_open_file(f.fileno())

    def put_open_file(self, fd: int) -> Digest:
        """Store the open regular file ``fd`` from its offset to its end; return the digest.

        Uses the backend's copy path (``begin_write_copy``, capability ``copy-file``) when it
        has one and it takes this file, hashing what the upload then holds; otherwise reads and
        streams the file. Either way the content is committed only under the digest of the
        very bytes stored.
        """
        copied = None
        if self.has(Capability.COPY_FILE):
            try:
                copied = self.blobs.begin_write_copy(fd)
            except UnsupportedOperationError:
                pass  # not this file (its file system cannot copy it so): read it instead
        if copied is None:
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
                return self.put_stream(stream)
        writer, stored = copied
        try:
            with stored:
                digest = Digest.of_stream(stored)
            if digest.size:
                writer.commit(digest)
            else:
                writer.abort()
        except BaseException:
            writer.abort()
            raise
        return digest

    def copy_blob_from(self, source: Store, digest: Digest) -> None:
        """Copy one blob from ``source``, verifying it on the way in."""
        if digest.size <= CHUNK_SIZE:
            self.put_bytes(source.read_bytes(digest), digest)
            return
        with source.open_read(digest, verify=False) as stream:
            try:
                self.put_stream(stream, digest)
            except DigestMismatchError as exc:
                raise CorruptBlobError(
                    digest, f"source {source.url} returned other content: {exc.actual}"
                ) from None

    # -- Directory messages -----------------------------------------------------------------

    def get_directory(self, digest: Digest) -> Directory:
        from casframe.tree import parse_directory

        return parse_directory(digest, self.read_bytes(digest))

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
        from casframe.tree import import_directory

        return import_directory(
            self, path, progress=progress, stat_cache=stat_cache, jobs=jobs
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
        from casframe.checkout import checkout

        limits = self.tree_limits.with_overrides(max_tree_entries, max_tree_bytes)
        checkout(
            self, self.resolve(tree), dest, link=link, progress=progress, limits=limits,
            jobs=jobs,
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
        from casframe.treediff import diff_trees

        limits = self.tree_limits.with_overrides(max_tree_entries)
        return diff_trees(self, self.resolve(a), self.resolve(b), subdir=subdir, limits=limits)

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
        from casframe.treediff import iter_diff

        limits = self.tree_limits.with_overrides(max_tree_entries)
        return iter_diff(self, self.resolve(a), self.resolve(b), subdir=subdir, limits=limits)

    def subdir(self, tree: Digest | str, path: str) -> Digest:
        """The digest of the Directory at ``path`` inside ``tree``."""
        from casframe.tree import lookup_subdir

        return lookup_subdir(self, self.resolve(tree), path)

    def walk(
        self, tree: Digest | str, path: str = "", *, max_tree_entries: int | None = None
    ) -> Iterator[TreeEntry]:
        """Every entry under ``path`` of ``tree``, depth first, parents before children.

        The subtree is measured first: one with more entries than the limit raises
        :class:`~casframe.errors.TreeTooLargeError` here, before any entry is returned.
        """
        from casframe.tree import walk

        limits = self.tree_limits.with_overrides(max_tree_entries)
        return walk(self, self.resolve(tree), path, limits=limits)

    def ls(self, tree: Digest | str, path: str = "") -> list[TreeEntry]:
        """The entries directly inside ``path`` of ``tree``."""
        from casframe.tree import list_directory

        return list_directory(self, self.resolve(tree), path)

    def open_file(self, tree: Digest | str, path: str) -> BinaryIO:
        """Open the file at ``path`` inside ``tree`` (verified stream)."""
        from casframe.tree import lookup_file

        entry = lookup_file(self, self.resolve(tree), path)
        assert entry.digest is not None
        return self.open_read(entry.digest)

    def tree_digests(self, tree: Digest | str) -> Iterator[Digest]:
        """Every digest in a tree's closure (Directories and files), each once."""
        from casframe.tree import closure

        return closure(self, self.resolve(tree))

    # -- refs -------------------------------------------------------------------------------

    def resolve(self, tree: Digest | str) -> Digest:
        """A digest as it is; a string as ``HASH/SIZE`` or, failing that, a ref name."""
        if isinstance(tree, Digest):
            return tree
        if "/" in tree and tree.split("/", 1)[0].isalnum() and len(tree.split("/", 1)[0]) == 64:
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
            from casframe.tree import missing_in_tree

            writable_ref_name(name)  # a tree: never under the server's own namespaces
            self._refuse_conflict(name)
            missing = missing_in_tree(self, digest, freshen=True)
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
        return sorted(self.refs.list_refs(prefix), key=lambda r: (r.accessed, r.name))

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
        from casframe.transfer import transfer

        return transfer(self, dest, tree, ref=ref, progress=progress)

    def pull(
        self,
        source: Store,
        tree: Digest | str,
        *,
        ref: str | None = None,
        progress: Progress | None = None,
    ) -> TransferResult:
        """Copy a tree's closure from ``source`` into this store."""
        from casframe.transfer import transfer

        return transfer(source, self, tree, ref=ref, progress=progress)

    # -- maintenance ------------------------------------------------------------------------

    def prune(
        self, *, grace_period: float = 3600.0, dry_run: bool = False,
        progress: Progress | None = None,
    ) -> PruneReport:
        """Delete blobs no ref reaches that are older than ``grace_period`` seconds."""
        from casframe.maintenance import prune

        return prune(self, grace_period=grace_period, dry_run=dry_run, progress=progress)

    def gc(
        self, *, max_size: int | str, low_watermark: float = 0.8, keep: Iterable[str] = (),
        grace_period: float = 3600.0, dry_run: bool = False, progress: Progress | None = None,
    ) -> GcReport:
        """Expire least recently used refs while over ``max_size``, then prune."""
        from casframe.maintenance import gc

        return gc(
            self, max_size=max_size, low_watermark=low_watermark, keep=keep,
            grace_period=grace_period, dry_run=dry_run, progress=progress,
        )

    def fsck(self, *, repair: bool = False, progress: Progress | None = None) -> FsckReport:
        """Verify every blob and every ref's tree; with ``repair``, delete corrupt blobs."""
        from casframe.maintenance import fsck

        return fsck(self, repair=repair, progress=progress)

    def du(self, *, progress: Progress | None = None) -> DuReport:
        """Total size and object count; per ref its total and exclusive size."""
        from casframe.maintenance import du

        return du(self, progress=progress)

    def executor(self) -> ThreadPoolExecutor:
        """A thread pool sized for this backend."""
        return ThreadPoolExecutor(max_workers=self.blobs.limits.max_concurrency)
