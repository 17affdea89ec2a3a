"""Which digest function a request's digests were computed with, and the store that holds the
blobs of that function.

REAPI 2.3 lets a client choose the function per request: the ``digest_function`` field of the
CAS, ActionCache and Remote Asset requests, and an optional ``{digest_function}/`` segment in
ByteStream resource names (``blobs/blake3/{hash}/{size}``). Where the client leaves it out, as
REAPI allows for the functions a hash's length tells apart (SHA-256, SHA-384, SHA-512), the
server infers it from the length among the functions it announced: 64 hex digits are SHA-256,
never BLAKE3, whose hashes are as long; 96 are SHA-384; 128 are SHA-512.

A function the served store cannot hold, a name REAPI does not define, and digests whose length
is not the chosen function's are refused with ``INVALID_ARGUMENT`` naming what the server
offers. Each function's blobs and refs are those of
``store.with_digest_function(name)``: SHA-256's are the served store's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import itemgetter
from typing import cast

import grpc

from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe.digest import Digest
from casframe.digestfunctions import DIGEST_FUNCTIONS, SHA256, DigestFunction
from casframe.server.errors import StatusError
from casframe.store import Store

__all__ = ["REAPI_FUNCTION_NAMES", "DigestFunctions", "reapi_value"]

_UNSET = re_pb2.DigestFunction.UNKNOWN
_HASH = itemgetter(0)  # a Digest's hash
#: Every function REAPI names, as resource names spell them (lowercase), ``unknown`` aside.
REAPI_FUNCTION_NAMES = frozenset(
    name.lower() for name in re_pb2.DigestFunction.Value.keys() if name != "UNKNOWN"
)
# The functions a client may leave unset (REAPI: "MD5, MURMUR3, SHA1, SHA256, SHA384, SHA512,
# or VSO"): their hash lengths identify them. BLAKE3 must always be named.
_INFERABLE = frozenset({"md5", "murmur3", "sha1", "sha256", "sha384", "sha512", "vso"})


def reapi_value(function: DigestFunction) -> re_pb2.DigestFunction.Value:
    """``function`` as REAPI's ``DigestFunction.Value``, for a message's field."""
    return cast(re_pb2.DigestFunction.Value, function.reapi_value)


def _request_name(value: int) -> str:
    """REAPI's name of a ``DigestFunction.Value`` number, as a request carries it."""
    try:
        return re_pb2.DigestFunction.Value.Name(value)
    except ValueError:
        return f"number {value}"


def _invalid(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT, message)


class DigestFunctions:
    """The digest functions one served store offers, and the store of each."""

    def __init__(self, store: Store) -> None:
        self.store = store
        names = store.digest_functions
        #: What the server announces, SHA-256 (the default) first.
        self.offered: tuple[DigestFunction, ...] = tuple(
            f for f in DIGEST_FUNCTIONS.values() if f.name in names
        )
        #: Their REAPI numbers, for GetCapabilities.
        self.reapi_values: list[re_pb2.DigestFunction.Value] = [
            reapi_value(f) for f in self.offered
        ]
        self._by_value = {f.reapi_value: f for f in self.offered}
        self._by_name = {f.name: f for f in self.offered}
        self._by_length = {f.hex_length: f for f in self.offered if f.name in _INFERABLE}
        self._offered_text = ", ".join(f.name.upper() for f in self.offered)
        # The store of each function, once opened (the served store's own function at once).
        self._stores: dict[str, Store] = {store.digest_function.name: store}

    def store_for(self, function: DigestFunction) -> Store:
        """The store of ``function``'s blobs and refs (opened on first use: blocking)."""
        store = self._stores.get(function.name)
        if store is None:
            store = self._stores[function.name] = self.store.with_digest_function(function.name)
        return store

    def opened(self, function: DigestFunction) -> Store | None:
        """The store of ``function`` if :meth:`store_for` opened it already (never blocks,
        for the event loop)."""
        return self._stores.get(function.name)

    def default_store(self) -> Store:
        """The store of requests that cannot name a function (BuildStream's
        ReferenceStorage): SHA-256's, or the served store's own when it offers no SHA-256."""
        return self.store_for(SHA256) if SHA256 in self.offered else self.store

    def for_request(self, value: int, digests: Iterable[Digest]) -> Store:
        """The store of a request carrying ``digest_function`` ``value`` and ``digests`` (all
        of which must have the chosen function's length)."""
        return self.store_for(self.from_request(value, digests))

    def from_request(self, value: int, digests: Iterable[Digest]) -> DigestFunction:
        """The function of a request's ``digest_function`` field (inferred when unset)."""
        # map() over the tuples: a third of a set comprehension's cost for 10,000 digests.
        lengths = set(map(len, map(_HASH, digests)))
        if value == _UNSET:
            return self._infer(lengths, "set digest_function")
        function = self._by_value.get(value)
        if function is None:
            raise _invalid(
                f"digest function {_request_name(value)} is not supported by this server; "
                f"it offers {self._offered_text}"
            )
        self._check_lengths(function, lengths, f"digest_function {function.name.upper()}")
        return function

    def from_resource(self, segment: str | None, hash_: str) -> DigestFunction:
        """The function of a ByteStream resource name's ``{digest_function}/`` segment
        (``None`` when it has none: inferred from the hash's length)."""
        if segment is None:
            return self._infer({len(hash_)}, "name it in the resource name, as in "
                               "blobs/blake3/{hash}/{size}")
        function = self._by_name.get(segment)
        if function is None:
            offered = ", ".join(f.name for f in self.offered)
            raise _invalid(
                f"digest function {segment!r} of the resource name is not supported by this "
                f"server; it offers {offered}"
            )
        self._check_lengths(function, {len(hash_)}, f"the resource name's {segment}")
        return function

    def _infer(self, lengths: set[int], advice: str) -> DigestFunction:
        if not lengths:
            return self._by_length.get(SHA256.hex_length, self.offered[0])
        if len(lengths) > 1:
            shown = " and ".join(str(n) for n in sorted(lengths))
            raise _invalid(
                f"digests of {shown} hex digits in one request: one request uses one "
                "digest function"
            )
        (length,) = lengths
        function = self._by_length.get(length)
        if function is None:
            inferred = ", ".join(f"{n} digits: {f.name.upper()}"
                                 for n, f in sorted(self._by_length.items()))
            raise _invalid(
                f"cannot tell the digest function of {length}-hex-digit digests (this server "
                f"infers {inferred}; it offers {self._offered_text}): {advice}"
            )
        return function

    @staticmethod
    def _check_lengths(function: DigestFunction, lengths: set[int], what: str) -> None:
        wrong = sorted(n for n in lengths if n != function.hex_length)
        if wrong:
            raise _invalid(
                f"digests of {wrong[0]} hex digits do not fit {what}, whose hashes have "
                f"{function.hex_length}"
            )
