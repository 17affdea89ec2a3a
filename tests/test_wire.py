"""casframe._wire: ByteStream's bulk messages by hand, checked against the generated classes."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from casframe._protos.google.bytestream import bytestream_pb2
from casframe._wire import (
    decode_read_response,
    decode_write_request,
    encode_read_response,
    encode_write_request,
    finish_write_request,
)
from casframe.testing import random_bytes

NAMES = ["", "uploads/u/blobs/" + "a" * 64 + "/5", "inst/\u00e9t\u00e9/uploads/x/blobs/h/1"]
OFFSETS = [0, 1, 127, 128, 300, 1 << 40, (1 << 63) - 1, -1, -(1 << 63)]
SIZES = [0, 1, 127, 128, 16_384, (1 << 20) + 3]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("finish", [False, True])
def test_write_requests_match_protobuf_both_ways(name: str, offset: int, finish: bool) -> None:
    for size in SIZES:
        data = random_bytes(size, seed=size)
        ours = encode_write_request(name, offset, data, finish_write=finish)
        parsed = bytestream_pb2.WriteRequest.FromString(ours)
        assert (parsed.resource_name, parsed.write_offset, parsed.finish_write, parsed.data) == (
            name, offset, finish, data)
        theirs = bytestream_pb2.WriteRequest(
            resource_name=name, write_offset=offset, finish_write=finish, data=data
        ).SerializeToString()
        assert ours == theirs  # the same canonical encoding, field for field
        chunk = decode_write_request(theirs)
        assert (chunk.resource_name, chunk.write_offset, chunk.finish_write) == (
            name, offset, finish)
        assert bytes(chunk.data) == data


def test_finish_write_can_be_added_after_the_data() -> None:
    data = random_bytes(5000)
    marked = finish_write_request(encode_write_request("r", 10, data, finish_write=False))
    parsed = bytestream_pb2.WriteRequest.FromString(marked)
    assert parsed.finish_write and parsed.data == data and parsed.write_offset == 10
    chunk = decode_write_request(marked)
    assert chunk.finish_write and bytes(chunk.data) == data


@pytest.mark.parametrize("size", SIZES)
def test_read_responses_match_protobuf_both_ways(size: int) -> None:
    data = random_bytes(size, seed=size)
    ours = encode_read_response(data)
    assert ours == bytestream_pb2.ReadResponse(data=data).SerializeToString()
    assert bytestream_pb2.ReadResponse.FromString(ours).data == data
    assert bytes(decode_read_response(ours)) == data


def test_decoded_data_is_a_view_of_the_message_not_a_copy() -> None:
    raw = encode_read_response(b"x" * 1000)
    assert decode_read_response(raw).obj is raw
    request = encode_write_request("r", 0, b"y" * 1000, finish_write=True)
    assert decode_write_request(request).data.obj is request


def test_decoding_follows_protobufs_rules() -> None:
    # Fields in any order, unknown fields of every wire type skipped, the last value wins, a
    # known field number with an unexpected wire type ignored (as protobuf treats it).
    unknown = (b"\x28\x05"  # field 5, varint
               + b"\x31" + bytes(8)  # field 6, 64-bit
               + b"\x3a\x03abc"  # field 7, length-delimited
               + b"\x45" + bytes(4))  # field 8, 32-bit
    raw = (b"\x52\x03old" + unknown + b"\x18\x01" + b"\x10\x07" + b"\x0a\x01r"
           + b"\x52\x03new" + b"\x15" + bytes(4))  # field 2 again, as a 32-bit value
    expected = bytestream_pb2.WriteRequest.FromString(raw)
    chunk = decode_write_request(raw)
    assert (chunk.resource_name, chunk.write_offset, chunk.finish_write, bytes(chunk.data)) == (
        expected.resource_name, expected.write_offset, expected.finish_write, expected.data)
    assert bytes(chunk.data) == b"new"
    assert bytes(decode_read_response(unknown + b"\x52\x02ok")) == b"ok"


@pytest.mark.parametrize("raw", [
    b"\x52",  # a key and nothing after it
    b"\x52\x05abc",  # data shorter than its length says
    b"\x10\xff\xff",  # truncated varint
    b"\x10" + b"\xff" * 10 + b"\x01",  # varint longer than ten bytes
    b"\x0b",  # wire type 3 (groups are not used by these messages)
    b"\x02\x00",  # field number 0
    b"\x31\x00\x00",  # 64-bit field cut short
    b"\x0a\x02\xff\xfe",  # resource_name that is not UTF-8
])
def test_malformed_messages_raise_decode_error(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        bytestream_pb2.WriteRequest.FromString(raw)  # protobuf refuses them as well
    with pytest.raises(DecodeError):
        decode_write_request(raw)
