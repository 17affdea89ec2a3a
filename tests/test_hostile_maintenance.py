"""Maintenance facing a store that something other than casframe has touched.

Stray entries in the blob area (a folder named like an object, a file or key whose name is no
hash) and objects emptied by a power cut, on ``file://`` and on ``s3://`` (in-process moto);
plus the configuration a user can get wrong: a config file that is not UTF-8, and misspelt
``file://`` options.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from casframe import (
    BlobNotFoundError,
    CasframeError,
    ConfigError,
    Digest,
    Store,
    layout,
    open_store,
)
from casframe.cli import make_cli
from casframe.testing import write_files
from casframe.testing.s3 import S3TestBucket

HASH_LIKE = "ab" + "c" * 62  # named like an object; no blob has this hash


def run(*args: str) -> Result:
    return CliRunner().invoke(make_cli(), list(args))


@dataclass
class Damage:
    """Changes a store behind its back, as a sync tool, a person or a power cut would."""

    store: Store
    root: Path | None = None  # file://
    bucket: S3TestBucket | None = None  # s3://

    def add_strays(self) -> list[str]:
        """Entries that are not blobs; returns their names relative to the store."""
        if self.root is not None:
            objects = self.root / "objects"
            (objects / "ab" / HASH_LIKE[2:]).mkdir(parents=True)  # a folder named like one
            (objects / "ab" / HASH_LIKE[2:] / "inside").write_bytes(b"x" * 5000)
            (objects / "ab" / "notes.txt").write_bytes(b"a file whose name is no hash")
            os.symlink("/etc/hostname", objects / "ab" / ("d" * 62))
            (objects / "README").write_bytes(b"a stray file at the top")
            return sorted(
                [
                    "objects/README",
                    f"objects/ab/{'d' * 62}",
                    f"objects/ab/{HASH_LIKE[2:]}",
                    "objects/ab/notes.txt",
                ]
            )
        assert self.bucket is not None
        keys = [
            f"objects/ab/{HASH_LIKE[2:]}/inside",  # what syncing the folder above would make
            "objects/ab/notes.txt",
            "objects/README",
            f"objects/zz/{'c' * 62}",
        ]
        for key in keys:
            self.bucket.client.put_object(
                Bucket=self.bucket.name, Key=f"{self.bucket.prefix}/{key}", Body=b"x" * 5000
            )
        for marker in ("objects/", "objects/ab/"):  # what S3 consoles make: not reported
            self.bucket.client.put_object(
                Bucket=self.bucket.name, Key=f"{self.bucket.prefix}/{marker}", Body=b""
            )
        return sorted(keys)

    def empty(self, digest: Digest) -> None:
        """Leave a 0-byte object under ``digest``'s hash, as a power cut can."""
        if self.root is not None:
            path = self.root / layout.object_key(digest)
            path.chmod(0o644)
            path.write_bytes(b"")
            return
        assert self.bucket is not None
        self.bucket.client.put_object(
            Bucket=self.bucket.name, Key=self.key(digest), Body=b""
        )

    def key(self, digest: Digest) -> str:
        assert self.bucket is not None
        return f"{self.bucket.prefix}/{layout.object_key(digest)}"

    def object_exists(self, digest: Digest) -> bool:
        if self.root is not None:
            return (self.root / layout.object_key(digest)).exists()
        assert self.bucket is not None
        return self.key(digest) in self.bucket.keys()

    def wait_out_timestamps(self) -> None:
        """S3 stamps objects to the second: a prune with no grace sees them old after that."""
        if self.bucket is not None:
            time.sleep(2.1)


@pytest.fixture(params=["file", "s3"])
def damage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Damage]:
    if request.param == "file":
        store = open_store(f"file://{tmp_path / 'store'}")
        try:
            yield Damage(store, root=tmp_path / "store")
        finally:
            store.close()
        return
    bucket: S3TestBucket = request.getfixturevalue("s3_mock")
    store = open_store(bucket.store_url)
    try:
        yield Damage(store, bucket=bucket)
    finally:
        store.close()


