"""ByteStream's two bulk messages, encoded and decoded by hand.

``WriteRequest`` and ``ReadResponse`` carry a blob's content in 1 MiB pieces. Built and parsed
through protobuf, each piece was copied three or four more times and every message got a fresh
arena of its own (mapped, faulted in and unmapped again): measured on one grpcio stream of
1 GiB, that cost 0.5-1.2 s of CPU per direction, a third of the whole. These functions write
and read the same wire format (proto3; the field numbers of
``protos/google/bytestream/bytestream.proto``) with one copy on the way out and none on the way
in: decoded content is a ``memoryview`` into the received message.

Decoding follows protobuf's rules: fields in any order, unknown fields and fields of an
unexpected wire type skipped, the last occurrence of a field wins. Malformed input raises
``google.protobuf.message.DecodeError``, as the generated parser would. The Directory
messages import writes are the only other ones casframe encodes by hand
(:mod:`casframe.directory`, on the same primitives of :mod:`casframe._protowire`); everything
else goes through the generated classes.
"""

from __future__ import annotations

from typing import NamedTuple

from casframe import _messages
from casframe._protowire import LEN as _LEN
from casframe._protowire import VARINT as _VARINT
from casframe._protowire import WireError, fields
from casframe._protowire import varint as _varint

__all__ = [
    "WriteChunk",
    "decode_read_response",
    "decode_write_request",
    "encode_read_response",
    "encode_write_request",
    "finish_write_request",
]

# Keys (field number << 3 | wire type) of the fields written here.
_RESOURCE_NAME = bytes([1 << 3 | _LEN])
_WRITE_OFFSET = bytes([2 << 3 | _VARINT])
_FINISH_WRITE = bytes([3 << 3 | _VARINT, 1])
_DATA = bytes([10 << 3 | _LEN])
_EMPTY = memoryview(b"")


class WriteChunk(NamedTuple):
    """A decoded ``WriteRequest``: the fields the server reads, by their protobuf names."""

    resource_name: str
    write_offset: int
    finish_write: bool
    data: memoryview


def _fields(raw: bytes | memoryview) -> dict[tuple[int, int], int | memoryview]:
    """:func:`casframe._protowire.fields`, failing with protobuf's own DecodeError."""
    try:
        return fields(raw)
    except WireError as exc:
        raise _messages.DecodeError(str(exc)) from None


def encode_write_request(
    resource_name: str,
    write_offset: int,
    data: bytes | bytearray | memoryview,
    *,
    finish_write: bool,
) -> bytes:
    """A serialized ``WriteRequest``; ``data`` is copied once, into the result."""
    parts: list[bytes | bytearray | memoryview] = []
    if resource_name:
        name = resource_name.encode()
        parts += (_RESOURCE_NAME, _varint(len(name)), name)
    if write_offset:
        parts += (_WRITE_OFFSET, _varint(write_offset))
    if finish_write:
        parts.append(_FINISH_WRITE)
    if len(data):
        parts += (_DATA, _varint(len(data)), data)
    return b"".join(parts)


def finish_write_request(encoded: bytes) -> bytes:
    """The encoded ``WriteRequest`` with ``finish_write`` set.

    Protobuf parsers accept fields in any order, so the flag goes after the data: a writer can
    encode each chunk as it arrives and mark the last one once it knows it is the last.
    """
    return encoded + _FINISH_WRITE


def decode_write_request(raw: bytes) -> WriteChunk:
    """Parse a serialized ``WriteRequest``; its data is a view of ``raw``, not a copy."""
    fields = _fields(raw)
    name = fields.get((1, _LEN), _EMPTY)
    offset = fields.get((2, _VARINT), 0)
    finish = fields.get((3, _VARINT), 0)
    data = fields.get((10, _LEN), _EMPTY)
    assert isinstance(name, memoryview) and isinstance(data, memoryview)
    assert isinstance(offset, int) and isinstance(finish, int)
    try:
        resource_name = bytes(name).decode()
    except UnicodeDecodeError:
        raise _messages.DecodeError("resource_name is not valid UTF-8") from None
    if offset >= 1 << 63:
        offset -= 1 << 64
    return WriteChunk(resource_name, offset, bool(finish), data)


def encode_read_response(data: bytes | memoryview) -> bytes:
    """A serialized ``ReadResponse`` carrying ``data`` (copied once, into the result)."""
    if not len(data):
        return b""
    return b"".join((_DATA, _varint(len(data)), data))


def decode_read_response(raw: bytes) -> memoryview:
    """The data of a serialized ``ReadResponse``: a view of ``raw``, not a copy."""
    data = _fields(raw).get((10, _LEN), _EMPTY)
    assert isinstance(data, memoryview)
    return data
