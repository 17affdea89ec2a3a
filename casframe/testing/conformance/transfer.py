"""Transfers between the backend and another store, in both directions, interrupted ones
included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from casframe import (
    CorruptBlobError,
    Digest,
    RefCapability,
    Store,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    FileNode,
)
from casframe.digest import CHUNK_SIZE
from casframe.testing import (
    LARGE_FILE_SIZE,
    InjectedFailure,
    assert_tree_equal,
    failing_writes,
    random_bytes,
)
from casframe.testing.conformance.base import ConformanceBase, MakeTree, empty_of
from casframe.tree import iter_tree, missing_in_tree


def _dirs(store: Store, tree: Digest) -> Iterator[tuple[Digest, bytes, Directory]]:
    return iter_tree(store.verified, tree)


class TransferConformance(ConformanceBase):
    """Copying trees between the backend and ``second_store``, in both directions."""

    def test_push_a_ref(
        self, store: Store, second_store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        source = make_tree(large=True)
        root = store.import_directory(source)
        store.set_ref("project/main", root)
        result = store.push(second_store, "project/main")
        assert result.root == root and result.ref == "project/main"
        assert result.blobs_sent > 0 and result.bytes_sent > LARGE_FILE_SIZE
        assert second_store.get_ref("project/main") == root
        second_store.checkout("project/main", tmp_path / "there")
        assert_tree_equal(source, tmp_path / "there")

        again = store.push(second_store, "project/main")
        assert (again.blobs_sent, again.bytes_sent) == (0, 0)
        assert again.already_present

    def test_pull_a_ref(
        self, store: Store, second_store: Store, make_tree: MakeTree, tmp_path: Path
    ) -> None:
        source = make_tree(large=True)
        root = second_store.import_directory(source)
        second_store.set_ref("project/main", root)
        result = store.pull(second_store, "project/main", ref="mirror/main")
        assert result.ref == "mirror/main"
        assert store.get_ref("mirror/main") == root
        assert not store.has_ref("project/main")
        store.checkout("mirror/main", tmp_path / "here")
        assert_tree_equal(source, tmp_path / "here")
        assert store.pull(second_store, "project/main", ref="mirror/main").blobs_sent == 0

    def test_push_by_digest_sets_only_the_ref_asked_for(
        self, store: Store, second_store: Store, make_tree: MakeTree
    ) -> None:
        root = store.import_directory(make_tree())
        result = store.push(second_store, root)
        assert result.ref is None and second_store.list_refs() == []
        assert missing_in_tree(second_store.verified, root) == set()
        store.push(second_store, str(root), ref="by/digest")
        assert second_store.get_ref("by/digest") == root

    @pytest.mark.parametrize("fail_during", ["files", "directories"])
    @pytest.mark.parametrize("direction", ["push", "pull"])
    def test_interrupted_transfer_leaves_no_ref_and_resumes(
        self,
        store: Store,
        second_store: Store,
        make_tree: MakeTree,
        tmp_path: Path,
        direction: str,
        fail_during: str,
    ) -> None:
        source_store, dest_store = (
            (store, second_store) if direction == "push" else (second_store, store)
        )
        source = make_tree()
        root = source_store.import_directory(source)
        source_store.set_ref("project/main", root)
        needed = set(source_store.tree_digests(root)) - {empty_of(store)}
        directories = {d for d, _, _ in _dirs(source_store, root)} - {empty_of(store)}
        files = needed - directories
        after = 3 if fail_during == "files" else len(files) + 1

        with failing_writes(dest_store, after) as written:
            with pytest.raises(InjectedFailure):
                source_store.push(dest_store, "project/main")
        assert written == [after]
        assert not dest_store.has_ref("project/main"), "a ref to an incomplete tree"
        if not self.lacks(dest_store, RefCapability.LIST):
            assert dest_store.list_refs() == []
        present = needed - dest_store.find_missing(needed)
        assert len(present) == after
        for digest in present & directories:
            assert missing_in_tree(dest_store.verified, digest) == set(), (
                "a Directory before its children"
            )

        result = source_store.push(dest_store, "project/main")
        assert result.blobs_sent == len(needed) - after, "rerun sends only what is missing"
        assert dest_store.get_ref("project/main") == root
        dest_store.checkout("project/main", tmp_path / "out")
        assert_tree_equal(source, tmp_path / "out")

    @pytest.mark.parametrize("size", [100, 2 * CHUNK_SIZE + 5])
    def test_transfer_refuses_a_corrupt_source_blob(
        self, store: Store, second_store: Store, tmp_path: Path, size: int
    ) -> None:
        data = random_bytes(size, seed=11)
        file_digest = store.put_bytes(data)
        root = store.put_directory(
            Directory(files=[FileNode(name="f", digest=file_digest.to_proto())])
        )
        store.set_ref("project/main", root)
        self.corrupt_blob(store, file_digest, data[:-1] + bytes([data[-1] ^ 0xFF]))
        with pytest.raises(CorruptBlobError) as caught:
            store.push(second_store, "project/main")
        assert caught.value.digest == file_digest
        assert not second_store.has_ref("project/main")
        assert second_store.find_missing([file_digest, root]) == {file_digest, root}
