"""The backend contract itself: declarations, the limits object, and what a backend written for
the older contract is told to change.

The conformance suite checks a backend's behaviour; these check that the core goes by what a
backend declares (never calling an undeclared method), and that a class breaking the contract
is refused when it is defined or built, with a :class:`BackendContractError` naming the fix.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from casframe_memory.store import MemoryBlobStore, MemoryRefStore

from casframe import (
    BackendContractError,
    BlobLimits,
    BlobWriter,
    Capability,
    Digest,
    RefCapability,
    RefInfo,
    RefNotFoundError,
    RefStore,
    Store,
    UnsupportedOperationError,
)

# -- the older contract: refused, saying what to change ----------------------------------------


@pytest.mark.parametrize(
    "name", ["max_batch_digests", "max_batch_bytes", "max_concurrency", "prehash_min_size"]
)
def test_a_tuning_attribute_on_the_class_names_limits(name: str) -> None:
    with pytest.raises(BackendContractError) as caught:
        type("OldBlobStore", (MemoryBlobStore,), {name: 2})
    assert str(caught.value).startswith(f"OldBlobStore.{name} is no longer read")
    assert f"set limits = BlobLimits({name}=...)" in str(caught.value)


def test_a_tuning_attribute_set_in_init_names_limits() -> None:
    class SetsItInInit(MemoryBlobStore):
        def __init__(self) -> None:
            super().__init__()
            self.max_concurrency = 8

    with pytest.raises(BackendContractError, match=r"SetsItInInit.max_concurrency is no longer"):
        SetsItInInit()


def test_reading_a_tuning_attribute_says_where_it_went() -> None:
    with pytest.raises(BackendContractError, match=r"read limits.max_batch_bytes"):
        _ = MemoryBlobStore().max_batch_bytes
    assert MemoryBlobStore().limits.max_batch_bytes == 4 << 20


def test_refs_that_list_without_declaring_it_are_refused() -> None:
    with pytest.raises(BackendContractError) as caught:

        class OldRefStore(RefStore):
            def get_ref(self, name: str, *, touch: bool = True) -> Digest:
                raise NotImplementedError

            def set_ref(self, name: str, digest: Digest) -> None:
                raise NotImplementedError

            def delete_ref(self, name: str) -> None:
                raise NotImplementedError

            def list_refs(self, prefix: str = "") -> Iterator[RefInfo]:
                raise NotImplementedError

    assert str(caught.value) == (
        "OldRefStore implements list_refs() and delete_ref() but declares no ref capabilities: "
        "add capabilities = frozenset({RefCapability.LIST, RefCapability.DELETE}) (what it can "
        "do) to the class"
    )


def test_capabilities_of_the_wrong_kind_are_refused() -> None:
    with pytest.raises(BackendContractError, match="frozenset of casframe.Capability values"):
        type("Mixed", (MemoryBlobStore,), {"capabilities": frozenset({RefCapability.LIST})})
    with pytest.raises(BackendContractError, match="frozenset of casframe.RefCapability"):
        type("Mixed", (MemoryRefStore,), {"capabilities": frozenset({Capability.LIST})})
    with pytest.raises(BackendContractError, match="must be a casframe.BlobLimits"):
        type("Loose", (MemoryBlobStore,), {"limits": {"max_concurrency": 2}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency must be a positive int, not 0"),
        ({"max_batch_bytes": 1.5}, "max_batch_bytes must be a positive int, not 1.5"),
        ({"prehash_min_size": -1}, "prehash_min_size must be None or an int of at least 0"),
    ],
)
def test_limits_refuse_impossible_values(values: dict[str, object], message: str) -> None:
    with pytest.raises(BackendContractError, match=message):
        BlobLimits(**values)  # type: ignore[arg-type]


def test_delete_blobs_returning_none_stops_prune_naming_the_method() -> None:
    class CannotTell(MemoryBlobStore):
        def delete_blobs(  # type: ignore[override]
            self, digests: Iterable[Digest], *, older_than: float | None = None
        ) -> None:
            super().delete_blobs(digests, older_than=older_than)

    with Store(CannotTell(), MemoryRefStore()) as store:
        store.put_bytes(b"garbage")
        with pytest.raises(BackendContractError) as caught:
            store.prune(grace_period=0)
    assert str(caught.value) == (
        "CannotTell.delete_blobs returned None: it must return the digests it deleted, so that "
        "prune reports what it freed"
    )


# -- the core goes by declarations ---------------------------------------------------------------


class _Recording(MemoryBlobStore):
    """Every optional method works, but only what ``declared`` holds is declared."""

    def __init__(self, declared: frozenset[Capability]) -> None:
        super().__init__()
        self.capabilities = declared
        self.called: list[str] = []

    def iter_blob_stats(self, skip=None):  # type: ignore[no-untyped-def]
        self.called.append("iter_blob_stats")
        return super().iter_blob_stats(skip)

    def freshen_blobs(self, digests):  # type: ignore[no-untyped-def]
        self.called.append("freshen_blobs")
        return super().freshen_blobs(digests)

    def begin_write_copy(self, fd: int) -> tuple[BlobWriter, io.BufferedReader]:
        self.called.append("begin_write_copy")
        raise UnsupportedOperationError("not this file")


def test_undeclared_methods_are_never_called(tmp_path: Path) -> None:
    blobs = _Recording(frozenset())
    with Store(blobs, MemoryRefStore()) as store:
        digest = store.put_bytes(b"present")
        assert store.find_missing([digest], freshen=True) == set()
        (tmp_path / "f").write_bytes(b"a local file")
        assert store.put_file(tmp_path / "f") == Digest.of_bytes(b"a local file")
        with pytest.raises(UnsupportedOperationError) as caught:
            store.prune(grace_period=0)
        report = store.fsck()
    assert blobs.called == []
    assert str(caught.value) == (
        f"prune is not supported by this backend: it cannot list/delete blobs ({blobs.describe()})"
    )
    assert report.ok and not report.listed


def test_declared_methods_are_called_and_a_declined_copy_is_read(tmp_path: Path) -> None:
    blobs = _Recording(frozenset({Capability.LIST, Capability.TOUCH, Capability.COPY_FILE}))
    with Store(blobs, MemoryRefStore()) as store:
        digest = store.put_bytes(b"present")
        store.find_missing([digest], freshen=True)
        (tmp_path / "f").write_bytes(b"a local file")
        assert store.read_bytes(store.put_file(tmp_path / "f")) == b"a local file"
        assert store.fsck().listed
    assert blobs.called == ["freshen_blobs", "begin_write_copy", "iter_blob_stats"]


class _GetSetOnly(RefStore):
    capabilities: frozenset[RefCapability] = frozenset()

    def __init__(self) -> None:
        self.refs: dict[str, Digest] = {}

    def get_ref(self, name: str, *, touch: bool = True) -> Digest:
        try:
            return self.refs[name]
        except KeyError:
            raise RefNotFoundError(name, "getset://") from None

    def set_ref(self, name: str, digest: Digest) -> None:
        self.refs[name] = digest


def test_refs_without_list_or_delete_are_refused_by_the_core() -> None:
    with Store(MemoryBlobStore(), _GetSetOnly(), url="getset://") as store:
        store.set_ref("main", Digest.of_bytes(b""))
        messages = []
        for operation in (store.list_refs, lambda: store.delete_ref("main"), store.fsck,
                          store.du, lambda: store.prune(dry_run=True)):
            with pytest.raises(UnsupportedOperationError) as caught:
                operation()
            messages.append(str(caught.value))
        assert store.get_ref("main") == Digest.of_bytes(b"")
    assert messages == [
        "_GetSetOnly cannot list refs: it does not declare the ref capability list",
        "_GetSetOnly cannot delete refs: it does not declare the ref capability delete",
        "fsck is not supported by this backend: it cannot list refs (getset://)",
        "du is not supported by this backend: it cannot list refs (getset://)",
        "prune is not supported by this backend: it cannot list refs (getset://)",
    ]
    with pytest.raises(UnsupportedOperationError) as caught:
        Store(_Recording(frozenset()), _GetSetOnly(), url="bare://").gc(max_size="1G")
    assert str(caught.value) == (
        "gc is not supported by this backend: it cannot list/delete blobs, list/delete refs "
        "(bare://)"
    )
