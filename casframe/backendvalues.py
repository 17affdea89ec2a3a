"""The values of the backend contract (:mod:`casframe.spi`): the records a backend lists
(:class:`BlobInfo`, :class:`StrayEntry`, :class:`RefInfo`) and the limits it declares for how
hard the core drives it (:class:`BlobLimits`).

Backends import these names from :mod:`casframe.spi`, which re-exports them; this module holds
plain frozen values, and the checks of what a backend class declares; it must never import a
backend or anything above the contract.
"""

from __future__ import annotations

import enum

from casframe.digest import Digest
from casframe.digestfunctions import DIGEST_FUNCTIONS
from casframe.errors import BackendContractError
from casframe.values import value_class

__all__ = [
    "BlobInfo",
    "BlobLimits",
    "RefInfo",
    "StrayEntry",
    "check_declared",
    "check_digest_functions",
]


@value_class
class BlobLimits:
    """How hard the core drives a backend: one frozen object, ``BlobStore.limits``.

    A backend sets it on the class (``limits = BlobLimits(max_concurrency=2)``) or, when the
    numbers depend on the store's options, on the instance in ``__init__``.
    """

    #: Digests in one ``find_missing_blobs`` (and ``freshen_blobs``) call at most.
    max_batch_digests: int = 10_000
    #: A hint: the payload the core aims to group into one ``read_blobs``/``write_blobs``
    #: call. Calls may carry more; a backend with a hard request limit splits them itself.
    max_batch_bytes: int = 4 << 20
    #: Threads the core uses at once against this backend (I/O-bound backends want more).
    max_concurrency: int = 4
    #: Regular files of at least this many bytes are hashed before they are stored, and then
    #: written through ``begin_write_for``, so that a backend that cannot rename (S3) sends
    #: them straight to their final name instead of staging them. ``None``: never, every
    #: file is read once, as it is stored.
    prehash_min_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_digests", "max_batch_bytes", "max_concurrency"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise BackendContractError(
                    f"BlobLimits.{name} must be a positive int, not {value!r}"
                )
        size = self.prehash_min_size
        if size is not None and (type(size) is not int or size < 0):
            raise BackendContractError(
                f"BlobLimits.prehash_min_size must be None or an int of at least 0, not {size!r}"
            )


@value_class
class BlobInfo:
    """One stored blob as listed by ``iter_blobs``; ``mtime`` is seconds since the epoch."""

    digest: Digest
    mtime: float

    def __init__(self, digest: Digest, mtime: float) -> None:
        # Written out: one is made for every blob a listing yields.
        set_field = object.__setattr__
        set_field(self, "digest", digest)
        set_field(self, "mtime", mtime)


@value_class
class StrayEntry:
    """Something in a store's blob area that is not a blob, as listed by ``iter_strays``.

    A folder or a link named like an object, a file whose name is not a hash, a key that is
    not an object key: left there by hand, by a sync tool or by another program. Nothing
    casframe does reads, counts or deletes it; fsck reports it as a warning.
    """

    #: Where it is, relative to the store (``objects/ab/cdef…``, a path or an object key).
    name: str
    #: What it is, for a message: ``a directory, not an object``, ``a file whose name is not
    #: a hash``, ``a key that is not an object key``...
    what: str


@value_class
class RefInfo:
    """One ref as listed by ``RefStore.list_refs``; ``accessed`` is seconds since the epoch."""

    name: str
    digest: Digest
    accessed: float

    def __init__(self, name: str, digest: Digest, accessed: float) -> None:
        # Written out: one is made for every ref a listing yields.
        set_field = object.__setattr__
        set_field(self, "name", name)
        set_field(self, "digest", digest)
        set_field(self, "accessed", accessed)


def check_declared(cls: type, kind: type[enum.StrEnum]) -> None:
    """A ``capabilities`` set on the class holds only ``kind`` values."""
    declared = vars(cls).get("capabilities")
    if declared is None:
        return
    wrong = sorted(repr(c) for c in declared if not isinstance(c, kind))
    if not isinstance(declared, frozenset) or wrong:
        raise BackendContractError(
            f"{cls.__name__}.capabilities must be a frozenset of casframe.{kind.__name__} "
            f"values; it holds {', '.join(wrong) or repr(declared)}"
        )


def check_digest_functions(cls: type) -> None:
    """A ``digest_functions`` set on the class names only functions casframe knows."""
    declared = vars(cls).get("digest_functions")
    if declared is None:
        return
    unknown = sorted(repr(n) for n in declared if n not in DIGEST_FUNCTIONS)
    if not isinstance(declared, frozenset) or unknown or not declared:
        raise BackendContractError(
            f"{cls.__name__}.digest_functions must be a non-empty frozenset of digest "
            f"function names ({', '.join(DIGEST_FUNCTIONS)}); it holds "
            f"{', '.join(unknown) or repr(declared)}"
        )
