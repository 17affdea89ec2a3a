"""The digest functions: known vectors, names and REAPI numbers, digests of every length, and
stores opened with another function than SHA-256."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from casframe_cache.store import CacheBlobStore
from casframe_memory.store import MemoryBlobStore, MemoryRefStore

import casframe.statcache
from casframe import (
    DIGEST_FUNCTIONS,
    SHA256,
    BackendContractError,
    BackendRegistry,
    BlobStore,
    Digest,
    Hasher,
    InvalidDigestError,
    PermissionDeniedError,
    Store,
    StoreURL,
    UnsupportedDigestFunctionError,
    open_store,
)
from casframe._messages import execution
from casframe.digestfunctions import BLAKE3, SHA384, SHA512, by_name, by_reapi_value
from casframe.plugins import PluginManager
from casframe.readonly import read_only_view
from casframe.testing import describe_tree
from casframe.testing.conformance.base import empty_of

# Published test vectors: FIPS 180-2 ("abc"), and the BLAKE3 reference vectors (input bytes
# i % 251; lengths 0, 1 and 1024).
_ABC = {
    "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    "sha384": "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed"
    "8086072ba1e7cc2358baeca134c825a7",
    "sha512": "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
    "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
    "blake3": "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85",
}
_BLAKE3_VECTORS = {
    0: "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    1: "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213",
    1024: "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7",
}


@pytest.mark.parametrize("name", sorted(_ABC))
def test_every_function_hashes_known_vectors_in_one_call_and_in_pieces(name: str) -> None:
    function = by_name(name)
    assert Digest.of_bytes(b"abc", function) == Digest(_ABC[name], 3)
    hasher = Hasher(function)
    for piece in (b"a", b"", b"bc"):
        hasher.update(piece)
    assert hasher.digest() == Digest(_ABC[name], 3)
    assert Digest.of_stream(io.BytesIO(b"abc"), function) == Digest(_ABC[name], 3)
    assert len(_ABC[name]) == function.hex_length


@pytest.mark.parametrize("length", sorted(_BLAKE3_VECTORS))
def test_blake3_matches_the_reference_vectors(length: int) -> None:
    data = bytes(i % 251 for i in range(length))
    assert Digest.of_bytes(data, BLAKE3).hash == _BLAKE3_VECTORS[length]


def test_large_blake3_input_hashes_the_same_on_several_threads() -> None:
    # From 1 MiB on, one call hashes on several threads; the result must not change.
    data = bytes(i % 251 for i in range(3 << 20))
    hasher = Hasher(BLAKE3)
    for start in range(0, len(data), 1000):
        hasher.update(data[start : start + 1000])
    assert Digest.of_bytes(data, BLAKE3) == hasher.digest()


@pytest.mark.parametrize("function", list(DIGEST_FUNCTIONS.values()), ids=str)
def test_each_empty_hash_is_the_hash_of_nothing_and_the_only_one_of_size_0(function) -> None:
    assert function.hash_hex(b"") == function.empty_hash
    assert Digest.empty(function) == Digest(function.empty_hash, 0)
    other = "1" * function.hex_length
    with pytest.raises(InvalidDigestError, match="size 0 with a hash that is not"):
        Digest(other, 0)


def test_names_and_reapi_numbers_are_those_of_the_protos() -> None:
    values = execution.DigestFunction.Value
    assert SHA256.reapi_value == values.Value("SHA256")
    assert SHA384.reapi_value == values.Value("SHA384")
    assert SHA512.reapi_value == values.Value("SHA512")
    assert BLAKE3.reapi_value == values.Value("BLAKE3")
    for function in DIGEST_FUNCTIONS.values():
        assert by_name(function.name.upper()) is function
        assert by_reapi_value(function.reapi_value) is function
    assert list(DIGEST_FUNCTIONS)[0] == "sha256"


def test_unknown_functions_are_refused_naming_the_supported_ones() -> None:
    with pytest.raises(UnsupportedDigestFunctionError) as caught:
        by_name("md4")
    assert str(caught.value) == (
        "unsupported digest function 'md4'; casframe supports sha256, sha384, sha512, blake3"
    )
    with pytest.raises(UnsupportedDigestFunctionError, match=r"value 3\).*blake3 \(9\)"):
        by_reapi_value(3)  # MD5: REAPI numbers it, casframe does not support it


@pytest.mark.parametrize("length", [64, 96, 128])
def test_digests_take_hashes_of_every_supported_length(length: int) -> None:
    hash_ = "ab" * (length // 2)
    assert Digest(hash_, 5).hash == hash_
    assert Digest.parse(f"{hash_.upper()}/5") == Digest(hash_, 5)
    assert Digest.many([hash_, "cd" * 32], [5, 6]) == [Digest(hash_, 5), Digest("cd" * 32, 6)]


@pytest.mark.parametrize("length", [40, 63, 65, 127, 130])
def test_digests_refuse_other_lengths_in_one_line(length: int) -> None:
    with pytest.raises(InvalidDigestError) as caught:
        Digest("a" * length, 5)
    assert str(caught.value) == (
        f"not a hex digest (64, 96 or 128 lowercase hex digits): {'a' * length!r}"
    )
    with pytest.raises(InvalidDigestError):
        Digest.many(["a" * length], [5])


def test_a_store_opens_with_another_function_by_argument_or_url_option() -> None:
    with open_store("memory://", digest_function="blake3") as store:
        assert store.digest_function is BLAKE3
        assert store.put_bytes(b"abc") == Digest(_ABC["blake3"], 3)
    with open_store("memory://?digest_function=sha512") as store:
        assert store.digest_function is SHA512
        assert store.put_bytes(b"abc") == Digest(_ABC["sha512"], 3)
    with open_store("memory://") as store:
        assert store.digest_function is SHA256
        assert store.digest_functions == frozenset(DIGEST_FUNCTIONS)


def test_an_unsupported_function_is_refused_in_one_line_by_argument_and_url() -> None:
    for opening in (
        lambda: open_store("memory://", digest_function="md5"),
        lambda: open_store("memory://?digest_function=md5"),
    ):
        with pytest.raises(UnsupportedDigestFunctionError) as caught:
            opening()
        assert "\n" not in str(caught.value)
        assert str(caught.value).startswith("unsupported digest function 'md5'; casframe")


def test_siblings_are_opened_once_kept_and_closed_with_their_store() -> None:
    store = open_store("memory://")
    assert store.with_digest_function("sha256") is store
    sibling = store.with_digest_function("blake3")
    assert sibling.digest_function is BLAKE3
    assert store.with_digest_function("BLAKE3") is sibling
    assert sibling.with_digest_function("sha256") is store
    digest = sibling.put_bytes(b"only in blake3")
    assert store.find_missing([digest]) == {digest}  # memory:// keeps one map per function
    with pytest.raises(UnsupportedDigestFunctionError, match="'md5'"):
        store.with_digest_function("md5")
    closed = []
    sibling.blobs.close = lambda: closed.append("blobs")  # type: ignore[method-assign]
    sibling.close()  # owned by ``store``: nothing happens
    assert closed == []
    store.close()
    assert closed == ["blobs"]


def test_transfers_between_stores_of_different_functions_are_refused() -> None:
    with open_store("memory://") as source, open_store("memory://?digest_function=blake3") as dest:
        digest = source.put_bytes(b"a blob")
        with pytest.raises(UnsupportedDigestFunctionError) as caught:
            dest.copy_blob_from(source, digest)
        assert "different digest functions" in str(caught.value)
        assert "(sha256)" in str(caught.value) and "(blake3)" in str(caught.value)


# -- several functions at one file:// location ------------------------------------------------


def _files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("other", ["blake3", "sha512"])
def test_one_location_holds_each_function_apart(tmp_path: Path, make_tree, other: str) -> None:
    source = make_tree()
    url = f"file://{tmp_path / 'cas'}"
    with open_store(url) as plain, open_store(url, digest_function=other) as hashed:
        first = plain.import_directory(source, stat_cache=tmp_path / "stat")
        plain.set_ref("same", first)
        # The same stat cache folder: the SHA-256 hashes it remembers are not used for blake3.
        second = hashed.import_directory(source, stat_cache=tmp_path / "stat")
        hashed.set_ref("same", second)
        assert second != first and len(second.hash) == hashed.digest_function.hex_length
        assert second == plain.with_digest_function(other).get_ref("same")
        plain_closure = set(plain.tree_digests("same")) - {empty_of(plain)}
        hashed_closure = set(hashed.tree_digests("same")) - {empty_of(hashed)}
        assert plain.find_missing(hashed_closure) == hashed_closure
        assert hashed.find_missing(plain_closure) == plain_closure
        for store, closure in ((plain, plain_closure), (hashed, hashed_closure)):
            assert [r.name for r in store.list_refs()] == ["same"]
            assert {b.digest for b in store.blobs.iter_blobs()} == closure
            assert list(store.blobs.iter_strays()) == []
            report = store.fsck()
            assert report.problems == [] and report.warnings == []
            assert report.blobs_checked == len(closure)
            assert store.du().total_objects == len(closure)
        # Pruning the SHA-256 store leaves the other function's store whole.
        plain.delete_ref("same")
        assert plain.prune(grace_period=0).objects_freed == len(plain_closure)
        assert {b.digest for b in hashed.blobs.iter_blobs()} == hashed_closure
        hashed.checkout("same", tmp_path / "out")
    assert describe_tree(tmp_path / "out") == describe_tree(source)
    assert sorted(os.listdir(tmp_path / "cas" / "digest")) == [other]


def test_a_buildstream_1_shaped_store_opens_and_stays_byte_for_byte(tmp_path: Path) -> None:
    cache = tmp_path / "cas"
    data = b"hello from buildstream\n"
    blob = Digest.of_bytes(data)
    (cache / "objects" / blob.hash[:2]).mkdir(parents=True)
    (cache / "objects" / blob.hash[:2] / blob.hash[2:]).write_bytes(data)
    root = Digest.of_bytes(b"")  # the empty tree: the ref needs nothing more to be complete
    (cache / "refs" / "heads" / "project").mkdir(parents=True)
    (cache / "refs" / "heads" / "project" / "x").write_bytes(root.serialize())
    (cache / "tmp").mkdir()
    before = _files_under(cache)
    with open_store(f"file://{cache}", create=False) as store:
        assert store.digest_function is SHA256
        assert store.get_ref("project/x", touch=False) == root
        assert store.read_bytes(blob) == data
        assert store.fsck().problems == []
    assert _files_under(cache) == before
    assert sorted(os.listdir(cache)) == ["objects", "refs", "tmp"]  # no digest/ folder


# -- backends that declare fewer functions ----------------------------------------------------


class _Sha256OnlyBlobs(MemoryBlobStore):
    digest_functions = frozenset({"sha256"})
    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_backend_declaring_sha256_alone_is_refused_another_before_any_io() -> None:
    url = StoreURL.parse("only://here?digest_function=blake3")
    assert url.options == {}  # the core's option, never the backend's
    with pytest.raises(UnsupportedDigestFunctionError) as caught:
        url.digest_function_for(_Sha256OnlyBlobs)
    assert str(caught.value) == (
        "only:// stores cannot hold blake3 digests (only://here?digest_function=blake3); "
        "they support sha256"
    )
    assert BlobStore.digest_functions == frozenset({"sha256"})  # the default


def test_a_factory_that_ignores_the_function_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Store] = []

    def careless_factory(url: StoreURL) -> Store:  # an older backend: never asks
        opened.append(Store(_Sha256OnlyBlobs(), MemoryRefStore(), url=url.url))
        return opened[-1]

    registry = BackendRegistry()
    registry.add("careless", careless_factory)
    monkeypatch.setattr(PluginManager, "backend_registry", lambda self: registry)
    with open_store("careless://x") as store:
        assert store.digest_function is SHA256
    with pytest.raises(UnsupportedDigestFunctionError, match="careless:// stores cannot hold"):
        open_store("careless://x", digest_function="sha512")
    assert opened[-1].blobs.closed  # type: ignore[attr-defined]  # closed, not leaked


def test_a_declaration_of_unknown_functions_is_a_contract_error() -> None:
    with pytest.raises(BackendContractError, match="digest_functions must be a non-empty"):

        class _Wrong(MemoryBlobStore):
            digest_functions = frozenset({"sha256", "md4"})


def test_a_cache_opens_both_its_stores_with_its_function() -> None:
    url = "cache://?local=memory://near&remote=memory://far"
    with open_store(url, digest_function="blake3") as store:
        assert store.digest_function is BLAKE3
        assert store.blobs.local.digest_function is BLAKE3  # type: ignore[attr-defined]
        assert store.blobs.remote.digest_function is BLAKE3  # type: ignore[attr-defined]
        assert store.put_bytes(b"abc") == Digest(_ABC["blake3"], 3)
    with (
        open_store("memory://") as near,
        open_store("memory://", digest_function="blake3") as far,
        pytest.raises(UnsupportedDigestFunctionError, match="different digest functions"),
    ):
        CacheBlobStore(near, far)


def test_a_read_only_view_gives_read_only_siblings(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'cas'}"
    with open_store(url, digest_function="blake3") as writable:
        digest = writable.put_bytes(b"abc")
    store = open_store(url)
    view = read_only_view(store)
    sibling = view.with_digest_function("blake3")
    assert sibling.read_bytes(digest) == b"abc"
    with pytest.raises(PermissionDeniedError):
        sibling.put_bytes(b"more")
    view.close()


def test_the_stat_cache_keeps_each_function_apart(
    tmp_path: Path, make_tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every file recorded, even those written just now.
    monkeypatch.setattr(casframe.statcache, "TIMESTAMP_WINDOW_NS", -(10**18))
    source = make_tree()
    cache = tmp_path / "stat"
    url = f"file://{tmp_path / 'cas'}"
    with open_store(url) as plain, open_store(url, digest_function="blake3") as hashed:
        plain.import_directory(source, stat_cache=cache)
        assert len(os.listdir(cache)) == 1
        with open_store("memory://", digest_function="blake3") as reference:
            expected = reference.import_directory(source, stat_cache=False)
        assert hashed.import_directory(source, stat_cache=cache) == expected
        assert len(os.listdir(cache)) == 2  # one file per function
        assert hashed.import_directory(source, stat_cache=cache) == expected  # from its cache
