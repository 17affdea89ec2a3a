"""prune, gc, fsck and du: what the shipped conformance suite cannot stage.

The behaviour every backend owes (grace periods, exclusive sizes, LRU expiry, fsck's findings
and repair, du) is tested on every backend by ``MaintenanceConformance``. Here: parsing of sizes
and durations, backends lacking the capabilities, and races staged with a patched backend.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import BinaryIO

import pytest
from casframe_memory.store import MemoryBlobStore, MemoryRefStore

from casframe import (
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    Capability,
    Digest,
    InvalidDigestError,
    Store,
    UnsupportedOperationError,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Digest as DigestProto,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    FileNode,
)
from casframe.maintenance import parse_duration, parse_size
from casframe.testing import write_files
from casframe.testing.conformance import ConformanceBase
from casframe.tree import missing_in_tree

# -- helpers ------------------------------------------------------------------------------------


def import_tree(store: Store, tmp_path: Path, name: str, files: dict[str, bytes]) -> Digest:
    return store.import_directory(write_files(tmp_path / "src" / name, files))


def blob(n: int, seed: str) -> bytes:
    """``n`` bytes unique to ``seed``."""
    unit = (seed.encode() + b"-") * (n // (len(seed) + 1) + 1)
    return unit[:n]


SHARED = blob(1000, "shared")


# -- what the conformance suite cannot stage -----------------------------------------------------
# prune, gc, fsck and du on every backend: MaintenanceConformance in casframe.testing.conformance.


def test_prune_reports_a_blob_stored_again_during_the_sweep_as_kept(
    memory_store: Store, tmp_path: Path
) -> None:
    """A writer re-stores a doomed blob between prune's listing and its delete: the blob stays,
    and the report counts it as kept, not freed."""
    store = memory_store
    doomed = [store.put_bytes(blob(100 + i, f"garbage{i}")) for i in range(3)]
    rescued = doomed[1]
    time.sleep(0.05)
    real_delete = store.blobs.delete_blobs

    def delete_after_a_writer(digests, *, older_than=None):  # type: ignore[no-untyped-def]
        store.put_bytes(blob(rescued.size, "garbage1"))  # the writer freshens it
        return real_delete(digests, older_than=older_than)

    store.blobs.delete_blobs = delete_after_a_writer  # type: ignore[method-assign]
    report = store.prune(grace_period=0.01)

    assert store.find_missing(doomed) == {doomed[0], doomed[2]}
    assert (report.objects_freed, report.bytes_freed) == (2, doomed[0].size + doomed[2].size)
    assert (report.objects_kept_young, report.bytes_kept_young) == (1, rescued.size)


# -- sizes and durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1234", 1234),
        ("1234B", 1234),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("500M", 500 << 20),
        ("10G", 10 << 30),
        ("10GB", 10 * 10**9),
        ("20kB", 20_000),
        ("20KB", 20_000),
        ("20KiB", 20 << 10),
        ("10GiB", 10 << 30),
        ("1.5G", 3 << 29),
        (" 2T ", 2 << 40),
        (".5K", 512),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "10X", "-1G", "1,5G", "10 G B", "ten"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid size .*e\.g\. 500M, 10GiB, 20kB or 1\.5G"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("30s", 30), ("10m", 600), ("1h", 3600), ("2d", 172800), ("1w", 604800),
     ("1h30m", 5400), ("1.5h", 5400), ("90", 90), ("0.5", 0.5), ("10M", 600), (2.5, 2.5)],
)
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "h", "1y", "-5s", "1 hour", "soon"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*e\.g\. 30s, 10m, 1h or 0"):
        parse_duration(text)


# -- backends without the capabilities ----------------------------------------------------------


class _Bare(BlobStore):
    """A backend offering only the primitives (and what ``listing`` adds)."""

    def __init__(self, inner: MemoryBlobStore, capabilities: Collection[Capability] = ()) -> None:
        self.inner = inner
        self.capabilities = frozenset(capabilities)

    def find_missing_blobs(self, digests: Collection[Digest]) -> set[Digest]:
        return self.inner.find_missing_blobs(digests)

    def open_blob(self, digest: Digest, offset: int = 0) -> BinaryIO:
        return self.inner.open_blob(digest, offset)

    def begin_write(self, size_hint: int | None = None) -> BlobWriter:
        return self.inner.begin_write(size_hint)

    def iter_blobs(self):  # type: ignore[no-untyped-def]
        if Capability.LIST not in self.capabilities:
            return super().iter_blobs()
        return self.inner.iter_blobs()


def _bare_store(tmp_path: Path, capabilities: Iterable[Capability] = ()) -> tuple[Store, Digest]:
    inner = MemoryBlobStore()
    bare = Store(_Bare(inner, list(capabilities)), MemoryRefStore(), url="bare://")
    tree = import_tree(bare, tmp_path, "t", {"f": blob(100, "f"), "d/g": blob(200, "g")})
    bare.set_ref("r", tree)
    return bare, tree


def test_without_list_and_delete_prune_gc_du_say_so(tmp_path: Path) -> None:
    bare, _ = _bare_store(tmp_path)
    message = r"prune is not supported by this backend: it cannot list/delete blobs \(bare://\)"
    with pytest.raises(UnsupportedOperationError, match=message):
        bare.prune()
    with pytest.raises(UnsupportedOperationError, match="prune .* cannot list blobs"):
        bare.prune(dry_run=True)
    with pytest.raises(UnsupportedOperationError, match="gc is not supported .* list/delete"):
        bare.gc(max_size="1G")
    with pytest.raises(UnsupportedOperationError, match="du is not supported .* cannot list"):
        bare.du()
    with pytest.raises(UnsupportedOperationError, match="fsck --repair .* cannot delete"):
        bare.fsck(repair=True)


def test_without_delete_only_dry_runs_work(tmp_path: Path) -> None:
    listing, _ = _bare_store(tmp_path, [Capability.LIST])
    with pytest.raises(UnsupportedOperationError, match="it cannot delete blobs"):
        listing.prune()
    assert listing.prune(grace_period=0, dry_run=True).objects_reachable == 4


def test_fsck_without_list_checks_what_refs_reach(tmp_path: Path) -> None:
    bare, tree = _bare_store(tmp_path)
    assert bare.fsck().ok
    digest = Digest.of_bytes(blob(200, "g"))
    inner = Store(bare.blobs.inner, MemoryRefStore())  # type: ignore[attr-defined]
    ConformanceBase().corrupt_blob(inner, digest, b"x" * 200)

    report = bare.fsck()

    assert not report.listed
    assert [(p.kind, p.digest, p.refs) for p in report.problems] == [
        ("corrupt", digest, ["r"])
    ]
    assert report.blobs_checked == 4  # 2 Directories + 2 files


def test_a_tree_naming_size_0_with_another_hash_is_refused_and_reported(
    memory_store: Store, tmp_path: Path
) -> None:
    """Such a digest names content that cannot exist: it is no empty file to check out."""
    impossible = DigestProto(hash="ab" * 32, size_bytes=0)
    tree = memory_store.put_directory(Directory(files=[FileNode(name="f", digest=impossible)]))
    with pytest.raises(InvalidDigestError, match="not the empty blob's"):
        memory_store.set_ref("r", tree)
    with pytest.raises(InvalidDigestError):
        memory_store.checkout(tree, tmp_path / "out")
    assert not (tmp_path / "out" / "f").exists()
    memory_store.set_ref("r", tree, check_complete=False)
    report = memory_store.fsck()
    assert [(p.kind, p.digest, p.refs) for p in report.problems] == [
        ("not-a-directory", tree, ["r"])
    ]
    assert "not the empty blob's" in report.problems[0].detail


# -- transfers and the grace period -------------------------------------------------------------


@pytest.mark.parametrize("long_transfer", [False, True])
def test_a_transfer_touches_its_closure_again_only_when_it_took_long(
    memory_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, long_transfer: bool
) -> None:
    """Touching costs a server-side copy per object on S3: a short push touches once."""
    import casframe.transfer

    source = memory_store
    tree = import_tree(source, tmp_path, "t", {"a": blob(100, "a"), "d/b": blob(200, "b")})
    dest = Store(MemoryBlobStore(), MemoryRefStore(), url="dest://")
    dest.put_bytes(blob(100, "a"))  # already there: touched at the start
    touched: list[set[Digest]] = []
    real_freshen = dest.blobs.freshen_blobs

    def freshen(digests):  # type: ignore[no-untyped-def]
        touched.append(set(digests))
        return real_freshen(digests)

    dest.blobs.freshen_blobs = freshen  # type: ignore[method-assign]
    if long_transfer:
        monkeypatch.setattr(casframe.transfer, "REFRESH_AFTER", -1.0)

    source.push(dest, tree, ref="r")

    closure = {d for d in source.tree_digests(tree) if d.size}
    assert touched[0] == closure  # the first check touches what is there
    assert len(touched) == (2 if long_transfer else 1)
    if long_transfer:
        assert touched[1] == closure
    assert dest.get_ref("r") == tree and not missing_in_tree(dest.verified, tree)


@pytest.mark.parametrize("why", ["long transfer", "destination without touch"])
def test_the_second_pass_refuses_the_ref_when_a_prune_removed_part_of_the_tree(
    memory_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """A transfer that took long, or whose destination cannot touch (so blobs it found
    present are not protected by the grace period), checks its closure again before the
    ref: it finds what a concurrent prune deleted, and sets no ref."""
    import casframe.transfer

    source = memory_store
    tree = import_tree(source, tmp_path, "t", {"a": blob(100, "a"), "d/b": blob(200, "b")})
    dest = Store(MemoryBlobStore(), MemoryRefStore(), url="dest://")
    if why == "destination without touch":
        dest.blobs.capabilities = dest.blobs.capabilities - {Capability.TOUCH}
    doomed = Digest.of_bytes(blob(100, "a"))
    real_put_many = dest.verified.put_many

    def put_many_then_prune(blobs):  # type: ignore[no-untyped-def]
        real_put_many(blobs)
        dest.blobs.delete_blobs([doomed])  # a prune sweeping while the transfer runs

    dest.verified.put_many = put_many_then_prune  # type: ignore[method-assign]
    if why == "long transfer":
        monkeypatch.setattr(casframe.transfer, "REFRESH_AFTER", -1.0)

    with pytest.raises(BlobNotFoundError, match="concurrent prune") as caught:
        source.push(dest, tree, ref="r")

    assert doomed in caught.value.digests
    assert "r" not in [info.name for info in dest.list_refs()]
    # Run again: the lost blob is sent, and the ref appears.
    dest.verified.put_many = real_put_many  # type: ignore[method-assign]
    source.push(dest, tree, ref="r")
    assert dest.get_ref("r") == tree and not missing_in_tree(dest.verified, tree)
