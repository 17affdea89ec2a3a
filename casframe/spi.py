"""The backend contract: what a storage plugin implements.

A backend is two objects: a :class:`BlobStore` (content-addressed bytes) and a :class:`RefStore`
(names pointing at digests). Each part has the same three layers:

- **primitives** (abstract): what every backend must do. Three for blobs (``find_missing_blobs``,
  ``open_blob``, ``begin_write``), two for refs (``get_ref``, ``set_ref``).
- **derived helpers**: built from the primitives here, overridden by a backend only for speed,
  never for meaning (``read_blobs``, ``begin_write_for``, ``conflicting_ref``...).
- **capabilities**: optional groups of methods, declared in ``capabilities``
  (:class:`Capability` for blobs, :class:`RefCapability` for refs). The core asks the
  declaration (``Store.has``) before it calls a method of a group, and never calls an
  undeclared one; each undeclared method here raises :class:`UnsupportedOperationError`.

How hard the core drives a backend (batch sizes, threads) is one frozen :class:`BlobLimits`
object in ``BlobStore.limits``. The digest functions a backend can hold are named in
``BlobStore.digest_functions`` (default: SHA-256 only), and the one a store was opened with is
``BlobStore.digest_function``. ``check_writable`` on both parts lets push find a store that
refuses writes before sending anything; its defaults suit most backends.

A backend stores and returns bytes and must never be trusted by the layers above: hashing,
verification, name validation and completeness ordering all live in :mod:`casframe.store` and
the algorithms beside it, never here.
"""

from __future__ import annotations

import enum
import errno
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, BinaryIO, NoReturn

from casframe.backendvalues import (
    BlobInfo,
    BlobLimits,
    RefInfo,
    StrayEntry,
    check_declared,
    check_digest_functions,
)
from casframe.digest import Digest
from casframe.digestfunctions import SHA256, DigestFunction
from casframe.errors import (
    BackendContractError,
    BlobNotFoundError,
    InvalidDigestError,
    PermissionDeniedError,
    RefNotFoundError,
    UnsupportedOperationError,
)

__all__ = [
    "BLOB_CAPABILITY_METHODS",
    "REF_CAPABILITY_METHODS",
    "BlobInfo",
    "BlobLimits",
    "BlobStore",
    "BlobWriter",
    "Capability",
    "RefCapability",
    "require_capabilities",
    "RefInfo",
    "RefStore",
    "StrayEntry",
]


class Capability(enum.StrEnum):
    """Optional groups of blob methods a backend declares in ``BlobStore.capabilities``."""

    #: ``iter_blobs`` lists every stored blob; ``iter_blob_stats`` and ``iter_strays`` come
    #: with it. Needed by prune, gc, du, and by fsck to check blobs no ref reaches.
    LIST = "list"
    #: ``delete_blobs`` removes blobs. Needed by prune, gc and ``fsck --repair``.
    DELETE = "delete"
    #: ``touch_blobs`` refreshes blobs' modification times, and ``freshen_blobs`` with it.
    #: Writers freshen the blobs they reuse, so that prune's grace period covers them.
    TOUCH = "touch"
    #: ``local_path`` names a file on this machine holding a blob, and ``link_blobs``
    #: hardlinks such files. Enables checkout by hardlinks.
    LOCAL_PATH = "local-path"
    #: ``begin_write_copy`` copies an open local file into an upload without passing its
    #: bytes through Python (``copy_file_range``). Used to import local files.
    COPY_FILE = "copy-file"


class RefCapability(enum.StrEnum):
    """Optional ref methods a backend declares in ``RefStore.capabilities``."""

    #: ``list_refs`` lists refs with their last access. Needed by ``ref ls``, prune, gc, fsck
    #: and du, and by the shadowing check for refs under a name.
    LIST = "list"
    #: ``delete_ref`` removes a ref. Needed by ``ref rm`` and gc.
    DELETE = "delete"


