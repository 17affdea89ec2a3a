"""The digest functions a store can hash its blobs with: SHA-256 (the default), SHA-384,
SHA-512 and BLAKE3.

A :class:`~casframe.digest.Digest` does not carry its function: a store has one, and every
digest it holds was computed with it (BLAKE3 and SHA-256 hashes are both 64 hex digits, so a
hash alone cannot tell). Each function is a frozen :class:`DigestFunction` value, named as REAPI
names it (lowercase) and numbered as REAPI's ``DigestFunction.Value`` numbers it.

This module is cheap to import: ``hashlib`` (which sets up OpenSSL) is imported the first time
a SHA hasher is made, the ``blake3`` package the first time a BLAKE3 hasher is made, so that a
command that hashes nothing (``casframe ref list``) pays for neither. It must never import
anything of casframe above the errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from casframe.errors import UnsupportedDigestFunctionError
from casframe.lazy import lazy_module
from casframe.values import value_class, value_field

if TYPE_CHECKING:
    import hashlib

    import blake3 as _blake3
else:
    _blake3 = lazy_module("blake3")
    hashlib = lazy_module("hashlib")

__all__ = [
    "BLAKE3",
    "DIGEST_FUNCTIONS",
    "SHA256",
    "SHA384",
    "SHA512",
    "DigestFunction",
    "HashObject",
    "by_name",
    "by_reapi_value",
]

#: Bytes from which hashing ``bytes`` in one call with BLAKE3 uses several threads (its
#: tree hashing splits the input): below it, waking the threads costs more than they gain.
BLAKE3_THREADS_FROM = 1 << 20


class HashObject(Protocol):
    """What :meth:`DigestFunction.hasher` returns: ``hashlib``'s interface, in part."""

    def update(self, data: bytes | bytearray | memoryview, /) -> Any: ...

    def hexdigest(self) -> str: ...


class _HashlibConstructor:
    """``hashlib``'s constructor of one function, looked up on the first call: importing
    hashlib sets up OpenSSL (about a tenth of the instructions of ``casframe ref list``).

    The first call puts the real constructor in place of this one in the
    :class:`DigestFunction` that holds it, so that later hashers cost no extra call."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, data: bytes | bytearray | memoryview = b"") -> HashObject:
        constructor: Callable[..., HashObject] = getattr(hashlib, self.name)
        for function in DIGEST_FUNCTIONS.values():
            if function.new is self:
                object.__setattr__(function, "new", constructor)  # frozen: set once, here
        return constructor(data)

    def __repr__(self) -> str:
        return f"<hashlib.{self.name}, imported on first use>"


def _new_blake3(data: bytes | bytearray | memoryview = b"") -> HashObject:
    threads = _blake3.blake3.AUTO if len(data) >= BLAKE3_THREADS_FROM else 1
    return _blake3.blake3(data, max_threads=threads)


def _new_blake3_threaded() -> HashObject:
    return _blake3.blake3(max_threads=_blake3.blake3.AUTO)


@value_class
class DigestFunction:
    """One hash function a store can address its blobs with."""

    #: REAPI's name, lowercase: ``sha256``, ``sha384``, ``sha512``, ``blake3``.
    name: str
    #: REAPI's ``DigestFunction.Value`` number (SHA256 = 1, SHA384 = 5, SHA512 = 6, BLAKE3 = 9).
    reapi_value: int
    #: Lowercase hex digits of one hash.
    hex_length: int
    #: The hash of the empty blob, the one hash a digest of size 0 may have.
    empty_hash: str
    #: ``new(data=b"")``: a hash object over ``data`` (``hashlib.sha256`` and the like).
    new: Callable[..., HashObject] = value_field(repr=False, compare=False)
    #: ``new_threaded()``: an empty hash object that may use several threads for each large
    #: ``update`` (BLAKE3's); the same as ``new()`` for a function that cannot.
    new_threaded: Callable[[], HashObject] | None = value_field(
        default=None, repr=False, compare=False
    )

    def hasher(self, *, threaded: bool = False) -> HashObject:
        """A new hash object of this function (``update``, ``hexdigest``); ``threaded``: one
        that hashes each large ``update`` on several threads where the function can."""
        if threaded and self.new_threaded is not None:
            return self.new_threaded()
        return self.new()

    def hash_hex(self, data: bytes | bytearray | memoryview) -> str:
        """The hex hash of ``data`` in one call."""
        return self.new(data).hexdigest()

    def __str__(self) -> str:
        return self.name


SHA256 = DigestFunction(
    "sha256", 1, 64, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    _HashlibConstructor("sha256"),
)
SHA384 = DigestFunction(
    "sha384", 5, 96,
    "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da"
    "274edebfe76f65fbd51ad2f14898b95b",
    _HashlibConstructor("sha384"),
)
SHA512 = DigestFunction(
    "sha512", 6, 128,
    "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
    "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
    _HashlibConstructor("sha512"),
)
BLAKE3 = DigestFunction(
    "blake3", 9, 64, "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    _new_blake3, _new_blake3_threaded,
)

#: Every supported function by name, the default first.
DIGEST_FUNCTIONS: Mapping[str, DigestFunction] = {
    f.name: f for f in (SHA256, SHA384, SHA512, BLAKE3)
}
_BY_VALUE = {f.reapi_value: f for f in DIGEST_FUNCTIONS.values()}
_SUPPORTED = ", ".join(DIGEST_FUNCTIONS)


def by_name(name: str) -> DigestFunction:
    """The function REAPI names ``name`` (any case); :class:`UnsupportedDigestFunctionError`
    naming the supported ones otherwise."""
    function = DIGEST_FUNCTIONS.get(name.lower()) if isinstance(name, str) else None
    if function is None:
        raise UnsupportedDigestFunctionError(
            f"unsupported digest function {name!r}; casframe supports {_SUPPORTED}"
        )
    return function


def by_reapi_value(value: int) -> DigestFunction:
    """The function of REAPI's ``DigestFunction.Value`` number ``value``."""
    function = _BY_VALUE.get(value)
    if function is None:
        raise UnsupportedDigestFunctionError(
            f"unsupported digest function (REAPI DigestFunction value {value}); casframe "
            f"supports {', '.join(f'{f.name} ({f.reapi_value})' for f in _BY_VALUE.values())}"
        )
    return function
