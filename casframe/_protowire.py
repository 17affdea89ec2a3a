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
    "BAD_UTF8",
    "CORRUPT",
    "I32",
    "I64",
    "LEN",
    "MAX_DEPTH",
    "ONE_BYTE_VARINTS",
    "STRING",
    "VARINT",
    "Schema",
    "WireError",
    "check_message",
    "expect_end",
    "fields",
    "read_length",
    "read_string",
    "read_tag",
    "read_value",
    "read_varint",
    "skip_field",
    "skip_unknown",
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


# -- checking whole messages as protobuf's parser (upb) does ----------------------------------
#
# What protobuf's own parser accepts, measured on it (tests/test_directory_decoder.py holds the
# two to the same answers): a tag is a varint of at most 5 bytes below 2**32; a length one of
# at most 5 bytes; any other varint at most 10 bytes; field number 0 is corrupt, except inside
# an unknown group; an end-group tag must close the group open at that point; strings of
# proto3 must be valid UTF-8; a submessage or group goes one level deeper, and more than
# MAX_DEPTH levels are corrupt.

#: The end of protobuf's parse error for bytes that break the wire format.
CORRUPT = "Wire format was corrupt"
#: The end of protobuf's parse error for a string field that is not UTF-8.
BAD_UTF8 = "String field had bad UTF-8"
#: Levels of submessages and groups protobuf's parser follows (its default depth limit).
MAX_DEPTH = 100
SGROUP, EGROUP = 3, 4

#: What :func:`check_message` checks of a message it does not keep: for each field number of
#: a string, ``STRING``; of a submessage, that submessage's schema. Other fields of any wire
#: type and fields of an unexpected wire type only need to be well formed.
Schema = dict[int, "Schema | str"]
STRING = "string"


def read_tag(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A field's tag (field number << 3 | wire type): at most 5 bytes, below 2**32."""
    value, pos = read_value(data, pos, end, 5)
    if value > 0xFFFF_FFFF:
        raise WireError(CORRUPT)
    return value, pos


def read_length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A length (at most 5 bytes) and where its field's bytes start; they must fit in ``end``."""
    value, pos = read_tag(data, pos, end)
    if value > end - pos:
        raise WireError(CORRUPT)
    return value, pos


def read_value(data: bytes, pos: int, end: int, most: int = 10) -> tuple[int, int]:
    """A varint value of at most ``most`` bytes, as an unsigned 64-bit number."""
    value = shift = 0
    while pos < end and shift < 7 * most:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
    raise WireError(CORRUPT)


def skip_field(data: bytes, pos: int, end: int, tag: int, depth: int) -> int:
    """Past the value of a field not kept (of tag ``tag``, read already): where the next starts.

    A group is skipped to its matching end, one level deeper than ``depth``.
    """
    wire = tag & 7
    if wire == VARINT:
        return read_value(data, pos, end)[1]
    if wire == LEN:
        length, pos = read_length(data, pos, end)
        return pos + length
    if wire == I64 or wire == I32:
        pos += 8 if wire == I64 else 4
        if pos > end:
            raise WireError(CORRUPT)
        return pos
    if wire == SGROUP:
        if depth <= 0:
            raise WireError(CORRUPT)
        while True:
            inner, pos = read_tag(data, pos, end)
            if inner & 7 == EGROUP:
                if inner >> 3 != tag >> 3:
                    raise WireError(CORRUPT)
                return pos
            pos = skip_field(data, pos, end, inner, depth - 1)
    raise WireError(CORRUPT)  # an end-group tag with no group open, or wire type 6 or 7


def skip_unknown(data: bytes, pos: int, limit: int, tag: int, depth: int) -> int:
    """:func:`skip_field` for a field of a message (not of a group): field 0 is corrupt."""
    if tag < 8:
        raise WireError(CORRUPT)
    return skip_field(data, pos, limit, tag, depth)


def expect_end(pos: int, limit: int) -> None:
    """A message read field by field must end at its limit, not past it."""
    if pos != limit:
        raise WireError(CORRUPT)


def read_string(data: bytes, start: int, stop: int) -> str:
    try:
        return data[start:stop].decode()
    except UnicodeDecodeError:
        raise WireError(BAD_UTF8) from None


def check_message(data: bytes, pos: int, limit: int, schema: Schema, depth: int) -> None:
    """Check the message in ``data[pos:limit]`` as protobuf parses it, keeping nothing.

    ``depth`` is the levels still allowed below the message's own. As protobuf, a tag or a
    string may run past ``limit`` into the bytes after it: the string is still checked for
    UTF-8, then the message is corrupt.
    """
    end = len(data)
    while pos < limit:
        tag, pos = read_tag(data, pos, end)
        inner = schema.get(tag >> 3)
        if inner is None or tag & 7 != LEN:
            pos = skip_unknown(data, pos, limit, tag, depth)
        elif isinstance(inner, str):
            length, pos = read_length(data, pos, end)
            read_string(data, pos, pos + length)
            pos += length
        else:
            length, pos = read_length(data, pos, limit)
            if depth <= 0:
                raise WireError(CORRUPT)
            check_message(data, pos, pos + length, inner, depth - 1)
            pos += length
    expect_end(pos, limit)
