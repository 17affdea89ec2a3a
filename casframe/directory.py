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

from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

from casframe import _messages
from casframe._protowire import (
    MAX_DEPTH,
    STRING,
    Schema,
    WireError,
    check_message,
    expect_end,
    read_length,
    read_string,
    read_tag,
    read_value,
    skip_unknown,
    varint,
)
from casframe._protowire import ONE_BYTE_VARINTS as _ONE_BYTE
from casframe.digest import Digest
from casframe.errors import CorruptBlobError, InvalidNameError, UnsafeTreeError
from casframe.names import entry_names_are_safe, validate_entry_name

if TYPE_CHECKING:
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
        Digest as DigestProto,
    )
    from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory

__all__ = [
    "FileEntry",
    "Listing",
    "directory_entry",
    "file_entry",
    "is_canonical",
    "node_digest",
    "parse_directory",
    "read_directory",
    "symlink_entry",
]


def parse_directory(digest: Digest, data: bytes) -> Directory:
    """Decode a Directory blob and check that it is safe to materialise."""
    directory = _messages.execution.Directory()
    try:
        directory.ParseFromString(data)
    except _messages.DecodeError as exc:
        raise CorruptBlobError(digest, f"not a Directory message: {exc}") from None
    _check_entries(
        digest,
        [node.name for group in _groups(directory) for node in group],
        [(link.name, link.target) for link in directory.symlinks],
    )
    return directory


def _check_entries(digest: Digest, names: list[str], links: list[tuple[str, str]]) -> None:
    """Every name a safe single segment, none twice; every symlink target one a file system
    can hold."""
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
    for name, target in links:
        if not target or "\x00" in target:
            # No file system can hold it: checkout would fail half-way, with files written.
            raise UnsafeTreeError(
                f"directory {digest}: symlink {name!r} has an impossible target "
                f"{target!r} (empty or with a NUL character)"
            )


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


# -- decoding without protobuf ----------------------------------------------------------------

#: A file of a Directory as :func:`read_directory` gives it: name, hash, size, executable.
FileEntry = tuple[str, str, int, bool]


class Listing(NamedTuple):
    """A Directory's entries, decoded without protobuf, in the message's order.

    ``directories`` hold validated digests; the files' hashes and sizes are as stored (the
    tree is measured, and they are validated, before anything is written).
    """

    files: list[FileEntry]
    directories: list[tuple[str, Digest]]
    symlinks: list[tuple[str, str]]


#: NodeProperties (Directory field 5, FileNode's 6, SymlinkNode's 4): checkout keeps none of
#: it, but protobuf refuses a Directory whose properties are malformed, and so does this.
#: Fields: properties (NodeProperty{name, value}), mtime (Timestamp), unix_mode (UInt32Value).
_NODE_PROPERTIES: Schema = {1: {1: STRING, 2: STRING}, 2: {}, 3: {}}
_PARSE_ERROR = "Error parsing message with type 'build.bazel.remote.execution.v2.Directory': "
_INT64 = 1 << 63
_name = itemgetter(0)  # of an entry as decoded


def read_directory(digest: Digest, data: bytes) -> Listing:
    """What :func:`parse_directory` reads of a Directory blob, without protobuf: the same
    entries, the same errors for the same bytes (``tests/test_directory_decoder.py``)."""
    try:
        files, directories, symlinks = _decode(bytes(data))
    except WireError as exc:
        raise CorruptBlobError(
            digest, f"not a Directory message: {_PARSE_ERROR}{exc}"
        ) from None
    _check_entries(digest, [*map(_name, files), *map(_name, directories), *map(_name, symlinks)],
                   symlinks)
    children = Digest.many([d[1] for d in directories], [d[2] for d in directories])
    return Listing(files, [(d[0], c) for d, c in zip(directories, children, strict=True)],
                   symlinks)


def _decode(
    data: bytes,
) -> tuple[list[FileEntry], list[tuple[str, str, int]], list[tuple[str, str]]]:
    files: list[FileEntry] = []
    directories: list[tuple[str, str, int]] = []
    symlinks: list[tuple[str, str]] = []
    pos, end = 0, len(data)
    add_file = files.append
    while pos < end:
        tag = data[pos]
        if tag == 0x0A and pos + 1 < end and data[pos + 1] < 0x80:  # a file, as written
            stop = pos + 2 + data[pos + 1]
            if stop <= end and (entry := _canonical_file(data, pos + 2, stop)) is not None:
                add_file(entry)
                pos = stop
                continue
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_tag(data, pos, end)
        if tag == 0x0A or tag == 0x12 or tag == 0x1A or tag == 0x2A:  # fields 1, 2, 3, 5: LEN
            length, pos = read_length(data, pos, end)
            stop = pos + length
            if tag == 0x0A:
                files.append(_canonical_file(data, pos, stop) or _file_node(data, pos, stop))
            elif tag == 0x12:
                directories.append(_directory_node(data, pos, stop))
            elif tag == 0x1A:
                symlinks.append(_symlink_node(data, pos, stop))
            else:
                check_message(data, pos, stop, _NODE_PROPERTIES, MAX_DEPTH - 1)
            pos = stop
        else:
            pos = skip_unknown(data, pos, end, tag, MAX_DEPTH)
    return files, directories, symlinks


