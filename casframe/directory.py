"""REAPI ``Directory`` messages: decoding them safely, and encoding their entries.

A Directory is decoded by protobuf and then checked: every name a single safe path segment,
no name twice, no symlink target no file system could hold. Import encodes the entries of the
Directories it writes itself, on :mod:`casframe._protowire`'s primitives: building a message
object per file costs several microseconds, and the Directories are built after the workers
finish, on one thread, while encoding each file's entry in the worker that stored it costs a
fraction of that, in parallel with the other worker's system calls. The bytes are exactly
those of protobuf's deterministic serialization (fields in number order, default values left
out), which the tests check against protobuf itself. This is the only Directory encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from casframe import _messages
from casframe._protowire import ONE_BYTE_VARINTS as _ONE_BYTE
from casframe._protowire import varint
from casframe.digest import Digest
from casframe.errors import CorruptBlobError, InvalidNameError, UnsafeTreeError
from casframe.names import entry_names_are_safe, validate_entry_name

if TYPE_CHECKING:
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        Digest as DigestProto,
    )
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory

__all__ = [
    "directory_entry",
    "file_entry",
    "is_canonical",
    "node_digest",
    "parse_directory",
    "symlink_entry",
]


def parse_directory(digest: Digest, data: bytes) -> Directory:
    """Decode a Directory blob and check that it is safe to materialise."""
    directory = _messages.execution.Directory()
    try:
        directory.ParseFromString(data)
    except _messages.DecodeError as exc:
        raise CorruptBlobError(digest, f"not a Directory message: {exc}") from None
    names = [node.name for group in _groups(directory) for node in group]
    if len(set(names)) != len(names) or not entry_names_are_safe(names):
        seen: set[str] = set()
        for name in names:
            try:
                validate_entry_name(name)
            except InvalidNameError as exc:
                raise UnsafeTreeError(f"directory {digest}: {exc}") from None
            if name in seen:
                raise UnsafeTreeError(f"directory {digest}: duplicate name {name!r}")
            seen.add(name)
    for link in directory.symlinks:
        if not link.target or "\x00" in link.target:
            # No file system can hold it: checkout would fail half-way, with files written.
            raise UnsafeTreeError(
                f"directory {digest}: symlink {link.name!r} has an impossible target "
                f"{link.target!r} (empty or with a NUL character)"
            )
    return directory


def _groups(directory: Directory) -> tuple[Any, Any, Any]:
    return directory.files, directory.directories, directory.symlinks


def is_canonical(directory: Directory) -> bool:
    """Whether entries are sorted by name within each kind (REAPI's canonical form)."""
    for group in _groups(directory):
        names = [node.name for node in group]
        if names != sorted(names):
            return False
    return True


def node_digest(proto: DigestProto) -> Digest:
    return Digest(proto.hash, proto.size_bytes)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def _digest_field(digest: Digest) -> bytes:
    """Field 2 (``digest``) of a FileNode or DirectoryNode: Digest{hash=1, size_bytes=2}."""
    hash_, size = digest
    if len(hash_) != 64:  # SHA-384's and SHA-512's: lengths of their own
        inner = _length_delimited(b"\n", hash_.encode("ascii"))
        return _length_delimited(b"\x12", inner + (b"\x10" + varint(size) if size else b""))
    if not size:
        return b"\x12\x42\n@" + hash_.encode("ascii")  # 66 bytes: the hash (64 hex digits)
    size_field = varint(size)
    # At most 66 + 1 + 10 bytes: the length fits one varint byte.
    return b"".join(
        (b"\x12", varint(67 + len(size_field)), b"\n@", hash_.encode("ascii"), b"\x10",
         size_field)
    )


def file_entry(name: bytes, digest: Digest, executable: bool) -> bytes:
    """Directory field 1: FileNode{name=1, digest=2, is_executable=4}."""
    hash_, size = digest
    if 0 < size < 0x4000 and len(name) < 0x80 and len(hash_) == 64:
        # The common case, one call per imported file: a 64-digit hash, a size of one or two
        # varint bytes, a name's length of one, so every length is known without varint().
        size_field = _ONE_BYTE[size] if size < 0x80 else bytes(((size & 0x7F) | 0x80, size >> 7))
        digest_length = 67 + len(size_field)  # "\n@" + 64 hex digits + "\x10" + size
        body_length = 4 + len(name) + digest_length + (2 if executable else 0)
        return b"".join(
            (b"\n", varint(body_length), b"\n", _ONE_BYTE[len(name)], name, b"\x12",
             _ONE_BYTE[digest_length], b"\n@", hash_.encode("ascii"), b"\x10", size_field,
             b" \x01" if executable else b"")
        )
    name_length = varint(len(name))
    digest_field = _digest_field(digest)
    body_length = 1 + len(name_length) + len(name) + len(digest_field) + (2 if executable else 0)
    return b"".join(
        (b"\n", varint(body_length), b"\n", name_length, name, digest_field,
         b" \x01" if executable else b"")
    )


def directory_entry(name: bytes, digest: Digest) -> bytes:
    """Directory field 2: DirectoryNode{name=1, digest=2}."""
    return _length_delimited(b"\x12", _length_delimited(b"\n", name) + _digest_field(digest))


def symlink_entry(name: bytes, target: bytes) -> bytes:
    """Directory field 3: SymlinkNode{name=1, target=2}."""
    body = _length_delimited(b"\n", name)
    if target:
        body += _length_delimited(b"\x12", target)
    return _length_delimited(b"\x1a", body)