def _tree(store: Store, tmp_path: Path, label: str) -> Digest:
    source = write_files(
        tmp_path / f"src-{label}",
        {"a.txt": f"{label} alpha\n".encode() * 100, "sub/b.bin": f"{label} beta".encode() * 300},
    )
    return store.import_directory(source)


def _summary(report: Any) -> dict[str, Any]:
    return {k: v for k, v in report.to_dict().items() if k.startswith(("objects_", "bytes_"))}


# -- stray entries --------------------------------------------------------------------------


def test_stray_entries_are_ignored_by_prune_gc_and_du_and_reported_by_fsck(
    damage: Damage, tmp_path: Path
) -> None:
    store = damage.store
    store.set_ref("kept", _tree(store, tmp_path, "kept"))
    loose = store.put_bytes(b"nobody names me" * 10)
    before_du = store.du().to_dict()
    damage.wait_out_timestamps()
    before_prune = store.prune(grace_period=0, dry_run=True)
    strays = damage.add_strays()

    assert store.du().to_dict() == before_du  # strays count for nothing

    report = store.fsck()
    assert report.ok, report.to_dict()
    assert sorted(w.name for w in report.warnings) == strays
    assert report.to_dict()["warnings"]  # in the JSON report too

    dry = store.prune(grace_period=0, dry_run=True)
    assert _summary(dry) == _summary(before_prune)
    gc_report = store.gc(max_size="1T", grace_period=0)
    assert gc_report.prune is not None and gc_report.prune.objects_freed == 1
    assert not store.contains(loose)
    assert len(store.fsck().warnings) == len(strays)  # still there: never deleted
    assert store.fsck().ok


