"""The one object-key layout of ``file://`` and ``s3://`` (casframe.layout), and that both
backends keep everything where it says, so that a store synced file by file is a store of the
other kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from casframe import Digest, InvalidDigestError, Store, layout
from casframe.testing.s3 import S3TestBucket

_DIGEST = Digest.of_bytes(b"a blob")


def test_a_blob_and_a_ref_have_one_name_each() -> None:
    assert layout.object_key(_DIGEST) == f"objects/{_DIGEST.hash[:2]}/{_DIGEST.hash[2:]}"
    assert layout.object_hash(layout.object_name(_DIGEST.hash)) == _DIGEST.hash
    assert layout.ref_key("team/app/main") == "refs/heads/team/app/main"
    assert layout.decode_ref(layout.encode_ref(_DIGEST), "main", "here") == _DIGEST


@pytest.mark.parametrize(
    "name",
    ["", "ab/", "ab", f"AB/{'c' * 62}", f"ab/{'c' * 61}", f"ab/{'c' * 63}", f"abc{'c' * 62}",
     f"ab/{'g' * 62}", f"ab/{'c' * 31}/{'c' * 30}"],
)
def test_names_that_are_no_object_are_strays(name: str) -> None:
    assert layout.object_hash(name) is None


def test_a_damaged_ref_is_named_with_what_to_do() -> None:
    with pytest.raises(InvalidDigestError) as caught:
        layout.decode_ref(b"\x00garbage", "team/main", "s3://bucket/store")
    message = str(caught.value)
    assert message.startswith("ref team/main in s3://bucket/store is damaged: ")
    assert message.endswith("; set it again or delete it")


def _fill(store: Store, make_tree: Any) -> tuple[set[str], set[str]]:
    """Import a tree, name it, and return the keys the layout gives its blobs and its ref."""
    root = store.import_directory(make_tree())
    store.set_ref("project/main", root)
    blobs = {layout.object_key(d) for d in store.tree_digests(root) if d.size}
    return blobs, {layout.ref_key("project/main")}


def test_a_file_store_holds_exactly_what_the_layout_names(
    local_store: Store, tmp_path: Path, make_tree: Any
) -> None:
    store_root = tmp_path / "store"  # where the local_store fixture keeps it
    blobs, refs = _fill(local_store, make_tree)
    files = {
        path.relative_to(store_root).as_posix()
        for path in store_root.rglob("*")
        if path.is_file() and not path.is_relative_to(store_root / layout.TMP)
    }
    assert files == blobs | refs


def test_an_s3_store_holds_exactly_what_the_layout_names(
    s3_mock: S3TestBucket, s3_store: Store, make_tree: Any
) -> None:
    blobs, refs = _fill(s3_store, make_tree)
    assert set(s3_mock.keys()) == {f"{s3_mock.prefix}/{key}" for key in blobs | refs}
