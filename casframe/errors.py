"""The one exception hierarchy of casframe.

Every error a user or a plugin author can meet derives from :class:`CasframeError`. Each class
carries a machine-readable ``reason`` and a ``temporary`` flag (whether retrying the same call may
succeed), so callers never parse messages. Backends translate their own library's errors into
these at their boundary, once; nothing above the backend layer sees a botocore or grpc error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from casframe.digest import Digest

__all__ = [
    "BackendContractError",
    "BackendUnavailableError",
    "BlobNotFoundError",
    "CasframeError",
    "CheckoutError",
    "CompressedDataError",
    "ConfigError",
    "CorruptBlobError",
    "DigestMismatchError",
    "DuplicateSchemeError",
    "InvalidDigestError",
    "InvalidNameError",
    "MissingDependencyError",
    "PermissionDeniedError",
    "RefConflictError",
    "RefNotFoundError",
    "RemoteProtocolError",
    "StoreNotFoundError",
    "TreeTooLargeError",
    "UnknownSchemeError",
    "UnsafeTreeError",
    "UnsupportedFileTypeError",
    "UnsupportedDigestFunctionError",
    "UnsupportedOperationError",
    "WorkerError",
]


class CasframeError(Exception):
    """Base of every error casframe raises on purpose."""

    reason: str = "error"
    temporary: bool = False


class BlobNotFoundError(CasframeError, KeyError):
    """One or more blobs are not in the store."""

    reason = "blob-not-found"

    def __init__(self, digests: Digest | Iterable[Digest], where: str = "") -> None:
        # One Digest, or several: told apart by shape, since casframe.digest imports this
        # module (a Digest is a tuple with a ``hash``; a collection of them has none).
        self.digests: tuple[Digest, ...] = (
            (digests,)  # type: ignore[assignment]
            if isinstance(getattr(digests, "hash", None), str)
            else tuple(sorted(digests))  # type: ignore[arg-type]
        )
        shown = ", ".join(str(d) for d in self.digests[:3])
        more = f" and {len(self.digests) - 3} more" if len(self.digests) > 3 else ""
        place = f" in {where}" if where else ""
        super().__init__(f"blob not found{place}: {shown}{more}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RefNotFoundError(CasframeError, KeyError):
    """A ref name does not exist."""

    reason = "ref-not-found"

    def __init__(self, name: str, where: str = "") -> None:
        self.name = name
        place = f" in {where}" if where else ""
        super().__init__(f"ref not found{place}: {name}")

    def __str__(self) -> str:
        return str(self.args[0])


class RefConflictError(CasframeError):
    """A ref would shadow another ref or be shadowed by it (``a`` and ``a/b``).

    A name is either a ref or a folder of refs, on every backend alike, since a file system can
    hold only one of the two. ``name`` is the ref refused, ``existing`` the ref in its way.
    """

    reason = "ref-conflict"

    def __init__(self, name: str, existing: str, where: str = "") -> None:
        self.name = name
        self.existing = existing
        place = f" in {where}" if where else ""
        if existing.startswith(name + "/"):
            how = f"{existing!r} is under '{name}/'"
        else:
            how = f"{name!r} would be under the ref {existing!r}"
        super().__init__(
            f"ref {name!r} conflicts with an existing ref{place}: {how}; a name is either a "
            "ref or a folder of refs, never both (delete one of them first)"
        )


class CorruptBlobError(CasframeError):
    """A stored blob does not match its digest (wrong size or wrong hash)."""

    reason = "corrupt-blob"

    def __init__(self, digest: Digest, detail: str) -> None:
        self.digest = digest
        self.detail = detail
        super().__init__(f"corrupt blob {digest}: {detail}")


class DigestMismatchError(CasframeError, ValueError):
    """Content offered for a digest hashes to something else; nothing was stored."""

    reason = "digest-mismatch"

    def __init__(self, expected: Digest, actual: Digest) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"content does not match its digest: expected {expected}, got {actual}")


class CompressedDataError(CasframeError, ValueError):
    """Compressed content from the wire that does not decode to what it claims: not a valid
    stream, cut short, longer than announced, or asking for more decoding memory than allowed.
    Nothing of it was stored."""

    reason = "bad-compressed-data"


class InvalidDigestError(CasframeError, ValueError):
    """Text or a message that is not a valid digest."""

    reason = "invalid-digest"


class InvalidNameError(CasframeError, ValueError):
    """An unsafe or malformed ref name or path component."""

    reason = "invalid-name"


class UnsafeTreeError(CasframeError):
    """A Directory tree that would be unsafe to check out (bad or duplicate names)."""

    reason = "unsafe-tree"


class TreeTooLargeError(UnsafeTreeError):
    """A tree whose expansion (entries, or bytes of files written out) is over a limit.

    A Directory may name the same child many times, so a small stored tree can expand to an
    astronomical one (a "fan-out bomb"); the expansion is measured before any work is done.
    ``count`` is the measured size, ``limit`` the limit it exceeds and ``setting`` the name of
    the option that raises it.
    """

    reason = "tree-too-large"

    def __init__(self, what: str, count: int, limit: int, setting: str, unit: str) -> None:
        self.count = count
        self.limit = limit
        self.setting = setting
        super().__init__(
            f"{what} expands to {count:,} {unit}, over the limit of {limit:,} ({setting}); "
            f"raise {setting} if the tree is genuine"
        )


class CheckoutError(CasframeError):
    """Writing a tree's entry into the checkout destination failed.

    ``tree_path`` is the entry's path inside the tree (what the user can look up with
    ``ls``), ``errno`` the operating system's error number; the message names both.
    """

    reason = "checkout-failed"

    def __init__(self, tree_path: str, error: OSError) -> None:
        self.tree_path = tree_path
        self.errno = error.errno
        problem = error.strerror or str(error)
        super().__init__(f"cannot check out {tree_path!r}: {problem}")


class UnsupportedFileTypeError(CasframeError):
    """A file that cannot be stored in a tree (socket, device, fifo)."""

    reason = "unsupported-file-type"


class UnsupportedOperationError(CasframeError):
    """The backend does not offer the capability an operation needs."""

    reason = "unsupported-operation"


class UnsupportedDigestFunctionError(UnsupportedOperationError):
    """A digest function casframe does not know, or that this store's backend cannot hold;
    the message names the ones that are supported."""

    reason = "unsupported-digest-function"


class BackendContractError(CasframeError, TypeError):
    """A backend class breaks the backend contract; the message says what to change.

    Raised when the class is defined or its store is built, before any data is touched: a
    backend written for an older contract (tuning attributes instead of ``limits``, refs that
    list without declaring it) or one that answers against the contract.
    """

    reason = "backend-contract"


class MissingDependencyError(CasframeError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    reason = "missing-dependency"

    def __init__(
        self, what: str, module: str, extra: str | None, install: str | None = None
    ) -> None:
        self.module = module
        self.extra = extra
        if install is None and extra:
            install = f"casframe[{extra}]"
        self.install = install
        hint = f"pip install '{install}'" if install else f"install the package providing {module}"
        super().__init__(
            f"{what} needs the Python module {module!r}, which is not installed: {hint}"
        )


class UnknownSchemeError(CasframeError, ValueError):
    """A store URL whose scheme no plugin registered."""

    reason = "unknown-scheme"


class DuplicateSchemeError(CasframeError):
    """Two plugins registered the same URL scheme."""

    reason = "duplicate-scheme"


class ConfigError(CasframeError, ValueError):
    """The configuration file or a store URL is malformed."""

    reason = "config"


class StoreNotFoundError(CasframeError):
    """There is no store at the location given, and the caller asked not to create one."""

    reason = "store-not-found"


class BackendUnavailableError(CasframeError):
    """The backend could not be reached (network, server down, time-out)."""

    reason = "unavailable"
    temporary = True


class RemoteProtocolError(CasframeError):
    """A remote end answered against its protocol or beyond a limit this client sets: endless
    or repeated pagination, entries that were not asked for, absurd values. Nothing of the
    answer was used."""

    reason = "remote-protocol"


class PermissionDeniedError(CasframeError):
    """The backend refused the operation (credentials, read-only server, access denied)."""

    reason = "permission-denied"


class WorkerError(CasframeError):
    """A helper process of casframe's (parallel import or checkout) died or answered with
    something it should not have; the message says which process and how it ended. The
    operation it was helping failed and left nothing half-visible in the store."""

    reason = "worker-failed"