def test_stray_entries_on_the_command_line(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = open_store(f"file://{root}")
    store.set_ref("kept", _tree(store, tmp_path, "kept"))
    strays = Damage(store, root=root).add_strays()

    for command in (["prune", "--grace", "0"], ["gc", "--max-size", "1T"], ["du"]):
        result = run("--store", str(root), *command)
        assert result.exit_code == 0, (command, result.output)

    checked = run("--store", str(root), "fsck")
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.endswith(": no problems\n")
    assert checked.stderr.splitlines() == [
        "casframe: warning: objects/README: a file, not a fan-out folder; ignored",
        f"casframe: warning: objects/ab/{HASH_LIKE[2:]}: a directory, not an object; ignored",
        f"casframe: warning: objects/ab/{'d' * 62}: a symbolic link, not an object; ignored",
        "casframe: warning: objects/ab/notes.txt: a file whose name is not a hash; ignored",
    ]
    assert len(strays) == 4


def test_a_folder_where_a_referenced_object_should_be_is_a_missing_blob(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = open_store(f"file://{root}")
    tree = _tree(store, tmp_path, "t")
    store.set_ref("t", tree)
    victim = max(d for d in store.tree_digests(tree) if d.size > 1000)
    path = root / layout.object_key(victim)
    path.unlink()
    path.mkdir()

    assert store.find_missing([victim]) == {victim}
    report = store.fsck()
    assert [(p.kind, p.digest, p.refs) for p in report.problems] == [("missing", victim, ["t"])]
    assert [w.what for w in report.warnings] == ["a directory, not an object"]
    store.prune(grace_period=0)
    assert path.is_dir()  # left alone
    with pytest.raises(BlobNotFoundError):
        store.read_bytes(victim)
    with pytest.raises(BlobNotFoundError):
        store.blobs.local_path(victim)


def test_a_fifo_where_a_referenced_object_should_be_is_missing_and_never_waited_on(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    store = open_store(f"file://{root}")
    tree = _tree(store, tmp_path, "t")
    store.set_ref("t", tree)
    victim = max(d for d in store.tree_digests(tree) if d.size > 1000)
    path = root / layout.object_key(victim)
    path.unlink()
    os.mkfifo(path)  # opening it for reading would wait for a writer forever

    for read in (store.read_bytes, lambda d: list(store.read_many([d]))):
        with pytest.raises(BlobNotFoundError):
            read(victim)
    with pytest.raises(BlobNotFoundError):
        store.blobs.local_path(victim)
    with pytest.raises(BlobNotFoundError):
        store.checkout(tree, tmp_path / "out")
    report = store.fsck()
    assert [(p.kind, p.digest) for p in report.problems] == [("missing", victim)]
    assert [(w.name, w.what) for w in report.warnings] == [
        (f"objects/{victim.hash[:2]}/{victim.hash[2:]}", "a special file, not an object")
    ]


@pytest.mark.parametrize("named_temp", [False, True], ids=["O_TMPFILE", "named-temp"])
@pytest.mark.parametrize("stray", ["folder", "fan-out file"])
def test_a_stray_entry_in_an_objects_place_stops_its_write_clearly_and_loses_nothing(
    tmp_path: Path, stray: str, named_temp: bool
) -> None:
    root = tmp_path / "store"
    store = open_store(f"file://{root}")
    if named_temp:  # as on a file system without O_TMPFILE
        store.blobs._anonymous = False  # type: ignore[attr-defined]
    data = b"payload" * 100
    digest = Digest.of_bytes(data)
    fanout = root / "objects" / digest.hash[:2]
    if stray == "folder":
        (fanout / digest.hash[2:]).mkdir(parents=True)
        (fanout / digest.hash[2:] / "notes").write_text("someone's notes")
        where, what = f"objects/{digest.hash[:2]}/{digest.hash[2:]}", "a directory"
    else:
        fanout.write_text("someone's notes")
        where, what = f"objects/{digest.hash[:2]}", "not a directory"

    with pytest.raises(CasframeError) as caught:
        store.put_bytes(data)
    assert str(caught.value) == (
        f"cannot store blob {digest} in file://{root}: {where} is {what}, "
        "a stray entry in the object's place; move it away"
    )
    assert not os.listdir(root / "tmp")  # no temp file left behind
    kept = fanout / digest.hash[2:] / "notes" if stray == "folder" else fanout
    assert kept.read_text() == "someone's notes"


# -- emptied objects ------------------------------------------------------------------------


def test_an_emptied_object_a_ref_names_is_corrupt_and_repair_removes_it(
    damage: Damage, tmp_path: Path
) -> None:
    store = damage.store
    tree = _tree(store, tmp_path, "t")
    store.set_ref("t", tree)
    victim = max(d for d in store.tree_digests(tree) if d.size > 1000)
    damage.empty(victim)

    report = store.fsck()
    assert [(p.kind, p.digest, p.detail, p.refs) for p in report.problems] == [
        ("corrupt", victim, "stored object has 0 bytes", ["t"])
    ]
    assert not report.warnings

    repaired = store.fsck(repair=True)
    assert repaired.deleted == [victim]
    assert repaired.incomplete_refs == ["t"]
    assert not damage.object_exists(victim)
    after = store.fsck()
    assert [(p.kind, p.digest) for p in after.problems] == [("missing", victim)]

    store.set_ref("t", _tree(store, tmp_path, "t"))  # importing it again heals the tree
    assert store.fsck().ok


def test_an_unreferenced_emptied_object_is_corrupt_and_pruned(
    damage: Damage, tmp_path: Path
) -> None:
    store = damage.store
    store.set_ref("kept", _tree(store, tmp_path, "kept"))
    loose = store.put_bytes(b"written without fsync, then the power went" * 10)
    healthy = store.du()
    damage.empty(loose)

    report = store.fsck()
    assert [(p.kind, str(p.digest), p.detail) for p in report.problems] == [
        ("corrupt", f"{loose.hash}/0", "stored object is empty (0 bytes): its content is lost")
    ]
    emptied = store.du()  # no blob any more: counts for nothing
    assert (emptied.total_objects, emptied.total_bytes) == (
        healthy.total_objects - 1,
        healthy.total_bytes - loose.size,
    )

    damage.wait_out_timestamps()
    dry = store.prune(grace_period=0, dry_run=True)
    assert dry.objects_freed == 1 and dry.bytes_freed == 0
    assert damage.object_exists(loose)
    pruned = store.prune(grace_period=0)
    assert pruned.objects_freed == 1
    assert not damage.object_exists(loose)
    assert store.fsck().ok


def test_fsck_repair_removes_an_unreferenced_emptied_object(damage: Damage) -> None:
    store = damage.store
    loose = store.put_bytes(b"lost content" * 100)
    damage.empty(loose)

    repaired = store.fsck(repair=True)
    assert [str(d) for d in repaired.deleted] == [f"{loose.hash}/0"]
    assert not damage.object_exists(loose)
    assert store.fsck().ok
    assert store.put_bytes(b"lost content" * 100) == loose  # and it can be stored again
    assert store.read_bytes(loose) == b"lost content" * 100


def test_an_emptied_object_on_the_command_line(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = open_store(f"file://{root}")
    tree = _tree(store, tmp_path, "t")
    store.set_ref("t", tree)
    victim = max(d for d in store.tree_digests(tree) if d.size > 1000)
    Damage(store, root=root).empty(victim)

    found = run("--store", str(root), "fsck")
    assert found.exit_code == 1
    assert found.stdout.splitlines()[0] == (
        f"corrupt {victim}: stored object has 0 bytes (refs: t)"
    )
    repaired = run("--store", str(root), "fsck", "--repair")
    assert f"deleted corrupt blob {victim}" in repaired.stdout
    assert "incomplete ref t" in repaired.stdout


# -- configuration mistakes -------------------------------------------------------------------


@pytest.mark.usefixtures("isolated_env")
def test_a_config_file_that_is_not_utf8_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(b'[stores.ci]\nurl = "/srv/caf\xe9"\n')
    result = run("--config", str(config), "du")
    assert result.exit_code == 1
    assert result.stderr == (
        f"casframe: error: {config}: invalid TOML: not UTF-8 text: byte 0xe9 "
        "(at line 2, column 16)\n"
    )


@pytest.mark.usefixtures("isolated_env")
def test_a_project_file_that_is_not_utf8_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "casframe.toml").write_bytes(b"\xff\xfe[remotes.team]\n")
    result = run("pull", "nothing")
    assert result.exit_code == 1
    assert result.stderr == (
        f"casframe: error: {tmp_path / 'casframe.toml'}: invalid TOML: not UTF-8 text: "
        "byte 0xff (at line 1, column 1)\n"
    )


@pytest.mark.parametrize(
    "query", ["?fsycn=true", "?fsync=true&mode=fast"], ids=["misspelt", "unknown"]
)
def test_unknown_file_url_options_are_refused(tmp_path: Path, query: str) -> None:
    url = f"file://{tmp_path / 'store'}{query}"
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    unknown = "fsycn" if "fsycn" in query else "mode"
    assert str(caught.value) == (
        f"unknown option(s) {unknown} for {url}; file:// stores accept: fsync"
    )
    assert not (tmp_path / "store").exists()  # refused before anything was made


def test_memory_urls_take_no_options() -> None:
    with pytest.raises(ConfigError) as caught:
        open_store("memory://?fsync=true")
    assert str(caught.value) == (
        "unknown option(s) fsync for memory://?fsync=true; memory:// stores accept: no options"
    )


@pytest.mark.usefixtures("isolated_env")
def test_unknown_file_options_in_the_config_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[stores.ci]\nurl = "{tmp_path / "cas"}"\n[stores.ci.options]\nfsycn = true\n'
    )
    result = run("--config", str(config), "--store", "ci", "du")
    assert result.exit_code == 1
    assert "unknown option(s) fsycn for file://" in result.stderr
    assert "file:// stores accept: fsync" in result.stderr
    assert not (tmp_path / "cas").exists()
