"""The object-key layout ``file://`` and ``s3://`` share: where a blob and a ref live in a store.

Relative to a store's root (a folder, or a bucket's key prefix)::

    objects/ab/cdef…   the blob whose sha256 is abcdef… (two hex digits a folder, 62 the name)
    refs/heads/NAME    the ref NAME, one folder per "/" of it: a serialized REAPI Digest
    tmp/               uploads in progress (file:// only)
    digest/FUNCTION/   the store of another digest function (blake3, sha384, sha512) at the
                       same location: the same three folders inside, its hashes that long

It is BuildStream 1.x's CAS cache layout for SHA-256, unchanged. Both backends build every
path and key with these functions and read listings back with them, so that a store copied
file by file (``aws s3 sync``, ``cp -r``) is a valid store of the other kind: that promise
rests on this module, not on two copies agreeing. What is not an object (a folder or file
named otherwise) is a *stray*, which the backends list for fsck and otherwise leave alone.
The ``digest/`` folder of a SHA-256 store is no stray: it is outside ``objects/``.

This module only names things; it must never touch storage.
"""

from __future__ import annotations

from casframe.digest import Digest
from casframe.digestfunctions import SHA256, DigestFunction
from casframe.errors import InvalidDigestError

__all__ = [
    "DIGESTS",
    "OBJECTS",
    "REFS",
    "TMP",
    "decode_ref",
    "encode_ref",
    "function_folder",
    "is_fanout",
    "is_object_file_name",
    "object_hash",
    "object_key",
    "object_name",
    "ref_key",
]

#: The folder of blobs, relative to the store's root.
OBJECTS = "objects"
#: The folder of refs, relative to the store's root.
REFS = "refs/heads"
#: The folder where a ``file://`` store stages uploads, relative to its root.
TMP = "tmp"
#: The folder holding the stores of digest functions other than SHA-256, one folder each.
DIGESTS = "digest"

_HEX_DIGITS = frozenset("0123456789abcdef")


def function_folder(function: DigestFunction) -> str:
    """Where the store of ``function`` lives, relative to the location's root: ``""`` (the
    root itself) for SHA-256, ``digest/NAME`` for the others. Everything else in this module
    is relative to that folder."""
    return "" if function == SHA256 else f"{DIGESTS}/{function.name}"


def object_name(hash_: str) -> str:
    """``ab/cdef…``: the blob with sha256 ``hash_``, relative to ``objects/``."""
    return f"{hash_[:2]}/{hash_[2:]}"


def object_key(digest: Digest) -> str:
    """``objects/ab/cdef…``: the blob of ``digest``, relative to the store's root.

    The size is not part of it: an object of another size under the same hash is not this blob
    (missing, or corrupt when fsck finds its hash matches).
    """
    return f"{OBJECTS}/{object_name(digest.hash)}"


def is_fanout(name: str) -> bool:
    """Whether ``name`` is a fan-out folder of ``objects/`` (two lowercase hex digits)."""
    return len(name) == 2 and _HEX_DIGITS.issuperset(name)


def is_object_file_name(name: str, hex_length: int = 64) -> bool:
    """Whether ``name`` is an object's name inside a fan-out folder (``hex_length - 2``
    lowercase hex digits: 62 for SHA-256 and BLAKE3)."""
    return len(name) == hex_length - 2 and _HEX_DIGITS.issuperset(name)


def object_hash(name: str, hex_length: int = 64) -> str | None:
    """The hash ``ab/cdef…`` (relative to ``objects/``) stands for; ``None`` for a stray name
    (or one of another length than ``hex_length``)."""
    if len(name) != hex_length + 1 or name[2] != "/":
        return None
    hash_ = name[:2] + name[3:]
    return hash_ if _HEX_DIGITS.issuperset(hash_) else None


def ref_key(name: str) -> str:
    """``refs/heads/NAME``: the ref ``name`` (already validated), relative to the store's root."""
    return f"{REFS}/{name}"


def encode_ref(digest: Digest) -> bytes:
    """What a ref holds: the serialized REAPI Digest message it points at."""
    return digest.serialize()


def decode_ref(data: bytes, name: str, where: str) -> Digest:
    """The digest a ref holds; :class:`InvalidDigestError` naming the ref when it is damaged."""
    try:
        return Digest.from_serialized(data)
    except InvalidDigestError as exc:
        raise InvalidDigestError(
            f"ref {name} in {where} is damaged: {exc}; set it again or delete it"
        ) from None
