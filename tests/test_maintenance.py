"""prune, gc, fsck and du through the Python API, on memory:// and file://.

Every test is a function of a ``store`` fixture and, where it damages stored bytes behind the
store's back, a ``corrupt(store, digest, data)`` helper (the conformance suite's
``corrupt_blob``): these tests can move into the shipped conformance suite as they are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import BinaryIO

import pytest
from casframe_memory import MemoryBlobStore, MemoryRefStore

from casframe import (
    BlobStore,
    BlobWriter,
    Capability,
    CorruptBlobError,
    Digest,
    Store,
    UnsupportedOperationError,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    ActionResult,
    Directory,
    FileNode,
    OutputDirectory,
    OutputFile,
    Tree,
)
from casframe.maintenance import du, fsck, gc, parse_duration, parse_size, prune
from casframe.names import ACTION_RESULT_REF_PREFIX, BLOB_REF_PREFIX
from casframe.testing.conformance import ConformanceBase
from casframe.tree import missing_in_tree

Corrupt = Callable[[Store, Digest, bytes], None]


# -- fixtures (per backend) -------------------------------------------------------------------


@pytest.fixture(params=["memory_store", "local_store"])
def store(request: pytest.FixtureRequest) -> Store:
    result: Store = request.getfixturevalue(request.param)
    return result


@pytest.fixture
def corrupt() -> Corrupt:
    """The conformance suite's way to damage a stored blob behind the store's back."""
    return ConformanceBase().corrupt_blob


# -- helpers ------------------------------------------------------------------------------------


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def import_tree(store: Store, tmp_path: Path, name: str, files: dict[str, bytes]) -> Digest:
    return store.import_directory(write_files(tmp_path / "src" / name, files))


def stored(store: Store) -> dict[Digest, float]:
    return {info.digest: info.mtime for info in store.blobs.iter_blobs()}


def closure(store: Store, root: Digest) -> set[Digest]:
    return {d for d in store.tree_digests(root) if d.size}


def blob(n: int, seed: str) -> bytes:
    """``n`` bytes unique to ``seed``."""
    unit = (seed.encode() + b"-") * (n // (len(seed) + 1) + 1)
    return unit[:n]


SHARED = blob(1000, "shared")


# -- prune --------------------------------------------------------------------------------------


def test_prune_grace_zero_removes_exactly_the_unreachable(store: Store, tmp_path: Path) -> None:
    a = import_tree(store, tmp_path, "a", {"shared": SHARED, "x/a1": blob(300, "a1")})
    b = import_tree(store, tmp_path, "b", {"shared": SHARED, "y/b1": blob(500, "b1")})
    gone = import_tree(store, tmp_path, "gone", {"shared": SHARED, "z": blob(700, "gone")})
    store.set_ref("keep/a", a)
    store.set_ref("keep/b", b)
    store.set_ref("gone", gone)
    store.delete_ref("gone")
    loose = store.put_bytes(b"a loose blob no tree names")
    unnamed = import_tree(store, tmp_path, "unnamed", {"u": blob(900, "unnamed")})

    before = stored(store)
    reachable = closure(store, a) | closure(store, b)
    garbage = set(before) - reachable
    assert loose in garbage and unnamed in garbage and SHARED not in garbage

    report = prune(store, grace_period=0)

    assert set(stored(store)) == reachable
    assert report.objects_scanned == len(before)
    assert report.bytes_scanned == sum(d.size for d in before)
    assert report.objects_freed == len(garbage)
    assert report.bytes_freed == sum(d.size for d in garbage)
    assert report.objects_reachable == len(reachable)
    assert report.objects_kept_young == 0
    assert report.refs_checked == 2 and not report.problems
    assert not missing_in_tree(store, a) and not missing_in_tree(store, b)
    again = prune(store, grace_period=0)
    assert again.objects_freed == 0 and again.objects_scanned == len(reachable)


def test_young_objects_survive_the_grace_period(store: Store) -> None:
    old = store.put_bytes(b"old garbage")
    time.sleep(1.2)
    young = store.put_bytes(b"young garbage")

    kept_all = prune(store, grace_period=3600)
    assert kept_all.objects_freed == 0 and kept_all.objects_kept_young == 2
    assert store.contains(old) and store.contains(young)

    report = prune(store, grace_period=1.0)
    assert not store.contains(old)
    assert store.contains(young)
    assert (report.objects_freed, report.bytes_freed) == (1, old.size)
    assert (report.objects_kept_young, report.bytes_kept_young) == (1, young.size)


def test_restoring_an_old_blob_refreshes_it(store: Store) -> None:
    """A writer storing a blob that is already there must renew its grace period."""
    digest = store.put_bytes(b"stored long ago")
    time.sleep(1.2)
    store.put_bytes(b"stored long ago")
    prune(store, grace_period=1.0)
    assert store.contains(digest)


def test_set_ref_freshens_the_tree_it_names(store: Store, tmp_path: Path) -> None:
    """An unreferenced old tree that gets a ref is protected even if prune marked before."""
    tree = import_tree(store, tmp_path, "t", {"f": blob(100, "f"), "d/g": blob(200, "g")})
    time.sleep(1.2)
    store.set_ref("late", tree)
    young = {d for d, mtime in stored(store).items() if mtime >= time.time() - 1.0}
    assert closure(store, tree) <= young


def test_dry_run_deletes_nothing_and_sizes_each_ref(store: Store, tmp_path: Path) -> None:
    a = import_tree(store, tmp_path, "a", {"shared": SHARED, "a1": blob(3000, "a1")})
    b = import_tree(store, tmp_path, "b", {"shared": SHARED, "sub/b1": blob(5000, "b1")})
    store.set_ref("a", a)
    store.set_ref("b", b)
    store.set_ref("b-copy", b)  # same tree: neither b nor b-copy alone keeps anything alive
    garbage = store.put_bytes(blob(400, "garbage"))
    before = stored(store)

    report = prune(store, grace_period=0, dry_run=True)

    assert stored(store) == before
    assert report.dry_run
    assert (report.objects_freed, report.bytes_freed) == (1, garbage.size)
    usage = {u.name: u for u in report.refs}
    assert set(usage) == {"a", "b", "b-copy"}
    only_a = closure(store, a) - closure(store, b)
    assert usage["a"].exclusive_bytes == sum(d.size for d in only_a)
    assert usage["a"].exclusive_objects == len(only_a)
    assert usage["a"].total_bytes == sum(d.size for d in closure(store, a))
    assert usage["b"].exclusive_bytes == 0 and usage["b-copy"].exclusive_bytes == 0
    assert usage["b"].total_bytes == sum(d.size for d in closure(store, b))
    json.dumps(report.to_dict())  # JSON-ready as it is
    assert report.to_dict()["refs"][0]["digest"].count("/") == 1

    # The exclusive size is what deleting the ref frees.
    store.delete_ref("a")
    freed = prune(store, grace_period=0)
    assert freed.bytes_freed == usage["a"].exclusive_bytes + garbage.size


def test_prune_keeps_what_an_incomplete_or_corrupt_tree_still_reaches(
    store: Store, tmp_path: Path, corrupt: Corrupt
) -> None:
    tree = import_tree(
        store, tmp_path, "t", {"lost/f": blob(100, "lost"), "kept/g": blob(200, "kept")}
    )
    store.set_ref("damaged", tree)
    root = store.get_directory(tree)
    lost = next(Digest.from_proto(n.digest) for n in root.directories if n.name == "lost")
    store.blobs.delete_blobs([lost])
    # Flip a byte of a name in the root Directory: its hash no longer matches, yet it decodes.
    raw = store.read_bytes(tree)
    corrupt(store, tree, raw.replace(b"kept", b"kepT"))
    orphan = Digest.of_bytes(blob(100, "lost"))  # only the missing Directory named it
    expected = set(stored(store)) - {orphan}

    report = prune(store, grace_period=0)

    assert set(stored(store)) == expected  # everything still reachable was kept
    assert Digest.of_bytes(blob(200, "kept")) in expected
    problems = {(p.ref, p.digest, p.kind) for p in report.problems}
    assert ("damaged", lost, "missing") in problems
    assert ("damaged", tree, "corrupt") in problems


def test_prune_removes_an_orphan_of_a_missing_directory_only_if_old(store: Store) -> None:
    """What no readable tree names is garbage, like any other unreachable blob."""
    orphan = store.put_bytes(b"child of a directory that is gone")
    report = prune(store, grace_period=3600)
    assert store.contains(orphan) and report.objects_kept_young == 1


def _action_result_refs(store: Store, tmp_path: Path) -> dict[str, Digest]:
    """What ``casframe serve`` stores: an action-cache ref and a Remote Asset blob ref."""
    out = store.put_bytes(blob(300, "output file"))
    log = store.put_bytes(b"stdout of the action")
    in_tree = store.put_bytes(blob(200, "file of an output Tree"))
    tree_message = Tree(root=Directory(files=[FileNode(name="x", digest=in_tree.to_proto())]))
    tree = store.put_bytes(tree_message.SerializeToString(deterministic=True))
    root = import_tree(store, tmp_path, "out-dir", {"y": blob(250, "output directory file")})
    result = ActionResult(
        output_files=[OutputFile(path="out", digest=out.to_proto())],
        output_directories=[
            OutputDirectory(path="t", tree_digest=tree.to_proto()),
            OutputDirectory(path="r", root_directory_digest=root.to_proto()),
        ],
        stdout_digest=log.to_proto(),
    )
    result_digest = store.put_bytes(result.SerializeToString(deterministic=True))
    action = Digest.of_bytes(b"an action")
    store.set_ref(
        f"{ACTION_RESULT_REF_PREFIX}_/{action.hash}/{action.size}", result_digest,
        check_complete=False,
    )
    asset = store.put_bytes(b"a fetched asset")
    store.set_ref(f"{BLOB_REF_PREFIX}key", asset, check_complete=False)
    return {"out": out, "log": log, "in_tree": in_tree, "tree": tree, "root": root,
            "result": result_digest, "asset": asset}


def test_action_cache_and_asset_refs_keep_what_they_name(store: Store, tmp_path: Path) -> None:
    kept = _action_result_refs(store, tmp_path)
    garbage = store.put_bytes(b"garbage")
    expected = set(stored(store)) - {garbage}

    report = prune(store, grace_period=0)

    assert set(stored(store)) == expected
    assert not report.problems  # neither is parsed as a Directory
    assert fsck(store).ok
    usage = {u.name.split("/")[0]: u for u in du(store).refs}
    assert usage["asset"].total_bytes == kept["asset"].size
    assert usage["ac"].total_objects == len(expected) - 1  # all but the asset

    store.blobs.delete_blobs([kept["in_tree"], kept["log"]])
    found = {(p.kind, p.digest) for p in fsck(store).problems}
    assert found == {("missing", kept["in_tree"]), ("missing", kept["log"])}


# -- gc -----------------------------------------------------------------------------------------


def _three_refs(store: Store, tmp_path: Path, names: list[str]) -> dict[str, Digest]:
    refs = {}
    for name in names:
        tree = import_tree(store, tmp_path, name.replace("/", "_"), {"f": blob(10_000, name)})
        store.set_ref(name, tree)
        refs[name] = tree
        time.sleep(0.05)  # distinct access times: the order set is the LRU order
    return refs


def test_gc_expires_least_recently_used_refs_first(store: Store, tmp_path: Path) -> None:
    refs = _three_refs(store, tmp_path, ["old", "mid", "new"])
    store.get_ref("old")  # using a ref makes it recent: now "mid" is the least recently used
    mid = closure(store, refs["mid"])
    total = sum(d.size for d in stored(store))
    assert 30_000 < total < 31_000

    report = gc(store, max_size=25_000, low_watermark=0.9, grace_period=0)

    assert report.over_quota and report.reached_target
    assert [u.name for u in report.refs_deleted] == ["mid"]
    assert {r.name for r in store.list_refs()} == {"old", "new"}
    assert report.prune is not None
    assert report.prune.bytes_freed == sum(d.size for d in mid)
    remaining = sum(d.size for d in stored(store))
    assert remaining == report.predicted_bytes <= report.target_bytes == 22_500
    json.dumps(report.to_dict())


def test_gc_respects_keep_patterns(store: Store, tmp_path: Path) -> None:
    _three_refs(store, tmp_path, ["release/1", "ci/2", "ci/3"])

    report = gc(store, max_size=25_000, low_watermark=0.9, keep=["release/*"], grace_period=0)

    assert report.refs_kept == ["release/1"]
    assert [u.name for u in report.refs_deleted] == ["ci/2"]
    assert {r.name for r in store.list_refs()} == {"release/1", "ci/3"}

    # Nothing left to expire but protected refs: gc stops short of its target and says so.
    tight = gc(store, max_size=5_000, keep=["release/*", "ci/*"], grace_period=0)
    assert not tight.refs_deleted and not tight.reached_target
    assert {r.name for r in store.list_refs()} == {"release/1", "ci/3"}


def test_gc_dry_run_and_under_quota(store: Store, tmp_path: Path) -> None:
    _three_refs(store, tmp_path, ["a", "b", "c"])
    garbage = store.put_bytes(blob(1000, "garbage"))
    before = stored(store)

    dry = gc(store, max_size="20K", low_watermark=0.5, grace_period=0, dry_run=True)
    assert stored(store) == before and len(store.list_refs()) == 3
    assert [u.name for u in dry.refs_deleted] == ["a", "b"]  # 10,240 × 0.5 leaves room for one
    assert dry.prune is not None and dry.prune.dry_run
    assert dry.prune.bytes_freed == sum(u.exclusive_bytes for u in dry.refs_deleted) + 1000
    assert dry.predicted_bytes == sum(d.size for d in before) - dry.prune.bytes_freed

    under = gc(store, max_size="1M", grace_period=0)
    assert not under.over_quota and not under.refs_deleted
    assert under.prune is not None and under.prune.objects_freed == 1
    assert not store.contains(garbage) and len(store.list_refs()) == 3

    # Young data cannot be freed by expiring refs: gc leaves the refs alone.
    young = gc(store, max_size=1000, grace_period=3600)
    assert young.over_quota and not young.refs_deleted and not young.reached_target
    assert len(store.list_refs()) == 3


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
        ("10GB", 10 << 30),
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
    with pytest.raises(ValueError, match=r"invalid size .*e\.g\. 500M, 10G or 1\.5G"):
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


def test_bad_arguments_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="grace period"):
        prune(store, grace_period=-1)
    with pytest.raises(ValueError, match="low watermark"):
        gc(store, max_size="1G", low_watermark=1.5)
    with pytest.raises(ValueError, match="invalid size"):
        gc(store, max_size="lots")


# -- fsck ---------------------------------------------------------------------------------------


def _damage_fixture(store: Store, tmp_path: Path) -> dict[str, Digest]:
    tree = import_tree(
        store, tmp_path, "t",
        {"flip": blob(2000, "flip"), "trunc": blob(3000, "trunc"), "sub/gone": blob(400, "gone"),
         "ok": blob(500, "ok")},
    )
    other = import_tree(store, tmp_path, "o", {"ok": blob(500, "ok"), "mine": blob(600, "mine")})
    store.set_ref("damaged", tree)
    store.set_ref("healthy", other)
    return {
        "tree": tree,
        "other": other,
        "flip": Digest.of_bytes(blob(2000, "flip")),
        "trunc": Digest.of_bytes(blob(3000, "trunc")),
        "gone": Digest.of_bytes(blob(400, "gone")),
    }


def test_fsck_clean_store_is_ok(store: Store, tmp_path: Path) -> None:
    d = _damage_fixture(store, tmp_path)
    report = fsck(store)
    assert report.ok and report.to_dict()["ok"] is True
    assert report.refs_checked == 2 and report.directories_checked == 3
    assert report.blobs_checked == len(stored(store))
    assert report.listed and not report.incomplete_refs
    assert d["tree"] in stored(store)


def test_fsck_finds_flipped_truncated_and_missing(
    store: Store, tmp_path: Path, corrupt: Corrupt
) -> None:
    d = _damage_fixture(store, tmp_path)
    flipped = bytearray(blob(2000, "flip"))
    flipped[1000] ^= 0x01
    corrupt(store, d["flip"], bytes(flipped))
    corrupt(store, d["trunc"], blob(3000, "trunc")[:1234])
    store.blobs.delete_blobs([d["gone"]])

    # Reading damaged content is a typed error, never data.
    for digest in (d["flip"], d["trunc"]):
        with pytest.raises(CorruptBlobError, match=digest.hash):
            store.read_bytes(digest)
        with pytest.raises(CorruptBlobError), store.open_read(digest) as stream:
            stream.read()

    report = fsck(store)

    assert not report.ok and not report.to_dict()["ok"]
    found = {(p.kind, p.digest): p for p in report.problems}
    assert set(found) == {
        ("corrupt", d["flip"]), ("corrupt", d["trunc"]), ("missing", d["gone"])
    }
    assert all(p.refs == ["damaged"] for p in report.problems)
    assert "1234 bytes" in found[("corrupt", d["trunc"])].detail
    assert report.incomplete_refs == ["damaged"]
    assert json.loads(json.dumps(report.to_dict()))["problems"][0]["refs"] == ["damaged"]


def test_fsck_repair_deletes_only_corrupt_blobs(
    store: Store, tmp_path: Path, corrupt: Corrupt
) -> None:
    d = _damage_fixture(store, tmp_path)
    flipped = bytearray(blob(2000, "flip"))
    flipped[0] ^= 0x80
    corrupt(store, d["flip"], bytes(flipped))
    corrupt(store, d["trunc"], b"short")
    healthy = set(stored(store)) - {d["flip"], d["trunc"]}
    healthy |= {x for x in stored(store) if x.hash == d["trunc"].hash}  # listed at its size now

    report = fsck(store, repair=True)

    assert sorted(report.deleted) == sorted([d["flip"], d["trunc"]])
    assert report.incomplete_refs == ["damaged"]
    after = set(stored(store))
    assert after == {x for x in healthy if x.hash != d["trunc"].hash}
    assert not missing_in_tree(store, d["other"])  # the healthy ref is untouched

    again = fsck(store)
    assert {(p.kind, p.digest) for p in again.problems} == {
        ("missing", d["flip"]), ("missing", d["trunc"])
    }
    assert again.incomplete_refs == ["damaged"]


def test_fsck_checks_directories_form(store: Store) -> None:
    file_digest = store.put_bytes(b"content")
    unsorted = Directory(
        files=[
            FileNode(name="b", digest=file_digest.to_proto()),
            FileNode(name="a", digest=file_digest.to_proto()),
        ]
    )
    unsorted_digest = store.put_bytes(unsorted.SerializeToString(deterministic=True))
    unsafe = Directory(files=[FileNode(name="..", digest=file_digest.to_proto())])
    unsafe_digest = store.put_bytes(unsafe.SerializeToString(deterministic=True))
    store.set_ref("unsorted", unsorted_digest)
    store.set_ref("unsafe", unsafe_digest, check_complete=False)
    store.set_ref("not-a-tree", store.put_bytes(b"\xff\xff\xff not protobuf"),
                  check_complete=False)

    report = fsck(store)

    kinds = {(p.kind, tuple(p.refs)) for p in report.problems}
    assert kinds == {
        ("not-canonical", ("unsorted",)), ("unsafe", ("unsafe",)),
        ("not-a-directory", ("not-a-tree",)),
    }
    # Repair deletes corrupt blobs only: well-formed-but-wrong Directories stay.
    assert not fsck(store, repair=True).deleted
    assert store.contains(unsorted_digest) and store.contains(unsafe_digest)


# -- du -----------------------------------------------------------------------------------------


def test_du_totals(store: Store, tmp_path: Path) -> None:
    a = import_tree(store, tmp_path, "a", {"shared": SHARED, "a1": blob(3000, "a1")})
    b = import_tree(store, tmp_path, "b", {"shared": SHARED, "b1": blob(5000, "b1")})
    store.set_ref("a", a)
    store.set_ref("b", b)
    garbage = store.put_bytes(blob(77, "garbage"))
    listing = stored(store)

    report = du(store)

    assert report.total_objects == len(listing)
    assert report.total_bytes == sum(d.size for d in listing)
    assert (report.unreachable_objects, report.unreachable_bytes) == (1, garbage.size)
    assert report.reachable_bytes == report.total_bytes - garbage.size
    usage = {u.name: u for u in report.refs}
    for name, tree, other in (("a", a, b), ("b", b, a)):
        mine = closure(store, tree)
        assert usage[name].total_bytes == sum(x.size for x in mine)
        assert usage[name].total_objects == len(mine)
        assert usage[name].exclusive_bytes == sum(x.size for x in mine - closure(store, other))
    assert [u.name for u in report.refs] == ["b", "a"]  # most exclusive bytes first
    json.dumps(report.to_dict())


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
        prune(bare)
    with pytest.raises(UnsupportedOperationError, match="prune .* cannot list blobs"):
        prune(bare, dry_run=True)
    with pytest.raises(UnsupportedOperationError, match="gc is not supported .* list/delete"):
        gc(bare, max_size="1G")
    with pytest.raises(UnsupportedOperationError, match="du is not supported .* cannot list"):
        du(bare)
    with pytest.raises(UnsupportedOperationError, match="fsck --repair .* cannot delete"):
        fsck(bare, repair=True)


def test_without_delete_only_dry_runs_work(tmp_path: Path) -> None:
    listing, _ = _bare_store(tmp_path, [Capability.LIST])
    with pytest.raises(UnsupportedOperationError, match="it cannot delete blobs"):
        prune(listing)
    assert prune(listing, grace_period=0, dry_run=True).objects_reachable == 4


def test_fsck_without_list_checks_what_refs_reach(tmp_path: Path) -> None:
    bare, tree = _bare_store(tmp_path)
    assert fsck(bare).ok
    digest = Digest.of_bytes(blob(200, "g"))
    inner = Store(bare.blobs.inner, MemoryRefStore())  # type: ignore[attr-defined]
    ConformanceBase().corrupt_blob(inner, digest, b"x" * 200)

    report = fsck(bare)

    assert not report.listed
    assert [(p.kind, p.digest, p.refs) for p in report.problems] == [
        ("corrupt", digest, ["r"])
    ]
    assert report.blobs_checked == 4  # 2 Directories + 2 files
