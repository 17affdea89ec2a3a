"""Digest: the value type, its text and proto forms, hashing, and Directory digests checked
against the canonical protobuf wire encoding written out by hand."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from casframe import EMPTY_DIGEST, Digest, Hasher, InvalidDigestError
from casframe._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casframe.digest import CHUNK_SIZE
from casframe.testing import random_bytes

HELLO = hashlib.sha256(b"hello\n").hexdigest()
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_digest_is_an_immutable_hashable_value() -> None:
    d = Digest(HELLO, 6)
    with pytest.raises(AttributeError):  # frozen
        d.size = 7  # type: ignore[misc]
    assert d == Digest(HELLO, 6)
    assert d != Digest(HELLO, 7), "identity is (hash, size)"
    assert len({d, Digest(HELLO, 6), Digest(HELLO, 7)}) == 2
    assert {d: "x"}[Digest(HELLO, 6)] == "x"


def test_digests_are_ordered_by_hash_then_size() -> None:
    a, b = "a" * 64, "b" * 64
    digests = [Digest(b, 1), Digest(a, 9), Digest(a, 2)]
    assert sorted(digests) == [Digest(a, 2), Digest(a, 9), Digest(b, 1)]
    assert Digest(a, 2) < Digest(a, 9) < Digest(b, 1)


def test_text_round_trip() -> None:
    d = Digest(HELLO, 6)
    assert str(d) == f"{HELLO}/6"
    assert Digest.parse(str(d)) == d
    assert Digest.parse(f"  {HELLO.upper()}/6\n") == d, "Bazel prints lower case; accept both"
    assert str(EMPTY_DIGEST) == f"{EMPTY_SHA256}/0"
    assert Digest.parse(f"{EMPTY_SHA256}/0") == EMPTY_DIGEST


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        HELLO,
        f"{HELLO}/",
        f"/{6}",
        f"{HELLO}/-1",
        f"{HELLO}/+6",
        f"{HELLO}/1.5",
        f"{HELLO}/6/7",
        f"{HELLO}/six",
        f"{HELLO} 6",
        f"{HELLO[:-1]}/6",
        f"{HELLO}0/6",
        f"{'g' * 64}/6",
        f"sha256:{HELLO}/6",
        f"{HELLO}/\u00b2",  # a superscript two is a "digit" to str.isdigit, not a size
        f"{HELLO}/\u0661\u0662",  # Arabic-Indic digits are no size either
        f"{HELLO}/{2**63}",  # size_bytes is an int64 on the wire
        f"{HELLO}/0",  # content of size 0 has one hash only
    ],
    ids=repr,
)
def test_invalid_text_raises_invalid_digest_error(text: str) -> None:
    with pytest.raises(InvalidDigestError):
        Digest.parse(text)


INVALID_FIELDS = [
    (HELLO.upper(), 6), ("x" * 64, 6), (HELLO, -1), (HELLO, True), (HELLO, 6.0), (HELLO, 2**63),
    (HELLO[:-1], 6), (HELLO + "0", 6), (HELLO[:-2] + "/.", 6), (None, 6),
    (HELLO, 0),  # only the empty blob has size 0
]


@pytest.mark.parametrize("hash_, size", INVALID_FIELDS, ids=repr)
def test_invalid_fields_raise_invalid_digest_error(hash_: object, size: object) -> None:
    with pytest.raises(InvalidDigestError):
        Digest(hash_, size)  # type: ignore[arg-type]


@pytest.mark.parametrize("hash_, size", INVALID_FIELDS, ids=repr)
def test_many_validates_like_the_constructor(hash_: object, size: object) -> None:
    """Digest.many checks thousands at once; one bad field among good ones is still refused."""
    good = [Digest.of_bytes(b"%d" % i) for i in range(50)]
    hashes = [d.hash for d in good]
    sizes = [d.size for d in good]
    assert Digest.many(hashes, sizes) == good
    assert Digest.many([], []) == []
    # A hash one character short next to one a character long: all-hex text of the right
    # total length, which only the per-hash length check tells apart.
    with pytest.raises(InvalidDigestError):
        Digest.many([HELLO[:-1], HELLO + "0"], [6, 6])
    with pytest.raises(InvalidDigestError):
        Digest.many([*hashes[:25], hash_, *hashes[25:]], [*sizes[:25], size, *sizes[25:]])


def test_largest_wire_size_is_accepted() -> None:
    d = Digest(HELLO, 2**63 - 1)
    assert Digest.from_proto(d.to_proto()) == d


def test_proto_round_trip() -> None:
    d = Digest(HELLO, 6)
    message = d.to_proto()
    assert isinstance(message, re_pb2.Digest)
    assert (message.hash, message.size_bytes) == (HELLO, 6)
    assert Digest.from_proto(message) == d
    assert Digest.from_serialized(d.serialize()) == d
    assert d.serialize() == b"\x0a\x40" + HELLO.encode() + b"\x10\x06"
    assert EMPTY_DIGEST.serialize() == b"\x0a\x40" + EMPTY_SHA256.encode()  # size 0 is implicit


def test_from_serialized_refuses_garbage() -> None:
    with pytest.raises(InvalidDigestError):
        Digest.from_serialized(b"\xff\xff\xff")
    with pytest.raises(InvalidDigestError):
        Digest.from_serialized(re_pb2.Digest(hash="abc", size_bytes=3).SerializeToString())


def test_of_bytes() -> None:
    assert Digest.of_bytes(b"hello\n") == Digest(HELLO, 6)
    assert Digest.of_bytes(b"") == EMPTY_DIGEST
    assert Digest.of_bytes(bytearray(b"hello\n")) == Digest(HELLO, 6)
    assert Digest.of_bytes(memoryview(b"xhello\n")[1:]) == Digest(HELLO, 6)


def test_of_file_and_of_stream_hash_in_chunks(tmp_path) -> None:
    data = random_bytes(3 * CHUNK_SIZE + 17, seed=3)
    expected = Digest(hashlib.sha256(data).hexdigest(), len(data))
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    assert Digest.of_file(path) == expected
    assert Digest.of_file(os.fspath(path)) == expected
    assert Digest.of_stream(io.BytesIO(data)) == expected
    stream = io.BytesIO(data)
    stream.seek(5)
    assert Digest.of_stream(stream) == Digest.of_bytes(data[5:]), "from the current position"
    (tmp_path / "empty").write_bytes(b"")
    assert Digest.of_file(tmp_path / "empty") == EMPTY_DIGEST


def test_of_stream_without_readinto() -> None:
    data = random_bytes(2 * CHUNK_SIZE + 1, seed=4)

    class ReadOnly:
        def __init__(self) -> None:
            self.inner = io.BytesIO(data)
            self.sizes: list[int] = []

        def read(self, size: int = -1) -> bytes:
            self.sizes.append(size)
            return self.inner.read(size)

    stream = ReadOnly()
    assert Digest.of_stream(stream) == Digest.of_bytes(data)  # type: ignore[arg-type]
    assert all(0 < s <= CHUNK_SIZE for s in stream.sizes), "reads are bounded, never read(-1)"


def test_hasher_counts_bytes() -> None:
    hasher = Hasher()
    for part in (b"hel", b"", bytearray(b"lo"), memoryview(b"\n")):
        hasher.update(part)
    assert hasher.size == 6
    assert hasher.digest() == Digest(HELLO, 6)


# -- Directory digests --------------------------------------------------------------------------


def test_empty_directory_digest_is_the_sha256_of_nothing(memory_store, tmp_path) -> None:
    serialized = re_pb2.Directory().SerializeToString(deterministic=True)
    assert serialized == b""
    assert Digest.of_bytes(serialized) == EMPTY_DIGEST
    assert str(EMPTY_DIGEST) == f"{EMPTY_SHA256}/0"
    (tmp_path / "empty").mkdir()
    assert memory_store.import_directory(tmp_path / "empty") == EMPTY_DIGEST


def test_directory_digest_matches_the_wire_encoding_written_by_hand(memory_store, tmp_path):
    """Wire format of REAPI's Directory, bytes written out literally from the .proto:

    Directory:     files = 1, directories = 2, symlinks = 3 (length-delimited: tags 0a 12 1a)
    FileNode:      name = 1 (0a), digest = 2 (12), is_executable = 4 (varint: tag 20)
    DirectoryNode: name = 1 (0a), digest = 2 (12)
    SymlinkNode:   name = 1 (0a), target = 2 (12)
    Digest:        hash = 1 (0a, 64 hex chars: length 40), size_bytes = 2 (varint: tag 10)
    """
    root = tmp_path / "real"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    big = bytes(range(100)) * 3  # 300 bytes: its size takes a two-byte varint
    (root / "big.txt").write_bytes(big)
    (root / "run").write_bytes(b"#!/bin/sh\n")
    (root / "run").chmod(0o755)
    (root / "ln").symlink_to("a.txt")

    def sha(data: bytes) -> bytes:
        return hashlib.sha256(data).hexdigest().encode()

    # a.txt: Digest(hash, 6) is 0a 40 <64> 10 06 = 68 bytes (0x44); FileNode 2+5+2+68 = 77.
    file_a = b"\x0a\x05a.txt" + b"\x12\x44" + b"\x0a\x40" + sha(b"hello\n") + b"\x10\x06"
    # big.txt: 300 = 0b1_0010_1100 -> varint ac 02; Digest is 69 bytes (0x45); FileNode 80.
    file_big = b"\x0a\x07big.txt" + b"\x12\x45" + b"\x0a\x40" + sha(big) + b"\x10\xac\x02"
    # run: 10 bytes (0a), is_executable = true (20 01); FileNode 2+3+2+68+2 = 77.
    file_run = (
        b"\x0a\x03run" + b"\x12\x44" + b"\x0a\x40" + sha(b"#!/bin/sh\n") + b"\x10\x0a"
        + b"\x20\x01"
    )
    # sub: the empty Directory's Digest has no size field (0 is the default): 66 bytes (0x42).
    dir_sub = b"\x0a\x03sub" + b"\x12\x42" + b"\x0a\x40" + EMPTY_SHA256.encode()
    # ln -> a.txt
    link_ln = b"\x0a\x02ln" + b"\x12\x05a.txt"
    assert (len(file_a), len(file_big), len(file_run), len(dir_sub), len(link_ln)) == (
        0x4D, 0x50, 0x4D, 0x49, 0x0B,
    )
    expected = (
        b"\x0a\x4d" + file_a
        + b"\x0a\x50" + file_big
        + b"\x0a\x4d" + file_run
        + b"\x12\x49" + dir_sub
        + b"\x1a\x0b" + link_ln
    )
    expected_digest = Digest(hashlib.sha256(expected).hexdigest(), len(expected))

    imported = memory_store.import_directory(root)
    assert imported == expected_digest
    assert memory_store.read_bytes(imported) == expected
