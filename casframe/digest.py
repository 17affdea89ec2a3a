"""The Digest value type: a blob's identity, ``(hash hex, size in bytes)``.

Identity is the pair: the same hash with another size is another (missing) blob. The hash is
that of the store's digest function (:mod:`casframe.digestfunctions`; SHA-256 unless the store
was opened with another): a digest does not carry its function. This module hashes bytes,
files and streams in bounded chunks and converts to and from the REAPI message. It must never
read a whole large file into memory.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from casframe import _messages
from casframe._protowire import LEN, VARINT, WireError, fields, varint
from casframe.digestfunctions import DIGEST_FUNCTIONS, SHA256, DigestFunction
from casframe.errors import InvalidDigestError

if TYPE_CHECKING:
    from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2

__all__ = ["CHUNK_SIZE", "EMPTY_DIGEST", "Digest", "Hasher", "looks_like_digest"]

# 1 MiB: large enough that per-call overhead vanishes next to hashing (~2 GB/s here), small
# enough that several concurrent streams stay far below the 100 MiB memory budget.
CHUNK_SIZE = 1 << 20
# The part of a file one memory map shows at a time when a file is hashed in place
# (Digest.of_own_file): large enough for BLAKE3's threads to share, small enough that the
# pages mapped by two importing threads stay far below the 100 MiB budget (mapped file pages
# count in a process's resident set).
_MAP_WINDOW = 16 << 20

# The files being hashed in place at this moment (Digest.of_own_file), by descriptor: a file
# hashed while another is uses one thread.
_HASHING_IN_PLACE: list[int] = []

# The lengths of the supported functions' hashes (64, 96, 128 hex digits).
_HEX_LENGTHS = frozenset(f.hex_length for f in DIGEST_FUNCTIONS.values())
_LENGTHS_TEXT = " or ".join(
    [", ".join(str(n) for n in sorted(_HEX_LENGTHS)[:-1]), str(max(_HEX_LENGTHS))]
)
# Only the empty blob has size 0: any other hash with size 0 names content that cannot exist.
_EMPTY_HASHES = frozenset(f.empty_hash for f in DIGEST_FUNCTIONS.values())
_HEX_RE = re.compile(r"[0-9a-f]*")
# REAPI's size_bytes is an int64: a larger size cannot be sent to any peer.
_MAX_SIZE = (1 << 63) - 1
_STR, _INT, _SIXTY_FOUR = {str}, {int}, {64}
_HEX_DIGITS = b"0123456789abcdef"


def _is_hex(text: str) -> bool:
    """Whether ``text`` is lowercase hex digits only (as ``_HEX_RE``), six times faster than
    the regular expression over a tree's joined hashes: a byte loop deleting the digits."""
    try:
        return not text.encode("ascii").translate(None, _HEX_DIGITS)
    except UnicodeEncodeError:
        return False


def _all_valid(hashes: Sequence[str], sizes: Sequence[int]) -> bool:
    """Whether every pair is a valid digest with a 64-digit hash, checked in bulk: loops in
    C over all of them (types, lengths, digits), no Python code per pair."""
    if len(hashes) != len(sizes):
        return False
    if not hashes:
        return True
    return (
        set(map(type, hashes)) == _STR
        and set(map(len, hashes)) == _SIXTY_FOUR
        and _is_hex("".join(hashes))
        and set(map(type, sizes)) == _INT
        and min(sizes) >= 0
        and max(sizes) <= _MAX_SIZE
        and (
            0 not in sizes
            or all(h in _EMPTY_HASHES for h, s in zip(hashes, sizes, strict=True) if not s)
        )
    )


# Keys (field number << 3 | wire type) of the REAPI Digest message's two fields.
_HASH_KEY = bytes([1 << 3 | LEN])
_SIZE_KEY = bytes([2 << 3 | VARINT])