#: The methods each blob capability stands for: the core calls them only when it is declared.
BLOB_CAPABILITY_METHODS: Mapping[Capability, tuple[str, ...]] = {
    Capability.LIST: ("iter_blobs", "iter_blob_stats", "iter_strays"),
    Capability.DELETE: ("delete_blobs",),
    Capability.TOUCH: ("touch_blobs", "freshen_blobs"),
    Capability.LOCAL_PATH: ("local_path", "link_blobs"),
    Capability.COPY_FILE: ("begin_write_copy",),
}

#: The methods each ref capability stands for.
REF_CAPABILITY_METHODS: Mapping[RefCapability, tuple[str, ...]] = {
    RefCapability.LIST: ("list_refs",),
    RefCapability.DELETE: ("delete_ref",),
}


def require_capabilities(
    blobs: BlobStore, refs: RefStore, operation: str, *capabilities: Capability | RefCapability,
    where: str,
) -> None:
    """Raise :class:`~casframe.errors.UnsupportedOperationError` naming ``operation`` and what
    ``blobs`` and ``refs`` (the store ``where``) lack of ``capabilities``, before the operation
    touches anything."""
    lacking = [
        c for c in capabilities
        if c not in (refs.capabilities if isinstance(c, RefCapability) else blobs.capabilities)
    ]
    if lacking:
        parts = [
            "/".join(c for c in lacking if isinstance(c, kind)) + f" {things}"
            for kind, things in ((Capability, "blobs"), (RefCapability, "refs"))
            if any(isinstance(c, kind) for c in lacking)
        ]
        raise UnsupportedOperationError(
            f"{operation} is not supported by this backend: it cannot {', '.join(parts)} "
            f"({where})"
        )


class _MovedToLimits:
    """A tuning attribute of the older contract; using it says where it went."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def error(self, owner: str) -> BackendContractError:
        return BackendContractError(
            f"{owner}.{self.name} is no longer read: a backend's tuning is one "
            f"casframe.BlobLimits in {owner}.limits; set limits = BlobLimits({self.name}=...) "
            f"(on the class, or on the instance in __init__) and read limits.{self.name}"
        )

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        raise self.error(type(obj).__name__)

    def __set__(self, obj: object, value: object) -> NoReturn:
        raise self.error(type(obj).__name__)


class BlobWriter(ABC):
    """An upload in progress. Content becomes visible only through :meth:`commit`.

    The core hashes everything passed to :meth:`write` and calls :meth:`commit` only with the
    digest the content really has; on any failure it calls :meth:`abort`. A writer must leave
    nothing visible under any digest before ``commit`` returns, and nothing at all after ``abort``.
    """

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append a chunk of content."""

    @abstractmethod
    def commit(self, digest: Digest) -> None:
        """Make the written content visible under ``digest`` atomically.

        An already stored blob with this digest is success, not an error; a backend with the
        ``touch`` capability then refreshes its modification time, as ``touch_blobs`` would, so
        that prune's grace period covers a blob re-stored by a writer.
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; must be safe to call more than once."""


