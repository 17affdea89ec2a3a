"""Protobuf's wire format, the few pieces casframe reads and writes by hand.

Used where the generated classes cost too much: ByteStream's bulk messages
(:mod:`casframe._wire`), the Directory messages import writes (:mod:`casframe.directory`),
and the ``Digest`` message of a ref file, which commands such as
``casframe ref list`` read without importing protobuf at all. Decoding follows protobuf's
rules: fields in any order, unknown fields and fields of an unexpected wire type skipped, the
last occurrence of a field wins; malformed input raises :class:`WireError`.
"""

from __future__ import annotations

__all__ = [
    "I32",
    "I64",
    "LEN",
    "ONE_BYTE_VARINTS",
    "VARINT",
    "WireError",
    "fields",
    "read_varint",
    "varint",
]

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


#: Every one-byte varint (0 to 127), built once: Directory entries need a few per file.
ONE_BYTE_VARINTS = [bytes((n,)) for n in range(0x80)]
_ONE_BYTE = ONE_BYTE_VARINTS


def varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if 0 < value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0:
        value += 1 << 64  # int64: two's complement in ten bytes, as protobuf writes it
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    end = len(view)
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7


def fields(raw: bytes | memoryview) -> dict[tuple[int, int], int | memoryview]:
    """The last value of each (field number, wire type) in a serialized message."""
    view = memoryview(raw).cast("B")
    found: dict[tuple[int, int], int | memoryview] = {}
    pos = 0
    end = len(view)
    while pos < end:
        key, pos = read_varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        value: int | memoryview
        if wire == VARINT:
            value, pos = read_varint(view, pos)
        elif wire == LEN:
            length, pos = read_varint(view, pos)
            if length > end - pos:
                raise WireError("length-delimited field runs past the end of the message")
            value = view[pos : pos + length]
            pos += length
        elif wire in (I64, I32):
            pos += 8 if wire == I64 else 4
            if pos > end:
                raise WireError("fixed-width field runs past the end of the message")
            continue
        else:
            raise WireError(f"unsupported wire type {wire}")
        found[number, wire] = value
    return found