class Digest(tuple[str, int]):
    """A content hash (lowercase hex, of the store's digest function) and the content's size.

    Immutable, hashable and ordered by ``(hash, size)``. It is a tuple underneath because
    millions are made during a large import and a tuple is the cheapest immutable value.
    """

    __slots__ = ()

    def __new__(cls, hash: str, size: int) -> Digest:  # noqa: A002 - REAPI's field name
        if (
            not isinstance(hash, str)
            or len(hash) not in _HEX_LENGTHS
            or not _HEX_RE.fullmatch(hash)
        ):
            raise InvalidDigestError(
                f"not a hex digest ({_LENGTHS_TEXT} lowercase hex digits): {hash!r}"
            )
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_SIZE:
            raise InvalidDigestError(f"not a valid blob size: {size!r}")
        if size == 0 and hash not in _EMPTY_HASHES:
            raise InvalidDigestError(f"size 0 with a hash that is not the empty blob's: {hash}")
        return tuple.__new__(cls, (hash, size))

    @classmethod
    def many(cls, hashes: Sequence[str], sizes: Sequence[int]) -> list[Digest]:
        """Digests of ``zip(hashes, sizes)``, validated as the constructor validates each.

        For the thousands of digests of a tree: one regular expression over all the hashes
        instead of one call per digest (for 64-digit hashes, SHA-256's and BLAKE3's; others
        take the constructor's path). Invalid input raises the constructor's error.
        """
        if _all_valid(hashes, sizes):
            new = tuple.__new__
            return [new(cls, pair) for pair in zip(hashes, sizes, strict=True)]
        return [cls(h, s) for h, s in zip(hashes, sizes, strict=True)]

    @classmethod
    def validate_many(cls, hashes: Sequence[str], sizes: Sequence[int]) -> None:
        """Check ``zip(hashes, sizes)`` as :meth:`many` does, building no Digest: for a
        reader that keeps the pairs as they are (checkout's file entries)."""
        if not _all_valid(hashes, sizes):
            for h, s in zip(hashes, sizes, strict=True):
                cls(h, s)

    @classmethod
    def _trusted(cls, hash: str, size: int) -> Digest:  # noqa: A002
        """Build without validation, for a hash and size known to be valid: computed here
        (:meth:`of_bytes`, :class:`Hasher`), or read back from what casframe recorded of such a
        digest (the stat cache's hashes with the size of the file they were computed from;
        maintenance's names for emptied objects, which ``delete_blobs`` accepts)."""
        return tuple.__new__(cls, (hash, size))

    @property
    def hash(self) -> str:
        return self[0]

    @property
    def size(self) -> int:
        return self[1]

    def __getnewargs__(self) -> tuple[str, int]:
        return (self[0], self[1])

    def __repr__(self) -> str:
        return f"Digest(hash={self[0]!r}, size={self[1]})"

    def __str__(self) -> str:
        return f"{self[0]}/{self[1]}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``HASH/SIZE`` (the form Bazel and BuildStream print)."""
        hash_, sep, size = text.strip().partition("/")
        if not sep or not (size.isascii() and size.isdigit()):
            raise InvalidDigestError(f"expected HASH/SIZE, got {text!r}")
        return cls(hash_.lower(), int(size))

    @classmethod
    def of_bytes(
        cls, data: bytes | bytearray | memoryview, function: DigestFunction = SHA256
    ) -> Digest:
        return cls._trusted(function.new(data).hexdigest(), len(data))

    @classmethod
    def of_stream(cls, stream: BinaryIO, function: DigestFunction = SHA256) -> Digest:
        """Hash a binary stream from its current position to its end, chunk by chunk."""
        hasher = Hasher(function)
        buf = bytearray(CHUNK_SIZE)
        view = memoryview(buf)
        readinto = getattr(stream, "readinto", None)
        while True:
            if readinto is not None:
                n = readinto(view)
                if not n:
                    break
                hasher.update(view[:n])
            else:
                chunk = stream.read(CHUNK_SIZE)
                if not chunk:
                    break
                hasher.update(chunk)
        return hasher.digest()

    @classmethod
    def of_file(
        cls, path: str | os.PathLike[str], function: DigestFunction = SHA256
    ) -> Digest:
        with open(path, "rb", buffering=0) as f:
            return cls.of_stream(f, function)

    @classmethod
    def of_own_file(
        cls, fd: int, function: DigestFunction = SHA256, *,
        arriving: Callable[[int], int] | None = None,
    ) -> Digest:
        """Hash the whole regular file open as ``fd`` in place, through memory maps: no copy
        into Python.

        Only for a file nothing else can change while it is hashed (an upload's own temp
        file): a mapped page of a file truncated meanwhile would kill the process (SIGBUS).
        BLAKE3 uses its own threads only when no other file is hashed so at the same time.
        With ``arriving``, the file is still being filled by its owner: ``arriving(end)``
        waits until the first ``end`` bytes are there and returns ``end``, or fewer once the
        filling ended: the file ends there. Only the bytes it reports are mapped. Where the
        file system cannot map the file, each window is read into a buffer instead.
        """
        if arriving is None:
            size = os.fstat(fd).st_size
            arriving = functools.partial(min, size)
        # Threads of the hash function's own (BLAKE3's) only for a file hashed alone: files
        # hashed at once already keep the cores busy, and sharing them costs CPU and, on a
        # loaded machine, waits for each other's threads.
        hasher = Hasher(function, threaded=not _HASHING_IN_PLACE)
        _HASHING_IN_PLACE.append(fd)  # list.append and .remove are atomic: no lock needed
        try:
            offset = 0
            while (end := arriving(offset + _MAP_WINDOW)) > offset:
                _hash_window(fd, offset, end, hasher)
                offset = end
        finally:
            _HASHING_IN_PLACE.remove(fd)
        return hasher.digest()

    @classmethod
    def empty(cls, function: DigestFunction = SHA256) -> Digest:
        """The empty blob's digest under ``function``."""
        return cls._trusted(function.empty_hash, 0)

    @classmethod
    def from_proto(cls, message: remote_execution_pb2.Digest) -> Digest:
        return cls(message.hash, message.size_bytes)

    def to_proto(self) -> remote_execution_pb2.Digest:
        return _digest_message()(hash=self[0], size_bytes=self[1])

    @classmethod
    def from_serialized(cls, data: bytes) -> Digest:
        """Parse a serialized REAPI ``Digest`` message (the content of a ref file).

        Decoded by hand (two fields), so that reading refs does not import protobuf.
        """
        try:
            found = fields(data)
            raw_hash = found.get((1, LEN), b"")
            raw_size = found.get((2, VARINT), 0)
            assert isinstance(raw_hash, bytes | memoryview) and isinstance(raw_size, int)
            text = bytes(raw_hash).decode()
        except (WireError, UnicodeDecodeError) as exc:
            raise InvalidDigestError(f"not a serialized Digest message: {exc}") from None
        return cls(text, raw_size - (1 << 64) if raw_size >= 1 << 63 else raw_size)

    def serialize(self) -> bytes:
        """The serialized REAPI ``Digest`` message, byte for byte what protobuf writes."""
        name = self[0].encode()
        parts = [_HASH_KEY, varint(len(name)), name] if name else []
        if self[1]:
            parts += [_SIZE_KEY, varint(self[1])]
        return b"".join(parts)