class BlobStore(ABC):
    """Content-addressed blob storage: the primitives a backend implements."""

    #: Optional method groups this backend offers; see :class:`Capability`.
    capabilities: frozenset[Capability] = frozenset()
    #: How hard the core drives this backend; see :class:`BlobLimits`.
    limits: BlobLimits = BlobLimits()
    #: The digest functions (REAPI names, :data:`casframe.DIGEST_FUNCTIONS`) this backend can
    #: hold blobs of. The core refuses to open a store with any other. A backend that keeps
    #: the blobs of each function apart declares more, and reads the one asked for from
    #: ``StoreURL.digest_function`` (see :meth:`casframe.StoreURL.digest_function_for`).
    digest_functions: frozenset[str] = frozenset({SHA256.name})
    #: The function this store's digests are computed with: the core hashes every blob of it
    #: so. A backend that declares several sets it on the instance in ``__init__``.
    digest_function: DigestFunction = SHA256

    # The older contract's tuning attributes, now in ``limits``: reading or setting one raises
    # BackendContractError saying so, rather than being silently ignored.
    max_batch_digests = _MovedToLimits()
    max_batch_bytes = _MovedToLimits()
    max_concurrency = _MovedToLimits()
    prehash_min_size = _MovedToLimits()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            if isinstance(getattr(BlobStore, name, None), _MovedToLimits) and not isinstance(
                value, _MovedToLimits
            ):
                raise vars(BlobStore)[name].error(cls.__name__)
        check_declared(cls, Capability)
        check_digest_functions(cls)
        limits = vars(cls).get("limits")
        if limits is not None and not isinstance(limits, BlobLimits):
            raise BackendContractError(
                f"{cls.__name__}.limits must be a casframe.BlobLimits, not {limits!r}"
            )

    # -- primitives -------------------------------------------------------------------------

    @abstractmethod
    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        """Return the digests in ``digests`` that are not stored.

        A blob stored with the same hash but another size counts as missing. The core never
        passes the empty digest and never passes more than ``limits.max_batch_digests`` at
        once.
        """

    @abstractmethod
    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        """Open a stored blob for streaming reads, positioned at ``offset``.

        Raise :class:`BlobNotFoundError` when it is not stored. The stream need not verify
        anything; the core does.
        """

    @abstractmethod
    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        """Start an upload whose digest the core will learn only at its end."""

    # -- derived helpers (override for speed) -----------------------------------------------

    def begin_write_for(self, digest: Digest) -> BlobWriter:
        """Start an upload whose content should have ``digest`` (known in advance).

        The core calls it for uploads whose digest a client announced (the server's
        ByteStream writes, transfers) and for local files of at least
        ``limits.prehash_min_size`` bytes, hashed first. A backend may use the digest to store
        the content under its final name while it arrives: the core calls
        ``commit(digest)`` only once the whole content hashed to ``digest``, and ``abort``
        otherwise. The default is :meth:`begin_write`.
        """
        return self.begin_write(digest.size)

    def read_blobs(self, digests: Iterable[Digest]) -> Iterator[tuple[Digest, bytes]]:
        """Yield ``(digest, content)`` for small blobs; raise on the first missing one.

        The core calls it for groups of small blobs of about ``limits.max_batch_bytes``
        (Directory messages, transfers, the server's batch reads).
        """
        for digest in digests:
            with self.open_blob(digest) as stream:
                yield digest, stream.read()

    def write_blobs(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        """Store small blobs whose content the core has already verified against the digest.

        The core calls it for groups of small blobs of about ``limits.max_batch_bytes``.
        """
        for digest, data in blobs:
            writer = self.begin_write(len(data))
            try:
                writer.write(data)
                writer.commit(digest)
            except BaseException:
                writer.abort()
                raise

    def get_tree(self, root: Digest) -> Iterator[bytes]:
        """Serialized Directory messages of the tree under ``root``, in any order (fast path).

        For backends that can list a whole tree in one call (REAPI's GetTree). The core hashes
        what it gets and uses only bytes whose digest the tree names; it falls back to reading
        Directories level by level on :class:`~casframe.errors.CasframeError` or for any
        Directory not supplied. The default supplies nothing.
        """
        return iter(())

    def clean_temp(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Remove leftovers of interrupted uploads last modified before ``older_than``.

        Prune calls this with its grace cutoff. Temp files of killed writers, abandoned
        multipart uploads and the like; a backend whose interrupted uploads leave nothing
        behind keeps this default. Returns how many were (with ``dry_run``: would be) removed
        and their size in bytes (0 when the backend cannot tell).
        """
        return 0, 0

    def now(self) -> float:
        """The time now, by the clock that stamps this store's modification times.

        Prune and gc take their grace cutoff from it, so a difference between the clock of
        the machine running them and that of the server stamping the blobs (S3's, a network
        file system's) neither shortens nor lengthens the grace period. The default is this
        machine's clock, right for stores whose times it stamps itself; a backend whose
        times come from a server answers with the server's time (``s3://``: the ``Date`` of
        a response), rounded down rather than up.
        """
        return time.time()

    def check_writable(self) -> None:
        """Raise :class:`PermissionDeniedError` when this store is known to refuse writes.

        Push asks every destination before sending anything, so that a read-only server or a
        missing write permission is reported once and clearly instead of as a failed upload.
        The check must be cheap and must not change what the store holds, except that it may
        store the empty blob under its own digest (which every store has anyway). A store out
        of reach raises as any call would (:class:`~casframe.errors.BackendUnavailableError`).
        Passing means no refusal was detected, not that every write will succeed.

        The default starts a write and aborts it: that finds a store that refuses even to
        begin one (a read-only directory). A backend whose writers only spool locally until
        ``commit`` should override it with a probe that reaches the real storage.
        """
        try:
            self.begin_write(0).abort()
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PermissionDeniedError(
                f"{self.describe()} refuses writes: {exc.strerror or exc}"
            ) from exc

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately empty
        """Release connections and threads; the store is not used afterwards."""

    def worker_spec(self) -> tuple[str, str] | None:
        """How a helper process of casframe opens this very store, so that a large import or
        checkout can use every core: a ``module:function`` factory (taking a
        :class:`~casframe.StoreURL`) and the URL to give it. ``None`` (the default) keeps
        the work in the calling process; only a store whose data is local gains from it.
        """
        return None

    def describe(self) -> str:
        """A short human description (used in messages)."""
        return type(self).__name__

    def _not_found(self, digest: Digest) -> BlobNotFoundError:
        return BlobNotFoundError(digest, self.describe())

    def _lacks(self, capability: Capability, what: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{self.describe()} cannot {what}: it does not declare the {capability!s} capability"
        )

    # -- capability LIST --------------------------------------------------------------------

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """List every stored blob with its modification time (``list``).

        Blobs stored or deleted during the listing may or may not appear.
        """
        raise self._lacks(Capability.LIST, "list its blobs")

    def iter_blob_stats(
        self, skip: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, int, float]]:
        """``(hash, size, mtime)`` of every stored blob: ``iter_blobs`` as plain tuples (``list``).

        Prune, gc, fsck and du list blobs through this. ``skip(hash)`` is asked about each
        blob before its size and time are fetched; a blob it answers true for is left out.
        Prune passes the hashes it already knows to be reachable: a local disk then spares
        their ``stat``, and building a BlobInfo and a Digest per blob would cost more than
        that ``stat``. Derived from ``iter_blobs``; override it for speed. Hashes are 64
        lowercase hex digits. Size 0 with any other hash than the empty blob's is an
        *emptied* object (what a power cut can leave of a blob written without ``fsync``): a
        backend that can see such objects lists them, so that fsck reports them as corrupt
        and prune removes them; the core then passes ``(hash, 0)`` to ``delete_blobs`` and
        ``find_missing_blobs`` for them. Anything that is not an object (a folder, a stray
        file) is left out: see :meth:`iter_strays`.
        """
        for info in self.iter_blobs():
            hash_ = info.digest.hash
            if skip is None or not skip(hash_):
                yield hash_, info.digest.size, info.mtime

    def iter_strays(self) -> Iterator[StrayEntry]:
        """Entries of the blob area that are not blobs, for fsck's warnings (``list``).

        Whatever ``iter_blob_stats`` leaves out because it is not an object: folders, links
        and other non-files named like objects, files or keys whose name is not an object's.
        The default lists none, for backends that hold nothing but blobs.
        """
        return iter(())

    # -- capability DELETE ------------------------------------------------------------------

    def delete_blobs(
        self, digests: Iterable[Digest], *, older_than: float | None = None
    ) -> Collection[Digest]:
        """Delete blobs; absent ones are ignored (``delete``). Return the digests deleted.

        Prune and gc call it with batches of unreachable blobs, ``fsck --repair`` with
        corrupt ones. With ``older_than`` (seconds since the epoch), delete only blobs whose
        modification time is still before it at the moment each one is deleted: prune passes
        its grace cutoff, so a blob a writer touched or re-stored after prune listed it
        survives. What is returned is what prune reports freed.
        """
        raise self._lacks(Capability.DELETE, "delete blobs")

    # -- capability TOUCH -------------------------------------------------------------------

    def touch_blobs(self, digests: Iterable[Digest]) -> Collection[Digest]:
        """Refresh blobs' modification times, so prune's grace period covers them (``touch``).

        Absent blobs are ignored; return them (the digests that were not there to touch).
        The default :meth:`freshen_blobs` calls it; a backend's own ``freshen_blobs`` may
        use what it returns to spare a second query.
        """
        raise self._lacks(Capability.TOUCH, "touch blobs")

    def freshen_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        """Refresh the modification time of the stored blobs among ``digests`` (``touch``);
        return the ones missing once that is done.

        ``Store.find_missing(freshen=True)`` calls it, as writers do before reusing stored
        blobs. What this reports present was touched while it existed, so prune's grace period
        protects it from the call on. The default is ``find_missing_blobs``, ``touch_blobs``
        of the present ones, and ``find_missing_blobs`` of those again (a blob deleted just
        before its touch is missing after all); a backend can do it in fewer round trips
        (touch first, then check). The core calls it only on backends with ``touch``, never
        with the empty digest, and never with more than ``limits.max_batch_digests`` at once.
        """
        missing = self.find_missing_blobs(digests)
        present = [d for d in digests if d not in missing]
        if present:
            self.touch_blobs(present)
            missing |= self.find_missing_blobs(present)
        return missing

    # -- capability LOCAL_PATH --------------------------------------------------------------

    def local_path(self, digest: Digest) -> str:
        """A path on this machine holding the blob, not to be modified (``local-path``).

        Checkout by hardlinks and the server's reads of whole files use it. Raise
        :class:`BlobNotFoundError` when the blob is not stored.
        """
        raise self._lacks(Capability.LOCAL_PATH, "give local files")

    def link_blobs(self, dir_fd: int, links: Iterable[tuple[str, Digest]]) -> None:
        """Hardlink stored blobs into the directory open as ``dir_fd`` (``local-path``).

        Checkout by hardlinks calls it with a batch of one directory's files. Each
        ``(name, digest)`` becomes a new name in that directory for the file holding the
        blob, which must not be modified through it. Raises what :meth:`local_path` raises
        for a blob that is not stored intact, and ``OSError`` when the file system refuses a
        link (``EXDEV``, ``EMLINK``, ``EPERM``); links made before the failure stay. The
        default links each :meth:`local_path`; a backend may skip its per-blob overhead.
        """
        for name, digest in links:
            os.link(self.local_path(digest), name, dst_dir_fd=dir_fd, follow_symlinks=False)

    # -- capability COPY_FILE ---------------------------------------------------------------

    def begin_write_copy(self, fd: int) -> tuple[BlobWriter, BinaryIO]:
        """Store a local file without passing its bytes through Python (``copy-file``).

        ``Store.put_open_file`` (and so every import of a local file) calls it: copy the open
        file ``fd``, from its offset to its end, into a new upload. Return the upload, not
        committed, and a stream over the content the upload now holds; the core hashes that
        stream and commits the upload under the digest it gets (or aborts it), so content
        still becomes visible only under the digest it really has, even if the file changes
        during the copy. The stream may come back before the copy ends: its reads then wait
        for the bytes they return, raise the copy's error, and end where the copy ends; with
        ``fileno()`` and ``wait_copied(end) -> int`` (wait for the first ``end`` bytes; fewer
        only once the copy ended) the core hashes the file in place as it is filled. The
        upload's ``commit`` waits for the copy, ``abort`` stops it. Raise
        :class:`UnsupportedOperationError` when this file cannot be copied so (a file system
        without ``copy_file_range``): the core then reads it through :meth:`begin_write`.
        """
        raise self._lacks(Capability.COPY_FILE, "copy files")


class RefStore(ABC):
    """Named pointers to digests. Names reaching a backend are already validated."""

    #: Optional methods this backend offers; see :class:`RefCapability`.
    capabilities: frozenset[RefCapability] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_declared(cls, RefCapability)
        declares = any("capabilities" in vars(k) for k in cls.__mro__[:-1] if k is not RefStore)
        implemented = [
            f"{method}()"
            for methods in REF_CAPABILITY_METHODS.values()
            for method in methods
            if getattr(cls, method) is not getattr(RefStore, method)
        ]
        if implemented and not declares:
            # Written for the older contract, where every RefStore had to list and delete.
            raise BackendContractError(
                f"{cls.__name__} implements {' and '.join(implemented)} but declares no ref "
                f"capabilities: add capabilities = frozenset({{RefCapability.LIST, "
                f"RefCapability.DELETE}}) (what it can do) to the class"
            )

    @abstractmethod
    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        """Return the digest ``name`` points at, refreshing its access time when ``touch``.

        Raise :class:`casframe.errors.RefNotFoundError` when it does not exist.
        """

    @abstractmethod
    def set_ref(self, name: str, digest: Digest) -> None:
        """Point ``name`` at ``digest`` atomically (create or replace); sets its access time."""

    # -- capability LIST --------------------------------------------------------------------

    def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
        """Yield every ref whose name starts with ``prefix``, in any order (``list``).

        A ref whose stored value cannot be read as a Digest raises
        :class:`~casframe.errors.InvalidDigestError` naming it; it is never skipped, since a
        prune that did not see it would delete the tree it holds.
        """
        raise self._lacks(RefCapability.LIST, "list refs")

    # -- capability DELETE ------------------------------------------------------------------

    def delete_ref(self, name: str) -> None:
        """Remove ``name``; raise :class:`RefNotFoundError` when it does not exist (``delete``)."""
        raise self._lacks(RefCapability.DELETE, "delete refs")

    # -- derived helpers (override for speed) -----------------------------------------------

    def conflicting_ref(self, name: str) -> str | None:
        """A ref that ``name`` would shadow or be shadowed by, or ``None`` when there is none.

        That is a ref named like one of ``name``'s folders (``a`` or ``a/b`` for ``a/b/c``),
        or any ref under ``name/``. The core asks before every ``set_ref`` and refuses the name
        with :class:`~casframe.errors.RefConflictError`, so every backend holds the same set of
        names a file system can. The default asks ``get_ref`` (without touch) about each
        folder, then, with ``list``, takes the first ref ``list_refs(name + "/")`` yields.
        Override it with one cheaper query, or where the storage decides as it sets the ref.
        """
        segments = name.split("/")
        for end in range(1, len(segments)):
            folder = "/".join(segments[:end])
            try:
                self.get_ref(folder, touch=False)
            except RefNotFoundError:
                continue
            except InvalidDigestError:
                pass  # a damaged ref is still a ref in the way
            return folder
        if RefCapability.LIST in self.capabilities:
            for info in self.list_refs(name + "/"):
                return info.name
        return None

    def check_writable(self) -> None:  # noqa: B027 - optional hook, deliberately empty
        """Raise :class:`PermissionDeniedError` when this store is known to refuse ref updates.

        The same rules as :meth:`BlobStore.check_writable`, but it must change nothing at all.
        The default detects nothing; a backend that can ask (a server's "updates allowed"
        status) overrides it.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately empty
        """Release resources."""

    def describe(self) -> str:
        """A short human description (used in messages)."""
        return type(self).__name__

    def _lacks(self, capability: RefCapability, what: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{self.describe()} cannot {what}: it does not declare the ref capability "
            f"{capability!s}"
        )
