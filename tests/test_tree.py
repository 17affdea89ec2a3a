"""The tree engine beyond the conformance suite: canonical Directories, file types, names,
walk order, diff corner cases, many files, damaged trees and progress reporting."""

from __future__ import annotations

import os
import random
import socket
import stat
import threading
from pathlib import Path

import pytest

from casframe import (
    DIGEST_FUNCTIONS,
    EMPTY_DIGEST,
    BlobNotFoundError,
    CorruptBlobError,
    Digest,
    InvalidNameError,
    Progress,
    Store,
    UnsupportedFileTypeError,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Digest as DigestProto,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)
from casframe.directory import directory_entry, file_entry, symlink_entry
from casframe.names import entry_names_are_safe, validate_entry_name
from casframe.testing import TREE_FILES, assert_tree_equal

STORES = ["memory_store", "local_store"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue(request.param)


def test_directories_are_canonical(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    names = ["b", "a", "C", "_", "\u00e9", "a.b", "a-b", "A"]
    for name in names:
        (root / f"f{name}").write_bytes(name.encode())
        (root / f"d{name}").mkdir()
        (root / f"l{name}").symlink_to(name)
    digest = store.import_directory(root)
    data = store.read_bytes(digest)
    directory = Directory()
    directory.ParseFromString(data)
    for group in (directory.files, directory.directories, directory.symlinks):
        listed = [node.name for node in group]
        assert listed == sorted(listed), "sorted by code point (= UTF-8 byte order)"
        assert len(listed) == len(names)
    assert directory.SerializeToString(deterministic=True) == data


def test_import_encodes_directories_exactly_as_protobuf_does() -> None:
    """Import writes Directory bytes itself; they must be protobuf's deterministic ones.

    Names and targets of every length class (a one-byte and a two-byte length), sizes of
    every varint length from the omitted 0 up to 2**62, executable or not, non-ASCII text,
    hashes of every digest function (64, 96 and 128 hex digits).
    """
    functions = list(DIGEST_FUNCTIONS.values())
    rng = random.Random(7)
    alphabet = "ab.-_\u00e9\u4e2d\U0001f600"
    sizes = [0, 1, 127, 128, 16383, 16384, 2**31, 2**32 + 5, 2**62]

    def text(longest: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, longest)))

    def digest() -> tuple[str, int]:
        size = rng.choice(sizes)  # only the empty blob has size 0
        function = rng.choice(functions)
        return (Digest.of_bytes(rng.randbytes(8 if size else 0), function)[0], size)

    for _ in range(200):
        files = {text(200): (*digest(), rng.random() < 0.3) for _ in range(rng.randint(0, 6))}
        dirs = {text(200): digest() for _ in range(rng.randint(0, 4))}
        links = {text(200): text(300) for _ in range(rng.randint(0, 4))}
        expected = Directory(
            files=[FileNode(name=n, digest=DigestProto(hash=h, size_bytes=z), is_executable=x)
                   for n, (h, z, x) in sorted(files.items())],
            directories=[DirectoryNode(name=n, digest=DigestProto(hash=h, size_bytes=z))
                         for n, (h, z) in sorted(dirs.items())],
            symlinks=[SymlinkNode(name=n, target=t) for n, t in sorted(links.items())],
        ).SerializeToString(deterministic=True)
        encoded = b"".join(
            [file_entry(n.encode(), Digest(h, z), x) for n, (h, z, x) in sorted(files.items())]
            + [directory_entry(n.encode(), Digest(h, z)) for n, (h, z) in sorted(dirs.items())]
            + [symlink_entry(n.encode(), t.encode()) for n, t in sorted(links.items())]
        )
        assert encoded == expected


def test_symlink_to_a_directory_is_not_followed(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "real").mkdir(parents=True)
    (root / "real" / "inside.txt").write_bytes(b"inside")
    (root / "alias").symlink_to("real")
    (root / "outside").symlink_to(tmp_path)  # would loop if followed
    tree = store.import_directory(root)
    paths = {e.path: e.kind for e in store.walk(tree)}
    assert paths == {
        "alias": "symlink",
        "outside": "symlink",
        "real": "directory",
        "real/inside.txt": "file",
    }


