"""The protobuf-free Directory decoder gives protobuf's answer for every input.

Checkout reads trees with :func:`casframe.directory.read_directory`, which never imports
protobuf; everything else reads them with :func:`casframe.directory.parse_directory`, which
parses with the generated classes. Both must accept the same bytes, give the same entries and
refuse the rest with the same error: random Directories built with the generated classes,
then mutated byte by byte, cut, spliced with foreign fields (groups, unknown numbers, wrong
wire types, overlong varints, invalid UTF-8), and plain random bytes.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from casframe import Digest
from casframe._messages import execution
from casframe._protowire import varint as _varint
from casframe.directory import parse_directory, read_directory
from casframe.errors import CasframeError
from casframe.treesize import node_digests

BLOB = Digest("0" * 64, 1)
HASH = "ab" * 32


def _reference(data: bytes) -> Any:
    """What the tree engine reads with protobuf: the entries, or the error and its text."""
    try:
        directory = parse_directory(BLOB, data)
        children = node_digests(directory.directories)  # validated as iter_tree does
    except CasframeError as exc:
        return type(exc).__name__, str(exc)
    return (
        [(n.name, n.digest.hash, n.digest.size_bytes, n.is_executable) for n in directory.files],
        [(n.name, c) for n, c in zip(directory.directories, children, strict=True)],
        [(n.name, n.target) for n in directory.symlinks],
    )


def _decoded(data: bytes) -> Any:
    try:
        listing = read_directory(BLOB, data)
    except CasframeError as exc:
        return type(exc).__name__, str(exc)
    return listing.files, listing.directories, listing.symlinks


def assert_same(data: bytes) -> None:
    assert _decoded(data) == _reference(data), data


names = st.one_of(
    st.sampled_from(["a", "b", "a.txt", ".", "..", "", "a/b", "x\x00y", "é", "A"]),
    st.text(min_size=0, max_size=8),
)
hashes = st.one_of(st.just(HASH), st.sampled_from(["", "AB" * 32, "e3" * 32, "zz"]),
                   st.text(max_size=4))
sizes = st.one_of(st.integers(0, 20_000), st.integers(-(1 << 63), (1 << 63) - 1))


@st.composite
def node_properties(draw: st.DrawFn, message: Any) -> None:
    if draw(st.booleans()):
        return
    props = message.node_properties
    for _ in range(draw(st.integers(0, 2))):
        prop = props.properties.add()
        prop.name, prop.value = draw(st.text(max_size=3)), draw(st.text(max_size=3))
    if draw(st.booleans()):
        props.mtime.seconds = draw(st.integers(-(1 << 40), 1 << 40))
        props.mtime.nanos = draw(st.integers(-(1 << 31), (1 << 31) - 1))
    if draw(st.booleans()):
        props.unix_mode.value = draw(st.integers(0, (1 << 32) - 1))


@st.composite
def directories(draw: st.DrawFn) -> bytes:
    directory = execution.Directory()
    for _ in range(draw(st.integers(0, 4))):
        node = directory.files.add(name=draw(names), is_executable=draw(st.booleans()))
        node.digest.hash, node.digest.size_bytes = draw(hashes), draw(sizes)
        draw(node_properties(node))
    for _ in range(draw(st.integers(0, 3))):
        node = directory.directories.add(name=draw(names))
        node.digest.hash, node.digest.size_bytes = draw(hashes), draw(sizes)
    for _ in range(draw(st.integers(0, 3))):
        node = directory.symlinks.add(name=draw(names), target=draw(names))
        draw(node_properties(node))
    draw(node_properties(directory))
    return bytes(directory.SerializeToString(deterministic=draw(st.booleans())))


@st.composite
def foreign_fields(draw: st.DrawFn) -> bytes:
    """A field protobuf may or may not accept: any number and wire type, overlong varints,
    groups (matched or not, nested), lengths past the end, strings of invalid UTF-8."""
    number = draw(st.one_of(st.integers(0, 7), st.sampled_from([15, 16, 2047, (1 << 29) - 1])))
    wire = draw(st.integers(0, 7))
    tag = _varint(number << 3 | wire)
    if draw(st.booleans()):
        tag = tag[:-1] + bytes([tag[-1] | 0x80]) + b"\x80" * draw(st.integers(0, 4)) + b"\x00"
    if wire == 0:
        body = draw(st.sampled_from([b"\x00", b"\x01", b"\xff" * 9 + b"\x01", b"\xff" * 10,
                                     b"\xff" * 9 + b"\x7f", b"\x80"]))
    elif wire == 2:
        payload = draw(st.one_of(st.binary(max_size=6),
                                 st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80"])))
        body = _varint(len(payload) + draw(st.sampled_from([0, 0, 0, 1]))) + payload
    elif wire == 3:
        depth = draw(st.sampled_from([0, 1, 2, 99, 100, 101]))
        inner = draw(st.binary(max_size=3))
        end = _varint(draw(st.sampled_from([number, number, number + 1])) << 3 | 4)
        body = tag * depth + inner + end * (depth + 1)
    else:
        body = draw(st.binary(max_size=9))
    return tag + body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(directories()))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "foreign", "nest"]))
        at = draw(st.integers(0, len(data)))
        if how == "flip" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "foreign":
            data[at:at] = draw(foreign_fields())
        else:  # a foreign field inside an entry: into FileNode, DirectoryNode or SymlinkNode
            field = draw(foreign_fields())
            entry = draw(st.sampled_from([b"\n", b"\x12", b"\x1a", b"*"]))
            data[at:at] = entry + _varint(len(field)) + field
    return bytes(data)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(directories())
def test_random_directories_decode_as_protobuf_decodes_them(data: bytes) -> None:
    assert_same(data)


@FUZZ
@given(mutated())
def test_mutated_directories_decode_or_fail_as_with_protobuf(data: bytes) -> None:
    assert_same(data)


@FUZZ
@given(st.binary(max_size=40))
@example(b"\x0b" * 100 + b"\x0c" * 100)
@example(b"\x0b" * 101 + b"\x0c" * 101)
def test_random_bytes_decode_or_fail_as_with_protobuf(data: bytes) -> None:
    assert_same(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\n\x03\n\x01\xff",  # a name that is not UTF-8
        b"\x1a\x05\x12\x03\xed\xa0\x80",  # a target with a surrogate
        b"*\x05\n\x03\n\x01\xff",  # a node property of the Directory
        b"\n\x07\x32\x05\n\x03\n\x01\xff",  # a node property of a file
        b"\x0c",  # an end of group with no group
        b"\x0b\x14",  # an end of group of another number
        b"\x00\x00",  # field number 0
        b"\x80\x80\x80\x80\x10\x00",  # a tag of 2**32
        b"\n\x80\x80\x80\x80\x80\x00",  # a length of six bytes
        b"\n\x02\n",  # a length past the end
        b"\n" + _varint(2 + 99 * 2) + b"\x0b" * 100 + b"\x0c" * 100,  # 101 levels in a file
        b"\x1a\x03\n\x01a",  # a symlink without a target
        b"\n\x03\n\x01.",  # an unsafe name
        b"\n\x03\n\x01a\n\x03\n\x01a",  # a name twice
        b"\x12\x07\n\x01d\x12\x02\x10\x05",  # a directory with an invalid digest
    ],
)
def test_hostile_directories_fail_with_protobuf_s_error(data: bytes) -> None:
    decoded = _decoded(data)
    assert decoded == _reference(data)
    assert isinstance(decoded[0], str), decoded  # refused


def test_a_digest_given_twice_is_merged_as_protobuf_merges_it() -> None:
    first = b"\x12\x42\n@" + HASH.encode()
    second = b"\x12\x02\x10\x07"
    data = b"\n" + _varint(3 + len(first) + len(second)) + b"\n\x01f" + first + second
    assert _decoded(data) == _reference(data) == ([("f", HASH, 7, False)], [], [])


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1 << 40])
@pytest.mark.parametrize("executable", [b"", b" \x01", b" \x02", b" \x81\x00", b"(\x01"])
@pytest.mark.parametrize("size_field", ["canonical", "padded"])
def test_files_as_import_writes_them_and_near_variants(
    size: int, executable: bytes, size_field: str
) -> None:
    encoded = _varint(size) if size_field == "canonical" else _varint(size)[:-1] + bytes(
        [_varint(size)[-1] | 0x80, 0])
    digest = b"\n@" + HASH.encode() + b"\x10" + encoded
    body = b"\n\x05f.dat\x12" + _varint(len(digest)) + digest + executable
    data = b"\n" + _varint(len(body)) + body
    assert _decoded(data) == _reference(data)
    assert _decoded(data + b"\x12\x00") == _reference(data + b"\x12\x00")
