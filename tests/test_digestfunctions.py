"""The digest functions: known vectors, names and REAPI numbers, digests of every length, and
stores opened with another function than SHA-256."""

from __future__ import annotations

import io

import pytest

from casframe import (
    DIGEST_FUNCTIONS,
    SHA256,
    Digest,
    Hasher,
    InvalidDigestError,
    UnsupportedDigestFunctionError,
    open_store,
)
from casframe._messages import execution
from casframe.digestfunctions import BLAKE3, SHA384, SHA512, by_name, by_reapi_value

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