def _canonical_file(data: bytes, pos: int, limit: int) -> FileEntry | None:
    """A FileNode in the layout :func:`file_entry` and protobuf write for a 64-digit hash and a
    size below 2**14, read at a glance; None for any other bytes (read by :func:`_file_node`).

    ``\\n`` NAME-LENGTH NAME ``\\x12`` DIGEST-LENGTH ``\\n@`` HASH ``\\x10`` SIZE
    [``\\x20\\x01``]: every length must match, so these bytes decode to exactly this entry.
    """
    if limit - pos < 72 or data[pos] != 0x0A or data[pos + 1] >= 0x80:
        return None
    start = pos + 2
    at = start + data[pos + 1]  # where the digest field starts (the name's length is a byte)
    # The digest field's head: its tag, its length (68 or 69: one or two bytes of size), the
    # hash's tag and length (64): one slice looked up instead of four comparisons.
    if at + 70 > limit or data[at : at + 4] not in _DIGEST_HEADS or data[at + 68] != 0x10:
        return None
    size = data[at + 69]
    after = at + 70
    if size >= 0x80:
        high = data[after] if after < limit else 0x80
        if high >= 0x80:
            return None
        size = (size & 0x7F) | high << 7
        after += 1
    if after != at + 2 + data[at + 1]:  # the digest's length agrees with the size's
        return None
    if after == limit:
        executable = False
    elif after + 2 == limit and data[after : limit] == b" \x01":
        executable = True
    else:
        return None
    try:
        return data[start:at].decode(), data[at + 4 : at + 68].decode(), size, executable
    except UnicodeDecodeError:
        return None


_DIGEST_HEADS = frozenset({b"\x12D\n@", b"\x12E\n@"})


# Each entry is one level below the Directory: its fields may nest MAX_DEPTH - 1 more levels.
_ENTRY_DEPTH = MAX_DEPTH - 1
# How protobuf reads an entry (measured on it): its tags and strings may run past the entry's
# end into the bytes after it (a string is then still checked for UTF-8, and the Directory is
# corrupt); its submessages may not. So tags and strings are read up to the end of the data,
# and the entry must end exactly at its limit.


def _file_node(data: bytes, pos: int, limit: int) -> FileEntry:
    """FileNode{name=1, digest=2, is_executable=4, node_properties=6}."""
    name = hash_ = ""
    size = 0
    executable = False
    end = len(data)
    while pos < limit:
        tag = data[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_tag(data, pos, end)
        if tag == 0x0A:
            length, pos = read_length(data, pos, end)
            name = read_string(data, pos, pos + length)
            pos += length
        elif tag == 0x12 or tag == 0x32:
            length, pos = read_length(data, pos, limit)
            stop = pos + length
            if tag == 0x12:
                hash_, size = _digest(data, pos, stop, hash_, size)
            else:
                check_message(data, pos, stop, _NODE_PROPERTIES, _ENTRY_DEPTH - 1)
            pos = stop
        elif tag == 0x20:
            value, pos = read_value(data, pos, end)
            executable = value != 0
        else:
            pos = skip_unknown(data, pos, limit, tag, _ENTRY_DEPTH)
    expect_end(pos, limit)
    return name, hash_, size, executable


def _digest(data: bytes, pos: int, limit: int, hash_: str, size: int) -> tuple[str, int]:
    """Digest{hash=1, size_bytes=2} merged into ``hash_`` and ``size``, as protobuf merges a
    message field given more than once."""
    end = len(data)
    while pos < limit:
        tag, pos = read_tag(data, pos, end)
        if tag == 0x0A:
            length, pos = read_length(data, pos, end)
            hash_ = read_string(data, pos, pos + length)
            pos += length
        elif tag == 0x10:
            size, pos = read_value(data, pos, end)
            if size >= _INT64:
                size -= 1 << 64  # int64: two's complement
        else:
            pos = skip_unknown(data, pos, limit, tag, _ENTRY_DEPTH - 1)
    expect_end(pos, limit)
    return hash_, size


def _directory_node(data: bytes, pos: int, limit: int) -> tuple[str, str, int]:
    """DirectoryNode{name=1, digest=2}."""
    name = hash_ = ""
    size = 0
    end = len(data)
    while pos < limit:
        tag, pos = read_tag(data, pos, end)
        if tag == 0x0A:
            length, pos = read_length(data, pos, end)
            name = read_string(data, pos, pos + length)
            pos += length
        elif tag == 0x12:
            length, pos = read_length(data, pos, limit)
            hash_, size = _digest(data, pos, pos + length, hash_, size)
            pos += length
        else:
            pos = skip_unknown(data, pos, limit, tag, _ENTRY_DEPTH)
    expect_end(pos, limit)
    return name, hash_, size


def _symlink_node(data: bytes, pos: int, limit: int) -> tuple[str, str]:
    """SymlinkNode{name=1, target=2, node_properties=4}."""
    name = target = ""
    end = len(data)
    while pos < limit:
        tag, pos = read_tag(data, pos, end)
        if tag == 0x0A or tag == 0x12:
            length, pos = read_length(data, pos, end)
            text = read_string(data, pos, pos + length)
            pos += length
            if tag == 0x0A:
                name = text
            else:
                target = text
        elif tag == 0x22:
            length, pos = read_length(data, pos, limit)
            check_message(data, pos, pos + length, _NODE_PROPERTIES, _ENTRY_DEPTH - 1)
            pos += length
        else:
            pos = skip_unknown(data, pos, limit, tag, _ENTRY_DEPTH)
    expect_end(pos, limit)
    return name, target
