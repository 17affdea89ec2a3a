"""The ``file://`` store beyond the conformance suite: its on-disk layout (BuildStream 1.x's CAS
cache), read-only objects, hardlinked checkouts, deduplication, several processes at once, and
damaged objects."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import casframe_local.blobs as local_blobs
import pytest

from casframe import (
    EMPTY_DIGEST,
    BlobNotFoundError,
    ConfigError,
    CorruptBlobError,
    Digest,
    InvalidDigestError,
    Store,
    layout,
    open_store,
)
from casframe._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)
from casframe.testing import (
    LARGE_FILE_SIZE,
    TREE_EXECUTABLES,
    TREE_FILES,
    assert_tree_equal,
    random_bytes,
    write_files,
)
from casframe.tree import missing_in_tree


def object_path(root: Path, digest: Digest) -> Path:
    return root / layout.object_key(digest)


def all_objects(root: Path) -> dict[str, os.stat_result]:
    """Every file under ``objects/``, by relative path, with its stat."""
    objects = root / "objects"
    return {
        str(p.relative_to(objects)): p.stat()
        for p in sorted(objects.rglob("*"))
        if not p.is_dir()
    }


@pytest.fixture
def store_root(local_store: Store, tmp_path: Path) -> Path:
    return tmp_path / "store"


# -- layout -------------------------------------------------------------------------------------


def test_layout_is_buildstream_1_cas(local_store: Store, store_root: Path, make_tree) -> None:
    tree = local_store.import_directory(make_tree(large=True))
    local_store.set_ref("project/element/key", tree)
    assert sorted(os.listdir(store_root)) == ["objects", "refs", "tmp"]

    stored = [d for d in local_store.tree_digests(tree) if d.size]
    names = set()
    for digest in stored:
        path = object_path(store_root, digest)
        assert path.is_file(), f"{digest} is not at objects/ab/cdef…"
        assert path.stat().st_size == digest.size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest.hash
        names.add(f"{digest.hash[:2]}/{digest.hash[2:]}")
    assert set(all_objects(store_root)) == names, "nothing else in objects/"

    ref_file = store_root / "refs" / "heads" / "project" / "element" / "key"
    assert ref_file.read_bytes() == tree.serialize()
    assert Digest.from_serialized(ref_file.read_bytes()) == tree
    assert os.listdir(store_root / "tmp") == [], "no temporary files left after success"


def test_objects_are_read_only(local_store: Store, store_root: Path, make_tree) -> None:
    local_store.import_directory(make_tree(large=True))
    local_store.put_bytes(b"small, through put_bytes")
    local_store.put_many([(Digest.of_bytes(b"through put_many"), b"through put_many")])
    local_store.put_stream(_BytesStream(random_bytes(3 << 20, seed=1)))
    objects = all_objects(store_root)
    assert len(objects) > 10
    # Tests run as root, who may write anything: check the mode bits, not a failed write.
    modes = {name: stat.S_IMODE(st.st_mode) for name, st in objects.items()}
    assert set(modes.values()) == {0o444}, modes


class _BytesStream:
    def __init__(self, data: bytes) -> None:
        import io

        self._inner = io.BytesIO(data)
        self.readinto = self._inner.readinto
        self.read = self._inner.read


def test_failed_uploads_leave_nothing_behind(local_store: Store, store_root: Path) -> None:
    data = random_bytes(3 << 20, seed=2)
    wrong = Digest.of_bytes(b"something else")
    with pytest.raises(ValueError):
        local_store.put_stream(_BytesStream(data), wrong)
    with pytest.raises(ValueError):
        local_store.put_bytes(data, wrong)
    assert all_objects(store_root) == {}
    assert os.listdir(store_root / "tmp") == []


def test_local_files_are_copied_in_the_kernel_and_stored_under_what_was_copied(
    local_store: Store, store_root: Path, tmp_path: Path
) -> None:
    data = random_bytes(LARGE_FILE_SIZE, seed=4)
    (tmp_path / "big").write_bytes(data)
    digest = local_store.put_file(tmp_path / "big")
    assert digest == Digest.of_bytes(data)
    assert object_path(store_root, digest).read_bytes() == data
    assert stat.S_IMODE(object_path(store_root, digest).stat().st_mode) == 0o444
    # A file the kernel copies nothing from although it reads fine (its size says 0, as
    # /proc files do) is read instead, not stored empty.
    with open("/proc/self/cmdline", "rb") as f:
        expected = f.read()
    assert expected and os.stat("/proc/self/cmdline").st_size == 0
    assert local_store.put_file("/proc/self/cmdline") == Digest.of_bytes(expected)
    assert os.listdir(store_root / "tmp") == []


def test_fsync_flushes_new_names_not_only_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renamed or linked file survives a power cut only once its folder is flushed."""
    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "synced"
    with open_store(f"file://{root}?fsync=true") as store:
        digest = store.put_bytes(b"flushed to disk")
        store.set_ref("team/main", store.put_directory(Directory()))
    assert str(root / "objects" / digest.hash[:2]) in flushed
    assert str(root / "objects") in flushed
    assert str(root / "refs" / "heads" / "team") in flushed
    assert str(root / "refs" / "heads") in flushed


