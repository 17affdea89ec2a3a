"""prune, gc, fsck and du through the backend contract, as far as the backend declares the
capabilities they need."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from casframe import (
    Capability,
    CorruptBlobError,
    Digest,
    RefCapability,
    Store,
    UnsupportedOperationError,
    open_store,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    ActionResult,
    Directory,
    FileNode,
    OutputDirectory,
    OutputFile,
    Tree,
)
from casframe.refkinds import ACTION_RESULT_REF_PREFIX, BLOB_REF_PREFIX
from casframe.testing import (
    write_files,
)
from casframe.testing.conformance.base import ConformanceBase, digest_of
from casframe.tree import missing_in_tree


def _blob(n: int, seed: str) -> bytes:
    """``n`` bytes unique to ``seed``."""
    unit = (seed.encode() + b"-") * (n // (len(seed) + 1) + 1)
    return unit[:n]


_SHARED = _blob(1000, "shared")


def _import_files(store: Store, root: Path, files: Mapping[str, bytes]) -> Digest:
    return store.import_directory(write_files(root, files))


def _stored(store: Store) -> dict[Digest, float]:
    return {info.digest: info.mtime for info in store.blobs.iter_blobs()}


def _closure(store: Store, root: Digest) -> set[Digest]:
    return {d for d in store.tree_digests(root) if d.size}


def _import_without(store: Store, root: Path, files: Mapping[str, bytes], absent: bytes) -> Digest:
    """Import ``files`` into ``store`` but leave out the blob ``absent``: a tree with a hole,
    made without the delete capability."""
    scratch = open_store("memory://", digest_function=store.digest_function.name)
    try:
        tree = _import_files(scratch, root, files)
        hole = digest_of(store, absent)
        blobs = [(d, scratch.read_bytes(d)) for d in scratch.tree_digests(tree) if d != hole]
    finally:
        scratch.close()
    store.put_many(blobs)
    return tree


class MaintenanceConformance(ConformanceBase):
    """prune, gc, fsck and du through the backend contract.

    A backend that cannot list or delete blobs is checked to refuse prune, gc and du with
    :class:`~casframe.UnsupportedOperationError`; fsck then checks what the refs reach.
    """

    # -- timing: the grace period must be longer than the backend's mtime steps ----------------

    @property
    def grace(self) -> float:
        """A short grace period this backend's timestamps can resolve."""
        return 1.0 + self.mtime_resolution

    def wait_past_grace(self) -> None:
        time.sleep(self.grace + 0.2 + self.mtime_resolution)

    def settle(self) -> None:
        """Let what was just stored become older than ``now`` at the backend's resolution, so
        that a prune with no grace period may delete it."""
        if self.mtime_resolution:
            time.sleep(self.mtime_resolution + 0.1)

    def refused(
        self, store: Store, operation: Callable[[], object], *needs: Capability | RefCapability
    ) -> bool:
        """True (after checking the clear refusal) when the backend lacks one of ``needs``."""
        lacking = [c for c in needs if self.lacks(store, c)]
        if not lacking:
            return False
        with pytest.raises(UnsupportedOperationError, match="not supported by this backend"):
            operation()
        return True

    def cannot_sweep(self, store: Store) -> bool:
        return self.refused(
            store,
            lambda: store.prune(grace_period=0),
            Capability.LIST,
            Capability.DELETE,
            RefCapability.LIST,
        )

    def cannot_expire(self, store: Store) -> bool:
        """True (after checking gc's clear refusal) when gc cannot expire refs and sweep."""
        return self.refused(
            store,
            lambda: store.gc(max_size="1G"),
            Capability.LIST,
            Capability.DELETE,
            RefCapability.LIST,
            RefCapability.DELETE,
        )

    # -- prune ----------------------------------------------------------------------------------

    def test_prune_grace_zero_removes_exactly_the_unreachable(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.cannot_sweep(store):
            return
        a = _import_files(store, tmp_path / "a", {"shared": _SHARED, "x/a1": _blob(300, "a1")})
        b = _import_files(store, tmp_path / "b", {"shared": _SHARED, "y/b1": _blob(500, "b1")})
        gone = _import_files(store, tmp_path / "g", {"shared": _SHARED, "z": _blob(700, "gone")})
        store.set_ref("keep/a", a)
        store.set_ref("keep/b", b)
        if not self.lacks(store, RefCapability.DELETE):
            store.set_ref("gone", gone)
            store.delete_ref("gone")
        loose = store.put_bytes(b"a loose blob no tree names")
        unnamed = _import_files(store, tmp_path / "u", {"u": _blob(900, "unnamed")})

        before = _stored(store)
        reachable = _closure(store, a) | _closure(store, b)
        garbage = set(before) - reachable
        assert loose in garbage and unnamed in garbage and digest_of(store, _SHARED) not in garbage

        self.settle()
        report = store.prune(grace_period=0)

        assert set(_stored(store)) == reachable
        assert report.objects_scanned == len(before)
        assert report.bytes_scanned == sum(d.size for d in before)
        assert report.objects_freed == len(garbage)
        assert report.bytes_freed == sum(d.size for d in garbage)
        assert report.objects_reachable == len(reachable)
        assert report.objects_kept_young == 0
        assert report.refs_checked == 2 and not report.problems
        assert not missing_in_tree(store.verified, a) and not missing_in_tree(store.verified, b)
        again = store.prune(grace_period=0)
        assert again.objects_freed == 0 and again.objects_scanned == len(reachable)

    def test_prune_spares_objects_younger_than_the_grace_period(self, store: Store) -> None:
        if self.cannot_sweep(store):
            return
        old = store.put_bytes(b"old garbage")
        self.wait_past_grace()
        kept_all = store.prune(grace_period=3600)
        assert kept_all.objects_freed == 0 and kept_all.objects_kept_young == 1
        assert store.contains(old)

        # Stored just before the prune: a slow prune above must not eat into its grace.
        young = store.put_bytes(b"young garbage")
        report = store.prune(grace_period=self.grace)
        assert not store.contains(old)
        assert store.contains(young)
        assert (report.objects_freed, report.bytes_freed) == (1, old.size)
        assert (report.objects_kept_young, report.bytes_kept_young) == (1, young.size)

    def test_storing_an_old_blob_again_renews_its_grace_period(self, store: Store) -> None:
        if self.cannot_sweep(store):
            return
        digest = store.put_bytes(b"stored long ago")
        self.wait_past_grace()
        store.put_bytes(b"stored long ago")
        store.prune(grace_period=self.grace)
        assert store.contains(digest)

    def test_set_ref_renews_the_grace_period_of_its_tree(
        self, store: Store, tmp_path: Path
    ) -> None:
        """An old unreferenced tree that gets a ref survives a prune that marked before."""
        if self.cannot_sweep(store):
            return
        tree = _import_files(store, tmp_path / "t", {"f": _blob(100, "f"), "d/g": _blob(200, "g")})
        self.wait_past_grace()
        store.set_ref("late", tree)
        store.blobs.delete_blobs(list(_closure(store, tree)), older_than=time.time() - self.grace)
        assert not missing_in_tree(store.verified, tree)

    def test_prune_dry_run_deletes_nothing_and_sizes_each_ref(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.refused(
            store,
            lambda: store.prune(grace_period=0, dry_run=True),
            Capability.LIST,
            RefCapability.LIST,
        ):
            return
        a = _import_files(store, tmp_path / "a", {"shared": _SHARED, "a1": _blob(3000, "a1")})
        b = _import_files(store, tmp_path / "b", {"shared": _SHARED, "s/b1": _blob(5000, "b1")})
        store.set_ref("a", a)
        store.set_ref("b", b)
        store.set_ref("b-copy", b)  # same tree: neither b nor b-copy alone keeps anything alive
        garbage = store.put_bytes(_blob(400, "garbage"))
        before = _stored(store)
        self.settle()

        report = store.prune(grace_period=0, dry_run=True)

        assert _stored(store) == before
        assert report.dry_run
        assert (report.objects_freed, report.bytes_freed) == (1, garbage.size)
        usage = {u.name: u for u in report.refs}
        assert set(usage) == {"a", "b", "b-copy"}
        only_a = _closure(store, a) - _closure(store, b)
        assert usage["a"].exclusive_bytes == sum(d.size for d in only_a)
        assert usage["a"].exclusive_objects == len(only_a)
        assert usage["a"].total_bytes == sum(d.size for d in _closure(store, a))
        assert usage["b"].exclusive_bytes == 0 and usage["b-copy"].exclusive_bytes == 0
        assert usage["b"].total_bytes == sum(d.size for d in _closure(store, b))
        json.dumps(report.to_dict())  # JSON-ready as it is
        assert report.to_dict()["refs"][0]["digest"].count("/") == 1

        if self.cannot_sweep(store) or self.lacks(store, RefCapability.DELETE):
            return
        # The exclusive size is what deleting the ref frees.
        store.delete_ref("a")
        self.settle()
        freed = store.prune(grace_period=0)
        assert freed.bytes_freed == usage["a"].exclusive_bytes + garbage.size

    def test_prune_keeps_what_a_damaged_tree_still_reaches(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.cannot_sweep(store):
            return
        lost_file = _blob(100, "lost")
        tree = _import_files(
            store, tmp_path / "t", {"lost/f": lost_file, "kept/g": _blob(200, "kept")}
        )
        store.set_ref("damaged", tree)
        root = store.get_directory(tree)
        lost = next(Digest.from_proto(n.digest) for n in root.directories if n.name == "lost")
        store.blobs.delete_blobs([lost])
        # Change a name in the root Directory: its hash no longer matches, yet it decodes.
        self.corrupt_blob(store, tree, store.read_bytes(tree).replace(b"kept", b"kepT"))
        orphan = digest_of(store, lost_file)  # only the missing Directory named it
        expected = set(_stored(store)) - {orphan}

        self.settle()
        report = store.prune(grace_period=0)

        assert set(_stored(store)) == expected  # everything still reachable was kept
        assert digest_of(store, _blob(200, "kept")) in expected
        problems = {(p.ref, p.digest, p.kind) for p in report.problems}
        assert ("damaged", lost, "missing") in problems
        assert ("damaged", tree, "corrupt") in problems

    def test_action_cache_and_asset_refs_keep_what_they_name(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.cannot_sweep(store):
            return
        out = store.put_bytes(_blob(300, "output file"))
        log = store.put_bytes(b"stdout of the action")
        in_tree = store.put_bytes(_blob(200, "file of an output Tree"))
        tree_message = Tree(root=Directory(files=[FileNode(name="x", digest=in_tree.to_proto())]))
        tree = store.put_bytes(tree_message.SerializeToString(deterministic=True))
        root = _import_files(store, tmp_path / "o", {"y": _blob(250, "output directory file")})
        result = ActionResult(
            output_files=[OutputFile(path="out", digest=out.to_proto())],
            output_directories=[
                OutputDirectory(path="t", tree_digest=tree.to_proto()),
                OutputDirectory(path="r", root_directory_digest=root.to_proto()),
            ],
            stdout_digest=log.to_proto(),
        )
        result_digest = store.put_bytes(result.SerializeToString(deterministic=True))
        action = digest_of(store, b"an action")
        store.set_ref(
            f"{ACTION_RESULT_REF_PREFIX}_/{action.hash}/{action.size}", result_digest,
            check_complete=False,
        )
        asset = store.put_bytes(b"a fetched asset")
        store.set_ref(f"{BLOB_REF_PREFIX}key", asset, check_complete=False)
        garbage = store.put_bytes(b"garbage")
        expected = set(_stored(store)) - {garbage}

        self.settle()
        report = store.prune(grace_period=0)

        assert set(_stored(store)) == expected
        assert not report.problems  # neither is parsed as a Directory
        assert store.fsck().ok
        usage = {u.name.split("/")[0]: u for u in store.du().refs}
        assert usage["asset"].total_bytes == asset.size
        assert usage["ac"].total_objects == len(expected) - 1  # all but the asset

        store.blobs.delete_blobs([in_tree, log])
        found = {(p.kind, p.digest) for p in store.fsck().problems}
        assert found == {("missing", in_tree), ("missing", log)}

    def test_maintenance_refuses_bad_arguments(self, store: Store) -> None:
        with pytest.raises(ValueError, match="grace period"):
            store.prune(grace_period=-1)
        with pytest.raises(ValueError, match="low watermark"):
            store.gc(max_size="1G", low_watermark=1.5)
        with pytest.raises(ValueError, match="invalid size"):
            store.gc(max_size="lots")

    # -- gc -------------------------------------------------------------------------------------

    def _refs_in_order(self, store: Store, tmp_path: Path, names: list[str]) -> dict[str, Digest]:
        refs = {}
        for name in names:
            tree = _import_files(
                store, tmp_path / name.replace("/", "_"), {"f": _blob(10_000, name)}
            )
            store.set_ref(name, tree)
            refs[name] = tree
            time.sleep(0.05)  # distinct access times: the order set is the LRU order
        return refs

    def test_gc_expires_least_recently_used_refs_first(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.cannot_expire(store):
            return
        refs = self._refs_in_order(store, tmp_path, ["old", "mid", "new"])
        store.get_ref("old")  # using a ref makes it recent: now "mid" is the least recently used
        mid = _closure(store, refs["mid"])
        total = sum(d.size for d in _stored(store))
        assert 30_000 < total < 31_000

        self.settle()
        report = store.gc(max_size=25_000, low_watermark=0.9, grace_period=0)

        assert report.over_quota and report.reached_target
        assert [u.name for u in report.refs_deleted] == ["mid"]
        assert {r.name for r in store.list_refs()} == {"old", "new"}
        assert report.prune is not None
        assert report.prune.bytes_freed == sum(d.size for d in mid)
        remaining = sum(d.size for d in _stored(store))
        assert remaining == report.predicted_bytes <= report.target_bytes == 22_500
        json.dumps(report.to_dict())

    def test_gc_never_expires_refs_matching_keep(self, store: Store, tmp_path: Path) -> None:
        if self.cannot_expire(store):
            return
        self._refs_in_order(store, tmp_path, ["release/1", "ci/2", "ci/3"])

        self.settle()
        report = store.gc(max_size=25_000, low_watermark=0.9, keep=["release/*"], grace_period=0)

        assert report.refs_kept == ["release/1"]
        assert [u.name for u in report.refs_deleted] == ["ci/2"]
        assert {r.name for r in store.list_refs()} == {"release/1", "ci/3"}

        # Nothing left to expire but protected refs: gc stops short of its target and says so.
        tight = store.gc(max_size=5_000, keep=["release/*", "ci/*"], grace_period=0)
        assert not tight.refs_deleted and not tight.reached_target
        assert {r.name for r in store.list_refs()} == {"release/1", "ci/3"}

    def test_gc_dry_run_under_quota_and_young_data(self, store: Store, tmp_path: Path) -> None:
        def dry_gc() -> object:
            return store.gc(max_size="1G", dry_run=True)

        if self.refused(store, dry_gc, Capability.LIST, RefCapability.LIST):
            return
        if self.cannot_expire(store):
            return
        self._refs_in_order(store, tmp_path, ["a", "b", "c"])
        garbage = store.put_bytes(_blob(1000, "garbage"))
        before = _stored(store)

        self.settle()
        dry = store.gc(max_size="20K", low_watermark=0.5, grace_period=0, dry_run=True)
        assert _stored(store) == before and len(store.list_refs()) == 3
        assert [u.name for u in dry.refs_deleted] == ["a", "b"]  # 10,240 × 0.5 leaves room for one
        assert dry.prune is not None and dry.prune.dry_run
        assert dry.prune.bytes_freed == sum(u.exclusive_bytes for u in dry.refs_deleted) + 1000
        assert dry.predicted_bytes == sum(d.size for d in before) - dry.prune.bytes_freed

        under = store.gc(max_size="1M", grace_period=0)
        assert not under.over_quota and not under.refs_deleted
        assert under.prune is not None and under.prune.objects_freed == 1
        assert not store.contains(garbage) and len(store.list_refs()) == 3

        # Young data cannot be freed by expiring refs: gc leaves the refs alone.
        young = store.gc(max_size=1000, grace_period=3600)
        assert young.over_quota and not young.refs_deleted and not young.reached_target
        assert len(store.list_refs()) == 3

    # -- fsck -----------------------------------------------------------------------------------

    def _damageable(self, store: Store, tmp_path: Path) -> dict[str, Digest]:
        """Two refs; ``damaged``'s tree lacks the blob of ``sub/gone`` from the start."""
        files = {"flip": _blob(2000, "flip"), "trunc": _blob(3000, "trunc"),
                 "sub/gone": _blob(400, "gone"), "ok": _blob(500, "ok")}
        tree = _import_without(store, tmp_path / "t", files, absent=files["sub/gone"])
        other = _import_files(
            store, tmp_path / "o", {"ok": _blob(500, "ok"), "mine": _blob(600, "mine")}
        )
        store.set_ref("damaged", tree, check_complete=False)
        store.set_ref("healthy", other)
        return {
            "tree": tree,
            "other": other,
            "flip": digest_of(store, files["flip"]),
            "trunc": digest_of(store, files["trunc"]),
            "gone": digest_of(store, files["sub/gone"]),
        }

    def cannot_fsck(self, store: Store) -> bool:
        """True (after checking fsck's clear refusal) when fsck cannot start from the refs."""
        return self.refused(store, store.fsck, RefCapability.LIST)

    def test_fsck_of_a_healthy_store_is_ok(self, store: Store, tmp_path: Path) -> None:
        if self.cannot_fsck(store):
            return
        tree = _import_files(
            store, tmp_path / "t", {"a": _blob(500, "ok"), "sub/b": _blob(600, "b")}
        )
        other = _import_files(store, tmp_path / "o", {"c": _blob(700, "c")})
        store.set_ref("one", tree)
        store.set_ref("two", other)

        report = store.fsck()

        assert report.ok and report.to_dict()["ok"] is True
        assert report.refs_checked == 2 and report.directories_checked == 3
        assert report.listed == (not self.lacks(store, Capability.LIST))
        if report.listed:
            assert report.blobs_checked == len(_stored(store))
        else:
            assert report.blobs_checked == len(_closure(store, tree) | _closure(store, other))
        assert not report.incomplete_refs

    def test_fsck_finds_flipped_truncated_and_missing_blobs(
        self, store: Store, tmp_path: Path
    ) -> None:
        if self.cannot_fsck(store):
            return
        d = self._damageable(store, tmp_path)
        flipped = bytearray(_blob(2000, "flip"))
        flipped[1000] ^= 0x01
        self.corrupt_blob(store, d["flip"], bytes(flipped))
        self.corrupt_blob(store, d["trunc"], _blob(3000, "trunc")[:1234])

        # Reading damaged content is a typed error, never data.
        for digest in (d["flip"], d["trunc"]):
            with pytest.raises(CorruptBlobError, match=digest.hash):
                store.read_bytes(digest)
            with pytest.raises(CorruptBlobError), store.open_read(digest) as stream:
                stream.read()

        report = store.fsck()

        assert not report.ok and not report.to_dict()["ok"]
        found = {(p.kind, p.digest): p for p in report.problems}
        assert set(found) == {
            ("corrupt", d["flip"]), ("corrupt", d["trunc"]), ("missing", d["gone"])
        }
        assert all(p.refs == ["damaged"] for p in report.problems)
        assert "1234 bytes" in found[("corrupt", d["trunc"])].detail
        assert report.incomplete_refs == ["damaged"]
        assert json.loads(json.dumps(report.to_dict()))["problems"][0]["refs"] == ["damaged"]

    def test_fsck_repair_deletes_only_corrupt_blobs(self, store: Store, tmp_path: Path) -> None:
        if self.refused(
            store, lambda: store.fsck(repair=True), Capability.DELETE, RefCapability.LIST
        ):
            return
        d = self._damageable(store, tmp_path)
        flipped = bytearray(_blob(2000, "flip"))
        flipped[0] ^= 0x80
        self.corrupt_blob(store, d["flip"], bytes(flipped))
        self.corrupt_blob(store, d["trunc"], b"short")
        healthy = _closure(store, d["other"])

        report = store.fsck(repair=True)

        assert sorted(report.deleted) == sorted([d["flip"], d["trunc"]])
        assert report.incomplete_refs == ["damaged"]
        assert store.find_missing([d["flip"], d["trunc"]]) == {d["flip"], d["trunc"]}
        assert not store.find_missing(healthy)  # the healthy ref is untouched
        assert not missing_in_tree(store.verified, d["other"])

        again = store.fsck()
        assert {(p.kind, p.digest) for p in again.problems} == {
            ("missing", d["flip"]), ("missing", d["trunc"]), ("missing", d["gone"])
        }
        assert again.incomplete_refs == ["damaged"]

    def test_fsck_checks_the_form_of_directories(self, store: Store) -> None:
        if self.cannot_fsck(store):
            return
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
        store.set_ref(
            "not-a-tree", store.put_bytes(b"\xff\xff\xff not protobuf"), check_complete=False
        )

        report = store.fsck()

        kinds = {(p.kind, tuple(p.refs)) for p in report.problems}
        assert kinds == {
            ("not-canonical", ("unsorted",)), ("unsafe", ("unsafe",)),
            ("not-a-directory", ("not-a-tree",)),
        }
        if self.lacks(store, Capability.DELETE):
            return
        # Repair deletes corrupt blobs only: well-formed-but-wrong Directories stay.
        assert not store.fsck(repair=True).deleted
        assert store.contains(unsorted_digest) and store.contains(unsafe_digest)

    # -- du -------------------------------------------------------------------------------------

    def test_du_totals_and_exclusive_sizes(self, store: Store, tmp_path: Path) -> None:
        if self.refused(store, store.du, Capability.LIST, RefCapability.LIST):
            return
        a = _import_files(store, tmp_path / "a", {"shared": _SHARED, "a1": _blob(3000, "a1")})
        b = _import_files(store, tmp_path / "b", {"shared": _SHARED, "b1": _blob(5000, "b1")})
        store.set_ref("a", a)
        store.set_ref("b", b)
        garbage = store.put_bytes(_blob(77, "garbage"))
        listing = _stored(store)

        report = store.du()

        assert report.total_objects == len(listing)
        assert report.total_bytes == sum(d.size for d in listing)
        assert (report.unreachable_objects, report.unreachable_bytes) == (1, garbage.size)
        assert report.reachable_bytes == report.total_bytes - garbage.size
        usage = {u.name: u for u in report.refs}
        for name, tree, other in (("a", a, b), ("b", b, a)):
            mine = _closure(store, tree)
            assert usage[name].total_bytes == sum(x.size for x in mine)
            assert usage[name].total_objects == len(mine)
            assert usage[name].exclusive_bytes == sum(
                x.size for x in mine - _closure(store, other)
            )
        assert [u.name for u in report.refs] == ["b", "a"]  # most exclusive bytes first
        json.dumps(report.to_dict())
