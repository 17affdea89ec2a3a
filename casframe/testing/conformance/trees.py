"""The tree engine over the backend: import, checkout, diff, lookups and hostile trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from casframe import (
    Capability,
    Digest,
    InvalidNameError,
    Store,
    UnsafeTreeError,
    UnsupportedFileTypeError,
    UnsupportedOperationError,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)
from casframe.testing import (
    LARGE_FILE_SIZE,
    TREE_EXECUTABLES,
    TREE_FILES,
    TREE_LARGE_FILE,
    TREE_SYMLINKS,
    assert_tree_equal,
    describe_tree,
)
from casframe.testing.conformance.base import (
    ConformanceBase,
    MakeTree,
    digest_of,
    digest_of_stream,
    empty_of,
)
from casframe.tree import missing_in_tree


def _hostile_directory(store: Store, case: str) -> Digest:
    """Store a Directory that must never be checked out, and return its digest."""
    content = store.put_bytes(b"escaped!\n").to_proto()
    inner = store.put_directory(
        Directory(files=[FileNode(name="escaped.txt", digest=content)])
    ).to_proto()

    def file(name: str) -> FileNode:
        return FileNode(name=name, digest=content)

    def folder(name: str) -> DirectoryNode:
        return DirectoryNode(name=name, digest=inner)

    def link(name: str) -> SymlinkNode:
        return SymlinkNode(name=name, target="/tmp")

    directory = {
        "file-dotdot": Directory(files=[file("..")]),
        "file-dot": Directory(files=[file(".")]),
        "file-slash": Directory(files=[file("a/b")]),
        "file-absolute": Directory(files=[file("/casframe-escape")]),
        "file-parent-path": Directory(files=[file("../escape")]),
        "file-empty": Directory(files=[file("")]),
        "file-nul": Directory(files=[file("x\x00")]),
        "dir-dotdot": Directory(directories=[folder("..")]),
        "dir-parent-path": Directory(directories=[folder("../../escape")]),
        "dir-empty": Directory(directories=[folder("")]),
        "link-dotdot": Directory(symlinks=[link("..")]),
        "link-parent-path": Directory(symlinks=[link("../link")]),
        "duplicate-files": Directory(files=[file("x"), file("x")]),
        "duplicate-file-and-dir": Directory(files=[file("x")], directories=[folder("x")]),
        "duplicate-dir-and-link": Directory(directories=[folder("x")], symlinks=[link("x")]),
        "duplicate-file-and-link": Directory(files=[file("x")], symlinks=[link("x")]),
        "link-target-empty": Directory(
            files=[file("a")], symlinks=[SymlinkNode(name="b", target="")]
        ),
        "link-target-nul": Directory(
            files=[file("a")], symlinks=[SymlinkNode(name="b", target="x\x00y")]
        ),
    }
    if case.startswith("nested-"):
        bad = store.put_bytes(directory[case.removeprefix("nested-")].SerializeToString())
        good = Directory(
            files=[file("fine.txt")],
            directories=[DirectoryNode(name="sub", digest=bad.to_proto())],
        )
        return store.put_directory(good)
    return store.put_bytes(directory[case].SerializeToString())


HOSTILE_CASES = [
    "file-dotdot",
    "file-dot",
    "file-slash",
    "file-absolute",
    "file-parent-path",
    "file-empty",
    "file-nul",
    "dir-dotdot",
    "dir-parent-path",
    "dir-empty",
    "link-dotdot",
    "link-parent-path",
    "duplicate-files",
    "duplicate-file-and-dir",
    "duplicate-dir-and-link",
    "duplicate-file-and-link",
    "link-target-empty",
    "link-target-nul",
    "nested-dir-dotdot",
    "nested-file-absolute",
]


def _walk_paths(store: Store, tree: Digest | str) -> dict[str, tuple[str, bool, str]]:
    return {e.path: (e.kind, e.is_executable, e.target) for e in store.walk(tree)}


class TreeConformance(ConformanceBase):
    """The tree engine over the backend: import, checkout, diff, lookups, hostile trees."""

    @pytest.mark.parametrize("link", [None, False, True], ids=["link-auto", "copy", "hardlink"])
    def test_import_and_checkout_round_trip(
        self, store: Store, make_tree: MakeTree, tmp_path: Path, link: bool | None
    ) -> None:
        source = make_tree("source")
        root = store.import_directory(source)
        dest = tmp_path / "checkout"
        if link and self.lacks(store, Capability.LOCAL_PATH):
            with pytest.raises(UnsupportedOperationError, match="hardlink"):
                store.checkout(root, dest, link=True)
            assert not dest.exists()
            return
        store.checkout(root, dest, link=link)
        assert_tree_equal(source, dest)
        # What was checked out imports back to the very same tree.
        assert store.import_directory(dest) == root

    def test_large_file_round_trip(
        self, store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        source = make_tree("source", large=True)
        root = store.import_directory(source)
        entry = {e.path: e for e in store.walk(root)}[TREE_LARGE_FILE]
        assert entry.digest is not None and entry.digest.size == LARGE_FILE_SIZE
        store.checkout(root, tmp_path / "checkout")
        assert_tree_equal(source, tmp_path / "checkout")

    def test_import_is_deterministic(
        self, store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        first = store.import_directory(make_tree("one"))
        assert store.import_directory(tmp_path / "one") == first
        assert store.import_directory(make_tree("two")) == first, "the path is not content"
        assert missing_in_tree(store.verified, first) == set()
        store.set_ref("tree", first)

    def test_import_stores_symlinks_as_they_are(self, store: Store, make_tree: MakeTree) -> None:
        root = store.import_directory(make_tree())
        entries = _walk_paths(store, root)
        for path, target in TREE_SYMLINKS.items():
            assert entries[path] == ("symlink", False, target)
        for path in TREE_EXECUTABLES:
            assert entries[path] == ("file", True, "")
        assert entries["empty"] == ("directory", False, "")
        assert store.subdir(root, "empty") == empty_of(store)

    def test_diff(self, store: Store, make_tree: MakeTree) -> None:
        source = make_tree("source")
        before = store.import_directory(source)
        (source / "README.txt").unlink()
        (source / "NEW.txt").write_bytes(b"new\n")
        (source / "src/pkg/module.py").write_bytes(b"def answer():\n    return 43\n")
        (source / "src/pkg/data/blob.bin").chmod(0o755)  # only the executable bit changes
        (source / "links/relative").unlink()
        (source / "links/relative").symlink_to("../NEW.txt")
        (source / "newdir/inner").mkdir(parents=True)
        (source / "newdir/inner/x.txt").write_bytes(b"x\n")
        (source / "new-empty").mkdir()
        for path in sorted((source / "deep").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (source / "deep").rmdir()
        after = store.import_directory(source)

        diff = store.diff(before, after)
        assert diff.added == ["NEW.txt", "new-empty/", "newdir/inner/x.txt"]
        assert diff.removed == ["README.txt", "deep/a/b/c/d/leaf.txt"]
        assert diff.modified == ["links/relative", "src/pkg/data/blob.bin", "src/pkg/module.py"]
        assert diff
        reverse = store.diff(after, before)
        assert (reverse.added, reverse.removed) == (diff.removed, diff.added)
        assert not store.diff(after, after)

        in_subdir = store.diff(before, after, subdir="src/pkg")
        assert (in_subdir.added, in_subdir.removed) == ([], [])
        assert in_subdir.modified == ["data/blob.bin", "module.py"]

    def test_subdir_lookup(self, store: Store, make_tree: MakeTree) -> None:
        source = make_tree()
        root = store.import_directory(source)
        pkg = store.subdir(root, "src/pkg")
        assert pkg == store.import_directory(source / "src/pkg")
        assert store.subdir(root, "/src/pkg/") == pkg
        assert store.subdir(root, "") == root
        with pytest.raises(FileNotFoundError, match="src/nope"):
            store.subdir(root, "src/nope")
        with pytest.raises(FileNotFoundError):
            store.subdir(root, "README.txt")  # a file is not a directory
        with pytest.raises(InvalidNameError):
            store.subdir(root, "src/../etc")

    def test_ls(self, store: Store, make_tree: MakeTree) -> None:
        root = store.import_directory(make_tree())
        listing = {e.path: e for e in store.ls(root, "src/pkg")}
        assert sorted(listing) == ["__init__.py", "data", "empty-too", "module.py"]
        assert listing["module.py"].kind == "file"
        assert listing["module.py"].digest == digest_of(store, TREE_FILES["src/pkg/module.py"])
        assert listing["data"].kind == "directory"
        assert listing["__init__.py"].digest == empty_of(store)
        top = [e.path for e in store.ls(root)]
        assert top == sorted(top)
        assert {"README.txt", "bin", "links", "empty"} <= set(top)

    def test_walk(self, store: Store, make_tree: MakeTree) -> None:
        source = make_tree()
        root = store.import_directory(source)
        walked = list(store.walk(root))
        paths = [e.path for e in walked]
        on_disk = describe_tree(source)
        assert sorted(paths) == sorted(on_disk)
        kinds = {"file": "file", "directory": "dir", "symlink": "symlink"}
        for entry in walked:
            kind, detail, executable = on_disk[entry.path]
            assert kinds[entry.kind] == kind, entry.path
            if entry.kind == "file":
                assert entry.digest == digest_of(store, (source / entry.path).read_bytes())
                assert entry.is_executable == executable, entry.path
            if entry.kind == "symlink":
                assert entry.target == detail
        for index, path in enumerate(paths):  # parents come before their children
            parent = path.rpartition("/")[0]
            assert not parent or paths.index(parent) < index
        assert [e.path for e in store.walk(root, "src")] == [
            p.removeprefix("src/") for p in paths if p.startswith("src/")
        ]

    def test_open_file_by_path(self, store: Store, make_tree: MakeTree) -> None:
        root = store.import_directory(make_tree(large=True))
        with store.open_file(root, "src/pkg/module.py") as f:
            assert f.read() == TREE_FILES["src/pkg/module.py"]
        with store.open_file(root, "src/pkg/__init__.py") as f:
            assert f.read() == b""
        with store.open_file(root, TREE_LARGE_FILE) as f:
            assert digest_of_stream(store, f).size == LARGE_FILE_SIZE
        with pytest.raises(FileNotFoundError, match="src/pkg/nope.py"):
            store.open_file(root, "src/pkg/nope.py")
        with pytest.raises(IsADirectoryError):
            store.open_file(root, "src/pkg")
        with pytest.raises(IsADirectoryError):
            store.open_file(root, "links/relative")  # a symlink is not a file to open

    def test_import_refuses_a_fifo_naming_it(
        self, store: Store, make_tree: MakeTree
    ) -> None:
        source = make_tree()
        fifo = source / "src" / "pipe"
        os.mkfifo(fifo)
        with pytest.raises(UnsupportedFileTypeError, match="fifo") as caught:
            store.import_directory(source)
        assert str(fifo) in str(caught.value)

    @pytest.mark.parametrize("case", HOSTILE_CASES)
    def test_checkout_refuses_a_hostile_tree(
        self, store: Store, tmp_path: Path, case: str
    ) -> None:
        hostile = _hostile_directory(store, case)
        work = tmp_path / "work"
        dest = work / "a" / "dest"
        dest.parent.mkdir(parents=True)
        before = describe_tree(tmp_path)
        with pytest.raises(UnsafeTreeError):
            store.checkout(hostile, dest, link=False)
        assert describe_tree(tmp_path) == before, "checkout wrote something"
        assert not os.path.lexists("/casframe-escape")

    def test_checkout_refuses_a_non_empty_destination(
        self, store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        root = store.import_directory(make_tree())
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "precious.txt").write_bytes(b"keep")
        with pytest.raises(FileExistsError):
            store.checkout(root, dest)
        assert sorted(os.listdir(dest)) == ["precious.txt"]
        assert (dest / "precious.txt").read_bytes() == b"keep"
        not_a_dir = tmp_path / "file"
        not_a_dir.write_bytes(b"")
        with pytest.raises(FileExistsError):
            store.checkout(root, not_a_dir)
        empty = tmp_path / "empty-dest"
        empty.mkdir()
        store.checkout(root, empty)  # an existing empty directory is fine

    def test_checkout_by_ref_name(
        self, store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        source = make_tree()
        store.set_ref("project/build", store.import_directory(source))
        store.checkout("project/build", tmp_path / "out")
        assert_tree_equal(source, tmp_path / "out")