def test_open_store_options_and_errors(tmp_path: Path) -> None:
    with open_store(f"file://{tmp_path / 'synced'}?fsync=true") as store:
        digest = store.put_bytes(b"flushed to disk")
        assert store.read_bytes(digest) == b"flushed to disk"
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a directory"):
        open_store(f"file://{tmp_path / 'a-file'}")
    with pytest.raises(ConfigError):
        open_store(f"file://{tmp_path / 'x'}?fsync=maybe")


def test_damaged_ref_file_is_reported_with_its_name(local_store: Store, store_root: Path) -> None:
    (store_root / "refs" / "heads" / "broken").write_bytes(b"\xff\xff not a Digest")
    with pytest.raises(InvalidDigestError, match="broken"):
        local_store.get_ref("broken")


# -- checkout by hardlinks ----------------------------------------------------------------------


@pytest.mark.parametrize("link", [None, True])
def test_hardlinked_checkout_shares_read_only_objects(
    local_store: Store, store_root: Path, make_tree, tmp_path: Path, link: bool | None
) -> None:
    source = make_tree()
    tree = local_store.import_directory(source)
    dest = tmp_path / "checkout"
    local_store.checkout(tree, dest, link=link)
    assert_tree_equal(source, dest)
    for rel, content in TREE_FILES.items():
        st = (dest / rel).stat()
        digest = Digest.of_bytes(content)
        if rel in TREE_EXECUTABLES:
            # A hardlink shares its mode with the object: executables must be copies.
            assert st.st_ino != object_path(store_root, digest).stat().st_ino, rel
            assert st.st_mode & stat.S_IXUSR, rel
        elif digest == EMPTY_DIGEST:
            assert st.st_size == 0  # the empty blob has no object to link to
        else:
            assert st.st_ino == object_path(store_root, digest).stat().st_ino, rel
            assert stat.S_IMODE(st.st_mode) == 0o444, f"{rel} is writable in place"


def test_copied_checkout_is_independent_and_writable(
    local_store: Store, store_root: Path, make_tree, tmp_path: Path
) -> None:
    source = make_tree()
    tree = local_store.import_directory(source)
    dest = tmp_path / "checkout"
    local_store.checkout(tree, dest, link=False)
    assert_tree_equal(source, dest)
    readme = dest / "README.txt"
    obj = object_path(store_root, Digest.of_bytes(TREE_FILES["README.txt"]))
    assert readme.stat().st_ino != obj.stat().st_ino
    assert readme.stat().st_mode & stat.S_IWUSR
    readme.write_bytes(b"edited")
    assert obj.read_bytes() == TREE_FILES["README.txt"]


def test_hardlinked_checkout_of_a_truncated_object_is_refused(
    local_store: Store, store_root: Path, make_tree, tmp_path: Path
) -> None:
    tree = local_store.import_directory(make_tree())
    victim = object_path(store_root, Digest.of_bytes(TREE_FILES["src/pkg/module.py"]))
    victim.chmod(0o644)
    victim.write_bytes(TREE_FILES["src/pkg/module.py"][:5])
    with pytest.raises(CorruptBlobError):
        local_store.checkout(tree, tmp_path / "checkout", link=True)


# -- deduplication ------------------------------------------------------------------------------


