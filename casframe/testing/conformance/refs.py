"""Refs: names, set, get, delete and list (as the backend declares them), LRU order, copies,
completeness and names that would shadow one another."""

from __future__ import annotations

import time

import pytest

from casframe import (
    BlobNotFoundError,
    Digest,
    InvalidNameError,
    RefCapability,
    RefConflictError,
    RefNotFoundError,
    Store,
    UnsupportedOperationError,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
)
from casframe.testing.conformance.base import ConformanceBase, digest_of, empty_of
from casframe.tree import missing_in_tree


def _small_tree(store: Store, label: str = "a") -> Digest:
    """Store a one-file tree (file ``f`` holding ``label``) and return its root digest."""
    content = f"content of {label}".encode()
    file_digest = store.put_bytes(content)
    root = Directory(files=[FileNode(name="f", digest=file_digest.to_proto())])
    return store.put_directory(root)


INVALID_REF_NAMES = [
    "", "/a", "a/", "a//b", "a/../b", ".", "..", "a/./b", "nul\x00byte", "/",
    # A segment over 255 bytes (UTF-8), named short in test ids.
    pytest.param("x" * 256, id="'x'*256"),
    pytest.param("team/" + "\u00e9" * 128, id="'team/'+'\u00e9'*128"),
]


class RefConformance(ConformanceBase):
    """Refs: names, set/get/delete/list, LRU order, copy, completeness check."""

    def test_set_get_ref(self, store: Store) -> None:
        tree = _small_tree(store)
        store.set_ref("main", tree)
        assert store.get_ref("main") == tree
        assert store.has_ref("main")
        assert store.resolve("main") == tree
        assert store.resolve(str(tree)) == tree

    def test_set_ref_replaces_the_target(self, store: Store) -> None:
        first, second = _small_tree(store, "one"), _small_tree(store, "two")
        store.set_ref("main", first)
        store.set_ref("main", second)
        assert store.get_ref("main") == second
        if not self.lacks(store, RefCapability.LIST):
            assert [r.name for r in store.list_refs()] == ["main"]

    def test_ref_names_may_contain_slashes(self, store: Store) -> None:
        tree = _small_tree(store)
        names = ["project/element/key", "project/element/other", "x/y/z/w/v"]
        for name in names:
            store.set_ref(name, tree)
        for name in names:
            assert store.get_ref(name) == tree
        if not self.lacks(store, RefCapability.LIST):
            assert sorted(r.name for r in store.list_refs()) == sorted(names)
        assert not store.has_ref("project")
        assert not store.has_ref("project/element")

    def test_list_refs_with_prefix(self, store: Store) -> None:
        tree = _small_tree(store)
        for name in ("proj/a", "proj/b/c", "project-x", "other/a"):
            store.set_ref(name, tree)
        if self.lacks(store, RefCapability.LIST):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.list_refs("proj/")
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                list(store.refs.list_refs("proj/"))
            return
        assert sorted(r.name for r in store.list_refs("proj/")) == ["proj/a", "proj/b/c"]
        assert sorted(r.name for r in store.list_refs("proj")) == [
            "proj/a",
            "proj/b/c",
            "project-x",
        ]
        assert [r.name for r in store.list_refs("nothing")] == []
        infos = store.list_refs("other/")
        assert len(infos) == 1 and infos[0].digest == tree
        assert abs(infos[0].accessed - time.time()) < 600, "seconds since the epoch"

    @pytest.mark.parametrize("name", INVALID_REF_NAMES, ids=repr)
    def test_invalid_ref_names_are_refused(self, store: Store, name: str) -> None:
        tree = _small_tree(store)
        store.set_ref("good", tree)
        with pytest.raises(InvalidNameError, match="invalid ref name"):
            store.set_ref(name, tree)
        with pytest.raises(InvalidNameError):
            store.get_ref(name)
        with pytest.raises(InvalidNameError):
            store.delete_ref(name)
        with pytest.raises(InvalidNameError):
            store.copy_ref("good", name)
        if not self.lacks(store, RefCapability.LIST):
            assert [r.name for r in store.list_refs()] == ["good"]

    def test_get_ref_refreshes_access_time_for_lru_order(self, store: Store) -> None:
        tree = _small_tree(store)
        if self.lacks(store, RefCapability.LIST):  # the order shows only in a listing
            store.set_ref("first", tree)
            assert store.get_ref("first") == store.get_ref("first", touch=False) == tree
            return
        for name in ("first", "second", "third"):
            store.set_ref(name, tree)
            time.sleep(0.02)
        assert [r.name for r in store.list_refs()] == ["first", "second", "third"]
        store.get_ref("first")
        time.sleep(0.02)
        store.get_ref("second", touch=False)  # looking without touching keeps the order
        assert [r.name for r in store.list_refs()] == ["second", "third", "first"]
        time.sleep(0.02)
        store.resolve("second")  # resolving a ref to use it is an access
        assert [r.name for r in store.list_refs()][-1] == "second"

    def test_delete_ref(self, store: Store) -> None:
        tree = _small_tree(store)
        store.set_ref("a/b", tree)
        store.set_ref("keep", tree)
        if self.lacks(store, RefCapability.DELETE):
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.delete_ref("a/b")
            with pytest.raises(UnsupportedOperationError, match=r"\w"):
                store.refs.delete_ref("a/b")
            assert store.get_ref("a/b") == tree, "a refused delete deletes nothing"
            return
        store.delete_ref("a/b")
        assert not store.has_ref("a/b")
        assert store.get_ref("keep") == tree
        if not self.lacks(store, RefCapability.LIST):
            assert [r.name for r in store.list_refs()] == ["keep"]
        with pytest.raises(RefNotFoundError, match="a/b"):
            store.get_ref("a/b")
        with pytest.raises(RefNotFoundError, match="a/b"):
            store.delete_ref("a/b")
        # The tree itself stays: deleting a ref is not deleting content.
        assert missing_in_tree(store.verified, tree) == set()
        # Once "a/b" is gone, "a" is a free name.
        store.set_ref("a", tree)
        assert store.get_ref("a") == tree

    def test_missing_ref_raises_ref_not_found(self, store: Store) -> None:
        with pytest.raises(RefNotFoundError, match="no/such/ref") as caught:
            store.get_ref("no/such/ref")
        assert caught.value.name == "no/such/ref"
        with pytest.raises(RefNotFoundError):
            store.resolve("no/such/ref")
        assert not store.has_ref("no/such/ref")

    def test_copy_ref(self, store: Store) -> None:
        tree = _small_tree(store)
        store.set_ref("release/1.0", tree)
        assert store.copy_ref("release/1.0", "release/latest") == tree
        assert store.get_ref("release/latest") == tree
        assert store.get_ref("release/1.0") == tree
        other = _small_tree(store, "b")
        store.set_ref("release/1.0", other)
        assert store.get_ref("release/latest") == tree, "a copy does not follow the original"
        with pytest.raises(RefNotFoundError):
            store.copy_ref("no/such", "anything")
        assert not store.has_ref("anything")

    def test_set_ref_refuses_a_tree_whose_blobs_are_missing(self, store: Store) -> None:
        file_content, inner_content = b"file stored late", b"inner file stored late"
        absent_file = digest_of(store, file_content)
        inner = Directory(
            files=[FileNode(name="g", digest=digest_of(store, inner_content).to_proto())]
        )
        inner_data = inner.SerializeToString(deterministic=True)
        absent_dir = digest_of(store, inner_data)
        root = Directory(
            files=[FileNode(name="f", digest=absent_file.to_proto())],
            directories=[DirectoryNode(name="d", digest=absent_dir.to_proto())],
        )
        incomplete = store.put_directory(root)
        with pytest.raises(BlobNotFoundError) as caught:
            store.set_ref("broken", incomplete)
        assert set(caught.value.digests) == {absent_file, absent_dir}
        assert not store.has_ref("broken")
        with pytest.raises(BlobNotFoundError):
            store.set_ref("broken", digest_of(store, b"no such root"))
        assert not store.has_ref("broken")
        # Children arriving one level at a time: each level's missing blobs are reported.
        store.put_bytes(file_content)
        store.put_bytes(inner_data)
        with pytest.raises(BlobNotFoundError) as caught:
            store.set_ref("broken", incomplete)
        assert caught.value.digests == (digest_of(store, inner_content),)
        store.put_bytes(inner_content)
        store.set_ref("complete", incomplete)
        assert store.get_ref("complete") == incomplete

    @pytest.mark.parametrize("name", ["ac", "asset", "ac/_/x", "asset/blob/k"])
    def test_the_server_namespaces_are_no_names_for_trees(self, store: Store, name: str) -> None:
        tree = _small_tree(store)
        store.set_ref("good", tree)
        with pytest.raises(InvalidNameError, match=f"ref name {name!r} is reserved"):
            store.set_ref(name, tree)
        with pytest.raises(InvalidNameError, match="is reserved"):
            store.copy_ref("good", name)
        if "/" not in name:  # not even one of the server's own refs
            with pytest.raises(InvalidNameError, match="is reserved"):
                store.set_ref(name, tree, check_complete=False)
        assert not store.has_ref(name)

    @pytest.mark.parametrize(
        ("first", "second"),
        [("a", "a/b"), ("a/b", "a"), ("x/y", "x/y/z/w"), ("x/y/z/w", "x/y"), ("x/y", "x")],
        ids=repr,
    )
    def test_a_ref_never_shadows_another(self, store: Store, first: str, second: str) -> None:
        """A name is a ref or a folder of refs, never both, whatever the backend can hold."""
        tree = _small_tree(store)
        store.set_ref(first, tree)
        attempts = (
            lambda: store.set_ref(second, tree),
            lambda: store.set_ref(second, tree, check_complete=False),
            lambda: store.copy_ref(first, second),
        )
        for attempt in attempts:
            with pytest.raises(RefConflictError) as caught:
                attempt()
            assert (caught.value.name, caught.value.existing) == (second, first)
            assert f"{second!r} conflicts with an existing ref" in str(caught.value)
            assert repr(first) in str(caught.value)
        assert not store.has_ref(second)
        assert store.get_ref(first) == tree
        store.set_ref(f"{first}-sibling", tree)  # a name that only starts alike is no folder

    def test_set_ref_accepts_the_empty_tree(self, store: Store) -> None:
        store.set_ref("empty", empty_of(store))
        assert store.get_ref("empty") == empty_of(store)