class Hasher:
    """Incremental hashing (SHA-256 unless another ``function`` is given) that also counts
    bytes, producing a :class:`Digest`."""

    __slots__ = ("_h", "size")

    def __init__(self, function: DigestFunction = SHA256, *, threaded: bool = False) -> None:
        self._h = function.hasher(threaded=threaded)
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest._trusted(self._h.hexdigest(), self.size)


def _hash_window(fd: int, offset: int, end: int, hasher: Hasher) -> None:
    """Hash bytes ``offset`` to ``end`` of the file ``fd`` through a memory map, or read where
    the file system cannot map it (some FUSE ones)."""
    try:
        window = mmap.mmap(fd, end - offset, access=mmap.ACCESS_READ, offset=offset)
    except OSError:
        _hash_read(fd, offset, end, hasher)
        return
    with window, memoryview(window) as view:
        hasher.update(view)


def _hash_read(fd: int, offset: int, end: int, hasher: Hasher) -> None:
    """Hash bytes ``offset`` to ``end`` of the file ``fd`` read by ``preadv``, chunk by chunk:
    :meth:`Digest.of_own_file` where the file cannot be mapped. A file that ends sooner is
    hashed to its end (the size in the digest then says so)."""
    buf = bytearray(min(CHUNK_SIZE, end - offset))
    view = memoryview(buf)
    while offset < end and (n := os.preadv(fd, [view[: end - offset]], offset)):
        hasher.update(view[:n])
        offset += n


@functools.cache
def _digest_message() -> type[remote_execution_pb2.Digest]:
    # Looked up once, then kept: transfers convert tens of thousands of digests.
    return _messages.execution.Digest


def looks_like_digest(text: str) -> bool:
    """Whether ``text`` parses as ``HASH/SIZE`` (else it may be a ref name)."""
    try:
        Digest.parse(text)
    except ValueError:
        return False
    return True


#: The empty blob's digest under SHA-256 (see :meth:`Digest.empty` for the others).
EMPTY_DIGEST = Digest(SHA256.empty_hash, 0)