def test_same_content_is_stored_once(
    local_store: Store, store_root: Path, make_tree, tmp_path: Path
) -> None:
    first = local_store.import_directory(make_tree("one", large=True))
    objects = all_objects(store_root)
    distinct = {d for d in local_store.tree_digests(first) if d.size}
    assert len(objects) == len(distinct), "duplicate files share one object"

    assert local_store.import_directory(make_tree("two", large=True)) == first
    local_store.put_bytes(TREE_FILES["README.txt"])
    with open(tmp_path / "two" / "big" / "large.bin", "rb") as f:
        local_store.put_stream(f)
    again = all_objects(store_root)
    assert {k: v.st_ino for k, v in again.items()} == {
        k: v.st_ino for k, v in objects.items()
    }, "an existing object is not rewritten"
    # ... but it is freshened, so that prune's grace period covers the writer storing it again.
    assert all(again[k].st_mtime_ns >= v.st_mtime_ns for k, v in objects.items())


# -- damaged objects ----------------------------------------------------------------------------


def test_truncated_object_is_corrupt_on_read_and_missing_for_writers(
    local_store: Store, store_root: Path
) -> None:
    data = random_bytes(LARGE_FILE_SIZE, seed=3)
    small = b"a small blob that will lose its tail"
    for content in (data, small):
        digest = local_store.put_bytes(content)
        path = object_path(store_root, digest)
        path.chmod(0o644)
        with open(path, "r+b") as f:
            f.truncate(len(content) // 2)
        with pytest.raises(CorruptBlobError, match=str(digest)):
            local_store.read_bytes(digest)
        with pytest.raises(CorruptBlobError):
            local_store.open_read(digest).read()
        assert local_store.find_missing([digest]) == {digest}
        # Because it counts as missing, storing it again repairs it.
        local_store.put_bytes(content)
        assert local_store.read_bytes(digest) == content
        assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_reimport_repairs_a_truncated_object(
    local_store: Store, store_root: Path, make_tree, tmp_path: Path
) -> None:
    source = make_tree()
    tree = local_store.import_directory(source)
    victim = object_path(store_root, Digest.of_bytes(TREE_FILES["docs/guide.md"]))
    victim.chmod(0o644)
    victim.write_bytes(b"")
    guide = Digest.of_bytes(TREE_FILES["docs/guide.md"])
    assert missing_in_tree(local_store.verified, tree) == {guide}
    assert local_store.import_directory(source) == tree
    assert missing_in_tree(local_store.verified, tree) == set()
    local_store.checkout(tree, tmp_path / "out", link=False)
    assert_tree_equal(source, tmp_path / "out")


# -- a cache written by BuildStream 1.x ---------------------------------------------------------


def test_opens_a_buildstream_1_cache_as_it_is(tmp_path: Path) -> None:
    """A cache laid out by hand the way BuildStream 1.x writes one: objects/, refs/heads/."""
    cache = tmp_path / "buildstream" / "cas"

    def add_object(data: bytes) -> Digest:
        digest = Digest(hashlib.sha256(data).hexdigest(), len(data))
        path = object_path(cache, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)  # BuildStream 1.x does not make its objects read-only
        return digest

    hello = add_object(b"hello from buildstream\n")
    tool = add_object(b"#!/bin/sh\necho tool\n")
    usr_bin = Directory(files=[FileNode(name="tool", digest=tool.to_proto(), is_executable=True)])
    usr = Directory(
        directories=[DirectoryNode(name="bin", digest=add_object(
            usr_bin.SerializeToString(deterministic=True)).to_proto())]
    )
    root = Directory(
        files=[FileNode(name="hello.txt", digest=hello.to_proto())],
        directories=[DirectoryNode(name="usr", digest=add_object(
            usr.SerializeToString(deterministic=True)).to_proto())],
        symlinks=[SymlinkNode(name="greeting", target="hello.txt")],
    )
    root_digest = add_object(root.SerializeToString(deterministic=True))
    ref = cache / "refs" / "heads" / "project" / "core" / "hello.bst" / "0123abcd"
    ref.parent.mkdir(parents=True)
    ref.write_bytes(root_digest.serialize())
    assert not (cache / "tmp").exists()

    with open_store(f"file://{cache}") as store:
        assert [r.name for r in store.list_refs("project/")] == ["project/core/hello.bst/0123abcd"]
        assert store.get_ref("project/core/hello.bst/0123abcd") == root_digest
        assert missing_in_tree(store.verified, root_digest) == set()
        dest = tmp_path / "checkout"
        store.checkout("project/core/hello.bst/0123abcd", dest)
    assert (dest / "hello.txt").read_bytes() == b"hello from buildstream\n"
    assert os.readlink(dest / "greeting") == "hello.txt"
    assert (dest / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert (dest / "usr/bin/tool").stat().st_mode & stat.S_IXUSR


# -- several processes at once ------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import io, os, random, sys, time
    from casframe import open_store

    url, worker, go, trees = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

    def blob(i):
        return random.Random(i).randbytes(1 + (i * 7919) % 200_000)

    store = open_store(url)
    while not os.path.exists(go):
        time.sleep(0.001)
    shared = list(range(40))
    overlapping = list(range(100 + 10 * worker, 100 + 10 * worker + 20))
    for _ in range(2):
        for i in shared + overlapping:
            store.put_bytes(blob(i))
        store.put_stream(io.BytesIO(random.Random(-1).randbytes(3 << 20)))
        store.set_ref(f"shared/{worker}", store.import_directory(os.path.join(trees, "shared")))
        store.set_ref(f"own/{worker}", store.import_directory(os.path.join(trees, f"own{worker}")))
    store.close()
    """
)


def test_several_processes_writing_at_once(tmp_path: Path, make_tree) -> None:
    import random

    workers = 4
    store_dir = tmp_path / "store"
    trees = tmp_path / "trees"
    make_tree("trees/shared")
    for worker in range(workers):
        own = make_tree(f"trees/own{worker}")
        (own / "mine.txt").write_bytes(f"worker {worker}\n".encode())
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    url = f"file://{store_dir}"
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(w), str(go), str(trees)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for w in range(workers)
    ]
    go.write_bytes(b"")
    (tmp_path / "out").mkdir()
    outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0] * workers, "\n".join(outputs)

    with open_store(url) as store:
        for i in list(range(40)) + list(range(100, 100 + 10 * workers + 10)):
            data = random.Random(i).randbytes(1 + (i * 7919) % 200_000)
            assert store.read_bytes(Digest.of_bytes(data)) == data
        big = random.Random(-1).randbytes(3 << 20)
        assert store.read_bytes(Digest.of_bytes(big)) == big
        names = sorted(r.name for r in store.list_refs())
        assert names == sorted([f"shared/{w}" for w in range(workers)]
                               + [f"own/{w}" for w in range(workers)])
        for w in range(workers):
            for name, source in ((f"shared/{w}", "shared"), (f"own/{w}", f"own{w}")):
                out = tmp_path / "out" / name.replace("/", "-")
                store.checkout(name, out, link=False)
                assert_tree_equal(trees / source, out)
    assert os.listdir(store_dir / "tmp") == [], "no temporary files left after success"
    for name, st in all_objects(store_dir).items():
        assert len(name) == 65 and name[2] == "/", f"stray file objects/{name}"
        assert stat.S_IMODE(st.st_mode) == 0o444


def test_a_huge_size_for_a_stored_hash_is_missing_not_a_memory_error(local_store: Store) -> None:
    """A damaged Directory can name a stored hash with any size: reading it must not try to
    allocate that size first."""
    stored = local_store.put_bytes(b"five!")
    huge = Digest(stored.hash, 1 << 40)
    with pytest.raises(BlobNotFoundError):
        list(local_store.blobs.read_blobs([huge]))
    with pytest.raises(BlobNotFoundError):
        list(local_store.read_many([huge]))


def test_a_shared_store_replaces_objects_it_may_not_freshen(
    local_store: Store, store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a store shared by several users, objects are read-only and another user's: the
    touch that renews their grace period is refused (EPERM). Storing the content again puts
    this user's copy in their place, atomically, instead of failing the import."""
    source = write_files(tmp_path / "src", {"a.txt": b"shared content", "sub/b.txt": b"more"})
    tree = local_store.import_directory(source)
    local_store.set_ref("theirs", tree)
    foreign = {
        p.stat().st_ino
        for folder in ("objects", "refs")
        for p in (store_root / folder).rglob("*")
        if p.is_file()
    }
    real_utime = os.utime

    def utime(path, *args, dir_fd=None, **kwargs):  # type: ignore[no-untyped-def]
        st = os.stat(path, dir_fd=dir_fd)
        if st.st_ino in foreign and st.st_mtime < old + 60:  # (inode numbers are reused)
            raise PermissionError(1, "Operation not permitted", path)
        return real_utime(path, *args, dir_fd=dir_fd, **kwargs)

    old = time.time() - 3600
    monkeypatch.setattr(os, "utime", utime)
    for p in (store_root / "objects").rglob("*"):
        if p.is_file():
            real_utime(p, (old, old))

    assert local_store.import_directory(source) == tree
    local_store.set_ref("mine", tree)
    assert local_store.get_ref("theirs") == tree  # the ref's touch is refused too: not fatal
    # Each object is this user's fresh copy now (the fake refuses only the old ones).
    replaced = [p for p in (store_root / "objects").rglob("*") if p.is_file()]
    assert len(replaced) == 4 and all(p.stat().st_mtime > old + 60 for p in replaced)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in replaced)
    assert not missing_in_tree(local_store.verified, tree)
    assert os.listdir(store_root / "tmp") == []


def test_a_failed_publish_leaves_no_named_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without O_TMPFILE, uploads are named files in tmp/: one whose publish fails (here: the
    rename into objects/) is removed, not left for a prune to find."""
    with open_store(f"file://{tmp_path / 'store'}") as store:
        def full_disk(*_: object, **__: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store.blobs, "_anonymous", False)
        monkeypatch.setattr(os, "rename", full_disk)
        writer = store.blobs.begin_write()
        writer.write(b"never published")
        with pytest.raises(OSError, match="No space"):
            writer.commit(Digest.of_bytes(b"never published"))
        writer.abort()
    assert os.listdir(tmp_path / "store" / "tmp") == []


def test_objects_emptied_by_a_crash_are_corrupt_not_a_crash(
    local_store: Store, store_root: Path
) -> None:
    """A power cut without fsync can leave an object of 0 bytes under its hash: no blob can
    be that (only the empty blob has size 0), and reading, fsck and prune must say so."""
    content = local_store.put_bytes(b"file content")
    tree = local_store.put_directory(
        Directory(files=[FileNode(name="f", digest=content.to_proto())])
    )
    local_store.set_ref("r", tree)
    path = object_path(store_root, content)
    path.chmod(0o644)
    path.write_bytes(b"")
    with pytest.raises(CorruptBlobError, match="has 0 bytes"):
        local_store.read_bytes(content)
    with pytest.raises(CorruptBlobError):
        list(local_store.read_many([content]))
    assert [i.digest for i in local_store.blobs.iter_blobs()] == [tree]
    assert [(p.kind, p.digest) for p in local_store.fsck().problems] == [("corrupt", content)]

    path = object_path(store_root, tree)
    path.chmod(0o644)
    path.write_bytes(b"")
    # The file is no longer reachable: its emptied object is reported under its hash alone.
    assert [(p.kind, str(p.digest)) for p in local_store.fsck().problems] == sorted(
        [("corrupt", str(tree)), ("corrupt", f"{content.hash}/0")]
    )
    assert [(p.kind, p.digest) for p in local_store.prune(grace_period=0).problems] == [
        ("corrupt", tree)
    ]


# -- large files copied into the store ---------------------------------------------------------


@pytest.mark.parametrize("function", ["sha256", "blake3"])
def test_a_copied_file_is_stored_as_copied_whatever_was_reserved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str
) -> None:
    # Large copies reserve the file's size first; if the file shrinks meanwhile (here: more was
    # reserved than the copy finds), what is stored is what was copied, without the rest.
    reserve = local_blobs._preallocate
    reserved: list[int] = []

    def reserve_more(fd: int, size: int) -> int:
        reserved.append(reserve(fd, size + 5000))
        return reserved[-1]

    monkeypatch.setattr(local_blobs, "_preallocate", reserve_more)
    data = random_bytes(3 << 20, seed=5)
    path = tmp_path / "large.bin"
    path.write_bytes(data)
    with open_store(f"file://{tmp_path / 'store'}", digest_function=function) as store:
        digest = store.put_file(path)
        assert digest == Digest.of_bytes(data, store.digest_function)
        assert reserved == [len(data) + 5000]
        assert store.read_bytes(digest) == data
        assert os.path.getsize(store.blobs.local_path(digest)) == len(data)