def test_import_of_something_else_than_a_directory(store: Store, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        store.import_directory(tmp_path / "file")
    with pytest.raises(OSError):
        store.import_directory(tmp_path / "absent")


def test_import_refuses_a_socket_naming_it(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "src"
    (root / "run").mkdir(parents=True)
    (root / "ok.txt").write_bytes(b"ok")
    monkeypatch.chdir(root / "run")  # a relative name keeps under the socket path limit
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("control.sock")
        with pytest.raises(UnsupportedFileTypeError, match="socket") as caught:
            store.import_directory(root)
    assert str(root / "run" / "control.sock") in str(caught.value)


def test_import_refuses_a_name_that_is_not_utf8(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    bad = os.fsdecode(b"caf\xe9.txt")  # Latin-1, not UTF-8
    (root / bad).write_bytes(b"x")
    with pytest.raises(InvalidNameError, match="UTF-8"):
        store.import_directory(root)


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_import_refuses_a_name_with_a_backslash_naming_it(
    store: Store, tmp_path: Path, kind: str
) -> None:
    """Checkout refuses such a name, so the import must not store a tree it cannot give back."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "fine.txt").write_bytes(b"x")
    bad = root / "sub" / "a\\b"
    if kind == "file":
        bad.write_bytes(b"x")
    elif kind == "directory":
        bad.mkdir()
    else:
        bad.symlink_to("fine.txt")
    with pytest.raises(InvalidNameError, match="backslash") as caught:
        store.import_directory(root)
    assert repr(str(bad)) in str(caught.value)


def test_walk_is_depth_first_in_name_order(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "src"
    for rel in ("b/z.txt", "b/a/1.txt", "a.txt", "c/x.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    tree = store.import_directory(root)
    assert [e.path for e in store.walk(tree)] == [
        "a.txt", "b", "b/a", "b/a/1.txt", "b/z.txt", "c", "c/x.txt",
    ]
    assert [e.path for e in store.walk(tree, "b")] == ["a", "a/1.txt", "z.txt"]
    assert [e.path for e in store.ls(tree, "./b/.")] == ["a", "z.txt"]


def test_diff_reports_kind_changes_as_removed_and_added(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "x").write_bytes(b"file")
    (root / "l").symlink_to("x")
    (root / "gone").mkdir()
    before = store.import_directory(root)
    (root / "x").unlink()
    (root / "x").mkdir()
    (root / "x" / "f").write_bytes(b"now inside a directory")
    (root / "l").unlink()
    (root / "l").write_bytes(b"a file now")
    (root / "gone").rmdir()
    after = store.import_directory(root)
    diff = store.diff(before, after)
    assert diff.removed == ["gone/", "l", "x"]
    assert diff.added == ["l", "x/f"]
    assert diff.modified == []


def test_diff_of_a_missing_subdir(store: Store, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    tree = store.import_directory(tmp_path / "src")
    with pytest.raises(FileNotFoundError):
        store.diff(tree, tree, subdir="nope")


def test_many_files_across_many_directories(store: Store, tmp_path: Path) -> None:
    """More files than one import batch holds, with duplicates spread over the batches."""
    root = tmp_path / "src"
    for d in range(20):
        folder = root / f"dir{d:02}"
        folder.mkdir(parents=True)
        for f in range(20):
            (folder / f"file{f:02}.txt").write_bytes(b"content %d\n" % ((d * 20 + f) % 300))
        if d % 3 == 0:
            (folder / "tool").write_bytes(b"#!/bin/sh\n")
            (folder / "tool").chmod(0o755)
    tree = store.import_directory(root)
    entries = {e.path: e for e in store.walk(tree)}
    assert entries["dir07/file13.txt"].digest == Digest.of_bytes(b"content %d\n" % (7 * 20 + 13))
    assert entries["dir03/tool"].is_executable and not entries["dir03/file00.txt"].is_executable
    out = tmp_path / "out"
    store.checkout(tree, out)
    assert_tree_equal(root, out)
    assert store.import_directory(out) == tree


def test_checkout_does_not_follow_a_symlinked_destination(
    store: Store, tmp_path: Path, make_tree
) -> None:
    tree = store.import_directory(make_tree())
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "dest").symlink_to(target)
    with pytest.raises(FileExistsError):
        store.checkout(tree, tmp_path / "dest")
    assert os.listdir(target) == []


def test_checkout_with_a_missing_file_blob(store: Store, tmp_path: Path) -> None:
    absent = Digest.of_bytes(b"never stored")
    tree = store.put_directory(Directory(files=[FileNode(name="f", digest=absent.to_proto())]))
    with pytest.raises(BlobNotFoundError) as caught:
        store.checkout(tree, tmp_path / "out", link=False)
    assert absent in caught.value.digests


def test_a_damaged_directory_blob_is_corruption(store: Store, tmp_path: Path) -> None:
    garbage = store.put_bytes(b"\xff\xff\xff")
    root = store.put_directory(
        Directory(directories=[DirectoryNode(name="sub", digest=garbage.to_proto())])
    )
    with pytest.raises(CorruptBlobError, match="Directory"):
        store.ls(garbage)
    with pytest.raises(CorruptBlobError):
        store.checkout(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_empty_tree(store: Store, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert store.import_directory(tmp_path / "empty") == EMPTY_DIGEST
    assert store.ls(EMPTY_DIGEST) == []
    assert list(store.walk(EMPTY_DIGEST)) == []
    store.checkout(EMPTY_DIGEST, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []
    assert list(store.tree_digests(EMPTY_DIGEST)) == [EMPTY_DIGEST]


def test_tree_digests_lists_each_digest_once(store: Store, make_tree) -> None:
    tree = store.import_directory(make_tree())
    digests = list(store.tree_digests(tree))
    assert len(digests) == len(set(digests))
    assert digests[0] == tree
    files = {Digest.of_bytes(content) for content in TREE_FILES.values()}
    assert files <= set(digests)


class RecordingProgress(Progress):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, object]] = []

    def start(self, task: str, total: int | None = None, unit: str = "files") -> None:
        with self.lock:
            self.events.append(("start", (task, total)))

    def advance(self, amount: int = 1) -> None:
        with self.lock:
            self.events.append(("advance", amount))

    def finish(self) -> None:
        with self.lock:
            self.events.append(("finish", None))

    def advanced(self) -> int:
        return sum(a for kind, a in self.events if kind == "advance")  # type: ignore[misc]


@pytest.mark.parametrize("link", [None, False])
def test_progress_counts_every_file(
    store: Store, make_tree, tmp_path: Path, link: bool | None
) -> None:
    source = make_tree(large=True)
    files = sum(1 for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    progress = RecordingProgress()
    tree = store.import_directory(source, progress=progress)
    assert progress.events[0][0] == "start" and progress.events[0][1][0] == "import"
    assert progress.events[-1] == ("finish", None)
    assert progress.advanced() == files

    progress = RecordingProgress()
    store.checkout(tree, tmp_path / "out", link=link, progress=progress)
    assert progress.events[0] == ("start", ("checkout", files))
    assert progress.events[-1] == ("finish", None)
    assert progress.advanced() == files


def test_executable_bit_follows_the_owner(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for name, mode in (("owner", 0o744), ("group-only", 0o654), ("none", 0o644)):
        (root / name).write_bytes(name.encode())
        (root / name).chmod(mode)
    tree = store.import_directory(root)
    executable = {e.path: e.is_executable for e in store.walk(tree)}
    assert executable == {"group-only": False, "none": False, "owner": True}
    store.checkout(tree, tmp_path / "out", link=False)
    assert (tmp_path / "out" / "owner").stat().st_mode & stat.S_IXUSR
    assert not (tmp_path / "out" / "none").stat().st_mode & stat.S_IXUSR


@pytest.mark.parametrize(
    "names",
    [
        ["a", "b"], [], ["x"], ["a/b"], ["a", ""], ["."], ["..", "a"], ["nul\x00"], ["back\\slash"],
        ["a", "b/"], ["...", "..a", "a.."], ["\u00e9", "line\nbreak"],
    ],
    ids=repr,
)
def test_names_are_checked_all_at_once_as_one_by_one(names: list[str]) -> None:
    def one_by_one() -> bool:
        try:
            for name in names:
                validate_entry_name(name)
        except InvalidNameError:
            return False
        return True

    assert entry_names_are_safe(names) == one_by_one()
